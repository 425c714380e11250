//! The Linux backend against the real kernel. Each test runs in a network namespace of
//! its own (tests/support/netns.rs): a dedicated thread enters it and runs a
//! current-thread tokio runtime, so the backend's netlink socket and TAPs live in that
//! namespace, which is deleted (with everything in it) when the test ends. `ip` inspects
//! it through `ip netns exec`, independently of the backend's own netlink code.
#![cfg(target_os = "linux")]

#[path = "support/netns.rs"]
mod netns;
#[path = "support/tap_owner.rs"]
mod tap_owner;

use netns::Netns;
use serde_json::Value;
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;
use tap_owner::attach_by_name_as;
use vmnet_broker::backend::linux::{
    LinuxBackend, LinuxNetwork, LinuxOptions, bridge_mac, bridge_of, tap, tap_name_of,
};
use vmnet_broker::backend::{AttachRequest, BRIDGE, Backend};
use vmnet_broker::config::{NetworkConfig, builtin};
use vmnet_broker::policy::Peer;

/// The test's network namespace, with what these tests inspect in it.
struct Ns {
    netns: Netns,
}

impl Ns {
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = self.netns.exec(args);
        if out.status.success() {
            Ok(String::from_utf8(out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn ip(&self, args: &str) -> String {
        let mut argv = vec!["ip"];
        argv.extend(args.split_whitespace());
        self.run(&argv)
            .unwrap_or_else(|e| panic!("ip {args} failed: {e}"))
    }

    fn links(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&self.ip("-d -j link show"))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    fn link(&self, name: &str) -> Option<Value> {
        self.links().into_iter().find(|l| l["ifname"] == name)
    }

    fn link_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .links()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }

    fn ipv4_of(&self, name: &str) -> Vec<String> {
        let v: Value =
            serde_json::from_str(&self.ip(&format!("-j -4 addr show dev {name}"))).unwrap();
        v[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect()
    }

    /// A veth pair (no dummy driver on every kernel) to park addresses and routes on.
    fn veth(&self, name: &str) {
        self.ip(&format!("link add {name} type veth peer {name}p"));
        self.ip(&format!("link set {name} up"));
        self.ip(&format!("link set {name}p up"));
    }
}

/// Runs `test` in a fresh network namespace on a thread of its own.
fn in_netns<F, Fut>(test: F)
where
    F: FnOnce(Ns) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let netns = Netns::new("backend");
    let thread = std::thread::spawn(move || {
        netns.enter_current_thread();
        let ns = Ns { netns };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(test(ns));
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Log lines written by the code under test on the thread that installed the writer.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A backend with a state directory of its own, removed with it.
struct TestBackend {
    backend: LinuxBackend,
    _state: tempfile::TempDir,
}

impl std::ops::Deref for TestBackend {
    type Target = LinuxBackend;
    fn deref(&self) -> &LinuxBackend {
        &self.backend
    }
}

async fn backend() -> TestBackend {
    let state = tempfile::Builder::new()
        .prefix("vmnbt-state-")
        .tempdir()
        .unwrap();
    let backend = LinuxBackend::new(LinuxOptions {
        state_dir: state.path().to_path_buf(),
        resolv_conf: "/etc/resolv.conf".into(),
        // Every TAP made on its attach, as these tests check each attach's kernel work.
        tap_pool: 0,
    })
    .await
    .unwrap();
    TestBackend {
        backend,
        _state: state,
    }
}

/// A `shared` network without anti-spoofing: these tests are about bridges and TAPs and
/// send frames from addresses no DHCP lease covers (the firewall has tests of its own, and
/// tests/services.rs covers the two together).
fn config(name: &str) -> NetworkConfig {
    let mut c = builtin("shared").unwrap();
    c.name = name.to_string();
    c.allow_spoofing = true;
    c
}

fn fixed(name: &str, gateway: [u8; 4], prefix_len: u8) -> NetworkConfig {
    let mut c = config(name);
    c.gateway = Some(gateway.into());
    c.prefix_len = prefix_len;
    c
}

/// The TAPs on `net`, by name, sorted.
async fn endpoints(b: &LinuxBackend, net: &LinuxNetwork) -> Vec<String> {
    let live = b.live_endpoints(net).await.unwrap();
    live.into_iter().map(|e| e.0).collect()
}

/// The new TAP's fd and name.
async fn attach(b: &LinuxBackend, net: &LinuxNetwork, serial: u64) -> Attachment {
    let request = AttachRequest {
        serial,
        mac: [0x52, 0x54, 0x00, 0x12, 0x34, serial as u8],
        peer: Peer {
            pid: 1,
            uid: 1000,
            gid: 1000,
            groups: None,
        },
        persistent: false,
    };
    let endpoint = b.attach(net, &request).await.unwrap().endpoint;
    Attachment {
        interface: endpoint.name,
        fd: endpoint.fd,
    }
}

/// The parts of a `TapEndpoint` the tests look at, named as the client sees them.
struct Attachment {
    interface: String,
    fd: OwnedFd,
}

/// The broker deletes a TAP shortly after its last fd closes (in batches); generous, for
/// a busy machine.
async fn wait_gone(ns: &Ns, name: &str) {
    for _ in 0..500 {
        if ns.link(name).is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{name} still exists");
}

fn flags(link: &Value) -> Vec<&str> {
    link["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect()
}

fn cloexec(fd: &OwnedFd) -> bool {
    // SAFETY: fcntl(F_GETFD) takes only integers and touches no memory; `fd` is open
    // (borrowed) for the call.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    flags & libc::FD_CLOEXEC != 0
}

/// An ARP request from `mac`/`ip` for `target`, behind the 12-byte virtio-net header
/// (all zero: no offloads) the TAP expects.
fn arp_request(mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend([0xff; 6]);
    f.extend(mac);
    f.extend([0x08, 0x06]);
    f.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend(mac);
    f.extend(ip);
    f.extend([0; 6]);
    f.extend(target);
    f
}

fn send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: write(2) reads at most frame.len() bytes from `frame`, an initialized slice
    // that long, borrowed for the call; `fd` is open (borrowed).
    let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    assert_eq!(
        n,
        frame.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// The Ethernet frames (virtio-net header stripped) that arrive within `wait`.
async fn receive(fd: &OwnedFd, wait: Duration) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut frames = vec![];
    let mut buf = vec![0u8; 65536];
    while tokio::time::Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) reads and writes exactly one pollfd (nfds = 1) through the
        // pointer, which points to `pfd`, exclusively borrowed for the call. (A zero
        // timeout also never blocks the runtime's thread.)
        if unsafe { libc::poll(&mut pfd, 1, 0) } == 1 {
            // SAFETY: read(2) writes at most buf.len() bytes into `buf`, exclusively
            // borrowed and that long; `fd` is open (borrowed).
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            assert!(n >= 12, "read: {}", std::io::Error::last_os_error());
            frames.push(buf[12..n as usize].to_vec());
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    frames
}

/// Whether `frames` hold an ARP reply from `mac` for `ip`.
fn has_arp_reply(frames: &[Vec<u8>], mac: [u8; 6], ip: [u8; 4]) -> bool {
    frames.iter().any(|f| {
        f.len() >= 42
            && f[12..14] == [0x08, 0x06]
            && f[20..22] == [0, 2]
            && f[6..12] == mac
            && f[28..32] == ip
    })
}

/// Whether `frames` hold the ARP request sent from `mac`.
fn has_arp_request_from(frames: &[Vec<u8>], mac: [u8; 6]) -> bool {
    frames.iter().any(|f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[6..12] == mac
    })
}

#[test]
fn bridge_taps_and_teardown() {
    in_netns(|ns| async move {
        let b = backend().await;
        let mut c = config("lab");
        c.mtu = 1400;
        let net = b.create(&c).await.unwrap();
        let d = b.details(&net);
        assert_eq!(d.platform.get(BRIDGE), Some("vmnb-lab"));
        assert_eq!(d.subnet.to_string(), "192.168.64.0/24");
        assert_eq!(d.gateway.to_string(), "192.168.64.1");
        assert_eq!(d.mtu, 1400);

        let br = ns.link("vmnb-lab").expect("bridge exists");
        assert_eq!(br["mtu"], 1400);
        assert_eq!(br["ifalias"], "vmnet-broker:lab");
        assert_eq!(br["linkinfo"]["info_kind"], "bridge");
        assert_eq!(br["linkinfo"]["info_data"]["stp_state"], 0);
        assert_eq!(br["linkinfo"]["info_data"]["forward_delay"], 0);
        assert!(flags(&br).contains(&"UP"), "{br}");
        assert_eq!(ns.ipv4_of("vmnb-lab"), ["192.168.64.1/24"]);

        let a0 = attach(&b, &net, 0).await;
        let a1 = attach(&b, &net, 1).await;
        assert_ne!(a0.interface, a1.interface);
        for a in [&a0, &a1] {
            let l = ns.link(&a.interface).expect("TAP exists");
            assert_eq!(l["master"], "vmnb-lab");
            assert_eq!(l["ifalias"], "vmnet-broker:lab");
            assert_eq!(l["mtu"], 1400);
            assert!(
                l["address"]
                    .as_str()
                    .unwrap()
                    .starts_with("fe:54:00:12:34:"),
                "{l}"
            );
            assert_eq!(l["linkinfo"]["info_data"]["type"], "tap");
            assert_eq!(l["linkinfo"]["info_data"]["vnet_hdr"], true);
            assert_eq!(l["linkinfo"]["info_data"]["pi"], false);
            // Persistent so the client's close is cheap; the broker deletes it once closed.
            assert_eq!(l["linkinfo"]["info_data"]["persist"], true);
            assert_eq!(l["linkinfo"]["info_slave_data"]["isolated"], false);
            assert!(flags(&l).contains(&"UP"), "{l}");

            assert_eq!(tap_name_of(a.fd.as_fd()).unwrap(), a.interface);
            assert!(tap::is_broker_tap(a.fd.as_fd()).unwrap());
            assert_eq!(tap::vnet_hdr_len(a.fd.as_fd()).unwrap(), 12);
            assert!(cloexec(&a.fd), "TAP fd must be close-on-exec");
            assert_eq!(
                bridge_of(&a.interface).await.unwrap().as_deref(),
                Some("vmnb-lab")
            );
        }
        // The bridge keeps its own MAC with ports attached.
        let mac = vmnet_broker::mac::Mac::from(bridge_mac("lab"));
        assert_eq!(ns.link("vmnb-lab").unwrap()["address"], mac.to_string());
        let mut eps = endpoints(&b, &net).await;
        eps.sort();
        let mut want = vec![a0.interface.clone(), a1.interface.clone()];
        want.sort();
        assert_eq!(eps, want);

        // The client closing its fd is the TAP's end.
        let gone = a0.interface.clone();
        drop(a0);
        wait_gone(&ns, &gone).await;
        assert_eq!(
            endpoints(&b, &net).await,
            std::slice::from_ref(&a1.interface)
        );
        let last = a1.interface.clone();
        drop(a1);
        wait_gone(&ns, &last).await;
        assert!(endpoints(&b, &net).await.is_empty());
        assert_eq!(
            ns.link("vmnb-lab").unwrap()["mtu"],
            1400,
            "the bridge keeps its MTU without ports"
        );

        // A TAP still held when the network goes: destroy removes it all the same.
        let held = attach(&b, &net, 2).await;
        b.destroy(&net).await.unwrap();
        assert_eq!(ns.link_names(), ["lo"]);
        assert!(
            tap_name_of(held.fd.as_fd()).is_err(),
            "the fd's TAP is gone"
        );
    });
}

#[test]
fn dynamic_subnets_avoid_addresses_routes_and_each_other() {
    in_netns(|ns| async move {
        ns.veth("vmnbt0");
        ns.ip("addr add 192.168.64.5/24 dev vmnbt0");
        ns.ip("route add 192.168.65.128/25 dev vmnbt0");
        ns.ip("route add default via 192.168.64.254");
        let b = backend().await;
        let one = b.create(&config("one")).await.unwrap();
        let two = b.create(&config("two")).await.unwrap();
        assert_eq!(b.details(&one).subnet.to_string(), "192.168.66.0/24");
        assert_eq!(b.details(&two).subnet.to_string(), "192.168.67.0/24");
        assert_eq!(ns.ipv4_of("vmnb-two"), ["192.168.67.1/24"]);

        // A /22 must be aligned and clear of all of the above.
        let mut wide = config("wide");
        wide.prefix_len = 22;
        let wide = b.create(&wide).await.unwrap();
        assert_eq!(b.details(&wide).subnet.to_string(), "192.168.68.0/22");

        // A destroyed network's subnet is free again.
        b.destroy(&one).await.unwrap();
        let three = b.create(&config("three")).await.unwrap();
        assert_eq!(b.details(&three).subnet.to_string(), "192.168.66.0/24");
        for n in [two, wide, three] {
            b.destroy(&n).await.unwrap();
        }
        assert_eq!(ns.link_names(), ["lo", "vmnbt0", "vmnbt0p"]);
    });
}

#[test]
fn fixed_subnets_are_used_or_refused_clearly() {
    in_netns(|ns| async move {
        ns.veth("vmnbt0");
        ns.ip("addr add 10.77.0.9/16 dev vmnbt0");
        ns.ip("route add 10.88.1.128/25 dev vmnbt0");
        // A route covering a subnet is no conflict (docs/networking.md, "Which subnet").
        ns.ip("route add 10.66.0.0/16 dev vmnbt0");
        let b = backend().await;

        let e = b
            .create(&fixed("clash", [10, 77, 3, 1], 24))
            .await
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(msg.contains("10.77.3.0/24"), "{msg}");
        assert!(msg.contains("10.77.0.9/16 on interface vmnbt0"), "{msg}");

        let e = b
            .create(&fixed("clash", [10, 88, 1, 1], 24))
            .await
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("route 10.88.1.128/25 via interface vmnbt0"),
            "{e}"
        );
        assert!(ns.link("vmnb-clash").is_none(), "nothing left behind");
        let covered = b
            .create(&fixed("covered", [10, 66, 5, 1], 24))
            .await
            .unwrap();
        assert_eq!(b.details(&covered).subnet.to_string(), "10.66.5.0/24");
        b.destroy(&covered).await.unwrap();

        let ok = b
            .create(&fixed("fixed", [10, 99, 0, 254], 24))
            .await
            .unwrap();
        assert_eq!(b.details(&ok).subnet.to_string(), "10.99.0.0/24");
        assert_eq!(b.details(&ok).gateway.to_string(), "10.99.0.254");
        assert_eq!(ns.ipv4_of("vmnb-fixed"), ["10.99.0.254/24"]);

        // A failure after the bridge exists leaves nothing behind, subnet included.
        let mut huge = config("huge");
        huge.mtu = 70000;
        let e = b.create(&huge).await.err().unwrap();
        assert!(e.to_string().contains("vmnb-huge"), "{e}");
        assert!(ns.link("vmnb-huge").is_none());
        let after = b.create(&config("after")).await.unwrap();
        assert_eq!(b.details(&after).subnet.to_string(), "192.168.64.0/24");
        b.destroy(&after).await.unwrap();

        let e = b
            .create(&fixed("again", [10, 99, 0, 1], 25))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("vmnb-fixed"), "{e}");
        b.destroy(&ok).await.unwrap();
    });
}

/// Two VMs' TAPs on one network: A asks for the gateway's MAC. Returns whether the
/// host answered A and whether B saw A's broadcast.
async fn broadcast_between_two(isolation: bool) -> (bool, bool) {
    let b = backend().await;
    let mut c = config("iso");
    c.isolation = isolation;
    let net = b.create(&c).await.unwrap();
    let gw = b.details(&net).gateway.octets();
    let a = attach(&b, &net, 1).await;
    let other = attach(&b, &net, 2).await;
    let a_mac = [0x52, 0x54, 0x00, 0x12, 0x34, 1];
    let host_ip = {
        let mut ip = gw;
        ip[3] = 50;
        ip
    };
    // The very first frame after the first port joins can race the kernel turning
    // the bridge's carrier on (a few ms); a guest never sends that early, so ask again
    // every 20 ms. A forward delay (15 s by default) would fail this.
    let mut answered = false;
    let mut to_other = vec![];
    for _ in 0..50 {
        send(&a.fd, &arp_request(a_mac, host_ip, gw));
        let (to_a, more) = tokio::join!(
            receive(&a.fd, Duration::from_millis(20)),
            receive(&other.fd, Duration::from_millis(20))
        );
        to_other.extend(more);
        answered = has_arp_reply(&to_a, bridge_mac("iso"), gw);
        if answered {
            break;
        }
    }
    to_other.extend(receive(&other.fd, Duration::from_millis(100)).await);
    let seen = has_arp_request_from(&to_other, a_mac);
    drop((a, other));
    b.destroy(&net).await.unwrap();
    (answered, seen)
}

#[test]
fn frames_flow_at_once_and_isolation_separates_vms() {
    in_netns(|ns| async move {
        // Frames flow right after attach (no STP listening/learning delay), the
        // 12-byte header is what the TAP uses, and the bridge answers as the gateway.
        let (answered, seen) = broadcast_between_two(false).await;
        assert!(answered, "the host answers ARP for the gateway");
        assert!(seen, "without isolation VMs see each other's broadcasts");

        let (answered, seen) = broadcast_between_two(true).await;
        assert!(answered, "an isolated VM still reaches the host");
        assert!(!seen, "isolated VMs do not see each other");
        assert_eq!(ns.link_names(), ["lo"]);
    });
}

#[test]
fn isolation_marks_ports_isolated() {
    in_netns(|ns| async move {
        let b = backend().await;
        let mut c = config("iso");
        c.isolation = true;
        let net = b.create(&c).await.unwrap();
        let a = attach(&b, &net, 0).await;
        let l = ns.link(&a.interface).unwrap();
        assert_eq!(l["linkinfo"]["info_slave_data"]["isolated"], true, "{l}");
        drop(a);
        b.destroy(&net).await.unwrap();
    });
}

#[test]
fn names_taken_by_others_are_refused_and_leftovers_replaced() {
    in_netns(|ns| async move {
        ns.ip("link add vmnb-taken type bridge");
        let b = backend().await;
        let e = b.create(&config("taken")).await.err().unwrap();
        assert!(e.to_string().contains("vmnb-taken already exists"), "{e}");
        assert!(
            ns.link("vmnb-taken").is_some(),
            "someone else's bridge is left alone"
        );

        ns.ip("link add vmnb-old type bridge");
        ns.ip("link set vmnb-old alias vmnet-broker:old");
        let old = b.create(&config("old")).await.unwrap();
        assert_eq!(ns.ipv4_of("vmnb-old").len(), 1, "recreated by us");

        let long = b.create(&config("a-much-longer-name")).await.unwrap();
        let name = b.details(&long).platform.get(BRIDGE).unwrap().to_string();
        assert!(name.starts_with("vmnb-") && name.len() <= 15, "{name}");
        assert_eq!(
            ns.link(&name).unwrap()["ifalias"],
            "vmnet-broker:a-much-longer-name"
        );
        b.destroy(&old).await.unwrap();
        b.destroy(&long).await.unwrap();
    });
}

#[test]
fn destroy_tolerates_links_already_gone() {
    in_netns(|ns| async move {
        let b = backend().await;
        let net = b.create(&config("gone")).await.unwrap();
        let a = attach(&b, &net, 0).await;
        ns.ip("link del vmnb-gone");
        b.destroy(&net).await.unwrap();
        assert_eq!(ns.link_names(), ["lo"]);
        drop(a);
    });
}

#[test]
fn remove_stale_removes_only_aliased_leftovers() {
    in_netns(|ns| async move {
        let crashed = backend().await;
        let net = crashed.create(&config("crash")).await.unwrap();
        let held = attach(&crashed, &net, 0).await;
        // The broker dies without cleaning up; a VM still holds its TAP.
        drop(net);
        drop(crashed);
        ns.ip("link add vmnbt-br type bridge");
        ns.ip("link set vmnbt-br alias vmnet-broker:older");
        ns.ip("tuntap add vmnbt-tap mode tap");
        ns.ip("link set vmnbt-tap alias vmnet-broker:older");
        ns.ip("link add keep-br type bridge");
        ns.ip("link add keep-other type bridge");
        ns.ip("link set keep-other alias someone-else:crash");

        let b = backend().await;
        b.remove_stale().await.unwrap();
        assert_eq!(ns.link_names(), ["keep-br", "keep-other", "lo"]);
        assert!(tap_name_of(held.fd.as_fd()).is_err());
        // Nothing left to do the second time.
        b.remove_stale().await.unwrap();
        assert_eq!(ns.link_names(), ["keep-br", "keep-other", "lo"]);
    });
}

#[test]
fn tap_binding_is_retried_after_a_failure() {
    in_netns(|ns| async move {
        let b = backend().await;
        // allow_spoofing with DHCP: binding writes the TAP's DHCP MAC quota with `nft`
        // (anti-spoofing networks bind in the TAP guard's map, which has no such failure
        // to inject).
        let c = config("retry");
        assert!(c.allow_spoofing && c.dhcp);
        let net = b.create(&c).await.unwrap();
        // Make binding fail while the tables stay (so the watchdog sees nothing to
        // restore): a set of another type under the name of the TAP's quota set makes
        // the quota script's `add set` fail.
        let tap = tap::tap_name(net.bridge_index(), 1).unwrap();
        let quota_set = format!("bridge vmnet_broker dm-{tap}");
        ns.run(&["nft", &format!("add set {quota_set} {{ type ipv4_addr; }}")])
            .unwrap();
        let logs = Logs::default();
        let writer = logs.clone();
        // The backend's binding task runs on this thread (current-thread runtime), so this
        // captures what it logs.
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish(),
        );
        let a = attach(&b, &net, 1).await;
        // The set comes back only once an attempt has failed (the backend says it will
        // retry): after a fixed sleep, a slow machine could bind at the first attempt and
        // the retry would go untested.
        let start = std::time::Instant::now();
        while !logs
            .text()
            .contains("cannot bind TAPs to their MACs, retrying")
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no failed binding attempt: {}",
                logs.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ns.run(&["nft", &format!("delete set {quota_set}")])
            .unwrap();
        let start = std::time::Instant::now();
        loop {
            let chain = ns
                .run(&["nft", "list chain bridge vmnet_broker dhcp-retry"])
                .unwrap();
            if chain.contains(&format!("add @dm-{tap}")) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(6),
                "TAP never bound: {chain}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(a.interface, tap);
        drop(a);
        b.destroy(&net).await.unwrap();
    });
}

#[test]
fn netlink_deletes_links_by_name() {
    in_netns(|ns| async move {
        let nl = vmnet_broker::backend::linux::netlink::Netlink::connect().unwrap();
        ns.ip("link add vmnbt-byname type bridge");
        assert!(nl.delete_by_name("vmnbt-byname").await.unwrap());
        assert!(ns.link("vmnbt-byname").is_none());
        // Gone already: not an error, and nothing else is touched.
        ns.ip("link add vmnbt-other type bridge");
        assert!(!nl.delete_by_name("vmnbt-byname").await.unwrap());
        assert!(ns.link("vmnbt-other").is_some());
    });
}

/// A TAP asked for as persistent outlives its fd, and still belongs to its client's uid
/// and gid: another local user cannot attach it by name afterwards; the owner can.
#[test]
fn a_persistent_tap_stays_the_clients() {
    in_netns(|ns| async move {
        let b = backend().await;
        let net = b.create(&config("own")).await.unwrap();
        let (owner, other) = (4242, 4343);
        let request = AttachRequest {
            serial: 0,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            peer: Peer {
                pid: 1,
                uid: owner,
                gid: owner,
                groups: None,
            },
            persistent: true,
        };
        let a = b.attach(&net, &request).await.unwrap().endpoint;
        let info = &ns.link(&a.name).unwrap()["linkinfo"]["info_data"];
        assert_eq!(info["user"], 4242, "{info}");
        assert_eq!(info["group"], 4242, "{info}");
        let name = a.name.clone();
        drop(a);
        // A TAP closed after it, deleted by the broker: the persistent one's close was
        // seen before, and left alone.
        let later = attach(&b, &net, 1).await;
        let later_name = later.interface.clone();
        drop(later);
        wait_gone(&ns, &later_name).await;
        assert!(ns.link(&name).is_some(), "the persistent TAP stays");

        assert_eq!(
            attach_by_name_as(&name, other, other),
            libc::EPERM,
            "another user must not attach the TAP"
        );
        assert_eq!(
            attach_by_name_as(&name, other, owner),
            libc::EPERM,
            "the owner's group is not enough without the owner's uid"
        );
        assert_eq!(attach_by_name_as(&name, owner, owner), 0, "the owner may");
        b.destroy(&net).await.unwrap();
        assert_eq!(ns.link_names(), ["lo"]);
    });
}

/// Every TAP is persistent, so its client's `close` does not wait for the kernel's
/// teardown; the broker deletes the TAPs whose last fd closed, many at once, including one
/// its client made persistent itself (TUNSETPERSIST needs no privilege on the fd).
#[test]
fn closed_taps_are_deleted_by_the_broker_together() {
    in_netns(|ns| async move {
        let b = backend().await;
        let net = b.create(&config("reap")).await.unwrap();
        let mut closed = vec![];
        for serial in 0..60 {
            closed.push(attach(&b, &net, serial).await);
        }
        let open = attach(&b, &net, 60).await;
        // SAFETY: TUNSETPERSIST on an attached TAP fd takes an integer by value.
        let rc = unsafe { libc::ioctl(closed[0].fd.as_raw_fd(), libc::TUNSETPERSIST, 1) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let names: Vec<String> = closed.iter().map(|a| a.interface.clone()).collect();
        drop(closed);
        for name in &names {
            wait_gone(&ns, name).await;
        }
        assert!(ns.link(&open.interface).is_some(), "an open TAP stays");
        assert_eq!(
            endpoints(&b, &net).await,
            std::slice::from_ref(&open.interface)
        );
        drop(open);
        b.destroy(&net).await.unwrap();
        assert_eq!(ns.link_names(), ["lo"]);
    });
}

/// Waits up to 10 s for `f` to hold, polling; panics with `what` otherwise.
async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The record of live TAPs follows the kernel: a TAP someone else deletes leaves it too,
/// while the other TAPs stay.
#[test]
fn the_tap_record_notices_deletions_by_others() {
    in_netns(|ns| async move {
        let b = backend().await;
        let net = b.create(&config("rec")).await.unwrap();
        let a0 = attach(&b, &net, 0).await;
        let a1 = attach(&b, &net, 1).await;
        // Right after attach, without waiting: the record already has them.
        let mut eps = endpoints(&b, &net).await;
        eps.sort();
        assert_eq!(eps, [a0.interface.clone(), a1.interface.clone()]);

        ns.ip(&format!("link del {}", a0.interface));
        let keep = a1.interface.clone();
        wait_until("the deleted TAP leaves the record", || async {
            endpoints(&b, &net).await == std::slice::from_ref(&keep)
        })
        .await;
        drop((a0, a1));
        b.destroy(&net).await.unwrap();
    });
}

/// A closed TAP's anti-spoofing binding is forgotten as soon as the TAP goes (from its
/// link event), not only once the network has accumulated many bindings.
#[test]
fn a_closed_taps_binding_is_forgotten() {
    in_netns(|ns| async move {
        let b = backend().await;
        let mut c = config("prune");
        c.allow_spoofing = false;
        let net = b.create(&c).await.unwrap();
        let a = attach(&b, &net, 1).await;
        let keep = attach(&b, &net, 2).await;
        let ifindex = |tap: &str| -> u32 {
            ns.run(&["cat", &format!("/sys/class/net/{tap}/ifindex")])
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        // The TAP guard's bindings, by interface index (the closed TAP's outlives it).
        let (gone, kept) = (ifindex(&a.interface), ifindex(&keep.interface));
        let bound = |i: u32| {
            let fw = b.firewall().clone();
            async move { fw.guard_binding(i).await.unwrap().is_some() }
        };
        wait_until("both TAPs are bound", || async {
            bound(gone).await && bound(kept).await
        })
        .await;
        drop(a);
        wait_until("the closed TAP's binding is forgotten", || async {
            !bound(gone).await && bound(kept).await
        })
        .await;
        drop(keep);
        b.destroy(&net).await.unwrap();
    });
}

/// When the kernel drops link events (the record's socket buffer is full) the record
/// takes a fresh dump and ends up with every link all the same.
#[test]
fn the_link_record_resyncs_after_lost_events() {
    use std::sync::Arc;
    use vmnet_broker::backend::linux::links::LinkRecord;
    use vmnet_broker::backend::linux::netlink::Netlink;
    in_netns(|ns| async move {
        let netlink = Arc::new(Netlink::connect().unwrap());
        // The smallest buffer the kernel allows: a couple of messages.
        let (record, _departures, _losses) = LinkRecord::start_with_buffer(netlink, 1).unwrap();
        record.sync().await.unwrap();
        let bridge_index = |name: &str| ns.link(name).unwrap()["ifindex"].as_u64().unwrap() as u32;
        ns.ip("link add vmnbt-br type bridge");
        let br = bridge_index("vmnbt-br");
        // Blocking this runtime's only thread while the kernel sends the events: the
        // record cannot read them, and most are dropped.
        let mut script = String::new();
        for i in 0..40 {
            script.push_str(&format!(
                "link add vmnbt-p{i} type veth peer vmnbt-q{i}\n\
                 link set vmnbt-p{i} alias vmnet-broker:t master vmnbt-br\n"
            ));
        }
        let path = std::env::temp_dir().join(format!("vmnbt-batch-{}", std::process::id()));
        std::fs::write(&path, script).unwrap();
        ns.ip(&format!("-batch {}", path.display()));
        std::fs::remove_file(&path).unwrap();
        wait_until("all 40 ports are in the record", || async {
            record
                .live_ports_of(br, "vmnet-broker:t")
                .await
                .is_ok_and(|p| p.len() == 40)
        })
        .await;
        assert!(
            record.resyncs() >= 1,
            "no event was lost: the test proves nothing"
        );
    });
}

/// A Router Advertisement as a hostile VM writes it into its TAP (behind the TAP's
/// virtio-net header): from a link-local address to all nodes, hop limit 255, a default
/// router lifetime and an autonomous on-link prefix 2001:db8:1::/64.
fn router_advertisement(mac: [u8; 6]) -> Vec<u8> {
    use etherparse::icmpv6::RouterAdvertisementHeader;
    use etherparse::{Icmpv6Type, PacketBuilder};
    let source = [
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x01,
    ];
    let mut all_nodes = [0u8; 16];
    all_nodes[0] = 0xff;
    all_nodes[1] = 0x02;
    all_nodes[15] = 1;
    let builder = PacketBuilder::ethernet2(mac, [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(source, all_nodes, 255)
        .icmpv6(Icmpv6Type::RouterAdvertisement(RouterAdvertisementHeader {
            cur_hop_limit: 64,
            managed_address_config: false,
            other_config: false,
            router_lifetime: 1800,
        }));
    // Reachable time and retransmission timer (unspecified), then the options.
    let mut payload = vec![0u8; 8];
    // Prefix information: type 3, 4 x 8 bytes, /64, on-link and autonomous, lifetimes.
    payload.extend([3, 4, 64, 0xc0]);
    payload.extend(86400u32.to_be_bytes());
    payload.extend(14400u32.to_be_bytes());
    payload.extend([0; 4]);
    payload.extend([0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    // Source link-layer address: type 1, 1 x 8 bytes.
    payload.extend([1, 1]);
    payload.extend(mac);
    let mut frame = vec![0u8; 12];
    builder.write(&mut frame, &payload).unwrap();
    frame
}

/// How many Router Advertisements interface `name` has received (counted by the
/// kernel's ICMPv6 input before it decides what to do with them).
fn router_advertisements_received(ns: &Ns, name: &str) -> u64 {
    let stats = ns
        .run(&["cat", &format!("/proc/net/dev_snmp6/{name}")])
        .unwrap();
    stats
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("Icmp6InRouterAdvertisements"))
                .then(|| words.next().unwrap().parse().unwrap())
        })
        .expect("the counter exists")
}

/// A VM cannot configure the host's IPv6 through its network's bridge: a Router
/// Advertisement from a TAP reaches the bridge, which neither installs a route via the
/// VM nor takes an address from the advertised prefix.
#[test]
fn router_advertisements_from_vms_do_not_configure_the_bridge() {
    in_netns(|ns| async move {
        let b = backend().await;
        let net = b.create(&config("ra")).await.unwrap();
        let a = attach(&b, &net, 1).await;
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 1];
        for setting in ["accept_ra", "autoconf", "accept_redirects"] {
            let value = ns
                .run(&["cat", &format!("/proc/sys/net/ipv6/conf/vmnb-ra/{setting}")])
                .unwrap();
            assert_eq!(value.trim(), "0", "{setting}");
        }
        // The TAP (made on the attach: no pool here) is a bridge port with no IPv6 of
        // its own, off before it came up.
        let port_conf = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", a.interface);
        assert_eq!(ns.run(&["cat", &port_conf]).unwrap().trim(), "1");
        // The firewall drops Router Advertisements from TAPs before the bridge sees them
        // (tests/services.rs); out of its way, the bridge's own settings are tested here,
        // the second layer.
        ns.run(&["nft", "flush chain bridge vmnet_broker spoof-ra"])
            .unwrap();
        // Sent until the kernel has seen one: right after the port joins, the bridge's
        // carrier and IPv6 state may still be coming up.
        wait_until("the bridge receives the Router Advertisement", || {
            send(&a.fd, &router_advertisement(mac));
            let seen = router_advertisements_received(&ns, "vmnb-ra") > 0;
            async move { seen }
        })
        .await;
        // The kernel handles an RA completely when it receives it; nothing comes later.
        let routes = ns.ip("-6 route show");
        assert!(!routes.contains("proto ra"), "{routes}");
        assert!(!routes.contains("default"), "{routes}");
        assert!(!routes.contains("2001:db8:1:"), "{routes}");
        // Up with carrier by now, and still without a link-local address.
        let port_addresses = ns.ip(&format!("-6 addr show dev {}", a.interface));
        assert!(port_addresses.trim().is_empty(), "{port_addresses}");
        let addresses = ns.ip("-6 addr show dev vmnb-ra");
        assert!(!addresses.contains("2001:db8:1:"), "{addresses}");
        // The only global address is the network's own IPv6 gateway, `::1` of its prefix.
        let gateway6 = format!("inet6 {}/64 scope global", net.gateway6().unwrap());
        assert!(
            addresses
                .lines()
                .filter(|l| l.contains("scope global"))
                .all(|l| l.contains(&gateway6)),
            "{addresses}"
        );
        drop(a);
        b.destroy(&net).await.unwrap();
    });
}

/// `endpoint_closed` (what an adopted network's watch of its orphaned TAPs waits on)
/// wakes when a TAP is closed, through the kernel's link deletion, not at its fallback:
/// the fallback here is an hour.
#[test]
fn endpoint_closed_wakes_when_a_tap_closes() {
    in_netns(|_ns| async move {
        let b = backend().await;
        let net = b.create(&config("lab")).await.unwrap();
        let tap = attach(&b, &net, 1).await;
        assert_eq!(
            endpoints(&b, &net).await,
            std::slice::from_ref(&tap.interface)
        );
        let closed = b.endpoint_closed(&net, Duration::from_secs(3600));
        // The watch starts at the call: a close before the first poll counts.
        drop(tap.fd);
        tokio::time::timeout(Duration::from_secs(30), closed)
            .await
            .expect("not woken by the TAP's deletion");
        assert!(endpoints(&b, &net).await.is_empty());
        b.destroy(&net).await.unwrap();
    });
}
