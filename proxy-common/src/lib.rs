//! The contract between the kernel programs and userspace: map keys, map values, map names and
//! constants. Every type here is `#[repr(C)]` with explicit padding fields (no implicit padding,
//! enforced by `bytemuck::Pod`), because the kernel compares hash keys byte by byte.
//!
//! Layout (modelled on Cilium's `lb4_*` maps, with 32-bit ids so 100k+ services fit):
//! - `SVC4`: `{vip, port, proto, scope, slot}` -> `SvcValue`. Slot 0 is the frontend (backend
//!   count, reverse-NAT id, flags); slots `1..=count` each name one backend id. A frontend's count
//!   never exceeds the slots already written.
//! - `VIP4`: `{addr}` -> `Vip4`: every address that has a frontend. The pod program looks it up
//!   first, so a packet to no frontend address costs one 4-byte-key lookup, and a packet to a
//!   ClusterIP on a port the Service does not serve can be rejected (kube-proxy's nftables mode
//!   does). Written before the first frontend on its address and removed after the last one.
//! - `BACKEND4`: array indexed by backend id -> `{addr, port, proto, flags, generation}`. Id 0 means
//!   "none". `generation` grows every time an id is handed to a different backend and survives the
//!   backend's removal (a freed entry keeps its `generation` with `flags == 0`), so the pinned map itself
//!   remembers which ids were used: a restarted vipx neither reuses them at once nor lets a
//!   conntrack entry that names an old generation reach the new owner.
//! - `REVNAT4`: array indexed by reverse-NAT id -> the frontend `{vip, port}` restored on replies,
//!   with a `generation` kept the same way.
//! - `CT4`: LRU `{saddr, daddr, sport, dport, proto}` as seen on the wire -> what to do with it.
//!   A new flow writes two entries: the forward one (client -> frontend, looked up at the client's
//!   veth ingress after the frontend itself was found) naming the backend and its generation, and
//!   the reply one (backend -> client, looked up at the client's veth egress, after routing and
//!   netfilter) naming the reverse-NAT id and its generation. An entry whose ids or generations no
//!   longer match the maps is stale and never used.
//! - `FRAG4`: LRU `{saddr, daddr, ip id, proto}` -> the ports of the datagram, filled from the
//!   first fragment so later fragments of a translated datagram are translated too.
//! - `MAGLEV4`: a flat array of backend ids holding every Maglev lookup table. Entry 0 holds the
//!   table size M (a prime) so the kernel and a restarted vipx read the geometry from the map
//!   itself; table `t` (1-based) occupies `[1 + (t-1)*M, 1 + t*M)`. A frontend with
//!   `SVC_F_MAGLEV` names its table in slot 0's `backend_id` (0 = none: slot hashing). A table is
//!   written whole before slot 0 points at it and reused only after a quarantine, so the one
//!   hash update of slot 0 is the atomic swap (aya-ebpf 0.2.1 has no usable map-of-maps).
//! - `STATS`: per-CPU counters indexed by `Stat`.
//!
//! IPv6 gets parallel `*6` maps with 16-byte addresses later; ids are shared between families.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Map names as they appear in the object file and under the pin directory.
pub mod map_names {
    pub const SVC4: &str = "VIPX_SVC4";
    pub const VIP4: &str = "VIPX_VIP4";
    pub const BACKEND4: &str = "VIPX_BACKEND4";
    pub const REVNAT4: &str = "VIPX_REVNAT4";
    pub const CT4: &str = "VIPX_CT4";
    pub const FRAG4: &str = "VIPX_FRAG4";
    pub const AFFINITY4: &str = "VIPX_AFFINITY4";
    pub const MAGLEV4: &str = "VIPX_MAGLEV4";
    /// New flows per source in the current window (the flood guard; not pinned: a rate).
    pub const FLOOD4: &str = "VIPX_FLOOD4";
    /// Which backends belong to which frontend with session affinity (see `AffinityMatchKey4`).
    pub const AFFMATCH4: &str = "VIPX_AFFMATCH4";
    pub const STATS: &str = "VIPX_STATS";
    /// Socket-level LB: what a translated socket really connected to -> the frontend it dialled
    /// (pinned: a restart keeps `getpeername` and UDP sources right for sockets already open).
    pub const SOCKREV4: &str = "VIPX_SOCKREV4";
    /// Socket-level LB: the network namespaces (by cookie) whose sockets this vipx translates
    /// (not pinned: written before each build's programs are attached).
    pub const SOCKNS: &str = "VIPX_SOCKNS";
    /// External flows sent to a backend on another node: the address and port each side is
    /// translated to (see `SnatValue4`). Pinned with conntrack.
    pub const SNAT4: &str = "VIPX_SNAT4";
    /// `loadBalancerSourceRanges`: an LPM trie of {reverse-NAT id, source prefix} (pinned).
    pub const SRCRANGE4: &str = "VIPX_SRCRANGE4";
    /// Next hops the node program found without a neighbour entry (userspace asks the kernel to
    /// resolve them; not pinned).
    pub const NEIGHMISS4: &str = "VIPX_NEIGHMISS4";
    /// The ports frontends use, one bit each (pinned, and written whole at every start before
    /// the node program is attached; see `PORTS_WORDS`).
    pub const PORTS: &str = "VIPX_PORTS";
    /// The frontend address filter (pinned, written whole at every start; see `VIPBITS_WORDS`).
    pub const VIPBITS: &str = "VIPX_VIPBITS";
    /// The backend filter (pinned, bits only ever set; see `backend_bit`). `2`: the first
    /// layout (`VIPX_BACKBITS`, 2^20 bits) is left behind and its pin removed.
    pub const BACKBITS: &str = "VIPX_BACKBITS2";
    /// The first layout's pin, removed at load.
    pub const BACKBITS_V1: &str = "VIPX_BACKBITS";
    /// The flow cache's generations, one per slot (pinned, mmapable; see `flow_slot`). The
    /// slot function and the slot count are part of the pinned layout: a build that changes
    /// either must change the name, or old and new programs would bump different slots.
    pub const FLOWGEN: &str = "VIPX_FLOWGEN_V1";
    /// The name the generations were pinned under by one development build (973594f), removed
    /// at load so that `vipx cleanup` finds no file it does not know.
    pub const FLOWGEN_V0: &str = "VIPX_FLOWGEN";
    /// Settings userspace writes after load (not pinned: each program build gets its own).
    pub const CONFIG: &str = "VIPX_CONFIG";
    /// The floor program's single array (bench only).
    pub const FLOOR: &str = "VIPX_FLOOR";
}

/// Program names in the object file.
pub mod prog_names {
    /// TC ingress on the host side of a pod veth (packets leaving the pod): DNAT to a backend.
    pub const POD_INGRESS: &str = "vipx_pod_ingress";
    /// TC egress on the host side of a pod veth (packets entering the pod, after routing and
    /// netfilter): reverse-NAT replies, whatever backend sent them and whatever routed them.
    pub const POD_EGRESS: &str = "vipx_pod_egress";
    /// A trivial XDP program (one array lookup, XDP_PASS): the per-packet cost floor.
    pub const FLOOR: &str = "vipx_floor";
    /// The same trivial program at the TC hook (bench only).
    pub const FLOOR_TC: &str = "vipx_floor_tc";
    /// Run once (`BPF_PROG_TEST_RUN`) to read jiffies: never attached.
    pub const CLOCK: &str = "vipx_clock";
    /// cgroup `connect4`: a socket of a served network namespace connecting to a frontend is
    /// connected to a backend instead (TCP, and connected UDP).
    pub const SOCK_CONNECT4: &str = "vipx_sock_connect4";
    /// cgroup `sendmsg4`: the same for an unconnected UDP socket's datagram.
    pub const SOCK_SENDMSG4: &str = "vipx_sock_sendmsg4";
    /// cgroup `recvmsg4`: a UDP answer from a backend is reported from the frontend dialled.
    pub const SOCK_RECVMSG4: &str = "vipx_sock_recvmsg4";
    /// cgroup `getpeername4`: a translated socket's peer is the frontend dialled.
    pub const SOCK_GETPEERNAME4: &str = "vipx_sock_getpeername4";
    /// connect, recvmsg and getpeername for dual-stack (AF_INET6) sockets dialling IPv4 through
    /// v4-mapped addresses (`::ffff:a.b.c.d`), as Java and other runtimes do by default (their
    /// unconnected datagrams take the IPv4 path and its sendmsg4 hook).
    pub const SOCK_CONNECT6: &str = "vipx_sock_connect6";
    pub const SOCK_RECVMSG6: &str = "vipx_sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "vipx_sock_getpeername6";
    /// XDP on the node's external interfaces: node ports, LoadBalancer and external IPs for
    /// clients outside the cluster.
    pub const NODE_XDP: &str = "vipx_node_xdp";
    /// The same program at TC ingress, where native XDP cannot attach.
    pub const NODE_TC: &str = "vipx_node_tc";
}

/// Default map sizes; userspace overrides them from config before load.
pub mod defaults {
    /// Frontends plus one entry per backend slot.
    pub const SVC4_ENTRIES: u32 = 262_144;
    pub const BACKEND4_ENTRIES: u32 = 131_072;
    pub const REVNAT4_ENTRIES: u32 = 65_536;
    /// Two entries per flow.
    pub const CT4_ENTRIES: u32 = 524_288;
    /// Datagrams in flight as fragments (Cilium's default is 8192).
    pub const FRAG4_ENTRIES: u32 = 8_192;
    /// Client addresses remembered per Service port with `sessionAffinity: ClientIP`.
    pub const AFFINITY4_ENTRIES: u32 = 65_536;
    /// Maglev table size M (a prime, > 100 x the backends of a Service for the paper's balance
    /// of about 1%).
    pub const MAGLEV_TABLE_SIZE: u32 = 1_021;
    /// Maglev tables (each M backend ids): one per Maglev frontend, two while it changes. The
    /// kernel lays array elements out 8-byte aligned: 4096 x 1021 x 8 bytes = 32 MiB, allocated
    /// at load.
    pub const MAGLEV_TABLES: u32 = 4_096;
    /// The largest table size: a table position must fit `AffinityValue::slot` (u16).
    pub const MAGLEV_TABLE_SIZE_MAX: u32 = 65_521;
    /// Sources the flood guard counts at once (an LRU: the busiest stay).
    pub const FLOOD4_ENTRIES: u32 = 65_536;
    /// Translated sockets remembered for `getpeername`/`recvmsg` (an LRU, as Cilium's
    /// `lb4_reverse_sk`).
    pub const SOCKREV4_ENTRIES: u32 = 262_144;
    /// Network namespaces one vipx translates sockets of: its own and, with `--socket-lb all`,
    /// its pods' (kubelet's default is 110 pods a node; large nodes run a few hundred).
    pub const SOCKNS_ENTRIES: u32 = 1024;
    /// Next hops waiting for neighbour resolution.
    pub const NEIGHMISS4_ENTRIES: u32 = 256;
    /// `loadBalancerSourceRanges` entries, all Services together.
    pub const SRCRANGE4_ENTRIES: u32 = 16_384;
}

/// `VIPX_PORTS`: one bit per L4 port (TCP and UDP alike), set while any frontend or draining
/// reverse-NAT entry uses the port. The node program passes a packet to any other port
/// without a hash lookup: most of what reaches a node (its own connections, pod traffic routed
/// through it) is none of vipx's business.
pub const PORTS_WORDS: u32 = 65_536 / 64;

/// The word of `VIPX_PORTS` holding `port`'s bit, and the bit.
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1 << (port & 63))
}

/// `VIPX_VIPBITS`: a filter of the frontend addresses in `VIPX_VIP4`, one bit per hash of an
/// address (2^20 bits, 128 KiB: 100,000 addresses set under 10% of them). The pod program
/// passes a packet whose destination's bit is clear without the address map's hash lookup.
pub const VIPBITS_LOG2: u32 = 20;
pub const VIPBITS_WORDS: u32 = 1 << (VIPBITS_LOG2 - 6);

/// The word of `VIPX_VIPBITS` holding `addr`'s bit, and the bit. The address is hashed as the
/// programs read it, its wire bytes as a native `u32`: its halves folded together first (the
/// addresses of one /16 differ only in one half of that integer, which a multiply alone
/// spreads over 1/16 of the bits), then a multiplicative hash.
pub const fn addr_bit(addr: [u8; 4]) -> (u32, u64) {
    let x = u32::from_ne_bytes(addr);
    let h = (x ^ (x >> 16)).wrapping_mul(0x9e37_79b1) >> (32 - VIPBITS_LOG2);
    (h >> 6, 1 << (h & 63))
}

/// `VIPX_BACKBITS2`: one bit per hash of a backend's address and port, set before the backend
/// is written and never cleared while the map is pinned, so that every reply a conntrack entry
/// can still translate (a removed backend's flows live on) comes from a set bit. The pod
/// program's egress side passes a packet into a pod whose source bit is clear without the
/// conntrack lookup. Pod churn fills it slowly; a full filter only stops filtering. 2^23 bits
/// (1 MiB): a million backends (100,000 Services x 10) set ~11% of them, where the first
/// layout's 2^20 filled to ~63% and stopped filtering.
pub const BACKBITS_LOG2: u32 = 23;
pub const BACKBITS_WORDS: u32 = 1 << (BACKBITS_LOG2 - 6);

/// The word of `VIPX_BACKBITS2` holding a backend's bit, and the bit (hashed as `addr_bit`).
pub const fn backend_bit(addr: [u8; 4], port: [u8; 2]) -> (u32, u64) {
    let x = u32::from_ne_bytes(addr) ^ (u16::from_ne_bytes(port) as u32).wrapping_mul(0x85eb_ca6b);
    let h = (x ^ (x >> 16)).wrapping_mul(0x9e37_79b1) >> (32 - BACKBITS_LOG2);
    (h >> 6, 1 << (h & 63))
}

/// The pod programs' flow cache: per CPU, `FLOW_SLOTS` exact-match entries of established
/// translations in front of conntrack (its hash lookup, two calls and returns in the kernel, is
/// ~30 ns of an established packet here), as Open vSwitch's exact-match cache in front of its
/// classifier. An entry is a copy of a conntrack entry and is used only while
/// - its slot's generation in `VIPX_FLOWGEN_V1` is the one read before the copy was made: every
///   write or removal of a conntrack entry by the programs (a removal also when the entry was
///   gone: the LRU evicts without a bump) and every removal by userspace's collection bumps the
///   generation of the tuple's slot after it, so a copy does not outlive its entry's change.
///   (Userspace's other writes only add entries for tuples that have none, which no copy can
///   stand for; an LRU eviction leaves its copies for at most the rest of their tick.);
/// - it was made or used in this conntrack tick (`CtValue::seen` units): so the entry it copies
///   was touched this tick and its `seen` needs no write;
/// - the packet adds no conntrack state bit the copy lacks (a FIN, an RST);
///
/// and its frontend and backend are validated as a conntrack entry's are. Conntrack stays the
/// truth: the LRU sees the entry's use through the copy only once a tick.
///
/// 256 slots: a CPU needs copies of the flows it is in the middle of a burst of, and the
/// structures stay small enough to stay cached when nothing hits (packets of 100,000 flows in
/// turn over a 1M-entry table, `vipx-bench packet --pressure-conntrack`): with 4,096 slots
/// (32 KiB of generations, 192 KiB of copies per CPU) such a packet paid ~170 ns more than
/// without the cache, two more cold lines; with 256, ~60.
pub const FLOW_SLOTS_LOG2: u32 = 8;
pub const FLOW_SLOTS: u32 = 1 << FLOW_SLOTS_LOG2;

/// A conntrack key as two words, as the programs build it: the addresses, then the ports and
/// the protocol (padding zero), little-endian.
pub const fn ct_key_words(k: &CtKey4) -> (u64, u64) {
    let w0 = u32::from_ne_bytes(k.saddr) as u64 | (u32::from_ne_bytes(k.daddr) as u64) << 32;
    let w1 = u16::from_ne_bytes(k.sport) as u64
        | (u16::from_ne_bytes(k.dport) as u64) << 16
        | (k.proto as u64) << 32;
    (w0, w1)
}

/// The flow cache slot of a conntrack key's words (see `FLOW_SLOTS_LOG2`).
pub const fn flow_slot(w0: u64, w1: u64) -> u32 {
    ((w0 ^ w1.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FLOW_SLOTS_LOG2)) as u32
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Service lookup scope (Cilium's trick for services with two traffic policies: the internal
/// scope holds the internalTrafficPolicy-filtered backend list). Only `SCOPE_EXTERNAL` (also used
/// for a ClusterIP whose policies agree) is written today.
pub const SCOPE_EXTERNAL: u8 = 0;
pub const SCOPE_INTERNAL: u8 = 1;

/// Key of `SVC4`. Addresses and ports are in network byte order, exactly as on the wire.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SvcKey4 {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    /// 0 = the frontend entry; 1..=count = backend slots.
    pub slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub _pad: [u8; 2],
}

impl SvcKey4 {
    pub const fn new(addr: [u8; 4], port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self::from_wire(addr, port.to_be_bytes(), proto, scope, slot)
    }

    /// From fields as the packet carries them (port already in network byte order).
    pub const fn from_wire(addr: [u8; 4], port: [u8; 2], proto: u8, scope: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            slot,
            proto,
            scope,
            _pad: [0; 2],
        }
    }

    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// Key of `VIP4`: a frontend address, network byte order.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct VipKey4 {
    pub addr: [u8; 4],
}

/// Some frontend on this address is a ClusterIP: packets to its ports that no Service port
/// serves are rejected (ICMP port unreachable), as kube-proxy's nftables mode does.
pub const VIP_F_CLUSTER_IP: u32 = 1 << 0;
/// The hairpin address: packets to it are a pod's answers to itself through its own Service.
pub const VIP_F_HAIRPIN: u32 = 1 << 1;

/// Index of `CONFIG`: the address (network byte order, as a `u32` of its bytes) a pod's flow to
/// its own Service is SNATed to when it lands on the pod itself; 0 disables hairpin SNAT.
pub const CONFIG_HAIRPIN_ADDR: u32 = 0;
/// Index of `CONFIG`: how many new tracked flows one source address may start per `ct_seen` unit
/// (about 1.07 s); beyond it its new flows are dropped, so one source cannot churn everyone
/// else's entries out of the conntrack LRU. 0 disables the guard. With [`FLOOD_STRICT`] set
/// (the table close to full) a client's closed flows count too.
pub const CONFIG_FLOOD_LIMIT: u32 = 1;
/// In `CONFIG_FLOOD_LIMIT`: the table is close to full. Below it, the client's first FIN or RST
/// gives its flow back to the source's count (a closed flow's entries are the LRU's to take);
/// with it they no longer do, since those entries still hold the table until collected. The
/// limit itself is the other 31 bits.
pub const FLOOD_STRICT: u32 = 1 << 31;
/// Indexes of `CONFIG`: the programs' conntrack clock, `seen = (jiffies * MULT - BASE) >> 32`
/// (BASE a u64 in two halves), in `ct_seen` units of the coarse monotonic clock, whose ticks
/// jiffies count. Jiffies are read with one load (the verifier inlines `bpf_jiffies64`), where
/// a clock helper is a call on every tracked packet. MULT 0: not written yet, the programs read
/// the coarse clock instead.
pub const CONFIG_CLOCK_MULT: u32 = 2;
pub const CONFIG_CLOCK_BASE_LO: u32 = 3;
pub const CONFIG_CLOCK_BASE_HI: u32 = 4;
/// Indexes of `CONFIG`: where `vipx_clock` leaves jiffies (low and high halves) for userspace
/// to derive the base from.
pub const CONFIG_JIFFIES_LO: u32 = 5;
pub const CONFIG_JIFFIES_HI: u32 = 6;
/// Index of `CONFIG`: not 0 when the programs must not serve established flows from their
/// per-CPU copies of conntrack entries (see `FLOW_SLOTS_LOG2`). Userspace sets it everywhere
/// but x86: the programs' generation bump and read are ordered there (a locked add; loads are
/// not reordered with loads), not on weakly ordered CPUs, where a copy could pair a new
/// generation with an old entry.
pub const CONFIG_FLOW_CACHE_OFF: u32 = 7;
pub const CONFIG_LEN: u32 = 8;

/// How the TC programs learn how an skb carries its L4 checksum (the kernel's `ip_summed`,
/// which `__sk_buff` does not expose): two instructions the object carries as placeholders and
/// userspace patches before loading (see the userspace `loader::patch`), because the kfunc's
/// BTF id and the field's offset belong to the running kernel and aya has no kfunc relocation.
/// - a call of the kfunc `bpf_cast_to_kern_ctx(ctx)` (the verifier turns it into a register
///   move, so it costs nothing), giving the `struct sk_buff` itself;
/// - a one-byte load at the offset of the byte holding `ip_summed` (bits
///   `SKB_IP_SUMMED_SHIFT..+2`).
///
/// Where the kernel lacks either, the call becomes `r0 = SKB_CSUM_UNKNOWN` and the load a no-op,
/// and the programs fall back to the kernel's checksum helpers, which read `ip_summed` themselves
/// (two helper calls a packet: ~44 ns of the ~125 an established packet cost here).
pub mod skb_csum {
    /// The call's placeholder: `call` (0x85) with `src_reg` 2 (`BPF_PSEUDO_KFUNC_CALL`), the
    /// kfunc's BTF id in the upper half (this marker until patched).
    pub const CALL_MARK: u32 = 0x5650_5843;
    pub const CALL_INSN: u64 = (CALL_MARK as u64) << 32 | 0x2085;
    /// The load's placeholder: `r0 = *(u8 *)(r0 + OFF)` (0x71), `OFF` this marker until patched.
    pub const LOAD_MARK: u16 = 0x7e5a;
    pub const LOAD_INSN: u64 = (LOAD_MARK as u64) << 16 | 0x0071;
    /// What the pair yields where it could not be patched: no byte has this value.
    pub const UNKNOWN: u64 = 0x100;
    /// `r0 = UNKNOWN` (`mov64` of an immediate, 0xb7) and `r0 = r0` (`mov64` of a register,
    /// 0xbf), the pair's replacement where the kernel lacks the kfunc or the field.
    pub const CALL_FALLBACK: u64 = UNKNOWN << 32 | 0x00b7;
    pub const LOAD_FALLBACK: u64 = 0x00bf;
    /// Where `ip_summed` sits in its byte on the kernels the patch accepts (v5.x onward:
    /// `pkt_type:3, ignore_df:1, dst_pending_confirm:1, ip_summed:2`).
    pub const IP_SUMMED_SHIFT: u32 = 5;
    /// The kernel's `CHECKSUM_*` values.
    pub const CHECKSUM_NONE: u64 = 0;
    pub const CHECKSUM_UNNECESSARY: u64 = 1;
    pub const CHECKSUM_COMPLETE: u64 = 2;
    pub const CHECKSUM_PARTIAL: u64 = 3;
}

/// `CONFIG_CLOCK_MULT` for a kernel tick of `tick_ns` (the coarse clock's resolution): a jiffy
/// is `tick_ns` ns, and a `ct_seen` unit 2^30 ns, so `ns >> 30` is `4 ns >> 32`, with
/// `4 ns = jiffies * 4 tick_ns - BASE`. `None`: a tick no kernel has (not 1-10 ms, HZ 100-1000).
pub const fn clock_mult(tick_ns: u64) -> Option<u32> {
    if tick_ns < 1_000_000 || tick_ns > 10_000_000 {
        return None;
    }
    Some((tick_ns * 4) as u32)
}

/// `CtValue::seen` from jiffies, as the programs compute it.
pub const fn seen_of_jiffies(jiffies: u64, mult: u32, base: u64) -> u32 {
    (jiffies.wrapping_mul(mult as u64).wrapping_sub(base) >> 32) as u32
}

/// The `CONFIG_CLOCK_BASE` that makes [`seen_of_jiffies`] agree with `ct_seen(coarse_ns)` to a
/// tick, from `jiffies` and the coarse clock read together.
pub const fn clock_base(jiffies: u64, mult: u32, coarse_ns: u64) -> u64 {
    jiffies
        .wrapping_mul(mult as u64)
        .wrapping_sub(coarse_ns.wrapping_mul(4))
}

/// Value of `VIP4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Vip4 {
    pub flags: u32,
}

/// The frontend's service uses ClusterIP semantics.
pub const SVC_F_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_F_NODE_PORT: u16 = 1 << 1;
pub const SVC_F_EXTERNAL_IP: u16 = 1 << 2;
pub const SVC_F_LOAD_BALANCER: u16 = 1 << 3;
/// Traffic policy Local applies to this frontend's scope.
pub const SVC_F_LOCAL: u16 = 1 << 4;
/// sessionAffinity: ClientIP (timeout in `affinity_timeout_s`).
pub const SVC_F_AFFINITY: u16 = 1 << 5;
/// The Service port has no endpoints at all: new flows are rejected (ICMP port unreachable), as
/// kube-proxy does. Without it, a frontend with no usable backend (say, none local under a Local
/// traffic policy) drops them.
pub const SVC_F_REJECT: u16 = 1 << 6;
/// Clients outside the cluster use this frontend's external view (`externalTrafficPolicy:
/// Local`): the same key with `PROTO_EXTERNAL_VIEW` in its protocol, whose slots are this
/// node's endpoints only.
pub const SVC_F_EXTERNAL_VIEW: u16 = 1 << 8;
/// `loadBalancerSourceRanges`: only sources in `SRCRANGE4` under this frontend's reverse-NAT id
/// may reach it from outside.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 9;

/// Set in `SvcKey4::proto` of an external view (see `SVC_F_EXTERNAL_VIEW`): no packet carries
/// such a protocol, so only the node program, which asks for it, ever finds one.
pub const PROTO_EXTERNAL_VIEW: u8 = 0x80;

/// New flows choose their backend through the frontend's Maglev table (slot 0's `backend_id`
/// names it, 1-based); without a table (table space exhausted) they fall back to slot hashing.
pub const SVC_F_MAGLEV: u16 = 1 << 7;

/// Value of `SVC4`. In slot 0: `count`, `rev_nat_id`, `flags`, `affinity_timeout_s`, and in
/// `backend_id` the Maglev table number (1-based, 0 = none; see `MAGLEV4`); in slot n:
/// `backend_id`. The table number reuses slot 0's otherwise unused field rather than growing the
/// value, so maps pinned by an earlier build (which wrote 0 there: "no table") stay usable and
/// an upgrade keeps its connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcValue {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub count: u16,
    pub flags: u16,
    pub affinity_timeout_s: u32,
}

/// A backend entry that may be picked or used by established flows.
pub const BACKEND_F_ACTIVE: u8 = 1 << 0;
/// Terminating: established flows keep it, new flows only use it through fallback slots.
pub const BACKEND_F_TERMINATING: u8 = 1 << 1;
/// On this node (its endpoint's `nodeName`): an external flow to it is delivered here, not sent
/// on to another node.
pub const BACKEND_F_LOCAL: u8 = 1 << 2;

/// Value of `BACKEND4` (an array indexed by backend id; an entry without `BACKEND_F_ACTIVE` does
/// not exist, but keeps its `generation`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Backend4 {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub flags: u8,
    /// Generation of this id: 0 = never used; incremented (skipping 0) on every reuse.
    pub generation: u32,
}

impl Backend4 {
    pub const fn is_active(&self) -> bool {
        self.flags & BACKEND_F_ACTIVE != 0
    }
}

pub const REVNAT_F_ACTIVE: u16 = 1;
/// The frontend has `loadBalancerSourceRanges`: the node program checks every packet of its
/// established flows against them too (narrowed ranges end the flows outside them, as in
/// Cilium; kube-proxy checks new connections only).
pub const REVNAT_F_SOURCE_RANGES: u16 = 1 << 1;

/// Value of `REVNAT4` (array indexed by reverse-NAT id): the frontend a reply's source is
/// rewritten back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RevNat4 {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub flags: u16,
    /// Generation of this id, as `Backend4::generation`.
    pub generation: u32,
}

/// Key of `CT4`: the 5-tuple exactly as the packet carries it when it reaches the program.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    // Two fields, not `[u8; 3]`: an unaligned 3-byte array is zeroed through a `memset` call in
    // BPF (a subprogram call on every key built); these are plain stores.
    pub _pad: u8,
    pub _pad2: u16,
}

/// Forward entry: client -> frontend; DNAT to `backend_id`.
pub const CT_F_FORWARD: u32 = 1 << 0;
/// Reply entry: backend -> client; SNAT back to `REVNAT4[rev_nat_id]`.
pub const CT_F_REPLY: u32 = 1 << 1;
/// On a reply entry: a reply went through (a TCP flow is established, a UDP flow is a stream).
pub const CT_F_REPLIED: u32 = 1 << 2;
/// A TCP FIN went through in this entry's direction.
pub const CT_F_FIN: u32 = 1 << 3;
/// A TCP RST went through in this entry's direction.
pub const CT_F_RST: u32 = 1 << 4;
/// An external flow sent to a backend on another node: its source was translated too (to this
/// node's address and a port of [`SNAT_PORT_MIN`]..=[`SNAT_PORT_MAX`]); `SNAT4` holds, under the
/// same key, the other side's address and port.
pub const CT_F_SNAT: u32 = 1 << 6;
/// A forward entry the node program made (an external client's flow): the pod program never
/// follows it.
pub const CT_F_NODE: u32 = 1 << 7;
/// A forward entry the pod program made (a pod's flow): the node program never follows it, so a
/// packet from outside with a pod's tuple (routable pod addresses) is not taken for the pod's.
/// (Entries of builds before these two flags carry neither, and both programs follow them.)
pub const CT_F_POD: u32 = 1 << 8;

/// Source ports of external flows sent to backends on other nodes: above Linux's default
/// ephemeral range (32768-60999), so they do not collide with the node's own connections.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

/// Value of `SNAT4`. Under a forward key (client -> frontend): the source the packet leaves
/// with (this node's address, a SNAT port). Under a reply key (backend -> node, SNAT port): the
/// client the answer goes back to.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SnatValue4 {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// A hairpin flow (the client is its own backend): both entries also rewrite the client's
/// address to and from the hairpin address, and packets go straight back into the pod.
pub const CT_F_HAIRPIN: u32 = 1 << 5;
/// The state bits the data path sets on an existing entry.
pub const CT_F_STATE: u32 = CT_F_REPLIED | CT_F_FIN | CT_F_RST;

/// `CtValue::seen` counts in units of 2^30 ns (about 1.07 s) of `CLOCK_MONOTONIC_COARSE` (the
/// kernel's `bpf_ktime_get_coarse_ns`): one entry write per flow per unit, not per packet.
pub const CT_SEEN_SHIFT: u32 = 30;

/// `CtValue::seen` for a monotonic time in nanoseconds.
pub const fn ct_seen(ns: u64) -> u32 {
    (ns >> CT_SEEN_SHIFT) as u32
}

/// Value of `CT4`. Both entries of a flow carry the same ids and generations; the forward entry
/// is valid while the frontend's `rev_nat_id` and the backend's `generation` still match, the reply
/// entry while the reverse-NAT entry is active with the same `generation`. `seen` (see
/// [`ct_seen`]) and the state bits in `flags` are what userspace garbage collection reads: a flow
/// is removed when both of its entries have been idle longer than its state allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtValue {
    pub backend_id: u32,
    pub backend_gen: u32,
    pub rev_nat_id: u32,
    pub rev_nat_gen: u32,
    pub flags: u32,
    pub seen: u32,
}

/// Value of `FLOOD4` (key: the source address): new flows it started in `window` (a `ct_seen`
/// unit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FloodValue {
    /// 64 bits: the programs add to it atomically, and Rust's BPF target has only 64-bit
    /// atomics.
    pub count: u64,
    pub window: u32,
    pub _pad: u32,
}

/// Key of `FRAG4`: what identifies the fragments of one datagram (RFC 791).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub id: [u8; 2],
    pub proto: u8,
    /// Which hook recorded it (`FRAG_DIR_*`): a datagram between two pods of one node passes the
    /// sender's ingress and then the receiver's egress, fragment by fragment; each keeps its own
    /// record, so one removing it at the last fragment cannot starve the other.
    pub dir: u8,
}

/// Key of `AFFINITY4`: a client address and the frontend (by reverse-NAT id) it has affinity to.
/// Per frontend: the ClusterIP and an external IP of one Service port keep separate affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey4 {
    pub client: [u8; 4],
    pub rev_nat_id: u32,
}

/// Value of `AFFINITY4`: the backend the client's last new flow went to, the frontend's
/// reverse-NAT generation, and when (monotonic nanoseconds). Followed while the frontend is the
/// same one, the backend still belongs to it (`AFFMATCH4`) with the same generation, and the
/// entry is fresher than the timeout. Refreshed by every new flow that follows it. `slot` (the
/// slot, or the Maglev table position plus one, it was chosen at) is informational.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub backend_gen: u32,
    pub last_ns: u64,
    pub rev_nat_gen: u32,
    pub slot: u16,
    pub _pad: u16,
}

/// Key of `AFFMATCH4` (value: a `u32`, unused): `backend_id` is a backend of the frontend
/// `rev_nat_id` (which has session affinity). Written by userspace for every backend in the
/// frontend's slots, as Cilium's `lb4_affinity_match`: a client's affinity holds while its
/// backend belongs to the frontend, as kube-proxy's `recent` lists live as long as their
/// endpoint's chain, however the frontend's slots or Maglev table are rearranged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityMatchKey4 {
    pub rev_nat_id: u32,
    pub backend_id: u32,
}

/// `FragKey4::dir` of the ingress program (what a pod sends).
pub const FRAG_DIR_INGRESS: u8 = 0;
/// `FragKey4::dir` of the egress program (what a pod receives).
pub const FRAG_DIR_EGRESS: u8 = 1;

/// Value of `FRAG4`: the L4 ports of the datagram as its first fragment carried them.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragValue {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

/// Key of `SOCKREV4`: a socket (its cookie) and the backend it was connected or sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevKey4 {
    pub cookie: u64,
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Value of `SOCKREV4`: the address and port the socket dialled (as the process gave them), and
/// the frontend that translated it: used while that reverse-NAT id is active with the same
/// generation (the frontend still exists).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevValue4 {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    pub rev_nat_id: u32,
    pub rev_nat_gen: u32,
}

/// Index into the per-CPU `STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Packets the program saw.
    Packets = 0,
    /// Not IPv4 TCP/UDP, or a fragment: passed untouched.
    NotHandled,
    /// Truncated or malformed headers: passed untouched.
    Malformed,
    /// New flows to a frontend (backend chosen, two CT entries written).
    NewFlows,
    /// Forward packets of established flows (CT hit).
    CtForward,
    /// Replies reverse-NATed (CT hit).
    CtReply,
    /// Non-SYN TCP packets to a frontend with no CT entry: an undersized CT table shows here.
    CtMissNonSyn,
    /// New flows to a frontend that has no usable backend: dropped.
    NoBackend,
    /// CT insert failed (map full beyond LRU eviction).
    CtInsertFailed,
    /// Established flow whose backend disappeared: re-selected.
    BackendGone,
    /// A conntrack entry that no longer matches its frontend or backend (ids reused, a frontend
    /// re-created): ignored, the flow selects afresh.
    CtStale,
    /// A SYN that is not to a frontend removed a reply entry left on its tuple.
    ReplyCleared,
    /// Fragments of translated datagrams translated (both directions).
    FragTranslated,
    /// Non-first fragments whose first fragment was not seen: passed untouched.
    FragMiss,
    /// ICMP errors about a translated flow translated (outer and inner headers).
    IcmpTranslated,
    /// Packets the egress program (into a pod) saw.
    EgressPackets,
    /// New flows whose hash chose the client itself (hairpin) and took the next backend.
    HairpinAvoided,
    /// New flows to a frontend without usable endpoints answered with ICMP port unreachable.
    Rejected,
    /// New flows sent to the backend their client has affinity to (`sessionAffinity: ClientIP`).
    AffinityHit,
    /// Packets to a ClusterIP on a port no Service port serves: rejected (TCP SYN, UDP) or
    /// dropped.
    UnservedPort,
    /// Conntrack entries created (a tuple that had none). With the removals and the table's
    /// occupancy, userspace derives how many entries the LRU evicted.
    CtCreated,
    /// Conntrack entries the programs removed (stale, or a tuple reused for a direct connection).
    CtRemoved,
    /// A TCP FIN or RST with no conntrack entry: translated without creating one.
    CtUntracked,
    /// Packets of hairpin flows (a pod landing on itself through its Service) SNATed to the
    /// hairpin address and back, both directions.
    Hairpin,
    /// New flows of a Maglev frontend that has no table (table space exhausted) or whose table
    /// entry named no live backend: chosen by slot hashing instead.
    MaglevFallback,
    /// New flows dropped by the flood guard: their source started more than
    /// `--conntrack-max-new-per-source` flows in the current second.
    FloodDropped,
    /// Sockets of the node connected (or UDP datagrams sent) to a backend instead of the
    /// frontend they dialled (socket-level LB).
    SockTranslated,
    /// Socket-level LB: a connect or send to a frontend without usable backends, refused
    /// (`ECONNREFUSED`).
    SockRefused,
    /// Socket-level LB: `getpeername` or a UDP `recvmsg` reported the frontend instead of the
    /// backend.
    SockReversed,
    /// Packets the node program (XDP on the node's interfaces) saw.
    NodePackets,
    /// External flows started to a backend on this node (DNAT, passed to the stack).
    NodeNewLocal,
    /// External flows started to a backend on another node (DNAT + SNAT, sent back out).
    NodeNewRemote,
    /// Packets of established external flows translated (both directions).
    NodeTranslated,
    /// External packets dropped because the next hop had no neighbour entry yet (resolution is
    /// asked for; the client's retransmission gets through).
    NodeNoNeigh,
    /// External flows dropped: no free SNAT port towards their backend.
    NodeNoPort,
    /// External packets from outside a LoadBalancer frontend's `loadBalancerSourceRanges`,
    /// dropped.
    SourceRangeDropped,
    /// External packets dropped: the kernel's FIB gave no way to their backend or client that
    /// XDP can take (no route, or through a tunnel or lightweight-tunnel route).
    NodeFibFailed,
    /// External packets the node program would forward with a TTL of 1 or 0, dropped as a router
    /// drops them (no ICMP "time exceeded" is sent).
    NodeTtlExceeded,
    /// Packets of established flows (pod programs, both directions) served from this CPU's copy
    /// of their conntrack entry, without a conntrack lookup (also counted as `CtForward` or
    /// `CtReply`).
    FlowCacheHit,
}

pub const STATS_LEN: u32 = 64;

impl Stat {
    pub const ALL: [Stat; 39] = [
        Stat::Packets,
        Stat::NotHandled,
        Stat::Malformed,
        Stat::NewFlows,
        Stat::CtForward,
        Stat::CtReply,
        Stat::CtMissNonSyn,
        Stat::NoBackend,
        Stat::CtInsertFailed,
        Stat::BackendGone,
        Stat::CtStale,
        Stat::ReplyCleared,
        Stat::FragTranslated,
        Stat::FragMiss,
        Stat::IcmpTranslated,
        Stat::EgressPackets,
        Stat::HairpinAvoided,
        Stat::Rejected,
        Stat::AffinityHit,
        Stat::UnservedPort,
        Stat::CtCreated,
        Stat::CtRemoved,
        Stat::CtUntracked,
        Stat::Hairpin,
        Stat::MaglevFallback,
        Stat::FloodDropped,
        Stat::SockTranslated,
        Stat::SockRefused,
        Stat::SockReversed,
        Stat::NodePackets,
        Stat::NodeNewLocal,
        Stat::NodeNewRemote,
        Stat::NodeTranslated,
        Stat::NodeNoNeigh,
        Stat::NodeNoPort,
        Stat::SourceRangeDropped,
        Stat::NodeFibFailed,
        Stat::NodeTtlExceeded,
        Stat::FlowCacheHit,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Packets => "packets",
            Stat::NotHandled => "not_handled",
            Stat::Malformed => "malformed",
            Stat::NewFlows => "new_flows",
            Stat::CtForward => "ct_forward",
            Stat::CtReply => "ct_reply",
            Stat::CtMissNonSyn => "ct_miss_non_syn",
            Stat::NoBackend => "no_backend",
            Stat::CtInsertFailed => "ct_insert_failed",
            Stat::BackendGone => "backend_gone",
            Stat::CtStale => "ct_stale",
            Stat::ReplyCleared => "reply_cleared",
            Stat::FragTranslated => "frag_translated",
            Stat::FragMiss => "frag_miss",
            Stat::IcmpTranslated => "icmp_translated",
            Stat::EgressPackets => "egress_packets",
            Stat::HairpinAvoided => "hairpin_avoided",
            Stat::Rejected => "rejected",
            Stat::AffinityHit => "affinity_hit",
            Stat::UnservedPort => "unserved_port",
            Stat::CtCreated => "ct_created",
            Stat::CtRemoved => "ct_removed",
            Stat::CtUntracked => "ct_untracked",
            Stat::Hairpin => "hairpin",
            Stat::MaglevFallback => "maglev_fallback",
            Stat::FloodDropped => "flood_dropped",
            Stat::SockTranslated => "sock_translated",
            Stat::SockRefused => "sock_refused",
            Stat::SockReversed => "sock_reversed",
            Stat::NodePackets => "node_packets",
            Stat::NodeNewLocal => "node_new_local",
            Stat::NodeNewRemote => "node_new_remote",
            Stat::NodeTranslated => "node_translated",
            Stat::NodeNoNeigh => "node_no_neigh",
            Stat::NodeNoPort => "node_no_port",
            Stat::SourceRangeDropped => "source_range_dropped",
            Stat::NodeFibFailed => "node_fib_failed",
            Stat::NodeTtlExceeded => "node_ttl_exceeded",
            Stat::FlowCacheHit => "flow_cache_hit",
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<SvcKey4>() == 12);
    assert!(core::mem::size_of::<SvcValue>() == 16);
    assert!(core::mem::size_of::<VipKey4>() == 4);
    assert!(core::mem::size_of::<Vip4>() == 4);
    assert!(core::mem::size_of::<Backend4>() == 12);
    assert!(core::mem::size_of::<RevNat4>() == 12);
    assert!(core::mem::size_of::<CtKey4>() == 16);
    assert!(core::mem::size_of::<CtValue>() == 24);
    assert!(core::mem::size_of::<FloodValue>() == 16);
    // The programs OR state bits into `flags` through the 8-byte word it starts (see
    // `ct_or_flags`): it must be the low half of an 8-byte-aligned word.
    assert!(core::mem::offset_of!(CtValue, flags) == 16);
    assert!(core::mem::offset_of!(CtValue, seen) == 20);
    assert!(core::mem::size_of::<FragKey4>() == 12);
    assert!(core::mem::size_of::<FragValue>() == 4);
    assert!(core::mem::size_of::<AffinityKey4>() == 8);
    assert!(core::mem::size_of::<AffinityValue>() == 24);
    assert!(core::mem::size_of::<AffinityMatchKey4>() == 8);
    assert!(core::mem::size_of::<SockRevKey4>() == 16);
    assert!(core::mem::size_of::<SockRevValue4>() == 16);
    assert!(core::mem::size_of::<SnatValue4>() == 8);
    assert!((Stat::ALL.len() as u32) <= STATS_LEN);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: every type is `Pod` (checked by bytemuck's derive: no padding, any bit pattern valid).
    unsafe impl aya::Pod for SvcKey4 {}
    unsafe impl aya::Pod for SvcValue {}
    unsafe impl aya::Pod for VipKey4 {}
    unsafe impl aya::Pod for Vip4 {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for RevNat4 {}
    unsafe impl aya::Pod for CtKey4 {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey4 {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for FloodValue {}
    unsafe impl aya::Pod for AffinityMatchKey4 {}
    unsafe impl aya::Pod for AffinityKey4 {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockRevKey4 {}
    unsafe impl aya::Pod for SockRevValue4 {}
    unsafe impl aya::Pod for SnatValue4 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svc_key_is_network_order_and_zero_padded() {
        let k = SvcKey4::new([198, 19, 0, 10], 80, IPPROTO_TCP, SCOPE_EXTERNAL, 0);
        assert_eq!(
            bytemuck::bytes_of(&k),
            &[198, 19, 0, 10, 0, 80, 0, 0, 6, 0, 0, 0]
        );
        let s = k.with_slot(2);
        assert_eq!(&bytemuck::bytes_of(&s)[6..8], &2u16.to_ne_bytes());
    }

    #[test]
    fn ct_key_bytes() {
        let k = CtKey4 {
            saddr: [198, 18, 64, 2],
            daddr: [198, 19, 0, 10],
            sport: 40000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: IPPROTO_UDP,
            _pad: 0,
            _pad2: 0,
        };
        assert_eq!(
            bytemuck::bytes_of(&k),
            &[
                198, 18, 64, 2, 198, 19, 0, 10, 0x9c, 0x40, 0, 80, 17, 0, 0, 0
            ]
        );
    }

    /// The programs' jiffies clock agrees with `ct_seen` of the coarse clock exactly, whatever
    /// the tick, from jiffies' start value (300 s before wrapping 32 bits) on.
    #[test]
    fn the_jiffies_clock_agrees_with_the_coarse_clock() {
        for hz in [100u64, 250, 300, 1000] {
            let tick = (1_000_000_000 + hz / 2) / hz;
            let mult = clock_mult(tick).unwrap();
            let j0 = (u64::from(u32::MAX) + 1) - 300 * hz + 12_345;
            let coarse0 = 987_654_321_000;
            let base = clock_base(j0, mult, coarse0);
            for n in [0u64, 1, 2, hz, 7 * hz + 3, 86_400 * hz, 400 * 86_400 * hz] {
                assert_eq!(
                    seen_of_jiffies(j0 + n, mult, base),
                    ct_seen(coarse0 + n * tick),
                    "HZ {hz}, {n} jiffies on"
                );
            }
        }
        assert_eq!(clock_mult(1_000), None);
    }

    /// The address filter spreads a /16 (a Service CIDR, a pod network) over its bits: 10,000
    /// addresses of one /16 take about as many distinct bits as random ones would.
    #[test]
    fn the_address_filter_spreads_one_slash_16() {
        let mut words = [0u64; VIPBITS_WORDS as usize];
        for i in 0..10_000u32 {
            let (w, bit) = addr_bit([10, 96, (i >> 8) as u8, i as u8]);
            words[w as usize] |= bit;
        }
        let distinct: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert!(distinct > 9_900, "{distinct} distinct bits");
    }
}
