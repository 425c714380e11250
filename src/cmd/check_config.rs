use std::path::Path;
use std::process::ExitCode;
use vmnet_broker::config::{ConfigDir, Source};

/// Prints one line per network; exits 1 if any file is invalid.
pub fn main(dir: &Path) -> super::Result {
    let mut bad = 0;
    for result in ConfigDir::new(dir).load_all() {
        match result {
            Ok(c) => {
                let from = match &c.source {
                    Source::BuiltIn => "built-in".to_string(),
                    Source::File(p) => p.display().to_string(),
                };
                let subnet = c
                    .fixed_subnet()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| format!("dynamic /{}", c.prefix_len));
                println!("ok     {:<16} {:<6} {:<18} {from}", c.name, c.mode, subnet);
            }
            Err(e) => {
                bad += 1;
                println!("error  {e}");
            }
        }
    }
    if bad > 0 {
        eprintln!("{bad} invalid file(s) in {}", dir.display());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
