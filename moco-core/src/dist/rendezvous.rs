//! How the processes of a group find each other: [`DistConfig`] (world size, rank, backend,
//! the rendezvous file) and the file itself. Rank 0 writes how to reach it (TCP: its address;
//! NCCL: its unique id) atomically into the file, the others wait for the file and read it; on
//! several machines the file lives on a shared file system. Rank 0 deletes it once every rank
//! has joined.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Which library moves the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors over TCP ([`TcpGroup`]).
    Tcp,
    /// CUDA tensors with NCCL (cargo feature `nccl`).
    Nccl,
}

impl Backend {
    /// `tcp` or `nccl`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "tcp" => Ok(Self::Tcp),
            "nccl" => Ok(Self::Nccl),
            other => Err(Error::config(
                "dist-backend",
                format!("`{other}`: expected `tcp` or `nccl`"),
            )),
        }
    }
    /// `tcp` or `nccl`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Nccl => "nccl",
        }
    }
}

/// How a process joins its group.
#[derive(Debug, Clone)]
pub struct DistConfig {
    /// Number of processes.
    pub world_size: usize,
    /// This process's rank.
    pub rank: usize,
    /// The rendezvous file: written by rank 0, read by the others (shared between machines for
    /// a multi-node run).
    pub init_file: PathBuf,
    /// The backend.
    pub backend: Backend,
    /// TCP only: the address rank 0 listens on (`HOST:PORT`; port 0 picks a free one). The
    /// default, `127.0.0.1:0`, serves processes on this machine; for several machines give an
    /// address of rank 0's machine that the others reach.
    pub listen: String,
    /// How long to wait for the other ranks to join.
    pub timeout: Duration,
}

impl DistConfig {
    /// A group of `world_size` processes meeting at `init_file`, with the defaults.
    pub fn new(world_size: usize, rank: usize, init_file: impl Into<PathBuf>) -> Self {
        Self {
            world_size,
            rank,
            init_file: init_file.into(),
            backend: Backend::Tcp,
            listen: "127.0.0.1:0".into(),
            timeout: Duration::from_secs(600),
        }
    }

    /// An error unless the rank lies inside the world.
    pub(crate) fn check(&self) -> Result<()> {
        check_rank(self.world_size, self.rank)
    }
}

/// An error unless `rank` lies inside a world of `world_size` processes (at least one).
pub fn check_rank(world_size: usize, rank: usize) -> Result<()> {
    if world_size == 0 || rank >= world_size {
        return Err(Error::config(
            "rank",
            format!("rank {rank} is outside 0..{world_size} (the world size)"),
        ));
    }
    Ok(())
}

/// Rank 0's side of the rendezvous: `backend payload` written atomically to the file.
pub(crate) fn publish(config: &DistConfig, payload: &str) -> Result<()> {
    if let Some(dir) = config.init_file.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
    }
    let text = format!(
        "{} {} {}\n",
        config.backend.name(),
        config.world_size,
        payload
    );
    crate::io::write_atomic(&config.init_file, text.as_bytes())
}

/// The other ranks' side: waits for the file and returns rank 0's payload.
pub(crate) fn wait_for_payload(config: &DistConfig) -> Result<String> {
    let start = Instant::now();
    let path = &config.init_file;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let mut words = text.split_whitespace();
            let (backend, world, payload) = (words.next(), words.next(), words.next());
            if let (Some(b), Some(w), Some(p)) = (backend, world, payload) {
                if b != config.backend.name() || w != config.world_size.to_string() {
                    return Err(Error::file(
                        path,
                        format!(
                            "rank 0 set up a `{b}` group of {w} processes, this rank expects `{}` with {}",
                            config.backend.name(),
                            config.world_size
                        ),
                    ));
                }
                return Ok(p.to_string());
            }
        }
        if start.elapsed() > config.timeout {
            return Err(Error::file(
                path,
                format!(
                    "rank {}: rank 0 did not write this rendezvous file within {} s",
                    config.rank,
                    config.timeout.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rank 0 removes the rendezvous file once everyone has joined.
pub(crate) fn retire(config: &DistConfig) {
    if config.rank == 0 {
        let _ = std::fs::remove_file(&config.init_file);
    }
}

/// A fresh rendezvous file path under `dir` (unique per call): for launchers.
pub fn fresh_init_file(dir: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    dir.join(format!(".moco-dist-{}-{nanos}", std::process::id()))
}
