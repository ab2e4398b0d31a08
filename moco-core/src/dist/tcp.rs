//! [`TcpGroup`]: CPU tensors between processes over TCP, star-shaped through rank 0 (which
//! sums in rank order, so every rank gets bit-identical results and reruns are reproducible),
//! and [`on_threads`], a data-parallel run simulated by threads of one process.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::collective::Collective;
use super::rendezvous::{fresh_init_file, publish, retire, wait_for_payload, DistConfig};
use crate::{Error, Result};

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
                c.check()?;
                Ok(f(Box::new(TcpGroup::join(&c)?)))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Device;

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
}
