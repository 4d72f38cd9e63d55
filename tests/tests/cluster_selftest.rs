//! The two-node lab on its own, without vipx: everything the realistic vipx tests send through a
//! VIP also works straight to the backends, with rp_filter=1 and the INVALID-drop rules loaded, so
//! a failure through the VIP is the proxy's. Teardown leaves nothing behind.

use std::net::SocketAddr;
use std::time::Duration;

use vipx_lab::cluster::{Cluster, ClusterConfig};
use vipx_lab::realism::{self, NFT_TABLE};
use vipx_lab::{
    POD_PORT, Realism, http_get, in_netns, netns_exists, ns_command, require_privileges, serial,
    udp_count, udp_exchange, udp_request, unique_tag,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn sysctl(ns: &str, key: &str) -> String {
    in_netns(ns, || {
        std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("reading {key} in {ns}: {e}"))
    .trim()
    .to_owned()
}

#[test]
fn two_realistic_nodes_carry_direct_traffic_and_teardown_removes_everything() {
    if !require_privileges() {
        return;
    }
    let _serial = serial();
    let mut cluster = Cluster::create(ClusterConfig {
        tag: unique_tag(),
        lab_pod_bin: env!("CARGO_BIN_EXE_lab-pod").into(),
        realism: Realism::Node,
        nodes: vipx_lab::cluster::NODES,
    })
    .expect("building the two-node lab");
    let local = cluster.add_pod(1).expect("pod on node 1");
    let remote = cluster.add_pod(2).expect("pod on node 2");
    let host2 = cluster.add_host_backend(2).expect("host backend on node 2");
    let host1 = cluster.add_host_backend(1).expect("host backend on node 1");
    assert_eq!(
        (remote.ip.octets()[2], remote.node.as_str()),
        (65, cluster.node(2).name.as_str())
    );

    for node in cluster.nodes() {
        for key in [
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
            "net.ipv4.conf.eth0.rp_filter",
        ] {
            assert_eq!(sysctl(&node.name, key), "1", "{key} on {}", node.name);
        }
        let out = ns_command(&node.name, "nft", ["list", "table", "inet", NFT_TABLE])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            rules.matches("ct state invalid").count(),
            2,
            "forward and input INVALID-drop on {}:\n{rules}",
            node.name
        );
    }
    for pod in [&local, &remote] {
        let node = cluster.nodes().iter().find(|n| n.name == pod.node).unwrap();
        let key = format!("net.ipv4.conf.{}.rp_filter", pod.host_if);
        assert_eq!(sysctl(&node.name, &key), "1", "{key}");
    }

    let client = cluster.client().netns.clone();
    for (name, addr) in [
        (&local.name, local.server_addr()),
        (&remote.name, remote.server_addr()),
        (&host2.name, host2.server_addr()),
        (&host1.name, host1.server_addr()),
    ] {
        let body = http_get(&client, addr, TIMEOUT).unwrap_or_else(|e| panic!("{addr}: {e:#}"));
        assert_eq!(body.trim(), name.as_str());
        assert_eq!(&udp_request(&client, addr, TIMEOUT).unwrap(), name);
    }
    // A reply larger than the MTU crosses the uplink in fragments and is reassembled.
    for addr in [local.server_addr(), remote.server_addr()] {
        let reply = udp_exchange(&client, addr, b"size 3000", TIMEOUT)
            .unwrap_or_else(|e| panic!("3000-byte reply from {addr}: {e:#}"));
        assert_eq!(reply.len(), 3000);
    }
    // The external client shares the nodes' segment: it reaches what listens on the node IPs.
    let external = cluster.external();
    for (name, addr) in [
        (&host1.name, host1.server_addr()),
        (&host2.name, host2.server_addr()),
    ] {
        let body =
            http_get(&external, addr, TIMEOUT).unwrap_or_else(|e| panic!("external {addr}: {e:#}"));
        assert_eq!(body.trim(), name.as_str());
        assert_eq!(&udp_request(&external, addr, TIMEOUT).unwrap(), name);
    }
    // Counted from the pod's own loopback: two UDP requests and one sized one above.
    let loopback = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, POD_PORT));
    assert_eq!(udp_count(&remote.netns, loopback, TIMEOUT).unwrap(), 2);

    for node in cluster.nodes() {
        let drops = realism::drops(&node.name).unwrap();
        assert_eq!(
            drops,
            realism::Drops::default(),
            "direct traffic is never dropped on {}",
            node.name
        );
    }

    let namespaces = cluster.namespaces().to_vec();
    assert_eq!(
        namespaces.len(),
        7,
        "2 nodes, the wire, the external client, the client pod, 2 pods: {namespaces:?}"
    );
    let pids: Vec<u32> = [&host1.name, &host2.name, &local.name]
        .iter()
        .map(|name| cluster.server_pid(name).unwrap())
        .collect();
    cluster.teardown().expect("teardown");
    for ns in &namespaces {
        assert!(!netns_exists(ns), "{ns} left behind");
    }
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "server {pid} left running"
        );
    }
}
