//! vmnet-broker: one small daemon that owns shared, named virtual networks and hands
//! them to unprivileged VM launchers.
//!
//! The core (`protocol`, `config`, `policy`, `registry`) knows nothing of the operating
//! system; `backend` adapts it to one (Linux: bridges, TAPs, nftables, DHCP and DNS).

pub mod backend;
pub mod client;
pub mod config;
pub mod dhcp;
pub mod dns;
pub mod error;
pub mod policy;
pub mod protocol;
pub mod registry;
pub mod server;
