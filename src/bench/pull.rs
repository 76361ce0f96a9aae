//! `strata bench pull`: pull and run an image through a real containerd, once
//! per configuration, each in fresh temporary directories: containerd's
//! built-in overlayfs and content store, `refproxy` (the same code served as
//! proxy plugins), and strata. Reports seconds, bytes fetched from the
//! registry (through a counting proxy), CPU seconds and peak memory of
//! containerd plus the storage daemon.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{rounds_row, usage_extra, OpStats};
use crate::harness::{self, image, Containerd, ContainerdSetup, CountingProxy, Registry, Strata};

/// A storage configuration of containerd.
#[derive(Debug, Clone)]
pub enum Config {
    /// Built-in overlayfs + local content store.
    Builtin,
    /// `refproxy` as snapshotter and content store.
    Refproxy(PathBuf),
    /// strata (this binary) as snapshotter and content store; `ctr image
    /// pull`, so containerd downloads and unpacks.
    Strata(PathBuf),
    /// The same, but `strata pull`: strata fetches and unpacks itself.
    StrataPull(PathBuf),
}

impl Config {
    /// The name reports and `--only` use.
    pub fn name(&self) -> &'static str {
        match self {
            Config::Builtin => "containerd",
            Config::Refproxy(_) => "refproxy",
            Config::Strata(_) => "strata",
            Config::StrataPull(_) => "strata-pull",
        }
    }
}

/// A language runtime image from real files on this machine, about `mib`
/// MiB: busybox; a base layer of shared libraries
/// (`/usr/lib/x86_64-linux-gnu`, 40%); a runtime layer (CPython under
/// `/root/.pyenv`, else `/usr/lib/python3*`, 55%); a small app layer.
pub fn runtime_image(mib: usize) -> Result<image::Image> {
    let total = (mib as u64) << 20;
    let python = std::fs::read_dir("/root/.pyenv/versions")
        .ok()
        .and_then(|mut rd| rd.next())
        .and_then(|e| e.ok())
        .map(|e| e.path())
        .unwrap_or_else(|| PathBuf::from("/usr/lib/python3"));
    let libdir = if Path::new("/usr/lib/x86_64-linux-gnu").is_dir() {
        PathBuf::from("/usr/lib/x86_64-linux-gnu")
    } else {
        PathBuf::from("/usr/lib")
    };
    let app: Vec<image::Entry> = std::iter::once(image::Entry::Dir("app".into()))
        .chain((0..50).map(|i| {
            image::Entry::File(
                format!("app/module{i}.py"),
                format!("# module {i}\nVALUE = {i}\n")
                    .repeat(200)
                    .into_bytes(),
                0o644,
            )
        }))
        .collect();
    Ok(image::Image {
        layers: vec![
            image::busybox_layer()?,
            vec![image::Entry::HostTree {
                src: libdir,
                dest: "usr/lib/base".into(),
                max_bytes: total * 2 / 5,
            }],
            vec![image::Entry::HostTree {
                src: python,
                dest: "opt/runtime".into(),
                max_bytes: total * 11 / 20,
            }],
            app,
        ],
        cmd: vec!["/bin/sh".into(), "-c".into(), "ls /app >/dev/null".into()],
        uncompressed: false,
    })
}

/// The bench image: busybox and `layers` gzip layers of `mib` MiB in all,
/// half incompressible files and half text-like ones.
pub fn bench_image(layers: usize, mib: usize) -> Result<image::Image> {
    let per_layer = (mib << 20) / layers.max(1);
    let mut all = vec![image::busybox_layer()?];
    for l in 0..layers {
        let mut entries = vec![image::Entry::Dir(format!("l{l}"))];
        let files = 16;
        for f in 0..files {
            let size = per_layer / files;
            let data = if f % 2 == 0 {
                image::noise((l * 100 + f) as u64, size)
            } else {
                format!("layer {l} file {f} ")
                    .into_bytes()
                    .into_iter()
                    .cycle()
                    .take(size)
                    .collect()
            };
            entries.push(image::Entry::File(format!("l{l}/f{f}"), data, 0o644));
        }
        all.push(entries);
    }
    Ok(image::Image {
        layers: all,
        cmd: vec!["/bin/sh".into(), "-c".into(), "du -s /l0 >/dev/null".into()],
        uncompressed: false,
    })
}

struct One {
    pull: Duration,
    run: Duration,
    fetched: u64,
    cpu_s: f64,
    peak: u64,
    /// strata's own account of its unpacks (the fast path only).
    phases: BTreeMap<String, f64>,
}

/// Sums the fields of strata's "layer unpacked by strata" log lines: time
/// waiting for the registry, decompressing, writing, syncing (seconds),
/// entries and bytes.
fn unpack_phases(log: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains("layer unpacked by strata"))
    {
        // Strip the log's colour codes, then read key=value fields.
        let mut plain = String::with_capacity(line.len());
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for d in chars.by_ref() {
                    if d == 'm' {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        for field in plain.split_whitespace() {
            let Some((k, v)) = field.split_once('=') else {
                continue;
            };
            let Ok(v) = v.parse::<f64>() else {
                continue;
            };
            let (name, scale) = match k {
                "elapsed_ms" => ("unpack_s", 1e-3),
                // Time the decoder waited for its input: the registry, and
                // the copy into the content store when the blob is kept.
                "read_ms" => ("input_wait_s", 1e-3),
                "decompress_ms" => ("decompress_s", 1e-3),
                "write_ms" => ("write_s", 1e-3),
                "sync_ms" => ("sync_s", 1e-3),
                "keep_ms" => ("keep_blob_s", 1e-3),
                "entries" => ("entries", 1.0),
                "uncompressed" => ("uncompressed_mib", 1.0 / (1 << 20) as f64),
                _ => continue,
            };
            *out.entry(name.to_string()).or_insert(0.0) += v * scale;
        }
    }
    out
}

fn once(cfg: &Config, dir: &Path, proxy: &CountingProxy, reference: &str) -> Result<One> {
    std::fs::create_dir_all(dir)?;
    let mut daemon: Option<harness::Proc> = None;
    let setup = match cfg {
        Config::Builtin => ContainerdSetup::builtin(),
        Config::Refproxy(bin) => {
            let (p, socket) = harness::start_refproxy(bin, &dir.join("refproxy"))?;
            daemon = Some(p);
            ContainerdSetup::proxy(&socket, "refproxy")
        }
        Config::Strata(bin) | Config::StrataPull(bin) => {
            let s = Strata::start(bin, dir, &[])?;
            let setup = ContainerdSetup::strata(&s.socket);
            daemon = Some(s.into_proc());
            setup
        }
    };
    let snapshotter = match cfg {
        Config::Builtin => "overlayfs",
        Config::Refproxy(_) => "refproxy",
        Config::Strata(_) | Config::StrataPull(_) => "strata",
    };
    let mut cd = Containerd::start(&dir.join("containerd"), &setup)?;
    let before = proxy.bytes_down();
    let start = Instant::now();
    match cfg {
        Config::StrataPull(bin) => {
            let socket = cd.socket.display().to_string();
            harness::run(
                std::process::Command::new(bin)
                    .args(["pull", "-a", &socket, "-n", "strata", reference]),
            )?;
        }
        _ => {
            cd.pull(snapshotter, reference)?;
        }
    }
    let pull = start.elapsed();
    let fetched = proxy.bytes_down() - before;
    let start = Instant::now();
    cd.run(snapshotter, reference, "bench-run", &[])?;
    let run = start.elapsed();
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
    cd.stop()?;
    drop(daemon);
    let phases = match cfg {
        Config::StrataPull(_) => {
            unpack_phases(&std::fs::read_to_string(dir.join("strata.log")).unwrap_or_default())
        }
        _ => BTreeMap::new(),
    };
    Ok(One {
        pull,
        run,
        fetched,
        cpu_s,
        peak,
        phases,
    })
}

/// Which image the pull bench uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchImage {
    /// Busybox and four generated layers, half noise, half text.
    Synthetic,
    /// A language runtime from this machine's files ([`runtime_image`]).
    Runtime,
}

/// Pulls + runs the bench image `rounds` times per configuration,
/// alternating; one row per configuration for pull and for run.
pub fn run(
    configs: &[Config],
    workdir: &Path,
    which: BenchImage,
    mib: usize,
    rounds: usize,
) -> Result<Vec<OpStats>> {
    std::fs::create_dir_all(workdir)?;
    let tmp = tempfile::Builder::new()
        .prefix("strata-bench-pull")
        .tempdir_in(workdir)?;
    let mut registry = Registry::start(&tmp.path().join("registry"))?;
    let img = match which {
        BenchImage::Synthetic => bench_image(4, mib)?,
        BenchImage::Runtime => runtime_image(mib)?,
    };
    let written = img.write_layout(&tmp.path().join("oci"), "v1")?;
    let compressed: u64 = written.layer_sizes.iter().sum();
    eprintln!(
        "pull bench image: {} layers, {:.1} MiB compressed",
        written.layer_sizes.len(),
        compressed as f64 / (1 << 20) as f64
    );
    registry.push(&tmp.path().join("oci"), "v1", "bench/pull:v1")?;
    let proxy = CountingProxy::start(&registry.addr)?;
    let reference = format!("{}/bench/pull:v1", proxy.addr);
    let mut results: Vec<Vec<One>> = configs.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for (i, c) in configs.iter().enumerate() {
            let dir = tmp.path().join(format!("r{r}-{}", c.name()));
            let one = once(c, &dir, &proxy, &reference)
                .with_context(|| format!("pull with {}", c.name()))?;
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
        let keys: std::collections::BTreeSet<String> =
            res.iter().flat_map(|o| o.phases.keys().cloned()).collect();
        for k in keys {
            let v = mean(&|o| o.phases.get(&k).copied().unwrap_or(0.0));
            extra.insert(k, v);
        }
        let mut p = rounds_row(
            "pull",
            c.name(),
            "pull+unpack",
            res.iter().map(|o| o.pull).collect(),
        );
        p.extra = extra;
        rows.push(p);
        rows.push(rounds_row(
            "pull",
            c.name(),
            "run",
            res.iter().map(|o| o.run).collect(),
        ));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_phases_read_strata_log_lines() {
        let log = "\u{1b}[2m2026-11-29T18:58:32Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m strata_snapshotter::overlay: layer unpacked by strata \u{1b}[3mentries\u{1b}[0m\u{1b}[2m=\u{1b}[0m14 \u{1b}[3muncompressed\u{1b}[0m\u{1b}[2m=\u{1b}[0m2097152 \u{1b}[3melapsed_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m12 read_ms=2 decompress_ms=7 write_ms=1 sync_ms=30\n\
                   other line elapsed_ms=999\n\
                   layer unpacked by strata entries=6 elapsed_ms=8 sync_ms=10\n";
        let p = unpack_phases(log);
        assert_eq!(p["entries"], 20.0);
        assert!((p["unpack_s"] - 0.020).abs() < 1e-9);
        assert!((p["sync_s"] - 0.040).abs() < 1e-9);
        assert!((p["uncompressed_mib"] - 2.0).abs() < 1e-9);
        assert!((p["decompress_s"] - 0.007).abs() < 1e-9);
    }
}
