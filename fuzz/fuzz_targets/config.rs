//! The network file parser (`config::parse`, what `ConfigDir::load` calls on a file's
//! text), on arbitrary bytes. Whatever it accepts must be a network the backend can build:
//! the invariants below are what the Linux backend and the DHCP server rely on, and a
//! DHCP server made from an accepted file must offer an address of the network.
#![no_main]

use dhcproto::v4::{DhcpOption, Message, MessageType};
use dhcproto::{Decodable, Encodable};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};
use vmnet_broker::config;
use vmnet_broker::dhcp::{DhcpConfig, DhcpHandler};

fuzz_target!(|data: &[u8]| {
    // ConfigDir::load reads the file with read_to_string: non-UTF-8 never reaches parse.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/vmnet-broker.d/fuzz.json");
    let Ok(c) = config::parse("fuzz", path, text) else {
        return;
    };
    assert!((8..=30).contains(&c.prefix_len), "prefix /{}", c.prefix_len);
    assert!((576..=65520).contains(&c.mtu), "mtu {}", c.mtu);
    assert!(c.lease_seconds >= 60, "lease {}", c.lease_seconds);
    let Some(net) = c.fixed_subnet() else {
        assert!(c.dhcp_range.is_none() && c.dhcp_reservations.is_empty());
        return;
    };
    let gw = c.gateway.expect("a fixed subnet has a gateway");
    let host = |ip: Ipv4Addr| net.contains(&ip) && ip != net.network() && ip != net.broadcast();
    assert!(host(gw), "gateway {gw} in {net}");
    if let Some(r) = c.dhcp_range {
        assert!(
            host(r.start) && host(r.end) && r.start <= r.end,
            "{r:?} in {net}"
        );
    }
    for r in &c.dhcp_reservations {
        assert!(host(r.ip) && r.ip != gw, "{r:?} in {net}");
    }

    // The DHCP server the backend would start for it (services.rs), asked for an address.
    let mut dhcp = DhcpHandler::new(DhcpConfig {
        network: c.name.clone(),
        interface: "vmnb-fuzz".into(),
        subnet: net,
        gateway: gw,
        range: c.dhcp_range,
        reservations: c.dhcp_reservations.clone(),
        lease_seconds: c.lease_seconds,
        mtu: c.mtu,
        dns_server: c.dns.then_some(gw),
        domain: c.dns.then(|| "fuzz.vmnet".to_string()),
        // Empty: nothing to read, and the handler never writes.
        lease_file: PathBuf::new(),
    });
    let macs = c
        .dhcp_reservations
        .iter()
        .map(|r| r.mac.octets())
        .chain([[0x52, 0x54, 0, 0x12, 0x34, 0x56]]);
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let from: SocketAddr = "0.0.0.0:68".parse().unwrap();
    for mac in macs {
        let mut m = Message::default();
        m.set_chaddr(&mac).set_xid(7);
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        let Some((bytes, _)) = dhcp.handle(&m.to_vec().unwrap(), from, now) else {
            continue; // pool exhausted (e.g. a range holding only reserved addresses)
        };
        let offer = Message::from_bytes(&bytes).expect("our offer decodes");
        let ip = offer.yiaddr();
        assert!(host(ip) && ip != gw, "offered {ip} in {net} (gateway {gw})");
        if let Some(r) = c.dhcp_reservations.iter().find(|r| r.mac.octets() == mac) {
            assert_eq!(ip, r.ip, "reservation not honoured");
        } else if let Some(r) = c.dhcp_range {
            assert!(r.start <= ip && ip <= r.end, "offered {ip} outside {r:?}");
        }
    }
});
