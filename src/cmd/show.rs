//! `vmnet-broker show NAME`: one network, its configuration, addresses and TAPs.

use super::table::{self, or_dash};
use serde_json::Value;
use std::path::Path;
use std::process::ExitCode;
use vmnet_broker_client::client::Client;

pub fn main(socket: &Path, name: &str, json: bool) -> super::Result {
    let d = Client::connect(socket)?.show(name)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut facts: Vec<(String, String)> = vec![
        ("network".into(), d.name.clone()),
        ("mode".into(), d.mode.clone()),
        (
            "state".into(),
            super::list::state_text(&d.state, d.removal_in_seconds),
        ),
        ("subnet".into(), or_dash(d.subnet.as_ref())),
        ("gateway".into(), or_dash(d.gateway.as_ref())),
        ("mask".into(), or_dash(d.mask.as_ref())),
        ("ipv6 prefix".into(), or_dash(d.ipv6_prefix.as_ref())),
        ("mtu".into(), d.mtu.to_string()),
    ];
    for (k, v) in &d.platform {
        facts.push((k.clone(), v.clone()));
    }
    facts.push(("clients".into(), d.clients.to_string()));
    let width = facts.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &facts {
        println!("{:<width$}  {v}", format!("{k}:"), width = width + 1);
    }
    println!();
    println!("config:");
    let cwidth = d.config.keys().map(String::len).max().unwrap_or(0);
    for (k, v) in &d.config {
        let text = match v {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("  {:<w$}  {text}", format!("{k}:"), w = cwidth + 1);
    }
    println!();
    println!("forwards:");
    if d.forwards.is_empty() {
        println!("  (none)");
    }
    for f in &d.forwards {
        println!("  {f}");
    }
    println!();
    let rows: Vec<_> = d
        .taps
        .iter()
        .map(|t| {
            vec![
                t.interface.clone(),
                or_dash(t.mac.as_ref()),
                or_dash(t.uid),
                or_dash(t.pid),
                or_dash(t.client),
            ]
        })
        .collect();
    table::print(&["TAP", "MAC", "UID", "PID", "CLIENT"], &rows);
    if d.truncated {
        println!("(TAP list cut to fit one message: there are more TAPs than shown)");
    }
    Ok(ExitCode::SUCCESS)
}
