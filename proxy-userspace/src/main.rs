use std::{fs, path::PathBuf, process::ExitCode, time::Duration};

/// mimalloc rather than glibc's malloc: a sync of 100,000 Services allocates and frees millions
/// of small objects (translation, the desired state, the writer's maps), and glibc's free lists
/// (`malloc_consolidate`, `unlink_chunk`) took a fifth of its time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use vipx::{
    config::{self, FileConfig},
    desired::LbAlgorithm,
    loader::{self, MapSizes},
    run::{self, RunOptions, StateFile},
    serve,
    socklb::SocketLb,
    source::SourceConfig,
};

/// vipx: an eBPF replacement for kube-proxy.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Program Services from the API server (or a manifests directory) and keep them in sync.
    // Later flags win, so `cargo xtask run -- --manifests DIR` can replace the demo's own.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
    /// List what is programmed, read from the pinned maps.
    Services(WhereArgs),
    /// Uninstall vipx from this node: unpin its links (detaching the programs), its maps and
    /// its state. Stop `vipx run` first: a stopped vipx leaves its programs attached on purpose.
    Cleanup(WhereArgs),
}

#[derive(Args)]
struct WhereArgs {
    /// This node's name, as its Node object is named (decides which endpoints are local, and
    /// selects the default pin and state directories). `--hostname-override` is kube-proxy's
    /// name for it; unlike kube-proxy, vipx does not fall back to the host name.
    #[arg(long, alias = "hostname-override", env = "NODE_NAME", value_parser = node_name_arg)]
    node_name: Option<String>,
    /// bpffs directory holding the maps [default: /sys/fs/bpf/vipx/<node-name>].
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Directory for vipx's state file [default: /run/vipx/<node-name>].
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// A duration as kube-proxy's flags write it (`30s`, `1m`, `500ms`, `1m30s`), or bare seconds.
fn duration_arg(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (like 30s, 1m, 500ms)");
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(value * scale).map_err(|_| bad())?;
    }
    Ok(total)
}

fn node_name_arg(name: &str) -> Result<String, String> {
    run::check_node_name(name).map(|()| name.to_owned())
}

const NO_NODE_NAME: &str = "this node's name is required: --node-name (or --hostname-override, \
                            or NODE_NAME in the environment)";

impl WhereArgs {
    fn node_name(&self) -> Result<&str> {
        self.node_name.as_deref().context(NO_NODE_NAME)
    }
    fn pin_dir(&self, node_name: &str) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| loader::default_pin_dir(node_name))
    }
    fn state_dir(&self, node_name: &str) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| run::default_state_dir(node_name))
    }
}

fn bind_arg(s: &str) -> Result<String, String> {
    serve::parse_bind_address(s, 0).map(|_| s.to_owned())
}

fn cidrs_arg(s: &str) -> Result<String, String> {
    config::parse_cidrs(s).map(|_| s.to_owned())
}

#[derive(Args)]
struct RunArgs {
    /// Directory of Service / EndpointSlice / Node manifests (YAML or JSON, as kubectl prints).
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Watch the API server of this kubeconfig file [default: $KUBECONFIG; without either and
    /// without --manifests: the in-cluster service account].
    // Not `env = "KUBECONFIG"`: a KUBECONFIG in the environment must not conflict with an
    // explicit --manifests.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    place: WhereArgs,
    /// Interfaces to attach the pod program to (host side of pod veths), comma-separated globs.
    #[arg(long, value_delimiter = ',', default_value = "lxc*,veth*")]
    pod_interfaces: Vec<String>,
    /// Service map entries (one per frontend plus one per backend slot).
    #[arg(long, default_value_t = MapSizes::default().services)]
    max_service_entries: u32,
    #[arg(long, default_value_t = MapSizes::default().backends)]
    max_backends: u32,
    #[arg(long, default_value_t = MapSizes::default().revnat)]
    max_frontends: u32,
    /// Conntrack entries (two per flow) [default: the pinned table's size; without one, scaled
    /// to memory, 0.25% of it at 128 bytes an entry, a power of two: 524288 at 16 GiB].
    #[arg(long)]
    max_conntrack: Option<u32>,
    /// The flood guard: new flows one source address may start per second, not counting the
    /// TCP flows it closes meanwhile (counting them too once the table is seven eighths full);
    /// beyond it they are dropped (a TCP client retransmits its SYN), so one source cannot push
    /// every other client's connections out of a full conntrack table. Engaged only while the
    /// table is half full. 0 disables it [default: the rate at which never-answered flows
    /// would fill a quarter of the table before they expire, 728 for 524288 entries; at least
    /// 64].
    #[arg(long)]
    conntrack_max_new_per_source: Option<u32>,
    /// Idle timeout of an established TCP flow (kube-proxy's flag; 0: the default) [default: 24h].
    #[arg(long, value_parser = duration_arg)]
    conntrack_tcp_timeout_established: Option<Duration>,
    /// Idle timeout of a TCP flow closed in one direction (kube-proxy's flag; 0: the default)
    /// [default: 1h].
    #[arg(long, value_parser = duration_arg)]
    conntrack_tcp_timeout_close_wait: Option<Duration>,
    /// Idle timeout of a TCP flow closed both ways or reset [default: 10s].
    #[arg(long, value_parser = duration_arg)]
    conntrack_tcp_timeout_closed: Option<Duration>,
    /// Idle timeout of a TCP flow the backend never answered [default: 60s].
    #[arg(long, value_parser = duration_arg)]
    conntrack_tcp_timeout_syn: Option<Duration>,
    /// Idle timeout of an unanswered UDP flow (kube-proxy's flag; 0: the default) [default: 30s].
    #[arg(long, value_parser = duration_arg)]
    conntrack_udp_timeout: Option<Duration>,
    /// Idle timeout of an answered UDP flow (kube-proxy's flag; 0: the default) [default: 120s].
    #[arg(long, value_parser = duration_arg)]
    conntrack_udp_timeout_stream: Option<Duration>,
    /// How often conntrack is swept for flows past their timeout [default: 30s].
    #[arg(long, value_parser = duration_arg)]
    conntrack_gc_interval: Option<Duration>,
    /// The source address of a pod's flow to its own Service when it lands on the pod itself
    /// (a pod drops packets from its own address). Never leaves the pod's veth; must not be a
    /// Service address. `none` disables hairpin SNAT (Cilium uses the same default).
    #[arg(long, default_value = "169.254.42.1", value_parser = hairpin_arg)]
    hairpin_snat_address: HairpinAddr,
    /// Full reconcile period, on top of change events (`30s`, `1m`, `500ms`; a bare number is
    /// seconds) [default: 30s]. `/healthz` fails when a change stays unapplied for twice this
    /// (kube-proxy's syncPeriod).
    #[arg(long, alias = "resync-seconds", value_parser = duration_arg)]
    sync_period: Option<Duration>,
    /// Syncs are at least this far apart; a change after a quiet spell is applied at once
    /// [default: 1s].
    #[arg(long, value_parser = duration_arg)]
    min_sync_period: Option<Duration>,
    /// Address and port of `/healthz` and `/livez` (kube-proxy's); empty disables them
    /// [default: 0.0.0.0:10256].
    #[arg(long, value_parser = bind_arg)]
    healthz_bind_address: Option<String>,
    /// Address and port of Prometheus `/metrics` (kube-proxy's); empty disables it
    /// [default: 127.0.0.1:10249].
    #[arg(long, value_parser = bind_arg)]
    metrics_bind_address: Option<String>,
    /// The pods' CIDR range(s), comma-separated, one per IP family (kube-proxy's; accepted and
    /// validated, not used yet).
    #[arg(long, value_parser = cidrs_arg)]
    cluster_cidr: Option<String>,
    /// A kube-proxy KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1): its
    /// hostnameOverride, healthzBindAddress, metricsBindAddress, clusterCIDR and the
    /// syncPeriod/minSyncPeriod of its mode are used. As in kube-proxy, the file replaces the
    /// flags of those settings; only --hostname-override/--node-name still wins over the file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How long a TCP endpoint removed from every Service keeps serving the connections it has
    /// (new ones avoid it at once), and a removed Service port keeps translating its
    /// established flows (a Service re-created meanwhile keeps them), in seconds; 0 ends them
    /// at once.
    #[arg(long, default_value_t = vipx::maps::DEFAULT_ENDPOINT_GRACE.as_secs())]
    endpoint_grace_seconds: u64,
    /// How new flows pick a backend when the Service has no `vipx.io/lb-algorithm` annotation:
    /// `maglev` (consistent hashing: a backend change moves only the flows it must) or `hash`
    /// (flow hash over the backend slots).
    #[arg(long, default_value = "maglev", value_parser = lb_algorithm_arg)]
    lb_algorithm: LbAlgorithm,
    /// Maglev table size M, a prime (at most 65521); about 100 x the largest backend count
    /// keeps each backend's share within 1%.
    #[arg(long, default_value_t = MapSizes::default().maglev_table_size, value_parser = maglev_size_arg)]
    maglev_table_size: u32,
    /// Maglev tables (one per Maglev frontend, two while it changes). The map is allocated in
    /// full: size x tables x 8 bytes (32 MiB by default; the kernel aligns array elements to 8
    /// bytes). Frontends beyond it hash over their slots (logged, and counted in
    /// vipx_datapath_events_total{reason="maglev_fallback"}). 0 turns Maglev off.
    #[arg(long, default_value_t = MapSizes::default().maglev_tables)]
    max_maglev_tables: u32,
    /// Socket-level load balancing: `host` translates Service addresses for the sockets of the
    /// node's own network namespace (`curl <ClusterIP>` from the node, kubelet probes,
    /// hostNetwork pods) when they connect or send, so they reach Services and see the VIP as
    /// their peer; `all` does the same inside the pods this vipx serves (found from
    /// --pod-interfaces), so their connections to Services need no per-packet translation;
    /// `off` leaves sockets alone. Needs cgroup v2.
    #[arg(long, default_value = "host", value_parser = socket_lb_arg)]
    socket_lb: SocketLb,
    /// The cgroup v2 directory the socket programs attach to; they act only for this node's
    /// network namespace whatever the cgroup holds [default: the root of the cgroup v2
    /// hierarchy, from /proc/self/mountinfo]. In a container, mount the host's hierarchy and
    /// name it here.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Which of the node's addresses answer on node ports, as comma-separated CIDRs
    /// (kube-proxy's flag) [default: every address on the node's interfaces].
    #[arg(long, value_delimiter = ',', value_parser = cidr_arg)]
    nodeport_addresses: Vec<config::Cidr>,
    /// The node's external interfaces, comma-separated globs: XDP there serves node ports,
    /// LoadBalancer and external IPs to clients outside the cluster [default: the interfaces
    /// holding the node port addresses, but loopback and pod interfaces].
    #[arg(long, value_delimiter = ',')]
    node_interfaces: Vec<String>,
    /// How the node program meets the node's interfaces: `native` XDP (in the driver; where the
    /// driver refuses it, TC ingress), `tc` (TC ingress only) or `generic` XDP (in the stack, on
    /// every driver; only right for packets whose checksums are finished, see the README).
    #[arg(long, default_value = "native", value_parser = ["native", "generic", "tc"])]
    node_xdp_mode: String,
}

fn cidr_arg(s: &str) -> Result<config::Cidr, String> {
    s.parse()
}

fn socket_lb_arg(s: &str) -> Result<SocketLb, String> {
    SocketLb::parse(s).ok_or_else(|| format!("unknown socket-lb mode {s:?} (host, all or off)"))
}

fn lb_algorithm_arg(s: &str) -> Result<LbAlgorithm, String> {
    LbAlgorithm::parse(s).ok_or_else(|| format!("unknown algorithm {s:?} (maglev or hash)"))
}

fn maglev_size_arg(s: &str) -> Result<u32, String> {
    let m: u32 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    vipx::maglev::check_table_size(m).map(|()| m)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vipx: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => {
            let pod_interfaces = a
                .pod_interfaces
                .iter()
                .map(|g| glob::Pattern::new(g).with_context(|| format!("bad interface glob {g:?}")))
                .collect::<Result<_>>()?;
            let node_interfaces = a
                .node_interfaces
                .iter()
                .map(|g| glob::Pattern::new(g).with_context(|| format!("bad interface glob {g:?}")))
                .collect::<Result<_>>()?;
            let settings = Settings::resolve(&a)?;
            let conntrack = conntrack_settings(&a, settings.file_conntrack.as_ref())?;
            let source = match (a.manifests, a.kubeconfig) {
                (Some(dir), _) => {
                    if !dir.is_dir() {
                        anyhow::bail!("--manifests {} is not a directory", dir.display());
                    }
                    SourceConfig::Manifests(dir)
                }
                (None, kubeconfig) => SourceConfig::Kube {
                    kubeconfig: kubeconfig.or_else(|| {
                        std::env::var_os("KUBECONFIG")
                            .filter(|v| !v.is_empty())
                            .map(PathBuf::from)
                    }),
                },
            };
            let node_name = settings.node_name.clone();
            let pin_dir = a.place.pin_dir(&node_name);
            let opts = RunOptions {
                source,
                node_name: node_name.clone(),
                pod_interfaces,
                pin_dir: pin_dir.clone(),
                state_dir: a.place.state_dir(&node_name),
                sizes: MapSizes {
                    services: a.max_service_entries,
                    backends: a.max_backends,
                    revnat: a.max_frontends,
                    conntrack: a
                        .max_conntrack
                        .unwrap_or_else(|| vipx::loader::default_conntrack_entries(&pin_dir)),
                    maglev_table_size: a.maglev_table_size,
                    maglev_tables: a.max_maglev_tables,
                },
                lb_algorithm: a.lb_algorithm,
                resync: settings.sync_period.max(Duration::from_secs(1)),
                min_sync: settings.min_sync_period,
                endpoint_grace: Duration::from_secs(a.endpoint_grace_seconds),
                conntrack,
                hairpin: a.hairpin_snat_address.0,
                healthz_bind: settings.healthz_bind,
                metrics_bind: settings.metrics_bind,
                cluster_cidrs: settings.cluster_cidrs,
                socket_lb: a.socket_lb,
                cgroup_root: a.cgroup_root,
                nodeport_addresses: settings.nodeport_addresses.clone(),
                node_interfaces,
                node_mode: vipx::nodeif::NodeMode::parse(&a.node_xdp_mode)
                    .expect("clap checked the value"),
            };
            // Two workers: a sync blocks its thread (1 s at 10k Services), and /healthz, /livez
            // and /metrics must answer meanwhile (probes and cloud load balancers time out).
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run::run(opts))
        }
        Cmd::Services(w) => services(&w),
        Cmd::Cleanup(w) => {
            let node = w.node_name()?;
            loader::cleanup(&w.pin_dir(node), &w.state_dir(node))
        }
    }
}

/// `--hairpin-snat-address`: an IPv4 address or `none`.
#[derive(Clone, Copy, Debug)]
struct HairpinAddr(Option<std::net::Ipv4Addr>);

fn hairpin_arg(s: &str) -> Result<HairpinAddr, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(HairpinAddr(None));
    }
    let a: std::net::Ipv4Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is neither an IPv4 address nor `none`"))?;
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
        return Err(format!("{a} cannot be a hairpin source address"));
    }
    Ok(HairpinAddr(Some(a)))
}

/// Conntrack timeouts and collection period from the flags; 0 or absent: the default.
/// With `--config`, the file's `conntrack` timeouts replace kube-proxy's four flags (as in
/// kube-proxy); vipx's own (closed, syn, interval) still come from the flags.
fn conntrack_settings(
    a: &RunArgs,
    file: Option<&config::FileConntrack>,
) -> Result<run::ConntrackSettings> {
    let d = vipx::conntrack::Timeouts::default();
    let pick =
        |v: Option<Duration>, default: Duration| v.filter(|v| !v.is_zero()).unwrap_or(default);
    let kube = |flag: Option<Duration>, from_file: Option<Duration>, default: Duration| match file {
        Some(_) => from_file.unwrap_or(default),
        None => pick(flag, default),
    };
    let timeouts = vipx::conntrack::Timeouts {
        tcp_established: kube(
            a.conntrack_tcp_timeout_established,
            file.and_then(|f| f.tcp_established),
            d.tcp_established,
        ),
        tcp_close_wait: kube(
            a.conntrack_tcp_timeout_close_wait,
            file.and_then(|f| f.tcp_close_wait),
            d.tcp_close_wait,
        ),
        tcp_closed: pick(a.conntrack_tcp_timeout_closed, d.tcp_closed),
        tcp_syn: pick(a.conntrack_tcp_timeout_syn, d.tcp_syn),
        udp: kube(a.conntrack_udp_timeout, file.and_then(|f| f.udp), d.udp),
        udp_stream: kube(
            a.conntrack_udp_timeout_stream,
            file.and_then(|f| f.udp_stream),
            d.udp_stream,
        ),
    };
    let gc_interval = pick(a.conntrack_gc_interval, run::DEFAULT_CONNTRACK_GC_INTERVAL);
    // Seen units are ~1.07 s and idle times are compared in them; a year bounds every deadline.
    const MAX: Duration = Duration::from_secs(366 * 24 * 3600);
    for t in [
        timeouts.tcp_established,
        timeouts.tcp_close_wait,
        timeouts.tcp_closed,
        timeouts.tcp_syn,
        timeouts.udp,
        timeouts.udp_stream,
        gc_interval,
    ] {
        if t > MAX {
            anyhow::bail!("conntrack timeouts and intervals above a year are not supported");
        }
    }
    Ok(run::ConntrackSettings {
        timeouts,
        gc_interval,
        max_new_per_source: a.conntrack_max_new_per_source,
    })
}

/// The kube-proxy settings of `vipx run`, from the flags or, with `--config`, from the file.
#[derive(Debug, PartialEq, Eq)]
struct Settings {
    node_name: String,
    healthz_bind: Option<std::net::SocketAddr>,
    metrics_bind: Option<std::net::SocketAddr>,
    cluster_cidrs: Vec<config::Cidr>,
    nodeport_addresses: Vec<config::Cidr>,
    sync_period: Duration,
    min_sync_period: Duration,
    /// With `--config`: its conntrack timeouts, which replace the flags as in kube-proxy.
    file_conntrack: Option<config::FileConntrack>,
}

impl Settings {
    fn resolve(a: &RunArgs) -> Result<Self> {
        let s = Self::resolve_unchecked(a)?;
        // kube-proxy's validation; the cap keeps deadlines far from `Instant` overflow.
        const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);
        if s.sync_period > MAX_PERIOD || s.min_sync_period > MAX_PERIOD {
            anyhow::bail!("sync periods above a year are not supported");
        }
        if s.sync_period < s.min_sync_period {
            anyhow::bail!(
                "the sync period ({:?}) must not be shorter than the minimum sync period ({:?})",
                s.sync_period,
                s.min_sync_period
            );
        }
        Ok(s)
    }

    fn resolve_unchecked(a: &RunArgs) -> Result<Self> {
        let Some(path) = &a.config else {
            let bind = |v: &Option<String>, default: &str, port: u16| {
                serve::parse_bind_address(v.as_deref().unwrap_or(default), port)
                    .map_err(anyhow::Error::msg)
            };
            return Ok(Self {
                node_name: a.place.node_name()?.to_owned(),
                healthz_bind: bind(
                    &a.healthz_bind_address,
                    serve::DEFAULT_HEALTHZ_BIND,
                    serve::HEALTHZ_PORT,
                )?,
                metrics_bind: bind(
                    &a.metrics_bind_address,
                    serve::DEFAULT_METRICS_BIND,
                    serve::METRICS_PORT,
                )?,
                cluster_cidrs: config::parse_cidrs(a.cluster_cidr.as_deref().unwrap_or(""))
                    .map_err(anyhow::Error::msg)?,
                nodeport_addresses: a.nodeport_addresses.clone(),
                sync_period: a.sync_period.unwrap_or(config::DEFAULT_SYNC_PERIOD),
                min_sync_period: a.min_sync_period.unwrap_or(config::DEFAULT_MIN_SYNC_PERIOD),
                file_conntrack: None,
            });
        };
        let file = FileConfig::load(path)?;
        // kube-proxy: "This parameter is ignored if a config file is specified by --config."
        for (flag, given) in [
            ("--healthz-bind-address", a.healthz_bind_address.is_some()),
            ("--metrics-bind-address", a.metrics_bind_address.is_some()),
            ("--cluster-cidr", a.cluster_cidr.is_some()),
            ("--nodeport-addresses", !a.nodeport_addresses.is_empty()),
            ("--sync-period", a.sync_period.is_some()),
            ("--min-sync-period", a.min_sync_period.is_some()),
            (
                "--conntrack-tcp-timeout-established",
                a.conntrack_tcp_timeout_established.is_some(),
            ),
            (
                "--conntrack-tcp-timeout-close-wait",
                a.conntrack_tcp_timeout_close_wait.is_some(),
            ),
            ("--conntrack-udp-timeout", a.conntrack_udp_timeout.is_some()),
            (
                "--conntrack-udp-timeout-stream",
                a.conntrack_udp_timeout_stream.is_some(),
            ),
        ] {
            if given {
                tracing::warn!(
                    config = %path.display(),
                    "{flag} is ignored: --config is given and its file decides (as in kube-proxy)"
                );
            }
        }
        let node_name = match (&a.place.node_name, &file.hostname_override) {
            (Some(flag), _) => flag.clone(),
            (None, Some(name)) => {
                run::check_node_name(name)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("hostnameOverride in {}", path.display()))?;
                name.clone()
            }
            (None, None) => anyhow::bail!("{NO_NODE_NAME} (or hostnameOverride in --config)"),
        };
        Ok(Self {
            node_name,
            healthz_bind: file.healthz_bind_address,
            metrics_bind: file.metrics_bind_address,
            cluster_cidrs: file.cluster_cidrs,
            nodeport_addresses: file.node_port_addresses,
            sync_period: file.sync_period,
            min_sync_period: file.min_sync_period,
            file_conntrack: Some(file.conntrack),
        })
    }
}

fn services(w: &WhereArgs) -> Result<()> {
    let node = w.node_name()?;
    let maps = loader::open_pinned(&w.pin_dir(node))?;
    let p = maps.read()?;
    let names: StateFile = fs::read(w.state_dir(node).join(run::STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    println!("{:<40} {:<24} BACKENDS", "SERVICE", "FRONTEND");
    for (fe, entry) in &p.frontends {
        let name = names
            .frontends
            .get(&fe.to_string())
            .map_or("?", String::as_str);
        let backends: Vec<String> = entry
            .slots
            .iter()
            .map(|id| match p.backends.get(id) {
                Some((a, _)) => format!("{}:{}", a.addr, a.port),
                None => format!("<missing backend {id}>"),
            })
            .collect();
        let backends = if backends.is_empty() {
            "<none: new connections dropped>".to_owned()
        } else {
            backends.join(" ")
        };
        println!("{name:<40} {:<24} {backends}", fe.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn durations_as_kube_proxy_writes_them() {
        assert_eq!(duration_arg("30"), Ok(Duration::from_secs(30)));
        assert_eq!(duration_arg("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration_arg("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration_arg("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration_arg("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "1x", "-1s", "1.2.3s"] {
            assert!(duration_arg(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn manifests_and_kubeconfig_exclude_each_other() {
        let run = |extra: &[&str]| {
            let mut args = vec!["vipx", "run", "--node-name", "n"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        assert!(run(&["--manifests", "/d", "--kubeconfig", "/k"]).is_err());
        assert!(run(&["--manifests", "/d"]).is_ok());
        assert!(run(&["--kubeconfig", "/k"]).is_ok());
        assert!(run(&[]).is_ok(), "in-cluster");
        let Ok(Cli {
            cmd: Cmd::Run(a), ..
        }) = run(&["--resync-seconds", "7", "--min-sync-period", "250ms"])
        else {
            panic!("run arguments")
        };
        assert_eq!(a.sync_period, Some(Duration::from_secs(7)));
        assert_eq!(a.min_sync_period, Some(Duration::from_millis(250)));
    }

    #[test]
    fn node_name_is_validated_and_falls_back_to_the_environment() {
        let parse = |name: &str| Cli::try_parse_from(["vipx", "services", "--node-name", name]);
        assert!(parse("worker-1").is_ok());
        for bad in ["../etc", "Worker", "a/b", ""] {
            let err = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(err.to_string().contains("node name"), "{err}");
        }
        let cmd = Cli::command();
        let services = cmd.find_subcommand("services").expect("subcommand");
        let arg = services
            .get_arguments()
            .find(|a| a.get_id() == "node_name")
            .expect("--node-name");
        assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new("NODE_NAME")));
    }

    #[test]
    fn sync_periods_are_validated_as_kube_proxy_does() {
        let resolve = |args: &[&str]| Settings::resolve(&run_args(args));
        assert!(resolve(&["--node-name", "n", "--sync-period", "30s"]).is_ok());
        assert!(
            resolve(&[
                "--node-name",
                "n",
                "--sync-period",
                "1s",
                "--min-sync-period",
                "2s"
            ])
            .is_err()
        );
        assert!(resolve(&["--node-name", "n", "--sync-period", "100000000000s"]).is_err());
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let mut argv = vec!["vipx", "run", "--manifests", "/nonexistent"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("parses").cmd {
            Cmd::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    fn config_file(name: &str, text: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("vipx-config-{}-{name}.yaml", std::process::id()));
        fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn conntrack_timeouts_from_flags_or_the_file() {
        let a = run_args(&[
            "--node-name",
            "w",
            "--conntrack-udp-timeout",
            "10s",
            "--conntrack-tcp-timeout-closed",
            "3s",
            "--conntrack-tcp-timeout-established",
            "0",
        ]);
        let d = vipx::conntrack::Timeouts::default();
        let flags = conntrack_settings(&a, None).unwrap();
        assert_eq!(flags.timeouts.udp, Duration::from_secs(10));
        assert_eq!(flags.timeouts.tcp_closed, Duration::from_secs(3));
        assert_eq!(
            flags.timeouts.tcp_established, d.tcp_established,
            "0: the default"
        );
        assert_eq!(flags.gc_interval, run::DEFAULT_CONNTRACK_GC_INTERVAL);
        let file = config::FileConntrack {
            udp_stream: Some(Duration::from_secs(300)),
            ..Default::default()
        };
        let from_file = conntrack_settings(&a, Some(&file)).unwrap();
        assert_eq!(
            from_file.timeouts.udp, d.udp,
            "the file replaces kube-proxy's flags"
        );
        assert_eq!(from_file.timeouts.udp_stream, Duration::from_secs(300));
        assert_eq!(
            from_file.timeouts.tcp_closed,
            Duration::from_secs(3),
            "vipx's own flag"
        );
    }

    #[test]
    fn kube_proxy_flags_and_their_defaults() {
        let s = Settings::resolve(&run_args(&["--hostname-override", "worker-1"])).unwrap();
        assert_eq!(
            s,
            Settings {
                node_name: "worker-1".into(),
                healthz_bind: "0.0.0.0:10256".parse().ok(),
                metrics_bind: "127.0.0.1:10249".parse().ok(),
                cluster_cidrs: vec![],
                nodeport_addresses: vec![],
                sync_period: Duration::from_secs(30),
                min_sync_period: Duration::from_secs(1),
                file_conntrack: None,
            }
        );
        let s = Settings::resolve(&run_args(&[
            "--node-name",
            "worker-1",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "0.0.0.0",
            "--cluster-cidr",
            "10.244.0.0/16,fd00::/56",
            "--resync-seconds",
            "10",
        ]))
        .unwrap();
        assert_eq!(s.healthz_bind, None, "empty disables, as in kube-proxy");
        assert_eq!(s.metrics_bind, "0.0.0.0:10249".parse().ok());
        assert_eq!(s.cluster_cidrs.len(), 2);
        assert_eq!(s.sync_period, Duration::from_secs(10));
        for bad in [
            &["--cluster-cidr", "10.0.0.0"][..],
            &["--healthz-bind-address", "somewhere:1"][..],
            &["--hostname-override", "Worker-1"][..],
        ] {
            let mut argv = vec!["vipx", "run", "--manifests", "/x"];
            argv.extend_from_slice(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_config_file_replaces_the_flags_except_the_node_name() {
        let p = config_file(
            "wins",
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             hostnameOverride: from-file\nmetricsBindAddress: 0.0.0.0:9999\n\
             clusterCIDR: 10.244.0.0/16\niptables: {syncPeriod: 1m, minSyncPeriod: 2s}\n",
        );
        let path = p.to_str().unwrap();
        let s = Settings::resolve(&run_args(&[
            "--config",
            path,
            "--metrics-bind-address",
            "127.0.0.1:1",
            "--resync-seconds",
            "5",
        ]))
        .unwrap();
        assert_eq!(s.node_name, "from-file");
        assert_eq!(s.metrics_bind, "0.0.0.0:9999".parse().ok());
        // Left out of the file: kube-proxy's default, not the flag.
        assert_eq!(s.healthz_bind, "0.0.0.0:10256".parse().ok());
        assert_eq!(s.sync_period, Duration::from_secs(60));
        assert_eq!(s.min_sync_period, Duration::from_secs(2));
        assert_eq!(s.cluster_cidrs.len(), 1);
        let s = Settings::resolve(&run_args(&[
            "--config",
            path,
            "--hostname-override",
            "flag",
        ]))
        .unwrap();
        assert_eq!(s.node_name, "flag");

        let nameless = config_file(
            "nameless",
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n",
        );
        let err = Settings::resolve(&run_args(&["--config", nameless.to_str().unwrap()]))
            .expect_err("no node name anywhere");
        assert!(format!("{err:#}").contains("hostnameOverride"), "{err:#}");
        let bad = config_file(
            "bad",
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             hostnameOverride: Not_A_Node\n",
        );
        let err = Settings::resolve(&run_args(&["--config", bad.to_str().unwrap()]))
            .expect_err("invalid hostnameOverride");
        assert!(format!("{err:#}").contains("hostnameOverride"), "{err:#}");
        for f in [p, nameless, bad] {
            let _ = fs::remove_file(f);
        }
    }
}
