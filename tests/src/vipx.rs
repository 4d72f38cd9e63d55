//! Running the real `vipx` in a lab node namespace, the way a test needs it: its own pin and state
//! directories, stopped by its pid (never by name) and cleaned up even when the test fails.
//!
//! ```no_run
//! use vipx_lab::cluster::{Cluster, ClusterConfig};
//! use vipx_lab::vipx::{ScratchDir, Vipx, locate_bin};
//! use vipx_lab::{Realism, unique_tag};
//!
//! let tag = unique_tag();
//! let mut cluster = Cluster::create(ClusterConfig {
//!     tag: tag.clone(),
//!     lab_pod_bin: locate_bin("lab-pod")?,
//!     realism: Realism::Node,
//!     nodes: vipx_lab::cluster::NODES,
//! })?;
//! let manifests = ScratchDir::create(&format!("vipx-{tag}-manifests"))?;
//! // ... write_service_spec(manifests.path(), ...) ...
//! let node1 = cluster.node(1).clone();
//! let vipx = Vipx::start(&locate_bin("vipx")?, &node1.name, manifests.path())?;
//! # anyhow::Ok(())
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::lab::HOST_IF_GLOB;
use crate::netns::ns_command;

/// Where vipx's per-node pin directories live (`/sys/fs/bpf/vipx/<node name>`).
pub const PIN_ROOT: &str = "/sys/fs/bpf/vipx";
/// How long vipx may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds binary `name` of this workspace: next to the running executable or one directory up
/// (test binaries live in `target/<profile>/deps`, the binaries they start in `target/<profile>`).
pub fn locate_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .with_context(|| {
            format!("{name} not found at {candidates:?}; build it first (`cargo xtask test` does)")
        })
}

/// A directory under the system temp dir, removed with everything in it on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `$TMPDIR/<name>`; `name` must be unique (put the lab tag in it).
    pub fn create(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("removing {}: {e}", self.path.display());
        }
    }
}

/// `vipx run` in a node namespace, attached to [`HOST_IF_GLOB`], with pin directory
/// `/sys/fs/bpf/vipx/<node>` and a state directory of its own. Dropping it stops vipx and removes
/// both directories.
pub struct Vipx {
    bin: PathBuf,
    /// The network namespace it runs in.
    node: String,
    /// Its `--node-name` (the namespace's name unless started with [`Vipx::start_as`]).
    name: String,
    /// `--manifests DIR` or `--kubeconfig FILE`.
    source: (&'static str, PathBuf),
    pin_dir: PathBuf,
    state_dir: PathBuf,
    /// More `vipx run` arguments (map sizes, say), given at every start.
    extra_args: Vec<String>,
    child: Option<Child>,
    /// Where the running process's log (stderr) goes, so tests can wait for what it says.
    log: Option<PathBuf>,
}

impl Vipx {
    /// Starts vipx in namespace `node` (which is also its `--node-name`), reading `manifests`.
    /// Refuses to start over a pin directory it did not create: that would adopt somebody
    /// else's maps.
    pub fn start(bin: &Path, node: &str, manifests: &Path) -> Result<Self> {
        Self::start_with(bin, node, manifests, &[])
    }

    /// [`Vipx::start`] with more `vipx run` arguments, kept for every restart.
    pub fn start_with(bin: &Path, node: &str, manifests: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_as(bin, node, node, manifests, extra)
    }

    /// [`Vipx::start_with`] in namespace `node` under another `--node-name` (its own pins and
    /// state): a second vipx process on the same node.
    pub fn start_as(
        bin: &Path,
        node: &str,
        name: &str,
        manifests: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_source(
            bin,
            node,
            name,
            ("--manifests", manifests.to_owned()),
            extra,
        )
    }

    /// Starts vipx in namespace `node` (also its `--node-name`) watching the API server that
    /// `kubeconfig` names (reachable from inside `node`, as an
    /// [`ApiServer`](crate::apiserver::ApiServer) started in it is).
    pub fn start_kube(bin: &Path, node: &str, kubeconfig: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_source(
            bin,
            node,
            node,
            ("--kubeconfig", kubeconfig.to_owned()),
            extra,
        )
    }

    fn start_source(
        bin: &Path,
        node: &str,
        name: &str,
        source: (&'static str, PathBuf),
        extra: &[&str],
    ) -> Result<Self> {
        let pin_dir = Path::new(PIN_ROOT).join(name);
        if pin_dir.exists() {
            bail!(
                "pin directory {} already exists (left by a crashed run?); remove it first",
                pin_dir.display()
            );
        }
        let mut vipx = Self {
            bin: bin.to_owned(),
            node: node.to_owned(),
            name: name.to_owned(),
            source,
            state_dir: std::env::temp_dir().join(format!("{name}-vipx-state")),
            pin_dir,
            extra_args: extra.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
            log: None,
        };
        vipx.spawn()?;
        Ok(vipx)
    }

    /// A second `vipx run` on this one's node, pin directory, state and manifests: what a
    /// DaemonSet surge rollout starts beside the running pod.
    pub fn second(&self) -> Result<Self> {
        let mut vipx = Self {
            bin: self.bin.clone(),
            node: self.node.clone(),
            name: self.name.clone(),
            source: self.source.clone(),
            pin_dir: self.pin_dir.clone(),
            state_dir: self.state_dir.clone(),
            extra_args: self.extra_args.clone(),
            child: None,
            log: None,
        };
        vipx.spawn()?;
        Ok(vipx)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails if vipx is not running (never started again after [`Vipx::stop`], or exited).
    pub fn ensure_running(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("vipx is stopped")?;
        if let Some(status) = child.try_wait()? {
            bail!("vipx in {} exited: {status}", self.node);
        }
        Ok(())
    }

    /// SIGTERM to the pid this started, then waits for it to exit (SIGKILL after
    /// 10 s). Pins and state stay, so [`Vipx::restart`] adopts them as a real restart
    /// would. Does nothing when already stopped.
    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if child.try_wait()?.is_none() {
            let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
            // SAFETY: kill(2) on the pid of a child this process spawned and has not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    eprintln!("vipx (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT:?}; killing it");
                    child.kill()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(Some(child.wait()?))
    }

    /// SIGKILL to the pid this started (a crash, an OOM kill), then reaps it. Nothing of vipx's
    /// own shutdown runs. Does nothing when already stopped.
    pub fn kill(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if child.try_wait()?.is_none() {
            child.kill()?;
        }
        Ok(Some(child.wait()?))
    }

    /// Stops vipx (SIGTERM) and starts `bin` in its place on the same pins, state and manifests:
    /// an upgrade to another build.
    pub fn replace_with(&mut self, bin: &Path) -> Result<()> {
        self.stop()?;
        self.bin = bin.to_owned();
        self.spawn()
    }

    /// Stops vipx (if running) and starts it again on the same pins, state and manifests.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// [`Self::restart`] with other extra arguments from now on (an operator changing a flag).
    pub fn restart_with(&mut self, extra: &[&str]) -> Result<()> {
        self.stop()?;
        self.extra_args = extra.iter().map(|a| (*a).to_owned()).collect();
        self.spawn()
    }

    /// `vipx services` for this instance: what is programmed, one frontend per line.
    pub fn services(&self) -> Result<String> {
        let out = self.complete("services")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `vipx <subcommand>` for this instance's node name, pins and state, in its namespace.
    fn command(&self, subcommand: &str) -> std::process::Command {
        ns_command(
            &self.node,
            &self.bin,
            [
                subcommand.as_ref(),
                "--node-name".as_ref(),
                self.name.as_ref(),
                "--pin-dir".as_ref(),
                self.pin_dir.as_os_str(),
                "--state-dir".as_ref(),
                self.state_dir.as_os_str(),
            ] as [&std::ffi::OsStr; 7],
        )
    }

    /// Runs `vipx <subcommand>` to completion; a failure carries its stderr.
    fn complete(&self, subcommand: &str) -> Result<std::process::Output> {
        let out = self
            .command(subcommand)
            .output()
            .with_context(|| format!("running vipx {subcommand}"))?;
        if !out.status.success() {
            bail!(
                "vipx {subcommand} for {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// `vipx cleanup` for this instance (stopped first): its pinned links, maps and state go, so
    /// its programs are detached. A stopped vipx leaves them attached on purpose.
    pub fn cleanup(&mut self) -> Result<()> {
        self.stop()?;
        self.complete("cleanup").map(drop)
    }

    /// Waits until `vipx services` shows a frontend line containing `frontend` (e.g.
    /// `198.19.0.10:80/TCP`) that satisfies `programmed` (e.g. lists every backend).
    pub fn wait_programmed(
        &mut self,
        frontend: &str,
        timeout: Duration,
        programmed: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            let last = match self.services() {
                Ok(text) => {
                    if text
                        .lines()
                        .any(|line| line.contains(frontend) && programmed(line))
                    {
                        return Ok(());
                    }
                    text
                }
                // The pins do not exist until vipx has loaded its object.
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "vipx in {} did not program {frontend} within {timeout:?}; last `vipx services`:\n{last}",
                    self.node
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn(&mut self) -> Result<()> {
        // One log per process (a restart starts a new one), removed with this handle.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "{}-vipx-{}-{}.log",
            self.name,
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        if let Some(old) = self.log.replace(path.clone()) {
            let _ = std::fs::remove_file(old);
        }
        let log =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let child = self
            .command("run")
            .arg(self.source.0)
            .arg(&self.source.1)
            .args(["--pod-interfaces", HOST_IF_GLOB])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {} in {}", self.bin.display(), self.node))?;
        self.child = Some(child);
        Ok(())
    }

    /// What the current (or last) process logged so far.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_default()
    }

    /// Waits until the process logged a line containing `text`.
    pub fn wait_log(&self, text: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(text) {
            if Instant::now() > deadline {
                bail!(
                    "vipx in {} did not log {text:?} within {timeout:?}; its log:\n{}",
                    self.node,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Vipx {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("{e:#}");
        }
        if let Some(log) = self.log.take() {
            let _ = std::fs::remove_file(log);
        }
        // Whatever cleanup could not remove.
        for dir in [&self.pin_dir, &self.state_dir] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("removing {}: {e}", dir.display()),
            }
        }
    }
}
