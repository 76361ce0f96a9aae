//! A lazy layer as a read-only FUSE filesystem (`fuser`): the tree of its
//! TOC, in the form overlayfs wants for a lower layer, with file contents
//! read chunk by chunk through [`Layer`] (cache, or a verified range
//! request). Mounted `ro,nosuid,nodev`, with the kernel checking
//! permissions (`default_permissions`). A chunk that cannot be fetched or
//! verified is EIO.
//!
//! A file whose every chunk is cached is opened through FUSE passthrough
//! where the kernel has it (6.9+): its reads go from the kernel straight
//! to a verified file of the cache ([`Layer::whole_file`]), without this
//! daemon. The kernel refuses (EIO) an open in one mode while the inode is
//! open in the other, so an inode stays in the mode of its first open
//! until its last handle is released, and all its passthrough opens share
//! one backing file.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request, SessionACL,
};

use crate::estargz::Kind;
use crate::fetch::Layer;

/// The layer never changes: the kernel may keep what it looked up.
const TTL: Duration = Duration::from_secs(3600);

/// What a mount's opens went through.
#[derive(Debug, Default)]
pub struct OpenStats {
    /// Whether the kernel took FUSE passthrough at mount time (and no
    /// backing file was refused since).
    pub passthrough: AtomicBool,
    /// Opens answered with a passthrough backing file.
    pub passthrough_opens: AtomicU64,
    /// Opens whose reads come through this daemon.
    pub daemon_opens: AtomicU64,
    /// Handles open now (released ones are gone).
    pub open_handles: AtomicU64,
}

/// How an inode is open now.
enum Mode {
    /// Read through the daemon, by this many handles.
    Daemon(usize),
    /// Passthrough to one backing file, by this many handles.
    Passthrough(usize, Arc<BackingId>),
}

/// Files waiting for the background worker.
#[derive(Default)]
struct WholeQueue {
    files: std::collections::VecDeque<usize>,
    queued: std::collections::HashSet<usize>,
    running: bool,
}

#[derive(Default)]
struct Opens {
    next_fh: u64,
    /// Handle → inode.
    handles: HashMap<u64, usize>,
    modes: HashMap<usize, Mode>,
}

/// The filesystem of one layer.
pub struct LayerFs {
    layer: Arc<Layer>,
    /// `user.overlay.opaque` instead of `trusted.overlay.opaque`.
    userxattr: bool,
    /// Try FUSE passthrough for fully cached files.
    want_passthrough: bool,
    stats: Arc<OpenStats>,
    opens: Mutex<Opens>,
    whole_queue: Arc<Mutex<WholeQueue>>,
}

fn idx(ino: INodeNo) -> Option<usize> {
    usize::try_from(ino.0).ok()?.checked_sub(1)
}

fn makedev(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

impl LayerFs {
    /// The filesystem of `layer`; with `passthrough`, fully cached files
    /// are opened through FUSE passthrough where the kernel has it.
    pub fn new(layer: Arc<Layer>, userxattr: bool, passthrough: bool) -> LayerFs {
        LayerFs {
            layer,
            userxattr,
            want_passthrough: passthrough,
            stats: Arc::new(OpenStats::default()),
            opens: Mutex::new(Opens::default()),
            whole_queue: Arc::default(),
        }
    }

    /// What the mount's opens went through.
    pub fn stats(&self) -> Arc<OpenStats> {
        self.stats.clone()
    }

    fn opens(&self) -> std::sync::MutexGuard<'_, Opens> {
        self.opens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues file `i` for the layer's background worker, which checks or
    /// puts the whole file together (if its chunks are all cached) so that
    /// a later open can pass through at once. One worker per layer, one
    /// file at a time; it stops when the layer goes.
    fn prepare_whole(&self, i: usize) {
        if !self.stats.passthrough.load(Ordering::Relaxed)
            || self.layer.is_cancelled()
            || !self.layer.fully_cached(i)
        {
            return;
        }
        let mut q = self.whole_queue.lock().unwrap_or_else(|p| p.into_inner());
        if !q.queued.insert(i) {
            return;
        }
        q.files.push_back(i);
        if q.running {
            return;
        }
        q.running = true;
        drop(q);
        let (layer, queue) = (self.layer.clone(), self.whole_queue.clone());
        let spawned = std::thread::Builder::new()
            .name("strata-lazy-whole".into())
            .spawn(move || loop {
                let next = {
                    let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                    match q.files.pop_front().filter(|_| !layer.is_cancelled()) {
                        Some(i) => i,
                        None => {
                            q.files.clear();
                            q.queued.clear();
                            q.running = false;
                            return;
                        }
                    }
                };
                layer.prepare_whole(next);
                queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .queued
                    .remove(&next);
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "no worker to put files together now");
            let mut q = self.whole_queue.lock().unwrap_or_else(|p| p.into_inner());
            q.files.clear();
            q.queued.clear();
            q.running = false;
        }
    }

    /// Answers an open of file `i`: passthrough if the inode is in that
    /// mode already, or is not open and is fully cached; else through the
    /// daemon.
    fn open_file(&self, i: usize, reply: ReplyOpen) {
        let fresh = {
            let o = self.opens();
            !o.modes.contains_key(&i)
        };
        // Outside the lock (a small file is checked now); never anything
        // slow: a file not ready goes to the background worker.
        let whole = if fresh && self.stats.passthrough.load(Ordering::Relaxed) {
            let w = self.layer.whole_file(i);
            if w.is_none() {
                self.prepare_whole(i);
            }
            w
        } else {
            None
        };
        let mut o = self.opens();
        o.next_fh += 1;
        let fh = o.next_fh;
        o.handles.insert(fh, i);
        self.stats.open_handles.fetch_add(1, Ordering::Relaxed);
        match o.modes.get_mut(&i) {
            Some(Mode::Daemon(n)) => {
                *n += 1;
                self.stats.daemon_opens.fetch_add(1, Ordering::Relaxed);
                return reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Some(Mode::Passthrough(n, id)) => {
                *n += 1;
                self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
            }
            None => {}
        }
        let backing = whole.and_then(|f| match reply.open_backing(&f) {
            Ok(id) => Some(Arc::new(id)),
            Err(e) => {
                // The kernel refuses this mount's backing files (a cache on
                // a stacked filesystem, no privilege): no passthrough on it
                // any more. Anything else (EMFILE, ENOMEM): not this time.
                use rustix::io::Errno as E;
                let refused = matches!(
                    E::from_io_error(&e),
                    Some(E::PERM | E::OPNOTSUPP | E::LOOP | E::INVAL)
                );
                if refused {
                    tracing::warn!(error = %e, "FUSE passthrough refused: reads go through strata");
                    self.stats.passthrough.store(false, Ordering::Relaxed);
                } else {
                    tracing::debug!(error = %e, "no passthrough for this open");
                }
                None
            }
        });
        match backing {
            Some(id) => {
                if self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::info!(path = %self.layer.toc().path(i), "first open through FUSE passthrough on this layer");
                }
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                o.modes.insert(i, Mode::Passthrough(1, id));
            }
            None => {
                self.stats.daemon_opens.fetch_add(1, Ordering::Relaxed);
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
                o.modes.insert(i, Mode::Daemon(1));
            }
        }
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
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if self.want_passthrough {
            // Depth 1: backing files on a plain filesystem, and this mount
            // still stackable under overlayfs.
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!(
                    "the kernel has no FUSE passthrough: cached reads go through strata"
                );
            }
            self.stats.passthrough.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

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
            Ok(i) if self.layer.toc().nodes[i].kind == Kind::File => self.open_file(i, reply),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut prepare = None;
        {
            let mut o = self.opens();
            if let Some(i) = o.handles.remove(&fh.into()) {
                self.stats.open_handles.fetch_sub(1, Ordering::Relaxed);
                let last = match o.modes.get_mut(&i) {
                    Some(Mode::Daemon(n) | Mode::Passthrough(n, _)) => {
                        *n = n.saturating_sub(1);
                        *n == 0
                    }
                    None => false,
                };
                // A passthrough inode's backing file is closed with it.
                if last && matches!(o.modes.remove(&i), Some(Mode::Daemon(_))) {
                    prepare = Some(i);
                }
            }
        }
        reply.ok();
        // Read through strata and now all cached: ready it for passthrough.
        if let Some(i) = prepare {
            self.prepare_whole(i);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::{ChunkCache, RangeReader};

    struct Counted {
        blob: Vec<u8>,
        reads: AtomicU64,
    }

    impl RangeReader for Counted {
        fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let r = offset as usize..(offset + len) as usize;
            self.blob
                .get(r)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::Error::other("past the end"))
        }
    }

    fn bytes(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn wait_released(stats: &OpenStats) {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while stats.open_handles.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Needs root and /dev/fuse (as the daemon does).
    #[test]
    fn cached_files_pass_through_and_modes_never_mix() -> std::io::Result<()> {
        let one = bytes(300_000, 1);
        let multi: Vec<Vec<u8>> = (0..3).map(|i| bytes(200_000, 10 + i)).collect();
        let whole_multi = multi.concat();
        // A chunk larger than a read's window between them: reading one
        // does not fetch the other.
        let (toc, blob) = crate::estargz::tests_layer(&[
            ("one", vec![one.clone()]),
            (
                "pad",
                vec![bytes(2 * crate::fetch::READ_WINDOW as usize, 5)],
            ),
            ("multi", multi),
        ])?;
        let dir =
            std::env::temp_dir().join(format!("strata-passthrough-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt)?;
        let reader = Arc::new(Counted {
            blob,
            reads: AtomicU64::new(0),
        });
        let layer = Arc::new(Layer::new(
            Arc::new(toc),
            reader.clone(),
            Arc::new(ChunkCache::open(&dir.join("cache"), 64 << 20)?),
            "repo",
        ));
        let fs = LayerFs::new(layer.clone(), false, true);
        let stats = fs.stats();
        let mounted = mount(fs, &mnt, "strata-test")?;
        let multi_node = layer
            .toc()
            .lookup("multi")
            .ok_or_else(|| std::io::Error::other("multi"))?;
        let (p_one, p_multi) = (mnt.join("one"), mnt.join("multi"));

        // Nothing cached: read through the daemon, fetched.
        use std::io::Read as _;
        assert_eq!(std::fs::read(&p_one)?, one);
        let mut held = std::fs::File::open(&p_multi)?;
        let mut got = Vec::new();
        held.read_to_end(&mut got)?;
        assert_eq!(got, whole_multi);
        assert_eq!(stats.open_handles.load(Ordering::SeqCst), 1);
        // Now fully cached, but open through the daemon: a second open
        // must stay in that mode (the kernel would refuse a mix with EIO).
        assert_eq!(std::fs::read(&p_multi)?, whole_multi);
        drop(held);
        wait_released(&stats);
        assert_eq!(stats.passthrough_opens.load(Ordering::SeqCst), 0);
        assert_eq!(stats.daemon_opens.load(Ordering::SeqCst), 3);
        let fetches = reader.reads.load(Ordering::SeqCst);
        assert!(fetches > 0);

        if !stats.passthrough.load(Ordering::SeqCst) {
            eprintln!("this kernel has no FUSE passthrough: only reads through strata were tested");
        } else {
            // Every chunk cached, nothing open: passthrough, for the file of
            // one chunk (its chunk's cache file, checked at open) and the one
            // the background worker put together after the last release.
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while layer.whole_file(multi_node).is_none() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut a = std::fs::File::open(&p_multi)?;
            assert_eq!(std::fs::read(&p_one)?, one);
            // A second open of an inode in passthrough shares its backing.
            assert_eq!(std::fs::read(&p_multi)?, whole_multi);
            let mut got = Vec::new();
            a.read_to_end(&mut got)?;
            assert_eq!(got, whole_multi);
            drop(a);
            wait_released(&stats);
            assert_eq!(stats.passthrough_opens.load(Ordering::SeqCst), 3);
            assert_eq!(stats.daemon_opens.load(Ordering::SeqCst), 3);
            assert_eq!(
                reader.reads.load(Ordering::SeqCst),
                fetches,
                "nothing fetched again"
            );

            // A cache file replaced by damaged bytes (another inode than the
            // one checked) is checked again at open and dropped; the file is
            // read right through strata (from its checked copy in memory).
            let c = &layer.toc().nodes[layer
                .toc()
                .lookup("one")
                .ok_or_else(|| std::io::Error::other("one"))?]
            .chunks[0];
            let path = dir
                .join("cache")
                .join(crate::estargz::hex(&ChunkCache::key("repo", &c.digest)));
            let mut bad = std::fs::read(&path)?;
            bad[1000] ^= 0xff;
            std::fs::write(dir.join("cache/.tmp-bad"), &bad)?;
            std::fs::rename(dir.join("cache/.tmp-bad"), &path)?;
            assert_eq!(std::fs::read(&p_one)?, one);
            wait_released(&stats);
            assert_eq!(stats.passthrough_opens.load(Ordering::SeqCst), 3);
            assert!(
                std::fs::read(&path).map(|b| b != bad).unwrap_or(true),
                "the damaged cache file is dropped"
            );
        }
        mounted.unmount()?;
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
