//! The client side of vmnet-broker: the wire protocol (docs/protocol.md) and a blocking
//! Unix-socket client, without the daemon.
//!
//! VM launchers, the C library (`capi`) and the broker's own client commands link this
//! crate alone: it needs no async runtime, netlink or firewall code. The daemon uses the
//! same [`protocol`] module, so both ends share one definition of every message.

//!
//! The Unix-socket client is Linux-only (SOCK_SEQPACKET); on macOS the protocol is XPC and
//! the daemon crate has the client (`vmnet_broker::backend::macos::client`).

#[cfg(target_os = "linux")]
pub mod client;
#[cfg(target_os = "linux")]
pub mod linux;
pub mod mac;
pub mod protocol;

#[cfg(target_os = "linux")]
pub use client::{Acquired, Client, Network, acquire_network, socket_path};
pub use mac::{Mac, MacParseError};
pub use protocol::{BrokerError, ErrorCode};
