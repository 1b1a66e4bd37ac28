//! The FUSE adapter: translates kernel requests (fuser's types) into calls on a
//! [`Vfs`] and its answers back. No file system logic lives here.
//!
//! Requests are served by several threads (fuser's `n_threads`), so a slow read
//! or a commit on one of them never stalls the callers on the others.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

use fuser::{
    AccessFlags, Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

use crate::object::Time;
use crate::tree::FsError;
use crate::vfs::{self, Attr, CacheOffer, Caller, Kind, RenameMode, SetAttr, TimeSet, Vfs};

/// How long the kernel may cache names and attributes. Changes made through
/// this mount update the kernel's cache as they happen, and other clients'
/// changes are pushed out of it when adopted (see [`invalidate`]), so this only
/// bounds how long a missed invalidation could last.
const TTL: Duration = Duration::from_secs(10);

/// How long a stop signal keeps trying an unmount the kernel calls busy.
const UNMOUNT_BUSY_RETRY: Duration = Duration::from_secs(10);

pub struct MountOptions {
    pub mountpoint: PathBuf,
    /// Let other users (and root) use the mount (`allow_other`).
    pub allow_other: bool,
    /// Threads serving kernel requests.
    pub threads: usize,
    /// Commit (and look for other clients' commits) this often.
    pub commit_interval: Duration,
}

struct Adapter {
    vfs: Arc<Vfs>,
    /// Bytes around random reads, for the kernel-cache thread to put in the
    /// page cache ([`kernel_cache`]).
    offers: Arc<OfferQueue>,
}

/// Offers waiting for the kernel-cache thread. A random reader meets a chunk
/// many times before its pages are in the cache (reads answered from
/// fsclient's memory come every 150 µs, putting a chunk in the page cache
/// takes about 1 ms), so each chunk waits here once; measured with a plain
/// queue of 8, more than half the offers of a random reader were dropped and
/// whole chunks never reached the cache. A full queue still drops an offer:
/// it only saves later reads, and the chunk is offered again at its next.
#[derive(Default)]
struct OfferQueue {
    queued: Mutex<Queued>,
    ready: Condvar,
}

#[derive(Default)]
struct Queued {
    offers: VecDeque<CacheOffer>,
    /// `(inode, chunk offset)` of each offer queued or being kept.
    chunks: HashSet<(u64, u64)>,
    bytes: usize,
}

/// Bytes of offers that may wait (they share their buffers with the blob
/// cache, so this is rarely memory of their own).
const OFFERS_QUEUED_BYTES: usize = 64 << 20;

impl OfferQueue {
    fn key(offer: &CacheOffer) -> (u64, u64) {
        (offer.ino, offer.pieces.first().map_or(0, |p| p.0))
    }

    fn push(&self, offer: CacheOffer) {
        let key = Self::key(&offer);
        let len = offer.span().1 as usize;
        let mut q = self.queued.lock();
        if q.chunks.contains(&key) || q.bytes + len > OFFERS_QUEUED_BYTES {
            return;
        }
        q.chunks.insert(key);
        q.bytes += len;
        q.offers.push_back(offer);
        self.ready.notify_one();
    }

    /// The next offer, waiting for one at most `wait`. Call
    /// [`OfferQueue::done`] with it once it is kept.
    fn pop(&self, wait: Duration) -> Option<CacheOffer> {
        let mut q = self.queued.lock();
        if q.offers.is_empty() {
            self.ready.wait_for(&mut q, wait);
        }
        q.offers.pop_front()
    }

    fn done(&self, offer: &CacheOffer) {
        let mut q = self.queued.lock();
        q.chunks.remove(&Self::key(offer));
        q.bytes -= offer.span().1 as usize;
    }
}

fn errno(e: FsError) -> Errno {
    if matches!(e, FsError::Store(_) | FsError::Io(_)) {
        tracing::warn!("{e}");
    }
    Errno::from_i32(e.errno())
}

fn system_time(t: Time) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + Duration::from_nanos(t.nanos as u64)
    }
}

fn time(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (mut secs, mut nanos) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Time { secs, nanos }
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Socket => FileType::Socket,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let mtime = system_time(a.mtime);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: system_time(a.atime),
        mtime,
        ctime: system_time(a.ctime),
        crtime: mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 128 * 1024,
        flags: 0,
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(time(t)),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn entry(reply: ReplyEntry, r: Result<Attr, FsError>) {
    match r {
        Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn data(reply: ReplyData, r: Result<impl AsRef<[u8]>, FsError>) {
    match r {
        Ok(d) => reply.data(d.as_ref()),
        Err(e) => reply.error(errno(e)),
    }
}

fn xattr(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, FsError>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

/// Runs a request's handler. A panic (a bug) fails that one request with EIO
/// (fuser answers EIO for a reply dropped unsent) instead of ending the kernel
/// request thread it ran on.
/// Every request also goes into the mount's metrics, by kind, with how
/// long it took.
fn guard(vfs: &Vfs, what: &'static str, handler: impl FnOnce()) {
    let started = std::time::Instant::now();
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)).is_err() {
        tracing::error!("bug: the {what} handler panicked; the request got EIO");
    }
    vfs.metrics().op(what, started.elapsed());
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Big writes (1 MiB) and reads; directory listings with attributes.
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS;
        let _ = config.add_capabilities(wanted & config.capabilities());
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.vfs.commit() {
            tracing::error!("final commit failed: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guard(&self.vfs, "lookup", || {
            entry(reply, self.vfs.lookup(parent.0, name.as_bytes()))
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.vfs.forget(ino.0, nlookup)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guard(&self.vfs, "getattr", || match self.vfs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guard(&self.vfs, "setattr", || {
            let set = SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: atime.map(time_set),
                mtime: mtime.map(time_set),
                ctime: ctime.map(time),
            };
            match self.vfs.setattr(ino.0, set) {
                Ok(a) => reply.attr(&TTL, &file_attr(&a)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guard(&self.vfs, "readlink", || data(reply, self.vfs.readlink(ino.0)));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        guard(&self.vfs, "mknod", || {
            let mode = mode & !(umask & 0o777);
            entry(
                reply,
                self.vfs
                    .mknod(caller(req), parent.0, name.as_bytes(), mode, rdev as u64),
            )
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        guard(&self.vfs, "mkdir", || {
            let mode = mode & !(umask & 0o777);
            entry(
                reply,
                self.vfs.mkdir(caller(req), parent.0, name.as_bytes(), mode),
            )
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard(&self.vfs, "unlink", || {
            empty(reply, self.vfs.unlink(parent.0, name.as_bytes()))
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard(&self.vfs, "rmdir", || {
            empty(reply, self.vfs.rmdir(parent.0, name.as_bytes()))
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        guard(&self.vfs, "symlink", || {
            let target = target.as_os_str().as_bytes();
            entry(
                reply,
                self.vfs
                    .symlink(caller(req), parent.0, link_name.as_bytes(), target),
            )
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guard(&self.vfs, "rename", || {
            let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                RenameMode::Exchange
            } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                RenameMode::NoReplace
            } else if flags.is_empty() {
                RenameMode::Replace
            } else {
                return reply.error(Errno::EINVAL); // RENAME_WHITEOUT is for overlay file systems
            };
            let r = self
                .vfs
                .rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes(), mode);
            empty(reply, r)
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        guard(&self.vfs, "link", || {
            entry(reply, self.vfs.link(ino.0, newparent.0, newname.as_bytes()))
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guard(&self.vfs, "open", || {
            // The page cache may outlive a close: local writes keep it current,
            // and other clients' changes invalidate it when adopted.
            match self.vfs.open(ino.0, flags.0) {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
                Err(e) => reply.error(errno(e)),
            }
        });
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
        guard(&self.vfs, "read", || {
            match self.vfs.read_offering(ino.0, offset, size) {
                Ok((bytes, offer)) => {
                    reply.data(&bytes);
                    if let Some(offer) = offer {
                        self.offers.push(offer);
                    }
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        guard(&self.vfs, "write", || match self.vfs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        guard(&self.vfs, "flush", || empty(reply, self.vfs.flush(fh.0)));
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
        guard(&self.vfs, "release", || {
            self.vfs.release(fh.0);
            reply.ok();
        });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        guard(&self.vfs, "fsync", || empty(reply, self.vfs.fsync()));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guard(&self.vfs, "opendir", || match self.vfs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        guard(&self.vfs, "readdir", || {
            let listing = match self.vfs.readdir(fh.0, offset) {
                Ok(l) => l,
                Err(e) => return reply.error(errno(e)),
            };
            for (i, e) in listing.iter().enumerate().skip(offset as usize) {
                let name = OsStr::from_bytes(&e.name);
                if reply.add(INodeNo(e.ino), i as u64 + 1, file_type(e.kind), name) {
                    break;
                }
            }
            reply.ok()
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        guard(&self.vfs, "readdirplus", || {
            let listing = match self.vfs.readdir(fh.0, offset) {
                Ok(l) => l,
                Err(e) => return reply.error(errno(e)),
            };
            for (i, e) in listing.iter().enumerate().skip(offset as usize) {
                // An entry removed since the listing was taken is left out.
                let Ok(attr) = self.vfs.getattr(e.ino) else {
                    continue;
                };
                let name = OsStr::from_bytes(&e.name);
                if reply.add(
                    INodeNo(e.ino),
                    i as u64 + 1,
                    name,
                    &TTL,
                    &file_attr(&attr),
                    Generation(0),
                ) {
                    break;
                }
                // The kernel now holds a reference to every entry but . and ..
                if e.name != b"." && e.name != b".." {
                    self.vfs.count_lookup(e.ino);
                }
            }
            reply.ok()
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        guard(&self.vfs, "releasedir", || {
            self.vfs.releasedir(fh.0);
            reply.ok()
        });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        guard(&self.vfs, "fsyncdir", || empty(reply, self.vfs.fsync()));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guard(&self.vfs, "statfs", || {
            let s = self.vfs.statfs();
            reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_free,
                s.files,
                s.files_free,
                s.block_size,
                vfs::NAME_MAX as u32,
                s.block_size,
            )
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        guard(&self.vfs, "setxattr", || {
            empty(reply, self.vfs.setxattr(ino.0, name.as_bytes(), value, flags))
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guard(&self.vfs, "getxattr", || {
            xattr(reply, size, self.vfs.getxattr(ino.0, name.as_bytes()))
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guard(&self.vfs, "listxattr", || {
            xattr(reply, size, self.vfs.listxattr(ino.0))
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard(&self.vfs, "removexattr", || {
            empty(reply, self.vfs.removexattr(ino.0, name.as_bytes()))
        });
    }

    /// Permission bits are checked by the kernel (`default_permissions`); this
    /// answers whether the node exists.
    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        guard(&self.vfs, "access", || {
            empty(reply, self.vfs.getattr(ino.0).map(|_| ()))
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        guard(&self.vfs, "create", || {
            let mode = mode & !(umask & 0o777);
            match self
                .vfs
                .create(caller(req), parent.0, name.as_bytes(), mode, flags)
            {
                Ok((a, fh)) => reply.created(
                    &TTL,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    /// No ioctls: ENOTTY, as for a regular file on a local file system
    /// (Python asks every file it opens whether it is a terminal; fuser's
    /// default logged a warning for each).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// ENOSYS: the kernel then copies through reads and writes itself, for
    /// the rest of the mount (fuser's default logged a warning).
    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// posix_fallocate: only plain allocation (mode 0), which extends the size.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        guard(&self.vfs, "fallocate", || {
            if mode != 0 {
                return reply.error(Errno::EOPNOTSUPP);
            }
            let r = self.vfs.getattr(ino.0).and_then(|a| {
                let end = offset.saturating_add(length);
                if end > a.size {
                    self.vfs.setattr(
                        ino.0,
                        SetAttr {
                            size: Some(end),
                            ..Default::default()
                        },
                    )?;
                }
                Ok(())
            });
            empty(reply, r)
        });
    }
}

/// Tells the kernel to forget what other clients' adopted commits changed,
/// and puts the bytes offered by random reads in its page cache. Runs on its
/// own thread: a notification sent from inside a request handler can deadlock
/// with the kernel waiting on that request (or, for a store, on pages locked
/// by a pending read that no free request thread is left to answer).
fn kernel_cache(
    vfs: Arc<Vfs>,
    notifier: fuser::Notifier,
    offers: Arc<OfferQueue>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(offer) = offers.pop(Duration::from_millis(20)) {
                let ino = INodeNo(offer.ino);
                // An error means the kernel forgot the file: nothing to keep.
                let kept = vfs.keep_if_current(&offer, || {
                    for (offset, bytes) in &offer.pieces {
                        let _ = notifier.store(ino, *offset, bytes);
                    }
                });
                if kept == vfs::Kept::Spoiled {
                    let (offset, len) = offer.span();
                    let _ = notifier.inval_inode(ino, offset as i64, len as i64);
                }
                offers.done(&offer);
            }
            for inv in vfs.take_invalidations() {
                // Errors mean the kernel did not have it cached: nothing to do.
                let _ = match inv {
                    vfs::Invalidate::Entry { parent, name } => {
                        notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(&name))
                    }
                    vfs::Invalidate::Inode(ino) => notifier.inval_inode(INodeNo(ino), 0, 0),
                };
            }
        }
    })
}

/// Mounts the view and serves it until the file system is unmounted (by
/// `fsclient umount`, `fusermount3 -u`, or SIGINT/SIGTERM to this process,
/// which unmount it). Everything written is committed before this returns.
pub fn serve(vfs: Arc<Vfs>, opts: &MountOptions, on_mounted: impl FnOnce()) -> std::io::Result<()> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("dictfs:{}", vfs.volume().name)),
        MountOption::Subtype("dictfs".into()),
        MountOption::DefaultPermissions,
    ];
    // The kernel's flag says what the mount does (`relatime`, the default,
    // or `noatime`) in /proc/mounts; fsclient keeps the times itself.
    if !vfs.options().relatime {
        config.mount_options.push(MountOption::NoAtime);
    }
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    let offers = Arc::new(OfferQueue::default());
    let adapter = Adapter {
        vfs: vfs.clone(),
        offers: offers.clone(),
    };
    let mut session = fuser::Session::new(adapter, &opts.mountpoint, &config)?;
    let mut unmounter = session.unmount_callable();
    let mut signals =
        signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    let signal_handle = signals.handle();
    let mountpoint = opts.mountpoint.clone();
    let signal_thread = std::thread::spawn(move || {
        for _ in signals.forever() {
            // Busy can be brief (a file closed a moment ago, its release still
            // on its way from the kernel): try for a few seconds before giving
            // up until the next signal.
            let deadline = std::time::Instant::now() + UNMOUNT_BUSY_RETRY;
            loop {
                match unmounter.unmount() {
                    Ok(()) => return,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => {
                        eprintln!(
                            "fsclient: cannot unmount '{}': {e} (close what uses it, then stop fsclient again)",
                            mountpoint.display()
                        );
                        break;
                    }
                }
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let syncer = vfs::spawn_syncer(vfs.clone(), opts.commit_interval, stop.clone());
    let cache_thread = kernel_cache(vfs.clone(), session.notifier(), offers, stop.clone());
    on_mounted();
    let served = session.run();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    signal_handle.close();
    let _ = signal_thread.join();
    let _ = syncer.join();
    let _ = cache_thread.join();
    // The kernel may not send DESTROY on every way of unmounting; commit here too.
    if let Err(e) = vfs.commit() {
        tracing::error!("final commit failed: {e}");
        return Err(std::io::Error::other(format!("final commit failed: {e}")));
    }
    served
}
