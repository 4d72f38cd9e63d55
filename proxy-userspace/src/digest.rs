//! Compact digests of Services and EndpointSlices: what the change tracker keeps between syncs
//! instead of whole API objects.
//!
//! A digest holds exactly the fields `translate` reads, in a smaller form (an endpoint's address
//! parsed, the node names of a slice's endpoints shared); managedFields, annotations (but
//! `vipx.io/lb-algorithm`), other
//! labels, target references and the rest are dropped on arrival. `to_object` gives back an object with
//! only those fields, which `translate` turns into the same desired state and the same problems as
//! the original (`translates_like_the_original` checks this on every fixture manifest).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, Service,
            ServicePort as K8sServicePort, ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    source::{ClusterObjects, Problem},
    translate::{
        ANNOTATION_LB_ALGORITHM, LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME,
        LABEL_ZONE,
    },
};

/// Labels kube-proxy selects away, reduced to whether one is there (`translate` reads no more).
fn for_another_proxy(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
}

fn meta(
    namespace: Option<&str>,
    name: Option<&str>,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        labels: (!labels.is_empty()).then_some(labels),
        ..ObjectMeta::default()
    }
}

/// The labels that stand for `for_another_proxy` (any value does).
fn another_proxy_labels(yes: bool) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if yes {
        labels.insert(LABEL_SERVICE_PROXY_NAME.to_owned(), String::new());
    }
    labels
}

/// What `translate` reads of a Service besides its namespace and name (the tracker's key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDigest {
    for_another_proxy: bool,
    spec: Option<Box<SpecDigest>>,
    /// `status.loadBalancer.ingress` entries with an IP: (ip, ipMode).
    lb_ingress: Vec<(String, Option<String>)>,
    /// The `vipx.io/lb-algorithm` annotation as written (`translate` reports a bad one).
    lb_algorithm: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct SpecDigest {
    type_: Option<String>,
    cluster_ip: Option<String>,
    cluster_ips: Option<Vec<String>>,
    external_ips: Option<Vec<String>>,
    external_traffic_policy: Option<String>,
    health_check_node_port: Option<i32>,
    load_balancer_source_ranges: Option<Vec<String>>,
    internal_traffic_policy: Option<String>,
    session_affinity: Option<String>,
    affinity_timeout_s: Option<i32>,
    ports: Vec<PortDigest>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PortDigest {
    name: Option<String>,
    protocol: Option<String>,
    port: i32,
    node_port: Option<i32>,
}

impl ServiceDigest {
    pub fn of(service: Service) -> Self {
        let for_another_proxy = for_another_proxy(&service.metadata);
        let lb_algorithm = service
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_LB_ALGORITHM))
            .cloned();
        let spec = service.spec.map(|s| {
            Box::new(SpecDigest {
                type_: s.type_,
                cluster_ip: s.cluster_ip,
                cluster_ips: s.cluster_ips,
                external_ips: s.external_ips,
                external_traffic_policy: s.external_traffic_policy,
                health_check_node_port: s.health_check_node_port,
                load_balancer_source_ranges: s.load_balancer_source_ranges,
                internal_traffic_policy: s.internal_traffic_policy,
                session_affinity: s.session_affinity,
                affinity_timeout_s: s
                    .session_affinity_config
                    .and_then(|c| c.client_ip)
                    .and_then(|c| c.timeout_seconds),
                ports: s
                    .ports
                    .into_iter()
                    .flatten()
                    .map(|p| PortDigest {
                        name: p.name,
                        protocol: p.protocol,
                        port: p.port,
                        node_port: p.node_port,
                    })
                    .collect(),
            })
        });
        let lb_ingress = service
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .into_iter()
            .flatten()
            .filter_map(|i| Some((i.ip.filter(|ip| !ip.is_empty())?, i.ip_mode)))
            .collect();
        Self {
            for_another_proxy,
            spec,
            lb_ingress,
            lb_algorithm,
        }
    }

    /// A Service with only what the digest kept, named `namespace`/`name`.
    pub fn to_object(&self, namespace: &str, name: &str) -> Service {
        self.to_object_as(Some(namespace), Some(name))
    }

    fn to_object_as(&self, namespace: Option<&str>, name: Option<&str>) -> Service {
        let spec = self.spec.as_deref().map(|s| ServiceSpec {
            type_: s.type_.clone(),
            cluster_ip: s.cluster_ip.clone(),
            cluster_ips: s.cluster_ips.clone(),
            external_ips: s.external_ips.clone(),
            external_traffic_policy: s.external_traffic_policy.clone(),
            health_check_node_port: s.health_check_node_port,
            load_balancer_source_ranges: s.load_balancer_source_ranges.clone(),
            internal_traffic_policy: s.internal_traffic_policy.clone(),
            session_affinity: s.session_affinity.clone(),
            session_affinity_config: Some(SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: s.affinity_timeout_s,
                }),
            }),
            ports: Some(
                s.ports
                    .iter()
                    .map(|p| K8sServicePort {
                        name: p.name.clone(),
                        protocol: p.protocol.clone(),
                        port: p.port,
                        node_port: p.node_port,
                        ..K8sServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        });
        let status = (!self.lb_ingress.is_empty()).then(|| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    self.lb_ingress
                        .iter()
                        .map(|(ip, mode)| LoadBalancerIngress {
                            ip: Some(ip.clone()),
                            ip_mode: mode.clone(),
                            ..LoadBalancerIngress::default()
                        })
                        .collect(),
                ),
            }),
            ..ServiceStatus::default()
        });
        let mut metadata = meta(
            namespace,
            name,
            another_proxy_labels(self.for_another_proxy),
        );
        metadata.annotations = self
            .lb_algorithm
            .as_ref()
            .map(|v| BTreeMap::from([(ANNOTATION_LB_ALGORITHM.to_owned(), v.clone())]));
        Service {
            metadata,
            spec,
            status,
        }
    }
}

/// What `translate` reads of an EndpointSlice besides its namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceDigest {
    /// The `kubernetes.io/service-name` label.
    service: Option<String>,
    for_another_proxy: bool,
    address_type: String,
    ports: Vec<SlicePortDigest>,
    endpoints: Vec<EndpointDigest>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct SlicePortDigest {
    name: Option<String>,
    protocol: Option<String>,
    port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct EndpointDigest {
    /// The first address: only that one counts.
    address: Address,
    conditions: Option<[Option<bool>; 3]>,
    /// `nodeName`; a slice's endpoints share one allocation per node (usually all are on a few).
    node_name: Option<Arc<str>>,
    /// `hints.forNodes` and `hints.forZones` names, when there are any.
    hints: Option<Box<(Vec<String>, Vec<String>)>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Address {
    None,
    /// An address that prints back as it was written (so problems quote it unchanged).
    Ip(IpAddr),
    /// Anything else, kept as written for the problem `translate` reports about it.
    Text(Box<str>),
}

impl SliceDigest {
    pub fn of(slice: EndpointSlice) -> Self {
        let for_another_proxy = for_another_proxy(&slice.metadata);
        let service = slice
            .metadata
            .labels
            .and_then(|mut l| l.remove(LABEL_SERVICE_NAME));
        let ports = slice
            .ports
            .into_iter()
            .flatten()
            .map(|p| SlicePortDigest {
                name: p.name,
                protocol: p.protocol,
                port: p.port,
            })
            .collect();
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let endpoints = slice
            .endpoints
            .into_iter()
            .flatten()
            .map(|e| {
                let node_name = e.node_name.map(|n| {
                    match nodes.iter().find(|k| ***k == *n) {
                        Some(k) => k.clone(),
                        None => {
                            let k: Arc<str> = n.into();
                            // A slice has at most 1000 endpoints; beyond a handful of nodes
                            // the search is not worth it.
                            if nodes.len() < 8 {
                                nodes.push(k.clone());
                            }
                            k
                        }
                    }
                });
                let address = match e.addresses.into_iter().next() {
                    None => Address::None,
                    Some(text) => match text.parse::<IpAddr>() {
                        Ok(ip) if ip.to_string() == text => Address::Ip(ip),
                        _ => Address::Text(text.into_boxed_str()),
                    },
                };
                let hints = e.hints.and_then(|h| {
                    let nodes: Vec<String> =
                        h.for_nodes.into_iter().flatten().map(|n| n.name).collect();
                    let zones: Vec<String> =
                        h.for_zones.into_iter().flatten().map(|z| z.name).collect();
                    (!(nodes.is_empty() && zones.is_empty())).then(|| Box::new((nodes, zones)))
                });
                EndpointDigest {
                    address,
                    conditions: e.conditions.map(|c| [c.ready, c.serving, c.terminating]),
                    node_name,
                    hints,
                }
            })
            .collect();
        Self {
            service,
            for_another_proxy,
            address_type: slice.address_type,
            ports,
            endpoints,
        }
    }

    /// The Service (`kubernetes.io/service-name`) the slice belongs to.
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }

    /// An EndpointSlice with only what the digest kept, named `namespace`/`name`.
    pub fn to_object(&self, namespace: &str, name: &str) -> EndpointSlice {
        self.to_object_as(Some(namespace), Some(name))
    }

    fn to_object_as(&self, namespace: Option<&str>, name: Option<&str>) -> EndpointSlice {
        let mut labels = another_proxy_labels(self.for_another_proxy);
        if let Some(s) = &self.service {
            labels.insert(LABEL_SERVICE_NAME.to_owned(), s.clone());
        }
        EndpointSlice {
            metadata: meta(namespace, name, labels),
            address_type: self.address_type.clone(),
            ports: Some(
                self.ports
                    .iter()
                    .map(|p| EndpointPort {
                        name: p.name.clone(),
                        protocol: p.protocol.clone(),
                        port: p.port,
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
            endpoints: Some(
                self.endpoints
                    .iter()
                    .map(|e| Endpoint {
                        addresses: match &e.address {
                            Address::None => Vec::new(),
                            Address::Ip(ip) => vec![ip.to_string()],
                            Address::Text(t) => vec![t.to_string()],
                        },
                        conditions: e.conditions.map(|[ready, serving, terminating]| {
                            EndpointConditions {
                                ready,
                                serving,
                                terminating,
                            }
                        }),
                        node_name: e.node_name.as_deref().map(str::to_owned),
                        hints: e.hints.as_deref().map(|(nodes, zones)| EndpointHints {
                            for_nodes: Some(
                                nodes.iter().map(|n| ForNode { name: n.clone() }).collect(),
                            ),
                            for_zones: Some(
                                zones.iter().map(|z| ForZone { name: z.clone() }).collect(),
                            ),
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
        }
    }
}

/// This node as `translate` reads it: its name and zone label.
pub fn node_object(node_name: &str, zone: Option<&str>) -> Node {
    let labels: BTreeMap<String, String> = zone
        .map(|z| (LABEL_ZONE.to_owned(), z.to_owned()))
        .into_iter()
        .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(node_name.to_owned()),
            labels: (!labels.is_empty()).then_some(labels),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

/// An object's `metadata.namespace` and `metadata.name` as written.
type Names = (Option<String>, Option<String>);

fn names(meta: &mut ObjectMeta) -> Names {
    (meta.namespace.take(), meta.name.take())
}

/// [`ClusterObjects`] kept as digests (what a manifests directory cache holds per file between
/// reads): Services and EndpointSlices as their digests under the names they were written with,
/// in their order, duplicates included; Nodes with only their name and zone label.
#[derive(Clone, Debug, Default)]
pub struct DigestedObjects {
    pub(crate) services: Vec<(Names, ServiceDigest)>,
    pub(crate) slices: Vec<(Names, SliceDigest)>,
    pub(crate) nodes: Vec<Node>,
    pub problems: Vec<Problem>,
}

impl DigestedObjects {
    pub fn of(mut objs: ClusterObjects) -> Self {
        let mut d = Self::default();
        d.absorb(&mut objs);
        d.problems = objs.problems;
        d.shrink_to_fit();
        d
    }

    /// Appends `other`'s objects and problems after these.
    pub fn append(&mut self, mut other: DigestedObjects) {
        self.services.append(&mut other.services);
        self.slices.append(&mut other.slices);
        self.nodes.append(&mut other.nodes);
        self.problems.append(&mut other.problems);
    }

    /// Moves the objects (not the problems) of `objs` in, as digests.
    pub fn absorb(&mut self, objs: &mut ClusterObjects) {
        self.services.extend(
            objs.services
                .drain(..)
                .map(|mut s| (names(&mut s.metadata), ServiceDigest::of(s))),
        );
        self.slices.extend(
            objs.slices
                .drain(..)
                .map(|mut s| (names(&mut s.metadata), SliceDigest::of(s))),
        );
        self.nodes.extend(objs.nodes.drain(..).map(|n| {
            let zone = n.metadata.labels.and_then(|mut l| l.remove(LABEL_ZONE));
            let mut node = node_object("", zone.as_deref());
            node.metadata.name = n.metadata.name;
            // What says the node is going away (`/healthz` fails then, as kube-proxy's does).
            node.metadata.deletion_timestamp = n.metadata.deletion_timestamp;
            if let Some(taints) = n.spec.and_then(|s| s.taints) {
                node.spec.get_or_insert_default().taints = Some(taints);
            }
            // The node's own addresses: the default node port addresses.
            if let Some(addresses) = n.status.and_then(|s| s.addresses) {
                node.status.get_or_insert_default().addresses = Some(addresses);
            }
            node
        }));
    }

    /// Gives back what growing the lists left unused (they are kept until the file changes).
    pub fn shrink_to_fit(&mut self) {
        self.services.shrink_to_fit();
        self.slices.shrink_to_fit();
        self.nodes.shrink_to_fit();
    }

    /// Appends clones of `other`'s objects and problems.
    pub fn extend_from(&mut self, other: &DigestedObjects) {
        self.services.extend(other.services.iter().cloned());
        self.slices.extend(other.slices.iter().cloned());
        self.nodes.extend(other.nodes.iter().cloned());
        self.problems.extend(other.problems.iter().cloned());
    }

    /// Whether a Node of that name or an endpoint on it is among the objects.
    pub fn mentions_node(&self, node_name: &str) -> bool {
        self.nodes
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(node_name))
            || self.slices.iter().any(|(_, s)| {
                s.endpoints
                    .iter()
                    .any(|e| e.node_name.as_deref() == Some(node_name))
            })
    }

    pub fn has_objects(&self) -> bool {
        !(self.services.is_empty() && self.slices.is_empty() && self.nodes.is_empty())
    }

    /// Appends the objects, as `to_object` gives them, and the problems to `out`.
    pub fn expand_into(&self, out: &mut ClusterObjects) {
        out.services.extend(
            self.services
                .iter()
                .map(|((ns, name), s)| s.to_object_as(ns.as_deref(), name.as_deref())),
        );
        out.slices.extend(
            self.slices
                .iter()
                .map(|((ns, name), s)| s.to_object_as(ns.as_deref(), name.as_deref())),
        );
        out.nodes.extend(self.nodes.iter().cloned());
        out.problems.extend(self.problems.iter().cloned());
    }
}
