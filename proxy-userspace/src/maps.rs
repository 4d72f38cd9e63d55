//! The map writer: turns a `DesiredState` into kernel map entries, diffing against what is
//! already programmed and applying in an order that never exposes a half-built service:
//! backends and reverse-NAT entries first, then backend slots, then the frontend entry (slot 0)
//! whose count makes the slots reachable; removal in reverse.
//!
//! Each frontend is applied on its own: one that does not fit (ids exhausted, a full map) is left
//! as it was and reported, the others are applied, and removals go first so that deleting
//! Services makes room. A backend is written when a slot first names it (before that no flow can
//! be on it) and freed when it has left the target and no programmed slot names it any more.
//!
//! The programmed state is read back from the maps at start, so a restarted vipx keeps every
//! backend and reverse-NAT id, and with them the conntrack entries of established flows. Freed
//! entries keep their generation, so the restarted vipx also knows which ids were used and does
//! not hand them out again at once.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, VecDeque},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, MapData};
use proxy_common::{
    AffinityMatchKey4, BACKBITS_WORDS, BACKEND_F_ACTIVE, BACKEND_F_LOCAL, BACKEND_F_TERMINATING,
    Backend4, IPPROTO_TCP, IPPROTO_UDP, PORTS_WORDS, PROTO_EXTERNAL_VIEW, REVNAT_F_ACTIVE,
    REVNAT_F_SOURCE_RANGES, RevNat4, SCOPE_EXTERNAL, SVC_F_AFFINITY, SVC_F_CLUSTER_IP,
    SVC_F_EXTERNAL_IP, SVC_F_EXTERNAL_VIEW, SVC_F_LOAD_BALANCER, SVC_F_LOCAL, SVC_F_MAGLEV,
    SVC_F_NODE_PORT, SVC_F_REJECT, SVC_F_SOURCE_RANGES, SvcKey4, SvcValue, VIP_F_CLUSTER_IP,
    VIP_F_HAIRPIN, VIPBITS_WORDS, Vip4, VipKey4, addr_bit, backend_bit, port_bit,
};

use crate::{
    desired::{DesiredState, FrontendKind, LbAlgorithm, Protocol, ServicePortName},
    maglev,
};

/// An IPv4 L3/L4 address: what a frontend or a backend is identified by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct L4Addr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto =
            Protocol::from_number(self.proto & !PROTO_EXTERNAL_VIEW).map_or("?", Protocol::as_str);
        let view = if self.proto & PROTO_EXTERNAL_VIEW != 0 {
            "+external"
        } else {
            ""
        };
        write!(f, "{}:{}/{proto}{view}", self.addr, self.port)
    }
}

/// One frontend as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendEntry {
    pub rev_nat_id: u32,
    pub flags: u16,
    pub affinity_timeout_s: u32,
    /// Backend ids of slots 1..=n.
    pub slots: Vec<u32>,
    /// The Maglev table new flows use (1-based, 0 = none), with `SVC_F_MAGLEV` in `flags`.
    pub maglev_table: u32,
}

/// What the kernel maps say, decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub frontends: BTreeMap<L4Addr, FrontendEntry>,
    /// Backend id -> (address, flags).
    pub backends: BTreeMap<u32, (L4Addr, u8)>,
    /// Reverse-NAT id -> frontend it restores.
    pub revnat: BTreeMap<u32, L4Addr>,
    /// Reverse-NAT id -> its flags (`REVNAT_F_*`), for the same ids.
    pub revnat_flags: BTreeMap<u32, u16>,
}

/// The desired state resolved to map-level terms (no ids yet).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub frontends: BTreeMap<L4Addr, TargetFrontend>,
    /// Every backend an established flow may use, with its flags.
    pub backends: BTreeMap<L4Addr, u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetFrontend {
    pub service: ServicePortName,
    pub flags: u16,
    pub affinity_timeout_s: u32,
    pub slots: Vec<L4Addr>,
    /// The Service's choice; `None`: the writer's default (`--lb-algorithm`).
    pub lb_algorithm: Option<LbAlgorithm>,
    /// LoadBalancer frontends: the sources that may reach it (`SVC_F_SOURCE_RANGES` set; the
    /// ranges go to `VIPX_SRCRANGE4`, see `crate::ranges`).
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
}

/// What a Service uses that this version does not program, gathered over its ports so that it
/// is reported once per Service.
#[derive(Default)]
struct Unsupported {
    v4_frontends: usize,
    v6_frontends: BTreeSet<String>,
    v6_endpoints: BTreeSet<(IpAddr, u16)>,
    sctp_ports: BTreeSet<String>,
}

impl Unsupported {
    fn report(&self, service: &str, problems: &mut Vec<String>) {
        if !self.v6_frontends.is_empty() || !self.v6_endpoints.is_empty() {
            let what = if self.v4_frontends == 0 {
                "IPv6 Service not programmed (IPv6 is not supported yet)"
            } else {
                "IPv6 part not programmed (IPv6 is not supported yet; IPv4 is)"
            };
            let mut parts = Vec::new();
            if !self.v6_frontends.is_empty() {
                parts.push(format!(
                    "frontends {}",
                    self.v6_frontends
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if !self.v6_endpoints.is_empty() {
                parts.push(format!("{} endpoints", self.v6_endpoints.len()));
            }
            problems.push(format!("{service}: {what}: {}", parts.join("; ")));
        }
        if !self.sctp_ports.is_empty() {
            problems.push(format!(
                "{service}: port {} not programmed (SCTP is not supported)",
                self.sctp_ports
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
}

/// [`target_on`] a node without addresses serving node ports (tests, benches).
pub fn target(desired: &DesiredState) -> (Target, Vec<String>) {
    target_on(desired, &[])
}

/// Map-level view of the desired state on a node whose addresses `node_addresses` serve node
/// ports. IPv4 TCP/UDP only for now. A node port is a frontend on each of those addresses (as
/// Cilium expands them: each has its own reverse-NAT entry, so a reply comes from the address
/// the client dialled, and every data path finds it by its destination like any other
/// frontend), plus one on the unspecified address that the node's own sockets reach through
/// 127.0.0.0/8. What is left out is reported, once per Service; problems are returned, not
/// fatal.
pub fn target_on(desired: &DesiredState, node_addresses: &[Ipv4Addr]) -> (Target, Vec<String>) {
    let mut t = Target::default();
    let mut problems = Vec::new();
    let mut unsupported: BTreeMap<(&str, &str), Unsupported> = BTreeMap::new();
    for (name, sp) in &desired.services {
        let un = unsupported
            .entry((name.namespace.as_str(), name.name.as_str()))
            .or_default();
        for ep in &sp.endpoints {
            if ep.addr.is_ipv6() {
                un.v6_endpoints.insert((ep.addr, ep.port));
            }
        }
        for fe in &sp.frontends {
            let at = match fe.kind {
                FrontendKind::NodePort => format!("{}/{}", fe.port, name.protocol),
                _ => format!("{}/{}", SocketAddr::new(fe.addr, fe.port), name.protocol),
            };
            match (fe.kind, fe.addr) {
                (_, IpAddr::V6(_)) => {
                    un.v6_frontends.insert(at);
                }
                (_, IpAddr::V4(_)) => un.v4_frontends += 1,
            }
        }
        if name.protocol == Protocol::Sctp {
            let port = if name.port_name.is_empty() {
                sp.frontends
                    .first()
                    .map_or(String::new(), |f| f.port.to_string())
            } else {
                name.port_name.clone()
            };
            un.sctp_ports.insert(format!("{port}/SCTP"));
            continue;
        }
        let proto = name.protocol.number();
        let to_addr = |i: &usize| -> Option<L4Addr> {
            let ep = sp.endpoints.get(*i)?;
            match ep.addr {
                IpAddr::V4(addr) => Some(L4Addr {
                    addr,
                    port: ep.port,
                    proto,
                }),
                IpAddr::V6(_) => None,
            }
        };
        for ep in &sp.endpoints {
            let IpAddr::V4(addr) = ep.addr else { continue };
            let flags = BACKEND_F_ACTIVE
                | if ep.terminating {
                    BACKEND_F_TERMINATING
                } else {
                    0
                }
                | if ep.local { BACKEND_F_LOCAL } else { 0 };
            let key = L4Addr {
                addr,
                port: ep.port,
                proto,
            };
            // Shared by several services: terminating only if every one says so.
            t.backends
                .entry(key)
                .and_modify(|f| *f &= flags | !BACKEND_F_TERMINATING)
                .or_insert(flags);
        }
        let expanded = sp.frontends.iter().flat_map(|fe| {
            let at: &[Ipv4Addr] = match fe.kind {
                FrontendKind::NodePort => node_addresses,
                _ => &[],
            };
            std::iter::once(*fe).chain(at.iter().map(|a| crate::desired::Frontend {
                addr: IpAddr::V4(*a),
                ..*fe
            }))
        });
        for fe in expanded {
            let IpAddr::V4(addr) = fe.addr else { continue };
            // The data paths so far serve traffic born on the node (pods, the node's own
            // sockets), so external frontends get what kube-proxy gives traffic from inside the
            // cluster to an external destination: every endpoint, whatever the traffic policy.
            let (kind_flag, pick, local) = match fe.kind {
                FrontendKind::ClusterIp => (SVC_F_CLUSTER_IP, &sp.internal_pick, sp.internal_local),
                FrontendKind::ExternalIp => (SVC_F_EXTERNAL_IP, &sp.pod_external_pick, false),
                FrontendKind::LoadBalancer => (SVC_F_LOAD_BALANCER, &sp.pod_external_pick, false),
                FrontendKind::NodePort => (SVC_F_NODE_PORT, &sp.pod_external_pick, false),
            };
            let key = L4Addr {
                addr,
                port: fe.port,
                proto,
            };
            let mut flags = kind_flag;
            if local {
                flags |= SVC_F_LOCAL;
            }
            // externalTrafficPolicy Local: clients outside the cluster get this node's endpoints
            // only (and keep their address), through a view of their own; traffic born in the
            // cluster keeps every endpoint.
            let external_view =
                sp.external_local && fe.kind != FrontendKind::ClusterIp && !addr.is_unspecified();
            if external_view {
                flags |= SVC_F_EXTERNAL_VIEW;
            }
            // loadBalancerSourceRanges restrict the LoadBalancer IPs only (kube-proxy's
            // firewall chain); the node ports of the same Service stay open.
            let source_ranges = if fe.kind == FrontendKind::LoadBalancer {
                sp.source_ranges.clone()
            } else {
                Vec::new()
            };
            if !source_ranges.is_empty() {
                flags |= SVC_F_SOURCE_RANGES;
            }
            if sp.affinity_timeout_s.is_some() {
                flags |= SVC_F_AFFINITY;
            }
            // kube-proxy rejects only when the Service has no endpoints anywhere; with
            // endpoints that this frontend's policy excludes (none local under Local), it drops.
            if sp.endpoints.is_empty() {
                flags |= SVC_F_REJECT;
            }
            let slots: Vec<L4Addr> = pick.iter().filter_map(to_addr).collect();
            if slots.len() > usize::from(u16::MAX) {
                problems.push(format!(
                    "{name}: {} backends exceed the limit of {}",
                    slots.len(),
                    u16::MAX
                ));
                continue;
            }
            let entry = TargetFrontend {
                service: name.clone(),
                flags,
                affinity_timeout_s: sp.affinity_timeout_s.unwrap_or(0),
                slots,
                lb_algorithm: sp.lb_algorithm,
                source_ranges,
            };
            if let Some(prev) = t.frontends.get(&key) {
                problems.push(format!(
                    "{name}: frontend {key} already used by {}; skipped",
                    prev.service
                ));
                continue;
            }
            if external_view {
                let view = TargetFrontend {
                    flags: (entry.flags & !SVC_F_EXTERNAL_VIEW) | SVC_F_LOCAL,
                    slots: sp.external_pick.iter().filter_map(to_addr).collect(),
                    ..entry.clone()
                };
                let view_key = L4Addr {
                    proto: proto | PROTO_EXTERNAL_VIEW,
                    ..key
                };
                t.frontends.insert(view_key, view);
            }
            t.frontends.insert(key, entry);
        }
    }
    for ((namespace, name), un) in &unsupported {
        un.report(&format!("{namespace}/{name}"), &mut problems);
    }
    (t, problems)
}

/// The next generation of an id: any value the id never had recently, never 0 (0 means "never
/// used", which a conntrack entry must not be able to match after a reuse).
const fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

/// One id space (backend ids or reverse-NAT ids). A freed id must not be handed out again soon:
/// conntrack entries still name it, and although a bumped generation makes them stale rather
/// than wrong, a flow that still uses it loses its backend. So ids never used are handed out
/// first, from a cursor, and only when the cursor has reached the end are freed ids reused, least
/// recently freed first.
///
/// Invariant: every id in `1..len` is exactly one of: held by a programmed entry, in `free`, or
/// at or after `next`.
#[derive(Debug)]
struct IdSpace {
    /// Generation of each id (index = id; index 0 is "none" and never handed out), as the map
    /// holds it: it survives frees, so the pinned map remembers which ids were used.
    gens: Vec<u32>,
    /// Ids from here on were never used.
    next: u32,
    /// Freed ids, least recently freed first.
    free: VecDeque<u32>,
}

impl IdSpace {
    /// Resume from the generations a (possibly pinned) map holds; `in_use(id)` says which ids
    /// programmed entries hold.
    fn new(gens: Vec<u32>, in_use: impl Fn(u32) -> bool) -> Self {
        let len = u32::try_from(gens.len()).unwrap_or(u32::MAX);
        let used = |id: u32| in_use(id) || gens.get(id as usize).is_some_and(|g| *g != 0);
        // After a restart the cursor resumes after the last id ever used, so ids freed before
        // the restart are not handed out at once.
        let next = (1..len).rev().find(|&id| used(id)).map_or(1, |id| id + 1);
        // The map does not say when an id was freed; id order is the order a first pass of the
        // cursor allocated them in, the best guess left. Ids below the cursor never used at all
        // (nothing can name them) go first.
        let (never, freed): (Vec<u32>, Vec<u32>) = (1..next)
            .filter(|&id| !in_use(id))
            .partition(|&id| gens.get(id as usize).is_none_or(|g| *g == 0));
        Self {
            gens,
            next,
            free: never.into_iter().chain(freed).collect(),
        }
    }

    /// A free id with its new generation, or `None` when every id is held.
    fn alloc(&mut self) -> Option<(u32, u32)> {
        self.take().map(|(id, generation, _)| (id, generation))
    }

    /// [`Self::alloc`], and whether the id was never used: from beyond the cursor (after every
    /// id that had a generation or an entry naming it when the map was adopted) with generation
    /// 0, so its entry is all zeros and no conntrack entry names it (generations start at 1;
    /// an adopted entry of generation 0, left by pins only partly recreated, is below the
    /// cursor): it may go active in one write.
    fn take(&mut self) -> Option<(u32, u32, bool)> {
        let (id, cursor) = if (self.next as usize) < self.gens.len() {
            self.next += 1;
            (self.next - 1, true)
        } else {
            (self.free.pop_front()?, false)
        };
        let g = self.gens.get_mut(id as usize)?;
        let first = cursor && *g == 0;
        *g = next_generation(*g);
        Some((id, *g, first))
    }

    /// `id` is no longer held; it keeps its generation.
    fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }

    fn generation(&self, id: u32) -> u32 {
        self.gens.get(id as usize).copied().unwrap_or(0)
    }

    /// Ids `alloc` can still hand out.
    fn free_count(&self) -> usize {
        (self.gens.len().saturating_sub(self.next as usize)) + self.free.len()
    }
}

/// A frontend the last apply could not write. It was left as it was (absent if new), the maps
/// stay consistent, and the next apply retries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedFrontend {
    pub frontend: L4Addr,
    /// `None` for a frontend that could not be removed (its Service is gone from the target).
    pub service: Option<ServicePortName>,
    pub reason: String,
}

impl fmt::Display for FailedFrontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.service {
            Some(s) => write!(f, "{s} (frontend {}): {}", self.frontend, self.reason),
            None => write!(f, "removed frontend {}: {}", self.frontend, self.reason),
        }
    }
}

/// Counts of what one apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frontends_added: usize,
    pub frontends_changed: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// TCP backends that left every Service and keep serving their connections for a while.
    pub backends_retiring: usize,
    /// Frontends removed that keep translating their established flows for a while.
    pub frontends_draining: usize,
    pub map_writes: usize,
    /// Frontends left as they were because they did not fit (retried by the next apply).
    pub failed: Vec<FailedFrontend>,
}

impl ApplyStats {
    pub fn is_noop(&self) -> bool {
        self.map_writes == 0
    }

    fn merged(mut self, other: ApplyStats) -> Self {
        self.frontends_added += other.frontends_added;
        self.frontends_changed += other.frontends_changed;
        self.frontends_removed += other.frontends_removed;
        self.backends_added += other.backends_added;
        self.backends_removed += other.backends_removed;
        self.backends_retiring += other.backends_retiring;
        self.frontends_draining += other.frontends_draining;
        self.map_writes += other.map_writes;
        self.failed.extend(other.failed);
        self
    }
}

/// Handles on the service maps.
pub struct ServiceMaps {
    pub svc: HashMap<MapData, SvcKey4, SvcValue>,
    pub vip: HashMap<MapData, VipKey4, Vip4>,
    pub backend: Array<MapData, Backend4>,
    pub revnat: Array<MapData, RevNat4>,
    /// Entry 0: the table size; then the tables (see `proxy_common`'s `MAGLEV4`).
    pub maglev: Array<MapData, u32>,
    /// The same map mapped into memory (`None`: a map without `BPF_F_MMAPABLE`).
    pub maglev_mem: Option<MmapArray>,
    /// Backends of frontends with session affinity (`None`: pins of a build without it, opened
    /// read-only by `vipx services`).
    pub affmatch: Option<HashMap<MapData, AffinityMatchKey4, u32>>,
    /// The ports frontends use (`None`: pins of a build without it, opened read-only).
    pub ports: Option<Array<MapData, u64>>,
    /// The frontend address filter (`None` likewise).
    pub vipbits: Option<Array<MapData, u64>>,
    /// The backend filter (`None` likewise).
    pub backbits: Option<Array<MapData, u64>>,
    /// The load that opened these maps created them (no pin of them existed): they hold zeros
    /// only, and their first read back is skipped (~100 ms of a start at the default sizes).
    /// Taken by that read: a later one reads what was written since.
    pub created: std::cell::Cell<bool>,
}

/// The bitmaps the writer keeps (see `Bits`).
#[derive(Clone, Copy, Debug)]
pub enum BitMap {
    /// `VIPX_PORTS`.
    Ports,
    /// `VIPX_VIPBITS`.
    Addrs,
    /// `VIPX_BACKBITS2` (bits only ever set: see `proxy_common::backend_bit`).
    Backends,
}

impl BitMap {
    fn words(self) -> u32 {
        match self {
            Self::Ports => PORTS_WORDS,
            Self::Addrs => VIPBITS_WORDS,
            Self::Backends => BACKBITS_WORDS,
        }
    }
}

/// An array map created with `BPF_F_MMAPABLE`, mapped read-write: `VIPX_MAGLEV4`, whose tables
/// are written and read with plain memory accesses (a table is unreachable until the slot 0
/// update, a syscall, so also a barrier, names it), and `VIPX_FLOWGEN_V1`, whose generations
/// userspace bumps. An array map lays its elements out 8-byte aligned (`round_up(value_size,
/// 8)`, kernel `array_map_alloc`), so each u32 entry is the low half (little-endian) of a u64
/// slot, and each u64 entry a slot.
pub struct MmapArray {
    ptr: std::ptr::NonNull<u64>,
    entries: usize,
}

// SAFETY: the mapping belongs to this value alone (unmapped on drop) and is reached only through
// `&mut self` writes and `&self` reads; the kernel's readers never need our synchronisation.
unsafe impl Send for MmapArray {}
// SAFETY: see `Send`; shared access only reads.
unsafe impl Sync for MmapArray {}

impl MmapArray {
    /// Map `map` (an array of u32 or u64 created with `BPF_F_MMAPABLE`); `None` when it cannot
    /// be.
    pub fn map<V: aya::Pod>(map: &Array<MapData, V>) -> Option<Self> {
        use std::os::fd::{AsFd as _, AsRawFd as _};

        use aya::maps::IterableMap as _;
        const BPF_F_MMAPABLE: u32 = 1 << 10;
        let info = map.map().info().ok()?;
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            return None;
        }
        if !matches!(info.value_size(), 4 | 8) || cfg!(target_endian = "big") {
            return None;
        }
        let entries = map.len() as usize;
        let fd = map.map().fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's fd, length = its data; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                entries * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            tracing::debug!(
                "mapping an mmapable array: {}; syscalls instead",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(Self {
            ptr: std::ptr::NonNull::new(ptr.cast())?,
            entries,
        })
    }

    /// Add one to slot `i` atomically, as the programs do (`VIPX_FLOWGEN_V1`).
    pub fn bump(&self, i: usize) {
        if i < self.entries {
            // SAFETY: slot `i` of the live mapping, 8-byte aligned (page-aligned mapping);
            // every writer, kernel or user, changes it with atomic adds.
            let slot = unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(i)) };
            slot.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn slice(&self) -> &[u64] {
        // SAFETY: the mapping is `entries` 8-byte slots, alive while `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.entries) }
    }

    fn slice_mut(&mut self) -> &mut [u64] {
        // SAFETY: as `slice`, and `&mut self` makes this the only userspace access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.entries) }
    }
}

impl Drop for MmapArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.entries * 8) };
    }
}

/// Everything the writer resumes from: the decoded state and every id's generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadBack {
    pub programmed: Programmed,
    /// Index = backend id; length = the map's size.
    pub backend_gens: Vec<u32>,
    /// Index = reverse-NAT id; length = the map's size.
    pub revnat_gens: Vec<u32>,
    /// Frontend addresses -> `VIP_F_*` flags.
    pub vips: BTreeMap<Ipv4Addr, u32>,
    /// (reverse-NAT id, backend id) pairs of the affinity membership map.
    pub affmatch: BTreeSet<(u32, u32)>,
    /// The backend filter's words (`None`: no such map).
    pub backbits: Option<Vec<u64>>,
}

/// The map operations the writer needs: the kernel maps in production, an in-memory model with
/// the same capacity rules in unit tests (loading BPF maps needs privileges).
pub trait MapStore {
    /// Insert or overwrite. A new key fails when the map is full.
    fn svc_insert(&mut self, key: SvcKey4, value: SvcValue) -> Result<()>;
    /// Remove; an absent key is not an error.
    fn svc_remove(&mut self, key: &SvcKey4) -> Result<()>;
    fn backend_set(&mut self, id: u32, value: Backend4) -> Result<()>;
    fn revnat_set(&mut self, id: u32, value: RevNat4) -> Result<()>;
    /// Insert or overwrite a frontend address. A new one fails when the map is full.
    fn vip_set(&mut self, addr: Ipv4Addr, flags: u32) -> Result<()>;
    /// Remove; an absent address is not an error.
    fn vip_remove(&mut self, addr: Ipv4Addr) -> Result<()>;
    fn read_back(&self) -> Result<ReadBack>;
    /// (table size M, number of tables); 0 tables: no Maglev.
    fn maglev_geometry(&self) -> (u32, u32);
    /// Write table `table` (1-based) whole: `ids.len()` is M.
    fn maglev_write(&mut self, table: u32, ids: &[u32]) -> Result<()>;
    /// Read table `table` (1-based): M ids.
    fn maglev_read(&self, table: u32) -> Result<Vec<u32>>;
    /// Record that `backend_id` belongs to the affinity frontend `rev_nat_id`. A new pair fails
    /// when the map is full.
    fn affmatch_set(&mut self, rev_nat_id: u32, backend_id: u32) -> Result<()>;
    /// Remove; an absent pair is not an error.
    fn affmatch_remove(&mut self, rev_nat_id: u32, backend_id: u32) -> Result<()>;
    /// Write word `word` of a bitmap (see `proxy_common::PORTS_WORDS`, `VIPBITS_WORDS`).
    fn bits_set(&mut self, map: BitMap, word: u32, bits: u64) -> Result<()>;

    /// [`MapStore::svc_insert`] of each entry in order, stopping at the first failure:
    /// `Err((written, e))`, the first `written` in. The real maps do it in one syscall.
    fn svc_insert_all(&mut self, entries: &[(SvcKey4, SvcValue)]) -> WriteAll {
        for (i, (k, v)) in entries.iter().enumerate() {
            self.svc_insert(*k, *v).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// [`MapStore::backend_set`] of each entry in order, as [`MapStore::svc_insert_all`].
    fn backend_set_all(&mut self, entries: &[(u32, Backend4)]) -> WriteAll {
        for (i, (k, v)) in entries.iter().enumerate() {
            self.backend_set(*k, *v).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// [`MapStore::bits_set`] of each (word, bits) in order, as [`MapStore::svc_insert_all`]:
    /// a start writes a whole filter (16,384 words), one syscall instead of one per word.
    fn bits_set_all(&mut self, map: BitMap, entries: &[(u32, u64)]) -> WriteAll {
        for (i, (w, b)) in entries.iter().enumerate() {
            self.bits_set(map, *w, *b).map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

/// A batch of writes: `Err((written, e))` when only the first `written` went in.
pub type WriteAll = std::result::Result<(), (usize, anyhow::Error)>;

/// Keys and values apart, as `BPF_MAP_UPDATE_BATCH` takes them.
fn split<K: Copy, V: Copy>(entries: &[(K, V)]) -> (Vec<K>, Vec<V>) {
    entries.iter().copied().unzip()
}

impl MapStore for ServiceMaps {
    fn bits_set(&mut self, map: BitMap, word: u32, bits: u64) -> Result<()> {
        let m = match map {
            BitMap::Ports => &mut self.ports,
            BitMap::Addrs => &mut self.vipbits,
            BitMap::Backends => &mut self.backbits,
        };
        match m {
            Some(m) => Ok(m.set(word, bits, 0)?),
            None => Ok(()),
        }
    }

    fn svc_insert(&mut self, key: SvcKey4, value: SvcValue) -> Result<()> {
        Ok(self.svc.insert(key, value, 0)?)
    }

    fn svc_insert_all(&mut self, entries: &[(SvcKey4, SvcValue)]) -> WriteAll {
        use aya::maps::IterableMap as _;
        let (k, v) = split(entries);
        let batch = update_all(self.svc.map(), &k, &v);
        batch_or_each(batch, entries, "the service map", |k, v| {
            self.svc_insert(k, v)
        })
    }

    fn backend_set_all(&mut self, entries: &[(u32, Backend4)]) -> WriteAll {
        use aya::maps::IterableMap as _;
        let (k, v) = split(entries);
        let batch = update_all(self.backend.map(), &k, &v);
        batch_or_each(batch, entries, "the backend map", |k, v| {
            self.backend_set(k, v)
        })
    }

    fn bits_set_all(&mut self, map: BitMap, entries: &[(u32, u64)]) -> WriteAll {
        use aya::maps::IterableMap as _;
        let m = match map {
            BitMap::Ports => &self.ports,
            BitMap::Addrs => &self.vipbits,
            BitMap::Backends => &self.backbits,
        };
        let Some(m) = m else {
            return Ok(());
        };
        let (k, v) = split(entries);
        let batch = update_all(m.map(), &k, &v);
        batch_or_each(batch, entries, "a filter map", |w, b| {
            self.bits_set(map, w, b)
        })
    }

    fn svc_remove(&mut self, key: &SvcKey4) -> Result<()> {
        match self.svc.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn backend_set(&mut self, id: u32, value: Backend4) -> Result<()> {
        Ok(self.backend.set(id, value, 0)?)
    }

    fn revnat_set(&mut self, id: u32, value: RevNat4) -> Result<()> {
        Ok(self.revnat.set(id, value, 0)?)
    }

    fn vip_set(&mut self, addr: Ipv4Addr, flags: u32) -> Result<()> {
        let key = VipKey4 {
            addr: addr.octets(),
        };
        Ok(self.vip.insert(key, Vip4 { flags }, 0)?)
    }

    fn vip_remove(&mut self, addr: Ipv4Addr) -> Result<()> {
        let key = VipKey4 {
            addr: addr.octets(),
        };
        match self.vip.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn read_back(&self) -> Result<ReadBack> {
        use aya::maps::IterableMap as _;
        if self.created.take() {
            return Ok(ReadBack {
                programmed: Programmed::default(),
                backend_gens: vec![0; self.backend.len() as usize],
                revnat_gens: vec![0; self.revnat.len() as usize],
                vips: BTreeMap::new(),
                affmatch: BTreeSet::new(),
                backbits: self.backbits.as_ref().map(|m| vec![0; m.len() as usize]),
            });
        }
        // Batched: a start reads the whole backend array, 262,144 entries by default. Kernels
        // without batch lookups are read one element at a time.
        let batched = lookup_all::<SvcKey4, SvcValue>(self.svc.map());
        if let Err(e) = &batched
            && batch_unsupported(e)
        {
            return self.read_back_one_by_one();
        }
        let svc: Vec<(SvcKey4, SvcValue)> = batched.context("reading the service map")?;
        let backends: Vec<Backend4> = array_values(self.backend.map(), "backend")?;
        let revnat: Vec<RevNat4> = array_values(self.revnat.map(), "reverse-NAT")?;
        let vips: Vec<(VipKey4, Vip4)> =
            lookup_all(self.vip.map()).context("reading the frontend address map")?;
        let mut r = decode(&svc, &backends, &revnat)?;
        r.backbits = match &self.backbits {
            Some(m) => Some(array_values(m.map(), "backend filter")?),
            None => None,
        };
        r.vips = vips
            .into_iter()
            .map(|(k, v)| (Ipv4Addr::from(k.addr), v.flags))
            .collect();
        if let Some(affmatch) = &self.affmatch {
            r.affmatch = affmatch
                .keys()
                .map(|k| k.map(|k| (k.rev_nat_id, k.backend_id)))
                .collect::<Result<_, _>>()
                .context("reading the affinity membership map")?;
        }
        Ok(r)
    }

    fn affmatch_set(&mut self, rev_nat_id: u32, backend_id: u32) -> Result<()> {
        let key = AffinityMatchKey4 {
            rev_nat_id,
            backend_id,
        };
        let map = self
            .affmatch
            .as_mut()
            .context("the affinity membership map is not open")?;
        Ok(map.insert(key, 0, 0)?)
    }

    fn affmatch_remove(&mut self, rev_nat_id: u32, backend_id: u32) -> Result<()> {
        let key = AffinityMatchKey4 {
            rev_nat_id,
            backend_id,
        };
        let Some(map) = self.affmatch.as_mut() else {
            return Ok(());
        };
        match map.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn maglev_geometry(&self) -> (u32, u32) {
        // Read at every table write: from the mapping when there is one, without a syscall.
        let mapped = self
            .maglev_mem
            .as_ref()
            .and_then(|mem| mem.slice().first().map(|v| *v as u32));
        match mapped.map_or_else(|| self.maglev.get(&0, 0), Ok) {
            Ok(m) if m != 0 => (m, self.maglev.len().saturating_sub(1) / m),
            _ => (0, 0),
        }
    }

    fn maglev_read(&self, table: u32) -> Result<Vec<u32>> {
        let (m, tables) = self.maglev_geometry();
        if table == 0 || table > tables {
            bail!("Maglev table {table} of {tables}");
        }
        let base = 1 + (table - 1) * m;
        if let Some(mem) = &self.maglev_mem
            && let Some(t) = mem.slice().get(base as usize..(base + m) as usize)
        {
            // The low half of each slot; the high half is the element's padding.
            return Ok(t.iter().map(|v| *v as u32).collect());
        }
        (base..base + m)
            .map(|pos| Ok(self.maglev.get(&pos, 0)?))
            .collect()
    }

    fn maglev_write(&mut self, table: u32, ids: &[u32]) -> Result<()> {
        let (m, tables) = self.maglev_geometry();
        if table == 0 || table > tables || ids.len() != m as usize {
            bail!(
                "Maglev table {table} of {tables} (size {m}) cannot take {} entries",
                ids.len()
            );
        }
        let base = 1 + (table - 1) * m;
        // The table is not reachable until slot 0 names it, so it may be written in pieces:
        // one batch syscall (a table of 1021 entries one by one costs ~1 ms), or entry by entry
        // on kernels without batch updates of arrays (before 5.6).
        if let Some(mem) = &mut self.maglev_mem
            && let Some(t) = mem.slice_mut().get_mut(base as usize..(base + m) as usize)
        {
            for (slot, id) in t.iter_mut().zip(ids) {
                *slot = u64::from(*id);
            }
            return Ok(());
        }
        let keys: Vec<u32> = (base..base + m).collect();
        match update_batch(&self.maglev, &keys, ids) {
            Ok(()) => return Ok(()),
            Err(e) => tracing::debug!("batch update of Maglev table {table}: {e}; one by one"),
        }
        for (pos, id) in keys.into_iter().zip(ids) {
            self.maglev
                .set(pos, id, 0)
                .with_context(|| format!("writing Maglev table {table}"))?;
        }
        Ok(())
    }
}

/// `BPF_MAP_UPDATE_BATCH` (aya 0.14 has no batch operations): `keys[i]` -> `values[i]`.
fn update_batch(map: &Array<MapData, u32>, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    use aya::maps::IterableMap as _;
    update_all(map.map(), keys, values).map_err(|(_, e)| e)
}

/// `keys[i]` -> `values[i]` in order, in as few `BPF_MAP_UPDATE_BATCH` calls as the kernel
/// takes (one, up to its limits): the kernel writes them one after the other, each visible to
/// the programs at once, exactly as single updates in that order would be, and stops at the
/// first failure. `Err((written, e))`: the first `written` went in, the rest did not.
fn update_all<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, std::io::Error)> {
    use std::os::fd::{AsFd as _, AsRawFd as _};

    use crate::conntrack::{BatchAttr, bpf_call};
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    if keys.len() != values.len() {
        return Err((0, std::io::Error::from(std::io::ErrorKind::InvalidInput)));
    }
    let Ok(count) = u32::try_from(keys.len()) else {
        return Err((0, std::io::Error::from(std::io::ErrorKind::InvalidInput)));
    };
    if count == 0 {
        return Ok(());
    }
    let fd = map.fd().as_fd().as_raw_fd();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: fd as u32,
        ..BatchAttr::default()
    };
    // The kernel reads `count` keys and values from the slices, which outlive the call, and
    // writes back in `attr.count` how many it wrote; an error before the first write (an
    // unsupported command, a bad attribute) leaves `count` as it was: nothing was written.
    let r = bpf_call(BPF_MAP_UPDATE_BATCH, &mut attr);
    let written = if r.is_err() && attr.count == count {
        0
    } else {
        (attr.count as usize).min(keys.len())
    };
    match r {
        Ok(_) if written == keys.len() => Ok(()),
        Ok(_) => Err((
            written,
            std::io::Error::other(format!("batch update wrote {written} of {count} entries")),
        )),
        Err(e) => Err((written, e)),
    }
}

/// A batch update's outcome as a [`WriteAll`]; a kernel without batch updates gets the
/// entries one `each` call at a time instead.
fn batch_or_each<K: Copy, V: Copy>(
    batch: Result<(), (usize, std::io::Error)>,
    entries: &[(K, V)],
    what: &str,
    mut each: impl FnMut(K, V) -> Result<()>,
) -> WriteAll {
    match batch {
        Err((0, e)) if batch_unsupported(&e) => {
            for (i, (k, v)) in entries.iter().enumerate() {
                each(*k, *v).map_err(|e| (i, e))?;
            }
            Ok(())
        }
        r => r.map_err(|(n, e)| (n, anyhow::Error::from(e).context(format!("writing {what}")))),
    }
}

/// Whether a batch command failed for want of support (kernels before 5.6, map types without
/// batch operations): the caller falls back to one syscall per element.
fn batch_unsupported(e: &std::io::Error) -> bool {
    // ENOTSUPP (524) is the kernel-internal "not supported" some map types return.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | 524)
    )
}

/// Every value of array `map`, in index order.
fn array_values<V: aya::Pod + Default>(map: &MapData, what: &str) -> Result<Vec<V>> {
    let all: Vec<(u32, V)> = lookup_all(map).with_context(|| format!("reading the {what} map"))?;
    if all.iter().enumerate().any(|(i, (k, _))| *k as usize != i) {
        bail!("reading the {what} map: indices out of order");
    }
    Ok(all.into_iter().map(|(_, v)| v).collect())
}

/// Every entry of `map` through `BPF_MAP_LOOKUP_BATCH` (an array's in index order): a read
/// back of a 262,144-entry array is 64 syscalls instead of 262,144.
fn lookup_all<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: &MapData,
) -> std::io::Result<Vec<(K, V)>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};

    use crate::conntrack::{BatchAttr, bpf_call};
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    // At least a hash bucket (the kernel refuses a batch smaller than the bucket it stops in).
    const CHUNK: usize = 4096;
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK];
    let mut out = Vec::new();
    // The position token is opaque: a bucket index (u32) for hash maps, a key for arrays.
    let mut token = [0u8; 64];
    let mut first = true;
    loop {
        let mut next = [0u8; 64];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        let r = bpf_call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(CHUNK);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

impl ServiceMaps {
    /// `read_back` one syscall per element, for kernels without `BPF_MAP_LOOKUP_BATCH`.
    fn read_back_one_by_one(&self) -> Result<ReadBack> {
        let svc: Vec<(SvcKey4, SvcValue)> = self
            .svc
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the service map")?;
        let backends: Vec<Backend4> = self
            .backend
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the backend map")?;
        let revnat: Vec<RevNat4> = self
            .revnat
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the reverse-NAT map")?;
        let mut r = decode(&svc, &backends, &revnat)?;
        r.vips = self
            .vip
            .iter()
            .map(|e| e.map(|(k, v)| (Ipv4Addr::from(k.addr), v.flags)))
            .collect::<Result<_, _>>()
            .context("reading the frontend address map")?;
        if let Some(affmatch) = &self.affmatch {
            r.affmatch = affmatch
                .keys()
                .map(|k| k.map(|k| (k.rev_nat_id, k.backend_id)))
                .collect::<Result<_, _>>()
                .context("reading the affinity membership map")?;
        }
        r.backbits = match &self.backbits {
            Some(m) => Some(
                m.iter()
                    .collect::<Result<_, _>>()
                    .context("reading the backend filter")?,
            ),
            None => None,
        };
        Ok(r)
    }

    /// With the Maglev map mapped into memory when it can be.
    pub fn with_maglev_mem(mut self) -> Self {
        self.maglev_mem = MmapArray::map(&self.maglev);
        self
    }

    /// Decode the maps into the programmed state.
    pub fn read(&self) -> Result<Programmed> {
        Ok(self.read_back()?.programmed)
    }
}

/// Decode raw map contents. Entries without the active flag are not backends / reverse-NAT
/// entries; only their generations matter.
fn decode(
    svc: &[(SvcKey4, SvcValue)],
    backends: &[Backend4],
    revnat: &[RevNat4],
) -> Result<ReadBack> {
    let mut p = Programmed::default();
    let mut slots: BTreeMap<L4Addr, BTreeMap<u16, u32>> = BTreeMap::new();
    for (k, v) in svc {
        if k.scope != SCOPE_EXTERNAL {
            continue;
        }
        let fe = L4Addr {
            addr: Ipv4Addr::from(k.addr),
            port: u16::from_be_bytes(k.port),
            proto: k.proto,
        };
        if k.slot == 0 {
            p.frontends.insert(
                fe,
                FrontendEntry {
                    rev_nat_id: v.rev_nat_id,
                    flags: v.flags,
                    affinity_timeout_s: v.affinity_timeout_s,
                    slots: Vec::new(),
                    maglev_table: v.backend_id,
                },
            );
        } else {
            slots.entry(fe).or_default().insert(k.slot, v.backend_id);
        }
    }
    for (fe, s) in slots {
        // Orphan slots (a crash between writes) are kept so the next apply deletes them.
        let entry = p.frontends.entry(fe).or_insert(FrontendEntry {
            rev_nat_id: 0,
            flags: 0,
            affinity_timeout_s: 0,
            slots: Vec::new(),
            maglev_table: 0,
        });
        let n = s.keys().copied().max().unwrap_or(0);
        entry.slots = (1..=n).map(|i| s.get(&i).copied().unwrap_or(0)).collect();
    }
    for (id, b) in backends.iter().enumerate() {
        if b.is_active() {
            p.backends.insert(
                u32::try_from(id)?,
                (
                    L4Addr {
                        addr: Ipv4Addr::from(b.addr),
                        port: u16::from_be_bytes(b.port),
                        proto: b.proto,
                    },
                    b.flags,
                ),
            );
        }
    }
    for (id, r) in revnat.iter().enumerate() {
        if r.flags & REVNAT_F_ACTIVE != 0 {
            let id = u32::try_from(id)?;
            p.revnat.insert(
                id,
                L4Addr {
                    addr: Ipv4Addr::from(r.addr),
                    port: u16::from_be_bytes(r.port),
                    proto: 0,
                },
            );
            p.revnat_flags.insert(id, r.flags);
        }
    }
    Ok(ReadBack {
        programmed: p,
        backend_gens: backends.iter().map(|b| b.generation).collect(),
        revnat_gens: revnat.iter().map(|r| r.generation).collect(),
        vips: BTreeMap::new(),
        affmatch: BTreeSet::new(),
        backbits: None,
    })
}

/// Keeps the maps equal to the desired state, one frontend at a time: a frontend that does not
/// fit (ids exhausted, a full map) fails alone and is retried later, every other one is applied.
pub struct MapWriter<M: MapStore = ServiceMaps> {
    maps: M,
    cur: Programmed,
    backend_ids: BTreeMap<L4Addr, u32>,
    revnat_ids: BTreeMap<L4Addr, u32>,
    backend_space: IdSpace,
    revnat_space: IdSpace,
    /// How many programmed slots name each backend id: a backend that left the target stays
    /// while a frontend that could not be updated still names it.
    backend_refs: StdHashMap<u32, u32>,
    /// Frontends that failed; every apply retries them.
    pending: BTreeSet<L4Addr>,
    /// TCP backends that left every Service, by id: kept active (in no slot, so no new
    /// connection picks them) until their deadline, so the connections already on them end on
    /// their own, as netfilter conntrack keeps them behind kube-proxy. UDP backends go at once:
    /// a UDP flow moves to a live backend on its next datagram (the DNS case).
    retiring: BTreeMap<u32, (L4Addr, Instant)>,
    endpoint_grace: Duration,
    /// What the frontend address map holds: written before the first frontend on an address,
    /// removed after the last.
    vips: BTreeMap<Ipv4Addr, u32>,
    /// The hairpin SNAT address, also in the address map (see `set_hairpin`).
    hairpin: Option<Ipv4Addr>,
    /// What the affinity membership map holds: (reverse-NAT id, backend id) for every backend
    /// in the slots of a frontend with session affinity.
    affmatch: BTreeSet<(u32, u32)>,
    /// Frontends removed from the target whose reverse-NAT id stays active until the deadline
    /// (their `revnat_ids` entry stays too): established flows keep being translated, as netfilter
    /// conntrack keeps them behind kube-proxy, and a frontend re-created meanwhile gets the same
    /// id back, so its flows stay valid.
    draining: BTreeMap<L4Addr, Instant>,
    /// Active reverse-NAT entries no frontend named when the maps were adopted (frontends that
    /// were draining when vipx stopped): freed at their deadline.
    orphans: BTreeMap<u32, Instant>,
    maglev: MaglevTables,
    /// UDP backends that left a frontend, whose flows are to be removed from conntrack (the
    /// backend may still be active for another Service, so its entries stay valid to the data
    /// path). Kept here, not in what an apply returns, so an apply that fails after writing
    /// some frontends does not lose theirs (see [`Self::take_udp_purges`]).
    udp_purges: Vec<crate::conntrack::Purge>,
    ports: Bits,
    vipbits: Bits,
    /// `VIPX_BACKBITS2` as written (`None`: no such map). Bits are set before a backend is
    /// written and never cleared: a removed backend's flows may live on in conntrack.
    backbits: Option<Vec<u64>>,
    /// The backend filter was empty when read back (a new map, or one nothing was ever set in):
    /// reply entries already in conntrack may come from backends it does not hold yet.
    backbits_fresh: bool,
}

/// A bitmap the programs read to pass what is none of vipx's business without a hash lookup:
/// `VIPX_PORTS` (one bit per port an active reverse-NAT entry names: every programmed frontend
/// has one, and a draining frontend keeps its own) and `VIPX_VIPBITS` (a filter of the frontend
/// addresses in `VIPX_VIP4`). How many holders each bit has, and the words as written. A bit is
/// set before what needs it is written and cleared after the last holder went, so no program
/// passes a packet a frontend would have taken.
struct Bits {
    map: BitMap,
    /// Bit index (word * 64 + bit) -> holders.
    refs: StdHashMap<u32, u32>,
    /// `None`: not written by this process (a pinned map holds whatever a previous run left).
    written: Vec<Option<u64>>,
    /// Words whose holders changed since they were last settled.
    dirty: BTreeSet<u32>,
}

impl Bits {
    /// Every word dirty and unknown: the map (pinned) is written whole once, whatever a
    /// previous run left in it.
    fn new(map: BitMap) -> Self {
        let words = map.words();
        Self {
            map,
            refs: StdHashMap::new(),
            written: vec![None; words as usize],
            dirty: (0..words).collect(),
        }
    }

    fn add(&mut self, (word, bit): (u32, u64)) {
        *self
            .refs
            .entry(word * 64 + bit.trailing_zeros())
            .or_default() += 1;
        self.dirty.insert(word);
    }

    fn remove(&mut self, (word, bit): (u32, u64)) {
        let idx = word * 64 + bit.trailing_zeros();
        if let Some(n) = self.refs.get_mut(&idx) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&idx);
            }
        }
        self.dirty.insert(word);
    }

    /// What word `word` should hold.
    fn want(&self, word: u32) -> u64 {
        (0..64)
            .filter(|i| self.refs.contains_key(&(word * 64 + i)))
            .fold(0, |w, i| w | 1 << i)
    }
}

/// The Maglev table space: which tables are free, which wait out their quarantine.
#[derive(Debug)]
struct MaglevTables {
    /// Table size M; 0 when the map has no table space.
    m: u32,
    /// Tables 1..=tables exist.
    tables: u32,
    /// Frontends without an `lb_algorithm` of their own use Maglev.
    default_on: bool,
    /// Free tables, lowest first.
    free: BTreeSet<u32>,
    /// Tables slot 0 stopped naming, with when: a packet that read slot 0 just before may still
    /// be reading them, so they are not rewritten before `quarantine` has passed.
    quarantined: VecDeque<(u32, Instant)>,
    quarantine: Duration,
    /// Maglev frontends left without a table (space exhausted): slot hashing until one is free;
    /// every apply retries them.
    starved: BTreeSet<L4Addr>,
    /// Exhaustion is logged once until a table is found again.
    warned: bool,
    /// Maglev frontends with too many backends for the table size (warned once each).
    too_large: BTreeSet<L4Addr>,
    /// The table of the frontend being applied, filled ahead on another thread (see
    /// [`Ahead`]).
    ahead: Option<Ahead>,
    /// Tables taken from the worker (tests: that the path is taken).
    #[cfg(test)]
    ahead_used: usize,
}

/// A new frontend's Maglev table filled on a worker thread while the writer writes the
/// frontends before it: at start every frontend needs a table from scratch (M ln M steps each,
/// about a second of one core for 100,000), and the writer's own time goes to syscalls.
#[derive(Debug)]
struct Ahead {
    frontend: L4Addr,
    /// The slots' addresses the table was filled for.
    slots: Vec<L4Addr>,
    /// Each position's slot index (0-based), for the ids the writer gives the slots.
    table: Vec<u32>,
}

/// Fewer new Maglev frontends than this in one apply are filled by the writer itself (a thread
/// costs more than it saves).
const MAGLEV_AHEAD_MIN: usize = 32;
/// Tables a worker may fill before the writer takes them (4 KiB each at the default size,
/// 256 KiB at the largest).
const MAGLEV_AHEAD_DEPTH: usize = 16;

/// How long a table slot 0 no longer names stays untouched (far longer than any packet's run).
pub const MAGLEV_QUARANTINE: Duration = Duration::from_secs(1);

impl MaglevTables {
    fn new(m: u32, tables: u32, in_use: &BTreeSet<u32>) -> Self {
        let m = if tables == 0 { 0 } else { m };
        Self {
            m,
            tables,
            default_on: true,
            free: (1..=tables).filter(|t| !in_use.contains(t)).collect(),
            quarantined: VecDeque::new(),
            quarantine: MAGLEV_QUARANTINE,
            starved: BTreeSet::new(),
            warned: false,
            too_large: BTreeSet::new(),
            ahead: None,
            #[cfg(test)]
            ahead_used: 0,
        }
    }

    /// Whether frontend `t` asks for a Maglev table (its algorithm, and backends to fill it
    /// with), and whether one fits: a table balances only with at least ten positions a backend
    /// (the paper asks for M > 100 N for 1%); beyond M backends some would get none at all. A
    /// frontend without one hashes over its slots, which spreads evenly at any size.
    fn wants_and_fits(&self, t: &TargetFrontend) -> (bool, bool) {
        let wants = self.m != 0
            && !t.slots.is_empty()
            && t.lb_algorithm
                .map_or(self.default_on, |a| a == LbAlgorithm::Maglev);
        (wants, t.slots.len().saturating_mul(10) <= self.m as usize)
    }

    /// Whether frontend `t` gets a Maglev table.
    fn serves(&self, t: &TargetFrontend) -> bool {
        self.wants_and_fits(t) == (true, true)
    }

    fn alloc(&mut self, now: Instant) -> Option<u32> {
        while let Some(&(t, since)) = self.quarantined.front() {
            if now.saturating_duration_since(since) < self.quarantine {
                break;
            }
            self.quarantined.pop_front();
            self.free.insert(t);
        }
        self.free.pop_first()
    }

    /// Never named by slot 0: free at once.
    fn give_back(&mut self, t: u32) {
        if t != 0 {
            self.free.insert(t);
        }
    }

    /// No longer named by slot 0: free after the quarantine.
    fn retire(&mut self, t: u32, now: Instant) {
        if t != 0 {
            self.quarantined.push_back((t, now));
        }
    }
}

/// How long a TCP backend that left every Service keeps serving the connections it has.
pub const DEFAULT_ENDPOINT_GRACE: Duration = Duration::from_secs(15 * 60);

impl<M: MapStore> MapWriter<M> {
    /// Adopt whatever the (possibly pinned, pre-existing) maps already hold.
    pub fn new(maps: M) -> Result<Self> {
        let ReadBack {
            programmed: cur,
            backend_gens,
            revnat_gens,
            vips,
            affmatch,
            backbits,
        } = maps.read_back()?;
        let backbits_fresh = backbits.as_ref().is_some_and(|w| w.iter().all(|w| *w == 0));
        let backend_ids = cur.backends.iter().map(|(id, (a, _))| (*a, *id)).collect();
        let revnat_ids = cur
            .frontends
            .iter()
            .filter(|(_, f)| f.rev_nat_id != 0)
            .map(|(a, f)| (*a, f.rev_nat_id))
            .collect();
        let mut backend_refs: StdHashMap<u32, u32> = StdHashMap::new();
        for id in cur.frontends.values().flat_map(|f| &f.slots) {
            *backend_refs.entry(*id).or_default() += 1;
        }
        let backend_space = IdSpace::new(backend_gens, |id| cur.backends.contains_key(&id));
        let named: std::collections::HashSet<u32> =
            cur.frontends.values().map(|f| f.rev_nat_id).collect();
        let revnat_space = IdSpace::new(revnat_gens, |id| {
            cur.revnat.contains_key(&id) || named.contains(&id)
        });
        let (m, tables) = maps.maglev_geometry();
        // Tables slot 0 names stay theirs (their pinned contents are trusted like the slots);
        // a number beyond the table space (never written by this geometry) is dropped by the
        // first apply, which gives the frontend a fresh table.
        let named_tables: BTreeSet<u32> = cur
            .frontends
            .values()
            .map(|f| f.maglev_table)
            .filter(|t| (1..=tables).contains(t))
            .collect();
        // The hairpin address the running programs answer on stays until `set_hairpin` says
        // otherwise: removed here, hairpin replies in flight would miss it.
        let hairpin = vips
            .iter()
            .find(|(_, flags)| **flags & VIP_F_HAIRPIN != 0)
            .map(|(a, _)| *a);
        let mut w = Self {
            maglev: MaglevTables::new(m, tables, &named_tables),
            maps,
            cur,
            backend_ids,
            revnat_ids,
            backend_space,
            revnat_space,
            backend_refs,
            pending: BTreeSet::new(),
            retiring: BTreeMap::new(),
            endpoint_grace: DEFAULT_ENDPOINT_GRACE,
            vips,
            affmatch,
            hairpin,
            draining: BTreeMap::new(),
            orphans: BTreeMap::new(),
            udp_purges: Vec::new(),
            ports: Bits::new(BitMap::Ports),
            vipbits: Bits::new(BitMap::Addrs),
            backbits,
            backbits_fresh,
        };
        // Before any program is attached: a filter new to these pins lacks the adopted
        // backends (their pinned flows' replies would pass untranslated).
        let adopted: Vec<([u8; 4], [u8; 2])> = w
            .cur
            .backends
            .values()
            .map(|(a, _)| (a.addr.octets(), a.port.to_be_bytes()))
            .collect();
        w.set_backbits(adopted)?;
        for fe in w.cur.revnat.values() {
            w.ports.add(port_bit(fe.port));
        }
        // Adopted frontends whose reverse-NAT entry is not active (a run stopped half-way)
        // keep their port open until the first apply writes that entry or drops them.
        let unnamed: Vec<u16> = w
            .cur
            .frontends
            .iter()
            .filter(|(_, f)| !w.cur.revnat.contains_key(&f.rev_nat_id))
            .map(|(a, _)| a.port)
            .collect();
        for port in &unnamed {
            w.ports.add(port_bit(*port));
        }
        for addr in w.vips.keys() {
            w.vipbits.add(addr_bit(addr.octets()));
        }
        // Before any program is attached, like the addresses below.
        w.settle_bits()?;
        for port in unnamed {
            w.ports.remove(port_bit(port));
        }

        let named: std::collections::HashSet<u32> = w.revnat_ids.values().copied().collect();
        let orphan_deadline = Instant::now() + DEFAULT_ENDPOINT_GRACE;
        w.orphans = w
            .cur
            .revnat
            .keys()
            .filter(|id| !named.contains(id))
            .map(|id| (*id, orphan_deadline))
            .collect();
        // Orphans drain with no ranges (the first sync of the ranges drops theirs).
        let orphans: Vec<u32> = w.orphans.keys().copied().collect();
        for id in orphans {
            w.set_source_ranges_flag(id, false)?;
        }
        // Before any program is attached: maps pinned by a build without the address map (or a
        // crash between writes) leave it behind the frontends, and a frontend whose address is
        // missing is unreachable.
        let addrs: BTreeSet<Ipv4Addr> = w
            .cur
            .frontends
            .keys()
            .map(|f| f.addr)
            .chain(w.vips.keys().copied())
            .chain(
                w.orphans
                    .keys()
                    .filter_map(|id| w.cur.revnat.get(id).map(|r| r.addr)),
            )
            .collect();
        // A failure is fatal: the new program must not replace one that did without the map
        // while an address is missing (the pinned links keep the old one serving).
        for addr in addrs {
            w.settle_vip(addr)?;
        }
        // Likewise the affinity membership of the adopted frontends: the new programs follow
        // affinity only through it, and the first apply may be far off (the API down at start).
        let adopted: Vec<FrontendEntry> = w.cur.frontends.values().cloned().collect();
        for f in &adopted {
            w.sync_affmatch(f.rev_nat_id, Some(f), true)?;
        }
        w.sweep_affmatch()?;
        // The bits of addresses removed above (not the ports of unnamed frontends: those stay
        // until the first apply).
        w.settle_bitmap(BitMap::Addrs)?;
        Ok(w)
    }

    /// The `VIP4` flags the programmed frontends on `addr` call for (`None`: there are none).
    fn vip_flags(&self, addr: Ipv4Addr) -> Option<u32> {
        let lo = L4Addr {
            addr,
            port: 0,
            proto: 0,
        };
        let hi = L4Addr {
            addr,
            port: u16::MAX,
            proto: u8::MAX,
        };
        let mut found = (self.hairpin == Some(addr)).then_some(VIP_F_HAIRPIN);
        for f in self.cur.frontends.range(lo..=hi).map(|(_, f)| f) {
            *found.get_or_insert(0) |= vip_flags_of(f.flags);
        }
        // A draining frontend keeps its address (its flows are looked up behind it), with no
        // flags of its own: new connections to it are not served.
        let orphaned = || {
            self.orphans
                .keys()
                .any(|id| self.cur.revnat.get(id).is_some_and(|r| r.addr == addr))
        };
        if self.draining.range(lo..=hi).next().is_some() || orphaned() {
            found.get_or_insert(0);
        }
        found
    }

    /// The address a pod's flow to its own Service is SNATed to when it lands on the pod itself
    /// (`None`: no hairpin SNAT). The data path learns it from `CONFIG`; here it goes into the
    /// address map, so the pod's answers to it reach the program's hairpin path.
    pub fn set_hairpin(&mut self, addr: Option<Ipv4Addr>) -> Result<()> {
        let old = std::mem::replace(&mut self.hairpin, addr);
        for a in old.into_iter().chain(addr) {
            self.settle_vip(a)?;
        }
        if let Some(a) = addr
            && self.vip_flags(a) != Some(VIP_F_HAIRPIN)
        {
            tracing::error!(
                "the hairpin SNAT address {a} is also a Service address: pick another one \
                 (--hairpin-snat-address)"
            );
        }
        Ok(())
    }

    /// Check the established flows of every programmed frontend with source ranges against them
    /// from now on, for those whose ranges the trie holds (`ranged`: their reverse-NAT ids,
    /// after `SourceRanges::sync` wrote them all); returns the map writes.
    pub fn flag_source_ranges(&mut self, ranged: &BTreeSet<u32>) -> Result<usize> {
        let wanted: Vec<(u32, bool)> = self
            .cur
            .frontends
            .values()
            .map(|f| {
                (
                    f.rev_nat_id,
                    f.flags & SVC_F_SOURCE_RANGES != 0 && ranged.contains(&f.rev_nat_id),
                )
            })
            .collect();
        let mut writes = 0;
        for (id, on) in wanted {
            writes += self.set_source_ranges_flag(id, on)?;
        }
        Ok(writes)
    }

    /// Stop checking the established flows of frontends `ids` against their source ranges
    /// (before those change); returns the map writes.
    pub fn unflag_source_ranges(&mut self, ids: &BTreeSet<u32>) -> Result<usize> {
        let mut writes = 0;
        for id in ids {
            writes += self.set_source_ranges_flag(*id, false)?;
        }
        Ok(writes)
    }

    /// Flip `REVNAT_F_SOURCE_RANGES` of an active reverse-NAT entry in place (the other bytes
    /// stay: a torn read sees the old flags or the new); returns the map writes.
    fn set_source_ranges_flag(&mut self, id: u32, on: bool) -> Result<usize> {
        let (Some(fe), Some(&flags)) = (self.cur.revnat.get(&id), self.cur.revnat_flags.get(&id))
        else {
            return Ok(0);
        };
        let want = if on {
            flags | REVNAT_F_SOURCE_RANGES
        } else {
            flags & !REVNAT_F_SOURCE_RANGES
        };
        if want == flags {
            return Ok(0);
        }
        let v = RevNat4 {
            addr: fe.addr.octets(),
            port: fe.port.to_be_bytes(),
            flags: want,
            generation: self.revnat_space.generation(id),
        };
        self.maps
            .revnat_set(id, v)
            .with_context(|| format!("writing reverse-NAT {id} ({fe})"))?;
        self.cur.revnat_flags.insert(id, want);
        Ok(1)
    }

    /// Set `port`'s bit if it is not (before a reverse-NAT entry for it is written).
    fn ensure_port(&mut self, port: u16) -> Result<()> {
        Self::ensure_bit(&mut self.maps, &mut self.ports, port_bit(port))
            .with_context(|| format!("writing the port bitmap (port {port})"))
    }

    /// Whether the backend filter was empty when this writer started: then the sources of the
    /// reply entries already in conntrack go in with [`Self::seed_backend_filter`] before the
    /// programs are attached.
    pub fn backend_filter_fresh(&self) -> bool {
        self.backbits_fresh
    }

    /// Sets the backend filter's bits for these (address, port) wire bytes: the sources of the
    /// conntrack reply entries a previous build left (which knew no filter).
    pub fn seed_backend_filter(
        &mut self,
        sources: impl IntoIterator<Item = ([u8; 4], [u8; 2])>,
    ) -> Result<usize> {
        let sources: Vec<([u8; 4], [u8; 2])> = sources.into_iter().collect();
        self.set_backbits(sources.iter().copied())?;
        self.backbits_fresh = false;
        Ok(sources.len())
    }

    /// Sets the backend filter's bits for these (address, port) wire bytes in one batch (a start
    /// programs up to a million backends: one syscall, not one per backend). A batch that stops
    /// half-way keeps what went in; the caller's error says the rest did not.
    fn set_backbits(
        &mut self,
        backends: impl IntoIterator<Item = ([u8; 4], [u8; 2])>,
    ) -> Result<usize> {
        let Some(words) = self.backbits.as_mut() else {
            return Ok(0);
        };
        let mut bits: Vec<(u32, u64)> = backends
            .into_iter()
            .map(|(addr, port)| backend_bit(addr, port))
            .filter(|&(word, bit)| words.get(word as usize).is_some_and(|w| w & bit == 0))
            .collect();
        bits.sort_unstable_by_key(|&(word, _)| word);
        let mut changed: Vec<(u32, u64)> = Vec::new();
        for (word, bit) in bits {
            match changed.last_mut() {
                Some((w, v)) if *w == word => *v |= bit,
                _ => changed.push((word, words[word as usize] | bit)),
            }
        }
        let (done, failed) = match self.maps.bits_set_all(BitMap::Backends, &changed) {
            Ok(()) => (changed.len(), None),
            Err((n, e)) => (n, Some(e)),
        };
        for &(word, v) in &changed[..done] {
            words[word as usize] = v;
        }
        match failed {
            Some(e) => Err(e.context("writing the backend filter")),
            None => Ok(done),
        }
    }

    fn ensure_vipbit(&mut self, addr: Ipv4Addr) -> Result<()> {
        Self::ensure_bit(&mut self.maps, &mut self.vipbits, addr_bit(addr.octets()))
            .with_context(|| format!("writing the frontend address filter ({addr})"))
    }

    fn ensure_bit(maps: &mut M, bits: &mut Bits, (word, bit): (u32, u64)) -> Result<()> {
        let have = bits.written[word as usize];
        if have.is_none_or(|h| h & bit == 0) {
            // An unknown word gets what is wanted of it besides: nothing is lost.
            let v = have.unwrap_or_else(|| bits.want(word)) | bit;
            maps.bits_set(bits.map, word, v)?;
            bits.written[word as usize] = Some(v);
        }
        Ok(())
    }

    /// Write the bitmap words whose holders changed; returns the writes.
    fn settle_bits(&mut self) -> Result<usize> {
        Ok(self.settle_bitmap(BitMap::Ports)? + self.settle_bitmap(BitMap::Addrs)?)
    }

    fn settle_bitmap(&mut self, map: BitMap) -> Result<usize> {
        let mut writes = 0;
        let bits = match map {
            BitMap::Ports => &mut self.ports,
            BitMap::Addrs => &mut self.vipbits,
            // Set-only, written as bits are set (`set_backbits`).
            BitMap::Backends => return Ok(0),
        };
        // The words that differ from what is written, in one batch.
        let dirty = std::mem::take(&mut bits.dirty);
        let changed: Vec<(u32, u64)> = dirty
            .iter()
            .map(|&w| (w, bits.want(w)))
            .filter(|&(w, want)| bits.written[w as usize] != Some(want))
            .collect();
        let (done, failed) = match self.maps.bits_set_all(bits.map, &changed) {
            Ok(()) => (changed.len(), None),
            Err((n, e)) => (n, Some(e)),
        };
        for &(w, want) in &changed[..done] {
            bits.written[w as usize] = Some(want);
            writes += 1;
        }
        if let Some(e) = failed {
            // The words not written wait for the next settle.
            bits.dirty.extend(changed[done..].iter().map(|&(w, _)| w));
            return Err(e).with_context(|| format!("writing {:?}", bits.map));
        }
        Ok(writes)
    }

    /// Make the address entry of `addr` say what its programmed frontends call for.
    fn settle_vip(&mut self, addr: Ipv4Addr) -> Result<()> {
        let want = self.vip_flags(addr);
        if want == self.vips.get(&addr).copied() {
            return Ok(());
        }
        match want {
            Some(flags) => {
                self.ensure_vipbit(addr)?;
                self.maps
                    .vip_set(addr, flags)
                    .with_context(|| format!("writing frontend address {addr}"))?;
                if self.vips.insert(addr, flags).is_none() {
                    self.vipbits.add(addr_bit(addr.octets()));
                }
            }
            None => {
                self.maps
                    .vip_remove(addr)
                    .with_context(|| format!("removing frontend address {addr}"))?;
                if self.vips.remove(&addr).is_some() {
                    self.vipbits.remove(addr_bit(addr.octets()));
                }
            }
        }
        Ok(())
    }

    /// Before a frontend is written: its address is in the address map with at least the flags
    /// it calls for (a full map fails the frontend while nothing of it is written).
    fn ensure_vip(&mut self, addr: Ipv4Addr, frontend_flags: u16) -> Result<usize> {
        let have = self.vips.get(&addr).copied();
        let want = have.unwrap_or(0) | vip_flags_of(frontend_flags);
        if have == Some(want) {
            return Ok(0);
        }
        self.ensure_vipbit(addr)?;
        self.maps
            .vip_set(addr, want)
            .with_context(|| format!("writing frontend address {addr}"))?;
        if self.vips.insert(addr, want).is_none() {
            self.vipbits.add(addr_bit(addr.octets()));
        }
        Ok(1)
    }

    /// Frontend addresses as the writer last wrote them (tests).
    pub fn vips(&self) -> &BTreeMap<Ipv4Addr, u32> {
        &self.vips
    }

    pub fn programmed(&self) -> &Programmed {
        &self.cur
    }

    /// Generation of a backend id (0: never used).
    pub fn backend_generation(&self, id: u32) -> u32 {
        self.backend_space.generation(id)
    }

    /// Generation of a reverse-NAT id (0: never used).
    pub fn revnat_generation(&self, id: u32) -> u32 {
        self.revnat_space.generation(id)
    }

    /// Frontends that failed to apply and wait for a retry.
    pub fn pending(&self) -> &BTreeSet<L4Addr> {
        &self.pending
    }

    #[cfg(test)]
    fn read_back_for_test(&self) -> Programmed {
        self.maps
            .read_back()
            .map(|r| r.programmed)
            .unwrap_or_default()
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Give the maps back (a test simulating a restart hands them to a new writer).
    pub fn into_maps(self) -> M {
        self.maps
    }

    /// Make the maps say `target`, except for frontends that do not fit (listed in
    /// `ApplyStats::failed`, retried by the next apply). An `Err` is a failure of the maps
    /// themselves; the maps stay consistent (every frontend points only at written slots and live
    /// backends) and a later full apply repairs the rest.
    pub fn apply(&mut self, target: &Target) -> Result<ApplyStats> {
        let frontends: BTreeSet<L4Addr> = target
            .frontends
            .keys()
            .chain(self.cur.frontends.keys())
            .copied()
            .collect();
        let backends: BTreeSet<L4Addr> = target
            .backends
            .keys()
            .chain(self.backend_ids.keys())
            .copied()
            .collect();
        let mut st = self.apply_keys(target, &frontends, &backends)?;
        // Addresses left behind by an apply that failed half-way (no frontend names them any
        // more, so no key leads back to them).
        let stale: Vec<Ipv4Addr> = self
            .vips
            .iter()
            .filter(|(a, f)| self.vip_flags(**a) != Some(**f))
            .map(|(a, _)| *a)
            .collect();
        for addr in stale {
            self.settle_vip(addr)?;
            st.map_writes += 1;
        }
        st.map_writes += self.settle_bits()?;
        st.map_writes += self.sweep_affmatch()?;
        Ok(st)
    }

    /// Remove the membership pairs of frontends that are gone or lost their affinity (adopted
    /// from a run that stopped half-way): the pairs of the others are kept in step as each is
    /// applied. Returns the map writes.
    fn sweep_affmatch(&mut self) -> Result<usize> {
        let named: BTreeSet<u32> = self
            .cur
            .frontends
            .values()
            .filter(|f| f.flags & SVC_F_AFFINITY != 0)
            .map(|f| f.rev_nat_id)
            .collect();
        let strays: BTreeSet<u32> = self
            .affmatch
            .iter()
            .map(|(r, _)| *r)
            .filter(|r| !named.contains(r))
            .collect();
        let mut writes = 0;
        for r in strays {
            writes += self.sync_affmatch(r, None, true)?;
        }
        Ok(writes)
    }

    /// Make the affinity membership pairs of frontend `rev_nat_id` what `want` calls for: its
    /// slots' backends when it has session affinity, none otherwise. Pairs that go are removed
    /// first (a failed add must not leave a departed backend followed); with `add` false only
    /// they are. Returns the map writes.
    fn sync_affmatch(
        &mut self,
        rev_nat_id: u32,
        want: Option<&FrontendEntry>,
        add: bool,
    ) -> Result<usize> {
        let desired: BTreeSet<u32> = want
            .filter(|w| w.flags & SVC_F_AFFINITY != 0)
            .map(|w| w.slots.iter().copied().collect())
            .unwrap_or_default();
        let have: Vec<u32> = self
            .affmatch
            .range((rev_nat_id, 0)..=(rev_nat_id, u32::MAX))
            .map(|(_, b)| *b)
            .collect();
        let mut writes = 0;
        for b in have {
            if !desired.contains(&b) {
                self.maps.affmatch_remove(rev_nat_id, b).with_context(|| {
                    format!("removing affinity membership of backend {b} in frontend {rev_nat_id}")
                })?;
                self.affmatch.remove(&(rev_nat_id, b));
                writes += 1;
            }
        }
        if !add {
            return Ok(writes);
        }
        for &b in &desired {
            if !self.affmatch.contains(&(rev_nat_id, b)) {
                self.maps.affmatch_set(rev_nat_id, b).with_context(|| {
                    format!("writing affinity membership of backend {b} in frontend {rev_nat_id}")
                })?;
                self.affmatch.insert((rev_nat_id, b));
                writes += 1;
            }
        }
        Ok(writes)
    }

    /// Like `apply`, but only for the given frontends and backends (the ones whose desired state
    /// may have changed) plus the frontends that failed before: work proportional to the change,
    /// not to the number of services.
    pub fn apply_keys(
        &mut self,
        target: &Target,
        frontends: &BTreeSet<L4Addr>,
        backends: &BTreeSet<L4Addr>,
    ) -> Result<ApplyStats> {
        let mut st = ApplyStats::default();
        self.expire_retiring(target, Instant::now(), &mut st)?;
        self.expire_draining(Instant::now(), &mut st)?;
        let mut retry: Vec<L4Addr> = self
            .pending
            .iter()
            .filter(|k| !frontends.contains(k))
            .copied()
            .collect();
        // Maglev frontends waiting for a table: another frontend may have freed one.
        retry.extend(
            self.maglev
                .starved
                .iter()
                .filter(|k| !frontends.contains(k) && !self.pending.contains(k)),
        );
        let keys = || frontends.iter().chain(&retry);
        for k in &retry {
            self.pending.remove(k);
        }
        for k in frontends {
            self.pending.remove(k);
        }

        // 1. Removals first, so that deleting Services makes room for the ones waiting.
        let mut released = Vec::new();
        let gone: Vec<L4Addr> = keys()
            .filter(|k| !target.frontends.contains_key(k) && self.cur.frontends.contains_key(k))
            .copied()
            .collect();
        for fe in gone {
            if let Err(e) = self.remove_frontend(&fe, &mut st, &mut released) {
                self.fail(&mut st, fe, None, &e);
            }
        }
        let candidates: Vec<L4Addr> = backends
            .iter()
            .copied()
            .chain(self.addrs_of(&released))
            .collect();
        self.sweep_backends(target, &candidates, &mut st)?;

        // 2. Flags of backends that stay (terminating or not): in place, an array write.
        for (addr, &flags) in backends
            .iter()
            .filter_map(|a| target.backends.get(a).map(|f| (a, f)))
        {
            let Some(&id) = self.backend_ids.get(addr) else {
                // Not written until a slot names it: no flow can be on it before that.
                continue;
            };
            if self.cur.backends.get(&id) != Some(&(*addr, flags)) {
                let generation = self.backend_space.generation(id);
                self.maps
                    .backend_set(id, backend_value(addr, flags, generation))
                    .with_context(|| format!("writing backend {id} ({addr})"))?;
                st.map_writes += 1;
                self.cur.backends.insert(id, (*addr, flags));
            }
        }

        // 3. Each frontend on its own.
        let mut released = Vec::new();
        let wanted: Vec<(L4Addr, &TargetFrontend)> = keys()
            .filter_map(|k| target.frontends.get(k).map(|t| (*k, t)))
            .collect();
        // The filter bits of the backends these frontends add, in one batch ahead of them (a
        // bit set early costs the filter a false positive at most). What does not go in, each
        // frontend sets for itself (`apply_frontend`), and fails if it cannot.
        let adding: Vec<([u8; 4], [u8; 2])> = wanted
            .iter()
            .flat_map(|(_, t)| &t.slots)
            .filter(|a| !self.backend_ids.contains_key(a))
            .map(|a| (a.addr.octets(), a.port.to_be_bytes()))
            .collect();
        if let Err(e) = self.set_backbits(adding) {
            tracing::debug!("{e:#}; each frontend sets its own");
        }
        // New Maglev frontends (no table of theirs to derive the next from) get theirs filled
        // ahead, in the order they are applied.
        let fresh: Vec<(L4Addr, &[L4Addr])> = wanted
            .iter()
            .filter(|(fe, t)| {
                self.maglev.serves(t)
                    && self.cur.frontends.get(fe).is_none_or(|o| {
                        o.flags & SVC_F_MAGLEV == 0
                            || !(1..=self.maglev.tables).contains(&o.maglev_table)
                    })
            })
            .map(|(fe, t)| (*fe, t.slots.as_slice()))
            .collect();
        let m = self.maglev.m;
        std::thread::scope(|s| {
            let (rx, worker) = if fresh.len() >= MAGLEV_AHEAD_MIN {
                let (tx, rx) = std::sync::mpsc::sync_channel(MAGLEV_AHEAD_DEPTH);
                let jobs = &fresh;
                let worker = s.spawn(move || {
                    for &(frontend, slots) in jobs {
                        let indexed: Vec<(L4Addr, u32)> = slots.iter().copied().zip(0..).collect();
                        let table = maglev::populate(&indexed, m);
                        let ahead = Ahead {
                            frontend,
                            slots: slots.to_vec(),
                            table,
                        };
                        if tx.send(ahead).is_err() {
                            break;
                        }
                    }
                });
                (Some(rx), Some(worker))
            } else {
                (None, None)
            };
            let mut next = fresh.iter().map(|(fe, _)| *fe).peekable();
            for (fe, t) in wanted {
                if next.next_if_eq(&fe).is_some() {
                    // A worker that died leaves the writer to fill the rest itself.
                    self.maglev.ahead = rx.as_ref().and_then(|rx| rx.recv().ok());
                }
                if let Err(e) = self.apply_frontend(&fe, t, target, &mut st, &mut released) {
                    self.fail(&mut st, fe, Some(t.service.clone()), &e);
                }
                self.maglev.ahead = None;
            }
            // The worker stops at its next send, if it has not finished.
            drop(rx);
            if let Some(w) = worker
                && w.join().is_err()
            {
                tracing::warn!("the Maglev fill thread panicked; the writer filled the tables");
            }
        });

        // 4. Backends that changed frontends stopped naming.
        let candidates: Vec<L4Addr> = self.addrs_of(&released).collect();
        self.sweep_backends(target, &candidates, &mut st)?;

        // 5. Addresses whose last frontend went, or whose flags narrowed: after the frontends.
        let addrs: BTreeSet<Ipv4Addr> = keys().map(|k| k.addr).collect();
        for addr in addrs {
            if self.vips.get(&addr).copied() != self.vip_flags(addr) {
                self.settle_vip(addr)?;
                st.map_writes += 1;
            }
        }
        // 6. Ports no reverse-NAT entry uses any more.
        st.map_writes += self.settle_bits()?;
        Ok(st)
    }

    fn fail(
        &mut self,
        st: &mut ApplyStats,
        fe: L4Addr,
        service: Option<ServicePortName>,
        e: &anyhow::Error,
    ) {
        self.pending.insert(fe);
        st.failed.push(FailedFrontend {
            frontend: fe,
            service,
            reason: format!("{e:#}"),
        });
    }

    fn addrs_of<'a>(&'a self, ids: &'a [u32]) -> impl Iterator<Item = L4Addr> + 'a {
        ids.iter()
            .filter_map(|id| self.cur.backends.get(id).map(|(a, _)| *a))
    }

    /// Slot 0 first (the frontend disappears at once), then the slots, then reverse-NAT.
    fn remove_frontend(
        &mut self,
        fe: &L4Addr,
        st: &mut ApplyStats,
        released: &mut Vec<u32>,
    ) -> Result<()> {
        let Some(old) = self.cur.frontends.get(fe).cloned() else {
            return Ok(());
        };
        // First: a failure then changes nothing (the frontend is retried whole), and a frontend
        // going away takes no new affinity flows anyway.
        st.map_writes += self.sync_affmatch(old.rev_nat_id, None, true)?;
        // Its ranges go with it (`ranges.rs` keeps those of programmed frontends): its draining
        // flows are not checked against them any more, rather than against nothing.
        st.map_writes += self.set_source_ranges_flag(old.rev_nat_id, false)?;
        self.maps
            .svc_remove(&svc_key(fe, 0))
            .with_context(|| format!("removing frontend {fe}"))?;
        st.map_writes += 1;
        self.cur.frontends.remove(fe);
        self.maglev.starved.remove(fe);
        self.maglev.retire(old.maglev_table, Instant::now());
        st.frontends_removed += 1;
        if fe.proto & !PROTO_EXTERNAL_VIEW == IPPROTO_UDP {
            // As kube-proxy clears the UDP conntrack entries of a deleted Service port: a UDP
            // flow has no end to wait for, and draining would keep a client that sends every
            // few seconds on the old backend for the whole grace period, while a re-created
            // Service (or one at another address) is never picked. The slots still hold their
            // ids (unref below releases them): the generations are those of its backends.
            let purges: Vec<_> = old
                .slots
                .iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(|&backend_id| crate::conntrack::Purge {
                    rev_nat_id: old.rev_nat_id,
                    rev_nat_gen: self.revnat_space.generation(old.rev_nat_id),
                    backend_id,
                    backend_gen: self.backend_space.generation(backend_id),
                })
                .collect();
            self.udp_purges.extend(purges);
        }
        self.unref(&old.slots, released);
        for slot in 1..=old.slots.len() {
            // Invisible already (slot 0 is gone): a failure leaves garbage, not a wrong answer.
            if let Err(e) = self.maps.svc_remove(&svc_key(fe, slot_u16(slot)?)) {
                tracing::warn!("removing slot {slot} of {fe}: {e:#}");
            }
            st.map_writes += 1;
        }
        if self.endpoint_grace.is_zero() {
            if let Some(id) = self.revnat_ids.remove(fe) {
                self.free_revnat(id)?;
                st.map_writes += 1;
            }
        } else if self.revnat_ids.contains_key(fe) {
            self.draining
                .insert(*fe, Instant::now() + self.endpoint_grace);
            st.frontends_draining += 1;
        }
        Ok(())
    }

    /// The UDP purges the applies since the last call asked for, whether or not they succeeded
    /// as a whole.
    pub fn take_udp_purges(&mut self) -> Vec<crate::conntrack::Purge> {
        std::mem::take(&mut self.udp_purges)
    }

    /// Frontends removed but still translating their established flows.
    pub fn draining(&self) -> impl Iterator<Item = &L4Addr> + '_ {
        self.draining.keys()
    }

    /// Let draining frontends and orphaned reverse-NAT entries go once past their deadline
    /// (`now`); one back in the target stops draining when it is applied.
    fn expire_draining(&mut self, now: Instant, st: &mut ApplyStats) -> Result<()> {
        let due: Vec<L4Addr> = self
            .draining
            .iter()
            .filter(|(_, d)| now >= **d)
            .map(|(fe, _)| *fe)
            .collect();
        for fe in due {
            self.end_draining(&fe)?;
            st.map_writes += 1;
        }
        let due: Vec<u32> = self
            .orphans
            .iter()
            .filter(|(_, d)| now >= **d)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.orphans.remove(&id);
            let addr = self.cur.revnat.get(&id).map(|r| r.addr);
            self.free_revnat(id)?;
            if let Some(addr) = addr {
                self.settle_vip(addr)?;
            }
            st.map_writes += 1;
        }
        Ok(())
    }

    fn end_draining(&mut self, fe: &L4Addr) -> Result<()> {
        self.draining.remove(fe);
        if let Some(id) = self.revnat_ids.remove(fe) {
            self.free_revnat(id)?;
        }
        self.settle_vip(fe.addr)
    }

    /// New frontends before old connections: when reverse-NAT ids run out, the draining frontend
    /// (or orphan) closest to its deadline gives its id up early.
    fn free_a_draining_revnat(&mut self) -> Result<()> {
        if let Some((&id, _)) = self.orphans.iter().min_by_key(|(_, d)| **d) {
            self.orphans.remove(&id);
            let addr = self.cur.revnat.get(&id).map(|r| r.addr);
            self.free_revnat(id)?;
            return addr.map_or(Ok(()), |a| self.settle_vip(a));
        }
        if let Some((fe, _)) = self
            .draining
            .iter()
            .min_by_key(|(_, d)| **d)
            .map(|(fe, d)| (*fe, *d))
        {
            self.end_draining(&fe)?;
        }
        Ok(())
    }

    fn unref(&mut self, slots: &[u32], released: &mut Vec<u32>) {
        for id in slots {
            if let Some(n) = self.backend_refs.get_mut(id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.backend_refs.remove(id);
                    released.push(*id);
                }
            }
        }
    }

    /// Free the backends among `addrs` that left the target and that no slot names any more.
    fn sweep_backends(
        &mut self,
        target: &Target,
        addrs: &[L4Addr],
        st: &mut ApplyStats,
    ) -> Result<()> {
        for addr in addrs {
            if target.backends.contains_key(addr) {
                continue;
            }
            let Some(&id) = self.backend_ids.get(addr) else {
                continue;
            };
            if self.backend_refs.contains_key(&id) || self.retiring.contains_key(&id) {
                continue;
            }
            if addr.proto == IPPROTO_TCP && !self.endpoint_grace.is_zero() {
                // Marked terminating: what the data path reads as "no new connections" (session
                // affinity skips it too).
                let flags = self
                    .cur
                    .backends
                    .get(&id)
                    .map_or(BACKEND_F_ACTIVE, |(_, f)| *f)
                    | BACKEND_F_TERMINATING;
                let generation = self.backend_space.generation(id);
                self.maps
                    .backend_set(id, backend_value(addr, flags, generation))
                    .with_context(|| format!("retiring backend {id} ({addr})"))?;
                st.map_writes += 1;
                self.cur.backends.insert(id, (*addr, flags));
                self.retiring
                    .insert(id, (*addr, Instant::now() + self.endpoint_grace));
                st.backends_retiring += 1;
                continue;
            }
            self.free_backend(addr, id)?;
            st.map_writes += 1;
            st.backends_removed += 1;
        }
        Ok(())
    }

    /// The algorithm of frontends whose Service names none (`--lb-algorithm`).
    pub fn set_default_lb_algorithm(&mut self, algorithm: LbAlgorithm) {
        self.maglev.default_on = algorithm == LbAlgorithm::Maglev;
    }

    /// How long a Maglev table slot 0 stopped naming stays untouched (tests).
    pub fn set_maglev_quarantine(&mut self, quarantine: Duration) {
        self.maglev.quarantine = quarantine;
    }

    /// Maglev frontends without a table (table space exhausted): they hash over slots.
    pub fn maglev_starved(&self) -> &BTreeSet<L4Addr> {
        &self.maglev.starved
    }

    /// How long TCP backends that left every Service keep their connections (0: none).
    pub fn set_endpoint_grace(&mut self, grace: Duration) {
        self.endpoint_grace = grace;
        let deadline = Instant::now() + grace;
        for d in self.orphans.values_mut() {
            *d = deadline;
        }
    }

    /// Backends kept for their established connections, by id.
    pub fn retiring(&self) -> impl Iterator<Item = (u32, L4Addr)> + '_ {
        self.retiring.iter().map(|(id, (addr, _))| (*id, *addr))
    }

    /// Let retiring backends go: those back in the target stay (as ordinary backends), those
    /// past their deadline are freed.
    fn expire_retiring(
        &mut self,
        target: &Target,
        now: Instant,
        st: &mut ApplyStats,
    ) -> Result<()> {
        let ids: Vec<(u32, L4Addr, Instant)> = self
            .retiring
            .iter()
            .map(|(id, (addr, deadline))| (*id, *addr, *deadline))
            .collect();
        for (id, addr, deadline) in ids {
            if target.backends.contains_key(&addr) {
                self.retiring.remove(&id);
            } else if now >= deadline && !self.backend_refs.contains_key(&id) {
                self.retiring.remove(&id);
                self.free_backend(&addr, id)?;
                st.map_writes += 1;
                st.backends_removed += 1;
            }
        }
        Ok(())
    }

    /// [`Self::apply`] as it would run at `now` (tests: past every grace period).
    pub fn apply_at(&mut self, target: &Target, now: Instant) -> Result<ApplyStats> {
        let mut st = ApplyStats::default();
        self.expire_retiring(target, now, &mut st)?;
        self.expire_draining(now, &mut st)?;
        let more = self.apply(target)?;
        Ok(more.merged(st))
    }

    /// The entry stays with its generation and without the active flag: conntrack entries that
    /// name it are stale from now on, and the pinned map remembers the id was used.
    fn free_backend(&mut self, addr: &L4Addr, id: u32) -> Result<()> {
        let generation = self.backend_space.generation(id);
        self.maps
            .backend_set(
                id,
                Backend4 {
                    generation,
                    ..Backend4::default()
                },
            )
            .with_context(|| format!("clearing backend {id} ({addr})"))?;
        self.backend_ids.remove(addr);
        self.cur.backends.remove(&id);
        self.backend_space.release(id);
        Ok(())
    }

    fn free_revnat(&mut self, id: u32) -> Result<()> {
        let generation = self.revnat_space.generation(id);
        self.maps
            .revnat_set(
                id,
                RevNat4 {
                    generation,
                    ..RevNat4::default()
                },
            )
            .with_context(|| format!("clearing reverse-NAT {id}"))?;
        if let Some(fe) = self.cur.revnat.remove(&id) {
            self.ports.remove(port_bit(fe.port));
        }
        self.cur.revnat_flags.remove(&id);
        self.revnat_space.release(id);
        Ok(())
    }

    /// An id for a new backend, taken in the bookkeeping only: the caller writes it with
    /// [`Self::backend_writes`] before anything names it, or frees it (`roll_back`).
    fn alloc_backend(&mut self, addr: &L4Addr, flags: u8) -> Result<u32> {
        if self.backend_space.free_count() == 0 {
            // New Services before old connections: the retiring backend closest to its deadline
            // gives its id up early (one, only when an id is needed).
            let oldest = self
                .retiring
                .iter()
                .filter(|(id, _)| !self.backend_refs.contains_key(id))
                .min_by_key(|(_, (_, deadline))| *deadline)
                .map(|(id, (a, _))| (*id, *a));
            if let Some((id, a)) = oldest {
                self.retiring.remove(&id);
                self.free_backend(&a, id)?;
            }
        }
        let Some((id, _)) = self.backend_space.alloc() else {
            bail!(
                "no free backend id for {addr} (the backend map holds {} entries; \
                 raise --max-backends)",
                self.backend_space.gens.len()
            );
        };
        self.cur.backends.insert(id, (*addr, flags));
        self.backend_ids.insert(*addr, id);
        Ok(id)
    }

    /// The writes that publish allocated backends, in order. Array updates are an in-place copy
    /// a packet may read half-way: publishing the new generation on an inactive entry first
    /// means no mix of old and new bytes can pair the new address with the old generation
    /// (which a stale conntrack entry would match).
    fn backend_writes(&self, ids: &[(L4Addr, u32)]) -> Vec<(u32, Backend4)> {
        let mut w = Vec::with_capacity(2 * ids.len());
        for (addr, id) in ids {
            let generation = self.backend_space.generation(*id);
            let flags = self.cur.backends.get(id).map_or(0, |(_, f)| *f);
            w.push((
                *id,
                Backend4 {
                    generation,
                    ..Backend4::default()
                },
            ));
            w.push((*id, backend_value(addr, flags, generation)));
        }
        w
    }

    /// Give back ids `alloc_backend` took for backends never written active: bookkeeping only,
    /// no map write (which could fail and leave an id recorded as written).
    fn unreserve(&mut self, backends: &[(L4Addr, u32)], st: &mut ApplyStats) {
        for (addr, id) in backends {
            self.backend_ids.remove(addr);
            self.cur.backends.remove(id);
            self.backend_space.release(*id);
            st.map_writes = st.map_writes.saturating_sub(1);
            st.backends_added = st.backends_added.saturating_sub(1);
        }
    }

    /// Undo the backends and reverse-NAT entry a failed frontend allocated: nothing names them.
    fn roll_back(
        &mut self,
        backends: &[(L4Addr, u32)],
        revnat: Option<(L4Addr, u32)>,
        st: &mut ApplyStats,
    ) {
        for (addr, id) in backends {
            if self.backend_refs.contains_key(id) {
                continue;
            }
            match self.free_backend(addr, *id) {
                Ok(()) => {
                    st.map_writes += 1;
                    st.backends_added = st.backends_added.saturating_sub(1);
                }
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
        if let Some((fe, id)) = revnat {
            self.revnat_ids.remove(&fe);
            match self.free_revnat(id) {
                Ok(()) => st.map_writes += 1,
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
    }

    /// Backends, reverse-NAT, slots, slot 0; on failure what this call allocated is freed again
    /// and the frontend is left as it was.
    fn apply_frontend(
        &mut self,
        fe: &L4Addr,
        t: &TargetFrontend,
        target: &Target,
        st: &mut ApplyStats,
        released: &mut Vec<u32>,
    ) -> Result<()> {
        let mut new_backends: Vec<(L4Addr, u32)> = Vec::new();
        let mut slots = Vec::with_capacity(t.slots.len());
        for a in &t.slots {
            let id = match self.backend_ids.get(a) {
                Some(&id) => id,
                None => {
                    let allocated = match target.backends.get(a) {
                        Some(&flags) => self.alloc_backend(a, flags),
                        None => Err(anyhow::anyhow!(
                            "backend {a} of a slot is missing from the target's backends"
                        )),
                    };
                    match allocated {
                        Ok(id) => {
                            st.map_writes += 1;
                            st.backends_added += 1;
                            new_backends.push((*a, id));
                            id
                        }
                        Err(e) => {
                            self.unreserve(&new_backends, st);
                            return Err(e);
                        }
                    }
                }
            };
            slots.push(id);
        }
        // The new backends in one batch, before anything names them, their filter bits first.
        let filtered = self.set_backbits(
            new_backends
                .iter()
                .map(|(a, _)| (a.addr.octets(), a.port.to_be_bytes())),
        );
        if let Err(e) = filtered {
            self.unreserve(&new_backends, st);
            return Err(e);
        }
        let writes = self.backend_writes(&new_backends);
        if let Err((n, e)) = self.maps.backend_set_all(&writes) {
            let id = writes.get(n).map_or(0, |(id, _)| *id);
            let addr = self.cur.backends.get(&id).map(|(a, _)| *a);
            // Backend k's value is write 2k + 1: those in are cleared again, the others were
            // never active (at most their new generation went in) and only give their ids back.
            let published = (n / 2).min(new_backends.len());
            self.roll_back(&new_backends[..published], None, st);
            self.unreserve(&new_backends[published..], st);
            return Err(e.context(match addr {
                Some(a) => format!("writing backend {id} ({a})"),
                None => format!("writing backend {id}"),
            }));
        }

        let mut new_revnat = None;
        let mut first_use = false;
        let rev_nat_id = match self.revnat_ids.get(fe) {
            Some(&id) => id,
            None => {
                if self.revnat_space.free_count() == 0
                    && let Err(e) = self.free_a_draining_revnat()
                {
                    self.roll_back(&new_backends, None, st);
                    return Err(e);
                }
                let Some((id, _, first)) = self.revnat_space.take() else {
                    self.roll_back(&new_backends, None, st);
                    bail!(
                        "no free reverse-NAT id (the reverse-NAT map holds {} entries; raise \
                         --max-frontends)",
                        self.revnat_space.gens.len()
                    );
                };
                self.revnat_ids.insert(*fe, id);
                new_revnat = Some((*fe, id));
                first_use = first;
                id
            }
        };
        // The node program checks the established flows of a frontend with source ranges against
        // them when its reverse-NAT entry says so. Set only once the ranges are in the trie
        // (`flag_source_ranges`, after they are written); kept while the frontend has ranges,
        // cleared here, before the ranges go, when it has none any more.
        let had = self
            .cur
            .revnat_flags
            .get(&rev_nat_id)
            .is_some_and(|f| f & REVNAT_F_SOURCE_RANGES != 0);
        let revnat_flags = if t.flags & SVC_F_SOURCE_RANGES != 0 && had {
            REVNAT_F_ACTIVE | REVNAT_F_SOURCE_RANGES
        } else {
            REVNAT_F_ACTIVE
        };
        if self.cur.revnat.get(&rev_nat_id).map(|a| (a.addr, a.port)) != Some((fe.addr, fe.port))
            || self.cur.revnat_flags.get(&rev_nat_id) != Some(&revnat_flags)
        {
            let generation = self.revnat_space.generation(rev_nat_id);
            let v = RevNat4 {
                addr: fe.addr.octets(),
                port: fe.port.to_be_bytes(),
                flags: revnat_flags,
                generation,
            };
            // A reused id: the new generation first, inactive (see `backend_writes`). An id
            // never used has nothing to retire: a packet reading the write half-way sees
            // generation 0 (which no flow has) or the new one (which no flow has yet).
            let retire = RevNat4 {
                generation,
                ..RevNat4::default()
            };
            let write = self.ensure_port(fe.port).and_then(|()| {
                if new_revnat.is_some() && !first_use {
                    self.maps.revnat_set(rev_nat_id, retire)
                } else {
                    Ok(())
                }
            });
            if let Err(e) = write.and_then(|()| self.maps.revnat_set(rev_nat_id, v)) {
                if let Some((_, id)) = new_revnat {
                    self.revnat_ids.remove(fe);
                    self.revnat_space.release(id);
                }
                self.roll_back(&new_backends, None, st);
                return Err(e).with_context(|| format!("writing reverse-NAT {rev_nat_id} ({fe})"));
            }
            st.map_writes += 1;
            if let Some(old) = self
                .cur
                .revnat
                .insert(rev_nat_id, L4Addr { proto: 0, ..*fe })
            {
                self.ports.remove(port_bit(old.port));
            }
            self.ports.add(port_bit(fe.port));
            self.cur.revnat_flags.insert(rev_nat_id, revnat_flags);
        }

        let (wants_maglev, fits) = self.maglev.wants_and_fits(t);
        let maglev = wants_maglev && fits;
        if wants_maglev && !fits {
            if self.maglev.too_large.insert(*fe) {
                tracing::warn!(
                    service = %t.service,
                    backends = slots.len(),
                    table_size = self.maglev.m,
                    "more backends than a tenth of --maglev-table-size: this frontend hashes over \
                     its slots instead of Maglev (raise --maglev-table-size, a prime)"
                );
            }
        } else {
            self.maglev.too_large.remove(fe);
        }
        let flags = if maglev {
            t.flags | SVC_F_MAGLEV
        } else {
            t.flags
        };
        // The table depends only on the backends: kept while the slots are the same.
        let kept_table = self
            .cur
            .frontends
            .get(fe)
            .filter(|o| maglev && o.flags & SVC_F_MAGLEV != 0 && o.slots == slots)
            .map(|o| o.maglev_table)
            .filter(|t| (1..=self.maglev.tables).contains(t) && !self.maglev.free.contains(t));
        let mut new_table = 0;
        let maglev_table = match kept_table {
            Some(t) => t,
            None if maglev => {
                let prev = self
                    .cur
                    .frontends
                    .get(fe)
                    .filter(|o| o.flags & SVC_F_MAGLEV != 0)
                    .map_or(0, |o| o.maglev_table);
                new_table = match self.write_maglev_table(fe, &slots, prev, st) {
                    Ok(t) => t,
                    Err(e) => {
                        self.roll_back(&new_backends, new_revnat, st);
                        return Err(e);
                    }
                };
                new_table
            }
            None => 0,
        };
        if maglev && maglev_table == 0 {
            self.maglev.starved.insert(*fe);
        } else {
            self.maglev.starved.remove(fe);
        }
        let want = FrontendEntry {
            rev_nat_id,
            flags,
            affinity_timeout_s: t.affinity_timeout_s,
            slots,
            maglev_table,
        };
        let old = self.cur.frontends.get(fe);
        if old == Some(&want) {
            // Written before a restart or a failed apply, maybe without its membership pairs.
            st.map_writes += self.sync_affmatch(want.rev_nat_id, Some(&want), true)?;
            return Ok(());
        }
        let old = old.cloned();
        // Departing backends stop being followed before the slots change. A failure costs
        // nothing here: the sync after the write removes them again or fails the frontend.
        if let Err(e) = self.sync_affmatch(want.rev_nat_id, Some(&want), false) {
            tracing::warn!("{e:#}");
        }
        match self
            .ensure_vip(fe.addr, want.flags)
            .and_then(|vip_writes| Ok(vip_writes + self.write_frontend(fe, old.as_ref(), &want)?))
        {
            Ok(writes) => st.map_writes += writes,
            Err(e) => {
                // Slot 0 never named the new table.
                self.maglev.give_back(new_table);
                self.roll_back(&new_backends, new_revnat, st);
                return Err(e);
            }
        }
        if let Some(o) = &old
            && o.maglev_table != want.maglev_table
            && (1..=self.maglev.tables).contains(&o.maglev_table)
        {
            self.maglev.retire(o.maglev_table, Instant::now());
        }
        match &old {
            None => st.frontends_added += 1,
            Some(_) => st.frontends_changed += 1,
        }
        for id in &want.slots {
            *self.backend_refs.entry(*id).or_default() += 1;
        }
        if let Some(old) = &old {
            if fe.proto & !PROTO_EXTERNAL_VIEW == IPPROTO_UDP {
                // The old slots still hold their ids (unref below releases them): the generation
                // is that of the backend that left.
                let purges: Vec<_> = old
                    .slots
                    .iter()
                    .filter(|id| !want.slots.contains(id))
                    .map(|&backend_id| crate::conntrack::Purge {
                        rev_nat_id,
                        rev_nat_gen: self.revnat_space.generation(rev_nat_id),
                        backend_id,
                        backend_gen: self.backend_space.generation(backend_id),
                    })
                    .collect();
                self.udp_purges.extend(purges);
            }
            self.unref(&old.slots, released);
        }
        let written = want.clone();
        self.cur.frontends.insert(*fe, want);
        // Back before its deadline: the same id, so its established flows stay valid.
        self.draining.remove(fe);
        // Added after the slots (the new backend is nobody's affinity yet); the departed ones'
        // went before them. A failure here leaves the frontend applied, and its retry (equal,
        // so the early return above) writes the pairs.
        st.map_writes += self.sync_affmatch(written.rev_nat_id, Some(&written), true)?;
        Ok(())
    }

    /// A new table for `slots` (backend ids, already written), derived from the frontend's
    /// table in use (`prev`, 0: none) so that only the flows that must move do, and written
    /// whole into a free table that no slot 0 names: the caller's slot 0 write is the swap.
    /// 0: no table is free (the frontend hashes over its slots until one is; logged once,
    /// counted by the kernel).
    fn write_maglev_table(
        &mut self,
        fe: &L4Addr,
        slots: &[u32],
        prev: u32,
        st: &mut ApplyStats,
    ) -> Result<u32> {
        let Some(table) = self.maglev.alloc(Instant::now()) else {
            if !self.maglev.warned {
                self.maglev.warned = true;
                tracing::warn!(
                    frontend = %fe,
                    "no free Maglev table (raise --max-maglev-tables): frontends without one \
                     use slot hashing (vipx_datapath_events_total{{reason=\"maglev_fallback\"}})"
                );
            }
            return Ok(0);
        };
        self.maglev.warned = false;
        let backends: Vec<(L4Addr, u32)> = slots
            .iter()
            .filter_map(|id| self.cur.backends.get(id).map(|(a, _)| (*a, *id)))
            .collect();
        let prev = if (1..=self.maglev.tables).contains(&prev) {
            self.maps.maglev_read(prev).unwrap_or_else(|e| {
                tracing::warn!("reading the Maglev table of {fe}: {e:#}; building afresh");
                Vec::new()
            })
        } else {
            Vec::new()
        };
        let ids = match self.maglev.ahead.take() {
            Some(a)
                if a.frontend == *fe
                    && prev.is_empty()
                    && a.table.len() == self.maglev.m as usize
                    && backends.iter().map(|(addr, _)| addr).eq(&a.slots) =>
            {
                #[cfg(test)]
                {
                    self.maglev.ahead_used += 1;
                }
                // `backends` is `slots` in order: slot index i has id slots[i].
                a.table
                    .iter()
                    .map(|&i| backends.get(i as usize).map_or(0, |(_, id)| *id))
                    .collect()
            }
            _ => maglev::repopulate(&prev, &backends, self.maglev.m),
        };
        if let Err(e) = self.maps.maglev_write(table, &ids) {
            self.maglev.give_back(table);
            return Err(e).with_context(|| format!("writing the Maglev table of {fe}"));
        }
        st.map_writes += 1;
        Ok(table)
    }

    /// Write one frontend so that at every moment slot 0's count only covers written slots, and
    /// so that a full map leaves it as it was: the new keys (slots beyond the old count, slot 0 of
    /// a new frontend) are the only writes that can find the map full, and the slots are written
    /// while slot 0 does not reach them yet.
    fn write_frontend(
        &mut self,
        fe: &L4Addr,
        old: Option<&FrontendEntry>,
        new: &FrontendEntry,
    ) -> Result<usize> {
        let old_slots: &[u32] = old.map_or(&[], |o| &o.slots);
        let slot_value = |backend_id| SvcValue {
            backend_id,
            ..SvcValue::default()
        };
        let common = old_slots.len().min(new.slots.len());

        // New slots, then rewritten ones, then slot 0, written in this order in one batch.
        let mut writes: Vec<(SvcKey4, SvcValue)> = Vec::with_capacity(new.slots.len() + 1);
        let mut was: Vec<u32> = Vec::new();
        for (i, &id) in new.slots.iter().enumerate().skip(common) {
            writes.push((svc_key(fe, slot_u16(i + 1)?), slot_value(id)));
        }
        let grown_n = writes.len();
        for (i, (&id, &old)) in new.slots.iter().zip(old_slots).enumerate() {
            if id != old {
                writes.push((svc_key(fe, slot_u16(i + 1)?), slot_value(id)));
                was.push(old);
            }
        }
        let head = SvcValue {
            // Slot 0's backend id names the Maglev table; this write is the table swap.
            backend_id: new.maglev_table,
            rev_nat_id: new.rev_nat_id,
            count: slot_u16(new.slots.len())?,
            flags: new.flags,
            affinity_timeout_s: new.affinity_timeout_s,
        };
        writes.push((svc_key(fe, 0), head));
        let (result, written) = match self.maps.svc_insert_all(&writes) {
            Ok(()) => (Ok(()), writes.len()),
            Err((n, e)) => (
                Err(e.context(match writes.get(n) {
                    Some((k, _)) if k.slot != 0 => format!("writing slot {} of {fe}", k.slot),
                    _ => format!("writing frontend {fe}"),
                })),
                n,
            ),
        };
        let grown: Vec<SvcKey4> = writes[..written.min(grown_n)]
            .iter()
            .map(|(k, _)| *k)
            .collect();
        let rewritten: Vec<(SvcKey4, u32)> = writes[grown_n..written.max(grown_n)]
            .iter()
            .zip(&was)
            .map(|((k, _), w)| (*k, *w))
            .collect();
        if let Err(e) = result {
            // Back to the old state: slot 0 still has the old count, so the slots it reaches get
            // their old backends back and the ones beyond it go.
            for (key, was) in rewritten {
                if let Err(e) = self.maps.svc_insert(key, slot_value(was)) {
                    tracing::warn!("restoring slot {} of {fe}: {e:#}", key.slot);
                }
            }
            for key in grown {
                if let Err(e) = self.maps.svc_remove(&key) {
                    tracing::warn!("removing slot {} of {fe}: {e:#}", key.slot);
                }
            }
            return Err(e);
        }
        let mut writes = writes.len();
        for slot in new.slots.len() + 1..=old_slots.len() {
            // Beyond the count already: a failure leaves garbage a later write overwrites.
            if let Err(e) = self.maps.svc_remove(&svc_key(fe, slot_u16(slot)?)) {
                tracing::warn!("removing slot {slot} of {fe}: {e:#}");
            }
            writes += 1;
        }
        Ok(writes)
    }
}

const fn vip_flags_of(frontend_flags: u16) -> u32 {
    if frontend_flags & SVC_F_CLUSTER_IP != 0 {
        VIP_F_CLUSTER_IP
    } else {
        0
    }
}

fn backend_value(addr: &L4Addr, flags: u8, generation: u32) -> Backend4 {
    Backend4 {
        addr: addr.addr.octets(),
        port: addr.port.to_be_bytes(),
        proto: addr.proto,
        flags,
        generation,
    }
}

fn slot_u16(n: usize) -> Result<u16> {
    match u16::try_from(n) {
        Ok(v) => Ok(v),
        Err(_) => bail!("slot {n} out of range"),
    }
}

pub fn svc_key(fe: &L4Addr, slot: u16) -> SvcKey4 {
    SvcKey4::new(fe.addr.octets(), fe.port, fe.proto, SCOPE_EXTERNAL, slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{Endpoint, Frontend, ServicePort};

    fn spn(name: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port_name: "http".into(),
            protocol,
        }
    }

    fn ep(ip: [u8; 4], port: u16, terminating: bool) -> Endpoint {
        Endpoint {
            addr: IpAddr::V4(Ipv4Addr::from(ip)),
            port,
            ready: !terminating,
            serving: true,
            terminating,
            local: false,
        }
    }

    #[test]
    fn target_maps_frontends_and_backends() {
        let mut d = DesiredState::default();
        d.services.insert(
            spn("a", Protocol::Tcp),
            ServicePort {
                frontends: vec![
                    Frontend {
                        addr: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
                        port: 80,
                        kind: FrontendKind::ClusterIp,
                    },
                    Frontend {
                        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        port: 30080,
                        kind: FrontendKind::NodePort,
                    },
                    Frontend {
                        addr: "2001:db8::10".parse().unwrap(),
                        port: 80,
                        kind: FrontendKind::ClusterIp,
                    },
                ],
                endpoints: vec![
                    ep([10, 0, 0, 1], 5000, false),
                    ep([10, 0, 0, 2], 5000, true),
                ],
                internal_pick: vec![0],
                external_pick: vec![0],
                pod_external_pick: vec![0],
                affinity_timeout_s: Some(60),
                internal_local: false,
                external_local: false,
                lb_algorithm: None,
                source_ranges: Vec::new(),
            },
        );
        let (t, problems) = target(&d);
        assert_eq!(
            problems,
            [
                "default/a: IPv6 part not programmed (IPv6 is not supported yet; IPv4 is): \
                 frontends [2001:db8::10]:80/TCP",
            ]
        );
        assert_eq!(t.frontends.len(), 2, "IPv6 is not programmed yet");
        let mut frontends = t.frontends.iter();
        // The node port is one frontend on the unspecified address.
        let (k, f) = frontends.next().unwrap();
        assert_eq!(k.to_string(), "0.0.0.0:30080/TCP");
        assert_eq!(f.flags, SVC_F_NODE_PORT | SVC_F_AFFINITY);
        let (k, f) = frontends.next().unwrap();
        assert_eq!(k.to_string(), "10.96.0.10:80/TCP");
        assert_eq!(f.flags, SVC_F_CLUSTER_IP | SVC_F_AFFINITY);
        assert_eq!(f.slots.len(), 1);
        assert_eq!(f.slots[0].addr, Ipv4Addr::new(10, 0, 0, 1));
        // The terminating endpoint is a backend (established flows keep it) but not a slot.
        assert_eq!(t.backends.len(), 2);
        let term = L4Addr {
            addr: Ipv4Addr::new(10, 0, 0, 2),
            port: 5000,
            proto: 6,
        };
        assert_eq!(t.backends[&term], BACKEND_F_ACTIVE | BACKEND_F_TERMINATING);

        // On a node with addresses, the node port is also a frontend on each of them, with the
        // same backends; other frontends are unchanged.
        let node = [Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(10, 2, 0, 5)];
        let (on_node, _) = target_on(&d, &node);
        let keys: Vec<String> = on_node.frontends.keys().map(ToString::to_string).collect();
        assert_eq!(
            keys,
            [
                "0.0.0.0:30080/TCP",
                "10.1.0.5:30080/TCP",
                "10.2.0.5:30080/TCP",
                "10.96.0.10:80/TCP"
            ]
        );
        let wildcard = &on_node.frontends.values().next().unwrap();
        for f in on_node.frontends.values().take(3) {
            assert_eq!(f.flags, SVC_F_NODE_PORT | SVC_F_AFFINITY);
            assert_eq!(f.slots, wildcard.slots);
        }
    }

    #[test]
    fn external_traffic_policy_local_gives_external_clients_a_view_of_local_endpoints() {
        let mut d = DesiredState::default();
        let fe = |addr: Ipv4Addr, port, kind| Frontend {
            addr: IpAddr::V4(addr),
            port,
            kind,
        };
        d.services.insert(
            spn("a", Protocol::Udp),
            ServicePort {
                frontends: vec![
                    fe(Ipv4Addr::new(10, 96, 0, 10), 53, FrontendKind::ClusterIp),
                    fe(Ipv4Addr::UNSPECIFIED, 30053, FrontendKind::NodePort),
                    fe(
                        Ipv4Addr::new(203, 0, 113, 7),
                        53,
                        FrontendKind::LoadBalancer,
                    ),
                ],
                endpoints: vec![ep([10, 0, 0, 1], 53, false), ep([10, 0, 1, 1], 53, false)],
                internal_pick: vec![0, 1],
                external_pick: vec![0],
                pod_external_pick: vec![0, 1],
                affinity_timeout_s: None,
                internal_local: false,
                external_local: true,
                lb_algorithm: None,
                source_ranges: Vec::new(),
            },
        );
        let (t, problems) = target_on(&d, &[Ipv4Addr::new(10, 1, 0, 5)]);
        assert!(problems.is_empty(), "{problems:?}");
        let keys: Vec<String> = t.frontends.keys().map(ToString::to_string).collect();
        // The loopback-only wildcard and the ClusterIP get no view.
        assert_eq!(
            keys,
            [
                "0.0.0.0:30053/UDP",
                "10.1.0.5:30053/UDP",
                "10.1.0.5:30053/UDP+external",
                "10.96.0.10:53/UDP",
                "203.0.113.7:53/UDP",
                "203.0.113.7:53/UDP+external"
            ]
        );
        for (k, f) in &t.frontends {
            let view = k.proto & PROTO_EXTERNAL_VIEW != 0;
            let wants_view = !view && !k.addr.is_unspecified() && k.port != 53
                || k.addr == Ipv4Addr::new(203, 0, 113, 7) && !view;
            assert_eq!(f.flags & SVC_F_EXTERNAL_VIEW != 0, wants_view, "{k}");
            // Views hold this node's endpoints only; everything else every endpoint.
            let want = if view { 1 } else { 2 };
            assert_eq!(f.slots.len(), want, "{k}");
        }
    }

    #[test]
    fn unsupported_parts_are_reported_once_per_service() {
        let v6 = |a: &str, port| Frontend {
            addr: a.parse().unwrap(),
            port,
            kind: FrontendKind::ClusterIp,
        };
        let port = |frontends: Vec<Frontend>, endpoints: Vec<Endpoint>| ServicePort {
            internal_pick: (0..endpoints.len()).collect(),
            external_pick: (0..endpoints.len()).collect(),
            pod_external_pick: (0..endpoints.len()).collect(),
            frontends,
            endpoints,
            affinity_timeout_s: None,
            internal_local: false,
            external_local: false,
            lb_algorithm: None,
            source_ranges: Vec::new(),
        };
        let v6_ep = |a: &str| Endpoint {
            addr: a.parse().unwrap(),
            ..ep([0; 4], 8080, false)
        };
        let mut d = DesiredState::default();
        // An IPv6-only Service with two ports: one line for the Service.
        for (port_name, p) in [("http", 80), ("https", 443)] {
            let mut name = spn("six", Protocol::Tcp);
            name.port_name = port_name.into();
            d.services.insert(
                name,
                port(vec![v6("fd00::10", p)], vec![v6_ep("fd00:10:244::5")]),
            );
        }
        // SCTP is reported and not written; its TCP sibling is.
        let mut sctp = spn("mixed", Protocol::Sctp);
        sctp.port_name = "sig".into();
        let cip = Frontend {
            addr: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)),
            port: 3868,
            kind: FrontendKind::ClusterIp,
        };
        d.services
            .insert(sctp, port(vec![cip], vec![ep([10, 0, 0, 9], 3868, false)]));
        d.services.insert(
            spn("mixed", Protocol::Tcp),
            port(vec![cip], vec![ep([10, 0, 0, 9], 3868, false)]),
        );
        let (t, problems) = target(&d);
        assert_eq!(
            problems,
            [
                "default/mixed: port sig/SCTP not programmed (SCTP is not supported)",
                "default/six: IPv6 Service not programmed (IPv6 is not supported yet): frontends \
                 [fd00::10]:443/TCP, [fd00::10]:80/TCP; 1 endpoints",
            ]
        );
        assert_eq!(t.frontends.len(), 1);
        assert!(t.frontends.keys().all(|k| k.proto == 6));
        assert_eq!(t.backends.len(), 1);
    }

    /// The kernel maps' behaviour as far as the writer can tell: a hash map that refuses new keys
    /// when full, arrays of a fixed size.
    #[derive(Debug)]
    struct FakeMaps {
        svc: BTreeMap<SvcKey4, SvcValue>,
        svc_max: usize,
        vips: BTreeMap<Ipv4Addr, u32>,
        vips_max: usize,
        backends: Vec<Backend4>,
        revnat: Vec<RevNat4>,
        maglev_m: u32,
        /// Table t (1-based) at index t - 1.
        maglev: Vec<Vec<u32>>,
        /// Every table write, in order (tests of the swap order).
        maglev_writes: Vec<u32>,
        /// Clearing this backend id fails (a map write failing half-way through an apply).
        fail_clearing: Option<u32>,
        affmatch: BTreeSet<(u32, u32)>,
        /// Adding a pair fails beyond this many (a full map).
        affmatch_max: usize,
        ports: Vec<u64>,
        vipbits: Vec<u64>,
        backbits: Vec<u64>,
        /// Reverse-NAT ids ever written (an entry never written is all zeros).
        revnat_written: BTreeSet<u32>,
    }

    impl FakeMaps {
        fn new(svc_max: usize, backends: usize, revnat: usize) -> Self {
            Self {
                svc: BTreeMap::new(),
                svc_max,
                vips: BTreeMap::new(),
                vips_max: usize::MAX,
                backends: vec![Backend4::default(); backends],
                revnat: vec![RevNat4::default(); revnat],
                maglev_m: 13,
                maglev: vec![Vec::new(); 8],
                maglev_writes: Vec::new(),
                fail_clearing: None,
                affmatch: BTreeSet::new(),
                affmatch_max: usize::MAX,
                ports: vec![0; PORTS_WORDS as usize],
                vipbits: vec![0; VIPBITS_WORDS as usize],
                backbits: vec![0; BACKBITS_WORDS as usize],
                revnat_written: BTreeSet::new(),
            }
        }

        fn port_set(&self, port: [u8; 2]) -> bool {
            let (word, bit) = port_bit(u16::from_be_bytes(port));
            self.ports[word as usize] & bit != 0
        }

        fn with_maglev(mut self, m: u32, tables: usize) -> Self {
            self.maglev_m = m;
            self.maglev = vec![Vec::new(); tables];
            self
        }

        /// Tables some slot 0 names.
        fn named_tables(&self) -> BTreeSet<u32> {
            self.svc
                .iter()
                .filter(|(k, v)| k.slot == 0 && v.flags & SVC_F_MAGLEV != 0 && v.backend_id != 0)
                .map(|(_, v)| v.backend_id)
                .collect()
        }

        /// What the data path relies on: a frontend's count covers written slots, each naming an
        /// active backend, and its reverse-NAT entry is active.
        fn assert_consistent(&self) {
            for (k, v) in self.svc.iter().filter(|(k, _)| k.slot == 0) {
                let flags = self.vips.get(&Ipv4Addr::from(k.addr));
                let flags = flags.unwrap_or_else(|| panic!("{k:?}: address missing"));
                assert!(
                    v.flags & SVC_F_CLUSTER_IP == 0 || flags & VIP_F_CLUSTER_IP != 0,
                    "{k:?}: address not flagged ClusterIP"
                );
                assert!(
                    self.revnat
                        .get(v.rev_nat_id as usize)
                        .is_some_and(|r| r.flags & REVNAT_F_ACTIVE != 0),
                    "{k:?}: reverse-NAT {} inactive",
                    v.rev_nat_id
                );
                // The node program checks established flows against source ranges by it: never
                // for a frontend without ranges.
                assert!(
                    self.revnat[v.rev_nat_id as usize].flags & REVNAT_F_SOURCE_RANGES == 0
                        || v.flags & SVC_F_SOURCE_RANGES != 0,
                    "{k:?}: reverse-NAT source-ranges flag without ranges"
                );
                if v.flags & SVC_F_MAGLEV != 0 && v.backend_id != 0 {
                    // The table is whole and names exactly the frontend's slot backends.
                    let table = &self.maglev[v.backend_id as usize - 1];
                    assert_eq!(table.len(), self.maglev_m as usize, "{k:?}: table size");
                    let slots: BTreeSet<u32> = (1..=v.count)
                        .filter_map(|i| self.svc.get(&k.with_slot(i)).map(|s| s.backend_id))
                        .collect();
                    let named: BTreeSet<u32> = table.iter().copied().collect();
                    assert_eq!(named, slots, "{k:?}: table and slots disagree");
                }
                for slot in 1..=v.count {
                    let s = self.svc.get(&k.with_slot(slot));
                    let s = s.unwrap_or_else(|| panic!("{k:?}: slot {slot} missing"));
                    assert!(
                        self.backends
                            .get(s.backend_id as usize)
                            .is_some_and(Backend4::is_active),
                        "{k:?}: slot {slot} names inactive backend {}",
                        s.backend_id
                    );
                }
            }
            // Exactly the ports of active reverse-NAT entries have their bit.
            let mut want = vec![0u64; PORTS_WORDS as usize];
            for r in self
                .revnat
                .iter()
                .filter(|r| r.flags & REVNAT_F_ACTIVE != 0)
            {
                let (word, bit) = port_bit(u16::from_be_bytes(r.port));
                want[word as usize] |= bit;
            }
            assert!(
                want == self.ports,
                "port bitmap differs from the reverse-NAT ports"
            );
            // And exactly the frontend addresses have theirs in the address filter.
            let mut want = vec![0u64; VIPBITS_WORDS as usize];
            for a in self.vips.keys() {
                let (word, bit) = addr_bit(a.octets());
                want[word as usize] |= bit;
            }
            assert!(
                want == self.vipbits,
                "address filter differs from the address map"
            );
        }

        fn active_backends(&self) -> usize {
            self.backends.iter().filter(|b| b.is_active()).count()
        }
    }

    impl MapStore for FakeMaps {
        fn bits_set(&mut self, map: BitMap, word: u32, bits: u64) -> Result<()> {
            // No holder the programs can still see loses its bit.
            match map {
                BitMap::Ports => {
                    for r in self
                        .revnat
                        .iter()
                        .filter(|r| r.flags & REVNAT_F_ACTIVE != 0)
                    {
                        let (w, bit) = port_bit(u16::from_be_bytes(r.port));
                        assert!(w != word || bits & bit != 0, "port of {r:?} cleared");
                    }
                    self.ports[word as usize] = bits;
                }
                BitMap::Addrs => {
                    for a in self.vips.keys() {
                        let (w, bit) = addr_bit(a.octets());
                        assert!(w != word || bits & bit != 0, "filter bit of {a} cleared");
                    }
                    self.vipbits[word as usize] = bits;
                }
                BitMap::Backends => {
                    let was = self.backbits[word as usize];
                    assert_eq!(was & !bits, 0, "a backend filter bit cleared");
                    self.backbits[word as usize] = bits;
                }
            }
            Ok(())
        }

        fn svc_insert(&mut self, key: SvcKey4, value: SvcValue) -> Result<()> {
            if !self.svc.contains_key(&key) && self.svc.len() >= self.svc_max {
                bail!("map full (E2BIG)");
            }
            assert!(
                self.port_set(key.port),
                "{key:?} written before its port bit"
            );
            if key.slot == 0 && value.flags & SVC_F_MAGLEV != 0 && value.backend_id != 0 {
                // Slot 0 names only a table already written whole, of live backends.
                let t = &self.maglev[value.backend_id as usize - 1];
                assert_eq!(
                    t.len(),
                    self.maglev_m as usize,
                    "table named before written"
                );
                assert!(
                    t.iter().all(|id| self
                        .backends
                        .get(*id as usize)
                        .is_some_and(Backend4::is_active)),
                    "table names an inactive backend"
                );
            }
            self.svc.insert(key, value);
            Ok(())
        }

        fn svc_remove(&mut self, key: &SvcKey4) -> Result<()> {
            self.svc.remove(key);
            Ok(())
        }

        fn backend_set(&mut self, id: u32, value: Backend4) -> Result<()> {
            if self.fail_clearing == Some(id) && !value.is_active() {
                bail!("injected failure clearing backend {id}");
            }
            let entry = self
                .backends
                .get_mut(id as usize)
                .context("backend id out of range")?;
            if value.is_active() {
                let (w, bit) = backend_bit(value.addr, value.port);
                assert!(
                    self.backbits[w as usize] & bit != 0,
                    "backend {id} written before its filter bit"
                );
            }
            // A packet may read an array entry half-written: an active entry must never get a
            // new generation in the same write as its new address.
            assert!(
                !value.is_active() || entry.generation == value.generation,
                "backend {id}: generation {} -> {} in one write with an active entry",
                entry.generation,
                value.generation
            );
            *entry = value;
            Ok(())
        }

        fn revnat_set(&mut self, id: u32, value: RevNat4) -> Result<()> {
            assert!(
                value.flags & REVNAT_F_ACTIVE == 0 || self.port_set(value.port),
                "reverse-NAT {id} written before its port bit"
            );
            let entry = self
                .revnat
                .get_mut(id as usize)
                .context("reverse-NAT id out of range")?;
            // An entry never written (generation 0, which no flow names) may go active at once.
            let never = self.revnat_written.insert(id);
            assert!(
                value.flags & REVNAT_F_ACTIVE == 0 || entry.generation == value.generation || never,
                "reverse-NAT {id}: generation {} -> {} in one write with an active entry",
                entry.generation,
                value.generation
            );
            *entry = value;
            Ok(())
        }

        fn vip_set(&mut self, addr: Ipv4Addr, flags: u32) -> Result<()> {
            if !self.vips.contains_key(&addr) && self.vips.len() >= self.vips_max {
                bail!("map full (E2BIG)");
            }
            let (word, bit) = addr_bit(addr.octets());
            assert!(
                self.vipbits[word as usize] & bit != 0,
                "{addr} written before its filter bit"
            );
            self.vips.insert(addr, flags);
            Ok(())
        }

        fn vip_remove(&mut self, addr: Ipv4Addr) -> Result<()> {
            self.vips.remove(&addr);
            Ok(())
        }

        fn maglev_geometry(&self) -> (u32, u32) {
            (self.maglev_m, self.maglev.len() as u32)
        }

        fn maglev_read(&self, table: u32) -> Result<Vec<u32>> {
            let t = self.maglev.get((table as usize).wrapping_sub(1));
            Ok(t.context("Maglev table out of range")?.clone())
        }

        fn maglev_write(&mut self, table: u32, ids: &[u32]) -> Result<()> {
            // The swap's premise: a table a frontend reads is never rewritten.
            assert!(
                !self.named_tables().contains(&table),
                "Maglev table {table} rewritten while a frontend uses it"
            );
            assert_eq!(ids.len(), self.maglev_m as usize);
            let t = self
                .maglev
                .get_mut((table as usize).wrapping_sub(1))
                .context("Maglev table out of range")?;
            *t = ids.to_vec();
            self.maglev_writes.push(table);
            Ok(())
        }

        fn read_back(&self) -> Result<ReadBack> {
            let svc: Vec<_> = self.svc.iter().map(|(k, v)| (*k, *v)).collect();
            let mut r = decode(&svc, &self.backends, &self.revnat)?;
            r.vips = self.vips.clone();
            r.affmatch = self.affmatch.clone();
            r.backbits = Some(self.backbits.clone());
            Ok(r)
        }

        fn affmatch_set(&mut self, rev_nat_id: u32, backend_id: u32) -> Result<()> {
            if !self.affmatch.contains(&(rev_nat_id, backend_id))
                && self.affmatch.len() >= self.affmatch_max
            {
                bail!("affinity membership map full");
            }
            self.affmatch.insert((rev_nat_id, backend_id));
            Ok(())
        }

        fn affmatch_remove(&mut self, rev_nat_id: u32, backend_id: u32) -> Result<()> {
            self.affmatch.remove(&(rev_nat_id, backend_id));
            Ok(())
        }
    }

    fn be(n: u8) -> L4Addr {
        L4Addr {
            addr: Ipv4Addr::new(10, 0, 0, n),
            port: 5000,
            proto: 6,
        }
    }

    fn vip(n: u8) -> L4Addr {
        L4Addr {
            addr: Ipv4Addr::new(10, 96, 0, n),
            port: 80,
            proto: 6,
        }
    }

    /// Services `vip(n)` -> backends, every backend active.
    fn target_of(services: &[(u8, &[u8])]) -> Target {
        let mut t = Target::default();
        for (n, backends) in services {
            for b in *backends {
                t.backends.insert(be(*b), BACKEND_F_ACTIVE);
            }
            t.frontends.insert(
                vip(*n),
                TargetFrontend {
                    service: spn(&format!("svc{n}"), Protocol::Tcp),
                    flags: SVC_F_CLUSTER_IP,
                    affinity_timeout_s: 0,
                    slots: backends.iter().map(|b| be(*b)).collect(),
                    lb_algorithm: None,
                    source_ranges: Vec::new(),
                },
            );
        }
        t
    }

    /// Review finding: the node program follows established flows by their conntrack entry, so
    /// a frontend's reverse-NAT entry must say whether it has source ranges, only once they are
    /// written (`flag_source_ranges`, after `SourceRanges::sync`), and not while it drains (its
    /// ranges are gone then). The flag follows in place (same id, same generation: its flows
    /// stay valid); the bitmaps hold exactly what they filter throughout (`assert_consistent`).
    #[test]
    fn the_reverse_nat_entry_says_whether_its_frontend_has_source_ranges() {
        let mut w = MapWriter::new(FakeMaps::new(64, 16, 16)).unwrap();
        let with_ranges = |on: bool| {
            let mut t = target_of(&[(1, &[1, 2])]);
            for f in t.frontends.values_mut() {
                if on {
                    f.flags |= SVC_F_SOURCE_RANGES;
                    f.source_ranges = vec![(Ipv4Addr::new(198, 18, 0, 0), 15)];
                }
            }
            t
        };
        let flags = |w: &MapWriter<FakeMaps>| {
            let id = w.programmed().frontends[&vip(1)].rev_nat_id;
            (id, w.maps().revnat[id as usize])
        };
        w.apply(&with_ranges(false)).unwrap();
        w.maps().assert_consistent();
        let (id, before) = flags(&w);
        assert_eq!(before.flags, REVNAT_F_ACTIVE);
        w.apply(&with_ranges(true)).unwrap();
        w.maps().assert_consistent();
        assert_eq!(flags(&w), (id, before), "not before the ranges are written");
        w.flag_source_ranges(&BTreeSet::from([id])).unwrap();
        let (same, on) = flags(&w);
        assert_eq!((same, on.generation), (id, before.generation));
        assert_eq!(on.flags, REVNAT_F_ACTIVE | REVNAT_F_SOURCE_RANGES);
        w.apply(&with_ranges(true)).unwrap();
        assert_eq!(flags(&w).1.flags, on.flags, "kept by the next apply");
        w.apply(&with_ranges(false)).unwrap();
        w.maps().assert_consistent();
        assert_eq!(flags(&w), (id, before), "cleared with the ranges");
        // Removed while flagged: it drains unflagged (its ranges leave the trie).
        w.apply(&with_ranges(true)).unwrap();
        w.flag_source_ranges(&BTreeSet::from([id])).unwrap();
        w.apply(&Target::default()).unwrap();
        assert!(w.draining().any(|f| *f == vip(1)));
        assert_eq!(w.maps().revnat[id as usize].flags, REVNAT_F_ACTIVE);
        w.apply(&with_ranges(false)).unwrap();
        // A restart adopts the flags: nothing to rewrite.
        let mut w = MapWriter::new(w.into_maps()).unwrap();
        assert_eq!(w.apply(&with_ranges(false)).unwrap().map_writes, 0);
    }

    /// Review finding: affinity was checked by the Maglev table position, so adding a backend
    /// moved about 1/(N+1) of the clients off theirs. The membership map follows the slots:
    /// every backend of an affinity frontend, nothing of one without.
    #[test]
    fn affinity_membership_follows_the_slots() {
        let mut w = MapWriter::new(FakeMaps::new(64, 16, 16).with_maglev(41, 3)).unwrap();
        let with_affinity = |services: &[(u8, &[u8])]| {
            let mut t = target_of(services);
            for f in t.frontends.values_mut() {
                f.flags |= SVC_F_AFFINITY;
                f.affinity_timeout_s = 60;
            }
            t
        };
        let pairs = |w: &MapWriter<FakeMaps>| -> Vec<(u32, L4Addr)> {
            w.maps()
                .affmatch
                .iter()
                .map(|(r, b)| (*r, w.programmed().backends[b].0))
                .collect()
        };
        w.apply(&with_affinity(&[(1, &[1, 2])])).unwrap();
        let r = w.programmed().frontends[&vip(1)].rev_nat_id;
        assert_eq!(pairs(&w), [(r, be(1)), (r, be(2))]);
        w.apply(&with_affinity(&[(1, &[1, 2, 3])])).unwrap();
        assert_eq!(pairs(&w), [(r, be(1)), (r, be(2)), (r, be(3))], "scale-up");
        w.apply(&with_affinity(&[(1, &[1, 3])])).unwrap();
        assert_eq!(pairs(&w), [(r, be(1)), (r, be(3))], "scale-down");
        w.apply(&target_of(&[(1, &[1, 3])])).unwrap();
        assert!(pairs(&w).is_empty(), "affinity switched off");
        w.apply(&with_affinity(&[(1, &[1, 3])])).unwrap();
        w.apply(&Target::default()).unwrap();
        assert!(w.maps().affmatch.is_empty(), "frontend removed");

        // Adopted (a build without the map, or a stray pair): right at adoption, before the
        // programs are swapped in and before any apply (review finding).
        w.apply(&with_affinity(&[(1, &[1, 2])])).unwrap();
        let mut maps = w.into_maps();
        maps.affmatch.clear();
        maps.affmatch.insert((9, 9));
        let w = MapWriter::new(maps).unwrap();
        let r = w.programmed().frontends[&vip(1)].rev_nat_id;
        assert_eq!(pairs(&w), [(r, be(1)), (r, be(2))]);

        // A pair that cannot be added (a full map) does not keep a departed backend followed:
        // removals go first (review finding).
        let mut w = w;
        w.maps.affmatch_max = 1;
        let st = w.apply(&with_affinity(&[(1, &[1, 3])])).unwrap();
        assert_eq!(
            failed_names(&st),
            ["svc1"],
            "the frontend fails and is retried"
        );
        assert_eq!(pairs(&w), [(r, be(1))], "backend 2 is no longer followed");
        w.maps.affmatch_max = usize::MAX;
        w.apply(&with_affinity(&[(1, &[1, 3])])).unwrap();
        assert_eq!(pairs(&w), [(r, be(1)), (r, be(3))], "the retry adds it");
    }

    /// Review finding: with more backends than table positions some got none (1,500 pods and
    /// M = 1021: 479 pods without new connections), and far fewer than M already skewed the
    /// load 2:1. Past M / 10 backends a frontend hashes over its slots.
    #[test]
    fn a_frontend_with_too_many_backends_for_the_table_hashes_over_its_slots() {
        let mut w = MapWriter::new(FakeMaps::new(64, 16, 16).with_maglev(41, 3)).unwrap();
        let four: &[u8] = &[1, 2, 3, 4];
        let five: &[u8] = &[1, 2, 3, 4, 5];
        w.apply(&target_of(&[(1, four), (2, five)])).unwrap();
        w.maps().assert_consistent();
        assert_ne!(
            head(&w, &vip(1)).flags & SVC_F_MAGLEV,
            0,
            "4 x 10 <= 41: Maglev"
        );
        assert_eq!(
            head(&w, &vip(2)).flags & SVC_F_MAGLEV,
            0,
            "5 x 10 > 41: slots"
        );
        assert_eq!(head(&w, &vip(2)).backend_id, 0, "no table");
        assert!(w.maglev_starved().is_empty());
        // Shrinking back under the bound gives it a table.
        w.apply(&target_of(&[(1, four), (2, four)])).unwrap();
        assert_ne!(head(&w, &vip(2)).flags & SVC_F_MAGLEV, 0);
        assert_eq!(table_of(&w, &vip(2)).len(), 41);
    }

    fn failed_names(st: &ApplyStats) -> Vec<String> {
        st.failed
            .iter()
            .map(|f| f.service.as_ref().map_or("?".into(), |s| s.name.clone()))
            .collect()
    }

    fn head(w: &MapWriter<FakeMaps>, fe: &L4Addr) -> SvcValue {
        w.maps().svc[&svc_key(fe, 0)]
    }

    fn table_of(w: &MapWriter<FakeMaps>, fe: &L4Addr) -> Vec<u32> {
        let t = head(w, fe).backend_id;
        assert_ne!(t, 0, "{fe} has no Maglev table");
        w.maps().maglev[t as usize - 1].clone()
    }

    /// Tables filled ahead on a worker thread (an apply with many new Maglev frontends, as at
    /// start) are the ones the writer fills itself: at every position the same backend.
    #[test]
    fn tables_filled_ahead_are_the_writers_own() {
        let n = MAGLEV_AHEAD_MIN as u8 + 9;
        let backs: Vec<Vec<u8>> = (0..n)
            .map(|i| (0..4).map(|j| (i * 3 + j * 7) % 90 + 1).collect())
            .collect();
        let services: Vec<(u8, &[u8])> = (0..n).map(|i| (i + 1, &backs[i as usize][..])).collect();
        let mut w =
            MapWriter::new(FakeMaps::new(1024, 256, 64).with_maglev(41, 2 * n as usize)).unwrap();
        let st = w.apply(&target_of(&services)).unwrap();
        assert_eq!(st.frontends_added, usize::from(n));
        assert_eq!(
            w.maglev.ahead_used,
            usize::from(n),
            "every table from the worker"
        );
        w.maps().assert_consistent();
        for (i, _) in &services {
            let fe = vip(*i);
            let slots = &w.programmed().frontends[&fe].slots;
            let backends: Vec<(L4Addr, u32)> = slots
                .iter()
                .map(|id| (w.programmed().backends[id].0, *id))
                .collect();
            assert_eq!(
                table_of(&w, &fe),
                maglev::populate(&backends, 41),
                "the table of {fe}"
            );
        }
    }

    #[test]
    fn maglev_table_swaps_only_after_it_is_written_and_old_ones_wait_out_a_quarantine() {
        let mut w = MapWriter::new(FakeMaps::new(64, 16, 16).with_maglev(41, 3)).unwrap();
        w.set_endpoint_grace(Duration::ZERO);
        w.set_maglev_quarantine(Duration::from_secs(3600));
        w.apply(&target_of(&[(1, &[1, 2, 3, 4])])).unwrap();
        w.maps().assert_consistent();
        let h = head(&w, &vip(1));
        assert!(h.flags & SVC_F_MAGLEV != 0);
        let first = h.backend_id;
        let before = table_of(&w, &vip(1));
        let id_of = |w: &MapWriter<FakeMaps>, n: u8| {
            *w.programmed()
                .backends
                .iter()
                .find(|(_, (a, _))| *a == be(n))
                .unwrap()
                .0
        };
        let removed = id_of(&w, 3);

        // Remove one of four: a new table, and only the removed backend's positions changed.
        w.apply(&target_of(&[(1, &[1, 2, 4])])).unwrap();
        w.maps().assert_consistent();
        let second = head(&w, &vip(1)).backend_id;
        assert_ne!(second, first, "rewritten in place");
        let after = table_of(&w, &vip(1));
        for (pos, (a, b)) in before.iter().zip(&after).enumerate() {
            assert!(
                a == b || *a == removed,
                "position {pos} moved from {a} to {b}"
            );
        }
        // The old table is not touched while quarantined.
        assert_eq!(w.maps().maglev[first as usize - 1], before);

        // Add one back: a third table; the quarantine keeps both old ones, so the next change
        // finds no table and the frontend hashes over its slots (still correct, flagged).
        w.apply(&target_of(&[(1, &[1, 2, 4, 5])])).unwrap();
        w.maps().assert_consistent();
        let third = head(&w, &vip(1)).backend_id;
        assert!(![0, first, second].contains(&third));
        w.apply(&target_of(&[(1, &[1, 2, 5])])).unwrap();
        w.maps().assert_consistent();
        let h = head(&w, &vip(1));
        assert!(h.flags & SVC_F_MAGLEV != 0 && h.backend_id == 0);
        assert_eq!(w.maglev_starved().len(), 1);

        // Once the quarantine has passed, the next apply (even with no change) gives it one.
        w.set_maglev_quarantine(Duration::ZERO);
        w.apply(&target_of(&[(1, &[1, 2, 5])])).unwrap();
        w.maps().assert_consistent();
        assert_ne!(head(&w, &vip(1)).backend_id, 0);
        assert!(w.maglev_starved().is_empty());

        // Removing the frontend frees its table.
        w.apply(&target_of(&[])).unwrap();
        assert!(w.maps().svc.is_empty());
        w.apply(&target_of(&[(2, &[1])])).unwrap();
        w.maps().assert_consistent();
    }

    #[test]
    fn lb_algorithm_per_service_with_a_default() {
        let mut w = MapWriter::new(FakeMaps::new(64, 16, 16).with_maglev(23, 4)).unwrap();
        let mut t = target_of(&[(1, &[1, 2]), (2, &[1, 2]), (3, &[])]);
        t.frontends.get_mut(&vip(2)).unwrap().lb_algorithm = Some(LbAlgorithm::Hash);
        w.apply(&t).unwrap();
        w.maps().assert_consistent();
        assert!(head(&w, &vip(1)).flags & SVC_F_MAGLEV != 0);
        assert!(head(&w, &vip(2)).flags & SVC_F_MAGLEV == 0);
        assert_eq!(head(&w, &vip(2)).backend_id, 0);
        // No backends: nothing to hash over, no table.
        assert_eq!(head(&w, &vip(3)).backend_id, 0);

        w.set_default_lb_algorithm(LbAlgorithm::Hash);
        t.frontends.get_mut(&vip(2)).unwrap().lb_algorithm = Some(LbAlgorithm::Maglev);
        w.apply(&t).unwrap();
        w.maps().assert_consistent();
        assert!(head(&w, &vip(1)).flags & SVC_F_MAGLEV == 0);
        assert!(head(&w, &vip(2)).flags & SVC_F_MAGLEV != 0);
    }

    #[test]
    fn a_restart_keeps_the_tables_and_derives_the_next_from_them() {
        let mut w = MapWriter::new(FakeMaps::new(64, 16, 16).with_maglev(41, 4)).unwrap();
        w.set_endpoint_grace(Duration::ZERO);
        let t = target_of(&[(1, &[1, 2, 3, 4])]);
        w.apply(&t).unwrap();
        let before = table_of(&w, &vip(1));
        let writes = w.maps().maglev_writes.len();

        let mut w = MapWriter::new(w.into_maps()).unwrap();
        w.set_endpoint_grace(Duration::ZERO);
        let st = w.apply(&t).unwrap();
        assert!(st.is_noop(), "{st:?}");
        assert_eq!(
            w.maps().maglev_writes.len(),
            writes,
            "table rewritten after restart"
        );

        let removed = head(&w, &vip(1));
        let gone = *w
            .programmed()
            .backends
            .iter()
            .find(|(_, (a, _))| *a == be(4))
            .unwrap()
            .0;
        w.apply(&target_of(&[(1, &[1, 2, 3])])).unwrap();
        w.maps().assert_consistent();
        assert_ne!(head(&w, &vip(1)).backend_id, removed.backend_id);
        let after = table_of(&w, &vip(1));
        assert!(before.iter().zip(&after).all(|(a, b)| a == b || *a == gone));
    }

    #[test]
    fn id_space_resumes_after_the_last_used_id_then_reuses_least_recently_freed() {
        // Ids 1 (held), 3 (freed, generation 2); 2, 4 and 5 never used.
        let mut ids = IdSpace::new(vec![0, 1, 0, 2, 0, 0], |id| id == 1);
        assert_eq!(ids.alloc(), Some((4, 1)), "the cursor resumes after id 3");
        assert_eq!(ids.alloc(), Some((5, 1)));
        // The cursor reached the end: never-used 2 first, then freed 3 with a bumped generation.
        assert_eq!(ids.alloc(), Some((2, 1)));
        assert_eq!(ids.alloc(), Some((3, 3)));
        assert_eq!(ids.alloc(), None);
        ids.release(5);
        ids.release(2);
        assert_eq!(ids.alloc(), Some((5, 2)), "least recently freed first");
        assert_eq!(ids.alloc(), Some((2, 2)));
        assert_eq!(ids.alloc(), None);
    }

    #[test]
    fn generation_skips_zero() {
        assert_eq!(next_generation(0), 1);
        assert_eq!(next_generation(7), 8);
        assert_eq!(next_generation(u32::MAX), 1);
        let mut ids = IdSpace::new(vec![0, u32::MAX], |_| false);
        assert_eq!(ids.alloc(), Some((1, 1)));
    }

    #[test]
    fn freed_entries_keep_their_generation_and_a_restart_does_not_reuse_them_at_once() {
        // Backend ids 1..=3.
        let mut w = MapWriter::new(FakeMaps::new(64, 4, 16)).unwrap();
        // These tests are about fitting and ids: freed backends go at once.
        w.set_endpoint_grace(Duration::ZERO);
        w.apply(&target_of(&[(1, &[1, 2])])).unwrap();
        assert_eq!(w.programmed().backends.len(), 2);
        let id_of = |w: &MapWriter<FakeMaps>, b: u8| {
            w.programmed()
                .backends
                .iter()
                .find(|(_, (a, _))| *a == be(b))
                .map(|(id, _)| *id)
        };
        let freed = id_of(&w, 1).unwrap();
        assert_eq!(w.backend_generation(freed), 1);
        let st = w.apply(&target_of(&[(1, &[2])])).unwrap();
        assert_eq!(st.backends_removed, 1);
        let entry = w.maps().backends[freed as usize];
        assert!(!entry.is_active());
        assert_eq!(entry.generation, 1, "a freed entry keeps its generation");

        // Restart: a new writer on the same maps.
        let mut w = MapWriter::new(w.into_maps()).unwrap();
        // These tests are about fitting and ids: freed backends go at once.
        w.set_endpoint_grace(Duration::ZERO);
        w.apply(&target_of(&[(1, &[2, 3])])).unwrap();
        let fresh = id_of(&w, 3).unwrap();
        assert_ne!(
            fresh, freed,
            "an id freed before the restart is not reused at once"
        );
        assert_eq!(w.backend_generation(fresh), 1);
        // The id space is used up: now the freed id is reused, with a new generation.
        w.apply(&target_of(&[(1, &[2, 3, 4])])).unwrap();
        assert_eq!(id_of(&w, 4), Some(freed));
        assert_eq!(w.maps().backends[freed as usize].generation, 2);
        assert_eq!(w.backend_generation(freed), 2);
        w.maps().assert_consistent();

        // Reverse-NAT ids behave the same way.
        let rn = w.programmed().frontends[&vip(1)].rev_nat_id;
        w.apply(&Target::default()).unwrap();
        assert_eq!(
            w.maps().revnat[rn as usize],
            RevNat4 {
                generation: 1,
                ..RevNat4::default()
            }
        );
        let mut w = MapWriter::new(w.into_maps()).unwrap();
        // These tests are about fitting and ids: freed backends go at once.
        w.set_endpoint_grace(Duration::ZERO);
        w.apply(&target_of(&[(1, &[2])])).unwrap();
        let again = w.programmed().frontends[&vip(1)].rev_nat_id;
        assert_ne!(again, rn);
        assert_eq!(w.revnat_generation(again), 1);
    }

    /// Services `vip(n)` over UDP -> backends (UDP, port 5353), every backend active.
    fn udp_target_of(services: &[(u8, &[u8])]) -> Target {
        let udp = |a: L4Addr| L4Addr {
            port: if a.proto == 6 { 5353 } else { 53 },
            proto: IPPROTO_UDP,
            ..a
        };
        let tcp = target_of(services);
        Target {
            frontends: tcp
                .frontends
                .into_iter()
                .map(|(k, mut f)| {
                    f.service.protocol = Protocol::Udp;
                    f.slots = f.slots.into_iter().map(udp).collect();
                    (L4Addr { port: 53, ..udp(k) }, f)
                })
                .collect(),
            backends: tcp.backends.into_iter().map(|(k, v)| (udp(k), v)).collect(),
        }
    }

    /// A UDP backend leaving a frontend asks for a purge of its flows there, with the id's
    /// generation; an apply that fails afterwards (here: freeing that very backend) keeps it.
    #[test]
    fn udp_purges_outlive_an_apply_that_fails_after_asking_for_them() {
        let mut w = MapWriter::new(FakeMaps::new(64, 16, 16)).unwrap();
        w.apply(&udp_target_of(&[(1, &[1, 2])])).unwrap();
        assert!(w.take_udp_purges().is_empty());
        let fe = L4Addr {
            port: 53,
            proto: IPPROTO_UDP,
            ..vip(1)
        };
        let rev_nat_id = w.programmed().frontends[&fe].rev_nat_id;
        let gone = w.programmed().frontends[&fe].slots[1];
        w.maps.fail_clearing = Some(gone);
        assert!(w.apply(&udp_target_of(&[(1, &[1])])).is_err());
        assert_eq!(
            w.take_udp_purges(),
            [crate::conntrack::Purge {
                rev_nat_id,
                rev_nat_gen: w.revnat_generation(rev_nat_id),
                backend_id: gone,
                backend_gen: w.backend_generation(gone),
            }]
        );
        assert!(w.take_udp_purges().is_empty(), "handed out once");
    }

    /// A UDP Service port deleted: its flows are purged from conntrack, to every backend it had
    /// (kube-proxy: `conntrack -D --orig-dst <ClusterIP> -p udp`), whether it drains or not; a
    /// TCP one's established connections drain instead.
    #[test]
    fn a_removed_udp_frontend_purges_its_flows() {
        for grace in [DEFAULT_ENDPOINT_GRACE, Duration::ZERO] {
            let mut w = MapWriter::new(FakeMaps::new(64, 16, 16)).unwrap();
            w.set_endpoint_grace(grace);
            let mut both = udp_target_of(&[(1, &[1, 2])]);
            let tcp = target_of(&[(2, &[3])]);
            both.frontends.extend(tcp.frontends.clone());
            both.backends.extend(tcp.backends.clone());
            w.apply(&both).unwrap();
            assert!(w.take_udp_purges().is_empty());
            let fe = L4Addr {
                port: 53,
                proto: IPPROTO_UDP,
                ..vip(1)
            };
            let old = w.programmed().frontends[&fe].clone();
            let want: BTreeSet<crate::conntrack::Purge> = old
                .slots
                .iter()
                .map(|&backend_id| crate::conntrack::Purge {
                    rev_nat_id: old.rev_nat_id,
                    rev_nat_gen: w.revnat_generation(old.rev_nat_id),
                    backend_id,
                    backend_gen: w.backend_generation(backend_id),
                })
                .collect();
            assert_eq!(want.len(), 2);
            w.apply(&Target::default()).unwrap();
            let got: BTreeSet<_> = w.take_udp_purges().into_iter().collect();
            assert_eq!(got, want, "grace {grace:?}");
        }
    }

    #[test]
    fn a_removed_tcp_backend_retires_and_gives_way_to_new_services_when_ids_run_out() {
        // Backend ids 1..=4.
        let mut w = MapWriter::new(FakeMaps::new(64, 5, 16)).unwrap();
        w.apply(&target_of(&[(1, &[1, 2]), (2, &[3, 4])])).unwrap();
        // Backend 2 leaves svc1: it retires, active in no slot, its id still held.
        let st = w.apply(&target_of(&[(1, &[1]), (2, &[3, 4])])).unwrap();
        assert_eq!((st.backends_retiring, st.backends_removed), (1, 0));
        assert_eq!(w.retiring().map(|(_, a)| a).collect::<Vec<_>>(), [be(2)]);
        assert_eq!(w.maps().active_backends(), 4);
        w.maps().assert_consistent();
        // A new Service needs an id: the retiring backend gives its up rather than the Service
        // failing.
        let st = w
            .apply(&target_of(&[(1, &[1]), (2, &[3, 4]), (3, &[5])]))
            .unwrap();
        assert!(st.failed.is_empty(), "{:?}", st.failed);
        assert_eq!(w.retiring().count(), 0);
        assert!(w.programmed().frontends.contains_key(&vip(3)));
        w.maps().assert_consistent();
    }

    /// Maps pinned by a build without the address map: a new writer fills it from the adopted
    /// frontends before any program is attached, and refuses to start when it cannot (the old
    /// program keeps serving); stale addresses go at the next full apply.
    #[test]
    fn adopted_frontends_get_their_addresses_before_anything_else() {
        let mut w = MapWriter::new(FakeMaps::new(64, 16, 16)).unwrap();
        let t = target_of(&[(1, &[1]), (2, &[2])]);
        w.apply(&t).unwrap();
        let mut maps = w.into_maps();
        maps.vips.clear();
        maps.vips_max = 1;
        assert!(
            MapWriter::new(maps).is_err(),
            "an address that cannot be written fails the start"
        );
        let mut w = MapWriter::new(FakeMaps::new(64, 16, 16)).unwrap();
        w.apply(&t).unwrap();
        let mut maps = w.into_maps();
        maps.vips.clear();
        maps.vips
            .insert(Ipv4Addr::new(10, 96, 0, 99), VIP_F_CLUSTER_IP);
        let mut w = MapWriter::new(maps).unwrap();
        w.maps().assert_consistent();
        assert_eq!(
            w.maps().vips.keys().copied().collect::<Vec<_>>(),
            [vip(1).addr, vip(2).addr],
            "adopted addresses written, a stray one removed"
        );
        // An address the writer believes in but no frontend names (an apply that failed after
        // removing its frontend) goes at the next full apply.
        w.vips.insert(Ipv4Addr::new(10, 96, 0, 98), 0);
        w.apply(&t).unwrap();
        assert!(!w.vips().contains_key(&Ipv4Addr::new(10, 96, 0, 98)));
    }

    /// Review finding: a restart adopted the maps and removed the hairpin address (no frontend
    /// names it) until `set_hairpin` put it back, while the old programs still answered on it.
    #[test]
    fn a_restart_keeps_the_hairpin_address_until_told_otherwise() {
        let hp = Ipv4Addr::new(169, 254, 42, 1);
        let mut w = MapWriter::new(FakeMaps::new(64, 16, 16)).unwrap();
        w.set_hairpin(Some(hp)).unwrap();
        w.apply(&target_of(&[(1, &[1])])).unwrap();
        let w = MapWriter::new(w.into_maps()).unwrap();
        assert_eq!(
            w.maps().vips.get(&hp),
            Some(&VIP_F_HAIRPIN),
            "adopted with its flag"
        );
        let mut w = w;
        w.set_hairpin(None).unwrap();
        assert!(!w.maps().vips.contains_key(&hp), "removed once disabled");
    }

    #[test]
    fn a_service_that_does_not_fit_fails_alone_and_gets_in_when_room_is_made() {
        // Backend ids 1..=4: two services of two backends fit, the third does not.
        let mut w = MapWriter::new(FakeMaps::new(64, 5, 16)).unwrap();
        // These tests are about fitting and ids: freed backends go at once.
        w.set_endpoint_grace(Duration::ZERO);
        let all = target_of(&[(1, &[1, 2]), (2, &[3, 4]), (3, &[5, 6])]);
        let st = w.apply(&all).unwrap();
        assert_eq!(failed_names(&st), ["svc3"]);
        assert!(
            st.failed[0].reason.contains("no free backend id"),
            "{}",
            st.failed[0]
        );
        assert_eq!(st.frontends_added, 2);
        assert_eq!(w.programmed().frontends.len(), 2);
        assert!(!w.programmed().frontends.contains_key(&vip(3)));
        assert_eq!(w.maps().active_backends(), 4);
        w.maps().assert_consistent();
        assert_eq!(w.pending().iter().collect::<Vec<_>>(), [&vip(3)]);

        // Still no room: reported again, nothing written.
        let st = w.apply(&all).unwrap();
        assert_eq!(failed_names(&st), ["svc3"]);
        assert!(st.is_noop(), "{st:?}");

        // Deleting svc1 (only its keys are passed) lets svc3 in at the same apply: removals go
        // first, and failed frontends are retried.
        let without_1 = target_of(&[(2, &[3, 4]), (3, &[5, 6])]);
        let st = w
            .apply_keys(
                &without_1,
                &BTreeSet::from([vip(1)]),
                &BTreeSet::from([be(1), be(2)]),
            )
            .unwrap();
        assert!(st.failed.is_empty(), "{:?}", st.failed);
        assert_eq!((st.frontends_removed, st.frontends_added), (1, 1));
        assert_eq!(st.backends_removed, 2);
        assert!(w.programmed().frontends.contains_key(&vip(3)));
        assert!(w.pending().is_empty());
        w.maps().assert_consistent();
        assert!(w.apply(&without_1).unwrap().is_noop());
    }

    #[test]
    fn a_full_service_map_leaves_the_new_frontend_absent_and_frees_what_it_took() {
        // Each service takes three entries (slot 0 and two slots); the third finds one left.
        let mut w = MapWriter::new(FakeMaps::new(7, 64, 16)).unwrap();
        // These tests are about fitting and ids: freed backends go at once.
        w.set_endpoint_grace(Duration::ZERO);
        let st = w
            .apply(&target_of(&[(1, &[1, 2]), (2, &[3, 4]), (3, &[5, 6])]))
            .unwrap();
        assert_eq!(failed_names(&st), ["svc3"]);
        assert!(st.failed[0].reason.contains("E2BIG"), "{}", st.failed[0]);
        assert_eq!(
            w.maps().svc.len(),
            6,
            "the slot written for svc3 was removed"
        );
        assert_eq!(w.maps().active_backends(), 4, "svc3's backends were freed");
        let active_revnat = w
            .maps()
            .revnat
            .iter()
            .filter(|r| r.flags & REVNAT_F_ACTIVE != 0)
            .count();
        assert_eq!(active_revnat, 2);
        assert_eq!(st.backends_added, 4);
        w.maps().assert_consistent();
    }

    #[test]
    fn a_changed_frontend_that_does_not_fit_keeps_its_old_backends() {
        // svc1 has one backend; svc2 fills the map; svc1 then wants two new backends instead.
        let mut w = MapWriter::new(FakeMaps::new(5, 64, 16)).unwrap();
        // These tests are about fitting and ids: freed backends go at once.
        w.set_endpoint_grace(Duration::ZERO);
        w.apply(&target_of(&[(1, &[1]), (2, &[3, 4])])).unwrap();
        assert_eq!(w.maps().svc.len(), 5);
        let before = w.programmed().frontends[&vip(1)].clone();
        let grown = target_of(&[(1, &[5, 6]), (2, &[3, 4])]);
        let st = w.apply(&grown).unwrap();
        assert_eq!(failed_names(&st), ["svc1"]);
        assert_eq!(w.programmed().frontends[&vip(1)], before);
        assert_eq!(
            w.programmed().backends.get(&before.slots[0]),
            Some(&(be(1), BACKEND_F_ACTIVE)),
            "a backend that left the target stays while a slot names it"
        );
        assert_eq!(w.maps().active_backends(), 3);
        w.maps().assert_consistent();
        assert_eq!(w.read_back_for_test(), *w.programmed());

        // svc2 goes: svc1 is retried, and its old backend is freed once nothing names it.
        let st = w.apply(&target_of(&[(1, &[5, 6])])).unwrap();
        assert!(st.failed.is_empty(), "{:?}", st.failed);
        assert_eq!(w.programmed().frontends[&vip(1)].slots.len(), 2);
        assert_eq!(w.maps().active_backends(), 2);
        w.maps().assert_consistent();
        assert_eq!(w.read_back_for_test(), *w.programmed());
    }

    #[test]
    fn terminating_flag_changes_in_place_and_unslotted_backends_wait_for_a_slot() {
        let mut w = MapWriter::new(FakeMaps::new(64, 8, 8)).unwrap();
        // These tests are about fitting and ids: freed backends go at once.
        w.set_endpoint_grace(Duration::ZERO);
        let mut t = target_of(&[(1, &[1])]);
        // A terminating endpoint that no slot names: no flow can be on it yet.
        t.backends
            .insert(be(2), BACKEND_F_ACTIVE | BACKEND_F_TERMINATING);
        w.apply(&t).unwrap();
        assert_eq!(w.maps().active_backends(), 1);
        let id = w.programmed().frontends[&vip(1)].slots[0];
        t.backends
            .insert(be(1), BACKEND_F_ACTIVE | BACKEND_F_TERMINATING);
        let st = w.apply(&t).unwrap();
        assert_eq!(st.map_writes, 1);
        assert_eq!(
            w.maps().backends[id as usize].flags,
            BACKEND_F_ACTIVE | BACKEND_F_TERMINATING
        );
        assert_eq!(w.backend_generation(id), 1, "a flag change is not a reuse");
    }
}
