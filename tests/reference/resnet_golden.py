"""Golden values for moco-models, computed with torch + torchvision (no moco code imported).

Run from the repository root:  python3 tests/reference/resnet_golden.py
Writes tests/reference/resnet_golden.safetensors; moco-models/tests/torchvision.rs compares.

Weights are not stored: both sides fill every parameter and buffer from an exact integer hash
(splitmix64) of its name and element index (see `fill`), so only inputs and outputs are committed.

Cases (each: pooled features and output in eval mode, the same in train mode, running statistics
after one train forward, gradients of sum(out * r) in train mode):
- `r18`: torchvision resnet18 (ImageNet stem), fc = Linear(512, 16), input 2x3x64x64.
- `small`: the official CIFAR demo's small-image ResNet-18 (3x3 stride-1 conv1, no max-pool),
  built from torchvision's blocks with width 16 and 1 input channel, BatchNorm replaced by the
  demo's SplitBatchNorm with 2 splits, MoCo v2 MLP head fc = (Linear(128,128), ReLU,
  Linear(128,16)), input 4x1x28x28.
- `r50`: torchvision resnet50 with MoCo v3's projector fc = _build_mlp(2, 2048, 64, 16)
  (Linear no bias, BN1d, ReLU, Linear no bias, BN1d affine=False), input 4x3x64x64.

Gradients: wrt the input and conv1.weight for `r18` and `small`; wrt fc.0.weight for `r50`.
A 50-layer network in train mode is ill-conditioned in float32 (BatchNorm's backward subtracts
means at every layer). Measured on this case, torch's own float32 result differs from its float64
one (max-relative) by about 5e-4 on the train-mode output and fc.0 gradient, and by 2-9% on the
input and layer4 gradients. So the Rust test holds `r50` to 1e-4 in eval mode, 1e-3 in train mode,
and compares no early-layer gradient there.
"""
import math
import os

import numpy as np
from functools import partial

import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock

torch.manual_seed(0)
out = {}


def uniform(n, seed):
    """n values in [-1, 1): splitmix64 of (index + seed), top 53 bits."""
    with np.errstate(over="ignore"):
        z = (np.arange(n, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53 * 2.0 - 1.0)


def fill(model):
    """Deterministic weights from the name and index, in float64, then cast."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "num_batches_tracked" in name:
                continue
            base = uniform(t.numel(), sum(name.encode()) * 1000003)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" and t.dim() >= 2:  # He-uniform
                fan_in = t.shape[1] * math.prod(t.shape[2:])
                v = base * math.sqrt(6.0 / fan_in)
            elif leaf == "weight":  # BatchNorm scale
                v = 1.0 + 0.2 * base
            elif leaf == "running_var":
                v = 1.0 + 0.3 * base.abs()
            else:  # biases, running_mean
                v = 0.1 * base
            t.copy_(v.reshape(t.shape).to(t.dtype))


class SplitBatchNorm(nn.BatchNorm2d):
    """The official MoCo CIFAR demo's SplitBatchNorm (written here from its semantics)."""

    def __init__(self, num_features, num_splits, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, input):
        N, C, H, W = input.shape
        if self.training or not self.track_running_stats:
            rm = self.running_mean.repeat(self.num_splits)
            rv = self.running_var.repeat(self.num_splits)
            y = nn.functional.batch_norm(
                input.view(-1, C * self.num_splits, H, W), rm, rv,
                self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
                True, self.momentum, self.eps).view(N, C, H, W)
            self.running_mean.data.copy_(rm.view(self.num_splits, C).mean(dim=0))
            self.running_var.data.copy_(rv.view(self.num_splits, C).mean(dim=0))
            return y
        return nn.functional.batch_norm(input, self.running_mean, self.running_var,
                                        self.weight, self.bias, False, self.momentum, self.eps)


def small_resnet18(width, in_ch, splits):
    norm = partial(SplitBatchNorm, num_splits=splits)
    m = torchvision.models.resnet18(norm_layer=norm)
    m.inplanes = width
    m.conv1 = nn.Conv2d(in_ch, width, kernel_size=3, stride=1, padding=1, bias=False)
    m.bn1 = norm(width)
    m.maxpool = nn.Identity()
    m.layer1 = m._make_layer(BasicBlock, width, 2)
    m.layer2 = m._make_layer(BasicBlock, 2 * width, 2, stride=2)
    m.layer3 = m._make_layer(BasicBlock, 4 * width, 2, stride=2)
    m.layer4 = m._make_layer(BasicBlock, 8 * width, 2, stride=2)
    m.fc = nn.Sequential(nn.Linear(8 * width, 8 * width), nn.ReLU(), nn.Linear(8 * width, 16))
    return m


def v3_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    mlp = []
    for l in range(num_layers):
        d1 = input_dim if l == 0 else mlp_dim
        d2 = output_dim if l == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(d1, d2, bias=False))
        if l < num_layers - 1:
            mlp.append(nn.BatchNorm1d(d2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*mlp)


def record(tag, model, x, grads):
    fill(model)
    r = torch.randn(x.shape[0], 16)
    out[f"{tag}.x"] = x
    out[f"{tag}.r"] = r
    model.eval()
    feats = []
    hook = model.avgpool.register_forward_hook(lambda m, i, o: feats.append(o.flatten(1)))
    with torch.no_grad():
        out[f"{tag}.eval"] = model(x)
    hook.remove()
    out[f"{tag}.features_eval"] = feats[0]
    model.train()
    xg = x.clone().requires_grad_(True)
    hook = model.avgpool.register_forward_hook(lambda m, i, o: feats.append(o.flatten(1)))
    y = model(xg)
    hook.remove()
    out[f"{tag}.features_train"] = feats[1].detach().clone()
    out[f"{tag}.train"] = y.detach().clone()
    (y * r).sum().backward()
    if "x" in grads:
        out[f"{tag}.grad.x"] = xg.grad.clone()
    params = dict(model.named_parameters())
    for name in grads:
        if name != "x":
            out[f"{tag}.grad.{name}"] = params[name].grad.clone()
    for name, t in model.state_dict().items():
        if name.endswith("running_mean") or name.endswith("running_var"):
            out[f"{tag}.stats.{name}"] = t.clone()


r18 = torchvision.models.resnet18(num_classes=16)
record("r18", r18, torch.randn(2, 3, 64, 64), ["x", "conv1.weight"])
record("small", small_resnet18(16, 1, 2), torch.randn(4, 1, 28, 28), ["x", "conv1.weight"])
r50 = torchvision.models.resnet50()
r50.fc = v3_mlp(2, 2048, 64, 16)
record("r50", r50, torch.randn(4, 3, 64, 64), ["fc.0.weight"])

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resnet_golden.safetensors")
save_file({k: v.contiguous().float() for k, v in out.items()}, path)
print(f"wrote {len(out)} tensors to {path}")
