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
