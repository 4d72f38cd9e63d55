//! A two-node lab: what a Service sees in a real cluster, where backends run on other nodes and in
//! the host network, and replies reach the client's node over a wire.
//!
//! ```text
//!  vipx-<tag>-node1                                      vipx-<tag>-node2
//!  lxc0 198.18.64.1 ── client  198.18.64.2                lxc2 198.18.65.1 ── backend-2 198.18.65.12
//!  lxc1 198.18.64.1 ── backend-1 198.18.64.11             (lab-pod on 198.18.0.2: host backend)
//!  eth0 198.18.0.1/24                                     eth0 198.18.0.2/24
//!  198.18.65.0/24 via 198.18.0.2                          198.18.64.0/24 via 198.18.0.1
//!    │                                                      │
//!  n1 ═══════════════════ br0 (vipx-<tag>-wire) ═══════════ n2
//!                          ║
//!                         ext ── eth0 198.18.0.100/24  vipx-<tag>-ext: the external client
//!                                198.19.250.0/24 (LoadBalancer range) via 198.18.0.1
//! ```
//!
//! - Node `k` (1 or 2) owns pod CIDR 198.18.(63+k).0/24, gateway 198.18.(63+k).1 on every host-side
//!   veth, and node IP 198.18.0.k on its uplink `eth0`. The uplinks and the external client's
//!   `eth0` meet on a bridge in a namespace of its own: one L2 segment, as machines on one switch.
//!   Each stands for a NIC, so it has TX checksum offload off, as a real NIC hands the wire
//!   finished checksums (design-notes: a veth otherwise carries CHECKSUM_PARTIAL packets), and
//!   each bridge-side end runs a trivial XDP program, without which a veth drops the frames a
//!   program on its peer sends back with XDP_TX.
//! - The external client (`vipx-<tag>-ext`, 198.18.0.100) is a machine outside the cluster on
//!   the nodes' segment: it reaches node ports on the node IPs and routes the LoadBalancer range
//!   198.19.250.0/24 to node 1, as a cloud load balancer or a BGP route would.
//! - Pods are wired as in [`crate::lab`]: `backend-<n>` in namespace `vipx-<tag>-p<n>`, address
//!   198.18.(63+k).(10+n), host side `lxc<n>` on its node. The client pod (`lxc0`) is on node 1.
//! - A host-network backend is `lab-pod` running in a node namespace itself, listening on the node
//!   IP (as the API server behind `default/kubernetes` does).
//! - Both nodes are realistic by default ([`Realism::Node`]): rp_filter=1 on every level and
//!   conntrack with the INVALID-drop rule.
//! - Nothing routes 198.19.0.0/16 (the Service CIDR): as on a real node, only the proxy makes a
//!   VIP answer, and an untranslated packet to one fails fast instead of bouncing between nodes.
//!
//! The node name in manifests is the node's namespace name (`vipx-<tag>-node1`), so vipx started
//! with `--node-name` of that namespace sees which endpoints are local.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};

use crate::lab::{
    Pod, Server, add_namespace, delete_netns, ns_name, spawn_lab_pod, stop_and_delete, stop_server,
    wire_pod,
};
use crate::manifests::{Endpoint, POD_PORT};
use crate::netns::{in_netns, ip_in, sysctls};
use crate::realism::{self, Realism};

/// Nodes in a [`Cluster`] unless [`ClusterConfig::nodes`] says otherwise.
pub const NODES: u8 = 2;
/// The most nodes a [`Cluster`] has (pod CIDRs 198.18.64.0/24 onwards, node IPs below the
/// external client's .100).
pub const MAX_NODES: u8 = 9;
/// The client pod's address (on node 1).
pub const CLUSTER_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 2);
/// The name of every node's uplink interface.
pub const UPLINK_IF: &str = "eth0";
/// The external client's address, on the nodes' segment.
pub const EXTERNAL_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The LoadBalancer / external IP range the external client routes to node 1.
pub const LOAD_BALANCER_RANGE: &str = "198.19.250.0/24";
/// Pod `backend-<n>` gets host `.(POD_IP_BASE + n)` of its node's pod /24.
const POD_IP_BASE: u8 = 10;

/// What to build.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// As [`crate::LabConfig::tag`]: lowercase letters and digits, unique among running labs.
    pub tag: String,
    /// The `lab-pod` binary (see [`crate::locate_lab_pod`]).
    pub lab_pod_bin: PathBuf,
    /// [`Realism::Node`] unless the lab's purpose needs otherwise (and says why).
    pub realism: Realism,
    /// How many nodes ([`NODES`] for the tests; 2..=[`MAX_NODES`]).
    pub nodes: u8,
}

/// A node namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// 1 or 2.
    pub index: u8,
    /// Its network namespace, and its name in manifests (`nodeName`, vipx's `--node-name`).
    pub name: String,
    /// The node IP, on its uplink.
    pub ip: Ipv4Addr,
    /// The pods' gateway, on every host-side veth of this node.
    pub gateway: Ipv4Addr,
    /// Its pod CIDR, `198.18.(63+k).0/24`.
    pub pod_cidr: String,
}

impl Node {
    fn new(tag: &str, index: u8) -> Self {
        let third = 63 + index;
        Self {
            index,
            name: ns_name(tag, &format!("node{index}")),
            ip: Ipv4Addr::new(198, 18, 0, index),
            gateway: Ipv4Addr::new(198, 18, third, 1),
            pod_cidr: format!("198.18.{third}.0/24"),
        }
    }

    /// Its network namespace (the same as its name).
    pub fn netns(&self) -> &str {
        &self.name
    }

    fn pod_ip(&self, host: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.gateway.octets();
        Ipv4Addr::new(a, b, c, host)
    }
}

/// A `lab-pod` server in a node's own network namespace, bound to the node IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBackend {
    /// Its server's name (what it answers with): `host-node<k>`.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// The node IP it listens on.
    pub ip: Ipv4Addr,
}

impl HostBackend {
    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, POD_PORT))
    }

    /// Its entry in an EndpointSlice: no `targetRef`, like the API server's.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            ip: self.ip,
            node_name: self.node.clone(),
            pod: None,
        }
    }
}

impl Pod {
    /// Its entry in an EndpointSlice, with its node and a `targetRef` to it.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            ip: self.ip,
            node_name: self.node.clone(),
            pod: Some(self.name.clone()),
        }
    }
}

/// A built two-node lab. Dropping it tears it down; [`Cluster::teardown`] does the same and
/// reports failures.
pub struct Cluster {
    tag: String,
    lab_pod_bin: PathBuf,
    realism: Realism,
    nodes: Vec<Node>,
    client: Pod,
    pods: Vec<Pod>,
    hosts: Vec<HostBackend>,
    next_pod: u32,
    /// Every namespace created and not deleted yet, in creation order.
    namespaces: Vec<String>,
    servers: Vec<Server>,
    /// The bridge-side ends' `XDP_PASS` links (see [`xdp_pass`]).
    wire_xdp: Vec<OwnedFd>,
}

impl Cluster {
    /// Builds both nodes, the uplink and the client pod on node 1, and waits for the client's
    /// server. On failure, everything created so far is removed again.
    pub fn create(config: ClusterConfig) -> Result<Self> {
        let tag = config.tag;
        ensure!(
            !tag.is_empty()
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "lab tag {tag:?} must be non-empty lowercase letters and digits"
        );
        ensure!(
            (2..=MAX_NODES).contains(&config.nodes),
            "a cluster has 2..={MAX_NODES} nodes, not {}",
            config.nodes
        );
        let nodes: Vec<Node> = (1..=config.nodes).map(|k| Node::new(&tag, k)).collect();
        let mut cluster = Self {
            client: Pod {
                name: "client".into(),
                netns: ns_name(&tag, "client"),
                ip: CLUSTER_CLIENT_IP,
                host_if: "lxc0".into(),
                node: nodes[0].name.clone(),
            },
            nodes,
            tag,
            lab_pod_bin: config.lab_pod_bin,
            realism: config.realism,
            pods: Vec::new(),
            hosts: Vec::new(),
            next_pod: 1,
            namespaces: Vec::new(),
            servers: Vec::new(),
            wire_xdp: Vec::new(),
        };
        // Dropping `cluster` on an early return removes what was built so far.
        for node in cluster.nodes.clone() {
            cluster
                .build_node(&node)
                .with_context(|| format!("building node namespace {}", node.name))?;
        }
        cluster
            .build_wire()
            .context("building the nodes' segment")?;
        let client = cluster.client.clone();
        cluster.add_namespace(&client.netns)?;
        wire_pod(
            &cluster.nodes[0].name,
            &client,
            cluster.nodes[0].gateway,
            cluster.realism,
        )
        .context("wiring the client pod")?;
        cluster.start_server(&client.netns, &client.name, None)?;
        Ok(cluster)
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Node `index` (1 or 2).
    ///
    /// # Panics
    /// For any other index.
    pub fn node(&self, index: u8) -> &Node {
        assert!(
            (1..=self.nodes.len()).contains(&usize::from(index)),
            "nodes are 1..={}",
            self.nodes.len()
        );
        &self.nodes[usize::from(index - 1)]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The external client's network namespace (a machine outside the cluster, on the nodes'
    /// segment, at [`EXTERNAL_CLIENT_IP`]).
    pub fn external(&self) -> String {
        ns_name(&self.tag, "ext")
    }

    /// The client pod, on node 1.
    pub fn client(&self) -> &Pod {
        &self.client
    }

    /// The backend pods, in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn host_backends(&self) -> &[HostBackend] {
        &self.hosts
    }

    /// What rp_filter and the INVALID-drop rules dropped on each node so far, one line per node:
    /// for failure messages.
    pub fn drops(&self) -> String {
        self.nodes
            .iter()
            .map(|node| match realism::drops(&node.name) {
                Ok(drops) => format!("node {}: {drops}", node.index),
                Err(e) => format!("node {}: counters unreadable: {e:#}", node.index),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The namespaces this lab currently owns.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The process id of server `name` (a pod's or a host backend's), while it runs.
    pub fn server_pid(&self, name: &str) -> Option<u32> {
        self.servers
            .iter()
            .find(|server| server.pod == name)
            .map(Server::pid)
    }

    /// Creates backend pod `backend-<n>` on node `node` (1 or 2) with its server listening on
    /// [`POD_PORT`]; returns it. Numbers are never reused within a lab.
    pub fn add_pod(&mut self, node: u8) -> Result<Pod> {
        let n = self.next_pod;
        let host = u8::try_from(n)
            .ok()
            .and_then(|n| POD_IP_BASE.checked_add(n))
            .filter(|&host| host < 255)
            .context("out of pod addresses")?;
        self.next_pod += 1;
        let node = self.node(node).clone();
        let pod = Pod {
            name: format!("backend-{n}"),
            netns: ns_name(&self.tag, &format!("p{n}")),
            ip: node.pod_ip(host),
            host_if: format!("lxc{n}"),
            node: node.name.clone(),
        };
        let built = self.add_namespace(&pod.netns).and_then(|()| {
            wire_pod(&node.name, &pod, node.gateway, self.realism)?;
            self.start_server(&pod.netns, &pod.name, None)
        });
        if let Err(e) = built {
            if let Err(cleanup) = self.destroy(&pod.name, Some(&pod.netns)) {
                eprintln!("vipx lab {}: {cleanup:#}", self.tag);
            }
            return Err(e.context(format!("building pod {} on {}", pod.name, node.name)));
        }
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Starts a host-network backend on node `node`: `lab-pod` named `host-node<k>` in the node's
    /// own namespace, on the node IP and [`POD_PORT`]. One per node.
    pub fn add_host_backend(&mut self, node: u8) -> Result<HostBackend> {
        let node = self.node(node).clone();
        let backend = HostBackend {
            name: format!("host-node{}", node.index),
            node: node.name.clone(),
            ip: node.ip,
        };
        ensure!(
            !self.hosts.contains(&backend),
            "{} already has a host-network backend",
            node.name
        );
        self.start_server(&node.name, &backend.name, Some(node.ip))
            .with_context(|| format!("starting {} in {}", backend.name, node.name))?;
        self.hosts.push(backend.clone());
        Ok(backend)
    }

    /// Starts one more `lab-pod` server in `pod`'s namespace, named like the pod, on `port` (a
    /// pod whose container listens on another port than [`POD_PORT`], as the seed's
    /// LoadBalancer example's port 80).
    pub fn add_pod_port(&mut self, pod: &Pod, port: u16) -> Result<()> {
        let port = port.to_string();
        spawn_lab_pod(
            &self.lab_pod_bin,
            &pod.netns,
            &pod.name,
            &["--port", &port, "--no-sink"],
            &mut self.servers,
        )
    }

    /// Stops every server and deletes every namespace this lab created (which removes every veth
    /// and route with them). Keeps going past failures and reports them all at the end; calling
    /// it again does nothing.
    pub fn teardown(&mut self) -> Result<()> {
        // Closing the link descriptors detaches the bridge ends' programs (deleting the wire's
        // namespace would too).
        self.wire_xdp.clear();
        let errors = stop_and_delete(
            std::mem::take(&mut self.servers),
            std::mem::take(&mut self.namespaces),
        );
        self.pods.clear();
        self.hosts.clear();
        if !errors.is_empty() {
            bail!("tearing down lab {}: {}", self.tag, errors.join("; "));
        }
        Ok(())
    }

    fn build_node(&mut self, node: &Node) -> Result<()> {
        self.add_namespace(&node.name)?;
        realism::prepare_node(&node.name, self.realism)?;
        ip_in(&node.name, &["link", "set", "lo", "up"])
    }

    fn build_wire(&mut self) -> Result<()> {
        let wire = ns_name(&self.tag, "wire");
        let ext = self.external();
        for ns in [&wire, &ext] {
            self.add_namespace(ns)?;
            sysctls(
                ns,
                &[
                    ("net.ipv6.conf.all.disable_ipv6", "1"),
                    ("net.ipv6.conf.default.disable_ipv6", "1"),
                ],
            )?;
            ip_in(ns, &["link", "set", "lo", "up"])?;
        }
        ip_in(&wire, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&wire, &["link", "set", "br0", "up"])?;
        let ends: Vec<(String, String)> = self
            .nodes
            .iter()
            .map(|n| (format!("n{}", n.index), n.name.clone()))
            .chain([("ext".to_owned(), ext.clone())])
            .collect();
        for (end, ns) in &ends {
            // Made inside the wire with the peer sent straight to its namespace: the name never
            // exists in the namespace this process runs in.
            ip_in(
                &wire,
                &[
                    "link", "add", end, "type", "veth", "peer", "name", UPLINK_IF, "netns", ns,
                ],
            )?;
            ip_in(&wire, &["link", "set", end, "master", "br0", "up"])?;
            self.wire_xdp.push(xdp_pass(&wire, end)?);
        }
        disable_tx_checksum(&ext, UPLINK_IF)?;
        let ext_addr = format!("{EXTERNAL_CLIENT_IP}/24");
        ip_in(&ext, &["addr", "add", &ext_addr, "dev", UPLINK_IF])?;
        ip_in(&ext, &["link", "set", UPLINK_IF, "up"])?;
        let node1 = self.nodes[0].ip.to_string();
        ip_in(&ext, &["route", "add", LOAD_BALANCER_RANGE, "via", &node1])?;
        for node in &self.nodes {
            realism::prepare_interface(&node.name, UPLINK_IF, self.realism)?;
            disable_tx_checksum(&node.name, UPLINK_IF)?;
            ip_in(
                &node.name,
                &["addr", "add", &format!("{}/24", node.ip), "dev", UPLINK_IF],
            )?;
            ip_in(&node.name, &["link", "set", UPLINK_IF, "up"])?;
            // Every other node's pod CIDR through that node, as a CNI's routes do.
            for peer in self.nodes.iter().filter(|p| p.index != node.index) {
                ip_in(
                    &node.name,
                    &[
                        "route",
                        "add",
                        &peer.pod_cidr,
                        "via",
                        &peer.ip.to_string(),
                        "dev",
                        UPLINK_IF,
                    ],
                )?;
            }
        }
        Ok(())
    }

    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        add_namespace(&self.tag, ns, &mut self.namespaces)
    }

    fn start_server(&mut self, ns: &str, name: &str, address: Option<Ipv4Addr>) -> Result<()> {
        let port = POD_PORT.to_string();
        let address = address.map(|a| a.to_string());
        let mut args = vec!["--port", &port];
        if let Some(address) = &address {
            // A node has no business opening the pods' discard port on its own address.
            args.extend(["--address", address, "--no-sink"]);
        }
        spawn_lab_pod(&self.lab_pod_bin, ns, name, &args, &mut self.servers)
    }

    fn destroy(&mut self, server: &str, ns: Option<&str>) -> Result<()> {
        let mut result = Ok(());
        if let Some(index) = self.servers.iter().position(|s| s.pod == server) {
            result = stop_server(self.servers.remove(index));
        }
        if let Some(ns) = ns
            && let Some(index) = self.namespaces.iter().position(|n| n == ns)
        {
            let ns = self.namespaces.remove(index);
            result = result.and(delete_netns(&ns));
        }
        result
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("{e:#}");
        }
    }
}

/// `ethtool -K IF tx off`: the kernel then finishes every checksum before the packet enters the
/// veth, as for a NIC without offload.
fn disable_tx_checksum(ns: &str, ifname: &str) -> Result<()> {
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    ethtool_set(ns, ifname, (ETHTOOL_STXCSUM, ETHTOOL_GTXCSUM), false)
        .context("TX checksum offload")
}

/// Attach a two-instruction `XDP_PASS` program to `ifname` in `ns` (native XDP, through a BPF
/// link whose descriptor is returned: the program stays while it is held, or until the interface
/// goes). A veth accepts the frames its peer's XDP program sends back (`XDP_TX`) only when it
/// runs XDP itself: the bridge-side ends need this for the nodes' XDP programs to send on; GRO
/// alone (which gives a veth NAPI since 5.13) was not enough on this kernel.
fn xdp_pass(ns: &str, ifname: &str) -> Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    /// `r0 = XDP_PASS (2); exit`.
    const PASS: [u64; 2] = [0xb7 | (2u64 << 32), 0x95];
    /// The `BPF_PROG_LOAD` prefix of `bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
    }
    /// The `BPF_LINK_CREATE` prefix of `bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<OwnedFd> {
        // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix for `cmd`, whose pointers
        // name buffers alive across the call.
        let fd =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the command returned a new descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
    let license = c"GPL";
    let mut load = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: PASS.len() as u32,
        insns: PASS.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoad::default()
    };
    let prog = bpf(BPF_PROG_LOAD, &mut load).context("loading an XDP_PASS program")?;
    let name = std::ffi::CString::new(ifname)?;
    in_netns(ns, || -> Result<OwnedFd> {
        // SAFETY: NUL-terminated name we own.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no interface {ifname}");
        let mut link = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: XDP_FLAGS_DRV_MODE,
        };
        bpf(BPF_LINK_CREATE, &mut link).context("attaching it")
    })?
    .with_context(|| format!("XDP_PASS on {ifname} in {ns}"))
}

/// One ethtool feature (`set`, `get` commands) of `ifname` in `ns` set to `on` and read back,
/// through the ethtool ioctl so the lab needs no extra tool.
fn ethtool_set(ns: &str, ifname: &str, (set, get): (u32, u32), on: bool) -> Result<()> {
    /// `struct ethtool_value`.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let ethtool = |fd: &OwnedFd, cmd: u32, data: u32| -> std::io::Result<u32> {
        let mut value = EthtoolValue { cmd, data };
        // SAFETY: all-zero is a valid ifreq (a name of NULs and a null union).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
        // SAFETY: `ifr` names the interface and points at `value`, both alive for the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(value.data)
    };
    ensure!(
        ifname.len() < libc::IFNAMSIZ,
        "interface name {ifname:?} too long"
    );
    let now = in_netns(ns, || -> std::io::Result<u32> {
        // SAFETY: plain socket(2); the descriptor is owned by the OwnedFd at once.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        ethtool(&fd, set, u32::from(on))?;
        ethtool(&fd, get, 0)
    })?
    .with_context(|| format!("setting {ifname} in {ns}"))?;
    ensure!(
        (now != 0) == on,
        "{ifname} in {ns} is still {} after the change",
        if on { "off" } else { "on" }
    );
    Ok(())
}
