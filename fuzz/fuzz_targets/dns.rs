//! The DNS server's handling of one query (`dns::prepare`: what the UDP and TCP loops do
//! with every query from an admitted client: parse, local answer or forward decision,
//! encoding with truncation), and the SERVFAIL sent for a forwarded query no upstream
//! answers, on arbitrary bytes.
//!
//! Input: the first byte chooses TCP (bit 0) and an empty domain (bit 1); the rest is
//! the DNS message. Checked beyond not panicking: every answer decodes, is a response
//! with the query's id, and a UDP answer is no larger than the client allows (or, at
//! most, the query itself: the server never amplifies).
#![no_main]

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddr};
use vmnet_broker::dns::{self, Action};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, pkt)) = data.split_first() else {
        return;
    };
    let tcp = flags & 1 != 0;
    let domain = if flags & 2 != 0 {
        String::new()
    } else {
        dns::canonical_domain("shared.vmnet.")
    };
    let names = vec![
        ("vm1".to_string(), Ipv4Addr::new(10, 77, 0, 2).into()),
        ("db".to_string(), Ipv4Addr::new(10, 77, 0, 3).into()),
        // A client may register its FQDN and mixed case.
        ("Web.shared.vmnet".to_string(), Ipv4Addr::new(10, 77, 0, 4).into()),
        ("db".to_string(), Ipv4Addr::new(10, 77, 0, 5).into()),
        ("db".to_string(), "fd00:77::5054:ff:fe00:3".parse().unwrap()),
    ];
    let peer: SocketAddr = "10.77.0.2:5353".parse().unwrap();
    let answer = match dns::prepare(pkt, tcp, peer, "fuzz", &domain, &names) {
        Action::Ignore => return,
        Action::Reply(bytes) => bytes,
        Action::Forward(req) => match dns::servfail(&req, tcp) {
            Some(bytes) => bytes,
            None => return,
        },
    };
    let req = Message::from_vec(pkt).expect("a query that got an answer parses");
    let resp = Message::from_vec(&answer).expect("our answer decodes");
    assert_eq!(resp.message_type, MessageType::Response);
    assert_eq!(resp.id, req.id);
    if !tcp {
        let allowed = usize::from(req.max_payload()).max(pkt.len());
        assert!(
            answer.len() <= allowed,
            "UDP answer of {} bytes to a {}-byte query allowing {}",
            answer.len(),
            pkt.len(),
            req.max_payload()
        );
    }
});
