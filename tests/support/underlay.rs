//! Hosts for tests of networks that span hosts: network namespaces joined by a veth
//! underlay through a bridge in a namespace of its own (192.0.2.0/24, TEST-NET-1).
//! The crate must also include tests/support/netns.rs as `mod netns`.
#![allow(dead_code)]

use crate::netns::Netns;

/// The underlay: a namespace with a bridge every host's `eth0` is plugged into.
pub struct Underlay {
    pub ns: Netns,
}

impl Underlay {
    pub fn new() -> Underlay {
        let ns = Netns::new("ul");
        ns.ip(&["link", "add", "ul", "type", "bridge"]);
        ns.ip(&["link", "set", "ul", "up"]);
        Underlay { ns }
    }

    /// A host namespace with `eth0` at 192.0.2.`n` on the underlay.
    pub fn host(&self, n: u8) -> Netns {
        let h = Netns::new(&format!("h{n}"));
        let port = format!("u{n}");
        h.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.ns.name,
        ]);
        self.ns.ip(&["link", "set", &port, "master", "ul", "up"]);
        h.ip(&["addr", "add", &format!("192.0.2.{n}/24"), "dev", "eth0"]);
        h.ip(&["link", "set", "eth0", "up"]);
        h
    }
}
