use std::path::Path;
use std::process::ExitCode;
use vmnet_broker_client::client::Client;

/// Prints the broker's OpenMetrics text as it sent it (it ends with `# EOF`).
pub fn main(socket: &Path) -> super::Result {
    let text = Client::connect(socket)?.metrics()?;
    super::write_stdout(format_args!("{text}"));
    Ok(ExitCode::SUCCESS)
}
