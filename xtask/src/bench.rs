//! `cargo xtask bench`: vipx side by side with kube-proxy's iptables and nftables rules and the
//! hardware floor, every comparison a ratio taken in the same run, each figure a median.
//!
//! 1. Per-packet cost (BPF_PROG_TEST_RUN) — `vipx-bench packet`; beside it the Maglev
//!    reshuffle — `vipx-bench maglev`: the share of new-flow choices a backend removal or
//!    addition moves (no kernel; exact figures, not timings).
//! 2. End to end in the namespace lab: one lab per contender (direct to the pods, vipx, vipx on a
//!    node with netfilter conntrack and rp_filter on, iptables rules, nftables rules) so that
//!    netfilter conntrack, which kube-proxy's rules switch on in their node namespace, taxes only
//!    them and the realistic vipx variant. Contenders are interleaved (A B C D E, A B C D E, ...)
//!    and the client's conntrack and TIME_WAIT sockets settle before every run.
//! 3. Control plane — `vipx-bench control-plane`, the real vipx on a manifests directory (time to
//!    first sync, resident memory), the same on the Kubernetes API (the tests' in-process API
//!    server), and iptables-restore / nft -f of the same rule sets.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vipx_lab::{
    Lab, LabConfig, Realism,
    apiserver::{ApiServer, Resource},
    kube_rules::{self, RestoreMode, RuleService},
    load::{self, Measurement},
    pod_server::SINK_PORT,
};

use crate::{cargo, node_port_bench, root, status, step, target_dir};

/// The measured Service: the seed's VIP in front of the lab's 10 backend pods.
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const BACKENDS: u32 = 10;
const CLUSTER_CIDR: &str = "198.18.64.0/18";

#[derive(Clone, Copy)]
pub(crate) struct Plan {
    packet_services: &'static str,
    pub(crate) e2e_services: &'static [usize],
    pub(crate) reps: usize,
    pub(crate) crr: Duration,
    pub(crate) rr: Duration,
    pub(crate) bulk: Duration,
    control_plane_services: usize,
    /// The large control-plane row: this many services x 10 programmed from empty beside
    /// iptables-restore of the same (0: not measured).
    control_plane_large: usize,
    /// Conntrack entries and distinct flows of the per-packet rows under cache pressure.
    pressure_conntrack: &'static str,
    pressure_flows: &'static str,
}

const FULL: Plan = Plan {
    packet_services: "1,1000,10000,100000",
    e2e_services: &[100, 1000, 10_000],
    reps: 5,
    crr: Duration::from_secs(4),
    rr: Duration::from_secs(4),
    bulk: Duration::from_secs(2),
    control_plane_services: 10_000,
    control_plane_large: 100_000,
    pressure_conntrack: "1048576",
    pressure_flows: "100000",
};

const QUICK: Plan = Plan {
    packet_services: "1,1000,10000",
    e2e_services: &[100, 1000],
    // Odd, so that the median is a sample.
    reps: 3,
    crr: Duration::from_secs(1),
    rr: Duration::from_secs(1),
    bulk: Duration::from_secs(1),
    // iptables-restore of 10,000 services alone takes over a minute here.
    control_plane_services: 1000,
    control_plane_large: 0,
    pressure_conntrack: "65536",
    pressure_flows: "10000",
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Contender {
    Direct,
    Vipx,
    /// vipx on a node namespace as real nodes have it: netfilter conntrack on (the INVALID-drop
    /// rule kube-proxy and most CNIs load) and rp_filter=1.
    VipxNetfilter,
    Iptables,
    Nftables,
}

impl Contender {
    const ALL: [Contender; 5] = [
        Contender::Direct,
        Contender::Vipx,
        Contender::VipxNetfilter,
        Contender::Iptables,
        Contender::Nftables,
    ];

    fn tag(self) -> &'static str {
        match self {
            Contender::Direct => "bdirect",
            Contender::Vipx => "bvipx",
            Contender::VipxNetfilter => "bvipxnf",
            Contender::Iptables => "bipt",
            Contender::Nftables => "bnft",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Vipx => "vipx",
            Contender::VipxNetfilter => "vipx, node netfilter on",
            Contender::Iptables => "iptables",
            Contender::Nftables => "nftables",
        }
    }

    fn realism(self) -> Realism {
        match self {
            Contender::VipxNetfilter => Realism::Node,
            _ => Realism::BENCH,
        }
    }

    fn is_vipx(self) -> bool {
        matches!(self, Contender::Vipx | Contender::VipxNetfilter)
    }
}

#[derive(Serialize, Deserialize)]
struct E2eRow {
    services: usize,
    contender: Contender,
    metric: String,
    unit: String,
    median: f64,
    ratio_to_direct: f64,
    samples: Vec<f64>,
    errors: u64,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct ControlPlane {
    services: usize,
    endpoints_per_service: usize,
    vipx: Value,
    /// The median of `first_sync_runs_ms`, each a fresh start (an empty pin directory).
    vipx_manifests_first_sync_ms: f64,
    vipx_manifests_first_sync_runs_ms: Vec<f64>,
    /// Right after the first sync (of the last start, as are the other memory figures).
    vipx_rss_mib: f64,
    /// After `STEADY_RESYNCS` full resyncs.
    vipx_rss_steady_mib: f64,
    /// The high-water mark (VmHWM) at that moment.
    vipx_rss_peak_mib: f64,
    /// The same figures with the Kubernetes API source (`--kubeconfig`, in-process server).
    vipx_api_first_sync_ms: f64,
    vipx_api_first_sync_runs_ms: Vec<f64>,
    vipx_api_rss_mib: f64,
    vipx_api_rss_steady_mib: f64,
    vipx_api_rss_peak_mib: f64,
    iptables_restore_ms: f64,
    nft_ms: f64,
    /// `vipx-bench control-plane` at `Plan::control_plane_large` services (Null: not measured).
    large: Value,
    /// iptables-restore of kube-proxy's rules for as many services.
    large_iptables_restore_ms: f64,
}

/// Which parts of the bench run (`cargo xtask bench --parts`); all by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Part {
    /// Per-packet cost and the Maglev reshuffle.
    Packet,
    /// End to end in the lab, ClusterIP.
    E2e,
    /// End to end through a node port.
    NodePorts,
    /// Control plane: sync times and memory.
    ControlPlane,
}

impl Part {
    const ALL: [Part; 4] = [Part::Packet, Part::E2e, Part::NodePorts, Part::ControlPlane];

    fn key(self) -> &'static str {
        match self {
            Part::Packet => "packet",
            Part::E2e => "e2e",
            Part::NodePorts => "node_ports",
            Part::ControlPlane => "control_plane",
        }
    }
}

/// Where one part's figures come from: a part not run keeps its figures and their provenance
/// from the previous report.
#[derive(Serialize, Deserialize, Clone)]
struct Provenance {
    /// As `machine()` says it (a part keeps the machine it ran on).
    #[serde(default)]
    machine: String,
    commit: String,
    command: String,
    /// UTC, as `date -u` prints it.
    date: String,
}

#[derive(Serialize, Deserialize)]
struct Report {
    machine: String,
    command: String,
    /// Per part (`Part::key`): the commit, command and date it was measured at.
    #[serde(default)]
    measured: std::collections::BTreeMap<String, Provenance>,
    packet: Value,
    /// The per-packet cache-pressure rows' (conntrack entries, flows).
    #[serde(default)]
    packet_pressure: (u64, u64),
    maglev: Value,
    #[serde(default)]
    e2e: Vec<E2eRow>,
    #[serde(default)]
    node_ports: Vec<node_port_bench::Row>,
    control_plane: ControlPlane,
}

pub(crate) fn progress(msg: &str) {
    eprintln!("\x1b[36mbench:\x1b[0m {msg}");
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {cpu}, kernel {}", kernel.trim())
}

/// The true median: the middle sample, or the mean of the two middle ones.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// "min-max" of the samples, in the precision of the figure beside it.
fn spread(v: &[f64], decimals: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.is_empty() {
        String::from("-")
    } else {
        format!("{lo:.decimals$}-{hi:.decimals$}")
    }
}

/// `n` services; the middle one is the measured VIP in front of the lab's pods, the others
/// point at addresses no one answers (they only fill the tables).
pub(crate) fn services(n: usize, pods: &[(String, Ipv4Addr)]) -> Vec<RuleService> {
    let measured = n / 2;
    (0..n)
        .map(|i| {
            if i == measured {
                return RuleService {
                    namespace: "bench".into(),
                    name: "measured".into(),
                    port_name: "http".into(),
                    vip: VIP,
                    port: 80,
                    endpoints: pods.iter().map(|(_, ip)| (*ip, 5000)).collect(),
                    node_port: None,
                };
            }
            // VIPs from 198.19.1.0 on (198.19.0.10 is the measured one), 10 endpoints each
            // inside 198.18.128.0/17.
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 1, 0)) + i as u32);
            let endpoints = (0..BACKENDS)
                .map(|b| {
                    let k = (i as u32 * BACKENDS + b) % 32_000;
                    (
                        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 1)) + k),
                        8080,
                    )
                })
                .collect();
            RuleService {
                namespace: "bench".into(),
                name: format!("svc-{i:05}"),
                port_name: "http".into(),
                vip,
                port: 80,
                endpoints,
                node_port: None,
            }
        })
        .collect()
}

/// The same services as manifests for vipx: one Service and one EndpointSlice per Service,
/// with every port the rule sets carry for it.
pub(crate) fn write_manifests(dir: &Path, svcs: &[RuleService], node: &str) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut groups: Vec<(&str, &str, Vec<&RuleService>)> = Vec::new();
    for s in svcs {
        match groups
            .iter_mut()
            .find(|g| g.0 == s.namespace && g.1 == s.name)
        {
            Some(g) => g.2.push(s),
            None => groups.push((&s.namespace, &s.name, vec![s])),
        }
    }
    let mut out = String::new();
    for (ns, name, ports) in groups {
        let first = ports[0];
        let kind = if ports.iter().any(|p| p.node_port.is_some()) {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let target = |p: &RuleService| p.endpoints.first().map_or(5000, |e| e.1);
        let svc_ports: String = ports
            .iter()
            .map(|p| {
                let node_port = p
                    .node_port
                    .map_or_else(String::new, |np| format!(", nodePort: {np}"));
                format!(
                    "  - {{name: {}, port: {}, protocol: TCP, targetPort: {}{node_port}}}\n",
                    p.port_name,
                    p.port,
                    target(p)
                )
            })
            .collect();
        let slice_ports: String = ports
            .iter()
            .map(|p| {
                format!(
                    "- {{name: {}, port: {}, protocol: TCP}}\n",
                    p.port_name,
                    target(p)
                )
            })
            .collect();
        let eps: String = first
            .endpoints
            .iter()
            .map(|(ip, _)| {
                format!(
                    "- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: {node}\n"
                )
            })
            .collect();
        write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  type: {kind}\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  ports:\n{svc_ports}\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-bench\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports:\n{slice_ports}endpoints:\n{eps}",
            vip = first.vip,
        )?;
    }
    std::fs::write(dir.join("services.yaml"), out)?;
    Ok(())
}

pub(crate) struct Vipx {
    child: Child,
    pin_dir: PathBuf,
    /// Syncs logged so far, no-op resyncs included.
    syncs: Arc<AtomicUsize>,
}

impl Drop for Vipx {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Start vipx in `node_ns` on `source` (`("--manifests", dir)` or `("--kubeconfig", file)`;
/// `extra`: more `vipx run` arguments); returns once the first sync is logged, with the time
/// from spawn to that moment.
pub(crate) fn start_vipx(
    node_ns: &str,
    node: &str,
    source: (&str, &Path),
    interfaces: &str,
    extra: &[&str],
) -> Result<(Vipx, Duration)> {
    let bin = target_dir().join("release").join("vipx");
    let pin_dir = Path::new("/sys/fs/bpf/vipx").join(node);
    let _ = std::fs::remove_dir_all(&pin_dir);
    let state = target_dir().join("vipx-bench-state").join(node);
    let started = Instant::now();
    let mut child = vipx_lab::ns_command(
        node_ns,
        &bin,
        [
            "run",
            source.0,
            &source.1.display().to_string(),
            "--node-name",
            node,
            "--pod-interfaces",
            interfaces,
            "--state-dir",
            &state.display().to_string(),
            "--max-service-entries",
            "262144",
            "--max-backends",
            "262144",
        ]
        .into_iter()
        .chain(extra.iter().copied()),
    )
    // vipx::run logs no-op resyncs at debug: they are what `steady_rss` counts.
    .env("RUST_LOG", "info,vipx::run=debug")
    .env("NO_COLOR", "1")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .context("starting vipx")?;
    let stderr = child.stderr.take().context("vipx stderr")?;
    let syncs = Arc::new(AtomicUsize::new(0));
    let vipx = Vipx {
        child,
        pin_dir,
        syncs: syncs.clone(),
    };
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let Some(line) = lines.next() else {
            bail!("vipx exited before its first sync");
        };
        let line = line?;
        if line.contains("maps synced") {
            break;
        }
        if line.contains("ERROR") {
            bail!("vipx: {line}");
        }
    }
    let elapsed = started.elapsed();
    syncs.fetch_add(1, Ordering::Relaxed);
    // Keep draining its log so it never blocks on a full pipe, counting syncs.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("maps synced") {
                syncs.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok((vipx, elapsed))
}

/// A `/proc/<pid>/status` figure in MiB (`VmRSS`, `VmHWM`).
fn status_mib(pid: u32, field: &str) -> f64 {
    // nsenter execs vipx in place, so the child's pid is vipx's.
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS")
}

/// Full resyncs (`--resync-seconds 1`) before the steady figure: the first ones after the
/// first sync are where the memory of a long-running vipx settles.
const STEADY_RESYNCS: usize = 3;

/// (resident, high-water mark) in MiB once `resyncs` more syncs than now were logged.
fn steady_rss(v: &Vipx, resyncs: usize) -> Result<(f64, f64)> {
    let want = v.syncs.load(Ordering::Relaxed) + resyncs;
    let deadline = Instant::now() + Duration::from_secs(30 + 2 * resyncs as u64);
    while v.syncs.load(Ordering::Relaxed) < want {
        if Instant::now() > deadline {
            bail!("vipx did not resync {resyncs} times");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = v.child.id();
    Ok((rss_mib(pid), status_mib(pid, "VmHWM")))
}

/// Fresh starts of vipx for each start-to-first-sync figure (odd: a true median).
const FIRST_SYNC_RUNS: usize = 5;

/// What the real vipx costs on `n` services x 10 endpoints from one source.
struct SourceRun {
    /// Every start's time to its first sync.
    first_syncs: Vec<Duration>,
    rss_first_sync_mib: f64,
    rss_steady_mib: f64,
    rss_peak_mib: f64,
}

/// The real vipx on a manifests directory of `n` services in a scratch lab of its own (returned:
/// the rule loads reuse its node namespace).
fn vipx_on_manifests(n: usize) -> Result<(Lab, SourceRun)> {
    vipx_lab::cleanup_stale("bcp")?;
    let lab = Lab::create(LabConfig {
        tag: "bcp".into(),
        backends: 0,
        lab_pod_bin: target_dir().join("release").join("lab-pod"),
        realism: Realism::BENCH,
    })?;
    let svcs = services(n, &[]);
    let manifests = target_dir().join("vipx-bench-cp-manifests");
    write_manifests(&manifests, &svcs, lab.node_name())?;
    progress(&format!(
        "control plane: the real vipx on a manifests directory of {n} services (parse + \
         translate + apply, then {STEADY_RESYNCS} resyncs)"
    ));
    let run = settle(starts(|| {
        start_vipx(
            lab.node_ns(),
            lab.node_name(),
            ("--manifests", &manifests),
            "none-such*",
            &["--resync-seconds", "1"],
        )
    })?)?;
    Ok((lab, run))
}

/// `FIRST_SYNC_RUNS` fresh starts (each stopped before the next, which finds no pins): the last
/// one still running, and every start's time to its first sync.
fn starts(start: impl Fn() -> Result<(Vipx, Duration)>) -> Result<(Vipx, Vec<Duration>)> {
    let mut times = Vec::with_capacity(FIRST_SYNC_RUNS);
    loop {
        let (v, t) = start()?;
        times.push(t);
        if times.len() == FIRST_SYNC_RUNS {
            return Ok((v, times));
        }
        drop(v);
    }
}

/// The memory figures of a vipx that just logged its first sync; stops it.
fn settle((v, first_syncs): (Vipx, Vec<Duration>)) -> Result<SourceRun> {
    let rss_first_sync_mib = rss_mib(v.child.id());
    let (rss_steady_mib, rss_peak_mib) = steady_rss(&v, STEADY_RESYNCS)?;
    drop(v);
    Ok(SourceRun {
        first_syncs,
        rss_first_sync_mib,
        rss_steady_mib,
        rss_peak_mib,
    })
}

/// The same objects `write_manifests` writes, as the API serves them (one port per Service:
/// the control-plane services carry no bulk port).
fn api_objects(s: &RuleService, node: &str) -> (Value, Value) {
    let target = s.endpoints.first().map_or(5000, |e| e.1);
    let service = serde_json::json!({
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": s.vip.to_string(),
            "clusterIPs": [s.vip.to_string()],
            "ports": [{"name": s.port_name, "port": s.port, "protocol": "TCP", "targetPort": target}],
        },
    });
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|(ip, _)| {
            serde_json::json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": node,
            })
        })
        .collect();
    let slice = serde_json::json!({
        "metadata": {
            "name": format!("{}-bench", s.name),
            "namespace": s.namespace,
            "labels": {"kubernetes.io/service-name": s.name},
        },
        "addressType": "IPv4",
        "ports": [{"name": s.port_name, "port": target, "protocol": "TCP"}],
        "endpoints": endpoints,
    });
    (service, slice)
}

/// The real vipx on the Kubernetes API (`--kubeconfig`) serving the same `n` services, from the
/// tests' in-process API server. The server listens on 127.0.0.1 inside the lab's node namespace
/// but runs in this process, so its memory is not in vipx's RSS.
fn vipx_on_api(n: usize) -> Result<SourceRun> {
    vipx_lab::cleanup_stale("bapi")?;
    let lab = Lab::create(LabConfig {
        tag: "bapi".into(),
        backends: 0,
        lab_pod_bin: target_dir().join("release").join("lab-pod"),
        realism: Realism::BENCH,
    })?;
    let api = ApiServer::start_in(Some(lab.node_ns()))?;
    api.apply(
        Resource::Nodes,
        serde_json::json!({"metadata": {"name": lab.node_name()}}),
    )?;
    for s in services(n, &[]) {
        let (service, slice) = api_objects(&s, lab.node_name());
        api.apply(Resource::Services, service)?;
        api.apply(Resource::EndpointSlices, slice)?;
    }
    progress(&format!(
        "control plane: the real vipx on the Kubernetes API (in-process server) with {n} \
         services (list + translate + apply, then {STEADY_RESYNCS} resyncs)"
    ));
    let kubeconfig = api.kubeconfig();
    // vipx stops before the server it watches, and both before the namespaces go.
    let run = settle(starts(|| {
        start_vipx(
            lab.node_ns(),
            lab.node_name(),
            ("--kubeconfig", &kubeconfig),
            "none-such*",
            &["--sync-period", "1s"],
        )
    })?)?;
    drop(api);
    drop(lab);
    Ok(run)
}

/// `cargo xtask bench --memory`: only `vipx_on_manifests`, printed.
pub fn memory(quick: bool) -> Result<()> {
    let n = if quick { &QUICK } else { &FULL }.control_plane_services;
    step("building vipx and lab-pod (release)");
    status(cargo().args([
        "build",
        "--release",
        "-p",
        "proxy-userspace",
        "-p",
        "vipx-tests",
        "--bins",
    ]))?;
    let (lab, m) = vipx_on_manifests(n)?;
    drop(lab);
    let a = vipx_on_api(n)?;
    for (what, r) in [
        ("a manifests directory", &m),
        ("the Kubernetes API (in-process server)", &a),
    ] {
        println!(
            "vipx on {what}, {n} services x {BACKENDS} endpoints: start -> first sync {:.0} ms \
             (median of {FIRST_SYNC_RUNS}; {} ms); resident after the first sync {:.1} MiB, after {STEADY_RESYNCS} resyncs {:.1} MiB \
             (peak {:.1} MiB)",
            median(&ms(&r.first_syncs)),
            spread(&ms(&r.first_syncs), 0),
            r.rss_first_sync_mib,
            r.rss_steady_mib,
            r.rss_peak_mib
        );
    }
    Ok(())
}

fn wait_for_vip(client_ns: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let vip = SocketAddr::from((VIP, 80));
    while vipx_lab::http_get(client_ns, vip, Duration::from_millis(500)).is_err() {
        if Instant::now() > deadline {
            bail!("the VIP does not answer");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

struct Labs {
    labs: Vec<(Contender, Lab)>,
}

impl Labs {
    fn create() -> Result<Self> {
        let bin = target_dir().join("release").join("lab-pod");
        let mut labs = Vec::new();
        for c in Contender::ALL {
            vipx_lab::cleanup_stale(c.tag())?;
            let lab = Lab::create(LabConfig {
                tag: c.tag().into(),
                backends: BACKENDS,
                lab_pod_bin: bin.clone(),
                realism: c.realism(),
            })?;
            load::tune_client(&lab.client().netns)?;
            labs.push((c, lab));
        }
        Ok(Self { labs })
    }

    fn get(&self, c: Contender) -> &Lab {
        &self
            .labs
            .iter()
            .find(|(k, _)| *k == c)
            .expect("every contender has a lab")
            .1
    }
}

/// wrk's connections in flight: 4 for each of its threads, one thread per backend pod.
const CONNECTIONS: u32 = 4 * BACKENDS;

fn measure(lab: &Lab, c: Contender, plan: &Plan) -> Result<[Measurement; 3]> {
    let client = lab.client().netns.clone();
    let pod = lab.backends()[0].ip;
    // Direct spreads over the same ten pods as the proxies, one wrk thread per pod; the proxies
    // get as many threads, all to the VIP. Bulk is one connection, to one pod either way.
    let (http, sink) = match c {
        Contender::Direct => (
            lab.backends()
                .iter()
                .map(|b| SocketAddr::from((b.ip, 5000)))
                .collect::<Vec<_>>(),
            SocketAddr::from((pod, SINK_PORT)),
        ),
        _ => (
            vec![SocketAddr::from((VIP, 80))],
            SocketAddr::from((VIP, SINK_PORT)),
        ),
    };
    let to = load::Spread {
        targets: &http,
        threads: BACKENDS,
    };
    let nss = [client.as_str(), lab.node_ns()];
    load::settle(&nss)?;
    let crr = load::crr(&client, to, plan.crr, CONNECTIONS)?;
    load::settle(&nss)?;
    let rr = load::rr(&client, to, plan.rr, CONNECTIONS)?;
    load::settle(&nss)?;
    let bulk = load::bulk(&client, sink, plan.bulk)?;
    Ok([crr, rr, bulk])
}

/// The measured service also carries a bulk port (the pods' discard port, same number).
fn with_bulk_port(svcs: &mut Vec<RuleService>) {
    let m = svcs.iter().find(|s| s.vip == VIP).cloned();
    if let Some(mut m) = m {
        m.port_name = "bulk".into();
        m.port = SINK_PORT;
        m.endpoints = m.endpoints.iter().map(|(ip, _)| (*ip, SINK_PORT)).collect();
        svcs.push(m);
    }
}

/// Time to load kube-proxy's rule sets for a service count: (services, iptables-restore, nft -f).
type RuleLoads = Vec<(usize, Duration, Duration)>;

fn e2e(plan: &Plan, loads: &mut RuleLoads) -> Result<Vec<E2eRow>> {
    kube_rules::ensure_tools()?;
    load::ensure_tools()?;
    progress(
        "creating five labs (direct, vipx, vipx with node netfilter, iptables, nftables), 10 \
         backend pods each",
    );
    let labs = Labs::create()?;
    let mut rows = Vec::new();
    for &n in plan.e2e_services {
        let pods = labs.get(Contender::Vipx).backend_endpoints();
        let mut svcs = services(n, &pods);
        with_bulk_port(&mut svcs);

        let ipt = labs.get(Contender::Iptables);
        kube_rules::flush_iptables(ipt.node_ns())?;
        progress(&format!(
            "{n} services: iptables-restore of kube-proxy's rules"
        ));
        let t_ipt = kube_rules::load_iptables_with(
            ipt.node_ns(),
            &kube_rules::iptables_restore_input(&svcs, CLUSTER_CIDR),
            // kube-proxy's --noflush is super-linear in Debian 12's iptables-nft 1.8.9 (hours
            // at 10,000 services); the same rules in a namespace that holds only them.
            RestoreMode::Replace,
        )?;
        progress(&format!("  loaded in {:.1} s", t_ipt.as_secs_f64()));
        let nft = labs.get(Contender::Nftables);
        kube_rules::flush_nft(nft.node_ns())?;
        progress(&format!("{n} services: nft -f of kube-proxy's rules"));
        let t_nft =
            kube_rules::load_nft(nft.node_ns(), &kube_rules::nft_input(&svcs, CLUSTER_CIDR))?;
        progress(&format!("  loaded in {:.1} s", t_nft.as_secs_f64()));
        loads.push((n, t_ipt, t_nft));

        let mut vipx = Vec::new();
        for c in Contender::ALL.into_iter().filter(|c| c.is_vipx()) {
            let vl = labs.get(c);
            let manifests = target_dir().join(format!("vipx-bench-manifests-{}", c.tag()));
            write_manifests(&manifests, &svcs, vl.node_name())?;
            vipx.push(
                start_vipx(
                    vl.node_ns(),
                    vl.node_name(),
                    ("--manifests", &manifests),
                    vipx_lab::HOST_IF_GLOB,
                    // Socket-level LB hooks the cgroup root, so every contender's connect()
                    // would run the programs of both vipx processes; the lab's clients are pods,
                    // which the TC programs serve.
                    &["--socket-lb", "off"],
                )?
                .0,
            );
        }
        for c in Contender::ALL {
            if c != Contender::Direct {
                wait_for_vip(&labs.get(c).client().netns)?;
            }
        }

        let mut samples: Vec<(Contender, [Vec<Measurement>; 3])> = Contender::ALL
            .iter()
            .map(|c| (*c, [vec![], vec![], vec![]]))
            .collect();
        for rep in 0..plan.reps {
            for (c, s) in samples.iter_mut() {
                progress(&format!(
                    "{n} services, rep {}/{}: {c:?}",
                    rep + 1,
                    plan.reps
                ));
                let m = measure(labs.get(*c), *c, plan)?;
                for (k, m) in m.into_iter().enumerate() {
                    s[k].push(m);
                }
            }
        }
        drop(vipx);
        let direct: Vec<f64> = samples[0]
            .1
            .iter()
            .map(|v| median(&v.iter().map(|m| m.value).collect::<Vec<_>>()))
            .collect();
        for (c, s) in &samples {
            for (k, metric) in ["short_connections", "keepalive_requests", "bulk"]
                .iter()
                .enumerate()
            {
                let vals: Vec<f64> = s[k].iter().map(|m| m.value).collect();
                let med = median(&vals);
                rows.push(E2eRow {
                    services: n,
                    contender: *c,
                    metric: (*metric).to_owned(),
                    unit: s[k].first().map_or("", |m| m.unit).to_owned(),
                    median: med,
                    ratio_to_direct: if direct[k] > 0.0 {
                        med / direct[k]
                    } else {
                        0.0
                    },
                    samples: vals,
                    errors: s[k].iter().map(|m| m.errors).sum(),
                });
            }
        }
        kube_rules::flush_iptables(ipt.node_ns())?;
        kube_rules::flush_nft(nft.node_ns())?;
    }
    Ok(rows)
}

fn control_plane(plan: &Plan, results: &Path, loads: &RuleLoads) -> Result<ControlPlane> {
    let n = plan.control_plane_services;
    let json = results.join("control-plane.json");
    progress(&format!(
        "control plane: {n} services x {BACKENDS} endpoints through translate -> apply"
    ));
    status(
        Command::new(target_dir().join("release").join("vipx-bench"))
            .args([
                "control-plane",
                "--services",
                &n.to_string(),
                "--reps",
                "5",
                "--json",
            ])
            .arg(&json)
            .stdout(Stdio::null()),
    )?;
    let vipx: Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let (large, large_ipt) = if plan.control_plane_large > 0 {
        control_plane_large(plan.control_plane_large, results)?
    } else {
        (Value::Null, Duration::ZERO)
    };

    // The real vipx on a manifests directory of the same size, in a scratch namespace.
    let (lab, m) = vipx_on_manifests(n)?;
    let svcs = services(n, &[]);
    let a = vipx_on_api(n)?;

    // The end-to-end part already loaded kube-proxy's rules for this many services (plus the
    // bulk port); loading 10,000 services again would cost minutes for the same figure.
    let (ipt, nft) = match loads.iter().find(|l| l.0 == n) {
        Some(&(_, ipt, nft)) => (ipt, nft),
        None => {
            progress(
                "control plane: iptables-restore and nft -f of kube-proxy's rules for the same services",
            );
            let ipt = kube_rules::load_iptables_with(
                lab.node_ns(),
                &kube_rules::iptables_restore_input(&svcs, CLUSTER_CIDR),
                RestoreMode::Replace,
            )?;
            kube_rules::flush_iptables(lab.node_ns())?;
            let nft =
                kube_rules::load_nft(lab.node_ns(), &kube_rules::nft_input(&svcs, CLUSTER_CIDR))?;
            kube_rules::flush_nft(lab.node_ns())?;
            (ipt, nft)
        }
    };
    Ok(ControlPlane {
        services: n,
        endpoints_per_service: BACKENDS as usize,
        vipx,
        vipx_manifests_first_sync_ms: median(&ms(&m.first_syncs)),
        vipx_manifests_first_sync_runs_ms: ms(&m.first_syncs),
        vipx_rss_mib: m.rss_first_sync_mib,
        vipx_rss_steady_mib: m.rss_steady_mib,
        vipx_rss_peak_mib: m.rss_peak_mib,
        vipx_api_first_sync_ms: median(&ms(&a.first_syncs)),
        vipx_api_first_sync_runs_ms: ms(&a.first_syncs),
        vipx_api_rss_mib: a.rss_first_sync_mib,
        vipx_api_rss_steady_mib: a.rss_steady_mib,
        vipx_api_rss_peak_mib: a.rss_peak_mib,
        iptables_restore_ms: ipt.as_secs_f64() * 1e3,
        nft_ms: nft.as_secs_f64() * 1e3,
        large,
        large_iptables_restore_ms: large_ipt.as_secs_f64() * 1e3,
    })
}

fn ms(v: &[Duration]) -> Vec<f64> {
    v.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

/// `n` services x 10 programmed from empty (`vipx-bench control-plane`, 3 runs), and
/// iptables-restore of kube-proxy's rules for the same services in a scratch namespace (once:
/// minutes at this size). nft -f is left out: over 2 minutes at a tenth of this.
fn control_plane_large(n: usize, results: &Path) -> Result<(Value, Duration)> {
    progress(&format!(
        "control plane: {n} services x {BACKENDS} endpoints through translate -> apply"
    ));
    let json = results.join("control-plane-large.json");
    status(
        Command::new(target_dir().join("release").join("vipx-bench"))
            .args([
                "control-plane",
                "--services",
                &n.to_string(),
                "--reps",
                "3",
                "--json",
            ])
            .arg(&json)
            .stdout(Stdio::null()),
    )?;
    let vipx: Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    progress(&format!(
        "control plane: iptables-restore of kube-proxy's rules for {n} services"
    ));
    vipx_lab::cleanup_stale("bcpl")?;
    let lab = Lab::create(LabConfig {
        tag: "bcpl".into(),
        backends: 0,
        lab_pod_bin: target_dir().join("release").join("lab-pod"),
        realism: Realism::BENCH,
    })?;
    let svcs = services(n, &[]);
    let ipt = kube_rules::load_iptables_within(
        lab.node_ns(),
        &kube_rules::iptables_restore_input(&svcs, CLUSTER_CIDR),
        LARGE_RESTORE_LIMIT,
    )?;
    match ipt {
        Some(t) => progress(&format!("  loaded in {:.1} s", t.as_secs_f64())),
        None => progress(&format!(
            "  not finished in {} s: stopped",
            LARGE_RESTORE_LIMIT.as_secs()
        )),
    }
    kube_rules::flush_iptables(lab.node_ns())?;
    // Not finished: reported as the limit, with a note.
    Ok((
        vipx,
        ipt.unwrap_or(LARGE_RESTORE_LIMIT + Duration::from_millis(1)),
    ))
}

/// How long iptables-restore of the large control-plane row may take (it does not finish in 30
/// minutes at 100,000 Services here).
const LARGE_RESTORE_LIMIT: Duration = Duration::from_secs(900);

/// One per-packet figure of `rows` for `n` services: "ns (ratio to the floor)", or "-".
fn packet_cell(rows: &[Value], n: u64, case: &str) -> String {
    rows.iter()
        .find(|x| x["services"].as_u64() == Some(n) && x["case"] == case)
        .map_or(String::from("-"), |x| {
            format!(
                "{:.0} ({:.1}x)",
                x["ns_per_packet"].as_f64().unwrap_or(0.0),
                x["ratio_to_floor"].as_f64().unwrap_or(0.0)
            )
        })
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Machine: {}. Command: `{}`.\n", r.machine, r.command);
    if !r.measured.is_empty() {
        let _ = writeln!(
            s,
            "| part | commit | command | date | machine |\n|---|---|---|---|---|"
        );
        for (part, p) in &r.measured {
            let _ = writeln!(
                s,
                "| {part} | {} | `{}` | {} | {} |",
                p.commit, p.command, p.date, p.machine
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "### Per-packet cost (BPF_PROG_TEST_RUN, ns/packet, median; x = ratio to the XDP floor)\n"
    );
    let _ = writeln!(
        s,
        "| services x 10 | passthrough (ingress) | passthrough (egress) | egress from a backend's address and port, no flow | new flow (SYN, replayed) | new flow (SYN, distinct tuples; x single-run floor) | established | reply (egress) | TC floor | XDP floor |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let rows = r.packet.as_array().cloned().unwrap_or_default();
    let mut counts: Vec<u64> = rows.iter().filter_map(|x| x["services"].as_u64()).collect();
    counts.dedup();
    for n in counts {
        let get = |case: &str| packet_cell(&rows, n, case);
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            get("passthrough"),
            get("passthrough_egress"),
            get("passthrough_egress_backend"),
            get("new_flow_syn"),
            get("new_flow_distinct"),
            get("established"),
            get("reply_revnat"),
            get("floor_tc"),
            get("floor_xdp")
        );
    }
    let _ = writeln!(
        s,
        "\n### The node program (native XDP on the node's interfaces, and the same at TC ingress \
         where native XDP cannot attach; external client, backend on this node; ns/packet, \
         median; x = ratio to the XDP floor)\n"
    );
    let _ = writeln!(
        s,
        "| services x 10 | passthrough | new flow (SYN, replayed) | established | TC: passthrough | TC: new flow | TC: established | XDP floor |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut counts: Vec<u64> = rows.iter().filter_map(|x| x["services"].as_u64()).collect();
    counts.dedup();
    for n in counts {
        let get = |case: &str| packet_cell(&rows, n, case);
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} | {} | {} | {} | {} |",
            get("node_passthrough"),
            get("node_new_flow_syn"),
            get("node_established"),
            get("node_tc_passthrough"),
            get("node_tc_new_flow_syn"),
            get("node_tc_established"),
            get("floor_xdp")
        );
    }
    // The cache-pressure rows: one service count, one run per packet.
    if let Some(n) = rows
        .iter()
        .find(|x| x["case"] == "established_pressure")
        .and_then(|x| x["services"].as_u64())
    {
        let ns = |case: &str| {
            rows.iter()
                .find(|x| x["services"].as_u64() == Some(n) && x["case"] == case)
                .and_then(|x| x["ns_per_packet"].as_f64())
        };
        let _ = writeln!(
            s,
            "\n### Under cache pressure ({n} services x 10; conntrack holding {} live entries, \
             packets drawn from {} flows spread over all but one of the {n} services, in a \
             shuffled order; one run per packet, so each figure carries the kernel's timer and \
             code gone cold between runs: compare it with the same on one hot flow and with the \
             single-run floor; ns/packet, median)\n",
            r.packet_pressure.0, r.packet_pressure.1
        );
        let _ = writeln!(
            s,
            "| path | many flows | one hot flow | cache misses cost | single-run floor |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        for (label, many, hot, floor) in [
            (
                "pod program, established (TC)",
                "established_pressure",
                "established_single_run_hot",
                "floor_tc_single_run_pressure",
            ),
            (
                "node program, established (XDP)",
                "node_established_pressure",
                "node_established_single_run_hot",
                "floor_xdp_single_run_pressure",
            ),
        ] {
            let (Some(m), Some(h), Some(f)) = (ns(many), ns(hot), ns(floor)) else {
                continue;
            };
            let _ = writeln!(s, "| {label} | {m:.0} | {h:.0} | {:.0} | {f:.0} |", m - h);
        }
        if let (Some(e), Some(f)) = (
            ns("new_flow_syn_evicting"),
            ns("floor_tc_single_run_pressure"),
        ) {
            let d = ns("new_flow_distinct").map_or(String::from("-"), |d| format!("{d:.0}"));
            let _ = writeln!(
                s,
                "| pod program, new flow (SYN of an unseen tuple) into the full table, each \
                 insert evicting (flood guard off; engaged, as it is from half full, it adds \
                 ~90-150 ns) | {e:.0} | - | - | {f:.0} |\n\n\
                 The same SYNs into a near-empty table: {d} ns (\"new flow, distinct tuples\" \
                 above).",
            );
        }
    }
    let _ = writeln!(
        s,
        "\n### Maglev: share of new-flow choices moved (table size M; ideal 1/N on removal of 1 \
         of N, 1/(N+1) on addition)\n"
    );
    let _ = writeln!(
        s,
        "| backends | M | tables | removal moved | of staying backends | ideal | addition moved | ideal |"
    );
    let _ = writeln!(s, "|---:|---:|---|---:|---:|---:|---:|---:|");
    for x in r.maglev.as_array().cloned().unwrap_or_default() {
        let f = |k: &str| x[k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
            x["backends"],
            x["table_size"],
            x["tables"].as_str().unwrap_or("?"),
            f("removal_moved"),
            f("removal_moved_of_staying_backends"),
            f("removal_ideal"),
            f("addition_moved"),
            f("addition_ideal")
        );
    }
    let _ = writeln!(
        s,
        "\n### End to end in the lab (median, then min-max of the runs; x = ratio to direct-to-pod \
         in the same run)\n\n\
         Direct spreads over the same 10 pods as the proxies (wrk, one thread per pod); every \
         contender gets the same {} threads and {CONNECTIONS} connections.\n",
        BACKENDS
    );
    let _ = writeln!(
        s,
        "| services | contender | short connections/s | keep-alive requests/s | bulk Gbit/s | errors |"
    );
    let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|");
    let mut seen = Vec::new();
    for row in &r.e2e {
        if seen.contains(&(row.services, row.contender)) {
            continue;
        }
        seen.push((row.services, row.contender));
        let cell = |metric: &str| {
            r.e2e
                .iter()
                .find(|x| {
                    x.services == row.services && x.contender == row.contender && x.metric == metric
                })
                .map_or(String::from("-"), |x| {
                    format!(
                        "{:.0} ({:.2}x) {}",
                        x.median,
                        x.ratio_to_direct,
                        spread(&x.samples, 0)
                    )
                })
        };
        let bulk = r
            .e2e
            .iter()
            .find(|x| {
                x.services == row.services && x.contender == row.contender && x.metric == "bulk"
            })
            .map_or(String::from("-"), |x| {
                format!(
                    "{:.2} ({:.2}x) {}",
                    x.median,
                    x.ratio_to_direct,
                    spread(&x.samples, 2)
                )
            });
        let errors: u64 = r
            .e2e
            .iter()
            .filter(|x| x.services == row.services && x.contender == row.contender)
            .map(|x| x.errors)
            .sum();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {errors} |",
            row.services,
            row.contender.label(),
            cell("short_connections"),
            cell("keepalive_requests"),
            bulk
        );
    }
    if !r.node_ports.is_empty() {
        let _ = write!(s, "\n{}", node_port_bench::markdown(&r.node_ports));
    }
    let cp = &r.control_plane;
    let _ = writeln!(
        s,
        "\n### Control plane ({} services x {} endpoints)\n",
        cp.services, cp.endpoints_per_service
    );
    let _ = writeln!(s, "| what | time |");
    let _ = writeln!(s, "|---|---:|");
    let f = |k: &str| cp.vipx[k].as_f64().unwrap_or(0.0);
    let _ = writeln!(
        s,
        "| vipx: desired state -> maps written, from empty (translate + apply, median) | {:.0} ms |",
        f("full_sync_ms")
    );
    let _ = writeln!(
        s,
        "| vipx: one endpoint change (translate + apply, median) | {:.2} ms |",
        f("endpoint_change_ms")
    );
    let _ = writeln!(
        s,
        "| vipx: process start -> first sync on a manifests directory (YAML parse included; median, \
         min-max of {}) | {:.0} ms ({}) |",
        cp.vipx_manifests_first_sync_runs_ms.len(),
        cp.vipx_manifests_first_sync_ms,
        spread(&cp.vipx_manifests_first_sync_runs_ms, 0)
    );
    let _ = writeln!(
        s,
        "| vipx: process start -> first sync on the Kubernetes API (in-process server, list \
         included; median, min-max of {}) | {:.0} ms ({}) |",
        cp.vipx_api_first_sync_runs_ms.len(),
        cp.vipx_api_first_sync_ms,
        spread(&cp.vipx_api_first_sync_runs_ms, 0)
    );
    // Processes against processes: the tools' whole runs (parse included) against vipx's start
    // to first sync on manifests, not against its in-process apply.
    let start = cp.vipx_manifests_first_sync_ms.max(1e-9);
    let _ = writeln!(
        s,
        "| kube-proxy iptables: iptables-restore of the same services (whole process) | {:.0} ms \
         ({:.0}x vipx's start to first sync) |",
        cp.iptables_restore_ms,
        cp.iptables_restore_ms / start
    );
    let _ = writeln!(
        s,
        "| kube-proxy nftables: nft -f of the same services (whole process) | {:.0} ms ({:.0}x \
         vipx's start to first sync) |",
        cp.nft_ms,
        cp.nft_ms / start
    );
    if !cp.large.is_null() {
        let g = |k: &str| cp.large[k].as_f64().unwrap_or(0.0);
        let n = cp.large["services"].as_u64().unwrap_or(0);
        let _ = writeln!(
            s,
            "| vipx at {n} services x 10: desired state -> maps written, from empty (translate {:.0} \
             + apply {:.0} ms, {} map writes; median of 3) | {:.0} ms |",
            g("full_translate_ms"),
            g("full_apply_ms"),
            cp.large["map_writes"],
            g("full_sync_ms")
        );
        let ipt = cp.large_iptables_restore_ms;
        if ipt > LARGE_RESTORE_LIMIT.as_secs_f64() * 1e3 {
            let _ = writeln!(
                s,
                "| kube-proxy iptables at {n} services: iptables-restore of the same services (whole \
                 process, parse included) | did not finish in {:.0} s (over {:.0}x vipx's \
                 in-process translate + apply, which reads no files) |",
                ipt / 1e3,
                ipt / g("full_sync_ms").max(1e-9)
            );
        } else {
            let _ = writeln!(
                s,
                "| kube-proxy iptables at {n} services: iptables-restore of the same services (whole \
                 process, parse included) | {ipt:.0} ms ({:.1}x vipx's in-process translate + \
                 apply, which reads no files) |",
                ipt / g("full_sync_ms").max(1e-9)
            );
        }
        let _ = writeln!(
            s,
            "| vipx-bench resident memory at {n} services (objects, desired state, writer) | {:.0} MiB |",
            g("rss_mib")
        );
    }
    let _ = writeln!(
        s,
        "| vipx resident memory after the first sync, manifests source | {:.0} MiB |",
        cp.vipx_rss_mib
    );
    let _ = writeln!(
        s,
        "| vipx resident memory steady, manifests source ({STEADY_RESYNCS} resyncs later; peak {:.0} MiB) | {:.0} MiB |",
        cp.vipx_rss_peak_mib, cp.vipx_rss_steady_mib
    );
    let _ = writeln!(
        s,
        "| vipx resident memory after the first sync, Kubernetes API source | {:.0} MiB |",
        cp.vipx_api_rss_mib
    );
    let _ = writeln!(
        s,
        "| vipx resident memory steady, Kubernetes API source ({STEADY_RESYNCS} resyncs later; peak {:.0} MiB) | {:.0} MiB |",
        cp.vipx_api_rss_peak_mib, cp.vipx_api_rss_steady_mib
    );
    s
}

fn build_release() -> Result<()> {
    step("building vipx, vipx-bench and lab-pod (release)");
    status(cargo().args([
        "build",
        "--release",
        "-p",
        "proxy-userspace",
        "-p",
        "vipx-tests",
        "--bins",
    ]))
}

fn results_dir(quick: bool) -> Result<PathBuf> {
    let results = root()
        .join("results")
        .join(if quick { "quick" } else { "latest" });
    std::fs::create_dir_all(&results)?;
    Ok(results)
}

/// The node-port rows as `node-ports.json` and `node-ports.md` in `results`; returns the markdown.
fn write_node_ports(results: &Path, rows: &[node_port_bench::Row], header: &str) -> Result<String> {
    let md = format!("{header}\n{}", node_port_bench::markdown(rows));
    std::fs::write(
        results.join("node-ports.json"),
        serde_json::to_vec_pretty(rows)?,
    )?;
    std::fs::write(results.join("node-ports.md"), &md)?;
    Ok(md)
}

/// Only the end-to-end run through a node port (`cargo xtask bench --node-ports`).
/// `services` and `reps` replace the plan's (empty / `None`: the plan's own).
pub fn node_ports(quick: bool, services: Vec<usize>, reps: Option<usize>) -> Result<()> {
    let base = if quick { QUICK } else { FULL };
    let command = format!(
        "cargo xtask bench --node-ports{}{}{}",
        if quick { " --quick" } else { "" },
        if services.is_empty() {
            String::new()
        } else {
            format!(
                " --services {}",
                services
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )
        },
        reps.map_or_else(String::new, |r| format!(" --reps {r}"))
    );
    let plan = Plan {
        e2e_services: if services.is_empty() {
            base.e2e_services
        } else {
            // One plan per process: leaking it is the simplest 'static.
            Box::leak(services.into_boxed_slice())
        },
        reps: reps.unwrap_or(base.reps),
        ..base
    };
    build_release()?;
    let results = results_dir(quick)?;
    let header = format!("Machine: {}. Command: `{command}`.\n", machine());
    // Written after every service count, so a run cut short keeps what it measured.
    let rows = node_port_bench::run(&plan, |rows| {
        write_node_ports(&results, rows, &header).map(|_| ())
    })?;
    println!("{}", write_node_ports(&results, &rows, &header)?);
    step(&format!("results in {}", results.display()));
    Ok(())
}

/// The commit the work tree is at, "+dirty" when it has uncommitted changes.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // Results are not the code they describe: their own changes do not make a run dirty.
    let dirty =
        git(&["status", "--porcelain", "--", ".", ":!results"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}+dirty") } else { head }
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// `parts`: what to measure (empty: everything). A run of some parts keeps the others' figures,
/// and where they were measured, from the report already in the results directory.
pub fn bench(quick: bool, parts: &[Part]) -> Result<()> {
    let plan = if quick { &QUICK } else { &FULL };
    let all = parts.is_empty() || Part::ALL.iter().all(|p| parts.contains(p));
    let run = |p: Part| all || parts.contains(&p);
    let results = results_dir(quick)?;
    let mut command = format!("cargo xtask bench{}", if quick { " --quick" } else { "" });
    if !all {
        let mut names: Vec<Part> = parts.to_vec();
        names.sort();
        names.dedup();
        let _ = write!(
            command,
            " --parts {}",
            names
                .iter()
                .map(|p| p.key().replace('_', "-"))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    let mut report = if all {
        Report {
            machine: machine(),
            command: command.clone(),
            measured: Default::default(),
            packet: Value::Null,
            packet_pressure: (0, 0),
            maglev: Value::Null,
            e2e: Vec::new(),
            node_ports: Vec::new(),
            control_plane: ControlPlane::default(),
        }
    } else {
        let path = results.join("bench.json");
        let old = std::fs::read(&path).with_context(|| {
            format!(
                "a run of some parts keeps the others from {}, which cannot be read: run all parts",
                path.display()
            )
        })?;
        let mut r: Report = serde_json::from_slice(&old)
            .with_context(|| format!("{} is not a bench report: run all parts", path.display()))?;
        // Reports from before provenance was kept: their parts came from their own command.
        for p in Part::ALL {
            r.measured
                .entry(p.key().into())
                .or_insert_with(|| Provenance {
                    machine: r.machine.clone(),
                    commit: "unknown".into(),
                    command: r.command.clone(),
                    date: "unknown".into(),
                });
        }
        // Reports from before the node-port part was in them: its own run's rows.
        let np = results.join("node-ports.json");
        if r.node_ports.is_empty() && np.exists() {
            r.node_ports = serde_json::from_slice(&std::fs::read(&np)?)
                .with_context(|| format!("reading {}", np.display()))?;
            let md = std::fs::read_to_string(results.join("node-ports.md")).unwrap_or_default();
            if let Some(cmd) = md.split('`').nth(1) {
                r.measured.insert(
                    Part::NodePorts.key().into(),
                    Provenance {
                        machine: r.machine.clone(),
                        commit: "unknown".into(),
                        command: cmd.to_owned(),
                        date: "unknown".into(),
                    },
                );
            }
        }
        r.machine = machine();
        r.command = command.clone();
        r
    };
    build_release()?;
    let here = Provenance {
        machine: machine(),
        commit: commit(),
        command: command.clone(),
        date: utc_now(),
    };

    if run(Part::Packet) {
        progress(&format!(
            "per-packet cost: {} services x 10 backends",
            plan.packet_services
        ));
        let packet_json = results.join("packet.json");
        status(
            Command::new(target_dir().join("release").join("vipx-bench"))
                .args([
                    "packet",
                    "--services",
                    plan.packet_services,
                    "--repeat",
                    "1000000",
                    "--reps",
                    "5",
                    "--pressure-conntrack",
                    plan.pressure_conntrack,
                    "--pressure-flows",
                    plan.pressure_flows,
                    "--json",
                ])
                .arg(&packet_json)
                .stdout(Stdio::null()),
        )?;
        report.packet = serde_json::from_slice(&std::fs::read(&packet_json)?)?;
        report.packet_pressure = (
            plan.pressure_conntrack.parse()?,
            plan.pressure_flows.parse()?,
        );
        progress("Maglev: share of new-flow choices moved by a backend removal or addition");
        let maglev_json = results.join("maglev.json");
        status(
            Command::new(target_dir().join("release").join("vipx-bench"))
                .args(["maglev", "--json"])
                .arg(&maglev_json)
                .stdout(Stdio::null()),
        )?;
        report.maglev = serde_json::from_slice(&std::fs::read(&maglev_json)?)?;
        report
            .measured
            .insert(Part::Packet.key().into(), here.clone());
        save(&report, &results)?;
    }
    let mut loads = RuleLoads::new();
    if run(Part::E2e) {
        report.e2e = e2e(plan, &mut loads)?;
        report.measured.insert(Part::E2e.key().into(), here.clone());
        save(&report, &results)?;
    }
    if run(Part::NodePorts) {
        report.node_ports = node_port_bench::run(plan, |_| Ok(()))?;
        write_node_ports(
            &results,
            &report.node_ports,
            &format!("Machine: {}. Command: `{}`.\n", report.machine, command),
        )?;
        report
            .measured
            .insert(Part::NodePorts.key().into(), here.clone());
        save(&report, &results)?;
    }
    if run(Part::ControlPlane) {
        report.control_plane = control_plane(plan, &results, &loads)?;
        report
            .measured
            .insert(Part::ControlPlane.key().into(), here.clone());
    }
    let md = save(&report, &results)?;
    println!("{md}");
    step(&format!("results in {}", results.display()));
    Ok(())
}

/// Writes the report (JSON, table, chart) as it stands; returns the table. Called after each
/// part, so that a part that fails later (an hour into a run) loses only its own figures.
fn save(report: &Report, results: &Path) -> Result<String> {
    std::fs::write(
        results.join("bench.json"),
        serde_json::to_vec_pretty(report)?,
    )?;
    let md = markdown(report);
    std::fs::write(results.join("bench.md"), &md)?;
    crate::chart::draw(&report_json(report)?, &results.join("bench.png"))?;
    Ok(md)
}

fn report_json(r: &Report) -> Result<Value> {
    Ok(serde_json::to_value(r)?)
}
