//! The snapshot store's keyspace in the shared RocksDB: its column families,
//! their options, and the encoding of every key and value. No other module
//! builds these keys.
//!
//! | CF | key | value |
//! |---|---|---|
//! | `snap_by_key` | `ns 0x00 key` | [`Record`]: version byte + protobuf |
//! | `snap_children` | `ns 0x00 parent_id(BE u64) child_id(BE u64)` | child key |
//! | `snap_meta` | `next_id/ns`, `schema` | BE u64 |
//!
//! `ns` is the configured snapshotter name, so that several snapshotters
//! (`strata`, `strata-lazy`) share the column families without colliding.
//!
//! Why these options:
//! - Prepare's existence check, Stat, Mounts and Commit are point lookups on
//!   `snap_by_key`: a whole-key bloom filter (10 bits/key, ~1% false positives),
//!   also in the memtable, and a hash index inside data blocks make a lookup
//!   one block read at most and usually none, the misses (Prepare of a new key)
//!   answered by the filter alone. Index and filter blocks live in the block
//!   cache, pinned at L0, so they cost no extra reads.
//! - A record carries its whole parent-id chain, so Mounts of a 128-deep chain
//!   is one lookup, not 128; values stay small (a varint per parent).
//! - Walk (List) is one ordered scan of `snap_by_key` under the `ns` prefix.
//! - `snap_children` answers "has children?" (Remove) with one seek.
//! - `next_id/ns` is a reservation, not a count: every id below it may have
//!   been handed out. Ids are reserved durably in blocks of [`ID_BLOCK`]
//!   (one synced write per block) *before* any of them names a directory, so
//!   an id taken by a Prepare that crashed before its record was written is
//!   never handed out again (its directory may still be there). It is kept
//!   with a `max` merge operator, so it never goes back.
//! - Small 16 KiB blocks with lz4: the records are small and lookups touch one
//!   block.

use std::collections::BTreeMap;
use std::time::SystemTime;

use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamilyDescriptor, DataBlockIndexType,
    Options,
};

use crate::error::{Error, Result};
use crate::types::{Info, Kind, Labels, Usage};

/// Snapshot records by key.
pub const CF_BY_KEY: &str = "snap_by_key";
/// Parent → child links.
pub const CF_CHILDREN: &str = "snap_children";
/// Counters and the schema version.
pub const CF_META: &str = "snap_meta";

/// The schema version kept under `schema` in `snap_meta`.
pub const SCHEMA_VERSION: u64 = 1;
/// The key of the schema version.
pub const SCHEMA_KEY: &[u8] = b"schema";
/// How many snapshot ids one synced write of `next_id` reserves.
pub const ID_BLOCK: u64 = 1024;

/// The column families this store owns, with their options; `block_cache` is
/// shared with the rest of the daemon.
pub fn column_families(block_cache: &Cache) -> Vec<ColumnFamilyDescriptor> {
    let mut by_key = Options::default();
    let mut t = BlockBasedOptions::default();
    t.set_block_cache(block_cache);
    t.set_block_size(16 * 1024);
    t.set_bloom_filter(10.0, false);
    t.set_whole_key_filtering(true);
    t.set_data_block_index_type(DataBlockIndexType::BinaryAndHash);
    t.set_data_block_hash_ratio(0.75);
    t.set_cache_index_and_filter_blocks(true);
    t.set_pin_l0_filter_and_index_blocks_in_cache(true);
    t.set_format_version(5);
    by_key.set_block_based_table_factory(&t);
    by_key.set_memtable_whole_key_filtering(true);
    by_key.set_memtable_prefix_bloom_ratio(0.1);
    by_key.set_compression_type(rocksdb::DBCompressionType::Lz4);
    by_key.optimize_level_style_compaction(64 * 1024 * 1024);

    let mut children = Options::default();
    let mut ct = BlockBasedOptions::default();
    ct.set_block_cache(block_cache);
    ct.set_block_size(16 * 1024);
    ct.set_index_type(BlockBasedIndexType::BinarySearch);
    ct.set_cache_index_and_filter_blocks(true);
    children.set_block_based_table_factory(&ct);
    children.set_compression_type(rocksdb::DBCompressionType::Lz4);

    let mut meta = Options::default();
    meta.set_merge_operator_associative(strata_kv::MAX_U64_MERGE, strata_kv::merge_max_u64);

    vec![
        ColumnFamilyDescriptor::new(CF_BY_KEY, by_key),
        ColumnFamilyDescriptor::new(CF_CHILDREN, children),
        ColumnFamilyDescriptor::new(CF_META, meta),
    ]
}

pub use strata_kv::decode_u64;

/// Key prefixes of one snapshotter's namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    ns: Vec<u8>,
}

impl Keys {
    /// The keyspace of the snapshotter called `name` (which holds no NUL).
    pub fn new(name: &str) -> Self {
        let mut ns = name.as_bytes().to_vec();
        ns.push(0);
        Keys { ns }
    }

    /// `snap_by_key` key of a snapshot.
    pub fn snapshot(&self, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.ns.len() + key.len());
        k.extend_from_slice(&self.ns);
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// The prefix of every `snap_by_key` and `snap_children` key here.
    pub fn prefix(&self) -> &[u8] {
        &self.ns
    }

    /// The first key past this namespace.
    pub fn upper_bound(&self) -> Vec<u8> {
        let mut k = self.ns.clone();
        if let Some(last) = k.last_mut() {
            *last = 1;
        }
        k
    }

    /// The snapshot key inside a `snap_by_key` key of this namespace.
    pub fn snapshot_key_of<'a>(&self, raw: &'a [u8]) -> Option<&'a [u8]> {
        raw.strip_prefix(self.ns.as_slice())
    }

    /// `snap_children` key of a link.
    pub fn child(&self, parent: u64, child: u64) -> Vec<u8> {
        let mut k = self.children_of(parent);
        k.extend_from_slice(&child.to_be_bytes());
        k
    }

    /// The prefix of `parent`'s links in `snap_children`.
    pub fn children_of(&self, parent: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.ns.len() + 16);
        k.extend_from_slice(&self.ns);
        k.extend_from_slice(&parent.to_be_bytes());
        k
    }

    /// `snap_meta` key of this namespace's id reservation.
    pub fn next_id(&self) -> Vec<u8> {
        let mut k = b"next_id/".to_vec();
        k.extend_from_slice(&self.ns[..self.ns.len() - 1]);
        k
    }
}

/// A stored snapshot: the value under `snap_by_key`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// The snapshot's id: names its directory.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// 1 view, 2 active, 3 committed (containerd's numbering).
    #[prost(int32, tag = "2")]
    pub kind: i32,
    /// The parent's key, or empty.
    #[prost(string, tag = "3")]
    pub parent: String,
    /// The ids of every ancestor, nearest first.
    #[prost(uint64, repeated, tag = "4")]
    pub parent_ids: Vec<u64>,
    /// Created, nanoseconds since the epoch.
    #[prost(int64, tag = "5")]
    pub created_ns: i64,
    /// Updated, nanoseconds since the epoch.
    #[prost(int64, tag = "6")]
    pub updated_ns: i64,
    /// Labels.
    #[prost(btree_map = "string, string", tag = "7")]
    pub labels: BTreeMap<String, String>,
    /// Usage of a committed snapshot: bytes.
    #[prost(int64, tag = "8")]
    pub size: i64,
    /// Usage of a committed snapshot: inodes.
    #[prost(int64, tag = "9")]
    pub inodes: i64,
}

impl Record {
    /// The record's kind.
    pub fn kind(&self) -> Kind {
        match self.kind {
            1 => Kind::View,
            3 => Kind::Committed,
            _ => Kind::Active,
        }
    }

    /// Sets the kind.
    pub fn set_kind(&mut self, kind: Kind) {
        self.kind = match kind {
            Kind::View => 1,
            Kind::Active => 2,
            Kind::Committed => 3,
        };
    }

    /// This snapshot's id followed by its ancestors', nearest first: the
    /// `parent_ids` of a child of it.
    pub fn lineage(&self) -> Vec<u64> {
        std::iter::once(self.id)
            .chain(self.parent_ids.iter().copied())
            .collect()
    }

    /// The stored usage.
    pub fn usage(&self) -> Usage {
        Usage {
            size: self.size,
            inodes: self.inodes,
        }
    }

    /// The snapshot's info, as containerd sees it.
    pub fn info(&self, name: String) -> Info {
        Info {
            name,
            parent: self.parent.clone(),
            kind: self.kind(),
            created: from_ns(self.created_ns),
            updated: from_ns(self.updated_ns),
            labels: self.labels.clone(),
        }
    }

    /// The value bytes.
    pub fn encode_value(&self) -> Vec<u8> {
        strata_kv::encode(self)
    }

    /// Decodes a value written by [`Record::encode_value`].
    pub fn decode_value(key: &[u8], v: &[u8]) -> Result<Record> {
        strata_kv::decode(v).map_err(|e| Error::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            msg: e.to_string(),
        })
    }
}

/// A new record.
/// As containerd, a label with an empty value is not stored.
pub fn new_record(
    id: u64,
    kind: Kind,
    parent: &str,
    parent_ids: Vec<u64>,
    mut labels: Labels,
) -> Record {
    labels.retain(|_, v| !v.is_empty());
    let now = now_ns();
    let mut r = Record {
        id,
        kind: 0,
        parent: parent.to_string(),
        parent_ids,
        created_ns: now,
        updated_ns: now,
        labels,
        size: 0,
        inodes: 0,
    };
    r.set_kind(kind);
    r
}

pub use strata_kv::now_ns;

fn from_ns(ns: i64) -> SystemTime {
    strata_kv::time_of(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_rejects_garbage() {
        let mut labels = Labels::new();
        labels.insert("a".into(), "b".into());
        let r = new_record(7, Kind::Committed, "p", vec![6, 5, 1], labels);
        let v = r.encode_value();
        assert_eq!(Record::decode_value(b"k", &v).expect("decodes"), r);
        assert!(Record::decode_value(b"k", &[]).is_err());
        assert!(Record::decode_value(b"k", &[9, 1, 2]).is_err());
        // A deep chain stays small: 128 parents in a few hundred bytes.
        let deep = new_record(1000, Kind::Active, "p", (1..=128).collect(), Labels::new());
        assert!(deep.encode_value().len() < 400);
    }

    #[test]
    fn namespaces_do_not_overlap() {
        let a = Keys::new("strata");
        let b = Keys::new("strata-lazy");
        assert!(!b.snapshot("x").starts_with(a.prefix()));
        assert!(a.snapshot("x") < a.upper_bound());
        assert!(a.snapshot("\u{10FFFF}") < a.upper_bound());
        assert_eq!(a.snapshot_key_of(&a.snapshot("k/1")), Some(&b"k/1"[..]));
        assert!(a.child(1, 2).starts_with(&a.children_of(1)));
        assert_eq!(a.next_id(), b"next_id/strata".to_vec());
    }
}
