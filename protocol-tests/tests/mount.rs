//! The file system on real FUSE mounts (`fsclient mount`), over a real kvd and
//! a real redis-server: POSIX behaviour and its errors, everyday programs,
//! a random read/write/truncate/mmap exerciser checked against a local copy,
//! two mounts of one volume, and unmount/remount.
//!
//! Needs root and /dev/fuse (CI has both; scripts/setup.sh installs fuse3,
//! rsync, sqlite3).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use protocol_tests::{fsclient_at, is_mounted, require_redis, sh, Mount, Server};
use rand::{Rng, SeedableRng};

fn url(s: &Server) -> String {
    format!("redis://127.0.0.1:{}", s.port)
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().expect("an OS error"),
    }
}

/// `fsclient fsck` of `volume` succeeds and finds no damaged path (`when`
/// names the moment in the failure message).
fn assert_fsck_clean(url: &str, volume: &str, when: &str) {
    let fsck = fsclient_at(url, &["--volume", volume, "fsck"]);
    let report = String::from_utf8_lossy(&fsck.stdout).into_owned() + &String::from_utf8_lossy(&fsck.stderr);
    assert!(
        fsck.status.success() && report.contains(", 0 damaged paths"),
        "{when}:\n{report}"
    );
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// renameat2(2) with flags, as std has no wrapper.
fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid NUL-terminated paths.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn xattr_get(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; 1024];
    // SAFETY: buffer and length match.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn xattr_set(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: value pointer and length match.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn xattr_list(p: &Path) -> Vec<String> {
    let p = cpath(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: buffer and length match.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(r as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn posix_suite(root: &Path) {
    let p = |s: &str| root.join(s);

    // Create, write, read back; sizes and kinds.
    fs::write(p("a"), b"hello").unwrap();
    assert_eq!(fs::read(p("a")).unwrap(), b"hello");
    assert_eq!(fs::metadata(p("a")).unwrap().len(), 5);
    assert!(fs::metadata(root).unwrap().is_dir());

    // Errors of creating and removing.
    fs::create_dir(p("d")).unwrap();
    assert_eq!(errno(fs::create_dir(p("d"))), libc::EEXIST);
    assert_eq!(
        errno(OpenOptions::new().write(true).create_new(true).open(p("a"))),
        libc::EEXIST
    );
    fs::write(p("d/inner"), b"x").unwrap();
    assert_eq!(errno(fs::remove_dir(p("d"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::remove_file(p("d"))), libc::EISDIR);
    assert_eq!(errno(fs::remove_dir(p("a"))), libc::ENOTDIR);
    assert_eq!(errno(fs::read(p("missing"))), libc::ENOENT);
    assert_eq!(errno(fs::read(p("a/below"))), libc::ENOTDIR);
    assert_eq!(errno(OpenOptions::new().write(true).open(p("d"))), libc::EISDIR);
    fs::remove_file(p("d/inner")).unwrap();
    fs::remove_dir(p("d")).unwrap();
    assert_eq!(errno(fs::metadata(p("d"))), libc::ENOENT);

    // Names: 255 bytes is the limit.
    let long = "n".repeat(255);
    fs::write(p(&long), b"long").unwrap();
    assert_eq!(fs::read(p(&long)).unwrap(), b"long");
    assert_eq!(errno(fs::write(p(&"n".repeat(256)), b"x")), libc::ENAMETOOLONG);

    // Deep paths.
    let deep: String = (0..40).map(|i| format!("level{i}/")).collect();
    fs::create_dir_all(p(&deep)).unwrap();
    fs::write(p(&format!("{deep}leaf")), b"deep").unwrap();
    assert_eq!(fs::read(p(&format!("{deep}leaf"))).unwrap(), b"deep");

    // Rename over an existing file replaces it; the old target is gone.
    fs::write(p("r1"), b"one").unwrap();
    fs::write(p("r2"), b"two").unwrap();
    fs::rename(p("r1"), p("r2")).unwrap();
    assert_eq!(fs::read(p("r2")).unwrap(), b"one");
    assert_eq!(errno(fs::metadata(p("r1"))), libc::ENOENT);
    // A directory over a non-empty one, a file over a directory, into itself.
    fs::create_dir_all(p("rd1/sub")).unwrap();
    fs::create_dir_all(p("rd2/sub")).unwrap();
    assert_eq!(errno(fs::rename(p("rd1"), p("rd2"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::rename(p("r2"), p("rd1"))), libc::EISDIR);
    assert_eq!(errno(fs::rename(p("rd1"), p("rd1/sub/x"))), libc::EINVAL);
    fs::remove_dir(p("rd2/sub")).unwrap();
    fs::rename(p("rd1"), p("rd2")).unwrap();
    assert!(p("rd2/sub").is_dir());
    // RENAME_NOREPLACE and RENAME_EXCHANGE.
    fs::write(p("x1"), b"first").unwrap();
    fs::write(p("x2"), b"second").unwrap();
    assert_eq!(
        errno(rename2(&p("x1"), &p("x2"), libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    rename2(&p("x1"), &p("x2"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(p("x1")).unwrap(), b"second");
    assert_eq!(fs::read(p("x2")).unwrap(), b"first");
    rename2(&p("x1"), &p("x3"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(
        errno(rename2(&p("x1"), &p("x2"), libc::RENAME_EXCHANGE)),
        libc::ENOENT
    );

    // Unlink of an open file: still readable and writable until closed.
    fs::write(p("open"), b"still here").unwrap();
    let mut f = OpenOptions::new().read(true).write(true).open(p("open")).unwrap();
    fs::remove_file(p("open")).unwrap();
    assert_eq!(errno(fs::metadata(p("open"))), libc::ENOENT);
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    f.write_all(b"!").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    s.clear();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here!");
    drop(f);

    // O_APPEND from two handles: both writes land, neither overwrites.
    let mut a1 = OpenOptions::new()
        .append(true)
        .create(true)
        .open(p("log"))
        .unwrap();
    let mut a2 = OpenOptions::new().append(true).open(p("log")).unwrap();
    for i in 0..10 {
        a1.write_all(format!("a{i}\n").as_bytes()).unwrap();
        a2.write_all(format!("b{i}\n").as_bytes()).unwrap();
    }
    drop((a1, a2));
    let log = fs::read_to_string(p("log")).unwrap();
    assert_eq!(log.lines().count(), 20, "{log}");
    assert!((0..10).all(|i| log.contains(&format!("a{i}\n")) && log.contains(&format!("b{i}\n"))));

    // Truncate down and up; the extension reads as zeros; sparse writes.
    fs::write(p("t"), b"0123456789").unwrap();
    let f = OpenOptions::new().write(true).open(p("t")).unwrap();
    f.set_len(4).unwrap();
    f.set_len(8).unwrap();
    drop(f);
    assert_eq!(fs::read(p("t")).unwrap(), b"0123\0\0\0\0");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p("sparse"))
        .unwrap();
    f.seek(SeekFrom::Start(10 << 20)).unwrap();
    f.write_all(b"end").unwrap();
    drop(f);
    let data = fs::read(p("sparse")).unwrap();
    assert_eq!(data.len(), (10 << 20) + 3);
    assert!(data[..10 << 20].iter().all(|&b| b == 0));
    assert_eq!(&data[10 << 20..], b"end");

    // mtime and ctime move on write; chmod moves ctime only.
    fs::write(p("times"), b"1").unwrap();
    let before = fs::metadata(p("times")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    fs::write(p("times"), b"22").unwrap();
    let after = fs::metadata(p("times")).unwrap();
    assert!(after.modified().unwrap() > before.modified().unwrap());
    assert!(after.ctime_nsec() != before.ctime_nsec() || after.ctime() > before.ctime());
    std::thread::sleep(Duration::from_millis(20));
    fs::set_permissions(p("times"), fs::Permissions::from_mode(0o600)).unwrap();
    let chmodded = fs::metadata(p("times")).unwrap();
    assert_eq!(chmodded.mode() & 0o7777, 0o600);
    assert_eq!(chmodded.modified().unwrap(), after.modified().unwrap());
    assert!((chmodded.ctime(), chmodded.ctime_nsec()) > (after.ctime(), after.ctime_nsec()));
    // utimensat with explicit times (nanoseconds kept), UTIME_OMIT and UTIME_NOW.
    let set = |mtime: libc::timespec| {
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            mtime,
        ];
        let c = cpath(&p("times"));
        // SAFETY: a valid path and two timespecs.
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
            0
        );
    };
    set(libc::timespec {
        tv_sec: 1_000_000_000,
        tv_nsec: 123_456_789,
    });
    let m = fs::metadata(p("times")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 123_456_789));
    set(libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_NOW,
    });
    assert!(fs::metadata(p("times")).unwrap().mtime() > 1_700_000_000);
    // chown (we are root).
    std::os::unix::fs::chown(p("times"), Some(1234), Some(5678)).unwrap();
    let m = fs::metadata(p("times")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));

    // Symlinks: readlink, follow, dangling, loops.
    std::os::unix::fs::symlink("a", p("sl")).unwrap();
    assert_eq!(fs::read_link(p("sl")).unwrap(), Path::new("a"));
    assert_eq!(fs::read(p("sl")).unwrap(), b"hello");
    std::os::unix::fs::symlink("nowhere", p("dangling")).unwrap();
    assert_eq!(errno(fs::read(p("dangling"))), libc::ENOENT);
    std::os::unix::fs::symlink("loop2", p("loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", p("loop2")).unwrap();
    assert_eq!(errno(fs::read(p("loop1"))), libc::ELOOP);
    assert_eq!(errno(std::os::unix::fs::symlink("a", p("sl"))), libc::EEXIST);

    // FIFOs, device nodes (with their numbers) and sockets via mknod.
    let fifo = cpath(&p("fifo"));
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert!(fs::metadata(p("fifo")).unwrap().file_type().is_fifo());
    for (name, kind, rdev) in [
        ("chr", libc::S_IFCHR, libc::makedev(1, 3)),
        ("blk", libc::S_IFBLK, libc::makedev(7, 2)),
        ("sock", libc::S_IFSOCK, 0),
    ] {
        let path = cpath(&p(name));
        // SAFETY: a valid path.
        let made = unsafe { libc::mknod(path.as_ptr(), kind | 0o640, rdev) };
        assert_eq!(made, 0, "mknod {name}: {}", std::io::Error::last_os_error());
        let m = fs::symlink_metadata(p(name)).unwrap();
        assert_eq!(m.mode() & libc::S_IFMT, kind, "{name}");
        assert_eq!((m.rdev(), m.mode() & 0o7777), (rdev, 0o640), "{name}");
    }
    assert!(fs::symlink_metadata(p("sock")).unwrap().file_type().is_socket());

    // Hard links: one inode under two names; writes show through both.
    fs::write(p("h1"), b"linked").unwrap();
    fs::hard_link(p("h1"), p("ls_h2")).unwrap();
    let (m1, m2) = (fs::metadata(p("h1")).unwrap(), fs::metadata(p("ls_h2")).unwrap());
    assert_eq!((m1.ino(), m1.nlink()), (m2.ino(), 2));
    OpenOptions::new()
        .append(true)
        .open(p("ls_h2"))
        .unwrap()
        .write_all(b" twice")
        .unwrap();
    assert_eq!(fs::read(p("h1")).unwrap(), b"linked twice");
    assert_eq!(errno(fs::hard_link(p("h1"), p("ls_h2"))), libc::EEXIST);
    fs::create_dir(p("hd")).unwrap();
    assert_eq!(errno(fs::hard_link(p("hd"), p("hd2"))), libc::EPERM);
    fs::remove_file(p("h1")).unwrap();
    assert_eq!(fs::metadata(p("ls_h2")).unwrap().nlink(), 1);
    assert_eq!(fs::read(p("ls_h2")).unwrap(), b"linked twice");
    fs::remove_file(p("ls_h2")).unwrap();

    // Extended attributes.
    xattr_set(&p("a"), "user.color", b"blue", 0).unwrap();
    assert_eq!(xattr_get(&p("a"), "user.color").unwrap(), b"blue");
    assert_eq!(errno(xattr_get(&p("a"), "user.none")), libc::ENODATA);
    assert_eq!(
        errno(xattr_set(&p("a"), "user.color", b"red", libc::XATTR_CREATE)),
        libc::EEXIST
    );
    assert_eq!(
        errno(xattr_set(&p("a"), "user.new", b"x", libc::XATTR_REPLACE)),
        libc::ENODATA
    );
    xattr_set(&p("a"), "user.size", b"L", 0).unwrap();
    assert_eq!(xattr_list(&p("a")), vec!["user.color", "user.size"]);
    let (c, n) = (cpath(&p("a")), CString::new("user.color").unwrap());
    // SAFETY: valid strings.
    assert_eq!(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }, 0);
    assert_eq!(xattr_list(&p("a")), vec!["user.size"]);

    // Directory listings: nlink counts subdirectories; readdir sees everything.
    fs::create_dir_all(p("ls/s1")).unwrap();
    fs::create_dir_all(p("ls/s2")).unwrap();
    for i in 0..300 {
        fs::write(p(&format!("ls/f{i:03}")), i.to_string()).unwrap();
    }
    assert_eq!(fs::metadata(p("ls")).unwrap().nlink(), 4);
    let mut names: Vec<String> = fs::read_dir(p("ls"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 302);
    assert_eq!(names[0], "f000");
    assert_eq!(fs::read_to_string(p("ls/f299")).unwrap(), "299");

    // statfs answers, with the name limit.
    let c = cpath(root);
    // SAFETY: a valid path and a zeroed struct for the kernel to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert_eq!(st.f_namemax, 255);
    assert!(st.f_bavail > 0);

    // flock and POSIX locks between processes of one mount.
    fs::write(p("lockfile"), b"").unwrap();
    let holder = File::open(p("lockfile")).unwrap();
    // SAFETY: a valid descriptor.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&holder), libc::LOCK_EX) },
        0
    );
    let other = Command::new("flock")
        .args(["-n", p("lockfile").to_str().unwrap(), "true"])
        .status()
        .unwrap();
    assert!(
        !other.success(),
        "a second process got an exclusive flock that is held"
    );
    drop(holder);
    let other = Command::new("flock")
        .args(["-n", p("lockfile").to_str().unwrap(), "true"])
        .status()
        .unwrap();
    assert!(other.success(), "the lock was released on close");

    // A terminal's ioctl on a regular file (what isatty(3) asks): ENOTTY.
    let f = File::open(p("lockfile")).unwrap();
    let mut term = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: TCGETS writes a termios, which `term` has room for.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::TCGETS,
            term.as_mut_ptr(),
        )
    };
    assert_eq!(r, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENOTTY));
}

/// A random sequence of writes, reads, truncates and mmap accesses applied to
/// a file on the mount and to a reference file on local disk; they must agree
/// after every step (like fsx).
fn exercise(mount_file: &Path, reference: &Path, seed: u64, ops: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(p)
            .unwrap()
    };
    let (mut m, mut r) = (open(mount_file), open(reference));
    const MAX: u64 = 3 << 20;
    for step in 0..ops {
        let size = r.metadata().unwrap().len();
        match rng.gen_range(0..10) {
            0..=3 => {
                let off = rng.gen_range(0..MAX);
                let len = rng.gen_range(1..200_000);
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                for f in [&mut m, &mut r] {
                    f.seek(SeekFrom::Start(off)).unwrap();
                    f.write_all(&data).unwrap();
                }
            }
            4..=6 => {
                let off = rng.gen_range(0..size + 10);
                let len = rng.gen_range(1..300_000);
                let mut a = vec![0u8; len];
                let mut b = vec![0u8; len];
                m.seek(SeekFrom::Start(off)).unwrap();
                r.seek(SeekFrom::Start(off)).unwrap();
                let na = read_full(&mut m, &mut a);
                let nb = read_full(&mut r, &mut b);
                assert_eq!(na, nb, "step {step}: read length at {off}");
                assert!(a[..na] == b[..nb], "step {step}: read of {len} at {off} differs");
            }
            7 => {
                let to = rng.gen_range(0..MAX);
                m.set_len(to).unwrap();
                r.set_len(to).unwrap();
            }
            8 if size > 0 => {
                // A shared writable mapping: write through it, then msync.
                let off = rng.gen_range(0..size);
                let len = rng.gen_range(1..=(size - off).min(100_000)) as usize;
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                mmap_write(&m, off, &data);
                r.seek(SeekFrom::Start(off)).unwrap();
                r.write_all(&data).unwrap();
            }
            9 => {
                m.sync_all().unwrap();
            }
            _ => {}
        }
        assert_eq!(
            m.metadata().unwrap().len(),
            r.metadata().unwrap().len(),
            "step {step}: sizes differ"
        );
    }
    drop(m);
    assert!(
        fs::read(mount_file).unwrap() == fs::read(reference).unwrap(),
        "final contents differ"
    );
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

fn mmap_write(f: &File, off: u64, data: &[u8]) {
    let page = 4096u64;
    let start = off / page * page;
    let len = (off - start) as usize + data.len();
    // SAFETY: a fresh shared mapping of a range inside the file, unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(f),
            start as i64,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            (p as *mut u8).add((off - start) as usize),
            data.len(),
        );
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
        libc::munmap(p, len);
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn posix_behaviour_on_kvd() {
    let kvd = Server::kvd(&[]).unwrap();
    let m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    posix_suite(m.path());
}

#[test]
fn posix_behaviour_on_redis() {
    require_redis();
    let redis = Server::redis(&[]).unwrap();
    let m = Mount::start(&url(&redis), "main", &[]).unwrap();
    posix_suite(m.path());
}

#[test]
fn posix_behaviour_on_a_kvd_cluster() {
    // Every key on all three nodes; the mount talks to one, which runs each
    // command as a CASPaxos round on the key's replicas.
    let c = protocol_tests::Replicated::start(3, 3);
    let m = Mount::start(&format!("redis://127.0.0.1:{}", c.ports[1]), "main", &[]).unwrap();
    posix_suite(m.path());
}

#[test]
fn random_operations_match_a_local_file() {
    let kvd = Server::kvd(&[]).unwrap();
    let m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let local = tempfile::tempdir().unwrap();
    for seed in 0..3 {
        exercise(
            &m.path().join(format!("fsx{seed}")),
            &local.path().join(format!("fsx{seed}")),
            seed,
            400,
        );
    }
}

#[test]
fn everyday_programs() {
    for program in ["git", "tar", "rsync", "make", "cc", "sqlite3", "diff"] {
        assert!(
            have(program),
            "{program} is missing; scripts/setup.sh installs it"
        );
    }
    let kvd = Server::kvd(&[]).unwrap();
    let m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let root = m.path();

    // git
    fs::create_dir(root.join("repo")).unwrap();
    let repo = root.join("repo");
    sh(
        "git init -q && git config user.email t@t && git config user.name t",
        &repo,
    );
    for i in 0..20 {
        fs::write(
            repo.join(format!("file{i}.txt")),
            format!("line {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    sh("git add . && git commit -qm first", &repo);
    fs::write(repo.join("file3.txt"), "changed\n").unwrap();
    sh("git commit -qam second && git gc -q", &repo);
    let log = sh("git log --oneline", &repo);
    assert_eq!(log.lines().count(), 2, "{log}");
    assert_eq!(sh("git status --porcelain", &repo), "");
    sh("git fsck --full", &repo);

    // tar: extract a tree made locally, re-create from the mount, same bytes.
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for i in 0..30 {
        let data: Vec<u8> = (0..rng.gen_range(0..300_000)).map(|_| rng.gen()).collect();
        fs::write(src.join(format!("a/b/f{i}")), data).unwrap();
    }
    std::os::unix::fs::symlink("a/b/f1", src.join("link")).unwrap();
    sh("tar -C src -cf src.tar .", local.path());
    fs::create_dir(root.join("untar")).unwrap();
    sh(
        &format!(
            "tar -C {} -xf {}/src.tar",
            root.join("untar").display(),
            local.path().display()
        ),
        root,
    );
    sh(
        &format!("diff -r {} {}", src.display(), root.join("untar").display()),
        root,
    );
    sh(
        &format!(
            "tar -C {} -cf {}/again.tar .",
            root.join("untar").display(),
            local.path().display()
        ),
        root,
    );
    fs::create_dir(local.path().join("again")).unwrap();
    sh("tar -C again -xf again.tar && diff -r src again", local.path());

    // cp -a and rsync -a keep contents, modes and times.
    sh(
        &format!("cp -a {} {}", src.display(), root.join("copy").display()),
        root,
    );
    sh(
        &format!("diff -r {} {}", src.display(), root.join("copy").display()),
        root,
    );
    sh(
        &format!("rsync -a {}/ {}/", src.display(), root.join("synced").display()),
        root,
    );
    sh(
        &format!("diff -r {} {}", src.display(), root.join("synced").display()),
        root,
    );
    let (a, b) = (
        fs::metadata(src.join("a/b/f2")).unwrap(),
        fs::metadata(root.join("synced/a/b/f2")).unwrap(),
    );
    assert_eq!((a.mtime(), a.mode()), (b.mtime(), b.mode()));

    // make and a C compiler.
    let proj = root.join("proj");
    fs::create_dir(&proj).unwrap();
    fs::write(
        proj.join("main.c"),
        "#include <stdio.h>\nint main(void){puts(\"built on dictfs\");return 0;}\n",
    )
    .unwrap();
    fs::write(proj.join("Makefile"), "hello: main.c\n\tcc -O1 -o hello main.c\n").unwrap();
    sh("make -s", &proj);
    assert_eq!(sh("./hello", &proj), "built on dictfs\n");

    // sqlite3 (uses POSIX locks and random writes).
    let db = root.join("db.sqlite");
    let sql = "create table t(k integer primary key, v text);\
               with recursive n(i) as (select 1 union all select i+1 from n where i<2000) \
               insert into t select i, printf('value %d', i) from n;\
               select count(*), sum(k) from t;";
    let out = sh(&format!("sqlite3 {} \"{sql}\"", db.display()), root);
    assert_eq!(out.trim(), "2000|2001000");
    let out = sh(
        &format!(
            "sqlite3 {} 'pragma integrity_check; select v from t where k=1234;'",
            db.display()
        ),
        root,
    );
    assert_eq!(out.trim(), "ok\nvalue 1234");
}

#[test]
fn two_mounts_of_one_volume_see_each_other() {
    let kvd = Server::kvd(&[]).unwrap();
    let a = Mount::start(&url(&kvd), "shared", &["--no-commit-on-close"]).unwrap();
    let b = Mount::start(&url(&kvd), "shared", &["--no-commit-on-close"]).unwrap();
    fs::create_dir(a.path().join("dir")).unwrap();
    fs::File::open(a.path()).unwrap().sync_all().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.path().join("dir").exists() {
        assert!(Instant::now() < deadline, "B never saw A's directory");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Both create 1,000 files in the same directory at once.
    let make = |root: std::path::PathBuf, tag: &'static str| {
        std::thread::spawn(move || {
            for i in 0..1000 {
                fs::write(root.join(format!("dir/{tag}{i:04}")), format!("{tag}{i}")).unwrap();
            }
        })
    };
    let (ta, tb) = (
        make(a.path().to_path_buf(), "a"),
        make(b.path().to_path_buf(), "b"),
    );
    ta.join().unwrap();
    tb.join().unwrap();
    let count = |m: &Mount| fs::read_dir(m.path().join("dir")).unwrap().count();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&a) != 2000 || count(&b) != 2000 {
        assert!(
            Instant::now() < deadline,
            "after 20 s: A sees {}, B sees {} of 2000",
            count(&a),
            count(&b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for m in [&a, &b] {
        assert_eq!(fs::read_to_string(m.path().join("dir/a0999")).unwrap(), "a999");
        assert_eq!(fs::read_to_string(m.path().join("dir/b0500")).unwrap(), "b500");
    }
    // A file written and closed on A reads intact on B.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let data: Vec<u8> = (0..3_000_000).map(|_| rng.gen()).collect();
    fs::write(a.path().join("big.bin"), &data).unwrap();
    fs::File::open(a.path().join("big.bin"))
        .unwrap()
        .sync_all()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if fs::read(b.path().join("big.bin")).ok().as_deref() == Some(&data[..]) {
            break;
        }
        assert!(Instant::now() < deadline, "B never read A's file intact");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A changed file's cached attributes and a removed name are pushed out of
    // the other mount's kernel cache when it adopts the commit, well before
    // the kernel's own 10 s timeout.
    assert_eq!(fs::metadata(a.path().join("dir/b0001")).unwrap().len(), 2);
    assert!(a.path().join("dir/b0002").exists());
    fs::write(b.path().join("dir/b0001"), b"now much longer").unwrap();
    fs::remove_file(b.path().join("dir/b0002")).unwrap();
    fs::File::open(b.path()).unwrap().sync_all().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::metadata(a.path().join("dir/b0001")).unwrap().len() != 15 || a.path().join("dir/b0002").exists()
    {
        assert!(
            Instant::now() < deadline,
            "A still shows B's old attributes or removed name after 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::read(a.path().join("dir/b0001")).unwrap(), b"now much longer");
}

#[test]
fn unmount_and_remount_keeps_everything() {
    let kvd = Server::kvd(&[]).unwrap();
    let mut m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let big: Vec<u8> = (0..6_000_000).map(|_| rng.gen()).collect();
    fs::create_dir_all(m.path().join("x/y")).unwrap();
    fs::write(m.path().join("x/y/big"), &big).unwrap();
    fs::write(m.path().join("small"), b"small").unwrap();
    std::os::unix::fs::symlink("x/y/big", m.path().join("ln")).unwrap();
    fs::hard_link(m.path().join("small"), m.path().join("x/small-link")).unwrap();
    // Written but not closed-and-committed before the unmount: the unmount commits it.
    let mut open = File::create(m.path().join("pending")).unwrap();
    open.write_all(b"pending bytes").unwrap();
    drop(open);
    assert!(m.stop(), "fsclient mount did not exit cleanly on SIGTERM");
    let m2 = Mount::start(&url(&kvd), "main", &[]).unwrap();
    assert!(fs::read(m2.path().join("x/y/big")).unwrap() == big);
    assert_eq!(fs::read(m2.path().join("small")).unwrap(), b"small");
    assert_eq!(fs::read(m2.path().join("pending")).unwrap(), b"pending bytes");
    assert!(fs::read(m2.path().join("ln")).unwrap() == big);
    let (a, b) = (
        fs::metadata(m2.path().join("small")).unwrap(),
        fs::metadata(m2.path().join("x/small-link")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    // The command line reads through hard links too, and fsck checks them.
    let cli = |args: &[&str]| fsclient_at(&url(&kvd), args);
    assert_eq!(cli(&["cat", "/x/small-link"]).stdout, b"small");
    let fsck = cli(&["fsck"]);
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
}

/// How many of the first `len` bytes' pages of `f` are in the page cache
/// (mincore(2) on a mapping of it).
fn resident_pages(f: &File, len: usize) -> usize {
    resident(f, len).iter().filter(|&&r| r).count()
}

/// Whether each of the first `len` bytes' pages of `f` is in the page cache.
fn resident(f: &File, len: usize) -> Vec<bool> {
    use std::os::fd::AsRawFd;
    let pages = len.div_ceil(4096);
    let mut resident = vec![0u8; pages];
    // SAFETY: a fresh read-only mapping of `len` bytes, unmapped before
    // returning; `resident` has one byte per page of it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        let r = libc::mincore(p, len, resident.as_mut_ptr());
        let e = std::io::Error::last_os_error();
        libc::munmap(p, len);
        assert_eq!(r, 0, "mincore: {e}");
    }
    resident.iter().map(|&b| b & 1 != 0).collect()
}

#[test]
fn a_random_read_puts_its_whole_chunk_in_the_page_cache_and_writes_still_show() {
    use std::os::unix::fs::FileExt;
    let kvd = Server::kvd(&[]).unwrap();
    let mut m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut model: Vec<u8> = (0..16 << 20).map(|_| rng.gen()).collect();
    fs::write(m.path().join("f"), &model).unwrap();
    assert!(m.stop(), "fsclient mount did not exit cleanly on SIGTERM");
    // A new mount: nothing of the file is in the kernel's cache.
    let m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let path = m.path().join("f");
    let reader = File::open(&path).unwrap();
    assert_eq!(resident_pages(&reader, model.len()), 0);
    let mut buf = [0u8; 4096];
    reader.read_exact_at(&mut buf, 9 << 20).unwrap();
    assert!(buf[..] == model[9 << 20..][..4096]);
    // The kernel asked for one page; the chunk around it (256 KiB at least,
    // the volume's smallest) follows it into the cache.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut cached = resident_pages(&reader, model.len());
    while cached < 64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        cached = resident_pages(&reader, model.len());
    }
    assert!(cached >= 64, "only {cached} pages cached after a random read");
    // Writes still show: random reads (which offer their chunks), each
    // followed at once by a write into the same chunk through another handle
    // and a read of it through the first.
    for round in 0..30 {
        let at = rng.gen_range(1u64 << 20..15 << 20);
        let mut got = [0u8; 16];
        reader.read_exact_at(&mut got, at).unwrap();
        assert!(
            got[..] == model[at as usize..][..16],
            "round {round}: wrong bytes"
        );
        let new: [u8; 16] = rng.gen();
        let w = OpenOptions::new().write(true).open(&path).unwrap();
        w.write_all_at(&new, at + 100).unwrap();
        drop(w);
        model[at as usize + 100..][..16].copy_from_slice(&new);
        reader.read_exact_at(&mut got, at + 100).unwrap();
        assert_eq!(
            got, new,
            "round {round}: a read after a write returned older bytes"
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        fs::read(&path).unwrap() == model,
        "the file differs from the model"
    );
}

#[test]
fn random_reads_across_a_file_leave_the_pages_at_chunk_boundaries_in_the_page_cache() {
    // Chunk boundaries fall inside pages, and the kernel keeps only whole
    // pages of what fsclient offers it: before offers completed the pages at
    // a chunk's edges, those pages stayed out of the cache, and each read of
    // one fetched two whole chunks from the store again.
    use rand::seq::SliceRandom;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let kvd = Server::kvd(&[]).unwrap();
    let mut m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let model: Vec<u8> = (0..48 << 20).map(|_| rng.gen()).collect();
    fs::write(m.path().join("f"), &model).unwrap();
    assert!(m.stop(), "fsclient mount did not exit cleanly on SIGTERM");
    let m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let reader = File::open(m.path().join("f")).unwrap();
    // One page per read from the kernel (no read-ahead), so only the offers
    // put anything else in the cache.
    // SAFETY: advice on an open descriptor.
    let r = unsafe { libc::posix_fadvise(reader.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(r, 0);
    // A read every 32 KiB (chunks are 256 KiB at least, so every chunk is
    // read several times), in random order: fsclient offers nothing for a
    // read within 4 MiB after the one before (a sequential reader's, by its
    // guess), so a chunk is offered at its first read that is not.
    let mut offsets: Vec<usize> = (0..model.len()).step_by(32 << 10).map(|k| k + 2048).collect();
    offsets.shuffle(&mut rng);
    let mut byte = [0u8; 1];
    for at in offsets {
        reader.read_exact_at(&mut byte, at as u64).unwrap();
        assert_eq!(byte[0], model[at]);
    }
    // The pages chunk boundaries fall inside (the volume's chunking is the
    // default one, and a file written in one go is cut as a fresh chunking).
    let mut boundary_pages = Vec::new();
    let mut at = 0;
    for len in fsclient::tree::chunk_boundaries(&model, fsclient::tree::Chunking::default()) {
        at += len;
        if !at.is_multiple_of(4096) && at < model.len() {
            boundary_pages.push(at / 4096);
        }
    }
    assert!(
        boundary_pages.len() >= 20,
        "{} chunk boundaries",
        boundary_pages.len()
    );
    // Offers reach the cache from a thread of their own: wait for them.
    let missing = || {
        let resident = resident(&reader, model.len());
        boundary_pages
            .iter()
            .copied()
            .filter(|&p| !resident[p])
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !missing().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // This machine's host takes pages back from every page cache now and then
    // (measured: a 100 MiB file on the local disk lost 2% of its pages in 6 s,
    // a file on a mount 1 in 1,000), so a page may be missing for that reason;
    // before the fix nearly every boundary page was (all but the few a read
    // landed on).
    let missing = missing();
    assert!(
        missing.len() * 4 < boundary_pages.len(),
        "pages at chunk boundaries left out of the page cache: {missing:?} of {boundary_pages:?}"
    );
    let mut all = vec![0u8; model.len()];
    reader.read_exact_at(&mut all, 0).unwrap();
    assert!(all == model, "the cached file differs from what was written");
}

#[test]
fn daemon_mount_and_umount_commands() {
    protocol_tests::require_fuse();
    let kvd = Server::kvd(&[]).unwrap();
    let store = url(&kvd);
    let fsclient = |args: &[&str]| fsclient_at(&store, args);
    assert!(fsclient(&["mkfs"]).status.success());
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().to_str().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("mount.log");
    let out = Command::new(protocol_tests::fsclient_bin())
        .args(["--store", &store, "mount", "--daemon", "--log-file"])
        .arg(&log)
        .arg(mnt)
        .env("FSCLIENT_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(is_mounted(dir.path()));
    // Written and not yet committed by the interval: umount commits it first.
    fs::write(dir.path().join("via-daemon"), b"daemon").unwrap();
    let out = fsclient(&["umount", mnt]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!is_mounted(dir.path()));
    let out = fsclient(&["cat", "/via-daemon"]);
    assert_eq!(out.stdout, b"daemon");
    // The log file is plain text (it was full of colour escape codes).
    let logged = fs::read_to_string(&log).unwrap();
    assert!(logged.contains("DEBUG"), "nothing logged: {logged:?}");
    assert!(!logged.contains('\x1b'), "colour codes in the log file");
    // Unmounting what is not mounted is a clear error.
    let out = fsclient(&["umount", mnt]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a dictfs mount"));
}

/// Mounting at boot (issue 20): `mount -t fuse.fsclient URL/VOLUME DIR -o
/// ...` runs the helper `mount.fuse.fsclient` (a link to fsclient, installed
/// in /sbin for the test and removed after), which detaches once mounted;
/// `umount` unmounts it with what was written committed; and the fstab line
/// that `fsclient mount --update-fstab` writes mounts it again through
/// mount(8) (`mount -T FILE DIR`, the same code path as /etc/fstab).
#[test]
fn mount_t_fuse_fsclient_and_the_fstab_line_update_fstab_writes_both_mount() {
    protocol_tests::require_fuse();
    struct Installed(std::path::PathBuf);
    impl Drop for Installed {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    let helper = Path::new("/sbin").join(fsclient::fstab::HELPER);
    let _ = fs::remove_file(&helper);
    std::os::unix::fs::symlink(protocol_tests::fsclient_bin(), &helper).unwrap_or_else(|e| {
        panic!(
            "installing {} (the mount tests run as root): {e}",
            helper.display()
        )
    });
    let _installed = Installed(helper);

    let kvd = Server::kvd(&[]).unwrap();
    let store = url(&kvd);
    assert!(fsclient_at(&store, &["--volume", "boot", "mkfs"])
        .status
        .success());
    let dir = tempfile::tempdir().unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("mount")
        .args(["-t", "fuse.fsclient", &format!("{store}/boot")])
        .arg(dir.path())
        .args(["-o", "_netdev,nofail,commit_interval_ms=200"]));
    assert!(is_mounted(dir.path()));
    fs::write(dir.path().join("from-mount-t"), b"mounted by mount(8)").unwrap();
    run(Command::new("umount").arg(dir.path()));
    assert!(!is_mounted(dir.path()));
    let cat = fsclient_at(&store, &["--volume", "boot", "cat", "/from-mount-t"]);
    assert_eq!(cat.stdout, b"mounted by mount(8)");

    // --update-fstab writes the line (into the file FSCLIENT_FSTAB names).
    let etc = tempfile::tempdir().unwrap();
    let fstab = etc.path().join("fstab");
    fs::write(&fstab, "UUID=1 / ext4 defaults 0 1\n").unwrap();
    run(Command::new(protocol_tests::fsclient_bin())
        .args([
            "--store",
            &store,
            "--volume",
            "boot",
            "mount",
            "--daemon",
            "--update-fstab",
        ])
        .args(["--commit-interval-ms", "300"])
        .arg(dir.path())
        .env("FSCLIENT_FSTAB", &fstab));
    assert!(is_mounted(dir.path()));
    run(Command::new(protocol_tests::fsclient_bin())
        .arg("umount")
        .arg(dir.path()));
    let real = fs::canonicalize(dir.path()).unwrap();
    assert_eq!(
        fs::read_to_string(&fstab).unwrap(),
        format!(
            "UUID=1 / ext4 defaults 0 1\n{store}/boot {} fuse.fsclient _netdev,commit_interval_ms=300 0 0\n",
            real.display()
        )
    );
    // mount(8) mounts that line by its directory alone.
    run(Command::new("mount").arg("-T").arg(&fstab).arg(&real));
    assert!(is_mounted(dir.path()));
    assert_eq!(
        fs::read(dir.path().join("from-mount-t")).unwrap(),
        b"mounted by mount(8)"
    );
    run(Command::new("umount").arg(dir.path()));
    // A bad option is a clear error from the helper, and nothing is mounted.
    let out = Command::new("mount")
        .args(["-t", "fuse.fsclient", &format!("{store}/boot")])
        .arg(dir.path())
        .args(["-o", "colour=blue"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown mount option 'colour=blue'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(dir.path()));
}

/// `fsclient mount --metrics-addr` (issue 20): the endpoint parses as the
/// Prometheus text format and its figures move with the work done through
/// the mount: requests by kind, bytes written, commits.
#[test]
fn mount_metrics_parse_and_move_with_the_work_done() {
    use prometheus_parse::{Scrape, Value as P};
    let kvd = Server::kvd(&[]).unwrap();
    let port = protocol_tests::free_port();
    let m = Mount::start(
        &url(&kvd),
        "main",
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    )
    .unwrap();
    let scrape = || -> Scrape {
        let (head, body) = protocol_tests::http_get(port, "/metrics").unwrap();
        assert!(head.contains(" 200 "), "{head}");
        Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
    };
    let value = |s: &Scrape, metric: &str, label: Option<(&str, &str)>| -> Option<P> {
        s.samples
            .iter()
            .find(|x| x.metric == metric && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
            .map(|x| x.value.clone())
    };
    let before = scrape();
    assert_eq!(
        value(&before, "fsclient_written_bytes_total", None),
        Some(P::Counter(0.0))
    );
    let data = vec![7u8; 300_000];
    fs::write(m.path().join("f"), &data).unwrap();
    File::open(m.path().join("f")).unwrap().sync_all().unwrap();
    let after = scrape();
    assert_eq!(
        value(&after, "fsclient_written_bytes_total", None),
        Some(P::Counter(300_000.0))
    );
    let Some(P::Counter(commits)) = value(&after, "fsclient_commits_total", None) else {
        panic!("no fsclient_commits_total");
    };
    assert!(commits >= 1.0, "{commits}");
    let Some(P::Histogram(writes)) = value(&after, "fsclient_operation_seconds", Some(("op", "write")))
    else {
        panic!("no write operations counted");
    };
    let all = writes
        .iter()
        .find(|b| b.less_than.is_infinite())
        .expect("+Inf")
        .count;
    assert!(all >= 1.0, "{all}");
    assert!(matches!(
        value(&after, "fsclient_uploads_pending_bytes", None),
        Some(P::Gauge(_))
    ));
    // `fsclient status` reads the same endpoint for its line on the mount.
    let status = protocol_tests::fsclient_at(
        &url(&kvd),
        &[
            "status",
            "--quick",
            "--mount-metrics",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let screen = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // A commit may land between the scrape and the status: at least as many.
    let shown: f64 = screen
        .lines()
        .find_map(|l| l.strip_prefix("mount:    "))
        .and_then(|l| l.split_once(" commits (0 failed)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no mount line: {screen}"));
    assert!(shown >= commits, "{screen}");
}

#[test]
fn a_corrupt_blob_is_an_io_error_for_its_file_only() {
    let kvd = Server::kvd(&[]).unwrap();
    let mut m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let bad: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(m.path().join("bad"), &bad).unwrap();
    fs::write(m.path().join("good"), b"fine").unwrap();
    assert!(m.stop());
    // Overwrite the file's only chunk with other bytes, behind dictfs's back.
    let key = format!(
        "dfs:b:{}",
        fsclient::object::Hash::of(&fsclient::object::encode_chunk(&bad)).hex()
    );
    let mut c = kvd.connect().unwrap();
    assert_eq!(c.call(&["EXISTS", &key]).unwrap().as_int(), Some(1));
    c.call(&["SET", &key, "garbage"]).unwrap();
    let m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    assert_eq!(errno(fs::read(m.path().join("bad"))), libc::EIO);
    assert_eq!(fs::read(m.path().join("good")).unwrap(), b"fine");
    assert!(
        fs::metadata(m.path().join("bad")).is_ok(),
        "the name and attributes stay readable"
    );
}

#[test]
fn memory_stays_bounded_while_writing_a_large_file() {
    let kvd = Server::kvd(&[]).unwrap();
    let m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let pid = m.pid();
    let block: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let mut f = File::create(m.path().join("large")).unwrap();
    const MIB: u64 = 1536;
    for i in 0..MIB {
        // Different bytes per MiB, so nothing deduplicates.
        let mut b = block.clone();
        b[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&b).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    assert_eq!(fs::metadata(m.path().join("large")).unwrap().len(), MIB << 20);
    eprintln!(
        "fsclient peak memory {} MiB while writing {MIB} MiB",
        peak_kib / 1024
    );
    // Blob cache 256 MiB, overlay and upload queue 64 MiB each, kernel
    // request buffers: well under half the file.
    assert!(
        peak_kib < 640 * 1024,
        "fsclient's peak memory was {} MiB while writing {MIB} MiB",
        peak_kib / 1024
    );
    let mut r = File::open(m.path().join("large")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    r.seek(SeekFrom::Start(1234 << 20)).unwrap();
    r.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..8], &1234u64.to_le_bytes());
    assert_eq!(&buf[8..], &block[8..]);
}

#[test]
fn the_store_going_away_is_an_io_error_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut kvd = Server::kvd_in(dir.path(), &["--appendfsync", "always"]).unwrap();
    let port = kvd.port;
    let mut m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    fs::write(m.path().join("before"), b"committed on close").unwrap();
    kvd.kill9();
    // Written while the store is down: accepted locally, but fsync must not
    // claim it is safe.
    let mut f = File::create(m.path().join("during")).unwrap();
    f.write_all(b"written during the outage").unwrap();
    assert_eq!(errno(f.sync_all()), libc::EIO);
    assert_eq!(fs::read(m.path().join("before")).unwrap(), b"committed on close");
    // The store comes back where it was: the next fsync commits everything.
    let kvd = Server::kvd_on(port, dir.path(), &[]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(m.stop());
    let m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    assert_eq!(fs::read(m.path().join("before")).unwrap(), b"committed on close");
    assert_eq!(
        fs::read(m.path().join("during")).unwrap(),
        b"written during the outage"
    );
}

/// Stopping a mount whose store has gone away: it unmounts, and says that
/// what was written since the last commit did not reach the store (it said
/// "cannot mount at", as if it had never mounted).
#[test]
fn a_mount_stopped_with_its_store_gone_says_what_was_not_stored() {
    let mut kvd = Server::kvd(&[]).unwrap();
    fsclient_at(&url(&kvd), &["--volume", "main", "mkfs"]);
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(protocol_tests::fsclient_bin())
        .args(["--store", &url(&kvd), "--volume", "main", "mount"])
        .arg(dir.path())
        .args(["--commit-interval-ms", "60000", "--no-commit-on-close"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !is_mounted(dir.path()) {
        assert!(Instant::now() < deadline, "not mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    fs::write(dir.path().join("unsaved"), b"not committed yet").unwrap();
    kvd.kill9();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!is_mounted(dir.path()), "still mounted");
    assert!(
        stderr.contains("is unmounted, but what was written since the last commit is not in the store"),
        "{stderr}"
    );
    assert!(!stderr.contains("cannot mount"), "{stderr}");
}

#[test]
fn snapshots_show_in_the_mount_read_only_and_restore_brings_files_back() {
    let kvd = Server::kvd(&[]).unwrap();
    let m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
        .collect();
    fs::create_dir(m.path().join("docs")).unwrap();
    fs::write(m.path().join("docs/report"), &data).unwrap();
    fs::write(m.path().join("docs/note"), b"keep me").unwrap();
    let cli = |args: &[&str]| {
        let out = fsclient_at(&url(&kvd), args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    cli(&["snapshot", "create", "monday"]);
    // Change one file, delete the other.
    fs::write(m.path().join("docs/report"), b"overwritten").unwrap();
    fs::remove_file(m.path().join("docs/note")).unwrap();
    fs::File::open(m.path()).unwrap().sync_all().unwrap();
    // The snapshot still shows the old tree, through the mount and the CLI.
    let snap = m.path().join(".snapshots/monday/docs");
    assert!(fs::read(snap.join("report")).unwrap() == data);
    assert_eq!(fs::read(snap.join("note")).unwrap(), b"keep me");
    assert_eq!(cli(&["cat", "--at", "monday", "/docs/note"]), b"keep me");
    assert_eq!(errno(fs::write(snap.join("note"), b"x")), libc::EROFS);
    assert_eq!(errno(fs::remove_file(snap.join("note"))), libc::EROFS);
    assert!(fs::read_dir(m.path().join(".history")).unwrap().count() >= 3);
    // Restore brings the deleted file back byte-identical, and the mount sees it.
    cli(&["restore", "/docs/report", "--from", "monday"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read(m.path().join("docs/report")).ok().as_deref() != Some(&data[..]) {
        assert!(
            Instant::now() < deadline,
            "the mount never showed the restored file"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn statvfs(p: &Path) -> libc::statvfs {
    let c = cpath(p);
    // SAFETY: a valid path and a zeroed struct for the kernel to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st
}

#[test]
fn statfs_reports_kvds_disk_and_a_large_default_for_redis() {
    let kvd = Server::kvd(&[]).unwrap();
    let m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let (mounted, disk) = (statvfs(m.path()), statvfs(&kvd.data));
    let bytes = |s: &libc::statvfs, n: u64| n * s.f_frsize;
    assert_eq!(
        bytes(&mounted, mounted.f_blocks),
        bytes(&disk, disk.f_blocks) / 4096 * 4096,
        "the mount's size is the size of kvd's disk"
    );
    require_redis();
    let redis = Server::redis(&[]).unwrap();
    let r = Mount::start(&url(&redis), "main", &[]).unwrap();
    let s = statvfs(r.path());
    assert_eq!(bytes(&s, s.f_bavail), 1 << 50, "redis cannot tell: 1 PiB free");
}

/// Issue 24: a full store. redis-server with a 64 MB maxmemory and no
/// eviction; 200 MiB written through the mount with fsync. The writer is told
/// ENOSPC (not EIO); no commit may name a chunk the store did not take (the
/// mount's interval commits go on meanwhile); once there is room, the bytes
/// the mount accepted are stored whole, `fsck` is clean and the file reads
/// back. Before the fix a failed retry left no error for the next commit,
/// which published a root naming missing chunks: fsck reported /fill damaged.
#[test]
fn a_full_store_is_enospc_to_the_writer_and_never_damages_the_volume() {
    require_redis();
    let redis = Server::redis(&["--maxmemory", "64mb", "--maxmemory-policy", "noeviction"]).unwrap();
    let url = url(&redis);
    let mut m = Mount::start(&url, "full", &[]).unwrap();
    let src = tempfile::NamedTempFile::new().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(24);
    let mut data = vec![0u8; 200 << 20];
    rng.fill(&mut data[..]);
    fs::write(src.path(), &data).unwrap();
    let target = m.path().join("fill");
    let (mut written, mut failure) = (0usize, None);
    {
        let mut f = File::create(&target).unwrap();
        for block in data.chunks(1 << 20) {
            match f.write_all(block) {
                Ok(()) => written += block.len(),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            failure = f.sync_all().err();
        }
    }
    let failure = failure.expect("200 MiB into a 64 MB store reported no error");
    assert_eq!(
        failure.raw_os_error(),
        Some(libc::ENOSPC),
        "the writer got {failure}"
    );
    // `df` says the file system is full while the store refuses for want of room.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and a statvfs to fill.
    assert_eq!(unsafe { libc::statvfs(cpath(m.path()).as_ptr(), &mut st) }, 0);
    assert_eq!(st.f_bavail, 0, "df shows free space on a full store");
    // The interval commits that ran while the store was full named nothing missing.
    assert_fsck_clean(&url, "full", "fsck while full");
    // Room again: what the mount accepted is stored by its next commit.
    redis.connect().unwrap().cmd("CONFIG SET maxmemory 0").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match File::open(&target).and_then(|f| f.sync_all()) {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "fsync still fails with room: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(m.stop(), "unmount failed");
    assert_fsck_clean(&url, "full", "fsck after room");
    let out = tempfile::NamedTempFile::new().unwrap();
    let get = fsclient_at(
        &url,
        &["--volume", "full", "get", "/fill", out.path().to_str().unwrap()],
    );
    assert!(get.status.success(), "{}", String::from_utf8_lossy(&get.stderr));
    let back = fs::read(out.path()).unwrap();
    assert!(
        back.len() >= written,
        "{} bytes back, {written} accepted",
        back.len()
    );
    assert!(
        back == data[..back.len()],
        "the stored bytes differ from those written"
    );
}

/// Issue 24: a store node away while files are written. A Redis Cluster of
/// three masters (AOF, fsync always); the mount talks to the node holding the
/// volume's root, and another master is killed while a writer creates and
/// fsyncs files, then restarted on its port and data. Every file the writer
/// was told is stored stays intact; every file it was told failed is, once the
/// node is back, either stored whole or not named at all; `fsck` is clean.
/// Before the fix a commit whose uploads had failed once found no error the
/// next time and swapped the root (its node was up): fsck reported the files
/// damaged, and they answered EIO for good.
#[test]
fn a_store_node_away_while_files_are_written_never_damages_the_volume() {
    require_redis();
    let mut cluster =
        protocol_tests::RedisCluster::start_with(3, &["--appendonly", "yes", "--appendfsync", "always"])
            .unwrap();
    let owner = cluster.owner_of("dfs:v:away:root").unwrap();
    let victim = (owner + 1) % 3;
    let url = url(&cluster.nodes[owner]);
    let mut m = Mount::start(&url, "away", &[]).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut content = |i: usize| -> Vec<u8> {
        let mut v = vec![0u8; 5000 + i * 300];
        rng.fill(&mut v[..]);
        v
    };
    let write = |path: &Path, bytes: &[u8]| -> std::io::Result<()> {
        let mut f = File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let bytes = content(i);
        write(&m.path().join(format!("before{i}")), &bytes).unwrap();
        acknowledged.push((format!("/before{i}"), bytes));
    }
    cluster.nodes[victim].kill9();
    let mut refused = Vec::new();
    for i in 0..30 {
        let bytes = content(100 + i);
        let name = format!("away{i}");
        match write(&m.path().join(&name), &bytes) {
            Ok(()) => acknowledged.push((format!("/{name}"), bytes)),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
                refused.push((format!("/{name}"), bytes));
            }
        }
        // Interval commits run meanwhile (every 200 ms).
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        refused.len() >= 5,
        "only {} of 30 writes failed with a node away",
        refused.len()
    );
    cluster.restart(victim).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = File::open(m.path()).and_then(|d| d.sync_all()) {
        assert!(
            Instant::now() < deadline,
            "syncfs still fails with the node back: {e}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(m.stop(), "unmount failed");
    assert_fsck_clean(&url, "away", "fsck");
    let read = |path: &str| -> Option<Vec<u8>> {
        let out = fsclient_at(&url, &["--volume", "away", "cat", path]);
        out.status.success().then_some(out.stdout)
    };
    for (path, bytes) in &acknowledged {
        assert!(
            read(path).as_ref() == Some(bytes),
            "{path}: acknowledged and not intact"
        );
    }
    for (path, bytes) in &refused {
        if let Some(got) = read(path) {
            assert!(
                &got == bytes,
                "{path}: refused, then stored with other bytes ({} of {})",
                got.len(),
                bytes.len()
            );
        }
    }
}

/// Issue 24: two mounts renaming the same 20 files back and forth (30 rounds
/// each, at once) end with exactly the 20 files they started with, each with
/// its content: a rename on both sides is one file, not a copy under each
/// side's name and conflict copies (before: all 20 duplicated and 57
/// conflict copies).
#[test]
fn renames_from_two_mounts_leave_exactly_the_files_they_started_with() {
    let kvd = Server::kvd(&[]).unwrap();
    let a = Mount::start(&url(&kvd), "storm", &[]).unwrap();
    let b = Mount::start(&url(&kvd), "storm", &[]).unwrap();
    for i in 0..20 {
        fs::write(a.path().join(format!("f{i:02}")), format!("content {i}")).unwrap();
    }
    File::open(a.path()).unwrap().sync_all().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (0..20).any(|i| !b.path().join(format!("f{i:02}")).exists()) {
        assert!(Instant::now() < deadline, "B never saw A's files");
        std::thread::sleep(Duration::from_millis(50));
    }
    let storm = |root: std::path::PathBuf, tag: &'static str| {
        std::thread::spawn(move || {
            for round in 0..30 {
                for i in 0..20 {
                    let (plain, moved) = (root.join(format!("f{i:02}")), root.join(format!("f{i:02}.{tag}")));
                    let (from, to) = if round % 2 == 0 {
                        (&plain, &moved)
                    } else {
                        (&moved, &plain)
                    };
                    // The other mount may have moved it meanwhile: that is the point.
                    let _ = fs::rename(from, to);
                }
                let _ = File::open(&root).and_then(|d| d.sync_all());
            }
        })
    };
    let (ta, tb) = (
        storm(a.path().to_path_buf(), "a"),
        storm(b.path().to_path_buf(), "b"),
    );
    ta.join().unwrap();
    tb.join().unwrap();
    for m in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = File::open(m.path()).and_then(|d| d.sync_all()) {
            assert!(Instant::now() < deadline, "sync fails: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(a);
    drop(b);
    let out = fsclient_at(&url(&kvd), &["--volume", "storm", "ls", "/"]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let names: Vec<&str> = listing
        .split_whitespace()
        .filter(|n| n.starts_with('f'))
        .collect();
    assert_eq!(
        names.len(),
        20,
        "{} names after the storm:\n{listing}",
        names.len()
    );
    let mut contents: Vec<String> = names
        .iter()
        .map(|n| {
            String::from_utf8_lossy(
                &fsclient_at(&url(&kvd), &["--volume", "storm", "cat", &format!("/{n}")]).stdout,
            )
            .into_owned()
        })
        .collect();
    contents.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("content {i}")).collect();
    want.sort();
    assert_eq!(contents, want);
}

/// Issue 24: a Redis Cluster failover must not leave the mount dead. Three
/// masters with a replica each (AOF on, node timeout 2 s); the mount talks to
/// a node that stays up; a writer creates and fsyncs 20 KB files while the
/// master holding the volume's root is killed. Once the cluster has failed
/// over, the mount's writes succeed again within 5 s, and every file whose
/// fsync returned is intact. Before, the mount's cluster connection kept
/// sending to the dead master's address and every write failed from then on.
#[test]
fn a_redis_cluster_failover_leaves_the_mount_writing() {
    failover_case(false);
}

/// The same when the one address the mount was given is the master that dies:
/// it reconnects through the nodes it learned from CLUSTER SLOTS.
#[test]
fn a_redis_cluster_failover_of_the_mounts_own_address_leaves_it_writing() {
    failover_case(true);
}

fn failover_case(through_the_dying_node: bool) {
    require_redis();
    let mut cluster = protocol_tests::RedisCluster::start_replicated(
        3,
        &["--appendonly", "yes", "--cluster-node-timeout", "2000"],
    )
    .unwrap();
    let root_key = "dfs:v:failover:root";
    let owner = cluster.owner_of(root_key).unwrap();
    let via = if through_the_dying_node {
        owner
    } else {
        (0..cluster.nodes.len()).find(|&i| i != owner).unwrap()
    };
    let url = url(&cluster.nodes[via]);
    // fsck and cat afterwards go through a node that is up.
    let check_url = self::url(&cluster.nodes[(owner + 1) % cluster.nodes.len()]);
    let m = Mount::start(&url, "failover", &[]).unwrap();
    let dir = m.path().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data: Vec<u8> = (0..20_000u32).map(|j| (j.wrapping_mul(31) ^ i) as u8).collect();
                let path = dir.join(format!("w{i:05}"));
                let ok = File::create(&path)
                    .and_then(|mut f| f.write_all(&data).and_then(|_| f.sync_all()))
                    .is_ok();
                results.push((i, Instant::now(), ok, data));
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            results
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    cluster.nodes[owner].kill9();
    // The failover is done when a live node serves the root's slot again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed_over = loop {
        let served = (0..cluster.nodes.len()).filter(|&i| i != owner).any(|i| {
            cluster.nodes[i]
                .connect()
                .and_then(|mut c| c.call(&["GET", root_key]))
                .is_ok_and(|v| !v.text().starts_with("MOVED") && !v.text().starts_with("CLUSTERDOWN"))
        });
        if served {
            break Instant::now();
        }
        if Instant::now() >= deadline {
            let views: Vec<String> = (0..cluster.nodes.len())
                .filter(|&i| i != owner)
                .map(|i| {
                    let mut c = cluster.nodes[i].connect().unwrap();
                    format!(
                        "{:?} / {}",
                        c.call(&["GET", root_key]).map(|v| v.text()),
                        c.cmd("CLUSTER NODES").unwrap().as_str()
                    )
                })
                .collect();
            panic!("the cluster never failed over:\n{}", views.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = writer.join().unwrap();
    let first_ok_after = results
        .iter()
        .find(|(_, at, ok, _)| *ok && *at > failed_over)
        .map(|(_, at, _, _)| *at);
    let Some(first) = first_ok_after else {
        panic!(
            "no write succeeded after the failover ({} attempts)",
            results.len()
        );
    };
    assert!(
        first.duration_since(failed_over) <= Duration::from_secs(5),
        "writes came back {:?} after the failover",
        first.duration_since(failed_over)
    );
    let late: Vec<_> = results
        .iter()
        .filter(|(_, at, _, _)| *at > failed_over + Duration::from_secs(5))
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|(_, _, ok, _)| *ok),
        "writes failed well after the failover"
    );
    drop(m);
    assert_fsck_clean(&check_url, "failover", "fsck");
    for (i, _, ok, data) in results.iter().filter(|r| r.2) {
        let out = fsclient_at(&check_url, &["--volume", "failover", "cat", &format!("/w{i:05}")]);
        assert!(
            *ok && out.status.success() && out.stdout == *data,
            "/w{i:05}: acknowledged and not intact"
        );
    }
}

/// Issue 23: on a replicated kvd (every key on all three nodes), killing the
/// very node the mount was given costs the user nothing: a writer creating
/// and fsyncing files sees no error, and every file reads back afterwards
/// through another node. fsclient learns the members from INFO and goes on
/// through the next one (before, every operation failed once the mount's one
/// address was gone).
#[test]
fn a_replicated_kvd_losing_the_mounts_own_node_costs_the_writer_nothing() {
    let mut c = protocol_tests::Replicated::start(3, 3);
    let m = Mount::start(&format!("redis://127.0.0.1:{}", c.ports[0]), "main", &[]).unwrap();
    let dir = m.path().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut errors = Vec::new();
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data = format!("file {i} ").repeat(500).into_bytes();
                let path = dir.join(format!("f{i:05}"));
                match File::create(&path).and_then(|mut f| f.write_all(&data).and_then(|_| f.sync_all())) {
                    Ok(()) => written.push((i, data)),
                    Err(e) => errors.push(format!("f{i:05}: {e}")),
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (written, errors)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    c.kill9(0);
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (written, errors) = writer.join().unwrap();
    assert!(
        errors.is_empty(),
        "the writer saw {} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(written.len() > 50, "only {} files written", written.len());
    drop(m);
    let url = format!("redis://127.0.0.1:{}", c.ports[1]);
    assert_fsck_clean(&url, "main", "fsck");
    for (i, data) in written.iter().step_by(7) {
        let out = fsclient_at(&url, &["--volume", "main", "cat", &format!("/f{i:05}")]);
        assert!(out.status.success() && out.stdout == *data, "/f{i:05} not intact");
    }
}

/// Issue 24: device nodes and sockets are stored, with their device numbers,
/// hard links to them too, and come back after an unmount and a new mount
/// (they were refused with EPERM).
#[test]
fn device_nodes_and_sockets_survive_a_remount() {
    let kvd = Server::kvd(&[]).unwrap();
    let mut m = Mount::start(&url(&kvd), "dev", &[]).unwrap();
    for (name, kind, rdev) in [
        ("null", libc::S_IFCHR, libc::makedev(1, 3)),
        ("loop2", libc::S_IFBLK, libc::makedev(7, 2)),
        ("sock", libc::S_IFSOCK, 0),
    ] {
        let path = cpath(&m.path().join(name));
        // SAFETY: a valid path.
        assert_eq!(
            unsafe { libc::mknod(path.as_ptr(), kind | 0o600, rdev) },
            0,
            "mknod {name}"
        );
    }
    // A second name for a device node (it moves into the inode table).
    fs::hard_link(m.path().join("null"), m.path().join("null2")).unwrap();
    assert!(m.stop(), "unmount failed");
    let m = Mount::start(&url(&kvd), "dev", &[]).unwrap();
    for (name, kind, rdev) in [
        ("null", libc::S_IFCHR, libc::makedev(1, 3)),
        ("null2", libc::S_IFCHR, libc::makedev(1, 3)),
        ("loop2", libc::S_IFBLK, libc::makedev(7, 2)),
        ("sock", libc::S_IFSOCK, 0),
    ] {
        let md = fs::symlink_metadata(m.path().join(name)).unwrap();
        assert_eq!(
            (md.mode() & libc::S_IFMT, md.rdev(), md.mode() & 0o7777),
            (kind, rdev, 0o600),
            "{name}"
        );
    }
    let ls = fsclient_at(&url(&kvd), &["--volume", "dev", "ls", "-l", "/"]);
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(
        listing.lines().any(|l| l.starts_with('c') && l.ends_with("null")),
        "{listing}"
    );
    assert!(
        listing.lines().any(|l| l.starts_with('s') && l.ends_with("sock")),
        "{listing}"
    );
}

/// Issue 24: the root directory's own mode, owner, times and xattrs are
/// stored in the volume (in each commit), so they survive an unmount and are
/// what another mount shows (they were kept in memory only).
#[test]
fn the_root_directorys_own_metadata_is_stored() {
    let kvd = Server::kvd(&[]).unwrap();
    let mut m = Mount::start(&url(&kvd), "rootmeta", &[]).unwrap();
    fs::set_permissions(m.path(), fs::Permissions::from_mode(0o710)).unwrap();
    let root = cpath(m.path());
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::chown(root.as_ptr(), 1234, 5678) }, 0);
    xattr_set(m.path(), "user.where", b"root", 0).unwrap();
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 7,
        },
        libc::timespec {
            tv_sec: 1_100_000_000,
            tv_nsec: 9,
        },
    ];
    // SAFETY: a valid path and two timespecs.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, root.as_ptr(), times.as_ptr(), 0) },
        0
    );
    assert!(m.stop(), "unmount failed");
    let m = Mount::start(&url(&kvd), "rootmeta", &[]).unwrap();
    let md = fs::metadata(m.path()).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o710);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_100_000_000, 9));
    assert_eq!(xattr_get(m.path(), "user.where").unwrap(), b"root");
}

/// Issue 24: access times on a real mount, with `relatime` rules: reading a
/// file moves its atime past its mtime, a second read does not move it,
/// `touch -a` sets it, and all of it survives an unmount (it rides in the
/// next commit). `--noatime` mounts `noatime` and keeps none.
#[test]
fn access_times_follow_relatime_and_survive_a_remount() {
    let kvd = Server::kvd(&[]).unwrap();
    let mut m = Mount::start(&url(&kvd), "atime", &[]).unwrap();
    let f = m.path().join("f");
    fs::write(&f, b"some bytes").unwrap();
    let written = fs::metadata(&f).unwrap();
    assert_eq!(written.atime(), written.mtime());
    std::thread::sleep(Duration::from_millis(1100));
    // A fresh open and read (the kernel may serve cached pages, so drop them).
    let _ = std::process::Command::new("sh")
        .args(["-c", "echo 1 > /proc/sys/vm/drop_caches"])
        .status();
    assert_eq!(fs::read(&f).unwrap(), b"some bytes");
    let read = fs::metadata(&f).unwrap();
    assert!(
        (read.atime(), read.atime_nsec()) > (read.mtime(), read.mtime_nsec()),
        "atime {}.{} mtime {}.{}",
        read.atime(),
        read.atime_nsec(),
        read.mtime(),
        read.mtime_nsec()
    );
    assert_eq!(read.ctime(), written.ctime(), "a read is not a change");
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(m.path().to_str().unwrap()))
        .unwrap()
        .to_string();
    assert!(!line.contains("noatime"), "{line}");
    // touch -a -d sets it outright.
    let g = m.path().join("g");
    fs::write(&g, b"x").unwrap();
    let status = std::process::Command::new("touch")
        .args(["-a", "-d", "2001-09-09 01:46:40 UTC"])
        .arg(&g)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(fs::metadata(&g).unwrap().atime(), 1_000_000_000);
    assert!(m.stop(), "unmount failed");
    let mut m = Mount::start(&url(&kvd), "atime", &["--noatime"]).unwrap();
    let f = m.path().join("f");
    let kept = fs::metadata(&f).unwrap();
    assert_eq!(
        (kept.atime(), kept.atime_nsec()),
        (read.atime(), read.atime_nsec())
    );
    assert_eq!(fs::metadata(m.path().join("g")).unwrap().atime(), 1_000_000_000);
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(m.path().to_str().unwrap()) && l.contains("noatime")),
        "{mounts}"
    );
    assert!(m.stop(), "unmount failed");
}

/// Every metric the Grafana dashboard (dist/grafana/dictfs.json) queries is
/// one a kvd node of a replicated cluster or a mount serves: a renamed metric
/// fails here instead of leaving an empty panel.
#[test]
fn the_grafana_dashboard_asks_only_for_metrics_kvd_and_the_mount_serve() {
    let (kvd_metrics, mount_metrics) = (protocol_tests::free_port(), protocol_tests::free_port());
    let port = protocol_tests::free_port();
    let dir = tempfile::tempdir().unwrap();
    let (me, metrics_addr) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{kvd_metrics}"));
    let kvd = Server::kvd_with_env(
        port,
        dir.path(),
        &[
            "--replicas",
            "1",
            "--peers",
            &me,
            "--cluster-secret",
            "s",
            "--metrics-addr",
            &metrics_addr,
        ],
        &[],
    )
    .unwrap();
    let m = Mount::start(
        &url(&kvd),
        "main",
        &["--metrics-addr", &format!("127.0.0.1:{mount_metrics}")],
    )
    .unwrap();
    fs::write(m.path().join("f"), b"scraped").unwrap();
    File::open(m.path().join("f")).unwrap().sync_all().unwrap();
    assert_eq!(fs::read(m.path().join("f")).unwrap(), b"scraped");
    // Errors are counted by kind once there is one.
    assert!(kvd
        .connect()
        .unwrap()
        .call(&["NOSUCHCOMMAND"])
        .unwrap()
        .is_error());
    let mut served = std::collections::HashSet::new();
    for port in [kvd_metrics, mount_metrics] {
        let (_, body) = protocol_tests::http_get(port, "/metrics").unwrap();
        for l in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let name = l.split(['{', ' ']).next().unwrap();
            served.insert(name.to_string());
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/grafana/dictfs.json"))
            .unwrap(),
    )
    .unwrap();
    let mut asked = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("kvd_") || word.starts_with("fsclient_") {
                    asked.push(word.to_string());
                }
            }
        }
    }
    assert!(asked.len() > 20, "{asked:?}");
    let missing: Vec<&String> = asked.iter().filter(|n| !served.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard asks for {missing:?}, which nothing serves"
    );
}
