//! vmnet-broker end to end with real virtual machines (issue 4): the real daemon in a
//! network namespace of its own per test (tests/support/broker.rs), guests booted by
//! `vmnet-broker run --network ... -- scripts/qemu-from-env qemu-system-x86_64 ...` (run inside
//! the broker's namespace, since it checks through sysfs that its TAP is on the bridge; QEMU
//! itself only uses the fd), and the tiny test guest of scripts/build-guest.sh reporting
//! what it saw (tests/support/vm.rs, docs/guest.md).
//!
//! The guests of one scenario run concurrently and coordinate among themselves: each finds
//! its peer through the broker's DNS (the peer's DHCP hostname) and waits until the peer
//! has pinged it before powering off. A TCG boot takes 3–4 s, so each test boots as few
//! guests as its point needs.
#![cfg(target_os = "linux")]

#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;
#[path = "support/underlay.rs"]
mod underlay;
#[path = "support/vm.rs"]
mod vm;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{Broker, Netns, Options};
use vm::{PreparedVm, VmOutput, VmSpec};

/// Generous: four TCG guests may share two cores with other tests' builds.
const VM_TIMEOUT: Duration = Duration::from_secs(120);

/// Shell helpers for the guests' scripts, on top of scripts/guest/functions.sh.
const HELPERS: &str = r#"
# resolve NAME: the first IPv4 address the resolvers of /etc/resolv.conf (the broker's DNS,
# from DHCP) give for NAME; empty if none.
resolve() {
    nslookup -type=a "$1" 2>/dev/null |
        awk '/^Name:/ { n = 1 } n && /^Address/ { sub(/^Address:[ \t]*/, ""); print; exit }'
}
# pings_name NAME: NAME resolves and answers one ping.
pings_name() {
    local ip
    ip=$(resolve "$1")
    [ -n "$ip" ] && ping -c 1 -W 1 "$ip" >/dev/null
}
# got_echos N: at least N echo requests reached this guest.
got_echos() { [ "$(icmp_echos_received)" -ge "$1" ]; }
# A guest that must outlast a peer's checks waits for the peer's word over TCP: counting
# echo requests cannot tell when the peer is done (a ping whose reply came late on a busy
# host is retried and brings one more, and a guest that counted on the number powered off
# under the retry: failed once in CI). `listen_done`, early, waits in the background for
# the peer's `tell_done IP`; `told` is true once the word came.
listen_done() { nc -l -p 7000 </dev/null >/tmp/told & }
say_done() { echo done | nc -w 2 "$1" 7000; }
tell_done() { wait_for 30 say_done "$1"; }
told() { [ -s /tmp/told ]; }
gateway() { lease eth0 router; }
"#;

fn spec(name: &str, script: &str) -> VmSpec {
    let mut s = VmSpec::new(name, &format!("{HELPERS}\n{script}"));
    s.timeout = VM_TIMEOUT;
    s
}

/// One guest to boot: its networks (`NAME` or `NAME,mac=MAC`), and the uid that runs
/// `vmnet-broker run` (root if `None`).
struct Guest {
    networks: Vec<String>,
    spec: VmSpec,
    uid: Option<u32>,
    /// `--forward` arguments of `vmnet-broker run`.
    forwards: Vec<String>,
}

fn guest(networks: &[&str], spec: VmSpec) -> Guest {
    Guest {
        networks: networks.iter().map(|s| s.to_string()).collect(),
        spec,
        uid: None,
        forwards: vec![],
    }
}

/// `ip netns exec NS [setpriv ...] vmnet-broker run --network ... -- qemu-from-env qemu ...`.
/// A launcher of another uid runs the copies [`prepare`] put in the VM's directory, from
/// there: it may not be able to reach the checkout at all.
fn run_command(b: &Broker, g: &Guest, prepared: &PreparedVm) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &b.ns.name]);
    let (bin, wrapper) = match g.uid {
        Some(uid) => {
            c.arg("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .current_dir(prepared.dir.path());
            let dir = prepared.dir.path();
            (dir.join("vmnet-broker"), dir.join("qemu-from-env"))
        }
        None => (
            support::BIN.into(),
            vm::repo_root().join("scripts/qemu-from-env"),
        ),
    };
    c.arg(bin).arg("run");
    for n in &g.networks {
        c.arg("--network").arg(n);
    }
    for f in &g.forwards {
        c.arg("--forward").arg(f);
    }
    c.arg("--")
        .arg(wrapper)
        .args(vm::qemu_argv(&g.spec, prepared))
        .env("VMNET_BROKER_SOCKET", &b.socket);
    c
}

/// The guest's files. For a launcher of another uid, everything it executes or reads is
/// in the VM's temporary directory, searchable by all, whatever the permissions of the
/// directories above the checkout (the broker binary, scripts/qemu-from-env and the guest
/// kernel live under it); the console is writable by it.
fn prepare(g: &Guest) -> PreparedVm {
    let mut prepared = vm::prepare(&g.spec);
    if g.uid.is_some() {
        let mode = |p: &std::path::Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let dir = prepared.dir.path().to_path_buf();
        mode(&dir, 0o755);
        mode(&prepared.initrd, 0o644);
        std::fs::write(&prepared.console, b"").unwrap();
        mode(&prepared.console, 0o666);
        support::expose_to_any_uid(std::path::Path::new(support::BIN), &dir, 0o755);
        support::expose_to_any_uid(&vm::repo_root().join("scripts/qemu-from-env"), &dir, 0o755);
        prepared.kernel = support::expose_to_any_uid(&prepared.kernel, &dir, 0o644);
    }
    prepared
}

/// Boots the guests concurrently and returns what each reported, in order.
fn boot_all(b: &Broker, guests: &[Guest]) -> Vec<VmOutput> {
    vm::guest_image();
    std::thread::scope(|s| {
        let handles: Vec<_> = guests
            .iter()
            .map(|g| {
                s.spawn(move || {
                    let prepared = prepare(g);
                    vm::run_vm(run_command(b, g, &prepared), &prepared, g.spec.timeout)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A guest running in the background, for tests that act on it while it runs.
struct Running {
    child: Child,
    prepared: PreparedVm,
    started: Instant,
}

impl Running {
    fn start(b: &Broker, g: &Guest) -> Running {
        vm::guest_image();
        let prepared = prepare(g);
        let stderr = std::fs::File::create(prepared.dir.path().join("stderr.log")).unwrap();
        let child = run_command(b, g, &prepared)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .expect("cannot start vmnet-broker run");
        Running {
            child,
            prepared,
            started: Instant::now(),
        }
    }

    fn console(&self) -> VmOutput {
        vm::parse_output(&std::fs::read_to_string(&self.prepared.console).unwrap_or_default())
    }

    /// Waits until the console shows result `key`.
    fn wait_result(&self, key: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.console();
            if let Some(v) = out.results.get(key) {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "guest reported no {key:?} in {timeout:?}:\n{}",
                out.console
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The QEMU process: `ip netns exec` and setpriv exec, so the child is `vmnet-broker
    /// run`, and QEMU (qemu-from-env execs it) is run's only child.
    fn qemu_pid(&self) -> i32 {
        let pid = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
            if let Some(c) = children.split_whitespace().next() {
                let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
                if comm.starts_with("qemu-system") {
                    return c.parse().unwrap();
                }
            }
            assert!(Instant::now() < deadline, "no QEMU under pid {pid}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `vmnet-broker run` to exit and returns its status and the guest's output.
    fn wait(mut self, timeout: Duration) -> (std::process::ExitStatus, VmOutput) {
        let deadline = self.started + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "guest still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = self.console();
        out.stderr = std::fs::read_to_string(self.prepared.dir.path().join("stderr.log"))
            .unwrap_or_default();
        (status, out)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The whole group: run and QEMU (no-op once both are gone).
        // SAFETY: kill(2) takes only integers and touches no memory of ours; the group is
        // the one this test created for its child, not yet reaped (waited for below).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn ip_of(out: &VmOutput, iface: &str) -> Ipv4Addr {
    let lease = out.dhcp.get(iface).unwrap_or_else(|| {
        panic!("no DHCP lease on {iface}:\n{}", out.console);
    });
    lease["ip"].split('/').next().unwrap().parse().unwrap()
}

fn subnet_of(b: &Broker, network: &str) -> ipnet::Ipv4Net {
    let status = b.client().status().unwrap();
    let n = status
        .networks
        .iter()
        .find(|n| n.name == network)
        .unwrap_or_else(|| panic!("network {network} not in status: {status:?}"));
    n.subnet.parse().unwrap()
}

fn gateway_of(b: &Broker, network: &str) -> String {
    let status = b.client().status().unwrap();
    status
        .networks
        .iter()
        .find(|n| n.name == network)
        .unwrap()
        .gateway
        .clone()
}

fn report(test: &str, started: Instant, outs: &[&VmOutput]) {
    let vms: Vec<String> = outs
        .iter()
        .map(|o| {
            format!(
                "{:.1}s (guest uptime {:.1}->{:.1})",
                o.elapsed.as_secs_f64(),
                o.booted_at.unwrap_or(f64::NAN),
                o.done_at.unwrap_or(f64::NAN)
            )
        })
        .collect();
    eprintln!(
        "{test}: {:.1}s wall, QEMU runs {}",
        started.elapsed().as_secs_f64(),
        vms.join(" ")
    );
}

/// Each guest of a pair: lease, finds the peer through the broker's DNS by its bare name,
/// through the search domain DHCP gave and by FQDN, pings the gateway and the peer, and stays
/// up until the peer says it is done, having pinged it at least twice (its `pings_name` and
/// its FQDN ping).
fn pair_script(peer: &str, network: &str) -> String {
    format!(
        r#"
check dhcp dhcp eth0
listen_done
result hostname "$(hostname)"
result dns_server "$(nslookup {peer} 2>/dev/null | awk '/^Server:/ {{ print $2 }}')"
check peer_up wait_for 90 pings_name {peer}
# With a trailing dot busybox nslookup skips the search domain: the bare name itself.
result peer_short "$(resolve {peer}.)"
result peer_search "$(resolve {peer})"
result peer_fqdn "$(resolve {peer}.{network}.vmnet)"
check ping_gateway ping -c 1 -W 2 "$(gateway)"
check ping_peer_fqdn ping -c 1 -W 2 "$(resolve {peer}.{network}.vmnet)"
check told_peer tell_done "$(resolve {peer})"
check told wait_for 90 told
check pinged_by_peer got_echos 2
"#
    )
}

fn assert_pair(a: &VmOutput, b: &VmOutput, names: (&str, &str), subnet: ipnet::Ipv4Net) {
    for (me, peer, name) in [(a, b, names.0), (b, a, names.1)] {
        me.assert_success();
        let ip = ip_of(me, "eth0");
        assert!(subnet.contains(&ip), "{ip} not in {subnet}");
        assert_eq!(me.result("hostname"), name, "DHCP gave the hostname back");
        let gw = me.dhcp["eth0"]["router"].clone();
        assert_eq!(me.result("dns_server"), gw, "the gateway is the DNS server");
        let peer_ip = ip_of(peer, "eth0").to_string();
        assert_eq!(me.result("peer_short"), peer_ip, "{}", me.console);
        assert_eq!(me.result("peer_search"), peer_ip, "{}", me.console);
        assert_eq!(me.result("peer_fqdn"), peer_ip, "{}", me.console);
        for k in [
            "peer_up",
            "ping_gateway",
            "ping_peer_fqdn",
            "told_peer",
            "told",
            "pinged_by_peer",
        ] {
            assert_eq!(me.result(k), "ok", "{k}:\n{}", me.console);
        }
    }
}

/// Scenario 1: Two VMs on `shared`: leases in its subnet, the gateway and each other reachable, and
/// each other's hostnames resolved by the broker's DNS (short name and `NAME.shared.vmnet`).
#[test]
fn two_vms_on_shared_lease_ping_and_resolve_each_other() {
    let t = Instant::now();
    let b = Broker::start(Options::default());
    let outs = boot_all(
        &b,
        &[
            guest(&["shared"], spec("alpha", &pair_script("bravo", "shared"))),
            guest(&["shared"], spec("bravo", &pair_script("alpha", "shared"))),
        ],
    );
    assert_pair(
        &outs[0],
        &outs[1],
        ("alpha", "bravo"),
        subnet_of(&b, "shared"),
    );
    assert_ne!(ip_of(&outs[0], "eth0"), ip_of(&outs[1], "eth0"));
    report("two_vms_on_shared", t, &[&outs[0], &outs[1]]);
}

/// A TCP server in `ns` on `addr:port` that answers each connection with the peer's
/// address and appends it to a log; killed on drop.
struct Outside {
    server: Child,
    log: tempfile::NamedTempFile,
}

impl Outside {
    fn start(ns: &Netns, addr: &str, port: u16) -> Outside {
        netns::require("/usr/bin/python3", "python3");
        let log = tempfile::NamedTempFile::new().unwrap();
        let program = format!(
            r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{addr}", {port}))
s.listen(8)
print("listening", flush=True)
while True:
    c, (peer, _) = s.accept()
    with open(sys.argv[1], "a") as f:
        f.write(peer + "\n")
    c.sendall((peer + "\n").encode())
    c.close()
"#
        );
        let mut server = ns
            .cmd("/usr/bin/python3")
            .args(["-c", &program])
            .arg(log.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start python3");
        // Wait until it listens.
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "listening", "outside server did not start");
        Outside { server, log }
    }

    fn sources(&self) -> Vec<String> {
        std::fs::read_to_string(self.log.path())
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A namespace standing for the internet behind the broker namespace's uplink: a veth
/// whose end `uplink` in the broker's namespace is 203.0.113.2/24 (TEST-NET-3) and whose
/// other end `wan` is 203.0.113.1/24.
fn outside_on_uplink(b: &Broker) -> Netns {
    let outside = Netns::new("outside");
    netns::run_ok(Command::new("ip").args([
        "-n",
        &b.ns.name,
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "wan",
        "netns",
        &outside.name,
    ]));
    outside.sh("ip addr add 203.0.113.1/24 dev wan && ip link set wan up");
    b.ns.sh("ip addr add 203.0.113.2/24 dev uplink && ip link set uplink up");
    outside
}

/// Scenario 2: A VM on `shared` reaches a host outside (a second namespace standing for the
/// internet, behind the broker namespace's uplink) and is seen there with the uplink's
/// address (NAT); a VM on `host` reaches its gateway but not the outside.
#[test]
fn shared_vm_reaches_the_outside_through_nat_and_host_vm_does_not() {
    let t = Instant::now();
    let b = Broker::start(Options::default());
    let outside = outside_on_uplink(&b);
    // Default route via the outside.
    b.ns.sh("ip route add default via 203.0.113.1");
    let server = Outside::start(&outside, "203.0.113.1", 8080);

    let shared = r#"
check dhcp dhcp eth0
check ping_gateway ping -c 1 -W 2 "$(gateway)"
fetch() { nc -w 3 203.0.113.1 8080 </dev/null >/tmp/seen && [ -s /tmp/seen ]; }
check tcp_outside wait_for 15 fetch
result seen_as "$(cat /tmp/seen)"
check ping_outside ping -c 1 -W 2 203.0.113.1
"#;
    let host = r#"
check dhcp dhcp eth0
check ping_gateway ping -c 1 -W 2 "$(gateway)"
check ping_outside ping -c 2 -i 0.2 -W 1 203.0.113.1 || true
check tcp_outside nc -w 2 203.0.113.1 8080 </dev/null || true
"#;
    let outs = boot_all(
        &b,
        &[
            guest(&["shared"], spec("natted", shared)),
            guest(&["host"], spec("hosted", host)),
        ],
    );
    let (s, h) = (&outs[0], &outs[1]);
    s.assert_success();
    h.assert_success();
    assert!(subnet_of(&b, "shared").contains(&ip_of(s, "eth0")));
    assert!(subnet_of(&b, "host").contains(&ip_of(h, "eth0")));
    assert_eq!(s.result("ping_gateway"), "ok");
    assert_eq!(s.result("tcp_outside"), "ok", "{}", s.console);
    assert_eq!(s.result("ping_outside"), "ok", "{}", s.console);
    assert_eq!(
        s.result("seen_as"),
        "203.0.113.2",
        "NAT to the uplink address"
    );
    assert_eq!(h.result("ping_gateway"), "ok", "{}", h.console);
    assert_eq!(h.result("ping_outside"), "fail", "{}", h.console);
    assert_eq!(h.result("tcp_outside"), "fail", "{}", h.console);
    // Every connection the outside saw came from the uplink address (a retry of `fetch`
    // may have made more than one); the host VM's never completed.
    let sources = server.sources();
    assert!(
        !sources.is_empty() && sources.iter().all(|s| s == "203.0.113.2"),
        "sources seen outside: {sources:?}"
    );
    report("outside_nat", t, &[s, h]);
}

/// Scenario 3: Two launchers of different uids share `shared`: their VMs ping each other, and
/// `status` lists both uids while they run.
/// Whether `status` text lists a client of `uid` holding `shared`.
fn holds_shared(text: &str, uid: u32) -> bool {
    text.lines()
        .any(|l| l.split_whitespace().nth(2) == Some(&uid.to_string()) && l.ends_with("shared"))
}

#[test]
fn vms_of_two_uids_share_a_network() {
    let t = Instant::now();
    let b = Broker::start(Options::default());
    // Let any uid reach the socket (the default is 0660 root:vmnet-broker).
    b.ns.sh(&format!("chmod 0666 {}", b.socket.display()));
    let uids = [4101u32, 4102];
    let guests = [
        Guest {
            uid: Some(uids[0]),
            ..guest(&["shared"], spec("uid-a", &pair_script("uid-b", "shared")))
        },
        Guest {
            uid: Some(uids[1]),
            ..guest(&["shared"], spec("uid-b", &pair_script("uid-a", "shared")))
        },
    ];
    let (outs, seen, text) = std::thread::scope(|s| {
        let outs = s.spawn(|| boot_all(&b, &guests));
        // While they run, status must show both uids holding the network (a client is
        // listed from its connect on, before its acquire is done: only holders count).
        let mut seen = BTreeSet::new();
        let mut text = String::new();
        while !outs.is_finished() && seen.len() < 2 {
            let st = b.client().status().unwrap();
            seen = st
                .clients
                .iter()
                .filter(|c| c.networks.iter().any(|n| n == "shared"))
                .map(|c| c.uid)
                .filter(|u| uids.contains(u))
                .collect();
            if seen.len() == 2 {
                let out = b.cli(&["status"]).output().unwrap();
                text = String::from_utf8_lossy(&out.stdout).into_owned();
                // The command's own view, a moment later: asked again while the VMs run
                // if a holder was between states then.
                if !uids.iter().all(|u| holds_shared(&text, *u)) {
                    seen.clear();
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (outs.join().unwrap(), seen, text)
    });
    assert_pair(
        &outs[0],
        &outs[1],
        ("uid-a", "uid-b"),
        subnet_of(&b, "shared"),
    );
    assert_eq!(seen, BTreeSet::from(uids), "status did not show both uids");
    for uid in uids {
        assert!(
            holds_shared(&text, uid),
            "uid {uid} not in `status`:\n{text}"
        );
    }
    report("two_uids", t, &[&outs[0], &outs[1]]);
}

/// Scenario 4: A network from a config file with a fixed subnet: a VM's lease is inside it, and a
/// VM whose MAC has a reservation gets the reserved address.
#[test]
fn config_network_with_fixed_subnet_and_reservation() {
    let t = Instant::now();
    let reserved_mac = "52:54:00:77:00:10";
    let b = Broker::start(Options {
        files: vec![(
            "lab.json".into(),
            format!(
                r#"{{"subnet": "192.168.77.1", "mask": "255.255.255.0",
                    "dhcp_reservations": [{{"mac": "{reserved_mac}", "ip": "192.168.77.10"}}]}}"#
            ),
        )],
        ..Default::default()
    });
    let script = r#"
check dhcp dhcp eth0
result mac "$(cat /sys/class/net/eth0/address)"
check ping_gateway ping -c 1 -W 2 192.168.77.1
"#;
    let reserved_net = format!("lab,mac={reserved_mac}");
    let outs = boot_all(
        &b,
        &[
            guest(&["lab"], spec("lab-dyn", script)),
            guest(&[&reserved_net], spec("lab-res", script)),
        ],
    );
    let subnet: ipnet::Ipv4Net = "192.168.77.0/24".parse().unwrap();
    assert_eq!(subnet_of(&b, "lab"), subnet);
    for o in &outs {
        o.assert_success();
        assert_eq!(o.result("ping_gateway"), "ok", "{}", o.console);
        assert_eq!(o.dhcp["eth0"]["router"], "192.168.77.1");
        assert!(subnet.contains(&ip_of(o, "eth0")), "{}", o.console);
    }
    assert_ne!(ip_of(&outs[0], "eth0"), Ipv4Addr::new(192, 168, 77, 10));
    assert_eq!(outs[1].result("mac"), reserved_mac);
    assert_eq!(ip_of(&outs[1], "eth0"), Ipv4Addr::new(192, 168, 77, 10));
    report("fixed_subnet", t, &[&outs[0], &outs[1]]);
}

/// Scenario 5: One VM with a NIC on `shared` and one on `host`: a lease on each, each in its
/// network's subnet, both gateways reachable.
#[test]
fn vm_with_two_nics_on_two_networks() {
    let t = Instant::now();
    let b = Broker::start(Options::default());
    let script = r#"
check dhcp0 dhcp eth0
check dhcp1 dhcp eth1
check ping_gw0 ping -c 1 -W 2 "$(lease eth0 router)"
check ping_gw1 ping -c 1 -W 2 "$(lease eth1 router)"
"#;
    let outs = boot_all(&b, &[guest(&["shared", "host"], spec("twonics", script))]);
    let o = &outs[0];
    o.assert_success();
    let (shared, host) = (subnet_of(&b, "shared"), subnet_of(&b, "host"));
    assert_ne!(shared, host);
    assert!(
        shared.contains(&ip_of(o, "eth0")),
        "eth0 not on shared:\n{}",
        o.console
    );
    assert!(
        host.contains(&ip_of(o, "eth1")),
        "eth1 not on host:\n{}",
        o.console
    );
    assert_eq!(o.dhcp["eth0"]["router"], gateway_of(&b, "shared"));
    assert_eq!(o.dhcp["eth1"]["router"], gateway_of(&b, "host"));
    for k in ["ping_gw0", "ping_gw1"] {
        assert_eq!(o.result(k), "ok", "{}", o.console);
    }
    report("two_nics", t, &[o]);
}

/// Scenario 6: A VM restarted with the same MAC (`--network shared,mac=MAC`) gets its address back,
/// also after a broker restart (the lease file is in the state dir). The first round boots
/// two VMs and follows the one with the higher address, so that address is neither the
/// lowest free one nor what a new MAC would get.
#[test]
fn vm_keeps_its_address_across_restarts_and_a_broker_restart() {
    let t = Instant::now();
    let mut b = Broker::start(Options::default());
    let script = r#"
check dhcp dhcp eth0
result mac "$(cat /sys/class/net/eth0/address)"
"#;
    let first = boot_all(
        &b,
        &[
            guest(&["shared"], spec("keep-a", script)),
            guest(&["shared"], spec("keep-b", script)),
        ],
    );
    first.iter().for_each(VmOutput::assert_success);
    let keeper = first.iter().max_by_key(|o| ip_of(o, "eth0")).unwrap();
    let (ip, mac) = (ip_of(keeper, "eth0"), keeper.result("mac").to_string());
    let with_mac = format!("shared,mac={mac}");

    let again = boot_all(&b, &[guest(&[&with_mac], spec("keep-again", script))]);
    again[0].assert_success();
    assert_eq!(again[0].result("mac"), mac);
    assert_eq!(ip_of(&again[0], "eth0"), ip, "same MAC, same address");

    // Restart the broker: its networks go, the lease file stays.
    b.stop();
    b.spawn(&Options::default());
    let after = boot_all(&b, &[guest(&[&with_mac], spec("keep-after", script))]);
    after[0].assert_success();
    assert_eq!(
        ip_of(&after[0], "eth0"),
        ip,
        "address kept across a broker restart; broker log:\n{}",
        b.log()
    );
    report("restart", t, &[&first[0], &first[1], &again[0], &after[0]]);
}

/// Scenario 7: SIGKILL of one QEMU: its TAP goes at once, the network stays for the other VM (which
/// still reaches the gateway), and once both are gone and the idle timeout has passed
/// nothing of the broker's is left in the kernel.
#[test]
fn killed_qemu_loses_its_tap_and_the_network_goes_when_idle() {
    let t = Instant::now();
    let b = Broker::start(Options {
        idle_timeout: 1.0,
        ..Default::default()
    });
    let victim = r#"
check dhcp dhcp eth0
check pinged wait_for 90 got_echos 1
sleep 600
"#;
    let survivor = r#"
check dhcp dhcp eth0
check peer_up wait_for 90 pings_name victim
peer=$(resolve victim)
# The test kills the victim's QEMU once it was pinged: wait until it stops answering.
gone() { ! ping -c 1 -W 1 "$peer" >/dev/null; }
check peer_gone wait_for 60 gone
check ping_gateway ping -c 3 -i 0.2 -W 1 "$(gateway)"
"#;
    let v = Running::start(&b, &guest(&["shared"], spec("victim", victim)));
    let s = Running::start(&b, &guest(&["shared"], spec("survivor", survivor)));
    assert_eq!(v.wait_result("pinged", VM_TIMEOUT), "ok");
    // The victim counts the echo request before its reply reaches the survivor (under
    // TCG that can take longer than the survivor's `ping -W 1`): killed at once, it left
    // the survivor's `peer_up` failing now and then. Killed once the survivor has it.
    assert_eq!(s.wait_result("peer_up", VM_TIMEOUT), "ok");

    let qemu = v.qemu_pid();
    // The TAP of the victim, from the env `vmnet-broker run` gave QEMU.
    let env = std::fs::read(format!("/proc/{qemu}/environ")).unwrap();
    let networks = env
        .split(|&c| c == 0)
        .find_map(|kv| kv.strip_prefix(b"VMNET_BROKER_NETWORKS="))
        .expect("QEMU has VMNET_BROKER_NETWORKS");
    let networks: serde_json::Value = serde_json::from_slice(networks).unwrap();
    let tap = networks[0]["interface"].as_str().unwrap().to_string();
    assert!(b.ns.links().contains(&tap));
    assert_eq!(b.client().status().unwrap().networks[0].taps.len(), 2);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    b.wait_for("the victim's TAP to go", Duration::from_secs(5), || {
        b.tap_released(&tap)
    });
    let (status, _) = v.wait(Duration::from_secs(10) + t.elapsed());
    assert_eq!(
        status.code(),
        Some(128 + 9),
        "run reports QEMU's SIGKILL as 137"
    );
    let st = b.client().status().unwrap();
    assert_eq!(st.networks.len(), 1, "the network stays for the survivor");
    assert_eq!(st.networks[0].taps.len(), 1);
    // Clients holding networks (the status query itself is a client too).
    let holders = st.clients.iter().filter(|c| !c.networks.is_empty());
    assert_eq!(holders.count(), 1);

    let (status, out) = s.wait(VM_TIMEOUT);
    assert!(status.success(), "survivor's run: {status}\n{}", out.stderr);
    out.assert_success();
    for k in ["peer_up", "peer_gone", "ping_gateway"] {
        assert_eq!(out.result(k), "ok", "{k}:\n{}", out.console);
    }

    b.wait_for("idle removal", Duration::from_secs(10), || {
        b.client().status().unwrap().networks.is_empty()
    });
    assert_eq!(b.ns.links(), Vec::<String>::new(), "links left behind");
    assert_eq!(b.ns.nft_tables().trim(), "", "nftables left behind");
    eprintln!("sigkill: {:.1}s wall", t.elapsed().as_secs_f64());
}

/// Scenario 8: Anti-spoofing: a VM that changes its MAC after DHCP cannot reach the other VM, while
/// it could with its real MAC before and can again after restoring it.
#[test]
fn vm_with_a_forged_mac_cannot_reach_the_other_vm() {
    let t = Instant::now();
    let b = Broker::start(Options::default());
    let forger = r#"
check dhcp dhcp eth0
real=$(cat /sys/class/net/eth0/address)
check control wait_for 90 pings_name honest
peer=$(resolve honest)
ip link set eth0 address 52:54:00:66:66:66
ip neigh flush dev eth0
result forged_mac "$(cat /sys/class/net/eth0/address)"
check forged ping -c 2 -i 0.2 -W 1 "$peer" || true
ip link set eth0 address "$real"
ip neigh flush dev eth0
check restored wait_for 10 ping -c 1 -W 1 "$peer"
check told tell_done "$peer"
"#;
    // Stays up until the forger says it is done (see `listen_done`).
    let honest = r#"
check dhcp dhcp eth0
listen_done
check told wait_for 100 told
check pinged got_echos 2
"#;
    let outs = boot_all(
        &b,
        &[
            guest(&["shared"], spec("forger", forger)),
            guest(&["shared"], spec("honest", honest)),
        ],
    );
    let (f, h) = (&outs[0], &outs[1]);
    let both = format!("forger:\n{}\nhonest:\n{}", f.console, h.console);
    assert_eq!(f.result("control"), "ok", "{both}");
    assert_eq!(f.result("forged_mac"), "52:54:00:66:66:66", "{}", f.console);
    assert_eq!(
        f.result("forged"),
        "fail",
        "forged MAC got through:\n{}",
        f.console
    );
    assert_eq!(f.result("restored"), "ok", "{both}");
    assert_eq!(f.result("told"), "ok", "{both}");
    assert_eq!(h.result("told"), "ok", "{both}");
    assert_eq!(h.result("pinged"), "ok", "{both}");
    f.assert_success();
    h.assert_success();
    report("forged_mac", t, &[f, h]);
}

/// Scenario (issue 16): one network across two hosts over VXLAN. Two network namespaces
/// joined by a veth underlay are the hosts, a broker in each; each boots a guest, which
/// leases its address from its own host's DHCP (its range, its gateway as router, the
/// overlay's MTU) and pings the other guest across the overlay.
#[test]
fn two_hosts_one_network_over_vxlan() {
    let t = Instant::now();
    let ul = underlay::Underlay::new();
    // Host n: gateway 10.90.0.n, its own range, the guest's MAC reserved at a known address
    // of that range so the other guest knows whom to ping.
    let host = |n: u8, peer: u8| {
        let (start, end, reserved) = (10 + 40 * n, 49 + 40 * n, 20 + 40 * n);
        let file = format!(
            r#"{{"subnet":"10.90.0.{n}","mask":"255.255.255.0",
                "dhcp_range":{{"start":"10.90.0.{start}","end":"10.90.0.{end}"}},
                "dhcp_reservations":[{{"mac":"52:54:00:16:00:0{n}","ip":"10.90.0.{reserved}"}}],
                "vxlan":{{"vni":4242,"local":"192.0.2.{n}","peers":["192.0.2.{peer}"]}}}}"#
        );
        let b = Broker::start_in(
            ul.host(n),
            Options {
                files: vec![("lab.json".into(), file)],
                extra_args: vec!["--host-id".into(), format!("e2e-host-{n}")],
                ..Default::default()
            },
        );
        (b, format!("10.90.0.{reserved}"))
    };
    let (b1, ip1) = host(1, 2);
    let (b2, ip2) = host(2, 1);
    let script = |peer: &str| {
        format!(
            r#"
check dhcp dhcp eth0
result mtu "$(cat /sys/class/net/eth0/mtu)"
check ping_gateway ping -c 1 -W 2 "$(gateway)"
listen_done
check ping_peer wait_for 90 ping -c 1 -W 1 {peer}
check told_peer tell_done {peer}
check told wait_for 90 told
check pinged_by_peer got_echos 1
"#
        )
    };
    let g1 = guest(&["lab,mac=52:54:00:16:00:01"], spec("vx1", &script(&ip2)));
    let g2 = guest(&["lab,mac=52:54:00:16:00:02"], spec("vx2", &script(&ip1)));
    vm::guest_image();
    let (r1, r2) = (Running::start(&b1, &g1), Running::start(&b2, &g2));
    let (s1, o1) = r1.wait(VM_TIMEOUT);
    let (s2, o2) = r2.wait(VM_TIMEOUT);
    for (n, status, o, ip) in [(1, s1, &o1, &ip1), (2, s2, &o2, &ip2)] {
        assert!(
            status.success(),
            "host {n}: run exited {status}\n{}",
            o.console
        );
        o.assert_success();
        assert_eq!(ip_of(o, "eth0").to_string(), *ip, "{}", o.console);
        assert_eq!(
            o.dhcp["eth0"]["router"],
            format!("10.90.0.{n}"),
            "its own gateway"
        );
        assert_eq!(
            o.result("mtu"),
            "1450",
            "the underlay's 1500 less VXLAN's 50"
        );
        for k in [
            "ping_gateway",
            "ping_peer",
            "told_peer",
            "told",
            "pinged_by_peer",
        ] {
            assert_eq!(o.result(k), "ok", "host {n} {k}:\n{}", o.console);
        }
    }
    report("vxlan", t, &[&o1, &o2]);
}

/// `vmnet-broker run --forward tcp:2222:22` and a static forward of the network file
/// (port 2223 to the guest's reserved address, port 22): the host reaches the guest's
/// port 22 through both on localhost (the broker's loopback relay) and on its uplink
/// address (DNAT); the dynamic forward goes with the VM, and the static one reaches
/// nothing once the VM is gone.
#[test]
fn run_forward_reaches_the_guests_listener_while_it_runs() {
    let b = Broker::start(Options {
        files: vec![(
            "fwd.json".into(),
            r#"{"mode": "shared", "subnet": "10.77.0.1",
                "dhcp_reservations": [{"mac": "52:54:00:77:00:05", "ip": "10.77.0.5"}],
                "port_forwarding_rules": [{"protocol": "tcp", "external_port": 2223,
                                           "internal_address": "10.77.0.5", "internal_port": 22}]}"#
                .into(),
        )],
        ..Options::default()
    });
    let outside = outside_on_uplink(&b);
    // The guest serves a greeting on port 22 until two connections were served.
    let script = r#"
check dhcp dhcp eth0
printf '#!/bin/sh\necho "hello from $(hostname)"\necho x >> /tmp/served\n' > /tmp/serve
chmod +x /tmp/serve
nc -ll -p 22 -e /tmp/serve &
served_four() { [ "$(wc -l < /tmp/served 2>/dev/null || echo 0)" -ge 4 ]; }
result listening yes
check served wait_for 90 served_four
"#;
    let mut g = guest(&["fwd,mac=52:54:00:77:00:05"], spec("forwarded", script));
    g.forwards = vec!["tcp:2222:22".into()];
    let vm = Running::start(&b, &g);
    vm.wait_result("listening", VM_TIMEOUT);
    for (ns, to) in [
        (&b.ns, "127.0.0.1:2222"),
        (&outside, "203.0.113.2:2222"),
        (&b.ns, "127.0.0.1:2223"),
        (&outside, "203.0.113.2:2223"),
    ] {
        let to: std::net::SocketAddr = to.parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = ns.run(|| {
                use std::io::Read;
                let mut text = String::new();
                match std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
                    Ok(mut c) => {
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let _ = c.read_to_string(&mut text);
                        text
                    }
                    Err(e) => format!("connect: {e}"),
                }
            });
            if last.starts_with("hello from forwarded") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{to}: {last}\n{}",
                vm.console().console
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let (status, out) = vm.wait(VM_TIMEOUT);
    assert!(status.success(), "{status}: {}{}", out.console, out.stderr);
    assert_eq!(out.result("served"), "ok", "{}", out.console);
    // The VM is gone, and the forward with it: rules and port.
    b.wait_for(
        "the forward to go with the VM",
        Duration::from_secs(30),
        || {
            !b.ns
                .sh("nft list table inet vmnet_broker")
                .contains("dport 2222")
                && b.ns
                    .run(|| std::net::TcpListener::bind(("0.0.0.0", 2222)))
                    .is_ok()
        },
    );
    // The static forward stays with its network, and reaches nothing without the VM.
    for (ns, to) in [(&b.ns, "127.0.0.1:2223"), (&outside, "203.0.113.2:2223")] {
        let to: std::net::SocketAddr = to.parse().unwrap();
        let text = ns.run(|| {
            use std::io::Read;
            let mut text = String::new();
            if let Ok(mut c) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
                c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let _ = c.read_to_string(&mut text);
            }
            text
        });
        assert!(!text.contains("hello"), "{to} after the VM: {text}");
    }
}

/// Issue 14, IPv6, as guests see it: two guests on a `shared` network with a fixed prefix
/// number themselves by SLAAC from the broker's Router Advertisements (their EUI-64
/// addresses) and take the gateway as default router; one pings the IPv6 gateway, finds
/// its own and its peer's AAAA records through the broker's DNS (the resolver DHCP gave
/// it), pings the peer over IPv6, and reaches a host outside over NAT66: the outside
/// namespace has no route back to the network's prefix, so only a masqueraded echo can
/// be answered. A guest on `host`, given a default route by hand, reaches nothing outside.
#[test]
fn vms_get_slaac_addresses_ping_each_other_resolve_aaaa_and_reach_outside_over_nat66() {
    let t = Instant::now();
    let b = Broker::start(Options {
        files: vec![(
            "six.json".into(),
            r#"{"mode": "shared", "ipv6_prefix": "fd00:6:6:6::"}"#.into(),
        )],
        ..Options::default()
    });
    let outside = outside_on_uplink(&b);
    outside.sh("ip -6 addr add 2001:db8:1::1/64 dev wan nodad");
    b.ns.sh(
        "ip -6 addr add 2001:db8:1::2/64 dev uplink nodad && ip -6 route add default via 2001:db8:1::1",
    );
    let common = r#"
check dhcp dhcp eth0
global6() { ip -6 addr show dev eth0 | grep 'scope global' | grep -v tentative | sed -n 's/.*inet6 \([0-9a-f:]*\)\/64.*/\1/p' | head -n1; }
has_global6() { [ -n "$(global6)" ]; }
check slaac wait_for 30 has_global6
result address6 "$(global6)"
aaaa() { nslookup -type=aaaa "$1" 2>/dev/null | awk '/^Name:/ { n = 1 } n && /^Address/ { sub(/^Address:[ \t]*/, ""); print; exit }'; }
has_aaaa() { [ -n "$(aaaa "$1")" ]; }
echos6() { awk '/^Icmp6InEchos[ \t]/ { print $2 }' /proc/net/snmp6; }
got_echos6() { [ "$(echos6)" -ge "$1" ]; }
"#;
    let alpha = format!(
        r#"{common}
result default6 "$(ip -6 route | grep '^default' | head -n1)"
check ping_gateway6 ping -6 -c 1 -W 2 fd00:6:6:6::1
check aaaa wait_for 15 has_aaaa "$(hostname).six.vmnet"
result aaaa "$(aaaa "$(hostname).six.vmnet")"
check peer_aaaa wait_for 90 has_aaaa bravo6.six.vmnet
result peer_aaaa "$(aaaa bravo6.six.vmnet)"
check ping_peer6 wait_for 60 ping -6 -c 1 -W 2 "$(aaaa bravo6.six.vmnet)"
check told_peer tell_done "$(resolve bravo6)"
check ping_outside6 wait_for 15 ping -6 -c 1 -W 2 2001:db8:1::1
"#
    );
    let bravo = format!(
        r#"{common}
listen_done
check told wait_for 90 told
check pinged6 got_echos6 1
"#
    );
    let hosted = format!(
        r#"{common}
ip -6 route replace default via fe80::1 dev eth0
check ping_outside6 ping -6 -c 2 -i 0.2 -W 1 2001:db8:1::1 || true
"#
    );
    let outs = boot_all(
        &b,
        &[
            guest(&["six,mac=52:54:00:06:06:06"], spec("alpha6", &alpha)),
            guest(&["six,mac=52:54:00:06:06:07"], spec("bravo6", &bravo)),
            guest(&["host"], spec("hosted6", &hosted)),
        ],
    );
    let (a, p, h) = (&outs[0], &outs[1], &outs[2]);
    a.assert_success();
    p.assert_success();
    h.assert_success();
    // EUI-64 of 52:54:00:06:06:06 and :07 in fd00:6:6:6::/64.
    let (want_a, want_p) = ("fd00:6:6:6:5054:ff:fe06:606", "fd00:6:6:6:5054:ff:fe06:607");
    assert_eq!(a.result("slaac"), "ok", "{}", a.console);
    assert_eq!(a.result("address6"), want_a, "{}", a.console);
    assert_eq!(p.result("address6"), want_p, "{}", p.console);
    assert!(
        a.result("default6")
            .starts_with("default via fe80::1 dev eth0"),
        "{}",
        a.console
    );
    assert_eq!(a.result("ping_gateway6"), "ok", "{}", a.console);
    assert_eq!(a.result("aaaa"), want_a, "{}", a.console);
    assert_eq!(a.result("peer_aaaa"), want_p, "{}", a.console);
    assert_eq!(a.result("ping_peer6"), "ok", "{}", a.console);
    assert_eq!(a.result("told_peer"), "ok", "{}", a.console);
    assert_eq!(p.result("told"), "ok", "{}", p.console);
    assert_eq!(p.result("pinged6"), "ok", "{}", p.console);
    assert_eq!(a.result("ping_outside6"), "ok", "NAT66: {}", a.console);
    assert_eq!(h.result("slaac"), "ok", "{}", h.console);
    assert_eq!(
        h.result("ping_outside6"),
        "fail",
        "host forwards nothing: {}",
        h.console
    );
    report("slaac", t, &[a, p, h]);
}
