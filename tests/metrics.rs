//! `metrics` (issue 15): the real broker in a namespace of its own counts acquires and
//! errors, reports its networks, clients and TAPs as OpenMetrics text to the CLI and the
//! Rust client, rewrites `--metrics-file`, and logs JSON lines whose fields are those
//! journald gets (NETWORK=, CLIENT_PID=, CLIENT_UID=, ERROR_CODE=).
//!
//! Needs root, `ip` and `nft`.
#![cfg(target_os = "linux")]

#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;

use serde_json::Value;
use std::time::Duration;
use support::{Broker, Options};

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
