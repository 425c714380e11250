//! The kernel VXLAN device that carries a network to other hosts (`vxlan` in its file):
//! its name, its creation as a port of the network's bridge, the head-end replication
//! entries of its forwarding database, and the MTU the overlay leaves for the network.
//!
//! The device carries its own alias, [`OVERLAY_ALIAS_PREFIX`] and the network's name, not
//! the TAPs' and bridges' [`super::ALIAS_PREFIX`]: it is no endpoint, so the link record
//! and everything counting a network's TAPs must not see it, while a restarted broker
//! still recognises it as its own ([`super::LinuxBackend::remove_stale`]).
//!
//! Frames arriving through it are not subject to the TAP bindings of the firewall, which
//! match the network's TAP name prefix only; the firewall only keeps the overlay away
//! from this host's DHCP and DNS (`firewall/overlay.rs`).

use super::bridge::bridge_name;
use super::netlink::{Link, Netlink, fail};
use crate::config::{NetworkConfig, Vxlan};
use futures::StreamExt;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteType;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVxlan};
use std::io;
use std::net::IpAddr;

/// Start of the alias of every VXLAN device the broker makes; the network's name follows.
pub const OVERLAY_ALIAS_PREFIX: &str = "vmnet-broker-overlay:";

/// The alias of the VXLAN device of network `name`.
pub fn overlay_alias(name: &str) -> String {
    format!("{OVERLAY_ALIAS_PREFIX}{name}")
}

/// `vmnx-` and what follows `vmnb-` in the bridge's name: stable, within IFNAMSIZ, and
/// never a TAP's name (those start with `vmnt`).
pub fn vxlan_name(network: &str) -> String {
    let bridge = bridge_name(network);
    format!("vmnx-{}", &bridge["vmnb-".len()..])
}

/// The MTU of a network with overlay `vxlan`: the one its file gives, else the underlay's
/// less the encapsulation, so a full frame of a VM still fits one packet of the underlay.
pub async fn network_mtu(
    netlink: &Netlink,
    config: &NetworkConfig,
    vxlan: &Vxlan,
) -> io::Result<u32> {
    if config.mtu_from_file {
        return Ok(config.mtu);
    }
    let underlay = underlay_mtu(netlink, vxlan).await?;
    underlay
        .checked_sub(vxlan.overhead())
        .filter(|mtu| *mtu >= 576)
        .ok_or_else(|| {
            io::Error::other(format!(
                "the underlay's MTU {underlay} leaves less than 576 bytes for the overlay; set mtu"
            ))
        })
}

/// The MTU of the underlay: of `dev` when the file names it, else of the interface that
/// holds `local`.
async fn underlay_mtu(netlink: &Netlink, vxlan: &Vxlan) -> io::Result<u32> {
    let link = match &vxlan.dev {
        Some(dev) => netlink.link_by_name(dev).await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("vxlan.dev {dev}: no such interface on this host"),
            )
        })?,
        None => {
            let index = netlink
                .index_with_address(vxlan.local)
                .await?
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "vxlan.local {} is not an address of this host: give each host its own underlay address",
                            vxlan.local
                        ),
                    )
                })?;
            netlink.link_by_index(index).await?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "underlay interface vanished")
            })?
        }
    };
    link.mtu
        .ok_or_else(|| io::Error::other(format!("{} reports no MTU", link.name)))
}

/// Creates the VXLAN device of network `config` as a port of `bridge`, with MTU `mtu`,
/// and one forwarding entry per peer; brings it up. On failure nothing is left.
pub async fn make(
    netlink: &Netlink,
    config: &NetworkConfig,
    vxlan: &Vxlan,
    bridge: &Link,
    mtu: u32,
) -> io::Result<Link> {
    let name = vxlan_name(&config.name);
    let mut message = LinkVxlan::new(&name, vxlan.vni)
        .port(vxlan.port)
        // The kernel learns where remote VMs are from the frames it receives, so unicast
        // goes to one peer only; broadcasts are copied to every peer (the entries below).
        .learning(true);
    message = match vxlan.local {
        IpAddr::V4(a) => message.local(a),
        IpAddr::V6(a) => message.local6(a),
    };
    match vxlan.group {
        Some(IpAddr::V4(g)) => message = message.group(g),
        Some(IpAddr::V6(g)) => message = message.group6(g),
        None => {}
    }
    if let Some(dev) = &vxlan.dev {
        let link = netlink.link_by_name(dev).await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("vxlan.dev {dev}: no such interface on this host"),
            )
        })?;
        message = message.dev(link.index);
    }
    let message = finish(message, mtu, bridge.index);
    netlink
        .handle()
        .link()
        .add(message)
        .execute()
        .await
        .map_err(|e| fail(e, format!("cannot create VXLAN device {name}")))?;
    let link = match netlink.link_by_name(&name).await {
        Ok(Some(link)) => link,
        Ok(None) => {
            return Err(io::Error::other(format!(
                "VXLAN device {name} vanished after creation"
            )));
        }
        Err(e) => {
            // Without its alias yet, nothing else would recognise it as the broker's.
            netlink.delete_by_name(&name).await.ok();
            return Err(e);
        }
    };
    let configured = async {
        // A port is an L2 port, as a TAP is (`bridge::disable_port_ipv6`): with IPv6 on,
        // the device would take a link-local address when up and send its duplicate
        // address detection and MLD reports to every peer of the overlay.
        super::bridge::disable_ipv6_of_port(&name)?;
        // The kernel ignores IFLA_IFALIAS when it creates a link: set apart, with up.
        let alias = LinkUnspec::new_with_index(link.index)
            .alias(overlay_alias(&config.name))
            .up()
            .build();
        netlink.set(alias, &name, "set the alias of").await?;
        for peer in &vxlan.peers {
            add_peer(netlink, &link, *peer).await?;
        }
        Ok::<_, io::Error>(())
    };
    if let Err(e) = configured.await {
        netlink.delete(&link).await.ok();
        return Err(e);
    }
    Ok(Link {
        alias: Some(overlay_alias(&config.name)),
        ..link
    })
}

/// MTU and bridge: set at creation, so the device is never a port without them. Up only
/// once its IPv6 is off ([`make`]).
fn finish(
    message: LinkMessageBuilder<LinkVxlan>,
    mtu: u32,
    bridge: u32,
) -> netlink_packet_route::link::LinkMessage {
    message.mtu(mtu).controller(bridge).build()
}

/// Appends the head-end replication entry for `peer`: the all-zeroes MAC with `peer` as
/// destination, what `bridge fdb append 00:00:00:00:00:00 dev <vxlan> dst <peer>` adds.
/// Every broadcast, multicast and unknown unicast frame is copied to each such entry.
/// Appended (NLM_F_APPEND), not created exclusively: the entries of all peers share the
/// one MAC.
pub async fn add_peer(netlink: &Netlink, link: &Link, peer: IpAddr) -> io::Result<()> {
    let mut request =
        NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(peer_entry(link, peer)));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
    let what = format!("cannot add peer {peer} to {}", link.name);
    run(netlink, request, what).await
}

/// Removes the head-end replication entry for `peer` (`bridge fdb del
/// 00:00:00:00:00:00 dev <vxlan> dst <peer>`); one already gone counts as removed.
pub async fn del_peer(netlink: &Netlink, link: &Link, peer: IpAddr) -> io::Result<()> {
    let mut request =
        NetlinkMessage::from(RouteNetlinkMessage::DelNeighbour(peer_entry(link, peer)));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let what = format!("cannot remove peer {peer} from {}", link.name);
    match run(netlink, request, what).await {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The forwarding entry of `peer` on `link`: the all-zeroes MAC to `peer`, permanent.
fn peer_entry(link: &Link, peer: IpAddr) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = link.index;
    message.header.state = NeighbourState::Permanent;
    // NTF_SELF: the entry is the VXLAN device's own, not the bridge's.
    message.header.flags = NeighbourFlags::Own;
    message.header.kind = RouteType::Unspec;
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
    message
        .attributes
        .push(NeighbourAttribute::Destination(match peer {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    message
}

/// Sends one neighbour request and waits for its acknowledgement.
async fn run(
    netlink: &Netlink,
    request: NetlinkMessage<RouteNetlinkMessage>,
    what: String,
) -> io::Result<()> {
    let mut handle = netlink.handle().clone();
    let mut response = handle.request(request).map_err(|e| fail(e, what.clone()))?;
    while let Some(message) = response.next().await {
        if let NetlinkPayload::Error(e) = message.payload {
            return Err(fail(rtnetlink::Error::NetlinkError(e), what));
        }
    }
    Ok(())
}

/// The VXLAN device of network `name`, when it exists and carries its alias.
pub async fn find(netlink: &Netlink, name: &str) -> io::Result<Option<Link>> {
    let alias = overlay_alias(name);
    Ok(netlink
        .link_by_name(&vxlan_name(name))
        .await?
        .filter(|l| l.alias.as_deref() == Some(alias.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_bridge_and_fit() {
        assert_eq!(vxlan_name("shared"), "vmnx-shared");
        let long = vxlan_name("a-rather-long-network-name");
        assert!(long.starts_with("vmnx-") && long.len() == 13, "{long}");
        assert_eq!(long, vxlan_name("a-rather-long-network-name"));
    }

    #[test]
    fn the_overlay_alias_is_not_an_endpoint_alias() {
        assert!(!overlay_alias("x").starts_with(super::super::ALIAS_PREFIX));
    }
}
