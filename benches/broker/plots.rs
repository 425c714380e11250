//! PNG plots from the measured data (plotters, bitmap backend, DejaVu Sans via ab_glyph).

use super::Report;
use crate::fabric::Kind;
use crate::util::median;
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

fn font_ready() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| {
        for p in [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
        ] {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .is_ok();
            }
        }
        false
    })
}

type R = Result<(), Box<dyn std::error::Error>>;

/// Vertical bars with their values written on top; `log` for a log-scale y axis.
fn bars(path: &Path, title: &str, ylabel: &str, data: &[(String, f64)], log: bool) -> R {
    // Parts a run skipped are NaN: no bar. Without this a log axis over an empty or
    // infinite range never ends computing its key points (plotters' LogCoord).
    let data: Vec<(String, f64)> = data.iter().filter(|d| d.1.is_finite()).cloned().collect();
    let data = &data[..];
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = data.iter().map(|d| d.1).fold(0.0f64, f64::max).max(1e-9);
    let min = data
        .iter()
        .map(|d| d.1)
        .filter(|v| *v > 0.0)
        .fold(max, f64::min);
    let n = data.len() as f64;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(60)
        .y_label_area_size(70);
    let labels: Vec<String> = data.iter().map(|d| d.0.clone()).collect();
    let fmt_x = |x: &f64| {
        let i = (*x - 0.5).round();
        if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 {
            labels.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    if log {
        let lo = (min / 2.0).max(1e-4);
        let mut c = b.build_cartesian_2d(0.0..n, (lo..max * 3.0).log_scale())?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(data.len() * 2 + 1)
            .x_label_formatter(&fmt_x)
            .y_desc(ylabel)
            .draw()?;
        for (i, (_, v)) in data.iter().enumerate() {
            let x = i as f64;
            c.draw_series(std::iter::once(Rectangle::new(
                [(x + 0.15, lo), (x + 0.85, *v)],
                COLORS[i % 4].filled(),
            )))?;
            c.draw_series(std::iter::once(Text::new(
                format!("{v:.3}"),
                (x + 0.3, *v * 1.15),
                ("sans-serif", 16),
            )))?;
        }
    } else {
        let mut c = b.build_cartesian_2d(0.0..n, 0.0..max * 1.15)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(data.len() * 2 + 1)
            .x_label_formatter(&fmt_x)
            .y_desc(ylabel)
            .draw()?;
        for (i, (_, v)) in data.iter().enumerate() {
            let x = i as f64;
            c.draw_series(std::iter::once(Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, *v)],
                COLORS[i % 4].filled(),
            )))?;
            c.draw_series(std::iter::once(Text::new(
                format!("{v:.2}"),
                (x + 0.35, *v + max * 0.02),
                ("sans-serif", 16),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

fn scaling(rep: &Report, path: &Path) -> R {
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = Kind::ALL
        .iter()
        .flat_map(|k| [1, 2, 4, 8].map(|n| rep.agg(*k, 1514, n).gbps))
        .fold(0.0f64, f64::max);
    let mut c = ChartBuilder::on(&root)
        .caption(
            "Aggregate throughput vs. concurrent pairs (1518 B frames)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5f64..8.5, 0.0..max * 1.15)?;
    c.configure_mesh()
        .x_desc("pairs on one network")
        .y_desc("Gbit/s")
        .draw()?;
    for (i, k) in Kind::ALL.iter().enumerate() {
        let pts: Vec<(f64, f64)> = [1, 2, 4, 8]
            .iter()
            .map(|&n| (n as f64, rep.agg(*k, 1514, n).gbps))
            .collect();
        let col = COLORS[i];
        c.draw_series(LineSeries::new(pts.clone(), col.stroke_width(3)))?
            .label(k.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(3)));
        c.draw_series(pts.iter().map(|p| Circle::new(*p, 4, col.filled())))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes every plot it can; returns (file name, title) of those written.
pub fn all(rep: &Report, dir: &Path) -> Vec<(String, String)> {
    assert!(
        font_ready(),
        "no DejaVuSans.ttf found: install package fonts-dejavu-core (`scripts/deps test` does)"
    );
    let mut made = Vec::new();
    let mut one = |file: &str, title: &str, r: R| match r {
        Ok(()) => made.push((file.to_string(), title.to_string())),
        Err(e) => eprintln!("bench: plot {file}: {e}"),
    };
    let g: Vec<(String, f64)> = Kind::ALL
        .iter()
        .map(|k| (k.short().to_string(), rep.agg(*k, 1514, 1).gbps))
        .collect();
    one(
        "fabric-1518.png",
        "Throughput, one pair, 1518 B frames",
        bars(
            &dir.join("fabric-1518.png"),
            "One pair, 1518 B frames",
            "Gbit/s",
            &g,
            false,
        ),
    );
    let p: Vec<(String, f64)> = Kind::ALL
        .iter()
        .map(|k| (k.short().to_string(), rep.agg(*k, 60, 1).mpps))
        .collect();
    one(
        "fabric-64.png",
        "Packet rate, one pair, 64 B frames",
        bars(
            &dir.join("fabric-64.png"),
            "One pair, 64 B frames",
            "Mpps",
            &p,
            false,
        ),
    );
    one(
        "scaling.png",
        "Aggregate throughput vs. pairs",
        scaling(rep, &dir.join("scaling.png")),
    );
    let c = &rep.ctl;
    let lat = vec![
        ("warm acquire".to_string(), median(&c.warm_ms)),
        (
            "broker (helper round)".to_string(),
            median(&c.helper_broker_ms),
        ),
        ("qemu-bridge-helper".to_string(), median(&c.helper_ms)),
        ("DHCP offer".to_string(), median(&c.dhcp_ms)),
        ("cold acquire".to_string(), median(&c.cold_ms)),
    ];
    let lat: Vec<_> = lat
        .into_iter()
        .filter(|(_, v)| v.is_finite() && *v > 0.0)
        .collect();
    one(
        "control.png",
        "Control plane p50 latencies (ms, log scale)",
        bars(
            &dir.join("control.png"),
            "Control plane, p50 (ms, log scale)",
            "ms",
            &lat,
            true,
        ),
    );
    if let Some(vm) = &rep.vm {
        let mut v = Vec::new();
        for (test, net) in [
            ("vm→vm", "broker"),
            ("vm→vm", "vde"),
            ("vm→vm", "stream"),
            ("host→vm", "broker"),
            ("host→vm", "vde"),
        ] {
            let x: Vec<f64> = vm
                .samples
                .iter()
                .filter(|s| s.test == test && s.net == net)
                .filter_map(|s| s.mbps)
                .collect();
            if !x.is_empty() {
                v.push((format!("{test} {net}"), median(&x)));
            }
        }
        if !v.is_empty() {
            one(
                "vms.png",
                "iperf3 between TCG guests (Mbit/s)",
                bars(
                    &dir.join("vms.png"),
                    "iperf3, TCG guests (Mbit/s)",
                    "Mbit/s",
                    &v,
                    false,
                ),
            );
        }
    }
    made
}
