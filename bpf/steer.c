// SPDX-License-Identifier: Apache-2.0
//
// keyd's tc program: decides, for every packet a local pod sends, whether an EncryptionPolicy
// covers it, and then steers it into WireGuard or IPsec (by a mark that node-shim's routing rule
// or XFRM policies match), drops it (strict, and the tunnel to the peer is not ready), or lets
// it through. It is attached to the ingress of the devices pods send on (the host side of their
// veths, or their bridge), where it runs before routing, so the mark chooses the route and the
// XFRM policy.
//
// node-shim fills the maps from the rules keyd compiled (proto/src/rules.rs) and updates them in
// place; the program is never reloaded for a rule change. The layout of every map value is
// mirrored in node-shim/src/kernel/ebpf.rs: change both together. Pinning (a restart keeps the
// maps) is node-shim's choice, made when it loads the object.
//
// What counts as covered (see rules.rs): one address is selected by a policy and the other is a
// peer of it, in either direction, and the packet's protocol and source or destination port is
// one of the policy's ports (or the policy has none). Packets whose ports cannot be read (a
// non-first fragment, an IPv6 extension header) are treated as covered by every policy that
// covers the address pair: over-encrypting is safe, leaking a fragment of a covered flow is not.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define MAX_POLICIES 1024
#define WORDS (MAX_POLICIES / 64)
#define MAX_ENDPOINTS 262144
#define MAX_PORTS 65536
#define MAX_NODES 65536
// The counters slot of `all` mode, after the policies'.
#define ALL_SLOT MAX_POLICIES

#define NODE_MODE_OFF 0
#define NODE_MODE_ALL 1
#define NODE_MODE_POLICY 2

#define MODE_WIREGUARD 1
#define MODE_IPSEC 2

// nodes[] flags: the tunnel to that node is programmed for the mode.
#define READY_WIREGUARD 1
#define READY_IPSEC 2

// The node index of this node in endpoint values.
#define LOCAL_NODE 0

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define IPPROTO_SCTP_ 132

struct lpm_key {
	__u32 prefixlen;
	// IPv4 as ::ffff:a.b.c.d, so one trie holds both families.
	__u8 addr[16];
};

struct endpoint {
	__u32 node;
	__u32 reserved;
	__u64 selected[WORDS];
	__u64 peer[WORDS];
};

struct port_key {
	__u8 proto;
	__u8 pad;
	// Host byte order.
	__u16 port;
};

struct bits {
	__u64 w[WORDS];
};

struct policy {
	__u32 mode;
	__u32 reserved;
};

struct settings {
	__u32 node_mode;
	// `all` mode: the node's mechanism, and whether a packet to a peer whose tunnel is not
	// ready is dropped.
	__u32 all_mode;
	__u32 all_strict;
	__u32 mark_mask;
	__u32 mark_wireguard;
	__u32 mark_ipsec;
};

struct counters {
	__u64 encrypted_packets;
	__u64 encrypted_bytes;
	__u64 dropped_packets;
	__u64 dropped_bytes;
	__u64 clear_packets;
	__u64 clear_bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lpm_key);
	__type(value, struct endpoint);
	__uint(max_entries, MAX_ENDPOINTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} keyd_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct port_key);
	__type(value, struct bits);
	__uint(max_entries, MAX_PORTS);
} keyd_ports SEC(".maps");

// Policy sets: the policies without ports, the strict ones, and two constants node-shim writes
// at load (no policy, every policy).
#define SET_ANY_PORT 0
#define SET_STRICT 1
#define SET_NONE 2
#define SET_ALL 3
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct bits);
	__uint(max_entries, 4);
} keyd_policy_sets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct policy);
	__uint(max_entries, MAX_POLICIES);
} keyd_policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, MAX_NODES);
} keyd_nodes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct settings);
	__uint(max_entries, 1);
} keyd_settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counters);
	__uint(max_entries, MAX_POLICIES + 1);
} keyd_counters SEC(".maps");

// Who holds each slot, for node-shim alone (the programs never read them): the first 16 bytes
// of SHA-256 over the policy's or node's name, so that a restarted node-shim gives every name
// the slot it had and the maps stay consistent through its first update.
struct slot_id {
	__u8 hash[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct slot_id);
	__uint(max_entries, MAX_POLICIES);
} keyd_policy_ids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct slot_id);
	__uint(max_entries, MAX_NODES);
} keyd_node_ids SEC(".maps");

struct flow {
	struct lpm_key src;
	struct lpm_key dst;
	__u8 proto;
	// 0: the ports could not be read.
	__u8 have_ports;
	__u16 sport;
	__u16 dport;
};

static __always_inline void v4_key(struct lpm_key *k, __u32 addr)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->prefixlen = 128;
	k->addr[10] = 0xff;
	k->addr[11] = 0xff;
	__builtin_memcpy(&k->addr[12], &addr, 4);
}

// Reads the addresses, protocol and ports. Returns 0 for an IP packet, -1 otherwise.
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	void *l4;

	if ((void *)(eth + 1) > data_end)
		return -1;
	f->have_ports = 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return -1;
		v4_key(&f->src, ip->saddr);
		v4_key(&f->dst, ip->daddr);
		f->proto = ip->protocol;
		if (ip->frag_off & bpf_htons(IP_OFFSET))
			return 0;
		l4 = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		f->src.prefixlen = 128;
		f->dst.prefixlen = 128;
		__builtin_memcpy(f->src.addr, &ip6->saddr, 16);
		__builtin_memcpy(f->dst.addr, &ip6->daddr, 16);
		f->proto = ip6->nexthdr;
		l4 = ip6 + 1;
	} else {
		return -1;
	}
	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP && f->proto != IPPROTO_SCTP_)
		return 0;
	// TCP, UDP and SCTP all start with the source and destination ports.
	if (l4 + 4 > data_end)
		return 0;
	f->sport = bpf_ntohs(*(__u16 *)l4);
	f->dport = bpf_ntohs(*(__u16 *)(l4 + 2));
	f->have_ports = 1;
	return 0;
}

#define ENCRYPTED 0
#define DROPPED 1
#define CLEAR 2
// keyd_guard found a packet that keyd_steer had counted as encrypted leaving in the clear: it
// takes it back out of `encrypted` (and counts it as dropped or clear instead).
#define NOT_ENCRYPTED 3

static __always_inline void count(__u32 slot, int what, __u64 bytes)
{
	struct counters *c = bpf_map_lookup_elem(&keyd_counters, &slot);

	if (!c)
		return;
	if (what == ENCRYPTED) {
		c->encrypted_packets++;
		c->encrypted_bytes += bytes;
	} else if (what == DROPPED) {
		c->dropped_packets++;
		c->dropped_bytes += bytes;
	} else if (what == CLEAR) {
		c->clear_packets++;
		c->clear_bytes += bytes;
	} else {
		// Per-CPU: the guard may run on another CPU than the steering did, so this CPU's
		// value may wrap below zero. node-shim sums the CPUs with wrapping arithmetic, which
		// gives the right total.
		c->encrypted_packets--;
		c->encrypted_bytes -= bytes;
	}
}

static __always_inline __u32 ready_flag(__u32 mode)
{
	return mode == MODE_IPSEC ? READY_IPSEC : READY_WIREGUARD;
}

static __always_inline __u32 steer_mark(const struct settings *s, __u32 mode)
{
	return mode == MODE_IPSEC ? s->mark_ipsec : s->mark_wireguard;
}

static __always_inline int node_ready(__u32 node, __u32 mode)
{
	__u32 *flags = bpf_map_lookup_elem(&keyd_nodes, &node);

	return flags && (*flags & ready_flag(mode));
}

// Index of the lowest set bit of a non-zero word (no ctz instruction in BPF).
static __always_inline __u32 lowest_bit(__u64 w)
{
	__u32 n = 0;

	w &= -w;
	if (w & 0xffffffff00000000ULL)
		n += 32;
	if (w & 0xffff0000ffff0000ULL)
		n += 16;
	if (w & 0xff00ff00ff00ff00ULL)
		n += 8;
	if (w & 0xf0f0f0f0f0f0f0f0ULL)
		n += 4;
	if (w & 0xccccccccccccccccULL)
		n += 2;
	if (w & 0xaaaaaaaaaaaaaaaaULL)
		n += 1;
	return n;
}

static __always_inline int steer_all(struct __sk_buff *skb, const struct settings *s,
				     const struct endpoint *dst, int guard)
{
	if (guard) {
		// A pod-to-pod packet leaving on the underlay is in the clear. All mode marks
		// nothing (its routes and XFRM policies match every packet), so whether keyd_steer
		// counted it as encrypted is told by the readiness it went by: a packet to a ready
		// peer was counted. (Its routes cover every pod CIDR, so a Service address
		// translated after keyd_steer is encrypted too and never reaches this point.)
		int counted = node_ready(dst->node, s->all_mode);

		if (counted)
			count(ALL_SLOT, NOT_ENCRYPTED, skb->len);
		if (s->all_strict) {
			count(ALL_SLOT, DROPPED, skb->len);
			return TC_ACT_SHOT;
		}
		if (counted)
			count(ALL_SLOT, CLEAR, skb->len);
		return TC_ACT_UNSPEC;
	}
	if (node_ready(dst->node, s->all_mode)) {
		count(ALL_SLOT, ENCRYPTED, skb->len);
		return TC_ACT_UNSPEC;
	}
	if (s->all_strict) {
		count(ALL_SLOT, DROPPED, skb->len);
		return TC_ACT_SHOT;
	}
	count(ALL_SLOT, CLEAR, skb->len);
	return TC_ACT_UNSPEC;
}

static __always_inline int steer_policy(struct __sk_buff *skb, const struct settings *s,
					const struct flow *f, const struct endpoint *src,
					const struct endpoint *dst, int guard)
{
	__u32 any_idx = SET_ANY_PORT, strict_idx = SET_STRICT, none_idx = SET_NONE,
	      all_idx = SET_ALL;
	struct bits *any_port, *strict, *none, *by_sport = 0, *by_dport = 0;
	struct port_key pk = {};
	__u64 cov[WORDS], strict_hit = 0;
	__u32 first = MAX_POLICIES;
	int i;

	// Without ports (a fragment, an extension header) every port matches.
	any_port = bpf_map_lookup_elem(&keyd_policy_sets, f->have_ports ? &any_idx : &all_idx);
	strict = bpf_map_lookup_elem(&keyd_policy_sets, &strict_idx);
	none = bpf_map_lookup_elem(&keyd_policy_sets, &none_idx);
	if (!any_port || !strict || !none)
		return TC_ACT_UNSPEC;
	if (f->have_ports) {
		pk.proto = f->proto;
		pk.port = f->sport;
		by_sport = bpf_map_lookup_elem(&keyd_ports, &pk);
		pk.port = f->dport;
		by_dport = bpf_map_lookup_elem(&keyd_ports, &pk);
	}
	if (!by_sport)
		by_sport = none;
	if (!by_dport)
		by_dport = none;
	// Straight-line over the words (no branch per word, so the verifier walks it once).
#pragma unroll
	for (i = 0; i < WORDS; i++) {
		cov[i] = ((src->selected[i] & dst->peer[i]) | (src->peer[i] & dst->selected[i])) &
			 (any_port->w[i] | by_sport->w[i] | by_dport->w[i]);
		strict_hit |= cov[i] & strict->w[i];
	}
#pragma unroll
	for (i = 0; i < WORDS; i++) {
		if (cov[i]) {
			first = i * 64 + lowest_bit(cov[i]);
			break;
		}
	}
	if (first >= MAX_POLICIES)
		return TC_ACT_UNSPEC;

	struct policy *p = bpf_map_lookup_elem(&keyd_policies, &first);

	if (guard) {
		// Covered, and leaving the node in the clear (not steered: a Service address
		// translated after the steering hook, another program ahead of ours; or steered and
		// then not encrypted: the tunnel's route or XFRM policy went away after the packet
		// was marked): strict policies drop it here. A packet that carries the steering
		// mark was counted as encrypted by keyd_steer: it is moved to dropped or clear.
		int steered = p && (skb->mark & s->mark_mask) == (steer_mark(s, p->mode) & s->mark_mask);

		if (steered)
			count(first, NOT_ENCRYPTED, skb->len);
		if (strict_hit) {
			count(first, DROPPED, skb->len);
			return TC_ACT_SHOT;
		}
		if (steered)
			count(first, CLEAR, skb->len);
		return TC_ACT_UNSPEC;
	}
	if (!p)
		return TC_ACT_UNSPEC;
	if (node_ready(dst->node, p->mode)) {
		skb->mark = (skb->mark & ~s->mark_mask) | (steer_mark(s, p->mode) & s->mark_mask);
		count(first, ENCRYPTED, skb->len);
		return TC_ACT_UNSPEC;
	}
	if (strict_hit) {
		count(first, DROPPED, skb->len);
		return TC_ACT_SHOT;
	}
	count(first, CLEAR, skb->len);
	return TC_ACT_UNSPEC;
}

static __always_inline int decide(struct __sk_buff *skb, int guard)
{
	__u32 zero = 0;
	struct settings *s = bpf_map_lookup_elem(&keyd_settings, &zero);
	struct endpoint *src, *dst;
	struct flow f = {};

	if (!s || s->node_mode == NODE_MODE_OFF)
		return TC_ACT_UNSPEC;
	if (parse(skb, &f) < 0)
		return TC_ACT_UNSPEC;
	src = bpf_map_lookup_elem(&keyd_endpoints, &f.src);
	if (!src || src->node != LOCAL_NODE)
		return TC_ACT_UNSPEC;
	dst = bpf_map_lookup_elem(&keyd_endpoints, &f.dst);
	// Not a pod of another node, or a pod of this one: left alone.
	if (!dst || dst->node == LOCAL_NODE)
		return TC_ACT_UNSPEC;
	if (s->node_mode == NODE_MODE_ALL)
		return steer_all(skb, s, dst, guard);
	return steer_policy(skb, s, &f, src, dst, guard);
}

// Ingress of the devices local pods send on: steers covered packets (by the mark) before
// routing. Passing returns TC_ACT_UNSPEC, so that other programs and filters on the same hook
// (another agent's) still run.
SEC("classifier")
int keyd_steer(struct __sk_buff *skb)
{
	return decide(skb, 0);
}

// Egress of the underlay (the device holding the node's address), after routing, NAT and
// XFRM: an encrypted packet leaves with the nodes' addresses outside, so a packet still
// addressed pod to pod is in the clear. Covered by a strict policy (or, in all mode with
// strict, any such packet): dropped. This is the last line: it holds whatever went wrong
// before it.
SEC("classifier")
int keyd_guard(struct __sk_buff *skb)
{
	return decide(skb, 1);
}

// No GPL-only helper is used, so the project's own license will do.
char _license[] SEC("license") = "Apache-2.0";
