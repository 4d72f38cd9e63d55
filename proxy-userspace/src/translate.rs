//! Translation of cluster objects into the desired state (kube-proxy semantics).
//!
//! A pure function of (Services, EndpointSlices, Nodes, this node's name), modelled on upstream
//! kube-proxy: `pkg/proxy/servicechangetracker.go` + `serviceport.go` (which Services and ports
//! are proxied, frontends), `endpointslicecache.go` (slice merge, port matching, dedup) and
//! `topology.go` (`CategorizeEndpoints`: which endpoints a new connection may pick).
//!
//! Objects from a manifests directory never went through the API server, so the API server's
//! defaults are applied here (namespace `default`, protocol `TCP`, slice port name `""`, type
//! `ClusterIP`, traffic policies `Cluster`, affinity timeout 10800 s).
//!
//! IP families: upstream runs one proxier per family. Here one [`ServicePort`] carries both
//! families; a family takes part only if the Service has a cluster IP of that family (as
//! upstream, where the other family's proxier ignores the Service). Frontends: cluster IP,
//! node port (`0.0.0.0` / `::`), external and load-balancer IPs of those families. Endpoints:
//! slices of those families. Picks are computed per family and then united, so a consumer that
//! keeps only the indices of one family gets exactly what that family's kube-proxy would use
//! (the terminating fallback and topology hints must not see the other family's endpoints).

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::{
    core::v1::{Node, Service, ServicePort as K8sServicePort},
    discovery::v1::EndpointSlice,
};

use crate::{
    desired::{
        DesiredState, Endpoint, Frontend, FrontendKind, LbAlgorithm, Protocol, ServicePort,
        ServicePortName,
    },
    source::ClusterObjects,
};

/// On an EndpointSlice: the Service it belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// On a Service (or slice): another proxy implementation owns it.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// On a Service (or slice): headless, nothing to proxy.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// On a Service: `maglev` or `hash`, how its new flows pick a backend (default: vipx's
/// `--lb-algorithm`).
pub const ANNOTATION_LB_ALGORITHM: &str = "vipx.io/lb-algorithm";
/// On a Node: its zone, for topology hints.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// API validation's upper bound for the affinity timeout.
const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;
/// Namespace of an object whose manifest names none (what `kubectl apply` would do).
const DEFAULT_NAMESPACE: &str = "default";

/// The cluster objects `translate` reads, borrowed.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterInput<'a> {
    pub services: &'a [Service],
    pub slices: &'a [EndpointSlice],
    pub nodes: &'a [Node],
}

impl<'a> From<&'a ClusterObjects> for ClusterInput<'a> {
    fn from(objs: &'a ClusterObjects) -> Self {
        Self {
            services: &objs.services,
            slices: &objs.slices,
            nodes: &objs.nodes,
        }
    }
}

/// The desired state, and the objects (or parts of objects) that were skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub state: DesiredState,
    /// `"<namespace>/<name>: <reason>"`, one per skipped Service, port, slice or endpoint.
    pub problems: Vec<String>,
}

/// Translates the cluster objects into what this node (`node_name`) should program.
#[must_use]
pub fn translate(input: &ClusterInput<'_>, node_name: &str) -> Translation {
    let mut problems = Problems::default();
    let here = Here {
        node_name,
        zone: node_zone(input.nodes, node_name),
    };
    let slices = index_slices(input.slices, node_name, &mut problems);
    let mut state = DesiredState::default();
    let mut seen = HashSet::new();
    for service in input.services {
        translate_service(service, &slices, here, &mut seen, &mut state, &mut problems);
    }
    Translation {
        state,
        problems: problems.0,
    }
}

/// Where the translation runs: what "local" and topology hints are relative to.
#[derive(Clone, Copy)]
struct Here<'a> {
    node_name: &'a str,
    /// This node's `topology.kubernetes.io/zone`, "" when unknown.
    zone: &'a str,
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, namespace: &str, name: &str, reason: impl std::fmt::Display) {
        self.0.push(format!("{namespace}/{name}: {reason}"));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }
}

/// Parses an address the way the API server validates it. IPv4-mapped IPv6 is folded to IPv4
/// because Go's `net.IP.To4` does the same, so kube-proxy files such an address under IPv4.
fn parse_ip(text: &str) -> Option<IpAddr> {
    text.parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
        .filter(|ip| !ip.is_unspecified())
}

fn node_zone<'a>(nodes: &'a [Node], node_name: &str) -> &'a str {
    nodes
        .iter()
        .find(|node| node.metadata.name.as_deref() == Some(node_name))
        .and_then(|node| node.metadata.labels.as_ref())
        .and_then(|labels| labels.get(LABEL_ZONE))
        .map_or("", String::as_str)
}

/// Labels kube-proxy's informers select away (`!service-proxy-name,!headless`), for Services and
/// EndpointSlices alike.
fn not_for_this_proxy(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
}

// ---------------------------------------------------------------------------------------------
// EndpointSlices

/// One EndpointSlice, validated once so that its problems are reported once, not per service port.
struct SliceData<'a> {
    family: Family,
    /// (name, protocol, port number) with the API defaults applied.
    ports: Vec<(&'a str, &'a str, u16)>,
    endpoints: Vec<Candidate<'a>>,
}

/// An endpoint before it is bound to a port, with the topology hints `CategorizeEndpoints` reads.
#[derive(Debug)]
struct Candidate<'a> {
    addr: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    node_hints: Vec<&'a str>,
    zone_hints: Vec<&'a str>,
}

/// Slices by (namespace, service name), each list in slice-name order so that merging is
/// deterministic whatever order the files were read in.
type SliceIndex<'a> = BTreeMap<(&'a str, &'a str), Vec<SliceData<'a>>>;

fn index_slices<'a>(
    slices: &'a [EndpointSlice],
    node_name: &str,
    problems: &mut Problems,
) -> SliceIndex<'a> {
    let mut sorted: Vec<&EndpointSlice> = slices.iter().collect();
    sorted.sort_by_key(|s| (s.metadata.namespace.as_deref(), s.metadata.name.as_deref()));
    let mut seen = HashSet::new();
    let mut index = SliceIndex::new();
    for slice in sorted {
        let namespace = slice
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE);
        let Some(name) = slice.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
            problems.push(
                namespace,
                "<unnamed>",
                "EndpointSlice without metadata.name",
            );
            continue;
        };
        let labels = slice.metadata.labels.as_ref();
        if not_for_this_proxy(labels) {
            tracing::debug!(
                namespace,
                name,
                "EndpointSlice labelled for another proxy, skipped"
            );
            continue;
        }
        let Some(service) = labels
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .filter(|s| !s.is_empty())
        else {
            // Slices not managed for a Service are legitimate (custom controllers); upstream
            // ignores them too.
            tracing::debug!(
                namespace,
                name,
                "EndpointSlice without {LABEL_SERVICE_NAME}, skipped"
            );
            continue;
        };
        if !seen.insert((namespace, name)) {
            problems.push(
                namespace,
                name,
                "duplicate EndpointSlice, keeping the first",
            );
            continue;
        }
        let family = match slice.address_type.as_str() {
            "IPv4" => Family::V4,
            "IPv6" => Family::V6,
            "FQDN" => continue,
            other => {
                problems.push(
                    namespace,
                    name,
                    format_args!("EndpointSlice with unknown addressType {other:?}"),
                );
                continue;
            }
        };
        let data = slice_data(slice, family, node_name, |reason| {
            problems.push(namespace, name, format_args!("EndpointSlice {reason}"));
        });
        index
            .entry((namespace, service.as_str()))
            .or_default()
            .push(data);
    }
    index
}

fn slice_data<'a>(
    slice: &'a EndpointSlice,
    family: Family,
    node_name: &str,
    mut problem: impl FnMut(String),
) -> SliceData<'a> {
    let mut ports = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let port_name = port.name.as_deref().unwrap_or("");
        // A slice port without a number means "all ports" in the API, which no proxy implements
        // (upstream has a TODO for it); zero is the same.
        let number = match port.port {
            None | Some(0) => {
                problem(format!(
                    "ports[{i}] ({port_name:?}): no port number (\"all ports\" is not supported), \
                     skipped"
                ));
                continue;
            }
            Some(n) => match u16::try_from(n) {
                Ok(n) => n,
                Err(_) => {
                    problem(format!("ports[{i}] ({port_name:?}): port {n} out of range"));
                    continue;
                }
            },
        };
        ports.push((port_name, port.protocol.as_deref().unwrap_or("TCP"), number));
    }

    let mut endpoints = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        // Only the first address counts (the API says consumers may assume they are fungible).
        let Some(text) = endpoint.addresses.first() else {
            problem(format!("endpoints[{i}]: no addresses, skipped"));
            continue;
        };
        let Some(addr) = parse_ip(text) else {
            problem(format!(
                "endpoints[{i}]: {text:?} is not a usable IP address"
            ));
            continue;
        };
        if Family::of(addr) != family {
            problem(format!(
                "endpoints[{i}]: {addr} does not match addressType {}",
                slice.address_type
            ));
            continue;
        }
        let conditions = endpoint.conditions.as_ref();
        let hints = endpoint.hints.as_ref();
        endpoints.push(Candidate {
            addr,
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            local: !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.as_str())
                .collect(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.as_str())
                .collect(),
        });
    }
    SliceData {
        family,
        ports,
        endpoints,
    }
}

// ---------------------------------------------------------------------------------------------
// Services

/// What every port of one Service shares.
struct ServiceInfo {
    /// At most one per family.
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    lb_ips: Vec<IpAddr>,
    has_node_ports: bool,
    internal_local: bool,
    external_local: bool,
    affinity_timeout_s: Option<u32>,
    lb_algorithm: Option<LbAlgorithm>,
    /// A LoadBalancer Service with externalTrafficPolicy Local: its `healthCheckNodePort`.
    health_check_node_port: Option<u16>,
    /// `loadBalancerSourceRanges` of a LoadBalancer Service, IPv4.
    source_ranges: Vec<(Ipv4Addr, u8)>,
}

impl ServiceInfo {
    fn has_family(&self, family: Family) -> bool {
        self.cluster_ips.iter().any(|ip| Family::of(*ip) == family)
    }
}

fn translate_service(
    service: &Service,
    slices: &SliceIndex<'_>,
    here: Here<'_>,
    seen: &mut HashSet<(String, String)>,
    state: &mut DesiredState,
    problems: &mut Problems,
) {
    let namespace = service
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE);
    let Some(name) = service.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
        problems.push(namespace, "<unnamed>", "Service without metadata.name");
        return;
    };
    if !seen.insert((namespace.to_owned(), name.to_owned())) {
        problems.push(namespace, name, "duplicate Service, keeping the first");
        return;
    }
    let mut warnings = Vec::new();
    let info = service_info(service, &mut warnings);
    for reason in warnings {
        problems.push(namespace, name, reason);
    }
    let info = match info {
        Ok(Some(info)) => info,
        Ok(None) => return,
        Err(reason) => return problems.push(namespace, name, reason),
    };

    let service_slices = slices
        .get(&(namespace, name))
        .map_or(&[][..], Vec::as_slice);
    for (i, port) in service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .enumerate()
    {
        let port_name = port.name.as_deref().unwrap_or("");
        let what = format!("ports[{i}] ({port_name:?})");
        let Some((spn, service_port)) = translate_port(
            namespace,
            name,
            port,
            &info,
            service_slices,
            here,
            |reason| problems.push(namespace, name, format_args!("{what}: {reason}")),
        ) else {
            continue;
        };
        if state.services.contains_key(&spn) {
            problems.push(
                namespace,
                name,
                format_args!("{what}: {spn} is defined twice, keeping the first"),
            );
            continue;
        }
        state.services.insert(spn, service_port);
    }
    if let Some(port) = info.health_check_node_port {
        // Ready endpoints on this node, each counted once whatever its ports (kube-proxy counts
        // a Service's local endpoints).
        let local: HashSet<IpAddr> = state
            .services
            .iter()
            .filter(|(spn, _)| spn.namespace == namespace && spn.name == name)
            .flat_map(|(_, sp)| sp.endpoints.iter())
            .filter(|ep| ep.local && ep.ready)
            .map(|ep| ep.addr)
            .collect();
        state.health_checks.insert(
            (namespace.to_owned(), name.to_owned()),
            crate::desired::HealthCheck {
                port,
                local_endpoints: local.len(),
            },
        );
    }
}

/// `Ok(None)`: not proxied by design (headless, ExternalName, another proxy's). `Err`: unusable.
/// `warnings` gets the parts that were dropped while the rest is still used.
fn service_info(
    service: &Service,
    warnings: &mut Vec<String>,
) -> Result<Option<ServiceInfo>, String> {
    if not_for_this_proxy(service.metadata.labels.as_ref()) {
        return Ok(None);
    }
    let Some(spec) = service.spec.as_ref() else {
        return Ok(None);
    };
    let has_node_ports = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        // ExternalName is a DNS CNAME; even a stale clusterIP on it gets no VIP.
        "ExternalName" => return Ok(None),
        "ClusterIP" => false,
        "NodePort" | "LoadBalancer" => true,
        other => return Err(format!("unknown Service type {other:?}")),
    };

    let ip_texts: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    match ip_texts.first() {
        // Upstream's ShouldSkipService: no IP allocated yet, or headless.
        None | Some(&("" | "None")) => return Ok(None),
        Some(_) => {}
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for text in ip_texts {
        let Some(ip) = parse_ip(text) else {
            return Err(format!("invalid cluster IP {text:?}"));
        };
        if cluster_ips.iter().any(|c| Family::of(*c) == Family::of(ip)) {
            warnings.push(format!("second cluster IP of one family {ip} ignored"));
        } else {
            cluster_ips.push(ip);
        }
    }

    let family_filtered = |ip: IpAddr, field: &str| {
        if cluster_ips.iter().any(|c| Family::of(*c) == Family::of(ip)) {
            Some(ip)
        } else {
            // The other family's kube-proxy would own it, and it has no cluster IP to route to.
            tracing::debug!(%ip, field, "address of a family without a cluster IP, ignored");
            None
        }
    };
    let mut external_ips = Vec::new();
    for text in spec.external_ips.iter().flatten() {
        match parse_ip(text) {
            Some(ip) => external_ips.extend(family_filtered(ip, "externalIPs")),
            None => warnings.push(format!("invalid external IP {text:?} ignored")),
        }
    }
    let mut lb_ips = Vec::new();
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for ingress in ingress.into_iter().flatten() {
        let Some(text) = ingress.ip.as_deref().filter(|t| !t.is_empty()) else {
            continue;
        };
        // Upstream IsVIPMode: unset means VIP; `Proxy` means the load balancer itself proxies to
        // the node ports, so capturing the LB IP here would bypass it.
        if ingress.ip_mode.as_deref().is_some_and(|m| m != "VIP") {
            continue;
        }
        match parse_ip(text) {
            Some(ip) => lb_ips.extend(family_filtered(ip, "status.loadBalancer.ingress")),
            None => warnings.push(format!("invalid load balancer ingress IP {text:?} ignored")),
        }
    }

    // Upstream apiservice.ExternallyAccessible / ExternalPolicyLocal / InternalPolicyLocal.
    let externally_accessible = has_node_ports
        || spec
            .external_ips
            .as_ref()
            .is_some_and(|ips| !ips.is_empty());
    let external_local =
        externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");

    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let configured = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            Some(match configured {
                None => DEFAULT_AFFINITY_TIMEOUT_S,
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => t,
                    _ => {
                        warnings.push(format!(
                            "session affinity timeout {t} outside 1..={MAX_AFFINITY_TIMEOUT_S}, \
                             using {DEFAULT_AFFINITY_TIMEOUT_S}"
                        ));
                        DEFAULT_AFFINITY_TIMEOUT_S
                    }
                },
            })
        }
        None | Some("None") => None,
        Some(other) => {
            warnings.push(format!("unknown sessionAffinity {other:?}, using None"));
            None
        }
    };

    let lb_algorithm = match service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LB_ALGORITHM))
    {
        None => None,
        Some(v) => {
            let parsed = LbAlgorithm::parse(v.trim());
            if parsed.is_none() {
                warnings.push(format!(
                    "unknown {ANNOTATION_LB_ALGORITHM} {v:?} (maglev or hash), using the default"
                ));
            }
            parsed
        }
    };

    let is_lb = spec.type_.as_deref() == Some("LoadBalancer");
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) if is_lb && external_local => match u16::try_from(p) {
            Ok(p) if p != 0 => Some(p),
            _ => {
                warnings.push(format!("healthCheckNodePort {p} out of range, not served"));
                None
            }
        },
        _ => None,
    };

    let mut source_ranges = Vec::new();
    if is_lb {
        for text in spec.load_balancer_source_ranges.iter().flatten() {
            match text.parse::<crate::config::Cidr>() {
                Ok(crate::config::Cidr {
                    addr: IpAddr::V4(a),
                    prefix,
                }) => {
                    // The network address: an LPM key must not carry host bits.
                    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                    source_ranges.push((Ipv4Addr::from(u32::from(a) & mask), prefix));
                }
                // IPv6 ranges restrict IPv6 clients, which are not served yet.
                Ok(_) => {}
                Err(e) => warnings.push(format!("loadBalancerSourceRanges: {e}; ignored")),
            }
        }
        if source_ranges.is_empty()
            && spec
                .load_balancer_source_ranges
                .as_ref()
                .is_some_and(|r| !r.is_empty())
        {
            // Every range was bad: fail closed rather than open the Service to everyone.
            source_ranges.push((Ipv4Addr::BROADCAST, 32));
        }
    }

    Ok(Some(ServiceInfo {
        lb_algorithm,
        health_check_node_port,
        source_ranges,
        cluster_ips,
        external_ips,
        lb_ips,
        has_node_ports,
        internal_local,
        external_local,
        affinity_timeout_s,
    }))
}

fn translate_port(
    namespace: &str,
    name: &str,
    port: &K8sServicePort,
    info: &ServiceInfo,
    slices: &[SliceData<'_>],
    here: Here<'_>,
    mut problem: impl FnMut(String),
) -> Option<(ServicePortName, ServicePort)> {
    let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        other => {
            problem(format!("unknown protocol {other:?}"));
            return None;
        }
    };
    let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
        problem(format!("port {} out of range", port.port));
        return None;
    };
    let spn = ServicePortName {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        port_name: port.name.clone().unwrap_or_default(),
        protocol,
    };

    let mut frontends = Vec::new();
    let mut add = |addrs: &[IpAddr], port: u16, kind: FrontendKind| {
        frontends.extend(addrs.iter().map(|&addr| Frontend { addr, port, kind }));
    };
    add(&info.cluster_ips, number, FrontendKind::ClusterIp);
    add(&info.external_ips, number, FrontendKind::ExternalIp);
    add(&info.lb_ips, number, FrontendKind::LoadBalancer);
    match port.node_port {
        Some(np) if info.has_node_ports && np != 0 => match u16::try_from(np) {
            Ok(np) => {
                let unspecified: Vec<IpAddr> = Family::ALL
                    .into_iter()
                    .filter(|f| info.has_family(*f))
                    .map(Family::unspecified)
                    .collect();
                add(&unspecified, np, FrontendKind::NodePort);
            }
            Err(_) => problem(format!(
                "nodePort {np} out of range, no node port programmed"
            )),
        },
        _ => {}
    }
    // Deterministic, and grouped the way a reader expects: cluster IPs first.
    frontends.sort_by_key(|f| (f.kind, f.addr, f.port));
    frontends.dedup();

    let merged = merge_endpoints(&spn, slices, info);
    let endpoints: Vec<Endpoint> = merged
        .iter()
        .map(|&(port, c)| Endpoint {
            addr: c.addr,
            port,
            ready: c.ready,
            serving: c.serving,
            terminating: c.terminating,
            local: c.local,
        })
        .collect();
    let picks = categorize(&merged, here);
    let pick = |local: bool| {
        if local {
            picks.local.clone()
        } else {
            picks.cluster.clone()
        }
    };
    // Upstream proxier: "pod traffic for <svc> external destinations" jumps to the cluster policy
    // chain when that chain has endpoints.
    let pod_external_pick = if info.external_local && !picks.cluster.is_empty() {
        picks.cluster.clone()
    } else {
        pick(info.external_local)
    };

    Some((
        spn,
        ServicePort {
            frontends,
            internal_pick: pick(info.internal_local),
            external_pick: pick(info.external_local),
            pod_external_pick,
            endpoints,
            affinity_timeout_s: info.affinity_timeout_s,
            internal_local: info.internal_local,
            external_local: info.external_local,
            lb_algorithm: info.lb_algorithm,
            source_ranges: info.source_ranges.clone(),
        },
    ))
}

/// The endpoints of one service port across all its slices with their port numbers, sorted by
/// (addr, port), without the ones that are neither ready nor serving (no connection can be on
/// them).
fn merge_endpoints<'s, 'a>(
    spn: &ServicePortName,
    slices: &'s [SliceData<'a>],
    info: &ServiceInfo,
) -> Vec<(u16, &'s Candidate<'a>)> {
    let mut merged: BTreeMap<(IpAddr, u16), &'s Candidate<'a>> = BTreeMap::new();
    for slice in slices.iter().filter(|s| info.has_family(s.family)) {
        // Matched by port name and protocol only: the slice already carries the resolved target
        // port, which for a named targetPort can differ from pod to pod (one slice per number).
        let matching = slice
            .ports
            .iter()
            .filter(|(n, p, _)| *n == spn.port_name && *p == spn.protocol.as_str());
        for &(_, _, number) in matching {
            for candidate in &slice.endpoints {
                let key = (candidate.addr, number);
                // Upstream keeps a non-terminating endpoint over a terminating one with the same
                // IP:port (a pod IP reused before the old Pod object is gone). Among equals the
                // first slice in name order wins, which upstream leaves undefined.
                let replace = merged
                    .get(&key)
                    .is_none_or(|existing| existing.terminating && !candidate.terminating);
                if replace {
                    merged.insert(key, candidate);
                }
            }
        }
    }
    merged
        .into_iter()
        .filter(|(_, c)| c.ready || c.serving)
        .map(|((_, port), c)| (port, c))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Endpoint selection: upstream pkg/proxy/topology.go CategorizeEndpoints

#[derive(Debug, Default, PartialEq, Eq)]
struct Picks {
    /// Cluster traffic policy: ready endpoints after topology filtering, else serving+terminating.
    cluster: Vec<usize>,
    /// Local traffic policy: local ready endpoints, else local serving+terminating, else none.
    local: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    None,
    PreferSameNode,
    PreferSameZone,
}

/// Per family (see the module docs), then united; indices refer to `endpoints`.
fn categorize(endpoints: &[(u16, &Candidate<'_>)], here: Here<'_>) -> Picks {
    let Here { node_name, zone } = here;
    let mut picks = Picks::default();
    for family in Family::ALL {
        let of_family: Vec<(usize, &Candidate<'_>)> = endpoints
            .iter()
            .enumerate()
            .filter(|(_, (_, c))| Family::of(c.addr) == family)
            .map(|(i, &(_, c))| (i, c))
            .collect();
        let select = |pred: &dyn Fn(&Candidate<'_>) -> bool| -> Vec<usize> {
            of_family
                .iter()
                .filter(|(_, c)| pred(c))
                .map(|(i, _)| *i)
                .collect()
        };

        let mode = topology_mode(of_family.iter().map(|(_, c)| *c), node_name, zone);
        let mut cluster = select(&|c| c.ready && available_for_topology(c, mode, node_name, zone));
        if cluster.is_empty() {
            // Topology was already ignored if it left no ready endpoint, so reaching here means
            // there is no ready endpoint anywhere: fall back to terminating ones, cluster-wide.
            cluster = select(&|c| c.serving && c.terminating);
        }
        let mut local = select(&|c| c.local && c.ready);
        if local.is_empty() {
            local = select(&|c| c.local && c.serving && c.terminating);
        }
        picks.cluster.extend(cluster);
        picks.local.extend(local);
    }
    picks.cluster.sort_unstable();
    picks.local.sort_unstable();
    picks
}

/// Upstream topologyModeFromHints (with PreferSameTrafficDistribution enabled, its default since
/// v1.34): node hints if every ready endpoint has some and one names this node, else zone hints
/// likewise, else none. Only ready endpoints are looked at.
fn topology_mode<'c, 'a: 'c>(
    endpoints: impl Iterator<Item = &'c Candidate<'a>>,
    node_name: &str,
    zone: &str,
) -> TopologyMode {
    let ready: Vec<&Candidate<'_>> = endpoints.filter(|c| c.ready).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    let prefer = |hints: for<'x> fn(&'x Candidate<'a>) -> &'x [&'a str], wanted: &str| {
        ready.iter().all(|c| !hints(c).is_empty())
            && ready.iter().any(|c| hints(c).contains(&wanted))
    };
    if prefer(|c| &c.node_hints, node_name) {
        TopologyMode::PreferSameNode
    } else if prefer(|c| &c.zone_hints, zone) {
        TopologyMode::PreferSameZone
    } else {
        TopologyMode::None
    }
}

fn available_for_topology(
    c: &Candidate<'_>,
    mode: TopologyMode,
    node_name: &str,
    zone: &str,
) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => c.node_hints.contains(&node_name),
        TopologyMode::PreferSameZone => c.zone_hints.contains(&zone),
    }
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, net::SocketAddr, path::Path};

    use super::*;
    use crate::desired::HealthCheck;
    use crate::source;

    /// Strips the indentation common to all non-blank lines, so manifests can be written indented
    /// inside the test and still read like `kubectl get -o yaml` output.
    fn dedent(text: &str) -> String {
        let indent = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        text.lines()
            .map(|l| l.get(indent..).unwrap_or("").trim_end())
            .fold(String::new(), |mut out, l| {
                out.push_str(l);
                out.push('\n');
                out
            })
    }

    fn load(manifests: &str) -> ClusterObjects {
        // Cases glue documents together with `format!("{A}---{B}")`; each part may be indented
        // differently, so dedent them one by one.
        let text: Vec<String> = manifests.split("---").map(dedent).collect();
        let text = text.join("---\n");
        let objs = source::load_str("test.yaml", &text);
        assert_eq!(objs.problems, [], "the test manifests must load:\n{text}");
        objs
    }

    fn run(manifests: &str, node: &str) -> Translation {
        let objs = load(manifests);
        let t = translate(&ClusterInput::from(&objs), node);
        assert_eq!(
            translate(&ClusterInput::from(&digested(&objs, node)), node),
            t,
            "the change tracker's digests must translate like the objects:\n{manifests}"
        );
        t
    }

    /// `objs` as the change tracker keeps them (`crate::digest`) and gives them to `translate`.
    fn digested(objs: &ClusterObjects, node: &str) -> ClusterObjects {
        use crate::digest::{ServiceDigest, SliceDigest, node_object};
        let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            (
                m.namespace
                    .clone()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
                m.name.clone().unwrap_or_default(),
            )
        };
        ClusterObjects {
            services: objs
                .services
                .iter()
                .map(|s| {
                    let (ns, name) = key(&s.metadata);
                    ServiceDigest::of(s.clone()).to_object(&ns, &name)
                })
                .collect(),
            slices: objs
                .slices
                .iter()
                .map(|s| {
                    let (ns, name) = key(&s.metadata);
                    SliceDigest::of(s.clone()).to_object(&ns, &name)
                })
                .collect(),
            nodes: vec![node_object(node, Some(node_zone(&objs.nodes, node)))],
            problems: Vec::new(),
        }
    }

    /// One line per service port:
    /// `ns/name:port/PROTO fe[<kind> <addr:port>, ...] ep[<addr:port> <flags>, ...] int[..] ext[..]`
    /// with endpoint flags R(eady) S(erving) T(erminating) L(ocal), then the policy flags.
    fn summary(state: &DesiredState) -> Vec<String> {
        state
            .services
            .iter()
            .map(|(spn, sp)| {
                let frontends: Vec<String> = sp
                    .frontends
                    .iter()
                    .map(|f| {
                        let kind = match f.kind {
                            FrontendKind::ClusterIp => "cip",
                            FrontendKind::NodePort => "np",
                            FrontendKind::ExternalIp => "eip",
                            FrontendKind::LoadBalancer => "lb",
                        };
                        format!("{kind} {}", SocketAddr::new(f.addr, f.port))
                    })
                    .collect();
                let endpoints: Vec<String> = sp
                    .endpoints
                    .iter()
                    .map(|e| {
                        let flags: String = [
                            (e.ready, 'R'),
                            (e.serving, 'S'),
                            (e.terminating, 'T'),
                            (e.local, 'L'),
                        ]
                        .iter()
                        .filter(|(on, _)| *on)
                        .map(|(_, c)| c)
                        .collect();
                        format!("{} {flags}", SocketAddr::new(e.addr, e.port))
                    })
                    .collect();
                let mut line = format!(
                    "{spn} fe[{}] ep[{}] int{:?} ext{:?}",
                    frontends.join(", "),
                    endpoints.join(", "),
                    sp.internal_pick,
                    sp.external_pick
                );
                if sp.pod_external_pick != sp.external_pick {
                    let _ = write!(line, " podext{:?}", sp.pod_external_pick);
                }
                if sp.internal_local {
                    line.push_str(" itp=Local");
                }
                if sp.external_local {
                    line.push_str(" etp=Local");
                }
                if let Some(t) = sp.affinity_timeout_s {
                    let _ = write!(line, " affinity={t}s");
                }
                line
            })
            .collect()
    }

    const WEB: &str = "
        apiVersion: v1
        kind: Service
        metadata:
          name: web
          namespace: shop
        spec:
          clusterIP: 10.96.10.20
          clusterIPs:
          - 10.96.10.20
          ports:
          - name: http
            port: 80
            protocol: TCP
            targetPort: http
          selector:
            app: web
          type: ClusterIP
        ";

    /// Two ready endpoints of `web`, one per worker.
    const WEB_SLICE: &str = "
        addressType: IPv4
        apiVersion: discovery.k8s.io/v1
        endpoints:
        - addresses:
          - 10.244.1.5
          conditions:
            ready: true
            serving: true
            terminating: false
          nodeName: worker-1
        - addresses:
          - 10.244.2.7
          conditions:
            ready: true
            serving: true
            terminating: false
          nodeName: worker-2
        kind: EndpointSlice
        metadata:
          labels:
            kubernetes.io/service-name: web
          name: web-abcde
          namespace: shop
        ports:
        - name: http
          port: 8080
          protocol: TCP
        ";

    const WEB_BOTH_READY: &str = "shop/web:http/TCP fe[cip 10.96.10.20:80] \
        ep[10.244.1.5:8080 RSL, 10.244.2.7:8080 RS] int[0, 1] ext[0, 1]";

    /// `web` with a different spec, same slice.
    fn web_with(spec_extra: &str) -> String {
        format!(
            "{}{}---\n{}",
            dedent(WEB),
            dedent(spec_extra)
                .lines()
                .map(|l| format!("  {l}\n"))
                .collect::<String>(),
            dedent(WEB_SLICE)
        )
    }

    struct Case {
        name: &'static str,
        node: &'static str,
        manifests: String,
        want: &'static [&'static str],
        /// Substrings, one per expected problem, in order.
        problems: &'static [&'static str],
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "plain ClusterIP service, endpoints on two nodes",
                node: "worker-1",
                manifests: format!("{WEB}---{WEB_SLICE}"),
                want: &[WEB_BOTH_READY],
                problems: &[],
            },
            Case {
                name: "headless service is not proxied",
                node: "worker-1",
                manifests: format!(
                    "{}---{WEB_SLICE}",
                    WEB.replace("clusterIP: 10.96.10.20", "clusterIP: None")
                        .replace("- 10.96.10.20", "- None")
                ),
                want: &[],
                problems: &[],
            },
            Case {
                name: "ExternalName is not proxied, even with a stale clusterIP",
                node: "worker-1",
                manifests: format!(
                    "{}---{WEB_SLICE}",
                    WEB.replace("type: ClusterIP", "type: ExternalName\n          externalName: web.example.com")
                ),
                want: &[],
                problems: &[],
            },
            Case {
                name: "service-proxy-name and headless labels: not ours",
                node: "worker-1",
                manifests: format!(
                    "{}---{}---{WEB_SLICE}",
                    WEB.replace(
                        "  name: web\n",
                        "  labels:\n            service.kubernetes.io/service-proxy-name: other-proxy\n          name: web\n"
                    ),
                    WEB.replace(
                        "  name: web\n",
                        "  labels:\n            service.kubernetes.io/headless: \"\"\n          name: web2\n"
                    ),
                ),
                want: &[],
                problems: &[],
            },
            Case {
                name: "a Service without any cluster IP yet is skipped silently",
                node: "worker-1",
                manifests: WEB
                    .replace("          clusterIP: 10.96.10.20\n", "")
                    .replace("          clusterIPs:\n          - 10.96.10.20\n", ""),
                want: &[],
                problems: &[],
            },
            Case {
                name: "endpoints merged across slices",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}---{}",
                    slice("web", "web-abcde", "http", 8080, &[("10.244.1.5", "worker-1", READY)]),
                    slice("web", "web-fghij", "http", 8080, &[("10.244.2.7", "worker-2", READY)]),
                ),
                want: &[WEB_BOTH_READY],
                problems: &[],
            },
            Case {
                name: "named ports matched to slice ports by name, not by order or number",
                node: "worker-1",
                manifests: format!(
                    "{}---{}",
                    WEB.replace(
                        "          selector:",
                        "          - name: metrics\n            port: 9090\n            protocol: TCP\n            targetPort: metrics\n          selector:"
                    ),
                    dedent(WEB_SLICE).replace(
                        "ports:\n- name: http\n  port: 8080\n",
                        "ports:\n- name: metrics\n  port: 9102\n  protocol: TCP\n- name: http\n  port: 8080\n"
                    ),
                ),
                want: &[
                    WEB_BOTH_READY,
                    "shop/web:metrics/TCP fe[cip 10.96.10.20:9090] \
                     ep[10.244.1.5:9102 RSL, 10.244.2.7:9102 RS] int[0, 1] ext[0, 1]",
                ],
                problems: &[],
            },
            Case {
                name: "same port number over TCP and UDP: two service ports",
                node: "worker-1",
                manifests: format!(
                    "{}---{}",
                    WEB.replace(
                        "          - name: http\n            port: 80\n            protocol: TCP\n",
                        "          - name: tcp\n            port: 80\n            protocol: TCP\n            targetPort: 5000\n\
                         \x20         - name: udp\n            port: 80\n            protocol: UDP\n"
                    ),
                    dedent(WEB_SLICE).replace(
                        "ports:\n- name: http\n  port: 8080\n  protocol: TCP\n",
                        "ports:\n- name: tcp\n  port: 5000\n  protocol: TCP\n- name: udp\n  port: 5001\n  protocol: UDP\n"
                    ),
                ),
                want: &[
                    "shop/web:tcp/TCP fe[cip 10.96.10.20:80] \
                     ep[10.244.1.5:5000 RSL, 10.244.2.7:5000 RS] int[0, 1] ext[0, 1]",
                    "shop/web:udp/UDP fe[cip 10.96.10.20:80] \
                     ep[10.244.1.5:5001 RSL, 10.244.2.7:5001 RS] int[0, 1] ext[0, 1]",
                ],
                problems: &[],
            },
            Case {
                name: "slice port of another protocol does not match",
                node: "worker-1",
                manifests: format!("{WEB}---{}", WEB_SLICE.replace("protocol: TCP", "protocol: UDP")),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] ep[] int[] ext[]"],
                problems: &[],
            },
            Case {
                name: "endpoint without addresses is a slice problem",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}",
                    dedent(WEB_SLICE).replace("- addresses:\n  - 10.244.2.7\n", "- addresses: []\n")
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] ep[10.244.1.5:8080 RSL] int[0] ext[0]"],
                problems: &["shop/web-abcde: EndpointSlice endpoints[1]: no addresses, skipped"],
            },
            Case {
                name: "externalTrafficPolicy Local: pods reaching an external IP use the cluster endpoints",
                node: "worker-2",
                manifests: web_with("externalTrafficPolicy: Local\nexternalIPs:\n- 192.0.2.10"),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80, eip 192.0.2.10:80] \
                         ep[10.244.1.5:8080 RS, 10.244.2.7:8080 RSL] int[0, 1] ext[1] podext[0, 1] etp=Local"],
                problems: &[],
            },
            Case {
                name: "externalTrafficPolicy Local, no local endpoint: pods still reach the LB IP",
                node: "worker-3",
                manifests: format!(
                    "{}---{WEB_SLICE}",
                    WEB.replace(
                        "type: ClusterIP",
                        "type: LoadBalancer\n          externalTrafficPolicy: Local\n        status:\n          \
                         loadBalancer:\n            ingress:\n            - ip: 203.0.113.7"
                    )
                    .replace("targetPort: http", "targetPort: http\n            nodePort: 31000")
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80, np 0.0.0.0:31000, lb 203.0.113.7:80] \
                         ep[10.244.1.5:8080 RS, 10.244.2.7:8080 RS] int[0, 1] ext[] podext[0, 1] etp=Local"],
                problems: &[],
            },
            Case {
                name: "externalTrafficPolicy Local, only a local terminating endpoint: cluster fallback for pods",
                node: "worker-1",
                manifests: format!(
                    "{}---{}",
                    WEB.replace("type: ClusterIP", "type: ClusterIP\n          externalTrafficPolicy: Local\n          externalIPs:\n          - 192.0.2.10"),
                    slice(
                        "web",
                        "web-abcde",
                        "http",
                        8080,
                        &[("10.244.1.5", "worker-1", TERMINATING_SERVING), ("10.244.2.7", "worker-2", READY)]
                    ),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80, eip 192.0.2.10:80] \
                         ep[10.244.1.5:8080 STL, 10.244.2.7:8080 RS] int[1] ext[0] podext[1] etp=Local"],
                problems: &[],
            },
            Case {
                name: "externalTrafficPolicy Local without any endpoint: nothing to pick either way",
                node: "worker-1",
                manifests: format!(
                    "{}---{}",
                    WEB.replace("type: ClusterIP", "type: ClusterIP\n          externalTrafficPolicy: Local\n          externalIPs:\n          - 192.0.2.10"),
                    slice("web", "web-abcde", "http", 8080, &[("10.244.1.5", "worker-1", NOT_READY)]),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80, eip 192.0.2.10:80] ep[] int[] ext[] etp=Local"],
                problems: &[],
            },
            Case {
                name: "unnamed ports, slice port without name or protocol (API defaults)",
                node: "worker-1",
                manifests: format!(
                    "{}---{}",
                    WEB.replace("          - name: http\n            port: 80", "          - port: 80"),
                    dedent(WEB_SLICE).replace("- name: http\n  port: 8080\n  protocol: TCP\n", "- port: 8080\n"),
                ),
                want: &["shop/web/TCP fe[cip 10.96.10.20:80] \
                         ep[10.244.1.5:8080 RSL, 10.244.2.7:8080 RS] int[0, 1] ext[0, 1]"],
                problems: &[],
            },
            Case {
                name: "no ready endpoint: fall back to serving+terminating ones",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}",
                    slice(
                        "web",
                        "web-abcde",
                        "http",
                        8080,
                        &[
                            ("10.244.1.5", "worker-1", TERMINATING_SERVING),
                            ("10.244.2.7", "worker-2", TERMINATING_NOT_SERVING),
                        ]
                    ),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] ep[10.244.1.5:8080 STL] int[0] ext[0]"],
                problems: &[],
            },
            Case {
                name: "ready endpoints present: terminating one kept for its flows but not picked",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}",
                    slice(
                        "web",
                        "web-abcde",
                        "http",
                        8080,
                        &[
                            ("10.244.1.5", "worker-1", TERMINATING_SERVING),
                            ("10.244.2.7", "worker-2", READY),
                        ]
                    ),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] \
                         ep[10.244.1.5:8080 STL, 10.244.2.7:8080 RS] int[1] ext[1]"],
                problems: &[],
            },
            Case {
                name: "endpoint neither ready nor serving is excluded",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}",
                    slice(
                        "web",
                        "web-abcde",
                        "http",
                        8080,
                        &[("10.244.1.5", "worker-1", NOT_READY), ("10.244.2.7", "worker-2", READY)]
                    ),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] ep[10.244.2.7:8080 RS] int[0] ext[0]"],
                problems: &[],
            },
            Case {
                name: "internalTrafficPolicy Local: only this node's endpoints for the ClusterIP",
                node: "worker-2",
                manifests: web_with("internalTrafficPolicy: Local"),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] \
                         ep[10.244.1.5:8080 RS, 10.244.2.7:8080 RSL] int[1] ext[0, 1] itp=Local"],
                problems: &[],
            },
            Case {
                name: "internalTrafficPolicy Local on a node without endpoints: nothing to pick",
                node: "worker-3",
                manifests: web_with("internalTrafficPolicy: Local"),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] \
                         ep[10.244.1.5:8080 RS, 10.244.2.7:8080 RS] int[] ext[0, 1] itp=Local"],
                problems: &[],
            },
            Case {
                name: "internalTrafficPolicy Local falls back to the local terminating endpoint",
                node: "worker-1",
                manifests: format!(
                    "{}---{}",
                    dedent(WEB).replace("  type: ClusterIP", "  internalTrafficPolicy: Local\n  type: ClusterIP"),
                    slice(
                        "web",
                        "web-abcde",
                        "http",
                        8080,
                        &[
                            ("10.244.1.5", "worker-1", TERMINATING_SERVING),
                            ("10.244.2.7", "worker-2", READY),
                        ]
                    ),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] \
                         ep[10.244.1.5:8080 STL, 10.244.2.7:8080 RS] int[0] ext[1] itp=Local"],
                problems: &[],
            },
            Case {
                name: "NodePort with externalTrafficPolicy Local",
                node: "worker-2",
                manifests: format!(
                    "{}---{WEB_SLICE}",
                    WEB.replace("type: ClusterIP", "type: NodePort\n          externalTrafficPolicy: Local")
                        .replace("targetPort: http", "targetPort: http\n            nodePort: 30080")
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80, np 0.0.0.0:30080] \
                         ep[10.244.1.5:8080 RS, 10.244.2.7:8080 RSL] int[0, 1] ext[1] podext[0, 1] etp=Local"],
                problems: &[],
            },
            Case {
                name: "externalTrafficPolicy Local means nothing without an external frontend",
                node: "worker-2",
                manifests: web_with("externalTrafficPolicy: Local"),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] \
                         ep[10.244.1.5:8080 RS, 10.244.2.7:8080 RSL] int[0, 1] ext[0, 1]"],
                problems: &[],
            },
            Case {
                name: "nodePort left on a ClusterIP service is not programmed",
                node: "worker-1",
                manifests: format!("{}---{WEB_SLICE}", WEB.replace("targetPort: http", "targetPort: http\n            nodePort: 30080")),
                want: &[WEB_BOTH_READY],
                problems: &[],
            },
            Case {
                name: "LoadBalancer: node port, external IPs, VIP-mode ingress IPs, ClientIP affinity",
                node: "worker-1",
                manifests: format!(
                    "{}---{WEB_SLICE}",
                    WEB.replace(
                        "type: ClusterIP",
                        "type: LoadBalancer\n          externalIPs:\n          - 192.0.2.10\n          \
                         sessionAffinity: ClientIP\n          sessionAffinityConfig:\n            clientIP:\n              \
                         timeoutSeconds: 600\n        status:\n          loadBalancer:\n            ingress:\n            \
                         - ip: 203.0.113.7\n              ipMode: VIP\n            - ip: 203.0.113.8\n              \
                         ipMode: Proxy\n            - hostname: lb.example.com\n            - ip: 203.0.113.9"
                    )
                    .replace("targetPort: http", "targetPort: http\n            nodePort: 31000")
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80, np 0.0.0.0:31000, eip 192.0.2.10:80, \
                         lb 203.0.113.7:80, lb 203.0.113.9:80] \
                         ep[10.244.1.5:8080 RSL, 10.244.2.7:8080 RS] int[0, 1] ext[0, 1] affinity=600s"],
                problems: &[],
            },
            Case {
                name: "ClientIP affinity without a config: 10800 s",
                node: "worker-1",
                manifests: web_with("sessionAffinity: ClientIP"),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] \
                         ep[10.244.1.5:8080 RSL, 10.244.2.7:8080 RS] int[0, 1] ext[0, 1] affinity=10800s"],
                problems: &[],
            },
            Case {
                name: "duplicate IP:port across slices: the non-terminating endpoint wins (terminating first)",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}---{}",
                    slice("web", "web-aaaaa", "http", 8080, &[("10.244.1.5", "worker-1", TERMINATING_SERVING)]),
                    slice("web", "web-bbbbb", "http", 8080, &[("10.244.1.5", "worker-1", READY)]),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] ep[10.244.1.5:8080 RSL] int[0] ext[0]"],
                problems: &[],
            },
            Case {
                name: "duplicate IP:port across slices: the non-terminating endpoint wins (terminating last)",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}---{}",
                    slice("web", "web-aaaaa", "http", 8080, &[("10.244.1.5", "worker-1", READY)]),
                    slice("web", "web-bbbbb", "http", 8080, &[("10.244.1.5", "worker-1", TERMINATING_SERVING)]),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] ep[10.244.1.5:8080 RSL] int[0] ext[0]"],
                problems: &[],
            },
            Case {
                name: "invalid clusterIP: reported, the other services still translated",
                node: "worker-1",
                manifests: format!(
                    "{}---{WEB}---{WEB_SLICE}",
                    WEB.replace("name: web", "name: broken").replace("10.96.10.20", "10.96.300.1")
                ),
                want: &[WEB_BOTH_READY],
                problems: &["shop/broken: invalid cluster IP \"10.96.300.1\""],
            },
            Case {
                name: "slices of another service or another namespace are ignored",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}---{}---{}",
                    slice("web-canary", "web-canary-x1", "http", 8080, &[("10.244.3.3", "worker-1", READY)]),
                    slice("web", "web-abcde", "http", 8080, &[("10.244.1.5", "worker-1", READY)]),
                    slice("web", "web-other", "http", 8080, &[("10.244.4.4", "worker-1", READY)])
                        .replace("namespace: shop", "namespace: staging"),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] ep[10.244.1.5:8080 RSL] int[0] ext[0]"],
                problems: &[],
            },
            Case {
                name: "two ports with the same name and protocol: the first wins",
                node: "worker-1",
                manifests: format!(
                    "{}---{WEB_SLICE}",
                    WEB.replace(
                        "          selector:",
                        "          - name: http\n            port: 8000\n            protocol: TCP\n          selector:"
                    )
                ),
                want: &[WEB_BOTH_READY],
                problems: &["shop/web: ports[1] (\"http\"): shop/web:http/TCP is defined twice"],
            },
            Case {
                name: "unknown protocol: only that port is skipped",
                node: "worker-1",
                manifests: format!(
                    "{}---{WEB_SLICE}",
                    WEB.replace(
                        "          selector:",
                        "          - name: quic\n            port: 443\n            protocol: QUIC\n          selector:"
                    )
                ),
                want: &[WEB_BOTH_READY],
                problems: &["shop/web: ports[1] (\"quic\"): unknown protocol \"QUIC\""],
            },
            Case {
                name: "zone hints: every ready endpoint hinted, one for this node's zone",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}---{NODES}",
                    slice_with_hints(&[
                        ("10.244.1.5", "worker-1", "forZones:\n    - name: zone-a"),
                        ("10.244.2.7", "worker-2", "forZones:\n    - name: zone-b"),
                        ("10.244.3.9", "worker-3", "forZones:\n    - name: zone-a"),
                    ]),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] \
                         ep[10.244.1.5:8080 RSL, 10.244.2.7:8080 RS, 10.244.3.9:8080 RS] int[0, 2] ext[0, 2]"],
                problems: &[],
            },
            Case {
                name: "zone hints ignored when one ready endpoint has none",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}---{NODES}",
                    slice_with_hints(&[
                        ("10.244.1.5", "worker-1", "forZones:\n    - name: zone-a"),
                        ("10.244.2.7", "worker-2", "forZones: []"),
                    ]),
                ),
                want: &[WEB_BOTH_READY],
                problems: &[],
            },
            Case {
                name: "zone hints ignored when none names this node's zone",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}---{NODES}",
                    slice_with_hints(&[
                        ("10.244.1.5", "worker-1", "forZones:\n    - name: zone-c"),
                        ("10.244.2.7", "worker-2", "forZones:\n    - name: zone-b"),
                    ]),
                ),
                want: &[WEB_BOTH_READY],
                problems: &[],
            },
            Case {
                name: "node hints (PreferSameNode) win over zone hints",
                node: "worker-2",
                manifests: format!(
                    "{WEB}---{}---{NODES}",
                    slice_with_hints(&[
                        ("10.244.1.5", "worker-1", "forNodes:\n    - name: worker-1\n    forZones:\n    - name: zone-b"),
                        ("10.244.2.7", "worker-2", "forNodes:\n    - name: worker-2\n    forZones:\n    - name: zone-b"),
                    ]),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] \
                         ep[10.244.1.5:8080 RS, 10.244.2.7:8080 RSL] int[1] ext[1]"],
                problems: &[],
            },
            Case {
                name: "dual-stack: both families' frontends; fallback decided per family; FQDN ignored",
                node: "worker-1",
                manifests: format!(
                    "{}---{}---{}---{}",
                    WEB.replace("  - 10.96.10.20\n", "  - 10.96.10.20\n          - fd00:10:96::a14\n")
                        .replace("targetPort: http", "targetPort: http\n            nodePort: 30080")
                        .replace("type: ClusterIP", "type: NodePort"),
                    slice("web", "web-v4", "http", 8080, &[("10.244.1.5", "worker-1", TERMINATING_SERVING)]),
                    slice("web", "web-v6", "http", 8080, &[("fd00:10:244:2::7", "worker-2", READY)])
                        .replace("addressType: IPv4", "addressType: IPv6"),
                    slice("web", "web-fqdn", "http", 8080, &[("web.example.com", "worker-2", READY)])
                        .replace("addressType: IPv4", "addressType: FQDN"),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80, cip [fd00:10:96::a14]:80, \
                         np 0.0.0.0:30080, np [::]:30080] \
                         ep[10.244.1.5:8080 STL, [fd00:10:244:2::7]:8080 RS] int[0, 1] ext[0, 1]"],
                problems: &[],
            },
            Case {
                name: "single-stack IPv4 service ignores IPv6 slices and IPv6 external IPs",
                node: "worker-1",
                manifests: format!(
                    "{}---{}---{}",
                    WEB.replace("type: ClusterIP", "type: ClusterIP\n          externalIPs:\n          - 2001:db8::10"),
                    slice("web", "web-v4", "http", 8080, &[("10.244.1.5", "worker-1", READY)]),
                    slice("web", "web-v6", "http", 8080, &[("fd00:10:244:2::7", "worker-2", READY)])
                        .replace("addressType: IPv4", "addressType: IPv6"),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] ep[10.244.1.5:8080 RSL] int[0] ext[0]"],
                problems: &[],
            },
            Case {
                name: "bad endpoint addresses are slice problems; only addresses[0] is used",
                node: "worker-1",
                manifests: format!(
                    "{WEB}---{}",
                    slice(
                        "web",
                        "web-abcde",
                        "http",
                        8080,
                        &[
                            ("not-an-ip", "worker-1", READY),
                            ("fd00::1", "worker-1", READY),
                            ("10.244.1.5\n    - 10.244.1.6", "worker-1", READY),
                        ]
                    ),
                ),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] ep[10.244.1.5:8080 RSL] int[0] ext[0]"],
                problems: &[
                    "shop/web-abcde: EndpointSlice endpoints[0]: \"not-an-ip\" is not a usable IP address",
                    "shop/web-abcde: EndpointSlice endpoints[1]: fd00::1 does not match addressType IPv4",
                ],
            },
            Case {
                name: "slice port without a number is skipped",
                node: "worker-1",
                manifests: format!("{WEB}---{}", WEB_SLICE.replace("          port: 8080\n", "")),
                want: &["shop/web:http/TCP fe[cip 10.96.10.20:80] ep[] int[] ext[]"],
                problems: &["shop/web-abcde: EndpointSlice ports[0] (\"http\"): no port number"],
            },
            Case {
                name: "out-of-range numbers are problems, never panics",
                node: "worker-1",
                manifests: format!(
                    "{}---{}",
                    WEB.replace(
                        "          selector:",
                        "          - name: big\n            port: 70000\n          - name: np\n            port: 81\n            \
                         nodePort: -1\n          selector:"
                    )
                    .replace("type: ClusterIP", "type: NodePort\n          sessionAffinity: ClientIP\n          \
                              sessionAffinityConfig:\n            clientIP:\n              timeoutSeconds: -5"),
                    WEB_SLICE.replace("port: 8080", "port: 99999"),
                ),
                want: &[
                    "shop/web:http/TCP fe[cip 10.96.10.20:80] ep[] int[] ext[] affinity=10800s",
                    "shop/web:np/TCP fe[cip 10.96.10.20:81] ep[] int[] ext[] affinity=10800s",
                ],
                problems: &[
                    "shop/web-abcde: EndpointSlice ports[0] (\"http\"): port 99999 out of range",
                    "shop/web: session affinity timeout -5 outside 1..=86400",
                    "shop/web: ports[1] (\"big\"): port 70000 out of range",
                    "shop/web: ports[2] (\"np\"): nodePort -1 out of range",
                ],
            },
            Case {
                name: "duplicate Service object: the first is kept",
                node: "worker-1",
                manifests: format!("{WEB}---{}---{WEB_SLICE}", WEB.replace("10.96.10.20", "10.96.10.99")),
                want: &[WEB_BOTH_READY],
                problems: &["shop/web: duplicate Service, keeping the first"],
            },
        ]
    }

    const READY: &str = "ready: true\n    serving: true\n    terminating: false";
    const NOT_READY: &str = "ready: false\n    serving: false\n    terminating: false";
    const TERMINATING_SERVING: &str = "ready: false\n    serving: true\n    terminating: true";
    const TERMINATING_NOT_SERVING: &str = "ready: false\n    serving: false\n    terminating: true";

    const NODES: &str = "
        apiVersion: v1
        kind: NodeList
        items:
        - metadata:
            labels:
              topology.kubernetes.io/zone: zone-a
            name: worker-1
        - metadata:
            labels:
              topology.kubernetes.io/zone: zone-b
            name: worker-2
        ";

    /// An EndpointSlice of `service` in namespace `shop` with one port and the given endpoints
    /// (address, node, conditions block).
    fn slice(
        service: &str,
        name: &str,
        port_name: &str,
        port: u16,
        endpoints: &[(&str, &str, &str)],
    ) -> String {
        let mut out =
            String::from("addressType: IPv4\napiVersion: discovery.k8s.io/v1\nendpoints:\n");
        for (addr, node, conditions) in endpoints {
            let _ = write!(
                out,
                "- addresses:\n    - {addr}\n  conditions:\n    {conditions}\n  nodeName: {node}\n"
            );
        }
        if endpoints.is_empty() {
            out = out.replace("endpoints:\n", "endpoints: []\n");
        }
        let _ = write!(
            out,
            "kind: EndpointSlice\nmetadata:\n  labels:\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\n    \
             kubernetes.io/service-name: {service}\n  name: {name}\n  namespace: shop\n\
             ports:\n- name: {port_name}\n  port: {port}\n  protocol: TCP\n"
        );
        out
    }

    /// A ready slice of `web` whose endpoints carry the given `hints:` bodies.
    fn slice_with_hints(endpoints: &[(&str, &str, &str)]) -> String {
        let with_hints: Vec<(&str, &str, String)> = endpoints
            .iter()
            .map(|(addr, node, hints)| (*addr, *node, format!("{READY}\n  hints:\n    {hints}")))
            .collect();
        let borrowed: Vec<(&str, &str, &str)> = with_hints
            .iter()
            .map(|(a, n, c)| (*a, *n, c.as_str()))
            .collect();
        slice("web", "web-abcde", "http", 8080, &borrowed)
    }

    #[test]
    fn table() {
        for case in cases() {
            // Shown by the test harness when an assertion inside `run` fails.
            println!("case {:?}", case.name);
            let t = run(&case.manifests, case.node);
            assert_eq!(summary(&t.state), case.want, "case {:?}", case.name);
            assert_eq!(
                t.problems.len(),
                case.problems.len(),
                "case {:?}: problems {:#?}",
                case.name,
                t.problems
            );
            for (got, want) in t.problems.iter().zip(case.problems) {
                assert!(
                    got.contains(want),
                    "case {:?}: problem {got:?} lacks {want:?}",
                    case.name
                );
            }
        }
    }

    /// A LoadBalancer Service with externalTrafficPolicy Local has a health check node port
    /// answering with its local ready endpoints (one on worker-1, none on worker-3); with
    /// Cluster, or as a NodePort, it has none.
    #[test]
    fn health_check_node_ports_count_local_ready_endpoints() {
        let lb = WEB
            .replace("type: ClusterIP", "type: LoadBalancer\n          externalTrafficPolicy: Local\n          healthCheckNodePort: 32100")
            .replace("targetPort: http", "targetPort: http\n            nodePort: 31000");
        let manifests = format!("{lb}---{WEB_SLICE}");
        let key = ("shop".to_owned(), "web".to_owned());
        let t = run(&manifests, "worker-1");
        assert_eq!(
            t.state.health_checks.get(&key),
            Some(&HealthCheck {
                port: 32100,
                local_endpoints: 1
            })
        );
        let t = run(&manifests, "worker-3");
        assert_eq!(t.state.health_checks[&key].local_endpoints, 0);
        let cluster = manifests.replace(
            "externalTrafficPolicy: Local",
            "externalTrafficPolicy: Cluster",
        );
        assert!(run(&cluster, "worker-1").state.health_checks.is_empty());
        let node_port = manifests.replace("type: LoadBalancer", "type: NodePort");
        assert!(run(&node_port, "worker-1").state.health_checks.is_empty());
    }

    /// loadBalancerSourceRanges of a LoadBalancer Service: IPv4 ranges as networks (host bits
    /// cleared), IPv6 ones left to IPv6, a bad one reported; all bad: closed to everyone rather
    /// than open; on a NodePort Service, ignored.
    #[test]
    fn load_balancer_source_ranges_are_parsed_and_fail_closed() {
        let with = |ranges: &str, kind: &str| {
            let svc = WEB
                .replace(
                    "type: ClusterIP",
                    &format!("type: {kind}\n          loadBalancerSourceRanges: [{ranges}]"),
                )
                .replace(
                    "targetPort: http",
                    "targetPort: http\n            nodePort: 31000",
                );
            let t = run(&format!("{svc}---{WEB_SLICE}"), "worker-1");
            let sp = t.state.services.values().next().unwrap().clone();
            (sp.source_ranges, t.problems)
        };
        let (r, p) = with("198.51.100.7/24, 2001:db8::/32", "LoadBalancer");
        assert_eq!(r, [(Ipv4Addr::new(198, 51, 100, 0), 24)]);
        assert!(p.is_empty(), "{p:?}");
        let (r, p) = with("not-a-cidr", "LoadBalancer");
        assert_eq!(r, [(Ipv4Addr::BROADCAST, 32)], "closed, not open");
        assert_eq!(p.len(), 1, "{p:?}");
        let (r, _) = with("198.51.100.0/24", "NodePort");
        assert!(r.is_empty());
    }

    /// The seed scenario: simpleapi-service (10.102.82.168:80 -> 5000, app=backend), first with one
    /// ready backend, then with two after the Deployment scales up.
    #[test]
    fn seed_simpleapi_one_then_two_endpoints() {
        const SERVICE: &str = "
            apiVersion: v1
            kind: Service
            metadata:
              name: simpleapi-service
              namespace: default
            spec:
              clusterIP: 10.102.82.168
              clusterIPs:
              - 10.102.82.168
              internalTrafficPolicy: Cluster
              ipFamilies:
              - IPv4
              ipFamilyPolicy: SingleStack
              ports:
              - port: 80
                protocol: TCP
                targetPort: 5000
              selector:
                app: backend
              sessionAffinity: None
              type: ClusterIP
            ";
        const ONE: &str = "
            addressType: IPv4
            apiVersion: discovery.k8s.io/v1
            endpoints:
            - addresses:
              - 10.244.1.5
              conditions:
                ready: true
                serving: true
                terminating: false
              nodeName: worker-1
              targetRef:
                kind: Pod
                name: backend-7d9c6b7f5-4xq2m
                namespace: default
            kind: EndpointSlice
            metadata:
              generateName: simpleapi-service-
              labels:
                endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
                kubernetes.io/service-name: simpleapi-service
              name: simpleapi-service-7xk2p
              namespace: default
            ports:
            - name: \"\"
              port: 5000
              protocol: TCP
            ";
        let two = ONE.replace(
            "            kind: EndpointSlice",
            "            - addresses:
              - 10.244.2.7
              conditions:
                ready: true
                serving: true
                terminating: false
              nodeName: worker-2
              targetRef:
                kind: Pod
                name: backend-7d9c6b7f5-9kz7w
                namespace: default
            kind: EndpointSlice",
        );

        let t = run(&format!("{SERVICE}---{ONE}"), "worker-2");
        assert_eq!(t.problems, Vec::<String>::new());
        assert_eq!(
            summary(&t.state),
            [
                "default/simpleapi-service/TCP fe[cip 10.102.82.168:80] ep[10.244.1.5:5000 RS] int[0] ext[0]"
            ]
        );

        let t = run(&format!("{SERVICE}---{two}"), "worker-2");
        assert_eq!(t.problems, Vec::<String>::new());
        assert_eq!(
            summary(&t.state),
            ["default/simpleapi-service/TCP fe[cip 10.102.82.168:80] \
              ep[10.244.1.5:5000 RS, 10.244.2.7:5000 RSL] int[0, 1] ext[0, 1]"]
        );
        let spn = ServicePortName {
            namespace: "default".into(),
            name: "simpleapi-service".into(),
            port_name: String::new(),
            protocol: Protocol::Tcp,
        };
        let port = &t.state.services[&spn];
        assert_eq!(
            port.frontends,
            [Frontend {
                addr: IpAddr::V4(Ipv4Addr::new(10, 102, 82, 168)),
                port: 80,
                kind: FrontendKind::ClusterIp
            }]
        );
        assert_eq!(port.affinity_timeout_s, None);
        assert!(!port.internal_local && !port.external_local);
    }

    /// `vipx.io/lb-algorithm` passes through (also through the change tracker's digests, which
    /// `run` checks); an unknown value is reported and the default used.
    #[test]
    fn lb_algorithm_annotation() {
        let annotated = |v: &str| {
            WEB.replace(
                "          namespace: shop\n",
                &format!(
                    "          namespace: shop\n          annotations:\n            vipx.io/lb-algorithm: {v}\n"
                ),
            )
        };
        for (value, want, problems) in [
            ("maglev", Some(LbAlgorithm::Maglev), 0),
            ("hash", Some(LbAlgorithm::Hash), 0),
            ("random", None, 1),
        ] {
            let t = run(&format!("{}---{WEB_SLICE}", annotated(value)), "worker-1");
            let port = t.state.services.values().next().expect("web is translated");
            assert_eq!(port.lb_algorithm, want, "{value}");
            assert_eq!(t.problems.len(), problems, "{value}: {:?}", t.problems);
            if problems > 0 {
                assert!(
                    t.problems[0].contains("vipx.io/lb-algorithm"),
                    "{:?}",
                    t.problems
                );
            }
        }
        let t = run(&format!("{WEB}---{WEB_SLICE}"), "worker-1");
        assert_eq!(t.state.services.values().next().unwrap().lb_algorithm, None);
    }

    #[test]
    fn fixture_directory_translates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/manifests");
        let objs = source::load_dir(&dir);
        assert_eq!(objs.problems, []);
        let t = translate(&ClusterInput::from(&objs), "worker-1");
        assert_eq!(t.problems, Vec::<String>::new());
        assert_eq!(
            summary(&t.state),
            ["default/simpleapi-service/TCP fe[cip 198.19.82.168:80] \
              ep[198.18.1.5:5000 RSL, 198.18.2.7:5000 RS] int[0, 1] ext[0, 1]"]
        );
    }

    #[test]
    fn input_order_does_not_matter() {
        let objs = load(&format!(
            "{WEB}---{}---{}---{}",
            slice(
                "web",
                "web-b",
                "http",
                8080,
                &[("10.244.1.5", "worker-1", READY)]
            ),
            slice(
                "web",
                "web-a",
                "http",
                8080,
                &[
                    ("10.244.1.5", "worker-2", READY),
                    ("10.244.2.7", "worker-2", READY)
                ]
            ),
            slice(
                "web",
                "web-c",
                "http",
                8080,
                &[("10.244.0.1", "worker-1", TERMINATING_SERVING)]
            ),
        ));
        let forward = translate(&ClusterInput::from(&objs), "worker-1");
        let mut reversed = objs.clone();
        reversed.slices.reverse();
        reversed.services.reverse();
        assert_eq!(
            translate(&ClusterInput::from(&reversed), "worker-1"),
            forward
        );
    }

    #[test]
    fn empty_node_name_makes_nothing_local() {
        let t = run(
            &format!("{WEB}---{}", WEB_SLICE.replace("worker-1", "")),
            "",
        );
        assert!(
            t.state
                .services
                .values()
                .all(|p| p.endpoints.iter().all(|e| !e.local))
        );
    }
}
