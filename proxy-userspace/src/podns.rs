//! `--socket-lb all`: the network namespaces of this node's pods, so that the socket programs
//! serve their sockets too, and only theirs: in a lab, another node's pods on the same machine
//! stay untouched.
//!
//! A pod is known by its host-side interface. Its peer lives in a namespace the kernel names,
//! from ours, by an id (`IFLA_LINK_NETNSID`). Namespace files (bind mounts under `/run/netns`,
//! where CRI runtimes keep pod sandboxes, then every process's `/proc/<pid>/ns/net`) are asked
//! for their id in ours (`RTM_GETNSID` with `NETNSA_FD`); the first with the peer's id is entered
//! on a short-lived thread for its cookie (`SO_NETNS_COOKIE`, the key the programs check) and its
//! IPv4 address (the pod's session-affinity client, as the pod program keys it by source).

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{Ebpf, maps::HashMap as BpfHashMap};
use proxy_common::map_names;

use crate::netlink::{self, Rtnl};

/// A pod interface whose namespace was not found is looked for again after this long (its
/// sandbox may not be mounted yet; a search walks every process).
const RETRY: Duration = Duration::from_secs(5);

/// A pod's namespace as the socket programs know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodNamespace {
    pub cookie: u64,
    /// The affinity client: the pod's address.
    pub client: Ipv4Addr,
}

/// The pod namespaces written to `VIPX_SOCKNS`, by host-side interface index.
#[derive(Default)]
pub struct PodNamespaces {
    served: HashMap<u32, PodNamespace>,
    /// Interfaces whose namespace was not found, and when it was last looked for.
    missed: HashMap<u32, Instant>,
}

impl PodNamespaces {
    /// Serves the namespaces behind `pods` (name, ifindex) and stops serving those of interfaces
    /// gone. Failures are logged; the interface is tried again later.
    pub fn sync(&mut self, ebpf: &mut Ebpf, pods: &[(String, u32)]) {
        let present: HashSet<u32> = pods.iter().map(|(_, i)| *i).collect();
        self.missed.retain(|i, _| present.contains(i));
        let gone: Vec<u32> = self
            .served
            .keys()
            .filter(|i| !present.contains(i))
            .copied()
            .collect();
        let now = Instant::now();
        let wanted: Vec<&(String, u32)> = pods
            .iter()
            .filter(|(_, i)| !self.served.contains_key(i))
            .filter(|(_, i)| {
                self.missed
                    .get(i)
                    .is_none_or(|t| now.duration_since(*t) >= RETRY)
            })
            .collect();
        if gone.is_empty() && wanted.is_empty() {
            return;
        }
        let mut map: BpfHashMap<_, u64, u32> = match ebpf
            .map_mut(map_names::SOCKNS)
            .context("map VIPX_SOCKNS missing from the object")
            .and_then(|m| Ok(BpfHashMap::try_from(m)?))
        {
            Ok(map) => map,
            Err(e) => {
                tracing::warn!("pod namespaces not served: {e:#}");
                return;
            }
        };
        for ifindex in gone {
            if let Some(ns) = self.served.remove(&ifindex) {
                // A namespace with two pod interfaces stays while one remains.
                if !self.served.values().any(|o| o.cookie == ns.cookie) {
                    let _ = map.remove(&ns.cookie);
                }
            }
        }
        if wanted.is_empty() {
            return;
        }
        let found = match find(wanted.iter().map(|(_, i)| *i)) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("looking for pod namespaces: {e:#}");
                HashMap::new()
            }
        };
        for (name, ifindex) in wanted {
            match found.get(ifindex) {
                Some(ns) => {
                    match map.insert(ns.cookie, u32::from_ne_bytes(ns.client.octets()), 0) {
                        Ok(()) => {
                            self.missed.remove(ifindex);
                            self.served.insert(*ifindex, *ns);
                            tracing::info!(netns_cookie = ns.cookie, client = %ns.client, "socket-level load balancing on for the pod behind {name}");
                        }
                        Err(e) => {
                            self.missed.insert(*ifindex, now);
                            tracing::warn!(interface = %name, "pod namespace not served (VIPX_SOCKNS full?): {e}");
                        }
                    }
                }
                None => {
                    if self.missed.insert(*ifindex, now).is_none() {
                        tracing::warn!(interface = %name, "no namespace file or address found for this pod interface's peer yet; its sockets are not translated (its packets are)");
                    }
                }
            }
        }
    }

    pub fn served(&self) -> impl Iterator<Item = (&u32, &PodNamespace)> {
        self.served.iter()
    }
}

/// The namespaces behind host-side interfaces `ifindexes`, those found.
pub fn find(ifindexes: impl Iterator<Item = u32>) -> Result<HashMap<u32, PodNamespace>> {
    let mut rtnl = Rtnl::open()?;
    let mut by_nsid: HashMap<i32, Vec<u32>> = HashMap::new();
    for ifindex in ifindexes {
        match link_netnsid(&mut rtnl, ifindex) {
            Ok(Some(nsid)) => by_nsid.entry(nsid).or_default().push(ifindex),
            Ok(None) => tracing::debug!(ifindex, "interface has no peer in another namespace"),
            Err(e) => tracing::debug!(ifindex, "interface not asked: {e:#}"),
        }
    }
    let mut found = HashMap::new();
    if by_nsid.is_empty() {
        return Ok(found);
    }
    let own = fs::metadata("/proc/self/ns/net")
        .context("reading this process's network namespace")?
        .ino();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    // The cheap places first; every process only while something is missing.
    for stage in [mounted_namespaces(), process_namespaces()] {
        for path in stage {
            if by_nsid.is_empty() {
                return Ok(found);
            }
            let Ok(file) = fs::File::open(&path) else {
                continue;
            };
            let Ok(meta) = file.metadata() else { continue };
            if meta.ino() == own || !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            let Ok(Some(nsid)) = namespace_id(&mut rtnl, &file) else {
                continue;
            };
            let Some(ifindexes) = by_nsid.remove(&nsid) else {
                continue;
            };
            match enter(&file) {
                Ok(ns) => {
                    for ifindex in ifindexes {
                        found.insert(ifindex, ns);
                    }
                }
                Err(e) => {
                    // Said once: a missing capability fails every pod alike.
                    static SAID: AtomicBool = AtomicBool::new(false);
                    if !SAID.swap(true, Ordering::Relaxed) {
                        tracing::warn!(path = %path.display(), "pod namespace not read: {e:#}");
                    } else {
                        tracing::debug!(path = %path.display(), "pod namespace not read: {e:#}");
                    }
                }
            }
        }
    }
    Ok(found)
}

fn mounted_namespaces() -> Vec<PathBuf> {
    ["/run/netns", "/var/run/netns"]
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()))
        .collect()
}

fn process_namespaces() -> Vec<PathBuf> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .map(|e| e.path().join("ns/net"))
                .collect()
        })
        .unwrap_or_default()
}

/// `IFLA_LINK_NETNSID` of interface `ifindex`: the id, in this namespace, of the namespace its
/// peer lives in (`None` for an interface without a peer elsewhere).
fn link_netnsid(rtnl: &mut Rtnl, ifindex: u32) -> Result<Option<i32>> {
    const RTM_GETLINK: u16 = 18;
    const IFLA_LINK_NETNSID: u16 = 37;
    // `ifinfomsg`: family, pad, type, index, flags, change.
    let mut body = [0u8; 16];
    body[4..8].copy_from_slice(&i32::try_from(ifindex)?.to_ne_bytes());
    let answer = rtnl.request(RTM_GETLINK, 0, &body)?;
    Ok(netlink::attributes(answer, 16)
        .find(|(k, _)| *k == IFLA_LINK_NETNSID)
        .and_then(|(_, p)| netlink::attribute_i32(p))
        .filter(|id| *id >= 0))
}

/// The id this namespace gives the namespace `file` is (`None`: none assigned, so no interface
/// here has a peer there).
fn namespace_id(rtnl: &mut Rtnl, file: &fs::File) -> Result<Option<i32>> {
    const RTM_GETNSID: u16 = 90;
    const NETNSA_NSID: u16 = 1;
    const NETNSA_FD: u16 = 3;
    // `rtgenmsg`, padded to 4 bytes, then the file.
    let mut body = vec![0u8; 4];
    body.extend(netlink::attribute(
        NETNSA_FD,
        &u32::try_from(file.as_raw_fd())?.to_ne_bytes(),
    ));
    let answer = rtnl.request(RTM_GETNSID, 0, &body)?;
    Ok(netlink::attributes(answer, 4)
        .find(|(k, _)| *k == NETNSA_NSID)
        .and_then(|(_, p)| netlink::attribute_i32(p))
        .filter(|id| *id >= 0))
}

/// The cookie and first non-loopback IPv4 address of the namespace `file` is, read from a thread
/// that enters it and ends (a thread's namespace is its own; the process's stays).
fn enter(file: &fs::File) -> Result<PodNamespace> {
    let fd = file.try_clone()?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<PodNamespace> {
            // SAFETY: setns(2) on a descriptor we own, for this thread only.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("entering the namespace (setns needs CAP_SYS_ADMIN)");
            }
            let cookie = crate::socklb::netns_cookie()?;
            let client = first_ipv4()?.context("the namespace has no IPv4 address yet")?;
            Ok(PodNamespace { cookie, client })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the namespace reader panicked"))?
    })
}

/// The first IPv4 address outside 127.0.0.0/8 on this thread's namespace's interfaces.
fn first_ipv4() -> Result<Option<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list it returns through `head`; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        bail!("getifaddrs: {}", std::io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null address of the list; its family says which sockaddr it is.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
        let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        if !addr.is_loopback() {
            found = Some(addr);
            break;
        }
    }
    // SAFETY: frees the list getifaddrs returned, once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}
