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
    // The OVERLAY column only when a network spans hosts: the usual table stays as it was.
    let overlays = status.networks.iter().any(|n| n.overlay.is_some());
    let last = |removal: &str, overlay: Option<&str>| match overlay {
        Some(o) => format!("{removal:<8} {o}"),
        None => removal.to_string(),
    };
    outln!(
        "{:<16} {:<6} {:<18} {:<15} {:>7}  {:<24} {}",
        "NETWORK",
        "MODE",
        "SUBNET",
        "BRIDGE",
        "CLIENTS",
        "TAPS",
        last("REMOVAL", overlays.then_some("OVERLAY"))
    );
    for n in &status.networks {
        let removal = super::removal_text(n.removal_in_seconds);
        let overlay = overlays.then(|| n.overlay.as_deref().unwrap_or("-"));
        let taps = if n.taps.is_empty() {
            "-".to_string()
        } else {
            n.taps.join(",")
        };
        outln!(
            "{:<16} {:<6} {:<18} {:<15} {:>7}  {:<24} {}",
            n.name,
            n.mode,
            n.subnet,
            n.bridge,
            n.clients,
            taps,
            last(&removal, overlay)
        );
    }
    super::print_status_clients(&status);
    Ok(ExitCode::SUCCESS)
}
