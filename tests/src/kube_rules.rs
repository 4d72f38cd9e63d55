//! kube-proxy's own rule sets, iptables mode and nftables mode, for N ClusterIP Services, and the
//! code to install them in a lab network namespace and time the install: the baseline that
//! `cargo xtask bench` compares vipx with.
//!
//! The text is what kube-proxy itself hands to the kernel tools, reproduced from its source
//! (kubernetes/kubernetes `pkg/proxy/iptables/proxier.go`, `pkg/proxy/nftables/proxier.go` and
//! sigs.k8s.io/knftables, which writes the nftables transaction):
//!
//! - **iptables mode** ([`iptables_restore_input`]): the `iptables-restore --noflush` input of a full
//!   `syncProxyRules`, in the order kube-proxy writes it: `*filter` (`KUBE-SERVICES`,
//!   `KUBE-EXTERNAL-SERVICES`, `KUBE-FORWARD`, `KUBE-NODEPORTS`, `KUBE-PROXY-FIREWALL`,
//!   `KUBE-FIREWALL`) then `*nat` (`KUBE-SERVICES`, `KUBE-NODEPORTS`, `KUBE-POSTROUTING`,
//!   `KUBE-MARK-MASQ`, and per Service port one `KUBE-SVC-*` chain plus one `KUBE-SEP-*` chain per
//!   endpoint). Chain names, comments, the `! -s <cluster CIDR>` masquerade rule, the
//!   `-m statistic --mode random --probability 1/(n-i)` ladder (`%0.10f`), the hairpin and DNAT
//!   rules, large-cluster mode (no per-endpoint comments past 1000 endpoints) and the closing
//!   `KUBE-NODEPORTS` rule are kube-proxy's. kube-proxy links its chains into the built-in ones
//!   with `iptables -I` (`EnsureRule`) before the restore; those jump rules are appended to each
//!   table section as `-I` lines, so a single restore builds the whole data path.
//! - **nftables mode** ([`nft_input`]): the `nft -f -` transaction of kube-proxy's first full sync
//!   in `table ip kube-proxy`: base chains at kube-proxy's hooks and priorities, the
//!   `services` chain's `ip daddr . meta l4proto . th dport vmap @service-ips`, per Service port a
//!   `service-<HASH>-ns/name/tcp/port` chain (masquerade mark for off-cluster sources, then
//!   `numgen random mod N vmap { i : goto endpoint-... }`), per endpoint an
//!   `endpoint-<HASH>-ns/name/tcp/port__IP/PORT` chain (hairpin mark, `dnat to IP:PORT`), and the
//!   `mark-for-masquerade` / `masquerading` chains.
//!
//! What is left out or simplified: TCP ClusterIP Services only (no NodePort, ExternalIP,
//! LoadBalancer, session affinity or traffic policies; their chains and map entries are never
//! written, as for kube-proxy when no Service uses them); no `KUBE-PROXY-CANARY` chains (empty
//! monitoring chains); in iptables mode the `nfacct` match on the INVALID-drop rule only when
//! [`KubeProxyOptions::nfacct`] is set (kube-proxy omits it when it cannot create nfacct counters,
//! which is the lab default). Newer upstream releases restructure nftables mode (one
//! `dnat ip to numgen ... map { ... }` per Service, a `hairpin-connections` set, no per-endpoint
//! chains); this module writes the per-endpoint-chain layout the brief describes, with the base
//! chains (`filter-prerouting-pre-dnat`, `filter-output-pre-dnat`, `filter-input/forward/output`
//! at priority 0) of the latest `TestOverallNFTablesRules` that still expects that layout.
//!
//! Load times grow faster than linearly with both tools on this stack (Debian 12, kernel 6.18):
//! `iptables-restore --noflush` of iptables-nft 1.8.9 is super-quadratic (see
//! [`RestoreMode::KubeProxy`]; [`load_iptables_with`] can restore without `--noflush` instead),
//! and `nft -f` of kube-proxy's one-transaction first sync is quadratic in the kernel (see
//! [`load_nft`]).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::lab::NODE_IP;
use crate::netns::ns_command;

/// The cluster (pod) CIDR the lab's masquerade rules use: pods are in 198.18.64.0/24.
pub const CLUSTER_CIDR: &str = "198.18.64.0/18";
/// The Service CIDR: every VIP the lab or the bench uses is in it.
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit 14`).
pub const MASQUERADE_MARK: &str = "0x4000";
/// Past this many endpoints in total, iptables-mode kube-proxy drops the per-endpoint comments
/// (`largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;
/// How many synthetic VIPs there are per port: 198.19.1.1 – 198.19.254.254, skipping .0 and .255.
/// 198.19.0.0/24 is left for hand-placed Services such as the lab's 198.19.0.10.
pub const SYNTHETIC_VIPS_PER_PORT: usize = 254 * 254;
/// The port of the first [`SYNTHETIC_VIPS_PER_PORT`] synthetic Services; the next block gets 81...
pub const SYNTHETIC_FIRST_PORT: u16 = 80;

/// One TCP ClusterIP Service port and its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleService {
    pub namespace: String,
    pub name: String,
    /// The Service port's name (may be empty, as for a single unnamed port).
    pub port_name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
    /// A NodePort Service's node port (externalTrafficPolicy Cluster); `None` for a ClusterIP.
    pub node_port: Option<u16>,
}

impl RuleService {
    /// `ServicePortName.String()`: `ns/name:port`, or `ns/name` for an unnamed port.
    pub fn service_port_name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// The endpoints in kube-proxy's order: deduplicated and sorted by their `IP:port` string
    /// (`endpointsMapFromEndpointInfo` sorts with `byEndpoint`, which compares `String()`).
    pub fn sorted_endpoints(&self) -> Vec<(Ipv4Addr, u16)> {
        let mut eps: Vec<(String, (Ipv4Addr, u16))> = self
            .endpoints
            .iter()
            .map(|&(ip, port)| (format!("{ip}:{port}"), (ip, port)))
            .collect();
        eps.sort();
        eps.dedup_by(|a, b| a.0 == b.0);
        eps.into_iter().map(|(_, ep)| ep).collect()
    }
}

/// The `i`-th of `n` synthetic Services for the bench: `bench/svc-00042`, port name `http`, VIP
/// [`synthetic_vip`]`(i)`, port [`synthetic_port`]`(i)`, endpoints `endpoints(i)`.
pub fn synthetic_services(
    n: usize,
    endpoints: impl Fn(usize) -> Vec<(Ipv4Addr, u16)>,
) -> Vec<RuleService> {
    (0..n)
        .map(|i| RuleService {
            namespace: "bench".into(),
            name: format!("svc-{i:05}"),
            port_name: "http".into(),
            vip: synthetic_vip(i),
            port: synthetic_port(i),
            endpoints: endpoints(i),
            node_port: None,
        })
        .collect()
}

/// Synthetic Service `i`'s VIP: 198.19.1.1, 198.19.1.2, ... 198.19.254.254, then again from
/// 198.19.1.1 (with the next port). Never in 198.19.0.0/24.
pub fn synthetic_vip(i: usize) -> Ipv4Addr {
    let k = i % SYNTHETIC_VIPS_PER_PORT;
    // Both quotients are below 254, so the casts are exact.
    Ipv4Addr::new(198, 19, 1 + (k / 254) as u8, 1 + (k % 254) as u8)
}

/// Synthetic Service `i`'s port: 80 for the first [`SYNTHETIC_VIPS_PER_PORT`] Services, 81 for the
/// next block, and so on.
///
/// # Panics
/// Past 65,455 blocks (over 4 billion Services), where the port would overflow.
pub fn synthetic_port(i: usize) -> u16 {
    u16::try_from(i / SYNTHETIC_VIPS_PER_PORT)
        .ok()
        .and_then(|block| SYNTHETIC_FIRST_PORT.checked_add(block))
        .expect("too many synthetic services for distinct VIP:port pairs")
}

/// `count` endpoint addresses for synthetic Service `i`, all on `port`: pod IPs in
/// 198.18.65.1 – 198.18.127.254, inside [`CLUSTER_CIDR`] but outside the lab's real pods
/// (198.18.64.0/24). Distinct within a Service as long as `count` ≤ 16,126.
pub fn synthetic_endpoints(i: usize, count: usize, port: u16) -> Vec<(Ipv4Addr, u16)> {
    const BASE: u32 = u32::from_be_bytes([198, 18, 65, 0]);
    const SPAN: usize = 63 * 256 - 2; // offsets 1..=16126
    (0..count)
        .map(|j| {
            let offset = (i.wrapping_mul(count).wrapping_add(j)) % SPAN + 1;
            (Ipv4Addr::from(BASE + offset as u32), port)
        })
        .collect()
}

/// What kube-proxy's output depends on besides the Services: its configuration and what it
/// detects on the node. [`KubeProxyOptions::lab`] is what a kube-proxy with default flags would
/// use on the lab node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeProxyOptions {
    /// `--cluster-cidr` (local-traffic detection): traffic to a VIP from outside it is
    /// masqueraded.
    pub cluster_cidr: String,
    /// `--iptables-masquerade-bit` as a mark, `0x4000` by default.
    pub masquerade_mark: String,
    /// iptables: `HasRandomFully()`, i.e. `MASQUERADE --random-fully`.
    pub random_fully: bool,
    /// iptables: whether the nfacct counters exist (adds `-m nfacct` to the INVALID-drop rule).
    pub nfacct: bool,
    /// iptables: `--iptables-localhost-nodeports` (default true): the `KUBE-FIREWALL` chain and
    /// no `! -d 127.0.0.0/8` on the `KUBE-NODEPORTS` rule.
    pub localhost_nodeports: bool,
    /// iptables: also write the jumps from the built-in chains (PREROUTING/OUTPUT to
    /// `KUBE-SERVICES`, POSTROUTING to `KUBE-POSTROUTING`, the filter hooks) that kube-proxy
    /// installs with `iptables -I` before each full sync.
    pub jump_rules: bool,
    /// nftables: the ServiceCIDRs (`cluster-ips-check` drops traffic to unallocated VIPs in them).
    pub service_cidrs: Option<String>,
    /// nftables: `--nodeport-addresses primary` (the nftables default): the node IPs put in
    /// `nodeport-ips`. Empty means "all local addresses" (`fib daddr type local`).
    pub nodeport_ips: Vec<Ipv4Addr>,
    /// nftables: the transaction of a freshly started kube-proxy, which first adds and deletes
    /// each base chain so that they are all recreated.
    pub first_sync: bool,
}

impl KubeProxyOptions {
    /// A kube-proxy with default flags on the lab node (node IP [`NODE_IP`], Service CIDR
    /// [`SERVICE_CIDR`], no nfacct counters).
    pub fn lab(cluster_cidr: &str) -> Self {
        Self {
            cluster_cidr: cluster_cidr.to_owned(),
            masquerade_mark: MASQUERADE_MARK.to_owned(),
            random_fully: true,
            nfacct: false,
            localhost_nodeports: true,
            jump_rules: true,
            service_cidrs: Some(SERVICE_CIDR.to_owned()),
            nodeport_ips: vec![NODE_IP],
            first_sync: true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

/// `computeProbability`: `1/n` formatted as Go's `%0.10f`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// `portProtoHash`: the first 16 characters of base32(sha256(`service_port_name` + `protocol`)).
fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    let hash = sha256(format!("{service_port_name}{protocol}").as_bytes());
    base32(&hash)[..16].to_owned()
}

/// `servicePortPolicyClusterChain`: `KUBE-SVC-` + [`port_proto_hash`], e.g.
/// `KUBE-SVC-XPGD46QRK7WJZT7O` for (`ns1/svc1:p80`, `tcp`).
pub fn service_chain_name(service_port_name: &str, protocol: &str) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(service_port_name, protocol))
}

/// `servicePortExternalChainName`: `KUBE-EXT-` + [`port_proto_hash`], e.g.
/// `KUBE-EXT-X27LE4BHSL4DOUIK` for (`ns3/svc3:p80`, `tcp`).
pub fn external_chain_name(service_port_name: &str, protocol: &str) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(service_port_name, protocol))
}

/// `servicePortEndpointChainName`: `KUBE-SEP-` + the first 16 characters of
/// base32(sha256(`service_port_name` + `protocol` + `endpoint`)), `endpoint` being `IP:port`.
pub fn endpoint_chain_name(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    let hash = sha256(format!("{service_port_name}{protocol}{endpoint}").as_bytes());
    format!("KUBE-SEP-{}", &base32(&hash)[..16])
}

/// knftables `NameLengthMax` (256) minus the longest chain-name prefix (16).
const NFT_CHAIN_NAME_BASE_MAX: usize = 256 - 16;

/// nftables `hashAndTruncate`: the first 8 characters of base32(sha256(`name`)), `-`, `name`,
/// truncated to 240 characters.
fn hash_and_truncate(name: &str) -> String {
    let mut out = format!("{}-{name}", &base32(&sha256(name.as_bytes()))[..8]);
    if out.len() > NFT_CHAIN_NAME_BASE_MAX {
        out.truncate(NFT_CHAIN_NAME_BASE_MAX - 3);
        out.push_str("...");
    }
    out
}

/// nftables `servicePortChainNameBase` with the `service-` prefix, e.g.
/// `service-ULMVA6XW-ns1/svc1/tcp/p80`.
pub fn nft_service_chain_name(svc: &RuleService, protocol: &str) -> String {
    format!(
        "service-{}",
        hash_and_truncate(&format!(
            "{}/{}/{protocol}/{}",
            svc.namespace, svc.name, svc.port_name
        ))
    )
}

/// nftables `servicePortChainNameBase` with the `external-` prefix, e.g.
/// `external-4AT6LBPK-ns3/svc3/tcp/p80`.
pub fn nft_external_chain_name(svc: &RuleService, protocol: &str) -> String {
    nft_service_chain_name(svc, protocol).replacen("service-", "external-", 1)
}

/// nftables `servicePortEndpointChainNameBase` with the `endpoint-` prefix, e.g.
/// `endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80`.
pub fn nft_endpoint_chain_name(svc: &RuleService, protocol: &str, ep: (Ipv4Addr, u16)) -> String {
    format!(
        "endpoint-{}",
        hash_and_truncate(&format!(
            "{}/{}/{protocol}/{}__{}/{}",
            svc.namespace, svc.name, svc.port_name, ep.0, ep.1
        ))
    )
}

// ---------------------------------------------------------------------------------------------
// iptables mode
// ---------------------------------------------------------------------------------------------

/// The full `iptables-restore --noflush` input kube-proxy (iptables mode, default flags) writes
/// for `svcs` on the lab node, masquerading VIP traffic from outside `cluster_cidr`, with the
/// jump rules from the built-in chains appended (see the module docs).
pub fn iptables_restore_input(svcs: &[RuleService], cluster_cidr: &str) -> String {
    iptables_restore_input_with(svcs, &KubeProxyOptions::lab(cluster_cidr))
}

/// Proto `tcp`: the only one [`RuleService`] carries.
const PROTO: &str = "tcp";

/// [`iptables_restore_input`] with every knob explicit.
pub fn iptables_restore_input_with(svcs: &[RuleService], o: &KubeProxyOptions) -> String {
    let mark = o.masquerade_mark.as_str();
    let cidr = o.cluster_cidr.as_str();
    let services: Vec<(&RuleService, Vec<(Ipv4Addr, u16)>)> =
        svcs.iter().map(|s| (s, s.sorted_endpoints())).collect();
    let total_endpoints: usize = services.iter().map(|(_, eps)| eps.len()).sum();
    let large_cluster = total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;

    // Roughly 45 lines of ~110 bytes per Service with 10 endpoints.
    let per_service = 200 + 330 * total_endpoints / services.len().max(1);
    let mut filter_chains = String::new();
    let mut filter_rules = String::new();
    let mut nat_chains = String::with_capacity(services.len() * per_service / 3);
    let mut nat_rules = String::with_capacity(services.len() * per_service);

    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        chain_line(&mut filter_chains, chain);
    }
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        chain_line(&mut nat_chains, chain);
    }

    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN"
    );
    let _ = writeln!(nat_rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {mark}");
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE{}",
        if o.random_fully {
            " --random-fully"
        } else {
            ""
        }
    );
    let _ = writeln!(nat_rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {mark}");

    if o.localhost_nodeports {
        chain_line(&mut filter_chains, "KUBE-FIREWALL");
        filter_rules.push_str(
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" \
             -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT \
             -j DROP\n",
        );
    }

    let mut probabilities: Vec<String> = Vec::new();
    for (svc, eps) in &services {
        let name = svc.service_port_name();
        let (vip, port) = (svc.vip, svc.port);
        if eps.is_empty() {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" \
                 -m {PROTO} -p {PROTO} -d {vip} --dport {port} -j REJECT"
            );
            if let Some(node_port) = svc.node_port {
                let _ = writeln!(
                    filter_rules,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" \
                     -m addrtype --dst-type LOCAL -m {PROTO} -p {PROTO} --dport {node_port} -j REJECT"
                );
            }
            continue;
        }
        let svc_chain = service_chain_name(&name, PROTO);
        let _ = writeln!(
            nat_rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" \
             -m {PROTO} -p {PROTO} -d {vip} --dport {port} -j {svc_chain}"
        );
        let _ = writeln!(
            nat_rules,
            "-A {svc_chain} -m comment --comment \"{name} cluster IP\" \
             -m {PROTO} -p {PROTO} -d {vip} --dport {port} ! -s {cidr} -j KUBE-MARK-MASQ"
        );
        chain_line(&mut nat_chains, &svc_chain);
        if let Some(node_port) = svc.node_port {
            // externalTrafficPolicy Cluster: the external chain masquerades (the endpoint may be
            // on another node) and falls through to the cluster policy chain.
            let ext_chain = external_chain_name(&name, PROTO);
            chain_line(&mut nat_chains, &ext_chain);
            let _ = writeln!(
                nat_rules,
                "-A KUBE-NODEPORTS -m comment --comment {name} \
                 -m {PROTO} -p {PROTO} --dport {node_port} -j {ext_chain}"
            );
            let _ = writeln!(
                nat_rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external \
                 destinations\" -j KUBE-MARK-MASQ\n-A {ext_chain} -j {svc_chain}"
            );
        }

        let sep_chains: Vec<String> = eps
            .iter()
            .map(|(ip, p)| endpoint_chain_name(&name, PROTO, &format!("{ip}:{p}")))
            .collect();
        let n = eps.len();
        for (i, ((ip, p), sep)) in eps.iter().zip(&sep_chains).enumerate() {
            let _ = write!(nat_rules, "-A {svc_chain}");
            if !large_cluster {
                let _ = write!(nat_rules, " -m comment --comment \"{name} -> {ip}:{p}\"");
            }
            if i < n - 1 {
                while probabilities.len() <= n - i {
                    probabilities.push(probability(probabilities.len().max(1)));
                }
                let _ = write!(
                    nat_rules,
                    " -m statistic --mode random --probability {}",
                    probabilities[n - i]
                );
            }
            let _ = writeln!(nat_rules, " -j {sep}");
        }
        let comment = if large_cluster {
            String::new()
        } else {
            format!(" -m comment --comment {name}")
        };
        for ((ip, p), sep) in eps.iter().zip(&sep_chains) {
            chain_line(&mut nat_chains, sep);
            let _ = writeln!(nat_rules, "-A {sep}{comment} -s {ip} -j KUBE-MARK-MASQ");
            let _ = writeln!(
                nat_rules,
                "-A {sep}{comment} -m {PROTO} -p {PROTO} -j DNAT --to-destination {ip}:{p}"
            );
        }
    }

    let _ = writeln!(
        nat_rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL{} -j KUBE-NODEPORTS",
        if o.localhost_nodeports {
            ""
        } else {
            " ! -d 127.0.0.0/8"
        }
    );

    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID{} -j DROP",
        if o.nfacct {
            " -m nfacct --nfacct-name ct_state_invalid_dropped_pkts"
        } else {
            ""
        }
    );
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" \
         -m mark --mark {mark}/{mark} -j ACCEPT"
    );
    filter_rules.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" \
         -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );

    let mut out = String::with_capacity(
        filter_chains.len() + filter_rules.len() + nat_chains.len() + nat_rules.len() + 4096,
    );
    out.push_str("*filter\n");
    out.push_str(&filter_chains);
    out.push_str(&filter_rules);
    if o.jump_rules {
        push_jump_rules(&mut out, "filter", o);
    }
    out.push_str("COMMIT\n*nat\n");
    out.push_str(&nat_chains);
    out.push_str(&nat_rules);
    if o.jump_rules {
        push_jump_rules(&mut out, "nat", o);
    }
    out.push_str("COMMIT\n");
    out
}

fn chain_line(buf: &mut String, chain: &str) {
    let _ = writeln!(buf, ":{chain} - [0:0]");
}

/// `iptablesJumpChains` and `iptablesKubeletJumpChains` for `table`, in the order kube-proxy
/// runs `EnsureRule(Prepend, ...)`, each as the `-I` that rule amounts to.
fn push_jump_rules(out: &mut String, table: &str, o: &KubeProxyOptions) {
    const NEW: &str = "-m conntrack --ctstate NEW ";
    let jumps: &[(&str, &str, &str, &str)] = &[
        // (table, built-in chain, extra args, "comment" -j target)
        (
            "filter",
            "INPUT",
            NEW,
            "\"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
        ),
        (
            "filter",
            "FORWARD",
            NEW,
            "\"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
        ),
        (
            "filter",
            "INPUT",
            "",
            "\"kubernetes health check service ports\" -j KUBE-NODEPORTS",
        ),
        (
            "filter",
            "FORWARD",
            NEW,
            "\"kubernetes service portals\" -j KUBE-SERVICES",
        ),
        (
            "filter",
            "OUTPUT",
            NEW,
            "\"kubernetes service portals\" -j KUBE-SERVICES",
        ),
        (
            "filter",
            "FORWARD",
            "",
            "\"kubernetes forwarding rules\" -j KUBE-FORWARD",
        ),
        (
            "filter",
            "INPUT",
            NEW,
            "\"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
        ),
        (
            "filter",
            "OUTPUT",
            NEW,
            "\"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
        ),
        (
            "filter",
            "FORWARD",
            NEW,
            "\"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
        ),
        (
            "nat",
            "OUTPUT",
            "",
            "\"kubernetes service portals\" -j KUBE-SERVICES",
        ),
        (
            "nat",
            "PREROUTING",
            "",
            "\"kubernetes service portals\" -j KUBE-SERVICES",
        ),
        (
            "nat",
            "POSTROUTING",
            "",
            "\"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        ),
    ];
    let _ = writeln!(
        out,
        "# kube-proxy installs these with `iptables -I` (EnsureRule) before the restore"
    );
    for (t, chain, extra, rest) in jumps {
        if *t == table {
            let _ = writeln!(out, "-I {chain} {extra}-m comment --comment {rest}");
        }
    }
    // kubelet's copy of the anti-martian chain, which kube-proxy also links (without a comment).
    if table == "filter" && o.localhost_nodeports {
        out.push_str("-I INPUT -j KUBE-FIREWALL\n-I OUTPUT -j KUBE-FIREWALL\n");
    }
}

// ---------------------------------------------------------------------------------------------
// nftables mode
// ---------------------------------------------------------------------------------------------

/// The full `nft -f` input (one atomic transaction) kube-proxy (nftables mode, default flags)
/// writes on its first sync for `svcs` on the lab node, masquerading VIP traffic from outside
/// `cluster_cidr`.
pub fn nft_input(svcs: &[RuleService], cluster_cidr: &str) -> String {
    nft_input_with(svcs, &KubeProxyOptions::lab(cluster_cidr))
}

/// kube-proxy's table.
pub const NFT_TABLE: &str = "ip kube-proxy";

/// `nftablesBaseChains`: name, type, hook, priority (knftables writes priorities as numbers:
/// dstnat = -100, filter = 0, srcnat = 100).
const NFT_BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-input", "filter", "input", 0),
    ("filter-forward", "filter", "forward", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// `nftablesJumpChains`: destination chain, base chain, extra match.
const NFT_JUMP_CHAINS: [(&str, &str, &str); 11] = [
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    (
        "firewall-check",
        "filter-prerouting-pre-dnat",
        "ct state new",
    ),
    ("firewall-check", "filter-output-pre-dnat", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    ("cluster-ips-check", "filter-output", "ct state new"),
];

/// [`nft_input`] with every knob explicit.
pub fn nft_input_with(svcs: &[RuleService], o: &KubeProxyOptions) -> String {
    let t = NFT_TABLE;
    let mark = o.masquerade_mark.as_str();
    let total_endpoints: usize = svcs.iter().map(|s| s.endpoints.len()).sum();
    let mut out = String::with_capacity(4096 + svcs.len() * 600 + total_endpoints * 420);
    let mut created: HashSet<String> = HashSet::new();
    let mut ensure_chain = |out: &mut String, chain: &str| {
        if created.insert(chain.to_owned()) {
            let _ = writeln!(out, "add chain {t} {chain}\nflush chain {t} {chain}");
        }
    };

    // setupNFTables
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    if o.first_sync {
        for (name, ..) in NFT_BASE_CHAINS {
            let _ = writeln!(out, "add chain {t} {name}\ndelete chain {t} {name}");
        }
    }
    for (name, kind, hook, priority) in NFT_BASE_CHAINS {
        let _ = writeln!(
            out,
            "add chain {t} {name} {{ type {kind} hook {hook} priority {priority} ; }}\n\
             flush chain {t} {name}"
        );
    }
    for (dst, src, extra) in NFT_JUMP_CHAINS {
        ensure_chain(&mut out, dst);
        let sep = if extra.is_empty() { "" } else { " " };
        let _ = writeln!(out, "add rule {t} {src} {extra}{sep}jump {dst}");
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        ensure_chain(&mut out, chain);
    }
    let _ = writeln!(
        out,
        "add rule {t} mark-for-masquerade mark set mark or {mark}\n\
         add rule {t} masquerading mark and {mark} == 0 return\n\
         add rule {t} masquerading mark set mark xor {mark}\n\
         add rule {t} masquerading masquerade fully-random"
    );
    let _ = writeln!(
        out,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
         add rule {t} cluster-ips-check ip daddr @cluster-ips reject \
         comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    if let Some(cidrs) = &o.service_cidrs {
        let _ = writeln!(
            out,
            "add rule {t} cluster-ips-check ip daddr {{ {cidrs} }} drop \
             comment \"Drop traffic to unallocated ClusterIPs\""
        );
    }
    let _ = writeln!(
        out,
        "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    let match_all = o.nodeport_ips.is_empty();
    if match_all {
        let _ = writeln!(out, "delete set {t} nodeport-ips");
    } else {
        let _ = writeln!(out, "flush set {t} nodeport-ips");
        for ip in &o.nodeport_ips {
            let _ = writeln!(out, "add element {t} nodeport-ips {{ {ip} }}");
        }
    }
    let _ = writeln!(
        out,
        "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}\n\
         flush chain {t} reject-chain\n\
         add rule {t} reject-chain reject\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    let nodeport_match = if match_all {
        "ip daddr != 127.0.0.0/8"
    } else {
        "ip daddr @nodeport-ips"
    };
    let _ = writeln!(
        out,
        "add rule {t} nodeport-endpoints-check {nodeport_match} meta l4proto . th dport vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        out,
        "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    ensure_chain(&mut out, "firewall-check");
    let _ = writeln!(
        out,
        "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"NodePort traffic\" ; }}\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let nodeport_dispatch = if match_all {
        "fib daddr type local ip daddr != 127.0.0.0/8"
    } else {
        "ip daddr @nodeport-ips"
    };
    let _ = writeln!(
        out,
        "add rule {t} services {nodeport_dispatch} meta l4proto . th dport vmap @service-nodeports"
    );
    let _ = writeln!(
        out,
        "flush set {t} cluster-ips\n\
         flush map {t} service-ips\n\
         flush map {t} firewall-ips\n\
         flush map {t} no-endpoint-services\n\
         flush map {t} no-endpoint-nodeports\n\
         flush map {t} service-nodeports"
    );

    // syncProxyRules, per Service port
    for svc in svcs {
        let eps = svc.sorted_endpoints();
        let ep_chains: Vec<String> = eps
            .iter()
            .map(|&ep| nft_endpoint_chain_name(svc, PROTO, ep))
            .collect();
        for chain in &ep_chains {
            ensure_chain(&mut out, chain);
        }
        let svc_chain = nft_service_chain_name(svc, PROTO);
        if !eps.is_empty() {
            ensure_chain(&mut out, &svc_chain);
        }
        let (vip, port) = (svc.vip, svc.port);
        let _ = writeln!(out, "add element {t} cluster-ips {{ {vip} }}");
        if eps.is_empty() {
            let _ = writeln!(
                out,
                "add element {t} no-endpoint-services {{ {vip} . {PROTO} . {port} comment \"{}\" : goto reject-chain }}",
                svc.service_port_name()
            );
            if let Some(node_port) = svc.node_port {
                let _ = writeln!(
                    out,
                    "add element {t} no-endpoint-nodeports {{ {PROTO} . {node_port} comment \"{}\" : goto reject-chain }}",
                    svc.service_port_name()
                );
            }
            continue;
        }
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {vip} . {PROTO} . {port} : goto {svc_chain} }}"
        );
        let _ = writeln!(
            out,
            "add rule {t} {svc_chain} ip daddr {vip} ip saddr != {} jump mark-for-masquerade",
            o.cluster_cidr
        );
        let _ = write!(
            out,
            "add rule {t} {svc_chain} numgen random mod {} vmap {{ ",
            eps.len()
        );
        for (i, chain) in ep_chains.iter().enumerate() {
            let sep = if i + 1 < ep_chains.len() { " ," } else { "" };
            let _ = write!(out, "{i} : goto {chain}{sep} ");
        }
        out.push_str("}\n");
        if let Some(node_port) = svc.node_port {
            let ext_chain = nft_external_chain_name(svc, PROTO);
            ensure_chain(&mut out, &ext_chain);
            let _ = writeln!(
                out,
                "add rule {t} {ext_chain} jump mark-for-masquerade\n\
                 add rule {t} {ext_chain} goto {svc_chain}\n\
                 add element {t} service-nodeports {{ {PROTO} . {node_port} : goto {ext_chain} }}"
            );
        }
        for ((ip, p), chain) in eps.iter().zip(&ep_chains) {
            let _ = writeln!(
                out,
                "add rule {t} {chain} ip saddr {ip} jump mark-for-masquerade\n\
                 add rule {t} {chain} meta l4proto {PROTO} dnat to {ip}:{p}"
            );
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Installing and timing
// ---------------------------------------------------------------------------------------------

/// The tools [`ensure_tools`] provides: (binary, Debian package).
const TOOLS: [(&str, &str); 3] = [
    ("iptables-restore", "iptables"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
];

/// Where `program` is: the first match on `$PATH`, then /usr/sbin and /sbin (which a non-login
/// root shell may lack).
pub fn find_tool(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn tool(program: &str) -> Result<PathBuf> {
    find_tool(program)
        .with_context(|| format!("`{program}` is not installed (call kube_rules::ensure_tools)"))
}

/// Installs iptables, nftables and conntrack with `apt-get` when `iptables-restore`, `nft` or
/// `conntrack` is missing, printing what it does (and running `apt-get update` first if the
/// install fails, as it does with empty package lists). Does nothing when all three are there.
pub fn ensure_tools() -> Result<()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(program, _)| find_tool(program).is_none())
        .map(|(program, _)| *program)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = TOOLS.iter().map(|(_, package)| *package).collect();
    println!(
        "kube_rules: {} not found; running `apt-get install -y {}`",
        missing.join(", "),
        packages.join(" ")
    );
    let install = || -> Result<bool> {
        let status = Command::new("apt-get")
            .args(["install", "-y"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .context("running apt-get install")?;
        Ok(status.success())
    };
    if !install()? {
        println!("kube_rules: apt-get install failed; running `apt-get update` and trying again");
        let status = Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .context("running apt-get update")?;
        if !status.success() || !install()? {
            bail!("could not install {} with apt-get", packages.join(" "));
        }
    }
    let still_missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(program, _)| find_tool(program).is_none())
        .map(|(program, _)| *program)
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "apt-get installed {} but {} is still not found",
            packages.join(" "),
            still_missing.join(", ")
        );
    }
    println!("kube_rules: installed; {}", iptables_version()?);
    Ok(())
}

/// `iptables -V`, e.g. `iptables v1.8.9 (nf_tables)`: the backend `iptables-restore` uses.
pub fn iptables_version() -> Result<String> {
    let out = Command::new(tool("iptables")?)
        .arg("-V")
        .output()
        .context("running iptables -V")?;
    if !out.status.success() {
        bail!(
            "iptables -V failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// How [`load_iptables_with`] runs `iptables-restore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMode {
    /// kube-proxy's flags, `-w 5 -W 100000 --noflush --counters`: only the chains the input
    /// declares are replaced.
    ///
    /// With Debian 12's iptables-nft (1.8.9) this is super-quadratic in the input: with
    /// `--noflush` every command records its chain in a sorted linked list
    /// (`nft_cache_level_set` → `cache_chain_list_insert`, a linear walk per command), so 1,000
    /// Services × 10 endpoints take ~6 s, 2,000 × 10 ~50 s, 3,000 × 10 ~3.5 min and 10,000 × 10
    /// hours (it had read a fifth of the input after 20 minutes).
    KubeProxy,
    /// `-w 5 -W 100000 --counters` without `--noflush`: the `filter` and `nat` tables are replaced
    /// wholesale. In a namespace whose only rules are kube-proxy's (a lab node) the result is the
    /// same rule set, without iptables-nft's `--noflush` cost.
    Replace,
}

/// Loads `input` with `iptables-restore -w 5 -W 100000 --noflush --counters` (the flags kube-proxy
/// restores with) inside network namespace `netns`; returns the wall time from spawning the tool
/// until it exited, writing `input` to its stdin included. See [`RestoreMode::KubeProxy`] for what
/// that costs with iptables-nft at scale, and [`load_iptables_with`] for the alternative.
pub fn load_iptables(netns: &str, input: &str) -> Result<Duration> {
    load_iptables_with(netns, input, RestoreMode::KubeProxy)
}

/// [`load_iptables`] with a choice of flags.
pub fn load_iptables_with(netns: &str, input: &str, mode: RestoreMode) -> Result<Duration> {
    let args: &[&str] = match mode {
        RestoreMode::KubeProxy => &["-w", "5", "-W", "100000", "--noflush", "--counters"],
        RestoreMode::Replace => &["-w", "5", "-W", "100000", "--counters"],
    };
    run_with_input(netns, &tool("iptables-restore")?, args, input)
}

/// [`load_iptables_with`] in [`RestoreMode::Replace`], given up after `limit` (coreutils'
/// `timeout` kills it): `None` when it did not finish. iptables-nft 1.8.9 looks chains up by
/// name in a list, so 100,000 Services (1.1 million chains) did not finish in 30 minutes.
pub fn load_iptables_within(netns: &str, input: &str, limit: Duration) -> Result<Option<Duration>> {
    let ipt = tool("iptables-restore")?.display().to_string();
    let secs = limit.as_secs().max(1).to_string();
    let args = [
        "-s",
        "KILL",
        &secs,
        &ipt,
        "-w",
        "5",
        "-W",
        "100000",
        "--counters",
    ];
    let mut cmd = ns_command(netns, Path::new("/usr/bin/timeout"), args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting iptables-restore under timeout in {netns}"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let (_, output) = std::thread::scope(|scope| {
        // A killed reader ends the write with an error, which only says it was killed.
        let writer = scope.spawn(move || stdin.write_all(input.as_bytes()));
        let output = child.wait_with_output();
        (writer.join(), output)
    });
    let elapsed = start.elapsed();
    let output = output.with_context(|| format!("waiting for iptables-restore in {netns}"))?;
    use std::os::unix::process::ExitStatusExt as _;
    match (output.status.code(), output.status.signal()) {
        (Some(0), _) => Ok(Some(elapsed)),
        // `timeout -s KILL` signals its whole process group, itself included, so it dies of
        // the KILL too (or, run in the foreground, exits 128 + 9).
        (Some(137), _) | (None, Some(9)) if elapsed >= limit => Ok(None),
        _ => bail!(
            "iptables-restore in {netns} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}

/// Loads `input` with `nft -f -` (as knftables runs it) inside network namespace `netns`; returns
/// the wall time as [`load_iptables`] does.
///
/// kube-proxy's first sync is one transaction with an anonymous verdict map per Service (the
/// `numgen ... vmap { ... }`), and binding each of those walks the whole pending transaction in
/// the kernel (`__nft_set_trans_bind`), so the load time grows with the square of the Service
/// count: 1,000 × 10 endpoints take ~3 s, 2,000 × 10 ~13 s, 10,000 × 10 minutes (kernel 6.18,
/// nft 1.0.6).
pub fn load_nft(netns: &str, input: &str) -> Result<Duration> {
    run_with_input(netns, &tool("nft")?, &["-f", "-"], input)
}

/// Removes from `netns` what [`load_iptables`] added: every jump from a built-in chain into a
/// `KUBE-*` chain and every `KUBE-*` chain, in the nat and filter tables.
///
/// A table that holds nothing else (no other rules or chains, only ACCEPT policies) is deleted as
/// a whole: with iptables-nft it is an nftables table of the same name, which `nft` deletes at
/// once, so no empty base chain stays hooked either. Otherwise the jumps and chains are removed
/// with one `iptables-restore --noflush` per table, which iptables-nft 1.8.9 takes minutes over
/// for 10,000 Services (see [`RestoreMode::KubeProxy`]).
pub fn flush_iptables(netns: &str) -> Result<()> {
    let nft = if iptables_version()?.contains("nf_tables") {
        Some(tool("nft")?)
    } else {
        None
    };
    for table in ["nat", "filter"] {
        let saved = capture(netns, &tool("iptables-save")?, &["-t", table])?;
        let mut chains = String::new();
        let mut deletes = String::new();
        let mut removals = String::new();
        let mut foreign = 0usize;
        for line in saved.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if name.starts_with("KUBE-") {
                    chain_line(&mut chains, name);
                    let _ = writeln!(removals, "-X {name}");
                } else if decl.split_whitespace().nth(1) != Some("ACCEPT") {
                    // A chain of someone else's, or a built-in chain with a policy of its own.
                    foreign += 1;
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or_default();
                if chain.starts_with("KUBE-") {
                    continue;
                }
                if rule
                    .split_whitespace()
                    .any(|word| word.starts_with("KUBE-"))
                {
                    let _ = writeln!(deletes, "-D {rule}");
                } else {
                    foreign += 1;
                }
            }
        }
        if saved.trim().is_empty() {
            continue;
        }
        if let Some(nft) = &nft
            && foreign == 0
        {
            run_with_input(
                netns,
                nft,
                &["-f", "-"],
                &format!("add table ip {table}\ndelete table ip {table}\n"),
            )
            .with_context(|| format!("deleting the ip {table} table in {netns}"))?;
            continue;
        }
        if !chains.is_empty() || !deletes.is_empty() {
            let input = format!("*{table}\n{chains}{deletes}{removals}COMMIT\n");
            run_with_input(
                netns,
                &tool("iptables-restore")?,
                &["-w", "5", "-W", "100000", "--noflush"],
                &input,
            )
            .with_context(|| format!("removing kube-proxy's {table} chains from {netns}"))?;
        }
    }
    Ok(())
}

/// Deletes `table ip kube-proxy` from `netns` if it is there (added and deleted in one
/// transaction, so a missing table is not an error).
pub fn flush_nft(netns: &str) -> Result<()> {
    run_with_input(
        netns,
        &tool("nft")?,
        &["-f", "-"],
        &format!("add table {NFT_TABLE}\ndelete table {NFT_TABLE}\n"),
    )
    .map(drop)
    .with_context(|| format!("deleting {NFT_TABLE} in {netns}"))
}

/// Runs `program args` in `netns` with `input` on its stdin; fails with its stderr (and, for an
/// error that names an input line, that line).
fn run_with_input(netns: &str, program: &Path, args: &[&str], input: &str) -> Result<Duration> {
    let line = format!("{} {}", program.display(), args.join(" "));
    let mut cmd = ns_command(netns, program, args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{line}` in namespace {netns} via nsenter"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // Written from a thread of its own: a tool that fails early stops reading, and its output
    // pipes must still be drained meanwhile.
    let (written, output) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(input.as_bytes()));
        let output = child.wait_with_output();
        (writer.join(), output)
    });
    let elapsed = start.elapsed();
    let output = output.with_context(|| format!("waiting for `{line}` in namespace {netns}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr: String = stderr.trim().chars().take(2000).collect();
        let culprit = failed_input_line(&stderr, input)
            .map(|l| format!("\ninput line: {l}"))
            .unwrap_or_default();
        bail!(
            "`{line}` in namespace {netns} failed ({}): {stderr}{culprit}",
            output.status
        );
    }
    match written {
        Ok(Ok(())) => Ok(elapsed),
        Ok(Err(e)) => Err(e).with_context(|| format!("writing the input of `{line}`")),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The input line an iptables-restore (`line 3 failed`, `Error occurred at line: 3`) or nft
/// (`/dev/stdin:3:1-4: Error: ...`) error points at.
fn failed_input_line<'a>(stderr: &str, input: &'a str) -> Option<&'a str> {
    let leading_number = |rest: &str| -> Option<usize> {
        let digits: String = rest
            .trim_start_matches([':', ' '])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let number = stderr
        .split("line")
        .skip(1)
        .find_map(leading_number)
        .or_else(|| {
            ["/dev/stdin:", "-:"]
                .iter()
                .find_map(|tag| stderr.split(tag).nth(1).and_then(leading_number))
        })?;
    input.lines().nth(number.checked_sub(1)?)
}

/// Runs `program args` in `netns` and returns its stdout.
fn capture(netns: &str, program: &Path, args: &[&str]) -> Result<String> {
    let line = format!("{} {}", program.display(), args.join(" "));
    let out = ns_command(netns, program, args.iter().map(OsStr::new))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{line}` in namespace {netns}"))?;
    if !out.status.success() {
        bail!(
            "`{line}` in namespace {netns} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------------
// SHA-256 and base32, as Go's crypto/sha256 and encoding/base32.StdEncoding compute them
// ---------------------------------------------------------------------------------------------

/// SHA-256 (FIPS 180-4).
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut message = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bit_len.to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (state, value) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *state = state.wrapping_add(value);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// RFC 4648 base32 with the standard alphabet and `=` padding (Go's `base32.StdEncoding`).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let bits = u64::from_be_bytes([0, 0, 0, buf[0], buf[1], buf[2], buf[3], buf[4]]);
        let symbols = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < symbols {
                out.push(ALPHABET[((bits >> (35 - 5 * i)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, vip: [u8; 4], endpoints: &[[u8; 4]]) -> RuleService {
        RuleService {
            namespace: ns.into(),
            name: name.into(),
            port_name: "p80".into(),
            vip: Ipv4Addr::from(vip),
            port: 80,
            endpoints: endpoints
                .iter()
                .map(|&ip| (Ipv4Addr::from(ip), 80))
                .collect(),
            node_port: None,
        }
    }

    /// Upstream's ns3/svc3: a NodePort Service (3003, externalTrafficPolicy Cluster) with one
    /// endpoint; its node-port lines, verbatim from `TestOverallIPTablesRules` and
    /// `TestOverallNFTablesRules`.
    #[test]
    fn node_ports_match_upstream() {
        let svc3 = RuleService {
            node_port: Some(3003),
            ..svc("ns3", "svc3", [172, 30, 0, 43], &[[10, 180, 0, 3]])
        };
        let ipt = iptables_restore_input_with(std::slice::from_ref(&svc3), &upstream_options());
        for line in [
            ":KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]",
            "-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK",
            "-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment \"masquerade traffic for ns3/svc3:p80 external destinations\" -j KUBE-MARK-MASQ",
            "-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK",
        ] {
            assert!(ipt.lines().any(|l| l == line), "missing {line:?} in\n{ipt}");
        }
        let nft = nft_input_with(std::slice::from_ref(&svc3), &upstream_options());
        for line in [
            "add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80",
            "add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade",
            "add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80",
            "add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }",
        ] {
            assert!(nft.lines().any(|l| l == line), "missing {line:?} in\n{nft}");
        }

        let empty = RuleService {
            endpoints: vec![],
            ..svc3
        };
        let ipt = iptables_restore_input_with(std::slice::from_ref(&empty), &upstream_options());
        assert!(ipt.contains(
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"ns3/svc3:p80 has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3003 -j REJECT"
        ), "{ipt}");
        let nft = nft_input_with(std::slice::from_ref(&empty), &upstream_options());
        assert!(nft.contains(
            "add element ip kube-proxy no-endpoint-nodeports { tcp . 3003 comment \"ns3/svc3:p80\" : goto reject-chain }"
        ), "{nft}");
    }

    /// The ClusterIP parts of upstream's `TestOverallIPTablesRules` / `TestOverallNFTablesRules`:
    /// ns1/svc1 (one endpoint), ns4/svc4 (two endpoints, listed in reverse to check the sort),
    /// ns6/svc6 (no endpoints).
    fn upstream_services() -> Vec<RuleService> {
        vec![
            svc("ns1", "svc1", [172, 30, 0, 41], &[[10, 180, 0, 1]]),
            svc(
                "ns4",
                "svc4",
                [172, 30, 0, 44],
                &[[10, 180, 0, 5], [10, 180, 0, 4]],
            ),
            svc("ns6", "svc6", [172, 30, 0, 46], &[]),
        ]
    }

    /// The upstream test proxier: cluster CIDR 10.0.0.0/8, Service CIDR 172.30.0.0/16, node IP
    /// 192.168.0.2, nfacct counters present, no --random-fully (the fake iptables lacks it), and
    /// no jump rules (they are not part of the restore upstream checks).
    fn upstream_options() -> KubeProxyOptions {
        KubeProxyOptions {
            cluster_cidr: "10.0.0.0/8".into(),
            masquerade_mark: "0x4000".into(),
            random_fully: false,
            nfacct: true,
            localhost_nodeports: true,
            jump_rules: false,
            service_cidrs: Some("172.30.0.0/16".into()),
            nodeport_ips: vec![Ipv4Addr::new(192, 168, 0, 2)],
            first_sync: true,
        }
    }

    #[test]
    fn sha256_and_base32_match_known_vectors() {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Two blocks (56 bytes of message leave no room for the length in the first one).
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // RFC 4648 section 10.
        for (input, expected) in [
            ("", ""),
            ("f", "MY======"),
            ("fo", "MZXQ===="),
            ("foo", "MZXW6==="),
            ("foob", "MZXW6YQ="),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI======"),
        ] {
            assert_eq!(base32(input.as_bytes()), expected, "base32({input:?})");
        }
    }

    /// Chain names that appear in upstream's expected dumps
    /// (`pkg/proxy/iptables/proxier_test.go` `TestOverallIPTablesRules`,
    /// `pkg/proxy/nftables/proxier_test.go` `TestOverallNFTablesRules`).
    #[test]
    fn chain_names_match_upstream() {
        assert_eq!(
            service_chain_name("ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            endpoint_chain_name("ns1/svc1:p80", "tcp", "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            service_chain_name("ns4/svc4:p80", "tcp"),
            "KUBE-SVC-4SW47YFZTEDKD3PK"
        );
        assert_eq!(
            endpoint_chain_name("ns4/svc4:p80", "tcp", "10.180.0.4:80"),
            "KUBE-SEP-UKSFD7AGPMPPLUHC"
        );
        assert_eq!(
            endpoint_chain_name("ns4/svc4:p80", "tcp", "10.180.0.5:80"),
            "KUBE-SEP-C6EBXVWJJZMIWKLZ"
        );
        assert_eq!(
            service_chain_name("ns2/svc2:p8080", "tcp"),
            "KUBE-SVC-2VJB64SDSIJUP5T6"
        );

        let svcs = upstream_services();
        assert_eq!(
            nft_service_chain_name(&svcs[0], "tcp"),
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nft_endpoint_chain_name(&svcs[0], "tcp", (Ipv4Addr::new(10, 180, 0, 1), 80)),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        assert_eq!(
            nft_service_chain_name(&svcs[1], "tcp"),
            "service-LAUZTJTB-ns4/svc4/tcp/p80"
        );
        assert_eq!(
            nft_endpoint_chain_name(&svcs[1], "tcp", (Ipv4Addr::new(10, 180, 0, 4), 80)),
            "endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80"
        );
        assert_eq!(
            nft_endpoint_chain_name(&svcs[1], "tcp", (Ipv4Addr::new(10, 180, 0, 5), 80)),
            "endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80"
        );
    }

    #[test]
    fn unnamed_ports_hash_like_upstream() {
        let mut s = svc("ns1", "svc1", [172, 30, 0, 41], &[[10, 180, 0, 1]]);
        s.port_name.clear();
        assert_eq!(s.service_port_name(), "ns1/svc1");
        // servicePortChainNameBase with an empty port name keeps the trailing slash.
        assert!(nft_service_chain_name(&s, "tcp").ends_with("-ns1/svc1/tcp/"));
    }

    /// `computeProbability` is `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
    #[test]
    fn probability_is_formatted_like_go() {
        assert_eq!(probability(1), "1.0000000000");
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(6), "0.1666666667");
        assert_eq!(probability(7), "0.1428571429");
        assert_eq!(probability(9), "0.1111111111");
        assert_eq!(probability(10), "0.1000000000");
        assert_eq!(probability(1000), "0.0010000000");
    }

    /// The lines are verbatim from upstream `TestOverallIPTablesRules`
    /// (kubernetes/kubernetes `pkg/proxy/iptables/proxier_test.go`, the svc1/svc4/svc6 ClusterIP
    /// parts plus the fixed chains). Upstream's assertion sorts chains and rules before comparing;
    /// here they are in the order `syncProxyRules` writes them, which is what iptables-restore gets.
    #[test]
    fn iptables_input_matches_upstream_overall_test() {
        let expected = r#"*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"#;
        let got = iptables_restore_input_with(&upstream_services(), &upstream_options());
        assert_eq!(got, expected, "got:\n{got}");
    }

    #[test]
    fn iptables_lab_defaults_add_random_fully_and_jumps() {
        let svcs = vec![svc("ns1", "svc1", [198, 19, 0, 10], &[[198, 18, 64, 11]])];
        let got = iptables_restore_input(&svcs, CLUSTER_CIDR);
        for line in [
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 198.19.0.10 --dport 80 ! -s 198.18.64.0/18 -j KUBE-MARK-MASQ",
            "-I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-I POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
            "-I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-I INPUT -j KUBE-FIREWALL",
        ] {
            assert!(
                got.lines().any(|l| l == line),
                "missing {line:?} in:\n{got}"
            );
        }
        // The nat jumps are inside the nat section, after the chains they name are declared.
        let nat = &got[got.find("*nat").unwrap()..];
        assert!(nat.find(":KUBE-SERVICES").unwrap() < nat.find("-I PREROUTING").unwrap());
        assert!(nat.trim_end().ends_with("COMMIT"));
    }

    /// Three endpoints: the probability ladder 1/3, 1/2, then an unconditional jump.
    #[test]
    fn iptables_probability_ladder() {
        let s = svc(
            "ns1",
            "svc1",
            [172, 30, 0, 41],
            &[[10, 180, 0, 1], [10, 180, 0, 2], [10, 180, 0, 3]],
        );
        let got = iptables_restore_input_with(&[s], &upstream_options());
        let ladder: Vec<&str> = got
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains("-j KUBE-SEP-"))
            .collect();
        assert_eq!(ladder.len(), 3);
        assert!(ladder[0].contains("--probability 0.3333333333 -j"));
        assert!(ladder[1].contains("--probability 0.5000000000 -j"));
        assert!(!ladder[2].contains("statistic"));
    }

    /// Past 1000 endpoints in total, the SVC->SEP and SEP rules lose their comments; the
    /// KUBE-SERVICES and masquerade rules keep theirs.
    #[test]
    fn iptables_large_cluster_mode_drops_endpoint_comments() {
        let svcs = synthetic_services(101, |i| synthetic_endpoints(i, 10, 5000));
        let got = iptables_restore_input(&svcs, CLUSTER_CIDR);
        let first = got
            .lines()
            .find(|l| l.starts_with("-A KUBE-SEP-") && l.contains("DNAT"))
            .unwrap();
        assert!(!first.contains("comment"), "{first}");
        assert!(
            got.lines()
                .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains("-j KUBE-SEP-"))
                .all(|l| !l.contains("comment"))
        );
        assert!(
            got.contains(
                "-A KUBE-SERVICES -m comment --comment \"bench/svc-00000:http cluster IP\""
            )
        );
        let small = iptables_restore_input(&svcs[..100], CLUSTER_CIDR);
        assert!(small.contains("-m comment --comment bench/svc-00000:http -s "));
    }

    /// Every state line of upstream's `TestOverallNFTablesRules` expectation (kubernetes/kubernetes
    /// `pkg/proxy/nftables/proxier_test.go`: `baseRules` plus the svc1/svc4/svc6 ClusterIP parts,
    /// verbatim) must be in the transaction, and nothing else that survives it.
    #[test]
    fn nft_input_matches_upstream_overall_test() {
        let upstream = r#"
add table ip kube-proxy { comment "rules for kube-proxy" ; }

add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }

add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }

add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check

add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports

add element ip kube-proxy nodeport-ips { 192.168.0.2 }
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services

# svc1
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }

add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80

add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }

# svc4 (its ExternalIP lines left out)
add chain ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80
add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }
add chain ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80
add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 ip saddr 10.180.0.5 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 meta l4proto tcp dnat to 10.180.0.5:80
add chain ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80
add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 ip saddr 10.180.0.4 jump mark-for-masquerade
add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 meta l4proto tcp dnat to 10.180.0.4:80

add element ip kube-proxy cluster-ips { 172.30.0.44 }
add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }

# svc6
add element ip kube-proxy cluster-ips { 172.30.0.46 }
add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
"#;
        let got = nft_input_with(&upstream_services(), &upstream_options());
        let mut expected: Vec<&str> = upstream
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        // What survives the transaction: its "add" lines, less the base chains' add+delete pair
        // of a first sync, once each.
        let lines: Vec<&str> = got.lines().collect();
        let mut surviving: Vec<&str> = lines
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                l.starts_with("add ")
                    && !lines
                        .get(i + 1)
                        .is_some_and(|next| next.starts_with("delete chain "))
            })
            .map(|(_, l)| *l)
            .collect();
        surviving.sort_unstable();
        surviving.dedup();
        expected.sort_unstable();
        assert_eq!(surviving, expected);
    }

    /// The transaction of a first sync, in knftables' order, for one Service.
    #[test]
    fn nft_transaction_order() {
        let svcs = &upstream_services()[..1];
        let got = nft_input_with(svcs, &upstream_options());
        let t = "ip kube-proxy";
        let service_part = format!(
            "add chain {t} endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
flush chain {t} endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add chain {t} service-ULMVA6XW-ns1/svc1/tcp/p80
flush chain {t} service-ULMVA6XW-ns1/svc1/tcp/p80
add element {t} cluster-ips {{ 172.30.0.41 }}
add element {t} service-ips {{ 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }}
add rule {t} service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule {t} service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap {{ 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }}
add rule {t} endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule {t} endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
"
        );
        assert!(got.ends_with(&service_part), "got:\n{got}");
        assert!(got.starts_with(
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n\
             add chain ip kube-proxy filter-prerouting-pre-dnat\n\
             delete chain ip kube-proxy filter-prerouting-pre-dnat\n"
        ));
        // Every base chain is (re)created before anything jumps from it.
        let first = |needle: &str| got.find(needle).unwrap();
        assert!(
            first(
                "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }"
            ) < first("add rule ip kube-proxy nat-prerouting jump services")
        );
        // The maps are flushed after they are declared, before any element goes in.
        assert!(
            first("flush map ip kube-proxy service-ips")
                < first("add element ip kube-proxy service-ips")
        );
    }

    #[test]
    fn nft_lab_defaults() {
        let svcs = vec![svc("ns1", "svc1", [198, 19, 0, 10], &[[198, 18, 64, 11]])];
        let got = nft_input(&svcs, CLUSTER_CIDR);
        for line in [
            "add rule ip kube-proxy cluster-ips-check ip daddr { 198.19.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
            "add element ip kube-proxy nodeport-ips { 198.18.0.1 }",
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 198.19.0.10 ip saddr != 198.18.64.0/18 jump mark-for-masquerade",
        ] {
            assert!(
                got.lines().any(|l| l == line),
                "missing {line:?} in:\n{got}"
            );
        }
    }

    #[test]
    fn synthetic_services_are_distinct_and_in_range() {
        let svcs = synthetic_services(SYNTHETIC_VIPS_PER_PORT + 3, |i| {
            synthetic_endpoints(i, 10, 5000)
        });
        assert_eq!(svcs[42].name, "svc-00042");
        assert_eq!(svcs[42].namespace, "bench");
        assert_eq!(svcs[0].vip, Ipv4Addr::new(198, 19, 1, 1));
        assert_eq!(svcs[253].vip, Ipv4Addr::new(198, 19, 1, 254));
        assert_eq!(svcs[254].vip, Ipv4Addr::new(198, 19, 2, 1));
        assert_eq!(
            svcs[SYNTHETIC_VIPS_PER_PORT - 1].vip,
            Ipv4Addr::new(198, 19, 254, 254)
        );
        assert_eq!(svcs[SYNTHETIC_VIPS_PER_PORT].vip, svcs[0].vip);
        assert_eq!(svcs[SYNTHETIC_VIPS_PER_PORT].port, 81);
        let keys: HashSet<(Ipv4Addr, u16)> = svcs.iter().map(|s| (s.vip, s.port)).collect();
        assert_eq!(keys.len(), svcs.len());
        let last_lab_pod = u32::from(Ipv4Addr::new(198, 18, 64, 255));
        let cluster_broadcast = u32::from(Ipv4Addr::new(198, 18, 127, 255));
        for s in &svcs {
            let vip = s.vip.octets();
            assert!(vip[0] == 198 && vip[1] == 19 && vip[2] != 0 && vip[3] != 0 && vip[3] != 255);
            let eps: HashSet<_> = s.endpoints.iter().collect();
            assert_eq!(eps.len(), 10);
            for (ip, port) in &s.endpoints {
                let v = u32::from(*ip);
                assert!(v > last_lab_pod && v < cluster_broadcast, "{ip}");
                assert_eq!(*port, 5000);
            }
        }
        assert!(!svcs.iter().any(|s| s.vip == crate::SERVICE_VIP));
    }

    #[test]
    fn failed_line_is_found_in_tool_errors() {
        let input = "*nat\n:A - [0:0]\n-A A -j NOPE\nCOMMIT\n";
        assert_eq!(
            failed_input_line("iptables-restore: line 3 failed", input),
            Some("-A A -j NOPE")
        );
        assert_eq!(
            failed_input_line(
                "iptables-restore v1.8.9 (nf_tables): Chain 'NOPE' does not exist\n\
                 Error occurred at line: 4\nTry `iptables-restore -h' for more information.",
                input
            ),
            Some("COMMIT")
        );
        assert_eq!(
            failed_input_line(
                "/dev/stdin:2:22-32: Error: Could not process rule: No such file or directory",
                input
            ),
            Some(":A - [0:0]")
        );
        assert_eq!(failed_input_line("something else", input), None);
    }
}
