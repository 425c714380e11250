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
    outln!(
        "vmnet-broker {} (protocol {}), pid {}, idle timeout {}s",
        status.version,
        status.protocol,
        status.pid,
        status.idle_timeout_seconds
    );
    outln!();
    outln!(
        "{:<16} {:<6} {:<18} {:>7}  REMOVAL",
        "NETWORK",
        "MODE",
        "SUBNET",
        "CLIENTS"
    );
    for n in &status.networks {
        let removal = n
            .removal_in_seconds
            .map(|s| format!("in {s:.0}s"))
            .unwrap_or_else(|| "-".into());
        outln!(
            "{:<16} {:<6} {:<18} {:>7}  {removal}",
            n.name,
            n.mode,
            n.subnet,
            n.clients
        );
    }
    outln!();
    outln!("{:<6} {:>8} {:>6}  NETWORKS", "CLIENT", "PID", "UID");
    for c in &status.clients {
        outln!(
            "{:<6} {:>8} {:>6}  {}",
            c.id,
            c.pid,
            c.uid,
            c.networks.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}
