//! `cargo xtask run --nodes N`: the seed's LoadBalancer Service on an N-node lab, one vipx per
//! node, and a client outside the cluster. The Service's two pods run on nodes 1 and 2; nodes 3
//! and up run none, so they show a node port and a load balancer address answering through a
//! node without a pod.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use vipx_lab::{
    Realism,
    cluster::{Cluster, ClusterConfig, LOAD_BALANCER_RANGE},
    manifests::{
        SEED_LB_CLUSTER_IP, SEED_LB_INGRESS_IP, SEED_LB_NAME, SEED_LB_NODE_PORT, SEED_LB_PORT,
        SEED_LB_TARGET_PORT, write_seed_load_balancer,
    },
    vipx::{ScratchDir, Vipx},
};

use crate::{DEMO_TAG, step, target_dir};

pub fn run(nodes: u8, vipx_args: &[String]) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let bin = target_dir().join("debug");
    let removed = vipx_lab::cleanup_stale(DEMO_TAG)?;
    if !removed.is_empty() {
        step(&format!(
            "removed a previous demo's namespaces: {}",
            removed.join(" ")
        ));
    }
    step(&format!(
        "creating a {nodes}-node lab: nodes on one segment with an external client, pods on \
         nodes 1 and 2"
    ));
    let mut cluster = Cluster::create(ClusterConfig {
        tag: DEMO_TAG.into(),
        lab_pod_bin: bin.join("lab-pod"),
        // A demo of real nodes: rp_filter=1 and conntrack dropping INVALID packets.
        realism: Realism::Node,
        nodes,
    })?;
    let mut endpoints = Vec::new();
    for node in [1, 2] {
        let pod = cluster.add_pod(node)?;
        // The seed's containers listen on port 80.
        cluster.add_pod_port(&pod, SEED_LB_TARGET_PORT)?;
        endpoints.push((pod.name.clone(), pod.ip, pod.node.clone()));
    }
    let manifests = ScratchDir::create(&format!("vipx-{DEMO_TAG}-cluster-manifests"))?;
    let file = write_seed_load_balancer(manifests.path(), &endpoints)?;
    step(&format!("wrote {} (the seed's Service)", file.display()));

    let vipx_bin = bin.join("vipx");
    let extra: Vec<&str> = vipx_args.iter().map(String::as_str).collect();
    let mut running = Vec::new();
    for node in cluster.nodes() {
        step(&format!("starting vipx on {}", node.name));
        running.push(Vipx::start_with(
            &vipx_bin,
            &node.name,
            manifests.path(),
            &extra,
        )?);
    }

    let ext = cluster.external();
    let lb = SocketAddr::from((SEED_LB_INGRESS_IP, SEED_LB_PORT));
    let mut answers = Vec::new();
    let mut wait_for = |ns: &str, to: SocketAddr, what: &str| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(body) = vipx_lab::http_get(ns, to, Duration::from_secs(2)) {
                answers.push(format!("{what}: {}", body.trim()));
                return Ok(());
            }
            if Instant::now() > deadline || stop.load(Ordering::SeqCst) {
                bail!("{what} ({to} from {ns}) did not answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(&ext, lb, "load balancer IP from outside, through node 1")?;
    for node in cluster.nodes() {
        let np = SocketAddr::from((node.ip, SEED_LB_NODE_PORT));
        wait_for(
            &ext,
            np,
            &format!("node port on node {} from outside", node.index),
        )?;
    }
    let last = cluster.node(nodes);
    let cip = SocketAddr::from((SEED_LB_CLUSTER_IP, SEED_LB_PORT));
    wait_for(
        last.netns(),
        cip,
        &format!("cluster IP from node {} itself", last.index),
    )?;

    let nsenter = |ns: &str| format!("nsenter --net=/run/netns/{ns}");
    println!();
    println!(
        "vipx serves {SEED_LB_NAME} (LoadBalancer {SEED_LB_INGRESS_IP}:{SEED_LB_PORT}, node \
         port {SEED_LB_NODE_PORT}, cluster IP {SEED_LB_CLUSTER_IP}) on {nodes} nodes; pods on \
         nodes 1 and 2."
    );
    for a in &answers {
        println!("  {a}");
    }
    println!();
    println!("From the external client (the load balancer range is routed to node 1):");
    println!(
        "  {} curl -s http://{SEED_LB_INGRESS_IP}:{SEED_LB_PORT}/",
        nsenter(&ext)
    );
    for node in cluster.nodes() {
        println!(
            "  {} curl -s http://{}:{SEED_LB_NODE_PORT}/    # node {}{}",
            nsenter(&ext),
            node.ip,
            node.index,
            if node.index > 2 { ", no pod" } else { "" }
        );
    }
    println!(
        "Send the load balancer range through node {nodes} instead:\n  {} ip route replace \
         {LOAD_BALANCER_RANGE} via {}",
        nsenter(&ext),
        last.ip
    );
    println!("From a node itself (host network):");
    println!(
        "  {} curl -s http://{SEED_LB_CLUSTER_IP}:{SEED_LB_PORT}/",
        nsenter(last.netns())
    );
    println!(
        "  {} curl -s http://127.0.0.1:{SEED_LB_NODE_PORT}/",
        nsenter(last.netns())
    );
    println!("Manifests: {}", manifests.path().display());
    println!();
    println!("Press Ctrl-C to stop every vipx, uninstall them and remove the lab.");
    while !stop.load(Ordering::SeqCst) {
        for v in &mut running {
            v.ensure_running()?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    step("stopping vipx on every node, uninstalling it and removing the lab");
    // Each vipx stops and runs `vipx cleanup` on drop, before the namespaces go.
    drop(running);
    drop(cluster);
    Ok(())
}
