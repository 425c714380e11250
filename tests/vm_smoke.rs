//! End-to-end checks of the test guest and its QEMU harness (tests/support/vm.rs), with
//! real QEMU (TCG) and real TAPs on a bridge in a network namespace the test creates. No
//! broker yet: the test opens the TAPs itself and hands them to QEMU as fd 3, exactly as
//! `vmnet-broker run` will. Each boot takes a few seconds under TCG.
#![cfg(target_os = "linux")]

#[path = "support/netns.rs"]
mod netns;
#[path = "support/vm.rs"]
mod vm;

use netns::Netns;
use std::os::fd::AsFd;
use std::time::Duration;
use vm::VmSpec;

#[test]
fn parse_output_reads_markers_anywhere_in_a_line() {
    let console = "SeaBIOS\r\nVMNB-BOOTED uptime=2.50\r\n\
        VMNB-RESULT a=1\r\n\
        [    3.1] some kernel line VMNB-RESULT b=two words = here\r\n\
        VMNB-RESULT a=3\r\n\
        VMNB-DHCP iface=eth0 ip=10.0.0.5/24 router=10.0.0.1 dns=10.0.0.1 hostname=x\r\n\
        VMNB-DONE rc=4 uptime=3.25\r\n";
    let out = vm::parse_output(console);
    assert_eq!(out.results.get("a").map(String::as_str), Some("3"));
    assert_eq!(out.result("b"), "two words = here");
    assert_eq!(out.dhcp["eth0"]["ip"], "10.0.0.5/24");
    assert_eq!(out.dhcp["eth0"]["router"], "10.0.0.1");
    assert!(out.completed);
    assert_eq!(out.rc, Some(4));
    assert_eq!(out.booted_at, Some(2.5));
    assert_eq!(out.done_at, Some(3.25));

    let unfinished = vm::parse_output("VMNB-BOOTED uptime=1\nVMNB-RESULT x=1\n");
    assert!(!unfinished.completed);
    assert_eq!(unfinished.rc, None);
}

#[test]
fn script_cpio_is_newc_with_the_script() {
    let cpio = vm::script_cpio("echo hi\n");
    assert!(cpio.starts_with(b"070701"));
    assert_eq!(cpio.len() % 4, 0);
    let text = String::from_utf8_lossy(&cpio);
    assert!(text.contains("vmnb/script\0"));
    assert!(text.contains("echo hi\n"));
    assert!(text.contains("TRAILER!!!\0"));
}

/// One guest without NICs: the script runs with the helpers, sees its hostname from the
/// kernel command line and the virtio-net modules loaded, iperf3 from the optional archive
/// runs, and the script's exit status comes back.
#[test]
fn guest_runs_script_reports_results_and_exit_status() {
    let script = r#"
result hostname "$(hostname)"
result modules "$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
result words "several words and = signs"
check true_ok true
check false_fails false || true
result iperf3 "$(iperf3 --version 2>&1 | head -n1 | cut -d' ' -f1,2)"
exit 7
"#;
    let mut spec = VmSpec::new("smoke-1", script);
    spec.iperf3 = true;
    spec.timeout = Duration::from_secs(90);
    let out = vm::boot(&spec, &[]);
    eprintln!(
        "boot to script start: {:?} s guest uptime; script done: {:?} s; QEMU ran {:.2?}",
        out.booted_at, out.done_at, out.elapsed
    );
    assert!(out.completed, "no VMNB-DONE:\n{}", out.console);
    assert_eq!(out.rc, Some(7), "{}", out.console);
    assert_eq!(out.result("hostname"), "smoke-1");
    let modules: Vec<&str> = out.result("modules").split_whitespace().collect();
    for m in [
        "virtio_net",
        "virtio_pci",
        "net_failover",
        "failover",
        "virtio",
        "virtio_ring",
    ] {
        assert!(modules.contains(&m), "module {m} not loaded: {modules:?}");
    }
    assert!(!out.console.contains("VMNB-ERROR"), "{}", out.console);
    assert_eq!(out.result("words"), "several words and = signs");
    assert_eq!(out.result("true_ok"), "ok");
    assert_eq!(out.result("false_fails"), "fail");
    assert_eq!(out.result("iperf3"), "iperf 3.12");
    assert!(!out.timed_out);
}

/// A guest that never finishes is killed at its timeout and reported as not completed.
#[test]
fn hung_guest_is_killed_at_timeout() {
    let mut spec = VmSpec::new("hang", "result started yes\nsleep 1000\n");
    spec.timeout = Duration::from_secs(15);
    let out = vm::boot(&spec, &[]);
    assert!(out.timed_out);
    assert!(!out.completed);
    assert!(out.elapsed < Duration::from_secs(30), "{:?}", out.elapsed);
    // The script did start, so the timeout (not a boot failure) ended it.
    assert_eq!(out.result("started"), "yes");
}

fn ping_script(me: u8, peer: u8) -> String {
    format!(
        r#"
static_ip eth0 10.66.0.{me}/24 10.66.0.1
result mac "$(cat /sys/class/net/eth0/address)"
result addr "$(iface_addr eth0)"
check ping_gateway wait_for 30 ping -c 1 -W 1 10.66.0.1
check ping_peer wait_for 30 ping -c 1 -W 1 10.66.0.{peer}
# Stay up until the peer has reached us too, so its ping_peer can succeed.
got_echo() {{ [ "$(icmp_echos_received)" -ge 1 ]; }}
check pinged_by_peer wait_for 30 got_echo
sleep 0.3
"#
    )
}

/// Two guests on a bridge (10.66.0.1/24) in a test namespace, each on a TAP passed as fd 3
/// with vnet_hdr: static addresses, they ping the gateway and each other.
#[test]
fn two_guests_ping_each_other_and_the_gateway() {
    let ns = Netns::new("smoke");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.66.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let tap_a = vm::open_tap_in(&ns, "tapa");
    let tap_b = vm::open_tap_in(&ns, "tapb");
    for tap in ["tapa", "tapb"] {
        ns.ip(&["link", "set", tap, "master", "br0", "up"]);
    }

    let (mac_a, mac_b) = (vm::test_mac(0xa), vm::test_mac(0xb));
    let mut a = VmSpec::new("guest-a", &ping_script(2, 3)).nic(3, &mac_a);
    let mut b = VmSpec::new("guest-b", &ping_script(3, 2)).nic(3, &mac_b);
    a.timeout = Duration::from_secs(120);
    b.timeout = Duration::from_secs(120);
    // Build (or check) the image once before the two boots race for it.
    vm::guest_image();

    let (out_a, out_b) = std::thread::scope(|s| {
        let ha = s.spawn(|| vm::boot(&a, &[tap_a.as_fd()]));
        let hb = s.spawn(|| vm::boot(&b, &[tap_b.as_fd()]));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    for (out, mac, addr) in [(&out_a, &mac_a, "10.66.0.2"), (&out_b, &mac_b, "10.66.0.3")] {
        eprintln!(
            "guest {addr}: script done at {:?} s guest uptime, QEMU ran {:.2?}",
            out.done_at, out.elapsed
        );
        out.assert_success();
        assert_eq!(out.result("mac"), mac.as_str());
        assert_eq!(out.result("addr"), addr);
        assert_eq!(out.result("ping_gateway"), "ok", "{}", out.console);
        assert_eq!(out.result("ping_peer"), "ok", "{}", out.console);
        assert_eq!(out.result("pinged_by_peer"), "ok", "{}", out.console);
    }
}

/// Kills and reaps a child on drop (the DHCP server below), also on panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `dhcp` helper against a real DHCP server (busybox udhcpd on the bridge in the test
/// namespace): the guest configures the lease (address, route, resolv.conf) and the server
/// learns the guest's hostname from option 12.
#[test]
fn dhcp_helper_configures_the_lease_and_sends_the_hostname() {
    let ns = Netns::new("dhcp");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.67.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let tap = vm::open_tap_in(&ns, "tapd");
    ns.ip(&["link", "set", "tapd", "master", "br0", "up"]);

    let dir = tempfile::tempdir().unwrap();
    let leases = dir.path().join("leases");
    netns::require("busybox", "busybox-static");
    let conf = dir.path().join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.67.0.100\nend 10.67.0.110\ninterface br0\nlease_file {}\n\
             pidfile {}\nauto_time 1\noption subnet 255.255.255.0\noption router 10.67.0.1\n\
             option dns 10.67.0.1\noption domain vmnb.test\noption lease 3600\n",
            leases.display(),
            dir.path().join("pid").display()
        ),
    )
    .unwrap();
    std::fs::write(&leases, b"").unwrap();
    let server = KillOnDrop(
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "busybox", "udhcpd", "-f"])
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cannot start busybox udhcpd"),
    );

    let script = r#"
check dhcp dhcp eth0
result ip "$(iface_addr eth0)"
result route "$(ip route show default)"
result resolv "$(grep -v '^$' /etc/resolv.conf | tr '\n' ';')"
result lease_router "$(lease eth0 router)"
check ping_gateway ping -c 1 -W 2 10.67.0.1
"#;
    let mut spec = VmSpec::new("dhcp-guest", script).nic(3, &vm::test_mac(0xd));
    spec.timeout = Duration::from_secs(90);
    let out = vm::boot(&spec, &[tap.as_fd()]);
    out.assert_success();
    let ip = out.result("ip");
    assert!(
        ip.starts_with("10.67.0.1"),
        "address {ip} not from the pool"
    );
    assert_eq!(out.dhcp["eth0"]["ip"], format!("{ip}/24"));
    assert!(
        out.result("route").contains("via 10.67.0.1"),
        "{}",
        out.console
    );
    assert_eq!(
        out.result("resolv"),
        "search vmnb.test;nameserver 10.67.0.1;"
    );
    assert_eq!(out.result("lease_router"), "10.67.0.1");
    assert_eq!(out.result("ping_gateway"), "ok");

    // udhcpd writes its lease file every second (auto_time 1): wait for the guest's lease.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let dump = loop {
        let dump = std::process::Command::new("busybox")
            .args(["dumpleases", "-f"])
            .arg(&leases)
            .output()
            .expect("cannot run busybox dumpleases");
        let text = String::from_utf8_lossy(&dump.stdout).to_string();
        if text.contains(ip) || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(server);
    let line = dump
        .lines()
        .find(|l| l.contains(ip))
        .unwrap_or_else(|| panic!("udhcpd has no lease for {ip}:\n{dump}"));
    assert!(line.contains("dhcp-guest"), "hostname not sent: {line}");
}

/// scripts/qemu-from-env as `vmnet-broker run` will use it: TAPs as fds 3 and 4 and the
/// replies in VMNET_BROKER_NETWORKS; the i-th NIC gets the i-th reply's MAC and fd 3+i.
#[test]
fn qemu_from_env_maps_broker_replies_to_nics_in_order() {
    let ns = Netns::new("fromenv");
    for (br, addr) in [("br0", "10.68.0.1/24"), ("br1", "10.69.0.1/24")] {
        ns.ip(&["link", "add", br, "type", "bridge"]);
        ns.ip(&["addr", "add", addr, "dev", br]);
        ns.ip(&["link", "set", br, "up"]);
    }
    let tap0 = vm::open_tap_in(&ns, "tapf0");
    let tap1 = vm::open_tap_in(&ns, "tapf1");
    ns.ip(&["link", "set", "tapf0", "master", "br0", "up"]);
    ns.ip(&["link", "set", "tapf1", "master", "br1", "up"]);
    let (mac0, mac1) = (vm::test_mac(0xe0), vm::test_mac(0xe1));
    // The shape of the broker's acquire replies (protocol.rs: {"network": NetworkInfo}).
    let networks = format!(
        r#"[{{"network":{{"name":"a","mode":"shared","subnet":"10.68.0.0/24","gateway":"10.68.0.1","mask":"255.255.255.0","mtu":1500,"bridge":"br0","interface":"tapf0","mac":"{mac0}"}}}},
            {{"network":{{"name":"b","mode":"shared","subnet":"10.69.0.0/24","gateway":"10.69.0.1","mask":"255.255.255.0","mtu":1500,"bridge":"br1","interface":"tapf1","mac":"{mac1}"}}}}]"#
    );
    let script = r#"
for i in 0 1; do
    result mac$i "$(cat /sys/class/net/eth$i/address)"
    static_ip eth$i 10.6$((8 + i)).0.2/24
    check ping$i ping -c 1 -W 2 10.6$((8 + i)).0.1
done
"#;
    let mut spec = VmSpec::new("fromenv", script);
    spec.timeout = Duration::from_secs(90);
    let prepared = vm::prepare(&spec);
    let mut cmd = std::process::Command::new(vm::repo_root().join("scripts/qemu-from-env"));
    cmd.args(vm::qemu_argv(&spec, &prepared))
        .env("VMNET_BROKER_NETWORKS", networks);
    vm::pass_fds(&mut cmd, &[(tap0.as_fd(), 3), (tap1.as_fd(), 4)]);
    let out = vm::run_vm(cmd, &prepared, spec.timeout);
    out.assert_success();
    assert_eq!(out.result("mac0"), mac0);
    assert_eq!(out.result("mac1"), mac1);
    assert_eq!(out.result("ping0"), "ok");
    assert_eq!(out.result("ping1"), "ok");
}

/// Without VMNET_BROKER_NETWORKS, or with a TAP fd missing, qemu-from-env stops with a clear
/// message before starting QEMU.
#[test]
fn qemu_from_env_refuses_missing_env_or_fd() {
    let wrapper = vm::repo_root().join("scripts/qemu-from-env");
    let out = std::process::Command::new(&wrapper)
        .arg("true")
        .env_remove("VMNET_BROKER_NETWORKS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("VMNET_BROKER_NETWORKS is not set"));

    let out = std::process::Command::new(&wrapper)
        .arg("true")
        .env(
            "VMNET_BROKER_NETWORKS",
            r#"[{"network":{"mac":"52:54:00:00:00:01"}}]"#,
        )
        .env("VMNB_FIRST_FD", "1000")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fd 1000 is not open"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
