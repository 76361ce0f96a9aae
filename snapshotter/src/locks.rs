//! Per-key locks for read-modify-write of snapshot records.
//!
//! RocksDB makes each batch atomic, but Prepare's "the key is free and the
//! parent is committed" and Remove's "no children" are checks before the write.
//! Mutations that touch the same keys are serialized by striped mutexes,
//! taken in stripe order (no deadlock); different keys proceed in parallel,
//! so their synced writes still share fsyncs (RocksDB's group commit).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

const STRIPES: usize = 1024;

/// A fixed set of mutexes, chosen by the hash of a key.
pub struct KeyLocks {
    stripes: Vec<Mutex<()>>,
}

/// Held locks; released on drop.
pub struct Guard<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
}

impl Default for KeyLocks {
    fn default() -> Self {
        KeyLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl KeyLocks {
    /// Locks every key given (empty keys are skipped).
    pub fn lock(&self, keys: &[&str]) -> Guard<'_> {
        let mut idx: Vec<usize> = keys
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| {
                let mut h = DefaultHasher::new();
                k.hash(&mut h);
                (h.finish() as usize) % STRIPES
            })
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let held = idx
            .into_iter()
            // A poisoned stripe only means another request panicked while
            // holding it; the guarded data is `()`, so go on.
            .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        Guard { _held: held }
    }
}
