//! Applying well-formed layers: every entry type, whiteouts, xattrs, modes,
//! owners, times, long names, sparse files, replacements; both digests; the
//! three compressions; with and without the decompression thread.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::*;
use strata_unpack::{apply, ApplyOptions, Compression, Error};
use tar::EntryType;

/// security.capability, VFS_CAP_REVISION_2 with the effective bit,
/// permitted = CAP_NET_BIND_SERVICE.
fn cap_value() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    v.extend_from_slice(&(1u32 << 10).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

const LONG_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const LONG_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn long_name() -> String {
    // > 100 characters: a GNU long name ('L') from the tar crate.
    format!("long/{LONG_A}/{LONG_B}/file.txt")
}

fn deep_name() -> String {
    // > 255 characters, nested: a PAX path record.
    let c = "c".repeat(100);
    let d = "d".repeat(100);
    let e = "e".repeat(100);
    format!("long2/{c}/{d}/{e}/f.txt")
}

fn long_target() -> String {
    format!("{}target", "x/".repeat(70))
}

/// Old GNU sparse ('S'): five fragments, so one extension header; a
/// trailing hole.
const SPARSE_FRAGS: &[(u64, u8, usize)] = &[
    (0, b'A', 512),
    (1 << 20, b'B', 512),
    (2 << 20, b'C', 1024),
    ((2 << 20) + 4096, b'D', 512),
    (3 << 20, b'E', 100),
];
const SPARSE_SIZE: u64 = (3 << 20) + 8192;

fn old_gnu_sparse(name: &[u8]) -> Vec<u8> {
    let data: usize = SPARSE_FRAGS.iter().map(|f| f.2).sum();
    let mut h = raw_header(name, b'S', data as u64, b"", true);
    let put = |field: &mut [u8], v: u64| {
        let s = format!("{v:011o}");
        field[..11].copy_from_slice(s.as_bytes());
        field[11] = 0;
    };
    for (i, f) in SPARSE_FRAGS.iter().take(4).enumerate() {
        put(&mut h[386 + i * 24..386 + i * 24 + 12], f.0);
        put(&mut h[386 + i * 24 + 12..386 + i * 24 + 24], f.2 as u64);
    }
    h[482] = 1; // extended
    put(&mut h[483..495], SPARSE_SIZE);
    set_checksum(&mut h);
    let mut ext = [0u8; 512];
    for (i, f) in SPARSE_FRAGS.iter().skip(4).enumerate() {
        put(&mut ext[i * 24..i * 24 + 12], f.0);
        put(&mut ext[i * 24 + 12..i * 24 + 24], f.2 as u64);
    }
    let mut out = h.to_vec();
    out.extend_from_slice(&ext);
    for f in SPARSE_FRAGS {
        out.extend(std::iter::repeat_n(f.1, f.2));
    }
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// PAX GNU sparse 1.0: the map at the start of the data.
fn pax_sparse_1_0(ar: &mut Ar) {
    ar.pax(&[
        ("GNU.sparse.major", b"1"),
        ("GNU.sparse.minor", b"0"),
        ("GNU.sparse.name", b"sparse/pax"),
        ("GNU.sparse.realsize", b"1048676"),
    ]);
    let mut data = b"2\n0\n5\n1048576\n3\n".to_vec();
    data.resize(512, 0);
    data.extend_from_slice(b"hello");
    data.extend_from_slice(b"abc");
    ar.raw(&raw_entry(b"sparse/GNUSparseFile.0/pax", b'0', &data, b""));
}

/// The tar (with 10240-byte record padding, which the diff_id covers).
fn rich_tar() -> Vec<u8> {
    let mut ar = Ar::new();
    ar.dir("etc/", 0o755, 0, 0, T1);
    ar.pax(&[
        ("mtime", b"1650000000.123456789"),
        ("atime", b"1700000000.5"),
    ]);
    ar.file("etc/hello.txt", b"hello world\n", 0o644, 1000, 1001, T1);
    // A file replaced by a symlink; a directory replaced by a file.
    ar.file("etc/replaced", b"old", 0o644, 0, 0, T1);
    ar.symlink("etc/replaced", "hello.txt", 0, T1);
    ar.dir("etc/d/", 0o755, 0, 0, T1);
    ar.file("etc/d/x", b"x", 0o644, 0, 0, T1);
    ar.file("etc/d", b"now a file", 0o600, 0, 0, T1);
    // Implicit parents, setuid / setgid after chown, a hard link.
    ar.file("usr/bin/su", b"su binary", 0o4755, 0, 0, T1);
    ar.file("usr/bin/sg", b"sg binary", 0o2755, 1234, 42, T1);
    ar.hardlink("usr/bin/su-hard", "usr/bin/su", 0o4755);
    let cap = cap_value();
    ar.pax(&[
        ("SCHILY.xattr.security.capability", &cap),
        ("SCHILY.xattr.user.comment", b"hi"),
        ("SCHILY.xattr.trusted.evil", b"x"),
    ]);
    ar.file("usr/bin/ping", b"ping binary", 0o755, 0, 0, T1);
    ar.dir("tmp/", 0o1777, 0, 0, T1);
    ar.symlink("etc/abs", "/etc/passwd", 7, T1);
    ar.symlink("etc/rel", "../usr/bin/su", 0, T1);
    ar.device("dev/null", EntryType::Char, 1, 3, 0o666, 0);
    ar.device("dev/loop0", EntryType::Block, 7, 0, 0o660, 6);
    ar.device("run/fifo", EntryType::Fifo, 0, 0, 0o600, 0);
    // Whiteouts.
    ar.file("etc/.wh.gone", b"", 0o644, 0, 0, T1);
    ar.dir("var/cache/", 0o755, 0, 0, T1);
    ar.file("var/cache/.wh..wh..opq", b"", 0o644, 0, 0, T1);
    ar.file("var/cache/kept", b"k", 0o644, 0, 0, T1);
    ar.file(".wh..wh.plnk.123", b"", 0o644, 0, 0, T1);
    // Long names and link targets.
    ar.file(&long_name(), b"long", 0o644, 0, 0, T1);
    ar.pax(&[("path", deep_name().as_bytes())]);
    ar.file("placeholder", b"deep", 0o644, 0, 0, T1);
    ar.symlink("etc/longlink", &long_target(), 0, T1);
    // Sparse files.
    ar.raw(&old_gnu_sparse(b"sparse/gnu"));
    pax_sparse_1_0(&mut ar);
    // The same directory again: attributes updated, children kept.
    ar.dir("etc/", 0o750, 0, 0, T2);
    let mut tar = ar.finish();
    tar.resize(tar.len().div_ceil(10240) * 10240, 0);
    tar
}

fn stat(p: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn check_rich_tree(root: &Path) {
    let etc = stat(&root.join("etc"));
    assert!(etc.is_dir());
    assert_eq!(etc.mode() & 0o7777, 0o750);
    assert_eq!(
        etc.mtime(),
        T2 as i64,
        "directory mtime set after its children"
    );

    let hello = stat(&root.join("etc/hello.txt"));
    assert_eq!(
        std::fs::read(root.join("etc/hello.txt")).unwrap(),
        b"hello world\n"
    );
    assert_eq!(hello.mode() & 0o7777, 0o644);
    assert_eq!((hello.uid(), hello.gid()), (1000, 1001));
    assert_eq!(
        (hello.mtime(), hello.mtime_nsec()),
        (1_650_000_000, 123_456_789)
    );
    assert_eq!(
        (hello.atime(), hello.atime_nsec()),
        (1_700_000_000, 500_000_000)
    );

    let replaced = stat(&root.join("etc/replaced"));
    assert!(replaced.file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(root.join("etc/replaced")).unwrap(),
        Path::new("hello.txt")
    );
    let d = stat(&root.join("etc/d"));
    assert!(d.is_file());
    assert_eq!(std::fs::read(root.join("etc/d")).unwrap(), b"now a file");
    assert_eq!(d.mode() & 0o7777, 0o600);

    for implicit in ["usr", "usr/bin", "dev", "run", "sparse"] {
        let m = stat(&root.join(implicit));
        assert!(m.is_dir(), "{implicit}");
        assert_eq!(m.mode() & 0o7777, 0o755, "{implicit}");
        assert_eq!((m.uid(), m.gid()), (0, 0), "{implicit}");
    }

    let su = stat(&root.join("usr/bin/su"));
    assert_eq!(su.mode() & 0o7777, 0o4755);
    assert_eq!(
        std::fs::read(root.join("usr/bin/su")).unwrap(),
        b"su binary"
    );
    assert_eq!(su.mtime(), T1 as i64);
    let sg = stat(&root.join("usr/bin/sg"));
    assert_eq!(
        sg.mode() & 0o7777,
        0o2755,
        "setgid kept although chown came first"
    );
    assert_eq!((sg.uid(), sg.gid()), (1234, 42));
    let hard = stat(&root.join("usr/bin/su-hard"));
    assert_eq!(hard.ino(), su.ino());
    assert_eq!(su.nlink(), 2);

    let ping = root.join("usr/bin/ping");
    assert_eq!(lget(&ping, "security.capability"), Some(cap_value()));
    assert_eq!(lget(&ping, "user.comment"), Some(b"hi".to_vec()));
    assert_eq!(
        lget(&ping, "trusted.evil"),
        None,
        "trusted.* from archives is ignored"
    );

    assert_eq!(stat(&root.join("tmp")).mode() & 0o7777, 0o1777);

    let abs = stat(&root.join("etc/abs"));
    assert!(abs.file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(root.join("etc/abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!((abs.uid(), abs.gid()), (7, 7));
    assert_eq!(abs.mtime(), T1 as i64);
    assert_eq!(
        std::fs::read_link(root.join("etc/rel")).unwrap(),
        Path::new("../usr/bin/su")
    );
    assert_eq!(
        std::fs::read_link(root.join("etc/longlink")).unwrap(),
        Path::new(&long_target())
    );

    let null = stat(&root.join("dev/null"));
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    let lp = stat(&root.join("dev/loop0"));
    assert!(lp.file_type().is_block_device());
    assert_eq!(lp.rdev(), rustix::fs::makedev(7, 0));
    assert_eq!((lp.mode() & 0o7777, lp.gid()), (0o660, 6));
    let fifo = stat(&root.join("run/fifo"));
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o600);

    // Whiteouts.
    let gone = stat(&root.join("etc/gone"));
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
    assert!(!root.join("etc/.wh.gone").exists());
    assert_eq!(
        lget(&root.join("var/cache"), "trusted.overlay.opaque"),
        Some(b"y".to_vec())
    );
    assert!(root.join("var/cache/kept").exists());
    assert!(std::fs::symlink_metadata(root.join("var/cache/.wh..wh..opq")).is_err());
    assert!(std::fs::symlink_metadata(root.join(".wh..wh.plnk.123")).is_err());
    assert!(std::fs::symlink_metadata(root.join("plnk.123")).is_err());

    assert_eq!(std::fs::read(root.join(long_name())).unwrap(), b"long");
    assert_eq!(std::fs::read(root.join(deep_name())).unwrap(), b"deep");
    assert!(!root.join("placeholder").exists());

    // Sparse files: content, size, and holes left unallocated.
    let gnu = std::fs::read(root.join("sparse/gnu")).unwrap();
    assert_eq!(gnu.len() as u64, SPARSE_SIZE);
    let mut expect = vec![0u8; SPARSE_SIZE as usize];
    for &(off, byte, len) in SPARSE_FRAGS {
        expect[off as usize..off as usize + len].fill(byte);
    }
    assert!(gnu == expect, "old GNU sparse content");
    let blocks = stat(&root.join("sparse/gnu")).blocks() * 512;
    assert!(
        blocks < SPARSE_SIZE / 4,
        "holes were written as data: {blocks} bytes"
    );
    let pax = std::fs::read(root.join("sparse/pax")).unwrap();
    let mut expect = vec![0u8; 1_048_676];
    expect[..5].copy_from_slice(b"hello");
    expect[1_048_576..1_048_579].copy_from_slice(b"abc");
    assert!(pax == expect, "PAX 1.0 sparse content");
    assert!(!root.join("sparse/GNUSparseFile.0").exists());
}

fn run_rich(compress: fn(&[u8]) -> Vec<u8>, expect: Compression) {
    let tar = rich_tar();
    let blob = compress(&tar);
    for pipeline in [true, false] {
        let sb = Sandbox::new();
        let opts = ApplyOptions {
            pipeline,
            ..Default::default()
        };
        let r = apply(&blob[..], &sb.layer, &opts).unwrap();
        assert_eq!(r.compression, expect);
        assert_eq!(r.digest, sha(&blob), "layer digest");
        assert_eq!(r.diff_id, sha(&tar), "diff_id");
        assert_eq!(r.compressed_bytes, blob.len() as u64);
        assert_eq!(r.uncompressed_bytes, tar.len() as u64);
        assert_eq!(r.counts.whiteouts, 1);
        assert_eq!(r.counts.opaques, 1);
        assert_eq!(r.counts.hardlinks, 1);
        assert_eq!(r.counts.symlinks, 4);
        assert_eq!(r.counts.devices, 3);
        assert_eq!(r.counts.skipped, 1);
        assert!(r.bytes_written > 0);
        check_rich_tree(&sb.layer);
        sb.assert_outside_untouched();
    }
}

#[test]
fn rich_layer_plain_tar() {
    run_rich(|t| t.to_vec(), Compression::None);
}

#[test]
fn rich_layer_gzip() {
    run_rich(gzip, Compression::Gzip);
}

#[test]
fn rich_layer_zstd() {
    run_rich(zstd, Compression::Zstd);
}

#[test]
fn multi_member_gzip() {
    // Two gzip members concatenated make one stream (as Go's gzip reader).
    let tar = rich_tar();
    let (a, b) = tar.split_at(4096);
    let blob = [gzip(a), gzip(b)].concat();
    let sb = Sandbox::new();
    let r = apply(&blob[..], &sb.layer, &ApplyOptions::default()).unwrap();
    assert_eq!(r.diff_id, sha(&tar));
    assert_eq!(r.digest, sha(&blob));
    check_rich_tree(&sb.layer);
}

#[test]
fn expected_digests_checked() {
    let tar = rich_tar();
    let blob = gzip(&tar);
    let sb = Sandbox::new();
    let ok = ApplyOptions {
        expected_digest: Some(sha(&blob)),
        expected_diff_id: Some(sha(&tar)),
        ..Default::default()
    };
    apply(&blob[..], &sb.layer, &ok).unwrap();

    let sb = Sandbox::new();
    let bad = ApplyOptions {
        expected_diff_id: Some(sha(b"something else")),
        ..Default::default()
    };
    match apply(&blob[..], &sb.layer, &bad) {
        Err(Error::DigestMismatch { what, actual, .. }) => {
            assert_eq!(what, "diff_id");
            assert_eq!(actual, sha(&tar));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
}

#[test]
fn userxattr_opaque_and_overlay_xattrs_ignored() {
    let mut ar = Ar::new();
    ar.dir("a/", 0o755, 0, 0, T1);
    ar.file("a/.wh..wh..opq", b"", 0o644, 0, 0, T1);
    ar.pax(&[
        ("SCHILY.xattr.user.overlay.redirect", b"/elsewhere"),
        ("SCHILY.xattr.user.ok", b"1"),
    ]);
    ar.file("b", b"b", 0o644, 0, 0, T1);
    let tar = ar.finish();
    let sb = Sandbox::new();
    let opts = ApplyOptions {
        userxattr: true,
        ..Default::default()
    };
    apply(&tar[..], &sb.layer, &opts).unwrap();
    let a = sb.layer.join("a");
    assert_eq!(lget(&a, "user.overlay.opaque"), Some(b"y".to_vec()));
    assert_eq!(lget(&a, "trusted.overlay.opaque"), None);
    let b = sb.layer.join("b");
    assert_eq!(lget(&b, "user.overlay.redirect"), None);
    assert_eq!(lget(&b, "user.ok"), Some(b"1".to_vec()));
}

#[test]
fn missing_parents_copy_lower_attributes() {
    // containerd's WithParents: a parent missing from the layer takes the
    // attributes of the same directory in the first lower that has it.
    let lower = tempfile::tempdir().unwrap();
    let share = lower.path().join("usr/share");
    std::fs::create_dir_all(&share).unwrap();
    std::os::unix::fs::chown(&share, Some(5), Some(6)).unwrap();
    std::fs::set_permissions(&share, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    std::fs::set_permissions(
        lower.path().join("usr"),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    rustix::fs::setxattr(
        &share,
        "user.from-lower",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::setxattr(
        &share,
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let mut ar = Ar::new();
    ar.file("usr/share/doc/readme", b"r", 0o644, 0, 0, T1);
    let tar = ar.finish();
    let sb = Sandbox::new();
    let opts = ApplyOptions {
        lower_dirs: vec![lower.path().to_path_buf()],
        ..Default::default()
    };
    apply(&tar[..], &sb.layer, &opts).unwrap();
    let usr = stat(&sb.layer.join("usr"));
    assert_eq!(usr.mode() & 0o7777, 0o711);
    let s = stat(&sb.layer.join("usr/share"));
    assert_eq!(s.mode() & 0o7777, 0o750);
    assert_eq!((s.uid(), s.gid()), (5, 6));
    assert_eq!(
        lget(&sb.layer.join("usr/share"), "user.from-lower"),
        Some(b"1".to_vec())
    );
    assert_eq!(
        lget(&sb.layer.join("usr/share"), "trusted.overlay.opaque"),
        None,
        "trusted.* is not copied up"
    );
    let doc = stat(&sb.layer.join("usr/share/doc"));
    assert_eq!((doc.mode() & 0o7777, doc.uid()), (0o755, 0));
}

#[test]
fn parents_adopted_later_match_an_apply_with_its_lowers() {
    // A layer unpacked before its parent is known (concurrent unpack) gets
    // its implicit parents' attributes afterwards: the same owner, mode and
    // xattrs as an apply that had the lowers from the start.
    let lower = tempfile::tempdir().unwrap();
    let share = lower.path().join("usr/share");
    std::fs::create_dir_all(&share).unwrap();
    std::os::unix::fs::chown(&share, Some(5), Some(6)).unwrap();
    std::fs::set_permissions(&share, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    rustix::fs::setxattr(
        &share,
        "user.from-lower",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let mut ar = Ar::new();
    ar.file("usr/share/doc/readme", b"r", 0o644, 0, 0, T1);
    // Set by the layer itself: never adopted.
    ar.dir("etc", 0o700, 3, 3, T1);
    ar.file("etc/conf/x", b"x", 0o644, 0, 0, T1);
    let tar = ar.finish();

    let with = Sandbox::new();
    let opts = ApplyOptions {
        lower_dirs: vec![lower.path().to_path_buf()],
        ..Default::default()
    };
    let r = apply(&tar[..], &with.layer, &opts).unwrap();
    // usr/share/doc and etc/conf: no lower has them.
    assert_eq!(
        r.implicit_dirs,
        vec![b"etc/conf".to_vec(), b"usr/share/doc".to_vec()]
    );

    let later = Sandbox::new();
    let r = apply(&tar[..], &later.layer, &ApplyOptions::default()).unwrap();
    assert_eq!(
        r.implicit_dirs,
        vec![
            b"etc/conf".to_vec(),
            b"usr".to_vec(),
            b"usr/share".to_vec(),
            b"usr/share/doc".to_vec()
        ]
    );
    let changed = strata_unpack::adopt_parents(
        &later.layer,
        &r.implicit_dirs,
        &[lower.path().to_path_buf()],
    )
    .unwrap();
    assert_eq!(changed, 2, "usr and usr/share are in the lower");
    for p in ["usr", "usr/share", "usr/share/doc", "etc", "etc/conf"] {
        let (a, b) = (stat(&with.layer.join(p)), stat(&later.layer.join(p)));
        assert_eq!(
            (a.mode(), a.uid(), a.gid()),
            (b.mode(), b.uid(), b.gid()),
            "{p}"
        );
        assert_eq!(
            lget(&with.layer.join(p), "user.from-lower"),
            lget(&later.layer.join(p), "user.from-lower"),
            "{p}"
        );
    }
    assert_eq!(stat(&later.layer.join("etc")).mode() & 0o7777, 0o700);
}

#[test]
fn parents_made_under_an_adopted_setgid_parent_take_its_group() {
    // mkdir in a setgid directory inherits its group and setgid bit: when
    // the parent is adopted afterwards, its new children get them too.
    let lower = tempfile::tempdir().unwrap();
    let srv = lower.path().join("srv");
    std::fs::create_dir(&srv).unwrap();
    std::os::unix::fs::chown(&srv, Some(0), Some(50)).unwrap();
    std::fs::set_permissions(&srv, std::os::unix::fs::PermissionsExt::from_mode(0o2775)).unwrap();
    let mut ar = Ar::new();
    ar.file("srv/app/f", b"f", 0o644, 0, 0, T1);
    let tar = ar.finish();
    let with = Sandbox::new();
    let opts = ApplyOptions {
        lower_dirs: vec![lower.path().to_path_buf()],
        ..Default::default()
    };
    apply(&tar[..], &with.layer, &opts).unwrap();
    let later = Sandbox::new();
    let r = apply(&tar[..], &later.layer, &ApplyOptions::default()).unwrap();
    strata_unpack::adopt_parents(
        &later.layer,
        &r.implicit_dirs,
        &[lower.path().to_path_buf()],
    )
    .unwrap();
    for p in ["srv", "srv/app"] {
        let (a, b) = (stat(&with.layer.join(p)), stat(&later.layer.join(p)));
        assert_eq!((a.mode(), a.gid()), (b.mode(), b.gid()), "{p}");
    }
    assert_eq!(stat(&later.layer.join("srv/app")).gid(), 50);
}

#[test]
fn empty_and_end_only_blobs() {
    for blob in [Vec::new(), end_of_archive(), gzip(&end_of_archive())] {
        let sb = Sandbox::new();
        let r = apply(&blob[..], &sb.layer, &ApplyOptions::default()).unwrap();
        assert_eq!(r.counts.entries, 0);
        assert_eq!(r.digest, sha(&blob));
        assert_eq!(std::fs::read_dir(&sb.layer).unwrap().count(), 0);
    }
}

#[test]
fn root_entry_and_dot_prefixes() {
    // "./" is the root (ignored, as containerd); "./a/./b" is "a/b".
    let mut ar = Ar::new();
    ar.dir("./", 0o700, 0, 0, T1);
    ar.file("./a/./b", b"b", 0o644, 0, 0, T1);
    let tar = ar.finish();
    let sb = Sandbox::new();
    let before = stat(&sb.layer).mode() & 0o7777;
    let r = apply(&tar[..], &sb.layer, &ApplyOptions::default()).unwrap();
    assert_eq!(r.counts.skipped, 1);
    assert_eq!(stat(&sb.layer).mode() & 0o7777, before);
    assert_eq!(std::fs::read(sb.layer.join("a/b")).unwrap(), b"b");
}

#[test]
fn hard_link_to_symlink_links_the_symlink() {
    // As containerd (Go's os.Link): the new name is the symlink itself.
    let mut ar = Ar::new();
    ar.symlink("s", "/etc/passwd", 0, T1);
    ar.hardlink("h", "s", 0o777);
    let tar = ar.finish();
    let sb = Sandbox::new();
    apply(&tar[..], &sb.layer, &ApplyOptions::default()).unwrap();
    let h = stat(&sb.layer.join("h"));
    assert!(h.file_type().is_symlink());
    assert_eq!(h.ino(), stat(&sb.layer.join("s")).ino());
}

#[test]
fn xattrs_on_symlinks_devices_and_hard_links() {
    // Set by name relative to the parent fd (lsetxattr through
    // /proc/self/fd/N/NAME), never following the symlink; user.* on a
    // symlink or a device is refused by the kernel and ignored (containerd).
    let mut ar = Ar::new();
    ar.file("target", b"t", 0o644, 0, 0, T1);
    ar.pax(&[
        ("SCHILY.xattr.security.strata-test", b"on-link"),
        ("SCHILY.xattr.user.ignored", b"1"),
    ]);
    ar.symlink("link", "target", 0, T1);
    ar.pax(&[("SCHILY.xattr.security.strata-test", b"on-fifo")]);
    ar.device("fifo", EntryType::Fifo, 0, 0, 0o644, 0);
    ar.pax(&[("SCHILY.xattr.user.on-hardlink", b"h")]);
    ar.hardlink("hard", "target", 0o640);
    let tar = ar.finish();
    let sb = Sandbox::new();
    apply(&tar[..], &sb.layer, &ApplyOptions::default()).unwrap();
    let l = sb.layer.join("link");
    assert_eq!(lget(&l, "security.strata-test"), Some(b"on-link".to_vec()));
    assert_eq!(lget(&l, "user.ignored"), None);
    let t = sb.layer.join("target");
    assert_eq!(
        lget(&t, "security.strata-test"),
        None,
        "the symlink was followed"
    );
    assert_eq!(
        lget(&sb.layer.join("fifo"), "security.strata-test"),
        Some(b"on-fifo".to_vec())
    );
    assert_eq!(lget(&t, "user.on-hardlink"), Some(b"h".to_vec()));
    assert_eq!(stat(&t).mode() & 0o7777, 0o640);
}

#[test]
fn pax_sparse_0_0_and_0_1() {
    let mut ar = Ar::new();
    // 0.1: the map in one record.
    ar.pax(&[
        ("GNU.sparse.major", b"0"),
        ("GNU.sparse.minor", b"1"),
        ("GNU.sparse.name", b"s01"),
        ("GNU.sparse.size", b"200"),
        ("GNU.sparse.map", b"0,5,100,3"),
    ]);
    ar.raw(&raw_entry(b"GNUSparseFile.1/s01", b'0', b"helloabc", b""));
    // 0.0: repeated offset / numbytes records.
    ar.pax(&[
        ("GNU.sparse.size", b"300"),
        ("GNU.sparse.offset", b"10"),
        ("GNU.sparse.numbytes", b"2"),
        ("GNU.sparse.offset", b"290"),
        ("GNU.sparse.numbytes", b"4"),
    ]);
    ar.raw(&raw_entry(b"s00", b'0', b"xyzzzz", b""));
    let tar = ar.finish();
    let sb = Sandbox::new();
    apply(&tar[..], &sb.layer, &ApplyOptions::default()).unwrap();
    let mut e = vec![0u8; 200];
    e[..5].copy_from_slice(b"hello");
    e[100..103].copy_from_slice(b"abc");
    assert_eq!(std::fs::read(sb.layer.join("s01")).unwrap(), e);
    let mut e = vec![0u8; 300];
    e[10..12].copy_from_slice(b"xy");
    e[290..294].copy_from_slice(b"zzzz");
    assert_eq!(std::fs::read(sb.layer.join("s00")).unwrap(), e);
}

#[test]
fn pax_linkpath_and_large_ids() {
    // PAX linkpath (> 100 chars), and uid/gid too large for the octal
    // fields, as PAX records; a base-256 mtime in the header.
    let target = format!("/{}", "t".repeat(150));
    let mut ar = Ar::new();
    ar.pax(&[
        ("linkpath", target.as_bytes()),
        ("uid", b"3000000"),
        ("gid", b"4000000"),
    ]);
    ar.raw(&raw_entry(b"plink", b'2', b"", b"short"));
    let mut h = raw_header(b"big-mtime", b'0', 1, b"", true);
    h[136] = 0x80;
    h[137..148].fill(0);
    h[144..148].copy_from_slice(&(T2 as u32).to_be_bytes());
    set_checksum(&mut h);
    let mut e = h.to_vec();
    e.push(b'z');
    e.resize(1024, 0);
    ar.raw(&e);
    let tar = ar.finish();
    let sb = Sandbox::new();
    apply(&tar[..], &sb.layer, &ApplyOptions::default()).unwrap();
    let p = sb.layer.join("plink");
    assert_eq!(std::fs::read_link(&p).unwrap(), Path::new(&target));
    let m = stat(&p);
    assert_eq!((m.uid(), m.gid()), (3_000_000, 4_000_000));
    assert_eq!(stat(&sb.layer.join("big-mtime")).mtime(), T2 as i64);
}
