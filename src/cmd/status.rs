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
    outln!(
        "vmnet-broker {} (protocol {}), pid {}, idle timeout {}s",
        status.version,
        status.protocol,
        status.pid,
        status.idle_timeout_seconds
    );
    outln!();
    outln!(
        "{:<16} {:<6} {:<18} {:<15} {:>7}  {:<24} REMOVAL",
        "NETWORK",
        "MODE",
        "SUBNET",
        "BRIDGE",
        "CLIENTS",
        "TAPS"
    );
    for n in &status.networks {
        let removal = n
            .removal_in_seconds
            .map(|s| format!("in {s:.0}s"))
            .unwrap_or_else(|| "-".into());
        let taps = if n.taps.is_empty() {
            "-".to_string()
        } else {
            n.taps.join(",")
        };
        outln!(
            "{:<16} {:<6} {:<18} {:<15} {:>7}  {:<24} {removal}",
            n.name,
            n.mode,
            n.subnet,
            n.bridge,
            n.clients,
            taps
        );
    }
    outln!();
    outln!("{:<6} {:>8} {:>6}  NETWORKS", "CLIENT", "PID", "UID");
    if status.truncated {
        outln!("(lists cut to fit one message: there are more clients or TAPs than shown)");
    }
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
