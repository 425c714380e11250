//! The kernel bridge of each network: its name and MAC, its creation and configuration,
//! and the settings of the TAPs plugged into it as ports.
//!
//! The bridge is the host's interface on the network, so it must never take its IPv6
//! configuration from the VMs behind it: a Router Advertisement written into a TAP would
//! otherwise install a default route via the VM and a global address on the host
//! ([`refuse_router_advertisements`]). Its ports (the TAPs) have no IPv6 of their own
//! ([`disable_port_ipv6`]).

use super::alias_for;
use super::netlink::{Link, Netlink, fail};
use super::tap::Tap;
use crate::backend::BackendError;
use crate::config::{NetworkConfig, name_hash};
use ipnet::{Ipv4Net, Ipv6Net};
use netlink_packet_route::link::BridgeStpState;
use rtnetlink::{LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec};
use std::io;
use std::path::Path;
use tracing::warn;

/// `vmnb-<name>` when the name fits IFNAMSIZ, else `vmnb-<8 hex digits of its hash>`.
pub fn bridge_name(network: &str) -> String {
    let fits = network.len() <= 10
        && network
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if fits {
        return format!("vmnb-{network}");
    }
    // Stable, so a restarted broker finds the same name.
    format!("vmnb-{:08x}", name_hash(network))
}

/// The bridge's MAC, stable per network name so guests' ARP caches of the gateway stay
/// right when a network is recreated: locally administered unicast (0x02), then 'v'
/// and four bytes of the name's hash.
pub fn bridge_mac(network: &str) -> [u8; 6] {
    let h = name_hash(network).to_be_bytes();
    [0x02, b'v', h[0], h[1], h[2], h[3]]
}

/// The bridge's MAC on a network that spans hosts: every host's bridge is on the one L2
/// network, so the MAC cannot come from the network's name alone, which all hosts share.
/// It comes from this host's gateway address, which is distinct on every host (the files
/// must give each host its own) and stable: locally administered unicast (0x02), 'x' and
/// the four bytes of the address.
pub fn overlay_bridge_mac(gateway: std::net::Ipv4Addr) -> [u8; 6] {
    let a = gateway.octets();
    [0x02, b'x', a[0], a[1], a[2], a[3]]
}

/// Creates, configures and brings up the bridge `name` of network `config` with the
/// gateway `address` and, on a network with IPv6, the IPv6 addresses of [`add_ipv6`].
/// On failure the bridge is removed.
pub async fn make(
    netlink: &Netlink,
    config: &NetworkConfig,
    name: &str,
    address: Ipv4Net,
    address6: Option<Ipv6Net>,
) -> Result<Link, BackendError> {
    let alias = alias_for(&config.name);
    let mac = match config.vxlan {
        Some(_) => overlay_bridge_mac(address.addr()),
        None => bridge_mac(&config.name),
    };
    create(netlink, name, mac).await?;
    let link = match netlink.link_by_name(name).await {
        Ok(Some(link)) => link,
        looked_up => {
            // The bridge has no alias yet, so nothing (not even `remove_stale`) would
            // ever recognise it as ours: delete it by the name it was just given.
            if let Err(cleanup) = netlink.delete_by_name(name).await {
                warn!(
                    interface = name,
                    "cannot remove half-made bridge: {cleanup}"
                );
            }
            return Err(match looked_up {
                Err(e) => e.into(),
                _ => BackendError::Vanished(format!("bridge {name} vanished after creation")),
            });
        }
    };
    let configured = async {
        // While the bridge is still down: it accepts nothing before this holds.
        refuse_router_advertisements(Path::new(IPV6_CONF), name)?;
        netlink.configure_up(&link, config.mtu, &alias).await?;
        netlink.add_address(&link, address).await?;
        match address6 {
            Some(address6) => add_ipv6(netlink, &link, address6).await,
            None => Ok(()),
        }
    };
    if let Err(e) = configured.await {
        if let Err(cleanup) = netlink.delete(&link).await {
            warn!(
                interface = name,
                "cannot remove half-made bridge: {cleanup}"
            );
        }
        return Err(e.into());
    }
    Ok(link)
}

/// Gives the bridge the IPv6 gateway `address6` (`::1` of the network's /64) and the
/// router's link-local address ([`crate::ra::ROUTER_LINK_LOCAL`]), both without duplicate
/// address detection so the DNS server and the Router Advertisements can use them at
/// once. Addresses already there are kept (an adopted bridge).
pub async fn add_ipv6(netlink: &Netlink, link: &Link, address6: Ipv6Net) -> io::Result<()> {
    let link_local = Ipv6Net::new(crate::ra::ROUTER_LINK_LOCAL, 64).expect("64 is a valid length");
    netlink.add_address_v6_nodad(link, link_local).await?;
    netlink.add_address_v6_nodad(link, address6).await
}

/// Whether the kernel has IPv6 in the calling thread's namespace (not booted with
/// `ipv6.disable=1`). Without it networks are IPv4 only.
pub fn has_ipv6() -> bool {
    Path::new(IPV6_CONF).exists()
}

/// Creates bridge `name`, down, with STP off and no forward delay, so a new port
/// forwards at once instead of listening and learning for 30 s first. The MAC is
/// set explicitly: a bridge whose MAC was not set takes its lowest port's, and
/// would change address whenever VMs come and go.
async fn create(netlink: &Netlink, name: &str, mac: [u8; 6]) -> io::Result<()> {
    let message = LinkMessageBuilder::<LinkBridge>::new(name)
        .address(mac.to_vec())
        .forward_delay(0)
        .stp_state(BridgeStpState::Disabled)
        .build();
    netlink
        .handle()
        .link()
        .add(message)
        .execute()
        .await
        .map_err(|e| fail(e, format!("cannot create bridge {name}")))
}

/// Where the kernel keeps the per-interface IPv6 settings of the calling thread's network
/// namespace.
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// IPv6 settings of every bridge, written before it is brought up. The kernel offers no
/// netlink attribute for them (IFLA_INET6_CONF is read-only), so they go through procfs,
/// which acts on the namespace of the writing thread: the backend's, as the broker runs
/// in one namespace (the tests' backends run on a thread of their namespace).
///
/// - `accept_ra=0`: no Router Advertisement from a VM sets a default route, a prefix
///   route or the hop limit/MTU of the host's side.
/// - `autoconf=0`: no global address is derived from an advertised prefix.
/// - `accept_redirects=0`: a VM cannot redirect the host's IPv6 traffic to itself
///   (ICMPv6 Redirect) either.
///
/// Left alone: `accept_dad` (duplicate address detection protects the bridge's
/// link-local address; a VM answering it can only make the host drop that address, on
/// this bridge, which the broker does not use) and `disable_ipv6` (the link-local address
/// stays, for whoever runs IPv6 services on the bridge).
const REFUSED: [&str; 3] = ["accept_ra", "autoconf", "accept_redirects"];

/// Sets [`REFUSED`] to 0 for interface `name` under `conf` (normally [`IPV6_CONF`]).
/// Nothing to do when the kernel has no IPv6 (no `conf` directory).
pub fn refuse_router_advertisements(conf: &Path, name: &str) -> io::Result<()> {
    write_ipv6_conf(conf, name, &REFUSED, "0")
}

/// Turns IPv6 off on bridge port `name` under `conf` (normally [`IPV6_CONF`]), before it
/// is brought up. A port is an L2 port: frames cross it whatever its IPv6 state, and the
/// bridge keeps IPv6 for the host. With IPv6 on, every TAP would add a link-local address
/// and its own routes to the IPv6 routing table when it comes up, and the kernel walks
/// that whole table (`rt6_sync_up`, `rt6_sync_down_dev`) on each TAP's up, carrier change
/// and removal: quadratic in the number of TAPs (most of the broker's CPU at 10,000
/// clients). This write walks it once too, but a table without per-TAP routes stays as
/// small as the bridges'. Nothing to do when the kernel has no IPv6.
pub fn disable_port_ipv6(conf: &Path, name: &str) -> io::Result<()> {
    write_ipv6_conf(conf, name, &["disable_ipv6"], "1")
}

/// [`disable_port_ipv6`] in this thread's namespace: what every port the broker puts on a
/// bridge gets (TAPs, the VXLAN port) before it is up.
pub fn disable_ipv6_of_port(name: &str) -> io::Result<()> {
    disable_port_ipv6(Path::new(IPV6_CONF), name)
}

/// Writes `value` to each of `settings` of interface `name` under `conf`; nothing when
/// `conf` does not exist (a kernel without IPv6).
fn write_ipv6_conf(conf: &Path, name: &str, settings: &[&str], value: &str) -> io::Result<()> {
    if !conf.exists() {
        return Ok(());
    }
    for setting in settings {
        let path = conf.join(name).join(setting);
        std::fs::write(&path, value).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot write {value} to {}: {e}", path.display()),
            )
        })?;
    }
    Ok(())
}

/// Turns the TAP's IPv6 off ([`disable_port_ipv6`]), gives it its MAC, MTU and alias,
/// enslaves it to `bridge` and brings it up.
pub async fn enslave(
    netlink: &Netlink,
    port: &Tap,
    mac: [u8; 6],
    mtu: u32,
    alias: &str,
    bridge: &Link,
) -> io::Result<()> {
    // While the TAP is still down: it never gets a link-local address or routes.
    disable_ipv6_of_port(port.name())?;
    let message = LinkUnspec::new_with_index(port.index())
        .address(mac.to_vec())
        .mtu(mtu)
        .alias(alias)
        .controller(bridge.index)
        .up()
        .build();
    let what = format!("attach to bridge {}", bridge.name);
    netlink.set(message, port.name(), &what).await
}

/// Marks a bridge port isolated: it reaches non-isolated ports (the bridge itself,
/// so the host) but no other isolated port.
pub async fn set_isolated(netlink: &Netlink, port: &Tap) -> io::Result<()> {
    let message = LinkBridgePort::new(port.index()).isolated(true).build();
    netlink
        .handle()
        .link()
        .set_port(message)
        .execute()
        .await
        .map_err(|e| fail(e, format!("cannot isolate bridge port {}", port.name())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_show_in_the_bridge_name() {
        assert_eq!(bridge_name("shared"), "vmnb-shared");
        assert_eq!(bridge_name("ten-chars."), "vmnb-ten-chars.");
    }

    #[test]
    fn long_names_are_hashed_stably_within_ifnamsiz() {
        let a = bridge_name("eleven-char");
        assert!(a.starts_with("vmnb-") && a.len() == 13, "{a}");
        assert_eq!(a, bridge_name("eleven-char"));
        assert_ne!(a, bridge_name("eleven-chaR"));
    }

    #[test]
    fn bridge_macs_are_local_unicast_and_stable() {
        let m = bridge_mac("shared");
        assert_eq!(m[0], 0x02);
        assert_eq!(m, bridge_mac("shared"));
        assert_ne!(m, bridge_mac("host"));
    }

    #[test]
    fn overlay_bridge_macs_follow_the_gateway() {
        let a = overlay_bridge_mac("10.90.0.1".parse().unwrap());
        assert_eq!(a, [0x02, b'x', 10, 90, 0, 1]);
        assert_ne!(a, overlay_bridge_mac("10.90.0.2".parse().unwrap()));
        assert_ne!(a, bridge_mac("lab"));
    }

    #[test]
    fn ipv6_settings_are_refused_per_interface() {
        let dir = tempfile::tempdir().unwrap();
        let br = dir.path().join("vmnb-x");
        std::fs::create_dir(&br).unwrap();
        for s in REFUSED {
            std::fs::write(br.join(s), "1").unwrap();
        }
        refuse_router_advertisements(dir.path(), "vmnb-x").unwrap();
        for s in REFUSED {
            assert_eq!(std::fs::read_to_string(br.join(s)).unwrap(), "0", "{s}");
        }
        // An interface the kernel does not know: an error, not silence.
        assert!(refuse_router_advertisements(dir.path(), "vmnb-none").is_err());
        // No IPv6 in the kernel: nothing to refuse.
        refuse_router_advertisements(&dir.path().join("absent"), "vmnb-x").unwrap();
    }

    #[test]
    fn a_ports_ipv6_is_disabled_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let tap = dir.path().join("vmnt7-p0");
        std::fs::create_dir(&tap).unwrap();
        std::fs::write(tap.join("disable_ipv6"), "0").unwrap();
        std::fs::write(tap.join("accept_ra"), "1").unwrap();
        disable_port_ipv6(dir.path(), "vmnt7-p0").unwrap();
        assert_eq!(
            std::fs::read_to_string(tap.join("disable_ipv6")).unwrap(),
            "1"
        );
        assert_eq!(std::fs::read_to_string(tap.join("accept_ra")).unwrap(), "1");
        assert!(disable_port_ipv6(dir.path(), "vmnt7-none").is_err());
        disable_port_ipv6(&dir.path().join("absent"), "vmnt7-p0").unwrap();
    }
}
