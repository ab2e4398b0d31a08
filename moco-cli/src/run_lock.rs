//! [`RunLock`]: a run folder held by one process for the life of its run. The lock is the
//! operating system's advisory lock on `RUN/.moco.lock` (`flock`), which the kernel releases
//! when the process exits in any way (a kill included), so a lock left by a dead process is
//! never in the way; the file itself stays, holding the last holder's process id for the
//! message another process gets.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The exclusive hold of one run folder; released when dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// The lock file of the run folder `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(".moco.lock")
    }

    /// Takes the lock of the run folder `dir` (which must exist), or fails at once, naming
    /// the process that holds it, when another process does.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = Self::path_in(dir);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if !try_lock(&file).map_err(|e| Error::io(&path, e))? {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (process {pid})"),
            };
            return Err(Error::run(format!(
                "{}: another moco process{holder} is running in this folder; wait for it to end, or choose another --out",
                dir.display()
            )));
        }
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// An exclusive, non-blocking advisory lock on `file`: `Ok(false)` when another process
/// holds it.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this `File` owns for the call's duration.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(code) if code == libc::EWOULDBLOCK => Ok(false),
        _ => Err(e),
    }
}

/// Elsewhere no lock is taken (the folder is not protected against a second process).
#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A second hold of a held folder fails naming this process; once the first is dropped,
    /// the folder can be taken again.
    #[test]
    fn a_held_folder_is_refused_until_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        assert!(first.path().exists());
        let e = RunLock::acquire(dir.path()).unwrap_err().to_string();
        let pid = std::process::id().to_string();
        assert!(
            e.contains("another moco process") && e.contains(&pid),
            "{e}"
        );
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }
}
