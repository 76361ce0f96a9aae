//! Criterion micro-benchmarks of the stores without gRPC: what a request
//! costs inside strata, apart from the transport.
//!
//! - `content/ingest_64MiB`: Writer.write + commit of 64 MiB of incompressible
//!   data (running SHA-256, FastCDC, chunk SHA-256, verify, pack append and
//!   sync, one synced batch), next to `sha256_64MiB`, the one-core ceiling.
//! - `content/read_64MiB`: reading it back.
//! - `snapshots/prepare_commit`: a MetaStore create + commit (two synced batches).
//! - `snapshots/get`: a record lookup (Stat, Mounts).
//!
//!     cargo bench --bench stores

use std::collections::BTreeMap;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::Digest;

fn db(dir: &std::path::Path) -> Arc<rocksdb::DB> {
    strata::db::open(&dir.join("db"), &strata::config::DbConfig::default()).expect("open db")
}

fn content(c: &mut Criterion) {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let store = strata_content::ContentStore::open(
        db(dir.path()),
        strata_content::ContentConfig::new(dir.path().join("content")),
        true,
    )
    .expect("open content store");
    let mut g = c.benchmark_group("content");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(64 << 20));
    let mut n = 0u64;
    g.bench_function("sha256_64MiB", |b| {
        let data = strata::harness::image::noise(1, 64 << 20);
        b.iter(|| sha2::Sha256::digest(&data))
    });
    let mut last = String::new();
    g.bench_function("ingest_64MiB", |b| {
        b.iter_batched(
            || {
                n += 1;
                (n, strata::harness::image::noise(n, 64 << 20))
            },
            |(k, data)| {
                let mut w = store
                    .writer(&format!("r{k}"), data.len() as i64, "")
                    .expect("writer");
                for p in data.chunks(1 << 20) {
                    w.write(p).expect("write");
                }
                last = w
                    .commit(data.len() as i64, "", BTreeMap::new())
                    .expect("commit");
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.bench_function("read_64MiB", |b| {
        b.iter(|| {
            let mut total = 0usize;
            store
                .read(&last, 0, 0, |_, p| {
                    total += p.len();
                    true
                })
                .expect("read");
            total
        })
    });
    g.finish();
}

fn snapshots(c: &mut Criterion) {
    use strata_snapshotter::meta::MetaStore;
    use strata_snapshotter::Kind;
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let meta = MetaStore::open(db(dir.path()), "bench").expect("meta");
    let mut g = c.benchmark_group("snapshots");
    let mut i = 0u64;
    g.bench_function("prepare_commit", |b| {
        b.iter(|| {
            i += 1;
            let p = meta
                .begin_create(Kind::Active, &format!("a{i}"), "", BTreeMap::new())
                .expect("begin");
            meta.finish_create(p).expect("finish");
            meta.commit(&format!("c{i}"), &format!("a{i}"), BTreeMap::new(), |_| {
                Ok(strata_snapshotter::Usage::default())
            })
            .expect("commit");
        })
    });
    g.bench_function("get", |b| b.iter(|| meta.get("c1").expect("get")));
    g.finish();
}

criterion_group!(benches, content, snapshots);
criterion_main!(benches);
