//! TAP devices through `/dev/net/tun` ioctls.
//!
//! A TAP made here is not persistent (no `TUNSETPERSIST`): it exists while some process
//! holds its fd. The broker hands the only fd to the client, so the TAP disappears when
//! the VM exits, however it exits. The exception is a TAP asked for as persistent, for
//! VMMs that open a TAP by name: [`make_persistent`] gives it to the client's uid, and the
//! broker deletes it when that client's connection closes.
//!
//! Offloads (`TUNSETOFFLOAD`) are deliberately left off. With them off the kernel hands
//! the reader only complete, checksummed frames, which every consumer can take; QEMU and
//! other virtio back ends turn offloads on themselves once the guest has negotiated them
//! (QEMU's `tap_fd_set_offload`). Turning them on here would make the kernel pass GSO
//! frames to a consumer that may not have asked for them.

use nix::{ioctl_read_bad, ioctl_write_ptr_bad};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use vmnet_broker_client::linux::tun_info;

/// The size of `struct virtio_net_hdr_v1` (and of `virtio_net_hdr_mrg_rxbuf`), what
/// virtio 1.0 devices use and what QEMU, Firecracker and cloud-hypervisor set.
pub const VNET_HDR_LEN: libc::c_int = 12;

ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
ioctl_write_ptr_bad!(tun_set_vnet_hdr_sz, libc::TUNSETVNETHDRSZ, libc::c_int);
ioctl_read_bad!(tun_get_vnet_hdr_sz, libc::TUNGETVNETHDRSZ, libc::c_int);
// TUNSETOWNER and TUNSETPERSIST take their argument by value, not by pointer.
nix::ioctl_write_int_bad!(tun_set_owner, libc::TUNSETOWNER);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);

/// Flags of every TAP the broker makes: Ethernet frames, no packet-info prefix, a
/// virtio-net header in front of each frame.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

fn ifreq_named(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn context(err: nix::Error, what: &str, name: &str) -> io::Error {
    let err = io::Error::from(err);
    io::Error::new(err.kind(), format!("{what} for TAP {name}: {err}"))
}

/// Creates TAP `name` in the caller's network namespace and returns its only fd
/// (close-on-exec). Fails if a device of that name already exists (`IFF_TUN_EXCL`):
/// the broker never takes over a device it did not make.
pub fn create_tap(name: &str) -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/net/tun: {e}")))?;
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_flags = (TAP_FLAGS | libc::IFF_TUN_EXCL) as libc::c_short;
    // SAFETY: `file` is open for this whole call, and TUNSETIFF reads one ifreq from
    // `req`, a valid, initialized ifreq that outlives the call.
    unsafe { tun_set_iff(file.as_raw_fd(), &req) }.map_err(|e| context(e, "TUNSETIFF", name))?;
    // SAFETY: `file` is open; TUNSETVNETHDRSZ reads one c_int through the pointer, and
    // VNET_HDR_LEN is a c_int static.
    unsafe { tun_set_vnet_hdr_sz(file.as_raw_fd(), &VNET_HDR_LEN) }
        .map_err(|e| context(e, "TUNSETVNETHDRSZ", name))?;
    Ok(file.into())
}

/// Keeps the TAP behind `fd` after its fds close and lets `uid` attach to it by name
/// (TUNSETIFF without CAP_NET_ADMIN), as firecracker does.
pub fn make_persistent(fd: BorrowedFd, uid: u32, name: &str) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor borrowed for this call, and TUNSETOWNER takes its
    // argument by value (an int), so the kernel reads no memory of ours.
    unsafe { tun_set_owner(fd.as_raw_fd(), uid as libc::c_int) }
        .map_err(|e| context(e, "TUNSETOWNER", name))?;
    // SAFETY: as above: a live borrowed fd, and TUNSETPERSIST takes an int by value.
    unsafe { tun_set_persist(fd.as_raw_fd(), 1) }.map_err(|e| context(e, "TUNSETPERSIST", name))?;
    Ok(())
}

/// The name of the TAP behind `fd` (`TUNGETIFF`): the client library's, which launchers
/// use to check what the broker sent them.
pub use vmnet_broker_client::linux::tap_name_of;

/// The start of the name of every TAP on the bridge with index `bridge_index`; the
/// firewall recognizes the network's TAPs by it.
pub fn tap_prefix(bridge_index: u32) -> String {
    format!("vmnt{bridge_index:x}-")
}

/// Whether `fd` is a TAP (not a TUN) with the flags the broker sets.
pub fn is_broker_tap(fd: BorrowedFd) -> io::Result<bool> {
    // SAFETY: reading a union field: every member of `ifr_ifru` is plain integers, so any
    // bit pattern is a valid c_short; TUNGETIFF filled in the flags member.
    let flags = libc::c_int::from(unsafe { tun_info(fd)?.ifr_ifru.ifru_flags });
    Ok(flags & TAP_FLAGS == TAP_FLAGS && flags & libc::IFF_TUN == 0)
}

/// The virtio-net header length the kernel uses for this TAP (`TUNGETVNETHDRSZ`).
pub fn vnet_hdr_len(fd: BorrowedFd) -> io::Result<libc::c_int> {
    let mut len: libc::c_int = 0;
    // SAFETY: `fd` is a live borrowed descriptor; TUNGETVNETHDRSZ writes one c_int
    // through the pointer, which points to `len`, a c_int we exclusively borrow.
    unsafe { tun_get_vnet_hdr_sz(fd.as_raw_fd(), &mut len) }.map_err(io::Error::from)?;
    Ok(len)
}

/// The TAP name for endpoint `serial` of the network whose bridge has index
/// `bridge_index`. Bridge indexes are unique among live links, so names of two live
/// networks never collide; hex keeps both numbers within IFNAMSIZ for a long time.
pub fn tap_name(bridge_index: u32, serial: u64) -> io::Result<String> {
    let name = format!("{}{serial:x}", tap_prefix(bridge_index));
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!(
            "TAP name {name} for endpoint {serial} would exceed {} characters",
            libc::IFNAMSIZ - 1
        )));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_and_differ() {
        assert_eq!(tap_name(7, 0).unwrap(), "vmnt7-0");
        assert_eq!(tap_name(0x1234, 0xabcde).unwrap(), "vmnt1234-abcde");
        assert_ne!(tap_name(1, 23).unwrap(), tap_name(12, 3).unwrap());
        assert!(tap_name(u32::MAX, u64::from(u32::MAX)).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(ifreq_named("").is_err());
        assert!(ifreq_named("sixteen-chars-xx").is_err());
        assert!(ifreq_named("fifteen-chars-x").is_ok());
    }

    #[test]
    fn a_plain_file_is_not_a_tap() {
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsFd;
        let e = tap_name_of(f.as_fd()).unwrap_err();
        assert!(e.to_string().contains("not a TUN/TAP fd"), "{e}");
    }
}
