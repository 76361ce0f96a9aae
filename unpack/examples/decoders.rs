//! Single-core decompression throughput of the layer decoders, in MB/s of
//! *uncompressed* output (1 MB = 10^6 bytes).
//!
//! Make a realistic layer once (about 270 MB of tar from /usr/lib and /usr/share):
//!
//! ```sh
//! mkdir -p /var/tmp/unpack-bench && cd /
//! tar --format=pax -cf /var/tmp/unpack-bench/layer.tar usr/lib/python3.11 usr/share/doc \
//!     usr/share/perl usr/lib/x86_64-linux-gnu/perl usr/lib/python3
//! cd /var/tmp/unpack-bench && gzip -6 -k -c layer.tar > layer.tar.gz && zstd -3 -q -f layer.tar -o layer.tar.zst
//! ```
//!
//! then, pinned to one core, once per flate2 backend (flate2 picks zlib-ng over
//! zlib-rs over miniz_oxide, so each run enables exactly one):
//!
//! ```sh
//! for f in gzip-zlib-rs gzip-zlib-ng gzip-miniz; do
//!   taskset -c 1 cargo run --release --example decoders --no-default-features --features $f -- \
//!     /var/tmp/unpack-bench/layer.tar.gz /var/tmp/unpack-bench/layer.tar.zst
//! done
//! ```
//!
//! The compressed blob is read into memory first, so only decoding is timed.
//! Each decoder runs `ROUNDS` times and the best round is reported, both by
//! wall clock and by the thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), which
//! stays meaningful when the machine is shared with another build. `flate2` and `zstd` stream through a 256 KiB output buffer, as
//! the extractor does; `libdeflater` needs the whole blob and the whole output
//! in memory, so it is shown for reference only (it cannot be the streaming
//! default: a layer can be many GB).

use std::io::Read;
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;
const BUF: usize = 256 * 1024;

fn backend() -> &'static str {
    if cfg!(feature = "gzip-zlib-ng") {
        "flate2 (zlib-ng)"
    } else if cfg!(feature = "gzip-zlib-rs") {
        "flate2 (zlib-rs)"
    } else {
        "flate2 (miniz_oxide)"
    }
}

fn drain(mut r: impl Read, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut n = 0u64;
    loop {
        match r.read(buf)? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

fn cpu_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn best(name: &str, mut f: impl FnMut() -> std::io::Result<u64>) -> std::io::Result<()> {
    let mut best = Duration::MAX;
    let mut best_cpu = Duration::MAX;
    let mut out = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let c = cpu_now();
        out = f()?;
        best_cpu = best_cpu.min(cpu_now() - c);
        best = best.min(t.elapsed());
    }
    let mbps = |d: Duration| out as f64 / d.as_secs_f64() / 1e6;
    println!(
        "{name:<24} {:>8.1} MB/s wall {:>8.1} MB/s cpu   ({} MB out, best of {ROUNDS})",
        mbps(best),
        mbps(best_cpu),
        out / 1_000_000,
    );
    Ok(())
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let gz_path = args
        .next()
        .unwrap_or_else(|| "/var/tmp/unpack-bench/layer.tar.gz".into());
    let zst_path = args
        .next()
        .unwrap_or_else(|| "/var/tmp/unpack-bench/layer.tar.zst".into());
    let gz = std::fs::read(&gz_path)?;
    let zst = std::fs::read(&zst_path)?;
    println!(
        "gzip blob {} MB, zstd blob {} MB",
        gz.len() / 1_000_000,
        zst.len() / 1_000_000
    );
    let mut buf = vec![0u8; BUF];

    best(backend(), || {
        drain(
            flate2::bufread::MultiGzDecoder::new(std::io::BufReader::with_capacity(BUF, &gz[..])),
            &mut buf,
        )
    })?;

    best("zstd (streaming)", || {
        drain(zstd::stream::read::Decoder::new(&zst[..])?, &mut buf)
    })?;

    // gzip's ISIZE trailer is the output size mod 2^32; good enough for a
    // single-member test blob below 4 GiB.
    let isize = u32::from_le_bytes([
        gz[gz.len() - 4],
        gz[gz.len() - 3],
        gz[gz.len() - 2],
        gz[gz.len() - 1],
    ]) as usize;
    let mut out = vec![0u8; isize];
    best("libdeflater (in memory)", || {
        let mut d = libdeflater::Decompressor::new();
        let n = d
            .gzip_decompress(&gz, &mut out)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        Ok(n as u64)
    })?;

    // The digest the extractor computes over the uncompressed tar, for scale.
    use sha2::Digest;
    let tar: Vec<u8> = out;
    best("sha256 (diff_id)", || {
        let mut h = sha2::Sha256::new();
        for c in tar.chunks(BUF) {
            h.update(c);
        }
        std::hint::black_box(h.finalize());
        Ok(tar.len() as u64)
    })?;
    Ok(())
}
