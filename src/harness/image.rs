//! Writes OCI images (an OCI image layout that skopeo can push) from files,
//! with gzip layers and whiteouts, so that the tests and the demo need nothing
//! from outside the machine.

use std::path::Path;

use anyhow::{Context, Result};
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

/// One entry of a layer.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A directory.
    Dir(String),
    /// A directory with a mode and owner (uid, gid).
    OwnedDir(String, u32, u64, u64),
    /// A regular file with its bytes and mode.
    File(String, Vec<u8>, u32),
    /// A symbolic link to a target.
    Symlink(String, String),
    /// Deletes a path of a lower layer (`.wh.NAME`).
    Whiteout(String),
    /// Hides everything a lower layer has in this directory
    /// (`DIR/.wh..wh..opq`).
    Opaque(String),
    /// A regular file with owner, mode and extended attributes (PAX
    /// `SCHILY.xattr.*` records).
    Rich {
        /// Path.
        path: String,
        /// Bytes.
        data: Vec<u8>,
        /// Mode, with setuid/setgid/sticky bits.
        mode: u32,
        /// Owner.
        uid: u64,
        /// Group.
        gid: u64,
        /// Extended attributes.
        xattrs: Vec<(String, Vec<u8>)>,
    },
    /// A hard link to an earlier entry of the same layer.
    Hardlink(String, String),
    /// A named pipe.
    Fifo(String),
    /// A character device (major, minor).
    CharDev(String, u32, u32),
    /// Real files: the directory tree `src` of this machine under `dest`
    /// (directories, regular files, symlinks, with their modes), until
    /// `max_bytes` of file content.
    HostTree {
        /// The directory on this machine.
        src: std::path::PathBuf,
        /// Where it goes in the layer.
        dest: String,
        /// Stop adding files past this many bytes.
        max_bytes: u64,
    },
}

/// Appends the tree under `src` as `dest`, depth first in name order, until
/// `max_bytes` of file content; unreadable entries and other file types are
/// left out.
fn append_host_tree(
    b: &mut tar::Builder<Vec<u8>>,
    src: &Path,
    dest: &str,
    max_bytes: u64,
) -> Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    let mut added = 0u64;
    let mut stack = vec![(src.to_path_buf(), dest.trim_end_matches('/').to_string())];
    while let Some((dir, name)) = stack.pop() {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, format!("{name}/"), std::io::empty())?;
        let mut entries: Vec<_> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok()).collect(),
            Err(_) => continue,
        };
        entries.sort_by_key(|e| e.file_name());
        for e in entries.into_iter().rev() {
            let path = e.path();
            let child = format!("{name}/{}", e.file_name().to_string_lossy());
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if m.is_dir() {
                stack.push((path, child));
            } else if m.file_type().is_symlink() {
                if let Ok(target) = std::fs::read_link(&path) {
                    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                    b.append_link(&mut h, &child, target)?;
                }
            } else if m.is_file() && added < max_bytes {
                let Ok(data) = std::fs::read(&path) else {
                    continue;
                };
                let mut h = header(
                    tar::EntryType::Regular,
                    m.permissions().mode() & 0o7777,
                    data.len() as u64,
                );
                b.append_data(&mut h, &child, data.as_slice())?;
                added += data.len() as u64;
            }
        }
    }
    Ok(added)
}

/// An image: layers from the bottom, and the command to run.
#[derive(Debug, Clone, Default)]
pub struct Image {
    /// The layers, bottom first.
    pub layers: Vec<Vec<Entry>>,
    /// The default command.
    pub cmd: Vec<String>,
    /// Layers as plain tar instead of tar+gzip: equal files then give
    /// equal bytes in every layer (what chunk dedup can find).
    pub uncompressed: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// `sha256:…` of the manifest.
    pub manifest_digest: String,
    /// Compressed layer sizes.
    pub layer_sizes: Vec<u64>,
    /// The layers' diff_ids (digests of the uncompressed tars).
    pub diff_ids: Vec<String>,
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// An uncompressed tar of the entries.
fn layer_tar(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(p) => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(
                    &mut h,
                    format!("{}/", p.trim_end_matches('/')),
                    std::io::empty(),
                )?;
            }
            Entry::OwnedDir(p, mode, uid, gid) => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                h.set_uid(*uid);
                h.set_gid(*gid);
                b.append_data(
                    &mut h,
                    format!("{}/", p.trim_end_matches('/')),
                    std::io::empty(),
                )?;
            }
            Entry::File(p, data, mode) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, p, data.as_slice())?;
            }
            Entry::Symlink(p, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, target)?;
            }
            Entry::Opaque(dir) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(
                    &mut h,
                    format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
                    std::io::empty(),
                )?;
            }
            Entry::Rich {
                path,
                data,
                mode,
                uid,
                gid,
                xattrs,
            } => {
                if !xattrs.is_empty() {
                    let records: Vec<(String, &[u8])> = xattrs
                        .iter()
                        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                        .collect();
                    b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))?;
                }
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                h.set_uid(*uid);
                h.set_gid(*gid);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Hardlink(p, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, p, target)?;
            }
            Entry::Fifo(p) => {
                let mut h = header(tar::EntryType::Fifo, 0o644, 0);
                b.append_data(&mut h, p, std::io::empty())?;
            }
            Entry::CharDev(p, major, minor) => {
                let mut h = header(tar::EntryType::Char, 0o666, 0);
                h.set_device_major(*major)?;
                h.set_device_minor(*minor)?;
                b.append_data(&mut h, p, std::io::empty())?;
            }
            Entry::HostTree {
                src,
                dest,
                max_bytes,
            } => {
                append_host_tree(&mut b, src, dest, *max_bytes)?;
            }
            Entry::Whiteout(p) => {
                let path = Path::new(p);
                let name = path
                    .file_name()
                    .context("whiteout of a path with no file name")?
                    .to_string_lossy();
                let wh = path.with_file_name(format!(".wh.{name}"));
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, wh, std::io::empty())?;
            }
        }
    }
    Ok(b.into_inner()?)
}

fn put_blob(dir: &Path, bytes: &[u8]) -> Result<String> {
    let digest = sha256(bytes);
    let hex = digest.trim_start_matches("sha256:");
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(blobs.join(hex), bytes)?;
    Ok(digest)
}

impl Image {
    /// Writes the image as an OCI image layout in `dir` under `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<Written> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        let mut layer_sizes = Vec::new();
        for entries in &self.layers {
            let tar = layer_tar(entries)?;
            diff_ids.push(sha256(&tar));
            let (blob, media_type) = if self.uncompressed {
                (tar, "application/vnd.oci.image.layer.v1.tar")
            } else {
                let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
                std::io::Write::write_all(&mut gz, &tar)?;
                (gz.finish()?, "application/vnd.oci.image.layer.v1.tar+gzip")
            };
            layer_sizes.push(blob.len() as u64);
            let digest = put_blob(dir, &blob)?;
            layers.push(json!({
                "mediaType": media_type,
                "digest": digest,
                "size": blob.len(),
            }));
        }
        let config = serde_json::to_vec(&json!({
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            "os": "linux",
            "config": { "Cmd": self.cmd, "Env": ["PATH=/bin"] },
            "rootfs": { "type": "layers", "diff_ids": &diff_ids },
        }))?;
        let config_digest = put_blob(dir, &config)?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layers,
        }))?;
        let manifest_digest = put_blob(dir, &manifest)?;
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(Written {
            manifest_digest,
            layer_sizes,
            diff_ids,
        })
    }
}

/// The programs the busybox layer links to busybox.
const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "ls",
    "echo",
    "test",
    "stat",
    "find",
    "sort",
    "wc",
    "head",
    "du",
    "sha256sum",
];

/// A layer with a static busybox (Debian's busybox-static) as `/bin`.
pub fn busybox_layer() -> Result<Vec<Entry>> {
    let busybox = std::fs::read("/bin/busybox")
        .context("reading /bin/busybox: install busybox-static (scripts/setup does)")?;
    let mut entries = vec![
        Entry::Dir("bin".into()),
        Entry::File("bin/busybox".into(), busybox, 0o755),
    ];
    entries.extend(
        APPLETS
            .iter()
            .map(|a| Entry::Symlink(format!("bin/{a}"), "busybox".into())),
    );
    Ok(entries)
}

/// The image the demo and the end-to-end test use: busybox, then a data
/// layer, then a layer that deletes one file (whiteout), overwrites another
/// and adds one. Running it prints what a container sees.
pub fn demo_image() -> Result<Image> {
    let data = vec![
        Entry::Dir("data".into()),
        Entry::File(
            "data/kept.txt".into(),
            b"kept from layer 2\n".to_vec(),
            0o644,
        ),
        Entry::File(
            "data/deleted.txt".into(),
            b"must not be seen\n".to_vec(),
            0o644,
        ),
        Entry::File(
            "data/overwritten.txt".into(),
            b"old content\n".to_vec(),
            0o644,
        ),
        Entry::Dir("data/dir".into()),
        Entry::File("data/dir/nested.txt".into(), b"nested\n".to_vec(), 0o600),
    ];
    let top = vec![
        Entry::Dir("data".into()),
        Entry::Whiteout("data/deleted.txt".into()),
        Entry::File(
            "data/overwritten.txt".into(),
            b"new content from layer 3\n".to_vec(),
            0o644,
        ),
        Entry::File(
            "data/added.txt".into(),
            b"added in layer 3\n".to_vec(),
            0o644,
        ),
    ];
    Ok(Image {
        layers: vec![busybox_layer()?, data, top],
        cmd: vec![
            "/bin/sh".into(),
            "-c".into(),
            "ls /data; cat /data/kept.txt /data/overwritten.txt /data/added.txt".into(),
        ],
        uncompressed: false,
    })
}

/// An image with every kind of entry a layer can hold, for comparing
/// unpackers: busybox; then owners, modes with setuid/setgid/sticky, a
/// hard link, a symlink, a fifo, a character device, `security.capability`
/// and `user.` xattrs, a name longer than 100 bytes, directories to delete
/// and to make opaque; then a layer that whites out a directory and a file,
/// makes a directory opaque, overwrites and adds.
pub fn rich_image() -> Result<Image> {
    // VFS_CAP_REVISION_2, effective, with cap_net_bind_service (bit 10)
    // permitted.
    let mut cap = Vec::new();
    for w in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    let long = format!("rich/{}/{}", "d".repeat(60), "f".repeat(80));
    let layer2 = vec![
        Entry::Dir("rich".into()),
        Entry::Rich {
            path: "rich/owned".into(),
            data: b"owned by 1000:1001\n".to_vec(),
            mode: 0o640,
            uid: 1000,
            gid: 1001,
            xattrs: vec![("user.strata".into(), b"hello".to_vec())],
        },
        Entry::Rich {
            path: "rich/suid".into(),
            data: b"#!/bin/sh\necho suid\n".to_vec(),
            mode: 0o4755,
            uid: 0,
            gid: 0,
            xattrs: vec![],
        },
        Entry::Rich {
            path: "rich/sgid-sticky".into(),
            data: b"x\n".to_vec(),
            mode: 0o3775,
            uid: 0,
            gid: 50,
            xattrs: vec![],
        },
        Entry::Rich {
            path: "rich/cap".into(),
            data: b"has a capability\n".to_vec(),
            mode: 0o755,
            uid: 0,
            gid: 0,
            xattrs: vec![("security.capability".into(), cap)],
        },
        // Tar writers give a hard link its target's owner and mode, and
        // containerd applies them to the inode: link a file that has the
        // link header's (0644, root).
        Entry::File("rich/plain".into(), b"linked twice\n".to_vec(), 0o644),
        Entry::Hardlink("rich/hard".into(), "rich/plain".into()),
        Entry::Symlink("rich/link".into(), "owned".into()),
        Entry::Symlink("rich/dangling".into(), "/nowhere/at/all".into()),
        Entry::Fifo("rich/fifo".into()),
        Entry::CharDev("rich/null".into(), 1, 3),
        Entry::Dir(format!("rich/{}", "d".repeat(60))),
        Entry::File(long, b"a long name\n".to_vec(), 0o644),
        Entry::Dir("rich/gone".into()),
        Entry::File("rich/gone/inside".into(), b"whited out\n".to_vec(), 0o644),
        Entry::Dir("rich/opaque".into()),
        Entry::File(
            "rich/opaque/a".into(),
            b"hidden by opaque\n".to_vec(),
            0o644,
        ),
        Entry::File(
            "rich/opaque/b".into(),
            b"hidden by opaque\n".to_vec(),
            0o644,
        ),
        Entry::File("rich/deleted".into(), b"whited out\n".to_vec(), 0o644),
        Entry::OwnedDir("rich/private".into(), 0o750, 1000, 1001),
        Entry::File("rich/private/x".into(), b"x\n".to_vec(), 0o644),
    ];
    let layer3 = vec![
        Entry::Dir("rich".into()),
        Entry::Whiteout("rich/gone".into()),
        Entry::Whiteout("rich/deleted".into()),
        Entry::Dir("rich/opaque".into()),
        Entry::Opaque("rich/opaque".into()),
        Entry::File("rich/opaque/c".into(), b"after opaque\n".to_vec(), 0o644),
        Entry::File(
            "rich/suid".into(),
            b"#!/bin/sh\necho new\n".to_vec(),
            0o4750,
        ),
        Entry::File("rich/added".into(), b"added in layer 3\n".to_vec(), 0o600),
        // No entries for its parents: `rich/private` takes its mode and
        // owner from the layer below (containerd's WithParents), even when
        // this layer is unpacked before that one.
        Entry::File(
            "rich/private/sub/y".into(),
            b"parents implied\n".to_vec(),
            0o644,
        ),
    ];
    Ok(Image {
        layers: vec![busybox_layer()?, layer2, layer3],
        cmd: vec!["/bin/ls".into(), "/rich".into()],
        uncompressed: false,
    })
}

/// Bytes that do not compress, from a seed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Version `v` of an application image with plain tar layers: busybox, then
/// an app layer of `files` files of `file_size` bytes. Version 2 changes
/// file 0 and adds one file; every other file is byte-identical to v1's.
pub fn app_image(v: u32, files: usize, file_size: usize) -> Result<Image> {
    let mut app = vec![Entry::Dir("app".into())];
    for i in 0..files {
        let seed = if i == 0 {
            1000 + u64::from(v)
        } else {
            i as u64
        };
        app.push(Entry::File(
            format!("app/f{i:03}"),
            noise(seed, file_size),
            0o644,
        ));
    }
    if v >= 2 {
        app.push(Entry::File(
            "app/new-in-v2".into(),
            noise(5000 + u64::from(v), file_size),
            0o644,
        ));
    }
    app.push(Entry::File(
        "app/VERSION".into(),
        format!("{v}\n").into_bytes(),
        0o644,
    ));
    Ok(Image {
        layers: vec![busybox_layer()?, app],
        cmd: vec!["/bin/cat".into(), "/app/VERSION".into()],
        uncompressed: true,
    })
}
