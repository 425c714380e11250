//! What a network definition asks of macOS's vmnet, as a pure plan: the sequence of vmnet
//! calls `backend::macos` makes for a [`NetworkConfig`], and the fields vmnet cannot honour.
//! Platform-neutral so both are tested on Linux; only the calls themselves are macOS code.
//!
//! A network file means the same on both systems. A field vmnet has no way to honour is
//! an error ([`unsupported`]), reported by `check-config` on macOS and refused at creation,
//! never silently ignored.

use crate::config::prefix_to_mask;
use crate::config::{
    DEFAULT_LEASE_SECONDS, DEFAULT_MAX_NONROOT_TAPS, DEFAULT_MAX_TAPS_PER_UID, DEFAULT_MTU,
    DEFAULT_PREFIX_LEN, Mode, NetworkConfig,
};
use crate::config::{IPV6_PREFIX_LEN, Protocol};
use crate::mac::Mac;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `vmnet_mode_t` values (vmnet.h).
pub const VMNET_HOST_MODE: u32 = 1000;
pub const VMNET_SHARED_MODE: u32 = 1001;

/// `IPPROTO_TCP` and `IPPROTO_UDP`, the protocol of a port forwarding rule.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// macOS's `AF_INET` and `AF_INET6` (`sa_family_t`): the family of a rule's addresses.
/// Spelled out because Linux's `AF_INET6` (10) differs and the plan is tested there.
pub const DARWIN_AF_INET: u8 = 2;
pub const DARWIN_AF_INET6: u8 = 30;

/// `vmnet_return_t` of success; every other value is a failure ([`return_code_name`]).
pub const VMNET_SUCCESS: u32 = 1000;

/// The name vmnet.h gives a `vmnet_return_t`.
pub fn return_code_name(code: u32) -> &'static str {
    match code {
        1000 => "VMNET_SUCCESS",
        1001 => "VMNET_FAILURE",
        1002 => "VMNET_MEM_FAILURE",
        1003 => "VMNET_INVALID_ARGUMENT",
        1004 => "VMNET_SETUP_INCOMPLETE",
        1005 => "VMNET_INVALID_ACCESS",
        1006 => "VMNET_PACKET_TOO_BIG",
        1007 => "VMNET_BUFFER_EXHAUSTED",
        1008 => "VMNET_TOO_MANY_PACKETS",
        1009 => "VMNET_SHARING_SERVICE_BUSY",
        1010 => "VMNET_NOT_AUTHORIZED",
        _ => "an unknown vmnet status",
    }
}

/// A vmnet call that failed, with the status it returned. The backend wraps it in a
/// `BackendError`, so the registry reports it as `CREATE_FAILURE` (6) naming the code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call} failed: vmnet status {code} ({})", return_code_name(*.code))]
pub struct VmnetError {
    pub call: &'static str,
    pub code: u32,
}

impl VmnetError {
    /// `Ok` for `VMNET_SUCCESS`, else the error naming `call`.
    pub fn check(call: &'static str, code: u32) -> Result<(), Self> {
        if code == VMNET_SUCCESS {
            Ok(())
        } else {
            Err(Self { call, code })
        }
    }
}

/// One vmnet call of a network's creation, in the order they are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmnetCall {
    /// `vmnet_network_configuration_create(mode, &status)`.
    ConfigurationCreate { mode: u32 },
    /// `vmnet_network_configuration_set_ipv4_subnet(cfg, &subnet, &mask)`: `subnet` is the
    /// gateway (host) address, as the original broker passes its `subnet` field.
    SetIpv4Subnet { subnet: Ipv4Addr, mask: Ipv4Addr },
    /// `vmnet_network_configuration_set_ipv6_prefix(cfg, &prefix, len)`.
    SetIpv6Prefix { prefix: Ipv6Addr, len: u8 },
    /// `vmnet_network_configuration_set_mtu(cfg, mtu)`.
    SetMtu(u32),
    /// `vmnet_network_configuration_set_external_interface(cfg, name)`.
    SetExternalInterface(String),
    /// `vmnet_network_configuration_disable_nat44(cfg)`.
    DisableNat44,
    /// `vmnet_network_configuration_disable_nat66(cfg)`.
    DisableNat66,
    /// `vmnet_network_configuration_disable_dhcp(cfg)`.
    DisableDhcp,
    /// `vmnet_network_configuration_disable_dns_proxy(cfg)`.
    DisableDnsProxy,
    /// `vmnet_network_configuration_disable_router_advertisement(cfg)`.
    DisableRouterAdvertisement,
    /// `vmnet_network_configuration_add_dhcp_reservation(cfg, &mac, &ip)`.
    AddDhcpReservation { mac: Mac, ip: Ipv4Addr },
    /// `vmnet_network_configuration_add_port_forwarding_rule(cfg, protocol, family,
    /// internal_port, external_port, &internal_address)`: the internal port comes first.
    AddPortForwardingRule {
        protocol: u8,
        family: u8,
        internal_port: u16,
        external_port: u16,
        internal_address: IpAddr,
    },
    /// `vmnet_network_create(cfg, &status)`.
    NetworkCreate,
}

impl fmt::Display for VmnetCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConfigurationCreate { mode } => {
                write!(f, "vmnet_network_configuration_create({mode})")
            }
            Self::SetIpv4Subnet { subnet, mask } => {
                write!(
                    f,
                    "vmnet_network_configuration_set_ipv4_subnet({subnet}, {mask})"
                )
            }
            Self::SetIpv6Prefix { prefix, len } => write!(
                f,
                "vmnet_network_configuration_set_ipv6_prefix({prefix}, {len})"
            ),
            Self::SetMtu(mtu) => write!(f, "vmnet_network_configuration_set_mtu({mtu})"),
            Self::SetExternalInterface(name) => write!(
                f,
                "vmnet_network_configuration_set_external_interface({name:?})"
            ),
            Self::DisableNat44 => f.write_str("vmnet_network_configuration_disable_nat44()"),
            Self::DisableNat66 => f.write_str("vmnet_network_configuration_disable_nat66()"),
            Self::DisableDhcp => f.write_str("vmnet_network_configuration_disable_dhcp()"),
            Self::DisableDnsProxy => f.write_str("vmnet_network_configuration_disable_dns_proxy()"),
            Self::DisableRouterAdvertisement => {
                f.write_str("vmnet_network_configuration_disable_router_advertisement()")
            }
            Self::AddDhcpReservation { mac, ip } => write!(
                f,
                "vmnet_network_configuration_add_dhcp_reservation({mac}, {ip})"
            ),
            Self::AddPortForwardingRule {
                protocol,
                family,
                internal_port,
                external_port,
                internal_address,
            } => write!(
                f,
                "vmnet_network_configuration_add_port_forwarding_rule({protocol}, {family}, {internal_port}, {external_port}, {internal_address})"
            ),
            Self::NetworkCreate => f.write_str("vmnet_network_create()"),
        }
    }
}

/// Fields of a definition vmnet cannot honour, one message each naming the field.
pub fn unsupported(c: &NetworkConfig) -> Vec<String> {
    let mut out = Vec::new();
    if c.isolation {
        out.push("isolation: macOS's vmnet cannot keep VMs of one network apart".to_string());
    }
    if c.allow_spoofing {
        out.push(
            "allow_spoofing: macOS's vmnet has no switch for its own address checks".to_string(),
        );
    }
    if c.dhcp_range.is_some() {
        out.push(
            "dhcp_range: macOS's vmnet serves DHCP from the whole subnet; use dhcp_reservations"
                .to_string(),
        );
    }
    if c.lease_seconds != DEFAULT_LEASE_SECONDS {
        out.push(format!(
            "lease_time: macOS's vmnet chooses its DHCP lease time itself (remove the field for {DEFAULT_LEASE_SECONDS}s on Linux)"
        ));
    }
    // The registry counts an endpoint as live while the backend lists it; vmnet hands a
    // VM the network itself, so there is nothing per VM to count or to refuse.
    for (field, value, default) in [
        (
            "max_taps_per_uid",
            c.max_taps_per_uid,
            DEFAULT_MAX_TAPS_PER_UID,
        ),
        (
            "max_nonroot_taps",
            c.max_nonroot_taps,
            DEFAULT_MAX_NONROOT_TAPS,
        ),
    ] {
        if value != default {
            out.push(format!(
                "{field}: TAPs are Linux's; macOS's vmnet gives each VM the network itself, with no port the broker could count"
            ));
        }
    }
    for (i, rule) in c.port_forwarding_rules.iter().enumerate() {
        if let Some(address) = rule.external_address {
            out.push(format!(
                "port_forwarding_rules[{i}]: external_address {address}: macOS's vmnet forwards from every address of the host; remove it"
            ));
        }
    }
    if let Some(vxlan) = &c.vxlan {
        out.push(format!(
            "vxlan (vni {}): macOS's vmnet has no overlay across hosts; networks that span hosts are Linux's (kernel VXLAN)",
            vxlan.vni
        ));
    }
    if c.gateway.is_none() && c.prefix_len != DEFAULT_PREFIX_LEN {
        out.push(format!(
            "mask {} without subnet: macOS's vmnet picks a dynamic subnet only as a /24; give a subnet too",
            prefix_to_mask(c.prefix_len)
        ));
    }
    out
}

/// Why a definition cannot be made with vmnet: every field it cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network {name:?} uses what macOS cannot do: {}", .fields.join("; "))]
pub struct Unsupported {
    pub name: String,
    pub fields: Vec<String>,
}

/// The vmnet calls that create the network `c` describes, ending with
/// [`VmnetCall::NetworkCreate`]. Settings at vmnet's defaults (NAT, DHCP, DNS proxy,
/// router advertisement on; MTU 1500; a dynamic /24) make no call, as in the original.
pub fn plan(c: &NetworkConfig) -> Result<Vec<VmnetCall>, Unsupported> {
    let fields = unsupported(c);
    if !fields.is_empty() {
        return Err(Unsupported {
            name: c.name.clone(),
            fields,
        });
    }
    let mode = match c.mode {
        Mode::Shared => VMNET_SHARED_MODE,
        Mode::Host => VMNET_HOST_MODE,
    };
    let mut calls = vec![VmnetCall::ConfigurationCreate { mode }];
    if let Some(gateway) = c.gateway {
        calls.push(VmnetCall::SetIpv4Subnet {
            subnet: gateway,
            mask: prefix_to_mask(c.prefix_len),
        });
    }
    if let Some(prefix) = c.ipv6_prefix {
        calls.push(VmnetCall::SetIpv6Prefix {
            prefix: prefix.network(),
            len: IPV6_PREFIX_LEN,
        });
    }
    if c.mtu != DEFAULT_MTU {
        calls.push(VmnetCall::SetMtu(c.mtu));
    }
    if let Some(name) = &c.external_interface {
        calls.push(VmnetCall::SetExternalInterface(name.clone()));
    }
    // A host network never forwards; only a shared one has NAT to turn off.
    if c.mode == Mode::Shared && !c.nat44 {
        calls.push(VmnetCall::DisableNat44);
    }
    if c.nat66 == Some(false) {
        calls.push(VmnetCall::DisableNat66);
    }
    if !c.dhcp {
        calls.push(VmnetCall::DisableDhcp);
    }
    if !c.dns {
        calls.push(VmnetCall::DisableDnsProxy);
    }
    if c.router_advertisement == Some(false) {
        calls.push(VmnetCall::DisableRouterAdvertisement);
    }
    calls.extend(
        c.dhcp_reservations
            .iter()
            .map(|r| VmnetCall::AddDhcpReservation {
                mac: r.mac,
                ip: r.ip,
            }),
    );
    calls.extend(
        c.port_forwarding_rules
            .iter()
            .map(|r| VmnetCall::AddPortForwardingRule {
                protocol: match r.protocol {
                    Protocol::Tcp => IPPROTO_TCP,
                    Protocol::Udp => IPPROTO_UDP,
                },
                family: if r.internal_address.is_ipv4() {
                    DARWIN_AF_INET
                } else {
                    DARWIN_AF_INET6
                },
                internal_port: r.internal_port,
                external_port: r.external_port,
                internal_address: r.internal_address,
            }),
    );
    calls.push(VmnetCall::NetworkCreate);
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;
    use crate::config::{builtin, parse};
    use crate::registry::RegistryError;
    use VmnetCall::*;
    use std::path::Path;

    fn config(text: &str) -> NetworkConfig {
        parse("net", Path::new("/etc/vmnet-broker.d/net.json"), text).unwrap()
    }

    /// The ```json blocks of docs/configuration.md, in order.
    fn documented_examples() -> Vec<String> {
        let doc = include_str!("../../docs/configuration.md");
        doc.split("```json\n")
            .skip(1)
            .map(|block| block.split("```").next().unwrap().to_string())
            .collect()
    }

    #[test]
    fn builtins_are_vmnet_defaults() {
        let shared = plan(&builtin("shared").unwrap()).unwrap();
        assert_eq!(
            shared,
            [
                ConfigurationCreate {
                    mode: VMNET_SHARED_MODE
                },
                NetworkCreate
            ]
        );
        let host = plan(&builtin("host").unwrap()).unwrap();
        assert_eq!(
            host,
            [
                ConfigurationCreate {
                    mode: VMNET_HOST_MODE
                },
                NetworkCreate
            ]
        );
    }

    #[test]
    fn an_overlay_is_refused_on_macos() {
        let c = config(
            r#"{"subnet":"10.90.0.1","dhcp":false,"vxlan":{"vni":42,"local":"192.0.2.1","peers":["192.0.2.2"]}}"#,
        );
        let e = plan(&c).unwrap_err();
        assert!(
            e.fields
                .iter()
                .any(|f| f.starts_with("vxlan (vni 42): macOS's vmnet has no overlay")),
            "{e:?}"
        );
    }

    #[test]
    fn documented_examples_plan_as_expected() {
        let examples = documented_examples();
        assert_eq!(
            examples.len(),
            4,
            "docs/configuration.md examples changed: {examples:?}"
        );
        // Per-network TAP limits: bridge ports, which vmnet networks do not have.
        let e = plan(&config(&examples[0])).unwrap_err();
        assert_eq!(e.fields.len(), 2, "{e}");
        assert!(e.fields[0].starts_with("max_taps_per_uid: "), "{e}");
        assert!(e.fields[1].starts_with("max_nonroot_taps: "), "{e}");
        let examples = &examples[1..];
        // The lab network: host mode, fixed /28, one reservation; allowed_groups is policy,
        // decided by the core before vmnet is asked.
        assert_eq!(
            plan(&config(&examples[0])).unwrap(),
            [
                ConfigurationCreate {
                    mode: VMNET_HOST_MODE
                },
                SetIpv4Subnet {
                    subnet: Ipv4Addr::new(192, 168, 42, 1),
                    mask: Ipv4Addr::new(255, 255, 255, 240),
                },
                AddDhcpReservation {
                    mac: Mac::new([0x52, 0x54, 0, 0, 0x42, 0x10]),
                    ip: Ipv4Addr::new(192, 168, 42, 10),
                },
                NetworkCreate,
            ]
        );
        // A dynamic /28: vmnet picks dynamic subnets only as /24s.
        let e = plan(&config(&examples[1])).unwrap_err();
        assert_eq!(e.fields.len(), 1, "{e}");
        assert!(
            e.to_string()
                .contains("mask 255.255.255.240 without subnet"),
            "{e}"
        );
        // The original's IPv6 and forwarding fields, each its call, in the plan's order.
        assert_eq!(
            plan(&config(&examples[2])).unwrap(),
            [
                ConfigurationCreate {
                    mode: VMNET_SHARED_MODE
                },
                SetIpv4Subnet {
                    subnet: Ipv4Addr::new(192, 168, 105, 1),
                    mask: Ipv4Addr::new(255, 255, 255, 0),
                },
                SetIpv6Prefix {
                    prefix: "fd12:3456:789a:1::".parse().unwrap(),
                    len: 64,
                },
                SetExternalInterface("en0".into()),
                DisableNat66,
                DisableDnsProxy,
                DisableRouterAdvertisement,
                AddPortForwardingRule {
                    protocol: IPPROTO_TCP,
                    family: DARWIN_AF_INET,
                    internal_port: 22,
                    external_port: 2222,
                    internal_address: IpAddr::V4(Ipv4Addr::new(192, 168, 105, 10)),
                },
                NetworkCreate,
            ]
        );
    }

    #[test]
    fn the_originals_fields_become_their_calls_in_order() {
        let c = config(
            r#"{"mode": "shared", "subnet": "10.20.0.1", "ipv6_prefix": "fd00:20::",
                "mtu": 1400, "external_interface": "en7", "nat44": false, "nat66": false,
                "dhcp": false, "dns_proxy": false, "router_advertisement": false,
                "dhcp_reservations": [{"mac": "52:54:00:00:00:01", "ip": "10.20.0.10"}],
                "port_forwarding_rules": [
                  {"protocol": "udp", "external_port": 5353, "internal_address": "fd00:20::10", "internal_port": 53},
                  {"protocol": "tcp", "external_port": 8080, "internal_address": "10.20.0.10", "internal_port": 80}]}"#,
        );
        let calls = plan(&c).unwrap();
        assert_eq!(
            calls,
            [
                ConfigurationCreate {
                    mode: VMNET_SHARED_MODE
                },
                SetIpv4Subnet {
                    subnet: Ipv4Addr::new(10, 20, 0, 1),
                    mask: Ipv4Addr::new(255, 255, 255, 0),
                },
                SetIpv6Prefix {
                    prefix: "fd00:20::".parse().unwrap(),
                    len: 64,
                },
                SetMtu(1400),
                SetExternalInterface("en7".into()),
                DisableNat44,
                DisableNat66,
                DisableDhcp,
                DisableDnsProxy,
                DisableRouterAdvertisement,
                AddDhcpReservation {
                    mac: Mac::new([0x52, 0x54, 0, 0, 0, 1]),
                    ip: Ipv4Addr::new(10, 20, 0, 10),
                },
                AddPortForwardingRule {
                    protocol: IPPROTO_UDP,
                    family: DARWIN_AF_INET6,
                    internal_port: 53,
                    external_port: 5353,
                    internal_address: "fd00:20::10".parse().unwrap(),
                },
                AddPortForwardingRule {
                    protocol: IPPROTO_TCP,
                    family: DARWIN_AF_INET,
                    internal_port: 80,
                    external_port: 8080,
                    internal_address: "10.20.0.10".parse().unwrap(),
                },
                NetworkCreate,
            ]
        );
        // The internal port comes first in the C call, as vmnet.h declares it.
        assert_eq!(
            calls[12].to_string(),
            "vmnet_network_configuration_add_port_forwarding_rule(6, 2, 80, 8080, 10.20.0.10)"
        );
        // Settings that restate vmnet's defaults make no call: nat44/nat66/RA true, and a
        // host network's nat44 false (it never forwards).
        for text in [
            r#"{"nat44": true, "nat66": true, "router_advertisement": true, "dns_proxy": true}"#,
            r#"{"mode": "host", "nat44": false}"#,
        ] {
            assert_eq!(plan(&config(text)).unwrap().len(), 2, "{text}");
        }
        // The deprecated `dns` still turns off the DNS proxy.
        assert_eq!(
            plan(&config(r#"{"dns": false}"#)).unwrap()[1],
            DisableDnsProxy
        );
    }

    #[test]
    fn every_setting_becomes_its_call_in_order() {
        let c = config(
            r#"{"mode": "shared", "subnet": "10.20.0.1", "mask": "255.255.0.0", "mtu": 9000,
                "dhcp": false, "dns": false, "dhcp_reservations": [
                {"mac": "52:54:00:00:00:01", "ip": "10.20.0.10"},
                {"mac": "52:54:00:00:00:02", "ip": "10.20.0.11"}]}"#,
        );
        assert_eq!(
            plan(&c).unwrap(),
            [
                ConfigurationCreate {
                    mode: VMNET_SHARED_MODE
                },
                SetIpv4Subnet {
                    subnet: Ipv4Addr::new(10, 20, 0, 1),
                    mask: Ipv4Addr::new(255, 255, 0, 0),
                },
                SetMtu(9000),
                DisableDhcp,
                DisableDnsProxy,
                AddDhcpReservation {
                    mac: Mac::new([0x52, 0x54, 0, 0, 0, 1]),
                    ip: Ipv4Addr::new(10, 20, 0, 10),
                },
                AddDhcpReservation {
                    mac: Mac::new([0x52, 0x54, 0, 0, 0, 2]),
                    ip: Ipv4Addr::new(10, 20, 0, 11),
                },
                NetworkCreate,
            ]
        );
        // A fixed /24 with defaults otherwise: only the subnet.
        assert_eq!(
            plan(&config(r#"{"subnet": "192.168.105.1"}"#)).unwrap(),
            [
                ConfigurationCreate {
                    mode: VMNET_SHARED_MODE
                },
                SetIpv4Subnet {
                    subnet: Ipv4Addr::new(192, 168, 105, 1),
                    mask: Ipv4Addr::new(255, 255, 255, 0),
                },
                NetworkCreate,
            ]
        );
    }

    #[test]
    fn what_vmnet_cannot_do_is_refused_by_field() {
        let cases = [
            (r#"{"isolation": true}"#, "isolation"),
            (r#"{"allow_spoofing": true}"#, "allow_spoofing"),
            (
                r#"{"subnet": "10.0.0.1", "dhcp_range": {"start": "10.0.0.5", "end": "10.0.0.9"}}"#,
                "dhcp_range",
            ),
            (r#"{"lease_time": 600}"#, "lease_time"),
            (r#"{"mask": "255.255.0.0"}"#, "without subnet"),
            (r#"{"max_taps_per_uid": 8}"#, "max_taps_per_uid"),
            (r#"{"max_nonroot_taps": 0}"#, "max_nonroot_taps"),
            (
                r#"{"subnet": "10.0.0.1", "port_forwarding_rules": [{"protocol": "tcp", "external_port": 22,
                    "internal_address": "10.0.0.5", "internal_port": 22, "external_address": "192.0.2.7"}]}"#,
                "port_forwarding_rules[0]: external_address 192.0.2.7",
            ),
        ];
        for (text, field) in cases {
            let c = config(text);
            let fields = unsupported(&c);
            assert_eq!(fields.len(), 1, "{text}: {fields:?}");
            assert!(fields[0].contains(field), "{text}: {fields:?}");
            assert!(plan(&c).is_err(), "{text}");
        }
        // Every problem at once, each named.
        let c = config(r#"{"isolation": true, "allow_spoofing": true, "lease_time": 60}"#);
        let e = plan(&c).unwrap_err();
        assert_eq!(e.fields.len(), 3, "{e}");
        assert!(
            e.to_string()
                .starts_with("network \"net\" uses what macOS cannot do: ")
        );
        // Fields that mean the same on both systems are fine.
        let fine = config(
            r#"{"description": "x", "allowed_users": ["alice"], "allowed_groups": [20],
                "dhcp": true, "dns": true, "isolation": false, "allow_spoofing": false}"#,
        );
        assert!(unsupported(&fine).is_empty());
    }

    #[test]
    fn vmnet_failures_are_create_failures_naming_the_code() {
        assert_eq!(VmnetError::check("vmnet_network_create", 1000), Ok(()));
        for (code, name) in [
            (1001, "VMNET_FAILURE"),
            (1003, "VMNET_INVALID_ARGUMENT"),
            (1009, "VMNET_SHARING_SERVICE_BUSY"),
            (1010, "VMNET_NOT_AUTHORIZED"),
            (4242, "an unknown vmnet status"),
        ] {
            let e = VmnetError::check("vmnet_network_create", code).unwrap_err();
            let registry = RegistryError::Create {
                name: "shared".into(),
                source: BackendError::component("vmnet", e),
            };
            let wire = crate::answers::wire_error(&registry);
            assert_eq!(wire.code.code(), 6, "{code}");
            assert!(
                wire.message.contains(&format!(
                    "vmnet_network_create failed: vmnet status {code} ({name})"
                )),
                "{}",
                wire.message
            );
        }
        for code in 1001..=1010 {
            assert!(return_code_name(code).starts_with("VMNET_"), "{code}");
        }
    }
}
