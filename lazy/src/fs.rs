//! A lazy layer as a read-only FUSE filesystem (`fuser`): the tree of its
//! TOC, in the form overlayfs wants for a lower layer, with file contents
//! read chunk by chunk through [`Layer`] (cache, or a verified range
//! request). Mounted `ro,nosuid,nodev`, with the kernel checking
//! permissions (`default_permissions`). A chunk that cannot be fetched or
//! verified is EIO.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
    ReplyXattr, Request, SessionACL,
};

use crate::estargz::Kind;
use crate::fetch::Layer;

/// The layer never changes: the kernel may keep what it looked up.
const TTL: Duration = Duration::from_secs(3600);

/// The filesystem of one layer.
pub struct LayerFs {
    layer: Arc<Layer>,
    /// `user.overlay.opaque` instead of `trusted.overlay.opaque`.
    userxattr: bool,
}

fn idx(ino: INodeNo) -> Option<usize> {
    usize::try_from(ino.0).ok()?.checked_sub(1)
}

fn makedev(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

impl LayerFs {
    /// The filesystem of `layer`.
    pub fn new(layer: Arc<Layer>, userxattr: bool) -> LayerFs {
        LayerFs { layer, userxattr }
    }

    fn attr(&self, i: usize) -> FileAttr {
        let n = &self.layer.toc().nodes[i];
        let kind = match n.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
            Kind::Symlink => FileType::Symlink,
            Kind::Char | Kind::Whiteout => FileType::CharDevice,
            Kind::Block => FileType::BlockDevice,
            Kind::Fifo => FileType::NamedPipe,
        };
        let t = if n.mtime >= 0 {
            UNIX_EPOCH + Duration::from_secs(n.mtime.unsigned_abs())
        } else {
            UNIX_EPOCH
                .checked_sub(Duration::from_secs(n.mtime.unsigned_abs()))
                .unwrap_or(UNIX_EPOCH)
        };
        FileAttr {
            ino: INodeNo(i as u64 + 1),
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: (n.mode & 0o7777) as u16,
            nlink: n.nlink.max(1),
            uid: n.uid,
            gid: n.gid,
            rdev: match n.kind {
                Kind::Char | Kind::Block => makedev(n.dev.0, n.dev.1),
                _ => 0,
            },
            blksize: 4096,
            flags: 0,
        }
    }

    /// The node's xattrs as the mount shows them.
    fn xattrs(&self, i: usize) -> Vec<(String, &[u8])> {
        self.layer.toc().nodes[i]
            .xattrs
            .iter()
            // Under userxattr, overlayfs reads user.overlay.*: a layer may
            // not set those (as in strata's unpack).
            .filter(|(k, _)| !(self.userxattr && k.starts_with("user.overlay.")))
            .map(|(k, v)| {
                let k = match (k.as_str(), self.userxattr) {
                    ("trusted.overlay.opaque", true) => "user.overlay.opaque".to_string(),
                    _ => k.clone(),
                };
                (k, v.as_slice())
            })
            .collect()
    }

    fn node(&self, ino: INodeNo) -> Result<usize, Errno> {
        idx(ino)
            .filter(|&i| i < self.layer.toc().nodes.len())
            .ok_or(Errno::ENOENT)
    }

    /// Reads `size` bytes at `offset` of file `i`.
    fn read_file(&self, i: usize, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let n = &self.layer.toc().nodes[i];
        if n.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        let end = n.size.min(offset.saturating_add(u64::from(size)));
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let ci = n.chunks.partition_point(|c| c.file_offset + c.size <= at);
            let Some(c) = n.chunks.get(ci) else {
                return Err(Errno::EIO);
            };
            let data = self.layer.chunk(i, ci).map_err(|e| {
                tracing::error!(error = %e, "lazy read failed");
                Errno::EIO
            })?;
            let lo = (at - c.file_offset) as usize;
            let hi = ((end - c.file_offset) as usize).min(data.len());
            if lo >= hi {
                return Err(Errno::EIO);
            }
            out.extend_from_slice(&data[lo..hi]);
            at = c.file_offset + hi as u64;
        }
        Ok(out)
    }
}

fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for LayerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.node(parent).and_then(|p| {
            let name = name.to_str().ok_or(Errno::ENOENT)?;
            self.layer.toc().nodes[p]
                .children
                .get(name)
                .copied()
                .ok_or(Errno::ENOENT)
        });
        match found {
            Ok(i) => reply.entry(&TTL, &self.attr(i), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(i) => reply.attr(&TTL, &self.attr(i)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino) {
            Ok(i) if self.layer.toc().nodes[i].kind == Kind::Symlink => {
                reply.data(self.layer.toc().nodes[i].link.as_bytes())
            }
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::RDWR;
        if rustix::fs::OFlags::from_bits_retain(flags.0 as u32).intersects(write) {
            return reply.error(Errno::EROFS);
        }
        match self.node(ino) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.node(ino).and_then(|i| self.read_file(i, offset, size)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let i = match self.node(ino) {
            Ok(i) if self.layer.toc().nodes[i].kind == Kind::Dir => i,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let n = &self.layer.toc().nodes[i];
        let parent = INodeNo(n.parent as u64 + 1);
        let dots = [
            (ino, FileType::Directory, "."),
            (parent, FileType::Directory, ".."),
        ];
        let entries = dots
            .into_iter()
            .map(|(a, b, c)| (a, b, c.to_string()))
            .chain(
                n.children
                    .iter()
                    .map(|(name, &c)| (INodeNo(c as u64 + 1), self.attr(c).kind, name.clone())),
            );
        for (k, (child, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(child, k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let i = match self.node(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let want = name.to_string_lossy();
        match self.xattrs(i).into_iter().find(|(k, _)| *k == want) {
            Some((_, v)) => reply_xattr(v, size, reply),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let i = match self.node(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let mut list = Vec::new();
        for (k, _) in self.xattrs(i) {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        reply_xattr(&list, size, reply);
    }
}

/// The directory at `path` in the first of `lowers` (uppermost first) that
/// has something there: its attributes if it is a directory reached
/// through directories only (no symlink is followed), else `None`. For
/// [`crate::estargz::Toc::adopt_parents`].
pub fn lower_dir(lowers: &[std::path::PathBuf], path: &str) -> Option<crate::estargz::DirAttrs> {
    use std::os::unix::fs::MetadataExt;
    'lowers: for l in lowers {
        let mut at = l.clone();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            at.push(c);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return None,
                Err(_) => continue 'lowers,
            }
        }
        let m = std::fs::symlink_metadata(&at).ok()?;
        let mut xattrs = std::collections::BTreeMap::new();
        let mut names = vec![0u8; 64 * 1024];
        if let Ok(n) = rustix::fs::llistxattr(&at, &mut names) {
            for name in names[..n].split(|&b| b == 0).filter(|b| !b.is_empty()) {
                let name = String::from_utf8_lossy(name).into_owned();
                let mut v = vec![0u8; 64 * 1024];
                if let Ok(len) = rustix::fs::lgetxattr(&at, name.as_str(), &mut v) {
                    v.truncate(len);
                    xattrs.insert(name, v);
                }
            }
        }
        return Some(crate::estargz::DirAttrs {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            xattrs,
        });
    }
    None
}

/// A mounted layer; unmounted when dropped (or by [`Mounted::unmount`]).
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    mountpoint: std::path::PathBuf,
}

impl Mounted {
    /// Detaches the mount (`MNT_DETACH`: an overlay that still uses the
    /// layer keeps it until it goes; nothing waits for that). The session's
    /// thread ends when the kernel closes the connection.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.detach()
    }

    fn detach(&mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let r = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH)
            .map_err(std::io::Error::from);
        // Not joined: its thread serves until the last user lets go.
        drop(session);
        r
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!(mount = %self.mountpoint.display(), error = %e, "unmounting a lazy layer failed");
        }
    }
}

/// Mounts `fs` at `mountpoint` (an empty directory): read-only, nosuid,
/// nodev, served by a background thread pool.
pub fn mount(fs: LayerFs, mountpoint: &Path, name: &str) -> std::io::Result<Mounted> {
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::DefaultPermissions,
        MountOption::FSName(name.to_string()),
        MountOption::Subtype("strata-lazy".into()),
    ];
    // Containers read through overlayfs as any user.
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(4);
    let session = fuser::spawn_mount(fs, mountpoint, &cfg)?;
    Ok(Mounted {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
    })
}
