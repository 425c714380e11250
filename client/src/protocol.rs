//! The wire protocol between the broker and its clients (docs/protocol.md, version 1).
//!
//! One UTF-8 JSON object per SOCK_SEQPACKET message, at most [`MAX_MESSAGE`] bytes.
//! This module is pure: it turns bytes into requests and replies into bytes, and owns
//! the error codes shared with the original macOS broker and every client library.

pub use crate::mac::{Mac, MacParseError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// Version of the protocol described in docs/protocol.md.
pub const PROTOCOL_VERSION: u32 = 1;

/// Where the broker listens unless told otherwise (`--socket`, `VMNET_BROKER_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/vmnet-broker/vmnet-broker.sock";

/// Environment variable naming the socket for every client.
pub const SOCKET_ENV: &str = "VMNET_BROKER_SOCKET";

/// Largest message either side may send, in bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Status codes. The numbers are the original broker's and must never change:
/// clients in several languages compare against them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Client side only: the broker could not be reached or the connection broke.
    BrokerUnreachable,
    /// Client side only: the broker's reply was malformed.
    InvalidReply,
    NotAllowed,
    InvalidRequest,
    NotFound,
    CreateFailure,
    InternalError,
    /// A port forward's external port is taken (by another forward or a socket on the
    /// host). New in this broker; the original has no port forwards.
    PortInUse,
    /// A code this version does not know (a newer broker); kept so it can be reported.
    Unknown(i64),
}

impl ErrorCode {
    pub fn from_code(code: i64) -> Self {
        match code {
            1 => Self::BrokerUnreachable,
            2 => Self::InvalidReply,
            3 => Self::NotAllowed,
            4 => Self::InvalidRequest,
            5 => Self::NotFound,
            6 => Self::CreateFailure,
            7 => Self::InternalError,
            8 => Self::PortInUse,
            other => Self::Unknown(other),
        }
    }

    pub fn code(self) -> i64 {
        match self {
            Self::BrokerUnreachable => 1,
            Self::InvalidReply => 2,
            Self::NotAllowed => 3,
            Self::InvalidRequest => 4,
            Self::NotFound => 5,
            Self::CreateFailure => 6,
            Self::InternalError => 7,
            Self::PortInUse => 8,
            Self::Unknown(code) => code,
        }
    }

    /// The original client library's message for this code.
    pub fn strerror(self) -> &'static str {
        strerror(self.code())
    }
}

/// Message for any status number, including unknown ones ("(unknown status)").
pub fn strerror(code: i64) -> &'static str {
    match code {
        0 => "Success",
        1 => "Failed to communicate with the broker",
        2 => "Invalid reply from the broker",
        3 => "You are not allowed to create a network",
        4 => "Invalid broker request",
        5 => "Network name not found",
        6 => "Failed to create network",
        7 => "Internal or unknown error",
        8 => "Port already in use",
        _ => "(unknown status)",
    }
}

/// An error as it travels on the wire: a code and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError {
    pub code: ErrorCode,
    pub message: String,
}

impl BrokerError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error {}: {}", self.code.code(), self.message)
    }
}

impl std::error::Error for BrokerError {}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `mac` is optional: a launcher that wants its VM to keep the MAC (and so the DHCP
    /// lease) it had before asks for it; otherwise the broker suggests one.
    ///
    /// `persistent` asks for a TAP that outlives its fd and belongs to the caller's uid,
    /// for VMMs that open a TAP by name (firecracker); the broker deletes it when the
    /// caller's connection closes.
    Acquire {
        network_name: String,
        mac: Option<Mac>,
        persistent: bool,
    },
    Status,
    /// Every network the broker knows that the caller may use (docs/protocol.md, `list`).
    List,
    /// One network the caller may use, in detail (`show`).
    Show {
        network_name: String,
    },
    /// DHCP leases, of one network or of every network the caller may use (`leases`).
    Leases {
        network_name: Option<String>,
    },
    /// Forward the host's `external_port` to `internal_port` of the guest behind the
    /// caller's TAP `interface` on `network_name`, for as long as the connection and the
    /// TAP live (`forward`).
    Forward(ForwardSpec),
    /// The broker's counters and gauges as OpenMetrics text (`metrics`).
    Metrics,
}

/// What a `forward` request asks for, and what its reply confirms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardSpec {
    pub network_name: String,
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    pub external_port: u16,
    pub internal_port: u16,
    /// A TAP the caller acquired on `network_name` (an acquire reply's `interface`).
    pub interface: String,
}

/// The reply to `forward`: the forward as made, and the guest's address when the broker
/// knows it already (otherwise it follows the guest's DHCP lease when it comes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardInfo {
    #[serde(flatten)]
    pub spec: ForwardSpec,
    #[serde(default)]
    pub internal_address: Option<String>,
}

/// Longest interface name a `forward` may name (IFNAMSIZ less the NUL).
const MAX_INTERFACE: usize = 15;

/// Longest network name; it must fit a file name and an interface alias with room to spare.
pub const MAX_NETWORK_NAME: usize = 64;

/// Why a network name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkNameError {
    #[error("network_name is empty")]
    Empty,
    #[error("network_name is longer than {MAX_NETWORK_NAME} bytes")]
    TooLong,
    #[error(
        "network_name {0:?} may contain only ASCII letters, digits, '-', '_' and '.', and must start with a letter or digit"
    )]
    BadCharacters(String),
}

/// Network names are file stems in the config dir, so they are restricted to a safe set:
/// an ASCII letter or digit first, then letters, digits, `-`, `_` or `.`.
pub fn validate_network_name(name: &str) -> Result<(), NetworkNameError> {
    if name.is_empty() {
        return Err(NetworkNameError::Empty);
    }
    if name.len() > MAX_NETWORK_NAME {
        return Err(NetworkNameError::TooLong);
    }
    let mut chars = name.chars();
    let first = chars.next().unwrap_or(' ');
    if !first.is_ascii_alphanumeric()
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(NetworkNameError::BadCharacters(name.to_string()));
    }
    Ok(())
}

impl Request {
    /// Parses one message. Unknown extra fields are ignored so that newer clients can add
    /// optional fields; everything the broker needs is checked strictly.
    pub fn parse(bytes: &[u8]) -> Result<Self, BrokerError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(BrokerError::invalid(format!(
                "message is larger than {MAX_MESSAGE} bytes"
            )));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| BrokerError::invalid("message is not valid UTF-8"))?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| BrokerError::invalid(format!("message is not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(BrokerError::invalid("message is not a JSON object"));
        };
        let command = match obj.get("command") {
            None => return Err(BrokerError::invalid("missing \"command\"")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(BrokerError::invalid("\"command\" is not a string")),
        };
        match command {
            "acquire" => {
                let name = required_name(&obj)?;
                let mac = match obj.get("mac") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(parse_guest_mac(s)?),
                    Some(_) => return Err(BrokerError::invalid("\"mac\" is not a string")),
                };
                let persistent = match obj.get("persistent") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(BrokerError::invalid("\"persistent\" is not a boolean"));
                    }
                };
                Ok(Request::Acquire {
                    network_name: name,
                    mac,
                    persistent,
                })
            }
            "status" => Ok(Request::Status),
            "forward" => {
                let protocol = match obj.get("protocol") {
                    Some(Value::String(p)) if p == "tcp" || p == "udp" => p.clone(),
                    Some(_) => {
                        return Err(BrokerError::invalid(
                            "\"protocol\" must be \"tcp\" or \"udp\"",
                        ));
                    }
                    None => return Err(BrokerError::invalid("missing \"protocol\"")),
                };
                let port = |key: &str| match obj.get(key) {
                    Some(Value::Number(n)) => n
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|p| *p != 0)
                        .ok_or_else(|| {
                            BrokerError::invalid(format!(
                                "\"{key}\" must be a port number from 1 to 65535"
                            ))
                        }),
                    Some(_) => Err(BrokerError::invalid(format!("\"{key}\" is not a number"))),
                    None => Err(BrokerError::invalid(format!("missing \"{key}\""))),
                };
                let interface = match obj.get("interface") {
                    Some(Value::String(i))
                        if !i.is_empty()
                            && i.len() <= MAX_INTERFACE
                            && !i.contains(['/', '\0'])
                            && !i.chars().any(char::is_whitespace) =>
                    {
                        i.clone()
                    }
                    Some(_) => {
                        return Err(BrokerError::invalid(format!(
                            "\"interface\" must be an interface name of 1 to {MAX_INTERFACE} bytes"
                        )));
                    }
                    None => return Err(BrokerError::invalid("missing \"interface\"")),
                };
                Ok(Request::Forward(ForwardSpec {
                    network_name: required_name(&obj)?,
                    protocol,
                    external_port: port("external_port")?,
                    internal_port: port("internal_port")?,
                    interface,
                }))
            }
            "list" => Ok(Request::List),
            "metrics" => Ok(Request::Metrics),
            "show" => Ok(Request::Show {
                network_name: required_name(&obj)?,
            }),
            "leases" => Ok(Request::Leases {
                network_name: match obj.get("network_name") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(required_name(&obj)?),
                },
            }),
            other => Err(BrokerError::invalid(format!(
                "unknown command {:?}",
                truncate(other, 64)
            ))),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let v = match self {
            Request::Acquire {
                network_name,
                mac,
                persistent,
            } => {
                let mut v = serde_json::json!({"command": "acquire", "network_name": network_name});
                if let Some(mac) = mac {
                    v["mac"] = Value::String(mac.to_string());
                }
                if *persistent {
                    v["persistent"] = Value::Bool(true);
                }
                v
            }
            Request::Status => serde_json::json!({"command": "status"}),
            Request::Forward(f) => serde_json::json!({
                "command": "forward",
                "network_name": f.network_name,
                "protocol": f.protocol,
                "external_port": f.external_port,
                "internal_port": f.internal_port,
                "interface": f.interface,
            }),
            Request::List => serde_json::json!({"command": "list"}),
            Request::Metrics => serde_json::json!({"command": "metrics"}),
            Request::Show { network_name } => {
                serde_json::json!({"command": "show", "network_name": network_name})
            }
            Request::Leases { network_name } => {
                let mut v = serde_json::json!({"command": "leases"});
                if let Some(name) = network_name {
                    v["network_name"] = Value::String(name.clone());
                }
                v
            }
        };
        serde_json::to_vec(&v).expect("a JSON value always serializes")
    }
}

/// The request's `network_name`: present, a string, and a valid name.
fn required_name(obj: &Map<String, Value>) -> Result<String, BrokerError> {
    let name = match obj.get("network_name") {
        None => return Err(BrokerError::invalid("missing \"network_name\"")),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(BrokerError::invalid("\"network_name\" is not a string")),
    };
    validate_network_name(&name).map_err(|e| BrokerError::invalid(e.to_string()))?;
    Ok(name)
}

/// A MAC a guest may use: well-formed, unicast and not all zeros.
pub fn parse_guest_mac(s: &str) -> Result<Mac, BrokerError> {
    let mac: Mac = s
        .parse()
        .map_err(|e: MacParseError| BrokerError::invalid(e.to_string()))?;
    if !mac.is_unicast() {
        return Err(BrokerError::invalid(format!(
            "mac {s:?} is not a unicast address"
        )));
    }
    Ok(mac)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// What an acquire returns besides the TAP fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    pub mode: String,
    /// The network in CIDR notation, e.g. "192.168.64.0/24".
    pub subnet: String,
    pub gateway: String,
    pub mask: String,
    pub mtu: u32,
    pub bridge: String,
    /// The TAP interface handed out with this reply.
    pub interface: String,
    /// Suggested guest MAC address for this TAP: unique on the network, stable for the TAP.
    pub mac: String,
}

/// A network as `status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub name: String,
    pub mode: String,
    pub subnet: String,
    pub gateway: String,
    pub bridge: String,
    pub mtu: u32,
    /// Number of clients holding a reference.
    pub clients: usize,
    /// TAP interfaces currently attached to the network's bridge.
    pub taps: Vec<String>,
    /// The overlay that carries the network to other hosts (VXLAN device, VNI, peers),
    /// when it spans hosts.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub overlay: Option<String>,
    /// Seconds until the idle network is removed; absent while clients hold it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub removal_in_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientStatus {
    pub id: u64,
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub networks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub protocol: u32,
    pub pid: u32,
    pub idle_timeout_seconds: f64,
    pub networks: Vec<NetworkStatus>,
    pub clients: Vec<ClientStatus>,
    /// Set when lists were cut so that the reply fits in [`MAX_MESSAGE`] (thousands of
    /// clients); the per-network `clients` counts stay exact.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl Status {
    /// Cuts the client list, then the longest TAP lists, then the network list, until the
    /// `status` reply fits in `max` bytes; marks the result truncated if anything was cut.
    pub fn fit(mut self, max: usize) -> Status {
        let len = |s: &Status| {
            serde_json::to_vec(&serde_json::json!({ "status": s }))
                .map(|v| v.len())
                .unwrap_or(usize::MAX)
        };
        while len(&self) > max {
            self.truncated = true;
            if !self.clients.is_empty() {
                self.clients.truncate(self.clients.len() / 2);
            } else if let Some(n) = self
                .networks
                .iter_mut()
                .filter(|n| !n.taps.is_empty())
                .max_by_key(|n| n.taps.len())
            {
                n.taps.truncate(n.taps.len() / 2);
            } else if !self.networks.is_empty() {
                self.networks.truncate(self.networks.len() / 2);
            } else {
                break;
            }
        }
        self
    }
}

/// A network's state in `list` and `show`.
pub mod state {
    /// Defined (built in or by a file) but not created: no client has acquired it.
    pub const INACTIVE: &str = "inactive";
    /// Created and held by at least one client (or being acquired).
    pub const ACTIVE: &str = "active";
    /// Created, held by nobody, and removed after `removal_in_seconds`.
    pub const IDLE: &str = "idle";
    /// Being removed now.
    pub const REMOVING: &str = "removing";
}

/// One network in a `list` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkSummary {
    pub name: String,
    pub mode: String,
    /// The network's subnets in CIDR notation: the one it has while it exists, the one its
    /// file fixes while it does not; empty when it is picked at creation.
    pub subnets: Vec<String>,
    /// One of [`state`]: `inactive`, `active`, `idle` or `removing`.
    pub state: String,
    /// Seconds until an idle network is removed; absent unless `state` is `idle`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub removal_in_seconds: Option<f64>,
    /// Clients holding the network.
    pub clients: usize,
    /// TAPs (endpoints) open on the network.
    pub taps: usize,
    /// The overlay its definition carries it to other hosts by (VNI, peers), if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub overlay: Option<String>,
}

/// The reply to `list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkList {
    pub networks: Vec<NetworkSummary>,
    /// Set when the list was cut so that the reply fits in [`MAX_MESSAGE`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// One TAP of a network in a `show` reply, with the client that acquired it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapInfo {
    pub interface: String,
    /// The guest MAC it was handed out with.
    pub mac: Option<String>,
    /// The uid it was handed to.
    pub uid: Option<u32>,
    /// The connection that acquired it, while that connection is open (`null` once it
    /// closed and only the VM holds the TAP).
    pub client: Option<u64>,
    pub pid: Option<i32>,
}

/// The reply to `show`: one network in detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkDetail {
    pub name: String,
    pub mode: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub removal_in_seconds: Option<f64>,
    /// The effective configuration: the definition the network was created from while it
    /// exists, else its current definition (docs/protocol.md lists the keys).
    pub config: Map<String, Value>,
    /// Addresses, while the network exists (`null` otherwise).
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    pub mask: Option<String>,
    /// The network's IPv6 prefix (a /64; its `::1` is the gateway), while the network
    /// exists and when it has IPv6. Left out otherwise, so older readers see no change.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ipv6_prefix: Option<String>,
    pub mtu: u32,
    /// The host-side device (a bridge on Linux), while the network exists.
    pub bridge: Option<String>,
    /// Every platform detail of the network (`bridge` on Linux), while it exists.
    pub platform: BTreeMap<String, String>,
    pub clients: usize,
    /// Port forwards of the network (none yet; the field is there for them).
    pub forwards: Vec<Value>,
    pub taps: Vec<TapInfo>,
    /// Set when the TAP list was cut so that the reply fits in [`MAX_MESSAGE`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// One DHCP lease in a `leases` reply, with the TAP and client behind its MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub network: String,
    pub mac: String,
    pub ipv4: String,
    /// The guest's SLAAC address (EUI-64 of its MAC in the network's prefix), `null` on a
    /// network without IPv6.
    pub ipv6: Option<String>,
    pub hostname: Option<String>,
    /// When the lease expires, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// Seconds from the reply until then.
    pub expires_in_seconds: u64,
    /// The open TAP that was handed out with this MAC, if any.
    pub interface: Option<String>,
    pub uid: Option<u32>,
    pub client: Option<u64>,
    pub pid: Option<i32>,
}

/// The reply to `leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseList {
    pub leases: Vec<LeaseInfo>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Halves `items` until `len(items)` fits in `max` bytes; true if anything was cut.
fn cut_to_fit<T>(items: &mut Vec<T>, max: usize, len: impl Fn(&Vec<T>) -> usize) -> bool {
    let mut cut = false;
    while !items.is_empty() && len(items) > max {
        items.truncate(items.len() / 2);
        cut = true;
    }
    cut
}

impl NetworkList {
    /// Cuts the list so the `list` reply fits in `max` bytes.
    pub fn fit(mut self, max: usize) -> NetworkList {
        let cut = cut_to_fit(&mut self.networks, max, |n| {
            Reply::List(NetworkList {
                networks: n.clone(),
                truncated: true,
            })
            .to_bytes()
            .len()
        });
        self.truncated |= cut;
        self
    }
}

impl LeaseList {
    /// Cuts the list so the `leases` reply fits in `max` bytes.
    pub fn fit(mut self, max: usize) -> LeaseList {
        let cut = cut_to_fit(&mut self.leases, max, |l| {
            Reply::Leases(LeaseList {
                leases: l.clone(),
                truncated: true,
            })
            .to_bytes()
            .len()
        });
        self.truncated |= cut;
        self
    }
}

impl NetworkDetail {
    /// Cuts the TAP list so the `show` reply fits in `max` bytes.
    pub fn fit(mut self, max: usize) -> NetworkDetail {
        let mut taps = std::mem::take(&mut self.taps);
        let base = self.clone();
        let cut = cut_to_fit(&mut taps, max, |t| {
            Reply::Show(NetworkDetail {
                taps: t.clone(),
                truncated: true,
                ..base.clone()
            })
            .to_bytes()
            .len()
        });
        self.taps = taps;
        self.truncated |= cut;
        self
    }
}

/// A broker reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Network(NetworkInfo),
    Status(Status),
    List(NetworkList),
    Show(NetworkDetail),
    Leases(LeaseList),
    Forward(ForwardInfo),
    /// OpenMetrics text exposition, ending with `# EOF`.
    Metrics(String),
    Error(BrokerError),
}

impl Reply {
    pub fn to_bytes(&self) -> Vec<u8> {
        let v = match self {
            Reply::Network(n) => serde_json::json!({ "network": n }),
            Reply::Status(s) => serde_json::json!({ "status": s }),
            Reply::List(l) => serde_json::json!({ "list": l }),
            Reply::Show(d) => serde_json::json!({ "show": d }),
            Reply::Leases(l) => serde_json::json!({ "leases": l }),
            Reply::Forward(f) => serde_json::json!({ "forward": f }),
            Reply::Metrics(m) => serde_json::json!({ "metrics": m }),
            Reply::Error(e) => serde_json::json!({"error": e.code.code(), "message": e.message}),
        };
        serde_json::to_vec(&v).expect("a JSON value always serializes")
    }

    /// Parses a broker reply on the client side. A reply that is not one of the three
    /// shapes is an [`ErrorCode::InvalidReply`].
    pub fn parse(bytes: &[u8]) -> Result<Self, BrokerError> {
        let bad = |why: String| BrokerError::new(ErrorCode::InvalidReply, why);
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("reply is not valid JSON: {e}")))?;
        let Value::Object(mut obj) = value else {
            return Err(bad("reply is not a JSON object".into()));
        };
        if let Some(code) = obj.get("error") {
            let code = code
                .as_i64()
                .ok_or_else(|| bad("\"error\" is not an integer".into()))?;
            let message = message_of(&obj).unwrap_or_else(|| strerror(code).to_string());
            let code = ErrorCode::from_code(code);
            return Ok(Reply::Error(BrokerError { code, message }));
        }
        if let Some(n) = obj.remove("network") {
            return serde_json::from_value(n)
                .map(Reply::Network)
                .map_err(|e| bad(format!("malformed \"network\": {e}")));
        }
        if let Some(s) = obj.remove("status") {
            return serde_json::from_value(s)
                .map(Reply::Status)
                .map_err(|e| bad(format!("malformed \"status\": {e}")));
        }
        if let Some(l) = obj.remove("list") {
            return serde_json::from_value(l)
                .map(Reply::List)
                .map_err(|e| bad(format!("malformed \"list\": {e}")));
        }
        if let Some(d) = obj.remove("show") {
            return serde_json::from_value(d)
                .map(Reply::Show)
                .map_err(|e| bad(format!("malformed \"show\": {e}")));
        }
        if let Some(l) = obj.remove("leases") {
            return serde_json::from_value(l)
                .map(Reply::Leases)
                .map_err(|e| bad(format!("malformed \"leases\": {e}")));
        }
        if let Some(f) = obj.remove("forward") {
            return serde_json::from_value(f)
                .map(Reply::Forward)
                .map_err(|e| bad(format!("malformed \"forward\": {e}")));
        }
        if let Some(m) = obj.remove("metrics") {
            return match m {
                Value::String(text) => Ok(Reply::Metrics(text)),
                _ => Err(bad("\"metrics\" is not a string".into())),
            };
        }
        Err(bad(
            "reply has none of \"network\", \"status\", \"list\", \"show\", \"leases\", \"forward\", \"metrics\" or \"error\"".into(),
        ))
    }
}

fn message_of(obj: &Map<String, Value>) -> Option<String> {
    obj.get("message")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(bytes: &[u8]) -> ErrorCode {
        Request::parse(bytes).unwrap_err().code
    }

    #[test]
    fn parses_acquire_and_status() {
        assert_eq!(
            Request::parse(br#"{"command":"acquire","network_name":"shared"}"#).unwrap(),
            Request::Acquire {
                network_name: "shared".into(),
                mac: None,
                persistent: false,
            }
        );
        assert_eq!(
            Request::parse(
                br#"{"command":"acquire","network_name":"a","mac":"52:54:00:AB:cd:01"}"#
            )
            .unwrap(),
            Request::Acquire {
                network_name: "a".into(),
                mac: Some(Mac::new([0x52, 0x54, 0, 0xab, 0xcd, 1])),
                persistent: false,
            }
        );
        assert_eq!(
            Request::parse(br#"{"command":"status","extra":1}"#).unwrap(),
            Request::Status
        );
    }

    #[test]
    fn parses_and_writes_the_inspection_requests() {
        for (bytes, want) in [
            (&br#"{"command":"list"}"#[..], Request::List),
            (
                br#"{"command":"show","network_name":"lab"}"#,
                Request::Show {
                    network_name: "lab".into(),
                },
            ),
            (
                br#"{"command":"leases"}"#,
                Request::Leases { network_name: None },
            ),
            (
                br#"{"command":"leases","network_name":"shared"}"#,
                Request::Leases {
                    network_name: Some("shared".into()),
                },
            ),
        ] {
            assert_eq!(Request::parse(bytes).unwrap(), want);
            assert_eq!(want.to_bytes(), bytes, "canonical bytes");
        }
        assert_eq!(
            Request::parse(br#"{"command":"leases","network_name":null}"#).unwrap(),
            Request::Leases { network_name: None }
        );
    }

    fn lease(i: usize) -> LeaseInfo {
        LeaseInfo {
            network: "shared".into(),
            mac: "52:54:00:00:00:01".into(),
            ipv4: format!("10.0.{}.{}", i / 250, i % 250),
            ipv6: None,
            hostname: Some(format!("vm{i}")),
            expires_at: 2_000_000_000,
            expires_in_seconds: 3600,
            interface: Some(format!("vmnt9-{i:x}")),
            uid: Some(1000),
            client: Some(i as u64),
            pid: Some(4000),
        }
    }

    #[test]
    fn inspection_replies_round_trip_and_fit_a_message() {
        let list = Reply::List(NetworkList {
            networks: vec![NetworkSummary {
                name: "shared".into(),
                mode: "shared".into(),
                subnets: vec!["192.168.64.0/24".into()],
                state: state::IDLE.into(),
                removal_in_seconds: Some(97.5),
                clients: 0,
                taps: 1,
                overlay: None,
            }],
            truncated: false,
        });
        assert_eq!(Reply::parse(&list.to_bytes()).unwrap(), list);
        let show = Reply::Show(NetworkDetail {
            name: "lab".into(),
            mode: "host".into(),
            state: state::ACTIVE.into(),
            removal_in_seconds: None,
            config: serde_json::json!({"mtu": 1500})
                .as_object()
                .unwrap()
                .clone(),
            subnet: Some("10.0.0.0/24".into()),
            gateway: Some("10.0.0.1".into()),
            mask: Some("255.255.255.0".into()),
            ipv6_prefix: Some("fd00:1::/64".into()),
            mtu: 1500,
            bridge: Some("vmnb-lab".into()),
            platform: [("bridge".to_string(), "vmnb-lab".to_string())].into(),
            clients: 1,
            forwards: vec![],
            taps: (0..3000)
                .map(|i| TapInfo {
                    interface: format!("vmnt9-{i:x}"),
                    mac: Some("52:54:00:00:00:01".into()),
                    uid: Some(1000),
                    client: None,
                    pid: None,
                })
                .collect(),
            truncated: false,
        });
        assert_eq!(Reply::parse(&show.to_bytes()).unwrap(), show);
        let Reply::Show(detail) = show else { panic!() };
        let cut = detail.clone().fit(MAX_MESSAGE);
        assert!(Reply::Show(cut.clone()).to_bytes().len() <= MAX_MESSAGE);
        assert!(!cut.taps.is_empty() && cut.taps.len() < detail.taps.len());
        assert!(cut.truncated);
        let leases = LeaseList {
            leases: (0..2000).map(lease).collect(),
            truncated: false,
        };
        let small = leases.clone().fit(MAX_MESSAGE);
        assert!(small.truncated && !small.leases.is_empty());
        assert!(Reply::Leases(small.clone()).to_bytes().len() <= MAX_MESSAGE);
        assert_eq!(
            Reply::parse(&Reply::Leases(small.clone()).to_bytes()).unwrap(),
            Reply::Leases(small)
        );
        let few = LeaseList {
            leases: vec![lease(1)],
            truncated: false,
        };
        assert_eq!(few.clone().fit(MAX_MESSAGE), few);
    }

    #[test]
    fn every_bad_request_is_invalid_request() {
        for bad in [
            &b"not json"[..],
            b"\xff\xfe",
            b"[1,2]",
            b"\"acquire\"",
            b"{}",
            br#"{"command":7}"#,
            br#"{"command":"release"}"#,
            br#"{"command":"acquire"}"#,
            br#"{"command":"acquire","network_name":3}"#,
            br#"{"command":"acquire","network_name":""}"#,
            br#"{"command":"acquire","network_name":"../etc/passwd"}"#,
            br#"{"command":"acquire","network_name":"a b"}"#,
            br#"{"command":"acquire","network_name":"a","mac":"01:00:5e:00:00:01"}"#,
            br#"{"command":"acquire","network_name":"a","mac":"00:00:00:00:00:00"}"#,
            br#"{"command":"acquire","network_name":"a","mac":"52:54"}"#,
            br#"{"command":"acquire","network_name":"a","mac":5}"#,
            br#"{"command":"acquire","network_name":"a","persistent":"yes"}"#,
            br#"{"command":"show"}"#,
            br#"{"command":"show","network_name":"../x"}"#,
            br#"{"command":"leases","network_name":7}"#,
            br#"{"command":"leases","network_name":""}"#,
        ] {
            assert_eq!(
                code(bad),
                ErrorCode::InvalidRequest,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = vec![b' '; MAX_MESSAGE + 1];
        assert_eq!(code(&big), ErrorCode::InvalidRequest);
    }

    #[test]
    fn name_rules() {
        assert!(validate_network_name("shared").is_ok());
        assert!(validate_network_name("lab-1.net_2").is_ok());
        assert!(validate_network_name(".hidden").is_err());
        assert!(validate_network_name(&"a".repeat(MAX_NETWORK_NAME)).is_ok());
        assert_eq!(
            validate_network_name(&"a".repeat(MAX_NETWORK_NAME + 1)),
            Err(NetworkNameError::TooLong)
        );
        assert_eq!(validate_network_name(""), Err(NetworkNameError::Empty));
        assert_eq!(
            validate_network_name("a/b"),
            Err(NetworkNameError::BadCharacters("a/b".into()))
        );
    }

    #[test]
    fn strerror_matches_original_and_keeps_unknown_codes() {
        assert_eq!(ErrorCode::NotFound.strerror(), "Network name not found");
        assert_eq!(
            ErrorCode::InvalidRequest.strerror(),
            "Invalid broker request"
        );
        assert_eq!(
            ErrorCode::NotAllowed.strerror(),
            "You are not allowed to create a network"
        );
        assert_eq!(
            ErrorCode::CreateFailure.strerror(),
            "Failed to create network"
        );
        assert_eq!(
            ErrorCode::InternalError.strerror(),
            "Internal or unknown error"
        );
        assert_eq!(strerror(42), "(unknown status)");
        assert_eq!(strerror(-1), "(unknown status)");
        for c in 1..=9 {
            assert_eq!(ErrorCode::from_code(c).code(), c);
        }
        assert_eq!(ErrorCode::from_code(8), ErrorCode::PortInUse);
        assert_eq!(ErrorCode::PortInUse.strerror(), "Port already in use");
        assert_eq!(ErrorCode::from_code(9), ErrorCode::Unknown(9));
    }

    #[test]
    fn forward_requests_and_replies_round_trip() {
        let spec = ForwardSpec {
            network_name: "shared".into(),
            protocol: "udp".into(),
            external_port: 5353,
            internal_port: 53,
            interface: "vmnt9-0".into(),
        };
        let req = Request::Forward(spec.clone());
        assert_eq!(Request::parse(&req.to_bytes()).unwrap(), req);
        for info in [
            ForwardInfo {
                spec: spec.clone(),
                internal_address: Some("10.0.0.2".into()),
            },
            ForwardInfo {
                spec,
                internal_address: None,
            },
        ] {
            let reply = Reply::Forward(info);
            assert_eq!(Reply::parse(&reply.to_bytes()).unwrap(), reply);
        }
    }

    #[test]
    fn replies_round_trip() {
        let err = Reply::Error(BrokerError::new(ErrorCode::NotFound, "no network \"x\""));
        assert_eq!(Reply::parse(&err.to_bytes()).unwrap(), err);
        let net = Reply::Network(NetworkInfo {
            name: "shared".into(),
            mode: "shared".into(),
            subnet: "192.168.64.0/24".into(),
            gateway: "192.168.64.1".into(),
            mask: "255.255.255.0".into(),
            mtu: 1500,
            bridge: "vmnb-shared".into(),
            interface: "vmnt-shared-0".into(),
            mac: "52:54:00:00:00:01".into(),
        });
        assert_eq!(Reply::parse(&net.to_bytes()).unwrap(), net);
        let metrics = Reply::Metrics("vmnet_broker_networks 1\n# EOF\n".into());
        assert_eq!(Reply::parse(&metrics.to_bytes()).unwrap(), metrics);
        assert_eq!(
            Request::parse(br#"{"command":"metrics"}"#).unwrap(),
            Request::Metrics
        );
        assert_eq!(Request::Metrics.to_bytes(), br#"{"command":"metrics"}"#);
        for (mac, persistent) in [
            (None, false),
            (Some(Mac::new([0x52, 0x54, 0, 1, 2, 3])), true),
        ] {
            let req = Request::Acquire {
                network_name: "host".into(),
                mac,
                persistent,
            };
            assert_eq!(Request::parse(&req.to_bytes()).unwrap(), req);
        }
    }

    #[test]
    fn a_huge_status_is_cut_to_fit_a_message() {
        let client = |id| ClientStatus {
            id,
            pid: 4_000_000,
            uid: 4_000_000,
            gid: 4_000_000,
            networks: vec!["shared".into(), "host".into()],
        };
        let status = Status {
            version: "0.1.0".into(),
            protocol: PROTOCOL_VERSION,
            pid: 1,
            idle_timeout_seconds: 120.0,
            networks: vec![NetworkStatus {
                name: "shared".into(),
                mode: "shared".into(),
                subnet: "192.168.64.0/24".into(),
                gateway: "192.168.64.1".into(),
                bridge: "vmnb-shared".into(),
                mtu: 1500,
                clients: 5000,
                taps: (0..1000).map(|i| format!("vmnt9-{i:x}")).collect(),
                removal_in_seconds: None,
                overlay: None,
            }],
            clients: (0..5000).map(client).collect(),
            truncated: false,
        };
        let small = status.clone().fit(MAX_MESSAGE);
        assert!(small.truncated);
        assert!(Reply::Status(small.clone()).to_bytes().len() <= MAX_MESSAGE);
        assert_eq!(small.networks[0].clients, 5000, "counts stay exact");
        assert!(!small.clients.is_empty());
        let mut untouched = Status {
            clients: vec![client(1)],
            ..status
        };
        untouched.networks[0].taps.truncate(3);
        assert!(!untouched.clone().fit(MAX_MESSAGE).truncated);
        assert_eq!(untouched.clone().fit(MAX_MESSAGE), untouched);
    }

    #[test]
    fn malformed_replies_are_invalid_reply() {
        for bad in [&b"nope"[..], b"[]", b"{}", br#"{"network":{"name":1}}"#] {
            assert_eq!(Reply::parse(bad).unwrap_err().code, ErrorCode::InvalidReply);
        }
        // An unknown error code from a newer broker is preserved as a message.
        match Reply::parse(br#"{"error":99}"#).unwrap() {
            Reply::Error(e) => {
                assert_eq!(e.code, ErrorCode::Unknown(99));
                assert_eq!(e.message, "(unknown status)");
            }
            other => panic!("{other:?}"),
        }
    }
}
