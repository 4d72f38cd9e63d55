//! Builds a lab and keeps it up until Enter is pressed, to poke at it by hand:
//!
//! ```text
//! cargo build -p vipx-tests --bin lab-pod --example lab
//! target/debug/examples/lab [BACKENDS] [bench]
//! nsenter --net=/run/netns/vipx-manual-client curl http://198.18.64.11:5000/
//! ```
//!
//! Uses the fixed tag `manual`, so leftovers of a run killed with Ctrl-C are removed by the next.
//! `bench` builds it as `cargo xtask bench` builds its labs (no rp_filter, no netfilter, the
//! client's port range and TIME_WAIT reuse tuned for wrk), to take a bench figure apart by hand.

use std::io::BufRead;

use anyhow::{Context, Result};
use vipx_lab::{Lab, LabConfig, Realism, cleanup_stale, locate_lab_pod};

const TAG: &str = "manual";

fn main() -> Result<()> {
    let mut backends = 3;
    let mut bench = false;
    for arg in std::env::args().skip(1) {
        if arg == "bench" {
            bench = true;
        } else {
            backends = arg
                .parse()
                .with_context(|| format!("{arg:?} is neither a number of backends nor `bench`"))?;
        }
    }
    let realism = if bench { Realism::BENCH } else { Realism::Node };
    for ns in cleanup_stale(TAG)? {
        eprintln!("removed stale namespace {ns}");
    }
    let mut lab = Lab::create(LabConfig {
        tag: TAG.into(),
        backends,
        lab_pod_bin: locate_lab_pod()?,
        realism,
    })?;
    if bench {
        vipx_lab::load::tune_client(&lab.client().netns)?;
    }
    println!("node:   {} (vipx attaches to lxc*)", lab.node_ns());
    for pod in std::iter::once(lab.client()).chain(lab.backends()) {
        println!(
            "pod:    {:<10} {:<22} {:<15} host side {}",
            pod.name, pod.netns, pod.ip, pod.host_if
        );
    }
    println!("press Enter to tear down");
    std::io::stdin().lock().read_line(&mut String::new())?;
    lab.teardown()
}
