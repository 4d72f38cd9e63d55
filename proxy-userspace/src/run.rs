//! `vipx run`: keep the kernel maps equal to the source (a manifests directory or the API
//! server) and the pod program attached to every matching interface, until SIGINT/SIGTERM.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use ::kube::runtime::watcher;
use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Node;
use notify::{RecursiveMode, Watcher as _};
use serde::{Deserialize, Serialize};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    config::Cidr,
    conntrack,
    digest::DigestedObjects,
    loader::{self, Attachments, MapSizes},
    maps::{self, FailedFrontend, MapWriter},
    nodeaddr::NodeAddresses,
    nodeif::{self, NodeInterfaces},
    podns::PodNamespaces,
    ranges::SourceRanges,
    serve::{self, Telemetry, metrics::MapUse, service_health::ServiceHealth},
    socklb::{self, SocketLb},
    source::{
        ClusterObjects, DirCache, SourceConfig,
        kube::{self, Applied, KubeState, Update},
    },
    sync::{ChangeTracker, Changes},
};

pub struct RunOptions {
    pub source: SourceConfig,
    pub node_name: String,
    pub pod_interfaces: Vec<glob::Pattern>,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub sizes: MapSizes,
    /// Full resync even without a change event (kube-proxy's `--sync-period`: 30 s).
    pub resync: Duration,
    /// Syncs are at least this far apart; a change after a quiet spell is applied at once
    /// (kube-proxy's `--min-sync-period` and BoundedFrequencyRunner: 1 s).
    pub min_sync: Duration,
    /// How long a TCP endpoint removed from every Service keeps its connections.
    pub endpoint_grace: Duration,
    pub conntrack: ConntrackSettings,
    /// Where a pod's flow to its own Service that lands on itself is SNATed from (`None`: not
    /// SNATed; the pod then cannot reach itself through its Service).
    pub hairpin: Option<std::net::Ipv4Addr>,
    /// How frontends of Services without `vipx.io/lb-algorithm` pick backends.
    pub lb_algorithm: crate::desired::LbAlgorithm,
    /// `/healthz` and `/livez` (kube-proxy: 0.0.0.0:10256); `None`: not served.
    pub healthz_bind: Option<SocketAddr>,
    /// `/metrics` (kube-proxy: 127.0.0.1:10249); `None`: not served.
    pub metrics_bind: Option<SocketAddr>,
    /// The pods' CIDRs (`--cluster-cidr`), one per family: accepted and validated, not used yet.
    pub cluster_cidrs: Vec<Cidr>,
    /// Socket-level load balancing for the node's own sockets.
    pub socket_lb: SocketLb,
    /// Where the socket programs attach (`None`: the cgroup v2 hierarchy's root).
    pub cgroup_root: Option<PathBuf>,
    /// Which of the node's addresses serve node ports (empty: all of them).
    pub nodeport_addresses: Vec<Cidr>,
    /// The node's external interfaces (empty: those holding a node port address).
    pub node_interfaces: Vec<glob::Pattern>,
    /// Generic XDP on the node's interfaces instead of native.
    pub node_mode: crate::nodeif::NodeMode,
}

/// Names of what is programmed, by reverse-NAT id, so `vipx services` can label what it reads
/// from the maps (which hold only addresses and ids).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateFile {
    /// "addr:port/proto" of a frontend -> service port name.
    pub frontends: BTreeMap<String, String>,
}

pub const STATE_FILE: &str = "services.json";

/// How conntrack is collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackSettings {
    pub timeouts: conntrack::Timeouts,
    pub gc_interval: Duration,
    /// The flood guard: new flows one source may start per second (`Some(0)`: no guard;
    /// `None`: derived from the table size, see [`loader::default_flood_limit`]).
    pub max_new_per_source: Option<u32>,
}

impl ConntrackSettings {
    /// The flood guard's limit for a conntrack table of `entries`.
    pub fn flood_limit(&self, entries: u32) -> u32 {
        self.max_new_per_source.unwrap_or_else(|| {
            loader::default_flood_limit(entries, self.timeouts.tcp_syn, self.gc_interval)
        })
    }
}

impl Default for ConntrackSettings {
    fn default() -> Self {
        Self {
            timeouts: conntrack::Timeouts::default(),
            gc_interval: DEFAULT_CONNTRACK_GC_INTERVAL,
            max_new_per_source: None,
        }
    }
}

/// A pass over 1M entries takes about half a second, nearly all of it the kernel's batch reads
/// (`vipx-bench ct-gc`): every 30 s that is under 2% of a core. Closed flows then go within
/// 40 s; a full table makes room by evicting the least recently used meanwhile.
pub const DEFAULT_CONNTRACK_GC_INTERVAL: Duration = Duration::from_secs(30);

/// Checks that `name` is a DNS-1123 subdomain, as a Node name must be: lowercase letters, digits,
/// '-' and '.', labels starting and ending with a letter or digit, at most 253 characters. It
/// also names directories (pins, state), so nothing like '/' or ".." may pass.
pub fn check_node_name(name: &str) -> Result<(), String> {
    const MAX: usize = 253;
    if name.is_empty() {
        return Err("a node name must not be empty".to_owned());
    }
    if name.len() > MAX {
        return Err(format!(
            "a node name has at most {MAX} characters, this one {}",
            name.len()
        ));
    }
    let label_ok = |l: &str| {
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let b = l.as_bytes();
        b.first().is_some_and(|c| alnum(*c))
            && b.last().is_some_and(|c| alnum(*c))
            && b.iter().all(|c| alnum(*c) || *c == b'-')
    };
    if name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid node name (a DNS-1123 subdomain: lowercase letters, digits, \
             '-' and '.', each dot-separated part starting and ending with a letter or digit)"
        ))
    }
}

/// Whether the objects mention `node_name` at all: a Node of that name, or an endpoint on it.
/// (`vipx run` asks the manifests cache's digests the same, `DigestedObjects::mentions_node`.)
pub fn mentions_node(objs: &ClusterObjects, node_name: &str) -> bool {
    DigestedObjects::of(objs.clone()).mentions_node(node_name)
}

/// What a health endpoint will report: when the maps last matched the desired state.
#[derive(Clone, Debug, Default)]
pub struct SyncHealth {
    /// The last sync that completed (the maps say what the manifests say, except for
    /// `failed_frontends`).
    pub last_sync_ok: Option<SystemTime>,
    /// The error of the last sync, if it failed.
    pub last_error: Option<String>,
    /// Completed syncs since start.
    pub syncs: u64,
    /// Frontends that did not fit at the last sync (retried at every sync).
    pub failed_frontends: Vec<FailedFrontend>,
    /// Why the source cannot be read now (the API server unreachable, a watch failing), empty
    /// when it delivers. Meanwhile the maps keep the last programmed state (fail static).
    pub source_errors: Vec<String>,
}

/// Items of `now` not in `before`, and items of `before` not in `now`: what to report when a
/// list of problems is recomputed at every sync but should be logged once per change.
fn diff<'a>(
    before: &'a BTreeSet<String>,
    now: &'a BTreeSet<String>,
) -> (Vec<&'a String>, Vec<&'a String>) {
    (
        now.difference(before).collect(),
        before.difference(now).collect(),
    )
}

/// Whether a change to the manifests directory is complete enough to read. A file being written
/// (created, then modified in pieces, as `kubectl get -o yaml > dir/x.yaml` does) is read once it
/// is closed, not half-way: YAML cut at a line boundary often still parses, and reading it would
/// remove the Services after the cut until the next change. Renames (atomic replacement, a
/// ConfigMap volume's `..data` swap), removals and closes after writing are complete.
fn settles(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(CreateKind::File) => false,
        EventKind::Modify(ModifyKind::Data(_)) => false,
        _ => true,
    }
}

/// What the read begun at start left for the first sync: the directory cache, and, when the
/// read found anything new, a tracker that took it and what that changed.
type Prefetched = (DirCache, Option<(ChangeTracker, ManifestRead)>);

/// What a read of the manifests directory applied to the tracker left for the sync to report
/// and check.
struct ManifestRead {
    changes: Changes,
    /// The read listed the directory itself (see [`directory_read`]).
    saw_directory: bool,
    has_objects: bool,
    mentions_node: bool,
    nodes: Vec<Node>,
    problems: Vec<String>,
}

impl ManifestRead {
    /// `objs`, read from `dir`, replace what `tracker` holds, which is flushed.
    fn apply(tracker: &mut ChangeTracker, objs: DigestedObjects, dir: &Path, node: &str) -> Self {
        let read = Self {
            changes: Changes::default(),
            saw_directory: directory_read(Some(&objs), dir),
            has_objects: objs.has_objects(),
            mentions_node: objs.mentions_node(node),
            nodes: objs.nodes.clone(),
            problems: objs.problems.iter().map(ToString::to_string).collect(),
        };
        tracker.replace_all_digested(objs);
        Self {
            changes: tracker.flush(),
            ..read
        }
    }

    /// This read after `earlier` (of the same tracker): the changes of both.
    fn after(mut self, earlier: Self) -> Self {
        self.changes.absorb(earlier.changes);
        self.saw_directory |= earlier.saw_directory;
        self
    }
}

/// The read-ahead's tracker and read, taking over from `stand_in` (the controller's tracker
/// until the first sync): node port addresses an interface scan found meanwhile went to the
/// stand-in; they are applied here, and what they move joins the read's changes.
fn adopt_read_ahead(
    stand_in: &ChangeTracker,
    (mut tracker, mut read): (ChangeTracker, ManifestRead),
) -> (ChangeTracker, ManifestRead) {
    if tracker.set_node_addresses(stand_in.node_addresses().to_vec()) {
        read.changes.absorb(tracker.flush());
    }
    (tracker, read)
}

/// Whether a load saw the manifests directory itself (listed it completely): `None` (nothing
/// new) or a directory-level problem means it did not.
fn directory_read(loaded: Option<&DigestedObjects>, dir: &Path) -> bool {
    loaded.is_some_and(|objs| !objs.problems.iter().any(|p| p.file.as_path() == dir))
}

/// Default state directory of a node.
pub fn default_state_dir(node_name: &str) -> PathBuf {
    Path::new("/run/vipx").join(node_name)
}

/// Every interface of this network namespace with its index (if_nameindex asks the kernel
/// through netlink, so unlike /sys/class/net it reflects the namespace we run in even under
/// `nsenter --net`).
/// `None` when the kernel could not be asked: an empty list would read as "every interface
/// gone" and unpin the links of live ones.
pub fn interfaces() -> Option<Vec<(String, u32)>> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return None;
        }
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push((
                CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(),
                (*p).if_index,
            ));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    Some(out)
}

/// The index of interface `name` now, asked on its own (0: no such interface).
fn index_of(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: NUL-terminated string we own.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

struct Controller {
    opts: RunOptions,
    ebpf: Ebpf,
    writer: MapWriter,
    tracker: ChangeTracker,
    dir: DirCache,
    /// The manifests directory's first read and its translation, begun at start beside the
    /// eBPF load (which takes the verifier a few hundred ms): taken by the first sync.
    prefetch: Option<std::thread::JoinHandle<Prefetched>>,
    /// The API source's relist state (`None` with the manifests source).
    kube: Option<KubeState>,
    attachments: Attachments,
    /// Reconcile every key next time: at start, on the periodic resync, after a failed apply.
    full: bool,
    /// Problems already reported, so a bad file or an unsupported part of a Service is logged
    /// once when it appears, not at every resync.
    last_problems: BTreeSet<String>,
    /// Failed frontends already reported, likewise.
    last_failed: BTreeSet<String>,
    /// Whether the manifests were checked for this node's name (once, at the first load with
    /// objects in it).
    node_checked: bool,
    health: SyncHealth,
    /// Interfaces an attach failed on, so the failure is logged once, not at every scan.
    refused: BTreeSet<String>,
    /// Whether the manifests directory was read once (see `try_sync`).
    source_seen: bool,
    /// Whether a sync applied a read of every file (see `try_sync`).
    first_clean_read: bool,
    /// Memory was freed by this sync's source work: trim the allocator after it.
    trim: bool,
    born: Instant,
    telemetry: Arc<Telemetry>,
    /// Conntrack collection (`None` when it could not start).
    collector: Option<conntrack::Collector>,
    /// No collector restart before this (a thread that dies at once is not restarted in a loop).
    collector_restart_at: Option<Instant>,
    /// The node's addresses serving node ports, re-read at every interface scan.
    node_addresses: NodeAddresses,
    /// XDP and egress reverse NAT on the node's external interfaces.
    node_interfaces: NodeInterfaces,
    /// The health check node ports of LoadBalancer Services with a Local traffic policy.
    service_health: ServiceHealth,
    /// `loadBalancerSourceRanges` in the kernel.
    source_ranges: SourceRanges,
    /// `--socket-lb all`: the pods' namespaces the socket programs serve.
    pod_namespaces: Option<PodNamespaces>,
}

/// Hands the memory a re-read of the manifests freed back to the kernel. glibc's malloc keeps
/// freed chunks for reuse, and what parsing a big directory frees (the YAML and the objects
/// replaced) is scattered between chunks still in use, so without this the resident size stays
/// near the parsing peak for good. Only after a re-read: a no-op resync frees little.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only works on the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The least time between two restarts of the conntrack collector thread.
const COLLECTOR_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// How long a restarted vipx keeps the adopted state while a manifest file cannot be read.
const STARTUP_GRACE: Duration = Duration::from_secs(10);

impl Controller {
    fn sync(&mut self) -> Result<()> {
        // Until every watcher listed once, an empty tracker means "unknown", not "no Services".
        if self.kube.as_ref().is_some_and(|k| !k.ready()) {
            return Ok(());
        }
        let started = Instant::now();
        let r = self.try_sync();
        // What the maps now say, the health check ports say too (503 while a sync fails).
        self.service_health
            .sync(self.tracker.health_checks(), r.is_ok());
        match &r {
            Ok(()) => {
                self.health.last_sync_ok = Some(SystemTime::now());
                self.health.last_error = None;
                self.health.syncs += 1;
                self.report(started.elapsed());
            }
            Err(e) => self.health.last_error = Some(format!("{e:#}")),
        }
        r
    }

    /// What changed in the manifests directory, `None` when nothing needs writing.
    fn manifest_changes(&mut self) -> Result<Option<Changes>> {
        let SourceConfig::Manifests(manifests) = &self.opts.source else {
            bail!("not a manifests source");
        };
        let manifests = manifests.clone();
        let started = Instant::now();
        let mut earlier = None;
        if let Some((dir, first)) = self.prefetch.take().and_then(|h| h.join().ok()) {
            self.dir = dir;
            if let Some(first) = first {
                let (tracker, read) = adopt_read_ahead(&self.tracker, first);
                self.tracker = tracker;
                earlier = Some(read);
            }
        }
        // Files changed since the prefetch read them (before the watcher started, so no event
        // says so) are read again now; the cache re-reads only what changed.
        let node = self.opts.node_name.clone();
        let read = self
            .dir
            .load_digested(&manifests)
            .map(|objs| ManifestRead::apply(&mut self.tracker, objs, &manifests, &node));
        let loaded = match (read, earlier) {
            (Some(now), Some(earlier)) => Some(now.after(earlier)),
            (now, earlier) => now.or(earlier),
        };
        if loaded.is_some() {
            tracing::debug!(
                parse_ms = started.elapsed().as_secs_f64() * 1e3,
                "manifests read"
            );
        }
        // Until the directory has been read once, an empty read means "unknown", not "no
        // Services": applying it would delete every frontend a previous vipx left pinned (and
        // the flows through them). Keep what is programmed and retry.
        if !self.source_seen && !loaded.as_ref().is_some_and(|r| r.saw_directory) {
            bail!(
                "the manifests directory {} could not be read yet; the programmed state is kept",
                manifests.display()
            );
        }
        self.source_seen = true;
        // A re-read parsed every changed file: give what it freed back to the system.
        self.trim |= loaded.is_some();
        let changes = match loaded {
            Some(read) => {
                self.warn_if_node_unknown(read.has_objects, read.mentions_node);
                self.note_node_deletion(&read.nodes);
                self.report_problems(read.problems);
                read.changes
            }
            // Nothing changed on disk: only a due full reconcile or a retry has work to do.
            // Node addresses that changed left Services to translate again.
            None if self.tracker.has_pending() => self.tracker.flush(),
            None if self.full || !self.writer.pending().is_empty() => Changes::default(),
            None => return Ok(None),
        };
        // Just after a restart a file caught unreadable or half-written has no last good read to
        // stand in for it: applying now would delete its Services from the adopted maps (and
        // break their flows) until the file is whole again. Wait for a clean read a little
        // while; after that, files that stay broken lose their Services (reported above).
        if !self.first_clean_read
            && self.dir.unread_files() > 0
            && !self.writer.programmed().frontends.is_empty()
            && self.born.elapsed() < STARTUP_GRACE
        {
            self.full = true;
            bail!(
                "{} manifest file(s) could not be read cleanly yet; the adopted state is kept \
                 (for up to {STARTUP_GRACE:?} after start)",
                self.dir.unread_files()
            );
        }
        self.first_clean_read = true;
        Ok(Some(changes))
    }

    /// What the API source changed since the last sync (applied to the tracker as it came).
    fn kube_changes(&mut self) -> Changes {
        if !self.node_checked {
            self.node_checked = true;
            if !self.tracker.knows_node() {
                tracing::warn!(
                    node = %self.opts.node_name,
                    "the API server has no Node of this name: every endpoint counts as remote \
                     (traffic policy Local selects none); check --node-name / NODE_NAME"
                );
            }
        }
        let changes = self.tracker.flush();
        self.trim |= !changes.is_empty();
        self.report_problems(Vec::new());
        changes
    }

    /// Logs problems that appeared or went away since the last sync.
    fn report_problems(&mut self, source_problems: Vec<String>) {
        let problems: BTreeSet<String> = source_problems
            .into_iter()
            .chain(self.tracker.problems())
            .collect();
        let (new, gone) = diff(&self.last_problems, &problems);
        for p in new {
            tracing::warn!("skipped: {p}");
        }
        for p in gone {
            tracing::info!("resolved: {p}");
        }
        self.last_problems = problems;
    }

    fn try_sync(&mut self) -> Result<()> {
        let started = Instant::now();
        let first = self.health.syncs == 0;
        let changes = if self.kube.is_some() {
            self.kube_changes()
        } else {
            match self.manifest_changes()? {
                Some(c) => c,
                None => return Ok(()),
            }
        };
        let read_ms = started.elapsed().as_secs_f64() * 1e3;
        let target = self.tracker.target();
        let full = std::mem::take(&mut self.full);
        let st = if full {
            self.writer.apply(target)
        } else {
            self.writer
                .apply_keys(target, &changes.frontends, &changes.backends)
        };
        // The ranges of whatever frontends the apply wrote (a failed one is retried with it).
        // Frontends whose ranges change stop checking their established flows first (a range
        // is removed before its replacement comes), and start again once all are in.
        let changing = self
            .source_ranges
            .changing(target, self.writer.programmed());
        if let Err(e) = self.writer.unflag_source_ranges(&changing) {
            self.full = true;
            return Err(e);
        }
        if let Err(e) = self.source_ranges.sync(target, self.writer.programmed()) {
            self.full = true;
            return Err(e);
        }
        // Only now, with every range in: established flows from outside them end.
        if let Err(e) = self.writer.flag_source_ranges(&self.source_ranges.ids()) {
            self.full = true;
            return Err(e);
        }
        // Whatever the apply managed to write: an apply that failed half-way changed some UDP
        // frontends already, and their flows to the backends that left are purged all the same.
        let purges = self.writer.take_udp_purges();
        if let Some(c) = &self.collector {
            c.purge(purges);
        }
        let st = match st {
            Ok(st) => st,
            Err(e) => {
                self.full = true;
                return Err(e);
            }
        };
        let apply_ms = started.elapsed().as_secs_f64() * 1e3 - read_ms;
        if changes.names_changed || full {
            self.write_state(target)?;
        }
        let failed: BTreeSet<String> = st.failed.iter().map(ToString::to_string).collect();
        let (new, gone) = diff(&self.last_failed, &failed);
        let failures_changed = !new.is_empty() || !gone.is_empty();
        for f in new {
            tracing::warn!("not programmed, retried at every sync: {f}");
        }
        for f in gone {
            tracing::info!("no longer failing: {f}");
        }
        self.last_failed = failed;
        self.health.failed_frontends = st.failed.clone();
        let noop = st.is_noop();
        // A no-op resync every 30 s would drown the log; the first sync says that vipx is in sync
        // even when it adopted identical pinned state or found nothing to program.
        if first || !noop || failures_changed {
            tracing::info!(
                noop,
                frontends = target.frontends.len(),
                backends = target.backends.len(),
                added = st.frontends_added,
                changed = st.frontends_changed,
                removed = st.frontends_removed,
                failed = st.failed.len(),
                map_writes = st.map_writes,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                // Source read and translation, then the map writer (source ranges included).
                read_ms,
                apply_ms,
                "maps synced"
            );
        } else {
            tracing::debug!(frontends = target.frontends.len(), "maps synced (no-op)");
        }
        if std::mem::take(&mut self.trim) {
            release_freed_memory();
        }
        Ok(())
    }

    /// A collector thread that stopped (it only stops when told to, so a panic) is reported and
    /// replaced, at most once per [`COLLECTOR_RESTART_BACKOFF`]: without it flows would live
    /// until the LRU evicts them, and UDP purges would never run.
    fn watch_collector(&mut self) {
        let Some(col) = self.collector.as_mut() else {
            return;
        };
        if let Some(why) = col.reap() {
            tracing::error!(
                "conntrack collection stopped ({why}); it is started again (see \
                 vipx_conntrack_gc_restarts_total)"
            );
        }
        let now = Instant::now();
        if col.running() || self.collector_restart_at.is_some_and(|t| now < t) {
            return;
        }
        self.collector_restart_at = Some(now + COLLECTOR_RESTART_BACKOFF);
        let hairpin = self.opts.hairpin.map(|a| a.octets());
        let restarted = loader::conntrack_tables(&self.opts.pin_dir).and_then(|mut tables| {
            tables.hairpin = hairpin;
            col.restart(tables)
        });
        match restarted {
            Ok(()) => tracing::info!("conntrack collection started again"),
            Err(e) => tracing::error!(
                "conntrack collection could not be started again (retried in \
                 {COLLECTOR_RESTART_BACKOFF:?}): {e:#}"
            ),
        }
    }

    /// `/healthz` fails while this node's Node object says it is being deleted (kube-proxy's
    /// `SyncNode`). Without a Node object nothing says so. Its addresses are the default node
    /// port addresses.
    fn note_node_deletion(&mut self, nodes: &[Node]) {
        let node = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.opts.node_name.as_str()));
        let eligible = node.is_none_or(serve::health::node_eligible);
        self.telemetry.health.set_node_eligible(eligible);
        self.node_addresses.set_node(node);
    }

    /// Tell health and metrics that the maps now say what the source says.
    fn report(&self, took: Duration) {
        let t = &self.telemetry;
        let (services, slices) = self.tracker.change_counts();
        t.metrics.set_changes(services, slices);
        let (internal, external) = self.tracker.no_local_endpoints();
        t.metrics.set_no_local_endpoints(internal, external);
        let p = self.writer.programmed();
        let size = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let svc_entries = p.frontends.values().map(|f| 1 + f.slots.len()).sum();
        let sizes = self.opts.sizes;
        t.metrics.set_owned_maps(
            [
                (proxy_common::map_names::SVC4, svc_entries, sizes.services),
                (
                    proxy_common::map_names::BACKEND4,
                    p.backends.len(),
                    sizes.backends,
                ),
                (
                    proxy_common::map_names::REVNAT4,
                    p.revnat.len(),
                    sizes.revnat,
                ),
                (
                    proxy_common::map_names::VIP4,
                    self.writer.vips().len(),
                    sizes.revnat,
                ),
            ]
            .into_iter()
            .map(|(map, n, max)| MapUse {
                map,
                entries: size(n),
                max_entries: u64::from(max),
                truncated: None,
            })
            .collect(),
        );
        t.synced(took);
    }

    /// Warn once when nothing in the manifests names this node: every endpoint would be remote,
    /// which is legitimate for a node without pods but usually means a wrong --node-name.
    fn warn_if_node_unknown(&mut self, has_objects: bool, mentions_node: bool) {
        if self.node_checked || !has_objects {
            return;
        }
        self.node_checked = true;
        if !mentions_node {
            tracing::warn!(
                node = %self.opts.node_name,
                source = %self.opts.source,
                "no Node object and no endpoint (nodeName) in the manifests names this node: \
                 every endpoint counts as remote (traffic policy Local selects none); check \
                 --node-name / NODE_NAME"
            );
        }
    }

    fn write_state(&self, target: &maps::Target) -> Result<()> {
        let state = StateFile {
            frontends: target
                .frontends
                .iter()
                .map(|(k, v)| (k.to_string(), v.service.to_string()))
                .collect(),
        };
        fs::create_dir_all(&self.opts.state_dir)?;
        let path = self.opts.state_dir.join(STATE_FILE);
        let tmp = self.opts.state_dir.join(".services.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Attach to new matching interfaces; forget ones that disappeared.
    /// Attach to new pod interfaces, forget gone ones, and re-read the node's addresses;
    /// returns whether those changed (a sync is due).
    fn scan_interfaces(&mut self) -> bool {
        let mut addresses_read = true;
        let addresses_changed = match self.node_addresses.refresh() {
            Ok(Some(addresses)) => self.tracker.set_node_addresses(addresses),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!("node port addresses not refreshed: {e:#}");
                addresses_read = false;
                false
            }
        };
        let Some(present) = interfaces() else {
            tracing::warn!("listing interfaces failed; retried at the next scan");
            return addresses_changed;
        };
        // Gone, or deleted and created again under the same name (a pod sandbox restarting
        // within one scan): its links went with the old interface. Asked again one by one
        // before the pins go: unpinning a live interface's links would detach them.
        let gone: Vec<String> = self
            .attachments
            .interfaces()
            .filter(|(name, index)| !present.iter().any(|(n, i)| n == name && i == index))
            .filter(|(name, index)| index_of(name) != *index)
            .map(|(name, _)| name.to_owned())
            .collect();
        for i in gone {
            // The kernel dropped the links with the interface; their pins go too.
            if let Err(e) = self.attachments.forget(&mut self.ebpf, &i) {
                tracing::warn!(interface = %i, "{e:#}");
            }
            tracing::info!(interface = %i, "interface gone");
        }
        let served: Vec<(String, u32)> = present
            .iter()
            .filter(|(name, _)| self.opts.pod_interfaces.iter().any(|g| g.matches(name)))
            .cloned()
            .collect();
        for e in self.attachments.prune(&served, &present, index_of) {
            tracing::warn!("{e:#}");
        }
        if let Some(pods) = &mut self.pod_namespaces {
            pods.sync(&mut self.ebpf, &served);
        }
        self.refused
            .retain(|name| present.iter().any(|(n, _)| n == name));
        let external = nodeif::select(
            &present,
            self.node_addresses.by_interface(),
            &self.node_addresses.selected(),
            &self.opts.node_interfaces,
            &self.opts.pod_interfaces,
        );
        // An unreadable address list says nothing about the interfaces: keep what is attached.
        if addresses_read {
            self.node_interfaces.sync(&mut self.ebpf, &external);
        }
        self.node_interfaces.resolve_neighbours();
        for (name, index) in present {
            if self.attachments.is_attached(&name)
                || !self.opts.pod_interfaces.iter().any(|g| g.matches(&name))
            {
                continue;
            }
            match self.attachments.attach(&mut self.ebpf, &name, index) {
                Ok(()) => {
                    self.refused.remove(&name);
                    tracing::info!(interface = %name, "attached");
                }
                // Retried at every scan; said once per interface.
                Err(e) => {
                    if self.refused.insert(name.clone()) {
                        tracing::warn!(interface = %name, "not attached: {e:#}");
                    }
                }
            }
        }
        addresses_changed
    }
}

/// The change events of a source: a manifests directory's inotify events (settled), or the API
/// watchers' updates.
enum Events {
    Manifests {
        rx: mpsc::Receiver<()>,
        /// Kept alive while events are wanted.
        _watcher: notify::RecommendedWatcher,
    },
    Kube(std::pin::Pin<Box<dyn Stream<Item = Update> + Send>>),
}

enum Event {
    /// The manifests directory changed: read it again.
    Reread,
    Kube(Update),
}

impl Events {
    async fn start(source: &SourceConfig, node_name: &str) -> Result<Self> {
        match source {
            SourceConfig::Manifests(manifests) => {
                let (tx, rx) = mpsc::channel::<()>(1);
                let mut watcher =
                    notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                        if ev.is_ok_and(|ev| settles(&ev.kind)) {
                            // A full channel already means "sync pending".
                            let _ = tx.try_send(());
                        }
                    })?;
                watcher
                    .watch(manifests, RecursiveMode::NonRecursive)
                    .with_context(|| format!("watching {}", manifests.display()))?;
                Ok(Events::Manifests {
                    rx,
                    _watcher: watcher,
                })
            }
            SourceConfig::Kube { kubeconfig } => {
                let client = kube::client(kubeconfig.as_deref()).await?;
                Ok(Events::Kube(Box::pin(kube::watch(client, node_name))))
            }
        }
    }

    /// Lets a burst of file events finish: editors and `kubectl` write in bursts.
    async fn settle(&mut self) {
        if let Events::Manifests { rx, .. } = self {
            tokio::time::sleep(Duration::from_millis(50)).await;
            while rx.try_recv().is_ok() {}
        }
    }

    /// The next event (never `None` while the source lives).
    async fn next(&mut self) -> Option<Event> {
        match self {
            // Cancel-safe (the select in `run` drops it for other events): the burst is let
            // finish in `settle`.
            Events::Manifests { rx, .. } => rx.recv().await.map(|()| Event::Reread),
            Events::Kube(stream) => stream.next().await.map(Event::Kube),
        }
    }
}

impl Controller {
    /// Feeds one API update to the tracker; returns whether a sync is due.
    fn apply_update(&mut self, update: Update) -> bool {
        // Before `apply` strips what translation does not read (deletion marks among it).
        if let Update::Node(e) = &update {
            match &**e {
                watcher::Event::Apply(n) | watcher::Event::InitApply(n) => {
                    self.note_node_deletion(std::slice::from_ref(n));
                }
                watcher::Event::Delete(_) => self.note_node_deletion(&[]),
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
        }
        let Some(kube) = self.kube.as_mut() else {
            return false;
        };
        let was_ready = kube.ready();
        let was_connected = kube.connected();
        if let Update::Error(k, e) = &update {
            tracing::debug!(kind = %k, "watch failed (retried with backoff): {e}");
        }
        let applied = kube.apply(update, &mut self.tracker);
        let errors = kube.errors();
        if was_connected && !errors.is_empty() {
            tracing::warn!(
                "the API server cannot be watched (retried with backoff; the programmed state \
                 is kept): {}",
                errors.join("; ")
            );
        } else if !was_connected && errors.is_empty() {
            tracing::info!("watching the API server again");
        }
        self.health.source_errors = errors;
        let ready = kube.ready();
        if ready && !was_ready {
            tracing::info!("Services, EndpointSlices and this Node listed");
        }
        match applied {
            Applied::Nothing => false,
            // Only what changed the desired state (not a Node status or annotation update, an
            // equal slice) is a queued change and costs a sync, as in kube-proxy.
            Applied::Changed => ready && self.tracker.has_pending(),
            Applied::Relisted(kind) => {
                if was_ready {
                    // Objects deleted while the watch was down are gone from the relist; make
                    // the maps exactly the desired state, leftovers included.
                    tracing::info!(%kind, "relisted");
                    self.full = true;
                }
                ready
            }
        }
    }
}

/// The sources of the conntrack reply entries into the writer's backend filter (a warning when
/// conntrack cannot be read: the filter then holds the adopted backends only).
fn seed_backend_filter(writer: &mut MapWriter, pin_dir: &Path) {
    let mut sources = BTreeSet::new();
    let walked = loader::conntrack_tables(pin_dir).and_then(|t| {
        conntrack::walk(&t.ct, |keys, values| {
            for (k, v) in keys.iter().zip(values) {
                if v.flags & proxy_common::CT_F_REPLY != 0 {
                    sources.insert((k.saddr, k.sport));
                }
            }
        })
        .context("reading conntrack")
    });
    if let Err(e) = walked {
        tracing::warn!(
            "the backend filter is new and conntrack could not be read ({e:#}): replies of \
             flows to backends no longer programmed may pass untranslated"
        );
        return;
    }
    match writer.seed_backend_filter(sources) {
        Ok(0) => {}
        Ok(n) => tracing::info!(sources = n, "backend filter seeded from conntrack"),
        Err(e) => tracing::warn!("seeding the backend filter: {e:#}"),
    }
}

pub async fn run(opts: RunOptions) -> Result<()> {
    // Held until the process exits: a second vipx on this pin directory waits here.
    let _lock = loader::lock_pin_dir(&opts.pin_dir)?;
    // The node port addresses before the read begun below, which translates with them.
    let mut node_addresses = NodeAddresses::new(opts.nodeport_addresses.clone());
    let addresses = node_addresses.refresh()?;
    let new_tracker = || {
        let mut t = ChangeTracker::new(&opts.node_name);
        if let Some(a) = &addresses {
            t.set_node_addresses(a.clone());
        }
        t
    };
    let prefetch = match &opts.source {
        SourceConfig::Manifests(dir) => {
            let dir = dir.clone();
            let node = opts.node_name.clone();
            let mut tracker = new_tracker();
            Some(std::thread::spawn(move || {
                let started = Instant::now();
                let mut cache = DirCache::default();
                let loaded = cache.load_digested(&dir);
                let parsed = started.elapsed();
                let read = loaded.map(|objs| ManifestRead::apply(&mut tracker, objs, &dir, &node));
                tracing::debug!(
                    parse_ms = parsed.as_secs_f64() * 1e3,
                    translate_ms = (started.elapsed() - parsed).as_secs_f64() * 1e3,
                    "manifests read ahead"
                );
                (cache, read.map(|r| (tracker, r)))
            }))
        }
        SourceConfig::Kube { .. } => None,
    };
    // After the lock: a second vipx of a surge rollout binds the same ports once the first is
    // gone. kube-proxy's health timeout is twice its sync period.
    let telemetry = Arc::new(Telemetry::new(opts.resync.saturating_mul(2)));
    let servers = serve::start(telemetry.clone(), opts.healthz_bind, opts.metrics_bind).await?;
    if !opts.cluster_cidrs.is_empty() {
        let cidrs: Vec<String> = opts.cluster_cidrs.iter().map(ToString::to_string).collect();
        tracing::info!(
            cluster_cidr = %cidrs.join(","),
            "cluster CIDR noted (not used yet: vipx does not masquerade)"
        );
    }
    // Under the pin directory's lock: no other vipx pins maps meanwhile.
    let maps_created = loader::service_maps_absent(&opts.pin_dir);
    let (mut ebpf, legacy_moved) = loader::load_moving_legacy(&opts.pin_dir, opts.sizes)?;
    // Until the new programs are attached, the old ones serve from the conntrack map set aside:
    // a start that fails before then puts it back for them (and for the old build, if it is
    // started again).
    let mut legacy_guard = loader::LegacyConntrackGuard::new(&opts.pin_dir, legacy_moved);
    loader::write_config(&mut ebpf, opts.hairpin)?;
    if let Err(e) = loader::write_clock(&mut ebpf) {
        // The programs keep the coarse clock helper: slower, as correct.
        tracing::warn!("the programs' jiffies clock: {e:#}; they read the coarse clock instead");
    }
    let flood_limit = opts.conntrack.flood_limit(opts.sizes.conntrack);
    tracing::info!(
        conntrack_entries = opts.sizes.conntrack,
        max_new_flows_per_source = flood_limit,
        "conntrack sized (the flood guard engages when it is half full)"
    );
    let stats = Arc::new(loader::take_stats(&mut ebpf)?);
    // Conntrack collection in a thread of its own: a pass over 1M entries takes a fraction of a
    // second and must not hold up a sync.
    let gc_stats = Arc::new(conntrack::GcStats::default());
    let collector = loader::conntrack_tables(&opts.pin_dir)
        .and_then(|mut tables| {
            tables.hairpin = opts.hairpin.map(|a| a.octets());
            conntrack::Collector::start(
                tables,
                stats.clone(),
                opts.conntrack.timeouts,
                opts.conntrack.gc_interval,
                gc_stats.clone(),
            )
        })
        .inspect_err(|e| {
            tracing::warn!(
                "conntrack is not collected (flows live until the LRU evicts them): {e:#}"
            );
        })
        .ok();
    // Held until `run` returns: the guard switches with the table's pressure meanwhile.
    let _flood_guard = match flood_limit {
        0 => None,
        limit => Some(crate::flood::start(
            loader::take_config(&mut ebpf)?,
            stats.clone(),
            gc_stats.clone(),
            opts.sizes.conntrack,
            limit,
        )?),
    };
    // The data-path series read the counters and the kernel-written maps at scrape time.
    match serve::metrics::KernelDataPath::new(
        stats,
        &opts.pin_dir,
        collector.is_some().then(|| gc_stats.clone()),
    ) {
        Ok(dp) => telemetry.set_data_path(Arc::new(dp)),
        Err(e) => tracing::warn!("metrics will lack the data-path series: {e:#}"),
    }
    let reading = Instant::now();
    let maps = loader::service_maps(&mut ebpf)?;
    maps.created.set(maps_created);
    let mut writer = MapWriter::new(maps)?;
    tracing::debug!(ms = reading.elapsed().as_secs_f64() * 1e3, "maps read back");
    writer.set_endpoint_grace(opts.endpoint_grace);
    // Before the programs are swapped in: their hairpin answers must find the address.
    writer.set_hairpin(opts.hairpin)?;
    writer.set_default_lb_algorithm(opts.lb_algorithm);
    // Every program this run attaches, verified side by side before each is attached.
    let mut programs = loader::NODE_PROGRAMS.to_vec();
    if opts.socket_lb != SocketLb::Off {
        programs.extend(socklb::program_names());
    }
    let verifying = Instant::now();
    loader::verify_programs(&mut ebpf, &programs).context(
        "loading the programs (--socket-lb off leaves the socket programs out, if one of \
         them is refused)",
    )?;
    tracing::debug!(
        programs = programs.len(),
        ms = verifying.elapsed().as_secs_f64() * 1e3,
        "programs verified"
    );
    let attachments = Attachments::new(&mut ebpf, &opts.pin_dir)?;
    let node_interfaces = NodeInterfaces::new(&mut ebpf, &opts.pin_dir, opts.node_mode)?;
    nodeif::reserve_snat_ports();
    let source_ranges = SourceRanges::new(loader::take_source_ranges(&mut ebpf)?);
    let pod_namespaces = (opts.socket_lb == SocketLb::All).then(PodNamespaces::default);
    match opts.socket_lb {
        SocketLb::Host | SocketLb::All => {
            let cgroup = match &opts.cgroup_root {
                Some(p) => p.clone(),
                None => socklb::cgroup2_mount()?,
            };
            socklb::attach(&mut ebpf, &opts.pin_dir, &cgroup)
                .context("socket-level load balancing (--socket-lb off turns it off)")?;
        }
        SocketLb::Off => socklb::detach(&opts.pin_dir)?,
    }
    tracing::info!(
        pin_dir = %opts.pin_dir.display(),
        adopted_frontends = writer.programmed().frontends.len(),
        source = %opts.source,
        "eBPF loaded"
    );
    let mut events = Events::start(&opts.source, &opts.node_name).await?;
    let resync = opts.resync;
    let min_sync = opts.min_sync;
    let tracker = new_tracker();
    let kube = matches!(opts.source, SourceConfig::Kube { .. }).then(KubeState::default);
    let mut c = Controller {
        opts,
        ebpf,
        writer,
        tracker,
        dir: DirCache::default(),
        prefetch,
        kube,
        attachments,
        full: true,
        last_problems: BTreeSet::new(),
        last_failed: BTreeSet::new(),
        node_checked: false,
        health: SyncHealth::default(),
        refused: BTreeSet::new(),
        source_seen: false,
        first_clean_read: false,
        trim: false,
        born: Instant::now(),
        telemetry: telemetry.clone(),
        collector,
        collector_restart_at: None,
        node_addresses,
        node_interfaces,
        service_health: ServiceHealth::default(),
        source_ranges,
        pod_namespaces,
    };

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut resync_tick = tokio::time::interval(resync);
    let mut iface_tick = tokio::time::interval(Duration::from_millis(500));
    // The old flows are in the new map before the first scan swaps the programs in, so a flow
    // that sees a packet during the swap finds its entry; what the old programs added between
    // the copy and the swap is copied after it.
    let before = loader::copy_legacy_conntrack(&c.opts.pin_dir);
    // A backend filter new to these pins (an upgrade from a build without it) learns the
    // sources of the reply entries already in conntrack before the new egress program can pass
    // their packets by it.
    if c.writer.backend_filter_fresh() {
        seed_backend_filter(&mut c.writer, &c.opts.pin_dir);
    }
    c.scan_interfaces();
    legacy_guard.disarm();
    let after = loader::migrate_legacy_conntrack(&c.opts.pin_dir);
    loader::void_flow_copies(&c.opts.pin_dir);
    let mut carried = 0;
    for r in [before, after] {
        match r {
            Ok(n) => carried += n,
            Err(e) => tracing::warn!("conntrack of the previous build not all carried over: {e:#}"),
        }
    }
    if carried > 0 {
        tracing::info!(
            flows = carried,
            "conntrack entries of the previous build carried over"
        );
    }
    // Not a queued change: as kube-proxy, healthy until a change waits too long. Counting the
    // start would make /livez fail while the API server is down at start, and the liveness
    // probe restart vipx in a loop for the whole outage while the pinned data path serves.
    let mut dirty = true;
    // A failed sync is retried after a second (maps stay consistent meanwhile), not only at the
    // next resync.
    let mut retry = false;
    let mut retry_tick = tokio::time::interval(Duration::from_secs(1));
    // Not polled while nothing fails: missed ticks must not replay in a burst at the next failure.
    retry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The same failure is said once, not at every retry.
    let mut last_error: Option<String> = None;
    // BoundedFrequencyRunner: a sync starts at once unless the last one started less than
    // `min_sync` ago; then it waits for that (changes meanwhile join it).
    let mut last_sync: Option<tokio::time::Instant> = None;
    let mut sync_at: Option<tokio::time::Instant> = None;
    loop {
        if dirty {
            let now = tokio::time::Instant::now();
            match last_sync.map(|t| t + min_sync).filter(|due| *due > now) {
                Some(due) => sync_at = Some(due),
                None => {
                    dirty = false;
                    retry = false;
                    sync_at = None;
                    if c.kube.as_ref().is_none_or(KubeState::ready) {
                        last_sync = Some(now);
                    }
                    match c.sync() {
                        Ok(()) => last_error = None,
                        Err(e) => {
                            let msg = format!("{e:#}");
                            if last_error.as_ref() != Some(&msg) {
                                tracing::error!("sync failed (retried every second): {msg}");
                            }
                            last_error = Some(msg);
                            retry = true;
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            ev = events.next() => match ev {
                Some(Event::Reread) => {
                    telemetry.queued();
                    events.settle().await;
                    dirty = true;
                }
                Some(Event::Kube(u)) => {
                    if c.apply_update(u) {
                        telemetry.queued();
                        dirty = true;
                    }
                }
                None => bail!("the source's event stream ended"),
            },
            _ = resync_tick.tick() => {
                // Repairs anything that drifted (a map edited by hand, a failed write).
                c.full = true;
                dirty = true;
            }
            () = tokio::time::sleep_until(sync_at.unwrap_or_else(tokio::time::Instant::now)),
                if sync_at.is_some() => sync_at = None,
            _ = iface_tick.tick() => {
                if c.scan_interfaces() {
                    telemetry.queued();
                    dirty = true;
                }
                c.watch_collector();
            }
            _ = retry_tick.tick(), if retry => dirty = true,
        }
    }
    // The data path outlives the process: pinned links keep the programs attached and the pinned
    // maps keep every Service and flow; the next vipx adopts both. `vipx cleanup` uninstalls.
    tracing::info!(
        "stopping: programs stay attached, maps stay pinned (`vipx cleanup` removes them)"
    );
    for e in c.attachments.detach_netlink(&mut c.ebpf) {
        tracing::warn!("{e:#}");
    }
    // Sockets closed before the pin lock is released (`_lock` drops last).
    servers.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Review finding: node port addresses an interface scan found while the manifests were
    /// read ahead went to the controller's stand-in tracker, and the read-ahead tracker that
    /// replaced it at the first sync kept the old ones for good. They carry over now, and the
    /// node port follows them.
    #[test]
    fn the_read_ahead_takes_the_node_addresses_found_meanwhile() {
        use std::net::Ipv4Addr;

        use crate::{digest::DigestedObjects, source::load_str, sync::ChangeTracker};
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
                    spec:\n  type: NodePort\n  clusterIP: 198.19.0.10\n  ports: [{name: http, \
                    port: 80, targetPort: 8080, nodePort: 30080}]\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: \
                    web-a\n  namespace: default\n  labels: {kubernetes.io/service-name: web}\n\
                    addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- \
                    addresses: [198.18.0.1]\n  conditions: {ready: true}\n";
        let objs = load_str("t.yaml", yaml);
        assert!(objs.problems.is_empty(), "{:?}", objs.problems);
        let (old, new) = (Ipv4Addr::new(198, 18, 9, 1), Ipv4Addr::new(198, 18, 9, 2));
        let node_port = |a: Ipv4Addr| crate::maps::L4Addr {
            addr: a,
            port: 30080,
            proto: proxy_common::IPPROTO_TCP,
        };
        let mut ahead = ChangeTracker::new("n1");
        ahead.set_node_addresses(vec![old]);
        let read = super::ManifestRead::apply(
            &mut ahead,
            DigestedObjects::of(objs),
            std::path::Path::new("t"),
            "n1",
        );
        assert!(ahead.target().frontends.contains_key(&node_port(old)));
        let mut stand_in = ChangeTracker::new("n1");
        stand_in.set_node_addresses(vec![new]);
        let (t, read) = super::adopt_read_ahead(&stand_in, (ahead, read));
        assert!(t.target().frontends.contains_key(&node_port(new)));
        assert!(!t.target().frontends.contains_key(&node_port(old)));
        assert!(read.changes.frontends.contains(&node_port(new)));
    }

    #[test]
    fn a_directory_never_read_keeps_the_programmed_state() {
        use crate::source::DirCache;
        let missing = std::env::temp_dir().join(format!("vipx-missing-{}", std::process::id()));
        let mut cache = DirCache::default();
        let first = cache.load_digested(&missing);
        assert!(!super::directory_read(first.as_ref(), &missing));
        // Still unreadable: nothing new, still not read.
        let again = cache.load_digested(&missing);
        assert!(!super::directory_read(again.as_ref(), &missing));
        let dir = std::env::temp_dir().join(format!("vipx-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let read = DirCache::default().load_digested(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            super::directory_read(read.as_ref(), &dir),
            "an empty directory is read: no Services"
        );
    }

    #[test]
    fn a_file_is_read_once_written_not_half_way() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RemoveKind,
            RenameMode,
        };
        let waits = [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
        ];
        let reads = [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Create(CreateKind::Folder),
        ];
        for k in waits {
            assert!(!super::settles(&k), "{k:?}");
        }
        for k in reads {
            assert!(super::settles(&k), "{k:?}");
        }
    }

    use super::*;
    use crate::source::load_str;

    #[test]
    fn node_names_are_dns_1123_subdomains() {
        for ok in [
            "worker-1",
            "node1.example.com",
            "a",
            "0",
            "ip-10-0-0-1.ec2.internal",
            &"a".repeat(253),
        ] {
            assert_eq!(check_node_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Worker-1",
            "worker_1",
            "-worker",
            "worker-",
            "a..b",
            ".a",
            "a.",
            "..",
            ".",
            "../../etc",
            "a/b",
            "node 1",
            "nöde",
            &"a".repeat(254),
        ] {
            let err = check_node_name(bad).expect_err(bad);
            assert!(!err.is_empty());
        }
    }

    #[test]
    fn a_node_is_mentioned_by_a_node_object_or_an_endpoint() {
        let node = load_str(
            "n.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: worker-1}\n",
        );
        assert!(mentions_node(&node, "worker-1"));
        assert!(!mentions_node(&node, "worker-2"));
        let slice = load_str(
            "s.yaml",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\n\
             addressType: IPv4\nendpoints:\n- addresses: [10.0.0.1]\n  nodeName: worker-2\n",
        );
        assert!(slice.problems.is_empty(), "{:?}", slice.problems);
        assert!(mentions_node(&slice, "worker-2"));
        assert!(!mentions_node(&slice, "worker-1"));
    }

    #[test]
    fn problems_are_reported_once_per_change() {
        let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        let before = set(&["a", "b"]);
        let same = set(&["a", "b"]);
        assert_eq!(diff(&before, &same), (vec![], vec![]));
        let now = set(&["b", "c"]);
        let (new, gone) = diff(&before, &now);
        assert_eq!((new, gone), (vec![&"c".to_owned()], vec![&"a".to_owned()]));
    }
}
