//! Dedup, measured with real clients: two versions of an image whose app
//! layers share all but two files are pushed to docker-registry, pulled by
//! containerd through strata's content store, and the second version's cost
//! in stored bytes is read from the store itself: once with plain tar layers,
//! once with eStargz layers made by stargz-snapshotter's `ctr-remote`.

mod common;

use anyhow::{ensure, Result};
use sha2::Digest;
use strata::harness::{image, Containerd, ContainerdSetup, Registry, Strata};

const FILES: usize = 24;
const FILE_SIZE: usize = 256 * 1024;

fn stats(root: &std::path::Path) -> Result<strata_content::store::Stats> {
    let cfg = strata::config::Config::default();
    let db = strata::db::open_read_only(&root.join("db"), &cfg.db)?;
    let store = strata_content::ContentStore::open(
        db,
        cfg.content.store_config(root.join("content")),
        false,
    )?;
    Ok(store.stats()?)
}

/// Pulls `refs[0]` then `refs[1]` into a fresh strata + containerd under
/// `dir`, reads what v2 added in logical and stored bytes from the store,
/// checks it stays under two new files plus `slack_chunks` max-size chunks
/// of boundary change, and that a v2 container sees the right bytes.
fn pull_both_and_measure(
    dir: &std::path::Path,
    refs: &[String],
    what: &str,
    slack_chunks: usize,
) -> Result<()> {
    let strata = Strata::start(&common::strata_bin(), dir, &[])?;
    let mut cd = Containerd::start(
        &dir.join("containerd"),
        &ContainerdSetup::strata(&strata.socket),
    )?;
    cd.pull("strata", &refs[0])?;
    let s1 = stats(&strata.root)?;
    cd.pull("strata", &refs[1])?;
    let s2 = stats(&strata.root)?;
    let logical = s2.logical_bytes - s1.logical_bytes;
    let stored = s2.chunk_stored_bytes - s1.chunk_stored_bytes;
    eprintln!(
        "{what} v1: logical {} stored {}; v2 added: logical {logical} bytes, stored {stored} bytes ({:.1}%)",
        s1.logical_bytes,
        s1.chunk_stored_bytes,
        100.0 * stored as f64 / logical as f64
    );
    // v2's app layer is a new blob of ~25 files; only two of them are new.
    ensure!(
        logical > (FILES * FILE_SIZE) as u64,
        "{what}: v2 added {logical} logical bytes"
    );
    let bound = (2 * FILE_SIZE + slack_chunks * 256 * 1024) as u64;
    ensure!(
        stored < bound,
        "{what}: v2 cost {stored} stored bytes for {logical} logical; expected under {bound}"
    );
    // And the bytes are right: a container of v2 sees v1's shared files intact.
    let out = cd.run(
        "strata",
        &refs[1],
        "dedup-check",
        &["/bin/sha256sum", "/app/f001", "/app/f023", "/app/new-in-v2"],
    )?;
    for (name, seed) in [("f001", 1u64), ("f023", 23), ("new-in-v2", 5002)] {
        let want = format!("{:x}", sha2::Sha256::digest(image::noise(seed, FILE_SIZE)));
        ensure!(
            out.contains(&format!("{want}  /app/{name}")),
            "{what} {name}: {out}"
        );
    }
    cd.stop()?;
    strata.stop()?;
    Ok(())
}

#[test]
fn a_second_version_costs_what_changed() -> Result<()> {
    common::require_root();
    let tmp = common::tempdir();
    let dir = tmp.path();
    let mut registry = Registry::start(&dir.join("registry"))?;
    let mut refs = Vec::new();
    for v in [1, 2] {
        let layout = dir.join(format!("oci-v{v}"));
        image::app_image(v, FILES, FILE_SIZE)?.write_layout(&layout, "t")?;
        refs.push(registry.push(&layout, "t", &format!("strata/app:v{v}"))?);
    }

    pull_both_and_measure(dir, &refs, "plain tar", 3)
}

/// The same with eStargz: plain images are pulled into a first containerd,
/// converted by stargz-snapshotter's `ctr-remote` (`image convert --estargz`,
/// gzip per file), pushed back to the registry, then pulled by a second
/// containerd into a fresh strata, v1 then v2.
#[test]
fn estargz_versions_dedup_too() -> Result<()> {
    common::require_root();
    let ctr_remote = strata::harness::conformance_bins()?.join("ctr-remote");
    let tmp = common::tempdir();
    let dir = tmp.path();
    let mut registry = Registry::start(&dir.join("registry"))?;
    let mut esgz = Vec::new();
    {
        let conv = dir.join("convert");
        std::fs::create_dir_all(&conv)?;
        let strata = Strata::start(&common::strata_bin(), &conv, &[])?;
        let mut cd = Containerd::start(
            &conv.join("containerd"),
            &ContainerdSetup::strata(&strata.socket),
        )?;
        for v in [1, 2] {
            let layout = dir.join(format!("oci-v{v}"));
            image::app_image(v, FILES, FILE_SIZE)?.write_layout(&layout, "t")?;
            let plain = registry.push(&layout, "t", &format!("strata/app:v{v}"))?;
            cd.ctr(&["image", "pull", "--plain-http", &plain])?;
            let target = format!("{}/strata/app:v{v}-esgz", registry.addr);
            cd.client(
                &ctr_remote,
                &["image", "convert", "--estargz", "--oci", &plain, &target],
            )?;
            cd.ctr(&["image", "push", "--plain-http", &target])?;
            // It is eStargz: the manifest's layers carry the TOC digest.
            let images = cd.ctr(&["image", "ls"])?;
            let digest = images
                .lines()
                .find(|l| l.starts_with(&target))
                .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("{target} not in {images}"))?;
            let manifest = cd.ctr(&["content", "get", &digest])?;
            ensure!(
                manifest.contains("containerd.io/snapshot/stargz/toc.digest"),
                "converted manifest has no eStargz TOC: {manifest}"
            );
            esgz.push(target);
        }
        cd.stop()?;
        strata.stop()?;
    }

    let pull_dir = dir.join("pull");
    std::fs::create_dir_all(&pull_dir)?;
    pull_both_and_measure(&pull_dir, &esgz, "eStargz", 4)
}
