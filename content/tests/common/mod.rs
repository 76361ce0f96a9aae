//! Helpers shared by the content store's tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rocksdb::DB;
use sha2::{Digest, Sha256};
use strata_content::{ContentConfig, ContentStore, Error};

pub type R = Result<(), Box<dyn std::error::Error>>;

/// Opens the test database under `dir/db` with the content store's column
/// families.
pub fn open_db(dir: &Path) -> Arc<DB> {
    let mut o = rocksdb::Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    let cache = rocksdb::Cache::new_lru_cache(8 << 20);
    Arc::new(
        DB::open_cf_descriptors(
            &o,
            dir.join("db"),
            strata_content::schema::column_families(&cache),
        )
        .expect("open db"),
    )
}

/// The store's settings under `dir`, with 4 MiB packs.
pub fn config(dir: &Path) -> ContentConfig {
    let mut cfg = ContentConfig::new(dir.join("content"));
    cfg.pack_max_bytes = 4 << 20;
    cfg
}

/// A writable store under `dir`.
pub fn open(dir: &Path) -> ContentStore {
    ContentStore::open(open_db(dir), config(dir), true).expect("open store")
}

/// Incompressible bytes from a seed (xorshift).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `sha256:…` of `b`.
pub fn digest(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// Writes and commits `data` under `reference`.
pub fn put(s: &ContentStore, reference: &str, data: &[u8]) -> Result<String, Error> {
    let mut w = s.writer(reference, data.len() as i64, "")?;
    for piece in data.chunks(100_000) {
        w.write(piece)?;
    }
    w.commit(data.len() as i64, &digest(data), BTreeMap::new())
}
