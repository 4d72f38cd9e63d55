//! The desired state: what the kernel maps should say, as plain data. Produced by `translate`
//! (a pure function of the cluster objects and this node's name) and consumed by the map writer.

use std::{collections::BTreeMap, fmt, net::IpAddr};

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// kube-proxy's identity of a service port: (namespace/name, port name, protocol).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's `name` ("" when unnamed).
    pub port_name: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

/// What kind of address a frontend is; decides which traffic policy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    /// `addr` is unspecified: the node port on every node address.
    NodePort,
    ExternalIp,
    LoadBalancer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub kind: FrontendKind,
}

/// One endpoint of a service port (after EndpointSlice merge, port-name matching and dedup).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `nodeName` equals this node.
    pub local: bool,
}

/// One programmed service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub frontends: Vec<Frontend>,
    /// Every endpoint an established flow may be on (ready, or serving/terminating), sorted by
    /// (addr, port), unique by (addr, port).
    pub endpoints: Vec<Endpoint>,
    /// Indices into `endpoints` that a new connection to a ClusterIP frontend may pick
    /// (internalTrafficPolicy, topology, terminating fallback applied). Empty: no usable backend.
    pub internal_pick: Vec<usize>,
    /// Same for NodePort / ExternalIP / LoadBalancer frontends (externalTrafficPolicy).
    pub external_pick: Vec<usize>,
    /// What a pod's new connection to an ExternalIP / LoadBalancer frontend may pick. kube-proxy
    /// sends pod traffic to an external destination to the cluster-policy endpoints even with
    /// externalTrafficPolicy Local (as if it had gone out to the load balancer and come back in on
    /// any node), unless there are none; so this is `external_pick` except under that policy.
    pub pod_external_pick: Vec<usize>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    pub internal_local: bool,
    pub external_local: bool,
    /// The Service's `vipx.io/lb-algorithm` annotation; `None`: the `--lb-algorithm` default.
    pub lb_algorithm: Option<LbAlgorithm>,
    /// `loadBalancerSourceRanges` (IPv4): who may reach its LoadBalancer IPs (empty: anyone).
    pub source_ranges: Vec<(std::net::Ipv4Addr, u8)>,
}

/// How a new flow picks among a frontend's backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LbAlgorithm {
    /// Maglev consistent hashing: a backend change moves only the flows it must.
    #[default]
    Maglev,
    /// The flow hash scaled to the slot count: any change of the count moves most flows.
    Hash,
}

impl LbAlgorithm {
    pub const fn as_str(self) -> &'static str {
        match self {
            LbAlgorithm::Maglev => "maglev",
            LbAlgorithm::Hash => "hash",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "maglev" => Some(LbAlgorithm::Maglev),
            "hash" => Some(LbAlgorithm::Hash),
            _ => None,
        }
    }
}

impl ServicePort {
    /// (internal, external): whether a Local traffic policy leaves this port without a local
    /// endpoint while it has endpoints elsewhere, so such traffic is dropped (upstream counts
    /// these in `kubeproxy_sync_proxy_rules_no_local_endpoints_total`). A port without any
    /// endpoint rejects instead and is not counted.
    pub fn no_local_endpoints(&self) -> (bool, bool) {
        let any = !(self.internal_pick.is_empty()
            && self.external_pick.is_empty()
            && self.pod_external_pick.is_empty());
        (
            any && self.internal_local && self.internal_pick.is_empty(),
            any && self.external_local && self.external_pick.is_empty(),
        )
    }
}

/// Everything vipx should program on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<ServicePortName, ServicePort>,
    /// LoadBalancer Services with externalTrafficPolicy Local, by (namespace, name): their
    /// `healthCheckNodePort` and how many ready endpoints they have on this node (what the
    /// port answers a load balancer's health check with).
    pub health_checks: BTreeMap<(String, String), HealthCheck>,
}

/// One Service's health check node port (kube-proxy's service health server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub local_endpoints: usize,
}
