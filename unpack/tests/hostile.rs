//! Hostile layers: each must fail with an error naming the entry, and leave
//! everything outside the target directory untouched (a sentinel file sits
//! next to it).

mod common;

use common::*;
use strata_unpack::{apply, ApplyOptions, Error};

fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut t = entries.concat();
    t.extend_from_slice(&end_of_archive());
    t
}

/// Applies `blob` (gzip-compressed, so the decoder path is exercised too,
/// and plain) with and without the pipeline; returns the errors.
fn apply_all_ways(sb_blob: &[u8]) -> Vec<Error> {
    let mut errs = Vec::new();
    for blob in [sb_blob.to_vec(), gzip(sb_blob)] {
        for pipeline in [true, false] {
            let sb = Sandbox::new();
            let opts = ApplyOptions {
                pipeline,
                ..Default::default()
            };
            let err = apply(&blob[..], &sb.layer, &opts).expect_err("hostile layer was applied");
            sb.assert_outside_untouched();
            eprintln!("pipeline={pipeline}: {err}");
            errs.push(err);
        }
    }
    errs
}

fn assert_unsafe(errs: &[Error], entry: &str) {
    for e in errs {
        match e {
            Error::UnsafeEntry { entry: got, .. } => assert_eq!(got, entry, "{e}"),
            other => panic!("expected UnsafeEntry for {entry:?}, got {other:?}"),
        }
        assert!(e.to_string().contains(entry), "{e}");
    }
}

fn assert_format(errs: &[Error], needles: &[&str]) {
    for e in errs {
        match e {
            Error::Format(m) => {
                for n in needles {
                    assert!(m.contains(n), "{m:?} does not mention {n:?}");
                }
            }
            other => panic!("expected a format error, got {other:?}"),
        }
    }
}

#[test]
fn hostile_dotdot_escape() {
    let tar = tar_of(&[raw_entry(b"../escape", b'0', b"pwned", b"")]);
    assert_unsafe(&apply_all_ways(&tar), "../escape");
}

#[test]
fn hostile_absolute_path() {
    let tar = tar_of(&[raw_entry(b"/abs/path", b'0', b"pwned", b"")]);
    assert_unsafe(&apply_all_ways(&tar), "/abs/path");
    assert!(!std::path::Path::new("/abs").exists());
}

#[test]
fn hostile_dotdot_in_the_middle() {
    let tar = tar_of(&[raw_entry(b"a/../../x", b'0', b"pwned", b"")]);
    assert_unsafe(&apply_all_ways(&tar), "a/../../x");
}

#[test]
fn hostile_symlink_then_write_through() {
    // link -> /abs/outside, then link/file.
    let sb = Sandbox::new();
    let target = sb.outside.to_str().unwrap().as_bytes().to_vec();
    let tar = tar_of(&[
        raw_entry(b"link", b'2', b"", &target),
        raw_entry(b"link/file", b'0', b"pwned", b""),
    ]);
    assert_unsafe(&apply_all_ways(&tar), "link/file");
    // Also a directory entry and a whiteout through it.
    for second in [
        raw_entry(b"link/dir/", b'5', b"", b""),
        raw_entry(b"link/.wh.sentinel", b'0', b"", b""),
        raw_entry(b"link/.wh..wh..opq", b'0', b"", b""),
    ] {
        let tar = tar_of(&[raw_entry(b"link", b'2', b"", &target), second.clone()]);
        let name = String::from_utf8_lossy(&second[..100])
            .trim_end_matches('\0')
            .to_string();
        assert_unsafe(&apply_all_ways(&tar), &name);
    }
}

#[test]
fn hostile_symlink_to_parent_then_write_through() {
    let tar = tar_of(&[
        raw_entry(b"up", b'2', b"", b".."),
        raw_entry(b"up/outside/pwned", b'0', b"pwned", b""),
    ]);
    assert_unsafe(&apply_all_ways(&tar), "up/outside/pwned");
    let tar = tar_of(&[
        raw_entry(b"a", b'2', b"", b"../.."),
        raw_entry(b"a/x", b'0', b"pwned", b""),
    ]);
    assert_unsafe(&apply_all_ways(&tar), "a/x");
    // Even a symlink that stays inside is not followed.
    let tar = tar_of(&[
        raw_entry(b"real/", b'5', b"", b""),
        raw_entry(b"alias", b'2', b"", b"real"),
        raw_entry(b"alias/x", b'0', b"x", b""),
    ]);
    assert_unsafe(&apply_all_ways(&tar), "alias/x");
}

#[test]
fn hostile_hardlink_outside() {
    let tar = tar_of(&[raw_entry(b"hl", b'1', b"", b"../outside/sentinel")]);
    assert_unsafe(&apply_all_ways(&tar), "hl");
    let sb = Sandbox::new();
    let abs = sb.sentinel().to_str().unwrap().as_bytes().to_vec();
    let tar = tar_of(&[raw_entry(b"hl2", b'1', b"", &abs)]);
    assert_unsafe(&apply_all_ways(&tar), "hl2");
}

#[test]
fn hostile_hardlink_through_symlink() {
    let sb = Sandbox::new();
    let target = sb.outside.to_str().unwrap().as_bytes().to_vec();
    let tar = tar_of(&[
        raw_entry(b"s", b'2', b"", &target),
        raw_entry(b"h", b'1', b"", b"s/sentinel"),
    ]);
    assert_unsafe(&apply_all_ways(&tar), "h");
}

#[test]
fn hostile_whiteout_of_dotdot() {
    let tar = tar_of(&[raw_entry(b"d/.wh...", b'0', b"", b"")]);
    assert_unsafe(&apply_all_ways(&tar), "d/.wh...");
}

#[test]
fn hostile_truncated_archive() {
    let data = vec![7u8; 10_000];
    let full = tar_of(&[raw_entry(b"big", b'0', &data, b"")]);
    let cut = &full[..512 + 5000];
    assert_format(&apply_all_ways(cut), &["truncated", "big"]);
    // Cut inside a header.
    let full = tar_of(&[
        raw_entry(b"small", b'0', b"x", b""),
        raw_entry(b"next", b'0', b"y", b""),
    ]);
    assert_format(
        &apply_all_ways(&full[..1024 + 100]),
        &["truncated", "small"],
    );
    // A truncated gzip stream of a valid tar.
    let gz = gzip(&tar_of(&[raw_entry(b"big", b'0', &data, b"")]));
    let sb = Sandbox::new();
    let err = apply(&gz[..gz.len() / 2], &sb.layer, &ApplyOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Format(_)), "{err:?}");
    sb.assert_outside_untouched();
}

#[test]
fn hostile_huge_size() {
    // A 1 TiB file (base-256 size) with a few bytes behind it: refused when
    // the data runs out, without allocating anything like it.
    let mut t = raw_header(b"huge", b'0', 1 << 40, b"", false).to_vec();
    t.extend_from_slice(&[1u8; 4096]);
    assert_format(&apply_all_ways(&t), &["truncated", "huge"]);
    // A huge PAX header is refused before it is read.
    let mut t = raw_header(b"PaxHeaders/huge", b'x', 1 << 40, b"", false).to_vec();
    t.extend_from_slice(&[b'9'; 4096]);
    assert_format(&apply_all_ways(&t), &["PAX header"]);
    // And a huge GNU long name.
    let mut t = raw_header(b"././@LongLink", b'L', 1 << 30, b"", true).to_vec();
    t.extend_from_slice(&[b'a'; 4096]);
    assert_format(&apply_all_ways(&t), &["long name"]);
}

#[test]
fn hostile_corrupt_gzip() {
    let mut payload = Vec::new();
    let mut x: u32 = 1;
    for _ in 0..200_000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        payload.push(b"abcdefgh"[(x >> 16) as usize % 8]);
    }
    let tar = tar_of(&[
        raw_entry(b"a", b'0', &payload, b""),
        raw_entry(b"b", b'0', &payload, b""),
    ]);
    let mut gz = gzip(&tar);
    let mid = gz.len() / 2;
    for b in &mut gz[mid..mid + 64] {
        *b ^= 0x5a;
    }
    for pipeline in [true, false] {
        let sb = Sandbox::new();
        let opts = ApplyOptions {
            pipeline,
            ..Default::default()
        };
        let err = apply(&gz[..], &sb.layer, &opts).unwrap_err();
        eprintln!("pipeline={pipeline}: {err}");
        match &err {
            Error::Format(m) => assert!(m.contains("gzip") || m.contains("header"), "{m}"),
            other => panic!("expected a format error, got {other:?}"),
        }
        sb.assert_outside_untouched();
    }
    // Not gzip at all past the magic.
    let mut bad = vec![0x1f, 0x8b];
    bad.extend_from_slice(&[0xff; 100]);
    let sb = Sandbox::new();
    let err = apply(&bad[..], &sb.layer, &ApplyOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Format(_)), "{err:?}");
}

#[test]
fn hostile_corrupt_zstd() {
    let tar = tar_of(&[raw_entry(b"a", b'0', &vec![3u8; 100_000], b"")]);
    let mut z = zstd(&tar);
    let mid = z.len() / 2;
    z[mid] ^= 0xff;
    z.truncate(z.len() - 3);
    let sb = Sandbox::new();
    let err = apply(&z[..], &sb.layer, &ApplyOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Format(_)), "{err:?}");
    sb.assert_outside_untouched();
}

#[test]
fn not_a_tar() {
    let sb = Sandbox::new();
    let err = apply(&[b'x'; 2048][..], &sb.layer, &ApplyOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::Format(ref m) if m.contains("checksum")),
        "{err:?}"
    );
}
