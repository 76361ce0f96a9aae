//! The snapshot metadata store: one snapshotter's records in the shared DB.
//!
//! Blocking: callers run it on blocking threads. Every mutation is one
//! `WriteBatch` written with `sync = true`, so it is durable when it returns;
//! concurrent mutations on different keys share their fsyncs (RocksDB's write
//! group), and mutations on the same keys are serialized by [`KeyLocks`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rocksdb::{ColumnFamily, Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions, DB};
use strata_proto::limits::{check_key, check_labels};

use crate::error::{Error, Result};
use crate::locks::{Guard, KeyLocks};
use crate::schema::{self, Keys, Record};
use crate::types::{Info, Kind, Labels, Usage};

/// One snapshotter's metadata.
pub struct MetaStore {
    db: Arc<DB>,
    keys: Keys,
    locks: KeyLocks,
    /// The next id, and the end of the block reserved durably.
    ids: Mutex<IdRange>,
    /// Ids handed out whose records are not written yet: Cleanup spares their
    /// directories.
    inflight: Arc<Mutex<HashSet<u64>>>,
    sync: WriteOptions,
    /// Reads that may not do I/O (memtable and block cache only).
    cache_only: ReadOptions,
}

/// Ids handed out: `next` up to `reserved` (exclusive) are reserved on disk.
struct IdRange {
    next: u64,
    reserved: u64,
}

/// A snapshot being created: checks done, id reserved, keys locked. Create
/// its directory, then [`MetaStore::finish_create`].
pub struct PendingCreate<'a> {
    store: &'a MetaStore,
    _guard: Guard<'a>,
    record: Record,
    key: String,
}

impl PendingCreate<'_> {
    /// The record that will be written.
    pub fn record(&self) -> &Record {
        &self.record
    }
}

impl Drop for PendingCreate<'_> {
    fn drop(&mut self) {
        self.store.inflight_lock().remove(&self.record.id);
    }
}

/// An id taken ahead of its record (see [`MetaStore::reserve_id`]). It
/// may outlive the call that took it (a layer unpacked ahead of its
/// Prepare).
pub struct ReservedId {
    inflight: Arc<Mutex<HashSet<u64>>>,
    id: u64,
}

impl ReservedId {
    /// The id: names the snapshot's directory.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for ReservedId {
    fn drop(&mut self) {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

fn not_found(what: &str, key: &str) -> Error {
    Error::NotFound(format!("{what} {key:?}"))
}

impl MetaStore {
    /// Opens the store of the snapshotter `name` in `db`, which must have
    /// been opened with [`schema::column_families`].
    pub fn open(db: Arc<DB>, name: &str) -> Result<Self> {
        if name.is_empty() || name.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "snapshotter name {name:?} must be non-empty and hold no NUL"
            )));
        }
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let mut cache_only = ReadOptions::default();
        cache_only.set_read_tier(rocksdb::ReadTier::BlockCache);
        let mut store = MetaStore {
            db,
            keys: Keys::new(name),
            locks: KeyLocks::default(),
            ids: Mutex::new(IdRange {
                next: 1,
                reserved: 1,
            }),
            inflight: Arc::new(Mutex::new(HashSet::new())),
            sync,
            cache_only,
        };
        let meta = store.cf(schema::CF_META)?;
        strata_kv::check_schema(
            &store.db,
            meta,
            "snapshot metadata",
            schema::SCHEMA_KEY,
            schema::SCHEMA_VERSION,
            true,
        )
        .map_err(|e| match e {
            strata_kv::SchemaError::Db { source, .. } => Error::Db(source),
            newer => Error::FailedPrecondition(newer.to_string()),
        })?;
        // Every id below the reservation may have been handed out (its
        // directory may exist without a record): start past it. The scan is
        // a second guard. Nothing is reserved yet: the first create reserves
        // a block durably before it uses an id.
        let reserved = store
            .db
            .get_cf(meta, store.keys.next_id())?
            .map(|v| schema::decode_u64(&v))
            .unwrap_or(1);
        let max_id = store.ids()?.into_iter().max().unwrap_or(0);
        let next = reserved.max(max_id + 1).max(1);
        *store.ids.get_mut().unwrap_or_else(|p| p.into_inner()) = IdRange {
            next,
            reserved: next,
        };
        Ok(store)
    }

    /// Makes sure no id up to `id` is handed out (for directories an older
    /// strata may have left without reserving their ids).
    pub fn reserve_past(&self, id: u64) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.next <= id {
            ids.next = id + 1;
            ids.reserved = ids.reserved.min(ids.next);
        }
    }

    /// A new id, never handed out before, also across crashes: when the
    /// reserved block is used up, the next one is reserved with a synced
    /// write before any of its ids is returned.
    fn take_id(&self) -> Result<u64> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.next >= ids.reserved {
            let end = ids.next + schema::ID_BLOCK;
            self.db.merge_cf_opt(
                self.cf(schema::CF_META)?,
                self.keys.next_id(),
                end.to_be_bytes(),
                &self.sync,
            )?;
            ids.reserved = end;
        }
        let id = ids.next;
        ids.next += 1;
        Ok(id)
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::Internal(format!("column family {name} is not open")))
    }

    fn inflight_lock(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self, key: &str) -> Result<Option<Record>> {
        let raw = self.keys.snapshot(key);
        match self.db.get_pinned_cf(self.cf(schema::CF_BY_KEY)?, &raw)? {
            Some(v) => Ok(Some(Record::decode_value(&raw, &v)?)),
            None => Ok(None),
        }
    }

    /// The record of `key`, or NotFound.
    pub fn get(&self, key: &str) -> Result<Record> {
        self.read(key)?.ok_or_else(|| not_found("snapshot", key))
    }

    /// The record of `key` if it can be read without I/O (from the memtable
    /// or the block cache), so an async caller may answer inline; `None`
    /// when the read would block.
    pub fn get_nonblocking(&self, key: &str) -> Option<Result<Record>> {
        let raw = self.keys.snapshot(key);
        let cf = match self.cf(schema::CF_BY_KEY) {
            Ok(cf) => cf,
            Err(e) => return Some(Err(e)),
        };
        match self.db.get_pinned_cf_opt(cf, &raw, &self.cache_only) {
            Ok(Some(v)) => Some(Record::decode_value(&raw, &v)),
            Ok(None) => Some(Err(not_found("snapshot", key))),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => None,
            Err(e) => Some(Err(e.into())),
        }
    }

    /// Checks and reserves a new snapshot; see [`PendingCreate`].
    pub fn begin_create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<PendingCreate<'_>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        check_key("snapshot key", key)?;
        check_labels(&labels)?;
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(
                "only active or view snapshots can be created".into(),
            ));
        }
        let guard = self.locks.lock(&[key], &[parent]);
        let parent_ids = self
            .committed_parent(parent)?
            .map(|p| p.lineage())
            .unwrap_or_default();
        if self.read(key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
        }
        let id = self.take_id()?;
        self.inflight_lock().insert(id);
        Ok(PendingCreate {
            store: self,
            _guard: guard,
            record: schema::new_record(id, kind, parent, parent_ids, labels),
            key: key.to_string(),
        })
    }

    /// Writes the record of a snapshot whose directory now exists.
    pub fn finish_create(&self, p: PendingCreate<'_>) -> Result<Record> {
        let mut b = WriteBatch::default();
        b.put_cf(
            self.cf(schema::CF_BY_KEY)?,
            self.keys.snapshot(&p.key),
            p.record.encode_value(),
        );
        if let Some(&pid) = p.record.parent_ids.first() {
            b.put_cf(
                self.cf(schema::CF_CHILDREN)?,
                self.keys.child(pid, p.record.id),
                p.key.as_bytes(),
            );
        }
        if let Err(e) = self.db.write_opt(b, &self.sync) {
            // A failed synced write may still reach the WAL and be replayed
            // at the next start: its directory must outlive this run, so
            // its id stays in flight (Cleanup spares it) until then.
            let id = p.record.id;
            drop(p);
            self.inflight_lock().insert(id);
            return Err(e.into());
        }
        Ok(p.record.clone())
    }

    /// The record of `parent`, which must be a committed snapshot; `None`
    /// for no parent (""). NotFound or InvalidArgument otherwise.
    pub fn committed_parent(&self, parent: &str) -> Result<Option<Record>> {
        if parent.is_empty() {
            return Ok(None);
        }
        let p = self
            .read(parent)?
            .ok_or_else(|| not_found("parent snapshot", parent))?;
        if p.kind() != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent {parent:?} is not a committed snapshot"
            )));
        }
        Ok(Some(p))
    }

    /// Takes a new id for a snapshot whose directory is made before any
    /// record or lock (the unpack fast path): until the guard is dropped,
    /// Cleanup spares its directory.
    pub fn reserve_id(&self) -> Result<ReservedId> {
        let id = self.take_id()?;
        self.inflight_lock().insert(id);
        Ok(ReservedId {
            inflight: self.inflight.clone(),
            id,
        })
    }

    /// Whether a layer the fast path committed as `chain` is here: a
    /// snapshot named `chain` (a base layer) or `chain/p<parent id>`.
    pub fn has_layer(&self, chain: &str) -> Result<bool> {
        if self.read(chain)?.is_some() {
            return Ok(true);
        }
        let prefix = self.keys.snapshot(&format!("{chain}/p"));
        let mut it = self.db.raw_iterator_cf(self.cf(schema::CF_BY_KEY)?);
        it.seek(&prefix);
        if it.valid() {
            return Ok(it.key().is_some_and(|k| k.starts_with(&prefix)));
        }
        it.status()?;
        Ok(false)
    }

    /// Records a committed snapshot `name` on `parent` whose directory (id
    /// `id.id()`) is complete and durable, in one synced batch: the unpack
    /// fast path, which never has an active record. `parent_ids` is the
    /// chain the layer was made against: if the parent is gone or changed
    /// since, FailedPrecondition. AlreadyExists if `name` is taken.
    pub fn create_committed(
        &self,
        id: ReservedId,
        name: &str,
        parent: &str,
        parent_ids: &[u64],
        labels: Labels,
        usage: Usage,
    ) -> Result<Record> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        check_key("snapshot name", name)?;
        check_labels(&labels)?;
        let _guard = self.locks.lock(&[name], &[parent]);
        if self.read(name)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        let chain = self
            .committed_parent(parent)?
            .map(|p| p.lineage())
            .unwrap_or_default();
        if chain != parent_ids {
            return Err(Error::FailedPrecondition(format!(
                "parent {parent:?} changed while its child was unpacked"
            )));
        }
        let mut rec = schema::new_record(id.id, Kind::Committed, parent, chain, labels);
        rec.size = usage.size;
        rec.inodes = usage.inodes;
        let mut b = WriteBatch::default();
        b.put_cf(
            self.cf(schema::CF_BY_KEY)?,
            self.keys.snapshot(name),
            rec.encode_value(),
        );
        if let Some(&pid) = rec.parent_ids.first() {
            b.put_cf(
                self.cf(schema::CF_CHILDREN)?,
                self.keys.child(pid, rec.id),
                name.as_bytes(),
            );
        }
        if let Err(e) = self.db.write_opt(b, &self.sync) {
            // As in finish_create: the directory must outlive this run.
            let i = id.id;
            drop(id);
            self.inflight_lock().insert(i);
            return Err(e.into());
        }
        drop(id);
        Ok(rec)
    }

    /// Commits the active snapshot `key` as `name`, with `usage` computed
    /// from its record while both keys are locked.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: Labels,
        usage: impl FnOnce(&Record) -> Result<Usage>,
    ) -> Result<Record> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "commit name must not be empty".into(),
            ));
        }
        check_key("commit name", name)?;
        check_labels(&labels)?;
        let _guard = self.locks.lock(&[key, name], &[]);
        let active = self.get(key)?;
        if self.read(name)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        if active.kind() != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is {}, not active: only active snapshots can be committed",
                active.kind().as_str()
            )));
        }
        let u = usage(&active)?;
        let mut rec = schema::new_record(
            active.id,
            Kind::Committed,
            &active.parent,
            active.parent_ids.clone(),
            labels,
        );
        rec.size = u.size;
        rec.inodes = u.inodes;
        let by_key = self.cf(schema::CF_BY_KEY)?;
        let mut b = WriteBatch::default();
        b.delete_cf(by_key, self.keys.snapshot(key));
        b.put_cf(by_key, self.keys.snapshot(name), rec.encode_value());
        if let Some(&pid) = rec.parent_ids.first() {
            b.put_cf(
                self.cf(schema::CF_CHILDREN)?,
                self.keys.child(pid, rec.id),
                name.as_bytes(),
            );
        }
        self.db.write_opt(b, &self.sync)?;
        Ok(rec)
    }

    /// Removes `key`'s record; FailedPrecondition while it has children.
    /// Returns the removed record (its directory is the caller's to delete).
    pub fn remove(&self, key: &str) -> Result<Record> {
        let _guard = self.locks.lock(&[key], &[]);
        let rec = self.get(key)?;
        if self.has_children(rec.id)? {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?}: it has children"
            )));
        }
        let mut b = WriteBatch::default();
        b.delete_cf(self.cf(schema::CF_BY_KEY)?, self.keys.snapshot(key));
        if let Some(&pid) = rec.parent_ids.first() {
            b.delete_cf(self.cf(schema::CF_CHILDREN)?, self.keys.child(pid, rec.id));
        }
        self.db.write_opt(b, &self.sync)?;
        Ok(rec)
    }

    fn has_children(&self, id: u64) -> Result<bool> {
        let prefix = self.keys.children_of(id);
        let mut it = self.db.raw_iterator_cf(self.cf(schema::CF_CHILDREN)?);
        it.seek(&prefix);
        if it.valid() {
            return Ok(it.key().is_some_and(|k| k.starts_with(&prefix)));
        }
        it.status()?;
        Ok(false)
    }

    /// Updates labels of `info.name`: all of them with no field paths or
    /// `labels`, one with `labels.KEY`; any other path, or a label over
    /// containerd's size limit, is InvalidArgument.
    pub fn update(&self, info: Info, paths: &[String]) -> Result<Record> {
        check_labels(&info.labels)?;
        let _guard = self.locks.lock(&[&info.name], &[]);
        let mut rec = self.get(&info.name)?;
        if paths.is_empty() {
            rec.labels = info.labels;
        } else {
            for p in paths {
                if let Some(label) = p.strip_prefix("labels.") {
                    let v = info.labels.get(label).cloned().unwrap_or_default();
                    rec.labels.insert(label.to_string(), v);
                } else if p == "labels" {
                    rec.labels = info.labels.clone();
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field {p:?} of snapshot {:?}: only labels can be updated",
                        info.name
                    )));
                }
            }
        }
        // As containerd: setting a label to "" removes it.
        rec.labels.retain(|_, v| !v.is_empty());
        rec.updated_ns = schema::now_ns();
        self.db.put_cf_opt(
            self.cf(schema::CF_BY_KEY)?,
            self.keys.snapshot(&info.name),
            rec.encode_value(),
            &self.sync,
        )?;
        Ok(rec)
    }

    /// Calls `f` with every record in key order until it returns false.
    pub fn walk(&self, mut f: impl FnMut(String, Record) -> bool) -> Result<()> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(self.keys.upper_bound());
        // The scan fills the block cache on purpose: records are ~150 bytes,
        // so 100,000 snapshots fit a small cache, and after containerd's
        // periodic Walk, Stat and Mounts are answered inline from memory.
        let it = self.db.iterator_cf_opt(
            self.cf(schema::CF_BY_KEY)?,
            ro,
            IteratorMode::From(self.keys.prefix(), Direction::Forward),
        );
        for item in it {
            let (k, v) = item?;
            let Some(name) = self.keys.snapshot_key_of(&k) else {
                break;
            };
            let rec = Record::decode_value(&k, &v)?;
            if !f(String::from_utf8_lossy(name).into_owned(), rec) {
                break;
            }
        }
        Ok(())
    }

    /// Keys of the children of `parent`, from the index (no scan).
    pub fn children(&self, parent: &str) -> Result<Vec<String>> {
        let Some(p) = self.read(parent)? else {
            return Ok(Vec::new());
        };
        let prefix = self.keys.children_of(p.id);
        let mut ro = ReadOptions::default();
        let mut upper = prefix.clone();
        upper.extend_from_slice(&[0xff; 9]);
        ro.set_iterate_upper_bound(upper);
        let it = self.db.iterator_cf_opt(
            self.cf(schema::CF_CHILDREN)?,
            ro,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in it {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(String::from_utf8_lossy(&v).into_owned());
        }
        Ok(out)
    }

    /// Every id that has a record, and every id being created. Read the
    /// directories first, then this: a directory seen before is then either
    /// here or truly orphaned.
    pub fn live_ids(&self) -> Result<HashSet<u64>> {
        let inflight = self.inflight_lock().clone();
        let mut ids = self.ids()?;
        ids.extend(inflight);
        Ok(ids)
    }

    fn ids(&self) -> Result<HashSet<u64>> {
        let mut ids = HashSet::new();
        self.walk(|_, r| {
            ids.insert(r.id);
            true
        })?;
        Ok(ids)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn open_db(dir: &std::path::Path) -> Arc<DB> {
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        o.create_missing_column_families(true);
        let cache = rocksdb::Cache::new_lru_cache(8 << 20);
        Arc::new(
            DB::open_cf_descriptors(&o, dir, schema::column_families(&cache)).expect("open db"),
        )
    }

    fn create(m: &MetaStore, kind: Kind, key: &str, parent: &str) -> Result<Record> {
        let p = m.begin_create(kind, key, parent, Labels::new())?;
        m.finish_create(p)
    }

    #[test]
    fn lifecycle_and_errors() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let db = open_db(d.path());
        let m = MetaStore::open(db.clone(), "strata")?;
        let other = MetaStore::open(db.clone(), "strata-lazy")?;
        let a = create(&m, Kind::Active, "a", "")?;
        assert!(matches!(
            create(&m, Kind::Active, "a", ""),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            create(&m, Kind::Active, "b", "a"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            create(&m, Kind::Active, "b", "nope"),
            Err(Error::NotFound(_))
        ));
        // Another snapshotter does not see it.
        assert!(matches!(other.get("a"), Err(Error::NotFound(_))));
        let c = m.commit("base", "a", Labels::new(), |_| {
            Ok(Usage { size: 5, inodes: 1 })
        })?;
        assert_eq!(c.id, a.id);
        assert_eq!(c.usage(), Usage { size: 5, inodes: 1 });
        assert!(matches!(m.get("a"), Err(Error::NotFound(_))));
        let child = create(&m, Kind::Active, "child", "base")?;
        assert_eq!(child.parent_ids, vec![a.id]);
        assert_eq!(m.children("base")?, vec!["child".to_string()]);
        assert!(matches!(
            m.remove("base"),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            m.commit("x", "base", Labels::new(), |_| Ok(Usage::default())),
            Err(Error::FailedPrecondition(_))
        ));
        m.commit("top", "child", Labels::new(), |_| Ok(Usage::default()))?;
        assert_eq!(m.children("base")?, vec!["top".to_string()]);
        m.remove("top")?;
        m.remove("base")?;
        assert!(m.live_ids()?.is_empty());
        // Ids never come back, across a reopen.
        drop(m);
        let m = MetaStore::open(db, "strata")?;
        let n = create(&m, Kind::View, "v", "")?;
        assert!(n.id > child.id);
        Ok(())
    }

    #[test]
    fn an_id_taken_by_a_crashed_create_is_never_handed_out_again() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let db = open_db(d.path());
        let mut seen = HashSet::new();
        for round in 0..3 {
            // A Prepare takes an id and makes its directory, then the daemon
            // dies before the record is written.
            let m = MetaStore::open(db.clone(), "strata")?;
            let crashed = m.begin_create(Kind::Active, "k", "", Labels::new())?;
            let id = crashed.record().id;
            assert!(seen.insert(id), "round {round}: id {id} handed out twice");
            drop(crashed);
            drop(m);
        }
        // And after a create that did finish, too.
        let m = MetaStore::open(db.clone(), "strata")?;
        let done = create(&m, Kind::Active, "k", "")?;
        assert!(seen.insert(done.id), "id {} handed out twice", done.id);
        drop(m);
        let m = MetaStore::open(db, "strata")?;
        let p = m.begin_create(Kind::Active, "k2", "", Labels::new())?;
        assert!(
            seen.insert(p.record().id),
            "id {} handed out twice",
            p.record().id
        );
        Ok(())
    }
}
