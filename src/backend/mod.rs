//! The seam between the platform-neutral core and the operating system.
//!
//! The registry decides *when* networks exist and who holds them; a [`Backend`] knows
//! *how* to make one on this platform. Linux: a kernel bridge, TAPs, nftables and the
//! broker's DHCP/DNS services (`linux`). A macOS vmnet backend fits behind the same trait.

use crate::config::NetworkConfig;
use crate::policy::Peer;
use ipnet::Ipv4Net;
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

#[cfg(target_os = "linux")]
pub mod linux;

/// What the backend made for a network, as reported to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDetails {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// The host-side device the network lives on (a bridge on Linux).
    pub bridge: String,
}

/// One endpoint handed to a client: a TAP on Linux.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    /// The handle the client receives (SCM_RIGHTS). The broker drops its copy as soon as
    /// it is sent, so the endpoint lives exactly as long as the client keeps it.
    pub fd: OwnedFd,
}

/// What the core asks for when it attaches a client.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// Unique per network instance; backends derive endpoint names from it.
    pub serial: u64,
    /// The guest MAC the core suggests for this endpoint (anti-spoofing binds it).
    pub mac: [u8; 6],
    pub peer: Peer,
    /// The endpoint must outlive its fd and belong to `peer.uid` (a VMM that opens it by
    /// name); the core removes it with [`Backend::release`] when the client leaves.
    pub persistent: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

impl BackendError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

impl From<std::io::Error> for BackendError {
    fn from(e: std::io::Error) -> Self {
        Self(e.to_string())
    }
}

/// Platform adapter. Calls for one network are never concurrent: the registry serializes
/// them, so implementations need no locking of their own per network.
pub trait Backend: Send + Sync + 'static {
    type Network: Send + Sync + 'static;

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
    ) -> impl Future<Output = Result<Attachment, BackendError>> + Send;

    /// Removes a persistent endpoint when the client it was made for leaves.
    fn release(
        &self,
        network: &Self::Network,
        interface: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Endpoints currently on the network (those a client still holds open).
    fn endpoints(&self, network: &Self::Network) -> impl Future<Output = Vec<String>> + Send;

    /// Removes everything `create` and `attach` made.
    fn destroy(
        &self,
        network: Self::Network,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Removes what a previous broker that died without cleaning up left behind.
    fn remove_stale(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
}
