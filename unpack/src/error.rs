//! The one error type of the crate.

use std::io;

/// Why a layer could not be applied.
///
/// After any error the target directory holds a partial layer and must be
/// discarded by the caller; nothing outside it has been touched.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An entry would create, write or change something outside the target
    /// directory, or would do so through a symlink (`..` components,
    /// absolute paths, a path through a symlink, a hard link whose target is
    /// outside or behind a symlink, a whiteout naming `.` or `..`).
    #[error("unsafe layer entry {entry:?}: {reason}")]
    UnsafeEntry {
        /// The entry's name as written in the archive (lossy UTF-8).
        entry: String,
        /// What was wrong with it.
        reason: String,
    },

    /// The blob is not a valid layer: a corrupt or truncated gzip / zstd
    /// stream, a malformed or truncated tar archive, an unsupported entry type.
    #[error("invalid layer: {0}")]
    Format(String),

    /// The digest of the compressed blob or of the uncompressed tar is not the
    /// one the caller expected ([`crate::ApplyOptions::expected_digest`],
    /// [`crate::ApplyOptions::expected_diff_id`]).
    #[error("{what} mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// `"digest"` (compressed blob) or `"diff_id"` (uncompressed tar).
        what: &'static str,
        /// The expected value, as given.
        expected: String,
        /// The computed value, `sha256:<hex>`.
        actual: String,
    },

    /// A system call failed, or reading the caller's blob failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the entry where there is one.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn unsafe_entry(entry: &[u8], reason: impl Into<String>) -> Self {
        Error::UnsafeEntry {
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    /// An I/O error about one entry: "`what` `entry`".
    pub(crate) fn entry_io(what: &str, entry: &[u8], source: impl Into<io::Error>) -> Self {
        Error::Io {
            context: format!("{what} {:?}", String::from_utf8_lossy(entry)),
            source: source.into(),
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
