//! The chunk layer: content-addressed chunks (id = SHA-256 of the raw bytes)
//! in append-only pack files, their locations, reference counts and
//! checksums in the shared RocksDB, and compaction. The blob layer
//! ([`crate::store`]) sits on it; so can any other user of chunks (the lazy
//! snapshotter's cache, the unpack path), each keeping its own keys above it.
//!
//! - **Writing** goes through a [`ChunkWriter`]: [`ChunkWriter::put`] adds a
//!   reference to a chunk and appends its bytes (zstd when that saves 1/16)
//!   if the store does not have them; [`ChunkWriter::finish`] syncs the packs
//!   and hands back the batch holding the chunk records and reference-count
//!   operands, for the caller to add its own keys to and write (synced)
//!   before it drops the [`Finished`]. Until then every chunk the writer
//!   put is *pinned* (compaction never drops a pinned chunk, so one found
//!   present cannot vanish before the batch that references it lands), and
//!   every append is *pending* on its pack (compaction never rewrites a pack
//!   with pending appends, whose records it could not have seen). Nothing
//!   else is held: commits never wait for compaction, nor it for them,
//!   except for the moment compaction drops dead chunks.
//! - **Reading** ([`ChunkStore::read`]) checks every chunk before it is
//!   returned: the CRC32C of its stored bytes (records of schema 1 have none:
//!   their raw bytes are checked against the SHA-256 id instead), and its
//!   length. A damaged chunk is [`Error::DataLoss`], never data.
//! - **Dropping** a reference is a merge operand in the caller's batch
//!   ([`ChunkStore::unref`]); compaction deletes chunks nobody references
//!   and rewrites sealed packs that are mostly dead.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use rocksdb::{ColumnFamily, IteratorMode, ReadOptions, WriteBatch, WriteOptions, DB};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::packs::{Allocator, Packs};
use crate::schema::{self, ChunkLoc};

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

/// Live chunks and pack files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChunkStats {
    /// Distinct referenced chunks.
    pub chunks: u64,
    /// Their bytes before compression.
    pub raw_bytes: u64,
    /// Their bytes in packs.
    pub stored_bytes: u64,
    /// Pack files.
    pub packs: u64,
    /// Pack files' bytes on disk, live or not.
    pub pack_bytes: u64,
}

/// What [`ChunkWriter::put`] did with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The store had it: only a reference was added.
    Known,
    /// Stored as is.
    StoredRaw,
    /// Stored zstd-compressed.
    StoredCompressed,
}

/// The chunks of one store.
pub struct ChunkStore {
    db: Arc<DB>,
    packs: Packs,
    sync: WriteOptions,
    compact_below: f64,
    /// Chunks that writers rely on until their batch lands, with a count of
    /// writers each.
    pins: Mutex<HashMap<Vec<u8>, usize>>,
    /// One compaction at a time.
    compacting: Mutex<()>,
    /// Opened read-only beside a running daemon, whose compaction may move
    /// chunks after this view was taken.
    read_only: bool,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| Error::Internal(format!("column family {name} is not open")))
}

/// Pack numbers from `next_pack`: the number is written (synced) before it
/// is returned, so it is never handed out twice.
fn pack_allocator(db: Arc<DB>) -> Allocator {
    Box::new(move |min| {
        let meta = cf(&db, schema::CF_META)?;
        let stored = db
            .get_cf(meta, schema::NEXT_PACK_KEY)?
            .map(|v| strata_kv::decode_u64(&v))
            .unwrap_or(1);
        let id = stored.max(min).max(1);
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        db.merge_cf_opt(meta, schema::NEXT_PACK_KEY, (id + 1).to_be_bytes(), &sync)?;
        Ok(id)
    })
}

impl ChunkStore {
    /// Opens the chunks whose packs live in `dir`; `writable` starts a new
    /// active pack.
    pub fn open(
        db: Arc<DB>,
        dir: &std::path::Path,
        pack_max_bytes: u64,
        compact_below: f64,
        writable: bool,
    ) -> Result<ChunkStore> {
        let allocate = writable.then(|| pack_allocator(db.clone()));
        let packs = Packs::open(dir, pack_max_bytes, allocate)?;
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        Ok(ChunkStore {
            db,
            packs,
            sync,
            compact_below,
            pins: Mutex::new(HashMap::new()),
            compacting: Mutex::new(()),
            read_only: !writable,
        })
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily> {
        cf(&self.db, name)
    }

    /// A writer of one batch of chunk references; see the module docs.
    pub fn writer(&self) -> ChunkWriter<'_> {
        ChunkWriter {
            hold: Hold {
                chunks: self,
                pinned: HashSet::new(),
                appended: HashMap::new(),
            },
            batch: WriteBatch::default(),
            new_here: HashSet::new(),
        }
    }

    fn pins_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, usize>> {
        self.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds dropping one reference to chunk `id` to `b`.
    pub fn unref(&self, id: &[u8], b: &mut WriteBatch) -> Result<()> {
        b.merge_cf(
            self.cf(schema::CF_CHUNK_REF)?,
            id,
            schema::refcount_delta(-1),
        );
        Ok(())
    }

    fn location(&self, id: &[u8]) -> Result<Option<ChunkLoc>> {
        match self.db.get_pinned_cf(self.cf(schema::CF_CHUNK)?, id)? {
            Some(v) => Ok(Some(schema::decode(&format!("chunk {}", hex(id)), &v)?)),
            None => Ok(None),
        }
    }

    fn refs(&self, id: &[u8]) -> Result<i64> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(schema::CF_CHUNK_REF)?, id)?
            .map(|v| schema::decode_i64(&v))
            .unwrap_or(0))
    }

    /// Bytes `[from, to)` of chunk `id`, whose raw length is `len`, checked
    /// (CRC32C, or SHA-256 for records without one) before anything is
    /// returned. `None` if the store has no such chunk. A pack removed by
    /// compaction between the lookup and the read means the chunk moved: it
    /// is looked up again; a pack missing for the same location twice is
    /// DataLoss.
    pub fn read(&self, id: &[u8], len: u32, from: usize, to: usize) -> Result<Option<Vec<u8>>> {
        if from > to || to > len as usize {
            return Err(Error::Internal(format!(
                "chunk {}: range {from}..{to} outside its {len} bytes",
                hex(id)
            )));
        }
        let mut missing: Option<ChunkLoc> = None;
        for _ in 0..4 {
            let Some(loc) = self.location(id)? else {
                return Ok(None);
            };
            if loc.raw_len != len {
                return Err(Error::DataLoss(format!(
                    "chunk {}: {} bytes recorded, {len} expected",
                    hex(id),
                    loc.raw_len
                )));
            }
            if missing.as_ref() == Some(&loc) {
                if self.read_only {
                    return Err(Error::Unavailable(format!(
                        "chunk {}: pack {} was removed since this read-only view was opened (the daemon's compaction moved it): run again",
                        hex(id),
                        loc.pack
                    )));
                }
                return Err(Error::DataLoss(format!(
                    "chunk {}: pack {} is missing",
                    hex(id),
                    loc.pack
                )));
            }
            let stored = match self
                .packs
                .read(loc.pack, loc.offset, loc.stored_len as usize)
            {
                Ok(b) => b,
                Err(Error::NotFound(_)) => {
                    missing = Some(loc);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let raw = verified(id, &loc, stored)?;
            return Ok(Some(raw[from..to].to_vec()));
        }
        Err(Error::Internal(format!("chunk {} keeps moving", hex(id))))
    }

    /// Every chunk record with its reference count.
    fn all_chunks(&self) -> Result<Vec<(Vec<u8>, ChunkLoc, i64)>> {
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(self.cf(schema::CF_CHUNK)?, ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            let loc: ChunkLoc = schema::decode("chunk", &v)?;
            let refs = self.refs(&k)?;
            out.push((k.to_vec(), loc, refs));
        }
        Ok(out)
    }

    /// Live chunks and pack files.
    pub fn stats(&self) -> Result<ChunkStats> {
        let mut s = ChunkStats::default();
        for (_, loc, refs) in self.all_chunks()? {
            if refs > 0 {
                s.chunks += 1;
                s.raw_bytes += loc.raw_len as u64;
                s.stored_bytes += loc.stored_len as u64;
            }
        }
        for (_, len) in self.packs.list()? {
            s.packs += 1;
            s.pack_bytes += len;
        }
        Ok(s)
    }

    /// Drops unreferenced chunks and rewrites (or deletes) sealed packs whose
    /// live share is below the configured threshold.
    ///
    /// 1. The active pack is sealed; the candidates are the sealed packs
    ///    with no pending append. Every chunk record pointing into them is
    ///    written (their writers released them after their batches), and
    ///    from here on only compaction changes those records: writers append
    ///    new chunks to newer packs.
    /// 2. A scan of every record.
    /// 3. Under the pins lock: the chunks the scan saw unreferenced that are
    ///    unpinned and still unreferenced are dropped, in one synced batch
    ///    written before the lock is let go. A writer pins a chunk before it
    ///    looks for it, so it either pinned it first (and it is kept) or
    ///    looks after the drop (and stores it anew). The live set is every
    ///    record the scan saw that was not dropped here, whatever its count
    ///    was during the scan.
    /// 4. Each candidate below the threshold: its live chunks are copied to
    ///    the active pack, synced, their locations flipped in one batch, and
    ///    then the pack is deleted. A reader that looked up an old location
    ///    finds the pack gone and looks again. A pack that cannot be read is
    ///    left as it is, with an error in the log, and the others go on.
    pub fn compact(&self) -> Result<Compaction> {
        let _one = self.compacting.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = Compaction::default();
        let sealed = self.packs.seal_idle()?;
        let chunks = self.all_chunks()?;
        let mut dead = HashSet::new();
        {
            let pins = self.pins_lock();
            let (chunk_cf, refs_cf) = (self.cf(schema::CF_CHUNK)?, self.cf(schema::CF_CHUNK_REF)?);
            let mut b = WriteBatch::default();
            for (id, _, _) in chunks.iter().filter(|c| c.2 <= 0) {
                if !pins.contains_key(id) && self.refs(id)? <= 0 {
                    b.delete_cf(chunk_cf, id);
                    b.delete_cf(refs_cf, id);
                    dead.insert(id.clone());
                }
            }
            self.db.write_opt(b, &self.sync)?;
        }
        done.dead_chunks = dead.len() as u64;
        let mut live: HashMap<u64, Vec<(Vec<u8>, ChunkLoc)>> = HashMap::new();
        for (id, loc, _) in chunks {
            if !dead.contains(&id) {
                live.entry(loc.pack).or_default().push((id, loc));
            }
        }
        for (pack, size) in sealed {
            let chunks = live.remove(&pack).unwrap_or_default();
            let live_bytes: u64 = chunks.iter().map(|(_, l)| l.stored_len as u64).sum();
            if size > 0 && live_bytes as f64 >= self.compact_below * size as f64 {
                continue;
            }
            match self.rewrite(pack, &chunks) {
                Ok(copied) => {
                    done.packs_removed += 1;
                    done.bytes_copied += copied;
                    done.bytes_freed += size;
                }
                Err(e) => {
                    tracing::error!(pack, error = %e, "compaction left a pack as it is");
                }
            }
        }
        if done.packs_removed > 0 || done.dead_chunks > 0 {
            tracing::info!(?done, "content compaction");
        }
        Ok(done)
    }

    /// Copies `chunks` out of sealed `pack`, flips their locations, deletes
    /// the pack. Returns the bytes copied.
    fn rewrite(&self, pack: u64, chunks: &[(Vec<u8>, ChunkLoc)]) -> Result<u64> {
        let chunk_cf = self.cf(schema::CF_CHUNK)?;
        let mut hold = Hold {
            chunks: self,
            pinned: HashSet::new(),
            appended: HashMap::new(),
        };
        let mut b = WriteBatch::default();
        let mut copied = 0;
        for (id, loc) in chunks {
            // Copied as stored, with its checksum: a damaged chunk stays
            // detectably damaged.
            let bytes = self
                .packs
                .read(loc.pack, loc.offset, loc.stored_len as usize)?;
            let (np, noff) = self.packs.append(&bytes)?;
            *hold.appended.entry(np).or_default() += 1;
            let moved = ChunkLoc {
                pack: np,
                offset: noff,
                ..loc.clone()
            };
            b.put_cf(chunk_cf, id, schema::encode(&moved));
            copied += bytes.len() as u64;
        }
        self.packs.sync(hold.appended.keys().copied())?;
        self.db.write_opt(b, &self.sync)?;
        drop(hold);
        self.packs.remove(pack)?;
        Ok(copied)
    }
}

/// The raw bytes of a stored chunk, once they check out.
fn verified(id: &[u8], loc: &ChunkLoc, stored: Vec<u8>) -> Result<Vec<u8>> {
    let damaged = |what: String| Error::DataLoss(format!("chunk {}: {what}", hex(id)));
    if let Some(want) = loc.crc32c {
        let got = crc32c::crc32c(&stored);
        if got != want {
            return Err(damaged(format!(
                "stored bytes in pack {} at {} have CRC32C {got:08x}, recorded {want:08x}",
                loc.pack, loc.offset
            )));
        }
    }
    let raw = match loc.compression {
        schema::COMPRESSION_NONE => stored,
        schema::COMPRESSION_ZSTD => zstd::bulk::decompress(&stored, loc.raw_len as usize)
            .map_err(|e| damaged(format!("zstd: {e}")))?,
        other => return Err(Error::Corrupt(format!("chunk compression {other}"))),
    };
    if raw.len() != loc.raw_len as usize {
        return Err(damaged(format!(
            "{} bytes, {} recorded",
            raw.len(),
            loc.raw_len
        )));
    }
    if loc.crc32c.is_none() && Sha256::digest(&raw).as_slice() != id {
        return Err(damaged("bytes do not hash to the chunk's id".into()));
    }
    Ok(raw)
}

/// What a writer holds until its batch has landed: pinned chunks and
/// pending appends, let go when dropped.
struct Hold<'a> {
    chunks: &'a ChunkStore,
    pinned: HashSet<Vec<u8>>,
    appended: HashMap<u64, usize>,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if !self.pinned.is_empty() {
            let mut pins = self.chunks.pins_lock();
            for id in self.pinned.drain() {
                if let Some(n) = pins.get_mut(&id) {
                    *n -= 1;
                    if *n == 0 {
                        pins.remove(&id);
                    }
                }
            }
        }
        for (pack, n) in self.appended.drain() {
            self.chunks.packs.release(pack, n);
        }
    }
}

/// Adds chunk references in one batch; see the module docs.
pub struct ChunkWriter<'a> {
    hold: Hold<'a>,
    batch: WriteBatch,
    new_here: HashSet<Vec<u8>>,
}

impl<'a> ChunkWriter<'a> {
    /// Adds a reference to chunk `id` (the SHA-256 of `raw`), storing its
    /// bytes first if the store does not have them: zstd-compressed at
    /// `zstd_level` when given and when that saves at least 1/16.
    pub fn put(&mut self, id: &[u8], raw: &[u8], zstd_level: Option<i32>) -> Result<Put> {
        let chunks = self.hold.chunks;
        let (chunk_cf, refs_cf) = (
            chunks.cf(schema::CF_CHUNK)?,
            chunks.cf(schema::CF_CHUNK_REF)?,
        );
        self.batch.merge_cf(refs_cf, id, schema::refcount_delta(1));
        if self.new_here.contains(id) {
            return Ok(Put::Known);
        }
        // Pinned before it is looked for: see `ChunkStore::compact`.
        if self.hold.pinned.insert(id.to_vec()) {
            *chunks.pins_lock().entry(id.to_vec()).or_default() += 1;
        }
        if chunks.db.get_pinned_cf(chunk_cf, id)?.is_some() {
            return Ok(Put::Known);
        }
        let compressed = match zstd_level {
            Some(level) => {
                let c = zstd::bulk::compress(raw, level).map_err(|e| Error::io("zstd", e))?;
                (c.len() + c.len() / 16 < raw.len()).then_some(c)
            }
            None => None,
        };
        let (bytes, compression, put) = match &compressed {
            Some(c) => (
                c.as_slice(),
                schema::COMPRESSION_ZSTD,
                Put::StoredCompressed,
            ),
            None => (raw, schema::COMPRESSION_NONE, Put::StoredRaw),
        };
        let (pack, offset) = chunks.packs.append(bytes)?;
        *self.hold.appended.entry(pack).or_default() += 1;
        self.batch.put_cf(
            chunk_cf,
            id,
            schema::encode(&ChunkLoc {
                pack,
                offset,
                stored_len: bytes.len() as u32,
                raw_len: raw.len() as u32,
                compression,
                crc32c: Some(crc32c::crc32c(bytes)),
            }),
        );
        self.new_here.insert(id.to_vec());
        Ok(put)
    }

    /// The batch, for the caller's own keys.
    pub fn batch(&mut self) -> &mut WriteBatch {
        &mut self.batch
    }

    /// Syncs the packs this writer appended to. The caller writes the
    /// returned batch (synced), then drops the [`Finished`].
    pub fn finish(self) -> Result<Finished<'a>> {
        let chunks = self.hold.chunks;
        chunks.packs.sync(self.hold.appended.keys().copied())?;
        Ok(Finished {
            batch: self.batch,
            _hold: self.hold,
        })
    }
}

/// A writer's batch, its chunk bytes durable; its chunks stay pinned and
/// its appends pending until it is dropped, after the batch is written.
pub struct Finished<'a> {
    /// Chunk records, reference operands and the caller's keys.
    pub batch: WriteBatch,
    _hold: Hold<'a>,
}
