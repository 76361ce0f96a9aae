//! `strata bench content`: ingest (Write + Commit) of large and small blobs,
//! Read and ReaderAt throughput, and Info and Status latency, per target.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sha2::Digest;
use strata_proto::content as pb;
use strata_proto::content::content_client::ContentClient;
use tonic::transport::Channel;

use super::{summarize, OpStats};

/// A content store reachable over the proxy API: `LABEL=SOCKET`.
#[derive(Debug, Clone)]
pub struct ContentTarget {
    /// Label in the report.
    pub label: String,
    /// Its socket.
    pub socket: PathBuf,
}

impl std::str::FromStr for ContentTarget {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (label, socket) = s.split_once('=').context("target is LABEL=SOCKET")?;
        Ok(ContentTarget {
            label: label.into(),
            socket: socket.into(),
        })
    }
}

/// Sizes of the workloads.
#[derive(Debug, Clone)]
pub struct ContentWorkload {
    /// The large blob, MiB.
    pub large_mib: usize,
    /// Small blobs (4 to 64 KiB) per round.
    pub small_blobs: usize,
    /// ReaderAt reads per round.
    pub random_reads: usize,
    /// Rounds, alternating between targets.
    pub rounds: usize,
}

/// Bytes that do not compress (fresh per seed, so no store can dedup them).
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    crate::harness::image::noise(seed, len)
}

pub(crate) fn sha(b: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(b))
}

/// Writes and commits `data` in 1 MiB messages; returns the elapsed time.
pub(crate) async fn ingest(
    c: &mut ContentClient<Channel>,
    reference: &str,
    data: &[u8],
) -> Result<Duration> {
    let start = Instant::now();
    crate::client::put_blob(c, reference, data).await?;
    Ok(start.elapsed())
}

async fn read(
    c: &mut ContentClient<Channel>,
    digest: &str,
    offset: i64,
    size: i64,
) -> Result<usize> {
    let mut s = c
        .read(pb::ReadContentRequest {
            digest: digest.into(),
            offset,
            size,
        })
        .await?
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await? {
        n += m.data.len();
    }
    Ok(n)
}

/// Runs the content workloads on every target; one row per target and op.
/// For the throughput rows, `ops_per_s` is MiB/s and `p50_us` the median
/// time of one op.
pub async fn run(targets: &[ContentTarget], w: &ContentWorkload) -> Result<Vec<OpStats>> {
    if targets.is_empty() {
        bail!("no targets: give --target LABEL=SOCKET or --start-strata/--refproxy");
    }
    let run_id = u64::from(std::process::id());
    let mut lat: HashMap<(usize, &'static str), Vec<Duration>> = HashMap::new();
    let mut bytes: HashMap<(usize, &'static str), u64> = HashMap::new();
    for r in 0..w.rounds {
        for (ti, t) in targets.iter().enumerate() {
            let mut c = ContentClient::new(crate::client::connect(&t.socket).await?)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            let seed = (run_id << 20) ^ ((r as u64) << 8) ^ ti as u64;
            // Large ingest.
            let large = noise(seed, w.large_mib << 20);
            let large_digest = sha(&large);
            let took = ingest(&mut c, &format!("bench-{seed}-large"), &large).await?;
            lat.entry((ti, "ingest large")).or_default().push(took);
            *bytes.entry((ti, "ingest large")).or_default() += large.len() as u64;
            // Small ingests.
            let mut small = Vec::new();
            for i in 0..w.small_blobs {
                let size = 4096 + (i * 7919) % (60 * 1024);
                let data = noise(seed ^ ((i as u64 + 1) << 32), size);
                let took = ingest(&mut c, &format!("bench-{seed}-s{i}"), &data).await?;
                lat.entry((ti, "ingest small")).or_default().push(took);
                *bytes.entry((ti, "ingest small")).or_default() += data.len() as u64;
                small.push(sha(&data));
            }
            // Sequential read of the large blob.
            let start = Instant::now();
            let n = read(&mut c, &large_digest, 0, 0).await?;
            ensure!(n == large.len(), "read {n} of {} bytes", large.len());
            lat.entry((ti, "read large"))
                .or_default()
                .push(start.elapsed());
            *bytes.entry((ti, "read large")).or_default() += n as u64;
            // ReaderAt: random ranges.
            for i in 0..w.random_reads {
                let len = 4096 + (i * 4099) % (60 * 1024);
                let off =
                    ((i as u64).wrapping_mul(0x9E37_79B9) % (large.len() - len) as u64) as i64;
                let start = Instant::now();
                let n = read(&mut c, &large_digest, off, len as i64).await?;
                ensure!(n == len, "ReaderAt got {n} of {len}");
                lat.entry((ti, "readerat"))
                    .or_default()
                    .push(start.elapsed());
                *bytes.entry((ti, "readerat")).or_default() += n as u64;
            }
            // Info.
            for d in &small {
                let start = Instant::now();
                c.info(pb::InfoRequest { digest: d.clone() }).await?;
                lat.entry((ti, "info")).or_default().push(start.elapsed());
            }
            // Status of an open ingest (one message, never committed).
            let reference = format!("bench-{seed}-open");
            let first = pb::WriteContentRequest {
                action: pb::WriteAction::Write as i32,
                r#ref: reference.clone(),
                data: noise(seed ^ 7, 4096),
                ..Default::default()
            };
            let mut s = c.write(tokio_stream::iter(vec![first])).await?.into_inner();
            while s.message().await?.is_some() {}
            for _ in 0..w.small_blobs {
                let start = Instant::now();
                // The writer may still be closing: retry briefly on Unavailable.
                c.status(pb::StatusRequest {
                    r#ref: reference.clone(),
                })
                .await?;
                lat.entry((ti, "status")).or_default().push(start.elapsed());
            }
            let _ = c.abort(pb::AbortRequest { r#ref: reference }).await;
            // Leave the store as it was.
            let _ = c
                .delete(pb::DeleteContentRequest {
                    digest: large_digest,
                })
                .await;
            for d in small {
                let _ = c.delete(pb::DeleteContentRequest { digest: d }).await;
            }
        }
    }
    let mut rows = Vec::new();
    for op in [
        "ingest large",
        "ingest small",
        "read large",
        "readerat",
        "info",
        "status",
    ] {
        for (ti, t) in targets.iter().enumerate() {
            let l = lat.remove(&(ti, op)).unwrap_or_default();
            let total: Duration = l.iter().sum();
            let mut row = summarize(&t.label, op, l, total);
            if let Some(b) = bytes.get(&(ti, op)) {
                // Throughput rows: MiB/s over the time spent in the op.
                row.op = format!("{op} MiB/s");
                row.ops_per_s = *b as f64 / (1 << 20) as f64 / total.as_secs_f64().max(1e-9);
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Single-core SHA-256 throughput of this machine (MiB/s): the ceiling for
/// ingest, which must hash every byte.
pub fn sha256_mib_s() -> f64 {
    let data = noise(42, 64 << 20);
    let start = Instant::now();
    let d = sha2::Sha256::digest(&data);
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(d);
    64.0 / secs.max(1e-9)
}
