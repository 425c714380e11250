//! A stand-in for a VM behind an acquired TAP fd: a namespace whose `eth0` is a TAP of its
//! own, with the test copying frames between that TAP and the broker's fd as a VMM copies
//! them between its guest's NIC and that fd. The crate must include
//! tests/support/netns.rs as `mod netns`.
#![allow(dead_code)]

use crate::netns::{self, Netns};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// The virtio-net header in front of every frame on the broker's TAP fds.
pub const VNET_HDR: usize = 12;

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);

/// A namespace with a TAP `eth0` whose frames are copied to and from an acquired TAP fd.
pub struct TapVm {
    pub ns: Netns,
    stop: Arc<AtomicBool>,
    pumps: Vec<JoinHandle<()>>,
}

fn wait_readable(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the call, and its fd is open while `fd` is.
    unsafe { libc::poll(&mut pfd, 1, 100) == 1 }
}

/// Copies frames from `from` to `to` until `stop`, taking `strip` bytes off the front of
/// each and putting `add` zero bytes in front.
fn pump(from: Arc<OwnedFd>, to: Arc<OwnedFd>, strip: usize, add: usize, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536 + VNET_HDR];
    while !stop.load(Ordering::SeqCst) {
        if !wait_readable(&from) {
            continue;
        }
        // SAFETY: read(2) writes at most buf.len() - add bytes into `buf` from offset
        // `add`, which is within the buffer; the fd is open while `from` lives.
        let n = unsafe {
            libc::read(
                from.as_raw_fd(),
                buf[add..].as_mut_ptr().cast(),
                buf.len() - add,
            )
        };
        if n <= strip as isize {
            continue;
        }
        buf[..add].fill(0);
        let frame = &buf[strip..add + n as usize];
        // SAFETY: write(2) reads `frame.len()` initialized bytes of `buf`, borrowed for
        // the call; the fd is open while `to` lives.
        unsafe { libc::write(to.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    }
}

impl TapVm {
    pub fn new(tap: OwnedFd, mac: &str) -> TapVm {
        netns::require("busybox", "busybox-static");
        let ns = Netns::new("vm");
        ns.sh("ip tuntap add dev eth0 mode tap");
        let eth0 = ns.run(|| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .unwrap();
            // SAFETY: ifreq is plain old data, for which all zeroes is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in req.ifr_name.iter_mut().zip(b"eth0") {
                *d = *s as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: the fd is open and `req` is an initialized ifreq that TUNSETIFF
            // reads (and updates) for the duration of the call.
            unsafe { tun_set_iff(file.as_raw_fd(), &req) }.expect("TUNSETIFF eth0");
            OwnedFd::from(file)
        });
        ns.sh(&format!("ip link set eth0 address {mac} up"));
        let stop = Arc::new(AtomicBool::new(false));
        let (host, guest) = (Arc::new(tap), Arc::new(eth0));
        let pumps = vec![
            {
                let (h, g, s) = (Arc::clone(&host), Arc::clone(&guest), Arc::clone(&stop));
                std::thread::spawn(move || pump(h, g, VNET_HDR, 0, s))
            },
            {
                let (h, g, s) = (host, guest, Arc::clone(&stop));
                std::thread::spawn(move || pump(g, h, 0, VNET_HDR, s))
            },
        ];
        TapVm { ns, stop, pumps }
    }

    /// busybox `udhcpc` on eth0 until it has a lease; the address it got.
    pub fn dhcp(&self, hostname: &str) -> String {
        let out = self
            .ns
            .cmd("busybox")
            .args([
                "udhcpc", "-f", "-q", "-n", "-t", "10", "-T", "1", "-i", "eth0",
            ])
            .args(["-s", "/bin/true", "-x", &format!("hostname:{hostname}")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "udhcpc: {text}");
        // "udhcpc: lease of 192.168.64.2 obtained from ..., lease time 3600"
        text.split("lease of ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no lease in: {text}"))
            .to_string()
    }
}

impl Drop for TapVm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
    }
}
