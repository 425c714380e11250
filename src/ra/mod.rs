//! The broker's IPv6 router: the Router Advertisements (RFC 4861) it sends on each
//! network, so guests number themselves by SLAAC (RFC 4862) and learn the network's name
//! server and domain (RFC 8106). This module owns what is sent and when, as pure logic;
//! [`linux`] is the thin adapter that moves the messages through a raw ICMPv6 socket
//! bound to the network's bridge.
//!
//! The messages are built and parsed with smoltcp's typed NDP representation (header,
//! source link-layer address, MTU and prefix information options). RDNSS and DNSSL are
//! options smoltcp has no type for; they go through its generic option representation,
//! with the domain names in DNS wire form from hickory.

#[cfg(target_os = "linux")]
pub mod linux;

use hickory_proto::rr::Name;
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};
use ipnet::Ipv6Net;
use smoltcp::time::Duration as NdDuration;
use smoltcp::wire::{
    EthernetAddress, Icmpv6Message, Icmpv6Packet, NdiscOption, NdiscOptionRepr,
    NdiscPrefixInfoFlags, NdiscPrefixInformation, NdiscRepr, NdiscRouterFlags, RawHardwareAddress,
};
use std::net::Ipv6Addr;
use std::time::Duration;

/// Period of the unsolicited advertisements (RFC 4861 MaxRtrAdvInterval, whose default is
/// 600 s): short, because guests that miss or ignore the answer to their solicitation
/// should not wait minutes for their address, and an advertisement costs one multicast
/// frame a minute.
pub const INTERVAL: Duration = Duration::from_secs(60);
/// Advertisements are at least this far apart, however many solicitations arrive (RFC
/// 4861 MIN_DELAY_BETWEEN_RAS): a guest flooding solicitations gets no flood back.
pub const MIN_DELAY: Duration = Duration::from_secs(3);
/// Router lifetime on `shared` networks: three periods (RFC 4861's default ratio), so a
/// guest keeps its default route across two lost advertisements.
pub const ROUTER_LIFETIME: Duration = Duration::from_secs(3 * INTERVAL.as_secs());
/// Valid and preferred lifetimes of the prefix: long enough to ride out a broker restart
/// (the network and its prefix stay), short enough that a removed network's addresses
/// are gone from its guests within hours.
pub const PREFIX_VALID: Duration = Duration::from_secs(4 * 3600);
pub const PREFIX_PREFERRED: Duration = Duration::from_secs(3600);
/// Lifetime of the RDNSS and DNSSL options: three periods (RFC 8106 section 5.1's
/// recommendation).
pub const DNS_LIFETIME: Duration = ROUTER_LIFETIME;

/// The address every network's gateway has on the link, the source of its
/// advertisements (which must come from a link-local address). Fixed rather than derived
/// from the bridge's MAC so it is the same on every network and in every guest's
/// routing table; the broker adds it to each bridge.
pub const ROUTER_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// NDP option types smoltcp has no representation for.
const OPTION_RDNSS: u8 = 25;
const OPTION_DNSSL: u8 = 31;

/// What one network advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// The on-link prefix guests number themselves in (a /64).
    pub prefix: Ipv6Net,
    /// Zero on networks without a way out (`host`): guests take no default route from it.
    pub router_lifetime: Duration,
    pub prefix_valid: Duration,
    pub prefix_preferred: Duration,
    pub mtu: u32,
    /// The bridge's MAC (source link-layer address option), so guests need no neighbour
    /// solicitation to reach the router.
    pub source_mac: [u8; 6],
    /// The recursive DNS server (RDNSS), when the network has DNS.
    pub dns_server: Option<Ipv6Addr>,
    /// The search domain (DNSSL), when the network has DNS.
    pub search_domain: Option<String>,
    pub dns_lifetime: Duration,
}

/// Why bytes are not a Router Advertisement this module can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaError {
    #[error("not an NDP message: {0}")]
    Malformed(&'static str),
    #[error("ICMPv6 type {0} is not a Router Advertisement")]
    NotAdvert(u8),
    #[error("search domain {0:?} is not a DNS name")]
    BadDomain(String),
}

fn secs32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn nd(d: Duration) -> NdDuration {
    NdDuration::from_secs(d.as_secs())
}

/// The data of an option of `8 * len` bytes: `body` after the 2-byte type and length,
/// zero-padded. Returns the length in units of 8 octets, as NDP counts it.
fn padded(body: Vec<u8>) -> (u8, Vec<u8>) {
    let units = (body.len() + 2).div_ceil(8);
    let mut data = body;
    data.resize(units * 8 - 2, 0);
    (u8::try_from(units).unwrap_or(u8::MAX), data)
}

/// RDNSS (RFC 8106 5.1) and DNSSL (5.2) share a layout: 2 reserved bytes, the lifetime,
/// then the servers or the domain names.
fn dns_option_body(lifetime: Duration, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend_from_slice(&secs32(lifetime).to_be_bytes());
    body.extend_from_slice(payload);
    body
}

impl Advert {
    /// The ICMPv6 message (type 134), checksum left zero: the kernel computes it for raw
    /// ICMPv6 sockets (RFC 3542 section 3.1), as it knows the addresses.
    pub fn to_bytes(&self) -> Result<Vec<u8>, RaError> {
        let repr = NdiscRepr::RouterAdvert {
            hop_limit: 64,
            flags: NdiscRouterFlags::empty(),
            router_lifetime: nd(self.router_lifetime),
            reachable_time: NdDuration::from_millis(0),
            retrans_time: NdDuration::from_millis(0),
            lladdr: Some(RawHardwareAddress::from(EthernetAddress(self.source_mac))),
            mtu: Some(self.mtu),
            prefix_info: Some(NdiscPrefixInformation {
                prefix_len: self.prefix.prefix_len(),
                flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
                valid_lifetime: nd(self.prefix_valid),
                preferred_lifetime: nd(self.prefix_preferred),
                prefix: self.prefix.network(),
            }),
        };
        let mut extra: Vec<(u8, u8, Vec<u8>)> = Vec::new();
        if let Some(server) = self.dns_server {
            let (len, data) = padded(dns_option_body(self.dns_lifetime, &server.octets()));
            extra.push((OPTION_RDNSS, len, data));
        }
        if let Some(domain) = &self.search_domain {
            let name = Name::from_ascii(format!("{}.", domain.trim_end_matches('.')))
                .map_err(|_| RaError::BadDomain(domain.clone()))?;
            let wire = name
                .to_bytes()
                .map_err(|_| RaError::BadDomain(domain.clone()))?;
            let (len, data) = padded(dns_option_body(self.dns_lifetime, &wire));
            extra.push((OPTION_DNSSL, len, data));
        }
        let base = repr.buffer_len();
        let total = base
            + extra
                .iter()
                .map(|(_, l, _)| usize::from(*l) * 8)
                .sum::<usize>();
        let mut buf = vec![0u8; total];
        repr.emit(&mut Icmpv6Packet::new_unchecked(&mut buf[..base]));
        let mut offset = base;
        for (type_, length, data) in &extra {
            let end = offset + usize::from(*length) * 8;
            let opt = NdiscOptionRepr::Unknown {
                type_: *type_,
                length: *length,
                data,
            };
            opt.emit(&mut NdiscOption::new_unchecked(&mut buf[offset..end]));
            offset = end;
        }
        Ok(buf)
    }

    /// Reads an advertisement back (the tests' view of what a guest receives): the
    /// message from its ICMPv6 type on, without the IPv6 header. Options other than the
    /// ones [`Advert`] sends are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Advert, RaError> {
        let packet =
            Icmpv6Packet::new_checked(bytes).map_err(|_| RaError::Malformed("too short"))?;
        if packet.msg_type() != Icmpv6Message::RouterAdvert {
            return Err(RaError::NotAdvert(bytes[0]));
        }
        let NdiscRepr::RouterAdvert {
            router_lifetime,
            lladdr,
            mtu,
            prefix_info,
            ..
        } = NdiscRepr::parse(&packet).map_err(|_| RaError::Malformed("bad options"))?
        else {
            return Err(RaError::NotAdvert(bytes[0]));
        };
        let prefix_info = prefix_info.ok_or(RaError::Malformed("no prefix information"))?;
        let prefix = Ipv6Net::new(prefix_info.prefix, prefix_info.prefix_len)
            .map_err(|_| RaError::Malformed("prefix length over 128"))?;
        let source_mac: [u8; 6] = lladdr
            .ok_or(RaError::Malformed("no source link-layer address"))?
            .as_bytes()
            .try_into()
            .map_err(|_| RaError::Malformed("link-layer address is not a MAC"))?;
        let mut advert = Advert {
            prefix,
            router_lifetime: Duration::from_secs(router_lifetime.secs()),
            prefix_valid: Duration::from_secs(prefix_info.valid_lifetime.secs()),
            prefix_preferred: Duration::from_secs(prefix_info.preferred_lifetime.secs()),
            mtu: mtu.ok_or(RaError::Malformed("no MTU option"))?,
            source_mac,
            dns_server: None,
            search_domain: None,
            dns_lifetime: Duration::ZERO,
        };
        let mut options = packet.payload();
        while !options.is_empty() {
            let opt =
                NdiscOption::new_checked(options).map_err(|_| RaError::Malformed("bad option"))?;
            let len = usize::from(opt.data_len()) * 8;
            if len == 0 || len > options.len() {
                return Err(RaError::Malformed("bad option length"));
            }
            if let Ok(NdiscOptionRepr::Unknown { type_, data, .. }) = NdiscOptionRepr::parse(&opt)
                && data.len() >= 6
                && matches!(type_, OPTION_RDNSS | OPTION_DNSSL)
            {
                let lifetime = u32::from_be_bytes(data[2..6].try_into().expect("4 bytes"));
                advert.dns_lifetime = Duration::from_secs(u64::from(lifetime));
                let payload = &data[6..];
                if type_ == OPTION_RDNSS {
                    let first: [u8; 16] = payload
                        .get(..16)
                        .and_then(|b| b.try_into().ok())
                        .ok_or(RaError::Malformed("RDNSS without a server"))?;
                    advert.dns_server = Some(Ipv6Addr::from(first));
                } else {
                    let name = Name::from_bytes(payload)
                        .map_err(|_| RaError::Malformed("DNSSL without a name"))?;
                    advert.search_domain = Some(name.to_ascii().trim_end_matches('.').into());
                }
            }
            options = &options[len..];
        }
        Ok(advert)
    }
}

/// Whether `bytes` (an ICMPv6 message, without the IPv6 header) is a Router Solicitation.
pub fn is_router_solicit(bytes: &[u8]) -> bool {
    Icmpv6Packet::new_checked(bytes)
        .ok()
        .filter(|p| p.msg_type() == Icmpv6Message::RouterSolicit)
        .and_then(|p| NdiscRepr::parse(&p).ok())
        .is_some_and(|r| matches!(r, NdiscRepr::RouterSolicit { .. }))
}

/// When the next advertisement goes out, given when the last one went (`None`: never)
/// and whether a solicitation is waiting: a solicitation is answered at once unless the
/// last advertisement is younger than [`MIN_DELAY`], else the period runs. Times are
/// offsets from any fixed origin.
pub fn next_send(last: Option<Duration>, solicited: bool) -> Duration {
    match last {
        None => Duration::ZERO,
        Some(last) if solicited => last + MIN_DELAY,
        Some(last) => last + INTERVAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert() -> Advert {
        Advert {
            prefix: "fd12:3456:789a::/64".parse().unwrap(),
            router_lifetime: ROUTER_LIFETIME,
            prefix_valid: PREFIX_VALID,
            prefix_preferred: PREFIX_PREFERRED,
            mtu: 1500,
            source_mac: [0x02, b'v', 1, 2, 3, 4],
            dns_server: Some("fd12:3456:789a::1".parse().unwrap()),
            search_domain: Some("shared.vmnet".into()),
            dns_lifetime: DNS_LIFETIME,
        }
    }

    #[test]
    fn an_advert_reads_back_as_built() {
        let a = advert();
        let bytes = a.to_bytes().unwrap();
        assert_eq!(bytes[0], 134, "ICMPv6 type");
        // Options come in whole units of 8 octets after the 16-byte header.
        assert_eq!((bytes.len() - 16) % 8, 0);
        assert_eq!(Advert::parse(&bytes).unwrap(), a);
    }

    #[test]
    fn prefix_is_on_link_and_autonomous_and_host_networks_route_nothing() {
        let mut a = advert();
        a.router_lifetime = Duration::ZERO;
        a.dns_server = None;
        a.search_domain = None;
        let bytes = a.to_bytes().unwrap();
        let packet = Icmpv6Packet::new_checked(&bytes[..]).unwrap();
        let NdiscRepr::RouterAdvert {
            router_lifetime,
            prefix_info: Some(p),
            ..
        } = NdiscRepr::parse(&packet).unwrap()
        else {
            panic!("not an advert with a prefix");
        };
        assert_eq!(router_lifetime.secs(), 0);
        assert!(p.flags.contains(NdiscPrefixInfoFlags::ON_LINK));
        assert!(p.is_valid_prefix_info(), "{p:?}");
        let back = Advert::parse(&bytes).unwrap();
        assert_eq!((back.dns_server, back.search_domain), (None, None));
    }

    #[test]
    fn a_bad_domain_is_an_error_not_a_broken_option() {
        let mut a = advert();
        a.search_domain = Some("a..b".into());
        assert!(matches!(a.to_bytes(), Err(RaError::BadDomain(_))));
    }

    #[test]
    fn solicitations_are_recognised_and_answered_no_faster_than_min_delay() {
        let rs = NdiscRepr::RouterSolicit { lladdr: None };
        let mut buf = vec![0u8; rs.buffer_len()];
        rs.emit(&mut Icmpv6Packet::new_unchecked(&mut buf[..]));
        assert!(is_router_solicit(&buf));
        assert!(!is_router_solicit(&advert().to_bytes().unwrap()));
        assert!(!is_router_solicit(&[133]));
        let t = Duration::from_secs(100);
        assert_eq!(next_send(None, false), Duration::ZERO);
        assert_eq!(next_send(Some(t), true), t + MIN_DELAY);
        assert_eq!(next_send(Some(t), false), t + INTERVAL);
    }
}
