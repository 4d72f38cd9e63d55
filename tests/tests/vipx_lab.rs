//! vipx in the namespace lab, through the real kernel: a client pod reaches a ClusterIP Service
//! and is answered by the pods behind it; endpoint changes apply without restarting vipx.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use vipx_lab::{
    KeepAlive, Lab, LabConfig, Realism, SERVICE_PORT, SERVICE_VIP, http_get, local_get,
    metric_sample as sample, ns_command, require_privileges, serial, udp_request, unique_tag,
    write_endpoint_slice,
};

const VIP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(SERVICE_VIP), SERVICE_PORT);
const TIMEOUT: Duration = Duration::from_secs(2);

fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not built next to {}; run `cargo xtask test`",
                exe.display()
            )
        })
}

/// A lab with vipx running in its node namespace; everything is removed on drop.
struct VipxLab {
    lab: Lab,
    vipx: Child,
    manifests: PathBuf,
    pin_dir: PathBuf,
    state_dir: PathBuf,
}

impl VipxLab {
    /// `endpoints`: how many of the lab's backend pods the EndpointSlice lists at start.
    fn start(pods: u32, endpoints: usize) -> Self {
        let me = Self::spawn(pods, endpoints, None);
        // Ready when the VIP answers.
        me.wait_for("the VIP to answer", || {
            http_get(me.client(), VIP, TIMEOUT).is_ok()
        });
        me
    }

    /// vipx started, not waited for; `caps`: only these capabilities in its bounding set
    /// (`setpriv --bounding-set` syntax), as a container's securityContext grants them.
    fn spawn(pods: u32, endpoints: usize, caps: Option<&str>) -> Self {
        let tag = unique_tag();
        let lab = Lab::create(LabConfig {
            tag: tag.clone(),
            backends: pods,
            lab_pod_bin: sibling_bin("lab-pod"),
            realism: Realism::Node,
        })
        .expect("lab");
        let manifests = std::env::temp_dir().join(format!("vipx-{tag}-manifests"));
        std::fs::create_dir_all(&manifests).unwrap();
        lab.write_manifests(&manifests).unwrap();
        let pin_dir = PathBuf::from("/sys/fs/bpf/vipx").join(lab.node_name());
        let state_dir = std::env::temp_dir().join(format!("vipx-{tag}-state"));
        let vipx_bin = sibling_bin("vipx");
        let vipx_bin = vipx_bin.to_str().unwrap();
        let (program, mut args) = match caps {
            None => (vipx_bin, vec![]),
            Some(caps) => (
                "setpriv",
                vec![
                    format!("--bounding-set={caps}"),
                    "--inh-caps=-all".to_owned(),
                    "--".to_owned(),
                    vipx_bin.to_owned(),
                ],
            ),
        };
        args.extend(
            [
                "run",
                "--manifests",
                manifests.to_str().unwrap(),
                "--node-name",
                lab.node_name(),
                "--pod-interfaces",
                vipx_lab::HOST_IF_GLOB,
                "--pin-dir",
                pin_dir.to_str().unwrap(),
                "--state-dir",
                state_dir.to_str().unwrap(),
            ]
            .map(str::to_owned),
        );
        let me = Self {
            vipx: ns_command(lab.node_ns(), program, args)
                .stdout(Stdio::null())
                .spawn()
                .expect("start vipx"),
            lab,
            manifests,
            pin_dir,
            state_dir,
        };
        me.set_endpoints(endpoints);
        me
    }

    fn client(&self) -> &str {
        &self.lab.client().netns
    }

    fn set_endpoints(&self, n: usize) {
        let eps = &self.lab.backend_endpoints()[..n];
        write_endpoint_slice(&self.manifests, eps, self.lab.node_name()).unwrap();
    }

    fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pods answering `n` new TCP connections.
    fn spread(&self, n: usize) -> BTreeMap<String, usize> {
        let mut hits = BTreeMap::new();
        for _ in 0..n {
            let body = http_get(self.client(), VIP, TIMEOUT).expect("request through the VIP");
            *hits.entry(body.trim().to_owned()).or_default() += 1;
        }
        hits
    }

    fn assert_running(&mut self) {
        assert!(
            self.vipx.try_wait().unwrap().is_none(),
            "vipx exited (it must not restart or die)"
        );
    }
}

impl Drop for VipxLab {
    fn drop(&mut self) {
        // Only while it runs: once reaped, its pid may belong to another process.
        if let Ok(None) = self.vipx.try_wait() {
            // SAFETY: signalling our own child, not yet reaped, by its pid.
            unsafe { libc::kill(self.vipx.id() as i32, libc::SIGTERM) };
        }
        let _ = self.vipx.wait();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.manifests);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

#[test]
fn tcp_and_udp_reach_both_backends_evenly() {
    if !require_privileges() {
        return;
    }
    let _g = serial();
    let mut l = VipxLab::start(2, 2);
    let hits = l.spread(200);
    assert_eq!(hits.len(), 2, "both backends answer: {hits:?}");
    for (pod, n) in &hits {
        assert!(
            (70..=130).contains(n),
            "{pod} got {n} of 200 new connections (must be 35%..65%): {hits:?}"
        );
    }
    let mut udp = BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        let r = udp_request(l.client(), VIP, TIMEOUT).expect("UDP through the VIP");
        *udp.entry(r.trim().to_owned()).or_default() += 1;
    }
    assert_eq!(udp.len(), 2, "both backends answer UDP: {udp:?}");
    assert!(udp.keys().all(|k| hits.contains_key(k)));
    l.assert_running();
}

#[test]
fn scaling_applies_live_and_established_connections_survive() {
    if !require_privileges() {
        return;
    }
    let _g = serial();
    let mut l = VipxLab::start(2, 1);
    let first = l.lab.backends()[0].name.clone();
    let second = l.lab.backends()[1].name.clone();
    assert_eq!(l.spread(10).keys().collect::<Vec<_>>(), vec![&first]);

    let mut established = KeepAlive::connect(l.client(), VIP).expect("keep-alive connection");
    assert_eq!(established.request().unwrap().trim(), first);

    // 1 -> 2: new connections start reaching the second pod.
    l.set_endpoints(2);
    l.wait_for("the second backend to be used", || {
        http_get(l.client(), VIP, TIMEOUT).is_ok_and(|b| b.trim() == second)
    });
    assert_eq!(
        established.request().unwrap().trim(),
        first,
        "an established connection keeps its backend"
    );

    // 2 -> 1: the second pod gets no new connections; the established one still works.
    l.set_endpoints(1);
    // A connection caught mid-handshake by the change may fail (its backend is gone from the
    // maps); only the converged state is asserted strictly.
    l.wait_for("the second backend to be dropped", || {
        (0..20).all(|_| http_get(l.client(), VIP, TIMEOUT).is_ok_and(|b| b.trim() == first))
    });
    assert_eq!(l.spread(30).keys().collect::<Vec<_>>(), vec![&first]);
    assert_eq!(established.request().unwrap().trim(), first);
    l.assert_running();
}

#[test]
fn a_bad_manifest_is_reported_and_the_rest_keeps_working() {
    if !require_privileges() {
        return;
    }
    let _g = serial();
    let mut l = VipxLab::start(1, 1);
    std::fs::write(
        l.manifests.join("broken.yaml"),
        "kind: Service\nspec: [not, a, map\n",
    )
    .unwrap();
    std::fs::write(
        l.manifests.join("bad-ip.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: default}\n\
         spec: {clusterIP: 300.1.2.3, ports: [{port: 80}]}\n",
    )
    .unwrap();
    // A later valid change must still be applied: drop the only endpoint, then restore it.
    l.set_endpoints(0);
    l.wait_for("the service to lose its endpoint", || {
        http_get(l.client(), VIP, Duration::from_millis(300)).is_err()
    });
    l.set_endpoints(1);
    l.wait_for("the service to answer again", || {
        http_get(l.client(), VIP, TIMEOUT).is_ok()
    });
    l.assert_running();
}

#[test]
fn a_pod_interface_created_later_is_attached_and_services_lists_it() {
    if !require_privileges() {
        return;
    }
    let _g = serial();
    let mut l = VipxLab::start(1, 1);
    // A pod created after vipx started: its host veth must get the program, or its replies
    // would reach the client un-reverse-NATed and the connection would fail.
    let late = l.lab.add_backend().expect("add a pod").name.clone();
    l.set_endpoints(2);
    l.wait_for("the late pod to answer through the VIP", || {
        http_get(l.client(), VIP, TIMEOUT).is_ok_and(|b| b.trim() == late)
    });

    let out = ns_command(
        l.lab.node_ns(),
        sibling_bin("vipx"),
        [
            "services",
            "--node-name",
            l.lab.node_name(),
            "--pin-dir",
            l.pin_dir.to_str().unwrap(),
            "--state-dir",
            l.state_dir.to_str().unwrap(),
        ],
    )
    .output()
    .expect("vipx services");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let tcp = text
        .lines()
        .find(|l| l.contains("198.19.0.10:80/TCP"))
        .unwrap_or_else(|| panic!("no TCP frontend in:\n{text}"));
    assert!(tcp.contains("default/simpleapi-service:http/TCP"), "{tcp}");
    for pod in l.lab.backends() {
        assert!(
            tcp.contains(&format!("{}:5000", pod.ip)),
            "{} missing: {tcp}",
            pod.ip
        );
    }
    l.assert_running();
}

#[test]
fn health_and_metrics_report_the_real_data_path() {
    if !require_privileges() {
        return;
    }
    let _g = serial();
    let l = VipxLab::start(2, 2);
    let ns = l.lab.node_ns().to_owned();
    let (status, body) = local_get(&ns, 10256, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with(r#""nodeEligible": true}"#), "{body}");
    assert_eq!(local_get(&ns, 10256, "/livez").0, 200);

    let (_, before) = local_get(&ns, 10249, "/metrics");
    let new_flows = |m: &str| sample(m, "vipx_datapath_events_total{reason=\"new_flows\"}");
    let flows_before = new_flows(&before).expect("new_flows counter");
    l.spread(20);
    let (status, after) = local_get(&ns, 10249, "/metrics");
    assert_eq!(status, 200);
    let flows = new_flows(&after).unwrap() - flows_before;
    // Exactly: every request is a new TCP connection, nothing else goes to the VIP meanwhile.
    assert_eq!(flows, 20.0, "{after}");
    // Two entries per flow, still in the LRU; counted by a walk whose result is reused for 10 s.
    l.wait_for("the conntrack count to include the new flows", || {
        let (_, m) = local_get(&ns, 10249, "/metrics");
        sample(&m, "vipx_map_entries{map=\"VIPX_CT4\"}").unwrap() >= 40.0
            && sample(&m, "vipx_map_count_truncated{map=\"VIPX_CT4\"}") == Some(0.0)
    });
    // The lab Service: one TCP and one UDP port, two endpoints each (a slot per endpoint plus
    // the frontend's own entry).
    assert_eq!(
        sample(&after, "vipx_map_entries{map=\"VIPX_SVC4\"}"),
        Some(6.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "vipx_map_entries{map=\"VIPX_REVNAT4\"}"),
        Some(2.0)
    );
    // One ClusterIP address for both ports, and the hairpin SNAT address (its answers are
    // looked up there).
    assert_eq!(
        sample(&after, "vipx_map_entries{map=\"VIPX_VIP4\"}"),
        Some(2.0)
    );
    assert_eq!(sample(&after, "vipx_datapath_read_error"), Some(0.0));
    assert!(sample(&after, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap() > 0.0);
    let changes = |m: &str| sample(m, "kubeproxy_sync_proxy_rules_endpoint_changes_total");
    let changes_before = changes(&after).unwrap();
    assert!(changes_before >= 1.0, "{after}");

    // Scaling is an EndpointSlice change, applied and counted.
    l.set_endpoints(1);
    l.wait_for("the endpoint change to be counted", || {
        let (_, m) = local_get(&ns, 10249, "/metrics");
        changes(&m).unwrap() > changes_before
            && sample(&m, "vipx_map_entries{map=\"VIPX_SVC4\"}") == Some(4.0)
    });
    assert_eq!(local_get(&ns, 10256, "/healthz").0, 200);

    // This node being deleted: /healthz fails (load balancers drain it), /livez does not.
    let node = l.manifests.join("node.yaml");
    std::fs::write(
        &node,
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  \
             deletionTimestamp: \"2024-01-01T00:00:00Z\"\n",
            l.lab.node_name()
        ),
    )
    .unwrap();
    l.wait_for("/healthz to fail on a node being deleted", || {
        local_get(&ns, 10256, "/healthz").0 == 503
    });
    let (_, body) = local_get(&ns, 10256, "/healthz");
    assert!(body.ends_with(r#""nodeEligible": false}"#), "{body}");
    assert_eq!(local_get(&ns, 10256, "/livez").0, 200);
    std::fs::remove_file(&node).unwrap();
    l.wait_for("/healthz to recover", || {
        local_get(&ns, 10256, "/healthz").0 == 200
    });
}

/// The DaemonSet grants exactly CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN: with only those vipx
/// loads, attaches, serves the VIP and its health; without CAP_PERFMON or CAP_NET_ADMIN it
/// cannot load its programs (and says so, exiting).
#[test]
fn the_daemon_sets_capabilities_are_enough_and_needed() {
    if !require_privileges() {
        return;
    }
    let _g = serial();
    let l = VipxLab::spawn(2, 2, Some("-all,+bpf,+perfmon,+net_admin"));
    l.wait_for("the VIP to answer", || {
        http_get(l.client(), VIP, TIMEOUT).is_ok()
    });
    assert_eq!(local_get(l.lab.node_ns(), 10256, "/healthz").0, 200);
    drop(l);
    for caps in ["-all,+bpf,+net_admin", "-all,+bpf,+perfmon"] {
        let mut l = VipxLab::spawn(1, 1, Some(caps));
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = l.vipx.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "vipx runs with only {caps}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            !status.success(),
            "vipx with only {caps} exited with {status}"
        );
    }
}
