//! Layers unpacked ahead of their Prepare, so that the layers of one image
//! unpack concurrently although containerd prepares them one at a time.
//!
//! A fast-path Prepare takes (claims) its layer's job, started by an
//! earlier Prepare of the same image or now, and starts jobs for the next
//! few layers above it that are not here yet (as many as the unpacker runs
//! at once), then waits for its own. A job unpacks into the directory of a
//! reserved id (no parent needed: an overlayfs layer is extracted on its
//! own; [`strata_unpack::adopt_parents`] gives the few directories that take
//! their attributes from a lower layer those attributes once the parent is
//! known). The unpacker's slots bound how many jobs run at once, taken in
//! the order the jobs were started (bottom layer first), each job on a
//! thread of its own.
//!
//! Nothing a job makes is visible before the Prepare that claims it
//! commits it, and its blob is kept (committed to the content store) only
//! then. A finished job that nobody claims (an abandoned pull) is dropped
//! after [`UNCLAIMED_TTL`], with its directory; after a crash, start-up
//! removes it as any directory with no record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::meta::ReservedId;
use crate::remote::{LayerRequest, RemoteError, Unpacked, Unpacker};

/// How long a finished job waits for its Prepare.
pub const UNCLAIMED_TTL: Duration = Duration::from_secs(600);

/// A layer unpacked into `<root>/<id>/fs`, not yet recorded.
pub(crate) struct Staged {
    id: Option<ReservedId>,
    dir: PathBuf,
    pub unpacked: Unpacked,
}

impl Staged {
    /// The id, to record the layer under; the directory is the record's
    /// from then on (it is no longer removed when this is dropped).
    pub fn take_id(&mut self) -> Option<ReservedId> {
        self.id.take()
    }

    /// Its directory (`<root>/<id>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Still ours: nobody recorded it. Removed (off whatever thread this
        // is) before the id is released, so a new reservation never meets it.
        if let Some(id) = self.id.take() {
            let dir = std::mem::take(&mut self.dir);
            let removed = std::thread::Builder::new()
                .name("strata-unclaimed".into())
                .spawn(move || {
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(dir = %dir.display(), error = %e, "removing an unclaimed layer failed; Cleanup will");
                        }
                    }
                    drop(id);
                });
            if let Err(e) = removed {
                tracing::warn!(error = %e, "no thread to remove an unclaimed layer; Cleanup will");
            }
        }
    }
}

/// What a job ends with.
pub(crate) enum Outcome {
    /// The layer is in its directory, both digests checked.
    Staged(Box<Staged>),
    /// The registry could not give it: the Prepare falls back.
    Fallback(RemoteError),
    /// Anything else: the Prepare fails.
    Failed(crate::Error),
}

struct Job {
    done: Mutex<Option<(Outcome, Instant)>>,
    cv: Condvar,
    claimed: std::sync::atomic::AtomicBool,
}

impl Job {
    fn new() -> Arc<Job> {
        Arc::new(Job {
            done: Mutex::new(None),
            cv: Condvar::new(),
            claimed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Outcome, Instant)>> {
        self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self, o: Outcome) {
        let mut g = self.lock();
        if g.is_none() {
            *g = Some((o, Instant::now()));
        }
        drop(g);
        self.cv.notify_all();
    }
}

/// Ends a job as failed if its task is dropped before it finished (the
/// runtime shutting down), so that no Prepare waits forever.
struct FinishOnDrop(Option<Arc<Job>>);

impl FinishOnDrop {
    fn finish(mut self, o: Outcome) {
        if let Some(j) = self.0.take() {
            j.finish(o);
        }
    }
}

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if let Some(j) = self.0.take() {
            j.finish(Outcome::Failed(crate::Error::Internal(
                "the unpack job was stopped (shutting down)".into(),
            )));
        }
    }
}

/// A job taken by its Prepare: waits for it, and takes it out of the table
/// when dropped.
pub(crate) struct Claim<'a> {
    ahead: &'a Ahead,
    key: String,
    job: Arc<Job>,
}

impl Claim<'_> {
    /// Blocks until the job is done.
    pub fn wait(&self) -> Outcome {
        let mut g = self.job.lock();
        loop {
            if let Some((o, _)) = g.take() {
                return o;
            }
            g = self.job.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut jobs = self.ahead.lock();
        if jobs
            .get(&self.key)
            .is_some_and(|j| Arc::ptr_eq(j, &self.job))
        {
            jobs.remove(&self.key);
        }
    }
}

/// The jobs of one snapshotter.
#[derive(Default)]
pub(crate) struct Ahead {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

/// A job's key: the layer, of this image (its manifest, or reference), kept
/// or not (the client that keeps it records the blob).
fn key(req: &LayerRequest) -> String {
    let image = match &req.manifest {
        Some(m) => m.to_string(),
        None => req.image.to_string(),
    };
    format!("{}|{image}|{}", req.layer, req.keep_blob)
}

/// A job to run: its id and directory.
pub(crate) type Reserve<'r> = &'r dyn Fn() -> Result<(ReservedId, PathBuf), crate::Error>;

impl Ahead {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a job for `req` unless one is there (claimed or not); `reserve`
    /// gives its id and directory. Whether one was started.
    pub fn start(
        &self,
        unpacker: &Arc<Unpacker>,
        req: &LayerRequest,
        userxattr: bool,
        reserve: Reserve<'_>,
    ) -> Result<bool, crate::Error> {
        let mut jobs = self.lock();
        let k = key(req);
        if jobs.contains_key(&k) {
            return Ok(false);
        }
        let (id, dir) = reserve()?;
        let job = spawn(unpacker.clone(), req.clone(), id, dir, userxattr)?;
        jobs.insert(k, job);
        Ok(true)
    }

    /// Claims the job for `req`: the one started ahead, or one started now.
    /// (A second Prepare of a layer whose job is claimed gets a job of its
    /// own; the first to record the layer wins.)
    pub fn claim(
        &self,
        unpacker: &Arc<Unpacker>,
        req: &LayerRequest,
        userxattr: bool,
        reserve: Reserve<'_>,
    ) -> Result<Claim<'_>, crate::Error> {
        let mut jobs = self.lock();
        let k = key(req);
        if let Some(job) = jobs.get(&k) {
            if !job.claimed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return Ok(Claim {
                    ahead: self,
                    key: k,
                    job: job.clone(),
                });
            }
        }
        let (id, dir) = reserve()?;
        let job = spawn(unpacker.clone(), req.clone(), id, dir, userxattr)?;
        job.claimed.store(true, std::sync::atomic::Ordering::SeqCst);
        jobs.entry(k.clone()).or_insert_with(|| job.clone());
        Ok(Claim {
            ahead: self,
            key: k,
            job,
        })
    }

    /// Drops the unclaimed jobs that finished more than `ttl` ago (their
    /// directories are removed as they drop).
    pub fn expire(&self, ttl: Duration) -> usize {
        let expired: Vec<Arc<Job>> = {
            let mut jobs = self.lock();
            let old: Vec<String> = jobs
                .iter()
                .filter(|(_, j)| {
                    !j.claimed.load(std::sync::atomic::Ordering::SeqCst)
                        && j.lock().as_ref().is_some_and(|(_, at)| at.elapsed() > ttl)
                })
                .map(|(k, _)| k.clone())
                .collect();
            old.iter().filter_map(|k| jobs.remove(k)).collect()
        };
        let n = expired.len();
        if n > 0 {
            tracing::info!(
                layers = n,
                "dropped layers unpacked ahead that no Prepare took"
            );
        }
        n
    }
}

/// Runs the job on a thread of its own once the unpacker gives it a slot.
/// Must be called within a tokio runtime.
fn spawn(
    unpacker: Arc<Unpacker>,
    req: LayerRequest,
    id: ReservedId,
    dir: PathBuf,
    userxattr: bool,
) -> Result<Arc<Job>, crate::Error> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| crate::Error::Internal(format!("no runtime for an unpack job: {e}")))?;
    let job = Job::new();
    let guard = FinishOnDrop(Some(job.clone()));
    let slots = unpacker.slots();
    rt.clone().spawn(async move {
        let guard = guard;
        let outcome = match slots.acquire_owned().await {
            Err(e) => Outcome::Failed(crate::Error::Internal(format!("unpack slots: {e}"))),
            Ok(slot) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let layer = req.layer.to_string();
                let started = std::thread::Builder::new()
                    .name("strata-unpack".into())
                    .spawn(move || {
                        // The unpacker's blocking calls need the runtime.
                        let _rt = rt.enter();
                        let o = stage(&unpacker, &req, id, dir, userxattr);
                        drop(slot);
                        let _ = tx.send(o);
                    });
                match started {
                    Err(e) => Outcome::Failed(crate::Error::io("spawn an unpack thread", e)),
                    Ok(_) => rx.await.unwrap_or_else(|_| {
                        Outcome::Failed(crate::Error::Internal(format!(
                            "the unpack job of layer {layer} ended without a result"
                        )))
                    }),
                }
            }
        };
        guard.finish(outcome);
    });
    Ok(job)
}

/// The job itself: make the directory, unpack without lowers.
fn stage(
    unpacker: &Unpacker,
    req: &LayerRequest,
    id: ReservedId,
    dir: PathBuf,
    userxattr: bool,
) -> Outcome {
    let made = (|| {
        use std::os::unix::fs::DirBuilderExt;
        let mut b = std::fs::DirBuilder::new();
        b.mode(0o700).create(&dir)?;
        b.mode(0o755).create(dir.join("fs"))?;
        // The umask may have narrowed it.
        std::fs::set_permissions(
            dir.join("fs"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&dir);
        return Outcome::Failed(crate::Error::io(format!("create {}", dir.display()), e));
    }
    match unpacker.unpack(req, &dir.join("fs"), Vec::new(), userxattr) {
        Ok(unpacked) => Outcome::Staged(Box::new(Staged {
            id: Some(id),
            dir,
            unpacked,
        })),
        Err(e) => {
            // The directory goes before the id is released.
            let _ = std::fs::remove_dir_all(&dir);
            drop(id);
            if e.falls_back() {
                Outcome::Fallback(e)
            } else {
                Outcome::Failed(crate::Error::FailedPrecondition(e.to_string()))
            }
        }
    }
}
