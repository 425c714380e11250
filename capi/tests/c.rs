//! Builds the C test program and the example with gcc against libvmnetbroker (shared
//! and static) and runs them: ABI layout, strerror table (the shared vectors), broker
//! not running, and against the real broker in a network namespace as root and nobody.
//!
//! Nothing here is skipped: a missing gcc, pkg-config, ip or setpriv (scripts/deps test
//! installs them) or a broker that does not build fails the test and says what is missing.
#![cfg(target_os = "linux")]

#[path = "../../tests/support/netns.rs"]
mod netns;

use netns::Netns;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmnet_broker_client::Client;
use vmnetbroker::VmnetBrokerNetworkInfo;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/debug: where cargo puts libvmnetbroker.{so,a} (and the broker binary).
fn lib_dir() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    // `cargo test` builds only the rlib for integration tests; the C side needs the
    // cdylib and staticlib, so build them (a no-op when they are fresh).
    BUILT.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "vmnet-broker-capi", "--lib"])
            .current_dir(crate_dir())
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo build -p vmnet-broker-capi failed");
    });
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// A scratch directory, removed on drop (also when the test panics).
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("vmnbt-capi-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // nobody runs the test program and reaches the socket in here.
    sh("chmod", &["0755", dir.to_str().unwrap()]);
    Scratch(dir)
}

/// Runs `cmd`, failing the test with what to install when the program is missing.
fn output(cmd: &mut Command) -> std::process::Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {program}: {e} (scripts/deps test installs what the tests need)")
    })
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = output(Command::new(cmd).args(args));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Compiles `source` with gcc, linked to the shared or the static library.
fn gcc(source: &str, out: &Path, static_link: bool) {
    let lib = lib_dir();
    let mut cmd = Command::new("gcc");
    cmd.args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(crate_dir().join("include"))
        .arg(crate_dir().join(source))
        .arg("-o")
        .arg(out);
    if static_link {
        cmd.arg(lib.join("libvmnetbroker.a"))
            .args(["-lpthread", "-ldl", "-lm"]);
    } else {
        cmd.arg("-L")
            .arg(&lib)
            .arg("-lvmnetbroker")
            .arg(format!("-Wl,-rpath,{}", lib.display()));
    }
    let o = output(&mut cmd);
    assert!(
        o.status.success(),
        "gcc {source}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn test_program(dir: &Path, static_link: bool) -> PathBuf {
    let out = dir.join(if static_link {
        "test_capi_static"
    } else {
        "test_capi"
    });
    gcc("tests/test_capi.c", &out, static_link);
    out
}

fn vectors() -> Value {
    let path = crate_dir().join("../tests/vectors/messages.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn layout_matches_the_header() {
    let dir = scratch("layout");
    let out = Command::new(test_program(&dir, false))
        .arg("layout")
        .output()
        .unwrap();
    assert!(out.status.success());
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    use std::mem::{offset_of, size_of};
    type I = VmnetBrokerNetworkInfo;
    assert_eq!(c["size"], size_of::<I>());
    assert_eq!(c["mtu"], offset_of!(I, mtu));
    assert_eq!(c["bridge"], offset_of!(I, bridge));
    assert_eq!(c["interface"], offset_of!(I, interface));
    assert_eq!(c["mac"], offset_of!(I, mac));
}

#[test]
fn strerror_follows_the_vectors() {
    let dir = scratch("strerror");
    let mut table = String::new();
    for t in vectors()["strerror"].as_array().unwrap() {
        table += &format!("{}\t{}\n", t["code"], t["string"].as_str().unwrap());
    }
    for static_link in [false, true] {
        let mut child = Command::new(test_program(&dir, static_link))
            .arg("strerror")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(table.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "static: {static_link}");
    }
}

#[test]
fn broker_not_running() {
    let dir = scratch("unreachable");
    let out = Command::new(test_program(&dir, false))
        .arg("unreachable")
        .env("VMNET_BROKER_SOCKET", dir.join("missing.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Failed to communicate with the broker"
    );
}

#[test]
fn example_builds_shared_and_static() {
    let dir = scratch("example");
    gcc("examples/acquire.c", &dir.join("acquire"), false);
    gcc("examples/acquire.c", &dir.join("acquire_static"), true);
    let out = Command::new(dir.join("acquire_static"))
        .arg("shared")
        .env("VMNET_BROKER_SOCKET", dir.join("missing.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "failed to acquire network shared: (1) Failed to communicate with the broker"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- against the real broker -------------------------------------------------------

/// The broker in its own network namespace; Drop stops it and deletes the namespace,
/// also when a test panics.
struct Broker {
    ns: Netns,
    socket: PathBuf,
    child: Child,
    dir: Scratch,
}

/// The broker binary: `VMNET_BROKER_BIN` when set (and then it must exist), else the
/// workspace's, built next to the library so this test never runs against a stale one
/// or passes without one.
fn broker_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMNET_BROKER_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "VMNET_BROKER_BIN={} does not exist",
            p.display()
        );
        return p;
    }
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "vmnet-broker", "--bin", "vmnet-broker"])
            .current_dir(crate_dir())
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo build -p vmnet-broker failed");
    });
    let bin = lib_dir().join("vmnet-broker");
    assert!(
        bin.is_file(),
        "no broker at {} after building it",
        bin.display()
    );
    bin
}

impl Broker {
    /// Starts `VMNET_BROKER_BIN`, or the workspace's broker (built here if needed).
    fn start() -> Broker {
        let bin = broker_bin();
        let help = output(Command::new(&bin).args(["serve", "--help"]));
        assert!(
            help.status.success(),
            "{} serve --help failed: {}",
            bin.display(),
            String::from_utf8_lossy(&help.stderr)
        );
        assert_eq!(
            // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
            unsafe { libc::geteuid() },
            0,
            "the real-broker test needs root"
        );
        let ns = Netns::new("capi");
        let dir = scratch(&format!("broker-{}", ns.name));
        let conf = dir.join("conf");
        std::fs::create_dir(&conf).unwrap();
        std::fs::write(
            conf.join("private.json"),
            r#"{"mode":"host","allowed_users":["root-never-matches"]}"#,
        )
        .unwrap();
        let socket = dir.join("broker.sock");
        let log = std::fs::File::create(dir.join("broker.log")).unwrap();
        let log2 = log.try_clone().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(&bin)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--config-dir")
            .arg(&conf)
            .args(["--idle-timeout", "2"])
            .arg("--state-dir")
            .arg(dir.join("state"));
        let child = match cmd.stdout(log2).stderr(log).spawn() {
            Ok(c) => c,
            // Unwinding drops `ns`, which deletes the namespace.
            Err(e) => panic!("cannot start the broker: {e}"),
        };
        let mut b = Broker {
            ns,
            dir,
            socket,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !b.socket.exists() {
            if let Some(status) = b.child.try_wait().unwrap() {
                panic!("broker exited ({status}) before listening:\n{}", b.log());
            }
            assert!(
                Instant::now() < deadline,
                "no socket after 15 s:\n{}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sh("chmod", &["0666", b.socket.to_str().unwrap()]);
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SAFETY: kill(2) takes only integers and touches no memory of this process, so it
        // is memory-safe whatever the pid (here our child's: `ip netns exec` execs the broker).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            eprintln!("broker log:\n{}", self.log());
        }
        // The namespace (field `ns`) is deleted after this, once the broker is gone.
    }
}

fn clients_of(socket: &Path, name: &str) -> Option<u64> {
    let status = Client::connect(socket).unwrap().status().unwrap();
    status
        .networks
        .iter()
        .find(|n| n.name == name)
        .map(|n| n.clients as u64)
}

#[test]
fn real_broker() {
    let b = Broker::start();
    let program = test_program(&b.dir, false);

    // Root: acquire, hold (the program waits on stdin), check from outside, release.
    let mut child = Command::new(&program)
        .args(["acquire", "shared", "0", "52:54:00:c0:ff:ee"])
        .env("VMNET_BROKER_SOCKET", &b.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(info["name"], "shared");
    assert_eq!(info["mode"], "shared");
    assert_eq!(info["mac"], "52:54:00:c0:ff:ee");
    assert!(info["mtu"].as_u64().unwrap() >= 576);
    let subnet: ipnet::Ipv4Net = info["subnet"].as_str().unwrap().parse().unwrap();
    let gateway: std::net::Ipv4Addr = info["gateway"].as_str().unwrap().parse().unwrap();
    assert!(subnet.contains(&gateway));
    assert_eq!(info["mask"], subnet.netmask().to_string());
    let iface = info["interface"].as_str().unwrap();
    let link = sh(
        "ip",
        &["-n", &b.ns.name, "-o", "link", "show", "dev", iface],
    );
    assert!(
        link.contains(&format!("master {} ", info["bridge"].as_str().unwrap())),
        "{link}"
    );
    assert_eq!(clients_of(&b.socket, "shared"), Some(1), "lease not held");
    drop(child.stdin.take()); // release
    assert!(child.wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while clients_of(&b.socket, "shared") == Some(1) {
        assert!(
            Instant::now() < deadline,
            "release did not reach the broker"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let run = |as_nobody: bool, name: &str, code: &str| {
        let static_program = b.dir.join("test_capi_static");
        if !static_program.exists() {
            // Linked statically so nobody needs no access to the target directory.
            test_program(&b.dir, true);
        }
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&static_program);
            c
        } else {
            Command::new(&program)
        };
        let out = output(
            cmd.args(["acquire", name, code])
                .env("VMNET_BROKER_SOCKET", &b.socket)
                .current_dir(&b.dir)
                .stdin(Stdio::null()),
        );
        assert!(
            out.status.success(),
            "acquire {name} (nobody: {as_nobody}) expecting {code}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(run(false, "no-such-network", "5").contains("Network name not found"));
    assert!(run(false, "a/b", "4").contains("Invalid broker request"));
    assert!(run(true, "private", "3").contains("You are not allowed to create a network"));
    assert!(run(true, "shared", "0").contains("\"interface\""));
}

#[test]
fn install_script_gives_a_working_pkg_config_file() {
    let dir = scratch("install");
    let prefix = dir.join("prefix");
    let out = Command::new(crate_dir().join("install.sh"))
        .args(["--prefix", prefix.to_str().unwrap(), "--from"])
        .arg(lib_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pkgconfig = prefix.join("lib/pkgconfig");
    let flags = output(
        Command::new("pkg-config")
            .args(["--cflags", "--libs", "vmnet-broker"])
            .env("PKG_CONFIG_PATH", &pkgconfig),
    );
    assert!(
        flags.status.success(),
        "{}",
        String::from_utf8_lossy(&flags.stderr)
    );
    let flags = String::from_utf8(flags.stdout).unwrap();
    assert!(
        flags.contains(&format!("-I{}/include", prefix.display())),
        "{flags}"
    );
    let exe = dir.join("acquire");
    let gcc = output(
        Command::new("gcc")
            .arg(crate_dir().join("examples/acquire.c"))
            .arg("-o")
            .arg(&exe)
            .args(flags.split_whitespace()),
    );
    assert!(
        gcc.status.success(),
        "gcc with pkg-config flags {flags}: {}",
        String::from_utf8_lossy(&gcc.stderr)
    );
    let out = Command::new(&exe)
        .arg("shared")
        .env("LD_LIBRARY_PATH", prefix.join("lib"))
        .env("VMNET_BROKER_SOCKET", dir.join("missing.sock"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to communicate with the broker"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
