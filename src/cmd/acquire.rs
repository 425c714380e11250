use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::ExitCode;
use vmnet_broker::backend::linux::tap::tap_name_of;
use vmnet_broker::client::{Acquired, Client};
use vmnet_broker::protocol::{BrokerError, ErrorCode};

/// Checks that the broker really handed us a TAP on the network's bridge, so a launcher
/// (or an admin trying things out) learns of a mismatch here, not from a silent VM.
pub fn verify(a: &Acquired) -> Result<(), BrokerError> {
    let bad = |m: String| BrokerError::new(ErrorCode::InvalidReply, m);
    let name = tap_name_of(a.fd.as_fd()).map_err(|e| {
        bad(format!(
            "the fd received for {:?} is not a TAP: {e}",
            a.info.name
        ))
    })?;
    if name != a.info.interface {
        return Err(bad(format!(
            "the fd received is TAP {name}, the reply says {}",
            a.info.interface
        )));
    }
    // sysfs shows this process's network namespace. A client in another namespace than
    // the broker (a container given the socket) cannot see the TAP there; the TUNGETIFF
    // check above is all it can verify.
    let sys = format!("/sys/class/net/{name}");
    if !Path::new(&sys).exists() {
        return Ok(());
    }
    let master = std::fs::read_link(format!("{sys}/master"))
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
    if master.as_deref() != Some(a.info.bridge.as_str()) {
        return Err(bad(format!(
            "TAP {name} is attached to {}, not to bridge {}",
            master.as_deref().unwrap_or("no bridge"),
            a.info.bridge
        )));
    }
    Ok(())
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
        println!("{}", describe(&acquired, acquired.fd.as_raw_fd()));
        held.push(acquired);
    }
    if hold {
        eprintln!("holding {} network(s); press Ctrl-C to release", held.len());
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGINT);
        set.add(nix::sys::signal::Signal::SIGTERM);
        set.thread_block()?;
        set.wait()?;
    }
    drop(held);
    drop(client);
    Ok(ExitCode::SUCCESS)
}
