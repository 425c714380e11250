//! Small shared pieces: statistics, CPU accounting, child processes killed on drop, the
//! broker daemon in its own namespace, raw Ethernet/IPv4/UDP frames and a DHCP client.

use crate::netns::Netns;
use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmnet_broker_client::Client;

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile; NaN for no samples.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf(3) takes an integer, touches no memory of ours and has no
    // preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// User+system CPU seconds of this process (all threads).
pub fn cpu_self() -> f64 {
    // SAFETY: rusage is plain integers and timevals, for which all zeroes is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage(2) writes one rusage through the pointer, which points to `ru`,
    // exclusively borrowed for the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// User+system CPU seconds of another process (0 if it is gone).
pub fn cpu_of(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    ticks / clk_tck()
}

/// Machine-wide softirq CPU seconds so far (all CPUs, every process on the machine).
pub fn softirq_total() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let f: Vec<&str> = line.split_whitespace().collect();
    f.get(7).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0) / clk_tck()
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
pub fn rss_kib(pid: i32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A child process (in its own process group) killed with its group on drop.
pub struct Guarded {
    pub child: Child,
}

impl Guarded {
    pub fn spawn(mut cmd: Command, what: &str) -> Guarded {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Guarded { child }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) takes only integers and touches no memory of ours; the group
            // is our unreaped child's (try_wait just said it still runs).
            unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

pub const BROKER_BIN: &str = env!("CARGO_BIN_EXE_vmnet-broker");

/// The real daemon (the bench profile's optimized build) in a namespace of its own.
/// Field order matters for drop: the broker dies before its namespace is deleted.
pub struct BrokerProc {
    pub proc: Guarded,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub ns: Netns,
}

impl BrokerProc {
    /// `files`: (network name, JSON) config files. `nofile`: soft RLIMIT_NOFILE to start
    /// the daemon with (systemd's default is 1024), to see how it copes.
    pub fn start(tag: &str, files: &[(String, String)], nofile: Option<u64>) -> BrokerProc {
        Self::start_in(Netns::new(tag), files, nofile, &[])
    }

    /// [`BrokerProc::start`] in namespace `ns` (made by the caller, e.g. a host of an
    /// overlay), with `extra` arguments to `serve`.
    pub fn start_in(
        ns: Netns,
        files: &[(String, String)],
        nofile: Option<u64>,
        extra: &[&str],
    ) -> BrokerProc {
        let dir = tempfile::Builder::new().prefix("vmnbt-").tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir_all(&config).unwrap();
        for (name, text) in files {
            std::fs::write(config.join(format!("{name}.json")), text).unwrap();
        }
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
        let socket = dir.path().join("broker.sock");
        let log = std::fs::File::create(dir.path().join("broker.log")).unwrap();
        let mut cmd = Command::new("ip");
        // VMNB_BROKER measures another build of the daemon.
        let bin = std::env::var("VMNB_BROKER").unwrap_or_else(|_| BROKER_BIN.to_string());
        cmd.args(["netns", "exec", &ns.name, &bin, "serve", "--socket"])
            .arg(&socket)
            .arg("--config-dir")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--resolv-conf")
            .arg(&resolv)
            .args(["--idle-timeout", "600"])
            .args(if extra.contains(&"--log-level") {
                &[][..]
            } else {
                &["--log-level", "info"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure makes only async-signal-safe calls
            // (getrlimit, setrlimit, on an all-integer rlimit on its stack, for which all
            // zeroes is valid) and allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    let mut r: libc::rlimit = std::mem::zeroed();
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
                    r.rlim_cur = n.min(r.rlim_max);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &r);
                    Ok(())
                })
            };
        }
        let proc = Guarded::spawn(cmd, "vmnet-broker serve");
        let b = BrokerProc {
            proc,
            socket,
            dir,
            ns,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Client::connect(&b.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "broker did not start: {}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        b
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    /// `ip netns exec` execs the broker, so the child's pid is the daemon's.
    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Stops it with SIGTERM (every network removed) and waits. The broker ignores a
    /// SIGTERM while any client holds a network, and the bench's last clients may have
    /// closed an instant before without the broker having released them yet: so the
    /// signal is sent again every 100 ms rather than waiting out the deadline.
    pub fn stop(mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut next_signal = Instant::now();
        while Instant::now() < deadline {
            if Instant::now() >= next_signal {
                // SAFETY: kill(2) takes only integers and touches no memory of ours; the
                // pid is our child's, reaped only by the wait below.
                unsafe { libc::kill(self.pid(), libc::SIGTERM) };
                next_signal += Duration::from_millis(100);
            }
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: the broker did not stop within 20 s of SIGTERM");
    }

    pub fn link_count(&self) -> usize {
        let out = Command::new("ip")
            .args(["-n", &self.ns.name, "-br", "link"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    s.parse::<vmnet_broker_client::Mac>()
        .unwrap_or_else(|e| panic!("{e}"))
        .octets()
}

fn csum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame carrying IPv4/UDP, padded to `len` bytes (at least 60; no FCS).
#[allow(clippy::too_many_arguments)]
pub fn udp_frame(
    dst: [u8; 6],
    src: [u8; 6],
    sip: Ipv4Addr,
    dip: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
    len: usize,
) -> Vec<u8> {
    let udp_len = (8 + payload.len()).max(len.saturating_sub(34));
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend(dst);
    f.extend(src);
    f.extend([0x08, 0x00]);
    let mut ip = vec![
        0x45,
        0,
        (ip_len >> 8) as u8,
        ip_len as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    ip.extend(sip.octets());
    ip.extend(dip.octets());
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend(ip);
    f.extend(sport.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend((udp_len as u16).to_be_bytes());
    f.extend([0, 0]); // no UDP checksum (allowed for IPv4)
    f.extend(payload);
    f.resize(14 + ip_len, 0);
    f
}

pub const VNET_HDR: usize = 12;

/// Writes one frame into a TAP opened with IFF_VNET_HDR (12-byte header, all zero: no
/// offloads), as a VMM does.
pub fn tap_write(fd: BorrowedFd, frame: &[u8]) -> std::io::Result<()> {
    let mut buf = vec![0u8; VNET_HDR];
    buf.extend_from_slice(frame);
    let n = nix::unistd::write(fd, &buf)?;
    assert_eq!(n, buf.len());
    Ok(())
}

/// Reads one frame (without the vnet header), waiting up to `timeout`.
pub fn tap_read(fd: BorrowedFd, buf: &mut [u8], timeout: Duration) -> Option<usize> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) reads and writes exactly one pollfd (nfds = 1) through the pointer,
    // which points to `p`, exclusively borrowed for the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    if r <= 0 {
        return None;
    }
    let n = nix::unistd::read(fd, buf).ok()?;
    if n < VNET_HDR {
        return None;
    }
    buf.copy_within(VNET_HDR..n, 0);
    Some(n - VNET_HDR)
}

/// A DHCP message of `kind` from `mac`, broadcast in an Ethernet frame.
fn dhcp_frame(mac: [u8; 6], xid: u32, kind: MessageType, extra: Vec<DhcpOption>) -> Vec<u8> {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootRequest)
        .set_xid(xid)
        .set_flags(dhcproto::v4::Flags::default().set_broadcast())
        .set_chaddr(&mac);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in extra {
        m.opts_mut().insert(o);
    }
    let payload = m.to_vec().unwrap();
    udp_frame(
        [0xff; 6],
        mac,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        68,
        67,
        &payload,
        0,
    )
}

/// The DHCP reply with `xid` in an Ethernet frame, if it is one.
fn dhcp_reply(frame: &[u8], xid: u32) -> Option<Message> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let udp = 14 + ihl;
    if frame.get(udp + 2..udp + 4)? != [0, 68] {
        return None;
    }
    let m = Message::from_bytes(frame.get(udp + 8..)?).ok()?;
    (m.xid() == xid).then_some(m)
}

fn wait_reply(fd: BorrowedFd, xid: u32, want: MessageType, timeout: Duration) -> Option<Message> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(n) = tap_read(fd, &mut buf, left) else {
            continue;
        };
        if let Some(m) = dhcp_reply(&buf[..n], xid)
            && m.opts().msg_type() == Some(want)
        {
            return Some(m);
        }
    }
    None
}

/// Sends DISCOVER and times the OFFER. Returns (offered address, server id, time).
pub fn dhcp_discover(
    fd: BorrowedFd,
    mac: [u8; 6],
    xid: u32,
) -> Option<(Ipv4Addr, Ipv4Addr, Duration)> {
    for _ in 0..3 {
        let t = Instant::now();
        tap_write(fd, &dhcp_frame(mac, xid, MessageType::Discover, vec![])).ok()?;
        if let Some(m) = wait_reply(fd, xid, MessageType::Offer, Duration::from_secs(1)) {
            let dt = t.elapsed();
            let server = match m.opts().get(OptionCode::ServerIdentifier) {
                Some(DhcpOption::ServerIdentifier(s)) => *s,
                _ => m.siaddr(),
            };
            return Some((m.yiaddr(), server, dt));
        }
    }
    None
}

/// A full DORA exchange; returns the leased address.
pub fn dhcp_lease(fd: BorrowedFd, mac: [u8; 6], xid: u32) -> Option<Ipv4Addr> {
    let (ip, server, _) = dhcp_discover(fd, mac, xid)?;
    for _ in 0..3 {
        let req = dhcp_frame(
            mac,
            xid,
            MessageType::Request,
            vec![
                DhcpOption::RequestedIpAddress(ip),
                DhcpOption::ServerIdentifier(server),
            ],
        );
        tap_write(fd, &req).ok()?;
        if wait_reply(fd, xid, MessageType::Ack, Duration::from_secs(1)).is_some() {
            return Some(ip);
        }
    }
    None
}
