//! The lab on its own, without vipx: pods reach each other through the node, the VIP answers
//! nothing, and teardown leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vipx_lab::{
    KeepAlive, Lab, LabConfig, Realism, SERVICE_PORT, SERVICE_VIP, cleanup_stale, http_get,
    netns_exists, ns_command, require_privileges, serial, udp_request, unique_tag,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn config(backends: u32) -> LabConfig {
    LabConfig {
        tag: unique_tag(),
        backends,
        lab_pod_bin: env!("CARGO_BIN_EXE_lab-pod").into(),
        realism: Realism::Node,
    }
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Namespaces whose names start with this lab tag's prefix.
fn namespaces_of(tag: &str) -> Vec<String> {
    let prefix = format!("vipx-{tag}-");
    match std::fs::read_dir("/run/netns") {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with(&prefix))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn pods_reach_each_other_and_teardown_removes_everything() {
    if !require_privileges() {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::create(config(2)).expect("building the lab");
    let namespaces = lab.namespaces().to_vec();
    assert_eq!(
        namespaces.len(),
        4,
        "node, client, 2 backends: {namespaces:?}"
    );
    assert!(namespaces.iter().all(|ns| netns_exists(ns)));
    let pids: Vec<u32> = ["client", "backend-1", "backend-2"]
        .iter()
        .map(|pod| lab.server_pid(pod).expect("every pod runs a server"))
        .collect();

    let client = lab.client().netns.clone();
    for pod in lab.backends() {
        let addr = pod.server_addr();
        assert_eq!(
            http_get(&client, addr, TIMEOUT).unwrap(),
            format!("{}\n", pod.name)
        );
        assert_eq!(udp_request(&client, addr, TIMEOUT).unwrap(), pod.name);
        // And back: the client pod answers too (needed for hairpin and pod-to-pod cases).
        let back = http_get(&pod.netns, lab.client().server_addr(), TIMEOUT).unwrap();
        assert_eq!(back, "client\n");
    }

    let backend = &lab.backends()[1];
    let mut conn = KeepAlive::connect(&client, backend.server_addr()).unwrap();
    for _ in 0..3 {
        assert_eq!(conn.request().unwrap(), "backend-2\n");
    }
    drop(conn);

    // Nothing owns the VIP: without vipx the node has no route for it and refuses at once.
    let vip = SocketAddr::from((SERVICE_VIP, SERVICE_PORT));
    assert!(http_get(&client, vip, Duration::from_secs(1)).is_err());

    lab.teardown().expect("teardown");
    assert!(lab.namespaces().is_empty());
    for ns in &namespaces {
        assert!(!netns_exists(ns), "{ns} survived teardown");
    }
    for pid in pids {
        assert!(!process_exists(pid), "lab-pod {pid} survived teardown");
    }
}

#[test]
fn backends_come_and_go() {
    if !require_privileges() {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::create(config(1)).expect("building the lab");
    let client = lab.client().netns.clone();

    let added = lab.add_backend().unwrap().clone();
    assert_eq!(added.name, "backend-2");
    assert_eq!(added.host_if, "lxc2");
    assert_eq!(
        http_get(&client, added.server_addr(), TIMEOUT).unwrap(),
        "backend-2\n"
    );

    let first = lab.backends()[0].clone();
    lab.remove_backend(&first.name).unwrap();
    assert!(!netns_exists(&first.netns));
    assert!(http_get(&client, first.server_addr(), Duration::from_secs(1)).is_err());
    assert_eq!(lab.backend_endpoints(), [(added.name.clone(), added.ip)]);

    // Numbers are not reused, so a new backend never answers with an old one's address.
    assert_eq!(lab.add_backend().unwrap().name, "backend-3");
}

#[test]
fn a_failed_build_leaves_nothing_behind() {
    if !require_privileges() {
        return;
    }
    let _serial = serial();
    let mut config = config(2);
    config.lab_pod_bin = "/nonexistent/lab-pod".into();
    let tag = config.tag.clone();
    let err = Lab::create(config)
        .err()
        .expect("a lab without a server binary");
    assert!(format!("{err:#}").contains("ready"), "{err:#}");
    assert_eq!(namespaces_of(&tag), Vec::<String>::new());
}

#[test]
fn cleanup_stale_deletes_only_its_own_tag() {
    if !require_privileges() {
        return;
    }
    let _serial = serial();
    let tag = unique_tag();
    let other = format!("{tag}x");
    let names = [
        format!("vipx-{tag}-node"),
        format!("vipx-{tag}-be1"),
        format!("vipx-{other}-node"),
    ];
    for name in &names {
        let status = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let mut deleted = cleanup_stale(&tag).unwrap();
    deleted.sort();
    let other_left = netns_exists(&names[2]);
    let _ = cleanup_stale(&other);
    assert_eq!(deleted, [names[1].clone(), names[0].clone()]);
    assert!(other_left, "another tag's namespace was deleted");
}

#[test]
fn lab_pod_exits_when_its_stdin_closes() {
    if !require_privileges() {
        return;
    }
    let _serial = serial();
    let lab = Lab::create(config(0)).expect("building the lab");
    let args = ["--name", "extra", "--port", "5001", "--exit-on-stdin-eof"];
    let mut child = ns_command(&lab.client().netns, env!("CARGO_BIN_EXE_lab-pod"), args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready, "ready\n");
    let extra = SocketAddr::from((lab.client().ip, 5001));
    assert_eq!(
        udp_request(&lab.client().netns, extra, TIMEOUT).unwrap(),
        "extra"
    );

    drop(child.stdin.take());
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lab-pod still running {TIMEOUT:?} after its stdin closed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
}
