//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4), computed here and read by the datapath.
//!
//! Each backend gets a preference list over the table entries, a permutation given by an
//! `offset` and a `skip` drawn from two independent hashes of the backend's identity (its
//! address and target port: the same on every node, unlike the node-local backend ids).
//! The backends then take turns, in a fixed order, each claiming its next preferred entry
//! that is still free, until the table is full. So:
//! - every backend gets `M / N` entries, give or take one;
//! - the table depends only on the set of backends, never on the order they were listed
//!   in or on anything local to a node: every node, and an agent after a restart, builds
//!   the same one, and a flow hashed to an entry finds the same backend everywhere;
//! - when a backend leaves, its entries go to the others, and only a few more entries
//!   change hands (each backend's list is fixed, so most of them claim what they had).
//!
//! The table size is [`lb_common::MAGLEV_TABLE_SIZE`], a prime (see there for why).
use crate::model::BackendAddr;

/// Entries of the tables the datapath reads.
pub const TABLE_SIZE: usize = lb_common::MAGLEV_TABLE_SIZE;

/// A Maglev table over a set of backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The backends, sorted and without duplicates.
    pub backends: Vec<BackendAddr>,
    /// For each entry, the index in [`Table::backends`] of its backend. Empty when there
    /// is no backend.
    pub entries: Vec<u32>,
}

impl Table {
    /// The backend of entry `i`.
    pub fn backend(&self, i: usize) -> Option<BackendAddr> {
        let b = *self.entries.get(i)?;
        self.backends.get(b as usize).copied()
    }
}

/// The table of [`TABLE_SIZE`] entries over `backends` (in any order, duplicates ignored).
pub fn table(backends: &[BackendAddr]) -> Table {
    table_of_size(backends, TABLE_SIZE)
}

/// The table of `size` entries over `backends`. `size` must be a prime (at least 2) for
/// every preference list to cover the whole table; with more backends than entries, some
/// backends get none.
pub fn table_of_size(backends: &[BackendAddr], size: usize) -> Table {
    assert!(size >= 2, "a Maglev table needs at least 2 entries");
    let mut backends = backends.to_vec();
    backends.sort_unstable();
    backends.dedup();
    if backends.is_empty() {
        return Table {
            backends,
            entries: Vec::new(),
        };
    }
    let m = size as u64;
    // Each backend's next preferred entry, and its step through the table.
    let mut cursors: Vec<(usize, usize)> = backends
        .iter()
        .map(|b| {
            let (h1, h2) = identity_hashes(b);
            ((h1 % m) as usize, (h2 % (m - 1) + 1) as usize)
        })
        .collect();
    const FREE: u32 = u32::MAX;
    let mut entries = vec![FREE; size];
    let mut filled = 0;
    'fill: loop {
        for (i, (next, skip)) in cursors.iter_mut().enumerate() {
            while entries[*next] != FREE {
                *next = (*next + *skip) % size;
            }
            entries[*next] = i as u32;
            *next = (*next + *skip) % size;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    Table { backends, entries }
}

/// Two independent 64-bit hashes of a backend's identity, for its offset and its skip.
/// Fixed functions (no per-process seed): every node must compute the same values.
fn identity_hashes(b: &BackendAddr) -> (u64, u64) {
    let id = (u64::from(u32::from(b.addr)) << 16) | u64::from(b.port);
    (fmix64(id ^ 0x5bd1_e995_9e37_79b9), splitmix64(id))
}

/// Murmur3's 64-bit finalizer.
fn fmix64(mut z: u64) -> u64 {
    z ^= z >> 33;
    z = z.wrapping_mul(0xff51_afd7_ed55_8ccd);
    z ^= z >> 33;
    z = z.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    z ^ (z >> 33)
}

/// SplitMix64's output function (other constants and shifts than [`fmix64`]).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn backends(n: usize) -> Vec<BackendAddr> {
        (0..n)
            .map(|i| BackendAddr {
                addr: Ipv4Addr::new(10, 244, (i / 200) as u8, (i % 200) as u8 + 1),
                port: 8080,
            })
            .collect()
    }

    fn counts(t: &Table) -> Vec<usize> {
        let mut c = vec![0; t.backends.len()];
        for e in &t.entries {
            c[*e as usize] += 1;
        }
        c
    }

    #[test]
    fn every_backend_gets_its_share_within_one_entry() {
        for n in [2, 3, 7, 10, 64, 160] {
            let t = table(&backends(n));
            assert_eq!(t.entries.len(), TABLE_SIZE);
            let (lo, hi) = (TABLE_SIZE / n, TABLE_SIZE.div_ceil(n));
            for (i, c) in counts(&t).into_iter().enumerate() {
                assert!((lo..=hi).contains(&c), "n={n}: backend {i} has {c} entries");
            }
        }
    }

    #[test]
    fn the_order_of_the_input_does_not_matter() {
        let mut input = backends(25);
        let reference = table(&input);
        input.reverse();
        assert_eq!(table(&input), reference);
        // A fixed shuffle, and duplicates.
        let mut shuffled: Vec<BackendAddr> = (0..25).map(|i| input[(i * 7) % 25]).collect();
        shuffled.extend_from_slice(&input[..5]);
        assert_eq!(table(&shuffled), reference);
    }

    #[test]
    fn the_table_is_a_fixed_function_of_the_backends() {
        // Nodes and agent versions must agree: these values may only change on purpose
        // (every flow would move).
        let t = table_of_size(&backends(3), 13);
        assert_eq!(t.entries, [2, 0, 0, 1, 1, 1, 2, 0, 0, 0, 2, 1, 2]);
        let t = table(&backends(3));
        let first: Vec<u32> = t.entries[..8].to_vec();
        assert_eq!(first, [1, 1, 2, 2, 1, 0, 1, 1]);
    }

    #[test]
    fn removing_one_backend_moves_little_more_than_its_entries() {
        for n in [5, 10, 40] {
            let all = backends(n);
            let before = table(&all);
            let gone = all[n / 2];
            let rest: Vec<BackendAddr> = all.iter().copied().filter(|b| *b != gone).collect();
            let after = table(&rest);
            let mut changed = 0;
            for i in 0..TABLE_SIZE {
                let (b, a) = (before.backend(i), after.backend(i));
                if b != a {
                    changed += 1;
                    assert_ne!(a, Some(gone));
                }
            }
            let share = TABLE_SIZE as f64 / n as f64;
            let extra = (changed as f64 - share) / TABLE_SIZE as f64;
            assert!(
                extra < 0.05,
                "n={n}: {changed} entries changed, {share:.0} expected (+{:.1}%)",
                extra * 100.0
            );
        }
    }

    #[test]
    fn adding_one_backend_moves_little_more_than_its_new_share() {
        let all = backends(11);
        let before = table(&all[..10]);
        let after = table(&all);
        let changed = (0..TABLE_SIZE)
            .filter(|i| before.backend(*i) != after.backend(*i))
            .count();
        assert!(
            changed < TABLE_SIZE / 11 + TABLE_SIZE / 20,
            "{changed} entries changed"
        );
    }

    #[test]
    fn one_backend_takes_every_entry_and_none_gives_an_empty_table() {
        let t = table(&backends(1));
        assert!(t.entries.iter().all(|e| *e == 0));
        assert_eq!(t.entries.len(), TABLE_SIZE);
        let t = table(&[]);
        assert!(t.entries.is_empty() && t.backends.is_empty());
        assert_eq!(t.backend(0), None);
    }

    #[test]
    fn the_same_address_on_another_port_is_another_backend() {
        let a = BackendAddr {
            addr: Ipv4Addr::new(10, 0, 0, 1),
            port: 80,
        };
        let b = BackendAddr { port: 81, ..a };
        let t = table(&[a, b]);
        assert_eq!(t.backends, [a, b]);
        let c = counts(&t);
        assert!(c[0].abs_diff(c[1]) <= 1, "{c:?}");
    }
}
