//! Generic rtnetlink requests: links (list, look up, configure, delete), addresses and
//! the routes that occupy address space. What only bridges and their ports need lives in
//! bridge.rs.
//!
//! Requests go to the network namespace of the thread that opened the connection, which
//! is what lets the integration tests run the backend in a namespace of their own.

use super::subnet::{Occupant, Occupation};
use futures::TryStreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use tokio::task::JoinHandle;

/// The interface group links are moved to just before the broker deletes them together
/// ([`Netlink::delete_many`]): "vmnb" in ASCII, far from the small numbers admins give
/// groups (`/etc/iproute2/group`). A link someone else put in this group would be deleted
/// with the broker's; only CAP_NET_ADMIN can set a group.
pub const DELETE_GROUP: u32 = 0x766d_6e62;

/// One rtnetlink connection and the task that drives it.
pub struct Netlink {
    handle: Handle,
    /// The connection's task on the caller's runtime; `None` when it runs on a thread of
    /// its own ([`Netlink::connect_dedicated`]), which ends with the last handle.
    task: Option<JoinHandle<()>>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What the backend needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub alias: Option<String>,
    /// The index of the bridge (or other master) the link is enslaved to.
    pub controller: Option<u32>,
    pub is_bridge: bool,
    /// The link's MAC, for Ethernet links.
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    /// Whether the link has carrier (`IFLA_CARRIER`): a TAP loses it when the last fd
    /// attached to it closes.
    pub carrier: Option<bool>,
}

impl Link {
    /// A link known only by its index and name (a TAP the caller holds an fd of).
    pub fn tap(index: u32, name: &str) -> Self {
        Link {
            index,
            name: name.to_string(),
            alias: None,
            controller: None,
            is_bridge: false,
            mac: None,
            mtu: None,
            carrier: None,
        }
    }

    pub(crate) fn from_message(msg: LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            alias: None,
            controller: None,
            is_bridge: false,
            mac: None,
            mtu: None,
            carrier: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::IfAlias(alias) => link.alias = Some(alias),
                LinkAttribute::Controller(index) => link.controller = Some(index),
                LinkAttribute::Address(mac) => link.mac = mac.try_into().ok(),
                LinkAttribute::Mtu(mtu) => link.mtu = Some(mtu),
                LinkAttribute::Carrier(on) => link.carrier = Some(on != 0),
                LinkAttribute::LinkInfo(infos) => {
                    link.is_bridge = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
                }
                _ => {}
            }
        }
        link
    }
}

/// The errno behind a netlink failure, if the kernel sent one.
fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Runs a dump again when the kernel flags it interrupted (the table changed while it
/// was being read: another TAP came or went), which rtnetlink reports as EBUSY. iproute2
/// only warns ("Dump was interrupted"); a subnet choice made from an inconsistent view
/// could overlap, so the dump is taken again.
async fn dump<T, F, Fut>(mut run: F) -> Result<Vec<T>, rtnetlink::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, rtnetlink::Error>>,
{
    const ATTEMPTS: usize = 10;
    let mut attempt = 1;
    loop {
        match run().await {
            Err(e) if errno(&e) == Some(libc::EBUSY) && attempt < ATTEMPTS => attempt += 1,
            other => return other,
        }
    }
}

/// Turns a netlink failure into an io::Error that says what was being done; the
/// kernel's errno stays readable ([`errno_of`]).
pub(crate) fn fail(err: rtnetlink::Error, what: impl std::fmt::Display) -> io::Error {
    match err {
        rtnetlink::Error::NetlinkError(msg) => {
            let errno = msg.to_io();
            io::Error::new(
                errno.kind(),
                Refused {
                    what: what.to_string(),
                    errno,
                },
            )
        }
        other => io::Error::other(format!("{what}: {other}")),
    }
}

/// A request the kernel refused ([`fail`]): shown as what was being done and the
/// kernel's reason, in one line (no source: the reason is in the text already).
#[derive(Debug)]
struct Refused {
    what: String,
    errno: io::Error,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.errno)
    }
}

impl std::error::Error for Refused {}

/// The kernel's errno behind `e`: its own, or that of a refusal [`fail`] described.
pub(crate) fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()?
            .downcast_ref::<Refused>()
            .and_then(|r| r.errno.raw_os_error())
    })
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace. Needs a tokio
    /// runtime: the connection runs as a task that ends when this value is dropped.
    pub fn connect() -> io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open rtnetlink: {e}")))?;
        let task = tokio::spawn(connection);
        Ok(Self {
            handle,
            task: Some(task),
        })
    }

    /// Opens a connection in the calling thread's network namespace whose socket is
    /// driven by a thread of its own (named `name`), for requests the kernel makes the
    /// sender wait long for: a deletion waits for RCU grace periods inside `sendmsg`, tens
    /// of milliseconds in which a runtime worker could do nothing else (and requests
    /// queued behind it on a shared connection, an acquire's, would wait too).
    pub fn connect_dedicated(name: &str) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // The socket is made here, in the caller's namespace, and registered with the
        // thread's runtime, which alone polls it.
        let made = {
            let _context = runtime.enter();
            rtnetlink::new_connection()
        };
        let (connection, handle, _) =
            made.map_err(|e| io::Error::new(e.kind(), format!("cannot open rtnetlink: {e}")))?;
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || runtime.block_on(connection))?;
        Ok(Self { handle, task: None })
    }

    /// Every link in the namespace.
    pub async fn links(&self) -> io::Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = dump(|| self.handle.link().get().execute().try_collect())
            .await
            .map_err(|e| fail(e, "cannot list links"))?;
        Ok(msgs.into_iter().map(Link::from_message).collect())
    }

    async fn one_link(&self, request: rtnetlink::LinkGetRequest) -> io::Result<Option<Link>> {
        match request.execute().try_next().await {
            Ok(msg) => Ok(msg.map(Link::from_message)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(fail(e, "cannot look up link")),
        }
    }

    pub async fn link_by_name(&self, name: &str) -> io::Result<Option<Link>> {
        self.one_link(self.handle.link().get().match_name(name))
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{name}: {e}")))
    }

    pub async fn link_by_index(&self, index: u32) -> io::Result<Option<Link>> {
        self.one_link(self.handle.link().get().match_index(index))
            .await
    }

    /// The links enslaved to bridge `bridge_index`.
    pub async fn ports_of(&self, bridge_index: u32) -> io::Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = dump(|| {
            let mut request = self.handle.link().get();
            // The kernel filters the dump by master; the check below keeps it correct on
            // kernels that ignore the attribute.
            request
                .message_mut()
                .attributes
                .push(LinkAttribute::Controller(bridge_index));
            request.execute().try_collect()
        })
        .await
        .map_err(|e| fail(e, format!("cannot list ports of bridge #{bridge_index}")))?;
        Ok(msgs
            .into_iter()
            .map(Link::from_message)
            .filter(|l| l.controller == Some(bridge_index))
            .collect())
    }

    /// Sets MTU and alias and brings the link up. Setting the bridge MTU explicitly
    /// (not at creation) marks it as set by the user, so the kernel keeps it instead of
    /// falling back to 1500 whenever the last port leaves.
    pub async fn configure_up(&self, link: &Link, mtu: u32, alias: &str) -> io::Result<()> {
        let message = LinkUnspec::new_with_index(link.index)
            .mtu(mtu)
            .alias(alias)
            .up()
            .build();
        self.set(message, &link.name, "configure").await
    }

    pub async fn add_address(&self, link: &Link, address: Ipv4Net) -> io::Result<()> {
        self.handle
            .address()
            .add(link.index, IpAddr::V4(address.addr()), address.prefix_len())
            .execute()
            .await
            .map_err(|e| fail(e, format!("cannot add address {address} to {}", link.name)))
    }

    /// Adds IPv6 `address` to `link` without duplicate address detection (IFA_F_NODAD),
    /// unless it is there already:
    /// usable at once, so the DNS server can bind it and Router Advertisements can leave
    /// from it as soon as the network exists. The broker owns the bridge and picks its
    /// addresses (`::1` of the network's prefix, `fe80::1`); no VM may claim them (a
    /// guest answering DAD for them would only show a misbehaving guest).
    pub async fn add_address_v6_nodad(&self, link: &Link, address: Ipv6Net) -> io::Result<()> {
        let mut request =
            self.handle
                .address()
                .add(link.index, IpAddr::V6(address.addr()), address.prefix_len());
        let message = request.message_mut();
        message.header.flags |= AddressHeaderFlags::Nodad;
        message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        match request.execute().await {
            Ok(()) => Ok(()),
            // Already there (an adopted bridge): what was asked for.
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(fail(
                e,
                format!("cannot add address {address} to {}", link.name),
            )),
        }
    }

    /// The rtnetlink handle, for the requests of modules that own a kind of link
    /// (bridge.rs).
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Sends a request that the kernel answers with an acknowledgement only (traffic
    /// control changes of the TAP guard, which rtnetlink has no builder for), and turns a
    /// negative one into the kernel's errno.
    pub(crate) async fn ack(
        &self,
        request: rtnetlink::packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>,
    ) -> io::Result<()> {
        use futures::StreamExt;
        use rtnetlink::packet_core::NetlinkPayload;
        let mut responses = self
            .handle
            .clone()
            .request(request)
            .map_err(io::Error::other)?;
        while let Some(msg) = responses.next().await {
            if let NetlinkPayload::Error(e) = msg.payload
                && let Some(code) = e.code
            {
                return Err(io::Error::from_raw_os_error(-code.get()));
            }
        }
        Ok(())
    }

    /// Applies a link change (RTM_SETLINK) to link `name`.
    pub(crate) async fn set(&self, message: LinkMessage, name: &str, what: &str) -> io::Result<()> {
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|e| fail(e, format!("cannot {what} {name}")))
    }

    /// Deletes a link; a link that is already gone counts as deleted (returns false).
    pub async fn delete(&self, link: &Link) -> io::Result<bool> {
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(fail(e, format!("cannot delete {}", link.name))),
        }
    }

    /// Deletes `links` together, in one kernel transaction, and returns how many of them
    /// still existed. Deleting a link one request at a time costs a full RCU grace period
    /// each (about 20 ms: the kernel waits for every CPU before it frees the device), so
    /// a thousand TAPs took 20 s; the kernel deletes a whole interface group with one
    /// `unregister_netdevice_many`, which waits once. Each link is first moved to
    /// [`DELETE_GROUP`] (by index, so only the links given), then the group is deleted.
    pub async fn delete_many(&self, links: &[&Link]) -> io::Result<usize> {
        self.delete_marked(links, 0).await
    }

    /// Moves `link` to [`DELETE_GROUP`] ahead of a [`Netlink::delete_marked`]; returns
    /// false if it is gone.
    pub async fn mark_for_deletion(&self, link: &Link) -> io::Result<bool> {
        let mut message = LinkMessage::default();
        message.header.index = link.index;
        message.attributes.push(LinkAttribute::Group(DELETE_GROUP));
        match self.handle.link().set(message).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(fail(e, format!("cannot mark {} for deletion", link.name))),
        }
    }

    /// [`Netlink::delete_many`] of `links` and of `marked` links already moved to
    /// [`DELETE_GROUP`] ([`Netlink::mark_for_deletion`]); returns how many of `links`
    /// still existed, plus `marked`.
    pub async fn delete_marked(&self, links: &[&Link], marked: usize) -> io::Result<usize> {
        if links.is_empty() && marked == 0 {
            return Ok(0);
        }
        let moves = links.iter().map(|link| self.mark_for_deletion(link));
        let mut moved = marked;
        let mut first_error = None;
        for result in futures::future::join_all(moves).await {
            match result {
                Ok(true) => moved += 1,
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if moved > 0 {
            self.delete_group(DELETE_GROUP).await?;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(moved),
        }
    }

    /// Deletes every link of interface group `group` (one `RTM_DELLINK` with
    /// `IFLA_GROUP` and no index). A group that is empty by now (another deletion took
    /// its links) is not an error.
    async fn delete_group(&self, group: u32) -> io::Result<()> {
        let mut request = self.handle.link().del(0);
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::Group(group));
        match request.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(fail(e, format!("cannot delete interface group {group:#x}"))),
        }
    }

    /// Deletes the link called `name`; false when there is none. Only for a link just made
    /// whose index could not be learnt: anything else is deleted by index ([`Self::delete`])
    /// after checking what it is.
    pub async fn delete_by_name(&self, name: &str) -> io::Result<bool> {
        // Index 0 and IFLA_IFNAME: the kernel looks the link up by name.
        let mut request = self.handle.link().del(0);
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::IfName(name.to_string()));
        match request.execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(fail(e, format!("cannot delete {name}"))),
        }
    }

    /// Everything that occupies IPv4 address space: the addresses of all interfaces
    /// and the routes of the main table except the default route; with `ipv6`, what
    /// occupies IPv6 address space too, by the same rules: every global or unique-local
    /// address (with its prefix) and every route of the main table but the default one.
    /// Link-local ones are left out: every interface has fe80::/64, which no network's
    /// prefix can be (the config refuses it).
    ///
    /// One dump of addresses (both families) and one of routes per family, all requests
    /// in flight at once on the one socket: a network's creation waits for about one
    /// round trip, not six in a row. The interfaces' names (for the conflict messages)
    /// come from `SIOCGIFNAME` for the few interfaces that hold addresses or routes, not
    /// from a dump of every link: with 20 networks the host has over a hundred (bridges
    /// and TAPs), each a kilobyte and a half of attributes to fill and parse.
    pub async fn occupants(
        &self,
        ipv6: bool,
    ) -> io::Result<(Vec<Occupant>, Vec<Occupant<Ipv6Net>>)> {
        let routes6 = async {
            if !ipv6 {
                return Ok(vec![]);
            }
            dump(|| {
                let query = RouteMessageBuilder::<std::net::Ipv6Addr>::new().build();
                self.handle.route().get(query).execute().try_collect()
            })
            .await
            .map_err(|e| fail(e, "cannot list IPv6 routes"))
        };
        let routes4 = async {
            dump(|| {
                let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
                self.handle.route().get(query).execute().try_collect()
            })
            .await
            .map_err(|e| fail(e, "cannot list routes"))
        };
        let (addresses, routes4, routes6) =
            tokio::try_join!(self.address_messages(), routes4, routes6)?;
        let names = interface_names(
            addresses
                .iter()
                .map(|m| m.header.index)
                .chain(routes4.iter().chain(&routes6).filter_map(route_oif)),
        );
        let mut occupants = v4_addresses(&addresses, &names);
        occupants.extend(v4_routes(routes4, &names));
        let occupants6 = if ipv6 {
            let mut occupants6 = v6_addresses(&addresses, &names);
            occupants6.extend(v6_routes(routes6, &names));
            occupants6
        } else {
            vec![]
        };
        Ok((occupants, occupants6))
    }

    /// Every address of every interface, as the kernel dumps them.
    async fn address_messages(&self) -> io::Result<Vec<AddressMessage>> {
        dump(|| self.handle.address().get().execute().try_collect())
            .await
            .map_err(|e| fail(e, "cannot list addresses"))
    }

    /// The index of the interface that holds address `ip`, if one does.
    pub async fn index_with_address(&self, ip: IpAddr) -> io::Result<Option<u32>> {
        let msgs = self.address_messages().await?;
        Ok(msgs
            .into_iter()
            .find(|m| {
                m.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Local(a) | AddressAttribute::Address(a) if *a == ip)
                })
            })
            .map(|m| m.header.index))
    }
}

/// The IPv4 addresses of `msgs` as occupants.
fn v4_addresses(msgs: &[AddressMessage], names: &BTreeMap<u32, String>) -> Vec<Occupant> {
    msgs.iter()
        .filter(|m| m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            let addr = ipv4_of_address(m)?;
            Some(Occupant {
                net: Ipv4Net::new(addr, m.header.prefix_len).ok()?,
                what: Occupation::Address {
                    interface: name_of(names, m.header.index),
                },
            })
        })
        .collect()
}

/// The IPv4 routes of the main table but the default one, as occupants.
fn v4_routes(msgs: Vec<RouteMessage>, names: &BTreeMap<u32, String>) -> Vec<Occupant> {
    msgs.into_iter()
        .filter(|m| m.header.address_family == AddressFamily::Inet)
        .filter(|m| table_of(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .filter(|m| m.header.destination_prefix_length > 0)
        .filter_map(|m| {
            let dest = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                _ => None,
            })?;
            let interface = route_oif(&m).map(|i| name_of(names, i));
            Some(Occupant {
                net: Ipv4Net::new(dest, m.header.destination_prefix_length).ok()?,
                what: Occupation::Route { interface },
            })
        })
        .collect()
}

fn link_local6(a: &std::net::Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// The global and unique-local IPv6 addresses of `msgs` (with their prefixes) as
/// occupants.
fn v6_addresses(msgs: &[AddressMessage], names: &BTreeMap<u32, String>) -> Vec<Occupant<Ipv6Net>> {
    msgs.iter()
        .filter(|m| m.header.family == AddressFamily::Inet6)
        .filter_map(|m| {
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
                _ => None,
            })?;
            if link_local6(&addr) || addr.is_loopback() {
                return None;
            }
            Some(Occupant {
                net: Ipv6Net::new(addr, m.header.prefix_len).ok()?,
                what: Occupation::Address {
                    interface: name_of(names, m.header.index),
                },
            })
        })
        .collect()
}

/// The IPv6 routes of the main table but the default and link-local ones, as occupants.
fn v6_routes(msgs: Vec<RouteMessage>, names: &BTreeMap<u32, String>) -> Vec<Occupant<Ipv6Net>> {
    msgs.into_iter()
        .filter(|m| m.header.address_family == AddressFamily::Inet6)
        .filter(|m| table_of(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .filter(|m| m.header.destination_prefix_length > 0)
        .filter_map(|m| {
            let dest = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet6(d)) => Some(*d),
                _ => None,
            })?;
            if link_local6(&dest) {
                return None;
            }
            let interface = route_oif(&m).map(|i| name_of(names, i));
            Some(Occupant {
                net: Ipv6Net::new(dest, m.header.destination_prefix_length).ok()?,
                what: Occupation::Route { interface },
            })
        })
        .collect()
}

/// The output interface of a route, if it has one.
fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// The names of interfaces `indexes` in the calling thread's network namespace (that of
/// the sockets: see [`Netlink::connect`]); one gone meanwhile is left out ([`name_of`]
/// shows its index).
fn interface_names(indexes: impl Iterator<Item = u32>) -> BTreeMap<u32, String> {
    let mut names = BTreeMap::new();
    for index in indexes {
        if names.contains_key(&index) {
            continue;
        }
        if let Ok(name) = nix::net::if_::if_indextoname(index) {
            names.insert(index, name.to_string_lossy().into_owned());
        }
    }
    names
}

fn name_of(names: &BTreeMap<u32, String>, index: u32) -> String {
    names
        .get(&index)
        .cloned()
        .unwrap_or_else(|| format!("#{index}"))
}

/// The local address of an IPv4 address message (IFA_LOCAL; IFA_ADDRESS is the peer on
/// point-to-point links, whose prefix shows up as a route anyway).
fn ipv4_of_address(m: &AddressMessage) -> Option<Ipv4Addr> {
    let pick = |local: bool| {
        m.attributes.iter().find_map(|a| match (a, local) {
            (AddressAttribute::Local(IpAddr::V4(ip)), true) => Some(*ip),
            (AddressAttribute::Address(IpAddr::V4(ip)), false) => Some(*ip),
            _ => None,
        })
    };
    pick(true).or_else(|| pick(false))
}

/// Tables above 255 only appear in RTA_TABLE; the header holds the low byte.
fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// The name of the bridge (master) `interface` is enslaved to, in the caller's network
/// namespace; `None` if it has no master. Clients use it to check that a TAP they
/// received sits on the expected bridge. Needs a tokio runtime.
pub async fn bridge_of(interface: &str) -> io::Result<Option<String>> {
    let netlink = Netlink::connect()?;
    let Some(link) = netlink.link_by_name(interface).await? else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface named {interface}"),
        ));
    };
    let Some(controller) = link.controller else {
        return Ok(None);
    };
    Ok(netlink.link_by_index(controller).await?.map(|l| l.name))
}
