//! `vipx run --kubeconfig` in the lab (real kernel, privileged): the seed's simpleapi-service
//! served from the in-process API server, scaled 1 -> 2 -> 1 and deleted, each followed within a
//! second in the kernel maps and by real HTTP traffic; and the API server going away (the data
//! path keeps serving the last programmed state) and coming back with its history compacted (a
//! relist after 410 Gone) with the maps exact again.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vipx_lab::apiserver::{ApiServer, Resource};
use vipx_lab::manifests::{
    ENDPOINT_SLICE_NAME, SERVICE_NAMESPACE, SERVICE_YAML, endpoint_slice_yaml,
};
use vipx_lab::vipx::{Vipx, locate_bin};
use vipx_lab::{
    Lab, LabConfig, POD_PORT, Realism, SERVICE_NAME, SERVICE_PORT, SERVICE_VIP, http_get,
    require_privileges, serial, unique_tag,
};

/// One request through the VIP; the lab answers in milliseconds.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Loading, attaching and the first list.
const READY: Duration = Duration::from_secs(20);
/// What "follows within a second" means here.
const FOLLOW: Duration = Duration::from_secs(1);
const FRONTEND: &str = "198.19.0.10:80/TCP";

fn vip() -> SocketAddr {
    SocketAddr::from((SERVICE_VIP, SERVICE_PORT))
}

fn yaml_to_json(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("valid YAML")
}

/// The lab, its API server (inside the node's namespace, where vipx reaches it at 127.0.0.1)
/// and vipx. Fields drop in order: vipx stops first, the namespaces go last.
struct KubeLab {
    vipx: Vipx,
    api: ApiServer,
    lab: Lab,
}

impl KubeLab {
    fn start(backends: u32, endpoints: usize) -> Self {
        let lab = Lab::create(LabConfig {
            tag: unique_tag(),
            backends,
            lab_pod_bin: locate_bin("lab-pod").expect("lab-pod built"),
            realism: Realism::Node,
        })
        .expect("lab");
        let api = ApiServer::start_in(Some(lab.node_ns())).expect("API server in the node");
        api.apply(
            Resource::Nodes,
            json!({"metadata": {"name": lab.node_name()}}),
        )
        .unwrap();
        api.apply(Resource::Services, yaml_to_json(SERVICE_YAML))
            .unwrap();
        let vipx = Vipx::start_kube(
            &locate_bin("vipx").expect("vipx built"),
            lab.node_ns(),
            &api.kubeconfig(),
            // The batching bound is kube-proxy's business; this measures following the API.
            &["--min-sync-period", "100ms"],
        )
        .expect("vipx");
        let l = Self { vipx, api, lab };
        l.set_endpoints(endpoints);
        l
    }

    fn endpoints(&self, n: usize) -> Vec<(String, Ipv4Addr)> {
        self.lab.backend_endpoints()[..n].to_vec()
    }

    fn set_endpoints(&self, n: usize) {
        let slice = endpoint_slice_yaml(&self.endpoints(n), self.lab.node_name()).unwrap();
        self.api
            .apply(Resource::EndpointSlices, yaml_to_json(&slice))
            .unwrap();
    }

    /// The backends `vipx services` shows for the TCP frontend (`None`: no such frontend).
    fn programmed(&self) -> Option<BTreeSet<String>> {
        let text = self.vipx.services().ok()?;
        let line = text.lines().find(|l| l.contains(FRONTEND))?;
        Some(
            line.split_whitespace()
                .filter(|w| w.ends_with(&format!(":{POD_PORT}")))
                .map(str::to_owned)
                .collect(),
        )
    }

    fn want(&self, n: usize) -> Option<BTreeSet<String>> {
        Some(
            self.endpoints(n)
                .iter()
                .map(|(_, ip)| format!("{ip}:{POD_PORT}"))
                .collect(),
        )
    }

    /// Waits until the kernel maps hold exactly `want`; returns how long that took.
    fn wait_maps(&mut self, want: &Option<BTreeSet<String>>, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            self.vipx.ensure_running().expect("vipx runs");
            let got = self.programmed();
            if &got == want {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "maps not {want:?} within {timeout:?}: {got:?}\nvipx log:\n{}",
                self.vipx.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pods answering `n` new TCP connections through the VIP.
    fn answering(&self, n: usize) -> BTreeSet<String> {
        (0..n)
            .map(|_| {
                http_get(&self.lab.client().netns, vip(), TIMEOUT)
                    .expect("HTTP through the VIP")
                    .trim()
                    .to_owned()
            })
            .collect()
    }

    fn pods(&self, n: usize) -> BTreeSet<String> {
        self.endpoints(n)
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }
}

#[test]
fn serves_simpleapi_from_the_api_and_follows_scaling_and_deletion() {
    if !require_privileges() {
        return;
    }
    let _g = serial();
    let mut l = KubeLab::start(2, 1);
    let want = l.want(1);
    l.wait_maps(&want, READY);
    assert_eq!(l.answering(10), l.pods(1));

    for n in [2, 1] {
        l.set_endpoints(n);
        let want = l.want(n);
        let took = l.wait_maps(&want, FOLLOW);
        eprintln!("scaled to {n}: maps followed in {took:?}");
        assert_eq!(l.answering(40), l.pods(n), "scaled to {n}");
    }

    assert!(
        l.api
            .delete(Resource::Services, SERVICE_NAMESPACE, SERVICE_NAME)
    );
    let took = l.wait_maps(&None, FOLLOW);
    eprintln!("deleted: maps followed in {took:?}");
    assert!(http_get(&l.lab.client().netns, vip(), TIMEOUT).is_err());
}

#[test]
fn survives_the_api_going_away_and_relists_when_it_returns() {
    if !require_privileges() {
        return;
    }
    let _g = serial();
    let mut l = KubeLab::start(2, 2);
    let want = l.want(2);
    l.wait_maps(&want, READY);

    // The API server goes away: vipx notices, keeps the maps, and traffic keeps flowing.
    l.api.stop();
    l.vipx
        .wait_log("the API server cannot be watched", READY)
        .expect("vipx notices the API server is gone");
    assert_eq!(l.programmed(), want, "fail static: the maps stay");
    assert_eq!(l.answering(40), l.pods(2), "the data path keeps serving");

    // Meanwhile the Service is scaled to one and the history compacted: when the API server
    // returns, the watchers get 410 Gone and relist.
    l.set_endpoints(1);
    l.api.compact();
    l.api.restart().expect("API server back on its port");
    let want = l.want(1);
    l.wait_maps(&want, READY);
    l.vipx
        .wait_log("relisted", READY)
        .expect("a relist after 410 Gone");
    l.vipx
        .wait_log("watching the API server again", READY)
        .expect("reconnected");
    assert_eq!(l.answering(20), l.pods(1));

    // Deleted while down, without compaction this time: replayed on the resumed watch.
    l.api.stop();
    assert!(l.api.delete(
        Resource::EndpointSlices,
        SERVICE_NAMESPACE,
        ENDPOINT_SLICE_NAME
    ));
    l.api.restart().expect("API server back");
    l.wait_maps(&Some(BTreeSet::new()), READY);
}
