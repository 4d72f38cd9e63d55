//! `vipx run`: keep the kernel maps equal to the manifests directory and the pod program
//! attached to every matching interface, until SIGINT/SIGTERM.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use notify::{RecursiveMode, Watcher as _};
use serde::{Deserialize, Serialize};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    loader::{self, Attachments, MapSizes},
    maps::{self, MapWriter},
    source::DirCache,
    sync::{ChangeTracker, Changes},
};

pub struct RunOptions {
    pub manifests: PathBuf,
    pub node_name: String,
    pub pod_interfaces: Vec<glob::Pattern>,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub sizes: MapSizes,
    /// Full resync even without a change event (kube-proxy: 30 s).
    pub resync: Duration,
}

/// Names of what is programmed, by reverse-NAT id, so `vipx services` can label what it reads
/// from the maps (which hold only addresses and ids).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateFile {
    /// "addr:port/proto" of a frontend -> service port name.
    pub frontends: BTreeMap<String, String>,
}

pub const STATE_FILE: &str = "services.json";

/// Default state directory of a node.
pub fn default_state_dir(node_name: &str) -> PathBuf {
    Path::new("/run/vipx").join(node_name)
}

/// Every interface of this network namespace (if_nameindex asks the kernel through netlink, so
/// unlike /sys/class/net it reflects the namespace we run in even under `nsenter --net`).
pub fn interfaces() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return out;
        }
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    out
}

struct Controller {
    opts: RunOptions,
    ebpf: Ebpf,
    writer: MapWriter,
    tracker: ChangeTracker,
    dir: DirCache,
    attachments: Attachments,
    /// Reconcile every key next time: at start, on the periodic resync, after a failed apply.
    full: bool,
    /// Problems already reported, so a bad file is logged once per change rather than every
    /// resync.
    last_problems: Vec<String>,
}

impl Controller {
    fn sync(&mut self) -> Result<()> {
        let started = Instant::now();
        let changes = match self.dir.load(&self.opts.manifests) {
            Some(objs) => {
                let file_problems: Vec<String> =
                    objs.problems.iter().map(ToString::to_string).collect();
                self.tracker.replace_all(objs);
                let changes = self.tracker.flush();
                let problems: Vec<String> = file_problems
                    .into_iter()
                    .chain(self.tracker.problems())
                    .collect();
                if problems != self.last_problems {
                    for p in &problems {
                        tracing::warn!("skipped: {p}");
                    }
                    self.last_problems = problems;
                }
                changes
            }
            // Nothing changed on disk: only a due full reconcile has work to do.
            None if self.full => Changes::default(),
            None => return Ok(()),
        };
        let target = self.tracker.target();
        let full = std::mem::take(&mut self.full);
        let st = if full {
            self.writer.apply(target)
        } else {
            self.writer
                .apply_keys(target, &changes.frontends, &changes.backends)
        };
        let st = match st {
            Ok(st) => st,
            Err(e) => {
                self.full = true;
                return Err(e);
            }
        };
        if changes.names_changed || full {
            self.write_state(target)?;
        }
        if !st.is_noop() {
            tracing::info!(
                frontends = target.frontends.len(),
                backends = target.backends.len(),
                added = st.frontends_added,
                changed = st.frontends_changed,
                removed = st.frontends_removed,
                map_writes = st.map_writes,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "maps synced"
            );
        }
        Ok(())
    }

    fn write_state(&self, target: &maps::Target) -> Result<()> {
        let state = StateFile {
            frontends: target
                .frontends
                .iter()
                .map(|(k, v)| (k.to_string(), v.service.to_string()))
                .collect(),
        };
        fs::create_dir_all(&self.opts.state_dir)?;
        let path = self.opts.state_dir.join(STATE_FILE);
        let tmp = self.opts.state_dir.join(".services.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Attach to new matching interfaces; forget ones that disappeared.
    fn scan_interfaces(&mut self) {
        let present = interfaces();
        let gone: Vec<String> = self
            .attachments
            .interfaces()
            .filter(|i| !present.iter().any(|p| p == i))
            .map(str::to_owned)
            .collect();
        for i in gone {
            // The kernel dropped the link with the interface; detach only updates our books.
            let _ = self.attachments.detach(&mut self.ebpf, &i);
            tracing::info!(interface = %i, "interface gone");
        }
        for i in present {
            if self.attachments.is_attached(&i)
                || !self.opts.pod_interfaces.iter().any(|g| g.matches(&i))
            {
                continue;
            }
            match self.attachments.attach(&mut self.ebpf, &i) {
                Ok(()) => tracing::info!(interface = %i, "attached"),
                Err(e) => tracing::warn!(interface = %i, "attach failed: {e:#}"),
            }
        }
    }
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let mut ebpf = loader::load(&opts.pin_dir, opts.sizes)?;
    let writer = MapWriter::new(loader::service_maps(&mut ebpf)?)?;
    let attachments = Attachments::new(&mut ebpf)?;
    tracing::info!(
        pin_dir = %opts.pin_dir.display(),
        adopted_frontends = writer.programmed().frontends.len(),
        "eBPF loaded"
    );
    let manifests = opts.manifests.clone();
    let resync = opts.resync;
    let tracker = ChangeTracker::new(&opts.node_name);
    let mut c = Controller {
        opts,
        ebpf,
        writer,
        tracker,
        dir: DirCache::default(),
        attachments,
        full: true,
        last_problems: Vec::new(),
    };

    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok() {
            // A full channel already means "sync pending".
            let _ = tx.try_send(());
        }
    })?;
    watcher
        .watch(&manifests, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", manifests.display()))?;

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut resync_tick = tokio::time::interval(resync);
    let mut iface_tick = tokio::time::interval(Duration::from_millis(500));
    c.scan_interfaces();
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            if let Err(e) = c.sync() {
                // Maps stay consistent on a failed apply; retry on the next tick.
                tracing::error!("sync failed: {e:#}");
            }
        }
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            Some(()) = rx.recv() => {
                // Editors and `kubectl` write in bursts; let the burst finish.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
                dirty = true;
            }
            _ = resync_tick.tick() => {
                // Repairs anything that drifted (a map edited by hand, a failed write).
                c.full = true;
                dirty = true;
            }
            _ = iface_tick.tick() => c.scan_interfaces(),
        }
    }
    tracing::info!("stopping: detaching programs (maps stay pinned)");
    for e in c.attachments.detach_all(&mut c.ebpf) {
        tracing::warn!("{e:#}");
    }
    Ok(())
}
