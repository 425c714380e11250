use super::outln;
use std::path::Path;
use std::process::ExitCode;
use vmnet_broker::config::{ConfigDir, Source, overlapping};

/// Prints one line per network; exits 1 if any file is invalid or refused, or if two
/// files fix overlapping subnets.
pub fn main(dir: &Path) -> super::Result {
    let mut bad = 0;
    let results = ConfigDir::new(dir).load_all();
    let valid: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .cloned()
        .collect();
    let overlaps = overlapping(&valid);
    for result in &results {
        match result {
            Ok(c) => {
                let from = match &c.source {
                    Source::BuiltIn => "built-in".to_string(),
                    Source::File(p) => p.display().to_string(),
                };
                // A file whose subnet overlaps another's is an error, not "ok".
                let mine: Vec<_> = overlaps
                    .iter()
                    .filter(|e| Source::File(e.path.clone()) == c.source)
                    .collect();
                if !mine.is_empty() {
                    bad += 1;
                    for e in mine {
                        outln!("error  {}", e.detail());
                    }
                    continue;
                }
                for w in &c.warnings {
                    outln!("warning {from}: {w}");
                }
                let unsupported = unsupported_here(c);
                if !unsupported.is_empty() {
                    bad += 1;
                    for field in unsupported {
                        outln!("error  {from}: {field}");
                    }
                    continue;
                }
                let subnet = c
                    .fixed_subnet()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| format!("dynamic /{}", c.prefix_len));
                outln!("ok     {:<16} {:<6} {:<18} {from}", c.name, c.mode, subnet);
            }
            Err(e) => {
                bad += 1;
                // The administrator's view: serde's whole message, content included.
                outln!("error  {}", e.detail());
            }
        }
    }
    if bad > 0 {
        eprintln!("{bad} invalid file(s) in {}", dir.display());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Fields of a valid definition this system cannot honour: each backend says
/// (`backend::vmnet::unsupported` on macOS, `backend::linux_support::unsupported` on
/// Linux), so `check-config` reports what creation would refuse.
fn unsupported_here(c: &vmnet_broker::config::NetworkConfig) -> Vec<String> {
    #[cfg(target_os = "macos")]
    return vmnet_broker::backend::vmnet::unsupported(c);
    #[cfg(not(target_os = "macos"))]
    return vmnet_broker::backend::linux_support::unsupported(c);
}
