//! strata's OCI registry client, for the fast-unpack path and the lazy
//! snapshotter.
//!
//! # How a pull flows through it
//!
//! ```text
//! Reference::parse("alpine")            docker.io/library/alpine:latest
//!   │
//! Client::resolve(&ref, &Platform::host())
//!   ├─ hosts:   <config_path>/docker.io/hosts.toml → [mirror…, server]   (hosts module)
//!   ├─ GET /v2/library/alpine/manifests/latest   Accept: OCI + Docker index/manifest
//!   │     each host in order; 401 → WWW-Authenticate → token → retry      (auth module)
//!   │     5xx/429/reset/timeout → backoff with jitter, bounded            (retry module)
//!   ├─ verify digest (pinned, or Docker-Content-Digest)
//!   ├─ index? → pick os/arch/variant → GET manifests/<digest>, verify, check size
//!   └─ GET blobs/<config digest> → verify → ImageConfiguration
//!   │
//! for each layer in ResolvedImage::layers():
//!   Client::fetch_blob(&ref, digest, Some(size))             one streaming GET,
//!       or Client::fetch_blob_parallel(…, &ParallelOptions)  K ranges in flight,
//!       → BlobStream (Stream of Bytes) / .into_reader() (AsyncRead), in order,
//!         resumed with Range from the byte reached when a body breaks or stalls,
//!         digest and size verified at the end (an error item, never silent)
//! lazy reads: Client::fetch_range(&ref, digest, offset, len) → Bytes
//! ```
//!
//! # Choices
//!
//! - **HTTP: `reqwest` 0.12 with rustls (ring) and the system's root
//!   certificates.** It is hyper underneath (so the same connection pool
//!   and HTTP/1.1 stack as tonic's), and adds what a registry client needs
//!   and raw hyper lacks: TLS with per-client roots, client certificates
//!   and `skip_verify`, redirects that drop `Authorization` when they leave
//!   the host (blob GETs are redirected to object stores), proxies from
//!   the environment, and a pool with several connections per host. One
//!   `reqwest::Client` serves every host; only a host whose `hosts.toml`
//!   sets its own TLS (CA, client cert, `skip_verify`, `dial_timeout`) gets
//!   a second one. HTTP/1.1 by default, so `K` parallel ranges are `K` TCP
//!   connections rather than streams sharing one HTTP/2 window
//!   ([`ClientConfig::http2`] turns HTTP/2 on). No OpenSSL, no C besides ring.
//! - **Retries** ([`RetryPolicy`]): 5xx, 408, 429 (honouring `Retry-After`),
//!   connection errors and timeouts are retried with exponential backoff and
//!   jitter on the last host; mirrors get one try each and are skipped on
//!   any failure, as containerd does. The final error lists every host with
//!   its HTTP status or connection error and the attempt count.
//! - **Resume**: a blob body that breaks — reset, truncated, or silent for
//!   [`RetryPolicy::stall_timeout`] — is re-requested with
//!   `Range: bytes=<reached>-` (any host that has it), and the digest is
//!   computed across the pieces; a server answering 200 to it is skipped
//!   forward. Bounded by breaks in a row without progress and by a total.
//! - **Parallel ranges**: the first range request doubles as a probe
//!   (`206` + `Content-Range` gives the size; `200` means no range support →
//!   the same response is read as one plain GET). Then one spawned task per
//!   range, at most `parallelism` alive at once through an ordered buffer, so
//!   memory stays at about `parallelism × range_size`; bytes are hashed in
//!   order as they are yielded.
//!
//! Errors are [`Error`]; logs go through `tracing` and never contain
//! credentials or tokens.

#![warn(missing_docs)]

mod auth;
mod blob;
mod client;
mod digest;
mod error;
mod hosts;
mod manifest;
mod platform;
mod reference;
mod retry;

pub use auth::{Credentials, DockerConfig};
pub use blob::{BlobReader, BlobStream, ParallelOptions, MAX_UNSIZED_BLOB_BYTES};
pub use client::{Client, ClientConfig};
pub use error::{Error, Result};
pub use manifest::{
    Fetched, Manifest, ResolvedImage, MAX_MANIFEST_BYTES, MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};
pub use oci_spec::image::Digest;
pub use platform::Platform;
pub use reference::Reference;
pub use retry::RetryPolicy;
