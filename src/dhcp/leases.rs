//! The address pool and lease store: pure logic, no I/O besides the lease file helpers.
//!
//! One record per MAC. A record outlives its lease: an expired record still ties its
//! address to its MAC so that the MAC gets the same address back later. Expired records
//! of other MACs are only reclaimed when the pool has no never-used address left.

use super::Lease;
use crate::config::{DhcpRange, Reservation};
use crate::mac::Mac;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long an offered address stays set aside for the client it was offered to.
pub const OFFER_HOLD: Duration = Duration::from_secs(60);
/// How long a declined address (RFC 2131 §4.3.3: in use by someone else) is not handed out.
pub const DECLINE_HOLD: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    ip: Ipv4Addr,
    hostname: Option<String>,
    /// End of the bound lease; `UNIX_EPOCH` when the record only comes from an offer.
    expires: SystemTime,
    /// Set while an offer to this MAC is outstanding.
    offer_until: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocError {
    /// No address left; carries the pool size for the log line.
    Exhausted(usize),
}

/// Why a specific address cannot be bound for a MAC (the REQUEST is NAKed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotInSubnet,
    NotInPool,
    /// The MAC has a reservation for another address.
    ReservedForMac(Ipv4Addr),
    /// Reserved for another MAC, leased or offered to another MAC, or declined.
    InUse,
}

pub struct LeaseStore {
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    /// Inclusive pool bounds (before exclusions).
    start: u32,
    end: u32,
    reservations: HashMap<[u8; 6], Ipv4Addr>,
    reserved_ips: HashMap<Ipv4Addr, [u8; 6]>,
    records: HashMap<[u8; 6], Record>,
    by_ip: HashMap<Ipv4Addr, [u8; 6]>,
    declined: HashMap<Ipv4Addr, SystemTime>,
}

impl LeaseStore {
    pub fn new(
        subnet: Ipv4Net,
        gateway: Ipv4Addr,
        range: Option<&DhcpRange>,
        reservations: &[Reservation],
    ) -> Self {
        let net = u32::from(subnet.network());
        let bcast = u32::from(subnet.broadcast());
        // Host addresses only: the network and broadcast addresses are never handed out
        // (a /31 or /32 has no usable pool at all here).
        let (mut start, mut end) = if bcast > net + 1 {
            (net + 1, bcast - 1)
        } else {
            (1, 0)
        };
        if let Some(r) = range {
            start = start.max(u32::from(r.start));
            end = end.min(u32::from(r.end));
        }
        let mut store = LeaseStore {
            subnet,
            gateway,
            start,
            end,
            reservations: HashMap::new(),
            reserved_ips: HashMap::new(),
            records: HashMap::new(),
            by_ip: HashMap::new(),
            declined: HashMap::new(),
        };
        for r in reservations {
            if subnet.contains(&r.ip) && r.ip != gateway {
                store.reservations.insert(r.mac.octets(), r.ip);
                store.reserved_ips.insert(r.ip, r.mac.octets());
            }
        }
        store
    }

    /// In the dynamic pool: inside the range, not network/broadcast/gateway, not reserved.
    pub fn in_pool(&self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        n >= self.start
            && n <= self.end
            && ip != self.gateway
            && !self.reserved_ips.contains_key(&ip)
    }

    /// Number of dynamic addresses.
    pub fn pool_size(&self) -> usize {
        if self.start > self.end {
            return 0;
        }
        let mut n = (self.end - self.start) as usize + 1;
        if self.in_range(self.gateway) {
            n -= 1;
        }
        n - self
            .reserved_ips
            .keys()
            .filter(|ip| self.in_range(**ip) && **ip != self.gateway)
            .count()
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        n >= self.start && n <= self.end
    }

    fn is_declined(&self, ip: Ipv4Addr, now: SystemTime) -> bool {
        self.declined.get(&ip).is_some_and(|until| *until > now)
    }

    /// Whether `ip` may be bound to `mac` right now (no other MAC has a claim on it).
    pub fn check(&self, mac: [u8; 6], ip: Ipv4Addr, now: SystemTime) -> Result<(), Refusal> {
        if !self.subnet.contains(&ip) {
            return Err(Refusal::NotInSubnet);
        }
        if let Some(&reserved) = self.reservations.get(&mac) {
            // Reservations always win for their MAC, even over a decline.
            return if reserved == ip {
                Ok(())
            } else {
                Err(Refusal::ReservedForMac(reserved))
            };
        }
        if !self.in_pool(ip) {
            return Err(if self.reserved_ips.contains_key(&ip) {
                Refusal::InUse
            } else {
                Refusal::NotInPool
            });
        }
        if self.is_declined(ip, now) {
            return Err(Refusal::InUse);
        }
        match self.by_ip.get(&ip) {
            Some(owner) if *owner != mac => Err(Refusal::InUse),
            _ => Ok(()),
        }
    }

    /// Picks the address to offer `mac`, in the order of RFC 2131 §4.3.1: its
    /// reservation; else its current or previous address (kept even after expiry, for
    /// stability); else the requested address if free; else the lowest never-used
    /// address; else the oldest expired lease of another MAC.
    pub fn select(
        &self,
        mac: [u8; 6],
        requested: Option<Ipv4Addr>,
        now: SystemTime,
    ) -> Result<Ipv4Addr, AllocError> {
        if let Some(&ip) = self.reservations.get(&mac) {
            return Ok(ip);
        }
        if let Some(rec) = self.records.get(&mac)
            && self.check(mac, rec.ip, now).is_ok()
        {
            return Ok(rec.ip);
        }
        if let Some(ip) = requested
            && self.check(mac, ip, now).is_ok()
        {
            return Ok(ip);
        }
        if self.start <= self.end {
            for n in self.start..=self.end {
                let ip = Ipv4Addr::from(n);
                if self.in_pool(ip) && !self.by_ip.contains_key(&ip) && !self.is_declined(ip, now) {
                    return Ok(ip);
                }
            }
        }
        self.records
            .iter()
            .filter(|(m, r)| {
                **m != mac
                    && r.expires <= now
                    && r.offer_until.is_none_or(|t| t <= now)
                    && self.in_pool(r.ip)
                    && !self.is_declined(r.ip, now)
            })
            .min_by_key(|(_, r)| (r.expires, r.ip))
            .map(|(_, r)| r.ip)
            .ok_or(AllocError::Exhausted(self.pool_size()))
    }

    /// Gives `ip` to `mac`, dropping the MAC's other record and another MAC's expired
    /// record of that address. Callers have picked `ip` through `select` or `check`.
    fn assign(&mut self, mac: [u8; 6], ip: Ipv4Addr) -> &mut Record {
        if let Some(prev) = self.records.get(&mac)
            && prev.ip != ip
        {
            self.by_ip.remove(&prev.ip);
            self.records.remove(&mac);
        }
        if let Some(other) = self.by_ip.get(&ip).copied()
            && other != mac
        {
            self.records.remove(&other);
        }
        self.by_ip.insert(ip, mac);
        self.records.entry(mac).or_insert_with(|| Record {
            ip,
            hostname: None,
            expires: UNIX_EPOCH,
            offer_until: None,
        })
    }

    /// Sets `ip` aside for `mac` while the offer is outstanding.
    pub fn offer(&mut self, mac: [u8; 6], ip: Ipv4Addr, now: SystemTime) {
        self.assign(mac, ip).offer_until = Some(now + OFFER_HOLD);
    }

    /// The client chose another server: forget our offer (the record stays for stability).
    pub fn cancel_offer(&mut self, mac: [u8; 6]) {
        if let Some(r) = self.records.get_mut(&mac) {
            r.offer_until = None;
        }
    }

    /// Binds `ip` to `mac` until `now + lease`. Fails when another client has a claim.
    ///
    /// The lease carries `hostname` (or, without one, the name the MAC had) unless a live
    /// lease of another MAC holds that name: first come, first served, so a VM cannot take
    /// over a neighbour's DNS name by sending the same hostname. The lease is then bound
    /// without a name, and the refused name and the MAC holding it are returned.
    pub fn bind(
        &mut self,
        mac: [u8; 6],
        ip: Ipv4Addr,
        hostname: Option<String>,
        lease: Duration,
        now: SystemTime,
    ) -> Result<Option<(String, [u8; 6])>, Refusal> {
        self.check(mac, ip, now)?;
        let wanted = hostname.or_else(|| self.records.get(&mac).and_then(|r| r.hostname.clone()));
        let refused = wanted.as_deref().and_then(|name| {
            self.name_holder(name, mac, now)
                .map(|holder| (name.to_string(), holder))
        });
        let rec = self.assign(mac, ip);
        rec.expires = now + lease;
        rec.offer_until = None;
        rec.hostname = if refused.is_some() { None } else { wanted };
        Ok(refused)
    }

    /// A MAC other than `asking` whose live lease carries `name`, if any.
    fn name_holder(&self, name: &str, asking: [u8; 6], now: SystemTime) -> Option<[u8; 6]> {
        self.records
            .iter()
            .find(|(mac, r)| {
                **mac != asking && r.expires > now && r.hostname.as_deref() == Some(name)
            })
            .map(|(mac, _)| *mac)
    }

    /// The address `mac` is bound to, if its lease is active.
    pub fn active_ip(&self, mac: [u8; 6], now: SystemTime) -> Option<Ipv4Addr> {
        self.records
            .get(&mac)
            .filter(|r| r.expires > now)
            .map(|r| r.ip)
    }

    /// The client gave `ip` back: the lease ends now; the record stays so the MAC gets
    /// the same address next time. Returns whether anything changed.
    pub fn release(&mut self, mac: [u8; 6], ip: Ipv4Addr, now: SystemTime) -> bool {
        match self.records.get_mut(&mac) {
            Some(r) if r.ip == ip => {
                let changed = r.expires > now;
                r.expires = r.expires.min(now);
                r.offer_until = None;
                changed
            }
            _ => false,
        }
    }

    /// The client found `ip` in use: drop its record and keep the address out of the pool
    /// for `DECLINE_HOLD`. Returns whether the address was the client's.
    pub fn decline(&mut self, mac: [u8; 6], ip: Ipv4Addr, now: SystemTime) -> bool {
        match self.records.get(&mac) {
            Some(r) if r.ip == ip => {
                self.records.remove(&mac);
                self.by_ip.remove(&ip);
                self.declined.insert(ip, now + DECLINE_HOLD);
                self.declined.retain(|_, until| *until > now);
                true
            }
            _ => false,
        }
    }

    /// Active leases (bound, not expired), sorted by address.
    pub fn active(&self, now: SystemTime) -> Vec<Lease> {
        let mut v: Vec<Lease> = self
            .records
            .iter()
            .filter(|(_, r)| r.expires > now)
            .map(|(mac, r)| Lease {
                mac: *mac,
                ip: r.ip,
                hostname: r.hostname.clone(),
                expires: r.expires,
            })
            .collect();
        v.sort_by_key(|l| l.ip);
        v
    }

    /// The earliest future lease expiry, to republish the active set when it passes.
    pub fn next_expiry(&self, now: SystemTime) -> Option<SystemTime> {
        self.records
            .values()
            .map(|r| r.expires)
            .filter(|e| *e > now)
            .min()
    }

    /// Everything worth keeping across restarts: every record that was ever bound
    /// (expired ones too, for address stability).
    pub fn to_file(&self) -> LeaseFile {
        let mut leases: Vec<FileLease> = self
            .records
            .iter()
            .filter(|(_, r)| r.expires > UNIX_EPOCH)
            .map(|(mac, r)| FileLease {
                mac: Mac::from(*mac).to_string(),
                ip: r.ip,
                hostname: r.hostname.clone(),
                expires: r
                    .expires
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
            })
            .collect();
        leases.sort_by_key(|l| l.ip);
        LeaseFile {
            version: LEASE_FILE_VERSION,
            leases,
        }
    }

    /// Loads records from a lease file. Records that no longer fit the configuration
    /// (outside the pool, or conflicting) are skipped; returns how many were skipped.
    pub fn load(&mut self, file: LeaseFile) -> usize {
        let mut skipped = 0;
        // A name belongs to one MAC (see `bind`); a file written before that rule may
        // give one name to several: the first keeps it.
        let mut names = std::collections::HashSet::new();
        for l in file.leases {
            let Ok(mac) = l.mac.parse::<Mac>().map(Mac::octets) else {
                skipped += 1;
                continue;
            };
            let fits = self.check(mac, l.ip, UNIX_EPOCH).is_ok()
                && !self.records.contains_key(&mac)
                && !self.by_ip.contains_key(&l.ip);
            if !fits {
                skipped += 1;
                continue;
            }
            self.by_ip.insert(l.ip, mac);
            let hostname = l
                .hostname
                .as_deref()
                .and_then(sanitize_hostname)
                .filter(|name| names.insert(name.clone()));
            self.records.insert(
                mac,
                Record {
                    ip: l.ip,
                    hostname,
                    expires: UNIX_EPOCH + Duration::from_secs(l.expires),
                    offer_until: None,
                },
            );
        }
        skipped
    }
}

pub const LEASE_FILE_VERSION: u32 = 1;

/// The lease file: `{"version":1,"leases":[{"mac":..,"ip":..,"hostname":..,"expires":<unix s>}]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseFile {
    pub version: u32,
    pub leases: Vec<FileLease>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLease {
    pub mac: String,
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

/// Reduces a client-supplied host name to one DNS label (RFC 1123): the part before the
/// first dot, lower case, letters/digits/hyphens only, at most 63 bytes. Names are
/// published to DNS, so anything else is rewritten rather than trusted.
pub fn sanitize_hostname(name: &str) -> Option<String> {
    let first = name.split('.').next().unwrap_or("");
    let mut label: String = first
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    label.truncate(63);
    let label = label.trim_matches('-');
    (!label.is_empty()).then(|| label.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const C: [u8; 6] = [0x52, 0x54, 0, 0, 0, 3];
    const LEASE: Duration = Duration::from_secs(3600);

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn store(range: Option<(&str, &str)>, res: &[([u8; 6], &str)]) -> LeaseStore {
        let range = range.map(|(s, e)| DhcpRange {
            start: ip(s),
            end: ip(e),
        });
        let res: Vec<Reservation> = res
            .iter()
            .map(|(mac, i)| Reservation {
                mac: Mac::from(*mac),
                ip: ip(i),
            })
            .collect();
        LeaseStore::new(
            "10.0.0.0/24".parse().unwrap(),
            ip("10.0.0.1"),
            range.as_ref(),
            &res,
        )
    }

    #[test]
    fn pool_excludes_network_broadcast_gateway_and_reservations() {
        let s = store(None, &[(C, "10.0.0.50")]);
        assert_eq!(s.pool_size(), 254 - 2);
        assert!(!s.in_pool(ip("10.0.0.0")));
        assert!(!s.in_pool(ip("10.0.0.255")));
        assert!(!s.in_pool(ip("10.0.0.1")));
        assert!(!s.in_pool(ip("10.0.0.50")));
        assert!(s.in_pool(ip("10.0.0.2")));
        assert!(s.in_pool(ip("10.0.0.254")));
        assert_eq!(s.select(A, None, t(0)), Ok(ip("10.0.0.2")));
    }

    #[test]
    fn range_narrows_pool() {
        let s = store(Some(("10.0.0.100", "10.0.0.109")), &[]);
        assert_eq!(s.pool_size(), 10);
        assert!(!s.in_pool(ip("10.0.0.99")));
        assert!(!s.in_pool(ip("10.0.0.110")));
        assert_eq!(s.select(A, None, t(0)), Ok(ip("10.0.0.100")));
        // A range that includes the gateway still never hands it out.
        let s = store(Some(("10.0.0.1", "10.0.0.3")), &[]);
        assert_eq!(s.pool_size(), 2);
        assert_eq!(s.select(A, None, t(0)), Ok(ip("10.0.0.2")));
    }

    #[test]
    fn offer_then_bind_and_same_mac_keeps_address() {
        let mut s = store(None, &[]);
        let a = s.select(A, None, t(0)).unwrap();
        s.offer(A, a, t(0));
        // The offered address is held for A: B gets another one.
        let b = s.select(B, None, t(1)).unwrap();
        assert_ne!(a, b);
        assert_eq!(s.check(B, a, t(1)), Err(Refusal::InUse));
        s.bind(A, a, Some("vm-a".into()), LEASE, t(2)).unwrap();
        assert_eq!(s.active_ip(A, t(3)), Some(a));
        // Long after expiry A still gets its address back.
        assert_eq!(s.select(A, None, t(100_000)), Ok(a));
        let active = s.active(t(3));
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].hostname.as_deref(), Some("vm-a"));
        assert!(s.active(t(100_000)).is_empty());
    }

    #[test]
    fn requested_address_honoured_if_free_and_in_pool() {
        let mut s = store(Some(("10.0.0.100", "10.0.0.120")), &[]);
        assert_eq!(
            s.select(A, Some(ip("10.0.0.110")), t(0)),
            Ok(ip("10.0.0.110"))
        );
        s.bind(A, ip("10.0.0.110"), None, LEASE, t(0)).unwrap();
        // Taken by A: B gets the first free address instead.
        assert_eq!(
            s.select(B, Some(ip("10.0.0.110")), t(0)),
            Ok(ip("10.0.0.100"))
        );
        // Outside the pool: ignored.
        assert_eq!(
            s.select(B, Some(ip("10.0.0.5")), t(0)),
            Ok(ip("10.0.0.100"))
        );
        // A's own (even expired) address comes before what it asks for.
        assert_eq!(
            s.select(A, Some(ip("10.0.0.115")), t(100_000)),
            Ok(ip("10.0.0.110"))
        );
        assert_eq!(s.check(B, ip("10.0.0.5"), t(0)), Err(Refusal::NotInPool));
        assert_eq!(
            s.check(B, ip("192.168.1.5"), t(0)),
            Err(Refusal::NotInSubnet)
        );
    }

    #[test]
    fn reservation_wins_for_its_mac_only() {
        let mut s = store(Some(("10.0.0.100", "10.0.0.120")), &[(A, "10.0.0.7")]);
        assert_eq!(
            s.select(A, Some(ip("10.0.0.101")), t(0)),
            Ok(ip("10.0.0.7"))
        );
        assert_eq!(
            s.check(A, ip("10.0.0.101"), t(0)),
            Err(Refusal::ReservedForMac(ip("10.0.0.7")))
        );
        assert_eq!(s.check(B, ip("10.0.0.7"), t(0)), Err(Refusal::InUse));
        assert_eq!(
            s.select(B, Some(ip("10.0.0.7")), t(0)),
            Ok(ip("10.0.0.100"))
        );
        s.bind(A, ip("10.0.0.7"), None, LEASE, t(0)).unwrap();
        assert_eq!(s.active_ip(A, t(1)), Some(ip("10.0.0.7")));
    }

    #[test]
    fn exhaustion_and_reclaim_oldest_expired_of_other_macs() {
        let mut s = store(Some(("10.0.0.100", "10.0.0.101")), &[]);
        s.bind(A, ip("10.0.0.100"), None, Duration::from_secs(10), t(0))
            .unwrap();
        s.bind(B, ip("10.0.0.101"), None, Duration::from_secs(20), t(0))
            .unwrap();
        assert_eq!(s.select(C, None, t(5)), Err(AllocError::Exhausted(2)));
        // Both expired: the oldest (A's) is reclaimed first.
        assert_eq!(s.select(C, None, t(30)), Ok(ip("10.0.0.100")));
        s.offer(C, ip("10.0.0.100"), t(30));
        s.bind(C, ip("10.0.0.100"), None, LEASE, t(30)).unwrap();
        // A lost its record; B keeps its own (expired) address.
        assert_eq!(s.select(B, None, t(31)), Ok(ip("10.0.0.101")));
        assert_eq!(s.select(A, None, t(31)), Ok(ip("10.0.0.101")));
        assert_eq!(s.active_ip(C, t(31)), Some(ip("10.0.0.100")));
    }

    #[test]
    fn expired_lease_not_reclaimed_while_free_addresses_remain() {
        let mut s = store(Some(("10.0.0.100", "10.0.0.102")), &[]);
        s.bind(A, ip("10.0.0.100"), None, Duration::from_secs(1), t(0))
            .unwrap();
        assert_eq!(s.select(B, None, t(50)), Ok(ip("10.0.0.101")));
    }

    #[test]
    fn outstanding_offer_is_not_reclaimed() {
        let mut s = store(Some(("10.0.0.100", "10.0.0.100")), &[]);
        s.offer(A, ip("10.0.0.100"), t(0));
        assert_eq!(s.select(B, None, t(1)), Err(AllocError::Exhausted(1)));
        // The offer lapses: the never-bound record is reclaimable.
        assert_eq!(s.select(B, None, t(61)), Ok(ip("10.0.0.100")));
    }

    #[test]
    fn release_keeps_address_for_mac_and_decline_blocks_it() {
        let mut s = store(Some(("10.0.0.100", "10.0.0.101")), &[]);
        s.bind(A, ip("10.0.0.100"), None, LEASE, t(0)).unwrap();
        assert!(!s.release(B, ip("10.0.0.100"), t(1)));
        assert!(s.release(A, ip("10.0.0.100"), t(1)));
        assert!(s.active(t(2)).is_empty());
        assert_eq!(s.select(A, None, t(2)), Ok(ip("10.0.0.100")));
        assert_eq!(s.select(B, None, t(2)), Ok(ip("10.0.0.101")));

        assert!(s.decline(A, ip("10.0.0.100"), t(3)));
        assert_eq!(s.select(A, None, t(4)), Ok(ip("10.0.0.101")));
        assert_eq!(s.check(B, ip("10.0.0.100"), t(4)), Err(Refusal::InUse));
        let after = t(3) + DECLINE_HOLD + Duration::from_secs(1);
        assert_eq!(s.check(B, ip("10.0.0.100"), after), Ok(()));
    }

    #[test]
    fn file_round_trip_keeps_expired_records_and_skips_misfits() {
        let mut s = store(None, &[]);
        s.bind(A, ip("10.0.0.2"), Some("a".into()), LEASE, t(0))
            .unwrap();
        s.bind(B, ip("10.0.0.3"), None, Duration::from_secs(1), t(0))
            .unwrap();
        s.offer(C, ip("10.0.0.4"), t(0)); // offers are not persisted
        let file = s.to_file();
        assert_eq!(file.leases.len(), 2);
        let json = serde_json::to_string(&file).unwrap();
        let back: LeaseFile = serde_json::from_str(&json).unwrap();
        assert_eq!(back, file);

        let mut s2 = store(None, &[]);
        assert_eq!(s2.load(back.clone()), 0);
        assert_eq!(s2.active_ip(A, t(10)), Some(ip("10.0.0.2")));
        assert_eq!(s2.active(t(10))[0].hostname.as_deref(), Some("a"));
        // B's expired lease still ties 10.0.0.3 to B.
        assert_eq!(s2.select(B, None, t(10)), Ok(ip("10.0.0.3")));
        assert_eq!(s2.select(C, None, t(10)), Ok(ip("10.0.0.4")));

        // A narrower pool and a reservation now owned by another MAC: both skipped.
        let mut s3 = store(Some(("10.0.0.3", "10.0.0.200")), &[(C, "10.0.0.3")]);
        assert_eq!(s3.load(back), 2);
        assert!(s3.active(t(0)).is_empty());
    }

    #[test]
    fn hostname_sanitized_to_dns_label() {
        assert_eq!(sanitize_hostname("VM-One"), Some("vm-one".into()));
        assert_eq!(sanitize_hostname("web01.example.com"), Some("web01".into()));
        assert_eq!(
            sanitize_hostname("my_host name"),
            Some("my-host-name".into())
        );
        assert_eq!(sanitize_hostname("--x--"), Some("x".into()));
        assert_eq!(sanitize_hostname("…"), None);
        assert_eq!(sanitize_hostname(""), None);
        assert_eq!(sanitize_hostname(&"a".repeat(100)).unwrap().len(), 63);
    }

    #[test]
    fn tiny_subnets_have_no_pool() {
        let s = LeaseStore::new("10.0.0.0/31".parse().unwrap(), ip("10.0.0.0"), None, &[]);
        assert_eq!(s.pool_size(), 0);
        assert_eq!(s.select(A, None, t(0)), Err(AllocError::Exhausted(0)));
    }

    #[test]
    fn a_live_leases_hostname_is_not_taken_over() {
        let mut s = store(None, &[]);
        s.bind(A, ip("10.0.0.2"), Some("victim".into()), LEASE, t(0))
            .unwrap();
        // Another MAC asks for the same name: bound, but without it.
        let refused = s
            .bind(B, ip("10.0.0.3"), Some("victim".into()), LEASE, t(1))
            .unwrap();
        assert_eq!(refused, Some(("victim".to_string(), A)));
        let names: Vec<_> = s
            .active(t(2))
            .into_iter()
            .map(|l| (l.mac, l.hostname))
            .collect();
        assert_eq!(names, vec![(A, Some("victim".into())), (B, None)]);
        // The holder renews and keeps it, with or without sending it again.
        assert_eq!(s.bind(A, ip("10.0.0.2"), None, LEASE, t(3)), Ok(None));
        assert_eq!(
            s.bind(A, ip("10.0.0.2"), Some("victim".into()), LEASE, t(4)),
            Ok(None)
        );
        // Once the holder's lease has ended, the name is free again.
        s.release(A, ip("10.0.0.2"), t(5));
        assert_eq!(
            s.bind(B, ip("10.0.0.3"), Some("victim".into()), LEASE, t(6)),
            Ok(None)
        );
        // And the old holder, coming back, does not get it back while B holds it.
        assert_eq!(
            s.bind(A, ip("10.0.0.2"), None, LEASE, t(7)),
            Ok(Some(("victim".to_string(), B)))
        );
        let names: Vec<_> = s
            .active(t(8))
            .into_iter()
            .map(|l| (l.mac, l.hostname))
            .collect();
        assert_eq!(names, vec![(A, None), (B, Some("victim".into()))]);
        // A lease file that gives one name to two MACs: only the first keeps it.
        let mut file = s.to_file();
        for l in &mut file.leases {
            l.hostname = Some("twice".into());
        }
        file.leases.sort_by_key(|l| l.ip);
        let mut s2 = store(None, &[]);
        assert_eq!(s2.load(file), 0);
        let names: Vec<_> = s2
            .active(t(8))
            .into_iter()
            .map(|l| (l.mac, l.hostname))
            .collect();
        assert_eq!(names, vec![(A, Some("twice".into())), (B, None)]);
        // And the other cannot claim it while that lease lives.
        assert_eq!(
            s2.bind(B, ip("10.0.0.3"), Some("twice".into()), LEASE, t(9)),
            Ok(Some(("twice".to_string(), A)))
        );
    }
}
