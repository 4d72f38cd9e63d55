//! Prometheus metrics: kube-proxy's `kubeproxy_*` series where the meaning is the same (names,
//! types, buckets and labels as upstream pkg/proxy/metrics), and `vipx_*` series read from the
//! data path at scrape time.
//!
//! Exposed in the OpenMetrics text format (prometheus-client's only text encoder), which
//! Prometheus negotiates and scrapes. Counters are registered without their `_total` suffix:
//! the encoder appends it, so the exposed names are exactly kube-proxy's.

use std::{
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use prometheus_client::{
    encoding::text::{encode_eof, encode_registry},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets, linear_buckets},
    },
    registry::Registry,
};
use proxy_common::{Stat, map_names};

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// `kubeproxy_sync_proxy_rules_no_local_endpoints_total` label values (upstream).
pub const TRAFFIC_POLICY_INTERNAL: &str = "internal";
pub const TRAFFIC_POLICY_EXTERNAL: &str = "external";

/// The kube-proxy series, updated by the sync loop and the health handlers.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub network_programming: Histogram,
    last_timestamp: FloatGauge,
    last_queued_timestamp: FloatGauge,
    service_changes: Counter,
    endpoint_changes: Counter,
    no_local_endpoints: Family<Labels, Gauge>,
    healthz: Family<Labels, Counter>,
    livez: Family<Labels, Counter>,
    /// Occupancy of the maps vipx writes itself (known from the writer, no kernel walk).
    owned_maps: Mutex<Vec<MapUse>>,
}

/// Upstream `NetworkProgrammingLatency` buckets: 0.25 s .. 5 min.
fn network_programming_buckets() -> impl Iterator<Item = f64> {
    linear_buckets(0.25, 0.25, 2)
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // Upstream `SyncProxyRulesLatency`: exponential buckets from 1 ms, 15 of them.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration.clone(),
        );
        let network_programming = Histogram::new(network_programming_buckets());
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds (vipx: from noticing a change to \
             the maps reflecting it)",
            network_programming.clone(),
        );
        let last_timestamp = FloatGauge::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            last_timestamp.clone(),
        );
        let last_queued_timestamp = FloatGauge::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            last_queued_timestamp.clone(),
        );
        let service_changes = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            service_changes.clone(),
        );
        let endpoint_changes = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            endpoint_changes.clone(),
        );
        let no_local_endpoints = Family::<Labels, Gauge>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            no_local_endpoints.clone(),
        );
        // Present from the start, as upstream sets both at every sync.
        for policy in [TRAFFIC_POLICY_INTERNAL, TRAFFIC_POLICY_EXTERNAL] {
            drop(no_local_endpoints.get_or_create(&vec![("traffic_policy", policy.to_owned())]));
        }
        let healthz = Family::<Labels, Counter>::default();
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            healthz.clone(),
        );
        let livez = Family::<Labels, Counter>::default();
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            livez.clone(),
        );
        Self {
            registry,
            sync_duration,
            network_programming,
            last_timestamp,
            last_queued_timestamp,
            service_changes,
            endpoint_changes,
            no_local_endpoints,
            healthz,
            livez,
            owned_maps: Mutex::new(Vec::new()),
        }
    }

    /// A sync completed at `at` after `took`; `queued`: when the oldest change it applied was
    /// noticed (none for a periodic resync with nothing new).
    pub fn synced(&self, at: SystemTime, took: Duration, queued: Option<SystemTime>) {
        self.sync_duration.observe(took.as_secs_f64());
        self.last_timestamp.set(unix_seconds(at));
        if let Some(q) = queued {
            self.network_programming
                .observe(at.duration_since(q).unwrap_or_default().as_secs_f64());
        }
    }

    /// A change was noticed at `at`.
    pub fn queued(&self, at: SystemTime) {
        self.last_queued_timestamp.set(unix_seconds(at));
    }

    /// Cumulative Service and EndpointSlice changes seen by the change tracker.
    pub fn set_changes(&self, services: u64, endpoint_slices: u64) {
        for (c, total) in [
            (&self.service_changes, services),
            (&self.endpoint_changes, endpoint_slices),
        ] {
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        }
    }

    /// Service ports with a Local policy whose traffic finds no local endpoint (internal:
    /// internalTrafficPolicy, external: externalTrafficPolicy).
    pub fn set_no_local_endpoints(&self, internal: usize, external: usize) {
        for (policy, n) in [
            (TRAFFIC_POLICY_INTERNAL, internal),
            (TRAFFIC_POLICY_EXTERNAL, external),
        ] {
            self.no_local_endpoints
                .get_or_create(&vec![("traffic_policy", policy.to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Occupancy of the maps vipx writes (from the map writer, after each sync).
    pub fn set_owned_maps(&self, maps: Vec<MapUse>) {
        *self
            .owned_maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = maps;
    }

    pub(crate) fn answered(&self, livez: bool, status: u16) {
        let f = if livez { &self.livez } else { &self.healthz };
        f.get_or_create(&vec![("code", status.to_string())]).inc();
    }

    /// The whole exposition: the kube-proxy series, then the data path's.
    pub fn encode(&self, data_path: Option<&DataPathSnapshot>) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let owned = self
            .owned_maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let _ = encode_registry(&mut out, &data_path_registry(&owned, data_path));
        let _ = encode_eof(&mut out);
        out
    }
}

/// How full one BPF map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUse {
    pub map: &'static str,
    pub entries: u64,
    pub max_entries: u64,
    /// For maps counted by walking them: whether the walk stopped at its time budget before
    /// the end (then `entries` is a lower bound).
    pub truncated: Option<bool>,
}

/// What the data path says at one scrape.
#[derive(Clone, Debug, Default)]
pub struct DataPathSnapshot {
    /// Per-CPU counters summed over CPUs, by `Stat::name`.
    pub stats: Vec<(&'static str, u64)>,
    /// Maps the kernel writes (conntrack, affinity), counted.
    pub maps: Vec<MapUse>,
    /// Set when something could not be read (the rest is still reported).
    pub error: Option<String>,
    /// Conntrack collection, when it runs.
    pub conntrack_gc: Option<GcSnapshot>,
}

/// What conntrack collection has done since vipx started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcSnapshot {
    pub runs: u64,
    pub expired: u64,
    pub stale: u64,
    pub purged: u64,
    pub evicted: u64,
    pub entries: u64,
    pub last_duration: Duration,
    pub restarts: u64,
    /// `flood::Level` as a number: 0 off, 1 engaged, 2 strict.
    pub flood_guard_engaged: u64,
}

impl GcSnapshot {
    pub fn read(gc: &crate::conntrack::GcStats) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        Self {
            runs: gc.runs.load(Relaxed),
            expired: gc.expired.load(Relaxed),
            stale: gc.stale.load(Relaxed),
            purged: gc.purged.load(Relaxed),
            evicted: gc.evicted.load(Relaxed),
            entries: gc.pass_base().entries,
            last_duration: Duration::from_micros(gc.last_duration_us.load(Relaxed)),
            restarts: gc.restarts.load(Relaxed),
            flood_guard_engaged: gc.flood_guard_engaged.load(Relaxed),
        }
    }
}

/// Reads the data path; blocking (map syscalls), called off the async threads.
pub trait DataPath: Send + Sync + 'static {
    fn snapshot(&self) -> DataPathSnapshot;
}

fn data_path_registry(owned: &[MapUse], snap: Option<&DataPathSnapshot>) -> Registry {
    let mut r = Registry::default();
    let entries = Family::<Labels, Gauge>::default();
    let max = Family::<Labels, Gauge>::default();
    let truncated = Family::<Labels, Gauge>::default();
    let counted = snap.map(|s| s.maps.as_slice()).unwrap_or_default();
    for m in owned.iter().chain(counted) {
        let l = vec![("map", m.map.to_owned())];
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        entries.get_or_create(&l).set(n(m.entries));
        max.get_or_create(&l).set(n(m.max_entries));
        if let Some(t) = m.truncated {
            truncated.get_or_create(&l).set(i64::from(t));
        }
    }
    r.register(
        "vipx_map_entries",
        "Entries in use in a BPF map (service, backend and reverse-NAT maps from the map writer; \
         conntrack and affinity counted by walking the map, cached for 10 s)",
        entries,
    );
    r.register("vipx_map_max_entries", "Capacity of a BPF map", max);
    r.register(
        "vipx_map_count_truncated",
        "1 when the last walk of a kernel-written map stopped at its time budget (entries is then \
         a lower bound)",
        truncated,
    );
    let Some(snap) = snap else {
        return r;
    };
    let stats = Family::<Labels, Counter>::default();
    for (reason, v) in &snap.stats {
        stats
            .get_or_create(&vec![("reason", (*reason).to_owned())])
            .inc_by(*v);
    }
    r.register(
        "vipx_datapath_events",
        "Data-path counters of the pod programs (per-CPU STATS map, summed over CPUs) by reason",
        stats,
    );
    let misses = Counter::<u64>::default();
    if let Some((_, v)) = snap
        .stats
        .iter()
        .find(|(n, _)| *n == Stat::CtMissNonSyn.name())
    {
        misses.inc_by(*v);
    }
    r.register(
        "vipx_conntrack_miss_non_syn",
        "Non-SYN TCP packets to a frontend without a conntrack entry (an undersized conntrack map \
         or flows older than vipx show here); same as vipx_datapath_events_total{reason=\"ct_miss_non_syn\"}",
        misses,
    );
    if let Some(gc) = &snap.conntrack_gc {
        let runs = Counter::<u64>::default();
        runs.inc_by(gc.runs);
        r.register(
            "vipx_conntrack_gc_runs",
            "Conntrack collection passes",
            runs,
        );
        let deleted = Family::<Labels, Counter>::default();
        for (reason, v) in [
            ("expired", gc.expired),
            ("stale", gc.stale),
            ("purged", gc.purged),
        ] {
            deleted
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc_by(v);
        }
        r.register(
            "vipx_conntrack_gc_deleted",
            "Conntrack deletions by collection: flows idle past their state's timeout (expired, \
             counted per flow), entries whose frontend or backend is gone (stale), UDP entries \
             of a backend that left their Service (purged)",
            deleted,
        );
        let evicted = Counter::<u64>::default();
        evicted.inc_by(gc.evicted);
        r.register(
            "vipx_conntrack_evictions",
            "Conntrack entries the full LRU table evicted to make room (derived at each pass from \
             the entries the programs created and removed and the table's occupancy); non-zero \
             means --max-conntrack is too small",
            evicted,
        );
        let entries = Gauge::<i64>::default();
        entries.set(i64::try_from(gc.entries).unwrap_or(i64::MAX));
        r.register(
            "vipx_conntrack_gc_entries",
            "Conntrack entries after the last collection pass",
            entries,
        );
        let took = FloatGauge::default();
        took.set(gc.last_duration.as_secs_f64());
        r.register(
            "vipx_conntrack_gc_duration_seconds",
            "How long the last conntrack collection pass took",
            took,
        );
        let restarts = Counter::<u64>::default();
        restarts.inc_by(gc.restarts);
        let engaged = Gauge::<i64>::default();
        engaged.set(i64::from(gc.flood_guard_engaged >= 1));
        r.register(
            "vipx_conntrack_flood_guard_engaged",
            "1 while the flood guard limits each source's new flows (conntrack estimated half \
             full; released below three eighths)",
            engaged,
        );
        let strict = Gauge::<i64>::default();
        strict.set(i64::from(gc.flood_guard_engaged >= 2));
        r.register(
            "vipx_conntrack_flood_guard_strict",
            "1 while the flood guard counts the flows a source closes too (conntrack estimated \
             seven eighths full; released below three quarters)",
            strict,
        );
        r.register(
            "vipx_conntrack_gc_restarts",
            "Times the conntrack collector thread was found stopped (a panic) and started again; \
             each is logged as an error",
            restarts,
        );
    }
    let errors = Gauge::<i64>::default();
    errors.set(i64::from(snap.error.is_some()));
    r.register(
        "vipx_datapath_read_error",
        "1 when the last scrape could not read part of the data path (see the log)",
        errors,
    );
    r
}

/// Budget of one walk of a kernel-written map: a 1M-entry LRU takes ~0.5 s of get_next_key
/// syscalls, so a walk is bounded in time and its count cached.
const WALK_BUDGET: Duration = Duration::from_secs(1);
/// How long a walk's count is reused (Prometheus scrapes every 15-60 s).
const WALK_CACHE: Duration = Duration::from_secs(10);

struct Counted {
    at: Instant,
    maps: Vec<MapUse>,
}

/// The real data path: the STATS map of the loaded object and the pinned conntrack and affinity
/// maps, opened by pin so the sync loop keeps its own handles.
pub struct KernelDataPath {
    stats: Arc<PerCpuArray<MapData, u64>>,
    gc: Option<Arc<crate::conntrack::GcStats>>,
    ct: HashMap<MapData, proxy_common::CtKey4, proxy_common::CtValue>,
    affinity: HashMap<MapData, proxy_common::AffinityKey4, proxy_common::AffinityValue>,
    ct_max: u64,
    affinity_max: u64,
    /// Also serialises walks: a second scrape during a walk waits and reuses its count.
    cache: Mutex<Option<Counted>>,
}

impl KernelDataPath {
    /// `stats`: the object's STATS map (taken out of it); `pin_dir`: where CT4 and AFFINITY4 are
    /// pinned; `gc`: the conntrack collector's counters, when it runs.
    pub fn new(
        stats: Arc<PerCpuArray<MapData, u64>>,
        pin_dir: &std::path::Path,
        gc: Option<Arc<crate::conntrack::GcStats>>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let open = |name: &str| -> anyhow::Result<(Map, u64)> {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            let max = u64::from(data.info()?.max_entries());
            Ok((Map::from_map_data(data)?, max))
        };
        let (ct, ct_max) = open(map_names::CT4)?;
        let (affinity, affinity_max) = open(map_names::AFFINITY4)?;
        Ok(Self {
            stats,
            gc,
            ct: HashMap::try_from(ct).context("the conntrack map")?,
            affinity: HashMap::try_from(affinity).context("the affinity map")?,
            ct_max,
            affinity_max,
            cache: Mutex::new(None),
        })
    }
}

/// Keys of `m`, at most `cap` (an LRU walked while it changes can restart from its first key)
/// and for at most `budget`. Returns (count, truncated).
fn count_keys<K: aya::Pod, V: aya::Pod>(
    m: &HashMap<MapData, K, V>,
    cap: u64,
    budget: Duration,
) -> (u64, bool) {
    let start = Instant::now();
    let mut n = 0u64;
    for k in m.keys() {
        if k.is_err() {
            return (n, true);
        }
        n += 1;
        if n >= cap {
            return (cap, false);
        }
        if n.is_multiple_of(4096) && start.elapsed() > budget {
            return (n, true);
        }
    }
    (n, false)
}

impl DataPath for KernelDataPath {
    fn snapshot(&self) -> DataPathSnapshot {
        let mut snap = DataPathSnapshot::default();
        for s in Stat::ALL {
            match self.stats.get(&(s as u32), 0) {
                Ok(v) => snap.stats.push((s.name(), v.iter().sum())),
                Err(e) => snap.error = Some(format!("reading STATS: {e}")),
            }
        }
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.as_ref().is_none_or(|c| c.at.elapsed() > WALK_CACHE) {
            let (ct, ct_cut) = count_keys(&self.ct, self.ct_max, WALK_BUDGET);
            let (aff, aff_cut) = count_keys(&self.affinity, self.affinity_max, WALK_BUDGET);
            *cache = Some(Counted {
                at: Instant::now(),
                maps: vec![
                    MapUse {
                        map: map_names::CT4,
                        entries: ct,
                        max_entries: self.ct_max,
                        truncated: Some(ct_cut),
                    },
                    MapUse {
                        map: map_names::AFFINITY4,
                        entries: aff,
                        max_entries: self.affinity_max,
                        truncated: Some(aff_cut),
                    },
                ],
            });
        }
        snap.maps = cache.as_ref().map(|c| c.maps.clone()).unwrap_or_default();
        snap.conntrack_gc = self.gc.as_deref().map(GcSnapshot::read);
        snap
    }
}

/// Shared by the sync loop and the HTTP handlers.
pub type SharedDataPath = Arc<dyn DataPath>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `# TYPE` line's name and type.
    fn families(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| {
                let (n, t) = l.split_once(' ')?;
                Some((n.to_owned(), t.to_owned()))
            })
            .collect()
    }

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn kube_proxy_names_types_and_values() {
        let m = Metrics::new();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        m.queued(t0);
        m.synced(
            t0 + Duration::from_millis(1500),
            Duration::from_millis(3),
            Some(t0),
        );
        m.set_changes(3, 5);
        m.set_changes(4, 5);
        m.set_no_local_endpoints(2, 1);
        m.answered(false, 200);
        m.answered(true, 503);
        let text = m.encode(None);
        let fams = families(&text);
        for (name, ty) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
            (
                "kubeproxy_network_programming_duration_seconds",
                "histogram",
            ),
            ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "gauge",
            ),
            ("kubeproxy_sync_proxy_rules_service_changes", "counter"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes", "counter"),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "gauge",
            ),
            ("kubeproxy_proxy_healthz", "counter"),
            ("kubeproxy_proxy_livez", "counter"),
        ] {
            assert!(
                fams.contains(&(name.to_owned(), ty.to_owned())),
                "{name} {ty} missing:\n{text}"
            );
        }
        // The sample names are exactly kube-proxy's.
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_service_changes_total"),
            Some("4")
        );
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            Some("5")
        );
        assert_eq!(
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}"
            ),
            Some("2")
        );
        assert_eq!(
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
            Some("1001.5")
        );
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\"}"
            ),
            Some("0")
        );
        assert_eq!(
            sample(
                &text,
                "kubeproxy_network_programming_duration_seconds_bucket{le=\"2.0\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample(&text, "kubeproxy_proxy_healthz_total{code=\"200\"}"),
            Some("1")
        );
        assert_eq!(
            sample(&text, "kubeproxy_proxy_livez_total{code=\"503\"}"),
            Some("1")
        );
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
        // No data path: no vipx_datapath series, but the families are declared.
        assert!(!text.contains("vipx_datapath_events_total"));
    }

    #[test]
    fn data_path_series() {
        let m = Metrics::new();
        m.set_owned_maps(vec![MapUse {
            map: map_names::SVC4,
            entries: 3,
            max_entries: 262_144,
            truncated: None,
        }]);
        let snap = DataPathSnapshot {
            stats: Stat::ALL.iter().map(|s| (s.name(), *s as u64)).collect(),
            maps: vec![MapUse {
                map: map_names::CT4,
                entries: 10,
                max_entries: 524_288,
                truncated: Some(false),
            }],
            error: None,
            conntrack_gc: Some(GcSnapshot {
                runs: 4,
                expired: 5,
                stale: 6,
                purged: 7,
                evicted: 8,
                entries: 9,
                last_duration: Duration::from_millis(250),
                restarts: 1,
                flood_guard_engaged: 1,
            }),
        };
        let text = m.encode(Some(&snap));
        for s in Stat::ALL {
            let series = format!("vipx_datapath_events_total{{reason=\"{}\"}}", s.name());
            assert_eq!(
                sample(&text, &series),
                Some((s as u64).to_string().as_str()),
                "{series}\n{text}"
            );
        }
        assert_eq!(
            sample(&text, "vipx_conntrack_miss_non_syn_total"),
            Some((Stat::CtMissNonSyn as u64).to_string().as_str())
        );
        assert_eq!(
            sample(&text, "vipx_map_entries{map=\"VIPX_SVC4\"}"),
            Some("3")
        );
        assert_eq!(
            sample(&text, "vipx_map_entries{map=\"VIPX_CT4\"}"),
            Some("10")
        );
        assert_eq!(
            sample(&text, "vipx_map_max_entries{map=\"VIPX_CT4\"}"),
            Some("524288")
        );
        assert_eq!(
            sample(&text, "vipx_map_count_truncated{map=\"VIPX_CT4\"}"),
            Some("0")
        );
        for (series, v) in [
            ("vipx_conntrack_gc_runs_total", "4"),
            ("vipx_conntrack_gc_deleted_total{reason=\"expired\"}", "5"),
            ("vipx_conntrack_gc_deleted_total{reason=\"stale\"}", "6"),
            ("vipx_conntrack_gc_deleted_total{reason=\"purged\"}", "7"),
            ("vipx_conntrack_evictions_total", "8"),
            ("vipx_conntrack_gc_entries", "9"),
            ("vipx_conntrack_gc_duration_seconds", "0.25"),
            ("vipx_conntrack_gc_restarts_total", "1"),
            ("vipx_conntrack_flood_guard_engaged", "1"),
            ("vipx_conntrack_flood_guard_strict", "0"),
        ] {
            assert_eq!(sample(&text, series), Some(v), "{series}\n{text}");
        }
        assert_eq!(sample(&text, "vipx_datapath_read_error"), Some("0"));
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
