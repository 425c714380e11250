//! Control plane: acquire latency (cold and warm), qemu-bridge-helper side by side,
//! 1000 clients at once and the release of their TAPs, 10,000 clients over 16 networks,
//! DHCP DISCOVER to OFFER.

use crate::netns::Netns;
use crate::util::*;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmnet_broker_client::Client;

#[derive(Default, Debug, Clone)]
pub struct Control {
    pub cold_ms: Vec<f64>,
    pub warm_ms: Vec<f64>,
    /// The whole cycle of each `warm_ms` sample: the acquire, then the client closing its
    /// TAP fd and its connection (what the next back-to-back acquire waits behind).
    pub warm_cycle_ms: Vec<f64>,
    /// The kernel alone doing what each back-to-back cycle needs of it ([`HandCycler`]),
    /// in blocks interleaved with the broker's.
    pub warm_by_hand_ms: Vec<f64>,
    /// Warm acquires with 10 ms between samples (no release work queued ahead).
    pub warm_spaced_ms: Vec<f64>,
    /// The floor of `warm_spaced_ms`: a request and a reply with an fd over a new Unix
    /// connection to a process that answers at once ([`echo_server`]), timed in the same
    /// alternation.
    pub echo_spaced_ms: Vec<f64>,
    /// Warm acquires on a network with `allow_spoofing: true` (no nftables update per TAP).
    pub warm_nospoof_ms: Vec<f64>,
    pub helper_ms: Vec<f64>,
    /// Broker acquires timed in the same alternation as `helper_ms`.
    pub helper_broker_ms: Vec<f64>,
    pub many: Many,
    /// Ten thousand clients (fewer with --quick) over [`SCALE_NETWORKS`] networks.
    pub scale: Many,
    /// The kernel alone making the scale row's TAPs ([`by_hand`]), ms per TAP.
    pub scale_by_hand_ms: Vec<f64>,
    pub dhcp_ms: Vec<f64>,
    pub dhcp_lost: usize,
    /// The daemon's own step timings (`vmnet_broker::steps` debug lines) of cold and of
    /// spaced warm acquires, from a broker of their own with those lines on.
    pub steps: Steps,
}

/// Per kind of acquire ("cold", "warm"), per operation line ("acquire request",
/// "create"...), each step's samples in µs, steps in the order the daemon ran them.
pub type Steps = Vec<(&'static str, Vec<(String, Vec<(String, Vec<f64>)>)>)>;

#[derive(Default, Debug, Clone)]
pub struct Many {
    pub clients: usize,
    pub networks: usize,
    pub acquire_ms: Vec<f64>,
    pub errors: usize,
    pub first_error: String,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub rss_idle_kib: u64,
    pub broker_fds: usize,
    pub taps: usize,
    /// From the first client leaving (closing its TAP fd, then its connection) until the
    /// last has: the clients' own cost of leaving.
    pub close_s: f64,
    /// From the first client leaving until every TAP is gone from the kernel.
    pub release_s: f64,
    pub taps_after: usize,
    pub nofile_soft: String,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Networks the clients of the scale row spread over.
pub const SCALE_NETWORKS: usize = 16;

/// Which parts of the control-plane run (`--ctl cold,warm,dhcp,steps,helper,many,scale`;
/// all by default).
#[derive(Debug, Clone)]
pub struct Parts(Vec<String>);

impl Parts {
    pub fn parse(arg: Option<&str>) -> Parts {
        Parts(
            arg.unwrap_or("cold,warm,dhcp,steps,helper,many,scale")
                .split(',')
                .map(str::to_string)
                .collect(),
        )
    }
    fn has(&self, part: &str) -> bool {
        self.0.iter().any(|p| p == part)
    }
}

pub fn run(
    quick: bool,
    clients: Option<usize>,
    scale_clients: Option<usize>,
    parts: &Parts,
) -> Control {
    let mut out = Control::default();
    // Each part says how long it took: the smoke run in CI has a time budget (issue 12).
    let timed = |name: &str, t: Instant| eprintln!("  {name}: {:.1} s", t.elapsed().as_secs_f64());
    if parts.has("cold") || parts.has("warm") || parts.has("dhcp") {
        let t = Instant::now();
        latency(quick, parts, &mut out);
        timed("cold, warm and DHCP latency", t);
    }
    if parts.has("steps") {
        let t = Instant::now();
        out.steps = steps(quick);
        timed("step timings", t);
    }
    if parts.has("helper") {
        let t = Instant::now();
        bridge_helper(quick, &mut out);
        timed("qemu-bridge-helper", t);
    }
    if parts.has("many") {
        let t = Instant::now();
        let n = clients.unwrap_or(if quick { 300 } else { 1000 });
        out.many = many(n, 1, Some(1024), 1);
        timed("many clients", t);
    }
    if parts.has("scale") {
        let t = Instant::now();
        // Each client leaves on its own, as VMs exiting do: 16 at a time.
        let n = scale_clients.unwrap_or(if quick { 1000 } else { 10_000 });
        out.scale = many(n, SCALE_NETWORKS, None, 16);
        // The kernel's own floor, with as many TAPs (as many as fit), bridges and threads.
        out.scale_by_hand_ms = by_hand(out.scale.clients, SCALE_NETWORKS);
        timed("clients over 16 networks", t);
    }
    out
}

fn latency(quick: bool, parts: &Parts, out: &mut Control) {
    let cold_n = if quick { 8 } else { 40 };
    let warm_n: usize = if quick {
        WARM_BLOCK / 4
    } else {
        2 * WARM_BLOCK
    };
    let mut files: Vec<(String, String)> = (0..cold_n)
        .map(|i| (format!("cold{i}"), "{}".to_string()))
        .collect();
    files.push(("warm".into(), "{}".into()));
    files.push(("nospoof".into(), r#"{"allow_spoofing": true}"#.into()));
    let broker = BrokerProc::start("bench-ctl", &files, None);

    // Cold: each acquire creates a network (bridge, addresses, nftables, DHCP, DNS). The
    // networks stay (idle timeout 600 s) so no removal runs during later samples.
    let mut held = Vec::new();
    for i in 0..if parts.has("cold") { cold_n } else { 0 } {
        let c = broker.client();
        let t = Instant::now();
        let a = c.acquire(&format!("cold{i}")).expect("cold acquire");
        out.cold_ms.push(ms(t.elapsed()));
        drop(a);
        held.push(c);
    }
    drop(held);

    // Warm: a holder keeps the network; each sample is a new connection acquiring it (one
    // TAP), then disconnecting (the release runs in the broker while the next sample goes).
    // In blocks alternating with the kernel doing the same TAP work alone, so both see
    // the same machine.
    let holder = broker.client();
    let _tap = holder.acquire("warm").expect("warm holder");
    let warm_n = if parts.has("warm") { warm_n } else { 0 };
    let block = WARM_BLOCK.min(warm_n);
    let cycler = (warm_n > 0).then(HandCycler::start);
    for cycler in cycler
        .iter()
        .flat_map(|c| std::iter::repeat_n(c, warm_n / block))
    {
        for _ in 0..block {
            let c = broker.client();
            let t = Instant::now();
            let a = c.acquire("warm").expect("warm acquire");
            out.warm_ms.push(ms(t.elapsed()));
            drop(a);
            drop(c);
            out.warm_cycle_ms.push(ms(t.elapsed()));
        }
        out.warm_by_hand_ms.extend(cycler.cycles(block));
    }

    // Spaced, each acquire followed by the same exchange with a process that does
    // nothing but answer (the floor: two processes waking on this machine).
    let echo = Echo::start();
    for _ in 0..warm_n / 4 {
        std::thread::sleep(Duration::from_millis(10));
        let c = broker.client();
        let t = Instant::now();
        let a = c.acquire("warm").expect("warm acquire");
        out.warm_spaced_ms.push(ms(t.elapsed()));
        drop(a);
        drop(c);
        std::thread::sleep(Duration::from_millis(10));
        out.echo_spaced_ms.push(echo.round_trip());
    }
    drop(echo);
    let holder2 = broker.client();
    let _tap2 = holder2.acquire("nospoof").expect("nospoof holder");
    for _ in 0..warm_n / 4 {
        std::thread::sleep(Duration::from_millis(10));
        let c = broker.client();
        let t = Instant::now();
        let a = c.acquire("nospoof").expect("nospoof acquire");
        out.warm_nospoof_ms.push(ms(t.elapsed()));
        drop(a);
    }
    drop(_tap2);
    drop(holder2);

    // DHCP: a new TAP (new MAC) per sample; DISCOVER written into the TAP, OFFER read back.
    let dhcp_n = match (parts.has("dhcp"), quick) {
        (false, _) => 0,
        (true, true) => 30,
        (true, false) => 200,
    };
    for i in 0..dhcp_n {
        let c = broker.client();
        let a = c.acquire("warm").expect("acquire for DHCP");
        let mac = parse_mac(&a.info.mac);
        match dhcp_discover(a.fd.as_fd(), mac, 0x5000 + i) {
            Some((_, _, d)) => out.dhcp_ms.push(ms(d)),
            None => out.dhcp_lost += 1,
        }
    }
    drop(_tap);
    drop(holder);
    broker.stop();
}

/// Where the time of an acquire goes, as the daemon itself times it: a broker of its own
/// with `vmnet_broker::steps` debug lines on (kept apart from the latency samples, which
/// must not pay for the logging), cold acquires of new networks, then warm acquires
/// 10 ms apart on a held one.
fn steps(quick: bool) -> Steps {
    let (cold_n, warm_n) = if quick { (6, 40) } else { (20, 200) };
    let mut files: Vec<(String, String)> = (0..cold_n)
        .map(|i| (format!("cold{i}"), "{}".to_string()))
        .collect();
    files.push(("warm".into(), "{}".into()));
    let broker = BrokerProc::start_in(
        Netns::new("bench-steps"),
        &files,
        None,
        &["--log-level", "info,vmnet_broker::steps=debug"],
    );
    let mut held = Vec::new();
    for i in 0..cold_n {
        let c = broker.client();
        drop(c.acquire(&format!("cold{i}")).expect("cold acquire"));
        held.push(c);
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);
    let cold_log = broker.log();
    // The holder's acquire creates the network: neither a cold nor a warm sample.
    let holder = broker.client();
    let _tap = holder.acquire("warm").expect("warm holder");
    std::thread::sleep(Duration::from_millis(200));
    let before_warm = broker.log().len();
    for _ in 0..warm_n {
        std::thread::sleep(Duration::from_millis(10));
        let c = broker.client();
        drop(c.acquire("warm").expect("warm acquire"));
    }
    let log = broker.log();
    // The holder's network would make the broker ignore SIGTERM.
    drop(_tap);
    drop(holder);
    broker.stop();
    let mut out: Steps = vec![("cold", vec![]), ("warm", vec![])];
    let lines = cold_log
        .lines()
        .map(|l| (0, l))
        .chain(log[before_warm..].lines().map(|l| (1, l)));
    // `... DEBUG vmnet_broker::steps: OPERATION: step=12us step=3us network=NAME`
    for (kind, line) in lines {
        let Some((_, rest)) = line.split_once("vmnet_broker::steps: ") else {
            continue;
        };
        let Some((op, fields)) = rest.split_once(": ") else {
            continue;
        };
        let ops = &mut out[kind].1;
        let at = match ops.iter().position(|(o, _)| o == op) {
            Some(at) => at,
            None => {
                ops.push((op.to_string(), vec![]));
                ops.len() - 1
            }
        };
        for f in fields.split_whitespace() {
            let Some((step, us)) = f.split_once('=') else {
                continue;
            };
            let Some(us) = us.strip_suffix("us").and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            let steps = &mut ops[at].1;
            match steps.iter_mut().find(|(s, _)| s == step) {
                Some((_, v)) => v.push(us),
                None => steps.push((step.to_string(), vec![us])),
            }
        }
    }
    out
}

/// qemu-bridge-helper (as QEMU runs it for `-netdev bridge`) against a broker acquire,
/// alternating, on bridges in two namespaces.
fn bridge_helper(quick: bool, out: &mut Control) {
    let helper = "/usr/lib/qemu/qemu-bridge-helper";
    assert!(
        std::path::Path::new(helper).exists(),
        "{helper} is missing: install package qemu-system-common (`scripts/deps test` does)"
    );
    let n = if quick { 30 } else { 200 };
    let ns = Netns::new("bench-qbh");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let dir = tempfile::Builder::new()
        .prefix("vmnbt-qbh-")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("bridge.conf"), "allow br0\n").unwrap();
    // The helper reads only /etc/qemu/bridge.conf. The timing loop runs in a child under
    // `ip netns exec` (its own mount namespace), which bind-mounts our file there: the
    // host's /etc/qemu is never written (an empty directory is made as mount point if
    // missing, and removed again).
    let made = !std::path::Path::new("/etc/qemu").exists();
    if made {
        std::fs::create_dir("/etc/qemu").unwrap();
    }
    let o = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(std::env::current_exe().unwrap())
        .arg("__helper_loop")
        .arg(dir.path())
        .arg(n.to_string())
        .stderr(Stdio::inherit())
        .output();
    if made {
        let _ = std::fs::remove_dir("/etc/qemu");
    }
    let o = o.expect("helper loop");
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        if let Ok(v) = l.trim().parse::<f64>() {
            out.helper_ms.push(v);
        }
    }
    // The broker side: warm acquires on a running network, same count, same machine state.
    let broker = BrokerProc::start("bench-qbh", &[("br".into(), "{}".into())], None);
    let holder = broker.client();
    let _t = holder.acquire("br").unwrap();
    for _ in 0..n {
        let t = Instant::now();
        let c = Client::connect(&broker.socket).unwrap();
        let a = c.acquire("br").unwrap();
        out.helper_broker_ms.push(ms(t.elapsed()));
        drop(a);
    }
    drop(_t);
    drop(holder);
    broker.stop();
}

/// Child side of [`bridge_helper`]: runs inside the namespace; prints one time (ms) per
/// line: spawn of the helper until the TAP fd arrived (what QEMU waits for).
pub fn helper_loop(dir: &str, n: usize) {
    let src = std::ffi::CString::new(dir).unwrap();
    let dst = c"/etc/qemu";
    // SAFETY: mount(2) only reads the two NUL-terminated strings, valid for the call, and
    // the null pointers it allows for fstype and data with MS_BIND. It bind-mounts a
    // directory we own, in the private mount namespace `ip netns exec` made for us.
    unsafe {
        let rc = libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        );
        assert_eq!(rc, 0, "bind mount: {}", std::io::Error::last_os_error());
    }
    for _ in 0..n {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let theirs_fd = theirs.as_raw_fd();
        let t = Instant::now();
        let mut cmd = Command::new("/usr/lib/qemu/qemu-bridge-helper");
        cmd.args(["--use-vnet", "--br=br0", "--fd=3"]);
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec the closure makes only async-signal-safe calls
        // (dup2) and allocates nothing; `theirs_fd` is a plain integer copied in, open in
        // the parent (and so in the child) until after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(theirs_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-bridge-helper");
        let fd = recv_fd(&ours);
        let dt = t.elapsed();
        let st = child.wait().unwrap();
        assert!(
            st.success() && fd.is_some(),
            "qemu-bridge-helper failed ({st})"
        );
        println!("{}", ms(dt));
        drop(fd);
        drop(theirs);
    }
    // SAFETY: umount(2) only reads the NUL-terminated C string literal; it undoes our own
    // bind mount in our private mount namespace (which goes away with us anyway).
    unsafe { libc::umount(c"/etc/qemu".as_ptr()) };
}

fn recv_fd(s: &std::os::unix::net::UnixStream) -> Option<OwnedFd> {
    use nix::sys::socket::*;
    let mut buf = [0u8; 16];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).ok()?;
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: SCM_RIGHTS fds were just installed in our fd table by this recvmsg
            // and nothing else refers to them, so the OwnedFd is the only owner.
            return fds.first().map(|&f| unsafe { OwnedFd::from_raw_fd(f) });
        }
    }
    None
}

/// `n` clients connected at once, each acquiring (from 4 threads) and holding a TAP, on
/// `networks` networks in turn; then all leave (`closers` threads, each closing a client's
/// TAP fd, then its connection) and the TAPs must go. `nofile`: the broker's soft
/// RLIMIT_NOFILE (systemd gives services 1024; the broker raises it to the hard limit).
fn many(n: usize, networks: usize, nofile: Option<u64>, closers: usize) -> Many {
    // Our own fds: a socket and a TAP per client, and the broker's (inherited): a socket
    // per client. Root may raise the hard limit.
    // SAFETY: rlimit is plain integers, so all zeroes is a valid value; getrlimit writes
    // and setrlimit reads one rlimit through a pointer to `r`, exclusively borrowed.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        let want = (3 * n as libc::rlim_t + 1024).max(r.rlim_max);
        r.rlim_max = want;
        r.rlim_cur = want;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    // This process holds a socket and a TAP per client; where the hard limit cannot be
    // raised (a container without CAP_SYS_RESOURCE) ten thousand clients do not fit, and
    // running out of fds after every acquire (in `ip`'s pipes) would lose the whole row.
    // SAFETY: as above: one all-integer rlimit, exclusively borrowed.
    let limit = unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur as usize
    };
    let fit = limit.saturating_sub(512) / 2;
    let n = if n > fit {
        eprintln!(
            "bench: {n} clients need {} fds here, the limit is {limit}: measuring {fit}",
            2 * n + 512
        );
        fit
    } else {
        n
    };
    let names: Vec<String> = (0..networks).map(|i| format!("many{i}")).collect();
    let files: Vec<(String, String)> = names
        .iter()
        .map(|name| (name.clone(), "{}".to_string()))
        .collect();
    // No TAP pool: every TAP left after the clients is then one of theirs, so "all TAPs
    // gone" means what it says (a pool would keep 4 ready per network for good).
    let broker = BrokerProc::start_in(
        Netns::new("bench-many"),
        &files,
        nofile,
        &["--tap-pool", "0"],
    );
    let mut m = Many {
        clients: n,
        networks,
        ..Default::default()
    };
    // A client holds each network (a client may hold 8), so none is created during the
    // measurement.
    let holders: Vec<_> = names
        .iter()
        .map(|name| {
            let c = broker.client();
            let a = c.acquire(name).expect("first acquire");
            (a, c)
        })
        .collect();
    let (rss0, _) = rss_kib(broker.pid());
    m.rss_idle_kib = rss0;
    let clients: Vec<Result<Client, String>> = (0..n)
        .map(|_| Client::connect(&broker.socket).map_err(|e| e.to_string()))
        .collect();
    // A broker that stops accepting (e.g. out of fds) leaves clients waiting for a reply
    // forever: after 60 s without any acquire answered the watchdog kills it, so those
    // acquires fail and are counted. (A deadline for the whole row fired on a loaded
    // machine while the broker was still answering: progress is what tells a hang.)
    let done = std::sync::atomic::AtomicBool::new(false);
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let bpid = broker.pid();
    let names = &names;
    let results: Vec<(
        Option<f64>,
        Option<String>,
        Option<vmnet_broker_client::Acquired>,
    )> = std::thread::scope(|s| {
        let done = &done;
        let answered = &answered;
        s.spawn(move || {
            let mut seen = 0;
            let mut last = Instant::now();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let now = answered.load(std::sync::atomic::Ordering::Relaxed);
                if now != seen {
                    (seen, last) = (now, Instant::now());
                } else if last.elapsed() > Duration::from_secs(60) {
                    eprintln!("bench: {n} clients: no progress at {seen}, killing the broker");
                    // SAFETY: kill(2) takes only integers and touches no memory of ours; `bpid`
                    // is our child broker, not reaped before `broker` is dropped after this.
                    unsafe { libc::kill(bpid, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let chunk = n.div_ceil(4);
        let hs: Vec<_> = clients
            .chunks(chunk)
            .enumerate()
            .map(|(k, part)| {
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(i, c)| match c {
                            Err(e) => (None, Some(format!("connect: {e}")), None),
                            Ok(c) => {
                                let name = &names[(k * chunk + i) % names.len()];
                                let t = Instant::now();
                                let r = match c.acquire(name) {
                                    Ok(a) => (Some(ms(t.elapsed())), None, Some(a)),
                                    Err(e) => (None, Some(e.to_string()), None),
                                };
                                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                r
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let r = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    let mut taps = Vec::new();
    for (t, e, a) in results {
        if let Some(t) = t {
            m.acquire_ms.push(t);
        }
        if let Some(e) = e {
            if m.errors == 0 {
                m.first_error = e;
            }
            m.errors += 1;
        }
        taps.push(a);
    }
    let pid = broker.pid();
    (m.rss_kib, m.hwm_kib) = rss_kib(pid);
    m.broker_fds = fd_count(pid);
    m.nofile_soft = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_string())
        .unwrap_or_default();
    // Minus lo, the bridges and the holders' TAPs.
    let base = 1 + 2 * networks;
    m.taps = broker.link_count().saturating_sub(base - networks);
    let t = Instant::now();
    let mut leaving: Vec<_> = taps.into_iter().zip(clients).collect();
    let per = leaving.len().div_ceil(closers).max(1);
    std::thread::scope(|s| {
        while !leaving.is_empty() {
            let part: Vec<_> = leaving.drain(..per.min(leaving.len())).collect();
            s.spawn(move || drop(part));
        }
    });
    m.close_s = t.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 100);
    // Until only lo, the bridges and the holders' TAPs remain. `ip` lists every
    // link: not too often, it competes with the broker for the CPUs.
    let poll = Duration::from_millis(if n > 2000 { 100 } else { 20 });
    while broker.link_count() > base && Instant::now() < deadline {
        std::thread::sleep(poll);
    }
    m.release_s = t.elapsed().as_secs_f64();
    m.taps_after = broker.link_count().saturating_sub(base);
    drop(holders);
    broker.stop();
    m
}

/// An interface group of no other use, for deleting [`by_hand`]'s TAPs in one request.
const BY_HAND_GROUP: u32 = 4077;

/// The kernel alone doing what an acquire of the scale row needs of it at the least, with
/// that row's concurrency and no broker: `n` TAPs over `networks` bridges from 4 threads,
/// each TAP made (`TUNSETIFF`), persistent (`TUNSETPERSIST`, as the broker's are), without
/// an IPv6 stack of its own (`disable_ipv6`, as the broker's) and put on its bridge and up
/// (one `RTM_SETLINK`). Milliseconds per TAP. What the broker does on
/// top: the TAP guard, MAC, MTU and alias in that request, the client's round trip, its
/// records. Each of the kernel's steps takes the RTNL lock, so 4 threads queue on it as
/// the broker's acquires do.
fn by_hand(n: usize, networks: usize) -> Vec<f64> {
    let ns = Netns::new("bench-byhand");
    let bridges: Vec<u32> = (0..networks)
        .map(|i| {
            let name = format!("br{i}");
            ns.ip(&["link", "add", &name, "type", "bridge"]);
            ns.ip(&["link", "set", &name, "up"]);
            ns.run(|| nix::net::if_::if_nametoindex(name.as_str()).expect("bridge index"))
        })
        .collect();
    let chunk = n.div_ceil(4);
    let (times, fds): (Vec<Vec<f64>>, Vec<Vec<OwnedFd>>) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|k| {
                let (ns, bridges) = (&ns, &bridges);
                s.spawn(move || {
                    ns.enter_current_thread();
                    on_netlink(async |handle| {
                        let (mut times, mut fds) = (vec![], vec![]);
                        for i in 0..chunk.min(n.saturating_sub(k * chunk)) {
                            let name = format!("h{k}-{i}");
                            let bridge = bridges[(k * chunk + i) % bridges.len()];
                            let t = Instant::now();
                            let fd = tap_by_hand(&handle, &name, bridge).await;
                            times.push(ms(t.elapsed()));
                            fds.push(fd);
                        }
                        (times, fds)
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).unzip()
    });
    // Persistent, so closing is cheap; then all of them in one request (one wait for the
    // kernel, not one per TAP), before the broker's row starts.
    drop(fds);
    ns.ip(&["link", "del", "group", &BY_HAND_GROUP.to_string()]);
    times.into_iter().flatten().collect()
}

const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// Runs `f` with an rtnetlink handle in the calling thread's namespace, on a runtime of
/// the thread's own.
fn on_netlink<T>(f: impl AsyncFnOnce(rtnetlink::Handle) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().expect("rtnetlink");
        tokio::spawn(conn);
        f(handle).await
    })
}

/// The least an acquire needs of the kernel, done by hand ([`by_hand`], [`HandCycler`]):
/// TAP `name` made (`TUNSETIFF`), persistent, without an IPv6 stack of its own, on
/// bridge `bridge` and up, in interface group [`BY_HAND_GROUP`] (one `RTM_SETLINK`).
async fn tap_by_hand(handle: &rtnetlink::Handle, name: &str, bridge: u32) -> OwnedFd {
    let fd = crate::vm::open_tap(name);
    // SAFETY: the fd is an attached TAP; TUNSETPERSIST takes an integer by value.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_int) };
    assert_eq!(rc, 0, "TUNSETPERSIST {name}");
    // As the broker does, while the TAP is down: a port with an IPv6 stack of its own gets
    // a link-local address, DAD and MLD when up (p99 0.14 s per TAP at 10,000 TAPs
    // without this).
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1")
        .expect("disable_ipv6");
    let index = nix::net::if_::if_nametoindex(name).expect("TAP index");
    let mut message = rtnetlink::LinkUnspec::new_with_index(index)
        .controller(bridge)
        .up()
        .build();
    message
        .attributes
        .push(netlink_packet_route::link::LinkAttribute::Group(
            BY_HAND_GROUP,
        ));
    handle
        .link()
        .set(message)
        .execute()
        .await
        .expect("RTM_SETLINK master, up");
    fd
}

/// Back-to-back warm acquires per block, between blocks of as many [`HandCycler`] cycles.
const WARM_BLOCK: usize = 1000;

/// The kernel alone doing, back to back, what a client that acquires a TAP and leaves
/// needs of it at the least, as the broker does it: a new TAP (`TUNSETIFF`), made
/// persistent, without an IPv6 stack of its own, put on a bridge and up (one
/// `RTM_SETLINK`, which also puts it in an interface group), its fd closed; and every
/// [`REAP_BATCH`] closed TAPs deleted in one request (the broker's reaper, which holds
/// the RTNL lock for as long, in the background of the acquires under way). No guard, no
/// owner, no MAC, no client round trip. A thread of its own in a namespace of its own;
/// each call to [`HandCycler::cycles`] runs a block and returns each cycle's ms.
struct HandCycler {
    asks: std::sync::mpsc::Sender<usize>,
    times: std::sync::mpsc::Receiver<Vec<f64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The broker's reaper batch (`REAP_BATCH_MAX` in src/backend/linux/mod.rs).
const REAP_BATCH: usize = 256;

impl HandCycler {
    fn start() -> HandCycler {
        let (asks, asked) = std::sync::mpsc::channel::<usize>();
        let (told, times) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ns = Netns::new("bench-cycle");
            ns.ip(&["link", "add", "br0", "type", "bridge"]);
            ns.ip(&["link", "set", "br0", "up"]);
            ns.enter_current_thread();
            let bridge = nix::net::if_::if_nametoindex("br0").expect("bridge index");
            on_netlink(async |handle| {
                let (mut made, mut closed) = (0usize, 0usize);
                while let Ok(n) = asked.recv() {
                    let mut block = Vec::with_capacity(n);
                    for _ in 0..n {
                        let name = format!("c{made}");
                        made += 1;
                        let t = Instant::now();
                        drop(tap_by_hand(&handle, &name, bridge).await);
                        closed += 1;
                        if closed == REAP_BATCH {
                            let mut del = handle.link().del(0);
                            del.message_mut().attributes.push(
                                netlink_packet_route::link::LinkAttribute::Group(BY_HAND_GROUP),
                            );
                            del.execute().await.expect("RTM_DELLINK group");
                            closed = 0;
                        }
                        block.push(ms(t.elapsed()));
                    }
                    if told.send(block).is_err() {
                        break;
                    }
                }
            });
            // What is left of the last batch, before the namespace goes.
            ns.ip(&["link", "del", "group", &BY_HAND_GROUP.to_string()]);
        });
        HandCycler {
            asks,
            times,
            thread: Some(thread),
        }
    }

    fn cycles(&self, n: usize) -> Vec<f64> {
        self.asks.send(n).expect("cycler alive");
        self.times.recv().expect("cycler alive")
    }
}

impl Drop for HandCycler {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        let (asks, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.asks, asks));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A process answering on a Unix seqpacket socket as the broker does, with nothing behind
/// it: each request gets a reply of an acquire's size with an fd (SCM_RIGHTS).
struct Echo {
    path: PathBuf,
    _child: Guarded,
    _dir: tempfile::TempDir,
}

/// Sizes of an acquire's request and reply (JSON, as the client sends and gets them).
const ECHO_REQUEST: usize = 64;
const ECHO_REPLY: usize = 320;

impl Echo {
    fn start() -> Echo {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("echo.sock");
        let exe = std::env::current_exe().expect("own path");
        let mut cmd = Command::new(exe);
        cmd.arg("__echo").arg(&path);
        let child = Guarded::spawn(cmd, "echo server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(Instant::now() < deadline, "echo server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Echo {
            path,
            _child: child,
            _dir: dir,
        }
    }

    /// Connects (untimed, as the broker's samples connect before the clock starts), then
    /// times request → reply with its fd, in ms.
    fn round_trip(&self) -> f64 {
        use nix::sys::socket::*;
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        connect(fd.as_raw_fd(), &UnixAddr::new(&self.path).expect("path")).expect("connect");
        let t = Instant::now();
        send(fd.as_raw_fd(), &[b'{'; ECHO_REQUEST], MsgFlags::empty()).expect("send");
        let mut buf = [0u8; 1024];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("recvmsg");
        let mut got = None;
        for c in msg.cmsgs().expect("cmsgs") {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: SCM_RIGHTS just gave us this fd; nothing else owns it.
                got = fds.first().map(|&f| unsafe { OwnedFd::from_raw_fd(f) });
            }
        }
        let elapsed = ms(t.elapsed());
        assert_eq!(msg.bytes, ECHO_REPLY, "echo reply");
        assert!(got.is_some(), "echo reply without its fd");
        elapsed
    }
}

/// The process behind [`Echo`] (`__echo PATH`): one connection at a time, one request
/// each, answered with [`ECHO_REPLY`] bytes and an fd of /dev/null.
pub fn echo_server(path: &str) {
    use nix::sys::socket::*;
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(listener.as_raw_fd(), &UnixAddr::new(path).expect("path")).expect("bind");
    listen(&listener, Backlog::new(16).expect("backlog")).expect("listen");
    let reply = [b'}'; ECHO_REPLY];
    loop {
        let Ok(conn) = accept(listener.as_raw_fd()) else {
            return;
        };
        // SAFETY: accept just returned this fd; nothing else owns it.
        let conn = unsafe { OwnedFd::from_raw_fd(conn) };
        let mut buf = [0u8; 1024];
        if recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap_or(0) == 0 {
            continue;
        }
        let fds = [null.as_raw_fd()];
        let _ = sendmsg::<()>(
            conn.as_raw_fd(),
            &[std::io::IoSlice::new(&reply)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        );
    }
}
