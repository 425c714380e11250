//! What a Linux client can check about the TAP fd the broker sent it.
//!
//! The broker's reply names the TAP and its bridge; the fd itself says which TAP it is
//! (`TUNGETIFF`), and sysfs which bridge that TAP is on. A launcher that checks both learns
//! of a mismatch at once, not from a VM that silently has no network.

use crate::protocol::NetworkInfo;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

nix::ioctl_read_bad!(tun_get_iff, libc::TUNGETIFF, libc::ifreq);

/// The `ifreq` of the TUN/TAP device behind `fd` (`TUNGETIFF`): its name and flags.
/// Fails for anything that is not an attached TUN/TAP fd.
pub fn tun_info(fd: BorrowedFd) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data (integers, byte arrays and a union of them), for
    // which all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the duration of the borrow and `req` is a writable ifreq,
    // the argument TUNGETIFF fills in; on any other kind of fd the kernel fails with
    // EBADFD or ENOTTY and writes nothing.
    unsafe { tun_get_iff(fd.as_raw_fd(), &mut req) }.map_err(|e| {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("not a TUN/TAP fd (TUNGETIFF: {e})"))
    })?;
    Ok(req)
}

/// The name of the TUN/TAP device behind `fd`.
pub fn tap_name_of(fd: BorrowedFd) -> io::Result<String> {
    let req = tun_info(fd)?;
    // SAFETY: ifr_name holds a NUL within its IFNAMSIZ bytes: `req` was zeroed and the
    // kernel writes a NUL-terminated name of at most IFNAMSIZ - 1 bytes; `req` outlives
    // `name`, which is copied out before the function returns.
    let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// Why the fd received does not match the broker's reply.
#[derive(Debug, thiserror::Error)]
pub enum TapCheckError {
    #[error("the fd received for {network:?} is not a TAP: {source}")]
    NotATap {
        network: String,
        #[source]
        source: io::Error,
    },
    #[error("the fd received is TAP {actual}, the reply says {reply}")]
    OtherTap { actual: String, reply: String },
    #[error("TAP {tap} is attached to {}, not to bridge {bridge}", master.as_deref().unwrap_or("no bridge"))]
    OtherBridge {
        tap: String,
        master: Option<String>,
        bridge: String,
    },
}

/// Checks that `fd` is the TAP `info` names and, when this process can see it, that the
/// TAP is attached to the bridge `info` names.
pub fn check_tap(fd: BorrowedFd, info: &NetworkInfo) -> Result<(), TapCheckError> {
    let name = tap_name_of(fd).map_err(|source| TapCheckError::NotATap {
        network: info.name.clone(),
        source,
    })?;
    if name != info.interface {
        return Err(TapCheckError::OtherTap {
            actual: name,
            reply: info.interface.clone(),
        });
    }
    // sysfs shows this process's network namespace. A client in another namespace than
    // the broker (a container given the socket) cannot see the TAP there; the TUNGETIFF
    // check above is all it can verify.
    let sys = Path::new("/sys/class/net").join(&name);
    if !sys.exists() {
        return Ok(());
    }
    let master = std::fs::read_link(sys.join("master"))
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
    if master.as_deref() != Some(info.bridge.as_str()) {
        return Err(TapCheckError::OtherBridge {
            tap: name,
            master,
            bridge: info.bridge.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_file_is_not_a_tap() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = tap_name_of(f.as_fd()).unwrap_err();
        assert!(e.to_string().contains("TUNGETIFF"), "{e}");
        let info = NetworkInfo {
            name: "shared".into(),
            mode: "shared".into(),
            subnet: "192.168.64.0/24".into(),
            gateway: "192.168.64.1".into(),
            mask: "255.255.255.0".into(),
            mtu: 1500,
            bridge: "vmnb-shared".into(),
            interface: "vmnt1-0".into(),
            mac: "52:54:00:00:00:01".into(),
        };
        let e = check_tap(f.as_fd(), &info).unwrap_err();
        assert!(matches!(e, TapCheckError::NotATap { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("the fd received for \"shared\" is not a TAP: not a TUN/TAP fd"),
            "{e}"
        );
    }

    #[test]
    fn bridge_mismatch_says_what_the_tap_is_on() {
        let e = TapCheckError::OtherBridge {
            tap: "vmnt1-0".into(),
            master: None,
            bridge: "vmnb-shared".into(),
        };
        assert_eq!(
            e.to_string(),
            "TAP vmnt1-0 is attached to no bridge, not to bridge vmnb-shared"
        );
    }
}
