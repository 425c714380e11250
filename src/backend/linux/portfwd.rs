//! The host side of port forwards: for each forward, sockets bound to its external port
//! on the host. They reserve the port (a second forward, or any program, finds it taken),
//! show that it was free when the forward was made, and relay what the packet path cannot
//! carry: connections to loopback (127.0.0.1, ::1), which nftables' DNAT cannot send out
//! of `lo` unless `route_localnet` is set on it, a setting of the host's that the broker
//! leaves to the admin (docs/networking.md). Everything else (other machines, the guests,
//! the host's own non-loopback addresses) is translated by the firewall before it could
//! reach these sockets.
//!
//! The relay reads the forward's current target from a watch channel, so a dynamic
//! forward whose guest has no lease yet (or a new one) needs no new socket.

use crate::config::Protocol;
use socket2::{Domain, Socket, Type};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Mutex, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::debug;

/// How long a relayed TCP connection may take to reach the guest.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Relayed TCP connections open at once per forward; more wait for one to end.
const MAX_TCP_RELAYS: usize = 256;
/// A relayed UDP flow (one local sender) is forgotten after this long without traffic.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Relayed UDP flows at once per forward; a new sender beyond them is not relayed.
const MAX_UDP_FLOWS: usize = 256;

/// Why a forward's port could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("{protocol} port {port} is already in use on the host{}", at(.address))]
    InUse {
        protocol: &'static str,
        port: u16,
        address: Option<IpAddr>,
    },
    #[error("cannot bind {protocol} port {port}{}", at(.address))]
    Bind {
        protocol: &'static str,
        port: u16,
        address: Option<IpAddr>,
        #[source]
        source: io::Error,
    },
}

fn at(address: &Option<IpAddr>) -> String {
    address.map(|a| format!(" ({a})")).unwrap_or_default()
}

/// Where a forward's traffic goes now; `None` while unknown (no lease yet).
pub type Target = watch::Receiver<Option<SocketAddr>>;

/// The sockets of one forward and their relay tasks; dropping it closes them.
#[derive(Debug)]
pub struct HostPort {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for HostPort {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Takes `port` (on `address`, or on every address: 0.0.0.0 and, where the host has
/// IPv6, [::] as well) for a forward to `target`, and relays what reaches the sockets
/// there. Fails with [`PortError::InUse`] when anything holds the port already. Must run
/// inside a tokio runtime.
pub fn reserve(
    protocol: Protocol,
    address: Option<IpAddr>,
    port: u16,
    target: Target,
) -> Result<HostPort, PortError> {
    let name = protocol.as_str();
    let err = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            PortError::InUse {
                protocol: name,
                port,
                address,
            }
        } else {
            PortError::Bind {
                protocol: name,
                port,
                address,
                source,
            }
        }
    };
    let addrs: Vec<(IpAddr, bool)> = match address {
        Some(a) => vec![(a, false)],
        None => vec![
            (IpAddr::V4(Ipv4Addr::UNSPECIFIED), false),
            // Optional: a host (namespace) without IPv6 has no [::] to bind.
            (IpAddr::V6(Ipv6Addr::UNSPECIFIED), true),
        ],
    };
    let mut sockets = vec![];
    for (ip, optional) in addrs {
        match bind(protocol, SocketAddr::new(ip, port)) {
            Ok(s) => sockets.push(s),
            Err(e)
                if optional
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                    ) =>
            {
                debug!(port, "no IPv6 on this host: port {port} taken on IPv4 only");
            }
            Err(e) => return Err(err(e)),
        }
    }
    let mut tasks = vec![];
    for socket in sockets {
        let task = match protocol {
            Protocol::Tcp => {
                let listener = TcpListener::from_std(socket.into()).map_err(err)?;
                tokio::spawn(relay_tcp(listener, target.clone()))
            }
            Protocol::Udp => {
                let socket = UdpSocket::from_std(socket.into()).map_err(err)?;
                tokio::spawn(relay_udp(Arc::new(socket), target.clone()))
            }
        };
        tasks.push(task);
    }
    Ok(HostPort { tasks })
}

/// A non-blocking socket bound to `addr` (listening, for TCP). IPv6 sockets are IPv6
/// only, so the IPv4 one is a separate socket. TCP sockets take SO_REUSEADDR, as servers
/// do: a relayed connection the broker closed first leaves a TIME_WAIT socket on the port
/// for a minute, which would otherwise keep the port from the next forward; a socket
/// listening on it still makes it taken. UDP sockets do not (there it would let two
/// sockets share the port).
fn bind(protocol: Protocol, addr: SocketAddr) -> io::Result<Socket> {
    let domain = Domain::for_address(addr);
    let kind = match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let socket = Socket::new(domain, kind.cloexec(), None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if protocol == Protocol::Tcp {
        socket.set_reuse_address(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if protocol == Protocol::Tcp {
        socket.listen(128)?;
    }
    Ok(socket)
}

async fn relay_tcp(listener: TcpListener, target: Target) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_RELAYS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (mut inbound, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!("port forward relay: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // No target (no lease yet): the connection is closed, as a refused one would be.
        let Some(to) = *target.borrow() else {
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await {
                Ok(Ok(mut outbound)) => {
                    let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                Ok(Err(e)) => debug!(%from, %to, "port forward relay: cannot connect: {e}"),
                Err(_) => debug!(%from, %to, "port forward relay: connect timed out"),
            }
        });
    }
}

async fn relay_udp(socket: Arc<UdpSocket>, target: Target) {
    // One socket towards the guest per local sender, so replies find their way back.
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                debug!("port forward relay: receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(to) = *target.borrow() else {
            continue;
        };
        let existing = flows.lock().await.get(&from).cloned();
        let flow = match existing {
            Some(f) => f,
            None => {
                if flows.lock().await.len() >= MAX_UDP_FLOWS {
                    continue;
                }
                let local: SocketAddr = match to {
                    SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                    SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
                };
                let Ok(out) = UdpSocket::bind(local).await else {
                    continue;
                };
                if out.connect(to).await.is_err() {
                    continue;
                }
                let out = Arc::new(out);
                flows.lock().await.insert(from, Arc::clone(&out));
                let (back, flows, out2) =
                    (Arc::clone(&socket), Arc::clone(&flows), Arc::clone(&out));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, out2.recv(&mut buf)).await
                    {
                        if back.send_to(&buf[..n], from).await.is_err() {
                            break;
                        }
                    }
                    flows.lock().await.remove(&from);
                });
                out
            }
        };
        let _ = flow.send(&buf[..n]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback only: unit tests run in the host's namespace, where a test must not open
    /// ports on the host's addresses (tests/forward.rs covers every address, in namespaces).
    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));

    #[tokio::test]
    async fn a_taken_port_is_refused_and_a_released_one_free_again() {
        let (_tx, rx) = watch::channel(None);
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let e = reserve(Protocol::Tcp, LOOPBACK, port, rx.clone()).unwrap_err();
        assert!(
            matches!(e, PortError::InUse { port: p, .. } if p == port),
            "{e}"
        );
        drop(held);
        let first = reserve(Protocol::Tcp, LOOPBACK, port, rx.clone()).unwrap();
        assert!(matches!(
            reserve(Protocol::Tcp, LOOPBACK, port, rx.clone()),
            Err(PortError::InUse { .. })
        ));
        drop(first);
        // The relay tasks are aborted: the sockets close once they have stopped.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match reserve(Protocol::Tcp, LOOPBACK, port, rx.clone()) {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    #[tokio::test]
    async fn udp_from_loopback_is_relayed_and_answered() {
        let guest = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let (_tx, rx) = watch::channel(Some(guest.local_addr().unwrap()));
        let _host = reserve(Protocol::Udp, LOOPBACK, port, rx).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(("127.0.0.1", port)).await.unwrap();
        client.send(b"ping").await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = guest.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        guest.send_to(b"pong", from).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buf))
            .await
            .expect("the reply comes back")
            .unwrap();
        assert_eq!(&buf[..n], b"pong");
    }

    #[tokio::test]
    async fn loopback_connections_are_relayed_to_the_current_target() {
        let guest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = watch::channel(None);
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let _host = reserve(Protocol::Tcp, LOOPBACK, port, rx).unwrap();
        // No target yet: closed at once.
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut b = [0u8; 1];
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        assert_eq!(c.read(&mut b).await.unwrap(), 0);
        tx.send(Some(guest.local_addr().unwrap())).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut g, _) = guest.accept().await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        g.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        g.write_all(b"pong").await.unwrap();
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }
}
