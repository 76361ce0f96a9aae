//! strata's content store: containerd's content API over content-defined,
//! deduplicated, optionally compressed chunks in append-only pack files, with
//! metadata in the shared RocksDB ([`schema`] owns the keyspace).
//!
//! A Write goes: [`service::ContentService`] (the stream protocol) →
//! [`store::Writer`] (ingest file + running digest) → at commit,
//! chunking, pack appends, pack sync, one synced batch.

pub mod error;
mod packs;
pub mod schema;
pub mod service;
pub mod store;

pub use error::{Error, Result};
pub use store::{ContentConfig, ContentStore};
