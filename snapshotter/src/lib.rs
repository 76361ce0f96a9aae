//! strata's snapshotters: the metadata store ([`meta`], keyspace in
//! [`schema`]), the overlayfs snapshotter ([`overlay`]) and the gRPC service
//! that routes containerd's requests to them by name ([`service`]).
//!
//! A Prepare goes: [`service::SnapshotService::prepare`] → the named
//! [`Snapshotter`] ([`overlay::OverlaySnapshotter::prepare`]) → on a blocking
//! thread, [`meta::MetaStore::begin_create`] (checks, id), the directory,
//! [`meta::MetaStore::finish_create`] (one synced batch).

mod ahead;
mod du;
pub mod error;
pub mod lazy;
mod locks;
pub mod meta;
pub mod overlay;
pub mod remote;
pub mod schema;
pub mod service;
mod types;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use error::{Error, Result};
pub use types::{Info, Kind, Labels, Mount, Usage};

/// A snapshotter, with containerd's semantics (`snapshots.Snapshotter`).
#[async_trait]
pub trait Snapshotter: Send + Sync {
    /// The snapshot's info. NotFound if there is none.
    async fn stat(&self, key: &str) -> Result<Info>;

    /// Updates labels (`labels`, `labels.KEY`; none: all labels).
    /// InvalidArgument for other field paths.
    async fn update(&self, info: Info, field_paths: Vec<String>) -> Result<Info>;

    /// Disk usage: stored at commit for a committed snapshot, measured now for
    /// an active one.
    async fn usage(&self, key: &str) -> Result<Usage>;

    /// The mounts of an active or view snapshot; FailedPrecondition for a
    /// committed one.
    async fn mounts(&self, key: &str) -> Result<Vec<Mount>>;

    /// Creates an active snapshot on `parent` (a committed key, or empty).
    /// AlreadyExists if `key` exists, NotFound if the parent does not,
    /// InvalidArgument if it is not committed.
    async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>>;

    /// Creates a read-only view of `parent`; errors as [`Snapshotter::prepare`].
    async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>>;

    /// Commits active `key` as `name` with `labels`. NotFound, AlreadyExists
    /// (name taken), FailedPrecondition (not active).
    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()>;

    /// Removes a snapshot. FailedPrecondition while it has children.
    async fn remove(&self, key: &str) -> Result<()>;

    /// Sends every snapshot that matches `filter`, in key order, in batches.
    async fn walk(
        &self,
        filter: strata_proto::filters::Filter,
        batches: mpsc::Sender<Vec<Info>>,
    ) -> Result<()>;

    /// Removes what no snapshot owns any more (directories left by Remove or
    /// by a crash).
    async fn cleanup(&self) -> Result<()>;
}
