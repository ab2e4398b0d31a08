"""Bytes that PyTorch's autograd keeps for the backward pass of a torchvision ResNet forward in
training mode, and of a timm 0.4.12 ViT's (MoCo v3's backbone: the class token after the final
LayerNorm), the activations saved by its ops, weights and input excluded, for
moco-models/tests/memory.rs: moco-rs's graph may keep at most a little more.

    python3 tests/reference/saved_activations.py > tests/reference/saved_activations.json
"""
import json

import timm
import torch
import torchvision

CASES = [("resnet18", 4, 64), ("resnet50", 2, 64)]
# vit-64x4h4 with 4x4 patches of 32x32 images (moco-rs's name; 65 tokens), batch 8.
VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4)
VIT_CASES = [("vit-64x4h4_p4", 8, 32)]


def build(arch):
    if arch.startswith("vit"):
        # num_classes=0: the head is the identity, the output the class token's features.
        return timm.models.vision_transformer.VisionTransformer(num_classes=0, **VIT)
    model = getattr(torchvision.models, arch)()
    model.fc = torch.nn.Identity()  # moco-rs's backbone ends at the pooled features
    return model


def saved_bytes(arch, batch, size):
    torch.manual_seed(0)
    model = build(arch)
    model.train()
    x = torch.randn(batch, 3, size, size)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude.add(x.untyped_storage().data_ptr())
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    # The output is kept alive by whoever holds it, in both libraries.
    storages.setdefault(y.untyped_storage().data_ptr(), y.untyped_storage().nbytes())
    return sum(storages.values())


print(
    json.dumps(
        {f"{a}_b{b}_{s}": saved_bytes(a, b, s) for a, b, s in CASES + VIT_CASES}, indent=1
    )
)
