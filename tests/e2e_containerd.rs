//! End to end with real components: an image built from real files is pushed
//! to Debian's docker-registry with skopeo, pulled by Debian's containerd into
//! strata's content store and overlay snapshotter, run with runc, removed and
//! garbage-collected.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sha2::Digest;
use strata::harness::{image, Containerd, ContainerdSetup, Registry, Strata};

#[test]
fn containerd_pulls_runs_and_collects_through_strata() -> Result<()> {
    common::require_root();
    let tmp = common::tempdir();
    let dir = tmp.path();

    let mut registry = Registry::start(&dir.join("registry"))?;
    let img = image::demo_image()?;
    img.write_layout(&dir.join("oci"), "v1")?;
    let reference = registry.push(&dir.join("oci"), "v1", "strata/e2e:v1")?;

    let strata = Strata::start(&common::strata_bin(), dir, &["--log-level", "debug"])?;
    let mut cd = Containerd::start(
        &dir.join("containerd"),
        &ContainerdSetup::strata(&strata.socket),
    )?;

    cd.pull("strata", &reference)?;
    // The blobs came through strata's content store: containerd reads them back.
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
    let snaps = cd.snapshot_lines("strata")?;
    ensure!(
        snaps.len() == 3 && snaps.iter().all(|l| l.contains("Committed")),
        "after the pull strata should hold the 3 layers, committed: {snaps:#?}"
    );

    let out = cd.run("strata", &reference, "e2e-run", &[])?;
    let listed: Vec<&str> = out.lines().take_while(|l| !l.contains(' ')).collect();
    ensure!(
        listed == ["added.txt", "dir", "kept.txt", "overwritten.txt"],
        "the container should see layer 3's view of /data (deleted.txt whited out), saw {listed:?} in:\n{out}"
    );
    ensure!(
        out.contains("kept from layer 2\n"),
        "a lower layer's file: {out}"
    );
    ensure!(
        out.contains("new content from layer 3\n") && !out.contains("old content"),
        "the overwritten file must show the upper layer's content: {out}"
    );
    ensure!(
        out.contains("added in layer 3\n"),
        "the top layer's file: {out}"
    );

    // A container's writes land in its own active snapshot, not in the image.
    let out = cd.run(
        "strata",
        &reference,
        "e2e-write",
        &[
            "/bin/sh",
            "-c",
            "echo scribble > /data/kept.txt; rm /data/added.txt; cat /data/kept.txt; ls /data",
        ],
    )?;
    ensure!(
        out.starts_with("scribble\n") && !out.contains("added.txt"),
        "{out}"
    );
    let out = cd.run(
        "strata",
        &reference,
        "e2e-again",
        &["/bin/cat", "/data/kept.txt", "/data/added.txt"],
    )?;
    ensure!(
        out == "kept from layer 2\nadded in layer 3\n",
        "image changed by a container: {out}"
    );

    // Remove the image; containerd's GC removes the snapshots and the blobs
    // through strata.
    cd.ctr(&["image", "rm", "--sync", &reference])?;
    let snap_dir = strata.root.join("snapshots/strata");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snaps = cd.snapshot_lines("strata")?;
        let dirs: Vec<_> = std::fs::read_dir(&snap_dir)
            .with_context(|| format!("read {}", snap_dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        let blobs = cd.ctr(&["content", "ls", "-q"])?;
        if snaps.is_empty() && dirs.is_empty() && blobs.trim().is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "after image rm and GC, strata still has snapshots {snaps:#?} and directories {dirs:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    cd.stop()?;
    strata.stop()?;
    Ok(())
}
