//! Times the CPU convolution kernels (forward, gradient wrt the input, gradient wrt the weight)
//! on the 3x3 layers of the small-image ResNet-18, batch 64, medians of 7 calls:
//! `cargo run --release -p moco-models --example conv_layers -- WIDTH SIZE`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use moco_models::ops::conv::{conv2d, conv2d_backward};
use moco_models::Settings;

fn median_ms(f: &dyn Fn() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let mut t = vec![];
    for _ in 0..7 {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[3])
}

fn main() -> candle_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (w, size) = (
        args.first().copied().unwrap_or(16),
        args.get(1).copied().unwrap_or(28),
    );
    let dev = Device::Cpu;
    let settings = Settings::default();
    let mut s = size;
    for (i, c) in [w, 2 * w, 4 * w, 8 * w].into_iter().enumerate() {
        if i > 0 {
            s = s.div_ceil(2);
        }
        let x = Tensor::randn(0f32, 1.0, (64, c, s, s), &dev)?;
        let k = Tensor::randn(0f32, 0.1, (c, c, 3, 3), &dev)?;
        let gy = Tensor::randn(0f32, 1.0, (64, c, s, s), &dev)?;
        let fwd = median_ms(&|| conv2d(&x, &k, 1, 1, 1, &settings).map(|_| ()))?;
        let bwd =
            median_ms(&|| conv2d_backward(&x, &k, &gy, 1, 1, 1, settings.conv_engine).map(|_| ()))?;
        let gflop = 2.0 * 64.0 * (c * c * 9 * s * s) as f64 / 1e9;
        println!(
            "{c:4} ch {s:2}x{s:<2}: forward {fwd:6.2} ms ({:5.1} GFLOP/s), both gradients {bwd:6.2} ms ({:5.1} GFLOP/s)",
            gflop / fwd * 1e3,
            2.0 * gflop / bwd * 1e3
        );
    }
    Ok(())
}
