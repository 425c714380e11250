//! `acquire` on macOS: acquires networks over XPC as a VM launcher does and prints what the
//! serialization says (subnet, mask, IPv6 prefix), one JSON object per network.

use super::outln;
use std::process::ExitCode;
use vmnet_broker::backend::macos::client::XpcClient;
use vmnet_broker::config::prefix_to_mask;
use vmnet_broker::protocol::BrokerError;

pub fn main(service: &str, names: &[String], hold: bool, persistent: bool) -> super::Result {
    if persistent {
        return Err(Box::new(BrokerError::invalid(
            "--persistent is for TAPs, which macOS does not use",
        )));
    }
    let client = XpcClient::connect(service)?;
    let mut held = Vec::new();
    for name in names {
        let n = client.acquire(name)?;
        outln!(
            "{}",
            serde_json::json!({
                "name": name,
                "subnet": n.subnet.to_string(),
                "mask": prefix_to_mask(n.subnet.prefix_len()).to_string(),
                "ipv6_prefix": n.ipv6_prefix,
            })
        );
        held.push(n);
    }
    if hold {
        super::hold_until_signal(held.len())?;
    }
    drop(held);
    drop(client);
    Ok(ExitCode::SUCCESS)
}
