//! Which networks exist, which clients hold them, and when idle ones go away.
//!
//! A client's connection is its lease: [`Registry::disconnect`] drops every reference it
//! held. A network whose last client leaves is removed after the idle timeout unless an
//! acquire comes first, which gets the very same network back.
//!
//! Concurrency (docs/design.md): one map of networks and clients behind a std mutex that
//! is only ever held for a few field updates, never across an `.await`. Backend calls
//! for one network are serialized by that network's own async lock (`busy`), so work on
//! one network never waits for work on another. A network being created or removed is a
//! [`Phase`] others see: an acquire of it waits for that network's lock only, then finds
//! it active, or gone (and creates it anew).

use crate::backend::{
    AttachRequest, Attachment, Backend, BackendError, EndpointId, ForwardRequest, LeaseView,
    NetworkDetails,
};
use crate::config::Protocol;
use crate::config::{ConfigDir, ConfigError, Mode, NetworkConfig, name_hash};
use crate::error::chain;
use crate::mac::Mac;
use crate::policy::{self, Denied, Directory, Peer};
use crate::protocol::ForwardSpec;
use crate::state::{
    BrokerState, Changes, ClientRecord, Delta, EndpointRecord, Entry, ForwardRecord, Key,
    NetworkRecord, StateWriter,
};
use crate::steps::Steps;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::sync::{Mutex as NetworkLock, OwnedMutexGuard};
use tokio::time::Instant;
use tracing::{info, warn};

/// The original broker's limit: the 9th distinct network of one client fails.
pub const MAX_NETWORKS_PER_CLIENT: usize = 8;

/// Live TAPs one connection may hold (across its networks), root's included. What one
/// uid or all users may hold on one network are the network's own limits
/// ([`NetworkConfig::max_taps_per_uid`], [`NetworkConfig::max_nonroot_taps`]).
pub const MAX_TAPS_PER_CLIENT: usize = 64;

/// Dynamic port forwards one connection may hold at once.
pub const MAX_FORWARDS_PER_CLIENT: usize = 64;

/// Connections one non-root uid may have open at once, so one user cannot exhaust the
/// broker's file descriptors for everyone.
pub const MAX_CONNECTIONS_PER_UID: usize = 256;

pub type ClientId = u64;

/// How often at least an adopted network checks whether the endpoints no client of this
/// broker holds have been closed: a backend that reports closed endpoints
/// ([`Backend::endpoint_closed`]) makes it check at once, this is the safety net.
const ORPHAN_CHECK: Duration = Duration::from_secs(5);

/// Size of a network's map of endpoints handed out at which it is first pruned to the
/// live ones.
const PRUNE_HANDED_FROM: usize = 64;

/// A per-network TAP limit a non-root acquire ran into (the network file's
/// `max_taps_per_uid` and `max_nonroot_taps`). Only live TAPs count.
#[derive(Debug, thiserror::Error)]
pub enum TapLimit {
    #[error("uid {uid} already holds {held} TAPs on network {network:?} (at most {most})")]
    PerUid {
        uid: u32,
        network: String,
        held: usize,
        most: u32,
    },
    #[error(
        "non-root users already hold {held} TAPs on network {network:?} (at most {most}; the rest is reserved for root)"
    )]
    NonRoot {
        network: String,
        held: usize,
        most: u32,
    },
}

/// Why the registry refused or failed a request. The server maps each kind to a wire
/// error code; the message with its causes ([`crate::error::chain`]) goes to the log
/// and, on one line, to the client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error("unknown client")]
    UnknownClient,
    #[error("uid {uid} already has {open} connections open (at most {MAX_CONNECTIONS_PER_UID})")]
    TooManyConnections { uid: u32, open: usize },
    #[error("a client may hold at most {MAX_NETWORKS_PER_CLIENT} distinct networks")]
    TooManyNetworks,
    #[error("a client may hold at most {MAX_TAPS_PER_CLIENT} TAPs at once")]
    TooManyEndpoints,
    /// At the endpoint limit, and the backend cannot say which are still open: refused
    /// rather than forgetting the count.
    #[error(
        "a client may hold at most {MAX_TAPS_PER_CLIENT} TAPs at once, and which are still open is unknown"
    )]
    EndpointsUnknown(#[source] BackendError),
    #[error(transparent)]
    TapLimit(TapLimit),
    /// At a per-network TAP limit, and the backend cannot say which TAPs are still open:
    /// refused rather than forgetting the count.
    #[error("{limit}, and which of them are still open is unknown")]
    TapLimitUnknown {
        limit: TapLimit,
        #[source]
        source: BackendError,
    },
    #[error("no network named {0:?}")]
    NotFound(String),
    /// The host failed us (permissions, out of fds): not the client's fault, and not a
    /// verdict on the file.
    #[error("cannot read the definition of network {name:?}")]
    Unreadable {
        name: String,
        #[source]
        source: ConfigError,
    },
    #[error("network {name:?} has an invalid definition")]
    Invalid {
        name: String,
        #[source]
        source: ConfigError,
    },
    #[error(transparent)]
    NotAllowed(#[from] Denied),
    #[error("mac {mac} is in use on network {network:?} by {endpoint}")]
    MacInUse {
        mac: Mac,
        network: String,
        endpoint: EndpointId,
    },
    #[error("cannot create network {name:?}")]
    Create {
        name: String,
        #[source]
        source: BackendError,
    },
    #[error("cannot attach to network {name:?}")]
    Attach {
        name: String,
        #[source]
        source: BackendError,
    },
    /// A forward names a TAP this connection did not acquire on that network.
    #[error("interface {interface:?} is not a TAP this connection acquired on network {network:?}")]
    NotYourEndpoint { interface: String, network: String },
    /// Ports below 1024 are the host's privileged ports: only root may forward them.
    #[error("only root may forward a port below 1024 (asked for {port}, by uid {uid})")]
    PrivilegedPort { port: u16, uid: u32 },
    #[error("a connection may hold at most {MAX_FORWARDS_PER_CLIENT} port forwards")]
    TooManyForwards,
    #[error("cannot forward {protocol} port {port} on network {network:?}")]
    Forward {
        network: String,
        protocol: &'static str,
        port: u16,
        #[source]
        source: BackendError,
    },
    /// A blocking lookup (user database, definition file) panicked or was cancelled.
    #[error("a lookup on a blocking thread failed")]
    Lookup(#[source] tokio::task::JoinError),
    /// The acquire's own task panicked.
    #[error("the acquire failed unexpectedly")]
    Task(#[source] tokio::task::JoinError),
}

/// What a successful acquire hands the server: the network as the client is told of it,
/// the guest MAC, and the endpoint itself.
#[derive(Debug)]
pub struct Acquired<E> {
    pub network: String,
    pub mode: Mode,
    pub details: NetworkDetails,
    pub mac: [u8; 6],
    pub attachment: Attachment<E>,
}

/// The registry's state at one moment, for `status`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub idle_timeout: Duration,
    /// Networks that exist (active, or being removed), by name.
    pub networks: Vec<NetworkSnapshot>,
    pub clients: Vec<ClientSnapshot>,
}

#[derive(Debug, Clone)]
pub struct NetworkSnapshot {
    pub name: String,
    pub mode: Mode,
    pub details: NetworkDetails,
    pub clients: usize,
    /// Endpoints still open; empty if the backend could not say (logged).
    pub endpoints: Vec<EndpointId>,
    pub removal_in: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct ClientSnapshot {
    pub id: ClientId,
    pub peer: Peer,
    pub networks: Vec<String>,
}

/// Where a network the broker knows is in its life, for `list` and `show`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NetworkState {
    /// Defined, not created.
    Inactive,
    /// Created, and held or being acquired.
    Active,
    /// Created, held by nobody: removed after `removal_in`.
    Idle { removal_in: Duration },
    /// Being removed now.
    Removing,
}

/// The open connection an endpoint was handed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub client: ClientId,
    pub pid: i32,
    pub uid: u32,
}

/// An open endpoint of a network and what the registry knows of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapView {
    pub endpoint: EndpointId,
    /// The guest MAC it was handed out with, and the uid it went to (unknown only for an
    /// endpoint the registry did not make).
    pub mac: Option<[u8; 6]>,
    pub uid: Option<u32>,
    /// `None` once the connection that acquired it closed (its VM may still hold it).
    pub holder: Option<Holder>,
}

/// A network as `list` and `show` see it.
#[derive(Debug, Clone)]
pub struct NetworkView {
    pub name: String,
    /// The definition it was created from while it exists, else its current one.
    pub config: NetworkConfig,
    pub state: NetworkState,
    /// What the backend made, while the network exists.
    pub details: Option<NetworkDetails>,
    pub clients: usize,
    pub taps: Vec<TapView>,
    /// The dynamic port forwards clients hold on it (the static ones are in `config`).
    pub forwards: Vec<ForwardView>,
}

/// A lease of a network's services, with the TAP its MAC belongs to.
#[derive(Debug, Clone)]
pub struct LeaseEntry {
    pub network: String,
    pub lease: LeaseView,
    pub tap: Option<TapView>,
}

/// A network that exists, as the backend made it. Shared (`Arc`) so backend calls on it
/// run without the registry's lock.
struct Live<N> {
    handle: N,
    config: NetworkConfig,
    details: NetworkDetails,
    /// The overlay peers a reload gave the live network ([`Registry::set_overlay_peers`]),
    /// which replace those of `config`; `None` until one did.
    peers: std::sync::Mutex<Option<Vec<std::net::IpAddr>>>,
}

impl<N> Live<N> {
    /// The definition the network now runs with: `config` with the peers a reload gave.
    fn current_config(&self) -> NetworkConfig {
        let mut config = self.config.clone();
        if let (Some(peers), Some(vxlan)) = (
            self.peers.lock().expect("not poisoned").clone(),
            config.vxlan.as_mut(),
        ) {
            vxlan.peers = peers;
        }
        config
    }
}

/// Whether `new` differs from `old` in the overlay's peers only (a host joining or leaving
/// a network that spans hosts), which a live network can take without being made again.
fn only_peers_changed(old: &NetworkConfig, new: &NetworkConfig) -> bool {
    let (Some(o), Some(n)) = (&old.vxlan, &new.vxlan) else {
        return false;
    };
    if o.group.is_some() || o.peers == n.peers {
        return false;
    }
    let mut same = new.clone();
    if let Some(v) = same.vxlan.as_mut() {
        v.peers = o.peers.clone();
    }
    // What the rest of the directory says or how the file was worded is not the network.
    same.fixed_elsewhere = old.fixed_elsewhere.clone();
    same.warnings = old.warnings.clone();
    same == *old
}

/// Where a network is in its life. Only `Active` networks have a backend handle.
enum Phase<N> {
    /// Its first acquire is reading its definition and creating it, holding `busy`.
    Creating,
    Active(Arc<Live<N>>),
    /// Being destroyed, by whoever holds `busy`; an acquire waits, then creates it anew.
    /// Still listed by `status` (with its removal due now): it is still there.
    Removing(Arc<Live<N>>),
}

struct Network<N> {
    /// Tells this incarnation from a later one of the same name.
    instance: u64,
    phase: Phase<N>,
    /// Serializes the backend calls for this network (create, attach, release, destroy);
    /// held across them, and never by anything that concerns another network.
    busy: Arc<NetworkLock<()>>,
    clients: BTreeSet<ClientId>,
    /// Acquires under way: the network is not idle while there are any.
    pending: usize,
    /// Endpoints attached so far; names and MACs derive from it.
    serial: u64,
    /// Each endpoint handed out: its guest MAC, so no MAC (requested or suggested) is
    /// given to two live endpoints at once, and the uid it went to, for the TAP limits.
    /// Pruned to the live endpoints whenever it has doubled since the last pruning (so it
    /// follows them at an amortized constant cost) and when an acquire is at a limit.
    handed: BTreeMap<EndpointId, Handed>,
    prune_handed_at: usize,
    /// When the idle removal is due, while no client holds the network.
    removal_at: Option<Instant>,
    /// Bumped whenever the network is acquired again, so a stale timer does nothing.
    generation: u64,
    /// Endpoints of a network adopted from a previous broker that a VM still holds open
    /// while no client of this broker holds them (their connections died with the old
    /// broker). The network is not idle while any is left ([`Registry::adopt`]).
    orphans: BTreeSet<EndpointId>,
}

/// What the registry remembers of an endpoint it handed out.
#[derive(Debug, Clone, Copy)]
struct Handed {
    mac: [u8; 6],
    uid: u32,
    /// Made to outlive its handle: recorded so a restarted broker knows it.
    persistent: bool,
    /// The client it went to; None when adopted from a previous broker's record.
    client: Option<ClientId>,
}

struct Client {
    peer: Peer,
    networks: BTreeSet<String>,
    /// Endpoints handed to this client, as (network, endpoint), pruned to the live ones
    /// when the client reaches [`MAX_TAPS_PER_CLIENT`].
    taps: Vec<(String, EndpointId)>,
    /// Persistent endpoints made for this client, as (network, endpoint): they do not
    /// go away with their handle, so they go when the client does.
    persistent: Vec<(String, EndpointId)>,
    /// Dynamic port forwards made for this client, ended when it goes.
    forwards: Vec<ClientForward>,
}

/// A dynamic port forward a client holds: on which incarnation of which network.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClientForward {
    network: String,
    instance: u64,
    protocol: Protocol,
    external_port: u16,
    internal_port: u16,
    endpoint: EndpointId,
}

/// A dynamic port forward as `show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardView {
    pub protocol: Protocol,
    pub external_port: u16,
    pub internal_port: u16,
    pub endpoint: EndpointId,
    pub client: ClientId,
}

struct State<N> {
    networks: BTreeMap<String, Network<N>>,
    /// Changed only through [`State::add_client`] and [`State::remove_client`], which
    /// keep `connections_per_uid` in step.
    clients: BTreeMap<ClientId, Client>,
    /// Open connections per uid, for [`MAX_CONNECTIONS_PER_UID`]: counting them in
    /// `clients` on every connect cost O(clients) under the lock.
    connections_per_uid: BTreeMap<u32, usize>,
    next_client: ClientId,
    next_instance: u64,
    /// Set once the broker is going down: no new clients, no new networks.
    closed: bool,
    /// What changed since the state writer last looked ([`Registry::record`]).
    changes: Changes,
}

pub struct Registry<B: Backend> {
    backend: B,
    config: ConfigDir,
    directory: Arc<dyn Directory>,
    idle_timeout: Duration,
    /// Held for field updates only, never across an `.await`.
    state: Mutex<State<B::Network>>,
    /// Where every change is recorded for a restarted broker (`state`), once set.
    persist: OnceLock<StateWriter>,
    /// How often an adopted network's orphaned endpoints are checked for being closed.
    orphan_check: Duration,
    /// This host's identity ([`host_id`]), mixed into the MACs suggested on networks that
    /// span hosts so that two hosts never suggest the same one; 0 until set.
    host: OnceLock<u32>,
}

/// A stable 32-bit identity of this host from `text` (its /etc/machine-id, or what the
/// administrator or a test gives), for [`overlay_guest_mac`].
pub fn host_id(text: &str) -> u32 {
    name_hash(text.trim())
}

/// The suggested guest MAC for endpoint `serial` of network `name` when the network spans
/// hosts ([`crate::config::Vxlan`]): three bytes from the network name and the host's
/// identity `host`, so hosts sharing the network suggest different MACs (two given hosts
/// collide with a chance of 1 in 2^24), and two from the serial. A host keeps its MACs
/// across restarts as long as its identity stays.
pub fn overlay_guest_mac(name: &str, host: u32, serial: u64) -> [u8; 6] {
    let h = name_hash(&format!("{host:08x}/{name}"));
    let s = (serial & 0xffff) as u16;
    [
        0x52,
        (h >> 16) as u8,
        (h >> 8) as u8,
        h as u8,
        (s >> 8) as u8,
        s as u8,
    ]
}

/// The suggested guest MAC for endpoint `serial` of network `name`: locally administered,
/// unicast, two bytes from the network name (so one VM's NICs on different networks
/// differ) and three from the serial (so NICs on one network never collide).
pub fn guest_mac(name: &str, serial: u64) -> [u8; 6] {
    let h = name_hash(name);
    let s = (serial & 0xff_ffff) as u32;
    [
        0x52,
        (h >> 8) as u8,
        h as u8,
        (s >> 16) as u8,
        (s >> 8) as u8,
        s as u8,
    ]
}

/// What one acquire asks for.
struct Ask {
    client: ClientId,
    peer: Peer,
    requested_mac: Option<[u8; 6]>,
    persistent: bool,
}

/// How an acquire got hold of its network.
enum Claim {
    /// The network did not exist: this acquire creates it (holding its lock).
    Create(u64, OwnedMutexGuard<()>),
    /// It exists or is being created or removed: wait for its lock.
    Join(u64, Arc<NetworkLock<()>>),
}

impl<N> State<N> {
    fn add_client(&mut self, id: ClientId, client: Client) {
        *self.connections_per_uid.entry(client.peer.uid).or_default() += 1;
        self.clients.insert(id, client);
    }

    fn remove_client(&mut self, id: ClientId) -> Option<Client> {
        let client = self.clients.remove(&id)?;
        if let std::collections::btree_map::Entry::Occupied(mut open) =
            self.connections_per_uid.entry(client.peer.uid)
        {
            *open.get_mut() -= 1;
            if *open.get() == 0 {
                open.remove();
            }
        }
        Some(client)
    }
}

impl<B: Backend> Registry<B> {
    pub fn new(
        backend: B,
        config: ConfigDir,
        directory: Box<dyn Directory>,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            backend,
            config,
            directory: Arc::from(directory),
            idle_timeout,
            state: Mutex::new(State {
                networks: BTreeMap::new(),
                clients: BTreeMap::new(),
                connections_per_uid: BTreeMap::new(),
                next_client: 1,
                next_instance: 1,
                closed: false,
                changes: Changes::default(),
            }),
            persist: OnceLock::new(),
            orphan_check: ORPHAN_CHECK,
            host: OnceLock::new(),
        })
    }

    /// From now on every change is recorded in the state file in `dir` (and the current
    /// state at once).
    pub fn persist(self: &Arc<Self>, dir: std::path::PathBuf) {
        let registry = Arc::downgrade(self);
        let snapshot = Box::new(move |full| registry.upgrade().map(|r| r.delta(full)));
        if self.persist.set(StateWriter::start(dir, snapshot)).is_ok() {
            let mut st = self.lock();
            self.record(&mut st, None);
        }
    }

    /// Waits until every recorded change is on disk.
    pub async fn flush_state(&self) {
        if let Some(writer) = self.persist.get() {
            writer.flush().await;
        }
    }

    /// Marks what a change touched (`key`; `None`: anything may have) and tells the
    /// state writer. Called under the map lock right after the change; the writer turns
    /// the marks into records later ([`Self::delta`]), so a change costs O(1) here and
    /// O(what it touched) there, however many clients there are.
    fn record(&self, st: &mut State<B::Network>, key: Option<Key>) {
        match key {
            Some(key) => st.changes.mark(key),
            None => st.changes.mark_all(),
        }
        if let Some(writer) = self.persist.get() {
            writer.changed();
        }
    }

    /// [`Self::record`] for a change its caller flushes ([`Self::flush_state`]) before it
    /// answers: an acquire. The flush writes it; the writer is not woken for it.
    fn record_for_flush(&self, st: &mut State<B::Network>, key: Key) {
        st.changes.mark(key);
        if let Some(writer) = self.persist.get() {
            writer.changed_for_flush();
        }
    }

    /// Marks a change without telling the writer yet: the caller's next [`Self::record`]
    /// (or anyone's) carries it.
    fn mark(st: &mut State<B::Network>, key: Key) {
        st.changes.mark(key);
    }

    /// What to write for the changes marked since the last call: the whole state when
    /// `full` or when anything may have changed, else one entry per thing touched.
    fn delta(&self, full: bool) -> Delta {
        let mut st = self.lock();
        let changes = st.changes.take();
        if full || changes.all {
            return Delta::Full(Self::snapshot(&st));
        }
        let entries = changes
            .keys
            .into_iter()
            .map(|key| match key {
                Key::Network(name) => match st.networks.get(&name) {
                    Some(net) => match Self::network_record(net) {
                        Some(record) => Entry::Network(Box::new(record)),
                        None => Entry::NetworkGone(name),
                    },
                    None => Entry::NetworkGone(name),
                },
                Key::Endpoint(network, id) => {
                    let found = st
                        .networks
                        .get(&network)
                        .filter(|net| matches!(net.phase, Phase::Active(_)))
                        .and_then(|net| {
                            let handed = net.handed.get(&EndpointId(id.clone()))?;
                            Some((net.serial, handed))
                        });
                    match found {
                        Some((serial, h)) => Entry::Endpoint {
                            network,
                            serial,
                            endpoint: Self::endpoint_record(&id, h),
                        },
                        None => Entry::EndpointGone { network, id },
                    }
                }
                Key::Client(id) => match st.clients.get(&id) {
                    Some(c) => Entry::Client(Self::client_record(id, c)),
                    None => Entry::ClientGone(id),
                },
            })
            .collect();
        Delta::Entries(entries)
    }

    fn endpoint_record(id: &str, h: &Handed) -> EndpointRecord {
        EndpointRecord {
            id: id.to_string(),
            uid: h.uid,
            mac: Mac::from(h.mac),
            persistent: h.persistent,
        }
    }

    /// The record of a network, if it is active: one being created has nothing yet, and
    /// one being removed is half gone (what a crash leaves of it is stale).
    fn network_record(net: &Network<B::Network>) -> Option<NetworkRecord> {
        let Phase::Active(live) = &net.phase else {
            return None;
        };
        Some(NetworkRecord {
            config: live.current_config(),
            subnet: live.details.subnet,
            gateway: live.details.gateway,
            platform: live
                .details
                .platform
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            serial: net.serial,
            endpoints: net
                .handed
                .iter()
                .map(|(id, h)| Self::endpoint_record(&id.0, h))
                .collect(),
        })
    }

    fn client_record(id: ClientId, c: &Client) -> ClientRecord {
        ClientRecord {
            id,
            pid: c.peer.pid,
            uid: c.peer.uid,
            gid: c.peer.gid,
            groups: c.peer.groups.as_deref().map(<[u32]>::to_vec),
            networks: c.networks.iter().cloned().collect(),
            endpoints: c
                .taps
                .iter()
                .map(|(n, e)| (n.clone(), e.0.clone()))
                .collect(),
            persistent: c
                .persistent
                .iter()
                .map(|(n, e)| (n.clone(), e.0.clone()))
                .collect(),
            forwards: c
                .forwards
                .iter()
                .map(|f| ForwardRecord {
                    network: f.network.clone(),
                    protocol: f.protocol,
                    external_port: f.external_port,
                    internal_port: f.internal_port,
                    endpoint: f.endpoint.0.clone(),
                })
                .collect(),
        }
    }

    /// What exists now, as the state file records it.
    fn snapshot(st: &State<B::Network>) -> BrokerState {
        BrokerState {
            version: crate::state::VERSION,
            networks: st
                .networks
                .values()
                .filter_map(Self::network_record)
                .collect(),
            clients: st
                .clients
                .iter()
                .map(|(id, c)| Self::client_record(*id, c))
                .collect(),
        }
    }

    /// Takes over the networks a previous broker recorded (`state`), before serving:
    /// the backend finds and re-arms each one as it is ([`Backend::adopt`]). A network
    /// that cannot be adopted is logged and left to [`Backend::remove_stale`]; one no VM
    /// holds any more is removed. Endpoints a VM still holds keep their network alive
    /// until the last one is closed; then the normal idle removal runs. Returns the
    /// names of the networks adopted.
    ///
    /// `clients` are the previous broker's clients whose connections the service manager
    /// handed back (its fd store): they are registered again under their ids, holding
    /// what they held, and the server serves their connections as before.
    pub async fn adopt(
        self: &Arc<Self>,
        records: Vec<NetworkRecord>,
        clients: Vec<ClientRecord>,
    ) -> Vec<String> {
        // The restored clients' dynamic forwards, made again once their networks are
        // adopted.
        let mut recorded_forwards: Vec<(ClientId, ForwardRecord)> = vec![];
        // (id, pid, uid, networks) of each restored client, logged after the lock.
        let mut restored = Vec::with_capacity(clients.len());
        {
            let mut st = self.lock();
            for mut c in clients {
                recorded_forwards.extend(
                    std::mem::take(&mut c.forwards)
                        .into_iter()
                        .map(|f| (c.id, f)),
                );
                st.next_client = st.next_client.max(c.id + 1);
                let endpoints = |list: Vec<(String, String)>| {
                    list.into_iter()
                        .map(|(n, e)| (n, EndpointId(e)))
                        .collect::<Vec<_>>()
                };
                restored.push((c.id, c.pid, c.uid, c.networks.clone()));
                st.add_client(
                    c.id,
                    Client {
                        peer: Peer {
                            pid: c.pid,
                            uid: c.uid,
                            gid: c.gid,
                            groups: c.groups.map(Into::into),
                        },
                        networks: c.networks.into_iter().collect(),
                        taps: endpoints(c.endpoints),
                        persistent: endpoints(c.persistent),
                        // Made again below, once their networks are adopted.
                        forwards: Vec::new(),
                    },
                );
            }
        }
        for (client, client_pid, client_uid, networks) in restored {
            info!(
                client,
                client_pid,
                client_uid,
                ?networks,
                "client restored from the previous broker"
            );
        }
        let mut adopted = vec![];
        for record in records {
            let name = record.config.name.clone();
            if self.lock().networks.contains_key(&name) {
                warn!(network = %name, "recorded twice in the state file: adopting it once");
                continue;
            }
            let handle = match self.backend.adopt(&record).await {
                Ok(handle) => handle,
                Err(e) => {
                    warn!(network = %name, "cannot adopt the network of the previous broker, removing it: {}", chain(&e));
                    continue;
                }
            };
            let details = self.backend.details(&handle);
            let live = match self.backend.live_endpoints(&handle).await {
                Ok(live) => live,
                Err(e) => {
                    // Unknown is not none: every recorded endpoint is kept as live.
                    warn!(network = %name, "cannot list the adopted network's endpoints: {}", chain(&e));
                    record
                        .endpoints
                        .iter()
                        .map(|e| EndpointId(e.id.clone()))
                        .collect()
                }
            };
            let handed: BTreeMap<EndpointId, Handed> = record
                .endpoints
                .iter()
                .map(|e| (EndpointId(e.id.clone()), e))
                .filter(|(id, _)| live.contains(id))
                .map(|(id, e)| {
                    (
                        id,
                        Handed {
                            mac: e.mac.into(),
                            uid: e.uid,
                            persistent: e.persistent,
                            client: None,
                        },
                    )
                })
                .collect();
            let holders: BTreeSet<ClientId> = self
                .lock()
                .clients
                .iter()
                .filter(|(_, c)| c.networks.contains(&name))
                .map(|(id, _)| *id)
                .collect();
            // The restored clients' endpoints are theirs; the rest are orphans.
            let orphans: BTreeSet<EndpointId> = {
                let st = self.lock();
                handed
                    .keys()
                    .filter(|id| {
                        !st.clients
                            .values()
                            .any(|c| c.taps.iter().any(|(n, e)| *n == name && e == *id))
                    })
                    .cloned()
                    .collect()
            };
            if orphans.is_empty() && holders.is_empty() {
                // No VM holds it any more: removed now, as a previous broker's leftovers
                // always were, rather than kept for an idle timeout nobody waits for.
                match self.backend.destroy(&handle).await {
                    Ok(()) => {
                        info!(network = %name, "network of the previous broker unused: removed")
                    }
                    Err(e) => {
                        warn!(network = %name, "cannot remove the previous broker's unused network: {}", chain(&e))
                    }
                }
                continue;
            }
            info!(
                network = %name,
                subnet = %details.subnet,
                gateway = %details.gateway,
                platform = ?details.platform,
                endpoints = orphans.len(),
                "network adopted from the previous broker"
            );
            let mut st = self.lock();
            let instance = st.next_instance;
            st.next_instance += 1;
            let mut net = Network {
                instance,
                phase: Phase::Active(Arc::new(Live {
                    handle,
                    config: record.config,
                    details,
                    peers: std::sync::Mutex::new(None),
                })),
                busy: Arc::new(NetworkLock::new(())),
                clients: holders,
                pending: 0,
                serial: record.serial,
                prune_handed_at: (handed.len() * 2).max(PRUNE_HANDED_FROM),
                handed,
                removal_at: None,
                generation: 0,
                orphans,
            };
            let idle = if net.orphans.is_empty() {
                self.schedule_if_idle(&name, &mut net)
            } else {
                self.watch_orphans(&name, instance);
                false
            };
            st.networks.insert(name.clone(), net);
            self.record(&mut st, Some(Key::Network(name.clone())));
            drop(st);
            if idle {
                self.log_idle(&name);
            }
            adopted.push(name);
        }
        // A restored client keeps only what was adopted.
        {
            let mut st = self.lock();
            let State {
                clients, networks, ..
            } = &mut *st;
            for c in clients.values_mut() {
                c.networks.retain(|n| networks.contains_key(n));
                c.taps.retain(|(n, _)| networks.contains_key(n));
                c.persistent.retain(|(n, _)| networks.contains_key(n));
            }
        }
        for (client, f) in recorded_forwards {
            self.readopt_forward(client, f).await;
        }
        self.record(&mut self.lock(), None);
        adopted
    }

    /// Makes a restored client's dynamic forward again (the previous broker's host port
    /// closed with it; its rules are rewritten), when the client still holds the
    /// endpoint on an adopted network. One that cannot be made is logged and dropped.
    async fn readopt_forward(self: &Arc<Self>, client: ClientId, f: ForwardRecord) {
        let endpoint = EndpointId(f.endpoint.clone());
        let found = {
            let st = self.lock();
            let holds = st.clients.get(&client).is_some_and(|c| {
                c.taps
                    .iter()
                    .any(|(n, e)| *n == f.network && *e == endpoint)
            });
            st.networks
                .get(&f.network)
                .and_then(|net| match &net.phase {
                    Phase::Active(live) if holds => net
                        .handed
                        .get(&endpoint)
                        .map(|h| (Arc::clone(live), net.instance, h.mac)),
                    _ => None,
                })
        };
        let Some((live, instance, mac)) = found else {
            info!(client, network = %f.network, port = f.external_port,
                  "port forward of the previous broker dropped: its endpoint is gone");
            return;
        };
        let request = ForwardRequest {
            protocol: f.protocol,
            external_port: f.external_port,
            internal_port: f.internal_port,
            endpoint: endpoint.clone(),
            mac,
        };
        if let Err(e) = self.backend.forward(&live.handle, &request).await {
            warn!(client, network = %f.network, port = f.external_port,
                  "cannot make the previous broker's port forward again: {}", chain(&e));
            return;
        }
        let kept = match self.lock().clients.get_mut(&client) {
            Some(c) => {
                c.forwards.push(ClientForward {
                    network: f.network.clone(),
                    instance,
                    protocol: f.protocol,
                    external_port: f.external_port,
                    internal_port: f.internal_port,
                    endpoint,
                });
                true
            }
            None => false,
        };
        if kept {
            info!(client, network = %f.network, port = f.external_port,
                  "port forward of the previous broker made again");
        } else if let Err(e) = self
            .backend
            .unforward(&live.handle, f.protocol, f.external_port, &request.endpoint)
            .await
        {
            warn!(client, network = %f.network, "cannot end a port forward: {}", chain(&e));
        }
    }

    /// Follows the orphaned endpoints of an adopted network until none is open any more,
    /// then lets the network go idle like any other.
    fn watch_orphans(self: &Arc<Self>, name: &str, instance: u64) {
        let this = Arc::clone(self);
        let name = name.to_string();
        tokio::spawn(async move {
            loop {
                let live = {
                    let st = this.lock();
                    let Some(net) = st.networks.get(&name).filter(|n| n.instance == instance)
                    else {
                        return;
                    };
                    let Phase::Active(live) = &net.phase else {
                        return;
                    };
                    Arc::clone(live)
                };
                // Watching before listing: a closure after the listing wakes the wait.
                let closed = this
                    .backend
                    .endpoint_closed(&live.handle, this.orphan_check);
                // An error means "unknown": keep them and ask again.
                let Ok(open) = this.backend.live_endpoints(&live.handle).await else {
                    closed.await;
                    continue;
                };
                // (gone, idle removal scheduled)
                let (done, idle) = {
                    let mut st = this.lock();
                    match st
                        .networks
                        .get_mut(&name)
                        .filter(|n| n.instance == instance)
                    {
                        None => (true, None),
                        Some(net) => {
                            net.orphans.retain(|e| open.contains(e));
                            if net.orphans.is_empty() {
                                (true, Some(this.schedule_if_idle(&name, net)))
                            } else {
                                (false, None)
                            }
                        }
                    }
                };
                if let Some(idle) = idle {
                    info!(network = %name, "the last endpoint of the previous broker's clients is closed");
                    if idle {
                        this.log_idle(&name);
                    }
                }
                if done {
                    return;
                }
                closed.await;
            }
        });
    }

    /// Gives the live network `name` the overlay peers of its new definition `new` (a
    /// reload, SIGHUP), when they are all that changed: a host joins or leaves a network
    /// that spans hosts without its VMs noticing. `Ok(false)` when nothing was applied (the
    /// network is not active, something else changed too, or the backend has no overlays):
    /// the new definition then waits for the network to be made again, as any other.
    pub async fn set_overlay_peers(
        &self,
        name: &str,
        new: &NetworkConfig,
    ) -> Result<bool, BackendError> {
        let Some((instance, busy)) = self
            .lock()
            .networks
            .get(name)
            .map(|n| (n.instance, Arc::clone(&n.busy)))
        else {
            return Ok(false);
        };
        // Serialized with the network's other backend calls, and only while it is the
        // same incarnation and active.
        let _guard = busy.lock().await;
        let live = match self.lock().networks.get(name) {
            Some(n) if n.instance == instance => match &n.phase {
                Phase::Active(live) => Arc::clone(live),
                _ => return Ok(false),
            },
            _ => return Ok(false),
        };
        let Some(peers) = new.vxlan.as_ref().map(|v| v.peers.clone()) else {
            return Ok(false);
        };
        if !only_peers_changed(&live.current_config(), new) {
            return Ok(false);
        }
        if !self.backend.set_overlay_peers(&live.handle, &peers).await? {
            return Ok(false);
        }
        *live.peers.lock().expect("not poisoned") = Some(peers);
        self.record(&mut self.lock(), Some(Key::Network(name.to_string())));
        Ok(true)
    }

    /// Sets this host's identity ([`host_id`]) once, before the first acquire; later
    /// calls are ignored, so suggested MACs never change while the broker runs.
    pub fn set_host_id(&self, id: u32) {
        let _ = self.host.set(id);
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn lock(&self) -> MutexGuard<'_, State<B::Network>> {
        // Every critical section leaves the state consistent before anything can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The credentials client `id` connected with, if it is known.
    pub fn peer_of(&self, id: ClientId) -> Option<Peer> {
        self.lock().clients.get(&id).map(|c| c.peer.clone())
    }

    /// Registers a newly connected client. Fails once the broker is shutting down.
    pub async fn connect(&self, peer: Peer) -> Result<ClientId, RegistryError> {
        let mut st = self.lock();
        if st.closed {
            return Err(RegistryError::ShuttingDown);
        }
        if peer.uid != 0 {
            let open = st.connections_per_uid.get(&peer.uid).copied().unwrap_or(0);
            if open >= MAX_CONNECTIONS_PER_UID {
                drop(st);
                warn!(
                    client_pid = peer.pid,
                    client_uid = peer.uid,
                    "connection refused: {open} open"
                );
                return Err(RegistryError::TooManyConnections {
                    uid: peer.uid,
                    open,
                });
            }
        }
        let id = st.next_client;
        st.next_client += 1;
        st.add_client(
            id,
            Client {
                peer: peer.clone(),
                networks: BTreeSet::new(),
                taps: Vec::new(),
                persistent: Vec::new(),
                forwards: Vec::new(),
            },
        );
        let clients = st.clients.len();
        self.record(&mut st, Some(Key::Client(id)));
        drop(st);
        info!(
            client = id,
            client_pid = peer.pid,
            client_uid = peer.uid,
            clients,
            "client connected"
        );
        Ok(id)
    }

    /// Acquires `name` for `client`: creates the network on first use, then attaches a new
    /// endpoint. The client's reference counts once however often it acquires.
    ///
    /// Runs to its end on a task of its own even if the caller stops waiting: a network
    /// half created, or an acquire counted as pending and never settled, would otherwise
    /// stay behind. (An endpoint nobody receives is dropped, which closes it.)
    ///
    /// The new endpoint's state record is written by the caller's [`Self::flush_state`],
    /// which must come before the caller answers (so a broker killed after the answer
    /// still adopts the endpoint); until then the state writer is not woken for it.
    pub async fn acquire(
        self: &Arc<Self>,
        client: ClientId,
        name: &str,
        requested_mac: Option<[u8; 6]>,
        persistent: bool,
    ) -> Result<Acquired<B::Endpoint>, RegistryError> {
        let this = Arc::clone(self);
        let network = name.to_string();
        let task = tokio::spawn(async move {
            this.try_acquire(client, &network, requested_mac, persistent)
                .await
        });
        let result = match task.await {
            Ok(result) => result,
            Err(e) => Err(RegistryError::Task(e)),
        };
        if let Err(e) = &result {
            let peer = self.lock().clients.get(&client).map(|c| c.peer.clone());
            warn!(
                client,
                client_pid = peer.as_ref().map(|p| p.pid),
                client_uid = peer.as_ref().map(|p| p.uid),
                network = name,
                // The protocol's code (docs/protocol.md), journald's ERROR_CODE=.
                error_code = crate::answers::wire_error(e).code.code(),
                "acquire refused: {}",
                chain(e)
            );
        }
        result
    }

    async fn try_acquire(
        self: &Arc<Self>,
        client: ClientId,
        name: &str,
        requested_mac: Option<[u8; 6]>,
        persistent: bool,
    ) -> Result<Acquired<B::Endpoint>, RegistryError> {
        let mut steps = Steps::start();
        let peer = self.admit(client, name).await?;
        steps.lap("admit");
        loop {
            let (instance, guard, live) = match self.claim(name)? {
                Claim::Create(instance, guard) => match self.create(name, instance, &peer).await {
                    Ok(live) => {
                        steps.lap("create");
                        (instance, guard, live)
                    }
                    Err(e) => {
                        let mut st = self.lock();
                        if st
                            .networks
                            .get(name)
                            .is_some_and(|n| n.instance == instance)
                        {
                            st.networks.remove(name);
                        }
                        return Err(e);
                    }
                },
                Claim::Join(instance, busy) => {
                    let guard = busy.lock_owned().await;
                    steps.lap("lock");
                    // Whoever held the lock before has finished creating or removing it
                    // (both hold the lock throughout), so it is active or gone.
                    let live = match &self.lock().networks.get(name) {
                        Some(n) if n.instance == instance => match &n.phase {
                            Phase::Active(live) => Some(Arc::clone(live)),
                            Phase::Creating | Phase::Removing(_) => None,
                        },
                        _ => None,
                    };
                    // Gone (removed, or its creation failed): start over, creating it.
                    let Some(live) = live else { continue };
                    if let Err(e) = self.allowed(&live.config, &peer).await {
                        self.settle(name, instance);
                        return Err(e);
                    }
                    (instance, guard, live)
                }
            };
            let ask = Ask {
                client,
                peer,
                requested_mac,
                persistent,
            };
            let result = self.attach(name, instance, &live, ask).await;
            steps.lap("attach");
            self.settle(name, instance);
            drop(guard);
            steps.lap("settle");
            crate::log_steps!("acquire", name, steps);
            return result;
        }
    }

    /// The client's limits, before anything is done for it.
    async fn admit(&self, client: ClientId, name: &str) -> Result<Peer, RegistryError> {
        let handles = {
            let st = self.lock();
            let c = st
                .clients
                .get(&client)
                .ok_or(RegistryError::UnknownClient)?;
            if !c.networks.contains(name) && c.networks.len() >= MAX_NETWORKS_PER_CLIENT {
                return Err(RegistryError::TooManyNetworks);
            }
            if st.closed {
                return Err(RegistryError::ShuttingDown);
            }
            if c.taps.len() < MAX_TAPS_PER_CLIENT {
                return Ok(c.peer.clone());
            }
            c.networks
                .iter()
                .filter_map(|n| match &st.networks.get(n)?.phase {
                    Phase::Active(live) => Some((n.clone(), Arc::clone(live))),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        // At the limit: forget the endpoints that are gone (their VM closed them). If the
        // backend cannot say which, refuse rather than forget them all.
        let mut live = BTreeSet::new();
        for (network, handle) in handles {
            let endpoints = self
                .backend
                .live_endpoints(&handle.handle)
                .await
                .map_err(RegistryError::EndpointsUnknown)?;
            live.extend(endpoints.into_iter().map(|e| (network.clone(), e)));
        }
        let mut st = self.lock();
        let c = st
            .clients
            .get_mut(&client)
            .ok_or(RegistryError::UnknownClient)?;
        c.taps.retain(|tap| live.contains(tap));
        Self::mark(&mut st, Key::Client(client));
        let c = &st.clients[&client];
        if c.taps.len() >= MAX_TAPS_PER_CLIENT {
            return Err(RegistryError::TooManyEndpoints);
        }
        Ok(c.peer.clone())
    }

    /// Finds or inserts the network's entry and counts this acquire as pending on it.
    fn claim(&self, name: &str) -> Result<Claim, RegistryError> {
        let mut st = self.lock();
        if st.closed {
            return Err(RegistryError::ShuttingDown);
        }
        if let Some(net) = st.networks.get_mut(name) {
            net.pending += 1;
            return Ok(Claim::Join(net.instance, Arc::clone(&net.busy)));
        }
        let instance = st.next_instance;
        st.next_instance += 1;
        let busy = Arc::new(NetworkLock::new(()));
        let guard = Arc::clone(&busy)
            .try_lock_owned()
            .expect("a new lock is free");
        st.networks.insert(
            name.to_string(),
            Network {
                instance,
                phase: Phase::Creating,
                busy,
                clients: BTreeSet::new(),
                pending: 1,
                serial: 0,
                handed: BTreeMap::new(),
                prune_handed_at: PRUNE_HANDED_FROM,
                removal_at: None,
                generation: 0,
                orphans: BTreeSet::new(),
            },
        );
        Ok(Claim::Create(instance, guard))
    }

    /// Reads the definition, checks the peer against it and has the backend make the
    /// network. Runs holding the network's own lock only.
    async fn create(
        &self,
        name: &str,
        instance: u64,
        peer: &Peer,
    ) -> Result<Arc<Live<B::Network>>, RegistryError> {
        let dir = self.config.clone();
        let file = name.to_string();
        let config = match tokio::task::spawn_blocking(move || dir.load(&file))
            .await
            .map_err(RegistryError::Lookup)?
        {
            Ok(Some(config)) => config,
            Ok(None) => return Err(RegistryError::NotFound(name.to_string())),
            Err(source) if source.unreadable => {
                return Err(RegistryError::Unreadable {
                    name: name.to_string(),
                    source,
                });
            }
            Err(source) => {
                return Err(RegistryError::Invalid {
                    name: name.to_string(),
                    source,
                });
            }
        };
        self.allowed(&config, peer).await?;
        let handle =
            self.backend
                .create(&config)
                .await
                .map_err(|source| RegistryError::Create {
                    name: name.to_string(),
                    source,
                })?;
        let details = self.backend.details(&handle);
        info!(
            network = name,
            mode = %config.mode,
            subnet = %details.subnet,
            gateway = %details.gateway,
            platform = ?details.platform,
            "network created"
        );
        let live = Arc::new(Live {
            handle,
            config,
            details,
            peers: std::sync::Mutex::new(None),
        });
        let mut st = self.lock();
        let net = st
            .networks
            .get_mut(name)
            .filter(|n| n.instance == instance)
            .expect("a network being created stays until its creator is done");
        net.phase = Phase::Active(Arc::clone(&live));
        self.record(&mut st, Some(Key::Network(name.to_string())));
        Ok(live)
    }

    /// `policy::check` on a blocking thread when it needs the user database (NSS may
    /// ask a remote service), inline when it does not.
    async fn allowed(&self, config: &NetworkConfig, peer: &Peer) -> Result<(), RegistryError> {
        if !policy::needs_lookup(config, peer) {
            return Ok(());
        }
        let (config, peer, dir) = (config.clone(), peer.clone(), Arc::clone(&self.directory));
        tokio::task::spawn_blocking(move || policy::check(&config, &peer, dir.as_ref()))
            .await
            .map_err(RegistryError::Lookup)?
            .map_err(RegistryError::NotAllowed)
    }

    /// Picks the guest MAC and attaches a new endpoint; the caller holds the network's
    /// lock and has counted this acquire as pending.
    async fn attach(
        &self,
        name: &str,
        instance: u64,
        live: &Live<B::Network>,
        ask: Ask,
    ) -> Result<Acquired<B::Endpoint>, RegistryError> {
        let Ask {
            client,
            peer,
            requested_mac,
            persistent,
        } = ask;
        // The counts only shrink when endpoints close, and this acquire holds the
        // network's lock: no other attach can change them between check and attach.
        let (prune, at_limit) = {
            let st = self.lock();
            let net = Self::network(&st, name, instance);
            let at_limit = Self::tap_limit(net, name, &live.config, peer.uid);
            let prune = requested_mac.is_some()
                || at_limit.is_some()
                || net.handed.len() >= net.prune_handed_at;
            (prune, at_limit)
        };
        let mut steps = Steps::start();
        if prune {
            match (self.backend.live_endpoints(&live.handle).await, at_limit) {
                (Ok(endpoints), _) => {
                    let mut st = self.lock();
                    let net = Self::network_mut(&mut st, name, instance);
                    let mut gone = vec![];
                    net.handed.retain(|e, _| {
                        let live = endpoints.contains(e);
                        if !live {
                            gone.push(e.0.clone());
                        }
                        live
                    });
                    net.prune_handed_at = (2 * net.handed.len()).max(PRUNE_HANDED_FROM);
                    for id in gone {
                        Self::mark(&mut st, Key::Endpoint(name.to_string(), id));
                    }
                }
                // At a limit, the TAPs counted may all still be open: refuse rather than
                // forget them.
                (Err(source), Some(limit)) => {
                    return Err(RegistryError::TapLimitUnknown { limit, source });
                }
                // Keeping every MAC handed out can only refuse a MAC that is free, never
                // give one twice.
                (Err(e), None) => warn!(
                    network = name,
                    "cannot list live endpoints, keeping every MAC handed out: {}",
                    chain(&e)
                ),
            }
        }
        let request = {
            let mut st = self.lock();
            let net = Self::network_mut(&mut st, name, instance);
            if let Some(limit) = Self::tap_limit(net, name, &live.config, peer.uid) {
                return Err(RegistryError::TapLimit(limit));
            }
            let in_use =
                |handed: &BTreeMap<EndpointId, Handed>, mac| handed.values().any(|h| h.mac == mac);
            let mut serial = net.serial;
            let host = self.host.get().copied().unwrap_or(0);
            let suggest = |serial| match live.config.vxlan {
                Some(_) => overlay_guest_mac(name, host, serial),
                None => guest_mac(name, serial),
            };
            let mac = match requested_mac {
                // Suggestions are predictable, so another client may have asked for one
                // already: skip those in use.
                None => {
                    while in_use(&net.handed, suggest(serial)) {
                        serial += 1;
                    }
                    suggest(serial)
                }
                Some(mac) => {
                    if let Some((endpoint, _)) = net.handed.iter().find(|(_, h)| h.mac == mac) {
                        return Err(RegistryError::MacInUse {
                            mac: Mac::from(mac),
                            network: name.to_string(),
                            endpoint: endpoint.clone(),
                        });
                    }
                    mac
                }
            };
            net.serial = serial + 1;
            AttachRequest {
                serial,
                mac,
                peer: peer.clone(),
                persistent,
            }
        };
        steps.lap(if prune { "prune" } else { "mac" });
        let attachment = self
            .backend
            .attach(&live.handle, &request)
            .await
            .map_err(|source| RegistryError::Attach {
                name: name.to_string(),
                source,
            })?;
        steps.lap("backend");
        let mut st = self.lock();
        let net = Self::network_mut(&mut st, name, instance);
        let cancelled = net.removal_at.take().is_some();
        if cancelled {
            net.generation += 1;
        }
        net.clients.insert(client);
        let before = net.handed.insert(
            attachment.id.clone(),
            Handed {
                mac: request.mac,
                uid: peer.uid,
                persistent,
                client: Some(client),
            },
        );
        let net_clients = net.clients.len();
        // An endpoint the backend hands out again (a closed TAP back from its pool) is
        // no longer its previous client's, which may still be connected: it must not
        // count it, forward ports to it, nor have it recorded as its own.
        if let Some(before) = before
            && before.client != Some(client)
        {
            let held = (name.to_string(), attachment.id.clone());
            let previous: Vec<ClientId> = match before.client {
                Some(c) => vec![c],
                None => st
                    .clients
                    .keys()
                    .copied()
                    .filter(|c| *c != client)
                    .collect(),
            };
            for c in previous {
                if let Some(prev) = st.clients.get_mut(&c)
                    && prev.taps.contains(&held)
                {
                    prev.taps.retain(|t| *t != held);
                    // Its forwards to it ended when the backend took it back.
                    prev.forwards
                        .retain(|f| !(f.network == held.0 && f.endpoint == held.1));
                    Self::mark(&mut st, Key::Client(c));
                }
            }
        }
        let Some(entry) = st.clients.get_mut(&client) else {
            return Err(RegistryError::UnknownClient);
        };
        entry.networks.insert(name.to_string());
        entry.taps.push((name.to_string(), attachment.id.clone()));
        if persistent {
            entry
                .persistent
                .push((name.to_string(), attachment.id.clone()));
        }
        Self::mark(&mut st, Key::Client(client));
        // Both acquire servers flush before they answer (server.rs, xpc.rs).
        self.record_for_flush(
            &mut st,
            Key::Endpoint(name.to_string(), attachment.id.0.clone()),
        );
        drop(st);
        if cancelled {
            info!(network = name, "idle removal cancelled");
        }
        info!(
            client,
            client_pid = peer.pid,
            client_uid = peer.uid,
            network = name,
            endpoint = %attachment.id,
            mac = %Mac::from(request.mac),
            network_clients = net_clients,
            "network acquired"
        );
        steps.lap("book");
        crate::log_steps!("attach to the registry", name, steps);
        Ok(Acquired {
            network: name.to_string(),
            mode: live.config.mode,
            details: live.details.clone(),
            mac: request.mac,
            attachment,
        })
    }

    /// The per-network TAP limit a new TAP for `uid` would exceed, counting every
    /// endpoint handed out that is not known to be closed. Root has none: it may use
    /// every port the network has, including the reserve non-root users cannot take.
    fn tap_limit(
        net: &Network<B::Network>,
        name: &str,
        config: &NetworkConfig,
        uid: u32,
    ) -> Option<TapLimit> {
        if uid == 0 {
            return None;
        }
        let (mut mine, mut nonroot) = (0, 0);
        for h in net.handed.values().filter(|h| h.uid != 0) {
            nonroot += 1;
            if h.uid == uid {
                mine += 1;
            }
        }
        if mine >= config.max_taps_per_uid as usize {
            return Some(TapLimit::PerUid {
                uid,
                network: name.to_string(),
                held: mine,
                most: config.max_taps_per_uid,
            });
        }
        if nonroot >= config.max_nonroot_taps as usize {
            return Some(TapLimit::NonRoot {
                network: name.to_string(),
                held: nonroot,
                most: config.max_nonroot_taps,
            });
        }
        None
    }

    /// The entry of a network whose lock the caller holds: it cannot go away meanwhile.
    fn network<'a>(
        st: &'a State<B::Network>,
        name: &str,
        instance: u64,
    ) -> &'a Network<B::Network> {
        st.networks
            .get(name)
            .filter(|n| n.instance == instance)
            .expect("a network stays while its lock is held")
    }

    fn network_mut<'a>(
        st: &'a mut State<B::Network>,
        name: &str,
        instance: u64,
    ) -> &'a mut Network<B::Network> {
        st.networks
            .get_mut(name)
            .filter(|n| n.instance == instance)
            .expect("a network stays while its lock is held")
    }

    /// An acquire of the network is over (either way): if that leaves it idle, its
    /// removal is scheduled.
    fn settle(self: &Arc<Self>, name: &str, instance: u64) {
        let idle = {
            let mut st = self.lock();
            st.networks
                .get_mut(name)
                .filter(|n| n.instance == instance)
                .is_some_and(|net| {
                    net.pending -= 1;
                    self.schedule_if_idle(name, net)
                })
        };
        if idle {
            self.log_idle(name);
        }
    }

    /// Forwards the host's port to the guest behind one of `client`'s TAPs (the one
    /// `spec.interface` names, which the client must have acquired on that network) for
    /// as long as the client's connection and the TAP live. Ports below 1024 only for
    /// root. Returns the guest's address when the backend knows it already.
    pub async fn forward(
        self: &Arc<Self>,
        client: ClientId,
        spec: &ForwardSpec,
    ) -> Result<Option<IpAddr>, RegistryError> {
        let result = self.try_forward(client, spec).await;
        if let Err(e) = &result {
            warn!(client, network = %spec.network_name, "forward refused: {}", chain(e));
        }
        result
    }

    async fn try_forward(
        self: &Arc<Self>,
        client: ClientId,
        spec: &ForwardSpec,
    ) -> Result<Option<IpAddr>, RegistryError> {
        let protocol = match spec.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            _ => Protocol::Udp,
        };
        let name = spec.network_name.as_str();
        let endpoint = EndpointId(spec.interface.clone());
        let not_yours = || RegistryError::NotYourEndpoint {
            interface: spec.interface.clone(),
            network: name.to_string(),
        };
        let (busy, instance) = {
            let st = self.lock();
            let c = st
                .clients
                .get(&client)
                .ok_or(RegistryError::UnknownClient)?;
            if !c
                .taps
                .iter()
                .any(|(n, e)| n.as_str() == name && *e == endpoint)
            {
                return Err(not_yours());
            }
            if spec.external_port < 1024 && c.peer.uid != 0 {
                return Err(RegistryError::PrivilegedPort {
                    port: spec.external_port,
                    uid: c.peer.uid,
                });
            }
            if c.forwards.len() >= MAX_FORWARDS_PER_CLIENT {
                return Err(RegistryError::TooManyForwards);
            }
            let net = st.networks.get(name).ok_or_else(not_yours)?;
            (Arc::clone(&net.busy), net.instance)
        };
        // Under the network's lock, like every backend call for it: never alongside its
        // destruction.
        let _guard = busy.lock().await;
        let (live, mac) = {
            let st = self.lock();
            let net = st
                .networks
                .get(name)
                .filter(|n| n.instance == instance)
                .ok_or_else(not_yours)?;
            let Phase::Active(live) = &net.phase else {
                return Err(not_yours());
            };
            // Checked again: handed out anew to another client meanwhile, it is not this
            // one's any more (adopted endpoints have no client on record).
            let handed = net.handed.get(&endpoint).ok_or_else(not_yours)?;
            if handed.client.is_some_and(|c| c != client) {
                return Err(not_yours());
            }
            (Arc::clone(live), handed.mac)
        };
        let request = ForwardRequest {
            protocol,
            external_port: spec.external_port,
            internal_port: spec.internal_port,
            endpoint: endpoint.clone(),
            mac,
        };
        let address = self
            .backend
            .forward(&live.handle, &request)
            .await
            .map_err(|source| RegistryError::Forward {
                network: name.to_string(),
                protocol: protocol.as_str(),
                port: spec.external_port,
                source,
            })?;
        let record = ClientForward {
            network: name.to_string(),
            instance,
            protocol,
            external_port: spec.external_port,
            internal_port: spec.internal_port,
            endpoint: endpoint.clone(),
        };
        let kept = {
            let mut st = self.lock();
            let kept = match st.clients.get_mut(&client) {
                Some(c) => {
                    c.forwards.push(record);
                    true
                }
                None => false,
            };
            // The state record carries it to a next broker (which serves this very
            // connection after a restart).
            self.record(&mut st, Some(Key::Client(client)));
            kept
        };
        if !kept {
            // The client left meanwhile: its forward goes at once.
            if let Err(e) = self
                .backend
                .unforward(&live.handle, protocol, spec.external_port, &endpoint)
                .await
            {
                warn!(
                    client,
                    network = name,
                    "cannot end a port forward: {}",
                    chain(&e)
                );
            }
            return Err(RegistryError::UnknownClient);
        }
        info!(client, network = name, interface = %endpoint, protocol = protocol.as_str(),
              external_port = spec.external_port, internal_port = spec.internal_port,
              address = ?address, "port forward made");
        Ok(address)
    }

    /// The client's connection closed: release everything it held.
    pub async fn disconnect(self: &Arc<Self>, client: ClientId) {
        let (persistent, forwards) = {
            let mut st = self.lock();
            let Some(c) = st.remove_client(client) else {
                return;
            };
            // What to log once the lock is released: each network's clients left and
            // whether its idle removal was scheduled.
            let mut released = Vec::with_capacity(c.networks.len());
            for name in &c.networks {
                let Some(net) = st.networks.get_mut(name) else {
                    continue;
                };
                net.clients.remove(&client);
                let idle = self.schedule_if_idle(name, net);
                released.push((name.clone(), net.clients.len(), idle));
            }
            let clients = st.clients.len();
            self.record(&mut st, Some(Key::Client(client)));
            let forwards = c
                .forwards
                .into_iter()
                .filter_map(|f| {
                    let net = st.networks.get(&f.network)?;
                    Some((f, Arc::clone(&net.busy)))
                })
                .collect::<Vec<_>>();
            let persistent = c
                .persistent
                .into_iter()
                .filter_map(|(name, endpoint)| {
                    let net = st.networks.get(&name)?;
                    Some((name, endpoint, net.instance, Arc::clone(&net.busy)))
                })
                .collect::<Vec<_>>();
            drop(st);
            for (name, network_clients, idle) in released {
                info!(
                    client,
                    client_pid = c.peer.pid,
                    client_uid = c.peer.uid,
                    network = %name,
                    network_clients,
                    "network released"
                );
                if idle {
                    self.log_idle(&name);
                }
            }
            info!(
                client,
                client_pid = c.peer.pid,
                client_uid = c.peer.uid,
                clients,
                "client disconnected"
            );
            (persistent, forwards)
        };
        // The forwards first, each under its network's lock, on the incarnation that
        // made it (a network destroyed since took its forwards with it).
        for (f, busy) in forwards {
            let _guard = busy.lock().await;
            let live = match &self.lock().networks.get(&f.network) {
                Some(n) if n.instance == f.instance => match &n.phase {
                    Phase::Active(live) => Some(Arc::clone(live)),
                    _ => None,
                },
                _ => None,
            };
            let Some(live) = live else { continue };
            match self
                .backend
                .unforward(&live.handle, f.protocol, f.external_port, &f.endpoint)
                .await
            {
                Ok(()) => {
                    info!(client, network = %f.network, port = f.external_port, "port forward ended with its client")
                }
                Err(e) => {
                    warn!(client, network = %f.network, "cannot end a port forward: {}", chain(&e))
                }
            }
        }
        // Outside the registry's lock, each under its network's: a release waits for
        // work on its own network only, and never runs on a network already destroyed.
        for (name, endpoint, instance, busy) in persistent {
            let _guard = busy.lock().await;
            let live = match &self.lock().networks.get(&name) {
                Some(n) if n.instance == instance => match &n.phase {
                    Phase::Active(live) => Some(Arc::clone(live)),
                    _ => None,
                },
                _ => None,
            };
            let Some(live) = live else { continue };
            match self.backend.release(&live.handle, &endpoint).await {
                Ok(()) => {
                    info!(client, network = %name, %endpoint, "persistent TAP removed")
                }
                Err(e) => warn!(
                    client,
                    network = %name,
                    "cannot remove persistent TAP {endpoint}: {}",
                    chain(&e)
                ),
            }
        }
    }

    /// Schedules the removal of network `name` after the idle timeout if nothing holds
    /// it (no client, no acquire under way, no endpoint of the previous broker's clients)
    /// and no removal is scheduled yet.
    ///
    /// Returns whether it did, for the caller to log ([`Self::log_idle`]) once it has
    /// released the registry's lock: a log line is a write, and no I/O happens under it.
    #[must_use]
    fn schedule_if_idle(self: &Arc<Self>, name: &str, net: &mut Network<B::Network>) -> bool {
        let idle = net.clients.is_empty()
            && net.pending == 0
            && net.orphans.is_empty()
            && net.removal_at.is_none();
        if !idle || !matches!(net.phase, Phase::Active(_)) {
            return false;
        }
        net.generation += 1;
        let generation = net.generation;
        let at = Instant::now() + self.idle_timeout;
        net.removal_at = Some(at);
        let this = Arc::clone(self);
        let (name, instance) = (name.to_string(), net.instance);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            this.expire(&name, instance, generation).await;
        });
        true
    }

    /// The log line of a removal [`Self::schedule_if_idle`] scheduled.
    fn log_idle(&self, name: &str) {
        info!(
            network = name,
            seconds = self.idle_timeout.as_secs_f64(),
            "network idle: removal scheduled"
        );
    }

    /// The idle timer of `instance` fired: removes the network if nothing happened to it
    /// since (no acquire, pending or done).
    async fn expire(&self, name: &str, instance: u64, generation: u64) {
        let due = |net: &Network<B::Network>| {
            net.instance == instance
                && net.generation == generation
                && net.clients.is_empty()
                && net.pending == 0
                && net.removal_at.is_some()
        };
        let busy = match self.lock().networks.get(name) {
            Some(net) if due(net) => Arc::clone(&net.busy),
            _ => return,
        };
        // A call on the network may be under way (a persistent endpoint's release): the
        // removal starts once it is over, and only if the network is still idle then.
        let guard = busy.lock_owned().await;
        let removal = {
            let mut st = self.lock();
            let Some(net) = st.networks.get_mut(name).filter(|n| due(n)) else {
                return;
            };
            Self::start_removal(net, guard)
        };
        info!(network = name, "idle timeout: removing network");
        if let Some(removal) = removal {
            self.remove(name, removal).await;
        }
    }

    /// Marks an active network as being removed by whoever holds its lock (`guard`), so
    /// an acquire that sees it `Removing` waits for the whole removal.
    fn start_removal(
        net: &mut Network<B::Network>,
        guard: OwnedMutexGuard<()>,
    ) -> Option<Removal<B::Network>> {
        let Phase::Active(live) = &net.phase else {
            return None;
        };
        let live = Arc::clone(live);
        net.phase = Phase::Removing(Arc::clone(&live));
        net.removal_at = None;
        Some(Removal {
            instance: net.instance,
            _guard: guard,
            live,
        })
    }

    /// Destroys the network, then forgets it; its lock is released last. Acquires that
    /// came meanwhile wait on that lock, find the network gone and create it anew.
    async fn remove(&self, name: &str, removal: Removal<B::Network>) {
        let subnet = removal.live.details.subnet;
        match self.backend.destroy(&removal.live.handle).await {
            Ok(()) => info!(network = name, %subnet, "network removed"),
            Err(e) => warn!(network = name, "network removal incomplete: {}", chain(&e)),
        }
        let mut st = self.lock();
        if st
            .networks
            .get(name)
            .is_some_and(|n| n.instance == removal.instance)
        {
            st.networks.remove(name);
            self.record(&mut st, Some(Key::Network(name.to_string())));
        }
    }

    /// Clients that hold at least one network. Connections that hold none (a `status`
    /// query, a monitor) do not keep the broker from stopping.
    pub async fn holders(&self) -> usize {
        let st = self.lock();
        st.clients
            .values()
            .filter(|c| !c.networks.is_empty())
            .count()
    }

    /// If no client holds a network (and none is being acquired), stops admitting new
    /// ones, removes every network and returns true. Otherwise it changes nothing and
    /// returns false: stopping would pull the network from under running VMs.
    pub async fn shutdown_if_idle(&self) -> bool {
        let networks = {
            let mut st = self.lock();
            // Adopted endpoints a VM still holds count as clients.
            if st.clients.values().any(|c| !c.networks.is_empty())
                || st
                    .networks
                    .values()
                    .any(|n| n.pending > 0 || !n.orphans.is_empty())
            {
                return false;
            }
            // From here on no acquire gets as far as a network (`claim`).
            st.closed = true;
            st.networks
                .iter()
                .map(|(name, n)| (name.clone(), n.instance, Arc::clone(&n.busy)))
                .collect::<Vec<_>>()
        };
        // Calls under way (a release, an idle removal) end first, each on its network.
        let locked = futures::future::join_all(networks.into_iter().map(
            |(name, instance, busy)| async move { (name, instance, busy.lock_owned().await) },
        ))
        .await;
        let removals = {
            let mut st = self.lock();
            locked
                .into_iter()
                .filter_map(|(name, instance, guard)| {
                    // Gone if its idle removal finished meanwhile.
                    let net = st
                        .networks
                        .get_mut(&name)
                        .filter(|n| n.instance == instance)?;
                    Some((name, Self::start_removal(net, guard)?))
                })
                .collect::<Vec<_>>()
        };
        // Networks are torn down side by side: one slow teardown does not hold up another.
        futures::future::join_all(
            removals
                .into_iter()
                .map(|(name, removal)| async move { self.remove(&name, removal).await }),
        )
        .await;
        true
    }

    /// Networks and clients as they are now. The backend is asked for each network's
    /// live endpoints without any lock held.
    pub async fn status(&self) -> Snapshot {
        let (networks, clients) = {
            let st = self.lock();
            let now = Instant::now();
            let networks = st
                .networks
                .iter()
                .filter_map(|(name, net)| {
                    let (live, removal_in) = match &net.phase {
                        Phase::Active(live) => (
                            live,
                            net.removal_at.map(|at| at.saturating_duration_since(now)),
                        ),
                        Phase::Removing(live) => (live, Some(Duration::ZERO)),
                        Phase::Creating => return None,
                    };
                    Some((
                        name.clone(),
                        Arc::clone(live),
                        net.clients.len(),
                        removal_in,
                    ))
                })
                .collect::<Vec<_>>();
            let clients = st
                .clients
                .iter()
                .map(|(id, c)| ClientSnapshot {
                    id: *id,
                    peer: c.peer.clone(),
                    networks: c.networks.iter().cloned().collect(),
                })
                .collect::<Vec<_>>();
            (networks, clients)
        };
        let mut out = Vec::with_capacity(networks.len());
        for (name, live, clients, removal_in) in networks {
            let endpoints = match self.backend.live_endpoints(&live.handle).await {
                Ok(endpoints) => endpoints.into_iter().collect(),
                Err(e) => {
                    warn!(network = %name, "cannot list live endpoints: {}", chain(&e));
                    vec![]
                }
            };
            out.push(NetworkSnapshot {
                name,
                mode: live.config.mode,
                details: live.details.clone(),
                clients,
                endpoints,
                removal_in,
            });
        }
        Snapshot {
            idle_timeout: self.idle_timeout,
            networks: out,
            clients,
        }
    }
}

impl<B: Backend> Registry<B> {
    /// As [`Registry::status`], without the asking connection among the clients, whether
    /// it holds networks or not: a client asks about the others, and a mere query
    /// (`vmnet-broker status`) is no client of anything. The networks' `clients` counts
    /// still include it where it holds them.
    pub async fn status_excluding(&self, asker: ClientId) -> Snapshot {
        let mut snapshot = self.status().await;
        snapshot.clients.retain(|c| c.id != asker);
        snapshot
    }

    /// Every network `peer` may use that the broker knows: defined (built in or by a
    /// file) or existing, by name; only `only` when given (then [`RegistryError::NotFound`]
    /// if there is no such network or `peer` may not use it, so a restricted network's
    /// existence is not revealed). TAPs are listed by the backend without any lock held.
    pub async fn networks(
        &self,
        peer: &Peer,
        only: Option<&str>,
    ) -> Result<Vec<NetworkView>, RegistryError> {
        Ok(self
            .inspect(peer, only)
            .await?
            .into_iter()
            .map(|(view, _)| view)
            .collect())
    }

    /// The current DHCP leases of the networks `peer` may use (of `only`, when given),
    /// each with the open TAP that was handed out with its MAC and who holds it.
    pub async fn leases(
        &self,
        peer: &Peer,
        only: Option<&str>,
    ) -> Result<Vec<LeaseEntry>, RegistryError> {
        let mut out = Vec::new();
        for (view, live) in self.inspect(peer, only).await? {
            let Some(live) = live else { continue };
            let leases = match self.backend.leases(&live.handle).await {
                Ok(leases) => leases,
                Err(e) => {
                    warn!(network = %view.name, "cannot list leases: {}", chain(&e));
                    continue;
                }
            };
            for lease in leases {
                let tap = view.taps.iter().find(|t| t.mac == Some(lease.mac)).cloned();
                out.push(LeaseEntry {
                    network: view.name.clone(),
                    lease,
                    tap,
                });
            }
        }
        Ok(out)
    }

    async fn inspect(
        &self,
        peer: &Peer,
        only: Option<&str>,
    ) -> Result<Vec<(NetworkView, Option<Arc<Live<B::Network>>>)>, RegistryError> {
        if let Some(name) = only {
            crate::protocol::validate_network_name(name)
                .map_err(|_| RegistryError::NotFound(name.to_string()))?;
        }
        // Definitions from the directory, on a blocking thread (file I/O). Invalid files
        // are left out: `check-config` is where they are reported.
        let dir = self.config.clone();
        let wanted = only.map(str::to_string);
        let defined = tokio::task::spawn_blocking(move || match wanted {
            Some(name) => dir
                .load(&name)
                .ok()
                .flatten()
                .into_iter()
                .collect::<Vec<_>>(),
            None => dir.load_all().into_iter().filter_map(Result::ok).collect(),
        })
        .await
        .map_err(RegistryError::Lookup)?;
        let mut known: BTreeMap<String, Known<B::Network>> = BTreeMap::new();
        {
            let st = self.lock();
            let now = Instant::now();
            for (name, net) in &st.networks {
                if only.is_some_and(|o| o != name) {
                    continue;
                }
                let (live, state) = match &net.phase {
                    Phase::Active(live) => (
                        live,
                        match net.removal_at {
                            Some(at) => NetworkState::Idle {
                                removal_in: at.saturating_duration_since(now),
                            },
                            None => NetworkState::Active,
                        },
                    ),
                    Phase::Removing(live) => (live, NetworkState::Removing),
                    // Not there yet: listed from its definition, as inactive.
                    Phase::Creating => continue,
                };
                let mut holders = BTreeMap::new();
                let mut forwards = vec![];
                for (id, c) in &st.clients {
                    forwards.extend(
                        c.forwards
                            .iter()
                            .filter(|f| &f.network == name && f.instance == net.instance)
                            .map(|f| ForwardView {
                                protocol: f.protocol,
                                external_port: f.external_port,
                                internal_port: f.internal_port,
                                endpoint: f.endpoint.clone(),
                                client: *id,
                            }),
                    );
                    for (_, endpoint) in c.taps.iter().filter(|(n, _)| n == name) {
                        holders.insert(
                            endpoint.clone(),
                            Holder {
                                client: *id,
                                pid: c.peer.pid,
                                uid: c.peer.uid,
                            },
                        );
                    }
                }
                known.insert(
                    name.clone(),
                    Known {
                        config: live.current_config(),
                        state,
                        live: Some(Arc::clone(live)),
                        clients: net.clients.len(),
                        handed: net.handed.clone(),
                        holders,
                        forwards,
                    },
                );
            }
        }
        for config in defined {
            known.entry(config.name.clone()).or_insert_with(|| Known {
                config,
                state: NetworkState::Inactive,
                live: None,
                clients: 0,
                handed: BTreeMap::new(),
                holders: BTreeMap::new(),
                forwards: vec![],
            });
        }
        // Only what `peer` may use; the user database may block, so on its own thread.
        if known
            .values()
            .any(|k| policy::needs_lookup(&k.config, peer))
        {
            let configs: Vec<NetworkConfig> = known.values().map(|k| k.config.clone()).collect();
            let (peer, directory) = (peer.clone(), Arc::clone(&self.directory));
            let allowed = tokio::task::spawn_blocking(move || {
                configs
                    .iter()
                    .filter(|c| policy::check(c, &peer, directory.as_ref()).is_ok())
                    .map(|c| c.name.clone())
                    .collect::<BTreeSet<_>>()
            })
            .await
            .map_err(RegistryError::Lookup)?;
            known.retain(|name, _| allowed.contains(name));
        }
        if let Some(name) = only
            && known.is_empty()
        {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        let mut out = Vec::with_capacity(known.len());
        for (name, k) in known {
            let mut taps = Vec::new();
            if let Some(live) = &k.live {
                match self.backend.live_endpoints(&live.handle).await {
                    Ok(endpoints) => {
                        taps = endpoints
                            .into_iter()
                            .map(|endpoint| TapView {
                                mac: k.handed.get(&endpoint).map(|h| h.mac),
                                uid: k.handed.get(&endpoint).map(|h| h.uid),
                                holder: k.holders.get(&endpoint).cloned(),
                                endpoint,
                            })
                            .collect()
                    }
                    Err(e) => {
                        warn!(network = %name, "cannot list live endpoints: {}", chain(&e))
                    }
                }
            }
            // A forward ends with its TAP (the backend sees to it), though its client's
            // record of it stays until the client goes: only those of live TAPs are shown.
            let forwards = k
                .forwards
                .into_iter()
                .filter(|f| taps.iter().any(|t| t.endpoint == f.endpoint))
                .collect();
            let view = NetworkView {
                name,
                details: k.live.as_ref().map(|l| l.details.clone()),
                config: k.config,
                state: k.state,
                clients: k.clients,
                taps,
                forwards,
            };
            out.push((view, k.live));
        }
        Ok(out)
    }
}

/// What [`Registry::inspect`] gathers of one network under the registry's lock.
struct Known<N> {
    config: NetworkConfig,
    state: NetworkState,
    live: Option<Arc<Live<N>>>,
    clients: usize,
    handed: BTreeMap<EndpointId, Handed>,
    holders: BTreeMap<EndpointId, Holder>,
    forwards: Vec<ForwardView>,
}

/// A network taken out of service, waiting for [`Registry::remove`].
struct Removal<N> {
    instance: u64,
    /// The network's lock, held until it is forgotten.
    _guard: OwnedMutexGuard<()>,
    live: Arc<Live<N>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answers::{network_info, status_reply, wire_error};
    use crate::backend::{BackendError, PlatformDetails};
    use crate::protocol::{BrokerError, ErrorCode, NetworkInfo, Status};
    use std::net::Ipv4Addr;
    use std::sync::Mutex as StdMutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::oneshot;

    /// `Registry::acquire` as a client sees it: the reply and the endpoint, or the
    /// wire error.
    async fn acquire(
        r: &Arc<Registry<Fake>>,
        client: ClientId,
        name: &str,
        mac: Option<[u8; 6]>,
        persistent: bool,
    ) -> Result<(NetworkInfo, std::fs::File), BrokerError> {
        match r.acquire(client, name, mac, persistent).await {
            Ok(a) => Ok((network_info(&a), a.attachment.endpoint)),
            Err(e) => Err(wire_error(&e)),
        }
    }

    async fn connect(r: &Arc<Registry<Fake>>, peer: Peer) -> Result<ClientId, BrokerError> {
        r.connect(peer).await.map_err(|e| wire_error(&e))
    }

    async fn status(r: &Arc<Registry<Fake>>) -> Status {
        status_reply(r.status().await)
    }

    /// Records what the core asked for; hands out /dev/null as the endpoint.
    #[derive(Default)]
    struct Fake {
        log: StdMutex<Vec<String>>,
        fail_create: bool,
        /// Endpoints attached and not closed yet (a VM closing its TAP: `close`).
        live: StdMutex<BTreeSet<String>>,
        /// `live_endpoints` fails while set (a failed netlink dump).
        fail_endpoints: AtomicBool,
        /// Calls that wait for their gate to open, by "create <name>" or "destroy <name>";
        /// they are listed in `entered` once waiting.
        gates: StdMutex<BTreeMap<String, oneshot::Receiver<()>>>,
        entered: StdMutex<Vec<String>>,
        /// What `leases` answers, for every network.
        leases: StdMutex<Vec<LeaseView>>,
        /// Endpoints of a previous broker that are gone by the time `adopt` looks.
        closed: StdMutex<BTreeSet<String>>,
        /// Bumped by every `close`, for `endpoint_closed`.
        closes: tokio::sync::watch::Sender<u64>,
        /// The interface the next `attach` hands out again (a closed TAP back from the
        /// Linux backend's pool), instead of a new one.
        reuse: StdMutex<Option<String>>,
    }

    impl Fake {
        /// Makes the next `call` ("create lab") wait until the returned sender is used
        /// (or dropped).
        fn gate(&self, call: &str) -> oneshot::Sender<()> {
            let (open, wait) = oneshot::channel();
            self.gates.lock().unwrap().insert(call.to_string(), wait);
            open
        }
        async fn pass(&self, call: String) {
            let gate = self.gates.lock().unwrap().remove(&call);
            if let Some(gate) = gate {
                self.entered.lock().unwrap().push(call);
                let _ = gate.await;
            }
        }
        fn entered(&self, call: &str) -> bool {
            self.entered.lock().unwrap().iter().any(|c| c == call)
        }
        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
        fn close(&self, interface: &str) {
            assert!(self.live.lock().unwrap().remove(interface), "{interface}");
            self.closes.send_modify(|n| *n += 1);
        }
    }

    impl Backend for Fake {
        type Network = (String, u8);
        type Endpoint = std::fs::File;

        async fn create(&self, c: &NetworkConfig) -> Result<Self::Network, BackendError> {
            self.pass(format!("create {}", c.name)).await;
            if self.fail_create {
                return Err(BackendError::Conflict("no bridges today".into()));
            }
            let mut log = self.log.lock().unwrap();
            log.push(format!("create {}", c.name));
            let n = log.iter().filter(|l| l.starts_with("create")).count() as u8;
            Ok((c.name.clone(), n))
        }
        fn details(&self, n: &Self::Network) -> NetworkDetails {
            NetworkDetails {
                subnet: format!("10.0.{}.0/24", n.1).parse().unwrap(),
                gateway: Ipv4Addr::new(10, 0, n.1, 1),
                ipv6_prefix: None,
                mtu: 1500,
                platform: PlatformDetails::new()
                    .with(crate::backend::BRIDGE, format!("br-{}", n.0)),
            }
        }
        async fn attach(
            &self,
            n: &Self::Network,
            r: &AttachRequest,
        ) -> Result<Attachment<std::fs::File>, BackendError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("attach {} {}", n.0, r.serial));
            let interface = self
                .reuse
                .lock()
                .unwrap()
                .take()
                .unwrap_or_else(|| format!("tap-{}-{}", n.0, r.serial));
            self.live.lock().unwrap().insert(interface.clone());
            Ok(Attachment {
                id: EndpointId(interface.clone()),
                platform: PlatformDetails::new().with(crate::backend::INTERFACE, interface),
                endpoint: std::fs::File::open("/dev/null")?,
                answering: Default::default(),
            })
        }
        async fn release(
            &self,
            n: &Self::Network,
            interface: &EndpointId,
        ) -> Result<(), BackendError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("release {} {interface}", n.0));
            Ok(())
        }
        fn endpoint_closed(
            &self,
            _n: &Self::Network,
            fallback: Duration,
        ) -> impl Future<Output = ()> + Send + 'static {
            let mut closes = self.closes.subscribe();
            async move {
                tokio::select! {
                    _ = closes.changed() => {}
                    _ = tokio::time::sleep(fallback) => {}
                }
            }
        }

        async fn forward(
            &self,
            n: &Self::Network,
            r: &ForwardRequest,
        ) -> Result<Option<IpAddr>, BackendError> {
            if r.external_port == 9999 {
                return Err(BackendError::PortInUse(
                    "tcp port 9999 is already in use".into(),
                ));
            }
            self.log.lock().unwrap().push(format!(
                "forward {} {} {} {}",
                n.0, r.endpoint, r.external_port, r.internal_port
            ));
            Ok(None)
        }
        async fn unforward(
            &self,
            n: &Self::Network,
            _: Protocol,
            port: u16,
            _: &EndpointId,
        ) -> Result<(), BackendError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("unforward {} {port}", n.0));
            Ok(())
        }
        async fn live_endpoints(
            &self,
            n: &Self::Network,
        ) -> Result<BTreeSet<EndpointId>, BackendError> {
            if self.fail_endpoints.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("netlink dump interrupted").into());
            }
            let prefix = format!("tap-{}-", n.0);
            let live = self.live.lock().unwrap();
            Ok(live
                .iter()
                .filter(|i| i.starts_with(&prefix))
                .map(|i| EndpointId(i.clone()))
                .collect())
        }
        async fn destroy(&self, n: &Self::Network) -> Result<(), BackendError> {
            self.pass(format!("destroy {}", n.0)).await;
            self.log.lock().unwrap().push(format!("destroy {}", n.0));
            Ok(())
        }
        async fn adopt(
            &self,
            record: &crate::state::NetworkRecord,
        ) -> Result<Self::Network, BackendError> {
            let name = record.config.name.clone();
            self.log.lock().unwrap().push(format!("adopt {name}"));
            for e in &record.endpoints {
                // What the kernel still has: a test marks closed ones with `close`.
                if !self.closed.lock().unwrap().contains(&e.id) {
                    self.live.lock().unwrap().insert(e.id.clone());
                }
            }
            Ok((name, record.subnet.addr().octets()[2]))
        }
        async fn remove_stale(&self) -> Result<(), BackendError> {
            Ok(())
        }
        async fn leases(&self, _: &Self::Network) -> Result<Vec<LeaseView>, BackendError> {
            Ok(self.leases.lock().unwrap().clone())
        }
    }

    struct NoUsers;
    impl Directory for NoUsers {
        fn user_name(&self, _: u32) -> Option<String> {
            None
        }
        fn group_id(&self, _: &str) -> Option<u32> {
            None
        }
        fn groups_of(&self, _: u32, gid: u32) -> Vec<u32> {
            vec![gid]
        }
    }

    const IDLE: Duration = Duration::from_secs(120);

    fn registry_in(dir: &std::path::Path, fake: Fake) -> Arc<Registry<Fake>> {
        Registry::new(fake, ConfigDir::new(dir), Box::new(NoUsers), IDLE)
    }

    fn registry() -> Arc<Registry<Fake>> {
        registry_in(std::path::Path::new("/nonexistent"), Fake::default())
    }

    fn peer(uid: u32) -> Peer {
        Peer {
            pid: 100 + uid as i32,
            uid,
            gid: uid,
            groups: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn first_acquire_creates_later_ones_join() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        let b = connect(&r, peer(1001)).await.unwrap();
        let (i1, _) = acquire(&r, a, "shared", None, false).await.unwrap();
        let (i2, _) = acquire(&r, b, "shared", None, false).await.unwrap();
        let (i3, _) = acquire(&r, a, "shared", None, false).await.unwrap();
        assert_eq!(i1.bridge, i2.bridge);
        assert_eq!(i1.subnet, "10.0.1.0/24");
        assert_eq!(i1.mask, "255.255.255.0");
        let macs: BTreeSet<_> = [&i1.mac, &i2.mac, &i3.mac].into_iter().collect();
        assert_eq!(macs.len(), 3, "each TAP gets its own MAC");
        assert_eq!(
            r.backend().log(),
            [
                "create shared",
                "attach shared 0",
                "attach shared 1",
                "attach shared 2"
            ]
        );
        let s = status(&r).await;
        assert_eq!(s.networks[0].clients, 2, "client a counts once");
    }

    #[tokio::test(start_paused = true)]
    async fn last_release_schedules_removal_and_acquire_cancels_it() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        let (first, _) = acquire(&r, a, "host", None, false).await.unwrap();
        r.disconnect(a).await;
        let s = status(&r).await;
        assert_eq!(s.networks[0].removal_in_seconds, Some(120.0));
        tokio::time::advance(Duration::from_secs(119)).await;
        let b = connect(&r, peer(1001)).await.unwrap();
        let (again, _) = acquire(&r, b, "host", None, false).await.unwrap();
        assert_eq!(first.subnet, again.subnet, "the very same network");
        assert_eq!(status(&r).await.networks[0].removal_in_seconds, None);
        // The cancelled timer must not remove the network when it fires.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(status(&r).await.networks.len(), 1);
        r.disconnect(b).await;
        tokio::time::sleep(IDLE + Duration::from_millis(1)).await;
        assert!(status(&r).await.networks.is_empty());
        assert_eq!(r.backend().log().last().unwrap(), "destroy host");
        assert_eq!(
            r.backend()
                .log()
                .iter()
                .filter(|l| l.starts_with("create"))
                .count(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ninth_distinct_network_is_internal_error() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..9 {
            std::fs::write(dir.path().join(format!("n{i}.json")), "{}").unwrap();
        }
        let r = registry_in(dir.path(), Fake::default());
        let a = connect(&r, peer(1000)).await.unwrap();
        for i in 0..8 {
            acquire(&r, a, &format!("n{i}"), None, false).await.unwrap();
        }
        // Re-acquiring a held network is not a new one.
        acquire(&r, a, "n0", None, false).await.unwrap();
        let e = acquire(&r, a, "n8", None, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InternalError);
        assert!(e.message.contains("at most 8"), "{}", e.message);
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_not_allowed_and_create_failure() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.json"), r#"{"mode": "x"}"#).unwrap();
        std::fs::write(
            dir.path().join("private.json"),
            r#"{"allowed_users": [1000]}"#,
        )
        .unwrap();
        let r = registry_in(dir.path(), Fake::default());
        let a = connect(&r, peer(1001)).await.unwrap();
        assert_eq!(
            acquire(&r, a, "nope", None, false).await.unwrap_err().code,
            ErrorCode::NotFound
        );
        let bad = acquire(&r, a, "bad", None, false).await.unwrap_err();
        assert_eq!(bad.code, ErrorCode::NotFound);
        assert!(bad.message.contains("bad.json"), "{}", bad.message);
        assert_eq!(
            acquire(&r, a, "private", None, false)
                .await
                .unwrap_err()
                .code,
            ErrorCode::NotAllowed
        );
        assert!(r.backend().log().is_empty(), "nothing created for refusals");
        let owner = connect(&r, peer(1000)).await.unwrap();
        acquire(&r, owner, "private", None, false).await.unwrap();
        assert_eq!(
            acquire(&r, a, "private", None, false)
                .await
                .unwrap_err()
                .code,
            ErrorCode::NotAllowed,
            "an existing network is checked too"
        );

        let failing = Fake {
            fail_create: true,
            ..Default::default()
        };
        let r = registry_in(dir.path(), failing);
        let a = connect(&r, peer(0)).await.unwrap();
        let e = acquire(&r, a, "shared", None, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::CreateFailure);
        assert!(e.message.contains("no bridges today"));
        assert!(status(&r).await.networks.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn config_is_read_at_creation_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lab.json");
        std::fs::write(&file, r#"{"mode": "host"}"#).unwrap();
        let r = registry_in(dir.path(), Fake::default());
        let a = connect(&r, peer(1000)).await.unwrap();
        assert_eq!(
            acquire(&r, a, "lab", None, false).await.unwrap().0.mode,
            "host"
        );
        std::fs::write(&file, r#"{"mode": "shared", "allowed_users": [1]}"#).unwrap();
        let b = connect(&r, peer(1001)).await.unwrap();
        assert_eq!(
            acquire(&r, b, "lab", None, false).await.unwrap().0.mode,
            "host"
        );
        r.disconnect(a).await;
        r.disconnect(b).await;
        tokio::time::sleep(IDLE * 2).await;
        let c = connect(&r, peer(1002)).await.unwrap();
        assert_eq!(
            acquire(&r, c, "lab", None, false).await.unwrap_err().code,
            ErrorCode::NotAllowed,
            "recreated from the edited file"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_only_when_no_clients() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        acquire(&r, a, "shared", None, false).await.unwrap();
        assert!(!r.shutdown_if_idle().await);
        assert_eq!(status(&r).await.networks.len(), 1);
        r.disconnect(a).await;
        assert!(r.shutdown_if_idle().await);
        assert!(status(&r).await.networks.is_empty());
        assert!(
            connect(&r, peer(1)).await.is_err(),
            "closed for new clients"
        );
        assert_eq!(r.backend().log().last().unwrap(), "destroy shared");
    }

    #[tokio::test(start_paused = true)]
    async fn requested_mac_is_used_and_never_given_twice() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        let mac = [0x52, 0x54, 0, 0, 0, 7];
        let (info, _) = acquire(&r, a, "shared", Some(mac), false).await.unwrap();
        assert_eq!(info.mac, "52:54:00:00:00:07");
        let e = acquire(&r, a, "shared", Some(mac), false)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("in use"), "{}", e.message);
        r.backend().close(&info.interface);
        assert!(acquire(&r, a, "shared", Some(mac), false).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_suggested_mac_is_never_one_a_live_tap_asked_for() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        acquire(&r, a, "shared", None, false).await.unwrap();
        // Suggestions are predictable: ask for the one the next acquire would get.
        let taken = guest_mac("shared", 2);
        let b = connect(&r, peer(1001)).await.unwrap();
        acquire(&r, b, "shared", Some(taken), false).await.unwrap();
        let (c, _) = acquire(&r, a, "shared", None, false).await.unwrap();
        assert_ne!(c.mac, Mac::from(taken).to_string());
        assert_eq!(c.mac, Mac::from(guest_mac("shared", 3)).to_string());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_holds_a_bounded_number_of_live_taps() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        let mut held = vec![];
        for _ in 0..MAX_TAPS_PER_CLIENT {
            held.push(acquire(&r, a, "shared", None, false).await.unwrap().0);
        }
        let e = acquire(&r, a, "shared", None, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InternalError);
        assert!(e.message.contains("at most 64 TAPs"), "{}", e.message);
        // Other clients are not affected; and once a VM closes a TAP there is room again.
        let b = connect(&r, peer(1001)).await.unwrap();
        acquire(&r, b, "shared", None, false).await.unwrap();
        r.backend().close(&held[0].interface);
        acquire(&r, a, "shared", None, false).await.unwrap();
    }

    /// A registry serving `lab` with the given TAP limits.
    fn limited(per_uid: u32, nonroot: u32) -> (tempfile::TempDir, Arc<Registry<Fake>>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("lab.json"),
            format!(r#"{{"max_taps_per_uid": {per_uid}, "max_nonroot_taps": {nonroot}}}"#),
        )
        .unwrap();
        let r = registry_in(dir.path(), Fake::default());
        (dir, r)
    }

    #[tokio::test(start_paused = true)]
    async fn a_uid_holds_a_bounded_number_of_taps_across_its_connections() {
        let (_dir, r) = limited(3, 100);
        let (a, b) = (
            connect(&r, peer(1000)).await.unwrap(),
            connect(&r, peer(1000)).await.unwrap(),
        );
        let mut held = vec![];
        for c in [a, b, a] {
            held.push(acquire(&r, c, "lab", None, false).await.unwrap().0);
        }
        for c in [a, b] {
            let e = acquire(&r, c, "lab", None, false).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::InternalError);
            assert_eq!(
                e.message,
                "uid 1000 already holds 3 TAPs on network \"lab\" (at most 3)"
            );
        }
        // A third connection of the same uid is no way around it, nor is closing the
        // connections while the VMs keep their TAPs open.
        r.disconnect(a).await;
        let c = connect(&r, peer(1000)).await.unwrap();
        assert!(acquire(&r, c, "lab", None, false).await.is_err());
        // Other uids and root are not affected.
        let other = connect(&r, peer(1001)).await.unwrap();
        acquire(&r, other, "lab", None, false).await.unwrap();
        let root = connect(&r, peer(0)).await.unwrap();
        for _ in 0..5 {
            acquire(&r, root, "lab", None, false).await.unwrap();
        }
        // A TAP its VM closed frees its slot, one slot per TAP.
        r.backend().close(&held[0].interface);
        acquire(&r, c, "lab", None, false).await.unwrap();
        let e = acquire(&r, b, "lab", None, false).await.unwrap_err();
        assert!(e.message.contains("holds 3 TAPs"), "{}", e.message);
    }

    #[tokio::test(start_paused = true)]
    async fn non_root_users_leave_a_reserve_that_only_root_can_use() {
        let (_dir, r) = limited(2, 5);
        let mut held = vec![];
        for uid in 1000..1003 {
            let c = connect(&r, peer(uid)).await.unwrap();
            for _ in 0..2 {
                match acquire(&r, c, "lab", None, false).await {
                    Ok((info, _)) => held.push(info),
                    Err(e) => {
                        assert_eq!((uid, held.len()), (1002, 5), "{}", e.message);
                        assert_eq!(e.code, ErrorCode::InternalError);
                        assert_eq!(
                            e.message,
                            "non-root users already hold 5 TAPs on network \"lab\" \
                             (at most 5; the rest is reserved for root)"
                        );
                    }
                }
            }
        }
        assert_eq!(held.len(), 5);
        let newcomer = connect(&r, peer(1003)).await.unwrap();
        let e = acquire(&r, newcomer, "lab", None, false).await.unwrap_err();
        assert!(e.message.contains("reserved for root"), "{}", e.message);
        // Root's TAPs do not count against the users' total, and root is not held to it.
        let root = connect(&r, peer(0)).await.unwrap();
        for _ in 0..10 {
            acquire(&r, root, "lab", None, false).await.unwrap();
        }
        assert!(acquire(&r, newcomer, "lab", None, false).await.is_err());
        r.backend().close(&held[0].interface);
        acquire(&r, newcomer, "lab", None, false).await.unwrap();
        assert!(acquire(&r, newcomer, "lab", None, false).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn default_limits_keep_a_reserve_for_root_on_a_full_network() {
        let r = registry();
        // Each uid acquires over two connections until refused, then the next uid takes
        // over, until a refusal is not about the uid's own limit.
        let mut got = vec![];
        let mut uid = 999;
        let last = 'fill: loop {
            uid += 1;
            assert!(uid < 1100, "never refused but for the uid's own limit");
            let conns = [
                connect(&r, peer(uid)).await.unwrap(),
                connect(&r, peer(uid)).await.unwrap(),
            ];
            got.push(0);
            for i in 0.. {
                match acquire(&r, conns[i % 2], "shared", None, false).await {
                    Ok(_) => *got.last_mut().unwrap() += 1,
                    Err(e) if e.message.contains(&format!("uid {uid} already holds 64")) => {
                        break;
                    }
                    Err(e) => break 'fill e,
                }
            }
        };
        // 64 each for 14 users, 63 for the 15th: 959 in all, 64 ports left for root.
        assert_eq!(got.len(), 15);
        assert!(got[..14].iter().all(|n| *n == 64), "{got:?}");
        assert_eq!(got[14], 63);
        assert_eq!(
            last.message,
            "non-root users already hold 959 TAPs on network \"shared\" \
             (at most 959; the rest is reserved for root)"
        );
        assert_eq!(r.status().await.networks[0].endpoints.len(), 959);
        let e = acquire(
            &r,
            connect(&r, peer(1000)).await.unwrap(),
            "shared",
            None,
            false,
        )
        .await
        .unwrap_err();
        assert!(
            e.message.contains("uid 1000 already holds 64"),
            "{}",
            e.message
        );
        for _ in 0..2 {
            let root = connect(&r, peer(0)).await.unwrap();
            for _ in 0..32 {
                acquire(&r, root, "shared", None, false).await.unwrap();
            }
        }
        assert_eq!(r.status().await.networks[0].endpoints.len(), 1023);
    }

    #[tokio::test(start_paused = true)]
    async fn at_a_tap_limit_a_failed_listing_refuses_rather_than_forgets() {
        let (_dir, r) = limited(2, 100);
        let a = connect(&r, peer(1000)).await.unwrap();
        let (first, _) = acquire(&r, a, "lab", None, false).await.unwrap();
        acquire(&r, a, "lab", None, false).await.unwrap();
        r.backend().close(&first.interface);
        r.backend().fail_endpoints.store(true, Ordering::SeqCst);
        let e = acquire(&r, a, "lab", None, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InternalError);
        assert_eq!(
            e.message,
            "uid 1000 already holds 2 TAPs on network \"lab\" (at most 2), and which of them \
             are still open is unknown: netlink dump interrupted"
        );
        // Below the limit the listing is not needed, and root never needs it.
        let b = connect(&r, peer(1001)).await.unwrap();
        acquire(&r, b, "lab", None, false).await.unwrap();
        let root = connect(&r, peer(0)).await.unwrap();
        acquire(&r, root, "lab", None, false).await.unwrap();
        r.backend().fail_endpoints.store(false, Ordering::SeqCst);
        acquire(&r, a, "lab", None, false).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn connections_per_uid_are_bounded_but_not_for_root() {
        let r = registry();
        let mut open = vec![];
        for _ in 0..MAX_CONNECTIONS_PER_UID {
            open.push(connect(&r, peer(1000)).await.unwrap());
        }
        let e = connect(&r, peer(1000)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InternalError);
        connect(&r, peer(1001)).await.unwrap();
        // A closed connection frees its place, and only one.
        r.disconnect(open.pop().unwrap()).await;
        connect(&r, peer(1000)).await.unwrap();
        connect(&r, peer(1000)).await.unwrap_err();
        for _ in 0..=MAX_CONNECTIONS_PER_UID {
            connect(&r, peer(0)).await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_definition_is_an_internal_error_not_not_found() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails, parsing never happens.
        std::fs::create_dir(dir.path().join("odd.json")).unwrap();
        let r = registry_in(dir.path(), Fake::default());
        let a = connect(&r, peer(1000)).await.unwrap();
        let e = acquire(&r, a, "odd", None, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InternalError, "{}", e.message);
        assert!(e.message.contains("cannot read"), "{}", e.message);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_holding_nothing_do_not_block_shutdown() {
        let r = registry();
        let _watcher = connect(&r, peer(1000)).await.unwrap();
        let holder = connect(&r, peer(1001)).await.unwrap();
        acquire(&r, holder, "shared", None, false).await.unwrap();
        assert_eq!(r.holders().await, 1);
        assert!(!r.shutdown_if_idle().await);
        r.disconnect(holder).await;
        assert!(
            r.shutdown_if_idle().await,
            "a status-only connection does not count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_registry_adopts_what_was_recorded_and_keeps_it_while_endpoints_live() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry();
        r.persist(dir.path().to_path_buf());
        let a = connect(&r, peer(1000)).await.unwrap();
        let (p, _) = acquire(&r, a, "shared", None, true).await.unwrap();
        let (q, _) = acquire(&r, a, "shared", Some([0x52, 0, 0, 0, 0, 9]), false)
            .await
            .unwrap();
        r.flush_state().await;
        let recorded = crate::state::load(dir.path()).unwrap().unwrap();
        assert_eq!(recorded.networks.len(), 1);
        let net = &recorded.networks[0];
        assert_eq!(net.config.name, "shared");
        assert_eq!(net.subnet.to_string(), p.subnet);
        assert_eq!(net.serial, 2);
        let eps: Vec<_> = net
            .endpoints
            .iter()
            .map(|e| (e.id.as_str(), e.uid, e.mac.to_string(), e.persistent))
            .collect();
        assert_eq!(
            eps,
            [
                (p.interface.as_str(), 1000, p.mac.clone(), true),
                (
                    q.interface.as_str(),
                    1000,
                    "52:00:00:00:00:09".to_string(),
                    false
                ),
            ]
        );
        // The broker dies (its registry with it); one of the two TAPs was closed meanwhile.
        drop(r);
        let fake = Fake::default();
        fake.closed.lock().unwrap().insert(p.interface.clone());
        let r = registry_in(std::path::Path::new("/nonexistent"), fake);
        assert_eq!(r.adopt(recorded.networks, vec![]).await, ["shared"]);
        assert_eq!(r.backend().log(), ["adopt shared"]);
        let s = status(&r).await;
        assert_eq!(s.networks[0].subnet, p.subnet, "the same network");
        assert_eq!(s.networks[0].removal_in_seconds, None, "a VM holds a TAP");
        // A new client joins; its MAC is never the one the live TAP has.
        let b = connect(&r, peer(1001)).await.unwrap();
        let refused = acquire(&r, b, "shared", Some([0x52, 0, 0, 0, 0, 9]), false).await;
        assert!(refused.is_err(), "{refused:?}");
        let (n, _) = acquire(&r, b, "shared", None, false).await.unwrap();
        assert_eq!(n.subnet, p.subnet);
        assert_ne!(n.interface, q.interface);
        r.disconnect(b).await;
        // (Off the fallback checks' beat, so only `endpoint_closed` can explain a quick
        // reaction below.)
        tokio::time::sleep(IDLE * 2 + ORPHAN_CHECK / 2).await;
        assert_eq!(status(&r).await.networks.len(), 1, "kept for the live TAP");
        // The last TAP of the previous broker's clients closes: noticed at once through
        // `endpoint_closed`, long before the next fallback check, and the idle removal
        // runs.
        r.backend().close(&q.interface);
        r.backend().close(&n.interface);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            status(&r).await.networks[0].removal_in_seconds.is_some(),
            "the close was not noticed"
        );
        tokio::time::sleep(IDLE + Duration::from_secs(2)).await;
        assert!(status(&r).await.networks.is_empty());
        assert_eq!(r.backend().log().last().unwrap(), "destroy shared");
    }

    #[tokio::test(start_paused = true)]
    async fn persistent_endpoints_are_released_when_their_client_leaves() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        let (p, _) = acquire(&r, a, "shared", None, true).await.unwrap();
        acquire(&r, a, "shared", None, false).await.unwrap();
        r.disconnect(a).await;
        let log = r.backend().log();
        let released: Vec<_> = log.iter().filter(|l| l.starts_with("release")).collect();
        assert_eq!(released, [&format!("release shared {}", p.interface)]);
    }

    /// Waits (in paused time, so at no cost) until `done` holds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("never happened: {what}");
    }

    /// Fails if `f` does not finish: in paused time a wait that never ends lets the
    /// clock jump to the deadline at once.
    async fn answers<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .unwrap_or_else(|_| panic!("{what} waited for another network"))
    }

    fn files(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in names {
            std::fs::write(dir.path().join(format!("{name}.json")), "{}").unwrap();
        }
        dir
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_create_holds_up_only_its_own_network() {
        let dir = files(&["slow", "fast"]);
        let r = registry_in(dir.path(), Fake::default());
        let open = r.backend().gate("create slow");
        let a = connect(&r, peer(1000)).await.unwrap();
        let first = tokio::spawn({
            let r = Arc::clone(&r);
            async move { acquire(&r, a, "slow", None, false).await }
        });
        until("create slow is under way", || {
            r.backend().entered("create slow")
        })
        .await;

        // Another network, and status, answer while "slow" is being created.
        let b = connect(&r, peer(1001)).await.unwrap();
        let (fast, _) = answers("acquire", acquire(&r, b, "fast", None, false))
            .await
            .unwrap();
        assert_eq!(fast.name, "fast");
        let s = answers("status", status(&r)).await;
        let names: Vec<_> = s.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["fast"], "a network being created is not listed yet");

        // A second acquire of "slow" waits for that network, then joins it.
        let c = connect(&r, peer(1002)).await.unwrap();
        let second = tokio::spawn({
            let r = Arc::clone(&r);
            async move { acquire(&r, c, "slow", None, false).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!first.is_finished() && !second.is_finished());
        open.send(()).unwrap();
        let (one, _) = answers("first", first).await.unwrap().unwrap();
        let (two, _) = answers("second", second).await.unwrap().unwrap();
        assert_eq!(one.subnet, two.subnet, "one network");
        assert_ne!(one.interface, two.interface);
        let creates: Vec<_> = r
            .backend()
            .log()
            .into_iter()
            .filter(|l| l.starts_with("create"))
            .collect();
        assert_eq!(creates, ["create fast", "create slow"]);
        assert_eq!(status(&r).await.networks.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_acquire_whose_caller_gave_up_still_ends_cleanly() {
        let r = registry();
        let open = r.backend().gate("create shared");
        let a = connect(&r, peer(1000)).await.unwrap();
        let gave_up = tokio::time::timeout(
            Duration::from_secs(1),
            acquire(&r, a, "shared", None, false),
        )
        .await;
        assert!(gave_up.is_err(), "the create is stuck");
        open.send(()).unwrap();
        until("the network is created", || {
            r.backend().log().iter().any(|l| l == "attach shared 0")
        })
        .await;
        assert_eq!(status(&r).await.networks[0].clients, 1);
        // Nothing is left pending: once its client goes, the network goes.
        r.disconnect(a).await;
        tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
        assert!(status(&r).await.networks.is_empty());
        assert_eq!(r.backend().log().last().unwrap(), "destroy shared");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_of_a_failed_create_try_again_themselves() {
        let dir = files(&["lab"]);
        let failing = Fake {
            fail_create: true,
            ..Default::default()
        };
        let r = registry_in(dir.path(), failing);
        let open = r.backend().gate("create lab");
        let a = connect(&r, peer(1000)).await.unwrap();
        let b = connect(&r, peer(1001)).await.unwrap();
        let first = tokio::spawn({
            let r = Arc::clone(&r);
            async move { acquire(&r, a, "lab", None, false).await }
        });
        until("create lab is under way", || {
            r.backend().entered("create lab")
        })
        .await;
        let second = tokio::spawn({
            let r = Arc::clone(&r);
            async move { acquire(&r, b, "lab", None, false).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        open.send(()).unwrap();
        for task in [first, second] {
            let e = answers("acquire", task).await.unwrap().unwrap_err();
            assert_eq!(e.code, ErrorCode::CreateFailure, "{}", e.message);
        }
        assert!(status(&r).await.networks.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_destroy_holds_up_only_its_own_network() {
        let dir = files(&["slow", "fast"]);
        let r = registry_in(dir.path(), Fake::default());
        let a = connect(&r, peer(1000)).await.unwrap();
        let (before, _) = acquire(&r, a, "slow", None, false).await.unwrap();
        let open = r.backend().gate("destroy slow");
        r.disconnect(a).await;
        until("destroy slow is under way", || {
            r.backend().entered("destroy slow")
        })
        .await;

        let b = connect(&r, peer(1001)).await.unwrap();
        answers("acquire", acquire(&r, b, "fast", None, false))
            .await
            .unwrap();
        let s = answers("status", status(&r)).await;
        let names: Vec<_> = s.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            ["fast", "slow"],
            "a network being removed is still there"
        );
        assert_eq!(s.networks[1].removal_in_seconds, Some(0.0));
        // Shutdown is refused (a client holds "fast") without waiting for "slow".
        assert!(!answers("shutdown", r.shutdown_if_idle()).await);

        // An acquire of the network being removed waits for the removal, then makes it anew.
        let c = connect(&r, peer(1002)).await.unwrap();
        let again = tokio::spawn({
            let r = Arc::clone(&r);
            async move { acquire(&r, c, "slow", None, false).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!again.is_finished());
        open.send(()).unwrap();
        let (after, _) = answers("acquire", again).await.unwrap().unwrap();
        assert_ne!(before.subnet, after.subnet, "a new network");
        let log = r.backend().log();
        let slow: Vec<_> = log
            .iter()
            .filter(|l| l.ends_with(" slow"))
            .map(String::as_str)
            .collect();
        assert_eq!(slow, ["create slow", "destroy slow", "create slow"]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_a_removal_under_way() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        acquire(&r, a, "shared", None, false).await.unwrap();
        let open = r.backend().gate("destroy shared");
        r.disconnect(a).await;
        until("destroy is under way", || {
            r.backend().entered("destroy shared")
        })
        .await;
        let shutdown = tokio::spawn({
            let r = Arc::clone(&r);
            async move { r.shutdown_if_idle().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!shutdown.is_finished(), "the network is not gone yet");
        open.send(()).unwrap();
        assert!(answers("shutdown", shutdown).await.unwrap());
        assert_eq!(r.backend().log().last().unwrap(), "destroy shared");
        assert!(status(&r).await.networks.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_endpoint_listing_never_clears_macs_or_counts() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        let mac = [0x52, 0x54, 0, 0, 0, 9];
        let (info, _) = acquire(&r, a, "shared", Some(mac), false).await.unwrap();
        r.backend().close(&info.interface);
        r.backend().fail_endpoints.store(true, Ordering::SeqCst);
        // Its TAP is closed, but the broker cannot tell: the MAC stays taken.
        let e = acquire(&r, a, "shared", Some(mac), false)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{}", e.message);

        let b = connect(&r, peer(1001)).await.unwrap();
        let mut held = vec![];
        for _ in 0..MAX_TAPS_PER_CLIENT {
            held.push(acquire(&r, b, "shared", None, false).await.unwrap().0);
        }
        r.backend().close(&held[0].interface);
        let e = acquire(&r, b, "shared", None, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InternalError);
        assert!(
            e.message.contains("netlink dump interrupted"),
            "{}",
            e.message
        );

        r.backend().fail_endpoints.store(false, Ordering::SeqCst);
        acquire(&r, b, "shared", None, false).await.unwrap();
        acquire(&r, a, "shared", Some(mac), false).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn errors_reach_the_client_with_their_causes() {
        let failing = Fake {
            fail_create: true,
            ..Default::default()
        };
        let r = registry_in(std::path::Path::new("/nonexistent"), failing);
        let a = connect(&r, peer(0)).await.unwrap();
        let e = r.acquire(a, "shared", None, false).await.unwrap_err();
        assert!(matches!(e, RegistryError::Create { .. }), "{e:?}");
        assert_eq!(
            crate::error::chain(&e),
            "cannot create network \"shared\": no bridges today"
        );
        assert_eq!(wire_error(&e).message, crate::error::chain(&e));
    }

    fn by_name<'a>(views: &'a [NetworkView], name: &str) -> &'a NetworkView {
        views
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("{name} not listed"))
    }

    #[tokio::test(start_paused = true)]
    async fn networks_lists_defined_active_and_idle_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("lab.json"),
            r#"{"mode": "host", "subnet": "10.9.8.1", "mask": "255.255.255.0"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("broken.json"), "{nope").unwrap();
        let r = registry_in(dir.path(), Fake::default());
        let a = connect(&r, peer(1000)).await.unwrap();
        let b = connect(&r, peer(1001)).await.unwrap();
        let views = r.networks(&peer(1000), None).await.unwrap();
        let names: Vec<_> = views.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            ["host", "lab", "shared"],
            "invalid files are left out"
        );
        for v in &views {
            assert_eq!(v.state, NetworkState::Inactive, "{}", v.name);
            assert!(v.details.is_none() && v.taps.is_empty() && v.clients == 0);
        }
        assert_eq!(
            by_name(&views, "lab")
                .config
                .fixed_subnet()
                .unwrap()
                .to_string(),
            "10.9.8.0/24"
        );

        let (_, _f1) = acquire(&r, a, "shared", None, false).await.unwrap();
        let (_, _f2) = acquire(&r, b, "shared", None, false).await.unwrap();
        let (_, _f3) = acquire(&r, b, "host", None, false).await.unwrap();
        let views = r.networks(&peer(0), None).await.unwrap();
        let shared = by_name(&views, "shared");
        assert_eq!(shared.state, NetworkState::Active);
        assert_eq!((shared.clients, shared.taps.len()), (2, 2));
        assert_eq!(
            shared.details.as_ref().unwrap().subnet.to_string(),
            "10.0.1.0/24"
        );
        assert_eq!(by_name(&views, "lab").state, NetworkState::Inactive);

        r.disconnect(b).await;
        tokio::time::advance(Duration::from_secs(20)).await;
        let views = r.networks(&peer(0), None).await.unwrap();
        let host = by_name(&views, "host");
        let NetworkState::Idle { removal_in } = host.state else {
            panic!("host is {:?}", host.state)
        };
        assert_eq!(removal_in, IDLE - Duration::from_secs(20));
        assert_eq!(host.clients, 0);
        assert_eq!(by_name(&views, "shared").clients, 1);

        tokio::time::advance(IDLE).await;
        until("host removed", || {
            r.backend().log().contains(&"destroy host".to_string())
        })
        .await;
        let views = r.networks(&peer(0), None).await.unwrap();
        assert_eq!(by_name(&views, "host").state, NetworkState::Inactive);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restricted_network_is_invisible_to_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.json"), r#"{"allowed_users": [1000]}"#).unwrap();
        let r = registry_in(dir.path(), Fake::default());
        let a = connect(&r, peer(1000)).await.unwrap();
        let (_, _f) = acquire(&r, a, "mine", None, false).await.unwrap();
        let names = |views: Vec<NetworkView>| -> Vec<String> {
            views.into_iter().map(|v| v.name).collect()
        };
        assert!(names(r.networks(&peer(1000), None).await.unwrap()).contains(&"mine".into()));
        assert!(names(r.networks(&peer(0), None).await.unwrap()).contains(&"mine".into()));
        let other = names(r.networks(&peer(1001), None).await.unwrap());
        assert_eq!(other, ["host", "shared"]);
        for only in ["mine", "nonexistent", "../x"] {
            let e = r.networks(&peer(1001), Some(only)).await.unwrap_err();
            assert_eq!(wire_error(&e).code, ErrorCode::NotFound, "{only}");
        }
        let e = r.leases(&peer(1001), Some("mine")).await.unwrap_err();
        assert_eq!(wire_error(&e).code, ErrorCode::NotFound);
        assert_eq!(
            r.networks(&peer(1000), Some("mine")).await.unwrap().len(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn taps_show_their_mac_and_holder_until_it_leaves() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        let b = connect(&r, peer(1001)).await.unwrap();
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let (ia, _fa) = acquire(&r, a, "shared", Some(mac), false).await.unwrap();
        let (ib, _fb) = acquire(&r, b, "shared", None, false).await.unwrap();
        let view = r
            .networks(&peer(1000), Some("shared"))
            .await
            .unwrap()
            .remove(0);
        let tap = |interface: &str| {
            view.taps
                .iter()
                .find(|t| t.endpoint.0 == interface)
                .cloned()
                .unwrap_or_else(|| panic!("{interface} not listed"))
        };
        assert_eq!(
            tap(&ia.interface),
            TapView {
                endpoint: EndpointId(ia.interface.clone()),
                mac: Some(mac),
                uid: Some(1000),
                holder: Some(Holder {
                    client: a,
                    pid: 1100,
                    uid: 1000
                }),
            }
        );
        let tb = tap(&ib.interface);
        assert_eq!(
            tb.mac.map(|m| Mac::from(m).to_string()),
            Some(ib.mac.clone())
        );
        assert_eq!(tb.holder.map(|h| (h.client, h.pid)), Some((b, 1101)));

        // The connection goes, its VM keeps the TAP: still listed, with no holder.
        r.disconnect(b).await;
        let view = r
            .networks(&peer(0), Some("shared"))
            .await
            .unwrap()
            .remove(0);
        let tb = view
            .taps
            .iter()
            .find(|t| t.endpoint.0 == ib.interface)
            .unwrap();
        assert_eq!((tb.uid, tb.holder.clone()), (Some(1001), None));
        // The VM closes it: gone.
        r.backend().close(&ib.interface);
        let view = r
            .networks(&peer(0), Some("shared"))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(view.taps.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn leases_are_joined_with_the_tap_of_their_mac() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        let mac = [0x52, 0x54, 0, 9, 9, 9];
        let (info, _f) = acquire(&r, a, "shared", Some(mac), false).await.unwrap();
        let expires = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let lease = |mac, last| LeaseView {
            mac,
            ipv4: Ipv4Addr::new(10, 0, 1, last),
            ipv6: None,
            hostname: Some(format!("vm{last}")),
            expires,
        };
        *r.backend().leases.lock().unwrap() =
            vec![lease(mac, 10), lease([0x52, 0, 0, 0, 0, 7], 11)];
        // Inactive networks have no services to ask.
        let all = r.leases(&peer(1000), None).await.unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|e| e.network == "shared"));
        let ours = all.iter().find(|e| e.lease.mac == mac).unwrap();
        let tap = ours.tap.as_ref().expect("joined with its TAP");
        assert_eq!(tap.endpoint.0, info.interface);
        assert_eq!(
            tap.holder.as_ref().map(|h| (h.client, h.uid)),
            Some((a, 1000))
        );
        let stranger = all.iter().find(|e| e.lease.mac != mac).unwrap();
        assert!(stranger.tap.is_none(), "a MAC no TAP was handed out with");

        let reply = crate::inspect::leases_reply(all, expires - Duration::from_secs(30));
        let ours = reply.leases.iter().find(|l| l.ipv4 == "10.0.1.10").unwrap();
        assert_eq!(ours.mac, "52:54:00:09:09:09");
        assert_eq!(
            (ours.expires_at, ours.expires_in_seconds),
            (2_000_000_000, 30)
        );
        assert_eq!(ours.interface.as_deref(), Some(info.interface.as_str()));
        assert_eq!(
            (ours.uid, ours.pid, ours.client),
            (Some(1000), Some(1100), Some(a))
        );
        assert_eq!(ours.hostname.as_deref(), Some("vm10"));
        assert_eq!(ours.ipv6, None);
    }

    #[tokio::test(start_paused = true)]
    async fn status_leaves_out_the_asking_connection() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        let (_, _f) = acquire(&r, a, "shared", None, false).await.unwrap();
        let asker = connect(&r, peer(1001)).await.unwrap();
        let s = status_reply(r.status_excluding(asker).await);
        let ids: Vec<_> = s.clients.iter().map(|c| c.id).collect();
        assert_eq!(ids, [a]);
        assert_eq!(r.status().await.clients.len(), 2);
        // A holder asking is not listed either, though the network still counts it.
        let s = r.status_excluding(a).await;
        let ids: Vec<_> = s.clients.iter().map(|c| c.id).collect();
        assert_eq!(
            ids,
            [asker],
            "the holder asks: only the other one is listed"
        );
        assert_eq!(s.networks[0].clients, 1);
    }

    fn spec(network: &str, port: u16, interface: &str) -> ForwardSpec {
        ForwardSpec {
            network_name: network.into(),
            protocol: "tcp".into(),
            external_port: port,
            internal_port: 22,
            interface: interface.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_client_gets_its_forwards_again_and_they_end_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry();
        r.persist(dir.path().to_path_buf());
        let a = connect(&r, peer(1000)).await.unwrap();
        let (kept, _) = acquire(&r, a, "shared", None, false).await.unwrap();
        let (gone, _) = acquire(&r, a, "shared", None, false).await.unwrap();
        r.forward(a, &spec("shared", 2222, &kept.interface))
            .await
            .unwrap();
        r.forward(a, &spec("shared", 2223, &gone.interface))
            .await
            .unwrap();
        r.flush_state().await;
        let recorded = crate::state::load(dir.path()).unwrap().unwrap();
        let ports: Vec<_> = recorded.clients[0]
            .forwards
            .iter()
            .map(|f| (f.external_port, f.endpoint.clone()))
            .collect();
        assert_eq!(
            ports,
            [
                (2222, kept.interface.clone()),
                (2223, gone.interface.clone())
            ]
        );
        // The broker dies; one TAP closes meanwhile. The next one adopts the client.
        drop(r);
        let fake = Fake::default();
        fake.closed.lock().unwrap().insert(gone.interface.clone());
        let r = registry_in(std::path::Path::new("/nonexistent"), fake);
        r.adopt(recorded.networks, recorded.clients).await;
        let forwarded: Vec<_> = r
            .backend()
            .log()
            .into_iter()
            .filter(|l| l.starts_with("forward"))
            .collect();
        assert_eq!(
            forwarded,
            [format!("forward shared {} 2222 22", kept.interface)],
            "only the forward whose TAP lives"
        );
        r.disconnect(a).await;
        assert!(
            r.backend()
                .log()
                .contains(&"unforward shared 2222".to_string()),
            "{:?}",
            r.backend().log()
        );
    }

    /// An endpoint the backend hands out again (a closed TAP back from its pool) is its
    /// new client's only: its previous client, still connected, cannot forward a port to
    /// it, no longer counts it as its own, and its leaving ends none of the new client's
    /// forwards.
    #[tokio::test(start_paused = true)]
    async fn an_endpoint_handed_out_again_is_no_longer_its_previous_clients() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry();
        r.persist(dir.path().to_path_buf());
        let a = connect(&r, peer(1000)).await.unwrap();
        let (old, fd) = acquire(&r, a, "shared", None, false).await.unwrap();
        r.forward(a, &spec("shared", 2222, &old.interface))
            .await
            .unwrap();
        // The VM closes its TAP; the backend hands it to the next client.
        drop(fd);
        r.backend().close(&old.interface);
        *r.backend().reuse.lock().unwrap() = Some(old.interface.clone());
        let b = connect(&r, peer(1001)).await.unwrap();
        let (new, _fd) = acquire(&r, b, "shared", None, false).await.unwrap();
        assert_eq!(new.interface, old.interface);
        let e = r
            .forward(a, &spec("shared", 2223, &old.interface))
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::NotYourEndpoint { .. }), "{e}");
        r.forward(b, &spec("shared", 2224, &new.interface))
            .await
            .unwrap();
        r.flush_state().await;
        let recorded = crate::state::load(dir.path()).unwrap().unwrap();
        let endpoints = |id: ClientId| {
            let c = recorded.clients.iter().find(|c| c.id == id).unwrap();
            (c.endpoints.clone(), c.forwards.len())
        };
        assert_eq!(endpoints(a), (vec![], 0), "still the previous client's");
        assert_eq!(
            endpoints(b),
            (vec![("shared".to_string(), new.interface.clone())], 1)
        );
        r.disconnect(a).await;
        let log = r.backend().log();
        assert!(
            !log.iter().any(|l| l.starts_with("unforward")),
            "the previous client's leaving ended a forward: {log:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forwards_only_to_ones_own_taps_low_ports_for_root_and_end_with_the_client() {
        let r = registry();
        let a = connect(&r, peer(1000)).await.unwrap();
        let (info, _fd) = acquire(&r, a, "shared", None, false).await.unwrap();
        let b = connect(&r, peer(1001)).await.unwrap();
        let (theirs, _fd2) = acquire(&r, b, "shared", None, false).await.unwrap();
        let code = |e: RegistryError| wire_error(&e).code;

        assert_eq!(
            r.forward(a, &spec("shared", 2222, &info.interface))
                .await
                .unwrap(),
            None
        );
        // Someone else's TAP, a TAP of another network, a TAP that does not exist.
        for (net, tap) in [
            ("shared", theirs.interface.as_str()),
            ("host", info.interface.as_str()),
            ("shared", "nosuch0"),
        ] {
            let e = r.forward(a, &spec(net, 2223, tap)).await.unwrap_err();
            assert!(matches!(e, RegistryError::NotYourEndpoint { .. }), "{e}");
            assert_eq!(code(e), ErrorCode::NotAllowed);
        }
        let e = r
            .forward(a, &spec("shared", 1023, &info.interface))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("only root"), "{e}");
        assert_eq!(code(e), ErrorCode::NotAllowed);
        let e = r
            .forward(a, &spec("shared", 9999, &info.interface))
            .await
            .unwrap_err();
        assert_eq!(code(e), ErrorCode::PortInUse);
        // Root may have a low port, on its own TAP.
        let root = connect(&r, peer(0)).await.unwrap();
        let (mine, _fd3) = acquire(&r, root, "shared", None, false).await.unwrap();
        r.forward(root, &spec("shared", 80, &mine.interface))
            .await
            .unwrap();
        // The network lists both, with their clients.
        let views = r.networks(&peer(0), Some("shared")).await.unwrap();
        let ports: Vec<_> = views[0]
            .forwards
            .iter()
            .map(|f| (f.external_port, f.client))
            .collect();
        assert_eq!(ports, [(2222, a), (80, root)]);

        r.disconnect(a).await;
        let log = r.backend().log();
        assert!(
            log.contains(&format!("forward shared {} 2222 22", info.interface)),
            "{log:?}"
        );
        assert!(
            log.contains(&"unforward shared 2222".to_string()),
            "{log:?}"
        );
        assert!(!log.contains(&"unforward shared 80".to_string()), "{log:?}");
    }

    #[test]
    fn macs_are_unicast_local_and_distinct() {
        let a = guest_mac("shared", 0);
        let b = guest_mac("shared", 1);
        let c = guest_mac("host", 0);
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, guest_mac("shared", 0), "stable");
    }

    #[test]
    fn only_a_change_of_peers_alone_applies_to_a_live_network() {
        let file = |peers: &str, extra: &str| {
            crate::config::parse(
                "lab",
                std::path::Path::new("/etc/vmnet-broker.d/lab.json"),
                &format!(
                    r#"{{"subnet":"10.90.0.1","dhcp":false{extra},"vxlan":{{"vni":1,"local":"192.0.2.1","peers":[{peers}]}}}}"#
                ),
            )
            .unwrap()
        };
        let old = file(r#""192.0.2.2""#, "");
        assert!(only_peers_changed(
            &old,
            &file(r#""192.0.2.2","192.0.2.3""#, "")
        ));
        assert!(only_peers_changed(&old, &file(r#""192.0.2.3""#, "")));
        assert!(!only_peers_changed(&old, &old), "nothing changed");
        assert!(
            !only_peers_changed(&old, &file(r#""192.0.2.3""#, r#","mtu":1400"#)),
            "something else changed too"
        );
        let mut plain = old.clone();
        plain.vxlan = None;
        assert!(!only_peers_changed(&plain, &old));
    }

    #[test]
    fn overlay_macs_differ_across_hosts_and_stay_per_host() {
        let (h1, h2) = (host_id("machine-one\n"), host_id("machine-two"));
        assert_eq!(
            h1,
            host_id("machine-one"),
            "whitespace of the file is not identity"
        );
        let a = overlay_guest_mac("lab", h1, 0);
        let b = overlay_guest_mac("lab", h2, 0);
        assert_ne!(a, b, "two hosts, one network, first TAP");
        assert_eq!(a, overlay_guest_mac("lab", h1, 0), "stable across restarts");
        assert_ne!(a, overlay_guest_mac("lab", h1, 1));
        assert_ne!(a, overlay_guest_mac("lab2", h1, 0));
        for m in [a, b] {
            assert_eq!(m[0] & 0x03, 0x02, "unicast, locally administered");
        }
    }
}
