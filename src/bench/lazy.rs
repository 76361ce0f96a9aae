//! `strata bench lazy`: time to a container's first output from a lazily
//! pulled image, side by side in one run, on the same registry (through a
//! proxy that counts the bytes it sends):
//!
//! - `containerd`: `ctr image pull` + `ctr run` of the ordinary image on
//!   containerd's built-in overlayfs (everything downloaded and unpacked);
//! - `strata-lazy`: `strata pull --snapshotter strata-lazy` + `ctr run` of
//!   its eStargz conversion;
//! - `stargzd`: stargz-snapshotter's `ctr-remote image rpull` + `ctr run` of
//!   the same eStargz image on `stargzd` (both from Debian's sources, built
//!   by the conformance kit).
//!
//! Each round starts fresh daemons (empty caches) in turn. Per
//! configuration: the pull, the first run and their sum (first output),
//! the bytes fetched by then, CPU seconds and peak memory of the daemons
//! (containerd and the snapshotter), a warm second start, and a sequential
//! read of the image's largest file through a view of the top snapshot
//! with the page cache dropped (for the lazy ones, after two reads have
//! cached its chunks: the cached read).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::pull::runtime_image;
use super::{rounds_row, usage_extra, OpStats};
use crate::harness::{self, Containerd, ContainerdSetup, CountingProxy, Registry, Strata};

/// What the container runs: lists the runtime's tree and reads 200 of its
/// modules, as an interpreter's start-up would, then prints.
const FIRST_OUTPUT: &str =
    "find /opt/runtime -name '*.py' | head -200 | xargs cat > /dev/null; echo ready";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    Builtin,
    StrataLazy,
    Stargzd,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Builtin => "containerd",
            Config::StrataLazy => "strata-lazy",
            Config::Stargzd => "stargzd",
        }
    }
}

struct One {
    pull: Duration,
    run: Duration,
    warm: Duration,
    fetched: u64,
    cpu_s: f64,
    peak: u64,
    read: Duration,
    read_bytes: u64,
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// The largest regular file under `root`, by path relative to it.
fn largest_file(root: &Path) -> Option<(PathBuf, u64)> {
    let mut best: Option<(PathBuf, u64)> = None;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            let p = e.path();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() && best.as_ref().is_none_or(|(_, s)| m.len() > *s) {
                best = Some((p.strip_prefix(root).ok()?.to_path_buf(), m.len()));
            }
        }
    }
    best
}

/// Times a cold-page-cache sequential read of `rel` in a view of
/// `snapshot`; with `warm_first`, reads it twice before (to cache chunks).
fn timed_read(
    cd: &mut Containerd,
    snapshotter: &str,
    snapshot: &str,
    dir: &Path,
    rel: &Path,
    warm_first: bool,
) -> Result<(Duration, u64)> {
    let target = dir.join(format!("view-{snapshotter}"));
    cd.mount_view(snapshotter, snapshot, "bench-view", &target)?;
    let result = (|| {
        let path = target.join(rel);
        if warm_first {
            // Twice: the first read caches the chunks; strata-lazy then puts
            // the file together for passthrough, which the second open
            // waits for (the state of a file read before).
            std::fs::read(&path)?;
            std::fs::read(&path)?;
        }
        drop_caches();
        let t = Instant::now();
        let n = std::fs::read(&path)?.len() as u64;
        Ok((t.elapsed(), n))
    })();
    cd.unmount_view(snapshotter, "bench-view", &target)?;
    result
}

#[allow(clippy::too_many_arguments)]
fn once(
    cfg: Config,
    dir: &Path,
    proxy: &CountingProxy,
    plain: &str,
    esgz: &str,
    tops: (&str, &str),
    bins: &Path,
    largest: &Path,
) -> Result<One> {
    std::fs::create_dir_all(dir)?;
    let mut daemon: Option<harness::Proc> = None;
    let (setup, snapshotter, image, top) = match cfg {
        Config::Builtin => (ContainerdSetup::builtin(), "overlayfs", plain, tops.0),
        Config::StrataLazy => {
            let s = Strata::start(&std::env::current_exe()?, dir, &[])?;
            let setup = ContainerdSetup::strata(&s.socket);
            daemon = Some(s.into_proc());
            (setup, "strata-lazy", esgz, tops.1)
        }
        Config::Stargzd => {
            let root = dir.join("stargz");
            std::fs::create_dir_all(&root)?;
            let socket = dir.join("stargz.sock");
            let mut cmd = Command::new(bins.join("stargzd"));
            cmd.arg("--root")
                .arg(&root)
                .arg("--address")
                .arg(&socket)
                .arg("--plain-http");
            let mut p = harness::Proc::spawn("stargzd", cmd, dir.join("stargzd.log"))?;
            let s = socket.clone();
            harness::wait_for(&mut p, "stargzd", Duration::from_secs(30), || {
                std::os::unix::net::UnixStream::connect(&s).is_ok()
            })?;
            daemon = Some(p);
            let mut setup = ContainerdSetup::proxy(&socket, "stargz");
            setup.proxy_content = false;
            (setup, "stargz", esgz, tops.1)
        }
    };
    let mut cd = Containerd::start(&dir.join("containerd"), &setup)?;
    let before = proxy.bytes_down();
    let t = Instant::now();
    match cfg {
        Config::Builtin => {
            cd.pull(snapshotter, image)?;
        }
        Config::StrataLazy => {
            cd.strata_pull(&std::env::current_exe()?, "strata-lazy", image)?;
        }
        Config::Stargzd => {
            cd.client(
                &bins.join("ctr-remote"),
                &[
                    "image",
                    "rpull",
                    "--plain-http",
                    "--snapshotter",
                    "stargz",
                    image,
                ],
            )?;
        }
    }
    let pull = t.elapsed();
    let t = Instant::now();
    let out = cd.run(
        snapshotter,
        image,
        "first",
        &["/bin/sh", "-c", FIRST_OUTPUT],
    )?;
    let run = t.elapsed();
    anyhow::ensure!(out.contains("ready"), "{} printed {out:?}", cfg.name());
    let fetched = proxy.bytes_down() - before;
    let t = Instant::now();
    cd.run(
        snapshotter,
        image,
        "second",
        &["/bin/sh", "-c", FIRST_OUTPUT],
    )?;
    let warm = t.elapsed();
    let mut cpu_s = 0.0;
    let mut peak = 0;
    for pid in [cd.pid(), daemon.as_ref().and_then(|d| d.pid())]
        .into_iter()
        .flatten()
    {
        let (c, p) = harness::proc_usage(pid)?;
        cpu_s += c;
        peak += p;
    }
    let (read, read_bytes) = timed_read(
        &mut cd,
        snapshotter,
        top,
        dir,
        largest,
        cfg != Config::Builtin,
    )?;
    cd.stop()?;
    drop(daemon);
    Ok(One {
        pull,
        run,
        warm,
        fetched,
        cpu_s,
        peak,
        read,
        read_bytes,
    })
}

/// Runs the comparison `rounds` times, alternating configurations.
pub fn run(workdir: &Path, mib: usize, rounds: usize) -> Result<Vec<OpStats>> {
    let bins = harness::conformance_bins()?;
    std::fs::create_dir_all(workdir)?;
    let tmp = tempfile::Builder::new()
        .prefix("strata-bench-lazy")
        .tempdir_in(workdir)?;
    // STRATA_BENCH_KEEP=1 keeps the daemons' logs and state for a look.
    if std::env::var_os("STRATA_BENCH_KEEP").is_some() {
        let kept = tmp.keep();
        eprintln!("keeping {}", kept.display());
        return run_in(&kept, mib, rounds, &bins);
    }
    run_in(tmp.path(), mib, rounds, &bins)
}

fn run_in(dir: &Path, mib: usize, rounds: usize, bins: &Path) -> Result<Vec<OpStats>> {
    let mut registry = Registry::start(&dir.join("registry"))?;
    let img = runtime_image(mib)?;
    let written = img.write_layout(&dir.join("oci"), "v1")?;
    let plain_top = crate::pull::chain_ids(&written.diff_ids)
        .last()
        .cloned()
        .unwrap_or_default();
    let reference = registry.push(&dir.join("oci"), "v1", "bench/lazy:v1")?;
    let esgz_direct = reference.replace(":v1", ":esgz");
    // The conversion, and the image's largest file, from containerd's own
    // unpack.
    let mut builtin = Containerd::start(&dir.join("convert"), &ContainerdSetup::builtin())?;
    builtin.pull("overlayfs", &reference)?;
    let t = Instant::now();
    builtin.client(
        &bins.join("ctr-remote"),
        &[
            "image",
            "convert",
            "--estargz",
            "--oci",
            &reference,
            &esgz_direct,
        ],
    )?;
    eprintln!("converted to eStargz in {:.1} s", t.elapsed().as_secs_f64());
    builtin.ctr(&["image", "push", "--plain-http", &esgz_direct])?;
    let view = dir.join("view-largest");
    builtin.mount_view("overlayfs", &plain_top, "largest", &view)?;
    let largest = largest_file(&view);
    builtin.unmount_view("overlayfs", "largest", &view)?;
    builtin.stop()?;
    let (largest, largest_size) = largest.context("the image has no regular file")?;

    let pushed = harness::RegistryImage::resolve(&esgz_direct)?;
    let (esgz_size, esgz_top) = (pushed.size(), pushed.top_chain_id);
    eprintln!(
        "lazy bench image: {} layers, {:.1} MiB gzip, {:.1} MiB eStargz; largest file /{} ({:.1} MiB)",
        written.layer_sizes.len(),
        written.layer_sizes.iter().sum::<u64>() as f64 / (1 << 20) as f64,
        esgz_size as f64 / (1 << 20) as f64,
        largest.display(),
        largest_size as f64 / (1 << 20) as f64
    );
    let proxy = CountingProxy::start(&registry.addr)?;
    let plain = reference.replace(&registry.addr, &proxy.addr);
    let esgz = esgz_direct.replace(&registry.addr, &proxy.addr);

    let configs = [Config::Builtin, Config::StrataLazy, Config::Stargzd];
    let mut results: Vec<Vec<One>> = configs.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for (i, c) in configs.iter().enumerate() {
            let one = once(
                *c,
                &dir.join(format!("r{r}-{}", c.name())),
                &proxy,
                &plain,
                &esgz,
                (&plain_top, &esgz_top),
                bins,
                &largest,
            )
            .with_context(|| format!("lazy bench with {}", c.name()))?;
            results[i].push(one);
        }
    }
    let mut rows = Vec::new();
    for (c, res) in configs.iter().zip(results) {
        let n = res.len().max(1) as f64;
        let mean = |f: &dyn Fn(&One) -> f64| res.iter().map(f).sum::<f64>() / n;
        let mut extra = usage_extra(
            &res.iter()
                .map(|o| (o.fetched, o.cpu_s, o.peak))
                .collect::<Vec<_>>(),
        );
        extra.insert("pull_s".to_string(), mean(&|o| o.pull.as_secs_f64()));
        extra.insert("run_s".to_string(), mean(&|o| o.run.as_secs_f64()));
        let firsts = res.iter().map(|o| o.pull + o.run).collect();
        let mut p = rounds_row("lazy", c.name(), "first output", firsts);
        p.extra = extra;
        rows.push(p);
        let warms = res.iter().map(|o| o.warm).collect();
        rows.push(rounds_row("lazy", c.name(), "warm start", warms));
        let reads = res.iter().map(|o| o.read).collect();
        let mut q = rounds_row("lazy", c.name(), "read largest (cold page cache)", reads);
        q.extra.insert(
            "MiB/s".to_string(),
            mean(&|o| o.read_bytes as f64 / o.read.as_secs_f64().max(1e-9)) / (1 << 20) as f64,
        );
        rows.push(q);
    }
    Ok(rows)
}
