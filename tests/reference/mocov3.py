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


def randomise_vit(m):
    """Random values for every parameter and buffer of a timm ViT (so that the class token,
    BatchNorm statistics and biases matter), the fixed position embedding left alone; rounded
    to float32 values, so that a float32 implementation starts from the same numbers."""
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if name == "pos_embed" or "num_batches_tracked" in name:
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand_like(t))
            elif t.dim() >= 2:
                fan_in = t[0].numel()
                t.copy_((torch.rand_like(t) * 2 - 1) * (3.0 / fan_in) ** 0.5)
            elif name.endswith("weight"):
                t.copy_(1.0 + 0.2 * torch.randn_like(t))
            else:
                t.copy_(0.1 * torch.randn_like(t))
        m.cls_token.copy_(0.5 * torch.randn_like(m.cls_token))
        for t in m.state_dict().values():
            t.copy_(t.float().double())


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


class ConvStem(nn.Module):
    """MoCo v3's convolutional patch embedding (the official `vits.ConvStem`, after Xiao et al.,
    "Early convolutions help transformers see better"), usable as timm's `embed_layer`: for 16x16
    patches, four stride-2 3x3 convolutions without bias of widths D/8, D/4, D/2, D, each followed
    by BatchNorm2d and ReLU, then a 1x1 convolution with bias; tokens in row-major order. For
    another power-of-two patch size p (moco-rs' extension), log2(p) such layers of widths
    D/(p/2), ..., D/2, D."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None,
                 flatten=True):
        super().__init__()
        layers = patch_size.bit_length() - 1
        assert patch_size == 1 << layers and embed_dim % (patch_size // 2) == 0
        grid = img_size // patch_size
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size, self.num_patches = (grid, grid), grid * grid
        stem, cin = [], in_chans
        for i in range(layers):
            cout = embed_dim >> (layers - 1 - i)
            stem += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                     nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        stem.append(nn.Conv2d(cin, embed_dim, 1))
        self.proj = nn.Sequential(*stem)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)
