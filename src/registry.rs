//! Which networks exist, which clients hold them, and when idle ones go away.
//!
//! A client's connection is its lease: [`Registry::disconnect`] drops every reference it
//! held. A network whose last client leaves is removed after the idle timeout unless an
//! acquire comes first, which gets the very same network back. All state changes happen
//! under one lock, so backend calls for a network never overlap.

use crate::backend::{AttachRequest, Attachment, Backend, NetworkDetails};
use crate::config::{ConfigDir, NetworkConfig, format_mac, name_hash, prefix_to_mask};
use crate::policy::{self, Directory, Peer};
use crate::protocol::{BrokerError, ClientStatus, ErrorCode, NetworkInfo, NetworkStatus, Status};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

/// The original broker's limit: the 9th distinct network of one client fails.
pub const MAX_NETWORKS_PER_CLIENT: usize = 8;

/// Live TAPs one connection may hold (across its networks). A bridge takes at most 1024
/// ports; without a limit one client could take them all from everyone else.
pub const MAX_TAPS_PER_CLIENT: usize = 64;

/// Connections one non-root uid may have open at once, so one user cannot exhaust the
/// broker's file descriptors for everyone.
pub const MAX_CONNECTIONS_PER_UID: usize = 256;

pub type ClientId = u64;

/// Size of a network's MAC map at which it is first pruned to the live endpoints.
const PRUNE_MACS_FROM: usize = 64;

struct Network<N> {
    handle: N,
    config: NetworkConfig,
    details: NetworkDetails,
    clients: BTreeSet<ClientId>,
    /// Endpoints attached so far; names and MACs derive from it.
    serial: u64,
    /// The guest MAC of each endpoint handed out, so no MAC (requested or suggested) is
    /// given to two live endpoints at once. Pruned to the live endpoints whenever it has
    /// doubled since the last pruning, so it follows them at an amortized constant cost.
    macs: BTreeMap<String, [u8; 6]>,
    prune_macs_at: usize,
    /// When the idle removal is due, while no client holds the network.
    removal_at: Option<Instant>,
    /// Bumped whenever the network is acquired again, so a stale timer does nothing.
    generation: u64,
}

struct Client {
    peer: Peer,
    networks: BTreeSet<String>,
    /// TAPs handed to this client, as (network, interface), pruned to the live ones when
    /// the client reaches [`MAX_TAPS_PER_CLIENT`].
    taps: Vec<(String, String)>,
    /// Persistent endpoints made for this client, as (network, interface): they do not
    /// go away with their fd, so they go when the client does.
    persistent: Vec<(String, String)>,
}

struct State<N> {
    networks: BTreeMap<String, Network<N>>,
    clients: BTreeMap<ClientId, Client>,
    next_client: ClientId,
    /// Set once the broker is going down: no new clients, no new networks.
    closed: bool,
}

pub struct Registry<B: Backend> {
    backend: B,
    config: ConfigDir,
    directory: Box<dyn Directory>,
    idle_timeout: Duration,
    state: Mutex<State<B::Network>>,
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
            directory,
            idle_timeout,
            state: Mutex::new(State {
                networks: BTreeMap::new(),
                clients: BTreeMap::new(),
                next_client: 1,
                closed: false,
            }),
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Registers a newly connected client. Fails once the broker is shutting down.
    pub async fn connect(&self, peer: Peer) -> Result<ClientId, BrokerError> {
        let mut st = self.state.lock().await;
        if st.closed {
            return Err(BrokerError::new(
                ErrorCode::InternalError,
                "the broker is shutting down",
            ));
        }
        if peer.uid != 0 {
            let open = st
                .clients
                .values()
                .filter(|c| c.peer.uid == peer.uid)
                .count();
            if open >= MAX_CONNECTIONS_PER_UID {
                warn!(
                    pid = peer.pid,
                    uid = peer.uid,
                    "connection refused: {open} open"
                );
                return Err(BrokerError::new(
                    ErrorCode::InternalError,
                    format!(
                        "uid {} already has {open} connections open (at most {MAX_CONNECTIONS_PER_UID})",
                        peer.uid
                    ),
                ));
            }
        }
        let id = st.next_client;
        st.next_client += 1;
        st.clients.insert(
            id,
            Client {
                peer,
                networks: BTreeSet::new(),
                taps: Vec::new(),
                persistent: Vec::new(),
            },
        );
        info!(
            client = id,
            pid = peer.pid,
            uid = peer.uid,
            clients = st.clients.len(),
            "client connected"
        );
        Ok(id)
    }

    /// Acquires `name` for `client`: creates the network on first use, then attaches a new
    /// endpoint. The client's reference counts once however often it acquires.
    pub async fn acquire(
        self: &Arc<Self>,
        client: ClientId,
        name: &str,
        requested_mac: Option<[u8; 6]>,
        persistent: bool,
    ) -> Result<(NetworkInfo, Attachment), BrokerError> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        let Some(c) = st.clients.get(&client) else {
            return Err(BrokerError::new(ErrorCode::InternalError, "unknown client"));
        };
        let peer = c.peer;
        let refuse = |code: ErrorCode, message: String| {
            warn!(
                client,
                pid = peer.pid,
                uid = peer.uid,
                network = name,
                code = code.code(),
                "acquire refused: {message}"
            );
            BrokerError::new(code, message)
        };
        if !c.networks.contains(name) && c.networks.len() >= MAX_NETWORKS_PER_CLIENT {
            return Err(refuse(
                ErrorCode::InternalError,
                format!("a client may hold at most {MAX_NETWORKS_PER_CLIENT} distinct networks"),
            ));
        }
        if st.closed {
            return Err(refuse(
                ErrorCode::InternalError,
                "the broker is shutting down".into(),
            ));
        }
        if c.taps.len() >= MAX_TAPS_PER_CLIENT {
            self.prune_client_taps(st, client).await;
            if st.clients[&client].taps.len() >= MAX_TAPS_PER_CLIENT {
                return Err(refuse(
                    ErrorCode::InternalError,
                    format!("a client may hold at most {MAX_TAPS_PER_CLIENT} TAPs at once"),
                ));
            }
        }

        if let Some(net) = st.networks.get(name) {
            policy::check(&net.config, &peer, self.directory.as_ref())
                .map_err(|m| refuse(ErrorCode::NotAllowed, m))?;
        } else {
            let config = match self.config.load(name) {
                Ok(Some(config)) => config,
                Ok(None) => {
                    return Err(refuse(
                        ErrorCode::NotFound,
                        format!("no network named {name:?}"),
                    ));
                }
                // The host failed us (permissions, out of fds): not the client's fault,
                // and not a verdict on the file.
                Err(e) if e.unreadable => {
                    return Err(refuse(
                        ErrorCode::InternalError,
                        format!("cannot read the definition of network {name:?}: {e}"),
                    ));
                }
                Err(e) => {
                    return Err(refuse(
                        ErrorCode::NotFound,
                        format!("network {name:?} has an invalid definition: {e}"),
                    ));
                }
            };
            policy::check(&config, &peer, self.directory.as_ref())
                .map_err(|m| refuse(ErrorCode::NotAllowed, m))?;
            let handle = self.backend.create(&config).await.map_err(|e| {
                refuse(
                    ErrorCode::CreateFailure,
                    format!("cannot create network {name:?}: {e}"),
                )
            })?;
            let details = self.backend.details(&handle);
            info!(
                network = name,
                mode = %config.mode,
                subnet = %details.subnet,
                mask = %prefix_to_mask(details.subnet.prefix_len()),
                gateway = %details.gateway,
                bridge = %details.bridge,
                "network created"
            );
            st.networks.insert(
                name.to_string(),
                Network {
                    handle,
                    config,
                    details,
                    clients: BTreeSet::new(),
                    serial: 0,
                    macs: BTreeMap::new(),
                    prune_macs_at: PRUNE_MACS_FROM,
                    removal_at: None,
                    generation: 0,
                },
            );
        }

        let net = st.networks.get_mut(name).expect("present");
        if requested_mac.is_some() || net.macs.len() >= net.prune_macs_at {
            let live = self.backend.endpoints(&net.handle).await;
            net.macs.retain(|iface, _| live.contains(iface));
            net.prune_macs_at = (2 * net.macs.len()).max(PRUNE_MACS_FROM);
        }
        let in_use =
            |macs: &BTreeMap<String, [u8; 6]>, mac: [u8; 6]| macs.values().any(|m| *m == mac);
        let mut serial = net.serial;
        let mac = match requested_mac {
            // Suggestions are predictable, so another client may have asked for one
            // already: skip those in use.
            None => {
                while in_use(&net.macs, guest_mac(name, serial)) {
                    serial += 1;
                }
                guest_mac(name, serial)
            }
            Some(mac) => {
                if let Some((iface, _)) = net.macs.iter().find(|(_, m)| **m == mac) {
                    let message = format!(
                        "mac {} is in use on network {name:?} by {iface}",
                        format_mac(&mac)
                    );
                    if net.clients.is_empty() && net.removal_at.is_none() {
                        self.schedule_removal(name, net);
                    }
                    return Err(refuse(ErrorCode::InvalidRequest, message));
                }
                mac
            }
        };
        net.serial = serial + 1;
        let request = AttachRequest {
            serial,
            mac,
            peer,
            persistent,
        };
        let attachment = match self.backend.attach(&net.handle, &request).await {
            Ok(a) => a,
            Err(e) => {
                // A network created for this acquire must not linger without its timer.
                if net.clients.is_empty() && net.removal_at.is_none() {
                    self.schedule_removal(name, net);
                }
                return Err(refuse(
                    ErrorCode::CreateFailure,
                    format!("cannot attach to network {name:?}: {e}"),
                ));
            }
        };
        if net.removal_at.take().is_some() {
            net.generation += 1;
            info!(network = name, "idle removal cancelled");
        }
        net.clients.insert(client);
        net.macs.insert(attachment.interface.clone(), mac);
        let info = NetworkInfo {
            name: name.to_string(),
            mode: net.config.mode.as_str().to_string(),
            subnet: net.details.subnet.to_string(),
            gateway: net.details.gateway.to_string(),
            mask: prefix_to_mask(net.details.subnet.prefix_len()).to_string(),
            mtu: net.details.mtu,
            bridge: net.details.bridge.clone(),
            interface: attachment.interface.clone(),
            mac: format_mac(&mac),
        };
        let net_clients = net.clients.len();
        let entry = st.clients.get_mut(&client).expect("checked above");
        entry.networks.insert(name.to_string());
        entry.taps.push((name.to_string(), info.interface.clone()));
        if persistent {
            entry
                .persistent
                .push((name.to_string(), info.interface.clone()));
        }
        info!(
            client,
            pid = peer.pid,
            uid = peer.uid,
            network = name,
            interface = %info.interface,
            mac = %info.mac,
            network_clients = net_clients,
            "network acquired"
        );
        Ok((info, attachment))
    }

    /// The client's connection closed: release everything it held.
    pub async fn disconnect(self: &Arc<Self>, client: ClientId) {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        let Some(c) = st.clients.remove(&client) else {
            return;
        };
        for (name, interface) in &c.persistent {
            let Some(net) = st.networks.get(name) else {
                continue;
            };
            match self.backend.release(&net.handle, interface).await {
                Ok(()) => {
                    info!(client, network = %name, interface = %interface, "persistent TAP removed")
                }
                Err(e) => {
                    warn!(client, network = %name, "cannot remove persistent TAP {interface}: {e}")
                }
            }
        }
        for name in &c.networks {
            let Some(net) = st.networks.get_mut(name) else {
                continue;
            };
            net.clients.remove(&client);
            info!(
                client,
                pid = c.peer.pid,
                uid = c.peer.uid,
                network = %name,
                network_clients = net.clients.len(),
                "network released"
            );
            if net.clients.is_empty() {
                self.schedule_removal(name, net);
            }
        }
        info!(
            client,
            pid = c.peer.pid,
            uid = c.peer.uid,
            clients = st.clients.len(),
            "client disconnected"
        );
    }

    fn schedule_removal(self: &Arc<Self>, name: &str, net: &mut Network<B::Network>) {
        net.generation += 1;
        let generation = net.generation;
        let at = Instant::now() + self.idle_timeout;
        net.removal_at = Some(at);
        info!(
            network = name,
            seconds = self.idle_timeout.as_secs_f64(),
            "network idle: removal scheduled"
        );
        let this = Arc::clone(self);
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            this.expire(&name, generation).await;
        });
    }

    async fn expire(&self, name: &str, generation: u64) {
        let mut st = self.state.lock().await;
        let due = st.networks.get(name).is_some_and(|n| {
            n.generation == generation && n.clients.is_empty() && n.removal_at.is_some()
        });
        if !due {
            return;
        }
        let net = st.networks.remove(name).expect("checked");
        info!(network = name, "idle timeout: removing network");
        self.remove(name, net).await;
    }

    async fn remove(&self, name: &str, net: Network<B::Network>) {
        let subnet = net.details.subnet;
        match self.backend.destroy(net.handle).await {
            Ok(()) => info!(network = name, %subnet, "network removed"),
            Err(e) => warn!(network = name, "network removal incomplete: {e}"),
        }
    }

    /// Forgets the TAPs of `client` that are gone (their VM closed them).
    async fn prune_client_taps(&self, st: &mut State<B::Network>, client: ClientId) {
        let Some(c) = st.clients.get_mut(&client) else {
            return;
        };
        let mut live = BTreeSet::new();
        for name in &c.networks {
            if let Some(net) = st.networks.get(name) {
                live.extend(self.backend.endpoints(&net.handle).await);
            }
        }
        c.taps.retain(|(_, iface)| live.contains(iface));
    }

    /// Clients that hold at least one network. Connections that hold none (a `status`
    /// query, a monitor) do not keep the broker from stopping.
    pub async fn holders(&self) -> usize {
        let st = self.state.lock().await;
        st.clients
            .values()
            .filter(|c| !c.networks.is_empty())
            .count()
    }

    /// If no client holds a network, stops admitting new ones, removes every network and
    /// returns true. Otherwise it changes nothing and returns false: stopping would pull
    /// the network from under running VMs.
    pub async fn shutdown_if_idle(&self) -> bool {
        let mut st = self.state.lock().await;
        if st.clients.values().any(|c| !c.networks.is_empty()) {
            return false;
        }
        st.closed = true;
        let networks = std::mem::take(&mut st.networks);
        for (name, net) in networks {
            self.remove(&name, net).await;
        }
        true
    }

    pub async fn status(&self) -> Status {
        let st = self.state.lock().await;
        let now = Instant::now();
        let mut networks = Vec::with_capacity(st.networks.len());
        for (name, net) in &st.networks {
            networks.push(NetworkStatus {
                name: name.clone(),
                mode: net.config.mode.as_str().to_string(),
                subnet: net.details.subnet.to_string(),
                gateway: net.details.gateway.to_string(),
                bridge: net.details.bridge.clone(),
                mtu: net.details.mtu,
                clients: net.clients.len(),
                taps: self.backend.endpoints(&net.handle).await,
                removal_in_seconds: net
                    .removal_at
                    .map(|at| at.saturating_duration_since(now).as_secs_f64()),
            });
        }
        let clients = st
            .clients
            .iter()
            .map(|(id, c)| ClientStatus {
                id: *id,
                pid: c.peer.pid,
                uid: c.peer.uid,
                gid: c.peer.gid,
                networks: c.networks.iter().cloned().collect(),
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: crate::protocol::PROTOCOL_VERSION,
            pid: std::process::id(),
            idle_timeout_seconds: self.idle_timeout.as_secs_f64(),
            networks,
            clients,
            truncated: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;
    use std::net::Ipv4Addr;
    use std::sync::Mutex as StdMutex;

    /// Records what the core asked for; hands out /dev/null as the endpoint.
    #[derive(Default)]
    struct Fake {
        log: StdMutex<Vec<String>>,
        fail_create: bool,
        /// Endpoints attached and not closed yet (a VM closing its TAP: `close`).
        live: StdMutex<BTreeSet<String>>,
    }

    impl Fake {
        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
        fn close(&self, interface: &str) {
            assert!(self.live.lock().unwrap().remove(interface), "{interface}");
        }
    }

    impl Backend for Fake {
        type Network = (String, u8);

        async fn create(&self, c: &NetworkConfig) -> Result<Self::Network, BackendError> {
            if self.fail_create {
                return Err(BackendError::new("no bridges today"));
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
                mtu: 1500,
                bridge: format!("br-{}", n.0),
            }
        }
        async fn attach(
            &self,
            n: &Self::Network,
            r: &AttachRequest,
        ) -> Result<Attachment, BackendError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("attach {} {}", n.0, r.serial));
            let interface = format!("tap-{}-{}", n.0, r.serial);
            self.live.lock().unwrap().insert(interface.clone());
            Ok(Attachment {
                interface,
                fd: std::fs::File::open("/dev/null")?.into(),
            })
        }
        async fn release(&self, n: &Self::Network, interface: &str) -> Result<(), BackendError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("release {} {interface}", n.0));
            Ok(())
        }
        async fn endpoints(&self, n: &Self::Network) -> Vec<String> {
            let prefix = format!("tap-{}-", n.0);
            let live = self.live.lock().unwrap();
            live.iter()
                .filter(|i| i.starts_with(&prefix))
                .cloned()
                .collect()
        }
        async fn destroy(&self, n: Self::Network) -> Result<(), BackendError> {
            self.log.lock().unwrap().push(format!("destroy {}", n.0));
            Ok(())
        }
        async fn remove_stale(&self) -> Result<(), BackendError> {
            Ok(())
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
        }
    }

    #[tokio::test(start_paused = true)]
    async fn first_acquire_creates_later_ones_join() {
        let r = registry();
        let a = r.connect(peer(1000)).await.unwrap();
        let b = r.connect(peer(1001)).await.unwrap();
        let (i1, _) = r.acquire(a, "shared", None, false).await.unwrap();
        let (i2, _) = r.acquire(b, "shared", None, false).await.unwrap();
        let (i3, _) = r.acquire(a, "shared", None, false).await.unwrap();
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
        let s = r.status().await;
        assert_eq!(s.networks[0].clients, 2, "client a counts once");
    }

    #[tokio::test(start_paused = true)]
    async fn last_release_schedules_removal_and_acquire_cancels_it() {
        let r = registry();
        let a = r.connect(peer(1000)).await.unwrap();
        let (first, _) = r.acquire(a, "host", None, false).await.unwrap();
        r.disconnect(a).await;
        let s = r.status().await;
        assert_eq!(s.networks[0].removal_in_seconds, Some(120.0));
        tokio::time::advance(Duration::from_secs(119)).await;
        let b = r.connect(peer(1001)).await.unwrap();
        let (again, _) = r.acquire(b, "host", None, false).await.unwrap();
        assert_eq!(first.subnet, again.subnet, "the very same network");
        assert_eq!(r.status().await.networks[0].removal_in_seconds, None);
        // The cancelled timer must not remove the network when it fires.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(r.status().await.networks.len(), 1);
        r.disconnect(b).await;
        tokio::time::sleep(IDLE + Duration::from_millis(1)).await;
        assert!(r.status().await.networks.is_empty());
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
        let a = r.connect(peer(1000)).await.unwrap();
        for i in 0..8 {
            r.acquire(a, &format!("n{i}"), None, false).await.unwrap();
        }
        // Re-acquiring a held network is not a new one.
        r.acquire(a, "n0", None, false).await.unwrap();
        let e = r.acquire(a, "n8", None, false).await.unwrap_err();
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
        let a = r.connect(peer(1001)).await.unwrap();
        assert_eq!(
            r.acquire(a, "nope", None, false).await.unwrap_err().code,
            ErrorCode::NotFound
        );
        let bad = r.acquire(a, "bad", None, false).await.unwrap_err();
        assert_eq!(bad.code, ErrorCode::NotFound);
        assert!(bad.message.contains("bad.json"), "{}", bad.message);
        assert_eq!(
            r.acquire(a, "private", None, false).await.unwrap_err().code,
            ErrorCode::NotAllowed
        );
        assert!(r.backend().log().is_empty(), "nothing created for refusals");
        let owner = r.connect(peer(1000)).await.unwrap();
        r.acquire(owner, "private", None, false).await.unwrap();
        assert_eq!(
            r.acquire(a, "private", None, false).await.unwrap_err().code,
            ErrorCode::NotAllowed,
            "an existing network is checked too"
        );

        let failing = Fake {
            fail_create: true,
            ..Default::default()
        };
        let r = registry_in(dir.path(), failing);
        let a = r.connect(peer(0)).await.unwrap();
        let e = r.acquire(a, "shared", None, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::CreateFailure);
        assert!(e.message.contains("no bridges today"));
        assert!(r.status().await.networks.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn config_is_read_at_creation_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lab.json");
        std::fs::write(&file, r#"{"mode": "host"}"#).unwrap();
        let r = registry_in(dir.path(), Fake::default());
        let a = r.connect(peer(1000)).await.unwrap();
        assert_eq!(
            r.acquire(a, "lab", None, false).await.unwrap().0.mode,
            "host"
        );
        std::fs::write(&file, r#"{"mode": "shared", "allowed_users": [1]}"#).unwrap();
        let b = r.connect(peer(1001)).await.unwrap();
        assert_eq!(
            r.acquire(b, "lab", None, false).await.unwrap().0.mode,
            "host"
        );
        r.disconnect(a).await;
        r.disconnect(b).await;
        tokio::time::sleep(IDLE * 2).await;
        let c = r.connect(peer(1002)).await.unwrap();
        assert_eq!(
            r.acquire(c, "lab", None, false).await.unwrap_err().code,
            ErrorCode::NotAllowed,
            "recreated from the edited file"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_only_when_no_clients() {
        let r = registry();
        let a = r.connect(peer(1000)).await.unwrap();
        r.acquire(a, "shared", None, false).await.unwrap();
        assert!(!r.shutdown_if_idle().await);
        assert_eq!(r.status().await.networks.len(), 1);
        r.disconnect(a).await;
        assert!(r.shutdown_if_idle().await);
        assert!(r.status().await.networks.is_empty());
        assert!(r.connect(peer(1)).await.is_err(), "closed for new clients");
        assert_eq!(r.backend().log().last().unwrap(), "destroy shared");
    }

    #[tokio::test(start_paused = true)]
    async fn requested_mac_is_used_and_never_given_twice() {
        let r = registry();
        let a = r.connect(peer(1000)).await.unwrap();
        let mac = [0x52, 0x54, 0, 0, 0, 7];
        let (info, _) = r.acquire(a, "shared", Some(mac), false).await.unwrap();
        assert_eq!(info.mac, "52:54:00:00:00:07");
        let e = r.acquire(a, "shared", Some(mac), false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("in use"), "{}", e.message);
        r.backend().close(&info.interface);
        assert!(r.acquire(a, "shared", Some(mac), false).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_suggested_mac_is_never_one_a_live_tap_asked_for() {
        let r = registry();
        let a = r.connect(peer(1000)).await.unwrap();
        r.acquire(a, "shared", None, false).await.unwrap();
        // Suggestions are predictable: ask for the one the next acquire would get.
        let taken = guest_mac("shared", 2);
        let b = r.connect(peer(1001)).await.unwrap();
        r.acquire(b, "shared", Some(taken), false).await.unwrap();
        let (c, _) = r.acquire(a, "shared", None, false).await.unwrap();
        assert_ne!(c.mac, format_mac(&taken));
        assert_eq!(c.mac, format_mac(&guest_mac("shared", 3)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_holds_a_bounded_number_of_live_taps() {
        let r = registry();
        let a = r.connect(peer(1000)).await.unwrap();
        let mut held = vec![];
        for _ in 0..MAX_TAPS_PER_CLIENT {
            held.push(r.acquire(a, "shared", None, false).await.unwrap().0);
        }
        let e = r.acquire(a, "shared", None, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InternalError);
        assert!(e.message.contains("at most 64 TAPs"), "{}", e.message);
        // Other clients are not affected; and once a VM closes a TAP there is room again.
        let b = r.connect(peer(1001)).await.unwrap();
        r.acquire(b, "shared", None, false).await.unwrap();
        r.backend().close(&held[0].interface);
        r.acquire(a, "shared", None, false).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn connections_per_uid_are_bounded_but_not_for_root() {
        let r = registry();
        for _ in 0..MAX_CONNECTIONS_PER_UID {
            r.connect(peer(1000)).await.unwrap();
        }
        let e = r.connect(peer(1000)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InternalError);
        r.connect(peer(1001)).await.unwrap();
        for _ in 0..=MAX_CONNECTIONS_PER_UID {
            r.connect(peer(0)).await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_definition_is_an_internal_error_not_not_found() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails, parsing never happens.
        std::fs::create_dir(dir.path().join("odd.json")).unwrap();
        let r = registry_in(dir.path(), Fake::default());
        let a = r.connect(peer(1000)).await.unwrap();
        let e = r.acquire(a, "odd", None, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InternalError, "{}", e.message);
        assert!(e.message.contains("cannot read"), "{}", e.message);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_holding_nothing_do_not_block_shutdown() {
        let r = registry();
        let _watcher = r.connect(peer(1000)).await.unwrap();
        let holder = r.connect(peer(1001)).await.unwrap();
        r.acquire(holder, "shared", None, false).await.unwrap();
        assert_eq!(r.holders().await, 1);
        assert!(!r.shutdown_if_idle().await);
        r.disconnect(holder).await;
        assert!(
            r.shutdown_if_idle().await,
            "a status-only connection does not count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn persistent_endpoints_are_released_when_their_client_leaves() {
        let r = registry();
        let a = r.connect(peer(1000)).await.unwrap();
        let (p, _) = r.acquire(a, "shared", None, true).await.unwrap();
        r.acquire(a, "shared", None, false).await.unwrap();
        r.disconnect(a).await;
        let log = r.backend().log();
        let released: Vec<_> = log.iter().filter(|l| l.starts_with("release")).collect();
        assert_eq!(released, [&format!("release shared {}", p.interface)]);
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
}
