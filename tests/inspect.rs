//! `list`, `show`, `leases` and `status` as clients see them (issue 14): the real
//! `vmnet-broker serve` in a namespace of its own, the real CLI in both formats, and a
//! real DHCP client (busybox `udhcpc`) behind an acquired TAP.
//!
//! The "VM" of the lease test is a namespace whose `eth0` is a TAP of its own; the test
//! copies frames between that TAP and the TAP fd the broker handed out, as a VMM copies
//! them between its guest's NIC and that fd.
//!
//! Needs root, `ip`, `nft`, `setpriv` and busybox.
#![cfg(target_os = "linux")]

#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;
#[path = "support/tap_vm.rs"]
mod tap_vm;

use serde_json::Value;
use std::process::Output;
use std::time::{Duration, Instant};
use support::{Broker, Options, options_with_files};
use tap_vm::TapVm;
use vmnet_broker::client::Acquired;

fn opts(files: &[(&str, &str)], idle_timeout: f64) -> Options {
    Options {
        idle_timeout,
        ..options_with_files(files)
    }
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(b: &Broker, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let text = ok(b.cli(&args).output().unwrap());
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

fn human(b: &Broker, args: &[&str]) -> String {
    ok(b.cli(args).output().unwrap())
}

/// The CLI run as uid/gid 65534 with no groups (the socket opened up to it).
fn as_nobody(b: &Broker, args: &[&str]) -> Output {
    b.ns.sh(&format!("chmod 0666 {}", b.socket.display()));
    b.cli_as_nobody(args).output().unwrap()
}

fn network<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}"))
}

fn names(list: &Value) -> Vec<String> {
    list["networks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

/// Each header word's column in the first line is where every row's cell of that
/// column starts: the columns line up.
fn assert_aligned(table: &str) {
    let mut lines = table.lines();
    let header = lines.next().expect("a header");
    let starts: Vec<usize> = header
        .match_indices(|c: char| c != ' ')
        .filter(|(i, _)| *i == 0 || header.as_bytes()[i - 1] == b' ')
        .map(|(i, _)| i)
        .collect();
    for line in lines.filter(|l| !l.starts_with('(')) {
        for &s in &starts[1..] {
            assert!(
                line.len() > s && line.as_bytes()[s - 1] == b' ' && line.as_bytes()[s] != b' ',
                "column at {s} does not line up in {line:?}\n{table}"
            );
        }
    }
}

#[test]
fn list_shows_defined_active_and_idle_networks_in_both_formats() {
    let b = Broker::start(opts(
        &[
            (
                "lab.json",
                r#"{"mode":"host","subnet":"10.77.0.1","mask":"255.255.255.0"}"#,
            ),
            ("secret.json", r#"{"mode":"host","allowed_users":["root"]}"#),
        ],
        600.0,
    ));
    let list = json(&b, &["list"]);
    assert_eq!(names(&list), ["host", "lab", "secret", "shared"]);
    for n in list["networks"].as_array().unwrap() {
        assert_eq!(n["state"], "inactive", "{n}");
        assert_eq!(
            (n["clients"].as_u64(), n["taps"].as_u64()),
            (Some(0), Some(0))
        );
    }
    assert_eq!(
        network(&list, "lab")["subnets"],
        serde_json::json!(["10.77.0.0/24"])
    );
    assert_eq!(network(&list, "lab")["mode"], "host");

    // Two TAPs of two clients on shared; lab acquired and let go (its TAP kept open).
    let (c1, c2, c3) = (b.client(), b.client(), b.client());
    let a1 = c1.acquire("shared").unwrap();
    let _a2 = c2.acquire("shared").unwrap();
    let lab_tap = c3.acquire("lab").unwrap();
    drop(c3);
    let idle = |l: &Value| network(l, "lab")["state"] == "idle";
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut list = json(&b, &["list"]);
    while !idle(&list) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        list = json(&b, &["list"]);
    }
    let shared = network(&list, "shared");
    assert_eq!(shared["state"], "active");
    assert_eq!(
        (shared["clients"].as_u64(), shared["taps"].as_u64()),
        (Some(2), Some(2))
    );
    // IPv4, then the network's IPv6 /64 (issue 14), as `show` gives it.
    let prefix6 = json(&b, &["show", "shared"])["ipv6_prefix"]
        .as_str()
        .expect("an active network has an IPv6 prefix")
        .to_string();
    assert!(
        prefix6.starts_with("fd") && prefix6.ends_with("::/64"),
        "{prefix6}"
    );
    assert_eq!(
        shared["subnets"],
        serde_json::json!([a1.info.subnet, prefix6])
    );
    assert!(shared.get("removal_in_seconds").is_none());
    let lab = network(&list, "lab");
    assert_eq!(lab["state"], "idle", "{list}");
    let removal = lab["removal_in_seconds"].as_f64().unwrap();
    assert!(removal > 0.0 && removal <= 600.0, "{removal}");
    assert_eq!(
        (lab["clients"].as_u64(), lab["taps"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(network(&list, "host")["state"], "inactive");

    let table = human(&b, &["list"]);
    assert!(table.starts_with("NETWORK"), "{table}");
    assert_aligned(&table);
    let lab_row = table.lines().find(|l| l.starts_with("lab ")).unwrap();
    assert!(
        lab_row.contains("10.77.0.0/24") && lab_row.contains("removal in "),
        "{lab_row}"
    );
    let shared_row = table.lines().find(|l| l.starts_with("shared ")).unwrap();
    let cells: Vec<_> = shared_row.split_whitespace().collect();
    let subnets = format!("{},{prefix6}", a1.info.subnet);
    assert_eq!(cells, ["shared", "shared", &subnets, "active", "2", "2"]);
    drop(lab_tap);

    // Another uid sees only what it may use.
    let out = as_nobody(&b, &["list", "--json"]);
    let theirs: Value = serde_json::from_str(&ok(out)).unwrap();
    assert_eq!(names(&theirs), ["host", "lab", "shared"]);
    for args in [&["show", "secret"][..], &["leases", "secret"]] {
        let out = as_nobody(&b, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error 5: "), "{args:?}: {stderr}");
    }
    let out = as_nobody(&b, &["show", "shared", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&ok(out)).unwrap()["name"],
        "shared"
    );
}

#[test]
fn show_gives_config_addresses_and_taps_with_their_holders() {
    let b = Broker::start(opts(
        &[(
            "lab.json",
            r#"{"mode":"host","subnet":"10.78.0.1","mask":"255.255.255.0","mtu":9000}"#,
        )],
        120.0,
    ));
    let inactive = json(&b, &["show", "lab"]);
    assert_eq!(inactive["state"], "inactive");
    assert_eq!(inactive["subnet"], Value::Null);
    assert_eq!(inactive["config"]["subnet"], "10.78.0.1");
    assert_eq!(inactive["config"]["mtu"], 9000);
    assert_eq!(inactive["taps"], serde_json::json!([]));
    assert!(inactive.get("ipv6_prefix").is_none(), "{inactive}");

    let c = b.client();
    let mac = "52:54:00:77:00:01";
    let a = c
        .acquire_with_mac("lab", Some(mac.parse().unwrap()))
        .unwrap();
    let d = json(&b, &["show", "lab"]);
    assert_eq!(d["state"], "active");
    assert_eq!(d["mode"], "host");
    assert_eq!(d["subnet"], "10.78.0.0/24");
    assert_eq!(d["gateway"], "10.78.0.1");
    assert_eq!(d["mask"], "255.255.255.0");
    assert_eq!(d["mtu"], 9000);
    // The generated ULA prefix, as kept in the state directory.
    let kept = std::fs::read_to_string(b.state_dir.join("lab.ipv6-prefix")).unwrap();
    assert_eq!(d["ipv6_prefix"], kept.trim());
    assert_eq!(d["bridge"], a.info.bridge.as_str());
    assert_eq!(d["platform"]["bridge"], a.info.bridge.as_str());
    assert_eq!(d["clients"], 1);
    assert_eq!(d["forwards"], serde_json::json!([]));
    assert_eq!(d["config"]["mode"], "host");
    assert_eq!(d["config"]["dhcp"], true);
    assert!(
        d["config"]["source"]
            .as_str()
            .unwrap()
            .ends_with("lab.json")
    );
    let taps = d["taps"].as_array().unwrap();
    assert_eq!(taps.len(), 1, "{d}");
    assert_eq!(taps[0]["interface"], a.info.interface.as_str());
    assert_eq!(taps[0]["mac"], mac);
    assert_eq!(taps[0]["uid"], 0);
    assert_eq!(taps[0]["pid"], std::process::id());

    let text = human(&b, &["show", "lab"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("ipv6 prefix:") && l.ends_with(kept.trim())),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("bridge:") && l.ends_with(&a.info.bridge)),
        "{text}"
    );
    let tap_table: String = text
        .lines()
        .skip_while(|l| !l.starts_with("TAP"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_aligned(&tap_table);
    let row: Vec<_> = tap_table
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    let pid = std::process::id().to_string();
    assert_eq!(
        row[..4],
        [a.info.interface.as_str(), mac, "0", pid.as_str()]
    );

    // The connection goes, the VM keeps the TAP: listed, with its uid, without a holder.
    let Acquired { fd, .. } = a;
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = json(&b, &["show", "lab"]);
        if d["clients"] == 0 {
            let tap = &d["taps"][0];
            assert_eq!(
                (&tap["uid"], &tap["pid"], &tap["client"]),
                (&Value::from(0), &Value::Null, &Value::Null),
                "{d}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the client never left: {d}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(fd);
    let out = b.cli(&["show", "nonexistent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error 5: "));
}

#[test]
fn status_leaves_out_the_asking_connection() {
    let b = Broker::start(Options::default());
    let holder = b.client();
    let _a = holder.acquire("host").unwrap();
    let asker = b.client();
    let s = asker.status().unwrap();
    assert_eq!(s.clients.len(), 1, "{s:?}");
    assert_eq!(s.clients[0].pid, std::process::id() as i32);
    assert_eq!(s.clients[0].networks, ["host"]);
    // The CLI's own connection is not listed either: the two of this process are.
    let s = json(&b, &["status"]);
    let clients = s["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 2, "{s}");
    assert!(
        clients.iter().all(|c| c["pid"] == std::process::id()),
        "{s}"
    );
    // A holder asking does not see itself either, only the other connection (which holds
    // nothing); the network still counts the holder.
    let s = holder.status().unwrap();
    assert_eq!(s.clients.len(), 1, "{s:?}");
    assert!(s.clients[0].networks.is_empty(), "{s:?}");
    assert_eq!(s.networks[0].clients, 1, "{s:?}");
    drop(holder);
    b.wait_for("the holder to leave", Duration::from_secs(10), || {
        asker.status().unwrap().clients.is_empty()
    });
}

// ---- a DHCP client behind an acquired TAP -----------------------------------------------

#[test]
fn leases_after_a_real_dhcp_client_name_the_tap_and_its_holder() {
    let b = Broker::start(Options::default());
    let c = b.client();
    let a = c.acquire("shared").unwrap();
    let (interface, mac) = (a.info.interface.clone(), a.info.mac.clone());
    let vm = TapVm::new(a.fd, &mac);
    let ip = vm.dhcp("inspected");

    let all = json(&b, &["leases"]);
    let one = json(&b, &["leases", "shared"]);
    assert_eq!(all, one, "only shared has leases");
    let leases = all["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "{all}");
    let l = &leases[0];
    assert_eq!(l["network"], "shared");
    assert_eq!(l["mac"], mac.as_str());
    assert_eq!(l["ipv4"], ip.as_str());
    // The SLAAC address of the guest's MAC (EUI-64) in the network's prefix.
    let prefix6: ipnet::Ipv6Net = json(&b, &["show", "shared"])["ipv6_prefix"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let m = mac.parse::<vmnet_broker::mac::Mac>().unwrap().octets();
    let mut eui = prefix6.network().octets();
    eui[8..16].copy_from_slice(&[m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]);
    let ipv6 = std::net::Ipv6Addr::from(eui).to_string();
    assert_eq!(l["ipv6"], ipv6.as_str());
    assert_eq!(l["hostname"], "inspected");
    let left = l["expires_in_seconds"].as_u64().unwrap();
    assert!(left > 0 && left <= 3600, "{l}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at = l["expires_at"].as_u64().unwrap();
    assert!(at > now && at <= now + 3600 + 5, "{l}");
    assert_eq!(l["interface"], interface.as_str());
    assert_eq!(l["uid"], 0);
    assert_eq!(l["pid"], std::process::id());

    let table = human(&b, &["leases"]);
    assert_aligned(&table);
    let row: Vec<_> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        row,
        [
            "shared",
            mac.as_str(),
            ip.as_str(),
            ipv6.as_str(),
            "inspected",
            "in",
            row[6],
            interface.as_str(),
            "0",
            std::process::id().to_string().as_str()
        ],
        "{table}"
    );
    assert_eq!(
        json(&b, &["leases", "host"])["leases"],
        serde_json::json!([])
    );
    drop(vm);
    drop(c);
}
