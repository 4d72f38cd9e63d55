//! vipx kernel programs. The entry points stay thin; `pod_ingress` reads top to bottom:
//! parse -> conntrack -> service lookup and backend choice -> rewrite -> verdict.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    Backend4, CT_F_FORWARD, CT_F_REPLY, CtKey4, CtValue, IPPROTO_TCP, IPPROTO_UDP, REVNAT_F_ACTIVE,
    RevNat4, SCOPE_EXTERNAL, STATS_LEN, Stat, SvcKey4, SvcValue, defaults,
};
use vipx_ebpf::{
    ETH_HLEN, ETH_P_IP, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IPV4_MIN_HLEN, L4_DPORT_OFF,
    L4_SPORT_OFF, TCP_CSUM_OFF, TCP_FLAGS_OFF, TCP_MIN_HLEN, UDP_CSUM_OFF, UDP_HLEN, csum_replace4,
    flow_hash, ipv4_header_len, is_fragment, is_tcp_syn, pick_slot,
};

// Sizes here are defaults; userspace sets the real ones with `EbpfLoader::set_max_entries`.
// Pinned by name so a restarted vipx finds its services and, above all, its flows.
#[map(name = "VIPX_SVC4")]
static SVC4: HashMap<SvcKey4, SvcValue> = HashMap::pinned(defaults::SVC4_ENTRIES, 0);

#[map(name = "VIPX_BACKEND4")]
static BACKEND4: Array<Backend4> = Array::pinned(defaults::BACKEND4_ENTRIES, 0);

#[map(name = "VIPX_REVNAT4")]
static REVNAT4: Array<RevNat4> = Array::pinned(defaults::REVNAT4_ENTRIES, 0);

#[map(name = "VIPX_CT4")]
// A common LRU: BPF_F_NO_COMMON_LRU (per-CPU lists) measured slower for new flows here
// (660 vs 460 ns/SYN), its smaller per-CPU free lists evicting more often.
static CT4: LruHashMap<CtKey4, CtValue> = LruHashMap::pinned(defaults::CT4_ENTRIES, 0);

#[map(name = "VIPX_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

#[map(name = "VIPX_FLOOR")]
static FLOOR: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
fn count(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}

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
            _pad: [0; 3],
        }
    }
}

enum Parse {
    Flow(Flow),
    /// Not something vipx translates (not IPv4 TCP/UDP, or a fragment).
    Other,
    /// Headers cut short or inconsistent.
    Malformed,
}

/// Bounds-checked pointer into the linear packet data.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
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
    if is_fragment([ip[6], ip[7]]) {
        return Parse::Other;
    }
    let proto = ip[9];
    let (l4_len, csum) = match proto {
        IPPROTO_TCP => (TCP_MIN_HLEN, TCP_CSUM_OFF),
        IPPROTO_UDP => (UDP_HLEN, UDP_CSUM_OFF),
        _ => return Parse::Other,
    };
    if total_len < ihl + l4_len {
        return Parse::Malformed;
    }
    let l4_off = ETH_HLEN + ihl;
    // Checked against both the linear data and the IP total length: a packet whose IP header
    // claims less than a full L4 header is never rewritten.
    let Some(l4) = ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off) else {
        return Parse::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let (sport, dport) = unsafe { ([(*l4)[0], (*l4)[1]], [(*l4)[2], (*l4)[3]]) };
    let tcp_flags = if proto == IPPROTO_TCP {
        let Some(tcp) = ptr_at::<[u8; TCP_MIN_HLEN]>(ctx, l4_off) else {
            return Parse::Malformed;
        };
        // SAFETY: bounds checked by ptr_at.
        unsafe { (*tcp)[TCP_FLAGS_OFF] }
    } else {
        0
    };
    Parse::Flow(Flow {
        l4_off,
        csum_off: l4_off + csum,
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport,
        dport,
        proto,
        tcp_flags,
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
        p => p,
    }
}

/// The one place that owns checksum rules: rewrite an address and a port of a TCP/UDP packet,
/// fixing the IPv4 header checksum and the L4 checksum (including the pseudo-header; a UDP
/// checksum of 0 means "none" and stays 0).
///
/// The IPv4 header checksum is always complete, so the address, the port and that checksum are
/// written directly. The L4 checksum goes through `bpf_l4_csum_replace`: only the kernel knows
/// whether the skb is CHECKSUM_PARTIAL (local senders on veth), where the field holds just the
/// pseudo-header sum and a port change must not touch it.
#[inline(always)]
fn rewrite(
    ctx: &mut TcContext,
    flow: &Flow,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> Result<(), i64> {
    let ip = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN).ok_or(-1i64)? as *mut [u8; IPV4_MIN_HLEN];
    let ports = ptr_at::<[u8; 4]>(ctx, flow.l4_off).ok_or(-1i64)? as *mut [u8; 4];
    // SAFETY: both pointers were bounds-checked just above, after the last helper call that
    // could have moved packet data; TC programs may write packet data directly.
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
        (*ports)[port_off] = new_port[0];
        (*ports)[port_off + 1] = new_port[1];
    }
    let mangled0 = if flow.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
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
    match rewrite(
        ctx,
        flow,
        IP_DADDR_OFF,
        flow.daddr,
        backend.addr,
        L4_DPORT_OFF,
        flow.dport,
        backend.port,
    ) {
        Ok(()) => TC_ACT_OK,
        // A half-rewritten packet must not leave: its checksums may no longer match.
        Err(_) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn snat_reply(ctx: &mut TcContext, flow: &Flow, rev: &RevNat4) -> i32 {
    match rewrite(
        ctx,
        flow,
        IP_SADDR_OFF,
        flow.saddr,
        rev.addr,
        L4_SPORT_OFF,
        flow.sport,
        rev.port,
    ) {
        Ok(()) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn backend(id: u32) -> Option<Backend4> {
    match BACKEND4.get(id) {
        Some(b) if b.is_active() => Some(*b),
        _ => None,
    }
}

/// TC ingress on the host side of a pod's veth.
#[classifier]
pub fn vipx_pod_ingress(mut ctx: TcContext) -> i32 {
    count(Stat::Packets);
    let flow = match parse_pulling(&ctx) {
        Parse::Flow(f) => f,
        Parse::Other => {
            count(Stat::NotHandled);
            return TC_ACT_OK;
        }
        Parse::Malformed => {
            count(Stat::Malformed);
            return TC_ACT_OK;
        }
    };

    // Established flows, either direction: one lookup. A SYN always selects afresh (as in
    // Katran): the hash is deterministic, so a retransmitted SYN lands on the same backend, and a
    // new connection reusing a port is balanced over the current backends.
    let ct_key = flow.ct_key();
    let syn = flow.proto == IPPROTO_TCP && is_tcp_syn(flow.tcp_flags);
    if let Some(ct) = if syn { None } else { CT4.get_ptr(&ct_key) } {
        // SAFETY: value pointer from a successful lookup; copied out at once.
        let ct = unsafe { *ct };
        if ct.flags & CT_F_REPLY != 0 {
            if let Some(rev) = REVNAT4.get(ct.rev_nat_id) {
                if rev.flags & REVNAT_F_ACTIVE != 0 {
                    count(Stat::CtReply);
                    let rev = *rev;
                    return snat_reply(&mut ctx, &flow, &rev);
                }
            }
            return TC_ACT_OK;
        }
        if let Some(b) = backend(ct.backend_id) {
            count(Stat::CtForward);
            return dnat(&mut ctx, &flow, &b);
        }
        // The backend went away: fall through and pick a live one.
        count(Stat::BackendGone);
    }

    // A new flow, if it is addressed to a frontend.
    let svc_key = SvcKey4::from_wire(flow.daddr, flow.dport, flow.proto, SCOPE_EXTERNAL, 0);
    let Some(svc) = SVC4.get_ptr(&svc_key) else {
        return TC_ACT_OK;
    };
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let svc = unsafe { *svc };
    if svc.count == 0 {
        count(Stat::NoBackend);
        return TC_ACT_SHOT;
    }
    if flow.proto == IPPROTO_TCP && !syn {
        count(Stat::CtMissNonSyn);
    }
    let hash = flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    let slot = svc_key.with_slot(pick_slot(hash, svc.count));
    let Some(slot) = SVC4.get_ptr(&slot) else {
        count(Stat::NoBackend);
        return TC_ACT_SHOT;
    };
    // SAFETY: value pointer from a successful lookup.
    let backend_id = unsafe { (*slot).backend_id };
    let Some(b) = backend(backend_id) else {
        count(Stat::NoBackend);
        return TC_ACT_SHOT;
    };

    let fwd = CtValue {
        backend_id,
        backend_gen: b.generation,
        rev_nat_id: svc.rev_nat_id,
        rev_nat_gen: 0,
        flags: CT_F_FORWARD,
    };
    let reply_key = CtKey4 {
        saddr: b.addr,
        daddr: flow.saddr,
        sport: b.port,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let reply = CtValue {
        flags: CT_F_REPLY,
        ..fwd
    };
    // Reply entry first: once the forward entry exists, the backend may answer at once.
    if CT4.insert(&reply_key, &reply, 0).is_err() || CT4.insert(&ct_key, &fwd, 0).is_err() {
        count(Stat::CtInsertFailed);
    }
    count(Stat::NewFlows);
    dnat(&mut ctx, &flow, &b)
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
