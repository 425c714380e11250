//! What keeps a network's overlay (its VXLAN port, `vxlan.rs` of the backend) away from
//! this host's services: each host's DHCP and DNS serve only the VMs of that host.
//!
//! Two small base chains of the bridge table per network with an overlay, apart from the
//! per-TAP chains (anti-spoofing and server roles match TAPs by name prefix, so frames of
//! the overlay port never meet them: the bindings are the local TAPs' business):
//!
//! - `overlay-in-<net>` (bridge input, what is delivered to the host): DHCP and DNS
//!   requests that arrive through the overlay port are dropped. They are still forwarded
//!   to the local VMs like any frame, only this host's servers never see them.
//! - `overlay-out-<net>` (bridge output, what the host sends): DHCP replies of this host
//!   never leave through the overlay port, so a VM elsewhere is never offered an address.
//!
//! And one of the inet table, as the kernel's VXLAN takes packets of its VNI from anyone:
//!
//! - `overlay-udp-<net>` (input): VXLAN packets of the network's UDP port and VNI are
//!   dropped unless they come from one of its `peers`. Frames from the overlay skip the
//!   TAP bindings, so without it anyone who can send UDP to this host could put frames
//!   with any source on the network. (Not with a multicast `group`, whose members are not
//!   known: the underlay must then be trusted.)

use nftables::batch::Batch;
use nftables::expr::{
    Expression, MetaKey, NamedExpression, Payload, PayloadBase, PayloadRaw, SetItem,
};
use nftables::stmt::Operator;
use nftables::types::{NfChainType, NfFamily, NfHook};

use super::FirewallNetwork;
use super::rules::{base_chain, drop_, matches, meta, payload, rule, s};

/// The bridge family's "filter" priority, as for the other bridge chains.
const PRIO: i32 = -200;
/// The inet family's "filter" priority.
const PRIO_INET: i32 = 0;

pub(super) fn in_chain(net: &str) -> String {
    format!("overlay-in-{net}")
}
pub(super) fn out_chain(net: &str) -> String {
    format!("overlay-out-{net}")
}
pub(super) fn udp_chain(net: &str) -> String {
    format!("overlay-udp-{net}")
}

/// The 24-bit VNI of a VXLAN header, which follows the 8-byte UDP header: flags (1 byte),
/// reserved (3), VNI (3), reserved (1). `@th,96,24`.
fn vni() -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadRaw(PayloadRaw {
        base: PayloadBase::TH,
        offset: (8 + 4) * 8,
        len: 24,
    })))
}

fn chains(name: &str) -> [nftables::schema::NfListObject<'static>; 3] {
    [
        base_chain(
            NfFamily::Bridge,
            in_chain(name),
            NfHook::Input,
            NfChainType::Filter,
            PRIO,
        ),
        base_chain(
            NfFamily::Bridge,
            out_chain(name),
            NfHook::Output,
            NfChainType::Filter,
            PRIO,
        ),
        base_chain(
            NfFamily::INet,
            udp_chain(name),
            NfHook::Input,
            NfChainType::Filter,
            PRIO_INET,
        ),
    ]
}

/// Adds the chains and rules of `net`'s overlay port, if it has one.
pub(super) fn objects(batch: &mut Batch<'static>, net: &FirewallNetwork) {
    let Some(overlay) = &net.overlay else {
        return;
    };
    let port = &overlay.port;
    let [input, output, udp] = chains(&net.name);
    batch.add(input);
    batch.add(output);
    batch.add(udp);
    if let Some(first) = overlay.peers.first() {
        let family = if first.is_ipv4() { "ip" } else { "ip6" };
        let peers = overlay
            .peers
            .iter()
            .map(|p| SetItem::Element(s(&p.to_string())))
            .collect();
        batch.add(rule(
            NfFamily::INet,
            &udp_chain(&net.name),
            vec![
                matches(
                    payload("udp", "dport"),
                    Operator::EQ,
                    Expression::Number(u32::from(overlay.udp_port)),
                ),
                matches(vni(), Operator::EQ, Expression::Number(overlay.vni)),
                matches(
                    payload(family, "saddr"),
                    Operator::NEQ,
                    Expression::Named(NamedExpression::Set(peers)),
                ),
                drop_(),
            ],
        ));
    }
    let (inc, outc) = (in_chain(&net.name), out_chain(&net.name));
    // DHCP server (67) and DNS (53, UDP and TCP) requests from the overlay.
    for (proto, port_no) in [("udp", 67), ("udp", 53), ("tcp", 53)] {
        batch.add(rule(
            NfFamily::Bridge,
            &inc,
            vec![
                matches(meta(MetaKey::Iifname), Operator::EQ, s(port)),
                matches(
                    payload(proto, "dport"),
                    Operator::EQ,
                    Expression::Number(port_no),
                ),
                drop_(),
            ],
        ));
    }
    // This host's DHCP answers, for its own VMs only.
    batch.add(rule(
        NfFamily::Bridge,
        &outc,
        vec![
            matches(meta(MetaKey::Oifname), Operator::EQ, s(port)),
            matches(
                payload("udp", "sport"),
                Operator::EQ,
                Expression::Number(67),
            ),
            drop_(),
        ],
    ));
}

/// Deletes the chains of `net`'s overlay port, if it has one.
pub(super) fn delete(batch: &mut Batch<'static>, net: &FirewallNetwork) {
    if net.overlay.is_some() {
        for chain in chains(&net.name) {
            batch.delete(chain);
        }
    }
}

/// Deletes the overlay chains a network named `name` may own, whether they exist or not
/// (add, a no-op when they do, then delete); the tables must be added earlier.
pub(super) fn purge(batch: &mut Batch<'static>, name: &str) {
    for chain in chains(name) {
        batch.add(chain.clone());
        batch.delete(chain);
    }
}

#[cfg(test)]
mod tests {
    use super::super::ruleset_for;
    use super::super::test_support::network;
    use super::*;

    fn net(port: Option<&str>) -> FirewallNetwork {
        network().with_overlay(port.map(|port| super::super::OverlayGuard {
            port: port.to_string(),
            udp_port: 4789,
            vni: 42,
            peers: vec!["192.0.2.2".parse().unwrap(), "192.0.2.3".parse().unwrap()],
        }))
    }

    #[test]
    fn only_networks_with_an_overlay_get_its_chains() {
        let plain = serde_json::to_string(&ruleset_for(&net(None))).unwrap();
        assert!(!plain.contains("overlay-"), "{plain}");
        let json = serde_json::to_string(&ruleset_for(&net(Some("vmnx-n1")))).unwrap();
        for want in [
            r#""name":"overlay-in-n1""#,
            r#""hook":"input""#,
            r#""name":"overlay-out-n1""#,
            r#""hook":"output""#,
            r#""right":"vmnx-n1""#,
            r#""right":67"#,
            r#""right":53"#,
            r#""name":"overlay-udp-n1""#,
            r#"{"match":{"left":{"payload":{"base":"th","offset":96,"len":24}},"right":42,"op":"=="}}"#,
            r#"{"match":{"left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"set":["192.0.2.2","192.0.2.3"]},"op":"!="}}"#,
        ] {
            assert!(json.contains(want), "{want} missing: {json}");
        }
    }
}
