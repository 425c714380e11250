//! Pure builders of the broker's nftables objects: names, expressions, and the batches
//! that add, delete and purge one network's chains, sets, rules and elements. Nothing
//! here runs `nft`; `nft.rs` does.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use nftables::batch::Batch;
use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField,
    Prefix, SetItem,
};
use nftables::schema::{
    Chain, FlushObject, NfCmd, NfListObject, Nftables, Rule, Set, SetType, SetTypeValue, Table,
};
use nftables::stmt::{JumpTarget, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::{FirewallNetwork, NetState, TABLE};
use crate::config::PortForward;

// Standard nft priorities: "filter" for forward, "srcnat" for postrouting NAT, and the
// bridge family's "filter" (-200) so spoofed frames die before anything else sees them.
const PRIO_FILTER: i32 = 0;
const PRIO_SRCNAT: i32 = 100;
const PRIO_DSTNAT: i32 = -100;
const PRIO_BRIDGE_FILTER: i32 = -200;
/// "raw": before conntrack (-200), so a `notrack` there spares a packet the lookup.
const PRIO_RAW: i32 = -300;

// ---- object names -------------------------------------------------------------------------

pub(super) fn fwd_chain(net: &str) -> String {
    format!("fwd-{net}")
}
/// Packets between two guests of one network skip conntrack ([`notrack_objects`]).
pub(super) fn raw_chain(net: &str) -> String {
    format!("raw-{net}")
}
pub(super) fn nat_chain(net: &str) -> String {
    format!("nat-{net}")
}
/// Port forwards of one network: DNAT of what arrives for the host (prerouting).
pub(super) fn dnat_chain(net: &str) -> String {
    format!("dnat-{net}")
}
/// Port forwards of one network: DNAT of what the host itself sends to its own
/// addresses (output). Loopback is left to the broker's relay (docs/networking.md).
pub(super) fn dnat_local_chain(net: &str) -> String {
    format!("dnat-local-{net}")
}
/// Port forwards of one network: the source NAT that brings the replies back (postrouting).
pub(super) fn fwd_snat_chain(net: &str) -> String {
    format!("pf-{net}")
}
/// The one base chain of the bridge table (prerouting): sends each frame from a TAP of
/// an `allow_spoofing` network to the chain of the TAP's network, by the TAP's name
/// prefix. It exists only while such a network does.
pub(super) const DISPATCH_CHAIN: &str = "ports";

/// The egress dispatch chains of earlier versions (bridge `output` and `forward`, to each
/// anti-spoofing network's [`egress_chain`]): deleted wherever found, the TAP guard
/// checks what leaves through a TAP now.
pub(super) const EGRESS_DISPATCH: [(&str, NfHook); 2] = [
    ("ports-out", NfHook::Output),
    ("ports-fwd", NfHook::Forward),
];

/// Adds the dispatch chain if missing and empties it: done before the network chains
/// it jumps to are deleted or replaced, then refilled (or deleted) by [`dispatch_rule`].
/// The egress dispatch chains of earlier versions go: the TAP guard checks egress now.
pub(super) fn dispatch_flush(batch: &mut Batch<'static>) {
    let chain = |name: &str, hook| {
        base_chain(
            NfFamily::Bridge,
            name.to_string(),
            hook,
            NfChainType::Filter,
            PRIO_BRIDGE_FILTER,
        )
    };
    batch.add(chain(DISPATCH_CHAIN, NfHook::Prerouting));
    batch.add_cmd(NfCmd::Flush(FlushObject::Chain(Chain {
        family: NfFamily::Bridge,
        table: TABLE.into(),
        name: DISPATCH_CHAIN.into(),
        ..Chain::default()
    })));
    for (name, hook) in EGRESS_DISPATCH {
        batch.add(chain(name, hook));
        batch.delete(chain(name, hook));
    }
}

/// The dispatch rule, `iifname vmap { "<tap prefix>*" : jump spoof-<network>, ... }`
/// (after [`dispatch_flush`]): one lookup per frame however many networks there are,
/// where a base chain per network made every frame pass through all of them (300
/// networks took a VM's round trip to its gateway from 14 to 106 µs). An anonymous map,
/// rewritten whole when a network comes or goes: nft's JSON cannot declare a named
/// verdict map through the crate, and networks change rarely. TAP prefixes of different
/// networks never overlap ([`super::validate_network`] and `add_network` see to it).
pub(super) fn dispatch_rule<'a>(
    batch: &mut Batch<'static>,
    nets: impl IntoIterator<Item = &'a FirewallNetwork>,
) {
    // Anti-spoofing networks have the TAP guard (BPF) instead of chains here.
    let nets: Vec<&FirewallNetwork> = nets.into_iter().filter(|n| !n.anti_spoofing).collect();
    let vmap = |key: MetaKey, chain: fn(&str) -> String, nets: &[&FirewallNetwork]| {
        let items: Vec<SetItem<'static>> = nets
            .iter()
            .map(|net| {
                SetItem::Mapping(
                    s(&format!("{}*", net.tap_prefix)),
                    Expression::Verdict(nftables::expr::Verdict::Jump(JumpTarget {
                        target: chain(&net.name).into(),
                    })),
                )
            })
            .collect();
        (!items.is_empty()).then(|| {
            vec![Statement::VerdictMap(nftables::stmt::VerdictMap {
                key: meta(key),
                data: Expression::Named(NamedExpression::Set(items)),
            })]
        })
    };
    match vmap(MetaKey::Iifname, spoof_chain, &nets) {
        Some(stmts) => batch.add(rule(NfFamily::Bridge, DISPATCH_CHAIN, stmts)),
        // Even an empty base chain costs every frame of every bridge a hook call: none
        // when no network needs it.
        None => batch.delete(base_chain(
            NfFamily::Bridge,
            DISPATCH_CHAIN.to_string(),
            NfHook::Prerouting,
            NfChainType::Filter,
            PRIO_BRIDGE_FILTER,
        )),
    }
}

/// Regular chain of the TAP rules (server roles, DHCP quota) of an `allow_spoofing`
/// network.
pub(super) fn spoof_chain(net: &str) -> String {
    format!("spoof-{net}")
}
/// Regular chain of earlier versions checking frames leaving an anti-spoofing network's
/// TAPs; purged wherever found.
pub(super) fn egress_chain(net: &str) -> String {
    format!("egress-{net}")
}
/// Regular chain of an `allow_spoofing` network with DHCP: the TAPs' DHCP MAC quotas
/// ([`dhcp_quota_script`]).
pub(super) fn dhcp_chain(net: &str) -> String {
    format!("dhcp-{net}")
}
/// Dynamic set of the DHCP client MACs (`chaddr`) one TAP of an `allow_spoofing` network
/// has used, at most [`DHCP_MACS_PER_TAP`] ([`dhcp_quota_script`]).
pub(super) fn dhcp_macs_set(tap: &str) -> String {
    format!("dm-{tap}")
}
/// Set of earlier versions (the MAC of each TAP), purged wherever found.
pub(super) fn portmacs_set(net: &str) -> String {
    format!("portmacs-{net}")
}
/// Set of earlier versions (the lease of each MAC), purged wherever found.
pub(super) fn leases_set(net: &str) -> String {
    format!("leases-{net}")
}

// ---- expression helpers -------------------------------------------------------------------

pub(super) fn s(v: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(v.to_string()))
}
pub(super) fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}
pub(super) fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}
pub(super) fn prefix(addr: &str, len: u32) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(addr)),
        len,
    }))
}
pub(super) fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}
pub(super) fn ct_established() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(nftables::expr::CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        Operator::IN,
        Expression::List(vec![s("established"), s("related")]),
    )
}
/// `ct status dnat`: the connection was destination-NATed (by a port forward).
pub(super) fn ct_status_dnat() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(nftables::expr::CT {
            key: "status".into(),
            family: None,
            dir: None,
        })),
        Operator::IN,
        s("dnat"),
    )
}
pub(super) fn accept() -> Statement<'static> {
    Statement::Accept(None)
}
pub(super) fn drop_() -> Statement<'static> {
    Statement::Drop(None)
}

// ---- batches ------------------------------------------------------------------------------

pub(super) fn table(family: NfFamily) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family,
        name: TABLE.into(),
        handle: None,
    })
}

pub(super) fn add_tables(batch: &mut Batch<'static>) {
    batch.add(table(NfFamily::INet));
    batch.add(table(NfFamily::Bridge));
}

/// Deletes both tables whether they exist or not: `add` of an existing table is a no-op,
/// so "add then delete" in one transaction never fails on a missing table.
pub(super) fn delete_tables(batch: &mut Batch<'static>) {
    for family in [NfFamily::INet, NfFamily::Bridge] {
        batch.add(table(family));
        batch.delete(table(family));
    }
}

pub(super) fn base_chain(
    family: NfFamily,
    name: String,
    hook: NfHook,
    kind: NfChainType,
    prio: i32,
) -> NfListObject<'static> {
    NfListObject::Chain(Chain {
        family,
        table: TABLE.into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    })
}

pub(super) fn named_chain(family: NfFamily, name: String) -> NfListObject<'static> {
    NfListObject::Chain(Chain {
        family,
        table: TABLE.into(),
        name: name.into(),
        ..Chain::default()
    })
}

pub(super) fn set(name: String, set_type: SetTypeValue<'static>) -> NfListObject<'static> {
    NfListObject::Set(Box::new(Set {
        family: NfFamily::Bridge,
        table: TABLE.into(),
        name: name.into(),
        set_type,
        ..Set::default()
    }))
}

pub(super) fn rule(
    family: NfFamily,
    chain: &str,
    expr: Vec<Statement<'static>>,
) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family,
        table: TABLE.into(),
        chain: chain.to_string().into(),
        expr: expr.into(),
        ..Rule::default()
    })
}

/// Statements of an anonymous set of `items`.
fn anon_set(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

/// How many distinct DHCP client MACs (`chaddr`) one TAP of an `allow_spoofing` network
/// may use while it is bound. Such a network trusts its VMs with other machines' MACs (a
/// VM may carry a few guests or containers behind it), but not with the whole pool: a VM
/// inventing MACs gets offers for this many and is not heard for the rest, so it holds at
/// most this many addresses and the other VMs still get theirs.
pub const DHCP_MACS_PER_TAP: usize = 8;

/// Whether `name` can be written into an nft script as it is: nft 1.0.6 takes chain and
/// set names there only as bare identifiers (no quoting), which are ASCII letters, digits
/// and `-`, `_`, `.` after the prefixes this module puts in front.
pub(super) fn script_safe(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The nft script (text syntax, for `nft -f -`) that (re)writes the `dhcp-` chain of an
/// `allow_spoofing` network with DHCP: each bound TAP's DHCP client messages (UDP port 67)
/// pass when their `chaddr` is the TAP's own (bound) MAC or one of at most
/// [`DHCP_MACS_PER_TAP`] other MACs that TAP has used; everything else (a further MAC, an
/// unbound TAP) is dropped. The own MAC is matched first and never counted, so a VM that
/// used up its quota still gets its own lease. The sets of the TAPs
/// in `gone` (no longer bound to this network) are deleted, and those of the TAPs in
/// `reset` (bound to another MAC since: a new VM on a reused TAP name) emptied, so no VM
/// starts with the count of the one before.
///
/// Each TAP's MACs are a dynamic set of `size` [`DHCP_MACS_PER_TAP`] filled from the
/// packet path (`add @dm-<tap> { @th,288,48 }`): the kernel adds a MAC it has not seen
/// while the set has room, finds one it has, and fails the `add` of a new one once the set
/// is full, which ends the rule so the `drop` below it applies. The sets persist across
/// rewrites (`add set` of an existing set is a no-op), so a TAP's count lasts as long as
/// its binding. This is text rather than JSON because the set's key is a raw payload,
/// declared `typeof @th,288,48`, which nft's JSON input (1.0.6) cannot express (an
/// `ether_addr` set is refused as a datatype mismatch with the raw payload).
///
/// Names that are not [`script_safe`] are left out: their TAP's messages are dropped.
pub(super) fn dhcp_quota_script<'a>(
    net: &str,
    ports: impl IntoIterator<Item = (&'a String, &'a [u8; 6])>,
    gone: impl IntoIterator<Item = &'a String>,
    reset: &[String],
) -> String {
    if !script_safe(net) {
        return String::new();
    }
    let chain = dhcp_chain(net);
    let set_decl = dhcp_macs_set_decl();
    let mut script = String::new();
    let mut line = |l: String| {
        script.push_str(&l);
        script.push('\n');
    };
    line(format!("add chain bridge {TABLE} {chain}"));
    line(format!("flush chain bridge {TABLE} {chain}"));
    for (tap, mac) in ports.into_iter().filter(|(t, _)| script_safe(t)) {
        let set = dhcp_macs_set(tap);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        line(format!(
            "add rule bridge {TABLE} {chain} iifname \"{tap}\" @th,288,48 0x{hex} return"
        ));
        line(format!("add set bridge {TABLE} {set} {set_decl}"));
        if reset.contains(tap) {
            line(format!("flush set bridge {TABLE} {set}"));
        }
        line(format!(
            "add rule bridge {TABLE} {chain} iifname \"{tap}\" add @{set} {{ @th,288,48 }} return"
        ));
    }
    line(format!("add rule bridge {TABLE} {chain} drop"));
    // After the flush above, which released the rules that used them.
    script.push_str(&delete_dhcp_macs_script(gone));
    script
}

/// The nft script that deletes the MAC quota sets of `taps` ([`dhcp_quota_script`]),
/// whichever of them exist; no rule may use them any more.
pub(super) fn delete_dhcp_macs_script<'a>(taps: impl IntoIterator<Item = &'a String>) -> String {
    let mut script = String::new();
    for tap in taps.into_iter().filter(|t| script_safe(t)) {
        let set = dhcp_macs_set(tap);
        // Added first so that deleting a set that is already gone is not an error (nft
        // 1.0.6 has no `destroy`).
        script.push_str(&format!(
            "add set bridge {TABLE} {set} {}\ndelete set bridge {TABLE} {set}\n",
            dhcp_macs_set_decl()
        ));
    }
    script
}

fn dhcp_macs_set_decl() -> String {
    format!("{{ typeof @th,288,48; size {DHCP_MACS_PER_TAP}; flags dynamic; }}")
}

/// Adds every chain, set, rule and element of one network (the tables must exist).
pub(super) fn network_objects(batch: &mut Batch<'static>, ns: &NetState) {
    let net = &ns.net;
    let br = || s(&net.bridge);
    let iif = || meta(MetaKey::Iifname);
    let oif = || meta(MetaKey::Oifname);

    // Forwarding, inet table.
    let fwd = fwd_chain(&net.name);
    batch.add(base_chain(
        NfFamily::INet,
        fwd.clone(),
        NfHook::Forward,
        NfChainType::Filter,
        PRIO_FILTER,
    ));
    // First, what goes from the bridge back to the bridge. With `br_netfilter` loaded and
    // `bridge-nf-call-iptables=1` (the default where Docker runs) frames *bridged* between
    // two ports also pass this hook, with the bridge as both input and output device, so
    // the rules below must never see them: VM-to-VM traffic is the bridge's business
    // (isolated ports for `isolation`), whatever that sysctl says. What is *routed* from
    // the bridge back into it (a VM sending to another VM's address through the gateway)
    // is the same VM-to-VM traffic and gets the same answer; for isolated networks that
    // answer is no, or the host would carry what the isolated ports refuse.
    batch.add(rule(
        NfFamily::INet,
        &fwd,
        vec![
            matches(iif(), Operator::EQ, br()),
            matches(oif(), Operator::EQ, br()),
            if net.isolation { drop_() } else { accept() },
        ],
    ));
    // Port forwards: a connection the network's DNAT sent into the bridge may pass both
    // ways, whatever the mode (a `host` network forwards nothing else). Only our own
    // DNAT chains send connections to this bridge.
    for dir in [oif(), iif()] {
        batch.add(rule(
            NfFamily::INet,
            &fwd,
            vec![matches(dir, Operator::EQ, br()), ct_status_dnat(), accept()],
        ));
    }
    if net.nat {
        batch.add(rule(
            NfFamily::INet,
            &fwd,
            vec![matches(iif(), Operator::EQ, br()), accept()],
        ));
        batch.add(rule(
            NfFamily::INet,
            &fwd,
            vec![
                matches(oif(), Operator::EQ, br()),
                ct_established(),
                accept(),
            ],
        ));
        // Nothing from outside may open connections into the NAT network.
        batch.add(rule(
            NfFamily::INet,
            &fwd,
            vec![matches(oif(), Operator::EQ, br()), drop_()],
        ));

        let nat = nat_chain(&net.name);
        batch.add(base_chain(
            NfFamily::INet,
            nat.clone(),
            NfHook::Postrouting,
            NfChainType::NAT,
            PRIO_SRCNAT,
        ));
        batch.add(rule(
            NfFamily::INet,
            &nat,
            vec![
                matches(
                    payload("ip", "saddr"),
                    Operator::EQ,
                    prefix(
                        &net.subnet.network().to_string(),
                        u32::from(net.subnet.prefix_len()),
                    ),
                ),
                // Only what is forwarded: a packet whose source is one of the host's own
                // addresses (the gateway's, when the host talks to the network's DNS over
                // `lo`) was made by the host and keeps its source; masqueraded, it would
                // leave from 127.0.0.1 and the services, which serve only the subnet,
                // would ignore it.
                matches(
                    Expression::Named(NamedExpression::Fib(Fib {
                        result: FibResult::Type,
                        flags: [FibFlag::Saddr].into_iter().collect(),
                    })),
                    Operator::NEQ,
                    s("local"),
                ),
                matches(oif(), Operator::NEQ, br()),
                Statement::Masquerade(None),
            ],
        ));
        // NAT66: the same for the network's IPv6 prefix, unless the file says `nat66:
        // false` (then the prefix is routed as is). Guests keep their SLAAC addresses on
        // the network; the outside sees the host's.
        if let Some(p6) = net.ipv6_prefix.filter(|_| net.nat66) {
            batch.add(rule(
                NfFamily::INet,
                &nat,
                vec![
                    matches(
                        payload("ip6", "saddr"),
                        Operator::EQ,
                        prefix(&p6.network().to_string(), u32::from(p6.prefix_len())),
                    ),
                    matches(
                        Expression::Named(NamedExpression::Fib(Fib {
                            result: FibResult::Type,
                            flags: [FibFlag::Saddr].into_iter().collect(),
                        })),
                        Operator::NEQ,
                        s("local"),
                    ),
                    matches(oif(), Operator::NEQ, br()),
                    Statement::Masquerade(None),
                ],
            ));
        }
    } else {
        // Host mode: VMs talk to the host and to each other (bridged, not routed), never
        // through the host to anywhere else, even when forwarding is on for other reasons.
        batch.add(rule(
            NfFamily::INet,
            &fwd,
            vec![matches(iif(), Operator::EQ, br()), drop_()],
        ));
        batch.add(rule(
            NfFamily::INet,
            &fwd,
            vec![matches(oif(), Operator::EQ, br()), drop_()],
        ));
    }
    forward_chains(batch, net, ns.forwards());
    notrack_objects(batch, net);

    // The overlay's chains (overlay.rs), whatever the TAPs' checks are.
    super::overlay::objects(batch, net);
    // Anti-spoofing networks: the TAP guard (guard.rs, a BPF program at TC of each TAP)
    // does all of the per-frame checks, server roles included; nothing else in the bridge
    // table.
    if net.anti_spoofing {
        return;
    }
    // Bridge table: every frame entering the bridge from one of our TAPs, bound or not,
    // is sent here by the dispatch chain ([`dispatch_rule`]). Other ports (uplinks, other
    // software's) are left alone.
    let spoof = spoof_chain(&net.name);
    batch.add(named_chain(NfFamily::Bridge, spoof.clone()));
    let r = |batch: &mut Batch<'static>, stmts: Vec<Statement<'static>>| {
        batch.add(rule(NfFamily::Bridge, &spoof, stmts));
    };
    // Server roles are the host's, never a VM's (the TAP guard drops the same on
    // anti-spoofing networks): a Router Advertisement or Redirect would move the host's and
    // the other VMs' IPv6 routing to the sender, a DHCP(v6) server message would hand the
    // other VMs addresses, routers and name servers of the sender's choosing, and an IPv4
    // ICMP redirect would reroute their traffic.
    r(
        batch,
        vec![
            matches(
                payload("icmpv6", "type"),
                Operator::EQ,
                anon_set(vec![s("nd-router-advert"), s("nd-redirect")]),
            ),
            drop_(),
        ],
    );
    r(
        batch,
        vec![
            matches(payload("icmp", "type"), Operator::EQ, s("redirect")),
            drop_(),
        ],
    );
    // DHCP server (67 -> 68) and DHCPv6 server or relay (547 -> 546) messages, matched on
    // either port so that no choice of the other one slips through.
    for (field, port) in [("sport", 67), ("dport", 68), ("sport", 547), ("dport", 546)] {
        r(
            batch,
            vec![
                matches(
                    payload("udp", field),
                    Operator::EQ,
                    Expression::Number(port),
                ),
                drop_(),
            ],
        );
    }

    if net.dhcp {
        // The chain's rules are the TAPs' DHCP MAC quotas, written by a script after
        // this transaction ([`dhcp_quota_script`]); until then it drops every DHCP
        // client message, so a rebuild never opens it.
        let chain = dhcp_chain(&net.name);
        batch.add(named_chain(NfFamily::Bridge, chain.clone()));
        batch.add(rule(NfFamily::Bridge, &chain, vec![drop_()]));
        r(
            batch,
            vec![
                matches(
                    payload("udp", "dport"),
                    Operator::EQ,
                    Expression::Number(67),
                ),
                Statement::Jump(JumpTarget {
                    target: chain.into(),
                }),
            ],
        );
    }
}

/// (Re)writes the three port-forward chains of `net` (made if missing, emptied, refilled)
/// for `forwards`, static and dynamic alike:
///
/// - `dnat-<net>` (prerouting): what arrives for one of the host's addresses (the
///   forward's `external_address` only, when it has one) on the external port goes to the
///   internal address and port. From other machines, and from the network's own guests.
/// - `dnat-local-<net>` (output): the same for what the host itself sends to its own
///   addresses, except loopback: a packet from 127.0.0.1 or ::1 cannot be routed out of
///   `lo` unless `route_localnet` is set, which the broker does not touch; a relay in the
///   broker, listening on the port, carries loopback connections instead.
/// - `pf-<net>` (postrouting): what a forward sends into the bridge leaves from the
///   gateway's address (masquerade), so the guest's reply comes back to the host however
///   the guest routes (a `host` network's guests may have no default route), and conntrack
///   undoes both translations.
///
/// One rule per forward and family: an IPv4 forward matches IPv4 only and an IPv6 one
/// (once networks have IPv6 prefixes) IPv6 only, each with its own `dnat ip`/`dnat ip6`.
/// Guest-to-guest traffic of the network skips conntrack: `raw-<net>` (prerouting, raw
/// priority) marks packets with source and destination in the network's subnet (or IPv6
/// prefix), destination not the gateway, `notrack`.
///
/// Why: with br_netfilter's `bridge-nf-call-iptables`/`-ip6tables` at 1 (the default in
/// every namespace when br_netfilter is loaded or built in; the broker does not change
/// it, Docker relies on it) every bridged IP frame passes the inet hooks, where the
/// broker's NAT chains have made conntrack active: a lookup (and for each new flow an
/// entry) per frame, plus the NAT hooks. Traffic between two guests needs neither: it is
/// never NATed (masquerade applies to what leaves the bridge; port forwards DNAT what is
/// addressed to the host, whose addresses are the gateway or outside the subnet) and the
/// forward chain accepts or (isolation) drops it by interface, without `ct`. What goes
/// to the host (DHCP, DNS, a forward through the gateway's address), to or from outside,
/// and replies of port-forwarded connections (masqueraded to the gateway by `pf-<net>`)
/// keep their conntrack entries. A routed packet from outside that claims a source in
/// the subnet is untracked too, and the forward chain still drops it (it is no
/// `ct state established` reply). With the sysctls at 0 bridged frames never reach
/// these hooks, and the chain costs nothing (docs/benchmarks.md, "Issue 12").
fn notrack_objects(batch: &mut Batch<'static>, net: &FirewallNetwork) {
    let raw = raw_chain(&net.name);
    batch.add(base_chain(
        NfFamily::INet,
        raw.clone(),
        NfHook::Prerouting,
        NfChainType::Filter,
        PRIO_RAW,
    ));
    let net4 = prefix(
        &net.subnet.network().to_string(),
        u32::from(net.subnet.prefix_len()),
    );
    let mut rules = vec![("ip", net4, s(&net.gateway.to_string()))];
    if let Some(p6) = net.ipv6_prefix {
        let net6 = prefix(&p6.network().to_string(), u32::from(p6.prefix_len()));
        rules.push(("ip6", net6, s(&crate::ula::gateway_of(p6).to_string())));
    }
    for (l3, subnet, gateway) in rules {
        batch.add(rule(
            NfFamily::INet,
            &raw,
            vec![
                matches(payload(l3, "daddr"), Operator::EQ, subnet.clone()),
                matches(payload(l3, "saddr"), Operator::EQ, subnet),
                matches(payload(l3, "daddr"), Operator::NEQ, gateway),
                Statement::Notrack,
            ],
        ));
    }
}

pub(super) fn forward_chains<'a>(
    batch: &mut Batch<'static>,
    net: &FirewallNetwork,
    forwards: impl IntoIterator<Item = &'a PortForward>,
) {
    let chains = [
        (dnat_chain(&net.name), NfHook::Prerouting, PRIO_DSTNAT),
        (dnat_local_chain(&net.name), NfHook::Output, PRIO_DSTNAT),
        (fwd_snat_chain(&net.name), NfHook::Postrouting, PRIO_SRCNAT),
    ];
    for (name, hook, prio) in &chains {
        batch.add(base_chain(
            NfFamily::INet,
            name.clone(),
            *hook,
            NfChainType::NAT,
            *prio,
        ));
        batch.add_cmd(NfCmd::Flush(FlushObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.clone().into(),
            ..Chain::default()
        })));
    }
    let local_daddr = || {
        matches(
            Expression::Named(NamedExpression::Fib(Fib {
                result: FibResult::Type,
                flags: [FibFlag::Daddr].into_iter().collect(),
            })),
            Operator::EQ,
            s("local"),
        )
    };
    for f in forwards {
        let (nfproto, l3, family, loopback) = match f.internal_address {
            IpAddr::V4(_) => ("ipv4", "ip", NATFamily::IP, prefix("127.0.0.0", 8)),
            IpAddr::V6(_) => ("ipv6", "ip6", NATFamily::IP6, s("::1")),
        };
        let head = |local: bool| {
            let mut stmts = vec![matches(meta(MetaKey::Nfproto), Operator::EQ, s(nfproto))];
            match f.external_address {
                Some(ext) => stmts.push(matches(
                    payload(l3, "daddr"),
                    Operator::EQ,
                    s(&ext.to_string()),
                )),
                None => stmts.push(local_daddr()),
            }
            if local {
                stmts.push(matches(
                    payload(l3, "daddr"),
                    Operator::NEQ,
                    loopback.clone(),
                ));
            }
            stmts.push(matches(
                payload(f.protocol.as_str(), "dport"),
                Operator::EQ,
                Expression::Number(u32::from(f.external_port)),
            ));
            stmts.push(Statement::DNAT(Some(NAT {
                addr: Some(s(&f.internal_address.to_string())),
                family: Some(family),
                port: Some(Expression::Number(u32::from(f.internal_port))),
                flags: None,
            })));
            stmts
        };
        batch.add(rule(NfFamily::INet, &chains[0].0, head(false)));
        batch.add(rule(NfFamily::INet, &chains[1].0, head(true)));
    }
    batch.add(rule(
        NfFamily::INet,
        &chains[2].0,
        vec![
            matches(meta(MetaKey::Oifname), Operator::EQ, s(&net.bridge)),
            ct_status_dnat(),
            Statement::Masquerade(None),
        ],
    ));
}

/// Deletes the objects of one network, leaving the tables for the other networks.
/// Deleting a chain deletes its rules; chains go before the sets their rules use.
pub(super) fn delete_network_objects(batch: &mut Batch<'static>, net: &FirewallNetwork) {
    batch.delete(named_chain(NfFamily::INet, fwd_chain(&net.name)));
    batch.delete(named_chain(NfFamily::INet, raw_chain(&net.name)));
    for chain in [dnat_chain, dnat_local_chain, fwd_snat_chain] {
        batch.delete(named_chain(NfFamily::INet, chain(&net.name)));
    }
    if net.nat {
        batch.delete(named_chain(NfFamily::INet, nat_chain(&net.name)));
    }
    super::overlay::delete(batch, net);
    // Anti-spoofing networks have nothing in the bridge table (the TAP guard).
    if !net.anti_spoofing {
        batch.delete(named_chain(NfFamily::Bridge, spoof_chain(&net.name)));
        if net.dhcp {
            batch.delete(named_chain(NfFamily::Bridge, dhcp_chain(&net.name)));
        }
    }
}

/// Deletes every object a network named `name` may own, whichever of them exist and
/// whatever definition made them: each is added (a no-op when it exists, its definition
/// is the same for every network definition) and then deleted, like [`delete_tables`].
/// The tables must be added earlier in the batch.
pub(super) fn purge_network_objects(batch: &mut Batch<'static>, name: &str) {
    let chains = [
        base_chain(
            NfFamily::INet,
            fwd_chain(name),
            NfHook::Forward,
            NfChainType::Filter,
            PRIO_FILTER,
        ),
        base_chain(
            NfFamily::INet,
            raw_chain(name),
            NfHook::Prerouting,
            NfChainType::Filter,
            PRIO_RAW,
        ),
        base_chain(
            NfFamily::INet,
            nat_chain(name),
            NfHook::Postrouting,
            NfChainType::NAT,
            PRIO_SRCNAT,
        ),
        base_chain(
            NfFamily::INet,
            dnat_chain(name),
            NfHook::Prerouting,
            NfChainType::NAT,
            PRIO_DSTNAT,
        ),
        base_chain(
            NfFamily::INet,
            dnat_local_chain(name),
            NfHook::Output,
            NfChainType::NAT,
            PRIO_DSTNAT,
        ),
        base_chain(
            NfFamily::INet,
            fwd_snat_chain(name),
            NfHook::Postrouting,
            NfChainType::NAT,
            PRIO_SRCNAT,
        ),
        named_chain(NfFamily::Bridge, spoof_chain(name)),
        named_chain(NfFamily::Bridge, dhcp_chain(name)),
        named_chain(NfFamily::Bridge, egress_chain(name)),
    ];
    let sets = [
        set(
            portmacs_set(name),
            SetTypeValue::Concatenated(vec![SetType::Ifname, SetType::EtherAddr].into()),
        ),
        set(
            leases_set(name),
            SetTypeValue::Concatenated(vec![SetType::EtherAddr, SetType::Ipv4Addr].into()),
        ),
    ];
    // Chains (and their rules) before the sets those rules use.
    super::overlay::purge(batch, name);
    for obj in chains.into_iter().chain(sets) {
        batch.add(obj.clone());
        batch.delete(obj);
    }
}

/// The JSON document `add_network` would send for `net` on an empty ruleset, for tests and
/// debugging (`nft -j -f -` accepts it).
pub fn ruleset_for(net: &FirewallNetwork) -> Nftables<'static> {
    let mut batch = Batch::new();
    add_tables(&mut batch);
    dispatch_flush(&mut batch);
    network_objects(
        &mut batch,
        &NetState {
            net: net.clone(),
            ports: BTreeMap::new(),
            leases: BTreeMap::new(),
            dynamic: BTreeMap::new(),
            ifindex: BTreeMap::new(),
            fast_path: None,
            overlay_port: None,
        },
    );
    dispatch_rule(&mut batch, [net]);
    batch.to_nftables()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::network;
    use super::*;

    fn net(nat: bool, anti_spoofing: bool, dhcp: bool) -> FirewallNetwork {
        network()
            .with_nat(nat)
            .with_anti_spoofing(anti_spoofing)
            .with_dhcp(dhcp)
    }

    #[test]
    fn nat66_masquerades_the_prefix_only_on_shared_with_nat66() {
        let prefix6 = r#"{"prefix":{"addr":"fd00:77::","len":64}}"#;
        let mut shared = net(true, true, true);
        shared.ipv6_prefix = Some("fd00:77::/64".parse().unwrap());
        shared.nat66 = true;
        let with = json(&shared);
        assert!(
            with.contains(&format!(
                r#"{{"match":{{"left":{{"payload":{{"protocol":"ip6","field":"saddr"}}}},"right":{prefix6},"op":"=="}}}}"#
            )),
            "{with}"
        );
        // The prefix is an allowed guest source either way.
        assert!(with.contains(prefix6), "{with}");
        shared.nat66 = false;
        let without = json(&shared);
        assert_eq!(
            with.matches("masquerade").count(),
            without.matches("masquerade").count() + 1,
            "{with}"
        );
        // The masquerade rule's source match (followed by its `fib`), not the notrack's.
        let nat66 = format!(
            r#"{{"protocol":"ip6","field":"saddr"}}}},"right":{prefix6},"op":"=="}}}},{{"match":{{"left":{{"fib""#
        );
        assert!(with.contains(&nat66), "{with}");
        assert!(!without.contains(&nat66), "{without}");
        let mut host = net(false, true, true);
        host.ipv6_prefix = shared.ipv6_prefix;
        host.nat66 = true;
        assert!(!json(&host).contains(&nat66));
    }

    #[test]
    fn guest_to_guest_notrack_goes_through_netlink() {
        // The raw chain's rules compile to nf_tables messages (no fallback to `nft`).
        let mut shared = net(true, true, true);
        shared.ipv6_prefix = Some("fd00:77::/64".parse().unwrap());
        let doc = ruleset_for(&shared);
        let json = serde_json::to_string(&doc).unwrap();
        assert_eq!(json.matches("\"notrack\"").count(), 2, "{json}");
        assert!(json.contains(r#""name":"raw-n1""#), "{json}");
        if let Err(e) = super::super::netlink::compile(&doc) {
            panic!("{e}");
        }
    }

    fn json(net: &FirewallNetwork) -> String {
        serde_json::to_string(&ruleset_for(net)).unwrap()
    }

    #[test]
    fn nat_network_masquerades_and_host_network_drops() {
        let shared = json(&net(true, false, false));
        assert!(shared.contains("masquerade"), "{shared}");
        assert!(shared.contains("\"nat-n1\""), "{shared}");
        let host = json(&net(false, false, false));
        // The one masquerade of a host network is the port forwards' (into the bridge,
        // of DNATed connections only): nothing leaves for the outside.
        assert_eq!(host.matches("masquerade").count(), 1, "{host}");
        assert!(
            host.contains(r#""chain":"pf-n1","expr":[{"match":{"left":{"meta":{"key":"oifname"}},"right":"vmnbr0","op":"=="}},{"match":{"left":{"ct":{"key":"status"}},"right":"dnat","op":"in"}},{"masquerade":null}]"#),
            "{host}"
        );
        assert!(!host.contains("\"nat-n1\""), "{host}");
        assert!(!host.contains("portmacs-n1"), "{host}");
    }

    #[test]
    fn server_roles_are_dropped_without_anti_spoofing() {
        let rules = json(&net(true, false, true));
        for needle in [
            r#"{"match":{"left":{"payload":{"protocol":"icmpv6","field":"type"}},"right":{"set":["nd-router-advert","nd-redirect"]},"op":"=="}},{"drop":null}]"#,
            r#"{"match":{"left":{"payload":{"protocol":"icmp","field":"type"}},"right":"redirect","op":"=="}},{"drop":null}]"#,
            r#"{"match":{"left":{"payload":{"protocol":"udp","field":"sport"}},"right":67,"op":"=="}},{"drop":null}]"#,
            r#"{"match":{"left":{"payload":{"protocol":"udp","field":"dport"}},"right":68,"op":"=="}},{"drop":null}]"#,
            r#"{"match":{"left":{"payload":{"protocol":"udp","field":"sport"}},"right":547,"op":"=="}},{"drop":null}]"#,
            r#"{"match":{"left":{"payload":{"protocol":"udp","field":"dport"}},"right":546,"op":"=="}},{"drop":null}]"#,
        ] {
            assert!(rules.contains(needle), "{needle} in {rules}");
        }
    }

    #[test]
    fn anti_spoofing_networks_have_no_bridge_chains() {
        // The TAP guard (BPF) checks their frames; the dispatch chain, which would cost
        // every frame a hook call, is deleted when no network needs it.
        let rules = json(&net(true, true, true));
        assert!(!rules.contains("spoof-n1"), "{rules}");
        assert!(!rules.contains("dhcp-n1"), "{rules}");
        assert!(
            rules.contains(
                r#"{"delete":{"chain":{"family":"bridge","table":"vmnet_broker","name":"ports""#
            ),
            "{rules}"
        );
        let open = json(&net(true, false, true));
        assert!(open.contains(r#"{"jump":{"target":"dhcp-n1"}}"#), "{open}");
        assert!(
            open.contains(r#""chain":"dhcp-n1","expr":[{"drop":null}]"#),
            "{open}"
        );
        assert!(!json(&net(true, false, false)).contains("dhcp-n1"));
    }

    #[test]
    fn dhcp_quota_script_counts_other_macs_per_tap() {
        let ports = BTreeMap::from([
            ("vmnt9-0".to_string(), [0x52, 0x54, 0, 0, 0, 0x01]),
            ("vmnt9-1".to_string(), [0x52, 0x54, 0, 0, 0, 0x02]),
            // Not writable into a script: left out, so its messages are dropped.
            (
                "bad\"; flush ruleset".to_string(),
                [0x52, 0x54, 0, 0, 0, 0x03],
            ),
        ]);
        let gone = ["vmnt9-7".to_string()];
        let script = dhcp_quota_script("n1", &ports, &gone, &["vmnt9-1".to_string()]);
        let t = TABLE;
        let set = format!("{{ typeof @th,288,48; size {DHCP_MACS_PER_TAP}; flags dynamic; }}");
        let want = format!(
            "add chain bridge {t} dhcp-n1
flush chain bridge {t} dhcp-n1
add rule bridge {t} dhcp-n1 iifname \"vmnt9-0\" @th,288,48 0x525400000001 return
add set bridge {t} dm-vmnt9-0 {set}
add rule bridge {t} dhcp-n1 iifname \"vmnt9-0\" add @dm-vmnt9-0 {{ @th,288,48 }} return
add rule bridge {t} dhcp-n1 iifname \"vmnt9-1\" @th,288,48 0x525400000002 return
add set bridge {t} dm-vmnt9-1 {set}
flush set bridge {t} dm-vmnt9-1
add rule bridge {t} dhcp-n1 iifname \"vmnt9-1\" add @dm-vmnt9-1 {{ @th,288,48 }} return
add rule bridge {t} dhcp-n1 drop
add set bridge {t} dm-vmnt9-7 {set}
delete set bridge {t} dm-vmnt9-7
"
        );
        assert_eq!(script, want);
        assert_eq!(dhcp_quota_script("n 1", &ports, &gone, &[]), "");
    }

    #[test]
    fn bridge_to_bridge_is_decided_first_by_isolation() {
        for (isolation, verdict) in [(false, "accept"), (true, "drop")] {
            let mut n = net(false, true, true);
            n.isolation = isolation;
            let rules = json(&n);
            let first = format!(
                r#"{{"rule":{{"family":"inet","table":"vmnet_broker","chain":"fwd-n1","expr":[{{"match":{{"left":{{"meta":{{"key":"iifname"}}}},"right":"vmnbr0","op":"=="}}}},{{"match":{{"left":{{"meta":{{"key":"oifname"}}}},"right":"vmnbr0","op":"=="}}}},{{"{verdict}":null}}]}}}}"#
            );
            let at = rules
                .find(&first)
                .unwrap_or_else(|| panic!("{first} in {rules}"));
            assert!(
                !rules[..at].contains(r#""chain":"fwd-n1","expr""#),
                "not the first rule: {rules}"
            );
        }
    }

    #[test]
    fn only_forwarded_traffic_is_masqueraded() {
        let shared = json(&net(true, false, false));
        assert!(
            shared.contains(r#"{"match":{"left":{"fib":{"result":"type","flags":["saddr"]}},"right":"local","op":"!="}}"#),
            "{shared}"
        );
    }

    #[test]
    fn forwards_translate_arrivals_and_host_traffic_but_not_loopback() {
        let mut n = net(false, true, true);
        n.forwards = vec![PortForward {
            protocol: crate::config::Protocol::Tcp,
            external_port: 2222,
            internal_address: "10.77.0.5".parse().unwrap(),
            internal_port: 22,
            external_address: None,
        }];
        let rules = json(&n);
        let dnat = r#"{"match":{"left":{"payload":{"protocol":"tcp","field":"dport"}},"right":2222,"op":"=="}},{"dnat":{"addr":"10.77.0.5","family":"ip","port":22}}]"#;
        for (chain, needle) in [
            (
                "dnat-n1",
                r#"{"match":{"left":{"fib":{"result":"type","flags":["daddr"]}},"right":"local","op":"=="}}"#,
            ),
            (
                "dnat-local-n1",
                r#"{"match":{"left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"127.0.0.0","len":8}},"op":"!="}}"#,
            ),
        ] {
            let start = rules
                .find(&format!(r#""chain":"{chain}","expr""#))
                .unwrap_or_else(|| panic!("{chain} in {rules}"));
            let rule = &rules[start..start + rules[start..].find("}}}").unwrap()];
            assert!(rule.contains(needle), "{needle} in {rule}");
            assert!(rule.contains(dnat), "{dnat} in {rule}");
        }
        assert!(rules.contains(r#""chain":"pf-n1","expr":[{"match":{"left":{"meta":{"key":"oifname"}},"right":"vmnbr0","op":"=="}},{"match":{"left":{"ct":{"key":"status"}},"right":"dnat","op":"in"}},{"masquerade":null}]"#), "{rules}");
        // Even a host network lets forwarded connections through, both ways.
        for dir in ["oifname", "iifname"] {
            let accept = format!(
                r#""chain":"fwd-n1","expr":[{{"match":{{"left":{{"meta":{{"key":"{dir}"}}}},"right":"vmnbr0","op":"=="}}}},{{"match":{{"left":{{"ct":{{"key":"status"}}}},"right":"dnat","op":"in"}}}},{{"accept":null}}]"#
            );
            assert!(rules.contains(&accept), "{accept} in {rules}");
        }
        // With allow_spoofing too (the bridge part of such a network ends early).
        let mut open = n.clone();
        open.anti_spoofing = false;
        assert!(
            json(&open).contains(dnat),
            "allow_spoofing network without forwards"
        );
        // An external address replaces "any local address"; IPv6 gets its own family.
        n.forwards[0].external_address = Some("192.0.2.7".parse().unwrap());
        let one = json(&n);
        assert!(one.contains(r#"{"match":{"left":{"payload":{"protocol":"ip","field":"daddr"}},"right":"192.0.2.7","op":"=="}}"#), "{one}");
        n.forwards[0].external_address = None;
        n.forwards[0].internal_address = "fd00::5".parse().unwrap();
        let v6 = json(&n);
        assert!(
            v6.contains(r#"{"dnat":{"addr":"fd00::5","family":"ip6","port":22}}"#),
            "{v6}"
        );
        assert!(v6.contains(r#""right":"ipv6""#), "{v6}");
        assert!(v6.contains(r#"{"match":{"left":{"payload":{"protocol":"ip6","field":"daddr"}},"right":"::1","op":"!="}}"#), "{v6}");
    }
}
