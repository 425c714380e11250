//! The original broker's nine test cases, against the broker installed on this Mac
//! (contrib/macos/install.sh; `VMNET_BROKER_SERVICE` names another Mach service). Each
//! acquires over XPC exactly as the original's clients do and turns the serialization back
//! into a vmnet network (`vmnet_network_create_with_serialization`).
//!
//! macOS only. On Linux CI they are type-checked (`cargo clippy --target
//! aarch64-apple-darwin --all-targets`), never run: docs/macos.md lists them in the
//! checklist a Mac must pass.
#![cfg(target_os = "macos")]

use std::thread;
use vmnet_broker::backend::macos::client::XpcClient;
use vmnet_broker::xpc::{MACH_SERVICE, SERVICE_ENV};

fn service() -> String {
    std::env::var(SERVICE_ENV).unwrap_or_else(|_| MACH_SERVICE.to_string())
}

fn client() -> XpcClient {
    XpcClient::connect(&service()).expect("connect to the broker")
}

#[test]
fn original_1_acquire_shared() {
    let c = client();
    let n = c.acquire("shared").expect("acquire shared");
    assert!(n.subnet.prefix_len() > 0, "{n:?}");
}

#[test]
fn original_2_acquire_host() {
    let c = client();
    let n = c.acquire("host").expect("acquire host");
    assert!(n.subnet.prefix_len() > 0, "{n:?}");
}

#[test]
fn original_3_unknown_network_is_not_found() {
    let e = client().acquire("no-such-network").unwrap_err();
    assert_eq!(e.code.code(), 5, "{e}");
}

#[test]
fn original_4_shared_and_host_on_one_connection() {
    let c = client();
    let shared = c.acquire("shared").unwrap();
    let host = c.acquire("host").unwrap();
    assert_ne!(shared.subnet, host.subnet);
}

#[test]
fn original_5_same_network_three_times() {
    let c = client();
    let subnets: Vec<_> = (0..3)
        .map(|_| c.acquire("shared").unwrap().subnet)
        .collect();
    assert!(subnets.windows(2).all(|w| w[0] == w[1]), "{subnets:?}");
}

#[test]
fn original_6_same_network_nine_times_counts_once() {
    let c = client();
    for i in 0..9 {
        c.acquire("shared")
            .unwrap_or_else(|e| panic!("acquire {i}: {e}"));
    }
}

#[test]
fn original_7_clients_one_after_another_reuse_the_network() {
    let mut subnets = Vec::new();
    for _ in 0..3 {
        let c = client();
        subnets.push(c.acquire("shared").unwrap().subnet);
        drop(c);
    }
    assert!(subnets.windows(2).all(|w| w[0] == w[1]), "{subnets:?}");
}

#[test]
fn original_8_concurrent_clients_on_different_networks() {
    let handles: Vec<_> = ["shared", "host"]
        .into_iter()
        .map(|name| thread::spawn(move || client().acquire(name).map(|n| n.subnet)))
        .collect();
    let subnets: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert_ne!(subnets[0], subnets[1]);
}

#[test]
fn original_9_concurrent_clients_on_the_same_network() {
    let all_acquired = std::sync::Arc::new(std::sync::Barrier::new(3));
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let all_acquired = std::sync::Arc::clone(&all_acquired);
            thread::spawn(move || {
                let c = client();
                let subnet = c.acquire("shared").map(|n| n.subnet);
                // Hold the lease until every thread has acquired: the three overlap.
                all_acquired.wait();
                subnet
            })
        })
        .collect();
    let subnets: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert!(subnets.windows(2).all(|w| w[0] == w[1]), "{subnets:?}");
}
