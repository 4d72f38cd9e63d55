//! The namespace lab: one node namespace and pod namespaces wired to it by veth pairs, laid out the
//! way a CNI such as Cilium or Calico lays out a node.
//!
//! ```text
//!   vipx-<tag>-client          vipx-<tag>-node                 vipx-<tag>-be1 ...
//!   eth0 198.18.64.2/32 ─veth─ lxc0 198.18.64.1/32
//!                              lxc1 198.18.64.1/32 ─veth─ eth0 198.18.64.11/32
//!                              lo   198.18.0.1/32 (node IP)
//! ```
//!
//! Each pod routes everything through 198.18.64.1 (the node); the node routes each pod IP to its
//! `lxc*` interface and forwards between them. The Service VIP is owned by nothing: a connection to
//! it only succeeds when vipx, attached to the `lxc*` interfaces in the node namespace, translates
//! it. Every pod (the client too) runs `lab-pod`, which answers with the pod's name.
//!
//! The node namespace behaves like a real node by default ([`Realism::Node`]): rp_filter=1 and
//! netfilter conntrack dropping INVALID packets. For two nodes joined by an uplink, host-network
//! backends and several Services, see [`crate::cluster`].

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::manifests::{self, POD_PORT};
use crate::netns::{NETNS_DIR, ip, ip_in, netns_exists, ns_command, sysctls};
use crate::realism::{self, Realism};

/// The glob vipx is given to find the host side of pod veths.
pub const HOST_IF_GLOB: &str = "lxc*";
/// The pods' gateway, assigned to every host-side veth.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 2);
/// The node namespace's own address, on its loopback.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Backend `k` (from 1) gets 198.18.64.(`BACKEND_IP_BASE` + k).
const BACKEND_IP_BASE: u8 = 10;
/// How long a pod server may take to print its "ready" line.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What to build.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// Distinguishes this lab's namespaces (`vipx-<tag>-*`) from every other lab's: ASCII lowercase
    /// letters and digits only, so that one tag can never be a prefix of another's names.
    pub tag: String,
    /// Backend pods to create up front; more can be added with [`Lab::add_backend`].
    pub backends: u32,
    /// The `lab-pod` binary (see [`locate_lab_pod`]).
    pub lab_pod_bin: PathBuf,
    /// [`Realism::Node`] unless the lab's purpose needs otherwise (and says why).
    pub realism: Realism,
}

/// A pod namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// The name its server answers with (and the Pod name in manifests): `client`, `backend-1`, ...
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address, on its `eth0`.
    pub ip: Ipv4Addr,
    /// The host side of its veth, in the node namespace.
    pub host_if: String,
    /// The name of the node (and node namespace) it runs on, as EndpointSlices name it.
    pub node: String,
}

impl Pod {
    /// Its server's address (TCP and UDP).
    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, POD_PORT))
    }
}

pub(crate) struct Server {
    pub(crate) pod: String,
    child: Child,
}

impl Server {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A built lab. Dropping it tears it down; [`Lab::teardown`] does the same and reports failures.
pub struct Lab {
    tag: String,
    lab_pod_bin: PathBuf,
    realism: Realism,
    node_ns: String,
    client: Pod,
    backends: Vec<Pod>,
    next_backend: u32,
    /// Every namespace this lab created and has not deleted yet, so a half-built lab is cleaned up
    /// too, and a namespace left by someone else is never touched.
    namespaces: Vec<String>,
    servers: Vec<Server>,
}

impl Lab {
    /// Builds the node, the client pod and `config.backends` backend pods, and waits until every
    /// pod server is listening. On failure, everything created so far is removed again.
    pub fn create(config: LabConfig) -> Result<Self> {
        let tag = config.tag;
        ensure!(
            !tag.is_empty()
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "lab tag {tag:?} must be non-empty lowercase letters and digits"
        );
        let node_ns = ns_name(&tag, "node");
        let mut lab = Self {
            client: Pod {
                name: "client".into(),
                netns: ns_name(&tag, "client"),
                ip: CLIENT_IP,
                host_if: "lxc0".into(),
                node: node_ns.clone(),
            },
            node_ns,
            tag,
            lab_pod_bin: config.lab_pod_bin,
            realism: config.realism,
            backends: Vec::new(),
            next_backend: 1,
            namespaces: Vec::new(),
            servers: Vec::new(),
        };
        // Dropping `lab` on an early return removes what was built so far.
        lab.build_node()
            .with_context(|| format!("building node namespace {}", lab.node_ns))?;
        let client = lab.client.clone();
        lab.build_pod(&client)
            .with_context(|| format!("building client pod {}", client.netns))?;
        for _ in 0..config.backends {
            lab.add_backend()?;
        }
        Ok(lab)
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The node's network namespace, where vipx runs and attaches to [`HOST_IF_GLOB`].
    pub fn node_ns(&self) -> &str {
        &self.node_ns
    }

    /// The node's name in manifests (the same as its namespace's).
    pub fn node_name(&self) -> &str {
        &self.node_ns
    }

    pub fn client(&self) -> &Pod {
        &self.client
    }

    pub fn backends(&self) -> &[Pod] {
        &self.backends
    }

    /// The namespaces this lab currently owns.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The process id of pod `name`'s server, while it runs.
    pub fn server_pid(&self, name: &str) -> Option<u32> {
        self.servers
            .iter()
            .find(|server| server.pod == name)
            .map(Server::pid)
    }

    /// `(pod name, pod IP)` of every backend, as [`manifests::write_endpoint_slice`] takes them.
    pub fn backend_endpoints(&self) -> Vec<(String, Ipv4Addr)> {
        self.backends
            .iter()
            .map(|pod| (pod.name.clone(), pod.ip))
            .collect()
    }

    /// Writes the example Service and an EndpointSlice listing every backend into `dir`.
    pub fn write_manifests(&self, dir: &Path) -> Result<()> {
        manifests::write_service(dir)?;
        manifests::write_endpoint_slice(dir, &self.backend_endpoints(), self.node_name())?;
        Ok(())
    }

    /// Creates one more backend pod (`backend-<k>` in `vipx-<tag>-be<k>`, 198.18.64.(10 + k),
    /// host side `lxc<k>`) with its server listening. Numbers are never reused within a lab.
    pub fn add_backend(&mut self) -> Result<&Pod> {
        let k = self.next_backend;
        let last_octet = u8::try_from(k)
            .ok()
            .and_then(|k| BACKEND_IP_BASE.checked_add(k))
            .filter(|&octet| octet < 255)
            .context("out of backend addresses in 198.18.64.0/24")?;
        self.next_backend += 1;
        let pod = Pod {
            name: format!("backend-{k}"),
            netns: ns_name(&self.tag, &format!("be{k}")),
            ip: Ipv4Addr::new(198, 18, 64, last_octet),
            host_if: format!("lxc{k}"),
            node: self.node_ns.clone(),
        };
        if let Err(e) = self.build_pod(&pod) {
            if let Err(cleanup) = self.destroy_pod(&pod) {
                eprintln!("vipx lab {}: {cleanup:#}", self.tag);
            }
            return Err(e.context(format!("building backend pod {}", pod.netns)));
        }
        self.backends.push(pod);
        Ok(self.backends.last().expect("just pushed"))
    }

    /// Stops backend `name`'s server and deletes its namespace (which removes its veth and the
    /// node's route to it).
    pub fn remove_backend(&mut self, name: &str) -> Result<()> {
        let index = self
            .backends
            .iter()
            .position(|pod| pod.name == name)
            .with_context(|| format!("no backend named {name:?} in lab {}", self.tag))?;
        let pod = self.backends.remove(index);
        self.destroy_pod(&pod)
    }

    /// Stops every pod server and deletes every namespace this lab created. Keeps going past
    /// failures and reports them all at the end; calling it again does nothing.
    pub fn teardown(&mut self) -> Result<()> {
        let errors = stop_and_delete(
            std::mem::take(&mut self.servers),
            std::mem::take(&mut self.namespaces),
        );
        self.backends.clear();
        if !errors.is_empty() {
            bail!("tearing down lab {}: {}", self.tag, errors.join("; "));
        }
        Ok(())
    }

    fn build_node(&mut self) -> Result<()> {
        let ns = self.node_ns.clone();
        self.add_namespace(&ns)?;
        realism::prepare_node(&ns, self.realism)?;
        ip_in(&ns, &["link", "set", "lo", "up"])?;
        ip_in(&ns, &["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        Ok(())
    }

    fn build_pod(&mut self, pod: &Pod) -> Result<()> {
        self.add_namespace(&pod.netns)?;
        wire_pod(&self.node_ns, pod, GATEWAY_IP, self.realism)?;
        self.start_server(pod)
    }

    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        add_namespace(&self.tag, ns, &mut self.namespaces)
    }

    fn start_server(&mut self, pod: &Pod) -> Result<()> {
        let port = POD_PORT.to_string();
        spawn_lab_pod(
            &self.lab_pod_bin,
            &pod.netns,
            &pod.name,
            &["--port", &port],
            &mut self.servers,
        )
    }

    fn destroy_pod(&mut self, pod: &Pod) -> Result<()> {
        let mut result = Ok(());
        if let Some(index) = self.servers.iter().position(|s| s.pod == pod.name) {
            result = stop_server(self.servers.remove(index));
        }
        if let Some(index) = self.namespaces.iter().position(|ns| *ns == pod.netns) {
            let ns = self.namespaces.remove(index);
            result = result.and(delete_netns(&ns));
        }
        result
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("{e:#}");
        }
    }
}

/// A tag no other lab of this machine uses at the same time: this process's id and a counter.
pub fn unique_tag() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}n{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes every namespace `vipx-<tag>-*`, and every vipx pin directory of such a node, left by
/// an earlier run that could not tear down (the demo uses a fixed tag); returns their names. Its
/// pod servers are already gone: they exit when the process that started them dies.
pub fn cleanup_stale(tag: &str) -> Result<Vec<String>> {
    let prefix = ns_name(tag, "");
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {NETNS_DIR}")),
    };
    let mut deleted = Vec::new();
    for entry in entries {
        let name = entry
            .with_context(|| format!("listing {NETNS_DIR}"))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.starts_with(&prefix) {
            delete_netns(&name)?;
            deleted.push(name);
        }
    }
    // A vipx that was killed with its lab leaves its pins (maps, and links that keep defunct
    // programs loaded) under its node's name.
    if let Ok(pins) = std::fs::read_dir(PIN_ROOT) {
        for entry in pins.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                std::fs::remove_dir_all(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
                deleted.push(entry.path().display().to_string());
            }
        }
    }
    Ok(deleted)
}

/// Where vipx pins each node's maps and links (`/sys/fs/bpf/vipx/<node>`).
const PIN_ROOT: &str = "/sys/fs/bpf/vipx";

/// Finds the `lab-pod` binary: `$VIPX_LAB_POD` if set, else next to the running executable or one
/// directory up (test binaries live in `target/<profile>/deps`).
///
/// Integration tests of this package can pass `env!("CARGO_BIN_EXE_lab-pod")` instead.
pub fn locate_lab_pod() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("VIPX_LAB_POD") {
        return Ok(path.into());
    }
    crate::vipx::locate_bin("lab-pod").context("or set VIPX_LAB_POD")
}

/// Creates pod `pod`'s veth pair from node namespace `node_ns` into the pod's (already created)
/// namespace and wires it the way Cilium and Calico do: the pod has its address as a /32 and a
/// default route via `gateway`, which the host side carries (as a /32) without any bridge; the
/// node routes the pod's address to the host side.
pub(crate) fn wire_pod(
    node_ns: &str,
    pod: &Pod,
    gateway: Ipv4Addr,
    realism: Realism,
) -> Result<()> {
    // The lab is IPv4 only; IPv6 router solicitations, MLD reports and DAD probes would
    // otherwise cross the programs under test and show up in their counters.
    sysctls(
        &pod.netns,
        &[
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
        ],
    )?;
    // Created from inside the node namespace with the peer sent straight to the pod, so no
    // name ever appears in (or can clash in) the namespace this process runs in.
    ip_in(
        node_ns,
        &[
            "link",
            "add",
            &pod.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.netns,
        ],
    )?;

    let pod_ip = format!("{}/32", pod.ip);
    let gateway = gateway.to_string();
    ip_in(&pod.netns, &["link", "set", "lo", "up"])?;
    ip_in(&pod.netns, &["addr", "add", &pod_ip, "dev", "eth0"])?;
    ip_in(&pod.netns, &["link", "set", "eth0", "up"])?;
    ip_in(
        &pod.netns,
        &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
    )?;
    ip_in(
        &pod.netns,
        &["route", "add", "default", "via", &gateway, "dev", "eth0"],
    )?;

    let host_if = pod.host_if.as_str();
    realism::prepare_interface(node_ns, host_if, realism)?;
    ip_in(
        node_ns,
        &["addr", "add", &format!("{gateway}/32"), "dev", host_if],
    )?;
    ip_in(node_ns, &["link", "set", host_if, "up"])?;
    ip_in(node_ns, &["route", "add", &pod_ip, "dev", host_if])?;
    Ok(())
}

/// Starts `lab-pod --name NAME ARGS --exit-on-stdin-eof` in namespace `ns`, records it in
/// `servers` (so teardown stops it even if it never becomes ready) and waits for its "ready".
pub(crate) fn spawn_lab_pod(
    bin: &Path,
    ns: &str,
    name: &str,
    args: &[&str],
    servers: &mut Vec<Server>,
) -> Result<()> {
    let mut child = ns_command(
        ns,
        bin,
        ["--name", name]
            .iter()
            .chain(args)
            .chain(&["--exit-on-stdin-eof"]),
    )
    // The server exits when this pipe closes, so it cannot outlive this process even if
    // teardown never runs (a crash, a SIGKILL).
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .with_context(|| format!("starting {} in namespace {ns} via nsenter", bin.display()))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let pid = child.id();
    servers.push(Server {
        pod: name.to_owned(),
        child,
    });
    wait_ready(stdout).with_context(|| {
        format!("lab-pod {name} (pid {pid}) in namespace {ns} did not become ready")
    })
}

pub(crate) fn ns_name(tag: &str, suffix: &str) -> String {
    format!("vipx-{tag}-{suffix}")
}

/// Waits for the server's "ready" line, then keeps draining its stdout on a detached thread so
/// that anything it prints later cannot block it on a full pipe.
pub(crate) fn wait_ready(stdout: ChildStdout) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        lines.for_each(drop);
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Some(Ok(line))) if line == "ready" => Ok(()),
        Ok(Some(Ok(line))) => bail!("printed {line:?} instead of \"ready\""),
        Ok(Some(Err(e))) => Err(e).context("reading its stdout"),
        Ok(None) => bail!("exited before printing \"ready\""),
        Err(_) => bail!("no \"ready\" line within {READY_TIMEOUT:?}"),
    }
}

pub(crate) fn stop_server(mut server: Server) -> Result<()> {
    let pid = server.child.id();
    // kill fails only for a child that already exited; wait then reaps it either way.
    let _ = server.child.kill();
    server
        .child
        .wait()
        .with_context(|| format!("waiting for lab-pod {} (pid {pid})", server.pod))?;
    Ok(())
}

/// Creates network namespace `ns` for the lab tagged `tag` and records it in `namespaces`, so that
/// teardown removes it; one that already exists (a crashed run's) is refused, never adopted.
pub(crate) fn add_namespace(tag: &str, ns: &str, namespaces: &mut Vec<String>) -> Result<()> {
    if netns_exists(ns) {
        bail!(
            "network namespace {ns} already exists; if a previous run crashed, \
             remove its leftovers with cleanup_stale({tag:?})"
        );
    }
    ip(&["netns", "add", ns])?;
    namespaces.push(ns.to_owned());
    Ok(())
}

/// Stops `servers`, then deletes `namespaces` newest first; keeps going past failures and
/// returns them all.
pub(crate) fn stop_and_delete(servers: Vec<Server>, namespaces: Vec<String>) -> Vec<String> {
    let mut errors = Vec::new();
    for server in servers {
        if let Err(e) = stop_server(server) {
            errors.push(format!("{e:#}"));
        }
    }
    for ns in namespaces.into_iter().rev() {
        if let Err(e) = delete_netns(&ns) {
            errors.push(format!("{e:#}"));
        }
    }
    errors
}

pub(crate) fn delete_netns(ns: &str) -> Result<()> {
    if netns_exists(ns) {
        ip(&["netns", "del", ns])?;
    }
    Ok(())
}
