//! The TAP guard: per-frame anti-spoofing of anti-spoofing networks as a BPF program at TC
//! of each TAP (source: `bpf/tap_guard.c`, compiled by build.rs), instead of the nftables
//! bridge-family chain, which cost about a third of the data plane (docs/design.md, "The
//! TAP guard"; docs/benchmarks.md).
//!
//! One program pair (`tap_ingress`, `tap_egress`) and two maps per broker process:
//! `bindings` (TAP ifindex -> [`Binding`]) and `peers` ([`PeerKey`]: bridge ifindex and
//! guest MAC -> TAP ifindex), the guest-to-guest fast path's directory: a checked unicast
//! frame to another bound guest of the same bridge is redirected to that guest's TAP
//! instead of crossing the bridge ([`BIND_FAST`]; docs/design.md, "The TAP guard").
//! On networks with a VXLAN overlay, a third program, `overlay_ingress`, sits at TC
//! ingress of the VXLAN port (bound with [`BIND_OVERLAY`]) and learns into a third map,
//! `remotes` (LRU, written only by the programs), which MACs are behind the port: the
//! overlay fast path, unicast between local guests and other hosts' guests past the
//! bridge in both directions ([`Guard::attach_overlay`]; docs/design.md, "The overlay
//! fast path").
//! [`Guard::bind`] and [`Guard::unbind`] keep the two maps consistent: a `peers` entry
//! exists only for a TAP whose binding holds that MAC on that bridge (and the program
//! checks the target's binding again before redirecting). [`Guard::attach`] puts a
//! clsact qdisc on a TAP whose ingress and egress are the guard's two shared TC blocks,
//! which hold the filters (cls_bpf, direct action) for every TAP; a TAP without a
//! binding sends and receives nothing, so attaching before the TAP is up and on the
//! bridge binds it before its first frame, and an idle pool TAP held open queues
//! nothing. The filters are kernel objects holding the programs, which
//! hold the map: nothing depends on the broker's fds, so a broker that dies (even by
//! SIGKILL) leaves its VMs connected and protected. The next broker finds the program
//! and the maps through the filter of an adopted TAP ([`Guard::adopt`]: filter -> program
//! id -> map ids) and goes on with them, bindings included. A guard an older broker left
//! (one map, 24-byte bindings, no fast path) is not adopted: the new broker loads its own
//! and, binding each adopted TAP in its map first, replaces the old filters in place (no
//! frame passes unchecked, none of a bound TAP is dropped); TAPs nobody binds again keep
//! the old guard and its old bindings.

use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapInfo};
use aya::programs::{ProgramFd, SchedClassifier, loaded_programs};
use futures::TryStreamExt;
use netlink_packet_core::DefaultNla;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption,
};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
};

use crate::backend::linux::netlink::Netlink;

/// The compiled `bpf/tap_guard.c`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tap_guard.o"));

/// The maps' names in the object, and the programs'.
const MAP: &str = "bindings";
const PEERS: &str = "peers";
const INGRESS: &str = "tap_ingress";
const EGRESS: &str = "tap_egress";
/// The program at TC ingress of a network's VXLAN port (the overlay fast path).
const OVERLAY: &str = "overlay_ingress";
/// The filters' priority on the TAP: one of ours per direction, replaced in place.
const PRIORITY: u16 = 1;
/// The filters' handle.
const HANDLE: u32 = 1;
/// `TC_H_CLSACT` and its two children (`TC_H_MIN_INGRESS`, `TC_H_MIN_EGRESS`).
const CLSACT: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0xfff1,
};
const PARENT_INGRESS: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0xfff2,
};
const PARENT_EGRESS: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0xfff3,
};
/// `ETH_P_ALL`: the filters see every frame.
const ETH_P_ALL: u16 = 0x0003;
/// The shared TC blocks every guarded TAP's clsact uses, ingress and egress ("vnb" and
/// 1 or 2): one filter each, holding `tap_ingress` and `tap_egress` ([`Guard::attach`]).
/// Block indexes are the network namespace's, and nothing else of ours uses any.
pub const INGRESS_BLOCK: u32 = u32::from_be_bytes(*b"vnb\x01");
pub const EGRESS_BLOCK: u32 = u32::from_be_bytes(*b"vnb\x02");
const BLOCKS: [u32; 2] = [INGRESS_BLOCK, EGRESS_BLOCK];
/// `TCA_INGRESS_BLOCK` and `TCA_EGRESS_BLOCK` (linux/rtnetlink.h), which
/// netlink-packet-route 0.34 has no variants for.
const TCA_INGRESS_BLOCK: u16 = 13;
const TCA_EGRESS_BLOCK: u16 = 14;

/// `flags` of a [`Binding`]: IPv4 and ARP sources must be the lease, and DHCP client
/// messages must name the bound MAC (`BIND_DHCP` in the C source).
pub const BIND_DHCP: u8 = 1;
/// `flags` of a [`Binding`]: the guest-to-guest fast path (`BIND_FAST` in the C source).
/// Only for networks whose guests may talk to each other (not `isolation`), with
/// `bridge` and `mtu` set: the TAP's guest MAC is in `peers`, and checked unicast frames
/// from it to another such guest of the same bridge are redirected to that guest's TAP.
pub const BIND_FAST: u8 = 2;
/// `flags` of the binding of a network's VXLAN port (`BIND_OVERLAY` in the C source),
/// keyed by the port's ifindex: `mac` is the bridge's own, `bridge` and `mtu` as for
/// [`BIND_FAST`]. Guests of other hosts are reached through the port without crossing
/// the bridge, and it hands frames for local guests straight to their TAPs
/// ([`Guard::attach_overlay`]).
pub const BIND_OVERLAY: u8 = 4;

/// What one TAP is bound to: `struct binding` of `bpf/tap_guard.c`, byte for byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    pub mac: [u8; 6],
    pub flags: u8,
    pub _pad: u8,
    /// The DHCP lease in network byte order; 0 = none yet.
    pub ip4: [u8; 4],
    /// The network's gateway in network byte order (DHCP client messages go there).
    pub gw4: [u8; 4],
    /// A /64 prefix whose EUI-64 address of `mac` the VM may use; all zero = none.
    pub prefix6: [u8; 8],
    /// The ifindex of the network's bridge ([`BIND_FAST`]: the fast path's scope).
    pub bridge: u32,
    /// The network's MTU ([`BIND_FAST`]: longer frames are left to the bridge).
    pub mtu: u32,
}

// SAFETY: `Binding` is `repr(C)`, `Copy`, made only of byte arrays (no padding, no
// pointers), so any bit pattern of its size is a valid value, as `Pod` requires.
unsafe impl aya::Pod for Binding {}

impl Binding {
    pub fn new(mac: [u8; 6], dhcp: bool, lease: Option<Ipv4Addr>, gateway: Ipv4Addr) -> Self {
        Binding {
            mac,
            flags: if dhcp { BIND_DHCP } else { 0 },
            _pad: 0,
            ip4: lease.map(|ip| ip.octets()).unwrap_or_default(),
            gw4: gateway.octets(),
            prefix6: [0; 8],
            bridge: 0,
            mtu: 0,
        }
    }

    /// The same binding with the guest-to-guest fast path ([`BIND_FAST`]) on bridge
    /// `bridge` (ifindex) of MTU `mtu`.
    pub fn with_fast_path(mut self, bridge: u32, mtu: u32) -> Self {
        self.flags |= BIND_FAST;
        self.bridge = bridge;
        self.mtu = mtu;
        self
    }

    /// The binding of the VXLAN port of a network whose bridge (ifindex `bridge`, MTU
    /// `mtu`) has MAC `bridge_mac`: [`BIND_OVERLAY`], no lease, no `peers` entry.
    pub fn overlay_port(bridge_mac: [u8; 6], bridge: u32, mtu: u32) -> Self {
        Binding {
            mac: bridge_mac,
            flags: BIND_OVERLAY,
            bridge,
            mtu,
            ..Binding::default()
        }
    }

    /// Its key in `peers`, when it has the fast path.
    fn peer_key(&self) -> Option<PeerKey> {
        (self.flags & BIND_FAST != 0 && self.bridge != 0).then_some(PeerKey {
            bridge: self.bridge,
            mac: self.mac,
            _pad: [0; 2],
        })
    }
}

/// A key of `peers`: `struct peer_key` of `bpf/tap_guard.c`, byte for byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKey {
    /// The ifindex of the network's bridge.
    pub bridge: u32,
    pub mac: [u8; 6],
    /// Always zero: the kernel hashes the key's bytes.
    pub _pad: [u8; 2],
}

// SAFETY: `PeerKey` is `repr(C)`, `Copy`, a u32 then 8 bytes (no padding, no pointers),
// so any bit pattern of its size is a valid value, as `Pod` requires.
unsafe impl aya::Pod for PeerKey {}

/// Everything the guard can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot load the TAP guard (BPF) into the kernel")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot adopt the TAP guard found on interface {ifindex}")]
    Adopt {
        ifindex: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot {what} on interface {ifindex}")]
    Netlink {
        what: &'static str,
        ifindex: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} the binding of interface {ifindex}")]
    Map {
        what: &'static str,
        ifindex: u32,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The guard's two maps.
struct Maps {
    bindings: BpfHashMap<MapData, u32, Binding>,
    peers: BpfHashMap<MapData, PeerKey, u32>,
}

/// The loaded (or adopted) programs and their maps.
pub struct Guard {
    ingress: ProgramFd,
    egress: ProgramFd,
    ingress_id: u32,
    egress_id: u32,
    /// `overlay_ingress` of the same object (sharing its maps), for VXLAN ports; None
    /// for an adopted guard whose object had none (a broker from before the overlay
    /// fast path): overlay frames then cross the bridge as before.
    overlay: Option<ProgramFd>,
    /// Locked only around the few `bpf(2)` map calls of one change (at most four), which
    /// neither sleep nor wait on anything but the maps' own bucket locks; aya's update
    /// API takes `&mut`, and a change of both maps must not interleave with another.
    map: Mutex<Maps>,
    /// Whether this process has put its filters in the shared blocks ([`Guard::attach`]).
    blocks_filled: AtomicBool,
    netlink: Netlink,
}

fn load_err(e: impl std::error::Error + Send + Sync + 'static) -> GuardError {
    GuardError::Load(Box::new(e))
}

impl Guard {
    /// Loads the programs and a new, empty map. Needs a tokio runtime (netlink) and
    /// CAP_BPF/CAP_NET_ADMIN. The load itself (aya's probes of the kernel's features and
    /// the verifier: about 0.1 s here) runs on a blocking thread, not on the runtime's.
    pub async fn load() -> Result<Guard, GuardError> {
        let netlink = Netlink::connect().map_err(load_err)?;
        tokio::task::spawn_blocking(move || {
            let guard = Self::load_programs(netlink);
            // What loading parsed and dropped (the kernel's BTF: 15 MiB here).
            crate::backend::linux::heap::release_freed();
            guard
        })
        .await
        .map_err(load_err)?
    }

    /// The blocking part of [`Guard::load`]: the object loaded, its programs verified.
    fn load_programs(netlink: Netlink) -> Result<Guard, GuardError> {
        // No target BTF: the object has nothing to relocate against the kernel's types
        // (legacy `bpf_map_def` maps, no CO-RE field access). aya's `Ebpf::load` parses
        // the kernel's BTF twice for that (aya-rs/aya#1172); `btf(None)` drops the second
        // parse. The first is in `EbpfLoader::new` itself until aya 0.15 (lazy there, but
        // it needs a newer rustc than the one we build with); its memory goes back to the
        // kernel once the programs are loaded (`heap::release_freed`).
        let mut ebpf = aya::EbpfLoader::new()
            .btf(None)
            .load(OBJECT)
            .map_err(load_err)?;
        let mut fds = vec![];
        for name in [INGRESS, EGRESS, OVERLAY] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| load_err(io::Error::other(format!("no program {name}"))))?
                .try_into()
                .map_err(load_err)?;
            program.load().map_err(load_err)?;
            let id = program.info().map_err(load_err)?.id();
            // Kept past `ebpf`, whose drop closes its own copies.
            fds.push((
                program
                    .fd()
                    .map_err(load_err)?
                    .try_clone()
                    .map_err(load_err)?,
                id,
            ));
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| load_err(io::Error::other(format!("no map {name}"))))
        };
        let (bindings, peers) = (take(MAP)?, take(PEERS)?);
        let map = Maps {
            bindings: BpfHashMap::try_from(bindings).map_err(load_err)?,
            peers: BpfHashMap::try_from(peers).map_err(load_err)?,
        };
        let (overlay, _) = fds.pop().expect("three programs");
        let (egress, egress_id) = fds.pop().expect("three programs");
        let (ingress, ingress_id) = fds.pop().expect("three programs");
        Ok(Guard {
            ingress,
            egress,
            ingress_id,
            egress_id,
            overlay: Some(overlay),
            map: Mutex::new(map),
            blocks_filled: AtomicBool::new(false),
            netlink,
        })
    }

    /// The guard a previous broker left on interface `ifindex`, if its filters are there:
    /// its programs and maps, bindings included. None as well for the guard of an older
    /// broker (no `peers` map, another binding layout): the caller loads a new one, whose
    /// filters replace the old ones on each TAP it binds (see the module doc).
    pub async fn adopt(ifindex: u32) -> Result<Option<Guard>, GuardError> {
        let netlink = Netlink::connect().map_err(load_err)?;
        let ingress_id = filter_program(&netlink, ifindex, PARENT_INGRESS).await?;
        let egress_id = filter_program(&netlink, ifindex, PARENT_EGRESS).await?;
        let (Some(ingress_id), Some(egress_id)) = (ingress_id, egress_id) else {
            return Ok(None);
        };
        let adopt_err =
            |e: Box<dyn std::error::Error + Send + Sync>| GuardError::Adopt { ifindex, source: e };
        let mut ingress = None;
        let mut egress = None;
        let mut map_ids = None;
        for info in loaded_programs() {
            let info = info.map_err(|e| adopt_err(Box::new(e)))?;
            if info.id() == ingress_id {
                map_ids = info.map_ids().map_err(|e| adopt_err(Box::new(e)))?;
                ingress = Some(info.fd().map_err(|e| adopt_err(Box::new(e)))?);
            } else if info.id() == egress_id {
                egress = Some(info.fd().map_err(|e| adopt_err(Box::new(e)))?);
            }
        }
        let (Some(ingress), Some(egress), Some(map_ids)) = (ingress, egress, map_ids) else {
            return Err(adopt_err("the filters' programs or map are gone".into()));
        };
        // Told apart by their key and value sizes, which also tells an older broker's
        // guard (no `peers`, 24-byte bindings) from ours.
        let (mut bindings, mut peers) = (None, None);
        let mut bindings_id = None;
        for id in map_ids {
            let info = MapInfo::from_id(id).map_err(|e| adopt_err(Box::new(e)))?;
            // `remotes` has the key and value sizes of `peers`, but is an LRU map the
            // broker never reads nor writes.
            if !matches!(info.map_type(), Ok(aya::maps::MapType::Hash)) {
                continue;
            }
            let sizes = (info.key_size() as usize, info.value_size() as usize);
            let slot = if sizes == (size_of::<u32>(), size_of::<Binding>()) {
                bindings_id = Some(id);
                &mut bindings
            } else if sizes == (size_of::<PeerKey>(), size_of::<u32>()) {
                &mut peers
            } else {
                continue;
            };
            let fd = info.fd().map_err(|e| adopt_err(Box::new(e)))?;
            let owned = fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| adopt_err(Box::new(e)))?;
            *slot = Some(MapData::from_fd(owned).map_err(|e| adopt_err(Box::new(e)))?);
        }
        let (Some(bindings), Some(peers)) = (bindings, peers) else {
            tracing::info!(
                ifindex,
                "the TAP guard found is an older broker's: a new one replaces it on each TAP bound again"
            );
            return Ok(None);
        };
        // The object's `overlay_ingress`: the loaded program of that name using the same
        // `bindings` (none when the object predates the overlay fast path).
        let mut overlay = None;
        for info in loaded_programs() {
            let Ok(info) = info else { continue };
            if info.name() != OVERLAY.as_bytes()
                || !matches!(info.map_ids(), Ok(Some(ids)) if ids.iter().any(|i| Some(*i) == bindings_id))
            {
                continue;
            }
            overlay = Some(info.fd().map_err(|e| adopt_err(Box::new(e)))?);
            break;
        }
        let map = Maps {
            bindings: BpfHashMap::try_from(Map::HashMap(bindings))
                .map_err(|e| adopt_err(Box::new(e)))?,
            peers: BpfHashMap::try_from(Map::HashMap(peers)).map_err(|e| adopt_err(Box::new(e)))?,
        };
        Ok(Some(Guard {
            ingress,
            egress,
            ingress_id,
            egress_id,
            overlay,
            map: Mutex::new(map),
            blocks_filled: AtomicBool::new(false),
            netlink,
        }))
    }

    fn map(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic in a critical section (there is none on purpose) leaves at worst a
        // `peers` entry the program ignores (it checks the target's binding).
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether both of this guard's filters are on interface `ifindex`.
    pub async fn attached(&self, ifindex: u32) -> Result<bool, GuardError> {
        Ok(
            filter_program(&self.netlink, ifindex, PARENT_INGRESS).await? == Some(self.ingress_id)
                && filter_program(&self.netlink, ifindex, PARENT_EGRESS).await?
                    == Some(self.egress_id),
        )
    }

    /// Puts the guard on interface `ifindex`: a clsact qdisc whose ingress and egress are
    /// the guard's shared TC blocks ([`INGRESS_BLOCK`], [`EGRESS_BLOCK`]), whose filters
    /// hold the programs. Then the blocks' filters are made sure of: a block lives only
    /// as long as some qdisc uses it, so this TAP's may be a new, empty one (every other
    /// TAP gone), which would pass every frame; no frame can pass before this returns,
    /// since the TAP is not yet up nor on the bridge. A clsact already there (an adopted
    /// TAP, or one an older broker guarded with filters of its own) gets this guard's
    /// filters, replacing its old ones in place (atomically: no frame passes unchecked).
    /// Without a binding (see [`Guard::unbind`]), the interface sends and receives
    /// nothing.
    ///
    /// Why shared blocks: a clsact with blocks of its own registers each of them with the
    /// kernel's flow-offload code, which walks a list of every such block of the host
    /// (`flow_indr_dev_setup_offload`) under the RTNL lock, on each TAP's creation and
    /// deletion; with 10,000 TAPs that walk dominated the broker's profile. Shared blocks
    /// keep that list at two entries and take two requests (two filters) off each TAP
    /// made while the blocks live: the filters are added with `NLM_F_EXCL`, which the
    /// kernel refuses at once when they are there (docs/design.md, "The TAP guard").
    pub async fn attach(&self, ifindex: u32) -> Result<(), GuardError> {
        if self.add_clsact(ifindex, true).await? {
            return self.fill_blocks(ifindex).await;
        }
        match self.attach_programs(ifindex, &self.tap_programs()).await {
            // The clsact there uses the shared blocks (the kernel refuses filters through
            // the device then): the blocks' filters are replaced instead, for every TAP on
            // them, with this guard's programs.
            Err(GuardError::Netlink { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                self.blocks_filled.store(false, Ordering::Relaxed);
                self.fill_blocks(ifindex).await
            }
            other => other,
        }
    }

    fn tap_programs(&self) -> [(TcHandle, &ProgramFd, &'static str); 2] {
        [
            (PARENT_INGRESS, &self.ingress, INGRESS),
            (PARENT_EGRESS, &self.egress, EGRESS),
        ]
    }

    /// Makes sure the shared blocks hold this guard's filters. The first time in this
    /// process the filters are replaced (the blocks may hold a previous broker's, whose
    /// programs this one did not adopt); after that they are only added where missing
    /// (`NLM_F_EXCL`: "exists" is the common answer and costs the kernel a lookup).
    async fn fill_blocks(&self, ifindex: u32) -> Result<(), GuardError> {
        let replace = !self.blocks_filled.load(Ordering::Relaxed);
        for ((_, fd, name), block) in self.tap_programs().into_iter().zip(BLOCKS) {
            let mut msg = TcMessage::with_index(TcHeader::TCM_IFINDEX_MAGIC_BLOCK as i32);
            msg.header.parent = TcHandle::from(block);
            let mut req = filter_request(msg, fd, name);
            req.header.flags = NLM_F_REQUEST
                | NLM_F_ACK
                | NLM_F_CREATE
                | if replace { NLM_F_REPLACE } else { NLM_F_EXCL };
            match self.netlink.ack(req).await {
                Ok(()) => {}
                Err(e) if !replace && e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(GuardError::Netlink {
                        what: "fill the TAP guard's shared TC block",
                        ifindex,
                        source,
                    });
                }
            }
        }
        if replace {
            self.blocks_filled.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Puts `overlay_ingress` on TC ingress of a network's VXLAN port `ifindex` (replacing
    /// ours already there): the overlay fast path, in both directions, once the port is
    /// bound with [`Binding::overlay_port`]; until then, or without a binding, the
    /// program passes every frame to the bridge. False (nothing done) when this guard
    /// has no such program (adopted from a broker that predates it). The port's clsact
    /// has blocks of its own: one per network, and its program is not the TAPs'.
    pub async fn attach_overlay(&self, ifindex: u32) -> Result<bool, GuardError> {
        let Some(overlay) = &self.overlay else {
            return Ok(false);
        };
        self.add_clsact(ifindex, false).await?;
        self.attach_programs(ifindex, &[(PARENT_INGRESS, overlay, OVERLAY)])
            .await?;
        Ok(true)
    }

    /// Puts (or replaces) filters on the clsact of interface `ifindex` itself.
    async fn attach_programs(
        &self,
        ifindex: u32,
        programs: &[(TcHandle, &ProgramFd, &str)],
    ) -> Result<(), GuardError> {
        for &(parent, fd, name) in programs {
            let mut msg = TcMessage::with_index(ifindex as i32);
            msg.header.parent = parent;
            let mut req = filter_request(msg, fd, name);
            req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
            self.netlink
                .ack(req)
                .await
                .map_err(|source| GuardError::Netlink {
                    what: "attach the TAP guard",
                    ifindex,
                    source,
                })?;
        }
        Ok(())
    }

    /// Adds a clsact qdisc to interface `ifindex`, on the guard's shared blocks if
    /// `shared`. True if it made one; false if a clsact was there already (an adopted
    /// or reused interface).
    async fn add_clsact(&self, ifindex: u32, shared: bool) -> Result<bool, GuardError> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = CLSACT;
        msg.header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        msg.attributes.push(TcAttribute::Kind("clsact".into()));
        if shared {
            for (kind, block) in [TCA_INGRESS_BLOCK, TCA_EGRESS_BLOCK]
                .into_iter()
                .zip(BLOCKS)
            {
                msg.attributes.push(TcAttribute::Other(DefaultNla::new(
                    kind,
                    block.to_ne_bytes().to_vec(),
                )));
            }
        }
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        match self.netlink.ack(req).await {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(source) => Err(GuardError::Netlink {
                what: "add a clsact qdisc",
                ifindex,
                source,
            }),
        }
    }

    /// Binds interface `ifindex` (replacing its binding), and keeps `peers` in step: the
    /// binding first, then the entry of a MAC it no longer holds removed (only if it still
    /// names this interface), then its new entry. The program checks the target's binding
    /// before redirecting, so no order of these writes can send a frame to an interface
    /// whose binding does not hold that MAC on that bridge.
    pub fn bind(&self, ifindex: u32, binding: Binding) -> Result<(), GuardError> {
        let mut maps = self.map();
        let old = get_binding(&maps, ifindex)?;
        maps.bindings
            .insert(ifindex, binding, 0)
            .map_err(|source| GuardError::Map {
                what: "write",
                ifindex,
                source,
            })?;
        let new_key = binding.peer_key();
        if let Some(old_key) = old.and_then(|b| b.peer_key())
            && Some(old_key) != new_key
        {
            remove_peer(&mut maps, old_key, ifindex)?;
        }
        if let Some(key) = new_key {
            maps.peers
                .insert(key, ifindex, 0)
                .map_err(|source| GuardError::Map {
                    what: "write the fast-path entry of",
                    ifindex,
                    source,
                })?;
        }
        Ok(())
    }

    /// The binding of interface `ifindex`, if any.
    pub fn binding(&self, ifindex: u32) -> Result<Option<Binding>, GuardError> {
        get_binding(&self.map(), ifindex)
    }

    /// Every binding in the map, by interface index (tests, diagnostics).
    pub fn bindings(&self) -> Result<Vec<(u32, Binding)>, GuardError> {
        self.map()
            .bindings
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| GuardError::Map {
                what: "list",
                ifindex: 0,
                source,
            })
    }

    /// Every entry of the fast path's `peers`: (bridge ifindex, guest MAC) -> TAP ifindex
    /// (tests, diagnostics).
    pub fn peers(&self) -> Result<Vec<(PeerKey, u32)>, GuardError> {
        self.map()
            .peers
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| GuardError::Map {
                what: "list the fast-path entries of",
                ifindex: 0,
                source,
            })
    }

    /// Forgets the binding of interface `ifindex`: its frames drop from now on, and its
    /// MAC no longer leads the fast path to it.
    pub fn unbind(&self, ifindex: u32) -> Result<(), GuardError> {
        let mut maps = self.map();
        let old = get_binding(&maps, ifindex)?;
        let removed = maps.bindings.remove(&ifindex);
        if !absent(&removed) {
            removed.map_err(|source| GuardError::Map {
                what: "remove",
                ifindex,
                source,
            })?;
        }
        if let Some(key) = old.and_then(|b| b.peer_key()) {
            remove_peer(&mut maps, key, ifindex)?;
        }
        Ok(())
    }
}

/// Whether a map call failed only because the key was not there (aya passes the
/// kernel's ENOENT through, or says so itself).
fn absent<T>(result: &Result<T, aya::maps::MapError>) -> bool {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => true,
        Err(aya::maps::MapError::SyscallError(e)) => {
            e.io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

fn get_binding(maps: &Maps, ifindex: u32) -> Result<Option<Binding>, GuardError> {
    let got = maps.bindings.get(&ifindex, 0);
    if absent(&got) {
        return Ok(None);
    }
    got.map(Some).map_err(|source| GuardError::Map {
        what: "read",
        ifindex,
        source,
    })
}

/// Removes `peers` entry `key` if it still names interface `ifindex` (another TAP may
/// have been bound to the same MAC since).
fn remove_peer(maps: &mut Maps, key: PeerKey, ifindex: u32) -> Result<(), GuardError> {
    let err = |source| GuardError::Map {
        what: "remove the fast-path entry of",
        ifindex,
        source,
    };
    let got = maps.peers.get(&key, 0);
    if absent(&got) {
        return Ok(());
    }
    if got.map_err(err)? != ifindex {
        return Ok(());
    }
    let removed = maps.peers.remove(&key);
    if absent(&removed) {
        return Ok(());
    }
    removed.map_err(err)
}

/// A request for our filter (priority [`PRIORITY`], handle [`HANDLE`], every frame,
/// direct action) holding program `fd` named `name`, on the qdisc or block `msg` names;
/// the caller sets the flags.
fn filter_request(
    mut msg: TcMessage,
    fd: &ProgramFd,
    name: &str,
) -> NetlinkMessage<RouteNetlinkMessage> {
    msg.header.handle = TcHandle::from(HANDLE);
    msg.header.info = (u32::from(PRIORITY) << 16) | u32::from(ETH_P_ALL.to_be());
    msg.attributes.push(TcAttribute::Kind("bpf".into()));
    msg.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::ProgFd(fd.as_fd().as_raw_fd() as u32)),
        TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
        TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
    ]));
    NetlinkMessage::from(RouteNetlinkMessage::NewTrafficFilter(msg))
}

/// The id of the program of our filter on `parent` (ingress or egress) of `ifindex`.
async fn filter_program(
    netlink: &Netlink,
    ifindex: u32,
    parent: TcHandle,
) -> Result<Option<u32>, GuardError> {
    let mut get = netlink
        .handle()
        .clone()
        .traffic_filter(ifindex as i32)
        .get();
    get = if parent == PARENT_INGRESS {
        get.ingress()
    } else {
        get.egress()
    };
    let filters: Vec<TcMessage> = match get.execute().try_collect().await {
        Ok(f) => f,
        // No clsact qdisc (never guarded): no filter.
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(e.code.map(|c| -c.get()), Some(libc::EINVAL | libc::ENOENT)) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(GuardError::Netlink {
                what: "list the TC filters",
                ifindex,
                source: io::Error::other(e),
            });
        }
    };
    for f in filters {
        if f.header.info >> 16 != u32::from(PRIORITY) {
            continue;
        }
        for attr in &f.attributes {
            if let TcAttribute::Options(opts) = attr {
                for opt in opts {
                    if let TcOption::Bpf(TcFilterBpfOption::ProgId(id)) = opt {
                        return Ok(Some(*id));
                    }
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn binding_has_the_layout_of_the_c_struct() {
        // struct binding in bpf/tap_guard.c: the kernel copies bytes, so any drift
        // between the two would bind garbage.
        assert_eq!(size_of::<Binding>(), 32);
        assert_eq!(offset_of!(Binding, flags), 6);
        assert_eq!(offset_of!(Binding, ip4), 8);
        assert_eq!(offset_of!(Binding, gw4), 12);
        assert_eq!(offset_of!(Binding, prefix6), 16);
        assert_eq!(offset_of!(Binding, bridge), 24);
        assert_eq!(offset_of!(Binding, mtu), 28);
        assert_eq!(size_of::<PeerKey>(), 12);
        assert_eq!(offset_of!(PeerKey, mac), 4);
        let c = include_str!("../../../../bpf/tap_guard.c");
        assert!(c.contains("#define BIND_DHCP 1"), "BIND_DHCP differs");
        assert!(c.contains("#define BIND_FAST 2"), "BIND_FAST differs");
        assert!(c.contains("#define BIND_OVERLAY 4"), "BIND_OVERLAY differs");
        // A VXLAN port's binding: the bridge's MAC, never a `peers` entry.
        let port = Binding::overlay_port([2, 0x78, 0, 0, 0, 1], 7, 1450);
        assert_eq!(
            (port.mac, port.flags, port.bridge, port.mtu, port.ip4),
            ([2, 0x78, 0, 0, 0, 1], BIND_OVERLAY, 7, 1450, [0; 4])
        );
        assert_eq!(port.peer_key(), None);
        let b = Binding::new(
            [0x52, 0x54, 0, 0, 0, 1],
            true,
            Some(Ipv4Addr::new(10, 0, 0, 5)),
            Ipv4Addr::new(10, 0, 0, 1),
        );
        assert_eq!(
            (b.flags, b.ip4, b.gw4, b.prefix6),
            (BIND_DHCP, [10, 0, 0, 5], [10, 0, 0, 1], [0; 8])
        );
        let none = Binding::new(
            [0x52, 0x54, 0, 0, 0, 1],
            false,
            None,
            Ipv4Addr::new(10, 0, 0, 1),
        );
        assert_eq!((none.flags, none.ip4), (0, [0; 4]));
        assert_eq!(none.peer_key(), None, "no fast path unless asked");
        let fast = none.with_fast_path(7, 1500);
        assert_eq!((fast.flags, fast.bridge, fast.mtu), (BIND_FAST, 7, 1500));
        assert_eq!(
            fast.peer_key(),
            Some(PeerKey {
                bridge: 7,
                mac: [0x52, 0x54, 0, 0, 0, 1],
                _pad: [0; 2]
            })
        );
    }
}
