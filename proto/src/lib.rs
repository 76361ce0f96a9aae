//! containerd's gRPC APIs as strata speaks them: `containerd.services.snapshots.v1`,
//! `containerd.services.content.v1` and the `containerd.types` they use, plus
//! containerd's filter language ([`filters`]), which List calls carry, and
//! the limits on keys and labels ([`limits`]).
//!
//! The `.proto` files under `proto/containerd/` are strata's own copies of
//! containerd's wire contract (package names, messages and field numbers),
//! which is stable from containerd 1.6 through 2.x.

pub mod errdefs;
pub mod filters;
pub mod limits;

/// The generated code, laid out as the proto packages nest.
pub mod containerd {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        /// `containerd.services.content`.
        pub mod content {
            /// `containerd.services.content.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
    }
}

pub use containerd::services::content::v1 as content;
pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;
