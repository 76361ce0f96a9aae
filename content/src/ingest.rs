//! Ingests: the bytes of a blob being written, before its commit. Each ref
//! has a file `ingest/<sha256(ref)>` (mode 0600) and a record in the
//! `ingest` column family; one writer at a time holds a ref. A writer keeps
//! a running SHA-256, so Commit knows the digest without reading the file
//! again; a resumed ingest (also after a restart) re-hashes its file first.
//! Commit hands the file to the blob layer ([`crate::store`]).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use rocksdb::IteratorMode;
use sha2::{Digest, Sha256};
use strata_proto::filters::{Adaptor, Filter};

use crate::error::{Error, Result};
use crate::schema::{self, IngestRecord};
use crate::store::{sha256_digest, validate_digest, Inner};

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

impl Inner {
    /// Takes the ref's writer lock. A writer that just closed its stream may
    /// still be letting go (containerd's client does not wait for that), so
    /// wait up to a second, as containerd's local store does, before
    /// answering Unavailable.
    pub(crate) fn lock_ref(&self, reference: &str) -> Result<()> {
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

    pub(crate) fn unlock_ref(&self, reference: &str) {
        self.locked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(reference);
        self.unlocked.notify_all();
    }

    pub(crate) fn ingest_path(&self, reference: &str) -> PathBuf {
        self.ingest_dir
            .join(format!("{:x}", Sha256::digest(reference.as_bytes())))
    }

    /// At start: ingest files without a record and records without a file
    /// are dropped (what a crash between the two leaves).
    pub(crate) fn recover(&self) -> Result<()> {
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

    pub(crate) fn ingest_record(&self, reference: &str) -> Result<Option<IngestRecord>> {
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

    pub(crate) fn status(&self, reference: &str) -> Result<Status> {
        let r = self
            .ingest_record(reference)?
            .ok_or_else(|| Error::NotFound(format!("ingest {reference:?}")))?;
        Ok(self.status_of(reference, &r))
    }

    pub(crate) fn list_statuses(&self, filter: &Filter) -> Result<Vec<Status>> {
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

    pub(crate) fn abort(&self, reference: &str) -> Result<()> {
        if self.ingest_record(reference)?.is_none() {
            return Err(Error::NotFound(format!("ingest {reference:?}")));
        }
        self.drop_ingest(reference)
    }

    pub(crate) fn drop_ingest(&self, reference: &str) -> Result<()> {
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
    pub(crate) fn open(
        inner: Arc<Inner>,
        reference: &str,
        total: i64,
        expected: &str,
    ) -> Result<Writer> {
        if reference.is_empty() {
            return Err(Error::InvalidArgument("ref must not be empty".into()));
        }
        strata_proto::limits::check_key("ref", reference)?;
        if total < 0 {
            return Err(Error::InvalidArgument(format!("negative total {total}")));
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
            // As containerd's local store: a resumed ingest keeps its total.
            Some(r) if total > 0 && r.total > 0 && r.total != total => {
                return Err(Error::FailedPrecondition(format!(
                    "ingest {reference:?} was started with total {}, not {total}: abort it to start over",
                    r.total
                )));
            }
            // Resume: the bytes so far are the file; re-hash them.
            Some(r) => {
                let f = match File::open(&path) {
                    Ok(f) => f,
                    // The record outlived its file (a power cut): the ingest
                    // is gone; drop the record so the ref starts over.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        inner.drop_ingest(reference)?;
                        return Err(Error::NotFound(format!(
                            "ingest {reference:?} lost its bytes: start it over"
                        )));
                    }
                    Err(e) => return Err(Error::io(format!("open ingest {reference:?}"), e)),
                };
                let mut reader = BufReader::with_capacity(1 << 20, f);
                let n = std::io::copy(&mut reader, &mut HashWriter(&mut hasher))
                    .map_err(|e| Error::io(format!("read ingest {reference:?}"), e))?;
                let mut r = r;
                if r.total <= 0 {
                    r.total = total;
                }
                (r, n as i64)
            }
            None => {
                let now = schema::now_ns();
                let r = IngestRecord {
                    total,
                    expected: expected.to_string(),
                    started_ns: now,
                    updated_ns: now,
                };
                std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
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
    /// wrong size or digest; InvalidArgument (ingest kept) for a label over
    /// containerd's limit; AlreadyExists (ingest dropped) if the blob is
    /// there already. Returns the digest.
    pub fn commit(
        &mut self,
        size: i64,
        expected: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<String> {
        strata_proto::limits::check_labels(&labels)?;
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
