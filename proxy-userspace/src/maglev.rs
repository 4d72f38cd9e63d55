//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4): each backend gets a
//! permutation of the table positions from its own address, and the backends take turns claiming
//! their next free preferred position until the table is full. Every backend ends up with M/N
//! positions (give or take one), and when a backend leaves, the others keep every position they
//! had: only the leaver's flows move. When one joins, it takes about 1/(N+1) of the positions.
//!
//! The paper's fill is only nearly minimal: rebuilt from scratch for the new backend set, a
//! table also moves some positions between backends that stay (measured here: 0.8% of the
//! table for 1 of 4 removed, 2.9% for 1 of 10, at M = 1021), so some connections to a backend
//! that stays would land elsewhere when retried. [`repopulate`] therefore derives a changed
//! table from the one in use: positions whose backend stays keep it, a removed backend's
//! positions go to the others by their own permutations, and a new backend takes its share from
//! the backends above theirs, again by its permutation. Removal then moves exactly the removed
//! backend's positions, addition exactly the new one's share, and balance stays within one
//! position. The price: the table depends on the history of the backend set, not only on the
//! set, so two nodes that saw different histories may map a tuple differently (no flow crosses
//! nodes through vipx today; a restarted vipx continues from the pinned table). A table with no
//! history (a new frontend) is the paper's.
//!
//! Pure functions over plain data, so the balance and the reshuffle fractions are unit-tested
//! and measured (`vipx-bench maglev`) without a kernel. The permutation depends only on the
//! backend's address, port and protocol, never on slot order or on which node computes it, so
//! every node builds the same table for the same backend set.

use crate::maps::L4Addr;

/// True when `n` is prime (trial division: table sizes are at most 65521).
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Why a table size is unusable, or `Ok`.
pub fn check_table_size(m: u32) -> Result<(), String> {
    let max = proxy_common::defaults::MAGLEV_TABLE_SIZE_MAX;
    if m < 3 || m > max {
        return Err(format!(
            "Maglev table size {m} out of range: it must be a prime between 3 and {max}"
        ));
    }
    if !is_prime(m) {
        return Err(format!(
            "Maglev table size {m} is not prime (the permutations need a prime size; \
             primes near it: {}, {})",
            prev_prime(m),
            next_prime(m)
        ));
    }
    Ok(())
}

const fn prev_prime(mut n: u32) -> u32 {
    while n > 2 && !is_prime(n) {
        n -= 1;
    }
    n
}

const fn next_prime(mut n: u32) -> u32 {
    while !is_prime(n) {
        n += 1;
    }
    n
}

/// SplitMix64's finaliser: a fixed, well-mixing 64-bit hash (the same on every node and every
/// run, unlike std's randomly keyed hasher).
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A backend's permutation of `0..m`: `(offset, skip)`, position j = (offset + j * skip) % m.
/// `m` must be prime so every skip in 1..m visits every position.
pub fn permutation(backend: &L4Addr, m: u32) -> (u32, u32) {
    let key = u64::from(backend.addr.to_bits()) << 24
        | u64::from(backend.port) << 8
        | u64::from(backend.proto);
    let h1 = mix64(key ^ 0x6d61_676c_6576_3031);
    let h2 = mix64(key ^ 0x6d61_676c_6576_3032);
    let m64 = u64::from(m);
    let offset = (h1 % m64) as u32;
    let skip = (h2 % (m64 - 1) + 1) as u32;
    (offset, skip)
}

/// The Maglev table of size `m` for `backends` (address, id): the id at each position. The
/// backends are taken in address order, so the table does not depend on the order they are
/// given in; a duplicate address counts once. Empty when there are no backends (or `m` < 2).
pub fn populate(backends: &[(L4Addr, u32)], m: u32) -> Vec<u32> {
    let mut sorted: Vec<(L4Addr, u32)> = backends.to_vec();
    sorted.sort_unstable_by_key(|(a, _)| *a);
    sorted.dedup_by_key(|(a, _)| *a);
    if sorted.is_empty() || m < 2 {
        return Vec::new();
    }
    let size = m as usize;
    // Each backend's next position in its permutation, (offset + j * skip) mod m, kept as a
    // running sum: a compare and subtract per step instead of a 64-bit division (the fill
    // takes about M ln M steps per table, tens of millions for 10,000 frontends).
    let perms = permutations(&sorted, m);
    let mut pos: Vec<usize> = perms.iter().map(|(o, _)| *o as usize).collect();
    let skips: Vec<usize> = perms.iter().map(|(_, s)| *s as usize).collect();
    let mut entry: Vec<Option<u32>> = vec![None; size];
    let mut filled = 0usize;
    loop {
        for (i, (_, id)) in sorted.iter().enumerate() {
            let skip = skips[i];
            // Each backend's permutation visits every position within m steps, and a free one
            // exists while the table is not full: the inner loop ends.
            let mut c = pos[i];
            while entry[c].is_some() {
                c += skip;
                if c >= size {
                    c -= size;
                }
            }
            entry[c] = Some(*id);
            c += skip;
            if c >= size {
                c -= size;
            }
            pos[i] = c;
            filled += 1;
            if filled == size {
                return entry.into_iter().map(|e| e.unwrap_or(0)).collect();
            }
        }
    }
}

/// The table for `backends` derived from `prev` (the table in use, ids) with as few positions
/// changing hands as balance allows: see the module notes. Without a usable `prev` (wrong size,
/// no backend in common) it is [`populate`].
pub fn repopulate(prev: &[u32], backends: &[(L4Addr, u32)], m: u32) -> Vec<u32> {
    let mut sorted: Vec<(L4Addr, u32)> = backends.to_vec();
    sorted.sort_unstable_by_key(|(a, _)| *a);
    sorted.dedup_by_key(|(a, _)| *a);
    let n = sorted.len();
    let size = m as usize;
    if prev.len() != size || n == 0 || m < 2 {
        return populate(backends, m);
    }
    let index: std::collections::HashMap<u32, usize> = sorted
        .iter()
        .enumerate()
        .map(|(i, (_, id))| (*id, i))
        .collect();
    // Positions whose backend stays keep it; the rest are free.
    let mut owner: Vec<Option<usize>> = prev.iter().map(|id| index.get(id).copied()).collect();
    let mut count = vec![0usize; n];
    for i in owner.iter().flatten() {
        count[*i] += 1;
    }
    if count.iter().all(|c| *c == 0) {
        return populate(backends, m);
    }
    // Shares: M / n each, one more for the M % n backends holding the most (fewest moves).
    let (base, extra) = (size / n, size % n);
    let mut by_holding: Vec<usize> = (0..n).collect();
    by_holding.sort_by_key(|&i| (std::cmp::Reverse(count[i]), i));
    let mut quota = vec![base; n];
    for &i in by_holding.iter().take(extra) {
        quota[i] += 1;
    }
    let m64 = u64::from(m);
    let perms = permutations(&sorted, m);
    let at = |i: usize, j: u64| ((perms[i].0 + j * perms[i].1) % m64) as usize;
    // Backends above their share give up the positions they prefer least.
    for i in 0..n {
        let mut j = m64;
        while count[i] > quota[i] && j > 0 {
            j -= 1;
            let c = at(i, j);
            if owner[c] == Some(i) {
                owner[c] = None;
                count[i] -= 1;
            }
        }
    }
    // Free positions go round-robin to the backends below their share, each taking its next
    // preferred free position (the paper's fill, restricted to what is free).
    let mut next = vec![0u64; n];
    let mut free = owner.iter().filter(|o| o.is_none()).count();
    while free > 0 {
        let mut progressed = false;
        for i in 0..n {
            if count[i] >= quota[i] {
                continue;
            }
            while next[i] < m64 {
                let c = at(i, next[i]);
                next[i] += 1;
                if owner[c].is_none() {
                    owner[c] = Some(i);
                    count[i] += 1;
                    free -= 1;
                    progressed = true;
                    break;
                }
            }
        }
        if !progressed {
            // Unreachable (shares add up to M and each permutation visits every position);
            // a table from scratch is still correct.
            return populate(backends, m);
        }
    }
    owner
        .into_iter()
        .map(|o| o.map_or(0, |i| sorted[i].1))
        .collect()
}

/// The fraction of positions whose backend differs between two tables of the same size.
pub fn changed_fraction(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 1.0;
    }
    let changed = a.iter().zip(b).filter(|(x, y)| x != y).count();
    changed as f64 / a.len() as f64
}

/// What removing one backend and adding one does to a table of `n` backends, averaged over
/// which backend is removed: with `incremental`, tables derived by [`repopulate`] (what vipx
/// does), else rebuilt by [`populate`] (the paper). For the bench and the tests.
pub fn reshuffle(n: u32, m: u32, incremental: bool) -> Reshuffle {
    let backends: Vec<(L4Addr, u32)> = (1..=n).map(|i| (sample_backend(i), i)).collect();
    let full = populate(&backends, m);
    let derive = |set: &[(L4Addr, u32)]| {
        if incremental {
            repopulate(&full, set, m)
        } else {
            populate(set, m)
        }
    };
    let mut removal = 0.0;
    let mut removal_extra = 0.0;
    for gone in 1..=n {
        let rest: Vec<(L4Addr, u32)> = backends
            .iter()
            .filter(|(_, id)| *id != gone)
            .copied()
            .collect();
        let t = derive(&rest);
        removal += changed_fraction(&full, &t);
        // Positions that moved although their backend stayed.
        let extra = full
            .iter()
            .zip(&t)
            .filter(|(a, b)| a != b && **a != gone)
            .count();
        removal_extra += extra as f64 / f64::from(m);
    }
    let mut more = backends.clone();
    more.push((sample_backend(n + 1), n + 1));
    let added = derive(&more);
    Reshuffle {
        removal: removal / f64::from(n),
        removal_of_survivors: removal_extra / f64::from(n),
        addition: changed_fraction(&full, &added),
        ideal_removal: 1.0 / f64::from(n),
        ideal_addition: 1.0 / f64::from(n + 1),
    }
}

/// Fractions of table positions that changed backend (see [`reshuffle`]).
#[derive(Clone, Copy, Debug)]
pub struct Reshuffle {
    pub removal: f64,
    pub removal_of_survivors: f64,
    pub addition: f64,
    pub ideal_removal: f64,
    pub ideal_addition: f64,
}

/// A pod-like backend address in the lab range (198.18.64.0/18), port 8080.
pub fn sample_backend(i: u32) -> L4Addr {
    L4Addr {
        addr: std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 64, 0)) + i),
        port: 8080,
        proto: proxy_common::IPPROTO_TCP,
    }
}

/// Each backend's (offset, skip) of its preference list, in `sorted`'s order.
fn permutations<T>(sorted: &[(L4Addr, T)], m: u32) -> Vec<(u64, u64)> {
    sorted
        .iter()
        .map(|(a, _)| {
            let (o, s) = permutation(a, m);
            (u64::from(o), u64::from(s))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<(L4Addr, u32)> {
        (1..=n).map(|i| (sample_backend(i), i)).collect()
    }

    #[test]
    fn table_sizes_must_be_prime_and_in_range() {
        assert!(check_table_size(1021).is_ok());
        assert!(check_table_size(65_521).is_ok());
        assert!(check_table_size(16_381).is_ok());
        let e = check_table_size(1024).unwrap_err();
        assert!(
            e.contains("not prime") && e.contains("1021") && e.contains("1031"),
            "{e}"
        );
        assert!(check_table_size(65_537).is_err());
        assert!(check_table_size(2).is_err());
        assert!(check_table_size(0).is_err());
        assert!([2, 3, 5, 7, 11, 13].iter().all(|&p| is_prime(p)));
        assert!([0, 1, 4, 9, 15, 21, 25].iter().all(|&p| !is_prime(p)));
    }

    #[test]
    fn every_position_is_filled_with_a_given_backend() {
        for n in [1, 2, 3, 7, 50] {
            let t = populate(&backends(n), 1021);
            assert_eq!(t.len(), 1021);
            assert!(t.iter().all(|id| (1..=n).contains(id)), "n={n}");
        }
        assert!(populate(&[], 1021).is_empty());
    }

    #[test]
    fn permutations_cover_the_table() {
        let m = 251;
        for i in 1..20 {
            let (o, s) = permutation(&sample_backend(i), m);
            assert!(o < m && (1..m).contains(&s));
            let mut seen = vec![false; m as usize];
            for j in 0..m {
                seen[((o + j * s) % m) as usize] = true;
            }
            assert!(seen.iter().all(|x| *x));
        }
    }

    /// The fill as the paper writes it (a division per step): the running-sum one must give
    /// the same table.
    fn populate_by_division(backends: &[(L4Addr, u32)], m: u32) -> Vec<u32> {
        let mut sorted: Vec<(L4Addr, u32)> = backends.to_vec();
        sorted.sort_unstable_by_key(|(a, _)| *a);
        sorted.dedup_by_key(|(a, _)| *a);
        let m64 = u64::from(m);
        let perms = permutations(&sorted, m);
        let mut next = vec![0u64; sorted.len()];
        let mut entry: Vec<Option<u32>> = vec![None; m as usize];
        let mut filled = 0usize;
        loop {
            for (i, (_, id)) in sorted.iter().enumerate() {
                let (offset, skip) = perms[i];
                let mut c = ((offset + next[i] * skip) % m64) as usize;
                while entry[c].is_some() {
                    next[i] += 1;
                    c = ((offset + next[i] * skip) % m64) as usize;
                }
                entry[c] = Some(*id);
                next[i] += 1;
                filled += 1;
                if filled == m as usize {
                    return entry.into_iter().map(|e| e.unwrap_or(0)).collect();
                }
            }
        }
    }

    #[test]
    fn the_fill_matches_the_papers_division_form() {
        for (n, m) in [
            (1u32, 251u32),
            (2, 1021),
            (3, 1021),
            (10, 1021),
            (37, 16_381),
            (100, 65_521),
        ] {
            assert_eq!(
                populate(&backends(n), m),
                populate_by_division(&backends(n), m),
                "{n} backends, M = {m}"
            );
        }
    }

    #[test]
    fn order_of_backends_does_not_matter() {
        let mut b = backends(10);
        let t = populate(&b, 1021);
        b.reverse();
        assert_eq!(populate(&b, 1021), t);
    }

    /// Each backend owns M/N positions give or take one: the round-robin fill guarantees it.
    #[test]
    fn balance() {
        for (n, m) in [(2u32, 1021u32), (4, 1021), (10, 1021), (100, 16_381)] {
            let t = populate(&backends(n), m);
            let mut counts = vec![0u32; n as usize + 1];
            for id in &t {
                counts[*id as usize] += 1;
            }
            let ideal = f64::from(m) / f64::from(n);
            for (id, &c) in counts.iter().enumerate().skip(1) {
                let dev = (f64::from(c) - ideal).abs() / ideal;
                assert!(dev < 0.02, "n={n} m={m} backend {id}: {c} vs {ideal:.1}");
            }
        }
    }

    /// vipx's derived tables: removing one of N moves exactly the removed backend's positions
    /// (none of a backend that stays); adding one moves its share, 1/(N+1) within a position.
    #[test]
    fn reshuffle_on_removal_and_addition_is_minimal() {
        for n in [2u32, 4, 10, 30] {
            let r = reshuffle(n, 1021, true);
            println!(
                "maglev (derived) n={n} m=1021: removal moved {:.4} (ideal {:.4}, of survivors \
                 {:.4}); addition moved {:.4} (ideal {:.4})",
                r.removal, r.ideal_removal, r.removal_of_survivors, r.addition, r.ideal_addition
            );
            assert_eq!(
                r.removal_of_survivors, 0.0,
                "survivors moved on removal: {r:?}"
            );
            let one = 1.0 / 1021.0;
            assert!((r.removal - r.ideal_removal).abs() <= one + 1e-9, "{r:?}");
            assert!((r.addition - r.ideal_addition).abs() <= one + 1e-9, "{r:?}");
        }
    }

    /// The paper's tables rebuilt from scratch move a little more: measured, not hidden.
    #[test]
    fn rebuilt_tables_are_nearly_minimal() {
        for n in [4u32, 10] {
            let r = reshuffle(n, 1021, false);
            println!(
                "maglev (rebuilt) n={n} m=1021: removal moved {:.4} (ideal {:.4}, of survivors \
                 {:.4}); addition moved {:.4} (ideal {:.4})",
                r.removal, r.ideal_removal, r.removal_of_survivors, r.addition, r.ideal_addition
            );
            assert!(r.removal_of_survivors < 0.05, "{r:?}");
            assert!(r.addition < r.ideal_addition + 0.05, "{r:?}");
        }
    }

    /// Derived tables stay balanced through a history of changes, and a derived table never
    /// names a backend outside the set.
    #[test]
    fn derived_tables_stay_balanced() {
        let m = 1021;
        let mut set = backends(5);
        let mut t = populate(&set, m);
        for step in 0..40u32 {
            if step % 3 == 0 && set.len() > 1 {
                set.remove((step as usize * 7) % set.len());
            } else {
                let i = 100 + step;
                set.push((sample_backend(i), i));
            }
            t = repopulate(&t, &set, m);
            let n = set.len();
            let mut counts = std::collections::HashMap::new();
            for id in &t {
                *counts.entry(*id).or_insert(0usize) += 1;
            }
            assert_eq!(counts.len(), n, "step {step}");
            for (_, id) in &set {
                let c = counts[id];
                assert!(
                    c == m as usize / n || c == m as usize / n + 1,
                    "step {step}: {c}"
                );
            }
        }
    }
}
