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
    /// A regular file with its bytes and mode.
    File(String, Vec<u8>, u32),
    /// A symbolic link to a target.
    Symlink(String, String),
    /// Deletes a path of a lower layer (`.wh.NAME`).
    Whiteout(String),
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
            Entry::File(p, data, mode) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, p, data.as_slice())?;
            }
            Entry::Symlink(p, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, target)?;
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
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
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
