//! The content store's durability and safety under concurrency, crashes and
//! damage: compaction racing commits, deletes and re-commits of blobs that
//! share chunks; packs filling under concurrent appenders; pack ids and
//! chunk bytes after a lost pack or a flipped byte; file modes; the schema
//! version; ingest resumption; chunk-size settings.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{config, digest, noise, open, open_db, put, R};
use strata_content::store::read_all;
use strata_content::{ContentConfig, ContentStore, Error};

/// xorshift, for seeded choices in the stress tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Small chunks and 1 MiB packs, so that a short test makes many chunks,
/// many shared chunks and many packs.
fn stress_config(dir: &std::path::Path) -> ContentConfig {
    let mut cfg = config(dir);
    cfg.chunk_min = 2 * 1024;
    cfg.chunk_avg = 8 * 1024;
    cfg.chunk_max = 32 * 1024;
    cfg.pack_max_bytes = 1 << 20;
    // Rewrite nearly every sealed pack, so live chunks move all the time.
    cfg.compact_below = 0.95;
    cfg
}

/// Blobs made of shared segments: blob `i` is three of twelve segments plus
/// a small tail of its own, so most of its chunks are shared with others.
fn shared_blobs(n: usize) -> Vec<Vec<u8>> {
    let segments: Vec<Vec<u8>> = (0..12)
        .map(|s| noise(100 + s, 40_000 + 7_000 * s as usize))
        .collect();
    let mut rng = Rng(0x5eed);
    (0..n)
        .map(|i| {
            let mut b = Vec::new();
            for _ in 0..3 {
                b.extend_from_slice(&segments[rng.below(12) as usize]);
            }
            b.extend(noise(1000 + i as u64, 3_000));
            b
        })
        .collect()
}

#[test]
fn compaction_racing_commits_deletes_and_recommits_loses_nothing() -> R {
    let d = tempfile::tempdir()?;
    let s = ContentStore::open(open_db(d.path()), stress_config(d.path()), true)?;
    let blobs = Arc::new(shared_blobs(24));
    let digests: Arc<Vec<String>> = Arc::new(blobs.iter().map(|b| digest(b)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));

    let compactor = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || -> Result<u64, Error> {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                s.compact()?;
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(n)
        })
    };
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let (s, blobs, digests, ops) = (s.clone(), blobs.clone(), digests.clone(), ops.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut rng = Rng(0xabcd + t);
                let check = |i: usize, what: &str| -> Result<(), String> {
                    match read_all(&s, &digests[i]) {
                        Ok(got) if got == blobs[i] => Ok(()),
                        Ok(got) => Err(format!(
                            "{what}: blob {i} read back {} wrong bytes",
                            got.len()
                        )),
                        // Deleted by another worker meanwhile.
                        Err(Error::NotFound(_)) => Ok(()),
                        Err(e) => Err(format!("{what}: blob {i}: {e}")),
                    }
                };
                for op in 0..250 {
                    let i = rng.below(blobs.len() as u64) as usize;
                    match rng.below(4) {
                        0 | 1 => match put(&s, &format!("w{t}-{op}"), &blobs[i]) {
                            Ok(_) | Err(Error::AlreadyExists(_)) => check(i, "after commit")?,
                            Err(e) => return Err(format!("commit of blob {i}: {e}")),
                        },
                        2 => match s.delete(&digests[i]) {
                            Ok(()) | Err(Error::NotFound(_)) => {}
                            Err(e) => return Err(format!("delete of blob {i}: {e}")),
                        },
                        _ => check(i, "read")?,
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let mut failures = Vec::new();
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("a worker panicked".to_string()),
        }
    }
    stop.store(true, Ordering::SeqCst);
    let compactions = compactor.join().map_err(|_| "compactor panicked")??;
    assert!(failures.is_empty(), "{failures:#?}");
    // Everything still stored reads back right after a last compaction, and
    // fsck agrees.
    s.compact()?;
    let mut present = 0;
    for (i, dg) in digests.iter().enumerate() {
        match read_all(&s, dg) {
            Ok(got) => {
                assert!(got == blobs[i], "blob {i} wrong at the end");
                present += 1;
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => panic!("blob {i} at the end: {e}"),
        }
    }
    assert!(s.fsck(false)?.is_empty());
    eprintln!(
        "stress: {} operations, {compactions} compactions, {present} blobs at the end",
        ops.load(Ordering::Relaxed)
    );
    assert!(compactions > 10, "compaction ran {compactions} times only");
    Ok(())
}

#[test]
fn a_full_pack_never_fails_a_commit() -> R {
    let d = tempfile::tempdir()?;
    let s = ContentStore::open(open_db(d.path()), stress_config(d.path()), true)?;
    // Four appenders, each blob most of a pack: the active pack fills over
    // and over while the others append.
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || -> Result<(), String> {
                for i in 0..40u64 {
                    let data = noise(t * 1000 + i, 700_000);
                    let dg = put(&s, &format!("{t}-{i}"), &data)
                        .map_err(|e| format!("commit {t}-{i}: {e}"))?;
                    if read_all(&s, &dg).map_err(|e| e.to_string())? != data {
                        return Err(format!("blob {t}-{i} read back wrong"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "worker panicked")??;
    }
    Ok(())
}

#[test]
fn a_lost_pack_is_an_error_never_another_blobs_bytes() -> R {
    let d = tempfile::tempdir()?;
    let a = noise(1, 300_000);
    let b = noise(2, 300_000);
    {
        let s = open(d.path());
        put(&s, "a", &a)?;
    }
    // Power loss took the packs' directory entries (they were never synced):
    // the metadata survived, the files did not.
    for e in std::fs::read_dir(d.path().join("content/packs"))? {
        std::fs::remove_file(e?.path())?;
    }
    let s = open(d.path());
    put(&s, "b", &b)?;
    assert_eq!(read_all(&s, &digest(&b))?, b);
    match read_all(&s, &digest(&a)) {
        Err(Error::DataLoss(_)) | Err(Error::NotFound(_)) => {}
        Ok(got) => panic!(
            "blob a's chunks pointed into a new pack: read {} bytes of {}",
            got.len(),
            if got == b { "blob b" } else { "something else" }
        ),
        Err(e) => panic!("expected DataLoss, got {e:?}"),
    }
    Ok(())
}

#[test]
fn a_flipped_byte_in_a_pack_is_an_error_never_data() -> R {
    let d = tempfile::tempdir()?;
    let data = noise(3, 200_000);
    {
        let s = open(d.path());
        put(&s, "a", &data)?;
    }
    let mut flipped = false;
    for e in std::fs::read_dir(d.path().join("content/packs"))? {
        let p = e?.path();
        let mut bytes = std::fs::read(&p)?;
        if let Some(i) = bytes.windows(64).position(|w| w == &data[5000..5064]) {
            bytes[i + 10] ^= 1;
            std::fs::write(&p, bytes)?;
            flipped = true;
        }
    }
    assert!(flipped, "found the blob's bytes in a pack");
    let s = open(d.path());
    let dg = digest(&data);
    // The whole blob, and a small range inside the damaged chunk.
    for (off, len) in [(0i64, 0i64), (5000, 100)] {
        let r = s.read(&dg, off, len, |_, _| true);
        assert!(matches!(r, Err(Error::DataLoss(_))), "{off}+{len}: {r:?}");
    }
    Ok(())
}

#[test]
fn store_files_are_private() -> R {
    let d = tempfile::tempdir()?;
    let s = open(d.path());
    put(&s, "done", &noise(4, 100_000))?;
    let mut w = s.writer("open", 0, "")?;
    w.write(b"partial")?;
    let mode = |p: &std::path::Path| -> std::io::Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
    };
    let content = d.path().join("content");
    assert_eq!(mode(&content)?, 0o700, "{}", content.display());
    let mut files = 0;
    for sub in ["packs", "ingest"] {
        let dir = content.join(sub);
        assert_eq!(mode(&dir)? & 0o077, 0, "{}", dir.display());
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            assert_eq!(
                mode(&p)? & 0o077,
                0,
                "{} is readable by others",
                p.display()
            );
            files += 1;
        }
    }
    assert!(files >= 2);
    Ok(())
}

#[test]
fn the_schema_version_is_written_and_a_newer_one_refused() -> R {
    let d = tempfile::tempdir()?;
    {
        let db = open_db(d.path());
        let _s = ContentStore::open(db.clone(), config(d.path()), true)?;
        let meta = db
            .cf_handle(strata_content::schema::CF_META)
            .ok_or("no content_meta")?;
        let v = db.get_cf(meta, strata_content::schema::SCHEMA_KEY)?;
        assert_eq!(
            v.as_deref(),
            Some(&strata_content::schema::SCHEMA_VERSION.to_be_bytes()[..])
        );
        db.put_cf(
            meta,
            strata_content::schema::SCHEMA_KEY,
            99u64.to_be_bytes(),
        )?;
    }
    let r = ContentStore::open(open_db(d.path()), config(d.path()), true);
    assert!(
        matches!(r, Err(Error::FailedPrecondition(_))),
        "{:?}",
        r.err()
    );
    Ok(())
}

#[test]
fn resuming_an_ingest_with_another_total_is_refused() -> R {
    let d = tempfile::tempdir()?;
    let s = open(d.path());
    let mut w = s.writer("r", 1000, "")?;
    w.write(&[7; 100])?;
    drop(w);
    let r = s.writer("r", 2000, "");
    assert!(
        matches!(r, Err(Error::FailedPrecondition(_))),
        "{:?}",
        r.err()
    );
    // Nothing was lost: the ingest is as it was.
    let st = s.status("r")?;
    assert_eq!((st.offset, st.total), (100, 1000));
    // The same total, or none, resumes.
    assert_eq!(s.writer("r", 0, "")?.status().offset, 100);
    assert_eq!(s.writer("r", 1000, "")?.status().offset, 100);
    Ok(())
}

#[test]
fn chunk_sizes_fastcdc_cannot_take_fail_at_open() -> R {
    let d = tempfile::tempdir()?;
    for (min, avg, max) in [
        (64, 128, 4096),                // average below fastcdc's 256
        (64, 1024, 512),                // maximum below fastcdc's 1024
        (2 << 20, 4 << 20, 8 << 20),    // minimum above fastcdc's 1 MiB
        (64 << 10, 64 << 10, 32 << 20), // maximum above fastcdc's 16 MiB
    ] {
        let mut cfg = config(d.path());
        (cfg.chunk_min, cfg.chunk_avg, cfg.chunk_max) = (min, avg, max);
        let db = open_db(d.path());
        let r = ContentStore::open(db, cfg, true);
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{min}/{avg}/{max}: {:?}",
            r.err()
        );
    }
    Ok(())
}
