//! A TAP fd standing in for a VM's NIC, and the Ethernet frames such a VM sends (ARP,
//! IPv4/UDP, DHCP), for tests that speak to the broker's networks frame by frame.
//! Include it as `#[path = "support/frames.rs"] mod frames;`.
#![allow(dead_code)]

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Encodable};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};
use vmnet_broker::client::Acquired;

pub const VNET_HDR: usize = 12;
pub const BROADCAST: [u8; 6] = [0xff; 6];
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV4: u16 = 0x0800;

/// The octets of MAC `s` (as the broker writes it).
pub fn parse_mac(s: &str) -> [u8; 6] {
    s.parse::<vmnet_broker::mac::Mac>()
        .unwrap_or_else(|e| panic!("{s:?}: {e}"))
        .octets()
}

/// The TAP fd of an acquire, used as a VM's NIC.
pub struct Tap {
    pub fd: OwnedFd,
    pub mac: [u8; 6],
}

impl Tap {
    /// The TAP of acquire `a`, with the MAC the broker gave it.
    pub fn new(a: Acquired) -> Tap {
        Tap {
            mac: parse_mac(&a.info.mac),
            fd: a.fd,
        }
    }

    /// Sends one Ethernet frame, behind the (all-zero: no offloads) virtio-net header.
    pub fn send(&self, frame: &[u8]) {
        let mut buf = vec![0u8; VNET_HDR];
        buf.extend_from_slice(frame);
        // SAFETY: write(2) reads at most buf.len() bytes from `buf`, an initialized slice
        // that long, borrowed for the call; `self.fd` is open for as long as `self`.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        assert_eq!(n, buf.len() as isize, "{}", std::io::Error::last_os_error());
    }

    /// The next frame (header stripped) within `wait`, or None.
    pub fn recv(&self, wait: Duration) -> Option<Vec<u8>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) reads and writes exactly one pollfd (nfds = 1) through the
        // pointer, which points to `pfd`, exclusively borrowed for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int) };
        if ready != 1 {
            return None;
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: read(2) writes at most buf.len() bytes into `buf`, exclusively borrowed
        // and that long; `self.fd` is open for as long as `self`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(
            n >= VNET_HDR as isize,
            "read: {}",
            std::io::Error::last_os_error()
        );
        buf.truncate(n as usize);
        Some(buf.split_off(VNET_HDR))
    }

    /// Every frame arriving within `wait`.
    pub fn drain(&self, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut frames = vec![];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(f) => frames.push(f),
                None => break,
            }
        }
        frames
    }

    /// Waits up to `wait` for a frame matching `want`, dropping others.
    pub fn wait_for(&self, wait: Duration, mut want: impl FnMut(&[u8]) -> bool) -> bool {
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(f) if want(&f) => return true,
                Some(_) => {}
                None => return false,
            }
        }
        false
    }

    /// Sends `frame` every 200 ms until a received frame matches or `wait` passes.
    pub fn ask(&self, frame: &[u8], wait: Duration, mut answer: impl FnMut(&[u8]) -> bool) -> bool {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            self.send(frame);
            if self.wait_for(Duration::from_millis(200), &mut answer) {
                return true;
            }
        }
        false
    }

    /// One DHCP exchange step: sends `kind` with `options` until a reply of type `want`
    /// with transaction `xid` comes, within `wait`.
    pub fn dhcp_exchange(
        &self,
        xid: u32,
        kind: MessageType,
        options: &[DhcpOption],
        want: MessageType,
        wait: Duration,
    ) -> Option<Message> {
        let frame = dhcp_frame(self.mac, xid, kind, options);
        let mut reply = None;
        self.ask(&frame, wait, |f| match dhcp_reply(f) {
            Some(m) if m.xid() == xid && m.opts().msg_type() == Some(want) => {
                reply = Some(m);
                true
            }
            _ => false,
        });
        reply
    }

    /// A full DHCP exchange (DISCOVER, OFFER, REQUEST, ACK); returns the ACK.
    pub fn dhcp(&self, xid: u32, wait: Duration) -> Message {
        self.dhcp_with(xid, wait, &[])
    }

    /// A full DHCP exchange whose REQUEST also carries `request_options` (a hostname,
    /// say); returns the ACK.
    pub fn dhcp_with(&self, xid: u32, wait: Duration, request_options: &[DhcpOption]) -> Message {
        let offer = self
            .dhcp_exchange(xid, MessageType::Discover, &[], MessageType::Offer, wait)
            .expect("no DHCP OFFER on the TAP");
        let server = server_id(&offer).expect("OFFER without server identifier");
        let mut options = vec![
            DhcpOption::RequestedIpAddress(offer.yiaddr()),
            DhcpOption::ServerIdentifier(server),
        ];
        options.extend_from_slice(request_options);
        let ack = self
            .dhcp_exchange(xid, MessageType::Request, &options, MessageType::Ack, wait)
            .expect("no DHCP ACK on the TAP");
        assert_eq!(ack.yiaddr(), offer.yiaddr());
        ack
    }
}

pub fn server_id(m: &Message) -> Option<Ipv4Addr> {
    match m.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => Some(*s),
        _ => None,
    }
}

pub fn mtu_option(m: &Message) -> Option<u16> {
    match m.opts().get(OptionCode::InterfaceMtu) {
        Some(DhcpOption::InterfaceMtu(m)) => Some(*m),
        _ => None,
    }
}

/// A DHCP server's message (to port 68) in frame `f`.
pub fn dhcp_reply(f: &[u8]) -> Option<Message> {
    Message::from_bytes(udp_payload_to(f, 68)?).ok()
}

/// A DHCP client's message (to port 67) in frame `f`.
pub fn dhcp_request(f: &[u8]) -> Option<Message> {
    Message::from_bytes(udp_payload_to(f, 67)?).ok()
}

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend(dst);
    f.extend(src);
    f.extend(ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An Ethernet/IPv4 ARP packet (RFC 826).
pub fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0x00, 6, 4];
    p.extend(op.to_be_bytes());
    p.extend(sha);
    p.extend(spa.octets());
    p.extend(tha);
    p.extend(tpa.octets());
    p
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet carrying one UDP datagram (UDP checksum 0: "none", allowed over IPv4).
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len() as u16;
    let mut p = vec![0x45, 0];
    p.extend((20 + udp_len).to_be_bytes());
    p.extend([0, 0, 0, 0, 64, 17, 0, 0]);
    p.extend(src.octets());
    p.extend(dst.octets());
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend(udp_len.to_be_bytes());
    p.extend([0, 0]);
    p.extend_from_slice(payload);
    p
}

/// The UDP payload of an Ethernet/IPv4 frame to UDP port `port`.
pub fn udp_payload_to(f: &[u8], port: u16) -> Option<&[u8]> {
    if f.len() < 14 + 20 || f[12..14] != ETH_IPV4.to_be_bytes() || f[14 + 9] != 17 {
        return None;
    }
    let udp = 14 + usize::from(f[14] & 0x0f) * 4;
    let hdr = f.get(udp..udp + 8)?;
    (hdr[2..4] == port.to_be_bytes()).then(|| &f[udp + 8..])
}

/// A broadcast DHCP client message from `mac` (also its chaddr).
pub fn dhcp_frame(mac: [u8; 6], xid: u32, kind: MessageType, options: &[DhcpOption]) -> Vec<u8> {
    dhcp_frame_as(mac, xid, mac, kind, Ipv4Addr::UNSPECIFIED, options)
}

/// A DHCP client message from `src` (Ethernet) in `chaddr`'s name, broadcast from
/// 0.0.0.0:68 to port 67, as a guest writes it into its TAP.
pub fn dhcp_frame_as(
    src: [u8; 6],
    xid: u32,
    chaddr: [u8; 6],
    kind: MessageType,
    ciaddr: Ipv4Addr,
    options: &[DhcpOption],
) -> Vec<u8> {
    let mut msg = Message::new_with_id(
        xid,
        ciaddr,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &chaddr,
    );
    msg.set_flags(Flags::default().set_broadcast());
    msg.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in options {
        msg.opts_mut().insert(o.clone());
    }
    ethernet(
        BROADCAST,
        src,
        ETH_IPV4,
        &ipv4_udp(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
            &msg.to_vec().unwrap(),
        ),
    )
}

/// Whether `f` is an ARP packet of operation `op` from `sha`/`spa` asking about or
/// answering for `tpa`.
pub fn is_arp(f: &[u8], op: u16, sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> bool {
    f.len() >= 42
        && f[12..14] == ETH_ARP.to_be_bytes()
        && f[20..22] == op.to_be_bytes()
        && f[22..28] == sha
        && f[28..32] == spa.octets()
        && f[38..42] == tpa.octets()
}
