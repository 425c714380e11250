//! Writes the seed corpora checked in under fuzz/corpus/ (docs/fuzzing.md):
//!     cd fuzz && cargo run --example seeds
//! Protocol seeds are the shared test vectors, config seeds the documented examples and
//! variations of them, DHCP seeds real client exchanges built with dhcproto, DNS seeds
//! queries of several types built with hickory-proto.

use dhcproto::Encodable;
use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};
use hickory_proto::op::{Edns, Message as DnsMessage, MessageType as DnsType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

const SEPARATOR: &[u8] = b"\n--8<--\n";

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("corpus");
    protocol(
        &root.join("../tests/vectors/messages.json"),
        &corpus.join("protocol"),
    );
    config(&corpus.join("config"));
    dhcp(&corpus.join("dhcp"));
    dns(&corpus.join("dns"));
}

/// Every message of the shared vectors that is small enough to be a useful seed.
fn protocol(vectors: &Path, dir: &Path) {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(vectors).unwrap()).unwrap();
    for section in [
        "encode_requests",
        "accepted_requests",
        "bad_requests",
        "replies",
    ] {
        for (i, e) in v[section].as_array().unwrap().iter().enumerate() {
            let bytes = if let Some(s) = e["bytes"].as_str() {
                s.as_bytes().to_vec()
            } else if let Some(h) = e["hex"].as_str() {
                (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                    .collect()
            } else {
                continue; // "repeat": tens of kilobytes of one byte
            };
            write(dir, &format!("{section}-{i:02}"), &bytes);
        }
    }
}

fn config(dir: &Path) {
    let files = [
        // docs/configuration.md
        (
            "doc-lab",
            r#"{
  "description": "lab network",
  "mode": "host",
  "subnet": "192.168.42.1",
  "mask": "255.255.255.240",
  "allowed_groups": ["lab"],
  "dhcp_reservations": [{"mac": "52:54:00:00:42:10", "ip": "192.168.42.10"}]
}
"#,
        ),
        (
            "doc-small",
            r#"{"mode": "shared", "mask": "255.255.255.240"}"#,
        ),
        ("empty", "{}"),
        (
            "range",
            r#"{"subnet": "10.0.0.1", "mask": "255.255.255.0", "dhcp_range": {"start": "10.0.0.100", "end": "10.0.0.199"}, "lease_time": 3600}"#,
        ),
        (
            "reservations",
            r#"{"subnet": "172.16.5.1", "mask": "255.255.0.0", "dhcp_reservations": [{"mac": "52-54-00-AB-CD-01", "ip": "172.16.5.2"}, {"mac": "52:54:00:ab:cd:02", "ip": "172.16.9.9"}]}"#,
        ),
        (
            "users",
            r#"{"mode": "host", "allowed_users": ["alice", 1000], "allowed_groups": [0, "kvm"], "isolation": true}"#,
        ),
        (
            "services-off",
            r#"{"mode": "shared", "dhcp": false, "dns": false, "allow_spoofing": true, "mtu": 9000}"#,
        ),
        (
            "wide",
            r#"{"subnet": "10.200.0.1", "mask": "255.0.0.0", "mtu": 576, "lease_time": 60}"#,
        ),
        (
            "narrow-range",
            r#"{"subnet": "192.168.7.1", "mask": "255.255.255.252", "dhcp_range": {"start": "192.168.7.2", "end": "192.168.7.2"}}"#,
        ),
        // Rejected ones, each for a different check.
        ("bad-field", r#"{"mtuu": 1500}"#),
        ("bad-mask", r#"{"mask": "255.0.255.0"}"#),
        ("bad-network-address", r#"{"subnet": "192.168.42.0"}"#),
        (
            "bad-range-order",
            r#"{"subnet": "10.0.0.1", "dhcp_range": {"start": "10.0.0.9", "end": "10.0.0.3"}}"#,
        ),
        (
            "bad-reservation-twice",
            r#"{"subnet": "10.0.0.1", "dhcp_reservations": [{"mac": "52:54:00:00:00:01", "ip": "10.0.0.3"}, {"mac": "52:54:00:00:00:01", "ip": "10.0.0.4"}]}"#,
        ),
        (
            "bad-range-without-subnet",
            r#"{"dhcp_range": {"start": "10.0.0.2", "end": "10.0.0.3"}}"#,
        ),
        ("bad-user", r#"{"allowed_users": [""]}"#),
    ];
    for (name, text) in files {
        write(dir, name, text.as_bytes());
    }
}

const MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0x01];
const RESERVED: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

fn packet(mac: [u8; 6], kind: Option<MessageType>, opts: Vec<DhcpOption>) -> Message {
    let mut m = Message::default();
    m.set_chaddr(&mac).set_xid(0x1234_5678);
    if let Some(kind) = kind {
        m.opts_mut().insert(DhcpOption::MessageType(kind));
    }
    m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::DomainName,
        OptionCode::InterfaceMtu,
    ]));
    for o in opts {
        m.opts_mut().insert(o);
    }
    m
}

fn dhcp(dir: &Path) {
    let ip = Ipv4Addr::new(10, 77, 0, 2);
    let discover = packet(
        MAC,
        Some(MessageType::Discover),
        vec![
            DhcpOption::Hostname("vm1".into()),
            DhcpOption::ClientIdentifier(vec![1, 0x52, 0x54, 0, 0xab, 0xcd, 0x01]),
        ],
    );
    let request = packet(
        MAC,
        Some(MessageType::Request),
        vec![
            DhcpOption::ServerIdentifier(GATEWAY),
            DhcpOption::RequestedIpAddress(ip),
            DhcpOption::Hostname("vm1".into()),
        ],
    );
    let init_reboot = packet(
        MAC,
        Some(MessageType::Request),
        vec![DhcpOption::RequestedIpAddress(ip)],
    );
    let mut renew = packet(MAC, Some(MessageType::Request), vec![]);
    renew.set_ciaddr(ip);
    let mut release = packet(
        MAC,
        Some(MessageType::Release),
        vec![DhcpOption::ServerIdentifier(GATEWAY)],
    );
    release.set_ciaddr(ip);
    let decline = packet(
        MAC,
        Some(MessageType::Decline),
        vec![
            DhcpOption::ServerIdentifier(GATEWAY),
            DhcpOption::RequestedIpAddress(ip),
        ],
    );
    let mut inform = packet(MAC, Some(MessageType::Inform), vec![]);
    inform.set_ciaddr(Ipv4Addr::new(10, 77, 0, 9));
    let other_server = packet(
        MAC,
        Some(MessageType::Request),
        vec![
            DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 254)),
            DhcpOption::RequestedIpAddress(ip),
        ],
    );
    let foreign = packet(
        MAC,
        Some(MessageType::Request),
        vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(
            192, 168, 1, 5,
        ))],
    );
    let reserved = packet(RESERVED, Some(MessageType::Discover), vec![]);
    let bootp = packet(MAC, None, vec![]);
    let mut relayed = discover.clone();
    relayed.set_giaddr(Ipv4Addr::new(10, 0, 0, 1));
    let mut reply = discover.clone();
    reply.set_opcode(Opcode::BootReply);
    let mut token_ring = discover.clone();
    token_ring.set_htype(HType::from(6u8));
    let mut long_name = discover.clone();
    long_name.opts_mut().insert(DhcpOption::Hostname(
        "My_VM.with.dots-and-UPPER-case".into(),
    ));
    let others: Vec<Message> = (2..=15u8)
        .map(|i| {
            packet(
                [0x52, 0x54, 0, 1, 2, i],
                Some(MessageType::Discover),
                vec![],
            )
        })
        .collect();

    let seq = |msgs: &[&Message]| -> Vec<u8> {
        let mut out = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(SEPARATOR);
            }
            out.extend_from_slice(&m.to_vec().unwrap());
        }
        out
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("discover", seq(&[&discover])),
        ("request-selecting", seq(&[&request])),
        ("request-init-reboot", seq(&[&init_reboot])),
        ("request-renewing", seq(&[&renew])),
        ("release", seq(&[&release])),
        ("decline", seq(&[&decline])),
        ("inform", seq(&[&inform])),
        ("discover-request", seq(&[&discover, &request])),
        (
            "discover-request-renew-release",
            seq(&[&discover, &request, &renew, &release]),
        ),
        (
            "discover-request-decline-discover",
            seq(&[&discover, &request, &decline, &discover]),
        ),
        (
            "discover-other-server",
            seq(&[&discover, &other_server, &discover]),
        ),
        ("request-foreign-address", seq(&[&foreign])),
        ("reserved-mac", seq(&[&reserved])),
        ("bootp", seq(&[&bootp])),
        ("relayed", seq(&[&relayed])),
        ("boot-reply", seq(&[&reply])),
        ("not-ethernet", seq(&[&token_ring])),
        ("hostname-fqdn", seq(&[&long_name, &request])),
        (
            "exhaust-pool",
            seq(&others.iter().chain([&discover]).collect::<Vec<_>>()),
        ),
    ];
    for (name, bytes) in seeds {
        write(dir, name, &bytes);
    }
}

fn query(name: &str, t: RecordType, edns: bool) -> DnsMessage {
    let mut m = DnsMessage::query();
    m.metadata.id = 0x4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

fn dns(dir: &Path) {
    let mut seeds: Vec<(&str, DnsMessage)> = vec![
        ("a-host", query("vm1.", RecordType::A, false)),
        ("a-fqdn", query("vm1.shared.vmnet.", RecordType::A, true)),
        (
            "a-fqdn-upper",
            query("VM1.Shared.VMNET.", RecordType::A, false),
        ),
        (
            "a-two-addresses",
            query("db.shared.vmnet.", RecordType::A, true),
        ),
        (
            "a-registered-fqdn",
            query("web.shared.vmnet.", RecordType::A, false),
        ),
        (
            "aaaa-host",
            query("vm1.shared.vmnet.", RecordType::AAAA, true),
        ),
        ("mx-host", query("vm1.shared.vmnet.", RecordType::MX, false)),
        ("txt-host", query("db.", RecordType::TXT, false)),
        ("any-host", query("vm1.", RecordType::ANY, false)),
        (
            "a-missing",
            query("nobody.shared.vmnet.", RecordType::A, true),
        ),
        ("soa-domain", query("shared.vmnet.", RecordType::SOA, false)),
        ("ns-domain", query("shared.vmnet.", RecordType::NS, false)),
        (
            "ptr",
            query("2.0.77.10.in-addr.arpa.", RecordType::PTR, true),
        ),
        (
            "ptr-missing",
            query("99.0.77.10.in-addr.arpa.", RecordType::PTR, false),
        ),
        (
            "ptr-short",
            query("77.10.in-addr.arpa.", RecordType::PTR, false),
        ),
        ("a-upstream", query("example.com.", RecordType::A, false)),
        (
            "aaaa-upstream",
            query("example.org.", RecordType::AAAA, true),
        ),
        ("root-ns", query(".", RecordType::NS, false)),
        (
            "srv-upstream",
            query("_sip._tcp.example.com.", RecordType::SRV, false),
        ),
    ];
    let mut ch = query("version.bind.", RecordType::TXT, false);
    ch.queries[0].set_query_class(DNSClass::CH);
    seeds.push(("chaos-class", ch));
    let mut two = query("vm1.", RecordType::A, false);
    two.add_query(Query::query(
        Name::from_ascii("db.").unwrap(),
        RecordType::A,
    ));
    seeds.push(("two-questions", two));
    let mut status = query("vm1.", RecordType::A, false);
    status.metadata.op_code = OpCode::Status;
    seeds.push(("opcode-status", status));
    let mut notify = query("shared.vmnet.", RecordType::SOA, false);
    notify.metadata.op_code = OpCode::Notify;
    seeds.push(("opcode-notify", notify));
    let mut response = query("vm1.", RecordType::A, false);
    response.metadata.message_type = DnsType::Response;
    seeds.push(("a-response", response));
    let mut small = query("vm1.shared.vmnet.", RecordType::A, false);
    let mut e = Edns::new();
    e.set_max_payload(100);
    small.set_edns(e);
    seeds.push(("edns-tiny-payload", small));
    for (name, m) in seeds {
        let bytes = m.to_vec().unwrap();
        // First byte: bit 0 TCP, bit 1 empty domain (fuzz_targets/dns.rs).
        let mut udp = vec![0u8];
        udp.extend_from_slice(&bytes);
        write(dir, &format!("{name}-udp"), &udp);
        if matches!(name, "a-fqdn" | "ptr" | "two-questions" | "a-upstream") {
            let mut tcp = vec![1u8];
            tcp.extend_from_slice(&bytes);
            write(dir, &format!("{name}-tcp"), &tcp);
        }
        if matches!(name, "a-host" | "a-fqdn" | "ptr") {
            let mut nodomain = vec![2u8];
            nodomain.extend_from_slice(&bytes);
            write(dir, &format!("{name}-no-domain"), &nodomain);
        }
    }
}
