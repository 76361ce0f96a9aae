//! gRPC clients of containerd's APIs over a unix socket: for the bench, the
//! CLI and the tests, against strata or any other proxy plugin.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
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
