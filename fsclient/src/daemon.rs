//! A mount as a process of its own: started detached (`mount --daemon`, and
//! the mount helper, which must return once the volume is mounted), found in
//! the system's mount table, and unmounted (`fsclient umount`).

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// How long a detached mount may take to appear before it is given up.
const MOUNT_WAIT: Duration = Duration::from_secs(15);

/// Whether `dir` is a dictfs mount (per /proc/self/mounts).
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return false;
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() > 2 && Path::new(f[1]) == dir && f[0].starts_with("dictfs:") && f[2].starts_with("fuse")
    })
}

/// Starts this program again with `args` (the mount's own, without
/// `--daemon`), detached from the terminal, its log going to `log_file` (else
/// discarded), and waits until `mountpoint` is mounted or the child fails.
/// Returns the child's pid.
/// `env`: variables the mount needs beyond this process's (a passphrase typed
/// here, which the detached mount cannot ask for).
pub fn start_detached(
    args: &[OsString],
    env: &[(&str, &str)],
    mountpoint: &Path,
    log_file: Option<&Path>,
) -> Result<u32, String> {
    use std::os::unix::process::CommandExt;
    let log = match log_file {
        Some(p) => std::process::Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("cannot open log file '{}': {e}", p.display()))?,
        ),
        None => std::process::Stdio::null(),
    };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it only detaches from the terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let deadline = std::time::Instant::now() + MOUNT_WAIT;
    while std::time::Instant::now() < deadline {
        if is_mounted(mountpoint) {
            return Ok(child.id());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("mount failed ({status}); see the log (--log-file)"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    Err(format!(
        "'{}' was not mounted within {} s",
        mountpoint.display(),
        MOUNT_WAIT.as_secs()
    ))
}

/// Commits what was written to the mount at `mountpoint` (an fsync of its
/// root directory) and unmounts it: with fusermount3 when it is there (no
/// root needed), else umount(2).
pub fn umount(mountpoint: &Path) -> Result<(), String> {
    let shown = mountpoint.display();
    if !is_mounted(mountpoint) {
        return Err(format!("cannot unmount '{shown}': not a dictfs mount"));
    }
    if let Err(e) = std::fs::File::open(mountpoint).and_then(|d| d.sync_all()) {
        tracing::warn!("could not commit before unmounting '{shown}': {e}");
    }
    let fusermount = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status();
    if matches!(fusermount, Ok(s) if s.success()) {
        return Ok(());
    }
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| format!("cannot unmount '{shown}': bad path"))?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("cannot unmount '{shown}': {e}"));
    }
    Ok(())
}
