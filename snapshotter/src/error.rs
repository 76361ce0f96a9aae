//! The snapshot stores' errors, and their one mapping to gRPC codes.

/// What a snapshot operation can fail with. The variants follow containerd's
/// `errdefs`, so that the gRPC codes containerd's client maps back are right.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot (or parent) does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// A snapshot with that key already exists.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for this operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The database failed.
    #[error("metadata database: {0}")]
    Db(#[from] rocksdb::Error),
    /// A stored record could not be decoded.
    #[error("corrupt metadata record for {key:?}: {msg}")]
    Corrupt {
        /// The key of the record.
        key: String,
        /// What is wrong with it.
        msg: String,
    },
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

/// The snapshot stores' result type.
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
            Error::Db(_) | Error::Corrupt { .. } | Error::Io { .. } | Error::Internal(_) => {
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
