//! Blobs by digest: whole and verified, by range, and in parallel ranges.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::{stream, Stream, StreamExt};
use oci_spec::image::Digest;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, RANGE};
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use tokio_util::io::StreamReader;

use crate::client::{Body, Client, Sent, Target};
use crate::digest::Hasher;
use crate::error::{Error, Result};
use crate::hosts::Capability;
use crate::reference::Reference;

/// Blobs without a known size that [`Client::fetch_blob_bytes`] reads at most.
pub const MAX_UNSIZED_BLOB_BYTES: u64 = 64 << 20;

/// How [`Client::fetch_blob_parallel`] splits a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParallelOptions {
    /// Bytes per range request (default 8 MiB).
    pub range_size: u64,
    /// Range requests in flight (default 4). Memory held is at most
    /// `parallelism` ranges plus the one being read.
    pub parallelism: usize,
}

impl Default for ParallelOptions {
    fn default() -> Self {
        ParallelOptions {
            range_size: 8 << 20,
            parallelism: 4,
        }
    }
}

impl ParallelOptions {
    /// Options with the given range size and parallelism.
    pub fn new(range_size: u64, parallelism: usize) -> Self {
        ParallelOptions {
            range_size,
            parallelism,
        }
    }
}

/// A blob's bytes, in order, as a [`Stream`] of chunks.
///
/// The last item is an error when the bytes do not match the digest (or the
/// expected size): **read to the end** — the stream returning `None` is
/// what says the blob is verified. Dropping it early cancels the transfer.
pub struct BlobStream {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>,
    digest: Digest,
    size: Option<u64>,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStream")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl BlobStream {
    /// The digest being verified.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The size, when the caller or the server told it.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The same bytes as an [`AsyncRead`]; errors become `io::Error`s
    /// wrapping [`Error`] (a digest mismatch is `InvalidData`).
    pub fn into_reader(self) -> BlobReader {
        BlobReader {
            inner: StreamReader::new(IoStream(self)),
        }
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct IoStream(BlobStream);

impl Stream for IoStream {
    type Item = io::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.0).poll_next(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(io::Error::from(e)))),
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(b))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A blob as an [`AsyncRead`]: EOF only after the digest was verified.
pub struct BlobReader {
    inner: StreamReader<IoStream, Bytes>,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("digest", &self.inner.get_ref().0.digest)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for BlobReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncBufRead for BlobReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().inner).poll_fill_buf(cx)
    }
    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.inner).consume(amt)
    }
}

pub(crate) fn blob_what(reference: &Reference, digest: &Digest) -> String {
    format!("blob {digest} of {}", reference.name())
}

impl Client {
    /// Streams a whole blob, verifying its digest (and `size`, when given)
    /// at the end. Returns once the first response has arrived, so a
    /// missing blob is an error here. A body that breaks or stalls is
    /// resumed with a `Range` request from the byte it reached.
    pub async fn fetch_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<BlobStream> {
        Hasher::for_digest(digest)?;
        let what = blob_what(reference, digest);
        let target = Arc::new(self.target(reference, Capability::Pull, what).await?);
        let mut seq = Seq::new(self.clone(), target, digest.clone(), size)?;
        let sent = self
            .send(&seq.target, Method::GET, &seq.suffix, &HeaderMap::new())
            .await?;
        seq.attach(sent, 0)?;
        Ok(seq.into_stream())
    }

    /// Reads a whole blob into memory, verified. For configs and other small
    /// blobs: without `size` it refuses blobs over [`MAX_UNSIZED_BLOB_BYTES`].
    pub async fn fetch_blob_bytes(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Bytes> {
        let mut s = self.fetch_blob(reference, digest, size).await?;
        let limit = size.unwrap_or(MAX_UNSIZED_BLOB_BYTES);
        let mut buf = BytesMut::with_capacity(size.unwrap_or(0).min(limit) as usize);
        while let Some(chunk) = s.next().await {
            let chunk = chunk?;
            if buf.len() as u64 + chunk.len() as u64 > limit {
                return Err(Error::SizeMismatch {
                    what: blob_what(reference, digest),
                    expected: limit,
                    actual: buf.len() as u64 + chunk.len() as u64,
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// Reads `len` bytes of a blob from `offset` with an HTTP `Range`
    /// request. The bytes are not verified (only a whole blob can be);
    /// callers that need that verify chunks themselves (a TOC). A server
    /// that ignores `Range` still gives the right bytes, by skipping.
    pub async fn fetch_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        if offset.checked_add(len).is_none() {
            return Err(Error::InvalidArgument(format!(
                "range {offset}+{len} overflows"
            )));
        }
        let what = format!("bytes {offset}+{len} of {}", blob_what(reference, digest));
        let target = Arc::new(self.target(reference, Capability::Pull, what).await?);
        read_range(self.clone(), target, blob_suffix(digest), offset, len, None).await
    }

    /// Streams a large blob as `options.parallelism` concurrent range
    /// requests of `options.range_size`, yielding bytes in order, and
    /// verifies the digest (and size) at the end. `size` may be `None`: the
    /// first range's `Content-Range` tells it. Falls back to one plain
    /// streaming GET when the server ignores `Range` (answers 200).
    pub async fn fetch_blob_parallel(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: Option<u64>,
        options: &ParallelOptions,
    ) -> Result<BlobStream> {
        Hasher::for_digest(digest)?;
        if options.range_size == 0 || options.parallelism == 0 {
            return Err(Error::InvalidArgument(
                "parallel reads need range_size > 0 and parallelism > 0".into(),
            ));
        }
        if size.is_some_and(|s| s <= options.range_size) {
            return self.fetch_blob(reference, digest, size).await;
        }
        let what = blob_what(reference, digest);
        let target = Arc::new(
            self.target(reference, Capability::Pull, what.clone())
                .await?,
        );
        let suffix = blob_suffix(digest);
        let rs = options.range_size;

        // The first range doubles as a probe: does the server do ranges,
        // and how big is the blob?
        let sent = self
            .send(
                &target,
                Method::GET,
                &suffix,
                &range_header(0, Some(rs - 1))?,
            )
            .await?;
        if sent.resp.status() != StatusCode::PARTIAL_CONTENT {
            tracing::info!(host = %sent.authority, %what, status = sent.resp.status().as_u16(),
                "server ignored Range; reading the blob with one GET");
            let mut seq = Seq::new(self.clone(), target, digest.clone(), size)?;
            seq.attach(sent, 0)?;
            return Ok(seq.into_stream());
        }
        let cr = parse_content_range(sent.resp.headers(), &sent.authority)?;
        if cr.start != 0 {
            return Err(Error::InvalidResponse(format!(
                "{}: asked for bytes from 0, got Content-Range from {}",
                sent.authority, cr.start
            )));
        }
        let total = match (cr.total, size) {
            (Some(t), Some(s)) if t != s => {
                return Err(Error::SizeMismatch {
                    what,
                    expected: s,
                    actual: t,
                })
            }
            (Some(t), _) => t,
            (None, Some(s)) => s,
            (None, None) => {
                drop(sent);
                tracing::info!(%what, "server did not tell the blob size; reading it with one GET");
                return self.fetch_blob(reference, digest, None).await;
            }
        };
        if total <= rs {
            let mut seq = Seq::new(self.clone(), target, digest.clone(), Some(total))?;
            seq.attach(sent, 0)?;
            return Ok(seq.into_stream());
        }

        let ranges = total.div_ceil(rs);
        tracing::debug!(%what, total, range_size = rs, ranges, parallelism = options.parallelism, "parallel blob read");
        let first = Task(tokio::spawn(read_range(
            self.clone(),
            target.clone(),
            suffix.clone(),
            0,
            rs,
            Some(sent),
        )));
        let client = self.clone();
        let rest = (1..ranges).map(move |i| {
            let off = i * rs;
            let len = rs.min(total - off);
            Task(tokio::spawn(read_range(
                client.clone(),
                target.clone(),
                suffix.clone(),
                off,
                len,
                None,
            )))
        });
        // `buffered` keeps at most `parallelism` range tasks alive (running
        // or finished and waiting their turn) and yields them in order.
        let tasks = stream::iter(std::iter::once(first).chain(rest)).buffered(options.parallelism);
        let state = Verify {
            tasks: Box::pin(tasks),
            hasher: Some(Hasher::for_digest(digest)?),
            digest: digest.clone(),
            what,
            received: 0,
            total,
        };
        let inner = stream::unfold(state, |mut s| async move {
            s.next().await.map(|item| (item, s))
        });
        Ok(BlobStream {
            inner: Box::pin(inner),
            digest: digest.clone(),
            size: Some(total),
        })
    }
}

fn blob_suffix(digest: &Digest) -> String {
    format!("blobs/{digest}")
}

fn range_header(start: u64, end: Option<u64>) -> Result<HeaderMap> {
    let value = match end {
        Some(e) => format!("bytes={start}-{e}"),
        None => format!("bytes={start}-"),
    };
    let mut h = HeaderMap::new();
    h.insert(
        RANGE,
        HeaderValue::from_str(&value).map_err(|_| Error::InvalidArgument(value.clone()))?,
    );
    Ok(h)
}

#[derive(Debug, PartialEq, Eq)]
struct ContentRange {
    start: u64,
    end: u64,
    total: Option<u64>,
}

/// `Content-Range: bytes <start>-<end>/<total|*>`
fn parse_content_range(headers: &HeaderMap, authority: &str) -> Result<ContentRange> {
    let bad = |v: &str| {
        Error::InvalidResponse(format!(
            "{authority}: bad Content-Range {v:?} in a 206 response"
        ))
    };
    let raw = headers
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad("(missing)"))?;
    let spec = raw.trim().strip_prefix("bytes ").ok_or_else(|| bad(raw))?;
    let (range, total) = spec.split_once('/').ok_or_else(|| bad(raw))?;
    let (s, e) = range.split_once('-').ok_or_else(|| bad(raw))?;
    let start: u64 = s.trim().parse().map_err(|_| bad(raw))?;
    let end: u64 = e.trim().parse().map_err(|_| bad(raw))?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().map_err(|_| bad(raw))?),
    };
    if end < start || total.is_some_and(|t| end >= t) {
        return Err(bad(raw));
    }
    Ok(ContentRange { start, end, total })
}

/// Counts broken bodies and decides when to give up: after `max_attempts`
/// breaks in a row without progress, or `max_resumes` in all.
#[derive(Default)]
struct Resumer {
    in_a_row: u32,
    resumes: u32,
    mark: u64,
}

impl Resumer {
    async fn on_break(
        &mut self,
        client: &Client,
        pos: u64,
        what: &str,
        authority: &str,
        detail: &str,
    ) -> Result<()> {
        let policy = client.retry();
        if pos > self.mark {
            self.in_a_row = 1;
        } else {
            self.in_a_row += 1;
        }
        self.mark = pos;
        self.resumes += 1;
        if self.in_a_row >= policy.attempts() || self.resumes > policy.max_resumes {
            return Err(Error::Fetch {
                what: what.to_string(),
                detail: format!(
                    "{authority}: {detail} at byte {pos}; gave up after {} broken responses ({} in a row without progress)",
                    self.resumes, self.in_a_row
                ),
                status: None,
            });
        }
        let pause = policy.backoff(self.in_a_row, None);
        tracing::warn!(host = %authority, %what, pos, %detail, resumes = self.resumes,
            pause_ms = pause.as_millis() as u64, "blob body broke; resuming");
        tokio::time::sleep(pause).await;
        Ok(())
    }
}

/// A sequential, resumable, verifying blob read.
struct Seq {
    client: Client,
    target: Arc<Target>,
    suffix: String,
    digest: Digest,
    expected: Option<u64>,
    announced: Option<u64>,
    received: u64,
    hasher: Option<Hasher>,
    body: Option<Body>,
    authority: String,
    skip: u64,
    resumer: Resumer,
    done: bool,
}

impl Seq {
    fn new(
        client: Client,
        target: Arc<Target>,
        digest: Digest,
        expected: Option<u64>,
    ) -> Result<Self> {
        let suffix = blob_suffix(&digest);
        Ok(Seq {
            hasher: Some(Hasher::for_digest(&digest)?),
            client,
            target,
            suffix,
            digest,
            expected,
            announced: None,
            received: 0,
            body: None,
            authority: String::new(),
            skip: 0,
            resumer: Resumer::default(),
            done: false,
        })
    }

    /// Takes a response that should carry the blob from byte `from`.
    fn attach(&mut self, sent: Sent, from: u64) -> Result<()> {
        self.authority = sent.authority;
        let resp = sent.resp;
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            let cr = parse_content_range(resp.headers(), &self.authority)?;
            if cr.start != from {
                return Err(Error::InvalidResponse(format!(
                    "{}: asked for bytes from {from}, got Content-Range from {}",
                    self.authority, cr.start
                )));
            }
            if let Some(t) = cr.total {
                self.check_total(t)?;
            }
            self.skip = 0;
        } else {
            // The whole blob: skip what we already have.
            if let Some(len) = resp.content_length() {
                self.check_total(len)?;
            }
            self.skip = from;
        }
        self.body = Some(Body::new(resp, self.client.retry().stall_timeout));
        Ok(())
    }

    fn check_total(&mut self, total: u64) -> Result<()> {
        if let Some(e) = self.expected {
            if e != total {
                return Err(Error::SizeMismatch {
                    what: self.target.what.clone(),
                    expected: e,
                    actual: total,
                });
            }
        }
        self.announced = Some(total);
        Ok(())
    }

    fn fail(&mut self, e: Error) -> Option<Result<Bytes>> {
        self.done = true;
        self.body = None;
        Some(Err(e))
    }

    async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            if self.done {
                return None;
            }
            let Some(body) = self.body.as_mut() else {
                // Resume from where we are.
                let headers = match range_header(self.received, None) {
                    Ok(h) => h,
                    Err(e) => return self.fail(e),
                };
                match self
                    .client
                    .send(&self.target, Method::GET, &self.suffix, &headers)
                    .await
                {
                    Ok(sent) => {
                        if let Err(e) = self.attach(sent, self.received) {
                            return self.fail(e);
                        }
                    }
                    Err(e) => return self.fail(e),
                }
                continue;
            };
            let limit = self.expected.or(self.announced);
            match body.next().await {
                Ok(Some(mut chunk)) => {
                    if self.skip > 0 {
                        let n = self.skip.min(chunk.len() as u64) as usize;
                        chunk = chunk.slice(n..);
                        self.skip -= n as u64;
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    let after = self.received + chunk.len() as u64;
                    if let Some(limit) = limit {
                        if after > limit {
                            let e = Error::SizeMismatch {
                                what: self.target.what.clone(),
                                expected: limit,
                                actual: after,
                            };
                            return self.fail(e);
                        }
                    }
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&chunk);
                    }
                    self.received = after;
                    return Some(Ok(chunk));
                }
                Ok(None) => {
                    self.body = None;
                    if let Some(limit) = limit {
                        if self.received < limit {
                            let detail =
                                format!("body ended early ({} of {limit} bytes)", self.received);
                            if let Err(e) = self.broken(&detail).await {
                                return self.fail(e);
                            }
                            continue;
                        }
                    }
                    self.done = true;
                    let hasher = self.hasher.take()?;
                    return match hasher.verify(&self.digest, &self.target.what) {
                        Ok(()) => {
                            tracing::debug!(what = %self.target.what, bytes = self.received, "blob verified");
                            None
                        }
                        Err(e) => Some(Err(e)),
                    };
                }
                Err(detail) => {
                    self.body = None;
                    if let Err(e) = self.broken(&detail).await {
                        return self.fail(e);
                    }
                }
            }
        }
    }

    async fn broken(&mut self, detail: &str) -> Result<()> {
        let (client, what, authority) = (
            self.client.clone(),
            self.target.what.clone(),
            self.authority.clone(),
        );
        self.resumer
            .on_break(&client, self.received, &what, &authority, detail)
            .await
    }

    fn into_stream(self) -> BlobStream {
        let digest = self.digest.clone();
        let size = self.expected.or(self.announced);
        let inner = stream::unfold(
            self,
            |mut s| async move { s.next().await.map(|item| (item, s)) },
        );
        BlobStream {
            inner: Box::pin(inner),
            digest,
            size,
        }
    }
}

/// Reads exactly `len` bytes from `offset`, resuming within the range when
/// a body breaks. `first` is a response already received for this range.
async fn read_range(
    client: Client,
    target: Arc<Target>,
    suffix: String,
    offset: u64,
    len: u64,
    first: Option<Sent>,
) -> Result<Bytes> {
    let len_usize = usize::try_from(len)
        .map_err(|_| Error::InvalidArgument(format!("range length {len} too large")))?;
    let end = offset + len - 1;
    let mut buf = BytesMut::with_capacity(len_usize);
    let mut pending = first;
    let mut resumer = Resumer {
        mark: offset,
        ..Default::default()
    };
    let stall = client.retry().stall_timeout;
    loop {
        let start = offset + buf.len() as u64;
        let sent = match pending.take() {
            Some(s) => s,
            None => {
                client
                    .send(
                        &target,
                        Method::GET,
                        &suffix,
                        &range_header(start, Some(end))?,
                    )
                    .await?
            }
        };
        let authority = sent.authority;
        let partial = sent.resp.status() == StatusCode::PARTIAL_CONTENT;
        let mut skip = if partial {
            let cr = parse_content_range(sent.resp.headers(), &authority)?;
            if cr.start != start {
                return Err(Error::InvalidResponse(format!(
                    "{authority}: asked for bytes from {start}, got Content-Range from {}",
                    cr.start
                )));
            }
            if let Some(total) = cr.total.filter(|&t| end >= t) {
                return Err(Error::InvalidArgument(format!(
                    "range {offset}+{len} ends past the end of {} ({total} bytes)",
                    target.what
                )));
            }
            0
        } else {
            tracing::debug!(host = %authority, what = %target.what, "server ignored Range; skipping to the offset");
            start
        };
        let mut body = Body::new(sent.resp, stall);
        let outcome: std::result::Result<(), String> = loop {
            match body.next().await {
                Ok(Some(mut chunk)) => {
                    if skip > 0 {
                        let n = skip.min(chunk.len() as u64) as usize;
                        chunk = chunk.slice(n..);
                        skip -= n as u64;
                    }
                    let need = len_usize - buf.len();
                    buf.extend_from_slice(&chunk[..need.min(chunk.len())]);
                    if buf.len() == len_usize {
                        break Ok(());
                    }
                }
                Ok(None) => {
                    break Err(format!(
                        "body ended early ({} of {len} bytes of range {offset}-{end})",
                        buf.len()
                    ))
                }
                Err(d) => break Err(d),
            }
        };
        match outcome {
            Ok(()) => {
                if partial {
                    // Read the (empty) end of the body so the connection
                    // goes back to the pool.
                    let _ = body.next().await;
                }
                return Ok(buf.freeze());
            }
            Err(detail) => {
                let pos = offset + buf.len() as u64;
                resumer
                    .on_break(&client, pos, &target.what, &authority, &detail)
                    .await?;
            }
        }
    }
}

/// A spawned task that is aborted when dropped (when the stream is).
struct Task<T>(tokio::task::JoinHandle<T>);

impl<T> Future for Task<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type RangeResults =
    Pin<Box<dyn Stream<Item = std::result::Result<Result<Bytes>, tokio::task::JoinError>> + Send>>;

/// Hashes the in-order ranges and checks digest and size at the end.
struct Verify {
    tasks: RangeResults,
    hasher: Option<Hasher>,
    digest: Digest,
    what: String,
    received: u64,
    total: u64,
}

impl Verify {
    async fn next(&mut self) -> Option<Result<Bytes>> {
        let hasher = self.hasher.as_mut()?;
        match self.tasks.next().await {
            Some(Ok(Ok(bytes))) => {
                hasher.update(&bytes);
                self.received += bytes.len() as u64;
                Some(Ok(bytes))
            }
            Some(Ok(Err(e))) => {
                self.hasher = None;
                Some(Err(e))
            }
            Some(Err(join)) => {
                self.hasher = None;
                Some(Err(Error::Fetch {
                    what: self.what.clone(),
                    detail: format!("range task failed: {join}"),
                    status: None,
                }))
            }
            None => {
                let hasher = self.hasher.take()?;
                if self.received != self.total {
                    return Some(Err(Error::SizeMismatch {
                        what: self.what.clone(),
                        expected: self.total,
                        actual: self.received,
                    }));
                }
                match hasher.verify(&self.digest, &self.what) {
                    Ok(()) => {
                        tracing::debug!(what = %self.what, bytes = self.received, "blob verified");
                        None
                    }
                    Err(e) => Some(Err(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cr(v: &str) -> Result<ContentRange> {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, HeaderValue::from_str(v).unwrap());
        parse_content_range(&h, "h")
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            cr("bytes 0-99/1000").unwrap(),
            ContentRange {
                start: 0,
                end: 99,
                total: Some(1000)
            }
        );
        assert_eq!(cr("bytes 5-9/*").unwrap().total, None);
        for bad in [
            "bytes 9-5/10",
            "bytes 0-10/10",
            "items 0-1/2",
            "bytes x-1/2",
            "bytes 0-1",
        ] {
            assert!(matches!(cr(bad), Err(Error::InvalidResponse(_))), "{bad}");
        }
        assert!(parse_content_range(&HeaderMap::new(), "h").is_err());
    }
}
