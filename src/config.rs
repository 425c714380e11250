//! Network definitions: the built-in `shared` and `host` networks and the drop-in JSON
//! files of the config directory (docs/configuration.md).
//!
//! One file per network, `<name>.json`. Files are parsed strictly (unknown fields are
//! errors) and read again each time a network is created, never while it is active.

use crate::protocol::validate_network_name;
use ipnet::Ipv4Net;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_DIR: &str = "/etc/vmnet-broker.d";
pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_PREFIX_LEN: u8 = 24;
pub const DEFAULT_LEASE_SECONDS: u32 = 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// NAT to the outside, DHCP and DNS.
    Shared,
    /// Host and VMs only: no NAT, no forwarding.
    Host,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Host => "host",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user or group named by name or by number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(untagged)]
pub enum Principal {
    Id(u32),
    Name(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Id(id) => write!(f, "{id}"),
            Principal::Name(n) => f.write_str(n),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
}

/// A validated network definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub name: String,
    pub description: Option<String>,
    pub mode: Mode,
    /// The gateway (host) address, when the file fixes it; otherwise the backend picks a
    /// free subnet of `prefix_len` bits.
    pub gateway: Option<Ipv4Addr>,
    pub prefix_len: u8,
    pub mtu: u32,
    pub allowed_users: Vec<Principal>,
    pub allowed_groups: Vec<Principal>,
    pub dhcp: bool,
    pub dhcp_range: Option<DhcpRange>,
    pub dhcp_reservations: Vec<Reservation>,
    pub lease_seconds: u32,
    pub dns: bool,
    pub allow_spoofing: bool,
    pub isolation: bool,
    /// Where the definition came from, for logs and `check-config`.
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    BuiltIn,
    File(PathBuf),
}

impl NetworkConfig {
    fn defaults(name: &str, mode: Mode) -> Self {
        NetworkConfig {
            name: name.to_string(),
            description: None,
            mode,
            gateway: None,
            prefix_len: DEFAULT_PREFIX_LEN,
            mtu: DEFAULT_MTU,
            allowed_users: vec![],
            allowed_groups: vec![],
            dhcp: true,
            dhcp_range: None,
            dhcp_reservations: vec![],
            lease_seconds: DEFAULT_LEASE_SECONDS,
            dns: true,
            allow_spoofing: false,
            isolation: false,
            source: Source::BuiltIn,
        }
    }

    /// The fixed subnet, when the file names one.
    pub fn fixed_subnet(&self) -> Option<Ipv4Net> {
        self.gateway.map(|gw| {
            Ipv4Net::new(gw, self.prefix_len)
                .expect("prefix validated")
                .trunc()
        })
    }
}

/// A stable 32-bit hash of a network name (FNV-1a), for identifiers derived from it (MACs,
/// interface names) that must come out the same on every run and platform, which std's
/// randomized hasher does not.
pub fn name_hash(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h
}

/// The networks served with no configuration at all.
pub fn builtin(name: &str) -> Option<NetworkConfig> {
    match name {
        "shared" => {
            let mut c = NetworkConfig::defaults(name, Mode::Shared);
            c.description = Some("NAT to the outside, DHCP and DNS".into());
            Some(c)
        }
        "host" => {
            let mut c = NetworkConfig::defaults(name, Mode::Host);
            c.description = Some("Host and VMs only, no NAT".into());
            Some(c)
        }
        _ => None,
    }
}

pub const BUILTIN_NAMES: [&str; 2] = ["shared", "host"];

/// Why a file was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
    /// The file exists but could not be read (permissions, too many open files): a
    /// problem of the host, not of the file's contents.
    pub unreadable: bool,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The file as written; validated into a [`NetworkConfig`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    description: Option<String>,
    mode: Option<Mode>,
    subnet: Option<String>,
    mask: Option<String>,
    mtu: Option<u32>,
    #[serde(default)]
    allowed_users: Vec<Principal>,
    #[serde(default)]
    allowed_groups: Vec<Principal>,
    dhcp: Option<bool>,
    dhcp_range: Option<RawRange>,
    #[serde(default)]
    dhcp_reservations: Vec<RawReservation>,
    lease_time: Option<u32>,
    dns: Option<bool>,
    allow_spoofing: Option<bool>,
    isolation: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    start: String,
    end: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReservation {
    mac: String,
    ip: String,
}

fn parse_ip(field: &str, s: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("{field}: {s:?} is not an IPv4 address"))
}

/// Parses "52:54:00:12:34:56" (or with '-') into bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address"));
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Turns a dotted mask into a prefix length; only contiguous masks are accepted.
pub fn mask_to_prefix(mask: Ipv4Addr) -> Result<u8, String> {
    let bits = u32::from(mask);
    let ones = bits.leading_ones();
    if bits.checked_shl(ones).unwrap_or(0) != 0 {
        return Err(format!("mask {mask} is not contiguous"));
    }
    Ok(ones as u8)
}

pub fn prefix_to_mask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0),
    )
}

/// Parses and validates one network file's text.
pub fn parse(name: &str, path: &Path, text: &str) -> Result<NetworkConfig, ConfigError> {
    let err = |message: String| ConfigError {
        path: path.to_path_buf(),
        message,
        unreadable: false,
    };
    validate_network_name(name).map_err(|e| err(format!("file name: {e}")))?;
    let raw: RawFile = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
    let mut c = NetworkConfig::defaults(name, raw.mode.unwrap_or(Mode::Shared));
    c.source = Source::File(path.to_path_buf());
    c.description = raw.description;
    if let Some(mask) = &raw.mask {
        let mask = parse_ip("mask", mask).map_err(err)?;
        let prefix = mask_to_prefix(mask).map_err(err)?;
        if !(8..=30).contains(&prefix) {
            return Err(err(format!(
                "mask {mask} (/{prefix}) must be between /8 and /30: a network needs room for the gateway and at least one VM"
            )));
        }
        c.prefix_len = prefix;
    }
    if let Some(subnet) = &raw.subnet {
        let gw = parse_ip("subnet", subnet).map_err(err)?;
        let net = Ipv4Net::new(gw, c.prefix_len)
            .expect("prefix checked")
            .trunc();
        if gw == net.network() || gw == net.broadcast() {
            return Err(err(format!(
                "subnet {gw} does not fit mask {}: it is the {} address of {net}; give the gateway address, e.g. {}",
                prefix_to_mask(c.prefix_len),
                if gw == net.network() {
                    "network"
                } else {
                    "broadcast"
                },
                Ipv4Addr::from(u32::from(net.network()) + 1)
            )));
        }
        if gw.is_loopback() || gw.is_multicast() || gw.is_broadcast() || gw.is_unspecified() {
            return Err(err(format!("subnet {gw} is not a usable unicast address")));
        }
        c.gateway = Some(gw);
    }
    if let Some(mtu) = raw.mtu {
        if !(576..=65520).contains(&mtu) {
            return Err(err(format!("mtu {mtu} must be between 576 and 65520")));
        }
        c.mtu = mtu;
    }
    c.allowed_users = raw.allowed_users;
    c.allowed_groups = raw.allowed_groups;
    for p in c.allowed_users.iter().chain(&c.allowed_groups) {
        if let Principal::Name(n) = p
            && n.is_empty()
        {
            return Err(err("allowed_users/allowed_groups: empty name".into()));
        }
    }
    c.dhcp = raw.dhcp.unwrap_or(true);
    c.dns = raw.dns.unwrap_or(true);
    c.allow_spoofing = raw.allow_spoofing.unwrap_or(false);
    c.isolation = raw.isolation.unwrap_or(false);
    if let Some(lease) = raw.lease_time {
        if lease < 60 {
            return Err(err(format!(
                "lease_time {lease} must be at least 60 seconds"
            )));
        }
        c.lease_seconds = lease;
    }
    // Ranges and reservations are absolute addresses, so they need a fixed subnet.
    let needs_subnet = |field: &str| {
        err(format!(
            "{field} needs a fixed \"subnet\": with a dynamic subnet the addresses are not known in advance"
        ))
    };
    let (fixed, gateway) = (c.fixed_subnet(), c.gateway);
    let host_address = |ip: Ipv4Addr, field: &str| -> Result<(), ConfigError> {
        let net = fixed.ok_or_else(|| needs_subnet(field))?;
        if !net.contains(&ip) || ip == net.network() || ip == net.broadcast() {
            return Err(err(format!("{field}: {ip} is not a host address of {net}")));
        }
        Ok(())
    };
    if let Some(r) = &raw.dhcp_range {
        if fixed.is_none() {
            return Err(needs_subnet("dhcp_range"));
        }
        let start = parse_ip("dhcp_range.start", &r.start).map_err(err)?;
        let end = parse_ip("dhcp_range.end", &r.end).map_err(err)?;
        host_address(start, "dhcp_range")?;
        host_address(end, "dhcp_range")?;
        if start > end {
            return Err(err(format!("dhcp_range: start {start} is after end {end}")));
        }
        c.dhcp_range = Some(DhcpRange { start, end });
    }
    let mut macs = BTreeSet::new();
    let mut ips = BTreeSet::new();
    for r in &raw.dhcp_reservations {
        if fixed.is_none() {
            return Err(needs_subnet("dhcp_reservations"));
        }
        let mac = parse_mac(&r.mac).map_err(|e| err(format!("dhcp_reservations: {e}")))?;
        let ip = parse_ip("dhcp_reservations", &r.ip).map_err(err)?;
        host_address(ip, "dhcp_reservations")?;
        if Some(ip) == gateway {
            return Err(err(format!(
                "dhcp_reservations: {ip} is the gateway address"
            )));
        }
        if !macs.insert(mac) {
            return Err(err(format!(
                "dhcp_reservations: MAC {} is reserved twice",
                r.mac
            )));
        }
        if !ips.insert(ip) {
            return Err(err(format!("dhcp_reservations: {ip} is reserved twice")));
        }
        c.dhcp_reservations.push(Reservation { mac, ip });
    }
    Ok(c)
}

/// The drop-in directory.
#[derive(Debug, Clone)]
pub struct ConfigDir {
    pub path: PathBuf,
}

impl ConfigDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The definition of `name`: its file if there is one (even when the file is invalid:
    /// an invalid file hides the built-in rather than silently falling back to it), else
    /// the built-in, else `Ok(None)`.
    pub fn load(&self, name: &str) -> Result<Option<NetworkConfig>, ConfigError> {
        let path = self.path.join(format!("{name}.json"));
        match std::fs::read_to_string(&path) {
            Ok(text) => parse(name, &path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(builtin(name)),
            Err(e) => Err(ConfigError {
                path,
                message: format!("cannot read: {e}"),
                unreadable: true,
            }),
        }
    }

    /// Every `*.json` file, parsed, in name order; plus the built-ins no file overrides.
    /// A missing directory is not an error: the built-ins are served.
    pub fn load_all(&self) -> Vec<Result<NetworkConfig, ConfigError>> {
        let mut out = Vec::new();
        let mut names = BTreeSet::new();
        let entries = match std::fs::read_dir(&self.path) {
            Ok(e) => e.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                out.push(Err(ConfigError {
                    path: self.path.clone(),
                    message: format!("cannot read directory: {e}"),
                    unreadable: true,
                }));
                Vec::new()
            }
        };
        let mut files: Vec<PathBuf> = entries
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for path in files {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            names.insert(name.clone());
            let result = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError {
                    path: path.clone(),
                    message: format!("cannot read: {e}"),
                    unreadable: true,
                })
                .and_then(|text| parse(&name, &path, &text));
            out.push(result);
        }
        for name in BUILTIN_NAMES {
            if !names.contains(name) {
                out.push(Ok(builtin(name).expect("built-in")));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<NetworkConfig, String> {
        parse("net", Path::new("/x/net.json"), text).map_err(|e| e.message)
    }

    #[test]
    fn empty_file_is_a_shared_network_with_defaults() {
        let c = p("{}").unwrap();
        assert_eq!(c.mode, Mode::Shared);
        assert_eq!(c.prefix_len, 24);
        assert_eq!(c.mtu, 1500);
        assert!(c.dhcp && c.dns && !c.isolation && !c.allow_spoofing);
        assert_eq!(c.gateway, None);
    }

    #[test]
    fn full_file() {
        let c = p(r#"{"description": "lab", "mode": "host", "subnet": "192.168.42.1",
            "mask": "255.255.255.240", "mtu": 9000, "allowed_users": ["alice", 1001],
            "allowed_groups": ["kvm"], "dhcp_range": {"start": "192.168.42.5", "end": "192.168.42.9"},
            "dhcp_reservations": [{"mac": "52:54:00:00:00:01", "ip": "192.168.42.10"}],
            "lease_time": 600, "dns": false, "isolation": true}"#)
        .unwrap();
        assert_eq!(c.mode, Mode::Host);
        assert_eq!(c.fixed_subnet().unwrap().to_string(), "192.168.42.0/28");
        assert_eq!(c.gateway, Some(Ipv4Addr::new(192, 168, 42, 1)));
        assert_eq!(c.mtu, 9000);
        assert_eq!(
            c.allowed_users,
            vec![Principal::Name("alice".into()), Principal::Id(1001)]
        );
        assert_eq!(c.dhcp_reservations[0].mac, [0x52, 0x54, 0, 0, 0, 1]);
        assert!(!c.dns && c.isolation);
    }

    #[test]
    fn rejects_bad_files_with_clear_messages() {
        let cases = [
            (r#"{"bogus": 1}"#, "unknown field `bogus`"),
            (r#"{"mode": "bridged"}"#, "unknown variant `bridged`"),
            (r#"{"subnet": "192.168.300.1"}"#, "not an IPv4 address"),
            (r#"{"mask": "255.0.255.0"}"#, "not contiguous"),
            (r#"{"mask": "255.255.255.254"}"#, "between /8 and /30"),
            (r#"{"subnet": "192.168.42.0"}"#, "network address"),
            (
                r#"{"subnet": "192.168.42.15", "mask": "255.255.255.240"}"#,
                "broadcast address",
            ),
            (r#"{"mtu": 20}"#, "mtu 20"),
            (
                r#"{"dhcp_range": {"start": "10.0.0.2", "end": "10.0.0.3"}}"#,
                "fixed \"subnet\"",
            ),
            (
                r#"{"subnet": "10.0.0.1", "dhcp_range": {"start": "10.0.0.9", "end": "10.0.0.3"}}"#,
                "after end",
            ),
            (
                r#"{"subnet": "10.0.0.1", "dhcp_reservations": [{"mac": "zz", "ip": "10.0.0.3"}]}"#,
                "not a MAC",
            ),
            (
                r#"{"subnet": "10.0.0.1", "dhcp_reservations": [{"mac": "52:54:00:00:00:01", "ip": "10.0.1.3"}]}"#,
                "not a host address",
            ),
            (
                r#"{"subnet": "10.0.0.1", "dhcp_reservations": [{"mac": "52:54:00:00:00:01", "ip": "10.0.0.1"}]}"#,
                "gateway",
            ),
            ("not json", "expected"),
            ("[]", "expected struct"),
        ];
        for (text, want) in cases {
            let e = p(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e:?} lacks {want:?}");
        }
    }

    #[test]
    fn mask_conversions() {
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 0)), Ok(24));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 240)), Ok(28));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(0, 0, 0, 0)), Ok(0));
        assert!(mask_to_prefix(Ipv4Addr::new(255, 255, 0, 255)).is_err());
        assert_eq!(prefix_to_mask(28), Ipv4Addr::new(255, 255, 255, 240));
        assert_eq!(prefix_to_mask(0), Ipv4Addr::new(0, 0, 0, 0));
    }

    #[test]
    fn directory_overrides_builtins_and_reports_invalid_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("host.json"),
            r#"{"mode": "host", "mtu": 1400}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("broken.json"), r#"{"mode": 1}"#).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let cd = ConfigDir::new(dir.path());
        assert_eq!(cd.load("host").unwrap().unwrap().mtu, 1400);
        assert_eq!(cd.load("shared").unwrap().unwrap().source, Source::BuiltIn);
        assert!(cd.load("broken").is_err());
        assert_eq!(cd.load("nothing").unwrap(), None);
        let all = cd.load_all();
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(all.iter().filter(|r| r.is_err()).count() == 1);
        let missing = ConfigDir::new(dir.path().join("absent"));
        assert_eq!(missing.load_all().len(), 2);
    }
}
