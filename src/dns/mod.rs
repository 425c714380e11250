//! The broker's per-network DNS server.
//!
//! It listens on the network's gateway addresses only (UDP and TCP port 53; IPv4 and, on
//! a network with IPv6, the IPv6 gateway), serves only clients whose source address is in
//! the network's subnet or IPv6 prefix (see [`DnsConfig::subnet`]), answers for the VMs'
//! DHCP hostnames (`NAME` and `NAME.<domain>`: A for the lease, AAAA for the guest's SLAAC
//! address, plus the IPv4 reverse names) and forwards
//! everything else to the host's resolvers from resolv.conf. It runs in the broker's (host)
//! network namespace, so a loopback stub such as systemd-resolved's 127.0.0.53 works as an
//! upstream.

mod forward;
mod local;
mod resolv;
mod slots;

pub use resolv::Upstreams;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use ipnet::{Ipv4Net, Ipv6Net};
use nix::sys::socket::{self, sockopt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use slots::{Refused, Slots};

/// DNS port, on the gateway address only.
pub const DNS_PORT: u16 = 53;
/// Forwarded queries in flight at once (UDP and TCP together); beyond that UDP queries are
/// dropped (the client retries) so that a flood cannot exhaust memory. Local answers are
/// computed inline and never wait for a slot.
pub const MAX_IN_FLIGHT: usize = 256;
/// Forwarded queries in flight at once from one client address (UDP and TCP together).
/// Without it one VM asking for names a slow upstream never answers holds all
/// [`MAX_IN_FLIGHT`] slots for the upstream timeout, and every other VM's forwarded queries
/// are dropped. An eighth leaves plenty for a guest's resolver (a stub has a few queries
/// out; a busy cache tens) while eight clients flooding at once are needed to fill the
/// server. Above it UDP queries are dropped (as above the server-wide bound: the client
/// retries, and a flood costs no answers) and TCP queries get SERVFAIL (a TCP query must be
/// answered or its connection closed).
pub const MAX_IN_FLIGHT_PER_CLIENT: usize = MAX_IN_FLIGHT / 8;
/// TCP connections open at once; more are closed at accept.
const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP client that sends nothing for this long is disconnected (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Configuration of one network's DNS server.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Network name, for logs.
    pub network: String,
    /// The gateway address: UDP and TCP port 53 are bound on this address only.
    pub listen: Ipv4Addr,
    /// The IPv6 gateway address, bound too when set.
    pub listen6: Option<Ipv6Addr>,
    /// The network's subnet. Queries (UDP) and connections (TCP) from any other source are
    /// dropped: the gateway address is reachable from other networks' VMs (routed through
    /// the host) and from host processes, and a network's VM names are for that network
    /// only. Host processes using the gateway address as source (the default when they
    /// query it) are in the subnet and served.
    pub subnet: Ipv4Net,
    /// The network's IPv6 prefix: IPv6 clients are served only from it.
    pub prefix6: Option<Ipv6Net>,
    /// Domain of the VMs ("shared.vmnet"): they resolve NAME and NAME.<domain>.
    pub domain: String,
    /// Upstream resolvers (normally /etc/resolv.conf), re-read when it changes.
    pub resolv_conf: PathBuf,
}

/// The (hostname, address) pairs of a network's VMs, as published by DHCP: each name with
/// its IPv4 lease and, on a network with IPv6, its SLAAC address.
pub type Names = watch::Receiver<Arc<Vec<(String, IpAddr)>>>;

/// A running DNS server; `stop()` it (dropping it aborts its tasks without waiting).
pub struct DnsServer {
    network: String,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    upstreams: watch::Receiver<Arc<Upstreams>>,
}

struct Shared {
    network: String,
    subnet: Ipv4Net,
    prefix6: Option<Ipv6Net>,
    domain: String,
    names: Names,
    upstreams: watch::Receiver<Arc<Upstreams>>,
    slots: Arc<Slots>,
}

impl DnsServer {
    /// Binds `config.listen:53` (UDP and TCP) and starts serving. `names` yields the
    /// network's current (hostname, ip) pairs (from DHCP leases).
    pub async fn start(config: DnsConfig, names: Names) -> std::io::Result<DnsServer> {
        let addr = SocketAddr::V4(SocketAddrV4::new(config.listen, DNS_PORT));
        let udp = bind_udp(addr).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "DNS for network {}: cannot bind UDP {addr}: {e}",
                    config.network
                ),
            )
        })?;
        let tcp = bind_tcp(addr).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "DNS for network {}: cannot bind TCP {addr}: {e}",
                    config.network
                ),
            )
        })?;
        let mut sockets = vec![(udp, tcp)];
        if let Some(listen6) = config.listen6 {
            let addr6 = SocketAddr::V6(SocketAddrV6::new(listen6, DNS_PORT, 0, 0));
            let bound = bind_udp(addr6).and_then(|u| Ok((u, bind_tcp(addr6)?)));
            sockets.push(bound.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "DNS for network {}: cannot bind {addr6}: {e}",
                        config.network
                    ),
                )
            })?);
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        // Read once before serving, so the first query already has the upstreams; then
        // followed by a task of its own, off the query path.
        let resolv = resolv::ResolvConf::new(
            config.resolv_conf.clone(),
            config.listen,
            config.network.clone(),
        );
        let (resolv, first) = resolv.refreshed().await;
        let (upstreams_tx, upstreams) = watch::channel(first);
        let shared = Arc::new(Shared {
            network: config.network.clone(),
            subnet: config.subnet,
            prefix6: config.prefix6,
            domain: canonical_domain(&config.domain),
            names,
            upstreams: upstreams.clone(),
            slots: Slots::new(MAX_IN_FLIGHT, MAX_IN_FLIGHT_PER_CLIENT),
        });
        let mut tasks = vec![];
        for (udp, tcp) in sockets {
            tasks.push(tokio::spawn(udp_loop(
                Arc::new(udp),
                shared.clone(),
                shutdown_rx.clone(),
            )));
            tasks.push(tokio::spawn(tcp_loop(
                tcp,
                shared.clone(),
                shutdown_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(resolv.follow(upstreams_tx, shutdown_rx)));
        tracing::info!(network = %config.network, "DNS server listening on {addr}{} (UDP, TCP) for {}{}, domain {:?}",
            config.listen6.map(|a| format!(" and [{a}]:{DNS_PORT}")).unwrap_or_default(),
            config.subnet,
            config.prefix6.map(|p| format!(" and {p}")).unwrap_or_default(),
            config.domain);
        Ok(DnsServer {
            network: config.network,
            shutdown,
            tasks,
            upstreams,
        })
    }

    /// The upstreams in use, updated when resolv.conf changes (within
    /// [`RESOLV_POLL`](resolv::RESOLV_POLL)).
    pub fn upstreams(&self) -> watch::Receiver<Arc<Upstreams>> {
        self.upstreams.clone()
    }

    /// Closes the sockets and ends all tasks, including queries in flight.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        tracing::info!(network = %self.network, "DNS server stopped");
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // Not stopped: aborting the loops drops their sockets and their JoinSets, which
        // abort the query tasks.
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => socket::AddressFamily::Inet,
        SocketAddr::V6(_) => socket::AddressFamily::Inet6,
    };
    let fd = socket::socket(
        family,
        socket::SockType::Datagram,
        socket::SockFlag::SOCK_CLOEXEC | socket::SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    // IP_FREEBIND: bind() succeeds even if the address is still being added to the bridge
    // by another task, so start-up order does not matter. (The IPv6 gateway is added
    // without duplicate address detection, so it is usable as soon as it exists.)
    match addr {
        SocketAddr::V4(v4) => {
            socket::setsockopt(&fd, sockopt::IpFreebind, &true)?;
            socket::bind(fd.as_raw_fd(), &socket::SockaddrIn::from(v4))?;
        }
        SocketAddr::V6(v6) => {
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            socket::bind(fd.as_raw_fd(), &socket::SockaddrIn6::from(v6))?;
        }
    }
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // Lets a restarted server bind while old connections sit in TIME_WAIT.
    sock.set_reuseaddr(true)?;
    if addr.is_ipv4() {
        socket::setsockopt(&sock, sockopt::IpFreebind, &true)?;
    } else {
        socket::setsockopt(&sock, sockopt::Ipv6V6Only, &true)?;
    }
    sock.bind(addr)?;
    sock.listen(128)
}

async fn udp_loop(sock: Arc<UdpSocket>, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut children = JoinSet::new();
    let mut buf = vec![0u8; 65535];
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(res) = children.join_next(), if !children.is_empty() => {
                if let Err(e) = res && e.is_panic() {
                    tracing::error!(network = %shared.network, "DNS query task panicked: {e}");
                }
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, peer)) => {
                    if !shared.admits(peer) {
                        continue;
                    }
                    let req = match shared.prepare(&buf[..n], false, peer) {
                        Action::Ignore => continue,
                        Action::Reply(resp) => {
                            if let Err(e) = sock.send_to(&resp, peer).await {
                                tracing::debug!(network = %shared.network, %peer, "cannot send DNS answer: {e}");
                            }
                            continue;
                        }
                        Action::Forward(req) => req,
                    };
                    let slot = match shared.slots.try_acquire(peer.ip()) {
                        Ok(slot) => slot,
                        Err(why) => {
                            shared.log_refused(why, peer);
                            continue;
                        }
                    };
                    let pkt = buf[..n].to_vec();
                    let sock = sock.clone();
                    let shared = shared.clone();
                    children.spawn(async move {
                        let _slot = slot;
                        if let Some(resp) = shared.forward(&req, &pkt, false, peer).await
                            && let Err(e) = sock.send_to(&resp, peer).await
                        {
                            tracing::debug!(network = %shared.network, %peer, "cannot send DNS answer: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Errors here are transient (ENOMEM, a stray ICMP error): pause a little
                    // rather than spin.
                    tracing::debug!(network = %shared.network, "DNS UDP receive error: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    children.shutdown().await;
}

async fn tcp_loop(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut children = JoinSet::new();
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(res) = children.join_next(), if !children.is_empty() => {
                if let Err(e) = res && e.is_panic() {
                    tracing::error!(network = %shared.network, "DNS TCP task panicked: {e}");
                }
            }
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    if !shared.admits(peer) {
                        // Dropping the stream closes the connection before any query.
                        continue;
                    }
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        tracing::debug!(network = %shared.network, %peer, "too many DNS TCP connections, closing one");
                        continue;
                    };
                    let shared = shared.clone();
                    children.spawn(async move {
                        let _permit = permit;
                        serve_tcp(stream, peer, &shared).await;
                    });
                }
                Err(e) => {
                    // EMFILE and the like: wait for descriptors to free up instead of spinning.
                    tracing::warn!(network = %shared.network, "DNS TCP accept error: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    children.shutdown().await;
}

/// One TCP client: length-prefixed queries answered in order until it goes quiet.
async fn serve_tcp(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut pkt = vec![0u8; u16::from_be_bytes(len) as usize];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut pkt)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let resp = match shared.prepare(&pkt, true, peer) {
            // A malformed query ends the connection: framing can no longer be trusted.
            Action::Ignore => return,
            Action::Reply(resp) => resp,
            Action::Forward(req) => match shared.slots.acquire(peer.ip()).await {
                Ok(_slot) => match shared.forward(&req, &pkt, true, peer).await {
                    Some(resp) => resp,
                    None => return,
                },
                Err(why @ Refused::ClientFull) => {
                    shared.log_refused(why, peer);
                    match encode(local::error_to(&req, ResponseCode::ServFail), &req, true) {
                        Some(resp) => resp,
                        None => return,
                    }
                }
                Err(_) => return,
            },
        };
        let Ok(n) = u16::try_from(resp.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(resp.len() + 2);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&resp);
        match tokio::time::timeout(TCP_IDLE, stream.write_all(&out)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

/// What to do with one raw query.
pub enum Action {
    /// Ignore it (malformed, or not a query).
    Ignore,
    /// Send this answer, computed locally.
    Reply(Vec<u8>),
    /// Ask the upstreams.
    Forward(Message),
}

impl Shared {
    /// Whether `peer` may use this server: only addresses of the network's subnet.
    fn admits(&self, peer: SocketAddr) -> bool {
        let ok = match peer {
            SocketAddr::V4(v4) => self.subnet.contains(v4.ip()),
            SocketAddr::V6(v6) => self.prefix6.is_some_and(|p| p.contains(v6.ip())),
        };
        if !ok {
            tracing::debug!(network = %self.network, %peer, subnet = %self.subnet,
                            "ignoring DNS client from outside the network's subnet");
        }
        ok
    }

    /// Logs why a forwarded query got no slot.
    fn log_refused(&self, why: Refused, peer: SocketAddr) {
        match why {
            Refused::ClientFull => tracing::debug!(network = %self.network, %peer,
                "client has {MAX_IN_FLIGHT_PER_CLIENT} DNS queries in flight, refusing one"),
            Refused::ServerFull => tracing::debug!(network = %self.network, %peer,
                "too many DNS queries in flight, dropping one"),
            Refused::Closed => {}
        }
    }

    /// Decides about one raw query without waiting for anything: local answers are
    /// immediate, so they never queue behind slow upstreams.
    fn prepare(&self, pkt: &[u8], tcp: bool, peer: SocketAddr) -> Action {
        crate::metrics::counters()
            .dns_queries
            .get_or_create(&crate::metrics::network(&self.network))
            .inc();
        let names = self.names.borrow().clone();
        prepare(pkt, tcp, peer, &self.network, &self.domain, &names)
    }

    /// The upstreams' answer to `req` (whose raw form is `pkt`), or SERVFAIL.
    async fn forward(
        &self,
        req: &Message,
        pkt: &[u8],
        tcp: bool,
        peer: SocketAddr,
    ) -> Option<Vec<u8>> {
        // A snapshot: the watcher task does the file I/O and swaps it in.
        let ups = self.upstreams.borrow().clone();
        match forward::forward(pkt, &ups, tcp, &self.network).await {
            Some(answer) => Some(answer),
            None => {
                crate::metrics::counters()
                    .dns_upstream_failures
                    .get_or_create(&crate::metrics::network(&self.network))
                    .inc();
                tracing::debug!(network = %self.network, %peer, "no upstream DNS answered, SERVFAIL");
                servfail(req, tcp)
            }
        }
    }
}

/// What the server does with one raw query `pkt` from `peer` (already admitted), given the
/// network's canonical `domain` and its VMs' `names`: pure, no I/O. The UDP and TCP loops
/// call it for every query, and so does the fuzz target (fuzz/fuzz_targets/dns.rs).
pub fn prepare(
    pkt: &[u8],
    tcp: bool,
    peer: SocketAddr,
    network: &str,
    domain: &str,
    names: &[(String, IpAddr)],
) -> Action {
    let req = match Message::from_vec(pkt) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(network = %network, %peer, "ignoring malformed DNS packet: {e}");
            return Action::Ignore;
        }
    };
    if req.message_type != MessageType::Query {
        // Never answer answers: that is how reflection loops start.
        tracing::debug!(network = %network, %peer, "ignoring a DNS response sent to us");
        return Action::Ignore;
    }
    if req.op_code != OpCode::Query {
        return reply(local::error_to(&req, ResponseCode::NotImp), &req, tcp);
    }
    let zone = local::Zone { domain, names };
    match zone.answer(&req) {
        Some(resp) => reply(resp, &req, tcp),
        None => Action::Forward(req),
    }
}

/// The SERVFAIL sent when no upstream answers a forwarded `req`.
pub fn servfail(req: &Message, tcp: bool) -> Option<Vec<u8>> {
    encode(local::error_to(req, ResponseCode::ServFail), req, tcp)
}

/// The canonical form of a configured domain, as [`prepare`] expects it.
pub fn canonical_domain(domain: &str) -> String {
    local::Zone::canonical_domain(domain)
}

fn reply(resp: Message, req: &Message, tcp: bool) -> Action {
    match encode(resp, req, tcp) {
        Some(bytes) => Action::Reply(bytes),
        None => Action::Ignore,
    }
}

/// Encodes our own response, truncated (TC) when it does not fit the client's UDP size.
fn encode(resp: Message, req: &Message, tcp: bool) -> Option<Vec<u8>> {
    let bytes = resp.to_vec().ok()?;
    if tcp || bytes.len() <= usize::from(req.max_payload()) {
        return Some(bytes);
    }
    resp.truncate().to_vec().ok()
}
