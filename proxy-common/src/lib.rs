//! The contract between the kernel programs and userspace: map keys, map values, map names and
//! constants. Every type here is `#[repr(C)]` with explicit padding fields (no implicit padding,
//! enforced by `bytemuck::Pod`), because the kernel compares hash keys byte by byte.
//!
//! Layout (modelled on Cilium's `lb4_*` maps, with 32-bit ids so 100k+ services fit):
//! - `SVC4`: `{vip, port, proto, scope, slot}` -> `SvcValue`. Slot 0 is the frontend (backend
//!   count, reverse-NAT id, flags); slots `1..=count` each name one backend id. A frontend's count
//!   never exceeds the slots already written.
//! - `BACKEND4`: array indexed by backend id -> `{addr, port, proto, flags}`. Id 0 means "none".
//! - `REVNAT4`: array indexed by reverse-NAT id -> the frontend `{vip, port}` restored on replies.
//! - `CT4`: LRU `{saddr, daddr, sport, dport, proto}` as seen on the wire -> what to do with it.
//!   A new flow writes two entries: the forward one (client -> VIP) naming the backend, and the
//!   reply one (backend -> client) naming the reverse-NAT id. One lookup serves either direction.
//! - `STATS`: per-CPU counters indexed by `Stat`.
//!
//! IPv6 gets parallel `*6` maps with 16-byte addresses later; ids are shared between families.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Map names as they appear in the object file and under the pin directory.
pub mod map_names {
    pub const SVC4: &str = "VIPX_SVC4";
    pub const BACKEND4: &str = "VIPX_BACKEND4";
    pub const REVNAT4: &str = "VIPX_REVNAT4";
    pub const CT4: &str = "VIPX_CT4";
    pub const STATS: &str = "VIPX_STATS";
    /// The floor program's single array (bench only).
    pub const FLOOR: &str = "VIPX_FLOOR";
}

/// Program names in the object file.
pub mod prog_names {
    /// TC ingress on the host side of a pod veth: DNAT to a backend, reverse-NAT replies.
    pub const POD_INGRESS: &str = "vipx_pod_ingress";
    /// A trivial XDP program (one array lookup, XDP_PASS): the per-packet cost floor.
    pub const FLOOR: &str = "vipx_floor";
    /// The same trivial program at the TC hook (bench only).
    pub const FLOOR_TC: &str = "vipx_floor_tc";
}

/// Default map sizes; userspace overrides them from config before load.
pub mod defaults {
    /// Frontends plus one entry per backend slot.
    pub const SVC4_ENTRIES: u32 = 262_144;
    pub const BACKEND4_ENTRIES: u32 = 131_072;
    pub const REVNAT4_ENTRIES: u32 = 65_536;
    /// Two entries per flow.
    pub const CT4_ENTRIES: u32 = 524_288;
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Service lookup scope (Cilium's trick for services with two traffic policies: the internal
/// scope holds the internalTrafficPolicy-filtered backend list). Only `SCOPE_EXTERNAL` (also used
/// for a ClusterIP whose policies agree) is written today.
pub const SCOPE_EXTERNAL: u8 = 0;
pub const SCOPE_INTERNAL: u8 = 1;

/// Key of `SVC4`. Addresses and ports are in network byte order, exactly as on the wire.
#[repr(C)]
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

/// The frontend's service uses ClusterIP semantics.
pub const SVC_F_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_F_NODE_PORT: u16 = 1 << 1;
pub const SVC_F_EXTERNAL_IP: u16 = 1 << 2;
pub const SVC_F_LOAD_BALANCER: u16 = 1 << 3;
/// Traffic policy Local applies to this frontend's scope.
pub const SVC_F_LOCAL: u16 = 1 << 4;
/// sessionAffinity: ClientIP (timeout in `affinity_timeout_s`).
pub const SVC_F_AFFINITY: u16 = 1 << 5;

/// Value of `SVC4`. In slot 0: `count`, `rev_nat_id`, `flags`, `affinity_timeout_s`;
/// in slot n: `backend_id`.
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

/// Value of `BACKEND4` (an array indexed by backend id; an entry without `BACKEND_F_ACTIVE` does
/// not exist).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Backend4 {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub flags: u8,
}

impl Backend4 {
    pub const fn is_active(&self) -> bool {
        self.flags & BACKEND_F_ACTIVE != 0
    }
}

pub const REVNAT_F_ACTIVE: u16 = 1;

/// Value of `REVNAT4` (array indexed by reverse-NAT id): the frontend a reply's source is
/// rewritten back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RevNat4 {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub flags: u16,
}

/// Key of `CT4`: the 5-tuple exactly as the packet carries it when it reaches the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Forward entry: client -> frontend; DNAT to `backend_id`.
pub const CT_F_FORWARD: u32 = 1 << 0;
/// Reply entry: backend -> client; SNAT back to `REVNAT4[rev_nat_id]`.
pub const CT_F_REPLY: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtValue {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub flags: u32,
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
}

pub const STATS_LEN: u32 = 16;

impl Stat {
    pub const ALL: [Stat; 10] = [
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
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<SvcKey4>() == 12);
    assert!(core::mem::size_of::<SvcValue>() == 16);
    assert!(core::mem::size_of::<Backend4>() == 8);
    assert!(core::mem::size_of::<RevNat4>() == 8);
    assert!(core::mem::size_of::<CtKey4>() == 16);
    assert!(core::mem::size_of::<CtValue>() == 12);
    assert!((Stat::ALL.len() as u32) <= STATS_LEN);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: every type is `Pod` (checked by bytemuck's derive: no padding, any bit pattern valid).
    unsafe impl aya::Pod for SvcKey4 {}
    unsafe impl aya::Pod for SvcValue {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for RevNat4 {}
    unsafe impl aya::Pod for CtKey4 {}
    unsafe impl aya::Pod for CtValue {}
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
            _pad: [0; 3],
        };
        assert_eq!(
            bytemuck::bytes_of(&k),
            &[
                198, 18, 64, 2, 198, 19, 0, 10, 0x9c, 0x40, 0, 80, 17, 0, 0, 0
            ]
        );
    }
}
