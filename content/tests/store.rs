//! The content store driven directly (no gRPC): byte-exact reads, dedup,
//! compression, failed commits, resume across a restart, compaction, fsck.

mod common;

use std::collections::BTreeMap;

use common::{digest, noise, open, put, R};
use strata_content::store::read_all;
use strata_content::Error;

#[test]
fn reads_are_byte_exact_at_any_offset() -> R {
    let d = tempfile::tempdir()?;
    let s = open(d.path());
    let mut data = noise(1, 3 << 20);
    data.extend(std::iter::repeat_n(b"hello strata ".as_slice(), 100_000).flatten());
    let dg = put(&s, "r1", &data)?;
    assert_eq!(dg, digest(&data));
    assert_eq!(read_all(&s, &dg)?, data);
    for (off, len) in [
        (0usize, 1usize),
        (65_535, 70_000),
        (3 << 20, 5),
        (data.len() - 3, 3),
        (12_345, 0),
    ] {
        let mut got = Vec::new();
        s.read(&dg, off as i64, len as i64, |_, p| {
            got.extend_from_slice(p);
            true
        })?;
        let end = if len == 0 { data.len() } else { off + len };
        assert_eq!(got, &data[off..end], "range {off}+{len}");
    }
    assert!(matches!(
        s.read(&dg, data.len() as i64 + 1, 0, |_, _| true),
        Err(Error::OutOfRange(_))
    ));
    // The repetitive tail compressed, the noise did not.
    let st = s.stats()?;
    assert!(st.chunk_stored_bytes < st.logical_bytes, "{st:?}");
    assert!(st.chunk_stored_bytes > 3 << 20, "{st:?}");
    Ok(())
}

#[test]
fn equal_regions_are_stored_once() -> R {
    let d = tempfile::tempdir()?;
    let s = open(d.path());
    let a = noise(2, 4 << 20);
    let mut b = a.clone();
    // A small edit in the middle, and an insertion that shifts the rest.
    b[2 << 20] ^= 0xff;
    b.splice(1 << 20..1 << 20, noise(3, 1000));
    put(&s, "a", &a)?;
    let after_a = s.stats()?;
    let db = put(&s, "b", &b)?;
    let after_b = s.stats()?;
    assert_eq!(read_all(&s, &db)?, b);
    let added = after_b.chunk_stored_bytes - after_a.chunk_stored_bytes;
    assert!(
        added < (1 << 20),
        "a second version with two small edits cost {added} bytes: {after_a:?} {after_b:?}"
    );
    assert_eq!(after_b.logical_bytes, (a.len() + b.len()) as u64);
    Ok(())
}

#[test]
fn failed_commit_keeps_the_ingest_and_resumes_after_restart() -> R {
    let d = tempfile::tempdir()?;
    let data = noise(4, 300_000);
    {
        let s = open(d.path());
        let mut w = s.writer("ref", 0, "")?;
        w.write(&data[..100_000])?;
        let bad = w.commit(0, &digest(b"other"), BTreeMap::new());
        assert!(matches!(bad, Err(Error::FailedPrecondition(_))), "{bad:?}");
        let bad = w.commit(5, "", BTreeMap::new());
        assert!(matches!(bad, Err(Error::FailedPrecondition(_))), "{bad:?}");
        // A second writer on the ref waits, then gives up.
        assert!(matches!(s.writer("ref", 0, ""), Err(Error::Unavailable(_))));
        drop(w);
        assert_eq!(s.status("ref")?.offset, 100_000);
    }
    // Restart: the ingest resumes where it was.
    let s = open(d.path());
    let mut w = s.writer("ref", 0, "")?;
    assert_eq!(w.status().offset, 100_000);
    w.write(&data[100_000..])?;
    let dg = w.commit(data.len() as i64, &digest(&data), BTreeMap::new())?;
    drop(w);
    assert_eq!(read_all(&s, &dg)?, data);
    assert!(matches!(s.status("ref"), Err(Error::NotFound(_))));
    // Committing it again is AlreadyExists, up front.
    assert!(matches!(
        s.writer("x", 0, &dg),
        Err(Error::AlreadyExists(_))
    ));
    Ok(())
}

#[test]
fn compaction_frees_deleted_data_and_keeps_live_blobs_readable() -> R {
    let d = tempfile::tempdir()?;
    let s = open(d.path());
    let shared = noise(5, 3 << 20);
    let mut a = shared.clone();
    a.extend(noise(6, 3 << 20));
    let mut b = shared.clone();
    b.extend(noise(7, 1 << 20));
    let da = put(&s, "a", &a)?;
    let db = put(&s, "b", &b)?;
    let before = s.stats()?;
    s.delete(&da)?;
    assert!(matches!(s.info(&da), Err(Error::NotFound(_))));
    let c = s.compact()?;
    let after = s.stats()?;
    assert!(c.dead_chunks > 0 && c.packs_removed > 0, "{c:?}");
    assert!(
        after.pack_bytes + (2 << 20) < before.pack_bytes,
        "{before:?} -> {after:?}"
    );
    assert_eq!(read_all(&s, &db)?, b);
    // The shared chunks survived; storing `a` again costs only its own part.
    put(&s, "a2", &a)?;
    assert_eq!(read_all(&s, &da)?, a);
    Ok(())
}

#[test]
fn fsck_finds_and_quarantines_damage() -> R {
    let d = tempfile::tempdir()?;
    let good = noise(8, 200_000);
    let bad = noise(9, 200_000);
    {
        let s = open(d.path());
        put(&s, "g", &good)?;
        put(&s, "b", &bad)?;
        assert!(s.fsck(false)?.is_empty());
    }
    // Flip a byte of the second blob in its pack (incompressible: stored raw).
    let packs = d.path().join("content/packs");
    let mut damaged = false;
    for e in std::fs::read_dir(&packs)? {
        let p = e?.path();
        let mut bytes = std::fs::read(&p)?;
        if let Some(i) = bytes.windows(64).position(|w| w == &bad[1000..1064]) {
            bytes[i + 10] ^= 1;
            std::fs::write(&p, bytes)?;
            damaged = true;
        }
    }
    assert!(damaged, "found the blob's bytes in a pack");
    let s = open(d.path());
    let found = s.fsck(true)?;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].digest, digest(&bad));
    assert!(matches!(s.info(&digest(&bad)), Err(Error::NotFound(_))));
    assert_eq!(read_all(&s, &digest(&good))?, good);
    assert!(d
        .path()
        .join("content/quarantine")
        .read_dir()?
        .next()
        .is_some());
    Ok(())
}
