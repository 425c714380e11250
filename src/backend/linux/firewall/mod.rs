//! The broker's firewall: NAT and forwarding for shared networks, forwarding isolation
//! for host networks, per-frame anti-spoofing of TAPs, and recovery after someone flushes
//! the ruleset.
//!
//! Anti-spoofing networks (the default) are checked per frame by the TAP guard, a BPF
//! program at TC of each TAP (`guard.rs`, `bpf/tap_guard.c`), whose bindings this module
//! keeps. Everything else lives in two broker-owned nftables tables, `inet vmnet_broker`
//! (forward + NAT) and `bridge vmnet_broker` (what TAPs of `allow_spoofing` networks may
//! send: server roles and the DHCP MAC quota), so that we never
//! edit anybody else's rules, with one documented exception: Docker's `DOCKER-USER` chain
//! (`docker.rs`). In the inet table each network gets its own *base* chains (one per hook);
//! several base chains on one hook are evaluated one after the other, an `accept` in one of
//! them lets the packet continue to the next, a `drop` is final. In the bridge table, where
//! every frame of every bridge passes, one prerouting base chain (only while an
//! `allow_spoofing` network exists) dispatches by TAP name prefix to each network's
//! regular chain, so a frame's cost does not grow with the number of networks.
//! Adding and removing a network is a matter of adding and deleting named objects and
//! rewriting whole chains (`flush` + `add` in one transaction); no rule handles have to be
//! tracked.
//!
//! The desired state (networks, ports, IP bindings) is kept in memory, which is what lets
//! the watchdog (`watchdog.rs`) re-create everything after `nft flush ruleset`.
//!
//! Modules: this one holds the API and the state; `rules.rs` builds the nftables objects
//! (pure); `guard.rs` loads, attaches and binds the TAP guard; `netlink.rs` compiles batches to nf_tables netlink messages and applies them
//! (no process); `nft.rs` applies a batch through it, or runs the `nft` executable with a
//! deadline for what netlink cannot say (docs/design.md lists where); `docker.rs` handles Docker's
//! `FORWARD` drop; `watchdog.rs` restores flushed tables.
//!
//! # Concurrency: no lock waits on the kernel
//!
//! Two things are serialized, separately:
//!
//! - **The state** (`Inner::state`, a plain mutex) is only ever locked to read it, compute a
//!   batch, or commit a change that was applied; never across an `await`, so never across
//!   an `nft` child or a netlink dump.
//! - **Kernel changes** go through one FIFO *apply queue* per firewall: every API call
//!   (and every watchdog check) becomes a job, queued when the call's future is first
//!   polled (so calls awaited in turn, or joined, queue in call order), and one task runs
//!   the jobs one after the other. A job reads the state, builds its batch,
//!   runs `nft`, and commits to the state only what the kernel accepted.
//!
//! Why this is ordering-correct: the queue is the only writer of both the kernel tables
//! and the state, and jobs run in call order, each against the state all earlier jobs
//! left. A removal queued after an add therefore always runs after it; an add that reaches
//! the head after its network was removed finds no network and fails with
//! [`FirewallError::UnknownNetwork`] rather than re-creating anything. Batches are built
//! when the job runs, never earlier, so no stale batch can overtake a newer one.
//!
//! Why nothing waits forever: every `nft` run has a deadline ([`NFT_TIMEOUT`], see
//! [`Firewall::with_nft_program_and_timeout`]); a child that misses it is killed and the
//! job fails with [`FirewallError::NftTimeout`] naming the operation, so the queue moves
//! on. A job makes a bounded number of runs, so the wait for any call is bounded by the
//! jobs ahead of it. A caller may stop waiting (the DHCP server sends its ACK after
//! [`crate::dhcp::BIND_TIMEOUT`] whatever happens) without cancelling anything: the job
//! still runs, so a lease binding whose ACK went out lands as soon as `nft` answers again.
//! Kernel changes are serialized across all networks because they edit the same two
//! tables; a transaction takes milliseconds.

mod docker;
pub mod guard;
mod netlink;
mod nft;
mod overlay;
mod rules;
mod watchdog;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use ipnet::{Ipv4Net, Ipv6Net};
use nftables::batch::Batch;
use nftables::schema::{NfListObject, NfObject};
use nftables::types::NfFamily;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::config::PortForward;
use crate::mac::Mac;

use guard::{Binding, Guard, GuardError};
pub use nft::NFT_TIMEOUT;
pub use rules::DHCP_MACS_PER_TAP;
pub use rules::ruleset_for;
use rules::{
    add_tables, delete_dhcp_macs_script, delete_network_objects, delete_tables, dhcp_quota_script,
    dispatch_flush, dispatch_rule, forward_chains, network_objects, purge_network_objects,
    script_safe,
};
pub use watchdog::WATCHDOG_INTERVAL;

/// Name of both broker-owned tables (one `inet`, one `bridge`).
pub const TABLE: &str = "vmnet_broker";
/// Prefix of the comment tagging the rules we insert into Docker's `DOCKER-USER` chain;
/// the network name follows.
pub const DOCKER_COMMENT_PREFIX: &str = "vmnet-broker:";

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// IPv6 forwarding of every interface of the namespace (the kernel forwards IPv6 only
/// when `all` says so).
const IP6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// What the firewall needs to know about one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallNetwork {
    pub name: String,
    /// Kernel bridge device of the network.
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Mode shared: masquerade and forward to the outside. Mode host: no forwarding at all.
    pub nat: bool,
    /// The network's IPv6 /64 (the gateway is its `::1`), `None` for a network without
    /// IPv6. Forwarding follows `nat` as for IPv4.
    pub ipv6_prefix: Option<Ipv6Net>,
    /// With `nat`: IPv6 from the prefix is masqueraded too (NAT66); without, it is routed
    /// as is (the prefix must then be routed to this host upstream).
    pub nat66: bool,
    /// `!allow_spoofing`: bind each TAP to its guest's MAC (and IPv4 lease, see `dhcp`).
    pub anti_spoofing: bool,
    /// The broker runs DHCP on this network: IPv4 sources are bound to the lease given by
    /// [`Firewall::bind_ip`]; before it only DHCP to the gateway and ARP probes pass, and
    /// DHCP requests must name the TAP's MAC as client. Without DHCP guests use static
    /// addresses and only their MAC is enforced.
    pub dhcp: bool,
    /// Ports are isolated from each other (`isolation`): nothing may be routed from the
    /// bridge back into it either.
    pub isolation: bool,
    /// Every TAP the broker makes for this network has a name starting with this. With
    /// anti-spoofing, frames from such a TAP are dropped until [`Firewall::add_port`] has
    /// bound it: a TAP is protected from the moment it exists, so binding it need not
    /// delay the acquire. Ports without the prefix (uplinks, other software's) are left
    /// alone.
    pub tap_prefix: String,
    /// The static port forwards of the network's definition (`port_forwarding_rules`);
    /// dynamic ones come and go with [`Firewall::set_forward`].
    pub forwards: Vec<PortForward>,
    /// The network's overlay, when it spans hosts (`overlay.rs`).
    pub overlay: Option<OverlayGuard>,
}

/// What the firewall keeps of a network's overlay: what arrives through its VXLAN port
/// never reaches this host's DHCP and DNS, and only its peers may send it VXLAN packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayGuard {
    /// The VXLAN device, a port of the network's bridge.
    pub port: String,
    /// The UDP port and VNI of the overlay.
    pub udp_port: u16,
    pub vni: u32,
    /// The other hosts; empty with a multicast group, whose members are not known.
    pub peers: Vec<std::net::IpAddr>,
}

/// Everything the firewall can fail with. Causes are kept as [`std::error::Error::source`]s,
/// not flattened into the message: log with [`crate::error::Chain`].
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("nft not found: install nftables (needed for NAT and anti-spoofing)")]
    NftNotFound,
    #[error("cannot list the TAPs of network {network:?}")]
    ListTaps {
        network: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listing the TAPs of network {network:?} took over {after:?}")]
    ListTapsTimeout { network: String, after: Duration },
    #[error("could not run nft while {context}")]
    NftSpawn {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft failed while {context}: {stderr}")]
    Nft { context: String, stderr: String },
    #[error("nft did not finish within {after:?} while {context}, and was killed")]
    NftTimeout { context: String, after: Duration },
    #[error("could not understand nft output while {context}")]
    NftOutput {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("nf_tables netlink cannot express {object} ({detail})")]
    NetlinkUntranslatable { object: String, detail: String },
    #[error("the kernel refused {object} while {context}")]
    Netlink {
        context: String,
        object: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nf_tables netlink socket failed while {context}")]
    NetlinkSocket {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel did not acknowledge the nf_tables batch within {after:?} while {context}")]
    NetlinkTimeout { context: String, after: Duration },
    #[error("firewall: unknown network {0:?}")]
    UnknownNetwork(String),
    #[error("firewall: invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("could not enable IPv4 forwarding ({IP_FORWARD})")]
    IpForward(#[source] std::io::Error),
    #[error("the TAP guard failed")]
    Guard(#[from] GuardError),
    #[error("could not enable IPv6 forwarding ({IP6_FORWARD})")]
    Ip6Forward(#[source] std::io::Error),
    #[error(
        "firewall: the operation was abandoned: the apply queue stopped (its runtime shut down) or the operation panicked"
    )]
    QueueStopped,
}

#[derive(Debug)]
pub(super) struct NetState {
    net: FirewallNetwork,
    /// TAP name -> guest MAC.
    ports: BTreeMap<String, [u8; 6]>,
    /// Guest MAC -> leased IPv4 address.
    leases: BTreeMap<[u8; 6], Ipv4Addr>,
    /// Dynamic port forwards, by the key their owner gave ([`Firewall::set_forward`]).
    dynamic: BTreeMap<String, PortForward>,
    /// TAP name -> interface index, for the TAP guard's bindings (anti-spoofing only).
    ifindex: BTreeMap<String, u32>,
    /// The bridge's (ifindex, MTU), for the guest-to-guest fast path of the TAP guard:
    /// only for anti-spoofing networks without `isolation` whose bridge exists.
    fast_path: Option<(u32, u32)>,
    /// The ifindex of the network's VXLAN port while it has the overlay fast path
    /// ([`Inner::guard_overlay`]): bound in the TAP guard, unbound with the network.
    overlay_port: Option<u32>,
}

impl NetState {
    /// Every port forward of the network: the definition's, then the dynamic ones.
    fn forwards(&self) -> impl Iterator<Item = &PortForward> {
        self.net.forwards.iter().chain(self.dynamic.values())
    }

    /// The TAP guard's binding of a TAP bound to `mac`: with the network's IPv6 /64, so
    /// the guest's SLAAC (EUI-64) address in it passes too.
    fn binding(&self, mac: [u8; 6]) -> Binding {
        let mut b = Binding::new(
            mac,
            self.net.dhcp,
            self.leases.get(&mac).copied(),
            self.net.gateway,
        );
        if let Some(p6) = self.net.ipv6_prefix {
            b.prefix6.copy_from_slice(&p6.network().octets()[..8]);
        }
        match self.fast_path {
            Some((bridge, mtu)) => b.with_fast_path(bridge, mtu),
            None => b,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    networks: BTreeMap<String, NetState>,
}

/// One queued operation: runs on the queue's task with the firewall, replies on its own.
type Job = Box<dyn FnOnce(Arc<Inner>) -> BoxFuture<'static, ()> + Send>;

struct Inner {
    nft: nft::Nft,
    /// The desired state. Locked only briefly, never across an `await` (see the module
    /// doc); written only by jobs of the apply queue.
    state: Mutex<State>,
    /// The apply queue, started by the first call (which runs inside a tokio runtime).
    queue: OnceLock<mpsc::UnboundedSender<Job>>,
    /// The TAP guard, loaded (or adopted from a TAP a previous broker left) on first use:
    /// the daemon's, at startup ([`Firewall::load_guard`]).
    guard: tokio::sync::OnceCell<Arc<Guard>>,
}

/// The broker's firewall. One per broker process; cheap to clone (all clones share state).
#[derive(Clone)]
pub struct Firewall {
    inner: Arc<Inner>,
}

impl Default for Firewall {
    fn default() -> Self {
        Self::new()
    }
}

impl Firewall {
    /// A firewall with no networks, applying its transactions through netlink and using
    /// `nft` from `PATH` for the rest (docs/design.md). Nothing touches the kernel until
    /// the first [`Firewall::add_network`].
    pub fn new() -> Firewall {
        Self::build("nft".into(), NFT_TIMEOUT, true)
    }

    /// Same as [`Firewall::new`] with another `nft` executable, which then applies every
    /// transaction (no netlink): tests inject failures through a fake one.
    pub fn with_nft_program(program: impl Into<OsString>) -> Firewall {
        Self::with_nft_program_and_timeout(program, NFT_TIMEOUT)
    }

    /// Same as [`Firewall::with_nft_program`], killing any `nft` run that takes longer
    /// than `timeout` instead of after [`NFT_TIMEOUT`] (tests use a short one).
    pub fn with_nft_program_and_timeout(
        program: impl Into<OsString>,
        timeout: Duration,
    ) -> Firewall {
        Self::build(program.into(), timeout, false)
    }

    /// With `netlink`, transactions go through netlink where they can (`netlink.rs`);
    /// without, every one runs `program`.
    fn build(program: OsString, timeout: Duration, netlink: bool) -> Firewall {
        Firewall {
            inner: Arc::new(Inner {
                nft: nft::Nft::new(program, timeout, netlink),
                state: Mutex::new(State::default()),
                queue: OnceLock::new(),
                guard: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// Queues `op` behind every operation queued before and waits for its result. If the
    /// caller stops waiting, `op` still runs (see the module doc).
    async fn queued<T, F, Fut>(&self, op: F) -> Result<T, FirewallError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, FirewallError>> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let job: Job = Box::new(move |inner| {
            Box::pin(async move {
                // Nobody to tell but the log when the caller stopped waiting (a DHCP ACK
                // sent after BIND_TIMEOUT): a failure must not go unnoticed.
                if let Err(Err(e)) = reply.send(op(inner).await) {
                    warn!(
                        "firewall: {} (the caller had stopped waiting)",
                        crate::error::Chain(&e)
                    );
                }
            })
        });
        let queue = self.inner.queue.get_or_init(|| {
            let (jobs, receiver) = mpsc::unbounded_channel();
            tokio::spawn(apply_queue(Arc::downgrade(&self.inner), receiver));
            jobs
        });
        queue.send(job).map_err(|_| FirewallError::QueueStopped)?;
        result.await.map_err(|_| FirewallError::QueueStopped)?
    }

    /// Sets up forwarding/NAT (and anti-spoofing when asked) for a network. Adding the same
    /// definition again does nothing; a different definition under the same name replaces
    /// the old one (a network re-created on a new bridge has a new TAP prefix), keeping only
    /// the port bindings and leases that still fit the new definition.
    ///
    /// For NAT networks IPv4 forwarding is switched on in this network namespace and left
    /// on when the broker stops: other software (container engines, VPNs) may rely on it,
    /// and switching it off behind their back would break them. Docker's `FORWARD` drop is
    /// handled as `docker.rs` describes, checked when the network is added (and after a
    /// restore).
    pub async fn add_network(&self, net: &FirewallNetwork) -> Result<(), FirewallError> {
        self.add_network_bound(net, &[], &[]).await
    }

    /// [`Firewall::add_network`] with TAP bindings (`ports`, as [`Firewall::add_ports`])
    /// and leases (MAC, address) in the same transaction as the rules. For a network
    /// adopted from a previous broker: replacing its rules must never leave its running
    /// guests' TAPs and addresses without bindings, or their traffic is dropped until
    /// they are bound again.
    pub async fn add_network_bound(
        &self,
        net: &FirewallNetwork,
        ports: &[(String, [u8; 6])],
        leases: &[([u8; 6], Ipv4Addr)],
    ) -> Result<(), FirewallError> {
        validate_network(net)?;
        for (tap, _) in ports {
            validate_ifname(tap)?;
        }
        let net = net.clone();
        let ports: BTreeMap<String, [u8; 6]> = ports.iter().cloned().collect();
        let leases: BTreeMap<[u8; 6], Ipv4Addr> = leases
            .iter()
            .filter(|(_, ip)| net.subnet.contains(ip))
            .cloned()
            .collect();
        self.queued(move |inner| async move { inner.add_network(net, ports, leases).await })
            .await
    }

    /// Deletes tables a broker that died without cleaning up left behind. Called before the
    /// first network is added; with networks present it does nothing.
    pub async fn remove_stale(&self) -> Result<(), FirewallError> {
        self.queued(|inner| async move { inner.remove_stale().await })
            .await
    }

    /// Removes everything the network added. Removing the last network deletes both tables.
    /// Removing an unknown network is not an error (cleanup paths may call it twice).
    ///
    /// The network is forgotten even when `nft` fails (the error is still returned): the
    /// caller goes on to delete the bridge, so keeping it would make the watchdog restore
    /// rules for a dead bridge. What the failure left in the kernel is deleted by the next
    /// `add_network` of the same name, by a restore, or with the tables.
    pub async fn remove_network(&self, name: &str) -> Result<(), FirewallError> {
        let name = name.to_string();
        self.queued(move |inner| async move { inner.remove_network(&name).await })
            .await
    }

    /// Forgets the bindings of TAPs of `network` that are not among the `live` ones (their
    /// VMs closed them), so a long-lived network does not accumulate set elements. Runs no
    /// `nft` when there is nothing to forget. Returns how many TAPs are live.
    ///
    /// `live` lists the TAPs that exist (given at most the `nft` timeout). It is awaited in
    /// the apply queue, so every binding already recorded belongs to a TAP that existed
    /// before the listing, and one missing from it is really gone (a TAP bound meanwhile
    /// is queued behind, never pruned).
    pub async fn prune_ports(
        &self,
        network: &str,
        live: impl Future<Output = std::io::Result<Vec<String>>> + Send + 'static,
    ) -> Result<usize, FirewallError> {
        let network = network.to_string();
        self.queued(move |inner| async move { inner.prune_ports(&network, live).await })
            .await
    }

    /// Forgets the bindings of `taps` of `network`, TAPs that live on without their
    /// clients (closed TAPs going back to the pool, `backend::linux::recycle`): the TAP
    /// guard drops their frames from now on, as a new TAP's, and the next
    /// [`Firewall::add_port`] of one binds it afresh.
    pub async fn forget_ports(
        &self,
        network: &str,
        taps: Vec<String>,
    ) -> Result<(), FirewallError> {
        let network = network.to_string();
        self.queued(move |inner| async move { inner.forget_ports(&network, &taps).await })
            .await
    }

    /// Binds a TAP (bridge port) to the MAC of its guest: frames entering from `tap` must
    /// carry `mac` as Ethernet (and ARP sender) source. A TAP name that is reused replaces
    /// its previous binding, in whatever network it was. Without anti-spoofing on the
    /// network this only records the port.
    pub async fn add_port(
        &self,
        network: &str,
        tap: &str,
        mac: [u8; 6],
    ) -> Result<(), FirewallError> {
        self.add_ports(network, &[(tap.to_string(), mac)]).await
    }

    /// [`Firewall::add_port`] for several TAPs of one network in one `nft` transaction:
    /// a burst of acquires costs one `nft` run instead of one each.
    pub async fn add_ports(
        &self,
        network: &str,
        ports: &[(String, [u8; 6])],
    ) -> Result<(), FirewallError> {
        for (tap, _) in ports {
            validate_ifname(tap)?;
        }
        let (network, ports) = (network.to_string(), ports.to_vec());
        self.queued(move |inner| async move { inner.add_ports(&network, ports).await })
            .await
    }

    /// Puts the TAP guard on a new TAP of an anti-spoofing network, unbound: from now on
    /// it sends and receives nothing until [`Firewall::add_port`] binds it.
    /// Called before the TAP is up and on the bridge, so it is bound before its first
    /// frame can pass. Not queued behind `nft` runs: a few netlink and `bpf(2)` calls.
    pub async fn guard_tap(&self, ifindex: u32) -> Result<(), FirewallError> {
        let guard = self.inner.guard(None).await?;
        guard.unbind(ifindex)?;
        guard.attach(ifindex).await?;
        Ok(())
    }

    /// Loads the TAP guard now, unless it is loaded or adopted already: the load (aya's
    /// kernel probes and the verifier, on a blocking thread) takes about 0.1 s, which the
    /// first TAP of an anti-spoofing network would otherwise wait for in its acquire.
    /// Called once the previous broker's networks are adopted, so their guard (and its
    /// bindings) is adopted rather than replaced, and before the socket is served. A
    /// failure only logs: the first TAP that needs the guard tries again and fails its
    /// acquire with the reason.
    pub async fn load_guard(&self) {
        if let Err(e) = self.inner.guard(None).await {
            warn!(
                "cannot load the TAP guard ahead of the first TAP: {}",
                crate::error::Chain(&e)
            );
        }
    }

    /// The TAP guard's binding of interface `ifindex` (tests, diagnostics).
    pub async fn guard_binding(&self, ifindex: u32) -> Result<Option<Binding>, FirewallError> {
        Ok(self.inner.guard(None).await?.binding(ifindex)?)
    }

    /// Records the DHCP lease of a guest: from now on IPv4 packets and ARP from `mac` must
    /// use `ip` as source. A new lease for the MAC replaces the old one, and an address
    /// moved to another MAC is taken away from the previous one. It has an effect on the
    /// packets only on networks with anti-spoofing and DHCP.
    ///
    /// Queued like every change: if the caller stops waiting (the DHCP server does after
    /// [`crate::dhcp::BIND_TIMEOUT`]), the binding is still made.
    ///
    /// The binding is sent to the kernel even when it is known already, so every DHCP
    /// renewal puts back a binding the kernel lost (someone flushed the leases set).
    pub async fn bind_ip(
        &self,
        network: &str,
        mac: [u8; 6],
        ip: Ipv4Addr,
    ) -> Result<(), FirewallError> {
        let network = network.to_string();
        self.queued(move |inner| async move { inner.bind_ip(&network, mac, ip, false).await })
            .await
    }

    /// Adds (`Some`), replaces or removes (`None`) the dynamic port forward `key` of
    /// `network`, rewriting the network's forward chains in one transaction. Removing
    /// one that does not exist (or of a network that is gone) is not an error. A forward
    /// needs IPv4 forwarding, which is switched on as for NAT networks (and left on).
    pub async fn set_forward(
        &self,
        network: &str,
        key: &str,
        forward: Option<PortForward>,
    ) -> Result<(), FirewallError> {
        let (network, key) = (network.to_string(), key.to_string());
        self.queued(move |inner| async move { inner.set_forward(&network, key, forward).await })
            .await
    }

    /// [`Firewall::bind_ip`], but without an `nft` run when the binding is known already
    /// (for whoever replays leases the DHCP server bound itself).
    pub async fn bind_ip_if_new(
        &self,
        network: &str,
        mac: [u8; 6],
        ip: Ipv4Addr,
    ) -> Result<(), FirewallError> {
        let network = network.to_string();
        self.queued(move |inner| async move { inner.bind_ip(&network, mac, ip, true).await })
            .await
    }
}

/// The (ifindex, MTU) of the bridge of `net`, for the TAP guard's guest-to-guest fast
/// path; None (no fast path: frames cross the bridge as before) when it cannot be had.
async fn fast_path_of(net: &FirewallNetwork) -> Option<(u32, u32)> {
    let found = match crate::backend::linux::netlink::Netlink::connect() {
        Ok(netlink) => netlink.link_by_name(&net.bridge).await,
        Err(e) => Err(e),
    };
    match found {
        Ok(Some(link)) => link.mtu.map(|mtu| (link.index, mtu)),
        Ok(None) => None,
        Err(e) => {
            warn!(network = %net.name, "no guest-to-guest fast path: {e}");
            None
        }
    }
}

/// The ifindex of VXLAN port `port` and the MAC of `bridge`, when the port is on the
/// bridge (None when either is missing or the port is elsewhere).
async fn overlay_port_of(bridge: &str, port: &str) -> std::io::Result<Option<(u32, [u8; 6])>> {
    let netlink = crate::backend::linux::netlink::Netlink::connect()?;
    let (Some(bridge), Some(port)) = (
        netlink.link_by_name(bridge).await?,
        netlink.link_by_name(port).await?,
    ) else {
        return Ok(None);
    };
    Ok(match bridge.mac {
        Some(mac) if port.controller == Some(bridge.index) => Some((port.index, mac)),
        _ => None,
    })
}

/// Runs queued jobs one at a time, in order, until the firewall is dropped. Holds the
/// firewall only while a job runs, so dropping every `Firewall` ends it.
async fn apply_queue(inner: Weak<Inner>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = jobs.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // A panicking job must not take the queue (and every later change) with it; its
        // caller sees `QueueStopped` for that one call.
        if std::panic::AssertUnwindSafe(job(inner))
            .catch_unwind()
            .await
            .is_err()
        {
            error!("firewall: an operation panicked; the queue goes on");
        }
    }
}

impl Inner {
    /// The TAP guard: the one loaded or adopted earlier, else the one a previous broker
    /// left on interface `adopt_from` (so its bindings carry on), else a new one.
    async fn guard(&self, adopt_from: Option<u32>) -> Result<&Arc<Guard>, FirewallError> {
        Ok(self
            .guard
            .get_or_try_init(|| async move {
                if let Some(ifindex) = adopt_from
                    && let Some(guard) = Guard::adopt(ifindex).await?
                {
                    info!(ifindex, "adopted the TAP guard a previous broker left");
                    return Ok::<_, GuardError>(Arc::new(guard));
                }
                Ok(Arc::new(Guard::load().await?))
            })
            .await?)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Never held across an await and no code under it panics on purpose; a poisoned
        // lock still holds consistent data (commits are single inserts/removes).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `ports` and `leases` are bound with the rules (see [`Firewall::add_network_bound`]).
    async fn add_network(
        &self,
        net: FirewallNetwork,
        mut ports: BTreeMap<String, [u8; 6]>,
        mut leases: BTreeMap<[u8; 6], Ipv4Addr>,
    ) -> Result<(), FirewallError> {
        let mut steps = crate::steps::Steps::start();
        let fast_path = if net.anti_spoofing && !net.isolation {
            fast_path_of(&net).await
        } else {
            None
        };
        // The VXLAN port of the definition replaced, whose binding goes.
        let mut replaced_port = None;
        // The old bridge of a network whose rules are replaced, logged after the lock.
        let mut replacing = None;
        let (ns, batch, dropped) = {
            let state = self.lock();
            // TAPs whose DHCP MAC quota set goes with the old definition.
            let mut dropped: Vec<String> = vec![];
            if let Some(existing) = state.networks.get(&net.name) {
                if existing.net == net && ports.is_empty() && leases.is_empty() {
                    return Ok(());
                }
                replaced_port = existing.overlay_port;
                replacing = Some(existing.net.bridge.clone());
                // Bindings of TAPs of the old bridge are meaningless on the new one.
                for (tap, mac) in &existing.ports {
                    if tap.starts_with(&net.tap_prefix) {
                        ports.entry(tap.clone()).or_insert(*mac);
                    }
                }
                for (mac, ip) in &existing.leases {
                    if net.subnet.contains(ip) {
                        leases.entry(*mac).or_insert(*ip);
                    }
                }
                if has_dhcp_quota(&existing.net) {
                    dropped = existing
                        .ports
                        .keys()
                        .filter(|tap| !(has_dhcp_quota(&net) && ports.contains_key(*tap)))
                        .cloned()
                        .collect();
                }
            }
            if let Some(other) = state.networks.values().find(|n| {
                n.net.name != net.name
                    && (n.net.tap_prefix.starts_with(&net.tap_prefix)
                        || net.tap_prefix.starts_with(&n.net.tap_prefix))
            }) {
                // The dispatch tells networks apart by TAP prefix alone.
                return Err(FirewallError::Invalid {
                    what: "network",
                    detail: format!(
                        "TAP prefix {:?} of network {:?} overlaps {:?} of network {:?}",
                        net.tap_prefix, net.name, other.net.tap_prefix, other.net.name
                    ),
                });
            }
            if let Some(other) = state
                .networks
                .values()
                .find(|n| n.net.bridge == net.bridge && n.net.name != net.name)
            {
                return Err(FirewallError::Invalid {
                    what: "network",
                    detail: format!(
                        "bridge {:?} of network {:?} is already used by network {:?}",
                        net.bridge, net.name, other.net.name
                    ),
                });
            }
            // Dynamic forwards stay while their target is still on the network.
            let dynamic = state
                .networks
                .get(&net.name)
                .map(|n| {
                    n.dynamic
                        .iter()
                        .filter(|(_, f)| match f.internal_address {
                            std::net::IpAddr::V4(ip) => net.subnet.contains(&ip),
                            std::net::IpAddr::V6(_) => true,
                        })
                        .map(|(k, f)| (k.clone(), f.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let ifindex = state
                .networks
                .get(&net.name)
                .map(|n| {
                    n.ifindex
                        .iter()
                        .filter(|(tap, _)| ports.contains_key(*tap))
                        .map(|(t, i)| (t.clone(), *i))
                        .collect()
                })
                .unwrap_or_default();
            let ns = NetState {
                net: net.clone(),
                ports,
                leases,
                dynamic,
                ifindex,
                fast_path,
                overlay_port: None,
            };
            let mut batch = Batch::new();
            add_tables(&mut batch);
            // The dispatch may jump to the chains replaced below: emptied first, refilled
            // last.
            dispatch_flush(&mut batch);
            // Whatever objects of this name exist go first: the old definition's, or those a
            // failed removal left behind (it forgets the network anyway, see `remove_network`).
            purge_network_objects(&mut batch, &net.name);
            network_objects(&mut batch, &ns);
            let others = state.networks.values().filter(|n| n.net.name != net.name);
            dispatch_rule(
                &mut batch,
                others.map(|n| &n.net).chain(std::iter::once(&ns.net)),
            );
            (ns, batch, dropped)
        };
        if let Some(old_bridge) = replacing {
            info!(network = %net.name, %old_bridge, new_bridge = %net.bridge,
                  "firewall: replacing the rules of a network with a new definition");
        }
        let context = format!("adding network {:?}", net.name);
        // TAPs given with the network (adopted from a previous broker) are guarded and
        // bound before the rules change: the guard a previous broker left on them is
        // adopted, bindings and all, so their guests' frames never meet an empty map.
        let mut ns = ns;
        if net.anti_spoofing {
            let unguarded: Vec<(String, [u8; 6])> = ns
                .ports
                .iter()
                .filter(|(tap, _)| !ns.ifindex.contains_key(*tap))
                .map(|(tap, mac)| (tap.clone(), *mac))
                .collect();
            for (tap, mac) in unguarded {
                if let Some(ifindex) = self.guard_port(&tap, ns.binding(mac)).await? {
                    ns.ifindex.insert(tap, ifindex);
                }
            }
        }
        // The kept TAPs' bindings, from the new definition (gateway, DHCP).
        let rebind: Vec<(u32, Binding)> = if net.anti_spoofing {
            ns.ifindex
                .iter()
                .filter_map(|(tap, i)| ns.ports.get(tap).map(|mac| (*i, ns.binding(*mac))))
                .collect()
        } else {
            vec![]
        };
        steps.lap("prepare");
        self.apply_or_restore(batch, &context, |s| {
            s.networks.insert(ns.net.name.clone(), ns);
        })
        .await?;
        steps.lap("batch");
        if !rebind.is_empty() {
            let guard = self.guard(None).await?;
            for (ifindex, binding) in rebind {
                guard.bind(ifindex, binding)?;
            }
        }
        if has_dhcp_quota(&net) || !dropped.is_empty() {
            self.sync_dhcp_quota(&net.name, &dropped, &[]).await?;
        }
        self.guard_overlay(&net, fast_path, replaced_port).await;
        steps.lap("bind");
        if net.nat || !net.forwards.is_empty() {
            if let Err(e) = enable_ip_forward(forwards_ipv6(&net)) {
                // Leave no half-configured network behind.
                if let Err(cleanup) = self.remove_network(&net.name).await {
                    warn!(network = %net.name, "{}", crate::error::Chain(&cleanup));
                }
                return Err(e);
            }
            steps.lap("forwarding");
            if net.nat {
                self.docker_sync(&net).await;
                steps.lap("docker");
            }
        }
        crate::log_steps!("firewall", net.name, steps);
        info!(network = %net.name, bridge = %net.bridge, nat = net.nat,
              anti_spoofing = net.anti_spoofing, "firewall rules added");
        Ok(())
    }

    /// The overlay fast path of network `net` (docs/design.md, "The overlay fast
    /// path"): `overlay_ingress` on its VXLAN port and the port's binding, so unicast
    /// between this host's guests and other hosts' guests skips the bridge on both
    /// sides. Only with the guest-to-guest fast path (`fast_path`: anti-spoofing, no
    /// isolation). An optimisation: when it cannot be had, frames cross the bridge as
    /// before, with a warning. `replaced` is the port of the definition replaced, unbound
    /// if it is another.
    async fn guard_overlay(
        &self,
        net: &FirewallNetwork,
        fast_path: Option<(u32, u32)>,
        replaced: Option<u32>,
    ) {
        let port = match (&net.overlay, fast_path) {
            (Some(overlay), Some((bridge, mtu))) => {
                match overlay_port_of(&net.bridge, &overlay.port).await {
                    Ok(Some((port, mac))) => Some((port, Binding::overlay_port(mac, bridge, mtu))),
                    Ok(None) => None,
                    Err(e) => {
                        warn!(network = %net.name, "no overlay fast path: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        // Networks without an overlay fast path never load the guard here.
        if port.is_none() && replaced.is_none() {
            return;
        }
        let guard = match self.guard(None).await {
            Ok(guard) => guard,
            Err(e) => {
                warn!(network = %net.name, "no overlay fast path: {}", crate::error::Chain(&e));
                return;
            }
        };
        if let Some(old) = replaced
            && port.map(|(p, _)| p) != Some(old)
            && let Err(e) = guard.unbind(old)
        {
            warn!(network = %net.name, "cannot unbind the old overlay port: {}", crate::error::Chain(&e));
        }
        let Some((port, binding)) = port else {
            return;
        };
        // The binding first: the program passes everything to the bridge until then.
        let attached = match guard.bind(port, binding) {
            Ok(()) => guard.attach_overlay(port).await,
            Err(e) => Err(e),
        };
        match attached {
            Ok(true) => {
                if let Some(ns) = self.lock().networks.get_mut(&net.name) {
                    ns.overlay_port = Some(port);
                }
            }
            Ok(false) => {
                info!(network = %net.name, "no overlay fast path: the adopted TAP guard predates it");
                guard.unbind(port).ok();
            }
            Err(e) => {
                warn!(network = %net.name, "no overlay fast path: {}", crate::error::Chain(&e));
                guard.unbind(port).ok();
            }
        }
    }

    async fn remove_stale(&self) -> Result<(), FirewallError> {
        if !self.lock().networks.is_empty() || !self.any_table_present().await? {
            return Ok(());
        }
        let mut batch = Batch::new();
        delete_tables(&mut batch);
        self.nft.apply(batch, "removing stale tables").await?;
        info!("removed stale firewall tables");
        Ok(())
    }

    async fn remove_network(&self, name: &str) -> Result<(), FirewallError> {
        let (net, batch, quota_taps, unbind) = {
            let state = self.lock();
            let Some(ns) = state.networks.get(name) else {
                drop(state);
                debug!(
                    network = name,
                    "firewall: remove of unknown network ignored"
                );
                return Ok(());
            };
            let net = ns.net.clone();
            let mut batch = Batch::new();
            // The quota sets outlive the chain deleted below; the last network's go with
            // the tables.
            let mut quota_taps: Vec<String> = vec![];
            if state.networks.len() == 1 {
                delete_tables(&mut batch);
            } else {
                if has_dhcp_quota(&net) {
                    quota_taps = ns.ports.keys().cloned().collect();
                }
                dispatch_flush(&mut batch);
                let others = state.networks.values().filter(|n| n.net.name != name);
                dispatch_rule(&mut batch, others.map(|n| &n.net));
                delete_network_objects(&mut batch, &net);
            }
            let unbind: Vec<u32> = ns
                .ifindex
                .values()
                .copied()
                .chain(ns.overlay_port)
                .collect();
            (net, batch, quota_taps, unbind)
        };
        // Its TAPs go with the bridge; their bindings go now, so that no interface that
        // takes one of their indexes later finds one.
        if !unbind.is_empty()
            && let Some(guard) = self.guard.get()
        {
            for ifindex in unbind {
                if let Err(e) = guard.unbind(ifindex) {
                    warn!(network = name, "{}", crate::error::Chain(&e));
                }
            }
        }
        let context = format!("removing network {name:?}");
        let applied = self
            .apply_or_restore(batch, &context, |s| {
                s.networks.remove(&net.name);
            })
            .await;
        // The commit above only runs on success (or before a restore).
        self.lock().networks.remove(&net.name);
        let docker = if net.nat {
            self.docker_remove(&net.name).await
        } else {
            Ok(())
        };
        if let Err(e) = applied {
            warn!(
                network = name,
                "firewall: network forgotten, but its rules may remain: {}",
                crate::error::Chain(&e)
            );
            return Err(e);
        }
        if !quota_taps.is_empty() {
            let context = format!("deleting the DHCP MAC quotas of network {name:?}");
            if let Err(e) = self
                .nft
                .apply_text(delete_dhcp_macs_script(&quota_taps), &context)
                .await
            {
                // Unused empty sets, which a restore or the next start drops.
                warn!(network = name, "{}", crate::error::Chain(&e));
            }
        }
        docker?;
        info!(network = name, "firewall rules removed");
        Ok(())
    }

    async fn prune_ports(
        &self,
        network: &str,
        live: impl Future<Output = std::io::Result<Vec<String>>>,
    ) -> Result<usize, FirewallError> {
        if !self.lock().networks.contains_key(network) {
            return Ok(0);
        }
        let live = match tokio::time::timeout(self.nft.timeout(), live).await {
            Ok(Ok(live)) => live,
            Ok(Err(source)) => {
                return Err(FirewallError::ListTaps {
                    network: network.into(),
                    source,
                });
            }
            Err(_) => {
                return Err(FirewallError::ListTapsTimeout {
                    network: network.into(),
                    after: self.nft.timeout(),
                });
            }
        };
        let gone: Vec<String> = {
            let state = self.lock();
            let Some(ns) = state.networks.get(network) else {
                return Ok(0);
            };
            ns.ports
                .keys()
                .filter(|tap| !live.contains(tap))
                .cloned()
                .collect()
        };
        self.forget_ports(network, &gone).await?;
        Ok(live.len())
    }

    async fn forget_ports(&self, network: &str, taps: &[String]) -> Result<(), FirewallError> {
        let (gone, unbind) = {
            let state = self.lock();
            let Some(ns) = state.networks.get(network) else {
                return Ok(());
            };
            let gone: Vec<String> = taps
                .iter()
                .filter(|tap| ns.ports.contains_key(*tap))
                .cloned()
                .collect();
            let unbind: Vec<u32> = gone
                .iter()
                .filter_map(|tap| ns.ifindex.get(tap).copied())
                .collect();
            (gone, unbind)
        };
        if gone.is_empty() {
            return Ok(());
        }
        if let Some(guard) = self.guard.get() {
            for ifindex in unbind {
                guard.unbind(ifindex)?;
            }
        }
        // Nothing for nft: the TAP guard keeps the bindings, the quota sets are below.
        let batch = Batch::new();
        let context = format!(
            "forgetting {} closed TAP(s) of network {network:?}",
            gone.len()
        );
        self.apply_or_restore(batch, &context, |s| {
            if let Some(ns) = s.networks.get_mut(network) {
                for tap in &gone {
                    ns.ports.remove(tap);
                    ns.ifindex.remove(tap);
                }
            }
        })
        .await?;
        let quota = self
            .lock()
            .networks
            .get(network)
            .is_some_and(|ns| has_dhcp_quota(&ns.net));
        if quota {
            self.sync_dhcp_quota(network, &gone, &[]).await?;
        }
        Ok(())
    }

    async fn add_ports(
        &self,
        network: &str,
        ports: Vec<(String, [u8; 6])>,
    ) -> Result<(), FirewallError> {
        let (new, quotas, guarded) = {
            let state = self.lock();
            let Some(target) = state.networks.get(network) else {
                return Err(FirewallError::UnknownNetwork(network.into()));
            };
            if has_dhcp_quota(&target.net)
                && let Some((tap, _)) = ports.iter().find(|(tap, _)| !script_safe(tap))
            {
                // Its quota set is named after it in an nft script.
                return Err(FirewallError::Invalid {
                    what: "interface name",
                    detail: format!("{tap:?}"),
                });
            }
            let new: Vec<(String, [u8; 6])> = ports
                .into_iter()
                .filter(|(tap, mac)| target.ports.get(tap) != Some(mac))
                .collect();
            if new.is_empty() {
                return Ok(());
            }
            // The DHCP MAC quotas to rewrite after it: networks losing a TAP first (their
            // set of it goes), then the target (a TAP it had with another MAC starts over).
            let mut quotas: Vec<(String, Vec<String>, Vec<String>)> = vec![];
            for ns in state.networks.values() {
                if !has_dhcp_quota(&ns.net) {
                    continue;
                }
                let had: Vec<String> = new
                    .iter()
                    .filter(|(tap, _)| ns.ports.contains_key(tap))
                    .map(|(tap, _)| tap.clone())
                    .collect();
                if ns.net.name != network && !had.is_empty() {
                    quotas.insert(0, (ns.net.name.clone(), had, vec![]));
                } else if ns.net.name == network {
                    quotas.push((ns.net.name.clone(), vec![], had));
                }
            }
            (new, quotas, target.net.anti_spoofing)
        };
        // The TAP guard: each TAP's binding written, then its filters checked (and put
        // there when missing: a TAP made by someone else, or one a previous broker guarded
        // with programs this one did not adopt). Written first, so a TAP whose filters
        // are replaced is never without its binding.
        let mut indexes: BTreeMap<String, u32> = BTreeMap::new();
        if guarded {
            for (tap, mac) in &new {
                let binding = match self.lock().networks.get(network) {
                    Some(ns) => ns.binding(*mac),
                    None => return Err(FirewallError::UnknownNetwork(network.into())),
                };
                if let Some(ifindex) = self.guard_port(tap, binding).await? {
                    indexes.insert(tap.clone(), ifindex);
                }
            }
        }
        let context = match new.as_slice() {
            [(tap, mac)] => format!(
                "binding port {tap:?} of network {network:?} to {}",
                Mac::from(*mac)
            ),
            many => format!("binding {} ports of network {network:?}", many.len()),
        };
        // Nothing for nft (the quota scripts below aside): only the state is committed.
        let added: Vec<String> = new.iter().map(|(tap, _)| tap.clone()).collect();
        self.apply_or_restore(Batch::new(), &context, |s| {
            for (tap, mac) in new {
                for ns in s.networks.values_mut() {
                    ns.ports.remove(&tap);
                    ns.ifindex.remove(&tap);
                }
                if let Some(ns) = s.networks.get_mut(network) {
                    if let Some(i) = indexes.get(&tap) {
                        ns.ifindex.insert(tap.clone(), *i);
                    }
                    ns.ports.insert(tap, mac);
                }
            }
        })
        .await?;
        for (net, gone, reset) in quotas {
            if let Err(e) = self.sync_dhcp_quota(&net, &gone, &reset).await {
                // Not bound after all: a retry must find these TAPs new and write their
                // quotas again (the failed script changed nothing: one transaction).
                if net == network
                    && let Some(ns) = self.lock().networks.get_mut(network)
                {
                    for tap in &added {
                        ns.ports.remove(tap);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Binds TAP `tap` in the TAP guard, then makes sure the guard's filters are on it (a
    /// TAP made by someone else, or one a previous broker guarded with programs this one
    /// did not adopt). Bound first, so a TAP whose filters are replaced is never without
    /// its binding. Returns its interface index; None when the TAP is gone already (its
    /// VM left: the prune forgets it).
    async fn guard_port(&self, tap: &str, binding: Binding) -> Result<Option<u32>, FirewallError> {
        let Ok(ifindex) = nix::net::if_::if_nametoindex(tap) else {
            debug!(tap, "not binding a TAP that is gone");
            return Ok(None);
        };
        let guard = self.guard(Some(ifindex)).await?;
        guard.bind(ifindex, binding)?;
        if !guard.attached(ifindex).await? {
            guard.attach(ifindex).await?;
        }
        Ok(Some(ifindex))
    }

    /// Rewrites the DHCP MAC quotas of `network` (when it has them) from its bound TAPs,
    /// deleting the quota sets of the TAPs in `gone` and emptying those in `reset`. A
    /// second `nft` run after the JSON transaction that changed the bindings, because the
    /// quota sets can only be declared in nft's text syntax ([`dhcp_quota_script`]); in
    /// between, the network's `dhcp-` chain drops what it would not let through before
    /// (an old rule, or the rebuilt chain's `drop`), never more.
    async fn sync_dhcp_quota(
        &self,
        network: &str,
        gone: &[String],
        reset: &[String],
    ) -> Result<(), FirewallError> {
        let script = {
            let state = self.lock();
            match state.networks.get(network) {
                Some(ns) if has_dhcp_quota(&ns.net) => {
                    dhcp_quota_script(network, &ns.ports, gone, reset)
                }
                _ => delete_dhcp_macs_script(gone),
            }
        };
        if script.is_empty() {
            return Ok(());
        }
        let context = format!("writing the DHCP MAC quotas of network {network:?}");
        match self.nft.apply_text(script, &context).await {
            Err(e @ (FirewallError::Nft { .. } | FirewallError::Netlink { .. })) => {
                if self.tables_present().await? {
                    return Err(e);
                }
                warn!("firewall rules were removed (flushed?) while {context}, restoring");
                self.restore().await
            }
            other => other,
        }
    }

    async fn set_forward(
        &self,
        network: &str,
        key: String,
        forward: Option<PortForward>,
    ) -> Result<(), FirewallError> {
        let batch = {
            let state = self.lock();
            let Some(ns) = state.networks.get(network) else {
                return match forward {
                    Some(_) => Err(FirewallError::UnknownNetwork(network.into())),
                    None => Ok(()),
                };
            };
            if let Some(f) = &forward {
                let inside = match f.internal_address {
                    std::net::IpAddr::V4(ip) => ns.net.subnet.contains(&ip),
                    std::net::IpAddr::V6(ip) => ns.net.ipv6_prefix.is_some_and(|p| p.contains(&ip)),
                };
                if !inside {
                    let prefix6 = ns
                        .net
                        .ipv6_prefix
                        .map(|p| format!(", {p}"))
                        .unwrap_or_default();
                    return Err(FirewallError::Invalid {
                        what: "port forward",
                        detail: format!(
                            "{} is not on network {network:?} ({}{prefix6})",
                            f.internal_address, ns.net.subnet
                        ),
                    });
                }
            }
            if ns.dynamic.get(&key) == forward.as_ref() {
                return Ok(());
            }
            let mut dynamic = ns.dynamic.clone();
            match &forward {
                Some(f) => dynamic.insert(key.clone(), f.clone()),
                None => dynamic.remove(&key),
            };
            let mut batch = Batch::new();
            add_tables(&mut batch);
            forward_chains(
                &mut batch,
                &ns.net,
                ns.net.forwards.iter().chain(dynamic.values()),
            );
            batch
        };
        if let Some(f) = &forward {
            // An IPv6 forward is routed into the bridge like an IPv4 one: a `host`
            // network's first one switches IPv6 forwarding on (as a static one would).
            enable_ip_forward(f.internal_address.is_ipv6())?;
        }
        let context = format!("setting port forward {key:?} of network {network:?}");
        self.apply_or_restore(batch, &context, |s| {
            if let Some(ns) = s.networks.get_mut(network) {
                match forward {
                    Some(f) => ns.dynamic.insert(key, f),
                    None => ns.dynamic.remove(&key),
                };
            }
        })
        .await
    }

    async fn bind_ip(
        &self,
        network: &str,
        mac: [u8; 6],
        ip: Ipv4Addr,
        only_new: bool,
    ) -> Result<(), FirewallError> {
        let stale = {
            let state = self.lock();
            let Some(ns) = state.networks.get(network) else {
                return Err(FirewallError::UnknownNetwork(network.into()));
            };
            if !ns.net.subnet.contains(&ip) {
                return Err(FirewallError::Invalid {
                    what: "IP binding",
                    detail: format!("{ip} is outside {} of network {network:?}", ns.net.subnet),
                });
            }
            if only_new && ns.leases.get(&mac) == Some(&ip) {
                return Ok(());
            }
            let stale: Vec<([u8; 6], Ipv4Addr)> = ns
                .leases
                .iter()
                .filter(|(m, i)| (**m == mac || **i == ip) && (**m, **i) != (mac, ip))
                .map(|(m, i)| (*m, *i))
                .collect();
            stale
        };
        {
            let mut s = self.lock();
            if let Some(ns) = s.networks.get_mut(network) {
                for (m, _) in &stale {
                    ns.leases.remove(m);
                }
                ns.leases.insert(mac, ip);
            }
        }
        // The bindings of the TAPs of the MACs concerned, from the state just committed.
        // Written even when known already, so a renewal puts back a binding the map lost.
        let rebind: Vec<(u32, Binding)> = {
            let state = self.lock();
            match state.networks.get(network) {
                Some(ns) if ns.net.anti_spoofing && ns.net.dhcp => ns
                    .ports
                    .iter()
                    .filter(|(_, m)| **m == mac || stale.iter().any(|(s, _)| s == *m))
                    .filter_map(|(tap, m)| ns.ifindex.get(tap).map(|i| (*i, ns.binding(*m))))
                    .collect(),
                _ => vec![],
            }
        };
        if !rebind.is_empty() {
            let guard = self.guard(None).await?;
            for (ifindex, binding) in rebind {
                guard.bind(ifindex, binding)?;
            }
        }
        Ok(())
    }

    /// Applies an incremental change and commits it to the state with `commit`. When the
    /// change fails because our tables were removed meanwhile (a flush racing with us), the
    /// change is committed anyway and the whole state restored, which includes it.
    async fn apply_or_restore(
        &self,
        batch: Batch<'_>,
        context: &str,
        commit: impl FnOnce(&mut State),
    ) -> Result<(), FirewallError> {
        match self.nft.apply(batch, context).await {
            Ok(()) => {
                commit(&mut self.lock());
                Ok(())
            }
            Err(e @ (FirewallError::Nft { .. } | FirewallError::Netlink { .. })) => {
                if self.tables_present().await? {
                    return Err(e);
                }
                warn!("firewall rules were removed (flushed?) while {context}, restoring");
                commit(&mut self.lock());
                self.restore().await
            }
            Err(e) => Err(e),
        }
    }

    /// True when both of our tables exist.
    async fn tables_present(&self) -> Result<bool, FirewallError> {
        let (inet, bridge) = self.our_tables().await?;
        Ok(inet && bridge)
    }

    /// True when either of our tables exists.
    async fn any_table_present(&self) -> Result<bool, FirewallError> {
        let (inet, bridge) = self.our_tables().await?;
        Ok(inet || bridge)
    }

    /// Which of our two tables (inet, bridge) exist.
    async fn our_tables(&self) -> Result<(bool, bool), FirewallError> {
        let doc = self.nft.list(&["list", "tables"], "listing tables").await?;
        let mut inet = false;
        let mut bridge = false;
        for obj in doc.objects.iter() {
            if let NfObject::ListObject(NfListObject::Table(t)) = obj
                && t.name == TABLE
            {
                match t.family {
                    NfFamily::INet => inet = true,
                    NfFamily::Bridge => bridge = true,
                    _ => {}
                }
            }
        }
        Ok((inet, bridge))
    }

    /// Re-creates both tables from the state in one transaction, dropping whatever is left
    /// of them first, then re-syncs the Docker rules.
    async fn restore(&self) -> Result<(), FirewallError> {
        let (batch, nat, quotas) = {
            let state = self.lock();
            let mut batch = Batch::new();
            delete_tables(&mut batch);
            if !state.networks.is_empty() {
                add_tables(&mut batch);
                dispatch_flush(&mut batch);
                for ns in state.networks.values() {
                    network_objects(&mut batch, ns);
                }
                dispatch_rule(&mut batch, state.networks.values().map(|n| &n.net));
            }
            let nat: Vec<FirewallNetwork> = state
                .networks
                .values()
                .filter(|ns| ns.net.nat)
                .map(|ns| ns.net.clone())
                .collect();
            // The DHCP MAC quotas, which the JSON above cannot declare. Their sets went
            // with the tables, so every TAP starts over: at worst a VM gets its quota
            // again after someone flushed the ruleset.
            let quotas: String = state
                .networks
                .values()
                .filter(|ns| has_dhcp_quota(&ns.net))
                .map(|ns| dhcp_quota_script(&ns.net.name, &ns.ports, [], &[]))
                .collect();
            (batch, nat, quotas)
        };
        self.nft
            .apply(batch, "restoring the firewall rules")
            .await?;
        if !quotas.is_empty() {
            self.nft
                .apply_text(quotas, "restoring the DHCP MAC quotas")
                .await?;
        }
        for net in &nat {
            enable_ip_forward(forwards_ipv6(net))?;
            if let Err(e) = self.docker_remove(&net.name).await {
                warn!(network = %net.name, "{}", crate::error::Chain(&e));
            }
            self.docker_sync(net).await;
        }
        Ok(())
    }
}

/// Whether `net` needs IPv6 forwarding: a shared network with IPv6, or a static port
/// forward to an IPv6 address.
fn forwards_ipv6(net: &FirewallNetwork) -> bool {
    net.ipv6_prefix.is_some()
        && (net.nat || net.forwards.iter().any(|f| f.internal_address.is_ipv6()))
}

/// Switches IPv4 forwarding on, and IPv6 forwarding too when `ipv6`. Only ever in the
/// broker's own namespace: /proc/sys/net is per network namespace, the one of the thread
/// opening the file.
fn enable_ip_forward(ipv6: bool) -> Result<(), FirewallError> {
    if ipv6 {
        enable_ip6_forward()?;
    }
    let current = std::fs::read_to_string(IP_FORWARD).map_err(FirewallError::IpForward)?;
    if current.trim() == "1" {
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1\n").map_err(FirewallError::IpForward)?;
    info!(
        "enabled IPv4 forwarding ({IP_FORWARD}=1) for shared networks and port forwards; it is left on at exit"
    );
    Ok(())
}

/// IPv6 forwarding. Unlike IPv4's, this turns every interface of the namespace into a
/// router, and a router ignores Router Advertisements (unless `accept_ra=2`). On a host
/// whose uplink gets its IPv6 addresses and default route by SLAAC, switching it on would
/// let that route expire: the host would lose IPv6 behind the admin's back. So, as
/// libvirt does, the broker leaves it off while any interface depends on RAs
/// ([`ra_dependent_interfaces`]) and says what to set (`accept_ra=2`,
/// docs/networking.md); its networks then keep IPv6 on the bridge, without NAT66.
fn enable_ip6_forward() -> Result<(), FirewallError> {
    let current = std::fs::read_to_string(IP6_FORWARD).map_err(FirewallError::Ip6Forward)?;
    if current.trim() == "1" {
        return Ok(());
    }
    let dependent = ra_dependent_interfaces();
    if !dependent.is_empty() {
        warn!(
            "IPv6 forwarding stays off ({IP6_FORWARD}=0), so shared networks reach no IPv6 \
             outside: {} get IPv6 addresses from Router Advertisements with accept_ra=1, \
             which a forwarding host ignores. Set net.ipv6.conf.IFACE.accept_ra=2 on them \
             and re-create the network (docs/networking.md)",
            dependent.join(", ")
        );
        return Ok(());
    }
    std::fs::write(IP6_FORWARD, "1\n").map_err(FirewallError::Ip6Forward)?;
    info!("enabled IPv6 forwarding ({IP6_FORWARD}=1) for shared networks; it is left on at exit");
    Ok(())
}

/// Interfaces of this namespace that hold a global IPv6 address learned from Router
/// Advertisements (not `IFA_F_PERMANENT`: SLAAC or otherwise autoconfigured) while
/// `accept_ra` is 1: the ones IPv6 forwarding would cut off. Read from /proc (per
/// namespace, like the sysctls); unreadable files count as nothing to protect.
fn ra_dependent_interfaces() -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    autoconf_interfaces(&table)
        .into_iter()
        .filter(|ifname| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{ifname}/accept_ra"))
                .is_ok_and(|v| v.trim() == "1")
        })
        .collect()
}

/// The interfaces of `/proc/net/if_inet6` lines (address, ifindex, prefix length, scope,
/// flags, name; hex) with a global-scope address that is not `IFA_F_PERMANENT` (0x80).
fn autoconf_interfaces(if_inet6: &str) -> Vec<String> {
    const SCOPE_GLOBAL: u32 = 0;
    const IFA_F_PERMANENT: u32 = 0x80;
    let mut names: Vec<String> = if_inet6
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let scope = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let flags = u32::from_str_radix(f.get(4)?, 16).ok()?;
            (scope == SCOPE_GLOBAL && flags & IFA_F_PERMANENT == 0)
                .then(|| f.get(5).map(|n| n.to_string()))?
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Whether the network limits the DHCP client MACs of each TAP ([`DHCP_MACS_PER_TAP`]):
/// with anti-spoofing, `chaddr` must be the TAP's MAC instead ([`dhcp_check`]).
fn has_dhcp_quota(net: &FirewallNetwork) -> bool {
    !net.anti_spoofing && net.dhcp
}

fn validate_ifname(name: &str) -> Result<(), FirewallError> {
    // IFNAMSIZ is 16 including the NUL.
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
        return Err(FirewallError::Invalid {
            what: "interface name",
            detail: format!("{name:?}"),
        });
    }
    Ok(())
}

fn validate_network(net: &FirewallNetwork) -> Result<(), FirewallError> {
    // Network names end up in nft object names (limited to 256 bytes) and comments; the
    // protocol's rule keeps them short and made of safe characters.
    crate::protocol::validate_network_name(&net.name).map_err(|e| FirewallError::Invalid {
        what: "network name",
        detail: e.to_string(),
    })?;
    validate_ifname(&net.bridge)?;
    if let Some(overlay) = &net.overlay {
        validate_ifname(&overlay.port)?;
    }
    // A prefix, so shorter than a whole name, and no nft wildcard or escape of its own.
    validate_ifname(&net.tap_prefix)?;
    if net.tap_prefix.contains(['*', '\\']) {
        return Err(FirewallError::Invalid {
            what: "TAP prefix",
            detail: format!("{:?}", net.tap_prefix),
        });
    }
    if !net.subnet.contains(&net.gateway) {
        return Err(FirewallError::Invalid {
            what: "network",
            detail: format!(
                "gateway {} is outside subnet {} of network {:?}",
                net.gateway, net.subnet, net.name
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests {
    #[test]
    fn only_autoconfigured_global_addresses_make_an_interface_depend_on_ras() {
        let table = "\
20010db8000000000000000000000001 02 40 00 80       eth0
20010db8000000005054fffe12345678 03 40 00 00       eth1
20010db8000000005054fffe12345679 03 40 00 00       eth1
fe800000000000005054fffe12345678 03 40 20 80       eth1
fe800000000000005054fffe9abcdef0 04 40 20 00       eth2
00000000000000000000000000000001 01 80 10 80       lo
";
        assert_eq!(autoconf_interfaces(table), vec!["eth1".to_string()]);
        assert!(autoconf_interfaces("garbage\n").is_empty());
    }

    use super::test_support::network as net;
    use super::*;

    #[test]
    fn invalid_definitions_are_refused() {
        let mut n = net();
        n.gateway = "10.78.0.1".parse().unwrap();
        assert!(validate_network(&n).is_err());
        let mut n = net();
        n.bridge = "a-very-long-bridge-name".into();
        assert!(validate_network(&n).is_err());
        assert!(validate_network(&net()).is_ok());
    }
}
