//! Deciding whether a privileged test can run, and keeping such tests from overlapping.

use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Whether this process can build labs and load eBPF programs: `false` means the caller should
/// skip its test (after this has printed why).
///
/// # Panics
/// When the environment variable `CI` is set and something is missing: CI runs as root, so a
/// privileged test that cannot run there is a failure, never a skip.
pub fn require_privileges() -> bool {
    let missing = missing_privileges();
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but this privileged test cannot run: {why}"
    );
    eprintln!("skipping privileged test: {why}");
    false
}

fn missing_privileges() -> Vec<String> {
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
    for (tool, arg) in [("ip", "-V"), ("nsenter", "--version")] {
        let works = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !works {
            missing.push(format!("`{tool}` is not runnable"));
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
