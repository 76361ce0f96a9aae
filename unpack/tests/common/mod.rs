//! Helpers shared by the integration tests: building archives in memory,
//! compressing them, digests, and a sandbox with a sentinel outside the
//! target directory.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

pub const T1: u64 = 1_600_000_000;
pub const T2: u64 = 1_650_000_000;

pub fn sha(b: &[u8]) -> String {
    let d = Sha256::digest(b);
    let mut s = String::from("sha256:");
    for x in d {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

pub fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(tar).unwrap();
    e.finish().unwrap()
}

pub fn zstd(tar: &[u8]) -> Vec<u8> {
    zstd::encode_all(tar, 3).unwrap()
}

/// An archive under construction with the `tar` crate.
pub struct Ar {
    pub b: tar::Builder<Vec<u8>>,
}

impl Default for Ar {
    fn default() -> Self {
        Self::new()
    }
}

impl Ar {
    pub fn new() -> Self {
        Ar {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: EntryType, mode: u32, uid: u64, gid: u64, mtime: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }

    pub fn dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64, mtime: u64) -> &mut Self {
        let mut h = Self::header(EntryType::Directory, mode, uid, gid, mtime);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn file(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> &mut Self {
        let mut h = Self::header(EntryType::Regular, mode, uid, gid, mtime);
        h.set_size(data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str, uid: u64, mtime: u64) -> &mut Self {
        let mut h = Self::header(EntryType::Symlink, 0o777, uid, uid, mtime);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    /// A hard link; like containerd, the entry's owner, mode and times are
    /// applied to the shared inode.
    pub fn hardlink(&mut self, path: &str, target: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(EntryType::Link, mode, 0, 0, T1);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn device(
        &mut self,
        path: &str,
        kind: EntryType,
        major: u32,
        minor: u32,
        mode: u32,
        gid: u64,
    ) -> &mut Self {
        let mut h = Self::header(kind, mode, 0, gid, T1);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// A PAX extended header (`x`) for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let data = pax_records(records);
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::XHeader);
        h.set_path("PaxHeaders.0/x").unwrap();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.append(&h, &data[..]).unwrap();
        self
    }

    /// Raw bytes (hand-built headers).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.b.get_mut().extend_from_slice(bytes);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

pub fn pax_records(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

fn octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}");
    assert!(s.len() <= w, "value too large for an octal field");
    field[..w].copy_from_slice(s.as_bytes());
    field[w] = 0;
}

/// A hand-built header: USTAR (or old GNU when `gnu`), mode 0644, root,
/// mtime T1; the size field is written as given (octal, or base-256 if large).
pub fn raw_header(name: &[u8], typeflag: u8, size: u64, link: &[u8], gnu: bool) -> [u8; 512] {
    let mut b = [0u8; 512];
    assert!(name.len() <= 100 && link.len() <= 100);
    b[..name.len()].copy_from_slice(name);
    octal(&mut b[100..108], 0o644);
    octal(&mut b[108..116], 0);
    octal(&mut b[116..124], 0);
    if size < 1 << 33 {
        octal(&mut b[124..136], size);
    } else {
        b[124] = 0x80;
        b[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut b[136..148], T1);
    b[156] = typeflag;
    b[157..157 + link.len()].copy_from_slice(link);
    if gnu {
        b[257..263].copy_from_slice(b"ustar ");
        b[263..265].copy_from_slice(b" \0");
    } else {
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
    }
    set_checksum(&mut b);
    b
}

pub fn set_checksum(b: &mut [u8; 512]) {
    b[148..156].copy_from_slice(b"        ");
    let sum: u32 = b.iter().map(|&c| u32::from(c)).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
}

/// A whole raw entry: header, data, padding.
pub fn raw_entry(name: &[u8], typeflag: u8, data: &[u8], link: &[u8]) -> Vec<u8> {
    let mut v = raw_header(name, typeflag, data.len() as u64, link, false).to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

pub fn end_of_archive() -> Vec<u8> {
    vec![0u8; 1024]
}

/// A temporary directory holding `layer/` (the target, empty) and
/// `outside/sentinel`, to check that a hostile layer touched nothing outside.
pub struct Sandbox {
    pub tmp: tempfile::TempDir,
    pub layer: PathBuf,
    pub outside: PathBuf,
    sentinel_meta: (u32, u32, u32, i64, i64, u64),
}

impl Sandbox {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("layer");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&layer).unwrap();
        std::fs::create_dir(&outside).unwrap();
        let s = outside.join("sentinel");
        std::fs::write(&s, b"sentinel").unwrap();
        let m = std::fs::symlink_metadata(&s).unwrap();
        let meta = (
            m.mode(),
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec(),
            m.nlink(),
        );
        Sandbox {
            tmp,
            layer,
            outside,
            sentinel_meta: meta,
        }
    }

    pub fn sentinel(&self) -> PathBuf {
        self.outside.join("sentinel")
    }

    /// Nothing outside `layer/` changed: the sandbox holds exactly `layer`
    /// and `outside`, `outside` holds exactly the untouched sentinel.
    pub fn assert_outside_untouched(&self) {
        let mut top: Vec<_> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        top.sort();
        assert_eq!(
            top,
            ["layer", "outside"],
            "something was created next to the layer"
        );
        let inside: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(inside, ["sentinel"], "something was created outside");
        assert_eq!(std::fs::read(self.sentinel()).unwrap(), b"sentinel");
        let m = std::fs::symlink_metadata(self.sentinel()).unwrap();
        assert_eq!(
            (
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec(),
                m.nlink()
            ),
            self.sentinel_meta,
            "sentinel metadata changed"
        );
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

pub fn lget(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    match rustix::fs::lgetxattr(p.as_c_str(), name, &mut buf[..]) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(_) => None,
    }
}
