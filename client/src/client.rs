//! The Rust client: connect to the broker, acquire networks, read its status.
//!
//! Blocking and dependency-light on purpose, so that it also backs the C library and
//! can be used from any VMM's start-up code without an async runtime.
//!
//! ```no_run
//! let client = vmnet_broker_client::Client::connect_default()?;
//! let net = client.acquire("shared")?;
//! println!("TAP {} on {}, guest MAC {}", net.info.interface, net.info.bridge, net.info.mac);
//! // Hand `net.fd` to the VMM; keep `client` alive while the VM runs: it is the lease.
//! # Ok::<(), vmnet_broker_client::BrokerError>(())
//! ```

use crate::protocol::{
    BrokerError, DEFAULT_SOCKET, ErrorCode, ForwardInfo, ForwardSpec, LeaseList, MAX_MESSAGE, Mac,
    NetworkDetail, NetworkInfo, NetworkList, Reply, Request, SOCKET_ENV, Status,
};
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, connect, recvmsg,
    send, socket,
};
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The socket path: `VMNET_BROKER_SOCKET` if set, else the default.
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// A network acquired on a connection: the broker's reply and the TAP fd.
#[derive(Debug)]
pub struct Acquired {
    pub info: NetworkInfo,
    pub fd: OwnedFd,
}

/// One connection to the broker. Everything acquired on it is released when it drops.
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    path: PathBuf,
    /// One request and its reply at a time: replies carry no request id, so two threads
    /// sharing a client must not interleave their exchanges.
    exchange: Mutex<()>,
}

/// A well-formed reply of the wrong kind for the request.
fn unexpected(reply: &Reply, request: &str) -> BrokerError {
    let kind = match reply {
        Reply::Network(_) => "network",
        Reply::Status(_) => "status",
        Reply::List(_) => "list",
        Reply::Show(_) => "show",
        Reply::Leases(_) => "leases",
        Reply::Forward(_) => "forward",
        Reply::Metrics(_) => "metrics",
        Reply::Error(_) => "error",
    };
    BrokerError::new(
        ErrorCode::InvalidReply,
        format!("{kind} reply to {request}"),
    )
}

fn unreachable_error(message: String) -> BrokerError {
    BrokerError::new(ErrorCode::BrokerUnreachable, message)
}

impl Client {
    pub fn connect_default() -> Result<Self, BrokerError> {
        Self::connect(socket_path())
    }

    pub fn connect(path: impl AsRef<Path>) -> Result<Self, BrokerError> {
        let path = path.as_ref().to_path_buf();
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| unreachable_error(format!("cannot create socket: {e}")))?;
        let addr = UnixAddr::new(&path)
            .map_err(|e| unreachable_error(format!("bad socket path {}: {e}", path.display())))?;
        connect(sock.as_raw_fd(), &addr).map_err(|e| {
            let why = match e {
                nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED => {
                    format!("broker not running at {}", path.display())
                }
                nix::errno::Errno::EACCES => format!(
                    "permission denied connecting to {} (is your user in the vmnet-broker group?)",
                    path.display()
                ),
                _ => format!("cannot connect to broker at {}", path.display()),
            };
            unreachable_error(format!("{why}: {}", e.desc()))
        })?;
        Ok(Self {
            sock,
            path,
            exchange: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Acquires `name`; the broker suggests the guest MAC.
    pub fn acquire(&self, name: &str) -> Result<Acquired, BrokerError> {
        self.acquire_with_mac(name, None)
    }

    /// Acquires `name` asking for a specific guest MAC (e.g. the one the VM had before,
    /// so its DHCP lease and anti-spoofing binding follow it).
    pub fn acquire_with_mac(&self, name: &str, mac: Option<Mac>) -> Result<Acquired, BrokerError> {
        self.acquire_with(name, mac, false)
    }

    /// The general form: `persistent` asks for a TAP that outlives its fd and belongs to
    /// the caller's uid (for VMMs such as firecracker that open a TAP by name). It is
    /// deleted when this connection closes.
    pub fn acquire_with(
        &self,
        name: &str,
        mac: Option<Mac>,
        persistent: bool,
    ) -> Result<Acquired, BrokerError> {
        let request = Request::Acquire {
            network_name: name.to_string(),
            mac,
            persistent,
        };
        let (reply, fds) = self.call(&request)?;
        match reply {
            Reply::Network(info) => {
                // The protocol promises exactly one; the others are closed as they drop.
                let n = fds.len();
                let Ok([fd]) = <[OwnedFd; 1]>::try_from(fds) else {
                    return Err(BrokerError::new(
                        ErrorCode::InvalidReply,
                        format!("network reply carried {n} file descriptors, not one"),
                    ));
                };
                Ok(Acquired { info, fd })
            }
            Reply::Error(e) => Err(e),
            other => Err(unexpected(&other, "an acquire")),
        }
    }

    pub fn status(&self) -> Result<Status, BrokerError> {
        match self.call(&Request::Status)?.0 {
            Reply::Status(s) => Ok(s),
            Reply::Error(e) => Err(e),
            other => Err(unexpected(&other, "a status request")),
        }
    }

    /// Every network the broker knows that this caller may use.
    pub fn list(&self) -> Result<NetworkList, BrokerError> {
        match self.call(&Request::List)?.0 {
            Reply::List(l) => Ok(l),
            Reply::Error(e) => Err(e),
            other => Err(unexpected(&other, "a list request")),
        }
    }

    /// One network in detail: its configuration, addresses, TAPs and their holders.
    pub fn show(&self, name: &str) -> Result<NetworkDetail, BrokerError> {
        let request = Request::Show {
            network_name: name.to_string(),
        };
        match self.call(&request)?.0 {
            Reply::Show(d) => Ok(d),
            Reply::Error(e) => Err(e),
            other => Err(unexpected(&other, "a show request")),
        }
    }

    /// The DHCP leases of `name`, or of every network this caller may use.
    pub fn leases(&self, name: Option<&str>) -> Result<LeaseList, BrokerError> {
        let request = Request::Leases {
            network_name: name.map(str::to_string),
        };
        match self.call(&request)?.0 {
            Reply::Leases(l) => Ok(l),
            Reply::Error(e) => Err(e),
            other => Err(unexpected(&other, "a leases request")),
        }
    }

    /// Forwards the host's `external_port` to `internal_port` of the guest behind this
    /// connection's TAP `interface` on `network` (an acquire's `info.interface`), until
    /// this connection closes or the TAP does. `protocol` is `"tcp"` or `"udp"`. Ports
    /// below 1024 need root; a taken port is [`ErrorCode::PortInUse`].
    pub fn forward(
        &self,
        network: &str,
        protocol: &str,
        external_port: u16,
        internal_port: u16,
        interface: &str,
    ) -> Result<ForwardInfo, BrokerError> {
        let request = Request::Forward(ForwardSpec {
            network_name: network.to_string(),
            protocol: protocol.to_string(),
            external_port,
            internal_port,
            interface: interface.to_string(),
        });
        match self.call(&request)?.0 {
            Reply::Forward(f) => Ok(f),
            Reply::Error(e) => Err(e),
            other => Err(unexpected(&other, "a forward request")),
        }
    }

    /// The broker's metrics as OpenMetrics text (docs/protocol.md, `metrics`).
    pub fn metrics(&self) -> Result<String, BrokerError> {
        match self.call(&Request::Metrics)?.0 {
            Reply::Metrics(text) => Ok(text),
            Reply::Error(e) => Err(e),
            other => Err(unexpected(&other, "a metrics request")),
        }
    }

    /// Sends raw bytes and returns the raw reply (for tests of malformed requests).
    pub fn call_raw(&self, bytes: &[u8]) -> Result<(Vec<u8>, Vec<OwnedFd>), BrokerError> {
        let lost = |e: nix::errno::Errno| {
            unreachable_error(format!(
                "connection to broker at {} failed: {}",
                self.path.display(),
                e.desc()
            ))
        };
        let _exchange = self.exchange.lock().unwrap_or_else(|p| p.into_inner());
        send(self.sock.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL).map_err(lost)?;
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (n, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for c in msg.cmsgs().map_err(lost)? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: SCM_RIGHTS fds were just installed in our fd table
                            // by this recvmsg and nothing else refers to them, so each
                            // OwnedFd is its fd's only owner.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                    break (msg.bytes, fds);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(lost(e)),
            }
        };
        if n == 0 {
            return Err(unreachable_error(format!(
                "broker at {} closed the connection",
                self.path.display()
            )));
        }
        buf.truncate(n);
        Ok((buf, fds))
    }

    fn call(&self, request: &Request) -> Result<(Reply, Vec<OwnedFd>), BrokerError> {
        let (bytes, fds) = self.call_raw(&request.to_bytes())?;
        Ok((Reply::parse(&bytes)?, fds))
    }
}

/// A network held for as long as this value lives: the one-call API.
#[derive(Debug)]
pub struct Network {
    pub info: NetworkInfo,
    pub fd: OwnedFd,
    _lease: Arc<Client>,
}

/// Connects to the broker (`VMNET_BROKER_SOCKET` or the default path) and acquires
/// `name`. The connection lives inside the returned [`Network`].
pub fn acquire_network(name: &str) -> Result<Network, BrokerError> {
    let client = Arc::new(Client::connect_default()?);
    let Acquired { info, fd } = client.acquire(name)?;
    Ok(Network {
        info,
        fd,
        _lease: client,
    })
}
