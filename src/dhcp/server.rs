//! The socket loop and the RFC 2131 message handling.
//!
//! Reply addressing (RFC 2131 §4.1): relayed packets (giaddr set) are ignored, since the
//! broker's bridges have no relays. A reply goes to ciaddr when the client has one
//! (RENEWING, REBINDING, INFORM); otherwise it is broadcast to 255.255.255.255. The RFC
//! would unicast to yiaddr/chaddr when the broadcast flag is clear, but that needs an ARP
//! entry for an address the client does not have yet; broadcasting works for every
//! client (clients in INIT/SELECTING listen for broadcasts anyway) and costs nothing on
//! a small bridge. NAKs are always broadcast.

use super::leases::{self, AllocError, LeaseFile, LeaseStore, Refusal, sanitize_hostname};
use super::{BIND_TIMEOUT, BindHook, DhcpConfig, Lease};
use crate::mac::Mac;
use dhcproto::v4::{
    CLIENT_PORT, DhcpOption, DhcpOptions, Flags, HType, MIN_PACKET_SIZE, Message, MessageType,
    Opcode, OptionCode, SERVER_PORT,
};
use dhcproto::{Decodable, Encodable};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

/// UDP 0.0.0.0:67 bound to the bridge only. SO_BINDTODEVICE lets one server per bridge
/// share port 67 in one namespace; SO_REUSEADDR keeps a quick restart from failing.
pub(super) fn bind_socket(cfg: &DhcpConfig) -> io::Result<UdpSocket> {
    let ctx = |what: &str, e: nix::Error| {
        let e = io::Error::from(e);
        io::Error::new(
            e.kind(),
            format!(
                "network {}: DHCP socket on {}: {what}: {e}",
                cfg.network, cfg.interface
            ),
        )
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| ctx("socket", e))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| ctx("SO_REUSEADDR", e))?;
    setsockopt(&fd, sockopt::Broadcast, &true).map_err(|e| ctx("SO_BROADCAST", e))?;
    setsockopt(
        &fd,
        sockopt::BindToDevice,
        &OsString::from(cfg.interface.clone()),
    )
    .map_err(|e| ctx("SO_BINDTODEVICE", e))?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, SERVER_PORT))
        .map_err(|e| ctx("bind 0.0.0.0:67", e))?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dest {
    Broadcast,
    Unicast(Ipv4Addr),
}

impl Dest {
    fn addr(self) -> SocketAddr {
        let ip = match self {
            Dest::Broadcast => Ipv4Addr::BROADCAST,
            Dest::Unicast(ip) => ip,
        };
        SocketAddr::V4(SocketAddrV4::new(ip, CLIENT_PORT))
    }
}

/// The server's state: configuration, lease store and what was last saved/published.
pub(super) struct State {
    cfg: DhcpConfig,
    store: LeaseStore,
    saved: LeaseFile,
    tx: watch::Sender<Arc<Vec<Lease>>>,
    /// When each MAC was last told about pool exhaustion, so a client retrying every
    /// few seconds does not flood the log.
    exhausted_warned: HashMap<[u8; 6], SystemTime>,
}

/// How often pool exhaustion is logged at warning level per client.
const EXHAUSTED_WARN_EVERY: Duration = Duration::from_secs(60);

impl State {
    /// Builds the store and loads the lease file (never fails: a bad file is logged and
    /// the server starts empty).
    pub(super) fn new(cfg: DhcpConfig) -> (State, watch::Receiver<Arc<Vec<Lease>>>) {
        let mut store = LeaseStore::new(
            cfg.subnet,
            cfg.gateway,
            cfg.range.as_ref(),
            &cfg.reservations,
        );
        // The directory is made once, here: a save after someone removed it (a network
        // torn down with its state) fails and is logged rather than recreating it.
        if let Some(dir) = cfg.lease_file.parent()
            && !dir.as_os_str().is_empty()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            warn!(
                network = cfg.network,
                "cannot create {}: {e}",
                dir.display()
            );
        }
        if let Some(file) = read_lease_file(&cfg.network, &cfg.lease_file) {
            let skipped = store.load(file);
            if skipped > 0 {
                info!(
                    network = cfg.network,
                    "{skipped} lease(s) in {} no longer fit the network and were dropped",
                    cfg.lease_file.display()
                );
            }
        }
        let saved = store.to_file();
        let (tx, rx) = watch::channel(Arc::new(store.active(SystemTime::now())));
        (
            State {
                cfg,
                store,
                saved,
                tx,
                exhausted_warned: HashMap::new(),
            },
            rx,
        )
    }

    fn lease_time(&self) -> Duration {
        Duration::from_secs(u64::from(self.cfg.lease_seconds.max(1)))
    }

    /// Parses and handles one received datagram: everything the socket loop does with a
    /// packet before the bind hook and the send, so that [`super::DhcpHandler`] (the fuzz
    /// target's entry point) exercises exactly the daemon's path.
    pub(super) fn receive(
        &mut self,
        packet: &[u8],
        from: SocketAddr,
        now: SystemTime,
    ) -> Option<(Message, Dest)> {
        if let Some(code) = option_with_bad_length(packet) {
            debug!(
                network = self.cfg.network,
                "DHCP: malformed packet from {from}: option {code} has an impossible length"
            );
            return None;
        }
        let msg = match Message::from_bytes(packet) {
            Ok(m) => m,
            Err(e) => {
                debug!(
                    network = self.cfg.network,
                    "DHCP: malformed packet from {from}: {e}"
                );
                return None;
            }
        };
        self.handle(&msg, now)
    }

    /// Handles one request; returns the reply, if any.
    pub(super) fn handle(&mut self, msg: &Message, now: SystemTime) -> Option<(Message, Dest)> {
        let net = &self.cfg.network;
        if msg.opcode() != Opcode::BootRequest {
            debug!(
                network = net,
                "DHCP: ignoring non-request op {:?}",
                msg.opcode()
            );
            return None;
        }
        // Checking hlen first also keeps chaddr() from slicing past its 16 bytes.
        if msg.htype() != HType::Eth || msg.hlen() != 6 {
            debug!(
                network = net,
                "DHCP: ignoring non-Ethernet hardware address"
            );
            return None;
        }
        if !msg.giaddr().is_unspecified() {
            debug!(
                network = net,
                "DHCP: ignoring relayed packet (giaddr {})",
                msg.giaddr()
            );
            return None;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&msg.chaddr()[..6]);
        let Some(kind) = msg.opts().msg_type() else {
            debug!(
                network = net,
                "DHCP: ignoring BOOTP packet from {}",
                Mac::from(mac)
            );
            return None;
        };
        let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        match kind {
            MessageType::Discover => self.discover(msg, mac, requested, now),
            MessageType::Request => self.request(msg, mac, requested, now),
            MessageType::Release => {
                if self.store.release(mac, msg.ciaddr(), now) {
                    info!(
                        network = net,
                        "DHCP: {} released {}",
                        Mac::from(mac),
                        msg.ciaddr()
                    );
                }
                None
            }
            MessageType::Decline => {
                if let Some(ip) = requested
                    && self.store.decline(mac, ip, now)
                {
                    warn!(
                        network = net,
                        "DHCP: {} declined {ip} (in use by another host?); not handing it out for {} s",
                        Mac::from(mac),
                        leases::DECLINE_HOLD.as_secs()
                    );
                }
                None
            }
            MessageType::Inform => {
                // RFC 2131 §4.3.5: configuration only, no lease and no yiaddr.
                let reply = self.reply(msg, MessageType::Ack, Ipv4Addr::UNSPECIFIED, false);
                Some((reply, client_dest(msg)))
            }
            other => {
                debug!(
                    network = net,
                    "DHCP: ignoring {other:?} from {}",
                    Mac::from(mac)
                );
                None
            }
        }
    }

    fn discover(
        &mut self,
        msg: &Message,
        mac: [u8; 6],
        requested: Option<Ipv4Addr>,
        now: SystemTime,
    ) -> Option<(Message, Dest)> {
        match self.store.select(mac, requested, now) {
            Ok(ip) => {
                self.store.offer(mac, ip, now);
                debug!(
                    network = self.cfg.network,
                    "DHCP: offering {ip} to {}",
                    Mac::from(mac)
                );
                Some((
                    self.reply(msg, MessageType::Offer, ip, true),
                    Dest::Broadcast,
                ))
            }
            Err(AllocError::Exhausted(n)) => {
                let line = format!(
                    "network {}: DHCP pool exhausted ({n} addresses), no offer for {}",
                    self.cfg.network,
                    Mac::from(mac)
                );
                let recently = self.exhausted_warned.get(&mac).is_some_and(|t| {
                    now.duration_since(*t).unwrap_or_default() < EXHAUSTED_WARN_EVERY
                });
                if recently {
                    debug!("{line}");
                } else {
                    warn!("{line}");
                    self.exhausted_warned.retain(|_, t| {
                        now.duration_since(*t).unwrap_or_default() < EXHAUSTED_WARN_EVERY
                    });
                    self.exhausted_warned.insert(mac, now);
                }
                None
            }
        }
    }

    /// RFC 2131 §4.3.2: the client state is told apart by server identifier, requested
    /// address and ciaddr.
    fn request(
        &mut self,
        msg: &Message,
        mac: [u8; 6],
        requested: Option<Ipv4Addr>,
        now: SystemTime,
    ) -> Option<(Message, Dest)> {
        let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        let (ip, client_state) = match (server_id, requested) {
            // SELECTING, but the client chose another server's offer.
            (Some(sid), _) if sid != self.cfg.gateway => {
                self.store.cancel_offer(mac);
                return None;
            }
            (Some(_), Some(ip)) => (ip, "SELECTING"),
            (None, Some(ip)) => (ip, "INIT-REBOOT"),
            (Some(_), None) => {
                debug!(
                    network = self.cfg.network,
                    "DHCP: REQUEST from {} names us but requests no address",
                    Mac::from(mac)
                );
                return None;
            }
            // RENEWING (unicast) or REBINDING (broadcast).
            (None, None) if !msg.ciaddr().is_unspecified() => (msg.ciaddr(), "RENEWING/REBINDING"),
            (None, None) => {
                debug!(
                    network = self.cfg.network,
                    "DHCP: REQUEST from {} without address",
                    Mac::from(mac)
                );
                return None;
            }
        };
        // A client in INIT-REBOOT with an address we have no record of gets it if it is
        // free for it (RFC 2131 would stay silent); this keeps a VM's address when the
        // lease file was lost, and the broker is the only server on its bridge.
        let hostname = match msg.opts().get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => sanitize_hostname(h),
            _ => None,
        };
        let was = self.store.active_ip(mac, now);
        match self
            .store
            .bind(mac, ip, hostname.clone(), self.lease_time(), now)
        {
            Ok(refused) => {
                let hostname = match refused {
                    Some((name, holder)) => {
                        warn!(
                            network = self.cfg.network,
                            "DHCP: hostname {name:?} of {} refused: the live lease of {} holds it",
                            Mac::from(mac),
                            Mac::from(holder)
                        );
                        None
                    }
                    None => hostname,
                };
                if was == Some(ip) {
                    debug!(
                        network = self.cfg.network,
                        "DHCP: renewed {ip} for {} ({client_state})",
                        Mac::from(mac)
                    );
                } else {
                    info!(
                        network = self.cfg.network,
                        "DHCP: leased {ip} to {}{}",
                        Mac::from(mac),
                        hostname.map(|h| format!(" ({h})")).unwrap_or_default()
                    );
                }
                let reply = self.reply(msg, MessageType::Ack, ip, true);
                Some((reply, client_dest(msg)))
            }
            Err(why) => {
                let text = match why {
                    Refusal::NotInSubnet => "address not on this network".to_string(),
                    Refusal::NotInPool => "address not in the pool".to_string(),
                    Refusal::ReservedForMac(r) => format!("address {r} is reserved for you"),
                    Refusal::InUse => "address in use".to_string(),
                };
                info!(
                    network = self.cfg.network,
                    "DHCP: NAK {ip} for {} ({client_state}): {text}",
                    Mac::from(mac)
                );
                let mut nak = self.base_reply(msg, MessageType::Nak);
                nak.opts_mut().insert(DhcpOption::Message(text));
                Some((nak, Dest::Broadcast))
            }
        }
    }

    /// The fields and options every reply carries (Table 3 of RFC 2131).
    fn base_reply(&self, msg: &Message, kind: MessageType) -> Message {
        let mut r = Message::new_with_id(
            msg.xid(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            msg.chaddr(),
        );
        r.set_opcode(Opcode::BootReply)
            .set_htype(HType::Eth)
            .set_flags(Flags::new(u16::from(msg.flags()) & 0x8000));
        let mut opts = DhcpOptions::new();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(self.cfg.gateway));
        // RFC 6842: echo the client identifier.
        if let Some(id @ DhcpOption::ClientIdentifier(_)) =
            msg.opts().get(OptionCode::ClientIdentifier)
        {
            opts.insert(id.clone());
        }
        r.set_opts(opts);
        r
    }

    fn reply(&self, msg: &Message, kind: MessageType, yiaddr: Ipv4Addr, lease: bool) -> Message {
        let cfg = &self.cfg;
        let mut r = self.base_reply(msg, kind);
        if kind == MessageType::Ack {
            r.set_ciaddr(msg.ciaddr());
        }
        r.set_yiaddr(yiaddr);
        let o = r.opts_mut();
        o.insert(DhcpOption::SubnetMask(cfg.subnet.netmask()));
        o.insert(DhcpOption::BroadcastAddr(cfg.subnet.broadcast()));
        o.insert(DhcpOption::Router(vec![cfg.gateway]));
        if let Some(dns) = cfg.dns_server {
            o.insert(DhcpOption::DomainNameServer(vec![dns]));
        }
        if let Some(domain) = &cfg.domain {
            o.insert(DhcpOption::DomainName(domain.clone()));
        }
        // 68 is the minimum IPv4 MTU (RFC 2132 §5.1).
        o.insert(DhcpOption::InterfaceMtu(cfg.mtu.clamp(68, 65535) as u16));
        if lease {
            let secs = cfg.lease_seconds.max(1);
            o.insert(DhcpOption::AddressLeaseTime(secs));
            // T1 = 0.5 and T2 = 0.875 of the lease (RFC 2131 §4.4.5).
            o.insert(DhcpOption::Renewal(secs / 2));
            o.insert(DhcpOption::Rebinding((u64::from(secs) * 7 / 8) as u32));
        }
        if let Some(DhcpOption::Hostname(h)) = msg.opts().get(OptionCode::Hostname) {
            o.insert(DhcpOption::Hostname(h.clone()));
        }
        r
    }

    /// Saves and publishes when the lease set changed. Offers alone change nothing that
    /// is saved; reclaiming or binding does.
    fn commit(&mut self, now: SystemTime) {
        let file = self.store.to_file();
        if file != self.saved {
            if let Err(e) = write_lease_file(&self.cfg.lease_file, &file) {
                warn!(
                    network = self.cfg.network,
                    "DHCP: cannot save leases to {}: {e}",
                    self.cfg.lease_file.display()
                );
            }
            self.saved = file;
        }
        self.publish(now);
    }

    pub(super) fn active(&self, now: SystemTime) -> Vec<Lease> {
        self.store.active(now)
    }

    fn publish(&self, now: SystemTime) {
        let active = self.active(now);
        self.tx.send_if_modified(|cur| {
            if **cur != active {
                *cur = Arc::new(active);
                true
            } else {
                false
            }
        });
    }
}

/// The first option that dhcproto 0.15's decoder would decode with a length it takes on
/// trust (a `debug_assert!` on it, or `len - n` that underflows). Found by fuzzing
/// (docs/fuzzing.md): such a packet panics the decoder in builds with debug assertions and
/// misreads the options after it in release builds, so it is dropped as malformed before
/// decoding. Mirrors the decoder: options start after the 236-byte header and the magic
/// cookie, consecutive options of one code are concatenated (RFC 3396), a truncated one
/// ends decoding.
fn option_with_bad_length(packet: &[u8]) -> Option<u8> {
    let bad = |code: u8, len: usize| match code {
        80 => len != 0,        // Rapid Commit
        81 => len < 3,         // Client FQDN: flags and two RCODEs first
        94 => len != 3,        // Client Network Interface
        151 => len < 1,        // Bulk leasequery status code
        152..=155 => len != 4, // Bulk leasequery times
        _ => false,
    };
    let opts = packet.get(240..).unwrap_or_default();
    let mut run: Option<(u8, usize)> = None;
    let mut i = 0;
    loop {
        let code = opts.get(i).copied();
        match (run, code) {
            (Some((r, _)), Some(c)) if r == c && c != 0 && c != 255 => {}
            _ => {
                if let Some((r, len)) = run.take()
                    && bad(r, len)
                {
                    return Some(r);
                }
            }
        }
        let c = match code {
            None | Some(255) => return None,
            Some(0) => {
                i += 1;
                continue;
            }
            Some(c) => c,
        };
        let len = usize::from(*opts.get(i + 1)?);
        if opts.len() < i + 2 + len {
            return None;
        }
        run = Some((c, run.map_or(0, |(_, l)| l) + len));
        i += 2 + len;
    }
}

fn client_dest(msg: &Message) -> Dest {
    if msg.ciaddr().is_unspecified() {
        Dest::Broadcast
    } else {
        Dest::Unicast(msg.ciaddr())
    }
}

/// Encodes a reply, padded to the 300-byte BOOTP minimum some clients insist on.
pub(super) fn encode(msg: &Message) -> Option<Vec<u8>> {
    let mut bytes = msg.to_vec().ok()?;
    if bytes.len() < MIN_PACKET_SIZE {
        bytes.resize(MIN_PACKET_SIZE, 0);
    }
    Some(bytes)
}

pub(super) async fn run(
    mut state: State,
    socket: UdpSocket,
    mut stop: oneshot::Receiver<()>,
    hook: Option<BindHook>,
) {
    info!(
        network = state.cfg.network,
        "DHCP server on {} ({}, {} dynamic addresses)",
        state.cfg.interface,
        state.cfg.subnet,
        state.store.pool_size()
    );
    let mut buf = vec![0u8; 4096];
    loop {
        let now = SystemTime::now();
        // Wake up when the next lease expires so watchers see it go.
        let next = state
            .store
            .next_expiry(now)
            .and_then(|t| t.duration_since(now).ok())
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            // Stop requested, or the DhcpServer was dropped.
            _ = &mut stop => break,
            _ = tokio::time::sleep(next + Duration::from_millis(10)) => {
                state.publish(SystemTime::now());
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    let now = SystemTime::now();
                    let reply = state.receive(&buf[..n], from, now);
                    state.commit(now);
                    if let Some((reply, dest)) = reply {
                        if let Some(hook) = &hook
                            && reply.opts().msg_type() == Some(MessageType::Ack)
                            && !reply.yiaddr().is_unspecified()
                        {
                            let mut mac = [0u8; 6];
                            mac.copy_from_slice(&reply.chaddr()[..6]);
                            if tokio::time::timeout(BIND_TIMEOUT, hook(mac, reply.yiaddr())).await.is_err() {
                                warn!(network = state.cfg.network, "DHCP: binding {} to {} took over {} s; sending the ACK anyway",
                                    reply.yiaddr(), Mac::from(mac), BIND_TIMEOUT.as_secs());
                            }
                        }
                        let Some(bytes) = encode(&reply) else {
                            warn!(network = state.cfg.network, "DHCP: cannot encode reply");
                            continue;
                        };
                        if let Err(e) = socket.send_to(&bytes, dest.addr()).await {
                            warn!(network = state.cfg.network, "DHCP: sending to {}: {e}", dest.addr());
                        }
                    }
                }
                Err(e) => {
                    warn!(network = state.cfg.network, "DHCP: receive failed: {e}");
                    // Don't spin if the error persists (e.g. the bridge went away).
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    let file = state.store.to_file();
    if let Err(e) = write_lease_file(&state.cfg.lease_file, &file) {
        warn!(
            network = state.cfg.network,
            "DHCP: cannot save leases to {}: {e}",
            state.cfg.lease_file.display()
        );
    }
    info!(network = state.cfg.network, "DHCP server stopped");
}

/// Reads the lease file; a missing file is normal, a bad one is logged and ignored.
fn read_lease_file(network: &str, path: &Path) -> Option<LeaseFile> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(
                network,
                "DHCP: cannot read lease file {}: {e}; starting without leases",
                path.display()
            );
            return None;
        }
    };
    match serde_json::from_slice::<LeaseFile>(&text) {
        Ok(f) if f.version == leases::LEASE_FILE_VERSION => Some(f),
        Ok(f) => {
            warn!(
                network,
                "DHCP: lease file {} has unknown version {}; starting without leases",
                path.display(),
                f.version
            );
            None
        }
        Err(e) => {
            warn!(
                network,
                "DHCP: lease file {} is invalid ({e}); starting without leases",
                path.display()
            );
            None
        }
    }
}

/// Writes the lease file atomically: a temporary file in the same directory, then rename.
fn write_lease_file(path: &Path, file: &LeaseFile) -> io::Result<()> {
    use std::io::Write;
    let json = serde_json::to_vec_pretty(file).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Reservation;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0x01];
    const OTHER: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0x02];

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn state(dir: &tempfile::TempDir) -> State {
        let cfg = DhcpConfig {
            network: "t".into(),
            interface: "br-t".into(),
            subnet: "10.9.0.0/24".parse().unwrap(),
            gateway: ip("10.9.0.1"),
            range: None,
            reservations: vec![Reservation {
                mac: OTHER.into(),
                ip: ip("10.9.0.200"),
            }],
            lease_seconds: 600,
            mtu: 1400,
            dns_server: Some(ip("10.9.0.1")),
            domain: Some("t.vmnet".into()),
            lease_file: dir.path().join("t.json"),
        };
        State::new(cfg).0
    }

    fn msg(mac: [u8; 6], kind: MessageType, opts: Vec<DhcpOption>) -> Message {
        let mut m = Message::default();
        m.set_chaddr(&mac).set_xid(42);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o);
        }
        // Round-trip through the wire format like the socket loop does.
        Message::from_bytes(&encode(&m).unwrap()).unwrap()
    }

    fn opt(m: &Message, code: OptionCode) -> Option<&DhcpOption> {
        m.opts().get(code)
    }

    #[test]
    fn discover_request_ack_with_options() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let now = SystemTime::now();
        let discover = msg(
            MAC,
            MessageType::Discover,
            vec![DhcpOption::Hostname("My_VM".into())],
        );
        let (offer, dest) = s.handle(&discover, now).unwrap();
        assert_eq!(dest, Dest::Broadcast);
        assert_eq!(offer.opcode(), Opcode::BootReply);
        assert_eq!(offer.xid(), 42);
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        let yi = offer.yiaddr();
        assert_eq!(yi, ip("10.9.0.2"));
        assert_eq!(
            opt(&offer, OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(ip("255.255.255.0")))
        );
        assert_eq!(
            opt(&offer, OptionCode::Router),
            Some(&DhcpOption::Router(vec![ip("10.9.0.1")]))
        );
        assert_eq!(
            opt(&offer, OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(vec![ip("10.9.0.1")]))
        );
        assert_eq!(
            opt(&offer, OptionCode::DomainName),
            Some(&DhcpOption::DomainName("t.vmnet".into()))
        );
        assert_eq!(
            opt(&offer, OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(1400))
        );
        assert_eq!(
            opt(&offer, OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(600))
        );
        assert_eq!(
            opt(&offer, OptionCode::Renewal),
            Some(&DhcpOption::Renewal(300))
        );
        assert_eq!(
            opt(&offer, OptionCode::Rebinding),
            Some(&DhcpOption::Rebinding(525))
        );
        assert_eq!(
            opt(&offer, OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(ip("10.9.0.1")))
        );
        assert_eq!(
            opt(&offer, OptionCode::Hostname),
            Some(&DhcpOption::Hostname("My_VM".into()))
        );
        assert!(s.store.active(now).is_empty(), "an offer is not a lease");

        let request = msg(
            MAC,
            MessageType::Request,
            vec![
                DhcpOption::ServerIdentifier(ip("10.9.0.1")),
                DhcpOption::RequestedIpAddress(yi),
                DhcpOption::Hostname("My_VM".into()),
            ],
        );
        let (ack, dest) = s.handle(&request, now).unwrap();
        assert_eq!(dest, Dest::Broadcast);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), yi);
        s.commit(now);
        let leases = s.tx.borrow().clone();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].mac, MAC);
        assert_eq!(leases[0].hostname.as_deref(), Some("my-vm"));
        // Saved at once.
        let saved: LeaseFile =
            serde_json::from_slice(&std::fs::read(dir.path().join("t.json")).unwrap()).unwrap();
        assert_eq!(saved.leases.len(), 1);

        // RENEWING: ciaddr set, no server id or requested address; reply unicast.
        let mut renew = msg(MAC, MessageType::Request, vec![]);
        renew.set_ciaddr(yi);
        let (ack, dest) = s.handle(&renew, now).unwrap();
        assert_eq!(dest, Dest::Unicast(yi));
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.ciaddr(), yi);
    }

    #[test]
    fn request_for_other_server_cancels_offer_silently() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let now = SystemTime::now();
        s.handle(&msg(MAC, MessageType::Discover, vec![]), now)
            .unwrap();
        let req = msg(
            MAC,
            MessageType::Request,
            vec![
                DhcpOption::ServerIdentifier(ip("10.9.0.99")),
                DhcpOption::RequestedIpAddress(ip("10.9.0.2")),
            ],
        );
        assert!(s.handle(&req, now).is_none());
        assert!(s.store.active(now).is_empty());
    }

    #[test]
    fn init_reboot_naks_foreign_and_taken_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let now = SystemTime::now();
        let nak_for = |s: &mut State, mac, ip_: &str| {
            let req = msg(
                mac,
                MessageType::Request,
                vec![DhcpOption::RequestedIpAddress(ip(ip_))],
            );
            let (r, dest) = s.handle(&req, now).unwrap();
            assert_eq!(dest, Dest::Broadcast);
            r.opts().msg_type()
        };
        assert_eq!(nak_for(&mut s, MAC, "192.168.5.5"), Some(MessageType::Nak));
        assert_eq!(nak_for(&mut s, MAC, "10.9.0.1"), Some(MessageType::Nak));
        // Reserved for OTHER.
        assert_eq!(nak_for(&mut s, MAC, "10.9.0.200"), Some(MessageType::Nak));
        // Free and in the pool: the client keeps it (lost lease file case).
        assert_eq!(nak_for(&mut s, MAC, "10.9.0.50"), Some(MessageType::Ack));
        // Now MAC's: another client cannot have it; OTHER only gets its reservation.
        let mut third = OTHER;
        third[5] = 3;
        assert_eq!(nak_for(&mut s, third, "10.9.0.50"), Some(MessageType::Nak));
        assert_eq!(nak_for(&mut s, OTHER, "10.9.0.51"), Some(MessageType::Nak));
        assert_eq!(nak_for(&mut s, OTHER, "10.9.0.200"), Some(MessageType::Ack));
    }

    #[test]
    fn release_decline_inform() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let now = SystemTime::now();
        let req = msg(
            MAC,
            MessageType::Request,
            vec![DhcpOption::RequestedIpAddress(ip("10.9.0.7"))],
        );
        s.handle(&req, now).unwrap();
        let mut rel = msg(MAC, MessageType::Release, vec![]);
        rel.set_ciaddr(ip("10.9.0.7"));
        assert!(s.handle(&rel, now).is_none());
        assert!(s.store.active(now).is_empty());

        let decl = msg(
            MAC,
            MessageType::Decline,
            vec![DhcpOption::RequestedIpAddress(ip("10.9.0.7"))],
        );
        assert!(s.handle(&decl, now).is_none());
        let (offer, _) = s
            .handle(
                &msg(
                    MAC,
                    MessageType::Discover,
                    vec![DhcpOption::RequestedIpAddress(ip("10.9.0.7"))],
                ),
                now,
            )
            .unwrap();
        assert_ne!(offer.yiaddr(), ip("10.9.0.7"));

        let mut inform = msg(MAC, MessageType::Inform, vec![]);
        inform.set_ciaddr(ip("10.9.0.33"));
        let (ack, dest) = s.handle(&inform, now).unwrap();
        assert_eq!(dest, Dest::Unicast(ip("10.9.0.33")));
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(opt(&ack, OptionCode::AddressLeaseTime).is_none());
        assert!(opt(&ack, OptionCode::Router).is_some());
    }

    #[test]
    fn odd_packets_are_ignored_without_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let now = SystemTime::now();
        let mut relayed = msg(MAC, MessageType::Discover, vec![]);
        relayed.set_giaddr(ip("10.1.1.1"));
        assert!(s.handle(&relayed, now).is_none());
        let mut bootp = msg(MAC, MessageType::Discover, vec![]);
        bootp.opts_mut().clear();
        assert!(s.handle(&bootp, now).is_none());
        // hlen beyond chaddr's 16 bytes, straight from the wire.
        let mut bytes = encode(&msg(MAC, MessageType::Discover, vec![])).unwrap();
        bytes[2] = 200;
        if let Ok(m) = Message::from_bytes(&bytes) {
            assert!(s.handle(&m, now).is_none());
        }
        // Truncated and garbage input only fail to decode.
        for len in [0, 1, 10, 100, 239, 240] {
            let _ = Message::from_bytes(&bytes[..len]).map(|m| s.handle(&m, now));
        }
        let _ = Message::from_bytes(&[0xff; 400]).map(|m| s.handle(&m, now));
    }

    /// Options dhcproto's decoder would take with a wrong length (found by fuzzing): the
    /// packet is dropped, where the decoder used to panic in debug builds.
    #[test]
    fn options_with_impossible_lengths_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let from: SocketAddr = "0.0.0.0:68".parse().unwrap();
        let now = SystemTime::now();
        let discover = encode(&msg(MAC, MessageType::Discover, vec![])).unwrap();
        let with = |opt: &[u8]| {
            let mut p = discover[..240].to_vec();
            p.extend_from_slice(&[53, 1, 1]);
            p.extend_from_slice(opt);
            p.push(255);
            p
        };
        // Well-formed: Rapid Commit is empty, FQDN has flags and RCODEs, a BLQ time 4 bytes;
        // a long option split in two (RFC 3396) is judged by its total length.
        for ok in [
            &[80, 0][..],
            &[81, 3, 0, 0, 0],
            &[152, 4, 0, 0, 0, 1],
            &[152, 2, 0, 0, 152, 2, 0, 1],
        ] {
            assert!(option_with_bad_length(&with(ok)).is_none(), "{ok:?}");
            assert!(s.receive(&with(ok), from, now).is_some(), "{ok:?}");
        }
        for bad in [
            &[80, 1, 0][..],
            &[81, 0],
            &[81, 2, 0, 0],
            &[94, 1, 0],
            &[151, 0],
            &[152, 3, 0, 0, 0],
            &[0, 155, 0, 1],
            &[152, 4, 0, 0, 0, 1, 152, 1, 0],
        ] {
            assert!(option_with_bad_length(&with(bad)).is_some(), "{bad:?}");
            assert!(s.receive(&with(bad), from, now).is_none(), "{bad:?}");
        }
        // A truncated last option is never decoded, so it is not judged.
        let mut truncated = with(&[]);
        truncated.pop();
        truncated.extend_from_slice(&[80, 5, 0]);
        assert!(option_with_bad_length(&truncated).is_none());
    }

    #[test]
    fn corrupt_lease_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.json"), b"{not json").unwrap();
        let s = state(&dir);
        assert!(s.store.to_file().leases.is_empty());
    }
}
