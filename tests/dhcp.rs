//! Integration tests of the DHCP server against busybox `udhcpc`, on real bridges and
//! veth pairs inside network namespaces these tests create (and delete on drop).
//!
//! Layout per test: a "server" namespace with the bridge(s) carrying the gateway address
//! and the host ends of veth pairs; a "client" namespace with the other ends, where
//! udhcpc runs. The DhcpServer runs in a thread that entered the server namespace.
#![cfg(target_os = "linux")]

#[path = "support/netns.rs"]
mod netns;

use netns::Netns;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use vmnet_broker::config::{DhcpRange, Reservation};
use vmnet_broker::dhcp::{DhcpConfig, DhcpServer, Lease};
use vmnet_broker::mac::Mac;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Lab {
    // Field order = drop order: the servers stop before the namespaces go.
    servers: Option<Servers>,
    dir: tempfile::TempDir,
    client: Netns,
    server: Netns,
}

impl Lab {
    fn new() -> Lab {
        netns::require("busybox", "busybox-static");
        Lab {
            servers: None,
            dir: tempfile::tempdir().unwrap(),
            client: Netns::new("dhcp-cli"),
            server: Netns::new("dhcp-srv"),
        }
    }

    /// A bridge in the server namespace holding `gateway/prefix`.
    fn bridge(&self, name: &str, gateway_cidr: &str) {
        self.server
            .ip(&["link", "add", name, "type", "bridge", "forward_delay", "0"]);
        self.server.ip(&["addr", "add", gateway_cidr, "dev", name]);
        self.server.ip(&["link", "set", name, "up"]);
    }

    /// A veth pair: `vh<i>` in `bridge`, `vc<i>` (MAC `mac`) in the client namespace.
    fn client_port(&self, bridge: &str, i: u32, mac: &str) -> String {
        let host = format!("vh{i}");
        let cli = format!("vc{i}");
        self.server.ip(&[
            "link",
            "add",
            &host,
            "type",
            "veth",
            "peer",
            "name",
            &cli,
            "address",
            mac,
            "netns",
            &self.client.name,
        ]);
        self.server
            .ip(&["link", "set", &host, "master", bridge, "up"]);
        self.client.ip(&["link", "set", &cli, "up"]);
        cli
    }

    fn config(&self, network: &str, bridge: &str, subnet: &str, gateway: &str) -> DhcpConfig {
        DhcpConfig {
            network: network.into(),
            interface: bridge.into(),
            subnet: subnet.parse().unwrap(),
            gateway: gateway.parse().unwrap(),
            range: None,
            reservations: vec![],
            lease_seconds: 600,
            mtu: 1400,
            dns_server: Some(gateway.parse().unwrap()),
            domain: Some(format!("{network}.vmnet")),
            lease_file: self.dir.path().join(format!("{network}.leases.json")),
        }
    }

    fn start(&mut self, configs: Vec<DhcpConfig>) -> Vec<watch::Receiver<Arc<Vec<Lease>>>> {
        assert!(self.servers.is_none());
        let s = Servers::start(&self.server, configs);
        let leases = s.leases.clone();
        self.servers = Some(s);
        leases
    }

    fn stop(&mut self) -> String {
        let s = self.servers.take().expect("servers running");
        s.stop()
    }

    fn log(&self) -> String {
        let s = self.servers.as_ref().expect("servers running");
        String::from_utf8_lossy(&s.log.lock().unwrap()).into_owned()
    }

    fn script(&self) -> PathBuf {
        let path = self.dir.path().join("udhcpc.sh");
        if !path.exists() {
            // Records what udhcpc got. On bound/renew it also configures the address, so
            // that a unicast renewal reply can reach the client.
            let script = r#"#!/bin/sh
case "$1" in
bound|renew)
    ip addr replace "$ip/${mask:-24}" dev "$interface"
    {
        echo "event=$1"
        echo "ip=$ip"
        echo "router=$router"
        echo "dns=$dns"
        echo "subnet=$subnet"
        echo "mtu=$mtu"
        echo "hostname=$hostname"
        echo "domain=$domain"
        echo "lease=$lease"
        echo "serverid=$serverid"
    } > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
    echo "$1 $ip" >> "$OUT.events"
    ;;
esac
exit 0
"#;
            fs::write(&path, script).unwrap();
            run(&["chmod", "755", path.to_str().unwrap()]);
        }
        path
    }

    fn udhcpc_cmd(&self, iface: &str, out: &Path, extra: &[&str]) -> Command {
        let script = self.script();
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.client.name,
            "busybox",
            "udhcpc",
            "-f",
        ])
        .args(["-i", iface, "-s", script.to_str().unwrap()])
        .args(["-t", "3", "-T", "1"])
        .args(extra)
        .env("OUT", out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c
    }

    /// Runs `udhcpc -q -n` once; the variables it got, or None when it got no lease.
    fn dhcp(&self, iface: &str, extra: &[&str]) -> Option<HashMap<String, String>> {
        let out = self.dir.path().join(format!(
            "{iface}-{}.env",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = self.udhcpc_cmd(iface, &out, &["-q", "-n"]);
        cmd.args(extra);
        let res = cmd.output().unwrap();
        if !res.status.success() {
            assert!(
                !out.exists(),
                "udhcpc failed but the script recorded a lease"
            );
            return None;
        }
        // Forget the address again: the next run starts like a fresh client.
        self.client.ip(&["addr", "flush", "dev", iface]);
        Some(read_env(&out))
    }
}

fn read_env(path: &Path) -> HashMap<String, String> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Log lines, captured from the server thread.
#[derive(Clone)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        // Through eprint! so the test harness captures it.
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// DhcpServers running on a current-thread runtime in a thread inside a namespace.
struct Servers {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    leases: Vec<watch::Receiver<Arc<Vec<Lease>>>>,
    log: Arc<Mutex<Vec<u8>>>,
}

impl Servers {
    fn start(ns: &Netns, configs: Vec<DhcpConfig>) -> Servers {
        Self::try_start(ns, configs).unwrap()
    }

    fn try_start(ns: &Netns, configs: Vec<DhcpConfig>) -> Result<Servers, String> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let path = ns.path();
        let buf = LogBuf(log.clone());
        let thread = std::thread::spawn(move || {
            // Only this thread moves into the namespace.
            netns::enter(&path);
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || buf.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish();
            let _guard = tracing::subscriber::set_default(subscriber);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut servers = Vec::new();
                let mut leases = Vec::new();
                for c in configs {
                    match DhcpServer::start(c).await {
                        Ok(s) => {
                            leases.push(s.leases());
                            servers.push(s);
                        }
                        Err(e) => {
                            for s in servers {
                                s.stop().await;
                            }
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(leases));
                let _ = stop_rx.await;
                for s in servers {
                    s.stop().await;
                }
            });
        });
        match ready_rx.recv().unwrap() {
            Ok(leases) => Ok(Servers {
                stop: Some(stop_tx),
                thread: Some(thread),
                leases,
                log,
            }),
            Err(e) => {
                thread.join().unwrap();
                Err(e)
            }
        }
    }

    /// Stops the servers; returns the captured log.
    fn stop(mut self) -> String {
        self.shutdown();
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn mac_bytes(s: &str) -> [u8; 6] {
    s.parse::<Mac>().unwrap().octets()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn lease_of(rx: &watch::Receiver<Arc<Vec<Lease>>>, mac: &str) -> Option<Lease> {
    rx.borrow()
        .iter()
        .find(|l| l.mac == mac_bytes(mac))
        .cloned()
}

const MAC_A: &str = "52:54:00:d4:00:0a";
const MAC_B: &str = "52:54:00:d4:00:0b";

#[test]
fn lease_options_hostname_and_restart_keep_addresses() {
    let mut lab = Lab::new();
    lab.bridge("br0", "10.77.0.1/24");
    let a = lab.client_port("br0", 0, MAC_A);
    let b = lab.client_port("br0", 1, MAC_B);
    let cfg = lab.config("shared", "br0", "10.77.0.0/24", "10.77.0.1");
    let rx = lab.start(vec![cfg.clone()]).remove(0);

    let env_a = lab
        .dhcp(&a, &["-x", "hostname:VM_One.example"])
        .expect("client A gets a lease");
    let ip_a = ip(&env_a["ip"]);
    assert!(cfg.subnet.contains(&ip_a) && ip_a != cfg.gateway, "{ip_a}");
    assert_eq!(env_a["router"], "10.77.0.1");
    assert_eq!(env_a["dns"], "10.77.0.1");
    assert_eq!(env_a["subnet"], "255.255.255.0");
    assert_eq!(env_a["mtu"], "1400");
    assert_eq!(env_a["domain"], "shared.vmnet");
    assert_eq!(env_a["lease"], "600");
    assert_eq!(env_a["serverid"], "10.77.0.1");
    // Option 12 echoed as sent; the lease keeps the sanitized DNS label.
    assert_eq!(env_a["hostname"], "VM_One.example");
    let lease = lease_of(&rx, MAC_A).expect("A's lease published");
    assert_eq!(lease.ip, ip_a);
    assert_eq!(lease.hostname.as_deref(), Some("vm-one"));
    assert!(lease.expires > SystemTime::now() + Duration::from_secs(500));

    let ip_b = ip(&lab.dhcp(&b, &[]).expect("client B gets a lease")["ip"]);
    assert_ne!(ip_a, ip_b);
    assert_eq!(rx.borrow().len(), 2);

    // Asking again, A keeps its address.
    assert_eq!(ip(&lab.dhcp(&a, &[]).unwrap()["ip"]), ip_a);

    let log = lab.stop();
    assert!(log.contains("leased"), "{log}");
    let file = fs::read_to_string(&cfg.lease_file).unwrap();
    assert!(file.contains(MAC_A) && file.contains(MAC_B), "{file}");
    assert!(!cfg.lease_file.with_extension("json.tmp").exists());

    // Restart on the same lease file: the leases are back, and B asking first still
    // gets its own address (a server without the file would hand B the lowest one).
    let rx = lab.start(vec![cfg.clone()]).remove(0);
    assert_eq!(lease_of(&rx, MAC_A).map(|l| l.ip), Some(ip_a));
    assert_eq!(lease_of(&rx, MAC_B).map(|l| l.ip), Some(ip_b));
    assert_eq!(ip(&lab.dhcp(&b, &[]).unwrap()["ip"]), ip_b);
    assert_eq!(ip(&lab.dhcp(&a, &[]).unwrap()["ip"]), ip_a);
}

#[test]
fn reservation_and_broadcast_flag() {
    let mut lab = Lab::new();
    lab.bridge("br0", "10.78.0.1/24");
    let a = lab.client_port("br0", 0, MAC_A);
    let b = lab.client_port("br0", 1, MAC_B);
    let mut cfg = lab.config("resv", "br0", "10.78.0.0/24", "10.78.0.1");
    cfg.range = Some(DhcpRange {
        start: ip("10.78.0.100"),
        end: ip("10.78.0.150"),
    });
    cfg.reservations = vec![Reservation {
        mac: MAC_B.parse().unwrap(),
        ip: ip("10.78.0.20"),
    }];
    cfg.dns_server = None;
    let rx = lab.start(vec![cfg]).remove(0);

    // B asks for a pool address but its reservation wins.
    let env_b = lab
        .dhcp(&b, &["-r", "10.78.0.120"])
        .expect("B gets a lease");
    assert_eq!(env_b["ip"], "10.78.0.20");
    assert_eq!(env_b["dns"], "", "no DNS option when DNS is off");
    assert_eq!(lease_of(&rx, MAC_B).unwrap().ip, ip("10.78.0.20"));

    // A requests broadcast replies (-B) and a free address in the pool: honoured.
    let env_a = lab
        .dhcp(&a, &["-B", "-r", "10.78.0.120"])
        .expect("A gets a lease with -B");
    assert_eq!(env_a["ip"], "10.78.0.120");
    assert_eq!(env_a["router"], "10.78.0.1");
    // -B without a requested address: A still gets its own address back.
    assert_eq!(lab.dhcp(&a, &["-B"]).unwrap()["ip"], "10.78.0.120");
}

#[test]
fn pool_exhaustion_gives_no_lease_and_logs() {
    let mut lab = Lab::new();
    lab.bridge("br0", "10.79.0.1/24");
    let a = lab.client_port("br0", 0, MAC_A);
    let b = lab.client_port("br0", 1, MAC_B);
    let mut cfg = lab.config("tiny", "br0", "10.79.0.0/24", "10.79.0.1");
    cfg.range = Some(DhcpRange {
        start: ip("10.79.0.10"),
        end: ip("10.79.0.10"),
    });
    let rx = lab.start(vec![cfg]).remove(0);

    assert_eq!(lab.dhcp(&a, &[]).unwrap()["ip"], "10.79.0.10");
    assert!(lab.dhcp(&b, &[]).is_none(), "B must get no lease");
    assert!(lease_of(&rx, MAC_B).is_none());
    let log = lab.log();
    assert!(
        log.contains(&format!(
            "network tiny: DHCP pool exhausted (1 addresses), no offer for {MAC_B}"
        )),
        "{log}"
    );
    // udhcpc sent 3 DISCOVERs; the warning is not repeated for each.
    assert_eq!(log.matches("WARN").count(), 1, "{log}");
    // A is unaffected.
    assert_eq!(lab.dhcp(&a, &[]).unwrap()["ip"], "10.79.0.10");
}

#[test]
fn two_servers_on_two_bridges_in_one_namespace() {
    let mut lab = Lab::new();
    lab.bridge("br0", "10.80.0.1/24");
    lab.bridge("br1", "10.81.0.1/24");
    let a = lab.client_port("br0", 0, MAC_A);
    let b = lab.client_port("br1", 1, MAC_B);
    let c0 = lab.config("one", "br0", "10.80.0.0/24", "10.80.0.1");
    let c1 = lab.config("two", "br1", "10.81.0.0/24", "10.81.0.1");
    let rx = lab.start(vec![c0, c1]);

    let env_a = lab.dhcp(&a, &[]).expect("lease on br0");
    let env_b = lab.dhcp(&b, &[]).expect("lease on br1");
    assert!(env_a["ip"].starts_with("10.80.0."), "{env_a:?}");
    assert_eq!(env_a["router"], "10.80.0.1");
    assert_eq!(env_a["domain"], "one.vmnet");
    assert!(env_b["ip"].starts_with("10.81.0."), "{env_b:?}");
    assert_eq!(env_b["router"], "10.81.0.1");
    assert_eq!(env_b["domain"], "two.vmnet");
    // Each server only saw its own bridge's client.
    assert!(lease_of(&rx[0], MAC_A).is_some() && lease_of(&rx[0], MAC_B).is_none());
    assert!(lease_of(&rx[1], MAC_B).is_some() && lease_of(&rx[1], MAC_A).is_none());
}

#[test]
fn renewal_is_acked_by_unicast_and_extends_the_lease() {
    let mut lab = Lab::new();
    lab.bridge("br0", "10.82.0.1/24");
    let a = lab.client_port("br0", 0, MAC_A);
    let cfg = lab.config("renew", "br0", "10.82.0.0/24", "10.82.0.1");
    let rx = lab.start(vec![cfg]).remove(0);

    let out = lab.dir.path().join("renew.env");
    let mut child: Child = lab.udhcpc_cmd(&a, &out, &[]).spawn().unwrap();
    let events = PathBuf::from(format!("{}.events", out.display()));
    let wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = fs::read_to_string(&events).unwrap_or_default();
            if text.lines().any(|l| l.starts_with(what)) {
                return text;
            }
            assert!(Instant::now() < deadline, "no {what} event: {text:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("bound");
        let first = lease_of(&rx, MAC_A).expect("bound lease").expires;
        std::thread::sleep(Duration::from_millis(1100));
        // SIGUSR1: udhcpc renews now, unicasting a REQUEST with ciaddr from its address.
        // SAFETY: kill(2) takes only integers and touches no memory of this process; the
        // pid is our child's and not yet reaped (it is waited for below).
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) }, 0);
        let text = wait_for("renew");
        let renewed = lease_of(&rx, MAC_A).expect("renewed lease");
        assert!(renewed.expires > first, "renewal extends the lease");
        assert!(text.contains(&format!("renew {}", renewed.ip)), "{text}");
    }));
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    let log = lab.log();
    // The renewal came in as RENEWING (ciaddr set), so the ACK went unicast to ciaddr.
    assert!(
        log.contains("renewed 10.82.0.2 for 52:54:00:d4:00:0a (RENEWING/REBINDING)"),
        "{log}"
    );
}

#[test]
fn start_fails_cleanly_without_the_interface_and_with_corrupt_lease_file() {
    let mut lab = Lab::new();
    let cfg = lab.config("nobr", "br-missing", "10.83.0.0/24", "10.83.0.1");
    let err = Servers::try_start(&lab.server, vec![cfg])
        .err()
        .expect("no bridge, no server");
    assert!(
        err.contains("br-missing") && err.contains("SO_BINDTODEVICE"),
        "{err}"
    );

    // A corrupt lease file is logged and the server serves anyway.
    lab.bridge("br0", "10.83.0.1/24");
    let a = lab.client_port("br0", 0, MAC_A);
    let cfg = lab.config("corrupt", "br0", "10.83.0.0/24", "10.83.0.1");
    fs::write(&cfg.lease_file, b"{\"version\":1,\"leases\":[{oops").unwrap();
    lab.start(vec![cfg.clone()]);
    assert!(lab.dhcp(&a, &[]).is_some());
    let log = lab.stop();
    assert!(log.contains("is invalid"), "{log}");
    // Rewritten with the new lease.
    assert!(fs::read_to_string(&cfg.lease_file).unwrap().contains(MAC_A));
}
