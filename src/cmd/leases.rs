//! `vmnet-broker leases [NAME]`: the DHCP leases of the networks the caller may use.

use super::table::{self, or_dash};
use std::path::Path;
use std::process::ExitCode;
use vmnet_broker_client::client::Client;

pub fn main(socket: &Path, name: Option<&str>, json: bool) -> super::Result {
    let list = Client::connect(socket)?.leases(name)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<_> = list
        .leases
        .iter()
        .map(|l| {
            vec![
                l.network.clone(),
                l.mac.clone(),
                l.ipv4.clone(),
                or_dash(l.ipv6.as_ref()),
                or_dash(l.hostname.as_ref()),
                format!("in {}s", l.expires_in_seconds),
                or_dash(l.interface.as_ref()),
                or_dash(l.uid),
                or_dash(l.pid),
            ]
        })
        .collect();
    table::print(
        &[
            "NETWORK", "MAC", "IPV4", "IPV6", "HOSTNAME", "EXPIRES", "TAP", "UID", "PID",
        ],
        &rows,
    );
    if list.truncated {
        println!("(list cut to fit one message: there are more leases than shown)");
    }
    Ok(ExitCode::SUCCESS)
}
