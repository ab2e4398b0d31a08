//! Times the CPU convolution kernels (forward, grad-input, grad-weight) on the 3x3 layers of
//! the small-image ResNet-18, batch 64: `cargo run --release -p moco-models --example
//! conv_layers -- WIDTH SIZE`.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use moco_models::cpu_conv::conv2d;

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
    let mut s = size;
    for (i, c) in [w, 2 * w, 4 * w, 8 * w].into_iter().enumerate() {
        if i > 0 {
            s = s.div_ceil(2);
        }
        let x = Var::randn(0f32, 1.0, (64, c, s, s), &dev)?;
        let k = Var::randn(0f32, 0.1, (c, c, 3, 3), &dev)?;
        let time = |f: &dyn Fn() -> candle_core::Result<()>| -> candle_core::Result<f64> {
            f()?;
            let t = Instant::now();
            for _ in 0..5 {
                f()?;
            }
            Ok(t.elapsed().as_secs_f64() / 5.0 * 1e3)
        };
        let fwd = time(&|| conv2d(x.as_tensor(), k.as_tensor(), 1, 1, 1).map(|_| ()))?;
        let both = time(&|| {
            let y = conv2d(x.as_tensor(), k.as_tensor(), 1, 1, 1)?;
            let g = (y * Tensor::ones((64, c, s, s), candle_core::DType::F32, &dev)?)?
                .sum_all()?
                .backward()?;
            g.get(k.as_tensor())
                .map(|_| ())
                .ok_or(candle_core::Error::Msg("no grad".into()))
        })?;
        println!("{c:4} ch {s:2}x{s:<2}: forward {fwd:7.2} ms, forward+backward {both:7.2} ms");
    }
    Ok(())
}
