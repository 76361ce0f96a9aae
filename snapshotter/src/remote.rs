//! The unpack fast path, through containerd's remote-snapshot protocol.
//!
//! containerd's unpacker (under CRI, or the 2.1+ transfer service with the
//! proxy plugin's `enable_remote_snapshot_annotations`) and `strata pull`
//! call Prepare with labels naming the layer: [`TARGET_REF`] (the chain id
//! the layer will be committed as), [`CRI_IMAGE_REF`], [`CRI_LAYER_DIGEST`],
//! [`CRI_MANIFEST_DIGEST`] and [`CRI_IMAGE_LAYERS`]. Then strata itself
//!
//! 1. finds the layer's expected diff_id: the manifest (by digest) and its
//!    config from the registry, cached per manifest;
//! 2. fetches the blob with several range requests in flight
//!    ([`strata_registry::Client::fetch_blob_parallel`]);
//! 3. decompresses and extracts it into the new snapshot's directory
//!    ([`strata_unpack::apply`], path-safe, whiteouts as overlayfs's, missing
//!    parents from the lower layers), checking the compressed digest and the
//!    diff_id on the way;
//!
//! and the overlay snapshotter syncs the layer's filesystem once, commits it
//! under the target and answers AlreadyExists, so containerd neither
//! downloads nor unpacks it. A digest that does not match fails the Prepare;
//! a registry that cannot be reached falls back to the ordinary Prepare (a
//! log line says why), and containerd does the work.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use strata_registry::{Client, ClientConfig, Digest, Manifest, ParallelOptions, Reference};

use crate::types::Labels;

/// The key the layer is committed as (containerd's `snapshots.TargetRefLabel`).
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
/// The image reference (CRI's label, also set by the transfer service and
/// `strata pull`).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The layer's compressed digest.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// The image manifest's digest.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Every layer digest of the image, bottom first, comma-separated.
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// The image reference as stargz-snapshotter's `ctr-remote image rpull`
/// passes it (no manifest digest: the image is resolved by reference).
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// The layer digest as `ctr-remote image rpull` passes it.
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

/// Why the fast path did not unpack a layer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The labels are malformed.
    #[error("remote-snapshot labels: {0}")]
    Labels(String),
    /// The registry could not give the layer, its manifest or config: the
    /// ordinary path may still work (containerd may have the blob).
    #[error("fetching {what}: {source}")]
    Fetch {
        /// What was being fetched.
        what: String,
        /// Why it failed.
        source: strata_registry::Error,
    },
    /// The layer is not what the image says it is.
    #[error("layer {layer}: {msg}")]
    Mismatch {
        /// The layer digest.
        layer: String,
        /// What did not match.
        msg: String,
    },
    /// Extraction failed (an unsafe entry, a damaged archive, the disk).
    #[error("unpacking layer {layer}: {source}")]
    Unpack {
        /// The layer digest.
        layer: String,
        /// Why.
        source: strata_unpack::Error,
    },
}

impl RemoteError {
    /// Whether the ordinary path should be tried instead: only when the
    /// registry could not be reached or refused, never for bad data.
    pub fn falls_back(&self) -> bool {
        matches!(self, RemoteError::Fetch { .. } | RemoteError::Labels(_))
    }
}

/// One layer to unpack, from Prepare's labels.
#[derive(Debug, Clone)]
pub struct LayerRequest {
    /// The key to commit the layer as.
    pub target: String,
    /// The image.
    pub image: Reference,
    /// The layer's digest.
    pub layer: Digest,
    /// The manifest's digest, when given.
    pub manifest: Option<Digest>,
    /// Whether the client asked for the blob to be kept.
    pub keep_blob: bool,
}

impl LayerRequest {
    /// The request in `labels`, if they carry one (target, image and layer;
    /// the manifest is optional).
    pub fn from_labels(labels: &Labels) -> Option<Result<LayerRequest, RemoteError>> {
        let target = labels.get(TARGET_REF)?;
        let image = labels
            .get(CRI_IMAGE_REF)
            .or_else(|| labels.get(STARGZ_REFERENCE))?;
        let layer = labels
            .get(CRI_LAYER_DIGEST)
            .or_else(|| labels.get(STARGZ_DIGEST))?;
        Some((|| {
            let digest = |s: &str| {
                s.parse::<Digest>()
                    .map_err(|e| RemoteError::Labels(format!("digest {s:?}: {e}")))
            };
            Ok(LayerRequest {
                target: target.clone(),
                image: Reference::parse(image)
                    .map_err(|e| RemoteError::Labels(format!("image {image:?}: {e}")))?,
                layer: digest(layer)?,
                manifest: labels
                    .get(CRI_MANIFEST_DIGEST)
                    .map(|m| digest(m))
                    .transpose()?,
                keep_blob: labels.get(KEEP_BLOB_LABEL).is_some_and(|v| v == "true"),
            })
        })())
    }
}

/// Set on a Prepare by a client that will record the layer's blob in
/// containerd's namespace (`strata pull`): only then is the blob kept, so
/// that a blob no client records is never left in the store. (containerd
/// passes a snapshotter only labels under `containerd.io/snapshot/`.)
pub const KEEP_BLOB_LABEL: &str = "containerd.io/snapshot/strata.keep-blob";

/// On a layer committed by the fast path whose blob was kept: the blob's
/// digest.
pub const KEPT_BLOB_LABEL: &str = "containerd.io/snapshot/strata.kept-blob";

/// On a layer committed by the fast path: what its unpack did
/// (`entries=N bytes=N compressed=N ms=N`), for the client's progress.
pub const UNPACKED_LABEL: &str = "containerd.io/snapshot/strata.unpacked";

/// containerd's label of a layer blob with its uncompressed digest.
pub const UNCOMPRESSED_LABEL: &str = "containerd.io/uncompressed";

/// Hands the tee's blob writer back when `apply` is done with the reader
/// (it takes the reader by value).
struct KeepOnDrop<R> {
    tee: Option<Tee<R>>,
    out: std::sync::mpsc::Sender<Option<Box<dyn BlobWrite>>>,
}

impl<R: std::io::Read> std::io::Read for KeepOnDrop<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.tee.as_mut() {
            Some(t) => t.read(buf),
            None => Ok(0),
        }
    }
}

impl<R> Drop for KeepOnDrop<R> {
    fn drop(&mut self) {
        if let Some(t) = self.tee.take() {
            let _ = self.out.send(t.keep);
        }
    }
}

/// A layer of a manifest: its size and the diff_id its config gives it.
#[derive(Debug, Clone)]
struct LayerInfo {
    digest: String,
    size: u64,
    diff_id: String,
    /// The eStargz TOC digest annotation, if any.
    toc_digest: Option<String>,
}

/// The chain id of a layer with `diff_id` on a parent with chain id
/// `parent` (OCI image spec: `sha256(parent + " " + diff_id)`).
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    use sha2::Digest as _;
    match parent {
        None => diff_id.to_string(),
        Some(p) => format!(
            "sha256:{:x}",
            sha2::Sha256::digest(format!("{p} {diff_id}").as_bytes())
        ),
    }
}

/// A layer of the image a Prepare named, as [`Unpacker::plan`] lists them.
#[derive(Debug, Clone)]
pub struct PlannedLayer {
    /// The layer's digest.
    pub digest: Digest,
    /// The chain id it is committed as.
    pub chain_id: String,
    /// Whether the manifest gives it an eStargz TOC digest.
    pub estargz: bool,
}

/// Fetches and unpacks layers for the overlay snapshotter.
pub struct Unpacker {
    client: Client,
    parallel: ParallelOptions,
    /// Layers by manifest digest, bottom first: one manifest and config
    /// fetch per image.
    layers: Mutex<HashMap<String, Arc<Vec<LayerInfo>>>>,
    /// Layers fetched and unpacked at once, across every image.
    slots: Arc<tokio::sync::Semaphore>,
    layers_at_once: usize,
    /// Where the compressed blob is kept as it streams by (`keep_blobs`).
    blobs: Option<Arc<dyn BlobSink>>,
}

/// Keeps a layer's compressed blob while it is unpacked (the content store,
/// with `keep_blobs`), so that export, push and a later re-unpack work.
pub trait BlobSink: Send + Sync {
    /// A writer for blob `digest` of `size` bytes; `None` if it is kept
    /// already (or cannot be now: keeping is best effort, never a reason to
    /// fail an unpack).
    fn writer(&self, digest: &str, size: u64) -> Option<Box<dyn BlobWrite>>;
}

/// One blob being kept.
pub trait BlobWrite: Send {
    /// Appends bytes.
    fn write(&mut self, data: &[u8]) -> std::io::Result<()>;
    /// Commits the blob (verified against its digest by the sink) with
    /// `labels`.
    fn commit(
        self: Box<Self>,
        labels: std::collections::BTreeMap<String, String>,
    ) -> std::io::Result<()>;
}

/// A reader that hands every byte it reads to a [`BlobWrite`] too; a
/// failed write stops keeping, not reading.
struct Tee<R> {
    inner: R,
    keep: Option<Box<dyn BlobWrite>>,
    layer: String,
}

impl<R: std::io::Read> std::io::Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(w) = self.keep.as_mut() {
            if let Err(e) = w.write(&buf[..n]) {
                tracing::warn!(layer = %self.layer, error = %e, "not keeping the layer's blob");
                self.keep = None;
            }
        }
        Ok(n)
    }
}

/// What an unpack did, for the log and the bench.
pub struct Unpacked {
    /// The extraction's report (digests, counts, time split).
    pub report: strata_unpack::Report,
    /// The verified blob, written but not committed: a layer unpacked
    /// ahead of its Prepare keeps its blob only if a Prepare takes it
    /// (dropped, the writer aborts its ingest).
    keep: Option<Box<dyn BlobWrite>>,
    /// Whether the blob was kept: the committed snapshot then carries
    /// [`KEPT_BLOB_LABEL`], so that the client knows to record it.
    pub keeping: bool,
    /// How long committing the kept blob took.
    pub keep_time: Option<std::time::Duration>,
}

impl Unpacked {
    /// Commits the kept blob into the content store (if it was being kept):
    /// before the Prepare that takes the layer answers, so the client can
    /// record it. A failure only logs: keeping is best effort.
    pub fn commit_kept(&mut self, layer: &Digest) {
        let Some(keep) = self.keep.take() else {
            return;
        };
        // Before the Prepare returns. Measured in `strata bench pull` on 2
        // cores: committing in the background made the whole pull slower
        // (the next layer's unpack and its syncfs competed with the
        // commit's hashing and pack writes).
        let labels = [(UNCOMPRESSED_LABEL.to_string(), self.report.diff_id.clone())].into();
        let t = std::time::Instant::now();
        match keep.commit(labels) {
            Ok(()) => {
                self.keeping = true;
                self.keep_time = Some(t.elapsed());
            }
            Err(e) => {
                tracing::warn!(layer = %layer, error = %e, "keeping the layer's blob failed")
            }
        }
    }
}

impl Unpacker {
    /// An unpacker with the registry settings `cfg`, `parallelism` range
    /// requests in flight per layer and `layers_at_once` layers unpacked at
    /// once.
    pub fn new(
        cfg: ClientConfig,
        parallelism: usize,
        layers_at_once: usize,
        blobs: Option<Arc<dyn BlobSink>>,
    ) -> Result<Unpacker, strata_registry::Error> {
        Ok(Unpacker {
            slots: Arc::new(tokio::sync::Semaphore::new(layers_at_once.max(1))),
            layers_at_once: layers_at_once.max(1),
            client: Client::new(cfg)?,
            parallel: ParallelOptions::new(
                ParallelOptions::default().range_size,
                parallelism.max(1),
            ),
            layers: Mutex::new(HashMap::new()),
            blobs,
        })
    }

    /// The slots that bound how many layers are unpacked at once (FIFO).
    pub(crate) fn slots(&self) -> Arc<tokio::sync::Semaphore> {
        self.slots.clone()
    }

    /// The registry client.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The layer's size and its eStargz TOC digest annotation in the
    /// image's manifest (checked against the manifest's digest when the
    /// request names it). Blocking.
    pub(crate) fn toc_digest(
        &self,
        req: &LayerRequest,
    ) -> Result<(u64, Option<String>), RemoteError> {
        let l = tokio::runtime::Handle::current().block_on(self.layer_info(req))?;
        Ok((l.size, l.toc_digest))
    }

    /// How many layers are unpacked at once.
    pub fn layers_at_once(&self) -> usize {
        self.layers_at_once
    }

    /// The layers of the request's image, bottom first, with their chain
    /// ids. Blocking (as [`Unpacker::unpack`]).
    pub fn plan(&self, req: &LayerRequest) -> Result<Vec<PlannedLayer>, RemoteError> {
        let layers = tokio::runtime::Handle::current().block_on(self.image_layers(req))?;
        let mut parent: Option<String> = None;
        let mut out = Vec::with_capacity(layers.len());
        for l in layers.iter() {
            let chain = chain_id(parent.as_deref(), &l.diff_id);
            out.push(PlannedLayer {
                digest: l
                    .digest
                    .parse()
                    .map_err(|e| RemoteError::Labels(format!("digest {:?}: {e}", l.digest)))?,
                chain_id: chain.clone(),
                estargz: l.toc_digest.is_some(),
            });
            parent = Some(chain);
        }
        Ok(out)
    }

    async fn layer_info(&self, req: &LayerRequest) -> Result<LayerInfo, RemoteError> {
        let (manifest, layers) = self.image_layers_of(req).await?;
        let layer = req.layer.to_string();
        // Labels that do not fit the registry's image (a moved tag, another
        // platform): containerd can still do it the ordinary way.
        layers
            .iter()
            .find(|l| l.digest == layer)
            .cloned()
            .ok_or_else(|| {
                RemoteError::Labels(format!(
                    "layer {} is not a layer of manifest {manifest}",
                    req.layer
                ))
            })
    }

    async fn image_layers(&self, req: &LayerRequest) -> Result<Arc<Vec<LayerInfo>>, RemoteError> {
        Ok(self.image_layers_of(req).await?.1)
    }

    /// The layers of the request's image: by its manifest digest, else by
    /// resolving its reference for this host's platform.
    async fn image_layers_of(
        &self,
        req: &LayerRequest,
    ) -> Result<(String, Arc<Vec<LayerInfo>>), RemoteError> {
        if let Some(k) = req.manifest.as_ref().map(|m| m.to_string()) {
            if let Some(l) = self
                .layers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&k)
            {
                return Ok((k, l.clone()));
            }
        }
        let fetch = |what: String| move |source| RemoteError::Fetch { what, source };
        let (manifest_digest, manifest) = match &req.manifest {
            Some(d) => {
                let m = self
                    .client
                    .fetch_manifest(&req.image.with_digest(d.clone()))
                    .await
                    .map_err(fetch(format!("manifest {d}")))?;
                match m.value {
                    Manifest::Image(im) => (d.to_string(), *im),
                    Manifest::Index(_) => {
                        return Err(RemoteError::Labels(format!(
                            "{CRI_MANIFEST_DIGEST} {d} names an index, not an image manifest"
                        )))
                    }
                }
            }
            None => {
                let r = self
                    .client
                    .resolve(&req.image, &strata_registry::Platform::host())
                    .await
                    .map_err(fetch(format!("image {}", req.image)))?;
                (r.manifest.digest.to_string(), r.manifest.value)
            }
        };
        let config_desc = manifest.config();
        let config = self
            .client
            .fetch_blob_bytes(&req.image, config_desc.digest(), Some(config_desc.size()))
            .await
            .map_err(fetch(format!("config {}", config_desc.digest())))?;
        let config: oci_spec::image::ImageConfiguration =
            serde_json::from_slice(&config).map_err(|e| RemoteError::Mismatch {
                layer: req.layer.to_string(),
                msg: format!("image config {} does not parse: {e}", config_desc.digest()),
            })?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(RemoteError::Mismatch {
                layer: req.layer.to_string(),
                msg: format!(
                    "manifest {manifest_digest} has {} layers but its config {} diff_ids",
                    manifest.layers().len(),
                    diff_ids.len()
                ),
            });
        }
        let layers: Arc<Vec<LayerInfo>> = Arc::new(
            manifest
                .layers()
                .iter()
                .zip(diff_ids)
                .map(|(l, d)| LayerInfo {
                    digest: l.digest().to_string(),
                    size: l.size(),
                    diff_id: d.clone(),
                    toc_digest: l
                        .annotations()
                        .as_ref()
                        .and_then(|a| a.get(strata_lazy::estargz::TOC_DIGEST_ANNOTATION))
                        .cloned(),
                })
                .collect(),
        );
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(manifest_digest.clone(), layers.clone());
        Ok((manifest_digest, layers))
    }

    /// Fetches the layer and applies it into `dir` (empty), with `lowers`
    /// (the parent chain's layer directories, nearest first) for missing
    /// parent directories; `userxattr` as the overlay mounts it. Blocking:
    /// call it on a blocking thread of a tokio runtime. On error, `dir` may
    /// hold part of the layer.
    pub fn unpack(
        &self,
        req: &LayerRequest,
        dir: &Path,
        lowers: Vec<PathBuf>,
        userxattr: bool,
    ) -> Result<Unpacked, RemoteError> {
        let rt = tokio::runtime::Handle::current();
        let info = rt.block_on(self.layer_info(req))?;
        let stream = rt
            .block_on(self.client.fetch_blob_parallel(
                &req.image,
                &req.layer,
                Some(info.size),
                &self.parallel,
            ))
            .map_err(|source| RemoteError::Fetch {
                what: format!("layer {}", req.layer),
                source,
            })?;
        let keep = self
            .blobs
            .as_ref()
            .filter(|_| req.keep_blob)
            .and_then(|b| b.writer(req.layer.as_ref(), info.size));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = Tee {
            inner: tokio_util::io::SyncIoBridge::new_with_handle(stream.into_reader(), rt),
            keep,
            layer: req.layer.to_string(),
        };
        let reader = KeepOnDrop {
            tee: Some(reader),
            out: tx,
        };
        let opts = strata_unpack::ApplyOptions {
            userxattr,
            lower_dirs: lowers,
            expected_digest: Some(req.layer.to_string()),
            expected_diff_id: Some(info.diff_id.clone()),
            ..Default::default()
        };
        let report = strata_unpack::apply(reader, dir, &opts).map_err(|source| {
            // The registry gave up mid-blob (after its retries): that is a
            // fetch failure, which may fall back; bad bytes are not.
            let fetch = match &source {
                strata_unpack::Error::Io { source: io, .. } => io
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<strata_registry::Error>())
                    .filter(|e| {
                        !matches!(
                            e,
                            strata_registry::Error::DigestMismatch { .. }
                                | strata_registry::Error::SizeMismatch { .. }
                        )
                    })
                    .is_some(),
                _ => false,
            };
            if fetch {
                RemoteError::Fetch {
                    what: format!("layer {}", req.layer),
                    source: strata_registry::Error::InvalidResponse(source.to_string()),
                }
            } else {
                RemoteError::Unpack {
                    layer: req.layer.to_string(),
                    source,
                }
            }
        })?;
        // `apply` read the blob to its end and checked both digests
        // (`expected_digest`, `expected_diff_id`): the blob may be kept, once
        // a Prepare takes the layer ([`Unpacked::commit_kept`]).
        let keep = match rx.try_recv() {
            Ok(Some(keep)) => Some(keep),
            _ => {
                tracing::debug!(layer = %req.layer, "layer blob not kept");
                None
            }
        };
        Ok(Unpacked {
            report,
            keep,
            keeping: false,
            keep_time: None,
        })
    }
}
