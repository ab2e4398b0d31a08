"""Golden values for moco-models' ViT with MoCo v3's convolutional stem (`vit_conv_small/base`),
computed with torch + timm 0.4.12 (no moco code imported).

Run from the repository root:
    pip install torch safetensors timm==0.4.12 && python3 tests/reference/vit_conv_golden.py
Writes tests/reference/vit_conv_golden.safetensors; moco-models/tests/vit.rs compares.

Two networks, timm's `VisionTransformer` with `embed_layer=ConvStem` (mocov3.py) and the fixed
sine-cosine position embedding, width 32, 2 blocks, 4 heads, MLP ratio 4:
- `p16.`: the official stem, 16x16 patches of 48x48x3 images (a 3x3 grid), batch 8: four 3x3
  stride-2 layers of widths 4, 8, 16, 32 with BatchNorm and ReLU, then the 1x1 projection, and
  MoCo v3's 3-layer projector 32-48-48-16 as `head`;
- `p4.`: a 4x4-patch stem (two layers, widths 16 and 32) of 16x16x1 images, batch 4, no head.
The script prints how far torch's own float32 train-mode output is from the float64 one (the
stem's BatchNorm statistics over few values amplify rounding: a 2x2 grid of batch 4 gave
1.3e-4, hence the 3x3 grid of batch 8).

Stored per network: every parameter and buffer (`w.<name>`, random), the input `x`, the features
in eval mode, the output in train mode, the gradients of sum(out * r) wrt the input and the
stem's first and last convolutions, and the stem's BatchNorm running statistics after the
train-mode forward (`after.<name>`).
"""
import copy
import os

import torch
import torch.nn as nn
from functools import partial
from safetensors.torch import save_file

from mocov3 import ConvStem, mlp, randomise_vit, sincos
from timm.models.vision_transformer import VisionTransformer

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # the reference is computed in float64, stored as float32

DIM = 32


def golden(prefix, img, patch, chans, head, batch):
    m = VisionTransformer(img_size=img, patch_size=patch, in_chans=chans, num_classes=0,
                          embed_dim=DIM, depth=2, num_heads=4, mlp_ratio=4, qkv_bias=True,
                          norm_layer=partial(nn.LayerNorm, eps=1e-6), embed_layer=ConvStem)
    m.pos_embed = nn.Parameter(sincos(img // patch, DIM), requires_grad=False)
    if head:
        m.head = mlp(3, DIM, 48, 16)
    randomise_vit(m)
    out = {f"w.{k}": v.float().contiguous() for k, v in m.state_dict().items()
           if "num_batches_tracked" not in k}
    x = torch.randn(batch, chans, img, img).float().double()
    out["x"] = x.float()
    m.eval()
    with torch.no_grad():
        out["features_eval"] = m.forward_features(x).float()
    m32 = copy.deepcopy(m).float()
    m.train()
    m32.train()
    xg = x.clone().requires_grad_(True)
    y = m(xg)
    r = torch.randn_like(y)
    out["out_train"] = y.detach().float()
    with torch.no_grad():
        err = ((m32(x.float()).double() - y).abs().max() / y.abs().max()).item()
    print(f"{prefix}: torch float32 train-mode output vs float64: {err:.1e} (relative)")
    out["r"] = r.float()
    (y * r).sum().backward()
    out["grad.x"] = xg.grad.float()
    params = dict(m.named_parameters())
    last = f"patch_embed.proj.{len(m.patch_embed.proj) - 1}.weight"
    for name in ["patch_embed.proj.0.weight", last]:
        out[f"grad.{name}"] = params[name].grad.float()
    for name, t in m.state_dict().items():
        if name.startswith("patch_embed") and "running" in name:
            out[f"after.{name}"] = t.float()
    return {f"{prefix}.{k}": v for k, v in out.items()}


out = {**golden("p16", 48, 16, 3, True, 8), **golden("p4", 16, 4, 1, False, 4)}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vit_conv_golden.safetensors")
save_file(out, path)
print(f"wrote {path}: {len(out)} tensors")
