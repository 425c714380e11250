//! iperf3 between TCG guests: VM to VM and host to VM on the broker's network, on a
//! vde_switch network (QEMU `-netdev vde`) and over QEMU's `-netdev stream` link. TCG
//! guests are slow, so these are compared as ratios, not as absolute speeds.

use crate::netns::Netns;
use crate::util::*;
use crate::vm::{self, VmSpec};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct VmSample {
    pub net: &'static str,
    pub test: &'static str,
    /// Mbit/s reported by iperf3's receiver; None if the run failed.
    pub mbps: Option<f64>,
    pub note: String,
}

#[derive(Clone, Debug, Default)]
pub struct VmResults {
    pub samples: Vec<VmSample>,
    pub seconds: u32,
}

const MAC1: &str = "52:54:00:77:00:11";
const MAC2: &str = "52:54:00:77:00:12";

/// How each guest gets its address.
fn addr_cmd(net: &str, n: u8) -> String {
    match net {
        "broker" => "dhcp eth0 >/dev/null".to_string(),
        "vde" => format!("static_ip eth0 10.78.0.1{n}/24"),
        _ => format!("static_ip eth0 10.79.0.1{n}/24"),
    }
}

fn prefix(net: &str) -> &'static str {
    match net {
        "broker" => "10.77.0",
        "vde" => "10.78.0",
        _ => "10.79.0",
    }
}

fn client_script(net: &str, target: &str, secs: u32, reverse: bool) -> String {
    let r = if reverse { "-R " } else { "" };
    format!(
        "{}\nwait_for 60 sh -c 'iperf3 -c {target} {r}-t {secs} -f m > /tmp/o 2>&1'\ncat /tmp/o\n\
         result mbps \"$(awk '/receiver/ {{print $(NF-2)}}' /tmp/o | tail -n1)\"\n",
        addr_cmd(net, 2)
    )
}

fn server_script(net: &str) -> String {
    format!(
        "{}\niperf3 -s -1 >/dev/null 2>&1\nresult served $?\n",
        addr_cmd(net, 1)
    )
}

fn spec(name: &str, script: String) -> VmSpec {
    let mut s = VmSpec::new(name, &script);
    s.iperf3 = true;
    s.timeout = Duration::from_secs(120);
    s
}

/// Runs one guest with extra QEMU arguments and fds (passed as 3, 4, ...).
fn run_guest(s: &VmSpec, extra: Vec<String>, fds: &[std::os::fd::BorrowedFd]) -> vm::VmOutput {
    let prep = vm::prepare(s);
    let argv = vm::qemu_argv(s, &prep);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).args(extra).stdin(Stdio::null());
    let pairs: Vec<_> = fds
        .iter()
        .enumerate()
        .map(|(i, f)| (*f, 3 + i as i32))
        .collect();
    vm::pass_fds(&mut cmd, &pairs);
    vm::run_vm(cmd, &prep, s.timeout)
}

fn nic(netdev: String, mac: &str) -> Vec<String> {
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
    ]
}

fn mbps(o: &vm::VmOutput) -> (Option<f64>, String) {
    let v = o
        .results
        .get("mbps")
        .and_then(|v| v.trim().parse::<f64>().ok());
    let note = if v.is_some() {
        String::new()
    } else {
        format!("completed={} timed_out={}", o.completed, o.timed_out)
    };
    if v.is_none() {
        eprintln!(
            "bench: a VM run failed; console tail:\n{}",
            tail(&o.console, 20)
        );
    }
    (v, note)
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// VM to VM on `net`; returns receiver Mbit/s.
fn vm_to_vm(net: &'static str, secs: u32) -> VmSample {
    let target = format!("{}.11", prefix(net));
    let (s1, s2) = (
        spec("vm1", server_script(net)),
        spec("vm2", client_script(net, &target, secs, false)),
    );
    let out = match net {
        "broker" => {
            let b = broker_net();
            let c1 = b.client();
            let c2 = b.client();
            let t1 = c1
                .acquire_with_mac("vmnet", Some(parse_mac(MAC1).into()))
                .unwrap();
            let t2 = c2
                .acquire_with_mac("vmnet", Some(parse_mac(MAC2).into()))
                .unwrap();
            let o = std::thread::scope(|s| {
                let h = s
                    .spawn(|| run_guest(&s1, nic("tap,id=n0,fd=3".into(), MAC1), &[t1.fd.as_fd()]));
                let o2 = run_guest(&s2, nic("tap,id=n0,fd=3".into(), MAC2), &[t2.fd.as_fd()]);
                let _ = h.join();
                o2
            });
            drop((t1, t2, c1, c2));
            b.stop();
            o
        }
        "vde" => {
            let (_ns, sw, _g, _d) = vde_net();
            let dev = format!("vde,id=n0,sock={}", sw.display());
            std::thread::scope(|s| {
                let h = s.spawn(|| run_guest(&s1, nic(dev.clone(), MAC1), &[]));
                let o2 = run_guest(&s2, nic(dev.clone(), MAC2), &[]);
                let _ = h.join();
                o2
            })
        }
        _ => {
            let dir = tempfile::Builder::new()
                .prefix("vmnbt-st-")
                .tempdir()
                .unwrap();
            let p = dir.path().join("link.sock");
            let srv = format!(
                "stream,id=n0,server=on,addr.type=unix,addr.path={}",
                p.display()
            );
            let cli = format!(
                "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                p.display()
            );
            std::thread::scope(|s| {
                let h = s.spawn(|| run_guest(&s1, nic(srv, MAC1), &[]));
                let deadline = Instant::now() + Duration::from_secs(20);
                while !p.exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let o2 = run_guest(&s2, nic(cli, MAC2), &[]);
                let _ = h.join();
                o2
            })
        }
    };
    let (mbps, note) = mbps(&out);
    VmSample {
        net,
        test: "vm→vm",
        mbps,
        note,
    }
}

/// Host (the namespace holding the network's gateway address) to VM: iperf3 server on the
/// host, the guest runs the client with -R so the host sends.
fn host_to_vm(net: &'static str, secs: u32) -> VmSample {
    let gw = format!("{}.1", prefix(net));
    let s2 = spec("vm2", client_script(net, &gw, secs, true));
    let server = |ns: &str| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "iperf3", "-s", "-1", "-B", &gw])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Guarded::spawn(c, "iperf3 -s")
    };
    let out = match net {
        "broker" => {
            let b = broker_net();
            let c = b.client();
            let t = c
                .acquire_with_mac("vmnet", Some(parse_mac(MAC2).into()))
                .unwrap();
            let _srv = server(&b.ns.name);
            let o = run_guest(&s2, nic("tap,id=n0,fd=3".into(), MAC2), &[t.fd.as_fd()]);
            drop((t, c));
            drop(_srv);
            b.stop();
            o
        }
        _ => {
            let (ns, sw, _g, _d) = vde_net();
            let _srv = server(&ns.name);
            run_guest(
                &s2,
                nic(format!("vde,id=n0,sock={}", sw.display()), MAC2),
                &[],
            )
        }
    };
    let (mbps, note) = mbps(&out);
    VmSample {
        net,
        test: "host→vm",
        mbps,
        note,
    }
}

fn broker_net() -> BrokerProc {
    let cfg = format!(
        r#"{{"subnet": "10.77.0.1", "dhcp_reservations": [{{"mac": "{MAC1}", "ip": "10.77.0.11"}}, {{"mac": "{MAC2}", "ip": "10.77.0.12"}}]}}"#
    );
    BrokerProc::start("bench-vm", &[("vmnet".into(), cfg)], None)
}

/// A vde_switch with a TAP (`vtap0`, 10.78.0.1/24) in a fresh namespace as the host side.
fn vde_net() -> (Netns, std::path::PathBuf, Guarded, tempfile::TempDir) {
    let ns = Netns::new("bench-vde");
    let dir = tempfile::Builder::new()
        .prefix("vmnbt-vdevm-")
        .tempdir()
        .unwrap();
    let sw = dir.path().join("sw");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "vde_switch", "-t", "vtap0", "-s"])
        .arg(&sw)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let g = Guarded::spawn(cmd, "vde_switch -t");
    wait_path(&sw.join("ctl"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Command::new("ip")
        .args(["-n", &ns.name, "link", "show", "vtap0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "vde_switch made no vtap0");
        std::thread::sleep(Duration::from_millis(20));
    }
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "vtap0"]);
    ns.ip(&["link", "set", "vtap0", "up"]);
    (ns, sw, g, dir)
}

fn wait_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn run(quick: bool) -> VmResults {
    let secs = if quick { 2 } else { 5 };
    let rounds = if quick { 1 } else { 2 };
    // Build the guest (with iperf3) once, outside any timing.
    let _ = vm::guest_image_with_iperf3();
    let mut r = VmResults {
        samples: Vec::new(),
        seconds: secs,
    };
    // The smoke run (--quick) keeps one baseline, QEMU's own stream link, and no
    // host→VM baseline: each TCG guest pair costs 15–25 s of a 3-minute budget.
    let nets: &[&'static str] = if quick {
        &["broker", "stream"]
    } else {
        &["broker", "vde", "stream"]
    };
    for round in 0..rounds {
        for k in 0..nets.len() {
            let net = nets[(k + round) % nets.len()];
            let s = vm_to_vm(net, secs);
            eprintln!("  vm→vm {net}: {:?} Mbit/s", s.mbps);
            r.samples.push(s);
            if net != "stream" {
                let s = host_to_vm(net, secs);
                eprintln!("  host→vm {net}: {:?} Mbit/s", s.mbps);
                r.samples.push(s);
            }
        }
    }
    r
}
