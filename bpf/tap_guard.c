// SPDX-License-Identifier: Apache-2.0
//
// The TAP guard: what a VM may send into a broker network, and what may leave towards it,
// checked per frame at TC (clsact, cls_bpf direct-action) of each of the network's TAPs.
// It replaces the nftables bridge-family chain of anti-spoofing networks: one map lookup
// and a handful of loads per frame, where the chain reloaded the interface name per rule
// and did four concatenated set lookups (docs/design.md, "The TAP guard").
//
// The broker (src/backend/linux/firewall/guard.rs) loads this once, attaches
// `tap_ingress` and `tap_egress` to every TAP of an anti-spoofing network before the TAP
// is up or on the bridge, and writes one `struct binding` per bound TAP into `bindings`,
// keyed by the TAP's ifindex (and, on networks whose guests may talk to each other, the
// TAP's guest MAC into `peers`, for the guest-to-guest fast path). A TAP without a
// binding sends and receives nothing: bound before its first frame can pass.
// On networks with a VXLAN overlay the broker also attaches `overlay_ingress` to the
// network's VXLAN port and binds the port (BIND_OVERLAY): the overlay fast path, which
// learns remote guests' MACs into `remotes`.
// The filters hold the program, and the program the maps, so all outlive the broker's
// fds: a broker killed with SIGKILL leaves its running VMs connected and protected, and
// the next one finds the maps through the filter (program id -> map ids) and goes on
// using them.
//
// Compiled by build.rs with `clang -target bpf` (Linux targets only). Only helpers that
// are not GPL-only are called, so the license below is the project's.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>

#define SEC(name) __attribute__((section(name), used))
#define INLINE static __attribute__((always_inline)) inline

// Helper calls by number (include/uapi/linux/bpf.h): no libbpf headers needed to build.
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) =
    (void *)BPF_FUNC_skb_load_bytes;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) =
    (void *)BPF_FUNC_map_update_elem;

// The legacy map definition (section "maps"), which aya reads without BTF.
struct bpf_map_def {
	__u32 type;
	__u32 key_size;
	__u32 value_size;
	__u32 max_entries;
	__u32 map_flags;
};

// What one TAP is bound to. The same layout as `Binding` in guard.rs.
struct binding {
	__u8 mac[6];      // the guest's MAC: the only Ethernet (and ARP sender) source allowed
	__u8 flags;       // BIND_*
	__u8 _pad;
	__u32 ip4;        // the DHCP lease (network order); 0 = none yet
	__u32 gw4;        // the network's gateway (network order): where DHCP client messages go
	__u8 prefix6[8];  // a /64 whose EUI-64 address of `mac` is allowed; all zero = none
	__u32 bridge;     // the ifindex of the network's bridge: scopes the fast path to it
	__u32 mtu;        // the network's MTU: longer frames are left to the bridge (BIND_FAST)
};

// The network runs the broker's DHCP: IPv4 and ARP sources must be the lease, and DHCP
// client messages must name the bound MAC as `chaddr`.
#define BIND_DHCP 1
// The guest-to-guest fast path: the network's guests may talk to each other (no
// `isolation`), so a checked unicast frame to another bound guest of the same bridge goes
// straight to that guest's TAP (see `fast_path`), and this TAP's MAC is in `peers`.
#define BIND_FAST 2
// The binding of a network's VXLAN port (keyed by the port's ifindex, never a TAP's):
// `mac` is the bridge's own (the gateway's), `bridge` and `mtu` as for BIND_FAST. Guests
// of other hosts take the overlay fast path through it (see `overlay_path` and
// `overlay_ingress`). No `peers` entry, no `tap_ingress`/`tap_egress` on it.
#define BIND_OVERLAY 4

struct bpf_map_def SEC("maps") bindings = {
	.type = BPF_MAP_TYPE_HASH,
	.key_size = sizeof(__u32),
	.value_size = sizeof(struct binding),
	.max_entries = 65536,
	.map_flags = 0,
};

// Which TAP holds guest MAC `mac` on bridge `bridge` (BIND_FAST bindings only): the
// broker writes it with the binding and removes it with the binding or its MAC.
struct peer_key {
	__u32 bridge;
	__u8 mac[6];
	__u16 _pad; // always 0: the key is hashed byte for byte
};

struct bpf_map_def SEC("maps") peers = {
	.type = BPF_MAP_TYPE_HASH,
	.key_size = sizeof(struct peer_key),
	.value_size = sizeof(__u32),
	.max_entries = 65536,
	.map_flags = 0,
};

// Which VXLAN port (value: its ifindex) guest MAC `mac` was last seen arriving through
// on bridge `bridge`: what the bridge's FDB would learn there, learnt by
// `overlay_ingress` (never a local guest's MAC, never the bridge's own). LRU: frames of
// the overlay can fill it, but never `peers` or `bindings`.
struct bpf_map_def SEC("maps") remotes = {
	.type = BPF_MAP_TYPE_LRU_HASH,
	.key_size = sizeof(struct peer_key),
	.value_size = sizeof(__u32),
	.max_entries = 16384,
	.map_flags = 0,
};

#define ETH_HLEN 14
// What the bridge lets past a port's MTU (is_skb_forwardable: MTU + header + a VLAN tag).
#define FORWARDABLE_EXTRA (ETH_HLEN + 4)
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8

#define IPPROTO_HOPOPTS 0
#define IPPROTO_ICMP 1
#define IPPROTO_UDP 17
#define IPPROTO_ROUTING 43
#define IPPROTO_FRAGMENT 44
#define IPPROTO_ICMPV6 58
#define IPPROTO_DSTOPTS 60

#define ICMP_REDIRECT 5
#define ND_ROUTER_ADVERT 134
#define ND_REDIRECT 137

// Extension headers walked before giving up (and dropping) on an IPv6 packet.
#define MAX_EXT_HEADERS 6

INLINE __u16 be16(__u16 v) { return __builtin_bswap16(v); }

INLINE int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

// A UDP port pair only a server (DHCP, DHCPv6 server or relay) sends from or to: a VM may
// never hand the others addresses, routers or name servers.
INLINE int server_ports(__u16 sport, __u16 dport)
{
	return sport == 67 || dport == 68 || sport == 547 || dport == 546;
}

// The anti-spoofing checks of a frame from the VM bound by `b`, whose Ethernet header
// is `eth`: TC_ACT_OK or TC_ACT_SHOT.
INLINE int check_ingress(struct __sk_buff *skb, struct binding *b, const __u8 *eth)
{
	if (!mac_eq(eth + 6, b->mac))
		return TC_ACT_SHOT;
	__u16 proto = ((__u16)eth[12] << 8) | eth[13];

	if (proto == ETH_P_8021Q || proto == ETH_P_8021AD)
		return TC_ACT_SHOT;

	if (proto == ETH_P_ARP) {
		// htype, ptype, hlen, plen, op, sender MAC, sender IPv4
		__u8 arp[14 + 4];
		if (bpf_skb_load_bytes(skb, ETH_HLEN, arp, sizeof(arp)) < 0)
			return TC_ACT_SHOT;
		if (!mac_eq(arp + 8, b->mac))
			return TC_ACT_SHOT;
		if (b->flags & BIND_DHCP) {
			__u32 spa;
			__builtin_memcpy(&spa, arp + 14, 4);
			// 0.0.0.0: an address probe (RFC 5227) before the lease.
			if (spa != 0 && (b->ip4 == 0 || spa != b->ip4))
				return TC_ACT_SHOT;
		}
		return TC_ACT_OK;
	}

	if (proto == ETH_P_IP) {
		__u8 ip[20];
		if (bpf_skb_load_bytes(skb, ETH_HLEN, ip, sizeof(ip)) < 0)
			return TC_ACT_SHOT;
		__u32 ihl = (ip[0] & 0x0f) * 4;
		if ((ip[0] >> 4) != 4 || ihl < 20)
			return TC_ACT_SHOT;
		__u32 saddr, daddr;
		__builtin_memcpy(&saddr, ip + 12, 4);
		__builtin_memcpy(&daddr, ip + 16, 4);
		// Only the first fragment has the transport header.
		int first = ((((__u16)ip[6] << 8) | ip[7]) & 0x1fff) == 0;
		__u32 l4 = ETH_HLEN + ihl;
		__u8 l4proto = ip[9];
		if (first && l4proto == IPPROTO_ICMP) {
			__u8 type;
			if (bpf_skb_load_bytes(skb, l4, &type, 1) < 0)
				return TC_ACT_SHOT;
			if (type == ICMP_REDIRECT)
				return TC_ACT_SHOT;
		}
		if (first && l4proto == IPPROTO_UDP) {
			__u16 ports[2];
			if (bpf_skb_load_bytes(skb, l4, ports, 4) < 0)
				return TC_ACT_SHOT;
			__u16 sport = be16(ports[0]), dport = be16(ports[1]);
			if (server_ports(sport, dport))
				return TC_ACT_SHOT;
			if ((b->flags & BIND_DHCP) && dport == 67) {
				// The server takes the client's identity from chaddr (offset 28
				// of the BOOTP message), not from the frame.
				__u8 chaddr[6];
				if (bpf_skb_load_bytes(skb, l4 + 8 + 28, chaddr, 6) < 0)
					return TC_ACT_SHOT;
				if (!mac_eq(chaddr, b->mac))
					return TC_ACT_SHOT;
				// A client has no address yet, or renews from its lease: to the
				// gateway's server or broadcast, any source passes.
				if (sport == 68 && (daddr == b->gw4 || daddr == 0xffffffff))
					return TC_ACT_OK;
			}
		}
		if ((b->flags & BIND_DHCP) && (b->ip4 == 0 || saddr != b->ip4))
			return TC_ACT_SHOT;
		return TC_ACT_OK;
	}

	if (proto == ETH_P_IPV6) {
		__u8 ip6[40];
		if (bpf_skb_load_bytes(skb, ETH_HLEN, ip6, sizeof(ip6)) < 0)
			return TC_ACT_SHOT;
		if ((ip6[0] >> 4) != 6)
			return TC_ACT_SHOT;
		const __u8 *src = ip6 + 8;
		__u8 next = ip6[6];
		int unspecified = 1;
#pragma unroll
		for (int i = 0; i < 16; i++)
			if (src[i])
				unspecified = 0;
		if (unspecified) {
			// `::` only for duplicate address detection (ICMPv6) and the MLD
			// reports that go with it (behind a hop-by-hop header).
			if (next != IPPROTO_ICMPV6 && next != IPPROTO_HOPOPTS)
				return TC_ACT_SHOT;
		} else if (src[0] == 0xfe && (src[1] & 0xc0) == 0x80) {
			// Link-local (fe80::/10), whatever its interface identifier:
			// guests may derive it as RFC 7217 or RFC 4941 say, not only EUI-64.
		} else {
			const __u8 *p = b->prefix6;
			if (!(p[0] | p[1] | p[2] | p[3] | p[4] | p[5] | p[6] | p[7]))
				return TC_ACT_SHOT;
#pragma unroll
			for (int i = 0; i < 8; i++)
				if (src[i] != p[i])
					return TC_ACT_SHOT;
			// The modified EUI-64 of the bound MAC.
			if (src[8] != (b->mac[0] ^ 0x02) || src[9] != b->mac[1] ||
			    src[10] != b->mac[2] || src[11] != 0xff || src[12] != 0xfe ||
			    src[13] != b->mac[3] || src[14] != b->mac[4] || src[15] != b->mac[5])
				return TC_ACT_SHOT;
		}
		// The transport header, past the extension headers.
		__u32 off = ETH_HLEN + 40;
		int first = 1;
#pragma unroll
		for (int i = 0; i < MAX_EXT_HEADERS; i++) {
			if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING ||
			    next == IPPROTO_DSTOPTS) {
				__u8 ext[2];
				if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
					return TC_ACT_SHOT;
				next = ext[0];
				off += ((__u32)ext[1] + 1) * 8;
			} else if (next == IPPROTO_FRAGMENT) {
				__u8 frag[4];
				if (bpf_skb_load_bytes(skb, off, frag, 4) < 0)
					return TC_ACT_SHOT;
				next = frag[0];
				if (((((__u16)frag[2] << 8) | frag[3]) & 0xfff8) != 0)
					first = 0;
				off += 8;
			}
		}
		if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
		    next == IPPROTO_FRAGMENT)
			return TC_ACT_SHOT; // more extension headers than anyone needs
		if (!first)
			return TC_ACT_OK;
		if (next == IPPROTO_ICMPV6) {
			__u8 type;
			if (bpf_skb_load_bytes(skb, off, &type, 1) < 0)
				return TC_ACT_SHOT;
			if (type == ND_ROUTER_ADVERT || type == ND_REDIRECT)
				return TC_ACT_SHOT;
		} else if (next == IPPROTO_UDP) {
			__u16 ports[2];
			if (bpf_skb_load_bytes(skb, off, ports, 4) < 0)
				return TC_ACT_SHOT;
			if (server_ports(be16(ports[0]), be16(ports[1])))
				return TC_ACT_SHOT;
		}
		return TC_ACT_OK;
	}
	// Other types (LLDP, ...) carry no addresses of their own: the MAC check is enough.
	return TC_ACT_OK;
}

// The overlay fast path, for a checked unicast frame to no guest of this host: a MAC
// last seen arriving through the network's VXLAN port (`remotes`) goes straight to that
// port's egress, where the kernel's VXLAN looks up its own forwarding database and
// encapsulates, as when the bridge forwards it there. Only if the port's binding still
// says BIND_OVERLAY on the sender's bridge, and never the bridge's own MAC.
INLINE int overlay_path(struct __sk_buff *skb, struct binding *b, struct peer_key *k)
{
	__u32 *port = bpf_map_lookup_elem(&remotes, k);
	if (!port)
		return TC_ACT_OK;
	__u32 to = *port;
	struct binding *o = bpf_map_lookup_elem(&bindings, &to);
	if (!o || !(o->flags & BIND_OVERLAY) || o->bridge != b->bridge || mac_eq(o->mac, k->mac))
		return TC_ACT_OK;
	if (!skb->gso_size && skb->len > o->mtu + FORWARDABLE_EXTRA)
		return TC_ACT_OK;
	return bpf_redirect(to, 0);
}

// The guest-to-guest fast path, for a frame that passed every check: unicast to a MAC
// bound (BIND_FAST) on another TAP of the sender's bridge goes straight to that TAP's
// egress, whose `tap_egress` still runs, instead of through the bridge (its FDB, and
// br_netfilter's conntrack and NAT hooks at bridge-nf-call-*=1): the same delivery the
// bridge would make, at a fraction of the cost. Anything else is the bridge's, as before:
// group addresses, the gateway, unknown and overlay MACs, isolated networks.
INLINE int fast_path(struct __sk_buff *skb, struct binding *b, const __u8 *eth)
{
	if (!(b->flags & BIND_FAST) || (eth[0] & 1))
		return TC_ACT_OK;
	struct peer_key k = {.bridge = b->bridge, ._pad = 0};
	__builtin_memcpy(k.mac, eth, 6);
	__u32 *target = bpf_map_lookup_elem(&peers, &k);
	if (!target)
		return overlay_path(skb, b, &k);
	__u32 to = *target;
	if (to == skb->ifindex)
		return TC_ACT_OK;
	// The target's own binding must still say it: bound to this MAC, on this bridge,
	// not isolated. A `peers` entry can then never send a frame to an interface that no
	// longer holds the MAC, whatever the order of the broker's map writes.
	struct binding *t = bpf_map_lookup_elem(&bindings, &to);
	if (!t || !(t->flags & BIND_FAST) || t->bridge != b->bridge || !mac_eq(t->mac, eth))
		return TC_ACT_OK;
	// The bridge drops a frame too long for the port it leaves by (GSO ones aside,
	// segmented on the way out): so must the fast path.
	if (!skb->gso_size && skb->len > t->mtu + FORWARDABLE_EXTRA)
		return TC_ACT_OK;
	return bpf_redirect(to, 0);
}

SEC("classifier/ingress")
int tap_ingress(struct __sk_buff *skb)
{
	__u32 key = skb->ifindex;
	struct binding *b = bpf_map_lookup_elem(&bindings, &key);
	if (!b)
		return TC_ACT_SHOT; // not bound (yet): nothing passes
	// The kernel strips one VLAN tag before TC ingress; a tagged frame would carry
	// packets past the checks below, which see untagged types only.
	if (skb->vlan_present)
		return TC_ACT_SHOT;

	__u8 eth[ETH_HLEN];
	if (bpf_skb_load_bytes(skb, 0, eth, ETH_HLEN) < 0)
		return TC_ACT_SHOT;
	// Protection first: only a frame every check let through may take the fast path.
	if (check_ingress(skb, b, eth) != TC_ACT_OK)
		return TC_ACT_SHOT;
	return fast_path(skb, b, eth);
}

// Frames leaving the bridge through the TAP, towards the VM. A client can give its TAP's
// host side a neighbour's guest MAC (SIOCSIFHWADDR on its fd); the bridge then takes that
// MAC for a local address of the client's port and sends the host's frames for the
// neighbour there. So unicast leaves a TAP only for the guest MAC bound to it (which also
// keeps unknown-unicast floods of other VMs' traffic off it); group addresses (the I/G
// bit) go to every bound port. A TAP without a binding receives nothing at all: the
// broker's pool keeps TAPs open, with their carrier up, until an acquire hands one out,
// and their queues must not fill with broadcasts no guest will ever read.
SEC("classifier/egress")
int tap_egress(struct __sk_buff *skb)
{
	__u32 key = skb->ifindex;
	struct binding *b = bpf_map_lookup_elem(&bindings, &key);
	if (!b)
		return TC_ACT_SHOT;
	__u8 dst[6];
	if (bpf_skb_load_bytes(skb, 0, dst, 6) < 0)
		return TC_ACT_SHOT;
	if (dst[0] & 1)
		return TC_ACT_OK;
	if (!mac_eq(dst, b->mac))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

// Frames arriving from other hosts, at TC ingress of a network's VXLAN port (after
// decapsulation and the VXLAN device's own learning, before the bridge). Learns where
// the sender is (`remotes`, for `overlay_path` of the local guests' replies) unless the
// source is a group address, the bridge's own MAC or a local guest's (a remote host
// cannot divert what this host's guests send to each other or to the gateway); then a
// unicast frame to a local guest goes straight to that guest's TAP, whose `tap_egress`
// still runs, as `fast_path` does. Everything else, and everything while the port has
// no BIND_OVERLAY binding, is the bridge's, as before: broadcast and multicast (DHCP,
// ARP), the gateway's MAC (the overlay chains of the bridge table still see all that
// reaches this host), unknown MACs. Frames from the overlay never had the TAP checks:
// the peers are trusted at layer 2 (docs/security.md).
SEC("classifier/overlay")
int overlay_ingress(struct __sk_buff *skb)
{
	__u32 key = skb->ifindex;
	struct binding *o = bpf_map_lookup_elem(&bindings, &key);
	if (!o || !(o->flags & BIND_OVERLAY) || skb->vlan_present)
		return TC_ACT_OK;
	__u8 eth[ETH_HLEN];
	if (bpf_skb_load_bytes(skb, 0, eth, ETH_HLEN) < 0)
		return TC_ACT_OK;
	struct peer_key k = {.bridge = o->bridge, ._pad = 0};
	if (!(eth[6] & 1) && !mac_eq(eth + 6, o->mac)) {
		__builtin_memcpy(k.mac, eth + 6, 6);
		// Known already: one lookup per frame. Else learnt, unless a local guest's.
		__u32 *seen = bpf_map_lookup_elem(&remotes, &k);
		if ((!seen || *seen != key) && !bpf_map_lookup_elem(&peers, &k))
			bpf_map_update_elem(&remotes, &k, &key, BPF_ANY);
	}
	if (eth[0] & 1)
		return TC_ACT_OK;
	__builtin_memcpy(k.mac, eth, 6);
	__u32 *target = bpf_map_lookup_elem(&peers, &k);
	if (!target)
		return TC_ACT_OK;
	__u32 to = *target;
	struct binding *t = bpf_map_lookup_elem(&bindings, &to);
	if (!t || !(t->flags & BIND_FAST) || t->bridge != o->bridge || !mac_eq(t->mac, eth))
		return TC_ACT_OK;
	if (!skb->gso_size && skb->len > t->mtu + FORWARDABLE_EXTRA)
		return TC_ACT_OK;
	return bpf_redirect(to, 0);
}

char _license[] SEC("license") = "Apache-2.0";
