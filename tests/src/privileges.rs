//! Deciding whether a privileged test can run, and keeping such tests from overlapping.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The environment variable that lets privileged tests be skipped, outside CI only.
pub const SKIP_VAR: &str = "VIPX_SKIP_PRIVILEGED";

/// Whether a privileged test should run: `true` when this process can build labs and load eBPF
/// programs. A test that cannot run fails rather than passing silently: this returns `false` only
/// when the run opted out with `VIPX_SKIP_PRIVILEGED=1`, after printing what is skipped and why.
///
/// # Panics
/// When something is missing and the run did not opt out, and whenever the opt-out is set while
/// `CI` is: CI runs as root, so a privileged test that does not run there is a failure.
pub fn require_privileges() -> bool {
    let skip = std::env::var_os(SKIP_VAR).is_some_and(|v| v == "1");
    let ci = std::env::var_os("CI").is_some();
    assert!(
        !(skip && ci),
        "{SKIP_VAR}=1 is refused when CI is set: privileged tests must run in CI"
    );
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    if skip {
        // Straight to the stream, not eprintln!: libtest captures that and hides it for a test
        // that passes, and a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED privileged test {test}: {SKIP_VAR}=1 is set"
        );
        return false;
    }
    let missing = missing_privileges();
    assert!(
        missing.is_empty(),
        "privileged test {test} cannot run: {}. Run as root (CAP_BPF, CAP_NET_ADMIN, \
         CAP_SYS_ADMIN) with iproute2, util-linux and nftables installed (`cargo xtask setup`), \
         or skip privileged tests explicitly with {SKIP_VAR}=1 (refused under CI)",
        missing.join("; ")
    );
    true
}

/// What keeps this process from running privileged tests (capabilities, tools), one line each;
/// empty when nothing does.
pub fn missing_privileges() -> Vec<String> {
    let mut missing = Vec::new();
    match effective_capabilities() {
        Ok(caps) => {
            for (bit, name) in [
                (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
                (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
                (CAP_BPF, "CAP_BPF"),
            ] {
                if caps & (1 << bit) == 0 {
                    missing.push(format!("no {name}"));
                }
            }
        }
        Err(e) => missing.push(format!("cannot read capabilities: {e}")),
    }
    for (tool, arg, package) in [
        ("ip", "-V", "iproute2"),
        ("nsenter", "--version", "util-linux"),
        ("nft", "--version", "nftables"),
    ] {
        let works = crate::kube_rules::find_tool(tool).is_some_and(|path| {
            Command::new(path)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if !works {
            missing.push(format!("`{tool}` is not runnable (package {package})"));
        }
    }
    missing
}

fn effective_capabilities() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| std::io::Error::other("no CapEff line in /proc/self/status"))
}

/// Held by every test that changes shared kernel state (eBPF attachments, cgroup hooks), so the
/// tests of one binary run those parts one at a time. A test that panicked while holding it does
/// not poison it for the others.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
