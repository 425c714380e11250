//! Applies the broker's nftables batches through netlink (`NETLINK_NETFILTER`), without
//! running `nft`: the same typed objects `rules.rs` builds (the `nftables` crate's JSON
//! schema) are compiled to nf_tables messages and sent as one batch (`NFNL_MSG_BATCH_BEGIN`
//! ... `NFNL_MSG_BATCH_END`), a single kernel transaction, each message acknowledged.
//!
//! The compiler knows what the broker emits, and emits the expressions nft 1.0.6 emits for
//! it (as its `--debug=netlink` output shows them), so that `nft list` shows the same
//! ruleset whichever path wrote it (`tests/firewall.rs` compares the two): protocol
//! dependencies (`meta nfproto`, `meta l4proto`) before a header field, byte-aligned
//! prefixes as shorter loads, flag matches (`ct state`) as a mask and a compare,
//! anonymous sets for `{ ... }` of two or more elements and a comparison for one. What it does not know returns
//! [`FirewallError::NetlinkUntranslatable`] naming the object, before anything is sent;
//! the caller may then use `nft` (see `nft.rs`).
//!
//! Numbers are the kernel's uapi (include/uapi/linux/netfilter/nf_tables.h,
//! nfnetlink.h, nf_nat.h, nf_conntrack_common.h) unless noted; nft's own ones (datatype
//! ids, userdata) are from nftables' include/datatype.h and libnftnl's include/udata.h.

use std::net::IpAddr;

use netlink_packet_core::DefaultNla;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions,
    Hook, HookNumber, Immediate, ListAttribute, Lookup, Meta, MetaKey as NlMetaKey,
    NfTablesMessage, Operator as NlOperator, Payload as NlPayload, Register, RuleAttribute,
    RuleMessage, SetAttribute, SetDescription, SetElementAttribute, SetElementList,
    SetElementMessage, SetFlags, SetMessage, TableAttribute, TableFlags, TableMessage, Verdict,
    VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use nftables::expr::{
    Expression, FibFlag, FibResult, MetaKey, NamedExpression, Payload, PayloadBase, SetItem,
};
use nftables::schema::{
    Chain, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetType, SetTypeValue,
    Table,
};
use nftables::stmt::{Counter, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::FirewallError;

// include/uapi/linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
// include/uapi/linux/netfilter.h: NFPROTO_*
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
// include/uapi/linux/netfilter.h: NF_INET_* hooks
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_INET_POST_ROUTING: u32 = 4;
// include/uapi/linux/netfilter.h: verdicts
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
// nf_tables.h: enum nft_payload_bases
const NFT_PAYLOAD_LL_HEADER: u32 = 0;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
// nf_tables.h: enum nft_ct_attributes, enum nft_ct_keys
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
const NFT_CT_STATUS: u32 = 2;
// nf_tables.h: enum nft_fib_attributes, nft_fib_result, nft_fib_flags
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_SADDR: u32 = 1 << 0;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
const NFTA_FIB_F_MARK: u32 = 1 << 2;
const NFTA_FIB_F_IIF: u32 = 1 << 3;
const NFTA_FIB_F_OIF: u32 = 1 << 4;
// include/uapi/linux/rtnetlink.h: route types, what `fib ... type` yields
const RTN_UNICAST: u32 = 1;
const RTN_LOCAL: u32 = 2;
const RTN_BROADCAST: u32 = 3;
const RTN_MULTICAST: u32 = 5;
// nf_tables.h: enum nft_nat_attributes, enum nft_nat_types
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_FLAGS: u16 = 7;
const NFT_NAT_SNAT: u32 = 0;
const NFT_NAT_DNAT: u32 = 1;
// include/uapi/linux/netfilter/nf_nat.h
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 1 << 1;
// nf_tables.h: enum nft_counter_attributes
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
// nf_tables.h: enum nft_lookup_flags
const NFT_LOOKUP_F_INV: u32 = 1 << 0;
// include/uapi/linux/netfilter/nf_conntrack_common.h: ct state bits (NF_CT_STATE_BIT and
// the IP_CT_* it is made of) and ct status bits (enum ip_conntrack_status)
const CT_STATES: [(&str, u32); 5] = [
    ("invalid", 1),
    ("established", 1 << 1),
    ("related", 1 << 2),
    ("new", 1 << 3),
    ("untracked", 1 << 6),
];
const CT_STATUSES: [(&str, u32); 7] = [
    ("expected", 1),
    ("seen-reply", 1 << 1),
    ("assured", 1 << 2),
    ("confirmed", 1 << 3),
    ("snat", 1 << 4),
    ("dnat", 1 << 5),
    ("dying", 1 << 9),
];
// include/uapi/linux/in.h
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
// include/uapi/linux/if.h
const IFNAMSIZ: usize = 16;
// nftables include/datatype.h: enum datatypes, and TYPE_BITS for concatenations
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_ETHERADDR: u32 = 9;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_IFNAME: u32 = 41;
const TYPE_BITS: u32 = 6;
// libnftnl include/udata.h: NFTNL_UDATA_SET_KEYBYTEORDER; nftables BYTEORDER_BIG_ENDIAN
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const BYTEORDER_BIG_ENDIAN: u32 = 2;
/// Name of an anonymous set in the batch that adds it; the kernel numbers it.
const ANON_SET: &str = "__set%d";

/// One nf_tables message of a batch, with what it does in words for errors.
#[derive(Debug)]
pub(super) struct Message {
    family: u8,
    flags: u16,
    body: NfTablesMessage,
    what: String,
}

/// A whole transaction, ready to send.
#[derive(Debug, Default)]
pub(super) struct Compiled {
    messages: Vec<Message>,
}

impl Compiled {
    pub(super) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }
}

fn untranslatable(object: impl Into<String>, detail: impl Into<String>) -> FirewallError {
    FirewallError::NetlinkUntranslatable {
        object: object.into(),
        detail: detail.into(),
    }
}

fn family(f: NfFamily) -> u8 {
    let p = match f {
        NfFamily::IP => NetfilterProtoFamily::IPv4,
        NfFamily::IP6 => NetfilterProtoFamily::IPv6,
        NfFamily::INet => NetfilterProtoFamily::Inet,
        NfFamily::ARP => NetfilterProtoFamily::ARP,
        NfFamily::Bridge => NetfilterProtoFamily::Bridge,
        NfFamily::NetDev => NetfilterProtoFamily::NetDev,
    };
    p.into()
}

fn family_name(f: NfFamily) -> &'static str {
    match f {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::INet => "inet",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
    }
}

/// Compiles a document of commands (what [`nftables::batch::Batch::to_nftables`] gives)
/// into one transaction.
pub(super) fn compile(doc: &Nftables<'_>) -> Result<Compiled, FirewallError> {
    let mut c = Compiler::default();
    for obj in doc.objects.iter() {
        match obj {
            NfObject::CmdObject(NfCmd::Add(o)) => c.add(o)?,
            NfObject::CmdObject(NfCmd::Delete(o)) => c.delete(o)?,
            NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(ch))) => {
                c.push(
                    ch.family,
                    0,
                    NfTablesMessage::DeleteRule(RuleMessage {
                        attributes: vec![
                            RuleAttribute::Table(ch.table.to_string()),
                            RuleAttribute::Chain(ch.name.to_string()),
                        ],
                    }),
                    format!(
                        "flush chain {} {} {}",
                        family_name(ch.family),
                        ch.table,
                        ch.name
                    ),
                );
            }
            other => {
                return Err(untranslatable(
                    format!("{other:?}"),
                    "command not supported",
                ));
            }
        }
    }
    Ok(Compiled {
        messages: c.messages,
    })
}

#[derive(Default)]
struct Compiler {
    messages: Vec<Message>,
    /// Transaction-local ids of the anonymous sets added so far.
    next_set_id: u32,
}

impl Compiler {
    fn push(&mut self, f: NfFamily, flags: u16, body: NfTablesMessage, what: String) {
        self.messages.push(Message {
            family: family(f),
            flags,
            body,
            what,
        });
    }

    fn add(&mut self, o: &NfListObject<'_>) -> Result<(), FirewallError> {
        match o {
            NfListObject::Table(t) => self.table(t, true),
            NfListObject::Chain(ch) => self.chain(ch, true),
            NfListObject::Set(s) => self.set(s, true),
            NfListObject::Rule(r) => self.rule(r),
            other => Err(untranslatable(
                format!("add {other:?}"),
                "object not supported",
            )),
        }
    }

    fn delete(&mut self, o: &NfListObject<'_>) -> Result<(), FirewallError> {
        match o {
            NfListObject::Table(t) => self.table(t, false),
            NfListObject::Chain(ch) => self.chain(ch, false),
            NfListObject::Set(s) => self.set(s, false),
            other => Err(untranslatable(
                format!("delete {other:?}"),
                "object not supported",
            )),
        }
    }

    fn table(&mut self, t: &Table<'_>, add: bool) -> Result<(), FirewallError> {
        let mut attributes = vec![TableAttribute::Name(t.name.to_string())];
        let what = format!("table {} {}", family_name(t.family), t.name);
        if add {
            attributes.push(TableAttribute::Flags(TableFlags::empty()));
            self.push(
                t.family,
                NLM_F_CREATE,
                NfTablesMessage::NewTable(TableMessage { attributes }),
                format!("add {what}"),
            );
        } else {
            self.push(
                t.family,
                0,
                NfTablesMessage::DeleteTable(TableMessage { attributes }),
                format!("delete {what}"),
            );
        }
        Ok(())
    }

    fn chain(&mut self, ch: &Chain<'_>, add: bool) -> Result<(), FirewallError> {
        let what = format!("chain {} {} {}", family_name(ch.family), ch.table, ch.name);
        let mut attributes = vec![
            ChainAttribute::Table(ch.table.to_string()),
            ChainAttribute::Name(ch.name.to_string()),
        ];
        if !add {
            self.push(
                ch.family,
                0,
                NfTablesMessage::DeleteChain(ChainMessage { attributes }),
                format!("delete {what}"),
            );
            return Ok(());
        }
        if ch.newname.is_some() || ch.handle.is_some() || ch.dev.is_some() {
            return Err(untranslatable(
                format!("add {what}"),
                "rename, handle or device",
            ));
        }
        match (ch.hook, ch.prio, ch._type) {
            (Some(hook), Some(prio), Some(kind)) => {
                let number = match hook {
                    NfHook::Prerouting => NF_INET_PRE_ROUTING,
                    NfHook::Input => NF_INET_LOCAL_IN,
                    NfHook::Forward => NF_INET_FORWARD,
                    NfHook::Output => NF_INET_LOCAL_OUT,
                    NfHook::Postrouting => NF_INET_POST_ROUTING,
                    other => {
                        return Err(untranslatable(
                            format!("add {what}"),
                            format!("hook {other:?}"),
                        ));
                    }
                };
                attributes.push(ChainAttribute::Hook(vec![
                    Hook::Number(HookNumber::Other(number)),
                    // Two's complement on the wire, as the kernel reads it (s32).
                    Hook::Priority(prio as u32),
                ]));
                if let Some(policy) = ch.policy {
                    attributes.push(ChainAttribute::Policy(match policy {
                        NfChainPolicy::Accept => NF_ACCEPT,
                        NfChainPolicy::Drop => NF_DROP,
                    }));
                }
                attributes.push(ChainAttribute::Type(
                    match kind {
                        NfChainType::Filter => "filter",
                        NfChainType::NAT => "nat",
                        NfChainType::Route => "route",
                    }
                    .to_string(),
                ));
            }
            (None, None, None) if ch.policy.is_none() => {}
            _ => return Err(untranslatable(format!("add {what}"), "partial base chain")),
        }
        self.push(
            ch.family,
            NLM_F_CREATE,
            NfTablesMessage::NewChain(ChainMessage { attributes }),
            format!("add {what}"),
        );
        Ok(())
    }

    fn set(&mut self, s: &Set<'_>, add: bool) -> Result<(), FirewallError> {
        let what = format!("set {} {} {}", family_name(s.family), s.table, s.name);
        let mut attributes = vec![
            SetAttribute::Table(s.table.to_string()),
            SetAttribute::Name(s.name.to_string()),
        ];
        if !add {
            self.push(
                s.family,
                0,
                NfTablesMessage::DeleteSet(SetMessage { attributes }),
                format!("delete {what}"),
            );
            return Ok(());
        }
        let plain = s.flags.as_ref().is_none_or(|f| f.is_empty())
            && s.elem.is_none()
            && s.timeout.is_none()
            && s.gc_interval.is_none()
            && s.size.is_none()
            && s.policy.is_none()
            && s.handle.is_none();
        if !plain {
            return Err(untranslatable(
                format!("add {what}"),
                "flags, elements, size, policy or timeouts",
            ));
        }
        let types: Vec<SetType> = match &s.set_type {
            SetTypeValue::Single(t) => vec![*t],
            SetTypeValue::Concatenated(ts) => ts.to_vec(),
        };
        let concat = types.len() > 1;
        let (mut ktype, mut klen) = (0u32, 0u32);
        for t in types {
            let (id, len) = match t {
                SetType::Ipv4Addr => (TYPE_IPADDR, 4),
                SetType::Ipv6Addr => (TYPE_IP6ADDR, 16),
                SetType::EtherAddr => (TYPE_ETHERADDR, 6),
                SetType::InetProto => (TYPE_INET_PROTOCOL, 1),
                SetType::InetService => (TYPE_INET_SERVICE, 2),
                SetType::Ifname => (TYPE_IFNAME, IFNAMSIZ as u32),
                other => {
                    return Err(untranslatable(
                        format!("add {what}"),
                        format!("key type {other:?}"),
                    ));
                }
            };
            ktype = (ktype << TYPE_BITS) | id;
            // Each part of a concatenation takes whole 32-bit registers.
            klen += if concat { len.div_ceil(4) * 4 } else { len };
        }
        attributes.extend([
            SetAttribute::Flags(SetFlags::empty()),
            SetAttribute::KeyType(ktype),
            SetAttribute::KeyLen(klen),
            SetAttribute::Id(self.set_id()),
        ]);
        self.push(
            s.family,
            NLM_F_CREATE,
            NfTablesMessage::NewSet(SetMessage { attributes }),
            format!("add {what}"),
        );
        Ok(())
    }

    fn set_id(&mut self) -> u32 {
        self.next_set_id += 1;
        self.next_set_id
    }

    fn rule(&mut self, r: &Rule<'_>) -> Result<(), FirewallError> {
        let what = format!("add rule {} {} {}", family_name(r.family), r.table, r.chain);
        if r.handle.is_some() || r.index.is_some() || r.comment.is_some() {
            return Err(untranslatable(what, "handle, index or comment"));
        }
        let mut rc = RuleCompiler {
            family: r.family,
            table: &r.table,
            what: &what,
            exprs: vec![],
            l3: None,
            l4: None,
            sets: vec![],
        };
        for stmt in r.expr.iter() {
            rc.statement(stmt, self)?;
        }
        let RuleCompiler { exprs, sets, .. } = rc;
        for (set, elems) in sets {
            self.push(
                r.family,
                NLM_F_CREATE,
                set,
                format!("{what} (its anonymous set)"),
            );
            self.push(
                r.family,
                NLM_F_CREATE,
                elems,
                format!("{what} (its anonymous set's elements)"),
            );
        }
        self.push(
            r.family,
            NLM_F_CREATE | NLM_F_APPEND,
            NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(r.table.to_string()),
                    RuleAttribute::Chain(r.chain.to_string()),
                    RuleAttribute::Expressions(exprs),
                ],
            }),
            what,
        );
        Ok(())
    }
}

/// What a value on the right of a match is compared as.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Ifname,
    Nfproto,
    L4proto,
    Ipv4,
    Ipv6,
    /// A big-endian number of this many bytes (ports, raw payload).
    Be(usize),
    CtState,
    CtStatus,
    FibType,
}

struct RuleCompiler<'r> {
    family: NfFamily,
    table: &'r str,
    what: &'r str,
    exprs: Vec<ListAttribute<ExpressionAttribute>>,
    /// The layer 3 protocol (NFPROTO_*) a match of this rule already requires.
    l3: Option<u8>,
    /// The layer 4 protocol (IPPROTO_*) a match of this rule already requires.
    l4: Option<u8>,
    /// Anonymous sets (the set, its elements) the rule uses, added before it.
    sets: Vec<(NfTablesMessage, NfTablesMessage)>,
}

fn u32_be(kind: u16, v: u32) -> DefaultNla {
    DefaultNla::new(kind, v.to_be_bytes().to_vec())
}

fn other(name: &str, attributes: Vec<DefaultNla>) -> ListAttribute<ExpressionAttribute> {
    Expressions::Other {
        expression_type: name.to_string(),
        attributes,
    }
    .into()
}

fn verdict(code: Verdict, chain: Option<&str>) -> ListAttribute<ExpressionAttribute> {
    let mut v = vec![VerdictAttribute::Code(code)];
    if let Some(chain) = chain {
        v.push(VerdictAttribute::Chain(chain.to_string()));
    }
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(v)),
    ])
    .into()
}

impl RuleCompiler<'_> {
    fn err(&self, detail: impl Into<String>) -> FirewallError {
        untranslatable(self.what, detail)
    }

    fn meta_load(&mut self, key: NlMetaKey) {
        self.exprs.push(
            Expressions::Meta(vec![
                Meta::DestinationRegister(Register::Reg1),
                Meta::Key(key),
            ])
            .into(),
        );
    }

    fn cmp(&mut self, op: NlOperator, data: Vec<u8>) {
        self.exprs.push(
            Expressions::Cmp(vec![
                Cmp::SourceRegister(Register::Reg1),
                Cmp::Op(op),
                Cmp::Data(DataAttribute::Value(data)),
            ])
            .into(),
        );
    }

    fn payload_load(&mut self, base: u32, offset: u32, len: u32) {
        self.exprs.push(
            Expressions::Payload(vec![
                NlPayload::DestinationRegister(Register::Reg1),
                NlPayload::Base(base),
                NlPayload::Offset(offset),
                NlPayload::Len(len),
            ])
            .into(),
        );
    }

    /// `meta nfproto <p>` unless the rule already requires it, as nft adds before a field
    /// of the IPv4 or IPv6 header in the inet family.
    fn need_l3(&mut self, p: u8) -> Result<(), FirewallError> {
        match (self.family, self.l3) {
            (_, Some(have)) if have == p => Ok(()),
            (NfFamily::INet, None) => {
                self.meta_load(NlMetaKey::Nfproto);
                self.cmp(NlOperator::Equal, vec![p]);
                self.l3 = Some(p);
                Ok(())
            }
            (NfFamily::IP, None) if p == NFPROTO_IPV4 => Ok(()),
            (NfFamily::IP6, None) if p == NFPROTO_IPV6 => Ok(()),
            _ => Err(self.err(format!(
                "a layer 3 field of protocol {p} in family {:?}",
                self.family
            ))),
        }
    }

    /// `meta l4proto <p>` unless the rule already requires it, as nft adds before a
    /// field of the TCP or UDP header.
    fn need_l4(&mut self, p: u8) -> Result<(), FirewallError> {
        match self.l4 {
            Some(have) if have == p => Ok(()),
            None => {
                self.meta_load(NlMetaKey::L4Proto);
                self.cmp(NlOperator::Equal, vec![p]);
                self.l4 = Some(p);
                Ok(())
            }
            Some(_) => Err(self.err("two transport protocols in one rule")),
        }
    }

    fn statement(&mut self, stmt: &Statement<'_>, c: &mut Compiler) -> Result<(), FirewallError> {
        match stmt {
            Statement::Match(m) => self.matches(m, c),
            Statement::Accept(None) => {
                self.exprs.push(verdict(Verdict::Other(NF_ACCEPT), None));
                Ok(())
            }
            Statement::Drop(None) => {
                self.exprs.push(verdict(Verdict::Other(NF_DROP), None));
                Ok(())
            }
            Statement::Return(None) => {
                self.exprs.push(verdict(Verdict::Return, None));
                Ok(())
            }
            Statement::Continue(None) => {
                self.exprs.push(verdict(Verdict::Continue, None));
                Ok(())
            }
            Statement::Jump(t) => {
                self.exprs.push(verdict(Verdict::Jump, Some(&t.target)));
                Ok(())
            }
            Statement::Goto(t) => {
                self.exprs.push(verdict(Verdict::Goto, Some(&t.target)));
                Ok(())
            }
            Statement::Masquerade(None) => {
                self.exprs.push(other("masq", vec![]));
                Ok(())
            }
            Statement::Notrack => {
                self.exprs.push(other("notrack", vec![]));
                Ok(())
            }
            Statement::Counter(Counter::Anonymous(None)) => {
                self.exprs.push(other(
                    "counter",
                    vec![
                        DefaultNla::new(NFTA_COUNTER_BYTES, 0u64.to_be_bytes().to_vec()),
                        DefaultNla::new(NFTA_COUNTER_PACKETS, 0u64.to_be_bytes().to_vec()),
                    ],
                ));
                Ok(())
            }
            Statement::DNAT(Some(nat)) => self.nat(NFT_NAT_DNAT, nat),
            Statement::SNAT(Some(nat)) => self.nat(NFT_NAT_SNAT, nat),
            other => Err(self.err(format!("statement {other:?}"))),
        }
    }

    /// `dnat ip to <addr>:<port>` (or `snat`, `ip6`): both given, as the broker writes it.
    fn nat(&mut self, kind: u32, nat: &NAT<'_>) -> Result<(), FirewallError> {
        let (Some(Expression::String(addr)), Some(fam), Some(Expression::Number(port)), None) =
            (&nat.addr, nat.family, &nat.port, &nat.flags)
        else {
            return Err(self.err(format!("nat {nat:?}")));
        };
        let (proto, kind_addr) = match fam {
            NATFamily::IP => (NFPROTO_IPV4, Kind::Ipv4),
            NATFamily::IP6 => (NFPROTO_IPV6, Kind::Ipv6),
        };
        // nft would add `meta nfproto` here in the inet family; the broker always
        // matches it first, and only that is checked against nft's output.
        if self.family == NfFamily::INet && self.l3 != Some(proto) {
            return Err(self.err("nat without a prior match of its family"));
        }
        let port = u16::try_from(*port).map_err(|_| self.err(format!("port {port}")))?;
        let addr = self.value(kind_addr, &Expression::String(addr.clone()))?;
        for (reg, data) in [
            (Register::Reg1, addr),
            (Register::Reg2, port.to_be_bytes().to_vec()),
        ] {
            self.exprs.push(
                Expressions::Immediate(vec![
                    Immediate::DestinationRegister(reg),
                    Immediate::Data(DataAttribute::Value(data)),
                ])
                .into(),
            );
        }
        self.exprs.push(other(
            "nat",
            vec![
                u32_be(NFTA_NAT_TYPE, kind),
                u32_be(NFTA_NAT_FAMILY, u32::from(proto)),
                u32_be(NFTA_NAT_REG_ADDR_MIN, 1),
                u32_be(NFTA_NAT_REG_PROTO_MIN, 2),
                u32_be(NFTA_NAT_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED),
            ],
        ));
        Ok(())
    }

    fn matches(&mut self, m: &Match<'_>, c: &mut Compiler) -> Result<(), FirewallError> {
        let Expression::Named(left) = &m.left else {
            return Err(self.err(format!("match on {:?}", m.left)));
        };
        let op = match m.op {
            Operator::EQ => NlOperator::Equal,
            Operator::NEQ => NlOperator::NotEqual,
            Operator::IN => NlOperator::Equal,
            other => return Err(self.err(format!("operator {other:?}"))),
        };
        match left {
            NamedExpression::Meta(meta) => {
                if matches!(m.op, Operator::IN) {
                    return Err(self.err("`in` on meta"));
                }
                let (key, kind) = match meta.key {
                    MetaKey::Iifname => (NlMetaKey::Iifname, Kind::Ifname),
                    MetaKey::Oifname => (NlMetaKey::Oifname, Kind::Ifname),
                    MetaKey::Nfproto => (NlMetaKey::Nfproto, Kind::Nfproto),
                    MetaKey::L4proto => (NlMetaKey::L4Proto, Kind::L4proto),
                    other => return Err(self.err(format!("meta {other:?}"))),
                };
                self.meta_load(key);
                let data = self.value(kind, &m.right)?;
                if matches!(m.op, Operator::EQ) {
                    match kind {
                        Kind::Nfproto => self.l3 = Some(data[0]),
                        Kind::L4proto => self.l4 = Some(data[0]),
                        _ => {}
                    }
                }
                self.cmp(op, data);
                Ok(())
            }
            NamedExpression::Payload(Payload::PayloadField(f)) => {
                let (kind, base, offset, len) = match (&*f.protocol, &*f.field) {
                    ("ip", "saddr") => (Kind::Ipv4, NFT_PAYLOAD_NETWORK_HEADER, 12, 4),
                    ("ip", "daddr") => (Kind::Ipv4, NFT_PAYLOAD_NETWORK_HEADER, 16, 4),
                    ("ip6", "saddr") => (Kind::Ipv6, NFT_PAYLOAD_NETWORK_HEADER, 8, 16),
                    ("ip6", "daddr") => (Kind::Ipv6, NFT_PAYLOAD_NETWORK_HEADER, 24, 16),
                    ("tcp" | "udp", "sport") => (Kind::Be(2), NFT_PAYLOAD_TRANSPORT_HEADER, 0, 2),
                    ("tcp" | "udp", "dport") => (Kind::Be(2), NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
                    (p, field) => return Err(self.err(format!("payload {p} {field}"))),
                };
                match &*f.protocol {
                    "ip" => self.need_l3(NFPROTO_IPV4)?,
                    "ip6" => self.need_l3(NFPROTO_IPV6)?,
                    "tcp" => self.need_l4(IPPROTO_TCP)?,
                    _ => self.need_l4(IPPROTO_UDP)?,
                }
                self.field(kind, base, offset, len, m, op, c)
            }
            NamedExpression::Payload(Payload::PayloadRaw(raw)) => {
                let base = match raw.base {
                    PayloadBase::LL => NFT_PAYLOAD_LL_HEADER,
                    PayloadBase::NH => NFT_PAYLOAD_NETWORK_HEADER,
                    PayloadBase::TH => NFT_PAYLOAD_TRANSPORT_HEADER,
                    other => return Err(self.err(format!("payload base {other:?}"))),
                };
                if raw.offset % 8 != 0 || raw.len % 8 != 0 || raw.len == 0 || raw.len > 32 {
                    return Err(self.err("raw payload not in whole bytes of at most 4"));
                }
                let len = raw.len / 8;
                self.field(Kind::Be(len as usize), base, raw.offset / 8, len, m, op, c)
            }
            NamedExpression::CT(ct) => {
                if ct.family.is_some() || ct.dir.is_some() {
                    return Err(self.err("ct with family or direction"));
                }
                let (key, kind) = match &*ct.key {
                    "state" => (NFT_CT_STATE, Kind::CtState),
                    "status" => (NFT_CT_STATUS, Kind::CtStatus),
                    other => return Err(self.err(format!("ct {other}"))),
                };
                self.exprs.push(other(
                    "ct",
                    vec![u32_be(NFTA_CT_DREG, 1), u32_be(NFTA_CT_KEY, key)],
                ));
                let bits = self.value(kind, &m.right)?;
                if matches!(m.op, Operator::IN) {
                    // A flag test, as nft writes it: (reg & bits) != 0.
                    self.exprs.push(
                        Expressions::Bitwise(vec![
                            Bitwise::SourceRegister(Register::Reg1),
                            Bitwise::DestinationRegister(Register::Reg1),
                            Bitwise::Length(4),
                            Bitwise::Mask(DataAttribute::Value(bits)),
                            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
                        ])
                        .into(),
                    );
                    self.cmp(NlOperator::NotEqual, vec![0; 4]);
                } else {
                    self.cmp(op, bits);
                }
                Ok(())
            }
            NamedExpression::Fib(fib) => {
                if !matches!(fib.result, FibResult::Type) || matches!(m.op, Operator::IN) {
                    return Err(self.err(format!("fib {:?}", fib.result)));
                }
                let flags = fib.flags.iter().fold(0, |acc, f| {
                    acc | match f {
                        FibFlag::Saddr => NFTA_FIB_F_SADDR,
                        FibFlag::Daddr => NFTA_FIB_F_DADDR,
                        FibFlag::Mark => NFTA_FIB_F_MARK,
                        FibFlag::Iif => NFTA_FIB_F_IIF,
                        FibFlag::Oif => NFTA_FIB_F_OIF,
                    }
                });
                self.exprs.push(other(
                    "fib",
                    vec![
                        u32_be(NFTA_FIB_DREG, 1),
                        u32_be(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE),
                        u32_be(NFTA_FIB_FLAGS, flags),
                    ],
                ));
                let data = self.value(Kind::FibType, &m.right)?;
                self.cmp(op, data);
                Ok(())
            }
            other => Err(self.err(format!("match on {other:?}"))),
        }
    }

    /// A header field compared with a value, a prefix or an anonymous set.
    #[allow(clippy::too_many_arguments)]
    fn field(
        &mut self,
        kind: Kind,
        base: u32,
        offset: u32,
        len: u32,
        m: &Match<'_>,
        op: NlOperator,
        c: &mut Compiler,
    ) -> Result<(), FirewallError> {
        match &m.right {
            Expression::Named(NamedExpression::Prefix(p)) => {
                let addr = self.value(kind, &p.addr)?;
                let bits = p.len;
                if bits > len * 8 || matches!(m.op, Operator::IN) {
                    return Err(self.err(format!("prefix length {bits}")));
                }
                if bits % 8 == 0 {
                    // A byte-aligned prefix is a shorter load, as nft writes it.
                    let n = bits / 8;
                    if n == 0 {
                        return Err(self.err("prefix of length 0"));
                    }
                    self.payload_load(base, offset, n);
                    self.cmp(op, addr[..n as usize].to_vec());
                } else {
                    self.payload_load(base, offset, len);
                    let mut mask = vec![0u8; len as usize];
                    for (i, b) in mask.iter_mut().enumerate() {
                        let have = bits.saturating_sub(i as u32 * 8).min(8);
                        *b = (0xffu16 << (8 - have)) as u8;
                    }
                    self.exprs.push(
                        Expressions::Bitwise(vec![
                            Bitwise::SourceRegister(Register::Reg1),
                            Bitwise::DestinationRegister(Register::Reg1),
                            Bitwise::Length(len),
                            Bitwise::Mask(DataAttribute::Value(mask.clone())),
                            Bitwise::Xor(DataAttribute::Value(vec![0; len as usize])),
                        ])
                        .into(),
                    );
                    let masked: Vec<u8> = addr.iter().zip(&mask).map(|(a, m)| a & m).collect();
                    self.cmp(op, masked);
                }
                Ok(())
            }
            Expression::Named(NamedExpression::Set(items)) => {
                let ktype = match kind {
                    Kind::Ipv4 => TYPE_IPADDR,
                    Kind::Ipv6 => TYPE_IP6ADDR,
                    Kind::Be(2) => TYPE_INET_SERVICE,
                    other => return Err(self.err(format!("a set of {other:?}"))),
                };
                if matches!(m.op, Operator::IN) || items.is_empty() {
                    return Err(self.err("set match operator or empty set"));
                }
                let mut keys = vec![];
                for item in items {
                    let SetItem::Element(e) = item else {
                        return Err(self.err("set item that is not a plain element"));
                    };
                    keys.push(self.value(kind, e)?);
                }
                self.payload_load(base, offset, len);
                if let [key] = keys.as_slice() {
                    // A set of one is a comparison, as nft writes it.
                    self.cmp(op, key.clone());
                    return Ok(());
                }
                let id = c.set_id();
                let count = u32::try_from(keys.len()).map_err(|_| self.err("set size"))?;
                let mut udata = vec![UDATA_SET_KEYBYTEORDER, 4];
                udata.extend_from_slice(&BYTEORDER_BIG_ENDIAN.to_ne_bytes());
                let set = NfTablesMessage::NewSet(SetMessage {
                    attributes: vec![
                        SetAttribute::Table(self.table.to_string()),
                        SetAttribute::Name(ANON_SET.to_string()),
                        SetAttribute::Flags(SetFlags::Anonymous | SetFlags::Constant),
                        SetAttribute::KeyType(ktype),
                        SetAttribute::KeyLen(len),
                        SetAttribute::Id(id),
                        SetAttribute::Description(vec![SetDescription::Size(count)]),
                        SetAttribute::UserData(udata),
                    ],
                });
                let elems = NfTablesMessage::NewSetElement(SetElementMessage {
                    attributes: vec![
                        SetElementList::Table(self.table.to_string()),
                        SetElementList::Set(ANON_SET.to_string()),
                        SetElementList::SetId(id),
                        SetElementList::Elements(
                            keys.into_iter()
                                .map(|k| {
                                    ListAttribute::Element(vec![SetElementAttribute::Key(
                                        DataAttribute::Value(k),
                                    )])
                                })
                                .collect(),
                        ),
                    ],
                });
                self.sets.push((set, elems));
                let mut lookup = vec![
                    Lookup::Set(ANON_SET.to_string()),
                    Lookup::SourceRegister(Register::Reg1),
                    Lookup::SetId(id),
                ];
                if matches!(m.op, Operator::NEQ) {
                    lookup.push(Lookup::Flags(NFT_LOOKUP_F_INV));
                }
                self.exprs.push(Expressions::Lookup(lookup).into());
                Ok(())
            }
            right => {
                if matches!(m.op, Operator::IN) {
                    return Err(self.err("`in` on a header field"));
                }
                let data = self.value(kind, right)?;
                self.payload_load(base, offset, len);
                self.cmp(op, data);
                Ok(())
            }
        }
    }

    /// The bytes of `v` as a value of `kind`, as the kernel compares them.
    fn value(&self, kind: Kind, v: &Expression<'_>) -> Result<Vec<u8>, FirewallError> {
        let bad = || self.err(format!("{v:?} as {kind:?}"));
        let names = |table: &[(&str, u32)]| -> Result<Vec<u8>, FirewallError> {
            let one = |e: &Expression<'_>| match e {
                Expression::String(s) => table
                    .iter()
                    .find(|(n, _)| *n == s.as_ref())
                    .map(|(_, b)| *b)
                    .ok_or_else(bad),
                _ => Err(bad()),
            };
            let bits = match v {
                Expression::List(items) => items
                    .iter()
                    .try_fold(0u32, |acc, e| one(e).map(|b| acc | b))?,
                single => one(single)?,
            };
            // Host order, as the kernel keeps ct state and status in a register.
            Ok(bits.to_ne_bytes().to_vec())
        };
        match (kind, v) {
            (Kind::Ifname, Expression::String(s)) => {
                if s.ends_with('*') || s.len() >= IFNAMSIZ || s.contains('\0') {
                    return Err(bad());
                }
                let mut b = s.as_bytes().to_vec();
                b.resize(IFNAMSIZ, 0);
                Ok(b)
            }
            (Kind::Nfproto, Expression::String(s)) => match s.as_ref() {
                "ipv4" => Ok(vec![NFPROTO_IPV4]),
                "ipv6" => Ok(vec![NFPROTO_IPV6]),
                _ => Err(bad()),
            },
            (Kind::L4proto, Expression::String(s)) => match s.as_ref() {
                "tcp" => Ok(vec![IPPROTO_TCP]),
                "udp" => Ok(vec![IPPROTO_UDP]),
                _ => Err(bad()),
            },
            (Kind::L4proto | Kind::Nfproto, Expression::Number(n)) => {
                u8::try_from(*n).map(|b| vec![b]).map_err(|_| bad())
            }
            (Kind::Ipv4, Expression::String(s)) => match s.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) => Ok(a.octets().to_vec()),
                _ => Err(bad()),
            },
            (Kind::Ipv6, Expression::String(s)) => match s.parse::<IpAddr>() {
                Ok(IpAddr::V6(a)) => Ok(a.octets().to_vec()),
                _ => Err(bad()),
            },
            (Kind::Be(n), Expression::Number(x)) => {
                let b = x.to_be_bytes();
                if n > 4 || b[..4 - n].iter().any(|&z| z != 0) {
                    return Err(bad());
                }
                Ok(b[4 - n..].to_vec())
            }
            (Kind::CtState, _) => names(&CT_STATES),
            (Kind::CtStatus, _) => names(&CT_STATUSES),
            (Kind::FibType, Expression::String(s)) => {
                let t = match s.as_ref() {
                    "unicast" => RTN_UNICAST,
                    "local" => RTN_LOCAL,
                    "broadcast" => RTN_BROADCAST,
                    "multicast" => RTN_MULTICAST,
                    _ => return Err(bad()),
                };
                Ok(t.to_ne_bytes().to_vec())
            }
            _ => Err(bad()),
        }
    }
}

/// The `NETLINK_NETFILTER` socket transactions go through, kept open from one to the
/// next. Closing such a socket waits for the deferred destruction of what earlier
/// transactions replaced or deleted (the kernel flushes that work, an RCU grace period,
/// on every release of a netfilter netlink socket): 3 to 8 ms per `close` in an `strace`
/// of a network's creation, which every transaction paid when each opened its own.
/// Taken out of the cache for a transaction (no lock is held while it runs) and put back
/// only after one that ended cleanly, so no stale answer is ever read by the next.
#[derive(Clone, Default)]
pub(super) struct SocketCache(std::sync::Arc<std::sync::Mutex<Option<netlink_sys::Socket>>>);

impl std::fmt::Debug for SocketCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SocketCache")
    }
}

impl SocketCache {
    fn take(&self) -> Option<netlink_sys::Socket> {
        self.0.lock().expect("not poisoned").take()
    }

    fn put(&self, sock: netlink_sys::Socket) {
        *self.0.lock().expect("not poisoned") = Some(sock);
    }
}

/// A new `NETLINK_NETFILTER` socket in the calling thread's network namespace.
fn open_socket() -> std::io::Result<netlink_sys::Socket> {
    let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    // Errors carry the failing request's header only, and the kernel's message too.
    sock.set_cap_ack(true)?;
    sock.set_ext_ack(true)?;
    Ok(sock)
}

/// Sends `compiled` as one transaction over the socket of `cache` (opened here, in the
/// network namespace of the calling thread, the first time), and reads every
/// acknowledgement. The kernel handles the whole batch inside the `send`, so its answers
/// are queued before it returns; they are read without blocking, bounded by `timeout`
/// only as a safeguard.
pub(super) fn apply(
    compiled: Compiled,
    context: &str,
    timeout: std::time::Duration,
    cache: &SocketCache,
) -> Result<(), FirewallError> {
    if compiled.is_empty() {
        return Ok(());
    }
    let sock_err = |source: std::io::Error| FirewallError::NetlinkSocket {
        context: context.into(),
        source,
    };
    let sock = match cache.take() {
        Some(sock) => sock,
        None => open_socket().map_err(sock_err)?,
    };
    sock.set_non_blocking(false).map_err(sock_err)?;
    // Room for every acknowledgement at once (each takes about 1 KiB of buffer with its
    // socket buffer overhead): the kernel queues them all within the `send`, and one that
    // does not fit is lost, leaving the outcome unknown. Forced past `rmem_max`, which
    // CAP_NET_ADMIN allows; the plain option (capped) when that is refused.
    let room = (compiled.messages.len() + 2) * 1024 + (64 << 10);
    if nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &room).is_err() {
        sock.set_rx_buf_sz(room).map_err(sock_err)?;
    }

    // Sequence numbers: the batch markers, then one per message, from 1.
    let mut buf: Vec<u8> = vec![];
    let mut emit = |msg: NetlinkMessage<NetfilterMessage>| {
        let at = buf.len();
        buf.resize(at + msg.buffer_len(), 0);
        msg.serialize(&mut buf[at..]);
    };
    let control = |inner: ControlMessage, seq: u32| {
        let mut m = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
            inner,
        ));
        m.header.flags = NLM_F_REQUEST;
        m.header.sequence_number = seq;
        m.finalize();
        m
    };
    let n = compiled.messages.len() as u32;
    emit(control(ControlMessage::BatchBegin, 0));
    let mut whats = Vec::with_capacity(compiled.messages.len());
    for (i, m) in compiled.messages.into_iter().enumerate() {
        let mut msg = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::from(m.family), 0, 0),
            m.body,
        ));
        msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | m.flags;
        msg.header.sequence_number = i as u32 + 1;
        msg.finalize();
        emit(msg);
        whats.push(m.what);
    }
    emit(control(ControlMessage::BatchEnd, n + 1));

    let sent = sock.send(&buf, 0).map_err(sock_err)?;
    if sent != buf.len() {
        return Err(sock_err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            buf.len()
        ))));
    }
    sock.set_non_blocking(true).map_err(sock_err)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut acked = vec![false; whats.len()];
    let mut failure: Option<FirewallError> = None;
    let mut rx = Vec::with_capacity(1 << 16);
    loop {
        if failure.is_none() && acked.iter().all(|a| *a) {
            // Every answer read: nothing of this transaction is left for the next one.
            cache.put(sock);
            return Ok(());
        }
        rx.clear();
        match sock.recv(&mut rx, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(f) = failure {
                    // The failed batch was aborted whole; nothing more will come.
                    return Err(f);
                }
                wait_readable(&sock, deadline, context, timeout)?;
                continue;
            }
            Err(e) => return Err(sock_err(e)),
        }
        let mut off = 0;
        while off < rx.len() {
            let msg = match NetlinkMessage::<NetfilterMessage>::deserialize(&rx[off..]) {
                Ok(msg) => msg,
                Err(e) => {
                    return Err(sock_err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    )));
                }
            };
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            off += len.next_multiple_of(4);
            let seq = msg.header.sequence_number;
            let NetlinkPayload::Error(err) = msg.payload else {
                continue;
            };
            let object = match seq.checked_sub(1).and_then(|i| whats.get(i as usize)) {
                Some(what) => what.clone(),
                None => "the batch".to_string(),
            };
            match err.code {
                None => {
                    if let Some(a) = seq.checked_sub(1).and_then(|i| acked.get_mut(i as usize)) {
                        *a = true;
                    }
                }
                Some(code) => {
                    if failure.is_none() {
                        failure = Some(FirewallError::Netlink {
                            context: context.into(),
                            object,
                            source: std::io::Error::from_raw_os_error(-code.get()),
                        });
                    }
                }
            }
        }
    }
}

/// A chain as the kernel lists it.
#[derive(Debug)]
pub(super) struct ListedChain {
    pub(super) table: String,
    pub(super) name: String,
    /// The hook number (`NF_INET_*`) of a base chain.
    pub(super) hook: Option<u32>,
    /// The policy verdict (`NF_ACCEPT`, `NF_DROP`) of a base chain.
    pub(super) policy: Option<u32>,
}

/// Whether `c` is a base chain at the forward hook with policy drop.
pub(super) fn is_forward_drop(c: &ListedChain) -> bool {
    c.hook == Some(NF_INET_FORWARD) && c.policy == Some(NF_DROP)
}

/// The chains of the IPv4 family (`nft list chains ip`), by one `NFT_MSG_GETCHAIN` dump
/// over netlink, in the calling thread's network namespace.
pub(super) fn ipv4_chains(
    context: &str,
    timeout: std::time::Duration,
    cache: &SocketCache,
) -> Result<Vec<ListedChain>, FirewallError> {
    let sock_err = |source: std::io::Error| FirewallError::NetlinkSocket {
        context: context.into(),
        source,
    };
    let sock = match cache.take() {
        Some(sock) => sock,
        None => open_socket().map_err(sock_err)?,
    };
    sock.set_non_blocking(false).map_err(sock_err)?;
    let mut req = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
        NfTablesMessage::GetChain(ChainMessage { attributes: vec![] }),
    ));
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0).map_err(sock_err)?;
    sock.set_non_blocking(true).map_err(sock_err)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut chains = vec![];
    let mut rx = Vec::with_capacity(1 << 16);
    loop {
        rx.clear();
        match sock.recv(&mut rx, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(&sock, deadline, context, timeout)?;
                continue;
            }
            Err(e) => return Err(sock_err(e)),
        }
        let mut off = 0;
        while off < rx.len() {
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&rx[off..]).map_err(|e| {
                sock_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.to_string(),
                ))
            })?;
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            off += len.next_multiple_of(4);
            match msg.payload {
                NetlinkPayload::Done(_) => {
                    // The dump's last message: the socket is clean for the next use.
                    cache.put(sock);
                    return Ok(chains);
                }
                NetlinkPayload::Error(err) => {
                    if let Some(code) = err.code {
                        return Err(FirewallError::Netlink {
                            context: context.into(),
                            object: "list chains ip".into(),
                            source: std::io::Error::from_raw_os_error(-code.get()),
                        });
                    }
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewChain(c)),
                    ..
                }) => {
                    let mut chain = ListedChain {
                        table: String::new(),
                        name: String::new(),
                        hook: None,
                        policy: None,
                    };
                    for a in c.attributes {
                        match a {
                            ChainAttribute::Table(t) => chain.table = t,
                            ChainAttribute::Name(n) => chain.name = n,
                            ChainAttribute::Policy(p) => chain.policy = Some(p),
                            ChainAttribute::Hook(hooks) => {
                                for h in hooks {
                                    if let Hook::Number(n) = h {
                                        chain.hook = Some(u32::from(n));
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    chains.push(chain);
                }
                _ => {}
            }
        }
    }
}

/// Waits until `sock` has something to read, or fails at `deadline`.
fn wait_readable(
    sock: &netlink_sys::Socket,
    deadline: std::time::Instant,
    context: &str,
    timeout: std::time::Duration,
) -> Result<(), FirewallError> {
    let now = std::time::Instant::now();
    if now >= deadline {
        return Err(FirewallError::NetlinkTimeout {
            context: context.into(),
            after: timeout,
        });
    }
    let fd = std::os::fd::AsFd::as_fd(sock);
    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
    let left = (deadline - now).as_millis().min(u128::from(u16::MAX)) as u16;
    // An interrupted or timed-out poll only sends the caller round again.
    let _ = nix::poll::poll(&mut fds, left);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nftables::batch::Batch;

    use super::super::rules::{
        add_tables, delete_network_objects, delete_tables, dispatch_flush, dispatch_rule,
        forward_chains, network_objects, purge_network_objects,
    };
    use super::super::test_support::network as base;
    use super::super::{FirewallNetwork, NetState, OverlayGuard};
    use super::*;
    use crate::config::{PortForward, Protocol};

    /// The networks of every kind whose rules go through netlink.
    fn cases() -> Vec<(&'static str, FirewallNetwork)> {
        let mut ipv6 = base();
        ipv6.ipv6_prefix = Some("fd00:77::/64".parse().unwrap());
        ipv6.nat66 = true;
        let mut host = ipv6.clone();
        host.nat = false;
        let mut isolated = base();
        isolated.isolation = true;
        let mut forwards = ipv6.clone();
        forwards.forwards = vec![
            PortForward {
                protocol: Protocol::Tcp,
                external_port: 2222,
                internal_address: "10.77.0.5".parse().unwrap(),
                internal_port: 22,
                external_address: None,
            },
            PortForward {
                protocol: Protocol::Udp,
                external_port: 5353,
                internal_address: "10.77.0.6".parse().unwrap(),
                internal_port: 53,
                external_address: Some("192.0.2.9".parse().unwrap()),
            },
            PortForward {
                protocol: Protocol::Tcp,
                external_port: 8443,
                internal_address: "fd00:77::5".parse().unwrap(),
                internal_port: 443,
                external_address: Some("fd00::1".parse().unwrap()),
            },
        ];
        let mut overlay = base();
        overlay.overlay = Some(OverlayGuard {
            port: "vmnx-n1".into(),
            udp_port: 4789,
            vni: 42,
            peers: vec!["192.0.2.2".parse().unwrap(), "192.0.2.3".parse().unwrap()],
        });
        let mut overlay6 = overlay.clone();
        overlay6.overlay.as_mut().unwrap().peers = vec!["2001:db8::2".parse().unwrap()];
        vec![
            ("shared", base()),
            ("ipv6", ipv6),
            ("host", host),
            ("isolation", isolated),
            ("forwards", forwards),
            ("overlay", overlay),
            ("overlay over IPv6", overlay6),
        ]
    }

    fn state(net: &FirewallNetwork) -> NetState {
        NetState {
            net: net.clone(),
            ports: BTreeMap::new(),
            leases: BTreeMap::new(),
            dynamic: BTreeMap::new(),
            ifindex: BTreeMap::new(),
            fast_path: None,
            overlay_port: None,
        }
    }

    /// Every batch `mod.rs` builds from `rules.rs` for a network: its addition (as the
    /// first network and beside another), a restore, a change of its port forwards, its
    /// removal (beside another, and as the last one), a stale-table purge.
    fn batches(net: &FirewallNetwork) -> Vec<(&'static str, Batch<'static>)> {
        let mut other = base();
        other.name = "n2".into();
        other.bridge = "vmnbr1".into();
        other.tap_prefix = "vmnt8-".into();
        let mut add = Batch::new();
        add_tables(&mut add);
        dispatch_flush(&mut add);
        purge_network_objects(&mut add, &net.name);
        network_objects(&mut add, &state(net));
        dispatch_rule(&mut add, [&other, net]);
        let mut restore = Batch::new();
        delete_tables(&mut restore);
        add_tables(&mut restore);
        dispatch_flush(&mut restore);
        network_objects(&mut restore, &state(&other));
        network_objects(&mut restore, &state(net));
        dispatch_rule(&mut restore, [&other, net]);
        let mut forwards = Batch::new();
        add_tables(&mut forwards);
        forward_chains(&mut forwards, net, net.forwards.iter());
        let mut remove = Batch::new();
        dispatch_flush(&mut remove);
        dispatch_rule(&mut remove, [&other]);
        delete_network_objects(&mut remove, net);
        let mut last = Batch::new();
        delete_tables(&mut last);
        vec![
            ("add", add),
            ("restore", restore),
            ("forwards", forwards),
            ("remove", remove),
            ("remove the last", last),
        ]
    }

    #[test]
    fn every_batch_of_anti_spoofing_networks_translates() {
        for (case, net) in cases() {
            for (what, batch) in batches(&net) {
                let doc = batch.to_nftables();
                let compiled = compile(&doc)
                    .unwrap_or_else(|e| panic!("{case}, {what}: {}", crate::error::Chain(&e)));
                // One message per command, plus a set and its elements per `{ ... }`
                // (Not for a set of one element, which is a plain comparison.)
                let json = serde_json::to_string(&doc).unwrap();
                let sets = json.matches("\"set\":[").count()
                    - json.matches("\"set\":[\"2001:db8::2\"]").count();
                assert_eq!(
                    compiled.len(),
                    doc.objects.len() + 2 * sets,
                    "{case}, {what}"
                );
            }
        }
    }

    #[test]
    fn what_netlink_cannot_say_is_a_typed_error_naming_the_object() {
        // An allow_spoofing network's dispatch map (`iifname vmap { "tap*" : jump ... }`)
        // goes through nft (docs/design.md).
        let mut open = base();
        open.anti_spoofing = false;
        let mut batch = Batch::new();
        dispatch_rule(&mut batch, [&open]);
        let err = compile(&batch.to_nftables()).unwrap_err();
        let FirewallError::NetlinkUntranslatable { object, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(object, "add rule bridge vmnet_broker ports");
    }

    #[test]
    fn values_are_encoded_as_the_kernel_compares_them() {
        let rc = RuleCompiler {
            family: NfFamily::INet,
            table: "t",
            what: "w",
            exprs: vec![],
            l3: None,
            l4: None,
            sets: vec![],
        };
        let s = |v: &str| Expression::String(v.to_string().into());
        let mut ifname = b"vmnbr0".to_vec();
        ifname.resize(16, 0);
        assert_eq!(rc.value(Kind::Ifname, &s("vmnbr0")).unwrap(), ifname);
        // A wildcard is a prefix match nft writes differently: not guessed.
        assert!(rc.value(Kind::Ifname, &s("vmnt*")).is_err());
        assert_eq!(
            rc.value(Kind::Be(2), &Expression::Number(2222)).unwrap(),
            [8, 0xae]
        );
        assert!(rc.value(Kind::Be(2), &Expression::Number(70000)).is_err());
        assert_eq!(
            rc.value(Kind::Be(3), &Expression::Number(42)).unwrap(),
            [0, 0, 42]
        );
        let states = Expression::List(vec![s("established"), s("related")]);
        assert_eq!(
            rc.value(Kind::CtState, &states).unwrap(),
            6u32.to_ne_bytes()
        );
        assert_eq!(
            rc.value(Kind::CtStatus, &s("dnat")).unwrap(),
            32u32.to_ne_bytes()
        );
        assert_eq!(
            rc.value(Kind::FibType, &s("local")).unwrap(),
            2u32.to_ne_bytes()
        );
        assert_eq!(
            rc.value(Kind::Ipv4, &s("10.77.0.5")).unwrap(),
            [10, 77, 0, 5]
        );
        assert!(rc.value(Kind::Ipv4, &s("fd00::5")).is_err());
    }
}
