//! When the data path's flood guard is on. A per-source limit on new flows is what keeps one
//! client from pushing everyone else's entries out of a full conntrack table, but on a table
//! with room it would only throttle a busy client (an ingress proxy, a load generator) for
//! nothing. So the guard engages under pressure, as Katran's does under a flood: once the table
//! is estimated half full, and it is released below three eighths (hysteresis, so it does not
//! flap around one threshold). Engaged, it still lets a busy client through as long as it
//! closes what it opens: the programs give a source's TCP flow back to its count when the
//! client's first FIN or RST passes, so only flows that stay open (or are never answered) count.
//! Closed flows still hold their entries until collected, though, so once the table is
//! estimated seven eighths full the guard turns strict (released below three quarters): closed
//! flows count too, and a source churning connections (or SYN and RST pairs) is held to the
//! limit before its closed entries could push out everyone else's.
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
use proxy_common::{CONFIG_FLOOD_LIMIT, FLOOD_STRICT, Stat};

use crate::conntrack::GcStats;

/// How often the occupancy is estimated.
pub const TICK: Duration = Duration::from_millis(100);

/// How the guard holds sources back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Not at all: the table has room.
    Off = 0,
    /// New flows beyond the limit are dropped; the flows a client closes do not count.
    Engaged = 1,
    /// Close to full: closed flows count too.
    Strict = 2,
}

impl Level {
    /// What the programs read in `CONFIG_FLOOD_LIMIT` at this level.
    pub fn config(self, limit: u32) -> u32 {
        // A limit as large as the strict bit is as good as none: the largest the bits hold.
        let limit = limit.min(!FLOOD_STRICT);
        match self {
            Level::Off => 0,
            Level::Engaged => limit,
            Level::Strict => limit | FLOOD_STRICT,
        }
    }
}

/// The engage/release decision, apart from the maps it reads and writes.
#[derive(Debug)]
pub struct Gate {
    max_entries: u64,
    level: Level,
    /// Collection passes seen, and the counters when the last one was first seen.
    pass: u64,
    created_at_pass: u64,
    removed_at_pass: u64,
}

/// What the gate reads at each tick.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reading {
    /// Collection passes so far, the entries the last one counted, and the programs' counters
    /// (created, removed) just before its walk, when known.
    pub passes: u64,
    pub entries_at_pass: u64,
    pub counters_at_pass: Option<(u64, u64)>,
    /// The programs' cumulative counters.
    pub created: u64,
    pub removed: u64,
}

impl Gate {
    pub fn new(max_entries: u32) -> Self {
        Self {
            max_entries: u64::from(max_entries),
            level: Level::Off,
            pass: 0,
            created_at_pass: 0,
            removed_at_pass: 0,
        }
    }

    /// Entries the table holds now, estimated.
    pub fn occupancy(&mut self, r: Reading) -> u64 {
        if r.passes != self.pass {
            self.pass = r.passes;
            // Without the counters from before the walk, those when the pass is first seen
            // (up to a tick after it ended): what was created during the walk is then missed.
            (self.created_at_pass, self.removed_at_pass) =
                r.counters_at_pass.unwrap_or((r.created, r.removed));
        }
        let base = if r.passes == 0 { 0 } else { r.entries_at_pass };
        (base + r.created.saturating_sub(self.created_at_pass))
            .saturating_sub(r.removed.saturating_sub(self.removed_at_pass))
    }

    /// The guard's new level when it changes. Each level is entered at one fill and left below
    /// a lower one (hysteresis): engaged at 1/2, released below 3/8; strict at 7/8, back to
    /// engaged below 3/4.
    pub fn step(&mut self, r: Reading) -> Option<Level> {
        let level = self.wants(r)?;
        self.level = level;
        Some(level)
    }

    /// The level the gate would move to, without moving: the caller records it (`set`) only once
    /// the programs read it, so a failed write is tried again at the next tick.
    pub fn wants(&mut self, r: Reading) -> Option<Level> {
        let eighths = self.occupancy(r) * 8;
        let max = self.max_entries;
        let strict = eighths >= 7 * max || (self.level == Level::Strict && eighths >= 6 * max);
        let engaged = eighths >= 4 * max || (self.level != Level::Off && eighths >= 3 * max);
        let want = match (strict, engaged) {
            (true, _) => Level::Strict,
            (false, true) => Level::Engaged,
            (false, false) => Level::Off,
        };
        (want != self.level).then_some(want)
    }

    pub fn set(&mut self, level: Level) {
        self.level = level;
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
                let base = gc.pass_base();
                let r = Reading {
                    passes: base.runs,
                    entries_at_pass: base.entries,
                    counters_at_pass: base.counters,
                    created,
                    removed,
                };
                let Some(level) = gate.wants(r) else { continue };
                if let Err(e) = config.set(CONFIG_FLOOD_LIMIT, level.config(limit), 0) {
                    tracing::error!("the flood guard could not be switched: {e}");
                    continue;
                }
                gate.set(level);
                gc.flood_guard_engaged
                    .store(level as u64, Ordering::Relaxed);
                match level {
                    Level::Strict => tracing::warn!(
                        max_new_flows_per_source = limit,
                        "conntrack is seven eighths full: the flood guard counts closed flows too"
                    ),
                    Level::Engaged => tracing::warn!(
                        max_new_flows_per_source = limit,
                        "conntrack is half full: the flood guard limits each source's new flows \
                         (not counting those it closes)"
                    ),
                    Level::Off => {
                        tracing::info!("conntrack has room again: the flood guard is released");
                    }
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
            counters_at_pass: None,
            created,
            removed,
        }
    }

    #[test]
    fn engages_at_half_full_and_releases_below_three_eighths() {
        let mut g = Gate::new(1000);
        // Before any pass: what the programs created minus what they removed.
        assert_eq!(g.step(at(0, 0, 400, 0)), None);
        assert_eq!(
            g.step(at(0, 0, 600, 100)),
            Some(Level::Engaged),
            "500 of 1000"
        );
        assert_eq!(
            g.step(at(0, 0, 600, 150)),
            None,
            "450: still on (hysteresis)"
        );
        assert_eq!(
            g.step(at(0, 0, 600, 226)),
            Some(Level::Off),
            "374: released"
        );
        // A pass counts 700 (entries from before this process included): counters at that
        // moment become the base.
        assert_eq!(g.step(at(1, 700, 900, 300)), Some(Level::Engaged));
        assert_eq!(g.occupancy(at(1, 700, 950, 300)), 750);
        // The next pass found the table emptier (collected, evicted).
        assert_eq!(g.step(at(2, 300, 960, 300)), Some(Level::Off));
        assert_eq!(g.occupancy(at(2, 300, 1000, 320)), 320);
    }

    /// Review finding: the base was the counters when the gate first saw a pass, up to a tick
    /// after its walk ended, so the entries created while the walk ran (half a second a million
    /// entries) were in neither the walk's count nor the growth since: at 100,000 new flows a
    /// second the estimate fell ~50,000 short, and strict came once the LRU was evicting.
    #[test]
    fn entries_created_while_a_pass_walked_are_counted() {
        let mut g = Gate::new(1000);
        // The walk counted 300; 200 were created while it ran (counters 100 before, 300 after).
        let pass = Reading {
            counters_at_pass: Some((100, 0)),
            ..at(1, 300, 300, 0)
        };
        assert_eq!(g.occupancy(pass), 500);
        assert_eq!(g.step(pass), Some(Level::Engaged), "500 of 1000");
    }

    #[test]
    fn turns_strict_at_seven_eighths_and_back_below_three_quarters() {
        let mut g = Gate::new(1000);
        assert_eq!(
            g.step(at(0, 0, 875, 0)),
            Some(Level::Strict),
            "straight from off"
        );
        assert_eq!(g.step(at(0, 0, 875, 125)), None, "750: still strict");
        assert_eq!(g.step(at(0, 0, 875, 126)), Some(Level::Engaged), "749");
        assert_eq!(g.step(at(0, 0, 1000, 126)), None, "874: not yet strict");
        assert_eq!(g.step(at(0, 0, 1001, 126)), Some(Level::Strict), "875");
        assert_eq!(
            g.step(at(0, 0, 1000, 700)),
            Some(Level::Off),
            "300: off at once"
        );
    }

    #[test]
    fn the_programs_read_the_level_in_the_limit() {
        assert_eq!(Level::Off.config(728), 0);
        assert_eq!(Level::Engaged.config(728), 728);
        assert_eq!(Level::Strict.config(728), 728 | FLOOD_STRICT);
        // A limit that would set the strict bit itself is cut to the 31 bits the programs read.
        assert_eq!(Level::Engaged.config(u32::MAX), !FLOOD_STRICT);
        assert_eq!(
            Level::Engaged.config(FLOOD_STRICT),
            !FLOOD_STRICT,
            "not 0: not off"
        );
        assert_eq!(Level::Strict.config(FLOOD_STRICT + 50), u32::MAX);
    }
}
