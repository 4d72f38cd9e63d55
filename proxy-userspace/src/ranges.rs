//! `loadBalancerSourceRanges` in the kernel: `VIPX_SRCRANGE4` (an LPM trie of {reverse-NAT id,
//! source prefix}) kept equal to the ranges of the programmed LoadBalancer frontends, which the
//! node program checks for frontends with `SVC_F_SOURCE_RANGES`.
//!
//! Written after each apply, once the frontends have their reverse-NAT ids: a frontend new with
//! ranges refuses everyone until then (closed, never open). Stale entries go before new ones
//! come: a removal only closes what should be closed, and a full map then still removes what
//! was revoked.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use aya::maps::{
    MapData,
    lpm_trie::{Key, LpmTrie},
};

use crate::maps::{Programmed, Target};

type Entry = (u32, [u8; 8]);

pub struct SourceRanges {
    map: LpmTrie<MapData, [u8; 8], u8>,
    written: BTreeSet<Entry>,
}

impl SourceRanges {
    /// Adopts what a previous vipx left in the pinned map.
    pub fn new(map: LpmTrie<MapData, [u8; 8], u8>) -> Self {
        let written = map
            .keys()
            .flatten()
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        Self { map, written }
    }

    /// Make the map hold exactly the ranges `target` gives the frontends `programmed` holds.
    pub fn sync(&mut self, target: &Target, programmed: &Programmed) -> Result<()> {
        let want = wanted(target, programmed);
        let stale: Vec<Entry> = self.written.difference(&want).copied().collect();
        for e in stale {
            // Gone already (a map recreated by hand) is fine.
            let _ = self.map.remove(&Key::new(e.0, e.1));
            self.written.remove(&e);
        }
        let new: Vec<Entry> = want.difference(&self.written).copied().collect();
        for e in new {
            self.map
                .insert(&Key::new(e.0, e.1), 1, 0)
                .with_context(|| format!("writing a loadBalancerSourceRanges entry {e:?}"))?;
            self.written.insert(e);
        }
        Ok(())
    }
}

impl SourceRanges {
    /// The reverse-NAT ids the map holds ranges for.
    pub fn ids(&self) -> BTreeSet<u32> {
        self.written.iter().map(id_of).collect()
    }

    /// The reverse-NAT ids whose ranges the next `sync` changes: their established flows must
    /// not be checked against them meanwhile (stale entries go before new ones come).
    pub fn changing(&self, target: &Target, programmed: &Programmed) -> BTreeSet<u32> {
        let want = wanted(target, programmed);
        self.written
            .symmetric_difference(&want)
            .map(id_of)
            .collect()
    }
}

fn id_of((_, data): &Entry) -> u32 {
    u32::from_be_bytes([data[0], data[1], data[2], data[3]])
}

/// The entries for the ranges of every programmed frontend that has some.
pub fn wanted(target: &Target, programmed: &Programmed) -> BTreeSet<Entry> {
    let mut out = BTreeSet::new();
    for (key, tf) in &target.frontends {
        let Some(fe) = programmed.frontends.get(key) else {
            continue;
        };
        let id = fe.rev_nat_id.to_be_bytes();
        for (addr, prefix) in &tf.source_ranges {
            let a = addr.octets();
            out.insert((
                32 + u32::from(*prefix),
                [id[0], id[1], id[2], id[3], a[0], a[1], a[2], a[3]],
            ));
        }
    }
    out
}
