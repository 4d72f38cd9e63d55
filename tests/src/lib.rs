//! `vipx_lab`: the network-namespace lab that `cargo xtask run` demonstrates vipx in and that the
//! lab integration tests drive, plus the clients, manifests and test guards that go with it.
//!
//! Every address the lab uses is in 198.18.0.0/15 (pods 198.18.64.0/24, the node 198.18.0.1,
//! the Service VIP 198.19.0.10): traffic never goes anywhere the lab did not create.
//!
//! Labs behave like real nodes by default ([`Realism::Node`]: rp_filter=1, conntrack dropping
//! INVALID). [`Lab`] is one node; [`cluster::Cluster`] is two nodes joined by an uplink (pods
//! 198.18.64.0/24 and 198.18.65.0/24, node IPs 198.18.0.1 and .2) with host-network backends;
//! [`vipx::Vipx`] runs the real vipx in a node with its own pins and state;
//! [`manifests::write_service_spec`] writes any number of Services with per-endpoint nodeName.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use std::time::Duration;
//! use vipx_lab::{
//!     Lab, LabConfig, Realism, SERVICE_PORT, SERVICE_VIP, http_get, locate_lab_pod, unique_tag,
//! };
//!
//! let lab = Lab::create(LabConfig {
//!     tag: unique_tag(),
//!     backends: 2,
//!     lab_pod_bin: locate_lab_pod()?,
//!     realism: Realism::Node,
//! })?;
//! // ... start vipx in lab.node_ns() with ns_command, feed it lab.write_manifests(dir) ...
//! let vip = SocketAddr::from((SERVICE_VIP, SERVICE_PORT));
//! let body = http_get(&lab.client().netns, vip, Duration::from_secs(2))?;
//! assert!(body.starts_with("backend-"));
//! # anyhow::Ok(())
//! ```

pub mod apiserver;
pub mod client;
pub mod cluster;
pub mod kube_rules;
pub mod lab;
pub mod load;
pub mod manifests;
pub mod netns;
pub mod pod_server;
pub mod privileges;
pub mod realism;
pub mod vipx;

pub use client::{
    DEFAULT_TIMEOUT, KeepAlive, http_get, local_get, metric_sample, read_response, udp_count,
    udp_exchange, udp_request,
};
pub use lab::{
    CLIENT_IP, GATEWAY_IP, HOST_IF_GLOB, Lab, LabConfig, NODE_IP, Pod, cleanup_stale,
    locate_lab_pod, unique_tag,
};
pub use manifests::{
    POD_PORT, SERVICE_NAME, SERVICE_PORT, SERVICE_VIP, write_endpoint_slice, write_service,
};
pub use netns::{in_netns, netns_exists, ns_command};
pub use privileges::{require_privileges, serial};
pub use realism::Realism;
