//! `cargo xtask`: set-up, build, the demo lab (`run`), and every test layer (`test`).
//! Every step that needs something missing on a fresh machine installs or mounts it, says so,
//! and skips when it is already there.

use std::{
    env,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use vipx_lab::{Lab, LabConfig, Realism, SERVICE_PORT, SERVICE_VIP};

mod bench;
mod chart;
mod cluster_demo;
mod node_port_bench;

const BPF_LINKER_VERSION: &str = "0.10.4";
const DEMO_TAG: &str = "demo";
/// Pods the demo creates up front; `scale` chooses how many of them are endpoints.
const DEMO_PODS: u32 = 3;
const DEMO_REPLICAS: usize = 2;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (idempotent).
    Setup,
    /// Build vipx (with its eBPF object) and the lab pod server.
    Build,
    /// Start the demo lab with vipx in front of it; extra arguments go to `vipx run`.
    Run {
        /// A lab of this many nodes (2..=9), one vipx each, an external client, and the seed's
        /// LoadBalancer Service with pods on nodes 1 and 2 [default: one node, the simpleapi
        /// ClusterIP Service].
        #[arg(long)]
        nodes: Option<u8>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        vipx_args: Vec<String>,
    },
    /// Scale the demo Service's endpoints (1..=3) by rewriting its EndpointSlice manifest.
    Scale { replicas: usize },
    /// vipx beside kube-proxy's iptables and nftables rules and the hardware floor: per-packet
    /// cost, end to end in the lab, control plane. Results, table and chart under results/.
    Bench {
        /// A short run (fewer service counts and packets).
        #[arg(long)]
        quick: bool,
        /// Only the real vipx on a manifests directory of 10,000 services x 10 endpoints (1,000
        /// with --quick): time from start to first sync and resident memory, right after the
        /// first sync and steady (after 3 resyncs 1 s apart). Printed; results/ is left alone.
        #[arg(long)]
        memory: bool,
        /// Only the end-to-end run through a node port: an external client through a node that
        /// runs none of the Service's pods, vipx (native and generic XDP) beside kube-proxy's
        /// iptables and nftables NodePort rules. Writes node-ports.{json,md} under results/.
        #[arg(long, conflicts_with = "memory")]
        node_ports: bool,
        /// With --node-ports: these service counts instead of the plan's (comma-separated).
        #[arg(long, value_delimiter = ',', requires = "node_ports")]
        services: Vec<usize>,
        /// With --node-ports: runs per contender instead of the plan's (odd: a true median).
        #[arg(long, requires = "node_ports")]
        reps: Option<usize>,
        /// Only these parts (comma-separated; default all). The others keep their figures, and
        /// the commit they were measured at, from the report already under results/.
        #[arg(long, value_enum, value_delimiter = ',', conflicts_with_all = ["memory", "node_ports"])]
        parts: Vec<bench::Part>,
    },
    /// Run every test layer: unit, packet fixtures (BPF_PROG_TEST_RUN), namespace lab.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Build => {
            setup()?;
            build()
        }
        Cmd::Run { nodes, vipx_args } => {
            setup()?;
            build()?;
            match nodes {
                Some(n) => cluster_demo::run(n, &vipx_args),
                None => run_demo(&vipx_args),
            }
        }
        Cmd::Scale { replicas } => scale(replicas),
        Cmd::Bench {
            quick,
            memory,
            node_ports,
            services,
            reps,
            parts,
        } => {
            setup()?;
            if memory {
                bench::memory(quick)
            } else if node_ports {
                bench::node_ports(quick, services, reps)
            } else {
                bench::bench(quick, &parts)
            }
        }
        Cmd::Test { cargo_args } => {
            setup()?;
            test(&cargo_args)
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

pub(crate) fn step(msg: &str) {
    eprintln!("\x1b[1mxtask:\x1b[0m {msg}");
}

pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !st.success() {
        bail!("{shown} failed: {st}");
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    if program.starts_with('/') {
        return Path::new(program).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Toolchain for the eBPF crate: nightly when installed, else stable with RUSTC_BOOTSTRAP.
fn ebpf_toolchain() -> &'static str {
    let list = output("rustup", &["toolchain", "list"]).unwrap_or_default();
    if list.lines().any(|l| l.starts_with("nightly")) {
        "nightly"
    } else {
        "stable"
    }
}

fn setup() -> Result<()> {
    // Debian packages: iproute2 (ip), util-linux (nsenter), curl (the demo's client), nftables
    // (every lab node loads kube-proxy's conntrack INVALID-drop rule with nft).
    let missing: Vec<&str> = [
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("curl", "curl"),
        ("nft", "nftables"),
    ]
    .into_iter()
    .filter(|(bin, _)| !have(bin) && vipx_lab::kube_rules::find_tool(bin).is_none())
    .map(|(_, pkg)| pkg)
    .collect();
    if !missing.is_empty() {
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        status(Command::new("apt-get").arg("update").arg("-q"))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    let tc = ebpf_toolchain();
    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", tc],
    )
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        step(&format!(
            "adding rust-src to the {tc} toolchain (the eBPF build needs build-std)"
        ));
        status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", tc]))?;
    }

    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        step(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} (the last one that uses the LLVM inside the \
             Rust toolchain; about 90 s)"
        ));
        let mut c = Command::new("cargo");
        c.arg(format!("+{tc}")).args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]);
        if tc == "stable" {
            c.env("RUSTC_BOOTSTRAP", "1");
        }
        status(&mut c)?;
    }

    let fs_type = output("stat", &["-f", "-c", "%T", "/sys/fs/bpf"]).unwrap_or_default();
    if fs_type.trim() != "bpf_fs" {
        step("mounting bpffs at /sys/fs/bpf");
        status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    let tc = ebpf_toolchain();
    c.env("VIPX_EBPF_TOOLCHAIN", tc);
    if tc == "stable" {
        c.env("RUSTC_BOOTSTRAP", "1");
    }
    c
}

fn build() -> Result<()> {
    step("building vipx (with its eBPF object) and lab-pod");
    status(cargo().args([
        "build",
        "-p",
        "proxy-userspace",
        "-p",
        "vipx-tests",
        "--bins",
    ]))
}

pub(crate) fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn demo_dir() -> PathBuf {
    target_dir().join("vipx-demo")
}

/// The demo's backends are created up front; endpoints name the first `n` of them.
fn demo_endpoints(n: usize) -> Vec<(String, std::net::Ipv4Addr)> {
    (1..=n)
        .map(|k| {
            (
                format!("backend-{k}"),
                std::net::Ipv4Addr::new(198, 18, 64, 10 + k as u8),
            )
        })
        .collect()
}

fn scale(replicas: usize) -> Result<()> {
    if !(1..=DEMO_PODS as usize).contains(&replicas) {
        bail!("the demo has {DEMO_PODS} pods; replicas must be 1..={DEMO_PODS}");
    }
    let dir = demo_dir().join("manifests");
    if !dir.is_dir() {
        bail!(
            "no demo running (missing {}); start `cargo xtask run` first",
            dir.display()
        );
    }
    let node = format!("vipx-{DEMO_TAG}-node");
    let f = vipx_lab::write_endpoint_slice(&dir, &demo_endpoints(replicas), &node)?;
    step(&format!(
        "wrote {} with {replicas} endpoint(s); vipx applies it within a second",
        f.display()
    ));
    Ok(())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        }
        let _ = self.0.wait();
    }
}

fn run_demo(vipx_args: &[String]) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let bin = target_dir().join("debug");
    let vipx = bin.join("vipx");
    let removed = vipx_lab::cleanup_stale(DEMO_TAG)?;
    if !removed.is_empty() {
        step(&format!(
            "removed a previous demo's namespaces: {}",
            removed.join(" ")
        ));
    }
    step("creating the lab: node, client and backend pod namespaces");
    let lab = Lab::create(LabConfig {
        tag: DEMO_TAG.into(),
        backends: DEMO_PODS,
        lab_pod_bin: bin.join("lab-pod"),
        // A demo of a real node: rp_filter=1 and conntrack dropping INVALID packets.
        realism: Realism::Node,
    })?;
    let dir = demo_dir();
    let manifests = dir.join("manifests");
    let _ = std::fs::remove_dir_all(&manifests);
    std::fs::create_dir_all(&manifests)?;
    vipx_lab::write_service(&manifests)?;
    vipx_lab::write_endpoint_slice(&manifests, &demo_endpoints(DEMO_REPLICAS), lab.node_name())?;
    let pin_dir = Path::new("/sys/fs/bpf/vipx").join(lab.node_name());
    // A fresh demo starts from empty maps.
    let _ = std::fs::remove_dir_all(&pin_dir);

    let mut args: Vec<String> = vec![
        "run".into(),
        "--manifests".into(),
        manifests.display().to_string(),
        "--node-name".into(),
        lab.node_name().into(),
        "--pod-interfaces".into(),
        vipx_lab::HOST_IF_GLOB.into(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
    ];
    args.extend(vipx_args.iter().cloned());
    step(&format!(
        "starting vipx in {}: {} {}",
        lab.node_ns(),
        vipx.display(),
        args.join(" ")
    ));
    let child = vipx_lab::ns_command(lab.node_ns(), &vipx, &args)
        .spawn()
        .context("starting vipx")?;
    let mut child = KillOnDrop(child);

    let client = lab.client().netns.clone();
    let vip = SocketAddr::from((SERVICE_VIP, SERVICE_PORT));
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Ok(body) = vipx_lab::http_get(&client, vip, Duration::from_millis(500)) {
            break body;
        }
        if let Some(st) = child.0.try_wait()? {
            bail!("vipx exited early: {st}");
        }
        if Instant::now() > deadline || stop.load(Ordering::SeqCst) {
            bail!(
                "the VIP did not answer within 30 s (the lab node runs rp_filter=1 and drops \
                 conntrack INVALID packets, as a real node does)"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut seen = vec![first.trim().to_owned()];
    for _ in 0..7 {
        if let Ok(b) = vipx_lab::http_get(&client, vip, Duration::from_secs(1)) {
            seen.push(b.trim().to_owned());
        }
    }
    let nsenter = |ns: &str| format!("nsenter --net=/run/netns/{ns}");
    println!();
    println!("vipx is serving {SERVICE_VIP}:{SERVICE_PORT} (simpleapi-service) in the lab.");
    println!(
        "8 requests from the client pod were answered by: {}",
        seen.join(", ")
    );
    println!();
    println!("Curl the VIP from the client pod:");
    println!("  {} curl -s http://{SERVICE_VIP}/", nsenter(&client));
    println!("UDP (port 80/UDP -> 5000):");
    println!(
        "  {} bash -c 'exec 3<>/dev/udp/{SERVICE_VIP}/80; echo hi >&3; timeout 1 dd bs=512 count=1 status=none <&3; echo'",
        nsenter(&client)
    );
    println!("Scale the backends (1..={DEMO_PODS}) by rewriting the EndpointSlice:");
    println!("  cargo xtask scale 3");
    println!("See what is programmed:");
    println!(
        "  {} {} services --node-name {} --state-dir {}",
        nsenter(lab.node_ns()),
        vipx.display(),
        lab.node_name(),
        dir.join("state").display()
    );
    println!("Manifests: {}", manifests.display());
    println!();
    println!("Press Ctrl-C to stop vipx and remove every lab namespace.");
    while !stop.load(Ordering::SeqCst) {
        if let Some(st) = child.0.try_wait()? {
            step(&format!("vipx exited: {st}"));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    step("stopping vipx, uninstalling it (vipx cleanup) and removing the lab");
    drop(child);
    // A stopped vipx leaves its programs attached and its maps pinned on purpose.
    let cleanup = status(
        Command::new(bin.join("vipx"))
            .args(["cleanup", "--node-name", lab.node_name(), "--pin-dir"])
            .arg(&pin_dir)
            .arg("--state-dir")
            .arg(dir.join("state")),
    );
    drop(lab);
    cleanup
}

fn test(cargo_args: &[String]) -> Result<()> {
    check_privileges()?;
    // Every gate runs even after another failed, so one run reports all of them; any failure
    // fails the command.
    let mut failed: Vec<String> = Vec::new();
    step("checking formatting (cargo fmt --check)");
    if let Err(e) = status(cargo().args(["fmt", "--all", "--", "--check"])) {
        failed.push(format!("formatting ({e:#}); run `cargo fmt --all`"));
    }
    failed.extend(clippy().err().map(|e| format!("{e:#}")));
    // The lab tests start the vipx and lab-pod binaries, so build them first.
    build()?;
    step("running every test layer (unit, BPF_PROG_TEST_RUN fixtures, namespace lab)");
    let mut c = cargo();
    c.args(["test", "--workspace"]).args(cargo_args);
    if !cargo_args.iter().any(|a| a == "--") {
        c.arg("--");
    }
    // Lab tests share kernel state (bpffs, interfaces by glob); they also serialise themselves.
    c.arg("--test-threads=1");
    if let Err(e) = status(&mut c) {
        failed.push(format!("tests ({e:#})"));
    }
    if !failed.is_empty() {
        bail!("cargo xtask test failed:\n- {}", failed.join("\n- "));
    }
    Ok(())
}

/// Privileged tests fail rather than skip when they cannot run; say up front what is missing,
/// unless the run opted out of them explicitly (refused under CI, as the tests refuse it too).
fn check_privileges() -> Result<()> {
    let missing = vipx_lab::privileges::missing_privileges();
    if missing.is_empty() {
        return Ok(());
    }
    let skip = env::var_os(vipx_lab::privileges::SKIP_VAR).is_some_and(|v| v == "1");
    if skip && env::var_os("CI").is_none() {
        step(&format!(
            "privileged tests will be SKIPPED ({}=1): {}",
            vipx_lab::privileges::SKIP_VAR,
            missing.join("; ")
        ));
        return Ok(());
    }
    bail!(
        "the privileged tests (namespace labs, eBPF) cannot run here: {}.\n\
         Run as root with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN and with ip, nsenter and nft \
         installed (`cargo xtask setup` installs the tools), or skip those tests explicitly with \
         {}=1 (refused when CI is set)",
        missing.join("; "),
        vipx_lab::privileges::SKIP_VAR
    )
}

/// Clippy in two passes (toolchain.md): the userspace crates on the host toolchain, then the
/// eBPF crate for its own target with `panic=abort`; in one pass the eBPF crate's panic handler
/// would be compiled for the host next to std's.
fn clippy() -> Result<()> {
    step("clippy, userspace crates (-D warnings)");
    let userspace = status(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found warnings in the userspace crates");

    let tc = ebpf_toolchain();
    step(&format!(
        "clippy, eBPF crate (+{tc}, bpfel-unknown-none, -C panic=abort, -D warnings)"
    ));
    // As aya-build builds it (`rustup run`, so `RUSTC` from this cargo cannot pick the wrong
    // toolchain), with the same cfg, in a target directory of its own so that neither build
    // invalidates the other's artifacts.
    let mut c = Command::new("rustup");
    c.current_dir(root())
        .args(["run", tc, "cargo", "clippy", "-p", "proxy-ebpf", "--bins"])
        .args(["--features", "build-ebpf", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(target_dir().join("clippy-ebpf"))
        .args(["--", "-D", "warnings"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!(
                "--cfg=bpf_target_arch=\"{}\"\x1f-Cpanic=abort",
                std::env::consts::ARCH
            ),
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    if tc == "stable" {
        c.env("RUSTC_BOOTSTRAP", "1");
    }
    let ebpf = status(&mut c).context("clippy found warnings in the eBPF crate");
    match (userspace, ebpf) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(u), Err(e)) => Err(anyhow::anyhow!("{u:#}; {e:#}")),
    }
}
