//! Small files that must survive a crash whole: written to a temporary file,
//! fsynced, renamed over the old one, and the directory fsynced, so a crash
//! leaves either the old contents or the new, never a mix or nothing.

use std::io::Write;
use std::path::Path;

/// Replaces the file at `path` with `contents`, durably.
pub fn replace(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
