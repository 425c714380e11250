//! Networks that span hosts over the kernel's VXLAN (issue 16): network namespaces stand in
//! for hosts, joined by a veth underlay through a bridge of their own (192.0.2.0/24), with a
//! real broker in each. TAP fds stand in for the VMs' NICs and speak frame by frame.
#![cfg(target_os = "linux")]

#[path = "support/frames.rs"]
mod frames;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;
#[path = "support/underlay.rs"]
mod underlay;

use dhcproto::v4::MessageType;
use frames::{BROADCAST, ETH_ARP, Tap, arp, dhcp_frame, dhcp_reply, dhcp_request, ethernet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use support::{Broker, Options};
use underlay::Underlay;
use vmnet_broker::client::Client;

/// How long a negative check waits for something that must not come.
const NEVER: Duration = Duration::from_millis(2000);
/// How long a positive check may take.
const SOON: Duration = Duration::from_secs(10);
const VNI: u32 = 4242;

fn underlay_ip(n: u8) -> String {
    format!("192.0.2.{n}")
}

/// Host `n`'s DHCP range: its own 40 addresses of 10.90.0.0/24.
fn range_of(n: u8) -> (Ipv4Addr, Ipv4Addr) {
    let start = 10 + 40 * n;
    (
        Ipv4Addr::new(10, 90, 0, start),
        Ipv4Addr::new(10, 90, 0, start + 39),
    )
}

/// The `lab` network file of host `n`: gateway 10.90.0.`n`, its own DHCP range (or no
/// DHCP), the other hosts as peers.
fn lab_file(n: u8, peers: &[u8], dhcp: bool) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|p| format!("\"{}\"", underlay_ip(*p)))
        .collect();
    let (start, end) = range_of(n);
    let dhcp = if dhcp {
        format!(r#""dhcp_range":{{"start":"{start}","end":"{end}"}}"#)
    } else {
        r#""dhcp":false"#.to_string()
    };
    format!(
        r#"{{"subnet":"10.90.0.{n}","mask":"255.255.255.0",{dhcp},"vxlan":{{"vni":{VNI},"local":"{}","peers":[{}]}}}}"#,
        underlay_ip(n),
        peers.join(",")
    )
}

fn start(ul: &Underlay, n: u8, peers: &[u8], dhcp: bool) -> Broker {
    Broker::start_in(
        ul.host(n),
        Options {
            idle_timeout: 1.0,
            files: vec![("lab.json".into(), lab_file(n, peers, dhcp))],
            // Every namespace shares this machine's /etc/machine-id.
            extra_args: vec!["--host-id".into(), format!("test-host-{n}")],
            ..Default::default()
        },
    )
}

/// A VM of one host: its broker connection, its TAP and the address it leased.
struct Vm {
    _client: Client,
    tap: Tap,
    ip: Ipv4Addr,
    interface: String,
    mtu: u32,
}

static XID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

fn xid() -> u32 {
    0x7e00_0000 | XID.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

/// Acquires `lab` on `b` and leases an address from that host's DHCP.
fn vm(b: &Broker, n: u8) -> Vm {
    let client = b.client();
    let a = client.acquire("lab").unwrap();
    let mac: vmnet_broker::mac::Mac = a.info.mac.parse().unwrap();
    let tap = Tap {
        fd: a.fd,
        mac: mac.octets(),
    };
    let ack = tap.dhcp(xid(), SOON);
    let (start, end) = range_of(n);
    let ip = ack.yiaddr();
    assert!(
        (start..=end).contains(&ip),
        "host {n} leased {ip}, outside its range {start}-{end}"
    );
    assert_eq!(
        frames::server_id(&ack),
        Some(Ipv4Addr::new(10, 90, 0, n)),
        "host {n}'s VM was served by another host"
    );
    assert_eq!(frames::mtu_option(&ack).map(u32::from), Some(a.info.mtu));
    Vm {
        _client: client,
        tap,
        ip,
        interface: a.info.interface,
        mtu: a.info.mtu,
    }
}

/// `from` asks for `to`'s address by broadcast ARP, `to` sees the request and answers by
/// unicast, `from` sees the answer: both directions of the overlay carry frames.
fn exchange(from: &Vm, to: &Vm) {
    let request = ethernet(
        BROADCAST,
        from.tap.mac,
        ETH_ARP,
        &arp(1, from.tap.mac, from.ip, [0; 6], to.ip),
    );
    let deadline = Instant::now() + SOON;
    let mut seen = false;
    while !seen && Instant::now() < deadline {
        from.tap.send(&request);
        seen = to.tap.wait_for(Duration::from_millis(200), |f| {
            frames::is_arp(f, 1, from.tap.mac, from.ip, to.ip)
        });
    }
    assert!(seen, "{} never saw {}'s ARP request", to.ip, from.ip);
    let reply = ethernet(
        from.tap.mac,
        to.tap.mac,
        ETH_ARP,
        &arp(2, to.tap.mac, to.ip, from.tap.mac, from.ip),
    );
    let deadline = Instant::now() + SOON;
    let mut back = false;
    while !back && Instant::now() < deadline {
        to.tap.send(&reply);
        back = from.tap.wait_for(Duration::from_millis(200), |f| {
            frames::is_arp(f, 2, to.tap.mac, to.ip, from.ip)
        });
    }
    assert!(back, "{} never saw {}'s ARP reply", from.ip, to.ip);
}

fn fdb(b: &Broker) -> String {
    b.ns.sh("bridge fdb show dev vmnx-lab")
}

fn wait_gone(b: &Broker, link: &str) {
    b.wait_for(&format!("{link} to go"), SOON, || {
        !b.ns.links().iter().any(|l| l == link)
    });
}

#[test]
fn two_hosts_share_one_network_over_vxlan() {
    netns::require("bridge", "iproute2");
    let ul = Underlay::new();
    let b1 = start(&ul, 1, &[2], true);
    let b2 = start(&ul, 2, &[1], true);
    let v1 = vm(&b1, 1);
    let v2 = vm(&b2, 2);

    // The VXLAN port: on the bridge, with the network's VNI, port and local address.
    let link = b1.ns.sh("ip -d link show vmnx-lab");
    for want in [
        &format!("vxlan id {VNI}") as &str,
        "local 192.0.2.1",
        "dstport 4789",
        "master vmnb-lab",
        "mtu 1450",
    ] {
        assert!(link.contains(want), "{want} missing: {link}");
    }
    // An L2 port: no IPv6 of its own (no link-local address, so no DAD or MLD sent to
    // the peers), and up.
    assert_eq!(
        b1.ns
            .sh("cat /proc/sys/net/ipv6/conf/vmnx-lab/disable_ipv6")
            .trim(),
        "1"
    );
    assert_eq!(b1.ns.sh("ip -6 addr show dev vmnx-lab").trim(), "");
    assert!(link.contains(",UP,"), "{link}");
    // Head-end replication to the other host.
    let entries = fdb(&b1);
    assert!(
        entries.contains("00:00:00:00:00:00 dst 192.0.2.2"),
        "{entries}"
    );
    // The underlay's MTU (1500) less the VXLAN overhead, everywhere.
    assert_eq!((v1.mtu, v2.mtu), (1450, 1450));
    for (b, v) in [(&b1, &v1), (&b2, &v2)] {
        for dev in ["vmnb-lab", &v.interface] {
            let mtu = b.ns.sh(&format!("cat /sys/class/net/{dev}/mtu"));
            assert_eq!(mtu.trim(), "1450", "{dev}");
        }
    }
    // Two hosts never suggest the same MAC, and their bridges differ too.
    assert_ne!(v1.tap.mac, v2.tap.mac);
    let bridge_mac = |b: &Broker| b.ns.sh("cat /sys/class/net/vmnb-lab/address");
    assert_ne!(bridge_mac(&b1), bridge_mac(&b2));

    exchange(&v1, &v2);
    exchange(&v2, &v1);

    // `status` and `show` name the overlay.
    let status = b1.cli(&["status"]).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!("vmnx-lab (vni {VNI}, port 4789, peers 192.0.2.2)")),
        "{status}"
    );
    let show = b1.cli(&["show", "lab"]).output().unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains("overlay:") && show.contains("peers 192.0.2.2"),
        "{show}"
    );
    let list = b1.cli(&["list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains(&format!("vxlan vni {VNI}")), "{list}");
}

#[test]
fn dhcp_requests_over_the_overlay_are_not_answered_by_the_remote_broker() {
    let ul = Underlay::new();
    // Host 1 serves no DHCP: an OFFER to its VM could only come from host 2.
    let b1 = start(&ul, 1, &[2], false);
    let b2 = start(&ul, 2, &[1], true);
    let c1 = b1.client();
    let a1 = c1.acquire("lab").unwrap();
    let mac: vmnet_broker::mac::Mac = a1.info.mac.parse().unwrap();
    let t1 = Tap {
        fd: a1.fd,
        mac: mac.octets(),
    };
    let v2 = vm(&b2, 2);

    let discover = |xid| dhcp_frame(t1.mac, xid, MessageType::Discover, &[]);
    let offered = |xid: u32| move |f: &[u8]| dhcp_reply(f).is_some_and(|m| m.xid() == xid);
    // The DISCOVER crosses the overlay (host 2's VM sees it), and is not answered.
    let x = xid();
    let deadline = Instant::now() + SOON;
    let mut crossed = false;
    while !crossed && Instant::now() < deadline {
        t1.send(&discover(x));
        crossed = v2.tap.wait_for(Duration::from_millis(200), |f| {
            dhcp_request(f).is_some_and(|m| m.xid() == x)
        });
    }
    assert!(crossed, "host 1's DISCOVER never reached host 2");
    t1.send(&discover(x));
    assert!(
        !t1.wait_for(NEVER, offered(x)),
        "host 2 answered a VM of host 1:\n{}",
        b2.log()
    );
    // Without the overlay's rules host 2 would answer: the rules are what keeps it out.
    for chain in ["overlay-in-lab", "overlay-out-lab"] {
        b2.ns
            .sh(&format!("nft flush chain bridge vmnet_broker {chain}"));
    }
    let x = xid();
    assert!(
        t1.ask(&discover(x), SOON, offered(x)),
        "host 2 did not answer even without the overlay's rules"
    );
}

#[test]
fn a_third_host_joins_by_config_and_one_leaving_leaves_the_others_working() {
    netns::require("bridge", "iproute2");
    let ul = Underlay::new();
    let b1 = start(&ul, 1, &[2], true);
    let b2 = start(&ul, 2, &[1], true);
    {
        let (v1, v2) = (vm(&b1, 1), vm(&b2, 2));
        exchange(&v1, &v2);
    }
    // Host 3 joins: the others add it to their files; their networks, idle now, go, and
    // are made again from the new files at the next acquire.
    for (b, n, peers) in [(&b1, 1, [2, 3]), (&b2, 2, [1, 3])] {
        std::fs::write(b.config_dir.join("lab.json"), lab_file(n, &peers, true)).unwrap();
        wait_gone(b, "vmnx-lab");
    }
    let b3 = start(&ul, 3, &[1, 2], true);
    let (v1, v3) = (vm(&b1, 1), vm(&b3, 3));
    let v2 = vm(&b2, 2);
    for peer in ["192.0.2.2", "192.0.2.3"] {
        let entries = fdb(&b1);
        assert!(
            entries.contains(&format!("00:00:00:00:00:00 dst {peer}")),
            "{entries}"
        );
    }
    exchange(&v1, &v3);
    exchange(&v3, &v2);
    exchange(&v2, &v1);

    // Host 2 leaves: its network goes with its last VM; hosts 1 and 3 go on.
    drop(v2);
    wait_gone(&b2, "vmnx-lab");
    wait_gone(&b2, "vmnb-lab");
    exchange(&v1, &v3);
    exchange(&v3, &v1);
}

#[test]
fn a_restarted_broker_keeps_the_overlay() {
    let ul = Underlay::new();
    let mut b1 = start(&ul, 1, &[2], true);
    let b2 = start(&ul, 2, &[1], true);
    let c1 = b1.client();
    let a1 = c1.acquire("lab").unwrap();
    let index = b1.ns.sh("cat /sys/class/net/vmnx-lab/ifindex");
    let state = b1.state_dir.join("broker-state.json");
    b1.wait_for("the network in the state file", SOON, || {
        std::fs::read_to_string(&state).is_ok_and(|s| s.contains(&a1.info.interface))
    });
    b1.signal(nix::sys::signal::Signal::SIGKILL);
    b1.wait_exit(SOON).expect("SIGKILLed broker exits");
    drop(c1);
    b1.spawn(&Options {
        idle_timeout: 1.0,
        extra_args: vec!["--host-id".into(), "test-host-1".into()],
        ..Default::default()
    });
    b1.wait_for("the adoption", SOON, || {
        b1.log()
            .contains("network adopted from the previous broker")
    });
    // The same device, still a port of the bridge, with its peer, and still guarded.
    assert_eq!(b1.ns.sh("cat /sys/class/net/vmnx-lab/ifindex"), index);
    let master = b1
        .ns
        .sh("basename $(readlink /sys/class/net/vmnx-lab/master)");
    assert_eq!(master.trim(), "vmnb-lab");
    assert!(fdb(&b1).contains("dst 192.0.2.2"), "{}", fdb(&b1));
    let chain = b1
        .ns
        .sh("nft list chain bridge vmnet_broker overlay-in-lab");
    assert!(chain.contains("vmnx-lab"), "{chain}");
    // The VM of the adopted network still reaches the other host.
    let mac: vmnet_broker::mac::Mac = a1.info.mac.parse().unwrap();
    let t1 = Tap {
        fd: a1.fd,
        mac: mac.octets(),
    };
    let ack = t1.dhcp(xid(), SOON);
    let v1 = Vm {
        _client: b1.client(),
        tap: t1,
        ip: ack.yiaddr(),
        interface: a1.info.interface.clone(),
        mtu: a1.info.mtu,
    };
    let v2 = vm(&b2, 2);
    exchange(&v1, &v2);
    exchange(&v2, &v1);
    // And still past host 1's bridge: the port keeps its program and binding across the
    // restart, the adopted guard's (the maps the adopted TAP's program uses).
    let tc = b1.ns.sh("tc filter show dev vmnx-lab ingress");
    assert!(tc.contains("overlay_ingress"), "{tc}");
    count_bridged(&b1, 7003);
    assert!(unicast(&v1, &v2, 7003), "host 2's guest got nothing");
    assert!(unicast(&v2, &v1, 7003), "host 1's guest got nothing");
    assert_eq!(bridged(&b1), 0);
    assert!(b1.log().contains("adopted the TAP guard"), "{}", b1.log());
}

#[test]
fn a_leftover_overlay_of_a_crashed_broker_is_removed_at_start() {
    let ul = Underlay::new();
    let mut b1 = start(&ul, 1, &[2], true);
    let c1 = b1.client();
    let a1 = c1.acquire("lab").unwrap();
    b1.signal(nix::sys::signal::Signal::SIGKILL);
    b1.wait_exit(SOON).expect("SIGKILLed broker exits");
    drop((c1, a1));
    // No record of what it made: the next broker finds the device by its alias only.
    std::fs::remove_file(b1.state_dir.join("broker-state.json")).unwrap();
    b1.spawn(&Options::default());
    wait_gone(&b1, "vmnx-lab");
    assert!(
        b1.log()
            .contains("removed stale interface interface=vmnx-lab"),
        "{}",
        b1.log()
    );
    // And the network can be made again.
    let c1 = b1.client();
    c1.acquire("lab").unwrap();
    assert!(fdb(&b1).contains("dst 192.0.2.2"), "{}", fdb(&b1));
}

#[test]
fn check_config_refuses_an_overlay_without_a_fixed_subnet() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("lab.json"),
        format!(r#"{{"vxlan":{{"vni":{VNI},"local":"192.0.2.1","peers":["192.0.2.2"]}}}}"#),
    )
    .unwrap();
    std::fs::write(dir.path().join("ok.json"), lab_file(1, &[2], true)).unwrap();
    let out = std::process::Command::new(support::BIN)
        .args(["check-config", "--config-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("vxlan needs a fixed \"subnet\""), "{text}");
}

#[test]
fn vxlan_packets_from_a_host_that_is_no_peer_are_dropped() {
    let ul = Underlay::new();
    let b1 = start(&ul, 1, &[2], true);
    let v1 = vm(&b1, 1);
    // Host 3 is not among host 1's peers, yet speaks the overlay's VNI and port to it.
    let h3 = ul.host(3);
    h3.ip(&[
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        &VNI.to_string(),
        "local",
        "192.0.2.3",
        "remote",
        "192.0.2.1",
        "dstport",
        "4789",
    ]);
    h3.ip(&["addr", "add", "10.90.0.203/24", "dev", "vx0"]);
    h3.ip(&["link", "set", "vx0", "up"]);
    // Its broadcasts, every 100 ms for as long as the test looks.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (stop, path) = (stop.clone(), h3.path());
        std::thread::spawn(move || {
            netns::enter(&path);
            let socket = std::net::UdpSocket::bind("10.90.0.203:0").unwrap();
            socket.set_broadcast(true).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = socket.send_to(b"intruder", "10.90.0.255:9");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let arrives = |wait| {
        v1.tap.wait_for(wait, |f| {
            frames::udp_payload_to(f, 9) == Some(&b"intruder"[..])
        })
    };
    let dropped = !arrives(NEVER);
    // Without the chain, the kernel takes them: the chain is what keeps them out.
    b1.ns
        .sh("nft flush chain inet vmnet_broker overlay-udp-lab");
    let without = arrives(SOON);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();
    assert!(dropped, "a frame of a host that is no peer reached the VM");
    assert!(without, "nothing came even without the chain");
}

#[test]
fn an_ipv6_underlay_leaves_70_bytes_and_carries_frames() {
    netns::require("bridge", "iproute2");
    let ul = Underlay::new();
    let start6 = |n: u8, peer: u8| {
        let ns = ul.host(n);
        ns.ip(&[
            "addr",
            "add",
            &format!("2001:db8::{n}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let (start, end) = range_of(n);
        let file = format!(
            r#"{{"subnet":"10.90.0.{n}","mask":"255.255.255.0",
                "dhcp_range":{{"start":"{start}","end":"{end}"}},
                "vxlan":{{"vni":{VNI},"local":"2001:db8::{n}","peers":["2001:db8::{peer}"]}}}}"#
        );
        Broker::start_in(
            ns,
            Options {
                files: vec![("lab.json".into(), file)],
                extra_args: vec!["--host-id".into(), format!("v6-host-{n}")],
                ..Default::default()
            },
        )
    };
    let (b1, b2) = (start6(1, 2), start6(2, 1));
    let (v1, v2) = (vm(&b1, 1), vm(&b2, 2));
    assert_eq!((v1.mtu, v2.mtu), (1430, 1430), "1500 less 70");
    assert!(
        fdb(&b1).contains("00:00:00:00:00:00 dst 2001:db8::2"),
        "{}",
        fdb(&b1)
    );
    let chain = b1.ns.sh("nft list chain inet vmnet_broker overlay-udp-lab");
    assert!(chain.contains("ip6 saddr != 2001:db8::2 drop"), "{chain}");
    exchange(&v1, &v2);
    exchange(&v2, &v1);
}

#[test]
fn a_reload_gives_live_networks_a_new_peer_and_takes_one_away() {
    netns::require("bridge", "iproute2");
    let ul = Underlay::new();
    let b1 = start(&ul, 1, &[2], true);
    let b2 = start(&ul, 2, &[1], true);
    let (v1, v2) = (vm(&b1, 1), vm(&b2, 2));
    let index = |b: &Broker| b.ns.sh("cat /sys/class/net/vmnx-lab/ifindex");
    let before = (index(&b1), index(&b2));
    // Host 3 joins; the others learn of it by a reload, with their VMs running.
    let b3 = start(&ul, 3, &[1, 2], true);
    let v3 = vm(&b3, 3);
    for (b, n, peers) in [(&b1, 1, [2, 3]), (&b2, 2, [1, 3])] {
        std::fs::write(b.config_dir.join("lab.json"), lab_file(n, &peers, true)).unwrap();
        b.signal(nix::sys::signal::Signal::SIGHUP);
        b.wait_for("the new peer", SOON, || {
            fdb(b).contains("00:00:00:00:00:00 dst 192.0.2.3")
        });
        assert!(
            b.log()
                .contains("overlay peers changed, applied to the active network"),
            "{}",
            b.log()
        );
    }
    assert_eq!((index(&b1), index(&b2)), before, "the same devices");
    // Broadcasts of hosts 1 and 2 reach host 3 now.
    exchange(&v1, &v3);
    exchange(&v2, &v3);
    exchange(&v1, &v2);
    // The state file has it, for a restarted broker.
    b1.wait_for("the new peer in the state file", SOON, || {
        std::fs::read_to_string(b1.state_dir.join("broker-state.json"))
            .is_ok_and(|s| s.contains("192.0.2.3"))
    });

    // Host 2 leaves host 1's file: its entry and its place in the guard go.
    std::fs::write(b1.config_dir.join("lab.json"), lab_file(1, &[3], true)).unwrap();
    b1.signal(nix::sys::signal::Signal::SIGHUP);
    // (Entries the kernel learnt for host 2's VMs stay until they age out.)
    b1.wait_for("the peer gone", SOON, || {
        !fdb(&b1).contains("00:00:00:00:00:00 dst 192.0.2.2")
    });
    let chain = b1.ns.sh("nft list chain inet vmnet_broker overlay-udp-lab");
    assert!(
        chain.contains("192.0.2.3") && !chain.contains("192.0.2.2"),
        "{chain}"
    );
    exchange(&v1, &v3);
}

/// Sends UDP datagrams to port `port` from `from` to `to` (unicast, to its MAC) until
/// `to` receives one: whether it did within [`SOON`].
fn unicast(from: &Vm, to: &Vm, port: u16) -> bool {
    let frame = ethernet(
        to.tap.mac,
        from.tap.mac,
        frames::ETH_IPV4,
        &frames::ipv4_udp(from.ip, to.ip, port, port, b"overlay"),
    );
    let deadline = Instant::now() + SOON;
    while Instant::now() < deadline {
        from.tap.send(&frame);
        if to.tap.wait_for(Duration::from_millis(200), |f| {
            frames::udp_payload_to(f, port) == Some(&b"overlay"[..])
        }) {
            return true;
        }
    }
    false
}

/// Counts, on `b`'s bridge (hook forward), frames to UDP port `port`.
fn count_bridged(b: &Broker, port: u16) {
    b.ns.sh(&format!(
        "nft add table bridge probe && \
         nft add chain bridge probe seen '{{ type filter hook forward priority 0; policy accept; }}' && \
         nft add rule bridge probe seen udp dport {port} counter"
    ));
}

fn bridged(b: &Broker) -> u64 {
    netns::counter_packets(&b.ns.sh("nft list chain bridge probe seen"))
}

#[test]
fn unicast_between_guests_of_two_hosts_skips_both_bridges() {
    netns::require("bridge", "iproute2");
    netns::require("nft", "nftables");
    netns::require("tc", "iproute2");
    let ul = Underlay::new();
    let b1 = start(&ul, 1, &[2], true);
    let b2 = start(&ul, 2, &[1], true);
    let v1 = vm(&b1, 1);
    let v2 = vm(&b2, 2);
    // Each host's VXLAN port carries the overlay's program.
    for b in [&b1, &b2] {
        let tc = b.ns.sh("tc filter show dev vmnx-lab ingress");
        assert!(tc.contains("overlay_ingress"), "{tc}");
    }
    // ARP both ways: each host sees the other's guest arrive through its VXLAN port.
    exchange(&v1, &v2);
    exchange(&v2, &v1);
    for b in [&b1, &b2] {
        count_bridged(b, 7001);
    }
    // Unicast both ways arrives and crosses neither bridge: the guard hands it from the
    // TAP to the VXLAN port on one host, and from the VXLAN port to the TAP on the other.
    assert!(unicast(&v1, &v2, 7001), "host 2's guest got nothing");
    assert!(unicast(&v2, &v1, 7001), "host 1's guest got nothing");
    assert_eq!((bridged(&b1), bridged(&b2)), (0, 0));

    // Without the program on host 2's port, the same frames cross host 2's bridge (the
    // probe does count), and still none crosses host 1's: the sending side alone.
    b2.ns.sh("tc filter del dev vmnx-lab ingress");
    assert!(unicast(&v1, &v2, 7001), "host 2's guest got nothing");
    assert!(bridged(&b2) > 0, "the probe counts nothing");
    assert_eq!(bridged(&b1), 0);
}

/// A VXLAN packet from this namespace to `to`:4789 carrying `frame` with VNI [`VNI`].
fn send_vxlan(ns: &netns::Netns, to: &str, frame: &[u8]) {
    let mut packet = vec![0x08, 0, 0, 0];
    packet.extend(&VNI.to_be_bytes()[1..]);
    packet.push(0);
    packet.extend_from_slice(frame);
    let to = format!("{to}:4789");
    ns.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(&packet, &to).unwrap();
    });
}

#[test]
fn a_peer_claiming_local_macs_diverts_nothing_from_the_fast_paths() {
    netns::require("bridge", "iproute2");
    netns::require("nft", "nftables");
    let ul = Underlay::new();
    let b1 = start(&ul, 1, &[2], true);
    let b2 = start(&ul, 2, &[1], true);
    let a = vm(&b1, 1);
    let c = vm(&b1, 1);
    let remote = vm(&b2, 2);
    exchange(&a, &remote);
    let gateway_mac = frames::parse_mac(b1.ns.sh("cat /sys/class/net/vmnb-lab/address").trim());
    // Host 2 (a peer: its packets pass the source check) sends frames through the overlay
    // from host 1's gateway MAC and from host 1's guest `c`'s MAC.
    for src in [gateway_mac, c.tap.mac] {
        let frame = ethernet(
            BROADCAST,
            src,
            frames::ETH_IPV4,
            &frames::ipv4_udp(remote.ip, Ipv4Addr::BROADCAST, 9, 9, b"claim"),
        );
        for _ in 0..3 {
            send_vxlan(&b2.ns, "192.0.2.1", &frame);
        }
    }
    // They did arrive: host 1 floods the broadcasts to its guests.
    assert!(
        a.tap.wait_for(SOON, |f| frames::udp_payload_to(f, 9)
            == Some(&b"claim"[..])),
        "the frames of the overlay never arrived"
    );
    // `a` still reaches `c` (guest to guest), and the gateway still answers `a`'s ARP.
    assert!(unicast(&a, &c, 7002), "c got nothing from a");
    let gateway = Ipv4Addr::new(10, 90, 0, 1);
    let ask = ethernet(
        gateway_mac,
        a.tap.mac,
        ETH_ARP,
        &arp(1, a.tap.mac, a.ip, [0; 6], gateway),
    );
    let deadline = Instant::now() + SOON;
    let mut answered = false;
    while !answered && Instant::now() < deadline {
        a.tap.send(&ask);
        answered = a.tap.wait_for(Duration::from_millis(200), |f| {
            frames::is_arp(f, 2, gateway_mac, gateway, a.ip)
        });
    }
    assert!(answered, "the gateway no longer answers its guest");
}
