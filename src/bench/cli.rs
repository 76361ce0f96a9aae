//! The `strata bench` command line: each subcommand starts what it needs,
//! runs, prints the machine's limits and a table, and can write a JSON
//! [`Report`] that `strata bench compare` reads.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::content::{ContentTarget, ContentWorkload};
use super::{machine, pull, scaling, Report, Target};

/// Daemons to start for a bench, and where.
#[derive(Args, Debug, Clone)]
pub struct Daemons {
    /// Start this strata binary's daemon in a temporary root and add it.
    #[arg(long)]
    pub start_strata: bool,
    /// Start containerd's overlayfs and local store as proxy plugins from this
    /// `refproxy` binary; `auto` builds it with ../shared/conformance/run
    /// --build-only (or $CONFORMANCE_RUN).
    #[arg(long)]
    pub refproxy: Option<String>,
    /// Where the started daemons and the disk probes keep their state.
    #[arg(long, default_value = "/var/tmp")]
    pub workdir: PathBuf,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `strata bench ...`.
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Snapshot ops (Prepare, Mounts, Commit, Stat, Remove) through the proxy
    /// gRPC API: p50, p99 and throughput, serially and concurrently.
    Snapshots {
        /// A target: LABEL=SOCKET:SNAPSHOTTER (repeatable).
        #[arg(long = "target")]
        targets: Vec<Target>,
        #[command(flatten)]
        daemons: Daemons,
        /// Snapshots per round and target.
        #[arg(long, default_value_t = 200)]
        ops: usize,
        /// Rounds (alternating between targets).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Concurrent clients for the concurrent pass (1: serial only).
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Content store: ingest of a large and many small blobs, Read and
    /// ReaderAt throughput, Info and Status latency.
    Content {
        /// A target: LABEL=SOCKET (repeatable).
        #[arg(long = "target")]
        targets: Vec<ContentTarget>,
        #[command(flatten)]
        daemons: Daemons,
        /// Size of the large blob, MiB.
        #[arg(long, default_value_t = 128)]
        large_mib: usize,
        /// Small blobs (4-64 KiB) per round.
        #[arg(long, default_value_t = 300)]
        small: usize,
        /// Random ReaderAt reads per round.
        #[arg(long, default_value_t = 300)]
        reads: usize,
        /// Rounds (alternating between targets).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// Lazy pulling: time to a container's first output from a language
    /// runtime image on containerd's overlayfs, its eStargz conversion on
    /// strata-lazy and on stargz-snapshotter's stargzd; bytes fetched, CPU,
    /// peak memory, warm start, cached sequential read.
    Lazy {
        /// Where the started daemons keep their state.
        #[arg(long, default_value = "/var/tmp")]
        workdir: PathBuf,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Image size, MiB, before compression.
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// Rounds (alternating between configurations).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// Pull + run an image through a real containerd with its built-ins,
    /// with refproxy (if given) and with strata: seconds, bytes fetched, CPU
    /// seconds, peak memory.
    Pull {
        #[command(flatten)]
        daemons: Daemons,
        /// Image size, MiB, before compression.
        #[arg(long, default_value_t = 128)]
        mib: usize,
        /// The image: generated layers, or a language runtime built from
        /// this machine's files.
        #[arg(long, value_enum, default_value_t = pull::BenchImage::Synthetic)]
        image: pull::BenchImage,
        /// Rounds (alternating between configurations).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Only these configurations (comma-separated: strata-pull, strata,
        /// containerd, refproxy); all by default.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// How figures grow with snapshot count, chain depth, clients and blob
    /// size; a table and an SVG plot. Run it against started daemons: it
    /// leaves its snapshots behind.
    Scaling {
        #[command(flatten)]
        daemons: Daemons,
        /// Small sizes (100 and 1,000 snapshots...) instead of 1,000 to 100,000.
        #[arg(long)]
        quick: bool,
        /// Where to draw the plot.
        #[arg(long, default_value = "strata-scaling.svg")]
        svg: PathBuf,
    },
    /// The machine's limits alone.
    Machine {
        /// Where to probe the disk.
        #[arg(long, default_value = "/var/tmp")]
        workdir: PathBuf,
    },
    /// Everything: machine limits, snapshots, content, pull and scaling,
    /// against strata and (with --refproxy) containerd's own implementations.
    All {
        #[command(flatten)]
        daemons: Daemons,
        /// A developer's loop: small sizes, under two minutes.
        #[arg(long)]
        quick: bool,
        /// Where to draw the scaling plot.
        #[arg(long, default_value = "strata-scaling.svg")]
        svg: PathBuf,
    },
    /// Compare two JSON reports: ratios per row, regressions beyond noise.
    /// Exits non-zero when a row regressed.
    Compare {
        /// The baseline report.
        a: PathBuf,
        /// The new report.
        b: PathBuf,
        /// Smallest slowdown of p50 that counts (0.15: 15%).
        #[arg(long, default_value_t = 0.15)]
        threshold: f64,
    },
}

/// Daemons started for a bench, stopped when dropped.
struct Started {
    _tmp: tempfile::TempDir,
    _procs: Vec<crate::harness::Proc>,
    strata: Option<PathBuf>,
    refproxy: Option<PathBuf>,
}

fn refproxy_bin(arg: &Option<String>) -> Result<Option<PathBuf>> {
    match arg.as_deref() {
        None => Ok(None),
        Some("auto") => Ok(Some(crate::harness::conformance_bins()?.join("refproxy"))),
        Some(p) => Ok(Some(PathBuf::from(p))),
    }
}

fn start(d: &Daemons) -> Result<Started> {
    std::fs::create_dir_all(&d.workdir)?;
    let tmp = tempfile::Builder::new()
        .prefix("strata-bench")
        .tempdir_in(&d.workdir)?;
    let mut procs = Vec::new();
    let mut strata = None;
    if d.start_strata {
        let me = std::env::current_exe()?;
        let dir = tmp.path().join("strata");
        std::fs::create_dir_all(&dir)?;
        let s = crate::harness::Strata::start(&me, &dir, &[])?;
        strata = Some(s.socket.clone());
        procs.push(s.into_proc());
    }
    let bin = refproxy_bin(&d.refproxy)?;
    let mut refproxy = None;
    if let Some(bin) = &bin {
        let (p, socket) = crate::harness::start_refproxy(bin, &tmp.path().join("refproxy"))?;
        refproxy = Some(socket);
        procs.push(p);
    }
    Ok(Started {
        _tmp: tmp,
        _procs: procs,
        strata,
        refproxy,
    })
}

fn snapshot_targets(s: &Started, mut extra: Vec<Target>) -> Vec<Target> {
    let mut t = Vec::new();
    if let Some(sock) = &s.strata {
        t.push(Target {
            label: "strata".into(),
            socket: sock.clone(),
            snapshotter: "strata".into(),
        });
    }
    if let Some(sock) = &s.refproxy {
        t.push(Target {
            label: "refproxy".into(),
            socket: sock.clone(),
            snapshotter: "overlayfs".into(),
        });
    }
    t.append(&mut extra);
    t
}

fn content_targets(s: &Started, mut extra: Vec<ContentTarget>) -> Vec<ContentTarget> {
    let mut t = Vec::new();
    for (label, sock) in [("strata", &s.strata), ("refproxy", &s.refproxy)] {
        if let Some(sock) = sock {
            t.push(ContentTarget {
                label: label.into(),
                socket: sock.clone(),
            });
        }
    }
    t.append(&mut extra);
    t
}

fn report(workdir: &Path, disk_mib: usize) -> Result<Report> {
    std::fs::create_dir_all(workdir)?;
    let probe = tempfile::Builder::new()
        .prefix("strata-probe")
        .tempdir_in(workdir)?;
    Ok(Report {
        date: now_utc(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine::measure(probe.path(), disk_mib)?,
        rows: Vec::new(),
        series: Vec::new(),
    })
}

fn now_utc() -> String {
    crate::pull::rfc3339(std::time::SystemTime::now())
}

fn finish(r: &Report, json: &Option<PathBuf>) -> Result<()> {
    print!("{}", machine::describe(&r.machine));
    println!("run: {} ({})\n", r.date, r.command);
    let mut groups: Vec<&str> = Vec::new();
    for row in &r.rows {
        if !groups.contains(&row.group.as_str()) {
            groups.push(&row.group);
        }
    }
    for g in groups {
        let rows: Vec<_> = r.rows.iter().filter(|x| x.group == g).cloned().collect();
        println!("[{g}]");
        print!("{}", super::table(&rows));
        println!();
    }
    if let Some(p) = json {
        std::fs::write(p, serde_json::to_vec_pretty(r)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("report written to {}", p.display());
    }
    Ok(())
}

fn tag(rows: &mut [super::OpStats], group: &str) {
    for r in rows {
        r.group = group.into();
    }
}

/// Snapshot-op rows against the started daemons and `extra` targets.
fn snapshot_rows(
    rt: &tokio::runtime::Runtime,
    d: &Daemons,
    extra: Vec<Target>,
    (ops, rounds, concurrency): (usize, usize, usize),
) -> Result<Vec<super::OpStats>> {
    let s = start(d)?;
    let mut rows = rt.block_on(super::snapshots(
        &snapshot_targets(&s, extra),
        ops,
        rounds,
        concurrency,
    ))?;
    tag(&mut rows, "snapshots");
    Ok(rows)
}

/// Content rows against the started daemons and `extra` targets.
fn content_rows(
    rt: &tokio::runtime::Runtime,
    d: &Daemons,
    extra: Vec<ContentTarget>,
    w: &ContentWorkload,
) -> Result<Vec<super::OpStats>> {
    let s = start(d)?;
    let mut rows = rt.block_on(super::content::run(&content_targets(&s, extra), w))?;
    tag(&mut rows, "content");
    Ok(rows)
}

/// Scaling rows and series against freshly started daemons.
fn scaling_rows(
    rt: &tokio::runtime::Runtime,
    d: &Daemons,
    quick: bool,
) -> Result<(Vec<super::OpStats>, Vec<scaling::Point>)> {
    let s = start(d)?;
    let sizes = if quick {
        scaling::Sizes::quick()
    } else {
        scaling::Sizes::full()
    };
    rt.block_on(scaling::run(
        &snapshot_targets(&s, vec![]),
        &content_targets(&s, vec![]),
        &sizes,
    ))
}

/// Runs a `strata bench` subcommand.
pub fn run(cmd: BenchCmd) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    match cmd {
        BenchCmd::Snapshots {
            targets,
            daemons,
            ops,
            rounds,
            concurrency,
        } => {
            let mut r = report(&daemons.workdir, 64)?;
            r.rows = snapshot_rows(&rt, &daemons, targets, (ops, rounds, concurrency))?;
            finish(&r, &daemons.json)
        }
        BenchCmd::Content {
            targets,
            daemons,
            large_mib,
            small,
            reads,
            rounds,
        } => {
            let mut r = report(&daemons.workdir, 64)?;
            let w = ContentWorkload {
                large_mib,
                small_blobs: small,
                random_reads: reads,
                rounds,
            };
            r.rows = content_rows(&rt, &daemons, targets, &w)?;
            finish(&r, &daemons.json)
        }
        BenchCmd::Pull {
            daemons,
            mib,
            image,
            rounds,
            only,
        } => {
            let mut r = report(&daemons.workdir, 64)?;
            let mut configs = pull_configs(&daemons)?;
            if !only.is_empty() {
                let known: Vec<&str> = configs.iter().map(|c| c.name()).collect();
                if let Some(bad) = only.iter().find(|o| !known.contains(&o.as_str())) {
                    bail!(
                        "--only {bad:?}: the configurations are {} (refproxy needs --refproxy)",
                        known.join(", ")
                    );
                }
                configs.retain(|c| only.iter().any(|o| o == c.name()));
            }
            r.rows = pull::run(&configs, &daemons.workdir, image, mib, rounds)?;
            finish(&r, &daemons.json)
        }
        BenchCmd::Lazy {
            workdir,
            json,
            mib,
            rounds,
        } => {
            let mut r = report(&workdir, 64)?;
            r.rows = super::lazy::run(&workdir, mib, rounds)?;
            finish(&r, &json)
        }
        BenchCmd::Scaling {
            daemons,
            quick,
            svg,
        } => {
            let mut r = report(&daemons.workdir, 64)?;
            (r.rows, r.series) = scaling_rows(&rt, &daemons, quick)?;
            scaling::plot(&r.series, &svg)?;
            finish(&r, &daemons.json)?;
            println!("plot written to {}", svg.display());
            Ok(())
        }
        BenchCmd::Machine { workdir } => {
            let r = report(&workdir, 256)?;
            print!("{}", machine::describe(&r.machine));
            Ok(())
        }
        BenchCmd::All {
            daemons,
            quick,
            svg,
        } => {
            let mut daemons = daemons;
            daemons.start_strata = true;
            let mut r = report(&daemons.workdir, if quick { 64 } else { 256 })?;
            let snaps = if quick { (100, 1, 16) } else { (200, 3, 16) };
            r.rows.extend(snapshot_rows(&rt, &daemons, vec![], snaps)?);
            let w = if quick {
                ContentWorkload {
                    large_mib: 32,
                    small_blobs: 100,
                    random_reads: 100,
                    rounds: 1,
                }
            } else {
                ContentWorkload {
                    large_mib: 128,
                    small_blobs: 300,
                    random_reads: 300,
                    rounds: 2,
                }
            };
            r.rows.extend(content_rows(&rt, &daemons, vec![], &w)?);
            let (mib, rounds) = if quick { (16, 1) } else { (128, 3) };
            r.rows.extend(pull::run(
                &pull_configs(&daemons)?,
                &daemons.workdir,
                pull::BenchImage::Synthetic,
                mib,
                rounds,
            )?);
            let (rows, series) = scaling_rows(&rt, &daemons, quick)?;
            r.rows.extend(rows);
            r.series = series;
            scaling::plot(&r.series, &svg)?;
            finish(&r, &daemons.json)?;
            println!("plot written to {}", svg.display());
            Ok(())
        }
        BenchCmd::Compare { a, b, threshold } => {
            let read = |p: &Path| -> Result<Report> {
                let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                serde_json::from_slice(&text).with_context(|| format!("parsing {}", p.display()))
            };
            let (ra, rb) = (read(&a)?, read(&b)?);
            println!(
                "A: {} ({})\nB: {} ({})\n",
                ra.date,
                a.display(),
                rb.date,
                b.display()
            );
            let changes = super::compare(&ra, &rb, threshold);
            print!("{}", super::compare_table(&changes));
            let bad = changes.iter().filter(|c| c.regression).count();
            if bad > 0 {
                bail!("{bad} row(s) regressed beyond noise");
            }
            Ok(())
        }
    }
}

fn pull_configs(d: &Daemons) -> Result<Vec<pull::Config>> {
    let exe = std::env::current_exe()?;
    let mut c = vec![
        pull::Config::StrataPull(exe.clone()),
        pull::Config::Strata(exe),
        pull::Config::Builtin,
    ];
    if let Some(bin) = refproxy_bin(&d.refproxy)? {
        c.push(pull::Config::Refproxy(bin));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_civil() {
        let d = super::now_utc();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
