//! The content store's errors and their one mapping to gRPC codes.

/// What a content operation can fail with (containerd's `errdefs`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such blob or ingest.
    #[error("{0}: not found")]
    NotFound(String),
    /// The blob exists already.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// Wrong size or digest at commit, or a state that forbids the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// The ref is being written by another writer.
    #[error("{0}")]
    Unavailable(String),
    /// A read or write outside the blob or ingest.
    #[error("{0}")]
    OutOfRange(String),
    /// Stored data does not match its digest.
    #[error("{0}")]
    DataLoss(String),
    /// The database failed.
    #[error("content database: {0}")]
    Db(#[from] rocksdb::Error),
    /// A stored record could not be decoded.
    #[error("corrupt content record: {0}")]
    Corrupt(String),
    /// A filesystem operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A background task died.
    #[error("internal: {0}")]
    Internal(String),
}

/// The content store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

impl Error {
    /// The gRPC code containerd maps back to this error's `errdefs` class.
    pub fn code(&self) -> tonic::Code {
        let code = match self {
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::OutOfRange(_) => tonic::Code::OutOfRange,
            Error::DataLoss(_) => tonic::Code::DataLoss,
            Error::Db(_) | Error::Corrupt(_) | Error::Io { .. } | Error::Internal(_) => {
                tonic::Code::Internal
            }
        };
        strata_proto::errdefs::store_code(code, self.disk_full())
    }
}

impl Error {
    /// Whether the filesystem under strata's root (or the database on it)
    /// is full.
    pub fn disk_full(&self) -> bool {
        match self {
            Error::Io { source, .. } => strata_kv::io_disk_full(source),
            Error::Db(e) => strata_kv::db_disk_full(e),
            _ => false,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        strata_proto::errdefs::store_status(e.code(), &e, e.disk_full())
    }
}

impl From<strata_proto::limits::LimitError> for Error {
    fn from(e: strata_proto::limits::LimitError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Internal(format!("blocking task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_resource_exhausted_and_says_so() {
        let e = Error::io("write x", std::io::Error::from_raw_os_error(28));
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let s = tonic::Status::from(e);
        assert!(s.message().starts_with("disk full"), "{}", s.message());
        assert!(s.message().contains("No space left on device"));
        let other = Error::io("write x", std::io::Error::from_raw_os_error(5));
        assert_eq!(other.code(), tonic::Code::Internal);
    }
}
