//! The nftables layer against the real kernel and the real `nft`. Every test builds its own
//! network namespaces (deleted on drop, also on panic): B is the broker's, O an "outside"
//! host reached through an uplink veth, V a "VM" whose veth is a port of B's bridge. The
//! `Firewall` runs in a thread that entered B, so the `nft` it spawns acts in B.
#![cfg(target_os = "linux")]

#[path = "support/netns.rs"]
mod netns;

use std::future::Future;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netns::Netns;
use vmnet_broker::backend::linux::firewall::{
    DHCP_MACS_PER_TAP, Firewall, FirewallError, FirewallNetwork,
};
use vmnet_broker::backend::linux::tap::Tap;

const VM_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x02];
const VM_MAC_STR: &str = "02:00:00:77:00:02";
const PORT: u16 = 8080;

/// What these tests do in a namespace besides the shared helper's.
trait FirewallNs {
    fn nft(&self, script: &str);
    fn nft_list(&self, what: &str) -> String;
    fn ping(&self, args: &[&str]) -> bool;
}

impl FirewallNs for Netns {
    fn nft(&self, script: &str) {
        let out = self.exec(&["nft", script]);
        assert!(
            out.status.success(),
            "nft {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fn nft_list(&self, what: &str) -> String {
        let mut cmd = vec!["nft"];
        cmd.extend(what.split(' '));
        let out = self.exec(&cmd);
        assert!(
            out.status.success(),
            "nft {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    /// Whether a ping gets an answer within three one-second tries (two cores shared by
    /// parallel tests make a single try flaky).
    fn ping(&self, args: &[&str]) -> bool {
        let mut cmd = vec!["busybox", "ping", "-c", "1", "-W", "1"];
        cmd.extend_from_slice(args);
        (0..3).any(|_| self.exec(&cmd).status.success())
    }
}

/// B (bridge vmnbr0 10.77.0.1/24, uplink 198.18.0.1/24, default route via O), O (198.18.0.2)
/// and V (10.77.0.2/24 on a port of vmnbr0, default route via 10.77.0.1).
struct Topo {
    b: Netns,
    o: Netns,
    v: Netns,
}

impl Topo {
    fn new() -> Topo {
        netns::require("nft", "nftables");
        netns::require("busybox", "busybox-static");
        netns::require("python3", "python3");
        let (b, o, v) = (Netns::new("b"), Netns::new("o"), Netns::new("v"));
        b.ip(&["link", "add", "vmnbr0", "type", "bridge"]);
        b.ip(&["addr", "add", "10.77.0.1/24", "dev", "vmnbr0"]);
        b.ip(&["link", "set", "vmnbr0", "up"]);
        b.ip(&[
            "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &o.name,
        ]);
        b.ip(&["addr", "add", "198.18.0.1/24", "dev", "up0"]);
        b.ip(&["link", "set", "up0", "up"]);
        b.ip(&["route", "add", "default", "via", "198.18.0.2"]);
        o.ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"]);
        o.ip(&["link", "set", "eth0", "up"]);
        b.ip(&[
            "link", "add", "vport", "type", "veth", "peer", "name", "eth0", "netns", &v.name,
        ]);
        b.ip(&["link", "set", "vport", "master", "vmnbr0", "up"]);
        v.ip(&["link", "set", "eth0", "address", VM_MAC_STR]);
        v.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
        v.ip(&["link", "set", "eth0", "up"]);
        v.ip(&["route", "add", "default", "via", "10.77.0.1"]);
        // Wait for the bridge port to forward (no STP: immediate, but the link comes up
        // asynchronously).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !v.ping(&["10.77.0.1"]) {
            assert!(
                Instant::now() < deadline,
                "V cannot reach the bridge at all"
            );
        }
        Topo { b, o, v }
    }

    /// Connects from V to a one-shot TCP server in O and returns the source address the
    /// server saw, or "none" when no connection arrived within 3 s.
    fn connect_seen_as(&self) -> String {
        use std::io::BufRead;
        let server = format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind(('198.18.0.2',{PORT}))\ns.listen()\ns.settimeout(3)\n\
             print('listening',flush=True)\n\
             try:\n  c,a=s.accept()\n  print(a[0],flush=True)\nexcept socket.timeout:\n  print('none',flush=True)\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.o.name, "python3", "-c", &server])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        // Wait for "listening" so that the client cannot race the bind.
        reader.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "listening");
        let client = format!(
            "import socket\ns=socket.socket()\ns.settimeout(2)\n\
             try:\n  s.connect(('198.18.0.2',{PORT}))\nexcept OSError:\n  pass\n"
        );
        let _ = self.v.exec(&["python3", "-c", &client]);
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(child.wait().unwrap().success());
        line.trim().to_string()
    }
}

/// Log lines written by the code under test, captured per thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `body` on a current-thread tokio runtime in a thread that entered netns `ns`, and
/// returns what the firewall logged meanwhile.
fn in_netns<F, Fut>(ns: &Netns, body: F) -> String
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = ()>,
{
    let logs = Logs::default();
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish();
            let _guard = tracing::subscriber::set_default(subscriber);
            ns.enter_current_thread();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(body());
        });
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    });
    String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned()
}

fn network(nat: bool, anti_spoofing: bool, dhcp: bool) -> FirewallNetwork {
    FirewallNetwork {
        name: "testnet".into(),
        bridge: "vmnbr0".into(),
        subnet: "10.77.0.0/24".parse().unwrap(),
        gateway: Ipv4Addr::new(10, 77, 0, 1),
        nat,
        ipv6_prefix: None,
        nat66: false,
        anti_spoofing,
        dhcp,
        isolation: false,
        tap_prefix: "vport".into(),
        overlay: None,
        forwards: vec![],
    }
}

/// A second network beside [`network`]'s, on bridge vmnbr1 with its own subnet and TAP
/// prefix (the bridge table dispatches by prefix, so they must not overlap).
fn second_network(nat: bool) -> FirewallNetwork {
    let mut second = network(nat, true, true);
    second.name = "second".into();
    second.bridge = "vmnbr1".into();
    second.subnet = "10.78.0.0/24".parse().unwrap();
    second.gateway = Ipv4Addr::new(10, 78, 0, 1);
    second.tap_prefix = "vmnt5-".into();
    second
}

fn tables(ns: &Netns) -> String {
    ns.nft_list("list tables")
}

/// The TAP guard's binding of interface `dev` of B: its MAC and IPv4 lease (0.0.0.0 for
/// none), or None when unbound.
async fn guard_of(fw: &Firewall, b: &Netns, dev: &str) -> Option<([u8; 6], Ipv4Addr)> {
    let out = b.exec(&["cat", &format!("/sys/class/net/{dev}/ifindex")]);
    assert!(out.status.success(), "no interface {dev}");
    let ifindex: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    fw.guard_binding(ifindex)
        .await
        .unwrap()
        .map(|b| (b.mac, Ipv4Addr::from(b.ip4)))
}

#[test]
fn shared_network_masquerades_through_the_uplink() {
    let t = Topo::new();
    let logs = in_netns(&t.b, || async {
        // Fresh namespace: forwarding is off, so nothing gets out before the firewall.
        assert_eq!(
            t.b.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout,
            b"0\n"
        );
        let fw = Firewall::new();
        fw.add_network(&network(true, false, false)).await.unwrap();
        assert_eq!(
            t.b.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout,
            b"1\n",
            "the first NAT network enables forwarding"
        );
        assert_eq!(
            t.connect_seen_as(),
            "198.18.0.1",
            "masqueraded to the uplink address"
        );
        fw.remove_network("testnet").await.unwrap();
        assert_eq!(tables(&t.b).trim(), "", "no table left behind");
    });
    assert!(logs.contains("enabled IPv4 forwarding"), "{logs}");
}

/// The conntrack entries of namespace `ns` (`/proc/net/nf_conntrack`) from `src` to `dst`.
fn conntrack_entries(ns: &Netns, src: &str, dst: &str) -> usize {
    let out = ns.exec(&["cat", "/proc/net/nf_conntrack"]);
    assert!(out.status.success(), "no /proc/net/nf_conntrack");
    let (src, dst) = (format!(" src={src} "), format!(" dst={dst} "));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&src) && l.contains(&dst))
        .count()
}

#[test]
fn traffic_between_guests_is_untracked_and_the_rest_still_tracked_and_nated() {
    let t = Topo::new();
    // A second "VM", W (10.77.0.3), on another port of the bridge.
    let w = Netns::new("w");
    t.b.ip(&[
        "link", "add", "vport2", "type", "veth", "peer", "name", "eth0", "netns", &w.name,
    ]);
    t.b.ip(&["link", "set", "vport2", "master", "vmnbr0", "up"]);
    w.ip(&["addr", "add", "10.77.0.3/24", "dev", "eth0"]);
    w.ip(&["link", "set", "eth0", "up"]);
    // Bridged IPv4 through the inet hooks, as br_netfilter does by default (this
    // namespace's own sysctl; the test's namespace, not the host's).
    let nf =
        t.b.exec(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
    assert!(
        nf.status.success(),
        "{}",
        String::from_utf8_lossy(&nf.stderr)
    );
    in_netns(&t.b, || async {
        let fw = Firewall::new();
        fw.add_network(&network(true, false, false)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !t.v.ping(&["10.77.0.3"]) {
            assert!(Instant::now() < deadline, "V cannot reach W");
        }
        assert_eq!(
            conntrack_entries(&t.b, "10.77.0.2", "10.77.0.3"),
            0,
            "guest to guest is untracked"
        );
        assert_eq!(
            t.connect_seen_as(),
            "198.18.0.1",
            "what leaves the network is still masqueraded"
        );
        assert!(conntrack_entries(&t.b, "10.77.0.2", "198.18.0.2") > 0);
        assert!(t.v.ping(&["10.77.0.1"]), "the gateway is reachable");
        assert!(
            conntrack_entries(&t.b, "10.77.0.2", "10.77.0.1") > 0,
            "traffic to the host is tracked"
        );
        // Control: without the notrack rule the same ping between guests is tracked, so the
        // count above shows the rule's effect, not a namespace without br_netfilter.
        t.b.nft("flush chain inet vmnet_broker raw-testnet");
        assert!(t.v.ping(&["10.77.0.3"]));
        assert!(
            conntrack_entries(&t.b, "10.77.0.2", "10.77.0.3") > 0,
            "control: bridged frames meet conntrack without the notrack"
        );
        fw.remove_network("testnet").await.unwrap();
    });
}

#[test]
fn host_network_is_not_forwarded() {
    let t = Topo::new();
    // Make the outside reachable without NAT, with forwarding on (as other software on the
    // host may have it), so that only the firewall can stop the connection.
    t.o.ip(&["route", "add", "10.77.0.0/24", "via", "198.18.0.1"]);
    t.b.exec(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(
        t.connect_seen_as(),
        "10.77.0.2",
        "control: routed without the firewall"
    );
    in_netns(&t.b, || async {
        let fw = Firewall::new();
        fw.add_network(&network(false, false, false)).await.unwrap();
        assert_eq!(t.connect_seen_as(), "none", "host mode must not forward");
        assert!(t.v.ping(&["10.77.0.1"]), "the gateway stays reachable");
        fw.remove_network("testnet").await.unwrap();
        assert_eq!(
            t.connect_seen_as(),
            "10.77.0.2",
            "rules gone with the network"
        );
        assert_eq!(tables(&t.b).trim(), "");
    });
}

#[test]
fn anti_spoofing_binds_mac_and_leased_ip() {
    let t = Topo::new();
    // Controls: without the firewall a forged MAC or source IP does get answers, so the
    // failures below are the firewall's doing.
    t.v.ip(&["link", "set", "eth0", "address", "02:00:00:77:00:99"]);
    t.b.ip(&["neigh", "flush", "dev", "vmnbr0"]);
    assert!(
        t.v.ping(&["10.77.0.1"]),
        "control: forged MAC works without firewall"
    );
    t.v.ip(&["link", "set", "eth0", "address", VM_MAC_STR]);
    t.v.ip(&["addr", "add", "10.77.0.3/24", "dev", "eth0"]);
    assert!(
        t.v.ping(&["-I", "10.77.0.3", "10.77.0.1"]),
        "control: forged IP works"
    );
    t.v.ip(&["addr", "del", "10.77.0.3/24", "dev", "eth0"]);
    t.b.ip(&["addr", "add", "fd77::1/64", "dev", "vmnbr0", "nodad"]);
    t.v.ip(&["addr", "add", "fd77::2/64", "dev", "eth0", "nodad"]);
    assert!(
        t.v.ping(&["fd77::1"]),
        "control: IPv6 ULA works without firewall"
    );
    t.b.ip(&["addr", "del", "fd77::1/64", "dev", "vmnbr0"]);
    t.v.ip(&["addr", "del", "fd77::2/64", "dev", "eth0"]);
    in_netns(&t.b, || async {
        let fw = Firewall::new();
        fw.add_network(&network(false, true, true)).await.unwrap();
        fw.add_port("testnet", "vport", VM_MAC).await.unwrap();
        let flush_neigh = || {
            t.b.ip(&["neigh", "flush", "dev", "vmnbr0"]);
            t.v.ip(&["neigh", "flush", "dev", "eth0"]);
        };
        flush_neigh();
        assert!(
            !t.v.ping(&["10.77.0.1"]),
            "no lease yet: only 0.0.0.0 may be used"
        );

        fw.bind_ip("testnet", VM_MAC, Ipv4Addr::new(10, 77, 0, 2))
            .await
            .unwrap();
        assert!(t.v.ping(&["10.77.0.1"]), "right MAC and leased IP pass");

        // Forged MAC. Neighbour caches are flushed so that, without the firewall, the
        // gateway would simply learn the new MAC and answer.
        t.v.ip(&["link", "set", "eth0", "address", "02:00:00:77:00:99"]);
        flush_neigh();
        assert!(!t.v.ping(&["10.77.0.1"]), "forged MAC must be dropped");
        t.v.ip(&["link", "set", "eth0", "address", VM_MAC_STR]);
        flush_neigh();
        assert!(t.v.ping(&["10.77.0.1"]), "back to the right MAC");

        // Forged source IP.
        t.v.ip(&["addr", "add", "10.77.0.3/24", "dev", "eth0"]);
        assert!(
            !t.v.ping(&["-I", "10.77.0.3", "10.77.0.1"]),
            "forged IP must be dropped"
        );
        assert!(t.v.ping(&["-I", "10.77.0.2", "10.77.0.1"]));

        // A reused TAP name replaces its binding: the new guest MAC works, the old one not.
        let new_mac = [0x02, 0x00, 0x00, 0x77, 0x00, 0x42];
        fw.add_port("testnet", "vport", new_mac).await.unwrap();
        fw.bind_ip("testnet", new_mac, Ipv4Addr::new(10, 77, 0, 2))
            .await
            .unwrap();
        flush_neigh();
        assert!(
            !t.v.ping(&["-I", "10.77.0.2", "10.77.0.1"]),
            "old MAC no longer bound"
        );
        t.v.ip(&["link", "set", "eth0", "address", "02:00:00:77:00:42"]);
        flush_neigh();
        assert!(t.v.ping(&["-I", "10.77.0.2", "10.77.0.1"]), "new MAC bound");

        // IPv6: link-local passes (bound to the MAC only), other sources do not. Addresses
        // are set without duplicate address detection so they are usable at once.
        t.b.ip(&["addr", "add", "fe80::1/64", "dev", "vmnbr0", "nodad"]);
        t.b.ip(&["addr", "add", "fd77::1/64", "dev", "vmnbr0", "nodad"]);
        t.v.ip(&["addr", "add", "fe80::2/64", "dev", "eth0", "nodad"]);
        t.v.ip(&["addr", "add", "fd77::2/64", "dev", "eth0", "nodad"]);
        assert!(
            t.v.ping(&["-I", "eth0", "fe80::1"]),
            "IPv6 link-local passes"
        );
        assert!(
            !t.v.ping(&["fd77::1"]),
            "IPv6 non-link-local source is dropped"
        );

        // An address outside the subnet is refused with a clear error.
        let err = fw
            .bind_ip("testnet", new_mac, Ipv4Addr::new(10, 78, 0, 2))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        fw.remove_network("testnet").await.unwrap();
        assert_eq!(tables(&t.b).trim(), "");
    });
}

#[test]
fn without_dhcp_only_the_mac_is_enforced() {
    let t = Topo::new();
    in_netns(&t.b, || async {
        let fw = Firewall::new();
        fw.add_network(&network(false, true, false)).await.unwrap();
        fw.add_port("testnet", "vport", VM_MAC).await.unwrap();
        t.v.ip(&["addr", "add", "10.77.0.3/24", "dev", "eth0"]);
        assert!(
            t.v.ping(&["-I", "10.77.0.2", "10.77.0.1"]),
            "static IP, no lease needed"
        );
        assert!(t.v.ping(&["-I", "10.77.0.3", "10.77.0.1"]), "any static IP");
        t.v.ip(&["link", "set", "eth0", "address", "02:00:00:77:00:99"]);
        t.b.ip(&["neigh", "flush", "dev", "vmnbr0"]);
        assert!(!t.v.ping(&["10.77.0.1"]), "forged MAC must be dropped");
    });
}

#[test]
fn watchdog_restores_flushed_rules() {
    let t = Topo::new();
    let logs = in_netns(&t.b, || async {
        let fw = Firewall::new();
        let watchdog = fw.spawn_watchdog();
        fw.add_network(&network(true, true, false)).await.unwrap();
        fw.add_port("testnet", "vport", VM_MAC).await.unwrap();
        assert_eq!(t.connect_seen_as(), "198.18.0.1");

        t.b.nft("flush ruleset");
        assert_eq!(tables(&t.b).trim(), "");
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let list = tables(&t.b);
            if list.contains("table inet vmnet_broker")
                && list.contains("table bridge vmnet_broker")
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(6),
                "not restored: {list}"
            );
        }
        eprintln!("restored after {:?}", start.elapsed());
        assert_eq!(t.connect_seen_as(), "198.18.0.1", "NAT works again");
        // The port's binding is the TAP guard's, which a flush of the ruleset leaves.
        assert_eq!(
            guard_of(&fw, &t.b, "vport").await.map(|(mac, _)| mac),
            Some(VM_MAC)
        );

        // Dropping the last handle ends the watchdog.
        drop(fw);
        tokio::time::timeout(Duration::from_secs(5), watchdog)
            .await
            .expect("watchdog ends when the Firewall is dropped")
            .unwrap();
    });
    assert!(
        logs.contains("WARN") && logs.contains("firewall rules were removed (flushed?), restored"),
        "{logs}"
    );
}

#[test]
fn dhcp_mac_quotas_of_allow_spoofing_networks_are_restored_with_the_rest() {
    let t = Topo::new();
    in_netns(&t.b, || async {
        let fw = Firewall::new();
        let watchdog = fw.spawn_watchdog();
        fw.add_network(&network(true, false, true)).await.unwrap();
        fw.add_port("testnet", "vport", VM_MAC).await.unwrap();
        // Not `nft_list`: the table is missing for a while after the flush.
        let quota = |ns: &Netns| {
            let out = ns.exec(&["nft", "list", "table", "bridge", "vmnet_broker"]);
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let has_quota = |list: &str| {
            list.contains("set dm-vport")
                && list.contains(&format!("size {DHCP_MACS_PER_TAP}"))
                && list.contains(r#"iifname "vport" add @dm-vport { @th,288,48 } return"#)
        };
        let list = quota(&t.b);
        assert!(has_quota(&list), "{list}");

        t.b.nft("flush ruleset");
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if has_quota(&quota(&t.b)) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "quota not restored: {}",
                quota(&t.b)
            );
        }
        drop(fw);
        tokio::time::timeout(Duration::from_secs(5), watchdog)
            .await
            .expect("watchdog ends when the Firewall is dropped")
            .unwrap();
    });
}

#[test]
fn watchdog_restores_on_the_kernels_notification_without_waiting_for_its_poll() {
    let t = Topo::new();
    in_netns(&t.b, || async {
        let fw = Firewall::new();
        // Polling once an hour: only the notification can bring the tables back in time.
        let _watchdog = fw.spawn_watchdog_every(Duration::from_secs(3600));
        fw.add_network(&network(true, true, true)).await.unwrap();
        fw.add_port("testnet", "vport", VM_MAC).await.unwrap();
        // Let the first (immediate) check pass.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..2 {
            t.b.nft("flush ruleset");
            let start = Instant::now();
            loop {
                let list = tables(&t.b);
                if list.contains("table inet vmnet_broker")
                    && list.contains("table bridge vmnet_broker")
                {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "not restored: {list}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!("restored after {:?}", start.elapsed());
            assert_eq!(
                guard_of(&fw, &t.b, "vport").await.map(|(mac, _)| mac),
                Some(VM_MAC)
            );
        }
        fw.remove_network("testnet").await.unwrap();
    });
}

#[test]
fn last_network_removal_leaves_no_tables() {
    let t = Topo::new();
    t.b.ip(&["link", "add", "vmnbr1", "type", "bridge"]);
    in_netns(&t.b, || async {
        let fw = Firewall::new();
        // The bridge table's chains are those of allow_spoofing networks (anti-spoofing
        // ones have the TAP guard instead).
        let mut second = second_network(false);
        second.anti_spoofing = false;
        fw.add_network(&network(true, false, true)).await.unwrap();
        fw.add_network(&second).await.unwrap();
        // TAP prefixes of two networks must not overlap: the bridge table dispatches by them.
        let mut third = second.clone();
        third.name = "third".into();
        third.bridge = "vmnbr2".into();
        third.tap_prefix = "vport9".into();
        let err = fw.add_network(&third).await.unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
        // Same definition again: no-op; a different one replaces it.
        fw.add_network(&second).await.unwrap();
        let mut changed = second.clone();
        changed.nat = true;
        fw.add_network(&changed).await.unwrap();
        let rules = t.b.nft_list("list ruleset");
        assert!(rules.contains("nat-second"), "{rules}");
        assert_eq!(rules.matches("chain fwd-second").count(), 1, "{rules}");
        // One base chain in the bridge table for all networks, so a frame's cost does not
        // grow with their number.
        let bridge = t.b.nft_list("list table bridge vmnet_broker");
        assert_eq!(bridge.matches("hook prerouting").count(), 1, "{bridge}");
        assert!(
            bridge.contains(
                r#"iifname vmap { "vmnt5-*" : jump spoof-second, "vport*" : jump spoof-testnet }"#
            ) || bridge.contains(
                r#"iifname vmap { "vport*" : jump spoof-testnet, "vmnt5-*" : jump spoof-second }"#
            ),
            "{bridge}"
        );

        fw.remove_network("testnet").await.unwrap();
        let rules = t.b.nft_list("list ruleset");
        assert!(!rules.contains("testnet"), "{rules}");
        assert!(
            rules.contains(r#"iifname vmap { "vmnt5-*" : jump spoof-second }"#),
            "{rules}"
        );
        // No egress dispatch (hooks output and forward): the TAP guard checks egress.
        let bridge = t.b.nft_list("list table bridge vmnet_broker");
        assert!(
            !bridge.contains("hook output") && !bridge.contains("hook forward"),
            "{bridge}"
        );
        assert!(
            rules.contains("fwd-second") && rules.contains("spoof-second"),
            "{rules}"
        );
        fw.remove_network("second").await.unwrap();
        assert_eq!(tables(&t.b).trim(), "");
        // Unknown names are not an error.
        fw.remove_network("second").await.unwrap();
    });
}

/// The tables docker (through iptables-nft) creates: FORWARD with policy drop, and when
/// `docker_user`, a DOCKER-USER chain FORWARD jumps to first.
fn fake_docker(b: &Netns, docker_user: bool) {
    b.nft("add table ip filter");
    b.nft("add chain ip filter FORWARD { type filter hook forward priority filter; policy drop; }");
    if docker_user {
        b.nft("add chain ip filter DOCKER-USER");
        b.nft("add rule ip filter DOCKER-USER return");
        b.nft("add rule ip filter FORWARD jump DOCKER-USER");
    }
}

#[test]
fn docker_forward_drop_is_worked_around_via_docker_user() {
    let t = Topo::new();
    fake_docker(&t.b, true);
    in_netns(&t.b, || async {
        let fw = Firewall::new();
        fw.add_network(&network(true, false, false)).await.unwrap();
        let chain = t.b.nft_list("list chain ip filter DOCKER-USER");
        assert_eq!(chain.matches("vmnet-broker:testnet").count(), 2, "{chain}");
        assert_eq!(
            t.connect_seen_as(),
            "198.18.0.1",
            "outside reachable despite DROP"
        );
        fw.remove_network("testnet").await.unwrap();
        let chain = t.b.nft_list("list chain ip filter DOCKER-USER");
        assert!(!chain.contains("vmnet-broker"), "{chain}");
        assert!(
            chain.contains("return"),
            "Docker's own rule is kept: {chain}"
        );
        assert_eq!(tables(&t.b).trim(), "table ip filter");
    });
}

#[test]
fn docker_forward_drop_without_docker_user_only_warns() {
    let t = Topo::new();
    fake_docker(&t.b, false);
    let logs = in_netns(&t.b, || async {
        let fw = Firewall::new();
        fw.add_network(&network(true, false, false)).await.unwrap();
        // We do not touch a table we do not know how to edit safely; the drop wins.
        assert_eq!(t.connect_seen_as(), "none");
        let filter = t.b.nft_list("list table ip filter");
        assert!(!filter.contains("vmnet-broker"), "{filter}");
        fw.remove_network("testnet").await.unwrap();
    });
    assert!(
        logs.contains("WARN") && logs.contains("no outside access"),
        "{logs}"
    );
}

#[test]
fn missing_nft_is_a_clear_error() {
    // Fails before touching any namespace: the program does not exist.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fw = Firewall::with_nft_program("/nonexistent/nft");
        let err = fw
            .add_network(&network(true, true, true))
            .await
            .unwrap_err();
        assert!(matches!(err, FirewallError::NftNotFound), "{err:?}");
        assert!(
            err.to_string().contains("nft not found: install nftables"),
            "{err}"
        );
    });
}

/// An `nft` that fails every transaction (`-f`) while `fail` exists, and otherwise runs the
/// real one: a removal that fails with the tables still present.
fn failing_nft(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let fail = dir.join("fail");
    let script = dir.join("nft");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ -e {} ]; then\n  case \"$*\" in *-f*) cat >/dev/null; \
             echo injected failure >&2; exit 1;; esac\nfi\nexec nft \"$@\"\n",
            fail.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, fail)
}

#[test]
fn failed_removal_forgets_the_network_and_allows_recreating_it() {
    let t = Topo::new();
    t.b.ip(&["link", "add", "vmnbr1", "type", "bridge"]);
    // Removed on drop, also when the test panics.
    let tmp = tempfile::Builder::new()
        .prefix("vmnbt-fwnft-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let (nft, fail) = failing_nft(&dir);
    let logs = in_netns(&t.b, || async {
        let fw = Firewall::with_nft_program(nft.as_os_str());
        fw.add_network(&network(true, true, true)).await.unwrap();
        fw.add_port("testnet", "vport", VM_MAC).await.unwrap();

        std::fs::write(&fail, "").unwrap();
        let err = fw.remove_network("testnet").await.unwrap_err();
        assert!(matches!(err, FirewallError::Nft { .. }), "{err:?}");
        std::fs::remove_file(&fail).unwrap();
        let rules = t.b.nft_list("list ruleset");
        assert!(rules.contains("fwd-testnet"), "left behind: {rules}");

        // Re-created on another bridge, as the backend does (the TAP prefix changes too).
        let mut again = network(true, true, true);
        again.bridge = "vmnbr1".into();
        again.tap_prefix = "vmnt5-".into();
        fw.add_network(&again).await.unwrap();
        let rules = t.b.nft_list("list ruleset");
        assert!(!rules.contains("vmnbr0"), "old rules deleted: {rules}");
        assert!(!rules.contains("vport"), "old rules deleted: {rules}");
        // (The TAP prefix appears in no rule: it only dispatches allow_spoofing networks.)
        assert!(rules.contains("vmnbr1"), "{rules}");
        assert_eq!(rules.matches("chain fwd-testnet").count(), 1, "{rules}");
        // An anti-spoofing network has no bridge chains (the TAP guard checks its TAPs).
        assert_eq!(rules.matches("chain spoof-testnet").count(), 0, "{rules}");
        // The old port binding is not carried over to the new bridge.
        assert_eq!(guard_of(&fw, &t.b, "vport").await, None);

        // Only the new definition is known: removing it deletes both tables.
        fw.remove_network("testnet").await.unwrap();
        assert_eq!(tables(&t.b).trim(), "");
    });
    assert!(logs.contains("network forgotten"), "{logs}");
}

/// The `nft` deadline the hang tests give the firewall: far above a real run (milliseconds)
/// even on a loaded machine, far below the hanging child's hour.
const SHORT_NFT_TIMEOUT: Duration = Duration::from_secs(3);

/// An `nft` that hangs (an hour's `sleep`, its pid written to `pid`) on the first call
/// made while `hang` exists, consuming `hang`; every other call runs the real one.
fn hanging_nft(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let hang = dir.join("hang");
    let script = dir.join("nft");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif rm {hang} 2>/dev/null; then\n  echo $$ > {pid}\n  exec sleep 3600\nfi\n\
             exec nft \"$@\"\n",
            hang = hang.display(),
            pid = dir.join("pid").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, hang)
}

/// A directory for a fake `nft`, removed on drop.
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmnbt-fwnft-")
        .tempdir()
        .unwrap()
}

/// Whether process `pid` is gone (or a zombie waiting to be reaped: dead either way).
fn process_dead(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[test]
fn a_hung_nft_times_out_and_the_firewall_goes_on() {
    let t = Topo::new();
    let tmp = temp_dir();
    let dir = tmp.path();
    let (nft, hang) = hanging_nft(dir);
    in_netns(&t.b, || async {
        let fw = Firewall::with_nft_program_and_timeout(nft.as_os_str(), SHORT_NFT_TIMEOUT);
        fw.add_network(&network(true, true, true)).await.unwrap();
        fw.add_port("testnet", "vport", VM_MAC).await.unwrap();

        std::fs::write(&hang, "").unwrap();
        let start = Instant::now();
        // The second network's nft hangs; a binding queued behind it waits, then runs.
        t.b.ip(&["link", "add", "vmnbr1", "type", "bridge"]);
        let second = second_network(false);
        let (added, bound) = tokio::join!(
            fw.add_network(&second),
            fw.bind_ip("testnet", VM_MAC, Ipv4Addr::new(10, 77, 0, 2)),
        );
        let elapsed = start.elapsed();
        let err = added.unwrap_err();
        assert!(matches!(err, FirewallError::NftTimeout { .. }), "{err:?}");
        assert!(
            elapsed >= SHORT_NFT_TIMEOUT,
            "returned before the deadline: {elapsed:?}"
        );
        assert!(
            elapsed < SHORT_NFT_TIMEOUT + Duration::from_secs(30),
            "a hung nft held the call for {elapsed:?}"
        );
        bound.unwrap();

        // The hung child was killed, not left to sleep for an hour.
        let pid = std::fs::read_to_string(dir.join("pid")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !process_dead(pid.trim()) {
            assert!(Instant::now() < deadline, "hung nft {pid} still alive");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The firewall goes on: the failed add is made on a retry, and the binding queued
        // behind the hang is in the kernel.
        fw.add_network(&second_network(false)).await.unwrap();
        assert!(t.b.nft_list("list ruleset").contains("fwd-second"));
        assert_eq!(
            guard_of(&fw, &t.b, "vport").await,
            Some((VM_MAC, Ipv4Addr::new(10, 77, 0, 2)))
        );
        assert!(
            t.v.ping(&["10.77.0.1"]),
            "the bound VM talks to the gateway"
        );
        fw.remove_network("second").await.unwrap();
        fw.remove_network("testnet").await.unwrap();
        assert_eq!(tables(&t.b).trim(), "");
    });
}

#[test]
fn a_binding_whose_caller_stopped_waiting_still_lands() {
    let t = Topo::new();
    let tmp = temp_dir();
    let dir = tmp.path();
    let (nft, hang) = hanging_nft(dir);
    let logs = in_netns(&t.b, || async {
        let fw = Firewall::with_nft_program_and_timeout(nft.as_os_str(), SHORT_NFT_TIMEOUT);
        fw.add_network(&network(true, true, true)).await.unwrap();
        fw.add_port("testnet", "vport", VM_MAC).await.unwrap();

        // Something else's nft hangs, and its caller stops waiting too; a DHCP ACK's
        // binding is queued behind it, and the DHCP server stops waiting (it sends the ACK
        // after BIND_TIMEOUT).
        std::fs::write(&hang, "").unwrap();
        t.b.ip(&["link", "add", "vmnbr1", "type", "bridge"]);
        let gave_up = tokio::time::timeout(
            Duration::from_millis(200),
            fw.add_network(&second_network(false)),
        )
        .await;
        assert!(gave_up.is_err(), "the hung nft answered");
        while hang.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let gave_up = tokio::time::timeout(
            Duration::from_millis(200),
            fw.bind_ip("testnet", VM_MAC, Ipv4Addr::new(10, 77, 0, 2)),
        )
        .await;
        assert!(gave_up.is_err(), "the binding waited behind the hung nft");

        // Still made, although nobody waits for it any more.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let bound = guard_of(&fw, &t.b, "vport").await;
            if bound == Some((VM_MAC, Ipv4Addr::new(10, 77, 0, 2))) {
                break;
            }
            assert!(Instant::now() < deadline, "binding never made: {bound:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        fw.remove_network("testnet").await.unwrap();
    });
    // The failure nobody waited for is in the log, operation and all.
    assert!(
        logs.contains(&format!(
            "nft did not finish within {SHORT_NFT_TIMEOUT:?} while adding network \"second\", \
             and was killed (the caller had stopped waiting)"
        )),
        "{logs}"
    );
}

#[test]
fn queued_changes_apply_in_call_order() {
    let t = Topo::new();
    let tmp = temp_dir();
    let dir = tmp.path();
    let (nft, hang) = hanging_nft(dir);
    in_netns(&t.b, || async {
        let fw = Firewall::with_nft_program_and_timeout(nft.as_os_str(), SHORT_NFT_TIMEOUT);
        fw.add_network(&network(true, true, true)).await.unwrap();
        std::fs::write(&hang, "").unwrap();
        // Queued in this order while the first one hangs: the removal runs after the
        // binding before it, and the add after it finds no network rather than bringing
        // the tables back.
        let second = second_network(false);
        let (first, bound, removed, late) = tokio::join!(
            fw.add_network(&second),
            fw.bind_ip("testnet", VM_MAC, Ipv4Addr::new(10, 77, 0, 2)),
            fw.remove_network("testnet"),
            fw.add_port("testnet", "vport", VM_MAC),
        );
        assert!(
            matches!(first, Err(FirewallError::NftTimeout { .. })),
            "{first:?}"
        );
        bound.unwrap();
        removed.unwrap();
        assert!(
            matches!(late, Err(FirewallError::UnknownNetwork(_))),
            "{late:?}"
        );
        assert_eq!(tables(&t.b).trim(), "", "nothing re-created after removal");
    });
}

#[test]
fn nft_errors_name_the_operation_and_keep_their_cause() {
    use std::error::Error;
    let t = Topo::new();
    let tmp = temp_dir();
    let dir = tmp.path();
    // Each fake in its own directory: both are called `nft`.
    for sub in ["failing", "hanging"] {
        std::fs::create_dir(dir.join(sub)).unwrap();
    }
    let (failing, fail) = failing_nft(&dir.join("failing"));
    let (hanging, hang) = hanging_nft(&dir.join("hanging"));
    in_netns(&t.b, || async {
        // nft rejects the transaction: the operation and nft's own message.
        let fw = Firewall::with_nft_program(failing.as_os_str());
        fw.add_network(&network(true, true, true)).await.unwrap();
        std::fs::write(&fail, "").unwrap();
        let err = fw.add_network(&second_network(false)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "nft failed while adding network \"second\": injected failure"
        );
        std::fs::remove_file(&fail).unwrap();
        fw.remove_network("testnet").await.unwrap();

        // nft hangs: the operation and the deadline.
        let fw = Firewall::with_nft_program_and_timeout(hanging.as_os_str(), SHORT_NFT_TIMEOUT);
        std::fs::write(&hang, "").unwrap();
        let err = fw
            .add_network(&network(true, true, true))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "nft did not finish within {SHORT_NFT_TIMEOUT:?} while adding network \
                 \"testnet\", and was killed"
            )
        );
    });
    // nft cannot be run: the operation, with the OS error kept as the cause.
    let not_executable = dir.join("not-executable");
    std::fs::write(&not_executable, "").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fw = Firewall::with_nft_program(not_executable.as_os_str());
        let err = fw.remove_stale().await.unwrap_err();
        assert!(matches!(err, FirewallError::NftSpawn { .. }), "{err:?}");
        assert_eq!(err.to_string(), "could not run nft while listing tables");
        let cause = err
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("the io::Error is the source");
        assert_eq!(cause.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(
            vmnet_broker::error::chain(&err)
                .starts_with("could not run nft while listing tables: Permission denied"),
            "{}",
            vmnet_broker::error::chain(&err)
        );
    });
}

/// In B: a UDP server on `gateway` and a client in the host sending to it. Returns "<source
/// the server saw> answered" when the exchange worked both ways.
fn host_to_gateway(b: &Netns, gateway: &str) -> String {
    let script = format!(
        "import socket\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{gateway}',5300))\ns.settimeout(3)\n\
         c=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nc.settimeout(3)\n\
         c.sendto(b'q',('{gateway}',5300))\n\
         try:\n  d,a=s.recvfrom(16)\nexcept socket.timeout:\n  print('none')\n  raise SystemExit\n\
         s.sendto(b'a',a)\n\
         try:\n  c.recvfrom(16)\n  print(a[0],'answered')\nexcept socket.timeout:\n  print(a[0],'unanswered')\n"
    );
    let out = b.exec(&["python3", "-c", &script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_host_talks_to_its_gateway_unmasqueraded_on_a_shared_network() {
    let t = Topo::new();
    // A second shared network, on a bridge made after the first: a masquerade of the host's
    // own packets over `lo` picks the first address of the first interface that has one
    // (here vmnbr0's, on a real host its main address), so it shows as a changed source.
    t.b.ip(&["link", "add", "vmnbr1", "type", "bridge"]);
    t.b.ip(&["addr", "add", "10.78.0.1/24", "dev", "vmnbr1"]);
    t.b.ip(&["link", "set", "vmnbr1", "up"]);
    // Control: masquerading the whole subnet (the rule before this fix) rewrites the host's
    // own packets to the gateway, so the network's services, which serve only the subnet,
    // would ignore them.
    t.b.nft(
        "add table inet ctl; add chain inet ctl nat { type nat hook postrouting priority 100; }; \
         add rule inet ctl nat ip saddr 10.78.0.0/24 oifname != \"vmnbr1\" masquerade",
    );
    assert_eq!(
        host_to_gateway(&t.b, "10.78.0.1"),
        "10.77.0.1 answered",
        "control"
    );
    t.b.nft("delete table inet ctl");
    in_netns(&t.b, || async {
        let fw = Firewall::new();
        let second = second_network(true);
        fw.add_network(&network(true, true, true)).await.unwrap();
        fw.add_network(&second).await.unwrap();
        assert_eq!(host_to_gateway(&t.b, "10.78.0.1"), "10.78.0.1 answered");
        assert_eq!(host_to_gateway(&t.b, "10.77.0.1"), "10.77.0.1 answered");
        // Forwarded traffic is still masqueraded.
        fw.add_port("testnet", "vport", VM_MAC).await.unwrap();
        fw.bind_ip("testnet", VM_MAC, Ipv4Addr::new(10, 77, 0, 2))
            .await
            .unwrap();
        assert_eq!(t.connect_seen_as(), "198.18.0.1");
        fw.remove_network("second").await.unwrap();
        fw.remove_network("testnet").await.unwrap();
    });
}

#[test]
fn a_hung_nft_does_not_hold_up_dhcp_acks() {
    use vmnet_broker::dhcp::{BindHook, DhcpConfig, DhcpServer};
    // Long enough that an ACK waiting for the hung nft would show.
    const TIMEOUT: Duration = Duration::from_secs(20);
    let t = Topo::new();
    t.v.ip(&["addr", "flush", "dev", "eth0"]);
    let tmp = temp_dir();
    let dir = tmp.path();
    let (nft, hang) = hanging_nft(dir);
    in_netns(&t.b, || async {
        let fw = Firewall::with_nft_program_and_timeout(nft.as_os_str(), TIMEOUT);
        fw.add_network(&network(true, true, true)).await.unwrap();
        fw.add_port("testnet", "vport", VM_MAC).await.unwrap();
        // As the Linux backend does: each ACK's lease is bound first.
        let hook: BindHook = {
            let fw = fw.clone();
            Arc::new(move |mac, ip| {
                let fw = fw.clone();
                Box::pin(async move {
                    let _ = fw.bind_ip("testnet", mac, ip).await;
                })
            })
        };
        let dhcp = DhcpServer::start_with_hook(
            DhcpConfig {
                network: "testnet".into(),
                interface: "vmnbr0".into(),
                subnet: "10.77.0.0/24".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 77, 0, 1),
                range: None,
                reservations: vec![],
                lease_seconds: 3600,
                mtu: 1500,
                dns_server: None,
                domain: None,
                lease_file: dir.join("leases.json"),
            },
            Some(hook),
        )
        .await
        .unwrap();

        // Another change's nft hangs (another network's); the ACK's binding queues behind.
        std::fs::write(&hang, "").unwrap();
        let blocked = {
            let fw = fw.clone();
            tokio::spawn(async move { fw.add_network(&second_network(false)).await })
        };
        while hang.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let start = Instant::now();
        let v = t.v.name.clone();
        let got = tokio::task::spawn_blocking(move || {
            Command::new("ip")
                .args(["netns", "exec", &v, "busybox", "udhcpc", "-f", "-q", "-n"])
                .args(["-i", "eth0", "-s", "/bin/true", "-t", "3", "-T", "8"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let took = start.elapsed();
        assert!(
            got.status.success(),
            "no lease while nft hung: {}",
            String::from_utf8_lossy(&got.stderr)
        );
        assert!(took < TIMEOUT, "the ACK waited for the hung nft: {took:?}");
        let err = blocked.await.unwrap().unwrap_err();
        assert!(matches!(err, FirewallError::NftTimeout { .. }), "{err:?}");

        // The lease's binding, queued behind the hang, lands once it is killed.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let bound = guard_of(&fw, &t.b, "vport").await;
            if bound.is_some_and(|(mac, ip)| mac == VM_MAC && ip.octets()[..3] == [10, 77, 0]) {
                break;
            }
            assert!(Instant::now() < deadline, "binding never made: {bound:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        dhcp.stop().await;
        fw.remove_network("testnet").await.unwrap();
    });
}

/// Whether a frame holding `marker` can be read from TAP fd `fd` before `within` passes.
fn tap_reads(fd: std::os::fd::BorrowedFd, marker: &[u8], within: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 65536];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left.as_millis().min(1000) as i32).unwrap();
        if poll(&mut fds, ms).unwrap() == 0 {
            continue;
        }
        let n = nix::unistd::read(fd, &mut buf).unwrap();
        if buf[..n].windows(marker.len()).any(|w| w == marker) {
            return true;
        }
    }
    false
}

/// Sends five UDP datagrams holding `marker` from the host (the calling thread's netns) to
/// `to`.
fn send_udp(to: Ipv4Addr, marker: &[u8]) {
    let sock = std::net::UdpSocket::bind("10.77.0.1:0").unwrap();
    for _ in 0..5 {
        sock.send_to(marker, (to, 9999)).unwrap();
    }
}

/// A namespace "b" with bridge vmnbr0 up at 10.77.0.1/24, for TAPs to be plugged into.
fn bridge_ns() -> Netns {
    let b = Netns::new("b");
    b.ip(&["link", "add", "vmnbr0", "type", "bridge"]);
    // A MAC of its own, as the broker gives its bridges: otherwise the bridge takes its
    // ports' lowest, possibly one a test sets on a TAP.
    b.ip(&["link", "set", "vmnbr0", "address", "02:00:00:77:00:01"]);
    b.ip(&["addr", "add", "10.77.0.1/24", "dev", "vmnbr0"]);
    b.ip(&["link", "set", "vmnbr0", "up"]);
    b
}

/// The attack as a client holding a TAP fd makes it: `SIOCSIFHWADDR` on its own fd gives
/// the TAP's host side a neighbour VM's guest MAC, so that the bridge takes that MAC for
/// a local address of the attacker's port and sends the host's frames for the neighbour
/// there. None of them may reach the attacker's fd.
#[test]
fn a_tap_given_a_neighbours_mac_reads_none_of_its_traffic() {
    netns::require("nft", "nftables");
    netns::require("bridge", "iproute2");
    const A_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x0a];
    const B_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x0b];
    let b = bridge_ns();
    in_netns(&b, || async {
        let (tap_a, tap_b) = two_ports(&b, false);
        let fw = Firewall::new();
        fw.add_network(&network(false, true, true)).await.unwrap();
        fw.add_port("testnet", "vporta", A_MAC).await.unwrap();
        fw.add_port("testnet", "vportb", B_MAC).await.unwrap();
        let victim = Ipv4Addr::new(10, 77, 0, 3);
        fw.bind_ip("testnet", B_MAC, victim).await.unwrap();
        // The host knows the victim's MAC (as after its ARP reply), so nothing but the
        // bridge's forwarding decides which TAP the datagrams leave through.
        b.ip(&[
            "neigh",
            "replace",
            "10.77.0.3",
            "lladdr",
            "02:00:00:77:00:0b",
            "dev",
            "vmnbr0",
            "nud",
            "permanent",
        ]);
        let within = Duration::from_secs(3);
        // Control: before the attack the victim's fd gets them (so the host sends).
        send_udp(victim, b"before-the-attack");
        assert!(tap_reads(
            tap_b.fd(),
            b"before-the-attack",
            Duration::from_secs(20)
        ));

        // SAFETY: ifreq is plain data, for which all-zero bytes are a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the sockaddr member of a zeroed ifreq.
        unsafe {
            req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (i, byte) in B_MAC.iter().enumerate() {
                req.ifr_ifru.ifru_hwaddr.sa_data[i] = *byte as libc::c_char;
            }
        }
        // SAFETY: the fd is an attached TAP and req a valid ifreq that outlives the call.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&tap_a.fd()),
                libc::SIOCSIFHWADDR as _,
                &req,
            )
        };
        assert_eq!(rc, 0, "SIOCSIFHWADDR: {}", std::io::Error::last_os_error());
        // Control: the bridge now holds the victim's MAC as the attacker port's own.
        let fdb = b.exec(&["bridge", "fdb", "show", "dev", "vporta"]);
        let fdb = String::from_utf8_lossy(&fdb.stdout);
        assert!(fdb.contains("02:00:00:77:00:0b"), "{fdb}");

        send_udp(victim, b"meant-for-the-victim");
        assert!(
            !tap_reads(tap_a.fd(), b"meant-for-the-victim", within),
            "the attacker's TAP read the victim's traffic"
        );
        fw.remove_network("testnet").await.unwrap();
    });
}

/// A restarted broker's firewall takes over a network whose guest is running
/// (`add_network_bound`, issue 11): the TAP guard the first one left on the TAP (which
/// kept the guest reachable and protected meanwhile) is adopted with its bindings, so the
/// guest's traffic is never dropped, and a forged MAC still is.
#[test]
fn a_network_taken_over_with_its_bindings_keeps_its_guest_reachable() {
    let t = Topo::new();
    let leased = Ipv4Addr::new(10, 77, 0, 2);
    in_netns(&t.b, || async {
        let first = Firewall::new();
        first
            .add_network(&network(false, true, true))
            .await
            .unwrap();
        first.add_port("testnet", "vport", VM_MAC).await.unwrap();
        first.bind_ip("testnet", VM_MAC, leased).await.unwrap();
        assert!(t.v.ping(&["10.77.0.1"]), "bound guest passes");
        // The broker dies: its rules stay in the kernel.
        drop(first);
        assert!(t.v.ping(&["10.77.0.1"]), "rules left in place");

        // The TAP guard is the kernel's: even rules replaced without bindings (a plain
        // add_network by a fresh firewall) leave the guest's binding alone.
        let plain = Firewall::new();
        plain
            .add_network(&network(false, true, true))
            .await
            .unwrap();
        assert!(t.v.ping(&["10.77.0.1"]), "rules replaced, guest kept");
        drop(plain);

        let adopting = Firewall::new();
        adopting
            .add_network_bound(
                &network(false, true, true),
                &[("vport".to_string(), VM_MAC)],
                &[(VM_MAC, leased)],
            )
            .await
            .unwrap();
        assert!(t.v.ping(&["10.77.0.1"]), "taken over with its bindings");
        assert_eq!(
            guard_of(&adopting, &t.b, "vport").await,
            Some((VM_MAC, leased))
        );
        // Still a forged MAC is dropped: the bindings are the real ones, not open doors.
        t.v.ip(&["link", "set", "eth0", "address", "02:00:00:77:00:99"]);
        t.b.ip(&["neigh", "flush", "dev", "vmnbr0"]);
        t.v.ip(&["neigh", "flush", "dev", "eth0"]);
        assert!(!t.v.ping(&["10.77.0.1"]), "forged MAC dropped");
        t.v.ip(&["link", "set", "eth0", "address", VM_MAC_STR]);
    });
}

/// A TAP guarded before it is plugged (as the backend does, `Firewall::guard_tap`) carries
/// nothing until it is bound: the host hears none of its frames and sends it no unicast;
/// once bound, both work.
#[test]
fn a_guarded_tap_carries_nothing_until_bound() {
    use vmnet_broker::backend::linux::tap::{Tap, TapOwner};
    netns::require("nft", "nftables");
    let b = bridge_ns();
    in_netns(&b, || async {
        let tap = Tap::create("vporta", TapOwner { uid: 0, gid: 0 }).unwrap();
        let fw = Firewall::new();
        // Without DHCP: only the MAC is bound, so any source address will do below.
        fw.add_network(&network(false, true, false)).await.unwrap();
        fw.guard_tap(tap.index()).await.unwrap();
        b.ip(&["link", "set", "vporta", "master", "vmnbr0", "up"]);
        assert_unbound_unheard_then_bound_heard(&b, &fw, &tap).await;
        fw.remove_network("testnet").await.unwrap();
    });
}

/// Every guarded TAP's clsact uses the guard's two shared TC blocks, which hold one
/// filter each however many TAPs there are. A block goes with the last TAP using it, so
/// the next TAP guarded gets a new, empty one: the guard fills it before it returns, and
/// that TAP too carries nothing until bound.
#[test]
fn guarded_taps_share_the_guards_blocks_and_a_tap_guarded_after_the_last_one_left_is_guarded() {
    use vmnet_broker::backend::linux::firewall::guard::{EGRESS_BLOCK, INGRESS_BLOCK};
    use vmnet_broker::backend::linux::tap::{Tap, TapOwner};
    netns::require("nft", "nftables");
    let b = bridge_ns();
    in_netns(&b, || async {
        let fw = Firewall::new();
        fw.add_network(&network(false, true, false)).await.unwrap();
        let owner = TapOwner { uid: 0, gid: 0 };
        let taps: Vec<Tap> = ["vporta", "vportb", "vportc"]
            .into_iter()
            .map(|name| Tap::create(name, owner).unwrap())
            .collect();
        for tap in &taps {
            fw.guard_tap(tap.index()).await.unwrap();
            let qdisc = b.sh(&format!("tc qdisc show dev {}", tap.name()));
            assert!(
                qdisc.contains(&format!(
                    "ingress_block {INGRESS_BLOCK} egress_block {EGRESS_BLOCK}"
                )),
                "{qdisc}"
            );
        }
        for (block, program) in [(INGRESS_BLOCK, "tap_ingress"), (EGRESS_BLOCK, "tap_egress")] {
            let filters = b.sh(&format!("tc filter show block {block}"));
            let ours: Vec<&str> = filters.lines().filter(|l| l.contains(" handle ")).collect();
            assert!(
                ours.len() == 1 && ours[0].contains(program),
                "one filter for three TAPs:\n{filters}"
            );
        }
        // The TAPs close (not persistent: the kernel deletes them), and the blocks go.
        drop(taps);
        let gone = b.exec(&["tc", "filter", "show", "block", &INGRESS_BLOCK.to_string()]);
        assert!(!gone.status.success(), "the block outlived its TAPs");

        let tap = Tap::create("vportd", owner).unwrap();
        fw.guard_tap(tap.index()).await.unwrap();
        for (dir, program) in [("ingress", "tap_ingress"), ("egress", "tap_egress")] {
            let filters = b.sh(&format!("tc filter show dev vportd {dir}"));
            assert!(filters.contains(program), "{dir}: {filters}");
        }
        b.ip(&["link", "set", "vportd", "master", "vmnbr0", "up"]);
        assert_unbound_unheard_then_bound_heard(&b, &fw, &tap).await;
        fw.remove_network("testnet").await.unwrap();
    });
}

/// On `tap`, guarded, unbound, on the bridge and up: the host answers no ARP request the
/// TAP sends and learns nothing of it; once `tap` is bound to [`GUARDED_MAC`] (the MAC
/// only), the host answers.
async fn assert_unbound_unheard_then_bound_heard(
    b: &Netns,
    fw: &Firewall,
    tap: &vmnet_broker::backend::linux::tap::Tap,
) {
    // An ARP request for the gateway from 10.77.0.2, after the TAP's 12-byte virtio-net
    // header; the host's reply names the asker's MAC and address.
    let mut frame = vec![0u8; 12];
    frame.extend([0xff; 6]);
    frame.extend(GUARDED_MAC);
    frame.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend(GUARDED_MAC);
    frame.extend([10, 77, 0, 2, 0, 0, 0, 0, 0, 0, 10, 77, 0, 1]);
    let mut reply_marker = GUARDED_MAC.to_vec();
    reply_marker.extend([10, 77, 0, 2]);
    let ask = |within: Duration| {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            nix::unistd::write(tap.fd(), &frame).unwrap();
            if tap_reads(tap.fd(), &reply_marker, Duration::from_millis(300)) {
                return true;
            }
        }
        false
    };
    assert!(!ask(Duration::from_secs(2)), "an unbound TAP was heard");
    assert_eq!(
        b.exec(&["ip", "neigh", "show", "10.77.0.2"]).stdout,
        b"",
        "the host learnt an unbound TAP's address"
    );
    fw.add_port("testnet", tap.name(), GUARDED_MAC)
        .await
        .unwrap();
    assert!(ask(Duration::from_secs(20)), "the bound TAP is not heard");
}

/// The guest MAC of [`assert_unbound_unheard_then_bound_heard`].
const GUARDED_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x0a];

/// The networks whose rules go through netlink (anti-spoofing ones, the default): shared
/// with IPv6 and NAT66, host, with static forwards of both families (one with an external
/// address), and with a VXLAN overlay and its peers.
fn netlink_cases() -> Vec<(&'static str, FirewallNetwork)> {
    use vmnet_broker::backend::linux::firewall::OverlayGuard;
    use vmnet_broker::config::{PortForward, Protocol};
    let mut shared6 = network(true, true, true);
    shared6.ipv6_prefix = Some("fd00:77::/64".parse().unwrap());
    shared6.nat66 = true;
    let host = network(false, true, true);
    let mut forwards = network(true, true, true);
    forwards.ipv6_prefix = Some("fd00:77::/64".parse().unwrap());
    forwards.forwards = vec![
        PortForward {
            protocol: Protocol::Tcp,
            external_port: 2222,
            internal_address: "10.77.0.5".parse().unwrap(),
            internal_port: 22,
            external_address: None,
        },
        PortForward {
            protocol: Protocol::Udp,
            external_port: 5353,
            internal_address: "10.77.0.6".parse().unwrap(),
            internal_port: 53,
            external_address: Some("198.18.0.1".parse().unwrap()),
        },
        PortForward {
            protocol: Protocol::Tcp,
            external_port: 8443,
            internal_address: "fd00:77::5".parse().unwrap(),
            internal_port: 443,
            external_address: None,
        },
    ];
    let mut isolated = network(true, true, false);
    isolated.isolation = true;
    let mut vxlan = network(true, true, true);
    vxlan.overlay = Some(OverlayGuard {
        port: "vmnx-testnet".into(),
        udp_port: 4789,
        vni: 42,
        peers: vec!["198.18.0.7".parse().unwrap(), "198.18.0.8".parse().unwrap()],
    });
    let mut vxlan6 = vxlan.clone();
    vxlan6.overlay.as_mut().unwrap().peers = vec!["2001:db8::7".parse().unwrap()];
    vec![
        ("vxlan over IPv6, one peer", vxlan6),
        ("shared with IPv6", shared6),
        ("host", host),
        ("static forwards", forwards),
        ("isolation", isolated),
        ("vxlan", vxlan),
    ]
}

/// Both of the broker's tables as nft lists them, or "" for a missing one.
fn listing(ns: &Netns) -> String {
    let tables = tables(ns);
    ["inet", "bridge"]
        .iter()
        .filter(|f| tables.contains(&format!("table {f} vmnet_broker")))
        .map(|f| ns.nft_list(&format!("list table {f} vmnet_broker")))
        .collect()
}

#[test]
fn netlink_writes_the_same_ruleset_as_nft() {
    let t = Topo::new();
    let logs = in_netns(&t.b, || async {
        for (case, net) in netlink_cases() {
            // The reference: every transaction through `nft` (an explicit program).
            let by_nft = Firewall::with_nft_program("nft");
            by_nft.add_network(&net).await.unwrap();
            let want = listing(&t.b);
            assert!(want.contains("chain fwd-testnet"), "{case}: {want}");
            by_nft.remove_network("testnet").await.unwrap();
            assert_eq!(listing(&t.b), "", "{case}");

            let fw = Firewall::new();
            fw.add_network(&net).await.unwrap();
            let got = listing(&t.b);
            assert_eq!(got, want, "{case}: netlink and nft rulesets differ");
            // A second network beside it, then its removal: the first one's rules stay.
            fw.add_network(&second_network(true)).await.unwrap();
            assert!(listing(&t.b).contains("chain fwd-second"), "{case}");
            fw.remove_network("second").await.unwrap();
            assert_eq!(
                listing(&t.b),
                want,
                "{case}: after another network came and went"
            );
            // Re-adding the same name with another definition purges and replaces it.
            let mut changed = net.clone();
            changed.nat = !net.nat;
            fw.add_network(&changed).await.unwrap();
            fw.add_network(&net).await.unwrap();
            assert_eq!(listing(&t.b), want, "{case}: after a replacement");
            fw.remove_network("testnet").await.unwrap();
            assert_eq!(
                listing(&t.b),
                "",
                "{case}: the last removal leaves no tables"
            );
        }
    });
    // Not one of these transactions fell back to nft.
    assert!(!logs.contains("through nft"), "{logs}");
}

#[test]
fn the_kernels_refusal_through_netlink_names_the_object() {
    let t = Topo::new();
    in_netns(&t.b, || async {
        let fw = Firewall::new();
        fw.add_network(&network(true, true, true)).await.unwrap();
        let before = listing(&t.b);
        // A regular chain by the name of the next network's forward chain: adding that
        // network (which adds its base chain there) is refused, the whole transaction is
        // undone, and the error says which object and operation.
        t.b.sh("nft add chain inet vmnet_broker fwd-second");
        let err = fw.add_network(&second_network(true)).await.unwrap_err();
        assert!(matches!(err, FirewallError::Netlink { .. }), "{err:?}");
        let text = vmnet_broker::error::chain(&err);
        assert!(
            text.contains("the kernel refused add chain inet vmnet_broker fwd-second")
                && text.contains("while adding network \"second\""),
            "{text}"
        );
        let after = listing(&t.b);
        assert!(!after.contains("nat-second"), "undone whole: {after}");
        t.b.sh("nft delete chain inet vmnet_broker fwd-second");
        assert_eq!(
            listing(&t.b),
            before,
            "the first network's rules are untouched"
        );
        // The transactions share one netlink socket (`netlink::SocketCache`): after a
        // refusal the next transaction is answered on its own, not by what was left.
        fw.add_network(&second_network(true)).await.unwrap();
        assert!(listing(&t.b).contains("nat-second"));
        fw.remove_network("second").await.unwrap();
        assert_eq!(listing(&t.b), before);
    });
}

// ---- the TAP guard's guest-to-guest fast path -----------------------------------------

const FAST_A: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x0a];
const FAST_B: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x0b];

/// A frame from `src` to `dst` carrying `marker` (a local experimental EtherType, which
/// the guard checks by MAC only), after the TAP's 12-byte virtio-net header.
fn tap_frame(dst: [u8; 6], src: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; 12];
    frame.extend(dst);
    frame.extend(src);
    frame.extend([0x88, 0xb5]);
    frame.extend(marker);
    frame.resize(12 + 60.max(14 + marker.len()), 0);
    frame
}

/// Whether `marker`, written as a frame from `src` to `dst` into `from` (again every
/// 300 ms), is read from `to` within `within`.
fn delivered(
    from: &vmnet_broker::backend::linux::tap::Tap,
    (src, dst): ([u8; 6], [u8; 6]),
    to: &vmnet_broker::backend::linux::tap::Tap,
    marker: &[u8],
    within: Duration,
) -> bool {
    let frame = tap_frame(dst, src, marker);
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        nix::unistd::write(from.fd(), &frame).unwrap();
        if tap_reads(to.fd(), marker, Duration::from_millis(300)) {
            return true;
        }
    }
    false
}

/// A bridge-family counter in B of the frames the bridges forward to `dst`: whatever the
/// fast path redirects never reaches it.
fn count_bridged_to(b: &Netns, dst: [u8; 6]) {
    let mac = dst.map(|x| format!("{x:02x}")).join(":");
    b.nft("add table bridge fastpath_probe");
    b.nft(
        "add chain bridge fastpath_probe probe { type filter hook forward priority 0; policy accept; }",
    );
    b.nft(&format!(
        "add rule bridge fastpath_probe probe ether daddr {mac} counter"
    ));
}

/// How many frames the counter of [`count_bridged_to`] saw.
fn bridged(b: &Netns) -> u64 {
    netns::counter_packets(&b.nft_list("list table bridge fastpath_probe"))
}

/// The fast path's entries (bridge ifindex, MAC -> TAP ifindex), read from the guard on
/// interface `ifindex` the way a restarted broker adopts it.
async fn fast_path_entries(ifindex: u32) -> Vec<(u32, [u8; 6], u32)> {
    let guard = vmnet_broker::backend::linux::firewall::guard::Guard::adopt(ifindex)
        .await
        .unwrap()
        .expect("the guard is on the interface");
    let mut entries: Vec<(u32, [u8; 6], u32)> = guard
        .peers()
        .unwrap()
        .into_iter()
        .map(|(k, to)| (k.bridge, k.mac, to))
        .collect();
    entries.sort();
    entries
}

/// Whether the bridge has learnt `mac` on port `dev` (from a frame it received there).
fn fdb_knows(b: &Netns, dev: &str, mac: [u8; 6]) -> bool {
    let mac = mac.map(|x| format!("{x:02x}")).join(":");
    let fdb = b.exec(&["bridge", "fdb", "show", "dev", dev]);
    String::from_utf8_lossy(&fdb.stdout).contains(&mac)
}

fn ifindex_of(b: &Netns, dev: &str) -> u32 {
    let out = b.exec(&["cat", &format!("/sys/class/net/{dev}/ifindex")]);
    assert!(out.status.success(), "no interface {dev}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// TAPs `vporta` and `vportb`, up on the namespace's bridge `vmnbr0` (ports isolated from
/// each other if `isolated`).
fn two_ports(b: &Netns, isolated: bool) -> (Tap, Tap) {
    use vmnet_broker::backend::linux::tap::TapOwner;
    let owner = TapOwner { uid: 0, gid: 0 };
    let taps = (
        Tap::create("vporta", owner).unwrap(),
        Tap::create("vportb", owner).unwrap(),
    );
    for tap in ["vporta", "vportb"] {
        b.ip(&["link", "set", tap, "master", "vmnbr0", "up"]);
        if isolated {
            b.exec(&["bridge", "link", "set", "dev", tap, "isolated", "on"]);
        }
    }
    taps
}

/// Unicast between two bound guests of one network goes TAP to TAP: B reads it, and the
/// bridge forwards none of it (its forward hook never sees it, its FDB never learns A).
/// With A's fast path switched off in the map (the binding an isolated network gets), the
/// same frames cross the bridge: the counter is what tells the two apart.
#[test]
fn unicast_between_guests_of_a_network_skips_the_bridge() {
    use vmnet_broker::backend::linux::firewall::guard::{BIND_FAST, Guard};
    netns::require("nft", "nftables");
    netns::require("bridge", "iproute2");
    let b = bridge_ns();
    in_netns(&b, || async {
        let (a, vb) = two_ports(&b, false);
        let fw = Firewall::new();
        fw.add_network(&network(false, true, false)).await.unwrap();
        fw.add_port("testnet", "vporta", FAST_A).await.unwrap();
        fw.add_port("testnet", "vportb", FAST_B).await.unwrap();
        count_bridged_to(&b, FAST_B);
        let bridge = ifindex_of(&b, "vmnbr0");
        assert_eq!(
            fast_path_entries(a.index()).await,
            vec![(bridge, FAST_A, a.index()), (bridge, FAST_B, vb.index())]
        );

        let within = Duration::from_secs(20);
        assert!(delivered(&a, (FAST_A, FAST_B), &vb, b"fast-1", within));
        assert_eq!(bridged(&b), 0, "a guest-to-guest frame crossed the bridge");
        assert!(
            !fdb_knows(&b, "vporta", FAST_A),
            "the bridge learnt A from its unicast"
        );
        // The other direction too.
        assert!(delivered(&vb, (FAST_B, FAST_A), &a, b"fast-2", within));
        // The checks still come first: a forged source goes nowhere.
        let forged = [0x02, 0x00, 0x00, 0x77, 0x00, 0x99];
        assert!(!delivered(
            &a,
            (forged, FAST_B),
            &vb,
            b"forged",
            Duration::from_secs(2)
        ));

        // Control: without the fast path on A's binding, the bridge carries them.
        let guard = Guard::adopt(a.index()).await.unwrap().unwrap();
        let mut slow = guard.binding(a.index()).unwrap().unwrap();
        slow.flags &= !BIND_FAST;
        guard.bind(a.index(), slow).unwrap();
        assert!(delivered(&a, (FAST_A, FAST_B), &vb, b"slow", within));
        assert!(
            bridged(&b) > 0 && fdb_knows(&b, "vporta", FAST_A),
            "without the fast path the frames should cross the bridge"
        );
        b.nft("delete table bridge fastpath_probe");
        fw.remove_network("testnet").await.unwrap();
        assert_eq!(fast_path_entries(a.index()).await, vec![]);
    });
}

/// A guest's frame to the MAC of a guest of another network (another bridge, bound and
/// with a fast-path entry of its own) never reaches that guest, while the same MAC's
/// neighbour on its own network reaches it TAP to TAP.
#[test]
fn the_fast_path_never_crosses_to_another_network() {
    use vmnet_broker::backend::linux::tap::{Tap, TapOwner};
    netns::require("nft", "nftables");
    netns::require("bridge", "iproute2");
    const C_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x78, 0x00, 0x0c];
    const D_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x78, 0x00, 0x0d];
    let b = bridge_ns();
    b.ip(&["link", "add", "vmnbr1", "type", "bridge"]);
    b.ip(&["link", "set", "vmnbr1", "address", "02:00:00:78:00:01"]);
    b.ip(&["link", "set", "vmnbr1", "up"]);
    in_netns(&b, || async {
        let owner = TapOwner { uid: 0, gid: 0 };
        let a = Tap::create("vporta", owner).unwrap();
        let c = Tap::create("vmnt5-c", owner).unwrap();
        let d = Tap::create("vmnt5-d", owner).unwrap();
        b.ip(&["link", "set", "vporta", "master", "vmnbr0", "up"]);
        for tap in ["vmnt5-c", "vmnt5-d"] {
            b.ip(&["link", "set", tap, "master", "vmnbr1", "up"]);
        }
        let fw = Firewall::new();
        fw.add_network(&network(false, true, false)).await.unwrap();
        let mut second = second_network(false);
        second.dhcp = false;
        fw.add_network(&second).await.unwrap();
        fw.add_port("testnet", "vporta", FAST_A).await.unwrap();
        fw.add_port("second", "vmnt5-c", C_MAC).await.unwrap();
        fw.add_port("second", "vmnt5-d", D_MAC).await.unwrap();
        let (br0, br1) = (ifindex_of(&b, "vmnbr0"), ifindex_of(&b, "vmnbr1"));
        assert_eq!(
            fast_path_entries(a.index()).await,
            vec![
                (br0, FAST_A, a.index()),
                (br1, C_MAC, c.index()),
                (br1, D_MAC, d.index())
            ]
        );
        count_bridged_to(&b, C_MAC);
        // Control: D reaches C, TAP to TAP.
        assert!(delivered(
            &d,
            (D_MAC, C_MAC),
            &c,
            b"same-network",
            Duration::from_secs(20)
        ));
        assert_eq!(bridged(&b), 0);
        assert!(
            !delivered(
                &a,
                (FAST_A, C_MAC),
                &c,
                b"other-network",
                Duration::from_secs(3)
            ),
            "a guest reached a guest of another network by its MAC"
        );
        // It went to its own bridge (which knows no C), not to C's.
        assert!(
            fdb_knows(&b, "vporta", FAST_A),
            "A's frames never reached its bridge"
        );
        b.nft("delete table bridge fastpath_probe");
        fw.remove_network("second").await.unwrap();
        fw.remove_network("testnet").await.unwrap();
    });
}

/// On a network with `isolation` the guests get no fast path: no entries, no BIND_FAST,
/// and their unicast to each other goes to the bridge, whose isolated ports drop it.
#[test]
fn isolated_guests_get_no_fast_path_and_stay_apart() {
    use vmnet_broker::backend::linux::firewall::guard::BIND_FAST;
    netns::require("nft", "nftables");
    netns::require("bridge", "iproute2");
    let b = bridge_ns();
    in_netns(&b, || async {
        let (a, vb) = two_ports(&b, true);
        let fw = Firewall::new();
        let mut isolated = network(false, true, false);
        isolated.isolation = true;
        fw.add_network(&isolated).await.unwrap();
        fw.add_port("testnet", "vporta", FAST_A).await.unwrap();
        fw.add_port("testnet", "vportb", FAST_B).await.unwrap();
        assert_eq!(fast_path_entries(a.index()).await, vec![]);
        for tap in [&a, &vb] {
            let flags = fw.guard_binding(tap.index()).await.unwrap().unwrap().flags;
            assert_eq!(flags & BIND_FAST, 0, "an isolated TAP has the fast path");
        }
        count_bridged_to(&b, FAST_B);
        assert!(
            !delivered(
                &a,
                (FAST_A, FAST_B),
                &vb,
                b"isolated",
                Duration::from_secs(3)
            ),
            "an isolated guest reached another"
        );
        // They went to the bridge (it learnt A from them), whose isolated ports kept them.
        assert!(
            fdb_knows(&b, "vporta", FAST_A),
            "A's frames never reached the bridge"
        );
        b.nft("delete table bridge fastpath_probe");
        fw.remove_network("testnet").await.unwrap();
    });
}

/// A TAP bound again with another MAC loses the entry of the old one, and a TAP gone
/// (pruned) loses its entry: no stale entry leads a MAC to a TAP that no longer holds it.
#[test]
fn a_rebound_or_released_tap_leaves_no_fast_path_entry() {
    netns::require("nft", "nftables");
    const B_NEW: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x1b];
    let b = bridge_ns();
    in_netns(&b, || async {
        let (a, vb) = two_ports(&b, false);
        let fw = Firewall::new();
        fw.add_network(&network(false, true, false)).await.unwrap();
        fw.add_port("testnet", "vporta", FAST_A).await.unwrap();
        fw.add_port("testnet", "vportb", FAST_B).await.unwrap();
        let bridge = ifindex_of(&b, "vmnbr0");
        let within = Duration::from_secs(20);
        assert!(delivered(&a, (FAST_A, FAST_B), &vb, b"before", within));

        // Bound again, to another MAC (the TAP's guest changed).
        fw.add_port("testnet", "vportb", B_NEW).await.unwrap();
        assert_eq!(
            fast_path_entries(a.index()).await,
            vec![(bridge, FAST_A, a.index()), (bridge, B_NEW, vb.index())]
        );
        assert!(
            !delivered(
                &a,
                (FAST_A, FAST_B),
                &vb,
                b"old-mac",
                Duration::from_secs(3)
            ),
            "the TAP's old MAC still reached it"
        );
        assert!(delivered(&a, (FAST_A, B_NEW), &vb, b"new-mac", within));

        // Released: the TAP is gone and the prune forgets it.
        let b_index = vb.index();
        drop(vb);
        let gone = Instant::now() + Duration::from_secs(20);
        while b.links().iter().any(|l| l == "vportb") {
            assert!(Instant::now() < gone, "the TAP was not deleted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let live = fw
            .prune_ports("testnet", async { Ok(vec!["vporta".to_string()]) })
            .await
            .unwrap();
        assert_eq!(live, 1);
        assert_eq!(
            fast_path_entries(a.index()).await,
            vec![(bridge, FAST_A, a.index())]
        );
        assert_eq!(fw.guard_binding(b_index).await.unwrap(), None);
        fw.remove_network("testnet").await.unwrap();
    });
}
