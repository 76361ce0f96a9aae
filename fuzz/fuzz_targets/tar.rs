//! A layer applied by `strata_unpack::apply` (the tar parser and the
//! extractor) into a fresh directory, with a sentinel beside it that no
//! entry may touch.
//!
//! Input: one flags byte, then the layer: a plain tar stream (gzip or zstd
//! if it starts with their magic). Flags: bit 0, give every non-zero
//! 512-byte block a valid header checksum first (or the fuzzer rarely gets
//! past the checksum of a header it changed); bit 1, apply with the
//! decompression thread (`ApplyOptions::pipeline`).

#![no_main]

use std::fs;

use libfuzzer_sys::fuzz_target;
use strata_unpack::{apply, ApplyOptions};

/// Sets the checksum field of every non-zero block as tar computes it.
fn fix_checksums(tar: &mut [u8]) {
    for b in tar.chunks_exact_mut(512) {
        if b.iter().all(|&c| c == 0) {
            continue;
        }
        b[148..156].fill(b' ');
        let sum: u32 = b.iter().map(|&c| u32::from(c)).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, layer_bytes)) = data.split_first() else {
        return;
    };
    let mut blob = layer_bytes.to_vec();
    if flags & 1 != 0 {
        fix_checksums(&mut blob);
    }
    let Ok(sandbox) = tempfile::Builder::new().prefix("strata-fuzz-tar").tempdir() else {
        return;
    };
    let layer = sandbox.path().join("layer");
    let sentinel = sandbox.path().join("sentinel");
    if fs::create_dir(&layer).is_err() || fs::write(&sentinel, b"s").is_err() {
        return;
    }
    let opts = ApplyOptions {
        pipeline: flags & 2 != 0,
        ..Default::default()
    };
    let _ = apply(&blob[..], &layer, &opts);
    // Nothing outside the layer directory changed.
    let mut names: Vec<_> = fs::read_dir(sandbox.path())
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
        .unwrap_or_default();
    names.sort();
    assert_eq!(names, ["layer", "sentinel"], "an entry escaped the layer");
    assert_eq!(fs::read(&sentinel).ok().as_deref(), Some(&b"s"[..]));
});
