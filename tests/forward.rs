//! Port forwards (issue 14) with the real broker in a namespace of its own: static ones
//! from a network file and dynamic ones a client asks for, reaching a listener in a
//! "VM" namespace behind an acquired TAP (tests/support/tap_vm.rs) from another
//! namespace (another machine, over a veth) and from the broker's own namespace (the
//! host's own address and loopback).
//!
//! Needs root, `ip`, `nft`, `setpriv` and busybox.
#![cfg(target_os = "linux")]

#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;
#[path = "support/tap_vm.rs"]
mod tap_vm;

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use support::{Broker, Netns, Options, options_with_files as files};
use tap_vm::TapVm;

const DEADLINE: Duration = Duration::from_secs(30);

/// "Another machine": a namespace joined to the broker's by a veth, the broker's end
/// 10.200.0.1/24 and fd20::1/64 (`uplink`), the other 10.200.0.2/24 and fd20::2/64.
fn outside(b: &Broker) -> Netns {
    let out = Netns::new("outside");
    b.ns.ip(&[
        "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", &out.name,
    ]);
    b.ns.ip(&["addr", "add", "10.200.0.1/24", "dev", "uplink"]);
    b.ns.ip(&["addr", "add", "fd20::1/64", "dev", "uplink", "nodad"]);
    b.ns.ip(&["link", "set", "uplink", "up"]);
    out.ip(&["addr", "add", "10.200.0.2/24", "dev", "eth0"]);
    out.ip(&["addr", "add", "fd20::2/64", "dev", "eth0", "nodad"]);
    out.ip(&["link", "set", "eth0", "up"]);
    out
}

/// Gives the guest its SLAAC (EUI-64) address in `prefix` at once (no duplicate address
/// detection to wait for); the address.
fn slaac(vm: &TapVm, prefix: &str, mac: &str) -> Ipv6Addr {
    let ip = vmnet_broker::ula::eui64_address(
        prefix.parse().unwrap(),
        mac.parse::<vmnet_broker::mac::Mac>().unwrap().octets(),
    );
    vm.ns
        .sh(&format!("ip -6 addr replace {ip}/64 dev eth0 nodad"));
    ip
}

/// A TCP server in the VM's namespace on `port`, over IPv4 and IPv6: answers every
/// connection with `<name> <peer address>` and closes it.
struct Guest {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Guest {
    fn serve(vm: &TapVm, port: u16, name: &'static str) -> Guest {
        let listener = vm
            .ns
            // [::] takes IPv4 too (bindv6only is 0 in a new namespace).
            .run(|| TcpListener::bind(("::", port)).expect("bind in the VM"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut c, peer)) => {
                        let peer = peer.ip().to_canonical();
                        let _ = c.write_all(format!("{name} {peer}").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Guest {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a TCP connection to `to`, made from namespace `ns`, reads until the end; `Err`
/// when it cannot connect or reads nothing.
fn fetch(ns: &Netns, to: SocketAddr) -> Result<String, String> {
    ns.run(|| {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect {to}: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text)
            .map_err(|e| format!("read {to}: {e}"))?;
        if text.is_empty() {
            Err(format!("{to}: closed without a word"))
        } else {
            Ok(text)
        }
    })
}

/// Waits until `fetch` from `ns` to `to` answers `want` first (rules and leases take a
/// moment to land); the whole answer.
fn reaches(b: &Broker, ns: &Netns, to: &str, want: &str) -> String {
    let to: SocketAddr = to.parse().unwrap();
    let last = std::cell::RefCell::new(String::new());
    support::wait_until(
        &format!("{to} from {} to answer {want:?}", ns.name),
        DEADLINE,
        || {
            format!(
                "last: {}\n{}\n{}",
                last.borrow(),
                b.ns.sh("nft list table inet vmnet_broker; ip -br a; ip r"),
                b.log()
            )
        },
        || {
            let r = fetch(ns, to);
            let ok = matches!(&r, Ok(t) if t.starts_with(want));
            *last.borrow_mut() = r.unwrap_or_else(|e| e);
            ok
        },
    );
    last.into_inner()
}

/// The broker's inet table, as nft lists it.
fn rules(b: &Broker) -> String {
    b.ns.sh("nft list table inet vmnet_broker")
}

fn static_file(mode: &str, subnet: &str, guest: &str, mac: &str, port: u16) -> String {
    format!(
        r#"{{"mode": "{mode}", "subnet": "{subnet}",
            "dhcp_reservations": [{{"mac": "{mac}", "ip": "{guest}"}}],
            "port_forwarding_rules": [{{"protocol": "tcp", "external_port": {port},
                "internal_address": "{guest}", "internal_port": 22}}]}}"#
    )
}

#[test]
fn static_forwards_reach_the_guest_from_outside_and_from_the_host() {
    let (host_mac, shared_mac) = ("52:54:00:aa:00:01", "52:54:00:aa:00:02");
    let b = Broker::start(files(&[
        (
            "fwdhost.json",
            static_file("host", "10.99.0.1", "10.99.0.50", host_mac, 8022),
        ),
        (
            "fwdshared.json",
            static_file("shared", "10.98.0.1", "10.98.0.60", shared_mac, 8023),
        ),
    ]));
    let out = outside(&b);
    let c = b.client();
    let mut guests = vec![];
    for (net, mac, ip, port, name) in [
        ("fwdhost", host_mac, "10.99.0.50", 8022, "host-guest"),
        ("fwdshared", shared_mac, "10.98.0.60", 8023, "shared-guest"),
    ] {
        let a = c.acquire_with_mac(net, Some(mac.parse().unwrap())).unwrap();
        let vm = TapVm::new(a.fd, mac);
        assert_eq!(vm.dhcp(name), ip);
        // udhcpc ran without a script: the address is the test's to set.
        vm.ns.sh(&format!("ip addr add {ip}/24 dev eth0"));
        let server = Guest::serve(&vm, 22, name);
        // Another machine, to the host's address on the uplink: translated, and the
        // guest sees the gateway as the peer (the forward's source NAT).
        // The guest is up: the host reaches it directly.
        reaches(&b, &b.ns, &format!("{ip}:22"), name);
        let gateway = if net == "fwdhost" {
            "10.99.0.1"
        } else {
            "10.98.0.1"
        };
        let text = reaches(&b, &out, &format!("10.200.0.1:{port}"), name);
        assert_eq!(text, format!("{name} {gateway}"));
        // The host itself: its own address, and loopback (relayed by the broker).
        reaches(&b, &b.ns, &format!("10.200.0.1:{port}"), name);
        reaches(&b, &b.ns, &format!("127.0.0.1:{port}"), name);
        reaches(&b, &b.ns, &format!("[::1]:{port}"), name);
        // The gateway is one of the host's addresses too.
        reaches(&b, &b.ns, &format!("{gateway}:{port}"), name);
        guests.push((vm, server));
    }
    // Nothing else of the host network is reachable from outside: port 22 itself is not
    // forwarded.
    out.sh("ip route add 10.99.0.0/24 via 10.200.0.1");
    assert!(
        fetch(&out, "10.99.0.50:22".parse().unwrap()).is_err(),
        "a host network forwards only what a rule forwards"
    );
    // The port is the broker's while the network exists.
    let taken = b.ns.run(|| TcpListener::bind(("0.0.0.0", 8022)));
    assert!(taken.is_err(), "the forward holds its port");
    drop(c);
    drop(guests);
}

#[test]
fn static_ipv6_forwards_reach_the_guest_from_outside_and_from_the_host() {
    let mac = "52:54:00:aa:00:03";
    let prefix = "fd31:0:0:1::/64";
    let guest6 = vmnet_broker::ula::eui64_address(
        prefix.parse().unwrap(),
        mac.parse::<vmnet_broker::mac::Mac>().unwrap().octets(),
    );
    // A `host` network: it forwards nothing but what a rule forwards. One rule to the
    // guest's IPv6 address, one to its IPv4 address.
    let file = format!(
        r#"{{"mode": "host", "subnet": "10.97.0.1", "ipv6_prefix": "fd31:0:0:1::",
            "dhcp_reservations": [{{"mac": "{mac}", "ip": "10.97.0.70"}}],
            "port_forwarding_rules": [
              {{"protocol": "tcp", "external_port": 8024, "internal_address": "{guest6}", "internal_port": 22}},
              {{"protocol": "tcp", "external_port": 8025, "internal_address": "10.97.0.70", "internal_port": 22}}]}}"#
    );
    let b = Broker::start(files(&[("fwd6.json", file)]));
    let out = outside(&b);
    let c = b.client();
    let a = c
        .acquire_with_mac("fwd6", Some(mac.parse().unwrap()))
        .unwrap();
    let vm = TapVm::new(a.fd, mac);
    assert_eq!(vm.dhcp("v6-guest"), "10.97.0.70");
    vm.ns.sh("ip addr add 10.97.0.70/24 dev eth0");
    assert_eq!(slaac(&vm, prefix, mac), guest6);
    let _server = Guest::serve(&vm, 22, "v6-guest");
    let gateway6 = "fd31:0:0:1::1";
    reaches(&b, &b.ns, &format!("[{guest6}]:22"), "v6-guest");
    // Another machine, to the host's IPv6 address: translated (dnat ip6), and the guest
    // sees the gateway's IPv6 address as the peer.
    let text = reaches(&b, &out, "[fd20::1]:8024", "v6-guest");
    assert_eq!(text, format!("v6-guest {gateway6}"));
    assert!(
        rules(&b).contains(&format!("dnat ip6 to [{guest6}]:22")),
        "{}",
        rules(&b)
    );
    // The host itself: its own IPv6 addresses (the uplink's and the gateway's), and ::1
    // and 127.0.0.1 (the broker's relay).
    for to in [
        "[fd20::1]:8024",
        &format!("[{gateway6}]:8024"),
        "[::1]:8024",
        "127.0.0.1:8024",
        "10.200.0.1:8024",
    ] {
        reaches(&b, &b.ns, to, "v6-guest");
    }
    // IPv4 from another machine to an IPv6 internal address, and IPv6 to an IPv4 one:
    // nftables has no NAT46/64, the broker's relay carries them.
    reaches(&b, &out, "10.200.0.1:8024", "v6-guest");
    let text = reaches(&b, &out, "[fd20::1]:8025", "v6-guest");
    assert_eq!(
        text, "v6-guest 10.97.0.1",
        "relayed from the gateway's address"
    );
    reaches(&b, &b.ns, "[::1]:8025", "v6-guest");
    // The port is the broker's, on IPv6 as on IPv4.
    let taken = b.ns.run(|| TcpListener::bind(("::", 8024)));
    assert!(taken.is_err(), "the forward holds its IPv6 port");
    drop(c);
}

/// The guest behind `a`: its DHCP lease, configured on its `eth0`, and a server on 22.
fn guest_of(a: vmnet_broker::client::Acquired, name: &'static str) -> (TapVm, Guest, String) {
    let prefix = a.info.subnet.split('/').nth(1).unwrap().to_string();
    let mac = a.info.mac.clone();
    let vm = TapVm::new(a.fd, &mac);
    let ip = vm.dhcp(name);
    vm.ns.sh(&format!("ip addr add {ip}/{prefix} dev eth0"));
    let server = Guest::serve(&vm, 22, name);
    (vm, server, ip)
}

#[test]
fn dynamic_forwards_follow_the_lease_and_end_with_their_client() {
    let b = Broker::start(Options::default());
    let out = outside(&b);
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let tap = a.info.interface.clone();
    let mac = a.info.mac.clone();
    // Asked for before the guest has an address: made at once, aimed when the lease comes.
    let f = c.forward("shared", "tcp", 2222, 22, &tap).unwrap();
    assert_eq!((f.spec.external_port, f.spec.internal_port), (2222, 22));
    assert_eq!(f.internal_address, None);
    let (vm, _server, ip) = guest_of(a, "dyn-guest");
    reaches(&b, &out, "10.200.0.1:2222", "dyn-guest");
    reaches(&b, &b.ns, "10.200.0.1:2222", "dyn-guest");
    reaches(&b, &b.ns, "127.0.0.1:2222", "dyn-guest");
    // Asked for once the lease exists: the reply names the guest's address.
    let f = c.forward("shared", "tcp", 2223, 22, &tap).unwrap();
    assert_eq!(f.internal_address.as_deref(), Some(ip.as_str()));
    reaches(&b, &out, "10.200.0.1:2223", "dyn-guest");
    let d = b.client().show("shared").unwrap();
    let listed: Vec<_> = d
        .forwards
        .iter()
        .map(|f| {
            (
                f["external_port"].as_u64().unwrap(),
                f["interface"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(listed, [(2222, tap.clone()), (2223, tap.clone())], "{d:?}");
    assert!(rules(&b).contains("dport 2223"));

    // Over IPv6: to the guest's EUI-64 address in the network's prefix, translated by
    // the firewall (so the guest sees the gateway's IPv6 address, not a relayed IPv4
    // connection).
    let prefix = d.ipv6_prefix.clone().expect("shared has an IPv6 prefix");
    let guest6 = slaac(&vm, &prefix, &mac);
    let gateway6 = vmnet_broker::ula::gateway_of(prefix.parse().unwrap());
    assert!(
        rules(&b).contains(&format!("dnat ip6 to [{guest6}]:22")),
        "{}",
        rules(&b)
    );
    let text = reaches(&b, &out, "[fd20::1]:2222", "dyn-guest");
    assert_eq!(text, format!("dyn-guest {gateway6}"));
    reaches(&b, &b.ns, "[fd20::1]:2222", "dyn-guest");
    reaches(&b, &b.ns, "[::1]:2222", "dyn-guest");

    // Refusals. A port another forward holds, and one a host program listens on.
    let other = b.client();
    let theirs = other.acquire("shared").unwrap();
    let e = other
        .forward("shared", "tcp", 2222, 22, &theirs.info.interface)
        .unwrap_err();
    assert_eq!(e.code.code(), 8, "{e}");
    assert!(e.message.contains("2222 is already in use"), "{e}");
    let _listener = b.ns.run(|| TcpListener::bind(("0.0.0.0", 2230)).unwrap());
    let e = c.forward("shared", "tcp", 2230, 22, &tap).unwrap_err();
    assert_eq!(e.code.code(), 8, "{e}");
    // Someone else's TAP, and a TAP of another network.
    let e = other.forward("shared", "tcp", 2231, 22, &tap).unwrap_err();
    assert_eq!(e.code.code(), 3, "{e}");
    assert!(
        e.message.contains("not a TAP this connection acquired"),
        "{e}"
    );
    let e = c.forward("host", "tcp", 2231, 22, &tap).unwrap_err();
    assert_eq!(e.code.code(), 3, "{e}");
    // Malformed: an unknown protocol is the request's fault.
    let (reply, _) = c
        .call_raw(br#"{"command":"forward","network_name":"shared","protocol":"sctp","external_port":1,"internal_port":2,"interface":"x"}"#)
        .unwrap();
    assert!(String::from_utf8_lossy(&reply).contains(r#""error":4"#));

    // The client goes: its forwards go, rules and ports.
    drop(c);
    b.wait_for("the forwards to end", DEADLINE, || {
        fetch(&out, "10.200.0.1:2222".parse().unwrap()).is_err()
            && fetch(&out, "[fd20::1]:2222".parse().unwrap()).is_err()
            && !rules(&b).contains("dport 2222")
    });
    let freed = b.ns.run(|| TcpListener::bind(("0.0.0.0", 2222)));
    assert!(freed.is_ok(), "the port is free again: {freed:?}");
    drop(freed);
    // Another client may take it now, for its own TAP.
    other
        .forward("shared", "tcp", 2222, 22, &theirs.info.interface)
        .unwrap();
}

#[test]
fn a_forward_ends_with_its_tap() {
    let b = Broker::start(Options::default());
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let tap = a.info.interface.clone();
    c.forward("shared", "tcp", 2240, 22, &tap).unwrap();
    let (vm, server, _) = guest_of(a, "short-lived");
    reaches(&b, &b.ns, "127.0.0.1:2240", "short-lived");
    // The VM closes its TAP (the only fd was the stand-in's); the connection stays.
    drop(server);
    drop(vm);
    b.wait_for("the forward to end with the TAP", DEADLINE, || {
        b.ns.run(|| TcpListener::bind(("0.0.0.0", 2240))).is_ok()
    });
    assert!(!rules(&b).contains("dport 2240"));
    assert!(c.status().is_ok(), "the client is still connected");
    let d = c.show("shared").unwrap();
    assert!(d.forwards.is_empty(), "{d:?}");
    // Another client takes the port for its own TAP; the first one's leaving (its
    // forward of that port ended with its TAP) must not end the other's.
    let other = b.client();
    let theirs = other.acquire("shared").unwrap();
    other
        .forward("shared", "tcp", 2240, 22, &theirs.info.interface)
        .unwrap();
    drop(c);
    b.wait_for("the first client to be gone", DEADLINE, || {
        other.status().unwrap().clients.is_empty()
    });
    let d = other.show("shared").unwrap();
    assert_eq!(d.forwards.len(), 1, "{d:?}");
    assert!(rules(&b).contains("dport 2240"), "{}", rules(&b));
    assert!(
        b.ns.run(|| TcpListener::bind(("0.0.0.0", 2240))).is_err(),
        "the other client's forward lost its port"
    );
}

#[test]
fn only_root_forwards_ports_below_1024() {
    let b = Broker::start(Options::default());
    b.ns.sh(&format!("chmod 0666 {}", b.socket.display()));
    let run_as_nobody = |forward: &str| {
        b.cli_as_nobody(&[
            "run",
            "--network",
            "shared",
            "--forward",
            forward,
            "--",
            "true",
        ])
        .output()
        .unwrap()
    };
    let out = run_as_nobody("tcp:80:22");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error 3: "), "{stderr}");
    assert!(
        stderr.contains("only root may forward a port below 1024"),
        "{stderr}"
    );
    // A high port is anybody's.
    let out = run_as_nobody("tcp:8080:22");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Root may take a low one.
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    c.forward("shared", "tcp", 81, 22, &a.info.interface)
        .unwrap();
}

#[test]
fn check_config_reports_bad_forwards_and_a_taken_static_port_fails_the_network() {
    let rule = |subnet: &str, rules: &str| {
        format!(r#"{{"subnet": "{subnet}", "port_forwarding_rules": [{rules}]}}"#)
    };
    let one = |ext: &str, int: &str, port: &str| {
        format!(
            r#"{{"protocol": "tcp", "external_port": {ext}, "internal_address": "{int}", "internal_port": {port}}}"#
        )
    };
    let b = Broker::start(files(&[
        (
            "good.json",
            rule("10.61.0.1", &one("8061", "10.61.0.5", "22")),
        ),
        ("zero.json", rule("10.62.0.1", &one("0", "10.62.0.5", "22"))),
        (
            "outside.json",
            rule("10.63.0.1", &one("8063", "10.64.0.5", "22")),
        ),
        (
            "gateway.json",
            rule("10.65.0.1", &one("8065", "10.65.0.1", "22")),
        ),
        (
            "twice.json",
            rule(
                "10.66.0.1",
                &format!(
                    "{}, {}",
                    one("8066", "10.66.0.5", "22"),
                    one("8066", "10.66.0.6", "23")
                ),
            ),
        ),
        (
            "udpbad.json",
            rule(
                "10.67.0.1",
                r#"{"protocol": "sctp", "external_port": 1, "internal_address": "10.67.0.5", "internal_port": 1}"#,
            ),
        ),
        (
            "taken.json",
            rule("10.68.0.1", &one("8068", "10.68.0.5", "22")),
        ),
    ]));
    let out = b.check_config(&b.config_dir).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = |start: &str, file: &str, has: &str| {
        text.lines()
            .any(|l| l.starts_with(start) && l.contains(file) && l.contains(has))
    };
    assert!(line("ok", "good.json", ""), "{text}");
    assert!(line("ok", "taken.json", ""), "{text}");
    for (file, has) in [
        ("zero.json", "external_port 0 must be between 1 and 65535"),
        (
            "outside.json",
            "internal_address 10.64.0.5 is not a host address of 10.63.0.0/24",
        ),
        ("gateway.json", "is the gateway (the host itself), not a VM"),
        (
            "twice.json",
            "tcp port 8066 is already forwarded (to 10.66.0.5)",
        ),
        ("udpbad.json", "sctp"),
    ] {
        assert!(line("error", file, has), "{file}: {has}: {text}");
    }
    // A static forward whose port a program on the host holds: the network is not made.
    let _holder = b.ns.run(|| TcpListener::bind(("0.0.0.0", 8068)).unwrap());
    let e = b.client().acquire("taken").unwrap_err();
    assert_eq!(e.code.code(), 6, "{e}");
    assert!(e.message.contains("tcp port 8068 is already in use"), "{e}");
    assert!(
        !b.ns.links().iter().any(|l| l == "vmnb-taken"),
        "nothing is left of it"
    );
    // The good one is made, and `show` lists its forward.
    let c = b.client();
    c.acquire("good").unwrap();
    let d = c.show("good").unwrap();
    assert_eq!(d.forwards.len(), 1, "{d:?}");
    assert_eq!(d.forwards[0]["external_port"], 8061);
    assert_eq!(d.forwards[0]["internal_address"], "10.61.0.5");
    assert_eq!(d.forwards[0]["static"], true);
}
