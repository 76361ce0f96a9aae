//! What every store in strata's one RocksDB does the same way, kept once:
//! versioned records, the `max` merge operator of counters, schema versions
//! and time stamps. Each store still owns its column families and keys (its
//! own `schema` module); this crate owns no keyspace.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rocksdb::{ColumnFamily, MergeOperands, WriteOptions, DB};

/// The version byte in front of every record.
pub const RECORD_VERSION: u8 = 1;

/// The name of [`merge_max_u64`] as registered with RocksDB.
pub const MAX_U64_MERGE: &str = "strata_max_u64";

/// Why a stored value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The value is empty.
    #[error("empty record")]
    Empty,
    /// A record version this strata does not know.
    #[error("unknown record version {0}")]
    Version(u8),
    /// The protobuf body does not decode.
    #[error("{0}")]
    Decode(#[from] prost::DecodeError),
}

/// Encodes a record: a version byte, then the protobuf body.
pub fn encode<M: prost::Message>(m: &M) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + m.encoded_len());
    v.push(RECORD_VERSION);
    // Writing into a Vec cannot run out of space.
    let _ = m.encode(&mut v);
    v
}

/// Decodes a record written by [`encode`].
pub fn decode<M: prost::Message + Default>(v: &[u8]) -> Result<M, RecordError> {
    match v.split_first() {
        Some((&RECORD_VERSION, body)) => Ok(M::decode(body)?),
        Some((&other, _)) => Err(RecordError::Version(other)),
        None => Err(RecordError::Empty),
    }
}

/// A big-endian u64 value; 0 when malformed.
pub fn decode_u64(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// `max` over big-endian u64 operands (anything malformed counts as 0), for
/// counters that must never go back whatever order batches land in.
pub fn merge_max_u64(_key: &[u8], existing: Option<&[u8]>, ops: &MergeOperands) -> Option<Vec<u8>> {
    let max = existing
        .into_iter()
        .chain(ops.iter())
        .map(decode_u64)
        .max()
        .unwrap_or(0);
    Some(max.to_be_bytes().to_vec())
}

/// Whether an I/O error says the filesystem is full (ENOSPC, or EDQUOT: a
/// quota that is used up is as full to strata).
pub fn io_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || e.raw_os_error() == Some(28)
}

/// Whether a RocksDB error is its "no space" I/O error (a write that found
/// the disk full, or every write after one, until RocksDB recovers).
pub fn db_disk_full(e: &rocksdb::Error) -> bool {
    e.kind() == rocksdb::ErrorKind::IOError && e.as_ref().contains("No space left on device")
}

/// Now, in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A time from nanoseconds since the epoch.
pub fn time_of(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
}

/// Why a store's schema version does not fit.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The data was written by a newer strata.
    #[error(
        "{store} data has schema {found} but this strata reads up to {supported}: upgrade strata"
    )]
    Newer {
        /// Which store.
        store: &'static str,
        /// The version on disk.
        found: u64,
        /// The newest this build reads.
        supported: u64,
    },
    /// The database failed.
    #[error("reading the {store} schema version: {source}")]
    Db {
        /// Which store.
        store: &'static str,
        /// The error.
        source: rocksdb::Error,
    },
}

/// Checks the schema version under `key` in `cf`: a newer one than
/// `version` is refused; an older or missing one is raised to `version`
/// (synced) when `writable` (a store's `open` upgrades what it must before
/// calling this). Returns the version found (0: none).
pub fn check_schema(
    db: &DB,
    cf: &ColumnFamily,
    store: &'static str,
    key: &[u8],
    version: u64,
    writable: bool,
) -> Result<u64, SchemaError> {
    let db_err = |source| SchemaError::Db { store, source };
    let found = db
        .get_cf(cf, key)
        .map_err(db_err)?
        .map(|v| decode_u64(&v))
        .unwrap_or(0);
    if found > version {
        return Err(SchemaError::Newer {
            store,
            found,
            supported: version,
        });
    }
    if found < version && writable {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        db.put_cf_opt(cf, key, version.to_be_bytes(), &sync)
            .map_err(db_err)?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Rec {
        #[prost(uint64, tag = "1")]
        n: u64,
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let r = Rec { n: 7 };
        assert_eq!(decode::<Rec>(&encode(&r)).ok(), Some(r));
        assert!(matches!(decode::<Rec>(&[]), Err(RecordError::Empty)));
        assert!(matches!(
            decode::<Rec>(&[9, 1]),
            Err(RecordError::Version(9))
        ));
        assert!(matches!(
            decode::<Rec>(&[RECORD_VERSION, 0xff]),
            Err(RecordError::Decode(_))
        ));
        assert_eq!(decode_u64(&5u64.to_be_bytes()), 5);
        assert_eq!(decode_u64(b"bad"), 0);
        assert!(time_of(now_ns()) > UNIX_EPOCH);
    }

    #[test]
    fn a_full_disk_is_recognised() {
        assert!(io_disk_full(&std::io::Error::from_raw_os_error(28)));
        assert!(io_disk_full(&std::io::Error::from(
            std::io::ErrorKind::StorageFull
        )));
        assert!(!io_disk_full(&std::io::Error::from_raw_os_error(5)));
    }
}
