//! The node's addresses that serve node ports (`--nodeport-addresses`, kube-proxy's flag): each
//! node port becomes a frontend on each of them (`maps::target_on`). Without the flag, the
//! addresses of this node's Node object when it names any, else those on the node's interfaces,
//! read at every interface scan, so an address added or removed later (DHCP, a new NIC) follows
//! within a scan.

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Node;

use crate::config::Cidr;

/// Every IPv4 address on this network namespace's interfaces but loopback ones (the programs
/// treat 127.0.0.0/8 on their own, for the node's sockets only), with its interface; helper
/// devices' too (see [`is_helper_device`]: [`NodeAddresses`] leaves them out by default).
pub fn local_ipv4() -> Result<Vec<(String, Ipv4Addr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing the node's addresses");
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null()
            // SAFETY: a non-null sockaddr of the list.
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET sockaddr is a sockaddr_in.
            let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
            let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            // SAFETY: getifaddrs gives every entry a NUL-terminated name.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            if !addr.is_loopback() {
                out.push((name, addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Devices whose addresses are not the node's own: proxies', CNIs' and container runtimes'
/// (kube-proxy's IPVS dummy holds every ClusterIP, NodeLocal DNSCache's the DNS ClusterIP) and
/// tunnels. A node port on each of their addresses would cost a frontend (and a Maglev table)
/// per address for nothing, and XDP does not belong on them. Bridges are not excluded as such:
/// a bare-metal node's address often sits on one (`br0`, `vmbr0`).
fn is_helper_device(name: &str) -> bool {
    const NAMES: [&str; 5] = [
        "kube-ipvs0",
        "nodelocaldns",
        "docker0",
        "cni0",
        "kube-bridge",
    ];
    const PREFIXES: [&str; 8] = [
        "cilium_", "flannel", "cali", "vxlan", "tunl", "wg", "genev", "virbr",
    ];
    if NAMES.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p)) {
        return true;
    }
    let sys = std::path::Path::new("/sys/class/net").join(name);
    let devtype = std::fs::read_to_string(sys.join("uevent")).unwrap_or_default();
    let kind = devtype
        .lines()
        .find_map(|l| l.strip_prefix("DEVTYPE="))
        .unwrap_or("");
    // ARPHRD_ETHER: tunnels (IPIP, GRE, WireGuard, tun) are something else.
    let ether = std::fs::read_to_string(sys.join("type")).map_or(true, |t| t.trim() == "1");
    matches!(kind, "vxlan" | "wireguard" | "geneve") || !ether
}

/// The addresses of `local` that `--nodeport-addresses` selects (none given: all of them, as
/// kube-proxy's default before 1.29 and Cilium's).
pub fn select<'a>(
    local: impl IntoIterator<Item = &'a Ipv4Addr>,
    cidrs: &[Cidr],
) -> BTreeSet<Ipv4Addr> {
    local
        .into_iter()
        .copied()
        .filter(|a| cidrs.is_empty() || cidrs.iter().any(|c| c.contains((*a).into())))
        .collect()
}

/// The selected node addresses, as last read.
pub struct NodeAddresses {
    cidrs: Vec<Cidr>,
    /// The IPv4 `InternalIP`/`ExternalIP` addresses of this node's Node object.
    from_node: BTreeSet<Ipv4Addr>,
    last: Option<BTreeSet<Ipv4Addr>>,
    /// Every address of the last read, with its interface.
    by_interface: Vec<(String, Ipv4Addr)>,
}

impl NodeAddresses {
    pub fn new(cidrs: Vec<Cidr>) -> Self {
        Self {
            cidrs,
            from_node: BTreeSet::new(),
            last: None,
            by_interface: Vec::new(),
        }
    }

    /// This node's Node object as last seen (`None`: none). Without `--nodeport-addresses`, its
    /// IPv4 `InternalIP` and `ExternalIP` addresses are the node port addresses, as the issue
    /// asks (kube-proxy's nftables mode takes the node's primary IPs); a Node object without
    /// any leaves every interface address. Taken at the next [`Self::refresh`].
    pub fn set_node(&mut self, node: Option<&Node>) {
        self.from_node = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
            .collect();
    }

    /// The selected addresses as last read.
    pub fn selected(&self) -> BTreeSet<Ipv4Addr> {
        self.last.clone().unwrap_or_default()
    }

    /// Every address of the last read, with its interface.
    pub fn by_interface(&self) -> &[(String, Ipv4Addr)] {
        &self.by_interface
    }

    /// Read the interfaces again: the selected addresses when they changed (or on the first
    /// read), else `None`.
    pub fn refresh(&mut self) -> Result<Option<Vec<Ipv4Addr>>> {
        // Without --nodeport-addresses, helper devices' addresses are not the node's; CIDRs
        // given select whatever they cover.
        let explicit = !self.cidrs.is_empty();
        self.by_interface = local_ipv4()?
            .into_iter()
            .filter(|(name, _)| explicit || !is_helper_device(name))
            .collect();
        let now = if explicit || self.from_node.is_empty() {
            select(self.by_interface.iter().map(|(_, a)| a), &self.cidrs)
        } else {
            self.from_node.clone()
        };
        if self.last.as_ref() == Some(&now) {
            return Ok(None);
        }
        tracing::info!(
            addresses = %now.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "node port addresses"
        );
        let list = now.iter().copied().collect();
        self.last = Some(now);
        Ok(Some(list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without CIDRs, the Node object's IPv4 InternalIP and ExternalIP addresses (not its
    /// hostname, not IPv6) are the node port addresses; without a Node object, or with CIDRs
    /// given, the interfaces decide.
    #[test]
    fn the_node_objects_addresses_are_the_default() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "198.18.0.1"},
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "198.18.9.9"},
                {"type": "InternalIP", "address": "2001:db8::1"},
            ]},
        }))
        .unwrap();
        let ours = vec![Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 9, 9)];
        let mut a = NodeAddresses::new(Vec::new());
        a.set_node(Some(&node));
        assert_eq!(a.refresh().unwrap(), Some(ours.clone()));
        assert_eq!(a.refresh().unwrap(), None, "unchanged");
        a.set_node(None);
        let interfaces = a.refresh().unwrap().expect("back to the interfaces");
        assert!(!interfaces.contains(&ours[1]), "{interfaces:?}");

        let mut b = NodeAddresses::new(vec!["198.18.9.0/24".parse().unwrap()]);
        b.set_node(Some(&node));
        let chosen = b.refresh().unwrap().unwrap_or_default();
        assert!(
            !chosen.contains(&ours[1]),
            "CIDRs select interface addresses: {chosen:?}"
        );
    }

    #[test]
    fn helper_devices_are_not_node_addresses() {
        for name in [
            "kube-ipvs0",
            "nodelocaldns",
            "cni0",
            "flannel.1",
            "cali12ab",
            "tunl0",
            "wg0",
        ] {
            assert!(is_helper_device(name), "{name}");
        }
        // A name this machine does not have: only the names decide.
        assert!(!is_helper_device("vipx-test-no-such-if"));
    }

    #[test]
    fn nodeport_addresses_select_by_cidr() {
        let local: BTreeSet<Ipv4Addr> = ["198.18.0.1", "198.18.64.1", "198.19.1.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(select(&local, &[]), local);
        let cidrs: Vec<Cidr> = vec![
            "198.18.0.0/24".parse().unwrap(),
            "198.19.0.0/16".parse().unwrap(),
        ];
        let picked: Vec<String> = select(&local, &cidrs)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(picked, ["198.18.0.1", "198.19.1.1"]);
        let v6: Vec<Cidr> = vec!["2001:db8::/32".parse().unwrap()];
        assert!(select(&local, &v6).is_empty());
    }
}
