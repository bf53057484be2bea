//! A copy of the server binary a test may replace, as a bad deploy would.

use std::path::PathBuf;

use super::{BIN, scratch_dir};

/// A copy of the server binary in a directory of its own, so a test can play "bad deploy"
/// (exec spawning and upgrades run whatever binary is at that path now).
pub struct BinaryCopy {
    /// The directory (removed on drop).
    pub dir: PathBuf,
    /// The copy.
    pub path: PathBuf,
}

impl BinaryCopy {
    /// The copy lives in a world-traversable directory (mode 0755 under the temp dir), so a
    /// process running as another user (`nobody`) can execute it wherever the checkout is.
    pub fn new() -> BinaryCopy {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch_dir();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("prefork-echo");
        std::fs::copy(BIN, &path).expect("copying the binary");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        BinaryCopy { dir, path }
    }

    /// Replaces the binary, atomically (running processes keep the old one), with a
    /// program that exits 1 at once.
    pub fn break_it(&self) {
        self.replace_with("#!/bin/sh\nexit 1\n");
    }

    /// Replaces the binary at its path (atomically, as a deploy would) with `script`.
    pub fn replace_with(&self, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let next = self.dir.join("next");
        std::fs::write(&next, script).unwrap();
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&next, &self.path).unwrap();
    }
}

impl Drop for BinaryCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
