//! Lazy layers of the `strata-lazy` snapshotter: an eStargz layer is
//! mounted through FUSE ([`strata_lazy::fs`]) instead of being downloaded,
//! and its files are fetched by range request when they are read.
//!
//! A fast-path Prepare on a lazy snapshotter ([`crate::overlay`]) first
//! asks [`Lazy::mount_layer`]: the image's manifest (fetched by the digest
//! in the labels, so verified) must carry the layer's
//! `containerd.io/snapshot/stargz/toc.digest` annotation (and a Prepare
//! label of that name, if given, must agree); the footer and the TOC are
//! fetched by range, the TOC checked against that digest; the TOC is kept
//! beside the mount (`<id>/toc.gz`) so that a restart mounts the layer
//! again without the registry; the layer's implied parents take the lower
//! layers' attributes; the mount is made at `<id>/fs`; the files before the
//! prefetch landmark are fetched; then the snapshot is recorded. Any
//! failure before the record falls back to the ordinary fast path (the
//! whole layer unpacked), with a log line saying why.
//!
//! Every byte served is checked against its `chunkDigest` first; a chunk
//! that fails twice is EIO.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use strata_lazy::estargz::{Footer, Toc, FOOTER_SIZE, TOC_DIGEST_ANNOTATION};
use strata_lazy::fetch::{ChunkCache, Layer, RangeReader};
use strata_lazy::fs::{lower_dir, mount, LayerFs, Mounted};
use strata_registry::{Client, Digest, Reference};

use crate::remote::{LayerRequest, Unpacker};
use crate::types::{Labels, Usage};

/// On a lazy layer's record: the layer's digest (its TOC is `<id>/toc.gz`,
/// its image the record's `cri.image-ref` label).
pub const LAZY_LABEL: &str = "containerd.io/snapshot/strata.lazy";

/// Why a layer is not mounted lazily (the ordinary path is taken).
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// Not an eStargz layer of this image.
    #[error("not lazy: {0}")]
    NotLazy(String),
    /// The registry or the layer failed.
    #[error("{0}")]
    Failed(String),
}

/// How lazy layers are fetched and read.
#[derive(Debug, Clone, Copy)]
pub struct LazyOptions {
    /// Fetch the files before a layer's prefetch landmark before its
    /// Prepare answers.
    pub prefetch: bool,
    /// Fetch the rest of each layer in the background, at this many bytes
    /// a second (`None`: not at all; stopped when the snapshot goes).
    pub background: Option<u64>,
    /// Open fully cached files through FUSE passthrough where the kernel
    /// has it.
    pub passthrough: bool,
}

/// The lazy layers of one snapshotter.
pub struct Lazy {
    unpacker: Arc<Unpacker>,
    cache: Arc<ChunkCache>,
    opts: LazyOptions,
    mounts: Mutex<HashMap<u64, (Mounted, Arc<Layer>)>>,
    /// Lazy layers that could not be mounted again after a restart.
    broken: Mutex<std::collections::HashSet<u64>>,
    /// Layers waiting for the background fetch.
    queue: Arc<Mutex<Queue>>,
}

/// How long the background fetch waits after the last mount.
pub const BACKGROUND_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

struct Queue {
    layers: std::collections::VecDeque<(Arc<Layer>, String)>,
    last_mount: std::time::Instant,
    running: bool,
}

/// Fetches the queued layers one at a time, then ends.
fn background_worker(queue: Arc<Mutex<Queue>>, rate: u64) {
    loop {
        let next = {
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.last_mount.elapsed() < BACKGROUND_DELAY {
                None
            } else {
                match q.layers.pop_front() {
                    Some(l) => Some(l),
                    None => {
                        q.running = false;
                        return;
                    }
                }
            }
        };
        let Some((layer, digest)) = next else {
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        };
        if layer.is_cancelled() {
            continue;
        }
        let t = std::time::Instant::now();
        match layer.fetch_all(8 << 20, rate) {
            Ok(n) if layer.is_cancelled() => {
                tracing::info!(layer = %digest, chunks = n, "background fetch stopped: the layer was removed")
            }
            Ok(n) => tracing::info!(
                layer = %digest,
                chunks = n,
                ms = t.elapsed().as_millis() as u64,
                "fetched the whole layer in the background"
            ),
            Err(e) => {
                tracing::warn!(layer = %digest, error = %e, "background fetch failed; files are fetched when read")
            }
        }
    }
}

/// Where a lazy layer's TOC is kept, in its snapshot directory.
pub const KEPT_TOC: &str = "toc.gz";

/// The first line of [`KEPT_TOC`].
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept {
    image: String,
    layer: String,
    toc_digest: String,
    toc_offset: u64,
    footer_size: u64,
}

/// Range reads of one blob through strata's registry client.
struct RegistryRange {
    rt: tokio::runtime::Handle,
    client: Client,
    image: Reference,
    digest: Digest,
}

impl RangeReader for RegistryRange {
    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        self.rt
            .block_on(
                self.client
                    .fetch_range(&self.image, &self.digest, offset, len),
            )
            .map(|b| b.to_vec())
            .map_err(std::io::Error::other)
    }
}

fn failed(what: &str) -> impl Fn(strata_registry::Error) -> LazyError + '_ {
    move |e| LazyError::Failed(format!("{what}: {e}"))
}

impl Lazy {
    /// Lazy layers fetched through `unpacker`'s registry client, their
    /// chunks cached in `cache` (which several snapshotters may share).
    pub fn new(unpacker: Arc<Unpacker>, cache: Arc<ChunkCache>, opts: LazyOptions) -> Lazy {
        Lazy {
            unpacker,
            cache,
            opts,
            mounts: Mutex::new(HashMap::new()),
            broken: Mutex::new(std::collections::HashSet::new()),
            queue: Arc::new(Mutex::new(Queue {
                layers: std::collections::VecDeque::new(),
                last_mount: std::time::Instant::now(),
                running: false,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Mounted, Arc<Layer>)>> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mounts `req`'s layer at `<dir>/fs` (an empty directory) if it is
    /// eStargz, keeping its TOC at `<dir>/toc.gz`. `lowers`: the parent
    /// chain's layer directories, nearest first. Blocking (call it on a
    /// blocking thread of the runtime). Returns the labels to record.
    pub fn mount_layer(
        &self,
        id: u64,
        req: &LayerRequest,
        labels: &Labels,
        dir: &Path,
        lowers: &[PathBuf],
        userxattr: bool,
    ) -> Result<(Labels, Usage), LazyError> {
        let (size, annotated) = self
            .unpacker
            .toc_digest(req)
            .map_err(|e| LazyError::NotLazy(e.to_string()))?;
        let Some(toc_digest) = annotated else {
            return Err(LazyError::NotLazy(format!(
                "layer {} has no {TOC_DIGEST_ANNOTATION} annotation",
                req.layer
            )));
        };
        if let Some(l) = labels.get(TOC_DIGEST_ANNOTATION) {
            if *l != toc_digest {
                return Err(LazyError::NotLazy(format!(
                    "the Prepare's {TOC_DIGEST_ANNOTATION} {l} is not the manifest's {toc_digest}"
                )));
            }
        }
        let rt = tokio::runtime::Handle::current();
        let client = self.unpacker.client();
        let tail_len = size.min(FOOTER_SIZE + 16);
        let tail = rt
            .block_on(client.fetch_range(&req.image, &req.layer, size - tail_len, tail_len))
            .map_err(failed("fetching the footer"))?;
        let footer = Footer::parse(&tail, size).map_err(|e| LazyError::NotLazy(e.to_string()))?;
        let toc_len = size - footer.size - footer.toc_offset;
        if toc_len > strata_lazy::estargz::MAX_TOC_GZ_BYTES {
            return Err(LazyError::NotLazy(format!(
                "the TOC would be {toc_len} bytes (at most {} are read)",
                strata_lazy::estargz::MAX_TOC_GZ_BYTES
            )));
        }
        let toc_gz = rt
            .block_on(client.fetch_range(&req.image, &req.layer, footer.toc_offset, toc_len))
            .map_err(failed("fetching the TOC"))?;
        let toc = Toc::parse(&toc_gz, footer, Some(&toc_digest))
            .map_err(|e| LazyError::NotLazy(e.to_string()))?;
        // Kept for a restart, with what it needs (labels can be changed by
        // any client; this file only by strata): a JSON line, then the TOC.
        let head = Kept {
            image: req.image.to_string(),
            layer: req.layer.to_string(),
            toc_digest: toc_digest.clone(),
            toc_offset: footer.toc_offset,
            footer_size: footer.size,
        };
        let mut kept = serde_json::to_vec(&head)
            .map_err(|e| LazyError::Failed(format!("keeping the TOC: {e}")))?;
        kept.push(b'\n');
        kept.extend_from_slice(&toc_gz);
        write_synced(&dir.join(KEPT_TOC), &kept)
            .map_err(|e| LazyError::Failed(format!("keeping the TOC: {e}")))?;
        let layer = self.mount_toc(id, toc, req, dir, lowers, userxattr)?;
        if self.opts.prefetch && layer.toc().prefetch_end > 0 {
            let t = std::time::Instant::now();
            match layer.prefetch(layer.toc().prefetch_end, 8 << 20) {
                Ok(n) => {
                    tracing::info!(layer = %req.layer, chunks = n, ms = t.elapsed().as_millis() as u64, "prefetched the landmark's files")
                }
                Err(e) => {
                    tracing::warn!(layer = %req.layer, error = %e, "prefetch failed; files are fetched when read")
                }
            }
        }
        self.start_background(&layer, &req.layer);
        let mut out = labels.clone();
        out.insert(LAZY_LABEL.to_string(), req.layer.to_string());
        out.insert(TOC_DIGEST_ANNOTATION.to_string(), toc_digest);
        let (bytes, inodes) = layer.toc().usage();
        let usage = Usage {
            size: i64::try_from(bytes).unwrap_or(i64::MAX),
            inodes: i64::try_from(inodes).unwrap_or(i64::MAX),
        };
        Ok((out, usage))
    }

    fn mount_toc(
        &self,
        id: u64,
        mut toc: Toc,
        req: &LayerRequest,
        dir: &Path,
        lowers: &[PathBuf],
        userxattr: bool,
    ) -> Result<Arc<Layer>, LazyError> {
        toc.adopt_parents(|p| lower_dir(lowers, p));
        let reader = Arc::new(RegistryRange {
            rt: tokio::runtime::Handle::current(),
            client: self.unpacker.client().clone(),
            image: req.image.clone(),
            digest: req.layer.clone(),
        });
        // Chunks are shared in the cache within one repository only.
        let scope = format!("{}/{}", req.image.registry(), req.image.repository());
        let layer = Arc::new(Layer::new(
            Arc::new(toc),
            reader,
            self.cache.clone(),
            &scope,
        ));
        let m = mount(
            LayerFs::new(layer.clone(), userxattr, self.opts.passthrough),
            &dir.join("fs"),
            &format!("strata-lazy:{}", req.layer),
        )
        .map_err(|e| LazyError::Failed(format!("mounting the layer: {e}")))?;
        self.lock().insert(id, (m, layer.clone()));
        Ok(layer)
    }

    /// Mounts a lazy layer recorded before a restart, from its kept TOC
    /// (`<dir>/toc.gz`, checked against its digest again).
    pub fn remount(
        &self,
        id: u64,
        dir: &Path,
        lowers: &[PathBuf],
        userxattr: bool,
    ) -> Result<(), LazyError> {
        let kept = std::fs::read(dir.join(KEPT_TOC))
            .map_err(|e| LazyError::Failed(format!("reading the kept TOC: {e}")))?;
        let nl = kept
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| LazyError::Failed("the kept TOC is damaged".into()))?;
        let head: Kept = serde_json::from_slice(&kept[..nl])
            .map_err(|e| LazyError::Failed(format!("the kept TOC is damaged: {e}")))?;
        let req = LayerRequest {
            target: String::new(),
            image: Reference::parse(&head.image)
                .map_err(|e| LazyError::Failed(format!("kept image {:?}: {e}", head.image)))?,
            layer: head
                .layer
                .parse()
                .map_err(|e| LazyError::Failed(format!("kept layer {:?}: {e}", head.layer)))?,
            manifest: None,
            keep_blob: false,
        };
        let footer = Footer {
            toc_offset: head.toc_offset,
            size: head.footer_size,
        };
        let toc = Toc::parse(&kept[nl + 1..], footer, Some(&head.toc_digest))
            .map_err(|e| LazyError::Failed(e.to_string()))?;
        let layer = self.mount_toc(id, toc, &req, dir, lowers, userxattr)?;
        self.start_background(&layer, &req.layer);
        Ok(())
    }

    /// Marks snapshot `id` as a lazy layer that could not be mounted: no
    /// snapshot on it gets mounts (an empty directory in its place would
    /// be a wrong filesystem).
    pub fn mark_broken(&self, id: u64) {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
    }

    /// The first of `ids` that is a lazy layer that could not be mounted.
    pub fn broken_among(&self, ids: &[u64]) -> Option<u64> {
        let b = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().copied().find(|i| b.contains(i))
    }

    /// Queues `layer` for the background fetch, if configured: one thread
    /// for all layers (so the rate is the whole snapshotter's), which waits
    /// until no layer was mounted for [`BACKGROUND_DELAY`] (a pull and its
    /// container's start come first) and then fetches one layer at a time.
    fn start_background(&self, layer: &Arc<Layer>, digest: &Digest) {
        let Some(rate) = self.opts.background else {
            return;
        };
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.last_mount = std::time::Instant::now();
        q.layers.push_back((layer.clone(), digest.to_string()));
        if q.running {
            return;
        }
        q.running = true;
        drop(q);
        let queue = self.queue.clone();
        let spawned = std::thread::Builder::new()
            .name("strata-lazy-fetch".into())
            .spawn(move || background_worker(queue, rate));
        if let Err(e) = spawned {
            self.queue.lock().unwrap_or_else(|p| p.into_inner()).running = false;
            tracing::warn!(error = %e, "no background fetch thread");
        }
    }

    /// Unmounts snapshot `id`'s layer, if it is lazy and mounted.
    pub fn unmount(&self, id: u64) {
        let m = self.lock().remove(&id);
        if let Some((m, layer)) = m {
            layer.cancel();
            if let Err(e) = m.unmount() {
                tracing::warn!(id, error = %e, "unmounting a lazy layer failed");
            }
        }
    }
}

/// Detaches every mount under `root` (left by a crashed run: a FUSE mount
/// whose daemon died answers ENOTCONN, and nothing can remove it).
pub fn detach_stale_mounts(root: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = root.to_string_lossy().into_owned();
    let mut stale: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&format!("{prefix}/")))
        .map(str::to_string)
        .collect();
    // Deepest first.
    stale.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in stale {
        match nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => tracing::info!(mount = %m, "detached a mount left by an earlier run"),
            Err(e) => tracing::warn!(mount = %m, error = %e, "could not detach a stale mount"),
        }
    }
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}
