//! `vmnet-broker list`: every network the broker knows that the caller may use.

use super::table;
use std::path::Path;
use std::process::ExitCode;
use vmnet_broker_client::client::Client;
use vmnet_broker_client::protocol::{NetworkSummary, state};

/// The STATE column: the state, or the idle network's countdown.
pub fn state_text(state: &str, removal_in_seconds: Option<f64>) -> String {
    match (state, removal_in_seconds) {
        (state::IDLE, Some(s)) => format!("removal in {}s", s.ceil() as u64),
        (other, _) => other.to_string(),
    }
}

pub fn main(socket: &Path, json: bool) -> super::Result {
    let list = Client::connect(socket)?.list()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    // The OVERLAY column only when a network spans hosts: the usual table stays as it was.
    let overlays = list.networks.iter().any(|n| n.overlay.is_some());
    let row = |n: &NetworkSummary| {
        let mut row = vec![
            n.name.clone(),
            n.mode.clone(),
            table::or_dash(Some(n.subnets.join(","))),
            state_text(&n.state, n.removal_in_seconds),
            n.clients.to_string(),
            n.taps.to_string(),
        ];
        if overlays {
            row.push(table::or_dash(n.overlay.as_ref()));
        }
        row
    };
    let rows: Vec<_> = list.networks.iter().map(row).collect();
    let mut header = vec!["NETWORK", "MODE", "SUBNETS", "STATE", "CLIENTS", "TAPS"];
    if overlays {
        header.push("OVERLAY");
    }
    table::print(&header, &rows);
    if list.truncated {
        println!("(list cut to fit one message: there are more networks than shown)");
    }
    Ok(ExitCode::SUCCESS)
}
