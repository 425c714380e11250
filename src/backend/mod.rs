//! The seam between the platform-neutral core and the operating system.
//!
//! The registry decides *when* networks exist and who holds them; a [`Backend`] knows
//! *how* to make one on this platform. Linux: a kernel bridge, TAPs, nftables and the
//! broker's DHCP/DNS services (`linux`). A macOS vmnet backend fits behind the same trait:
//! what a client receives is the backend's [`Backend::Endpoint`] (a TAP fd on Linux, a
//! network serialization on macOS), and what a client is told about the platform (a
//! bridge, an interface) travels as opaque [`PlatformDetails`] that the server puts into
//! its reply. The core never looks inside either.

use crate::config::{NetworkConfig, Protocol};
use crate::policy::Peer;
use crate::state::NetworkRecord;
use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};

#[cfg(target_os = "linux")]
pub mod linux;
pub mod linux_support;
#[cfg(target_os = "macos")]
pub mod macos;
pub mod vmnet;

/// Platform facts a client is told about a network or an endpoint, as key/value pairs the
/// backend fills in and the server maps into its reply (keys: [`BRIDGE`], [`INTERFACE`]).
/// The core carries them without reading them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlatformDetails(Vec<(&'static str, String)>);

/// The host-side device a network lives on (a bridge on Linux).
pub const BRIDGE: &str = "bridge";
/// The host-side device of one endpoint (a TAP on Linux).
pub const INTERFACE: &str = "interface";
/// The overlay that carries a network to other hosts: its device and what it is made of
/// (a VXLAN port on Linux).
pub const OVERLAY: &str = "overlay";

impl PlatformDetails {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.0.push((key, value.into()));
        self
    }

    /// Every detail, as (key, value), in the order the backend gave them.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.0.iter().map(|(k, v)| (*k, v.as_str()))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What the backend made for a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDetails {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The network's IPv6 /64, when it has one.
    pub ipv6_prefix: Option<Ipv6Net>,
    pub mtu: u32,
    /// What clients are told about the platform side ([`BRIDGE`] on Linux).
    pub platform: PlatformDetails,
}

/// Names one endpoint in later calls ([`Backend::release`], [`Backend::live_endpoints`]).
/// Opaque to the core, which only compares them; Linux uses the TAP's name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(pub String);

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One endpoint handed to a client.
#[derive(Debug)]
pub struct Attachment<E> {
    pub id: EndpointId,
    /// What the client is told about it ([`INTERFACE`] on Linux).
    pub platform: PlatformDetails,
    /// What the client receives. The broker drops its copy as soon as it is sent, so the
    /// endpoint lives exactly as long as the client keeps it.
    pub endpoint: E,
    /// Held while the acquire is still being answered (its state record written), and
    /// released just before the reply goes out: the backend's background work on the
    /// kernel (a pool refill, a batch of deletions) waits for it instead of competing
    /// with the acquire for the CPU and the kernel's locks. Released before the send,
    /// never across it: a client that does not read its replies holds nothing up.
    /// What the backend gave [`Answering::until_sent`] goes only once the send is over
    /// (done or failed), with the attachment.
    pub answering: Answering,
}

/// See [`Attachment::answering`]: whatever the backend wants held until then.
#[derive(Default)]
pub struct Answering {
    held: Option<Box<dyn Send + Sync>>,
    until_sent: Option<Box<dyn Send + Sync>>,
}

impl Answering {
    pub fn hold(what: impl Send + Sync + 'static) -> Answering {
        Answering {
            held: Some(Box::new(what)),
            until_sent: None,
        }
    }

    /// Also keeps `what` until the reply's send is over, for work that would only delay
    /// the reply if it started before (waking a task wakes a thread): it is dropped
    /// with the attachment, after the send, whether the send succeeded or not.
    pub fn until_sent(mut self, what: impl Send + Sync + 'static) -> Answering {
        self.until_sent = Some(Box::new(what));
        self
    }

    /// The reply is about to be sent: whatever was held is let go.
    pub fn release(&mut self) {
        self.held = None;
    }
}

impl std::fmt::Debug for Answering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.held.is_some() {
            "Answering(held)"
        } else {
            "Answering"
        })
    }
}

/// A DHCP lease (or, later, another kind of address binding) the backend's network
/// services handed out, as `leases` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub mac: [u8; 6],
    pub ipv4: Ipv4Addr,
    /// The guest's IPv6 address, when the backend knows it.
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub hostname: Option<String>,
    pub expires: std::time::SystemTime,
}

/// A dynamic port forward a client asks for ([`Backend::forward`]): the host's
/// `external_port` to `internal_port` of the guest behind one of the client's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRequest {
    pub protocol: Protocol,
    pub external_port: u16,
    pub internal_port: u16,
    /// The client's endpoint whose guest receives the traffic.
    pub endpoint: EndpointId,
    /// The guest MAC the endpoint was handed out with: the guest's address is its lease.
    pub mac: [u8; 6],
}

/// What the core asks for when it attaches a client.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// Unique per network instance; backends derive endpoint names from it.
    pub serial: u64,
    /// The guest MAC the core suggests for this endpoint (anti-spoofing binds it).
    pub mac: [u8; 6],
    pub peer: Peer,
    /// The endpoint must outlive its handle and belong to `peer.uid` (a VMM that opens it
    /// by name); the core removes it with [`Backend::release`] when the client leaves.
    pub persistent: bool,
}

/// Why a backend call failed. Causes stay attached as [`std::error::Error::source`], so
/// the log can show the whole chain and the client a one-line summary of it.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A system call or kernel request failed (its message names what was attempted).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A system call failed while doing `what`.
    #[error("{what}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The host has something in the way: a subnet overlaps, a name is taken.
    #[error("{0}")]
    Conflict(String),
    /// Every candidate is taken (the subnet pool).
    #[error("{0}")]
    Exhausted(String),
    /// Something the backend just made is gone (removed under it).
    #[error("{0}")]
    Vanished(String),
    /// A component of the network failed (firewall, DHCP, DNS).
    #[error("{component}")]
    Component {
        component: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A port a forward asked for is taken (by another forward or a socket on the host).
    #[error("{0}")]
    PortInUse(String),
    /// What was asked cannot be done on this network or platform.
    #[error("{0}")]
    Unsupported(String),
    /// Teardown went on after failures; every one of them.
    #[error("{} step(s) failed: {}", .0.len(), crate::error::join(.0))]
    Incomplete(Vec<BackendError>),
}

impl BackendError {
    pub fn component(
        component: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Component {
            component,
            source: source.into(),
        }
    }

    pub fn os(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Os {
            what: what.into(),
            source,
        }
    }

    /// `Ok` when nothing failed, else every failure.
    pub fn all(errors: Vec<BackendError>) -> Result<(), Self> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Self::Incomplete(errors))
        }
    }
}

/// Platform adapter.
///
/// Concurrency: the registry serializes `create`, `attach`, `release` and `destroy` of
/// one network (never two at once, none after `destroy`), but calls for different
/// networks run concurrently, and [`Backend::live_endpoints`] and
/// [`Backend::details`] may run alongside any of them. Implementations lock only
/// what their networks share (a subnet pool), and never across a kernel call.
pub trait Backend: Send + Sync + 'static {
    type Network: Send + Sync + 'static;
    /// What a client receives for one VM NIC.
    type Endpoint: Send + 'static;

    /// Creates everything a network needs. On error nothing may be left behind.
    fn create(
        &self,
        config: &NetworkConfig,
    ) -> impl Future<Output = Result<Self::Network, BackendError>> + Send;

    fn details(&self, network: &Self::Network) -> NetworkDetails;

    /// A new endpoint on the network for one VM NIC.
    fn attach(
        &self,
        network: &Self::Network,
        request: &AttachRequest,
    ) -> impl Future<Output = Result<Attachment<Self::Endpoint>, BackendError>> + Send;

    /// Removes a persistent endpoint when the client it was made for leaves.
    fn release(
        &self,
        network: &Self::Network,
        endpoint: &EndpointId,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Endpoints currently on the network (those a client still holds open). An error
    /// means "unknown", never "none": the core then keeps what it counted.
    fn live_endpoints(
        &self,
        network: &Self::Network,
    ) -> impl Future<Output = Result<BTreeSet<EndpointId>, BackendError>> + Send;

    /// Resolves once an endpoint of `network` may have closed after this call, or after
    /// `fallback` at the latest; the core then asks [`Backend::live_endpoints`] again. The
    /// watch starts when this is called, not when the future is first polled, so a
    /// caller that calls it before listing misses no closure after the listing. The
    /// default only waits `fallback`; a backend that hears of closed endpoints (Linux: the
    /// link deletions the kernel reports) resolves as soon as one closes. Waking when
    /// nothing closed is allowed (the listing says so).
    fn endpoint_closed(
        &self,
        _network: &Self::Network,
        fallback: std::time::Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        tokio::time::sleep(fallback)
    }

    /// The address leases of the network's services (DHCP), current ones only. A backend
    /// whose platform runs no DHCP server of the broker's has none.
    fn leases(
        &self,
        _network: &Self::Network,
    ) -> impl Future<Output = Result<Vec<LeaseView>, BackendError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Gives a live network that spans hosts the overlay peers `peers` (which replace its
    /// own), without disturbing its endpoints. `Ok(false)` when the backend has no
    /// overlays, so the change waits for the network to be made again.
    fn set_overlay_peers(
        &self,
        _network: &Self::Network,
        _peers: &[std::net::IpAddr],
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        async { Ok(false) }
    }

    /// Forwards a host port to the guest behind a client's endpoint (its DHCP lease, which
    /// the forward follows as it comes or changes) until [`Backend::unforward`], the
    /// endpoint's closing, or the network's removal. Returns the guest's address when it
    /// is known already. The core has checked who may ask; the backend refuses a port
    /// that is taken ([`BackendError::PortInUse`]).
    fn forward(
        &self,
        _network: &Self::Network,
        _request: &ForwardRequest,
    ) -> impl Future<Output = Result<Option<IpAddr>, BackendError>> + Send {
        async {
            Err(BackendError::Unsupported(
                "port forwards are not supported by this platform's backend".into(),
            ))
        }
    }

    /// Ends the forward of `protocol` `external_port` to `endpoint`. One that is gone
    /// already is no error, and neither is one that forwards to another endpoint now: the
    /// asker's ended with its TAP, and the port went to another forward since, which
    /// stays.
    fn unforward(
        &self,
        _network: &Self::Network,
        _protocol: Protocol,
        _external_port: u16,
        _endpoint: &EndpointId,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        async { Ok(()) }
    }

    /// Removes everything `create` and `attach` made. Goes on after a failure and
    /// reports every one ([`BackendError::Incomplete`]). The network is not used again.
    fn destroy(
        &self,
        network: &Self::Network,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Takes over a network a previous broker made, as its state file recorded it, and
    /// leaves it as it is: same device, subnet and gateway; what runs inside the broker
    /// (firewall rules, bindings of the endpoints still open, DHCP with its leases, DNS)
    /// is started again, idempotently. Fails, changing nothing lasting, when what is there
    /// does not match the record; the network is then left to [`Backend::remove_stale`].
    fn adopt(
        &self,
        record: &NetworkRecord,
    ) -> impl Future<Output = Result<Self::Network, BackendError>> + Send;

    /// Removes what a previous broker that died without cleaning up left behind, except
    /// the networks adopted from it (those `adopt` returned and this backend holds).
    fn remove_stale(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
}
