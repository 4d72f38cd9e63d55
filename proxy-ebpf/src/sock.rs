//! Socket-level load balancing for the node's own processes (host network: `curl <ClusterIP>`,
//! kubelet probes, hostNetwork pods), and with `--socket-lb all` for its pods. cgroup hooks translate the address a socket connects or
//! sends to, once per connection (or datagram) instead of once per packet, so no packet of theirs
//! is rewritten and nothing on the way (rp_filter, netfilter, a CNI) ever sees the frontend:
//! - `connect4` (TCP, connected UDP) and `sendmsg4` (unconnected UDP): a frontend address becomes
//!   a backend, and `SOCKREV4` remembers, per socket, which frontend that backend stands for;
//! - `getpeername4` and `recvmsg4` (UDP sources): that backend is reported as the frontend again,
//!   so a connected socket's peer is the address the process dialled, and a resolver that checks
//!   its answer's source accepts it.
//!
//! The hooks live on a cgroup, which spans network namespaces: only sockets of the namespaces in
//! `SOCKNS` (by cookie, written by the vipx that serves them) are touched, so two lab nodes on
//! one machine never translate each other's sockets and the machine's other processes never are.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use proxy_common::{
    Backend4, IPPROTO_TCP, IPPROTO_UDP, REVNAT_F_ACTIVE, SCOPE_EXTERNAL, SVC_F_AFFINITY,
    SVC_F_MAGLEV, SVC_F_REJECT, SockRevKey4, SockRevValue4, Stat, SvcKey4, VIP_F_CLUSTER_IP,
    VipKey4, defaults,
};
use vipx_ebpf::pick_slot;

use crate::{REVNAT4, SVC4, VIP4, affine, count, maglev_pick, remember_affinity, slot_backend};

/// Pinned: sockets opened before a restart keep reporting the frontend they dialled.
#[map(name = "VIPX_SOCKREV4")]
static SOCKREV4: LruHashMap<SockRevKey4, SockRevValue4> =
    LruHashMap::pinned(defaults::SOCKREV4_ENTRIES, 0);

#[map(name = "VIPX_SOCKNS")]
static SOCKNS: HashMap<u64, u32> = HashMap::with_max_entries(defaults::SOCKNS_ENTRIES, 0);

/// The hook's verdicts: go on (with the address as the program left it), or fail the call with
/// the errno set by `bpf_set_retval` (EPERM without one).
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
const ENOMEM: i32 = 12;

/// The affinity "client" of the node's own sockets. kube-proxy keys affinity by source address,
/// and the node's processes all reach a Service from the node's address: one client. No pod has
/// this address.
const NODE_CLIENT: [u8; 4] = [0; 4];

#[cgroup_sock_addr(connect4)]
pub fn vipx_sock_connect4(ctx: SockAddrContext) -> i32 {
    forward::<V4>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn vipx_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward::<V4>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn vipx_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse::<V4>(&ctx);
    // The kernel accepts nothing else from this hook.
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn vipx_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse::<V4>(&ctx);
    ALLOW
}

// A dual-stack socket dialling an IPv4 address does so through its v4-mapped form: the kernel
// runs these hooks, not the IPv4 ones, for its connect (TCP and UDP), getpeername and received
// datagrams. Only mapped addresses are translated; IPv6 Services are not served yet. An
// unconnected datagram to a mapped address needs no hook of its own: the kernel hands it to
// the IPv4 path, whose sendmsg4 hook runs.

#[cgroup_sock_addr(connect6)]
pub fn vipx_sock_connect6(ctx: SockAddrContext) -> i32 {
    forward::<V6Mapped>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn vipx_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse::<V6Mapped>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn vipx_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse::<V6Mapped>(&ctx);
    ALLOW
}

/// Where a hook's context holds the IPv4 address: `user_ip4`, or the low word of `user_ip6` in
/// its v4-mapped form. A type per family, so each program reads only the fields its hook may
/// (the verifier rejects `user_ip4` in an IPv6 hook and the reverse).
trait Family {
    /// The IPv4 address (bytes as on the wire), if the context holds one.
    ///
    /// # Safety
    /// `sa` is the hook's `bpf_sock_addr`.
    unsafe fn read(sa: *const bpf_sock_addr) -> Option<[u8; 4]>;
    /// # Safety
    /// `sa` is the hook's `bpf_sock_addr`, of a hook that may rewrite the address.
    unsafe fn write(sa: *mut bpf_sock_addr, addr: [u8; 4]);
}

struct V4;
struct V6Mapped;

/// `::ffff:0:0/96`: the third word of a v4-mapped address, as stored (network order).
const V4_MAPPED_WORD: [u8; 4] = [0, 0, 0xff, 0xff];

impl Family for V4 {
    #[inline(always)]
    unsafe fn read(sa: *const bpf_sock_addr) -> Option<[u8; 4]> {
        // SAFETY: the caller's contract.
        Some(unsafe { (*sa).user_ip4 }.to_ne_bytes())
    }

    #[inline(always)]
    unsafe fn write(sa: *mut bpf_sock_addr, addr: [u8; 4]) {
        // SAFETY: the caller's contract.
        unsafe { (*sa).user_ip4 = u32::from_ne_bytes(addr) };
    }
}

impl Family for V6Mapped {
    #[inline(always)]
    unsafe fn read(sa: *const bpf_sock_addr) -> Option<[u8; 4]> {
        // SAFETY: the caller's contract; 4-byte reads of `user_ip6`, as the verifier wants.
        let w = unsafe {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        };
        (w[0] == 0 && w[1] == 0 && w[2].to_ne_bytes() == V4_MAPPED_WORD).then(|| w[3].to_ne_bytes())
    }

    #[inline(always)]
    unsafe fn write(sa: *mut bpf_sock_addr, addr: [u8; 4]) {
        // SAFETY: the caller's contract; the prefix stays mapped.
        unsafe { (*sa).user_ip6[3] = u32::from_ne_bytes(addr) };
    }
}

/// The affinity client of the socket's namespace if this vipx serves it: [`NODE_CLIENT`] for the
/// node's own, the pod's address for a pod's (`--socket-lb all`).
#[inline(always)]
fn served(ctx: &SockAddrContext) -> Option<[u8; 4]> {
    // SAFETY: plain helper call on the hook's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: value pointer from a successful lookup; read at once.
    SOCKNS.get_ptr(netns).map(|c| unsafe { *c }.to_ne_bytes())
}

/// Fail the system call with `errno`.
#[inline(always)]
fn refuse(errno: i32) -> i32 {
    // SAFETY: plain helper call; connect4 and sendmsg4 may set their return value.
    unsafe { bpf_set_retval(-errno) };
    REFUSE
}

/// connect and sendmsg: a frontend becomes one of its backends.
#[inline(always)]
fn forward<F: Family>(ctx: &SockAddrContext) -> i32 {
    let Some(client) = served(ctx) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    // SAFETY: the hook's context; these fields are readable in connect and sendmsg.
    let (protocol, port) = unsafe { ((*sa).protocol, (*sa).user_port) };
    // SAFETY: the hook's context.
    let Some(addr) = (unsafe { F::read(sa) }) else {
        return ALLOW;
    };
    let proto = match protocol {
        6 => IPPROTO_TCP,
        17 => IPPROTO_UDP,
        _ => return ALLOW,
    };
    // Network byte order as stored; `user_port` in its low 16 bits.
    let port = (port as u16).to_ne_bytes();
    let mut svc_key = SvcKey4::from_wire(addr, port, proto, SCOPE_EXTERNAL, 0);
    let mut svc = SVC4.get_ptr(svc_key);
    if svc.is_none() && addr[0] == 127 && client == NODE_CLIENT {
        // The node's loopback: node ports answer there too (the node's addresses have frontends
        // of their own), on the wildcard frontend. A pod's loopback is its own.
        svc_key = SvcKey4::from_wire([0; 4], port, proto, SCOPE_EXTERNAL, 0);
        svc = SVC4.get_ptr(svc_key);
    }
    let Some(svc) = svc else {
        // A ClusterIP on a port no Service port serves: refused, as the pod program refuses it.
        if let Some(vip) = VIP4.get_ptr(VipKey4 { addr })
            // SAFETY: value pointer from a successful lookup; read at once.
            && unsafe { (*vip).flags } & VIP_F_CLUSTER_IP != 0
        {
            count(Stat::SockRefused);
            return refuse(ECONNREFUSED);
        }
        return ALLOW;
    };
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let svc = unsafe { *svc };
    if svc.count == 0 {
        // kube-proxy rejects a Service without endpoints and drops one whose endpoints are all
        // unusable here; a socket is told at once either way rather than left to time out.
        count(Stat::SockRefused);
        return refuse(if svc.flags & SVC_F_REJECT != 0 {
            ECONNREFUSED
        } else {
            EHOSTUNREACH
        });
    }
    let rev_nat_gen = REVNAT4.get(svc.rev_nat_id).map_or(0, |r| r.generation);
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let kept = if affinity {
        // SAFETY: plain helper call.
        affine(
            client,
            svc.rev_nat_id,
            svc.affinity_timeout_s,
            rev_nat_gen,
            unsafe { bpf_ktime_get_ns() },
        )
    } else {
        None
    };
    let (backend_id, b) = match kept {
        Some(k) => k,
        None => {
            // No packet tuple to hash yet (the source port is not chosen): a random choice,
            // through the Maglev table when the frontend has one, spreads as the slots do.
            // SAFETY: plain helper call.
            let hash = unsafe { bpf_get_prandom_u32() };
            let table = if svc.flags & SVC_F_MAGLEV != 0 {
                svc.backend_id
            } else {
                0
            };
            match maglev_pick(table, hash) {
                Some((_, id, b)) => (id, b),
                None => {
                    // Slot 1 stays while the frontend has a backend, should its count have
                    // shrunk since it was read.
                    match slot_backend(svc_key, pick_slot(hash, svc.count))
                        .or_else(|| slot_backend(svc_key, 1))
                    {
                        Some(chosen) => chosen,
                        None => {
                            count(Stat::SockRefused);
                            return refuse(EHOSTUNREACH);
                        }
                    }
                }
            }
        }
    };
    if affinity {
        remember_affinity(
            client,
            svc.rev_nat_id,
            (backend_id, &b),
            rev_nat_gen,
            // SAFETY: plain helper call.
            unsafe { bpf_ktime_get_ns() },
            0,
        );
    }
    // The way back first: without it the socket would report the backend as its peer, and a
    // UDP client that checks where its answer comes from would drop it.
    let rev = SockRevValue4 {
        addr,
        port,
        _pad: [0; 2],
        rev_nat_id: svc.rev_nat_id,
        rev_nat_gen,
    };
    if SOCKREV4.insert(sock_rev_key(ctx, &b), rev, 0).is_err() {
        return refuse(ENOMEM);
    }
    // SAFETY: the hook's context; connect and sendmsg may rewrite the destination.
    unsafe {
        F::write(sa, b.addr);
        (*sa).user_port = u32::from(u16::from_ne_bytes(b.port));
    }
    count(Stat::SockTranslated);
    ALLOW
}

#[inline(always)]
fn sock_rev_key(ctx: &SockAddrContext, b: &Backend4) -> SockRevKey4 {
    SockRevKey4 {
        // SAFETY: plain helper call on the hook's context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: b.addr,
        port: b.port,
        _pad: [0; 2],
    }
}

/// A backend address this socket was translated to reads as the frontend it dialled, while that
/// frontend exists (same reverse-NAT id and generation).
#[inline(always)]
fn reverse<F: Family>(ctx: &SockAddrContext) {
    if served(ctx).is_none() {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the hook's context; readable in recvmsg and getpeername.
    let port = unsafe { (*sa).user_port };
    // SAFETY: the hook's context.
    let Some(addr) = (unsafe { F::read(sa) }) else {
        return;
    };
    let key = SockRevKey4 {
        // SAFETY: plain helper call on the hook's context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr,
        port: (port as u16).to_ne_bytes(),
        _pad: [0; 2],
    };
    let Some(rev) = SOCKREV4.get_ptr(key) else {
        return;
    };
    // SAFETY: value pointer from a successful lookup; copied out at once.
    let rev = unsafe { *rev };
    match REVNAT4.get(rev.rev_nat_id) {
        Some(r) if r.flags & REVNAT_F_ACTIVE != 0 && r.generation == rev.rev_nat_gen => {}
        _ => return,
    }
    // SAFETY: the hook's context; recvmsg and getpeername may rewrite the address reported.
    unsafe {
        F::write(sa, rev.addr);
        (*sa).user_port = u32::from(u16::from_ne_bytes(rev.port));
    }
    count(Stat::SockReversed);
}
