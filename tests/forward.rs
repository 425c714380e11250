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
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use support::{Broker, Netns, Options};
use tap_vm::TapVm;

const DEADLINE: Duration = Duration::from_secs(30);

fn files(files: &[(&str, String)]) -> Options {
    Options {
        files: files
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect(),
        ..Default::default()
    }
}

/// "Another machine": a namespace joined to the broker's by a veth, the broker's end
/// 10.200.0.1/24 (`uplink`), the other 10.200.0.2/24.
fn outside(b: &Broker) -> Netns {
    let out = Netns::new("outside");
    b.ns.ip(&[
        "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", &out.name,
    ]);
    b.ns.ip(&["addr", "add", "10.200.0.1/24", "dev", "uplink"]);
    b.ns.ip(&["link", "set", "uplink", "up"]);
    out.ip(&["addr", "add", "10.200.0.2/24", "dev", "eth0"]);
    out.ip(&["link", "set", "eth0", "up"]);
    out
}

/// A TCP server in the VM's namespace on `port`: answers every connection with
/// `<name> <peer address>` and closes it.
struct Guest {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Guest {
    fn serve(vm: &TapVm, port: u16, name: &'static str) -> Guest {
        let listener = vm
            .ns
            .run(|| TcpListener::bind(("0.0.0.0", port)).expect("bind in the VM"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut c, peer)) => {
                        let _ = c.write_all(format!("{name} {}", peer.ip()).as_bytes());
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
