//! Pack files: append-only files of chunk bytes, `packs/<n>.pack`, mode 0600.
//!
//! One pack is active at a time; appends reserve a range under a short lock
//! and write it outside the lock, so concurrent commits append in parallel.
//! Each append counts as pending on its pack until its writer
//! [releases](Packs::release) it (after the batch that records it landed, or
//! after giving up): compaction rewrites only sealed packs with nothing
//! pending, so every chunk record pointing into them is written.
//! When the active pack is full, the appender that finds it full starts the
//! next one while it holds the lock, so a full pack never fails an append.
//! Each start opens a new pack, so nothing is ever appended after a tail that
//! a crash may have torn. Readers keep a shared handle, so a pack that
//! compaction unlinks stays readable to a read already under way.
//!
//! A new pack's number comes from the allocator the chunk layer passes in
//! (a counter in the database, written with sync before the file is
//! created), and the directory is fsynced after the file is created, before
//! anything is appended: a number is never used twice (tested by losing a
//! pack file), and the pack's entry reaches the disk before any metadata
//! points into it (placed by reading; no test cuts power yet).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::error::{Error, Result};

/// Hands out pack numbers durably: given the lowest acceptable number, it
/// returns one at least that high that was never returned before.
pub type Allocator = Box<dyn Fn(u64) -> Result<u64> + Send + Sync>;

struct Active {
    id: u64,
    file: Arc<File>,
    len: u64,
}

/// The active pack, and the appends per pack whose records may not be
/// written yet.
#[derive(Default)]
struct State {
    active: Option<Active>,
    pending: HashMap<u64, usize>,
}

/// The pack files of one store.
pub struct Packs {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    handles: RwLock<HashMap<u64, Arc<File>>>,
    allocate: Option<Allocator>,
}

fn pack_id(name: &str) -> Option<u64> {
    name.strip_suffix(".pack")?.parse().ok()
}

/// Makes the entries of directory `path` durable.
pub(crate) fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", path.display()), e))
}

/// Creates `path` (and missing parents) readable by its owner alone, and
/// makes its entry durable.
pub(crate) fn mkdir_private(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    match path.parent() {
        Some(parent) => fsync_dir(parent),
        None => Ok(()),
    }
}

impl Packs {
    /// Opens the packs in `dir`. With an allocator (writable), starts a new
    /// active pack; without one, only reads.
    pub fn open(dir: &Path, max_bytes: u64, allocate: Option<Allocator>) -> Result<Packs> {
        if allocate.is_some() {
            mkdir_private(dir)?;
        }
        let p = Packs {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1 << 20),
            state: Mutex::new(State::default()),
            handles: RwLock::new(HashMap::new()),
            allocate,
        };
        if p.allocate.is_some() {
            // The listing is a second guard beside the counter.
            let next = p.list()?.iter().map(|(id, _)| id + 1).max().unwrap_or(1);
            let mut state = p.state_lock();
            p.start_pack(&mut state, next)?;
        }
        Ok(p)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:08}.pack"))
    }

    /// Starts a new active pack numbered at least `min`, under the active
    /// lock: its number is reserved durably, the file created with mode
    /// 0600, and the directory synced, before anything can append to it.
    fn start_pack(&self, state: &mut State, min: u64) -> Result<()> {
        let allocate = self
            .allocate
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("content store is read-only".into()))?;
        let id = allocate(min)?;
        let path = self.path(id);
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .create_new(true)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| Error::io(format!("create {}", path.display()), e))?,
        );
        fsync_dir(&self.dir)?;
        self.handles_write().insert(id, file.clone());
        state.active = Some(Active { id, file, len: 0 });
        Ok(())
    }

    fn state_lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handles_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<File>>> {
        self.handles.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Every pack on disk with its size.
    pub fn list(&self) -> Result<Vec<(u64, u64)>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("read {}", self.dir.display()), e)),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            if let Some(id) = pack_id(&e.file_name().to_string_lossy()) {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((id, len));
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The active pack's number.
    pub fn active_id(&self) -> Option<u64> {
        self.state_lock().active.as_ref().map(|a| a.id)
    }

    /// Seals the active pack (unless nothing was appended to it yet) and
    /// returns every sealed pack with nothing pending, with its size.
    pub fn seal_idle(&self) -> Result<Vec<(u64, u64)>> {
        let mut state = self.state_lock();
        let (id, len) = match state.active.as_ref() {
            Some(a) => (a.id, a.len),
            None => {
                return Err(Error::FailedPrecondition(
                    "content store is read-only".into(),
                ))
            }
        };
        if len > 0 {
            self.start_pack(&mut state, id + 1)?;
        }
        let active = state.active.as_ref().map(|a| a.id);
        Ok(self
            .list()?
            .into_iter()
            .filter(|(id, _)| Some(*id) != active && !state.pending.contains_key(id))
            .collect())
    }

    /// Appends `data`; returns (pack, offset). Not durable until
    /// [`Packs::sync`]; pending until [`Packs::release`].
    pub fn append(&self, data: &[u8]) -> Result<(u64, u64)> {
        let (id, file, offset) = {
            let mut state = self.state_lock();
            let full = match state.active.as_ref() {
                Some(a) => a.len > 0 && a.len + data.len() as u64 > self.max_bytes,
                None => {
                    return Err(Error::FailedPrecondition(
                        "content store is read-only".into(),
                    ))
                }
            };
            if full {
                let next = state.active.as_ref().map(|a| a.id + 1).unwrap_or(1);
                self.start_pack(&mut state, next)?;
            }
            let a = state
                .active
                .as_mut()
                .ok_or_else(|| Error::FailedPrecondition("content store is read-only".into()))?;
            let offset = a.len;
            a.len += data.len() as u64;
            let (id, file) = (a.id, a.file.clone());
            *state.pending.entry(id).or_default() += 1;
            (id, file, offset)
        };
        file.write_all_at(data, offset)
            .map_err(|e| Error::io(format!("write pack {id}"), e))?;
        Ok((id, offset))
    }

    /// Ends `n` appends to pack `id` as pending: their records are written,
    /// or never will be.
    pub fn release(&self, id: u64, n: usize) {
        let mut state = self.state_lock();
        if let Some(left) = state.pending.get_mut(&id) {
            *left = left.saturating_sub(n);
            if *left == 0 {
                state.pending.remove(&id);
            }
        }
    }

    fn handle(&self, id: u64) -> Result<Arc<File>> {
        if let Some(f) = self
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(f.clone());
        }
        // Opened under the write lock, which `remove` unlinks under: a
        // handle in the map always has a name on disk, so a removed pack's
        // space is never held by the cache.
        let mut handles = self.handles_write();
        if let Some(f) = handles.get(&id) {
            return Ok(f.clone());
        }
        let path = self.path(id);
        let f = Arc::new(File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!("pack {}", path.display()))
            } else {
                Error::io(format!("open {}", path.display()), e)
            }
        })?);
        handles.insert(id, f.clone());
        Ok(f)
    }

    /// Makes every append to these packs durable.
    pub fn sync(&self, ids: impl IntoIterator<Item = u64>) -> Result<()> {
        for id in ids {
            self.handle(id)?
                .sync_data()
                .map_err(|e| Error::io(format!("sync pack {id}"), e))?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of pack `id`. NotFound if the pack is
    /// gone; DataLoss if it ends before the range does.
    pub fn read(&self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
        let f = self.handle(id)?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::DataLoss(format!("pack {id} ends before {} bytes at {offset}", len))
            } else {
                Error::io(format!("read pack {id} at {offset}"), e)
            }
        })?;
        Ok(buf)
    }

    /// Deletes a sealed pack. Reads holding its handle finish.
    pub fn remove(&self, id: u64) -> Result<()> {
        if self.active_id() == Some(id) {
            return Err(Error::FailedPrecondition(format!("pack {id} is active")));
        }
        let mut handles = self.handles_write();
        handles.remove(&id);
        std::fs::remove_file(self.path(id)).map_err(|e| Error::io(format!("remove pack {id}"), e))
    }
}
