//! `--config FILE`: the settings vipx shares with kube-proxy, read from a
//! `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1) as kube-proxy reads it, so an
//! existing kube-proxy ConfigMap (kubeadm's `config.conf`) can be mounted unchanged. Fields vipx
//! has no use for are ignored.
//!
//! Precedence is kube-proxy's: with `--config`, the file's values (or kube-proxy's defaults for
//! what it leaves out) replace the command-line flags of the same settings; only
//! `--hostname-override` given on the command line still wins over the file's
//! `hostnameOverride`.

use std::{fmt, net::IpAddr, net::SocketAddr, path::Path, str::FromStr, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::serve::{self, HEALTHZ_PORT, METRICS_PORT};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";
/// kube-proxy's defaults.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);

/// A CIDR, as `--cluster-cidr` / `clusterCIDR` give them (comma-separated, one per family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || format!("{s:?} is not a CIDR (like 10.244.0.0/16 or fd00:10:244::/56)");
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside this range (never across families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of CIDRs, at most one per IP family (kube-proxy's validation).
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    let cidrs: Vec<Cidr> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let v4 = cidrs.iter().filter(|c| c.addr.is_ipv4()).count();
    if v4 > 1 || cidrs.len() - v4 > 1 {
        return Err(format!(
            "{s:?}: at most one CIDR per IP family (a dual-stack pair)"
        ));
    }
    Ok(cidrs)
}

/// A Go duration ("30s", "1m30s", "1.5h", "500ms", "0"), as metav1.Duration reads it.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a duration (like 30s, 1m30s, 500ms)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(bad());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPeriods {
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConntrack {
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
}

/// The `conntrack` timeouts of the file; `None`: absent or 0 (vipx's default, which is
/// kube-proxy's for the TCP ones).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConntrack {
    pub tcp_established: Option<Duration>,
    pub tcp_close_wait: Option<Duration>,
    pub udp: Option<Duration>,
    pub udp_stream: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    conntrack: Option<RawConntrack>,
    api_version: Option<String>,
    kind: Option<String>,
    hostname_override: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    mode: Option<String>,
    iptables: Option<RawPeriods>,
    ipvs: Option<RawPeriods>,
    nftables: Option<RawPeriods>,
}

/// The settings of a `KubeProxyConfiguration` that vipx uses, with kube-proxy's defaults
/// applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileConfig {
    /// `hostnameOverride` (empty: not set).
    pub hostname_override: Option<String>,
    /// `healthzBindAddress`; empty in the file means kube-proxy's default, not "disabled".
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub cluster_cidrs: Vec<Cidr>,
    /// `nodePortAddresses` (CIDRs; empty: every node address).
    pub node_port_addresses: Vec<Cidr>,
    /// `<mode>.syncPeriod` of the configured `mode` (iptables when unset); 0 means the default.
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub conntrack: FileConntrack,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("--config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_yaml_ng::from_str(text).context("not valid YAML or JSON")?;
        match (raw.api_version.as_deref(), raw.kind.as_deref()) {
            (Some(API_VERSION), Some(KIND)) => {}
            (v, k) => bail!(
                "expected apiVersion {API_VERSION} and kind {KIND}, found {} and {}",
                v.unwrap_or("none"),
                k.unwrap_or("none")
            ),
        }
        let addr = |v: &Option<String>, default: &str, port: u16| -> Result<Option<SocketAddr>> {
            let v = v.as_deref().map(str::trim).filter(|v| !v.is_empty());
            serve::parse_bind_address(v.unwrap_or(default), port).map_err(anyhow::Error::msg)
        };
        // kube-proxy keeps these per proxy mode; vipx takes the ones of the configured mode.
        let periods = match raw.mode.as_deref().map(str::trim) {
            Some("ipvs") => raw.ipvs,
            Some("nftables") => raw.nftables,
            _ => raw.iptables,
        }
        .unwrap_or_default();
        let period = |v: &Option<String>, default: Duration, what: &str| -> Result<Duration> {
            let d = match v.as_deref() {
                None => Duration::ZERO,
                Some(s) => parse_go_duration(s)
                    .map_err(anyhow::Error::msg)
                    .context(what.to_owned())?,
            };
            Ok(if d.is_zero() { default } else { d })
        };
        let ct = raw.conntrack.unwrap_or_default();
        let timeout = |v: &Option<String>, what: &str| -> Result<Option<Duration>> {
            match v.as_deref() {
                None => Ok(None),
                Some(s) => Ok(Some(
                    parse_go_duration(s)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("conntrack.{what}"))?,
                )
                .filter(|d| !d.is_zero())),
            }
        };
        let conntrack = FileConntrack {
            tcp_established: timeout(&ct.tcp_established_timeout, "tcpEstablishedTimeout")?,
            tcp_close_wait: timeout(&ct.tcp_close_wait_timeout, "tcpCloseWaitTimeout")?,
            udp: timeout(&ct.udp_timeout, "udpTimeout")?,
            udp_stream: timeout(&ct.udp_stream_timeout, "udpStreamTimeout")?,
        };
        Ok(Self {
            conntrack,
            hostname_override: raw
                .hostname_override
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty()),
            healthz_bind_address: addr(
                &raw.healthz_bind_address,
                serve::DEFAULT_HEALTHZ_BIND,
                HEALTHZ_PORT,
            )
            .context("healthzBindAddress")?,
            metrics_bind_address: addr(
                &raw.metrics_bind_address,
                serve::DEFAULT_METRICS_BIND,
                METRICS_PORT,
            )
            .context("metricsBindAddress")?,
            cluster_cidrs: parse_cidrs(raw.cluster_cidr.as_deref().unwrap_or(""))
                .map_err(anyhow::Error::msg)
                .context("clusterCIDR")?,
            node_port_addresses: raw
                .node_port_addresses
                .iter()
                .flatten()
                .map(|s| s.parse::<Cidr>())
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)
                .context(
                    "nodePortAddresses (CIDRs; kube-proxy's \"primary\" is not supported yet)",
                )?,
            sync_period: period(&periods.sync_period, DEFAULT_SYNC_PERIOD, "syncPeriod")?,
            min_sync_period: period(
                &periods.min_sync_period,
                DEFAULT_MIN_SYNC_PERIOD,
                "minSyncPeriod",
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ok = [
            ("0", 0.0),
            ("0s", 0.0),
            ("30s", 30.0),
            ("1m", 60.0),
            ("1m30s", 90.0),
            ("2h22m", 8520.0),
            ("1.5h", 5400.0),
            ("500ms", 0.5),
            ("1s500ms", 1.5),
        ];
        for (s, secs) in ok {
            assert_eq!(
                parse_go_duration(s),
                Ok(Duration::from_secs_f64(secs)),
                "{s}"
            );
        }
        for bad in ["", "30", "-1s", "1d", "s", "1..5s", "1m x"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidrs(""), Ok(vec![]));
        let both = parse_cidrs("10.244.0.0/16, fd00:10:244::/56").unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(both[0].to_string(), "10.244.0.0/16");
        for bad in [
            "10.244.0.0",
            "10.244.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0.0/8,10.1.0.0/16",
        ] {
            assert!(parse_cidrs(bad).is_err(), "{bad}");
        }
    }

    /// kubeadm's kube-proxy ConfigMap `config.conf`, abridged: read unchanged.
    const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  syncPeriod: 0s
kind: KubeProxyConfiguration
metricsBindAddress: ""
mode: ""
nodePortAddresses: null
"#;

    #[test]
    fn a_kubeadm_config_gets_kube_proxy_defaults() {
        let c = FileConfig::parse(KUBEADM).unwrap();
        assert_eq!(
            c,
            FileConfig {
                hostname_override: None,
                healthz_bind_address: "0.0.0.0:10256".parse().ok(),
                metrics_bind_address: "127.0.0.1:10249".parse().ok(),
                cluster_cidrs: parse_cidrs("10.244.0.0/16").unwrap(),
                node_port_addresses: Vec::new(),
                sync_period: DEFAULT_SYNC_PERIOD,
                min_sync_period: DEFAULT_MIN_SYNC_PERIOD,
                conntrack: FileConntrack::default(),
            }
        );
    }

    #[test]
    fn conntrack_timeouts_from_the_file() {
        let c = FileConfig::parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             conntrack: {tcpEstablishedTimeout: 2h0m0s, tcpCloseWaitTimeout: 0s, \
             udpTimeout: 45s, udpStreamTimeout: 5m}\n",
        )
        .unwrap();
        assert_eq!(
            c.conntrack,
            FileConntrack {
                tcp_established: Some(Duration::from_secs(7200)),
                tcp_close_wait: None,
                udp: Some(Duration::from_secs(45)),
                udp_stream: Some(Duration::from_secs(300)),
            }
        );
        let bad = FileConfig::parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             conntrack: {udpTimeout: soon}\n",
        );
        assert!(format!("{:#}", bad.unwrap_err()).contains("conntrack.udpTimeout"));
    }

    #[test]
    fn values_of_the_configured_mode() {
        let c = FileConfig::parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             hostnameOverride: ' worker-1 '\nhealthzBindAddress: 0.0.0.0\n\
             metricsBindAddress: 0.0.0.0:9100\nmode: nftables\n\
             iptables: {syncPeriod: 10s}\nnftables: {syncPeriod: 1m, minSyncPeriod: 250ms}\n\
             nodePortAddresses: [198.18.0.0/24, 10.0.0.0/8]\n",
        )
        .unwrap();
        assert_eq!(
            c.node_port_addresses,
            [
                "198.18.0.0/24".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap()
            ]
        );
        assert_eq!(c.hostname_override.as_deref(), Some("worker-1"));
        assert_eq!(c.healthz_bind_address, "0.0.0.0:10256".parse().ok());
        assert_eq!(c.metrics_bind_address, "0.0.0.0:9100".parse().ok());
        assert_eq!(c.sync_period, Duration::from_secs(60));
        assert_eq!(c.min_sync_period, Duration::from_millis(250));
        assert!(c.cluster_cidrs.is_empty());
    }

    #[test]
    fn wrong_or_broken_files_are_refused_with_the_reason() {
        for (text, want) in [
            (
                "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\n",
                "expected apiVersion",
            ),
            ("{", "not valid YAML"),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                 iptables: {syncPeriod: soon}\n",
                "syncPeriod",
            ),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                 clusterCIDR: 10.0.0.0\n",
                "clusterCIDR",
            ),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                 healthzBindAddress: 'host:1'\n",
                "healthzBindAddress",
            ),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                 nodePortAddresses: [primary]\n",
                "nodePortAddresses",
            ),
        ] {
            let err = format!("{:#}", FileConfig::parse(text).expect_err(text));
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
