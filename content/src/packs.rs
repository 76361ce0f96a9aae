//! Pack files: append-only files of chunk bytes, `packs/<n>.pack`.
//!
//! One pack is active at a time; appends reserve a range under a short lock
//! and write it outside the lock, so concurrent commits append in parallel.
//! Each start opens a new pack, so nothing is ever appended after a tail that
//! a crash may have torn. Readers keep a shared handle, so a pack that
//! compaction unlinks stays readable to a read already under way.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, Result};

struct Active {
    id: u64,
    file: Arc<File>,
    len: u64,
}

/// The pack files of one store.
pub struct Packs {
    dir: PathBuf,
    max_bytes: u64,
    active: Mutex<Option<Active>>,
    handles: RwLock<HashMap<u64, Arc<File>>>,
}

fn pack_id(name: &str) -> Option<u64> {
    name.strip_suffix(".pack")?.parse().ok()
}

impl Packs {
    /// Opens the packs in `dir`; `writable` starts a new active pack.
    pub fn open(dir: &Path, max_bytes: u64, writable: bool) -> Result<Packs> {
        if writable {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let p = Packs {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1 << 20),
            active: Mutex::new(None),
            handles: RwLock::new(HashMap::new()),
        };
        if writable {
            let next = p.list()?.iter().map(|(id, _)| id + 1).max().unwrap_or(1);
            p.start_pack(next)?;
        }
        Ok(p)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:08}.pack"))
    }

    fn start_pack(&self, id: u64) -> Result<()> {
        let path = self.path(id);
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .create_new(true)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(format!("create {}", path.display()), e))?,
        );
        self.handles_write().insert(id, file.clone());
        *self.active_lock() = Some(Active { id, file, len: 0 });
        Ok(())
    }

    fn active_lock(&self) -> std::sync::MutexGuard<'_, Option<Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
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
        self.active_lock().as_ref().map(|a| a.id)
    }

    /// Seals the active pack and starts a new one.
    pub fn rotate(&self) -> Result<()> {
        let next = match self.active_lock().as_ref() {
            Some(a) => a.id + 1,
            None => {
                return Err(Error::FailedPrecondition(
                    "content store is read-only".into(),
                ))
            }
        };
        self.start_pack(next)
    }

    /// Appends `data`; returns (pack, offset). Not durable until [`Packs::sync`].
    pub fn append(&self, data: &[u8]) -> Result<(u64, u64)> {
        let (id, file, offset) = {
            let mut guard = self.active_lock();
            let full = guard
                .as_ref()
                .is_some_and(|a| a.len > 0 && a.len + data.len() as u64 > self.max_bytes);
            if full {
                let next = guard.as_ref().map(|a| a.id + 1).unwrap_or(1);
                drop(guard);
                self.start_pack(next)?;
                guard = self.active_lock();
            }
            let a = guard
                .as_mut()
                .ok_or_else(|| Error::FailedPrecondition("content store is read-only".into()))?;
            let offset = a.len;
            a.len += data.len() as u64;
            (a.id, a.file.clone(), offset)
        };
        file.write_all_at(data, offset)
            .map_err(|e| Error::io(format!("write pack {id}"), e))?;
        Ok((id, offset))
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
        let path = self.path(id);
        let f = Arc::new(File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!("pack {}", path.display()))
            } else {
                Error::io(format!("open {}", path.display()), e)
            }
        })?);
        self.handles_write().insert(id, f.clone());
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

    /// Reads `len` bytes at `offset` of pack `id`.
    pub fn read(&self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
        let f = self.handle(id)?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io(format!("read pack {id} at {offset}"), e))?;
        Ok(buf)
    }

    /// Deletes a sealed pack. Reads holding its handle finish.
    pub fn remove(&self, id: u64) -> Result<()> {
        if self.active_id() == Some(id) {
            return Err(Error::FailedPrecondition(format!("pack {id} is active")));
        }
        self.handles_write().remove(&id);
        std::fs::remove_file(self.path(id)).map_err(|e| Error::io(format!("remove pack {id}"), e))
    }
}
