//! `run` is Linux-only: it hands TAP fds to a command. On macOS a VM attaches to the vmnet
//! network itself, from the serialization its launcher acquires (vmnet-helper, krunkit).

use std::process::ExitCode;

pub fn main(
    _service: &str,
    _networks: &[String],
    _forwards: &[String],
    _command: &[String],
) -> super::Result {
    eprintln!(
        "vmnet-broker run is Linux-only: it passes TAP file descriptors. On macOS, VM \
         launchers acquire the network themselves (vmnet-helper --network NAME, krunkit, \
         QEMU through vmnet-helper); see docs/macos.md."
    );
    Ok(ExitCode::FAILURE)
}
