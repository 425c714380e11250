use super::outln;
use std::path::Path;
use std::process::ExitCode;
use vmnet_broker_client::client::Client;

pub fn main(socket: &Path, json: bool) -> super::Result {
    let status = Client::connect(socket)?.status()?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    super::print_status_header(&status);
    outln!(
        "{:<16} {:<6} {:<18} {:<15} {:>7}  {:<24} {:<8} OVERLAY",
        "NETWORK",
        "MODE",
        "SUBNET",
        "BRIDGE",
        "CLIENTS",
        "TAPS",
        "REMOVAL"
    );
    for n in &status.networks {
        let removal = super::removal_text(n.removal_in_seconds);
        let taps = if n.taps.is_empty() {
            "-".to_string()
        } else {
            n.taps.join(",")
        };
        outln!(
            "{:<16} {:<6} {:<18} {:<15} {:>7}  {:<24} {removal:<8} {}",
            n.name,
            n.mode,
            n.subnet,
            n.bridge,
            n.clients,
            taps,
            n.overlay.as_deref().unwrap_or("-")
        );
    }
    super::print_status_clients(&status);
    Ok(ExitCode::SUCCESS)
}
