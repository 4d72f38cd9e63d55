//! vipx: the userspace side. Data flows one way: `source` (cluster objects) -> `translate`
//! (desired state, kube-proxy semantics) -> `maps` (diff and ordered apply) -> kernel.
pub mod config;
pub mod conntrack;
pub mod desired;
pub mod digest;
pub mod flood;
pub mod kernel_btf;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod netlink;
pub mod nodeaddr;
pub mod nodeif;
pub mod podns;
pub mod ranges;
pub mod run;
pub mod serve;
pub mod socklb;
pub mod source;
pub mod sync;
pub mod translate;
