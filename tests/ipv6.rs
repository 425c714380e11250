//! IPv6 on the broker's networks (issue 14), seen from the outside with the real
//! `vmnet-broker serve` in a namespace of its own: the Router Advertisements a TAP gets
//! when it solicits, a guest numbering itself by SLAAC and using the gateway (ping, DNS
//! AAAA over IPv6), and NAT66 to an "outside" namespace on `shared` but no forwarding at
//! all on `host`.
//!
//! A "VM" is either the TAP fd of an acquire (frames written and read by the test) or a
//! veth whose other end is in a namespace of its own: that namespace's kernel is a real
//! IPv6 guest stack (SLAAC from the advertisements, duplicate address detection, routes).
//!
//! ```text
//!  vm ns ── eth0 ═ vcN ── vmnb-<net> [broker: RA, DNS, nft]  up0 fd97::1 ═ eth0 fd97::2  outside ns
//!        TAP fd ┘
//! ```
//!
//! Needs root, `ip`, `nft`, busybox and `dig` (dnsutils).
#![cfg(target_os = "linux")]

#[path = "support/frames.rs"]
mod frames;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;
#[path = "support/veth.rs"]
mod veth;

use etherparse::{Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use frames::Tap;
use ipnet::Ipv6Net;
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use support::{Broker, Netns, Options, options_with_files as opts};
use veth::{Outside, VethVm};
use vmnet_broker::client::Client;
use vmnet_broker::ra::Advert;

/// How long a negative check waits for something that must not come.
const NEVER: Duration = Duration::from_secs(4);
/// How long a positive check may take (duplicate address detection alone takes a
/// second or two in the guest).
const SOON: Duration = Duration::from_secs(20);

fn prefix_of(c: &Client, network: &str) -> Ipv6Net {
    let shown = c.show(network).unwrap();
    shown
        .ipv6_prefix
        .as_deref()
        .unwrap_or_else(|| panic!("{network}: show has no ipv6_prefix: {shown:?}"))
        .parse()
        .unwrap()
}

fn gateway6(prefix: Ipv6Net) -> Ipv6Addr {
    vmnet_broker::ula::gateway_of(prefix)
}

/// The guest's link-local address by EUI-64 (RFC 4291), written out here rather than
/// taken from the broker, which computes the global one the same way.
fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([mac[0] ^ 2, mac[1]]),
        u16::from_be_bytes([mac[2], 0xff]),
        u16::from_be_bytes([0xfe, mac[3]]),
        u16::from_be_bytes([mac[4], mac[5]]),
    )
}

/// The guest's SLAAC address in `prefix`: the link-local one's interface identifier.
fn slaac(prefix: Ipv6Net, mac: [u8; 6]) -> Ipv6Addr {
    let mut o = link_local(mac).octets();
    o[..8].copy_from_slice(&prefix.network().octets()[..8]);
    Ipv6Addr::from(o)
}

// ---- a VM on a TAP fd -------------------------------------------------------------------

impl Tap {
    /// A Router Solicitation as a guest sends it: from its link-local address to all
    /// routers (ff02::2, Ethernet 33:33:00:00:00:02), hop limit 255.
    fn router_solicitation(&self) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2(self.mac, [0x33, 0x33, 0, 0, 0, 2])
            .ipv6(
                link_local(self.mac).octets(),
                Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2).octets(),
                255,
            )
            .icmpv6(Icmpv6Type::RouterSolicitation);
        let mut frame = Vec::with_capacity(builder.size(0));
        builder.write(&mut frame, &[]).unwrap();
        frame
    }

    /// Solicits once a second until a Router Advertisement arrives or `wait` passes;
    /// returns it with its IPv6 source and hop limit.
    fn solicit(&self, wait: Duration) -> Option<(Ipv6Addr, u8, Advert)> {
        let rs = self.router_solicitation();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            self.send(&rs);
            let round = Instant::now() + Duration::from_secs(1);
            while let Some(left) = round.checked_duration_since(Instant::now()) {
                let Some(frame) = self.recv(left) else { break };
                if let Some(ra) = router_advertisement_in(&frame) {
                    return Some(ra);
                }
            }
        }
        None
    }
}

/// The Router Advertisement in Ethernet frame `frame`, if it is one, read by etherparse
/// (Ethernet, IPv6, ICMPv6) and then by the broker's NDP parser (options).
fn router_advertisement_in(frame: &[u8]) -> Option<(Ipv6Addr, u8, Advert)> {
    let sliced = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv6(ip)) = &sliced.net else {
        return None;
    };
    let Some(TransportSlice::Icmpv6(icmp)) = &sliced.transport else {
        return None;
    };
    let Icmpv6Type::RouterAdvertisement(_) = icmp.icmp_type() else {
        return None;
    };
    let header = ip.header();
    let advert = Advert::parse(icmp.slice()).expect("a well-formed advertisement");
    Some((header.source_addr(), header.hop_limit(), advert))
}

#[test]
fn a_soliciting_tap_gets_prefix_router_dns_and_mtu_and_router_advertisement_false_is_quiet() {
    let b = Broker::start(opts(&[
        (
            "fixed.json",
            r#"{"mode": "shared", "ipv6_prefix": "fd00:42:42:1::", "mtu": 1400, "dns_proxy": false}"#,
        ),
        ("quiet.json", r#"{"router_advertisement": false}"#),
    ]));
    let c = b.client();
    for (network, router) in [("shared", true), ("host", false), ("fixed", true)] {
        let tap = Tap::new(c.acquire(network).unwrap());
        let prefix = prefix_of(&c, network);
        if network == "fixed" {
            assert_eq!(prefix.to_string(), "fd00:42:42:1::/64");
        } else {
            // A generated ULA prefix, kept in the state directory.
            assert_eq!(prefix.network().octets()[0], 0xfd, "{prefix}");
            let kept = std::fs::read_to_string(b.state_dir.join(format!("{network}.ipv6-prefix")))
                .unwrap();
            assert_eq!(kept.trim(), prefix.to_string());
        }
        let (source, hop_limit, ra) = tap
            .solicit(SOON)
            .unwrap_or_else(|| panic!("{network}: no router advertisement\n{}", b.log()));
        assert_eq!(source, "fe80::1".parse::<Ipv6Addr>().unwrap(), "{network}");
        assert_eq!(hop_limit, 255, "{network}");
        assert_eq!(ra.prefix, prefix, "{network}");
        assert!(ra.prefix_valid >= ra.prefix_preferred && !ra.prefix_preferred.is_zero());
        // Only shared is a default router; host must not give guests a default route.
        assert_eq!(!ra.router_lifetime.is_zero(), router, "{network}: {ra:?}");
        if network == "fixed" {
            assert_eq!(ra.mtu, 1400);
            assert_eq!((ra.dns_server, ra.search_domain), (None, None), "no DNS");
        } else {
            assert_eq!(ra.mtu, 1500);
            assert_eq!(ra.dns_server, Some(gateway6(prefix)), "{network}");
            assert_eq!(ra.search_domain, Some(format!("{network}.vmnet")));
            assert!(!ra.dns_lifetime.is_zero());
        }
    }
    // The control above shows solicitations are answered; this one must stay silent.
    let tap = Tap::new(c.acquire("quiet").unwrap());
    assert!(prefix_of(&c, "quiet").network().octets()[0] == 0xfd);
    assert!(tap.solicit(NEVER).is_none(), "router_advertisement false");
}

// ---- a VM on a veth: the kernel's own IPv6 stack ------------------------------------------

impl VethVm {
    /// Waits until the guest has its SLAAC address in `prefix` (past duplicate address
    /// detection) and returns it.
    fn wait_slaac(&self, b: &Broker, prefix: Ipv6Net) -> Ipv6Addr {
        let want = slaac(prefix, self.mac);
        b.wait_for("the guest's SLAAC address", SOON, || {
            let addrs = self
                .ns
                .sh("ip -6 addr show dev eth0 scope global -tentative");
            addrs.contains(&format!("{want}/64"))
        });
        want
    }

    fn has_default_route(&self) -> bool {
        self.ns
            .sh("ip -6 route show default")
            .contains("via fe80::1 dev eth0")
    }
}

fn dig_aaaa(ns: &Netns, server: Ipv6Addr, name: &str) -> Vec<String> {
    netns::require("dig", "dnsutils");
    let out = ns
        .cmd("dig")
        .arg(format!("@{server}"))
        .args(["+short", "+time=2", "+tries=2", name, "AAAA"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

/// Runs busybox `udhcpc` once with hostname `name`, so the network's DNS knows the guest.
fn dhcp_with_hostname(vm: &VethVm, name: &str) {
    let out = vm
        .ns
        .cmd("busybox")
        .args([
            "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "eth0",
        ])
        .args(["-s", "/bin/true", "-x"])
        .arg(format!("hostname:{name}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "udhcpc: {out:?}");
}

#[test]
fn a_slaac_guest_uses_the_gateway_over_ipv6_and_is_found_by_aaaa() {
    let b = Broker::start(Options::default());
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let prefix = prefix_of(&c, "shared");
    let gw = gateway6(prefix);
    let vm = VethVm::new(&b, &a.info.bridge, "52:54:00:6a:00:01");
    let peer = VethVm::new(&b, &a.info.bridge, "52:54:00:6a:00:02");
    let addr = vm.wait_slaac(&b, prefix);
    let peer_addr = peer.wait_slaac(&b, prefix);
    assert!(vm.has_default_route(), "{}", vm.ns.sh("ip -6 route"));
    // The gateway answers on its IPv6 address, and guests reach each other.
    vm.ns.sh(&format!("busybox ping6 -c1 -W5 {gw}"));
    vm.ns.sh(&format!("busybox ping6 -c1 -W5 {peer_addr}"));
    // Names come with the DHCP lease; AAAA is the guest's SLAAC address.
    dhcp_with_hostname(&vm, "six");
    dhcp_with_hostname(&peer, "peer");
    let mut answer = vec![];
    b.wait_for("the AAAA records", SOON, || {
        answer = dig_aaaa(&peer.ns, gw, "six.shared.vmnet");
        answer == [addr.to_string()]
    });
    assert_eq!(dig_aaaa(&vm.ns, gw, "peer"), [peer_addr.to_string()]);
    // And the reverse name of the SLAAC address.
    let out = peer
        .ns
        .cmd("dig")
        .arg(format!("@{gw}"))
        .args(["+short", "+time=2", "+tries=2", "-x"])
        .arg(addr.to_string())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "six.shared.vmnet."
    );
    // A host process on the gateway's own address is in the prefix and served too.
    assert_eq!(dig_aaaa(&b.ns, gw, "six"), [addr.to_string()]);
    let leases = c.leases(Some("shared")).unwrap();
    assert!(
        leases
            .leases
            .iter()
            .any(|l| l.ipv6.as_deref() == Some(addr.to_string().as_str())),
        "{leases:?}"
    );
}

// ---- NAT66 ------------------------------------------------------------------------------

const UPLINK6: &str = "fd97::1";
const OUTSIDE6: &str = "[fd97::2]:8080";

impl Outside {
    fn new(b: &Broker) -> Outside {
        Outside::start(b, UPLINK6.parse().unwrap(), OUTSIDE6.parse().unwrap(), 64)
    }
}

#[test]
fn shared_masquerades_ipv6_routed_keeps_sources_and_host_never_forwards() {
    let b = Broker::start(opts(&[(
        "routed.json",
        r#"{"mode": "shared", "nat66": false}"#,
    )]));
    let outside = Outside::new(&b);
    let c = b.client();
    let s = c.acquire("shared").unwrap();
    let h = c.acquire("host").unwrap();
    let r = c.acquire("routed").unwrap();
    let shared_vm = VethVm::new(&b, &s.info.bridge, "52:54:00:6b:00:01");
    let host_vm = VethVm::new(&b, &h.info.bridge, "52:54:00:6b:00:02");
    let routed_vm = VethVm::new(&b, &r.info.bridge, "52:54:00:6b:00:03");
    shared_vm.wait_slaac(&b, prefix_of(&c, "shared"));
    let host_addr = host_vm.wait_slaac(&b, prefix_of(&c, "host"));
    let routed_prefix = prefix_of(&c, "routed");
    let routed_addr = routed_vm.wait_slaac(&b, routed_prefix);
    // Forwarding is on in the broker's namespace (the test's), for the shared networks.
    assert_eq!(
        b.ns.sh("cat /proc/sys/net/ipv6/conf/all/forwarding").trim(),
        "1"
    );

    let from = outside
        .reached_from(&shared_vm, SOON)
        .unwrap_or_else(|| panic!("shared VM does not reach the outside\n{}", b.log()));
    assert_eq!(
        from.ip(),
        UPLINK6.parse::<std::net::IpAddr>().unwrap(),
        "NAT66 to the uplink address"
    );

    // nat66 false: routed with the guest's own address (the outside routes it back).
    outside
        .ns
        .sh(&format!("ip -6 route add {routed_prefix} via {UPLINK6}"));
    let from = outside
        .reached_from(&routed_vm, SOON)
        .expect("routed VM reaches the outside");
    assert_eq!(from.ip(), std::net::IpAddr::V6(routed_addr));

    // Host: the advertisements give no default route; one set by hand still leads
    // nowhere, as nothing is forwarded from or to a host network.
    assert!(
        !host_vm.has_default_route(),
        "{}",
        host_vm.ns.sh("ip -6 route")
    );
    host_vm
        .ns
        .sh("ip -6 route add default via fe80::1 dev eth0");
    assert_eq!(
        outside.reached_from(&host_vm, NEVER),
        None,
        "host is routed out"
    );
    outside.ns.sh(&format!(
        "ip -6 route add {} via {UPLINK6}",
        prefix_of(&c, "host")
    ));
    let to_host_vm = format!("[{host_addr}]:22");
    let to: SocketAddr = to_host_vm.parse().unwrap();
    let listener = host_vm.ns.run(|| TcpListener::bind("[::]:22").unwrap());
    assert!(
        !outside
            .ns
            .run(move || TcpStream::connect_timeout(&to, NEVER).is_ok()),
        "the outside reached a host network's guest"
    );
    drop(listener);
}

/// A host whose uplink numbers itself from Router Advertisements (`accept_ra=1`) would
/// lose its IPv6 default route if the broker made it a router: the broker leaves IPv6
/// forwarding off then and says what to set; with `accept_ra=2` it switches it on.
#[test]
fn ipv6_forwarding_stays_off_while_an_uplink_depends_on_router_advertisements() {
    let b = Broker::start(opts(&[("second.json", r#"{"mode": "shared"}"#)]));
    // An uplink as SLAAC leaves it: a global address with finite lifetimes (not
    // IFA_F_PERMANENT), on an interface that accepts RAs.
    b.ns.sh(
        "ip link add up0 type veth peer name up0p && ip link set up0p up && ip link set up0 up && \
         sysctl -qw net.ipv6.conf.up0.accept_ra=1 && \
         ip -6 addr add 2001:db8:5::5/64 dev up0 nodad valid_lft 3600 preferred_lft 1800",
    );
    let c = b.client();
    let first = c.acquire("shared").unwrap();
    assert_eq!(
        b.ns.sh("cat /proc/sys/net/ipv6/conf/all/forwarding").trim(),
        "0",
        "{}",
        b.log()
    );
    let log = b.log();
    assert!(
        log.contains("IPv6 forwarding stays off") && log.contains("up0"),
        "{log}"
    );
    // The next shared network made asks again.
    b.ns.sh("sysctl -qw net.ipv6.conf.up0.accept_ra=2");
    let _second = c.acquire("second").unwrap();
    assert_eq!(
        b.ns.sh("cat /proc/sys/net/ipv6/conf/all/forwarding").trim(),
        "1",
        "{}",
        b.log()
    );
    drop(first);
}

// ---- overlapping prefixes ------------------------------------------------------------------

#[test]
fn overlapping_ipv6_prefixes_are_refused_by_check_config_and_at_creation() {
    let b = Broker::start(opts(&[
        (
            "twin1.json",
            r#"{"subnet": "10.71.0.1", "ipv6_prefix": "fd41:0:0:1::"}"#,
        ),
        (
            "twin2.json",
            r#"{"subnet": "10.72.0.1", "ipv6_prefix": "fd41:0:0:1::"}"#,
        ),
        (
            "routed.json",
            r#"{"subnet": "10.73.0.1", "ipv6_prefix": "fd41:0:0:2::"}"#,
        ),
        (
            "addressed.json",
            r#"{"subnet": "10.74.0.1", "ipv6_prefix": "fd41:0:0:3::"}"#,
        ),
        (
            "fixed.json",
            r#"{"subnet": "10.75.0.1", "ipv6_prefix": "fd41:0:0:4::"}"#,
        ),
        ("generated.json", r#"{"subnet": "10.76.0.1"}"#),
    ]));
    // check-config: two files fixing the same prefix are both errors, the others fine.
    let out = b
        .cli(&[
            "check-config",
            "--config-dir",
            support::path_str(&b.config_dir),
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for (file, other) in [("twin1.json", "twin2"), ("twin2.json", "twin1")] {
        assert!(
            text.lines().any(|l| l.starts_with("error")
                && l.contains(file)
                && l.contains(&format!(
                    "ipv6_prefix fd41:0:0:1::/64 overlaps the ipv6_prefix of network \"{other}\""
                ))),
            "{file}: {text}"
        );
    }
    for file in [
        "routed.json",
        "addressed.json",
        "fixed.json",
        "generated.json",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok") && l.contains(file)),
            "{file}: {text}"
        );
    }
    // At creation: a route inside the prefix, an address in it, another network's.
    b.ns.sh("ip link add dummy6 type veth peer name dummy6p && ip link set dummy6 up && ip link set dummy6p up");
    b.ns.sh("ip -6 route add fd41:0:0:2::/64 dev dummy6");
    b.ns.sh("ip -6 addr add fd41:0:0:3::5/64 dev dummy6 nodad");
    // The generated prefix of `generated` is, by a (forced) collision, `fixed`'s.
    std::fs::create_dir_all(&b.state_dir).unwrap();
    std::fs::write(
        b.state_dir.join("generated.ipv6-prefix"),
        "fd41:0:0:4::/64\n",
    )
    .unwrap();
    let c = b.client();
    for (net, has) in [
        (
            "routed",
            "ipv6_prefix fd41:0:0:2::/64 overlaps route fd41:0:0:2::/64 via interface dummy6",
        ),
        (
            "addressed",
            "ipv6_prefix fd41:0:0:3::/64 overlaps address fd41:0:0:3::5/64 on interface dummy6",
        ),
    ] {
        let e = c.acquire(net).unwrap_err();
        assert_eq!(e.code.code(), 6, "{net}: {e}");
        assert!(e.message.contains(has), "{net}: {e}");
        assert!(
            !b.ns.links().iter().any(|l| l == &format!("vmnb-{net}")),
            "nothing is left of {net}"
        );
    }
    c.acquire("fixed").unwrap();
    let e = c.acquire("generated").unwrap_err();
    assert_eq!(e.code.code(), 6, "{e}");
    assert!(
        e.message.contains(
            "ipv6_prefix fd41:0:0:4::/64 overlaps subnet fd41:0:0:4::/64 of network \"fixed\""
        ),
        "{e}"
    );
    assert!(e.message.contains("generated.ipv6-prefix"), "{e}");
}
