//! InfoNCE + enqueue at MoCo's ImageNet scale (N=256, C=128, K=65536) on the CPU.
//!
//! `cargo bench -p moco-core --bench infonce [-- --steps S]` prints the median time per step of
//! each phase: the loss forward (logits N x (1+K), cross-entropy), its backward to the queries,
//! and the enqueue of N keys.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use moco_core::{info_nce, l2_normalize, Kernels, Queue};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> moco_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(20usize);
    let (n, c, k, t) = (256, 128, 65536, 0.07);
    let dev = Device::Cpu;
    let mut queue = Queue::new(c, k, &mut StdRng::seed_from_u64(0), &dev)?;
    let (mut fwd, mut bwd, mut enq) = (vec![], vec![], vec![]);
    for i in 0..steps + 2 {
        let q = Var::from_tensor(&l2_normalize(&Tensor::randn(0f32, 1., (n, c), &dev)?, 1)?)?;
        let keys = l2_normalize(&Tensor::randn(0f32, 1., (n, c), &dev)?, 1)?;
        let t0 = Instant::now();
        let out = info_nce(q.as_tensor(), &keys, queue.keys(), t, Kernels::Fused)?;
        let _ = out.loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = out.loss.backward()?;
        let _ = grads
            .get(&q)
            .map(|g| g.sum_all().and_then(|s| s.to_scalar::<f32>()));
        let t2 = Instant::now();
        queue.enqueue(&keys)?;
        let t3 = Instant::now();
        if i >= 2 {
            // the first two steps warm up the allocator and thread pool
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
            enq.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    let (f, b, e) = (median(fwd), median(bwd), median(enq));
    println!(
        "InfoNCE + enqueue, N={n} C={c} K={k}, CPU, {} threads, median of {steps} steps",
        candle_core::utils::get_num_threads()
    );
    println!("  loss forward   {f:8.2} ms");
    println!("  loss backward  {b:8.2} ms");
    println!("  enqueue        {e:8.2} ms");
    println!("  total per step {:8.2} ms", f + b + e);
    Ok(())
}
