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
    /// Pull an image into containerd, with strata fetching and unpacking
    /// the layers itself (containerd 1.6's `ctr image pull` passes no
    /// remote-snapshot labels; this does). Then `ctr run --snapshotter
    /// strata IMAGE` runs it.
    Pull {
        /// The image, e.g. docker.io/library/alpine:latest or
        /// 127.0.0.1:5000/app:v1.
        image: String,
        /// containerd's socket.
        #[arg(short = 'a', long, default_value = "/run/containerd/containerd.sock")]
        address: PathBuf,
        /// containerd namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// The snapshotter to unpack into.
        #[arg(long, default_value = "strata")]
        snapshotter: String,
        /// Plain HTTP to the registry.
        #[arg(long)]
        plain_http: bool,
        /// Platform to pick from a multi-platform image (default: this host's).
        #[arg(long)]
        platform: Option<String>,
        /// Registry credentials, user:password.
        #[arg(short = 'u', long)]
        user: Option<String>,
        /// containerd's hosts.toml directory.
        #[arg(long, default_value = "/etc/containerd/certs.d")]
        hosts_dir: PathBuf,
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
        /// strata's root (default: the config's `root`, else /var/lib/strata).
        #[arg(long)]
        root: Option<PathBuf>,
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
        what: strata::bench::cli::BenchCmd,
    },
}

#[derive(Subcommand)]
enum ContentCmd {
    /// Logical bytes (what containerd sees), stored bytes, and the ratio.
    /// Works beside a running daemon (reads the DB read-only).
    Stats {
        /// strata's root (default: the config's `root`, else /var/lib/strata).
        #[arg(long)]
        root: Option<PathBuf>,
        /// strata.toml, for the content settings.
        #[arg(long)]
        config: Option<PathBuf>,
    },
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
            let root = root.unwrap_or_else(|| cfg.root.clone());
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
            let root = root.unwrap_or_else(|| cfg.root.clone());
            let store = open_content(&root, &cfg, repair)?;
            // A count of blobs, not `stats` (which also scans every chunk).
            let mut blobs = 0u64;
            store.walk(&strata_proto::filters::Filter::default(), |_| {
                blobs += 1;
                true
            })?;
            let damaged = store.fsck(repair)?;
            for d in &damaged {
                println!("DAMAGED {}: {}", d.digest, d.problem);
            }
            if damaged.is_empty() {
                println!(
                    "fsck: {blobs} blob{} checked, every one matches its digest",
                    if blobs == 1 { "" } else { "s" }
                );
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
        Cmd::Pull {
            image,
            address,
            namespace,
            snapshotter,
            plain_http,
            platform,
            user,
            hosts_dir,
        } => {
            init_tracing("warn");
            let platform = match platform {
                Some(p) => p
                    .parse::<strata_registry::Platform>()
                    .map_err(|e| anyhow::anyhow!("--platform {p:?}: {e}"))?,
                None => strata_registry::Platform::host(),
            };
            let opts = strata::pull::PullOptions {
                address,
                namespace,
                snapshotter,
                platform,
                plain_http,
                user,
                hosts_dir: Some(hosts_dir).filter(|p| p.is_dir()),
                progress: true,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            let report = rt.block_on(strata::pull::pull(&image, &opts))?;
            let fast = report
                .layers
                .iter()
                .filter(|l| l.path == strata::pull::LayerPath::Snapshotter)
                .count();
            let lazy = report
                .layers
                .iter()
                .filter(|l| l.path == strata::pull::LayerPath::Lazy)
                .count();
            let blobs = report.layers.iter().filter(|l| l.blob).count();
            let lazy = if lazy > 0 {
                format!(", {lazy} mounted lazily")
            } else {
                String::new()
            };
            println!(
                "{}: {} ({} layers, {fast} unpacked by {}{lazy}, {blobs} blobs in content) in {:.2} s",
                report.name,
                report.target,
                report.layers.len(),
                opts.snapshotter,
                report.took.as_secs_f64()
            );
            Ok(())
        }
        Cmd::Demo { workdir } => {
            init_tracing("warn");
            strata::demo::run(&workdir)
        }
        Cmd::Bench { what } => {
            init_tracing("warn");
            strata::bench::cli::run(what)
        }
    }
}
