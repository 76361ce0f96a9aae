//! The `strata` binary's library: the daemon (`serve`), its configuration and
//! database, gRPC clients, `pull` (a client of containerd's API that has
//! strata unpack), and `harness`, which starts real registries,
//! containerds and strata daemons for the demo, the tests and the benchmarks.

pub mod bench;
pub mod client;
pub mod config;
pub mod db;
pub mod demo;
pub mod harness;
pub mod pull;
pub mod serve;
