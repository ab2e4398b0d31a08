"""Checkpoints in the layout of facebookresearch/moco's main_moco.py, for moco-models' importer.

Run from the repository root:  python3 tests/reference/official_checkpoint.py
Writes, under tests/reference/:
- checkpoint_small_zip.pth.tar, checkpoint_small_legacy.pth.tar: a small-image ResNet-18
  (width 4, 1 input channel) with the v2 MLP head (dim 16), saved by torch.save with the current
  zip serialization and with the legacy one that the 2020 released checkpoints use;
- checkpoint_r50_zip.pth.tar: a ResNet-50 (ImageNet stem, width 2) with the v1 linear head;
- checkpoint_features.safetensors: an input per model and the query encoder's pooled features and
  head output in eval mode.
The layout: {'epoch', 'arch', 'state_dict': {'module.encoder_q.*', 'module.encoder_k.*',
'module.queue', 'module.queue_ptr'}, 'optimizer': SGD state_dict} (the small ones carry an
optimizer state, as main_moco.py writes it).
"""
import copy
import os

import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock, Bottleneck

torch.manual_seed(0)
HERE = os.path.dirname(os.path.abspath(__file__))


def resnet(block, layers, width, in_ch, small, head_dim, mlp):
    m = torchvision.models.resnet.ResNet(block, layers)
    m.inplanes = width
    if small:
        m.conv1 = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
    else:
        m.conv1 = nn.Conv2d(in_ch, width, 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(width)
    m.layer1 = m._make_layer(block, width, layers[0])
    m.layer2 = m._make_layer(block, 2 * width, layers[1], stride=2)
    m.layer3 = m._make_layer(block, 4 * width, layers[2], stride=2)
    m.layer4 = m._make_layer(block, 8 * width, layers[3], stride=2)
    feat = 8 * width * block.expansion
    if mlp:
        m.fc = nn.Sequential(nn.Linear(feat, feat), nn.ReLU(), nn.Linear(feat, head_dim))
    else:
        m.fc = nn.Linear(feat, head_dim)
    # Non-trivial running statistics so that eval mode means something.
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m


class MoCo(nn.Module):
    """Only the buffers and submodule names of moco.builder.MoCo matter here."""

    def __init__(self, encoder_q, encoder_k, dim, K):
        super().__init__()
        self.encoder_q, self.encoder_k = encoder_q, encoder_k
        self.register_buffer("queue", nn.functional.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def checkpoint(q, arch, dim, K, with_optimizer):
    k = copy.deepcopy(q)  # the key encoder: a perturbed copy of the query encoder
    with torch.no_grad():
        for p in k.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model = MoCo(q, k, dim, K)
    model.queue_ptr[0] = 24
    wrapped = nn.DataParallel(model)  # state_dict keys get the `module.` prefix, as with DDP
    ckpt = {"epoch": 200, "arch": arch, "state_dict": wrapped.state_dict()}
    if with_optimizer:
        opt = torch.optim.SGD(q.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
        q.train()
        q(torch.randn(4, q.conv1.in_channels, 28, 28)).sum().backward()
        opt.step()
        ckpt["optimizer"] = opt.state_dict()
    return ckpt


out = {}
small = resnet(BasicBlock, [2, 2, 2, 2], 4, 1, True, 16, True)
ckpt = checkpoint(small, "resnet18", 16, 64, True)
torch.save(ckpt, os.path.join(HERE, "checkpoint_small_zip.pth.tar"))
torch.save(ckpt, os.path.join(HERE, "checkpoint_small_legacy.pth.tar"), _use_new_zipfile_serialization=False)
r50 = resnet(Bottleneck, [3, 4, 6, 3], 2, 3, False, 8, False)
torch.save(checkpoint(r50, "resnet50", 8, 32, False), os.path.join(HERE, "checkpoint_r50_zip.pth.tar"))

for tag, m, x in [("small", small, torch.randn(3, 1, 28, 28)), ("r50", r50, torch.randn(2, 3, 64, 64))]:
    m.eval()
    feats = []
    h = m.avgpool.register_forward_hook(lambda mod, i, o: feats.append(o.flatten(1)))
    with torch.no_grad():
        out[f"{tag}.embed"] = m(x)
    h.remove()
    out[f"{tag}.x"] = x
    out[f"{tag}.features"] = feats[0]
save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(HERE, "checkpoint_features.safetensors"))
print("wrote", sorted(os.listdir(HERE)))
