//! Socket-level load balancing for the node's own processes (`--socket-lb host`): the cgroup
//! programs of `proxy-ebpf/src/sock.rs` translate a ClusterIP (or external IP, LB IP) a host
//! socket connects or sends to, once per connection, so `curl <ClusterIP>` from the node, kubelet
//! probes and hostNetwork pods reach Services with no per-packet work and see the VIP as their
//! peer.
//!
//! The programs live on a cgroup v2 directory (`--cgroup-root`, default the hierarchy's root),
//! which spans network namespaces; they act only for the namespace this vipx runs in (its cookie
//! in `SOCKNS`). Their links are pinned under `<pin dir>/cgroup`, named `<hook>@<cgroup id>`, so
//! they outlive the process as the pod programs' links do, and a restarted vipx swaps its
//! programs into them in place (`BPF_LINK_UPDATE`).

use std::{
    fs,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::HashMap,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use proxy_common::{map_names, prog_names};

use crate::loader::{self, update_link};

/// Which sockets get socket-level load balancing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketLb {
    /// Sockets of the node's own network namespace (host-network processes and pods).
    Host,
    /// Those and the sockets of the pods this vipx serves (the namespaces behind its pod
    /// interfaces, see `podns`).
    All,
    /// None: host processes cannot reach Services (as with kube-proxy, only if something else
    /// routes the VIPs).
    Off,
}

impl SocketLb {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "host" => Some(Self::Host),
            "all" => Some(Self::All),
            "off" => Some(Self::Off),
            _ => None,
        }
    }
}

/// The socket programs' names, for [`loader::verify_programs`].
pub fn program_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS.into_iter().map(|(name, _)| name)
}

/// The hooks, ways back first: once a socket can be translated, its peer must read as the VIP.
const PROGRAMS: [(&str, &str); 7] = [
    (prog_names::SOCK_GETPEERNAME4, "getpeername4"),
    (prog_names::SOCK_RECVMSG4, "recvmsg4"),
    (prog_names::SOCK_CONNECT4, "connect4"),
    (prog_names::SOCK_SENDMSG4, "sendmsg4"),
    (prog_names::SOCK_GETPEERNAME6, "getpeername6"),
    (prog_names::SOCK_RECVMSG6, "recvmsg6"),
    (prog_names::SOCK_CONNECT6, "connect6"),
];

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The directory holding a node's pinned cgroup links.
pub fn link_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("cgroup")
}

/// Where the cgroup v2 hierarchy is mounted here (`/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    cgroup2_mount_in(&info).context(
        "no cgroup v2 hierarchy is mounted (socket-level load balancing needs one): mount it, \
         name it with --cgroup-root, or run with --socket-lb off",
    )
}

/// The mount point of the first cgroup2 mount of its hierarchy's root in a mountinfo text.
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut f = mount.split(' ');
        let (root, point) = (f.nth(3)?, f.next()?);
        (fs.split(' ').next() == Some("cgroup2") && root == "/").then(|| PathBuf::from(point))
    })
}

/// The cookie of the network namespace this process runs in (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn netns_cookie() -> Result<u64> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a socket");
    }
    // SAFETY: a descriptor we just opened and own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14)");
    }
    Ok(cookie)
}

/// Serve sockets of this process's network namespace from the cgroup `cgroup`: the programs are
/// verified, told the namespace, and attached (or swapped into links pinned by an earlier vipx
/// for the same cgroup; pins for another cgroup go).
pub fn attach(ebpf: &mut Ebpf, pin_dir: &Path, cgroup: &Path) -> Result<()> {
    let dir = fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    if !is_cgroup2(&dir) {
        bail!(
            "{} is not a cgroup v2 directory (--cgroup-root)",
            cgroup.display()
        );
    }
    let cgroup_id = fs::metadata(cgroup)
        .with_context(|| format!("reading {}", cgroup.display()))?
        .ino();
    let cookie = netns_cookie()?;
    let mut netns: HashMap<_, u64, u32> = HashMap::try_from(
        ebpf.map_mut(map_names::SOCKNS)
            .context("map VIPX_SOCKNS missing from the object")?,
    )?;
    // The value is the namespace's affinity client: the node's processes are one, 0.0.0.0.
    netns.insert(cookie, 0, 0).context("writing VIPX_SOCKNS")?;

    let links = link_dir(pin_dir);
    fs::create_dir_all(&links).with_context(|| format!("creating {}", links.display()))?;
    let suffix = format!("@{cgroup_id}");
    for entry in fs::read_dir(&links)?.flatten() {
        if !entry.file_name().to_string_lossy().ends_with(&suffix) {
            // Unpinned, a link of another cgroup (an earlier --cgroup-root) is detached.
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    for (name, hook) in PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        loader::load_once(prog.load()).with_context(|| format!("verifying {name}"))?;
        let path = links.join(format!("{hook}{suffix}"));
        if path.exists() {
            match update_link(&path, prog.fd()?.as_fd()) {
                Ok(()) => continue,
                Err(e) => {
                    tracing::warn!(link = %path.display(), "pinned link not reusable, attaching afresh: {e:#}");
                    fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
            }
        }
        // `Single` asks the kernel for a link (5.7+); a cgroup holds any number of links.
        let id = prog
            .attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        let link = FdLink::try_from(prog.take_link(id)?).context("not an fd link")?;
        link.pin(&path)
            .with_context(|| format!("pinning the link at {}", path.display()))?;
    }
    tracing::info!(cgroup = %cgroup.display(), netns_cookie = cookie, "socket-level load balancing on for this network namespace");
    Ok(())
}

/// Take the socket programs off (`--socket-lb off` after a run with it on): unpinned, their links
/// are detached.
pub fn detach(pin_dir: &Path) -> Result<()> {
    let links = link_dir(pin_dir);
    let Ok(entries) = fs::read_dir(&links) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        fs::remove_file(entry.path())
            .with_context(|| format!("removing {}", entry.path().display()))?;
    }
    fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    tracing::info!("socket-level load balancing taken off");
    Ok(())
}

fn is_cgroup2(dir: &fs::File) -> bool {
    // SAFETY: fstatfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(dir.as_raw_fd(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_root_on_unified_and_hybrid_hosts() {
        let hybrid = "\
35 24 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A container sees its own cgroup mounted at /sys/fs/cgroup (root not "/"): not the
        // hierarchy's root, so it is skipped for the host's mount.
        let nested = "\
40 30 0:27 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw
41 30 0:27 / /run/vipx/cgroupv2 rw - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount_in(nested),
            Some(PathBuf::from("/run/vipx/cgroupv2"))
        );
        assert_eq!(cgroup2_mount_in("1 0 0:1 / / rw - ext4 /dev/sda rw"), None);
    }
}
