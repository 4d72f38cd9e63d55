//! Change tracking, as kube-proxy does it: the desired state is kept per Service, so a change to
//! one Service or one of its EndpointSlices costs work proportional to that Service, not to the
//! cluster. `flush` re-translates only dirty Services (with the same pure `translate`, fed just
//! that Service and its slices), merges their map-level fragments into one `Target`, and returns
//! the frontends and backends whose desired state may have changed, for `MapWriter::apply_keys`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use proxy_common::{BACKEND_F_ACTIVE, BACKEND_F_LOCAL, BACKEND_F_TERMINATING, PROTO_EXTERNAL_VIEW};

use crate::{
    desired::HealthCheck,
    digest::{self, DigestedObjects, ServiceDigest, SliceDigest},
    maps::{self, L4Addr, Target, TargetFrontend},
    source::ClusterObjects,
    translate::{self, ClusterInput, LABEL_ZONE},
};

/// (namespace, name) of an object.
pub type ObjKey = (String, String);

/// Keys whose desired state may have changed since the last flush.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub frontends: BTreeSet<L4Addr>,
    pub backends: BTreeSet<L4Addr>,
    /// A frontend appeared, disappeared or changed owner (names shown by `vipx services`).
    pub names_changed: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.backends.is_empty()
    }

    /// These changes and `other`'s, as one flush after both would have said.
    pub fn absorb(&mut self, other: Changes) {
        self.frontends.extend(other.frontends);
        self.backends.extend(other.backends);
        self.names_changed |= other.names_changed;
    }
}

/// What one Service's last translation asked for. Only the keys: the frontends' contents are in
/// `target` (or, refused, are translated again when their owner lets go).
#[derive(Debug, Default)]
struct Fragment {
    frontends: Vec<L4Addr>,
    backends: Vec<(L4Addr, u8)>,
    problems: Vec<String>,
    /// Service ports without a local endpoint under a Local policy: (internal, external).
    no_local: (usize, usize),
}

/// Dirty Services from which [`ChangeTracker::flush`] translates on every core.
const PARALLEL_FLUSH: usize = 512;

/// A Service's translation before it is merged.
struct Translated {
    frontends: BTreeMap<L4Addr, TargetFrontend>,
    backends: BTreeMap<L4Addr, u8>,
    problems: Vec<String>,
    /// Service ports without a local endpoint under a Local policy: (internal, external).
    no_local: (usize, usize),
    /// Its health check node port, if it has one.
    health: Option<HealthCheck>,
}

#[derive(Default)]
pub struct ChangeTracker {
    node_name: String,
    /// This node's zone label: all `translate` reads of the Nodes.
    zone: Option<String>,
    /// Whether a Node object of this node's name was seen (only its zone is kept).
    node_known: bool,
    /// Only what translation needs of each object (see `digest`), not the whole object.
    services: HashMap<ObjKey, ServiceDigest>,
    slices: HashMap<ObjKey, SliceDigest>,
    /// Service (namespace, `kubernetes.io/service-name`) -> its slices' names.
    slices_of: HashMap<ObjKey, BTreeSet<String>>,
    dirty: BTreeSet<ObjKey>,
    fragments: HashMap<ObjKey, Fragment>,
    target: Target,
    frontend_owner: HashMap<L4Addr, ObjKey>,
    /// Services that want a frontend another Service owns; retried when it is released.
    frontend_waiters: HashMap<L4Addr, BTreeSet<ObjKey>>,
    /// Per backend, the Services using it and their flags for it. A list, not a map: usually
    /// one or a few Services, and 100,000 small maps cost megabytes; the keys are shared per
    /// merge rather than cloned per backend, for the same reason.
    backend_users: HashMap<L4Addr, Vec<(Arc<ObjKey>, u8)>>,
    /// Services and EndpointSlices seen added, changed or deleted, since start (metrics).
    service_changes: u64,
    slice_changes: u64,
    /// The node's addresses that serve node ports (each node port is a frontend on each).
    node_addresses: Vec<std::net::Ipv4Addr>,
    /// Services with a health check node port.
    health_checks: BTreeMap<ObjKey, HealthCheck>,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjKey {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn key_of_names((namespace, name): (Option<String>, Option<String>)) -> ObjKey {
    (
        namespace.unwrap_or_else(|| "default".into()),
        name.unwrap_or_default(),
    )
}

fn owner_of(key: &ObjKey, slice: &SliceDigest) -> Option<ObjKey> {
    Some((key.0.clone(), slice.service()?.to_owned()))
}

/// A relist of one kind against the keys held: the keys it no longer has, and what it lists
/// with the first of duplicates winning (as in `replace_all`).
fn relist<'a, D>(
    held: impl Iterator<Item = &'a ObjKey>,
    listed: Vec<(ObjKey, D)>,
) -> (Vec<ObjKey>, Vec<(ObjKey, D)>) {
    let keys: std::collections::HashSet<&ObjKey> = listed.iter().map(|(k, _)| k).collect();
    let gone = held.filter(|k| !keys.contains(k)).cloned().collect();
    let mut seen = std::collections::HashSet::new();
    let listed = listed
        .into_iter()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    (gone, listed)
}

impl ChangeTracker {
    pub fn new(node_name: &str) -> Self {
        Self {
            node_name: node_name.to_owned(),
            ..Self::default()
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Whether an object change since the last flush may change the desired state.
    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The node's addresses serving node ports changed: every Service is translated again at
    /// the next flush (those with node ports gain or lose frontends). Returns whether they did.
    /// The node port addresses translation uses.
    pub fn node_addresses(&self) -> &[std::net::Ipv4Addr] {
        &self.node_addresses
    }

    pub fn set_node_addresses(&mut self, addresses: Vec<std::net::Ipv4Addr>) -> bool {
        if addresses == self.node_addresses {
            return false;
        }
        self.node_addresses = addresses;
        self.dirty.extend(self.services.keys().cloned());
        true
    }

    /// Services and EndpointSlices seen added, changed or deleted since start.
    pub fn change_counts(&self) -> (u64, u64) {
        (self.service_changes, self.slice_changes)
    }

    /// Service ports a Local traffic policy leaves without a local endpoint: (internal,
    /// external), as of the last flush.
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        self.fragments
            .values()
            .fold((0, 0), |(i, e), f| (i + f.no_local.0, e + f.no_local.1))
    }

    /// Problems of the current desired state (skipped Services, ports, endpoints).
    pub fn problems(&self) -> Vec<String> {
        let mut keys: Vec<&ObjKey> = self.fragments.keys().collect();
        keys.sort();
        keys.into_iter()
            .flat_map(|k| self.fragments[k].problems.iter().cloned())
            .collect()
    }

    /// Replace every object (a relist, or a re-read manifests directory); only Services whose
    /// own object or slices differ become dirty.
    pub fn replace_all(&mut self, objs: ClusterObjects) {
        self.replace_all_digested(DigestedObjects::of(objs));
    }

    /// `replace_all` with objects already digested (the manifests cache keeps them so).
    pub fn replace_all_digested(&mut self, objs: DigestedObjects) {
        self.set_nodes(&objs.nodes);

        let mut services: HashMap<ObjKey, ServiceDigest> =
            HashMap::with_capacity(objs.services.len());
        for (names, s) in objs.services {
            // The first of duplicates wins, as in `translate`.
            services.entry(key_of_names(names)).or_insert(s);
        }
        for (k, s) in &services {
            if self.services.get(k) != Some(s) {
                self.dirty.insert(k.clone());
                self.service_changes += 1;
            }
        }
        for k in self.services.keys() {
            if !services.contains_key(k) {
                self.dirty.insert(k.clone());
                self.service_changes += 1;
            }
        }
        self.services = services;

        let mut slices: HashMap<ObjKey, SliceDigest> = HashMap::with_capacity(objs.slices.len());
        for (names, s) in objs.slices {
            slices.entry(key_of_names(names)).or_insert(s);
        }
        for (k, s) in &slices {
            if self.slices.get(k) != Some(s) {
                self.dirty.extend(owner_of(k, s));
                self.dirty
                    .extend(self.slices.get(k).and_then(|old| owner_of(k, old)));
                self.slice_changes += 1;
            }
        }
        for (k, s) in &self.slices {
            if !slices.contains_key(k) {
                self.dirty.extend(owner_of(k, s));
                self.slice_changes += 1;
            }
        }
        self.slices_of.clear();
        for (k, s) in &slices {
            if let Some(o) = owner_of(k, s) {
                self.slices_of.entry(o).or_default().insert(k.1.clone());
            }
        }
        self.slices = slices;
    }

    /// One EndpointSlice added or changed (a watch event).
    pub fn upsert_slice(&mut self, slice: EndpointSlice) {
        let k = key_of(&slice.metadata);
        self.upsert_slice_digest(k, SliceDigest::of(slice));
    }

    /// [`ChangeTracker::upsert_slice`] of an EndpointSlice digested already.
    pub fn upsert_slice_digest(&mut self, k: ObjKey, slice: SliceDigest) {
        if let Some(old) = self.slices.get(&k) {
            if old == &slice {
                return;
            }
            if let Some(o) = owner_of(&k, old) {
                self.dirty.insert(o.clone());
                if let Some(set) = self.slices_of.get_mut(&o) {
                    set.remove(&k.1);
                }
            }
        }
        self.slice_changes += 1;
        if let Some(o) = owner_of(&k, &slice) {
            self.slices_of
                .entry(o.clone())
                .or_default()
                .insert(k.1.clone());
            self.dirty.insert(o);
        }
        self.slices.insert(k, slice);
    }

    /// One Service added or changed (a watch event).
    pub fn upsert_service(&mut self, svc: Service) {
        let k = key_of(&svc.metadata);
        self.upsert_service_digest(k, ServiceDigest::of(svc));
    }

    /// [`ChangeTracker::upsert_service`] of a Service digested already.
    pub fn upsert_service_digest(&mut self, k: ObjKey, svc: ServiceDigest) {
        if self.services.get(&k) == Some(&svc) {
            return;
        }
        self.service_changes += 1;
        self.dirty.insert(k.clone());
        self.services.insert(k, svc);
    }

    /// One Service deleted (a watch event), by (namespace, name).
    pub fn delete_service(&mut self, key: &ObjKey) {
        if self.services.remove(key).is_some() {
            self.service_changes += 1;
            self.dirty.insert(key.clone());
        }
    }

    /// One EndpointSlice deleted (a watch event), by (namespace, name).
    pub fn delete_slice(&mut self, key: &ObjKey) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        self.slice_changes += 1;
        if let Some(o) = owner_of(key, &old) {
            if let Some(set) = self.slices_of.get_mut(&o) {
                set.remove(&key.1);
                if set.is_empty() {
                    self.slices_of.remove(&o);
                }
            }
            self.dirty.insert(o);
        }
    }

    /// Every Service at once (a relist of Services only): the ones not listed are deleted.
    pub fn replace_services(&mut self, services: Vec<Service>) {
        self.replace_services_digested(
            services
                .into_iter()
                .map(|s| (key_of(&s.metadata), ServiceDigest::of(s)))
                .collect(),
        );
    }

    /// [`ChangeTracker::replace_services`] of Services digested already (as they arrived, so
    /// that a relist never holds every whole object at once).
    pub fn replace_services_digested(&mut self, services: Vec<(ObjKey, ServiceDigest)>) {
        let (gone, listed) = relist(self.services.keys(), services);
        for k in &gone {
            self.delete_service(k);
        }
        for (k, s) in listed {
            self.upsert_service_digest(k, s);
        }
    }

    /// Every EndpointSlice at once (a relist of slices only): the ones not listed are deleted.
    pub fn replace_slices(&mut self, slices: Vec<EndpointSlice>) {
        self.replace_slices_digested(
            slices
                .into_iter()
                .map(|s| (key_of(&s.metadata), SliceDigest::of(s)))
                .collect(),
        );
    }

    /// [`ChangeTracker::replace_slices`] of EndpointSlices digested already.
    pub fn replace_slices_digested(&mut self, slices: Vec<(ObjKey, SliceDigest)>) {
        let (gone, listed) = relist(self.slices.keys(), slices);
        for k in &gone {
            self.delete_slice(k);
        }
        for (k, s) in listed {
            self.upsert_slice_digest(k, s);
        }
    }

    /// The Node objects (an API source watches only this node's); a change of this node's zone
    /// re-translates every Service, as in `replace_all`.
    pub fn set_nodes(&mut self, nodes: &[Node]) {
        let this = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()));
        self.node_known = this.is_some();
        let zone = this.and_then(|n| n.metadata.labels.as_ref()?.get(LABEL_ZONE).cloned());
        if zone != self.zone {
            // Topology hints depend on this node's zone: everything may change.
            self.zone = zone;
            self.dirty.extend(self.services.keys().cloned());
            self.dirty.extend(self.slices_of.keys().cloned());
        }
    }

    /// Whether the tracker holds a Node object of this node's name.
    pub fn knows_node(&self) -> bool {
        self.node_known
    }

    /// Translate the dirty Services and merge them. Returns what changed.
    pub fn flush(&mut self) -> Changes {
        let mut changes = Changes::default();
        // Merged one by one in key order, a key a merge makes dirty (a frontend's owner leaves,
        // a refused twin may take it over) among the rest: which Service gets a contested
        // frontend must not depend on how events were batched. Translations of the keys dirty
        // now are made up front, on every core when there are many: translating reads the
        // objects, never the merged state, so one made early stays valid.
        let mut made = self.translate_all(self.dirty.iter().cloned().collect());
        while let Some(key) = self.dirty.pop_first() {
            let fragment = made
                .remove(&key)
                .unwrap_or_else(|| self.translate_one(&key));
            self.merge(key, fragment, &mut changes);
        }
        changes
    }

    /// `keys`' translations, on every core when there are at least [`PARALLEL_FLUSH`].
    fn translate_all(&self, keys: Vec<ObjKey>) -> BTreeMap<ObjKey, Translated> {
        let threads = if keys.len() >= PARALLEL_FLUSH {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        } else {
            1
        };
        if threads < 2 {
            return BTreeMap::new();
        }
        let per = keys.len().div_ceil(threads);
        std::thread::scope(|s| {
            let runs: Vec<_> = keys
                .chunks(per)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|k| (k.clone(), self.translate_one(k)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            runs.into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    fn translate_one(&self, key: &ObjKey) -> Translated {
        let Some(svc) = self.services.get(key) else {
            return Translated {
                frontends: BTreeMap::new(),
                backends: BTreeMap::new(),
                problems: Vec::new(),
                no_local: (0, 0),
                health: None,
            };
        };
        let svc: Service = svc.to_object(&key.0, &key.1);
        let slices: Vec<EndpointSlice> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| {
                let s = self.slices.get(&(key.0.clone(), name.clone()))?;
                Some(s.to_object(&key.0, name))
            })
            .collect();
        let node = digest::node_object(&self.node_name, self.zone.as_deref());
        let input = ClusterInput {
            services: std::slice::from_ref(&svc),
            slices: &slices,
            nodes: std::slice::from_ref(&node),
        };
        let tr = translate::translate(&input, &self.node_name);
        let (t, target_problems) = maps::target_on(&tr.state, &self.node_addresses);
        let no_local = tr.state.services.values().fold((0, 0), |(i, e), sp| {
            let (ni, ne) = sp.no_local_endpoints();
            (i + usize::from(ni), e + usize::from(ne))
        });
        Translated {
            frontends: t.frontends,
            backends: t.backends,
            problems: tr.problems.into_iter().chain(target_problems).collect(),
            no_local,
            health: tr.state.health_checks.values().next().copied(),
        }
    }

    /// Services with a health check node port: (namespace, name) -> port and local endpoints.
    pub fn health_checks(&self) -> &BTreeMap<ObjKey, HealthCheck> {
        &self.health_checks
    }

    fn merge(&mut self, key: ObjKey, new: Translated, changes: &mut Changes) {
        let old = self.fragments.remove(&key).unwrap_or_default();
        let Translated {
            frontends,
            backends,
            mut problems,
            no_local,
            health,
        } = new;
        match health {
            Some(h) => self.health_checks.insert(key.clone(), h),
            None => self.health_checks.remove(&key),
        };
        for fe in &old.frontends {
            if let Some(w) = self.frontend_waiters.get_mut(fe) {
                w.remove(&key);
            }
            if self.frontend_owner.get(fe) == Some(&key) && !frontends.contains_key(fe) {
                self.frontend_owner.remove(fe);
                self.target.frontends.remove(fe);
                changes.frontends.insert(*fe);
                changes.names_changed = true;
                // A Service refused this frontend earlier may take it now.
                if let Some(w) = self.frontend_waiters.remove(fe) {
                    self.dirty.extend(w);
                }
            }
        }
        let wanted: Vec<L4Addr> = frontends.keys().copied().collect();
        for (fe, tf) in frontends {
            // An external view belongs to whoever owns its frontend (which sorts before it):
            // never to a Service whose frontend was refused, or its clients would reach that
            // Service's pods through the owner's frontend.
            if fe.proto & PROTO_EXTERNAL_VIEW != 0 {
                let base = L4Addr {
                    proto: fe.proto & !PROTO_EXTERNAL_VIEW,
                    ..fe
                };
                if self.frontend_owner.get(&base) != Some(&key) {
                    continue;
                }
            }
            match self.frontend_owner.get(&fe) {
                Some(owner) if *owner != key => {
                    problems.push(format!(
                        "{}/{}: frontend {fe} already used by {}/{}; skipped",
                        key.0, key.1, owner.0, owner.1
                    ));
                    self.frontend_waiters
                        .entry(fe)
                        .or_default()
                        .insert(key.clone());
                }
                owner => {
                    if owner.is_none() {
                        self.frontend_owner.insert(fe, key.clone());
                        changes.names_changed = true;
                    }
                    if self.target.frontends.get(&fe) != Some(&tf) {
                        self.target.frontends.insert(fe, tf);
                        changes.frontends.insert(fe);
                    }
                }
            }
        }
        for (be, _) in &old.backends {
            if !backends.contains_key(be) {
                if let Some(users) = self.backend_users.get_mut(be) {
                    users.retain(|(k, _)| **k != key);
                }
                self.refresh_backend(be, changes);
            }
        }
        let user = Arc::new(key.clone());
        for (be, flags) in &backends {
            let users = self.backend_users.entry(*be).or_default();
            let changed = match users.iter_mut().find(|(k, _)| **k == key) {
                Some((_, f)) if f == flags => false,
                Some((_, f)) => {
                    *f = *flags;
                    true
                }
                None => {
                    users.push((user.clone(), *flags));
                    true
                }
            };
            if changed {
                self.refresh_backend(be, changes);
            }
        }
        if !(wanted.is_empty() && backends.is_empty() && problems.is_empty() && no_local == (0, 0))
        {
            self.fragments.insert(
                key,
                Fragment {
                    frontends: wanted,
                    backends: backends.into_iter().collect(),
                    problems,
                    no_local,
                },
            );
        }
    }

    /// A backend is terminating only if every Service using it says so (and local, on this
    /// node, if any says so: they all do, it is a property of the address).
    fn refresh_backend(&mut self, be: &L4Addr, changes: &mut Changes) {
        let want = match self.backend_users.get(be) {
            Some(users) if !users.is_empty() => {
                let terminating = users.iter().all(|(_, f)| f & BACKEND_F_TERMINATING != 0);
                let local = users.iter().any(|(_, f)| f & BACKEND_F_LOCAL != 0);
                Some(
                    BACKEND_F_ACTIVE
                        | if terminating {
                            BACKEND_F_TERMINATING
                        } else {
                            0
                        }
                        | if local { BACKEND_F_LOCAL } else { 0 },
                )
            }
            _ => None,
        };
        if want.is_none() {
            self.backend_users.remove(be);
        }
        if self.target.backends.get(be).copied() != want {
            match want {
                Some(f) => self.target.backends.insert(*be, f),
                None => self.target.backends.remove(be),
            };
            changes.backends.insert(*be);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::load_str;
    use std::net::Ipv4Addr;

    /// Only a change of what translation reads is pending work (and costs a sync): an equal
    /// object or an annotation edit is not.
    #[test]
    fn only_changes_translation_reads_are_pending() {
        let mut t = ChangeTracker::new("node-a");
        let v1 = objs(&[SVC.into(), slice("web-a", &["10.0.0.1"])]);
        t.upsert_service(v1.services[0].clone());
        t.upsert_slice(v1.slices[0].clone());
        assert!(t.has_pending());
        t.flush();
        assert!(!t.has_pending());
        t.upsert_service(v1.services[0].clone());
        t.upsert_slice(v1.slices[0].clone());
        let mut annotated = v1.services[0].clone();
        annotated.metadata.annotations = Some([("a".to_owned(), "b".to_owned())].into());
        t.upsert_service(annotated);
        t.set_nodes(&[]);
        assert!(!t.has_pending(), "nothing translation reads changed");
        t.upsert_slice(objs(&[slice("web-a", &["10.0.0.2"])]).slices.remove(0));
        assert!(t.has_pending());
    }

    const SVC: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
";

    fn slice(name: &str, ips: &[&str]) -> String {
        let eps: Vec<String> = ips
            .iter()
            .map(|ip| format!("  - addresses: [{ip}]\n    conditions: {{ready: true}}\n"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\n\
             ports: [{{name: http, port: 8080}}]\nendpoints:\n{}",
            eps.concat()
        )
    }

    fn objs(docs: &[String]) -> ClusterObjects {
        let o = load_str("t.yaml", &docs.join("\n---\n"));
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        o
    }

    /// The incremental target always equals the one a full translation gives.
    fn assert_matches_full(t: &ChangeTracker, o: &ClusterObjects) {
        let full = translate::translate(&ClusterInput::from(o), "node-a");
        let (target, _) = maps::target(&full.state);
        assert_eq!(t.target(), &target);
    }

    /// Two Services claim one external IP and port: the external view of the frontend (Local
    /// policy) belongs to whoever owns the frontend, never to the one refused it.
    #[test]
    fn an_external_view_goes_with_its_frontend() {
        let with_ip = |name: &str, cip: &str, policy: &str| {
            SVC.replace("web", name).replace("10.96.0.10", cip).replace(
                "ports: [{name: http, port: 80, targetPort: 8080}]",
                &format!(
                    "externalIPs: [198.18.250.1]\n  externalTrafficPolicy: {policy}\n  \
                     ports: [{{name: http, port: 80, targetPort: 8080}}]"
                ),
            )
        };
        let slices = |names: &[&str]| -> Vec<String> {
            names
                .iter()
                .map(|n| {
                    slice(&format!("{n}-a"), &["10.0.0.1"])
                        .replace("service-name: web", &format!("service-name: {n}"))
                })
                .collect()
        };
        let mut docs = vec![
            with_ip("aaa", "10.96.0.11", "Cluster"),
            with_ip("bbb", "10.96.0.12", "Local"),
        ];
        docs.extend(slices(&["aaa", "bbb"]));
        let mut t = ChangeTracker::new("node-a");
        t.replace_all(objs(&docs));
        t.flush();
        let view = L4Addr {
            addr: "198.18.250.1".parse().unwrap(),
            port: 80,
            proto: proxy_common::IPPROTO_TCP | PROTO_EXTERNAL_VIEW,
        };
        let base = L4Addr {
            proto: proxy_common::IPPROTO_TCP,
            ..view
        };
        assert_eq!(t.target().frontends[&base].service.name, "aaa");
        assert!(
            !t.target().frontends.contains_key(&view),
            "bbb's view of aaa's frontend"
        );
        // aaa turns Local: its own view.
        docs[0] = with_ip("aaa", "10.96.0.11", "Local");
        t.replace_all(objs(&docs));
        t.flush();
        assert_eq!(t.target().frontends[&view].service.name, "aaa");
    }

    #[test]
    fn node_addresses_that_change_move_the_node_ports() {
        let np = SVC.replace(
            "ports: [{name: http, port: 80, targetPort: 8080}]",
            "type: NodePort\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]",
        );
        let o = objs(&[np, slice("web-a", &["10.0.0.1"])]);
        let mut t = ChangeTracker::new("node-a");
        t.replace_all(o.clone());
        t.flush();
        let a: Ipv4Addr = "10.1.0.5".parse().unwrap();
        let b: Ipv4Addr = "10.1.0.6".parse().unwrap();
        assert!(t.set_node_addresses(vec![a]));
        assert!(!t.set_node_addresses(vec![a]), "the same addresses again");
        let c = t.flush();
        assert_eq!(c.frontends.len(), 1, "{c:?}");
        let full = translate::translate(&ClusterInput::from(&o), "node-a");
        assert_eq!(t.target(), &maps::target_on(&full.state, &[a]).0);
        assert!(t.set_node_addresses(vec![b]));
        let c = t.flush();
        assert_eq!(
            c.frontends.len(),
            2,
            "one node port frontend gone, one new: {c:?}"
        );
        assert_eq!(t.target(), &maps::target_on(&full.state, &[b]).0);
    }

    #[test]
    fn only_changed_services_are_touched() {
        let other = SVC
            .replace("web", "other")
            .replace("10.96.0.10", "10.96.0.11");
        let v1 = objs(&[
            SVC.into(),
            other.clone(),
            slice("web-a", &["10.0.0.1", "10.0.0.2"]),
        ]);
        let mut t = ChangeTracker::new("node-a");
        t.replace_all(v1.clone());
        let c = t.flush();
        assert_eq!(c.frontends.len(), 2);
        assert_eq!(c.backends.len(), 2);
        assert_matches_full(&t, &v1);

        // Same objects again: nothing to do.
        t.replace_all(v1.clone());
        assert!(t.flush().is_empty());

        // One endpoint replaced: one frontend, two backends.
        let v2 = objs(&[SVC.into(), other, slice("web-a", &["10.0.0.1", "10.0.0.3"])]);
        t.replace_all(v2.clone());
        let c = t.flush();
        assert_eq!(c.frontends.len(), 1);
        assert_eq!(c.backends.len(), 2);
        assert!(!c.names_changed);
        assert_matches_full(&t, &v2);
    }

    #[test]
    fn fields_translation_does_not_read_change_nothing() {
        let v1 = objs(&[SVC.into(), slice("web-a", &["10.0.0.1"])]);
        let mut t = ChangeTracker::new("node-a");
        t.replace_all(v1);
        t.flush();
        // Annotations, other labels, a target reference: dropped on arrival, so not a change.
        let noisy = SVC.replace(
            "metadata: {name: web, namespace: default}",
            "metadata: {name: web, namespace: default, annotations: {a: b}, labels: {app: web}}",
        );
        let noisy_slice = slice("web-a", &["10.0.0.1"]).replace(
            "conditions: {ready: true}",
            "conditions: {ready: true}\n    targetRef: {kind: Pod, name: web-1}",
        );
        let v2 = objs(&[noisy, noisy_slice]);
        assert!(
            v2.slices[0].endpoints.as_ref().unwrap()[0]
                .target_ref
                .is_some()
        );
        t.replace_all(v2.clone());
        assert!(t.flush().is_empty());
        assert_matches_full(&t, &v2);
    }

    #[test]
    fn a_second_slice_and_slice_events_merge() {
        let v1 = objs(&[SVC.into(), slice("web-a", &["10.0.0.1"])]);
        let mut t = ChangeTracker::new("node-a");
        t.replace_all(v1);
        t.flush();
        let extra = objs(&[slice("web-b", &["10.0.0.9"])]).slices.remove(0);
        t.upsert_slice(extra);
        let c = t.flush();
        assert_eq!(c.backends.len(), 1);
        let fe = t.target().frontends.values().next().unwrap();
        assert_eq!(fe.slots.len(), 2);
    }

    /// Enough Services for the parallel translation, with pairs of them claiming one ClusterIP
    /// (conflicts resolved in key order, re-resolved when an owner leaves): the same target as
    /// a full translation, before and after.
    #[test]
    fn a_large_flush_on_every_core_matches_a_full_translation() {
        let n = PARALLEL_FLUSH * 2 + 3;
        let docs: Vec<String> = (0..n)
            .flat_map(|i| {
                // Services i and i + 1 (i even) share a ClusterIP.
                let ip = format!("10.96.{}.{}", (i / 2) / 250, (i / 2) % 250 + 1);
                let svc = SVC
                    .replace("name: web", &format!("name: web{i:04}"))
                    .replace("10.96.0.10", &ip);
                let sl = slice(
                    &format!("web{i:04}-a"),
                    &[&format!("10.1.{}.{}", i / 250, i % 250 + 1)],
                )
                .replace("service-name: web", &format!("service-name: web{i:04}"));
                [svc, sl]
            })
            .collect();
        let all = objs(&docs);
        let mut t = ChangeTracker::new("node-a");
        t.replace_all(all.clone());
        t.flush();
        assert_eq!(t.problems().len(), n / 2, "one refused Service a pair");
        assert_matches_full(&t, &all);
        // Every owner (the first of each pair) leaves: each twin takes its frontend over.
        let rest = objs(
            &docs
                .chunks(4)
                .flat_map(|c| c.get(2..).unwrap_or_default().to_vec())
                .collect::<Vec<_>>(),
        );
        t.replace_all(rest.clone());
        t.flush();
        assert!(t.problems().is_empty(), "{:?}", t.problems().first());
        assert_matches_full(&t, &rest);
    }

    /// The owner of a contested frontend leaves in the same flush as a newcomer claiming it
    /// arrives: the Service that waited for it (first in key order) takes it, as a full
    /// translation (a restart) would decide.
    #[test]
    fn a_waiting_twin_takes_a_frontend_before_a_newcomer_of_the_same_flush() {
        let a = SVC.replace("name: web", "name: a");
        let m = SVC.replace("name: web", "name: m");
        let z = SVC.replace("name: web", "name: z");
        let mut t = ChangeTracker::new("node-a");
        t.replace_all(objs(&[a, m.clone()]));
        t.flush();
        let rest = objs(&[m, z]);
        t.replace_all(rest.clone());
        t.flush();
        assert_matches_full(&t, &rest);
        assert_eq!(
            t.target().frontends.values().next().unwrap().service.name,
            "m"
        );
    }

    #[test]
    fn frontend_conflict_resolves_when_the_owner_leaves() {
        let twin = SVC.replace("name: web", "name: zz-twin");
        let v1 = objs(&[SVC.into(), twin.clone()]);
        let mut t = ChangeTracker::new("node-a");
        t.replace_all(v1);
        t.flush();
        assert_eq!(t.problems().len(), 1, "{:?}", t.problems());
        // The owner goes away; the twin takes the frontend over.
        let v2 = objs(&[twin]);
        t.replace_all(v2.clone());
        let c = t.flush();
        assert!(c.names_changed);
        assert!(t.problems().is_empty());
        assert_eq!(t.target().frontends.len(), 1);
        assert_eq!(
            t.target().frontends.values().next().unwrap().service.name,
            "zz-twin"
        );
        assert_matches_full(&t, &v2);
    }

    #[test]
    fn per_kind_replace_and_events_match_replace_all() {
        let other = SVC
            .replace("web", "other")
            .replace("10.96.0.10", "10.96.0.11");
        let v1 = objs(&[
            SVC.into(),
            other.clone(),
            slice("web-a", &["10.0.0.1"]),
            slice("web-b", &["10.0.0.2"]),
        ]);
        let mut t = ChangeTracker::new("node-a");
        t.replace_services(v1.services.clone());
        t.replace_slices(v1.slices.clone());
        t.set_nodes(&[]);
        t.flush();
        assert_matches_full(&t, &v1);
        // Relist without `other` and `web-b`.
        let v2 = objs(&[SVC.into(), slice("web-a", &["10.0.0.1"])]);
        t.replace_services(v2.services.clone());
        t.replace_slices(v2.slices.clone());
        let c = t.flush();
        assert!(c.names_changed);
        assert_matches_full(&t, &v2);
        // Single events.
        t.delete_slice(&("default".into(), "web-a".into()));
        t.flush();
        assert_matches_full(&t, &objs(&[SVC.into()]));
        t.delete_service(&("default".into(), "web".into()));
        t.flush();
        assert_eq!(t.target(), &Target::default());
        t.upsert_service(v1.services[0].clone());
        t.flush();
        assert_matches_full(&t, &objs(&[SVC.into()]));
    }

    #[test]
    fn changes_and_ports_without_local_endpoints_are_counted() {
        let local = SVC.replace("spec:\n", "spec:\n  internalTrafficPolicy: Local\n");
        let v1 = objs(&[local.clone(), slice("web-a", &["10.0.0.1"])]);
        let mut t = ChangeTracker::new("node-a");
        t.replace_all(v1.clone());
        t.flush();
        assert_eq!(t.change_counts(), (1, 1));
        // The only endpoint is on no node: ClusterIP traffic has no local endpoint.
        assert_eq!(t.no_local_endpoints(), (1, 0));
        t.replace_all(v1);
        t.flush();
        assert_eq!(t.change_counts(), (1, 1), "nothing changed");
        // No endpoint at all: rejected, not counted.
        t.replace_all(objs(&[local]));
        t.flush();
        assert_eq!(t.change_counts(), (1, 2));
        assert_eq!(t.no_local_endpoints(), (0, 0));
        t.upsert_slice(objs(&[slice("web-b", &["10.0.0.2"])]).slices.remove(0));
        t.flush();
        assert_eq!(t.change_counts(), (1, 3));
        assert_eq!(t.no_local_endpoints(), (1, 0));
    }

    #[test]
    fn deleting_everything_empties_the_target() {
        let v1 = objs(&[SVC.into(), slice("web-a", &["10.0.0.1"])]);
        let mut t = ChangeTracker::new("node-a");
        t.replace_all(v1);
        t.flush();
        t.replace_all(ClusterObjects::default());
        let c = t.flush();
        assert_eq!((c.frontends.len(), c.backends.len()), (1, 1));
        assert_eq!(t.target(), &Target::default());
    }
}
