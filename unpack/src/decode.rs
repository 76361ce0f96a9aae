//! The byte pipeline under the tar parser: the caller's blob, hashed as read
//! (the layer digest), detected by magic bytes, decompressed, hashed again
//! (the diff_id).
//!
//! Errors are tagged as they pass so the extractor can tell a failing source
//! (I/O) from a corrupt compressed stream (format); see [`classify`].

use std::fmt;
use std::io::{self, BufReader, Chain, Cursor, Read};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::Error;

/// Buffer between the caller's reader and the decompressor.
const SOURCE_BUF: usize = 128 * 1024;

/// How the blob was compressed, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar (`application/vnd.oci.image.layer.v1.tar`).
    None,
    /// gzip, possibly several members (`...tar+gzip`).
    Gzip,
    /// zstd, possibly several frames (`...tar+zstd`).
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// Detects the compression from (up to) the first four bytes.
pub fn detect(magic: &[u8]) -> Compression {
    match magic {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        // zstd skippable frame, 0x184D2A5?
        [b0, 0x2a, 0x4d, 0x18, ..] if b0 & 0xf0 == 0x50 => Compression::Zstd,
        _ => Compression::None,
    }
}

/// An io::Error payload that says where in the pipeline an error arose.
#[derive(Debug)]
pub(crate) enum StreamError {
    /// The caller's reader failed.
    Source(io::Error),
    /// The compressed stream is corrupt or truncated.
    Decode(String),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Source(e) => write!(f, "reading the layer blob: {e}"),
            StreamError::Decode(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for StreamError {}

/// Turns an error from reading the uncompressed stream into the crate error.
/// `context` says what the tar parser was doing (it names the entry).
pub(crate) fn classify(e: io::Error, context: &str) -> Error {
    let tagged = e
        .get_ref()
        .and_then(|r| r.downcast_ref::<StreamError>())
        .is_some();
    if tagged {
        // into_inner() is Some when get_ref() was.
        if let Some(inner) = e.into_inner() {
            if let Ok(se) = inner.downcast::<StreamError>() {
                return match *se {
                    StreamError::Source(src) => Error::io("reading the layer blob", src),
                    StreamError::Decode(m) => Error::Format(format!("{context}: {m}")),
                };
            }
        }
        return Error::Format(format!("{context}: corrupt stream"));
    }
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return Error::Format(format!("truncated archive: {context}"));
    }
    Error::io(context.to_string(), e)
}

/// Time and bytes, per stage.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct StageStats {
    pub read_time: Duration,
    pub decode_total: Duration,
    pub digest_time: Duration,
    pub compressed_bytes: u64,
    pub uncompressed_bytes: u64,
}

/// The caller's reader, hashed and timed.
pub(crate) struct Source<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    read_time: Duration,
    hash_time: Duration,
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = Instant::now();
        let r = loop {
            match self.inner.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        let t2 = Instant::now();
        self.read_time += t2 - t;
        match r {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.bytes += n as u64;
                self.hash_time += t2.elapsed();
                Ok(n)
            }
            Err(e) => Err(io::Error::other(StreamError::Source(e))),
        }
    }
}

type Buffered<R> = BufReader<Chain<Cursor<Vec<u8>>, Source<R>>>;

enum Decoder<R: Read> {
    Plain(Box<Buffered<R>>),
    Gzip(Box<flate2::bufread::MultiGzDecoder<Buffered<R>>>),
    Zstd(Box<zstd::stream::read::Decoder<'static, Buffered<R>>>),
}

/// The uncompressed tar stream: read it to the end, then call [`Stream::finish`].
pub(crate) struct Stream<R: Read> {
    decoder: Decoder<R>,
    compression: Compression,
    /// None when the consumer hashes the uncompressed bytes itself (the
    /// pipelined mode, to balance the two threads).
    hasher: Option<Sha256>,
    stats: StageStats,
    eof: bool,
}

/// What the pipeline measured, once the stream is drained.
pub(crate) struct Finished {
    pub compression: Compression,
    pub digest: String,
    /// None if the consumer hashed the uncompressed stream.
    pub diff_id: Option<String>,
    pub stats: StageStats,
}

impl<R: Read> Stream<R> {
    /// Reads the first bytes, detects the compression and sets up the decoder.
    pub fn new(reader: R, hash_uncompressed: bool) -> Result<Self, Error> {
        let mut source = Source {
            inner: reader,
            hasher: Sha256::new(),
            bytes: 0,
            read_time: Duration::ZERO,
            hash_time: Duration::ZERO,
        };
        let mut magic = vec![0u8; 4];
        let mut got = 0;
        while got < magic.len() {
            match source.read(&mut magic[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Err(classify(e, "reading the layer blob")),
            }
        }
        magic.truncate(got);
        let compression = detect(&magic);
        let buffered = BufReader::with_capacity(SOURCE_BUF, Cursor::new(magic).chain(source));
        let decoder = match compression {
            Compression::None => Decoder::Plain(Box::new(buffered)),
            Compression::Gzip => {
                Decoder::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(buffered)))
            }
            Compression::Zstd => Decoder::Zstd(Box::new(
                zstd::stream::read::Decoder::with_buffer(buffered)
                    .map_err(|e| Error::io("setting up the zstd decoder", e))?,
            )),
        };
        tracing::debug!(%compression, "layer compression detected");
        Ok(Stream {
            decoder,
            compression,
            hasher: hash_uncompressed.then(Sha256::new),
            stats: StageStats::default(),
            eof: false,
        })
    }

    fn source(&self) -> &Source<R> {
        let buffered = match &self.decoder {
            Decoder::Plain(b) => b,
            Decoder::Gzip(d) => d.get_ref(),
            Decoder::Zstd(d) => d.get_ref(),
        };
        buffered.get_ref().get_ref().1
    }

    fn source_mut(&mut self) -> &mut Source<R> {
        let buffered = match &mut self.decoder {
            Decoder::Plain(b) => b,
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
        };
        buffered.get_mut().get_mut().1
    }

    /// Reads whatever is left of the uncompressed stream (the tar's trailing
    /// padding: it is part of the diff_id) and of the blob, then returns the
    /// digests and counters.
    pub fn finish(mut self) -> Result<Finished, Error> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(classify(e, "reading past the end of the archive")),
            }
        }
        // The decoders stop at the end of their last frame / member; anything
        // after it (there should be nothing) still belongs to the blob digest.
        let mut trailing = 0u64;
        loop {
            match self.source_mut().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => trailing += n as u64,
                Err(e) => return Err(classify(e, "reading the end of the layer blob")),
            }
        }
        if trailing > 0 && self.compression != Compression::None {
            tracing::warn!(
                trailing,
                compression = %self.compression,
                "bytes after the end of the compressed stream"
            );
        }
        let src = self.source();
        let mut stats = self.stats;
        stats.read_time = src.read_time;
        stats.compressed_bytes = src.bytes;
        stats.digest_time += src.hash_time;
        let digest = hex_digest(src.hasher.clone());
        let diff_id = self.hasher.clone().map(hex_digest);
        // Time in the decoder that was not waiting on the source or hashing.
        stats.decode_total = stats
            .decode_total
            .saturating_sub(src.read_time)
            .saturating_sub(src.hash_time);
        Ok(Finished {
            compression: self.compression,
            digest,
            diff_id,
            stats,
        })
    }
}

impl<R: Read> Read for Stream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.eof || buf.is_empty() {
            return Ok(0);
        }
        let t = Instant::now();
        let r = match &mut self.decoder {
            Decoder::Plain(b) => b.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
        };
        let t2 = Instant::now();
        self.stats.decode_total += t2 - t;
        match r {
            Ok(0) => {
                self.eof = true;
                Ok(0)
            }
            Ok(n) => {
                self.stats.uncompressed_bytes += n as u64;
                if let Some(h) = &mut self.hasher {
                    h.update(&buf[..n]);
                    self.stats.digest_time += t2.elapsed();
                }
                Ok(n)
            }
            Err(e) => {
                let from_source = e
                    .get_ref()
                    .and_then(|r| r.downcast_ref::<StreamError>())
                    .is_some();
                if from_source {
                    Err(e)
                } else {
                    Err(io::Error::other(StreamError::Decode(format!(
                        "{} stream: {e}",
                        self.compression
                    ))))
                }
            }
        }
    }
}

/// `sha256:<lowercase hex>`.
pub(crate) fn hex_digest(h: Sha256) -> String {
    let d = h.finalize();
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in d {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s
}
