//! The one network-namespace helper of the integration tests and benchmarks.
//!
//! Every test that makes bridges, TAPs, routes or nftables rules does so in namespaces it
//! creates with [`Netns::new`] and that are deleted on drop (also when the test panics),
//! never in this machine's own namespace. Include it at the crate root of a test or bench
//! (`#[path = "support/netns.rs"] mod netns;`); tests/support/broker.rs and
//! tests/support/vm.rs use it as `crate::netns`.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace, deleted on drop (which also deletes every link in it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `vmnbt-<tag>-<pid>-<n>` with loopback up. The pid and a per-process counter
    /// make the name unique among concurrent tests and test binaries.
    pub fn new(tag: &str) -> Self {
        require("ip", "iproute2");
        let name = format!(
            "vmnbt-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// /run/netns/<name>, the file `setns` opens.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n <ns> ARGS...`, which must succeed (panics with its stderr otherwise).
    pub fn ip(&self, args: &[&str]) -> Output {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command run inside the namespace (`ip netns exec <ns> PROGRAM`).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `args` (program first) inside the namespace and returns its output, whether
    /// or not it succeeded; panics only if it cannot be started.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut c = self.cmd(args[0]);
        c.args(&args[1..]);
        c.output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {}: {e}", self.name))
    }

    /// Output of a shell script run in the namespace, which must succeed.
    pub fn sh(&self, script: &str) -> String {
        let out = self
            .cmd("sh")
            .args(["-c", script])
            .output()
            .unwrap_or_else(|e| panic!("cannot run sh in {}: {e}", self.name));
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Names of every link but `lo`.
    pub fn links(&self) -> Vec<String> {
        self.sh("ip -br link")
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(|n| n.split('@').next().unwrap().to_string())
            .filter(|n| n != "lo")
            .collect()
    }

    pub fn nft_tables(&self) -> String {
        self.sh("nft list tables")
    }

    /// Moves the calling thread into the namespace, for good: call it only on a thread
    /// made for that (see [`Netns::run`]), so the test's other threads stay where they are.
    pub fn enter_current_thread(&self) {
        enter(&self.path());
    }

    /// Runs `f` on a new thread that has entered this namespace (only that thread moves,
    /// and it ends after `f`); sockets `f` creates belong to the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter_current_thread();
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Moves the calling thread into the network namespace at `path` (a [`Netns::path`]), for
/// threads that outlive a borrow of the [`Netns`]; the same caveat as
/// [`Netns::enter_current_thread`] applies.
pub fn enter(path: &Path) {
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    // SAFETY: setns(2) only reads its two integer arguments; `file` is an open namespace
    // fd for the whole call. It changes the network namespace of the calling thread alone,
    // which no memory safety depends on.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Fails the test, saying which Debian package to install, unless `program` is on PATH
/// (or, given as a path, exists). Tests call it before using a tool, so that a missing one
/// is a clear failure, never a skip or a puzzling assertion. `scripts/deps test` installs
/// every package the tests need.
pub fn require(program: &str, package: &str) {
    let found = if program.contains('/') {
        Path::new(program).is_file()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
    };
    assert!(
        found,
        "{program} not found: install the package {package} (`scripts/deps test` installs \
         everything the tests need)"
    );
}

/// Runs `cmd`, which must succeed; panics with its stderr otherwise.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (`scripts/deps test` installs what the tests run)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// The packets of the first `counter` in an `nft list` output.
pub fn counter_packets(listing: &str) -> u64 {
    let at = listing
        .find("packets ")
        .unwrap_or_else(|| panic!("no counter: {listing}"));
    listing[at + 8..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
