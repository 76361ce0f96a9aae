//! Layers unpacked ahead of their Prepare, so that the layers of one image
//! unpack concurrently although containerd prepares them one at a time.
//!
//! The first fast-path Prepare of an image starts a job for its own layer
//! and for every layer above it that is not here yet; each later Prepare
//! takes its layer's job and waits for it. A job unpacks into the directory
//! of a reserved id (no parent needed: an overlayfs layer is extracted on
//! its own; [`strata_unpack::adopt_parents`] fixes the few directories that
//! take their attributes from a lower layer once the parent is known). How
//! many jobs run at once is bounded by the unpacker's slots, taken in the
//! order the jobs were started (bottom layer first).
//!
//! Nothing a job makes is visible before the Prepare that takes it commits
//! it. A finished job that nobody takes (an abandoned pull) is dropped after
//! [`UNCLAIMED_TTL`], and its directory removed; after a crash, start-up
//! removes it as any directory with no record.

use std::collections::HashMap;
use std::path::PathBuf;
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
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Still ours: nobody recorded it. Removed before the id is released,
        // so a new reservation can never meet it.
        if self.id.is_some() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "removing an unclaimed layer failed; Cleanup will");
                }
            }
        }
    }
}

/// What a job ends with.
pub(crate) enum Outcome {
    /// The layer is in its directory, both digests checked.
    Staged(Staged),
    /// The registry could not give it: the Prepare falls back.
    Fallback(RemoteError),
    /// Anything else: the Prepare fails.
    Failed(crate::Error),
}

struct Job {
    done: Mutex<Option<(Outcome, Instant)>>,
    cv: Condvar,
}

impl Job {
    fn finish(&self, o: Outcome) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = Some((o, Instant::now()));
        self.cv.notify_all();
    }
}

/// A job taken by its Prepare.
pub(crate) struct Claim(Arc<Job>);

impl Claim {
    /// Blocks until the job is done.
    pub fn wait(self) -> Outcome {
        let mut g = self.0.done.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some((o, _)) = g.take() {
                return o;
            }
            g = self.0.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The jobs of one snapshotter, by layer.
#[derive(Default)]
pub(crate) struct Ahead {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

/// A job's key: the same layer kept or not are different jobs (the client
/// that keeps it records the blob).
fn key(req: &LayerRequest) -> String {
    format!("{}|{}", req.layer, req.keep_blob)
}

impl Ahead {
    /// Whether a job for this layer is waiting to be taken.
    pub fn has(&self, req: &LayerRequest) -> bool {
        self.lock().contains_key(&key(req))
    }

    /// Starts a job that unpacks `req` into `<dir>/fs` (`dir` is the
    /// reserved id's directory, not yet made) on a blocking thread once the
    /// unpacker gives it a slot; [`Ahead::claim`] takes it. Must be called
    /// within a tokio runtime.
    pub fn start(
        &self,
        unpacker: Arc<Unpacker>,
        req: LayerRequest,
        id: ReservedId,
        dir: PathBuf,
        userxattr: bool,
    ) -> Result<(), crate::Error> {
        let k = key(&req);
        let job = spawn(unpacker, req, id, dir, userxattr)?;
        self.lock().insert(k, job);
        Ok(())
    }

    /// The job for `req`: the one started ahead, or else one started now
    /// with the id and directory `reserve` gives. Nobody else can take it.
    pub fn claim(
        &self,
        unpacker: &Arc<Unpacker>,
        req: &LayerRequest,
        userxattr: bool,
        reserve: impl FnOnce() -> Result<(ReservedId, PathBuf), crate::Error>,
    ) -> Result<Claim, crate::Error> {
        if let Some(job) = self.lock().remove(&key(req)) {
            return Ok(Claim(job));
        }
        let (id, dir) = reserve()?;
        Ok(Claim(spawn(
            unpacker.clone(),
            req.clone(),
            id,
            dir,
            userxattr,
        )?))
    }

    /// Drops the finished jobs that waited longer than `ttl` (their
    /// directories are removed as they drop).
    pub fn expire(&self, ttl: Duration) -> usize {
        let expired: Vec<Arc<Job>> = {
            let mut jobs = self.lock();
            let old: Vec<String> = jobs
                .iter()
                .filter(|(_, j)| {
                    j.done
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .is_some_and(|(_, at)| at.elapsed() > ttl)
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn spawn(
    unpacker: Arc<Unpacker>,
    req: LayerRequest,
    id: ReservedId,
    dir: PathBuf,
    userxattr: bool,
) -> Result<Arc<Job>, crate::Error> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| crate::Error::Internal(format!("no runtime for an unpack job: {e}")))?;
    let job = Arc::new(Job {
        done: Mutex::new(None),
        cv: Condvar::new(),
    });
    let slots = unpacker.slots();
    let j = job.clone();
    rt.spawn(async move {
        let layer = req.layer.to_string();
        let outcome = match slots.acquire_owned().await {
            Err(e) => Outcome::Failed(crate::Error::Internal(format!("unpack slots: {e}"))),
            Ok(_slot) => {
                let run =
                    tokio::task::spawn_blocking(move || stage(&unpacker, &req, id, dir, userxattr));
                match run.await {
                    Ok(o) => o,
                    Err(e) => Outcome::Failed(crate::Error::Internal(format!(
                        "unpack job of layer {layer}: {e}"
                    ))),
                }
            }
        };
        j.finish(outcome);
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
        Ok(unpacked) => Outcome::Staged(Staged {
            id: Some(id),
            dir,
            unpacked,
        }),
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
