//! `strata-lazy` end to end: an image with every kind of entry (and a
//! large file in several chunks) is pushed to Debian's docker-registry,
//! converted to eStargz by stargz-snapshotter's `ctr-remote image convert
//! --estargz --oci` and pushed again. `strata pull --snapshotter
//! strata-lazy`, through a proxy that counts the bytes the registry sends,
//! mounts every layer lazily; runc runs a container from it and sees the
//! right files; the tree equals containerd's own unpack of the unconverted
//! image; strata fetched less than the image; after strata restarts, the
//! image runs again without a pull. A plain gzip image on `strata-lazy` is
//! unpacked instead (fallback). Through a proxy that injects 503s, resets
//! and stalls, a fresh strata still reads every file right.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{ensure, Context, Result};
use strata::harness::{
    image, Containerd, ContainerdSetup, CountingProxy, Registry, RegistryImage, Strata,
};
use strata_lazy::estargz::{Footer, Toc};

/// Every third request through the proxy fails: a 503, or (for a range
/// of a blob) a connection reset or a stall in the middle of the body, in
/// turn.
#[derive(Default)]
struct FaultCounts {
    seq: AtomicUsize,
    errors: AtomicUsize,
    resets: AtomicUsize,
    stalls: AtomicUsize,
}

impl FaultCounts {
    fn next(&self, s: &strata_testkit::Seen) -> strata_testkit::Action {
        use strata_testkit::{Action, Fault};
        let k = self.seq.fetch_add(1, Ordering::SeqCst);
        if k % 3 != 1 {
            return Action::Forward(Fault::None);
        }
        let range = s.target.contains("/blobs/") && s.header("range").is_some();
        match (k / 3) % 3 {
            1 if range => {
                self.resets.fetch_add(1, Ordering::SeqCst);
                Action::Forward(Fault::ResetAfter(4096))
            }
            2 if range => {
                self.stalls.fetch_add(1, Ordering::SeqCst);
                Action::Forward(Fault::StallAfter(4096, std::time::Duration::from_secs(30)))
            }
            _ => {
                self.errors.fetch_add(1, Ordering::SeqCst);
                strata_testkit::respond(503, "injected")
            }
        }
    }

    /// 503s, resets and stalls so far.
    fn injected(&self) -> (usize, usize, usize) {
        (
            self.errors.load(Ordering::SeqCst),
            self.resets.load(Ordering::SeqCst),
            self.stalls.load(Ordering::SeqCst),
        )
    }
}

#[test]
fn estargz_images_run_from_lazy_mounts() -> Result<()> {
    common::require_root();
    let bins = strata::harness::conformance_bins()?;
    let tmp = common::tempdir();
    let dir = tmp.path();

    let mut registry = Registry::start(&dir.join("registry"))?;
    let mut img = image::rich_image()?;
    img.layers.push(vec![
        image::Entry::Dir("big".into()),
        image::Entry::File("big/noise".into(), image::noise(7, 3_000_000), 0o644),
    ]);
    let written = img.write_layout(&dir.join("oci"), "v1")?;
    let reference = registry.push(&dir.join("oci"), "v1", "strata/lazy:v1")?;
    let esgz = reference.replace(":v1", ":esgz");
    let top = strata::pull::chain_ids(&written.diff_ids)
        .last()
        .cloned()
        .unwrap_or_default();

    // containerd's own unpack of the original, and the conversion.
    let mut builtin = Containerd::start(&dir.join("builtin"), &ContainerdSetup::builtin())?;
    builtin.pull("overlayfs", &reference)?;
    builtin.client(
        &bins.join("ctr-remote"),
        &["image", "convert", "--estargz", "--oci", &reference, &esgz],
    )?;
    builtin.ctr(&["image", "push", "--plain-http", &esgz])?;
    let pushed = RegistryImage::resolve(&esgz)?;
    let (esgz_size, esgz_top) = (pushed.size(), pushed.top_chain_id.clone());
    let top_layer = pushed.layers.last().cloned().unwrap_or_default();
    let theirs = common::view_tree(&mut builtin, "overlayfs", &top, dir)?;
    builtin.stop()?;

    let proxy = CountingProxy::start(&registry.addr)?;
    let lazy_ref = esgz.replace(&registry.addr, &proxy.addr);
    // No background fetch here, so that the bytes counted are what reads
    // asked for.
    let config = dir.join("strata.toml");
    std::fs::write(&config, "[lazy]\nbackground_mib_s = 0\n")?;
    let config = config.display().to_string();
    let args = ["--log-level", "info", "--config", config.as_str()];
    let mut strata = Strata::start(&common::strata_bin(), dir, &args)?;
    let mut cd = Containerd::start(
        &dir.join("containerd"),
        &ContainerdSetup::strata(&strata.socket),
    )?;

    let out = common::strata_pull(&cd, "strata-lazy", &lazy_ref)?;
    ensure!(
        out.contains("4 layers, 0 unpacked by strata-lazy, 4 mounted lazily"),
        "every layer should be mounted lazily:\n{out}\nstrata's log:\n{}",
        strata.proc().log_tail()
    );
    let after_pull = proxy.bytes_down();

    let run_it = |cd: &mut Containerd, id: &str| {
        cd.run(
            "strata-lazy",
            &lazy_ref,
            id,
            &[
                "/bin/sh",
                "-c",
                "cat /rich/owned /rich/added; stat -c '%a %u:%g' /rich/suid /rich/private; ls /rich/opaque",
            ],
        )
    };
    let out = run_it(&mut cd, "lazy-run")?;
    for want in [
        "owned by 1000:1001\n",
        "added in layer 3\n",
        "4750 0:0\n",
        "750 1000:1001\n",
        "c\n",
    ] {
        ensure!(
            out.contains(want),
            "container output lacks {want:?}:\n{out}"
        );
    }
    let after_run = proxy.bytes_down();
    ensure!(
        after_run < esgz_size,
        "a run should fetch less than the image: {after_run} of {esgz_size} bytes"
    );

    // The tree equals containerd's unpack of the unconverted image.
    let ours = common::view_tree(&mut cd, "strata-lazy", &esgz_top, dir)?;
    let diff = common::tree_diff(&ours, &theirs);
    ensure!(
        diff.is_empty(),
        "strata-lazy's tree differs from containerd's overlayfs ({} entries vs {}):\n{}",
        ours.len(),
        theirs.len(),
        diff.join("\n")
    );
    let after_tree = proxy.bytes_down();
    eprintln!(
        "strata-lazy: eStargz image of {esgz_size} bytes; fetched {after_pull} bytes by the pull, {after_run} after a run, {after_tree} after reading every file; tree of {} entries equals containerd's",
        ours.len()
    );

    // strata is killed: its FUSE mounts are left dead (ENOTCONN). The next
    // start detaches them and mounts the layers again from their kept
    // TOCs: the image runs with no pull.
    cd.stop()?;
    strata.sigkill()?;
    strata.stop()?;
    let mut strata = Strata::start(&common::strata_bin(), dir, &args)?;
    let log = strata.proc().log_tail();
    ensure!(
        log.contains("detached a mount left by an earlier run")
            && log.matches("lazy layer mounted again").count() == 4,
        "after SIGKILL, the start should detach the dead mounts and mount 4 layers again:\n{log}"
    );
    let mut cd = Containerd::start(
        &dir.join("containerd"),
        &ContainerdSetup::strata(&strata.socket),
    )?;
    let out = run_it(&mut cd, "lazy-run-2")?;
    ensure!(
        out.contains("owned by 1000:1001\n") && out.contains("750 1000:1001\n"),
        "after a restart: {out}\nstrata's log:\n{}",
        strata.proc().log_tail()
    );

    // A kept TOC damaged on disk: that layer cannot be mounted again, and
    // a container on it is refused with a clear error instead of running
    // on an empty directory in its place.
    cd.stop()?;
    let snaps = strata.root.join("snapshots/strata-lazy");
    strata.stop()?;
    let mut damaged = false;
    for e in std::fs::read_dir(&snaps)? {
        let toc = e?.path().join("toc.gz");
        if toc.exists() && !damaged {
            let mut b = std::fs::read(&toc)?;
            let last = b.len() - 10;
            b[last] ^= 0xff;
            std::fs::write(&toc, b)?;
            damaged = true;
        }
    }
    ensure!(damaged, "no kept TOC under {}", snaps.display());
    let mut strata = Strata::start(&common::strata_bin(), dir, &args)?;
    let mut cd = Containerd::start(
        &dir.join("containerd"),
        &ContainerdSetup::strata(&strata.socket),
    )?;
    ensure!(
        strata
            .proc()
            .log_text()
            .contains("could not be mounted again"),
        "{}",
        strata.proc().log_tail()
    );
    match run_it(&mut cd, "broken-run") {
        Ok(out) => anyhow::bail!("a container ran on a layer that is not mounted: {out}"),
        Err(e) => ensure!(
            e.to_string()
                .contains("could not be mounted after a restart"),
            "the refusal should say why: {e}"
        ),
    }

    // A plain gzip image on strata-lazy: unpacked, not mounted.
    let plain = reference.replace(&registry.addr, &proxy.addr);
    let out = common::strata_pull(&cd, "strata-lazy", &plain)?;
    ensure!(
        out.contains("4 layers, 4 unpacked by strata-lazy, 4 blobs in content"),
        "a plain gzip image falls back to unpacking:\n{out}"
    );
    let out = cd.run(
        "strata-lazy",
        &plain,
        "plain-run",
        &["/bin/cat", "/rich/added"],
    )?;
    ensure!(out.contains("added in layer 3"), "{out}");
    cd.stop()?;
    strata.stop()?;

    // A registry that fails: every third request gets a 503, a connection
    // reset in the middle of its body, or a body that stalls. A fresh
    // strata (empty cache, 2 s stall timeout) pulls through it lazily, and
    // every file of the image still reads back right.
    let faults = std::sync::Arc::new(FaultCounts::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let f = faults.clone();
    let faulty = rt.block_on(strata_testkit::Proxy::start(
        Some(registry.addr.parse()?),
        move |s| f.next(s),
    ));
    let faulty_ref = esgz.replace(&registry.addr, &faulty.authority());
    let root = dir.join("faulty");
    std::fs::create_dir_all(&root)?;
    let config = root.join("strata.toml");
    std::fs::write(
        &config,
        "[lazy]\nbackground_mib_s = 0\n[registry]\nstall_timeout_s = 2\n",
    )?;
    let config = config.display().to_string();
    let faulty_args = ["--log-level", "info", "--config", config.as_str()];
    let mut strata = Strata::start(&common::strata_bin(), &root, &faulty_args)?;
    let mut cd = Containerd::start(
        &root.join("containerd"),
        &ContainerdSetup::strata(&strata.socket),
    )?;
    let out = common::strata_pull(&cd, "strata-lazy", &faulty_ref)?;
    ensure!(
        out.contains("4 mounted lazily"),
        "through a failing registry, every layer should still be mounted lazily:\n{out}\n{}",
        strata.proc().log_tail()
    );
    let ours = common::view_tree(&mut cd, "strata-lazy", &esgz_top, &root)?;
    let diff = common::tree_diff(&ours, &theirs);
    ensure!(
        diff.is_empty(),
        "read through a failing registry, the tree differs:\n{}",
        diff.join("\n")
    );
    let (errors, resets, stalls) = faults.injected();
    ensure!(
        errors > 0 && resets > 0 && stalls > 0,
        "every kind of fault should have been injected: {errors} 503s, {resets} resets, {stalls} stalls"
    );
    eprintln!(
        "through a failing registry ({errors} 503s, {resets} resets and {stalls} stalls mid-body injected): every file of {} read back right",
        ours.len()
    );
    cd.stop()?;
    strata.stop()?;
    drop(faulty);

    // A byte flipped in the registry's copy of a chunk of the top layer,
    // before a fresh strata (empty cache) pulls the image.
    let (digest, size) = &top_layer;
    let hex = digest.trim_start_matches("sha256:");
    let blob_path = dir
        .join("registry/data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut blob = std::fs::read(&blob_path)?;
    ensure!(blob.len() as u64 == *size);
    let footer = Footer::parse(&blob[blob.len() - 64..], *size)?;
    let toc = Toc::parse(
        &blob[footer.toc_offset as usize..blob.len() - footer.size as usize],
        footer,
        None,
    )?;
    let noise = toc.lookup("big/noise").context("big/noise in the TOC")?;
    let c = &toc.nodes[noise].chunks[0];
    blob[(c.blob_offset + (c.blob_end - c.blob_offset) / 2) as usize] ^= 0x55;
    std::fs::write(&blob_path, &blob)?;

    // stargz-snapshotter's own client, on a fresh strata with the default
    // settings: `ctr-remote image rpull` passes its labels
    // (stargz.reference, stargz.digest, the TOC digest annotation) and
    // strata mounts every layer lazily, then fetches the rest of each in
    // the background.
    let fresh = dir.join("fresh");
    std::fs::create_dir_all(&fresh)?;
    let mut strata = Strata::start(&common::strata_bin(), &fresh, &["--log-level", "info"])?;
    let mut cd = Containerd::start(
        &fresh.join("containerd"),
        &ContainerdSetup::strata(&strata.socket),
    )?;
    let before = proxy.bytes_down();
    cd.client(
        &bins.join("ctr-remote"),
        &[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "strata-lazy",
            &lazy_ref,
        ],
    )?;
    let log = strata.proc().log_text();
    ensure!(
        log.matches("layer mounted lazily").count() == 4,
        "ctr-remote rpull: every layer should be mounted lazily:\n{log}"
    );
    let out = run_it(&mut cd, "rpull-run")?;
    ensure!(
        out.contains("owned by 1000:1001\n") && out.contains("750 1000:1001\n"),
        "after rpull: {out}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while strata
        .proc()
        .log_text()
        .matches("fetched the whole layer in the background")
        .count()
        < 4
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "the background fetch did not finish:\n{}",
            strata.proc().log_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let rpull_bytes = proxy.bytes_down() - before;
    ensure!(
        rpull_bytes >= esgz_size,
        "the background fetch should have fetched every layer: {rpull_bytes} of {esgz_size} bytes"
    );
    ensure!(
        strata
            .proc()
            .log_text()
            .contains("fetched chunk failed its check: not cached"),
        "the background fetch should refuse the corrupted chunk"
    );

    // The corrupted chunk: the read fails with EIO after one more fetch,
    // and no wrong byte reaches the container; other files still read.
    let out = cd.run(
        "strata-lazy",
        &lazy_ref,
        "corrupt-run",
        &[
            "/bin/sh",
            "-c",
            "cat /big/noise 2>&1 >/dev/null; echo rc=$?; cat /rich/owned",
        ],
    )?;
    ensure!(
        out.contains("rc=1")
            && out.contains("Input/output error")
            && out.contains("owned by 1000:1001"),
        "a corrupted chunk should fail with EIO (and other files still read):\n{out}"
    );
    ensure!(
        strata.proc().log_text().contains("failed its check twice"),
        "strata should log the refused chunk:\n{}",
        strata.proc().log_tail()
    );
    eprintln!(
        "ctr-remote rpull on strata-lazy: 4 layers mounted lazily, run; the background fetch brought {rpull_bytes} bytes; a corrupted chunk was refused with EIO"
    );
    cd.stop()?;
    strata.stop()?;
    Ok(())
}
