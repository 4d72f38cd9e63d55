//! The bench's load generators in the lab, without any proxy: from the client pod straight to one
//! backend pod, each pattern returns a positive rate without errors, and opens the connections it
//! claims to (one per request for CRR, one per wrk connection for RR).

use std::net::SocketAddr;
use std::time::Duration;

use vipx_lab::load::{self, TcpCounters};
use vipx_lab::pod_server::SINK_PORT;
use vipx_lab::{Lab, LabConfig, Realism, require_privileges, serial, unique_tag};

const RUN: Duration = Duration::from_secs(1);
const CONNECTIONS: u32 = 32;

#[test]
fn crr_rr_and_bulk_run_against_a_pod() {
    if !require_privileges() {
        return;
    }
    let _serial = serial();
    load::ensure_tools().expect("installing wrk and conntrack");
    let lab = Lab::create(LabConfig {
        tag: unique_tag(),
        backends: 2,
        lab_pod_bin: env!("CARGO_BIN_EXE_lab-pod").into(),
        realism: Realism::Node,
    })
    .expect("building the lab");
    let client = lab.client().netns.as_str();
    let backend = &lab.backends()[0];
    let http = backend.server_addr();
    let sink = SocketAddr::from((backend.ip, SINK_PORT));
    let settle_in = [client, lab.node_ns()];
    load::tune_client(client).expect("tuning the client namespace");
    let opens = || load::tcp_counters(&backend.netns).expect("backend TCP counters");
    let accepted = |before: TcpCounters| opens().passive_opens - before.passive_opens;

    load::settle(&settle_in).expect("settling");
    let before = opens();
    let report =
        load::wrk(client, load::Spread::one(&http), RUN, CONNECTIONS, true).expect("CRR run");
    let accepts = accepted(before);
    eprintln!("crr: {report:?}, {accepts} connections accepted");
    assert!(report.requests_per_sec > 0.0 && report.requests > 0);
    assert_eq!(report.errors(), 0, "{report:?}");
    // One connection per request, plus wrk's probe connection and those cut off by the end of
    // the run.
    assert!(
        accepts > report.requests && accepts <= report.requests + u64::from(CONNECTIONS) + 1,
        "{accepts} connections for {} requests",
        report.requests
    );

    load::settle(&settle_in).expect("settling");
    let before = opens();
    let rr = load::rr(client, load::Spread::one(&http), RUN, CONNECTIONS).expect("RR run");
    let accepts = accepted(before);
    eprintln!("rr: {rr}, {accepts} connections accepted");
    assert!(rr.value > 0.0 && rr.unit == "req/s");
    assert_eq!(rr.errors, 0, "{rr:?}");
    // Keep-alive: each of wrk's connections is opened once (plus its probe connection).
    assert!(
        accepts <= u64::from(CONNECTIONS) + 1,
        "{accepts} connections accepted for {CONNECTIONS} keep-alive connections"
    );

    load::settle(&settle_in).expect("settling");
    let crr = load::crr(client, load::Spread::one(&http), RUN, CONNECTIONS).expect("CRR run");
    eprintln!("crr: {crr}");
    assert!(crr.value > 0.0 && crr.unit == "conn/s");
    assert_eq!(crr.errors, 0, "{crr:?}");

    // A spread run: one thread per pod, each pod serves its thread's share.
    load::settle(&settle_in).expect("settling");
    let pods: Vec<SocketAddr> = lab.backends().iter().map(|b| b.server_addr()).collect();
    let each = |b: &vipx_lab::Pod| {
        load::tcp_counters(&b.netns)
            .expect("TCP counters")
            .passive_opens
    };
    let before: Vec<u64> = lab.backends().iter().map(each).collect();
    let spread =
        load::wrk(client, load::Spread::each(&pods), RUN, 2 * 2, true).expect("spread run");
    let after: Vec<u64> = lab.backends().iter().map(each).collect();
    eprintln!("spread crr: {spread:?}, accepted {before:?} -> {after:?}");
    assert_eq!(spread.errors(), 0, "{spread:?}");
    for (pod, (b, a)) in pods.iter().zip(before.iter().zip(&after)) {
        // Each thread's connections are all to its own pod, a connection per request.
        assert!(
            a - b > spread.requests / 4,
            "{pod} accepted {} of {} connections",
            a - b,
            spread.requests
        );
    }

    load::settle(&settle_in).expect("settling");
    let bulk = load::bulk(client, sink, RUN).expect("bulk run");
    eprintln!("bulk: {bulk}");
    assert!(bulk.value > 0.0 && bulk.unit == "Gbit/s");
    assert_eq!(bulk.errors, 0);
    assert!(bulk.duration >= RUN);
}
