//! Answers for the network's own names (the VMs' DHCP hostnames); pure logic, no I/O.

use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::op::{Edns, Message, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// TTL of the VMs' records: short, since leases come and go with the VMs.
pub const LOCAL_TTL: u32 = 30;
/// How long resolvers may cache "no such name" under our domain (SOA minimum, RFC 2308):
/// shorter than LOCAL_TTL so that a VM that just got its lease becomes visible quickly.
pub const NEGATIVE_TTL: u32 = 10;
/// EDNS payload size we advertise (the DNS flag day 2020 value, fits unfragmented).
pub const EDNS_PAYLOAD: u16 = 1232;

/// Lowercases and removes the trailing dot, the form names are compared in.
fn canonical(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// What the local zone makes of a query.
pub struct Zone<'a> {
    /// Canonical domain ("shared.vmnet"), possibly empty.
    pub domain: &'a str,
    /// The network's (hostname, address) pairs: IPv4 leases and IPv6 SLAAC addresses.
    pub names: &'a [(String, IpAddr)],
}

impl Zone<'_> {
    /// The canonical domain for a configured one.
    pub fn canonical_domain(domain: &str) -> String {
        canonical(domain.trim_start_matches('.'))
    }

    /// The host part of a name registered by DHCP: a client may send its FQDN as hostname.
    fn host_of(&self, name: &str) -> String {
        let name = canonical(name);
        if !self.domain.is_empty()
            && let Some(host) = name.strip_suffix(self.domain)
            && let Some(host) = host.strip_suffix('.')
        {
            return host.to_string();
        }
        name
    }

    fn fqdn(&self, host: &str) -> Option<Name> {
        let text = if self.domain.is_empty() {
            format!("{host}.")
        } else {
            format!("{host}.{}.", self.domain)
        };
        Name::from_str_relaxed(text).ok()
    }

    /// The answer we give ourselves, or None when the query is for the upstream resolvers.
    pub fn answer(&self, req: &Message) -> Option<Message> {
        // Only plain single-question IN queries are ours; anything unusual is forwarded as is.
        let [q] = req.queries.as_slice() else {
            return None;
        };
        if q.query_class() != DNSClass::IN {
            return None;
        }
        let qname = canonical(&q.name().to_ascii());
        let qtype = q.query_type();

        if qtype == RecordType::PTR
            && let Some(ip) = reverse_address(q.name(), &qname)
        {
            let hosts: Vec<Name> = self
                .names
                .iter()
                .filter(|(_, a)| *a == ip)
                .filter_map(|(n, _)| self.fqdn(&self.host_of(n)))
                .collect();
            if hosts.is_empty() {
                return None;
            }
            let mut resp = response_to(req);
            for h in hosts {
                resp.add_answer(Record::from_rdata(
                    q.name().clone(),
                    LOCAL_TTL,
                    RData::PTR(PTR(h)),
                ));
            }
            return Some(resp);
        }

        let (host, in_domain) = if self.domain.is_empty() {
            (qname.as_str(), false)
        } else if qname == self.domain {
            // The apex exists (it holds the VMs): never NXDOMAIN, or a resolver applying
            // RFC 8020 would conclude that nothing below it exists either.
            let mut resp = response_to(req);
            if qtype == RecordType::SOA {
                resp.add_answer(self.soa());
            } else {
                resp.add_authority(self.soa());
            }
            return Some(resp);
        } else if let Some(host) = qname
            .strip_suffix(self.domain)
            .and_then(|h| h.strip_suffix('.'))
        {
            (host, true)
        } else {
            (qname.as_str(), false)
        };

        let ips: Vec<IpAddr> = self
            .names
            .iter()
            .filter(|(n, _)| self.host_of(n) == host)
            .map(|(_, ip)| *ip)
            .collect();
        if ips.is_empty() {
            if !in_domain {
                return None;
            }
            // Our domain is ours alone: unknown names there must not leak to the upstreams.
            let mut resp = response_to(req);
            resp.metadata.response_code = ResponseCode::NXDomain;
            if !self.domain.is_empty() {
                resp.add_authority(self.soa());
            }
            return Some(resp);
        }
        let mut resp = response_to(req);
        let records: Vec<RData> = ips
            .into_iter()
            .filter_map(|ip| match (ip, qtype) {
                (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(v4))),
                (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(v6))),
                _ => None,
            })
            .collect();
        if !records.is_empty() {
            for rdata in records {
                resp.add_answer(Record::from_rdata(q.name().clone(), LOCAL_TTL, rdata));
            }
        } else if !self.domain.is_empty() {
            // The name exists but has no data of this type (AAAA, MX...): NOERROR, empty,
            // with the SOA for negative caching.
            resp.add_authority(self.soa());
        }
        Some(resp)
    }

    fn soa(&self) -> Record {
        let apex =
            Name::from_str_relaxed(format!("{}.", self.domain)).unwrap_or_else(|_| Name::root());
        let rname = Name::from_str_relaxed(format!("hostmaster.{}.", self.domain))
            .unwrap_or_else(|_| Name::root());
        Record::from_rdata(
            apex.clone(),
            NEGATIVE_TTL,
            RData::SOA(SOA::new(apex, rname, 1, 3600, 600, 86400, NEGATIVE_TTL)),
        )
    }
}

/// The address a reverse name stands for: IPv4 ones by our own strict parser
/// ([`parse_reverse`]), IPv6 ones (32 nibble labels under ip6.arpa) by hickory's, taken
/// only when they name one whole address.
fn reverse_address(name: &Name, canonical: &str) -> Option<IpAddr> {
    if let Some(v4) = parse_reverse(canonical) {
        return Some(IpAddr::V4(v4));
    }
    match name.parse_arpa_name().ok()? {
        ipnet::IpNet::V6(v6) if v6.prefix_len() == 128 => Some(IpAddr::V6(v6.addr())),
        _ => None,
    }
}

/// "d.c.b.a.in-addr.arpa" → a.b.c.d (canonical form).
fn parse_reverse(qname: &str) -> Option<Ipv4Addr> {
    let rest = qname.strip_suffix(".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut parts = rest.split('.');
    for slot in octets.iter_mut().rev() {
        let p = parts.next()?;
        // No leading zeros or signs: "010" is not the label for 10.
        if p.is_empty()
            || (p.len() > 1 && p.starts_with('0'))
            || !p.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        *slot = p.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// An empty authoritative response to `req`: same ID, question, RD/CD, with RA since we
/// forward everything else.
pub fn response_to(req: &Message) -> Message {
    let mut resp = Message::response(req.id, req.op_code);
    resp.metadata = Metadata::response_from_request(&req.metadata);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_available = true;
    resp.add_queries(req.queries.iter().cloned());
    if req.edns.is_some() {
        // RFC 6891: a query with OPT gets a response with OPT.
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        resp.set_edns(edns);
    }
    resp
}

/// An error response (SERVFAIL, NOTIMP...) to `req` carrying its question.
pub fn error_to(req: &Message, code: ResponseCode) -> Message {
    let mut resp = response_to(req);
    resp.metadata.authoritative = false;
    resp.metadata.response_code = code;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m
    }

    fn names() -> Vec<(String, IpAddr)> {
        vec![
            ("vm1".into(), Ipv4Addr::new(10, 99, 0, 10).into()),
            (
                "VM2.shared.vmnet".into(),
                Ipv4Addr::new(10, 99, 0, 11).into(),
            ),
            (
                "VM2.shared.vmnet".into(),
                "fd00:99::5054:ff:fe00:2"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .into(),
            ),
        ]
    }

    fn a_answers(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(ip)) => Some(ip),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_for_short_and_fqdn_case_insensitive() {
        let n = names();
        let z = Zone {
            domain: "shared.vmnet",
            names: &n,
        };
        for q in ["vm1.", "VM1.Shared.VMNET.", "vm2.", "vm2.shared.vmnet."] {
            let r = z.answer(&query(q, RecordType::A)).expect(q);
            assert_eq!(r.metadata.id, 4242);
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(r.metadata.recursion_desired && r.metadata.authoritative);
            assert_eq!(a_answers(&r).len(), 1, "{q}");
            assert_eq!(r.answers[0].ttl, LOCAL_TTL);
        }
    }

    #[test]
    fn aaaa_for_a_name_with_an_ipv6_address_and_any_gives_both() {
        let n = names();
        let z = Zone {
            domain: "shared.vmnet",
            names: &n,
        };
        let r = z.answer(&query("vm2.", RecordType::AAAA)).unwrap();
        let got: Vec<_> = r.answers.iter().map(|r| r.data.clone()).collect();
        assert_eq!(
            got,
            vec![RData::AAAA(AAAA(
                "fd00:99::5054:ff:fe00:2".parse().unwrap()
            ))]
        );
        // A stays IPv4 only.
        let r = z
            .answer(&query("vm2.shared.vmnet.", RecordType::A))
            .unwrap();
        assert_eq!(r.answers.len(), 1);
        assert_eq!(a_answers(&r), vec![Ipv4Addr::new(10, 99, 0, 11)]);
        let r = z.answer(&query("vm2.", RecordType::ANY)).unwrap();
        assert_eq!(r.answers.len(), 2);
    }

    #[test]
    fn ptr_for_a_known_ipv6_address() {
        let n = names();
        let z = Zone {
            domain: "shared.vmnet",
            names: &n,
        };
        // fd00:99::5054:ff:fe00:2, nibble by nibble from the end.
        let q = "2.0.0.0.0.0.e.f.f.f.0.0.4.5.0.5.0.0.0.0.0.0.0.0.9.9.0.0.0.0.d.f.ip6.arpa.";
        let r = z.answer(&query(q, RecordType::PTR)).unwrap();
        let got: Vec<_> = r.answers.iter().map(|r| r.data.clone()).collect();
        assert_eq!(
            got,
            vec![RData::PTR(PTR(
                Name::from_ascii("vm2.shared.vmnet.").unwrap()
            ))]
        );
        // An unknown address, or a prefix rather than an address, is not ours.
        let other = q.replacen('2', "3", 1);
        assert!(z.answer(&query(&other, RecordType::PTR)).is_none());
        assert!(
            z.answer(&query("0.d.f.ip6.arpa.", RecordType::PTR))
                .is_none()
        );
    }

    #[test]
    fn aaaa_of_known_is_nodata_unknown_in_domain_is_nxdomain() {
        let n = names();
        let z = Zone {
            domain: "shared.vmnet",
            names: &n,
        };
        let r = z
            .answer(&query("vm1.shared.vmnet.", RecordType::AAAA))
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        let r = z
            .answer(&query("nope.shared.vmnet.", RecordType::A))
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = z.answer(&query("shared.vmnet.", RecordType::A)).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    }

    #[test]
    fn others_are_forwarded() {
        let n = names();
        let z = Zone {
            domain: "shared.vmnet",
            names: &n,
        };
        assert!(z.answer(&query("example.com.", RecordType::A)).is_none());
        assert!(z.answer(&query("nope.", RecordType::A)).is_none());
        assert!(z.answer(&query("vm1.other.", RecordType::A)).is_none());
        assert!(
            z.answer(&query("9.0.99.10.in-addr.arpa.", RecordType::PTR))
                .is_none()
        );
    }

    #[test]
    fn ptr_for_known_ip() {
        let n = names();
        let z = Zone {
            domain: "shared.vmnet",
            names: &n,
        };
        let r = z
            .answer(&query("11.0.99.10.in-addr.arpa.", RecordType::PTR))
            .unwrap();
        match &r.answers[0].data {
            RData::PTR(PTR(name)) => assert_eq!(name.to_ascii(), "vm2.shared.vmnet."),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reverse_parsing() {
        assert_eq!(
            parse_reverse("4.3.2.1.in-addr.arpa"),
            Some(Ipv4Addr::new(1, 2, 3, 4))
        );
        assert_eq!(parse_reverse("3.2.1.in-addr.arpa"), None);
        assert_eq!(parse_reverse("5.4.3.2.1.in-addr.arpa"), None);
        assert_eq!(parse_reverse("04.3.2.1.in-addr.arpa"), None);
        assert_eq!(parse_reverse("256.3.2.1.in-addr.arpa"), None);
    }
}
