//! vmnet-broker benchmarks (issue 6): `cargo bench --bench broker [-- --quick]`.
//!
//! Runs the data-plane setups side by side (interleaved rounds, medians), the control-plane
//! measurements and the VM iperf3 runs; prints a table; writes docs/benchmarks.md and PNG
//! plots in docs/benchmarks/ (full mode) or target/bench/ (quick mode, or --out DIR).
//! Everything runs in network namespaces it creates and removes. Needs root.
//!
//! `--no-fabric`, `--no-control`, `--no-vms` skip a part; `--rounds N` sets the rounds; `--ctl warm,many,scale` runs only
//! those parts of the control plane (cold, warm, dhcp, helper, many, scale); `--clients N`
//! and `--scale-clients N` set the clients of the many and scale rows (so a quick run can
//! still measure ten thousand);
//! `VMNB_BROKER=path` measures another build of the daemon.
// Linux only (network namespaces); elsewhere an empty program with no main.
#![cfg_attr(not(target_os = "linux"), no_main)]
#![cfg(target_os = "linux")]

#[path = "broker/control.rs"]
mod control;
#[path = "broker/fabric.rs"]
mod fabric;
#[path = "../tests/support/netns.rs"]
mod netns;
#[path = "broker/report.rs"]
mod report;
#[path = "../tests/support/underlay.rs"]
mod underlay;
#[path = "broker/util.rs"]
mod util;
#[path = "../tests/support/vm.rs"]
mod vm;
#[path = "broker/vms.rs"]
mod vms;

use fabric::{FabricCtx, Kind, Sample};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One sample of the overlay row, for the per-round ratios: setup ("overlay", "vxlan",
/// "variant"), Mpps, CPU seconds per GB.
type Paired = (&'static str, f64, f64);

pub struct Options {
    pub quick: bool,
    pub out: PathBuf,
    pub skip_vms: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Helper processes the bench starts from its own binary.
    match args.get(1).map(String::as_str) {
        Some("__stream_hub") => return fabric::stream_hub(&args[2], args[3].parse().unwrap()),
        Some("__helper_loop") => return control::helper_loop(&args[2], args[3].parse().unwrap()),
        Some("__echo") => return control::echo_server(&args[2]),
        _ => {}
    }
    // `cargo test --all-targets` runs bench targets too, without `--bench`: nothing to do
    // then (the measurements take minutes and need root).
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("bench: run with `cargo bench --bench broker [-- --quick]`");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = args
        .iter()
        .position(|a| a == "--out")
        .map(|i| PathBuf::from(&args[i + 1]))
        .unwrap_or_else(|| {
            if quick {
                root.join("target/bench")
            } else {
                root.join("docs")
            }
        });
    let opts = Options {
        quick,
        out,
        skip_vms: args.iter().any(|a| a == "--no-vms"),
    };
    // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench: needs root (network namespaces, TAPs, bridges)");
        std::process::exit(1);
    }
    let started = Instant::now();
    let (rounds, dur) = if quick {
        (1, Duration::from_millis(800))
    } else {
        (3, Duration::from_secs(2))
    };
    // `--rounds N`: more interleaved rounds, for differences of a few percent on a busy
    // machine (the overlay's A/B runs need ten or more).
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .map_or(rounds, |i| args[i + 1].parse().expect("--rounds N"));

    eprintln!(
        "bench: data plane ({rounds} round(s), {} s per sample)",
        dur.as_secs_f64()
    );
    let ctx = FabricCtx::new();
    if args.iter().any(|a| a == "--fabric-only") {
        // Only the broker-versus-bridge comparison, at both br_netfilter settings.
        fabric::compare(&ctx, rounds, dur);
        ctx.broker.stop();
        return;
    }
    let mut samples: Vec<Sample> = Vec::new();
    // `--only-overlay`: the two-host row alone (issue 16), printed, no report written.
    let only_overlay = args.iter().any(|a| a == "--only-overlay");
    let fabric_rounds = if only_overlay || args.iter().any(|a| a == "--no-fabric") {
        0
    } else {
        rounds
    };
    for r in 0..fabric_rounds {
        for frame in [60, 1514] {
            // Rotate the order each round so no setup always runs first or last.
            for k in 0..4 {
                let kind = Kind::ALL[(k + r) % 4];
                let s = fabric::measure(&ctx, kind, frame, 1, dur);
                eprintln!(
                    "  r{r} {:>6} {frame:>4} B: {:7.3} Gbit/s {:6.3} Mpps",
                    kind.short(),
                    s.gbps,
                    s.mpps
                );
                samples.push(s);
            }
        }
        for n in [2, 4, 8] {
            for k in 0..4 {
                let kind = Kind::ALL[(k + r) % 4];
                let s = fabric::measure(&ctx, kind, 1514, n, dur);
                eprintln!(
                    "  r{r} {:>6} x{n} 1514 B: {:7.3} Gbit/s",
                    kind.short(),
                    s.gbps
                );
                samples.push(s);
            }
        }
    }
    // The two-host row: the broker's overlay against VXLAN and a bridge by hand.
    // `VMNB_OVERLAY_VARIANT` / `_UNDO`: shell scripts run in both hosts' namespaces around
    // each sample of a third setup, the broker's overlay with the variant (A/B of rules).
    let variant = std::env::var("VMNB_OVERLAY_VARIANT").ok().map(|v| {
        (
            v,
            std::env::var("VMNB_OVERLAY_VARIANT_UNDO").unwrap_or_default(),
        )
    });
    let mut variant_samples: Vec<(usize, f64)> = Vec::new();
    // Per round and frame size, each setup's Mpps ("overlay", "vxlan", "variant"): the
    // ratios of samples taken next to each other vary far less than those of medians.
    let mut paired: std::collections::BTreeMap<(usize, usize), Vec<Paired>> = Default::default();
    if !args.iter().any(|a| a == "--no-overlay") {
        for r in 0..rounds {
            for frame in [60, 1514] {
                let mut kinds: Vec<(Kind, bool)> =
                    Kind::OVERLAY.iter().map(|&k| (k, false)).collect();
                if variant.is_some() {
                    kinds.push((Kind::Overlay, true));
                }
                let len = kinds.len();
                kinds.rotate_left(r % len);
                for (kind, with_variant) in kinds {
                    let script = |i: usize| {
                        if let Some(v) = variant.as_ref().filter(|_| with_variant) {
                            fabric::overlay_hosts_sh(&ctx, if i == 0 { &v.0 } else { &v.1 });
                        }
                    };
                    let s = fabric::measure_with(&ctx, kind, frame, 1, dur, &|| script(0), &|| {
                        script(1)
                    });
                    eprintln!(
                        "  r{r} {:>7}{} {frame:>4} B: {:7.3} Gbit/s {:6.3} Mpps",
                        kind.short(),
                        if with_variant { "+v" } else { "" },
                        s.gbps,
                        s.mpps
                    );
                    let label = if with_variant {
                        "variant"
                    } else {
                        kind.short()
                    };
                    paired
                        .entry((frame, r))
                        .or_default()
                        .push((label, s.mpps, s.cpu_per_gb));
                    if with_variant {
                        variant_samples.push((frame, s.mpps));
                    } else {
                        samples.push(s);
                    }
                }
            }
        }
    }
    for frame in [60, 1514] {
        let mut v: Vec<f64> = variant_samples
            .iter()
            .filter(|s| s.0 == frame)
            .map(|s| s.1)
            .collect();
        if !v.is_empty() {
            v.sort_by(f64::total_cmp);
            println!(
                "overlay with variant, {} B: median {:.3} Mpps (min {:.3}, max {:.3})",
                frame + 4,
                v[v.len() / 2],
                v[0],
                v[v.len() - 1]
            );
        }
    }
    for frame in [60, 1514] {
        // Mpps, and CPU seconds per GB (what a busy machine disturbs less: it slows
        // every setup down, but each frame still costs about the same CPU time).
        let ratios = |of: &str, cpu: bool| {
            let mut v: Vec<f64> = paired
                .iter()
                .filter(|((f, _), _)| *f == frame)
                .filter_map(|(_, s)| {
                    let get = |l: &str| {
                        s.iter()
                            .find(|(k, ..)| *k == l)
                            .map(|(_, m, c)| if cpu { *c } else { *m })
                    };
                    Some(get(of)? / get("vxlan")?)
                })
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        for of in ["overlay", "variant"] {
            for (cpu, what) in [(false, "Mpps"), (true, "CPU s/GB")] {
                let v = ratios(of, cpu);
                if !v.is_empty() {
                    println!(
                        "{of}/by hand per round, {} B, {what}: median {:.0}% (min {:.0}%, max {:.0}%, {} rounds)",
                        frame + 4,
                        100.0 * v[v.len() / 2],
                        100.0 * v[0],
                        100.0 * v[v.len() - 1],
                        v.len()
                    );
                }
            }
        }
    }
    ctx.stop();
    if only_overlay {
        let rep = report::Report {
            quick,
            rounds,
            dur,
            samples,
            ctl: control::Control::default(),
            vm: None,
            elapsed: started.elapsed(),
        };
        println!("{}", rep.overlay_table());
        return;
    }

    eprintln!(
        "bench: control plane (at {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    let ctl = if args.iter().any(|a| a == "--no-control") {
        control::Control::default()
    } else {
        let clients = args
            .iter()
            .position(|a| a == "--clients")
            .map(|i| args[i + 1].parse().expect("--clients N"));
        let scale_clients = args
            .iter()
            .position(|a| a == "--scale-clients")
            .map(|i| args[i + 1].parse().expect("--scale-clients N"));
        let parts = args
            .iter()
            .position(|a| a == "--ctl")
            .map(|i| args[i + 1].as_str());
        control::run(quick, clients, scale_clients, &control::Parts::parse(parts))
    };

    let vm = if opts.skip_vms {
        None
    } else {
        eprintln!(
            "bench: VMs with iperf3 (TCG) (at {:.0} s)",
            started.elapsed().as_secs_f64()
        );
        Some(vms::run(quick))
    };

    let rep = report::Report {
        quick,
        rounds,
        dur,
        samples,
        ctl,
        vm,
        elapsed: started.elapsed(),
    };
    let text = rep.table();
    println!("{text}");
    rep.write(&opts.out, &root);
    eprintln!(
        "bench: done in {:.0} s; report in {}",
        started.elapsed().as_secs_f64(),
        opts.out.display()
    );
}
