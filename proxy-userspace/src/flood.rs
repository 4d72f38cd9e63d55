//! When the data path's flood guard is on. A per-source limit on new flows is what keeps one
//! client from pushing everyone else's entries out of a full conntrack table, but on a table
//! with room it would only throttle a busy client (an ingress proxy, a load generator) for
//! nothing. So the guard engages under pressure, as Katran's does under a flood: once the table
//! is estimated half full, and it is released below three eighths (hysteresis, so it does not
//! flap around one threshold). Engaged, it still lets a busy client through as long as it
//! closes what it opens: the programs give a source's TCP flow back to its count when the
//! client's first FIN or RST passes, so only flows that stay open (or are never answered) count.
//!
//! The occupancy is estimated ten times a second without walking the table: the count of the last
//! collection pass plus the entries the programs created since, minus those they removed.
//! Evictions go uncounted until the next pass, so a full table reads as fuller than it is and
//! keeps the guard on: the safe side.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData, PerCpuArray};
use proxy_common::{CONFIG_FLOOD_LIMIT, Stat};

use crate::conntrack::GcStats;

/// How often the occupancy is estimated.
pub const TICK: Duration = Duration::from_millis(100);

/// The engage/release decision, apart from the maps it reads and writes.
#[derive(Debug)]
pub struct Gate {
    max_entries: u64,
    engaged: bool,
    /// Collection passes seen, and the counters when the last one was first seen.
    pass: u64,
    created_at_pass: u64,
    removed_at_pass: u64,
}

/// What the gate reads at each tick.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reading {
    /// Collection passes so far, and the entries the last one counted.
    pub passes: u64,
    pub entries_at_pass: u64,
    /// The programs' cumulative counters.
    pub created: u64,
    pub removed: u64,
}

impl Gate {
    pub fn new(max_entries: u32) -> Self {
        Self {
            max_entries: u64::from(max_entries),
            engaged: false,
            pass: 0,
            created_at_pass: 0,
            removed_at_pass: 0,
        }
    }

    /// Entries the table holds now, estimated.
    pub fn occupancy(&mut self, r: Reading) -> u64 {
        if r.passes != self.pass {
            self.pass = r.passes;
            self.created_at_pass = r.created;
            self.removed_at_pass = r.removed;
        }
        let base = if r.passes == 0 { 0 } else { r.entries_at_pass };
        (base + r.created.saturating_sub(self.created_at_pass))
            .saturating_sub(r.removed.saturating_sub(self.removed_at_pass))
    }

    /// The guard's new state when it changes.
    pub fn step(&mut self, r: Reading) -> Option<bool> {
        let occupied = self.occupancy(r);
        let want = if self.engaged {
            occupied * 8 >= self.max_entries * 3
        } else {
            occupied * 2 >= self.max_entries
        };
        (want != self.engaged).then(|| {
            self.engaged = want;
            want
        })
    }
}

/// The gate's thread; dropping it stops the thread at its next tick.
pub struct FloodGuard {
    stop: Arc<AtomicBool>,
}

impl Drop for FloodGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs the gate in a thread of its own: writes `limit` into the programs' `CONFIG` while the
/// table is under pressure, 0 otherwise.
pub fn start(
    mut config: Array<MapData, u32>,
    stats: Arc<PerCpuArray<MapData, u64>>,
    gc: Arc<GcStats>,
    max_entries: u32,
    limit: u32,
) -> Result<FloodGuard> {
    let stop = Arc::new(AtomicBool::new(false));
    let guard = FloodGuard { stop: stop.clone() };
    config
        .set(CONFIG_FLOOD_LIMIT, 0, 0)
        .context("writing the flood guard's limit")?;
    let sum = move |s: Stat| -> Option<u64> { Some(stats.get(&(s as u32), 0).ok()?.iter().sum()) };
    thread::Builder::new()
        .name("vipx-flood".into())
        .spawn(move || {
            let mut gate = Gate::new(max_entries);
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(TICK);
                let (Some(created), Some(removed)) = (sum(Stat::CtCreated), sum(Stat::CtRemoved))
                else {
                    continue;
                };
                let r = Reading {
                    passes: gc.runs.load(Ordering::Relaxed),
                    entries_at_pass: gc.last_entries.load(Ordering::Relaxed),
                    created,
                    removed,
                };
                let Some(on) = gate.step(r) else { continue };
                let value = if on { limit } else { 0 };
                if let Err(e) = config.set(CONFIG_FLOOD_LIMIT, value, 0) {
                    tracing::error!("the flood guard could not be switched: {e}");
                    continue;
                }
                gc.flood_guard_engaged
                    .store(u64::from(on), Ordering::Relaxed);
                if on {
                    tracing::warn!(
                        max_new_flows_per_source = limit,
                        "conntrack is half full: the flood guard limits each source's new flows"
                    );
                } else {
                    tracing::info!("conntrack has room again: the flood guard is released");
                }
            }
        })
        .context("starting the flood guard thread")?;
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(passes: u64, entries_at_pass: u64, created: u64, removed: u64) -> Reading {
        Reading {
            passes,
            entries_at_pass,
            created,
            removed,
        }
    }

    #[test]
    fn engages_at_half_full_and_releases_below_three_eighths() {
        let mut g = Gate::new(1000);
        // Before any pass: what the programs created minus what they removed.
        assert_eq!(g.step(at(0, 0, 400, 0)), None);
        assert_eq!(g.step(at(0, 0, 600, 100)), Some(true), "500 of 1000");
        assert_eq!(
            g.step(at(0, 0, 600, 150)),
            None,
            "450: still on (hysteresis)"
        );
        assert_eq!(g.step(at(0, 0, 600, 226)), Some(false), "374: released");
        // A pass counts 700 (entries from before this process included): counters at that
        // moment become the base.
        assert_eq!(g.step(at(1, 700, 900, 300)), Some(true));
        assert_eq!(g.occupancy(at(1, 700, 950, 300)), 750);
        // The next pass found the table emptier (collected, evicted).
        assert_eq!(g.step(at(2, 300, 960, 300)), Some(false));
        assert_eq!(g.occupancy(at(2, 300, 1000, 320)), 320);
    }
}
