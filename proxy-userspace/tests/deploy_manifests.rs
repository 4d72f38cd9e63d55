//! Every document of `deploy/*.yaml` is a valid object of its Kubernetes kind (typed with
//! k8s-openapi, no field misspelled or misplaced: the typed object serialises back to exactly the
//! document), and the deployment keeps its invariants: RBAC read-only on exactly what vipx
//! watches, host network, the health probe on kube-proxy's port, the config file vipx is told
//! to read mounted where it looks.

use std::{collections::BTreeMap, fs, path::PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Default)]
struct Objects {
    daemon_sets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
}

/// `doc` as `T`, failing when the typed object drops or changes anything (an unknown or
/// misplaced field would be silently ignored by the API types otherwise).
fn typed<T: DeserializeOwned + Serialize>(doc: &serde_json::Value, what: &str) -> T {
    let obj: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&obj).unwrap();
    assert_eq!(
        &back, doc,
        "{what}: the document has fields its kind does not know (or wrongly typed values)"
    );
    obj
}

fn load() -> Objects {
    let mut objs = Objects::default();
    let mut files: Vec<PathBuf> = fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/");
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        for (i, de) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let what = format!("{} document {}", file.display(), i + 1);
            let doc = serde_json::Value::deserialize(de).unwrap_or_else(|e| panic!("{what}: {e}"));
            if doc.is_null() {
                continue;
            }
            let kind = (doc["apiVersion"].as_str(), doc["kind"].as_str());
            match kind {
                (Some("apps/v1"), Some("DaemonSet")) => objs.daemon_sets.push(typed(&doc, &what)),
                (Some("v1"), Some("ServiceAccount")) => {
                    objs.service_accounts.push(typed(&doc, &what));
                }
                (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
                    objs.cluster_roles.push(typed(&doc, &what));
                }
                (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
                    objs.bindings.push(typed(&doc, &what));
                }
                (Some("v1"), Some("ConfigMap")) => objs.config_maps.push(typed(&doc, &what)),
                other => panic!("{what}: unexpected kind {other:?}"),
            }
        }
    }
    objs
}

#[test]
fn rbac_reads_exactly_services_endpointslices_and_nodes() {
    let o = load();
    assert_eq!(o.cluster_roles.len(), 1);
    let rules = o.cluster_roles[0].rules.as_deref().unwrap_or_default();
    let mut granted: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for r in rules {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for verb in &r.verbs {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str()),
                "verb {verb} is more than read access"
            );
        }
        for g in r.api_groups.as_deref().unwrap_or_default() {
            for res in r.resources.as_deref().unwrap_or_default() {
                let mut verbs = r.verbs.clone();
                verbs.sort();
                granted.insert((g.clone(), res.clone()), verbs);
            }
        }
    }
    let read = vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()];
    let want: BTreeMap<(String, String), Vec<String>> = [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ]
    .into_iter()
    .map(|(g, r)| ((g.to_owned(), r.to_owned()), read.clone()))
    .collect();
    assert_eq!(granted, want);

    // Bound to the service account the DaemonSet runs as.
    assert_eq!(o.bindings.len(), 1);
    let b = &o.bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&b.role_ref.name),
        o.cluster_roles[0].metadata.name.as_ref()
    );
    let sa = &o.service_accounts[0];
    let subjects = b.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    let ds = &o.daemon_sets[0];
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
}

#[test]
fn the_daemon_set_runs_like_kube_proxy() {
    let o = load();
    assert_eq!(o.daemon_sets.len(), 1);
    let ds = &o.daemon_sets[0];
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];

    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz"));
    assert_eq!(probe.port, IntOrString::Int(10256));
    let live = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/livez"));

    let env = c.env.as_deref().unwrap_or_default();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");

    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let mut add = caps.add.clone().unwrap_or_default();
    add.sort();
    assert_eq!(add, ["BPF", "NET_ADMIN", "PERFMON"]);

    // The host's bpffs, vipx's state directory and the host's cgroup v2 hierarchy, which the
    // socket programs attach to.
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    for (path, host) in [
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/run/vipx", "/run/vipx"),
        ("/host/cgroup", "/sys/fs/cgroup"),
    ] {
        let m = mounts
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("{path} not mounted"));
        let v = volumes.iter().find(|v| v.name == m.name).unwrap();
        assert_eq!(v.host_path.as_ref().map(|h| h.path.as_str()), Some(host));
    }

    // --config names a file of the mounted ConfigMap, and that file is a configuration vipx
    // reads.
    let args = c.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert!(args.contains(&"--hostname-override=$(NODE_NAME)".to_owned()));
    assert!(args.contains(&"--cgroup-root=/host/cgroup".to_owned()));
    let config = args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config");
    let (dir, file) = config.rsplit_once('/').unwrap();
    let m = mounts
        .iter()
        .find(|m| m.mount_path == dir)
        .expect("config mounted");
    let v = volumes.iter().find(|v| v.name == m.name).unwrap();
    let cm_name = v.config_map.as_ref().unwrap().name.clone();
    let cm = o
        .config_maps
        .iter()
        .find(|cm| cm.metadata.name.as_ref() == Some(&cm_name))
        .expect("the ConfigMap is in deploy/");
    let text = &cm.data.as_ref().unwrap()[file];
    let parsed = vipx::config::FileConfig::parse(text).expect("vipx reads the config");
    assert_eq!(parsed.healthz_bind_address, "0.0.0.0:10256".parse().ok());
    assert_eq!(parsed.metrics_bind_address, "127.0.0.1:10249".parse().ok());
}

#[test]
fn the_dockerfile_builds_vipx_in_two_stages() {
    let text = fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let froms = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(froms, 2, "builder and runtime stages");
    assert!(text.contains("bpf-linker@0.10.4") && text.contains("rust-src"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/vipx\"]"));
}
