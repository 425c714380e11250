//! Linux backend: a kernel bridge per network, a TAP per acquire, nftables for NAT and
//! anti-spoofing, and the broker's own DHCP and DNS services.
//!
//! Everything the backend makes carries the interface alias `vmnet-broker:<network>`,
//! so operators see what belongs to whom and a restarted broker finds what a crashed
//! one left behind ([`Backend::remove_stale`]).

pub mod bridge;
pub mod firewall;
pub mod heap;
pub mod links;
pub mod netlink;
pub mod pool;
pub mod portfwd;
pub mod recycle;
pub mod services;
pub mod subnet;
pub mod tap;
pub mod vxlan;

use crate::backend::{
    Answering, AttachRequest, Attachment, BRIDGE, Backend, BackendError, EndpointId,
    ForwardRequest, INTERFACE, LeaseView, NetworkDetails, OVERLAY, PlatformDetails,
};
use crate::config::{Mode, NetworkConfig, PortForward, Protocol};
use crate::state::NetworkRecord;
use crate::steps::Steps;
use firewall::{Firewall, FirewallNetwork};
use ipnet::{Ipv4Net, Ipv6Net};
use links::{CarrierLosses, Departures, LinkRecord};
use netlink::{Link, Netlink};
use services::{ServiceParams, Services};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subnet::{Occupant, Occupation};
use tap::Tap;
use tracing::{debug, error, info, warn};

pub use bridge::{bridge_mac, bridge_name};
pub use netlink::bridge_of;
pub use tap::tap_name_of;

/// Prefix of the alias of every interface the broker makes.
pub const ALIAS_PREFIX: &str = "vmnet-broker:";

/// Pauses between the attempts to bind a new TAP to its guest's MAC in the firewall. Until
/// it is bound every frame of the TAP is dropped, so a transient `nft` failure (a racing
/// ruleset reload, a fork failing under memory pressure) must not cut the VM off for good.
const BIND_RETRY_DELAYS: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// How long the reaper waits after the first closed TAP for others to close too, so a
/// burst of VMs exiting is deleted in a few transactions rather than one per TAP.
const REAP_GATHER: Duration = Duration::from_millis(20);

/// At most how long the binder waits for the acquires under way to be answered before it
/// binds what they queued ([`bind_ports`]).
const BIND_WAIT: Duration = Duration::from_millis(20);

/// How long no TAP may have been attached before the reaper deletes: a deletion holds the
/// kernel's RTNL lock (a TAP's creation and plugging need it) for an expedited RCU grace
/// period per TAP, so while acquires come in it waits...
const REAP_QUIET: Duration = Duration::from_millis(20);

/// ...but no longer than this after the first TAP of the batch closed: under a steady
/// stream of acquires one acquire per second waits for a batch, instead of one in every
/// few waiting for a TAP each.
const REAP_MAX_DELAY: Duration = Duration::from_millis(1000);

/// ...or than it takes this many TAPs to close: every closed TAP still holds a port of
/// its bridge (1023 at most) until deleted, and a client cycling connect, acquire and
/// disconnect closes one a millisecond. Not fewer: each batch holds the RTNL lock for
/// milliseconds, which the acquire under way waits for (2000 back-to-back acquires:
/// p99 10.3-11.5 ms with batches of 64, 3.1 ms with 256, two interleaved pairs of runs);
/// a bridge that fills before is emptied of its closed TAPs at once ([`ReapNow`]).
const REAP_BATCH_MAX: usize = 256;

/// How long an acquire that found its pool empty waits at most for the TAP a refill is
/// making ([`pool::TapPool::claim_refill`]) before it makes its own. A TAP takes about
/// 0.5 ms to make here, and any acquire waits as long as a reaper's batch holds the RTNL
/// lock (25-80 ms); a refill that fails ends the wait at once.
const REFILL_CLAIM_WAIT: Duration = Duration::from_millis(100);

/// How long an acquire that found its bridge full (`EXFULL`) waits for the reaper to
/// delete the closed TAPs holding ports ([`ReapNow`]) before it gives up.
const REAP_NOW_WAIT: Duration = Duration::from_secs(2);

/// Lets an acquire whose bridge is full have the closed TAPs deleted now instead of when
/// the reaper would have ([`reap_closed_taps`]): ports of TAPs nobody holds any more
/// must never refuse a client.
#[derive(Default)]
struct ReapNow {
    asked: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
    /// Bumped after every batch the reaper ends (deleted or found nothing to delete).
    batches: tokio::sync::watch::Sender<u64>,
}

impl ReapNow {
    /// Asks the reaper to delete what has closed at once; true once it has ended a batch
    /// since (with nothing deleted, the caller's retry fails as before), false if none
    /// ended within `wait`.
    async fn ask(&self, wait: Duration) -> bool {
        let mut batches = self.batches.subscribe();
        let seen = *batches.borrow_and_update();
        self.asked.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
        tokio::time::timeout(wait, batches.wait_for(|n| *n > seen))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether an acquire asked since the last call.
    fn take_asked(&self) -> bool {
        self.asked.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    fn batch_ended(&self) {
        self.batches.send_modify(|n| *n += 1);
    }
}

/// Acquires under way (from the backend's attach until the reply with the fd is about to
/// be sent: [`crate::backend::Attachment::answering`]), and networks being created (a
/// cold acquire's first half), for the reaper and the pool's refill to keep out of their
/// way.
#[derive(Debug)]
pub struct Attaching {
    in_flight: std::sync::atomic::AtomicUsize,
    /// Acquires waiting for a TAP the pool's refill is making ([`Attaching::waiting`]):
    /// not attaching (the refill's steps must not wait for them), still under way for
    /// the reaper.
    waiting: std::sync::atomic::AtomicUsize,
    last: Mutex<std::time::Instant>,
    /// Notified whenever an attach ends ([`Attaching::idle`]).
    ended: tokio::sync::Notify,
}

impl Default for Attaching {
    fn default() -> Self {
        Self {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            last: Mutex::new(std::time::Instant::now()),
            ended: tokio::sync::Notify::new(),
        }
    }
}

impl Attaching {
    /// Counts an attach as under way until the guard drops.
    fn start(self: &Arc<Self>) -> AttachGuard {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        AttachGuard(Arc::clone(self))
    }

    /// Counts an acquire as waiting for a refill's TAP until the guard drops: for the
    /// reaper it is under way like an attach (a deletion started now would hold the RTNL
    /// lock the refill needs, tens of milliseconds), for the refill (which it waits for)
    /// not.
    fn waiting(self: &Arc<Self>) -> WaitGuard {
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        WaitGuard(Arc::clone(self))
    }

    /// Returns once no attach is under way (at once if none is): the pool's refills
    /// ([`pool::refill`]) run each kernel step between acquires, not during one.
    pub async fn idle(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the check, so an attach ending in between wakes it.
            ended.as_mut().enable();
            if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }

    /// Returns once no attach is under way and none has ended for `period`.
    pub async fn quiet(&self, period: Duration) {
        loop {
            self.idle().await;
            let since = self.last.lock().expect("not poisoned").elapsed();
            match period.checked_sub(since) {
                Some(left) if !left.is_zero() => tokio::time::sleep(left).await,
                _ if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 => return,
                _ => {}
            }
        }
    }

    /// No attach under way nor any acquire waiting for a refill, and neither for `period`.
    fn quiet_for(&self, period: Duration) -> bool {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
            && self.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0
            && self.last.lock().expect("not poisoned").elapsed() >= period
    }
}

/// An acquire waiting for a refill's TAP ([`Attaching::waiting`]).
struct WaitGuard(Arc<Attaching>);

impl Drop for WaitGuard {
    fn drop(&mut self) {
        *self.0.last.lock().expect("not poisoned") = std::time::Instant::now();
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct AttachGuard(Arc<Attaching>);

impl std::fmt::Debug for AttachGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttachGuard")
    }
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        *self.0.last.lock().expect("not poisoned") = std::time::Instant::now();
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

/// Names of the TAPs the broker made persistent only so that their last fd closing does
/// not delete them in that process (see [`reap_closed_taps`]): the broker deletes them
/// once their carrier goes. TAPs a client asked to be persistent are not in it.
type Reapable = Arc<Mutex<BTreeMap<String, Carrier>>>;

/// Whether the link record's carrier of a reapable TAP can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// The TAP has had an fd since it was made or adopted: a carrier loss is a close.
    Current,
    /// A closed pool TAP attached for an acquire ([`pool`], `allow_spoofing` networks):
    /// the carrier loss of its time in the pool may reach the link record after the
    /// attach, and the attach's carrier a little later (linkwatch reports carrier
    /// changes asynchronously). Only the kernel's word (a link dump) tells.
    MaybeStale,
}

/// Where the network services keep state and find the host's resolvers.
#[derive(Debug, Clone)]
pub struct LinuxOptions {
    /// DHCP leases and other state that must survive a broker restart.
    pub state_dir: PathBuf,
    /// The resolv.conf the DNS forwarder reads upstream servers from.
    pub resolv_conf: PathBuf,
    /// Pre-made TAPs kept per network ([`pool`]; the daemon keeps [`pool::POOL_SIZE`]);
    /// 0 makes every TAP on its acquire.
    pub tap_pool: usize,
}

pub struct LinuxBackend {
    options: LinuxOptions,
    netlink: Arc<Netlink>,
    /// Deletions ([`Netlink::connect_dedicated`]): they wait for RCU grace periods.
    deleter: Arc<Netlink>,
    /// The live bridges and TAPs of the broker, from link events.
    links: Arc<LinkRecord>,
    /// Queue of the background task that binds new TAPs ([`bind_ports`]).
    binder: tokio::sync::mpsc::UnboundedSender<BinderJob>,
    /// Bumped by the binder for every link that left the record (a TAP closed or
    /// deleted), so [`Backend::endpoint_closed`] wakes at once.
    departed: tokio::sync::watch::Sender<u64>,
    /// TAPs deleted once their last fd closes ([`reap_closed_taps`]).
    reapable: Reapable,
    reap_now: Arc<ReapNow>,
    attaching: Arc<Attaching>,
    /// Ready TAPs per network, kept full by [`pool::refill`].
    pool: Arc<pool::TapPool>,
    /// NAT, forwarding and anti-spoofing rules of every network, in one nftables table
    /// per family owned by the broker.
    firewall: Firewall,
    /// Subnets of the networks this backend holds, by bridge name. Reserved before the
    /// bridge exists, so two creations can never pick the same subnet.
    held: Mutex<BTreeMap<String, Held>>,
    /// The dynamic port forwards of every network, shared with the binder task, which
    /// ends those whose TAP went away.
    forwards: Arc<DynamicForwards>,
}

/// The address space one network holds: its name, subnet and IPv6 prefix.
type Held = (String, Ipv4Net, Option<Ipv6Net>);

/// Dynamic forwards by (network, protocol, external port).
type DynamicForwards = Mutex<BTreeMap<(String, Protocol, u16), DynamicForward>>;

/// One dynamic port forward: the host's port, and the task that follows the guest's
/// lease and keeps the firewall's rule on its address. Dropping it ends both, except the
/// firewall rule, which [`end_forward`] removes.
struct DynamicForward {
    tap: String,
    _host: portfwd::HostPort,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for DynamicForward {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// The firewall's key of a dynamic forward's IPv4 rule (to the guest's lease).
fn forward_key(protocol: Protocol, port: u16) -> String {
    format!("{}/{port}", protocol.as_str())
}

/// The firewall's key of a dynamic forward's IPv6 rule (to the guest's EUI-64 address).
fn forward_key6(protocol: Protocol, port: u16) -> String {
    format!("{}/{port}/ipv6", protocol.as_str())
}

/// Where the broker's relay sends a dynamic forward's loopback connections: the
/// guest's lease when it has one, else its EUI-64 address, else nowhere yet.
fn relay_target(lease: Option<Ipv4Addr>, eui64: Option<Ipv6Addr>, port: u16) -> Option<SocketAddr> {
    lease
        .map(IpAddr::V4)
        .or(eui64.map(IpAddr::V6))
        .map(|ip| SocketAddr::new(ip, port))
}

/// Removes a dynamic forward's rules, both families (its host port and follower went
/// with `forward`).
async fn end_forward(firewall: &Firewall, network: &str, protocol: Protocol, port: u16) {
    for key in [forward_key(protocol, port), forward_key6(protocol, port)] {
        if let Err(e) = firewall.set_forward(network, &key, None).await {
            warn!(
                network,
                port,
                "cannot remove a port forward's rule: {}",
                crate::error::Chain(&e)
            );
        }
    }
}

/// One network made by [`LinuxBackend`].
pub struct LinuxNetwork {
    /// The definition, with the MTU the network really has (an overlay's is derived from
    /// its underlay's).
    config: NetworkConfig,
    bridge: Link,
    /// The VXLAN port that carries the network to other hosts, when it spans hosts.
    overlay: Option<Link>,
    /// The overlay's peers as the kernel and the firewall have them now: the
    /// definition's, or those a reload gave ([`Backend::set_overlay_peers`]).
    peers: Mutex<Vec<std::net::IpAddr>>,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    /// The network's IPv6 /64 ([`LinuxNetwork::ipv6_prefix`]).
    ipv6_prefix: Option<Ipv6Net>,
    /// Taken by `destroy`, which gets the network by reference (others may still hold it
    /// for a moment, e.g. to list its TAPs for `status`).
    services: Mutex<Option<Services>>,
    /// The host ports of the static forwards (`port_forwarding_rules`), held while the
    /// network exists; taken by `destroy`.
    host_ports: Mutex<Vec<portfwd::HostPort>>,
}

/// What a client receives for one VM NIC: the TAP's fd, and its name.
#[derive(Debug)]
pub struct TapEndpoint {
    pub name: String,
    pub fd: OwnedFd,
}

impl AsFd for TapEndpoint {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl LinuxNetwork {
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }
    pub fn bridge(&self) -> &str {
        &self.bridge.name
    }
    pub fn bridge_index(&self) -> u32 {
        self.bridge.index
    }
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }
    /// The name of the VXLAN port, when the network spans hosts.
    pub fn overlay(&self) -> Option<&str> {
        self.overlay.as_ref().map(|l| l.name.as_str())
    }
    /// The network's IPv6 /64: the file's `ipv6_prefix`, else its generated ULA prefix
    /// ([`crate::ula`]); `None` only when the kernel has no IPv6. Guests number themselves
    /// in it by SLAAC (their EUI-64 address, [`crate::ula::eui64_address`]); the gateway is
    /// its `::1`. What the firewall needs to bind a TAP's IPv6 source addresses.
    pub fn ipv6_prefix(&self) -> Option<Ipv6Net> {
        self.ipv6_prefix
    }
    /// The gateway's IPv6 address, `::1` of [`Self::ipv6_prefix`].
    pub fn gateway6(&self) -> Option<Ipv6Addr> {
        self.ipv6_prefix.map(crate::ula::gateway_of)
    }
}

/// The alias of the bridge and TAPs of network `name`.
pub fn alias_for(name: &str) -> String {
    format!("{ALIAS_PREFIX}{name}")
}

/// The host side of a TAP: the guest MAC with 0xFE as first byte. 0xFE is above any
/// MAC QEMU or the kernel generate, so even on a bridge whose MAC is not set (which
/// takes its lowest port's) a TAP's would never be picked; it is still unicast and
/// locally administered.
fn host_mac(guest: [u8; 6]) -> [u8; 6] {
    let mut mac = guest;
    mac[0] = 0xfe;
    mac
}

/// What occupies the host's IPv4 and IPv6 address space ([`Netlink::occupants`]).
type Occupants = (Vec<Occupant>, Vec<Occupant<Ipv6Net>>);

impl LinuxBackend {
    /// Must be called inside a tokio runtime: it starts the firewall's watchdog, which
    /// restores the broker's rules within seconds if someone flushes the ruleset.
    pub async fn new(options: LinuxOptions) -> Result<Self, BackendError> {
        let netlink = Netlink::connect()?;
        std::fs::create_dir_all(&options.state_dir).map_err(|e| {
            BackendError::os(
                format!(
                    "cannot create state directory {}",
                    options.state_dir.display()
                ),
                e,
            )
        })?;
        let firewall = Firewall::new();
        firewall.spawn_watchdog();
        let netlink = Arc::new(netlink);
        let (links, departures, losses) = LinkRecord::start(Arc::clone(&netlink))
            .map_err(|e| BackendError::component("link record", e))?;
        let links = Arc::new(links);
        let (binder, jobs) = tokio::sync::mpsc::unbounded_channel();
        let departed = tokio::sync::watch::Sender::new(0u64);
        let forwards: Arc<DynamicForwards> = Arc::default();
        let reapable = Reapable::default();
        let reap_now = Arc::new(ReapNow::default());
        let attaching = Arc::new(Attaching::default());
        let binder_state = Binder {
            firewall: firewall.clone(),
            links: Arc::clone(&links),
            departed: departed.clone(),
            forwards: Arc::clone(&forwards),
            reapable: Arc::clone(&reapable),
            attaching: Arc::clone(&attaching),
        };
        tokio::spawn(bind_ports(binder_state, jobs, departures));
        let deleter = Arc::new(Netlink::connect_dedicated("vmnb-netlink-del")?);
        let pool = Arc::new(pool::TapPool::new(options.tap_pool));
        let mut recycler = None;
        if pool.enabled() {
            // Background work: its rtnetlink requests wait for the RTNL lock on a thread
            // of their own, not on a runtime worker an acquire needs ([`pool::refill`]).
            let pool_netlink = Arc::new(Netlink::connect_dedicated("vmnb-netlink-pool")?);
            tokio::spawn(pool::refill(
                Arc::clone(&pool),
                Arc::clone(&pool_netlink),
                Arc::clone(&deleter),
                Arc::clone(&links),
                firewall.clone(),
                Arc::clone(&attaching),
            ));
            let release = nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default();
            if recycle::audited(&release) {
                recycler = Some(Arc::new(recycle::Recycler {
                    pool: Arc::clone(&pool),
                    netlink: pool_netlink,
                    deleter: Arc::clone(&deleter),
                    binder: binder.clone(),
                    reapable: Arc::clone(&reapable),
                    departed: departed.clone(),
                    attaching: Arc::clone(&attaching),
                }));
            } else {
                info!(
                    kernel = release,
                    "closed pool TAPs are deleted, not taken back: this kernel is newer than \
                     the tun driver the reset was checked against ({}.{})",
                    recycle::AUDITED_KERNEL.0,
                    recycle::AUDITED_KERNEL.1
                );
            }
        }
        tokio::spawn(reap_closed_taps(
            Arc::clone(&deleter),
            Arc::clone(&reapable),
            Arc::clone(&reap_now),
            Arc::clone(&attaching),
            recycler,
            losses,
        ));
        Ok(Self {
            options,
            netlink,
            deleter,
            links,
            binder,
            departed,
            reapable,
            reap_now,
            attaching,
            pool,
            firewall,
            held: Mutex::new(BTreeMap::new()),
            forwards,
        })
    }

    /// Idle pool TAPs over every network ([`pool`]).
    pub fn pooled_taps(&self) -> usize {
        self.pool.idle_count()
    }

    /// Starts keeping TAPs ready for network `config` on `bridge`.
    fn start_pool(&self, config: &NetworkConfig, bridge: &Link) {
        self.pool.add(pool::PoolSpec {
            network: config.name.clone(),
            bridge: bridge.clone(),
            mtu: config.mtu,
            isolation: config.isolation,
            guard: !config.allow_spoofing,
        });
    }

    /// The backend's firewall (tests and diagnostics read the TAP guard's bindings).
    pub fn firewall(&self) -> &Firewall {
        &self.firewall
    }

    pub fn options(&self) -> &LinuxOptions {
        &self.options
    }

    /// The network's IPv6 prefix ([`Self::ipv6_prefix_for`]) and what occupies the host's
    /// address space ([`Netlink::occupants`]), for [`Self::reserve_subnet`]: the prefix's
    /// file and the kernel's dumps are read at the same time.
    async fn prefix_and_occupants(
        &self,
        config: &NetworkConfig,
    ) -> Result<(Option<Ipv6Net>, Occupants), BackendError> {
        // What `ipv6_prefix_for` yields a prefix for, known before it ends.
        let ipv6 = config.vxlan.is_none() && bridge::has_ipv6();
        let occupants = async {
            self.netlink
                .occupants(ipv6)
                .await
                .map_err(|e| BackendError::os("cannot read the host's addresses and routes", e))
        };
        tokio::try_join!(self.ipv6_prefix_for(config), occupants)
    }

    /// Reserves a subnet for `config`: the fixed one if it is free, else the first free
    /// prefix of the pool ([`subnet::pool`]), given what the host holds (`occupants`).
    fn reserve_subnet(
        &self,
        config: &NetworkConfig,
        bridge: &str,
        ipv6_prefix: Option<Ipv6Net>,
        (mut occupants, mut occupants6): Occupants,
    ) -> Result<(Ipv4Net, Ipv4Addr), BackendError> {
        let mut held = self.held.lock().expect("not poisoned");
        occupants.extend(held.values().map(|(name, net, _)| Occupant {
            net: *net,
            what: Occupation::Network { name: name.clone() },
        }));
        // The IPv6 prefix as the subnet: nothing on the host, and no other network of
        // this broker, may use it (a generated one collides only by a 2^-40 chance, or
        // when another network's file fixes the same prefix).
        // Other networks first: the bridge's address is on the host too, and the
        // network's name is the better answer.
        if let Some(p) = ipv6_prefix {
            let mut all6: Vec<Occupant<Ipv6Net>> = held
                .values()
                .filter_map(|(name, _, p6)| {
                    Some(Occupant {
                        net: (*p6)?,
                        what: Occupation::Network { name: name.clone() },
                    })
                })
                .collect();
            all6.append(&mut occupants6);
            if let Some(o) = subnet::conflict6(p, &all6) {
                let hint = match config.ipv6_prefix {
                    Some(_) => "choose another ipv6_prefix".to_string(),
                    None => format!(
                        "set an ipv6_prefix in the network's file, or remove {} for a new generated one",
                        crate::ula::path_for(&self.options.state_dir, &config.name).display()
                    ),
                };
                return Err(BackendError::Conflict(format!(
                    "ipv6_prefix {p} overlaps {o}; {hint}"
                )));
            }
        }
        let (net, gateway) = match (config.fixed_subnet(), config.gateway) {
            (Some(net), Some(gateway)) => {
                if let Some(o) = subnet::conflict(net, &occupants) {
                    return Err(BackendError::Conflict(format!(
                        "subnet {net} overlaps {o}; choose another subnet"
                    )));
                }
                (net, gateway)
            }
            _ => {
                let len = config.prefix_len;
                // Leave the subnets other files fix to their networks.
                occupants.extend(config.fixed_elsewhere.iter().map(|(name, net)| Occupant {
                    net: *net,
                    what: Occupation::Defined { name: name.clone() },
                }));
                let net = subnet::pick(len, &occupants).ok_or_else(|| {
                    BackendError::Exhausted(format!(
                        "no free /{len} subnet in 192.168.64.0/18 or 10.213.0.0/16; \
                         set a subnet in the network's file"
                    ))
                })?;
                (net, subnet::first_host(net))
            }
        };
        held.insert(bridge.to_string(), (config.name.clone(), net, ipv6_prefix));
        Ok((net, gateway))
    }

    fn release_subnet(&self, bridge: &str) {
        self.held.lock().expect("not poisoned").remove(bridge);
    }

    fn holds(&self, bridge: &str) -> bool {
        self.held.lock().expect("not poisoned").contains_key(bridge)
    }

    /// Fails if `bridge` exists and is not a leftover of the same network; removes
    /// such a leftover (a broker that died before `remove_stale` could run).
    async fn claim_bridge_name(&self, bridge: &str, alias: &str) -> Result<(), BackendError> {
        let Some(link) = self.netlink.link_by_name(bridge).await? else {
            return Ok(());
        };
        if link.alias.as_deref() != Some(alias) {
            let owner = link.alias.as_deref().unwrap_or("no alias");
            return Err(BackendError::Conflict(format!(
                "interface {bridge} already exists ({owner}) and does not belong to this network"
            )));
        }
        if self.holds(bridge) {
            return Err(BackendError::Conflict(format!(
                "bridge {bridge} is already in use by an active network"
            )));
        }
        warn!(
            interface = bridge,
            "removing leftover bridge of the same network"
        );
        self.deleter.delete(&link).await?;
        Ok(())
    }

    /// Fails if the VXLAN device name of network `name` is taken by something that is not
    /// a leftover of the same network; removes such a leftover.
    async fn claim_vxlan_name(&self, name: &str) -> Result<(), BackendError> {
        let port = vxlan::vxlan_name(name);
        let Some(link) = self.netlink.link_by_name(&port).await? else {
            return Ok(());
        };
        if link.alias.as_deref() != Some(vxlan::overlay_alias(name).as_str()) {
            let owner = link.alias.as_deref().unwrap_or("no alias");
            return Err(BackendError::Conflict(format!(
                "interface {port} already exists ({owner}) and does not belong to this network"
            )));
        }
        warn!(
            interface = port,
            "removing leftover VXLAN device of the same network"
        );
        self.netlink.delete(&link).await?;
        Ok(())
    }

    /// The overlay port of an adopted network: the one the previous broker made when it is
    /// still on the bridge, else a new one. `config.mtu` becomes the bridge's, which the
    /// network was made with.
    async fn adopt_overlay(
        &self,
        config: &mut NetworkConfig,
        bridge: &Link,
    ) -> Result<Option<Link>, BackendError> {
        let Some(overlay) = config.vxlan.clone() else {
            return Ok(None);
        };
        if let Some(mtu) = bridge.mtu {
            config.mtu = mtu;
        }
        match vxlan::find(&self.netlink, &config.name).await? {
            Some(link) if link.controller == Some(bridge.index) => return Ok(Some(link)),
            Some(link) => {
                self.netlink.delete(&link).await?;
            }
            None => {}
        }
        warn!(network = %config.name, "the overlay port was gone: making it again");
        vxlan::make(&self.netlink, config, &overlay, bridge, config.mtu)
            .await
            .map(Some)
            .map_err(|e| BackendError::os("cannot make the network's overlay", e))
    }

    /// The network's IPv6 prefix: the file's, else the one generated for its name and
    /// kept in the state directory (made on first use). `None` when the kernel has no
    /// IPv6, unless the file asks for a prefix (an error then, never silently ignored).
    ///
    /// The file is read (and a new one written) on a blocking thread, and a new file is
    /// synced to the disk by another that nobody waits for ([`crate::ula::sync`]).
    async fn ipv6_prefix_for(
        &self,
        config: &NetworkConfig,
    ) -> Result<Option<Ipv6Net>, BackendError> {
        // A network spanning hosts has no IPv6 yet: every host would advertise its own
        // prefix and gateway on the one link (linux_support refuses a fixed prefix).
        if config.vxlan.is_some() {
            return Ok(None);
        }
        if !bridge::has_ipv6() {
            return match config.ipv6_prefix {
                Some(p) => Err(BackendError::Conflict(format!(
                    "ipv6_prefix {p}: the kernel has no IPv6 (booted with ipv6.disable=1?)"
                ))),
                None => Ok(None),
            };
        }
        if let Some(p) = config.ipv6_prefix {
            return Ok(Some(p));
        }
        let (dir, name) = (self.options.state_dir.clone(), config.name.clone());
        let kept = tokio::task::spawn_blocking(move || crate::ula::load_or_create(&dir, &name))
            .await
            .map_err(|e| BackendError::component("IPv6 prefix", e))?
            .map_err(|e| BackendError::component("IPv6 prefix", e))?;
        if let Some(path) = kept.unsynced {
            let network = config.name.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = crate::ula::sync(&path) {
                    warn!(network, "{}", crate::error::Chain(&e));
                }
            });
        }
        Ok(Some(kept.prefix))
    }

    /// Firewall rules, then DHCP, DNS and Router Advertisements. On error nothing of them
    /// is left.
    ///
    /// `adopted` (a network of a previous broker) lists the TAPs still on its bridge with
    /// their guest MACs: they are bound, and the saved leases with them, in the very
    /// transaction that replaces the network's rules, so its running guests' frames never
    /// meet empty binding sets (they would be dropped until bound again).
    async fn start_services(
        &self,
        config: &NetworkConfig,
        bridge: &Link,
        subnet: Ipv4Net,
        gateway: Ipv4Addr,
        ipv6_prefix: Option<Ipv6Net>,
        adopted: Option<&[(String, [u8; 6])]>,
    ) -> Result<Services, BackendError> {
        let mut steps = Steps::start();
        let params = ServiceParams {
            config,
            bridge: &bridge.name,
            bridge_index: bridge.index,
            bridge_mac: bridge_mac(&config.name),
            subnet,
            gateway,
            ipv6_prefix,
            state_dir: &self.options.state_dir,
            resolv_conf: &self.options.resolv_conf,
            firewall: &self.firewall,
        };
        let (ports, leases) = match adopted {
            Some(ports) => (ports, services::saved_leases(&params)),
            None => (&[][..], vec![]),
        };
        self.firewall
            .add_network_bound(
                &firewall_network(config, bridge, subnet, gateway, ipv6_prefix),
                ports,
                &leases,
            )
            .await
            .map_err(|e| BackendError::component("firewall", e))?;
        steps.lap("firewall");
        let started = Services::start(params).await;
        steps.lap("services");
        crate::log_steps!("start services", config.name, steps);
        if started.is_err()
            && let Err(e) = self.firewall.remove_network(&config.name).await
        {
            warn!(network = %config.name, "cannot remove firewall rules: {}", crate::error::Chain(&e));
        }
        started
    }

    /// A ready TAP of the network's pool: the fd the pool held, or (closed pool TAPs of an
    /// `allow_spoofing` network) a new one attached by name; given to `owner` if the TAP
    /// is to be its client's ([`tap`]). With it, whether the link record's carrier of it
    /// can be trusted yet, and what wakes the pool's refill when dropped.
    fn take_pooled(
        &self,
        network: &LinuxNetwork,
        owner: Option<tap::TapOwner>,
    ) -> Option<(Tap, Carrier, pool::RefillDue)> {
        let (pooled, due) = self.pool.take(&network.config.name, network.bridge.index)?;
        // A TAP back from a client ([`recycle`]): that client's close may yet be reported.
        let held_carrier = if pooled.recycled {
            Carrier::MaybeStale
        } else {
            Carrier::Current
        };
        let (handed, carrier) = match pooled.held {
            Some(fd) => {
                let tap = Tap::held(pooled.name.clone(), pooled.index, fd);
                let drained = tap.drain().map(|stale| {
                    if stale > 0 {
                        debug!(interface = %tap.name(), stale, "drained frames queued in the pool");
                    }
                    tap
                });
                (drained, held_carrier)
            }
            None => (Tap::attach(&pooled.name, pooled.index), Carrier::MaybeStale),
        };
        let handed = handed.and_then(|tap| {
            if let Some(owner) = owner {
                tap.give_to(owner)?;
            }
            Ok(tap)
        });
        match handed {
            Ok(tap) => Some((tap, carrier, due)),
            Err(e) => {
                // No use to anyone now: deleted (by the index it had in the pool, so never
                // another device); the acquire makes its own.
                warn!(network = %network.config.name, "cannot attach a pool TAP: {e}");
                let deleter = Arc::clone(&self.deleter);
                tokio::spawn(async move {
                    let _ = deleter.delete(&Link::tap(pooled.index, &pooled.name)).await;
                });
                None
            }
        }
    }

    /// Makes the TAP of an acquire the pool had none for: created for its client,
    /// guarded, plugged and persistent.
    async fn make_tap(
        &self,
        network: &LinuxNetwork,
        request: &AttachRequest,
        owner: tap::TapOwner,
        steps: &mut Steps,
    ) -> Result<Tap, BackendError> {
        let name = tap::tap_name(network.bridge.index, request.serial)?;
        let tap = Tap::create(&name, owner)?;
        steps.lap("tap");
        // On failure `tap` is dropped, and with its only fd the TAP goes away.
        if !network.config.allow_spoofing {
            // The TAP guard, unbound, before the TAP is up and on the bridge: nothing
            // passes until the binder binds it.
            self.firewall
                .guard_tap(tap.index())
                .await
                .map_err(|e| BackendError::component("firewall", e))?;
            steps.lap("guard");
        }
        self.plug(network, &tap, host_mac(request.mac)).await?;
        steps.lap("plug");
        // Every TAP is made persistent, only once plugged (a failure before leaves
        // nothing behind): one the client asked to be persistent stays until the client
        // leaves; any other is deleted by the broker when its last fd closes, in batches
        // ([`reap_closed_taps`]), instead of by the kernel in `close`, 20 ms each.
        if let Err(e) = tap.make_persistent() {
            self.release(network, &EndpointId(name.clone())).await.ok();
            return Err(e.into());
        }
        steps.lap("persist");
        Ok(tap)
    }

    /// Gives the new TAP its MAC, MTU, alias and bridge, and isolates it if asked.
    async fn plug(
        &self,
        network: &LinuxNetwork,
        tap: &Tap,
        mac: [u8; 6],
    ) -> Result<(), BackendError> {
        let alias = alias_for(&network.config.name);
        let enslave = || {
            bridge::enslave(
                &self.netlink,
                tap,
                mac,
                network.config.mtu,
                &alias,
                &network.bridge,
            )
        };
        // Full: ports of TAPs that closed and wait for the reaper may be what fills it
        // (their clients cycling fast). Those are deleted now and the plug tried again
        // (a batch under way when asked may have missed the last to close, hence a few
        // tries); a bridge full of TAPs in use still refuses.
        let full = |e: std::io::Error| {
            BackendError::Exhausted(format!(
                "network {} has no free port: its bridge {} has {} ports, the kernel's \
                 most, and none of them is a closed TAP the broker could delete ({e})",
                network.config.name,
                network.bridge.name,
                crate::config::MAX_ENDPOINTS_PER_NETWORK
            ))
        };
        let mut tries = 0;
        loop {
            match enslave().await {
                Err(e) if netlink::errno_of(&e) == Some(libc::EXFULL) => {
                    if tries == 3 {
                        return Err(full(e));
                    }
                    tries += 1;
                    debug!(
                        network = %network.config.name,
                        "bridge full: deleting the TAPs that closed before trying again"
                    );
                    if !self.reap_now.ask(REAP_NOW_WAIT).await {
                        return Err(full(e));
                    }
                }
                other => break other?,
            }
        }
        if network.config.isolation {
            bridge::set_isolated(&self.netlink, tap).await?;
        }
        Ok(())
    }

    /// Deletes `links` together ([`Netlink::delete_many`]: one RCU grace period for all
    /// of them, not about 20 ms each).
    async fn remove_links(&self, links: &[&Link], errors: &mut Vec<BackendError>) {
        if let Err(e) = self.deleter.delete_many(links).await {
            errors.push(e.into());
        }
    }
}

/// The overlay peers of a definition (none without an overlay).
fn peers_of(config: &NetworkConfig) -> Vec<std::net::IpAddr> {
    config
        .vxlan
        .as_ref()
        .map(|v| v.peers.clone())
        .unwrap_or_default()
}

/// What the firewall is told about network `config` on `bridge`.
fn firewall_network(
    config: &NetworkConfig,
    bridge: &Link,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    ipv6_prefix: Option<Ipv6Net>,
) -> FirewallNetwork {
    FirewallNetwork {
        name: config.name.clone(),
        bridge: bridge.name.clone(),
        subnet,
        gateway,
        nat: config.mode == Mode::Shared,
        ipv6_prefix,
        nat66: config.nat66.unwrap_or(true),
        anti_spoofing: !config.allow_spoofing,
        dhcp: config.dhcp,
        isolation: config.isolation,
        tap_prefix: tap::tap_prefix(bridge.index),
        overlay: config.vxlan.as_ref().map(|v| firewall::OverlayGuard {
            port: vxlan::vxlan_name(&config.name),
            udp_port: v.port,
            vni: v.vni,
            peers: v.peers.clone(),
        }),
        forwards: config.port_forwarding_rules.clone(),
    }
}

/// TAP names and their guest MACs.
type Ports = Vec<(String, [u8; 6])>;

/// What the binder task does ([`bind_ports`]), in the order queued.
enum BinderJob {
    Bind(BindJob),
    /// Forget the bindings and dynamic forwards of TAP `tap` of `network`, whose client
    /// closed it, then say whether that worked: the TAP goes back to its pool
    /// ([`recycle`]). Queued behind the binding its acquire queued, so never undone by it.
    Forget {
        network: String,
        tap: String,
        done: tokio::sync::oneshot::Sender<bool>,
    },
}

/// A TAP waiting for its anti-spoofing binding.
struct BindJob {
    network: String,
    tap: String,
    mac: [u8; 6],
}

/// A binding queued for the binder once the acquire's reply has been sent
/// ([`Answering::until_sent`]): waking the binder wakes a thread, 40-60 µs here, which the
/// reply need not wait for.
struct QueuedBinding {
    binder: tokio::sync::mpsc::UnboundedSender<BinderJob>,
    job: Option<BindJob>,
}

impl Drop for QueuedBinding {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            // The binder lives as long as the backend, so the queue is always open.
            let _ = self.binder.send(BinderJob::Bind(job));
        }
    }
}

/// The address `mac` holds a current lease on, if any.
fn lease_of(leases: &[crate::dhcp::Lease], mac: [u8; 6]) -> Option<Ipv4Addr> {
    let now = std::time::SystemTime::now();
    leases
        .iter()
        .find(|l| l.mac == mac && l.expires > now)
        .map(|l| l.ip)
}

/// The host ports of `config`'s static forwards ([`portfwd::reserve`]).
fn static_host_ports(config: &NetworkConfig) -> Result<Vec<portfwd::HostPort>, BackendError> {
    config
        .port_forwarding_rules
        .iter()
        .map(|f| {
            let (_, target) = tokio::sync::watch::channel(Some(std::net::SocketAddr::new(
                f.internal_address,
                f.internal_port,
            )));
            portfwd::reserve(f.protocol, f.external_address, f.external_port, target)
                .map_err(port_error)
        })
        .collect()
}

fn port_error(e: portfwd::PortError) -> BackendError {
    match e {
        e @ portfwd::PortError::InUse { .. } => BackendError::PortInUse(e.to_string()),
        e => BackendError::component("port forward", e),
    }
}

/// The network a link of the broker belongs to, from its alias.
fn network_of(link: &Link) -> Option<&str> {
    link.alias.as_deref()?.strip_prefix(ALIAS_PREFIX)
}

/// What the binder task ([`bind_ports`]) works with.
struct Binder {
    firewall: Firewall,
    links: Arc<LinkRecord>,
    /// Bumped on every TAP departure, before it is handled.
    departed: tokio::sync::watch::Sender<u64>,
    forwards: Arc<DynamicForwards>,
    reapable: Reapable,
    /// Acquires under way: the binder waits for them to be answered first.
    attaching: Arc<Attaching>,
}

/// Keeps the firewall's TAP bindings, in the background, for as long as the backend
/// lives: binds new TAPs to their MACs and forgets those of TAPs that left (the link
/// record reports them as they go). Every departure also bumps `departed` first. Whatever is queued when it wakes is done together,
/// per network, in one `nft` transaction: a burst of a thousand acquires or closes costs
/// a handful of `nft` runs, not a thousand processes competing for the CPU.
async fn bind_ports(
    binder: Binder,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<BinderJob>,
    mut departures: Departures,
) {
    let Binder {
        firewall,
        links,
        departed,
        forwards,
        reapable,
        attaching,
    } = binder;
    loop {
        let mut to_bind: BTreeMap<String, Ports> = BTreeMap::new();
        let mut to_prune: BTreeSet<String> = BTreeSet::new();
        let mut gone_taps: Vec<String> = vec![];
        // TAPs going back to their pools, forgotten after this round's bindings (which
        // were queued before) as if they had gone.
        let mut to_forget: Vec<(String, String, tokio::sync::oneshot::Sender<bool>)> = vec![];
        let mut queue = |job: BinderJob| match job {
            BinderJob::Bind(j) => to_bind.entry(j.network).or_default().push((j.tap, j.mac)),
            BinderJob::Forget { network, tap, done } => to_forget.push((network, tap, done)),
        };
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => queue(job),
                None => return,
            },
            gone = departures.recv() => match gone {
                Some(link) => {
                    departed.send_modify(|n| *n = n.wrapping_add(1));
                    reapable.lock().expect("not poisoned").remove(&link.name);
                    if let Some(network) = network_of(&link) {
                        to_prune.insert(network.to_string());
                    }
                    gone_taps.push(link.name);
                }
                None => return,
            },
        }
        // An acquire queues its binding once its reply is sent ([`QueuedBinding`]), but
        // others may be under way: woken now, this task would run first on their thread
        // (tokio's LIFO slot) and put its map updates and netlink calls before their
        // replies. Until bound, the TAP passes nothing, so waiting only delays the
        // guest's first frame; and never by more than BIND_WAIT, so a stream of
        // acquires cannot starve the bindings.
        let _ = tokio::time::timeout(BIND_WAIT, attaching.idle()).await;
        while let Ok(job) = jobs.try_recv() {
            queue(job);
        }
        let recycled: Vec<String> = to_forget.iter().map(|(_, tap, _)| tap.clone()).collect();
        while let Ok(link) = departures.try_recv() {
            departed.send_modify(|n| *n = n.wrapping_add(1));
            reapable.lock().expect("not poisoned").remove(&link.name);
            if let Some(network) = network_of(&link) {
                to_prune.insert(network.to_string());
            }
            gone_taps.push(link.name);
        }
        // A dynamic forward goes with its TAP.
        let ended: Vec<(String, Protocol, u16)> = {
            let mut map = forwards.lock().expect("not poisoned");
            let keys: Vec<_> = map
                .iter()
                .filter(|(_, f)| gone_taps.contains(&f.tap) || recycled.contains(&f.tap))
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .inspect(|k| {
                    map.remove(k);
                })
                .collect()
        };
        for (network, protocol, port) in ended {
            info!(
                network,
                port,
                protocol = protocol.as_str(),
                "port forward ended: its TAP is gone"
            );
            end_forward(&firewall, &network, protocol, port).await;
        }
        for (network, ports) in &to_bind {
            bind_with_retries(&firewall, network, ports).await;
        }
        for (network, tap, done) in to_forget {
            let forgotten = firewall.forget_ports(&network, vec![tap.clone()]).await;
            if let Err(e) = &forgotten {
                warn!(
                    network,
                    tap,
                    "cannot forget a closed TAP's binding: {}",
                    crate::error::Chain(e)
                );
            }
            let _ = done.send(forgotten.is_ok());
        }
        // A TAP may have gone before its binding was made: its departure was then
        // handled before the binding existed. Such bindings are forgotten too.
        if !to_bind.is_empty()
            && let Ok(()) = links.sync().await
        {
            for (network, ports) in &to_bind {
                let alias = alias_for(network);
                let live = match links.live_taps_with_alias(&alias).await {
                    Ok(live) => live,
                    Err(_) => break,
                };
                if ports
                    .iter()
                    .any(|(tap, _)| !live.iter().any(|l| &l.name == tap))
                {
                    to_prune.insert(network.clone());
                }
            }
        }
        for network in to_prune {
            // Listed under the firewall's lock: a binding recorded before belongs to a
            // TAP the kernel had made before the listing, so one missing from it is gone.
            let alias = alias_for(&network);
            let links = Arc::clone(&links);
            let live = async move {
                let taps = links.live_taps_with_alias(&alias).await?;
                Ok(taps.into_iter().map(|l| l.name).collect())
            };
            // On failure (the record not synced) every binding stays: a stale binding
            // only matches frames of a TAP that no longer exists.
            if let Err(e) = firewall.prune_ports(&network, live).await {
                warn!(
                    network,
                    "cannot forget closed TAPs: {}",
                    crate::error::Chain(&e)
                );
            }
        }
    }
}

/// Deletes the broker's TAPs whose last fd closed, in batches, for as long as the backend
/// lives.
///
/// A TAP the kernel deletes itself when its last fd closes costs the process closing it
/// an RCU grace period (about 20 ms, inside `close`), one TAP after the other: a thousand
/// VMs leaving took 20 s. So the broker makes every TAP persistent before handing it out
/// (the client's `close` then only detaches it, well under a millisecond), learns from
/// the link record when a TAP loses its carrier (no fd left), and deletes whatever closed
/// meanwhile in one transaction ([`Netlink::delete_many`]), when no acquire is attaching
/// a TAP ([`REAP_QUIET`], [`REAP_MAX_DELAY`]); a pool TAP its pool takes back is not
/// deleted ([`recycle::Recycler::claim`]). Until then the TAP stays on
/// the bridge with nobody to read or write it, still bound to its MAC in the firewall; its
/// owner (and only its owner, [`tap::Tap::create`]) could attach it by name, which the
/// TAP's own client could equally have done by keeping the fd.
async fn reap_closed_taps(
    netlink: Arc<Netlink>,
    reapable: Reapable,
    reap_now: Arc<ReapNow>,
    attaching: Arc<Attaching>,
    recycler: Option<Arc<recycle::Recycler>>,
    mut losses: CarrierLosses,
) {
    let claim = |link: &Link| recycler.as_ref().is_some_and(|r| r.claim(link));
    // When the last deletion ended. Quiet counts only from then: while a deletion holds
    // the RTNL lock, acquires stop too (a client closing its TAP waits for the lock
    // inside `close`), which is no sign that none are coming; a deletion costs 15-30 ms
    // however few TAPs it takes.
    let mut deleted: Option<std::time::Instant> = None;
    loop {
        let first = tokio::select! {
            // A TAP that closed first: asked meanwhile, the batch below ends at once
            // (the wake's permit and the flag are still there).
            biased;
            first = losses.recv() => first,
            // Asked with nothing closed: nothing to delete.
            () = reap_now.wake.notified() => {
                if reap_now.take_asked() {
                    reap_now.batch_ended();
                }
                continue;
            }
        };
        let Some(first) = first else {
            return;
        };
        let mut closed = BTreeMap::new();
        let Some(first) = gather(&mut closed, &reapable, &claim, first) else {
            continue;
        };
        let since = tokio::time::Instant::now();
        let mut marked = BTreeSet::new();
        mark_closed(&netlink, &reapable, first, &mut marked).await;
        let why = loop {
            tokio::select! {
                () = tokio::time::sleep(REAP_GATHER) => {}
                () = reap_now.wake.notified() => {}
                // Each as it closes: marked one at a time between acquires, not 256 at
                // once in the batch.
                Some(link) = losses.recv() => {
                    if let Some(link) = gather(&mut closed, &reapable, &claim, link) {
                        mark_closed(&netlink, &reapable, link, &mut marked).await;
                    }
                }
            }
            while let Ok(link) = losses.try_recv() {
                if let Some(link) = gather(&mut closed, &reapable, &claim, link) {
                    mark_closed(&netlink, &reapable, link, &mut marked).await;
                }
            }
            let why = if reap_now.take_asked() {
                "a bridge is full"
            } else if closed.len() >= REAP_BATCH_MAX {
                "batch full"
            } else if attaching.quiet_for(REAP_QUIET)
                && deleted.is_none_or(|t| t.elapsed() >= REAP_QUIET)
            {
                "no acquire"
            } else if since.elapsed() >= REAP_MAX_DELAY {
                "longest wait"
            } else {
                continue;
            };
            break why;
        };
        reap(&netlink, &reapable, closed, &marked, why).await;
        deleted = Some(std::time::Instant::now());
        reap_now.batch_ended();
    }
}

/// Adds `link`, reported closed, to the batch `closed` if the broker is still to delete
/// it; returns it if it is new to the batch. The link record reports every event of a
/// TAP of the broker without carrier, not only the carrier's loss (coalesced events can
/// hide that): its move to the deletion group, and its going down while a batch deletes
/// it, are reported too. Counted, those filled the next batch with TAPs already deleted
/// (235 of its 256, back to back), so a batch of a handful of TAPs followed each full one
/// at once, its deletion (17-31 ms) in the next acquire's way.
///
/// A TAP its pool `claim`s goes back to that pool instead ([`recycle`]); only one not in
/// the batch already, which may be marked for deletion.
fn gather<'a>(
    closed: &'a mut BTreeMap<u32, Link>,
    reapable: &Reapable,
    claim: &impl Fn(&Link) -> bool,
    link: Link,
) -> Option<&'a Link> {
    if !reapable
        .lock()
        .expect("not poisoned")
        .contains_key(&link.name)
    {
        return None;
    }
    match closed.entry(link.index) {
        std::collections::btree_map::Entry::Vacant(_) if claim(&link) => None,
        std::collections::btree_map::Entry::Vacant(e) => Some(e.insert(link)),
        std::collections::btree_map::Entry::Occupied(_) => None,
    }
}

/// Moves `link`, a TAP that just closed, to the deletion group now if it is the broker's
/// to delete and surely closed ([`Carrier::Current`]); its batch then deletes it with
/// the rest. Marking is one `RTM_SETLINK` under the RTNL lock: done for a whole batch at
/// once, 256 of them stood between the pool's refill and the lock, and the acquires
/// waiting for that refill took 2-3 ms each (docs/benchmarks.md, warm acquire p99). A
/// TAP whose carrier may be stale is left to the batch, which asks the kernel first.
async fn mark_closed(
    netlink: &Netlink,
    reapable: &Reapable,
    link: &Link,
    marked: &mut BTreeSet<u32>,
) {
    let current = reapable.lock().expect("not poisoned").get(&link.name) == Some(&Carrier::Current);
    if !current || marked.contains(&link.index) {
        return;
    }
    match netlink.mark_for_deletion(link).await {
        Ok(true) => {
            marked.insert(link.index);
        }
        Ok(false) => {}
        // Tried again with the batch.
        Err(e) => debug!(interface = %link.name, "cannot mark a closed TAP for deletion yet: {e}"),
    }
}

/// Deletes the TAPs of `closed` that are the broker's to delete ([`reap_closed_taps`]);
/// those of `marked` are in the deletion group already ([`mark_closed`]).
async fn reap(
    netlink: &Netlink,
    reapable: &Reapable,
    closed: BTreeMap<u32, Link>,
    marked: &BTreeSet<u32>,
    why: &str,
) {
    // The names stay in `reapable` until the deletion is done: until the link record
    // has seen the TAPs go, `live_endpoints` must keep leaving them out, or a closed
    // TAP would count as a VM's again for a moment (its MAC "in use", a limit reached).
    let (due, stale): (Vec<Link>, bool) = {
        let reapable = reapable.lock().expect("not poisoned");
        let mut stale = false;
        let due = closed
            .into_values()
            .filter(|l| match reapable.get(&l.name) {
                Some(carrier) => {
                    stale |= *carrier == Carrier::MaybeStale;
                    true
                }
                None => false,
            })
            .collect();
        (due, stale)
    };
    // A closed pool TAP reported closed while it waited in the pool may have been
    // handed out since (its carrier is back): the kernel's word now decides. One
    // that is attached stays reapable, for when it really closes.
    let due = if stale {
        match netlink.links().await {
            Ok(now) => due
                .into_iter()
                .filter(|l| {
                    !now.iter()
                        .any(|n| n.index == l.index && n.carrier == Some(true))
                })
                .collect(),
            Err(e) => {
                warn!("cannot check closed pool TAPs, keeping them: {e}");
                return;
            }
        }
    } else {
        due
    };
    if due.is_empty() {
        return;
    }
    let (early, refs): (Vec<&Link>, Vec<&Link>) =
        due.iter().partition(|l| marked.contains(&l.index));
    let started = std::time::Instant::now();
    match netlink.delete_marked(&refs, early.len()).await {
        // The time says how long acquires may have waited for RTNL meanwhile.
        Ok(n) => debug!(
            taps = n,
            took_us = started.elapsed().as_micros() as u64,
            why,
            "deleted TAPs whose last fd closed"
        ),
        Err(e) => warn!(
            taps = due.len(),
            "cannot delete TAPs whose last fd closed: {}",
            crate::error::Chain(&e)
        ),
    }
    // Every later listing syncs the link record past this deletion first
    // ([`LinkRecord::sync`]), so the TAPs are gone from it by then.
    let mut reapable = reapable.lock().expect("not poisoned");
    for link in &due {
        reapable.remove(&link.name);
    }
}

/// Binds `ports` in the firewall, retrying after [`BIND_RETRY_DELAYS`].
async fn bind_with_retries(firewall: &Firewall, network: &str, ports: &[(String, [u8; 6])]) {
    let mut delays = BIND_RETRY_DELAYS.iter();
    let taps = || {
        ports
            .iter()
            .map(|(t, _)| t.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    loop {
        let e = match firewall.add_ports(network, ports).await {
            Ok(()) => return,
            // The network was removed meanwhile, and its TAPs with it.
            Err(e @ firewall::FirewallError::UnknownNetwork(_)) => {
                debug!(network, taps = taps(), "not binding TAPs: {e}");
                return;
            }
            Err(e) => e,
        };
        let Some(delay) = delays.next() else {
            error!(
                network,
                taps = taps(),
                "cannot bind TAPs to their MACs, giving up; their frames stay dropped: {}",
                crate::error::Chain(&e)
            );
            return;
        };
        warn!(
            network,
            taps = taps(),
            "cannot bind TAPs to their MACs, retrying in {delay:?}: {}",
            crate::error::Chain(&e)
        );
        tokio::time::sleep(*delay).await;
    }
}

impl Backend for LinuxBackend {
    type Network = LinuxNetwork;
    type Endpoint = TapEndpoint;

    async fn create(&self, config: &NetworkConfig) -> Result<LinuxNetwork, BackendError> {
        let mut steps = Steps::start();
        // The refills of the networks made before (four TAPs each, RTNL-bound) wait while
        // this one is made, as they do for an attach: back-to-back cold acquires would
        // otherwise compete with the previous network's refill for the RTNL lock and the
        // CPUs (its effect alone was not measured apart from this branch's other changes).
        let _creating = self.attaching.start();
        // Before anything is made: a field this backend cannot honour is never ignored.
        super::linux_support::check(config).map_err(|e| BackendError::component("config", e))?;
        // The static forwards' ports, before anything is made: a taken one fails the
        // creation with nothing to undo.
        let host_ports = static_host_ports(config)?;
        let bridge_name = bridge_name(&config.name);
        let alias = alias_for(&config.name);
        self.claim_bridge_name(&bridge_name, &alias).await?;
        steps.lap("claim");
        let mut config = config.clone();
        if let Some(overlay) = &config.vxlan {
            self.claim_vxlan_name(&config.name).await?;
            config.mtu = vxlan::network_mtu(&self.netlink, &config, overlay)
                .await
                .map_err(|e| BackendError::os("cannot choose the overlay's MTU", e))?;
        }
        let config = &config;
        let (ipv6_prefix, occupants) = self.prefix_and_occupants(config).await?;
        let (subnet, gateway) =
            self.reserve_subnet(config, &bridge_name, ipv6_prefix, occupants)?;
        let address = Ipv4Net::new(gateway, subnet.prefix_len()).expect("prefix of a subnet");
        let address6 =
            ipv6_prefix.map(|p| Ipv6Net::new(crate::ula::gateway_of(p), 64).expect("a /64"));
        steps.lap("subnet");
        let made = bridge::make(&self.netlink, config, &bridge_name, address, address6).await;
        steps.lap("bridge");
        let bridge = match made {
            Ok(link) => link,
            Err(e) => {
                self.release_subnet(&bridge_name);
                return Err(e);
            }
        };
        // The overlay before the firewall knows the network: its rules name the port, and
        // nothing arrives through it before they exist as the bridge has no rules either.
        let overlay = match &config.vxlan {
            None => None,
            Some(overlay) => {
                match vxlan::make(&self.netlink, config, overlay, &bridge, config.mtu).await {
                    Ok(link) => Some(link),
                    Err(e) => {
                        let mut errors = vec![];
                        self.remove_links(&[&bridge], &mut errors).await;
                        self.release_subnet(&bridge_name);
                        return Err(BackendError::os("cannot make the network's overlay", e));
                    }
                }
            }
        };
        // Firewall first, so no frame is forwarded before its rules exist; then the
        // services, now that the bridge has its address.
        let services = match self
            .start_services(config, &bridge, subnet, gateway, ipv6_prefix, None)
            .await
        {
            Ok(services) => services,
            Err(e) => {
                let mut errors = vec![];
                let made: Vec<&Link> = overlay.iter().chain([&bridge]).collect();
                self.remove_links(&made, &mut errors).await;
                self.release_subnet(&bridge_name);
                for cleanup in errors {
                    warn!(
                        interface = %bridge_name,
                        "cannot remove half-made bridge: {}",
                        crate::error::chain(&cleanup)
                    );
                }
                return Err(e);
            }
        };
        steps.lap("services");
        self.start_pool(config, &bridge);
        steps.lap("pool");
        crate::log_steps!("create", config.name, steps);
        Ok(LinuxNetwork {
            peers: Mutex::new(peers_of(config)),
            config: config.clone(),
            bridge,
            overlay,
            subnet,
            gateway,
            ipv6_prefix,
            services: Mutex::new(Some(services)),
            host_ports: Mutex::new(host_ports),
        })
    }

    fn details(&self, network: &LinuxNetwork) -> NetworkDetails {
        NetworkDetails {
            subnet: network.subnet,
            gateway: network.gateway,
            ipv6_prefix: network.ipv6_prefix,
            mtu: network.config.mtu,
            platform: match (&network.overlay, &network.config.vxlan) {
                (Some(port), Some(vxlan)) => PlatformDetails::new()
                    .with(BRIDGE, network.bridge.name.clone())
                    .with(OVERLAY, format!("{} ({vxlan})", port.name)),
                _ => PlatformDetails::new().with(BRIDGE, network.bridge.name.clone()),
            },
        }
    }

    async fn attach(
        &self,
        network: &LinuxNetwork,
        request: &AttachRequest,
    ) -> Result<Attachment<TapEndpoint>, BackendError> {
        let mut steps = Steps::start();
        let mut attaching = self.attaching.start();
        // A TAP asked for as persistent is opened by name, so it is its client's; any
        // other stays the broker's ([`tap`]).
        let client = request.persistent.then_some(tap::TapOwner {
            uid: request.peer.uid,
            gid: request.peer.gid,
        });
        let owner = client.unwrap_or_else(tap::TapOwner::broker);
        // A ready TAP of the pool when there is one: already guarded, plugged and
        // persistent, and on an anti-spoofing network still open, so sending it is all
        // that is left.
        let mut pooled = self.take_pooled(network, client);
        if pooled.is_none() && self.pool.claim_refill(&network.config.name) {
            // The TAP a refill is making is nearer than one made now. Not attaching
            // meanwhile, or the refill's steps would wait for this acquire.
            let waiting = self.attaching.waiting();
            drop(attaching);
            self.pool
                .ready(&network.config.name, REFILL_CLAIM_WAIT)
                .await;
            attaching = self.attaching.start();
            drop(waiting);
            // Taken by another acquire first, or not made in time: made here after all.
            pooled = self.take_pooled(network, client);
            steps.lap("refill");
        }
        let (tap, carrier, refill) = match pooled {
            Some((tap, carrier, due)) => {
                steps.lap("pool");
                (tap, carrier, Some(due))
            }
            None => match self.make_tap(network, request, owner, &mut steps).await {
                Ok(tap) => (tap, Carrier::Current, None),
                // The bridge's last port may be the one a refill is plugging: that TAP,
                // once ready, is this acquire's.
                Err(e) if self.pool.enabled() => {
                    let waiting = self.attaching.waiting();
                    drop(attaching);
                    self.pool
                        .refilled(&network.config.name, Duration::from_secs(2))
                        .await;
                    attaching = self.attaching.start();
                    drop(waiting);
                    let (tap, carrier, due) = self.take_pooled(network, client).ok_or(e)?;
                    (tap, carrier, Some(due))
                }
                Err(e) => return Err(e),
            },
        };
        let name = tap.name().to_string();
        if !request.persistent {
            // Before the fd leaves: its carrier cannot go while the broker holds it.
            self.reapable
                .lock()
                .expect("not poisoned")
                .insert(name.clone(), carrier);
        }
        let mut queued = None;
        if !network.config.allow_spoofing || network.config.dhcp {
            // The TAP is already protected: the firewall drops every frame of an unbound
            // TAP of this network (with `allow_spoofing`, its DHCP client messages, which
            // the binding lets through for a bounded number of MACs). Binding it runs
            // `nft` (milliseconds), far less than a VMM needs to start a guest, so the
            // binder does it after the reply instead of every acquire waiting for it.
            queued = Some(QueuedBinding {
                binder: self.binder.clone(),
                job: Some(BindJob {
                    network: network.config.name.clone(),
                    tap: name.clone(),
                    mac: request.mac,
                }),
            });
        }
        steps.lap("queue");
        crate::log_steps!("attach", network.config.name, steps);
        let (name, fd) = tap.into_parts();
        Ok(Attachment {
            id: EndpointId(name.clone()),
            platform: PlatformDetails::new().with(INTERFACE, name.clone()),
            endpoint: TapEndpoint { name, fd },
            // The acquire counts as attaching until its reply is about to go: the pool's
            // refill and the reaper, which wait for no attach to be under way, run after
            // it instead of competing with it for the CPU and the RTNL lock.
            // The binder and the pool's refill are woken once the reply is sent.
            answering: Answering::hold(attaching).until_sent((queued, refill)),
        })
    }

    async fn release(
        &self,
        network: &LinuxNetwork,
        endpoint: &EndpointId,
    ) -> Result<(), BackendError> {
        let alias = alias_for(&network.config.name);
        match self.netlink.link_by_name(&endpoint.0).await? {
            // Only ever a TAP of this network: the name may have been reused meanwhile.
            Some(link) if link.alias.as_deref() == Some(alias.as_str()) => {
                self.deleter.delete(&link).await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn live_endpoints(
        &self,
        network: &LinuxNetwork,
    ) -> Result<BTreeSet<EndpointId>, BackendError> {
        let alias = alias_for(&network.config.name);
        let taps = self
            .links
            .live_ports_of(network.bridge.index, &alias)
            .await
            .map_err(|e| BackendError::component("link record", e))?;
        // A TAP whose last fd closed and that nobody asked to keep is gone for everyone
        // but the reaper, which deletes it within a second ([`reap_closed_taps`]): it
        // holds no VM, so it counts for no limit and shows in no listing.
        let closed = |l: &Link| {
            l.carrier == Some(false)
                && self
                    .reapable
                    .lock()
                    .expect("not poisoned")
                    .contains_key(&l.name)
        };
        // A closed pool TAP just handed out may still show the carrier it had in the pool
        // ([`Carrier::MaybeStale`]). Such TAPs are asked about now, in one dump, only
        // when there are any.
        let stale = |l: &Link| {
            self.reapable.lock().expect("not poisoned").get(&l.name) == Some(&Carrier::MaybeStale)
        };
        let attached: BTreeSet<u32> = if taps.iter().any(|l| closed(l) && stale(l)) {
            self.netlink
                .links()
                .await?
                .into_iter()
                .filter(|l| l.carrier == Some(true))
                .map(|l| l.index)
                .collect()
        } else {
            BTreeSet::new()
        };
        // Idle pool TAPs hold no VM either, and belong to no client ([`pool`]).
        Ok(taps
            .into_iter()
            .filter(|l| !closed(l) || attached.contains(&l.index))
            .filter(|l| !self.pool.is_idle(&network.config.name, &l.name))
            .map(|l| EndpointId(l.name))
            .collect())
    }

    fn endpoint_closed(
        &self,
        _network: &LinuxNetwork,
        fallback: std::time::Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        // Subscribed now: a departure from here on counts. Any link of the broker's
        // wakes it; the caller's listing tells whether one of this network's went.
        let mut departed = self.departed.subscribe();
        async move {
            tokio::select! {
                _ = departed.changed() => {}
                _ = tokio::time::sleep(fallback) => {}
            }
        }
    }

    async fn leases(&self, network: &LinuxNetwork) -> Result<Vec<LeaseView>, BackendError> {
        // A copy of the DHCP server's published leases; no kernel call under the lock.
        let leases = match &*network.services.lock().expect("not poisoned") {
            Some(services) => services.leases(),
            None => return Ok(Vec::new()),
        };
        let now = std::time::SystemTime::now();
        Ok(leases
            .iter()
            .filter(|l| l.expires > now)
            .map(|l| LeaseView {
                mac: l.mac,
                ipv4: l.ip,
                // What SLAAC gives the guest unless it uses privacy addresses.
                ipv6: network
                    .ipv6_prefix
                    .map(|p| crate::ula::eui64_address(p, l.mac)),
                hostname: l.hostname.clone(),
                expires: l.expires,
            })
            .collect())
    }

    async fn set_overlay_peers(
        &self,
        network: &LinuxNetwork,
        peers: &[std::net::IpAddr],
    ) -> Result<bool, BackendError> {
        let (Some(port), Some(_)) = (&network.overlay, &network.config.vxlan) else {
            return Ok(false);
        };
        let old = network.peers.lock().expect("not poisoned").clone();
        // The firewall first: a new peer's packets are taken before anything is sent to it.
        let mut config = network.config.clone();
        if let Some(v) = config.vxlan.as_mut() {
            v.peers = peers.to_vec();
        }
        let rules = firewall_network(
            &config,
            &network.bridge,
            network.subnet,
            network.gateway,
            network.ipv6_prefix,
        );
        self.firewall
            .add_network(&rules)
            .await
            .map_err(|e| BackendError::component("firewall", e))?;
        for peer in peers.iter().filter(|p| !old.contains(p)) {
            vxlan::add_peer(&self.netlink, port, *peer).await?;
        }
        for peer in old.iter().filter(|p| !peers.contains(p)) {
            vxlan::del_peer(&self.netlink, port, *peer).await?;
        }
        info!(network = %network.config.name, ?peers, "overlay peers applied");
        *network.peers.lock().expect("not poisoned") = peers.to_vec();
        Ok(true)
    }

    async fn forward(
        &self,
        network: &LinuxNetwork,
        r: &ForwardRequest,
    ) -> Result<Option<IpAddr>, BackendError> {
        let name = &network.config.name;
        let leases = match &*network.services.lock().expect("not poisoned") {
            Some(services) => services.lease_watch(),
            None => {
                return Err(BackendError::Vanished(format!(
                    "network {name:?} is being removed"
                )));
            }
        };
        let Some(mut leases) = leases else {
            return Err(BackendError::Unsupported(format!(
                "network {name:?} runs no DHCP server, so the broker does not know the guest's address; \
                 use a port_forwarding_rules entry in its file instead"
            )));
        };
        let alias = alias_for(name);
        let live = self
            .links
            .live_ports_of(network.bridge.index, &alias)
            .await
            .map_err(|e| BackendError::component("link record", e))?;
        // A pool TAP back from its client ([`recycle`]) is on the bridge, but no VM's.
        if !live.iter().any(|l| l.name == r.endpoint.0) || self.pool.is_idle(name, &r.endpoint.0) {
            return Err(BackendError::Vanished(format!(
                "interface {} is not on network {name:?} any more",
                r.endpoint
            )));
        }
        let (target, target_rx) = tokio::sync::watch::channel(None);
        let host =
            portfwd::reserve(r.protocol, None, r.external_port, target_rx).map_err(port_error)?;
        let key = forward_key(r.protocol, r.external_port);
        let rule = |ip: Option<Ipv4Addr>| {
            ip.map(|ip| PortForward {
                protocol: r.protocol,
                external_port: r.external_port,
                internal_address: IpAddr::V4(ip),
                internal_port: r.internal_port,
                external_address: None,
            })
        };
        let current = lease_of(&leases.borrow_and_update(), r.mac);
        // Over IPv6 the guest's address is known at once: the EUI-64 address in the
        // network's prefix, the one SLAAC gives it and DNS publishes (a guest numbering
        // itself otherwise, e.g. with privacy addresses, is reached over IPv4 only).
        let eui64 = network
            .ipv6_prefix
            .map(|p| crate::ula::eui64_address(p, r.mac));
        let fail = |e| BackendError::component("firewall", e);
        if let Some(ip6) = eui64 {
            let rule6 = PortForward {
                protocol: r.protocol,
                external_port: r.external_port,
                internal_address: IpAddr::V6(ip6),
                internal_port: r.internal_port,
                external_address: None,
            };
            self.firewall
                .set_forward(
                    name,
                    &forward_key6(r.protocol, r.external_port),
                    Some(rule6),
                )
                .await
                .map_err(fail)?;
        }
        // The rule is in place before the client hears of it, when the guest has its
        // address already; otherwise the follower adds it when the lease comes.
        if current.is_some()
            && let Err(e) = self.firewall.set_forward(name, &key, rule(current)).await
        {
            end_forward(&self.firewall, name, r.protocol, r.external_port).await;
            return Err(fail(e));
        }
        target.send_replace(relay_target(current, eui64, r.internal_port));
        let follower = {
            let (firewall, name, key, r) =
                (self.firewall.clone(), name.clone(), key.clone(), r.clone());
            tokio::spawn(async move {
                let mut last = current;
                loop {
                    if leases.changed().await.is_err() {
                        return;
                    }
                    let ip = lease_of(&leases.borrow_and_update(), r.mac);
                    if ip == last {
                        continue;
                    }
                    last = ip;
                    target.send_replace(relay_target(ip, eui64, r.internal_port));
                    let rule = ip.map(|ip| PortForward {
                        protocol: r.protocol,
                        external_port: r.external_port,
                        internal_address: IpAddr::V4(ip),
                        internal_port: r.internal_port,
                        external_address: None,
                    });
                    info!(network = %name, port = r.external_port, address = ?ip, "port forward follows the guest's lease");
                    if let Err(e) = firewall.set_forward(&name, &key, rule).await {
                        warn!(network = %name, "cannot update a port forward: {}", crate::error::Chain(&e));
                    }
                }
            })
        };
        let forward = DynamicForward {
            tap: r.endpoint.0.clone(),
            _host: host,
            follower,
        };
        // Checked again as it is recorded: a TAP going back to its pool ([`recycle`]) once
        // its forwards were ended would otherwise keep this one for its next client (who
        // cannot acquire it meanwhile: the registry holds the network's lock for a
        // forward). Recorded before that point, the binder ends it with the others.
        let refused = {
            let mut forwards = self.forwards.lock().expect("not poisoned");
            if self.pool.is_idle(name, &r.endpoint.0) {
                Some(forward)
            } else {
                forwards.insert((name.clone(), r.protocol, r.external_port), forward);
                None
            }
        };
        if let Some(forward) = refused {
            drop(forward);
            end_forward(&self.firewall, name, r.protocol, r.external_port).await;
            return Err(BackendError::Vanished(format!(
                "interface {} is not on network {name:?} any more",
                r.endpoint
            )));
        }
        info!(network = %name, protocol = r.protocol.as_str(), port = r.external_port,
              interface = %r.endpoint, address = ?current, "port forward added");
        Ok(current.map(IpAddr::V4))
    }

    async fn unforward(
        &self,
        network: &LinuxNetwork,
        protocol: Protocol,
        external_port: u16,
        endpoint: &EndpointId,
    ) -> Result<(), BackendError> {
        let name = &network.config.name;
        let removed = {
            let mut forwards = self.forwards.lock().expect("not poisoned");
            let key = (name.clone(), protocol, external_port);
            match forwards.get(&key) {
                Some(f) if f.tap == endpoint.0 => forwards.remove(&key),
                _ => None,
            }
        };
        if removed.is_some() {
            drop(removed);
            end_forward(&self.firewall, name, protocol, external_port).await;
            info!(network = %name, protocol = protocol.as_str(), port = external_port, "port forward removed");
        }
        Ok(())
    }

    async fn destroy(&self, network: &LinuxNetwork) -> Result<(), BackendError> {
        let LinuxNetwork {
            config,
            bridge,
            overlay,
            services,
            ..
        } = network;
        // No more pool TAPs: those made go with the network's other TAPs below, and a
        // refill finishing later deletes its own.
        self.pool.remove(&config.name);
        // Stop serving before the bridge goes away.
        let services = services.lock().expect("not poisoned").take();
        network.host_ports.lock().expect("not poisoned").clear();
        // The dynamic forwards' rules go with the network's chains below.
        self.forwards
            .lock()
            .expect("not poisoned")
            .retain(|(n, _, _), _| n != &config.name);
        if let Some(services) = services {
            services.stop().await;
        }
        let mut errors = vec![];
        if let Err(e) = self.firewall.remove_network(&config.name).await {
            errors.push(BackendError::component("firewall", e));
        }
        let alias = alias_for(&config.name);
        // A TAP a VM still holds would outlive the bridge; the network only goes away
        // when no client holds it, so any TAP left is orphaned. Found by alias, not as
        // a port, so TAPs of a bridge someone deleted under us go too.
        match self.netlink.links().await {
            Ok(links) => {
                let taps: Vec<&Link> = links
                    .iter()
                    .filter(|l| l.alias.as_deref() == Some(&alias) && l.index != bridge.index)
                    .collect();
                self.remove_links(&taps, &mut errors).await;
            }
            Err(e) => errors.push(e.into()),
        }
        // The overlay port first, so no frame of other hosts reaches a bridge going away.
        if let Some(port) = overlay {
            match self.netlink.link_by_index(port.index).await {
                Ok(Some(link)) if link.name == port.name => {
                    self.remove_links(&[&link], &mut errors).await;
                }
                Ok(_) => {}
                Err(e) => errors.push(e.into()),
            }
        }
        // Delete by index only while the name still matches: never someone else's link.
        match self.netlink.link_by_index(bridge.index).await {
            Ok(Some(link)) if link.name == bridge.name => {
                self.remove_links(&[&link], &mut errors).await;
            }
            Ok(_) => {}
            Err(e) => errors.push(e.into()),
        }
        self.release_subnet(&bridge.name);
        BackendError::all(errors)
    }

    async fn adopt(&self, record: &NetworkRecord) -> Result<LinuxNetwork, BackendError> {
        let config = &record.config;
        let bridge_name = bridge_name(&config.name);
        let alias = alias_for(&config.name);
        let bridge = match self.netlink.link_by_name(&bridge_name).await? {
            Some(link) if link.is_bridge && link.alias.as_deref() == Some(alias.as_str()) => link,
            Some(_) => {
                return Err(BackendError::Conflict(format!(
                    "interface {bridge_name} is not the network's bridge any more"
                )));
            }
            None => {
                return Err(BackendError::Vanished(format!(
                    "bridge {bridge_name} is gone"
                )));
            }
        };
        let ipv6_prefix = self.ipv6_prefix_for(config).await?;
        {
            let mut held = self.held.lock().expect("not poisoned");
            if held.contains_key(&bridge_name) {
                return Err(BackendError::Conflict(format!(
                    "bridge {bridge_name} is already in use by an active network"
                )));
            }
            held.insert(
                bridge_name.clone(),
                (config.name.clone(), record.subnet, ipv6_prefix),
            );
        }
        let mut config = config.clone();
        let overlay = match self.adopt_overlay(&mut config, &bridge).await {
            Ok(overlay) => overlay,
            Err(e) => {
                self.release_subnet(&bridge_name);
                return Err(e);
            }
        };
        let config = &config;
        // A bridge made before the broker had IPv6 gets its addresses now.
        if let Some(p) = ipv6_prefix {
            let address6 = Ipv6Net::new(crate::ula::gateway_of(p), 64).expect("a /64");
            if let Err(e) = bridge::add_ipv6(&self.netlink, &bridge, address6).await {
                self.release_subnet(&bridge_name);
                return Err(e.into());
            }
        }
        // The TAPs of the record still on the bridge, with their guest MACs. A listing
        // that fails binds none now; the binder binds them below, as for a new TAP.
        let mut live = self
            .links
            .live_ports_of(bridge.index, &alias)
            .await
            .map_err(|e| {
                warn!(
                    network = %config.name,
                    "cannot list the adopted network's TAPs to bind them: {}",
                    crate::error::Chain(&e)
                )
            })
            .ok();
        // The previous broker made every TAP persistent: those not asked to be and
        // closed meanwhile (no carrier) are deleted now, before anyone counts them as
        // held; the others are deleted once closed, as this broker's own.
        if let Some(live) = &mut live {
            let mut closed = Vec::new();
            {
                let mut reapable = self.reapable.lock().expect("not poisoned");
                for ep in record.endpoints.iter().filter(|e| !e.persistent) {
                    if let Some(link) = live.iter().find(|l| l.name == ep.id) {
                        if link.carrier == Some(false) {
                            closed.push(link.clone());
                        } else {
                            reapable.insert(link.name.clone(), Carrier::Current);
                        }
                    }
                }
            }
            // A TAP in no record was never handed out (an acquire's reply waits for the
            // record): the previous broker's idle pool TAPs ([`pool`]), or a TAP made
            // by an acquire it died in. Without an fd it holds no VM: deleted too.
            closed.extend(
                live.iter()
                    .filter(|l| l.carrier == Some(false))
                    .filter(|l| !record.endpoints.iter().any(|ep| ep.id == l.name))
                    .cloned(),
            );
            live.retain(|l| !closed.iter().any(|c| c.index == l.index));
            let refs: Vec<&Link> = closed.iter().collect();
            if let Err(e) = self.deleter.delete_many(&refs).await {
                warn!(
                    network = %config.name,
                    "cannot delete the adopted network's closed TAPs: {}",
                    crate::error::Chain(&e)
                );
            }
        }
        let ports: Ports = record
            .endpoints
            .iter()
            .filter(|ep| {
                live.as_ref()
                    .is_some_and(|l| l.iter().any(|link| link.name == ep.id))
            })
            .map(|ep| (ep.id.clone(), ep.mac.into()))
            .collect();
        // The same rules, DHCP (its leases are in the state directory) and DNS names as
        // before: the firewall replaces the network's chains with identical ones, bound
        // to the live TAPs and leased addresses in the same transaction.
        let services = match self
            .start_services(
                config,
                &bridge,
                record.subnet,
                record.gateway,
                ipv6_prefix,
                Some(&ports),
            )
            .await
        {
            Ok(services) => services,
            Err(e) => {
                self.release_subnet(&bridge_name);
                return Err(e);
            }
        };
        // Without a listing, every recorded TAP is queued: the binder forgets those
        // that are gone.
        if live.is_none() && !config.allow_spoofing {
            for ep in &record.endpoints {
                let _ = self.binder.send(BinderJob::Bind(BindJob {
                    network: config.name.clone(),
                    tap: ep.id.clone(),
                    mac: ep.mac.into(),
                }));
            }
        }
        // The previous broker's sockets died with it, so the ports are normally free; one
        // taken meanwhile leaves its forward without a loopback relay (the rules stand).
        let host_ports = match static_host_ports(config) {
            Ok(h) => h,
            Err(e) => {
                warn!(network = %config.name, "static port forwards: {}", crate::error::chain(&e));
                vec![]
            }
        };
        self.start_pool(config, &bridge);
        info!(network = %config.name, interface = %bridge_name, "adopted bridge");
        Ok(LinuxNetwork {
            peers: Mutex::new(peers_of(config)),
            config: config.clone(),
            bridge,
            overlay,
            subnet: record.subnet,
            gateway: record.gateway,
            ipv6_prefix,
            services: Mutex::new(Some(services)),
            host_ports: Mutex::new(host_ports),
        })
    }

    async fn remove_stale(&self) -> Result<(), BackendError> {
        // The previous broker's networks are adopted by now, and with them the TAP guard
        // it left on their TAPs, if any; nothing is served yet: the guard is loaded now
        // (or found adopted), instead of in the acquire of the first TAP that needs it.
        self.firewall.load_guard().await;
        let links = self.netlink.links().await?;
        let mut errors = vec![];
        if let Err(e) = self.firewall.remove_stale().await {
            errors.push(BackendError::component("firewall", e));
        }
        // Only what no network of this broker holds: normally all of it, as this runs
        // before the first network is made.
        let live: Vec<u32> = links
            .iter()
            .filter(|l| self.holds(&l.name))
            .map(|l| l.index)
            .collect();
        // TAPs (and overlay ports) first, so no bridge is deleted while still carrying
        // our ports.
        let (bridges, others): (Vec<Link>, Vec<Link>) = links
            .into_iter()
            .filter(|l| {
                l.alias.as_deref().is_some_and(|a| {
                    a.starts_with(ALIAS_PREFIX) || a.starts_with(vxlan::OVERLAY_ALIAS_PREFIX)
                })
            })
            .filter(|l| !live.contains(&l.index))
            .filter(|l| l.controller.is_none_or(|c| !live.contains(&c)))
            .partition(|l| l.is_bridge);
        for group in [others, bridges] {
            let links: Vec<&Link> = group.iter().collect();
            let before = errors.len();
            self.remove_links(&links, &mut errors).await;
            if errors.len() == before {
                for link in links {
                    let alias = link.alias.as_deref().unwrap_or_default();
                    info!(interface = %link.name, alias, "removed stale interface");
                }
            }
        }
        BackendError::all(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_side_mac_starts_with_fe() {
        assert_eq!(host_mac([0x52, 0x54, 0, 1, 2, 3]), [0xfe, 0x54, 0, 1, 2, 3]);
    }

    /// `quiet` waits while an attach is under way, and then for the period after the
    /// last one ended (lower bounds only: a busy machine may take longer).
    #[tokio::test]
    async fn quiet_waits_for_the_period_after_the_last_attach() {
        let attaching = Arc::new(Attaching::default());
        let guard = attaching.start();
        let period = Duration::from_millis(30);
        let waited = tokio::spawn({
            let attaching = Arc::clone(&attaching);
            async move {
                attaching.quiet(period).await;
                std::time::Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waited.is_finished(),
            "returned while an attach was under way"
        );
        // Read before the drop, which records the end: `quiet` returns `period` after that.
        let ended = std::time::Instant::now();
        drop(guard);
        let returned = waited.await.unwrap();
        assert!(returned.duration_since(ended) >= period);
        // Long quiet already: at once.
        let t = std::time::Instant::now();
        attaching.quiet(Duration::ZERO).await;
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// A closed TAP counts once in a batch, and not at all once deleted (no longer
    /// reapable), however often the link record reports it.
    #[test]
    fn a_batch_counts_each_closed_tap_once_and_none_already_deleted() {
        let reapable = Reapable::default();
        let insert = |name: &str| {
            reapable
                .lock()
                .unwrap()
                .insert(name.to_string(), Carrier::Current)
        };
        insert("vmnt1-1");
        insert("vmnt1-2");
        let mut closed = BTreeMap::new();
        assert!(gather(&mut closed, &reapable, &|_| false, Link::tap(11, "vmnt1-1")).is_some());
        // Reported again (moved to the deletion group): not new.
        assert!(gather(&mut closed, &reapable, &|_| false, Link::tap(11, "vmnt1-1")).is_none());
        // Not the broker's to delete (a persistent TAP, another's link).
        assert!(gather(&mut closed, &reapable, &|_| false, Link::tap(13, "vmnt1-3")).is_none());
        assert!(gather(&mut closed, &reapable, &|_| false, Link::tap(12, "vmnt1-2")).is_some());
        assert_eq!(closed.keys().copied().collect::<Vec<_>>(), [11, 12]);
        // The batch deleted them; their going down is reported to the next one.
        reapable.lock().unwrap().clear();
        let mut next = BTreeMap::new();
        assert!(gather(&mut next, &reapable, &|_| false, Link::tap(11, "vmnt1-1")).is_none());
        assert!(next.is_empty());
    }

    /// An acquire waiting for a refill's TAP is no attach (the refill's steps go on), but
    /// the reaper's quiet waits for it, and for the period after it: it may be waiting
    /// behind the reaper's own deletion.
    #[tokio::test]
    async fn an_acquire_waiting_for_a_refill_keeps_the_reaper_from_quiet() {
        let attaching = Arc::new(Attaching::default());
        assert!(attaching.quiet_for(Duration::ZERO));
        let waiting = attaching.waiting();
        tokio::time::timeout(Duration::from_secs(5), attaching.idle())
            .await
            .expect("a waiting acquire is no attach: the refill goes on");
        assert!(
            !attaching.quiet_for(Duration::ZERO),
            "quiet while one waits"
        );
        drop(waiting);
        assert!(attaching.quiet_for(Duration::ZERO));
        assert!(
            !attaching.quiet_for(Duration::from_secs(3600)),
            "its end starts the quiet period"
        );
    }
}
