//! `containerd.services.content.v1.Content` over the [`ContentStore`]: wire
//! conversion, the Write stream protocol as containerd's own content server
//! runs it, and errors mapped to gRPC codes in one place
//! (`From<Error> for Status`).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use strata_proto::content as pb;
use strata_proto::content::content_server::Content;
use strata_proto::filters::Filter;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::store::{self, ContentStore, Info, Writer};

/// Largest data field in one Read response.
const READ_MESSAGE_BYTES: usize = 1 << 20;

/// The gRPC content service.
#[derive(Clone)]
pub struct ContentService {
    store: ContentStore,
}

impl ContentService {
    /// Serves `store`.
    pub fn new(store: ContentStore) -> Self {
        ContentService { store }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::content_server::ContentServer<Self> {
        pb::content_server::ContentServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ContentStore) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let s = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(Error::from)??)
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn to_pb(i: Info) -> pb::Info {
    pb::Info {
        digest: i.digest,
        size: i.size,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

fn status_pb(s: store::Status) -> pb::Status {
    pb::Status {
        started_at: Some(timestamp(s.started)),
        updated_at: Some(timestamp(s.updated)),
        r#ref: s.reference,
        offset: s.offset,
        total: s.total,
        expected: s.expected,
    }
}

fn filter(fs: &[String]) -> Result<Filter, Status> {
    Filter::parse_all(fs).map_err(|e| Status::from(Error::InvalidArgument(e.to_string())))
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One Write session: the messages of one stream, applied to one writer, as
/// containerd's content server does.
struct Session {
    store: ContentStore,
    writer: Writer,
    total: i64,
    expected: String,
}

impl Session {
    fn handle(&mut self, req: pb::WriteContentRequest) -> Result<pb::WriteContentResponse, Error> {
        let ws = self.writer.status();
        let mut msg = pb::WriteContentResponse {
            action: req.action,
            offset: ws.offset,
            ..Default::default()
        };
        if !req.expected.is_empty() {
            store::validate_digest(&req.expected)?;
            self.expected = req.expected.clone();
            if self.store.info(&req.expected).is_ok() {
                let _ = self.store.abort(&ws.reference);
                return Err(Error::AlreadyExists(format!(
                    "blob with expected digest {} exists",
                    req.expected
                )));
            }
        }
        if req.total < 0 {
            return Err(Error::InvalidArgument(format!(
                "negative total {}",
                req.total
            )));
        }
        if req.total > 0 {
            self.total = req.total;
            self.writer.set_total(req.total);
        }
        match pb::WriteAction::try_from(req.action) {
            Ok(pb::WriteAction::Stat) => {
                msg.digest = self.writer.digest();
                msg.started_at = Some(timestamp(ws.started));
                msg.updated_at = Some(timestamp(ws.updated));
                msg.total = self.total;
            }
            Ok(action @ (pb::WriteAction::Write | pb::WriteAction::Commit)) => {
                if req.offset < 0 {
                    return Err(Error::InvalidArgument(format!(
                        "negative write offset {}",
                        req.offset
                    )));
                }
                if req.offset > 0 && req.offset != ws.offset {
                    return Err(Error::OutOfRange(format!(
                        "write @{} must occur at current offset {}",
                        req.offset, ws.offset
                    )));
                }
                // Bytes past the expected total could never commit: refuse
                // them before they are stored (or the ingest truncated). A
                // commit without data past it is Commit's size error.
                let start = if req.offset == 0 { 0 } else { ws.offset };
                let end = start.saturating_add(i64::try_from(req.data.len()).unwrap_or(i64::MAX));
                if !req.data.is_empty() && self.total > 0 && end > self.total {
                    return Err(Error::OutOfRange(format!(
                        "write of {} bytes @{start} goes past the expected total of {} bytes",
                        req.data.len(),
                        self.total
                    )));
                }
                if req.offset == 0 && ws.offset > 0 {
                    self.writer.truncate()?;
                    msg.offset = 0;
                }
                if !req.data.is_empty() {
                    self.writer.write(&req.data)?;
                    msg.offset += req.data.len() as i64;
                }
                if action == pb::WriteAction::Commit {
                    let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
                    self.writer.commit(self.total, &self.expected, labels)?;
                }
                // Every answer carries the running digest: containerd's
                // clients read Writer.Digest() after a Commit that returned
                // AlreadyExists (stargz-snapshotter's converter does), and
                // that answer is an error, so the last Write answer is all
                // they have. Hashing lazily broke `ctr-remote image convert`.
                msg.digest = self.writer.digest();
            }
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "unknown write action {}",
                    req.action
                )))
            }
        }
        Ok(msg)
    }
}

async fn run_session(
    store: ContentStore,
    first: pb::WriteContentRequest,
    mut rest: Streaming<pb::WriteContentRequest>,
    tx: mpsc::Sender<Result<pb::WriteContentResponse, Status>>,
) {
    let (reference, total, expected) = (first.r#ref.clone(), first.total, first.expected.clone());
    let opened = {
        let s = store.clone();
        let e = expected.clone();
        tokio::task::spawn_blocking(move || s.writer(&reference, total, &e)).await
    };
    let writer = match opened.map_err(Error::from).and_then(|r| r) {
        Ok(w) => w,
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    let mut session = Some(Session {
        store,
        writer,
        total,
        expected,
    });
    let mut req = first;
    loop {
        let commit = req.action == pb::WriteAction::Commit as i32;
        let Some(mut s) = session.take() else { return };
        let (s, result) = match tokio::task::spawn_blocking(move || {
            let r = s.handle(req);
            (s, r)
        })
        .await
        {
            Ok(v) => v,
            Err(e) => {
                let _ = tx.send(Err(Error::from(e).into())).await;
                return;
            }
        };
        session = Some(s);
        let failed = result.is_err();
        if tx.send(result.map_err(Status::from)).await.is_err() || failed || commit {
            break;
        }
        req = match rest.message().await {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => break,
        };
    }
    // Dropping the writer touches the DB: off the async workers.
    if let Some(s) = session {
        let _ = tokio::task::spawn_blocking(move || drop(s)).await;
    }
}

#[tonic::async_trait]
impl Content for ContentService {
    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let d = req.into_inner().digest;
        let info = match self.store.info_nonblocking(&d) {
            Some(r) => r?,
            None => self.blocking(move |s| s.info(&d)).await?,
        };
        Ok(Response::new(pb::InfoResponse {
            info: Some(to_pb(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        let r = req.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update needs the content's info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = Info {
            digest: i.digest,
            size: i.size,
            created: UNIX_EPOCH,
            updated: UNIX_EPOCH,
            labels: i.labels.into_iter().collect(),
        };
        let info = self.blocking(move |s| s.update(info, &paths)).await?;
        Ok(Response::new(pb::UpdateResponse {
            info: Some(to_pb(info)),
        }))
    }

    type ListStream = Stream_<pb::ListContentResponse>;

    async fn list(
        &self,
        req: Request<pb::ListContentRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let f = filter(&req.into_inner().filters)?;
        let (tx, rx) = mpsc::channel(4);
        let s = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut batch = Vec::with_capacity(128);
            let r = s.walk(&f, |i| {
                batch.push(to_pb(i));
                if batch.len() == 128 {
                    let msg = pb::ListContentResponse {
                        info: std::mem::take(&mut batch),
                    };
                    return tx.blocking_send(Ok(msg)).is_ok();
                }
                true
            });
            let _ = match r {
                Ok(()) if !batch.is_empty() => {
                    tx.blocking_send(Ok(pb::ListContentResponse { info: batch }))
                }
                Ok(()) => Ok(()),
                Err(e) => tx.blocking_send(Err(e.into())),
            };
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delete(&self, req: Request<pb::DeleteContentRequest>) -> Result<Response<()>, Status> {
        let d = req.into_inner().digest;
        self.blocking(move |s| s.delete(&d)).await?;
        Ok(Response::new(()))
    }

    type ReadStream = Stream_<pb::ReadContentResponse>;

    async fn read(
        &self,
        req: Request<pb::ReadContentRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let r = req.into_inner();
        let (offset, size) = (r.offset, r.size);
        // One blocking task does it all; an error (NotFound, OutOfRange)
        // reaches the client as the stream's status.
        let (tx, rx) = mpsc::channel(4);
        let s = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf: Vec<u8> = Vec::with_capacity(READ_MESSAGE_BYTES);
            let mut buf_off = 0u64;
            let res = s.read(&r.digest, offset, size, |pos, piece| {
                if buf.is_empty() {
                    buf_off = pos;
                }
                buf.extend_from_slice(piece);
                if buf.len() >= READ_MESSAGE_BYTES {
                    let data = std::mem::replace(&mut buf, Vec::with_capacity(READ_MESSAGE_BYTES));
                    let msg = pb::ReadContentResponse {
                        offset: buf_off as i64,
                        data,
                    };
                    return tx.blocking_send(Ok(msg)).is_ok();
                }
                true
            });
            let _ = match res {
                Ok(()) if !buf.is_empty() => tx.blocking_send(Ok(pb::ReadContentResponse {
                    offset: buf_off as i64,
                    data: buf,
                })),
                Ok(()) => Ok(()),
                Err(e) => tx.blocking_send(Err(e.into())),
            };
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let r = req.into_inner().r#ref;
        let st = self.blocking(move |s| s.status(&r)).await?;
        Ok(Response::new(pb::StatusResponse {
            status: Some(status_pb(st)),
        }))
    }

    async fn list_statuses(
        &self,
        req: Request<pb::ListStatusesRequest>,
    ) -> Result<Response<pb::ListStatusesResponse>, Status> {
        let f = filter(&req.into_inner().filters)?;
        let sts = self.blocking(move |s| s.list_statuses(&f)).await?;
        Ok(Response::new(pb::ListStatusesResponse {
            statuses: sts.into_iter().map(status_pb).collect(),
        }))
    }

    type WriteStream = Stream_<pb::WriteContentResponse>;

    async fn write(
        &self,
        req: Request<Streaming<pb::WriteContentRequest>>,
    ) -> Result<Response<Self::WriteStream>, Status> {
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("write stream closed before its first message")
        })?;
        if first.r#ref.is_empty() {
            return Err(Status::invalid_argument(
                "first message must have a reference",
            ));
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(run_session(self.store.clone(), first, stream, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn abort(&self, req: Request<pb::AbortRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner().r#ref;
        self.blocking(move |s| s.abort(&r)).await?;
        Ok(Response::new(()))
    }
}
