//! `strata serve`: one daemon, one socket, one database.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use strata_content::service::ContentService;
use strata_content::ContentStore;
use strata_snapshotter::meta::MetaStore;
use strata_snapshotter::overlay::{OverlayConfig, OverlaySnapshotter};
use strata_snapshotter::remote::{BlobSink, BlobWrite, Unpacker};
use strata_snapshotter::service::SnapshotService;
use strata_snapshotter::Snapshotter;
use tokio::net::UnixListener;

use crate::config::{Config, SnapshotterConfig};

/// Binds the socket: refuses one that a live daemon answers on, replaces a
/// stale one. The socket is made in a fresh 0700 directory beside the
/// address, set to 0660 there and then renamed into place, so that nobody
/// but root can connect to it at any point, whatever the umask. A socket
/// directory strata creates is 0711, as containerd's.
fn bind(address: &Path) -> anyhow::Result<UnixListener> {
    let dir = match address.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&dir)
        .with_context(|| format!("creating socket directory {}", dir.display()))?;
    if address.exists() {
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            anyhow::bail!(
                "{} is in use by a running daemon: stop it or pick another --address",
                address.display()
            );
        }
        std::fs::remove_file(address)
            .with_context(|| format!("removing stale socket {}", address.display()))?;
    }
    let private = tempfile::Builder::new()
        .prefix(".strata-sock-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&dir)
        .with_context(|| format!("creating a private directory in {}", dir.display()))?;
    let staged = private.path().join("s");
    let listener = UnixListener::bind(&staged)
        .with_context(|| format!("listening on {}", staged.display()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", staged.display()))?;
    std::fs::rename(&staged, address)
        .with_context(|| format!("moving the socket to {}", address.display()))?;
    Ok(listener)
}

/// Creates strata's root readable by root alone (0700, as containerd's
/// snapshotters do), or closes one that an older strata left open.
fn private_root(root: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .with_context(|| format!("creating root {}", root.display()))?;
    let mode = std::fs::metadata(root)
        .with_context(|| format!("stat {}", root.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(root = %root.display(), mode = format!("{:o}", mode & 0o777), "closing a root others could enter (now 0700)");
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", root.display()))?;
    }
    Ok(())
}

/// `keep_blobs`: the fast path keeps a layer's compressed blob in the
/// content store as it streams by (committed only once verified), when the
/// client asks for it (`strata pull`, which then records it in containerd's
/// namespace without a transfer), so that export, push and re-unpack work.
/// Unasked, nothing is kept: no client would record it.
struct KeepBlobs(ContentStore);

impl BlobSink for KeepBlobs {
    fn writer(&self, digest: &str, size: u64) -> Option<Box<dyn BlobWrite>> {
        // (A blob the store has already: the writer is AlreadyExists.)
        let reference = format!("strata-unpack-{digest}");
        // A leftover of a crashed unpack of this layer (no writer holds it)
        // is not worth resuming: start over. One started with another size
        // is refused by the store: drop it and start over.
        let opened = match self.0.writer(&reference, size as i64, digest) {
            Err(strata_content::Error::FailedPrecondition(_)) => {
                let _ = self.0.abort(&reference);
                self.0.writer(&reference, size as i64, digest)
            }
            other => other,
        };
        match opened {
            Ok(mut w) => {
                if w.status().offset > 0 {
                    if let Err(e) = w.truncate() {
                        tracing::warn!(digest, error = %e, "not keeping the layer's blob");
                        return None;
                    }
                }
                Some(Box::new(KeepWriter {
                    store: self.0.clone(),
                    w: Some(w),
                    reference,
                    digest: digest.to_string(),
                    size: size as i64,
                }))
            }
            Err(e) => {
                tracing::debug!(digest, error = %e, "not keeping the layer's blob");
                None
            }
        }
    }
}

/// One kept blob: committed once verified, else its ingest is dropped (a
/// layer that failed is not worth resuming).
struct KeepWriter {
    store: ContentStore,
    w: Option<strata_content::store::Writer>,
    reference: String,
    digest: String,
    size: i64,
}

impl BlobWrite for KeepWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self.w.as_mut() {
            Some(w) => w.write(data).map_err(std::io::Error::other),
            None => Err(std::io::Error::other("blob writer closed")),
        }
    }

    fn commit(
        mut self: Box<Self>,
        labels: std::collections::BTreeMap<String, String>,
    ) -> std::io::Result<()> {
        let Some(mut w) = self.w.take() else {
            return Err(std::io::Error::other("blob writer closed"));
        };
        let r = match w.commit(self.size, &self.digest, labels) {
            Ok(_) | Err(strata_content::Error::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(std::io::Error::other(e)),
        };
        if r.is_err() {
            // Drop the writer (its lock) before the ingest.
            drop(w);
            let _ = self.store.abort(&self.reference);
        }
        r
    }
}

impl Drop for KeepWriter {
    fn drop(&mut self) {
        // Not committed: the unpack failed or was not verified.
        if let Some(w) = self.w.take() {
            drop(w);
            let _ = self.store.abort(&self.reference);
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop strata with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight requests"),
    }
}

/// Compacts the content store's packs now and then, off the async workers.
async fn compact_every(store: ContentStore, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.compact()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "content compaction failed"),
            Err(e) => tracing::warn!(error = %e, "content compaction panicked"),
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.validate()?;
    private_root(&cfg.root)?;
    let db_path = cfg.root.join("db");
    let db = {
        let (p, c) = (db_path.clone(), cfg.db.clone());
        tokio::task::spawn_blocking(move || crate::db::open(&p, &c)).await??
    };

    let store = if cfg.content.enabled {
        let store = {
            let (db, c) = (
                db.clone(),
                cfg.content.store_config(cfg.root.join("content")),
            );
            tokio::task::spawn_blocking(move || ContentStore::open(db, c, true))
                .await?
                .context("opening the content store")?
        };
        if cfg.content.compact_interval_secs > 0 {
            tokio::spawn(compact_every(
                store.clone(),
                std::time::Duration::from_secs(cfg.content.compact_interval_secs),
            ));
        }
        Some(store)
    } else {
        None
    };

    // One registry client for every snapshotter's fast path.
    let unpacker = if cfg.snapshotters.values().any(|s| match s {
        SnapshotterConfig::Overlay(o) => o.fast_unpack,
    }) {
        Some(Arc::new(
            Unpacker::new(
                cfg.registry.client_config(),
                cfg.registry.parallel_ranges,
                cfg.registry.layers_at_once,
                store
                    .clone()
                    .filter(|_| cfg.content.keep_blobs)
                    .map(|s| Arc::new(KeepBlobs(s)) as Arc<dyn BlobSink>),
            )
            .context("the registry client of the unpack fast path")?,
        ))
    } else {
        None
    };
    // One chunk cache for every lazy snapshotter.
    let lazy_cache = if cfg.snapshotters.values().any(|s| match s {
        SnapshotterConfig::Overlay(o) => o.lazy && o.fast_unpack,
    }) {
        Some(Arc::new(
            strata_lazy::fetch::ChunkCache::open(
                &cfg.root.join("lazy-cache"),
                cfg.lazy.cache_mib.saturating_mul(1 << 20),
            )
            .context("opening the lazy chunk cache")?,
        ))
    } else {
        None
    };
    let mut snapshotters: HashMap<String, Arc<dyn Snapshotter>> = HashMap::new();
    for (name, sc) in &cfg.snapshotters {
        let meta = MetaStore::open(db.clone(), name)
            .with_context(|| format!("opening snapshotter {name}"))?;
        let s: Arc<dyn Snapshotter> = match sc {
            SnapshotterConfig::Overlay(o) => Arc::new(
                OverlaySnapshotter::with_unpacker(
                    meta,
                    OverlayConfig {
                        root: cfg.root.join("snapshots").join(name),
                        upperdir_label: o.upperdir_label,
                        index_off: o.index_off,
                        userxattr: o.userxattr,
                        volatile: o.volatile,
                        extra_options: o.mount_options.clone(),
                    },
                    unpacker.clone().filter(|_| o.fast_unpack),
                    match (&unpacker, &lazy_cache) {
                        (Some(u), Some(c)) if o.lazy && o.fast_unpack => {
                            Some(Arc::new(strata_snapshotter::lazy::Lazy::new(
                                u.clone(),
                                c.clone(),
                                strata_snapshotter::lazy::LazyOptions {
                                    prefetch: cfg.lazy.prefetch,
                                    background: Some(
                                        cfg.lazy.background_mib_s.saturating_mul(1 << 20),
                                    )
                                    .filter(|&r| r > 0),
                                    passthrough: cfg.lazy.passthrough,
                                },
                            )))
                        }
                        _ => None,
                    },
                )
                .with_context(|| format!("starting snapshotter {name}"))?,
            ),
        };
        snapshotters.insert(name.clone(), s);
    }
    let names: Vec<String> = snapshotters.keys().cloned().collect();
    let service = SnapshotService::new(snapshotters);
    let content = store.map(|s| ContentService::new(s).into_server());

    let listener = bind(&cfg.address)?;
    tracing::info!(address = %cfg.address.display(), root = %cfg.root.display(), snapshotters = ?names, content = cfg.content.enabled, "strata serving");
    // Blobs stream through Write and Read: HTTP/2 windows large enough that
    // flow control does not cap a local transfer.
    let served = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .add_service(service.into_server())
        .add_optional_service(content)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown_signal(),
        )
        .await;
    let _ = std::fs::remove_file(&cfg.address);
    served.context("gRPC server failed")?;

    // In-flight requests have finished; the services are dropped. Flush so
    // the next start replays nothing.
    tokio::task::spawn_blocking(move || crate::db::flush(&db)).await??;
    tracing::info!("strata stopped cleanly");
    Ok(())
}
