//! vipx's Kubernetes API source against the in-process API server (no privileges, no kernel):
//! the production client (kube-rs through a kubeconfig naming `http://127.0.0.1:PORT`) feeds
//! the change tracker, and after every step the tracker's target must equal a full translation
//! of what the server holds.

use std::time::Duration;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};
use vipx::{
    maps::{self, Target},
    source::kube::{self, Applied, KubeState, Update},
    sync::ChangeTracker,
    translate::{self, ClusterInput},
};
use vipx_lab::apiserver::{ApiServer, Resource};

const NODE: &str = "node-a";
/// How long a step may take to show (the watchers' backoff starts under a second).
const STEP: Duration = Duration::from_secs(20);

fn service(name: &str, vip: &str, labels: Value) -> Value {
    json!({
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
        },
        "spec": {
            "clusterIP": vip,
            "clusterIPs": [vip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

/// An endpoint: (ip, ready, serving, terminating).
type Ep<'a> = (&'a str, bool, bool, bool);

fn ready(ip: &str) -> Ep<'_> {
    (ip, true, true, false)
}

fn slice(name: &str, svc: &str, eps: &[Ep<'_>]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, ready, serving, terminating)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": NODE,
            })
        })
        .collect();
    json!({
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn node() -> Value {
    json!({"metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "z1"}}})
}

fn typed<T: serde::de::DeserializeOwned>(objs: Vec<Value>) -> Vec<T> {
    objs.into_iter()
        .map(|o| serde_json::from_value(o).expect("the server holds valid objects"))
        .collect()
}

/// What a full translation of the server's objects gives, as the API source would see them
/// (the label selectors applied: Services of another proxy and headless-labelled ones are not
/// listed, slices without a Service name neither).
fn expected(api: &ApiServer) -> Target {
    let services: Vec<Service> = typed::<Service>(api.objects(Resource::Services))
        .into_iter()
        .filter(|s| {
            s.metadata.labels.as_ref().is_none_or(|l| {
                !l.contains_key("service.kubernetes.io/service-proxy-name")
                    && !l.contains_key("service.kubernetes.io/headless")
            })
        })
        .collect();
    let slices: Vec<EndpointSlice> = typed(api.objects(Resource::EndpointSlices));
    let nodes: Vec<Node> = typed::<Node>(api.objects(Resource::Nodes))
        .into_iter()
        .filter(|n| n.metadata.name.as_deref() == Some(NODE))
        .collect();
    let tr = translate::translate(
        &ClusterInput {
            services: &services,
            slices: &slices,
            nodes: &nodes,
        },
        NODE,
    );
    maps::target(&tr.state).0
}

/// The API source as `vipx run` drives it, minus the kernel.
struct Source {
    updates: std::pin::Pin<Box<dyn Stream<Item = Update> + Send>>,
    state: KubeState,
    tracker: ChangeTracker,
    relists: usize,
    errors: usize,
}

impl Source {
    async fn start(api: &ApiServer) -> Self {
        let client = kube::client(Some(&api.kubeconfig()))
            .await
            .expect("client from the test kubeconfig");
        Self {
            updates: Box::pin(kube::watch(client, NODE)),
            state: KubeState::default(),
            tracker: ChangeTracker::new(NODE),
            relists: 0,
            errors: 0,
        }
    }

    /// Applies updates until the tracker's target equals `want` (and the source is ready).
    async fn converge(&mut self, want: &Target, what: &str) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if self.state.ready() {
                self.tracker.flush();
                if self.tracker.target() == want {
                    return;
                }
            }
            let next = tokio::time::timeout_at(deadline, self.updates.next()).await;
            let Ok(Some(u)) = next else {
                panic!(
                    "{what}: not converged within {STEP:?}; ready={} target={:#?} want={want:#?}",
                    self.state.ready(),
                    self.tracker.target()
                );
            };
            self.apply(u);
        }
    }

    fn apply(&mut self, u: Update) {
        if matches!(u, Update::Error(..)) {
            self.errors += 1;
        }
        if let Applied::Relisted(_) = self.state.apply(u, &mut self.tracker) {
            self.relists += 1;
        }
    }

    /// Applies updates until `pred` holds.
    async fn until(&mut self, what: &str, mut pred: impl FnMut(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + STEP;
        while !pred(self) {
            match tokio::time::timeout_at(deadline, self.updates.next()).await {
                Ok(Some(u)) => self.apply(u),
                _ => panic!("{what}: not within {STEP:?}"),
            }
        }
    }
}

fn frontend_slots(t: &Target) -> Vec<usize> {
    t.frontends.values().map(|f| f.slots.len()).collect()
}

#[tokio::test]
async fn follows_create_slices_scale_terminating_and_delete() {
    let api = ApiServer::start().unwrap();
    api.apply(Resource::Nodes, node()).unwrap();
    api.apply(Resource::Services, service("web", "10.96.0.10", json!({})))
        .unwrap();
    api.apply(
        Resource::EndpointSlices,
        slice("web-a", "web", &[ready("10.0.0.1")]),
    )
    .unwrap();
    let mut src = Source::start(&api).await;

    // Create.
    let want = expected(&api);
    assert_eq!(frontend_slots(&want), vec![1]);
    src.converge(&want, "create").await;

    // A second slice of the same Service.
    api.apply(
        Resource::EndpointSlices,
        slice("web-b", "web", &[ready("10.0.0.2")]),
    )
    .unwrap();
    let want = expected(&api);
    assert_eq!(frontend_slots(&want), vec![2]);
    src.converge(&want, "second slice").await;

    // Scale up one slice.
    api.apply(
        Resource::EndpointSlices,
        slice("web-a", "web", &[ready("10.0.0.1"), ready("10.0.0.3")]),
    )
    .unwrap();
    let want = expected(&api);
    assert_eq!(frontend_slots(&want), vec![3]);
    src.converge(&want, "scale up").await;

    // One endpoint terminating: no slot, but kept for its flows.
    api.apply(
        Resource::EndpointSlices,
        slice(
            "web-a",
            "web",
            &[ready("10.0.0.1"), ("10.0.0.3", false, true, true)],
        ),
    )
    .unwrap();
    let want = expected(&api);
    assert_eq!(frontend_slots(&want), vec![2]);
    assert_eq!(want.backends.len(), 3);
    src.converge(&want, "terminating").await;

    // Scale down: a slice deleted.
    assert!(api.delete(Resource::EndpointSlices, "default", "web-b"));
    let want = expected(&api);
    assert_eq!(frontend_slots(&want), vec![1]);
    src.converge(&want, "slice deleted").await;

    // A Service of another proxy and a headless-labelled one are not even listed.
    api.apply(
        Resource::Services,
        service(
            "other",
            "10.96.0.11",
            json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
        ),
    )
    .unwrap();
    api.apply(
        Resource::Services,
        service(
            "hl",
            "10.96.0.12",
            json!({"service.kubernetes.io/headless": ""}),
        ),
    )
    .unwrap();
    // Bookmarks change nothing.
    api.bookmark();
    let want = expected(&api);
    assert_eq!(want.frontends.len(), 1);
    src.converge(&want, "selectors").await;
    assert!(
        api.requests().iter().any(|r| r.contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless")),
        "{:?}",
        api.requests()
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("allowWatchBookmarks=true")),
        "{:?}",
        api.requests()
    );
    // Slices with kube-proxy's exclusions too: headless and other proxies' slices never arrive.
    assert!(
        api.requests().iter().any(|r| r.contains("endpointslices")
            && r.contains("labelSelector=kubernetes.io%2Fservice-name%2C%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless")),
        "{:?}",
        api.requests()
    );

    // Delete the Service.
    assert!(api.delete(Resource::Services, "default", "web"));
    let want = expected(&api);
    assert!(want.frontends.is_empty());
    src.converge(&want, "service deleted").await;
    assert_eq!(src.tracker.target(), &Target::default());
    assert_eq!(src.relists, 3, "one first list per kind, no relist");
}

#[tokio::test]
async fn relists_after_410_and_forgets_what_was_deleted_while_down() {
    let api = ApiServer::start().unwrap();
    api.apply(Resource::Nodes, node()).unwrap();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        api.apply(
            Resource::Services,
            service(name, &format!("10.96.0.{}", 10 + i), json!({})),
        )
        .unwrap();
        api.apply(
            Resource::EndpointSlices,
            slice(&format!("{name}-1"), name, &[ready(&format!("10.0.1.{i}"))]),
        )
        .unwrap();
    }
    let mut src = Source::start(&api).await;
    src.converge(&expected(&api), "start").await;
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count();

    // The API server goes away; meanwhile one Service and one slice are deleted, another slice
    // changes, and the history is compacted past the watchers' resourceVersions.
    let mut api = api;
    api.stop();
    assert!(api.delete(Resource::Services, "default", "b"));
    assert!(api.delete(Resource::EndpointSlices, "default", "b-1"));
    api.apply(
        Resource::EndpointSlices,
        slice("c-1", "c", &[ready("10.0.1.2"), ready("10.0.1.9")]),
    )
    .unwrap();
    api.compact();
    // Errors while it is down; the tracker keeps what it had (fail static).
    let before = src.tracker.target().clone();
    src.until("an error while the API is down", |s| s.errors > 0)
        .await;
    src.tracker.flush();
    assert_eq!(src.tracker.target(), &before);
    assert!(!src.state.connected());

    api.restart().unwrap();
    let want = expected(&api);
    assert_eq!(want.frontends.len(), 2);
    src.converge(&want, "relist after 410").await;
    // The Node watcher relists too (its history went with the compaction).
    src.until("every kind relisted", |s| s.relists >= 6).await;
    src.tracker.flush();
    assert_eq!(src.tracker.target(), &want);
    assert!(src.state.connected());
    let lists_after = api
        .requests()
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count();
    assert!(lists_after >= lists_before + 3, "{:?}", api.requests());
}

#[tokio::test]
async fn a_dropped_watch_resumes_and_replays_what_was_missed() {
    let mut api = ApiServer::start().unwrap();
    api.apply(Resource::Nodes, node()).unwrap();
    api.apply(Resource::Services, service("web", "10.96.0.10", json!({})))
        .unwrap();
    api.apply(
        Resource::EndpointSlices,
        slice("web-a", "web", &[ready("10.0.0.1"), ready("10.0.0.2")]),
    )
    .unwrap();
    let mut src = Source::start(&api).await;
    src.converge(&expected(&api), "start").await;

    // Dropped watches: the watchers watch again from their resourceVersion, no relist.
    api.drop_watches();
    api.apply(
        Resource::EndpointSlices,
        slice("web-a", "web", &[ready("10.0.0.1")]),
    )
    .unwrap();
    src.converge(&expected(&api), "after a dropped watch").await;

    // Down and back without compaction: an object deleted meanwhile comes as a replayed DELETED.
    api.stop();
    assert!(api.delete(Resource::EndpointSlices, "default", "web-a"));
    api.restart().unwrap();
    let want = expected(&api);
    assert_eq!(frontend_slots(&want), vec![0]);
    src.converge(&want, "deleted while down").await;
    assert_eq!(src.relists, 3, "resumed, never relisted");
    assert!(
        !api.requests()
            .iter()
            .skip(3)
            .any(|r| !r.contains("watch=true")),
        "no list after the first ones: {:?}",
        api.requests()
    );
}

#[tokio::test]
async fn a_paged_list_is_read_whole() {
    let api = ApiServer::start().unwrap();
    api.set_max_page(Some(2));
    api.apply(Resource::Nodes, node()).unwrap();
    for i in 0..7 {
        let name = format!("s{i}");
        api.apply(
            Resource::Services,
            service(&name, &format!("10.96.1.{i}"), json!({})),
        )
        .unwrap();
        api.apply(
            Resource::EndpointSlices,
            slice(
                &format!("{name}-x"),
                &name,
                &[ready(&format!("10.0.2.{i}"))],
            ),
        )
        .unwrap();
    }
    let mut src = Source::start(&api).await;
    let want = expected(&api);
    assert_eq!(want.frontends.len(), 7);
    src.converge(&want, "paged list").await;
    let continued = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("/api/v1/services?") && r.contains("continue="))
        .count();
    assert_eq!(
        continued,
        3,
        "7 Services in pages of 2: {:?}",
        api.requests()
    );
}

#[tokio::test]
async fn nothing_is_ready_before_every_first_list() {
    let api = ApiServer::start().unwrap();
    api.apply(Resource::Nodes, node()).unwrap();
    api.apply(Resource::Services, service("web", "10.96.0.10", json!({})))
        .unwrap();
    api.apply(
        Resource::EndpointSlices,
        slice("web-a", "web", &[ready("10.0.0.1")]),
    )
    .unwrap();
    api.fail(Resource::Nodes, true);
    let mut src = Source::start(&api).await;
    // Services and slices listed, the Node list failing: not ready.
    src.until("Services and slices listed, the Node failing", |s| {
        s.relists == 2 && s.errors > 0
    })
    .await;
    assert!(!src.state.ready());
    assert!(!src.state.connected());
    assert!(
        src.state.errors().iter().any(|e| e.starts_with("Node")),
        "{:?}",
        src.state.errors()
    );
    api.fail(Resource::Nodes, false);
    src.converge(&expected(&api), "ready once the Node listed")
        .await;
    assert!(src.state.ready());
    assert!(src.state.connected());
    // Stripped on arrival: translation needs neither annotations nor managed fields.
    assert!(src.tracker.knows_node());
}
