//! vmnet-broker: one small daemon that owns shared, named virtual networks and hands
//! them to unprivileged VM launchers.
//!
//! The core (`protocol`, `config`, `policy`, `registry`) knows nothing of the operating
//! system; `backend` adapts it to one (Linux: bridges, TAPs, nftables, DHCP and DNS).
//! The wire protocol and the blocking client live in the `vmnet-broker-client` crate,
//! which launchers and the C library link without the daemon; they (and `mac`, the one
//! MAC address type) are re-exported here so the daemon names them as its own modules.

pub mod answers;
pub mod backend;
pub mod config;
#[cfg(target_os = "linux")]
pub mod dhcp;
#[cfg(target_os = "linux")]
pub mod dns;
pub mod error;
pub mod inspect;
pub mod metrics;
pub mod policy;
#[cfg(target_os = "linux")]
pub mod ra;
pub mod registry;
pub mod reload;
#[cfg(target_os = "linux")]
pub mod server;
pub mod state;
pub mod steps;
#[cfg(target_os = "linux")]
pub mod systemd;
pub mod ula;
pub mod xpc;
#[cfg(target_os = "linux")]
pub use vmnet_broker_client::client;
pub use vmnet_broker_client::{mac, protocol};
