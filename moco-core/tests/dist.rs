//! Data-parallel MoCo against one process. Ranks are threads joined by a TCP group over
//! loopback (`moco_core::dist::on_threads`), exactly as separate processes would be.
//!
//! Without BatchNorm a step over two ranks of N images each must equal one step over the 2N
//! images in one process (gradients averaged over ranks = the mean over the global batch; keys
//! gathered in rank order = the global batch's keys): checked for the three losses within 1e-5
//! (the two differ only in summation order). With BatchNorm, shuffle-BN across ranks is
//! checked against the same computation written out in one process.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use candle_core::{Device, Tensor};
use candle_nn::{batch_norm, linear, BatchNormConfig, ModuleT};
use moco_core::dist::on_threads;
use moco_core::{l2_normalize, BatchShuffle, LossKind, Moco, MocoConfig};
use moco_testing::max_abs_diff;
use rand::rngs::StdRng;
use rand::SeedableRng;

const N: usize = 8; // images per rank
const WORLD: usize = 2;

fn config(loss: LossKind) -> MocoConfig {
    MocoConfig {
        queue_size: 64,
        batch_size: N * WORLD,
        dim: 8,
        temperature: 0.2,
        loss,
        seed: 5,
        ..MocoConfig::v2()
    }
}

type Encoder = candle_nn::FuncT<'static>;

fn linear_encoder(vb: candle_nn::VarBuilder) -> candle_core::Result<Encoder> {
    let fc = linear(16, 8, vb.pp("fc"))?;
    Ok(candle_nn::func_t(move |x, _| x.flatten_from(1)?.apply(&fc)))
}

fn bn_encoder(vb: candle_nn::VarBuilder) -> candle_core::Result<Encoder> {
    let fc = linear(16, 8, vb.pp("fc"))?;
    let bn = batch_norm(8, BatchNormConfig::default(), vb.pp("bn"))?;
    Ok(candle_nn::func_t(move |x, train| {
        x.flatten_from(1)?.apply(&fc)?.apply_t(&bn, train)
    }))
}

/// The global batch of step `s`: two views of 2N one-channel 4x4 images.
fn global_batch(s: usize) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let v = |view: usize| {
        let data: Vec<f32> = (0..N * WORLD * 16)
            .map(|i| (((i * 7 + s * 13 + view * 31) % 23) as f32 / 11.0 - 1.0) * 0.8)
            .collect();
        Tensor::from_vec(data, (N * WORLD, 1, 4, 4), &dev).unwrap()
    };
    (v(1), v(2))
}

struct Run {
    losses: Vec<f32>,
    state: std::collections::BTreeMap<String, Tensor>,
}

fn train(moco: &mut Moco<Encoder>, rank_slice: Option<usize>) -> Run {
    let mut losses = vec![];
    for s in 0..3 {
        let (x1, x2) = global_batch(s);
        let (x1, x2) = match rank_slice {
            Some(r) => (
                x1.narrow(0, r * N, N).unwrap(),
                x2.narrow(0, r * N, N).unwrap(),
            ),
            None => (x1, x2),
        };
        losses.push(moco.train_step(&x1, &x2, 0.5, 0.9).unwrap().loss);
    }
    Run {
        losses,
        state: moco.state_tensors().unwrap(),
    }
}

#[test]
fn two_ranks_equal_one_process_with_the_global_batch() {
    for loss in [LossKind::Queue, LossKind::SymmetricQueue, LossKind::InBatch] {
        let mut single = Moco::new(config(loss), &Device::Cpu, linear_encoder).unwrap();
        let want = train(&mut single, None);
        let runs = on_threads(WORLD, move |comm| {
            let rank = comm.rank();
            let mut moco = Moco::new(config(loss), &Device::Cpu, linear_encoder)
                .unwrap()
                .with_collective(comm)
                .unwrap();
            let run = train(&mut moco, Some(rank));
            moco.check_in_sync().unwrap();
            run
        })
        .unwrap();
        for (rank, got) in runs.iter().enumerate() {
            for (s, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5,
                    "{loss:?} rank {rank} step {s}: loss {a} vs {b}"
                );
            }
            assert_eq!(got.state.len(), want.state.len());
            for (name, t) in &want.state {
                let d = max_abs_diff(&got.state[name], t);
                assert!(d <= 1e-5, "{loss:?} rank {rank}: `{name}` differs by {d}");
            }
        }
        // The losses moved: the comparison covers real updates.
        assert!(
            want.losses[0] != want.losses[2],
            "{loss:?}: {:?}",
            want.losses
        );
    }
}

#[test]
fn a_group_of_one_changes_nothing() {
    // What `moco check-device --dist nccl` checks on one GPU, here with the TCP backend: every
    // collective runs (gather for shuffle-BN and the queue, all-reduce of the gradients and
    // metrics, broadcast of the start) and the run is the single-process run, bit for bit.
    for loss in [LossKind::Queue, LossKind::SymmetricQueue, LossKind::InBatch] {
        let mut single = Moco::new(config(loss), &Device::Cpu, bn_encoder).unwrap();
        let want = train(&mut single, None);
        let got = on_threads(1, move |comm| {
            assert_eq!(comm.backend(), "tcp");
            let mut moco = Moco::new(config(loss), &Device::Cpu, bn_encoder)
                .unwrap()
                .with_collective(comm)
                .unwrap();
            train(&mut moco, None)
        })
        .unwrap()
        .pop()
        .unwrap();
        assert_eq!(got.losses, want.losses, "{loss:?}");
        for (name, t) in &want.state {
            assert_eq!(max_abs_diff(&got.state[name], t), 0.0, "{loss:?}: `{name}`");
        }
    }
}

#[test]
fn shuffle_bn_spans_the_ranks() {
    let seed = 77;
    let (x, _) = global_batch(0);
    // One process, written out: one permutation of all 2N images, each rank's slice through
    // the key encoder (its own BatchNorm statistics), then the permutation undone.
    let reference = Moco::new(config(LossKind::Queue), &Device::Cpu, bn_encoder).unwrap();
    let perm =
        BatchShuffle::new(N * WORLD, &mut StdRng::seed_from_u64(seed), &Device::Cpu).unwrap();
    let shuffled = perm.shuffle(&x).unwrap();
    let chunks: Vec<Tensor> = (0..WORLD)
        .map(|r| {
            let k = reference
                .key()
                .forward_t(&shuffled.narrow(0, r * N, N).unwrap(), true)
                .unwrap();
            l2_normalize(&k, 1).unwrap()
        })
        .collect();
    let want = perm.unshuffle(&Tensor::cat(&chunks, 0).unwrap()).unwrap();

    let xs = x.clone();
    let got = on_threads(WORLD, move |comm| {
        let rank = comm.rank();
        let moco = Moco::new(config(LossKind::Queue), &Device::Cpu, bn_encoder)
            .unwrap()
            .with_collective(comm)
            .unwrap();
        let mine = xs.narrow(0, rank * N, N).unwrap();
        let local = {
            // What shuffle-BN within this rank alone would give, for contrast.
            let alone = Moco::new(config(LossKind::Queue), &Device::Cpu, bn_encoder).unwrap();
            alone.encode_key(&mine, seed).unwrap()
        };
        (moco.encode_key(&mine, seed).unwrap(), local)
    })
    .unwrap();
    for (rank, (k, local)) in got.iter().enumerate() {
        let d = max_abs_diff(k, &want.narrow(0, rank * N, N).unwrap());
        assert!(d <= 1e-6, "rank {rank}: keys differ by {d}");
        assert!(
            max_abs_diff(k, local) > 1e-3,
            "rank {rank}: BatchNorm saw only this rank's images"
        );
    }
}

#[test]
fn ranks_start_from_rank_zero_and_divergence_is_caught() {
    let out = on_threads(WORLD, |comm| {
        let rank = comm.rank();
        // Each rank draws other initial weights; the broadcast makes them rank 0's.
        let cfg = MocoConfig {
            seed: 100 + rank as u64,
            ..config(LossKind::Queue)
        };
        let moco = Moco::new(cfg, &Device::Cpu, linear_encoder)
            .unwrap()
            .with_collective(comm)
            .unwrap();
        moco.check_in_sync().unwrap();
        let state = moco.state_tensors().unwrap();
        if rank == 1 {
            let (_, var) = &moco.encoders().query_parameters()[0];
            var.set(&(var.as_tensor() + 1e-3).unwrap()).unwrap();
        }
        (state, moco.check_in_sync().unwrap_err().to_string())
    })
    .unwrap();
    for (name, t) in &out[0].0 {
        assert_eq!(
            max_abs_diff(t, &out[1].0[name]),
            0.0,
            "`{name}` differs after the broadcast"
        );
    }
    for (_, e) in &out {
        assert!(
            e.contains("ranks 0 and 1 hold different values of `fc."),
            "{e}"
        );
    }
}
