//! The broker under a service manager, without systemd as PID 1: socket activation
//! through Debian's `systemd-socket-activate --seqpacket` (and through a listener this
//! test holds, as the socket unit does, to start the broker again after an idle exit),
//! the notify protocol read from a NOTIFY_SOCKET the test owns, SIGHUP reloads, and the
//! client commands on a closed pipe. Each broker runs in a network namespace of its own.
#![cfg(target_os = "linux")]

#[path = "support/netns.rs"]
mod netns;
#[path = "support/broker.rs"]
mod support;
#[path = "support/tap_vm.rs"]
mod tap_vm;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use support::{BIN, Broker, Netns, Options, path_str};
use vmnet_broker::backend::linux::tap::tap_name_of;
use vmnet_broker::client::Client;

const DEADLINE: Duration = Duration::from_secs(30);

/// A broker's files: socket path, config dir, state dir, resolv.conf, log.
struct Setup {
    dir: tempfile::TempDir,
    socket: PathBuf,
    config_dir: PathBuf,
    log_path: PathBuf,
    ns: Netns,
}

impl Setup {
    fn new() -> Setup {
        netns::require("nft", "nftables");
        netns::require("systemd-socket-activate", "systemd");
        let dir = tempfile::Builder::new()
            .prefix("vmnbsd-")
            .tempdir()
            .unwrap();
        let config_dir = dir.path().join("config");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        std::fs::write(dir.path().join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        Setup {
            socket: dir.path().join("run/broker.sock"),
            log_path: dir.path().join("broker.log"),
            config_dir,
            dir,
            ns: Netns::new("systemd"),
        }
    }

    /// `serve` and its arguments (no --socket: the listener is passed).
    fn serve_args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            BIN.into(),
            "serve".into(),
            "--socket".into(),
            path_str(&self.socket).into(),
            "--config-dir".into(),
            path_str(&self.config_dir).into(),
            "--state-dir".into(),
            path_str(&self.dir.path().join("state")).into(),
            "--resolv-conf".into(),
            path_str(&self.dir.path().join("resolv.conf")).into(),
            "--log-level".into(),
            "debug".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn log_to(&self, cmd: &mut Command) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn wait_for(&self, what: &str, f: impl FnMut() -> bool) {
        support::wait_until(what, DEADLINE, || self.log(), f);
    }

    fn wait_exit(&self, child: &mut Child) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The NOTIFY_SOCKET a service manager would own: a datagram socket the test reads.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every message received so far, in order.
    seen: Vec<String>,
}

impl NotifySocket {
    fn new(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket {
            socket,
            path,
            seen: vec![],
        }
    }

    /// Receives until a message has a line for which `f` holds; returns that message.
    fn wait(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        if let Some(m) = self.seen.iter().find(|m| m.lines().any(&f)) {
            return m.clone();
        }
        self.next(what, f)
    }

    /// Like `wait`, but only messages not seen yet count.
    fn next(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; 4096];
        loop {
            assert!(
                Instant::now() < deadline,
                "no notify message {what}; got: {:?}",
                self.seen
            );
            if let Ok(n) = self.socket.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(m.clone());
                if m.lines().any(&f) {
                    return m;
                }
            }
        }
    }
}

fn alive(child: &mut Child) -> bool {
    child.try_wait().unwrap().is_none()
}

fn signal(child: &Child, sig: Signal) {
    // `ip netns exec` and systemd-socket-activate exec: the child's pid is the broker's.
    kill(Pid::from_raw(child.id() as i32), sig).unwrap();
}

#[test]
fn socket_activated_broker_notifies_reloads_on_sighup_and_leaves_the_socket() {
    let s = Setup::new();
    let mut notify = NotifySocket::new(s.dir.path());
    let mut cmd = s.ns.cmd("systemd-socket-activate");
    cmd.args(["--seqpacket", "-l", path_str(&s.socket)])
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.path.display()))
        // 2 s: WATCHDOG=1 every second.
        .arg("--setenv=WATCHDOG_USEC=2000000")
        .args(s.serve_args(&[]));
    s.log_to(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    s.wait_for("systemd-socket-activate to listen", || s.socket.exists());
    assert!(
        !s.log().contains("broker serving"),
        "started before a connection"
    );

    // The first connect starts the broker; the request waits in the socket until it serves.
    let client = Client::connect(&s.socket).unwrap();
    let a = client.acquire("shared").unwrap();
    let tap = tap_name_of(a.fd.as_fd()).unwrap();
    let master =
        s.ns.sh(&format!("basename $(readlink /sys/class/net/{tap}/master)"));
    assert_eq!(master.trim(), a.info.bridge);
    assert!(
        s.log()
            .contains("serving the socket passed by the service manager"),
        "{}",
        s.log()
    );

    let ready = notify.wait("READY=1", |l| l == "READY=1");
    assert!(ready.lines().any(|l| l.starts_with("STATUS=")), "{ready}");
    notify.wait("STATUS with the network and client", |l| {
        l == "STATUS=1 network(s), 1 client(s)"
    });
    notify.wait("WATCHDOG=1", |l| l == "WATCHDOG=1");

    // SIGHUP: a new file is reported, RELOADING=1 then READY=1, and the broker stays.
    std::fs::write(s.config_dir.join("lab.json"), r#"{"mode":"host"}"#).unwrap();
    signal(&child, Signal::SIGHUP);
    let reloading = notify.next("RELOADING=1", |l| l == "RELOADING=1");
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    notify.next("READY=1 after the reload", |l| l == "READY=1");
    s.wait_for("the reload to be logged", || {
        s.log().contains("reload done")
    });
    let log = s.log();
    assert!(
        log.lines()
            .any(|l| l.contains("config: new network") && l.contains("lab")),
        "{log}"
    );
    assert!(alive(&mut child), "SIGHUP ended the broker: {log}");
    // The lease held across the reload, and the broker still answers.
    assert_eq!(client.status().unwrap().networks.len(), 1);
    let changed = r#"{"mode":"host","mtu":1400}"#;
    std::fs::write(s.config_dir.join("shared.json"), changed).unwrap();
    signal(&child, Signal::SIGHUP);
    s.wait_for("a second reload", || {
        s.log().matches("reload done").count() == 2
    });
    assert!(
        s.log()
            .lines()
            .any(|l| l.contains("config: definition changed")
                && l.contains("shared")
                && l.contains("keeps its current config")),
        "{}",
        s.log()
    );
    assert!(alive(&mut child));

    drop(a);
    drop(client);
    s.wait_for("the client to leave", || {
        let log = s.log();
        log.matches("client connected").count() == log.matches("client disconnected").count()
    });
    signal(&child, Signal::SIGTERM);
    let status = s.wait_exit(&mut child);
    assert!(status.success(), "{status}: {}", s.log());
    notify.wait("STOPPING=1", |l| l == "STOPPING=1");
    // The socket belongs to the service manager: not unlinked by the broker.
    assert!(
        s.socket.exists(),
        "the broker removed a socket it did not create"
    );
}

#[test]
fn a_stream_socket_passed_by_the_manager_is_refused_clearly() {
    let s = Setup::new();
    let mut cmd = s.ns.cmd("systemd-socket-activate");
    cmd.args(["-l", path_str(&s.socket)])
        .args(s.serve_args(&[]));
    s.log_to(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    s.wait_for("systemd-socket-activate to listen", || s.socket.exists());
    let _conn = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    let status = s.wait_exit(&mut child);
    assert!(!status.success());
    let log = s.log();
    assert!(log.contains("SOCK_SEQPACKET"), "{log}");
    assert!(log.contains("ListenSequentialPacket"), "{log}");
}

/// A listening SEQPACKET socket held by the test, as a `.socket` unit holds it.
fn listen_seqpacket(path: &Path) -> OwnedFd {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    nix::sys::socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    nix::sys::socket::listen(&fd, Backlog::new(64).unwrap()).unwrap();
    fd
}

/// Starts the broker the way systemd does on a connection: the listener as fd 3,
/// LISTEN_FDS=1 and LISTEN_PID naming the broker's own pid (the shell's, which execs).
fn activate(s: &Setup, listener: &OwnedFd, extra: &[&str]) -> Child {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=vmnet-broker.socket; exec ip netns exec "$0" "$@""#)
        .arg(&s.ns.name)
        .args(s.serve_args(extra));
    s.log_to(&mut cmd);
    let raw = listener.as_raw_fd();
    // SAFETY: the closure only calls dup2 and fcntl, which are async-signal-safe, on an
    // fd that stays open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears FD_CLOEXEC on the copy, so fd 3 survives the exec; when the
            // listener already is fd 3, dup2 does nothing and the flag is cleared by hand.
            let rc = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    spawn_serving(s, &mut cmd)
}

/// Starts the broker `cmd` runs and waits until it serves (its log says so once more).
fn spawn_serving(s: &Setup, cmd: &mut Command) -> Child {
    let mut child = cmd.spawn().unwrap();
    let serving = s.log().matches("broker serving").count() + 1;
    s.wait_for("the activated broker to serve", || {
        assert!(alive(&mut child), "broker exited: {}", s.log());
        s.log().matches("broker serving").count() == serving
    });
    child
}

/// Waits until a connection is pending on the listener (what makes systemd start the
/// service).
fn wait_pending(s: &Setup, listener: &OwnedFd) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let n = poll(
        &mut fds,
        PollTimeout::try_from(DEADLINE.as_millis() as i32).unwrap(),
    )
    .unwrap();
    assert_eq!(n, 1, "no connection came: {}", s.log());
}

#[test]
fn exit_on_idle_under_socket_activation_starts_again_on_the_next_connect() {
    let s = Setup::new();
    let listener = listen_seqpacket(&s.socket);
    let mut broker = activate(&s, &listener, &["--exit-on-idle", "1"]);
    {
        let client = Client::connect(&s.socket).unwrap();
        client.acquire("shared").unwrap();
    }
    let status = s.wait_exit(&mut broker);
    assert!(status.success(), "{status}: {}", s.log());
    assert!(s.log().contains("idle-exit"), "{}", s.log());
    assert!(s.socket.exists(), "the activated socket was removed");

    // No broker runs now; a client connects all the same (the listener stays), its
    // request waits, and the pending connection is what starts the next broker.
    let socket = s.socket.clone();
    let waiting = std::thread::spawn(move || {
        let client = Client::connect(&socket).unwrap();
        client.acquire("shared").map(|a| a.info.bridge)
    });
    wait_pending(&s, &listener);
    let mut broker = activate(&s, &listener, &["--exit-on-idle", "1"]);
    let bridge = waiting.join().unwrap().unwrap();
    assert!(!bridge.is_empty());
    assert_eq!(s.log().matches("broker serving").count(), 2, "{}", s.log());
    let status = s.wait_exit(&mut broker);
    assert!(status.success(), "{status}: {}", s.log());
}

/// `vmnet-broker status | head -1`: the reader goes away before all is written.
#[test]
fn client_commands_exit_quietly_on_a_closed_pipe() {
    let mut b = Broker::start(Options::default());
    // Deterministic: stdout is a pipe whose read end is already closed, so the very first
    // write fails with EPIPE (Rust ignores SIGPIPE).
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["acquire", "shared"],
    ] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let out = b
            .cli(args)
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {} {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    // And the pipeline itself, with pipefail so the broker command's status counts.
    let script = format!(
        "set -o pipefail; ip netns exec {} {BIN} status | head -1",
        b.ns.name
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env("VMNET_BROKER_SOCKET", &b.socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{} {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("vmnet-broker "));
    b.stop();
}

/// contrib's units are valid for systemd (`systemd-analyze verify`, which needs no
/// systemd running), with ExecStart pointing at the binary under test.
#[test]
fn contrib_units_pass_systemd_analyze_verify() {
    netns::require("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    for unit in ["vmnet-broker.socket", "vmnet-broker.service"] {
        let text = std::fs::read_to_string(contrib.join(unit)).unwrap();
        std::fs::write(
            dir.path().join(unit),
            text.replace("/usr/bin/vmnet-broker", BIN),
        )
        .unwrap();
    }
    let service = std::fs::read_to_string(contrib.join("vmnet-broker.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Sockets=vmnet-broker.socket",
    ] {
        assert!(service.lines().any(|l| l == line), "missing {line}");
    }
    assert!(service.lines().any(|l| l.starts_with("WatchdogSec=")));
    let out = Command::new("systemd-analyze")
        .current_dir(dir.path())
        .args(["verify", "--man=no"])
        .arg(dir.path().join("vmnet-broker.socket"))
        .arg(dir.path().join("vmnet-broker.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "{stderr}");
}

/// Capability bits of CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_NET_RAW (13: the
/// Router Advertisement socket) and CAP_BPF (39: the TAP guard's map and program).
const UNIT_CAPS: u64 = (1 << 10) | (1 << 12) | (1 << 13) | (1 << 39);

/// The unit's `User=vmnet-broker` with `AmbientCapabilities=CAP_NET_ADMIN
/// CAP_NET_BIND_SERVICE CAP_NET_RAW CAP_BPF`: `serve` started as an unprivileged uid (nobody) with those
/// capabilities and no others creates a network, attaches a TAP and removes it all again.
#[test]
fn serve_works_unprivileged_with_only_the_units_capabilities() {
    netns::require("setpriv", "util-linux");
    netns::require("unshare", "util-linux");
    const NOBODY: u32 = 65534;
    let s = Setup::new();
    use std::os::unix::fs::{PermissionsExt, chown};
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = s.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    chown(s.dir.path().join("run"), Some(NOBODY), Some(NOBODY)).unwrap();
    let bin_dir = s.dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let bin = support::expose_to_any_uid(Path::new(BIN), &bin_dir, 0o755);
    // Debian's /dev/net/tun is 0666; some hosts (containers) make it 0600. The broker
    // needs it usable by its user, not CAP_DAC_OVERRIDE: a 0666 node of the same device
    // is bind-mounted over it in a mount namespace of the broker's own.
    let tun = s.dir.path().join("tun");
    netns::run_ok(Command::new("mknod").args(["-m", "0666", path_str(&tun), "c", "10", "200"]));
    // As in the unit, the socket's group is the broker user's own: a vmnet-broker group
    // whose gid is the test user's, whatever this machine's /etc/group has.
    let group = s.dir.path().join("group");
    std::fs::write(
        &group,
        support::group_file_without_broker_group(&format!("vmnet-broker:x:{NOBODY}:\n")),
    )
    .unwrap();
    let caps = "-all,+net_admin,+net_bind_service,+net_raw,+bpf";
    let mut args = s.serve_args(&[]);
    args[0] = path_str(&bin).into();
    let mut cmd = Command::new("unshare");
    // unshare, sh, ip netns exec and setpriv all exec: the child's pid is the broker's.
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /dev/net/tun && mount --bind "$1" /etc/group && shift && exec "$@""#)
        .arg(&tun)
        .arg(&group)
        .args(["ip", "netns", "exec", &s.ns.name, "setpriv"])
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(format!("--bounding-set={caps}"))
        .args(args);
    s.log_to(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    support::wait_listening(&s.socket, &mut child, &s.log_path);
    let socket_gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&s.socket).unwrap());
    assert_eq!(
        socket_gid, NOBODY,
        "the socket belongs to the user's own group"
    );

    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {proc_status}"))
            .trim()
            .to_string()
    };
    assert!(
        field("Uid:").starts_with(&NOBODY.to_string()),
        "{proc_status}"
    );
    let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    assert_eq!(eff, UNIT_CAPS, "{proc_status}");

    {
        let client = Client::connect(&s.socket).unwrap();
        let a = client.acquire("shared").unwrap();
        let tap = tap_name_of(a.fd.as_fd()).unwrap();
        let master =
            s.ns.sh(&format!("basename $(readlink /sys/class/net/{tap}/master)"));
        assert_eq!(master.trim(), a.info.bridge);
        assert!(
            s.ns.nft_tables().contains("vmnet_broker"),
            "no firewall tables"
        );
        // Services on the gateway: DNS on port 53 needs CAP_NET_BIND_SERVICE.
        let log = s.log();
        assert!(log.contains("DHCP server on"), "{log}");
        assert!(log.contains("DNS server listening"), "{log}");
    }
    s.wait_for("the client to leave", || {
        let log = s.log();
        log.matches("client connected").count() == log.matches("client disconnected").count()
    });
    signal(&child, Signal::SIGTERM);
    let status = s.wait_exit(&mut child);
    let log = s.log();
    assert!(status.success(), "{status}: {log}");
    assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{log}");
    assert!(
        !s.ns.links().iter().any(|l| l.starts_with("vmnb")),
        "{:?}",
        s.ns.links()
    );
}

/// Starts the broker as systemd does with several fds: each `(fd, name)` becomes fd
/// 3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set, plus `env`.
fn activate_fds(s: &Setup, fds: &[(&OwnedFd, &str)], env: &[(&str, &str)]) -> Child {
    let names: Vec<&str> = fds.iter().map(|(_, n)| *n).collect();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"export LISTEN_PID=$$; exec ip netns exec "$0" "$@""#)
        .arg(&s.ns.name)
        .args(s.serve_args(&[]))
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    s.log_to(&mut cmd);
    let raw: Vec<i32> = fds.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
    assert!(raw.len() <= 16, "at most 16 fds");
    // SAFETY: the closure only calls fcntl, dup2 and close, which are async-signal-safe,
    // on fds that stay open in the parent until spawn returns, and reads `raw`, built
    // before the fork; it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            // First every fd above the target range, so moving them to 3, 4, ... never
            // overwrites one still to be moved; then down (dup2 clears FD_CLOEXEC).
            let mut high = [0i32; 16];
            for (i, fd) in raw.iter().enumerate() {
                high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in high.iter().take(raw.len()).enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*fd);
            }
            Ok(())
        });
    }
    spawn_serving(s, &mut cmd)
}

/// Receives notify messages, with the fds they carry (SCM_RIGHTS), until one has a line
/// for which `f` holds.
fn next_with_fds(
    notify: &mut NotifySocket,
    what: &str,
    f: impl Fn(&str) -> bool,
) -> (String, Vec<OwnedFd>) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::FromRawFd;
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(
            Instant::now() < deadline,
            "no notify message {what}; got: {:?}",
            notify.seen
        );
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 8]);
        let Ok(msg) = recvmsg::<()>(
            notify.socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) else {
            continue;
        };
        let mut fds = vec![];
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in this process for this
                // message; nothing else owns them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        let n = msg.bytes;
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        notify.seen.push(m.clone());
        if m.lines().any(&f) {
            return (m, fds);
        }
    }
}

#[test]
fn clients_kept_in_the_fd_store_are_served_by_the_next_broker() {
    let s = Setup::new();
    let mut notify = NotifySocket::new(s.dir.path());
    let listener = listen_seqpacket(&s.socket);
    let notify_path = notify.path.display().to_string();
    // FDSTORE: what systemd sets when the unit has FileDescriptorStoreMax= above 0.
    let env = [("NOTIFY_SOCKET", notify_path.as_str()), ("FDSTORE", "64")];
    let mut first = activate_fds(&s, &[(&listener, "vmnet-broker.socket")], &env);

    let client = Client::connect(&s.socket).unwrap();
    let a = client.acquire("shared").unwrap();
    let tap = tap_name_of(a.fd.as_fd()).unwrap();
    let (stored, fds) = next_with_fds(&mut notify, "FDSTORE=1", |l| l == "FDSTORE=1");
    let name = stored
        .lines()
        .find_map(|l| l.strip_prefix("FDNAME="))
        .unwrap_or_else(|| panic!("FDSTORE without FDNAME: {stored}"))
        .to_string();
    assert!(name.starts_with("client-"), "{name}");
    assert_eq!(fds.len(), 1, "{stored}");
    let id: u64 = name["client-".len()..].parse().unwrap();
    // Asked by another connection: a client never sees itself in `clients`.
    let other = Client::connect(&s.socket).unwrap();
    assert_eq!(other.status().unwrap().clients[0].id, id);
    drop(other);

    // SIGTERM with a client connected: a broker that can hand over exits 0 and leaves
    // everything in place.
    signal(&first, Signal::SIGTERM);
    let status = s.wait_exit(&mut first);
    assert!(status.success(), "{status}: {}", s.log());
    assert!(
        s.log().contains("handing over to the next broker"),
        "{}",
        s.log()
    );
    assert!(!s.log().contains("network removed"), "{}", s.log());
    let master =
        s.ns.sh(&format!("basename $(readlink /sys/class/net/{tap}/master)"));
    assert_eq!(master.trim(), a.info.bridge);

    // The next broker gets the listener and the stored connection back.
    let mut second = activate_fds(
        &s,
        &[(&listener, "vmnet-broker.socket"), (&fds[0], &name)],
        &env,
    );
    drop(fds);
    // The very same connection is still served, as the same client holding its network.
    assert_eq!(
        client.status().unwrap().pid,
        second.id(),
        "answered by the new broker"
    );
    let st = Client::connect(&s.socket).unwrap().status().unwrap();
    assert_eq!(st.clients.len(), 1, "{st:?}");
    assert_eq!(st.clients[0].id, id);
    assert_eq!(st.clients[0].networks, ["shared"]);
    assert_eq!(st.networks[0].clients, 1);
    assert_eq!(st.networks[0].removal_in_seconds, None);
    let again = client.acquire("shared").unwrap();
    assert_eq!(again.info.bridge, a.info.bridge);
    assert_eq!(again.info.subnet, a.info.subnet);
    assert_ne!(again.info.interface, a.info.interface);
    assert!(!s.log().contains("network removed"), "{}", s.log());
    assert!(!s.log().contains("removed stale interface"), "{}", s.log());

    // The client leaves: its connection is dropped from the fd store.
    drop((a, again));
    drop(client);
    // The connections that only asked for status were removed from the store too: wait
    // for this client's removal among them.
    let removed = |seen: &[String]| {
        seen.iter()
            .any(|m| m.contains("FDSTOREREMOVE=1") && m.contains(&format!("FDNAME={name}")))
    };
    while !removed(&notify.seen) {
        notify.next("FDSTOREREMOVE of the client", |l| l == "FDSTOREREMOVE=1");
    }
    s.wait_for("the client to leave", || {
        s.log().contains("client disconnected")
    });
    signal(&second, Signal::SIGTERM);
    let status = s.wait_exit(&mut second);
    assert!(status.success(), "{status}: {}", s.log());
    assert!(s.log().contains("network removed"), "{}", s.log());
}

/// What a TCP connection to `to` from namespace `ns` reads until the end, if it connects
/// and reads anything.
fn answer(ns: &Netns, to: &str) -> Option<String> {
    use std::io::Read;
    let to: std::net::SocketAddr = to.parse().unwrap();
    ns.run(|| {
        let mut c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).ok()?;
        (!text.is_empty()).then_some(text)
    })
}

#[test]
fn dynamic_forwards_outlive_a_sigkilled_broker_and_end_with_their_connection() {
    let s = Setup::new();
    let mut notify = NotifySocket::new(s.dir.path());
    let listener = listen_seqpacket(&s.socket);
    let notify_path = notify.path.display().to_string();
    let env = [("NOTIFY_SOCKET", notify_path.as_str()), ("FDSTORE", "64")];
    let mut first = activate_fds(&s, &[(&listener, "vmnet-broker.socket")], &env);

    let client = Client::connect(&s.socket).unwrap();
    let a = client.acquire("shared").unwrap();
    let (stored, fds) = next_with_fds(&mut notify, "FDSTORE=1", |l| l == "FDSTORE=1");
    let name = stored
        .lines()
        .find_map(|l| l.strip_prefix("FDNAME="))
        .unwrap_or_else(|| panic!("FDSTORE without FDNAME: {stored}"))
        .to_string();
    let (tap, gateway) = (a.info.interface.clone(), a.info.gateway.clone());
    let prefix_len = a.info.subnet.split('/').nth(1).unwrap().to_string();
    let vm = tap_vm::TapVm::new(a.fd, &a.info.mac);
    let ip = vm.dhcp("kept");
    vm.ns.sh(&format!("ip addr add {ip}/{prefix_len} dev eth0"));
    // The guest's server: answers "kept" to every connection.
    let server = vm
        .ns
        .run(|| std::net::TcpListener::bind(("0.0.0.0", 22)).unwrap());
    std::thread::spawn(move || {
        for c in server.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut &c, b"kept");
        }
    });
    client.forward("shared", "tcp", 2250, 22, &tap).unwrap();
    let reached = |to: &str| answer(&s.ns, to).as_deref() == Some("kept");
    s.wait_for("the forward to reach the guest", || {
        reached("127.0.0.1:2250")
    });

    // SIGKILL: no hand-over, the host port closes with the process.
    signal(&first, Signal::SIGKILL);
    s.wait_exit(&mut first);
    let mut second = activate_fds(
        &s,
        &[(&listener, "vmnet-broker.socket"), (&fds[0], &name)],
        &env,
    );
    drop(fds);
    assert!(
        s.log()
            .contains("port forward of the previous broker made again"),
        "{}",
        s.log()
    );
    // The forward is there again, for the same connection: port held, rules in place.
    s.wait_for("the forward to work again", || {
        reached("127.0.0.1:2250") && reached(&format!("{gateway}:2250"))
    });
    assert!(
        s.ns.sh("nft list table inet vmnet_broker")
            .contains("dport 2250"),
        "{}",
        s.log()
    );
    let shown = client.show("shared").unwrap();
    assert_eq!(shown.forwards.len(), 1, "{shown:?}");
    assert_eq!(shown.forwards[0]["external_port"], 2250);
    let other = Client::connect(&s.socket).unwrap();
    let theirs = other.acquire("shared").unwrap();
    let e = other
        .forward("shared", "tcp", 2250, 22, &theirs.info.interface)
        .unwrap_err();
    assert!(e.message.contains("2250 is already in use"), "{e}");

    // The connection closes: its forward goes with it, as with the broker that made it.
    drop(client);
    s.wait_for("the forward to end with its connection", || {
        !s.ns
            .sh("nft list table inet vmnet_broker")
            .contains("dport 2250")
            && s.ns
                .run(|| std::net::TcpListener::bind(("0.0.0.0", 2250)))
                .is_ok()
    });
    drop((theirs, other, vm));
    signal(&second, Signal::SIGTERM);
    s.wait_exit(&mut second);
}
