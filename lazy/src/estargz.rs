//! eStargz, as stargz-snapshotter's `ctr-remote image convert --estargz`,
//! nerdctl and BuildKit write it.
//!
//! An eStargz layer is an ordinary gzip layer (any tool can unpack it) made
//! of many gzip members: each regular file's contents, or each chunk of a
//! large one, starts a member of its own, so it can be fetched with one HTTP
//! range request and decompressed alone. At the end:
//!
//! - the TOC: one gzip member holding a tar with one file,
//!   `stargz.index.json`, which lists every entry (type, mode, owner, mtime,
//!   xattrs, link target) and, for file data, where each chunk's member
//!   starts (`offset`), which part of the file it holds (`chunkOffset`,
//!   `chunkSize`) and the SHA-256 of its uncompressed bytes (`chunkDigest`);
//! - the footer: an empty gzip member whose Extra field says where the TOC
//!   starts (`%016xSTARGZ`; 51 bytes, or 47 in the legacy stargz layout).
//!
//! The SHA-256 of the TOC JSON is the layer's
//! `containerd.io/snapshot/stargz/toc.digest` annotation in the image
//! manifest: [`Toc::parse`] checks it, and [`Toc::decode_chunk`] checks each
//! chunk against its `chunkDigest`, so nothing that is served was not
//! verified through the manifest.
//!
//! [`Toc`] is the layer as a tree of [`Node`]s in the form overlayfs wants
//! for a lower layer: OCI whiteouts (`.wh.NAME`) become 0/0 character
//! devices, `.wh..wh..opq` marks its directory opaque, and the landmark
//! files (`.prefetch.landmark`, `.no.prefetch.landmark`) are not shown but
//! tell which files to prefetch.

use std::collections::BTreeMap;
use std::io::Read;

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// The layer annotation (and Prepare label) holding the TOC JSON's digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The TOC's name in its tar.
pub const TOC_NAME: &str = "stargz.index.json";
/// The eStargz footer's size.
pub const FOOTER_SIZE: u64 = 51;
/// The legacy stargz footer's size.
pub const LEGACY_FOOTER_SIZE: u64 = 47;
/// Files before this landmark are prefetched.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// This landmark says: prefetch nothing.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The largest TOC JSON accepted (decompressed).
pub const MAX_TOC_BYTES: u64 = 256 << 20;
/// The largest chunk accepted (decompressed).
pub const MAX_CHUNK_BYTES: u64 = 64 << 20;
/// The largest compressed TOC member accepted.
pub const MAX_TOC_GZ_BYTES: u64 = 64 << 20;

/// The most compressed bytes a chunk of `size` bytes may span in the blob:
/// its gzip member (deflate stores incompressible data with 5 bytes per
/// 64 KiB block), plus the tar headers of the entries that follow it up to
/// the next data.
pub fn max_compressed_span(size: u64) -> u64 {
    size + size / 64 + (4 << 20)
}

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";

/// What is wrong with a blob that should be eStargz.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No eStargz footer: an ordinary layer (or a damaged one).
    #[error("not eStargz: {0}")]
    NotEstargz(String),
    /// The TOC is malformed.
    #[error("eStargz TOC: {0}")]
    Toc(String),
    /// The TOC is not the one the manifest names.
    #[error("eStargz TOC digest is {actual}, the manifest says {expected}")]
    TocDigest {
        /// From the manifest annotation.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// A chunk's bytes are not what the TOC says.
    #[error("chunk at {offset} of {path:?}: {msg}")]
    Chunk {
        /// The file.
        path: String,
        /// Offset in the file.
        offset: u64,
        /// What is wrong.
        msg: String,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Where the TOC is, from the footer at the end of the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the TOC's gzip member.
    pub toc_offset: u64,
    /// The footer's size ([`FOOTER_SIZE`] or [`LEGACY_FOOTER_SIZE`]).
    pub size: u64,
}

impl Footer {
    /// Parses the footer from the last bytes of a blob of `blob_size`
    /// bytes (`tail` holds at least the last [`FOOTER_SIZE`] bytes, or the
    /// whole blob if it is shorter).
    pub fn parse(tail: &[u8], blob_size: u64) -> Result<Footer> {
        let at = |size: u64| -> Option<&[u8]> {
            let size = usize::try_from(size).ok()?;
            (tail.len() >= size).then(|| &tail[tail.len() - size..])
        };
        let check = |toc_offset: u64, size: u64| -> Result<Footer> {
            if toc_offset >= blob_size.saturating_sub(size) {
                return Err(Error::NotEstargz(format!(
                    "footer puts the TOC at {toc_offset}, past the blob's {blob_size} bytes"
                )));
            }
            Ok(Footer { toc_offset, size })
        };
        if let Some(f) = at(FOOTER_SIZE) {
            if let Some(extra) = gzip_extra(f) {
                // SI1 'S', SI2 'G', LEN 22, then %016xSTARGZ.
                if extra.len() == 26 && &extra[..2] == b"SG" && extra[2..4] == [22, 0] {
                    if let Some(off) = stargz_offset(&extra[4..]) {
                        return check(off, FOOTER_SIZE);
                    }
                }
            }
        }
        if let Some(f) = at(LEGACY_FOOTER_SIZE) {
            if let Some(extra) = gzip_extra(f) {
                if let Some(off) = stargz_offset(extra) {
                    return check(off, LEGACY_FOOTER_SIZE);
                }
            }
        }
        Err(Error::NotEstargz(
            "no eStargz footer at the end of the blob".into(),
        ))
    }
}

/// The Extra field of the gzip member header at the start of `b`.
fn gzip_extra(b: &[u8]) -> Option<&[u8]> {
    // ID1 ID2 CM FLG MTIME(4) XFL OS XLEN(2) EXTRA
    if b.len() < 12 || b[0] != 0x1f || b[1] != 0x8b || b[2] != 8 || b[3] & 4 == 0 {
        return None;
    }
    let xlen = usize::from(u16::from_le_bytes([b[10], b[11]]));
    b.get(12..12 + xlen)
}

/// `%016xSTARGZ` → the offset.
fn stargz_offset(s: &[u8]) -> Option<u64> {
    if s.len() != 22 || &s[16..] != b"STARGZ" {
        return None;
    }
    let hex = std::str::from_utf8(&s[..16]).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

/// What kind of entry a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
    /// An overlayfs whiteout (a 0/0 character device), from `.wh.NAME`.
    Whiteout,
}

/// One piece of a file's contents, in its own gzip member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where it starts in the file.
    pub file_offset: u64,
    /// Its uncompressed size.
    pub size: u64,
    /// Where its gzip member starts in the blob.
    pub blob_offset: u64,
    /// Where the next entry's data starts (or the TOC): the compressed
    /// range to fetch is `blob_offset..blob_end`.
    pub blob_end: u64,
    /// SHA-256 of its uncompressed bytes.
    pub digest: [u8; 32],
}

/// A file, directory or other entry of the layer.
#[derive(Debug, Clone)]
pub struct Node {
    /// The index of its parent (the root is its own parent).
    pub parent: usize,
    /// Its name in its parent.
    pub name: String,
    /// Its kind.
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Size: file contents, or a symlink's target length.
    pub size: u64,
    /// A symlink's target.
    pub link: String,
    /// Device numbers.
    pub dev: (u32, u32),
    /// Extended attributes (an opaque directory has overlayfs's too).
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Children by name (directories).
    pub children: BTreeMap<String, usize>,
    /// Contents (regular files), in file order, covering `0..size`.
    pub chunks: Vec<Chunk>,
    /// Names that refer to it (hard links).
    pub nlink: u32,
    /// A directory no entry of the layer names (a parent of one that is):
    /// it takes its attributes from the lower layers ([`Toc::adopt_parents`]).
    pub implicit: bool,
}

/// A lower layer's directory, as [`Toc::adopt_parents`] copies it.
#[derive(Debug, Clone, Default)]
pub struct DirAttrs {
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Extended attributes (not `trusted.*`).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Node {
    fn new(parent: usize, name: String, kind: Kind) -> Node {
        Node {
            parent,
            name,
            kind,
            mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: String::new(),
            dev: (0, 0),
            xattrs: BTreeMap::new(),
            children: BTreeMap::new(),
            chunks: Vec::new(),
            nlink: 1,
            implicit: false,
        }
    }
}

/// The TOC JSON, as written.
#[derive(Debug, Deserialize)]
struct TocJson {
    #[serde(default)]
    version: i64,
    entries: Vec<EntryJson>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EntryJson {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    size: i64,
    #[serde(default, rename = "modtime")]
    mod_time: Option<String>,
    #[serde(default)]
    link_name: String,
    #[serde(default)]
    mode: i64,
    #[serde(default)]
    uid: i64,
    #[serde(default)]
    gid: i64,
    #[serde(default)]
    offset: i64,
    #[serde(default)]
    dev_major: i64,
    #[serde(default)]
    dev_minor: i64,
    #[serde(default)]
    xattrs: BTreeMap<String, String>,
    #[serde(default)]
    chunk_offset: i64,
    #[serde(default)]
    chunk_size: i64,
    #[serde(default)]
    chunk_digest: String,
}

/// A parsed, checked TOC: the layer's tree.
#[derive(Debug, Clone)]
pub struct Toc {
    /// Every node; index 0 is the root. Hard links share a node.
    pub nodes: Vec<Node>,
    /// Where the TOC starts in the blob (the end of the data).
    pub toc_offset: u64,
    /// The TOC JSON's digest (`sha256:<hex>`).
    pub digest: String,
    /// Files whose data starts before this blob offset are the ones to
    /// fetch before the mount is ready (`.prefetch.landmark`); 0 if none.
    pub prefetch_end: u64,
    /// How many chunks the layer has.
    pub chunk_count: usize,
}

fn toc_err(msg: impl Into<String>) -> Error {
    Error::Toc(msg.into())
}

/// Reads the one file of a tar (the TOC's), checking its name.
fn toc_json_from_tar(tar: &[u8]) -> Result<&[u8]> {
    let h = tar
        .get(..512)
        .ok_or_else(|| toc_err("the TOC tar is shorter than a header"))?;
    let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
    let name = &h[..name_end];
    if name != TOC_NAME.as_bytes() {
        return Err(toc_err(format!(
            "the TOC tar holds {:?}, not {TOC_NAME}",
            String::from_utf8_lossy(name)
        )));
    }
    if !matches!(h[156], b'0' | 0) {
        return Err(toc_err("the TOC tar entry is not a regular file"));
    }
    let size_field = &h[124..136];
    let size = if size_field[0] & 0x80 != 0 {
        // base-256
        size_field[1..]
            .iter()
            .try_fold(0u64, |acc, &b| {
                acc.checked_mul(256)?.checked_add(u64::from(b))
            })
            .ok_or_else(|| toc_err("TOC size overflows"))?
    } else {
        let s = std::str::from_utf8(size_field)
            .map_err(|_| toc_err("TOC size is not octal"))?
            .trim_matches(|c: char| c == '\0' || c == ' ');
        u64::from_str_radix(if s.is_empty() { "0" } else { s }, 8)
            .map_err(|_| toc_err("TOC size is not octal"))?
    };
    let end = 512u64
        .checked_add(size)
        .and_then(|e| usize::try_from(e).ok())
        .filter(|&e| e <= tar.len())
        .ok_or_else(|| toc_err("the TOC tar is shorter than its entry"))?;
    Ok(&tar[512..end])
}

/// `name` as a clean relative path: no leading `./` or `/`, no trailing
/// `/`, no `.` or empty components; `..` is refused.
fn clean_name(name: &str) -> Result<String> {
    let mut parts = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(toc_err(format!("entry {name:?} has a '..' component"))),
            c => parts.push(c),
        }
    }
    if name.contains('\0') {
        return Err(toc_err(format!("entry {name:?} has a NUL")));
    }
    Ok(parts.join("/"))
}

/// An RFC 3339 time (`2006-01-02T15:04:05Z`, optional fraction and
/// offset) as seconds since the epoch.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        rest = &r[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        r if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) => {
            let oh: i64 = r.get(1..3)?.parse().ok()?;
            let om: i64 = r.get(4..6)?.parse().ok()?;
            let o = oh * 3600 + om * 60;
            if r.starts_with('-') {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se - offset)
}

fn non_negative(v: i64, what: &str, name: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| toc_err(format!("entry {name:?}: negative {what} {v}")))
}

fn id(v: i64, what: &str, name: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| toc_err(format!("entry {name:?}: {what} {v} out of range")))
}

/// SHA-256 digest text → bytes.
fn parse_sha256(d: &str) -> Option<[u8; 32]> {
    parse_hex32(d.strip_prefix("sha256:")?)
}

/// 64 hex digits → 32 bytes.
pub(crate) fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Bytes → lowercase hex.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Toc {
    /// Parses the TOC from its gzip member (`toc_gz`, the blob's bytes from
    /// `footer.toc_offset` to the footer), checking its digest against
    /// `expected` (the manifest's annotation) when given.
    pub fn parse(toc_gz: &[u8], footer: Footer, expected: Option<&str>) -> Result<Toc> {
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(toc_gz)
            .take(MAX_TOC_BYTES + 1024)
            .read_to_end(&mut tar)
            .map_err(|e| toc_err(format!("gunzip: {e}")))?;
        if tar.len() as u64 > MAX_TOC_BYTES {
            return Err(toc_err(format!("larger than {MAX_TOC_BYTES} bytes")));
        }
        let json = toc_json_from_tar(&tar)?;
        let digest = format!("sha256:{}", hex(&Sha256::digest(json)));
        if let Some(e) = expected {
            if !e.eq_ignore_ascii_case(&digest) {
                return Err(Error::TocDigest {
                    expected: e.to_string(),
                    actual: digest,
                });
            }
        }
        let parsed: TocJson =
            serde_json::from_slice(json).map_err(|e| toc_err(format!("JSON: {e}")))?;
        if parsed.version != 1 {
            return Err(toc_err(format!("version {} (1 is known)", parsed.version)));
        }
        let mut toc = Toc::build(parsed.entries, footer.toc_offset)?;
        toc.digest = digest;
        Ok(toc)
    }

    fn build(entries: Vec<EntryJson>, toc_offset: u64) -> Result<Toc> {
        let mut root = Node::new(0, String::new(), Kind::Dir);
        root.nlink = 2;
        let mut t = Toc {
            nodes: vec![root],
            toc_offset,
            digest: String::new(),
            prefetch_end: 0,
            chunk_count: 0,
        };
        // Blob offsets of data, in order, to find where each chunk ends.
        let mut offsets: Vec<u64> = Vec::new();
        let mut last_file: Option<usize> = None;
        let mut no_prefetch = false;
        for e in entries {
            if e.kind == "chunk" {
                let node = last_file.ok_or_else(|| toc_err("a chunk entry before any file"))?;
                let n = &t.nodes[node];
                let off = non_negative(e.chunk_offset, "chunkOffset", &n.name)?;
                let size = match non_negative(e.chunk_size, "chunkSize", &n.name)? {
                    0 => n.size.saturating_sub(off),
                    s => s,
                };
                let chunk = t.chunk(&e, node, off, size)?;
                offsets.push(chunk.blob_offset);
                t.nodes[node].chunks.push(chunk);
                continue;
            }
            let path = clean_name(&e.name)?;
            if path.is_empty() {
                // The root itself ("./").
                if e.kind == "dir" {
                    t.set_meta(0, &e, &path)?;
                }
                continue;
            }
            let (dir, base) = match path.rsplit_once('/') {
                Some((d, b)) => (t.dir(d)?, b.to_string()),
                None => (0, path.clone()),
            };
            last_file = None;
            if dir == 0 && (base == PREFETCH_LANDMARK || base == NO_PREFETCH_LANDMARK) {
                let off = non_negative(e.offset, "offset", &path)?;
                if off >= toc_offset {
                    return Err(toc_err(format!(
                        "landmark {path:?} at {off}, past the data (TOC at {toc_offset})"
                    )));
                }
                if base == NO_PREFETCH_LANDMARK {
                    no_prefetch = true;
                } else if !no_prefetch {
                    t.prefetch_end = off;
                }
                if off > 0 {
                    offsets.push(off);
                }
                continue;
            }
            if base == WHITEOUT_OPAQUE {
                t.nodes[dir]
                    .xattrs
                    .insert("trusted.overlay.opaque".into(), b"y".to_vec());
                continue;
            }
            if base.starts_with(WHITEOUT_META_PREFIX) {
                continue;
            }
            if let Some(target) = base.strip_prefix(WHITEOUT_PREFIX) {
                if matches!(target, "" | "." | "..") {
                    return Err(toc_err(format!("entry {path:?}: invalid whiteout name")));
                }
                let mut n = Node::new(dir, target.to_string(), Kind::Whiteout);
                n.mode = 0;
                n.uid = id(e.uid, "uid", &path)?;
                n.gid = id(e.gid, "gid", &path)?;
                t.insert(dir, n);
                continue;
            }
            if e.kind == "hardlink" {
                let target = clean_name(&e.link_name)?;
                let idx = t
                    .lookup(&target)
                    .ok_or_else(|| toc_err(format!("hard link {path:?} to missing {target:?}")))?;
                if t.nodes[idx].kind == Kind::Dir {
                    return Err(toc_err(format!("hard link {path:?} to a directory")));
                }
                t.nodes[idx].nlink += 1;
                t.remove_child(dir, &base);
                t.nodes[dir].children.insert(base, idx);
                continue;
            }
            let kind = match e.kind.as_str() {
                "dir" => Kind::Dir,
                "reg" => Kind::File,
                "symlink" => Kind::Symlink,
                "char" => Kind::Char,
                "block" => Kind::Block,
                "fifo" => Kind::Fifo,
                k => return Err(toc_err(format!("entry {path:?}: unknown type {k:?}"))),
            };
            // A directory named again keeps its children.
            let existing = t.nodes[dir].children.get(&base).copied();
            let idx = match existing {
                Some(i) if kind == Kind::Dir && t.nodes[i].kind == Kind::Dir => i,
                _ => {
                    let mut n = Node::new(dir, base.clone(), kind);
                    if kind == Kind::Dir {
                        n.nlink = 2;
                    }
                    t.insert(dir, n)
                }
            };
            t.set_meta(idx, &e, &path)?;
            match kind {
                Kind::File => {
                    let size = non_negative(e.size, "size", &path)?;
                    t.nodes[idx].size = size;
                    if size > 0 {
                        let first = match non_negative(e.chunk_size, "chunkSize", &path)? {
                            0 => size,
                            s => s.min(size),
                        };
                        let chunk = t.chunk(&e, idx, 0, first)?;
                        offsets.push(chunk.blob_offset);
                        t.nodes[idx].chunks.push(chunk);
                        last_file = Some(idx);
                    }
                }
                Kind::Symlink => {
                    t.nodes[idx].link = e.link_name.clone();
                    t.nodes[idx].size = e.link_name.len() as u64;
                }
                Kind::Char | Kind::Block => {
                    t.nodes[idx].dev = (
                        id(e.dev_major, "devMajor", &path)?,
                        id(e.dev_minor, "devMinor", &path)?,
                    );
                }
                _ => {}
            }
        }
        if no_prefetch {
            t.prefetch_end = 0;
        }
        // Each chunk's member ends where the next data starts, or at the TOC.
        offsets.sort_unstable();
        offsets.dedup();
        for n in &mut t.nodes {
            for c in &mut n.chunks {
                let i = offsets.partition_point(|&o| o <= c.blob_offset);
                c.blob_end = offsets.get(i).copied().unwrap_or(toc_offset);
            }
        }
        // Every file's chunks cover it exactly, in order.
        for n in &t.nodes {
            if n.kind != Kind::File {
                continue;
            }
            let mut at = 0;
            for c in &n.chunks {
                if c.blob_end - c.blob_offset > max_compressed_span(c.size) {
                    return Err(toc_err(format!(
                        "file {:?}: chunk at {} spans {} compressed bytes for {} bytes of data",
                        n.name,
                        c.file_offset,
                        c.blob_end - c.blob_offset,
                        c.size
                    )));
                }
                if c.file_offset != at || c.size == 0 || c.size > MAX_CHUNK_BYTES {
                    return Err(toc_err(format!(
                        "file {:?}: chunk at {} of {} bytes does not follow {at}",
                        n.name, c.file_offset, c.size
                    )));
                }
                at += c.size;
            }
            if at != n.size {
                return Err(toc_err(format!(
                    "file {:?}: chunks cover {at} of its {} bytes",
                    n.name, n.size
                )));
            }
            t.chunk_count += n.chunks.len();
        }
        Ok(t)
    }

    fn chunk(&self, e: &EntryJson, node: usize, file_offset: u64, size: u64) -> Result<Chunk> {
        let name = &self.nodes[node].name;
        let blob_offset = non_negative(e.offset, "offset", name)?;
        if blob_offset == 0 || blob_offset >= self.toc_offset {
            return Err(toc_err(format!(
                "file {name:?}: data offset {blob_offset} outside the blob's data"
            )));
        }
        let digest = parse_sha256(&e.chunk_digest).ok_or_else(|| {
            toc_err(format!(
                "file {name:?}: chunk at {file_offset} has no valid chunkDigest ({:?})",
                e.chunk_digest
            ))
        })?;
        Ok(Chunk {
            file_offset,
            size,
            blob_offset,
            blob_end: self.toc_offset,
            digest,
        })
    }

    fn set_meta(&mut self, idx: usize, e: &EntryJson, path: &str) -> Result<()> {
        let mut xattrs = BTreeMap::new();
        for (k, v) in &e.xattrs {
            // As containerd's unpack: a layer may not set trusted.* (an
            // overlayfs redirect or opaque of its own making).
            if k.starts_with("trusted.") {
                tracing::debug!(entry = path, xattr = %k, "trusted.* xattr in a layer ignored");
                continue;
            }
            let v = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|err| toc_err(format!("entry {path:?}: xattr {k}: {err}")))?;
            xattrs.insert(k.clone(), v);
        }
        let n = &mut self.nodes[idx];
        n.implicit = false;
        // Only permission, setuid, setgid and sticky bits.
        n.mode = u32::try_from(e.mode & 0o7777).unwrap_or(0);
        n.uid = id(e.uid, "uid", path)?;
        n.gid = id(e.gid, "gid", path)?;
        n.mtime = e
            .mod_time
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| {
                parse_rfc3339(s).ok_or_else(|| toc_err(format!("entry {path:?}: modtime {s:?}")))
            })
            .transpose()?
            .unwrap_or(0);
        // An opaque marker seen before the directory's own entry stays.
        let opaque = n.xattrs.remove("trusted.overlay.opaque");
        n.xattrs = xattrs;
        if let Some(o) = opaque {
            n.xattrs.insert("trusted.overlay.opaque".into(), o);
        }
        Ok(())
    }

    /// Adds `n` under `dir`, replacing an entry of the same name.
    fn insert(&mut self, dir: usize, n: Node) -> usize {
        let name = n.name.clone();
        let is_dir = n.kind == Kind::Dir;
        self.remove_child(dir, &name);
        self.nodes.push(n);
        let idx = self.nodes.len() - 1;
        self.nodes[dir].children.insert(name, idx);
        if is_dir {
            self.nodes[dir].nlink += 1;
        }
        idx
    }

    fn remove_child(&mut self, dir: usize, name: &str) {
        if let Some(old) = self.nodes[dir].children.remove(name) {
            let o = &mut self.nodes[old];
            o.nlink = o.nlink.saturating_sub(1);
            if o.kind == Kind::Dir {
                self.nodes[dir].nlink = self.nodes[dir].nlink.saturating_sub(1);
            }
        }
    }

    /// The directory at `path`, made (0755, root) where the TOC has none.
    fn dir(&mut self, path: &str) -> Result<usize> {
        let mut cur = 0;
        for c in path.split('/') {
            cur = match self.nodes[cur].children.get(c).copied() {
                Some(i) if self.nodes[i].kind == Kind::Dir => i,
                Some(_) => {
                    return Err(toc_err(format!(
                        "{path:?}: {c:?} is not a directory but has entries"
                    )))
                }
                None => {
                    let mut n = Node::new(cur, c.to_string(), Kind::Dir);
                    n.nlink = 2;
                    n.implicit = true;
                    self.insert(cur, n)
                }
            };
        }
        Ok(cur)
    }

    /// Gives the directories no entry names ([`Node::implicit`]) the
    /// attributes of the same directory in the lower layers, as
    /// containerd's unpack does for a missing parent (`WithParents`):
    /// `lower(path)` is the first lower layer's directory at `path`, or
    /// `None` (none has it, or one has something else there). One that no
    /// lower has, under a setgid directory, takes that directory's group.
    /// Returns how many changed.
    pub fn adopt_parents(&mut self, lower: impl Fn(&str) -> Option<DirAttrs>) -> usize {
        let mut changed = 0;
        // Parents come before their children in `nodes`.
        for i in 1..self.nodes.len() {
            if !self.nodes[i].implicit || self.nodes[i].kind != Kind::Dir {
                continue;
            }
            let path = self.path(i);
            let parent = self.nodes[i].parent;
            let (pmode, pgid) = (self.nodes[parent].mode, self.nodes[parent].gid);
            let n = &mut self.nodes[i];
            match lower(&path) {
                Some(a) => {
                    n.mode = a.mode & 0o7777;
                    n.uid = a.uid;
                    n.gid = a.gid;
                    let opaque = n.xattrs.remove("trusted.overlay.opaque");
                    n.xattrs = a
                        .xattrs
                        .into_iter()
                        .filter(|(k, _)| !k.starts_with("trusted."))
                        .collect();
                    if let Some(o) = opaque {
                        n.xattrs.insert("trusted.overlay.opaque".into(), o);
                    }
                    changed += 1;
                }
                None if pmode & 0o2000 != 0 => {
                    n.gid = pgid;
                    changed += 1;
                }
                None => {}
            }
        }
        changed
    }

    /// What a walk of the mounted layer counts (containerd's
    /// `fs.DiskUsage`): 512-byte blocks of every node reachable from the
    /// root, hard links once, and their number; from the tree, without a
    /// walk through FUSE.
    pub fn usage(&self) -> (u64, u64) {
        let mut seen = vec![false; self.nodes.len()];
        let (mut bytes, mut inodes) = (0u64, 0u64);
        let mut stack = vec![0usize];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            let n = &self.nodes[i];
            inodes += 1;
            bytes += n.size.div_ceil(512) * 512;
            stack.extend(n.children.values().copied());
        }
        (bytes, inodes)
    }

    /// The node at a clean relative path.
    pub fn lookup(&self, path: &str) -> Option<usize> {
        let mut cur = 0;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            cur = *self.nodes[cur].children.get(c)?;
        }
        Some(cur)
    }

    /// The compressed bytes of `chunk` (`blob[chunk.blob_offset..
    /// chunk.blob_end]`) decompressed and checked against its digest.
    pub fn decode_chunk(&self, path: &str, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>> {
        let err = |msg: String| Error::Chunk {
            path: path.to_string(),
            offset: chunk.file_offset,
            msg,
        };
        let size = usize::try_from(chunk.size).map_err(|_| err("too large".into()))?;
        let mut out = vec![0u8; size];
        flate2::read::MultiGzDecoder::new(compressed)
            .read_exact(&mut out)
            .map_err(|e| err(format!("gunzip: {e}")))?;
        let actual = Sha256::digest(&out);
        if actual.as_slice() != chunk.digest {
            return Err(err(format!(
                "sha256:{} is not its chunkDigest sha256:{}",
                hex(&actual),
                hex(&chunk.digest)
            )));
        }
        Ok(out)
    }

    /// The path of node `idx` (for messages).
    pub fn path(&self, mut idx: usize) -> String {
        let mut parts = Vec::new();
        while idx != 0 {
            parts.push(self.nodes[idx].name.as_str());
            idx = self.nodes[idx].parent;
        }
        parts.reverse();
        parts.join("/")
    }
}

/// A bare node, for the crate's tests.
#[cfg(test)]
pub(crate) fn tests_node(name: &str, kind: Kind) -> Node {
    Node::new(0, name.to_string(), kind)
}

/// For the crate's tests: a layer of regular files at its root, each
/// given as its chunks, every chunk its own gzip member in the blob (as
/// eStargz writes them); the TOC and the blob.
#[cfg(test)]
pub(crate) fn tests_layer(files: &[(&str, Vec<Vec<u8>>)]) -> std::io::Result<(Toc, Vec<u8>)> {
    use std::io::Write as _;
    // One byte first: a data offset is never 0.
    let mut blob = vec![0u8];
    let mut nodes = vec![tests_node("", Kind::Dir)];
    let mut count = 0;
    for (name, chunks) in files {
        let mut f = tests_node(name, Kind::File);
        for data in chunks {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(data)?;
            let start = blob.len() as u64;
            blob.extend(gz.finish()?);
            f.chunks.push(Chunk {
                file_offset: f.size,
                size: data.len() as u64,
                blob_offset: start,
                blob_end: blob.len() as u64,
                digest: Sha256::digest(data).into(),
            });
            f.size += data.len() as u64;
            count += 1;
        }
        let at = nodes.len();
        nodes[0].children.insert(name.to_string(), at);
        nodes.push(f);
    }
    let toc = Toc {
        nodes,
        toc_offset: blob.len() as u64,
        digest: String::new(),
        prefetch_end: 0,
        chunk_count: count,
    };
    Ok((toc, blob))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20+01:00"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.5Z"), Some(1_700_000_000));
        assert_eq!(parse_rfc3339("2023-13-14T22:13:20Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn names_are_cleaned_and_dotdot_refused() {
        assert_eq!(clean_name("./a/b/").ok().as_deref(), Some("a/b"));
        assert_eq!(clean_name("/a//b").ok().as_deref(), Some("a/b"));
        assert!(clean_name("a/../../etc").is_err());
    }
}
