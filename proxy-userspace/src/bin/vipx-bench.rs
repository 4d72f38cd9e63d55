//! Per-packet cost of the real pod program through BPF_PROG_TEST_RUN, beside a trivial XDP
//! program (one array lookup, XDP_PASS) measured in the same run: the floor. Run by
//! `cargo xtask bench`; each figure is the median of `--reps` runs of `--repeat` packets.

use std::{net::Ipv4Addr, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, TestRunOptions,
    programs::{ProgramError, SchedClassifier, TestRun as _, Xdp},
};
use clap::Parser;
use etherparse::PacketBuilder;
use proxy_common::{BACKEND_F_ACTIVE, IPPROTO_TCP, SVC_F_CLUSTER_IP, Stat, prog_names};
use serde::Serialize;
use vipx::{
    desired::{Protocol, ServicePortName},
    loader::{self, MapSizes},
    maps::{L4Addr, MapWriter, Target, TargetFrontend},
};

#[derive(Parser)]
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
}

const TC_ACT_OK: u32 = 0;
const XDP_PASS: u32 = 2;
const CLIENT: [u8; 4] = [198, 18, 200, 2];

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

fn run_tc(ebpf: &mut Ebpf, pkt: &[u8], repeat: u32, want: u32) -> Result<f64> {
    run_classifier(ebpf, prog_names::POD_INGRESS, pkt, repeat, want)
}

fn run_classifier(ebpf: &mut Ebpf, prog: &str, pkt: &[u8], repeat: u32, want: u32) -> Result<f64> {
    let p: &mut SchedClassifier = ebpf.program_mut(prog).context("pod program")?.try_into()?;
    let mut out = vec![0u8; pkt.len() + 64];
    let r = p.test_run(TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    })?;
    if r.return_value != want {
        bail!("verdict {} (expected {want})", r.return_value);
    }
    if out[..r.data_size_out as usize] != *pkt {
        bail!("the packet changed across iterations; the figure would not be per-packet cost");
    }
    Ok(r.duration.as_nanos() as f64)
}

fn run_floor(ebpf: &mut Ebpf, pkt: &[u8], repeat: u32) -> Result<f64> {
    let p: &mut Xdp = ebpf
        .program_mut(prog_names::FLOOR)
        .context("floor program")?
        .try_into()?;
    let mut out = vec![0u8; pkt.len() + 64];
    let r = p.test_run(TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    })?;
    if r.return_value != XDP_PASS {
        bail!("floor verdict {}", r.return_value);
    }
    Ok(r.duration.as_nanos() as f64)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut rows = Vec::new();
    for &n in &a.services {
        let pin_dir =
            PathBuf::from(loader::BPFFS).join(format!("vipx-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let sizes = MapSizes {
            services: (n * (a.backends + 1)).max(1024),
            backends: (n * a.backends + 2).max(1024),
            revnat: (n + 2).max(1024),
            conntrack: 65_536,
        };
        let result = (|| -> Result<()> {
            let mut ebpf = loader::load(&pin_dir, sizes)?;
            let mut writer = MapWriter::new(loader::service_maps(&mut ebpf)?)?;
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
                    },
                );
            }
            // BPF_PROG_TEST_RUN reruns the program on the same buffer, so a rewritten packet
            // would be seen rewritten by the next iteration. The measured service's backends are
            // therefore its own frontend: the program does the same lookups, checksum updates and
            // stores, and every iteration sees the original packet.
            let measured = L4Addr {
                addr: vip(n / 2).0,
                port: vip(n / 2).1,
                proto: IPPROTO_TCP,
            };
            t.backends.insert(measured, BACKEND_F_ACTIVE);
            if let Some(f) = t.frontends.get_mut(&measured) {
                f.slots = vec![measured; a.backends as usize];
            }
            let started = Instant::now();
            writer.apply(&t)?;
            eprintln!(
                "vipx-bench: {n} services x {} backends programmed in {:.0} ms",
                a.backends,
                started.elapsed().as_secs_f64() * 1e3
            );
            let p: &mut SchedClassifier = ebpf
                .program_mut(prog_names::POD_INGRESS)
                .context("pod program")?
                .try_into()?;
            p.load()?;
            let x: &mut Xdp = ebpf
                .program_mut(prog_names::FLOOR)
                .context("floor program")?
                .try_into()?;
            x.load().map_err(|e: ProgramError| anyhow::anyhow!(e))?;
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
            run_tc(&mut ebpf, &syn, 1, TC_ACT_OK)?;
            // The flow's backend is the frontend itself (see above), so its reply comes from there.
            let reply = tcp(target.0.octets(), target.1, CLIENT, 40000, false);
            let (pod, pod_port) = backend(0, 0, a.backends);
            let pass = tcp(CLIENT, 40001, pod.octets(), pod_port, false);
            let cases: [(&'static str, &[u8], Option<Stat>); 4] = [
                ("passthrough", &pass, None),
                ("new_flow_syn", &syn, Some(Stat::NewFlows)),
                ("established", &est, Some(Stat::CtForward)),
                ("reply_revnat", &reply, Some(Stat::CtReply)),
            ];
            // Each case must take the path it is named after on every iteration.
            for (case, pkt, stat) in &cases {
                let before = loader::read_stats(&ebpf)?;
                run_tc(&mut ebpf, pkt, 1000, TC_ACT_OK)?;
                let after = loader::read_stats(&ebpf)?;
                for ((s, b), (_, a)) in before.iter().zip(&after) {
                    let want = if Some(*s) == *stat || *s == Stat::Packets {
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
                floor_tc.push(run_classifier(
                    &mut ebpf,
                    prog_names::FLOOR_TC,
                    &pass,
                    a.repeat,
                    TC_ACT_OK,
                )?);
                for (i, (_, pkt, _)) in cases.iter().enumerate() {
                    samples[i].push(run_tc(&mut ebpf, pkt, a.repeat, TC_ACT_OK)?);
                }
            }
            let floor_ns = median(&mut floor.clone());
            for (i, (case, _, _)) in cases.iter().enumerate() {
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
