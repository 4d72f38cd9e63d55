//! The node's external interfaces: where clients outside the cluster reach node ports,
//! LoadBalancer and external IPs. Each gets `vipx_node_xdp` (native XDP, generic XDP where the
//! driver has none; the log says which) and, on its tcx egress, the pod program's reverse NAT
//! (`vipx_pod_egress`), which restores the frontend on the answers of backends on this node as
//! they leave. Links are pinned under `<pin dir>/node-links` as `<interface>@<ifindex>-xdp` and
//! `-egress`, adopted by the next vipx like the pod programs' links.
//!
//! Which interfaces: `--node-interfaces GLOB,...`, or by default those holding a node address
//! that serves node ports (not loopback, not a pod interface).
//!
//! Next hops the XDP program found unresolved (`VIPX_NEIGHMISS4`) are resolved here, at every
//! interface scan: a neighbour request with `NTF_USE`, as Cilium's neighbour discovery does,
//! makes the kernel ARP for it, so the client's retransmission finds the MAC.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink},
};
use proxy_common::{map_names, prog_names};

use crate::loader::{self, attach_pinned, replace_program, update_link};
use crate::netlink;

pub fn link_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("node-links")
}

/// The node interfaces and what is attached to them.
pub struct NodeInterfaces {
    /// Interface -> (index, XDP mode) while attached.
    attached: BTreeMap<String, (u32, &'static str)>,
    /// Said once per interface that failed.
    refused: BTreeSet<String>,
    link_dir: PathBuf,
    neighmiss: HashMap<MapData, [u8; 4], u32>,
    mode: NodeMode,
}

/// How the node program meets an interface (`--node-xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeMode {
    /// Native XDP, in the driver; where the driver refuses it, the same program at TC ingress.
    Native,
    /// Generic XDP (in the stack, on every driver): only right for packets with finished
    /// checksums (see the README).
    Generic,
    /// TC ingress only.
    Tc,
}

impl NodeMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "native" => Some(Self::Native),
            "generic" => Some(Self::Generic),
            "tc" => Some(Self::Tc),
            _ => None,
        }
    }
}

impl NodeInterfaces {
    /// Verify the XDP program (the egress program is verified with the pod programs) and take the
    /// next-hop map.
    pub fn new(ebpf: &mut Ebpf, pin_dir: &Path, mode: NodeMode) -> Result<Self> {
        loader::load_once(xdp(ebpf)?.load()).context("verifying the node XDP program")?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(prog_names::NODE_TC)
            .with_context(|| format!("program {} missing from the object", prog_names::NODE_TC))?
            .try_into()?;
        loader::load_once(tc.load()).context("verifying the node TC program")?;
        let link_dir = link_dir(pin_dir);
        fs::create_dir_all(&link_dir)
            .with_context(|| format!("creating {}", link_dir.display()))?;
        let neighmiss = HashMap::try_from(
            ebpf.take_map(map_names::NEIGHMISS4)
                .context("map VIPX_NEIGHMISS4 missing from the object")?,
        )?;
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if kernel_older_than(&release, (6, 7)) {
            tracing::error!(
                kernel = release.trim(),
                "external traffic to a backend on another node needs Linux 6.7 (bpf_fib_lookup \
                 with BPF_FIB_LOOKUP_SRC): on this kernel such flows are dropped and counted as \
                 node_fib_failed; backends on this node are served"
            );
        }
        Ok(Self {
            attached: BTreeMap::new(),
            refused: BTreeSet::new(),
            link_dir,
            neighmiss,
            mode,
        })
    }

    /// Attach to `wanted` (interface -> index) where not attached yet; forget interfaces no
    /// longer wanted or gone (their pins go, which detaches what is still attached).
    pub fn sync(&mut self, ebpf: &mut Ebpf, wanted: &BTreeMap<String, u32>) {
        let stale: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, (index, _))| wanted.get(*name) != Some(index))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.attached.remove(&name);
            tracing::info!(interface = %name, "node interface no longer served");
        }
        // Pins of interfaces not served (gone while vipx was down, or no longer selected).
        if let Ok(entries) = fs::read_dir(&self.link_dir) {
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                let keep = wanted
                    .iter()
                    .any(|(name, index)| file.starts_with(&format!("{}@{index}-", pin_name(name))));
                if !keep {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        for (name, index) in wanted {
            if self.attached.contains_key(name) {
                continue;
            }
            match self.attach(ebpf, name, *index) {
                Ok(mode) => {
                    self.refused.remove(name);
                    tracing::info!(interface = %name, mode, "node interface served");
                    self.attached.insert(name.clone(), (*index, mode));
                }
                Err(e) => {
                    if self.refused.insert(name.clone()) {
                        tracing::warn!(interface = %name, "node interface not served (retried at every scan): {e:#}");
                    }
                }
            }
        }
    }

    /// The node program (native XDP, else TC ingress; or as `--node-xdp-mode` says) and the
    /// egress reverse NAT, each adopted from its pin when an earlier vipx left one for this
    /// interface. Returns how the node program is attached.
    fn attach(&mut self, ebpf: &mut Ebpf, iface: &str, ifindex: u32) -> Result<&'static str> {
        let base = format!("{}@{ifindex}", pin_name(iface));
        let egress = self.link_dir.join(format!("{base}-egress"));
        if egress.exists() {
            replace_program(ebpf, prog_names::POD_EGRESS, &egress)?;
        } else {
            attach_pinned(
                ebpf,
                prog_names::POD_EGRESS,
                iface,
                TcAttachType::Egress,
                &egress,
            )
            .context("attaching the reverse NAT at egress")?;
        }
        let path = self.link_dir.join(format!("{base}-xdp"));
        let tc_path = self.link_dir.join(format!("{base}-tc"));
        // What an earlier vipx left is adopted only where it is what this mode asks for: an
        // upgrade from a generic-XDP fallback, or a mode changed between runs, ends with the
        // hook asked for and no second copy of the program.
        let wanted = match self.mode {
            NodeMode::Native => Some(XdpKind::Driver),
            NodeMode::Generic => Some(XdpKind::Generic),
            NodeMode::Tc => None,
        };
        if path.exists() {
            let kind = xdp_kind(ifindex).unwrap_or_else(|e| {
                tracing::info!(interface = %iface, "XDP mode not read: {e:#}");
                None
            });
            if kind.is_some() && kind == wanted {
                match update_link(&path, xdp(ebpf)?.fd()?.as_fd()) {
                    Ok(()) => {
                        unpin(&tc_path)?;
                        return Ok("xdp, adopted");
                    }
                    Err(e) => {
                        tracing::info!(interface = %iface, "pinned XDP link not reusable, attaching afresh: {e:#}")
                    }
                }
            }
            if self.mode != NodeMode::Tc {
                // A device runs one XDP mode at a time: the other kind goes first. The kernel
                // releases an unpinned link a moment later (deferred work), so wait for it.
                unpin(&path)?;
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while xdp_kind(ifindex).is_ok_and(|k| k.is_some())
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        let tc = |ebpf: &mut Ebpf| -> Result<&'static str> {
            if tc_path.exists() {
                match replace_program(ebpf, prog_names::NODE_TC, &tc_path) {
                    Ok(()) => return Ok("tc, adopted"),
                    Err(e) => {
                        tracing::info!(interface = %iface, "pinned TC link not reusable, attaching afresh: {e:#}");
                        unpin(&tc_path)?;
                    }
                }
            }
            attach_pinned(
                ebpf,
                prog_names::NODE_TC,
                iface,
                TcAttachType::Ingress,
                &tc_path,
            )
            .context("attaching the node program at TC ingress")?;
            Ok("tc")
        };
        if self.mode == NodeMode::Tc {
            let mode = tc(ebpf)?;
            // TC serves first; then the XDP link goes.
            unpin(&path)?;
            return Ok(mode);
        }
        let prog = xdp(ebpf)?;
        let (id, mode) = match self.mode {
            NodeMode::Generic => (
                prog.attach_to_if_index(ifindex, XdpMode::Skb)
                    .context("attaching generic XDP")?,
                "generic xdp",
            ),
            _ => match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
                Ok(id) => (id, "native xdp"),
                Err(native) => {
                    let mode = tc(ebpf).with_context(|| format!("native XDP failed: {native}"))?;
                    tracing::info!(interface = %iface, "native XDP refused ({native}): the node program runs at TC ingress");
                    return Ok(mode);
                }
            },
        };
        let link = FdLink::try_from(prog.take_link(id)?)
            .context("XDP attached without a link (kernel < 5.9): not supported")?;
        link.pin(&path)
            .with_context(|| format!("pinning the link at {}", path.display()))?;
        // XDP serves first; then a TC link an earlier run left goes.
        unpin(&tc_path)?;
        Ok(mode)
    }

    /// Ask the kernel to resolve the next hops the XDP program found without a neighbour entry.
    pub fn resolve_neighbours(&mut self) {
        let missed: Vec<([u8; 4], u32)> = self.neighmiss.iter().flatten().collect();
        for (addr, ifindex) in missed {
            let _ = self.neighmiss.remove(&addr);
            let nexthop = Ipv4Addr::from(addr);
            match neigh_use(ifindex, nexthop) {
                Ok(()) => tracing::debug!(%nexthop, ifindex, "neighbour resolution asked for"),
                Err(e) => tracing::warn!(%nexthop, ifindex, "neighbour resolution failed: {e:#}"),
            }
        }
    }
}

use std::os::fd::AsFd as _;

fn xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let p = ebpf
        .program_mut(prog_names::NODE_XDP)
        .with_context(|| format!("program {} missing from the object", prog_names::NODE_XDP))?;
    Ok(p.try_into()?)
}

/// Removes a link's pin, which detaches the link (nothing else holds it); no pin, nothing to do.
fn unpin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// How an XDP program is attached to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum XdpKind {
    Driver,
    Generic,
    Other,
}

/// The kind of XDP program on interface `ifindex` (`IFLA_XDP_ATTACHED`), `None` without one.
fn xdp_kind(ifindex: u32) -> Result<Option<XdpKind>> {
    const RTM_GETLINK: u16 = 18;
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_ATTACHED: u16 = 2;
    let mut body = [0u8; 16];
    body[4..8].copy_from_slice(&i32::try_from(ifindex)?.to_ne_bytes());
    let mut rtnl = netlink::Rtnl::open()?;
    let answer = rtnl.request(RTM_GETLINK, 0, &body)?;
    let Some((_, xdp)) = netlink::attributes(answer, 16).find(|(k, _)| *k == IFLA_XDP) else {
        return Ok(None);
    };
    let attached = netlink::attributes(xdp, 0)
        .find(|(k, _)| *k == IFLA_XDP_ATTACHED)
        .and_then(|(_, v)| v.first().copied());
    Ok(match attached {
        None | Some(0) => None,
        Some(1) => Some(XdpKind::Driver),
        Some(2) => Some(XdpKind::Generic),
        Some(_) => Some(XdpKind::Other),
    })
}

/// As the pod links' pin names: bpffs refuses dots, interface names may have them.
fn pin_name(iface: &str) -> String {
    iface.replace('.', ":")
}

/// Keep the node's own sockets off the SNAT ports: adds `SNAT_PORT_MIN-SNAT_PORT_MAX` to
/// `net.ipv4.ip_local_reserved_ports` of this network namespace (the kernel then never picks
/// them for an unbound socket), and says so when the ephemeral range reaches into them. Best
/// effort: a read-only /proc/sys (a container without it) is reported, not fatal.
pub fn reserve_snat_ports() {
    use proxy_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};
    const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let ours = format!("{SNAT_PORT_MIN}-{SNAT_PORT_MAX}");
    match fs::read_to_string(RESERVED) {
        Ok(now) if now.split(',').any(|r| r.trim() == ours) => {}
        Ok(now) => {
            let now = now.trim();
            let new = if now.is_empty() {
                ours.clone()
            } else {
                format!("{now},{ours}")
            };
            match fs::write(RESERVED, &new) {
                Ok(()) => tracing::info!(ports = %ours, "SNAT ports reserved for external flows"),
                Err(e) => tracing::warn!(
                    "could not reserve the SNAT ports {ours} ({RESERVED}: {e}): the node's own \
                     sockets may take one an external flow uses"
                ),
            }
        }
        Err(e) => tracing::warn!("reading {RESERVED}: {e}"),
    }
    if let Ok(range) = fs::read_to_string(RANGE)
        && let Some(high) = range
            .split_whitespace()
            .nth(1)
            .and_then(|h| h.parse::<u16>().ok())
        && high >= SNAT_PORT_MIN
    {
        tracing::warn!(
            "the ephemeral port range ({}) reaches into the SNAT ports {ours}: reserved ports \
             keep sockets off them, but NAT rules (a CNI's masquerade with --random-fully) do not",
            range.trim()
        );
    }
}

/// The interfaces to serve: those matching `globs` if any are given, else those holding one of
/// `node_addresses`; never loopback or a pod interface.
pub fn select(
    present: &[(String, u32)],
    addresses: &[(String, Ipv4Addr)],
    node_addresses: &BTreeSet<Ipv4Addr>,
    globs: &[glob::Pattern],
    pod_globs: &[glob::Pattern],
) -> BTreeMap<String, u32> {
    present
        .iter()
        .filter(|(name, _)| name != "lo" && !pod_globs.iter().any(|g| g.matches(name)))
        .filter(|(name, _)| {
            if globs.is_empty() {
                addresses
                    .iter()
                    .any(|(n, a)| n == name && node_addresses.contains(a))
            } else {
                globs.iter().any(|g| g.matches(name))
            }
        })
        .cloned()
        .collect()
}

/// Whether kernel `release` (`uname -r`) is older than `(major, minor)`; an unreadable release
/// is taken as new enough.
fn kernel_older_than(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(a)), Some(Ok(b))) => (a, b) < (major, minor),
        _ => false,
    }
}

/// `RTM_NEWNEIGH` with `NTF_USE` for `addr` on `ifindex`: the kernel starts resolving it (an
/// entry is created if there is none) and reports nothing else.
fn neigh_use(ifindex: u32, addr: Ipv4Addr) -> Result<()> {
    const RTM_NEWNEIGH: u16 = 28;
    const NDA_DST: u16 = 1;
    const NTF_USE: u8 = 0x01;
    const NUD_NONE: u16 = 0;
    // `ndmsg`: family, two pad fields, ifindex, state, flags, type; then the address.
    let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
    body.extend_from_slice(
        &i32::try_from(ifindex)
            .context("interface index")?
            .to_ne_bytes(),
    );
    body.extend_from_slice(&NUD_NONE.to_ne_bytes());
    body.extend_from_slice(&[NTF_USE, 0]);
    body.extend(netlink::attribute(NDA_DST, &addr.octets()));
    let flags = libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE;
    netlink::Rtnl::open()?.request(RTM_NEWNEIGH, flags as u16, &body)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(kernel_older_than("6.6.58-amd64\n", (6, 7)));
        assert!(kernel_older_than("5.15.0-1064-azure", (6, 7)));
        assert!(!kernel_older_than("6.7.0", (6, 7)));
        assert!(!kernel_older_than("6.18.44-fc-v595", (6, 7)));
        assert!(!kernel_older_than("7.0-rc1", (6, 7)));
        assert!(!kernel_older_than("", (6, 7)));
        assert!(!kernel_older_than("garbage", (6, 7)));
    }
}
