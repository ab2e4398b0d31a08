//! `moco launch`: starts the processes of a data-parallel `moco pretrain` on this machine, one
//! per GPU (or CPU process), and watches them: when one fails, the others are stopped.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Data-parallel pretraining: starts one `moco pretrain` process per GPU (or CPU process)
/// on this machine with its rank, and stops them all if one fails.
/// Example: `moco launch --nproc-per-node 8 -- --preset v2 --device cuda --out runs/v2`.
#[derive(Debug, Clone, clap::Args)]
pub struct Launch {
    /// Processes on this machine (one per GPU).
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Machines taking part (run `moco launch` on each).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This machine's index, 0..nnodes (its processes get ranks node_rank * nproc_per_node + i).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Rendezvous file (default: a fresh one in --out; several machines: a path on a shared
    /// file system, new for each run).
    #[arg(long)]
    pub dist_init: Option<PathBuf>,
    /// The `moco pretrain` flags, after `--` (--out required; --dist-backend and
    /// --dist-addr pass through).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub args: Vec<String>,
}

/// The value of `--NAME VALUE` or `--NAME=VALUE` in `args`.
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let long = format!("--{name}");
    let eq = format!("--{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == long {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&eq)
        }
    })
}

impl Launch {
    /// The argument lists of this machine's processes, by local rank.
    pub fn commands(&self) -> Result<Vec<Vec<String>>> {
        if self.nproc_per_node == 0 || self.nnodes == 0 || self.node_rank >= self.nnodes {
            bail!(
                "--nproc-per-node and --nnodes must be positive and --node-rank below --nnodes (got {}, {}, {})",
                self.nproc_per_node,
                self.nnodes,
                self.node_rank
            );
        }
        // Each process is a whole training process (threads, data workers, a model copy):
        // far more of them than cores only thrashes, and a mistyped count would fork thousands.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let most = (4 * cores).max(8);
        if self.nproc_per_node > most {
            bail!(
                "--nproc-per-node {}: this machine has {cores} CPU cores, and more than {most} processes (4 per core, at least 8) on one machine would only compete for them",
                self.nproc_per_node
            );
        }
        if self.nproc_per_node.checked_mul(self.nnodes).is_none() {
            bail!("--nnodes {}: too many machines", self.nnodes);
        }
        for own in ["world-size", "rank", "local-rank", "dist-init"] {
            if flag_value(&self.args, own).is_some()
                || self.args.iter().any(|a| a == &format!("--{own}"))
            {
                bail!("--{own} is set by `moco launch` for each process; leave it out of the pretrain flags");
            }
        }
        if let Some(dev) = flag_value(&self.args, "device") {
            // NCCL refuses two ranks on one GPU; the TCP backend may share one (a test setup).
            let tcp = flag_value(&self.args, "dist-backend") == Some("tcp");
            if self.nproc_per_node > 1 && dev.starts_with("cuda:") && !tcp {
                bail!(
                    "--device {dev} would put all {} processes of this machine on one GPU: pass --device cuda (process i gets cuda:i)",
                    self.nproc_per_node
                );
            }
        }
        let Some(out) = flag_value(&self.args, "out") else {
            bail!("moco launch: the pretrain flags need --out RUN_DIR (every process writes to the same run)");
        };
        let init = match &self.dist_init {
            Some(f) => f.clone(),
            None if self.nnodes > 1 => {
                bail!(
                    "--nnodes {}: give --dist-init FILE on a file system that every machine shares",
                    self.nnodes
                )
            }
            None => {
                let dir = PathBuf::from(out);
                std::fs::create_dir_all(&dir).with_context(|| format!("--out {out}"))?;
                moco_core::dist::fresh_init_file(&dir)
            }
        };
        let world = self.nproc_per_node * self.nnodes;
        Ok((0..self.nproc_per_node)
            .map(|local| {
                let rank = self.node_rank * self.nproc_per_node + local;
                let mut a = vec!["pretrain".to_string()];
                a.extend(self.args.iter().cloned());
                a.extend([
                    "--world-size".into(),
                    world.to_string(),
                    "--rank".into(),
                    rank.to_string(),
                    "--local-rank".into(),
                    local.to_string(),
                    "--dist-init".into(),
                    init.display().to_string(),
                ]);
                a
            })
            .collect())
    }
}

/// Starts the processes and waits for all of them; the first failure stops the rest.
pub fn run(l: &Launch) -> Result<()> {
    let exe = std::env::current_exe().context("locating the moco binary")?;
    let commands = l.commands()?;
    let first_rank = l.node_rank * l.nproc_per_node;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for (i, args) in commands.iter().enumerate() {
        let mut cmd = Command::new(&exe);
        cmd.args(args);
        die_with_parent(&mut cmd);
        match cmd.spawn() {
            Ok(c) => children.push((first_rank + i, c)),
            Err(e) => {
                stop(&mut children);
                bail!("starting rank {}: {e}", first_rank + i);
            }
        }
    }
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            let (rank, child) = &mut children[i];
            match child.try_wait()? {
                None => i += 1,
                Some(status) if status.success() => {
                    children.remove(i);
                }
                Some(status) => {
                    let rank = *rank;
                    children.remove(i);
                    stop(&mut children);
                    bail!("rank {rank} failed ({status}); the other ranks were stopped");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// On Linux the ranks get SIGTERM when the launcher dies (killed by a scheduler, say): no rank
/// is left holding a GPU or waiting for its peers forever.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

fn stop(children: &mut Vec<(usize, Child)>) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    children.clear();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn launch(args: &[&str]) -> Launch {
        Launch {
            nproc_per_node: 2,
            nnodes: 2,
            node_rank: 1,
            dist_init: Some("/shared/init".into()),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn ranks_follow_the_node() {
        let c = launch(&["--out=/tmp/r", "--device", "cuda"])
            .commands()
            .unwrap();
        assert_eq!(c.len(), 2);
        let tail: Vec<&str> = c[1][4..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "--world-size",
                "4",
                "--rank",
                "3",
                "--local-rank",
                "1",
                "--dist-init",
                "/shared/init"
            ]
        );
    }

    #[test]
    fn bad_launches_name_the_flag() {
        let e = launch(&["--device", "cuda"])
            .commands()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--out"), "{e}");
        let e = launch(&["--out", "x", "--rank", "1"])
            .commands()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--rank is set by `moco launch`"), "{e}");
        // An explicit GPU would be every local process's GPU.
        let e = launch(&["--out", "x", "--device", "cuda:1"])
            .commands()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--device cuda:1") && e.contains("--device cuda "),
            "{e}"
        );
        let shared = launch(&["--out", "x", "--device", "cuda:0", "--dist-backend", "tcp"]);
        assert!(shared.commands().is_ok(), "TCP ranks may share a GPU");
        let mut one = launch(&["--out", "x", "--device=cuda:1"]);
        one.nproc_per_node = 1;
        assert!(
            one.commands().is_ok(),
            "one process per machine may pick its GPU"
        );
        let mut l = launch(&["--out", "x"]);
        l.dist_init = None;
        let e = l.commands().unwrap_err().to_string();
        assert!(e.contains("--dist-init"), "{e}");
        // A mistyped count is refused before any process starts.
        let mut many = launch(&["--out", "x"]);
        many.nproc_per_node = 100_000;
        let e = many.commands().unwrap_err().to_string();
        assert!(e.contains("--nproc-per-node 100000"), "{e}");
        let mut nodes = launch(&["--out", "x"]);
        nodes.nnodes = usize::MAX;
        let e = nodes.commands().unwrap_err().to_string();
        assert!(e.contains("--nnodes"), "{e}");
    }
}
