//! Entering named network namespaces (the ones `ip netns add` creates under /run/netns).

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Directory where iproute2 keeps the bind mounts that name network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The bind mount that names network namespace `ns`.
pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(ns)
}

/// Whether a named network namespace currently exists.
pub fn netns_exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

/// Runs `f` on a fresh thread that has joined network namespace `ns`, and returns its result.
///
/// Sockets created inside `f` belong to `ns` for their whole life, so they can be returned and used
/// from any thread afterwards. A panic inside `f` is propagated to the caller unchanged, so test
/// assertions made inside keep their message.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(ns);
    let file = File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(scope, move || -> Result<T> {
                // A network namespace switch is per thread, which is why this runs on a thread of
                // its own: the caller's thread stays where it was.
                // SAFETY: `file` is an open descriptor of a network namespace for this whole call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setns into {}", path.display()));
                }
                Ok(f())
            })
            .context("spawning a thread to enter a network namespace")?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A command that runs `program` inside network namespace `ns`.
///
/// Uses `nsenter --net` rather than `ip netns exec`: the latter also gives the program a private
/// mount namespace with a fresh /sys, which hides /sys/fs/bpf and the cgroup v2 mount from it.
/// nsenter execs `program` in place, so the spawned child's pid is the program's own pid.
pub fn ns_command<I, S>(ns: &str, program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut net = std::ffi::OsString::from("--net=");
    net.push(netns_path(ns));
    let mut cmd = Command::new("nsenter");
    cmd.arg(net).arg("--").arg(program).args(args);
    cmd
}

/// Runs `cmd` to completion; a failure names the command line and carries its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let line = command_line(cmd);
    let out = cmd.output().with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip` with `args`.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// Runs `ip -n ns` with `args`: iproute2 then works on that namespace without spawning inside it.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(["-n", ns]).args(args))
}

/// Writes sysctls inside `ns`. /proc/sys/net shows the namespace of the thread that opens it, so
/// plain file writes from [`in_netns`] reach the right namespace without a `sysctl` process.
pub fn sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    in_netns(ns, || {
        settings.iter().try_for_each(|(key, value)| {
            let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value)
                .with_context(|| format!("setting {key}={value} in namespace {ns}"))
        })
    })?
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Field `field` of section `section` in a /proc/net/snmp or /proc/net/netstat text: each section
/// is a header line of names and a line of values, both starting with `<section>:`.
pub(crate) fn proc_net_field(text: &str, section: &str, field: &str) -> Option<u64> {
    let prefix = format!("{section}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    let names = lines.next()?.split_whitespace().skip(1);
    let values = lines.next()?.split_whitespace().skip(1);
    names
        .zip(values)
        .find(|(name, _)| *name == field)
        .and_then(|(_, value)| value.parse().ok())
}
