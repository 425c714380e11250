//! The network services of the assembled broker (issue 3): the real `vmnet-broker serve`
//! in a namespace of its own, with DHCP, DNS, NAT, anti-spoofing, isolation and the
//! firewall watchdog seen from the outside, as a VM would see them.
//!
//! A "VM" is one of two things:
//! - a veth: one end in a client namespace, the other enslaved to the network's bridge in
//!   the broker's namespace. Real clients (busybox `udhcpc`, `dig`, TCP) run on it. The
//!   broker did not make that port, so anti-spoofing does not apply to it.
//! - the TAP fd an acquire returns: writing a frame is the VM sending it, reading is the VM
//!   receiving. Frames are built here (ARP; Ethernet/IPv4/UDP around DHCP messages).
//!
//! ```text
//!  client ns C ── eth0 ═ vcN ── vmnb-<net> [broker: DHCP, DNS, nft]  up0 10.97.0.1 ═ eth0 10.97.0.2  outside ns O
//!                          TAP fd ┘                                   up1 10.98.0.1 ═ eth0 10.98.0.2  upstream ns U (dnsmasq)
//! ```
//!
//! Needs root, `ip`, `nft`, `ss`, busybox, `dig` (dnsutils) and `dnsmasq` (dnsmasq-base).
#![cfg(target_os = "linux")]

#[path = "support/frames.rs"]
mod frames;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;
#[path = "support/veth.rs"]
mod veth;

use dhcproto::Encodable;
use dhcproto::v4::{DhcpOption, Message, MessageType};
use frames::{
    BROADCAST, ETH_ARP, ETH_IPV4, Tap, arp, checksum, dhcp_frame_as, dhcp_reply, ethernet,
    ipv4_udp, parse_mac, udp_payload_to,
};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use support::{Broker, Netns, Options, options_with_files as opts};
use veth::{Outside, VethVm};
use vmnet_broker::backend::linux::firewall::guard::{Binding, Guard};
use vmnet_broker::client::{Acquired, Client};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How long a negative check waits for something that must not come.
const NEVER: Duration = Duration::from_millis(1500);
/// How long a positive check may take.
const SOON: Duration = Duration::from_secs(5);

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn subnet_of(a: &Acquired) -> ipnet::Ipv4Net {
    a.info.subnet.parse().unwrap()
}

/// Whether a TCP connection from namespace `ns` to `to` is established within `timeout`.
fn tcp_connects(ns: &Netns, to: SocketAddr, timeout: Duration) -> bool {
    ns.run(move || TcpStream::connect_timeout(&to, timeout).is_ok())
}

/// Sockets on local port `port` in the broker's namespace (`ss` flags `-lun`/`-ltn`).
fn listening(b: &Broker, flags: &str, port: u16) -> Vec<String> {
    b.ns.sh(&format!("ss {flags} -H"))
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(String::from))
        .filter(|local| local.ends_with(&format!(":{port}")))
        .collect()
}

// ---- VMs on veths ---------------------------------------------------------------------

impl VethVm {
    /// Runs busybox `udhcpc` once (3 DISCOVERs, 1 s apart). On a lease the script
    /// configures the address and default route and records what the server sent;
    /// returns those variables, or None when no lease came.
    fn dhcp(&self, b: &Broker, extra: &[&str]) -> Option<HashMap<String, String>> {
        let script = b.dir.path().join("udhcpc.sh");
        if !script.exists() {
            std::fs::write(
                &script,
                r#"#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    {
        echo "ip=$ip"
        echo "mask=$mask"
        echo "router=$router"
        echo "dns=$dns"
        echo "domain=$domain"
        echo "mtu=$mtu"
        echo "lease=$lease"
        echo "serverid=$serverid"
    } > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
    ;;
esac
exit 0
"#,
            )
            .unwrap();
            netns::run_ok(Command::new("chmod").arg("755").arg(&script));
        }
        let out = b.dir.path().join(format!(
            "lease-{}.env",
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let res = self
            .ns
            .cmd("busybox")
            .args([
                "udhcpc", "-f", "-q", "-n", "-t", "3", "-T", "1", "-i", "eth0",
            ])
            .arg("-s")
            .arg(&script)
            .args(extra)
            .env("OUT", &out)
            .output()
            .unwrap();
        if !res.status.success() {
            assert!(
                !out.exists(),
                "udhcpc failed but the script recorded a lease"
            );
            return None;
        }
        let vars = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(vars)
    }

    fn lease(&self, b: &Broker, extra: &[&str]) -> HashMap<String, String> {
        self.dhcp(b, extra)
            .unwrap_or_else(|| panic!("no DHCP lease; broker log:\n{}", b.log()))
    }
}

/// `dig @server` from `ns`: the `+short` answer lines, or None when no reply came.
fn dig(ns: &Netns, server: Ipv4Addr, args: &[&str]) -> Option<Vec<String>> {
    netns::require("dig", "dnsutils");
    let out = ns
        .cmd("dig")
        .arg(format!("@{server}"))
        .args(["+short", "+time=2", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    })
}

// ---- VMs on TAP fds -------------------------------------------------------------------

// The TAP fd and frame helpers shared with tests/vxlan.rs live in support/frames.rs;
// these are the exchanges only this file's tests make.
impl Tap {
    /// Whether the gateway answers an ARP request for `gw` sent with Ethernet source and
    /// ARP sender `mac`/`sender_ip` within `wait`.
    fn gateway_answers(
        &self,
        mac: [u8; 6],
        sender_ip: Ipv4Addr,
        gw: Ipv4Addr,
        wait: Duration,
    ) -> bool {
        let req = ethernet(BROADCAST, mac, ETH_ARP, &arp(1, mac, sender_ip, [0; 6], gw));
        self.ask(&req, wait, |f| is_arp_reply_from(f, gw, mac))
    }

    /// A full DHCP exchange (DISCOVER, OFFER, REQUEST, ACK) with the broker's server,
    /// asking for `hostname`; returns the leased address.
    fn lease(&self, hostname: &str) -> Ipv4Addr {
        let xid = 0x5eed_0000 | COUNTER.fetch_add(1, Ordering::SeqCst);
        self.dhcp_with(xid, SOON, &[DhcpOption::Hostname(hostname.into())])
            .yiaddr()
    }

    /// Sends a DNS query for `name` (type A) from `src_mac`/`src` to the DNS server at
    /// `server_mac`/`server` until an answer comes or `wait` passes; returns the
    /// answer's DNS payload, empty when none came.
    fn dns_query(
        &self,
        (src_mac, src): ([u8; 6], Ipv4Addr),
        (server_mac, server): ([u8; 6], Ipv4Addr),
        name: &str,
        wait: Duration,
    ) -> Vec<u8> {
        let id = COUNTER.fetch_add(1, Ordering::SeqCst) as u16;
        let mut query = id.to_be_bytes().to_vec();
        // Recursion desired; one question.
        query.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            query.push(label.len() as u8);
            query.extend(label.bytes());
        }
        query.extend([0, 0, 1, 0, 1]);
        let sport = 40000 + id % 20000;
        let frame = ethernet(
            server_mac,
            src_mac,
            ETH_IPV4,
            &ipv4_udp(src, server, sport, 53, &query),
        );
        let mut answer = vec![];
        self.ask(&frame, wait, |f| match udp_payload_to(f, sport) {
            Some(p) if p.len() > 12 && p[..2] == id.to_be_bytes() => {
                answer = p.to_vec();
                true
            }
            _ => false,
        });
        answer
    }
}

/// Whether `f` is an ARP reply from `ip` to `to`.
fn is_arp_reply_from(f: &[u8], ip: Ipv4Addr, to: [u8; 6]) -> bool {
    f.len() >= 42
        && f[12..14] == ETH_ARP.to_be_bytes()
        && f[20..22] == [0, 2]
        && f[28..32] == ip.octets()
        && f[32..38] == to
}

fn is_from(f: &[u8], mac: [u8; 6]) -> bool {
    f.len() >= 14 && f[6..12] == mac
}

/// An address of the subnet that is none of `avoid` (for forged sources).
fn other_host(net: ipnet::Ipv4Net, avoid: &[Ipv4Addr]) -> Ipv4Addr {
    net.hosts().find(|h| !avoid.contains(h)).unwrap()
}

// ---- DHCP -----------------------------------------------------------------------------

#[test]
fn dhcp_gives_address_router_dns_mtu_and_keeps_leases_across_a_restart() {
    let mut b = Broker::start(Options::default());
    let (first, second) = ("52:54:00:5e:00:01", "52:54:00:5e:00:02");
    let (subnet, gw, ip1, ip2, mut vm) = {
        let c = b.client();
        let a = c.acquire("shared").unwrap();
        let subnet = subnet_of(&a);
        let gw = ip(&a.info.gateway);
        let mut vm = VethVm::new(&b, &a.info.bridge, first);
        let l = vm.lease(&b, &[]);
        let ip1 = ip(&l["ip"]);
        assert!(subnet.contains(&ip1) && ip1 != gw, "{ip1} in {subnet}");
        assert_eq!(l["mask"], subnet.prefix_len().to_string());
        assert_eq!(ip(&l["router"]), gw);
        assert_eq!(ip(&l["dns"]), gw);
        assert_eq!(ip(&l["serverid"]), gw);
        assert_eq!(l["domain"], "shared.vmnet");
        assert_eq!(l["mtu"], a.info.mtu.to_string());
        assert_eq!(l["lease"], "3600");
        // The address really works: the VM reaches its gateway.
        vm.ns.sh(&format!("busybox ping -c1 -W2 {gw}"));
        vm.set_mac(second);
        let ip2 = ip(&vm.lease(&b, &[])["ip"]);
        assert_ne!(ip1, ip2, "the first lease is still held");
        (subnet, gw, ip1, ip2, vm)
    };
    // Asked through the log: a status query would itself be a client when SIGTERM comes.
    b.wait_for("every client gone", SOON, || {
        b.log()
            .lines()
            .rfind(|l| l.contains("client connected") || l.contains("client disconnected"))
            .is_some_and(|l| l.ends_with("clients=0"))
    });
    b.stop();
    let file = std::fs::read_to_string(b.state_dir.join("shared.leases.json")).unwrap();
    for text in [first, second, &ip1.to_string(), &ip2.to_string()] {
        assert!(file.contains(text), "{text} missing in {file}");
    }

    b.spawn(&Options::default());
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    assert_eq!((subnet_of(&a), ip(&a.info.gateway)), (subnet, gw));
    vm.plug(&b, &a.info.bridge);
    // The second MAC asks first: a server that forgot would give it the first free
    // address, which is the first MAC's.
    assert_eq!(ip(&vm.lease(&b, &[])["ip"]), ip2);
    vm.set_mac(first);
    assert_eq!(ip(&vm.lease(&b, &[])["ip"]), ip1);
}

#[test]
fn dhcp_reservations_and_mtu_of_a_config_network() {
    let b = Broker::start(opts(&[(
        "lab.json",
        r#"{"mode":"host","subnet":"10.77.0.1","mtu":1400,
            "dhcp_reservations":[{"mac":"52:54:00:77:00:10","ip":"10.77.0.10"}]}"#,
    )]));
    let a = b.client().acquire("lab").unwrap();
    // Another MAC first: it must not get the reserved address although it is free.
    let other = VethVm::new(&b, &a.info.bridge, "52:54:00:77:00:99");
    let l = other.lease(&b, &[]);
    assert_ne!(l["ip"], "10.77.0.10");
    assert_eq!(l["mtu"], "1400");
    assert_eq!(l["domain"], "lab.vmnet");
    let reserved = VethVm::new(&b, &a.info.bridge, "52:54:00:77:00:10");
    let l = reserved.lease(&b, &[]);
    assert_eq!(l["ip"], "10.77.0.10");
    assert_eq!(l["router"], "10.77.0.1");
}

#[test]
fn dhcp_pool_exhaustion_is_logged_clearly() {
    let b = Broker::start(opts(&[(
        "tiny.json",
        r#"{"subnet":"10.78.0.1","dhcp_range":{"start":"10.78.0.50","end":"10.78.0.50"}}"#,
    )]));
    let a = b.client().acquire("tiny").unwrap();
    let one = VethVm::new(&b, &a.info.bridge, "52:54:00:78:00:01");
    assert_eq!(one.lease(&b, &[])["ip"], "10.78.0.50");
    let two = VethVm::new(&b, &a.info.bridge, "52:54:00:78:00:02");
    assert!(two.dhcp(&b, &[]).is_none(), "the pool has one address");
    let line = "network tiny: DHCP pool exhausted (1 addresses), no offer for 52:54:00:78:00:02";
    let log = b.log();
    let hits: Vec<&str> = log.lines().filter(|l| l.contains(line)).collect();
    // udhcpc sent three DISCOVERs; the warning is given once, the rest at debug level.
    assert_eq!(hits.len(), 3, "{log}");
    assert!(hits[0].contains(" WARN "), "{}", hits[0]);
    assert!(hits[1..].iter().all(|l| l.contains(" DEBUG ")), "{log}");
}

#[test]
fn dhcp_false_means_no_server_and_no_offer() {
    let b = Broker::start(opts(&[("static.json", r#"{"dhcp":false}"#)]));
    let c = b.client();
    let a = c.acquire("static").unwrap();
    let vm = VethVm::new(&b, &a.info.bridge, "52:54:00:79:00:01");
    assert!(vm.dhcp(&b, &[]).is_none());
    assert!(
        listening(&b, "-lun", 67).is_empty(),
        "{}",
        b.ns.sh("ss -lun")
    );
    // The control: the same VM on a network with DHCP gets a lease, and the server shows.
    let s = c.acquire("shared").unwrap();
    vm.plug(&b, &s.info.bridge);
    vm.lease(&b, &[]);
    let sockets = listening(&b, "-lun", 67);
    assert_eq!(sockets, [format!("0.0.0.0%{}:67", s.info.bridge)]);
}

// ---- DNS ------------------------------------------------------------------------------

/// dnsmasq in its own namespace, reached from the broker's at 10.98.0.2; killed on drop.
struct Upstream {
    child: Child,
    _ns: Netns,
}

impl Upstream {
    fn start(b: &Broker) -> Upstream {
        netns::require("dnsmasq", "dnsmasq-base");
        let ns = Netns::new("up");
        b.ns.sh(&format!(
            "ip link add up1 type veth peer name eth0 netns {}; \
             ip addr add 10.98.0.1/24 dev up1; ip link set up1 up",
            ns.name
        ));
        ns.sh("ip addr add 10.98.0.2/24 dev eth0; ip link set eth0 up");
        let child = ns
            .cmd("dnsmasq")
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
            ])
            .args(["--user=root", "--group=root", "--bind-interfaces"])
            .args([
                "--listen-address=10.98.0.2",
                "--address=/example.test/10.98.0.77",
            ])
            .arg(format!(
                "--pid-file={}",
                b.dir.path().join("dnsmasq.pid").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start dnsmasq (apt-get install -y dnsmasq-base)");
        Upstream { child, _ns: ns }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_second_vm_cannot_take_over_a_leased_hostname() {
    let b = Broker::start(Options::default());
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let gw = ip(&a.info.gateway);
    let first = VethVm::new(&b, &a.info.bridge, "52:54:00:d5:01:01");
    let second = VethVm::new(&b, &a.info.bridge, "52:54:00:d5:01:02");
    let ip1 = first.lease(&b, &["-x", "hostname:victim"])["ip"].clone();
    b.wait_for("victim resolves to the first VM", SOON, || {
        dig(&first.ns, gw, &["victim", "A"]) == Some(vec![ip1.clone()])
    });
    // The attacker asks for the same name: it gets an address, not the name.
    let ip2 = second.lease(&b, &["-x", "hostname:victim"])["ip"].clone();
    assert_ne!(ip1, ip2);
    for name in ["victim", "victim.shared.vmnet"] {
        assert_eq!(
            dig(&first.ns, gw, &[name, "A"]),
            Some(vec![ip1.clone()]),
            "{name}"
        );
    }
    assert_eq!(dig(&first.ns, gw, &["-x", &ip2]), Some(vec![]));
    b.wait_for("the refusal in the log", SOON, || {
        b.log().contains(
            "hostname \"victim\" of 52:54:00:d5:01:02 refused: the live lease of 52:54:00:d5:01:01 holds it",
        )
    });
    // Renewing with the name again changes nothing; the holder keeps it on renewal.
    second.lease(&b, &["-x", "hostname:victim"]);
    first.lease(&b, &["-x", "hostname:victim"]);
    assert_eq!(dig(&second.ns, gw, &["victim", "A"]), Some(vec![ip1]));
}

#[test]
fn dns_forwards_to_resolv_conf_and_answers_vm_names() {
    let b = Broker::start(opts(&[("nodns.json", r#"{"dns":false}"#)]));
    let _upstream = Upstream::start(&b);
    // Read when the network's DNS server starts, i.e. at the first acquire.
    std::fs::write(b.dir.path().join("resolv.conf"), "nameserver 10.98.0.2\n").unwrap();
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let gw = ip(&a.info.gateway);
    let vm = VethVm::new(&b, &a.info.bridge, "52:54:00:d5:00:01");
    let leased = vm.lease(&b, &["-x", "hostname:vm1"])["ip"].clone();

    // Forwarded: dnsmasq may take a moment to listen.
    b.wait_for("example.test via the upstream", SOON, || {
        dig(&vm.ns, gw, &["example.test", "A"]) == Some(vec!["10.98.0.77".into()])
    });
    for name in ["vm1", "vm1.shared.vmnet", "VM1.Shared.Vmnet."] {
        assert_eq!(
            dig(&vm.ns, gw, &[name, "A"]),
            Some(vec![leased.clone()]),
            "{name}"
        );
    }
    assert_eq!(
        dig(&vm.ns, gw, &["-x", &leased]),
        Some(vec!["vm1.shared.vmnet.".to_string()])
    );
    // Over TCP as well.
    assert_eq!(
        dig(&vm.ns, gw, &["+tcp", "vm1.shared.vmnet", "A"]),
        Some(vec![leased.clone()])
    );
    // The IPv4 gateway and the IPv6 one (`::1` of the network's prefix).
    let prefix6: ipnet::Ipv6Net = c
        .show("shared")
        .unwrap()
        .ipv6_prefix
        .unwrap()
        .parse()
        .unwrap();
    let gw6 = vmnet_broker::ula::gateway_of(prefix6);
    assert_eq!(
        listening(&b, "-lun", 53),
        [format!("{gw}:53"), format!("[{gw6}]:53")],
        "only on the gateways"
    );

    // "dns": false: no server on the gateway, and DHCP announces none.
    let n = c.acquire("nodns").unwrap();
    let ngw = ip(&n.info.gateway);
    vm.plug(&b, &n.info.bridge);
    let l = vm.lease(&b, &["-x", "hostname:vm1"]);
    assert_eq!(l["dns"], "");
    assert_eq!(l["domain"], "");
    let udp = listening(&b, "-lun", 53);
    let tcp = listening(&b, "-ltn", 53);
    assert!(
        !udp.iter()
            .chain(&tcp)
            .any(|s| s.starts_with(&format!("{ngw}:"))),
        "{udp:?} {tcp:?}"
    );
    assert_eq!(dig(&vm.ns, ngw, &["example.test", "A"]), None);
}

// ---- NAT and host mode ----------------------------------------------------------------

const OUTSIDE: &str = "10.97.0.2:8080";
const UPLINK: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);

impl Outside {
    /// The world outside the broker's namespace: namespace O, at 10.97.0.2 from the
    /// broker's uplink 10.97.0.1, which is the broker namespace's default route. A TCP
    /// listener on 10.97.0.2:8080 tells who connected.
    fn new(b: &Broker) -> Outside {
        Outside::start(b, UPLINK.into(), OUTSIDE.parse().unwrap(), 24)
    }
}

#[test]
fn shared_mode_is_masqueraded_and_host_mode_never_leaves() {
    let b = Broker::start(Options::default());
    let outside = Outside::new(&b);
    let c = b.client();
    let s = c.acquire("shared").unwrap();
    let h = c.acquire("host").unwrap();
    let shared_vm = VethVm::new(&b, &s.info.bridge, "52:54:00:0a:00:01");
    let host_vm = VethVm::new(&b, &h.info.bridge, "52:54:00:0a:00:02");
    let vm_ip = shared_vm.lease(&b, &[])["ip"].clone();
    host_vm.lease(&b, &[]);
    // The shared network switched forwarding on; host mode must hold regardless.
    assert_eq!(b.ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");

    let from = outside
        .reached_from(&shared_vm, SOON)
        .expect("shared VM reaches the outside");
    assert_eq!(from.ip(), UPLINK, "masqueraded to the uplink address");

    assert_eq!(
        outside.reached_from(&host_vm, NEVER),
        None,
        "host mode is routed out"
    );
    assert_eq!(outside.accepted(NEVER), None);
    // Host mode still reaches its gateway (the broker's DNS over TCP).
    let hgw: SocketAddr = format!("{}:53", h.info.gateway).parse().unwrap();
    assert!(tcp_connects(&host_vm.ns, hgw, SOON));

    // Nothing outside may open a connection into the NAT network, even with a route to it.
    let inside = shared_vm
        .ns
        .run(|| TcpListener::bind("0.0.0.0:9090").unwrap());
    outside
        .ns
        .sh(&format!("ip route add {} via {UPLINK}", s.info.subnet));
    let to_vm: SocketAddr = format!("{vm_ip}:9090").parse().unwrap();
    assert!(!tcp_connects(&outside.ns, to_vm, NEVER));
    inside.set_nonblocking(true).unwrap();
    assert!(inside.accept().is_err());
    // The control: the VM's own gateway does reach it.
    assert!(
        b.ns.sh(&format!(
            "busybox ping -c1 -W2 {vm_ip} >/dev/null && echo ok"
        ))
        .contains("ok")
    );
}

// ---- anti-spoofing and isolation on TAP fds -------------------------------------------

#[test]
fn anti_spoofing_binds_each_tap_to_its_mac_and_lease() {
    let b = Broker::start(opts(&[("open.json", r#"{"allow_spoofing":true}"#)]));
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let (gw, net) = (ip(&a.info.gateway), subnet_of(&a));
    let bridge = a.info.bridge.clone();
    let tap = Tap::new(a);
    let forged_mac = [0x52, 0x54, 0x00, 0xba, 0xdb, 0xad];
    assert_ne!(tap.mac, forged_mac);
    let unspecified = Ipv4Addr::UNSPECIFIED;

    // Before any lease: an ARP probe (sender 0.0.0.0, RFC 5227) with the TAP's MAC is
    // answered; the same with a forged MAC is not, nor an address the VM was not given.
    assert!(
        tap.gateway_answers(tap.mac, unspecified, gw, SOON),
        "{}",
        b.log()
    );
    assert!(!tap.gateway_answers(forged_mac, unspecified, gw, NEVER));
    let guess = other_host(net, &[gw]);
    assert!(
        !tap.gateway_answers(tap.mac, guess, gw, NEVER),
        "no lease, no IPv4"
    );

    // A real DHCP exchange over the fd binds the MAC to its lease.
    let leased = tap.lease("tapvm");
    assert!(net.contains(&leased));
    assert!(
        tap.gateway_answers(tap.mac, leased, gw, SOON),
        "{}",
        b.log()
    );
    let forged_ip = other_host(net, &[gw, leased]);
    assert!(!tap.gateway_answers(tap.mac, forged_ip, gw, NEVER));
    assert!(!tap.gateway_answers(forged_mac, leased, gw, NEVER));
    assert_eq!(guard_lease(&b, tap.mac), Some(leased));
    // IPv4 itself, not only ARP: a DNS query for the VM's own DHCP name is answered from
    // the leased address. From a forged one nothing comes back, not even the ARP request
    // for the forged address the host would send if the query had got through.
    let gw_mac = parse_mac(
        b.ns.sh(&format!("cat /sys/class/net/{bridge}/address"))
            .trim(),
    );
    let answer = tap.dns_query((tap.mac, leased), (gw_mac, gw), "tapvm", SOON);
    assert!(
        answer.windows(4).any(|w| w == leased.octets()),
        "tapvm resolves to {leased}: {answer:?}"
    );
    let none = tap.dns_query((tap.mac, forged_ip), (gw_mac, gw), "tapvm", NEVER);
    assert!(none.is_empty());
    let mut sent_to_forged = tap.drain(NEVER).into_iter().filter(|f| {
        f.len() >= 42 && f[12..14] == ETH_ARP.to_be_bytes() && f[38..42] == forged_ip.octets()
    });
    assert!(
        sent_to_forged.next().is_none(),
        "the host heard the forged source"
    );

    // "allow_spoofing": true: anything goes, the same checks are heard.
    let open = c.acquire("open").unwrap();
    let (ogw, onet) = (ip(&open.info.gateway), subnet_of(&open));
    let ogw_mac = parse_mac(
        b.ns.sh(&format!("cat /sys/class/net/{}/address", open.info.bridge))
            .trim(),
    );
    let open_tap = Tap::new(open);
    let made_up = other_host(onet, &[ogw]);
    assert!(open_tap.gateway_answers(forged_mac, made_up, ogw, SOON));
    let reply = open_tap.dns_query((forged_mac, made_up), (ogw_mac, ogw), "x.open.vmnet", SOON);
    assert!(
        !reply.is_empty(),
        "a forged source is answered without anti-spoofing"
    );
}

#[test]
fn the_lease_binding_is_in_place_when_the_ack_arrives() {
    // A guest may use its address the moment the ACK is in: its first ARP (or DNS query)
    // must not fall into the gap before the firewall learns the lease, or it waits for a
    // retransmission (1 s for ARP).
    let b = Broker::start(Options::default());
    let c = b.client();
    for _ in 0..3 {
        let a = c.acquire("shared").unwrap();
        let gw = ip(&a.info.gateway);
        let tap = Tap::new(a);
        let leased = tap.lease("quick");
        let req = ethernet(
            BROADCAST,
            tap.mac,
            ETH_ARP,
            &arp(1, tap.mac, leased, [0; 6], gw),
        );
        tap.send(&req);
        let answered = tap
            .drain(Duration::from_millis(500))
            .iter()
            .any(|f| is_arp_reply_from(f, gw, tap.mac));
        assert!(
            answered,
            "first ARP from {leased} right after the ACK was dropped"
        );
    }
}

/// Two TAPs on `network`: A sends a broadcast ARP probe for the gateway and a unicast
/// frame to B's MAC. Returns whether the gateway answered A and whether B saw either.
fn two_taps(c: &Client, network: &str) -> (bool, bool) {
    let a = c.acquire(network).unwrap();
    let gw = ip(&a.info.gateway);
    let a = Tap::new(a);
    let b = Tap::new(c.acquire(network).unwrap());
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let answered = a.gateway_answers(a.mac, unspecified, gw, SOON);
    // Bound, as the gateway's answer shows: an unbound TAP receives nothing, isolated or
    // not, so without it the silence could be the guard's instead of isolation's.
    assert!(b.gateway_answers(b.mac, unspecified, gw, SOON));
    let unicast = ethernet(
        b.mac,
        a.mac,
        ETH_ARP,
        &arp(1, a.mac, unspecified, [0; 6], gw),
    );
    a.send(&unicast);
    let seen = b.drain(NEVER).iter().any(|f| is_from(f, a.mac));
    (answered, seen)
}

#[test]
fn isolation_keeps_vms_apart_but_not_from_the_gateway() {
    let b = Broker::start(opts(&[("iso.json", r#"{"isolation":true}"#)]));
    let c = b.client();
    assert_eq!(two_taps(&c, "iso"), (true, false), "isolated");
    assert_eq!(two_taps(&c, "shared"), (true, true), "not isolated");
}

// ---- the firewall watchdog ------------------------------------------------------------

#[test]
fn flushed_ruleset_is_restored_with_nat_and_anti_spoofing() {
    let b = Broker::start(Options::default());
    let outside = Outside::new(&b);
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let (gw, net) = (ip(&a.info.gateway), subnet_of(&a));
    let vm = VethVm::new(&b, &a.info.bridge, "52:54:00:f1:00:01");
    vm.lease(&b, &[]);
    let tap = Tap::new(c.acquire("shared").unwrap());
    let leased = tap.lease("tapvm");
    assert!(tap.gateway_answers(tap.mac, leased, gw, SOON));
    assert_eq!(
        outside.reached_from(&vm, SOON).map(|a| a.ip() == UPLINK),
        Some(true)
    );

    // The watchdog restores on the kernel's notification, often before `nft list` could
    // show the tables gone: a table of someone else's shows that the flush happened.
    b.ns.sh("nft add table inet someone_elses; nft flush ruleset");
    assert!(!b.ns.nft_tables().contains("someone_elses"));
    b.wait_for("the watchdog's restore", Duration::from_secs(6), || {
        let t = b.ns.nft_tables();
        t.contains("table inet vmnet_broker") && t.contains("table bridge vmnet_broker")
    });
    b.wait_for("the warning", SOON, || {
        b.log()
            .contains("firewall rules were removed (flushed?), restored")
    });
    assert_eq!(
        outside.reached_from(&vm, SOON).map(|a| a.ip() == UPLINK),
        Some(true)
    );
    // The port and lease bindings came back too.
    let forged_mac = [0x52, 0x54, 0x00, 0xba, 0xdb, 0xad];
    assert!(!tap.gateway_answers(forged_mac, leased, gw, NEVER));
    assert!(!tap.gateway_answers(tap.mac, other_host(net, &[gw, leased]), gw, NEVER));
    assert!(tap.gateway_answers(tap.mac, leased, gw, SOON));
}

// ---- cleanup --------------------------------------------------------------------------

#[test]
fn nothing_remains_after_the_idle_timeout_once_services_were_used() {
    let b = Broker::start(Options {
        idle_timeout: 1.0,
        ..Default::default()
    });
    {
        let c = b.client();
        let a = c.acquire("shared").unwrap();
        let h = c.acquire("host").unwrap();
        let gw = ip(&a.info.gateway);
        let vm = VethVm::new(&b, &a.info.bridge, "52:54:00:1d:00:01");
        vm.lease(&b, &["-x", "hostname:idle"]);
        assert!(dig(&vm.ns, gw, &["idle", "A"]).is_some_and(|a| a.len() == 1));
        let tap = Tap::new(h);
        tap.lease("taphost");
        assert!(!listening(&b, "-lun", 67).is_empty());
        // The VM's namespace goes, and its veth with it: the broker's ports remain.
        drop(vm);
        drop(tap);
    }
    b.wait_for("idle removal", Duration::from_secs(10), || {
        b.client().status().unwrap().networks.is_empty()
    });
    assert_eq!(b.ns.links(), Vec::<String>::new());
    assert_eq!(b.ns.nft_tables().trim(), "");
    for (flags, port) in [("-lun", 67), ("-lun", 53), ("-ltn", 53)] {
        assert!(listening(&b, flags, port).is_empty(), "{flags} {port}");
    }
    // Leases outlive the network; forwarding stays on (other software may rely on it).
    assert!(b.state_dir.join("shared.leases.json").exists());
    assert!(b.state_dir.join("host.leases.json").exists());
    assert_eq!(b.ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
    assert_eq!(b.count_in_log("network removed"), 2);
}

/// The TAPs the TAP guard has bindings for, by name ("#<ifindex>" for an interface that
/// is gone). Every anti-spoofing network of the broker shares one map.
fn bound_taps(b: &Broker) -> Vec<String> {
    guard_bindings(b)
        .into_iter()
        .map(|(name, _, _)| name)
        .collect()
}

#[test]
fn bindings_of_closed_taps_are_forgotten() {
    let b = Broker::start(Options::default());
    // A closed TAP's binding is forgotten when the kernel reports the TAP gone (a link
    // event), so the set follows the live TAPs.
    let a = b.client();
    let first: Vec<Acquired> = (0..64).map(|_| a.acquire("shared").unwrap()).collect();
    b.wait_for("64 bindings", Duration::from_secs(20), || {
        bound_taps(&b).len() == 64
    });
    drop(first);
    b.wait_for("the closed TAPs to go", Duration::from_secs(30), || {
        a.status().unwrap().networks[0].taps.is_empty()
    });
    b.wait_for("their bindings to go", Duration::from_secs(30), || {
        bound_taps(&b).is_empty()
    });
    let c = b.client();
    let second: Vec<Acquired> = (0..64).map(|_| c.acquire("shared").unwrap()).collect();
    let mut want: Vec<String> = second.iter().map(|x| x.info.interface.clone()).collect();
    want.sort();
    b.wait_for(
        "the bindings of the live TAPs only",
        Duration::from_secs(20),
        || {
            let mut bound = bound_taps(&b);
            bound.sort();
            bound == want
        },
    );
}

/// Runs `f` on a current-thread runtime in a thread that entered the broker's namespace.
fn in_broker_ns<T: Send, Fut: std::future::Future<Output = T>>(
    b: &Broker,
    f: impl FnOnce() -> Fut + Send,
) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            b.ns.enter_current_thread();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap()
    })
}

/// The TAP guard the broker left in the kernel, found the way a restarted broker adopts
/// it (through the filter of one of its TAPs), or None when no interface has it.
async fn broker_guard() -> Option<(Guard, std::collections::BTreeMap<u32, String>)> {
    let names: std::collections::BTreeMap<u32, String> = nix::net::if_::if_nameindex()
        .unwrap()
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .collect();
    for index in names.keys() {
        if let Some(guard) = Guard::adopt(*index).await.unwrap() {
            return Some((guard, names));
        }
    }
    None
}

/// The TAP guard's bindings in the broker's namespace: (TAP name or "#<ifindex>" when
/// gone, interface index, binding).
fn guard_bindings(b: &Broker) -> Vec<(String, u32, Binding)> {
    in_broker_ns(b, || async {
        let Some((guard, names)) = broker_guard().await else {
            return vec![];
        };
        guard
            .bindings()
            .unwrap()
            .into_iter()
            .map(|(i, binding)| {
                let name = names.get(&i).cloned().unwrap_or_else(|| format!("#{i}"));
                (name, i, binding)
            })
            .collect()
    })
}

/// The IPv4 lease the TAP guard binds to the TAP of guest `mac` (0.0.0.0: none).
fn guard_lease(b: &Broker, mac: [u8; 6]) -> Option<Ipv4Addr> {
    guard_bindings(b)
        .into_iter()
        .find(|(_, _, binding)| binding.mac == mac)
        .map(|(_, _, binding)| Ipv4Addr::from(binding.ip4))
}

// ---- a hostile VM: server roles, forged DHCP, bridged traffic (issue 10) ---------------

const ETH_IPV6: u16 = 0x86dd;

/// fe80::/64 address derived from `mac` (modified EUI-64, RFC 4291).
fn link_local(mac: [u8; 6]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[8..11].copy_from_slice(&[mac[0] ^ 2, mac[1], mac[2]]);
    a[11..13].copy_from_slice(&[0xff, 0xfe]);
    a[13..16].copy_from_slice(&mac[3..6]);
    a
}

/// The Ethernet multicast address of IPv6 multicast `dst` (RFC 2464).
fn ipv6_multicast_mac(dst: [u8; 16]) -> [u8; 6] {
    [0x33, 0x33, dst[12], dst[13], dst[14], dst[15]]
}

const ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// An IPv6 packet (hop limit 255, as neighbour discovery requires) carrying `payload` as
/// protocol `next`; an ICMPv6 payload gets its checksum filled in.
fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = payload.to_vec();
    let len = body.len() as u16;
    if next == 58 {
        let mut pseudo = src.to_vec();
        pseudo.extend(dst);
        pseudo.extend(u32::from(len).to_be_bytes());
        pseudo.extend([0, 0, 0, 58]);
        body[2..4].copy_from_slice(&[0, 0]);
        pseudo.extend(&body);
        let sum = checksum(&pseudo);
        body[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let mut p = vec![0x60, 0, 0, 0];
    p.extend(len.to_be_bytes());
    p.extend([next, 255]);
    p.extend(src);
    p.extend(dst);
    p.extend(body);
    p
}

/// A Router Advertisement (ICMPv6 134) from `mac` to all nodes: default router for 30
/// minutes, with the autoconfiguration prefix 2001:db8:66::/64.
fn router_advertisement(mac: [u8; 6]) -> Vec<u8> {
    let mut ra = vec![134, 0, 0, 0, 64, 0];
    ra.extend(1800u16.to_be_bytes());
    ra.extend([0; 8]);
    // Prefix information: on-link and autonomous.
    ra.extend([3, 4, 64, 0xc0]);
    ra.extend(86400u32.to_be_bytes());
    ra.extend(14400u32.to_be_bytes());
    ra.extend([0; 4]);
    ra.extend([
        0x20, 0x01, 0x0d, 0xb8, 0, 0x66, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    // Source link-layer address.
    ra.extend([1, 1]);
    ra.extend(mac);
    ethernet(
        ipv6_multicast_mac(ALL_NODES),
        mac,
        ETH_IPV6,
        &ipv6(link_local(mac), ALL_NODES, 58, &ra),
    )
}

/// Frames of server roles a VM must never play, sent from `mac` (and, for IPv4,
/// `src`): (what, frame).
fn server_role_frames(
    mac: [u8; 6],
    src: Ipv4Addr,
    victim: [u8; 6],
) -> Vec<(&'static str, Vec<u8>)> {
    let ll = link_local(mac);
    // Redirect (ICMPv6 137): "reach ff02::1's destination 2001:db8::1 through me".
    let mut redirect = vec![137, 0, 0, 0, 0, 0, 0, 0];
    redirect.extend(ll);
    redirect.extend([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    // DHCPv6 ADVERTISE (2), server port 547 to client port 546.
    let mut dhcpv6 = 547u16.to_be_bytes().to_vec();
    dhcpv6.extend(546u16.to_be_bytes());
    dhcpv6.extend(12u16.to_be_bytes());
    dhcpv6.extend([0, 0, 2, 0, 0, 1]);
    // IPv4 ICMP redirect (type 5, code 1: for the host), "use `src` as your gateway".
    let mut icmp = vec![5, 1, 0, 0];
    icmp.extend(src.octets());
    icmp.extend(&ipv4_udp(Ipv4Addr::BROADCAST, Ipv4Addr::new(192, 0, 2, 1), 1, 2, &[])[..28]);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut icmp_packet = ipv4_udp(src, Ipv4Addr::BROADCAST, 0, 0, &[]);
    icmp_packet.truncate(20);
    icmp_packet[9] = 1;
    icmp_packet[2..4].copy_from_slice(&(20 + icmp.len() as u16).to_be_bytes());
    icmp_packet[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(&icmp_packet);
    icmp_packet[10..12].copy_from_slice(&sum.to_be_bytes());
    icmp_packet.extend(icmp);
    // A DHCP OFFER for the victim, naming the sender router and name server.
    let mut offer = Message::new_with_id(
        0x0bad_0ffe,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::new(10, 66, 0, 9),
        src,
        Ipv4Addr::UNSPECIFIED,
        &victim,
    );
    offer.set_opcode(dhcproto::v4::Opcode::BootReply);
    for o in [
        DhcpOption::MessageType(MessageType::Offer),
        DhcpOption::ServerIdentifier(src),
        DhcpOption::Router(vec![src]),
        DhcpOption::DomainNameServer(vec![src]),
    ] {
        offer.opts_mut().insert(o);
    }
    vec![
        ("a Router Advertisement", router_advertisement(mac)),
        (
            "an ICMPv6 Redirect",
            ethernet(
                ipv6_multicast_mac(ALL_NODES),
                mac,
                ETH_IPV6,
                &ipv6(ll, ALL_NODES, 58, &redirect),
            ),
        ),
        (
            "a DHCPv6 ADVERTISE",
            ethernet(
                ipv6_multicast_mac(ALL_NODES),
                mac,
                ETH_IPV6,
                &ipv6(ll, ALL_NODES, 17, &dhcpv6),
            ),
        ),
        (
            "an ICMP redirect",
            ethernet(BROADCAST, mac, ETH_IPV4, &icmp_packet),
        ),
        (
            "a DHCP OFFER",
            ethernet(
                BROADCAST,
                mac,
                ETH_IPV4,
                &ipv4_udp(src, Ipv4Addr::BROADCAST, 67, 68, &offer.to_vec().unwrap()),
            ),
        ),
    ]
}

/// An ICMPv6 echo request from `mac` to all nodes: harmless IPv6 multicast.
fn ipv6_ping(mac: [u8; 6]) -> Vec<u8> {
    ethernet(
        ipv6_multicast_mac(ALL_NODES),
        mac,
        ETH_IPV6,
        &ipv6(link_local(mac), ALL_NODES, 58, &[128, 0, 0, 0, 0, 1, 0, 1]),
    )
}

/// Writes each server-role frame into `a` and asserts that `b` hears none of them, then
/// that it does hear harmless broadcasts and IPv6 multicast from `a` (so the silence is
/// the firewall's doing, not a deaf `b`).
fn server_roles_are_dropped(network: &str, a: &Tap, a_ip: Ipv4Addr, b: &Tap) {
    b.drain(Duration::from_millis(300));
    for (what, frame) in server_role_frames(a.mac, a_ip, b.mac) {
        a.send(&frame);
        let heard: Vec<Vec<u8>> = b
            .drain(NEVER)
            .into_iter()
            .filter(|f| is_from(f, a.mac))
            .collect();
        assert!(
            heard.is_empty(),
            "{network}: {what} from a VM reached another VM"
        );
    }
    let probe = ethernet(
        BROADCAST,
        a.mac,
        ETH_ARP,
        &arp(1, a.mac, Ipv4Addr::UNSPECIFIED, [0; 6], a_ip),
    );
    for (what, frame) in [("an ARP probe", probe), ("an IPv6 ping", ipv6_ping(a.mac))] {
        let mut heard = false;
        let deadline = Instant::now() + SOON;
        while !heard && Instant::now() < deadline {
            a.send(&frame);
            heard = b
                .drain(Duration::from_millis(300))
                .iter()
                .any(|f| is_from(f, a.mac) && f[12..14] == frame[12..14]);
        }
        assert!(
            heard,
            "{network}: control: {what} from a VM did not reach another VM"
        );
    }
}

/// IPv6 routes and addresses of the bridge learnt from Router Advertisements.
fn learnt_from_ra(b: &Broker, bridge: &str) -> String {
    b.ns.sh(&format!(
        "ip -6 route show dev {bridge} proto ra; ip -6 addr show dev {bridge} | grep 2001:db8 || true"
    ))
}

#[test]
fn a_vm_cannot_play_router_or_dhcp_server() {
    let b = Broker::start(opts(&[("open.json", r#"{"allow_spoofing":true}"#)]));
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let bridge = a.info.bridge.clone();
    let a = Tap::new(a);
    let victim = Tap::new(c.acquire("shared").unwrap());
    // The attacker has a lease, so its IPv4 frames pass anti-spoofing: only the server
    // role is refused.
    let a_ip = a.lease("attacker");
    // The host would act on a Router Advertisement if the bridge accepted them; make it
    // accept them here, so that a dropped RA shows as nothing learnt. 2, not 1: the
    // shared network switched IPv6 forwarding on, and a router ignores RAs unless 2.
    b.ns.sh(&format!(
        "sysctl -qw net.ipv6.conf.{bridge}.accept_ra=2 net.ipv6.conf.{bridge}.autoconf=1"
    ));
    server_roles_are_dropped("shared", &a, a_ip, &victim);
    assert_eq!(
        learnt_from_ra(&b, &bridge).trim(),
        "",
        "the host took the VM's RA"
    );

    // Also without anti-spoofing: a server role is never a VM's.
    let open = c.acquire("open").unwrap();
    let (onet, ogw) = (subnet_of(&open), ip(&open.info.gateway));
    let oa = Tap::new(open);
    let ovictim = Tap::new(c.acquire("open").unwrap());
    server_roles_are_dropped("open", &oa, other_host(onet, &[ogw]), &ovictim);

    // The control: the same RA from a port the broker did not make (not a TAP, so not
    // filtered) does reach the VM and the host, so the RA above was one they would take.
    netns::require("python3", "python3");
    let port = VethVm::new(&b, &bridge, "52:54:00:0e:0e:01");
    let ra = router_advertisement(parse_mac("52:54:00:0e:0e:01"));
    victim.drain(Duration::from_millis(300));
    port.ns.sh(&format!(
        "python3 -c 'import socket,sys; s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW); \
         s.bind((\"eth0\",0)); s.send(bytes.fromhex(sys.argv[1]))' {}",
        ra.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    b.wait_for("the host to learn the control RA", SOON, || {
        learnt_from_ra(&b, &bridge).contains("default")
    });
    assert!(
        victim.drain(NEVER).iter().any(|f| f == &ra),
        "the control RA did not reach the VM"
    );
}

/// Every kind of forged frame a VM on an anti-spoofing network may write into its TAP:
/// the TAP guard lets a neighbour VM (which hears broadcasts and multicast) hear none of
/// them, while it hears the honest frame of each family, so the silence is the guard's.
#[test]
fn the_tap_guard_drops_each_crafted_spoofing_frame() {
    let b = Broker::start(Options::default());
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let (net, gw) = (subnet_of(&a), ip(&a.info.gateway));
    let a = Tap::new(a);
    let victim = Tap::new(c.acquire("shared").unwrap());
    let a_ip = a.lease("attacker");
    let v_ip = victim.lease("victim");
    let forged_mac = [0x52, 0x54, 0x00, 0xba, 0xdb, 0xad];
    let forged_ip = other_host(net, &[gw, a_ip, v_ip]);
    let udp = |mac: [u8; 6], src: Ipv4Addr, tag: &str| {
        ethernet(
            BROADCAST,
            mac,
            ETH_IPV4,
            &ipv4_udp(src, Ipv4Addr::BROADCAST, 9, 9, tag.as_bytes()),
        )
    };
    // The same frame with a VLAN tag (`tpid`, VLAN 5) after the source MAC.
    let tagged = |tpid: u16, frame: Vec<u8>| {
        let mut f = frame[..12].to_vec();
        f.extend(tpid.to_be_bytes());
        f.extend(5u16.to_be_bytes());
        f.extend(&frame[12..]);
        f
    };
    let global: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let echo = [128, 0, 0, 0, 0, 1, 0, 1];
    let udp6 = [0, 9, 0, 9, 0, 12, 0, 0, b'u', b'd', b'p', b'6'];
    let forged: Vec<(&str, Vec<u8>)> = vec![
        (
            "a forged Ethernet source",
            udp(forged_mac, a_ip, "forged-mac"),
        ),
        ("a forged IPv4 source", udp(a.mac, forged_ip, "forged-ip")),
        (
            "IPv4 from 0.0.0.0 that is not DHCP",
            udp(a.mac, Ipv4Addr::UNSPECIFIED, "zero"),
        ),
        (
            "an ARP with a forged sender MAC",
            ethernet(
                BROADCAST,
                a.mac,
                ETH_ARP,
                &arp(1, forged_mac, a_ip, [0; 6], gw),
            ),
        ),
        (
            "an ARP with a forged sender IP",
            ethernet(
                BROADCAST,
                a.mac,
                ETH_ARP,
                &arp(1, a.mac, forged_ip, [0; 6], gw),
            ),
        ),
        (
            "an 802.1Q-tagged IPv4 broadcast",
            tagged(0x8100, udp(a.mac, a_ip, "dot1q")),
        ),
        (
            "an 802.1ad-tagged IPv4 broadcast",
            tagged(0x88a8, udp(a.mac, a_ip, "dot1ad")),
        ),
        (
            "IPv6 from a global address",
            ethernet(
                ipv6_multicast_mac(ALL_NODES),
                a.mac,
                ETH_IPV6,
                &ipv6(global, ALL_NODES, 58, &echo),
            ),
        ),
        (
            "IPv6 UDP from ::",
            ethernet(
                ipv6_multicast_mac(ALL_NODES),
                a.mac,
                ETH_IPV6,
                &ipv6([0; 16], ALL_NODES, 17, &udp6),
            ),
        ),
        (
            "a DHCP DISCOVER in another MAC's name",
            forged_dhcp_frame(
                &a,
                forged_mac,
                MessageType::Discover,
                Ipv4Addr::UNSPECIFIED,
                &[],
            )
            .1,
        ),
    ];
    victim.drain(Duration::from_millis(300));
    for (what, frame) in &forged {
        for _ in 0..3 {
            a.send(frame);
        }
        let heard = victim.drain(NEVER);
        assert!(
            !heard
                .iter()
                .any(|f| f == frame || f.ends_with(&frame[frame.len() - 8..])),
            "{what} from a VM reached another VM"
        );
    }
    let honest: Vec<(&str, Vec<u8>)> = vec![
        (
            "an IPv4 broadcast from the lease",
            udp(a.mac, a_ip, "honest-ipv4"),
        ),
        (
            "an ARP announcement of the lease",
            ethernet(
                BROADCAST,
                a.mac,
                ETH_ARP,
                &arp(1, a.mac, a_ip, [0; 6], a_ip),
            ),
        ),
        ("an IPv6 ping from link-local", ipv6_ping(a.mac)),
    ];
    for (what, frame) in &honest {
        let mut heard = false;
        let deadline = Instant::now() + SOON;
        while !heard && Instant::now() < deadline {
            a.send(frame);
            heard = victim
                .drain(Duration::from_millis(300))
                .iter()
                .any(|f| f == frame);
        }
        assert!(heard, "control: {what} from a VM did not reach another VM");
    }
}

/// A DHCP client message of `kind` written into `tap` as a client without an address
/// sends it (0.0.0.0:68 to broadcast:67, Ethernet source the TAP's own MAC), but naming
/// `chaddr` as the client.
fn forged_dhcp(
    tap: &Tap,
    chaddr: [u8; 6],
    kind: MessageType,
    ciaddr: Ipv4Addr,
    options: &[DhcpOption],
) -> u32 {
    let (xid, frame) = forged_dhcp_frame(tap, chaddr, kind, ciaddr, options);
    tap.send(&frame);
    xid
}

/// The frame [`forged_dhcp`] sends, and its transaction id.
fn forged_dhcp_frame(
    tap: &Tap,
    chaddr: [u8; 6],
    kind: MessageType,
    ciaddr: Ipv4Addr,
    options: &[DhcpOption],
) -> (u32, Vec<u8>) {
    let xid = 0xf0f0_0000 | COUNTER.fetch_add(1, Ordering::SeqCst);
    let frame = dhcp_frame_as(tap.mac, xid, chaddr, kind, ciaddr, options);
    (xid, frame)
}

/// Whether a DISCOVER written into `tap` in `chaddr`'s name, sent again every 200 ms, gets
/// an OFFER within `wait`.
fn offered(tap: &Tap, chaddr: [u8; 6], wait: Duration) -> bool {
    let (xid, frame) = forged_dhcp_frame(
        tap,
        chaddr,
        MessageType::Discover,
        Ipv4Addr::UNSPECIFIED,
        &[],
    );
    tap.ask(&frame, wait, |f| {
        dhcp_reply(f)
            .is_some_and(|m| m.xid() == xid && m.opts().msg_type() == Some(MessageType::Offer))
    })
}

#[test]
fn on_an_allow_spoofing_network_a_tap_gets_dhcp_for_a_bounded_number_of_macs() {
    let quota = vmnet_broker::backend::linux::firewall::DHCP_MACS_PER_TAP;
    let b = Broker::start(opts(&[("open.json", r#"{"allow_spoofing":true}"#)]));
    let c = b.client();
    let a = c.acquire("open").unwrap();
    let tap_name = a.info.interface.clone();
    let attacker = Tap::new(a);
    // Its own DHCP works (so the TAP is bound), and does not count.
    let own = attacker.lease("attacker");
    // The pool holds every invented MAC's offer for a while: unbounded, one VM would
    // exhaust it. Other machines' MACs are allowed here, up to the quota.
    let invented = |tap: u8, i: usize| [0x52, 0x54, 0x00, 0xee, tap, i as u8];
    for i in 0..quota {
        assert!(
            offered(&attacker, invented(1, i), SOON),
            "invented MAC {i} of {quota} got no offer"
        );
    }
    for i in quota..quota + 4 {
        assert!(
            !offered(&attacker, invented(1, i), NEVER),
            "invented MAC {i} got an offer, beyond the quota of {quota}"
        );
    }
    // A MAC within the quota still works, and so does the TAP's own.
    assert!(offered(&attacker, invented(1, 0), SOON));
    assert!(
        offered(&attacker, attacker.mac, SOON),
        "the attacker's own MAC lost DHCP"
    );
    assert_eq!(attacker.lease("attacker"), own);
    // The quota is per TAP: a fresh VM gets its lease, and its own quota.
    let fresh = Tap::new(c.acquire("open").unwrap());
    let got = fresh.lease("fresh");
    assert_ne!(got, own);
    assert!(
        offered(&fresh, invented(2, 0), SOON),
        "another TAP's first invented MAC got no offer"
    );
    // The TAP's quota set goes with its binding when it closes.
    let set = format!("dm-{tap_name}");
    assert!(b.ns.sh("nft list sets bridge").contains(&set));
    drop(attacker);
    b.wait_for("the closed TAP's quota set to go", SOON, || {
        !b.ns.sh("nft list sets bridge").contains(&set)
    });
}

/// Whether a DHCP reply with transaction `xid` arrives on `tap` within `wait`.
fn dhcp_reply_seen(tap: &Tap, xid: u32, wait: Duration) -> bool {
    tap.drain(wait)
        .iter()
        .any(|f| dhcp_reply(f).is_some_and(|m| m.xid() == xid))
}

#[test]
fn dhcp_messages_must_name_the_mac_of_their_tap() {
    let b = Broker::start(Options::default());
    let c = b.client();
    let v = c.acquire("shared").unwrap();
    let (gw, net) = (ip(&v.info.gateway), subnet_of(&v));
    let gw_mac = parse_mac(
        b.ns.sh(&format!("cat /sys/class/net/{}/address", v.info.bridge))
            .trim(),
    );
    let victim = Tap::new(v);
    let attacker = Tap::new(c.acquire("shared").unwrap());
    let leased = victim.lease("victim");
    // The attacker's own DHCP works (so its TAP is bound and heard): only lies fail.
    let own = attacker.lease("attacker");
    let victim_ok = |what: &str| {
        assert!(
            victim.gateway_answers(victim.mac, leased, gw, SOON),
            "after {what}: the victim lost its IPv4"
        );
        let answer = victim.dns_query((victim.mac, leased), (gw_mac, gw), "victim", SOON);
        assert!(
            answer.windows(4).any(|w| w == leased.octets()),
            "after {what}: the victim's name is gone: {answer:?}"
        );
        assert_eq!(
            guard_lease(&b, victim.mac),
            Some(leased),
            "after {what}: the victim's binding"
        );
    };
    victim_ok("its own lease");

    // A REQUEST (INIT-REBOOT) for another address in the victim's name: it would move the
    // victim's lease, and its binding, there. No ACK comes back: the server never saw it.
    let elsewhere = other_host(net, &[gw, leased, own]);
    let xid = forged_dhcp(
        &attacker,
        victim.mac,
        MessageType::Request,
        Ipv4Addr::UNSPECIFIED,
        &[DhcpOption::RequestedIpAddress(elsewhere)],
    );
    assert!(
        !dhcp_reply_seen(&attacker, xid, NEVER),
        "the forged REQUEST was answered"
    );
    victim_ok("a forged REQUEST");

    // A DECLINE and a RELEASE in the victim's name would end its lease and its name. The
    // attacker's own DISCOVER after them is answered once the server has read them. Each
    // is checked on its own: the server logs every decline and release it acts on, so a
    // forged one that got through shows in the log even if the victim's state happened
    // to survive it.
    for (kind, ciaddr, options, acted) in [
        (
            MessageType::Decline,
            Ipv4Addr::UNSPECIFIED,
            vec![DhcpOption::RequestedIpAddress(leased)],
            "declined",
        ),
        (
            MessageType::Release,
            leased,
            vec![DhcpOption::ServerIdentifier(gw)],
            "released",
        ),
    ] {
        forged_dhcp(&attacker, victim.mac, kind, ciaddr, &options);
        attacker
            .dhcp_exchange(
                0x5eed_f000 | COUNTER.fetch_add(1, Ordering::SeqCst),
                MessageType::Discover,
                &[],
                MessageType::Offer,
                SOON,
            )
            .expect("the attacker's own DISCOVER is answered");
        let acted_on = format!("{} {acted}", format_mac(victim.mac));
        assert!(
            !b.log().contains(&acted_on),
            "the server acted on a forged {kind:?}:\n{}",
            b.log()
        );
        victim_ok(&format!("a forged {kind:?}"));
    }

    // A DISCOVER for every address of the pool, each with an invented MAC: offers are held
    // for their MAC for a minute, so a fresh VM would get none.
    for i in 0..net.hosts().count() {
        let invented = [0x52, 0x54, 0x00, 0xee, (i >> 8) as u8, i as u8];
        forged_dhcp(
            &attacker,
            invented,
            MessageType::Discover,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
    }
    let fresh = Tap::new(c.acquire("shared").unwrap());
    let got = fresh.lease("fresh");
    assert!(net.contains(&got), "{got}");
    assert!(
        !b.log().contains("52:54:00:ee:"),
        "the server heard invented MACs:\n{}",
        b.log()
    );
    victim_ok("a flood of DISCOVERs");
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Sends a UDP datagram from `a` (leased `a_ip`) to `b_ip` through Ethernet `via` (`b`'s
/// MAC: bridged; the gateway's: routed by the host) until `b` receives it or `wait`
/// passes. `b` answers the host's ARP requests for `b_ip` meanwhile, as a VM would.
fn udp_reaches(a: (&Tap, Ipv4Addr), via: [u8; 6], b: (&Tap, Ipv4Addr), wait: Duration) -> bool {
    let ((a, a_ip), (b, b_ip)) = (a, b);
    let marker = format!("issue 10 {}", COUNTER.fetch_add(1, Ordering::SeqCst));
    let frame = ethernet(
        via,
        a.mac,
        ETH_IPV4,
        &ipv4_udp(a_ip, b_ip, 7777, 7777, marker.as_bytes()),
    );
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        a.send(&frame);
        let round = Instant::now() + Duration::from_millis(200);
        while let Some(left) = round.checked_duration_since(Instant::now()) {
            let Some(f) = b.recv(left) else { break };
            if udp_payload_to(&f, 7777) == Some(marker.as_bytes()) {
                return true;
            }
            let arp_request_for_b = f.len() >= 42
                && f[12..14] == ETH_ARP.to_be_bytes()
                && f[20..22] == [0, 1]
                && f[38..42] == b_ip.octets();
            if arp_request_for_b {
                let (sha, spa) = (
                    f[22..28].try_into().unwrap(),
                    <[u8; 4]>::try_from(&f[28..32]).unwrap(),
                );
                b.send(&ethernet(
                    sha,
                    b.mac,
                    ETH_ARP,
                    &arp(2, b.mac, b_ip, sha, spa.into()),
                ));
            }
        }
    }
    false
}

#[test]
fn vm_to_vm_ipv4_does_not_depend_on_bridge_nf_call_iptables() {
    let b = Broker::start(opts(&[
        ("iso.json", r#"{"isolation":true}"#),
        ("hostiso.json", r#"{"mode":"host","isolation":true}"#),
    ]));
    let c = b.client();
    let mut pairs = vec![];
    for (network, isolated) in [
        ("shared", false),
        ("host", false),
        ("iso", true),
        ("hostiso", true),
    ] {
        let a = c.acquire(network).unwrap();
        let gw_mac = parse_mac(
            b.ns.sh(&format!("cat /sys/class/net/{}/address", a.info.bridge))
                .trim(),
        );
        let a = Tap::new(a);
        let b = Tap::new(c.acquire(network).unwrap());
        let (a_ip, b_ip) = (a.lease("a"), b.lease("b"));
        pairs.push((network, isolated, gw_mac, (a, a_ip), (b, b_ip)));
    }
    // The shared networks switched forwarding on, so the host also routes between VMs.
    assert_eq!(b.ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
    // br_netfilter: 1 is the kernel's default (and Docker's); each setting in turn.
    for setting in ["1", "0", "1"] {
        b.ns.sh(&format!(
            "sysctl -qw net.bridge.bridge-nf-call-iptables={setting} \
             net.bridge.bridge-nf-call-ip6tables={setting}"
        ));
        for (network, isolated, gw_mac, (a, a_ip), (vb, b_ip)) in &pairs {
            let wait = if *isolated { NEVER } else { SOON };
            let bridged = udp_reaches((a, *a_ip), vb.mac, (vb, *b_ip), wait);
            let routed = udp_reaches((a, *a_ip), *gw_mac, (vb, *b_ip), wait);
            assert_eq!(
                (bridged, routed),
                (!isolated, !isolated),
                "{network} with bridge-nf-call-iptables={setting}: (bridged, routed through the host) VM to VM"
            );
        }
    }
}

/// The broker's networks give their guests the TAP guard's fast path: IPv4 unicast from
/// one leased guest to another's MAC arrives without the bridge forwarding any of it (a
/// bridge-family forward counter in the broker's namespace stays at 0), whatever
/// br_netfilter's setting; the same datagrams routed through the gateway do cross the
/// bridge (the counter is live). An isolated network's bindings have no fast path.
#[test]
fn guests_of_a_network_talk_past_the_bridge() {
    use vmnet_broker::backend::linux::firewall::guard::BIND_FAST;
    let b = Broker::start(opts(&[("iso.json", r#"{"isolation":true}"#)]));
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let gw_mac = parse_mac(
        b.ns.sh(&format!("cat /sys/class/net/{}/address", a.info.bridge))
            .trim(),
    );
    let a = Tap::new(a);
    let vb = Tap::new(c.acquire("shared").unwrap());
    let (a_ip, b_ip) = (a.lease("a"), vb.lease("b"));
    let iso = [
        Tap::new(c.acquire("iso").unwrap()),
        Tap::new(c.acquire("iso").unwrap()),
    ];
    b.wait_for("four bindings", SOON, || guard_bindings(&b).len() == 4);
    for (_, _, binding) in guard_bindings(&b) {
        let isolated = iso.iter().any(|t| t.mac == binding.mac);
        assert_eq!(
            binding.flags & BIND_FAST != 0,
            !isolated,
            "fast path of {:?} (isolated: {isolated})",
            binding.mac
        );
    }
    let to_b = format_mac(vb.mac);
    b.ns.sh(&format!(
        "nft add table bridge probe && \
         nft add chain bridge probe probe '{{ type filter hook forward priority 0; policy accept; }}' && \
         nft add rule bridge probe probe ether daddr {to_b} counter"
    ));
    let bridged = || netns::counter_packets(&b.ns.sh("nft list table bridge probe"));
    for setting in ["1", "0"] {
        b.ns.sh(&format!(
            "sysctl -qw net.bridge.bridge-nf-call-iptables={setting} \
             net.bridge.bridge-nf-call-ip6tables={setting}"
        ));
        assert!(
            udp_reaches((&a, a_ip), vb.mac, (&vb, b_ip), SOON),
            "bridge-nf-call={setting}: A to B"
        );
        assert_eq!(
            bridged(),
            0,
            "bridge-nf-call={setting}: guest-to-guest unicast crossed the bridge"
        );
    }
    // Routed by the host, through the gateway's MAC, they still arrive.
    assert!(udp_reaches((&a, a_ip), gw_mac, (&vb, b_ip), SOON));
    // Control: with the fast path cleared from A's binding, the bridge carries them.
    let a_mac = a.mac;
    in_broker_ns(&b, || async move {
        let (guard, _) = broker_guard().await.expect("the broker's guard");
        let (ifindex, mut binding) = guard
            .bindings()
            .unwrap()
            .into_iter()
            .find(|(_, binding)| binding.mac == a_mac)
            .expect("A's binding");
        binding.flags &= !BIND_FAST;
        guard.bind(ifindex, binding).unwrap();
    });
    assert!(udp_reaches((&a, a_ip), vb.mac, (&vb, b_ip), SOON));
    assert!(
        bridged() > 0,
        "without the fast path the datagrams should cross the bridge"
    );
}

#[test]
fn a_renewal_restores_a_flushed_lease_binding() {
    let b = Broker::start(Options::default());
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let gw = ip(&a.info.gateway);
    let gw_mac = parse_mac(
        b.ns.sh(&format!("cat /sys/class/net/{}/address", a.info.bridge))
            .trim(),
    );
    let tap = Tap::new(a);
    let leased = tap.lease("renewer");
    assert!(tap.gateway_answers(tap.mac, leased, gw, SOON));

    // The binding loses its lease, as if the map had lost it.
    in_broker_ns(&b, || async {
        let (guard, _) = broker_guard().await.expect("the broker's TAP guard");
        for (ifindex, mut binding) in guard.bindings().unwrap() {
            if binding.mac == tap.mac {
                binding.ip4 = [0; 4];
                guard.bind(ifindex, binding).unwrap();
            }
        }
    });
    assert!(
        !tap.gateway_answers(tap.mac, leased, gw, NEVER),
        "control: the flush cut the VM off"
    );
    // RENEWING (RFC 2131 4.3.2): unicast to the server from the leased address, ciaddr
    // set. The ACK goes to ciaddr, so the VM answers the host's ARP for it.
    let xid = 0x7e7e_0000 | COUNTER.fetch_add(1, Ordering::SeqCst);
    let mut renew = Message::new_with_id(
        xid,
        leased,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &tap.mac,
    );
    renew
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    let frame = ethernet(
        gw_mac,
        tap.mac,
        ETH_IPV4,
        &ipv4_udp(leased, gw, 68, 67, &renew.to_vec().unwrap()),
    );
    let mut acked = false;
    let deadline = Instant::now() + SOON;
    while !acked && Instant::now() < deadline {
        tap.send(&frame);
        for f in tap.drain(Duration::from_millis(300)) {
            let ack = dhcp_reply(&f)
                .is_some_and(|m| m.xid() == xid && m.opts().msg_type() == Some(MessageType::Ack));
            acked |= ack;
            if f.len() >= 42
                && f[12..14] == ETH_ARP.to_be_bytes()
                && f[20..22] == [0, 1]
                && f[38..42] == leased.octets()
            {
                let sha: [u8; 6] = f[22..28].try_into().unwrap();
                let spa = <[u8; 4]>::try_from(&f[28..32]).unwrap();
                tap.send(&ethernet(
                    sha,
                    tap.mac,
                    ETH_ARP,
                    &arp(2, tap.mac, leased, sha, spa.into()),
                ));
            }
        }
    }
    assert!(acked, "no ACK to the renewal:\n{}", b.log());
    assert!(
        tap.gateway_answers(tap.mac, leased, gw, SOON),
        "the renewal did not bind the lease again"
    );
}

// ---- restarts ------------------------------------------------------------------------

/// The shared network's entry in `status`, if it exists.
fn shared_status(b: &Broker) -> Option<vmnet_broker::protocol::NetworkStatus> {
    b.client()
        .status()
        .unwrap()
        .networks
        .into_iter()
        .find(|n| n.name == "shared")
}

#[test]
fn a_broker_restarted_after_sigkill_adopts_its_networks_with_taps_leases_and_names() {
    let quick = || Options {
        idle_timeout: 1.0,
        ..Default::default()
    };
    let mut b = Broker::start(quick());
    // The TAP is held by this process, a client of the broker: its connection dies with
    // the broker, the TAP does not.
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let (gw, net) = (ip(&a.info.gateway), subnet_of(&a));
    let (bridge, tap_name) = (a.info.bridge.clone(), a.info.interface.clone());
    let gw_mac = parse_mac(
        b.ns.sh(&format!("cat /sys/class/net/{bridge}/address"))
            .trim(),
    );
    let tap = Tap::new(a);
    let leased = tap.lease("tapvm");
    assert!(
        tap.gateway_answers(tap.mac, leased, gw, SOON),
        "{}",
        b.log()
    );
    // A second guest, on a veth, for a real DHCP client (udhcpc) and DNS client (dig).
    let vm = VethVm::new(&b, &bridge, "52:54:00:ad:00:01");
    let vm_ip = vm.lease(&b, &["-x", "hostname:vm1"])["ip"].clone();
    assert_ne!(vm_ip, leased.to_string());
    let state = b.state_dir.join("broker-state.json");
    b.wait_for("the TAP in the state file", SOON, || {
        std::fs::read_to_string(&state).is_ok_and(|s| s.contains(&tap_name))
    });

    b.signal(nix::sys::signal::Signal::SIGKILL);
    b.wait_exit(SOON).expect("SIGKILLed broker exits");
    drop(c);
    // No broker runs: the VM keeps its network, and its protection (the TAP guard is the
    // kernel's, not the broker's).
    let forged_mac = [0x52, 0x54, 0x00, 0xba, 0xdb, 0xad];
    assert!(
        tap.gateway_answers(tap.mac, leased, gw, SOON),
        "the VM lost its network with the broker"
    );
    assert!(
        !tap.gateway_answers(forged_mac, leased, gw, NEVER),
        "the VM's TAP went unguarded with the broker"
    );
    b.spawn(&quick());
    b.wait_for("the adoption", SOON, || {
        b.log().contains("network adopted from the previous broker")
    });
    // The new broker goes on with the same program and map, bindings included.
    b.wait_for("the TAP guard adopted", SOON, || {
        b.log()
            .contains("adopted the TAP guard a previous broker left")
    });
    // Nothing of theirs removed: the TAP is still a port of the same bridge.
    assert!(!b.log().contains("removed stale interface"), "{}", b.log());
    let master = b.ns.sh(&format!(
        "basename $(readlink /sys/class/net/{tap_name}/master)"
    ));
    assert_eq!(master.trim(), bridge);
    let status = shared_status(&b).expect("the network is listed");
    assert_eq!(status.subnet, net.to_string());
    assert_eq!(status.removal_in_seconds, None, "a VM holds its TAP");
    // Its binding is back: its own frames pass, forged ones are still dropped.
    assert!(
        tap.gateway_answers(tap.mac, leased, gw, SOON),
        "{}",
        b.log()
    );
    assert!(!tap.gateway_answers(forged_mac, leased, gw, NEVER));
    let forged_ip = other_host(net, &[gw, leased, ip(&vm_ip)]);
    assert!(!tap.gateway_answers(tap.mac, forged_ip, gw, NEVER));
    // The DNS names are still known, to the TAP's guest and the other one.
    let answer = tap.dns_query((tap.mac, leased), (gw_mac, gw), "vm1", SOON);
    assert!(
        answer.windows(4).any(|w| w == ip(&vm_ip).octets()),
        "vm1 resolves to {vm_ip}: {answer:?}"
    );
    assert_eq!(
        dig(&vm.ns, gw, &["tapvm.shared.vmnet", "A"]),
        Some(vec![leased.to_string()])
    );
    // The leases are kept: asked again, the veth guest keeps its address (a server that
    // forgot would give it the first free one, which the TAP's guest holds).
    assert_eq!(vm.lease(&b, &["-x", "hostname:vm1"])["ip"], vm_ip);

    // A new client joins the adopted network, with a TAP of its own.
    {
        let c = b.client();
        let n = c.acquire("shared").unwrap();
        assert_eq!(
            (n.info.bridge.as_str(), subnet_of(&n)),
            (bridge.as_str(), net)
        );
        assert_ne!(n.info.interface, tap_name);
    }
    // Once the new client is gone no removal is scheduled while the old client's TAP is
    // open (one would be scheduled at the release itself)...
    b.wait_for("the new client gone", SOON, || {
        b.count_in_log("network released") >= 1
    });
    let status = shared_status(&b).expect("kept");
    assert_eq!(status.removal_in_seconds, None, "{}", b.log());
    // ...and removed by the idle timeout once it is closed.
    drop(tap);
    b.wait_for("the idle removal", Duration::from_secs(20), || {
        !b.ns.links().contains(&bridge)
    });
    assert!(
        b.log().contains("idle timeout: removing network"),
        "{}",
        b.log()
    );
    // (Read as a broker reads it: the journal may still hold the network's earlier lines.)
    b.wait_for("the state file emptied", SOON, || {
        vmnet_broker::state::load(&b.state_dir)
            .ok()
            .flatten()
            .is_some_and(|s| s.networks.iter().all(|n| n.config.name != "shared"))
    });
}

/// An upgrade from a broker that wrote the state file as one document (format version 1)
/// keeps the running VMs: the new broker reads that file, adopts every TAP in it, and
/// replaces it with its journal layout on its first write.
#[test]
fn a_state_file_of_the_single_document_format_is_adopted_and_converted() {
    let mut b = Broker::start(Options::default());
    let state = b.state_dir.join("broker-state.json");
    let c = b.client();
    let held: Vec<_> = (0..3).map(|_| c.acquire("shared").unwrap()).collect();
    b.signal(nix::sys::signal::Signal::SIGKILL);
    b.wait_exit(SOON).expect("SIGKILLed broker exits");
    drop(c);
    // What the previous version wrote: the same records, version 1, pretty-printed.
    let recorded = vmnet_broker::state::load(&b.state_dir)
        .unwrap()
        .expect("a state file");
    let mut old = serde_json::to_value(&recorded).unwrap();
    old["version"] = vmnet_broker::state::VERSION_SINGLE.into();
    std::fs::write(&state, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
    b.spawn(&Options::default());
    let status = shared_status(&b).expect("the network is adopted");
    let mut names: Vec<_> = held.iter().map(|a| a.info.interface.clone()).collect();
    names.sort();
    let mut taps = status.taps.clone();
    taps.sort();
    assert_eq!(taps, names, "{}", b.log());
    assert!(!b.log().contains("ignoring the state file"), "{}", b.log());
    // Rewritten in the journal layout: a compact base on the first line.
    b.wait_for("the state file converted", SOON, || {
        std::fs::read_to_string(&state).is_ok_and(|s| s.starts_with("{\"version\":2"))
    });
    let converted = vmnet_broker::state::load(&b.state_dir).unwrap().unwrap();
    assert_eq!(converted.networks.len(), 1);
    assert_eq!(converted.networks[0].endpoints.len(), 3);
    drop(held);
}

/// An acquire is answered only once the state file records it (issue 11): every reply
/// finds its TAP in the file already, and a broker SIGKILLed the moment a reply is in
/// still adopts that TAP, bound to its MAC so its guest's frames pass. (Before, the file
/// was written after the reply and could lag one change: such a TAP was left unbound,
/// and a network created by that acquire removed as unknown.)
#[test]
fn an_acquire_is_on_disk_before_its_reply_and_survives_an_immediate_sigkill() {
    let mut b = Broker::start(Options::default());
    let state = b.state_dir.join("broker-state.json");
    let c = b.client();
    let mut held = vec![];
    for i in 0..10 {
        let a = c.acquire("shared").unwrap();
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        assert!(
            text.contains(&format!("\"{}\"", a.info.interface)),
            "acquire {i}: {} is not in the state file when its reply arrives:\n{text}",
            a.info.interface
        );
        held.push(a);
    }
    let last = c.acquire("shared").unwrap();
    b.signal(nix::sys::signal::Signal::SIGKILL);
    b.wait_exit(SOON).expect("SIGKILLed broker exits");
    drop(c);
    let (gw, name) = (ip(&last.info.gateway), last.info.interface.clone());
    b.spawn(&Options::default());
    let status = shared_status(&b).expect("the network is adopted");
    assert_eq!(status.taps.len(), 11, "{status:?}\n{}", b.log());
    assert!(status.taps.contains(&name), "{status:?}");
    assert!(!b.log().contains("removed stale interface"), "{}", b.log());
    // Bound again: its guest gets a lease and the gateway answers it.
    let tap = Tap::new(last);
    let leased = tap.lease("late");
    assert!(
        tap.gateway_answers(tap.mac, leased, gw, SOON),
        "{}",
        b.log()
    );
}
