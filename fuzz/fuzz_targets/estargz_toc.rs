//! `strata_lazy::estargz::Toc::parse`, and what the snapshotter then does
//! with the tree. Input: one mode byte, the TOC's offset in the blob (8
//! bytes, little-endian), then either the TOC's gzip member as in a blob
//! (mode even) or the TOC JSON, which is put in its tar and gzip member here
//! so that the fuzzer works on the JSON (mode odd).

#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use strata_lazy::estargz::{DirAttrs, Footer, Kind, Toc, FOOTER_SIZE, TOC_NAME};

/// A tar holding `json` as `stargz.index.json`.
fn toc_tar(json: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..TOC_NAME.len()].copy_from_slice(TOC_NAME.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", json.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut tar = h.to_vec();
    tar.extend_from_slice(json);
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    tar
}

fn gzip(b: &[u8]) -> Option<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b).ok()?;
    gz.finish().ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((offset, payload)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let footer = Footer {
        toc_offset: u64::from_le_bytes(*offset),
        size: FOOTER_SIZE,
    };
    let toc_gz = if mode & 1 == 0 {
        payload.to_vec()
    } else {
        match gzip(&toc_tar(payload)) {
            Some(gz) => gz,
            None => return,
        }
    };
    let Ok(mut toc) = Toc::parse(&toc_gz, footer, None) else {
        return;
    };
    // What the lazy snapshotter and its filesystem do with a TOC.
    assert_eq!(toc.nodes[0].kind, Kind::Dir);
    let _ = toc.usage();
    for i in 0..toc.nodes.len() {
        let path = toc.path(i);
        let _ = toc.lookup(&path);
        for c in &toc.nodes[i].chunks {
            assert!(c.blob_offset < c.blob_end && c.blob_end <= toc.toc_offset);
        }
    }
    toc.adopt_parents(|path| {
        (path.len() % 2 == 0).then(|| DirAttrs {
            mode: 0o2775,
            uid: 1,
            gid: 2,
            xattrs: Default::default(),
        })
    });
});
