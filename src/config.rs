//! Network definitions: the built-in `shared` and `host` networks and the drop-in JSON
//! files of the config directory (docs/configuration.md).
//!
//! One file per network, `<name>.json`. Files are parsed strictly (unknown fields are
//! errors) and read again each time a network is created, never while it is active.

use crate::mac::Mac;
use crate::protocol::validate_network_name;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tracing::warn;

pub const DEFAULT_CONFIG_DIR: &str = "/etc/vmnet-broker.d";
pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_PREFIX_LEN: u8 = 24;
pub const DEFAULT_LEASE_SECONDS: u32 = 3600;
/// The largest network file read. Real files are a few hundred bytes; the bound keeps a
/// stray 1 GB file from costing a gigabyte of memory and seconds of every client's time.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// At most this many entries in `allowed_users` and in `allowed_groups`: each name may
/// cost a user-database lookup per acquire.
pub const MAX_PRINCIPALS: usize = 1024;

/// The most endpoints one network can hold: a Linux bridge numbers its ports 1 to 1023
/// (`BR_MAX_PORTS` is 1024 and port 0 is reserved), and the 1024th TAP gets `EXFULL`.
/// The TAP limits below are checked against it.
pub const MAX_ENDPOINTS_PER_NETWORK: u32 = 1023;

/// Live TAPs one non-root uid may hold on one network, across all its connections.
/// A VM has one or a few NICs on a network, so 64 runs dozens of VMs per user, while
/// 16 users are needed to reach the non-root total below.
pub const DEFAULT_MAX_TAPS_PER_UID: u32 = 64;

/// Live TAPs all non-root users together may hold on one network. The rest of the
/// bridge's ports (64 of 1023) are root's reserve: however many users fill the network,
/// root can still attach.
pub const DEFAULT_MAX_NONROOT_TAPS: u32 = MAX_ENDPOINTS_PER_NETWORK - 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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

// Serialized (like `NetworkConfig`) into the broker's state file, not read from network files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub mac: Mac,
    pub ip: Ipv4Addr,
}

/// The only IPv6 prefix length accepted: SLAAC, which VMs use to number themselves in the
/// prefix, needs a /64 (RFC 4862 with the EUI-64 interface identifiers of RFC 4291).
pub const IPV6_PREFIX_LEN: u8 = 64;

/// The longest interface name: `IFNAMSIZ` (16 on Linux and macOS) less the NUL.
pub const MAX_INTERFACE_NAME: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One static port forward: traffic to `external_port` of the host (of `external_address`
/// only, when given) goes to `internal_address:internal_port` on the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    pub protocol: Protocol,
    pub external_port: u16,
    pub internal_address: IpAddr,
    pub internal_port: u16,
    pub external_address: Option<IpAddr>,
}

/// The default UDP port of VXLAN (IANA, RFC 7348).
pub const VXLAN_PORT: u16 = 4789;
/// The largest VXLAN network identifier: VNIs are 24 bits.
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// At most this many `vxlan.peers`: each is a forwarding entry every broadcast is copied to.
pub const MAX_VXLAN_PEERS: usize = 256;

/// A network carried across hosts over the kernel's VXLAN (`vxlan` in the file): the same
/// VNI and port on every host, each host with its own `local` address and the others as
/// `peers` (head-end replication) or one multicast `group` on the underlay device `dev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vxlan {
    pub vni: u32,
    /// This host's address on the underlay, the source of the encapsulated packets.
    pub local: IpAddr,
    /// The other hosts' `local` addresses: every broadcast and unknown unicast frame is
    /// copied to each of them.
    pub peers: Vec<IpAddr>,
    /// Instead of `peers`: the multicast group the hosts of the overlay join.
    pub group: Option<IpAddr>,
    /// The underlay interface (needed with `group`; with `peers` it pins the underlay).
    pub dev: Option<String>,
    pub port: u16,
}

/// `vni 42, port 4789, peers 192.0.2.2,192.0.2.3` or `vni 7, port 4789, group
/// 239.1.1.1 on eth0`: the overlay as `status`, `show` and `list` print it.
impl fmt::Display for Vxlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vni {}, port {}", self.vni, self.port)?;
        if let Some(group) = self.group {
            write!(f, ", group {group}")?;
        } else {
            let peers: Vec<String> = self.peers.iter().map(ToString::to_string).collect();
            write!(f, ", peers {}", peers.join(","))?;
        }
        if let Some(dev) = &self.dev {
            write!(f, " on {dev}")?;
        }
        Ok(())
    }
}

impl Vxlan {
    /// The bytes VXLAN adds to each frame on the underlay: outer IP, UDP (8), VXLAN (8)
    /// and the inner Ethernet header (14); 20 bytes of IPv4 or 40 of IPv6.
    pub fn overhead(&self) -> u32 {
        if self.local.is_ipv4() { 50 } else { 70 }
    }
}

/// A validated network definition. Serialized into the broker's state file (`state`), so
/// a restarted broker adopts a network with the definition it was created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Serve DNS on the gateway (`dns_proxy` in the file; `dns` is its deprecated alias).
    pub dns: bool,
    /// NAT of IPv4 to the outside (`shared` only; `false` in `host`, which never forwards).
    // The serde defaults of the fields below let a state file written before they existed
    // still be adopted: such a network was made with every one of them at its default.
    #[serde(default = "nat44_default")]
    pub nat44: bool,
    /// NAT of IPv6 to the outside, when the file says; `None` leaves the system's default.
    #[serde(default)]
    pub nat66: Option<bool>,
    /// Router Advertisements on the network, when the file says; `None` leaves the
    /// system's default.
    #[serde(default)]
    pub router_advertisement: Option<bool>,
    /// The network's IPv6 prefix (always a /64), when the file fixes it.
    #[serde(default)]
    pub ipv6_prefix: Option<Ipv6Net>,
    /// The host interface NAT leaves by, when the file names one.
    #[serde(default)]
    pub external_interface: Option<String>,
    #[serde(default)]
    pub port_forwarding_rules: Vec<PortForward>,
    /// The overlay that carries the network to other hosts, when the file asks for one.
    #[serde(default)]
    pub vxlan: Option<Vxlan>,
    /// `mtu` was written in the file. A network with an overlay otherwise takes the
    /// underlay's MTU less the encapsulation ([`Vxlan::overhead`]).
    #[serde(default)]
    pub mtu_from_file: bool,
    pub allow_spoofing: bool,
    pub isolation: bool,
    /// Live TAPs one non-root uid may hold on the network (root is not limited).
    pub max_taps_per_uid: u32,
    /// Live TAPs all non-root uids together may hold on the network; the rest of what
    /// the network can hold is root's.
    pub max_nonroot_taps: u32,
    /// Where the definition came from, for logs and `check-config`.
    pub source: Source,
    /// The subnets other definitions of the config directory fix, with their network's
    /// name. Filled by [`ConfigDir::load`] for a network with a dynamic subnet, which must
    /// avoid them: otherwise a dynamic network could take a fixed network's subnet and
    /// that network could then not be created at all.
    pub fixed_elsewhere: Vec<(String, Ipv4Net)>,
    /// What the file should change but still works (deprecated names), for the log and
    /// `check-config`.
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
            nat44: mode == Mode::Shared,
            nat66: None,
            router_advertisement: None,
            ipv6_prefix: None,
            external_interface: None,
            port_forwarding_rules: vec![],
            vxlan: None,
            mtu_from_file: false,
            allow_spoofing: false,
            isolation: false,
            max_taps_per_uid: DEFAULT_MAX_TAPS_PER_UID,
            max_nonroot_taps: DEFAULT_MAX_NONROOT_TAPS,
            source: Source::BuiltIn,
            fixed_elsewhere: vec![],
            warnings: vec![],
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

/// `nat44` of a state file written before the field existed: the backends read it only
/// for `shared` networks, which then always had NAT.
fn nat44_default() -> bool {
    true
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
///
/// `Display` (what clients are told) never quotes the file's content: a JSON error names
/// the line and column only, since serde's messages quote what they found (an unknown
/// field's name, a string of the wrong type). [`ConfigError::detail`] has the whole
/// story, for the broker's log and `check-config`, which only the administrator sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
    /// The full message when `message` had to leave something out (JSON errors).
    pub detail: Option<String>,
    /// The file exists but could not be read (permissions, too many open files): a
    /// problem of the host, not of the file's contents.
    pub unreadable: bool,
}

impl ConfigError {
    fn new(path: &Path, message: String) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            message,
            detail: None,
            unreadable: false,
        }
    }

    /// The whole reason, for the administrator: `path: message`, with serde's own
    /// wording for JSON errors.
    pub fn detail(&self) -> String {
        format!(
            "{}: {}",
            self.path.display(),
            self.detail.as_deref().unwrap_or(&self.message)
        )
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

/// A JSON error as clients see it: its kind and position, none of the input.
fn json_error(path: &Path, e: &serde_json::Error) -> ConfigError {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Syntax => "not valid JSON",
        Category::Eof => "JSON ends too early",
        Category::Data => "unknown field, or a value of the wrong type",
        Category::Io => "cannot be read",
    };
    let mut err = ConfigError::new(
        path,
        format!(
            "{what} at line {} column {} (`vmnet-broker check-config` shows the details)",
            e.line(),
            e.column()
        ),
    );
    err.detail = Some(e.to_string());
    err
}

/// A value from the file in a message: quoted, and cut short so a message never carries
/// more than a few dozen bytes of the file.
fn quoted(s: &str) -> String {
    const MAX: usize = 40;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
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
    /// Deprecated alias of `dns_proxy`.
    dns: Option<bool>,
    dns_proxy: Option<bool>,
    nat44: Option<bool>,
    nat66: Option<bool>,
    router_advertisement: Option<bool>,
    ipv6_prefix: Option<String>,
    ipv6_prefix_length: Option<u32>,
    external_interface: Option<String>,
    #[serde(default)]
    port_forwarding_rules: Vec<RawForward>,
    vxlan: Option<RawVxlan>,
    allow_spoofing: Option<bool>,
    isolation: Option<bool>,
    max_taps_per_uid: Option<u32>,
    max_nonroot_taps: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    start: String,
    end: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    protocol: Protocol,
    external_port: u32,
    internal_address: String,
    internal_port: u32,
    external_address: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVxlan {
    vni: u32,
    local: String,
    #[serde(default)]
    peers: Vec<String>,
    group: Option<String>,
    dev: Option<String>,
    port: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReservation {
    mac: String,
    ip: String,
}

/// Why one field of a network file is invalid: the message that becomes the file's
/// [`ConfigError`] (which adds the path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// `Invalid(format!(...))`.
macro_rules! invalid {
    ($($arg:tt)*) => { Invalid(format!($($arg)*)) };
}

fn parse_ip(field: &str, s: &str) -> Result<Ipv4Addr, Invalid> {
    s.parse()
        .map_err(|_| invalid!("{field}: {} is not an IPv4 address", quoted(s)))
}

/// Turns a dotted mask into a prefix length; only contiguous masks are accepted.
pub fn mask_to_prefix(mask: Ipv4Addr) -> Result<u8, Invalid> {
    let bits = u32::from(mask);
    let ones = bits.leading_ones();
    if bits.checked_shl(ones).unwrap_or(0) != 0 {
        return Err(invalid!("mask {mask} is not contiguous"));
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
    let err = |message: String| ConfigError::new(path, message);
    validate_network_name(name).map_err(|e| err(format!("file name: {e}")))?;
    let raw: RawFile = serde_json::from_str(text).map_err(|e| json_error(path, &e))?;
    let mut c = NetworkConfig::defaults(name, raw.mode.unwrap_or(Mode::Shared));
    c.source = Source::File(path.to_path_buf());
    c.description = raw.description;
    if let Some(mask) = &raw.mask {
        let mask = parse_ip("mask", mask).map_err(|e| err(e.0))?;
        let prefix = mask_to_prefix(mask).map_err(|e| err(e.0))?;
        if !(8..=30).contains(&prefix) {
            return Err(err(format!(
                "mask {mask} (/{prefix}) must be between /8 and /30: a network needs room for the gateway and at least one VM"
            )));
        }
        c.prefix_len = prefix;
    }
    if let Some(subnet) = &raw.subnet {
        let gw = parse_ip("subnet", subnet).map_err(|e| err(e.0))?;
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
        c.mtu_from_file = true;
    }
    for (field, list) in [
        ("allowed_users", &raw.allowed_users),
        ("allowed_groups", &raw.allowed_groups),
    ] {
        if list.len() > MAX_PRINCIPALS {
            return Err(err(format!(
                "{field} has {} entries, at most {MAX_PRINCIPALS} are allowed; use a group",
                list.len()
            )));
        }
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
    c.dns = match (raw.dns, raw.dns_proxy) {
        (Some(_), Some(_)) => {
            return Err(err(
                "dns and dns_proxy are both given: dns is the deprecated name of dns_proxy; keep only dns_proxy".into(),
            ));
        }
        (Some(dns), None) => {
            c.warnings.push(
                "dns is deprecated: it is the old name of dns_proxy (the name macOS's vmnet and the original broker use); rename it".into(),
            );
            dns
        }
        (None, dns_proxy) => dns_proxy.unwrap_or(true),
    };
    match (c.mode, raw.nat44) {
        (Mode::Host, Some(true)) => {
            return Err(err(
                "nat44 true needs mode \"shared\": a host network never forwards to the outside"
                    .into(),
            ));
        }
        (Mode::Shared, Some(nat)) => c.nat44 = nat,
        _ => {}
    }
    if c.mode == Mode::Host && raw.nat66 == Some(true) {
        return Err(err(
            "nat66 true needs mode \"shared\": a host network never forwards to the outside".into(),
        ));
    }
    c.nat66 = raw.nat66;
    c.router_advertisement = raw.router_advertisement;
    if let Some(name) = raw.external_interface {
        if c.mode == Mode::Host {
            return Err(err(
                "external_interface needs mode \"shared\": a host network has no way out".into(),
            ));
        }
        check_interface_name("external_interface", &name).map_err(|e| err(e.0))?;
        c.external_interface = Some(name);
    }
    match (&raw.ipv6_prefix, raw.ipv6_prefix_length) {
        (None, Some(_)) => {
            return Err(err(
                "ipv6_prefix_length needs ipv6_prefix: with a generated prefix the length is always 64".into(),
            ));
        }
        (Some(prefix), len) => {
            let len = len.unwrap_or(u32::from(IPV6_PREFIX_LEN));
            if len != u32::from(IPV6_PREFIX_LEN) {
                return Err(err(format!(
                    "ipv6_prefix_length {len} must be 64: VMs number themselves by SLAAC, which needs a /64"
                )));
            }
            let addr: Ipv6Addr = prefix.parse().map_err(|_| {
                err(format!(
                    "ipv6_prefix: {} is not an IPv6 address",
                    quoted(prefix)
                ))
            })?;
            let net = Ipv6Net::new(addr, IPV6_PREFIX_LEN).expect("64 is a valid length");
            if net.trunc().addr() != addr {
                return Err(err(format!(
                    "ipv6_prefix {addr} has bits set past /64; give the prefix itself, e.g. {}",
                    net.trunc().addr()
                )));
            }
            if addr.is_multicast()
                || addr.is_loopback()
                || addr.is_unspecified()
                || (addr.segments()[0] & 0xffc0) == 0xfe80
            {
                return Err(err(format!(
                    "ipv6_prefix {addr} is not a unicast prefix a network can use (multicast, loopback, link-local or unspecified)"
                )));
            }
            c.ipv6_prefix = Some(net);
        }
        (None, None) => {}
    }
    c.allow_spoofing = raw.allow_spoofing.unwrap_or(false);
    c.isolation = raw.isolation.unwrap_or(false);
    if let Some(n) = raw.max_taps_per_uid {
        if !(1..=MAX_ENDPOINTS_PER_NETWORK).contains(&n) {
            return Err(err(format!(
                "max_taps_per_uid {n} must be between 1 and {MAX_ENDPOINTS_PER_NETWORK} (the ports of a bridge)"
            )));
        }
        c.max_taps_per_uid = n;
    }
    if let Some(n) = raw.max_nonroot_taps {
        // Below the bridge's size, so at least one port is always root's.
        let most = MAX_ENDPOINTS_PER_NETWORK - 1;
        if n > most {
            return Err(err(format!(
                "max_nonroot_taps {n} must be at most {most}: the bridge has {MAX_ENDPOINTS_PER_NETWORK} ports and root keeps at least one"
            )));
        }
        c.max_nonroot_taps = n;
    }
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
        let start = parse_ip("dhcp_range.start", &r.start).map_err(|e| err(e.0))?;
        let end = parse_ip("dhcp_range.end", &r.end).map_err(|e| err(e.0))?;
        host_address(start, "dhcp_range")?;
        host_address(end, "dhcp_range")?;
        if start > end {
            return Err(err(format!("dhcp_range: start {start} is after end {end}")));
        }
        c.dhcp_range = Some(DhcpRange { start, end });
    }
    let raw_dhcp_range_given = c.dhcp_range.is_some();
    if let Some(net) = fixed {
        // Every host address but the gateway's: more reservations cannot all be distinct.
        let hosts = (1u64 << (32 - net.prefix_len())) - 3;
        if raw.dhcp_reservations.len() as u64 > hosts {
            return Err(err(format!(
                "dhcp_reservations has {} entries, more than the {hosts} addresses {net} has for VMs",
                raw.dhcp_reservations.len()
            )));
        }
    }
    let mut macs = BTreeSet::new();
    let mut ips = BTreeSet::new();
    for r in &raw.dhcp_reservations {
        if fixed.is_none() {
            return Err(needs_subnet("dhcp_reservations"));
        }
        let mac: Mac = r.mac.parse().map_err(|_| {
            err(format!(
                "dhcp_reservations: {} is not a MAC address",
                quoted(&r.mac)
            ))
        })?;
        let ip = parse_ip("dhcp_reservations", &r.ip).map_err(|e| err(e.0))?;
        host_address(ip, "dhcp_reservations")?;
        if Some(ip) == gateway {
            return Err(err(format!(
                "dhcp_reservations: {ip} is the gateway address"
            )));
        }
        if !macs.insert(mac) {
            return Err(err(format!(
                "dhcp_reservations: MAC {} is reserved twice",
                mac
            )));
        }
        if !ips.insert(ip) {
            return Err(err(format!("dhcp_reservations: {ip} is reserved twice")));
        }
        c.dhcp_reservations.push(Reservation { mac, ip });
    }
    if raw.port_forwarding_rules.len() > MAX_PORT_FORWARDS {
        return Err(err(format!(
            "port_forwarding_rules has {} entries, at most {MAX_PORT_FORWARDS} are allowed",
            raw.port_forwarding_rules.len()
        )));
    }
    for (i, r) in raw.port_forwarding_rules.iter().enumerate() {
        let rule = port_forward(&c, i, r).map_err(|e| err(e.0))?;
        // Two rules for one port of one address: the second could never receive anything.
        if let Some(other) = c.port_forwarding_rules.iter().find(|o| {
            o.protocol == rule.protocol
                && o.external_port == rule.external_port
                && (o.external_address.is_none()
                    || rule.external_address.is_none()
                    || o.external_address == rule.external_address)
        }) {
            return Err(err(format!(
                "port_forwarding_rules[{i}]: {} port {} is already forwarded (to {})",
                rule.protocol.as_str(),
                rule.external_port,
                other.internal_address
            )));
        }
        c.port_forwarding_rules.push(rule);
    }
    if let Some(raw) = &raw.vxlan {
        c.vxlan = Some(vxlan(&c, raw, raw_dhcp_range_given).map_err(|e| err(e.0))?);
    }
    Ok(c)
}

/// Validates the `vxlan` object against the network `c` defines so far.
fn vxlan(c: &NetworkConfig, r: &RawVxlan, dhcp_range_given: bool) -> Result<Vxlan, Invalid> {
    // Every host of the overlay shares one subnet, so it cannot be picked per host.
    if c.gateway.is_none() {
        return Err(invalid!(
            "vxlan needs a fixed \"subnet\": every host of the overlay shares one subnet, each with its own gateway address in it"
        ));
    }
    // Several DHCP servers share the link: each must hand out only its own addresses.
    if c.dhcp && !dhcp_range_given {
        return Err(invalid!(
            "vxlan with dhcp needs a \"dhcp_range\": each host's DHCP serves its own part of the subnet (distinct on every host), or set \"dhcp\": false on all hosts but one"
        ));
    }
    if r.vni > MAX_VNI {
        return Err(invalid!(
            "vxlan.vni {} must be between 0 and {MAX_VNI}",
            r.vni
        ));
    }
    let port = match r.port {
        None => VXLAN_PORT,
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid!("vxlan.port {p} must be between 1 and 65535"))?,
    };
    let ip = |field: &str, s: &str| -> Result<IpAddr, Invalid> {
        s.parse()
            .map_err(|_| invalid!("{field}: {} is not an IP address", quoted(s)))
    };
    let local = ip("vxlan.local", &r.local)?;
    if local.is_unspecified() || local.is_multicast() || local == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(invalid!(
            "vxlan.local {local} must be this host's unicast address on the underlay"
        ));
    }
    let family = |a: IpAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
    if r.peers.len() > MAX_VXLAN_PEERS {
        return Err(invalid!(
            "vxlan.peers has {} entries, at most {MAX_VXLAN_PEERS} are allowed; use a multicast group",
            r.peers.len()
        ));
    }
    let mut peers = Vec::new();
    for s in &r.peers {
        let peer = ip("vxlan.peers", s)?;
        if peer.is_ipv4() != local.is_ipv4() {
            return Err(invalid!(
                "vxlan.peers: {peer} is {} but vxlan.local {local} is {}: the underlay has one family",
                family(peer),
                family(local)
            ));
        }
        if peer.is_unspecified() || peer.is_multicast() {
            return Err(invalid!(
                "vxlan.peers: {peer} is not a unicast address (use vxlan.group for multicast)"
            ));
        }
        if peer == local {
            return Err(invalid!(
                "vxlan.peers: {peer} is vxlan.local; list only the other hosts"
            ));
        }
        if peers.contains(&peer) {
            return Err(invalid!("vxlan.peers: {peer} is listed twice"));
        }
        peers.push(peer);
    }
    let dev = match &r.dev {
        Some(d) => {
            check_interface_name("vxlan.dev", d)?;
            Some(d.clone())
        }
        None => None,
    };
    let group = match &r.group {
        None => None,
        Some(s) => {
            let group = ip("vxlan.group", s)?;
            if !group.is_multicast() {
                return Err(invalid!("vxlan.group {group} is not a multicast address"));
            }
            if group.is_ipv4() != local.is_ipv4() {
                return Err(invalid!(
                    "vxlan.group {group} is {} but vxlan.local {local} is {}",
                    family(group),
                    family(local)
                ));
            }
            if !peers.is_empty() {
                return Err(invalid!(
                    "vxlan.group and vxlan.peers are both given: use one (multicast or head-end replication)"
                ));
            }
            if dev.is_none() {
                return Err(invalid!(
                    "vxlan.group needs vxlan.dev: the underlay interface the group is joined on"
                ));
            }
            Some(group)
        }
    };
    if group.is_none() && peers.is_empty() {
        return Err(invalid!(
            "vxlan needs vxlan.peers (the other hosts' addresses) or vxlan.group (a multicast group with vxlan.dev)"
        ));
    }
    Ok(Vxlan {
        vni: r.vni,
        local,
        peers,
        group,
        dev,
        port,
    })
}

/// At most this many static port forwards per network: each is a firewall rule (or a
/// vmnet call) made at creation.
pub const MAX_PORT_FORWARDS: usize = 1024;

/// An interface name as both systems accept it: 1 to 15 bytes, none of `/`, `:`,
/// whitespace or control characters, and not `.` or `..`.
fn check_interface_name(field: &str, name: &str) -> Result<(), Invalid> {
    let bad = name.is_empty()
        || name.len() > MAX_INTERFACE_NAME
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|ch| ch == '/' || ch == ':' || ch.is_whitespace() || ch.is_control());
    if bad {
        return Err(invalid!(
            "{field}: {} is not an interface name (1 to {MAX_INTERFACE_NAME} bytes, no '/', ':' or spaces)",
            quoted(name)
        ));
    }
    Ok(())
}

/// Validates rule `i` of `port_forwarding_rules` against the network `c` defines so far
/// (its subnet and IPv6 prefix are already known).
fn port_forward(c: &NetworkConfig, i: usize, r: &RawForward) -> Result<PortForward, Invalid> {
    let field = format!("port_forwarding_rules[{i}]");
    let port = |name: &str, n: u32| -> Result<u16, Invalid> {
        u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid!("{field}: {name} {n} must be between 1 and 65535"))
    };
    let external_port = port("external_port", r.external_port)?;
    let internal_port = port("internal_port", r.internal_port)?;
    let internal_address: IpAddr = r.internal_address.parse().map_err(|_| {
        invalid!(
            "{field}: internal_address {} is not an IP address",
            quoted(&r.internal_address)
        )
    })?;
    match internal_address {
        IpAddr::V4(ip) => {
            let net = c.fixed_subnet().ok_or_else(|| {
                invalid!(
                    "{field}: an IPv4 internal_address needs a fixed \"subnet\": with a dynamic subnet the VM's address is not known in advance"
                )
            })?;
            if !net.contains(&ip) || ip == net.network() || ip == net.broadcast() {
                return Err(invalid!(
                    "{field}: internal_address {ip} is not a host address of {net}"
                ));
            }
            if Some(ip) == c.gateway {
                return Err(invalid!(
                    "{field}: internal_address {ip} is the gateway (the host itself), not a VM"
                ));
            }
        }
        IpAddr::V6(ip) => {
            let net = c.ipv6_prefix.ok_or_else(|| {
                invalid!(
                    "{field}: an IPv6 internal_address needs a fixed \"ipv6_prefix\": with a generated prefix the VM's address is not known in advance"
                )
            })?;
            if !net.contains(&ip) || ip == net.network() {
                return Err(invalid!(
                    "{field}: internal_address {ip} is not a host address of {net}"
                ));
            }
        }
    }
    let external_address = match &r.external_address {
        None => None,
        Some(s) => {
            let ip: IpAddr = s.parse().map_err(|_| {
                invalid!(
                    "{field}: external_address {} is not an IP address",
                    quoted(s)
                )
            })?;
            if ip.is_ipv4() != internal_address.is_ipv4() {
                return Err(invalid!(
                    "{field}: external_address {ip} and internal_address {internal_address} are of different IP versions"
                ));
            }
            if ip.is_multicast() || ip.is_unspecified() {
                return Err(invalid!(
                    "{field}: external_address {ip} is not a unicast address of the host (leave it out for every address)"
                ));
            }
            Some(ip)
        }
    };
    Ok(PortForward {
        protocol: r.protocol,
        external_port,
        internal_address,
        internal_port,
        external_address,
    })
}

/// Why a file is not read at all. Anything but `Io` is a verdict on the file (like an
/// invalid one); `Io` is the host failing us.
enum ReadRefusal {
    NotFound,
    Refused(String),
    Io(std::io::Error),
}

/// Whether `uid` may own a network file: root, or the broker's own user (a broker run
/// unprivileged, for development or tests, reads files it wrote itself).
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Reads one network file, refusing anything an administrator did not plainly put there:
///
/// - symbolic links are not followed (`O_NOFOLLOW`): a link can point anywhere, e.g. at a
///   secret the broker would then parse and talk about;
/// - only regular files: the open is non-blocking, so a FIFO cannot stall the broker, and
///   `fstat` on the opened file refuses FIFOs, devices and sockets before any read;
/// - owned by root (or the broker's own user) and not writable by group or others: the
///   file decides who may use a network, so only who could run the broker may write it;
/// - at most [`MAX_FILE_BYTES`]: at most that many bytes plus one are ever read, whatever
///   size the file claims.
fn read_network_file(path: &Path) -> Result<String, ReadRefusal> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadRefusal::NotFound),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ReadRefusal::Refused(
                "is a symbolic link; network files are read only as regular files in the config directory, links are not followed".into(),
            ));
        }
        // A socket in the directory.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(ReadRefusal::Refused("is not a regular file".into()));
        }
        Err(e) => return Err(ReadRefusal::Io(e)),
    };
    let meta = file.metadata().map_err(ReadRefusal::Io)?;
    // As before these checks: a directory in a file's place cannot be read at all.
    if meta.is_dir() {
        return Err(ReadRefusal::Io(std::io::Error::from_raw_os_error(
            libc::EISDIR,
        )));
    }
    if !meta.file_type().is_file() {
        return Err(ReadRefusal::Refused(
            "is not a regular file (a FIFO, device or socket is never read)".into(),
        ));
    }
    if !trusted_owner(meta.uid()) {
        return Err(ReadRefusal::Refused(format!(
            "is owned by uid {}; network files must belong to root",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(ReadRefusal::Refused(format!(
            "is writable by {} (mode {:04o}); network files must be writable by their owner only",
            if meta.mode() & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            meta.mode() & 0o7777
        )));
    }
    let too_big = || {
        ReadRefusal::Refused(format!(
            "is larger than {MAX_FILE_BYTES} bytes; network files are small"
        ))
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadRefusal::Io)?;
    // The file grew after fstat.
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes).map_err(|e| {
        ReadRefusal::Refused(format!(
            "is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Reads and parses one file; `Ok(None)` when it does not exist. Refusals and invalid
/// files are logged here with the whole reason, once per attempt.
fn load_file(name: &str, path: &Path) -> Result<Option<NetworkConfig>, ConfigError> {
    let result = read_and_parse(name, path);
    match &result {
        Err(e) => warn!("network file refused: {}", e.detail()),
        Ok(Some(c)) => {
            for w in &c.warnings {
                warn!("network file {}: {w}", path.display());
            }
        }
        Ok(None) => {}
    }
    result
}

fn read_and_parse(name: &str, path: &Path) -> Result<Option<NetworkConfig>, ConfigError> {
    match read_network_file(path) {
        Ok(text) => parse(name, path, &text).map(Some),
        Err(ReadRefusal::NotFound) => Ok(None),
        Err(ReadRefusal::Refused(why)) => Err(ConfigError::new(path, why)),
        Err(ReadRefusal::Io(e)) => Err(ConfigError {
            unreadable: true,
            ..ConfigError::new(path, format!("cannot read: {e}"))
        }),
    }
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
    /// the built-in, else `Ok(None)`. A definition with a dynamic subnet comes with the
    /// subnets the other files fix ([`NetworkConfig::fixed_elsewhere`]).
    pub fn load(&self, name: &str) -> Result<Option<NetworkConfig>, ConfigError> {
        let path = self.path.join(format!("{name}.json"));
        let mut config = match load_file(name, &path)? {
            Some(c) => c,
            None => match builtin(name) {
                Some(c) => c,
                None => return Ok(None),
            },
        };
        if config.gateway.is_none() {
            config.fixed_elsewhere = self
                .files()
                .unwrap_or_default()
                .into_iter()
                .filter(|(other, _)| other != name)
                .filter_map(|(other, path)| {
                    // Not logged: a bad file is reported when its own network is asked
                    // for, not at every creation of another one.
                    let subnet = read_and_parse(&other, &path).ok()??.fixed_subnet()?;
                    Some((other, subnet))
                })
                .collect();
        }
        Ok(Some(config))
    }

    /// The `*.json` files of the directory with their network names, in name order; empty
    /// when the directory does not exist.
    fn files(&self) -> Result<Vec<(String, PathBuf)>, ConfigError> {
        let entries: Vec<PathBuf> = match std::fs::read_dir(&self.path) {
            Ok(e) => e.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(ConfigError {
                    unreadable: true,
                    ..ConfigError::new(&self.path, format!("cannot read directory: {e}"))
                });
            }
        };
        let mut files: Vec<(String, PathBuf)> = entries
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| {
                let name = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, p)
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Every `*.json` file, parsed, in name order; plus the built-ins no file overrides.
    /// A missing directory is not an error: the built-ins are served.
    pub fn load_all(&self) -> Vec<Result<NetworkConfig, ConfigError>> {
        let mut out = Vec::new();
        let mut names = BTreeSet::new();
        let files = self.files().unwrap_or_else(|e| {
            out.push(Err(e));
            Vec::new()
        });
        for (name, path) in files {
            names.insert(name.clone());
            match load_file(&name, &path) {
                Ok(Some(c)) => out.push(Ok(c)),
                // Gone since the directory was listed.
                Ok(None) => {}
                Err(e) => out.push(Err(e)),
            }
        }
        for name in BUILTIN_NAMES {
            if !names.contains(name) {
                out.push(Ok(builtin(name).expect("built-in")));
            }
        }
        out
    }
}

/// Every pair of definitions whose fixed subnets, or fixed IPv6 prefixes, overlap, as an
/// error for each of the two files: two such networks could never both exist, and the
/// second to be created would fail with `CREATE_FAILURE` only when a VM needs it.
pub fn overlapping(configs: &[NetworkConfig]) -> Vec<ConfigError> {
    let mut out = overlapping4(configs);
    let fixed: Vec<(&NetworkConfig, Ipv6Net)> = configs
        .iter()
        .filter_map(|c| Some((c, c.ipv6_prefix?)))
        .collect();
    for (i, (a, pa)) in fixed.iter().enumerate() {
        for (b, pb) in &fixed[i + 1..] {
            if pa.contains(&pb.network()) || pb.contains(&pa.network()) {
                for (this, mine, other) in [(a, pa, b), (b, pb, a)] {
                    out.push(ConfigError::new(
                        &path_of(this),
                        format!(
                            "ipv6_prefix {mine} overlaps the ipv6_prefix of network {:?}; the two networks could never exist at the same time",
                            other.name
                        ),
                    ));
                }
            }
        }
    }
    out
}

fn path_of(c: &NetworkConfig) -> PathBuf {
    match &c.source {
        Source::File(p) => p.clone(),
        Source::BuiltIn => PathBuf::from(format!("built-in {}", c.name)),
    }
}

fn overlapping4(configs: &[NetworkConfig]) -> Vec<ConfigError> {
    let fixed: Vec<(&NetworkConfig, Ipv4Net)> = configs
        .iter()
        .filter_map(|c| Some((c, c.fixed_subnet()?)))
        .collect();
    let mut out = Vec::new();
    for (i, (a, na)) in fixed.iter().enumerate() {
        for (b, nb) in &fixed[i + 1..] {
            if na.contains(&nb.network()) || nb.contains(&na.network()) {
                for (this, mine, other, theirs) in [(a, na, b, nb), (b, nb, a, na)] {
                    let path = match &this.source {
                        Source::File(p) => p.clone(),
                        Source::BuiltIn => PathBuf::from(format!("built-in {}", this.name)),
                    };
                    out.push(ConfigError::new(
                        &path,
                        format!(
                            "subnet {mine} overlaps subnet {theirs} of network {:?}; the two networks could never exist at the same time",
                            other.name
                        ),
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<NetworkConfig, String> {
        parse("net", Path::new("/x/net.json"), text).map_err(|e| e.detail())
    }

    #[test]
    fn empty_file_is_a_shared_network_with_defaults() {
        let c = p("{}").unwrap();
        assert_eq!(c.mode, Mode::Shared);
        assert_eq!(c.prefix_len, 24);
        assert_eq!(c.mtu, 1500);
        assert!(c.dhcp && c.dns && !c.isolation && !c.allow_spoofing);
        assert_eq!(c.gateway, None);
        assert_eq!((c.max_taps_per_uid, c.max_nonroot_taps), (64, 959));
    }

    #[test]
    fn full_file() {
        let c = p(r#"{"description": "lab", "mode": "host", "subnet": "192.168.42.1",
            "mask": "255.255.255.240", "mtu": 9000, "allowed_users": ["alice", 1001],
            "allowed_groups": ["kvm"], "dhcp_range": {"start": "192.168.42.5", "end": "192.168.42.9"},
            "dhcp_reservations": [{"mac": "52:54:00:00:00:01", "ip": "192.168.42.10"}],
            "lease_time": 600, "dns": false, "isolation": true,
            "max_taps_per_uid": 8, "max_nonroot_taps": 0}"#)
        .unwrap();
        assert_eq!(c.mode, Mode::Host);
        assert_eq!(c.fixed_subnet().unwrap().to_string(), "192.168.42.0/28");
        assert_eq!(c.gateway, Some(Ipv4Addr::new(192, 168, 42, 1)));
        assert_eq!(c.mtu, 9000);
        assert_eq!(
            c.allowed_users,
            vec![Principal::Name("alice".into()), Principal::Id(1001)]
        );
        assert_eq!(
            c.dhcp_reservations[0].mac,
            Mac::new([0x52, 0x54, 0, 0, 0, 1])
        );
        assert!(!c.dns && c.isolation);
        assert_eq!((c.max_taps_per_uid, c.max_nonroot_taps), (8, 0));
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
            (r#"{"max_taps_per_uid": 0}"#, "between 1 and 1023"),
            (r#"{"max_taps_per_uid": 1024}"#, "between 1 and 1023"),
            (r#"{"max_taps_per_uid": -1}"#, "invalid value"),
            (r#"{"max_nonroot_taps": 1023}"#, "at most 1022"),
            (r#"{"max_nonroot_taps": 5000000000}"#, "invalid value"),
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
    fn the_originals_field_names() {
        let c = p(r#"{"mode": "shared", "subnet": "10.30.0.1", "ipv6_prefix": "fd12:3456:789a:1::",
            "ipv6_prefix_length": 64, "external_interface": "en0", "nat44": false, "nat66": false,
            "dhcp": true, "dns_proxy": false, "router_advertisement": false, "mtu": 1400,
            "port_forwarding_rules": [
              {"protocol": "tcp", "external_port": 2222, "internal_address": "10.30.0.5", "internal_port": 22},
              {"protocol": "udp", "external_port": 5353, "internal_address": "fd12:3456:789a:1::5",
               "internal_port": 53, "external_address": "2001:db8::1"}]}"#)
        .unwrap();
        assert_eq!(c.ipv6_prefix.unwrap().to_string(), "fd12:3456:789a:1::/64");
        assert_eq!(c.external_interface.as_deref(), Some("en0"));
        assert!(!c.nat44 && !c.dns && c.dhcp);
        assert_eq!(
            (c.nat66, c.router_advertisement),
            (Some(false), Some(false))
        );
        assert_eq!(
            c.port_forwarding_rules,
            vec![
                PortForward {
                    protocol: Protocol::Tcp,
                    external_port: 2222,
                    internal_address: "10.30.0.5".parse().unwrap(),
                    internal_port: 22,
                    external_address: None,
                },
                PortForward {
                    protocol: Protocol::Udp,
                    external_port: 5353,
                    internal_address: "fd12:3456:789a:1::5".parse().unwrap(),
                    internal_port: 53,
                    external_address: Some("2001:db8::1".parse().unwrap()),
                },
            ]
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // Left out: the system's defaults.
        let d = p("{}").unwrap();
        assert!(d.nat44 && d.dns);
        assert_eq!(
            (d.nat66, d.router_advertisement, d.ipv6_prefix),
            (None, None, None)
        );
        assert!(!p(r#"{"mode": "host"}"#).unwrap().nat44);
    }

    #[test]
    fn dns_is_a_deprecated_alias_of_dns_proxy() {
        let c = p(r#"{"dns": false}"#).unwrap();
        assert!(!c.dns);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].starts_with("dns is deprecated: it is the old name of dns_proxy"),
            "{:?}",
            c.warnings
        );
        assert!(p(r#"{"dns": true}"#).unwrap().dns);
        let c = p(r#"{"dns_proxy": false}"#).unwrap();
        assert!(!c.dns && c.warnings.is_empty());
        let e = p(r#"{"dns": true, "dns_proxy": true}"#).unwrap_err();
        assert!(e.contains("dns and dns_proxy are both given"), "{e}");
    }

    #[test]
    fn new_fields_reject_bad_values_with_clear_messages() {
        let fwd = |rule: &str| {
            format!(
                r#"{{"subnet": "10.0.0.1", "ipv6_prefix": "fd00:0:0:7::", "port_forwarding_rules": [{rule}]}}"#
            )
        };
        let cases = [
            (r#"{"nat44": "yes"}"#.to_string(), "invalid type"),
            (r#"{"mode": "host", "nat44": true}"#.into(), "nat44 true needs mode \"shared\""),
            (r#"{"mode": "host", "nat66": true}"#.into(), "nat66 true needs mode \"shared\""),
            (r#"{"router_advertisement": 1}"#.into(), "invalid type"),
            (r#"{"ipv6_prefix": "fd00::zz"}"#.into(), "not an IPv6 address"),
            (r#"{"ipv6_prefix": "10.0.0.0"}"#.into(), "not an IPv6 address"),
            (r#"{"ipv6_prefix": "fd00::", "ipv6_prefix_length": 48}"#.into(), "ipv6_prefix_length 48 must be 64"),
            (r#"{"ipv6_prefix_length": 64}"#.into(), "ipv6_prefix_length needs ipv6_prefix"),
            (r#"{"ipv6_prefix": "fd00:0:0:1::5"}"#.into(), "bits set past /64; give the prefix itself, e.g. fd00:0:0:1::"),
            (r#"{"ipv6_prefix": "ff02::"}"#.into(), "not a unicast prefix"),
            (r#"{"ipv6_prefix": "fe80::"}"#.into(), "not a unicast prefix"),
            (r#"{"external_interface": ""}"#.into(), "not an interface name"),
            (r#"{"external_interface": "a-very-long-interface"}"#.into(), "not an interface name"),
            (r#"{"external_interface": "en0/1"}"#.into(), "not an interface name"),
            (r#"{"external_interface": "en 0"}"#.into(), "not an interface name"),
            (r#"{"external_interface": ".."}"#.into(), "not an interface name"),
            (r#"{"mode": "host", "external_interface": "en0"}"#.into(), "needs mode \"shared\""),
            (fwd(r#"{"protocol": "sctp", "external_port": 1, "internal_address": "10.0.0.5", "internal_port": 1}"#), "unknown variant `sctp`"),
            (fwd(r#"{"protocol": "tcp", "external_port": 0, "internal_address": "10.0.0.5", "internal_port": 22}"#), "port_forwarding_rules[0]: external_port 0 must be between 1 and 65535"),
            (fwd(r#"{"protocol": "tcp", "external_port": 65536, "internal_address": "10.0.0.5", "internal_port": 22}"#), "external_port 65536 must be between 1 and 65535"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.5", "internal_port": 70000}"#), "internal_port 70000 must be between 1 and 65535"),
            (fwd(r#"{"protocol": "tcp", "external_port": -1, "internal_address": "10.0.0.5", "internal_port": 22}"#), "invalid value"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "vm1", "internal_port": 22}"#), "internal_address \"vm1\" is not an IP address"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.1.5", "internal_port": 22}"#), "internal_address 10.0.1.5 is not a host address of 10.0.0.0/24"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.255", "internal_port": 22}"#), "not a host address"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.1", "internal_port": 22}"#), "is the gateway"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "fd00:0:0:8::5", "internal_port": 22}"#), "not a host address of fd00:0:0:7::/64"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.5", "internal_port": 22, "external_address": "::1"}"#), "different IP versions"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.5", "internal_port": 22, "external_address": "0.0.0.0"}"#), "leave it out for every address"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.5", "internal_port": 22, "external_address": "x"}"#), "external_address \"x\" is not an IP address"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.5", "internal_port": 22, "bogus": 1}"#), "unknown field `bogus`"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.5"}"#), "missing field `internal_port`"),
            (fwd(r#"{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.5", "internal_port": 22},
                    {"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.6", "internal_port": 2222, "external_address": "192.0.2.1"}"#),
             "port_forwarding_rules[1]: tcp port 22 is already forwarded (to 10.0.0.5)"),
            (r#"{"port_forwarding_rules": [{"protocol": "tcp", "external_port": 22, "internal_address": "10.0.0.5", "internal_port": 22}]}"#.into(),
             "IPv4 internal_address needs a fixed \"subnet\""),
            (r#"{"port_forwarding_rules": [{"protocol": "tcp", "external_port": 22, "internal_address": "fd00::5", "internal_port": 22}]}"#.into(),
             "IPv6 internal_address needs a fixed \"ipv6_prefix\""),
        ];
        for (text, want) in &cases {
            let e = p(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e:?} lacks {want:?}");
        }
        // The same port on two protocols, or on two given addresses, is fine.
        p(&fwd(
            r#"{"protocol": "tcp", "external_port": 53, "internal_address": "10.0.0.5", "internal_port": 53},
               {"protocol": "udp", "external_port": 53, "internal_address": "10.0.0.5", "internal_port": 53},
               {"protocol": "tcp", "external_port": 80, "internal_address": "10.0.0.5", "internal_port": 80, "external_address": "192.0.2.1"},
               {"protocol": "tcp", "external_port": 80, "internal_address": "10.0.0.6", "internal_port": 80, "external_address": "192.0.2.2"}"#,
        ))
        .unwrap();
        // Bounded like the other lists.
        let rules: Vec<String> = (1..=MAX_PORT_FORWARDS + 1)
            .map(|port| format!(r#"{{"protocol": "tcp", "external_port": {port}, "internal_address": "10.0.0.5", "internal_port": 22}}"#))
            .collect();
        let e = p(&fwd(&rules.join(","))).unwrap_err();
        assert!(e.contains("at most 1024"), "{e}");
    }

    #[test]
    fn deprecations_are_logged_at_load_and_kept_for_check_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.json"), r#"{"dns": false}"#).unwrap();
        let c = ConfigDir::new(dir.path()).load("old").unwrap().unwrap();
        assert!(!c.dns);
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn state_files_keep_the_new_fields_and_older_ones_still_load() {
        let c = p(
            r#"{"subnet": "10.30.0.1", "ipv6_prefix": "fd00:30::", "nat66": false,
            "port_forwarding_rules": [{"protocol": "udp", "external_port": 53,
            "internal_address": "10.30.0.5", "internal_port": 53}], "dns": false}"#,
        )
        .unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            serde_json::from_value::<NetworkConfig>(json.clone()).unwrap(),
            c
        );
        // Written by a broker before these fields: the defaults they were made with.
        let mut old = json;
        for key in [
            "nat44",
            "nat66",
            "router_advertisement",
            "ipv6_prefix",
            "external_interface",
            "port_forwarding_rules",
            "warnings",
        ] {
            old.as_object_mut().unwrap().remove(key).unwrap();
        }
        let back: NetworkConfig = serde_json::from_value(old).unwrap();
        assert!(back.nat44 && back.port_forwarding_rules.is_empty());
        assert_eq!((back.nat66, back.ipv6_prefix), (None, None));
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

    #[test]
    fn clients_never_see_the_files_content() {
        let cases = [
            r#"{"ssh_private_key_sekrit": "x"}"#,
            r#"{"description": 7, "mode": "sekrit-mode"}"#,
            r#"{"mode": "sekrit"}"#,
            r#"{"mtu": "sekrit"}"#,
            r#"sekrit"#,
            r#"{"allowed_users": [{"sekrit": 1}]}"#,
        ];
        for text in cases {
            let e = parse("net", Path::new("/x/net.json"), text).unwrap_err();
            let shown = e.to_string();
            assert!(!shown.contains("sekrit"), "{text}: {shown}");
            assert!(shown.starts_with("/x/net.json: "), "{shown}");
            assert!(shown.contains("line 1 column"), "{shown}");
        }
        // The administrator still gets serde's words.
        let e = parse("net", Path::new("/x/net.json"), cases[0]).unwrap_err();
        assert!(
            e.detail()
                .contains("unknown field `ssh_private_key_sekrit`"),
            "{e:?}"
        );
        // Values our own checks quote are cut short.
        let long = "9".repeat(5000);
        let e = p(&format!(r#"{{"subnet": "{long}"}}"#)).unwrap_err();
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn list_fields_are_bounded() {
        let names: Vec<String> = (0..=MAX_PRINCIPALS).map(|i| format!("\"g{i}\"")).collect();
        let e = p(&format!(r#"{{"allowed_groups": [{}]}}"#, names.join(","))).unwrap_err();
        assert!(e.contains("at most 1024"), "{e}");
        let ok = &names[..MAX_PRINCIPALS];
        assert!(p(&format!(r#"{{"allowed_users": [{}]}}"#, ok.join(","))).is_ok());
        // A /30 has one address for VMs besides the gateway.
        let e = p(
            r#"{"subnet": "10.0.0.1", "mask": "255.255.255.252", "dhcp_reservations": [
            {"mac": "52:54:00:00:00:01", "ip": "10.0.0.2"},
            {"mac": "52:54:00:00:00:02", "ip": "10.0.0.2"}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("more than the 1 addresses"), "{e}");
    }

    fn refusal(dir: &Path, name: &str) -> ConfigError {
        let e = ConfigDir::new(dir).load(name).unwrap_err();
        assert!(!e.unreadable, "{e:?}");
        e
    }

    #[test]
    fn only_plain_regular_files_of_the_owner_are_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A FIFO nobody writes to: refused at once instead of blocking the open.
        nix::unistd::mkfifo(
            &d.join("fifo.json"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let e = refusal(d, "fifo");
        assert!(e.message.contains("not a regular file"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Too big, even though it is valid JSON.
        let big = format!(r#"{{"description": "{}"}}"#, "x".repeat(2 << 20));
        std::fs::write(d.join("big.json"), &big).unwrap();
        assert!(
            refusal(d, "big")
                .message
                .contains("larger than 1048576 bytes")
        );
        // Just under the limit is fine.
        let fits = format!(r#"{{"description": "{}"}}"#, "x".repeat((1 << 20) - 20));
        std::fs::write(d.join("fits.json"), &fits).unwrap();
        assert!(ConfigDir::new(d).load("fits").unwrap().is_some());
        // Writable by the group or by everyone.
        for (name, mode, who) in [("grp", 0o664, "its group"), ("all", 0o646, "everyone")] {
            let path = d.join(format!("{name}.json"));
            std::fs::write(&path, "{}").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = refusal(d, name);
            assert!(e.message.contains(&format!("writable by {who}")), "{e}");
        }
        // A symlink, even to a valid file next to it.
        std::os::unix::fs::symlink(d.join("fits.json"), d.join("link.json")).unwrap();
        assert!(refusal(d, "link").message.contains("symbolic link"));
        // Not UTF-8.
        std::fs::write(d.join("bin.json"), b"{\"description\": \"\xff\"}").unwrap();
        assert!(refusal(d, "bin").message.contains("not UTF-8"));
        // check-config sees the same verdicts.
        let all = ConfigDir::new(d).load_all();
        assert_eq!(all.iter().filter(|r| r.is_err()).count(), 6, "{all:?}");
    }

    #[test]
    fn files_of_other_owners_are_refused() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("theirs.json");
        std::fs::write(&path, "{}").unwrap();
        nix::unistd::chown(&path, Some(65534.into()), None).unwrap();
        let e = refusal(dir.path(), "theirs");
        assert!(e.message.contains("owned by uid 65534"), "{e}");
    }

    #[test]
    fn dynamic_networks_learn_the_subnets_other_files_fix() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("lab.json"), r#"{"subnet": "192.168.64.1"}"#).unwrap();
        std::fs::write(d.join("dyn.json"), r#"{"mode": "host"}"#).unwrap();
        std::fs::write(d.join("broken.json"), r#"{"subnet": 1}"#).unwrap();
        let cd = ConfigDir::new(d);
        let lab: Ipv4Net = "192.168.64.0/24".parse().unwrap();
        assert_eq!(
            cd.load("dyn").unwrap().unwrap().fixed_elsewhere,
            vec![("lab".to_string(), lab)]
        );
        assert_eq!(
            cd.load("shared").unwrap().unwrap().fixed_elsewhere,
            vec![("lab".to_string(), lab)]
        );
        assert!(cd.load("lab").unwrap().unwrap().fixed_elsewhere.is_empty());
    }

    #[test]
    fn overlapping_fixed_subnets_are_reported_for_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("a.json"),
            r#"{"subnet": "10.1.0.1", "mask": "255.255.0.0"}"#,
        )
        .unwrap();
        std::fs::write(d.join("b.json"), r#"{"subnet": "10.1.7.1"}"#).unwrap();
        std::fs::write(d.join("c.json"), r#"{"subnet": "10.2.7.1"}"#).unwrap();
        std::fs::write(d.join("dyn.json"), "{}").unwrap();
        let all: Vec<NetworkConfig> = ConfigDir::new(d)
            .load_all()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let errors = overlapping(&all);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].path, d.join("a.json"));
        assert!(
            errors[0]
                .message
                .contains("overlaps subnet 10.1.7.0/24 of network \"b\"")
        );
        assert_eq!(errors[1].path, d.join("b.json"));
        assert!(
            errors[1]
                .message
                .contains("overlaps subnet 10.1.0.0/16 of network \"a\"")
        );
    }

    #[test]
    fn overlapping_fixed_ipv6_prefixes_are_reported_for_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let file = |name: &str, subnet: &str, prefix: &str| {
            std::fs::write(
                d.join(name),
                format!(r#"{{"subnet": "{subnet}", "ipv6_prefix": "{prefix}"}}"#),
            )
            .unwrap()
        };
        file("a.json", "10.1.0.1", "fd31:0:0:1::");
        file("b.json", "10.2.0.1", "fd31:0:0:1::");
        file("c.json", "10.3.0.1", "fd31:0:0:2::");
        std::fs::write(d.join("dyn.json"), "{}").unwrap();
        let all: Vec<NetworkConfig> = ConfigDir::new(d)
            .load_all()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let errors = overlapping(&all);
        assert_eq!(errors.len(), 2, "{errors:?}");
        for (e, file, other) in [(&errors[0], "a.json", "b"), (&errors[1], "b.json", "a")] {
            assert_eq!(e.path, d.join(file));
            assert!(
                e.message.contains(&format!(
                    "ipv6_prefix fd31:0:0:1::/64 overlaps the ipv6_prefix of network \"{other}\""
                )),
                "{}",
                e.message
            );
        }
    }

    /// A vxlan network file with `extra` fields inside the `vxlan` object.
    fn vx(vxlan: &str, outer: &str) -> Result<NetworkConfig, String> {
        p(&format!(
            r#"{{"subnet":"10.90.0.1","mask":"255.255.255.0","dhcp_range":{{"start":"10.90.0.10","end":"10.90.0.99"}}{outer},"vxlan":{{{vxlan}}}}}"#
        ))
    }

    #[test]
    fn vxlan_with_peers_parses_with_defaults() {
        let c = vx(
            r#""vni":42,"local":"192.0.2.1","peers":["192.0.2.2","192.0.2.3"]"#,
            "",
        )
        .unwrap();
        let v = c.vxlan.unwrap();
        assert_eq!(v.vni, 42);
        assert_eq!(v.port, VXLAN_PORT);
        assert_eq!(v.peers.len(), 2);
        assert_eq!(v.overhead(), 50);
        assert!(!c.mtu_from_file);
        let c = vx(
            r#""vni":1,"local":"fd00::1","peers":["fd00::2"],"port":8472"#,
            r#","mtu":1400"#,
        )
        .unwrap();
        assert_eq!(c.vxlan.as_ref().unwrap().overhead(), 70);
        assert_eq!(c.vxlan.unwrap().port, 8472);
        assert!(c.mtu_from_file);
        let c = vx(
            r#""vni":7,"local":"192.0.2.1","group":"239.1.1.1","dev":"eth0""#,
            "",
        )
        .unwrap();
        assert_eq!(c.vxlan.unwrap().group, Some("239.1.1.1".parse().unwrap()));
    }

    #[test]
    fn vxlan_needs_a_fixed_subnet_and_a_dhcp_range() {
        let e = p(r#"{"vxlan":{"vni":1,"local":"192.0.2.1","peers":["192.0.2.2"]}}"#).unwrap_err();
        assert!(e.contains("vxlan needs a fixed \"subnet\""), "{e}");
        let e = p(
            r#"{"subnet":"10.90.0.1","vxlan":{"vni":1,"local":"192.0.2.1","peers":["192.0.2.2"]}}"#,
        )
        .unwrap_err();
        assert!(e.contains("needs a \"dhcp_range\""), "{e}");
        // Without DHCP no range is needed.
        p(r#"{"subnet":"10.90.0.2","dhcp":false,"vxlan":{"vni":1,"local":"192.0.2.1","peers":["192.0.2.2"]}}"#)
            .unwrap();
    }

    #[test]
    fn vxlan_errors_name_the_field() {
        for (vxlan, want) in [
            (
                r#""vni":16777216,"local":"192.0.2.1","peers":["192.0.2.2"]"#,
                "vxlan.vni 16777216",
            ),
            (
                r#""vni":1,"local":"nope","peers":["192.0.2.2"]"#,
                "vxlan.local: \"nope\" is not an IP",
            ),
            (
                r#""vni":1,"local":"0.0.0.0","peers":["192.0.2.2"]"#,
                "vxlan.local 0.0.0.0 must be",
            ),
            (
                r#""vni":1,"local":"192.0.2.1","peers":["fd00::2"]"#,
                "is IPv6 but vxlan.local",
            ),
            (
                r#""vni":1,"local":"192.0.2.1","peers":["192.0.2.1"]"#,
                "is vxlan.local",
            ),
            (
                r#""vni":1,"local":"192.0.2.1","peers":["192.0.2.2","192.0.2.2"]"#,
                "listed twice",
            ),
            (
                r#""vni":1,"local":"192.0.2.1","peers":["239.0.0.1"]"#,
                "not a unicast",
            ),
            (
                r#""vni":1,"local":"192.0.2.1","peers":["192.0.2.2"],"port":0"#,
                "vxlan.port 0",
            ),
            (
                r#""vni":1,"local":"192.0.2.1","peers":["192.0.2.2"],"port":70000"#,
                "vxlan.port 70000",
            ),
            (r#""vni":1,"local":"192.0.2.1""#, "needs vxlan.peers"),
            (
                r#""vni":1,"local":"192.0.2.1","group":"239.1.1.1""#,
                "needs vxlan.dev",
            ),
            (
                r#""vni":1,"local":"192.0.2.1","group":"192.0.2.9","dev":"eth0""#,
                "not a multicast",
            ),
            (
                r#""vni":1,"local":"192.0.2.1","group":"239.1.1.1","dev":"eth0","peers":["192.0.2.2"]"#,
                "both given",
            ),
            (
                r#""vni":1,"local":"192.0.2.1","group":"239.1.1.1","dev":"a/b""#,
                "vxlan.dev: \"a/b\" is not an interface name",
            ),
        ] {
            let e = vx(vxlan, "").unwrap_err();
            assert!(e.contains(want), "{vxlan}: {e}");
        }
        let e = vx(
            r#""vni":1,"local":"192.0.2.1","peers":["192.0.2.2"],"learning":true"#,
            "",
        )
        .unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn a_state_file_without_vxlan_still_reads() {
        let c = vx(r#""vni":5,"local":"192.0.2.1","peers":["192.0.2.2"]"#, "").unwrap();
        let mut json = serde_json::to_value(&c).unwrap();
        let back: NetworkConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, c);
        let obj = json.as_object_mut().unwrap();
        obj.remove("vxlan");
        obj.remove("mtu_from_file");
        let old: NetworkConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old.vxlan, None);
    }
}
