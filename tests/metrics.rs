//! `metrics` and logs (issue 15): the real broker in a namespace of its own counts
//! acquires and errors, reports its networks, clients and TAPs as OpenMetrics text to the
//! CLI and the Rust client, rewrites `--metrics-file`, and logs JSON lines whose fields
//! are those journald gets (NETWORK=, CLIENT_PID=, CLIENT_UID=, ERROR_CODE=). Under
//! `JOURNAL_STREAM` it speaks journald's native protocol to a journal socket this test
//! owns (bind-mounted over /run/systemd/journal in a mount namespace of the broker's own).
//!
//! Needs root, `ip`, `nft` and `unshare`.
#![cfg(target_os = "linux")]

#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{BIN, Broker, Netns, Options};

/// The value of the sample named exactly `name` (with its labels), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_acquires_errors_and_what_exists() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vmnet-broker.prom");
    let mut b = Broker::start(Options {
        extra_args: vec![
            "--log-format".into(),
            "json".into(),
            "--metrics-file".into(),
            file.to_str().unwrap().into(),
            "--metrics-interval".into(),
            "0.2".into(),
        ],
        ..Default::default()
    });
    let client = b.client();
    let held = client.acquire("shared").unwrap();
    // A malformed request and an unknown network: error 4 and error 5.
    client.call_raw(br#"{"command":"nonsense"}"#).unwrap();
    let e = client.acquire("no-such-network").unwrap_err();
    assert_eq!(e.code.code(), 5);

    let out = b.cli(&["metrics"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let expect = [
        ("vmnet_broker_acquires_total{network=\"shared\"}", 1.0),
        (
            "vmnet_broker_errors_total{code=\"4\",request=\"invalid\"}",
            1.0,
        ),
        (
            "vmnet_broker_errors_total{code=\"5\",request=\"acquire\"}",
            1.0,
        ),
        ("vmnet_broker_networks", 1.0),
        ("vmnet_broker_network_clients{network=\"shared\"}", 1.0),
        ("vmnet_broker_taps{network=\"shared\"}", 1.0),
        ("vmnet_broker_dhcp_leases{network=\"shared\"}", 0.0),
        ("vmnet_broker_forwards{network=\"shared\"}", 0.0),
        ("vmnet_broker_firewall_restores_total", 0.0),
        ("vmnet_broker_restarts_with_adoption_total", 0.0),
    ];
    for (name, value) in expect {
        assert_eq!(sample(&text, name), Some(value), "{name} in\n{text}");
    }
    // A /24 without a range: every host address but the gateway.
    assert_eq!(
        sample(&text, "vmnet_broker_dhcp_pool_size{network=\"shared\"}"),
        Some(253.0),
        "{text}"
    );
    // The CLI's own connection and ours: the client gauge counts both at scrape time.
    let clients = sample(&text, "vmnet_broker_clients").unwrap();
    assert!(clients >= 1.0, "{text}");

    // The Rust client gets the same text, with the counters as they are.
    let again = client.metrics().unwrap();
    assert_eq!(
        sample(&again, "vmnet_broker_acquires_total{network=\"shared\"}"),
        Some(1.0)
    );

    // The textfile for node-exporter: whole (ends with # EOF) and current.
    b.wait_for("the metrics file", Duration::from_secs(30), || {
        std::fs::read_to_string(&file).is_ok_and(|t| {
            t.ends_with("# EOF\n")
                && sample(&t, "vmnet_broker_taps{network=\"shared\"}") == Some(1.0)
        })
    });

    // JSON lines; the acquire and the refusal carry the fields journald would index.
    let log = b.log();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let fields = |message: &str| {
        events
            .iter()
            .find(|e| {
                e["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .unwrap_or_else(|| panic!("no {message:?} in\n{log}"))["fields"]
            .clone()
    };
    let acquired = fields("network acquired");
    assert_eq!(acquired["network"], "shared", "{acquired}");
    assert_eq!(acquired["client_pid"], std::process::id(), "{acquired}");
    assert_eq!(acquired["client_uid"], 0, "{acquired}");
    let refused = fields("acquire refused");
    assert_eq!(refused["network"], "no-such-network", "{refused}");
    assert_eq!(refused["error_code"], 5, "{refused}");
    let bad = fields("bad request");
    assert_eq!(bad["error_code"], 4, "{bad}");

    drop(held);
    drop(client);
    b.stop();
}

/// One journald native-protocol datagram as fields: `KEY=value\n`, or for a value with a
/// line break `KEY\n`, its length as a little-endian u64, the value and `\n`.
fn journal_fields(mut d: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !d.is_empty() {
        let nl = d
            .iter()
            .position(|&b| b == b'\n')
            .expect("a field ends in a newline");
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            d = &d[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &d[nl + 9..nl + 9 + len];
            out.insert(key, String::from_utf8_lossy(value).into_owned());
            d = &d[nl + 9 + len + 1..];
        }
    }
    out
}

#[test]
fn under_systemd_fields_go_to_journald() {
    netns::require("unshare", "util-linux");
    netns::require("nft", "nftables");
    let ns = Netns::new("journal");
    let dir = tempfile::Builder::new().prefix("vmnbt-").tempdir().unwrap();
    let journal = dir.path().join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    let sink = UnixDatagram::bind(journal.join("socket")).unwrap();
    // Read at once, as journald does: a unix datagram queue holds a few messages only, and
    // a full one blocks the broker's logging (and so the broker).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = sink.recv(&mut buf) {
            if tx.send(journal_fields(&buf[..n])).is_err() {
                break;
            }
        }
    });
    let socket = dir.path().join("broker.sock");
    let log_path = dir.path().join("stderr.log");
    for d in ["config", "state"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    std::fs::write(dir.path().join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
    let log = std::fs::File::create(&log_path).unwrap();
    // What systemd sets when stderr is the journal stream: its device and inode. The
    // default --log-format (auto) then logs to journald.
    let journal_stream = {
        use std::os::unix::fs::MetadataExt;
        let m = log.metadata().unwrap();
        format!("{}:{}", m.dev(), m.ino())
    };
    // unshare, sh and ip netns exec all exec: the child's pid is the broker's. The tmpfs
    // hides this machine's /run/systemd from the broker only.
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            r#"mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/journal &&
               mount --bind "$0" /run/systemd/journal && exec "$@""#,
        )
        .arg(&journal)
        .args(["ip", "netns", "exec", &ns.name, BIN, "serve", "--socket"])
        .arg(&socket)
        .arg("--config-dir")
        .arg(dir.path().join("config"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--resolv-conf")
        .arg(dir.path().join("resolv.conf"))
        .env("JOURNAL_STREAM", &journal_stream)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    support::wait_listening(&socket, &mut child, &log_path);
    let client = vmnet_broker::client::Client::connect(&socket).unwrap();
    let held = client.acquire("shared").unwrap();
    assert_eq!(client.acquire("nope").unwrap_err().code.code(), 5);

    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = |seen: &[BTreeMap<String, String>], message: &str| {
        seen.iter()
            .find(|f| f.get("MESSAGE").is_some_and(|m| m.starts_with(message)))
            .cloned()
    };
    while want(&seen, "acquire refused").is_none() {
        assert!(
            Instant::now() < deadline,
            "no refusal in the journal: {seen:?}"
        );
        if let Ok(fields) = rx.recv_timeout(Duration::from_secs(1)) {
            seen.push(fields);
        }
    }
    let acquired = want(&seen, "network acquired").expect("the acquire is logged");
    assert_eq!(acquired["NETWORK"], "shared", "{acquired:?}");
    assert_eq!(acquired["CLIENT_PID"], std::process::id().to_string());
    assert_eq!(acquired["CLIENT_UID"], "0");
    assert_eq!(acquired["SYSLOG_IDENTIFIER"], "vmnet-broker");
    let refused = want(&seen, "acquire refused").unwrap();
    assert_eq!(refused["NETWORK"], "nope", "{refused:?}");
    assert_eq!(refused["ERROR_CODE"], "5", "{refused:?}");
    // Nothing went to stderr: the journal got it all.
    let stderr = std::fs::read_to_string(&log_path).unwrap();
    assert!(!stderr.contains("network acquired"), "{stderr}");

    drop(held);
    drop(client);
    // SIGTERM is ignored while a client is connected: wait for the broker to have seen
    // every connection (ours and wait_listening's probes) close.
    let deadline = Instant::now() + Duration::from_secs(30);
    let count = |seen: &[BTreeMap<String, String>], message: &str| {
        seen.iter()
            .filter(|f| f.get("MESSAGE").is_some_and(|m| m == message))
            .count()
    };
    while count(&seen, "client disconnected") < count(&seen, "client connected") {
        assert!(
            Instant::now() < deadline,
            "no disconnect in the journal: {seen:?}"
        );
        if let Ok(fields) = rx.recv_timeout(Duration::from_secs(1)) {
            seen.push(fields);
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// With the step lines on (`vmnet_broker::steps` at debug; the test broker logs at debug),
/// a cold acquire logs the steps of its request, its registry part, the network's
/// creation, its firewall and services, and the backend's attach, each `name=Nus`, and a
/// warm one its pool TAP: the lines `cargo bench` reads (docs/operations.md, Logs).
#[test]
fn an_acquire_logs_where_its_time_went() {
    let within = Duration::from_secs(30);
    // Without a pool, so the cold acquire makes its own TAP: with one, the refill the
    // network's creation starts may have a TAP ready before the acquire attaches (seen
    // in CI), and the acquire takes that instead.
    let b = Broker::start(Options {
        extra_args: vec!["--tap-pool".into(), "0".into()],
        ..Default::default()
    });
    let _held = b.client().acquire("shared").unwrap();
    b.wait_for("the cold acquire's step lines", within, || {
        logged_steps(&b, "acquire request", &["registry", "state", "reply"])
            && logged_steps(&b, "acquire", &["admit", "create", "attach", "settle"])
            && logged_steps(
                &b,
                "create",
                &["claim", "subnet", "bridge", "services", "pool"],
            )
            && logged_steps(&b, "start services", &["firewall", "services"])
            && logged_steps(&b, "firewall", &["prepare", "batch"])
            && logged_steps(&b, "attach", &["tap", "guard", "plug", "persist"])
    });
    // With the pool: once the network's pool has a TAP, the next acquire takes it.
    let b = Broker::start(Options::default());
    let c = b.client();
    let _held = c.acquire("shared").unwrap();
    b.wait_for("a pool TAP", within, || b.log().contains("pool TAP ready"));
    let _warm = b.client().acquire("shared").unwrap();
    b.wait_for("the warm acquire's step lines", within, || {
        logged_steps(&b, "attach", &["pool", "queue"])
            && logged_steps(&b, "acquire", &["admit", "lock", "attach"])
    });
}

/// Whether `b` logged a step line of operation `op` with every step of `names`, each as
/// `name=Nus`.
fn logged_steps(b: &Broker, op: &str, names: &[&str]) -> bool {
    b.log()
        .lines()
        .filter_map(|l| l.split_once(&format!("vmnet_broker::steps: {op}: ")))
        .any(|(_, rest)| {
            names.iter().all(|n| {
                rest.split_whitespace().any(|f| {
                    f.strip_prefix(&format!("{n}="))
                        .and_then(|v| v.strip_suffix("us"))
                        .is_some_and(|v| v.parse::<u64>().is_ok())
                })
            })
        })
}
