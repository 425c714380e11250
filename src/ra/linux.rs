//! The Linux side of the router: one raw ICMPv6 socket per network, bound to its bridge
//! and to [`ROUTER_LINK_LOCAL`], that receives Router Solicitations (the kernel filters
//! every other ICMPv6 type out) and sends [`Advert`]s to all nodes (`ff02::1`).

use super::{Advert, ROUTER_LINK_LOCAL, next_send};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, Read};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// All nodes, where advertisements go (solicited ones too: RFC 4861 6.2.6 allows it, and
/// the guest need not be resolved first).
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// All routers, where guests send their solicitations.
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
/// `setsockopt(SOL_ICMPV6, ICMP6_FILTER)`, from <netinet/icmp6.h> (libc has no binding).
const SOL_ICMPV6: libc::c_int = 58;
const ICMP6_FILTER: libc::c_int = 1;
const ROUTER_SOLICIT: u8 = 133;

/// A running advertiser; `stop()` it to send the last advertisement (router lifetime 0).
pub struct RaServer {
    shutdown: watch::Sender<bool>,
    /// Taken by `stop`, which waits for it; dropping the server aborts it.
    task: Option<JoinHandle<()>>,
}

/// Opens the socket of bridge `bridge` (index `ifindex`). The bridge must have
/// [`ROUTER_LINK_LOCAL`] (without DAD) already.
fn open(bridge: &str, ifindex: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    socket.bind_device(Some(bridge.as_bytes()))?;
    socket.set_nonblocking(true)?;
    // RFC 4861: NDP messages carry hop limit 255, which receivers check to know they
    // come from the link.
    socket.set_multicast_hops_v6(255)?;
    socket.set_unicast_hops_v6(255)?;
    socket.set_multicast_if_v6(ifindex)?;
    socket.set_multicast_loop_v6(false)?;
    socket.join_multicast_v6(&ALL_ROUTERS, ifindex)?;
    // Only solicitations: echo, neighbour discovery and the rest stay in the kernel. In
    // Linux's ICMP6_FILTER a set bit blocks its type.
    let mut filter = [u32::MAX; 8];
    filter[usize::from(ROUTER_SOLICIT >> 5)] &= !(1u32 << (ROUTER_SOLICIT & 31));
    // SAFETY: `filter` is a live, properly aligned 32-byte array (struct icmp6_filter is
    // eight u32s) for the duration of the call, and the length passed is its size; the
    // fd is the open socket just made.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            SOL_ICMPV6,
            ICMP6_FILTER,
            filter.as_ptr().cast(),
            std::mem::size_of_val(&filter) as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind(&SockAddr::from(SocketAddrV6::new(
        ROUTER_LINK_LOCAL,
        0,
        0,
        ifindex,
    )))?;
    Ok(socket)
}

impl RaServer {
    /// Starts advertising `advert` on bridge `bridge` (index `ifindex`): at once, every
    /// [`super::INTERVAL`], and in answer to solicitations.
    pub fn start(
        network: &str,
        bridge: &str,
        ifindex: u32,
        advert: Advert,
    ) -> io::Result<RaServer> {
        let socket = open(bridge, ifindex).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("router advertisements on {bridge}: cannot open the socket: {e}"),
            )
        })?;
        let message = advert
            .to_bytes()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut last = advert.clone();
        last.router_lifetime = Duration::ZERO;
        let last_message = last
            .to_bytes()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the AsyncFd owns the socket, which stays open and is the same file
        // description until the AsyncFd is dropped; Socket::as_raw_fd always returns that
        // one fd.
        let fd = unsafe { AsyncFd::register(socket) }?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        info!(network, interface = bridge, prefix = %advert.prefix, "sending router advertisements");
        let task = tokio::spawn(run(
            network.to_string(),
            fd,
            ifindex,
            message,
            last_message,
            shutdown_rx,
        ));
        Ok(RaServer {
            shutdown,
            task: Some(task),
        })
    }

    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RaServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn send(fd: &AsyncFd<Socket>, ifindex: u32, message: &[u8], network: &str) {
    let to = SockAddr::from(SocketAddrV6::new(ALL_NODES, 0, 0, ifindex));
    // A bridge without ports has no carrier; the send then fails or goes nowhere, and the
    // next period or solicitation tries again.
    if let Err(e) = fd.get_ref().send_to(message, &to) {
        debug!(network, "cannot send router advertisement: {e}");
    }
}

async fn run(
    network: String,
    fd: AsyncFd<Socket>,
    ifindex: u32,
    message: Vec<u8>,
    last_message: Vec<u8>,
    mut shutdown: watch::Receiver<bool>,
) {
    let origin = Instant::now();
    let mut last: Option<Duration> = None;
    let mut solicited = false;
    let mut buf = [0u8; 1500];
    loop {
        let at = origin + next_send(last, solicited);
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {
                send(&fd, ifindex, &message, &network);
                last = Some(origin.elapsed());
                solicited = false;
            }
            ready = fd.readable() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(e) => {
                        warn!(network, "router advertisements stop: {e}");
                        return;
                    }
                };
                loop {
                    match guard.try_io(|inner| inner.get_ref().read(&mut buf)) {
                        Ok(Ok(n)) => solicited |= super::is_router_solicit(&buf[..n]),
                        Ok(Err(e)) => {
                            debug!(network, "router solicitation socket: {e}");
                            break;
                        }
                        Err(_would_block) => break,
                    }
                }
            }
            _ = shutdown.changed() => {
                // Guests drop their default route through us now, not minutes later.
                send(&fd, ifindex, &last_message, &network);
                return;
            }
        }
    }
}
