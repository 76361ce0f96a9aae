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

/// One entry of a filesystem tree as a container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// `file`, `dir`, `symlink`, `fifo`, `char`, `block`, `socket`.
    pub kind: &'static str,
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size of a regular file or symlink.
    pub size: u64,
    /// SHA-256 of a regular file's bytes.
    pub sha256: Option<String>,
    /// A symlink's target.
    pub link: Option<String>,
    /// A device's numbers.
    pub rdev: u64,
    /// Extended attributes (not `security.selinux`), sorted.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Hard links to the same inode.
    pub nlink: u64,
}

/// Every entry under `root`, by path relative to it.
pub fn tree(root: &Path) -> anyhow::Result<std::collections::BTreeMap<String, TreeEntry>> {
    use sha2::Digest;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            let m = std::fs::symlink_metadata(&p)?;
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else if ft.is_socket() {
                "socket"
            } else {
                "file"
            };
            let mut xattrs = Vec::new();
            for name in xattr::list(&p)? {
                let name = name.to_string_lossy().into_owned();
                if name == "security.selinux" {
                    continue;
                }
                let v = xattr::get(&p, &name)?.unwrap_or_default();
                xattrs.push((name, v));
            }
            xattrs.sort();
            let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
            out.insert(
                rel,
                TreeEntry {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    size: if ft.is_file() || ft.is_symlink() {
                        m.len()
                    } else {
                        0
                    },
                    sha256: if ft.is_file() {
                        Some(format!("{:x}", sha2::Sha256::digest(std::fs::read(&p)?)))
                    } else {
                        None
                    },
                    link: if ft.is_symlink() {
                        Some(std::fs::read_link(&p)?.to_string_lossy().into_owned())
                    } else {
                        None
                    },
                    rdev: m.rdev(),
                    xattrs,
                    nlink: if ft.is_dir() { 0 } else { m.nlink() },
                },
            );
            if ft.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok(out)
}

/// The differences between two trees, one line each (empty: the same).
pub fn tree_diff(
    a: &std::collections::BTreeMap<String, TreeEntry>,
    b: &std::collections::BTreeMap<String, TreeEntry>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (p, ea) in a {
        match b.get(p) {
            None => d.push(format!("only in the first: {p} {ea:?}")),
            Some(eb) if eb != ea => d.push(format!("{p}: {ea:?} vs {eb:?}")),
            _ => {}
        }
    }
    for (p, eb) in b {
        if !a.contains_key(p) {
            d.push(format!("only in the second: {p} {eb:?}"));
        }
    }
    d
}

/// The tree a container of `snapshot`'s image sees: a read-only view of it
/// through `ctr snapshots view`, mounted under `dir`, walked, unmounted and
/// removed.
pub fn view_tree(
    cd: &mut strata::harness::Containerd,
    snapshotter: &str,
    snapshot: &str,
    dir: &Path,
) -> anyhow::Result<std::collections::BTreeMap<String, TreeEntry>> {
    let key = format!("tree-view-{snapshotter}");
    let target = dir.join(format!("view-{snapshotter}"));
    cd.mount_view(snapshotter, snapshot, &key, &target)?;
    let walked = tree(&target);
    cd.unmount_view(snapshotter, &key, &target)?;
    walked
}

/// `strata pull` of `reference` into `cd` (the harness's `strata`
/// namespace) on `snapshotter`: what it printed, stdout then stderr.
pub fn strata_pull(
    cd: &strata::harness::Containerd,
    snapshotter: &str,
    reference: &str,
) -> anyhow::Result<String> {
    let out = cd.strata_pull(&strata_bin(), snapshotter, reference)?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// xorshift64*: a seeded, reproducible sequence, for the randomized tests.
pub struct Rng(u64);

impl Rng {
    /// A sequence from `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (0 for 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// One of `v`, if it has any.
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        (!v.is_empty()).then(|| &v[self.below(v.len())])
    }
}

/// The environment variable `name` parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Appends `line` (`name=count`) to the file `STRATA_SUMMARY` names, if
/// any: `scripts/test` sums them into its reliability line.
pub fn summary(line: &str) -> anyhow::Result<()> {
    if let Some(f) = std::env::var_os("STRATA_SUMMARY") {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(f)?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

/// Every byte of blob `digest`, read through the content API.
pub async fn read_blob(
    c: &mut strata_proto::content::content_client::ContentClient<tonic::transport::Channel>,
    digest: &str,
) -> anyhow::Result<Vec<u8>> {
    let mut s = c
        .read(strata_proto::content::ReadContentRequest {
            digest: digest.into(),
            offset: 0,
            size: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.message().await? {
        out.extend_from_slice(&r.data);
    }
    Ok(out)
}
