//! What makes a lab node namespace behave like a real Kubernetes node rather than a lab: strict
//! reverse-path filtering and netfilter conntrack that drops INVALID packets.
//!
//! A proxy that rewrites packets before the node's IP stack routes them (TC ingress) changes what
//! both of these see; a lab with rp_filter=0 and no netfilter hides the resulting drops (see
//! design-notes, "Traps already known"). So every lab node gets them unless the lab's creator
//! turns them off and says why.

use std::io::Write as _;
use std::process::Stdio;

use anyhow::{Context, Result, bail};

use crate::netns::{ns_command, proc_net_field, sysctls};

/// The nftables table every realistic node namespace gets.
pub const NFT_TABLE: &str = "vipx_lab";

/// kube-proxy's `-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP` (iptables mode; the
/// nftables mode has the same in its `filter-forward` chain), and the same for packets delivered
/// to the node itself, which Calico's and several hardening guides' rule sets also drop. Either
/// rule also switches netfilter conntrack on in the namespace, as kube-proxy does on every node.
pub const NODE_RULESET: &str = "\
table inet vipx_lab {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state invalid counter drop
    }
    chain input {
        type filter hook input priority filter; policy accept;
        ct state invalid counter drop
    }
}
";

/// How much of a real node a lab node namespace imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Realism {
    /// rp_filter=1 on `all`, `default` and every interface, and [`NODE_RULESET`] loaded.
    #[default]
    Node,
    /// rp_filter=0 everywhere and no netfilter. Only for labs whose purpose needs it (a benchmark
    /// that charges conntrack only to the contenders that switch it on); `reason` says which, and
    /// is printed when the lab is built so nobody mistakes such a lab for a realistic one.
    Off { reason: &'static str },
}

impl Realism {
    /// `cargo xtask bench`'s labs (and the `lab` example's `bench` mode). The bench compares the
    /// proxies' own per-packet and per-connection costs: netfilter conntrack is charged only to
    /// the contenders that switch it on themselves (kube-proxy's rules load their own
    /// INVALID-drop), so the node namespaces start without it, and without rp_filter, whose FIB
    /// lookup per packet would tax every contender alike and blur the ratios.
    pub const BENCH: Self = Self::Off {
        reason: "bench: each contender pays only for the netfilter state it switches on itself",
    };

    /// The value of every rp_filter sysctl in the node namespace.
    pub fn rp_filter(self) -> &'static str {
        match self {
            Self::Node => "1",
            Self::Off { .. } => "0",
        }
    }
}

/// Sets a freshly created node namespace up: forwarding, no IPv6 (the lab is IPv4 only), the
/// rp_filter level and, for [`Realism::Node`], the INVALID-drop ruleset.
pub(crate) fn prepare_node(ns: &str, realism: Realism) -> Result<()> {
    if let Realism::Off { reason } = realism {
        eprintln!("vipx lab: node {ns} without rp_filter and netfilter: {reason}");
    }
    let rp = realism.rp_filter();
    // rp_filter on an interface is max(all, that interface); `default` is what interfaces created
    // later start with. All three are set so that no level silently differs from the others.
    sysctls(
        ns,
        &[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", rp),
            ("net.ipv4.conf.default.rp_filter", rp),
            ("net.ipv4.conf.lo.rp_filter", rp),
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
        ],
    )?;
    if realism == Realism::Node {
        load_nft(ns, NODE_RULESET)
            .with_context(|| format!("loading the INVALID-drop rules into {ns}"))?;
    }
    Ok(())
}

/// Sets rp_filter on interface `ifname` of node namespace `ns` explicitly, rather than trusting
/// that it inherited `default`.
pub(crate) fn prepare_interface(ns: &str, ifname: &str, realism: Realism) -> Result<()> {
    sysctls(
        ns,
        &[(
            &format!("net.ipv4.conf.{ifname}.rp_filter"),
            realism.rp_filter(),
        )],
    )
}

/// What a realistic node namespace dropped, to tell in a failure message whether rp_filter or
/// the INVALID-drop rules ate the packets that never arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    /// `IPReversePathFilter` (TcpExt in /proc/net/netstat): packets rp_filter dropped.
    pub rp_filter: u64,
    /// Packets [`NODE_RULESET`] dropped as conntrack INVALID, forwarded and delivered locally.
    pub invalid_forward: u64,
    pub invalid_input: u64,
}

impl std::fmt::Display for Drops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rp_filter dropped {}, conntrack INVALID dropped {} forwarded and {} local",
            self.rp_filter, self.invalid_forward, self.invalid_input
        )
    }
}

/// The drop counters of node namespace `ns` (zeros for what it does not have).
pub fn drops(ns: &str) -> Result<Drops> {
    let netstat = crate::netns::in_netns(ns, || {
        // thread-self: /proc/self/net would show the namespace of the process's main thread.
        std::fs::read_to_string("/proc/thread-self/net/netstat")
    })??;
    let mut drops = Drops {
        rp_filter: proc_net_field(&netstat, "TcpExt", "IPReversePathFilter").unwrap_or(0),
        ..Drops::default()
    };
    let nft = crate::kube_rules::find_tool("nft").context("`nft` is not installed")?;
    let out = ns_command(ns, &nft, ["list", "table", "inet", NFT_TABLE])
        .stderr(Stdio::null())
        .output()?;
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        let mut chain = "";
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("chain ") {
                chain = name.trim_end_matches(" {");
            } else if let Some(rest) = line.split("counter packets ").nth(1) {
                let packets = rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                match chain {
                    "forward" => drops.invalid_forward += packets,
                    "input" => drops.invalid_input += packets,
                    _ => {}
                }
            }
        }
    }
    Ok(drops)
}

/// Runs `nft -f -` with `ruleset` inside `ns`.
pub fn load_nft(ns: &str, ruleset: &str) -> Result<()> {
    let nft = crate::kube_rules::find_tool("nft")
        .context("`nft` is not installed (`cargo xtask setup` installs nftables)")?;
    let mut child = ns_command(ns, &nft, ["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} in {ns}", nft.display()))?;
    // Dropping stdin after the write is what lets nft see the end of its input.
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft -f - in {ns} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netstat_fields_are_found_by_name_in_their_section() {
        let netstat = "TcpExt: SyncookiesSent IPReversePathFilter\nTcpExt: 0 17\n\
                       IpExt: InNoRoutes IPReversePathFilter\nIpExt: 3 99\n";
        assert_eq!(
            proc_net_field(netstat, "TcpExt", "IPReversePathFilter"),
            Some(17)
        );
        assert_eq!(proc_net_field(netstat, "IpExt", "InNoRoutes"), Some(3));
        assert_eq!(proc_net_field(netstat, "TcpExt", "Missing"), None);
    }
}
