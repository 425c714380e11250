use super::outln;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::ExitCode;
use vmnet_broker_client::client::{Acquired, Client};
use vmnet_broker_client::linux::check_tap;
use vmnet_broker_client::protocol::{BrokerError, ErrorCode};

/// Checks that the broker really handed us a TAP on the network's bridge, so a launcher
/// (or an admin trying things out) learns of a mismatch here, not from a silent VM.
pub fn verify(a: &Acquired) -> Result<(), BrokerError> {
    check_tap(a.fd.as_fd(), &a.info)
        .map_err(|e| BrokerError::new(ErrorCode::InvalidReply, e.to_string()))
}

/// The reply plus the fd number this process holds it as.
pub fn describe(a: &Acquired, fd: i32) -> serde_json::Value {
    let mut v = serde_json::to_value(&a.info).expect("info serializes");
    v["fd"] = fd.into();
    v
}

pub fn main(socket: &Path, names: &[String], hold: bool, persistent: bool) -> super::Result {
    let client = Client::connect(socket)?;
    let mut held = Vec::new();
    for name in names {
        let acquired = client.acquire_with(name, None, persistent)?;
        verify(&acquired)?;
        outln!("{}", describe(&acquired, acquired.fd.as_raw_fd()));
        held.push(acquired);
    }
    if hold {
        super::hold_until_signal(held.len())?;
    }
    drop(held);
    drop(client);
    Ok(ExitCode::SUCCESS)
}
