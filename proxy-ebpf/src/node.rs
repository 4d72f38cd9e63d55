//! External traffic: node ports, LoadBalancer and external IPs for clients outside the cluster,
//! in XDP on the node's interfaces (`vipx_node_xdp`). It reads top to bottom:
//! parse -> a reply of a flow this node sent to another node? (a port of the SNAT range) ->
//! frontend (address map, then service map) -> conntrack or backend choice -> rewrite -> verdict.
//!
//! - A backend on this node: DNAT only, and the packet goes up the stack to the pod (the client's
//!   address is kept). The pod's answer leaves through this interface, where the pod program's
//!   reverse NAT (`vipx_pod_egress`, attached on its egress too) restores the frontend.
//! - A backend on another node (externalTrafficPolicy Cluster): DNAT and SNAT to this node's
//!   address (the one the kernel's route to the backend selects) with a port of
//!   `SNAT_PORT_MIN..=SNAT_PORT_MAX`, and the packet goes straight back out (`XDP_TX`, or a
//!   redirect when the route leaves through another interface) with the next hop's MAC from the
//!   kernel's FIB. The backend answers this node on that port; the answer is translated back to
//!   the client here and sent out the same way. Neither direction enters this node's stack.
//! - A next hop without a neighbour entry: the packet is dropped and the next hop recorded
//!   (`NEIGHMISS4`) for userspace to have the kernel resolve it; the client's retransmission
//!   finds it resolved.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect},
    macros::{classifier, map, xdp},
    maps::{Array, LpmTrie, LruHashMap, lpm_trie::Key as LpmKey},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    BACKEND_F_LOCAL, Backend4, CT_F_FIN, CT_F_FORWARD, CT_F_NODE, CT_F_POD, CT_F_REPLIED,
    CT_F_REPLY, CT_F_RST, CT_F_SNAT, CtKey4, CtValue, IPPROTO_TCP, IPPROTO_UDP, PORTS_WORDS,
    PROTO_EXTERNAL_VIEW, REVNAT_F_SOURCE_RANGES, SCOPE_EXTERNAL, SNAT_PORT_MAX, SNAT_PORT_MIN,
    SVC_F_AFFINITY, SVC_F_EXTERNAL_VIEW, SVC_F_MAGLEV, SVC_F_NODE_PORT, SVC_F_REJECT,
    SVC_F_SOURCE_RANGES, SnatValue4, Stat, SvcKey4, SvcValue, defaults, port_bit, skb_csum,
};
use vipx_ebpf::{
    ETH_HLEN, ETH_P_IP, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IPV4_MIN_HLEN, L4_DPORT_OFF,
    L4_SPORT_OFF, TCP_CSUM_OFF, TCP_FLAGS_OFF, TCP_MIN_HLEN, UDP_CSUM_OFF, UDP_HLEN, csum_replace2,
    csum_replace2_raw, csum_replace4_raw, ct_state_of_tcp, flow_hash, ipv4_header_len, is_fragment,
    is_tcp_close, is_tcp_syn, l4_csum_after_nat, pick_slot,
};

use crate::{
    CT4, REVNAT4, SVC4, affine, backend, count, ct_insert_new, ct_now, ct_put, ct_touch,
    flood_allows, flood_credit, forward_revnat, ip_summed, maglev_pick, remember_affinity,
    reply_revnat, slot_backend,
};

/// Pinned with conntrack: a restart keeps the translations of flows to other nodes.
#[map(name = "VIPX_SNAT4")]
static SNAT4: LruHashMap<CtKey4, SnatValue4> = LruHashMap::pinned(defaults::CT4_ENTRIES, 0);

/// `loadBalancerSourceRanges`: key data is the frontend's reverse-NAT id (big-endian, so the
/// prefix covers it first) and the source address; the prefix length is 32 + the range's.
#[map(name = "VIPX_SRCRANGE4")]
static SRCRANGE4: LpmTrie<[u8; 8], u8> = LpmTrie::pinned(defaults::SRCRANGE4_ENTRIES, 0);

/// Pinned: a node program a restart left attached (its interfaces not rescanned yet) keeps
/// seeing the frontends userspace writes. Written whole at every start.
#[map(name = "VIPX_PORTS")]
static PORTS: Array<u64> = Array::pinned(PORTS_WORDS, 0);

#[map(name = "VIPX_NEIGHMISS4")]
static NEIGHMISS4: LruHashMap<[u8; 4], u32> =
    LruHashMap::with_max_entries(defaults::NEIGHMISS4_ENTRIES, 0);

/// The IPv4 header's TTL (the protocol follows it).
const IP_TTL_OFF: usize = 8;

/// SNAT ports tried for one new flow before it is dropped: with the range a fraction f busy, a
/// new flow fails with probability f^32 (0.1% at f = 0.8), where 8 tries gave 17%.
const SNAT_TRIES: u32 = 32;
const AF_INET: u8 = 2;

/// The headers the node program needs, copied out of the packet. Addresses and ports are
/// their bytes as on the wire read as native integers ("raw"): one register each, stored into
/// a key in one instruction, where byte arrays are taken apart and put together byte by byte.
struct Pkt {
    l4_off: usize,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
}

impl Pkt {
    #[inline(always)]
    fn ct_key(&self) -> CtKey4 {
        CtKey4 {
            saddr: self.saddr.to_ne_bytes(),
            daddr: self.daddr.to_ne_bytes(),
            sport: self.sport.to_ne_bytes(),
            dport: self.dport.to_ne_bytes(),
            proto: self.proto,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// The key of a local backend's answers to this client (no SNAT: they go straight back).
    #[inline(always)]
    fn reply_key_from(&self, b: &Backend4) -> CtKey4 {
        CtKey4 {
            saddr: b.addr,
            daddr: self.saddr.to_ne_bytes(),
            sport: b.port,
            dport: self.sport.to_ne_bytes(),
            proto: self.proto,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// The client's side of the flow, as `SNAT4` keeps it under a reply key.
    #[inline(always)]
    fn client(&self) -> SnatValue4 {
        SnatValue4 {
            addr: self.saddr.to_ne_bytes(),
            port: self.sport.to_ne_bytes(),
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    fn ct_state(&self) -> u32 {
        if self.proto == IPPROTO_TCP {
            ct_state_of_tcp(self.tcp_flags)
        } else {
            0
        }
    }
}

/// A rewrite of both endpoints of a packet (what is unchanged is given as it was), raw as in
/// [`Pkt`].
struct Nat {
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
}

impl Nat {
    /// To `addr`:`port` from `from`:`from_port`, both as map values hold them.
    #[inline(always)]
    fn of(from: [u8; 4], from_port: [u8; 2], to: [u8; 4], to_port: [u8; 2]) -> Self {
        Self {
            saddr: u32::from_ne_bytes(from),
            sport: u16::from_ne_bytes(from_port),
            daddr: u32::from_ne_bytes(to),
            dport: u16::from_ne_bytes(to_port),
        }
    }
}

/// The interface the packet came in on.
#[inline(always)]
fn ingress<C: Frame>(ctx: &C) -> u32 {
    ctx.ingress()
}

/// What the pipeline decided; the hook carries it out.
#[derive(Clone, Copy)]
enum Act {
    /// On to the stack (what is not ours, or DNATed to a pod on this node).
    Pass,
    Drop,
    /// Back out of the interface it came in on.
    Tx,
    /// Out of another interface.
    Redirect(u32),
}

/// The packet under a hook: XDP, or TC ingress where native XDP cannot attach. Both give
/// direct access to the frame from its Ethernet header; they differ in how a rewrite keeps the
/// L4 checksum right.
trait Frame: EbpfContext {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn ingress(&self) -> u32;
    /// Write `nat`'s addresses and ports, with the IPv4 and L4 checksums updated.
    fn write_nat(&self, p: &Pkt, nat: &Nat) -> Option<()>;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn ingress(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn write_nat(&self, p: &Pkt, nat: &Nat) -> Option<()> {
        write_nat_finished(self, p, nat)
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn ingress(&self) -> u32 {
        // SAFETY: the hook's own context, readable in a TC program.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    /// The IPv4 header's sum is always whole: updated in place. So is the L4 sum where the
    /// program knows how the skb carries it (`ip_summed`, as the pod programs' `rewrite`): whole,
    /// or a partial sum (the pseudo header only) that takes the address changes and not the
    /// port changes. Otherwise the kernel's helper does it, which also adjusts `skb->csum` of a
    /// complete one. A UDP sum of 0 stays 0.
    #[inline(always)]
    fn write_nat(&self, p: &Pkt, nat: &Nat) -> Option<()> {
        let summed = ip_summed(self);
        let ip = ptr_at::<[u8; IPV4_MIN_HLEN]>(self, ETH_HLEN)?;
        let ports = ptr_at::<[u8; 4]>(self, p.l4_off)?;
        // SAFETY: bounds checked by ptr_at after the last helper call that could move packet
        // data; TC programs may write packet data directly.
        unsafe {
            let ip = &mut *ip;
            let ports = &mut *ports;
            let mut ip_csum = u16::from_ne_bytes([ip[IP_CSUM_OFF], ip[IP_CSUM_OFF + 1]]);
            ip_csum = csum_replace4_raw(ip_csum, p.saddr, nat.saddr);
            ip_csum = csum_replace4_raw(ip_csum, p.daddr, nat.daddr);
            ip[IP_SADDR_OFF..IP_SADDR_OFF + 4].copy_from_slice(&nat.saddr.to_ne_bytes());
            ip[IP_DADDR_OFF..IP_DADDR_OFF + 4].copy_from_slice(&nat.daddr.to_ne_bytes());
            ip[IP_CSUM_OFF..IP_CSUM_OFF + 2].copy_from_slice(&ip_csum.to_ne_bytes());
            ports[L4_SPORT_OFF..L4_SPORT_OFF + 2].copy_from_slice(&nat.sport.to_ne_bytes());
            ports[L4_DPORT_OFF..L4_DPORT_OFF + 2].copy_from_slice(&nat.dport.to_ne_bytes());
        }
        let (csum_off, mangled0) = if p.proto == IPPROTO_TCP {
            (p.l4_off + TCP_CSUM_OFF, 0)
        } else {
            (p.l4_off + UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0 as u64)
        };
        let partial = summed == skb_csum::CHECKSUM_PARTIAL;
        if partial || summed == skb_csum::CHECKSUM_NONE || summed == skb_csum::CHECKSUM_UNNECESSARY
        {
            let sum = ptr_at::<[u8; 2]>(self, csum_off)?;
            let udp = p.proto == IPPROTO_UDP;
            // SAFETY: as above.
            unsafe {
                let c = l4_csum_after_nat(
                    u16::from_ne_bytes(*sum),
                    (p.saddr, nat.saddr),
                    (p.sport, nat.sport),
                    partial,
                    udp,
                );
                let c =
                    l4_csum_after_nat(c, (p.daddr, nat.daddr), (p.dport, nat.dport), partial, udp);
                *sum = c.to_ne_bytes();
            }
            return Some(());
        }
        let addr = |from: u32, to: u32| {
            self.l4_csum_replace(
                csum_off,
                u64::from(from),
                u64::from(to),
                BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
            )
        };
        let port = |from: u16, to: u16| {
            self.l4_csum_replace(csum_off, u64::from(from), u64::from(to), mangled0 | 2)
        };
        // A helper call each, so only for what changes (a DNAT keeps the source).
        if p.saddr != nat.saddr {
            addr(p.saddr, nat.saddr).ok()?;
        }
        if p.daddr != nat.daddr {
            addr(p.daddr, nat.daddr).ok()?;
        }
        if p.sport != nat.sport {
            port(p.sport, nat.sport).ok()?;
        }
        if p.dport != nat.dport {
            port(p.dport, nat.dport).ok()?;
        }
        Some(())
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &impl Frame, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// IPv4 TCP/UDP, not a fragment, with its L4 header whole; anything else is not for this program.
#[inline(always)]
fn parse<C: Frame>(ctx: &C) -> Option<Pkt> {
    let ethertype = ptr_at::<[u8; 2]>(ctx, 12)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be_bytes(unsafe { *ethertype }) != ETH_P_IP {
        return None;
    }
    let ip = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = ipv4_header_len(ip[0])?;
    let proto = ip[9];
    if is_fragment([ip[6], ip[7]]) || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    let l4_off = ETH_HLEN + ihl;
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        let tcp = ptr_at::<[u8; TCP_MIN_HLEN]>(ctx, l4_off)?;
        // SAFETY: bounds checked by ptr_at.
        tcp_flags = unsafe { (*tcp)[TCP_FLAGS_OFF] };
    } else {
        ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off)?;
    }
    let ports = ptr_at::<[u8; 4]>(ctx, l4_off)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { *ports };
    Some(Pkt {
        l4_off,
        saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
    })
}

#[xdp]
pub fn vipx_node_xdp(ctx: XdpContext) -> u32 {
    match node(&ctx) {
        Act::Pass => xdp_action::XDP_PASS,
        Act::Drop => xdp_action::XDP_DROP,
        Act::Tx => xdp_action::XDP_TX,
        // SAFETY: plain helper call.
        Act::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
    }
}

/// The same work at TC ingress, for interfaces where native XDP cannot attach: the kernel's
/// checksum helpers keep partial (`CHECKSUM_PARTIAL`) and complete (`CHECKSUM_COMPLETE`) sums
/// right, which generic XDP cannot. "Back out" is a redirect to the interface's own egress.
#[classifier]
pub fn vipx_node_tc(ctx: TcContext) -> i32 {
    // SAFETY: the hook's own context, readable in a TC program.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        // The kernel took the 802.1Q tag off before TC: this packet belongs to a VLAN device
        // (XDP saw the tag and passed it); its own interface serves it.
        return TC_ACT_UNSPEC;
    }
    // IPv4 headers beyond the linear part (GRO, some drivers): pulled in, and only those (a
    // pull may copy the packet).
    let want = ETH_HLEN + 60 + TCP_MIN_HLEN;
    let linear = ctx.data_end() - ctx.data();
    if linear < want
        && (ctx.len() as usize) > linear
        // SAFETY: bounds checked by ptr_at.
        && ptr_at::<[u8; 2]>(&ctx, 12).is_some_and(|t| u16::from_be_bytes(unsafe { *t }) == ETH_P_IP)
    {
        let _ = ctx.pull_data(want.min(ctx.len() as usize) as u32);
    }
    match node(&ctx) {
        Act::Pass => TC_ACT_UNSPEC,
        Act::Drop => TC_ACT_SHOT,
        // SAFETY: plain helper calls; redirecting to a device's egress from its ingress.
        Act::Tx => unsafe { bpf_redirect(Frame::ingress(&ctx), 0) as i32 },
        Act::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
    }
}

/// The node pipeline, whichever hook runs it.
#[inline(always)]
fn node<C: Frame>(ctx: &C) -> Act {
    count(Stat::NodePackets);
    let Some(p) = parse(ctx) else {
        return Act::Pass;
    };
    // An answer to a flow this node sent to another node's backend: back to its client.
    let dport = u16::from_be(p.dport);
    if (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&dport)
        && let Some(verdict) = snat_reply(ctx, &p)
    {
        return verdict;
    }
    // A port no frontend uses: not ours, decided without a hash lookup.
    if !frontend_port(dport) {
        return Act::Pass;
    }
    let syn = p.proto == IPPROTO_TCP && is_tcp_syn(p.tcp_flags);
    let ct_key = p.ct_key();
    // Established flows first, by their conntrack entry alone (one lookup): the entry is
    // checked against the frontend it was made for through its reverse-NAT entry, which
    // names the frontend's address and port and lives as long as the frontend (and its
    // drain). A SYN selects afresh (deterministically: a retransmission lands on the same
    // backend).
    if !syn && let Some(verdict) = established(ctx, &p, ct_key) {
        return verdict;
    }
    // The service map directly, not the address map first as the pod program does: from
    // outside, the address map's extra answers (a ClusterIP's unserved port, the hairpin
    // address) do not apply, and one lookup is cheaper than two for every frontend packet.
    let mut svc_key = SvcKey4::from_wire(
        p.daddr.to_ne_bytes(),
        p.dport.to_ne_bytes(),
        p.proto,
        SCOPE_EXTERNAL,
        0,
    );
    let Some(svc) = SVC4.get_ptr(svc_key) else {
        // Not a port of a frontend on this address: the stack answers as it would.
        return Act::Pass;
    };
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let mut svc = unsafe { *svc };
    if svc.flags & SVC_F_EXTERNAL_VIEW != 0 {
        // externalTrafficPolicy Local: this node's endpoints only, from their own view.
        svc_key.proto |= PROTO_EXTERNAL_VIEW;
        let Some(view) = SVC4.get_ptr(svc_key) else {
            count(Stat::NoBackend);
            return Act::Drop;
        };
        // SAFETY: value pointer from a successful lookup; copied out at once.
        svc = unsafe { *view };
    }
    if svc.flags & SVC_F_SOURCE_RANGES != 0
        && !source_allowed(svc.rev_nat_id, p.saddr.to_ne_bytes())
    {
        count(Stat::SourceRangeDropped);
        return Act::Drop;
    }
    new_flow(ctx, &p, svc_key, &svc, ct_key)
}

/// The client's first FIN or RST on a flow this packet is translated as (just before its entry
/// records it, so a retransmitted one, or one that leaves the flow to select afresh, gives
/// nothing back twice): see `flood_credit`.
#[inline(always)]
fn closed_by_client(p: &Pkt, ct: &CtValue, reply: &CtKey4) {
    let state = p.ct_state();
    if state != 0 && ct.flags & (CT_F_FIN | CT_F_RST) == 0 {
        flood_credit(p.saddr.to_ne_bytes(), reply, state, ct_now());
    }
}

/// Whether some frontend (or a draining one) uses `port` (`VIPX_PORTS`).
#[inline(always)]
fn frontend_port(port: u16) -> bool {
    let (word, bit) = port_bit(port);
    PORTS.get(word).is_some_and(|w| *w & bit != 0)
}

/// A packet of a flow with a forward entry still valid: its frontend's reverse-NAT entry
/// active with the generation the entry was made with, at this packet's address and port, and
/// its backend the same. `None`: not one (a new flow, or one whose entry went stale).
/// The frontend's `loadBalancerSourceRanges` hold for every packet (its reverse-NAT entry says
/// whether it has some); a change of externalTrafficPolicy leaves established flows where they
/// are, as netfilter conntrack keeps them behind kube-proxy.
#[inline(always)]
fn established<C: Frame>(ctx: &C, p: &Pkt, ct_key: CtKey4) -> Option<Act> {
    let entry = CT4.get_ptr_mut(ct_key)?;
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let ct = unsafe { *entry };
    // Not a pod's forward entry: a pod's flow with the same tuple (routable pod addresses) was
    // never checked as an external one.
    if ct.flags & (CT_F_FORWARD | CT_F_POD) != CT_F_FORWARD {
        return None;
    }
    let rev = forward_revnat(&ct, p.daddr.to_ne_bytes(), p.dport.to_ne_bytes())?;
    let ranges = rev.flags & REVNAT_F_SOURCE_RANGES != 0;
    let b = backend(ct.backend_id)?;
    if b.generation != ct.backend_gen {
        return None;
    }
    if ranges && !source_allowed(ct.rev_nat_id, p.saddr.to_ne_bytes()) {
        count(Stat::SourceRangeDropped);
        return Some(Act::Drop);
    }
    if ct.flags & CT_F_SNAT == 0 {
        let reply_key = p.reply_key_from(&b);
        closed_by_client(p, &ct, &reply_key);
        ct_touch(entry, &ct, p.ct_state());
        count(Stat::NodeTranslated);
        return Some(to_local(ctx, p, &b));
    }
    let s = SNAT4.get_ptr(ct_key)?;
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let s = unsafe { *s };
    // Its port must still answer to this client: if the LRU took the reply entry and another
    // flow took the port, this flow selects afresh rather than send as that one.
    let reply_key = CtKey4 {
        saddr: b.addr,
        daddr: s.addr,
        sport: b.port,
        dport: s.port,
        proto: p.proto,
        _pad: 0,
        _pad2: 0,
    };
    if snat_client(&reply_key) != Some(p.client()) {
        return None;
    }
    // The LRU may have taken the reply entry (the port's lock) alone: take it back, or the
    // answers would find nothing. (Another flow took the port meanwhile: this one selects
    // afresh.) Taken back, it says nothing of what the server did: no close credit then, or a
    // client's RST of a flow never answered would count as the reset of an answered one.
    let reply = CtValue {
        flags: CT_F_REPLY | CT_F_SNAT | CT_F_REPLIED,
        ..ct
    };
    if CT4.get_ptr(reply_key).is_some() {
        closed_by_client(p, &ct, &reply_key);
    } else if !ct_insert_new(&reply_key, &reply) {
        return None;
    }
    ct_touch(entry, &ct, p.ct_state());
    count(Stat::NodeTranslated);
    let nat = Nat::of(s.addr, s.port, b.addr, b.port);
    Some(send_on(ctx, p, &nat))
}

#[inline(always)]
fn new_flow<C: Frame>(ctx: &C, p: &Pkt, svc_key: SvcKey4, svc: &SvcValue, ct_key: CtKey4) -> Act {
    if svc.count == 0 {
        count(Stat::NoBackend);
        if svc.flags & SVC_F_REJECT != 0 && svc.flags & SVC_F_NODE_PORT != 0 {
            // No endpoints at all: kube-proxy rejects. On a node address nothing listens on
            // the port, so the stack answers (TCP reset, ICMP port unreachable). An LB or
            // external IP is not the node's: the stack would forward it on, so it is dropped.
            return Act::Pass;
        }
        return Act::Drop;
    }
    // A FIN or RST that found no entry (the flow ended, was collected, never existed): it must
    // not leave entries behind. To a local backend it is translated untracked, as the pod
    // program does; one for another node has no port to go out with.
    let closing = p.proto == IPPROTO_TCP && !is_tcp_syn(p.tcp_flags) && is_tcp_close(p.tcp_flags);
    if !closing && !flood_allows(p.saddr.to_ne_bytes()) {
        // The client retransmits a dropped SYN; by then its window may have room again.
        count(Stat::FloodDropped);
        return Act::Drop;
    }
    let hash = flow_hash(
        p.saddr.to_ne_bytes(),
        p.daddr.to_ne_bytes(),
        p.sport.to_ne_bytes(),
        p.dport.to_ne_bytes(),
        p.proto,
    );
    let rev_nat_gen = REVNAT4.get(svc.rev_nat_id).map_or(0, |r| r.generation);
    // sessionAffinity ClientIP holds for external clients too, by their own address (which
    // the node program sees, SNAT or not).
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let now = if affinity {
        // SAFETY: plain helper call.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let kept = if affinity {
        affine(
            p.saddr.to_ne_bytes(),
            svc.rev_nat_id,
            svc.affinity_timeout_s,
            rev_nat_gen,
            now,
        )
    } else {
        None
    };
    let chosen = kept.or_else(|| {
        let table = if svc.flags & SVC_F_MAGLEV != 0 {
            svc.backend_id
        } else {
            0
        };
        match maglev_pick(table, hash) {
            Some((_, id, b)) => Some((id, b)),
            None => slot_backend(svc_key, pick_slot(hash, svc.count))
                .or_else(|| slot_backend(svc_key, 1)),
        }
    });
    let Some((backend_id, b)) = chosen else {
        count(Stat::NoBackend);
        return Act::Drop;
    };
    if affinity && !closing {
        remember_affinity(
            p.saddr.to_ne_bytes(),
            svc.rev_nat_id,
            (backend_id, &b),
            rev_nat_gen,
            now,
            0,
        );
    }
    let fwd = CtValue {
        backend_id,
        backend_gen: b.generation,
        rev_nat_id: svc.rev_nat_id,
        rev_nat_gen,
        flags: CT_F_FORWARD | CT_F_NODE,
        seen: ct_now(),
    };
    if closing {
        count(Stat::CtUntracked);
        if b.flags & BACKEND_F_LOCAL != 0 {
            return to_local(ctx, p, &b);
        }
        return Act::Drop;
    }
    if b.flags & BACKEND_F_LOCAL != 0 {
        let reply_key = p.reply_key_from(&b);
        let reply = CtValue {
            flags: CT_F_REPLY,
            ..fwd
        };
        // The way back first, as the pod program does: never DNAT a flow whose answer could
        // not be restored.
        if ct_put(&reply_key, &reply).is_err() {
            count(Stat::CtInsertFailed);
            return Act::Drop;
        }
        let _ = ct_put(&ct_key, &fwd);
        count(Stat::NodeNewLocal);
        return to_local(ctx, p, &b);
    }

    // Another node's backend: leave with the source the kernel's route to it selects.
    let mut fib = fib_params(p, [0; 4], b.addr, ingress(ctx));
    // SAFETY: plain helper call with parameters we own.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return fib_failed(ctx, rc, &fib);
    }
    // SAFETY: the kernel filled the IPv4 source for BPF_FIB_LOOKUP_SRC.
    let src = unsafe { fib.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
    // A port chosen by the flow's hash, probing on: the reply key (backend, this node, port)
    // must be free, as a socket's would.
    let mut port = 0u16;
    let mut reply_key = CtKey4 {
        saddr: b.addr,
        daddr: src,
        sport: b.port,
        dport: [0; 2],
        proto: p.proto,
        _pad: 0,
        _pad2: 0,
    };
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    let client = p.client();
    let reply = CtValue {
        flags: CT_F_REPLY | CT_F_SNAT,
        ..fwd
    };
    // This very flow (client tuple and frontend) holding a port already (a retransmitted SYN):
    // the same one, as long as the port still answers to this client.
    if let Some(held) = SNAT4.get_ptr(ct_key) {
        // SAFETY: value pointer from a successful lookup; copied out at once.
        let held = unsafe { *held };
        reply_key.dport = held.port;
        // Its reply entry (the lock) may be gone (collected between two SYNs): taken again,
        // unless another flow holds the port by now.
        if held.addr == src
            && snat_client(&reply_key) == Some(client)
            && (CT4.get_ptr(reply_key).is_some() || ct_insert_new(&reply_key, &reply))
        {
            port = u16::from_be_bytes(held.port);
        }
    }
    // Else a port chosen by the flow's hash, probing on. The conntrack reply entry is the lock:
    // whoever inserts it owns the port, so two CPUs never share one, and a port whose flow's
    // entries went (closed and collected, or evicted) is free again whatever SNAT4 still says.
    if port == 0 {
        for i in 0..SNAT_TRIES {
            let candidate =
                SNAT_PORT_MIN + (hash.wrapping_add(i.wrapping_mul(2_654_435_761)) % span) as u16;
            reply_key.dport = candidate.to_be_bytes();
            if ct_insert_new(&reply_key, &reply) {
                count(Stat::CtCreated);
                port = candidate;
                break;
            }
        }
    }
    if port == 0 {
        count(Stat::NodeNoPort);
        return Act::Drop;
    }
    let nat = Nat::of(src, port.to_be_bytes(), b.addr, b.port);
    if SNAT4.insert(reply_key, client, 0).is_err() || ct_put(&reply_key, &reply).is_err() {
        count(Stat::CtInsertFailed);
        return Act::Drop;
    }
    let leave_as = SnatValue4 {
        addr: src,
        port: nat.sport.to_ne_bytes(),
        _pad: [0; 2],
    };
    if SNAT4.insert(ct_key, leave_as, 0).is_err() {
        count(Stat::CtInsertFailed);
        return Act::Drop;
    }
    let _ = ct_put(
        &ct_key,
        &CtValue {
            flags: CT_F_FORWARD | CT_F_NODE | CT_F_SNAT,
            ..fwd
        },
    );
    count(Stat::NodeNewRemote);
    rewrite(ctx, p, &nat, &fib)
}

/// Whether `saddr` is in one of the `loadBalancerSourceRanges` of frontend `rev_nat_id`.
#[inline(always)]
fn source_allowed(rev_nat_id: u32, saddr: [u8; 4]) -> bool {
    let id = rev_nat_id.to_be_bytes();
    let data = [
        id[0], id[1], id[2], id[3], saddr[0], saddr[1], saddr[2], saddr[3],
    ];
    SRCRANGE4.get(LpmKey::new(64, data)).is_some()
}

/// The client a SNAT port (as its reply key) answers to.
#[inline(always)]
fn snat_client(reply_key: &CtKey4) -> Option<SnatValue4> {
    let v = SNAT4.get_ptr(reply_key)?;
    // SAFETY: value pointer from a successful lookup; copied out at once.
    Some(unsafe { *v })
}

/// An answer from another node's backend to a port this node translated a client's flow to.
/// `None`: not one (the packet goes on through the program).
#[inline(always)]
fn snat_reply<C: Frame>(ctx: &C, p: &Pkt) -> Option<Act> {
    let key = p.ct_key();
    let entry = CT4.get_ptr_mut(key)?;
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let ct = unsafe { *entry };
    if ct.flags & CT_F_SNAT == 0 {
        return None;
    }
    let rev = reply_revnat(&ct)?;
    let client = SNAT4.get_ptr(key)?;
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let client = unsafe { *client };
    ct_touch(entry, &ct, CT_F_REPLIED | p.ct_state());
    count(Stat::NodeTranslated);
    let nat = Nat::of(rev.addr, rev.port, client.addr, client.port);
    Some(send_on(ctx, p, &nat))
}

/// DNAT to a backend on this node; the stack delivers it.
#[inline(always)]
fn to_local<C: Frame>(ctx: &C, p: &Pkt, b: &Backend4) -> Act {
    let nat = Nat {
        saddr: p.saddr,
        sport: p.sport,
        daddr: u32::from_ne_bytes(b.addr),
        dport: u16::from_ne_bytes(b.port),
    };
    if ctx.write_nat(p, &nat).is_none() {
        return Act::Drop;
    }
    Act::Pass
}

#[inline(always)]
fn fib_params(p: &Pkt, src: [u8; 4], dst: [u8; 4], ifindex: u32) -> FibParams {
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = p.proto;
    fib.__bindgen_anon_1.tot_len = 0;
    fib.ifindex = ifindex;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    fib
}

/// Rewrite per `nat` and send the packet where the kernel's FIB says `nat.daddr` lives.
#[inline(always)]
fn send_on<C: Frame>(ctx: &C, p: &Pkt, nat: &Nat) -> Act {
    let mut fib = fib_params(
        p,
        nat.saddr.to_ne_bytes(),
        nat.daddr.to_ne_bytes(),
        ingress(ctx),
    );
    // SAFETY: plain helper call with parameters we own.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return fib_failed(ctx, rc, &fib);
    }
    rewrite(ctx, p, nat, &fib)
}

/// No way out yet: record a next hop that needs resolving, and drop (the client retransmits).
#[inline(always)]
fn fib_failed<C: Frame>(ctx: &C, rc: i64, fib: &FibParams) -> Act {
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // SAFETY: the kernel left the next hop in `ipv4_dst`.
        let nexthop = unsafe { fib.__bindgen_anon_4.ipv4_dst }.to_ne_bytes();
        // The interface the route leaves by (the kernel sets it before looking for the
        // neighbour), which need not be the one the packet came in on.
        let out = if fib.ifindex != 0 {
            fib.ifindex
        } else {
            ingress(ctx)
        };
        let _ = NEIGHMISS4.insert(nexthop, out, 0);
        count(Stat::NodeNoNeigh);
    } else {
        // No route, or one XDP cannot follow (a tunnel, a lightweight-tunnel route).
        count(Stat::NodeFibFailed);
    }
    Act::Drop
}

/// Rewrite addresses, ports and MACs and take one off the TTL, as the router the node is here,
/// then transmit: back out of the interface it came in on, or redirected to the one the route
/// names.
#[inline(always)]
fn rewrite<C: Frame>(ctx: &C, p: &Pkt, nat: &Nat, fib: &FibParams) -> Act {
    let Some(ip) = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN) else {
        return Act::Drop;
    };
    // SAFETY: bounds checked by ptr_at; the packet is ours to write.
    let ip = unsafe { &mut *ip };
    let ttl = ip[IP_TTL_OFF];
    if ttl <= 1 {
        count(Stat::NodeTtlExceeded);
        return Act::Drop;
    }
    // TTL and protocol share a 16-bit word of the header sum.
    let ip_csum = csum_replace2(
        [ip[IP_CSUM_OFF], ip[IP_CSUM_OFF + 1]],
        [ttl, ip[IP_TTL_OFF + 1]],
        [ttl - 1, ip[IP_TTL_OFF + 1]],
    );
    ip[IP_TTL_OFF] = ttl - 1;
    ip[IP_CSUM_OFF..IP_CSUM_OFF + 2].copy_from_slice(&ip_csum);
    if ctx.write_nat(p, nat).is_none() {
        return Act::Drop;
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return Act::Drop;
    };
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(&fib.dmac);
    eth[6..].copy_from_slice(&fib.smac);
    if fib.ifindex == ingress(ctx) {
        return Act::Tx;
    }
    Act::Redirect(fib.ifindex)
}

/// Write the addresses and ports of `nat` into the packet with the IPv4 and L4 checksums updated
/// incrementally (XDP sees finished checksums: a NIC hands them over whole). A UDP checksum of 0
/// (none) stays 0. Every field is written, changed or not: no branches, and the same work
/// whatever the rewrite (replacing a value by itself leaves a sum as it was).
#[inline(always)]
fn write_nat_finished<C: Frame>(ctx: &C, p: &Pkt, nat: &Nat) -> Option<()> {
    if p.proto == IPPROTO_TCP {
        write_nat_l4::<C, TCP_MIN_HLEN, TCP_CSUM_OFF>(ctx, p, nat)
    } else {
        write_nat_l4::<C, UDP_HLEN, UDP_CSUM_OFF>(ctx, p, nat)
    }
}

/// `write_nat_finished` for an L4 header of `N` bytes with its checksum at `CSUM`: one pointer
/// for the whole header, so the verifier sees every access under one bounds check (LLVM drops
/// a second check another one implies, and the verifier cannot follow that).
#[inline(always)]
fn write_nat_l4<C: Frame, const N: usize, const CSUM: usize>(
    ctx: &C,
    p: &Pkt,
    nat: &Nat,
) -> Option<()> {
    let ip = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN)?;
    let l4 = ptr_at::<[u8; N]>(ctx, p.l4_off)?;
    // SAFETY: both pointers bounds checked by ptr_at above; the packet is ours to write.
    unsafe {
        let ip = &mut *ip;
        let l4 = &mut *l4;
        let mut ip_csum = u16::from_ne_bytes([ip[IP_CSUM_OFF], ip[IP_CSUM_OFF + 1]]);
        let mut l4_csum = u16::from_ne_bytes([l4[CSUM], l4[CSUM + 1]]);
        let udp_none = p.proto == IPPROTO_UDP && l4_csum == 0;
        // The address words are summed into both checksums at once: the L4 pseudo header
        // covers the same addresses.
        ip_csum = csum_replace4_raw(ip_csum, p.saddr, nat.saddr);
        ip_csum = csum_replace4_raw(ip_csum, p.daddr, nat.daddr);
        l4_csum = csum_replace4_raw(l4_csum, p.saddr, nat.saddr);
        l4_csum = csum_replace4_raw(l4_csum, p.daddr, nat.daddr);
        l4_csum = csum_replace2_raw(l4_csum, p.sport, nat.sport);
        l4_csum = csum_replace2_raw(l4_csum, p.dport, nat.dport);
        ip[IP_SADDR_OFF..IP_SADDR_OFF + 4].copy_from_slice(&nat.saddr.to_ne_bytes());
        ip[IP_DADDR_OFF..IP_DADDR_OFF + 4].copy_from_slice(&nat.daddr.to_ne_bytes());
        l4[L4_SPORT_OFF..L4_SPORT_OFF + 2].copy_from_slice(&nat.sport.to_ne_bytes());
        l4[L4_DPORT_OFF..L4_DPORT_OFF + 2].copy_from_slice(&nat.dport.to_ne_bytes());
        ip[IP_CSUM_OFF..IP_CSUM_OFF + 2].copy_from_slice(&ip_csum.to_ne_bytes());
        if !udp_none {
            // A UDP sum that comes out 0 is sent as all ones (0 means "none").
            if p.proto == IPPROTO_UDP && l4_csum == 0 {
                l4_csum = 0xffff;
            }
            l4[CSUM..CSUM + 2].copy_from_slice(&l4_csum.to_ne_bytes());
        }
    }
    Some(())
}
