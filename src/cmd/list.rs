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
    let row = |n: &NetworkSummary| {
        vec![
            n.name.clone(),
            n.mode.clone(),
            table::or_dash(Some(n.subnets.join(","))),
            state_text(&n.state, n.removal_in_seconds),
            n.clients.to_string(),
            n.taps.to_string(),
            table::or_dash(n.overlay.as_ref()),
        ]
    };
    let rows: Vec<_> = list.networks.iter().map(row).collect();
    table::print(
        &[
            "NETWORK", "MODE", "SUBNETS", "STATE", "CLIENTS", "TAPS", "OVERLAY",
        ],
        &rows,
    );
    if list.truncated {
        println!("(list cut to fit one message: there are more networks than shown)");
    }
    Ok(ExitCode::SUCCESS)
}
