//! Forward and forward+backward throughput of the backbones on the CPU.
//!
//! `cargo bench -p moco-models --bench backbones [-- --steps N --batch B]` prints images/s
//! (median over N timed steps after one warm-up step) for resnet18-small at 32x32x3 (widths 64
//! and 16) and 28x28x1 (width 16), and resnet50 at 224x224x3, batch 64 by default, train mode.
//! `-- --only-small [--width W]` runs the 28x28x1 case alone.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use moco_models::{encoder, BackboneConfig, EncoderSpec, HeadKind, Settings};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(
    arch: &str,
    size: usize,
    batch: usize,
    steps: usize,
    width: usize,
    channels: usize,
) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let vars = VarMap::new();
    let mut spec = EncoderSpec::new(arch, HeadKind::Linear { dim: 128 })
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    match &mut spec.backbone {
        BackboneConfig::ResNet(r) => {
            r.width = width;
            r.in_channels = channels;
        }
        BackboneConfig::Vit(v) => {
            v.image_size = size;
            v.in_channels = channels;
        }
    }
    let enc = encoder(
        spec,
        Settings::default(),
        VarBuilder::from_varmap(&vars, DType::F32, &dev),
    )?;
    let x = Tensor::randn(0f32, 1., (batch, channels, size, size), &dev)?;
    let (mut fwd, mut both) = (vec![], vec![]);
    for i in 0..=steps {
        let t0 = Instant::now();
        let y = enc.forward_t(&x, true)?;
        let _ = y.sum_all()?.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = y.sum_all()?.backward()?;
        drop(grads);
        let t2 = Instant::now();
        if i > 0 {
            fwd.push(batch as f64 / (t1 - t0).as_secs_f64());
            both.push(batch as f64 / (t2 - t0).as_secs_f64());
        }
    }
    println!(
        "{arch:>15} w{width:<3} {size:>3}x{size:<3}x{channels} batch {batch:>3}: forward {:8.1} img/s   forward+backward {:8.1} img/s",
        median(fwd),
        median(both)
    );
    Ok(())
}

fn main() -> candle_core::Result<()> {
    let steps = arg("--steps", 3);
    let batch = arg("--batch", 64);
    println!(
        "CPU, {} threads, train mode, median of {steps} steps",
        candle_core::utils::get_num_threads()
    );
    if let Some(i) = std::env::args().position(|a| a == "--only-small") {
        let _ = i;
        bench("resnet18-small", 28, batch, steps, arg("--width", 16), 1)?;
        return Ok(());
    }
    bench("resnet18-small", 32, batch, steps, 64, 3)?;
    bench("resnet18-small", 32, batch, steps, 16, 3)?;
    bench("resnet18-small", 28, batch, steps, 16, 1)?;
    bench("resnet50", 224, batch, steps.min(2), 64, 3)?;
    Ok(())
}
