"""How sensitive the `small` case of resnet_golden.py is: why only kernels that round as torch's
do can meet its 1e-4 bound on the gradients (docs/benchmarks.md, "Winograd").

Run from the repository root:  python3 tests/reference/small_resnet_conditioning.py
Prints, for the golden input (float64 throughout): the ReLU inputs nearest zero, relative to the
largest of their layer; then how far the output and the gradients move (max-relative) when the
input moves by eps * N(0, 1). Below the nearest ReLU margin they move in proportion to eps; past
it a ReLU flips and the gradients jump.
"""
import os

import torch
from safetensors.torch import load_file

here = os.path.dirname(os.path.abspath(__file__))
# The golden script's definitions, without its recording (which starts at `r18 = `).
src = open(os.path.join(here, "resnet_golden.py")).read().split("\nr18 = ")[0]
defs = {"__file__": os.path.join(here, "resnet_golden.py")}
exec(src, defs)

gold = load_file(os.path.join(here, "resnet_golden.safetensors"))
x, r = gold["small.x"].double(), gold["small.r"].double()


def run(x, margins=None):
    m = defs["small_resnet18"](16, 1, 2).double()
    defs["fill"](m)
    m.train()
    if margins is not None:
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.ReLU):
                mod.inplace = False
                mod.register_forward_hook(
                    lambda mod, i, o, name=name: margins.append(
                        ((i[0].abs().min() / i[0].abs().max()).item(), name)))
    xg = x.clone().requires_grad_(True)
    y = m(xg)
    (y * r).sum().backward()
    return y.detach(), xg.grad, m.conv1.weight.grad


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


margins = []
ref = run(x, margins)
for v, name in sorted(margins)[:3]:
    print(f"ReLU {name}: min |input| / max |input| = {v:.2e}")
torch.manual_seed(0)
for eps in [1e-7, 1e-6, 1e-5]:
    moved = run(x + eps * torch.randn_like(x))
    out, gx, gw = (rel(a, b) for a, b in zip(moved, ref))
    print(f"input moved by {eps:g}: output {out:.1e}, grad.x {gx:.1e}, grad.conv1.weight {gw:.1e}")
