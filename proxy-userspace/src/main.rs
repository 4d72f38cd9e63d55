use std::{fs, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use vipx::{
    loader::{self, MapSizes},
    run::{self, RunOptions, StateFile},
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
    Run(RunArgs),
    /// List what is programmed, read from the pinned maps.
    Services(WhereArgs),
    /// Uninstall vipx from this node: unpin its links (detaching the programs), its maps and
    /// its state. Stop `vipx run` first: a stopped vipx leaves its programs attached on purpose.
    Cleanup(WhereArgs),
}

#[derive(Args)]
struct WhereArgs {
    /// This node's name, as its Node object is named (decides which endpoints are local, and
    /// selects the default pin and state directories).
    #[arg(long, env = "NODE_NAME", value_parser = node_name_arg)]
    node_name: String,
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

impl WhereArgs {
    fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| loader::default_pin_dir(&self.node_name))
    }
    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| run::default_state_dir(&self.node_name))
    }
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
    /// Conntrack entries (two per flow).
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    max_conntrack: u32,
    /// Full reconcile period, on top of change events (`30s`, `1m`, `500ms`; a bare number is
    /// seconds).
    #[arg(long, alias = "resync-seconds", default_value = "30s", value_parser = duration_arg)]
    sync_period: Duration,
    /// Syncs are at least this far apart; a change after a quiet spell is applied at once.
    #[arg(long, default_value = "1s", value_parser = duration_arg)]
    min_sync_period: Duration,
    /// How long a TCP endpoint removed from every Service keeps serving the connections it has
    /// (new ones avoid it at once), in seconds; 0 ends them at once.
    #[arg(long, default_value_t = vipx::maps::DEFAULT_ENDPOINT_GRACE.as_secs())]
    endpoint_grace_seconds: u64,
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
            let opts = RunOptions {
                source,
                node_name: a.place.node_name.clone(),
                pod_interfaces,
                pin_dir: a.place.pin_dir(),
                state_dir: a.place.state_dir(),
                sizes: MapSizes {
                    services: a.max_service_entries,
                    backends: a.max_backends,
                    revnat: a.max_frontends,
                    conntrack: a.max_conntrack,
                },
                resync: a.sync_period.max(Duration::from_secs(1)),
                min_sync: a.min_sync_period,
                endpoint_grace: Duration::from_secs(a.endpoint_grace_seconds),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run::run(opts))
        }
        Cmd::Services(w) => services(&w),
        Cmd::Cleanup(w) => loader::cleanup(&w.pin_dir(), &w.state_dir()),
    }
}

fn services(w: &WhereArgs) -> Result<()> {
    let maps = loader::open_pinned(&w.pin_dir())?;
    let p = maps.read()?;
    let names: StateFile = fs::read(w.state_dir().join(run::STATE_FILE))
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
        assert_eq!(a.sync_period, Duration::from_secs(7));
        assert_eq!(a.min_sync_period, Duration::from_millis(250));
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
}
