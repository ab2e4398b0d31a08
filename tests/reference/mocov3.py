"""MoCo v3's building blocks, written from the paper and the official code's semantics (no moco code
imported), shared by the golden-value scripts of this folder."""
import torch
import torch.nn as nn


def sincos(grid, dim):
    """MoCo v3's fixed position embedding, 1 x (1 + grid^2) x dim: zeros for the class token, then
    per patch m: sin/cos of a*omega, sin/cos of b*omega, where (a, b) follow
    torch.meshgrid(arange(w), arange(h)) flattened (a = m // grid, b = m % grid)."""
    a, b = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                          torch.arange(grid, dtype=torch.float32), indexing="ij")
    q = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(q, dtype=torch.float32) / q))
    oa = a.flatten()[:, None] * omega[None, :]
    ob = b.flatten()[:, None] * omega[None, :]
    pe = torch.cat([oa.sin(), oa.cos(), ob.sin(), ob.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pe.to(torch.get_default_dtype())], dim=0)[None]


def mlp(num_layers, i, h, o, last_bn=True):
    """moco.builder.MoCo._build_mlp: Linear without bias, BN1d and ReLU between, a BN1d without
    affine after the last when last_bn."""
    layers = []
    for l in range(num_layers):
        d1 = i if l == 0 else h
        d2 = o if l == num_layers - 1 else h
        layers.append(nn.Linear(d1, d2, bias=False))
        if l < num_layers - 1:
            layers += [nn.BatchNorm1d(d2), nn.ReLU()]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)
