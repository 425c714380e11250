//! Choosing a network's subnet: pure logic, fed with what netlink reports.
//!
//! A network must not overlap anything the host already uses: an address on any
//! interface, a route of the main table, another network of this broker, or (for a
//! dynamic subnet) the subnet another network's file fixes. Otherwise replies to guests
//! would leave through the wrong interface, or a fixed network could not be created.
//!
//! Routes are the exception: a route only conflicts with a subnet when it is as specific
//! as the subnet or more (it lies inside it). A route that *covers* the subnet, such as the
//! `0.0.0.0/1` + `128.0.0.0/1` pair VPN clients install to capture all traffic without
//! replacing the default route, loses to the network's own, longer prefix route, just
//! like the default route does; treating it as a conflict would leave no subnet at all.
//! (libvirt refuses only a route to exactly the network's prefix; a more specific one
//! would still take part of the subnet's traffic, so it is refused here too.) A dynamic
//! subnet still prefers a prefix no route covers, so a covering route to a real network
//! (say a LAN's `192.168.0.0/16` via a router) is only shadowed when nothing else is free.

use ipnet::{Ipv4Net, Ipv6Net};
use std::fmt;
use std::net::Ipv4Addr;

/// The ranges dynamic subnets come from, tried in this order:
///
/// 1. `192.168.64.0/18`: `192.168.64.0/24` … `192.168.127.0/24` for the default /24,
///    the range macOS vmnet uses, so guests see familiar addresses;
/// 2. `10.213.0.0/16`: `10.213.0.0/24` … `10.213.255.0/24`, for hosts whose first range
///    is taken (often by VPNs or home routers in 192.168.x).
///
/// A network of prefix length `p` takes the first free aligned /`p` of these ranges; a
/// prefix shorter than a range (e.g. /16 in the /18) cannot come from that range.
pub fn pool() -> [Ipv4Net; 2] {
    [
        Ipv4Net::new(Ipv4Addr::new(192, 168, 64, 0), 18).expect("valid prefix"),
        Ipv4Net::new(Ipv4Addr::new(10, 213, 0, 0), 16).expect("valid prefix"),
    ]
}

/// Something that already occupies address space on the host: an IPv4 subnet, or (for
/// a network's IPv6 prefix) an IPv6 one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occupant<N = Ipv4Net> {
    pub net: N,
    pub what: Occupation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Occupation {
    /// An address assigned to an interface.
    Address { interface: String },
    /// A route of the main table (not the default route).
    Route { interface: Option<String> },
    /// A network this broker holds.
    Network { name: String },
    /// The fixed subnet of another network's file ([`crate::config::NetworkConfig::fixed_elsewhere`]).
    Defined { name: String },
}

impl<N: fmt::Display> fmt::Display for Occupant<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.what {
            Occupation::Address { interface } => {
                write!(f, "address {} on interface {interface}", self.net)
            }
            Occupation::Route {
                interface: Some(interface),
            } => write!(f, "route {} via interface {interface}", self.net),
            Occupation::Route { interface: None } => write!(f, "route {}", self.net),
            Occupation::Network { name } => {
                write!(f, "subnet {} of network {name:?}", self.net)
            }
            Occupation::Defined { name } => {
                write!(
                    f,
                    "subnet {} fixed by the file of network {name:?}",
                    self.net
                )
            }
        }
    }
}

/// Two prefixes overlap exactly when one contains the other's network address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether `occupant` keeps `subnet` from being used: any overlap, except for a route
/// that covers `subnet` with a shorter prefix (see the module's documentation).
fn collides(subnet: Ipv4Net, occupant: &Occupant) -> bool {
    match occupant.what {
        Occupation::Route { .. } => {
            subnet.contains(&occupant.net.network())
                && occupant.net.prefix_len() >= subnet.prefix_len()
        }
        _ => overlaps(subnet, occupant.net),
    }
}

/// The first occupant that `subnet` would collide with.
pub fn conflict(subnet: Ipv4Net, occupants: &[Occupant]) -> Option<&Occupant> {
    occupants.iter().find(|o| collides(subnet, o))
}

/// The first occupant an IPv6 prefix would collide with, by the same rules as
/// [`conflict`]: any overlap with an address or another network, a route only when it
/// lies inside the prefix (a covering route, like a VPN's `::/1`, loses to the
/// network's own /64).
pub fn conflict6(prefix: Ipv6Net, occupants: &[Occupant<Ipv6Net>]) -> Option<&Occupant<Ipv6Net>> {
    occupants.iter().find(|o| {
        let inside = prefix.contains(&o.net.network()) && o.net.prefix_len() >= prefix.prefix_len();
        match o.what {
            Occupation::Route { .. } => inside,
            _ => inside || o.net.contains(&prefix.network()),
        }
    })
}

/// The first free subnet of `prefix_len` bits in the [`pool`]: preferably one that no
/// route covers either, else the first without a [`conflict`].
pub fn pick(prefix_len: u8, occupants: &[Occupant]) -> Option<Ipv4Net> {
    let candidates = || {
        pool()
            .into_iter()
            .filter_map(|range| range.subnets(prefix_len).ok())
            .flatten()
    };
    candidates()
        .find(|candidate| !occupants.iter().any(|o| overlaps(*candidate, o.net)))
        .or_else(|| candidates().find(|candidate| conflict(*candidate, occupants).is_none()))
}

/// The gateway of a dynamically chosen subnet: its first host address.
pub fn first_host(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn addr(s: &str, interface: &str) -> Occupant {
        Occupant {
            net: net(s),
            what: Occupation::Address {
                interface: interface.into(),
            },
        }
    }

    fn route(s: &str) -> Occupant {
        Occupant {
            net: net(s),
            what: Occupation::Route {
                interface: Some("eth0".into()),
            },
        }
    }

    #[test]
    fn overlap_is_containment_either_way() {
        assert!(overlaps(net("10.0.0.0/8"), net("10.1.2.0/24")));
        assert!(overlaps(net("10.1.2.0/24"), net("10.0.0.0/8")));
        assert!(overlaps(net("10.1.2.0/24"), net("10.1.2.0/24")));
        assert!(overlaps(net("10.1.2.0/24"), net("10.1.2.77/32")));
        assert!(!overlaps(net("10.1.2.0/24"), net("10.1.3.0/24")));
        assert!(!overlaps(net("192.168.63.0/24"), net("192.168.64.0/18")));
    }

    #[test]
    fn empty_host_gets_the_first_subnet() {
        assert_eq!(pick(24, &[]), Some(net("192.168.64.0/24")));
        assert_eq!(
            first_host(net("192.168.64.0/24")),
            Ipv4Addr::new(192, 168, 64, 1)
        );
    }

    #[test]
    fn occupied_prefixes_are_skipped() {
        let occ = [
            addr("192.168.64.17/24", "eth1"),
            route("192.168.65.0/24"),
            addr("192.168.66.1/32", "lo"),
        ];
        assert_eq!(pick(24, &occ), Some(net("192.168.67.0/24")));
    }

    #[test]
    fn a_wide_route_blocks_every_prefix_inside_it() {
        let occ = [route("192.168.0.0/16")];
        assert_eq!(pick(24, &occ), Some(net("10.213.0.0/24")));
    }

    #[test]
    fn an_exhausted_pool_yields_nothing() {
        let occ = [
            addr("192.168.0.1/16", "eth0"),
            addr("10.213.0.1/16", "eth1"),
        ];
        assert_eq!(pick(24, &occ), None);
    }

    fn defined(s: &str, name: &str) -> Occupant {
        Occupant {
            net: net(s),
            what: Occupation::Defined { name: name.into() },
        }
    }

    #[test]
    fn covering_routes_like_a_vpn_split_default_are_not_conflicts() {
        let vpn = [route("0.0.0.0/1"), route("128.0.0.0/1")];
        assert_eq!(pick(24, &vpn), Some(net("192.168.64.0/24")));
        assert!(conflict(net("192.168.42.0/24"), &vpn).is_none());
        // A route inside the candidate, or equal to it, is one.
        let occ = [
            route("0.0.0.0/1"),
            route("128.0.0.0/1"),
            route("192.168.64.128/25"),
            route("192.168.65.0/24"),
        ];
        assert_eq!(pick(24, &occ), Some(net("192.168.66.0/24")));
        assert_eq!(
            conflict(net("192.168.64.0/24"), &occ).unwrap().net,
            net("192.168.64.128/25")
        );
    }

    #[test]
    fn a_prefix_no_route_covers_is_preferred() {
        // A LAN route covering the first range: the second range is used while it has room.
        let occ = [route("192.168.0.0/16")];
        assert_eq!(pick(24, &occ), Some(net("10.213.0.0/24")));
        // With both ranges covered, covering routes are not conflicts.
        let occ = [route("192.168.0.0/16"), route("10.0.0.0/8")];
        assert_eq!(pick(24, &occ), Some(net("192.168.64.0/24")));
    }

    #[test]
    fn dynamic_choice_avoids_subnets_other_files_fix() {
        let occ = [
            defined("192.168.64.0/24", "lab"),
            defined("192.168.65.0/28", "tiny"),
            defined("192.168.66.0/23", "wide"),
        ];
        assert_eq!(pick(24, &occ), Some(net("192.168.68.0/24")));
        assert_eq!(pick(28, &occ), Some(net("192.168.65.16/28")));
        let c = conflict(net("192.168.67.0/24"), &occ).unwrap();
        assert_eq!(
            c.to_string(),
            "subnet 192.168.66.0/23 fixed by the file of network \"wide\""
        );
        // Even under a VPN's covering routes.
        let mut with_vpn = occ.to_vec();
        with_vpn.extend([route("0.0.0.0/1"), route("128.0.0.0/1")]);
        assert_eq!(pick(24, &with_vpn), Some(net("192.168.68.0/24")));
    }

    #[test]
    fn other_prefix_lengths_stay_aligned() {
        let occ = [addr("192.168.64.1/24", "vmnb-a")];
        assert_eq!(pick(22, &occ), Some(net("192.168.68.0/22")));
        assert_eq!(pick(28, &occ), Some(net("192.168.65.0/28")));
        // /17 fits only the second range.
        assert_eq!(pick(17, &[]), Some(net("10.213.0.0/17")));
        assert_eq!(pick(8, &[]), None);
    }

    #[test]
    fn conflicts_name_the_occupant() {
        let occ = [route("10.0.0.0/8"), addr("172.16.5.9/24", "wlan0")];
        let c = conflict(net("172.16.5.0/24"), &occ).unwrap();
        assert_eq!(c.to_string(), "address 172.16.5.9/24 on interface wlan0");
        let c = conflict(net("10.0.0.0/7"), &occ).unwrap();
        assert_eq!(c.to_string(), "route 10.0.0.0/8 via interface eth0");
        assert!(
            conflict(net("10.20.0.0/16"), &occ).is_none(),
            "a covering route is no conflict"
        );
        assert!(conflict(net("172.17.0.0/16"), &occ).is_none());
    }

    #[test]
    fn an_ipv6_prefix_conflicts_with_addresses_networks_and_routes_inside_it() {
        let p: Ipv6Net = "fd31:0:0:1::/64".parse().unwrap();
        let at = |net: &str, what: Occupation| Occupant::<Ipv6Net> {
            net: net.parse().unwrap(),
            what,
        };
        let route = || Occupation::Route {
            interface: Some("eth0".into()),
        };
        let addr = || Occupation::Address {
            interface: "eth0".into(),
        };
        // Nothing near it.
        assert!(
            conflict6(
                p,
                &[at("fd31:0:0:2::/64", route()), at("2001:db8::5/64", addr())]
            )
            .is_none()
        );
        // A covering route loses to the network's /64; a covering address does not.
        assert!(conflict6(p, &[at("fd00::/8", route()), at("::/1", route())]).is_none());
        assert!(conflict6(p, &[at("fd31::/48", addr())]).is_some());
        // The same prefix, or one inside it: a route, an address, another network.
        for o in [
            at("fd31:0:0:1::/64", route()),
            at("fd31:0:0:1:8000::/65", route()),
            at("fd31:0:0:1::7/64", addr()),
            at(
                "fd31:0:0:1::/64",
                Occupation::Network {
                    name: "other".into(),
                },
            ),
        ] {
            let found = conflict6(p, std::slice::from_ref(&o)).map(ToString::to_string);
            assert_eq!(found, Some(o.to_string()));
        }
    }
}
