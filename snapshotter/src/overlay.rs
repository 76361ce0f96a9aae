//! The overlayfs snapshotter: containerd's `overlayfs` semantics and mount
//! layout, over the RocksDB [`MetaStore`].
//!
//! On disk, under its root: `<id>/fs` (the upper dir, or the layer's files once
//! committed) and `<id>/work` (overlay's workdir, for active snapshots).
//!
//! Order of effects, so that a crash anywhere is harmless:
//! - Prepare/View: take an id (reserved durably before use, so never handed
//!   out twice, even after a crash), create `<id>/fs` (and `<id>/work`),
//!   fsync `<id>/` and the root so the entries reach the disk before the
//!   record (a power cut is not yet tested: only SIGKILL is), then write the
//!   metadata batch. A crash before the batch leaves a directory
//!   with no record, which start-up and Cleanup remove; its id is not reused.
//! - Remove: write the metadata batch, then delete `<id>/` in the background.
//!   A crash before the deletion leaves the same kind of orphan.
//!
//! Metadata never points at a missing directory.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::ahead::{Ahead, Outcome, UNCLAIMED_TTL};
use crate::du::disk_usage;
use crate::error::{Error, Result};
use crate::lazy::{Lazy, KEPT_TOC};
use crate::meta::{MetaStore, ReservedId};
use crate::remote::{
    chain_id, LayerRequest, RemoteError, Unpacker, KEPT_BLOB_LABEL, TARGET_REF, UNPACKED_LABEL,
};
use crate::schema::Record;
use crate::types::{Info, Kind, Labels, Mount, Usage};
use crate::Snapshotter;

/// The label containerd's overlayfs sets (with `upperdir_label`) to tell
/// where a snapshot's upper dir is.
pub const UPPERDIR_LABEL: &str = "containerd.io/snapshot/overlay.upperdir";

/// How many infos one List message carries at most: 1024 rather than 128
/// took a Walk of 100,000 snapshots from 98 ms to 78 ms in `strata bench
/// scaling`.
const WALK_BATCH: usize = 1024;
/// And how many bytes, roughly, so that labels never push a message past
/// gRPC's limits (containerd's client takes 16 MiB, Go's default is 4 MiB).
const WALK_BATCH_BYTES: usize = 1 << 20;

/// Settings of one overlayfs snapshotter.
#[derive(Debug, Clone, Default)]
pub struct OverlayConfig {
    /// Where its snapshot directories live.
    pub root: PathBuf,
    /// Add [`UPPERDIR_LABEL`] to Stat, Update and List answers.
    pub upperdir_label: bool,
    /// `index=off` on overlay mounts; `None`: when the kernel has the option.
    pub index_off: Option<bool>,
    /// `userxattr` on overlay mounts; `None`: detect as containerd does
    /// (needed in a user namespace on kernels ≥ 5.11).
    pub userxattr: Option<bool>,
    /// Mount writable overlays with `volatile` (no syncs to the upper dir).
    /// Commit then syncs the layer's filesystem itself, so committed layers
    /// stay durable; an uncommitted container layer may be lost in a crash.
    pub volatile: bool,
    /// More options added to every overlay mount.
    pub extra_options: Vec<String>,
}

struct Inner {
    meta: MetaStore,
    root: PathBuf,
    upperdir_label: bool,
    /// Options every overlay mount starts with.
    base_options: Vec<String>,
    volatile: bool,
    /// Directories to delete, for the background remover thread.
    remover: std::sync::mpsc::Sender<PathBuf>,
    /// The unpack fast path, when configured.
    unpacker: Option<Arc<Unpacker>>,
    /// Its layers unpacked ahead of their Prepare.
    ahead: Ahead,
    /// Lazy eStargz layers (the `strata-lazy` snapshotter).
    lazy: Option<Arc<Lazy>>,
}

/// How a Prepare through the fast path did not end in AlreadyExists.
enum RemoteFailure {
    /// Do the ordinary Prepare instead.
    Fallback(RemoteError),
    /// Fail the Prepare.
    Fail(Error),
}

impl From<Error> for RemoteFailure {
    fn from(e: Error) -> Self {
        RemoteFailure::Fail(e)
    }
}

/// Deletes removed snapshots' directories, one at a time, off the request
/// path; ends when the snapshotter is dropped.
fn run_remover(rx: std::sync::mpsc::Receiver<PathBuf>) {
    for dir in rx {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "removing snapshot directory failed; Cleanup will retry");
            }
        }
    }
}

/// containerd's overlayfs snapshotter, on strata's metadata store.
#[derive(Clone)]
pub struct OverlaySnapshotter {
    inner: Arc<Inner>,
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))
}

/// Creates `path` and its missing parents with `mode`, fsyncing the parent
/// of each level made, so that the tree reaches the disk before the first
/// record points into it.
fn mkdir_durable(path: &Path, mode: u32) -> Result<()> {
    let mut missing = Vec::new();
    let mut p = path;
    while !p.is_dir() {
        missing.push(p);
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    for dir in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(format!("create {}", dir.display()), e)),
        }
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

/// The largest numeric name in `dir` (a snapshot directory's id).
fn max_numeric_entry(dir: &Path) -> Result<Option<u64>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    Ok(rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("new-")
                .unwrap_or(&name)
                .parse::<u64>()
                .ok()
        })
        .max())
}

/// Makes the entries of directory `path` durable.
fn fsync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", path.display()), e))
}

/// Whether this process runs in a user namespace (uid_map is not identity).
fn in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(m) => {
            let f: Vec<&str> = m.split_whitespace().collect();
            f != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(u) = nix::sys::utsname::uname() else {
        return false;
    };
    let release = u.release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let maj: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let min: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (maj, min) >= (major, minor)
}

fn on_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}

impl OverlaySnapshotter {
    /// Opens the snapshotter: creates its root, and starts removing any
    /// directory that no record owns (left by a crash) in the background.
    pub fn new(meta: MetaStore, cfg: OverlayConfig) -> Result<Self> {
        Self::with_unpacker(meta, cfg, None, None)
    }

    /// As [`OverlaySnapshotter::new`], with the unpack fast path: a Prepare
    /// carrying remote-snapshot labels has strata fetch and unpack the layer
    /// itself ([`crate::remote`]).
    ///
    /// With `lazy`, an eStargz layer is mounted lazily instead
    /// ([`crate::lazy`]); the lazy layers recorded before are mounted again
    /// now (needs a tokio runtime).
    pub fn with_unpacker(
        meta: MetaStore,
        cfg: OverlayConfig,
        unpacker: Option<Arc<Unpacker>>,
        lazy: Option<Arc<Lazy>>,
    ) -> Result<Self> {
        // As containerd's overlayfs: only root may enter the snapshots.
        mkdir_durable(&cfg.root, 0o700)?;
        // Ids below the reservation are never handed out; an older strata
        // reserved none, so a crashed Prepare of its may have left a
        // directory at the next id. Start past every directory there is.
        if let Some(max) = max_numeric_entry(&cfg.root)? {
            meta.reserve_past(max);
        }
        let mut base_options = Vec::new();
        let index_off = cfg
            .index_off
            .unwrap_or_else(|| Path::new("/sys/module/overlay/parameters/index").exists());
        if index_off {
            base_options.push("index=off".to_string());
        }
        let userxattr = cfg.userxattr.unwrap_or_else(|| {
            in_user_namespace() && !on_tmpfs(&cfg.root) && kernel_at_least(5, 11)
        });
        if userxattr {
            base_options.push("userxattr".to_string());
        }
        base_options.extend(cfg.extra_options.iter().cloned());
        tracing::info!(root = %cfg.root.display(), ?base_options, volatile = cfg.volatile, "overlay snapshotter ready");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("strata-remover".into())
            .spawn(move || run_remover(rx))
            .map_err(|e| Error::io("spawn remover thread", e))?;
        let s = OverlaySnapshotter {
            inner: Arc::new(Inner {
                remover: tx,
                meta,
                root: cfg.root,
                upperdir_label: cfg.upperdir_label,
                base_options,
                volatile: cfg.volatile,
                unpacker,
                ahead: Ahead::default(),
                lazy,
            }),
        };
        // Before Cleanup looks at the directories: a crashed run's FUSE
        // mounts answer ENOTCONN until detached.
        crate::lazy::detach_stale_mounts(&s.inner.root);
        s.inner.remount_lazy()?;
        let inner = s.inner.clone();
        std::thread::Builder::new()
            .name("strata-cleanup".into())
            .spawn(move || {
                if let Err(e) = inner.cleanup() {
                    tracing::warn!(error = %e, "start-up cleanup failed");
                }
            })
            .map_err(|e| Error::io("spawn cleanup thread", e))?;
        if s.inner.unpacker.is_some() {
            // Layers unpacked ahead for a pull that never came back for them.
            let inner = Arc::downgrade(&s.inner);
            std::thread::Builder::new()
                .name("strata-ahead-expiry".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(60));
                    match inner.upgrade() {
                        Some(i) => {
                            i.ahead.expire(UNCLAIMED_TTL);
                        }
                        None => break,
                    }
                })
                .map_err(|e| Error::io("spawn expiry thread", e))?;
        }
        Ok(s)
    }

    /// `key`'s record: inline when it is in memory, else on a blocking thread.
    async fn record(&self, key: &str) -> Result<Record> {
        if let Some(r) = self.inner.meta.get_nonblocking(key) {
            return r;
        }
        let key = key.to_string();
        self.blocking(move |s| s.meta.get(&key)).await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await?
    }
}

impl Inner {
    /// A new id, reserved, with the directory it names (not made yet).
    fn reserve_dir(&self) -> Result<(ReservedId, PathBuf)> {
        let id = self.meta.reserve_id()?;
        let dir = self.dir(id.id());
        Ok((id, dir))
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join(id.to_string())
    }

    fn upper(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn work(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    fn info(&self, name: String, rec: &Record) -> Info {
        self.labelled(rec.info(name), rec.id)
    }

    /// Adds [`UPPERDIR_LABEL`] when configured (reported, never stored).
    fn labelled(&self, mut info: Info, id: u64) -> Info {
        if self.upperdir_label {
            info.labels.insert(
                UPPERDIR_LABEL.to_string(),
                self.upper(id).to_string_lossy().into_owned(),
            );
        }
        info
    }

    fn mounts(&self, rec: &Record) -> Vec<Mount> {
        let bind = |id: u64, rw: &str| {
            vec![Mount {
                kind: "bind".into(),
                source: self.upper(id).to_string_lossy().into_owned(),
                options: vec![rw.to_string(), "rbind".into()],
            }]
        };
        let kind = rec.kind();
        match rec.parent_ids.as_slice() {
            [] => return bind(rec.id, if kind == Kind::View { "ro" } else { "rw" }),
            [only] if kind == Kind::View => return bind(*only, "ro"),
            _ => {}
        }
        let mut options = self.base_options.clone();
        if kind == Kind::Active {
            if self.volatile {
                options.push("volatile".into());
            }
            options.push(format!("workdir={}", self.work(rec.id).display()));
            options.push(format!("upperdir={}", self.upper(rec.id).display()));
        }
        let lower: Vec<String> = rec
            .parent_ids
            .iter()
            .map(|id| self.upper(*id).to_string_lossy().into_owned())
            .collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options,
        }]
    }

    fn create(&self, kind: Kind, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        // Before a remote layer is fetched for nothing (begin_create and
        // create_committed check them again).
        strata_proto::limits::check_key("snapshot key", key)?;
        strata_proto::limits::check_labels(&labels)?;
        if let (Kind::Active, Some(unpacker)) = (kind, &self.unpacker) {
            match LayerRequest::from_labels(&labels) {
                None => {}
                Some(Err(e)) => {
                    tracing::warn!(key, error = %e, "remote-snapshot labels ignored: ordinary Prepare");
                }
                Some(Ok(req)) => match self.create_remote(unpacker, &req, parent, &labels) {
                    Ok(()) => {
                        return Err(Error::AlreadyExists(format!(
                            "target snapshot {:?}",
                            req.target
                        )))
                    }
                    Err(RemoteFailure::Fail(e)) => return Err(e),
                    Err(RemoteFailure::Fallback(e)) => {
                        tracing::warn!(key, layer = %req.layer, error = %e, "fast unpack not possible: ordinary Prepare, containerd unpacks");
                    }
                },
            }
        }
        let pending = self.meta.begin_create(kind, key, parent, labels)?;
        let rec = pending.record().clone();
        self.check_lazy(&rec)?;
        self.make_dirs(
            rec.id,
            kind == Kind::Active,
            rec.parent_ids.first().copied(),
            parent,
        )?;
        if let Err(e) = self.sync_entries(rec.id) {
            let _ = std::fs::remove_dir_all(self.dir(rec.id));
            return Err(e);
        }
        // A failed synced write may still reach the WAL and be replayed at
        // the next start: keep the directory (Cleanup removes it if no
        // record shows up), so that no record can point at a missing one.
        let rec = self.meta.finish_create(pending)?;
        Ok(self.mounts(&rec))
    }

    /// Makes `<id>/fs` (and `<id>/work` for an active snapshot), durably;
    /// on error nothing is left. The new upper dir belongs to whoever owns
    /// the parent's root (`parent_id`).
    fn make_dirs(
        &self,
        id: u64,
        with_work: bool,
        parent_id: Option<u64>,
        parent: &str,
    ) -> Result<()> {
        // No temporary name and rename: the id is new and never reused (it
        // was reserved durably before we got it), and until the batch below
        // is written no record points here, so a crash leaves an orphan that
        // start-up and Cleanup remove (the id is in flight meanwhile, so a
        // concurrent Cleanup spares it). That saves two operations on the
        // shared root directory per snapshot.
        let dir = self.dir(id);
        let made = (|| {
            mkdir(&dir, 0o700)?;
            mkdir(&dir.join("fs"), 0o755)?;
            if with_work {
                mkdir(&dir.join("work"), 0o711)?;
            }
            if let Some(pid) = parent_id {
                let st = std::fs::metadata(self.upper(pid))
                    .map_err(|e| Error::io(format!("stat parent {parent:?}"), e))?;
                std::os::unix::fs::lchown(dir.join("fs"), Some(st.uid()), Some(st.gid()))
                    .map_err(|e| Error::io("chown upper dir", e))?;
            }
            Ok(())
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    }

    /// Writes the new entries of `<id>` and of the root to disk, so that
    /// they reach it before the batch that names them. On ext4 the first
    /// fsync commits the journal holding both, so the second is cheap.
    /// (`tests/crash.rs` cuts power under it; its syncs, and any later
    /// one, may also hide a missing one.)
    fn sync_entries(&self, id: u64) -> Result<()> {
        fsync_dir(&self.dir(id))?;
        fsync_dir(&self.root)
    }

    /// The fast path. The layer is fetched and unpacked into the directory
    /// of a reserved id with no lock held (a long download blocks no other
    /// request on these keys), its filesystem synced once, and then one
    /// synced batch records it as a committed snapshot: there is never an
    /// active record to leak. Ok means the layer is there now (the caller
    /// answers AlreadyExists).
    ///
    /// The committed name is the target for a base layer, and unique to the
    /// parent otherwise (`TARGET/p<parent id>`), so that the same layer on
    /// another chain (another namespace's) never collides; containerd finds
    /// it by its `containerd.io/snapshot.ref` label and parent, whatever
    /// its name. Order of effects as for any Prepare: the directory, synced,
    /// before the record; a crash leaves an orphan that start-up removes.
    fn create_remote(
        &self,
        unpacker: &Arc<Unpacker>,
        req: &LayerRequest,
        parent: &str,
        labels: &Labels,
    ) -> std::result::Result<(), RemoteFailure> {
        // Read without a lock: the batch that records the layer checks
        // the parent again under its lock.
        let parent_rec = self.meta.committed_parent(parent)?;
        let parent_ids = parent_rec.as_ref().map(|p| p.lineage()).unwrap_or_default();
        let name = match &parent_rec {
            None => req.target.clone(),
            Some(p) => format!("{}/p{}", req.target, p.id),
        };
        if self.existing_layer(&name, req, parent)? {
            return Ok(());
        }
        // The parent's chain id: its own target label, else the chain id
        // at the end of its name (containerd names the layers it commits
        // `NS/N/CHAINID`).
        let parent_chain = parent_rec.as_ref().map(|p| {
            p.labels
                .get(TARGET_REF)
                .cloned()
                .unwrap_or_else(|| parent.rsplit('/').next().unwrap_or(parent).to_string())
        });

        let userxattr = self.base_options.iter().any(|o| o == "userxattr");
        if let Some(lazy) = &self.lazy {
            match self.create_lazy(lazy, req, parent, &parent_ids, &name, labels, userxattr) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // This layer's job first (it takes the next free slot), then the
        // layers above it, so that they unpack while containerd works down
        // its list one Prepare at a time.
        let claim = self
            .ahead
            .claim(unpacker, req, userxattr, &|| self.reserve_dir())?;
        self.start_ahead(unpacker, req, userxattr);
        let mut staged = match claim.wait() {
            Outcome::Staged(s) => s,
            Outcome::Fallback(e) => return Err(RemoteFailure::Fallback(e)),
            Outcome::Failed(e) => return Err(RemoteFailure::Fail(e)),
        };
        let upper = staged.dir().join("fs");
        let lowers: Vec<PathBuf> = parent_ids.iter().map(|i| self.upper(*i)).collect();
        let finished = (|| {
            let u = &staged.unpacked;
            // The layer must be the one containerd asked for: its chain id
            // on this parent is the target.
            let chain = chain_id(parent_chain.as_deref(), &u.report.diff_id);
            // (A parent named by a client, not by its chain id, cannot be
            // checked this way; the digests were checked all the same.)
            let checkable = parent_chain
                .as_ref()
                .is_none_or(|p| p.starts_with("sha256:"));
            if checkable && chain != req.target {
                return Err(RemoteFailure::Fail(Error::FailedPrecondition(format!(
                    "layer {} on {parent:?} has chain id {chain}, not the target {}",
                    req.layer, req.target
                ))));
            }
            // Unpacked without its parent: the layer's root belongs to
            // whoever owns the parent's, and the parents it made take the
            // attributes the lower layers give them.
            if let Some(&pid) = parent_ids.first() {
                let st = std::fs::metadata(self.upper(pid))
                    .map_err(|e| Error::io(format!("stat parent {parent:?}"), e))?;
                std::os::unix::fs::lchown(&upper, Some(st.uid()), Some(st.gid()))
                    .map_err(|e| Error::io("chown upper dir", e))?;
            }
            strata_unpack::adopt_parents(&upper, &u.report.implicit_dirs, &lowers)
                .map_err(|e| Error::FailedPrecondition(format!("layer {}: {e}", req.layer)))?;
            // One sync for the whole layer, before any record names it:
            // syncfs also writes the new directory entries of `<id>` and
            // the root (same filesystem), so no fsync of them is needed.
            let synced = std::time::Instant::now();
            let f = std::fs::File::open(&upper)
                .map_err(|e| Error::io(format!("open {}", upper.display()), e))?;
            nix::unistd::syncfs(&f)
                .map_err(|e| Error::io(format!("syncfs {}", upper.display()), e.into()))?;
            let usage = disk_usage(&upper)?;
            Ok::<_, RemoteFailure>((synced.elapsed(), usage))
        })();
        // On error `staged` drops, and its directory with it.
        let (sync_time, usage) = finished?;
        // Its blob is kept now that a Prepare took the layer.
        staged.unpacked.commit_kept(&req.layer);
        let u = &staged.unpacked;
        let r = &u.report;
        tracing::info!(
            layer = %req.layer,
            target = %req.target,
            entries = r.counts.entries,
            compressed = r.compressed_bytes,
            uncompressed = r.uncompressed_bytes,
            elapsed_ms = r.elapsed.as_millis() as u64,
            read_ms = r.read_time.as_millis() as u64,
            decompress_ms = r.decompress_time.as_millis() as u64,
            write_ms = r.write_time.as_millis() as u64,
            sync_ms = sync_time.as_millis() as u64,
            keep_ms = u.keep_time.map(|t| t.as_millis() as u64).unwrap_or(0),
            "layer unpacked by strata"
        );
        let mut labels = labels.clone();
        if u.keeping {
            labels.insert(KEPT_BLOB_LABEL.to_string(), req.layer.to_string());
        }
        // What the unpack did, for the client's progress lines.
        labels.insert(
            UNPACKED_LABEL.to_string(),
            format!(
                "entries={} bytes={} compressed={} ms={}",
                r.counts.entries,
                r.uncompressed_bytes,
                r.compressed_bytes,
                (r.elapsed + sync_time).as_millis()
            ),
        );
        let Some(id) = staged.take_id() else {
            return Err(Error::Internal("an unpacked layer without its id".into()).into());
        };
        match self
            .meta
            .create_committed(id, &name, parent, &parent_ids, labels, usage)
        {
            Ok(_) => Ok(()),
            // Another Prepare of the same layer got there first: ours goes.
            Err(Error::AlreadyExists(_)) => {
                let _ = std::fs::remove_dir_all(staged.dir());
                if self.existing_layer(&name, req, parent)? {
                    Ok(())
                } else {
                    Err(Error::FailedPrecondition(format!(
                        "snapshot {name:?} exists but is not layer {} on {parent:?}",
                        req.layer
                    ))
                    .into())
                }
            }
            // The directory stays: a failed synced write may still be
            // replayed at the next start; Cleanup removes it otherwise.
            Err(e) => Err(e.into()),
        }
    }

    /// The lazy path: mounts the layer if it is eStargz and records it.
    /// `Ok(false)`: not lazily (the caller unpacks it).
    #[allow(clippy::too_many_arguments)]
    fn create_lazy(
        &self,
        lazy: &Lazy,
        req: &LayerRequest,
        parent: &str,
        parent_ids: &[u64],
        name: &str,
        labels: &Labels,
        userxattr: bool,
    ) -> Result<bool> {
        let (id, dir) = self.reserve_dir()?;
        let n = id.id();
        self.make_dirs(n, false, parent_ids.first().copied(), parent)?;
        let lowers: Vec<PathBuf> = parent_ids.iter().map(|i| self.upper(*i)).collect();
        let (labels, usage) = match lazy.mount_layer(n, req, labels, &dir, &lowers, userxattr) {
            Ok(l) => l,
            Err(e) => {
                lazy.unmount(n);
                let _ = std::fs::remove_dir_all(&dir);
                tracing::info!(layer = %req.layer, reason = %e, "not mounted lazily: unpacking it");
                return Ok(false);
            }
        };
        let recorded = self.sync_entries(n).and_then(|()| {
            self.meta
                .create_committed(id, name, parent, parent_ids, labels, usage)
        });
        match recorded {
            Ok(_) => {
                tracing::info!(layer = %req.layer, target = %req.target, "layer mounted lazily");
                Ok(true)
            }
            Err(Error::AlreadyExists(_)) => {
                lazy.unmount(n);
                let _ = std::fs::remove_dir_all(&dir);
                if self.existing_layer(name, req, parent)? {
                    Ok(true)
                } else {
                    Err(Error::FailedPrecondition(format!(
                        "snapshot {name:?} exists but is not layer {} on {parent:?}",
                        req.layer
                    )))
                }
            }
            Err(e) => {
                // The directory (and its kept TOC) stays for a replay.
                lazy.unmount(n);
                Err(e)
            }
        }
    }

    /// Mounts the lazy layers recorded before a restart (the committed
    /// snapshots with a kept TOC), parents first. One that cannot be
    /// mounted is marked broken: no snapshot on it gets mounts.
    fn remount_lazy(&self) -> Result<()> {
        let mut recs: Vec<Record> = Vec::new();
        self.meta.walk(|_, rec| {
            if rec.kind() == Kind::Committed && self.dir(rec.id).join(KEPT_TOC).exists() {
                recs.push(rec);
            }
            true
        })?;
        let Some(lazy) = &self.lazy else {
            if let Some(r) = recs.first() {
                return Err(Error::FailedPrecondition(format!(
                    "snapshotter root {} holds lazily mounted layers (snapshot id {}): it needs lazy = true",
                    self.root.display(),
                    r.id
                )));
            }
            return Ok(());
        };
        recs.sort_by_key(|r| r.parent_ids.len());
        let userxattr = self.base_options.iter().any(|o| o == "userxattr");
        for r in recs {
            let lowers: Vec<PathBuf> = r.parent_ids.iter().map(|i| self.upper(*i)).collect();
            match lazy.remount(r.id, &self.dir(r.id), &lowers, userxattr) {
                Ok(()) => tracing::info!(id = r.id, "lazy layer mounted again"),
                Err(e) => {
                    lazy.mark_broken(r.id);
                    tracing::error!(id = r.id, error = %e, "a lazy layer could not be mounted again: snapshots on it get no mounts; remove the image and pull it again")
                }
            }
        }
        Ok(())
    }

    /// FailedPrecondition if the snapshot or a layer under it is a lazy
    /// layer that could not be mounted.
    fn check_lazy(&self, rec: &Record) -> Result<()> {
        let Some(lazy) = &self.lazy else {
            return Ok(());
        };
        let mut ids = vec![rec.id];
        ids.extend(&rec.parent_ids);
        match lazy.broken_among(&ids) {
            Some(id) => Err(Error::FailedPrecondition(format!(
                "lazy layer (snapshot id {id}) could not be mounted after a restart (see strata's log): remove the image and pull it again"
            ))),
            None => Ok(()),
        }
    }

    /// Starts jobs for the layers of `req`'s image above it that are not
    /// here and not started (best effort: a failure only logs).
    fn start_ahead(&self, unpacker: &Arc<Unpacker>, req: &LayerRequest, userxattr: bool) {
        self.ahead.expire(UNCLAIMED_TTL);
        let plan = match unpacker.plan(req) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(layer = %req.layer, error = %e, "no layers unpacked ahead");
                return;
            }
        };
        let Some(pos) = plan.iter().position(|l| l.digest == req.layer) else {
            return;
        };
        // As many layers above as the unpacker runs at once: enough to keep
        // it busy, few enough that another image's Prepare does not queue
        // behind a long guess.
        for l in plan
            .iter()
            .skip(pos + 1)
            // A lazy snapshotter mounts eStargz layers: nothing to unpack.
            .filter(|l| !(self.lazy.is_some() && l.estargz))
            .take(unpacker.layers_at_once())
        {
            let next = LayerRequest {
                target: l.chain_id.clone(),
                layer: l.digest.clone(),
                ..req.clone()
            };
            let started = match self.meta.has_layer(&l.chain_id) {
                Ok(true) => Ok(false),
                Ok(false) => self
                    .ahead
                    .start(unpacker, &next, userxattr, &|| self.reserve_dir()),
                Err(e) => Err(e),
            };
            match started {
                Ok(true) => {
                    tracing::debug!(layer = %l.digest, "unpacking ahead of its Prepare")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(layer = %l.digest, error = %e, "not unpacking ahead");
                    return;
                }
            }
        }
    }

    /// Whether `name` is already this layer (committed, on `parent`, with
    /// the target label); an error if it is something else.
    fn existing_layer(&self, name: &str, req: &LayerRequest, parent: &str) -> Result<bool> {
        match self.meta.get(name) {
            Ok(r)
                if r.kind() == Kind::Committed
                    && r.parent == parent
                    && r.labels.get(TARGET_REF) == Some(&req.target) =>
            {
                Ok(true)
            }
            Ok(_) => Err(Error::FailedPrecondition(format!(
                "snapshot {name:?} exists but is not layer {} on {parent:?}",
                req.layer
            ))),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.meta.commit(name, key, labels, |active| {
            let upper = self.upper(active.id);
            // The layer's files reach the disk before it is recorded as a
            // committed, shared layer: clients (containerd's unpacker among
            // them) write a layer without fsync, and a power cut after an
            // unsynced Commit would leave a committed layer of empty files.
            // (containerd's own overlayfs does not sync here.)
            let f = std::fs::File::open(&upper)
                .map_err(|e| Error::io(format!("open {}", upper.display()), e))?;
            nix::unistd::syncfs(&f)
                .map_err(|e| Error::io(format!("syncfs {}", upper.display()), e.into()))?;
            disk_usage(&upper)
        })?;
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        let rec = self.meta.remove(key)?;
        if let Some(lazy) = &self.lazy {
            lazy.unmount(rec.id);
        }
        // The record is gone; the directory is now an orphan that start-up or
        // Cleanup would also remove. Don't make the caller wait for it.
        let dir = self.dir(rec.id);
        if self.remover.send(dir.clone()).is_err() {
            tracing::warn!(dir = %dir.display(), "background remover is gone; Cleanup will remove it");
        }
        Ok(())
    }

    /// Removes every entry of the root that no record (or creation under
    /// way) owns.
    fn cleanup(&self) -> Result<usize> {
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| Error::io(format!("read {}", self.root.display()), e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        let live = self.meta.live_ids()?;
        let mut removed = 0;
        for name in entries {
            let id = name
                .strip_prefix("new-")
                .unwrap_or(&name)
                .parse::<u64>()
                .ok();
            if id.is_some_and(|id| live.contains(&id)) {
                continue;
            }
            let path = self.root.join(&name);
            let r = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match r {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cleanup could not remove")
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, root = %self.root.display(), "removed orphaned snapshot directories");
        }
        Ok(removed)
    }
}

#[async_trait]
impl Snapshotter for OverlaySnapshotter {
    async fn stat(&self, key: &str) -> Result<Info> {
        let rec = self.record(key).await?;
        Ok(self.inner.info(key.to_string(), &rec))
    }

    async fn update(&self, info: Info, field_paths: Vec<String>) -> Result<Info> {
        self.blocking(move |s| {
            let name = info.name.clone();
            let rec = s.meta.update(info, &field_paths)?;
            Ok(s.info(name, &rec))
        })
        .await
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.record(key).await?;
        match rec.kind() {
            // Measured now: a walk of the upper dir, on a blocking thread.
            Kind::Active => self.blocking(move |s| disk_usage(&s.upper(rec.id))).await,
            _ => Ok(rec.usage()),
        }
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let rec = self.record(key).await?;
        if rec.kind() == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed: only active and view snapshots have mounts"
            )));
        }
        self.inner.check_lazy(&rec)?;
        Ok(self.inner.mounts(&rec))
    }

    async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let (key, parent) = (key.to_string(), parent.to_string());
        self.blocking(move |s| s.create(Kind::Active, &key, &parent, labels))
            .await
    }

    async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let (key, parent) = (key.to_string(), parent.to_string());
        self.blocking(move |s| s.create(Kind::View, &key, &parent, labels))
            .await
    }

    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        let (name, key) = (name.to_string(), key.to_string());
        self.blocking(move |s| s.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.blocking(move |s| s.remove(&key)).await
    }

    async fn walk(
        &self,
        filter: strata_proto::filters::Filter,
        batches: mpsc::Sender<Vec<Info>>,
    ) -> Result<()> {
        self.blocking(move |s| {
            let mut batch = Vec::with_capacity(WALK_BATCH);
            let mut open = true;
            let mut bytes = 0usize;
            let mut emit = |info: Info, batch: &mut Vec<Info>| {
                bytes += 64
                    + info.name.len()
                    + info.parent.len()
                    + info
                        .labels
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 8)
                        .sum::<usize>();
                batch.push(info);
                if batch.len() == WALK_BATCH || bytes >= WALK_BATCH_BYTES {
                    open = batches.blocking_send(std::mem::take(batch)).is_ok();
                    bytes = 0;
                }
                open
            };
            if let Some(parent) = filter.single_equal("parent") {
                // `parent==X` (containerd's GC and `ctr snapshots ls`): the
                // children index, not a scan.
                let mut names = s.meta.children(parent)?;
                names.sort();
                for name in names {
                    let rec = match s.meta.get(&name) {
                        Ok(rec) => rec,
                        // Removed since the index was read.
                        Err(Error::NotFound(_)) => continue,
                        Err(e) => return Err(e),
                    };
                    if !emit(s.info(name, &rec), &mut batch) {
                        break;
                    }
                }
            } else {
                s.meta.walk(|name, rec| {
                    let info = rec.info(name);
                    if !filter.matches(&info) {
                        return true;
                    }
                    let info = s.labelled(info, rec.id);
                    emit(info, &mut batch)
                })?;
            }
            if !batch.is_empty() {
                let _ = batches.blocking_send(batch);
            }
            Ok(())
        })
        .await
    }

    async fn cleanup(&self) -> Result<()> {
        self.blocking(|s| s.cleanup().map(|_| ())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshotter(dir: &Path) -> Result<OverlaySnapshotter> {
        let db = crate::meta::tests::open_db(&dir.join("db"));
        let meta = MetaStore::open(db, "strata")?;
        OverlaySnapshotter::new(
            meta,
            OverlayConfig {
                root: dir.join("snaps"),
                index_off: Some(true),
                userxattr: Some(false),
                upperdir_label: true,
                ..Default::default()
            },
        )
    }

    #[tokio::test]
    async fn mounts_follow_containerd_overlayfs() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let s = snapshotter(d.path())?;
        let root = d.path().join("snaps");
        let m = s.prepare("a", "", Labels::new()).await?;
        assert_eq!(m[0].kind, "bind");
        assert_eq!(m[0].options, vec!["rw", "rbind"]);
        s.commit("l1", "a", Labels::new()).await?;
        let v = s.view("v1", "l1", Labels::new()).await?;
        assert_eq!(v[0].kind, "bind");
        assert_eq!(v[0].options, vec!["ro", "rbind"]);
        assert_eq!(v[0].source, root.join("1/fs").display().to_string());
        s.prepare("b", "l1", Labels::new()).await?;
        s.commit("l2", "b", Labels::new()).await?;
        let m = s.prepare("c", "l2", Labels::new()).await?;
        let c_id = 4; // ids: a (then l1) 1, v1 2, b (then l2) 3, c 4
        let want = vec![
            "index=off".to_string(),
            format!("workdir={}", root.join(format!("{c_id}/work")).display()),
            format!("upperdir={}", root.join(format!("{c_id}/fs")).display()),
            format!(
                "lowerdir={}:{}",
                root.join("3/fs").display(),
                root.join("1/fs").display()
            ),
        ];
        assert_eq!(m[0].kind, "overlay");
        assert_eq!(m[0].options, want);
        let v = s.view("v2", "l2", Labels::new()).await?;
        assert_eq!(
            v[0].options,
            vec![
                "index=off".to_string(),
                format!(
                    "lowerdir={}:{}",
                    root.join("3/fs").display(),
                    root.join("1/fs").display()
                )
            ]
        );
        // upperdir_label is reported, not stored.
        let info = s.stat("l2").await?;
        assert_eq!(
            info.labels.get(UPPERDIR_LABEL).map(String::as_str),
            Some(root.join("3/fs").to_string_lossy().as_ref())
        );
        // Walk with filters, including the parent index.
        let walk = |f: &[&str]| {
            let s = s.clone();
            let f = strata_proto::filters::Filter::parse_all(f).expect("filter");
            async move {
                let (tx, mut rx) = mpsc::channel(4);
                let w = tokio::spawn(async move { s.walk(f, tx).await });
                let mut names = Vec::new();
                while let Some(b) = rx.recv().await {
                    names.extend(b.into_iter().map(|i| i.name));
                }
                w.await.map_err(Error::from)??;
                Ok::<_, Error>(names)
            }
        };
        assert_eq!(walk(&["parent==l2"]).await?, vec!["c", "v2"]);
        assert_eq!(walk(&["kind==committed"]).await?, vec!["l1", "l2"]);
        assert_eq!(walk(&[]).await?.len(), 5);
        // Usage: stored at commit, measured for active.
        std::fs::write(root.join(format!("{c_id}/fs/file")), vec![7u8; 8192])
            .map_err(|e| Error::io("write", e))?;
        assert!(s.usage("c").await?.size >= 8192);
        // Remove: record now, directory soon; Cleanup catches up.
        s.remove("v2").await?;
        s.remove("c").await?;
        s.cleanup().await?;
        assert!(!root.join(format!("{c_id}")).exists());
        Ok(())
    }
}

#[cfg(test)]
mod walk_tests {
    use super::*;

    #[tokio::test]
    async fn list_messages_stay_small_with_large_labels() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let db = crate::meta::tests::open_db(&d.path().join("db"));
        let s = OverlaySnapshotter::new(
            MetaStore::open(db, "w")?,
            OverlayConfig {
                root: d.path().join("snaps"),
                ..Default::default()
            },
        )?;
        // 200 KB of labels per snapshot, each within containerd's 4 KiB.
        let big: Labels = (0..50)
            .map(|i| (format!("big{i:02}"), "x".repeat(4000)))
            .collect();
        for i in 0..30 {
            s.view(&format!("v{i:02}"), "", big.clone()).await?;
        }
        let (tx, mut rx) = mpsc::channel(64);
        s.walk(strata_proto::filters::Filter::default(), tx).await?;
        let mut sizes = Vec::new();
        while let Some(b) = rx.recv().await {
            sizes.push(b.len());
        }
        assert_eq!(sizes.iter().sum::<usize>(), 30);
        assert!(
            sizes.iter().all(|&n| n <= 6),
            "batches of ~1 MiB: {sizes:?}"
        );
        Ok(())
    }
}

#[cfg(test)]
mod crash_tests {
    use super::*;

    fn open(dir: &Path, db: &Arc<rocksdb::DB>) -> Result<OverlaySnapshotter> {
        OverlaySnapshotter::new(
            MetaStore::open(db.clone(), "strata")?,
            OverlayConfig {
                root: dir.join("snaps"),
                index_off: Some(true),
                userxattr: Some(false),
                ..Default::default()
            },
        )
    }

    #[tokio::test]
    async fn a_prepare_after_a_crashed_one_gets_a_fresh_directory() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let db = crate::meta::tests::open_db(&d.path().join("db"));
        let s = open(d.path(), &db)?;
        s.prepare("a", "", Labels::new()).await?;
        drop(s);
        // A Prepare took the next id and filled its directory (an unpack under
        // way, say); the daemon died before the record was written.
        let meta = MetaStore::open(db.clone(), "strata")?;
        let pending = meta.begin_create(Kind::Active, "b", "", Labels::new())?;
        let orphan = d.path().join(format!("snaps/{}/fs", pending.record().id));
        drop(pending);
        drop(meta);
        std::fs::create_dir_all(&orphan).map_err(|e| Error::io("mkdir", e))?;
        std::fs::write(orphan.join("secret"), b"half-made").map_err(|e| Error::io("write", e))?;
        // Restart: Prepare at once, racing start-up's clean-up.
        let s = open(d.path(), &db)?;
        let m = s.prepare("b", "", Labels::new()).await?;
        let upper = PathBuf::from(&m[0].source);
        assert_ne!(
            upper, orphan,
            "the crashed Prepare's id was handed out again"
        );
        assert!(!upper.join("secret").exists());
        Ok(())
    }

    #[tokio::test]
    async fn walk_reports_a_damaged_record() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let db = crate::meta::tests::open_db(&d.path().join("db"));
        let s = open(d.path(), &db)?;
        s.prepare("a", "", Labels::new()).await?;
        s.commit("base", "a", Labels::new()).await?;
        s.view("child", "base", Labels::new()).await?;
        let cf = db
            .cf_handle(crate::schema::CF_BY_KEY)
            .ok_or_else(|| Error::Internal("no cf".into()))?;
        db.put_cf(
            cf,
            crate::schema::Keys::new("strata").snapshot("child"),
            [9u8, 9, 9],
        )?;
        for filter in [&["parent==base"][..], &[]] {
            let f = strata_proto::filters::Filter::parse_all(filter).expect("filter");
            let (tx, mut rx) = mpsc::channel(4);
            let w = tokio::spawn({
                let s = s.clone();
                async move { s.walk(f, tx).await }
            });
            while rx.recv().await.is_some() {}
            let r = w.await.map_err(Error::from)?;
            assert!(matches!(r, Err(Error::Corrupt { .. })), "{filter:?}: {r:?}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod volatile_tests {
    use super::*;

    #[tokio::test]
    async fn volatile_mounts_and_a_durable_commit() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let db = crate::meta::tests::open_db(&d.path().join("db"));
        let s = OverlaySnapshotter::new(
            MetaStore::open(db, "v")?,
            OverlayConfig {
                root: d.path().join("snaps"),
                index_off: Some(false),
                userxattr: Some(true),
                volatile: true,
                extra_options: vec!["metacopy=off".into()],
                ..Default::default()
            },
        )?;
        s.prepare("a", "", Labels::new()).await?;
        s.commit("base", "a", Labels::new()).await?;
        let m = s.prepare("c", "base", Labels::new()).await?;
        let o = &m[0].options;
        assert!(o.contains(&"volatile".to_string()), "{o:?}");
        assert!(o.contains(&"userxattr".to_string()), "{o:?}");
        assert!(o.contains(&"metacopy=off".to_string()), "{o:?}");
        assert!(!o.contains(&"index=off".to_string()), "{o:?}");
        // Views never get `volatile`: they have no upper dir.
        let v = s.view("v", "base", Labels::new()).await?;
        assert_eq!(v[0].kind, "bind");
        // Commit syncs the layer's filesystem (syncfs) and records usage.
        std::fs::write(d.path().join("snaps/2/fs/f"), b"data")
            .map_err(|e| Error::io("write", e))?;
        s.commit("top", "c", Labels::new()).await?;
        assert!(s.usage("top").await?.inodes >= 2);
        Ok(())
    }
}
