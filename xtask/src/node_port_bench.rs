//! End to end through a node port: an external client dials node 1's address and node port, the
//! Service's ten pods all run on node 2, so every connection is translated on node 1 (DNAT to a
//! pod, SNAT to node 1's address) and crosses the wire twice each way, as kube-proxy's
//! externalTrafficPolicy Cluster does.
//!
//! One two-node cluster lab per contender, so that netfilter conntrack, which kube-proxy's rules
//! switch on, taxes only them:
//! - `routed`: no proxy; the client routes node 2's pod range via node 1 and dials a pod, and
//!   node 2 routes the client via node 1: the same hops both ways as through a proxy (client,
//!   node 1, node 2, pod), forwarded without translation. The floor the ratios are taken to.
//! - `vipx-native` / `vipx-generic`: vipx on node 1 with its node program in native or generic
//!   XDP on node 1's uplink.
//! - `iptables` / `nftables`: kube-proxy's rules for the same Services in node 1's namespace
//!   (`KUBE-NODEPORTS` -> `KUBE-EXT-*` -> masquerade, `--random-fully`).
//!
//! Node 2 runs no proxy in any contender: it only routes. Node 1 sends no ICMP redirects (it
//! would tell the routed client to go to node 2 directly).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use vipx_lab::{
    Realism,
    cluster::{Cluster, ClusterConfig},
    kube_rules::{self, KubeProxyOptions, RestoreMode, RuleService},
    load::{self, Measurement},
    netns::{ip_in, sysctls},
    pod_server::SINK_PORT,
};

use crate::bench::{Plan, Vipx, median, progress, services, start_vipx, write_manifests};
use crate::target_dir;

/// The measured Service's node ports: HTTP (the seed's) and the pods' discard port.
pub const NODE_PORT: u16 = 30_001;
pub const BULK_NODE_PORT: u16 = 30_000;
/// Every fifth other Service is a NodePort too, from this port on (at 10,000 Services: 2,000 of
/// the default range's 2,768).
const FILLER_NODE_PORT_BASE: u16 = 30_002;
const PODS: u32 = 10;
/// Every cluster's pods live here: node 1 has none of them.
const POD_NODE: u8 = 2;
const ENTRY_NODE: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    Routed,
    VipxNative,
    VipxGeneric,
    Iptables,
    Nftables,
}

impl Contender {
    pub const ALL: [Contender; 5] = [
        Contender::Routed,
        Contender::VipxNative,
        Contender::VipxGeneric,
        Contender::Iptables,
        Contender::Nftables,
    ];

    fn tag(self) -> &'static str {
        match self {
            Contender::Routed => "nprouted",
            Contender::VipxNative => "npxdp",
            Contender::VipxGeneric => "npxdpg",
            Contender::Iptables => "npipt",
            Contender::Nftables => "npnft",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Contender::Routed => "routed (no proxy)",
            Contender::VipxNative => "vipx, native XDP",
            Contender::VipxGeneric => "vipx, generic XDP",
            Contender::Iptables => "kube-proxy iptables",
            Contender::Nftables => "kube-proxy nftables",
        }
    }

    fn xdp_mode(self) -> Option<&'static str> {
        match self {
            Contender::VipxNative => Some("native"),
            Contender::VipxGeneric => Some("generic"),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct Row {
    pub services: usize,
    pub contender: Contender,
    pub metric: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub ratio_to_routed: f64,
    pub samples: Vec<f64>,
    pub errors: u64,
}

struct Lab {
    contender: Contender,
    cluster: Cluster,
}

impl Lab {
    fn create(contender: Contender) -> Result<Self> {
        vipx_lab::cleanup_stale(contender.tag())?;
        let mut cluster = Cluster::create(ClusterConfig {
            tag: contender.tag().into(),
            lab_pod_bin: target_dir().join("release").join("lab-pod"),
            realism: Realism::BENCH,
            nodes: 2,
        })?;
        for _ in 0..PODS {
            cluster.add_pod(POD_NODE)?;
        }
        let ext = cluster.external();
        load::tune_client(&ext)?;
        let entry = cluster.node(ENTRY_NODE).clone();
        sysctls(
            entry.netns(),
            &[
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.eth0.send_redirects", "0"),
            ],
        )?;
        if contender == Contender::Routed {
            let pods = cluster.node(POD_NODE).pod_cidr.clone();
            let via = entry.ip.to_string();
            ip_in(&ext, &["route", "add", &pods, "via", &via])?;
            let client = format!("{}/32", vipx_lab::cluster::EXTERNAL_CLIENT_IP);
            ip_in(
                cluster.node(POD_NODE).netns(),
                &["route", "add", &client, "via", &via],
            )?;
        }
        Ok(Self { contender, cluster })
    }

    fn entry_ns(&self) -> &str {
        self.cluster.node(ENTRY_NODE).netns()
    }

    fn pods(&self) -> Vec<(String, Ipv4Addr)> {
        self.cluster
            .pods()
            .iter()
            .map(|p| (p.name.clone(), p.ip))
            .collect()
    }

    /// (HTTP, bulk) targets the external client dials.
    fn targets(&self) -> (SocketAddr, SocketAddr) {
        if self.contender == Contender::Routed {
            let pod = self.cluster.pods()[0].ip;
            return (
                SocketAddr::from((pod, vipx_lab::POD_PORT)),
                SocketAddr::from((pod, SINK_PORT)),
            );
        }
        let node = self.cluster.node(ENTRY_NODE).ip;
        (
            SocketAddr::from((node, NODE_PORT)),
            SocketAddr::from((node, BULK_NODE_PORT)),
        )
    }

    fn wait_answers(&self) -> Result<()> {
        let (http, _) = self.targets();
        let ext = self.cluster.external();
        let deadline = Instant::now() + Duration::from_secs(30);
        while vipx_lab::http_get(&ext, http, Duration::from_millis(500)).is_err() {
            if Instant::now() > deadline {
                bail!("{} does not answer on {http}", self.contender.label());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn measure(&self, plan: &Plan) -> Result<[Measurement; 3]> {
        let ext = self.cluster.external();
        let (http, sink) = self.targets();
        let nss = [ext.as_str(), self.entry_ns()];
        load::settle(&nss)?;
        let crr = load::crr(&ext, load::Spread::one(&http), plan.crr, 32)?;
        load::settle(&nss)?;
        let rr = load::rr(&ext, load::Spread::one(&http), plan.rr, 32)?;
        load::settle(&nss)?;
        let bulk = load::bulk(&ext, sink, plan.bulk)?;
        Ok([crr, rr, bulk])
    }
}

/// `n` Services as in the ClusterIP bench, the measured one a NodePort with a bulk port, every
/// fifth other one a NodePort too.
fn node_port_services(n: usize, pods: &[(String, Ipv4Addr)]) -> Vec<RuleService> {
    let mut svcs = services(n, pods);
    let mut next = FILLER_NODE_PORT_BASE;
    for (i, s) in svcs.iter_mut().enumerate() {
        if s.name == "measured" {
            s.node_port = Some(NODE_PORT);
        } else if i % 5 == 0 && next <= 32_767 {
            s.node_port = Some(next);
            next += 1;
        }
    }
    if let Some(m) = svcs.iter().find(|s| s.name == "measured").cloned() {
        svcs.push(RuleService {
            port_name: "bulk".into(),
            port: SINK_PORT,
            endpoints: m.endpoints.iter().map(|(ip, _)| (*ip, SINK_PORT)).collect(),
            node_port: Some(BULK_NODE_PORT),
            ..m
        });
    }
    svcs
}

/// kube-proxy's options on node 1: the node-port address is node 1's.
fn kube_proxy_options(lab: &Lab) -> KubeProxyOptions {
    KubeProxyOptions {
        nodeport_ips: vec![lab.cluster.node(ENTRY_NODE).ip],
        ..KubeProxyOptions::lab(kube_rules::CLUSTER_CIDR)
    }
}

/// The runs of `plan`; `done` gets every row so far after each service count.
pub fn run(plan: &Plan, mut done: impl FnMut(&[Row]) -> Result<()>) -> Result<Vec<Row>> {
    kube_rules::ensure_tools()?;
    load::ensure_tools()?;
    progress(&format!(
        "node ports: five two-node labs ({}), {PODS} pods on node 2 each",
        Contender::ALL.map(Contender::label).join(", ")
    ));
    let labs: Vec<Lab> = Contender::ALL
        .into_iter()
        .map(Lab::create)
        .collect::<Result<_>>()?;
    let get = |c: Contender| {
        labs.iter()
            .find(|l| l.contender == c)
            .expect("every contender has a lab")
    };
    let mut rows = Vec::new();
    for &n in plan.e2e_services {
        let mut vipx: Vec<Vipx> = Vec::new();
        for lab in &labs {
            let svcs = node_port_services(n, &lab.pods());
            let ns = lab.entry_ns().to_owned();
            match lab.contender {
                Contender::Routed => {}
                Contender::Iptables => {
                    kube_rules::flush_iptables(&ns)?;
                    progress(&format!(
                        "{n} services: iptables-restore of kube-proxy's rules"
                    ));
                    kube_rules::load_iptables_with(
                        &ns,
                        &kube_rules::iptables_restore_input_with(&svcs, &kube_proxy_options(lab)),
                        RestoreMode::Replace,
                    )?;
                }
                Contender::Nftables => {
                    kube_rules::flush_nft(&ns)?;
                    progress(&format!("{n} services: nft -f of kube-proxy's rules"));
                    kube_rules::load_nft(
                        &ns,
                        &kube_rules::nft_input_with(&svcs, &kube_proxy_options(lab)),
                    )?;
                }
                Contender::VipxNative | Contender::VipxGeneric => {
                    let mode = lab.contender.xdp_mode().expect("a vipx contender");
                    let dir =
                        target_dir().join(format!("vipx-bench-{}-manifests", lab.contender.tag()));
                    let pod_node = lab.cluster.node(POD_NODE).name.clone();
                    write_manifests(&dir, &svcs, &pod_node)?;
                    progress(&format!("{n} services: vipx on node 1, {mode} XDP"));
                    let node = lab.cluster.node(ENTRY_NODE).name.clone();
                    let (v, _) = start_vipx(
                        &ns,
                        &node,
                        ("--manifests", &dir),
                        vipx_lab::HOST_IF_GLOB,
                        // Socket-level LB off: its programs at the cgroup root would run on
                        // every contender's connect() (the external client is no host process).
                        &[
                            "--node-interfaces",
                            "eth0",
                            "--node-xdp-mode",
                            mode,
                            "--socket-lb",
                            "off",
                        ],
                    )?;
                    vipx.push(v);
                }
            }
        }
        for lab in &labs {
            lab.wait_answers()?;
        }

        let mut samples: Vec<(Contender, [Vec<Measurement>; 3])> = Contender::ALL
            .iter()
            .map(|c| (*c, [vec![], vec![], vec![]]))
            .collect();
        for rep in 0..plan.reps {
            for (c, s) in samples.iter_mut() {
                progress(&format!(
                    "node ports, {n} services, rep {}/{}: {}",
                    rep + 1,
                    plan.reps,
                    c.label()
                ));
                let m = get(*c).measure(plan).with_context(|| c.label())?;
                for (k, m) in m.into_iter().enumerate() {
                    s[k].push(m);
                }
            }
        }
        drop(vipx);
        let routed: Vec<f64> = samples[0]
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
                rows.push(Row {
                    services: n,
                    contender: *c,
                    metric: (*metric).to_owned(),
                    unit: s[k].first().map_or("", |m| m.unit).to_owned(),
                    median: med,
                    min: vals.iter().copied().fold(f64::INFINITY, f64::min),
                    max: vals.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    ratio_to_routed: if routed[k] > 0.0 {
                        med / routed[k]
                    } else {
                        0.0
                    },
                    samples: vals,
                    errors: s[k].iter().map(|m| m.errors).sum(),
                });
            }
        }
        kube_rules::flush_iptables(get(Contender::Iptables).entry_ns())?;
        kube_rules::flush_nft(get(Contender::Nftables).entry_ns())?;
        done(&rows)?;
    }
    Ok(rows)
}

/// The rows as a markdown section.
pub fn markdown(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Through a node port (external client -> node 1 -> pod on node 2; median \
         [min-max]; x = ratio to routed)\n"
    );
    let _ = writeln!(
        s,
        "| services | metric | {} |",
        Contender::ALL.map(Contender::label).join(" | ")
    );
    let _ = writeln!(s, "|---:|---|{}", "---:|".repeat(Contender::ALL.len()));
    let mut counts: Vec<usize> = rows.iter().map(|r| r.services).collect();
    counts.dedup();
    for n in counts {
        for metric in ["short_connections", "keepalive_requests", "bulk"] {
            let cells: Vec<String> = Contender::ALL
                .iter()
                .map(|c| {
                    rows.iter()
                        .find(|r| r.services == n && r.metric == metric && r.contender == *c)
                        .map_or_else(String::new, |r| {
                            let errors = if r.errors > 0 {
                                format!(", {} errors", r.errors)
                            } else {
                                String::new()
                            };
                            // Gbit/s wants decimals; conn/s and req/s do not.
                            let p = usize::from(r.median < 100.0) * 2;
                            format!(
                                "{:.p$} {} [{:.p$}-{:.p$}] ({:.2}x{errors})",
                                r.median, r.unit, r.min, r.max, r.ratio_to_routed
                            )
                        })
                })
                .collect();
            let _ = writeln!(s, "| {n} | {metric} | {} |", cells.join(" | "));
        }
    }
    s
}
