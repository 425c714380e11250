//! The restore watchdog: puts the broker's tables back when someone removed them (`nft
//! flush ruleset` by firewalld reloads, `systemctl restart nftables`, ...), a well known
//! cause of VMs silently losing their network with other tools.
//!
//! It listens to the kernel's nftables change notifications (netlink group
//! `NFNLGRP_NFTABLES`) and checks as soon as a table is deleted, so forged frames pass for
//! milliseconds after a flush (one `nft list tables` and one restore transaction), not for
//! up to a polling interval. It also checks every [`WATCHDOG_INTERVAL`], in case the
//! notification socket cannot be had or lost messages (its buffer overran).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Weak};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
};
use tokio::io::unix::AsyncFd;
use tracing::warn;

use super::{Firewall, FirewallError, Inner};

/// How often the watchdog checks that our tables still exist, notifications or not.
pub const WATCHDOG_INTERVAL: Duration = Duration::from_secs(2);

/// `NFNLGRP_NFTABLES` (linux/netfilter/nfnetlink.h): nftables ruleset changes.
const NFNLGRP_NFTABLES: u32 = 7;
/// `NFNL_SUBSYS_NFTABLES`, the high byte of an nftables message's type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_DELTABLE`, the low byte.
const NFT_MSG_DELTABLE: u16 = 2;

impl Firewall {
    /// Starts the task that puts our tables back (with a warning) when something removed
    /// them: at once on the kernel's notification, and at the latest after
    /// [`WATCHDOG_INTERVAL`]. The check runs in the apply queue like every change, so it
    /// never sees a change half-applied. The task ends once every clone of this
    /// `Firewall` has been dropped. Must be called inside a tokio runtime, in the network
    /// namespace of the rules.
    pub fn spawn_watchdog(&self) -> tokio::task::JoinHandle<()> {
        self.spawn_watchdog_every(WATCHDOG_INTERVAL)
    }

    /// [`Firewall::spawn_watchdog`] polling every `interval` (tests use a long one, to
    /// see the notifications at work).
    pub fn spawn_watchdog_every(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let mut events = match TableEvents::open() {
            Ok(events) => Some(events),
            Err(e) => {
                warn!(
                    "firewall watchdog: no nftables notifications ({e}); checking every {interval:?} only"
                );
                None
            }
        };
        tokio::spawn(async move {
            loop {
                match &mut events {
                    Some(ev) => {
                        tokio::select! {
                            _ = tokio::time::sleep(interval) => {}
                            got = ev.table_deleted() => if let Err(e) = got {
                                warn!("firewall watchdog: nftables notifications failed ({e}); checking every {interval:?} only");
                                events = None;
                            },
                        }
                    }
                    None => tokio::time::sleep(interval).await,
                }
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                // Holds the firewall only for one check, so dropping it ends the task.
                let firewall = Firewall { inner };
                let checked = firewall
                    .queued(|inner| async move { inner.check_and_restore().await })
                    .await;
                if let Err(e) = checked {
                    warn!("firewall watchdog: {}", crate::error::Chain(&e));
                }
            }
        })
    }
}

impl Inner {
    async fn check_and_restore(&self) -> Result<(), FirewallError> {
        if self.lock().networks.is_empty() || self.tables_present().await? {
            return Ok(());
        }
        warn!("firewall rules were removed (flushed?), restored");
        self.restore().await?;
        crate::metrics::counters().firewall_restores.inc();
        Ok(())
    }
}

/// A netlink socket subscribed to nftables change notifications, in the namespace of the
/// thread that opened it.
struct TableEvents {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl TableEvents {
    fn open() -> io::Result<TableEvents> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkNetFilter,
        )?;
        // Groups below 32 are a bitmask at bind time: group N is bit N-1.
        bind(
            fd.as_raw_fd(),
            &NetlinkAddr::new(0, 1 << (NFNLGRP_NFTABLES - 1)),
        )?;
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and is the same file
        // description until the AsyncFd is dropped; OwnedFd::as_raw_fd always returns
        // that one fd.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(TableEvents {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Waits until a table was deleted (any table: the check that follows says whether it
    /// was ours), or notifications were lost, which may have hidden one.
    async fn table_deleted(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut deleted = false;
            // Everything queued, so one flush (a message per object) wakes us once.
            loop {
                let n = match nix::sys::socket::recv(
                    self.fd.get_ref().as_raw_fd(),
                    &mut self.buf,
                    nix::sys::socket::MsgFlags::empty(),
                ) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EAGAIN) => {
                        ready.clear_ready();
                        break;
                    }
                    // The socket's buffer overran: messages were lost.
                    Err(nix::errno::Errno::ENOBUFS) => {
                        deleted = true;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                deleted |= has_table_deletion(&self.buf[..n]);
            }
            if deleted {
                return Ok(());
            }
        }
    }
}

/// Whether a datagram of netlink messages holds an nftables `DELTABLE`.
fn has_table_deletion(mut data: &[u8]) -> bool {
    // struct nlmsghdr: u32 length, u16 type, u16 flags, u32 seq, u32 pid (native endian).
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE {
            return true;
        }
        // NLMSG_ALIGN: messages are padded to 4 bytes.
        let next = (len + 3) & !3;
        if len < 16 || next > data.len() {
            break;
        }
        data = &data[next..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, payload: usize) -> Vec<u8> {
        let len = 16 + payload;
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.extend(kind.to_ne_bytes());
        m.extend([0; 10]);
        m.resize((len + 3) & !3, 0);
        m
    }

    #[test]
    fn finds_a_table_deletion_among_other_messages() {
        let newrule = (NFNL_SUBSYS_NFTABLES << 8) | 6;
        let deltable = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE;
        let mut data = msg(newrule, 5);
        assert!(!has_table_deletion(&data));
        data.extend(msg(deltable, 20));
        assert!(has_table_deletion(&data));
        // Truncated or garbage input ends the walk without panicking.
        assert!(!has_table_deletion(&data[..20]));
        assert!(!has_table_deletion(&[0xff; 40]));
        assert!(!has_table_deletion(&[0; 40]));
    }
}
