//! The answers to `list`, `show` and `leases` (docs/protocol.md): the registry's views of
//! networks, TAPs and leases turned into wire messages.

use crate::backend::{self, NetworkDetails};
use crate::config::{NetworkConfig, Source, prefix_to_mask};
use crate::protocol::{
    LeaseInfo, LeaseList, Mac, NetworkDetail, NetworkList, NetworkSummary, TapInfo, state,
};
use crate::registry::{LeaseEntry, NetworkState, NetworkView, TapView};
use serde_json::{Map, Value, json};
use std::time::{Duration, SystemTime};

fn state_of(s: NetworkState) -> (&'static str, Option<f64>) {
    match s {
        NetworkState::Inactive => (state::INACTIVE, None),
        NetworkState::Active => (state::ACTIVE, None),
        NetworkState::Idle { removal_in } => (state::IDLE, Some(removal_in.as_secs_f64())),
        NetworkState::Removing => (state::REMOVING, None),
    }
}

fn bridge_of(d: &NetworkDetails) -> Option<String> {
    d.platform.get(backend::BRIDGE).map(str::to_string)
}

/// The subnets of a network: the one it has while it exists, else the one its file fixes.
fn subnets(v: &NetworkView) -> Vec<String> {
    match (&v.details, v.config.fixed_subnet()) {
        (Some(d), _) => std::iter::once(d.subnet.to_string())
            .chain(d.ipv6_prefix.map(|p| p.to_string()))
            .collect(),
        (None, Some(fixed)) => vec![fixed.to_string()],
        (None, None) => vec![],
    }
}

/// The reply to `list` (not yet cut to the message size).
pub fn list_reply(views: Vec<NetworkView>) -> NetworkList {
    NetworkList {
        networks: views
            .into_iter()
            .map(|v| {
                let (state, removal_in_seconds) = state_of(v.state);
                NetworkSummary {
                    mode: v.config.mode.as_str().to_string(),
                    subnets: subnets(&v),
                    state: state.to_string(),
                    removal_in_seconds,
                    clients: v.clients,
                    taps: v.taps.len(),
                    overlay: v.config.vxlan.as_ref().map(|x| format!("vxlan {x}")),
                    name: v.name,
                }
            })
            .collect(),
        truncated: false,
    }
}

fn tap_info(t: &TapView) -> TapInfo {
    TapInfo {
        interface: t.endpoint.0.clone(),
        mac: t.mac.map(|m| Mac::from(m).to_string()),
        uid: t.uid,
        client: t.holder.as_ref().map(|h| h.client),
        pid: t.holder.as_ref().map(|h| h.pid),
    }
}

/// The effective configuration as `show` reports it, under the configuration file's
/// key names.
pub fn config_json(c: &NetworkConfig) -> Map<String, Value> {
    let principals = |p: &[crate::config::Principal]| -> Vec<String> {
        p.iter().map(ToString::to_string).collect()
    };
    let v = json!({
        "description": c.description,
        "mode": c.mode.as_str(),
        // As in the file: the gateway address of a fixed subnet, `null` for one picked
        // at creation.
        "subnet": c.gateway.map(|g| g.to_string()),
        "mask": prefix_to_mask(c.prefix_len).to_string(),
        "mtu": c.mtu,
        "dhcp": c.dhcp,
        "dhcp_range": c.dhcp_range.map(|r| json!({"start": r.start.to_string(), "end": r.end.to_string()})),
        "dhcp_reservations": c.dhcp_reservations.iter()
            .map(|r| json!({"mac": r.mac.to_string(), "ip": r.ip.to_string()}))
            .collect::<Vec<_>>(),
        "lease_time": c.lease_seconds,
        "dns": c.dns,
        "allow_spoofing": c.allow_spoofing,
        "isolation": c.isolation,
        "allowed_users": principals(&c.allowed_users),
        "allowed_groups": principals(&c.allowed_groups),
        "max_taps_per_uid": c.max_taps_per_uid,
        "max_nonroot_taps": c.max_nonroot_taps,
        "vxlan": c.vxlan.as_ref().map(|x| json!({
            "vni": x.vni,
            "local": x.local.to_string(),
            "peers": x.peers.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "group": x.group.map(|g| g.to_string()),
            "dev": x.dev,
            "port": x.port,
        })),
        "source": match &c.source {
            Source::BuiltIn => "built-in".to_string(),
            Source::File(path) => path.display().to_string(),
        },
    });
    match v {
        Value::Object(map) => map,
        _ => unreachable!("json! of an object literal is an object"),
    }
}

/// The network's port forwards for `show`: the static ones of its definition, then the
/// dynamic ones with the TAP and client they belong to.
fn forwards_json(v: &NetworkView) -> Vec<Value> {
    let fixed = v.config.port_forwarding_rules.iter().map(|f| {
        serde_json::json!({
            "protocol": f.protocol.as_str(),
            "external_address": f.external_address.map(|a| a.to_string()),
            "external_port": f.external_port,
            "internal_address": f.internal_address.to_string(),
            "internal_port": f.internal_port,
            "static": true,
        })
    });
    let dynamic = v.forwards.iter().map(|f| {
        serde_json::json!({
            "protocol": f.protocol.as_str(),
            "external_port": f.external_port,
            "internal_port": f.internal_port,
            "interface": f.endpoint.0,
            "client": f.client,
            "static": false,
        })
    });
    fixed.chain(dynamic).collect()
}

/// The reply to `show` (not yet cut to the message size).
pub fn show_reply(v: NetworkView) -> NetworkDetail {
    let (state, removal_in_seconds) = state_of(v.state);
    let d = v.details.as_ref();
    NetworkDetail {
        mode: v.config.mode.as_str().to_string(),
        state: state.to_string(),
        removal_in_seconds,
        config: config_json(&v.config),
        subnet: d.map(|d| d.subnet.to_string()),
        gateway: d.map(|d| d.gateway.to_string()),
        mask: d.map(|d| prefix_to_mask(d.subnet.prefix_len()).to_string()),
        ipv6_prefix: d.and_then(|d| d.ipv6_prefix).map(|p| p.to_string()),
        mtu: d.map_or(v.config.mtu, |d| d.mtu),
        bridge: d.and_then(bridge_of),
        platform: d
            .map(|d| {
                d.platform
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        clients: v.clients,
        forwards: forwards_json(&v),
        taps: v.taps.iter().map(tap_info).collect(),
        truncated: false,
        name: v.name,
    }
}

/// The reply to `leases` (not yet cut to the message size), as of `now`.
pub fn leases_reply(entries: Vec<LeaseEntry>, now: SystemTime) -> LeaseList {
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs()
    };
    LeaseList {
        leases: entries
            .into_iter()
            .map(|e| {
                let tap = e.tap.as_ref().map(tap_info);
                LeaseInfo {
                    network: e.network,
                    mac: Mac::from(e.lease.mac).to_string(),
                    ipv4: e.lease.ipv4.to_string(),
                    ipv6: e.lease.ipv6.map(|a| a.to_string()),
                    hostname: e.lease.hostname,
                    expires_at: unix(e.lease.expires),
                    expires_in_seconds: e
                        .lease
                        .expires
                        .duration_since(now)
                        .unwrap_or(Duration::ZERO)
                        .as_secs(),
                    interface: tap.as_ref().map(|t| t.interface.clone()),
                    uid: tap.as_ref().and_then(|t| t.uid),
                    client: tap.as_ref().and_then(|t| t.client),
                    pid: tap.as_ref().and_then(|t| t.pid),
                }
            })
            .collect(),
        truncated: false,
    }
}
