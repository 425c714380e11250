//! A VM on a veth, for tests that want a real guest network stack (busybox `udhcpc`,
//! SLAAC, `dig`, TCP) on one of the broker's networks: a client namespace whose `eth0` is
//! one end of a veth, the other end (`port`) enslaved to the network's bridge in the
//! broker's namespace. The broker did not make that port, so anti-spoofing does not apply
//! to it. Deleting the namespace deletes both ends.
//! [`Outside`] is another machine such a VM may reach through the broker's uplink.
//! Include it as `#[path = "support/veth.rs"] mod veth;`, beside `frames`, `netns` and
//! `support`.
#![allow(dead_code)]

use crate::frames::parse_mac;
use crate::netns;
use crate::support::{Broker, Netns};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Numbers the broker-side ends, which share the broker's namespace.
static PORTS: AtomicU32 = AtomicU32::new(0);

pub struct VethVm {
    pub ns: Netns,
    /// The broker-side end.
    pub port: String,
    /// The MAC of the guest's `eth0`.
    pub mac: [u8; 6],
}

impl VethVm {
    /// A guest with MAC `mac` on `bridge`, a bridge in `b`'s namespace.
    pub fn new(b: &Broker, bridge: &str, mac: &str) -> VethVm {
        netns::require("busybox", "busybox-static");
        let ns = Netns::new("vm");
        let port = format!("vc{}", PORTS.fetch_add(1, Ordering::SeqCst));
        b.ns.sh(&format!(
            "ip link add {port} type veth peer name eth0 netns {}",
            ns.name
        ));
        ns.sh(&format!("ip link set eth0 address {mac} up"));
        let vm = VethVm {
            ns,
            port,
            mac: parse_mac(mac),
        };
        vm.plug(b, bridge);
        vm
    }

    /// Enslaves the broker-side end to `bridge` (again, after the bridge was re-created).
    pub fn plug(&self, b: &Broker, bridge: &str) {
        b.ns.sh(&format!("ip link set {} master {bridge} up", self.port));
    }

    /// Gives the guest's `eth0` MAC `mac`, dropping its addresses.
    pub fn set_mac(&mut self, mac: &str) {
        self.ns.sh(&format!(
            "ip addr flush dev eth0; ip link set eth0 down; \
             ip link set eth0 address {mac}; ip link set eth0 up"
        ));
        self.mac = parse_mac(mac);
    }
}

/// "Another machine": namespace `out`, joined to the broker's by a veth whose end `up0`
/// (the broker namespace's default route) has address `uplink` and whose end `eth0` has
/// `at`'s, both in a /`prefix_len`. A TCP listener on `at` tells who connected.
pub struct Outside {
    pub listener: TcpListener,
    pub ns: Netns,
    at: SocketAddr,
}

impl Outside {
    pub fn start(b: &Broker, uplink: IpAddr, at: SocketAddr, prefix_len: u8) -> Outside {
        // IPv6 addresses skip duplicate address detection, which would hold them back.
        let (ip, nodad) = if at.is_ipv6() {
            ("ip -6", " nodad")
        } else {
            ("ip", "")
        };
        let peer = at.ip();
        let ns = Netns::new("out");
        b.ns.sh(&format!(
            "ip link add up0 type veth peer name eth0 netns {}; \
             ip addr add {uplink}/{prefix_len} dev up0{nodad}; ip link set up0 up; \
             {ip} route add default via {peer}",
            ns.name
        ));
        ns.sh(&format!(
            "ip addr add {peer}/{prefix_len} dev eth0{nodad}; ip link set eth0 up"
        ));
        let listener = ns.run(|| TcpListener::bind(at).unwrap());
        listener.set_nonblocking(true).unwrap();
        Outside { listener, ns, at }
    }

    /// The source of the next connection accepted within `wait`.
    pub fn accepted(&self, wait: Duration) -> Option<SocketAddr> {
        let deadline = Instant::now() + wait;
        loop {
            match self.listener.accept() {
                Ok((_, from)) => return Some(from),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a connection from `vm` reaches the outside within `wait`, and from where
    /// it comes.
    pub fn reached_from(&self, vm: &VethVm, wait: Duration) -> Option<SocketAddr> {
        let at = self.at;
        if !vm
            .ns
            .run(move || TcpStream::connect_timeout(&at, wait).is_ok())
        {
            assert_eq!(self.accepted(Duration::ZERO), None);
            return None;
        }
        // Connected: the connection waits in the listener's queue already; the generous
        // deadline only bounds a failure on a busy machine.
        self.accepted(Duration::from_secs(20))
    }
}
