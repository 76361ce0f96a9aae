//! The one error type of the crate.
//!
//! Every failure that came from the network names what was being fetched
//! (`what`: the object, its digest and the repository) and, in `detail`,
//! every host that was tried with what it answered (HTTP status, connection
//! error, stall), so a log line alone says what failed and where.
//! Credentials and tokens never appear in errors.

use oci_spec::image::Digest;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed something malformed: a reference, a digest, a
    /// platform string, a range. Retrying cannot help.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A configuration file (`hosts.toml`, docker `config.json`, a
    /// certificate) is unreadable or malformed.
    #[error("configuration error: {0}")]
    Config(String),

    /// Every host answered 404 (or had no such object).
    #[error("not found: {what}: {detail}")]
    NotFound {
        /// The object and repository.
        what: String,
        /// Per-host outcomes.
        detail: String,
    },

    /// A host asked for credentials that were missing or rejected
    /// (401/403 after the auth handshake).
    #[error("unauthorized: {what}: {detail}")]
    Unauthorized {
        /// The object and repository.
        what: String,
        /// Per-host outcomes.
        detail: String,
    },

    /// The request failed on every host after the allowed attempts:
    /// 5xx, 429, connection errors, timeouts, stalls, or an unexpected status.
    #[error("fetch failed: {what}: {detail}")]
    Fetch {
        /// The object and repository.
        what: String,
        /// Per-host outcomes and the number of attempts.
        detail: String,
        /// The last HTTP status seen, if any host answered at all.
        status: Option<u16>,
    },

    /// The bytes received do not hash to the digest that was asked for.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The object and repository.
        what: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of the bytes received.
        actual: String,
    },

    /// The object is larger or smaller than its descriptor says.
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The object and repository.
        what: String,
        /// The size the descriptor (or the server) announced.
        expected: u64,
        /// The size received (or announced by the server).
        actual: u64,
    },

    /// An index has no manifest for the requested platform.
    #[error("no manifest for platform {platform} in {what} (available: {available})")]
    PlatformNotFound {
        /// The index and repository.
        what: String,
        /// The platform asked for.
        platform: String,
        /// The platforms the index lists.
        available: String,
    },

    /// The server answered something this client does not handle: a
    /// schema 1 manifest, an unknown digest algorithm, malformed JSON.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A response was well-formed HTTP but wrong for the request
    /// (a bad `Content-Range`, a body that is not a manifest).
    #[error("invalid response: {0}")]
    InvalidResponse(String),
}

impl Error {
    /// The last HTTP status seen, when the error came from a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Fetch { status, .. } => *status,
            Error::NotFound { .. } => Some(404),
            Error::Unauthorized { .. } => Some(401),
            _ => None,
        }
    }

    /// True for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        use std::io::ErrorKind;
        let kind = match &e {
            Error::InvalidArgument(_) => ErrorKind::InvalidInput,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Unauthorized { .. } => ErrorKind::PermissionDenied,
            Error::DigestMismatch { .. } | Error::SizeMismatch { .. } => ErrorKind::InvalidData,
            _ => ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}
