//! Verified chunks of a lazy layer: from the on-disk cache, or fetched by
//! range request, checked against their `chunkDigest`, and cached.
//!
//! The cache ([`ChunkCache`]) is content-addressed by chunk digest within
//! a scope (the layer's registry repository), so a chunk that two layers or
//! two images of one repository share is fetched and stored once, and an
//! image can never be served another repository's chunk by naming its
//! digest. It holds only verified bytes (written to a unique temporary
//! name, then renamed), re-checks every chunk it reads back from disk, and
//! evicts the least recently used chunks past its size limit.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::estargz::{hex, parse_hex32, Chunk, Kind, Toc};

/// Reads byte ranges of one layer blob (HTTP range requests, in strata).
pub trait RangeReader: Send + Sync {
    /// `len` bytes from `offset`.
    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>>;
}

struct CacheState {
    /// digest → (size, last use).
    entries: HashMap<[u8; 32], (u64, u64)>,
    /// last use → digest.
    lru: BTreeMap<u64, [u8; 32]>,
    total: u64,
    tick: u64,
}

/// Verified chunks on disk, by digest, at most `limit` bytes.
pub struct ChunkCache {
    dir: PathBuf,
    limit: u64,
    state: Mutex<CacheState>,
}

impl ChunkCache {
    /// Opens (creates) the cache in `dir`, keeping what an earlier run
    /// left there (temporary files of an interrupted write are removed).
    pub fn open(dir: &Path, limit: u64) -> std::io::Result<ChunkCache> {
        std::fs::create_dir_all(dir)?;
        let mut st = CacheState {
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            total: 0,
            tick: 0,
        };
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(d) = parse_hex32(&name) else {
                let _ = std::fs::remove_file(e.path());
                continue;
            };
            let size = e.metadata()?.len();
            st.tick += 1;
            st.entries.insert(d, (size, st.tick));
            st.lru.insert(st.tick, d);
            st.total += size;
        }
        let c = ChunkCache {
            dir: dir.to_path_buf(),
            limit,
            state: Mutex::new(st),
        };
        c.evict();
        Ok(c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, d: &[u8; 32]) -> PathBuf {
        self.dir.join(hex(d))
    }

    /// The cache key of chunk `d` in `scope`.
    pub fn key(scope: &str, d: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(scope.as_bytes());
        h.update([0u8]);
        h.update(d);
        h.finalize().into()
    }

    /// Whether `key` is cached.
    pub fn contains(&self, key: &[u8; 32]) -> bool {
        self.lock().entries.contains_key(key)
    }

    /// Marks `key` as just used; `None` if it is not cached.
    fn touch(&self, key: &[u8; 32]) -> Option<()> {
        let mut st = self.lock();
        let (_, used) = st.entries.get(key).copied()?;
        st.tick += 1;
        let tick = st.tick;
        st.lru.remove(&used);
        st.lru.insert(tick, *key);
        if let Some(e) = st.entries.get_mut(key) {
            e.1 = tick;
        }
        Some(())
    }

    /// The bytes cached under `key` if they are still chunk `d`.
    pub fn get(&self, key: &[u8; 32], d: &[u8; 32]) -> Option<Vec<u8>> {
        self.touch(key)?;
        match std::fs::read(self.path(key)) {
            Ok(b) if Sha256::digest(&b).as_slice() == d => Some(b),
            Ok(_) => {
                tracing::warn!(chunk = %hex(d), "cached chunk damaged: dropped, fetching again");
                self.forget(key);
                None
            }
            Err(_) => {
                self.forget(key);
                None
            }
        }
    }

    /// Keeps verified bytes under `key`.
    pub fn put(&self, key: &[u8; 32], data: &[u8]) {
        if let Err(e) = self.put_with(key, |f| f.write_all(data).map(|()| data.len() as u64)) {
            tracing::warn!(error = %e, "not caching a chunk");
        }
    }

    /// Keeps under `key` the verified bytes that `write` writes to a new
    /// file (returning how many): written to a unique temporary name, then
    /// renamed into place.
    pub fn put_with(
        &self,
        key: &[u8; 32],
        write: impl FnOnce(&mut std::fs::File) -> std::io::Result<u64>,
    ) -> std::io::Result<()> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        if self.lock().entries.contains_key(key) {
            return Ok(());
        }
        let path = self.path(key);
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}-{}",
            hex(key),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            let n = write(&mut f)?;
            std::fs::rename(&tmp, &path)?;
            Ok(n)
        })();
        let len = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        {
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            match st.entries.insert(*key, (len, tick)) {
                None => st.total += len,
                // Put twice at once: one entry (the last file renamed into
                // place), its newest tick.
                Some((old_len, old)) => {
                    st.lru.remove(&old);
                    st.total = st.total - old_len + len;
                }
            }
            st.lru.insert(tick, *key);
        }
        self.evict();
        Ok(())
    }

    /// The file cached under `key`, open for reading (counts as a use).
    /// Unchecked: the caller verifies what it reads.
    pub fn open_entry(&self, key: &[u8; 32]) -> Option<std::fs::File> {
        self.touch(key)?;
        match std::fs::File::open(self.path(key)) {
            Ok(f) => Some(f),
            Err(_) => {
                self.forget(key);
                None
            }
        }
    }

    /// Drops the entry under `key` (its bytes were found damaged).
    pub fn drop_entry(&self, key: &[u8; 32]) {
        self.forget(key);
    }

    fn forget(&self, key: &[u8; 32]) {
        let mut st = self.lock();
        if let Some((size, used)) = st.entries.remove(key) {
            st.lru.remove(&used);
            st.total -= size;
            // Under the lock: a put of the same key cannot come between.
            let _ = std::fs::remove_file(self.path(key));
        }
    }

    fn evict(&self) {
        let mut st = self.lock();
        while st.total > self.limit {
            let Some((&used, &key)) = st.lru.iter().next() else {
                return;
            };
            st.lru.remove(&used);
            if let Some((size, _)) = st.entries.remove(&key) {
                st.total -= size;
            }
            // Under the lock, so that a put of the same key that renames a
            // new file into place cannot come between.
            let _ = std::fs::remove_file(self.path(&key));
        }
    }

    /// Bytes held.
    pub fn size(&self) -> u64 {
        self.lock().total
    }
}

/// Why a chunk could not be served.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The registry did not give it.
    #[error("fetching {path:?} at {offset}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Offset in the file.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
    /// Its bytes were not what the TOC says, twice.
    #[error(transparent)]
    Corrupt(#[from] crate::estargz::Error),
}

/// A fetch of one chunk in flight, that concurrent readers wait for.
#[derive(Default)]
struct InFlight {
    done: Mutex<Option<Result<Arc<Vec<u8>>, String>>>,
    cv: std::sync::Condvar,
}

/// Decoded chunks kept in memory per layer.
const RECENT_CHUNKS: usize = 4;

/// A file of one chunk up to this size is checked when it is opened; a
/// larger one by [`Layer::prepare_whole`] in the background.
pub const QUICK_CHECK: u64 = 4 << 20;

/// A read that misses fetches the chunks after its own in the blob too, up
/// to this many compressed bytes in one range request.
pub const READ_WINDOW: u64 = 1 << 20;

/// The last chunks read, by digest.
type Recent = std::collections::VecDeque<([u8; 32], Arc<Vec<u8>>)>;

/// Publishes the leader's result to the followers of a chunk fetch, and
/// ends the flight, whatever happens to the leader.
struct FlightGuard<'l> {
    layer: &'l Layer,
    digest: [u8; 32],
    flight: Arc<InFlight>,
    result: Option<Result<Arc<Vec<u8>>, String>>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        *self.flight.done.lock().unwrap_or_else(|p| p.into_inner()) = self.result.take();
        self.flight.cv.notify_all();
        self.layer
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.digest);
    }
}

/// One lazy layer: its TOC, where its bytes come from, and the cache.
pub struct Layer {
    toc: Arc<Toc>,
    reader: Arc<dyn RangeReader>,
    cache: Arc<ChunkCache>,
    /// The cache scope (the layer's registry repository).
    scope: String,
    /// The last chunks read, decoded and checked: sequential reads of a
    /// chunk in 128 KiB pieces read and check it once.
    recent: Mutex<Recent>,
    fetched: AtomicU64,
    /// Every chunk by where it starts in the blob: (offset, node, index).
    order: Vec<(u64, usize, usize)>,
    /// Chunks being fetched, by digest: one fetch however many readers.
    inflight: Mutex<HashMap<[u8; 32], Arc<InFlight>>>,
    /// Set when the layer goes: background work stops.
    cancelled: std::sync::atomic::AtomicBool,
    /// Files whose whole-file cache entry was checked in this run, with
    /// the (device, inode) of the file that was checked.
    verified: Mutex<HashMap<usize, (u64, u64)>>,
}

impl Layer {
    /// A layer over `toc`, reading its blob through `reader`, caching its
    /// chunks in `cache` under `scope` (its registry repository).
    pub fn new(
        toc: Arc<Toc>,
        reader: Arc<dyn RangeReader>,
        cache: Arc<ChunkCache>,
        scope: &str,
    ) -> Layer {
        let mut order: Vec<(u64, usize, usize)> = toc
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(n, node)| {
                node.chunks
                    .iter()
                    .enumerate()
                    .map(move |(i, c)| (c.blob_offset, n, i))
            })
            .collect();
        order.sort_unstable();
        order.dedup_by_key(|e| e.0);
        Layer {
            toc,
            reader,
            cache,
            scope: scope.to_string(),
            recent: Mutex::new(std::collections::VecDeque::new()),
            fetched: AtomicU64::new(0),
            inflight: Mutex::new(HashMap::new()),
            order,
            cancelled: std::sync::atomic::AtomicBool::new(false),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The TOC.
    pub fn toc(&self) -> &Toc {
        &self.toc
    }

    /// Compressed bytes fetched from the registry so far.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// The verified bytes of chunk `i` of node `node`: from the cache, or
    /// fetched (once, however many readers ask at the same time).
    pub fn chunk(&self, node: usize, i: usize) -> Result<Arc<Vec<u8>>, FetchError> {
        let c = &self.toc.nodes[node].chunks[i];
        if let Some(b) = self.recent_get(&c.digest) {
            return Ok(b);
        }
        let key = ChunkCache::key(&self.scope, &c.digest);
        if let Some(b) = self.cache.get(&key, &c.digest) {
            // (Same digest, same bytes, same length: checked anyway.)
            if b.len() as u64 == c.size {
                let b = Arc::new(b);
                self.recent_put(c.digest, b.clone());
                return Ok(b);
            }
        }
        let (flight, leader) = {
            let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match m.get(&c.digest) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(InFlight::default());
                    m.insert(c.digest, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            let mut g = flight.done.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(r) = g.as_ref() {
                    return r.clone().map_err(|msg| FetchError::Io {
                        path: self.toc.path(node),
                        offset: c.file_offset,
                        source: std::io::Error::other(msg),
                    });
                }
                g = flight.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
        // Followers are answered even if this thread unwinds.
        let mut guard = FlightGuard {
            layer: self,
            digest: c.digest,
            flight,
            result: Some(Err("the fetch was abandoned".into())),
        };
        let r = self.fetch_verified(node, c).map(Arc::new);
        if let Ok(b) = &r {
            self.recent_put(c.digest, b.clone());
        }
        guard.result = Some(r.as_ref().map(Arc::clone).map_err(|e| e.to_string()));
        drop(guard);
        r
    }

    /// Chunk `i` of `node` if it is in memory or in the cache (checked);
    /// never fetched.
    fn cached_chunk(&self, node: usize, i: usize) -> Option<Arc<Vec<u8>>> {
        let c = &self.toc.nodes[node].chunks[i];
        if let Some(b) = self.recent_get(&c.digest) {
            return Some(b);
        }
        self.cache
            .get(&ChunkCache::key(&self.scope, &c.digest), &c.digest)
            .filter(|b| b.len() as u64 == c.size)
            .map(Arc::new)
    }

    /// Whether every chunk of `node` is in memory or in the cache.
    pub fn fully_cached(&self, node: usize) -> bool {
        let n = &self.toc.nodes[node];
        !n.chunks.is_empty()
            && n.chunks.iter().all(|c| {
                self.recent_get(&c.digest).is_some()
                    || self
                        .cache
                        .contains(&ChunkCache::key(&self.scope, &c.digest))
            })
    }

    /// The cache key of file `node` whole: its chunk's key if it has one
    /// chunk, else a key of its chunk list, in a domain of its own (no
    /// chunk's key can be a whole file's).
    fn whole_key(&self, node: usize) -> [u8; 32] {
        let n = &self.toc.nodes[node];
        if let [c] = n.chunks.as_slice() {
            return ChunkCache::key(&self.scope, &c.digest);
        }
        let mut h = Sha256::new();
        for c in &n.chunks {
            h.update(c.file_offset.to_le_bytes());
            h.update(c.size.to_le_bytes());
            h.update(c.digest);
        }
        let list: [u8; 32] = h.finalize().into();
        let mut k = Sha256::new();
        k.update(self.scope.as_bytes());
        k.update([1u8]);
        k.update(list);
        k.finalize().into()
    }

    /// Whether `f` holds exactly the chunks of `node`, each as its digest
    /// says.
    fn check_whole(&self, node: usize, f: &std::fs::File) -> bool {
        use std::os::unix::fs::FileExt as _;
        let n = &self.toc.nodes[node];
        if f.metadata().map(|m| m.len()).ok() != Some(n.size) {
            return false;
        }
        let mut buf = Vec::new();
        n.chunks.iter().all(|c| {
            buf.resize(c.size as usize, 0);
            f.read_exact_at(&mut buf, c.file_offset).is_ok()
                && Sha256::digest(&buf).as_slice() == c.digest
        })
    }

    fn file_id(f: &std::fs::File) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        f.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    /// The whole-file entry of `node`, open, if it is the very file that
    /// was checked in this run.
    fn checked_entry(&self, node: usize) -> Option<std::fs::File> {
        // No open and stat of the cache for a file never checked (most
        // opens of a layer not yet fetched).
        let want = *self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)?;
        let f = self.cache.open_entry(&self.whole_key(node))?;
        (Self::file_id(&f)? == want).then_some(f)
    }

    /// Checks `f` (the entry under `key`) as file `node`: remembered as
    /// checked if it passes, dropped from the cache if not.
    fn check_entry(&self, node: usize, key: &[u8; 32], f: std::fs::File) -> Option<std::fs::File> {
        let id = Self::file_id(&f)?;
        if self.check_whole(node, &f) {
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node, id);
            return Some(f);
        }
        tracing::warn!(path = %self.toc.path(node), "cached file damaged: dropped");
        self.cache.drop_entry(key);
        None
    }

    /// Regular file `node` whole, as a checked file of the cache, if that
    /// is quick: its entry was checked in this run, or it is one chunk of
    /// at most [`QUICK_CHECK`] bytes, checked now. What FUSE passthrough
    /// reads. Nothing is fetched or put together here
    /// ([`Layer::prepare_whole`] does that).
    pub fn whole_file(&self, node: usize) -> Option<std::fs::File> {
        let n = &self.toc.nodes[node];
        if n.kind != Kind::File || n.chunks.is_empty() {
            return None;
        }
        if let Some(f) = self.checked_entry(node) {
            return Some(f);
        }
        match n.chunks.as_slice() {
            [c] if c.size <= QUICK_CHECK => {
                let key = self.whole_key(node);
                let f = self.cache.open_entry(&key)?;
                self.check_entry(node, &key, f)
            }
            _ => None,
        }
    }

    /// Makes file `node` ready for [`Layer::whole_file`], however long
    /// that takes (for a background worker): checks its whole-file entry,
    /// or, if every chunk is cached, puts it together from them (each
    /// checked as it is read). Nothing is fetched. Whether it is ready.
    pub fn prepare_whole(&self, node: usize) -> bool {
        let n = &self.toc.nodes[node];
        if n.kind != Kind::File || n.chunks.is_empty() || self.is_cancelled() {
            return false;
        }
        if self.checked_entry(node).is_some() {
            return true;
        }
        let key = self.whole_key(node);
        if let Some(f) = self.cache.open_entry(&key) {
            return self.check_entry(node, &key, f).is_some();
        }
        if n.chunks.len() == 1 || !self.fully_cached(node) {
            return false;
        }
        let put = self.cache.put_with(&key, |f| {
            let mut len = 0;
            for i in 0..n.chunks.len() {
                if self.is_cancelled() {
                    return Err(std::io::Error::other("the layer is going away"));
                }
                let b = self
                    .cached_chunk(node, i)
                    .ok_or_else(|| std::io::Error::other("a chunk left the cache"))?;
                f.write_all(&b)?;
                len += b.len() as u64;
            }
            Ok(len)
        });
        if let Err(e) = put {
            tracing::debug!(path = %self.toc.path(node), error = %e, "file not put together");
            return false;
        }
        // Put together from checked chunks: this file is the one checked.
        match self.cache.open_entry(&key) {
            Some(f) => match Self::file_id(&f) {
                Some(id) => {
                    self.verified
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(node, id);
                    true
                }
                None => false,
            },
            None => false,
        }
    }

    fn recent_get(&self, d: &[u8; 32]) -> Option<Arc<Vec<u8>>> {
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().find(|(k, _)| k == d).map(|(_, b)| b.clone())
    }

    fn recent_put(&self, d: [u8; 32], b: Arc<Vec<u8>>) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.iter().any(|(k, _)| *k == d) {
            return;
        }
        if r.len() >= RECENT_CHUNKS {
            r.pop_front();
        }
        r.push_back((d, b));
    }

    fn fetch_verified(&self, node: usize, c: &Chunk) -> Result<Vec<u8>, FetchError> {
        let path = self.toc.path(node);
        // First with its neighbours (small files come in runs: one range
        // request for up to READ_WINDOW of them), then once more alone.
        let gz_window = self.fetch_window(c)?;
        let mut first = Some(gz_window);
        let mut tries = 0;
        loop {
            let gz = match first.take() {
                Some(g) => g,
                None => self.fetch(&path, c)?,
            };
            match self.toc.decode_chunk(&path, c, &gz) {
                Ok(data) => {
                    self.cache
                        .put(&ChunkCache::key(&self.scope, &c.digest), &data);
                    return Ok(data);
                }
                Err(e) if tries == 0 => {
                    tracing::warn!(error = %e, "chunk failed its check: fetching it once more");
                    tries += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "chunk failed its check twice: EIO");
                    return Err(e.into());
                }
            }
        }
    }

    /// Fetches `c` together with the uncached chunks that follow it in the
    /// blob, up to [`READ_WINDOW`] bytes in one range request; caches the
    /// neighbours that pass their check and returns `c`'s compressed bytes.
    fn fetch_window(&self, c: &Chunk) -> Result<Vec<u8>, FetchError> {
        let at = self.order.partition_point(|&(o, _, _)| o < c.blob_offset);
        let uncached = |d: &[u8; 32]| !self.cache.contains(&ChunkCache::key(&self.scope, d));
        // Files are read in directory order, not blob order: take the
        // uncached chunks before this one too (half the window), then after.
        let mut start = c.blob_offset;
        let mut members: Vec<(usize, usize)> = Vec::new();
        for &(o, n, i) in self.order[..at].iter().rev() {
            let prev = &self.toc.nodes[n].chunks[i];
            if prev.blob_end != start || c.blob_end - o > READ_WINDOW / 2 || !uncached(&prev.digest)
            {
                break;
            }
            start = o;
            members.push((n, i));
        }
        let mut end = c.blob_end;
        for &(o, n, i) in self.order.iter().skip(at + 1) {
            let next = &self.toc.nodes[n].chunks[i];
            if o != end || next.blob_end - start > READ_WINDOW || !uncached(&next.digest) {
                break;
            }
            end = next.blob_end;
            members.push((n, i));
        }
        let t = std::time::Instant::now();
        let bytes = self
            .reader
            .read_range(start, end - start)
            .map_err(|source| FetchError::Io {
                path: String::new(),
                offset: c.file_offset,
                source,
            })?;
        let fetch_us = t.elapsed().as_micros() as u64;
        self.fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let t = std::time::Instant::now();
        let neighbours = members.len();
        self.cache_run(&bytes, start, &members);
        tracing::debug!(
            offset = start,
            bytes = bytes.len(),
            neighbours,
            fetch_us,
            cache_us = t.elapsed().as_micros() as u64,
            "read miss fetched"
        );
        let (lo, hi) = (
            (c.blob_offset - start) as usize,
            (c.blob_end - start) as usize,
        );
        Ok(bytes.get(lo..hi).map(<[u8]>::to_vec).unwrap_or_default())
    }

    /// Decodes, checks and caches the chunks `members` out of `bytes`, the
    /// blob's bytes from `start`; one that fails its check is not cached
    /// (it is fetched alone, and checked, when it is read).
    fn cache_run(&self, bytes: &[u8], start: u64, members: &[(usize, usize)]) {
        for &(n, i) in members {
            let c = &self.toc.nodes[n].chunks[i];
            let (lo, hi) = (
                (c.blob_offset - start) as usize,
                (c.blob_end - start) as usize,
            );
            let p = self.toc.path(n);
            match bytes.get(lo..hi).map(|gz| self.toc.decode_chunk(&p, c, gz)) {
                Some(Ok(data)) => self
                    .cache
                    .put(&ChunkCache::key(&self.scope, &c.digest), &data),
                _ => tracing::warn!(path = %p, "fetched chunk failed its check: not cached"),
            }
        }
    }

    /// Stops background work on this layer (it is going away).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Whether [`Layer::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    fn fetch(&self, path: &str, c: &Chunk) -> Result<Vec<u8>, FetchError> {
        let len = c.blob_end - c.blob_offset;
        let b = self
            .reader
            .read_range(c.blob_offset, len)
            .map_err(|source| FetchError::Io {
                path: path.to_string(),
                offset: c.file_offset,
                source,
            })?;
        self.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b)
    }

    /// Fetches every chunk whose data starts before `end` in the blob (the
    /// prefetch landmark) and is not cached, neighbouring chunks in one
    /// range request of at most `max_request` bytes, checks and caches
    /// them. Returns how many chunks were fetched.
    pub fn prefetch(&self, end: u64, max_request: u64) -> Result<usize, FetchError> {
        self.fetch_runs(end, max_request, 0)
    }

    /// Fetches the rest of the layer (every chunk not cached) at about
    /// `bytes_per_sec` (0: no limit), stopping early if the layer is
    /// cancelled. Returns how many chunks were fetched.
    pub fn fetch_all(&self, max_request: u64, bytes_per_sec: u64) -> Result<usize, FetchError> {
        self.fetch_runs(u64::MAX, max_request, bytes_per_sec)
    }

    fn fetch_runs(&self, end: u64, max_request: u64, rate: u64) -> Result<usize, FetchError> {
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        for (n, node) in self.toc.nodes.iter().enumerate() {
            for (i, c) in node.chunks.iter().enumerate() {
                if c.blob_offset < end
                    && !self
                        .cache
                        .contains(&ChunkCache::key(&self.scope, &c.digest))
                {
                    wanted.push((n, i));
                }
            }
        }
        wanted.sort_by_key(|&(n, i)| self.toc.nodes[n].chunks[i].blob_offset);
        wanted.dedup_by_key(|&mut (n, i)| self.toc.nodes[n].chunks[i].blob_offset);
        let started = std::time::Instant::now();
        let mut sent = 0u64;
        let mut fetched = 0;
        let mut at = 0;
        while at < wanted.len() {
            if self.is_cancelled() {
                break;
            }
            // A run of chunks whose ranges touch, up to max_request.
            let first = &self.toc.nodes[wanted[at].0].chunks[wanted[at].1];
            let (start, mut end_off) = (first.blob_offset, first.blob_end);
            let mut stop = at + 1;
            while stop < wanted.len() {
                let c = &self.toc.nodes[wanted[stop].0].chunks[wanted[stop].1];
                if c.blob_offset != end_off || c.blob_end - start > max_request {
                    break;
                }
                end_off = c.blob_end;
                stop += 1;
            }
            let path = self.toc.path(wanted[at].0);
            let bytes = self
                .reader
                .read_range(start, end_off - start)
                .map_err(|source| FetchError::Io {
                    path: path.clone(),
                    offset: first.file_offset,
                    source,
                })?;
            self.fetched
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.cache_run(&bytes, start, &wanted[at..stop]);
            fetched += stop - at;
            at = stop;
            // Hold the rate: wait until the bytes so far are due.
            sent += end_off - start;
            if rate > 0 {
                let due = std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
                while let Some(wait) = due.checked_sub(started.elapsed()) {
                    if self.is_cancelled() {
                        break;
                    }
                    std::thread::sleep(wait.min(std::time::Duration::from_millis(100)));
                }
            }
        }
        Ok(fetched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    /// Counts range reads, each slow enough for readers to overlap.
    struct Slow {
        blob: Vec<u8>,
        reads: AtomicU64,
    }

    impl RangeReader for Slow {
        fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(100));
            Ok(self.blob[offset as usize..(offset + len) as usize].to_vec())
        }
    }

    #[test]
    fn concurrent_readers_of_a_chunk_share_one_fetch() -> std::io::Result<()> {
        let data = vec![7u8; 100_000];
        let (toc, blob) = crate::estargz::tests_layer(&[("f", vec![data.clone()])])?;
        let dir = std::env::temp_dir().join(format!("strata-flight-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let reader = Arc::new(Slow {
            blob,
            reads: AtomicU64::new(0),
        });
        let layer = Arc::new(Layer::new(
            Arc::new(toc),
            reader.clone(),
            Arc::new(ChunkCache::open(&dir, 1 << 20)?),
            "repo",
        ));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let l = layer.clone();
                std::thread::spawn(move || l.chunk(1, 0).map(|b| b.to_vec()))
            })
            .collect();
        for r in readers {
            let got = r
                .join()
                .map_err(|_| std::io::Error::other("reader panicked"))?;
            assert_eq!(got.map_err(std::io::Error::other)?, data);
        }
        assert_eq!(
            reader.reads.load(Ordering::SeqCst),
            1,
            "one fetch for 4 readers"
        );
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn the_cache_keeps_to_its_limit_least_recently_used_out_first() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("strata-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = ChunkCache::open(&dir, 3000)?;
        let chunks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1000]).collect();
        let keys: Vec<[u8; 32]> = chunks
            .iter()
            .map(|b| ChunkCache::key("repo", &digest(b)))
            .collect();
        for (k, b) in keys.iter().zip(&chunks).take(3) {
            c.put(k, b);
        }
        // Chunk 0 used again: chunk 1 is now the oldest.
        assert!(c.get(&keys[0], &digest(&chunks[0])).is_some());
        c.put(&keys[3], &chunks[3]);
        assert_eq!(c.size(), 3000);
        assert!(
            c.get(&keys[1], &digest(&chunks[1])).is_none(),
            "LRU chunk evicted"
        );
        for i in [0, 2, 3] {
            assert_eq!(
                c.get(&keys[i], &digest(&chunks[i])).as_deref(),
                Some(&chunks[i][..])
            );
        }
        // Put twice: still one entry.
        c.put(&keys[3], &chunks[3]);
        assert_eq!(c.size(), 3000);
        // Another scope does not see these chunks.
        let other = ChunkCache::key("other-repo", &digest(&chunks[0]));
        assert!(c.get(&other, &digest(&chunks[0])).is_none());
        // A damaged file is dropped, never returned.
        std::fs::write(c.path(&keys[2]), vec![9u8; 1000])?;
        assert!(c.get(&keys[2], &digest(&chunks[2])).is_none());
        assert_eq!(c.size(), 2000);
        // Reopened: what is on disk is known again.
        drop(c);
        let c = ChunkCache::open(&dir, 3000)?;
        assert_eq!(c.size(), 2000);
        assert!(c.get(&keys[0], &digest(&chunks[0])).is_some());
        std::fs::remove_dir_all(&dir)
    }
}
