//! Data plane: frames between endpoints attached to one network, through
//! (a) the broker's bridge, (b) a bridge made by hand with `ip`, (c) `vde_switch`,
//! (d) a QEMU `-netdev stream` style hub. See docs/benchmarks.md for what each stands for.
//! And across two hosts (network namespaces on a veth underlay): (e) a network of the
//! broker's that spans them over VXLAN, (f) a VXLAN device and bridge made by hand.

use crate::netns::Netns;
use crate::util::*;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vmnet_broker_client::Client;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Broker,
    Bridge,
    Vde,
    Stream,
    Overlay,
    OverlayByHand,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Broker, Kind::Bridge, Kind::Vde, Kind::Stream];
    /// The two-host setups, measured in a row of their own.
    pub const OVERLAY: [Kind; 2] = [Kind::Overlay, Kind::OverlayByHand];
    pub fn label(self) -> &'static str {
        match self {
            Kind::Broker => "(a) broker TAPs",
            Kind::Bridge => "(b) bridge by hand",
            Kind::Vde => "(c) vde_switch",
            Kind::Stream => "(d) stream hub",
            Kind::Overlay => "(e) broker overlay, 2 hosts (VXLAN)",
            Kind::OverlayByHand => "(f) VXLAN + bridge by hand, 2 hosts",
        }
    }
    pub fn short(self) -> &'static str {
        match self {
            Kind::Broker => "broker",
            Kind::Bridge => "bridge",
            Kind::Vde => "vde",
            Kind::Stream => "stream",
            Kind::Overlay => "overlay",
            Kind::OverlayByHand => "vxlan",
        }
    }
}

/// How an endpoint (a stand-in for one VM's NIC) exchanges frames.
enum Port {
    /// A TAP fd with a 12-byte vnet header, as QEMU's `-netdev tap,fd=`.
    Tap(OwnedFd),
    /// A VDE data socket (what QEMU's `-netdev vde` uses through libvdeplug): one frame per
    /// datagram, sent to the switch's address for this port. `_ctl` keeps the port open.
    Vde {
        data: OwnedFd,
        to: nix::sys::socket::UnixAddr,
        _ctl: UnixStream,
        _path: PathBuf,
    },
    /// A stream with a 4-byte big-endian length before each frame (QEMU's stream netdev).
    Stream(UnixStream),
}

impl Port {
    /// The bytes written per frame (header or prefix included).
    fn wire(&self, frame: &[u8]) -> Vec<u8> {
        match self {
            Port::Tap(_) => [&[0u8; VNET_HDR][..], frame].concat(),
            Port::Vde { .. } => frame.to_vec(),
            Port::Stream(_) => [&(frame.len() as u32).to_be_bytes()[..], frame].concat(),
        }
    }

    fn send(&self, wire: &[u8]) -> bool {
        match self {
            Port::Tap(fd) => nix::unistd::write(fd, wire).is_ok(),
            Port::Vde { data, to, .. } => nix::sys::socket::sendto(
                data.as_raw_fd(),
                wire,
                to,
                nix::sys::socket::MsgFlags::empty(),
            )
            .is_ok(),
            Port::Stream(s) => (&*s).write_all(wire).is_ok(),
        }
    }

    fn raw_fd(&self) -> i32 {
        match self {
            Port::Tap(fd) => fd.as_raw_fd(),
            Port::Vde { data, .. } => data.as_raw_fd(),
            Port::Stream(s) => s.as_raw_fd(),
        }
    }

    /// Receives until `stop`, counting frames of `len` bytes addressed to `mac`.
    fn receive(&self, mac: [u8; 6], len: usize, stop: &AtomicBool, count: &AtomicU64) {
        let mut buf = vec![0u8; 1 << 17];
        let mut have = 0usize; // stream: bytes buffered
        let fd = self.raw_fd();
        let mine = |f: &[u8]| {
            if f.len() == len && f[..6] == mac {
                count.fetch_add(1, Ordering::Relaxed);
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) reads and writes exactly one pollfd (nfds = 1) through the
            // pointer, which points to `p`, exclusively borrowed for the call.
            if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
                continue;
            }
            match self {
                Port::Tap(_) | Port::Vde { .. } => {
                    // SAFETY: read(2) writes at most buf.len() bytes into `buf`, which is
                    // exclusively borrowed and that long.
                    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                    if n <= 0 {
                        continue;
                    }
                    let off = if matches!(self, Port::Tap(_)) {
                        VNET_HDR
                    } else {
                        0
                    };
                    if n as usize > off {
                        mine(&buf[off..n as usize]);
                    }
                }
                Port::Stream(s) => {
                    let Ok(n) = (&*s).read(&mut buf[have..]) else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    let mut at = 0;
                    while have - at >= 4 {
                        let l = u32::from_be_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                        if have - at < 4 + l {
                            break;
                        }
                        mine(&buf[at + 4..at + 4 + l]);
                        at += 4 + l;
                    }
                    buf.copy_within(at..have, 0);
                    have -= at;
                }
            }
        }
    }
}

struct Endpoint {
    port: Port,
    mac: [u8; 6],
    ip: Ipv4Addr,
}

/// One network with 2×N endpoints; pair i sends from `a[i]` to `b[i]`.
struct Setup {
    a: Vec<Endpoint>,
    b: Vec<Endpoint>,
    /// Userspace processes in the data path (their CPU counts) or the broker (should be ~0).
    pids: Vec<i32>,
    _guards: Vec<Box<dyn std::any::Any>>,
}

fn mac_for(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0xbe, (i >> 8) as u8, i as u8]
}

fn ip_for(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, (i >> 8) as u8, (i & 0xff) as u8 + 2)
}

fn split(mut eps: Vec<Endpoint>) -> (Vec<Endpoint>, Vec<Endpoint>) {
    let b = eps.split_off(eps.len() / 2);
    (eps, b)
}

/// A TAP of `broker` on `network`, by a client of its own (one "VM"), with a DHCP lease
/// got with transaction `xid`; the client must live as long as the TAP is used.
fn leased_tap(broker: &BrokerProc, network: &str, xid: u32) -> (Client, Endpoint) {
    let c = broker.client();
    let acq = c
        .acquire(network)
        .unwrap_or_else(|e| panic!("acquire {network}: {e}"));
    let mac = parse_mac(&acq.info.mac);
    let ip = dhcp_lease(acq.fd.as_fd(), mac, xid)
        .unwrap_or_else(|| panic!("no DHCP lease on {network}: {}", broker.log()));
    let ep = Endpoint {
        port: Port::Tap(acq.fd),
        mac,
        ip,
    };
    (c, ep)
}

/// TAP `t{k}` made in `ns` and plugged into its bridge br0, as endpoint `k`.
fn tap_on_br0(ns: &Netns, k: usize) -> Endpoint {
    let name = format!("t{k}");
    let fd = ns.run(|| {
        let fd = crate::vm::open_tap(&name);
        set_vnet_hdr_sz(&fd);
        fd
    });
    ns.ip(&["link", "set", &name, "master", "br0", "up"]);
    Endpoint {
        port: Port::Tap(fd),
        mac: mac_for(k),
        ip: ip_for(k),
    }
}

/// (a): TAPs from the broker, one client (one "VM") each, with a DHCP lease each: the
/// network is the default kind, with anti-spoofing (MAC and IP bound per TAP).
fn broker_setup(broker: &BrokerProc, network: &str, n: usize) -> Setup {
    let mut eps = Vec::new();
    let mut clients = Vec::new();
    for i in 0..2 * n {
        let (c, ep) = leased_tap(broker, network, 0x1000 + i as u32);
        eps.push(ep);
        clients.push(c);
    }
    let (a, b) = split(eps);
    Setup {
        a,
        b,
        pids: vec![broker.pid()],
        _guards: vec![Box::new(clients)],
    }
}

/// (b): the kernel's limit: a bridge and TAPs made with `ip`, nothing else.
fn bridge_setup(n: usize) -> Setup {
    let ns = Netns::new("fab");
    let nf = BRIDGE_NF.load(Ordering::Relaxed);
    if nf != u8::MAX {
        set_bridge_nf(&ns, nf);
    }
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let mut eps = Vec::new();
    for i in 0..2 * n {
        eps.push(tap_on_br0(&ns, i));
    }
    let (a, b) = split(eps);
    Setup {
        a,
        b,
        pids: vec![],
        _guards: vec![Box::new(ns)],
    }
}

/// The broker's TAPs use a 12-byte virtio-net header; so do these.
fn set_vnet_hdr_sz(fd: &OwnedFd) {
    const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
    let sz: libc::c_int = VNET_HDR as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which points to `sz`,
    // a c_int that outlives the call; `fd` is open (borrowed).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ as _, &sz) };
    assert_eq!(
        rc,
        0,
        "TUNSETVNETHDRSZ: {}",
        std::io::Error::last_os_error()
    );
}

/// Connects to a vde_switch as libvdeplug does (VDE 2 protocol, version 3): bind a
/// datagram socket, send a request with its address on the control socket, read back the
/// switch's datagram address for the new port.
fn vde_connect(switch: &Path, mine: &Path) -> Port {
    use nix::sys::socket::*;
    let data = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let me = UnixAddr::new(mine).unwrap();
    bind(data.as_raw_fd(), &me).unwrap();
    // Big buffers: the switch drops what does not fit rather than blocking.
    let _ = setsockopt(&data, sockopt::RcvBuf, &(4 << 20));
    let _ = setsockopt(&data, sockopt::SndBuf, &(4 << 20));
    let mut ctl = UnixStream::connect(switch.join("ctl")).expect("connect to vde_switch ctl");
    let mut req = Vec::new();
    req.extend(0xfeed_faceu32.to_ne_bytes());
    req.extend(3u32.to_ne_bytes());
    req.extend(0i32.to_ne_bytes()); // REQ_NEW_CONTROL: any free port
    let mut sun = [0u8; 110];
    sun[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    let p = mine.as_os_str().as_encoded_bytes();
    sun[2..2 + p.len()].copy_from_slice(p);
    req.extend(sun);
    req.extend(b"vmnb-bench\0");
    ctl.write_all(&req).unwrap();
    let mut reply = [0u8; 110];
    ctl.read_exact(&mut reply).expect("vde_switch reply");
    let end = reply[2..].iter().position(|&c| c == 0).map_or(108, |e| e);
    let path = std::str::from_utf8(&reply[2..2 + end]).unwrap();
    let to = UnixAddr::new(path).unwrap();
    Port::Vde {
        data,
        to,
        _ctl: ctl,
        _path: mine.to_path_buf(),
    }
}

/// (c): a userspace switch, vde_switch (VDE 2 from Debian), each endpoint on its own port.
fn vde_setup(n: usize) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("vmnbt-vde-")
        .tempdir()
        .unwrap();
    let sw = dir.path().join("sw");
    let mut cmd = Command::new("vde_switch");
    cmd.arg("-s")
        .arg(&sw)
        .args(["-n", &(2 * n + 4).to_string()]);
    // Without -d it reads commands from stdin: keep a pipe open for its lifetime.
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let g = Guarded::spawn(cmd, "vde_switch");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sw.join("ctl").exists() {
        assert!(Instant::now() < deadline, "vde_switch did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let eps: Vec<Endpoint> = (0..2 * n)
        .map(|i| Endpoint {
            port: vde_connect(&sw, &dir.path().join(format!("ep{i}"))),
            mac: mac_for(i),
            ip: ip_for(i),
        })
        .collect();
    let (a, b) = split(eps);
    Setup {
        a,
        b,
        pids: vec![g.pid()],
        _guards: vec![Box::new(g), Box::new(dir)],
    }
}

/// (d): each endpoint has a QEMU `-netdev stream` connection (4-byte length + frame) to a
/// hub process that sends every frame to every other connection, as socket_vmnet does.
fn stream_setup(n: usize) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("vmnbt-hub-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("hub.sock");
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.arg("__stream_hub").arg(&path).arg((2 * n).to_string());
    cmd.stdin(Stdio::null());
    let g = Guarded::spawn(cmd, "stream hub");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(Instant::now() < deadline, "stream hub did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let eps: Vec<Endpoint> = (0..2 * n)
        .map(|i| Endpoint {
            port: Port::Stream(UnixStream::connect(&path).unwrap()),
            mac: mac_for(i),
            ip: ip_for(i),
        })
        .collect();
    let (a, b) = split(eps);
    Setup {
        a,
        b,
        pids: vec![g.pid()],
        _guards: vec![Box::new(g), Box::new(dir)],
    }
}

/// The hub process (`__stream_hub PATH N`): accepts N connections, then one thread per
/// connection floods each frame to all others (blocking writes, so no frame is lost).
pub fn stream_hub(path: &str, n: usize) {
    let l = UnixListener::bind(path).unwrap();
    let conns: Vec<UnixStream> = (0..n).map(|_| l.accept().unwrap().0).collect();
    let outs: Arc<Vec<std::sync::Mutex<UnixStream>>> = Arc::new(
        conns
            .iter()
            .map(|c| std::sync::Mutex::new(c.try_clone().unwrap()))
            .collect(),
    );
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let outs = Arc::clone(&outs);
            std::thread::spawn(move || {
                let mut len = [0u8; 4];
                let mut frame = vec![0u8; 70000];
                loop {
                    if c.read_exact(&mut len).is_err() {
                        return;
                    }
                    let l = u32::from_be_bytes(len) as usize;
                    if l > frame.len() || c.read_exact(&mut frame[..l]).is_err() {
                        return;
                    }
                    let msg = [&len[..], &frame[..l]].concat();
                    for (j, o) in outs.iter().enumerate() {
                        if j != i {
                            let _ = o.lock().unwrap().write_all(&msg);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

#[derive(Clone, Debug)]
pub struct Sample {
    pub kind: Kind,
    pub frame: usize,
    pub pairs: usize,
    pub gbps: f64,
    pub mpps: f64,
    /// CPU seconds per GB delivered: generator process + userspace switch (+ broker).
    pub cpu_per_gb: f64,
    /// Machine-wide softirq seconds per GB over the same window.
    pub softirq_per_gb: f64,
}

pub struct FabricCtx {
    pub broker: BrokerProc,
    /// The two hosts of (e), started at its first measurement.
    overlay: std::sync::OnceLock<OverlayHosts>,
}

impl FabricCtx {
    pub fn new() -> Self {
        // `VMNB_FABRIC_CONFIG`: another definition of `fabric` (e.g. a larger DHCP pool for
        // runs with a variant, which take three TAPs' worth of leases per case).
        let def = std::env::var("VMNB_FABRIC_CONFIG").unwrap_or_else(|_| "{}".to_string());
        let files = vec![("fabric".to_string(), def)];
        FabricCtx {
            broker: BrokerProc::start("bench-fab", &files, None),
            overlay: std::sync::OnceLock::new(),
        }
    }

    /// Stops every broker.
    pub fn stop(self) {
        self.broker.stop();
        if let Some(hosts) = self.overlay.into_inner() {
            for b in hosts.brokers {
                b.stop();
            }
        }
    }
}

/// Runs `script` in both overlay hosts' namespaces (starting them if need be).
pub fn overlay_hosts_sh(ctx: &FabricCtx, script: &str) {
    for b in &ctx.overlay.get_or_init(OverlayHosts::start).brokers {
        b.ns.sh(script);
    }
}

fn build(ctx: &FabricCtx, kind: Kind, n: usize) -> Setup {
    match kind {
        Kind::Broker => broker_setup(&ctx.broker, "fabric", n),
        Kind::Bridge => bridge_setup(n),
        Kind::Vde => vde_setup(n),
        Kind::Stream => stream_setup(n),
        Kind::Overlay => overlay_setup(ctx.overlay.get_or_init(OverlayHosts::start), n),
        Kind::OverlayByHand => overlay_by_hand_setup(n),
    }
}

/// The underlay's MTU in both two-host setups: 50 bytes above 1500, so the overlay carries
/// the same full-size (1514 B) frames as the one-host setups.
const UNDERLAY_MTU: &str = "1550";
const OVERLAY_VNI: &str = "4242";

/// Two hosts on a fresh underlay, with its MTU raised to [`UNDERLAY_MTU`].
fn two_hosts() -> (crate::underlay::Underlay, [Netns; 2]) {
    let ul = crate::underlay::Underlay::new();
    let hosts = [ul.host(1), ul.host(2)];
    for (n, h) in hosts.iter().enumerate() {
        h.ip(&["link", "set", "eth0", "mtu", UNDERLAY_MTU]);
        let port = format!("u{}", n + 1);
        ul.ns.ip(&["link", "set", &port, "mtu", UNDERLAY_MTU]);
    }
    (ul, hosts)
}

/// (e): a broker on each of two hosts, network `lab` spanning them over VXLAN.
struct OverlayHosts {
    brokers: Vec<BrokerProc>,
    _underlay: crate::underlay::Underlay,
}

impl OverlayHosts {
    fn start() -> OverlayHosts {
        let (ul, hosts) = two_hosts();
        let brokers = hosts
            .into_iter()
            .enumerate()
            .map(|(i, ns)| {
                let (n, peer) = (i + 1, 2 - i);
                let file = format!(
                    r#"{{"subnet":"10.98.0.{n}","mask":"255.255.0.0",
                        "dhcp_range":{{"start":"10.98.{n}.1","end":"10.98.{n}.250"}},
                        "vxlan":{{"vni":{OVERLAY_VNI},"local":"192.0.2.{n}","peers":["192.0.2.{peer}"]}}}}"#
                );
                let host_id = format!("bench-host-{n}");
                BrokerProc::start_in(
                    ns,
                    &[("lab".to_string(), file)],
                    None,
                    &["--host-id", &host_id],
                )
            })
            .collect();
        OverlayHosts {
            brokers,
            _underlay: ul,
        }
    }
}

/// (e): the A endpoints on host 1, the B endpoints on host 2, each a TAP of its host's
/// broker with a DHCP lease (anti-spoofing on, as by default).
fn overlay_setup(hosts: &OverlayHosts, n: usize) -> Setup {
    let mut halves = Vec::new();
    let mut clients = Vec::new();
    for (h, broker) in hosts.brokers.iter().enumerate() {
        let mut eps = Vec::new();
        for i in 0..n {
            let (c, ep) = leased_tap(broker, "lab", 0x2000 + (h * n + i) as u32);
            eps.push(ep);
            clients.push(c);
        }
        halves.push(eps);
    }
    let b = halves.pop().unwrap();
    let a = halves.pop().unwrap();
    Setup {
        a,
        b,
        pids: hosts.brokers.iter().map(|b| b.pid()).collect(),
        _guards: vec![Box::new(clients)],
    }
}

/// (f): the kernel's limit across two hosts: on each, a bridge, a VXLAN port with the
/// other host as its one replication entry, and TAPs, made with `ip` and `bridge`.
fn overlay_by_hand_setup(n: usize) -> Setup {
    let (ul, hosts) = two_hosts();
    let mut halves = Vec::new();
    for (h, ns) in hosts.iter().enumerate() {
        let (me, peer) = (h + 1, 2 - h);
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&[
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            OVERLAY_VNI,
            "local",
            &format!("192.0.2.{me}"),
            "dstport",
            "4789",
        ]);
        ns.ip(&["link", "set", "vx0", "master", "br0", "up"]);
        ns.ip(&["link", "set", "br0", "up"]);
        ns.sh(&format!(
            "bridge fdb append 00:00:00:00:00:00 dev vx0 dst 192.0.2.{peer}"
        ));
        let mut eps = Vec::new();
        for i in 0..n {
            eps.push(tap_on_br0(ns, h * n + i));
        }
        halves.push(eps);
    }
    let b = halves.pop().unwrap();
    let a = halves.pop().unwrap();
    Setup {
        a,
        b,
        pids: vec![],
        _guards: vec![Box::new(hosts), Box::new(ul)],
    }
}

/// One measurement: every A sends `frame`-byte frames to its B as fast as it can for
/// `warmup + dur`; frames B receives during `dur` count.
pub fn measure(ctx: &FabricCtx, kind: Kind, frame: usize, n: usize, dur: Duration) -> Sample {
    measure_with(ctx, kind, frame, n, dur, &|| {}, &|| {})
}

/// [`measure`], with `before` run once the setup is built (its network exists) and
/// `after` once the sample is taken, before the setup goes: a variant's scripts.
pub fn measure_with(
    ctx: &FabricCtx,
    kind: Kind,
    frame: usize,
    n: usize,
    dur: Duration,
    before: &dyn Fn(),
    after: &dyn Fn(),
) -> Sample {
    let setup = build(ctx, kind, n);
    before();
    // Learning: every endpoint announces its MAC once, so switches need not flood unicast.
    for ep in setup.b.iter().chain(&setup.a) {
        let hello = udp_frame(
            [0xff; 6],
            ep.mac,
            ep.ip,
            Ipv4Addr::BROADCAST,
            9,
            9,
            b"hi",
            60,
        );
        ep.port.send(&ep.port.wire(&hello));
    }
    std::thread::sleep(Duration::from_millis(100));
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let warmup = Duration::from_millis(300);
    let sink = AtomicU64::new(0);
    let (rx_total, cpu, soft) = std::thread::scope(|s| {
        for (i, b) in setup.b.iter().enumerate() {
            let (stop, c) = (&stop, &counts[i]);
            s.spawn(move || b.port.receive(b.mac, frame, stop, c));
        }
        // A endpoints drain too: a flooding switch sends them copies.
        for a in &setup.a {
            let (stop, sink) = (&stop, &sink);
            s.spawn(move || a.port.receive([0; 6], 0, stop, sink));
        }
        for (a, b) in setup.a.iter().zip(&setup.b) {
            let stop = &stop;
            s.spawn(move || {
                let f = udp_frame(b.mac, a.mac, a.ip, b.ip, 9000, 9001, &[], frame);
                let wire = a.port.wire(&f);
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        a.port.send(&wire);
                    }
                }
            });
        }
        std::thread::sleep(warmup);
        let c0: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let cpu0 = cpu_self() + setup.pids.iter().map(|&p| cpu_of(p)).sum::<f64>();
        let s0 = softirq_total();
        let t0 = Instant::now();
        std::thread::sleep(dur);
        let c1: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let cpu1 = cpu_self() + setup.pids.iter().map(|&p| cpu_of(p)).sum::<f64>();
        let s1 = softirq_total();
        let el = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        // Unblock writers stuck on a full stream/hub: closing is done by dropping the setup
        // after the scope, so shut the sockets down here.
        for ep in setup.a.iter().chain(&setup.b) {
            if let Port::Stream(st) = &ep.port {
                let _ = st.shutdown(std::net::Shutdown::Both);
            }
        }
        ((c1 - c0) as f64 / el, (cpu1 - cpu0) / el, (s1 - s0) / el)
    });
    after();
    let bytes_per_s = rx_total * frame as f64;
    let gb_per_s = bytes_per_s / 1e9;
    Sample {
        kind,
        frame,
        pairs: n,
        gbps: bytes_per_s * 8.0 / 1e9,
        mpps: rx_total / 1e6,
        cpu_per_gb: if gb_per_s > 0.0 {
            cpu / gb_per_s
        } else {
            f64::NAN
        },
        softirq_per_gb: if gb_per_s > 0.0 {
            soft / gb_per_s
        } else {
            f64::NAN
        },
    }
}

/// `bridge-nf-call-iptables` (and `-ip6tables`) for the bare bridge's namespace, set by
/// [`compare`]; `u8::MAX`: the namespace's default (1 where br_netfilter is built in).
static BRIDGE_NF: AtomicU8 = AtomicU8::new(u8::MAX);

/// Sets the namespace's own br_netfilter sysctls (per network namespace: the host's
/// stay as they are).
fn set_bridge_nf(ns: &Netns, value: u8) {
    let out = ns.exec(&[
        "sysctl",
        "-qw",
        &format!("net.bridge.bridge-nf-call-iptables={value}"),
        &format!("net.bridge.bridge-nf-call-ip6tables={value}"),
    ]);
    assert!(
        out.status.success(),
        "sysctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--fabric-only`: the broker's network (anti-spoofing on) against a bare bridge, with
/// both namespaces' `bridge-nf-call-*` at 1 and at 0, 60 and 1514 B frames (64 and 1518
/// on the wire), 1 and 8 pairs, the two setups interleaved in alternating order. Prints
/// the medians; writes no report.
pub fn compare(ctx: &FabricCtx, rounds: usize, dur: Duration) {
    let cases = [(60, 1), (1514, 1), (60, 8), (1514, 8)];
    // `VMNB_FABRIC_VARIANT` / `VMNB_FABRIC_VARIANT_UNDO`: shell scripts run in the broker's
    // namespace before and after each sample of a third setup, "variant" (e.g. `nft`
    // commands): measures a change to the broker's rules against the unchanged broker and
    // the bare bridge in the same interleaved run, without rebuilding the daemon.
    let variant = std::env::var("VMNB_FABRIC_VARIANT").ok().map(|v| {
        (
            v,
            std::env::var("VMNB_FABRIC_VARIANT_UNDO").unwrap_or_default(),
        )
    });
    let mut mpps: std::collections::BTreeMap<(u8, usize, usize, &str), Vec<f64>> =
        Default::default();
    for r in 0..rounds {
        for nf in [1u8, 0] {
            set_bridge_nf(&ctx.broker.ns, nf);
            BRIDGE_NF.store(nf, Ordering::Relaxed);
            for (frame, n) in cases {
                // With a variant, a third setup: the broker's network with the variant
                // script applied to its namespace for the sample (A/B of rule changes).
                let mut kinds = vec![(Kind::Broker, "broker"), (Kind::Bridge, "bridge")];
                if variant.is_some() {
                    kinds.push((Kind::Broker, "variant"));
                }
                let len = kinds.len();
                kinds.rotate_left((r + n) % len);
                for (kind, label) in kinds {
                    let script = |i: usize| {
                        if let Some(v) = variant.as_ref().filter(|_| label == "variant") {
                            ctx.broker.ns.sh(if i == 0 { &v.0 } else { &v.1 });
                        }
                    };
                    let s = measure_with(ctx, kind, frame, n, dur, &|| script(0), &|| script(1));
                    eprintln!(
                        "  r{r} nf={nf} {label:>7} x{n} {frame:>4} B: {:7.3} Gbit/s {:6.3} Mpps",
                        s.gbps, s.mpps
                    );
                    mpps.entry((nf, frame, n, label)).or_default().push(s.mpps);
                }
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.3}–{hi:.3}")
    };
    print!(
        "| bridge-nf-call | frame | pairs | broker Mpps (min–max) | bridge Mpps (min–max) | broker/bridge |"
    );
    if variant.is_some() {
        print!(" variant Mpps (min–max) | variant/bridge |");
    }
    println!();
    println!(
        "|---|---|---|---|---|---|{}",
        if variant.is_some() { "---|---|" } else { "" }
    );
    for nf in [1u8, 0] {
        for (frame, n) in cases {
            let bv = &mpps[&(nf, frame, n, "broker")];
            let hv = &mpps[&(nf, frame, n, "bridge")];
            let (b, h) = (median(bv), median(hv));
            print!(
                "| {nf} | {} B | {n} | {b:.3} ({}) | {h:.3} ({}) | {:.0}% |",
                frame + 4,
                range(bv),
                range(hv),
                100.0 * b / h
            );
            if let Some(vv) = mpps.get(&(nf, frame, n, "variant")) {
                let v = median(vv);
                print!(" {v:.3} ({}) | {:.0}% |", range(vv), 100.0 * v / h);
            }
            println!();
        }
    }
}
