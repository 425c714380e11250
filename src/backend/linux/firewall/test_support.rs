//! The one `FirewallNetwork` the firewall's unit tests start from, so that each test
//! spells only what it changes.

use super::{FirewallNetwork, OverlayGuard};

/// Network `n1` on bridge `vmnbr0`: 10.77.0.0/24 with gateway .1, shared (NAT), with
/// anti-spoofing and DHCP, TAPs named `vmnt9-…`; no IPv6, isolation, forwards or overlay.
pub(super) fn network() -> FirewallNetwork {
    FirewallNetwork {
        name: "n1".into(),
        bridge: "vmnbr0".into(),
        subnet: "10.77.0.0/24".parse().unwrap(),
        gateway: "10.77.0.1".parse().unwrap(),
        nat: true,
        ipv6_prefix: None,
        nat66: false,
        anti_spoofing: true,
        dhcp: true,
        isolation: false,
        tap_prefix: "vmnt9-".into(),
        forwards: vec![],
        overlay: None,
    }
}

impl FirewallNetwork {
    pub(super) fn with_nat(mut self, nat: bool) -> Self {
        self.nat = nat;
        self
    }

    pub(super) fn with_anti_spoofing(mut self, anti_spoofing: bool) -> Self {
        self.anti_spoofing = anti_spoofing;
        self
    }

    pub(super) fn with_dhcp(mut self, dhcp: bool) -> Self {
        self.dhcp = dhcp;
        self
    }

    pub(super) fn with_overlay(mut self, overlay: Option<OverlayGuard>) -> Self {
        self.overlay = overlay;
        self
    }
}
