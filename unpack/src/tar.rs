//! A streaming tar reader that understands what Go's `archive/tar` (and so
//! containerd) understands: V7, USTAR (with prefix), STAR, GNU and PAX
//! headers; GNU long names and long link targets (`L`, `K`); PAX local and
//! global headers; base-256 numbers; the old GNU sparse format (`S`) and the
//! PAX GNU sparse formats 0.0, 0.1 and 1.0.
//!
//! Memory is bounded: special headers (`x`, `g`, `L`, `K`) larger than
//! [`MAX_SPECIAL`] and sparse maps with more than [`MAX_SPARSE_ENTRIES`]
//! fragments are refused (Go refuses special headers over 1 MiB too); file
//! data is streamed through the caller's buffer.

use std::io::{self, Read};

/// Largest special header (PAX, GNU long name) accepted, as Go's limit.
pub const MAX_SPECIAL: u64 = 1 << 20;
/// Most fragments accepted in a sparse map (16 bytes each in memory).
pub const MAX_SPARSE_ENTRIES: usize = 1 << 20;

const BLOCK: usize = 512;

/// A tar-level problem, turned into [`crate::Error`] by the caller.
#[derive(Debug)]
pub enum TarError {
    /// The stream under the parser failed (may carry a tagged decoder error);
    /// the string says what was being read.
    Io(io::Error, String),
    /// The archive is malformed.
    Format(String),
}

type Result<T> = std::result::Result<T, TarError>;

fn fmt_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(TarError::Format(msg.into()))
}

/// The kind of an entry, after Go's normalisations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `0`, `\0` (without a trailing slash), and sparse files.
    Regular,
    /// `1`.
    HardLink,
    /// `2`.
    Symlink,
    /// `3`.
    Char,
    /// `4`.
    Block,
    /// `5`, and `\0` with a trailing slash (legacy).
    Dir,
    /// `6`.
    Fifo,
    /// `g`: ignored by containerd.
    GlobalHeader,
    /// Anything else (`7`, `V`, `D`, ...): containerd refuses them.
    Other(u8),
}

/// One entry's header, with PAX and GNU overrides applied.
#[derive(Debug, Clone)]
pub struct Header {
    /// The name as in the archive (raw bytes).
    pub name: Vec<u8>,
    /// The link target (symlinks and hard links), raw bytes.
    pub link: Vec<u8>,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Logical size of a regular file (the real size of a sparse file).
    pub size: u64,
    pub mtime: Time,
    /// From PAX `atime` or the GNU header, when present.
    pub atime: Option<Time>,
    pub devmajor: u32,
    pub devminor: u32,
    /// `SCHILY.xattr.*` records, key without the prefix; the last record for
    /// a key wins, order of first appearance kept.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For sparse files: the data fragments (offset, length), in order; the
    /// rest of the file is holes.
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// Seconds and nanoseconds since the epoch (may be negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// The reader. Call [`TarReader::next_header`], then read the entry's data
/// with [`TarReader::read_data`] (any unread data is skipped by the next
/// call).
pub struct TarReader<R> {
    r: R,
    /// Data bytes of the current entry still in the stream.
    remaining: u64,
    /// Padding after the current entry's data.
    pad: u64,
    done: bool,
    block: [u8; BLOCK],
}

#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<Vec<u8>>,
    uid: Option<Vec<u8>>,
    gid: Option<Vec<u8>>,
    mtime: Option<Vec<u8>>,
    atime: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse_major: Option<Vec<u8>>,
    sparse_minor: Option<Vec<u8>>,
    sparse_name: Option<Vec<u8>>,
    sparse_size: Option<Vec<u8>>,
    sparse_realsize: Option<Vec<u8>>,
    sparse_map: Option<Vec<u8>>,
    /// GNU sparse 0.0: repeated offset / numbytes records, in order.
    sparse_00: Vec<u8>,
    sparse_00_fields: usize,
}

impl<R: Read> TarReader<R> {
    pub fn new(r: R) -> Self {
        TarReader {
            r,
            remaining: 0,
            pad: 0,
            done: false,
            block: [0; BLOCK],
        }
    }

    /// The stream under the parser (to drain it after the end of archive).
    pub fn into_inner(self) -> R {
        self.r
    }

    /// Reads data of the current entry; `Ok(0)` at its end.
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = loop {
            match self.r.read(&mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// Reads exactly `buf.len()` data bytes of the current entry.
    pub fn read_data_exact(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.read_data(buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    fn skip(&mut self, mut n: u64, what: &str) -> Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = usize::try_from(n.min(buf.len() as u64)).unwrap_or(buf.len());
            match self.r.read(&mut buf[..k]) {
                Ok(0) => {
                    return Err(TarError::Io(
                        io::ErrorKind::UnexpectedEof.into(),
                        what.to_string(),
                    ))
                }
                Ok(m) => n -= m as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::Io(e, what.to_string())),
            }
        }
        Ok(())
    }

    /// Reads one block; `Ok(false)` on a clean end of stream before it.
    fn read_block(&mut self, what: &str) -> Result<bool> {
        let mut got = 0;
        while got < BLOCK {
            match self.r.read(&mut self.block[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(TarError::Io(
                        io::ErrorKind::UnexpectedEof.into(),
                        what.to_string(),
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::Io(e, what.to_string())),
            }
        }
        Ok(true)
    }

    /// Reads a special header's content (bounded) and its padding.
    fn read_special(&mut self, size: u64, what: &str) -> Result<Vec<u8>> {
        if size > MAX_SPECIAL {
            return fmt_err(format!(
                "{what} of {size} bytes is larger than the {MAX_SPECIAL} bytes allowed"
            ));
        }
        let len = usize::try_from(size).map_err(|_| TarError::Format("size".into()))?;
        let mut v = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match self.r.read(&mut v[got..]) {
                Ok(0) => {
                    return Err(TarError::Io(
                        io::ErrorKind::UnexpectedEof.into(),
                        what.to_string(),
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::Io(e, what.to_string())),
            }
        }
        self.skip(pad_of(size), what)?;
        Ok(v)
    }

    /// The next entry, or `None` at the end of the archive.
    pub fn next_header(&mut self) -> Result<Option<Header>> {
        if self.done {
            return Ok(None);
        }
        let rest = self.remaining + self.pad;
        self.remaining = 0;
        self.pad = 0;
        self.skip(rest, "skipping entry data")?;

        let mut pax = Pax::default();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pending = false;
        loop {
            if !self.read_block("reading a header")? {
                if pending {
                    return fmt_err("archive ends after an extended header, before its entry");
                }
                self.done = true;
                return Ok(None);
            }
            if self.block.iter().all(|&b| b == 0) {
                // End of archive: two zero blocks (or one, then end of stream).
                if !self.read_block("reading the end of archive")? {
                    self.done = true;
                    return Ok(None);
                }
                if self.block.iter().all(|&b| b == 0) {
                    if pending {
                        return fmt_err("archive ends after an extended header, before its entry");
                    }
                    self.done = true;
                    return Ok(None);
                }
                return fmt_err("a zero block followed by a non-zero block");
            }
            let format = check_header(&self.block)?;
            let typeflag = self.block[156];
            let raw_size = parse_numeric(&self.block[124..136], "size")?;
            match typeflag {
                b'x' | b'g' => {
                    let size = nonneg(raw_size, "PAX header size")?;
                    let data = self.read_special(size, "a PAX header")?;
                    if typeflag == b'g' {
                        // Go returns it as an entry of its own, which
                        // containerd ignores; it never applies to later entries.
                        return Ok(Some(global_header(&self.block)));
                    }
                    parse_pax(&data, &mut pax)?;
                    pending = true;
                }
                // Go honours these whatever the header's format says.
                b'L' | b'K' => {
                    let size = nonneg(raw_size, "GNU long name size")?;
                    let data = self.read_special(size, "a GNU long name")?;
                    let s = c_string(&data).to_vec();
                    if typeflag == b'L' {
                        long_name = Some(s);
                    } else {
                        long_link = Some(s);
                    }
                    pending = true;
                }
                _ => {
                    return self
                        .regular_header(format, raw_size, pax, long_name, long_link)
                        .map(Some)
                }
            }
        }
    }

    fn regular_header(
        &mut self,
        format: Format,
        raw_size: i64,
        pax: Pax,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
    ) -> Result<Header> {
        let b = self.block;
        let mut name = c_string(&b[0..100]).to_vec();
        match format {
            Format::Ustar => {
                let prefix = c_string(&b[345..500]);
                if !prefix.is_empty() {
                    name = [prefix, b"/", &name].concat();
                }
            }
            Format::Star => {
                let prefix = c_string(&b[345..476]);
                if !prefix.is_empty() {
                    name = [prefix, b"/", &name].concat();
                }
            }
            Format::Gnu | Format::V7 => {}
        }
        let mut link = c_string(&b[157..257]).to_vec();
        let mode = parse_numeric(&b[100..108], "mode")?;
        let mut uid = parse_numeric(&b[108..116], "uid")?;
        let mut gid = parse_numeric(&b[116..124], "gid")?;
        let mut size = raw_size;
        let mut mtime = Time {
            secs: parse_numeric(&b[136..148], "mtime")?,
            nanos: 0,
        };
        let mut atime = None;
        let (mut devmajor, mut devminor) = (0, 0);
        if format != Format::V7 {
            devmajor = parse_numeric(&b[329..337], "devmajor")?;
            devminor = parse_numeric(&b[337..345], "devminor")?;
        }
        if format == Format::Gnu && b[345] != 0 {
            // Go ignores unparsable GNU atime fields (an old Go writer bug).
            if let Ok(secs) = parse_numeric(&b[345..357], "atime") {
                atime = Some(Time { secs, nanos: 0 });
            }
        }
        if format == Format::Star {
            if let Ok(secs) = parse_numeric(&b[476..488], "atime") {
                atime = Some(Time { secs, nanos: 0 });
            }
        }
        let mut typeflag = b[156];

        // PAX records override the header.
        if let Some(v) = &pax.path {
            name = v.clone();
        }
        if let Some(v) = &pax.linkpath {
            link = v.clone();
        }
        if let Some(v) = &pax.size {
            size = pax_int(v, "size")?;
        }
        if let Some(v) = &pax.uid {
            uid = pax_int(v, "uid")?;
        }
        if let Some(v) = &pax.gid {
            gid = pax_int(v, "gid")?;
        }
        if let Some(v) = &pax.mtime {
            mtime = pax_time(v, "mtime")?;
        }
        if let Some(v) = &pax.atime {
            atime = Some(pax_time(v, "atime")?);
        }
        // GNU long names override PAX, as in Go.
        if let Some(v) = long_name {
            name = v;
        }
        if let Some(v) = long_link {
            link = v;
        }
        if typeflag == 0 {
            typeflag = if name.last() == Some(&b'/') {
                b'5'
            } else {
                b'0'
            };
        }
        let size = nonneg(size, "size")?;
        let kind = match typeflag {
            b'0' | b'S' => Kind::Regular,
            b'1' => Kind::HardLink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            other => Kind::Other(other),
        };
        // Header-only types carry no data whatever their size field says.
        let mut physical = match kind {
            Kind::HardLink | Kind::Symlink | Kind::Char | Kind::Block | Kind::Dir | Kind::Fifo => 0,
            _ => size,
        };
        let mut logical = physical;

        let mut sparse = None;
        if typeflag == b'S' {
            let (map, real) = self.old_gnu_sparse(&b)?;
            logical = real;
            sparse = Some(map);
        }
        self.remaining = physical;
        self.pad = pad_of(physical);
        if kind == Kind::Regular && typeflag != b'S' {
            if let Some((map, real, new_name)) = self.pax_sparse(&pax, &mut physical)? {
                logical = real;
                sparse = Some(map);
                if let Some(n) = new_name {
                    name = n;
                }
            }
        }
        if let Some(map) = &sparse {
            validate_sparse(map, logical, physical)?;
        }

        Ok(Header {
            name,
            link,
            kind,
            mode: u32::try_from(mode & 0o7777).unwrap_or(0),
            uid: id(uid, "uid")?,
            gid: id(gid, "gid")?,
            size: logical,
            mtime,
            atime,
            devmajor: id(devmajor, "devmajor")?,
            devminor: id(devminor, "devminor")?,
            xattrs: pax.xattrs,
            sparse,
        })
    }

    /// Old GNU sparse: the map in the header and in extension blocks that
    /// follow it (before the data).
    fn old_gnu_sparse(&mut self, b: &[u8; BLOCK]) -> Result<(Vec<(u64, u64)>, u64)> {
        let mut map = Vec::new();
        push_sparse_entries(&b[386..482], &mut map)?;
        let real = nonneg(
            parse_numeric(&b[483..495], "sparse real size")?,
            "real size",
        )?;
        let mut extended = b[482] != 0;
        while extended {
            if !self.read_block("reading a GNU sparse extension header")? {
                return Err(TarError::Io(
                    io::ErrorKind::UnexpectedEof.into(),
                    "reading a GNU sparse extension header".into(),
                ));
            }
            let ext = self.block;
            push_sparse_entries(&ext[0..504], &mut map)?;
            extended = ext[504] != 0;
        }
        Ok((map, real))
    }

    /// PAX GNU sparse 0.0, 0.1 and 1.0 (Go's readGNUSparsePAXHeaders).
    #[allow(clippy::type_complexity)]
    fn pax_sparse(
        &mut self,
        pax: &Pax,
        physical: &mut u64,
    ) -> Result<Option<(Vec<(u64, u64)>, u64, Option<Vec<u8>>)>> {
        let major = pax.sparse_major.as_deref();
        let minor = pax.sparse_minor.as_deref();
        let is_1x0 = match (major, minor) {
            (Some(b"0"), Some(b"0")) | (Some(b"0"), Some(b"1")) => false,
            (Some(b"1"), Some(b"0")) => true,
            (Some(_), _) | (_, Some(_)) => return Ok(None), // unknown version: plain file
            (None, None) => {
                if pax.sparse_map.as_ref().is_some_and(|m| !m.is_empty())
                    || !pax.sparse_00.is_empty()
                {
                    false
                } else {
                    return Ok(None);
                }
            }
        };
        let name = pax.sparse_name.clone().filter(|n| !n.is_empty());
        let real = match pax.sparse_size.as_ref().or(pax.sparse_realsize.as_ref()) {
            Some(v) => nonneg(pax_int(v, "GNU.sparse.size")?, "GNU.sparse.size")?,
            None => *physical,
        };
        let map = if is_1x0 {
            self.sparse_map_1x0(physical)?
        } else {
            let text = match &pax.sparse_map {
                Some(m) if !m.is_empty() => m.clone(),
                _ => pax.sparse_00.clone(),
            };
            parse_sparse_map_text(&text)?
        };
        Ok(Some((map, real, name)))
    }

    /// GNU sparse 1.0: the map is at the start of the data, as decimal
    /// numbers each ending in a newline, padded to a block.
    fn sparse_map_1x0(&mut self, physical: &mut u64) -> Result<Vec<(u64, u64)>> {
        let mut text: Vec<u8> = Vec::new();
        let mut numbers: Vec<u64> = Vec::new();
        let mut want: Option<usize> = None;
        let mut pos = 0;
        loop {
            // Parse what we have.
            while let Some(nl) = text[pos..].iter().position(|&c| c == b'\n') {
                let field = &text[pos..pos + nl];
                pos += nl + 1;
                let n = dec_u64(field).ok_or_else(|| {
                    TarError::Format("GNU sparse 1.0 map: not a decimal number".into())
                })?;
                match want {
                    None => {
                        let count = usize::try_from(n).unwrap_or(usize::MAX);
                        if count > MAX_SPARSE_ENTRIES {
                            return fmt_err(format!(
                                "GNU sparse map of {n} fragments (at most {MAX_SPARSE_ENTRIES})"
                            ));
                        }
                        want = Some(count * 2);
                    }
                    Some(_) => numbers.push(n),
                }
                if want == Some(numbers.len()) {
                    return Ok(numbers.chunks(2).map(|c| (c[0], c[1])).collect());
                }
            }
            if text.len() as u64 >= MAX_SPECIAL * 16 {
                return fmt_err("GNU sparse 1.0 map too large");
            }
            let mut blk = [0u8; BLOCK];
            if *physical < BLOCK as u64 || self.remaining < BLOCK as u64 {
                return fmt_err("GNU sparse 1.0 map runs past the entry's data");
            }
            self.read_data_exact(&mut blk)
                .map_err(|e| TarError::Io(e, "reading a GNU sparse 1.0 map".to_string()))?;
            *physical -= BLOCK as u64;
            text.extend_from_slice(&blk);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    V7,
    Ustar,
    Star,
    Gnu,
}

/// Verifies the checksum (unsigned or signed sum, as Go) and tells the format.
fn check_header(b: &[u8; BLOCK]) -> Result<Format> {
    let stored = parse_octal(&b[148..156]).map_err(|_| {
        TarError::Format("invalid header checksum field (not a tar archive?)".into())
    })?;
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &c) in b.iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += i64::from(c);
        signed += i64::from(c as i8);
    }
    if stored != unsigned && stored != signed {
        return fmt_err("header checksum mismatch (not a tar archive, or corrupt)");
    }
    let magic = &b[257..263];
    let version = &b[263..265];
    Ok(if magic == b"ustar\0" && version == b"00" {
        if &b[508..512] == b"tar\0" {
            Format::Star
        } else {
            Format::Ustar
        }
    } else if magic == b"ustar " && version == b" \0" {
        Format::Gnu
    } else {
        Format::V7
    })
}

fn global_header(b: &[u8; BLOCK]) -> Header {
    Header {
        name: c_string(&b[0..100]).to_vec(),
        link: Vec::new(),
        kind: Kind::GlobalHeader,
        mode: 0,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: Time::default(),
        atime: None,
        devmajor: 0,
        devminor: 0,
        xattrs: Vec::new(),
        sparse: None,
    }
}

fn pad_of(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// The bytes up to the first NUL.
fn c_string(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn nonneg(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| TarError::Format(format!("negative {what}: {v}")))
}

fn id(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| TarError::Format(format!("{what} {v} out of range")))
}

/// Octal, trimmed of spaces and NULs on both sides; empty is 0.
fn parse_octal(b: &[u8]) -> std::result::Result<i64, ()> {
    let is_pad = |c: &u8| *c == b' ' || *c == 0;
    let start = b.iter().position(|c| !is_pad(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !is_pad(c)).map_or(start, |i| i + 1);
    let s = &b[start..end];
    if s.is_empty() {
        return Ok(0);
    }
    let mut v: u64 = 0;
    for &c in s {
        if !(b'0'..=b'7').contains(&c) {
            return Err(());
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(c - b'0')))
            .ok_or(())?;
    }
    i64::try_from(v).map_err(|_| ())
}

/// Octal or GNU base-256 (two's complement, high bit of the first byte set).
fn parse_numeric(b: &[u8], what: &str) -> Result<i64> {
    if let Some(&first) = b.first() {
        if first & 0x80 != 0 {
            let inv: u8 = if first & 0x40 != 0 { 0xff } else { 0 };
            let mut x: u64 = 0;
            for (i, &c) in b.iter().enumerate() {
                let mut c = c ^ inv;
                if i == 0 {
                    c &= 0x7f;
                }
                if x >> 56 > 0 {
                    return fmt_err(format!("base-256 {what} overflows"));
                }
                x = (x << 8) | u64::from(c);
            }
            if x >> 63 > 0 {
                return fmt_err(format!("base-256 {what} overflows"));
            }
            let v = x as i64;
            return Ok(if inv == 0xff { !v } else { v });
        }
    }
    parse_octal(b).map_err(|_| TarError::Format(format!("invalid octal {what} field")))
}

fn dec_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(v)
}

fn pax_int(v: &[u8], what: &str) -> Result<i64> {
    let (neg, digits) = match v.first() {
        Some(b'-') => (true, &v[1..]),
        Some(b'+') => (false, &v[1..]),
        _ => (false, v),
    };
    let n = dec_u64(digits)
        .and_then(|n| i64::try_from(n).ok())
        .ok_or_else(|| TarError::Format(format!("invalid PAX {what} record")))?;
    Ok(if neg { -n } else { n })
}

/// A PAX time: `[-]seconds[.fraction]`.
fn pax_time(v: &[u8], what: &str) -> Result<Time> {
    let bad = || TarError::Format(format!("invalid PAX {what} record"));
    let (secs_part, frac) = match v.iter().position(|&c| c == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &b""[..]),
    };
    let neg = secs_part.first() == Some(&b'-');
    let secs = pax_int(secs_part, what)?;
    if !frac.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let mut nanos: u32 = 0;
    for i in 0..9 {
        nanos = nanos * 10 + frac.get(i).map_or(0, |c| u32::from(c - b'0'));
    }
    if neg && nanos > 0 {
        // -1.5 is 1.5 s before the epoch: secs -2, nanos 0.5e9.
        return Ok(Time {
            secs: secs - 1,
            nanos: 1_000_000_000 - nanos,
        });
    }
    Ok(Time { secs, nanos })
}

/// PAX records: `"%d %s=%s\n"`, the length counting the whole record.
fn parse_pax(mut data: &[u8], pax: &mut Pax) -> Result<()> {
    while !data.is_empty() {
        let sp = data
            .iter()
            .position(|&c| c == b' ')
            .ok_or_else(|| TarError::Format("malformed PAX record".into()))?;
        let len = dec_u64(&data[..sp])
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| TarError::Format("malformed PAX record length".into()))?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            // Go tolerates trailing NUL padding here.
            if data.iter().all(|&c| c == 0) {
                break;
            }
            return fmt_err("malformed PAX record");
        }
        let rec = &data[sp + 1..len - 1];
        data = &data[len..];
        let eq = rec
            .iter()
            .position(|&c| c == b'=')
            .ok_or_else(|| TarError::Format("PAX record without '='".into()))?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        if key.is_empty() {
            return fmt_err("PAX record with an empty key");
        }
        let no_nul = |what: &str| -> Result<()> {
            if value.contains(&0) {
                fmt_err(format!("PAX {what} record contains a NUL byte"))
            } else {
                Ok(())
            }
        };
        match key {
            b"path" => {
                no_nul("path")?;
                pax.path = Some(value.to_vec());
            }
            b"linkpath" => {
                no_nul("linkpath")?;
                pax.linkpath = Some(value.to_vec());
            }
            b"size" => pax.size = Some(value.to_vec()),
            b"uid" => pax.uid = Some(value.to_vec()),
            b"gid" => pax.gid = Some(value.to_vec()),
            b"mtime" => pax.mtime = Some(value.to_vec()),
            b"atime" => pax.atime = Some(value.to_vec()),
            b"GNU.sparse.major" => pax.sparse_major = Some(value.to_vec()),
            b"GNU.sparse.minor" => pax.sparse_minor = Some(value.to_vec()),
            b"GNU.sparse.name" => pax.sparse_name = Some(value.to_vec()),
            b"GNU.sparse.size" => pax.sparse_size = Some(value.to_vec()),
            b"GNU.sparse.realsize" => pax.sparse_realsize = Some(value.to_vec()),
            b"GNU.sparse.map" => pax.sparse_map = Some(value.to_vec()),
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                // 0.0: alternate offset / numbytes records build the map.
                let expect_offset = pax.sparse_00_fields.is_multiple_of(2);
                let is_offset = key == b"GNU.sparse.offset";
                if is_offset != expect_offset || pax.sparse_00_fields >= 2 * MAX_SPARSE_ENTRIES {
                    return fmt_err("GNU sparse 0.0 records out of order");
                }
                if !pax.sparse_00.is_empty() {
                    pax.sparse_00.push(b',');
                }
                pax.sparse_00.extend_from_slice(value);
                pax.sparse_00_fields += 1;
            }
            _ => {
                if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
                    if let Some(slot) = pax.xattrs.iter_mut().find(|(k, _)| k == x) {
                        slot.1 = value.to_vec();
                    } else {
                        pax.xattrs.push((x.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(())
}

/// `off,len,off,len,...`
fn parse_sparse_map_text(text: &[u8]) -> Result<Vec<(u64, u64)>> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let nums: Vec<&[u8]> = text.split(|&c| c == b',').collect();
    if !nums.len().is_multiple_of(2) {
        return fmt_err("GNU sparse map with an odd number of fields");
    }
    if nums.len() / 2 > MAX_SPARSE_ENTRIES {
        return fmt_err("GNU sparse map too large");
    }
    nums.chunks(2)
        .map(|c| match (dec_u64(c[0]), dec_u64(c[1])) {
            (Some(o), Some(l)) => Ok((o, l)),
            _ => fmt_err("GNU sparse map: not a decimal number"),
        })
        .collect()
}

fn push_sparse_entries(area: &[u8], map: &mut Vec<(u64, u64)>) -> Result<()> {
    for e in area.chunks_exact(24) {
        if e[0] == 0 && e[12] == 0 {
            // Go stops at the first empty slot.
            break;
        }
        let off = nonneg(parse_numeric(&e[0..12], "sparse offset")?, "sparse offset")?;
        let len = nonneg(parse_numeric(&e[12..24], "sparse length")?, "sparse length")?;
        if map.len() >= MAX_SPARSE_ENTRIES {
            return fmt_err("GNU sparse map too large");
        }
        map.push((off, len));
    }
    Ok(())
}

/// Fragments in order, not overlapping, inside the file, and exactly the
/// data stored in the archive.
fn validate_sparse(map: &[(u64, u64)], size: u64, physical: u64) -> Result<()> {
    let mut end = 0u64;
    let mut data = 0u64;
    for &(off, len) in map {
        let e = off
            .checked_add(len)
            .ok_or_else(|| TarError::Format("sparse fragment overflows".into()))?;
        if off < end || e > size {
            return fmt_err("invalid sparse map (overlapping, unordered or past the end)");
        }
        end = e;
        data += len;
    }
    if data != physical {
        return fmt_err(format!(
            "sparse map describes {data} bytes of data but the entry holds {physical}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_numeric(b"0000755\0", "m").unwrap(), 0o755);
        assert_eq!(parse_numeric(b"  12 \0", "m").unwrap(), 0o12);
        assert_eq!(parse_numeric(b"\0\0\0", "m").unwrap(), 0);
        let mut b = [0u8; 12];
        b[0] = 0x80;
        b[11] = 5;
        assert_eq!(parse_numeric(&b, "m").unwrap(), 5);
        let b = [0xffu8; 8];
        assert_eq!(parse_numeric(&b, "m").unwrap(), -1);
        assert!(parse_numeric(b"12x", "m").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(
            pax_time(b"1700000000.123456789123", "t").unwrap(),
            Time {
                secs: 1_700_000_000,
                nanos: 123_456_789
            }
        );
        assert_eq!(
            pax_time(b"-1.5", "t").unwrap(),
            Time {
                secs: -2,
                nanos: 500_000_000
            }
        );
        assert_eq!(pax_time(b"42", "t").unwrap(), Time { secs: 42, nanos: 0 });
        assert!(pax_time(b"4x", "t").is_err());
    }

    #[test]
    fn pax_records() {
        let mut p = Pax::default();
        let data = b"20 path=a/very/long\n26 SCHILY.xattr.user.k=v1\n26 SCHILY.xattr.user.k=v2\n";
        parse_pax(data, &mut p).unwrap();
        assert_eq!(p.path.as_deref(), Some(&b"a/very/long"[..]));
        assert_eq!(p.xattrs, vec![(b"user.k".to_vec(), b"v2".to_vec())]);
        assert!(parse_pax(b"99 path=x\n", &mut Pax::default()).is_err());
    }

    #[test]
    fn sparse_00_records() {
        let mut p = Pax::default();
        let recs = [
            "GNU.sparse.offset=0",
            "GNU.sparse.numbytes=5",
            "GNU.sparse.offset=100",
            "GNU.sparse.numbytes=3",
        ];
        let mut data = Vec::new();
        for r in recs {
            let mut len = r.len() + 3;
            if (len.to_string().len() + r.len() + 2) != len {
                len = len.to_string().len() + r.len() + 2;
            }
            data.extend_from_slice(format!("{len} {r}\n").as_bytes());
        }
        parse_pax(&data, &mut p).unwrap();
        assert_eq!(
            parse_sparse_map_text(&p.sparse_00).unwrap(),
            vec![(0, 5), (100, 3)]
        );
    }
}
