//! The pool of pre-made TAPs (src/backend/linux/pool.rs) end to end: the real daemon in a
//! network namespace of its own. A warm acquire gets a ready TAP that works like a fresh
//! one (given to its client when asked for as persistent) and nothing queued while it
//! waited; idle pool TAPs belong to the broker (no other user may attach them), show
//! nowhere, and go with their network and with a killed broker.
#![cfg(target_os = "linux")]

#[path = "support/frames.rs"]
mod frames;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;
#[path = "support/tap_owner.rs"]
mod tap_owner;

use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::time::Duration;
use support::{Broker, Options, as_uid};
use tap_owner::attach_by_name_as;
use vmnet_broker::backend::linux::firewall::guard::EGRESS_BLOCK;
use vmnet_broker::backend::linux::pool::{POOL_SIZE, is_pool_name};
use vmnet_broker::backend::linux::tap;
use vmnet_broker::client::Client;
use vmnet_broker_client::linux::tap_name_of;

/// Generous, for a busy 2-core machine; the waits end as soon as the condition holds.
const DEADLINE: Duration = Duration::from_secs(30);

/// The idle pool TAPs in the broker's namespace, by name, with their ifindex: pool names
/// no network lists as a client's. (The carrier does not tell: the pool of an
/// anti-spoofing network holds its TAPs open.)
fn idle_pool(b: &Broker) -> BTreeMap<String, String> {
    // Links first: a TAP handed out in between is then in the status.
    let links = b.ns.links();
    let handed = status_taps(b, None);
    links
        .into_iter()
        .filter(|n| is_pool_name(n) && !handed.contains(n))
        .map(|n| {
            let index = sysfs(b, &n, "ifindex");
            (n, index)
        })
        .collect()
}

fn sysfs(b: &Broker, name: &str, what: &str) -> String {
    b.ns.sh(&format!(
        "cat /sys/class/net/{name}/{what} 2>/dev/null || true"
    ))
    .trim()
    .to_string()
}

/// Setting `what` of interface `name` in /proc/sys/net/ipv6/conf of the broker's
/// namespace.
fn ipv6_conf(b: &Broker, name: &str, what: &str) -> String {
    b.ns.sh(&format!("cat /proc/sys/net/ipv6/conf/{name}/{what}"))
        .trim()
        .to_string()
}

fn wait_pool_full(b: &Broker) -> BTreeMap<String, String> {
    wait_pool_full_of(b, POOL_SIZE)
}

/// Waits until `n` idle pool TAPs (of every network) wait.
fn wait_pool_full_of(b: &Broker, n: usize) -> BTreeMap<String, String> {
    b.wait_for("the pool to fill", DEADLINE, || idle_pool(b).len() == n);
    idle_pool(b)
}

/// The TAP names `status --json` lists for network `net`, or for every network.
fn status_taps(b: &Broker, net: Option<&str>) -> Vec<String> {
    let out = b.cli(&["status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["networks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| net.is_none_or(|net| n["name"] == net))
        .flat_map(|n| n["taps"].as_array().unwrap().iter())
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

/// A warm acquire is served from the pool: the ready TAP it gets is on the bridge,
/// stays the broker's (its client has the fd), and carries frames (a DHCP exchange, so the
/// binder bound it to the guest's MAC), on an anti-spoofing network and on an
/// `allow_spoofing` one. The pool is refilled behind it.
#[test]
fn a_warm_acquire_gets_a_ready_pool_tap_that_works() {
    let b = Broker::start(Options {
        files: vec![("loose.json".into(), r#"{"allow_spoofing": true}"#.into())],
        ..Options::default()
    });
    b.ns.sh(&format!("chmod 0666 {}", b.socket.display()));
    for (i, net) in ["shared", "loose"].into_iter().enumerate() {
        let holder = b.client();
        let first = holder.acquire(net).unwrap();
        let iface = &first.info.interface;
        let prefix = iface[..=iface.find('-').unwrap()].to_string();
        let pool_of = |b: &Broker| -> BTreeMap<String, String> {
            idle_pool(b)
                .into_iter()
                .filter(|(n, _)| n.starts_with(&prefix))
                .collect()
        };
        b.wait_for("the pool to fill", DEADLINE, || {
            pool_of(&b).len() == POOL_SIZE
        });
        let ready = pool_of(&b);
        let socket = b.socket.clone();
        let uid = 4242 + i as u32;
        let net2 = net.to_string();
        let (a, connection) = as_uid(uid, move || {
            let c = Client::connect(&socket).unwrap();
            (c.acquire(&net2).unwrap(), c)
        });
        let name = a.info.interface.clone();
        assert!(ready.contains_key(&name), "{name} is not one of {ready:?}");
        assert_eq!(tap_name_of(a.fd.as_fd()).unwrap(), name);
        // The device's virtio-net header length, set when the pool made it, holds for
        // the client's new fd.
        assert_eq!(tap::vnet_hdr_len(a.fd.as_fd()).unwrap(), 12);
        assert_eq!(sysfs(&b, &name, "carrier"), "1");
        let master = b.ns.sh(&format!(
            "basename $(readlink /sys/class/net/{name}/master)"
        ));
        assert_eq!(master.trim(), a.info.bridge);
        // A bridge port with no IPv6 of its own (src/backend/linux/bridge.rs
        // `disable_port_ipv6`): set before it came up, so no link-local address either.
        assert_eq!(ipv6_conf(&b, &name, "disable_ipv6"), "1");
        let addresses = b.ns.sh(&format!("ip -6 addr show dev {name}"));
        assert!(addresses.trim().is_empty(), "{addresses}");
        // Not asked for as persistent: the broker's still (only the fd is the client's),
        // so nobody, the client included, may attach it by name.
        assert_eq!(sysfs(&b, &name, "owner"), "0");
        assert_eq!(sysfs(&b, &name, "group"), "0");
        assert!(status_taps(&b, Some(net)).contains(&name));
        let tap = frames::Tap::new(a);
        let ack = tap.dhcp(0x5000 + i as u32, DEADLINE);
        assert!(!ack.yiaddr().is_unspecified(), "{ack:?}");
        // The pool is full again, without the TAP handed out.
        b.wait_for("the pool to refill", DEADLINE, || {
            let pool = pool_of(&b);
            pool.len() == POOL_SIZE && !pool.contains_key(&name)
        });
        drop((tap, connection, first, holder));
    }
}

/// A TAP asked for as persistent (a VMM opens it by name) is given to its client when it
/// comes from the pool, held open (anti-spoofing network) or closed (`allow_spoofing`):
/// that uid may attach it by name once its fd is closed, another may not.
#[test]
fn a_persistent_tap_from_the_pool_is_its_clients() {
    let b = Broker::start(Options {
        files: vec![("loose.json".into(), r#"{"allow_spoofing": true}"#.into())],
        ..Options::default()
    });
    b.ns.sh(&format!("chmod 0666 {}", b.socket.display()));
    let holder = b.client();
    // Held to the end: a pool TAP closed goes back to its pool, one more to count.
    let mut firsts = vec![];
    for net in ["shared", "loose"] {
        firsts.push(holder.acquire(net).unwrap());
        wait_pool_full_of(&b, POOL_SIZE * if net == "shared" { 1 } else { 2 });
        let socket = b.socket.clone();
        let net2 = net.to_string();
        let (name, connection) = as_uid(4242, move || {
            let c = Client::connect(&socket).unwrap();
            let a = c.acquire_with(&net2, None, true).unwrap();
            (a.info.interface.clone(), c)
        });
        assert!(is_pool_name(&name), "{net}: {name} is not from the pool");
        assert_eq!(sysfs(&b, &name, "owner"), "4242", "{net}");
        assert_eq!(sysfs(&b, &name, "group"), "4242", "{net}");
        assert_eq!(
            b.ns.run(|| attach_by_name_as(&name, 4343, 4343)),
            libc::EPERM
        );
        assert_eq!(
            b.ns.run(|| attach_by_name_as(&name, 4242, 4242)),
            0,
            "{net}"
        );
        drop(connection);
        b.wait_for("the persistent TAP to go with its client", DEADLINE, || {
            !b.ns.links().contains(&name)
        });
    }
}

/// An idle pool TAP of an anti-spoofing network is held open by the broker, carrier up,
/// so the bridge floods it like any port: the guard drops every frame for a TAP without
/// a binding, and the client that gets it reads nothing sent before its acquire. The
/// bound TAP of another client hears the same broadcasts, so the silence is the guard's.
#[test]
fn an_idle_pool_tap_queues_nothing_for_its_client() {
    let (b, c, first, bridge, pool) = shared_with_full_pool();
    let holder = frames::Tap::new(first);
    for name in pool.keys() {
        assert_eq!(sysfs(&b, name, "carrier"), "1", "{name} is held open");
    }
    let sent = 50;
    send_stale_broadcasts(&b, &bridge, sent);
    let heard = holder
        .drain(Duration::from_millis(500))
        .into_iter()
        .filter(|f| is_stale(f))
        .count();
    assert_eq!(heard, sent, "the bound TAP hears every broadcast");
    let got = stale_frames_of_next_pool_tap(&c, &pool);
    assert_eq!(got, 0, "the pool TAP queued frames sent before its acquire");
    // Nothing queued for the handover to drain: the guard dropped them.
    assert!(
        !b.log().contains("drained frames queued in the pool"),
        "{}",
        b.log()
    );
}

/// What a guard adopted from an older broker let queue in an idle pool TAP (its egress
/// program passed broadcasts to unbound TAPs) is drained at the handover: the client
/// reads none of it. Stood in for by taking the egress filter out of the guard's shared
/// egress block (every guarded TAP's), so the bridge's broadcasts queue in the idle pool
/// TAPs as they did then.
#[test]
fn what_queued_in_a_pool_tap_is_drained_before_its_client_gets_it() {
    let (b, c, first, bridge, pool) = shared_with_full_pool();
    assert!(!pool.is_empty());
    b.ns.sh(&format!("tc filter del block {EGRESS_BLOCK}"));
    let sent = 50;
    send_stale_broadcasts(&b, &bridge, sent);
    let got = stale_frames_of_next_pool_tap(&c, &pool);
    assert_eq!(got, 0, "the client read frames queued before its acquire");
    // They were there to drain: the handover took them (a TAP's queue holds 500).
    let log = b.log();
    let drained = log
        .lines()
        .find(|l| l.contains("drained frames queued in the pool"))
        .unwrap_or_else(|| panic!("no drain in the log:\n{log}"));
    // At least the 50: whatever else the bridge flooded meanwhile (the broker's Router
    // Advertisements, say) queued too.
    let stale: usize = drained
        .split("stale=")
        .nth(1)
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count: {drained}"));
    assert!(stale >= sent, "{drained}");
    drop(first);
}

/// A broker whose `shared` network a client holds (its first TAP), with the network's
/// bridge and its pool, once full, for the stale-frame tests (which need python3).
fn shared_with_full_pool() -> (
    Broker,
    Client,
    vmnet_broker_client::client::Acquired,
    String,
    BTreeMap<String, String>,
) {
    netns::require("python3", "python3");
    let b = Broker::start(Options::default());
    let c = b.client();
    let first = c.acquire("shared").unwrap();
    let bridge = first.info.bridge.clone();
    let pool = wait_pool_full(&b);
    (b, c, first, bridge, pool)
}

/// Sends `n` broadcasts of an experimental ethertype from `bridge`, each with its number
/// after "stale" ([`is_stale`]).
fn send_stale_broadcasts(b: &Broker, bridge: &str, n: usize) {
    b.ns.sh(&format!(
        "python3 -c 'import socket; s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW); \
         s.bind((\"{bridge}\",0)); \
         [s.send(bytes([255]*6+[2,0,0,0,0,1]+[0x88,0xb5])+b\"stale%04d\"%i+bytes(40)) for i in range({n})]'"
    ));
}

/// One of [`send_stale_broadcasts`]'s frames.
fn is_stale(f: &[u8]) -> bool {
    f.len() > 14 && f[12..14] == [0x88, 0xb5] && f[14..].starts_with(b"stale")
}

/// Acquires the next TAP, which must come from `pool`, and counts the stale frames its
/// client reads.
fn stale_frames_of_next_pool_tap(c: &Client, pool: &BTreeMap<String, String>) -> usize {
    let a = c.acquire("shared").unwrap();
    assert!(
        pool.contains_key(&a.info.interface),
        "{} is not from the pool",
        a.info.interface
    );
    frames::Tap::new(a)
        .drain(Duration::from_millis(500))
        .iter()
        .filter(|f| is_stale(f))
        .count()
}

/// A pool TAP belongs to the broker's uid and group: another local user's `TUNSETIFF`
/// on its name is refused. Without an owner and a group any user could attach it.
#[test]
fn a_stranger_cannot_attach_a_pool_tap() {
    let b = Broker::start(Options::default());
    let c = b.client();
    let _a = c.acquire("shared").unwrap();
    let pool = wait_pool_full(&b);
    for name in pool.keys() {
        assert_eq!(sysfs(&b, name, "owner"), "0", "{name}");
        assert_eq!(sysfs(&b, name, "group"), "0", "{name}");
        assert_eq!(
            b.ns.run(|| attach_by_name_as(name, 65534, 65534)),
            libc::EPERM,
            "nobody must not attach pool TAP {name}"
        );
    }
}

/// Idle pool TAPs are no endpoint (status lists the client's TAP only) and go with their
/// network when it is removed.
#[test]
fn pool_taps_are_invisible_and_go_with_their_network() {
    let b = Broker::start(Options {
        idle_timeout: 0.5,
        ..Options::default()
    });
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let pool = wait_pool_full(&b);
    assert_eq!(
        status_taps(&b, Some("shared")),
        vec![a.info.interface.clone()]
    );
    let show = b.cli(&["show", "shared"]).output().unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    for name in pool.keys() {
        assert!(!text.contains(name.as_str()), "{name} in `show`: {text}");
    }
    let bridge = a.info.bridge.clone();
    drop(a);
    drop(c);
    b.wait_for("the network and every TAP of it to go", DEADLINE, || {
        let links = b.ns.links();
        !links.contains(&bridge) && !links.iter().any(|l| l.starts_with("vmnt"))
    });
}

/// A broker killed by SIGKILL leaves its idle pool TAPs behind; the next one, adopting
/// the network (a VM still holds a TAP), deletes them and makes a pool of its own.
#[test]
fn a_killed_brokers_pool_taps_are_deleted_by_the_next() {
    let mut b = Broker::start(Options::default());
    let c = b.client();
    let held = c.acquire("shared").unwrap();
    let old = wait_pool_full(&b);
    let state = b.state_dir.join("broker-state.json");
    b.wait_for("the TAP in the state file", DEADLINE, || {
        std::fs::read_to_string(&state).is_ok_and(|s| s.contains(&held.info.interface))
    });
    b.signal(Signal::SIGKILL);
    b.wait_exit(DEADLINE).unwrap();
    drop(c);
    b.spawn(&Options::default());
    b.wait_for(
        "the old pool TAPs to go and a new pool to fill",
        DEADLINE,
        || {
            let now = idle_pool(&b);
            now.len() == POOL_SIZE && !now.values().any(|i| old.values().any(|o| o == i))
        },
    );
    // The held TAP was adopted, and is all the network shows.
    assert_eq!(
        status_taps(&b, Some("shared")),
        vec![held.info.interface.clone()]
    );
    assert!(b.ns.links().contains(&held.info.interface));
}

/// `serve --tap-pool N` sets how many TAPs wait per network, 0 turns the pool off (every
/// acquire then makes its TAP), and a size beyond the option's range is refused.
#[test]
fn tap_pool_sets_the_pool_size_and_zero_turns_it_off() {
    let b = Broker::start(Options {
        extra_args: vec!["--tap-pool".into(), "2".into()],
        ..Options::default()
    });
    let c = b.client();
    let _first = c.acquire("shared").unwrap();
    b.wait_for("the pool to fill", DEADLINE, || idle_pool(&b).len() == 2);
    let second = c.acquire("shared").unwrap();
    assert!(
        is_pool_name(&second.info.interface),
        "{}",
        second.info.interface
    );
    b.wait_for("the pool to refill", DEADLINE, || idle_pool(&b).len() == 2);
    // Given the time to make more, it keeps two.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(idle_pool(&b).len(), 2);

    let off = Broker::start(Options {
        extra_args: vec!["--tap-pool".into(), "0".into()],
        ..Options::default()
    });
    let c = off.client();
    let first = c.acquire("shared").unwrap();
    // Long enough for a pool to fill (above: well under a second on an idle machine).
    std::thread::sleep(Duration::from_secs(2));
    let second = c.acquire("shared").unwrap();
    for a in [&first, &second] {
        assert!(!is_pool_name(&a.info.interface), "{}", a.info.interface);
    }
    assert!(idle_pool(&off).is_empty(), "{:?}", idle_pool(&off));

    let out = off
        .cli(&[
            "serve",
            "--tap-pool",
            "65",
            "--socket",
            "/nonexistent/x.sock",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tap-pool"), "{err}");
}

/// The host-side MAC an attacker gives its TAP through its fd.
const TAMPERED_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x66];

/// Changes, through TAP fd `fd`, everything of the device the kernel lets an fd holder
/// change without privilege, as a hostile client would before closing it, so that the
/// next client of the device gets nothing or is given away: the host-side MAC, owner and
/// group (`uid`), send buffer, virtio-net header length, offloads, a receive filter
/// that passes one unicast MAC only, a classic socket filter and an eBPF filter that
/// drop every frame, little-endian headers.
fn tamper(fd: std::os::fd::BorrowedFd, uid: u32) {
    use std::os::fd::AsRawFd;
    let fd = fd.as_raw_fd();
    let check = |rc: libc::c_int, what: &str| {
        assert_eq!(rc, 0, "{what}: {}", std::io::Error::last_os_error());
    };
    // SAFETY: (every ioctl below) `fd` is a live TAP fd; each argument is a live value of
    // the type the kernel reads for that request, or an integer by value.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in req
            .ifr_ifru
            .ifru_hwaddr
            .sa_data
            .iter_mut()
            .zip(TAMPERED_MAC)
        {
            *d = s as libc::c_char;
        }
        check(libc::ioctl(fd, libc::SIOCSIFHWADDR, &req), "SIOCSIFHWADDR");
        check(
            libc::ioctl(fd, libc::TUNSETOWNER, uid as libc::c_ulong),
            "TUNSETOWNER",
        );
        check(
            libc::ioctl(fd, libc::TUNSETGROUP, uid as libc::c_ulong),
            "TUNSETGROUP",
        );
        let small: libc::c_int = 4096;
        check(libc::ioctl(fd, libc::TUNSETSNDBUF, &small), "TUNSETSNDBUF");
        let hdr: libc::c_int = 10;
        check(
            libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr),
            "TUNSETVNETHDRSZ",
        );
        check(
            libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::TUN_F_CSUM as libc::c_ulong),
            "TUNSETOFFLOAD",
        );
        // struct tun_filter { flags, count, addr[count][6] }: one MAC, no multicast.
        let mut filter = [0u8; 4 + 6];
        filter[2..4].copy_from_slice(&1u16.to_ne_bytes());
        filter[4..].copy_from_slice(&TAMPERED_MAC);
        // Returns how many addresses it filters exactly.
        let exact = libc::ioctl(fd, libc::TUNSETTXFILTER, filter.as_ptr());
        assert_eq!(
            exact,
            1,
            "TUNSETTXFILTER: {}",
            std::io::Error::last_os_error()
        );
        // "return 0": drop everything.
        let mut drop_all = [libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0,
        }];
        let prog = libc::sock_fprog {
            len: 1,
            filter: drop_all.as_mut_ptr(),
        };
        check(
            libc::ioctl(fd, libc::TUNATTACHFILTER, &prog),
            "TUNATTACHFILTER",
        );
        let ebpf = drop_all_ebpf();
        check(
            libc::ioctl(fd, libc::TUNSETFILTEREBPF, &ebpf),
            "TUNSETFILTEREBPF",
        );
        libc::close(ebpf);
        let le: libc::c_int = 1;
        check(libc::ioctl(fd, libc::TUNSETVNETLE, &le), "TUNSETVNETLE");
    }
}

/// An eBPF socket filter program that returns 0 (drop), loaded with `bpf(2)`.
fn drop_all_ebpf() -> libc::c_int {
    // r0 = 0; exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"Apache-2.0";
    // From linux/bpf.h.
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license; the rest 0.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SOCKET_FILTER.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: attr is a valid bpf_attr for BPF_PROG_LOAD whose pointers point to live
    // memory for the duration of the call; the kernel copies what it reads.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    fd as libc::c_int
}

/// Waits until the broker has taken pool TAP `name` back from its client
/// (src/backend/linux/recycle.rs), as its debug log says.
fn wait_taken_back(b: &Broker, name: &str) {
    let line = format!("interface={name} outcome=Back");
    b.wait_for("the closed TAP back in the pool", DEADLINE, || {
        b.log()
            .lines()
            .any(|l| l.contains("closed pool TAP") && l.contains(&line))
    });
}

/// A pool TAP whose client closed it goes back to the pool rather than being deleted,
/// and its next client gets it as a new TAP, whatever the previous one did through its
/// fd ([`tamper`]): the broker's owner and group again (the previous uid cannot attach
/// it by name), a host-side MAC of the pool's, the new TAP's send buffer and header
/// length, no filter (a DHCP exchange works), and no binding or port forward of the
/// previous client's. The previous client, still connected, cannot forward a port to
/// it any more, neither while it waits in the pool nor once it is another's. On an
/// anti-spoofing network (held open in the pool) and on an `allow_spoofing` one (closed).
#[test]
fn a_closed_pool_tap_goes_back_to_the_pool_as_new_whatever_its_client_did() {
    let b = Broker::start(Options {
        files: vec![("loose.json".into(), r#"{"allow_spoofing": true}"#.into())],
        ..Options::default()
    });
    let holder = b.client();
    let (mut held, mut kept) = (vec![], vec![]);
    for (i, net) in ["shared", "loose"].into_iter().enumerate() {
        held.push(holder.acquire(net).unwrap());
        wait_pool_full_of(&b, POOL_SIZE * (i + 1));
        let fresh = holder.acquire(net).unwrap();
        let fresh_sndbuf = tap::sndbuf(fresh.fd.as_fd()).unwrap();
        assert_eq!(fresh_sndbuf, tap::FRESH_SNDBUF);
        held.push(fresh);
        let port = 2222 + 10 * i as u16;
        let attacker = b.client();
        let a = attacker.acquire(net).unwrap();
        let name = a.info.interface.clone();
        assert!(is_pool_name(&name), "{name}");
        attacker.forward(net, "tcp", port, 22, &name).unwrap();
        tamper(a.fd.as_fd(), 4242);
        assert_eq!(sysfs(&b, &name, "address"), "02:00:00:00:00:66");
        assert_eq!(sysfs(&b, &name, "owner"), "4242");
        let ended = b.count_in_log("port forward ended: its TAP is gone");
        drop(a);
        wait_taken_back(&b, &name);
        assert_eq!(
            b.count_in_log("port forward ended: its TAP is gone"),
            ended + 1,
            "{net}: {}",
            b.log()
        );
        assert_eq!(sysfs(&b, &name, "owner"), "0", "{net}");
        assert_eq!(sysfs(&b, &name, "group"), "0", "{net}");
        assert_eq!(
            b.ns.run(|| attach_by_name_as(&name, 4242, 4242)),
            libc::EPERM,
            "{net}: the previous client's uid attached its old TAP"
        );
        assert!(
            !status_taps(&b, None).contains(&name),
            "an idle TAP is listed"
        );
        let e = attacker
            .forward(net, "tcp", port + 1, 22, &name)
            .unwrap_err();
        assert!(e.to_string().contains("not on network"), "{e}");
        // The pool hands out its last TAP first: this one.
        let next = b.client().acquire(net).unwrap();
        assert_eq!(next.info.interface, name, "{net}");
        let address = sysfs(&b, &name, "address");
        assert!(address.starts_with("fe:70:"), "{net}: {address}");
        assert_eq!(tap::sndbuf(next.fd.as_fd()).unwrap(), fresh_sndbuf, "{net}");
        assert_eq!(tap::vnet_hdr_len(next.fd.as_fd()).unwrap(), 12, "{net}");
        assert_eq!(sysfs(&b, &name, "carrier"), "1", "{net}");
        let e = attacker
            .forward(net, "tcp", port + 2, 22, &name)
            .unwrap_err();
        assert!(
            e.to_string().contains("not a TAP this connection acquired"),
            "{e}"
        );
        let tap = frames::Tap::new(next);
        let ack = tap.dhcp(0x6000 + i as u32, DEADLINE);
        assert!(!ack.yiaddr().is_unspecified(), "{net}: {ack:?}");
        // Kept open: closed, it would go back to the pool, one more for the next count.
        kept.push(tap);
    }
}

/// A pool TAP whose client turns its carrier off while holding it (`TUNSETCARRIER`, which
/// needs no privilege) looks closed to the link record, and its later close would change
/// nothing it reports. The broker's attach by name finds it held (`EBUSY`), and since its
/// carrier is off it deletes it, as the reaper did before TAPs were taken back. Left
/// alone, it would stay on the bridge for good, hidden from every listing and limit:
/// repeated, a port taken each time.
#[test]
fn a_pool_tap_held_with_its_carrier_off_is_deleted_not_left_on_the_bridge() {
    let b = Broker::start(Options::default());
    let holder = b.client();
    let first = holder.acquire("shared").unwrap();
    let bridge = first.info.bridge.clone();
    wait_pool_full(&b);
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let name = a.info.interface.clone();
    assert!(is_pool_name(&name), "{name}");
    let off: libc::c_int = 0;
    {
        use std::os::fd::AsRawFd;
        // SAFETY: `a.fd` is a live TAP fd; TUNSETCARRIER reads one int from a live
        // reference.
        let rc = unsafe { libc::ioctl(a.fd.as_raw_fd(), libc::TUNSETCARRIER, &off) };
        assert_eq!(rc, 0, "TUNSETCARRIER: {}", std::io::Error::last_os_error());
    }
    let deleted = format!("interface={name} outcome=Deleted");
    b.wait_for("the held carrier-less TAP to be deleted", DEADLINE, || {
        b.log()
            .lines()
            .any(|l| l.contains("closed pool TAP") && l.contains(&deleted))
            && !b.ns.links().contains(&name)
    });
    assert!(!idle_pool(&b).contains_key(&name));
    let ports = b.ns.sh(&format!("ls /sys/class/net/{bridge}/brif"));
    assert!(!ports.split_whitespace().any(|p| p == name), "{ports}");
    drop((a, c, first));
}
