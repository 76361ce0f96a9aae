//! gRPC clients of containerd's APIs over a unix socket: for the bench, the
//! CLI and the tests, against strata or any other proxy plugin.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use sha2::Digest;
use strata_proto::content as cpb;
use strata_proto::content::content_client::ContentClient;
use strata_proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// A channel to the gRPC server on `socket`.
pub async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    let path: PathBuf = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::try_from("http://[::]:0")?
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| format!("connecting to {}", socket.display()))
}

/// A snapshots client on `socket`.
pub async fn snapshots(socket: &Path) -> anyhow::Result<SnapshotsClient<Channel>> {
    Ok(SnapshotsClient::new(connect(socket).await?))
}

/// A content client on `socket`.
pub async fn content(socket: &Path) -> anyhow::Result<ContentClient<Channel>> {
    Ok(ContentClient::new(connect(socket).await?))
}

/// The Write messages of `data` under `reference`, `piece` bytes each (one
/// empty message for empty data), the last one committing with `digest`,
/// which the first and the last carry, as containerd's content client
/// sends them.
pub fn write_requests(
    reference: &str,
    data: &[u8],
    digest: &str,
    piece: usize,
) -> Vec<cpb::WriteContentRequest> {
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(piece.max(1)).collect()
    };
    let last = pieces.len() - 1;
    let mut off = 0i64;
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let m = cpb::WriteContentRequest {
                action: if i == last {
                    cpb::WriteAction::Commit
                } else {
                    cpb::WriteAction::Write
                } as i32,
                r#ref: reference.into(),
                total: data.len() as i64,
                expected: if i == 0 || i == last {
                    digest.to_string()
                } else {
                    String::new()
                },
                offset: off,
                data: p.to_vec(),
                labels: Default::default(),
            };
            off += p.len() as i64;
            m
        })
        .collect()
}

/// Writes `data` under `reference` in 1 MiB messages and commits it with its
/// digest, as containerd's content client does; returns the digest.
pub async fn put_blob(
    c: &mut ContentClient<Channel>,
    reference: &str,
    data: &[u8],
) -> anyhow::Result<String> {
    let digest = format!("sha256:{:x}", sha2::Sha256::digest(data));
    let msgs = write_requests(reference, data, &digest, 1 << 20);
    let mut responses = c.write(tokio_stream::iter(msgs)).await?.into_inner();
    let mut committed = None;
    while let Some(r) = responses.message().await? {
        if r.action == cpb::WriteAction::Commit as i32 {
            committed = Some(r.digest);
        }
    }
    anyhow::ensure!(
        committed.as_deref() == Some(digest.as_str()),
        "commit of {reference} returned {committed:?}, wanted {digest}"
    );
    Ok(digest)
}
