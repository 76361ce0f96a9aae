//! What the machine allows, recorded beside every result: fsync latency,
//! sequential disk bandwidth, files created per second, and one-core
//! SHA-256, gzip (both ways) and zstd speed.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// The machine's limits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Limits {
    /// CPUs online.
    pub cpus: usize,
    /// 4 KiB write + fdatasync, median, µs.
    pub fdatasync_p50_us: f64,
    /// Sequential write incl. fdatasync, MiB/s.
    pub seq_write_mib_s: f64,
    /// Sequential read from disk (page cache dropped for the file), MiB/s.
    pub seq_read_mib_s: f64,
    /// One-core SHA-256, MiB/s.
    pub sha256_mib_s: f64,
    /// One-core gzip (level 6) of text-like data, MiB/s of input.
    pub gzip_mib_s: f64,
    /// One-core zstd (level 3) of text-like data, MiB/s of input.
    pub zstd_mib_s: f64,
    /// One-core gunzip (the build's flate2 backend), MiB/s of output.
    #[serde(default)]
    pub gunzip_mib_s: f64,
    /// Small files (4 KiB) created and written per second, one thread, no
    /// fsync: the entry-creation limit of an unpack.
    #[serde(default)]
    pub creates_per_s: f64,
}

/// Text-like data that compresses about 3:1.
fn texty(len: usize) -> Vec<u8> {
    let words = [
        "layer",
        "snapshot",
        "content",
        "chunk",
        "overlay",
        "digest",
        "containerd",
        "strata",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 8) as usize].as_bytes());
        out.push(if x.is_multiple_of(11) { b'\n' } else { b' ' });
        if x.is_multiple_of(5) {
            out.extend_from_slice(format!("{}", x % 10_000).as_bytes());
        }
    }
    out.truncate(len);
    out
}

fn mib_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

/// Measures the limits, with disk tests in `dir`; `mib` sizes the disk test.
pub fn measure(dir: &Path, mib: usize) -> Result<Limits> {
    let mut l = Limits {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        fdatasync_p50_us: crate::harness::fdatasync_p50(dir)?.as_secs_f64() * 1e6,
        ..Default::default()
    };
    let path = dir.join("seq-probe");
    let block = crate::harness::image::noise(3, 1 << 20);
    let start = Instant::now();
    {
        let mut f = std::fs::File::create(&path)?;
        for _ in 0..mib {
            f.write_all(&block)?;
        }
        f.sync_data()?;
    }
    l.seq_write_mib_s = mib_s(mib << 20, start.elapsed().as_secs_f64());
    {
        let f = std::fs::File::open(&path)?;
        // Drop the file's pages so the read comes from the disk.
        nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )?;
        let mut buf = vec![0u8; 1 << 20];
        let start = Instant::now();
        let mut off = 0u64;
        loop {
            let n = f.read_at(&mut buf, off)?;
            if n == 0 {
                break;
            }
            off += n as u64;
        }
        l.seq_read_mib_s = mib_s(off as usize, start.elapsed().as_secs_f64());
    }
    std::fs::remove_file(&path)?;

    let data = crate::harness::image::noise(4, 64 << 20);
    let start = Instant::now();
    std::hint::black_box(sha2::Sha256::digest(&data));
    l.sha256_mib_s = mib_s(data.len(), start.elapsed().as_secs_f64());
    let text = texty(32 << 20);
    let start = Instant::now();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&text)?;
    std::hint::black_box(gz.finish()?);
    l.gzip_mib_s = mib_s(text.len(), start.elapsed().as_secs_f64());
    let start = Instant::now();
    std::hint::black_box(zstd::bulk::compress(&text, 3)?);
    l.zstd_mib_s = mib_s(text.len(), start.elapsed().as_secs_f64());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&text)?;
    let packed = gz.finish()?;
    let start = Instant::now();
    let mut out = Vec::with_capacity(text.len());
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(packed.as_slice()),
        &mut out,
    )?;
    l.gunzip_mib_s = mib_s(out.len(), start.elapsed().as_secs_f64());
    let files = dir.join("create-probe");
    std::fs::create_dir_all(&files)?;
    let page = [7u8; 4096];
    let n = 5000;
    let start = Instant::now();
    for i in 0..n {
        std::fs::write(files.join(format!("f{i}")), page)?;
    }
    l.creates_per_s = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
    std::fs::remove_dir_all(&files)?;
    Ok(l)
}

/// The limits as lines of text.
pub fn describe(l: &Limits) -> String {
    format!(
        "machine: {} CPUs; fdatasync p50 {:.0} µs; disk write {:.0} MiB/s, read {:.0} MiB/s; \
         {:.0} files created/s; one core: SHA-256 {:.0} MiB/s, gzip-6 {:.0} MiB/s, \
         gunzip {:.0} MiB/s, zstd-3 {:.0} MiB/s\n",
        l.cpus,
        l.fdatasync_p50_us,
        l.seq_write_mib_s,
        l.seq_read_mib_s,
        l.creates_per_s,
        l.sha256_mib_s,
        l.gzip_mib_s,
        l.gunzip_mib_s,
        l.zstd_mib_s
    )
}
