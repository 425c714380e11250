//! Test support: boot the tiny test guest (scripts/build-guest.sh) under QEMU and read what
//! its script reported. Include it with `#[path = "support/vm.rs"] mod vm;`.
//!
//! A guest runs `VmSpec::script` (busybox sh, with the helpers of scripts/guest/functions.sh)
//! and prints `VMNB-RESULT key=value` lines and a final `VMNB-DONE rc=N` on its serial
//! console, which QEMU writes to a file; then it powers off and QEMU exits. See docs/guest.md.
//!
//! Without a broker a test opens TAPs itself and passes them with [`pass_fds`]; with the
//! broker, [`broker_vm_command`] runs QEMU under `vmnet-broker run` through
//! scripts/qemu-from-env, which adds one NIC per network from VMNET_BROKER_NETWORKS.
//! The crate must also include tests/support/netns.rs as `mod netns`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The built guest: kernel and base initramfs (interactive unless a script is appended).
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// A cpio with iperf3 and its libraries, to append to `initrd` (see [`VmSpec::iperf3`]).
    pub iperf3: Option<PathBuf>,
}

fn build_guest(with_iperf3: bool) -> GuestImage {
    let root = repo_root();
    let out = root.join("target/guest");
    let script = root.join("scripts/build-guest.sh");
    let mut cmd = Command::new(&script);
    cmd.arg("--out").arg(&out);
    if with_iperf3 {
        cmd.arg("--with-iperf3");
    }
    // The script prints progress on stderr; keep it visible in the test's output.
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    if !output.status.success() {
        panic!(
            "{} failed ({}): the VM tests need Debian's apt (packages linux-image-cloud-amd64, \
             busybox-static{}):\n{}{}",
            script.display(),
            output.status,
            if with_iperf3 { ", iperf3" } else { "" },
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let image = GuestImage {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
        iperf3: with_iperf3.then(|| out.join("iperf3.cpio.gz")),
    };
    for f in [&image.kernel, &image.initrd]
        .into_iter()
        .chain(image.iperf3.as_ref())
    {
        assert!(
            f.is_file(),
            "build-guest.sh succeeded but {} is missing",
            f.display()
        );
    }
    image
}

/// Builds the guest once per test binary (the script itself is a no-op when up to date) and
/// returns its files. Panics with the build's output if it fails.
pub fn guest_image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| build_guest(false))
}

/// Like [`guest_image`], with iperf3 built too.
pub fn guest_image_with_iperf3() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| build_guest(true))
}

/// One virtio-net NIC backed by a TAP fd that QEMU finds at `fd` (see [`pass_fds`]).
#[derive(Debug, Clone)]
pub struct Nic {
    pub fd: RawFd,
    pub mac: String,
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Used as the guest's hostname (`vmnb.hostname=`, sent to DHCP servers as option 12).
    pub name: String,
    /// busybox sh run inside the guest after boot; its exit status is reported as `rc`.
    pub script: String,
    pub nics: Vec<Nic>,
    /// Kill QEMU after this long (the guest then counts as not completed).
    pub timeout: Duration,
    pub memory_mb: u32,
    /// Append iperf3 (at /bin/iperf3) to this guest's initramfs.
    pub iperf3: bool,
    /// More kernel command line (e.g. `vmnb.debug=1` traces init and the script).
    pub append: String,
}

impl VmSpec {
    pub fn new(name: &str, script: &str) -> Self {
        Self {
            name: name.to_string(),
            script: script.to_string(),
            nics: Vec::new(),
            timeout: Duration::from_secs(60),
            memory_mb: 256,
            iperf3: false,
            append: String::new(),
        }
    }

    pub fn nic(mut self, fd: RawFd, mac: &str) -> Self {
        self.nics.push(Nic {
            fd,
            mac: mac.to_string(),
        });
        self
    }
}

/// Files made for one boot: the initramfs with the script appended and the console log.
/// Removed on drop.
pub struct PreparedVm {
    pub dir: tempfile::TempDir,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub console: PathBuf,
}

/// Writes the VM's initrd: the base image, then (at a 4-byte boundary, where the kernel
/// looks for further archives) iperf3 if asked for and an uncompressed cpio holding
/// `/vmnb/script`. The kernel unpacks concatenated archives into one rootfs.
pub fn prepare(spec: &VmSpec) -> PreparedVm {
    if std::env::var_os("VMNB_QEMU").is_none() {
        crate::netns::require("qemu-system-x86_64", "qemu-system-x86");
    }
    let image = if spec.iperf3 {
        guest_image_with_iperf3()
    } else {
        guest_image()
    };
    let dir = tempfile::Builder::new()
        .prefix("vmnb-vm-")
        .tempdir()
        .expect("cannot create a temporary directory for the VM");
    let initrd = dir.path().join("initrd.img");
    let console = dir.path().join("console.log");
    let mut data = std::fs::read(&image.initrd)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", image.initrd.display()));
    if let Some(iperf3) = image.iperf3.as_ref().filter(|_| spec.iperf3) {
        pad4(&mut data);
        data.extend(
            std::fs::read(iperf3)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", iperf3.display())),
        );
    }
    pad4(&mut data);
    data.extend(script_cpio(&spec.script));
    std::fs::write(&initrd, &data)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", initrd.display()));
    // QEMU appends to the file; start empty.
    std::fs::write(&console, b"").expect("cannot create the console log");
    PreparedVm {
        dir,
        kernel: image.kernel.clone(),
        initrd,
        console,
    }
}

fn pad4(data: &mut Vec<u8>) {
    while !data.len().is_multiple_of(4) {
        data.push(0);
    }
}

/// A cpio (newc) archive with the directory `vmnb` and the executable `vmnb/script`.
pub fn script_cpio(script: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |ino: u32, name: &str, mode: u32, data: &[u8]| {
        let namesize = name.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0,
            0,
            0,
            0,
            0 // check
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(&mut out);
        out.extend_from_slice(data);
        pad4(&mut out);
    };
    entry(1, "vmnb", 0o040755, b"");
    entry(2, "vmnb/script", 0o100755, script.as_bytes());
    entry(0, "TRAILER!!!", 0, b"");
    out
}

/// The QEMU binary: $VMNB_QEMU or qemu-system-x86_64.
pub fn qemu_binary() -> OsString {
    std::env::var_os("VMNB_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// TCG unless VMNB_ACCEL=kvm: KVM was seen hanging at boot on the CI machines.
fn accel_args() -> Vec<&'static str> {
    match std::env::var("VMNB_ACCEL").as_deref() {
        Ok("kvm") => vec!["-accel", "kvm", "-cpu", "host"],
        Ok("tcg") | Err(_) => vec!["-accel", "tcg", "-cpu", "max"],
        Ok(other) => panic!("VMNB_ACCEL={other:?}: expected \"tcg\" or \"kvm\""),
    }
}

/// A hostname the guest can use: letters, digits and '-'.
fn hostname_of(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    if h.is_empty() { "vmnb".into() } else { h }
}

/// QEMU's argv (program first) without NICs: serial console to the prepared log file,
/// no display, no monitor, no default devices, power-off ends QEMU.
pub fn qemu_argv(spec: &VmSpec, prepared: &PreparedVm) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![qemu_binary()];
    let mut add = |a: &dyn AsRef<OsStr>| argv.push(a.as_ref().to_owned());
    for a in accel_args() {
        add(&a);
    }
    let append = format!(
        "console=ttyS0 quiet panic=-1 vmnb.hostname={} {}",
        hostname_of(&spec.name),
        spec.append
    );
    let mut console = OsString::from("file:");
    console.push(&prepared.console);
    for a in [
        OsStr::new("-smp"),
        OsStr::new("1"),
        OsStr::new("-m"),
        OsStr::new(&format!("{}M", spec.memory_mb)),
        OsStr::new("-nodefaults"),
        OsStr::new("-no-user-config"),
        OsStr::new("-display"),
        OsStr::new("none"),
        OsStr::new("-serial"),
        &console,
        OsStr::new("-no-reboot"),
        OsStr::new("-kernel"),
        prepared.kernel.as_os_str(),
        OsStr::new("-initrd"),
        prepared.initrd.as_os_str(),
        OsStr::new("-append"),
        OsStr::new(append.trim_end()),
    ] {
        add(&a);
    }
    argv
}

/// `-netdev tap,fd=... -device virtio-net-pci,mac=...` for each NIC. `romfile=` skips the
/// iPXE option ROM (the kernel is loaded directly; the ROM only costs boot time). No `vnet_hdr=on`:
/// QEMU 7.2 (Debian 12) rejects it together with `fd=` and instead probes the fd itself,
/// using the virtio-net header when the TAP was opened with IFF_VNET_HDR.
pub fn nic_argv(nics: &[Nic]) -> Vec<OsString> {
    let mut argv = Vec::new();
    for (i, nic) in nics.iter().enumerate() {
        argv.push("-netdev".into());
        argv.push(format!("tap,id=n{i},fd={}", nic.fd).into());
        argv.push("-device".into());
        argv.push(format!("virtio-net-pci,netdev=n{i},mac={},romfile=", nic.mac).into());
    }
    argv
}

/// The full QEMU command for `spec` (the NICs' fds must be arranged with [`pass_fds`]).
pub fn vm_command(spec: &VmSpec, prepared: &PreparedVm) -> Command {
    let mut argv = qemu_argv(spec, prepared);
    argv.extend(nic_argv(&spec.nics));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// The broker binary: $VMNB_BROKER, else the one cargo built for this test.
pub fn broker_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VMNB_BROKER") {
        return p.into();
    }
    match option_env!("CARGO_BIN_EXE_vmnet-broker") {
        Some(p) => p.into(),
        None => "vmnet-broker".into(),
    }
}

/// `vmnet-broker run --network N... -- scripts/qemu-from-env qemu ...`: the broker hands
/// QEMU one TAP per network as fd 3, 4, ... and qemu-from-env adds the matching NICs with
/// the MACs from VMNET_BROKER_NETWORKS. `spec.nics` is ignored.
pub fn broker_vm_command(
    broker: &Path,
    networks: &[&str],
    spec: &VmSpec,
    prepared: &PreparedVm,
) -> Command {
    let mut cmd = Command::new(broker);
    cmd.arg("run");
    for n in networks {
        cmd.arg("--network").arg(n);
    }
    cmd.arg("--")
        .arg(repo_root().join("scripts/qemu-from-env"))
        .args(qemu_argv(spec, prepared));
    cmd
}

/// Makes each `(fd, target)` appear as fd number `target` in the child (as the broker's
/// `run` does with TAPs). The fds must stay open until the command is spawned.
pub fn pass_fds(cmd: &mut Command, fds: &[(BorrowedFd<'_>, RawFd)]) {
    let pairs: Vec<(RawFd, RawFd)> = fds.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls
    // (fcntl, dup2) and allocates nothing: `pairs` is built before the fork and only read,
    // `moved` is on the stack, and last_os_error() does not allocate. (The assert! can
    // only fire for more than 16 fds, which no caller passes.)
    unsafe {
        cmd.pre_exec(move || {
            // First move every source above all targets, so that a source numbered like an
            // earlier target is not overwritten before it is used.
            let mut moved = [0 as RawFd; 16];
            assert!(pairs.len() <= moved.len());
            for (i, (src, _)) in pairs.iter().enumerate() {
                let fd = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 100);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                moved[i] = fd;
            }
            for (i, (_, target)) in pairs.iter().enumerate() {
                // dup2 clears FD_CLOEXEC on the target, so it survives exec.
                if libc::dup2(moved[i], *target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// What a guest printed.
#[derive(Debug, Clone, Default)]
pub struct VmOutput {
    pub console: String,
    /// From `VMNB-RESULT key=value` lines; a later value of a key replaces an earlier one.
    pub results: BTreeMap<String, String>,
    /// Leases from the `dhcp` helper's `VMNB-DHCP iface=... ip=...` lines, by interface.
    pub dhcp: BTreeMap<String, BTreeMap<String, String>>,
    /// `VMNB-DONE` was printed: the script ran to its end.
    pub completed: bool,
    /// The script's exit status (from `VMNB-DONE rc=N`).
    pub rc: Option<i32>,
    /// Guest uptime in seconds when the script started and when it was done.
    pub booted_at: Option<f64>,
    pub done_at: Option<f64>,
    /// Host-side: time from spawning QEMU until it exited or was killed.
    pub elapsed: Duration,
    /// QEMU was killed at the timeout.
    pub timed_out: bool,
    pub status: Option<ExitStatus>,
    /// What QEMU (or its wrapper) wrote on stderr.
    pub stderr: String,
}

impl VmOutput {
    /// A result, or a panic that shows the console (most assertions want exactly this).
    pub fn result(&self, key: &str) -> &str {
        match self.results.get(key) {
            Some(v) => v,
            None => panic!(
                "guest reported no result {key:?} (completed: {}, timed out: {})\n--- stderr ---\n{}--- console ---\n{}",
                self.completed, self.timed_out, self.stderr, self.console
            ),
        }
    }

    /// Panics with the console unless the script ran to its end with status 0.
    pub fn assert_success(&self) {
        assert!(
            self.completed && self.rc == Some(0),
            "guest script did not succeed (completed: {}, rc: {:?}, timed out: {}, qemu: {:?})\n--- stderr ---\n{}--- console ---\n{}",
            self.completed,
            self.rc,
            self.timed_out,
            self.status,
            self.stderr,
            self.console
        );
    }
}

fn kv_pairs(text: &str) -> BTreeMap<String, String> {
    text.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parses a console log. Markers are found anywhere in a line, since a kernel message may
/// have been printed on the same line before them.
pub fn parse_output(console: &str) -> VmOutput {
    let mut out = VmOutput {
        console: console.to_string(),
        ..Default::default()
    };
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if let Some((_, rest)) = line.split_once("VMNB-RESULT ") {
            if let Some((k, v)) = rest.split_once('=') {
                out.results.insert(k.trim().to_string(), v.to_string());
            }
        } else if let Some((_, rest)) = line.split_once("VMNB-DHCP ") {
            let kv = kv_pairs(rest);
            if let Some(iface) = kv.get("iface").cloned() {
                out.dhcp.insert(iface, kv);
            }
        } else if let Some((_, rest)) = line.split_once("VMNB-BOOTED") {
            out.booted_at = kv_pairs(rest).get("uptime").and_then(|v| v.parse().ok());
        } else if let Some((_, rest)) = line.split_once("VMNB-DONE") {
            let kv = kv_pairs(rest);
            out.completed = true;
            out.rc = kv.get("rc").and_then(|v| v.parse().ok());
            out.done_at = kv.get("uptime").and_then(|v| v.parse().ok());
        }
    }
    out
}

/// Spawns `cmd` (from [`vm_command`] or [`broker_vm_command`]) in its own process group,
/// waits until it exits or `timeout` passes (then kills the whole group, so a wrapper and
/// its QEMU both go), and parses the console log.
pub fn run_vm(mut cmd: Command, prepared: &PreparedVm, timeout: Duration) -> VmOutput {
    let stderr_path = prepared.dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("cannot create the stderr log");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    let pid = child.id() as libc::pid_t;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait().expect("waiting for QEMU failed") {
            Some(status) => break Some(status),
            None if start.elapsed() >= timeout => {
                timed_out = true;
                // SAFETY: kill(2) takes only integers and touches no memory of ours; the
                // group is the one we created for our child, not yet reaped.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                break child.wait().ok();
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let elapsed = start.elapsed();
    // A wrapper may have exited while QEMU still runs: make sure the group is gone.
    // SAFETY: kill(2) touches no memory of ours, so it is memory-safe whatever the pid;
    // the group leader is reaped, but the group id stays ours while members live, and
    // ESRCH when nothing is left is fine.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let console = std::fs::read(&prepared.console).unwrap_or_default();
    let mut out = parse_output(&String::from_utf8_lossy(&console));
    out.elapsed = elapsed;
    out.timed_out = timed_out;
    out.status = status;
    out.stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    out
}

/// Prepares and boots `spec` with plain QEMU, passing each NIC's TAP: `taps[i]` becomes fd
/// `spec.nics[i].fd` in QEMU.
pub fn boot(spec: &VmSpec, taps: &[BorrowedFd<'_>]) -> VmOutput {
    assert_eq!(taps.len(), spec.nics.len(), "one TAP per NIC");
    let prepared = prepare(spec);
    let mut cmd = vm_command(spec, &prepared);
    let pairs: Vec<_> = taps
        .iter()
        .zip(&spec.nics)
        .map(|(t, n)| (*t, n.fd))
        .collect();
    pass_fds(&mut cmd, &pairs);
    let out = run_vm(cmd, &prepared, spec.timeout);
    drop(prepared);
    out
}

/// A locally administered unicast MAC, unique per (process, n).
pub fn test_mac(n: u8) -> String {
    let [_, a, b, c] = std::process::id().to_be_bytes();
    vmnet_broker::mac::Mac::new([0x52, 0x54, a, b, c, n]).to_string()
}

/// Creates a TAP named `name` in namespace `ns` the way the broker does (IFF_TAP,
/// IFF_NO_PI, IFF_VNET_HDR) and returns its fd; the TAP goes away when the fd closes.
pub fn open_tap_in(ns: &Netns, name: &str) -> OwnedFd {
    ns.run(|| open_tap(name))
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens /dev/net/tun as a new TAP `name` in the calling thread's network namespace.
pub fn open_tap(name: &str) -> OwnedFd {
    assert!(name.len() < libc::IFNAMSIZ, "TAP name {name:?} too long");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap_or_else(|e| panic!("cannot open /dev/net/tun: {e}"));
    let fd = OwnedFd::from(file);
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq (40 bytes) through the pointer, and
    // `req` is a #[repr(C)] IfReq of exactly that size and layout, exclusively borrowed;
    // `fd` is open for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    fd
}
