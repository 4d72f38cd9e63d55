//! vipx's side of `cargo xtask bench`:
//! - `packet`: per-packet cost of the real pod program through BPF_PROG_TEST_RUN, beside a
//!   trivial XDP program (one array lookup, XDP_PASS) measured in the same run: the floor. Each
//!   figure is the median of `--reps` runs of `--repeat` packets.
//! - `maglev`: the fraction of a Maglev table (so of new flows' backend choices) that changes
//!   when one of N backends is removed or one is added: vipx's derived tables and the paper's
//!   rebuilt ones, beside the ideal 1/N and 1/(N+1). No kernel needed.
//! - `control-plane`: from a desired state of N services x E endpoints to maps fully written, and
//!   one endpoint change at that scale, through the real translate -> target -> apply path.

/// The allocator vipx itself runs with (see `main.rs`), so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{net::Ipv4Addr, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, TestRunOptions,
    programs::{Program, ProgramError, SchedClassifier, TestRun as _, Xdp},
};
use clap::Parser;
use etherparse::PacketBuilder;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_common::{
    BACKEND_F_ACTIVE, BACKEND_F_LOCAL, IPPROTO_TCP, SVC_F_CLUSTER_IP, Stat, prog_names,
};
use serde::Serialize;
use vipx::{
    desired::{LbAlgorithm, Protocol, ServicePortName},
    loader::{self, MapSizes},
    maps::{L4Addr, MapWriter, Target, TargetFrontend},
    source::ClusterObjects,
    sync::ChangeTracker,
};

#[derive(Parser)]
enum Cmd {
    Packet(Args),
    ControlPlane(CpArgs),
    /// Cost of one conntrack collection pass over a full table.
    CtGc(GcArgs),
    Maglev(MaglevArgs),
}

#[derive(clap::Args)]
struct GcArgs {
    /// Conntrack entries (two per flow), all present during the pass.
    #[arg(long, default_value_t = 1_048_576)]
    entries: u32,
    /// Share of flows that have ended and are collected by the pass, in percent.
    #[arg(long, default_value_t = 10)]
    expired_percent: u32,
    /// How long the live flows have been idle, in seconds (established flows are kept for
    /// 24 h; idle ones make the pass look at both entries of each flow).
    #[arg(long, default_value_t = 60)]
    idle_seconds: u32,
    /// Runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct MaglevArgs {
    /// Backend counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "2,4,10,30,100")]
    backends: Vec<u32>,
    /// Table size (prime).
    #[arg(long, default_value_t = proxy_common::defaults::MAGLEV_TABLE_SIZE)]
    table_size: u32,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct MaglevRow {
    backends: u32,
    table_size: u32,
    tables: &'static str,
    removal_moved: f64,
    removal_moved_of_staying_backends: f64,
    removal_ideal: f64,
    addition_moved: f64,
    addition_ideal: f64,
}

fn maglev(a: MaglevArgs) -> Result<()> {
    vipx::maglev::check_table_size(a.table_size).map_err(anyhow::Error::msg)?;
    let mut rows = Vec::new();
    println!(
        "| backends | M | tables | removal moved | of staying backends | ideal | addition moved \
         | ideal |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    for &n in &a.backends {
        if n == 0 {
            continue;
        }
        for (tables, incremental) in [("derived (vipx)", true), ("rebuilt (paper)", false)] {
            let r = vipx::maglev::reshuffle(n, a.table_size, incremental);
            println!(
                "| {n} | {} | {tables} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
                a.table_size,
                r.removal,
                r.removal_of_survivors,
                r.ideal_removal,
                r.addition,
                r.ideal_addition
            );
            rows.push(MaglevRow {
                backends: n,
                table_size: a.table_size,
                tables,
                removal_moved: r.removal,
                removal_moved_of_staying_backends: r.removal_of_survivors,
                removal_ideal: r.ideal_removal,
                addition_moved: r.addition,
                addition_ideal: r.ideal_addition,
            });
        }
    }
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[derive(clap::Args)]
struct CpArgs {
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Runs (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct Args {
    /// Service counts to measure (each with `--backends` backends).
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    services: Vec<u32>,
    #[arg(long, default_value_t = 10)]
    backends: u32,
    /// Packets per test run.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// How the services pick backends (`maglev` or `hash`); a SYN's cost depends on it.
    #[arg(long, default_value = "maglev", value_parser = lb_algorithm_arg)]
    lb_algorithm: LbAlgorithm,
    /// Only these cases (comma-separated names, e.g. `node_established`), beside the floors:
    /// for profiling one path (`perf record -a` around the run) [default: every case].
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Cache pressure: conntrack holding this many live entries while established packets are
    /// drawn from `--pressure-flows` distinct flows, one run per packet (rows
    /// `established_pressure`, `node_established_pressure`, beside the same on one hot flow),
    /// then new flows into a full table (`new_flow_syn_evicting`). 0: not measured.
    #[arg(long, default_value_t = 0)]
    pressure_conntrack: u32,
    #[arg(long, default_value_t = 100_000)]
    pressure_flows: u32,
    /// The service count (of `--services`) at which the cache-pressure rows are measured: they
    /// fill conntrack, which takes seconds, and the service count matters little to them.
    #[arg(long, default_value_t = 10_000)]
    pressure_services: u32,
}

fn lb_algorithm_arg(s: &str) -> Result<LbAlgorithm, String> {
    LbAlgorithm::parse(s).ok_or_else(|| format!("unknown algorithm {s:?} (maglev or hash)"))
}

const TC_ACT_OK: u32 = 0;
/// TC_ACT_UNSPEC ("next"), vipx's verdict for every packet it passes on.
const TC_NEXT: u32 = -1i32 as u32;
const XDP_PASS: u32 = 2;
const CLIENT: [u8; 4] = [198, 18, 200, 2];
/// A client outside the cluster (the node program's cases).
const EXTERNAL: [u8; 4] = [198, 18, 202, 2];
/// Established packets under cache pressure: `a.pressure_flows` flows opened through the pod
/// program and as many through the node program (external clients), spread over services 1 to
/// `n - 1` (each its own local backend), conntrack filled to
/// `a.pressure_conntrack` live entries around them, then each flow's next packet, one run per
/// packet in a shuffled order, beside the single-run floor. Every packet must find its entry.
fn pressure(
    ebpf: &mut Ebpf,
    pin_dir: &std::path::Path,
    a: &Args,
    n: u32,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let k = a.pressure_flows;
    // Tuple i of a set: a client address from `base` on, 40,000 ports per address.
    let tuple = |i: u32, base: [u8; 4]| {
        let addr = u32::from_be_bytes(base) + i / 40_000;
        (addr.to_be_bytes(), 1024 + (i % 40_000) as u16)
    };
    let dst = |i: u32| {
        let (addr, port) = pressure_target(i, n);
        (addr.octets(), port)
    };
    let mut ct: aya::maps::HashMap<
        aya::maps::MapData,
        proxy_common::CtKey4,
        proxy_common::CtValue,
    > = loader::open_pinned_conntrack(pin_dir)?;
    // Filler first (the flows measured are then the most recent): entries no packet names.
    let filler = a.pressure_conntrack.saturating_sub(4 * k);
    let started = Instant::now();
    fill_conntrack(&mut ct, filler, [198, 19, 255, 254])?;
    let pod = prog_names::POD_INGRESS;
    let node = prog_names::NODE_XDP;
    let mut pod_pkts = Vec::with_capacity(k as usize);
    let mut node_pkts = Vec::with_capacity(k as usize);
    for i in 0..k {
        let (daddr, dport) = dst(i);
        let (src, sport) = tuple(i, [198, 18, 210, 0]);
        run_tc(ebpf, pod, &tcp(src, sport, daddr, dport, true), 1)?;
        pod_pkts.push(tcp(src, sport, daddr, dport, false));
        let (src, sport) = tuple(i, [198, 18, 220, 0]);
        run(
            ebpf,
            node,
            &tcp(src, sport, daddr, dport, true),
            1,
            XDP_PASS,
        )?;
        node_pkts.push(tcp(src, sport, daddr, dport, false));
    }
    let mut live = 0u64;
    for key in ct.keys() {
        key?;
        live += 1;
    }
    eprintln!(
        "vipx-bench: {live} conntrack entries live, {k} + {k} flows measured ({:.1} s to fill)",
        started.elapsed().as_secs_f64()
    );
    // A fixed shuffle: consecutive packets touch unrelated entries.
    let mut order: Vec<usize> = (0..k as usize).collect();
    let mut x = 0x2545_f491u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    // [pod, node] over the shuffled flows, then [pod, node] on one hot flow the same way (one
    // run per packet): the difference is what the cache misses cost, the single-run overhead
    // (a syscall, cold code after it) being in both.
    let mut samples: [Vec<f64>; 4] = Default::default();
    let mut floors = Vec::new();
    let mut floors_tc = Vec::new();
    for _ in 0..a.reps {
        let before = loader::read_stats(ebpf)?;
        let mut sums = [0.0; 4];
        let (mut sum_floor, mut sum_floor_tc) = (0.0, 0.0);
        for &i in &order {
            sums[0] += run_tc(ebpf, pod, &pod_pkts[i], 1)?;
            sums[1] += run(ebpf, node, &node_pkts[i], 1, XDP_PASS)?;
            sums[2] += run_tc(ebpf, pod, &pod_pkts[0], 1)?;
            sums[3] += run(ebpf, node, &node_pkts[0], 1, XDP_PASS)?;
            sum_floor += run_floor(ebpf, &pod_pkts[i], 1)?;
            sum_floor_tc += run(ebpf, prog_names::FLOOR_TC, &pod_pkts[i], 1, TC_ACT_OK)?;
        }
        floors_tc.push(sum_floor_tc / f64::from(k));
        let after = loader::read_stats(ebpf)?;
        for (stat, want) in [(Stat::CtForward, 2 * k), (Stat::NodeTranslated, 2 * k)] {
            let moved = stat_of(&after, stat) - stat_of(&before, stat);
            if moved != u64::from(want) {
                bail!(
                    "pressure: {} moved by {moved} of {want}: entries were evicted or missed",
                    stat.name()
                );
            }
        }
        for (s, sum) in samples.iter_mut().zip(sums) {
            s.push(sum / f64::from(k));
        }
        floors.push(sum_floor / f64::from(k));
    }
    let floor = median(&mut floors.clone());
    let syn = syn_evicting(ebpf, a, n, &mut ct)?;
    for (case, s) in [
        "established_pressure",
        "node_established_pressure",
        "established_single_run_hot",
        "node_established_single_run_hot",
        "new_flow_syn_evicting",
    ]
    .into_iter()
    .zip(samples.into_iter().chain([syn]))
    {
        let ns = median(&mut s.clone());
        rows.push(Row {
            services: n,
            backends_per_service: a.backends,
            case,
            ns_per_packet: ns,
            floor_ns: floor,
            ratio_to_floor: ns / floor,
            samples_ns: s,
        });
    }
    rows.push(Row {
        services: n,
        backends_per_service: a.backends,
        case: "floor_xdp_single_run_pressure",
        ns_per_packet: floor,
        floor_ns: floor,
        ratio_to_floor: 1.0,
        samples_ns: floors,
    });
    // The TC hook's own single-run cost (an skb built per run): the pod program's row pays it.
    let tc = median(&mut floors_tc.clone());
    rows.push(Row {
        services: n,
        backends_per_service: a.backends,
        case: "floor_tc_single_run_pressure",
        ns_per_packet: tc,
        floor_ns: floor,
        ratio_to_floor: tc / floor,
        samples_ns: floors_tc,
    });
    Ok(())
}

/// `n` live forward entries no packet names (sources 198.19.0.0 on, 50,000 ports each) to
/// `daddr`:80, as filler around the measured flows.
fn fill_conntrack(
    ct: &mut aya::maps::HashMap<aya::maps::MapData, proxy_common::CtKey4, proxy_common::CtValue>,
    n: u32,
    daddr: [u8; 4],
) -> Result<()> {
    for i in 0..n {
        let key = proxy_common::CtKey4 {
            saddr: (0xc613_0000u32 + i / 50_000).to_be_bytes(),
            daddr,
            sport: (1024 + (i % 50_000) as u16).to_be_bytes(),
            dport: [0, 80],
            proto: IPPROTO_TCP,
            ..Default::default()
        };
        let v = proxy_common::CtValue {
            flags: proxy_common::CT_F_FORWARD,
            seen: vipx::conntrack::now_seen(),
            ..Default::default()
        };
        ct.insert(key, v, 0)?;
    }
    Ok(())
}

/// The service flow `i` of the cache-pressure rows goes to: 1 to `n - 1` in turn (made local
/// and their own backends for them), or the only one.
fn pressure_target(i: u32, n: u32) -> (Ipv4Addr, u16) {
    if n > 1 { vip(1 + i % (n - 1)) } else { vip(0) }
}

/// The conntrack map's size in the per-packet bench: room for the pressure rows' live entries
/// without the LRU evicting them.
fn bench_conntrack_size(a: &Args) -> u32 {
    65_536.max(a.pressure_conntrack + a.pressure_conntrack / 4)
}

/// New flows as they come to a full conntrack table: the table is filled to its size with
/// entries no packet names, then SYNs of tuples never seen go through the pod program one run
/// each, every one inserting two entries in place of two evicted ones. Returns the ns per SYN
/// of each rep.
fn syn_evicting(
    ebpf: &mut Ebpf,
    a: &Args,
    n: u32,
    ct: &mut aya::maps::HashMap<aya::maps::MapData, proxy_common::CtKey4, proxy_common::CtValue>,
) -> Result<Vec<f64>> {
    // An LRU map evicts to make room; an insert that fails here is a bench bug.
    fill_conntrack(ct, bench_conntrack_size(a), [198, 19, 255, 253])?;
    let flows = a.pressure_flows.min(SYN_EVICTING_FLOWS);
    let mut out = Vec::new();
    for rep in 0..a.reps {
        let before = loader::read_stats(ebpf)?;
        let mut sum = 0.0;
        for i in 0..flows {
            let src = [198, 18, 230 + (rep % 20) as u8, (i / 40_000) as u8];
            let (daddr, dport) = pressure_target(i, n);
            let syn = tcp(src, 1024 + (i % 40_000) as u16, daddr.octets(), dport, true);
            sum += run_tc(ebpf, prog_names::POD_INGRESS, &syn, 1)?;
        }
        let after = loader::read_stats(ebpf)?;
        let created = stat_of(&after, Stat::NewFlows) - stat_of(&before, Stat::NewFlows);
        if created != u64::from(flows) {
            bail!("syn_evicting: {created} new flows of {flows} SYNs");
        }
        out.push(sum / f64::from(flows));
    }
    Ok(out)
}

fn stat_of(stats: &[(Stat, u64)], which: Stat) -> u64 {
    stats
        .iter()
        .find(|(s, _)| *s == which)
        .map_or(0, |(_, v)| *v)
}

/// Distinct SYNs per run of the `new_flow_distinct` case (two conntrack entries each; the
/// table holds 65,536).
const DISTINCT_FLOWS: u16 = 4096;
/// SYNs per rep of `new_flow_syn_evicting` (fewer when `--pressure-flows` is smaller).
const SYN_EVICTING_FLOWS: u32 = 20_000;

#[derive(Serialize)]
struct Row {
    services: u32,
    backends_per_service: u32,
    case: &'static str,
    ns_per_packet: f64,
    floor_ns: f64,
    ratio_to_floor: f64,
    samples_ns: Vec<f64>,
}

/// The i-th service's frontend: 198.19.0.0/16, with the port changing every 65,536 services.
fn vip(i: u32) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i % 65_536),
        80 + (i / 65_536) as u16,
    )
}

/// The b-th backend of service i: pod addresses in 198.18.0.0/17, the port changing every
/// 32,000 backends (a million backends stay inside the lab range).
fn backend(i: u32, b: u32, per: u32) -> (Ipv4Addr, u16) {
    let k = i * per + b;
    (
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 1 + k % 32_000),
        8080 + (k / 32_000) as u16,
    )
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let payload: &[u8] = if syn { b"" } else { b"GET / HTTP/1.1\r\n\r\n" };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("write packet");
    out
}

fn run_tc(ebpf: &mut Ebpf, prog: &str, pkt: &[u8], repeat: u32) -> Result<f64> {
    run(ebpf, prog, pkt, repeat, TC_NEXT)
}

fn run_floor(ebpf: &mut Ebpf, pkt: &[u8], repeat: u32) -> Result<f64> {
    run(ebpf, prog_names::FLOOR, pkt, repeat, XDP_PASS)
}

/// ns per run of program `prog` over `repeat` runs of `pkt`, checking the verdict and that the
/// packet left unchanged (otherwise later iterations would measure another packet).
fn run(ebpf: &mut Ebpf, prog: &str, pkt: &[u8], repeat: u32, want: u32) -> Result<f64> {
    let mut out = vec![0u8; pkt.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    };
    let r = match ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog}"))?
    {
        Program::SchedClassifier(p) => p.test_run(opts)?,
        Program::Xdp(p) => p.test_run(opts)?,
        _ => bail!("{prog} is neither TC nor XDP"),
    };
    if r.return_value != want {
        bail!("{prog}: verdict {} (expected {want})", r.return_value);
    }
    if out[..r.data_size_out as usize] != *pkt {
        bail!("the packet changed across iterations; the figure would not be per-packet cost");
    }
    Ok(r.duration.as_nanos() as f64)
}

/// The true median: the middle sample, or the mean of the two middle ones.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() -> Result<()> {
    match Cmd::parse() {
        Cmd::Packet(a) => packet(a),
        Cmd::ControlPlane(a) => control_plane(a),
        Cmd::Maglev(a) => maglev(a),
        Cmd::CtGc(a) => ct_gc(a),
    }
}

#[derive(Serialize)]
struct GcRow {
    entries: u32,
    expired_percent: u32,
    idle_seconds: u32,
    /// A pass where nothing is due (the walk alone).
    idle_pass_ms: f64,
    /// A pass that also deletes the ended flows.
    pass_ms: f64,
    /// Reading every entry in batches, nothing else: the kernel's share.
    walk_ms: f64,
    samples_idle_ms: Vec<f64>,
    samples_ms: Vec<f64>,
    /// Share of one core at the default collection interval.
    core_share_at_default_interval: f64,
}

/// A full conntrack table of `entries / 2` flows through one frontend to one backend, the ended
/// share stamped long idle and closed both ways; the pass is timed as vipx runs it.
fn ct_gc(a: GcArgs) -> Result<()> {
    use proxy_common::{CT_F_FIN, CT_F_FORWARD, CT_F_REPLIED, CT_F_REPLY, CtKey4, CtValue};
    use vipx::conntrack;
    let pin_dir =
        PathBuf::from(loader::BPFFS).join(format!("vipx-bench-gc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let result = (|| -> Result<GcRow> {
        let sizes = MapSizes {
            services: 1024,
            backends: 1024,
            revnat: 1024,
            // Room beyond the filled entries: an LRU at capacity evicts while it is filled.
            conntrack: a.entries + a.entries / 8,
            maglev_table_size: proxy_common::defaults::MAGLEV_TABLE_SIZE,
            maglev_tables: 0,
        };
        let mut ebpf = loader::load(&pin_dir, sizes)?;
        // The clock the programs read in production (jiffies), not the fallback.
        loader::write_clock(&mut ebpf)?;
        let mut writer = MapWriter::new(loader::service_maps(&mut ebpf)?)?;
        let (vaddr, vport) = vip(0);
        let (baddr, bport) = backend(0, 0, 1);
        let be = L4Addr {
            addr: baddr,
            port: bport,
            proto: IPPROTO_TCP,
        };
        let fe = L4Addr {
            addr: vaddr,
            port: vport,
            proto: IPPROTO_TCP,
        };
        let mut t = Target::default();
        t.backends.insert(be, BACKEND_F_ACTIVE);
        t.frontends.insert(
            fe,
            TargetFrontend {
                service: ServicePortName {
                    namespace: "bench".into(),
                    name: "gc".into(),
                    port_name: String::new(),
                    protocol: Protocol::Tcp,
                },
                flags: SVC_F_CLUSTER_IP,
                affinity_timeout_s: 0,
                slots: vec![be],
                lb_algorithm: None,
                source_ranges: Vec::new(),
            },
        );
        writer.apply(&t)?;
        let rev_nat_id = writer.programmed().frontends[&fe].rev_nat_id;
        let backend_id = writer.programmed().frontends[&fe].slots[0];
        let value = CtValue {
            backend_id,
            backend_gen: writer.backend_generation(backend_id),
            rev_nat_id,
            rev_nat_gen: writer.revnat_generation(rev_nat_id),
            flags: 0,
            seen: 0,
        };
        let mut tables = loader::conntrack_tables(&pin_dir)?;
        let flows = a.entries / 2;
        // Clients spread over 198.18.128.0/17, 60,000 source ports each.
        let flow_keys = |i: u32| {
            let client = (u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i / 60_000).to_be_bytes();
            let sport = (1024 + i % 60_000) as u16;
            (
                CtKey4 {
                    saddr: client,
                    daddr: vaddr.octets(),
                    sport: sport.to_be_bytes(),
                    dport: vport.to_be_bytes(),
                    proto: IPPROTO_TCP,
                    _pad: 0,
                    _pad2: 0,
                },
                CtKey4 {
                    saddr: baddr.octets(),
                    daddr: client,
                    sport: bport.to_be_bytes(),
                    dport: sport.to_be_bytes(),
                    proto: IPPROTO_TCP,
                    _pad: 0,
                    _pad2: 0,
                },
            )
        };
        let ended = |i: u32| i % 100 < a.expired_percent;
        // `seen` units are 2^30 ns.
        let idle_units = ((u64::from(a.idle_seconds) * 1_000_000_000) >> 30) as u32;
        let fill = |tables: &mut conntrack::Tables, only_ended: bool| -> Result<()> {
            let now = conntrack::now_seen();
            for i in 0..flows {
                if only_ended && !ended(i) {
                    continue;
                }
                let (fwd, rep) = flow_keys(i);
                // Ended flows: closed both ways an hour ago.
                let (seen, fin) = if ended(i) {
                    (now.wrapping_sub(3600), CT_F_FIN)
                } else {
                    (now.wrapping_sub(idle_units), 0)
                };
                let f = CtValue {
                    flags: CT_F_FORWARD | fin,
                    seen,
                    ..value
                };
                let r = CtValue {
                    flags: CT_F_REPLY | CT_F_REPLIED | fin,
                    seen,
                    ..value
                };
                tables.ct.insert(fwd, f, 0)?;
                tables.ct.insert(rep, r, 0)?;
            }
            Ok(())
        };
        fill(&mut tables, false)?;
        let timeouts = conntrack::Timeouts::default();
        let none = Default::default();
        let mut idle = Vec::new();
        let mut busy = Vec::new();
        for _ in 0..a.reps {
            let st = conntrack::pass(&tables, &timeouts, &none)?;
            let want = u64::from(flows.div_ceil(100) * a.expired_percent.min(100)) * 2;
            if st.deleted.abs_diff(want) > want / 50 + 2 {
                bail!(
                    "the pass deleted {} entries, expected about {want}",
                    st.deleted
                );
            }
            busy.push(st.took.as_secs_f64() * 1e3);
            let st = conntrack::pass(&tables, &timeouts, &none)?;
            if st.deleted != 0 {
                bail!("a second pass deleted {} entries", st.deleted);
            }
            idle.push(st.took.as_secs_f64() * 1e3);
            fill(&mut tables, true)?;
        }
        let mut walks = Vec::new();
        for _ in 0..a.reps {
            let t = Instant::now();
            let mut n = 0usize;
            conntrack::walk(&tables.ct, |k, _| n += k.len())?;
            walks.push(t.elapsed().as_secs_f64() * 1e3);
            if n < flows as usize * 2 * 99 / 100 {
                bail!("the walk saw {n} entries");
            }
        }
        let pass_ms = median(&mut busy.clone());
        let idle_pass_ms = median(&mut idle.clone());
        Ok(GcRow {
            entries: a.entries,
            expired_percent: a.expired_percent,
            idle_seconds: a.idle_seconds,
            idle_pass_ms,
            pass_ms,
            walk_ms: median(&mut walks),
            samples_idle_ms: idle,
            samples_ms: busy,
            core_share_at_default_interval: pass_ms
                / 1e3
                / vipx::run::DEFAULT_CONNTRACK_GC_INTERVAL.as_secs_f64(),
        })
    })();
    let _ = std::fs::remove_dir_all(&pin_dir);
    let row = result?;
    println!(
        "conntrack collection over {} entries: {:.0} ms with {}% of flows ended, {:.0} ms with \
         none due (reading alone: {:.0} ms); {:.1}% of a core at the default {:?} interval",
        row.entries,
        row.pass_ms,
        row.expired_percent,
        row.idle_pass_ms,
        row.walk_ms,
        row.core_share_at_default_interval * 100.0,
        vipx::run::DEFAULT_CONNTRACK_GC_INTERVAL
    );
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&row)?)?;
    }
    Ok(())
}

fn packet(a: Args) -> Result<()> {
    let mut rows = Vec::new();
    for &n in &a.services {
        let pin_dir =
            PathBuf::from(loader::BPFFS).join(format!("vipx-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let sizes = MapSizes {
            services: (n * (a.backends + 1)).max(1024),
            backends: (n * a.backends + 2).max(1024),
            revnat: (n + 2).max(1024),
            // Room for the pressure rows' live entries without the LRU evicting them.
            conntrack: bench_conntrack_size(&a),
            maglev_table_size: proxy_common::defaults::MAGLEV_TABLE_SIZE,
            // One per service (none changes during the run).
            maglev_tables: if a.lb_algorithm == LbAlgorithm::Maglev {
                n + 2
            } else {
                0
            },
        };
        let result = (|| -> Result<()> {
            let mut ebpf = loader::load(&pin_dir, sizes)?;
            // The clock the programs read in production (jiffies), not the fallback.
            loader::write_clock(&mut ebpf)?;
            // The flood guard as vipx runs it while conntrack is below half full: off (its
            // check is one CONFIG read). Engaged (a limit no replayed packet reaches), it adds
            // its FLOOD4 lookup and atomic add, ~90-150 ns, to every new flow.
            loader::write_flood_limit(&mut ebpf, 0)?;
            let mut writer = MapWriter::new(loader::service_maps(&mut ebpf)?)?;
            writer.set_default_lb_algorithm(a.lb_algorithm);
            let mut t = Target::default();
            for i in 0..n {
                let slots: Vec<L4Addr> = (0..a.backends)
                    .map(|b| {
                        let (addr, port) = backend(i, b, a.backends);
                        L4Addr {
                            addr,
                            port,
                            proto: IPPROTO_TCP,
                        }
                    })
                    .collect();
                for s in &slots {
                    t.backends.insert(*s, BACKEND_F_ACTIVE);
                }
                t.frontends.insert(
                    L4Addr {
                        addr: vip(i).0,
                        port: vip(i).1,
                        proto: IPPROTO_TCP,
                    },
                    TargetFrontend {
                        service: ServicePortName {
                            namespace: "bench".into(),
                            name: format!("svc-{i}"),
                            port_name: String::new(),
                            protocol: Protocol::Tcp,
                        },
                        flags: SVC_F_CLUSTER_IP,
                        affinity_timeout_s: 0,
                        slots,
                        lb_algorithm: None,
                        source_ranges: Vec::new(),
                    },
                );
            }
            // BPF_PROG_TEST_RUN reruns the program on the same buffer, so a rewritten packet
            // would be seen rewritten by the next iteration. The measured service's backends are
            // therefore its own frontend: the program does the same lookups, checksum updates and
            // stores, and every iteration sees the original packet.
            // Local, so the node program (XDP) delivers to it rather than sending it on. Where
            // the cache-pressure rows run, every service but service 0 is made so: their flows
            // go to all of them, so the frontend, reverse-NAT, backend and Maglev entries they
            // read are as spread out as their conntrack entries. Service 0 keeps its backends:
            // the passthrough rows send from one of them.
            let spread = a.pressure_conntrack > 0 && n == a.pressure_services && n > 1;
            let own = if spread { 1..n } else { n / 2..n / 2 + 1 };
            for i in own {
                let s = L4Addr {
                    addr: vip(i).0,
                    port: vip(i).1,
                    proto: IPPROTO_TCP,
                };
                t.backends.insert(s, BACKEND_F_ACTIVE | BACKEND_F_LOCAL);
                if let Some(f) = t.frontends.get_mut(&s) {
                    f.slots = vec![s; a.backends as usize];
                }
            }
            let started = Instant::now();
            writer.apply(&t)?;
            eprintln!(
                "vipx-bench: {n} services x {} backends programmed in {:.0} ms",
                a.backends,
                started.elapsed().as_secs_f64() * 1e3
            );
            for name in [
                prog_names::POD_INGRESS,
                prog_names::POD_EGRESS,
                prog_names::NODE_TC,
            ] {
                let p: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name}"))?
                    .try_into()?;
                p.load()?;
            }
            for name in [prog_names::FLOOR, prog_names::NODE_XDP] {
                let x: &mut Xdp = ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name}"))?
                    .try_into()?;
                x.load().map_err(|e: ProgramError| anyhow::anyhow!(e))?;
            }
            let f: &mut SchedClassifier = ebpf
                .program_mut(prog_names::FLOOR_TC)
                .context("TC floor program")?
                .try_into()?;
            f.load()?;

            // The measured service sits in the middle of the table.
            let target = vip(n / 2);
            let syn = tcp(CLIENT, 40000, target.0.octets(), target.1, true);
            let est = tcp(CLIENT, 40000, target.0.octets(), target.1, false);
            // Opening the flow once creates both conntrack entries for `est` and `reply`.
            run_tc(&mut ebpf, prog_names::POD_INGRESS, &syn, 1)?;
            // The flow's backend is the frontend itself (see above), so its reply comes from there.
            let reply = tcp(target.0.octets(), target.1, CLIENT, 40000, false);
            let (pod, pod_port) = backend(0, 0, a.backends);
            let pass = tcp(CLIENT, 40001, pod.octets(), pod_port, false);
            // A packet into a pod that is no reply of a translated flow: from a pod's port that
            // is no backend's (the backend filter passes it), and from a backend's address and
            // port without a flow (the conntrack lookup must say so).
            let pass_in = tcp(pod.octets(), 45000, CLIENT, 40001, false);
            let pass_in_backend = tcp(pod.octets(), pod_port, CLIENT, 40001, false);
            let ingress = prog_names::POD_INGRESS;
            let egress = prog_names::POD_EGRESS;
            let node = prog_names::NODE_XDP;
            // The node program (XDP): an external client's flow to the same frontend (as a node
            // port or LoadBalancer IP would be), its backend on this node, so DNAT and pass.
            let ext_syn = tcp(EXTERNAL, 40002, target.0.octets(), target.1, true);
            let ext_est = tcp(EXTERNAL, 40002, target.0.octets(), target.1, false);
            run(&mut ebpf, node, &ext_syn, 1, XDP_PASS)?;
            let node_tc = prog_names::NODE_TC;
            let cases: [(&'static str, &str, &[u8], Option<Stat>); 12] = [
                ("passthrough", ingress, &pass, None),
                ("passthrough_egress", egress, &pass_in, None),
                ("passthrough_egress_backend", egress, &pass_in_backend, None),
                ("new_flow_syn", ingress, &syn, Some(Stat::NewFlows)),
                ("established", ingress, &est, Some(Stat::CtForward)),
                ("reply_revnat", egress, &reply, Some(Stat::CtReply)),
                ("node_passthrough", node, &pass, None),
                (
                    "node_new_flow_syn",
                    node,
                    &ext_syn,
                    Some(Stat::NodeNewLocal),
                ),
                (
                    "node_established",
                    node,
                    &ext_est,
                    Some(Stat::NodeTranslated),
                ),
                // The same program at TC ingress (where native XDP cannot attach).
                ("node_tc_passthrough", node_tc, &pass, None),
                (
                    "node_tc_new_flow_syn",
                    node_tc,
                    &ext_syn,
                    Some(Stat::NodeNewLocal),
                ),
                (
                    "node_tc_established",
                    node_tc,
                    &ext_est,
                    Some(Stat::NodeTranslated),
                ),
            ];
            let verdict = |prog: &str| if prog == node { XDP_PASS } else { TC_NEXT };
            let wanted = |case: &str| a.only.is_empty() || a.only.iter().any(|o| o == case);
            // Each case must take the path it is named after on every iteration.
            for (case, prog, pkt, stat) in &cases {
                let before = loader::read_stats(&ebpf)?;
                run(&mut ebpf, prog, pkt, 1000, verdict(prog))?;
                let after = loader::read_stats(&ebpf)?;
                let seen = if *prog == egress {
                    Stat::EgressPackets
                } else if *prog == node || *prog == node_tc {
                    Stat::NodePackets
                } else {
                    Stat::Packets
                };
                let cached = matches!(stat, Some(Stat::CtForward | Stat::CtReply));
                for ((s, b), (_, a)) in before.iter().zip(&after) {
                    // The flow cache serves an established flow's packets after the first of a
                    // tick: up to every one of them.
                    if *s == Stat::FlowCacheHit && cached && a - b <= 1000 {
                        continue;
                    }
                    let want = if Some(*s) == *stat || *s == seen {
                        1000
                    } else {
                        0
                    };
                    if a - b != want {
                        bail!(
                            "{case}: counter {} moved by {} (expected {want})",
                            s.name(),
                            a - b
                        );
                    }
                }
            }
            let mut floor = Vec::new();
            let mut floor_tc = Vec::new();
            let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
            // Interleave floor and cases so machine noise hits all of them alike.
            for _ in 0..a.reps {
                floor.push(run_floor(&mut ebpf, &pass, a.repeat)?);
                floor_tc.push(run(
                    &mut ebpf,
                    prog_names::FLOOR_TC,
                    &pass,
                    a.repeat,
                    TC_ACT_OK,
                )?);
                for (i, (case, prog, pkt, _)) in cases.iter().enumerate() {
                    if wanted(case) {
                        samples[i].push(run(&mut ebpf, prog, pkt, a.repeat, verdict(prog))?);
                    }
                }
            }
            let floor_ns = median(&mut floor.clone());
            for (i, (case, _, _, _)) in cases.iter().enumerate() {
                if !wanted(case) {
                    continue;
                }
                let ns = median(&mut samples[i].clone());
                rows.push(Row {
                    services: n,
                    backends_per_service: a.backends,
                    case,
                    ns_per_packet: ns,
                    floor_ns,
                    ratio_to_floor: ns / floor_ns,
                    samples_ns: samples[i].clone(),
                });
            }
            // New flows as they really come: every SYN a tuple never seen, so both conntrack
            // entries are inserted (a replayed SYN finds its entries and rewrites them in
            // place). One run per packet; the floor is measured the same way beside it, since
            // a single run carries the kernel's timer overhead.
            let mut distinct = Vec::new();
            let mut floor_single = Vec::new();
            for rep in 0..a.reps {
                if !wanted("new_flow_distinct") {
                    break;
                }
                let src = [198, 18, 201, rep as u8];
                let (mut sum, mut sum_floor) = (0.0, 0.0);
                for k in 0..DISTINCT_FLOWS {
                    let syn = tcp(src, 1024 + k, target.0.octets(), target.1, true);
                    sum += run_tc(&mut ebpf, ingress, &syn, 1)?;
                    sum_floor += run_floor(&mut ebpf, &syn, 1)?;
                }
                distinct.push(sum / f64::from(DISTINCT_FLOWS));
                floor_single.push(sum_floor / f64::from(DISTINCT_FLOWS));
            }
            if !distinct.is_empty() {
                let single_ns = median(&mut floor_single.clone());
                rows.push(Row {
                    services: n,
                    backends_per_service: a.backends,
                    case: "new_flow_distinct",
                    ns_per_packet: median(&mut distinct.clone()),
                    floor_ns: single_ns,
                    ratio_to_floor: median(&mut distinct.clone()) / single_ns,
                    samples_ns: distinct,
                });
                rows.push(Row {
                    services: n,
                    backends_per_service: a.backends,
                    case: "floor_xdp_single_run",
                    ns_per_packet: single_ns,
                    floor_ns: single_ns,
                    ratio_to_floor: 1.0,
                    samples_ns: floor_single,
                });
            }
            if a.pressure_conntrack > 0 && n == a.pressure_services {
                pressure(&mut ebpf, &pin_dir, &a, n, &mut rows)?;
            }
            let tc_ns = median(&mut floor_tc.clone());
            rows.push(Row {
                services: n,
                backends_per_service: a.backends,
                case: "floor_tc",
                ns_per_packet: tc_ns,
                floor_ns,
                ratio_to_floor: tc_ns / floor_ns,
                samples_ns: floor_tc,
            });
            rows.push(Row {
                services: n,
                backends_per_service: a.backends,
                case: "floor_xdp",
                ns_per_packet: floor_ns,
                floor_ns,
                ratio_to_floor: 1.0,
                samples_ns: floor,
            });
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&pin_dir);
        result?;
    }
    println!("| services | case | ns/packet | floor ns | x floor |");
    println!("|---:|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} |",
            r.services, r.case, r.ns_per_packet, r.floor_ns, r.ratio_to_floor
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

/// Service i and its EndpointSlice, as a cluster would hold them. Endpoint addresses stay inside
/// 198.18.0.0/16; the target port changes every 5,000 services so every endpoint is distinct.
fn objects(i: usize, endpoints: usize, shift: usize) -> Result<(Service, EndpointSlice)> {
    let (vip, port) = vip(i as u32);
    let target_port = 8000 + i / 5000;
    let endpoint = |b: usize| {
        Ipv4Addr::from(
            u32::from(Ipv4Addr::new(198, 18, 0, 1)) + ((i % 5000) * (endpoints + 1) + b) as u32,
        )
    };
    let svc: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i:06}"), "namespace": "bench"},
        "spec": {"type": "ClusterIP", "clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": target_port}]}
    }))?;
    let eps: Vec<serde_json::Value> = (0..endpoints)
        .map(|b| {
            // A shift replaces endpoint 0 with the spare address (index `endpoints`).
            let addr = endpoint(if b == 0 && shift > 0 { endpoints } else { b });
            serde_json::json!({"addresses": [addr.to_string()], "conditions": {"ready": true}, "nodeName": "bench-node"})
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i:06}-abcde"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i:06}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": target_port, "protocol": "TCP"}],
        "endpoints": eps
    }))?;
    Ok((svc, slice))
}

#[derive(Serialize)]
struct CpResult {
    services: usize,
    endpoints_per_service: usize,
    /// translate + target + apply from empty maps (median ms).
    full_sync_ms: f64,
    full_translate_ms: f64,
    full_apply_ms: f64,
    map_writes: usize,
    /// One endpoint of one service replaced: translate + target + apply (median ms).
    endpoint_change_ms: f64,
    endpoint_change_apply_ms: f64,
    endpoint_change_map_writes: usize,
    /// Resident memory of this process holding the objects, the desired state and the writer.
    rss_mib: f64,
    samples_full_ms: Vec<f64>,
    samples_change_ms: Vec<f64>,
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn control_plane(a: CpArgs) -> Result<()> {
    let mut services = Vec::with_capacity(a.services);
    let mut slices = Vec::with_capacity(a.services);
    for i in 0..a.services {
        let (s, e) = objects(i, a.endpoints, 0)?;
        services.push(s);
        slices.push(e);
    }
    let sizes = MapSizes {
        services: (a.services * (a.endpoints + 1) + 1024) as u32,
        backends: (a.services * (a.endpoints + 1) + 1024) as u32,
        revnat: (a.services + 1024) as u32,
        conntrack: 65_536,
        maglev_table_size: proxy_common::defaults::MAGLEV_TABLE_SIZE,
        // Two per service: one in use, one while it changes.
        maglev_tables: (2 * a.services + 1024) as u32,
    };
    let mut full = Vec::new();
    let mut full_tr = Vec::new();
    let mut full_apply = Vec::new();
    let mut change = Vec::new();
    let mut change_apply = Vec::new();
    let (mut writes, mut change_writes, mut rss) = (0, 0, 0.0);
    for rep in 0..a.reps {
        let pin_dir =
            PathBuf::from(loader::BPFFS).join(format!("vipx-bench-cp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let r = (|| -> Result<()> {
            let mut ebpf = loader::load(&pin_dir, sizes)?;
            // The clock the programs read in production (jiffies), not the fallback.
            loader::write_clock(&mut ebpf)?;
            let mut writer = MapWriter::new(loader::service_maps(&mut ebpf)?)?;
            // Full: every object is new, as at start-up or after a relist.
            let objs = ClusterObjects {
                services: services.clone(),
                slices: slices.clone(),
                ..ClusterObjects::default()
            };
            let t0 = Instant::now();
            let mut tracker = ChangeTracker::new("bench-node");
            tracker.replace_all(objs);
            let ch = tracker.flush();
            if !tracker.problems().is_empty() {
                bail!("unexpected problems: {:?}", tracker.problems().first());
            }
            let t1 = Instant::now();
            let st = writer.apply_keys(tracker.target(), &ch.frontends, &ch.backends)?;
            let t2 = Instant::now();
            full.push((t2 - t0).as_secs_f64() * 1e3);
            full_tr.push((t1 - t0).as_secs_f64() * 1e3);
            full_apply.push((t2 - t1).as_secs_f64() * 1e3);
            writes = st.map_writes;

            // One endpoint of the middle service replaced (a watch event for its slice).
            let mid = a.services / 2;
            let slice = objects(mid, a.endpoints, 1)?.1;
            let t0 = Instant::now();
            tracker.upsert_slice(slice);
            let ch = tracker.flush();
            let t1 = Instant::now();
            let st = writer.apply_keys(tracker.target(), &ch.frontends, &ch.backends)?;
            let t2 = Instant::now();
            change.push((t2 - t0).as_secs_f64() * 1e3);
            change_apply.push((t2 - t1).as_secs_f64() * 1e3);
            change_writes = st.map_writes;
            rss = rss_mib();
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&pin_dir);
        r?;
        eprintln!("vipx-bench: control plane rep {} of {}", rep + 1, a.reps);
    }
    let res = CpResult {
        services: a.services,
        endpoints_per_service: a.endpoints,
        full_sync_ms: median(&mut full.clone()),
        full_translate_ms: median(&mut full_tr),
        full_apply_ms: median(&mut full_apply),
        map_writes: writes,
        endpoint_change_ms: median(&mut change.clone()),
        endpoint_change_apply_ms: median(&mut change_apply),
        endpoint_change_map_writes: change_writes,
        rss_mib: rss,
        samples_full_ms: full,
        samples_change_ms: change,
    };
    println!("{}", serde_json::to_string_pretty(&res)?);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&res)?)?;
    }
    Ok(())
}
