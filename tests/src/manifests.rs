//! The manifests the lab feeds to vipx: the example Service and an EndpointSlice listing the lab's
//! backend pods, written as `kubectl get -o yaml` would print them.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

/// `examples/simpleapi/service.yaml`.
pub const SERVICE_YAML: &str = include_str!("../../examples/simpleapi/service.yaml");
pub const SERVICE_NAME: &str = "simpleapi-service";
pub const SERVICE_NAMESPACE: &str = "default";
/// The Service's cluster IP; nothing in the lab owns it, only vipx's translation makes it answer.
pub const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// The Service port, for both TCP (`http`) and UDP (`udp`).
pub const SERVICE_PORT: u16 = 80;
/// The port the pods listen on, for both TCP and UDP (the Service's targetPort).
pub const POD_PORT: u16 = 5000;

pub const SERVICE_FILE: &str = "service.yaml";
pub const ENDPOINT_SLICE_FILE: &str = "endpointslice.yaml";
/// The slice name, with the random-looking suffix the EndpointSlice controller would give it.
pub const ENDPOINT_SLICE_NAME: &str = "simpleapi-service-x7k2p";

/// `examples/seed-loadbalancer/service.yaml`: the seed's LoadBalancer Service.
pub const SEED_LB_YAML: &str = include_str!("../../examples/seed-loadbalancer/service.yaml");
pub const SEED_LB_NAME: &str = "service-for-deployment-1";
pub const SEED_LB_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 32);
pub const SEED_LB_INGRESS_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 1);
pub const SEED_LB_PORT: u16 = 32001;
pub const SEED_LB_NODE_PORT: u16 = 30001;
/// The port its pods listen on.
pub const SEED_LB_TARGET_PORT: u16 = 80;

/// Writes the seed's LoadBalancer Service and its EndpointSlice (one ready endpoint per
/// `(pod name, pod IP, node name)`, TCP port 80) to `dir/seed-loadbalancer.yaml`.
pub fn write_seed_load_balancer<S: AsRef<str>>(
    dir: &Path,
    endpoints: &[(S, Ipv4Addr, S)],
) -> Result<PathBuf> {
    let mut items = String::new();
    for (pod, ip, node) in endpoints {
        let (pod, node) = (pod.as_ref(), node.as_ref());
        ensure_plain_name(pod)?;
        ensure_plain_name(node)?;
        writeln!(items, "- addresses: [{ip}]")?;
        writeln!(
            items,
            "  conditions: {{ready: true, serving: true, terminating: false}}"
        )?;
        writeln!(items, "  nodeName: {node}")?;
        writeln!(
            items,
            "  targetRef: {{kind: Pod, name: {pod}, namespace: {SERVICE_NAMESPACE}}}"
        )?;
    }
    let slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {SEED_LB_NAME}-q8w2z\n  \
         namespace: {SERVICE_NAMESPACE}\n  labels:\n    kubernetes.io/service-name: {SEED_LB_NAME}\n\
         addressType: IPv4\nports:\n- name: investment-project-listener\n  port: {SEED_LB_TARGET_PORT}\n  \
         protocol: TCP\nendpoints:\n{items}"
    );
    let path = dir.join("seed-loadbalancer.yaml");
    write_atomically(&path, &format!("{SEED_LB_YAML}---\n{slice}"))?;
    Ok(path)
}

/// Writes the example Service to `dir/service.yaml`; returns the path.
pub fn write_service(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(SERVICE_FILE);
    write_atomically(&path, SERVICE_YAML)?;
    Ok(path)
}

/// Writes `dir/endpointslice.yaml`: the Service's EndpointSlice with one ready endpoint per
/// `(pod name, pod IP)` in `backends`, all on node `node_name`; returns the path.
///
/// The file is replaced atomically, so a watcher re-reading the directory never sees half of it.
pub fn write_endpoint_slice<S: AsRef<str>>(
    dir: &Path,
    backends: &[(S, Ipv4Addr)],
    node_name: &str,
) -> Result<PathBuf> {
    let path = dir.join(ENDPOINT_SLICE_FILE);
    write_atomically(&path, &endpoint_slice_yaml(backends, node_name)?)?;
    Ok(path)
}

/// The text [`write_endpoint_slice`] writes.
pub fn endpoint_slice_yaml<S: AsRef<str>>(
    backends: &[(S, Ipv4Addr)],
    node_name: &str,
) -> Result<String> {
    ensure_plain_name(node_name)?;
    let mut endpoints = String::new();
    for (pod, ip) in backends {
        let pod = pod.as_ref();
        ensure_plain_name(pod)?;
        write!(
            endpoints,
            "\
- addresses:
  - {ip}
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: {node_name}
  targetRef:
    kind: Pod
    name: {pod}
    namespace: {SERVICE_NAMESPACE}
"
        )?;
    }
    // Block style needs the list on the next line; an empty list has to be written inline.
    let endpoints = if endpoints.is_empty() {
        " []\n".to_owned()
    } else {
        format!("\n{endpoints}")
    };
    Ok(format!(
        "\
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:{endpoints}kind: EndpointSlice
metadata:
  generateName: {SERVICE_NAME}-
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: {SERVICE_NAME}
  name: {ENDPOINT_SLICE_NAME}
  namespace: {SERVICE_NAMESPACE}
ports:
- name: http
  port: {POD_PORT}
  protocol: TCP
- name: udp
  port: {POD_PORT}
  protocol: UDP
"
    ))
}

/// One endpoint of a [`ServiceSpec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// The node it runs on (`nodeName`), as the EndpointSlice controller fills it in.
    pub node_name: String,
    /// The Pod behind it (`targetRef`); `None` for a host-network backend listed by hand, like
    /// the API server's endpoints behind `default/kubernetes`.
    pub pod: Option<String>,
}

/// A ClusterIP Service with one TCP port (`http`) and one UDP port (`udp`), both `port` ->
/// `target_port`, and its one EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name (in namespace `default`); also names its file, `<name>.yaml`.
    pub name: String,
    /// The cluster IP, in 198.19.0.0/16.
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<Endpoint>,
    /// `spec.externalIPs`, in 198.19.250.0/24.
    pub external_ips: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local` (else Cluster); written only with external IPs.
    pub external_local: bool,
    /// `sessionAffinity: ClientIP` with this `timeoutSeconds` (else None).
    pub affinity_timeout: Option<u32>,
    /// `type: NodePort` with this `nodePort` on both ports (TCP and UDP), else ClusterIP.
    pub node_port: Option<u16>,
    /// `type: LoadBalancer` with this `healthCheckNodePort` (set `external_local` and
    /// `node_port` too, as the API server requires).
    pub health_check_node_port: Option<u16>,
    /// `type: LoadBalancer` with this ingress IP in its status (set `node_port` too).
    pub lb_ingress: Option<Ipv4Addr>,
    /// `loadBalancerSourceRanges`, as written.
    pub source_ranges: Vec<String>,
}

impl ServiceSpec {
    /// The file [`write_service_spec`] writes it to in `dir`.
    pub fn path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.yaml", self.name))
    }
}

/// Writes `dir/<name>.yaml`: the Service and its EndpointSlice as one two-document YAML file,
/// replaced atomically. Returns the path.
pub fn write_service_spec(dir: &Path, spec: &ServiceSpec) -> Result<PathBuf> {
    let path = spec.path(dir);
    write_atomically(&path, &service_spec_yaml(spec)?)?;
    Ok(path)
}

/// The text [`write_service_spec`] writes.
pub fn service_spec_yaml(spec: &ServiceSpec) -> Result<String> {
    let ServiceSpec {
        name,
        vip,
        port,
        target_port,
        endpoints,
        external_ips,
        external_local,
        affinity_timeout,
        node_port,
        health_check_node_port,
        lb_ingress,
        source_ranges,
    } = spec;
    let affinity = match affinity_timeout {
        Some(t) => format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}\n"
        ),
        None => "  sessionAffinity: None\n".to_owned(),
    };
    let mut external = String::new();
    if !external_ips.is_empty() {
        writeln!(external, "  externalIPs:")?;
        for ip in external_ips {
            writeln!(external, "  - {ip}")?;
        }
    }
    if !external_ips.is_empty() || node_port.is_some() {
        let policy = if *external_local { "Local" } else { "Cluster" };
        writeln!(external, "  externalTrafficPolicy: {policy}")?;
    }
    ensure_plain_name(name)?;
    let mut items = String::new();
    for endpoint in endpoints {
        ensure_plain_name(&endpoint.node_name)?;
        write!(
            items,
            "\
- addresses:
  - {}
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: {}
",
            endpoint.ip, endpoint.node_name
        )?;
        if let Some(pod) = &endpoint.pod {
            ensure_plain_name(pod)?;
            // Spelled out line by line: a `\` line continuation would eat the indentation.
            writeln!(items, "  targetRef:")?;
            writeln!(items, "    kind: Pod")?;
            writeln!(items, "    name: {pod}")?;
            writeln!(items, "    namespace: {SERVICE_NAMESPACE}")?;
        }
    }
    let (node_port_line, mut kind) = match node_port {
        Some(p) => (format!("    nodePort: {p}\n"), "NodePort"),
        None => (String::new(), "ClusterIP"),
    };
    if let Some(p) = health_check_node_port {
        kind = "LoadBalancer";
        writeln!(external, "  healthCheckNodePort: {p}")?;
    }
    let mut status = String::new();
    if let Some(ip) = lb_ingress {
        kind = "LoadBalancer";
        write!(
            status,
            "status:\n  loadBalancer:\n    ingress:\n    - ip: {ip}\n"
        )?;
    }
    if !source_ranges.is_empty() {
        writeln!(external, "  loadBalancerSourceRanges:")?;
        for r in source_ranges {
            ensure!(
                r.bytes()
                    .all(|b| b.is_ascii_hexdigit() || b".:/".contains(&b)),
                "{r:?} is not a CIDR"
            );
            writeln!(external, "  - {r}")?;
        }
    }
    // Block style needs the list on the next line; an empty list has to be written inline.
    let items = if items.is_empty() {
        " []\n".to_owned()
    } else {
        format!("\n{items}")
    };
    Ok(format!(
        "\
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {SERVICE_NAMESPACE}
spec:
  clusterIP: {vip}
  clusterIPs:
  - {vip}
{external}  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  ports:
  - name: http
    port: {port}
    protocol: TCP
    targetPort: {target_port}
{node_port_line}  - name: udp
    port: {port}
    protocol: UDP
    targetPort: {target_port}
{node_port_line}{affinity}  type: {kind}
{status}---
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:{items}kind: EndpointSlice
metadata:
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: {name}
  name: {name}-x7k2p
  namespace: {SERVICE_NAMESPACE}
ports:
- name: http
  port: {target_port}
  protocol: TCP
- name: udp
  port: {target_port}
  protocol: UDP
"
    ))
}

/// Names are pasted into YAML unquoted, so only what Kubernetes allows in object names gets in.
fn ensure_plain_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && name.as_bytes()[0].is_ascii_alphanumeric(),
        "{name:?} is not a valid Kubernetes object name"
    );
    Ok(())
}

/// Writes a hidden temporary file next to `path` and renames it over `path`. The temporary name
/// starts with a dot and does not end in `.yaml`, so a directory watcher ignores it.
fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let dir = path.parent().context("manifest path without a directory")?;
    let file_name = path
        .file_name()
        .context("manifest path without a file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}", tmp.display(), path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde::Deserialize as _;

    #[test]
    fn the_seed_load_balancer_matches_its_constants_and_slice() {
        let dir = std::env::temp_dir().join(format!("vipx-seed-lb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let eps = [("backend-1", Ipv4Addr::new(198, 18, 64, 11), "node-1")];
        let path = write_seed_load_balancer(&dir, &eps).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut docs = serde_yaml_ng::Deserializer::from_str(&text);
        let svc = Service::deserialize(docs.next().unwrap()).unwrap();
        let slice = EndpointSlice::deserialize(docs.next().unwrap()).unwrap();
        assert!(docs.next().is_none());
        assert_eq!(svc.metadata.name.as_deref(), Some(SEED_LB_NAME));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.cluster_ip.as_deref(), Some("198.19.0.32"));
        let port = &spec.ports.unwrap()[0];
        assert_eq!(
            (port.port, port.node_port),
            (i32::from(SEED_LB_PORT), Some(i32::from(SEED_LB_NODE_PORT)))
        );
        let ingress = svc.status.unwrap().load_balancer.unwrap().ingress.unwrap();
        assert_eq!(ingress[0].ip.as_deref(), Some("198.19.250.1"));
        let endpoints = slice.endpoints.unwrap();
        let endpoint = &endpoints[0];
        assert_eq!(endpoint.addresses, ["198.18.64.11"]);
        assert_eq!(endpoint.node_name.as_deref(), Some("node-1"));
        assert_eq!(
            slice.ports.unwrap()[0].port,
            Some(i32::from(SEED_LB_TARGET_PORT))
        );
    }

    #[test]
    fn example_service_matches_the_constants() {
        let svc: Service = serde_yaml_ng::from_str(SERVICE_YAML).unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some(SERVICE_NAME));
        assert_eq!(svc.metadata.namespace.as_deref(), Some(SERVICE_NAMESPACE));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.cluster_ip, Some(SERVICE_VIP.to_string()));
        assert_eq!(spec.cluster_ips, Some(vec![SERVICE_VIP.to_string()]));
        let ports: Vec<_> = spec
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.protocol.unwrap(), p.port, p.target_port))
            .collect();
        let target =
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(POD_PORT.into()));
        assert_eq!(
            ports,
            [
                (
                    "http".into(),
                    "TCP".into(),
                    SERVICE_PORT.into(),
                    target.clone()
                ),
                ("udp".into(), "UDP".into(), SERVICE_PORT.into(), target),
            ]
        );
        assert_eq!(
            spec.selector.unwrap().get("app").map(String::as_str),
            Some("backend")
        );
    }

    #[test]
    fn endpoint_slice_parses_as_the_real_type() {
        let backends = [
            ("backend-1", Ipv4Addr::new(198, 18, 64, 11)),
            ("backend-2", Ipv4Addr::new(198, 18, 64, 12)),
        ];
        let yaml = endpoint_slice_yaml(&backends, "vipx-demo-node").unwrap();
        let slice: EndpointSlice = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(slice.address_type, "IPv4");
        let labels = slice.metadata.labels.unwrap();
        assert_eq!(
            labels.get("kubernetes.io/service-name").map(String::as_str),
            Some(SERVICE_NAME)
        );
        let ports: Vec<_> = slice
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.protocol.unwrap(), p.port.unwrap()))
            .collect();
        assert_eq!(
            ports,
            [
                ("http".into(), "TCP".into(), POD_PORT.into()),
                ("udp".into(), "UDP".into(), POD_PORT.into()),
            ]
        );
        let endpoints = slice.endpoints.unwrap();
        assert_eq!(endpoints.len(), 2);
        for (endpoint, (pod, ip)) in endpoints.iter().zip(backends) {
            assert_eq!(endpoint.addresses, [ip.to_string()]);
            let conditions = endpoint.conditions.as_ref().unwrap();
            assert_eq!(
                (conditions.ready, conditions.serving, conditions.terminating),
                (Some(true), Some(true), Some(false))
            );
            assert_eq!(endpoint.node_name.as_deref(), Some("vipx-demo-node"));
            let target = endpoint.target_ref.as_ref().unwrap();
            assert_eq!(target.kind.as_deref(), Some("Pod"));
            assert_eq!(target.name.as_deref(), Some(pod));
        }
    }

    #[test]
    fn service_specs_parse_as_the_real_types() {
        let spec = ServiceSpec {
            name: "svc-a".into(),
            vip: Ipv4Addr::new(198, 19, 0, 20),
            port: 80,
            target_port: 5000,
            endpoints: vec![
                Endpoint {
                    ip: Ipv4Addr::new(198, 18, 65, 11),
                    node_name: "node-2".into(),
                    pod: Some("backend-1".into()),
                },
                Endpoint {
                    ip: Ipv4Addr::new(198, 18, 0, 2),
                    node_name: "node-2".into(),
                    pod: None,
                },
            ],
            external_ips: vec![Ipv4Addr::new(198, 19, 250, 10)],
            external_local: true,
            affinity_timeout: Some(600),
            node_port: Some(30080),
            health_check_node_port: None,
            lb_ingress: None,
            source_ranges: Vec::new(),
        };
        let yaml = service_spec_yaml(&spec).unwrap();
        let mut docs = serde_yaml_ng::Deserializer::from_str(&yaml);
        let svc = Service::deserialize(docs.next().unwrap()).unwrap();
        let slice = EndpointSlice::deserialize(docs.next().unwrap()).unwrap();
        assert!(docs.next().is_none());
        let svc_spec = svc.spec.unwrap();
        assert_eq!(svc_spec.cluster_ip.as_deref(), Some("198.19.0.20"));
        assert_eq!(
            svc_spec.external_ips.as_deref(),
            Some(&["198.19.250.10".to_owned()][..])
        );
        assert_eq!(svc_spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(svc_spec.session_affinity.as_deref(), Some("ClientIP"));
        assert_eq!(
            svc_spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
            Some(600)
        );
        assert_eq!(svc_spec.type_.as_deref(), Some("NodePort"));
        let ports = svc_spec.ports.unwrap();
        assert_eq!(ports.len(), 2);
        assert!(ports.iter().all(|p| p.node_port == Some(30080)));
        assert_eq!(
            slice
                .metadata
                .labels
                .unwrap()
                .get("kubernetes.io/service-name")
                .map(String::as_str),
            Some("svc-a")
        );
        let endpoints = slice.endpoints.unwrap();
        assert_eq!(endpoints[0].addresses, ["198.18.65.11"]);
        assert_eq!(endpoints[0].node_name.as_deref(), Some("node-2"));
        assert_eq!(
            endpoints[0].target_ref.as_ref().unwrap().name.as_deref(),
            Some("backend-1")
        );
        assert_eq!(endpoints[1].addresses, ["198.18.0.2"]);
        assert!(endpoints[1].target_ref.is_none());

        let empty = ServiceSpec {
            endpoints: Vec::new(),
            ..spec
        };
        let yaml = service_spec_yaml(&empty).unwrap();
        let slice = EndpointSlice::deserialize(
            serde_yaml_ng::Deserializer::from_str(&yaml).nth(1).unwrap(),
        )
        .unwrap();
        assert_eq!(slice.endpoints, Some(Vec::new()));
    }

    #[test]
    fn an_empty_slice_is_valid() {
        let yaml = endpoint_slice_yaml::<&str>(&[], "node").unwrap();
        let slice: EndpointSlice = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(slice.endpoints, Some(Vec::new()));
    }

    #[test]
    fn names_that_would_break_the_yaml_are_refused() {
        let bad = [("pod: x", Ipv4Addr::new(198, 18, 64, 11))];
        assert!(endpoint_slice_yaml(&bad, "node").is_err());
        assert!(endpoint_slice_yaml::<&str>(&[], "").is_err());
    }

    #[test]
    fn writes_replace_the_files_and_leave_no_temporaries() {
        let dir = std::env::temp_dir().join(format!("vipx-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_service(&dir).unwrap();
        let one = [("backend-1", Ipv4Addr::new(198, 18, 64, 11))];
        write_endpoint_slice(&dir, &one, "node").unwrap();
        write_endpoint_slice::<&str>(&dir, &[], "node").unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [ENDPOINT_SLICE_FILE, SERVICE_FILE]);
        let written = std::fs::read_to_string(dir.join(ENDPOINT_SLICE_FILE)).unwrap();
        assert!(written.contains("endpoints: []"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
