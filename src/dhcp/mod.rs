//! The broker's built-in DHCP server (RFC 2131), one per network, bound to the network's
//! bridge.
//!
//! Messages are parsed and built with `dhcproto`; the socket loop (`server.rs`) and the
//! address pool and lease store (`leases.rs`) are ours. Leases persist in a small JSON file
//! so that a VM keeps its address across broker restarts.

mod leases;
mod server;

use crate::config::{DhcpRange, Reservation};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Addresses in the dynamic pool of a network with this subnet, gateway, range and
/// reservations: what its DHCP server can hand out (for the pool-use metric).
pub fn pool_size(
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    range: Option<&DhcpRange>,
    reservations: &[Reservation],
) -> usize {
    leases::LeaseStore::new(subnet, gateway, range, reservations).pool_size()
}

/// What one network's DHCP server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// Network name, for logs.
    pub network: String,
    /// The bridge to serve on; the socket only sees this interface (SO_BINDTODEVICE).
    pub interface: String,
    pub subnet: Ipv4Net,
    /// The bridge's address: server identifier and router option.
    pub gateway: Ipv4Addr,
    /// Narrows the dynamic pool.
    pub range: Option<DhcpRange>,
    pub reservations: Vec<Reservation>,
    pub lease_seconds: u32,
    /// Interface MTU option (26).
    pub mtu: u32,
    /// DNS server option (6), when the network has DNS.
    pub dns_server: Option<Ipv4Addr>,
    /// Domain name option (15), e.g. "shared.vmnet".
    pub domain: Option<String>,
    /// Where leases persist (written atomically: temporary file + rename).
    pub lease_file: PathBuf,
}

/// Called with (MAC, address) of every ACK before it is sent, and awaited (at most
/// [`BIND_TIMEOUT`]): whoever must know a lease before the client uses it (the firewall's
/// anti-spoofing) learns it in time. A client may send from its new address the moment the
/// ACK arrives; without this, its first packets would race the firewall update.
pub type BindHook =
    Arc<dyn Fn([u8; 6], Ipv4Addr) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// How long an ACK waits for the [`BindHook`]; after that it is sent anyway (logged).
pub const BIND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// An active lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    /// The client's host name (option 12), reduced to one DNS label.
    pub hostname: Option<String>,
    pub expires: SystemTime,
}

/// The server's message handling without its socket: each datagram goes through the same
/// code as in the server task (parse, RFC 2131 handling, lease store, reply encoding).
/// It exists for the fuzz target (fuzz/fuzz_targets/dhcp.rs). The lease file is read once
/// at creation (a missing one is fine) and never written.
pub struct DhcpHandler {
    state: server::State,
}

impl DhcpHandler {
    pub fn new(config: DhcpConfig) -> DhcpHandler {
        DhcpHandler {
            state: server::State::new(config).0,
        }
    }

    /// The encoded reply to `packet` received from `from` at `now`, if any, and whether it
    /// is broadcast (else it goes to the address the client gave as ciaddr).
    pub fn handle(
        &mut self,
        packet: &[u8],
        from: std::net::SocketAddr,
        now: SystemTime,
    ) -> Option<(Vec<u8>, bool)> {
        let (reply, dest) = self.state.receive(packet, from, now)?;
        Some((server::encode(&reply)?, dest == server::Dest::Broadcast))
    }

    /// Active leases at `now`, as the server task publishes them.
    pub fn leases(&self, now: SystemTime) -> Vec<Lease> {
        self.state.active(now)
    }
}

/// The leases of `config.lease_file` that are active at `now`, exactly as a server
/// started with `config` would load them (a missing or bad file gives none). For the
/// firewall of a network adopted from a previous broker, whose guests keep using these
/// addresses: their bindings go in with the network's rules, in one transaction.
pub fn saved_leases(config: &DhcpConfig, now: SystemTime) -> Vec<Lease> {
    server::State::new(config.clone()).0.active(now)
}

/// A running DHCP server. Dropping it without [`DhcpServer::stop`] also stops the task
/// (it notices the closed stop channel and saves the leases), but only `stop` waits.
pub struct DhcpServer {
    leases: watch::Receiver<Arc<Vec<Lease>>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl DhcpServer {
    /// Binds UDP port 67 on `config.interface`, loads the lease file and spawns the
    /// server task on the current tokio runtime. The socket is created in the calling
    /// thread's network namespace.
    pub async fn start(config: DhcpConfig) -> std::io::Result<DhcpServer> {
        Self::start_with_hook(config, None).await
    }

    /// [`DhcpServer::start`], awaiting `hook` before each ACK is sent.
    pub async fn start_with_hook(
        config: DhcpConfig,
        hook: Option<BindHook>,
    ) -> std::io::Result<DhcpServer> {
        let socket = server::bind_socket(&config)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let (state, leases) = server::State::new(config);
        let task = tokio::spawn(server::run(state, socket, stop_rx, hook));
        Ok(DhcpServer {
            leases,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Active leases, republished on every change and whenever a lease expires.
    pub fn leases(&self) -> watch::Receiver<Arc<Vec<Lease>>> {
        self.leases.clone()
    }

    /// Stops the task, saves the leases and closes the socket.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}
