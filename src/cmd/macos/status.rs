//! `status` on macOS: our XPC `status` command (an original broker answers it with 4).

use super::outln;
use std::process::ExitCode;
use vmnet_broker::backend::macos::client::XpcClient;

pub fn main(service: &str, json: bool) -> super::Result {
    let status = XpcClient::connect(service)?.status()?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    super::print_status_header(&status);
    outln!(
        "{:<16} {:<6} {:<18} {:>7}  REMOVAL",
        "NETWORK",
        "MODE",
        "SUBNET",
        "CLIENTS"
    );
    for n in &status.networks {
        let removal = super::removal_text(n.removal_in_seconds);
        outln!(
            "{:<16} {:<6} {:<18} {:>7}  {removal}",
            n.name,
            n.mode,
            n.subnet,
            n.clients
        );
    }
    super::print_status_clients(&status);
    Ok(ExitCode::SUCCESS)
}
