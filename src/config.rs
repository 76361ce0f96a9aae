//! `strata.toml`: the daemon's configuration. Every field has a default, so
//! an empty file (or none) gives a working daemon; flags override the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where strata keeps its state: `db/` and `snapshots/<name>/`.
    pub root: PathBuf,
    /// The unix socket containerd connects to.
    pub address: PathBuf,
    /// A `tracing` filter (`info`, `strata=debug,warn`); `RUST_LOG` wins.
    pub log_level: String,
    /// The RocksDB settings.
    pub db: DbConfig,
    /// Snapshotters by the name containerd's requests carry.
    pub snapshotters: BTreeMap<String, SnapshotterConfig>,
    /// The content store.
    pub content: ContentSettings,
    /// How strata reaches registries (the unpack fast path).
    pub registry: RegistrySettings,
    /// Lazy layers (snapshotters with `lazy = true`).
    pub lazy: LazySettings,
}

/// Lazy layers' settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LazySettings {
    /// The chunk cache's size limit, MiB (least recently used chunks go).
    pub cache_mib: u64,
    /// Fetch a layer's prefetch-landmark files before its Prepare answers.
    pub prefetch: bool,
    /// Then fetch the rest of the layer in the background, at this many
    /// MiB/s (0: not at all).
    pub background_mib_s: u64,
    /// Open fully cached files through FUSE passthrough (Linux 6.9+; on
    /// other kernels reads go through strata).
    pub passthrough: bool,
}

impl Default for LazySettings {
    fn default() -> Self {
        LazySettings {
            cache_mib: 10 * 1024,
            prefetch: true,
            background_mib_s: 32,
            passthrough: true,
        }
    }
}

/// Registry access for the unpack fast path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// containerd's hosts.toml directory: mirrors, `http://` hosts,
    /// `skip_verify`, CAs (as containerd's `config_path`).
    pub config_path: Option<PathBuf>,
    /// Plain HTTP to every registry (loopback registries use it anyway).
    pub plain_http: bool,
    /// A docker `config.json` with credentials (default: root's).
    pub docker_config: Option<PathBuf>,
    /// Range requests in flight per layer.
    pub parallel_ranges: usize,
    /// Layers fetched and unpacked at once, across all images. The first
    /// fast-path Prepare of an image starts the layers above it too.
    pub layers_at_once: usize,
    /// A response body that sends nothing for this many seconds is broken
    /// off and resumed from where it got to.
    pub stall_timeout_s: u64,
    /// Attempts per request (5xx, resets, timeouts) before it fails.
    pub max_attempts: u32,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            config_path: Some(PathBuf::from("/etc/containerd/certs.d")),
            plain_http: false,
            docker_config: None,
            parallel_ranges: 4,
            layers_at_once: 2,
            stall_timeout_s: 30,
            max_attempts: 5,
        }
    }
}

impl RegistrySettings {
    /// The registry client's settings.
    pub fn client_config(&self) -> strata_registry::ClientConfig {
        let mut c = strata_registry::ClientConfig::default();
        c.config_path = self.config_path.clone().filter(|p| p.is_dir());
        c.plain_http = self.plain_http;
        c.retry.stall_timeout = std::time::Duration::from_secs(self.stall_timeout_s.max(1));
        c.retry.max_attempts = self.max_attempts.max(1);
        if let Some(p) = &self.docker_config {
            c.docker_config = strata_registry::DockerConfig::Path(p.clone());
        }
        c
    }
}

/// The content store's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContentSettings {
    /// Serve `containerd.services.content.v1.Content`.
    pub enabled: bool,
    /// FastCDC chunk sizes, KiB: minimum, average, maximum.
    pub chunk_min_kib: u32,
    /// Average chunk size, KiB.
    pub chunk_avg_kib: u32,
    /// Maximum chunk size, KiB.
    pub chunk_max_kib: u32,
    /// zstd level for chunks that compress.
    pub zstd_level: i32,
    /// A pack file is sealed past this size, MiB.
    pub pack_max_mib: u64,
    /// Seconds between background compactions (0: never).
    pub compact_interval_secs: u64,
    /// Compaction rewrites a sealed pack whose live share is below this.
    pub compact_below: f64,
    /// The unpack fast path keeps each layer's compressed blob here too.
    pub keep_blobs: bool,
}

impl Default for ContentSettings {
    fn default() -> Self {
        ContentSettings {
            enabled: true,
            chunk_min_kib: 16,
            chunk_avg_kib: 64,
            chunk_max_kib: 256,
            zstd_level: 3,
            pack_max_mib: 1024,
            compact_interval_secs: 600,
            compact_below: 0.5,
            keep_blobs: true,
        }
    }
}

impl ContentSettings {
    /// The store's configuration under `root`.
    pub fn store_config(&self, root: PathBuf) -> strata_content::ContentConfig {
        strata_content::ContentConfig {
            root,
            chunk_min: self.chunk_min_kib.saturating_mul(1024),
            chunk_avg: self.chunk_avg_kib.saturating_mul(1024),
            chunk_max: self.chunk_max_kib.saturating_mul(1024),
            zstd_level: self.zstd_level,
            pack_max_bytes: self.pack_max_mib.saturating_mul(1 << 20),
            compact_below: self.compact_below,
        }
    }
}

/// RocksDB settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DbConfig {
    /// Shared LRU block cache, MiB.
    pub block_cache_mb: usize,
    /// Background flush and compaction threads.
    pub max_background_jobs: i32,
}

/// One snapshotter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "lowercase")]
pub enum SnapshotterConfig {
    /// containerd's overlayfs snapshotter semantics.
    Overlay(OverlaySettings),
}

/// Settings of an overlay snapshotter (see `config/strata.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlaySettings {
    /// Report `containerd.io/snapshot/overlay.upperdir` in labels.
    pub upperdir_label: bool,
    /// `index=off`; unset: when the kernel has the option.
    pub index_off: Option<bool>,
    /// `userxattr`; unset: detected as containerd does.
    pub userxattr: Option<bool>,
    /// `volatile` on writable overlays; Commit syncs the layer itself.
    pub volatile: bool,
    /// Extra overlay mount options.
    pub mount_options: Vec<String>,
    /// Fetch and unpack layers itself when Prepare carries remote-snapshot
    /// labels (CRI, containerd 2.1+'s transfer service, `strata pull`).
    pub fast_unpack: bool,
    /// Mount eStargz layers lazily (FUSE) instead of unpacking them
    /// (needs `fast_unpack`).
    pub lazy: bool,
}

impl Default for OverlaySettings {
    fn default() -> Self {
        OverlaySettings {
            upperdir_label: false,
            index_off: None,
            userxattr: None,
            volatile: false,
            mount_options: Vec::new(),
            fast_unpack: true,
            lazy: false,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut snapshotters = BTreeMap::new();
        snapshotters.insert(
            "strata".to_string(),
            SnapshotterConfig::Overlay(OverlaySettings::default()),
        );
        snapshotters.insert(
            "strata-lazy".to_string(),
            SnapshotterConfig::Overlay(OverlaySettings {
                lazy: true,
                ..OverlaySettings::default()
            }),
        );
        Config {
            root: PathBuf::from("/var/lib/strata"),
            address: PathBuf::from("/run/strata/strata.sock"),
            log_level: "info".into(),
            db: DbConfig::default(),
            snapshotters,
            content: ContentSettings::default(),
            registry: RegistrySettings::default(),
            lazy: LazySettings::default(),
        }
    }
}

impl Default for DbConfig {
    fn default() -> Self {
        DbConfig {
            block_cache_mb: 64,
            max_background_jobs: 2,
        }
    }
}

impl Config {
    /// Reads a config file; a missing field takes its default.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let cfg: Config =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what the types cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.snapshotters.is_empty() {
            anyhow::bail!(
                "config has no [snapshotters.NAME]: containerd would have nothing to use"
            );
        }
        self.content
            .store_config(self.root.join("content"))
            .validate()
            .context("[content]")?;
        for name in self.snapshotters.keys() {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                anyhow::bail!(
                    "snapshotter name {name:?}: use letters, digits, '-', '_' and '.' only"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_defaults_hold() -> anyhow::Result<()> {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/strata.toml");
        let cfg = Config::load(&example)?;
        assert!(cfg.snapshotters.contains_key("strata"));
        assert!(matches!(
            cfg.snapshotters.get("strata-lazy"),
            Some(SnapshotterConfig::Overlay(o)) if o.lazy
        ));
        let empty: Config = toml::from_str("")?;
        assert!(empty.snapshotters.contains_key("strata-lazy"));
        assert_eq!(empty.root, PathBuf::from("/var/lib/strata"));
        assert!(toml::from_str::<Config>("nope = 1").is_err());
        assert!(toml::from_str::<Config>("[snapshotters.x]\ntype = \"zfs\"").is_err());
        Ok(())
    }
}
