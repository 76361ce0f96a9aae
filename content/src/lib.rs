//! strata's content store: containerd's content API over content-defined,
//! deduplicated, optionally compressed chunks in append-only pack files, with
//! metadata in the shared RocksDB ([`schema`] owns the keyspace).
//!
//! Two layers with a narrow API between them:
//! - the chunk layer ([`chunks`]): packs, chunk locations, reference counts,
//!   checksums, compaction;
//! - the blob layer ([`store`], with ingests in [`ingest`]): blobs by digest,
//!   labels, reads, ingest and commit.
//!
//! A Write goes: [`service::ContentService`] (the stream protocol) →
//! [`ingest::Writer`] (ingest file + running digest) → at commit,
//! [`store`] cuts the file into chunks → [`chunks::ChunkWriter`] (pack
//! appends, pack sync) → one synced batch.

pub mod chunks;
pub mod error;
pub mod ingest;
mod packs;
pub mod schema;
pub mod service;
pub mod store;

pub use error::{Error, Result};
pub use store::{ContentConfig, ContentStore};
