//! `strata_lazy::estargz::Footer::parse`: the first 8 bytes are the blob's
//! size (little-endian), the rest the blob's tail.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_lazy::estargz::{Footer, FOOTER_SIZE, LEGACY_FOOTER_SIZE};

fuzz_target!(|data: &[u8]| {
    let Some((size, tail)) = data.split_first_chunk::<8>() else {
        return;
    };
    let blob_size = u64::from_le_bytes(*size);
    if let Ok(f) = Footer::parse(tail, blob_size) {
        assert!(f.size == FOOTER_SIZE || f.size == LEGACY_FOOTER_SIZE);
        assert!(f.toc_offset < blob_size.saturating_sub(f.size));
    }
});
