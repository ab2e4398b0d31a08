//! `moco export`: a Hugging Face model folder from a run or a weights file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use moco_models::BackboneConfig;

use super::weights::Weights;

/// The last kNN result and the run configuration, when exporting a run.
fn run_info(run: &Path) -> (Option<serde_json::Value>, Option<serde_json::Value>) {
    let config = std::fs::read_to_string(run.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let knn = std::fs::read_to_string(run.join("metrics.jsonl"))
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v.get("knn_top1").is_some())
        });
    (config, knn)
}

/// Whether `dir` holds an earlier export (its model.safetensors carries the export's
/// `pretraining_head` metadata), which a new export may replace.
fn exported_before(dir: &Path) -> bool {
    moco_core::io::read_metadata(&dir.join("model.safetensors"))
        .is_ok_and(|m| m.contains_key("pretraining_head"))
}

/// Writes `out/model.safetensors` (backbone only), `out/config.json` and `out/README.md`.
pub fn run(source: &str, is_run: bool, out: &Path) -> Result<()> {
    let from = if is_run { "--run" } else { "--weights" };
    let w = Weights::read_as(from, source)?;
    super::outputs::check_folder(
        "--out",
        out,
        &[(from, Path::new(source)), (from, &w.source)],
        &["model.safetensors", "config.json", "README.md"],
        exported_before,
    )?;
    // Check that the tensors build the encoder before writing anything.
    w.frozen(&candle_core::Device::Cpu, moco_models::Settings::default())?;
    let head = format!("{}.", w.spec.backbone.head_prefix());
    let mut backbone: BTreeMap<String, Tensor> = w
        .tensors
        .iter()
        .filter(|(k, _)| !k.starts_with(&head))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let BackboneConfig::Vit(v) = w.spec.backbone {
        // timm's model holds the (fixed) position embedding as a tensor: ship it, so that
        // `load_state_dict` finds every backbone tensor.
        let pe = moco_models::vit::sincos_position_embedding(
            v.grid(),
            v.embed_dim,
            &candle_core::Device::Cpu,
        )?;
        backbone.insert("pos_embed".into(), pe);
    }
    if backbone.is_empty() {
        bail!("{}: no backbone tensors", w.source.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("--out {}", out.display()))?;
    let spec = w.spec;
    // The file holds the backbone alone: its metadata describes exactly that.
    let exported = moco_models::EncoderSpec {
        head: moco_models::HeadKind::None,
        ..spec
    };
    let mut meta = exported.metadata();
    meta.insert("format".into(), "pt".into());
    meta.insert("pretraining_head".into(), spec.head.name().into());
    moco_core::io::save_atomic(&out.join("model.safetensors"), &backbone, Some(meta))?;

    let (run_config, knn) = if is_run {
        run_info(Path::new(source))
    } else {
        (None, None)
    };
    let dataset = run_config
        .as_ref()
        .and_then(|c| c["dataset"].as_str())
        .unwrap_or("unknown")
        .to_string();
    let hf_dataset = match dataset.as_str() {
        "default" | "fashion-mnist" => "zalando-datasets/fashion_mnist",
        "mnist" => "ylecun/mnist",
        "cifar10" => "uoft-cs/cifar10",
        "cifar100" => "uoft-cs/cifar100",
        "stl10" => "tanganke/stl10",
        _ => "",
    };
    let arch = spec.backbone.arch();
    let fd = spec.backbone.feature_dim();
    let cin = spec.backbone.in_channels();
    let mut config = serde_json::json!({
        "library_name": "moco-rs",
        "architecture": arch,
        "in_channels": cin,
        "feature_dim": fd,
        "moco": run_config.as_ref().map(|c| c["moco"].clone()),
        "training_data": dataset,
        "metrics": knn,
        "source": w.source.display().to_string(),
    });
    let shape = match spec.backbone {
        BackboneConfig::ResNet(r) => serde_json::json!({
            "model_type": "resnet",
            "width": r.width,
            "weights": "model.safetensors (backbone only, torchvision state_dict names)",
        }),
        BackboneConfig::Vit(v) => serde_json::json!({
            "model_type": "vit",
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "embed_dim": v.embed_dim,
            "depth": v.depth,
            "num_heads": v.num_heads,
            "mlp_ratio": v.mlp_ratio,
            "conv_stem": v.conv_stem,
            "weights": "model.safetensors (backbone only, timm VisionTransformer state_dict names)",
        }),
    };
    if let (Some(c), Some(extra)) = (config.as_object_mut(), shape.as_object()) {
        c.extend(extra.clone());
    }
    moco_core::io::write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;

    let knn_line = knn
        .as_ref()
        .and_then(|k| k["knn_top1"].as_f64())
        .map(|t| {
            format!(
                "- weighted kNN top-1 (k=200, t=0.1) on the {dataset} test split: **{t:.2}%**\n"
            )
        })
        .unwrap_or_default();
    let metrics_yaml = knn.as_ref().and_then(|k| k["knn_top1"].as_f64()).map(|t| format!(
        "model-index:\n- name: moco-{arch}\n  results:\n  - task:\n      type: image-classification\n    dataset:\n      name: {dataset}\n      type: {hfd}\n    metrics:\n    - type: accuracy\n      name: kNN top-1\n      value: {t:.2}\n",
        hfd = hf_dataset
    )).unwrap_or_default();
    let datasets_yaml = if hf_dataset.is_empty() {
        String::new()
    } else {
        format!("datasets:\n- {hf_dataset}\n")
    };
    let (tag, desc, names, pytorch) = match spec.backbone {
        BackboneConfig::ResNet(r) => {
            let build = if r.small {
                format!(
                    "m = torchvision.models.resnet.ResNet(torchvision.models.resnet.{block}, {layers})\n# the small-image stem: 3x3 stride-1 conv1, no max-pool; width {w}, {c} input channel(s)\n",
                    block = if r.feature_dim() == 8 * r.width { "BasicBlock" } else { "Bottleneck" },
                    layers = match r.depth { moco_models::Depth::R18 => "[2, 2, 2, 2]", moco_models::Depth::R34 | moco_models::Depth::R50 => "[3, 4, 6, 3]", moco_models::Depth::R101 => "[3, 4, 23, 3]", moco_models::Depth::R152 => "[3, 8, 36, 3]" },
                    w = r.width, c = r.in_channels
                )
            } else {
                format!("m = torchvision.models.{}()\n", r.arch())
            };
            (
                "resnet",
                format!("width {}, {cin} input channel(s), {fd}-d pooled features", r.width),
                "torchvision's state_dict names\n(`conv1.weight`, `layer1.0.bn1.running_mean`, ...)",
                format!(
                    "import torch, torchvision\nfrom safetensors.torch import load_file\n{build}missing, unexpected = m.load_state_dict(load_file(\"model.safetensors\"), strict=False)\nassert not unexpected and set(missing) <= {{\"fc.weight\", \"fc.bias\"}}\nm.fc = torch.nn.Identity()\n"
                ),
            )
        }
        BackboneConfig::Vit(v) => (
            "vision-transformer",
            format!(
                "{s}x{s} input in {p}x{p} patches{stem}, {cin} input channel(s), {fd}-d class-token features",
                s = v.image_size,
                p = v.patch_size,
                stem = if v.conv_stem { " embedded by MoCo v3's convolutional stem" } else { "" },
            ),
            if v.conv_stem {
                "timm's `VisionTransformer` state_dict names\n(`patch_embed.proj.0.weight` ... the stem as MoCo v3's `ConvStem` `nn.Sequential`, `blocks.0.attn.qkv.weight`,\n...; `pos_embed` is MoCo v3's fixed 2-D sine-cosine embedding)"
            } else {
                "timm's `VisionTransformer` state_dict names\n(`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ...; `pos_embed` is MoCo v3's fixed 2-D\nsine-cosine embedding)"
            },
            format!(
                "import torch\nfrom functools import partial\nfrom safetensors.torch import load_file\nfrom timm.models.vision_transformer import VisionTransformer\n{stem_def}m = VisionTransformer(img_size={s}, patch_size={p}, in_chans={cin}, embed_dim={d}, depth={n}, num_heads={h},\n                      mlp_ratio={r}, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0{stem_arg})\nm.load_state_dict(load_file(\"model.safetensors\"))  # features: m(x), the class token\n",
                s = v.image_size, p = v.patch_size, d = v.embed_dim, n = v.depth, h = v.num_heads, r = v.mlp_ratio,
                stem_def = if v.conv_stem { CONV_STEM_PY } else { "" },
                stem_arg = if v.conv_stem { ",\n                      embed_layer=ConvStem" } else { "" },
            ),
        ),
    };
    let card = format!(
        r#"---
library_name: moco-rs
license: mit
tags:
- self-supervised-learning
- moco
- image-feature-extraction
- {tag}
- candle
{datasets_yaml}metrics:
- accuracy
{metrics_yaml}---

# MoCo {arch} (moco-rs)

A {arch} backbone ({desc}) pretrained
with Momentum Contrast by [moco-rs](https://github.com/moco-rs/moco-rs) on {dataset}.

{knn_line}
`model.safetensors` holds the backbone only, with {names}; `config.json` records the architecture and the
MoCo settings.

## Use in Rust (moco-rs)

```sh
moco extract --weights hf://OWNER/NAME --input images/ --out features.safetensors
moco knn --weights hf://OWNER/NAME --dataset fashion-mnist --data-dir DIR
```

```rust
let (encoder, _) = moco_models::load_encoder("model.safetensors".as_ref(), None, moco_models::Settings::default(), &candle_core::Device::Cpu)?;
let features = moco_models::Backbone::features(&encoder, &images, false)?; // N x {fd}
```

## Use in PyTorch

```python
{pytorch}```
"#
    );
    moco_core::io::write_atomic(&out.join("README.md"), card.as_bytes())?;
    println!(
        "exported {} ({} backbone tensors) to {}",
        arch,
        backbone.len(),
        out.display()
    );
    Ok(())
}

/// `--run RUN_DIR` or `--weights FILE`.
pub fn source(run: Option<PathBuf>, weights: Option<String>) -> Result<(String, bool)> {
    match (run, weights) {
        (Some(r), None) => Ok((r.display().to_string(), true)),
        (None, Some(w)) => Ok((w, false)),
        _ => bail!("moco export needs exactly one of --run RUN_DIR or --weights FILE"),
    }
}

/// MoCo v3's convolutional patch embedding in PyTorch, for the model card of a `vit_conv_*`
/// (timm has none): log2(patch) stride-2 3x3 convolutions without bias, each with BatchNorm and
/// ReLU, then a 1x1 convolution; `nn.Sequential` indices as the official `vits.ConvStem`.
const CONV_STEM_PY: &str = "from torch import nn\n\n\nclass ConvStem(nn.Module):  # MoCo v3's convolutional patch embedding\n    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, **kwargs):\n        super().__init__()\n        n, grid, cin, layers = patch_size.bit_length() - 1, img_size // patch_size, in_chans, []\n        self.grid_size, self.num_patches = (grid, grid), grid * grid\n        for i in range(n):\n            cout = embed_dim >> (n - 1 - i)\n            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]\n            cin = cout\n        self.proj = nn.Sequential(*layers, nn.Conv2d(cin, embed_dim, 1))\n\n    def forward(self, x):\n        return self.proj(x).flatten(2).transpose(1, 2)\n\n\n";

/// A Hugging Face model folder: model.safetensors (backbone, torchvision or timm names), config.json,
/// README.md model card.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// A pretraining run directory.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Or a weights file (safetensors, .pth.tar, hf://...).
    #[arg(long)]
    pub weights: Option<String>,
    /// The folder to write.
    #[arg(long)]
    pub out: PathBuf,
}

impl ExportArgs {
    /// Writes the model folder.
    pub fn run(&self) -> Result<()> {
        let (src, is_run) = source(self.run.clone(), self.weights.clone())?;
        run(&src, is_run, &self.out)
    }
}
