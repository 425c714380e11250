//! A few pre-made TAPs per active network, so a warm acquire attaches one instead of
//! making one.
//!
//! Making a TAP costs the kernel about 0.65 ms here (`TUNSETIFF` creating it, then the
//! `RTM_SETLINK` that gives it its MAC, MTU, alias, bridge and carrier), most of it under
//! the RTNL lock. So a background task ([`refill`]) keeps up to [`POOL_SIZE`] TAPs per
//! network ready: made, guarded unbound (the TAP guard drops every frame until the
//! binder binds the TAP; on an `allow_spoofing` network the nftables rules that match the
//! network's TAP prefix do the same as for a fresh TAP), given MTU, alias, a host-side
//! MAC of their own, the bridge as master, isolation and up, and persistent.
//!
//! - **Held open where the guard runs.** On an anti-spoofing network the pool keeps each
//!   ready TAP's fd ([`Pooled::held`]), and the acquire that takes it sends that very fd:
//!   no syscall at all on the warm path. Every TUN ioctl takes the RTNL lock, which the
//!   reaper's batched deletions hold for tens of milliseconds; an acquire that needed one
//!   waited that long (docs/benchmarks.md, warm acquire p99). An open TAP has its carrier
//!   up and gets the bridge's broadcasts; the guard's egress program drops every frame
//!   for a TAP without a binding, so an idle one queues nothing (and the handover drains
//!   whatever a guard adopted from an older broker let through, [`Tap::drain`]). On an
//!   `allow_spoofing` network nothing would drop them, so its pool TAPs are closed once
//!   made (no carrier: the bridge sends them nothing), and an acquire attaches one by
//!   name: one `TUNSETIFF` on a device that exists.
//! - **Who may attach one.** A persistent TAP with no owner and no group can be attached
//!   by any local user (the kernel's `tun_not_capable` checks only a valid owner or
//!   group). A pool TAP therefore belongs to the broker's own euid and egid
//!   (`TUNSETOWNER`, `TUNSETGROUP`) before it is made persistent: only a process with
//!   CAP_NET_ADMIN (the broker) may attach it. It stays the broker's when handed out, as
//!   every TAP not asked for as persistent ([`super::tap`]); one asked for as persistent
//!   is given to its client then.
//! - **Names.** `vmnt<bridge>-p<n>`: the network's TAP prefix (the firewall recognizes
//!   the network's TAPs by it) followed by `p`, which no serial-named TAP has (those are
//!   hex digits only). A TAP keeps its pool name when handed out; nothing in the broker
//!   derives a TAP's name from its serial after the attach.
//! - **Invisible.** Idle pool TAPs are no endpoint: `live_endpoints` leaves them out, so
//!   they show in no listing and count toward no limit. They never hold a VM.
//! - **The bridge's ports.** Every acquire takes a pool TAP first, so the pool never
//!   takes a port a user could have had; a refill that finds the bridge full (`EXFULL`)
//!   stops until the next acquire.
//! - **Gone with the network.** `destroy` forgets the network's pool first, then deletes
//!   every TAP with the network's alias; a refill that finishes after that deletes its
//!   own TAP. A broker killed by SIGKILL leaves idle pool TAPs behind: they are in no
//!   state record, have no fd, and the next broker's adoption deletes them.
//! - **Out of the acquires' way.** A refill starts once no acquire has been attaching
//!   for [`REFILL_QUIET`] (at once between acquires if the pool is at most half full),
//!   and each later kernel step waits until no acquire is attaching a TAP
//!   ([`super::Attaching::idle`]), so an acquire waits at most for one step of one
//!   refill, and its client reads its reply while no refill competes for the CPU. Its
//!   kernel calls wait for the RTNL lock off the runtime workers (its own rtnetlink
//!   connection on a thread of its own, TUN ioctls on the blocking pool: `off_runtime`).
//! - **Back to back.** Acquires in a row empty the pool faster than TAPs are made. One
//!   that finds it empty while a refill is under way waits for that refill's TAP
//!   ([`TapPool::claim_refill`], one acquire per refill) instead of making its own, which
//!   would queue on the RTNL lock behind it; the refill, told, skips its quiet period.
//!   Refills starting while the pool is half empty then make the next TAPs while clients
//!   are busy with their replies (back-to-back warm acquire p50 0.77-0.78 -> 0.65-0.69
//!   ms, three interleaved pairs of bench runs; docs/benchmarks.md).
//! - **Taken back.** A pool TAP its client closed comes back to the pool, reset as new
//!   ([`super::recycle`]), while the pool has room ([`TapPool::reserve`], up to
//!   [`RECYCLED_ROOM`] times its size); clients coming and going then cost no TAP made
//!   nor deleted.

use super::Attaching;
use super::bridge;
use super::links::LinkRecord;
use super::netlink::{Link, Netlink};
use super::tap::{self, Tap, TapOwner};
use crate::backend::linux::firewall::Firewall;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Pool TAPs kept ready per network: enough for a burst of VMs starting together, few
/// enough that an idle network holds almost nothing (a TAP without a reader costs a
/// net_device and no queue memory).
pub const POOL_SIZE: usize = 4;

/// How many times its size a pool may hold with the closed TAPs it took back
/// ([`TapPool::reserve`]): a held TAP costs the kernel a net_device and no queue memory,
/// and one more taken back is one TAP less made and deleted.
pub const RECYCLED_ROOM: usize = 2;

/// How long after the last acquire a pool that still has TAPs waits before it makes
/// another. Making a TAP is about 0.65 ms of kernel work; started the moment an
/// acquire's reply went, it took a CPU from the client reading that reply (on this
/// 2-CPU machine a warm acquire's client-side p50 went from 0.80-0.85 to 0.39-0.52 ms
/// with the wait, interleaved A/B runs; docs/benchmarks.md, warm acquire).
const REFILL_QUIET: Duration = Duration::from_millis(3);

/// What a refill needs to know of a network to make its TAPs.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub network: String,
    pub bridge: Link,
    pub mtu: u32,
    pub isolation: bool,
    /// The TAP guard goes on (anti-spoofing networks).
    pub guard: bool,
}

/// One ready TAP: persistent, plugged, guarded unbound.
#[derive(Debug)]
pub struct Pooled {
    pub name: String,
    pub index: u32,
    /// The TAP's only fd, kept open on a network with the TAP guard (see the module
    /// doc); `None` on an `allow_spoofing` network, whose pool TAPs are closed.
    pub held: Option<OwnedFd>,
    /// A TAP a client had before ([`super::recycle`]): the link record may still report
    /// the carrier loss of that client's close after it is handed out again.
    pub recycled: bool,
}

#[derive(Debug)]
struct Entry {
    spec: PoolSpec,
    idle: Vec<Pooled>,
    /// A refill failed: none is tried again until the next take.
    stalled: bool,
    /// A refill of this network is under way: its TAP may hold the bridge's last port.
    making: bool,
    /// The name of the TAP that refill made, once made: on the bridge, not ready yet.
    made: Option<String>,
    /// An acquire that found the pool empty waits for that refill's TAP
    /// ([`TapPool::claim_refill`]).
    claimed: bool,
    /// Closed TAPs on their way back to the pool ([`TapPool::reserve`]), and whether
    /// the broker holds each yet ([`TapPool::attached`]).
    recycling: Vec<(String, bool)>,
}

/// A pool that just gave a TAP away: its refill is woken when this drops. Waking a task
/// wakes a thread (the other runtime worker, on another CPU: 0.2 ms of a warm acquire's
/// 0.5 ms here, with the state writer's wake), which an acquire's reply need not wait
/// for; the refill waits [`REFILL_QUIET`] after the acquire anyway.
pub struct RefillDue(Arc<TapPool>);

impl Drop for RefillDue {
    fn drop(&mut self) {
        self.0.wake.notify_one();
    }
}

/// The pools of every network of one backend.
#[derive(Debug)]
pub struct TapPool {
    size: usize,
    entries: Mutex<BTreeMap<String, Entry>>,
    wake: Notify,
    /// Notified when a refill ends, made or not ([`TapPool::refilled`]).
    ended: Notify,
    /// Notified when an acquire waits for the refill under way
    /// ([`TapPool::claim_refill`]), which then stops waiting for the acquires to settle.
    claimed: Notify,
    next: AtomicU64,
}

impl TapPool {
    pub fn new(size: usize) -> Self {
        Self {
            size,
            entries: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            ended: Notify::new(),
            claimed: Notify::new(),
            next: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    /// Starts keeping a pool for the network of `spec` (made or adopted).
    pub fn add(&self, spec: PoolSpec) {
        if !self.enabled() {
            return;
        }
        self.lock().insert(
            spec.network.clone(),
            Entry {
                spec,
                idle: Vec::new(),
                stalled: false,
                making: false,
                made: None,
                claimed: false,
                recycling: Vec::new(),
            },
        );
        self.wake.notify_one();
    }

    /// Forgets network `network`'s pool; its TAPs go with the network's other TAPs.
    pub fn remove(&self, network: &str) {
        let gone = self.lock().remove(network);
        // The held fds close here, not under the lock: each close detaches a TAP, under
        // the RTNL lock.
        drop(gone);
    }

    /// Takes a ready TAP of `network` on the bridge with index `bridge_index`.
    /// The refill is told when `due` drops ([`RefillDue`]): the acquire keeps it until
    /// its reply is sent.
    pub fn take(self: &Arc<Self>, network: &str, bridge_index: u32) -> Option<(Pooled, RefillDue)> {
        let taken = {
            let mut entries = self.lock();
            let entry = entries.get_mut(network)?;
            if entry.spec.bridge.index != bridge_index {
                return None;
            }
            entry.stalled = false;
            entry.idle.pop()
        };
        taken.map(|t| (t, RefillDue(Arc::clone(self))))
    }

    /// Waits, at most `wait`, until no refill of `network` is under way. An acquire that
    /// could not make its own TAP (the bridge full, maybe by the TAP a refill is
    /// plugging) takes the refill's then; it must not count as attaching meanwhile, or
    /// the refill would wait for it.
    pub async fn refilled(&self, network: &str, wait: Duration) {
        self.wait_while(network, wait, |e| e.making).await;
    }

    /// Waits, at most `wait`, until `network`'s pool has a ready TAP or no refill of it
    /// is under way (the acquire of [`TapPool::claim_refill`]).
    pub async fn ready(&self, network: &str, wait: Duration) {
        self.wait_while(network, wait, |e| e.making && e.idle.is_empty())
            .await;
    }

    /// Waits, at most `wait`, while `network`'s pool is as `busy` says, checking again
    /// whenever a refill ends.
    async fn wait_while(&self, network: &str, wait: Duration, busy: impl Fn(&Entry) -> bool) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the check, so a refill ending in between wakes it.
            ended.as_mut().enable();
            if !self.lock().get(network).is_some_and(&busy) {
                return;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return;
            }
        }
    }

    /// Whether the acquire asking, which found `network`'s pool empty, is to wait for
    /// the TAP a refill is making ([`TapPool::ready`]) rather than make its own: a
    /// refill is under way and no other acquire waits for it. Back to back, acquires
    /// empty the pool faster than a TAP is made (about 0.5 ms of kernel work here, most
    /// of it under the RTNL lock), and a TAP made by the acquire too would queue on that
    /// lock behind the refill's; waiting for the refill's instead overlaps its making
    /// with the client's round trip (docs/benchmarks.md, warm acquire).
    pub fn claim_refill(&self, network: &str) -> bool {
        let mut entries = self.lock();
        match entries.get_mut(network) {
            Some(e) if e.making && !e.claimed && e.idle.is_empty() => {
                e.claimed = true;
                self.claimed.notify_waiters();
                true
            }
            _ => false,
        }
    }

    /// Waits until no acquire has been attaching for `quiet`, or an acquire waits for
    /// the refill of `spec`'s network ([`TapPool::claim_refill`]): then only until no
    /// acquire is attaching.
    async fn settled(&self, spec: &PoolSpec, attaching: &Attaching, quiet: Duration) {
        let quiet = attaching.quiet(quiet);
        tokio::pin!(quiet);
        loop {
            let claimed = self.claimed.notified();
            tokio::pin!(claimed);
            // Registered before the check, so a claim in between wakes it.
            claimed.as_mut().enable();
            if self.lock().get(&spec.network).is_some_and(|e| e.claimed) {
                break;
            }
            tokio::select! {
                () = &mut quiet => return,
                () = claimed => {}
            }
        }
        attaching.idle().await;
    }

    /// Whether `name` is a pool TAP of `network` no acquire has taken: idle, being
    /// made, or on its way back from a client ([`TapPool::reserve`]).
    pub fn is_idle(&self, network: &str, name: &str) -> bool {
        self.lock().get(network).is_some_and(|e| {
            e.idle.iter().any(|p| p.name == name)
                || e.made.as_deref() == Some(name)
                || e.recycling.iter().any(|(r, held)| *held && r == name)
        })
    }

    /// Whether `name` is on its way back to `network`'s pool ([`TapPool::reserve`]),
    /// attached by the broker or not yet: a later report of its close is no news.
    pub fn is_returning(&self, network: &str, name: &str) -> bool {
        self.lock()
            .get(network)
            .is_some_and(|e| e.recycling.iter().any(|(r, _)| r == name))
    }

    /// The broker now holds `name`, on its way back to `network`'s pool: from now on it
    /// is the pool's ([`TapPool::is_idle`]). Until then it may still be a client's (a
    /// close reported late).
    pub fn attached(&self, network: &str, name: &str) {
        if let Some(e) = self.lock().get_mut(network)
            && let Some(r) = e.recycling.iter_mut().find(|(r, _)| r == name)
        {
            r.1 = true;
        }
    }

    /// Keeps a place in `network`'s pool for pool TAP `name`, which its client closed,
    /// and returns the pool's spec: the pool is on bridge `bridge` (the TAP's master)
    /// and has room beside its idle TAPs, those on their way back and the refill's. None
    /// otherwise: the TAP is deleted.
    ///
    /// Room is twice the pool's size ([`RECYCLED_ROOM`]): the refill fills the pool
    /// within milliseconds of an acquire, before its client is likely to close the
    /// TAP, so a pool taking closed TAPs back only up to its size would rarely take one.
    pub fn reserve(&self, network: &str, bridge: u32, name: &str) -> Option<PoolSpec> {
        let mut entries = self.lock();
        let e = entries.get_mut(network)?;
        let room =
            e.idle.len() + e.recycling.len() + usize::from(e.making) < self.size * RECYCLED_ROOM;
        if e.spec.bridge.index != bridge || !room || e.recycling.iter().any(|(r, _)| r == name) {
            return None;
        }
        e.recycling.push((name.to_string(), false));
        Some(e.spec.clone())
    }

    /// Takes back the place [`TapPool::reserve`] kept for `name`.
    pub fn unreserve(&self, network: &str, name: &str) {
        if let Some(e) = self.lock().get_mut(network) {
            e.recycling.retain(|(r, _)| r != name);
        }
    }

    /// Adds a TAP back from its client to the place kept for it, if its network's pool
    /// (on the same bridge) is still there; else gives it back.
    pub fn give_back(&self, spec: &PoolSpec, tap: Pooled) -> Result<(), Pooled> {
        let mut entries = self.lock();
        match entries.get_mut(&spec.network) {
            Some(e)
                if e.spec.bridge.index == spec.bridge.index
                    && e.recycling.iter().any(|(r, _)| *r == tap.name) =>
            {
                e.recycling.retain(|(r, _)| *r != tap.name);
                e.idle.push(tap);
                Ok(())
            }
            _ => Err(tap),
        }
    }

    /// Idle pool TAPs of every network (the metrics' gauge).
    pub fn idle_count(&self) -> usize {
        self.lock().values().map(|e| e.idle.len()).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().expect("not poisoned")
    }

    /// The network whose pool is shortest, with its spec and whether its pool is at most
    /// half full, marked as being refilled.
    fn short(&self) -> Option<(PoolSpec, bool)> {
        self.lock()
            .values_mut()
            .filter(|e| !e.stalled && e.idle.len() + e.recycling.len() < self.size)
            .min_by_key(|e| e.idle.len())
            .map(|e| {
                e.making = true;
                (e.spec.clone(), e.idle.len() * 2 < self.size)
            })
    }

    /// The refill of `spec`'s network ended.
    fn done(&self, spec: &PoolSpec) {
        if let Some(e) = self.lock().get_mut(&spec.network) {
            e.making = false;
            e.made = None;
            e.claimed = false;
        }
        self.ended.notify_waiters();
    }

    /// Adds a made TAP to its network's pool, if the pool (of the same bridge) is still
    /// there and short; else gives it back.
    fn put(&self, spec: &PoolSpec, tap: Pooled) -> Result<(), Pooled> {
        let mut entries = self.lock();
        match entries.get_mut(&spec.network) {
            Some(e) if e.spec.bridge.index == spec.bridge.index && e.idle.len() < self.size => {
                e.idle.push(tap);
                Ok(())
            }
            _ => Err(tap),
        }
    }

    /// The refill of `spec`'s network made TAP `name`.
    fn made(&self, spec: &PoolSpec, name: &str) {
        if let Some(e) = self.lock().get_mut(&spec.network) {
            e.made = Some(name.to_string());
        }
    }

    fn stall(&self, spec: &PoolSpec) {
        if let Some(e) = self.lock().get_mut(&spec.network)
            && e.spec.bridge.index == spec.bridge.index
        {
            e.stalled = true;
        }
    }

    /// A fresh pool name on bridge `bridge_index` (`vmnt<bridge>-p<n>`).
    fn name(&self, bridge_index: u32) -> String {
        let prefix = tap::tap_prefix(bridge_index);
        // Hex digits that still fit IFNAMSIZ after the prefix and the `p`.
        let room = (libc::IFNAMSIZ - 1)
            .saturating_sub(prefix.len() + 1)
            .min(15);
        let n = self.next.fetch_add(1, Ordering::Relaxed) % (1u64 << (4 * room as u32));
        format!("{prefix}p{n:x}")
    }
}

/// Whether `name` is a pool TAP's name (handed out or not): the network's TAP prefix,
/// then `p`.
pub fn is_pool_name(name: &str) -> bool {
    name.strip_prefix("vmnt")
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(bridge, n)| {
            bridge.chars().all(|c| c.is_ascii_hexdigit()) && n.starts_with('p')
        })
}

/// The host-side MAC of a pool TAP: 0xFE first, as every TAP of the broker (see
/// `host_mac`), then `p` and a counter, so the TAPs of one bridge never share one.
pub(super) fn pool_mac() -> [u8; 6] {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    [0xfe, b'p', n[0], n[1], n[2], n[3]]
}

/// Keeps every network's pool full, for as long as the backend lives.
pub async fn refill(
    pool: Arc<TapPool>,
    netlink: Arc<Netlink>,
    deleter: Arc<Netlink>,
    links: Arc<LinkRecord>,
    firewall: Firewall,
    attaching: Arc<Attaching>,
) {
    // The broker's own uid and gid: no other local user may attach a pool TAP.
    let owner = TapOwner::broker();
    loop {
        let Some((spec, low)) = pool.short() else {
            pool.wake.notified().await;
            continue;
        };
        // A full bridge has no port for the pool: what is left is the users'. One port
        // stays free beside a refill's: an acquire that finds the pool empty while the
        // refill is plugging one (acquires of a network attach one at a time) still
        // gets a port. (Asked of the link record, which may lag by an event; the
        // kernel's EXFULL is the backstop.)
        let alias = super::alias_for(&spec.network);
        let ports = links
            .ports_of(spec.bridge.index, &alias)
            .map(|p| p.len())
            .unwrap_or(0);
        if ports + 2 > crate::config::MAX_ENDPOINTS_PER_NETWORK as usize {
            pool.stall(&spec);
            pool.done(&spec);
            continue;
        }
        // A pool at most half full is refilled at once (between acquires): acquires
        // are coming faster than TAPs are made. One with more left waits for the
        // acquires to settle.
        let wait = if low { Duration::ZERO } else { REFILL_QUIET };
        match make(&pool, &spec, owner, &netlink, &firewall, &attaching, wait).await {
            Ok(tap) => {
                let index = tap.index();
                let (name, fd) = tap.into_parts();
                // Without the guard, closed before an acquire can take it (an attached
                // TAP refuses a second fd, EBUSY): closing the fd of a persistent TAP only
                // detaches it, and its carrier goes, so the bridge sends it nothing.
                let held = spec.guard.then_some(fd);
                let pooled = Pooled {
                    name: name.clone(),
                    index,
                    held,
                    recycled: false,
                };
                match pool.put(&spec, pooled) {
                    Ok(()) => debug!(network = %spec.network, interface = %name, "pool TAP ready"),
                    Err(unneeded) => {
                        // The network went meanwhile; its removal may have missed this one.
                        let link = Link::tap(unneeded.index, &unneeded.name);
                        drop(unneeded);
                        if let Err(e) = deleter.delete(&link).await {
                            warn!(interface = %link.name, "cannot delete an unneeded pool TAP: {e}");
                        }
                    }
                }
            }
            Err(e) => {
                pool.stall(&spec);
                warn!(network = %spec.network, "cannot make a pool TAP: {e}");
            }
        }
        pool.done(&spec);
    }
}

/// Makes one pool TAP of `spec`'s network once no acquire has been attaching for
/// `quiet`, each later kernel step once no acquire is attaching. On failure nothing is
/// left (the TAP is not persistent until the end).
async fn make(
    pool: &TapPool,
    spec: &PoolSpec,
    owner: TapOwner,
    netlink: &Netlink,
    firewall: &Firewall,
    attaching: &Attaching,
    quiet: Duration,
) -> std::io::Result<Tap> {
    pool.settled(spec, attaching, quiet).await;
    let mut tries = 0;
    let tap = loop {
        let name = pool.name(spec.bridge.index);
        tries += 1;
        match off_runtime(move || Tap::create(&name, owner)).await {
            // A name a previous broker's pool left to a client (`IFF_TUN_EXCL`: EBUSY).
            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy && tries < 64 => continue,
            made => break made?,
        }
    };
    // Before it gets the network's alias: no listing may count it as a client's.
    pool.made(spec, tap.name());
    if spec.guard {
        attaching.idle().await;
        firewall
            .guard_tap(tap.index())
            .await
            .map_err(std::io::Error::other)?;
    }
    attaching.idle().await;
    let alias = super::alias_for(&spec.network);
    let plugged = async {
        bridge::enslave(netlink, &tap, pool_mac(), spec.mtu, &alias, &spec.bridge).await?;
        if spec.isolation {
            bridge::set_isolated(netlink, &tap).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    if let Err(e) = plugged.await {
        // The last fd of a TAP that is not persistent: the kernel deletes it inside
        // `close`, waiting for an RCU grace period, which must not stall a worker.
        tokio::task::spawn_blocking(move || drop(tap));
        return Err(e);
    }
    // On failure dropped on the blocking thread too, for the same reason.
    off_runtime(move || tap.make_persistent().map(|()| tap)).await
}

/// Runs `f`, a refill's TUN ioctls, on the runtime's blocking threads. Each ioctl takes
/// the RTNL lock, which a reaper's batch deletion holds for 80-100 ms; a runtime worker
/// waiting for it answers nobody meanwhile, and with both workers there an acquire the
/// pool had a TAP for waited milliseconds before its request was even read. Only the
/// refill's: an acquire's own TAP keeps its ioctls on its worker (docs/design.md, "The
/// kernel calls of making a TAP stay on the runtime workers").
pub(super) async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(format!("TUN ioctls: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_fit_and_are_told_from_serial_names() {
        let pool = TapPool::new(4);
        let a = pool.name(0x1234);
        assert_eq!(a, "vmnt1234-p0");
        assert!(is_pool_name(&a));
        assert!(!is_pool_name(&tap::tap_name(0x1234, 0xabc).unwrap()));
        assert!(!is_pool_name("vmnb-shared"));
        // The counter wraps within IFNAMSIZ on the widest bridge index.
        let wide = TapPool::new(4);
        wide.next.store(u64::MAX - 1, Ordering::Relaxed);
        for _ in 0..3 {
            let n = wide.name(u32::MAX);
            assert!(n.len() < libc::IFNAMSIZ, "{n}");
            assert!(is_pool_name(&n), "{n}");
        }
    }

    /// A pool of two for network "lab" on bridge 7.
    fn lab_pool() -> (Arc<TapPool>, PoolSpec) {
        let pool = Arc::new(TapPool::new(2));
        let spec = PoolSpec {
            network: "lab".into(),
            bridge: Link::tap(7, "vmnb-lab"),
            mtu: 1500,
            isolation: false,
            guard: true,
        };
        pool.add(spec.clone());
        (pool, spec)
    }

    /// The refill hears of a taken TAP only once the acquire lets go of its
    /// [`RefillDue`], after its reply: not while the reply is still to be sent.
    #[tokio::test]
    async fn a_take_wakes_the_refill_only_when_its_due_drops() {
        let (pool, spec) = lab_pool();
        let idle = Pooled {
            name: "vmnt7-p0".into(),
            index: 1,
            held: None,
            recycled: false,
        };
        assert!(pool.put(&spec, idle).is_ok());
        // What `add` and `put` signalled is consumed: the refill is waiting.
        let _ = tokio::time::timeout(Duration::from_millis(10), pool.wake.notified()).await;
        let woken = pool.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let (_, due) = pool.take("lab", 7).expect("the idle TAP");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), woken.as_mut())
                .await
                .is_err(),
            "woken before the due dropped"
        );
        drop(due);
        tokio::time::timeout(Duration::from_secs(5), woken)
            .await
            .expect("woken once the due dropped");
    }

    /// An acquire that finds the pool empty waits for the refill under way, one acquire
    /// per refill, and is let go as soon as that refill's TAP is in the pool (not when the
    /// refill stops: it goes on with the next TAP at once).
    #[tokio::test]
    async fn one_acquire_waits_for_the_refill_under_way_and_gets_its_tap() {
        let (pool, spec) = lab_pool();
        assert!(!pool.claim_refill("lab"), "no refill under way");
        let (short, low) = pool.short().expect("the empty pool is short");
        assert_eq!(short.network, "lab");
        assert!(low, "an empty pool is refilled without waiting for quiet");
        assert!(pool.claim_refill("lab"));
        assert!(!pool.claim_refill("lab"), "one waiting acquire per refill");
        let waiter = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { pool.ready("lab", Duration::from_secs(30)).await })
        };
        // The refill, told of the claim, stops waiting for the acquires to settle.
        let attaching = Attaching::default();
        tokio::time::timeout(
            Duration::from_secs(5),
            pool.settled(&spec, &attaching, Duration::from_secs(3600)),
        )
        .await
        .expect("a claimed refill waits for no quiet period");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "let go before the TAP was ready");
        let tap = Pooled {
            name: "vmnt7-p0".into(),
            index: 1,
            held: None,
            recycled: false,
        };
        assert!(pool.put(&spec, tap).is_ok());
        pool.done(&spec);
        // The next refill starts at once, before the waiter runs: it must not hold it.
        let _ = pool.short().expect("one TAP of two: still short");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("let go once the TAP was ready")
            .unwrap();
        assert!(pool.take("lab", 7).is_some());
        assert!(pool.claim_refill("lab"), "a new refill, a new claim");
    }

    #[test]
    fn a_pool_hands_out_only_its_own_bridges_taps() {
        let (pool, spec) = lab_pool();
        let t = |n: &str| Pooled {
            name: n.into(),
            index: 1,
            held: None,
            recycled: false,
        };
        let name = |p: Option<(Pooled, RefillDue)>| p.map(|(p, _)| p.name);
        assert!(pool.put(&spec, t("vmnt7-p0")).is_ok());
        assert!(pool.put(&spec, t("vmnt7-p1")).is_ok());
        assert!(pool.put(&spec, t("vmnt7-p2")).is_err(), "full");
        assert!(pool.is_idle("lab", "vmnt7-p1"));
        assert_eq!(
            name(pool.take("lab", 8)),
            None,
            "another bridge of that name"
        );
        assert_eq!(name(pool.take("lab", 7)).as_deref(), Some("vmnt7-p1"));
        assert!(!pool.is_idle("lab", "vmnt7-p1"));
        pool.remove("lab");
        assert_eq!(name(pool.take("lab", 7)), None);
        assert!(
            pool.put(&spec, t("vmnt7-p3")).is_err(),
            "the network is gone"
        );
        assert!(TapPool::new(0).short().is_none());
    }

    /// Closed TAPs come back up to twice the pool's size, counting the idle ones, those
    /// on their way and the refill's; only to their own bridge's pool, once each. One
    /// reserved is the pool's (idle to listings) only once the broker holds it; until
    /// then a later report of its close is still recognized as no news.
    #[test]
    fn a_pool_takes_closed_taps_back_up_to_twice_its_size_and_only_its_own() {
        let (pool, spec) = lab_pool();
        let t = |n: &str| Pooled {
            name: n.into(),
            index: 1,
            held: None,
            recycled: true,
        };
        assert!(pool.put(&spec, t("vmnt7-p0")).is_ok());
        assert!(pool.put(&spec, t("vmnt7-p1")).is_ok());
        assert!(
            pool.reserve("lab", 8, "vmnt7-p2").is_none(),
            "another bridge"
        );
        assert!(
            pool.reserve("other", 7, "vmnt7-p2").is_none(),
            "no such pool"
        );
        assert!(pool.reserve("lab", 7, "vmnt7-p2").is_some());
        assert!(pool.reserve("lab", 7, "vmnt7-p2").is_none(), "once");
        assert!(pool.is_returning("lab", "vmnt7-p2"));
        assert!(!pool.is_idle("lab", "vmnt7-p2"), "not held yet");
        pool.attached("lab", "vmnt7-p2");
        assert!(pool.is_idle("lab", "vmnt7-p2"));
        assert!(pool.reserve("lab", 7, "vmnt7-p3").is_some());
        assert!(
            pool.reserve("lab", 7, "vmnt7-p4").is_none(),
            "two idle and two on their way: twice the size"
        );
        assert!(
            pool.short().is_none(),
            "the refill counts those on their way"
        );
        pool.unreserve("lab", "vmnt7-p3");
        assert!(!pool.is_returning("lab", "vmnt7-p3"));
        assert!(pool.give_back(&spec, t("vmnt7-p2")).is_ok());
        assert!(
            pool.give_back(&spec, t("vmnt7-p3")).is_err(),
            "not reserved"
        );
        assert_eq!(pool.idle_count(), 3);
        assert!(!pool.is_returning("lab", "vmnt7-p2"));
        let (taken, _) = pool.take("lab", 7).unwrap();
        assert_eq!(taken.name, "vmnt7-p2", "the last back is the first out");
        assert!(taken.recycled);
    }
}
