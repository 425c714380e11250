#![cfg(target_os = "linux")]
//! Issue 11, item 7: real QEMU guests keep their network while the broker dies.
//!
//! Two guests on `shared` ping each other ten times a second (`ping -i 0.1`) and resolve
//! each other's names through the broker's DNS in a loop, while the broker is SIGKILLed
//! and started again three times (same state directory, same socket path: the new broker
//! adopts the networks through its state file, src/state.rs). Then a third guest joins
//! the adopted network and reaches both. Asserted:
//!
//! - no ping lost: every sequence number ping sent has its reply (only the very last one,
//!   in flight when the guest stops ping with SIGINT, may be missing), from ping's own
//!   output inside the guest;
//! - DNS answers again within a second of each start: from the moment the new broker's
//!   socket accepts a connection (it serves only after adoption, as it sends READY=1) to
//!   the first correct answer to the test's own resolver, which asks the gateway for a
//!   guest's name every 20 ms from a namespace plugged into the bridge. The guests' own
//!   resolve loops must answer again too (measured, not held to the second: one round of
//!   such a loop takes a few hundred ms under TCG);
//! - the new guest gets a lease, resolves both others and pings them, and they it.
//!
//! The guests run under `vmnet-broker run` (as in tests/vm_e2e.rs): its connection dies
//! with each broker, the VMs keep their TAPs. Three TCG boots in all; deadlines are
//! generous, since the machine may be busy.

#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;
#[path = "support/vm.rs"]
mod vm;

use nix::sys::signal::Signal;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Broker, Netns, Options};
use vm::{PreparedVm, VmOutput, VmSpec};

/// Boot, lease and finding the peer, with two or three TCG guests on two shared cores.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
/// What the issue asks: DNS answers again within a second of each start.
const DNS_BACK: Duration = Duration::from_secs(1);
const RESTARTS: usize = 3;

/// Shell helpers for the guests, on top of scripts/guest/functions.sh (as in vm_e2e.rs).
const HELPERS: &str = r#"
resolve() {
    nslookup -timeout=1 -type=a "$1" 2>/dev/null |
        awk '/^Name:/ { n = 1 } n && /^Address/ { sub(/^Address:[ \t]*/, ""); print; exit }'
}
pings_name() {
    local ip
    ip=$(resolve "$1")
    [ -n "$ip" ] && ping -c 1 -W 1 "$ip" >/dev/null
}
"#;

/// A guest that pings `peer` at 10/s and resolves it in a loop (one `VMNB-DNS n=N ok|fail`
/// line per query on the console, `ok` only for the peer's right address) until `joiner`
/// resolves and answers a ping; then it stops ping with SIGINT and reports what ping
/// saw: `ping_tx` (sent), `ping_rx` (replies) and `ping_missing` (sequence numbers without
/// a reply, the last one sent excepted: it may be in flight at the SIGINT). It stays up
/// afterwards (the test kills it) so the joiner can reach it.
fn pinger_script(peer: &str, joiner: &str) -> String {
    format!(
        r#"
check dhcp dhcp eth0
check peer_up wait_for 200 pings_name {peer}
peer_ip=$(resolve {peer})
result peer_ip "$peer_ip"
ping -i 0.1 "$peer_ip" >/tmp/ping.log 2>&1 &
pinger=$!
dns_loop() {{
    local n=0 got
    while [ ! -e /tmp/stop ]; do
        n=$((n + 1))
        got=$(resolve {peer})
        if [ "$got" = "$peer_ip" ]; then echo "VMNB-DNS n=$n ok"; else echo "VMNB-DNS n=$n fail $got"; fi
        sleep 0.1
    done
}}
dns_loop &
dns=$!
result pinging ok
check joiner_up wait_for 900 pings_name {joiner}
kill -INT $pinger
wait $pinger
touch /tmp/stop
wait $dns
tx=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' /tmp/ping.log)
rx=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping.log)
result ping_tx "$tx"
result ping_rx "$rx"
result ping_missing "$(awk -v tx="$tx" '
    {{ for (i = 1; i <= NF; i++) if ($i ~ /^seq=/) got[substr($i, 5)] = 1 }}
    END {{ m = ""; for (i = 0; i < tx - 1; i++) if (!(i in got)) m = m i ","; print m }}' /tmp/ping.log)"
result ping_done ok
sleep 900
"#
    )
}

/// The guest that joins after the restarts: a lease, both others by name, pinged. It
/// stays up afterwards (the test kills it): the others must still find it answering when
/// their own `wait_for` loops get round to it, which under TCG on a busy machine can be
/// seconds after it has reached them (a joiner that powered off at once made that a race).
fn joiner_script(a: &str, b: &str) -> String {
    format!(
        r#"
check dhcp dhcp eth0
check reach_{a} wait_for 120 pings_name {a}
check reach_{b} wait_for 120 pings_name {b}
result ip_{a} "$(resolve {a})"
result ip_{b} "$(resolve {b})"
result joined ok
sleep 900
"#
    )
}

fn spec(name: &str, script: &str) -> VmSpec {
    let mut s = VmSpec::new(name, &format!("{HELPERS}\n{script}"));
    s.timeout = BOOT_DEADLINE;
    s
}

/// A guest under `ip netns exec NS vmnet-broker run --network shared -- qemu-from-env
/// qemu ...`, running in the background; killed (with its launcher) on drop.
struct Guest {
    child: Child,
    prepared: PreparedVm,
}

impl Guest {
    fn start(b: &Broker, spec: &VmSpec) -> Guest {
        vm::guest_image();
        let prepared = vm::prepare(spec);
        let stderr = std::fs::File::create(prepared.dir.path().join("stderr.log")).unwrap();
        let mut c = b.ns.cmd(support::BIN);
        c.args(["run", "--network", "shared", "--"])
            .arg(vm::repo_root().join("scripts/qemu-from-env"))
            .args(vm::qemu_argv(spec, &prepared))
            .env("VMNET_BROKER_SOCKET", &b.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        let child = c.spawn().expect("cannot start vmnet-broker run");
        Guest { child, prepared }
    }

    fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.prepared.console).unwrap_or_default())
            .into_owned()
    }

    fn output(&self) -> VmOutput {
        let mut out = vm::parse_output(&self.console_text());
        out.stderr = std::fs::read_to_string(self.prepared.dir.path().join("stderr.log"))
            .unwrap_or_default();
        out
    }

    /// Waits until the console shows result `key`, failing early if the launcher exits.
    fn wait_result(&mut self, key: &str, timeout: Duration, broker: &Broker) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            if let Some(v) = out.results.get(key) {
                return v.clone();
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "guest reported no {key:?} (launcher: {exited:?})\n--- stderr ---\n{}--- console ---\n{}--- broker log ---\n{}",
                out.stderr,
                out.console,
                broker.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The DNS loop's lines (`ok` or not) from byte `from` of the console on.
    fn dns_lines_from(&self, from: usize) -> Vec<bool> {
        let text = self.console_text();
        text.get(from..)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("VMNB-DNS ").map(|(_, r)| r))
            // Only whole lines: the last one may still be being written.
            .filter(|r| r.contains(" ok") || r.contains(" fail"))
            .map(|r| r.contains(" ok"))
            .collect()
    }

    fn console_len(&self) -> usize {
        self.console_text().len()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: kill(2) takes only integers and touches no memory of ours; the group is
        // the one this test created for its child, not yet reaped (waited for below).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A console without the DNS loop's successful queries, for failure messages.
fn brief(console: &str) -> String {
    console
        .lines()
        .filter(|l| !(l.contains("VMNB-DNS ") && l.ends_with(" ok")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The test's own resolver: a namespace plugged into the network's bridge by a veth (a
/// port the broker did not make, so no TAP binding applies to it), from which a thread
/// asks the gateway's DNS for a guest's name every 20 ms and records when a correct
/// answer arrived. Stopped on drop.
struct Probe {
    _ns: Netns,
    answers: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    fn start(
        b: &Broker,
        bridge: &str,
        addr: Ipv4Addr,
        gateway: Ipv4Addr,
        name: &str,
        ip: Ipv4Addr,
    ) -> Probe {
        let ns = Netns::new("probe");
        b.ns.sh(&format!(
            "ip link add vprobe type veth peer name eth0 netns {} && ip link set vprobe master {bridge} up",
            ns.name
        ));
        ns.sh(&format!(
            "ip addr add {addr}/24 dev eth0 && ip link set eth0 up"
        ));
        let answers = Arc::new(Mutex::new(vec![]));
        let stop = Arc::new(AtomicBool::new(false));
        let (path, name) = (ns.path(), name.to_string());
        let (a, s) = (Arc::clone(&answers), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            netns::enter(&path);
            let socket = UdpSocket::bind((addr, 0)).unwrap();
            socket.connect((gateway, 53)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut id: u16 = 0;
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                id = id.wrapping_add(1);
                // Refused (ICMP port unreachable) while no broker listens: asked again.
                if socket.send(&dns_query(id, &name)).is_ok() {
                    while let Ok(n) = socket.recv(&mut buf) {
                        if answers_with(&buf[..n], id, ip) {
                            a.lock().unwrap().push(Instant::now());
                            break;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Probe {
            _ns: ns,
            answers,
            stop,
            thread: Some(thread),
        }
    }

    /// When the first correct answer after `since` arrived, if one did.
    fn first_answer_after(&self, since: Instant) -> Option<Instant> {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .find(|t| **t > since)
            .copied()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A standard query (RD set) for the A record of `name`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    q
}

/// `reply` answers query `id` without error, with at least one record, the last
/// carrying `ip` (no EDNS is asked for, so nothing follows the answers).
fn answers_with(reply: &[u8], id: u16, ip: Ipv4Addr) -> bool {
    reply.len() > 12
        && reply[..2] == id.to_be_bytes()
        && reply[2] & 0x80 != 0
        && reply[3] & 0x0f == 0
        && u16::from_be_bytes([reply[6], reply[7]]) >= 1
        && reply.ends_with(&ip.octets())
}

/// What one restart measured.
struct Restart {
    /// From the SIGKILL until the new broker's socket accepted a connection.
    gap: Duration,
    /// From then until the test's resolver got a correct answer (negative: before).
    dns_back_ms: i64,
    /// From then until each guest printed a correct DNS answer (an upper bound: a
    /// guest's resolve loop takes a few hundred ms a round under TCG).
    guest_dns_back: Vec<Duration>,
    /// DNS queries that failed in each guest between the kill and the socket serving
    /// (evidence that DNS really was down).
    failed_while_down: Vec<usize>,
}

#[test]
fn guests_keep_pinging_and_resolving_across_three_broker_sigkills_and_a_new_vm_joins() {
    let t = Instant::now();
    let opts = Options::default();
    let mut b = Broker::start(Options::default());
    // Declared after the broker: dropped (killed) first.
    let mut guests = [
        Guest::start(&b, &spec("alpha", &pinger_script("bravo", "charlie"))),
        Guest::start(&b, &spec("bravo", &pinger_script("alpha", "charlie"))),
    ];
    for g in guests.iter_mut() {
        assert_eq!(g.wait_result("pinging", BOOT_DEADLINE, &b), "ok");
    }
    let booted = t.elapsed();
    let st = b.client().status().unwrap();
    assert_eq!(st.networks.len(), 1, "{st:?}");
    let bridge = st.networks[0].bridge.clone();
    let taps_before = st.networks[0].taps.clone();
    assert_eq!(taps_before.len(), 2, "{st:?}");
    let gateway: Ipv4Addr = st.networks[0].gateway.parse().unwrap();
    let alpha_ip: Ipv4Addr = guests[1]
        .wait_result("peer_ip", BOOT_DEADLINE, &b)
        .parse()
        .unwrap();
    let probe_ip = {
        let [a, b, c, _] = gateway.octets();
        Ipv4Addr::new(a, b, c, 250)
    };
    let probe = Probe::start(
        &b,
        &bridge,
        probe_ip,
        gateway,
        "alpha.shared.vmnet",
        alpha_ip,
    );
    b.wait_for(
        "the test's resolver to get an answer",
        BOOT_DEADLINE,
        || probe.first_answer_after(t).is_some(),
    );

    let mut restarts = vec![];
    for round in 1..=RESTARTS {
        // Every guest answers DNS before the kill.
        for g in &guests {
            let from = g.console_len();
            b.wait_for("a DNS answer before the kill", BOOT_DEADLINE, || {
                g.dns_lines_from(from).iter().any(|ok| *ok)
            });
        }
        let at_kill: Vec<usize> = guests.iter().map(Guest::console_len).collect();
        let killed = Instant::now();
        b.signal(Signal::SIGKILL);
        let status = b
            .wait_exit(Duration::from_secs(30))
            .expect("the broker did not die of SIGKILL");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        // Same state dir, same socket path, same namespace: spawn returns once the new
        // broker's socket accepts a connection, which it does only after adoption.
        b.spawn(&opts);
        let serving = Instant::now();
        let at_serve: Vec<usize> = guests.iter().map(Guest::console_len).collect();
        b.wait_for(
            "the test's resolver to get an answer",
            BOOT_DEADLINE,
            || probe.first_answer_after(killed).is_some(),
        );
        let answered = probe.first_answer_after(killed).unwrap();
        let dns_back_ms = if answered >= serving {
            (answered - serving).as_millis() as i64
        } else {
            -((serving - answered).as_millis() as i64)
        };
        let mut guest_dns_back = vec![];
        for (g, from) in guests.iter().zip(&at_serve) {
            b.wait_for(
                "a guest's DNS answer after the restart",
                BOOT_DEADLINE,
                || g.dns_lines_from(*from).iter().any(|ok| *ok),
            );
            guest_dns_back.push(serving.elapsed());
        }
        let failed_while_down = guests
            .iter()
            .zip(at_kill.iter().zip(&at_serve))
            .map(|(g, (k, s))| {
                let text = g.console_text();
                text.get(*k..*s)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("VMNB-DNS ") && l.contains(" fail"))
                    .count()
            })
            .collect();
        assert_eq!(
            b.count_in_log("network adopted from the previous broker"),
            round,
            "{}",
            b.log()
        );
        restarts.push(Restart {
            gap: serving - killed,
            dns_back_ms,
            guest_dns_back,
            failed_while_down,
        });
        // The adopted network is the same one, with both VMs' TAPs still on it.
        let st = b.client().status().unwrap();
        assert_eq!(st.networks.len(), 1, "{st:?}");
        assert_eq!(st.networks[0].bridge.clone(), bridge);
        assert_eq!(st.networks[0].taps, taps_before, "{st:?}");
    }
    let log = b.log();
    assert!(!log.contains("removed stale interface"), "{log}");
    assert!(!log.contains("network removed"), "{log}");

    // A new VM joins the adopted network and reaches both; they reach it.
    // Declared after the broker and the guests: dropped (killed) first, only once the
    // others have reported that they reached it.
    let mut charlie = Guest::start(&b, &spec("charlie", &joiner_script("alpha", "bravo")));
    charlie.wait_result("joined", BOOT_DEADLINE, &b);
    let joined = charlie.output();
    for k in ["reach_alpha", "reach_bravo"] {
        assert_eq!(joined.result(k), "ok", "{k}:\n{}", joined.console);
    }

    let mut outs = vec![];
    for g in guests.iter_mut() {
        assert_eq!(g.wait_result("ping_done", BOOT_DEADLINE, &b), "ok");
        outs.push(g.output());
    }
    let summary: Vec<String> = restarts
        .iter()
        .map(|r| {
            format!(
                "gap {:.0} ms, DNS back {} ms (guests: {:?} ms, failed queries while down {:?})",
                r.gap.as_secs_f64() * 1000.0,
                r.dns_back_ms,
                r.guest_dns_back
                    .iter()
                    .map(Duration::as_millis)
                    .collect::<Vec<_>>(),
                r.failed_while_down
            )
        })
        .collect();
    eprintln!(
        "vm_restart: booted in {:.1}s; pings sent/answered {}; restarts: {}; {:.1}s wall",
        booted.as_secs_f64(),
        outs.iter()
            .map(|o| format!(
                "{}/{} (missing {:?})",
                o.result("ping_tx"),
                o.result("ping_rx"),
                o.result("ping_missing")
            ))
            .collect::<Vec<_>>()
            .join(" "),
        summary.join("; "),
        t.elapsed().as_secs_f64()
    );
    for (out, name) in outs.iter().zip(["alpha", "bravo"]) {
        assert_eq!(out.result("joiner_up"), "ok", "{}", out.console);
        assert_eq!(
            joined.result(&format!("ip_{name}")),
            out.dhcp["eth0"]["ip"].split('/').next().unwrap(),
            "charlie resolved {name} to its address"
        );
        let tx: u64 = out.result("ping_tx").parse().unwrap();
        let rx: u64 = out.result("ping_rx").parse().unwrap();
        assert_eq!(
            out.result("ping_missing"),
            "",
            "{name} lost pings (sequence numbers without reply) of {tx} sent:\n{}",
            brief(&out.console)
        );
        assert!(
            rx + 1 >= tx && tx > 0,
            "{name}: {rx} of {tx} pings answered"
        );
    }
    // (The pings ran across every restart: they started before the first kill and were
    // stopped only once charlie, booted after the last restart, answered.)
    for (i, r) in restarts.iter().enumerate() {
        assert!(
            r.dns_back_ms <= DNS_BACK.as_millis() as i64,
            "restart {}: DNS answered {} ms after the socket served (limit {DNS_BACK:?}); \
             broker log:\n{}",
            i + 1,
            r.dns_back_ms,
            b.log()
        );
    }
}
