//! Data-parallel training over several processes (one per GPU, or several CPU processes).
//!
//! A [`Collective`] is a process group: each process knows its rank and the world size, and the
//! three collectives MoCo needs: the sum of a tensor over all ranks (gradient averaging), the
//! concatenation of every rank's tensor in rank order (shuffle-BN across GPUs, keys gathered
//! before the enqueue, in-batch negatives for MoCo v3) and a broadcast (the same start on every
//! rank). [`crate::Moco::with_collective`] uses them the way the official code uses
//! `DistributedDataParallel` and `concat_all_gather`.
//!
//! Backends:
//! - [`SingleProcess`]: world size 1, every collective is the identity;
//! - [`TcpGroup`]: CPU tensors between processes over TCP, through rank 0 (which sums in rank
//!   order, so every rank gets bit-identical results and reruns are reproducible);
//! - `NcclGroup` (cargo feature `nccl`): CUDA tensors with NCCL, one process per GPU, on one
//!   machine or several.
//!
//! Every backend meets through a rendezvous file ([`DistConfig::init_file`]): rank 0 writes how
//! to reach it (TCP: its address; NCCL: its unique id), the others wait for the file and read
//! it. On several machines the file lives on a shared file system; nothing else changes.
//! Rank 0 deletes the file once every rank has joined; a new run needs a path that does not
//! hold an old file (`moco launch` makes a fresh one each time).

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A process group: this process's rank, the world size and the collectives.
///
/// Every rank must call the same collectives in the same order with tensors of the same shape;
/// a backend that can detect a mismatch reports it as an error naming both sides.
pub trait Collective: std::fmt::Debug {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// The backend's name (`single`, `tcp`, `nccl`).
    fn backend(&self) -> &'static str;
    /// Element-wise sum of `t` over all ranks; every rank receives the same tensor.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's `t` (all of one shape) concatenated along dimension 0 in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `t` on every rank (elsewhere `t` only gives the shape and dtype).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
}

/// World size 1: every collective returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
}

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
    fn name(self) -> &'static str {
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

    fn check(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::config(
                "rank",
                format!(
                    "rank {} is outside 0..{} (the world size)",
                    self.rank, self.world_size
                ),
            ));
        }
        Ok(())
    }
}

/// Joins the group described by `config`; `device` is where this rank's tensors live (NCCL
/// needs this rank's CUDA device). A group of one process is a real group of its backend (its
/// collectives run, and must change nothing: a check of the backend); use [`SingleProcess`]
/// for plain single-process training.
pub fn init(config: &DistConfig, device: &Device) -> Result<Box<dyn Collective>> {
    config.check()?;
    match config.backend {
        Backend::Tcp => Ok(Box::new(TcpGroup::join(config)?)),
        #[cfg(feature = "nccl")]
        Backend::Nccl => Ok(Box::new(nccl::NcclGroup::join(config, device)?)),
        #[cfg(not(feature = "nccl"))]
        Backend::Nccl => {
            let _ = device;
            Err(Error::config(
                "dist-backend",
                "nccl: this build has no NCCL; rebuild with `--features nccl` (scripts/build-cuda.sh)",
            ))
        }
    }
}

/// Rank 0's side of the rendezvous: `backend payload` written atomically to the file.
fn publish(config: &DistConfig, payload: &str) -> Result<()> {
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
fn wait_for_payload(config: &DistConfig) -> Result<String> {
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
fn retire(config: &DistConfig) {
    if config.rank == 0 {
        let _ = std::fs::remove_file(&config.init_file);
    }
}

const MAGIC: &[u8; 4] = b"MoCo";
const OP_ALL_REDUCE: u32 = 1;
const OP_ALL_GATHER: u32 = 2;
const OP_BROADCAST: u32 = 3;

fn op_name(op: u32) -> String {
    match op & 0xff {
        OP_ALL_REDUCE => "all_reduce".into(),
        OP_ALL_GATHER => "all_gather".into(),
        OP_BROADCAST => format!("broadcast from rank {}", op >> 8),
        _ => format!("unknown operation {op}"),
    }
}

/// One rank's part of a collective as it travels: operation, shape, float32 data.
#[derive(Debug)]
struct Message {
    op: u32,
    dims: Vec<usize>,
    data: Vec<f32>,
}

fn write_message(w: &mut impl Write, m: &Message) -> std::io::Result<()> {
    w.write_all(&m.op.to_le_bytes())?;
    w.write_all(&(m.dims.len() as u32).to_le_bytes())?;
    for &d in &m.dims {
        w.write_all(&(d as u64).to_le_bytes())?;
    }
    w.write_all(&(m.data.len() as u64).to_le_bytes())?;
    w.write_all(bytemuck::cast_slice(&m.data))?;
    w.flush()
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_message(r: &mut impl Read) -> std::io::Result<Message> {
    let op = read_u32(r)?;
    let nd = read_u32(r)? as usize;
    let dims = (0..nd)
        .map(|_| read_u64(r).map(|d| d as usize))
        .collect::<std::io::Result<Vec<_>>>()?;
    let n = read_u64(r)? as usize;
    let mut data = vec![0f32; n];
    r.read_exact(bytemuck::cast_slice_mut(&mut data))?;
    Ok(Message { op, dims, data })
}

/// The reply from rank 0: a result, or the reason the collective failed.
fn write_reply(
    w: &mut impl Write,
    reply: &std::result::Result<Message, String>,
) -> std::io::Result<()> {
    match reply {
        Ok(m) => {
            w.write_all(&[0])?;
            write_message(w, m)
        }
        Err(msg) => {
            w.write_all(&[1])?;
            w.write_all(&(msg.len() as u32).to_le_bytes())?;
            w.write_all(msg.as_bytes())?;
            w.flush()
        }
    }
}

fn read_reply(r: &mut impl Read) -> std::io::Result<std::result::Result<Message, String>> {
    let mut status = [0u8; 1];
    r.read_exact(&mut status)?;
    if status[0] == 0 {
        return read_message(r).map(Ok);
    }
    let n = read_u32(r)? as usize;
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    Ok(Err(String::from_utf8_lossy(&b).into_owned()))
}

struct Peer {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl Peer {
    fn new(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::with_capacity(1 << 20, stream.try_clone()?),
            writer: BufWriter::with_capacity(1 << 20, stream),
        })
    }
}

/// A CPU process group over TCP, star-shaped: ranks send their part to rank 0, which combines
/// the parts in rank order and sends the result back. Tensors travel as float32 and come back in
/// their own dtype on their own device.
///
/// Meant for CPU training with several processes (and for testing the distributed logic
/// anywhere); GPUs use NCCL.
pub struct TcpGroup {
    rank: usize,
    world_size: usize,
    /// Rank 0: one connection per other rank (index r - 1). Other ranks: the one to rank 0.
    peers: Mutex<Vec<Peer>>,
}

impl std::fmt::Debug for TcpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

impl TcpGroup {
    /// Joins (rank 0: sets up) the group through `config.init_file`.
    pub fn join(config: &DistConfig) -> Result<Self> {
        config.check()?;
        let err = |msg: String| Error::Dist {
            rank: config.rank,
            msg,
        };
        let (world, rank) = (config.world_size, config.rank);
        let peers = if rank == 0 {
            let listener = TcpListener::bind(&config.listen)
                .map_err(|e| err(format!("cannot listen on {}: {e}", config.listen)))?;
            let addr = listener
                .local_addr()
                .map_err(|e| err(format!("listening socket: {e}")))?;
            publish(config, &addr.to_string())?;
            listener
                .set_nonblocking(true)
                .map_err(|e| err(e.to_string()))?;
            let mut slots: Vec<Option<Peer>> = (1..world).map(|_| None).collect();
            let start = Instant::now();
            while slots.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((stream, from)) => {
                        stream
                            .set_nonblocking(false)
                            .map_err(|e| err(e.to_string()))?;
                        let mut peer = Peer::new(stream).map_err(|e| err(e.to_string()))?;
                        let joined = handshake_accept(&mut peer, world)
                            .map_err(|e| err(format!("a process at {from}: {e}")))?;
                        match joined {
                            Ok(r) if slots[r - 1].is_none() => slots[r - 1] = Some(peer),
                            Ok(r) => {
                                let msg = format!("rank {r} joined twice");
                                let _ = send_refusal(&mut peer, &msg);
                                return Err(err(msg));
                            }
                            Err(msg) => {
                                let _ = send_refusal(&mut peer, &msg);
                                return Err(err(format!("a process at {from}: {msg}")));
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if start.elapsed() > config.timeout {
                            let missing: Vec<String> = slots
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            retire(config);
                            return Err(err(format!(
                                "ranks {} did not join within {} s (rendezvous file {})",
                                missing.join(", "),
                                config.timeout.as_secs(),
                                config.init_file.display()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(err(format!("accepting a connection: {e}"))),
                }
            }
            // Everyone is connected: tell them, in rank order.
            let mut peers: Vec<Peer> = slots.into_iter().flatten().collect();
            for p in &mut peers {
                p.writer
                    .write_all(&[0])
                    .and_then(|()| p.writer.flush())
                    .map_err(|e| err(e.to_string()))?;
            }
            retire(config);
            peers
        } else {
            let start = Instant::now();
            let peer = loop {
                let addr = wait_for_payload(config)?;
                match connect(&addr, world, rank) {
                    Ok(Ok(p)) => break p,
                    Ok(Err(refused)) => return Err(err(format!("rank 0 refused: {refused}"))),
                    Err(e) if start.elapsed() > config.timeout => {
                        return Err(err(format!(
                            "cannot reach rank 0 at {addr} (from {}): {e}",
                            config.init_file.display()
                        )))
                    }
                    // Rank 0 not listening yet, or an old file: read it again.
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            vec![peer]
        };
        Ok(Self {
            rank,
            world_size: world,
            peers: Mutex::new(peers),
        })
    }

    fn exchange(
        &self,
        mine: Message,
        combine: impl FnOnce(Vec<Message>) -> std::result::Result<Message, String>,
    ) -> Result<Message> {
        let err = |msg: String| Error::Dist {
            rank: self.rank,
            msg,
        };
        let mut peers = self
            .peers
            .lock()
            .map_err(|_| err("a previous collective panicked".into()))?;
        if self.rank == 0 {
            let mut parts = vec![mine];
            for (i, p) in peers.iter_mut().enumerate() {
                let m = read_message(&mut p.reader).map_err(|e| {
                    err(format!(
                        "lost the connection to rank {} (did that process fail?): {e}",
                        i + 1
                    ))
                })?;
                parts.push(m);
            }
            let reply = match parts.iter().position(|m| m.op != parts[0].op) {
                Some(r) => Err(format!(
                    "ranks disagree on the collective: rank 0 called {}, rank {r} called {}",
                    op_name(parts[0].op),
                    op_name(parts[r].op)
                )),
                None => combine(parts),
            };
            for (i, p) in peers.iter_mut().enumerate() {
                write_reply(&mut p.writer, &reply)
                    .map_err(|e| err(format!("lost the connection to rank {}: {e}", i + 1)))?;
            }
            reply.map_err(err)
        } else {
            let p = &mut peers[0];
            write_message(&mut p.writer, &mine)
                .map_err(|e| err(format!("lost the connection to rank 0: {e}")))?;
            read_reply(&mut p.reader)
                .map_err(|e| err(format!("lost the connection to rank 0 (did it fail?): {e}")))?
                .map_err(err)
        }
    }
}

fn handshake_accept(
    peer: &mut Peer,
    world: usize,
) -> std::io::Result<std::result::Result<usize, String>> {
    let mut magic = [0u8; 4];
    peer.reader.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Ok(Err("not a moco process".into()));
    }
    let (w, r) = (
        read_u32(&mut peer.reader)? as usize,
        read_u32(&mut peer.reader)? as usize,
    );
    if w != world {
        return Ok(Err(format!(
            "it expects a world size of {w}, rank 0 has {world}"
        )));
    }
    if r == 0 || r >= world {
        return Ok(Err(format!("rank {r} is outside 1..{world}")));
    }
    Ok(Ok(r))
}

fn send_refusal(peer: &mut Peer, msg: &str) -> std::io::Result<()> {
    write_reply(&mut peer.writer, &Err(msg.to_string()))
}

fn connect(
    addr: &str,
    world: usize,
    rank: usize,
) -> std::io::Result<std::result::Result<Peer, String>> {
    let sock = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("no address in `{addr}`")))?;
    let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
    let mut peer = Peer::new(stream)?;
    peer.writer.write_all(MAGIC)?;
    peer.writer.write_all(&(world as u32).to_le_bytes())?;
    peer.writer.write_all(&(rank as u32).to_le_bytes())?;
    peer.writer.flush()?;
    let mut status = [0u8; 1];
    peer.reader.read_exact(&mut status)?;
    if status[0] == 0 {
        return Ok(Ok(peer));
    }
    let n = read_u32(&mut peer.reader)? as usize;
    let mut b = vec![0u8; n];
    peer.reader.read_exact(&mut b)?;
    Ok(Err(String::from_utf8_lossy(&b).into_owned()))
}

fn to_message(op: u32, t: &Tensor, with_data: bool) -> Result<Message> {
    let data = if with_data {
        t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?
    } else {
        vec![]
    };
    Ok(Message {
        op,
        dims: t.dims().to_vec(),
        data,
    })
}

fn from_message(m: Message, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_vec(m.data, m.dims, like.device())?.to_dtype(like.dtype())?)
}

fn same_shapes(parts: &[Message]) -> std::result::Result<(), String> {
    match parts.iter().position(|m| m.dims != parts[0].dims) {
        Some(r) => Err(format!(
            "ranks disagree on the shape of a {}: rank 0 has {:?}, rank {r} has {:?}",
            op_name(parts[0].op),
            parts[0].dims,
            parts[r].dims
        )),
        None => Ok(()),
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let m = self.exchange(to_message(OP_ALL_REDUCE, t, true)?, |parts| {
            same_shapes(&parts)?;
            let mut it = parts.into_iter();
            let mut acc = it.next().ok_or("no parts")?;
            // Summed in rank order: the same bits on every rank, and in every rerun.
            for m in it {
                for (a, b) in acc.data.iter_mut().zip(&m.data) {
                    *a += b;
                }
            }
            Ok(acc)
        })?;
        from_message(m, t)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let m = self.exchange(to_message(OP_ALL_GATHER, t, true)?, |parts| {
            same_shapes(&parts)?;
            let mut dims = parts[0].dims.clone();
            if dims.is_empty() {
                return Err("all_gather needs tensors of at least one dimension".into());
            }
            dims[0] *= parts.len();
            let op = parts[0].op;
            let data = parts.into_iter().flat_map(|m| m.data).collect();
            Ok(Message { op, dims, data })
        })?;
        from_message(m, t)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world_size {
            return Err(Error::config(
                "root",
                format!("rank {root} is outside 0..{}", self.world_size),
            ));
        }
        let op = OP_BROADCAST | (root as u32) << 8;
        let m = self.exchange(to_message(op, t, self.rank == root)?, |parts| {
            same_shapes(&parts)?;
            parts.into_iter().nth(root).ok_or_else(|| "no root".into())
        })?;
        from_message(m, t)
    }
}

/// Runs `f` on `world` threads, each one rank of a [`TcpGroup`] over loopback, and returns
/// their results in rank order: a data-parallel run simulated in one process (for tests, and
/// for checking a distributed setup without several processes).
pub fn on_threads<T: Send + 'static>(
    world: usize,
    f: impl Fn(Box<dyn Collective>) -> T + Send + Sync + 'static,
) -> Result<Vec<T>> {
    let file = fresh_init_file(&std::env::temp_dir());
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (f, file) = (f.clone(), file.clone());
            std::thread::spawn(move || -> Result<T> {
                let mut c = DistConfig::new(world, rank, file);
                c.timeout = Duration::from_secs(60);
                Ok(f(init(&c, &Device::Cpu)?))
            })
        })
        .collect();
    handles
        .into_iter()
        .enumerate()
        .map(|(rank, h)| {
            h.join().map_err(|_| Error::Dist {
                rank,
                msg: "the thread panicked".into(),
            })?
        })
        .collect()
}

/// A fresh rendezvous file path under `dir` (unique per call): for launchers.
pub fn fresh_init_file(dir: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    dir.join(format!(".moco-dist-{}-{nanos}", std::process::id()))
}

#[cfg(feature = "nccl")]
pub mod nccl {
    //! NCCL process group: CUDA tensors, one process per GPU.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{CustomOp1, Device, Layout, Shape, Tensor};

    use super::{publish, retire, wait_for_payload, Collective, DistConfig};
    use crate::{Error, Result};

    /// A process group over NCCL. Rank 0 creates the unique id and writes it (hex) to the
    /// rendezvous file.
    pub struct NcclGroup {
        comm: Comm,
        rank: usize,
        world_size: usize,
    }

    impl std::fmt::Debug for NcclGroup {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("NcclGroup")
                .field("rank", &self.rank)
                .field("world_size", &self.world_size)
                .finish()
        }
    }

    impl NcclGroup {
        /// Joins the group; `device` must be this rank's CUDA device.
        pub fn join(config: &DistConfig, device: &Device) -> Result<Self> {
            let err = |msg: String| Error::Dist {
                rank: config.rank,
                msg,
            };
            let Device::Cuda(dev) = device else {
                return Err(Error::config(
                    "dist-backend",
                    "nccl needs a CUDA device (--device cuda)",
                ));
            };
            let id = if config.rank == 0 {
                let id = Id::new().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
                let hex: String = id
                    .internal()
                    .iter()
                    .map(|&c| format!("{:02x}", c as u8))
                    .collect();
                publish(config, &hex)?;
                id
            } else {
                let hex = wait_for_payload(config)?;
                let bytes: Vec<u8> = (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| Error::file(&config.init_file, "not an NCCL id"))?;
                let mut internal = [0 as std::ffi::c_char; 128];
                if bytes.len() != internal.len() {
                    return Err(Error::file(&config.init_file, "not an NCCL id"));
                }
                for (d, s) in internal.iter_mut().zip(bytes) {
                    *d = s as std::ffi::c_char;
                }
                Id::uninit(internal)
            };
            let comm = Comm::from_rank(dev.cuda_stream(), config.rank, config.world_size, id)
                .map_err(|e| err(format!("ncclCommInitRank: {e:?}")))?;
            retire(config);
            Ok(Self {
                comm,
                rank: config.rank,
                world_size: config.world_size,
            })
        }
    }

    enum Op {
        AllReduce,
        AllGather,
        Broadcast(usize),
    }

    struct NcclOp<'a> {
        comm: &'a Comm,
        op: Op,
        world: usize,
    }

    impl CustomOp1 for NcclOp<'_> {
        fn name(&self) -> &'static str {
            "nccl"
        }

        fn cpu_fwd(
            &self,
            _s: &candle_core::CpuStorage,
            _l: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("NCCL collectives need CUDA tensors")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = s.device().clone();
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("NCCL collectives need contiguous tensors")
            };
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            let n = end - start;
            let (out_len, shape) = match self.op {
                Op::AllGather => {
                    let mut dims = l.dims().to_vec();
                    dims[0] *= self.world;
                    (n * self.world, Shape::from(dims))
                }
                _ => (n, l.shape().clone()),
            };
            // SAFETY: every element is written by the collective before it is read.
            let mut dst = unsafe { dev.alloc::<f32>(out_len)? };
            match self.op {
                Op::AllReduce => self
                    .comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map(|_| ()),
                Op::AllGather => self.comm.all_gather(&src, &mut dst).map(|_| ()),
                Op::Broadcast(root) => self
                    .comm
                    .broadcast(Some(&src), &mut dst, root as i32)
                    .map(|_| ()),
            }
            .map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape))
        }
    }

    impl NcclGroup {
        fn apply(&self, t: &Tensor, op: Op) -> Result<Tensor> {
            let dtype = t.dtype();
            let x = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
            let y = x.apply_op1_no_bwd(&NcclOp {
                comm: &self.comm,
                op,
                world: self.world_size,
            })?;
            Ok(y.to_dtype(dtype)?)
        }
    }

    impl Collective for NcclGroup {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world_size
        }
        fn backend(&self) -> &'static str {
            "nccl"
        }
        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            self.apply(t, Op::AllReduce)
        }
        fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
            if t.rank() == 0 {
                return Err(Error::config(
                    "all_gather",
                    "needs tensors of at least one dimension",
                ));
            }
            self.apply(t, Op::AllGather)
        }
        fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
            self.apply(t, Op::Broadcast(root))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn on_threads<T: Send + 'static>(
        world: usize,
        f: impl Fn(usize, Box<dyn Collective>) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        super::on_threads(world, move |g| f(g.rank(), g)).unwrap()
    }

    #[test]
    fn collectives_over_tcp() {
        let out = on_threads(3, |rank, g| {
            let dev = Device::Cpu;
            let r = rank as f32;
            let t = Tensor::new(&[[r, 1.0], [2.0 * r, 0.5]], &dev).unwrap();
            let sum = g.all_reduce_sum(&t).unwrap().to_vec2::<f32>().unwrap();
            let all = g.all_gather(&t).unwrap().to_vec2::<f32>().unwrap();
            let ids = Tensor::new(&[rank as u32 + 10], &dev).unwrap();
            let b = g.broadcast(&ids, 2).unwrap();
            assert_eq!(b.dtype(), DType::U32);
            (sum, all, b.to_vec1::<u32>().unwrap())
        });
        for (sum, all, b) in out {
            assert_eq!(sum, vec![vec![3.0, 3.0], vec![6.0, 1.5]]);
            assert_eq!(
                all,
                vec![
                    vec![0.0, 1.0],
                    vec![0.0, 0.5],
                    vec![1.0, 1.0],
                    vec![2.0, 0.5],
                    vec![2.0, 1.0],
                    vec![4.0, 0.5]
                ]
            );
            assert_eq!(b, vec![12]);
        }
    }

    #[test]
    fn mismatched_calls_are_errors_on_every_rank() {
        let out = on_threads(2, |rank, g| {
            let t = Tensor::zeros(rank + 1, DType::F32, &Device::Cpu).unwrap();
            let shape = g.all_reduce_sum(&t).unwrap_err().to_string();
            let op = if rank == 0 {
                g.all_reduce_sum(&t).unwrap_err().to_string()
            } else {
                g.all_gather(&t).unwrap_err().to_string()
            };
            (shape, op)
        });
        for (shape, op) in out {
            assert!(shape.contains("rank 0 has [1], rank 1 has [2]"), "{shape}");
            assert!(
                op.contains("rank 0 called all_reduce, rank 1 called all_gather"),
                "{op}"
            );
        }
    }

    #[test]
    fn a_missing_rank_is_a_timeout_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = DistConfig::new(3, 0, dir.path().join("init"));
        c.timeout = Duration::from_millis(300);
        let e = TcpGroup::join(&c).unwrap_err().to_string();
        assert!(e.contains("ranks 1, 2 did not join"), "{e}");
        let mut c = DistConfig::new(2, 1, dir.path().join("never"));
        c.timeout = Duration::from_millis(100);
        let e = TcpGroup::join(&c).unwrap_err().to_string();
        assert!(e.contains("never") && e.contains("did not write"), "{e}");
        let e = init(&DistConfig::new(2, 2, dir.path().join("x")), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2 is outside 0..2"), "{e}");
    }
}
