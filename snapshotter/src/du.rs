//! Disk usage of a directory tree, as containerd's `fs.DiskUsage` counts it:
//! allocated blocks × 512 and distinct inodes, hard links counted once.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::types::Usage;

/// Walks `root` without following symlinks.
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)
            .map_err(|e| Error::io(format!("stat {}", p.display()), e))?;
        if seen.insert((md.dev(), md.ino())) {
            usage.inodes += 1;
            usage.size += i64::try_from(md.blocks() * 512).unwrap_or(i64::MAX);
        }
        if md.is_dir() {
            let rd = std::fs::read_dir(&p)
                .map_err(|e| Error::io(format!("read dir {}", p.display()), e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io(format!("read dir {}", p.display()), e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hard_links_once() -> Result<(), Box<dyn std::error::Error>> {
        let d = tempfile::tempdir()?;
        std::fs::write(d.path().join("a"), vec![1u8; 100_000])?;
        std::fs::hard_link(d.path().join("a"), d.path().join("b"))?;
        std::fs::create_dir(d.path().join("sub"))?;
        let u = disk_usage(d.path())?;
        assert_eq!(u.inodes, 3); // root, a(=b), sub
        assert!(u.size >= 100_000, "{u:?}");
        Ok(())
    }
}
