//! The DHCP server's handling of received datagrams (`DhcpHandler::handle`: the same
//! parse, RFC 2131 logic, lease store and reply encoding as the server task), on arbitrary
//! sequences of packets against one server, so that DISCOVER/REQUEST/RELEASE/DECLINE
//! orders and lease expiry are explored, not only single packets.
//!
//! Input: packets separated by `SEPARATOR`; each is handled 90 s after the previous one
//! (the lease time is 600 s and an offer is held 60 s, so a few packets cross both).
//! Checked beyond not panicking: every reply decodes, answers the request's xid, and
//! offers only host addresses of the network other than the gateway; active leases never
//! share an address and every ACKed address is leased to the client that got the ACK.
#![no_main]

use dhcproto::Decodable;
use dhcproto::v4::{Message, MessageType, Opcode};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};
use vmnet_broker::config::Reservation;
use vmnet_broker::dhcp::{DhcpConfig, DhcpHandler};

const SEPARATOR: &[u8] = b"\n--8<--\n";
const MAX_PACKETS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let subnet: ipnet::Ipv4Net = "10.77.0.0/28".parse().unwrap();
    let gateway = Ipv4Addr::new(10, 77, 0, 1);
    let mut server = DhcpHandler::new(DhcpConfig {
        network: "fuzz".into(),
        interface: "vmnb-fuzz".into(),
        // A small pool, so that exhaustion and reclaiming are reachable.
        subnet,
        gateway,
        range: None,
        reservations: vec![Reservation {
            mac: [0x52, 0x54, 0, 0, 0, 0x10].into(),
            ip: Ipv4Addr::new(10, 77, 0, 10),
        }],
        lease_seconds: 600,
        mtu: 1500,
        dns_server: Some(gateway),
        domain: Some("fuzz.vmnet".into()),
        // Empty: nothing to read, and the handler never writes.
        lease_file: PathBuf::new(),
    });
    let from: SocketAddr = "0.0.0.0:68".parse().unwrap();
    let start = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    for (i, packet) in split(data).enumerate().take(MAX_PACKETS) {
        let now = start + Duration::from_secs(90 * i as u64);
        let Some((bytes, _broadcast)) = server.handle(packet, from, now) else {
            continue;
        };
        let req = Message::from_bytes(packet).expect("a packet that got a reply parses");
        let reply = Message::from_bytes(&bytes).expect("our reply decodes");
        assert_eq!(reply.opcode(), Opcode::BootReply);
        assert_eq!(reply.xid(), req.xid());
        assert_eq!(reply.chaddr()[..6], req.chaddr()[..6]);
        let yiaddr = reply.yiaddr();
        if !yiaddr.is_unspecified() {
            assert!(
                subnet.contains(&yiaddr)
                    && yiaddr != subnet.network()
                    && yiaddr != subnet.broadcast()
                    && yiaddr != gateway,
                "handed out {yiaddr}"
            );
        }
        let leases = server.leases(now);
        let mut seen = HashSet::new();
        for l in &leases {
            assert!(seen.insert(l.ip), "{} leased twice: {leases:?}", l.ip);
            assert!(subnet.contains(&l.ip) && l.ip != gateway, "lease {l:?}");
        }
        if reply.opts().msg_type() == Some(MessageType::Ack) && !yiaddr.is_unspecified() {
            assert!(
                leases
                    .iter()
                    .any(|l| l.ip == yiaddr && l.mac[..] == reply.chaddr()[..6]),
                "ACKed {yiaddr} is not leased to the client: {leases:?}"
            );
        }
    }
});

/// The packets of one input.
fn split(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        match data.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(i) => {
                let packet = &data[..i];
                data = &data[i + SEPARATOR.len()..];
                Some(packet)
            }
            None => Some(std::mem::take(&mut data)),
        }
    })
}
