//! The one RocksDB, opened by the daemon with every store's column families.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rocksdb::{Cache, ColumnFamilyDescriptor, Options, DB};

use crate::config::DbConfig;

/// Opens (or creates) the database at `path` with the union of the stores'
/// column families. Column families on disk that no store claims (from a
/// newer strata) are opened with default options, so they are kept.
pub fn open(path: &Path, cfg: &DbConfig) -> anyhow::Result<Arc<DB>> {
    open_mode(path, cfg, false)
}

/// Opens the database read-only, beside a running daemon (for `strata
/// content stats` and `strata fsck` without `--repair`).
pub fn open_read_only(path: &Path, cfg: &DbConfig) -> anyhow::Result<Arc<DB>> {
    open_mode(path, cfg, true)
}

fn open_mode(path: &Path, cfg: &DbConfig, read_only: bool) -> anyhow::Result<Arc<DB>> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.increase_parallelism(2);
    opts.set_max_background_jobs(cfg.max_background_jobs.max(1));
    // Small metadata: keep the WAL and memtables small so start-up replays little.
    opts.set_max_total_wal_size(64 << 20);
    opts.set_bytes_per_sync(1 << 20);
    opts.set_keep_log_file_num(4);
    opts.set_max_log_file_size(8 << 20);

    let cache = Cache::new_lru_cache(cfg.block_cache_mb.max(1) << 20);
    let mut cfs: Vec<ColumnFamilyDescriptor> = strata_snapshotter::schema::column_families(&cache);
    cfs.extend(strata_content::schema::column_families(&cache));
    let known: Vec<String> = cfs.iter().map(|c| c.name().to_string()).collect();
    if let Ok(existing) = DB::list_cf(&opts, path) {
        for name in existing {
            if name != rocksdb::DEFAULT_COLUMN_FAMILY_NAME && !known.contains(&name) {
                tracing::warn!(cf = %name, "column family not known to this strata; kept as is");
                cfs.push(ColumnFamilyDescriptor::new(name, Options::default()));
            }
        }
    }
    let db = if read_only {
        DB::open_cf_descriptors_read_only(&opts, path, cfs, false)
    } else {
        DB::open_cf_descriptors(&opts, path, cfs)
    }
    .with_context(|| format!("opening the metadata database at {}", path.display()))?;
    Ok(Arc::new(db))
}

/// Flushes memtables so that the next start replays no WAL.
pub fn flush(db: &DB) -> anyhow::Result<()> {
    db.flush_wal(true)?;
    for name in DB::list_cf(&Options::default(), db.path())? {
        if let Some(cf) = db.cf_handle(&name) {
            db.flush_cf(cf)?;
        }
    }
    Ok(())
}
