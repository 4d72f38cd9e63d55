//! The map writer: turns a `DesiredState` into kernel map entries, diffing against what is
//! already programmed and applying in an order that never exposes a half-built service:
//! backends and reverse-NAT entries first, then backend slots, then the frontend entry (slot 0)
//! whose count makes the slots reachable; removal in reverse.
//!
//! The programmed state is read back from the maps at start, so a restarted vipx keeps every
//! backend and reverse-NAT id, and with them the conntrack entries of established flows.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, MapData};
use proxy_common::{
    BACKEND_F_ACTIVE, BACKEND_F_TERMINATING, Backend4, REVNAT_F_ACTIVE, RevNat4, SCOPE_EXTERNAL,
    SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_LOCAL, SvcKey4,
    SvcValue,
};

use crate::desired::{DesiredState, FrontendKind, Protocol, ServicePortName};

/// An IPv4 L3/L4 address: what a frontend or a backend is identified by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct L4Addr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = Protocol::from_number(self.proto).map_or("?", Protocol::as_str);
        write!(f, "{}:{}/{}", self.addr, self.port, proto)
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
}

/// What the kernel maps say, decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub frontends: BTreeMap<L4Addr, FrontendEntry>,
    /// Backend id -> (address, flags).
    pub backends: BTreeMap<u32, (L4Addr, u8)>,
    /// Reverse-NAT id -> frontend it restores.
    pub revnat: BTreeMap<u32, L4Addr>,
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
}

/// Map-level view of the desired state. IPv4 only for now; NodePort frontends (no address of
/// their own) are not programmed by this version. Problems are returned, not fatal.
pub fn target(desired: &DesiredState) -> (Target, Vec<String>) {
    let mut t = Target::default();
    let mut problems = Vec::new();
    for (name, sp) in &desired.services {
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
                };
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
        for fe in &sp.frontends {
            let IpAddr::V4(addr) = fe.addr else { continue };
            let (kind_flag, pick, local) = match fe.kind {
                FrontendKind::ClusterIp => (SVC_F_CLUSTER_IP, &sp.internal_pick, sp.internal_local),
                FrontendKind::ExternalIp => {
                    (SVC_F_EXTERNAL_IP, &sp.external_pick, sp.external_local)
                }
                FrontendKind::LoadBalancer => {
                    (SVC_F_LOAD_BALANCER, &sp.external_pick, sp.external_local)
                }
                FrontendKind::NodePort => continue,
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
            if sp.affinity_timeout_s.is_some() {
                flags |= SVC_F_AFFINITY;
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
            };
            if let Some(prev) = t.frontends.get(&key) {
                problems.push(format!(
                    "{name}: frontend {key} already used by {}; skipped",
                    prev.service
                ));
                continue;
            }
            t.frontends.insert(key, entry);
        }
    }
    (t, problems)
}

/// Hands out ids without reusing a freed one soon: a conntrack entry that still names a freed id
/// must not silently lead to a different backend.
#[derive(Debug)]
struct IdAlloc {
    max: u32,
    next: u32,
}

impl IdAlloc {
    fn new(max: u32, used: impl IntoIterator<Item = u32>) -> Self {
        let next = used.into_iter().max().map_or(1, |m| m + 1);
        Self { max, next }
    }

    fn alloc(&mut self, in_use: impl Fn(u32) -> bool) -> Option<u32> {
        for _ in 0..self.max {
            let id = if self.next == 0 || self.next >= self.max {
                1
            } else {
                self.next
            };
            self.next = id + 1;
            if !in_use(id) {
                return Some(id);
            }
        }
        None
    }
}

/// Counts of what one apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frontends_added: usize,
    pub frontends_changed: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub map_writes: usize,
}

impl ApplyStats {
    pub fn is_noop(&self) -> bool {
        self.map_writes == 0
    }
}

/// Handles on the service maps.
pub struct ServiceMaps {
    pub svc: HashMap<MapData, SvcKey4, SvcValue>,
    pub backend: Array<MapData, Backend4>,
    pub revnat: Array<MapData, RevNat4>,
}

impl ServiceMaps {
    /// Decode the maps into the programmed state.
    pub fn read(&self) -> Result<Programmed> {
        let mut p = Programmed::default();
        let mut slots: BTreeMap<L4Addr, BTreeMap<u16, u32>> = BTreeMap::new();
        for item in self.svc.iter() {
            let (k, v) = item.context("reading the service map")?;
            let fe = L4Addr {
                addr: Ipv4Addr::from(k.addr),
                port: u16::from_be_bytes(k.port),
                proto: k.proto,
            };
            if k.scope != SCOPE_EXTERNAL {
                continue;
            }
            if k.slot == 0 {
                p.frontends.insert(
                    fe,
                    FrontendEntry {
                        rev_nat_id: v.rev_nat_id,
                        flags: v.flags,
                        affinity_timeout_s: v.affinity_timeout_s,
                        slots: Vec::new(),
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
            });
            let n = s.keys().copied().max().unwrap_or(0);
            entry.slots = (1..=n).map(|i| s.get(&i).copied().unwrap_or(0)).collect();
        }
        for (id, b) in self.backend.iter().enumerate() {
            let b = b.context("reading the backend map")?;
            if b.is_active() {
                let id = u32::try_from(id)?;
                p.backends.insert(
                    id,
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
        for (id, r) in self.revnat.iter().enumerate() {
            let r = r.context("reading the reverse-NAT map")?;
            if r.flags & REVNAT_F_ACTIVE != 0 {
                p.revnat.insert(
                    u32::try_from(id)?,
                    L4Addr {
                        addr: Ipv4Addr::from(r.addr),
                        port: u16::from_be_bytes(r.port),
                        proto: 0,
                    },
                );
            }
        }
        Ok(p)
    }
}

/// Keeps the maps equal to the desired state.
pub struct MapWriter {
    maps: ServiceMaps,
    cur: Programmed,
    backend_ids: BTreeMap<L4Addr, u32>,
    revnat_ids: BTreeMap<L4Addr, u32>,
    backend_alloc: IdAlloc,
    revnat_alloc: IdAlloc,
}

impl MapWriter {
    /// Adopt whatever the (possibly pinned, pre-existing) maps already hold.
    pub fn new(maps: ServiceMaps) -> Result<Self> {
        let cur = maps.read()?;
        let backend_ids = cur.backends.iter().map(|(id, (a, _))| (*a, *id)).collect();
        let revnat_ids = cur
            .frontends
            .iter()
            .filter(|(_, f)| f.rev_nat_id != 0)
            .map(|(a, f)| (*a, f.rev_nat_id))
            .collect();
        let backend_alloc = IdAlloc::new(maps.backend.len(), cur.backends.keys().copied());
        let revnat_alloc = IdAlloc::new(maps.revnat.len(), cur.revnat.keys().copied());
        Ok(Self {
            maps,
            cur,
            backend_ids,
            revnat_ids,
            backend_alloc,
            revnat_alloc,
        })
    }

    pub fn programmed(&self) -> &Programmed {
        &self.cur
    }

    /// Make the maps say exactly `target`. On error (e.g. a full map) the maps stay consistent:
    /// every frontend points only at written slots and live backends; the caller retries later.
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
        self.apply_keys(target, &frontends, &backends)
    }

    /// Like `apply`, but only for the given frontends and backends (the ones whose desired state
    /// may have changed): work proportional to the change, not to the number of services.
    pub fn apply_keys(
        &mut self,
        target: &Target,
        frontends: &BTreeSet<L4Addr>,
        backends: &BTreeSet<L4Addr>,
    ) -> Result<ApplyStats> {
        let mut st = ApplyStats::default();

        // 1. Backends that are new or whose flags changed.
        for (addr, &flags) in backends
            .iter()
            .filter_map(|a| target.backends.get(a).map(|f| (a, f)))
        {
            let id = match self.backend_ids.get(addr) {
                Some(&id) => id,
                None => {
                    let cur = &self.cur.backends;
                    let id = self
                        .backend_alloc
                        .alloc(|id| cur.contains_key(&id))
                        .context("backend map is full")?;
                    st.backends_added += 1;
                    id
                }
            };
            if self.cur.backends.get(&id) != Some(&(*addr, flags)) {
                let v = Backend4 {
                    addr: addr.addr.octets(),
                    port: addr.port.to_be_bytes(),
                    proto: addr.proto,
                    flags,
                    generation: 1,
                };
                self.maps
                    .backend
                    .set(id, v, 0)
                    .with_context(|| format!("writing backend {id} ({addr})"))?;
                st.map_writes += 1;
                self.cur.backends.insert(id, (*addr, flags));
                self.backend_ids.insert(*addr, id);
            }
        }

        // 2. Frontends: reverse-NAT, slots, then slot 0.
        for (fe, t) in frontends
            .iter()
            .filter_map(|k| target.frontends.get(k).map(|t| (k, t)))
        {
            let rev_nat_id = match self.revnat_ids.get(fe) {
                Some(&id) => id,
                None => {
                    let cur = &self.cur.revnat;
                    self.revnat_alloc
                        .alloc(|id| cur.contains_key(&id))
                        .context("reverse-NAT map is full")?
                }
            };
            if self.cur.revnat.get(&rev_nat_id).map(|a| (a.addr, a.port))
                != Some((fe.addr, fe.port))
            {
                let v = RevNat4 {
                    addr: fe.addr.octets(),
                    port: fe.port.to_be_bytes(),
                    flags: REVNAT_F_ACTIVE,
                    generation: 1,
                };
                self.maps
                    .revnat
                    .set(rev_nat_id, v, 0)
                    .with_context(|| format!("writing reverse-NAT {rev_nat_id} ({fe})"))?;
                st.map_writes += 1;
                self.cur
                    .revnat
                    .insert(rev_nat_id, L4Addr { proto: 0, ..*fe });
                self.revnat_ids.insert(*fe, rev_nat_id);
            }
            let want: Vec<u32> = t
                .slots
                .iter()
                .map(|a| {
                    self.backend_ids
                        .get(a)
                        .copied()
                        .with_context(|| format!("slot backend {a} has no id"))
                })
                .collect::<Result<_>>()?;
            let want_entry = FrontendEntry {
                rev_nat_id,
                flags: t.flags,
                affinity_timeout_s: t.affinity_timeout_s,
                slots: want,
            };
            let old = self.cur.frontends.get(fe).cloned();
            if old.as_ref() == Some(&want_entry) {
                continue;
            }
            match &old {
                None => st.frontends_added += 1,
                Some(_) => st.frontends_changed += 1,
            }
            st.map_writes += self.write_frontend(fe, old.as_ref(), &want_entry)?;
            self.cur.frontends.insert(*fe, want_entry);
        }

        // 3. Frontends that are gone: slot 0 first, then the slots, then reverse-NAT.
        let gone: Vec<L4Addr> = frontends
            .iter()
            .filter(|k| !target.frontends.contains_key(k) && self.cur.frontends.contains_key(k))
            .copied()
            .collect();
        for fe in gone {
            let Some(old) = self.cur.frontends.get(&fe).cloned() else {
                continue;
            };
            let key = svc_key(&fe, 0);
            remove_if_present(&mut self.maps.svc, &key)?;
            st.map_writes += 1;
            for slot in 1..=old.slots.len() {
                remove_if_present(&mut self.maps.svc, &svc_key(&fe, slot_u16(slot)?))?;
                st.map_writes += 1;
            }
            self.cur.frontends.remove(&fe);
            st.frontends_removed += 1;
            if let Some(id) = self.revnat_ids.remove(&fe) {
                // Replies of flows still in conntrack keep being restored until the entry ages
                // out, unless the id is reused; keep the entry but mark it inactive.
                self.maps
                    .revnat
                    .set(id, RevNat4::default(), 0)
                    .with_context(|| format!("clearing reverse-NAT {id}"))?;
                st.map_writes += 1;
                self.cur.revnat.remove(&id);
            }
        }

        // 4. Backends no longer referenced by any endpoint.
        let stale: Vec<(L4Addr, u32)> = backends
            .iter()
            .filter(|a| !target.backends.contains_key(a))
            .filter_map(|a| self.backend_ids.get(a).map(|id| (*a, *id)))
            .collect();
        for (addr, id) in stale {
            self.maps
                .backend
                .set(id, Backend4::default(), 0)
                .with_context(|| format!("clearing backend {id} ({addr})"))?;
            st.map_writes += 1;
            st.backends_removed += 1;
            self.backend_ids.remove(&addr);
            self.cur.backends.remove(&id);
        }
        Ok(st)
    }

    /// Write one frontend so that at every moment slot 0's count only covers written slots.
    fn write_frontend(
        &mut self,
        fe: &L4Addr,
        old: Option<&FrontendEntry>,
        new: &FrontendEntry,
    ) -> Result<usize> {
        let mut writes = 0;
        let old_slots: &[u32] = old.map_or(&[], |o| &o.slots);
        for (i, &backend_id) in new.slots.iter().enumerate() {
            if old_slots.get(i) == Some(&backend_id) {
                continue;
            }
            let v = SvcValue {
                backend_id,
                ..SvcValue::default()
            };
            self.maps
                .svc
                .insert(svc_key(fe, slot_u16(i + 1)?), v, 0)
                .with_context(|| format!("writing slot {} of {fe}", i + 1))?;
            writes += 1;
        }
        let head = SvcValue {
            backend_id: 0,
            rev_nat_id: new.rev_nat_id,
            count: slot_u16(new.slots.len())?,
            flags: new.flags,
            affinity_timeout_s: new.affinity_timeout_s,
        };
        self.maps
            .svc
            .insert(svc_key(fe, 0), head, 0)
            .with_context(|| format!("writing frontend {fe}"))?;
        writes += 1;
        for slot in new.slots.len() + 1..=old_slots.len() {
            remove_if_present(&mut self.maps.svc, &svc_key(fe, slot_u16(slot)?))?;
            writes += 1;
        }
        Ok(writes)
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

fn remove_if_present(map: &mut HashMap<MapData, SvcKey4, SvcValue>, key: &SvcKey4) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).context("removing a service map entry"),
    }
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
                affinity_timeout_s: Some(60),
                internal_local: false,
                external_local: false,
            },
        );
        let (t, problems) = target(&d);
        assert!(problems.is_empty());
        assert_eq!(
            t.frontends.len(),
            1,
            "NodePort and IPv6 are not programmed yet"
        );
        let (k, f) = t.frontends.iter().next().unwrap();
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
    }

    #[test]
    fn id_alloc_does_not_reuse_at_once() {
        let mut a = IdAlloc::new(4, [1]);
        assert_eq!(a.alloc(|id| id == 1), Some(2));
        // 2 was freed again, but the cursor moves on.
        assert_eq!(a.alloc(|id| id == 1), Some(3));
        assert_eq!(a.alloc(|id| id == 1), Some(2));
        assert_eq!(a.alloc(|id| id <= 3), None);
    }
}
