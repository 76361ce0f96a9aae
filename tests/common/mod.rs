//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// These tests mount overlayfs and start containerd: they need root. They
/// fail (not skip) without it, so that a green run means they ran.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts filesystems and runs containerd: run it as root (sudo scripts/test)"
    );
}

/// A temporary directory on a real disk (overlayfs upper dirs on tmpfs
/// behave differently), removed at the end.
pub fn tempdir() -> tempfile::TempDir {
    let base = Path::new("/var/tmp/strata-tests");
    std::fs::create_dir_all(base).expect("create /var/tmp/strata-tests");
    tempfile::Builder::new()
        .prefix("t")
        .tempdir_in(base)
        .expect("create a temporary directory")
}

/// The strata binary under test.
pub fn strata_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_strata"))
}
