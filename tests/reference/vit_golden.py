"""Golden values for moco-models' Vision Transformer, computed with torch + timm 0.4.12 (the timm
MoCo v3's `vits.py` builds on; no moco code imported).

Run from the repository root:
    pip install torch safetensors timm==0.4.12 && python3 tests/reference/vit_golden.py
Writes tests/reference/vit_golden.safetensors; moco-models/tests/vit.rs compares.

The network is MoCo v3's ViT (`VisionTransformerMoCo`): timm's `VisionTransformer` (qkv bias,
LayerNorm eps 1e-6, exact GELU) whose position embedding is replaced by the fixed 2-D sine-cosine
one (in mocov3.py, written from the paper's definition and the official code's index order), with MoCo
v3's ViT projector as `head` (`_build_mlp(3, dim, mlp_dim, out)`: Linear without bias, BN1d,
ReLU, Linear, BN1d, ReLU, Linear, BN1d without affine). Small sizes: 16x16x3 input, 4x4
patches, width 32, 2 blocks, 4 heads, MLP ratio 4, projector 32-48-48-16, batch 4.

Stored: every parameter and buffer (`w.<name>`, random, so the class token and position
embedding matter), the input `x`, the features (class token after the final norm) in eval mode,
the head's output in train mode and in eval mode, and in train mode the gradients of
sum(out * r) wrt the input, the patch projection, the class token, the first block's qkv weight
and the last block's fc2 weight.
"""
import os

import torch
import torch.nn as nn
from functools import partial
from safetensors.torch import save_file

from mocov3 import mlp, randomise_vit, sincos
from timm.models.vision_transformer import VisionTransformer

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # the reference is computed in float64, stored as float32


DIM, GRID = 32, 4
m = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=48, embed_dim=DIM,
                      depth=2, num_heads=4, mlp_ratio=4, qkv_bias=True,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6))
m.pos_embed = nn.Parameter(sincos(GRID, DIM), requires_grad=False)
m.head = mlp(3, DIM, 48, 16)
randomise_vit(m)

out = {f"w.{k}": v.float().contiguous() for k, v in m.state_dict().items()
       if "num_batches_tracked" not in k}
x = torch.randn(4, 3, 16, 16).float().double()
out["x"] = x.float()

m.eval()
with torch.no_grad():
    out["features_eval"] = m.forward_features(x).float()
    out["out_eval"] = m(x).float()

m.train()
xg = x.clone().requires_grad_(True)
y = m(xg)
r = torch.randn_like(y)
out["out_train"] = y.detach().float()
out["r"] = r.float()
(y * r).sum().backward()
out["grad.x"] = xg.grad.float()
for name in ["patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight",
             "blocks.1.mlp.fc2.weight", "head.0.weight"]:
    out[f"grad.{name}"] = dict(m.named_parameters())[name].grad.float()

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vit_golden.safetensors")
save_file(out, path)
print(f"wrote {path}: {len(out)} tensors")
