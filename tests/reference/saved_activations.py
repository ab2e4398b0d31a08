"""Bytes that PyTorch's autograd keeps for the backward pass of a torchvision ResNet forward in
training mode (the activations saved by its ops, weights and input excluded), for
moco-models/tests/memory.rs: moco-rs's graph may keep at most a little more.

    python3 tests/reference/saved_activations.py > tests/reference/saved_activations.json
"""
import json

import torch
import torchvision

CASES = [("resnet18", 4, 64), ("resnet50", 2, 64)]


def saved_bytes(arch, batch, size):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)()
    model.fc = torch.nn.Identity()  # moco-rs's backbone ends at the pooled features
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


print(json.dumps({f"{a}_b{b}_{s}": saved_bytes(a, b, s) for a, b, s in CASES}, indent=1))
