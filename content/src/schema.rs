//! The content store's keyspace in the shared RocksDB. No other module
//! builds these keys.
//!
//! | CF | key | value |
//! |---|---|---|
//! | `blob` | digest (`sha256:hex`) | [`BlobRecord`] |
//! | `blob_chunks` | digest ‖ 0x00 ‖ offset (BE u64) | [`ChunkRef`]: chunk id, length |
//! | `chunk` | chunk id (32-byte SHA-256) | [`ChunkLoc`]: pack, offset, stored and raw length, compression, CRC32C |
//! | `chunk_ref` | chunk id | reference count, i64 LE, kept by an `add` merge operator |
//! | `ingest` | ref | [`IngestRecord`] |
//! | `content_meta` | `schema`, `next_pack` | BE u64 (`next_pack` by a `max` merge) |
//!
//! Schema versions: 1 had no CRC32C in [`ChunkLoc`] and did not record
//! itself; 2 adds the CRC (chunks of schema 1 stay readable: they are
//! checked against their SHA-256 id instead) and the `next_pack` counter.
//!
//! Why these choices:
//! - Info, Commit's existence check and a chunk's location are point lookups:
//!   whole-key bloom filters and a hash index in data blocks.
//! - A blob's chunk list is ordered by offset, so a read at any offset is one
//!   `seek_for_prev` (O(log n)) and then a forward scan: ReaderAt never
//!   replays a blob from its start.
//! - Reference counts live apart from locations and change by merge operands:
//!   two commits that store the same new chunk at once both add 1 and both
//!   write a valid location, with no read-modify-write race; the copy whose
//!   location lost is unreferenced pack space that compaction reclaims.
//! - `next_pack` is a reservation: every pack id below it may exist. A new
//!   pack's id is written (synced) before its file is created, so an id is
//!   never used twice, even when a power cut loses a pack's directory entry.

use std::collections::BTreeMap;

use prost::Message;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DataBlockIndexType, MergeOperands, Options,
};

use crate::error::{Error, Result};

/// Blob records by digest.
pub const CF_BLOB: &str = "blob";
/// Each blob's chunk list by offset.
pub const CF_BLOB_CHUNKS: &str = "blob_chunks";
/// Chunk locations.
pub const CF_CHUNK: &str = "chunk";
/// Chunk reference counts.
pub const CF_CHUNK_REF: &str = "chunk_ref";
/// Ingests by ref.
pub const CF_INGEST: &str = "ingest";
/// Counters and the schema version.
pub const CF_META: &str = "content_meta";

/// The schema version under `schema` in `content_meta`.
pub const SCHEMA_VERSION: u64 = 2;
/// The schema key.
pub const SCHEMA_KEY: &[u8] = b"schema";
/// Every pack number below this one may have been used (max merge).
pub const NEXT_PACK_KEY: &[u8] = b"next_pack";

fn point_lookup_options(cache: &Cache) -> Options {
    let mut o = Options::default();
    let mut t = BlockBasedOptions::default();
    t.set_block_cache(cache);
    t.set_block_size(16 * 1024);
    t.set_bloom_filter(10.0, false);
    t.set_whole_key_filtering(true);
    t.set_data_block_index_type(DataBlockIndexType::BinaryAndHash);
    t.set_cache_index_and_filter_blocks(true);
    t.set_pin_l0_filter_and_index_blocks_in_cache(true);
    t.set_format_version(5);
    o.set_block_based_table_factory(&t);
    o.set_memtable_whole_key_filtering(true);
    o.set_memtable_prefix_bloom_ratio(0.1);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o
}

/// The column families this store owns, with their options.
pub fn column_families(cache: &Cache) -> Vec<ColumnFamilyDescriptor> {
    let mut chunk_list = Options::default();
    let mut t = BlockBasedOptions::default();
    t.set_block_cache(cache);
    t.set_block_size(16 * 1024);
    t.set_cache_index_and_filter_blocks(true);
    chunk_list.set_block_based_table_factory(&t);
    chunk_list.set_compression_type(rocksdb::DBCompressionType::Lz4);

    let mut refs = point_lookup_options(cache);
    refs.set_merge_operator_associative("strata_add_i64", merge_add_i64);
    let mut meta = Options::default();
    meta.set_merge_operator_associative(strata_kv::MAX_U64_MERGE, strata_kv::merge_max_u64);
    vec![
        ColumnFamilyDescriptor::new(CF_BLOB, point_lookup_options(cache)),
        ColumnFamilyDescriptor::new(CF_BLOB_CHUNKS, chunk_list),
        ColumnFamilyDescriptor::new(CF_CHUNK, point_lookup_options(cache)),
        ColumnFamilyDescriptor::new(CF_CHUNK_REF, refs),
        ColumnFamilyDescriptor::new(CF_INGEST, Options::default()),
        ColumnFamilyDescriptor::new(CF_META, meta),
    ]
}

fn merge_add_i64(_k: &[u8], existing: Option<&[u8]>, ops: &MergeOperands) -> Option<Vec<u8>> {
    let sum: i64 = existing
        .into_iter()
        .chain(ops.iter())
        .map(decode_i64)
        .fold(0i64, i64::saturating_add);
    Some(sum.to_le_bytes().to_vec())
}

/// A reference count value; malformed counts as 0.
pub fn decode_i64(v: &[u8]) -> i64 {
    v.try_into().map(i64::from_le_bytes).unwrap_or(0)
}

/// A merge operand adding `n` to a reference count.
pub fn refcount_delta(n: i64) -> [u8; 8] {
    n.to_le_bytes()
}

/// `blob_chunks` key of a blob's chunk at `offset`.
pub fn blob_chunk_key(digest: &str, offset: u64) -> Vec<u8> {
    let mut k = blob_chunks_prefix(digest);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// The prefix of a blob's chunk list.
pub fn blob_chunks_prefix(digest: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(digest.len() + 9);
    k.extend_from_slice(digest.as_bytes());
    k.push(0);
    k
}

/// The offset in a `blob_chunks` key.
pub fn offset_of(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|i| key[i..].try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// A committed blob.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobRecord {
    /// Its size in bytes.
    #[prost(int64, tag = "1")]
    pub size: i64,
    /// Committed, ns since the epoch.
    #[prost(int64, tag = "2")]
    pub created_ns: i64,
    /// Last updated, ns since the epoch.
    #[prost(int64, tag = "3")]
    pub updated_ns: i64,
    /// Labels.
    #[prost(btree_map = "string, string", tag = "4")]
    pub labels: BTreeMap<String, String>,
    /// How many chunks it has.
    #[prost(uint64, tag = "5")]
    pub chunks: u64,
}

/// One entry of a blob's chunk list.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChunkRef {
    /// The chunk's SHA-256.
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    /// Its length.
    #[prost(uint32, tag = "2")]
    pub len: u32,
}

/// Chunk stored as is.
pub const COMPRESSION_NONE: u32 = 0;
/// Chunk stored zstd-compressed.
pub const COMPRESSION_ZSTD: u32 = 1;

/// Where a chunk's bytes are.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChunkLoc {
    /// The pack file number.
    #[prost(uint64, tag = "1")]
    pub pack: u64,
    /// Offset in the pack.
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    /// Bytes in the pack.
    #[prost(uint32, tag = "3")]
    pub stored_len: u32,
    /// Bytes once decompressed.
    #[prost(uint32, tag = "4")]
    pub raw_len: u32,
    /// [`COMPRESSION_NONE`] or [`COMPRESSION_ZSTD`].
    #[prost(uint32, tag = "5")]
    pub compression: u32,
    /// CRC32C of the stored bytes (schema 2 on; absent in schema 1).
    #[prost(uint32, optional, tag = "6")]
    pub crc32c: Option<u32>,
}

/// An ingest under way.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IngestRecord {
    /// The expected total, or 0.
    #[prost(int64, tag = "1")]
    pub total: i64,
    /// The expected digest, or empty.
    #[prost(string, tag = "2")]
    pub expected: String,
    /// Started, ns since the epoch.
    #[prost(int64, tag = "3")]
    pub started_ns: i64,
    /// Last written, ns since the epoch.
    #[prost(int64, tag = "4")]
    pub updated_ns: i64,
}

/// Encodes a record with its version byte.
pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    strata_kv::encode(m)
}

/// Decodes a record written by [`encode`]; `what` names it in the error.
pub fn decode<M: Message + Default>(what: &str, v: &[u8]) -> Result<M> {
    strata_kv::decode(v).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

pub use strata_kv::{now_ns, time_of};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_offset_and_records_round_trip() -> Result<()> {
        assert!(blob_chunk_key("sha256:a", 1) < blob_chunk_key("sha256:a", 256));
        assert!(blob_chunk_key("sha256:a", u64::MAX) < blob_chunks_prefix("sha256:b"));
        assert_eq!(offset_of(&blob_chunk_key("sha256:a", 77)), 77);
        let r = ChunkLoc {
            pack: 3,
            offset: 9,
            stored_len: 10,
            raw_len: 20,
            compression: COMPRESSION_ZSTD,
            crc32c: Some(0xdead_beef),
        };
        assert_eq!(decode::<ChunkLoc>("x", &encode(&r))?, r);
        assert!(decode::<ChunkLoc>("x", &[7]).is_err());
        Ok(())
    }
}
