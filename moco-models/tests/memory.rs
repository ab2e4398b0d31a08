//! Memory that a ResNet's training-mode forward keeps for its backward pass, against what
//! PyTorch's autograd saves for the same torchvision network and input
//! (`tests/reference/saved_activations.py`, committed as `saved_activations.json`).
//!
//! Candle's graph keeps every op's inputs alive until the backward pass, whether its backward
//! needs them or not, so an op built from several generic ones can keep several copies of an
//! activation, and an op's output stays alive as the input of the next even where that op's
//! backward does not read it (the BatchNorm outputs before a residual add, which PyTorch's add
//! does not save). With the stem's max pool and the blocks' ends (BatchNorms, add, ReLU) fused,
//! moco-rs keeps less than PyTorch (no max-pool indices); the bound is 2% above PyTorch's bytes.
//! Before: 2.14x on ResNet-18 (the max pool of candle's ops), 1.30x on ResNet-50 with the
//! residual add separate, 1.06x with the downsampling branch's BatchNorm separate.
//!
//! On other devices (and other dtypes) the network runs on candle's generic ops, measured here
//! in float32 with the CPU kernels switched off (`moco_core::kernels`, the path of CUDA and
//! Metal). The BatchNorms, with their ReLU or residual add, run their ops on detached tensors
//! and keep only their input and output (`ops/batch_norm`), and the max pool is recomputed in
//! the backward pass: 0.936x and 0.995x PyTorch's bytes, bound 1.02x. With the max pool's
//! padded copy and intermediate maxima kept: 1.37x and 1.10x; with the BatchNorm as a chain of
//! candle's ops keeping its centred input, its square and the scaled output, and a residual add
//! its sum: 3.34x and 3.40x; before the BatchNorm's statistics stopped going through float64
//! copies and the max pool through copies of strided slices, 6.75x and 6.68x.
//!
//! The ViT (`vit-64x4h4`, against timm's): its linear layers keep no product before the bias
//! and its residual adds no summand, and on candle's generic ops its LayerNorm and attention are
//! attached ops keeping their input and output (`ops/transformer/generic.rs`, `ops/linear.rs`): 0.846x on the CPU
//! kernels (1.380x before; 0.943x with the residual adds keeping the linear output), 0.850x on
//! the generic ops (3.016x before), bound 1.02x.
//!
//! This file holds one test: it counts the bytes of the whole process through its own global
//! allocator, which a second test running at the same time would disturb.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use moco_models::{encoder, Backbone, BackboneConfig, EncoderSpec, HeadKind, Settings};

/// The system allocator, counting the bytes in use.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let q = unsafe { System.realloc(p, l, size) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            LIVE.fetch_add(size, Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn pytorch_saved_bytes(key: &str) -> usize {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/reference/saved_activations.json"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{path}: no {key}")) as usize
}

/// Bytes held after a training-mode forward of the backbone `arch` on `batch` images of
/// 3 x size x size, while its output (and so its graph) is alive; parameters and input excluded.
fn kept_by_forward(
    arch: &str,
    batch: usize,
    size: usize,
    dtype: DType,
    settings: Settings,
) -> usize {
    let dev = Device::Cpu;
    let vars = VarMap::new();
    let spec = EncoderSpec {
        backbone: BackboneConfig::for_input(arch, 64, 3, size, Some(4)).unwrap(),
        head: HeadKind::None,
    };
    let net = encoder(spec, settings, VarBuilder::from_varmap(&vars, dtype, &dev)).unwrap();
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    // A first forward and backward leave behind whatever the kernels keep between calls
    // (thread-local scratch, caches); the second forward is measured.
    let y = net.features(&x, true).unwrap();
    y.sum_all().unwrap().backward().unwrap();
    drop(y);
    let before = LIVE.load(Relaxed);
    let y = net.features(&x, true).unwrap();
    let kept = LIVE.load(Relaxed).saturating_sub(before);
    drop(y);
    kept
}

#[test]
fn a_forward_keeps_no_more_than_pytorch_saves() {
    // (backbone, batch, size, bound on the CPU kernels, bound on candle's generic ops)
    for (arch, batch, size, fused_bound, generic_bound) in [
        ("resnet18", 4, 64, 1.02, 1.02),
        ("resnet50", 2, 64, 1.02, 1.02),
        ("vit-64x4h4", 8, 32, 1.02, 1.02),
    ] {
        let key = match arch {
            "vit-64x4h4" => format!("{arch}_p4_b{batch}_{size}"),
            _ => format!("{arch}_b{batch}_{size}"),
        };
        let theirs = pytorch_saved_bytes(&key);
        let ours = kept_by_forward(arch, batch, size, DType::F32, Settings::default());
        let ratio = ours as f64 / theirs as f64;
        println!("{arch}, batch {batch}, {size}x{size}: moco-rs keeps {ours} bytes, PyTorch saves {theirs} ({ratio:.3}x)");
        assert!(
            ratio <= fused_bound,
            "{arch}: the forward keeps {ours} bytes for the backward, {ratio:.3}x what PyTorch saves ({theirs})"
        );
        // Candle's generic ops (CUDA's and Metal's path), on the CPU in float32.
        let generic = kept_by_forward(arch, batch, size, DType::F32, Settings::generic());
        let ratio = generic as f64 / theirs as f64;
        println!("{arch}, candle's generic ops: {generic} bytes ({ratio:.3}x)");
        assert!(
            ratio <= generic_bound,
            "{arch}: on candle's generic ops the forward keeps {ratio:.3}x what PyTorch saves"
        );
    }
}
