//! vipx kernel programs. The entry points stay thin and each reads top to bottom:
//! - `vipx_pod_ingress` (packets leaving a pod): parse -> frontend lookup -> conntrack (validated
//!   against the frontend and the backend's generation) or backend choice -> DNAT -> next.
//! - `vipx_pod_egress` (packets entering a pod, after routing and netfilter): parse -> reply
//!   conntrack entry -> reverse NAT (also of fragments and of ICMP errors quoting the flow) -> next.
//!
//! Reverse NAT sits on the way into the client rather than where the reply enters the node, so it
//! works whatever the backend is (a local pod, a pod on another node, the host network) and the
//! host stack in between sees one consistent flow `client -> backend` and back: strict rp_filter
//! passes the reply (its source is the backend it came from) and netfilter conntrack never sees a
//! reply from the VIP, which kube-proxy's and Calico's `ct state invalid` rules would drop.
#![no_std]
#![no_main]
// Rust's BPF target has atomic loads and stores but no read-modify-write methods (it claims no
// compare-and-swap); the kernel has BPF_ATOMIC OR and ADD, which these intrinsics lower to.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics, for BPF_ATOMIC (see above)"
)]
// Inline assembly for the two placeholder instructions that read the skb's `ip_summed` (see
// `ip_summed`).
#![feature(asm_experimental_arch)]

use core::{
    intrinsics::{AtomicOrdering, atomic_or, atomic_xadd},
    ptr::addr_of_mut,
};

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_MMAPABLE, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK,
        TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    AffinityKey4, AffinityMatchKey4, AffinityValue, BACKBITS_WORDS, Backend4, CONFIG_CLOCK_BASE_HI,
    CONFIG_CLOCK_BASE_LO, CONFIG_CLOCK_MULT, CONFIG_FLOOD_LIMIT, CONFIG_FLOW_CACHE_OFF,
    CONFIG_HAIRPIN_ADDR, CONFIG_JIFFIES_HI, CONFIG_JIFFIES_LO, CONFIG_LEN, CT_F_FIN, CT_F_FORWARD,
    CT_F_HAIRPIN, CT_F_NODE, CT_F_POD, CT_F_REPLIED, CT_F_REPLY, CT_F_RST, CtKey4, CtValue,
    FLOOD_STRICT, FLOW_SLOTS, FRAG_DIR_EGRESS, FRAG_DIR_INGRESS, FloodValue, FragKey4, FragValue,
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, REVNAT_F_ACTIVE, RevNat4, SCOPE_EXTERNAL, STATS_LEN,
    SVC_F_AFFINITY, SVC_F_MAGLEV, SVC_F_REJECT, Stat, SvcKey4, SvcValue, VIP_F_CLUSTER_IP,
    VIP_F_HAIRPIN, VIPBITS_WORDS, Vip4, VipKey4, addr_bit, backend_bit, ct_key_words, ct_seen,
    defaults, flow_slot, seen_of_jiffies, skb_csum,
};
use vipx_ebpf::{
    ETH_HLEN, ETH_P_IP, ICMP_CSUM_OFF, ICMP_DEST_UNREACH, ICMP_HLEN, ICMP_PORT_UNREACH,
    ICMP_QUOTED_L4, IP_CSUM_OFF, IP_DADDR_OFF, IP_PROTO_OFF, IP_SADDR_OFF, IPV4_MIN_HLEN,
    L4_DPORT_OFF, L4_SPORT_OFF, TCP_CSUM_OFF, TCP_FLAGS_OFF, TCP_MIN_HLEN, UDP_CSUM_OFF, UDP_HLEN,
    csum_replace2, csum_replace4, ct_state_of_tcp, flow_hash, ipv4_header_len, is_fragment,
    is_icmp_error, is_later_fragment, is_tcp_close, is_tcp_syn, l4_csum_after_nat, maglev_entry,
    maglev_index, next_slot, pick_slot,
};

// Sizes here are defaults; userspace sets the real ones with `EbpfLoader::set_max_entries`.
// Pinned by name so a restarted vipx finds its services and, above all, its flows.
mod node;
mod sock;

#[map(name = "VIPX_SVC4")]
static SVC4: HashMap<SvcKey4, SvcValue> = HashMap::pinned(defaults::SVC4_ENTRIES, 0);

// Sized like REVNAT4 by userspace: there are never more frontend addresses than frontends.
#[map(name = "VIPX_VIP4")]
static VIP4: HashMap<VipKey4, Vip4> = HashMap::pinned(defaults::REVNAT4_ENTRIES, 0);

#[map(name = "VIPX_BACKEND4")]
static BACKEND4: Array<Backend4> = Array::pinned(defaults::BACKEND4_ENTRIES, 0);

#[map(name = "VIPX_REVNAT4")]
static REVNAT4: Array<RevNat4> = Array::pinned(defaults::REVNAT4_ENTRIES, 0);

#[map(name = "VIPX_CT4")]
// A common LRU: BPF_F_NO_COMMON_LRU (per-CPU lists) measured slower for new flows here
// (660 vs 460 ns/SYN), its smaller per-CPU free lists evicting more often.
static CT4: LruHashMap<CtKey4, CtValue> = LruHashMap::pinned(defaults::CT4_ENTRIES, 0);

// Pinned: a client's affinity outlives a vipx restart, as the Service does.
#[map(name = "VIPX_AFFINITY4")]
static AFFINITY4: LruHashMap<AffinityKey4, AffinityValue> =
    LruHashMap::pinned(defaults::AFFINITY4_ENTRIES, 0);

// Pinned: a restarted vipx keeps the tables its frontends point at. Entry 0 holds the table size;
// userspace sizes it to 1 + size x tables. Mmapable: userspace writes a table with plain stores
// instead of a syscall per entry (a batch update costs ~0.4 ms per 1021-entry table).
#[map(name = "VIPX_MAGLEV4")]
static MAGLEV4: Array<u32> = Array::pinned(
    1 + defaults::MAGLEV_TABLE_SIZE * defaults::MAGLEV_TABLES,
    BPF_F_MMAPABLE,
);

/// The flow cache (see `proxy_common::FLOW_SLOTS_LOG2`): per CPU, not pinned (each build of the
/// programs fills its own).
#[map(name = "VIPX_FLOWCACHE")]
static FLOWCACHE: PerCpuArray<FlowCopy> = PerCpuArray::with_max_entries(FLOW_SLOTS, 0);

/// The flow cache's generations: pinned, so userspace and every build of the programs bump the
/// same ones, and mmapable, so userspace bumps them without a syscall each.
#[map(name = "VIPX_FLOWGEN_V1")]
static FLOWGEN: Array<u64> = Array::pinned(FLOW_SLOTS, BPF_F_MMAPABLE);

/// A flow cache entry: a conntrack entry's key (as `ct_key_words`), a copy of its value, and
/// the generation of its slot when the copy was made.
#[repr(C)]
#[derive(Clone, Copy)]
struct FlowCopy {
    w0: u64,
    w1: u64,
    generation: u64,
    ct: CtValue,
}

// Not pinned: a datagram's fragments arrive within milliseconds, nothing to keep across restarts.
#[map(name = "VIPX_FRAG4")]
static FRAG4: LruHashMap<FragKey4, FragValue> =
    LruHashMap::with_max_entries(defaults::FRAG4_ENTRIES, 0);

#[map(name = "VIPX_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// Backends of frontends with session affinity (userspace writes them).
#[map(name = "VIPX_AFFMATCH4")]
static AFFMATCH4: HashMap<AffinityMatchKey4, u32> = HashMap::pinned(defaults::SVC4_ENTRIES, 0);

/// The flood guard's count of new flows per source address (rate state, not pinned).
#[map(name = "VIPX_FLOOD4")]
static FLOOD4: LruHashMap<[u8; 4], FloodValue> =
    LruHashMap::with_max_entries(defaults::FLOOD4_ENTRIES, 0);

/// Pinned like the address map it filters (see `VIPBITS_WORDS`).
#[map(name = "VIPX_VIPBITS")]
static VIPBITS: Array<u64> = Array::pinned(VIPBITS_WORDS, 0);

/// Pinned like conntrack, whose reply entries it covers (see `backend_bit`).
#[map(name = "VIPX_BACKBITS2")]
static BACKBITS: Array<u64> = Array::pinned(BACKBITS_WORDS, 0);

#[map(name = "VIPX_CONFIG")]
static CONFIG: Array<u32> = Array::with_max_entries(CONFIG_LEN, 0);

#[map(name = "VIPX_FLOOR")]
static FLOOR: Array<u64> = Array::with_max_entries(1, 0);

/// The verdict for every packet vipx lets through, translated or not: "next", so that tcx
/// programs after vipx and legacy clsact filters (a CNI's) still run. `TC_ACT_OK` would end the
/// chain.
const NEXT: i32 = TC_ACT_UNSPEC;

#[inline(always)]
fn count(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}

/// Now, in `CtValue::seen` units, read on every tracked packet: from jiffies scaled as
/// userspace wrote (see `CONFIG_CLOCK_MULT`), a load where the coarse clock helper is a call
/// (14 ns a packet measured here); the coarse clock until userspace wrote the scale.
#[inline(always)]
fn ct_now() -> u32 {
    if let (Some(&mult), Some(&lo), Some(&hi)) = (
        CONFIG.get(CONFIG_CLOCK_MULT),
        CONFIG.get(CONFIG_CLOCK_BASE_LO),
        CONFIG.get(CONFIG_CLOCK_BASE_HI),
    ) && mult != 0
    {
        let base = u64::from(hi) << 32 | u64::from(lo);
        // SAFETY: plain helper call (inlined by the verifier).
        return seen_of_jiffies(unsafe { aya_ebpf::helpers::bpf_jiffies64() }, mult, base);
    }
    // SAFETY: plain helper call.
    ct_seen(unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() })
}

/// Record a packet on a conntrack entry: when it was seen and the state bits it adds. Written
/// only when something changes, so an established flow costs one entry write a second, not one
/// per packet (a written cache line is what other CPUs then miss on).
#[inline(always)]
fn ct_touch(entry: *mut CtValue, ct: &CtValue, add: u32) {
    ct_touch_at(entry, ct, add, ct_now());
}

/// [`ct_touch`] at `now`.
#[inline(always)]
fn ct_touch_at(entry: *mut CtValue, ct: &CtValue, add: u32, now: u32) {
    // SAFETY: value pointer from a successful lookup on this packet; `flags` is 4-byte aligned.
    unsafe {
        if ct.seen != now {
            (*entry).seen = now;
        }
        if ct.flags & add != add {
            // ORed in place, never written back from this packet's copy: that would undo bits
            // another CPU set meanwhile, and put this flow's bits into an entry `ct_put` has
            // overwritten for a new flow on the same tuple.
            ct_or_flags(entry, add);
        }
    }
}

/// OR `bits` into an entry's `flags` atomically. Rust's BPF target has only 64-bit atomics:
/// `flags` is the low half (little-endian) of the 8-byte word it shares with `seen` (offset 16,
/// asserted in proxy-common; map values are 8-byte aligned), so ORing the zero-extended bits
/// into that word changes `flags` alone.
///
/// # Safety
/// `entry` points to a conntrack map value.
#[inline(always)]
unsafe fn ct_or_flags(entry: *mut CtValue, bits: u32) {
    // SAFETY: see above; the word is 8-byte aligned and inside the value.
    unsafe {
        atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(
            addr_of_mut!((*entry).flags).cast::<u64>(),
            u64::from(bits),
        );
    }
}

/// Remove a conntrack entry found stale from the copy `seen_as`, unless it changed since the copy
/// was read: a copy torn by `ct_put` overwriting the entry in place for a new flow looks stale,
/// and the new flow's entry must stay.
#[inline(always)]
fn ct_remove_stale(key: &CtKey4, entry: *const CtValue, seen_as: &CtValue) {
    // SAFETY: value pointer from a successful lookup on this packet; read at once.
    let now = unsafe { *entry };
    if now.backend_id == seen_as.backend_id
        && now.backend_gen == seen_as.backend_gen
        && now.rev_nat_id == seen_as.rev_nat_id
        && now.rev_nat_gen == seen_as.rev_nat_gen
    {
        ct_remove(key);
    }
}

/// The flood guard (Katran's, per source): may `saddr` start another tracked flow in this
/// window? A source over `CONFIG_FLOOD_LIMIT` new flows per window, none of them closed, would
/// otherwise push every other client's idle entries out of the conntrack LRU.
#[inline(always)]
fn flood_allows(saddr: [u8; 4]) -> bool {
    let limit = match CONFIG.get(CONFIG_FLOOD_LIMIT) {
        Some(l) if *l & !FLOOD_STRICT != 0 => *l & !FLOOD_STRICT,
        _ => return true,
    };
    let now = ct_now();
    match FLOOD4.get_ptr_mut(saddr) {
        // SAFETY: value pointer from a successful lookup; `count` is 4-byte aligned. Two CPUs
        // opening a window at once both reset it: at worst a few flows more are let through.
        Some(v) => unsafe {
            if (*v).window != now {
                (*v).window = now;
                (*v).count = 1;
                return true;
            }
            // A plain atomic add (the generic BPF CPU cannot return the old value), then a read:
            // CPUs adding at once may each see the other's add, never miss their own.
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(addr_of_mut!((*v).count), 1);
            // Signed: closes credited at once by two CPUs may take the count below zero.
            ((*v).count as i64) <= i64::from(limit)
        },
        None => {
            let _ = FLOOD4.insert(
                saddr,
                FloodValue {
                    count: 1,
                    window: now,
                    _pad: 0,
                },
                0,
            );
            true
        }
    }
}

/// The client's first FIN or RST (`state`) on a TCP flow whose answers come back under `reply`:
/// when that closes the flow for good (the server closed already, or an answered flow is
/// reset: the entries get the short closed timeout), the flow no longer counts against the
/// client's new flows in this window. A client that opens and closes connections by the
/// thousand a second (an ingress controller, a client without keep-alive) then stays far below
/// the limit, which is meant for flows that stay open or are never answered; dropping its SYNs
/// would stall each connection a second (the SYN retransmit). A half-close gives nothing back
/// (its entries live close-wait's hour), nor does a FIN or RST after an unanswered SYN: that
/// flow's entries live the SYN or the closed timeout, but crediting it would let a source
/// open flows as fast as it can send SYN+RST pairs. Only while the guard is engaged and not strict (the table close to full: closed
/// flows' entries still hold it until collected, so a source churning flows would push out
/// everyone else's); once per flow (the forward entry's first FIN or RST).
#[inline(always)]
fn flood_credit(client: [u8; 4], reply: &CtKey4, state: u32, now: u32) {
    match CONFIG.get(CONFIG_FLOOD_LIMIT) {
        Some(l) if *l != 0 && *l & FLOOD_STRICT == 0 => {}
        _ => return,
    }
    let Some(r) = CT4.get_ptr(reply) else {
        return;
    };
    // SAFETY: value pointer from a successful lookup; one field read at once.
    let r = unsafe { (*r).flags };
    let server_closed = r & (CT_F_FIN | CT_F_RST) != 0;
    let answered_reset = state & CT_F_RST != 0 && r & CT_F_REPLIED != 0;
    if !(server_closed || answered_reset) {
        return;
    }
    let Some(v) = FLOOD4.get_ptr_mut(client) else {
        return;
    };
    // SAFETY: value pointer from a successful lookup; `count` is 8-byte aligned. The credit
    // goes to this window whatever window the flow was counted in, or whether it was counted at
    // all (it may predate the guard): the limit is on net opens a second, so a source that
    // closes R older flows may open R more now. Each still holds entries until collected,
    // which strict mode bounds.
    unsafe {
        if (*v).window == now && (*v).count as i64 > 0 {
            // -1: BPF's atomic add takes no subtraction.
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                addr_of_mut!((*v).count),
                u64::MAX,
            );
        }
    }
}

/// Write a conntrack entry. A tuple that has none gets one (counted, so userspace can tell
/// evictions from removals); one that has an entry (a retransmitted SYN, a tuple reused) gets
/// its value overwritten in place, cheaper than a second map update.
#[inline(always)]
fn ct_put(key: &CtKey4, value: &CtValue) -> Result<(), ()> {
    if CT4.insert(key, value, BPF_NOEXIST as u64).is_ok() {
        count(Stat::CtCreated);
        flow_changed(key);
        return Ok(());
    }
    if let Some(old) = CT4.get_ptr_mut(key) {
        // SAFETY: value pointer from a successful lookup. A packet of the old flow reading it
        // half-way sees ids and generations that do not pair and treats the entry as stale.
        unsafe { *old = *value };
        flow_changed(key);
        return Ok(());
    }
    // Gone between the two calls (evicted, removed): try once more as a plain insert.
    let put = CT4.insert(key, value, 0).map_err(|_| ());
    flow_changed(key);
    put
}

/// Insert an entry for a tuple that has none; `false` if it has one (or the insert failed).
#[inline(always)]
fn ct_insert_new(key: &CtKey4, value: &CtValue) -> bool {
    let ok = CT4.insert(key, value, BPF_NOEXIST as u64).is_ok();
    if ok {
        flow_changed(key);
    }
    ok
}

/// Remove a tuple's entry. The flow cache generation is bumped even when there was none: the
/// LRU may have evicted the entry (which bumps nothing) while a CPU still holds a copy of it.
#[inline(always)]
fn ct_remove(key: &CtKey4) -> bool {
    let removed = CT4.remove(key).is_ok();
    if removed {
        count(Stat::CtRemoved);
    }
    flow_changed(key);
    removed
}

/// The flow cache slot of a conntrack key's words, and its generation now: read before
/// conntrack is, so that a change made after the read (and bumped after it) voids a copy.
#[inline(always)]
fn flow_generation(w: (u64, u64)) -> (u32, u64) {
    let slot = flow_slot(w.0, w.1);
    (slot, FLOWGEN.get(slot).map_or(0, |g| *g))
}

/// This CPU's copy of the conntrack entry of `w`, while it may stand for the entry (see
/// `proxy_common::FLOW_SLOTS_LOG2`): same generation, made this tick, and the packet's state
/// bits `add` already in it. The caller validates it as an entry.
#[inline(always)]
fn flow_cached(slot: u32, generation: u64, w: (u64, u64), now: u32, add: u32) -> Option<CtValue> {
    if CONFIG
        .get(CONFIG_FLOW_CACHE_OFF)
        .is_some_and(|off| *off != 0)
    {
        return None;
    }
    let c = FLOWCACHE.get_ptr(slot)?;
    // SAFETY: per-CPU value pointer from a successful lookup; this CPU alone writes it, and not
    // while this program runs.
    let c = unsafe { &*c };
    if c.w0 == w.0
        && c.w1 == w.1
        && c.generation == generation
        && c.ct.seen == now
        && c.ct.flags & add == add
    {
        Some(c.ct)
    } else {
        None
    }
}

/// [`ct_touch_at`] an entry this packet found valid, and keep a copy of it as touched (its
/// `seen` now `now`, its flags at least `ct.flags | add`) in the flow cache slot the packet's
/// generation was read for (`at`: slot, generation, key words).
#[inline(always)]
fn flow_touch(entry: *mut CtValue, ct: &CtValue, add: u32, now: u32, at: (u32, u64, (u64, u64))) {
    ct_touch_at(entry, ct, add, now);
    let (slot, generation, w) = at;
    if let Some(c) = FLOWCACHE.get_ptr_mut(slot) {
        // SAFETY: per-CPU value pointer from a successful lookup (see `flow_cached`).
        unsafe {
            *c = FlowCopy {
                w0: w.0,
                w1: w.1,
                generation,
                ct: CtValue {
                    flags: ct.flags | add,
                    seen: now,
                    ..*ct
                },
            }
        };
    }
}

/// After the conntrack entry of `key` was written or removed: no CPU uses a copy of it again.
/// An atomic add, so that two changes at once both change the generation. Ordered after the
/// change and before the readers' lookups on x86 (a locked add; loads are not reordered with
/// loads). Not on arm64: the fetching (fully ordered) form needs BPF ISA v3, which this build
/// does not target (`--cpu generic`), and the readers would need a load-acquire (6.15+); see
/// the README.
#[inline(always)]
fn flow_changed(key: &CtKey4) {
    let (w0, w1) = ct_key_words(key);
    if let Some(g) = FLOWGEN.get_ptr_mut(flow_slot(w0, w1)) {
        // SAFETY: value pointer from a successful lookup of an 8-byte array element.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(g, 1) };
    }
}

/// Not a fragment, the first fragment (has the L4 header), or a later one (ports from `FRAG4`).
const FRAG_NONE: u8 = 0;
const FRAG_FIRST: u8 = 1;
const FRAG_LATER: u8 = 2;

/// The headers the pipeline needs, copied out of the packet.
struct Flow {
    l4_off: usize,
    csum_off: usize,
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
    tcp_flags: u8,
    ip_id: [u8; 2],
    frag: u8,
    /// A fragment with MF clear: the end of its datagram.
    last_frag: bool,
}

impl Flow {
    #[inline(always)]
    fn ct_key(&self) -> CtKey4 {
        CtKey4 {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// The conntrack state bits this packet sets on the entry of its direction.
    #[inline(always)]
    fn ct_state(&self) -> u32 {
        if self.proto == IPPROTO_TCP {
            ct_state_of_tcp(self.tcp_flags)
        } else {
            0
        }
    }

    /// The key of the other direction of this tuple.
    #[inline(always)]
    fn reverse_ct_key(&self) -> CtKey4 {
        CtKey4 {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: 0,
            _pad2: 0,
        }
    }

    #[inline(always)]
    fn frag_key(&self, dir: u8) -> FragKey4 {
        FragKey4 {
            saddr: self.saddr,
            daddr: self.daddr,
            id: self.ip_id,
            proto: self.proto,
            dir,
        }
    }

    /// Fragments: the first records its ports for the rest of its datagram (every first
    /// fragment, translated or not, so a later fragment always finds the ports of its own
    /// datagram, even after the IP id wrapped); a later one takes them, and the last one
    /// (MF clear) removes the record. `false`: a later fragment whose first was not seen
    /// (lost, or out of order): passed untouched.
    #[inline(always)]
    fn resolve_ports(&mut self, dir: u8) -> bool {
        match self.frag {
            FRAG_FIRST => {
                let v = FragValue {
                    sport: self.sport,
                    dport: self.dport,
                };
                let _ = FRAG4.insert(self.frag_key(dir), v, 0);
                true
            }
            FRAG_LATER => {
                let key = self.frag_key(dir);
                let Some(v) = FRAG4.get_ptr(key) else {
                    count(Stat::FragMiss);
                    return false;
                };
                // SAFETY: value pointer from a successful lookup; copied out at once.
                let v = unsafe { *v };
                self.sport = v.sport;
                self.dport = v.dport;
                if self.last_frag {
                    let _ = FRAG4.remove(key);
                }
                true
            }
            _ => true,
        }
    }
}

/// An ICMP error whose quoted packet is TCP or UDP, as it reaches the program.
struct IcmpError {
    l4_off: usize,
    inner_off: usize,
    inner_saddr: [u8; 4],
    inner_daddr: [u8; 4],
    inner_sport: [u8; 2],
    inner_dport: [u8; 2],
    inner_proto: u8,
}

enum Parse {
    Flow(Flow),
    Icmp(IcmpError),
    /// Not something vipx translates (not IPv4 TCP/UDP, ICMP that is not an error).
    Other,
    /// Headers cut short or inconsistent.
    Malformed,
}

/// Bounds-checked pointer into the linear packet data.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Parse {
    let Some(ethertype) = ptr_at::<[u8; 2]>(ctx, 12) else {
        return Parse::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be_bytes(unsafe { *ethertype }) != ETH_P_IP {
        return Parse::Other;
    }
    let Some(ip) = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN) else {
        return Parse::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let Some(ihl) = ipv4_header_len(ip[0]) else {
        return Parse::Malformed;
    };
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total_len < ihl {
        return Parse::Malformed;
    }
    let proto = ip[9];
    let l4_off = ETH_HLEN + ihl;
    let mut flow = Flow {
        l4_off,
        csum_off: 0,
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport: [0; 2],
        dport: [0; 2],
        proto,
        tcp_flags: 0,
        ip_id: [ip[4], ip[5]],
        frag: FRAG_NONE,
        last_frag: ip[6] & 0x20 == 0,
    };
    let frag_off = [ip[6], ip[7]];
    if is_fragment(frag_off) {
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Parse::Other;
        }
        if is_later_fragment(frag_off) {
            flow.frag = FRAG_LATER;
            return Parse::Flow(flow);
        }
        flow.frag = FRAG_FIRST;
    }
    let (l4_len, csum) = match proto {
        IPPROTO_TCP => (TCP_MIN_HLEN, TCP_CSUM_OFF),
        IPPROTO_UDP => (UDP_HLEN, UDP_CSUM_OFF),
        IPPROTO_ICMP => return parse_icmp(ctx, l4_off),
        _ => return Parse::Other,
    };
    if total_len < ihl + l4_len {
        return Parse::Malformed;
    }
    // Checked against both the linear data and the IP total length: a packet whose IP header
    // claims less than a full L4 header is never rewritten.
    let Some(l4) = ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off) else {
        return Parse::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let (sport, dport) = unsafe { ([(*l4)[0], (*l4)[1]], [(*l4)[2], (*l4)[3]]) };
    if proto == IPPROTO_TCP {
        let Some(tcp) = ptr_at::<[u8; TCP_MIN_HLEN]>(ctx, l4_off) else {
            return Parse::Malformed;
        };
        // SAFETY: bounds checked by ptr_at.
        flow.tcp_flags = unsafe { (*tcp)[TCP_FLAGS_OFF] };
    }
    flow.csum_off = l4_off + csum;
    flow.sport = sport;
    flow.dport = dport;
    Parse::Flow(flow)
}

/// An ICMP error quoting a TCP or UDP packet (an IPv4 header without options and the first 8
/// bytes of its L4 header: the ports). Anything else is not vipx's.
#[inline(always)]
fn parse_icmp(ctx: &TcContext, l4_off: usize) -> Parse {
    let Some(icmp) = ptr_at::<[u8; ICMP_HLEN]>(ctx, l4_off) else {
        return Parse::Other;
    };
    // SAFETY: bounds checked by ptr_at.
    if !is_icmp_error(unsafe { (*icmp)[0] }) {
        return Parse::Other;
    }
    let inner_off = l4_off + ICMP_HLEN;
    let Some(inner) = ptr_at::<[u8; IPV4_MIN_HLEN + ICMP_QUOTED_L4]>(ctx, inner_off) else {
        return Parse::Other;
    };
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &*inner };
    let proto = inner[9];
    // Quoted headers with options are rare enough to leave alone; a quoted later fragment has
    // payload where the ports would be.
    if inner[0] != 0x45
        || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        || is_later_fragment([inner[6], inner[7]])
    {
        return Parse::Other;
    }
    let l4 = IPV4_MIN_HLEN;
    Parse::Icmp(IcmpError {
        l4_off,
        inner_off,
        inner_saddr: [inner[12], inner[13], inner[14], inner[15]],
        inner_daddr: [inner[16], inner[17], inner[18], inner[19]],
        inner_sport: [inner[l4], inner[l4 + 1]],
        inner_dport: [inner[l4 + 2], inner[l4 + 3]],
        inner_proto: proto,
    })
}

/// Headers may sit beyond the linear part of the skb (GRO, some drivers); pull enough for the
/// largest header set we read, then parse again. Cheap when already linear.
#[inline(always)]
fn parse_pulling(ctx: &TcContext) -> Parse {
    match parse(ctx) {
        Parse::Malformed => {
            let want = (ETH_HLEN + 60 + TCP_MIN_HLEN).min(ctx.len() as usize) as u32;
            if ctx.pull_data(want).is_err() {
                return Parse::Malformed;
            }
            parse(ctx)
        }
        Parse::Other if ctx.data() + ETH_HLEN + IPV4_MIN_HLEN <= ctx.data_end() => {
            // An ICMP error quotes a second header set; make sure it is linear too.
            let want = (ETH_HLEN + 60 + ICMP_HLEN + IPV4_MIN_HLEN + TCP_MIN_HLEN)
                .min(ctx.len() as usize) as u32;
            let (Some(ethertype), Some(proto)) = (
                ptr_at::<[u8; 2]>(ctx, 12),
                ptr_at::<u8>(ctx, ETH_HLEN + IP_PROTO_OFF),
            ) else {
                return Parse::Other;
            };
            // SAFETY: bounds checked by ptr_at.
            if unsafe { u16::from_be_bytes(*ethertype) } != ETH_P_IP
                || unsafe { *proto } != IPPROTO_ICMP
                || ctx.data() + want as usize <= ctx.data_end()
                || ctx.pull_data(want).is_err()
            {
                return Parse::Other;
            }
            parse(ctx)
        }
        p => p,
    }
}

/// One end of a flow to rewrite: an address in the IPv4 header and a port in the L4 header.
#[derive(Clone, Copy)]
struct Nat {
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: [u8; 2],
    new_port: [u8; 2],
}

/// How this skb carries its L4 checksum: the kernel's `ip_summed` (`skb_csum::CHECKSUM_*`), or
/// `skb_csum::UNKNOWN` where userspace could not patch the reading in (then only the kernel's
/// helpers know). Two placeholder instructions, patched before loading: the kfunc
/// `bpf_cast_to_kern_ctx`, which the verifier turns into a register move, and a one-byte load
/// of the `struct sk_buff` it gives, which the verifier checks against the kernel's BTF.
#[inline(always)]
fn ip_summed(ctx: &TcContext) -> u64 {
    let byte: u64;
    // SAFETY: the pair reads one byte of this packet's own skb and writes no memory; the call
    // clobbers the caller-saved registers, as any call.
    unsafe {
        core::arch::asm!(
            ".quad {call}",
            ".quad {load}",
            call = const skb_csum::CALL_INSN,
            load = const skb_csum::LOAD_INSN,
            inout("r1") ctx.skb.skb => _,
            lateout("r0") byte,
            out("r2") _,
            out("r3") _,
            out("r4") _,
            out("r5") _,
            options(nostack, readonly),
        );
    }
    if byte == skb_csum::UNKNOWN {
        return byte;
    }
    (byte >> skb_csum::IP_SUMMED_SHIFT) & 3
}

/// The one place that owns checksum rules: rewrite an address and a port of a TCP/UDP packet,
/// fixing the IPv4 header checksum and the L4 checksum (including the pseudo-header; a UDP
/// checksum of 0 means "none" and stays 0). A later fragment has no L4 header: only its address
/// changes (the first fragment's L4 checksum already covers the whole datagram).
///
/// The IPv4 header checksum is always complete, so the address, the port and that checksum are
/// written directly. So is the L4 checksum where the program knows how the skb carries it
/// (`ip_summed`): whole (CHECKSUM_NONE, UNNECESSARY), or the pseudo-header sum alone
/// (CHECKSUM_PARTIAL: local senders on veth), which a port change must not touch. Otherwise
/// (CHECKSUM_COMPLETE, whose `skb->csum` must follow the pseudo-header change, or a kernel where
/// the program cannot read it) the kernel's `bpf_l4_csum_replace` does it, a call each for the
/// address and the port.
#[inline(always)]
fn rewrite(ctx: &mut TcContext, flow: &Flow, nat: &Nat) -> Result<(), i64> {
    let Nat {
        addr_off,
        old_addr,
        new_addr,
        port_off,
        old_port,
        new_port,
    } = *nat;
    let summed = ip_summed(ctx);
    let ip = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN).ok_or(-1i64)?;
    // SAFETY: bounds-checked just above, after the last helper call that could have moved
    // packet data; TC programs may write packet data directly.
    unsafe {
        let check = csum_replace4(
            [(*ip)[IP_CSUM_OFF], (*ip)[IP_CSUM_OFF + 1]],
            old_addr,
            new_addr,
        );
        (*ip)[IP_CSUM_OFF] = check[0];
        (*ip)[IP_CSUM_OFF + 1] = check[1];
        (*ip)[addr_off] = new_addr[0];
        (*ip)[addr_off + 1] = new_addr[1];
        (*ip)[addr_off + 2] = new_addr[2];
        (*ip)[addr_off + 3] = new_addr[3];
    }
    if flow.frag == FRAG_LATER {
        return Ok(());
    }
    let ports = ptr_at::<[u8; 4]>(ctx, flow.l4_off).ok_or(-1i64)?;
    // SAFETY: as above.
    unsafe {
        (*ports)[port_off] = new_port[0];
        (*ports)[port_off + 1] = new_port[1];
    }
    let udp = flow.proto == IPPROTO_UDP;
    let partial = summed == skb_csum::CHECKSUM_PARTIAL;
    if partial || summed == skb_csum::CHECKSUM_NONE || summed == skb_csum::CHECKSUM_UNNECESSARY {
        let sum = ptr_at::<[u8; 2]>(ctx, flow.csum_off).ok_or(-1i64)?;
        // SAFETY: as above.
        unsafe {
            *sum = l4_csum_after_nat(
                u16::from_ne_bytes(*sum),
                (u32::from_ne_bytes(old_addr), u32::from_ne_bytes(new_addr)),
                (u16::from_ne_bytes(old_port), u16::from_ne_bytes(new_port)),
                partial,
                udp,
            )
            .to_ne_bytes();
        }
        return Ok(());
    }
    let mangled0 = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    ctx.l4_csum_replace(
        flow.csum_off,
        u32::from_ne_bytes(old_addr) as u64,
        u32::from_ne_bytes(new_addr) as u64,
        BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
    )?;
    ctx.l4_csum_replace(
        flow.csum_off,
        u16::from_ne_bytes(old_port) as u64,
        u16::from_ne_bytes(new_port) as u64,
        mangled0 | 2,
    )?;
    Ok(())
}

#[inline(always)]
fn dnat(ctx: &mut TcContext, flow: &Flow, backend: &Backend4) -> i32 {
    let nat = Nat {
        addr_off: IP_DADDR_OFF,
        old_addr: flow.daddr,
        new_addr: backend.addr,
        port_off: L4_DPORT_OFF,
        old_port: flow.dport,
        new_port: backend.port,
    };
    match rewrite(ctx, flow, &nat) {
        Ok(()) => NEXT,
        // A half-rewritten packet must not leave: its checksums may no longer match.
        Err(_) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn snat_reply(ctx: &mut TcContext, flow: &Flow, rev: &RevNat4) -> i32 {
    let nat = Nat {
        addr_off: IP_SADDR_OFF,
        old_addr: flow.saddr,
        new_addr: rev.addr,
        port_off: L4_SPORT_OFF,
        old_port: flow.sport,
        new_port: rev.port,
    };
    match rewrite(ctx, flow, &nat) {
        Ok(()) => NEXT,
        Err(_) => TC_ACT_SHOT,
    }
}

/// The backend a forward entry names, if it is still the same backend (same generation).
#[inline(always)]
fn backend(id: u32) -> Option<Backend4> {
    match BACKEND4.get(id) {
        Some(b) if b.is_active() => Some(*b),
        _ => None,
    }
}

/// The frontend a forward entry was made for, while its reverse-NAT entry still means it
/// (active, same generation, the packet's address and port): so also while a removed frontend
/// drains. Shared by the pod and node programs' established paths.
#[inline(always)]
fn forward_revnat(ct: &CtValue, daddr: [u8; 4], dport: [u8; 2]) -> Option<RevNat4> {
    match REVNAT4.get(ct.rev_nat_id) {
        Some(r)
            if r.flags & REVNAT_F_ACTIVE != 0
                && r.generation == ct.rev_nat_gen
                && r.addr == daddr
                && r.port == dport =>
        {
            Some(*r)
        }
        _ => None,
    }
}

/// The frontend a reply entry restores, if its reverse-NAT id still means the same frontend and
/// its backend id was not handed to another backend since (a removed backend keeps its
/// generation, so the tail of its flows is still restored).
#[inline(always)]
fn reply_revnat(ct: &CtValue) -> Option<RevNat4> {
    if ct.flags & CT_F_REPLY == 0 {
        return None;
    }
    match BACKEND4.get(ct.backend_id) {
        Some(b) if b.generation == ct.backend_gen => {}
        _ => return None,
    }
    match REVNAT4.get(ct.rev_nat_id) {
        Some(r) if r.flags & REVNAT_F_ACTIVE != 0 && r.generation == ct.rev_nat_gen => Some(*r),
        _ => None,
    }
}

/// The backend `client` has affinity to on frontend `rev_nat_id` (sessionAffinity ClientIP):
/// its last choice, while that is fresher than `timeout_s`, for this very frontend (same
/// generation), and still one of its backends (userspace keeps `AFFMATCH4` to its slots) with
/// the same generation, however its slots or Maglev table were rearranged since: as kube-proxy,
/// whose `recent` list lives as long as the endpoint's chain. Shared by the pod, node and socket
/// programs, so a client keeps its backend whichever path its flows take.
#[inline(always)]
fn affine(
    client: [u8; 4],
    rev_nat_id: u32,
    timeout_s: u32,
    rev_nat_gen: u32,
    now: u64,
) -> Option<(u32, Backend4)> {
    let a = AFFINITY4.get_ptr(AffinityKey4 { client, rev_nat_id })?;
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let a = unsafe { *a };
    if now.wrapping_sub(a.last_ns) >= u64::from(timeout_s) * 1_000_000_000
        || a.rev_nat_gen != rev_nat_gen
    {
        return None;
    }
    let member = AffinityMatchKey4 {
        rev_nat_id,
        backend_id: a.backend_id,
    };
    AFFMATCH4.get_ptr(member)?;
    let kept = backend(a.backend_id)?;
    if kept.generation != a.backend_gen {
        return None;
    }
    count(Stat::AffinityHit);
    Some((a.backend_id, kept))
}

/// Remembers `client`'s choice on frontend `rev_nat_id` for [`affine`].
#[inline(always)]
fn remember_affinity(
    client: [u8; 4],
    rev_nat_id: u32,
    (backend_id, b): (u32, &Backend4),
    rev_nat_gen: u32,
    now: u64,
    slot: u16,
) {
    let v = AffinityValue {
        backend_id,
        backend_gen: b.generation,
        last_ns: now,
        rev_nat_gen,
        slot,
        _pad: 0,
    };
    let _ = AFFINITY4.insert(AffinityKey4 { client, rev_nat_id }, v, 0);
}

/// The backend in slot `slot` of a frontend, with its id.
#[inline(always)]
fn slot_backend(svc_key: SvcKey4, slot: u16) -> Option<(u32, Backend4)> {
    let v = SVC4.get_ptr(svc_key.with_slot(slot))?;
    // SAFETY: value pointer from a successful lookup.
    let id = unsafe { (*v).backend_id };
    Some((id, backend(id)?))
}

/// The backend at table position `pos` (0-based) of Maglev table `table`, if it names a live one.
#[inline(always)]
fn maglev_at(table: u32, m: u32, pos: u32) -> Option<(u32, Backend4)> {
    let id = *MAGLEV4.get(maglev_entry(table, m, pos))?;
    Some((id, backend(id)?))
}

/// The Maglev choice for a flow hash: (table position, backend id, backend). `None` when the
/// frontend has no table or the entry names no live backend (a table a packet read just before
/// a swap may name a backend freed since): the caller falls back to slot hashing.
#[inline(always)]
fn maglev_pick(table: u32, hash: u32) -> Option<(u32, u32, Backend4)> {
    if table == 0 {
        return None;
    }
    let m = *MAGLEV4.get(0)?;
    if m == 0 {
        return None;
    }
    let pos = maglev_index(hash, m);
    let (id, b) = maglev_at(table, m, pos)?;
    Some((pos, id, b))
}

/// TC ingress on the host side of a pod's veth: packets the pod sends.
#[classifier]
// The macro wraps this body in the entry point; inlined there, not a BPF-to-BPF call (a call
// and a return on every packet).
#[inline(always)]
pub fn vipx_pod_ingress(mut ctx: TcContext) -> i32 {
    count(Stat::Packets);
    if plainly_not_ours(&ctx) {
        return NEXT;
    }
    let mut flow = match parse_pulling(&ctx) {
        Parse::Flow(f) => f,
        Parse::Icmp(err) => return icmp_forward(&mut ctx, &err),
        Parse::Other => {
            count(Stat::NotHandled);
            return NEXT;
        }
        Parse::Malformed => {
            count(Stat::Malformed);
            return NEXT;
        }
    };
    if !flow.resolve_ports(FRAG_DIR_INGRESS) {
        return NEXT;
    }
    let syn = flow.proto == IPPROTO_TCP && is_tcp_syn(flow.tcp_flags);

    // A conntrack entry is only trusted for the frontend it was made for (as in Katran and
    // Cilium), which its reverse-NAT entry says. The address filter first: most packets go to
    // no frontend address, which it says for most of them without a hash lookup.
    let (word, bit) = addr_bit(flow.daddr);
    if VIPBITS.get(word).is_none_or(|w| *w & bit == 0) {
        return not_to_a_frontend(&flow, syn);
    }
    // Established flows by their conntrack entry alone, two hash lookups fewer than through
    // the frontend: the entry's reverse-NAT entry vouches that it was made for this frontend
    // (active, same generation, this address and port), which also keeps a removed frontend's
    // flows while it drains. (The hairpin address is no frontend's, so no forward entry names
    // it: its packets go on to `hairpin_reply`.) A SYN always selects afresh (as in Katran):
    // the hash is deterministic, so a retransmitted SYN lands on the same backend, and a new
    // connection reusing a port is balanced over the current backends.
    if !syn && let Some(verdict) = established_flow(&mut ctx, &flow) {
        return verdict;
    }
    let Some(vip) = VIP4.get_ptr(VipKey4 { addr: flow.daddr }) else {
        return not_to_a_frontend(&flow, syn);
    };
    // SAFETY: value pointer from a successful lookup; read at once.
    let vip_flags = unsafe { (*vip).flags };
    if vip_flags & VIP_F_HAIRPIN != 0 {
        return hairpin_reply(&mut ctx, &flow);
    }
    let svc_key = SvcKey4::from_wire(flow.daddr, flow.dport, flow.proto, SCOPE_EXTERNAL, 0);
    let Some(svc) = SVC4.get_ptr(svc_key) else {
        if vip_flags & VIP_F_CLUSTER_IP != 0 {
            // A ClusterIP on a port no Service port serves: refused, as kube-proxy's nftables
            // mode does, rather than sent to a host that has no such address.
            count(Stat::UnservedPort);
            return reject(&mut ctx, &flow, syn);
        }
        return not_to_a_frontend(&flow, syn);
    };
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let svc = unsafe { *svc };

    let ct_key = flow.ct_key();
    if flow.frag == FRAG_LATER {
        // Its first fragment would have made the entry; without it there is nothing to follow.
        return NEXT;
    }

    // A new flow.
    if svc.count == 0 {
        count(Stat::NoBackend);
        if svc.flags & SVC_F_REJECT == 0 {
            return TC_ACT_SHOT;
        }
        return reject(&mut ctx, &flow, syn);
    }
    // A FIN or RST that finds no entry (the flow ended and was collected, or never existed) is
    // translated but tracks nothing: it must not leave an entry behind for a flow that is over.
    let track = !(flow.proto == IPPROTO_TCP && !syn && is_tcp_close(flow.tcp_flags));
    if track && !flood_allows(flow.saddr) {
        // The client retransmits a dropped SYN; by then its window may have room again.
        count(Stat::FloodDropped);
        return TC_ACT_SHOT;
    }
    if flow.proto == IPPROTO_TCP && !syn {
        count(Stat::CtMissNonSyn);
    }
    let hash = flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    // Maglev frontends: slot 0's `backend_id` names the table (0: none). `slot` stays 0 while the
    // table made the choice; `pos` is then the table position plus one (what affinity keeps).
    let table = if svc.flags & SVC_F_MAGLEV != 0 {
        svc.backend_id
    } else {
        0
    };
    let mut slot = 0;
    let mut pos = 0u16;
    let (mut backend_id, mut b) = match maglev_pick(table, hash) {
        Some((p, id, b)) => {
            pos = (p as u16).wrapping_add(1);
            (id, b)
        }
        None => {
            if svc.flags & SVC_F_MAGLEV != 0 {
                count(Stat::MaglevFallback);
            }
            slot = pick_slot(hash, svc.count);
            let mut chosen = slot_backend(svc_key, slot);
            if chosen.is_none() {
                // The count this packet read was lowered and the slots beyond it removed
                // meanwhile (a Service shrinking): choose again among what is there, rather than
                // drop the SYN.
                slot = match SVC4.get_ptr(svc_key) {
                    // SAFETY: value pointer from a successful lookup; read at once.
                    Some(head)
                        if unsafe { (*head).count } != 0 && unsafe { (*head).count } < slot =>
                    {
                        pick_slot(hash, unsafe { (*head).count })
                    }
                    _ => 1,
                };
                chosen = slot_backend(svc_key, slot);
            }
            let Some(chosen) = chosen else {
                count(Stat::NoBackend);
                return TC_ACT_SHOT;
            };
            chosen
        }
    };
    let rev_nat_gen = match REVNAT4.get(svc.rev_nat_id) {
        Some(r) => r.generation,
        None => 0,
    };
    // sessionAffinity ClientIP: a client's new flows follow its last one while that is fresher
    // than the timeout, for the same frontend, and its slot still names its backend.
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let now = if affinity {
        // SAFETY: plain helper call.
        unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
    } else {
        0
    };
    if affinity
        && let Some(kept) = affine(
            flow.saddr,
            svc.rev_nat_id,
            svc.affinity_timeout_s,
            rev_nat_gen,
            now,
        )
    {
        (backend_id, b) = kept;
        // No slot or table position chose it (the hairpin rule below picks by slot).
        slot = 0;
        pos = 0;
    }
    // A pod sent to itself through its own Service (hairpin) would get its answer from its own
    // address and drop it: take the next slot while another backend exists. Deterministic, so
    // a retransmitted SYN makes the same choice.
    if b.addr == flow.saddr && svc.count > 1 {
        count(Stat::HairpinAvoided);
        slot = if slot == 0 {
            // The Maglev table chose the client: the slot list decides instead, skipping the
            // client's own slot.
            let s = pick_slot(hash, svc.count);
            match slot_backend(svc_key, s) {
                Some((_, other)) if other.addr != flow.saddr => s,
                _ => next_slot(s, svc.count),
            }
        } else {
            next_slot(slot, svc.count)
        };
        pos = 0;
        let mut next = slot_backend(svc_key, slot);
        if next.is_none() {
            // The count this packet read was lowered and the slots beyond it removed meanwhile
            // (a Service shrinking): slot 1 stays while the Service has a backend. If it is the
            // client again, the hairpin SNAT below answers it.
            slot = 1;
            next = slot_backend(svc_key, slot);
        }
        let Some(next) = next else {
            count(Stat::NoBackend);
            return TC_ACT_SHOT;
        };
        (backend_id, b) = next;
    }

    // Still itself (its only backend): the answer must come from another address than its own,
    // or the pod drops it, so the source becomes the hairpin address (kube-proxy masquerades
    // hairpin traffic too).
    let hairpin = if b.addr == flow.saddr {
        hairpin_addr()
    } else {
        None
    };
    if !track {
        count(Stat::CtUntracked);
        return match hairpin {
            Some(hp) => hairpin_forward(&mut ctx, &flow, &b, hp),
            None => dnat(&mut ctx, &flow, &b),
        };
    }
    let hairpin_flag = if hairpin.is_some() { CT_F_HAIRPIN } else { 0 };
    let fwd = CtValue {
        backend_id,
        backend_gen: b.generation,
        rev_nat_id: svc.rev_nat_id,
        rev_nat_gen,
        flags: CT_F_FORWARD | CT_F_POD | hairpin_flag,
        seen: ct_now(),
    };
    let reply_key = CtKey4 {
        saddr: b.addr,
        daddr: match hairpin {
            Some(hp) => hp,
            None => flow.saddr,
        },
        sport: b.port,
        dport: flow.sport,
        proto: flow.proto,
        _pad: 0,
        _pad2: 0,
    };
    let reply = CtValue {
        flags: CT_F_REPLY | hairpin_flag,
        ..fwd
    };
    // Reply entry first: once the forward entry exists, the backend may answer at once. Without
    // it the backend's answer would reach the client from the backend's own address: fail
    // closed instead (the client retransmits).
    if affinity {
        remember_affinity(
            flow.saddr,
            svc.rev_nat_id,
            (backend_id, &b),
            rev_nat_gen,
            now,
            if pos != 0 { pos } else { slot },
        );
    }
    if ct_put(&reply_key, &reply).is_err() {
        count(Stat::CtInsertFailed);
        return TC_ACT_SHOT;
    }
    if ct_put(&ct_key, &fwd).is_err() {
        // Later packets select again with the same hash; the reply entry is in place.
        count(Stat::CtInsertFailed);
    }
    count(Stat::NewFlows);
    match hairpin {
        Some(hp) => hairpin_forward(&mut ctx, &flow, &b, hp),
        None => dnat(&mut ctx, &flow, &b),
    }
}

/// A packet of an established flow: its forward entry is followed while the reverse-NAT id it
/// names still means this very frontend (active, same generation, same address and port), so
/// also while a removed frontend drains or is re-created, and its backend is the same one.
/// `None`: not such a flow (a new one, or one whose entry went stale: it selects afresh).
#[inline(always)]
fn established_flow(ctx: &mut TcContext, flow: &Flow) -> Option<i32> {
    let key = flow.ct_key();
    let w = ct_key_words(&key);
    let (slot, generation) = flow_generation(w);
    let now = ct_now();
    let state = flow.ct_state();
    // This CPU's copy of the entry, validated as the entry would be below (a copy that fails
    // is looked up afresh, which counts why).
    if let Some(ct) = flow_cached(slot, generation, w, now, state)
        && ct.flags & (CT_F_FORWARD | CT_F_NODE) == CT_F_FORWARD
        && forward_revnat(&ct, flow.daddr, flow.dport).is_some()
        && let Some(b) = backend(ct.backend_id)
        && b.generation == ct.backend_gen
    {
        count(Stat::FlowCacheHit);
        return Some(forward(ctx, flow, &ct, &b));
    }
    let entry = CT4.get_ptr_mut(key)?;
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let ct = unsafe { *entry };
    // (The node program's own entries are an external client's flows, never a pod's.)
    if ct.flags & (CT_F_FORWARD | CT_F_NODE) != CT_F_FORWARD {
        return None;
    }
    if forward_revnat(&ct, flow.daddr, flow.dport).is_none() {
        // Made for another frontend that had this address before, or one that is gone.
        count(Stat::CtStale);
        return None;
    }
    let b = match backend(ct.backend_id) {
        Some(b) if b.generation == ct.backend_gen => b,
        // The id now names another backend: never follow it.
        Some(_) => {
            count(Stat::CtStale);
            return None;
        }
        // The backend went away: pick a live one.
        None => {
            count(Stat::BackendGone);
            return None;
        }
    };
    if state != 0 && ct.flags & (CT_F_FIN | CT_F_RST) == 0 {
        // A hairpin flow's answers come back to the hairpin address.
        let to = match hairpin_addr() {
            Some(hp) if ct.flags & CT_F_HAIRPIN != 0 => hp,
            _ => flow.saddr,
        };
        let reply = CtKey4 {
            saddr: b.addr,
            daddr: to,
            sport: b.port,
            dport: flow.sport,
            proto: flow.proto,
            _pad: 0,
            _pad2: 0,
        };
        flood_credit(flow.saddr, &reply, state, now);
    }
    flow_touch(entry, &ct, state, now, (slot, generation, w));
    Some(forward(ctx, flow, &ct, &b))
}

/// An established packet's translation, its entry (or this CPU's copy of it) validated.
#[inline(always)]
fn forward(ctx: &mut TcContext, flow: &Flow, ct: &CtValue, b: &Backend4) -> i32 {
    count(if flow.frag == FRAG_LATER {
        Stat::FragTranslated
    } else {
        Stat::CtForward
    });
    if ct.flags & CT_F_HAIRPIN != 0
        && let Some(hp) = hairpin_addr()
    {
        return hairpin_forward(ctx, flow, b, hp);
    }
    dnat(ctx, flow, b)
}

/// The hairpin SNAT address, when userspace configured one.
#[inline(always)]
fn hairpin_addr() -> Option<[u8; 4]> {
    let a = *CONFIG.get(CONFIG_HAIRPIN_ADDR)?;
    if a == 0 { None } else { Some(a.to_ne_bytes()) }
}

/// A pod's packet to its own Service, for the pod itself: from the hairpin address to the pod's
/// backend port, straight back into the pod. Routing it through the host would meet strict
/// rp_filter (the hairpin address is not reachable through this veth).
#[inline(always)]
fn hairpin_forward(ctx: &mut TcContext, flow: &Flow, b: &Backend4, hp: [u8; 4]) -> i32 {
    let to_backend = Nat {
        addr_off: IP_DADDR_OFF,
        old_addr: flow.daddr,
        new_addr: b.addr,
        port_off: L4_DPORT_OFF,
        old_port: flow.dport,
        new_port: b.port,
    };
    let from_hairpin = Nat {
        addr_off: IP_SADDR_OFF,
        old_addr: flow.saddr,
        new_addr: hp,
        port_off: L4_SPORT_OFF,
        old_port: flow.sport,
        new_port: flow.sport,
    };
    if rewrite(ctx, flow, &to_backend).is_err() || rewrite(ctx, flow, &from_hairpin).is_err() {
        return TC_ACT_SHOT;
    }
    count(Stat::Hairpin);
    back_into_pod(ctx)
}

/// The pod's answer to a hairpin flow (`pod:backend port -> hairpin address`): from the
/// frontend, to the pod's own address, back into the pod.
#[inline(always)]
fn hairpin_reply(ctx: &mut TcContext, flow: &Flow) -> i32 {
    let key = flow.ct_key();
    let Some(entry) = CT4.get_ptr_mut(key) else {
        return NEXT;
    };
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let ct = unsafe { *entry };
    if ct.flags & (CT_F_REPLY | CT_F_HAIRPIN) != CT_F_REPLY | CT_F_HAIRPIN {
        return NEXT;
    }
    let Some(rev) = reply_revnat(&ct) else {
        count(Stat::CtStale);
        ct_remove_stale(&key, entry, &ct);
        return NEXT;
    };
    let state = flow.ct_state();
    ct_touch(entry, &ct, CT_F_REPLIED | state);
    let from_frontend = Nat {
        addr_off: IP_SADDR_OFF,
        old_addr: flow.saddr,
        new_addr: rev.addr,
        port_off: L4_SPORT_OFF,
        old_port: flow.sport,
        new_port: rev.port,
    };
    let to_pod = Nat {
        addr_off: IP_DADDR_OFF,
        old_addr: flow.daddr,
        new_addr: flow.saddr,
        port_off: L4_DPORT_OFF,
        old_port: flow.dport,
        new_port: flow.dport,
    };
    if rewrite(ctx, flow, &from_frontend).is_err() || rewrite(ctx, flow, &to_pod).is_err() {
        return TC_ACT_SHOT;
    }
    count(Stat::Hairpin);
    back_into_pod(ctx)
}

/// Send the packet back out the veth it came in on, into the pod, with the Ethernet addresses
/// swapped (from the host side, to the pod).
#[inline(always)]
fn back_into_pod(ctx: &mut TcContext) -> i32 {
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: bounds checked by ptr_at; no helper call since.
    unsafe {
        let macs = *eth;
        let mut i = 0;
        while i < 6 {
            (*eth)[i] = macs[6 + i];
            (*eth)[6 + i] = macs[i];
            i += 1;
        }
    }
    // SAFETY: reading this program's own skb context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; out this same veth, into the pod.
    unsafe { aya_ebpf::helpers::bpf_redirect(ifindex, 0) as i32 }
}

/// An IPv4 header without options and the first 20 bytes after it, with the header's own field
/// widths, so that an address is one 32-bit load instead of four byte loads and shifts. On x86
/// (`NET_IP_ALIGN` 0) the header is only 2-byte aligned, so the reference to it is formally
/// misaligned for Rust; the verifier and the JIT accept such packet loads where the kernel has
/// efficient unaligned access (x86, arm64), and elsewhere `NET_IP_ALIGN` aligns the header.
/// `read_unaligned` would bring the byte loads back.
#[repr(C)]
struct Ip4Head {
    ver_ihl: u8,
    _tos: u8,
    tot_len: u16,
    _id: u16,
    frag_off: u16,
    _ttl: u8,
    proto: u8,
    _check: u16,
    saddr: u32,
    daddr: u32,
    ports: u32,
    _seq: u32,
    _ack: u32,
    _doff: u8,
    tcp_flags: u8,
    _win: u16,
    _csum: u16,
    _urg: u16,
}

/// Most packets a pod sends go to no frontend: decided here, before the full parse, for the
/// plain case (IPv4 without options, not a fragment, TCP other than a SYN or UDP, the whole
/// header set linear and within the IP length, an address the frontend filter clears), which
/// the full path would pass with no other effect (`not_to_a_frontend` acts on SYNs only).
/// Anything else, including short packets, takes the full path.
#[inline(always)]
fn plainly_not_ours(ctx: &TcContext) -> bool {
    let Some(h) = plain_head(ctx, false) else {
        return false;
    };
    let (word, bit) = addr_bit(h.daddr.to_ne_bytes());
    VIPBITS.get(word).is_none_or(|w| *w & bit == 0)
}

/// Most packets into a pod are no reply of a translated flow: a reply comes from a backend's
/// address and port, whose bit in the backend filter was set before the backend was written
/// and stays set. Decided before the full parse for the plain case (as `plainly_not_ours`,
/// SYNs included: the full path only looks a reply entry up), which the full path would pass
/// after a conntrack miss.
#[inline(always)]
fn plainly_no_reply(ctx: &TcContext) -> bool {
    let Some(h) = plain_head(ctx, true) else {
        return false;
    };
    // The source port: the first two bytes of the L4 header, as the wire has them.
    let sport = (h.ports as u16).to_ne_bytes();
    let (word, bit) = backend_bit(h.saddr.to_ne_bytes(), sport);
    BACKBITS.get(word).is_none_or(|w| *w & bit == 0)
}

/// Whether `addr:port` (wire bytes) may be a backend's: its bit in the backend filter is set
/// before a backend is written and never cleared, so a reply entry (keyed by its backend's
/// address and port) can exist only where it is set.
#[inline(always)]
fn may_be_a_backend(addr: [u8; 4], port: [u8; 2]) -> bool {
    let (word, bit) = backend_bit(addr, port);
    BACKBITS.get(word).is_some_and(|w| *w & bit != 0)
}

/// The IPv4 and L4 headers of a plain packet (see `plainly_not_ours`); `syn_too`: TCP SYNs
/// count as plain.
#[inline(always)]
fn plain_head(ctx: &TcContext, syn_too: bool) -> Option<&Ip4Head> {
    let (Some(ethertype), Some(h)) = (ptr_at::<[u8; 2]>(ctx, 12), ptr_at::<Ip4Head>(ctx, ETH_HLEN))
    else {
        return None;
    };
    // SAFETY: bounds checked by ptr_at (both); the packet outlives this borrow of the context.
    let (ethertype, h) = unsafe { (*ethertype, &*h) };
    if u16::from_be_bytes(ethertype) != ETH_P_IP || h.ver_ihl != 0x45 {
        return None;
    }
    // Neither more fragments nor an offset.
    if u16::from_be(h.frag_off) & 0x3fff != 0 {
        return None;
    }
    let l4 = match h.proto {
        IPPROTO_TCP if syn_too || !is_tcp_syn(h.tcp_flags) => TCP_MIN_HLEN,
        IPPROTO_UDP => UDP_HLEN,
        _ => return None,
    };
    if (u16::from_be(h.tot_len) as usize) < IPV4_MIN_HLEN + l4 {
        return None;
    }
    Some(h)
}

/// A packet to no frontend passes untouched. A new connection straight to a pod may reuse the
/// tuple of an earlier one through a frontend (bootstrap through the ClusterIP, then dial the
/// pod): the reply entry left by that one would rewrite this connection's replies to the VIP.
#[inline(always)]
fn not_to_a_frontend(flow: &Flow, syn: bool) -> i32 {
    // Only a backend's address and port can have a reply entry: the SYNs pods send anywhere
    // else (most of them) neither look one up nor void the flow cache's copies of their slot.
    if syn && may_be_a_backend(flow.daddr, flow.dport) && ct_remove(&flow.reverse_ct_key()) {
        count(Stat::ReplyCleared);
    }
    NEXT
}

/// A new connection (TCP SYN) or datagram (UDP) to a frontend without usable endpoints gets ICMP
/// port unreachable from the frontend, as kube-proxy's REJECT rules answer, so the client sees
/// ECONNREFUSED at once instead of retrying into a void. Anything else (other TCP packets, later
/// fragments, headers with options) is dropped.
#[inline(always)]
fn reject(ctx: &mut TcContext, flow: &Flow, syn: bool) -> i32 {
    if flow.l4_off != ETH_HLEN + IPV4_MIN_HLEN {
        return TC_ACT_SHOT;
    }
    // The quote covers the L4 checksum field: a packet from a local socket is CHECKSUM_PARTIAL,
    // and the kernel refuses to cut it before that field. The whole TCP header is quoted (RFC
    // 1812 allows more than 8 bytes), the UDP header is 8 bytes anyway.
    match flow.proto {
        IPPROTO_TCP if syn => answer_unreachable::<TCP_MIN_HLEN>(ctx, flow),
        IPPROTO_UDP if flow.frag != FRAG_LATER => answer_unreachable::<UDP_HLEN>(ctx, flow),
        _ => TC_ACT_SHOT,
    }
}

/// Turn the packet into the ICMP port unreachable answering it and send it back out the veth it
/// came from, into the pod: room for the new IPv4 and ICMP headers made after Ethernet, cut
/// after the quoted IPv4 header and `L4` bytes of its L4 header, addresses swapped.
#[inline(always)]
fn answer_unreachable<const L4: usize>(ctx: &mut TcContext, flow: &Flow) -> i32 {
    let quote = IPV4_MIN_HLEN + L4;
    let icmp = ETH_HLEN + IPV4_MIN_HLEN;
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: bounds checked by ptr_at.
    let macs = unsafe { *eth };
    let skb = ctx.skb.skb;
    // SAFETY: helpers on this program's own skb; lengths are constants.
    // Cut first: that also ends GSO (a UDP_SEGMENT datagram), which adjust_room refuses.
    let resized = unsafe {
        aya_ebpf::helpers::bpf_skb_change_tail(skb, (ETH_HLEN + quote) as u32, 0) == 0
            && aya_ebpf::helpers::bpf_skb_adjust_room(
                skb,
                (IPV4_MIN_HLEN + ICMP_HLEN) as i32,
                BPF_ADJ_ROOM_MAC,
                0,
            ) == 0
    };
    if !resized {
        return TC_ACT_SHOT;
    }
    // Headers first (fixed size), then the ICMP message with its quote.
    let Some(hdr) = ptr_at::<[u8; ETH_HLEN + IPV4_MIN_HLEN]>(ctx, 0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: bounds checked just above; no helper call since.
    let hdr = unsafe { &mut *hdr };
    let mut i = 0;
    while i < 6 {
        hdr[i] = macs[6 + i];
        hdr[6 + i] = macs[i];
        i += 1;
    }
    let total = ((IPV4_MIN_HLEN + ICMP_HLEN + quote) as u16).to_be_bytes();
    let ip = [
        0x45,
        0,
        total[0],
        total[1],
        0,
        0,
        0,
        0,
        64,
        IPPROTO_ICMP,
        0,
        0,
        flow.daddr[0],
        flow.daddr[1],
        flow.daddr[2],
        flow.daddr[3],
        flow.saddr[0],
        flow.saddr[1],
        flow.saddr[2],
        flow.saddr[3],
    ];
    let check = csum(&ip);
    let mut i = 0;
    while i < IPV4_MIN_HLEN {
        hdr[ETH_HLEN + i] = ip[i];
        i += 1;
    }
    hdr[ETH_HLEN + IP_CSUM_OFF] = check[0];
    hdr[ETH_HLEN + IP_CSUM_OFF + 1] = check[1];
    let Some(msg) = ptr_at::<IcmpMessage<L4>>(ctx, icmp) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: bounds checked just above; no helper call since.
    let msg = unsafe { &mut *msg };
    msg.header = [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    let check = csum_pair(&msg.header, &msg.quote_ip, &msg.quote_l4);
    msg.header[ICMP_CSUM_OFF] = check[0];
    msg.header[ICMP_CSUM_OFF + 1] = check[1];
    count(Stat::Rejected);
    // SAFETY: reading this program's own skb context.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: plain helper call; out this same veth, into the pod.
    unsafe { aya_ebpf::helpers::bpf_redirect(ifindex, 0) as i32 }
}

/// An ICMP error message as [`answer_unreachable`] lays it out.
#[repr(C)]
struct IcmpMessage<const L4: usize> {
    header: [u8; ICMP_HLEN],
    quote_ip: [u8; IPV4_MIN_HLEN],
    quote_l4: [u8; L4],
}

/// The Internet checksum over three even-length pieces, as it goes in the packet.
#[inline(always)]
fn csum_pair(a: &[u8], b: &[u8], c: &[u8]) -> [u8; 2] {
    let sum = sum16(a) + sum16(b) + sum16(c);
    fold(sum)
}

#[inline(always)]
fn sum16(bytes: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// The Internet checksum (RFC 1071) of a short, even-length header, as it goes in the packet.
#[inline(always)]
fn csum(bytes: &[u8]) -> [u8; 2] {
    fold(sum16(bytes))
}

/// TC egress on the host side of a pod's veth: packets about to enter the pod.
#[classifier]
// The macro wraps this body in the entry point; inlined there, not a BPF-to-BPF call (a call
// and a return on every packet).
#[inline(always)]
pub fn vipx_pod_egress(mut ctx: TcContext) -> i32 {
    count(Stat::EgressPackets);
    if plainly_no_reply(&ctx) {
        return NEXT;
    }
    match parse_pulling(&ctx) {
        Parse::Flow(mut flow) => {
            if !flow.resolve_ports(FRAG_DIR_EGRESS) {
                return NEXT;
            }
            let key = flow.ct_key();
            let w = ct_key_words(&key);
            let (slot, generation) = flow_generation(w);
            let now = ct_now();
            let add = CT_F_REPLIED | flow.ct_state();
            let stat = if flow.frag == FRAG_LATER {
                Stat::FragTranslated
            } else {
                Stat::CtReply
            };
            // This CPU's copy of the reply entry, validated as the entry is below.
            if let Some(ct) = flow_cached(slot, generation, w, now, add)
                && let Some(rev) = reply_revnat(&ct)
            {
                count(Stat::FlowCacheHit);
                count(stat);
                return snat_reply(&mut ctx, &flow, &rev);
            }
            let Some(entry) = CT4.get_ptr_mut(key) else {
                return NEXT;
            };
            // SAFETY: value pointer from a successful lookup; copied out at once.
            let ct = unsafe { *entry };
            if ct.flags & CT_F_REPLY == 0 {
                return NEXT;
            }
            let Some(rev) = reply_revnat(&ct) else {
                // Its frontend is gone or the id names another one now.
                count(Stat::CtStale);
                ct_remove_stale(&key, entry, &ct);
                return NEXT;
            };
            flow_touch(entry, &ct, add, now, (slot, generation, w));
            count(stat);
            snat_reply(&mut ctx, &flow, &rev)
        }
        Parse::Icmp(err) => icmp_reply(&mut ctx, &err),
        Parse::Other | Parse::Malformed => NEXT,
    }
}

/// An ICMP error about a translated flow, on its way to the client: the quoted packet is the
/// client's, as the backend (or a router before it) saw it, `client -> backend`. Restore the
/// frontend in the quote and, when the backend itself sent the error, in the outer source.
/// So PMTU discovery and ECONNREFUSED work through a Service.
#[inline(always)]
fn icmp_reply(ctx: &mut TcContext, err: &IcmpError) -> i32 {
    let Some(ct) = quoted_flow_entry(err) else {
        return NEXT;
    };
    let Some(rev) = reply_revnat(&ct) else {
        return NEXT;
    };
    let quoted = Quoted {
        addr_off: IP_DADDR_OFF,
        port_off: L4_DPORT_OFF,
        old_addr: err.inner_daddr,
        old_port: err.inner_dport,
    };
    icmp_translate(ctx, err, &quoted, rev.addr, rev.port, IP_SADDR_OFF)
}

/// The conntrack entry of the packet an ICMP error quotes, seen from the other direction: the
/// quote is what its receiver saw, so the entry the program holds is keyed the other way round.
#[inline(always)]
fn quoted_flow_entry(err: &IcmpError) -> Option<CtValue> {
    let key = CtKey4 {
        saddr: err.inner_daddr,
        daddr: err.inner_saddr,
        sport: err.inner_dport,
        dport: err.inner_sport,
        proto: err.inner_proto,
        _pad: 0,
        _pad2: 0,
    };
    // SAFETY: value pointer from a successful lookup; copied out at once.
    CT4.get_ptr(key).map(|ct| unsafe { *ct })
}

/// An ICMP error from a client about a reply it got from a frontend (say, its socket closed
/// before the answer came): the quote is `frontend -> client`. It goes to the backend, quoting
/// the packet the backend really sent.
#[inline(always)]
fn icmp_forward(ctx: &mut TcContext, err: &IcmpError) -> i32 {
    let Some(ct) = quoted_flow_entry(err) else {
        return NEXT;
    };
    if ct.flags & CT_F_FORWARD == 0 {
        return NEXT;
    }
    let b = match backend(ct.backend_id) {
        Some(b) if b.generation == ct.backend_gen => b,
        _ => return NEXT,
    };
    let quoted = Quoted {
        addr_off: IP_SADDR_OFF,
        port_off: L4_SPORT_OFF,
        old_addr: err.inner_saddr,
        old_port: err.inner_sport,
    };
    icmp_translate(ctx, err, &quoted, b.addr, b.port, IP_DADDR_OFF)
}

/// Which end of the quoted packet an ICMP translation rewrites.
struct Quoted {
    addr_off: usize,
    port_off: usize,
    old_addr: [u8; 4],
    old_port: [u8; 2],
}

/// Rewrite one end of the packet an ICMP error quotes (address, port, the quote's IP and L4
/// checksums) and the outer address at `outer_off` when it is that same end, fixing the ICMP
/// checksum, which covers the quote (ICMP is never CHECKSUM_PARTIAL, so it is written directly).
#[inline(always)]
fn icmp_translate(
    ctx: &mut TcContext,
    err: &IcmpError,
    q: &Quoted,
    new_addr: [u8; 4],
    new_port: [u8; 2],
    outer_off: usize,
) -> i32 {
    let Some(ip) = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN) else {
        return NEXT;
    };
    let Some(icmp) = ptr_at::<[u8; ICMP_HLEN]>(ctx, err.l4_off) else {
        return NEXT;
    };
    let Some(inner) = ptr_at::<[u8; IPV4_MIN_HLEN + ICMP_QUOTED_L4]>(ctx, err.inner_off) else {
        return NEXT;
    };
    let l4 = IPV4_MIN_HLEN;
    let l4_csum = if err.inner_proto == IPPROTO_TCP {
        TCP_CSUM_OFF
    } else {
        UDP_CSUM_OFF
    };
    // The quoted L4 checksum is only there when the quote is long enough (always for UDP).
    let quoted_csum = ptr_at::<[u8; 2]>(ctx, err.inner_off + l4 + l4_csum);
    // SAFETY: every pointer was bounds-checked just above and no helper has run since.
    unsafe {
        let mut icmp_check = [(*icmp)[ICMP_CSUM_OFF], (*icmp)[ICMP_CSUM_OFF + 1]];
        if let Some(c) = quoted_csum {
            let old = *c;
            if !(err.inner_proto == IPPROTO_UDP && old == [0, 0]) {
                let mut new = csum_replace4(old, q.old_addr, new_addr);
                new = csum_replace2(new, q.old_port, new_port);
                if err.inner_proto == IPPROTO_UDP && new == [0, 0] {
                    new = [0xff, 0xff];
                }
                *c = new;
                icmp_check = csum_replace2(icmp_check, old, new);
            }
        }
        let old_inner_check = [(*inner)[IP_CSUM_OFF], (*inner)[IP_CSUM_OFF + 1]];
        let new_inner_check = csum_replace4(old_inner_check, q.old_addr, new_addr);
        (*inner)[IP_CSUM_OFF] = new_inner_check[0];
        (*inner)[IP_CSUM_OFF + 1] = new_inner_check[1];
        (*inner)[q.addr_off] = new_addr[0];
        (*inner)[q.addr_off + 1] = new_addr[1];
        (*inner)[q.addr_off + 2] = new_addr[2];
        (*inner)[q.addr_off + 3] = new_addr[3];
        (*inner)[l4 + q.port_off] = new_port[0];
        (*inner)[l4 + q.port_off + 1] = new_port[1];
        icmp_check = csum_replace2(icmp_check, old_inner_check, new_inner_check);
        icmp_check = csum_replace4(icmp_check, q.old_addr, new_addr);
        icmp_check = csum_replace2(icmp_check, q.old_port, new_port);
        (*icmp)[ICMP_CSUM_OFF] = icmp_check[0];
        (*icmp)[ICMP_CSUM_OFF + 1] = icmp_check[1];
        // The outer address is the quoted end's only when that end itself is involved (the
        // backend sent the error, or the client addressed it to the frontend); a router's
        // own address on the way stays.
        let outer = [
            (*ip)[outer_off],
            (*ip)[outer_off + 1],
            (*ip)[outer_off + 2],
            (*ip)[outer_off + 3],
        ];
        if outer == q.old_addr {
            let check = csum_replace4(
                [(*ip)[IP_CSUM_OFF], (*ip)[IP_CSUM_OFF + 1]],
                q.old_addr,
                new_addr,
            );
            (*ip)[IP_CSUM_OFF] = check[0];
            (*ip)[IP_CSUM_OFF + 1] = check[1];
            (*ip)[outer_off] = new_addr[0];
            (*ip)[outer_off + 1] = new_addr[1];
            (*ip)[outer_off + 2] = new_addr[2];
            (*ip)[outer_off + 3] = new_addr[3];
        }
    }
    count(Stat::IcmpTranslated);
    NEXT
}

/// The floor: the cheapest program that still touches a map.
#[xdp]
pub fn vipx_floor(_ctx: XdpContext) -> u32 {
    if let Some(v) = FLOOR.get_ptr_mut(0) {
        // SAFETY: array slot pointer from a successful lookup.
        unsafe { *v += 1 };
    }
    xdp_action::XDP_PASS
}

/// Jiffies into `CONFIG` for userspace, which scales them into the conntrack clock (see
/// `CONFIG_CLOCK_MULT`). Run once through `BPF_PROG_TEST_RUN`, never attached.
#[xdp]
pub fn vipx_clock(_ctx: XdpContext) -> u32 {
    // SAFETY: plain helper call.
    let j = unsafe { aya_ebpf::helpers::bpf_jiffies64() };
    for (i, half) in [
        (CONFIG_JIFFIES_LO, j as u32),
        (CONFIG_JIFFIES_HI, (j >> 32) as u32),
    ] {
        if let Some(v) = CONFIG.get_ptr_mut(i) {
            // SAFETY: array slot pointer from a successful lookup.
            unsafe { *v = half };
        }
    }
    xdp_action::XDP_PASS
}

/// The same floor at the TC hook: separates the cost of the hook (skb context) from vipx's work.
#[classifier]
pub fn vipx_floor_tc(_ctx: TcContext) -> i32 {
    if let Some(v) = FLOOR.get_ptr_mut(0) {
        // SAFETY: array slot pointer from a successful lookup.
        unsafe { *v += 1 };
    }
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
