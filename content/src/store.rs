//! The blob layer: containerd's content store (blobs by digest, labels,
//! reads at any offset) over the chunk layer ([`crate::chunks`]); ingests are
//! in [`crate::ingest`]. Blocking; the gRPC service calls it on blocking
//! threads.
//!
//! Commit: the ingest file is cut into content-defined chunks (FastCDC) and
//! re-hashed on the way, so the digest is verified over exactly the bytes
//! that go to the packs; each chunk goes through a [`ChunkWriter`] (stored
//! if new, zstd when that saves space); the packs are synced; then one
//! synced batch writes the blob record, its chunk list, the chunk records
//! and reference counts, and drops the ingest. Nothing is visible before
//! that batch: a crash before it leaves the ingest (resumable) and
//! unreferenced pack bytes, which compaction reclaims.
//!
//! What dedups: uncompressed layers and eStargz layers (each file its own
//! gzip member, so an unchanged file is the same bytes) share chunks with
//! other versions of themselves. gzip and zstd layers are chunked and stored
//! as they are, but compressed bytes rarely repeat across versions, so in
//! practice they dedup only by digest: the same layer in two images is
//! stored once.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rocksdb::{ColumnFamily, IteratorMode, ReadOptions, WriteOptions, DB};
use sha2::{Digest, Sha256};
use strata_proto::filters::{Adaptor, Filter};

pub use crate::chunks::Compaction;
use crate::chunks::{ChunkStore, Put};
use crate::error::{Error, Result};
pub use crate::ingest::{Status, Writer};
use crate::packs::mkdir_private;
use crate::schema::{self, BlobRecord, ChunkRef};

/// Settings of the content store.
#[derive(Debug, Clone)]
pub struct ContentConfig {
    /// Where packs and ingests live.
    pub root: PathBuf,
    /// FastCDC minimum chunk size.
    pub chunk_min: u32,
    /// FastCDC average chunk size.
    pub chunk_avg: u32,
    /// FastCDC maximum chunk size.
    pub chunk_max: u32,
    /// zstd level for compressible chunks.
    pub zstd_level: i32,
    /// A pack is sealed past this size.
    pub pack_max_bytes: u64,
    /// Compaction rewrites a sealed pack whose live share is below this.
    pub compact_below: f64,
}

impl ContentConfig {
    /// Defaults under `root`: 16/64/256 KiB chunks, zstd level 3, 1 GiB packs.
    pub fn new(root: PathBuf) -> Self {
        ContentConfig {
            root,
            chunk_min: 16 * 1024,
            chunk_avg: 64 * 1024,
            chunk_max: 256 * 1024,
            zstd_level: 3,
            pack_max_bytes: 1 << 30,
            compact_below: 0.5,
        }
    }

    /// Checks what FastCDC and zstd accept, so that a bad setting fails at
    /// start-up rather than at every commit.
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let (min, avg, max) = (self.chunk_min, self.chunk_avg, self.chunk_max);
        if !(MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            || !(AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            || !(MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
            || min > avg
            || avg > max
        {
            return Err(Error::InvalidArgument(format!(
                "chunk sizes {min}/{avg}/{max} bytes: FastCDC takes a minimum of \
                 {MINIMUM_MIN}..={MINIMUM_MAX}, an average of {AVERAGE_MIN}..={AVERAGE_MAX} \
                 and a maximum of {MAXIMUM_MIN}..={MAXIMUM_MAX}, with min <= avg <= max"
            )));
        }
        if !zstd::compression_level_range().contains(&self.zstd_level) {
            return Err(Error::InvalidArgument(format!(
                "zstd level {} is outside {:?}",
                self.zstd_level,
                zstd::compression_level_range()
            )));
        }
        if !(0.0..=1.0).contains(&self.compact_below) {
            return Err(Error::InvalidArgument(format!(
                "compact_below {} is not a share between 0 and 1",
                self.compact_below
            )));
        }
        Ok(())
    }
}

/// A committed blob, as containerd sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// When it was committed.
    pub created: SystemTime,
    /// When it was last updated.
    pub updated: SystemTime,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl Adaptor for Info {
    fn field(&self, path: &[String]) -> Option<&str> {
        match path.first().map(String::as_str)? {
            "digest" => Some(&self.digest),
            "labels" if path.len() > 1 => self.labels.get(&path[1..].join(".")).map(String::as_str),
            _ => None,
        }
    }
}

/// What `strata content stats` prints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Committed blobs.
    pub blobs: u64,
    /// Sum of their sizes: what containerd sees.
    pub logical_bytes: u64,
    /// Distinct live chunks.
    pub chunks: u64,
    /// Their bytes before compression.
    pub chunk_raw_bytes: u64,
    /// Their bytes in packs (after compression).
    pub chunk_stored_bytes: u64,
    /// Pack files on disk, live or not.
    pub pack_bytes: u64,
    /// Pack files.
    pub packs: u64,
}

/// One blob's fsck verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Damage {
    /// The blob.
    pub digest: String,
    /// What is wrong.
    pub problem: String,
}

pub(crate) struct Inner {
    pub(crate) db: Arc<DB>,
    pub(crate) cfg: ContentConfig,
    pub(crate) chunks: ChunkStore,
    pub(crate) ingest_dir: PathBuf,
    pub(crate) sync: WriteOptions,
    /// Refs with a writer, and a signal when one is released.
    pub(crate) locked: Mutex<HashSet<String>>,
    pub(crate) unlocked: std::sync::Condvar,
    /// Blob membership changes (commit's last check + batch, delete, label
    /// updates) one at a time, so refcounts never count a blob twice.
    blobs: Mutex<()>,
}

/// The content store. Cheap to clone.
#[derive(Clone)]
pub struct ContentStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn sha256_digest(h: Sha256) -> String {
    format!("sha256:{:x}", h.finalize())
}

/// Checks a digest's form (`sha256:` and 64 lowercase hex digits).
pub fn validate_digest(d: &str) -> Result<()> {
    let ok = d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{d:?} is not a sha256 digest"
        )))
    }
}

/// Whether bytes start like an already-compressed stream (gzip, zstd, xz,
/// bzip2): such blobs are stored raw without trying zstd.
fn looks_compressed(head: &[u8]) -> bool {
    head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0])
        || head.starts_with(b"BZh")
}

/// Creates `dir` private, or closes it if an older strata left it open to
/// others.
fn private_dir(dir: &std::path::Path) -> Result<()> {
    mkdir_private(dir)?;
    let mode = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("stat {}", dir.display()), e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "closing a content directory others could read (now 0700)");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))?;
    }
    Ok(())
}

impl ContentStore {
    /// Opens the store over `db` (opened with [`schema::column_families`]).
    /// `writable` false: for stats and checks while the daemon runs.
    pub fn open(db: Arc<DB>, cfg: ContentConfig, writable: bool) -> Result<ContentStore> {
        cfg.validate()?;
        let meta = db.cf_handle(schema::CF_META).ok_or_else(|| {
            Error::Internal(format!("column family {} is not open", schema::CF_META))
        })?;
        // Schema 1 stores (no version written) read as they are: their
        // chunks without a CRC are checked against their SHA-256 id.
        strata_kv::check_schema(
            &db,
            meta,
            "content store",
            schema::SCHEMA_KEY,
            schema::SCHEMA_VERSION,
            writable,
        )
        .map_err(|e| match e {
            strata_kv::SchemaError::Db { source, .. } => Error::Db(source),
            newer => Error::FailedPrecondition(newer.to_string()),
        })?;
        if writable {
            for dir in [
                cfg.root.clone(),
                cfg.root.join("packs"),
                cfg.root.join("ingest"),
            ] {
                private_dir(&dir)?;
            }
        }
        let chunks = ChunkStore::open(
            db.clone(),
            &cfg.root.join("packs"),
            cfg.pack_max_bytes,
            cfg.compact_below,
            writable,
        )?;
        let ingest_dir = cfg.root.join("ingest");
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let store = ContentStore {
            inner: Arc::new(Inner {
                db,
                chunks,
                ingest_dir,
                cfg,
                sync,
                locked: Mutex::new(HashSet::new()),
                unlocked: std::sync::Condvar::new(),
                blobs: Mutex::new(()),
            }),
        };
        if writable {
            store.inner.recover()?;
        }
        Ok(store)
    }

    /// The blob's info. NotFound if absent.
    pub fn info(&self, digest: &str) -> Result<Info> {
        self.inner.info(digest)
    }

    /// The blob's info if it can be read without I/O (memtable or block
    /// cache), for an async caller to answer inline; `None` if it would block.
    pub fn info_nonblocking(&self, digest: &str) -> Option<Result<Info>> {
        if let Err(e) = validate_digest(digest) {
            return Some(Err(e));
        }
        let inner = &self.inner;
        let cf = match inner.cf(schema::CF_BLOB) {
            Ok(cf) => cf,
            Err(e) => return Some(Err(e)),
        };
        let mut ro = ReadOptions::default();
        ro.set_read_tier(rocksdb::ReadTier::BlockCache);
        match inner.db.get_pinned_cf_opt(cf, digest.as_bytes(), &ro) {
            Ok(Some(v)) => Some(
                schema::decode::<BlobRecord>(digest, &v)
                    .map(|r| Inner::info_of(digest.to_string(), &r)),
            ),
            Ok(None) => Some(Err(Error::NotFound(format!("content {digest}")))),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => None,
            Err(e) => Some(Err(e.into())),
        }
    }

    /// Updates labels (`labels`, `labels.KEY`; none: all).
    pub fn update(&self, info: Info, paths: &[String]) -> Result<Info> {
        self.inner.update(info, paths)
    }

    /// Calls `f` with each blob matching `filter`, in digest order, until it
    /// returns false.
    pub fn walk(&self, filter: &Filter, f: impl FnMut(Info) -> bool) -> Result<()> {
        self.inner.walk(filter, f)
    }

    /// Deletes a blob (its chunks lose a reference). NotFound if absent.
    pub fn delete(&self, digest: &str) -> Result<()> {
        self.inner.delete(digest)
    }

    /// Reads `[offset, offset + len)` (`len` 0: to the end), calling `emit`
    /// with pieces of at most one chunk until it returns false. Every piece
    /// is checked before it is emitted; a blob deleted while it is read is
    /// NotFound.
    pub fn read(
        &self,
        digest: &str,
        offset: i64,
        len: i64,
        emit: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<()> {
        self.inner.read(digest, offset, len, emit)
    }

    /// The ingest's status. NotFound if there is none.
    pub fn status(&self, reference: &str) -> Result<Status> {
        self.inner.status(reference)
    }

    /// Every ingest matching `filter`.
    pub fn list_statuses(&self, filter: &Filter) -> Result<Vec<Status>> {
        self.inner.list_statuses(filter)
    }

    /// Drops an ingest. NotFound if there is none.
    pub fn abort(&self, reference: &str) -> Result<()> {
        self.inner.abort(reference)
    }

    /// Opens (or resumes) the ingest `reference`. InvalidArgument for an
    /// empty or over-long ref or a negative total. Unavailable while another
    /// writer holds it; AlreadyExists if `expected` is committed already;
    /// FailedPrecondition if it was started with another `total`.
    pub fn writer(&self, reference: &str, total: i64, expected: &str) -> Result<Writer> {
        Writer::open(self.inner.clone(), reference, total, expected)
    }

    /// Counts logical and stored bytes.
    pub fn stats(&self) -> Result<Stats> {
        self.inner.stats()
    }

    /// Drops unreferenced chunks and rewrites or deletes mostly-dead packs.
    pub fn compact(&self) -> Result<Compaction> {
        self.inner.chunks.compact()
    }

    /// Re-reads every blob and checks its digest; with `repair`, damaged
    /// blobs are removed from the store and listed in `quarantine/`.
    pub fn fsck(&self, repair: bool) -> Result<Vec<Damage>> {
        self.inner.fsck(repair)
    }
}

impl Inner {
    pub(crate) fn cf(&self, name: &str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::Internal(format!("column family {name} is not open")))
    }

    /// A record of column family `cf`, decoded.
    pub(crate) fn get<M: prost::Message + Default>(
        &self,
        cf: &str,
        key: &[u8],
    ) -> Result<Option<M>> {
        match self.db.get_pinned_cf(self.cf(cf)?, key)? {
            Some(v) => Ok(Some(schema::decode(&String::from_utf8_lossy(key), &v)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn blob(&self, digest: &str) -> Result<Option<BlobRecord>> {
        self.get(schema::CF_BLOB, digest.as_bytes())
    }

    fn info_of(digest: String, r: &BlobRecord) -> Info {
        Info {
            digest,
            size: r.size,
            created: schema::time_of(r.created_ns),
            updated: schema::time_of(r.updated_ns),
            labels: r.labels.clone(),
        }
    }

    fn info(&self, digest: &str) -> Result<Info> {
        validate_digest(digest)?;
        let r = self
            .blob(digest)?
            .ok_or_else(|| Error::NotFound(format!("content {digest}")))?;
        Ok(Self::info_of(digest.to_string(), &r))
    }

    fn update(&self, info: Info, paths: &[String]) -> Result<Info> {
        validate_digest(&info.digest)?;
        strata_proto::limits::check_labels(&info.labels)?;
        let _g = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut r = self
            .blob(&info.digest)?
            .ok_or_else(|| Error::NotFound(format!("content {}", info.digest)))?;
        if paths.is_empty() {
            r.labels = info.labels.clone();
        }
        for p in paths {
            if let Some(label) = p.strip_prefix("labels.") {
                let v = info.labels.get(label).cloned().unwrap_or_default();
                r.labels.insert(label.to_string(), v);
            } else if p == "labels" {
                r.labels = info.labels.clone();
            } else {
                return Err(Error::InvalidArgument(format!(
                    "cannot update field {p:?} of content {}: only labels can be updated",
                    info.digest
                )));
            }
        }
        r.labels.retain(|_, v| !v.is_empty());
        r.updated_ns = schema::now_ns();
        self.db.put_cf_opt(
            self.cf(schema::CF_BLOB)?,
            info.digest.as_bytes(),
            schema::encode(&r),
            &self.sync,
        )?;
        Ok(Self::info_of(info.digest, &r))
    }

    fn walk(&self, filter: &Filter, mut f: impl FnMut(Info) -> bool) -> Result<()> {
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        for item in self
            .db
            .iterator_cf_opt(self.cf(schema::CF_BLOB)?, ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            let digest = String::from_utf8_lossy(&k).into_owned();
            let info = Self::info_of(digest.clone(), &schema::decode(&digest, &v)?);
            if filter.matches(&info) && !f(info) {
                break;
            }
        }
        Ok(())
    }

    /// The blob's chunk list: (offset, chunk ref).
    fn chunk_list(&self, digest: &str) -> Result<Vec<(u64, ChunkRef)>> {
        let prefix = schema::blob_chunks_prefix(digest);
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(schema::CF_BLOB_CHUNKS)?,
            IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push((schema::offset_of(&k), schema::decode(digest, &v)?));
        }
        Ok(out)
    }

    fn delete_batch(&self, digest: &str, b: &mut rocksdb::WriteBatch) -> Result<()> {
        let chunks_cf = self.cf(schema::CF_BLOB_CHUNKS)?;
        for (off, c) in self.chunk_list(digest)? {
            b.delete_cf(chunks_cf, schema::blob_chunk_key(digest, off));
            self.chunks.unref(&c.id, b)?;
        }
        b.delete_cf(self.cf(schema::CF_BLOB)?, digest.as_bytes());
        Ok(())
    }

    fn delete(&self, digest: &str) -> Result<()> {
        validate_digest(digest)?;
        let _g = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        if self.blob(digest)?.is_none() {
            return Err(Error::NotFound(format!("content {digest}")));
        }
        let mut b = rocksdb::WriteBatch::default();
        self.delete_batch(digest, &mut b)?;
        self.db.write_opt(b, &self.sync)?;
        Ok(())
    }

    /// The blob record and chunk list come from one snapshot, so a delete
    /// racing the read cannot cut the list short; chunk bytes come from the
    /// chunk layer, which follows compaction's moves.
    fn read(
        &self,
        digest: &str,
        offset: i64,
        len: i64,
        mut emit: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<()> {
        validate_digest(digest)?;
        let snap = self.db.snapshot();
        let r: BlobRecord =
            match snap.get_pinned_cf(self.cf(schema::CF_BLOB)?, digest.as_bytes())? {
                Some(v) => schema::decode(digest, &v)?,
                None => return Err(Error::NotFound(format!("content {digest}"))),
            };
        if offset < 0 {
            return Err(Error::InvalidArgument(format!(
                "negative read offset {offset}"
            )));
        }
        if offset > r.size {
            return Err(Error::OutOfRange(format!(
                "read past object length {} bytes",
                r.size
            )));
        }
        let end = if len <= 0 || offset.saturating_add(len) > r.size {
            r.size
        } else {
            offset + len
        } as u64;
        let mut pos = offset as u64;
        if pos >= end {
            return Ok(());
        }
        let prefix = schema::blob_chunks_prefix(digest);
        let mut it = snap.raw_iterator_cf(self.cf(schema::CF_BLOB_CHUNKS)?);
        // The chunk holding `pos` is the last one starting at or before it.
        it.seek_for_prev(schema::blob_chunk_key(digest, pos));
        while pos < end {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                it.status()?;
                return Err(Error::DataLoss(format!(
                    "{digest}: chunk list ends at {pos}"
                )));
            };
            if !k.starts_with(&prefix) {
                return Err(Error::DataLoss(format!("{digest}: no chunk at {pos}")));
            }
            let start = schema::offset_of(k);
            let c: ChunkRef = schema::decode(digest, v)?;
            let Some(from) = pos.checked_sub(start).map(|d| d as usize) else {
                return Err(Error::DataLoss(format!(
                    "{digest}: chunk list out of order at {pos}"
                )));
            };
            let to = ((end - start) as usize).min(c.len as usize);
            if from < to {
                let Some(data) = self.chunks.read(&c.id, c.len, from, to)? else {
                    // The chunk is gone: compaction dropped it after the
                    // blob was deleted, under this read.
                    // (Re-committed since is still a different blob.)
                    if self
                        .blob(digest)?
                        .is_none_or(|now| now.created_ns != r.created_ns)
                    {
                        return Err(Error::NotFound(format!(
                            "content {digest} (deleted while being read)"
                        )));
                    }
                    return Err(Error::DataLoss(format!(
                        "{digest}: chunk at {start} has no location"
                    )));
                };
                if !emit(pos, &data) {
                    return Ok(());
                }
                pos += data.len() as u64;
            }
            it.next();
        }
        Ok(())
    }

    /// Stores the ingest file's bytes as blob `digest`; see the module docs.
    pub(crate) fn store_blob(
        &self,
        reference: &str,
        file: &File,
        digest: &str,
        size: i64,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let mut head = [0u8; 8];
        let n = file.read_at(&mut head, 0).unwrap_or(0);
        let raw_format = looks_compressed(&head[..n]);
        // Chunks to skip before zstd is tried again, after a run of misses.
        let mut zstd_pause = 0u32;
        let mut zstd_misses = 0u32;

        let reader = BufReader::with_capacity(1 << 20, ReadAt { file, pos: 0 });
        let chunker = fastcdc::v2020::StreamCDC::new(
            reader,
            self.cfg.chunk_min,
            self.cfg.chunk_avg,
            self.cfg.chunk_max,
        );
        let list_cf = self.cf(schema::CF_BLOB_CHUNKS)?;
        let mut w = self.chunks.writer();
        let mut verify = Sha256::new();
        let mut count = 0u64;
        let mut total = 0u64;
        for chunk in chunker {
            let chunk = chunk.map_err(|e| Error::Io {
                what: format!("reading ingest {reference:?}"),
                source: std::io::Error::other(e.to_string()),
            })?;
            verify.update(&chunk.data);
            let id = Sha256::digest(&chunk.data);
            w.batch().put_cf(
                list_cf,
                schema::blob_chunk_key(digest, chunk.offset),
                schema::encode(&ChunkRef {
                    id: id.to_vec(),
                    len: chunk.length as u32,
                }),
            );
            count += 1;
            total += chunk.length as u64;
            // gzip/zstd/xz/bzip2 layers: compressing again wastes CPU. After
            // a run of misses, only every fourth chunk is tried until one
            // compresses again.
            let level = if raw_format {
                None
            } else if zstd_pause > 0 {
                zstd_pause -= 1;
                None
            } else {
                Some(self.cfg.zstd_level)
            };
            match w.put(&id, &chunk.data, level)? {
                Put::StoredCompressed => zstd_misses = 0,
                Put::StoredRaw if level.is_some() => {
                    zstd_misses += 1;
                    if zstd_misses >= 4 {
                        zstd_pause = 3;
                    }
                }
                _ => {}
            }
        }
        let verified = sha256_digest(verify);
        if verified != digest || total != size as u64 {
            return Err(Error::DataLoss(format!(
                "ingest {reference:?} changed on disk: {total} bytes with digest {verified}, expected {size} bytes with {digest}"
            )));
        }
        let mut done = w.finish()?;
        let now = schema::now_ns();
        let mut labels = labels;
        labels.retain(|_, v| !v.is_empty());
        let rec = BlobRecord {
            size,
            created_ns: now,
            updated_ns: now,
            labels,
            chunks: count,
        };
        done.batch.put_cf(
            self.cf(schema::CF_BLOB)?,
            digest.as_bytes(),
            schema::encode(&rec),
        );
        done.batch
            .delete_cf(self.cf(schema::CF_INGEST)?, reference.as_bytes());
        let _g = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        if self.blob(digest)?.is_some() {
            return Err(Error::AlreadyExists(format!("content {digest}")));
        }
        self.db
            .write_opt(std::mem::take(&mut done.batch), &self.sync)?;
        Ok(())
    }

    fn stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        self.walk(&Filter::default(), |info| {
            s.blobs += 1;
            s.logical_bytes += info.size as u64;
            true
        })?;
        let c = self.chunks.stats()?;
        s.chunks = c.chunks;
        s.chunk_raw_bytes = c.raw_bytes;
        s.chunk_stored_bytes = c.stored_bytes;
        s.packs = c.packs;
        s.pack_bytes = c.pack_bytes;
        Ok(s)
    }

    fn fsck(&self, repair: bool) -> Result<Vec<Damage>> {
        let mut digests = Vec::new();
        self.walk(&Filter::default(), |i| {
            digests.push(i.digest);
            true
        })?;
        let mut damaged = Vec::new();
        for d in digests {
            let mut h = Sha256::new();
            let mut n = 0u64;
            let problem = match self.read(&d, 0, 0, |_, piece| {
                h.update(piece);
                n += piece.len() as u64;
                true
            }) {
                // Deleted since the walk.
                Err(Error::NotFound(_)) => None,
                // Moved by a running daemon since this read-only view was
                // taken: not damage, but not checked either.
                Err(Error::Unavailable(m)) => {
                    tracing::warn!(digest = %d, "not checked: {m}");
                    None
                }
                Err(e) => Some(e.to_string()),
                Ok(()) => {
                    let got = sha256_digest(h);
                    (got != d).then(|| format!("stored bytes hash to {got} ({n} bytes)"))
                }
            };
            if let Some(problem) = problem {
                damaged.push(Damage { digest: d, problem });
            }
        }
        if repair && !damaged.is_empty() {
            let q = self.cfg.root.join("quarantine");
            mkdir_private(&q)?;
            for dmg in &damaged {
                let _g = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
                let mut b = rocksdb::WriteBatch::default();
                self.delete_batch(&dmg.digest, &mut b)?;
                self.db.write_opt(b, &self.sync)?;
                let name = dmg.digest.replace(':', "-");
                let note = format!("{}\n{}\n", dmg.digest, dmg.problem);
                std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(q.join(format!("{name}.txt")))
                    .and_then(|mut f| std::io::Write::write_all(&mut f, note.as_bytes()))
                    .map_err(|e| Error::io("write quarantine note", e))?;
            }
        }
        Ok(damaged)
    }
}

/// `Read` over a file by position, without moving a shared cursor.
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads a whole blob into memory (tests and small blobs).
pub fn read_all(store: &ContentStore, digest: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    store.read(digest, 0, 0, |_, p| {
        out.extend_from_slice(p);
        true
    })?;
    Ok(out)
}
