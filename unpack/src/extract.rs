//! Applying tar entries to the target directory.
//!
//! Every file-system call is relative to a directory fd that was opened
//! beneath the target with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, and names only one final
//! component that is never followed (`O_NOFOLLOW`, `O_EXCL`,
//! `AT_SYMLINK_NOFOLLOW`, or calls that never follow: `mkdirat`, `mknodat`,
//! `symlinkat`, `linkat` without `AT_SYMLINK_FOLLOW`, `unlinkat`). No path
//! string joined onto the target directory is ever handed to the kernel for
//! anything an entry names.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags,
};
use rustix::io::Errno;

use crate::error::Error;
use crate::tar::{Header, Kind, TarError, TarReader, Time};
use crate::{ApplyOptions, Counts};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

/// Latest time a Go `time.Time` of a `syscall.Timespec` can hold (Go's
/// `time.Unix(0, 1<<63-1)`); later or negative times become the epoch.
const MAX_SECS: i64 = i64::MAX / 1_000_000_000;

fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

/// For `openat` of one component.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW
}

/// For `openat2`: no O_NOFOLLOW, so that a trailing symlink fails with
/// ELOOP (RESOLVE_NO_SYMLINKS) rather than ENOTDIR, and is reported as such.
fn dir_flags2() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
}

/// `openat2` beneath `base`, retrying the EAGAIN the kernel returns when a
/// rename raced with the lookup.
fn open_beneath(base: BorrowedFd<'_>, path: &[u8], flags: OFlags) -> Result<OwnedFd, Errno> {
    let mut tries = 0;
    loop {
        match rfs::openat2(base, path, flags, Mode::empty(), resolve()) {
            Err(Errno::AGAIN) if tries < 16 => tries += 1,
            r => return r,
        }
    }
}

/// Splits an entry name into components: `.` and empty components dropped,
/// absolute paths and `..` refused. `Ok(empty)` is the root itself.
pub(crate) fn components(name: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if name.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut out = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path has a '..' component"),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

fn bound(t: Time) -> Timespec {
    if t.secs < 0 || t.secs > MAX_SECS {
        Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        }
    } else {
        Timespec {
            tv_sec: t.secs,
            tv_nsec: i64::from(t.nanos),
        }
    }
}

fn timestamps(h: &Header) -> Timestamps {
    // containerd: atime = latest(atime, mtime), both bounded.
    let atime = match h.atime {
        Some(a) if a > h.mtime => a,
        _ => h.mtime,
    };
    Timestamps {
        last_access: bound(atime),
        last_modification: bound(h.mtime),
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One directory whose times are set again at the end.
struct DirTimes {
    path: Vec<u8>,
    times: Timestamps,
}

pub(crate) struct Extractor<'o> {
    root: Rc<OwnedFd>,
    lowers: Vec<OwnedFd>,
    opts: &'o ApplyOptions,
    /// The last directory looked up or created, by relative path.
    cache: Option<(Vec<u8>, Rc<OwnedFd>)>,
    dirs: Vec<DirTimes>,
    buf: Vec<u8>,
    pub counts: Counts,
    pub bytes_written: u64,
    /// Time spent waiting for the tar stream (decompression) while extracting.
    pub read_wait: Duration,
    /// Parent directories made with default attributes because no lower
    /// layer had them (none given) and no entry of the archive set them.
    pub implicit: std::collections::BTreeSet<Vec<u8>>,
}

impl<'o> Extractor<'o> {
    pub fn new(root: OwnedFd, lowers: Vec<OwnedFd>, opts: &'o ApplyOptions) -> Self {
        Extractor {
            root: Rc::new(root),
            lowers,
            opts,
            cache: None,
            dirs: Vec::new(),
            buf: vec![0u8; 256 * 1024],
            counts: Counts::default(),
            bytes_written: 0,
            read_wait: Duration::ZERO,
            implicit: Default::default(),
        }
    }

    /// Applies every entry of the archive, then the directory times.
    pub fn run<R: io::Read>(&mut self, tar: &mut TarReader<R>) -> Result<(), Error> {
        let mut last: Option<Vec<u8>> = None;
        loop {
            let t = Instant::now();
            let next = tar.next_header();
            self.read_wait += t.elapsed();
            let hdr = match next {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(header_error(e, last.as_deref())),
            };
            self.entry(&hdr, tar)?;
            last = Some(hdr.name);
        }
        self.finish_dirs()
    }

    fn entry<R: io::Read>(&mut self, h: &Header, tar: &mut TarReader<R>) -> Result<(), Error> {
        match h.kind {
            Kind::GlobalHeader => {
                tracing::debug!("PAX global header ignored");
                self.counts.skipped += 1;
                return Ok(());
            }
            Kind::Other(t) => {
                return Err(Error::Format(format!(
                    "entry {:?}: unsupported tar entry type {:?}",
                    lossy(&h.name),
                    char::from(t)
                )))
            }
            _ => {}
        }
        self.counts.entries += 1;
        let comps = components(&h.name).map_err(|r| Error::unsafe_entry(&h.name, r))?;
        let Some((&base, parent)) = comps.split_last() else {
            tracing::debug!(entry = %lossy(&h.name), "entry resolves to the root: ignored");
            self.counts.skipped += 1;
            return Ok(());
        };
        tracing::trace!(entry = %lossy(&h.name), kind = ?h.kind, "applying");
        let pfd = self.parent_dir(parent, &h.name)?;

        // OCI whiteouts, converted for overlayfs.
        if base == WHITEOUT_OPAQUE {
            let key = self.opaque_key();
            rfs::fsetxattr(&*pfd, key, b"y", XattrFlags::empty())
                .map_err(|e| Error::entry_io(&format!("setting {key} for"), &h.name, e))?;
            self.counts.opaques += 1;
            return Ok(());
        }
        if base.starts_with(WHITEOUT_META_PREFIX) {
            tracing::debug!(entry = %lossy(&h.name), "whiteout meta entry ignored");
            self.counts.skipped += 1;
            return Ok(());
        }
        if let Some(target) = base.strip_prefix(WHITEOUT_PREFIX) {
            if target.is_empty() || target == b"." || target == b".." {
                return Err(Error::unsafe_entry(&h.name, "invalid whiteout name"));
            }
            rfs::mknodat(
                &*pfd,
                target,
                FileType::CharacterDevice,
                Mode::empty(),
                rfs::makedev(0, 0),
            )
            .map_err(|e| Error::entry_io("creating the whiteout device for", &h.name, e))?;
            rfs::chownat(
                &*pfd,
                target,
                uid(h.uid),
                gid(h.gid),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| Error::entry_io("chowning the whiteout of", &h.name, e))?;
            self.counts.whiteouts += 1;
            return Ok(());
        }

        let name = &h.name;
        match h.kind {
            Kind::Dir => {
                let path = join(&comps);
                let dfd = self.make_dir(&pfd, base, name)?;
                self.set_meta_fd(&dfd, h)?;
                self.implicit.remove(&path);
                self.dirs.push(DirTimes {
                    path: path.clone(),
                    times: timestamps(h),
                });
                // Its children are likely next.
                self.cache = Some((path, Rc::new(dfd)));
                self.counts.dirs += 1;
            }
            Kind::Regular => {
                let fd = self.create_file(&pfd, base, name)?;
                self.write_data(&fd, h, tar)?;
                self.set_meta_fd(&fd, h)?;
                self.counts.files += 1;
            }
            Kind::Symlink => {
                self.create_with(&pfd, base, name, "creating symlink", |p| {
                    rfs::symlinkat(h.link.as_slice(), p, base)
                })?;
                self.set_meta_at(&pfd, base, h, true)?;
                self.counts.symlinks += 1;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                let ft = match h.kind {
                    Kind::Char => FileType::CharacterDevice,
                    Kind::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev = rfs::makedev(h.devmajor, h.devminor);
                self.create_with(&pfd, base, name, "creating device node", |p| {
                    rfs::mknodat(p, base, ft, Mode::from_raw_mode(h.mode), dev)
                })?;
                self.set_meta_at(&pfd, base, h, false)?;
                self.counts.devices += 1;
            }
            Kind::HardLink => {
                self.hard_link(&pfd, base, h)?;
                self.counts.hardlinks += 1;
            }
            Kind::GlobalHeader | Kind::Other(_) => {}
        }
        Ok(())
    }

    fn opaque_key(&self) -> &'static str {
        if self.opts.userxattr {
            "user.overlay.opaque"
        } else {
            "trusted.overlay.opaque"
        }
    }

    /// The directory `comps` (relative to the root), creating missing ones
    /// as containerd's `mkparent` does (0755, or copied from the first lower
    /// directory that has it).
    fn parent_dir(&mut self, comps: &[&[u8]], entry: &[u8]) -> Result<Rc<OwnedFd>, Error> {
        if comps.is_empty() {
            return Ok(self.root.clone());
        }
        let path = join(comps);
        if let Some((p, fd)) = &self.cache {
            if *p == path {
                return Ok(fd.clone());
            }
        }
        let fd = match open_beneath(self.root.as_fd(), &path, dir_flags2()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => self.make_parents(comps, entry)?,
            Err(e) => return Err(lookup_error(e, entry, "its parent directory")),
        };
        let fd = Rc::new(fd);
        self.cache = Some((path, fd.clone()));
        Ok(fd)
    }

    fn make_parents(&mut self, comps: &[&[u8]], entry: &[u8]) -> Result<OwnedFd, Error> {
        let mut cur: Option<OwnedFd> = None;
        for (i, &c) in comps.iter().enumerate() {
            let at = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let next = match open_beneath(at, c, dir_flags2()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rfs::mkdirat(at, c, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => {
                            return Err(Error::entry_io("creating a parent directory of", entry, e))
                        }
                    }
                    let fd = open_beneath(at, c, dir_flags2())
                        .map_err(|e| lookup_error(e, entry, "its parent directory"))?;
                    rfs::fchmod(&fd, Mode::from_raw_mode(0o755))
                        .map_err(|e| Error::entry_io("chmod of a parent directory of", entry, e))?;
                    let path = join(&comps[..=i]);
                    if !self.copy_from_lower(&fd, &path, entry, true)? {
                        self.implicit.insert(path);
                    }
                    fd
                }
                Err(e) => return Err(lookup_error(e, entry, "its parent directory")),
            };
            cur = Some(next);
        }
        // comps is not empty, so the loop ran.
        cur.ok_or_else(|| Error::unsafe_entry(entry, "empty parent path"))
    }

    /// The directory at `path` under the root, if it is one (no symlink
    /// followed).
    pub(crate) fn open_dir_beneath(&self, path: &[u8]) -> Result<Option<OwnedFd>, Error> {
        match open_beneath(self.root.as_fd(), path, dir_flags2()) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) | Err(Errno::XDEV) => {
                Ok(None)
            }
            Err(e) => Err(Error::entry_io("opening directory", path, e)),
        }
    }

    /// containerd's `copyDirInfo` + `copyUpXAttrs` from the first lower layer
    /// that has `path` (times too when `times`); a lower that has a
    /// non-directory there stops the search. Whether a lower decided.
    pub(crate) fn copy_from_lower(
        &self,
        fd: &OwnedFd,
        path: &[u8],
        entry: &[u8],
        times: bool,
    ) -> Result<bool, Error> {
        for lower in &self.lowers {
            let lfd = match open_beneath(lower.as_fd(), path, dir_flags2()) {
                Ok(f) => f,
                Err(Errno::NOENT) => continue,
                // A symlink or a file in the lower: default permissions.
                Err(Errno::LOOP) | Err(Errno::NOTDIR) | Err(Errno::XDEV) => return Ok(true),
                Err(e) => {
                    return Err(Error::entry_io(
                        "looking up a lower directory for",
                        entry,
                        e,
                    ))
                }
            };
            let st = rfs::fstat(&lfd)
                .map_err(|e| Error::entry_io("stat of a lower directory for", entry, e))?;
            let ctx = "copying lower directory attributes for";
            rfs::fchown(fd, uid(st.st_uid), gid(st.st_gid))
                .map_err(|e| Error::entry_io(ctx, entry, e))?;
            rfs::fchmod(fd, Mode::from_raw_mode(st.st_mode))
                .map_err(|e| Error::entry_io(ctx, entry, e))?;
            let ts = Timestamps {
                last_access: Timespec {
                    tv_sec: st.st_atime as i64,
                    tv_nsec: st.st_atime_nsec as _,
                },
                last_modification: Timespec {
                    tv_sec: st.st_mtime as i64,
                    tv_nsec: st.st_mtime_nsec as _,
                },
            };
            if times {
                rfs::futimens(fd, &ts).map_err(|e| Error::entry_io(ctx, entry, e))?;
            }
            copy_xattrs(&lfd, fd).map_err(|e| Error::entry_io(ctx, entry, e))?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Removes whatever is at `parent/base` (recursively).
    fn clear(&mut self, parent: &OwnedFd, base: &[u8], entry: &[u8]) -> Result<(), Error> {
        // A cached directory may be the one removed, or under it.
        self.cache = None;
        remove_tree(parent.as_fd(), base)
            .map_err(|e| Error::entry_io("removing the earlier entry replaced by", entry, e))
    }

    /// Runs `create`; if something is there already, removes it (as
    /// containerd does for an entry that replaces an earlier one) and retries.
    fn create_with(
        &mut self,
        parent: &OwnedFd,
        base: &[u8],
        entry: &[u8],
        what: &str,
        mut create: impl FnMut(BorrowedFd<'_>) -> Result<(), Errno>,
    ) -> Result<(), Error> {
        match create(parent.as_fd()) {
            Ok(()) => return Ok(()),
            Err(Errno::EXIST) => {}
            Err(e) => return Err(Error::entry_io(what, entry, e)),
        }
        self.clear(parent, base, entry)?;
        create(parent.as_fd()).map_err(|e| Error::entry_io(what, entry, e))
    }

    fn create_file(
        &mut self,
        parent: &OwnedFd,
        base: &[u8],
        entry: &[u8],
    ) -> Result<OwnedFd, Error> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let open = || rfs::openat(parent, base, flags, Mode::from_raw_mode(0o600));
        match open() {
            Ok(fd) => Ok(fd),
            Err(Errno::EXIST) => {
                self.clear(parent, base, entry)?;
                open().map_err(|e| Error::entry_io("creating file", entry, e))
            }
            Err(e) => Err(Error::entry_io("creating file", entry, e)),
        }
    }

    /// mkdir, keeping an existing directory (containerd merges them) and
    /// replacing anything else.
    fn make_dir(&mut self, parent: &OwnedFd, base: &[u8], entry: &[u8]) -> Result<OwnedFd, Error> {
        match rfs::mkdirat(parent, base, Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                let st = rfs::statat(parent, base, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| Error::entry_io("stat of", entry, e))?;
                if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                    self.clear(parent, base, entry)?;
                    rfs::mkdirat(parent, base, Mode::from_raw_mode(0o700))
                        .map_err(|e| Error::entry_io("creating directory", entry, e))?;
                }
            }
            Err(e) => return Err(Error::entry_io("creating directory", entry, e)),
        }
        rfs::openat(parent, base, dir_flags(), Mode::empty())
            .map_err(|e| Error::entry_io("opening directory", entry, e))
    }

    fn write_data<R: io::Read>(
        &mut self,
        fd: &OwnedFd,
        h: &Header,
        tar: &mut TarReader<R>,
    ) -> Result<(), Error> {
        match &h.sparse {
            None => loop {
                let t = Instant::now();
                let n = tar.read_data(&mut self.buf);
                self.read_wait += t.elapsed();
                let n = n.map_err(|e| tar_error(TarError::Io(e, String::new()), Some(&h.name)))?;
                if n == 0 {
                    break;
                }
                write_all(fd, &self.buf[..n])
                    .map_err(|e| Error::entry_io("writing", &h.name, e))?;
                self.bytes_written += n as u64;
            },
            Some(map) => {
                for &(mut off, mut len) in map {
                    while len > 0 {
                        let k = usize::try_from(len.min(self.buf.len() as u64))
                            .unwrap_or(self.buf.len());
                        let t = Instant::now();
                        let r = tar.read_data_exact(&mut self.buf[..k]);
                        self.read_wait += t.elapsed();
                        r.map_err(|e| tar_error(TarError::Io(e, String::new()), Some(&h.name)))?;
                        let mut done = 0;
                        while done < k {
                            let w = rustix::io::pwrite(fd, &self.buf[done..k], off)
                                .map_err(|e| Error::entry_io("writing", &h.name, e))?;
                            if w == 0 {
                                return Err(Error::entry_io(
                                    "writing",
                                    &h.name,
                                    io::Error::from(io::ErrorKind::WriteZero),
                                ));
                            }
                            done += w;
                            off += w as u64;
                        }
                        len -= k as u64;
                        self.bytes_written += k as u64;
                    }
                }
                // The holes, including a trailing one.
                rfs::ftruncate(fd, h.size)
                    .map_err(|e| Error::entry_io("setting the size of", &h.name, e))?;
            }
        }
        Ok(())
    }

    /// Owner, xattrs, mode and times through an fd (files and directories),
    /// in containerd's order: chown clears setuid bits and
    /// security.capability, so it comes first.
    fn set_meta_fd(&self, fd: &OwnedFd, h: &Header) -> Result<(), Error> {
        rfs::fchown(fd, uid(h.uid), gid(h.gid))
            .map_err(|e| Error::entry_io("chown of", &h.name, e))?;
        for (k, v) in &h.xattrs {
            if !self.xattr_wanted(k, &h.name) {
                continue;
            }
            let r = rfs::fsetxattr(fd, k.as_slice(), v, XattrFlags::empty());
            self.xattr_result(r, k, &h.name, true)?;
        }
        rfs::fchmod(fd, Mode::from_raw_mode(h.mode))
            .map_err(|e| Error::entry_io("chmod of", &h.name, e))?;
        rfs::futimens(fd, &timestamps(h))
            .map_err(|e| Error::entry_io("setting times of", &h.name, e))
    }

    /// The same for objects that cannot be opened safely (symlinks, device
    /// nodes, fifos, hard links), by name relative to the parent fd.
    fn set_meta_at(
        &self,
        parent: &OwnedFd,
        base: &[u8],
        h: &Header,
        is_symlink: bool,
    ) -> Result<(), Error> {
        rfs::chownat(
            parent,
            base,
            uid(h.uid),
            gid(h.gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| Error::entry_io("chown of", &h.name, e))?;
        // xattrs: the parent directory through its fd, then one component,
        // not followed (lsetxattr); there is no lsetxattrat before Linux 6.13.
        let wanted: Vec<_> = h
            .xattrs
            .iter()
            .filter(|(k, _)| self.xattr_wanted(k, &h.name))
            .collect();
        if !wanted.is_empty() {
            let mut p = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
            p.extend_from_slice(base);
            let proc_path = CString::new(p)
                .map_err(|_| Error::unsafe_entry(&h.name, "name contains a NUL byte"))?;
            let st = rfs::statat(parent, base, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| Error::entry_io("stat of", &h.name, e))?;
            let reg_or_dir = matches!(
                FileType::from_raw_mode(st.st_mode),
                FileType::RegularFile | FileType::Directory
            );
            for (k, v) in wanted {
                let r = rfs::lsetxattr(proc_path.as_c_str(), k.as_slice(), v, XattrFlags::empty());
                self.xattr_result(r, k, &h.name, reg_or_dir)?;
            }
        }
        if !is_symlink {
            chmod_nofollow(parent, base, h.mode)
                .map_err(|e| Error::entry_io("chmod of", &h.name, e))?;
        }
        rfs::utimensat(parent, base, &timestamps(h), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::entry_io("setting times of", &h.name, e))
    }

    /// containerd refuses `trusted.*` from archives (ENOTSUP, logged and
    /// ignored). With `userxattr`, `user.overlay.*` are overlayfs' own
    /// attributes (opaque, redirect, metacopy) and are ignored the same way.
    fn xattr_wanted(&self, key: &[u8], entry: &[u8]) -> bool {
        let refused = key.starts_with(b"trusted.")
            || (self.opts.userxattr && key.starts_with(b"user.overlay."));
        if refused {
            tracing::warn!(entry = %lossy(entry), xattr = %lossy(key), "ignored xattr in archive");
        }
        !refused
    }

    fn xattr_result(
        &self,
        r: Result<(), Errno>,
        key: &[u8],
        entry: &[u8],
        reg_or_dir: bool,
    ) -> Result<(), Error> {
        match r {
            Ok(()) => Ok(()),
            Err(Errno::PERM) if key.starts_with(b"user.") && !reg_or_dir => {
                tracing::warn!(entry = %lossy(entry), xattr = %lossy(key), "ignored xattr in archive (EPERM)");
                Ok(())
            }
            Err(Errno::NOTSUP) => {
                tracing::warn!(entry = %lossy(entry), xattr = %lossy(key), "ignored xattr in archive (ENOTSUP)");
                Ok(())
            }
            Err(e) => Err(Error::entry_io(
                &format!("setting xattr {:?} on", lossy(key)),
                entry,
                e,
            )),
        }
    }

    fn hard_link(&mut self, pfd: &Rc<OwnedFd>, base: &[u8], h: &Header) -> Result<(), Error> {
        let tcomps = components(&h.link)
            .map_err(|r| Error::unsafe_entry(&h.name, format!("hard link target: {r}")))?;
        let Some((&tbase, tparent)) = tcomps.split_last() else {
            return Err(Error::unsafe_entry(
                &h.name,
                "hard link target is the layer root",
            ));
        };
        // Never created: the target must already be in this layer.
        let tfd: Rc<OwnedFd> = if tparent.is_empty() {
            self.root.clone()
        } else {
            match open_beneath(self.root.as_fd(), &join(tparent), dir_flags2()) {
                Ok(f) => Rc::new(f),
                Err(Errno::LOOP) => {
                    return Err(Error::unsafe_entry(
                        &h.name,
                        "hard link target goes through a symlink",
                    ))
                }
                Err(Errno::XDEV) => {
                    return Err(Error::unsafe_entry(
                        &h.name,
                        "hard link target is outside the layer",
                    ))
                }
                Err(e) => {
                    return Err(Error::entry_io(
                        "looking up the hard link target of",
                        &h.name,
                        e,
                    ))
                }
            }
        };
        let name = h.name.clone();
        self.create_with(pfd, base, &name, "creating hard link", |p| {
            rfs::linkat(&*tfd, tbase, p, base, AtFlags::empty())
        })?;
        // The target may be a symlink: chmod_nofollow leaves it alone.
        self.set_meta_at(pfd, base, h, false)
    }

    /// Directory times again, now that their children are in.
    fn finish_dirs(&mut self) -> Result<(), Error> {
        self.cache = None;
        for d in std::mem::take(&mut self.dirs) {
            match open_beneath(self.root.as_fd(), &d.path, dir_flags2()) {
                Ok(fd) => rfs::futimens(&fd, &d.times)
                    .map_err(|e| Error::entry_io("setting times of directory", &d.path, e))?,
                // Replaced by a later entry of the layer.
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                    tracing::debug!(dir = %lossy(&d.path), "directory gone before its times were set")
                }
                Err(e) => return Err(Error::entry_io("opening directory", &d.path, e)),
            }
        }
        Ok(())
    }
}

/// chmod without following a symlink: fchmodat has no AT_SYMLINK_NOFOLLOW
/// (fchmodat2 is Linux 6.6+), so open the object O_PATH|O_NOFOLLOW and
/// chmod it through its /proc/self/fd magic link, which names that inode.
/// Symlinks are left alone (their mode means nothing), as containerd's lchmod.
fn chmod_nofollow(parent: &OwnedFd, base: &[u8], mode: u32) -> Result<(), Errno> {
    let fd = rfs::openat(
        parent,
        base,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rfs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        return Ok(());
    }
    rfs::chmod(
        format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(),
        Mode::from_raw_mode(mode),
    )
}

fn write_all(fd: &OwnedFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn uid(u: u32) -> Option<rustix::fs::Uid> {
    Some(rustix::fs::Uid::from_raw(u))
}

fn gid(g: u32) -> Option<rustix::fs::Gid> {
    Some(rustix::fs::Gid::from_raw(g))
}

fn lookup_error(e: Errno, entry: &[u8], what: &str) -> Error {
    match e {
        Errno::LOOP => Error::unsafe_entry(entry, format!("{what} goes through a symlink")),
        Errno::XDEV => Error::unsafe_entry(entry, format!("{what} leaves the layer directory")),
        e => Error::entry_io(&format!("looking up {what} of"), entry, e),
    }
}

/// A failure to read a header, naming the entry before it.
fn header_error(e: TarError, last: Option<&[u8]>) -> Error {
    let place = match last {
        Some(n) => format!("the header after entry {:?}", lossy(n)),
        None => "the first header".to_string(),
    };
    match e {
        TarError::Format(m) => Error::Format(format!("{place}: {m}")),
        TarError::Io(e, _) => crate::decode::classify(e, &format!("reading {place}")),
    }
}

/// Maps a tar-level error, naming the entry being read if any.
pub(crate) fn tar_error(e: TarError, entry: Option<&[u8]>) -> Error {
    let ctx = match entry {
        Some(n) => format!("reading the data of entry {:?}", lossy(n)),
        None => "reading a tar header".to_string(),
    };
    match e {
        TarError::Format(m) => match entry {
            Some(n) => Error::Format(format!("entry {:?}: {m}", lossy(n))),
            None => Error::Format(m),
        },
        TarError::Io(e, what) => {
            let what = if what.is_empty() { ctx } else { what };
            crate::decode::classify(e, &what)
        }
    }
}

/// Removes `base` under `parent`, recursively, never following symlinks.
/// Holds one fd per directory level.
fn remove_tree(parent: BorrowedFd<'_>, base: &[u8]) -> io::Result<()> {
    match rfs::unlinkat(parent, base, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let dfd = rfs::openat(parent, base, dir_flags(), Mode::empty())?;
    let mut names: Vec<Vec<u8>> = Vec::new();
    {
        let dir = rfs::Dir::read_from(&dfd)?;
        for ent in dir {
            let ent = ent?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
    }
    for n in names {
        remove_tree(dfd.as_fd(), &n)?;
    }
    drop(dfd);
    rfs::unlinkat(parent, base, AtFlags::REMOVEDIR)?;
    Ok(())
}

/// Copies xattrs from `src` to `dst` with XATTR_CREATE, skipping `trusted.*`
/// (containerd) and `user.overlay.*` (overlayfs' own).
fn copy_xattrs(src: &OwnedFd, dst: &OwnedFd) -> Result<(), Errno> {
    let size = match rfs::flistxattr_query(src) {
        Ok(n) => n,
        Err(Errno::NOTSUP) | Err(Errno::NODATA) => return Ok(()),
        Err(e) => return Err(e),
    };
    if size == 0 {
        return Ok(());
    }
    let mut list = vec![0u8; size];
    let n = rfs::flistxattr(src, &mut list[..])?;
    list.truncate(n);
    for name in list.split(|&c| c == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(b"trusted.") || name.starts_with(b"user.overlay.") {
            continue;
        }
        let vsize = match rfs::fgetxattr_query(src, name) {
            Ok(n) => n,
            Err(Errno::NOTSUP) | Err(Errno::NODATA) => continue,
            Err(e) => return Err(e),
        };
        let mut value = vec![0u8; vsize];
        let vn = match rfs::fgetxattr(src, name, &mut value[..]) {
            Ok(n) => n,
            Err(Errno::NOTSUP) | Err(Errno::NODATA) => continue,
            Err(e) => return Err(e),
        };
        value.truncate(vn);
        match rfs::fsetxattr(dst, name, &value, XattrFlags::CREATE) {
            Ok(()) | Err(Errno::NOTSUP) | Err(Errno::NODATA) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
