//! A pool TAP its client closed goes back to its network's pool, instead of being
//! deleted and another made.
//!
//! **Why.** A client that acquires, runs a VM and leaves costs the kernel a TAP made
//! (`TUNSETIFF` registering a device, the `RTM_SETLINK` that plugs it) and one deleted
//! (unregistering waits for RCU grace periods), nearly all of it under the RTNL lock:
//! about 0.45 ms per client here with nothing else running (docs/benchmarks.md, "kernel
//! alone"), so clients coming back to back could never be served faster than that,
//! whatever the broker did. A closed TAP taken back is one attach and a few ioctls
//! (each holds the lock for microseconds) and no device made or unregistered.
//!
//! **Which.** Only pool TAPs (`vmnt<bridge>-p<n>`: a TAP made for an acquire the pool
//! had none for is deleted as before, so every TAP of the pool is a pool TAP), not asked
//! for as persistent (those are their clients': never in [`super::Reapable`]), when the
//! pool has room ([`TapPool::reserve`]). Any other closed TAP is deleted by the reaper.
//!
//! **How, and why it is safe.** A previous client must get nothing of its successor,
//! and the successor nothing of its predecessor:
//! 1. **Attached first** ([`Tap::attach`], by name, index checked). A TAP is not
//!    multi-queue, so the kernel attaches one fd's file only: if anyone still holds it
//!    (a dup the client kept, an fd in flight, or a client that made the TAP its own
//!    with `TUNSETOWNER` and attached again), the attach fails (`EBUSY`): a TAP whose
//!    carrier is on is left alone (a carrier loss reported late; its real close comes
//!    later), one whose holder turned its carrier off (`TUNSETCARRIER`) is deleted, as
//!    the reaper always did (its close would go unreported). From the attach on, only
//!    the broker holds it, and nobody else can attach it.
//! 2. **Reset** ([`Tap::reset`]): owner and group, virtio-net header length, send
//!    buffer, offloads, receive and socket filters, eBPF programs, header endianness:
//!    everything an fd holder may change without privilege; then the host-side MAC
//!    (`SIOCSIFHWADDR` is an fd holder's too), a fresh one as a new pool TAP gets.
//! 3. **Unbound** in the firewall through the binder's queue ([`super::BinderJob`]), so
//!    after the binding the TAP's acquire queued: the TAP guard drops its frames until
//!    its next client's binding, as a new TAP's, and its dynamic port forwards end.
//!    Done after the attach, never before: a carrier loss reported late must not unbind
//!    a TAP its client still holds.
//! 4. **Back in the pool** ([`TapPool::give_back`]) as every pool TAP of its network:
//!    held open and drained when handed out ([`Tap::drain`]), or, on an
//!    `allow_spoofing` network, closed again (the next client attaches it with a file
//!    of its own). Frames the bridge sent it meanwhile never reach the next client. Handed out again, its carrier counts as
//!    [`super::Carrier::MaybeStale`]: the previous client's close may still be reported
//!    after it, and the reaper then asks the kernel before it deletes.
//!
//! The bridge forgot the guest's MAC on that port when the port lost its carrier (a
//! disabled port's learnt entries go). What stays is the device itself: its name, index
//! and counters (world-readable in sysfs anyway).
//!
//! **Only on kernels whose tun driver was checked.** The reset is complete only for the
//! ioctls the driver had when it was checked ([`AUDITED_KERNEL`]). One a later kernel
//! adds, and the reset misses, could let a client shape or watch the next client's
//! traffic; so on a newer kernel closed TAPs are deleted as before, until the driver is
//! checked again and the constant moved.

use super::netlink::{Link, Netlink};
use super::pool::{self, PoolSpec, Pooled, TapPool};
use super::tap::{Tap, TapOwner};
use super::{Attaching, BinderJob, Reapable, network_of};
use rtnetlink::LinkUnspec;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

/// The newest kernel (major, minor) [`Tap::reset`] was checked on, Linux 6.18: the tun
/// ioctls of `linux/if_tun.h` are `'T'` 200 (`TUNSETNOCSUM`) to 227 (`TUNGETDEVNETNS`),
/// and every setter among them that an fd holder may use on an attached TAP is reset or
/// needs what it cannot do (`TUNSETLINK` a device that is down, `TUNSETIFINDEX` a file
/// not attached yet, `TUNSETQUEUE` a multi-queue TAP; `TUNSETNOCSUM` and `TUNSETDEBUG`
/// change nothing a frame meets). That kernel answers `EINVAL` to every `'T'` number
/// above 227, in every direction (probed on a scratch TAP). `tests/tap_pool.rs` uses on
/// it every setter that could reach the next client's frames before checking the
/// reset, but the steering program (it only picks among queues: these TAPs have one)
/// and big-endian headers (this kernel is built without them: `EINVAL`).
pub const AUDITED_KERNEL: (u32, u32) = (6, 18);

/// Whether the kernel of release `release` (`uname -r`: "6.18.44-fc", "5.15.0-91-generic")
/// is no newer than [`AUDITED_KERNEL`]. An unreadable release counts as newer.
pub fn audited(release: &str) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let number = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
    match (number(parts.next()), number(parts.next())) {
        (Some(major), Some(minor)) => (major, minor) <= AUDITED_KERNEL,
        _ => false,
    }
}

/// What taking closed TAPs back needs of the backend.
pub(super) struct Recycler {
    pub pool: Arc<TapPool>,
    /// The refill's connection: on a thread of its own, off the acquires' workers.
    pub netlink: Arc<Netlink>,
    pub deleter: Arc<Netlink>,
    pub binder: mpsc::UnboundedSender<BinderJob>,
    pub reapable: Reapable,
    pub departed: watch::Sender<u64>,
    pub attaching: Arc<Attaching>,
}

/// How a closed TAP's return ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// In the pool again.
    Back,
    /// Still held by someone, its carrier on: left alone.
    Held,
    /// Not taken back (its network's pool went, or a step failed): deleted.
    Deleted,
}

impl Recycler {
    /// Whether `link`, a TAP of the broker reported closed, is the pool's: idle or on
    /// its way back already, or now sent back (a task of its own). False: the reaper
    /// deletes it.
    pub fn claim(self: &Arc<Self>, link: &Link) -> bool {
        if !pool::is_pool_name(&link.name) {
            return false;
        }
        let (Some(network), Some(bridge)) = (network_of(link), link.controller) else {
            return false;
        };
        if self.pool.is_idle(network, &link.name) || self.pool.is_returning(network, &link.name) {
            return true;
        }
        let Some(spec) = self.pool.reserve(network, bridge, &link.name) else {
            return false;
        };
        let this = Arc::clone(self);
        let link = link.clone();
        tokio::spawn(async move {
            let outcome = this.take_back(&spec, &link).await;
            debug!(network = %spec.network, interface = %link.name, ?outcome, "closed pool TAP");
        });
        true
    }

    async fn take_back(&self, spec: &PoolSpec, link: &Link) -> Outcome {
        let (name, index) = (link.name.clone(), link.index);
        // Out of the acquires' way, as the refill ([`pool`]).
        self.attaching.idle().await;
        let attached = pool::off_runtime(move || {
            let tap = Tap::attach(&name, index)?;
            tap.reset(TapOwner::broker())?;
            Ok(tap)
        })
        .await;
        let tap = match attached {
            Ok(tap) => {
                self.pool.attached(&spec.network, &link.name);
                tap
            }
            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
                // Held, with its carrier: a report of a close from before the attach of
                // its holder, whose own close is a carrier loss still to come. Held
                // without it: the holder turned it off (`TUNSETCARRIER`), and its close
                // will change nothing the link record reports, so a TAP left alone now
                // would stay hidden on the bridge for good (a port taken, over and over
                // by whoever repeats it). Deleted then, as the reaper always did.
                match self.netlink.link_by_index(index).await {
                    Ok(Some(now)) if now.carrier == Some(true) => {
                        self.pool.unreserve(&spec.network, &link.name);
                        return Outcome::Held;
                    }
                    Ok(None) => {
                        self.pool.unreserve(&spec.network, &link.name);
                        return Outcome::Held;
                    }
                    _ => return self.delete(spec, link, None).await,
                }
            }
            Err(e) => {
                warn!(interface = %link.name, "cannot take a closed pool TAP back: {e}");
                return self.delete(spec, link, None).await;
            }
        };
        let (done, forgotten) = oneshot::channel();
        let forget = BinderJob::Forget {
            network: spec.network.clone(),
            tap: link.name.clone(),
            done,
        };
        let unbound = self.binder.send(forget).is_ok() && forgotten.await == Ok(true);
        if !unbound {
            return self.delete(spec, link, Some(tap)).await;
        }
        self.attaching.idle().await;
        let mac = LinkUnspec::new_with_index(index)
            .address(pool::pool_mac().to_vec())
            .build();
        if let Err(e) = self.netlink.set(mac, &link.name, "reset the MAC of").await {
            warn!(interface = %link.name, "cannot take a closed pool TAP back: {e}");
            return self.delete(spec, link, Some(tap)).await;
        }
        // Out of the reaper's set before it is in the pool: an acquire may take it the
        // moment it is, and put it in the set again.
        self.reapable
            .lock()
            .expect("not poisoned")
            .remove(&link.name);
        let (name, fd) = tap.into_parts();
        // Closed again on an `allow_spoofing` network, as its pool keeps TAPs ([`pool`]):
        // nothing there would drop the bridge's frames for it. What queued on this fd
        // meanwhile goes with it.
        let held = if spec.guard {
            Some(fd)
        } else {
            let _ = pool::off_runtime(move || {
                drop(fd);
                Ok(())
            })
            .await;
            None
        };
        let pooled = Pooled {
            name,
            index,
            held,
            recycled: true,
        };
        match self.pool.give_back(spec, pooled) {
            Ok(()) => {
                // The registry's wait for an endpoint to close ends now: the TAP holds
                // no VM any more ([`super::LinuxBackend::endpoint_closed`]).
                self.departed.send_modify(|n| *n = n.wrapping_add(1));
                Outcome::Back
            }
            Err(pooled) => {
                let tap = pooled
                    .held
                    .map(|fd| Tap::held(pooled.name.clone(), index, fd));
                self.delete(spec, link, tap).await
            }
        }
    }

    /// Deletes `link` (while `held`, if given, keeps anyone else from attaching it), and
    /// forgets it.
    async fn delete(&self, spec: &PoolSpec, link: &Link, held: Option<Tap>) -> Outcome {
        self.pool.unreserve(&spec.network, &link.name);
        if let Err(e) = self.deleter.delete(link).await {
            warn!(interface = %link.name, "cannot delete a closed pool TAP: {e}");
        }
        drop(held);
        self.reapable
            .lock()
            .expect("not poisoned")
            .remove(&link.name);
        Outcome::Deleted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kernels_no_newer_than_the_audited_one_recycle() {
        assert!(audited("6.18.44-fc-v1045"));
        assert!(audited("6.18"));
        assert!(audited("5.15.0-91-generic"));
        assert!(audited("6.6.87.2-microsoft-standard-WSL2"));
        assert!(!audited("6.19.0"));
        assert!(!audited("7.0.1-arch1"));
        assert!(!audited("6.100.1"));
        assert!(!audited(""));
        assert!(!audited("linux"));
    }
}
