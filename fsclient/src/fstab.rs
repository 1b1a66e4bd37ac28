//! Mounting from `/etc/fstab` and `mount -t fuse.fsclient`: the calling
//! convention of a mount helper, translated into `fsclient mount`'s own
//! options, and the fstab line `fsclient mount --update-fstab` writes.
//!
//! `mount -t fuse.fsclient SOURCE DIR -o OPTIONS` runs the helper
//! `mount.fuse.fsclient SOURCE DIR -o OPTIONS` (a link to the `fsclient`
//! binary; mount(8) looks for it in /sbin). SOURCE is the store URL with the
//! volume as its path, `redis://host:7379/VOLUME`; OPTIONS are fsclient's
//! (`commit_interval_ms=500,allow_other,metrics_addr=HOST:PORT,...`) mixed with the generic ones
//! fstab lines carry (`_netdev`, `nofail`, `noauto`, `x-systemd.*`...), which
//! are for mount(8) and systemd, not for us, and are passed over.

use std::path::{Path, PathBuf};

/// The name the helper is installed under: mount(8) runs it for the type
/// `fuse.fsclient`.
pub const HELPER: &str = "mount.fuse.fsclient";

/// Generic options that mount(8), fstab or systemd act on; the helper passes
/// them over.
const GENERIC: &[&str] = &[
    "rw", "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "_netdev", "nofail",
    "relatime", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async", "sync",
];

/// What a helper invocation asks for, as `fsclient`'s own arguments.
#[derive(Debug, PartialEq, Eq)]
pub struct HelperMount {
    /// Global options (`--store`, `--volume`, `--prefix`, `--cache-mib`).
    pub global: Vec<String>,
    /// Options of `mount`, with `--daemon` (a helper returns once mounted).
    pub mount: Vec<String>,
    pub mountpoint: String,
}

impl HelperMount {
    /// The whole `fsclient` command line (without the program name).
    pub fn args(&self) -> Vec<String> {
        let mut out = self.global.clone();
        out.push("mount".into());
        out.extend(self.mount.iter().cloned());
        out.push(self.mountpoint.clone());
        out
    }
}

/// Splits `redis://[:pw@]host:port/VOLUME` into the store URL and the volume
/// (none if the URL has no path).
pub fn split_source(source: &str) -> Result<(String, Option<String>), String> {
    let Some((scheme, rest)) = source.split_once("://") else {
        return Err(format!(
            "'{source}' is not a store URL with a volume (redis://host:port/VOLUME)"
        ));
    };
    match rest.split_once('/') {
        None | Some((_, "")) => Ok((format!("{scheme}://{}", rest.trim_end_matches('/')), None)),
        Some((host, volume)) if !volume.contains('/') => {
            Ok((format!("{scheme}://{host}"), Some(volume.to_string())))
        }
        Some(_) => Err(format!(
            "'{source}': the volume is one name after the host (redis://host:port/VOLUME)"
        )),
    }
}

/// Translates a helper's arguments (`SOURCE DIR [-o OPTIONS] [-n] [-s] [-f]
/// [-v]`, as mount(8) passes them) into `fsclient`'s.
pub fn helper_mount(args: &[String]) -> Result<HelperMount, String> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => options.push(it.next().ok_or("-o needs a value")?.clone()),
            // Flags mount(8) may add: no mtab, sloppy, fake, verbose.
            "-n" | "-s" | "-f" | "-v" => {}
            o if o.starts_with("-o") => options.push(o[2..].to_string()),
            o if o.starts_with('-') => return Err(format!("unknown flag {o}")),
            p => positional.push(p.to_string()),
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        return Err(format!(
            "usage: {HELPER} redis://host:port/VOLUME DIR [-o OPTIONS]"
        ));
    };
    let (url, volume) = split_source(source)?;
    let mut global = vec!["--store".to_string(), url];
    if let Some(v) = volume {
        global.extend(["--volume".to_string(), v]);
    }
    let mut mount = vec!["--daemon".to_string()];
    for opt in options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (opt, None),
        };
        let flag = |n: &str| format!("--{}", n.replace('_', "-"));
        match (name, value) {
            (n, None) if GENERIC.contains(&n) => {}
            (n, _) if n.starts_with("x-") || n == "comment" => {}
            ("ro", None) => return Err("read-only mounts are not supported (ro)".into()),
            ("allow_other" | "noatime" | "no_commit_on_close", None) => mount.push(flag(name)),
            ("commit_interval_ms" | "threads" | "log_file" | "metrics_addr", Some(v)) => {
                mount.extend([flag(name), v.to_string()]);
            }
            // An encrypted volume's key file (a mount at boot cannot ask for a passphrase).
            ("cache_mib" | "prefix" | "key_file", Some(v)) => global.extend([flag(name), v.to_string()]),
            _ => return Err(format!("unknown mount option '{opt}'")),
        }
    }
    Ok(HelperMount {
        global,
        mount,
        mountpoint: mountpoint.clone(),
    })
}

/// The fstab line that mounts `volume` of `store` at `mountpoint` at boot
/// (after the network is up) with `options` (fsclient's, as above).
pub fn fstab_line(store: &str, volume: &str, mountpoint: &str, options: &[String]) -> String {
    let mut opts = vec!["_netdev".to_string()];
    opts.extend(options.iter().cloned());
    format!(
        "{}/{volume} {mountpoint} fuse.fsclient {} 0 0",
        store.trim_end_matches('/'),
        opts.join(",")
    )
}

/// `fstab` with `line` for its mountpoint: replaces a line that mounts
/// something at the same place, else appends it.
pub fn with_line(fstab: &str, line: &str) -> String {
    let target = line.split_whitespace().nth(1);
    let mut out = String::new();
    let mut replaced = false;
    for l in fstab.lines() {
        let is_entry = !l.trim_start().starts_with('#');
        if is_entry && l.split_whitespace().nth(1) == target {
            if !replaced {
                out.push_str(line);
                out.push('\n');
                replaced = true;
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    if !replaced {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Writes (or replaces) the line that mounts `volume` of `store` at
/// `mountpoint` with `options`: in /etc/fstab, or the file `FSCLIENT_FSTAB`
/// names. Written beside the file and renamed over it, so a crash leaves the
/// old file or the new one. Returns the file and the line.
pub fn update(
    store: &str,
    volume: &str,
    mountpoint: &Path,
    options: &[String],
) -> Result<(PathBuf, String), String> {
    let path = std::env::var_os("FSCLIENT_FSTAB").map_or_else(|| PathBuf::from("/etc/fstab"), PathBuf::from);
    let dir = std::fs::canonicalize(mountpoint)
        .map_err(|e| format!("cannot use '{}' as a mountpoint: {e}", mountpoint.display()))?;
    let line = fstab_line(store, volume, &dir.to_string_lossy(), options);
    let old = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let tmp = path.with_extension("fsclient-new");
    std::fs::write(&tmp, with_line(&old, &line))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok((path, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_helper_call_becomes_a_daemon_mount_with_fsclients_options() {
        let m = helper_mount(&args(
            "redis://10.0.0.5:7379/photos /mnt/photos -o rw,_netdev,nofail,x-systemd.automount,commit_interval_ms=500,allow_other,cache_mib=512",
        ))
        .unwrap();
        assert_eq!(
            m.args(),
            args(
                "--store redis://10.0.0.5:7379 --volume photos --cache-mib 512 mount --daemon --commit-interval-ms 500 --allow-other /mnt/photos"
            )
        );
        // No volume in the URL: fsclient's default.
        let m = helper_mount(&args("redis://h:1 /m -n")).unwrap();
        assert_eq!(m.args(), args("--store redis://h:1 mount --daemon /m"));
    }

    #[test]
    fn bad_helper_calls_are_clear_errors() {
        let err = |s: &str| helper_mount(&args(s)).unwrap_err();
        assert!(err("redis://h:1/v /m -o ro").contains("read-only"));
        assert!(err("redis://h:1/v /m -o colour=blue").contains("unknown mount option 'colour=blue'"));
        assert!(err("photos /m").contains("not a store URL"));
        assert!(err("redis://h:1/a/b /m").contains("one name"));
        assert!(err("redis://h:1/v").contains("usage"));
    }

    #[test]
    fn the_fstab_line_replaces_one_for_the_same_mountpoint_and_keeps_the_rest() {
        let line = fstab_line("redis://h:7379", "main", "/mnt/d", &["allow_other".into()]);
        assert_eq!(
            line,
            "redis://h:7379/main /mnt/d fuse.fsclient _netdev,allow_other 0 0"
        );
        let fstab = "# /mnt/d was here\nUUID=1 / ext4 defaults 0 1\nold /mnt/d fuse.fsclient _netdev 0 0\n";
        let out = with_line(fstab, &line);
        assert_eq!(
            out,
            format!("# /mnt/d was here\nUUID=1 / ext4 defaults 0 1\n{line}\n")
        );
        assert_eq!(with_line(&out, &line), out, "writing it again changes nothing");
        assert_eq!(
            with_line("UUID=1 / ext4 defaults 0 1", &line),
            format!("UUID=1 / ext4 defaults 0 1\n{line}\n")
        );
        // The line parses back into the same mount.
        let m = helper_mount(&args(&format!(
            "redis://h:7379/main /mnt/d -o {}",
            "_netdev,allow_other"
        )))
        .unwrap();
        assert_eq!(
            m.args(),
            args("--store redis://h:7379 --volume main mount --daemon --allow-other /mnt/d")
        );
    }
}
