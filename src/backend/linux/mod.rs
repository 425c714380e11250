//! Linux backend: a kernel bridge per network, a TAP per acquire, nftables for NAT and
//! anti-spoofing, and the broker's own DHCP and DNS services.
pub mod firewall;
