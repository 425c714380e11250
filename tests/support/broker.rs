//! Test harness: a real broker process in a network namespace made for one test.
//!
//! The broker runs as `ip netns exec <ns> vmnet-broker serve`, so every bridge, TAP and
//! nftables rule it makes lives in that namespace and disappears with it. Its socket is
//! a path in a temporary directory: AF_UNIX path sockets do not belong to a network
//! namespace, so the test process (and clients it starts) connect from anywhere.
//! The test crate must also include tests/support/netns.rs as `mod netns`.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use vmnet_broker::client::Client;

pub use crate::netns::Netns;

pub const BIN: &str = env!("CARGO_BIN_EXE_vmnet-broker");

pub struct Options {
    pub idle_timeout: f64,
    pub exit_on_idle: Option<f64>,
    /// (file name, contents) written into the config dir before start.
    pub files: Vec<(String, String)>,
    pub extra_args: Vec<String>,
    /// The /etc/group the broker sees (bind-mounted in a mount namespace of its own), to
    /// test group handling without touching this machine's user database.
    pub group_file: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            idle_timeout: 120.0,
            exit_on_idle: None,
            files: vec![],
            extra_args: vec![],
            group_file: None,
        }
    }
}

/// The default options with config files `files`, each (file name, contents).
pub fn options_with_files<T: AsRef<str>>(files: &[(&str, T)]) -> Options {
    Options {
        files: files
            .iter()
            .map(|(n, t)| (n.to_string(), t.as_ref().to_string()))
            .collect(),
        ..Default::default()
    }
}

pub struct Broker {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub log_path: PathBuf,
    pub child: Option<Child>,
    /// Declared last: the namespace goes after the broker is stopped.
    pub ns: Netns,
}

impl Broker {
    pub fn start(opts: Options) -> Broker {
        let ns = Netns::new("broker");
        Self::start_in(ns, opts)
    }

    pub fn start_in(ns: Netns, opts: Options) -> Broker {
        // The daemon runs nft; tests run setpriv and unshare.
        crate::netns::require("nft", "nftables");
        crate::netns::require("setpriv", "util-linux");
        crate::netns::require("unshare", "util-linux");
        let dir = tempfile::Builder::new().prefix("vmnbt-").tempdir().unwrap();
        let config_dir = dir.path().join("config");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&config_dir).unwrap();
        for (name, text) in &opts.files {
            std::fs::write(config_dir.join(name), text).unwrap();
        }
        let mut broker = Broker {
            socket: dir.path().join("run/broker.sock"),
            log_path: dir.path().join("broker.log"),
            config_dir,
            state_dir,
            dir,
            child: None,
            ns,
        };
        broker.spawn(&opts);
        broker
    }

    /// Starts (or restarts) the daemon and waits for its socket.
    pub fn spawn(&mut self, opts: &Options) {
        // The temp dir is private to root (0700); clients of other uids need to reach the socket.
        std::fs::set_permissions(
            self.dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let resolv = self.dir.path().join("resolv.conf");
        if !resolv.exists() {
            std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = match &opts.group_file {
            None => self.ns.cmd(BIN),
            Some(text) => {
                let group = self.dir.path().join("group");
                std::fs::write(&group, text).unwrap();
                // unshare and sh exec, so the child's pid stays the broker's.
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mount --bind "$0" /etc/group && exec "$@""#)
                    .arg(&group)
                    .args(["ip", "netns", "exec", &self.ns.name, BIN]);
                c
            }
        };
        cmd.arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--resolv-conf")
            .arg(&resolv)
            .arg("--idle-timeout")
            .arg(opts.idle_timeout.to_string())
            .args(&opts.extra_args)
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(s) = opts.exit_on_idle {
            cmd.arg("--exit-on-idle").arg(s.to_string());
        }
        let child = cmd.spawn().unwrap();
        self.child = Some(child);
        wait_listening(&self.socket, self.child.as_mut().unwrap(), &self.log_path);
    }

    /// The broker binary at a path any uid can execute, for clients run as another user:
    /// [`BIN`] lives under the checkout, which may sit in a directory private to its owner.
    /// The broker's temporary directory is searchable by all (see [`Broker::spawn`]).
    pub fn bin_for_any_uid(&self) -> PathBuf {
        let dir = self.dir.path().join("bin");
        std::fs::create_dir_all(&dir).unwrap();
        expose_to_any_uid(Path::new(BIN), &dir, 0o755)
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    /// The vmnet-broker CLI, run inside the broker's namespace (so it can see the TAPs).
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = self.ns.cmd(BIN);
        c.args(args).env("VMNET_BROKER_SOCKET", &self.socket);
        c
    }

    /// `vmnet-broker check-config --config-dir <dir>`, as [`Broker::cli`] runs it.
    pub fn check_config(&self, dir: &Path) -> Command {
        self.cli(&["check-config", "--config-dir", path_str(dir)])
    }

    /// The CLI run as uid/gid 65534 with no groups, from [`Broker::bin_for_any_uid`] (the
    /// caller opens the socket up to it).
    pub fn cli_as_nobody(&self, args: &[&str]) -> Command {
        let mut c = self.ns.cmd("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(self.bin_for_any_uid())
            .args(args)
            .current_dir(self.dir.path())
            .env("VMNET_BROKER_SOCKET", &self.socket);
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        // `ip netns exec` execs the broker, so the child's pid is the broker's.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the broker to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the broker has seen every client it accepted disconnect. A query made
    /// to check (`status`) is a client too, and its disconnect is processed
    /// asynchronously, so the log is the only race-free witness.
    pub fn wait_no_clients(&self) {
        self.wait_for(
            "every client to disconnect",
            Duration::from_secs(10),
            || {
                let log = self.log();
                log.matches("client connected").count()
                    == log.matches("client disconnected").count()
            },
        );
    }

    /// Stops the broker with SIGTERM once all clients are gone, and checks it exited 0.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.wait_no_clients();
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("broker did not stop: {}", self.log()));
        assert!(status.success(), "broker exit {status}: {}", self.log());
    }

    /// Polls `f` until it returns true or `timeout` passes.
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl FnMut() -> bool) {
        wait_until(what, timeout, || self.log(), f);
    }

    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Whether TAP `name`, closed by its client, is done with: deleted, or a pool TAP
    /// back in its pool as new (src/backend/linux/recycle.rs), which only the broker
    /// holds and no listing shows.
    pub fn tap_released(&self, name: &str) -> bool {
        if !self.ns.links().iter().any(|l| l == name) {
            return true;
        }
        vmnet_broker::backend::linux::pool::is_pool_name(name)
            && self.log().lines().any(|l| {
                l.contains("closed pool TAP")
                    && l.contains(&format!("interface={name} outcome=Back"))
            })
            && !self
                .client()
                .status()
                .unwrap()
                .networks
                .iter()
                .any(|n| n.taps.iter().any(|t| t == name))
    }
}

/// Polls `f` until it returns true; after `timeout` fails the test with `log()` (the
/// broker's log) in the message.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    log: impl Fn() -> String,
    mut f: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; broker log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until a broker started as `child` (logging to `log`) accepts connections on
/// `socket`; panics with its log if it exits first or takes more than 20 s.
pub fn wait_listening(socket: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Client::connect(socket).is_err() {
        let log = || std::fs::read_to_string(log).unwrap_or_default();
        if let Some(status) = child.try_wait().unwrap() {
            panic!("broker exited early ({status}): {}", log());
        }
        assert!(
            Instant::now() < deadline,
            "broker did not listen: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a child's stdout up to the first line break (for `acquire --hold`).
pub fn read_line(child: &mut Child) -> String {
    let out = child.stdout.as_mut().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// This machine's /etc/group without a `vmnet-broker` group, plus `extra` lines: what a
/// test bind-mounts so the broker's socket-group handling depends on the test, never on
/// whether this machine happens to have the group (installing the package creates it).
#[allow(dead_code)]
pub fn group_file_without_broker_group(extra: &str) -> String {
    let mut group: String = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("vmnet-broker:"))
        .map(|l| format!("{l}\n"))
        .collect();
    group.push_str(extra);
    group
}
/// Makes `src` available as `dir/<its file name>` with at least `mode` for every uid
/// (`dir` must itself be searchable by all): a hard link when `src` already grants those
/// bits to others, a copy with `mode` otherwise (or across file systems). For files that
/// another uid must read or execute, which must not depend on where the checkout lives.
pub fn expose_to_any_uid(src: &Path, dir: &Path, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dst = dir.join(src.file_name().expect("a file"));
    if dst.exists() {
        // Exposed before (never copy onto it: it may be a hard link of `src`).
        return dst;
    }
    let others = mode & 0o007;
    let meta = std::fs::metadata(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    if meta.permissions().mode() & others == others && std::fs::hard_link(src, &dst).is_ok() {
        return dst;
    }
    std::fs::copy(src, &dst)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", src.display(), dst.display()));
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode)).unwrap();
    dst
}

/// Calls `f` in a thread whose own credentials are uid/gid `id` (the raw syscalls change
/// only the calling thread, unlike libc's setuid, which changes every thread of the
/// test process). Sockets connected there carry that uid in SO_PEERCRED.
pub fn as_uid<T: Send + 'static>(id: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: plain syscalls on this thread's credentials, group first (it needs
        // root); the thread ends right after `f`, so no other code runs with them.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, id, id, id), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, id, id, id), 0);
        }
        f()
    })
    .join()
    .unwrap()
}
