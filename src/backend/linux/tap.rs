//! TAP devices through `/dev/net/tun` ioctls.
//!
//! The kernel deletes a TAP when its last fd closes, unless it is persistent
//! (`TUNSETPERSIST`), and that deletion waits for an RCU grace period (about 20 ms) inside
//! the `close` of whoever closes it last. The backend therefore makes every TAP persistent
//! once plugged ([`Tap::make_persistent`]) and deletes it itself, in batches, when the
//! TAP's carrier goes (no fd left: the VM exited, however it exited). A TAP asked for as
//! persistent, for VMMs that open a TAP by name, is kept instead, and deleted when that
//! client's connection closes. A pool TAP may go back to its pool instead, attached
//! again and reset ([`Tap::reset`], [`super::recycle`]).
//!
//! Every TAP has an owner and a group (`TUNSETOWNER` and `TUNSETGROUP`, set before anyone
//! else can see the fd): the client holding the fd can make the TAP persistent itself
//! (`TUNSETPERSIST` needs no privilege), and without an owner such a TAP could then be
//! attached by name by any local user. With both set the kernel lets only a process with
//! that uid *and* that group (or CAP_NET_ADMIN) attach it. A TAP asked for as persistent,
//! which its client opens by name, belongs to that client; every other TAP belongs to the
//! broker ([`TapOwner::broker`]): its client has the fd and never needs the name, and the
//! TAPs the pool made ahead of their acquires ([`super::pool`]) can then be handed out
//! without an ioctl (each takes the RTNL lock).
//!
//! Offloads (`TUNSETOFFLOAD`) are deliberately left off. With them off the kernel hands
//! the reader only complete, checksummed frames, which every consumer can take; QEMU and
//! other virtio back ends turn offloads on themselves once the guest has negotiated them
//! (QEMU's `tap_fd_set_offload`). Turning them on here would make the kernel pass GSO
//! frames to a consumer that may not have asked for them.

use nix::{ioctl_read_bad, ioctl_write_ptr_bad};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use vmnet_broker_client::linux::tun_info;

/// The size of `struct virtio_net_hdr_v1` (and of `virtio_net_hdr_mrg_rxbuf`), what
/// virtio 1.0 devices use and what QEMU, Firecracker and cloud-hypervisor set.
pub const VNET_HDR_LEN: libc::c_int = 12;

ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
ioctl_write_ptr_bad!(tun_set_vnet_hdr_sz, libc::TUNSETVNETHDRSZ, libc::c_int);
ioctl_read_bad!(tun_get_vnet_hdr_sz, libc::TUNGETVNETHDRSZ, libc::c_int);
// TUNSETOWNER, TUNSETGROUP and TUNSETPERSIST take their argument by value, not by pointer.
nix::ioctl_write_int_bad!(tun_set_owner, libc::TUNSETOWNER);
nix::ioctl_write_int_bad!(tun_set_group, libc::TUNSETGROUP);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);
nix::ioctl_write_int_bad!(tun_set_offload, libc::TUNSETOFFLOAD);
ioctl_write_ptr_bad!(tun_set_sndbuf, libc::TUNSETSNDBUF, libc::c_int);
ioctl_read_bad!(tun_get_sndbuf, libc::TUNGETSNDBUF, libc::c_int);
ioctl_write_ptr_bad!(tun_set_vnet_le, libc::TUNSETVNETLE, libc::c_int);
ioctl_write_ptr_bad!(tun_set_vnet_be, libc::TUNSETVNETBE, libc::c_int);
ioctl_write_ptr_bad!(tun_set_steering_ebpf, libc::TUNSETSTEERINGEBPF, libc::c_int);
ioctl_write_ptr_bad!(tun_set_filter_ebpf, libc::TUNSETFILTEREBPF, libc::c_int);
ioctl_write_ptr_bad!(tun_set_tx_filter, libc::TUNSETTXFILTER, TunFilter);
ioctl_write_ptr_bad!(tun_detach_filter, libc::TUNDETACHFILTER, libc::sock_fprog);

/// `struct tun_filter` with no addresses: `TUNSETTXFILTER` with a count of 0 turns the
/// TAP's receive filter off, as on a new TAP.
#[repr(C)]
struct TunFilter {
    flags: u16,
    count: u16,
}

/// The send buffer (`TUNSETSNDBUF`) of a new TAP: `tun_chr_open` gives every fd's socket
/// `INT_MAX`, and a TAP made through that fd takes it as its own.
pub const FRESH_SNDBUF: libc::c_int = libc::c_int::MAX;

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

/// A new fd of the TUN/TAP driver (close-on-exec), not attached yet.
fn open_tun() -> io::Result<std::fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/net/tun: {e}")))
}

fn context(err: nix::Error, what: &str, name: &str) -> io::Error {
    let err = io::Error::from(err);
    io::Error::new(err.kind(), format!("{what} for TAP {name}: {err}"))
}

/// The uid and gid a TAP is given to: only processes with both may attach it by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapOwner {
    pub uid: u32,
    pub gid: u32,
}

impl TapOwner {
    /// The broker's own euid and egid: only a process with CAP_NET_ADMIN may attach.
    pub fn broker() -> TapOwner {
        TapOwner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }
}

/// A TAP the broker made, with its only fd: until made persistent the TAP lives as long as
/// the fd, so dropping an unsent `Tap` removes the device.
#[derive(Debug)]
pub struct Tap {
    name: String,
    /// The interface index, which stays the TAP's while the fd lives, whatever its name.
    index: u32,
    fd: OwnedFd,
}

impl Tap {
    /// Creates TAP `name` in the caller's network namespace, owned by `owner`, and
    /// returns it with its only fd (close-on-exec). Fails if a device of that name
    /// already exists (`IFF_TUN_EXCL`): the broker never takes over a device it did not
    /// make.
    pub fn create(name: &str, owner: TapOwner) -> io::Result<Tap> {
        let file = open_tun()?;
        let mut req = ifreq_named(name)?;
        req.ifr_ifru.ifru_flags = (TAP_FLAGS | libc::IFF_TUN_EXCL) as libc::c_short;
        // SAFETY: the fd is open and req is a valid, NUL-terminated ifreq that outlives
        // the call; the kernel only reads it.
        unsafe { tun_set_iff(file.as_raw_fd(), &req) }
            .map_err(|e| context(e, "TUNSETIFF", name))?;
        // SAFETY: the fd is an attached TAP; the kernel reads one int from a live reference.
        unsafe { tun_set_vnet_hdr_sz(file.as_raw_fd(), &VNET_HDR_LEN) }
            .map_err(|e| context(e, "TUNSETVNETHDRSZ", name))?;
        // Owner and group before the fd leaves the broker: from then on the client can
        // make the TAP persistent, and it must not become attachable by everyone.
        // SAFETY: the fd is an attached TAP; both ioctls take an integer by value.
        unsafe { tun_set_owner(file.as_raw_fd(), owner.uid as libc::c_int) }
            .map_err(|e| context(e, "TUNSETOWNER", name))?;
        // SAFETY: as above.
        unsafe { tun_set_group(file.as_raw_fd(), owner.gid as libc::c_int) }
            .map_err(|e| context(e, "TUNSETGROUP", name))?;
        // Looked up by name in this thread's namespace, where the TAP was just made; its
        // fd keeps it alive and the name cannot change under it (renaming needs the TAP
        // down, and nobody else has it yet).
        let index = nix::net::if_::if_nametoindex(name)
            .map_err(|e| context(e, "looking up the index", name))?;
        Ok(Tap {
            name: name.to_string(),
            index,
            fd: file.into(),
        })
    }

    /// A TAP the broker made and kept open ([`super::pool`]), with its only fd.
    pub fn held(name: String, index: u32, fd: OwnedFd) -> Tap {
        Tap { name, index, fd }
    }

    /// Attaches the existing, persistent TAP `name` (a closed pool TAP, [`super::pool`])
    /// that had index `index`; returns it with the new fd. Fails if the name now belongs
    /// to another device. Only a process the TAP's owner and group admit, or one with
    /// CAP_NET_ADMIN (the broker), may attach it.
    pub fn attach(name: &str, index: u32) -> io::Result<Tap> {
        let file = open_tun()?;
        let mut req = ifreq_named(name)?;
        // The flags must be the ones the TAP was made with; no IFF_TUN_EXCL, it exists.
        req.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
        // SAFETY: the fd is open and req is a valid, NUL-terminated ifreq that outlives
        // the call; the kernel only reads it.
        unsafe { tun_set_iff(file.as_raw_fd(), &req) }
            .map_err(|e| context(e, "TUNSETIFF", name))?;
        // The fd now holds the device: its index cannot change while it lives.
        let now = nix::net::if_::if_nametoindex(name)
            .map_err(|e| context(e, "looking up the index", name))?;
        if now != index {
            return Err(io::Error::other(format!(
                "TAP {name} has index {now}, not the pool's {index}"
            )));
        }
        Ok(Tap {
            name: name.to_string(),
            index,
            fd: file.into(),
        })
    }

    /// Gives the TAP to `owner` and its group (a TAP asked for as persistent, which its
    /// client opens by name). The virtio-net header length needs no setting again: it
    /// belongs to the device, not to the fd, and was set when the TAP was made
    /// ([`Tap::create`]). Each of these ioctls takes the RTNL lock.
    pub fn give_to(&self, owner: TapOwner) -> io::Result<()> {
        let (fd, name) = (self.fd.as_raw_fd(), &self.name);
        // SAFETY: the fd is an attached TAP; both ioctls take an integer by value.
        unsafe { tun_set_owner(fd, owner.uid as libc::c_int) }
            .map_err(|e| context(e, "TUNSETOWNER", name))?;
        // SAFETY: as above.
        unsafe { tun_set_group(fd, owner.gid as libc::c_int) }
            .map_err(|e| context(e, "TUNSETGROUP", name))?;
        Ok(())
    }

    /// Puts back, on a TAP attached again after its client closed it
    /// ([`super::recycle`]), everything of the device the client's fd let it change
    /// without privilege, as a new TAP of the broker has it: owner and group (the
    /// broker's, `owner`), the virtio-net header length, the send buffer, offloads off,
    /// no receive filter (`TUNSETTXFILTER`), no classic socket filter
    /// (`TUNATTACHFILTER`), no eBPF steering or filter program, native-endian headers.
    /// The host-side MAC (`SIOCSIFHWADDR`) is the caller's, through rtnetlink; the
    /// flags (`IFF_VNET_HDR`...) were set again by the attach. Nothing else of the
    /// device is within an fd holder's reach: its type (`TUNSETLINK`) needs it down,
    /// which only CAP_NET_ADMIN can do, and the carrier is back with the attach. Each
    /// ioctl takes the RTNL lock, briefly.
    pub fn reset(&self, owner: TapOwner) -> io::Result<()> {
        let (fd, name) = (self.fd.as_raw_fd(), &self.name);
        self.give_to(owner)?;
        // SAFETY: the fd is an attached TAP; the kernel reads one c_int from a live
        // reference.
        unsafe { tun_set_vnet_hdr_sz(fd, &VNET_HDR_LEN) }
            .map_err(|e| context(e, "TUNSETVNETHDRSZ", name))?;
        // SAFETY: as above.
        unsafe { tun_set_sndbuf(fd, &FRESH_SNDBUF) }
            .map_err(|e| context(e, "TUNSETSNDBUF", name))?;
        // SAFETY: the fd is an attached TAP; the ioctl takes an integer by value.
        unsafe { tun_set_offload(fd, 0) }.map_err(|e| context(e, "TUNSETOFFLOAD", name))?;
        let no_filter = TunFilter { flags: 0, count: 0 };
        // SAFETY: the fd is an attached TAP; with a count of 0 the kernel reads only the
        // `struct tun_filter` header, from a live reference.
        unsafe { tun_set_tx_filter(fd, &no_filter) }
            .map_err(|e| context(e, "TUNSETTXFILTER", name))?;
        // SAFETY: sock_fprog is plain old data; all zeroes is a valid value.
        let none: libc::sock_fprog = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is an attached TAP; the kernel ignores the argument of
        // TUNDETACHFILTER, which points to a live value anyway.
        unsafe { tun_detach_filter(fd, &none) }.map_err(|e| context(e, "TUNDETACHFILTER", name))?;
        // -1 for "no program".
        let detach: libc::c_int = -1;
        // SAFETY: the fd is an attached TAP; the kernel reads one c_int from a live
        // reference.
        unsafe { tun_set_steering_ebpf(fd, &detach) }
            .map_err(|e| context(e, "TUNSETSTEERINGEBPF", name))?;
        // SAFETY: as above.
        unsafe { tun_set_filter_ebpf(fd, &detach) }
            .map_err(|e| context(e, "TUNSETFILTEREBPF", name))?;
        let native: libc::c_int = 0;
        // SAFETY: as above.
        unsafe { tun_set_vnet_le(fd, &native) }.map_err(|e| context(e, "TUNSETVNETLE", name))?;
        // Only kernels built with CONFIG_TUN_VNET_CROSS_LE know big-endian headers; on
        // the others nobody could have set them (EINVAL).
        // SAFETY: as above.
        match unsafe { tun_set_vnet_be(fd, &native) } {
            Ok(_) | Err(nix::errno::Errno::EINVAL) => Ok(()),
            Err(e) => Err(context(e, "TUNSETVNETBE", name)),
        }
    }

    /// Reads and discards every frame queued on the fd, without blocking: a TAP held
    /// open in the pool under a guard adopted from an older broker (whose egress program
    /// let broadcasts reach unbound TAPs) may have queued some, which its client must not
    /// get. One `poll` when nothing is queued, which is the case under this broker's own
    /// guard; none of it takes the RTNL lock.
    pub fn drain(&self) -> io::Result<usize> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let readable = |fd: BorrowedFd| -> io::Result<bool> {
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            Ok(poll(&mut fds, PollTimeout::ZERO)? > 0
                && fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLIN)))
        };
        if !readable(self.fd())? {
            return Ok(0);
        }
        // Non-blocking for the reads only: the flag belongs to the open file, which the
        // client shares once the fd is sent, and it gets the file as it was.
        let flags = OFlag::from_bits_retain(fcntl(&self.fd, FcntlArg::F_GETFL)?);
        fcntl(&self.fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        let mut buf = vec![0u8; 65536 + VNET_HDR_LEN as usize];
        let mut drained = 0;
        let result = loop {
            match nix::unistd::read(&self.fd, &mut buf) {
                Ok(_) => drained += 1,
                Err(nix::errno::Errno::EAGAIN) => break Ok(drained),
                Err(e) => break Err(io::Error::from(e)),
            }
        };
        fcntl(&self.fd, FcntlArg::F_SETFL(flags))?;
        result
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The name and the fd, to hand the fd to the client.
    pub fn into_parts(self) -> (String, OwnedFd) {
        (self.name, self.fd)
    }

    /// Keeps the TAP after its fds close (someone must then delete it); its owner (see
    /// [`Tap::create`]) may attach to it by name (TUNSETIFF without CAP_NET_ADMIN), as
    /// firecracker does.
    pub fn make_persistent(&self) -> io::Result<()> {
        // SAFETY: the fd is an attached TAP; the ioctl takes an integer by value.
        unsafe { tun_set_persist(self.fd.as_raw_fd(), 1) }
            .map_err(|e| context(e, "TUNSETPERSIST", &self.name))?;
        Ok(())
    }
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

/// The TAP's send buffer (`TUNGETSNDBUF`).
pub fn sndbuf(fd: BorrowedFd) -> io::Result<libc::c_int> {
    let mut len: libc::c_int = 0;
    // SAFETY: `fd` is a live borrowed descriptor; TUNGETSNDBUF writes one c_int through
    // the pointer, which points to `len`, a c_int we exclusively borrow.
    unsafe { tun_get_sndbuf(fd.as_raw_fd(), &mut len) }.map_err(io::Error::from)?;
    Ok(len)
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
