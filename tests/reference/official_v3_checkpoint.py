"""Checkpoints in the layout of facebookresearch/moco-v3's main_moco.py, for moco-models' importer.

Run from the repository root:
    pip install torch torchvision safetensors timm==0.4.12 && python3 tests/reference/official_v3_checkpoint.py
Writes, under tests/reference/:
- checkpoint_v3_vit.pth.tar: MoCo_ViT around a small ViT (timm's VisionTransformer with MoCo
  v3's fixed 2-D sin-cos position embedding: 16x16x3 input, 4x4 patches, width 32, 2 blocks,
  2 heads), projector `head` = _build_mlp(3, 32, 48, 16), predictor = _build_mlp(2, 16, 48, 16),
  with an AdamW state and a GradScaler state, as main_moco.py saves them;
- checkpoint_v3_r18.pth.tar: MoCo_ResNet around a small-image ResNet-18 (width 4, 1 input
  channel), projector `fc` = _build_mlp(2, 32, 24, 8), predictor _build_mlp(2, 8, 24, 8, False),
  with an SGD state;
- checkpoint_v3_features.safetensors: an input per model and the base encoder's features and
  projector output in eval mode.
The layout: {'epoch', 'arch', 'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*',
'module.predictor.*'}, 'optimizer', 'scaler'} (the `module.` prefix from DistributedDataParallel).
The _build_mlp and sin-cos definitions (mocov3.py) are written from the paper and the official code's
semantics; no moco code is imported.
"""
import copy
import os
from functools import partial

import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

from mocov3 import mlp, sincos
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.resnet import BasicBlock

torch.manual_seed(0)
HERE = os.path.dirname(os.path.abspath(__file__))


def randomise_bn(m):
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)


class MoCoV3(nn.Module):
    """Only the submodule names of moco.builder.MoCo (v3) matter here."""

    def __init__(self, base, predictor):
        super().__init__()
        self.base_encoder = base
        self.momentum_encoder = copy.deepcopy(base)
        with torch.no_grad():
            for p in self.momentum_encoder.parameters():
                if p.requires_grad:  # the fixed position embedding stays as it is
                    p.add_(0.01 * torch.randn_like(p))
        self.predictor = predictor


def vit():
    m = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=48, embed_dim=32,
                          depth=2, num_heads=2, mlp_ratio=4, qkv_bias=True,
                          norm_layer=partial(nn.LayerNorm, eps=1e-6))
    m.pos_embed = nn.Parameter(sincos(4, 32), requires_grad=False)
    with torch.no_grad():
        m.cls_token.normal_()
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.8, 1.2)
                mod.bias.uniform_(-0.1, 0.1)
    m.head = mlp(3, 32, 48, 16)
    randomise_bn(m)
    return m


def small_resnet18():
    m = torchvision.models.resnet.ResNet(BasicBlock, [2, 2, 2, 2])
    w = 4
    m.inplanes = w
    m.conv1 = nn.Conv2d(1, w, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    m.bn1 = nn.BatchNorm2d(w)
    m.layer1 = m._make_layer(BasicBlock, w, 2)
    m.layer2 = m._make_layer(BasicBlock, 2 * w, 2, stride=2)
    m.layer3 = m._make_layer(BasicBlock, 4 * w, 2, stride=2)
    m.layer4 = m._make_layer(BasicBlock, 8 * w, 2, stride=2)
    m.fc = mlp(2, 8 * w, 24, 8)
    randomise_bn(m)
    return m


def save(model, arch, x, optimizer, name):
    # One training step, so that the optimizer and scaler states are real ones.
    model.train()
    loss = model.predictor(model.base_encoder(x)).square().mean()
    loss.backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu")
    ddp_like = nn.DataParallel(model)  # state_dict keys get `module.`, as with DDP
    ckpt = {"epoch": 300, "arch": arch, "state_dict": ddp_like.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
    torch.save(ckpt, os.path.join(HERE, name))


out = {}
v = MoCoV3(vit(), mlp(2, 16, 48, 16))
xv = torch.randn(4, 3, 16, 16)
save(v, "vit_small", xv, torch.optim.AdamW(v.parameters(), 1e-3, weight_decay=0.1),
     "checkpoint_v3_vit.pth.tar")
r = MoCoV3(small_resnet18(), mlp(2, 8, 24, 8, last_bn=False))
xr = torch.randn(4, 1, 28, 28)
save(r, "resnet18", xr, torch.optim.SGD(r.parameters(), 0.01, momentum=0.9), "checkpoint_v3_r18.pth.tar")

for tag, base, x in [("vit", v.base_encoder, xv), ("r18", r.base_encoder, xr)]:
    base.eval()
    with torch.no_grad():
        if tag == "vit":
            feats = base.forward_features(x)
        else:
            feats = []
            h = base.avgpool.register_forward_hook(lambda mod, i, o: feats.append(o.flatten(1)))
            base(x)
            h.remove()
            feats = feats[0]
        out[f"{tag}.features"] = feats
        out[f"{tag}.embed"] = base(x)
    out[f"{tag}.x"] = x
save_file({k: v.contiguous() for k, v in out.items()},
          os.path.join(HERE, "checkpoint_v3_features.safetensors"))
print("wrote checkpoint_v3_vit.pth.tar, checkpoint_v3_r18.pth.tar, checkpoint_v3_features.safetensors")
