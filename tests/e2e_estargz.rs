//! strata's eStargz reader against the ecosystem's writer: an image with
//! every kind of entry (and a file large enough to be split into chunks) is
//! pushed to Debian's docker-registry, pulled into containerd 1.6,
//! converted by stargz-snapshotter's `ctr-remote image convert --estargz
//! --oci` and pushed back. Then, through strata's registry client and range
//! requests only: each layer's footer and TOC are read, the TOC is checked
//! against the manifest's `toc.digest` annotation, and every file is read
//! chunk by chunk, each chunk checked against its `chunkDigest`. The files
//! must be byte for byte those of the whole layer blob, unpacked as an
//! ordinary tar+gzip; a TOC with another digest and a chunk with a flipped
//! byte are refused.

mod common;

use std::collections::BTreeMap;
use std::io::Read;

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use strata::harness::{image, Containerd, ContainerdSetup, Registry};
use strata_lazy::estargz::{Error as FormatError, Footer, Kind, Toc, TOC_DIGEST_ANNOTATION};
use strata_lazy::fetch::{ChunkCache, Layer, RangeReader};
use strata_lazy::fs::{lower_dir, mount, LayerFs};
use strata_registry::{Client, ClientConfig, Platform, Reference};

/// Regular files of an ordinary layer blob (tar+gzip), by clean path.
fn files_of(blob: &[u8]) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
    for e in ar.entries()? {
        let mut e = e?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = e
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        out.insert(path, data);
    }
    Ok(out)
}

#[test]
fn estargz_from_ctr_remote_reads_back_by_ranges_verified() -> Result<()> {
    common::require_root();
    let bins = strata::harness::conformance_bins()?;
    let ctr_remote = bins.join("ctr-remote");
    let tmp = common::tempdir();
    let dir = tmp.path();

    let mut registry = Registry::start(&dir.join("registry"))?;
    let mut img = image::rich_image()?;
    // Large enough for several chunks at the chunk size below.
    img.layers.push(vec![
        image::Entry::Dir("big".into()),
        image::Entry::File("big/noise".into(), image::noise(7, 300_000), 0o644),
        image::Entry::File("big/empty".into(), Vec::new(), 0o600),
    ]);
    let written = img.write_layout(&dir.join("oci"), "v1")?;
    let reference = registry.push(&dir.join("oci"), "v1", "strata/rich:v1")?;
    let esgz = reference.replace(":v1", ":esgz");

    let mut cd = Containerd::start(&dir.join("containerd"), &ContainerdSetup::builtin())?;
    cd.pull("overlayfs", &reference)?;
    cd.client(
        &ctr_remote,
        &[
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-chunk-size",
            "65536",
            &reference,
            &esgz,
        ],
    )?;
    cd.ctr(&["image", "push", "--plain-http", &esgz])?;

    let rt = tokio::runtime::Runtime::new()?;
    let mut cfg = ClientConfig::default();
    cfg.plain_http = true;
    let client = Client::new(cfg)?;
    let r = Reference::parse(&esgz)?;
    let resolved = rt.block_on(client.resolve(&r, &Platform::host()))?;
    let layers = resolved.manifest.value.layers().clone();
    ensure!(layers.len() == 4, "4 layers: {layers:?}");

    let (mut files, mut chunks, mut multi) = (0, 0, 0);
    let cache = Arc::new(ChunkCache::open(&dir.join("cache"), 1 << 30)?);
    let mut tocs = Vec::new();
    let mut ranges: Vec<Arc<RegistryRange>> = Vec::new();
    for l in &layers {
        let toc_digest = l
            .annotations()
            .as_ref()
            .and_then(|a| a.get(TOC_DIGEST_ANNOTATION))
            .with_context(|| format!("layer {} has no {TOC_DIGEST_ANNOTATION}", l.digest()))?
            .clone();
        let size = l.size();
        let tail_len = size.min(64);
        let tail = rt.block_on(client.fetch_range(&r, l.digest(), size - tail_len, tail_len))?;
        let footer = Footer::parse(&tail, size)?;
        let toc_len = size - footer.size - footer.toc_offset;
        let toc_gz = rt.block_on(client.fetch_range(&r, l.digest(), footer.toc_offset, toc_len))?;
        let toc = Toc::parse(&toc_gz, footer, Some(&toc_digest))?;
        ensure!(toc.digest == toc_digest);
        tocs.push(toc.clone());
        ranges.push(Arc::new(RegistryRange {
            rt: rt.handle().clone(),
            client: client.clone(),
            reference: r.clone(),
            digest: l.digest().clone(),
        }));

        // A TOC that is not the manifest's is refused.
        let wrong = format!("sha256:{}", "0".repeat(64));
        match Toc::parse(&toc_gz, footer, Some(&wrong)) {
            Err(FormatError::TocDigest { .. }) => {}
            other => bail!("a TOC with another digest was not refused: {other:?}"),
        }

        // Every file, chunk by chunk over ranges, equals the ordinary unpack.
        let blob = rt.block_on(client.fetch_blob_bytes(&r, l.digest(), Some(size)))?;
        let want = files_of(&blob)?;
        let mut got = BTreeMap::new();
        for (idx, n) in toc.nodes.iter().enumerate() {
            if n.kind != Kind::File {
                continue;
            }
            let path = toc.path(idx);
            let mut data = Vec::new();
            for c in &n.chunks {
                let gz = rt.block_on(client.fetch_range(
                    &r,
                    l.digest(),
                    c.blob_offset,
                    c.blob_end - c.blob_offset,
                ))?;
                data.extend(toc.decode_chunk(&path, c, &gz)?);
                chunks += 1;
            }
            if n.chunks.len() > 1 {
                multi += 1;
                // A flipped byte in a chunk is refused, never returned.
                let c = &n.chunks[1];
                let mut gz = blob[c.blob_offset as usize..c.blob_end as usize].to_vec();
                let mid = gz.len() / 2;
                gz[mid] ^= 0x40;
                ensure!(
                    toc.decode_chunk(&path, c, &gz).is_err(),
                    "a damaged chunk of {path} was accepted"
                );
            }
            files += 1;
            got.insert(path, data);
        }
        for (path, data) in &want {
            // eStargz's own files; whiteouts are devices in the tree.
            let base = path.rsplit('/').next().unwrap_or(path);
            if path == "stargz.index.json"
                || base.starts_with(".wh.")
                || base.ends_with(".landmark")
            {
                continue;
            }
            let ours = got
                .get(path)
                .with_context(|| format!("{path} is in the blob, not in the TOC"))?;
            ensure!(ours == data, "{path}: the TOC's chunks give other bytes");
        }
    }
    eprintln!(
        "eStargz: 4 layers, {files} files, {chunks} chunks ({multi} files in several) read by range and verified"
    );
    ensure!(multi >= 1, "the big file should span several chunks");

    // Each layer mounted through FUSE, stacked under overlayfs as a
    // snapshot's lower layers: the tree equals containerd's own unpack of
    // the unconverted image, and reading every file fetched each chunk once.
    let cache_only_before = cache.size();
    let mut mounts = Vec::new();
    let mut lowers: Vec<std::path::PathBuf> = Vec::new();
    let mut lazy_layers = Vec::new();
    for (i, l) in tocs.iter().enumerate() {
        let mp = dir.join(format!("lazy-{i}"));
        std::fs::create_dir_all(&mp)?;
        // Parents this layer does not name take the lower layers'
        // attributes, as containerd's unpack gives them.
        let mut toc = l.clone();
        let below: Vec<std::path::PathBuf> = lowers.iter().rev().cloned().collect();
        toc.adopt_parents(|p| lower_dir(&below, p));
        let layer = Arc::new(Layer::new(
            Arc::new(toc),
            ranges[i].clone(),
            cache.clone(),
            "test/esgz",
        ));
        lazy_layers.push(layer.clone());
        mounts.push(mount(
            LayerFs::new(layer, false, true),
            &mp,
            "strata-lazy-test",
        )?);
        lowers.push(mp);
    }
    let merged = dir.join("merged");
    std::fs::create_dir_all(&merged)?;
    lowers.reverse();
    let lowerdir = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let st = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("ro,lowerdir={lowerdir}"))
        .arg(&merged)
        .status()?;
    ensure!(st.success(), "overlay mount of the lazy layers failed");
    let ours = common::tree(&merged);
    let _ = std::process::Command::new("umount").arg(&merged).status();
    let ours = ours?;
    let top = strata::pull::chain_ids(&written.diff_ids)
        .last()
        .cloned()
        .unwrap_or_default();
    let theirs = common::view_tree(&mut cd, "overlayfs", &top, dir)?;
    cd.stop()?;
    let diff = common::tree_diff(&ours, &theirs);
    ensure!(
        diff.is_empty(),
        "the lazy tree differs from containerd's overlayfs ({} entries vs {}):\n{}",
        ours.len(),
        theirs.len(),
        diff.join("\n")
    );
    let fetched: u64 = lazy_layers.iter().map(|l| l.fetched_bytes()).sum();
    eprintln!(
        "lazy FUSE layers under overlayfs: {} entries equal containerd's; {fetched} bytes fetched by the mounts, cache {} -> {} bytes",
        ours.len(),
        cache_only_before,
        cache.size()
    );
    for m in mounts {
        m.unmount()?;
    }
    Ok(())
}

/// Range reads of one blob through strata's registry client.
struct RegistryRange {
    rt: tokio::runtime::Handle,
    client: Client,
    reference: Reference,
    digest: strata_registry::Digest,
}

impl RangeReader for RegistryRange {
    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        self.rt
            .block_on(
                self.client
                    .fetch_range(&self.reference, &self.digest, offset, len),
            )
            .map(|b| b.to_vec())
            .map_err(std::io::Error::other)
    }
}
