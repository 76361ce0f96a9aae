//! `strata`: a storage backend for containerd.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use strata::config::Config;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Snapshotters and a content store for containerd"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the snapshotters on a unix socket, as containerd proxy plugins.
    Serve {
        /// State directory (default /var/lib/strata).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Unix socket to listen on (default /run/strata/strata.sock).
        #[arg(long)]
        address: Option<PathBuf>,
        /// strata.toml; flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Log filter, as RUST_LOG (which wins over both).
        #[arg(long)]
        log_level: Option<String>,
    },
    /// Pull and run an embedded demo image through strata and a real
    /// containerd (needs root, containerd, runc, docker-registry, skopeo).
    Demo {
        /// Where to keep the temporary state (removed at the end).
        #[arg(long, default_value = "/var/tmp")]
        workdir: PathBuf,
    },
    /// The content store: statistics.
    Content {
        #[command(subcommand)]
        what: ContentCmd,
    },
    /// Re-verify every committed blob's digest over its stored bytes.
    Fsck {
        /// strata's root (default /var/lib/strata).
        #[arg(long, default_value = "/var/lib/strata")]
        root: PathBuf,
        /// strata.toml, for the content settings.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Remove damaged blobs from the store and note them under
        /// ROOT/content/quarantine (needs the daemon stopped).
        #[arg(long)]
        repair: bool,
    },
    /// Benchmarks, side by side against other implementations in one run.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum ContentCmd {
    /// Logical bytes (what containerd sees), stored bytes, and the ratio.
    /// Works beside a running daemon (reads the DB read-only).
    Stats {
        /// strata's root (default /var/lib/strata).
        #[arg(long, default_value = "/var/lib/strata")]
        root: PathBuf,
        /// strata.toml, for the content settings.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Snapshot ops (Prepare, Mounts, Commit, Stat, Remove) through the proxy
    /// gRPC API: p50, p99 and throughput, serially and concurrently.
    Snapshots {
        /// A target: LABEL=SOCKET:SNAPSHOTTER (repeatable).
        #[arg(long = "target")]
        targets: Vec<strata::bench::Target>,
        /// Start this strata binary's daemon in a temporary root and add it.
        #[arg(long)]
        start_strata: bool,
        /// Start containerd's overlayfs as a proxy plugin from this `refproxy`
        /// binary (`../shared/conformance/run --build-only` builds it).
        #[arg(long)]
        refproxy: Option<PathBuf>,
        /// Where the started daemons keep their state.
        #[arg(long, default_value = "/var/tmp")]
        workdir: PathBuf,
        /// Snapshots per round and target.
        #[arg(long, default_value_t = 200)]
        ops: usize,
        /// Rounds (alternating between targets).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Concurrent clients for the concurrent pass (1: serial only).
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Also write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Content store: ingest of a large and many small blobs, Read and
    /// ReaderAt throughput, Info and Status latency.
    Content {
        /// A target: LABEL=SOCKET (repeatable).
        #[arg(long = "target")]
        targets: Vec<strata::bench::content::ContentTarget>,
        /// Start this strata binary's daemon in a temporary root and add it.
        #[arg(long)]
        start_strata: bool,
        /// Start containerd's local content store as a proxy plugin from this
        /// `refproxy` binary.
        #[arg(long)]
        refproxy: Option<PathBuf>,
        /// Where the started daemons keep their state.
        #[arg(long, default_value = "/var/tmp")]
        workdir: PathBuf,
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
        /// Also write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// Daemons started for a bench, stopped when dropped.
struct Started {
    _tmp: tempfile::TempDir,
    _procs: Vec<strata::harness::Proc>,
    /// (label, socket) of each, strata first.
    sockets: Vec<(String, PathBuf)>,
}

fn start_daemons(
    start_strata: bool,
    refproxy: Option<PathBuf>,
    workdir: &std::path::Path,
) -> anyhow::Result<Started> {
    std::fs::create_dir_all(workdir)?;
    let tmp = tempfile::Builder::new()
        .prefix("strata-bench")
        .tempdir_in(workdir)?;
    let mut procs = Vec::new();
    let mut sockets = Vec::new();
    if start_strata {
        let me = std::env::current_exe()?;
        let d = tmp.path().join("strata");
        std::fs::create_dir_all(&d)?;
        let s = strata::harness::Strata::start(&me, &d, &[])?;
        sockets.push(("strata".to_string(), s.socket.clone()));
        procs.push(s.into_proc());
    }
    if let Some(bin) = refproxy {
        let (p, socket) = strata::harness::start_refproxy(&bin, &tmp.path().join("refproxy"))?;
        sockets.push(("refproxy".to_string(), socket));
        procs.push(p);
    }
    Ok(Started {
        _tmp: tmp,
        _procs: procs,
        sockets,
    })
}

fn write_json(path: Option<PathBuf>, rows: &[strata::bench::OpStats]) -> anyhow::Result<()> {
    if let Some(p) = path {
        std::fs::write(&p, serde_json::to_vec_pretty(rows)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn init_tracing(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn load(config: Option<&std::path::Path>) -> anyhow::Result<Config> {
    match config {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    }
}

/// Opens the content store of `root` for a CLI command: read-only beside a
/// running daemon, or writable (the daemon must be stopped).
fn open_content(
    root: &std::path::Path,
    cfg: &Config,
    writable: bool,
) -> anyhow::Result<strata_content::ContentStore> {
    let db_path = root.join("db");
    let db = if writable {
        strata::db::open(&db_path, &cfg.db).context("the daemon must be stopped for --repair")?
    } else {
        strata::db::open_read_only(&db_path, &cfg.db)?
    };
    Ok(strata_content::ContentStore::open(
        db,
        cfg.content.store_config(root.join("content")),
        writable,
    )?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve {
            root,
            address,
            config,
            log_level,
        } => {
            let mut cfg = match &config {
                Some(p) => Config::load(p)?,
                None => Config::default(),
            };
            if let Some(r) = root {
                cfg.root = r;
            }
            if let Some(a) = address {
                cfg.address = a;
            }
            if let Some(l) = log_level {
                cfg.log_level = l;
            }
            init_tracing(&cfg.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("strata")
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(strata::serve::run(cfg))
        }
        Cmd::Content {
            what: ContentCmd::Stats { root, config },
        } => {
            init_tracing("warn");
            let cfg = load(config.as_deref())?;
            let store = open_content(&root, &cfg, false)?;
            let s = store.stats()?;
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            println!("blobs            {}", s.blobs);
            println!(
                "logical bytes    {} ({:.1} MiB)",
                s.logical_bytes,
                mib(s.logical_bytes)
            );
            println!(
                "unique chunks    {} ({:.1} MiB before compression)",
                s.chunks,
                mib(s.chunk_raw_bytes)
            );
            println!(
                "stored bytes     {} ({:.1} MiB in chunks)",
                s.chunk_stored_bytes,
                mib(s.chunk_stored_bytes)
            );
            println!(
                "pack files       {} ({:.1} MiB on disk)",
                s.packs,
                mib(s.pack_bytes)
            );
            let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
            println!(
                "dedup+compression ratio  {:.2} (logical / stored)",
                ratio(s.logical_bytes, s.chunk_stored_bytes)
            );
            println!(
                "on-disk ratio            {:.2} (logical / pack files)",
                ratio(s.logical_bytes, s.pack_bytes)
            );
            Ok(())
        }
        Cmd::Fsck {
            root,
            config,
            repair,
        } => {
            init_tracing("warn");
            let cfg = load(config.as_deref())?;
            let store = open_content(&root, &cfg, repair)?;
            let damaged = store.fsck(repair)?;
            for d in &damaged {
                println!("DAMAGED {}: {}", d.digest, d.problem);
            }
            if damaged.is_empty() {
                println!("fsck: every committed blob matches its digest");
                Ok(())
            } else if repair {
                println!(
                    "fsck: {} damaged blob(s) removed; notes in {}",
                    damaged.len(),
                    root.join("content/quarantine").display()
                );
                Ok(())
            } else {
                anyhow::bail!("fsck: {} damaged blob(s); run with --repair (daemon stopped) to quarantine them", damaged.len())
            }
        }
        Cmd::Demo { workdir } => {
            init_tracing("warn");
            strata::demo::run(&workdir)
        }
        Cmd::Bench { what } => {
            init_tracing("warn");
            match what {
                BenchCmd::Snapshots {
                    mut targets,
                    start_strata,
                    refproxy,
                    workdir,
                    ops,
                    rounds,
                    concurrency,
                    json,
                } => {
                    let started = start_daemons(start_strata, refproxy, &workdir)?;
                    for (i, (label, socket)) in started.sockets.iter().enumerate() {
                        let snapshotter = if label == "refproxy" {
                            "overlayfs"
                        } else {
                            "strata"
                        };
                        targets.insert(
                            i,
                            strata::bench::Target {
                                label: label.clone(),
                                socket: socket.clone(),
                                snapshotter: snapshotter.into(),
                            },
                        );
                    }
                    let fsync = strata::harness::fdatasync_p50(&workdir)?;
                    let rt = tokio::runtime::Runtime::new()?;
                    let rows =
                        rt.block_on(strata::bench::snapshots(&targets, ops, rounds, concurrency))?;
                    println!(
                        "fdatasync p50 on {}: {:.0} µs\n",
                        workdir.display(),
                        fsync.as_secs_f64() * 1e6
                    );
                    print!("{}", strata::bench::table(&rows));
                    write_json(json, &rows)
                }
                BenchCmd::Content {
                    mut targets,
                    start_strata,
                    refproxy,
                    workdir,
                    large_mib,
                    small,
                    reads,
                    rounds,
                    json,
                } => {
                    let started = start_daemons(start_strata, refproxy, &workdir)?;
                    for (i, (label, socket)) in started.sockets.iter().enumerate() {
                        targets.insert(
                            i,
                            strata::bench::content::ContentTarget {
                                label: label.clone(),
                                socket: socket.clone(),
                            },
                        );
                    }
                    let sha = strata::bench::content::sha256_mib_s();
                    let w = strata::bench::content::ContentWorkload {
                        large_mib,
                        small_blobs: small,
                        random_reads: reads,
                        rounds,
                    };
                    let rt = tokio::runtime::Runtime::new()?;
                    let rows = rt.block_on(strata::bench::content::run(&targets, &w))?;
                    println!("single-core SHA-256: {sha:.0} MiB/s (the ceiling for ingest)\n");
                    print!("{}", strata::bench::table(&rows));
                    write_json(json, &rows)
                }
            }
        }
    }
}
