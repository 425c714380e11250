//! The table printed on stdout, docs/benchmarks.md and the PNG plots.

use crate::control::Control;
use crate::fabric::{Kind, Sample};
use crate::util::{median, percentile};
use crate::vms::VmResults;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

pub struct Report {
    pub quick: bool,
    pub rounds: usize,
    pub dur: Duration,
    pub samples: Vec<Sample>,
    pub ctl: Control,
    pub vm: Option<VmResults>,
    pub elapsed: Duration,
}

#[derive(Clone, Copy, Default)]
struct Agg {
    gbps: f64,
    mpps: f64,
    cpu: f64,
    soft: f64,
    min_gbps: f64,
    max_gbps: f64,
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn pct(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.0}%", 100.0 * a / b)
    } else {
        "–".into()
    }
}

/// The head of a one-pair throughput table whose "vs." column compares with `baseline`.
fn throughput_header(t: &mut String, baseline: &str) {
    writeln!(t, "| setup | frame | Gbit/s | Mpps | CPU s/GB (process) | softirq s/GB (machine) | vs. {baseline} | min–max Gbit/s |").unwrap();
    writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|").unwrap();
}

/// A row of that table: `a`, setup `k` with `frame`-byte frames (shown with the FCS),
/// against `baseline_gbps`.
fn throughput_row(t: &mut String, k: Kind, frame: usize, a: Agg, baseline_gbps: f64) {
    writeln!(
        t,
        "| {} | {} B | {:.3} | {:.3} | {:.2} | {:.2} | {} | {:.2}–{:.2} |",
        k.label(),
        frame + 4,
        a.gbps,
        a.mpps,
        a.cpu,
        a.soft,
        pct(a.gbps, baseline_gbps),
        a.min_gbps,
        a.max_gbps
    )
    .unwrap();
}

fn yes(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**missed**" }
}

impl Report {
    fn agg(&self, kind: Kind, frame: usize, pairs: usize) -> Agg {
        let s: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.kind == kind && s.frame == frame && s.pairs == pairs)
            .collect();
        let g: Vec<f64> = s.iter().map(|s| s.gbps).collect();
        Agg {
            gbps: median(&g),
            mpps: median(&s.iter().map(|s| s.mpps).collect::<Vec<_>>()),
            cpu: median(&s.iter().map(|s| s.cpu_per_gb).collect::<Vec<_>>()),
            soft: median(&s.iter().map(|s| s.softirq_per_gb).collect::<Vec<_>>()),
            min_gbps: g.iter().cloned().fold(f64::INFINITY, f64::min),
            max_gbps: g.iter().cloned().fold(0.0, f64::max),
        }
    }

    fn machine(&self) -> String {
        format!(
            "- CPUs: {} × {}\n- kernel: {}\n- date: {}\n- QEMU: {}\n- vde2: {}\n- load average at the end: {}\n",
            sh("nproc"),
            sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
            sh("uname -sr"),
            sh("date -u '+%Y-%m-%d %H:%M UTC'"),
            sh("qemu-system-x86_64 --version | head -n1"),
            sh("dpkg-query -W -f '${Version}' vde2"),
            sh("cut -d' ' -f1-3 /proc/loadavg"),
        )
    }

    /// The two-host row (issue 16): the broker's overlay against the same kernel devices
    /// made by hand, one pair, target within 3%. Empty without overlay samples.
    pub fn overlay_table(&self) -> String {
        let mut t = String::new();
        if !self.samples.iter().any(|s| Kind::OVERLAY.contains(&s.kind)) {
            return t;
        }
        writeln!(
            t,
            "### Across two hosts over VXLAN, one pair (median of {} samples of {:.1} s each)\n",
            self.rounds,
            self.dur.as_secs_f64()
        )
        .unwrap();
        throughput_header(&mut t, "by hand");
        for frame in [60, 1514] {
            let by_hand = self.agg(Kind::OverlayByHand, frame, 1).gbps;
            for k in Kind::OVERLAY {
                throughput_row(&mut t, k, frame, self.agg(k, frame, 1), by_hand);
            }
        }
        let (o, h) = (
            self.agg(Kind::Overlay, 1514, 1).gbps,
            self.agg(Kind::OverlayByHand, 1514, 1).gbps,
        );
        writeln!(
            t,
            "\nTarget: the overlay within 3% of VXLAN by hand at 1518 B: {}",
            yes(o >= 0.97 * h)
        )
        .unwrap();
        t
    }

    /// The data-plane and control-plane tables (markdown; also what is printed).
    pub fn table(&self) -> String {
        let mut t = String::new();
        let bridge = |f| self.agg(Kind::Bridge, f, 1);
        writeln!(
            t,
            "### Fabric, one pair (median of {} samples of {:.1} s each)\n",
            self.rounds,
            self.dur.as_secs_f64()
        )
        .unwrap();
        throughput_header(&mut t, "bridge");
        for frame in [60, 1514] {
            for k in Kind::ALL {
                throughput_row(&mut t, k, frame, self.agg(k, frame, 1), bridge(frame).gbps);
            }
        }
        writeln!(t, "\n### Scaling: N pairs at once on one network, 1518 B frames (aggregate Gbit/s; per pair in parentheses)\n").unwrap();
        writeln!(t, "| setup | 1 | 2 | 4 | 8 | 8 vs. 1 |").unwrap();
        writeln!(t, "|---|---:|---:|---:|---:|---:|").unwrap();
        for k in Kind::ALL {
            let mut row = format!("| {} ", k.label());
            for n in [1, 2, 4, 8] {
                let a = self.agg(k, 1514, n);
                write!(row, "| {:.2} ({:.2}) ", a.gbps, a.gbps / n as f64).unwrap();
            }
            let r = self.agg(k, 1514, 8).gbps / self.agg(k, 1514, 1).gbps;
            writeln!(t, "{row}| {:.0}% |", 100.0 * r).unwrap();
        }
        let overlay = self.overlay_table();
        if !overlay.is_empty() {
            writeln!(t, "\n{overlay}").unwrap();
        }
        let c = &self.ctl;
        writeln!(t, "\n### Control plane (ms)\n").unwrap();
        writeln!(t, "| measurement | n | p50 | p99 | max |").unwrap();
        writeln!(t, "|---|---:|---:|---:|---:|").unwrap();
        // A part not run (`--ctl`) has no samples and no row.
        let mut row = |name: &str, v: &[f64]| {
            if v.is_empty() {
                return;
            }
            writeln!(
                t,
                "| {name} | {} | {:.3} | {:.3} | {:.3} |",
                v.len(),
                median(v),
                percentile(v, 99.0),
                percentile(v, 100.0)
            )
            .unwrap();
        };
        row(
            "cold acquire (new network: bridge, nftables, DHCP, DNS)",
            &c.cold_ms,
        );
        row(
            "warm acquire (one new TAP on a running network)",
            &c.warm_ms,
        );
        row(
            "the same, whole cycle: acquire, then the client closes its TAP fd and its connection",
            &c.warm_cycle_ms,
        );
        row(
            "the kernel alone, the same cycle back to back (`TUNSETIFF`, `TUNSETPERSIST`, `disable_ipv6`, one `RTM_SETLINK`, `close`; every 256th deletes the 256 closed: blocks alternating with the broker's)",
            &c.warm_by_hand_ms,
        );
        row("warm acquire, 10 ms apart", &c.warm_spaced_ms);
        row(
            "the floor: request → reply with an fd, from a process that only answers, 10 ms apart (same alternation)",
            &c.echo_spaced_ms,
        );
        row(
            "warm acquire, 10 ms apart, `allow_spoofing` network (no nftables call)",
            &c.warm_nospoof_ms,
        );
        row("qemu-bridge-helper: spawn → TAP fd received", &c.helper_ms);
        row(
            "broker: connect + acquire, same bridge-helper round",
            &c.helper_broker_ms,
        );
        row(
            &format!("{} clients at once: acquire (4 threads)", c.many.clients),
            &c.many.acquire_ms,
        );
        row(
            &format!(
                "{} clients over {} networks: acquire (4 threads)",
                c.scale.clients, c.scale.networks
            ),
            &c.scale.acquire_ms,
        );
        row(
            &format!(
                "the same {} TAPs over {} bridges by hand, no broker (`TUNSETIFF`, `TUNSETPERSIST`, `disable_ipv6`, one `RTM_SETLINK`; 4 threads)",
                c.scale_by_hand_ms.len(),
                c.scale.networks
            ),
            &c.scale_by_hand_ms,
        );
        row(
            "DHCP DISCOVER → OFFER (written into / read from the TAP)",
            &c.dhcp_ms,
        );
        for m in [&c.many, &c.scale] {
            if m.clients == 0 {
                continue;
            }
            let per = |v: f64| v / m.clients as f64;
            writeln!(
                t,
                "\n{} clients over {} network(s): {} errors{}; broker RSS {:.1} MiB (peak {:.1} MiB, {:.1} MiB with one client; {:.1} KiB per client), {} fds ({:.2} per client), soft fd limit {}; {} TAPs; the clients left in {:.2} s, all TAPs gone {:.2} s after the first left, {} left over.",
                m.clients, m.networks, m.errors,
                if m.errors > 0 { format!(" (first: {})", m.first_error) } else { String::new() },
                m.rss_kib as f64 / 1024.0, m.hwm_kib as f64 / 1024.0, m.rss_idle_kib as f64 / 1024.0,
                per(m.rss_kib.saturating_sub(m.rss_idle_kib) as f64),
                m.broker_fds, per(m.broker_fds as f64), m.nofile_soft, m.taps,
                m.close_s, m.release_s, m.taps_after
            )
            .unwrap();
        }
        if c.steps.iter().any(|(_, ops)| !ops.is_empty()) {
            writeln!(
                t,
                "\n### Where an acquire's time goes (the daemon's own step timings, µs)\n\n\
                 A broker of its own with `--log-level info,vmnet_broker::steps=debug`; cold \
                 acquires of new networks, then warm acquires 10 ms apart. Each line is one \
                 operation's steps in the order they ran, as p50 (p90); nested lines are \
                 parts of the line above them (`acquire request` = the registry's `acquire` \
                 + the state record + the reply; `acquire` ⊃ `create` ⊃ `start services`, \
                 and ⊃ `attach to the registry` ⊃ `attach`, the backend's).\n"
            )
            .unwrap();
            writeln!(t, "| acquire | operation | n | steps p50 (p90) |").unwrap();
            writeln!(t, "|---|---|---:|---|").unwrap();
            for (kind, ops) in &c.steps {
                for (op, steps) in ops {
                    let n = steps.first().map(|(_, v)| v.len()).unwrap_or(0);
                    let cells: Vec<String> = steps
                        .iter()
                        .map(|(s, v)| format!("{s} {:.0} ({:.0})", median(v), percentile(v, 90.0)))
                        .collect();
                    writeln!(t, "| {kind} | {op} | {n} | {} |", cells.join(" · ")).unwrap();
                }
            }
        }
        if c.dhcp_lost > 0 {
            writeln!(
                t,
                "DHCP: {} DISCOVERs got no OFFER within 3 tries.",
                c.dhcp_lost
            )
            .unwrap();
        }
        if let Some(vm) = &self.vm {
            writeln!(t, "\n### VMs (TCG), iperf3 {} s, receiver Mbit/s (median of runs; ratio vs. broker)\n", vm.seconds).unwrap();
            writeln!(t, "| test | network | runs | Mbit/s | vs. broker |").unwrap();
            writeln!(t, "|---|---|---:|---:|---:|").unwrap();
            for test in ["vm→vm", "host→vm"] {
                let med = |net: &str| {
                    let v: Vec<f64> = vm
                        .samples
                        .iter()
                        .filter(|s| s.net == net && s.test == test)
                        .filter_map(|s| s.mbps)
                        .collect();
                    (
                        median(&v),
                        v.len(),
                        vm.samples
                            .iter()
                            .filter(|s| s.net == net && s.test == test)
                            .count(),
                    )
                };
                let (b, _, _) = med("broker");
                for net in ["broker", "vde", "stream"] {
                    let (v, ok, all) = med(net);
                    if all == 0 {
                        continue;
                    }
                    writeln!(
                        t,
                        "| {test} | {net} | {ok}/{all} | {v:.0} | {} |",
                        pct(v, b)
                    )
                    .unwrap();
                }
            }
        }
        t
    }

    pub fn write(&self, out: &Path, root: &Path) {
        let plots = out.join("benchmarks");
        std::fs::create_dir_all(&plots).unwrap();
        let made = crate::report::plots::all(self, &plots);
        let c = &self.ctl;
        let b1 = self.agg(Kind::Broker, 1514, 1);
        let r1 = self.agg(Kind::Bridge, 1514, 1);
        let b0 = self.agg(Kind::Broker, 60, 1);
        let r0 = self.agg(Kind::Bridge, 60, 1);
        let warm = median(&c.warm_ms);
        let cold = median(&c.cold_ms);
        let rss = c.many.hwm_kib as f64 / 1024.0;
        let mut d = String::new();
        writeln!(d, "# Benchmarks\n").unwrap();
        writeln!(d, "Generated by `cargo bench --bench broker{}` in {:.0} s. Do not edit by hand: run it again.\n",
            if self.quick { " -- --quick" } else { "" }, self.elapsed.as_secs_f64()).unwrap();
        d.push_str(include_str!("method.md"));
        writeln!(d, "\n## Machine\n\n{}", self.machine()).unwrap();
        writeln!(d, "## Targets\n").unwrap();
        writeln!(d, "| target | result | |\n|---|---|---|").unwrap();
        writeln!(
            d,
            "| broker within 3% of the hand-made bridge, 1518 B | {} | {} |",
            pct(b1.gbps, r1.gbps),
            yes(b1.gbps >= 0.97 * r1.gbps)
        )
        .unwrap();
        writeln!(
            d,
            "| broker within 3% of the hand-made bridge, 64 B (pps) | {} | {} |",
            pct(b0.mpps, r0.mpps),
            yes(b0.mpps >= 0.97 * r0.mpps)
        )
        .unwrap();
        let warm99 = percentile(&c.warm_ms, 99.0);
        writeln!(
            d,
            "| warm acquire p50 ≤ 0.3 ms | {warm:.3} ms | {} |",
            yes(warm <= 0.3)
        )
        .unwrap();
        writeln!(
            d,
            "| warm acquire p99 ≤ 2 ms | {warm99:.3} ms | {} |",
            yes(warm99 <= 2.0)
        )
        .unwrap();
        writeln!(
            d,
            "| cold acquire p50 ≤ 10 ms | {cold:.1} ms | {} |",
            yes(cold <= 10.0)
        )
        .unwrap();
        writeln!(
            d,
            "| {} clients: no errors | {} errors | {} |",
            c.many.clients,
            c.many.errors,
            yes(c.many.errors == 0)
        )
        .unwrap();
        writeln!(
            d,
            "| {} clients: broker RSS < 30 MB | peak {rss:.1} MiB | {} |",
            c.many.clients,
            yes(rss < 30.0)
        )
        .unwrap();
        writeln!(
            d,
            "| {} TAPs gone within 2 s of their clients leaving | {} left after {:.2} s | {} |",
            c.many.taps,
            c.many.taps_after,
            c.many.release_s,
            yes(c.many.taps_after == 0 && c.many.release_s <= 2.0)
        )
        .unwrap();
        let s = &c.scale;
        let s99 = percentile(&s.acquire_ms, 99.0);
        let srss = s.hwm_kib as f64 / 1024.0;
        // Not run (`--ctl` without `scale`): no row, as in the tables.
        if s.clients > 0 {
            writeln!(
            d,
            "| {} clients over {} networks: 0 errors, acquire p99 ≤ 5 ms, RSS ≤ 64 MiB, released within 20 s | {} errors, p99 {s99:.2} ms, peak {srss:.1} MiB, {} left after {:.2} s | {} |",
            s.clients,
            s.networks,
            s.errors,
            s.taps_after,
            s.release_s,
            yes(s.errors == 0
                && s99 <= 5.0
                && srss <= 64.0
                && s.taps_after == 0
                && s.release_s <= 20.0)
        )
        .unwrap();
        }
        writeln!(
            d,
            "\nThe original (macOS): warm acquire about 1 ms, cold about 0.75 s.\n"
        )
        .unwrap();
        writeln!(d, "## Results\n\n{}", self.table()).unwrap();
        if !made.is_empty() {
            writeln!(d, "\n## Plots\n").unwrap();
            for (f, title) in &made {
                writeln!(d, "![{title}](benchmarks/{f})\n").unwrap();
            }
        }
        d.push_str(&self.discussion());
        writeln!(d, "\n## Raw samples\n\n| setup | frame | pairs | Gbit/s | Mpps | CPU s/GB | softirq s/GB |\n|---|---:|---:|---:|---:|---:|---:|").unwrap();
        for s in &self.samples {
            writeln!(
                d,
                "| {} | {} | {} | {:.3} | {:.4} | {:.2} | {:.2} |",
                s.kind.short(),
                s.frame + 4,
                s.pairs,
                s.gbps,
                s.mpps,
                s.cpu_per_gb,
                s.softirq_per_gb
            )
            .unwrap();
        }
        if let Some(vm) = &self.vm {
            writeln!(
                d,
                "\n| VM test | network | Mbit/s | note |\n|---|---|---:|---|"
            )
            .unwrap();
            for s in &vm.samples {
                writeln!(
                    d,
                    "| {} | {} | {} | {} |",
                    s.test,
                    s.net,
                    s.mbps.map_or("failed".into(), |v| format!("{v:.0}")),
                    s.note
                )
                .unwrap();
            }
        }
        let ms = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(d, "\nCold acquire samples (ms): {}\n", ms(&c.cold_ms)).unwrap();
        writeln!(d, "qemu-bridge-helper samples (ms): {}\n", ms(&c.helper_ms)).unwrap();
        std::fs::write(out.join("benchmarks.md"), d).unwrap();
        let _ = root;
    }

    fn discussion(&self) -> String {
        let mut d = String::from("\n## Discussion: where we win, where we lose, and why\n\n");
        let a = |k, f, n| self.agg(k, f, n);
        // One pair of each setup at one frame size.
        let one_pair = |kinds: [Kind; 4], frame| kinds.map(|k| a(k, frame, 1));
        let single = [Kind::Broker, Kind::Bridge, Kind::Vde, Kind::Stream];
        let [b1, r1, v1, s1] = one_pair(single, 1514);
        let [b0, r0, v0, s0] = one_pair(single, 60);
        writeln!(d, "- **Against userspace switches.** One pair, 1518 B: the broker's network carries {:.1}× vde_switch and {:.1}× the stream hub; 64 B: {:.1}× and {:.1}× the packet rate. CPU per GB: broker {:.2} s, vde_switch {:.2} s, stream hub {:.2} s (1518 B). Every frame through a userspace switch is copied into and out of a process and costs two context switches; through the bridge it stays in the kernel. Where the stream hub matches or beats the TAP paths with one pair, that is pipelining on 2 CPUs: sender, hub and receiver run on different CPUs with blocking writes (no frame is lost), while a TAP write does the whole bridge path in the sender's system call and frames the receiver cannot take in time are dropped after being paid for. The hub's cost shows as soon as a second pair shares the network (scaling below).",
            b1.gbps / v1.gbps, b1.gbps / s1.gbps, b0.mpps / v0.mpps, b0.mpps / s0.mpps, b1.cpu, v1.cpu, s1.cpu).unwrap();
        writeln!(d, "- **Against the bare bridge** (the kernel's limit) the broker's network reaches {} at 1518 B and {} at 64 B with one pair (target: within 3%), both namespaces at their default `bridge-nf-call-iptables` = 1 (br_netfilter is built into this kernel). Unicast between two guests of a network does not cross the bridge at all: the TAP guard (a BPF program at TC ingress of each TAP), once a frame has passed every anti-spoofing check, redirects it to the TAP that holds the destination MAC on the same bridge, whose own guard still checks it on the way out (docs/design.md, \"The guest-to-guest fast path\"). That skips the bridge's forwarding database and, where br_netfilter is on, conntrack, the NAT hooks and the broker's `inet` chains, which every bridged IPv4 frame of the hand-made bridge still runs through: hence more than 100% is possible at 1. What the fast path cannot skip is the guard itself (one map lookup to check the sender, one for the target, a few loads). `--fabric-only` compares the two at both `bridge-nf-call` settings and 1 and 8 pairs (docs/design.md has its last table). Single samples vary by tens of percent on this shared machine (min–max columns), so differences of a few percent are below the noise.",
            pct(b1.gbps, r1.gbps), pct(b0.mpps, r0.mpps)).unwrap();
        if self.samples.iter().any(|s| s.kind == Kind::Overlay) {
            let (o1, h1, o0, h0) = (
                a(Kind::Overlay, 1514, 1),
                a(Kind::OverlayByHand, 1514, 1),
                a(Kind::Overlay, 60, 1),
                a(Kind::OverlayByHand, 60, 1),
            );
            writeln!(d, "- **Across two hosts** the broker's overlay carries {} of VXLAN and a bridge made by hand at 1518 B and {} at 64 B, one pair (target: within 3%). The two setups have the same MTUs (underlay 1550, overlay, bridge and TAPs 1500: the broker takes the underlay's less 50), UDP checksums, source port range, learning and TAP flags, and both hosts' `bridge-nf-call-iptables` at 1; what only the broker's hosts have is NAT (so conntrack), its `inet` and overlay chains and the TAP guard. Before the overlay fast path that was the gap (60–87%): every frame between a TAP and the VXLAN port was bridged, so br_netfilter ran it through conntrack and the broker's chains on both hosts. Now the TAP guard hands unicast from a guest to a MAC seen behind the VXLAN port straight to the port, and `overlay_ingress` on the port hands unicast for a local guest straight to its TAP (docs/design.md, \"The overlay fast path\"): the bridge and br_netfilter are skipped on both hosts, as the hand-made pair cannot. What remains is the guard (three programs' map lookups per frame) and conntrack of the outer UDP packets (NAT's, on both hosts). docs/multi-host.md has the A/B runs. Single samples vary by tens of percent on this shared machine: `-- --only-overlay --rounds N` prints per-round paired ratios.",
                pct(o1.gbps, h1.gbps), pct(o0.mpps, h0.mpps)).unwrap();
        }
        let per = |k| a(k, 1514, 8).gbps / a(k, 1514, 1).gbps;
        writeln!(d, "- **Scaling.** From 1 to 8 pairs the aggregate goes to {:.0}% (broker), {:.0}% (bridge), {:.0}% (vde_switch), {:.0}% (stream hub) of the one-pair rate. With 2 CPUs, 8 pairs are 16+ busy threads, so every setup is CPU-bound and the per-pair rate falls for all of them. The flooding hub (socket_vmnet's design) collapses: each frame is copied to all 2N−1 other endpoints. vde_switch learns MACs, so it does not flood and holds its (low) rate. TAP writes never block: when receivers fall behind, frames are dropped at the receiving TAP's queue after the bridge path was already paid, which is why the kernel setups lose more than their share at 4–8 pairs on 2 CPUs (a real TCP sender backs off; this open-loop generator does not).",
            100.0 * per(Kind::Broker), 100.0 * per(Kind::Bridge), 100.0 * per(Kind::Vde), 100.0 * per(Kind::Stream)).unwrap();
        let c = &self.ctl;
        // The daemon's own step timings (p50 µs; NaN when the steps part did not run).
        let step = |kind: &str, op: &str, name: &str| {
            c.steps
                .iter()
                .filter(|(k, _)| *k == kind)
                .flat_map(|(_, ops)| ops.iter().filter(|(o, _)| o == op))
                .flat_map(|(_, steps)| steps.iter().filter(|(s, _)| s == name))
                .map(|(_, v)| median(v))
                .next()
                .unwrap_or(f64::NAN)
        };
        writeln!(d, "- **Warm acquire** p50 {:.3} ms back to back, {:.3} ms 10 ms apart (target 0.3 ms; the original about 1 ms); {:.3} ms on an `allow_spoofing` network. The daemon's step timings of spaced warm acquires (table above) split its side of it: the registry {:.0} µs, of which the backend's attach {:.0} µs (a pool TAP of an anti-spoofing network is held open by the broker and its fd sent as it is: no ioctl, no netlink, one `poll` to check nothing is queued; an `allow_spoofing` network's pool TAPs are closed and attached by name, one `TUNSETIFF`); the state record {:.0} µs (one append of a few hundred bytes, written by the acquire itself); the reply {:.0} µs. The same request and reply (an acquire's sizes, with an fd) exchanged with a process that does nothing but answer, timed alternately with these acquires, took p50 {:.3} ms (p99 {:.3} ms): the floor of any daemon on this machine, so the broker's own part of a spaced acquire is about {:.3} ms at p50, of which its steps above account for {:.3} ms; the rest is outside them (from the request's arrival to its read, and from the reply's send to the client's read). Three changes took the warm path off the kernel's RTNL lock and out of the background work's way (interleaved A/B runs on this machine): no other thread is woken before the reply is sent (the pool's refill and the binder learn of the acquire after the send, and the state writer is not woken for it at all, since the acquire writes its own record before it answers; each wake started the other runtime worker on the other CPU, and the spaced p50 went from 0.55 to 0.33 ms in two interleaved pairs of bench runs, 0.48–0.52 → 0.22–0.31 ms in three pairs with a probe client); the held-open pool (the backend's pool step 106–186 µs → 7–14 µs in three rounds; every TUN ioctl takes RTNL, which the reaper holds 25–80 ms per batch of deletions); a refill that waits 3 ms after the last acquire while the pool still has TAPs, so its 0.65 ms of kernel work no longer takes a CPU from the client reading its reply (client-side p50 of acquires 10 ms apart 0.80–0.85 → 0.39–0.52 ms in two pairs of runs). Back to back, acquires empty the pool of 4 faster than TAPs are made (`tap`, `guard`, `plug` in the cold rows): one that finds it empty waits for the TAP its refill is making, and a pool half empty is refilled at once, rather than each acquire making its own behind the refill's on the RTNL lock (p50 0.77–0.78 → 0.65–0.69 ms, three interleaved pairs of runs of this row alone, `--ctl warm`). Back to back, each client's closed pool TAP goes back to the pool, reset as new, while the pool has room (docs/design.md, \"A closed pool TAP goes back to its pool, as new\"): a client coming and going costs the kernel no TAP made and none deleted. The kernel alone making and deleting one TAP per client, back to back, in blocks alternating with the broker's (the rows above), took p50 {:.3} ms and p99 {:.3} ms a cycle, against the broker's whole cycle (connect, acquire, close, disconnect) p50 {:.3} ms ({:.2}×), {} Before, every client got a TAP made for it and the reaper deleted it after: back-to-back p50 0.83–0.96 ms, p99 1.75–2.71 ms, against 0.22–0.26 and 1.15–1.42 ms taking TAPs back (three interleaved pairs of runs of this row alone, `--ctl warm`). The back-to-back p99 ({:.1} ms, target 2 ms) is what the RTNL lock still costs: the pool's refill and the taking back of closed TAPs wait until no acquire is attaching before each kernel step, and run on threads of their own (a runtime worker the next acquire needs never waits for the lock: p99 1.58–1.94 against 2.05–2.17 ms when the refill moved off them, three interleaved pairs; docs/design.md, \"The kernel calls of making a TAP stay on the runtime workers\"), and the reaper, with fewer TAPs to delete, deletes in batches of up to 256 (with batches of 64 the back-to-back p99 was 10.3–11.5 ms, with 256 3.1 ms, before TAPs were taken back) and at once when a bridge fills with closed TAPs rather than refusing the next one (docs/design.md, \"A closed TAP never costs a client its port\").",
            median(&c.warm_ms), median(&c.warm_spaced_ms), median(&c.warm_nospoof_ms),
            step("warm", "acquire request", "registry"), step("warm", "attach to the registry", "backend"),
            step("warm", "acquire request", "state"), step("warm", "acquire request", "reply"),
            median(&c.echo_spaced_ms), percentile(&c.echo_spaced_ms, 99.0),
            median(&c.warm_spaced_ms) - median(&c.echo_spaced_ms),
            (step("warm", "acquire request", "registry")
                + step("warm", "acquire request", "state")
                + step("warm", "acquire request", "reply"))
                / 1e3,
            median(&c.warm_by_hand_ms), percentile(&c.warm_by_hand_ms, 99.0),
            median(&c.warm_cycle_ms), median(&c.warm_cycle_ms) / median(&c.warm_by_hand_ms),
            if median(&c.warm_by_hand_ms) > 0.3 {
                "so on this machine no design that makes and deletes a TAP per client could reach the 0.3 ms target."
            } else {
                "so on this machine the kernel alone would leave room under the 0.3 ms target even making a TAP per client."
            },
            percentile(&c.warm_ms, 99.0)).unwrap();
        writeln!(d, "- **Cold acquire** p50 {:.1} ms (target 10 ms; the original 0.75 s including daemon start). The step timings: the firewall's one nftables netlink batch for the network {:.1} ms (no `nft` process: the kernel's transaction, its acks, the Docker check and `ip_forward`), the subnet and IPv6 prefix choice {:.1} ms (one address and two route dumps at once to find a free subnet, while the new network's ULA prefix is read and written on a blocking thread; its fsync follows, waited for by nothing), the bridge {:.1} ms, DHCP/DNS/RA start {:.1} ms, then the first TAP made, guarded and plugged {:.1} ms (a new network's pool is still empty; the TAP guard's BPF programs were loaded once, before the socket was served).",
            median(&c.cold_ms), step("cold", "start services", "firewall") / 1e3, step("cold", "create", "subnet") / 1e3,
            step("cold", "create", "bridge") / 1e3, step("cold", "start services", "services") / 1e3,
            step("cold", "attach to the registry", "backend") / 1e3).unwrap();
        writeln!(d, "- **qemu-bridge-helper** hands QEMU a TAP in {:.2} ms p50 (fork + exec of a setuid-capable helper, ACL file, TAP, bridge); the broker's connect + acquire {:.2} ms in the same round. The helper does less (no MAC assignment, no anti-spoofing, no DHCP/DNS) but starts a process per TAP; the broker answers from a running daemon, needs neither root nor a setuid helper in the client, and does more per TAP.",
            median(&c.helper_ms), median(&c.helper_broker_ms)).unwrap();
        writeln!(d, "- **DHCP**: DISCOVER to OFFER p50 {:.3} ms, p99 {:.3} ms, measured at the guest's side of the TAP.",
            median(&c.dhcp_ms), percentile(&c.dhcp_ms, 99.0)).unwrap();
        writeln!(d, "- **Release** of {} TAPs: the clients left (one after the other, each closing its TAP fd and its connection) in {:.2} s and every TAP was gone {:.2} s after the first left. A TAP the kernel deletes when its last fd closes costs the closing process an RCU grace period (about 20 ms) inside `close`, one TAP after the other (19.9 s for 1000 before); the broker makes every TAP persistent, so a `close` only detaches the fd, and deletes the closed TAPs itself, whatever closed meanwhile in one kernel transaction (an interface group, deleted with a single wait). What remains is per TAP in the kernel: detaching a port from the bridge waits for an expedited grace period, and the bridge walks its forwarding table for each port.",
            c.many.taps, c.many.close_s, c.many.release_s).unwrap();
        if c.scale.clients > 0 && !c.scale_by_hand_ms.is_empty() {
            let (b50, b99) = (
                median(&c.scale.acquire_ms),
                percentile(&c.scale.acquire_ms, 99.0),
            );
            let (h50, h99) = (
                median(&c.scale_by_hand_ms),
                percentile(&c.scale_by_hand_ms, 99.0),
            );
            writeln!(d, "- **{} clients over {} networks**: acquire p50 {:.2} ms, p99 {:.2} ms (target p99 5 ms), with no TAP pool (every acquire makes its TAP: so the row counts only the clients' TAPs). The kernel alone, making the same TAPs over as many bridges from as many threads with the least an acquire needs of it (made, persistent, without IPv6 of its own, on its bridge and up: four requests, each under the RTNL lock), took p50 {:.2} ms and p99 {:.2} ms per TAP in the same run, so the broker's acquire costs {:.1}× (p50) and {:.1}× (p99) the kernel's floor. On top of that floor an acquire pays the TAP guard (a clsact qdisc on the guard's two shared TC blocks, and two filter requests the kernel answers \"exists\" from a lookup: with a pair of blocks per TAP, as before, the kernel walked a list of every block of the host on each TAP made or deleted: in three interleaved pairs of runs of this row the shared blocks took p50 from 4.1–5.3 to 3.7–3.9 ms and p99 from 12.2–13.3 to 9.3–10.9 ms; docs/design.md, \"The TAP guard\"), the owner, group and header size of the TAP (one RTNL request each), the MAC, MTU and alias in its `RTM_SETLINK`, the client's round trip and the broker's records. {}",
                c.scale.clients, c.scale.networks, b50, b99, h50, h99, b50 / h50, b99 / h99,
                if h99 > 5.0 {
                    "The kernel alone misses a p99 of 5 ms here: 4 threads making TAPs queue on one lock on 2 CPUs, and the per-TAP work grows with the ports already on the bridge, so on this machine that target is below the floor of any design that makes a TAP per client when asked."
                } else {
                    "The kernel alone stays under a p99 of 5 ms here, so the rest of the gap is the broker's own."
                }).unwrap();
        }
        if c.many.clients > 0 {
            let kib = |k: u64| k as f64 / 1024.0;
            let per = |m: &crate::control::Many| {
                (m.rss_kib.saturating_sub(m.rss_idle_kib)) as f64 / m.clients.max(1) as f64
            };
            writeln!(d, "- **Memory**: {:.1} MiB with one client, {:.1} MiB with {} ({:.1} KiB per client: its connection, its lease and TAP records, its socket's buffers); peak {:.1} MiB. {}: loading the TAP guard with aya 0.13 parses the kernel's BTF (5.5 MB here) though the programs relocate nothing against it (aya 0.15 parses it only when needed, but needs a newer rustc than ours). Freed, that memory stayed in glibc's arena of the thread that loaded it, 15 MiB of a 23 MiB RSS with no client at all; the broker now hands it back to the kernel (`malloc_trim`) once the guard is loaded, and loads without target BTF, which skips aya's second parse (peak 36 → 22 MiB, idle RSS 23 → 9 MiB, measured once each on this machine).",
                kib(c.many.rss_idle_kib), kib(c.many.rss_kib), c.many.clients, per(&c.many), kib(c.many.hwm_kib),
                if c.many.hwm_kib > c.many.rss_kib + 1024 { "That peak is the broker's start, not its clients" } else { "The start's own peak is below that" }).unwrap();
        }
        if let Some(vm) = &self.vm {
            let med = |net: &str, test: &str| {
                median(
                    &vm.samples
                        .iter()
                        .filter(|s| s.net == net && s.test == test)
                        .filter_map(|s| s.mbps)
                        .collect::<Vec<_>>(),
                )
            };
            writeln!(d, "- **VMs (TCG)**: VM→VM on the broker's network {:.1}× vde_switch and {:.1}× QEMU's `-netdev stream`; host→VM {:.1}× vde_switch. Under TCG the emulated CPU limits everything, so these ratios understate the gap a KVM guest would see (the fabric numbers above show the transport alone). With `-netdev stream` and `-netdev vde` QEMU moves every frame through a socket in its main loop, in the same emulator process that runs the TCG guest, instead of the TAP path.",
                med("broker", "vm→vm") / med("vde", "vm→vm"), med("broker", "vm→vm") / med("stream", "vm→vm"), med("broker", "host→vm") / med("vde", "host→vm")).unwrap();
        }
        d
    }
}

#[path = "plots.rs"]
pub mod plots;
