//! containerd's `errdefs` on the wire: one place where a store's error
//! becomes a `tonic::Status`, and where the ones that mean strata itself
//! failed are logged.

use tonic::{Code, Status};

/// The gRPC status of an error whose containerd class is `code`. Codes that
/// say the request was wrong (NotFound, AlreadyExists, InvalidArgument,
/// FailedPrecondition, …) are the caller's business and are not logged;
/// Internal, DataLoss and Unknown mean strata failed and are logged as
/// errors; ResourceExhausted (a full disk) is logged as a warning, for the
/// operator.
pub fn status(code: Code, msg: String) -> Status {
    match code {
        Code::DataLoss => tracing::error!(error = %msg, "stored data is damaged"),
        Code::ResourceExhausted => tracing::warn!(error = %msg, "request refused"),
        Code::Internal | Code::Unknown => tracing::error!(error = %msg, "request failed"),
        _ => {}
    }
    Status::new(code, msg)
}

/// The code of a store error: ResourceExhausted when the filesystem under
/// strata's root (or the database on it) is full (gRPC's own example of
/// it: "perhaps the entire file system is out of space"; not Internal:
/// strata is fine, and a write goes through again once space is freed),
/// else `code`.
pub fn store_code(code: Code, disk_full: bool) -> Code {
    if disk_full {
        Code::ResourceExhausted
    } else {
        code
    }
}

/// The status of a store error (see [`store_code`]); a full disk's message
/// says so first.
pub fn store_status(code: Code, msg: impl std::fmt::Display, disk_full: bool) -> Status {
    if disk_full {
        status(
            store_code(code, true),
            format!("disk full under strata's root: {msg}"),
        )
    } else {
        status(code, msg.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages_pass_through() {
        let s = status(Code::NotFound, "snapshot \"x\": not found".into());
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "snapshot \"x\": not found");
        assert_eq!(status(Code::DataLoss, "d".into()).code(), Code::DataLoss);
    }
}
