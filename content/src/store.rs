//! The content store: blobs as deduplicated chunks in pack files, with their
//! metadata in the shared RocksDB. Blocking; the gRPC service calls it on
//! blocking threads.
//!
//! Ingest: bytes go to `ingest/<sha256(ref)>` as they arrive, with a running
//! SHA-256. Commit checks size and digest, then cuts the file into
//! content-defined chunks (FastCDC), re-hashing it on the way (the digest is
//! verified over exactly the bytes that go to the packs), stores each chunk it
//! has not seen (zstd when that saves space), syncs the packs, and only then
//! writes one synced batch that makes the blob visible. A crash before that
//! batch leaves the ingest (resumable) and unreferenced pack bytes, which
//! compaction reclaims.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rocksdb::{ColumnFamily, Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions, DB};
use sha2::{Digest, Sha256};
use strata_proto::filters::{Adaptor, Filter};

use crate::error::{Error, Result};
use crate::packs::Packs;
use crate::schema::{self, BlobRecord, ChunkLoc, ChunkRef, IngestRecord};

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

/// An ingest's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Its ref.
    pub reference: String,
    /// Bytes written so far.
    pub offset: i64,
    /// The expected total, or 0.
    pub total: i64,
    /// The expected digest, or empty.
    pub expected: String,
    /// When it started.
    pub started: SystemTime,
    /// When it was last written.
    pub updated: SystemTime,
}

impl Adaptor for Status {
    fn field(&self, path: &[String]) -> Option<&str> {
        match path {
            [f] if f == "ref" => Some(&self.reference),
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

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compaction {
    /// Chunk records dropped (no references left).
    pub dead_chunks: u64,
    /// Packs deleted or rewritten.
    pub packs_removed: u64,
    /// Live bytes copied to the active pack.
    pub bytes_copied: u64,
    /// Pack bytes freed.
    pub bytes_freed: u64,
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
    db: Arc<DB>,
    cfg: ContentConfig,
    packs: Packs,
    ingest_dir: PathBuf,
    sync: WriteOptions,
    /// Refs with a writer, and a signal when one is released.
    locked: Mutex<HashSet<String>>,
    unlocked: std::sync::Condvar,
    /// Blob membership changes (commit's last check + batch, delete, label
    /// updates) one at a time, so refcounts never count a blob twice.
    blobs: Mutex<()>,
    /// Commits hold it shared from their first append to their batch;
    /// compaction takes it exclusively to cut a consistent view.
    gc: RwLock<()>,
    /// One compaction at a time.
    compacting: Mutex<()>,
}

/// The content store. Cheap to clone.
#[derive(Clone)]
pub struct ContentStore {
    pub(crate) inner: Arc<Inner>,
}

fn sha256_digest(h: Sha256) -> String {
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

impl ContentStore {
    /// Opens the store over `db` (opened with [`schema::column_families`]).
    /// `writable` false: for stats and checks while the daemon runs.
    pub fn open(db: Arc<DB>, cfg: ContentConfig, writable: bool) -> Result<ContentStore> {
        if !(64..=cfg.chunk_avg).contains(&cfg.chunk_min) || cfg.chunk_avg > cfg.chunk_max {
            return Err(Error::InvalidArgument(format!(
                "chunk sizes must satisfy 64 <= min <= avg <= max (got {}/{}/{})",
                cfg.chunk_min, cfg.chunk_avg, cfg.chunk_max
            )));
        }
        let packs = Packs::open(&cfg.root.join("packs"), cfg.pack_max_bytes, writable)?;
        let ingest_dir = cfg.root.join("ingest");
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let store = ContentStore {
            inner: Arc::new(Inner {
                db,
                packs,
                ingest_dir,
                cfg,
                sync,
                locked: Mutex::new(HashSet::new()),
                unlocked: std::sync::Condvar::new(),
                blobs: Mutex::new(()),
                gc: RwLock::new(()),
                compacting: Mutex::new(()),
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
    /// with pieces of at most one chunk until it returns false.
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

    /// Opens (or resumes) the ingest `reference`. Unavailable while another
    /// writer holds it; AlreadyExists if `expected` is committed already.
    pub fn writer(&self, reference: &str, total: i64, expected: &str) -> Result<Writer> {
        Writer::open(self.inner.clone(), reference, total, expected)
    }

    /// Counts logical and stored bytes.
    pub fn stats(&self) -> Result<Stats> {
        self.inner.stats()
    }

    /// Drops unreferenced chunks and rewrites or deletes mostly-dead packs.
    pub fn compact(&self) -> Result<Compaction> {
        self.inner.compact()
    }

    /// Re-reads every blob and checks its digest; with `repair`, damaged
    /// blobs are removed from the store and listed in `quarantine/`.
    pub fn fsck(&self, repair: bool) -> Result<Vec<Damage>> {
        self.inner.fsck(repair)
    }
}

impl Inner {
    fn cf(&self, name: &str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::Internal(format!("column family {name} is not open")))
    }

    /// Takes the ref's writer lock. A writer that just closed its stream may
    /// still be letting go (containerd's client does not wait for that), so
    /// wait up to a second, as containerd's local store does, before
    /// answering Unavailable.
    fn lock_ref(&self, reference: &str) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        while locked.contains(reference) {
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(Error::Unavailable(format!(
                    "ref {reference:?} is locked by another writer"
                )));
            }
            locked = self
                .unlocked
                .wait_timeout(locked, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        locked.insert(reference.to_string());
        Ok(())
    }

    fn unlock_ref(&self, reference: &str) {
        self.locked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(reference);
        self.unlocked.notify_all();
    }

    fn ingest_path(&self, reference: &str) -> PathBuf {
        self.ingest_dir
            .join(format!("{:x}", Sha256::digest(reference.as_bytes())))
    }

    /// At start: ingest files without a record and records without a file
    /// are dropped (what a crash between the two leaves).
    fn recover(&self) -> Result<()> {
        std::fs::create_dir_all(&self.ingest_dir)
            .map_err(|e| Error::io(format!("create {}", self.ingest_dir.display()), e))?;
        let cf = self.cf(schema::CF_INGEST)?;
        let mut known = HashSet::new();
        let mut stale = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item?;
            let reference = String::from_utf8_lossy(&k).into_owned();
            let path = self.ingest_path(&reference);
            if path.exists() {
                known.insert(path);
            } else {
                stale.push(k);
            }
        }
        for k in stale {
            self.db.delete_cf(cf, k)?;
        }
        if let Ok(rd) = std::fs::read_dir(&self.ingest_dir) {
            for e in rd.flatten() {
                if !known.contains(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// A record of column family `cf`, decoded.
    fn get<M: prost::Message + Default>(&self, cf: &str, key: &[u8]) -> Result<Option<M>> {
        match self.db.get_pinned_cf(self.cf(cf)?, key)? {
            Some(v) => Ok(Some(schema::decode(&String::from_utf8_lossy(key), &v)?)),
            None => Ok(None),
        }
    }

    fn blob(&self, digest: &str) -> Result<Option<BlobRecord>> {
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

    /// The blob's chunk list from `start` on: (offset, chunk ref).
    fn chunk_list(&self, digest: &str) -> Result<Vec<(u64, ChunkRef)>> {
        let prefix = schema::blob_chunks_prefix(digest);
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(schema::CF_BLOB_CHUNKS)?,
            IteratorMode::From(&prefix, Direction::Forward),
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

    fn delete_batch(&self, digest: &str, b: &mut WriteBatch) -> Result<()> {
        let chunks_cf = self.cf(schema::CF_BLOB_CHUNKS)?;
        let refs_cf = self.cf(schema::CF_CHUNK_REF)?;
        for (off, c) in self.chunk_list(digest)? {
            b.delete_cf(chunks_cf, schema::blob_chunk_key(digest, off));
            b.merge_cf(refs_cf, &c.id, schema::refcount_delta(-1));
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
        let mut b = WriteBatch::default();
        self.delete_batch(digest, &mut b)?;
        self.db.write_opt(b, &self.sync)?;
        Ok(())
    }

    fn chunk_loc(&self, id: &[u8]) -> Result<Option<ChunkLoc>> {
        self.get(schema::CF_CHUNK, id)
    }

    /// Bytes `[from, to)` of a chunk's original bytes: a raw chunk is read
    /// in part, a compressed one whole and then cut. A pack removed by
    /// compaction between the lookup and the read means the location moved:
    /// look it up again.
    fn chunk_slice(&self, c: &ChunkRef, from: usize, to: usize) -> Result<Vec<u8>> {
        for _ in 0..3 {
            let loc = self
                .chunk_loc(&c.id)?
                .ok_or_else(|| Error::DataLoss(format!("chunk {} has no location", hex(&c.id))))?;
            if loc.raw_len != c.len || to > c.len as usize || from > to {
                return Err(Error::DataLoss(format!(
                    "chunk {}: {} bytes stored, {} expected",
                    hex(&c.id),
                    loc.raw_len,
                    c.len
                )));
            }
            let (off, len) = match loc.compression {
                schema::COMPRESSION_NONE => (loc.offset + from as u64, to - from),
                _ => (loc.offset, loc.stored_len as usize),
            };
            let stored = match self.packs.read(loc.pack, off, len) {
                Ok(b) => b,
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            return match loc.compression {
                schema::COMPRESSION_NONE => Ok(stored),
                schema::COMPRESSION_ZSTD => {
                    let raw = zstd::bulk::decompress(&stored, loc.raw_len as usize)
                        .map_err(|e| Error::DataLoss(format!("chunk {}: {e}", hex(&c.id))))?;
                    if raw.len() != loc.raw_len as usize {
                        return Err(Error::DataLoss(format!(
                            "chunk {} decompressed short",
                            hex(&c.id)
                        )));
                    }
                    Ok(raw[from..to].to_vec())
                }
                other => Err(Error::Corrupt(format!("chunk compression {other}"))),
            };
        }
        Err(Error::Internal(format!(
            "chunk {} keeps moving",
            hex(&c.id)
        )))
    }

    fn read(
        &self,
        digest: &str,
        offset: i64,
        len: i64,
        mut emit: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<()> {
        validate_digest(digest)?;
        let r = self
            .blob(digest)?
            .ok_or_else(|| Error::NotFound(format!("content {digest}")))?;
        let offset = offset.max(0);
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
        let mut it = self.db.raw_iterator_cf(self.cf(schema::CF_BLOB_CHUNKS)?);
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
            let from = (pos - start) as usize;
            let to = ((end - start) as usize).min(c.len as usize);
            if from < to {
                let data = self.chunk_slice(&c, from, to)?;
                if !emit(pos, &data) {
                    return Ok(());
                }
                pos += data.len() as u64;
            }
            it.next();
        }
        Ok(())
    }

    fn ingest_record(&self, reference: &str) -> Result<Option<IngestRecord>> {
        self.get(schema::CF_INGEST, reference.as_bytes())
    }

    fn status_of(&self, reference: &str, r: &IngestRecord) -> Status {
        let offset = std::fs::metadata(self.ingest_path(reference))
            .map(|m| m.len() as i64)
            .unwrap_or(0);
        Status {
            reference: reference.to_string(),
            offset,
            total: r.total,
            expected: r.expected.clone(),
            started: schema::time_of(r.started_ns),
            updated: schema::time_of(r.updated_ns),
        }
    }

    fn status(&self, reference: &str) -> Result<Status> {
        let r = self
            .ingest_record(reference)?
            .ok_or_else(|| Error::NotFound(format!("ingest {reference:?}")))?;
        Ok(self.status_of(reference, &r))
    }

    fn list_statuses(&self, filter: &Filter) -> Result<Vec<Status>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(schema::CF_INGEST)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            let reference = String::from_utf8_lossy(&k).into_owned();
            let s = self.status_of(&reference, &schema::decode(&reference, &v)?);
            if filter.matches(&s) {
                out.push(s);
            }
        }
        Ok(out)
    }

    fn abort(&self, reference: &str) -> Result<()> {
        if self.ingest_record(reference)?.is_none() {
            return Err(Error::NotFound(format!("ingest {reference:?}")));
        }
        self.drop_ingest(reference)
    }

    fn drop_ingest(&self, reference: &str) -> Result<()> {
        self.db.delete_cf_opt(
            self.cf(schema::CF_INGEST)?,
            reference.as_bytes(),
            &self.sync,
        )?;
        match std::fs::remove_file(self.ingest_path(reference)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("remove ingest {reference:?}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Stores the ingest file's bytes as blob `digest`; see the module docs.
    fn store_blob(
        &self,
        reference: &str,
        file: &File,
        digest: &str,
        size: i64,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let gc = self.gc.read().unwrap_or_else(|p| p.into_inner());
        let chunk_cf = self.cf(schema::CF_CHUNK)?;
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
        let mut verify = Sha256::new();
        let mut b = WriteBatch::default();
        let mut touched = HashSet::new();
        let mut new_here: HashSet<Vec<u8>> = HashSet::new();
        let mut count = 0u64;
        let mut total = 0u64;
        for chunk in chunker {
            let chunk = chunk.map_err(|e| Error::Io {
                what: format!("reading ingest {reference:?}"),
                source: std::io::Error::other(e.to_string()),
            })?;
            verify.update(&chunk.data);
            let id = Sha256::digest(&chunk.data).to_vec();
            b.put_cf(
                self.cf(schema::CF_BLOB_CHUNKS)?,
                schema::blob_chunk_key(digest, chunk.offset),
                schema::encode(&ChunkRef {
                    id: id.clone(),
                    len: chunk.length as u32,
                }),
            );
            b.merge_cf(
                self.cf(schema::CF_CHUNK_REF)?,
                &id,
                schema::refcount_delta(1),
            );
            count += 1;
            total += chunk.length as u64;
            if new_here.contains(&id) || self.db.get_pinned_cf(chunk_cf, &id)?.is_some() {
                continue;
            }
            let mut stored = None;
            if raw_format {
                // gzip/zstd/xz/bzip2 layers: compressing again wastes CPU.
            } else if zstd_pause > 0 {
                zstd_pause -= 1;
            } else {
                let c = zstd::bulk::compress(&chunk.data, self.cfg.zstd_level)
                    .map_err(|e| Error::io("zstd", e))?;
                // Keep it only when it saves at least 1/16.
                if c.len() + c.len() / 16 < chunk.data.len() {
                    zstd_misses = 0;
                    stored = Some(c);
                } else {
                    zstd_misses += 1;
                    // After a run of misses this part of the blob does not
                    // compress: only every fourth chunk is tried until one
                    // compresses again.
                    if zstd_misses >= 4 {
                        zstd_pause = 3;
                    }
                }
            }
            let (bytes, compression) = match &stored {
                Some(c) => (c.as_slice(), schema::COMPRESSION_ZSTD),
                None => (chunk.data.as_slice(), schema::COMPRESSION_NONE),
            };
            let (pack, offset) = self.packs.append(bytes)?;
            touched.insert(pack);
            b.put_cf(
                chunk_cf,
                &id,
                schema::encode(&ChunkLoc {
                    pack,
                    offset,
                    stored_len: bytes.len() as u32,
                    raw_len: chunk.length as u32,
                    compression,
                }),
            );
            new_here.insert(id);
        }
        let verified = sha256_digest(verify);
        if verified != digest || total != size as u64 {
            return Err(Error::DataLoss(format!(
                "ingest {reference:?} changed on disk: {total} bytes with digest {verified}, expected {size} bytes with {digest}"
            )));
        }
        self.packs.sync(touched)?;
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
        b.put_cf(
            self.cf(schema::CF_BLOB)?,
            digest.as_bytes(),
            schema::encode(&rec),
        );
        b.delete_cf(self.cf(schema::CF_INGEST)?, reference.as_bytes());
        {
            let _g = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
            if self.blob(digest)?.is_some() {
                return Err(Error::AlreadyExists(format!("content {digest}")));
            }
            self.db.write_opt(b, &self.sync)?;
        }
        drop(gc);
        Ok(())
    }

    fn stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        self.walk(&Filter::default(), |info| {
            s.blobs += 1;
            s.logical_bytes += info.size as u64;
            true
        })?;
        for (_, loc, refs) in self.all_chunks()? {
            if refs > 0 {
                s.chunks += 1;
                s.chunk_raw_bytes += loc.raw_len as u64;
                s.chunk_stored_bytes += loc.stored_len as u64;
            }
        }
        for (_, len) in self.packs.list()? {
            s.packs += 1;
            s.pack_bytes += len;
        }
        Ok(s)
    }

    /// Every chunk record with its reference count.
    fn all_chunks(&self) -> Result<Vec<(Vec<u8>, ChunkLoc, i64)>> {
        let refs_cf = self.cf(schema::CF_CHUNK_REF)?;
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(self.cf(schema::CF_CHUNK)?, ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            let loc: ChunkLoc = schema::decode("chunk", &v)?;
            let refs = self
                .db
                .get_pinned_cf(refs_cf, &k)?
                .map(|v| schema::decode_i64(&v))
                .unwrap_or(0);
            out.push((k.to_vec(), loc, refs));
        }
        Ok(out)
    }

    fn compact(&self) -> Result<Compaction> {
        let _one = self.compacting.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = Compaction::default();
        // A consistent cut: no commit is between its appends and its batch,
        // so every pack sealed now has all its live chunks recorded.
        let sealed: Vec<(u64, u64)> = {
            let _cut = self.gc.write().unwrap_or_else(|p| p.into_inner());
            self.packs.rotate()?;
            let active = self.packs.active_id();
            self.packs
                .list()?
                .into_iter()
                .filter(|(id, _)| Some(*id) != active)
                .collect()
        };
        // Unreferenced chunks go; a commit that wants one again adds it anew.
        let chunks = self.all_chunks()?;
        {
            let _cut = self.gc.write().unwrap_or_else(|p| p.into_inner());
            let refs_cf = self.cf(schema::CF_CHUNK_REF)?;
            let mut b = WriteBatch::default();
            for (id, _, refs) in chunks.iter().filter(|c| c.2 <= 0) {
                let now = self
                    .db
                    .get_pinned_cf(refs_cf, id)?
                    .map(|v| schema::decode_i64(&v))
                    .unwrap_or(0);
                if now <= 0 && *refs <= 0 {
                    b.delete_cf(self.cf(schema::CF_CHUNK)?, id);
                    b.delete_cf(refs_cf, id);
                    done.dead_chunks += 1;
                }
            }
            self.db.write_opt(b, &self.sync)?;
        }
        let mut live: HashMap<u64, Vec<(Vec<u8>, ChunkLoc)>> = HashMap::new();
        for (id, loc, refs) in chunks {
            if refs > 0 {
                live.entry(loc.pack).or_default().push((id, loc));
            }
        }
        for (pack, size) in sealed {
            let chunks = live.remove(&pack).unwrap_or_default();
            let live_bytes: u64 = chunks.iter().map(|(_, l)| l.stored_len as u64).sum();
            if size > 0 && live_bytes as f64 >= self.cfg.compact_below * size as f64 {
                continue;
            }
            // Copy what is live, flip the locations in one batch, then delete.
            let mut b = WriteBatch::default();
            let mut touched = HashSet::new();
            for (id, loc) in &chunks {
                let bytes = self
                    .packs
                    .read(loc.pack, loc.offset, loc.stored_len as usize)?;
                let (np, noff) = self.packs.append(&bytes)?;
                touched.insert(np);
                let moved = ChunkLoc {
                    pack: np,
                    offset: noff,
                    ..loc.clone()
                };
                b.put_cf(self.cf(schema::CF_CHUNK)?, id, schema::encode(&moved));
                done.bytes_copied += bytes.len() as u64;
            }
            self.packs.sync(touched)?;
            self.db.write_opt(b, &self.sync)?;
            self.packs.remove(pack)?;
            done.packs_removed += 1;
            done.bytes_freed += size;
        }
        if done.packs_removed > 0 || done.dead_chunks > 0 {
            tracing::info!(?done, "content compaction");
        }
        Ok(done)
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
            std::fs::create_dir_all(&q)
                .map_err(|e| Error::io(format!("create {}", q.display()), e))?;
            for dmg in &damaged {
                let _g = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
                let mut b = WriteBatch::default();
                self.delete_batch(&dmg.digest, &mut b)?;
                self.db.write_opt(b, &self.sync)?;
                let name = dmg.digest.replace(':', "-");
                std::fs::write(
                    q.join(format!("{name}.txt")),
                    format!("{}\n{}\n", dmg.digest, dmg.problem),
                )
                .map_err(|e| Error::io("write quarantine note", e))?;
            }
        }
        Ok(damaged)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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

/// A writer of one ingest. Holds its ref's lock until dropped.
pub struct Writer {
    inner: Arc<Inner>,
    reference: String,
    file: File,
    offset: i64,
    total: i64,
    expected: String,
    hasher: Sha256,
    started_ns: i64,
    updated_ns: i64,
    committed: bool,
}

impl Writer {
    fn open(inner: Arc<Inner>, reference: &str, total: i64, expected: &str) -> Result<Writer> {
        if reference.is_empty() {
            return Err(Error::InvalidArgument("ref must not be empty".into()));
        }
        if !expected.is_empty() {
            validate_digest(expected)?;
            if inner.blob(expected)?.is_some() {
                return Err(Error::AlreadyExists(format!("content {expected}")));
            }
        }
        inner.lock_ref(reference)?;
        // From here the lock is released by Writer's Drop, or below on error.
        let unlock = |inner: &Inner| inner.unlock_ref(reference);
        match Self::open_locked(inner.clone(), reference, total, expected) {
            Ok(w) => Ok(w),
            Err(e) => {
                unlock(&inner);
                Err(e)
            }
        }
    }

    fn open_locked(
        inner: Arc<Inner>,
        reference: &str,
        total: i64,
        expected: &str,
    ) -> Result<Writer> {
        let path = inner.ingest_path(reference);
        let existing = inner.ingest_record(reference)?;
        let mut hasher = Sha256::new();
        let (rec, offset) = match existing {
            // Resume: the bytes so far are the file; re-hash them.
            Some(r) if total <= 0 || r.total <= 0 || r.total == total => {
                let f = File::open(&path)
                    .map_err(|e| Error::io(format!("open ingest {reference:?}"), e))?;
                let mut reader = BufReader::with_capacity(1 << 20, f);
                let n = std::io::copy(&mut reader, &mut HashWriter(&mut hasher))
                    .map_err(|e| Error::io(format!("read ingest {reference:?}"), e))?;
                let mut r = r;
                if r.total <= 0 {
                    r.total = total;
                }
                (r, n as i64)
            }
            _ => {
                let now = schema::now_ns();
                let r = IngestRecord {
                    total,
                    expected: expected.to_string(),
                    started_ns: now,
                    updated_ns: now,
                };
                File::create(&path)
                    .map_err(|e| Error::io(format!("create ingest {reference:?}"), e))?;
                inner.db.put_cf_opt(
                    inner.cf(schema::CF_INGEST)?,
                    reference.as_bytes(),
                    schema::encode(&r),
                    &inner.sync,
                )?;
                (r, 0)
            }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open ingest {reference:?}"), e))?;
        Ok(Writer {
            inner,
            reference: reference.to_string(),
            file,
            offset,
            total: rec.total,
            expected: if expected.is_empty() {
                rec.expected
            } else {
                expected.to_string()
            },
            hasher,
            started_ns: rec.started_ns,
            updated_ns: rec.updated_ns,
            committed: false,
        })
    }

    /// The ingest's status.
    pub fn status(&self) -> Status {
        Status {
            reference: self.reference.clone(),
            offset: self.offset,
            total: self.total,
            expected: self.expected.clone(),
            started: schema::time_of(self.started_ns),
            updated: schema::time_of(self.updated_ns),
        }
    }

    /// The digest of the bytes written so far.
    pub fn digest(&self) -> String {
        sha256_digest(self.hasher.clone())
    }

    /// Sets the expected total (from a later message).
    pub fn set_total(&mut self, total: i64) {
        if total > 0 {
            self.total = total;
        }
    }

    /// Appends at the current offset.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, self.offset as u64)
            .map_err(|e| Error::io(format!("write ingest {:?}", self.reference), e))?;
        self.hasher.update(data);
        self.offset += data.len() as i64;
        self.updated_ns = schema::now_ns();
        Ok(())
    }

    /// Starts over from offset 0 (the only truncation containerd asks for).
    pub fn truncate(&mut self) -> Result<()> {
        self.file
            .set_len(0)
            .map_err(|e| Error::io(format!("truncate ingest {:?}", self.reference), e))?;
        self.offset = 0;
        self.hasher = Sha256::new();
        Ok(())
    }

    /// Commits the ingest as a blob. FailedPrecondition (ingest kept) for a
    /// wrong size or digest; AlreadyExists (ingest dropped) if the blob is
    /// there already. Returns the digest.
    pub fn commit(
        &mut self,
        size: i64,
        expected: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<String> {
        if size > 0 && size != self.offset {
            return Err(Error::FailedPrecondition(format!(
                "unexpected commit size {}, expected {size}",
                self.offset
            )));
        }
        let digest = self.digest();
        if !expected.is_empty() && expected != digest {
            return Err(Error::FailedPrecondition(format!(
                "unexpected commit digest {digest}, expected {expected}"
            )));
        }
        if self.inner.blob(&digest)?.is_some() {
            self.inner.drop_ingest(&self.reference)?;
            self.committed = true;
            return Err(Error::AlreadyExists(format!("content {digest}")));
        }
        match self
            .inner
            .store_blob(&self.reference, &self.file, &digest, self.offset, labels)
        {
            Err(Error::AlreadyExists(m)) => {
                self.inner.drop_ingest(&self.reference)?;
                self.committed = true;
                Err(Error::AlreadyExists(m))
            }
            Err(e) => Err(e),
            Ok(()) => {
                self.committed = true;
                let _ = std::fs::remove_file(self.inner.ingest_path(&self.reference));
                Ok(digest)
            }
        }
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.committed {
            // Keep the last-write time for Status; the bytes are in the file.
            if let Ok(cf) = self.inner.cf(schema::CF_INGEST) {
                let r = IngestRecord {
                    total: self.total,
                    expected: self.expected.clone(),
                    started_ns: self.started_ns,
                    updated_ns: self.updated_ns,
                };
                if self
                    .inner
                    .ingest_record(&self.reference)
                    .ok()
                    .flatten()
                    .is_some()
                {
                    let _ = self
                        .inner
                        .db
                        .put_cf(cf, self.reference.as_bytes(), schema::encode(&r));
                }
            }
        }
        self.inner.unlock_ref(&self.reference);
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
