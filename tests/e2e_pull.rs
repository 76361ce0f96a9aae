//! `strata pull` end to end: an image with every kind of entry is pushed to
//! Debian's docker-registry with skopeo; `strata pull` has containerd 1.6
//! (with strata as snapshotter and content store) prepare each layer with
//! the remote-snapshot labels, so strata fetches and unpacks them itself;
//! runc runs a container from it; the tree the container sees is compared,
//! entry by entry, with the same image pulled and unpacked by containerd's
//! own overlayfs; the layer blobs strata kept are in containerd's content
//! store and the image exports; image rm + GC clean everything.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use sha2::Digest;
use strata::harness::{image, Containerd, ContainerdSetup, Registry, Strata};

#[test]
fn strata_pull_unpacks_layers_itself_and_the_tree_is_containerds() -> Result<()> {
    common::require_root();
    let tmp = common::tempdir();
    let dir = tmp.path();

    let mut registry = Registry::start(&dir.join("registry"))?;
    let img = image::rich_image()?;
    let written = img.write_layout(&dir.join("oci"), "v1")?;
    let reference = registry.push(&dir.join("oci"), "v1", "strata/rich:v1")?;
    let top = strata::pull::chain_ids(&written.diff_ids)
        .last()
        .cloned()
        .unwrap_or_default();

    let mut strata = Strata::start(&common::strata_bin(), dir, &["--log-level", "info"])?;
    let mut cd = Containerd::start(
        &dir.join("containerd"),
        &ContainerdSetup::strata(&strata.socket),
    )?;

    let out = common::strata_pull(&cd, "strata", &reference)?;
    ensure!(
        out.contains("3 layers, 3 unpacked by strata"),
        "every layer should go through strata's fast path:\n{out}"
    );
    ensure!(
        out.matches(" entries, ").count() == 3,
        "a line per layer with what strata wrote:\n{out}"
    );
    ensure!(
        out.contains("3 unpacked by strata, 3 blobs in content"),
        "keep_blobs: every layer's blob should be kept:\n{out}\nstrata's log:\n{}",
        strata.proc().log_tail()
    );
    // The blobs strata kept while unpacking are in containerd's content
    // store (recorded without a transfer), byte for byte, and the image
    // exports whole.
    let blobs = cd.ctr(&["content", "ls", "-q"])?;
    ensure!(
        blobs.lines().count() == 5,
        "manifest, config and 3 layers in content: {blobs}"
    );
    for d in blobs.lines() {
        let bytes = cd.ctr_bytes(&["content", "get", d])?;
        ensure!(
            format!("sha256:{:x}", sha2::Sha256::digest(&bytes)) == d,
            "content get {d} returned other bytes"
        );
    }
    let export = dir.join("export.tar");
    cd.ctr(&[
        "images",
        "export",
        &export.display().to_string(),
        &reference,
    ])?;
    let layers: u64 = written.layer_sizes.iter().sum();
    ensure!(
        std::fs::metadata(&export)?.len() > layers,
        "the export should hold every layer"
    );
    let log = strata.proc().log_tail();
    ensure!(
        log.matches("layer unpacked by strata").count() >= 3,
        "strata's log should show three unpacks:\n{log}"
    );
    let snaps = cd.snapshot_lines("strata")?;
    ensure!(
        snaps.iter().filter(|l| l.contains("Committed")).count() == 3,
        "{snaps:#?}"
    );
    // Layers 2 and 3 were unpacked ahead of their Prepares, concurrently:
    // each went into its own directory and was taken by its Prepare; no
    // other directory is left.
    let snap_dirs = std::fs::read_dir(strata.root.join("snapshots/strata"))?.count();
    ensure!(
        snap_dirs == 3,
        "3 snapshot directories, one per layer; found {snap_dirs}"
    );

    // runc runs it, and sees layer 3's view.
    let out = cd.run(
        "strata",
        &reference,
        "pull-run",
        &[
            "/bin/sh",
            "-c",
            "ls /rich; ls /rich/opaque; cat /rich/owned /rich/added; stat -c '%a %u:%g' /rich/suid /rich/owned /rich/private",
        ],
    )?;
    for want in [
        "added\n",
        "c\n",
        "owned by 1000:1001\n",
        "added in layer 3\n",
        "4750 0:0\n",
        "640 1000:1001\n",
        // Layer 3's implied parent, with layer 2's mode and owner.
        "750 1000:1001\n",
    ] {
        ensure!(
            out.contains(want),
            "container output lacks {want:?}:\n{out}"
        );
    }
    for gone in ["gone\n", "deleted\n", "\na\n", "\nb\n"] {
        ensure!(!out.contains(gone), "{gone:?} should be hidden:\n{out}");
    }

    // The tree equals containerd's own unpack of the same image.
    let ours = common::view_tree(&mut cd, "strata", &top, dir)?;
    let mut builtin = Containerd::start(&dir.join("builtin"), &ContainerdSetup::builtin())?;
    builtin.pull("overlayfs", &reference)?;
    let theirs = common::view_tree(&mut builtin, "overlayfs", &top, dir)?;
    builtin.stop()?;
    let diff = common::tree_diff(&ours, &theirs);
    ensure!(
        diff.is_empty(),
        "strata's tree differs from containerd's overlayfs ({} entries vs {}):\n{}",
        ours.len(),
        theirs.len(),
        diff.join("\n")
    );
    eprintln!(
        "strata's tree equals containerd's overlayfs tree: {} entries compared",
        ours.len()
    );
    ensure!(ours.len() > 20, "too few entries compared: {}", ours.len());
    for p in [
        "rich/cap",
        "rich/hard",
        "rich/fifo",
        "rich/null",
        "rich/owned",
        "rich/private/sub/y",
    ] {
        ensure!(ours.contains_key(p), "{p} missing from the compared tree");
    }
    ensure!(
        ours["rich/cap"]
            .xattrs
            .iter()
            .any(|(k, _)| k == "security.capability"),
        "security.capability kept: {:?}",
        ours["rich/cap"]
    );

    // A second pull finds every layer unpacked.
    let out = common::strata_pull(&cd, "strata", &reference)?;
    ensure!(
        out.contains("already unpacked") && out.contains("3 layers, 0 unpacked by strata, 3 blobs"),
        "{out}"
    );

    // Image rm + GC remove the snapshots through strata.
    cd.ctr(&["image", "rm", "--sync", &reference])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snaps = cd.snapshot_lines("strata")?;
        if snaps.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "after image rm and GC strata still has {snaps:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    cd.stop()?;
    strata.stop()?;
    Ok(())
}
