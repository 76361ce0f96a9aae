//! `strata pull IMAGE`: pulls an image into containerd with strata doing the
//! work. containerd 1.6's `ctr image pull` passes no remote-snapshot labels,
//! so this is a client of containerd's own API (on containerd's socket):
//!
//! 1. resolve the image in the registry (strata's client: hosts.toml,
//!    credentials, retries);
//! 2. under a lease, write the manifest (and index) and the config into
//!    containerd's content store, with containerd's GC labels;
//! 3. prepare each layer on the snapshotter with the remote-snapshot labels:
//!    strata's snapshotter fetches and unpacks it and answers AlreadyExists
//!    (the fast path); a snapshotter that does not take the labels returns
//!    mounts, and the layer is downloaded into containerd's content store
//!    and applied by containerd's Diff service instead;
//! 4. label the config with the top snapshot (`gc.ref.snapshot.NAME`) and
//!    create (or update) the image, so `ctr run` finds it unpacked and
//!    `ctr image rm` + GC remove everything.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest, DeleteRequest, Image, Info,
    UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use sha2::{Digest as _, Sha256};
use strata_lazy::estargz::TOC_DIGEST_ANNOTATION;
use strata_registry::{Client, ClientConfig, Credentials, Platform, Reference};
use strata_snapshotter::lazy::LAZY_LABEL;
use strata_snapshotter::remote::{
    CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, KEEP_BLOB_LABEL,
    KEPT_BLOB_LABEL, TARGET_REF, UNPACKED_LABEL,
};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// What to pull, and from and into where.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd's socket.
    pub address: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// The snapshotter to unpack with.
    pub snapshotter: String,
    /// The platform to pick from an index.
    pub platform: Platform,
    /// Plain HTTP to every registry host.
    pub plain_http: bool,
    /// `user:password` for the registry.
    pub user: Option<String>,
    /// containerd's hosts.toml directory (`config_path`).
    pub hosts_dir: Option<PathBuf>,
    /// Print a line per layer.
    pub progress: bool,
}

/// How a layer got into the snapshotter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPath {
    /// Its snapshot was there already.
    Present,
    /// The snapshotter fetched and unpacked it (remote-snapshot labels).
    Snapshotter,
    /// Downloaded into containerd and applied by containerd's Diff service.
    Containerd,
    /// Mounted lazily by the snapshotter (eStargz on `strata-lazy`): its
    /// files are fetched when read.
    Lazy,
}

/// One layer's outcome.
#[derive(Debug, Clone)]
pub struct LayerOutcome {
    /// The layer digest.
    pub digest: String,
    /// Its compressed size.
    pub size: i64,
    /// The chain id it was committed as.
    pub chain_id: String,
    /// How.
    pub path: LayerPath,
    /// Whether its compressed blob is in containerd's content store.
    pub blob: bool,
    /// How long it took.
    pub took: Duration,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The image name as recorded in containerd.
    pub name: String,
    /// The image's target digest.
    pub target: String,
    /// Each layer, bottom first.
    pub layers: Vec<LayerOutcome>,
    /// The whole pull.
    pub took: Duration,
}

/// The chain ids of `diff_ids` (OCI image spec): the first is its diff_id,
/// each next one `sha256(parent + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(p) => format!("sha256:{:x}", Sha256::digest(format!("{p} {d}").as_bytes())),
        };
        out.push(next);
    }
    out
}

/// RFC 3339 (UTC, seconds) of a time: containerd's `gc.expire` label, and
/// the date of bench reports.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Every layer digest, comma-separated, cut to fit containerd's 4096-byte
/// label limit (as stargz-snapshotter does).
fn image_layers_label(digests: &[String]) -> String {
    let mut out = String::new();
    for d in digests {
        let extra = d.len() + usize::from(!out.is_empty());
        if CRI_IMAGE_LAYERS.len() + out.len() + extra > 4000 {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(d);
    }
    out
}

/// containerd's API on one channel, every request in one namespace and
/// (once taken) one lease.
struct Api {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Api {
    /// An ingest ref unique to this pull, so that two pulls of one image do
    /// not contend for a ref.
    fn ingest_ref(&self, digest: &str) -> String {
        format!(
            "{}-{digest}",
            self.lease.as_deref().unwrap_or("strata-pull")
        )
    }
}

impl Api {
    fn req<T>(&self, msg: T) -> Result<Request<T>> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "containerd-namespace",
            self.namespace
                .parse()
                .context("namespace is not a valid header value")?,
        );
        if let Some(l) = &self.lease {
            r.metadata_mut()
                .insert("containerd-lease", l.parse().context("lease id")?);
        }
        Ok(r)
    }

    fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    /// Sends `msg` (one Commit, with or without data) as a whole Write
    /// stream. `Ok(false)`: the blob exists already (AlreadyExists).
    async fn commit_one(&self, msg: WriteContentRequest) -> Result<bool> {
        let sent = async {
            let mut s = self
                .content()
                .write(self.req(tokio_stream::iter(vec![msg]))?)
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
            Ok::<_, anyhow::Error>(())
        }
        .await;
        match sent {
            Ok(()) => Ok(true),
            Err(e)
                if e.downcast_ref::<tonic::Status>()
                    .is_some_and(|s| s.code() == Code::AlreadyExists) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes `data` as a blob with `labels`; an existing blob gets the
    /// labels added.
    async fn put_blob(
        &self,
        reference: &str,
        digest: &str,
        data: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let msg = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: reference.to_string(),
            total: data.len() as i64,
            expected: digest.to_string(),
            offset: 0,
            data: data.to_vec(),
            labels: labels.clone(),
        };
        match self.commit_one(msg).await {
            Ok(true) => Ok(()),
            Ok(false) => self.label_blob(digest, labels).await,
            Err(e) => Err(e.context(format!("writing {digest} into containerd's content store"))),
        }
    }

    /// Records in containerd's namespace a blob that its content store
    /// holds already (strata's `keep_blobs`), without sending a byte:
    /// containerd's default "shared" content policy commits a writer whose
    /// expected digest the store has. Returns whether it was recorded.
    async fn record_kept(
        &self,
        digest: &str,
        size: i64,
        labels: HashMap<String, String>,
    ) -> Result<bool> {
        let reference = self.ingest_ref(digest);
        let msg = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: reference.clone(),
            total: size,
            expected: digest.to_string(),
            // A shared writer stands at the blob's end; offset 0 would
            // truncate it into an ordinary, empty one.
            offset: size,
            data: Vec::new(),
            labels: labels.clone(),
        };
        match self.commit_one(msg).await {
            Ok(true) => Ok(true),
            Ok(false) => {
                self.label_blob(digest, labels).await?;
                Ok(true)
            }
            Err(e) => {
                // The store does not have it (no keep_blobs, or another
                // snapshotter): drop the empty ingest and go on.
                tracing::debug!(digest, error = %e, "layer blob not kept");
                let _ =
                    self.content()
                        .abort(self.req(containerd_client::services::v1::AbortRequest {
                            r#ref: reference,
                        })?)
                        .await;
                Ok(false)
            }
        }
    }

    /// Adds `labels` to an existing blob.
    async fn label_blob(&self, digest: &str, labels: HashMap<String, String>) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(self.req(UpdateRequest {
                info: Some(Info {
                    digest: digest.to_string(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            })?)
            .await
            .with_context(|| format!("labelling {digest}"))?;
        Ok(())
    }

    /// Streams a layer from the registry into containerd's content store.
    async fn download(
        &self,
        registry: &Client,
        image: &Reference,
        layer: &strata_registry::Digest,
        size: u64,
    ) -> Result<()> {
        use futures_util::StreamExt;
        let digest = layer.to_string();
        let mut blob = registry
            .fetch_blob(image, layer, Some(size))
            .await
            .with_context(|| format!("fetching {digest}"))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let reference = self.ingest_ref(&digest);
        let writer = {
            let req = self.req(tokio_stream::wrappers::ReceiverStream::new(rx))?;
            let mut content = self.content();
            tokio::spawn(async move {
                let mut s = content.write(req).await?.into_inner();
                while s.message().await?.is_some() {}
                Ok::<_, tonic::Status>(())
            })
        };
        let mut offset = 0i64;
        while let Some(piece) = blob.next().await {
            let piece = piece.with_context(|| format!("fetching {digest}"))?;
            let n = piece.len() as i64;
            let msg = WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: reference.clone(),
                total: size as i64,
                expected: digest.clone(),
                offset,
                data: piece.to_vec(),
                labels: HashMap::new(),
            };
            if tx.send(msg).await.is_err() {
                break;
            }
            offset += n;
        }
        let _ = tx
            .send(WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: reference,
                total: size as i64,
                expected: digest.clone(),
                offset,
                data: Vec::new(),
                labels: HashMap::new(),
            })
            .await;
        drop(tx);
        match writer.await.context("content writer")? {
            Ok(()) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => {
                Err(anyhow::Error::new(s).context(format!("writing {digest} into containerd")))
            }
        }
    }
}

/// Pulls `image` into containerd; see the module docs.
pub async fn pull(image: &str, opts: &PullOptions) -> Result<PullReport> {
    let start = Instant::now();
    let reference =
        Reference::parse(image).with_context(|| format!("image reference {image:?}"))?;
    let mut cfg = ClientConfig::default();
    cfg.config_path = opts.hosts_dir.clone();
    cfg.plain_http = opts.plain_http;
    cfg.credentials = opts
        .user
        .as_deref()
        .map(Credentials::parse)
        .transpose()
        .context("--user must be user:password")?;
    let registry = Client::new(cfg).context("registry client")?;
    let resolved = registry
        .resolve(&reference, &opts.platform)
        .await
        .with_context(|| format!("resolving {reference}"))?;
    let layers = resolved.layers();
    let diff_ids = resolved.config.value.rootfs().diff_ids().clone();
    if diff_ids.len() != layers.len() {
        bail!(
            "{reference}: {} layers but {} diff_ids in its config",
            layers.len(),
            diff_ids.len()
        );
    }
    let chains = chain_ids(&diff_ids);
    let layer_digests: Vec<String> = layers.iter().map(|l| l.digest().to_string()).collect();
    let name = reference.to_string();

    let channel = crate::client::connect(&opts.address)
        .await
        .with_context(|| format!("containerd at {}", opts.address.display()))?;
    let mut api = Api {
        channel,
        namespace: opts.namespace.clone(),
        lease: None,
    };
    // Everything below is held by a lease until the image references it;
    // if this process dies, the lease expires (24 h) and GC cleans up.
    let lease_id = format!(
        "strata-pull-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    LeasesClient::new(api.channel.clone())
        .create(api.req(CreateRequest {
            id: lease_id.clone(),
            labels: HashMap::from([(
                "containerd.io/gc.expire".to_string(),
                // containerd's own client default: a pull may take long.
                rfc3339(SystemTime::now() + Duration::from_secs(24 * 3600)),
            )]),
        })?)
        .await
        .context("creating a lease in containerd")?;
    api.lease = Some(lease_id.clone());
    let result = pull_leased(
        &api,
        &registry,
        &reference,
        &resolved,
        &chains,
        &layer_digests,
        opts,
    )
    .await;
    // The image (or nothing) now holds what was pulled: the lease goes
    // (a request under a lease cannot delete it).
    api.lease = None;
    let _ = LeasesClient::new(api.channel.clone())
        .delete(api.req(DeleteRequest {
            id: lease_id,
            sync: false,
        })?)
        .await;
    let outcomes = result?;
    Ok(PullReport {
        name,
        target: resolved.target_digest().to_string(),
        layers: outcomes,
        took: start.elapsed(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn pull_leased(
    api: &Api,
    registry: &Client,
    reference: &Reference,
    resolved: &strata_registry::ResolvedImage,
    chains: &[String],
    layer_digests: &[String],
    opts: &PullOptions,
) -> Result<Vec<LayerOutcome>> {
    let manifest = &resolved.manifest;
    let config = &resolved.config;
    let diff_ids = config.value.rootfs().diff_ids();
    let manifest_digest = manifest.digest.to_string();
    let config_digest = config.digest.to_string();
    let top = chains.last().cloned().unwrap_or_default();

    // Content first, with the labels containerd's GC follows.
    let mut labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        config_digest.clone(),
    )]);
    for (i, d) in layer_digests.iter().enumerate() {
        labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), d.clone());
    }
    api.put_blob(
        &api.ingest_ref(&config_digest),
        &config_digest,
        &config.bytes,
        HashMap::from([(
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            top.clone(),
        )]),
    )
    .await?;
    api.put_blob(
        &api.ingest_ref(&manifest_digest),
        &manifest_digest,
        &manifest.bytes,
        labels,
    )
    .await?;
    if let Some(index) = &resolved.index {
        let d = index.digest.to_string();
        api.put_blob(
            &api.ingest_ref(&d),
            &d,
            &index.bytes,
            HashMap::from([(
                "containerd.io/gc.ref.content.m.0".to_string(),
                manifest_digest.clone(),
            )]),
        )
        .await?;
    }

    // Layers, bottom first: each Prepare needs its parent committed.
    let all_layers = image_layers_label(layer_digests);
    let mut out = Vec::with_capacity(chains.len());
    let mut snaps = api.snapshots();
    let n = chains.len();
    // Layers whose blob strata is still committing (kept in the background).
    let mut pending = Vec::new();
    for (i, (layer, chain)) in resolved.layers().iter().zip(chains).enumerate() {
        let t = Instant::now();
        let mut kept_pending = false;
        let mut unpacked: Option<String> = None;
        let digest = layer.digest().to_string();
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let present = snaps
            .stat(api.req(StatSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: chain.clone(),
            })?)
            .await
            .is_ok();
        let path = if present {
            LayerPath::Present
        } else {
            let key = format!(
                "extract-{}-{chain}",
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            );
            let prepared = snaps
                .prepare(
                    api.req(PrepareSnapshotRequest {
                        snapshotter: opts.snapshotter.clone(),
                        key: key.clone(),
                        parent: parent.clone(),
                        labels: HashMap::from([
                            (TARGET_REF.to_string(), chain.clone()),
                            (CRI_IMAGE_REF.to_string(), reference.to_string()),
                            (CRI_LAYER_DIGEST.to_string(), digest.clone()),
                            (CRI_MANIFEST_DIGEST.to_string(), manifest_digest.clone()),
                            (CRI_IMAGE_LAYERS.to_string(), all_layers.clone()),
                            // It is recorded below: keep it.
                            (KEEP_BLOB_LABEL.to_string(), "true".to_string()),
                        ])
                        .into_iter()
                        // An eStargz layer's TOC digest, for a lazy snapshotter
                        // (containerd passes layer annotations under
                        // containerd.io/snapshot/ the same way).
                        .chain(
                            layer
                                .annotations()
                                .as_ref()
                                .and_then(|a| a.get(TOC_DIGEST_ANNOTATION))
                                .map(|d| (TOC_DIGEST_ANNOTATION.to_string(), d.clone())),
                        )
                        .collect(),
                    })?,
                )
                .await;
            match prepared {
                Err(s) if s.code() == Code::AlreadyExists => {
                    let info = snaps
                        .stat(api.req(StatSnapshotRequest {
                            snapshotter: opts.snapshotter.clone(),
                            key: chain.clone(),
                        })?)
                        .await
                        .with_context(|| {
                            format!(
                                "layer {digest}: the snapshotter said it exists but has no {chain}"
                            )
                        })?
                        .into_inner()
                        .info;
                    let lazy = info
                        .as_ref()
                        .is_some_and(|i| i.labels.contains_key(LAZY_LABEL));
                    if let Some(i) = &info {
                        kept_pending = i.labels.get(KEPT_BLOB_LABEL) == Some(&digest);
                        unpacked = i.labels.get(UNPACKED_LABEL).cloned();
                    }
                    if lazy {
                        LayerPath::Lazy
                    } else {
                        LayerPath::Snapshotter
                    }
                }
                Err(s) => {
                    return Err(anyhow::Error::new(s)
                        .context(format!("preparing layer {digest} on {}", opts.snapshotter)))
                }
                Ok(resp) => {
                    // The snapshotter took no labels: containerd applies it.
                    let mounts = resp.into_inner().mounts;
                    let applied = async {
                        api.download(registry, reference, layer.digest(), layer.size())
                            .await?;
                        DiffClient::new(api.channel.clone())
                            .apply(api.req(ApplyRequest {
                                diff: Some(Descriptor {
                                    media_type: layer.media_type().to_string(),
                                    digest: digest.clone(),
                                    size: layer.size() as i64,
                                    annotations: HashMap::new(),
                                }),
                                mounts,
                                payloads: HashMap::new(),
                                sync_fs: true,
                            })?)
                            .await
                            .with_context(|| format!("applying layer {digest}"))?;
                        snaps
                            .clone()
                            .commit(api.req(CommitSnapshotRequest {
                                snapshotter: opts.snapshotter.clone(),
                                name: chain.clone(),
                                key: key.clone(),
                                labels: HashMap::new(),
                            })?)
                            .await
                            .with_context(|| format!("committing layer {digest}"))?;
                        Ok::<_, anyhow::Error>(())
                    }
                    .await;
                    if let Err(e) = applied {
                        let _ = snaps
                            .remove(api.req(RemoveSnapshotRequest {
                                snapshotter: opts.snapshotter.clone(),
                                key,
                            })?)
                            .await;
                        return Err(e);
                    }
                    LayerPath::Containerd
                }
            }
        };
        // The blob: downloaded into containerd by the ordinary path; kept by
        // strata on the fast path, recorded here without a transfer.
        let uncompressed = HashMap::from([(
            strata_snapshotter::remote::UNCOMPRESSED_LABEL.to_string(),
            diff_ids[i].clone(),
        )]);
        let blob = match path {
            LayerPath::Containerd => true,
            // strata kept it: recorded at the end, with the others.
            LayerPath::Snapshotter if kept_pending => {
                pending.push((out.len(), digest.clone(), layer.size() as i64, uncompressed));
                false
            }
            _ => {
                api.record_kept(&digest, layer.size() as i64, uncompressed)
                    .await?
            }
        };
        let outcome = LayerOutcome {
            digest,
            size: layer.size() as i64,
            chain_id: chain.clone(),
            path,
            blob,
            took: t.elapsed(),
        };
        if opts.progress {
            // strata's own account: entries and bytes written.
            let detail = unpacked
                .as_deref()
                .map(|u| {
                    let field = |k: &str| {
                        u.split_whitespace()
                            .find_map(|f| f.strip_prefix(k).and_then(|v| v.parse::<u64>().ok()))
                            .unwrap_or(0)
                    };
                    format!(
                        " ({} entries, {:.1} MiB written)",
                        field("entries="),
                        field("bytes=") as f64 / (1 << 20) as f64
                    )
                })
                .unwrap_or_default();
            eprintln!(
                "layer {}/{n} {} {:.1} MiB: {}{detail}{} in {:.2} s",
                i + 1,
                outcome.digest,
                outcome.size as f64 / (1 << 20) as f64,
                match outcome.path {
                    LayerPath::Present => "already unpacked",
                    LayerPath::Snapshotter => "unpacked by the snapshotter",
                    LayerPath::Lazy => "mounted lazily (eStargz)",
                    LayerPath::Containerd => "downloaded and applied by containerd",
                },
                if outcome.blob {
                    ", blob in content"
                } else if kept_pending {
                    ", blob kept by strata"
                } else {
                    ""
                },
                outcome.took.as_secs_f64()
            );
        }
        out.push(outcome);
    }

    // The blobs strata kept (committed before its Prepare answered); a
    // bounded wait covers a store that is slow to show them.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (idx, digest, size, labels) in pending {
        loop {
            if api.record_kept(&digest, size, labels.clone()).await? {
                if let Some(o) = out.get_mut(idx) {
                    o.blob = true;
                }
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    digest,
                    "strata did not finish keeping the layer's blob in time"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The image last: from here on it holds everything above.
    let target = match &resolved.index {
        Some(i) => Descriptor {
            media_type: i.media_type.clone(),
            digest: i.digest.to_string(),
            size: i.bytes.len() as i64,
            annotations: HashMap::new(),
        },
        None => Descriptor {
            media_type: manifest.media_type.clone(),
            digest: manifest_digest.clone(),
            size: manifest.bytes.len() as i64,
            annotations: HashMap::new(),
        },
    };
    let image = Image {
        name: reference.to_string(),
        labels: HashMap::new(),
        target: Some(target),
        created_at: None,
        updated_at: None,
    };
    let mut images = ImagesClient::new(api.channel.clone());
    match images
        .create(api.req(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        })?)
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            images
                .update(api.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                    source_date_epoch: None,
                })?)
                .await
                .context("updating the image in containerd")?;
        }
        Err(s) => return Err(anyhow::Error::new(s).context("creating the image in containerd")),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let d = vec![
            "sha256:a".to_string(),
            "sha256:b".to_string(),
            "sha256:c".to_string(),
        ];
        let c = chain_ids(&d);
        assert_eq!(c[0], "sha256:a");
        assert_eq!(
            c[1],
            format!("sha256:{:x}", Sha256::digest(b"sha256:a sha256:b"))
        );
        assert_eq!(
            c[2],
            format!(
                "sha256:{:x}",
                Sha256::digest(format!("{} sha256:c", c[1]).as_bytes())
            )
        );
    }

    #[test]
    fn expiry_is_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            "2026-11-18T11:06:40Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn the_layers_label_fits_containerds_limit() {
        let many: Vec<String> = (0..200).map(|i| format!("sha256:{i:064x}")).collect();
        let l = image_layers_label(&many);
        assert!(CRI_IMAGE_LAYERS.len() + l.len() <= 4096);
        assert!(l.starts_with(&many[0]));
        assert_eq!(
            image_layers_label(&many[..2]),
            format!("{},{}", many[0], many[1])
        );
    }
}
