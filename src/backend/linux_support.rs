//! Which fields of a network definition the Linux backend cannot honour yet. Pure and
//! platform-neutral, like [`super::vmnet`]'s plan, so `check-config` and the tests see the
//! same verdict everywhere; the Linux backend refuses such a definition at creation.
//!
//! A network file means the same on both systems: a field Linux cannot do is an error,
//! never silently ignored.

use crate::config::{Mode, NetworkConfig};

/// Fields of `c` the Linux backend cannot honour, one message each naming the field.
pub fn unsupported(c: &NetworkConfig) -> Vec<String> {
    // `ipv6_prefix`, `nat66` and `router_advertisement` are all honoured (the bridge's
    // IPv6 gateway, NAT66 on shared networks, the broker's own advertisements), except on
    // a network spanning hosts, which has no IPv6 yet.
    let mut out = Vec::new();
    if let (Some(prefix), Some(_)) = (c.ipv6_prefix, &c.vxlan) {
        out.push(format!(
            "ipv6_prefix {prefix}: not supported on Linux yet with vxlan: a network spanning hosts has no IPv6 so far"
        ));
    }
    if c.mode == Mode::Shared && !c.nat44 {
        out.push(
            "nat44 false: not supported on Linux yet: a shared network always masquerades to the outside; use mode \"host\" for a network without a way out".into(),
        );
    }
    if let Some(name) = &c.external_interface {
        out.push(format!(
            "external_interface {name:?}: not supported on Linux yet: NAT leaves by the host's routes"
        ));
    }
    // port_forwarding_rules: supported. An IPv6 rule needs a fixed `ipv6_prefix` (config
    // checks).
    out
}

/// Why a definition cannot be made by the Linux backend: every field it cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network {name:?} uses what Linux cannot do yet: {}", .fields.join("; "))]
pub struct Unsupported {
    pub name: String,
    pub fields: Vec<String>,
}

/// `Ok` when the Linux backend can make `c`, else every field it cannot honour.
pub fn check(c: &NetworkConfig) -> Result<(), Unsupported> {
    let fields = unsupported(c);
    if fields.is_empty() {
        Ok(())
    } else {
        Err(Unsupported {
            name: c.name.clone(),
            fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{builtin, parse};
    use std::path::Path;

    fn config(text: &str) -> NetworkConfig {
        parse("net", Path::new("/etc/vmnet-broker.d/net.json"), text).unwrap()
    }

    #[test]
    fn builtins_and_todays_fields_are_supported() {
        for name in ["shared", "host"] {
            assert_eq!(check(&builtin(name).unwrap()), Ok(()));
        }
        let c = config(
            r#"{"mode": "shared", "subnet": "10.9.0.1", "dhcp": false, "dns_proxy": false,
                "nat44": true, "nat66": false, "router_advertisement": false,
                "isolation": true, "lease_time": 600}"#,
        );
        assert_eq!(check(&c), Ok(()));
        let c = config(
            r#"{"mode": "shared", "ipv6_prefix": "fd00:1::", "ipv6_prefix_length": 64,
                "nat66": true, "router_advertisement": true}"#,
        );
        assert_eq!(check(&c), Ok(()));
        // A host network never masquerades: nat44 false says what it does.
        assert_eq!(
            check(&config(r#"{"mode": "host", "nat44": false}"#)),
            Ok(())
        );
        let forwards = config(
            r#"{"subnet": "10.0.0.1", "port_forwarding_rules": [{"protocol": "tcp",
                "external_port": 2222, "internal_address": "10.0.0.5", "internal_port": 22}]}"#,
        );
        assert_eq!(check(&forwards), Ok(()));
    }

    #[test]
    fn what_linux_cannot_do_yet_is_refused_by_field() {
        let cases = [
            (r#"{"nat44": false}"#, "nat44 false: "),
            (
                r#"{"external_interface": "en0"}"#,
                "external_interface \"en0\": ",
            ),
            (
                r#"{"subnet": "10.90.0.1", "ipv6_prefix": "fd00:90::", "dhcp": false,
                    "vxlan": {"vni": 42, "local": "192.0.2.1", "peers": ["192.0.2.2"]}}"#,
                "ipv6_prefix fd00:90::/64: ",
            ),
        ];
        for (text, want) in cases {
            let fields = unsupported(&config(text));
            assert_eq!(fields.len(), 1, "{text}: {fields:?}");
            assert!(fields[0].starts_with(want), "{text}: {fields:?}");
            assert!(
                fields[0].contains("not supported on Linux yet"),
                "{fields:?}"
            );
        }
        let e = check(&config(r#"{"nat44": false, "external_interface": "eth1"}"#)).unwrap_err();
        assert_eq!(e.fields.len(), 2, "{e}");
        assert!(
            e.to_string()
                .starts_with("network \"net\" uses what Linux cannot do yet: nat44"),
            "{e}"
        );
    }
}
