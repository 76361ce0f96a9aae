//! Apply one OCI image layer to an empty directory that becomes an overlayfs
//! lower layer, as containerd's walking differ does with the overlayfs
//! snapshotter (`archive.Apply` with `OverlayConvertWhiteout`, containerd 1.6).
//!
//! ```no_run
//! # fn main() -> Result<(), strata_unpack::Error> {
//! let blob = std::fs::File::open("layer.tar.gz").map_err(|e| strata_unpack::Error::Io {
//!     context: "open".into(),
//!     source: e,
//! })?;
//! let report = strata_unpack::apply(blob, "/var/lib/strata/snapshots/7/fs".as_ref(), &Default::default())?;
//! println!("{} {} entries", report.diff_id, report.counts.entries);
//! # Ok(()) }
//! ```
//!
//! # What it does
//!
//! * The reader is the *compressed* blob as stored in the registry. gzip
//!   (`1f 8b`), zstd (`28 b5 2f fd`, or a skippable frame) or plain tar is
//!   told by its first bytes. While extracting, the SHA-256 of the blob (the
//!   layer digest) and of the uncompressed tar (the diff_id, including the
//!   tar's trailing padding) are computed and returned in the [`Report`];
//!   give [`ApplyOptions::expected_digest`] / [`ApplyOptions::expected_diff_id`]
//!   to have them checked.
//! * Entries: regular files (including GNU sparse files, written with holes),
//!   directories, hard links (to an entry already in this layer), symlinks
//!   (created, never followed), character and block devices, fifos. Owner
//!   (numeric uid/gid), xattrs from PAX `SCHILY.xattr.*` records (including
//!   `security.capability`), mode (with setuid, setgid, sticky) and times are
//!   applied in containerd's order: chown, xattrs, chmod, times. Directory
//!   times are set once more at the end, since adding children changes them.
//!   Times before the epoch or after 2262 become the epoch, as in containerd.
//! * OCI whiteouts become overlayfs ones: `.wh.NAME` is a 0/0 character
//!   device `NAME` owned by the entry's uid/gid, `.wh..wh..opq` sets
//!   `trusted.overlay.opaque=y` (or `user.overlay.opaque` with
//!   [`ApplyOptions::userxattr`]) on its directory; other `.wh..wh.` entries
//!   are skipped.
//! * An entry replacing an earlier one of the layer removes it first, unless
//!   both are directories (then the attributes are updated).
//! * Missing parent directories are created 0755 root:root, or with the
//!   owner, mode, times and xattrs of the same directory in the first of
//!   [`ApplyOptions::lower_dirs`] that has it (containerd's `WithParents`).
//!   A layer applied before its lowers are known lists the ones it made in
//!   [`Report::implicit_dirs`], and [`adopt_parents`] fixes them later.
//! * `trusted.*` xattrs in the archive are ignored (containerd refuses them);
//!   so are `user.overlay.*` ones with `userxattr`.
//!
//! # Safety of paths
//!
//! No entry can create, write, chown, chmod or set times on anything outside
//! the target directory. Absolute names, `..` components, names whose parent
//! goes through a symlink (in this layer: `a -> /etc` then `a/passwd`, or
//! `a -> ..`), hard links whose target is absolute, has `..` or goes through a
//! symlink are all refused with [`Error::UnsafeEntry`] naming the entry.
//! Directories are opened with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` and every
//! change is an `*at` call (or an `f*` call on an fd) for one final
//! component that is never followed. This is stricter than containerd, which
//! resolves symlinks *inside* the root (`a -> /etc` then `a/passwd` writes
//! `root/etc/passwd`) and rewrites `..` and absolute names to stay inside:
//! such layers are not made by any image builder, and refusing them is safer.
//! Needs Linux 5.6+ (openat2) and `/proc` (for xattrs on symlinks and device
//! nodes).
//!
//! # Durability
//!
//! Nothing is fsynced, per file or otherwise: the caller calls `syncfs(2)`
//! once on the target directory after `apply` returns, before committing.
//! After an error the directory holds a partial layer: remove it.
//!
//! # Resources
//!
//! Memory is bounded whatever the layer's size: the blob is streamed; PAX and
//! GNU long-name headers are limited to 1 MiB, sparse maps to 2^20
//! fragments; the directory list kept for the final times pass grows with
//! the number of directory entries only. With [`ApplyOptions::pipeline`]
//! (the default) decompression and the blob digest run on a second thread, a
//! few MiB ahead of extraction (which computes the diff_id).
//!
//! The gzip decoder is flate2 with the zlib-rs backend, the fastest streaming
//! decoder measured here (see `examples/decoders.rs`); the `gzip-zlib-ng`
//! and `gzip-miniz` features switch it.

#![deny(missing_docs)]

mod decode;
mod error;
mod extract;
mod tar;

use std::io::{self, BufReader, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use sha2::{Digest, Sha256};

pub use decode::{detect, Compression};
pub use error::{Error, Result};

use decode::{Finished, Stream};
use extract::{tar_error, Extractor};
use tar::TarReader;

/// How to apply a layer.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Mark opaque directories with `user.overlay.opaque` instead of
    /// `trusted.overlay.opaque`, for overlayfs mounted with `userxattr`
    /// (rootless). Also makes `user.overlay.*` xattrs in the archive ignored.
    pub userxattr: bool,
    /// The lower directories of the snapshot being applied to, uppermost
    /// first (overlayfs `lowerdir=` order): a parent directory missing from
    /// the layer is created with the attributes it has in the first of them
    /// (containerd's `archive.WithParents`). Empty for a base layer, or to
    /// use 0755 root:root always.
    pub lower_dirs: Vec<PathBuf>,
    /// If set (`sha256:<hex>`), the digest of the compressed blob must match.
    pub expected_digest: Option<String>,
    /// If set (`sha256:<hex>`), the digest of the uncompressed tar must match.
    pub expected_diff_id: Option<String>,
    /// Decompress (and compute the blob digest) on a second thread, ahead of
    /// extraction (default true). Off: one thread does everything.
    pub pipeline: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            userxattr: false,
            lower_dirs: Vec::new(),
            expected_digest: None,
            expected_diff_id: None,
            pipeline: true,
        }
    }
}

/// What was applied, by kind of entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tar entries (all kinds below, plus skipped ones; not PAX/GNU
    /// extension headers).
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hard links created.
    pub hardlinks: u64,
    /// Character and block devices and fifos created (not whiteouts).
    pub devices: u64,
    /// `.wh.NAME` whiteouts turned into 0/0 character devices.
    pub whiteouts: u64,
    /// `.wh..wh..opq` entries turned into the opaque xattr.
    pub opaques: u64,
    /// Entries ignored: the root itself, other `.wh..wh.` entries, PAX global
    /// headers.
    pub skipped: u64,
}

/// The outcome of [`apply`].
#[derive(Debug, Clone)]
pub struct Report {
    /// How the blob was compressed.
    pub compression: Compression,
    /// `sha256:<hex>` of the blob as read (the layer's descriptor digest).
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar (the layer's diff_id).
    pub diff_id: String,
    /// Bytes read from the caller's reader.
    pub compressed_bytes: u64,
    /// Bytes of uncompressed tar.
    pub uncompressed_bytes: u64,
    /// Entries applied, by kind.
    pub counts: Counts,
    /// File content bytes written (holes of sparse files not counted).
    pub bytes_written: u64,
    /// Time spent waiting on the caller's reader.
    pub read_time: Duration,
    /// Time spent decompressing (not waiting on the reader, not hashing).
    pub decompress_time: Duration,
    /// Time spent computing the two SHA-256 digests.
    pub digest_time: Duration,
    /// Time spent parsing the tar and in file-system calls (not waiting for
    /// decompressed data).
    pub write_time: Duration,
    /// Wall-clock time of the whole call. With `pipeline`, decompression
    /// and writing overlap, so it is less than the sum of the parts.
    pub elapsed: Duration,
    /// Parent directories that no entry of the layer set and no lower
    /// directory had, made 0755 root:root: when the layer was applied
    /// without its lowers, [`adopt_parents`] gives them their attributes
    /// once the lowers are known. Relative paths.
    pub implicit_dirs: Vec<Vec<u8>>,
}

/// For a layer applied into `dir` before its lower layers were known: gives
/// each of `implicit` (its [`Report::implicit_dirs`]) the owner, mode and
/// xattrs of the same directory in the first of `lower_dirs` (uppermost
/// first) that has it, as [`apply`] does for a missing parent when it has
/// the lowers; one that no lower has, made under such a setgid directory,
/// takes its group. A path that is no longer a directory is
/// skipped. Returns how many were changed.
///
/// Not the same as applying with the lowers in three narrow cases: times
/// are not copied (adding children changed the mtime in either case; the
/// atime is the unpack's), a default ACL copied now is not inherited by
/// the children already made, and a directory the archive names only after
/// its children keeps its own xattrs without the lower's.
pub fn adopt_parents(dir: &Path, implicit: &[Vec<u8>], lower_dirs: &[PathBuf]) -> Result<usize> {
    if implicit.is_empty() || lower_dirs.is_empty() {
        return Ok(0);
    }
    let root = open_dir(dir)?;
    let lowers = lower_dirs
        .iter()
        .map(|p| open_dir(p))
        .collect::<Result<Vec<_>>>()?;
    let opts = ApplyOptions::default();
    let ex = Extractor::new(root, lowers, &opts);
    let mut changed = 0;
    // Parents before their children (the paths sort that way), so that a
    // directory made under an adopted setgid one takes its group, as mkdir
    // would have given it had the parent been adopted first.
    let mut sorted: Vec<&Vec<u8>> = implicit.iter().collect();
    sorted.sort();
    for path in sorted {
        let Some(fd) = ex.open_dir_beneath(path)? else {
            continue;
        };
        if ex.copy_from_lower(&fd, path, path, false)? {
            changed += 1;
            continue;
        }
        let parent = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => ex.open_dir_beneath(&path[..i])?,
            None => Some(open_dir(dir)?),
        };
        let Some(parent) = parent else { continue };
        let ps = rustix::fs::fstat(&parent).map_err(|e| {
            Error::io(
                format!("stat of the parent of {}", String::from_utf8_lossy(path)),
                e,
            )
        })?;
        if ps.st_mode & 0o2000 != 0 {
            // (apply sets the mode to 0755 afterwards: no setgid bit.)
            rustix::fs::fchown(&fd, None, Some(rustix::fs::Gid::from_raw(ps.st_gid)))
                .map_err(|e| Error::io(format!("chown of {}", String::from_utf8_lossy(path)), e))?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// Bytes per chunk handed from the decompression thread to the extractor.
const CHUNK: usize = 1 << 20;
/// Chunks in flight between the threads (memory: about this many MiB + 2).
const CHUNKS_IN_FLIGHT: usize = 4;

/// Applies the layer in `reader` (the compressed blob) to `dir`, which should
/// be empty (hard links may only point at entries of this layer).
///
/// `reader` is read on a second thread when [`ApplyOptions::pipeline`] is
/// set, hence `Send`; wrap a slow source in a `BufReader` or not, as it
/// comes (the blob is buffered 128 KiB at a time here).
///
/// Does not fsync: call `syncfs` on `dir` once afterwards. On error, `dir`
/// holds a partial layer that the caller must remove; nothing outside `dir`
/// was changed. See the [crate documentation](crate) for the rules.
pub fn apply<R: Read + Send>(reader: R, dir: &Path, opts: &ApplyOptions) -> Result<Report> {
    let start = Instant::now();
    let root = open_dir(dir)?;
    let lowers = opts
        .lower_dirs
        .iter()
        .map(|p| open_dir(p))
        .collect::<Result<Vec<_>>>()?;
    let mut ex = Extractor::new(root, lowers, opts);

    let (finished, write_time) = if opts.pipeline {
        pipelined(reader, &mut ex)?
    } else {
        let stream = Stream::new(reader, true)?;
        let mut tar = TarReader::new(BufReader::with_capacity(64 * 1024, stream));
        ex.run(&mut tar)?;
        let finished = tar.into_inner().into_inner().finish()?;
        let s = finished.stats;
        let write = start
            .elapsed()
            .saturating_sub(s.read_time + s.decode_total + s.digest_time);
        (finished, write)
    };

    let s = finished.stats;
    let report = Report {
        compression: finished.compression,
        digest: finished.digest,
        diff_id: finished.diff_id.unwrap_or_default(),
        compressed_bytes: s.compressed_bytes,
        uncompressed_bytes: s.uncompressed_bytes,
        counts: ex.counts,
        bytes_written: ex.bytes_written,
        read_time: s.read_time,
        decompress_time: s.decode_total,
        digest_time: s.digest_time,
        write_time,
        elapsed: start.elapsed(),
        implicit_dirs: ex.implicit.into_iter().collect(),
    };
    check_digest("digest", opts.expected_digest.as_deref(), &report.digest)?;
    check_digest("diff_id", opts.expected_diff_id.as_deref(), &report.diff_id)?;
    tracing::debug!(
        dir = %dir.display(),
        digest = %report.digest,
        diff_id = %report.diff_id,
        compression = %report.compression,
        entries = report.counts.entries,
        bytes = report.bytes_written,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "layer applied"
    );
    Ok(report)
}

fn check_digest(what: &'static str, expected: Option<&str>, actual: &str) -> Result<()> {
    match expected {
        Some(e) if !e.eq_ignore_ascii_case(actual) => Err(Error::DigestMismatch {
            what,
            expected: e.to_string(),
            actual: actual.to_string(),
        }),
        _ => Ok(()),
    }
}

fn open_dir(p: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(format!("opening directory {}", p.display()), e))
}

enum Msg {
    Data(Vec<u8>, usize),
    Err(io::Error),
    End,
}

/// The extractor's side of the pipeline.
struct ChannelReader {
    rx: Receiver<Msg>,
    back: Sender<Vec<u8>>,
    cur: Vec<u8>,
    len: usize,
    pos: usize,
    end: bool,
    failed: bool,
    wait: Duration,
    /// The diff_id is computed here, on the extracting thread, which has
    /// less to do than the decompressing one.
    hasher: Sha256,
    hash_time: Duration,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.len {
            if self.end {
                return Ok(0);
            }
            if self.failed {
                return Err(io::Error::other("decompression failed earlier"));
            }
            let spent = std::mem::take(&mut self.cur);
            if spent.capacity() > 0 {
                // The decoder may be gone already; then the buffer is dropped.
                let _ = self.back.send(spent);
            }
            let t = Instant::now();
            let msg = self.rx.recv();
            self.wait += t.elapsed();
            match msg {
                Ok(Msg::Data(v, n)) => {
                    let t = Instant::now();
                    self.hasher.update(&v[..n]);
                    self.hash_time += t.elapsed();
                    self.cur = v;
                    self.len = n;
                    self.pos = 0;
                }
                Ok(Msg::Err(e)) => {
                    self.failed = true;
                    return Err(e);
                }
                Ok(Msg::End) => self.end = true,
                Err(_) => {
                    self.failed = true;
                    return Err(io::Error::other("the decompression thread stopped"));
                }
            }
        }
        let n = buf.len().min(self.len - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The decompression thread: `Err(None)` when the error went down the
/// channel to the extractor (or the extractor hung up).
fn decode_thread<R: Read>(
    reader: R,
    tx: SyncSender<Msg>,
    back: Receiver<Vec<u8>>,
) -> std::result::Result<Finished, Option<Error>> {
    let mut stream = Stream::new(reader, false).map_err(Some)?;
    loop {
        let mut buf = back.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
        let mut n = 0;
        while n < buf.len() {
            match stream.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Msg::Err(e));
                    return Err(None);
                }
            }
        }
        if n == 0 {
            break;
        }
        if tx.send(Msg::Data(buf, n)).is_err() {
            return Err(None);
        }
    }
    let _ = tx.send(Msg::End);
    drop(tx);
    stream.finish().map_err(Some)
}

fn pipelined<R: Read + Send>(reader: R, ex: &mut Extractor<'_>) -> Result<(Finished, Duration)> {
    let (tx, rx) = mpsc::sync_channel::<Msg>(CHUNKS_IN_FLIGHT);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let decoder = std::thread::Builder::new()
            .name("layer-decode".into())
            .spawn_scoped(s, move || decode_thread(reader, tx, back_rx))
            .map_err(|e| Error::io("starting the decompression thread", e))?;
        let t = Instant::now();
        let mut tar = TarReader::new(ChannelReader {
            rx,
            back: back_tx,
            cur: Vec::new(),
            len: 0,
            pos: 0,
            end: false,
            failed: false,
            wait: Duration::ZERO,
            hasher: Sha256::new(),
            hash_time: Duration::ZERO,
        });
        let mut result = ex.run(&mut tar);
        let mut chan = tar.into_inner();
        if result.is_ok() {
            // The rest of the stream (padding, trailing data) must decode.
            let mut sink = [0u8; 8192];
            loop {
                match chan.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(tar_error(
                            tar::TarError::Io(e, "reading past the end of the archive".into()),
                            None,
                        ));
                        break;
                    }
                }
            }
        }
        let write_time = t.elapsed().saturating_sub(chan.wait + chan.hash_time);
        let diff_id = decode::hex_digest(chan.hasher.clone());
        let hash_time = chan.hash_time;
        // Hang up first, so a decoder blocked on a full channel stops.
        drop(chan);
        let joined = decoder
            .join()
            .map_err(|_| Error::Format("the decompression thread panicked".into()))?;
        match (result, joined) {
            (Ok(()), Ok(mut f)) => {
                f.diff_id = Some(diff_id);
                f.stats.digest_time += hash_time;
                Ok((f, write_time))
            }
            // The decoder's own error is the root cause.
            (_, Err(Some(e))) => Err(e),
            (Err(e), _) => Err(e),
            (Ok(()), Err(None)) => Err(Error::Format(
                "decompression stopped before the end of the stream".into(),
            )),
        }
    })
}
