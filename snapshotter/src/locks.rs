//! Per-key locks for read-modify-write of snapshot records.
//!
//! RocksDB makes each batch atomic, but Prepare's "the key is free and the
//! parent is committed" and Remove's "no children" are checks before the write.
//! Mutations that touch the same keys are serialized by striped read-write
//! locks, taken in stripe order (no deadlock). A key that is only read for a
//! check (Prepare's parent) is locked shared, so Prepares on one parent — an
//! unpack of many images on one base layer — run in parallel, while Remove of
//! that parent (exclusive) waits. Different keys proceed in parallel, so
//! their synced writes still share fsyncs (RocksDB's group commit).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const STRIPES: usize = 1024;

/// A fixed set of read-write locks, chosen by the hash of a key.
pub struct KeyLocks {
    stripes: Vec<RwLock<()>>,
}

#[allow(dead_code)] // held only for their Drop
enum Held<'a> {
    Shared(RwLockReadGuard<'a, ()>),
    Exclusive(RwLockWriteGuard<'a, ()>),
}

/// Held locks; released on drop.
pub struct Guard<'a> {
    _held: Vec<Held<'a>>,
}

impl Default for KeyLocks {
    fn default() -> Self {
        KeyLocks {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }
}

fn stripe(key: &str) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % STRIPES
}

impl KeyLocks {
    /// Locks `exclusive` keys for writing and `shared` keys for reading
    /// (empty keys are skipped; a stripe wanted both ways is exclusive).
    pub fn lock(&self, exclusive: &[&str], shared: &[&str]) -> Guard<'_> {
        let mut want: Vec<(usize, bool)> = exclusive
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| (stripe(k), true))
            .chain(
                shared
                    .iter()
                    .filter(|k| !k.is_empty())
                    .map(|k| (stripe(k), false)),
            )
            .collect();
        // Stripe order; for a stripe wanted both ways, exclusive sorts last
        // and wins the dedup below.
        want.sort_unstable();
        let mut held = Vec::with_capacity(want.len());
        for (i, &(idx, excl)) in want.iter().enumerate() {
            if want.get(i + 1).is_some_and(|&(next, _)| next == idx) {
                continue;
            }
            // A poisoned stripe only means another request panicked while
            // holding it; the guarded data is `()`, so go on.
            let s = &self.stripes[idx];
            held.push(if excl {
                Held::Exclusive(s.write().unwrap_or_else(|p| p.into_inner()))
            } else {
                Held::Shared(s.read().unwrap_or_else(|p| p.into_inner()))
            });
        }
        Guard { _held: held }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_parents_do_not_block_each_other() {
        let l = KeyLocks::default();
        let a = l.lock(&["child-1"], &["parent"]);
        let b = l.lock(&["child-2"], &["parent"]);
        drop((a, b));
        // The same key both ways is one exclusive lock (no self-deadlock).
        let _c = l.lock(&["k"], &["k"]);
    }
}
