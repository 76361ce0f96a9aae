//! `containerd.services.snapshots.v1.Snapshots` over any [`Snapshotter`]:
//! routes each request by its `snapshotter` name, converts between wire and
//! domain types, and maps errors to gRPC codes in one place
//! (`From<Error> for Status`). No snapshot logic lives here.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use strata_proto::filters::Filter;
use strata_proto::snapshots as pb;
use strata_proto::snapshots::snapshots_server::Snapshots;
use strata_proto::types::Mount as PbMount;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::types::{Info, Kind, Labels, Mount};
use crate::Snapshotter;

/// The gRPC service: snapshotters by the names containerd asks for.
#[derive(Clone)]
pub struct SnapshotService {
    snapshotters: Arc<HashMap<String, Arc<dyn Snapshotter>>>,
}

impl SnapshotService {
    /// Serves these snapshotters under their names.
    pub fn new(snapshotters: HashMap<String, Arc<dyn Snapshotter>>) -> Self {
        SnapshotService {
            snapshotters: Arc::new(snapshotters),
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::snapshots_server::SnapshotsServer<Self> {
        pb::snapshots_server::SnapshotsServer::new(self)
    }

    fn get(&self, name: &str) -> Result<&Arc<dyn Snapshotter>, Status> {
        self.snapshotters.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = self.snapshotters.keys().map(String::as_str).collect();
            known.sort_unstable();
            Status::not_found(format!(
                "snapshotter {name:?} not found: this strata serves {}",
                known.join(", ")
            ))
        })
    }
}

fn mounts(m: Vec<Mount>) -> Vec<PbMount> {
    m.into_iter()
        .map(|m| PbMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn labels(l: HashMap<String, String>) -> Labels {
    l.into_iter().collect()
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn from_timestamp(t: Option<prost_types::Timestamp>) -> SystemTime {
    t.map(|t| {
        UNIX_EPOCH
            + Duration::new(
                u64::try_from(t.seconds).unwrap_or(0),
                u32::try_from(t.nanos).unwrap_or(0),
            )
    })
    .unwrap_or(UNIX_EPOCH)
}

fn to_pb(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent,
        kind: match info.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(info.created)),
        updated_at: Some(timestamp(info.updated)),
        labels: info.labels.into_iter().collect(),
    }
}

fn from_pb(info: pb::Info) -> Info {
    Info {
        name: info.name,
        parent: info.parent,
        kind: match pb::Kind::try_from(info.kind) {
            Ok(pb::Kind::View) => Kind::View,
            Ok(pb::Kind::Committed) => Kind::Committed,
            _ => Kind::Active,
        },
        created: from_timestamp(info.created_at),
        updated: from_timestamp(info.updated_at),
        labels: info.labels.into_iter().collect::<BTreeMap<_, _>>(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .get(&r.snapshotter)?
            .prepare(&r.key, &r.parent, labels(r.labels))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .get(&r.snapshotter)?
            .view(&r.key, &r.parent, labels(r.labels))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let m = self.get(&r.snapshotter)?.mounts(&r.key).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.get(&r.snapshotter)?
            .commit(&r.name, &r.key, labels(r.labels))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.get(&r.snapshotter)?.remove(&r.key).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = self.get(&r.snapshotter)?.stat(&r.key).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(to_pb(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let s = self.get(&r.snapshotter)?;
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update needs the snapshot's info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = s.update(from_pb(info), paths).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(to_pb(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let s = self.get(&r.snapshotter)?.clone();
        let filter = Filter::parse_all(&r.filters)
            .map_err(|e| Status::from(Error::InvalidArgument(e.to_string())))?;
        let (btx, mut brx) = mpsc::channel::<Vec<Info>>(4);
        let (tx, rx) = mpsc::channel::<Result<pb::ListSnapshotsResponse, Status>>(4);
        let walker = tokio::spawn(async move { s.walk(filter, btx).await });
        tokio::spawn(async move {
            while let Some(batch) = brx.recv().await {
                let msg = pb::ListSnapshotsResponse {
                    info: batch.into_iter().map(to_pb).collect(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            let end = match walker.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => Status::from(e),
                Err(e) => Status::internal(format!("list failed: {e}")),
            };
            let _ = tx.send(Err(end)).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let u = self.get(&r.snapshotter)?.usage(&r.key).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.get(&r.snapshotter)?.cleanup().await?;
        Ok(Response::new(()))
    }
}
