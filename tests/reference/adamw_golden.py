"""Golden values for moco-core's AdamW, computed with torch.optim.AdamW (float32, as a training
run holds its parameters).

Run from the repository root:  python3 tests/reference/adamw_golden.py
Writes tests/reference/adamw_golden.safetensors; moco-core/tests/adamw.rs compares.

Three parameters: `w` (3x4) and `b` (4) get a gradient at every one of 6 steps; `late` (5) only
from the third step on (torch skips a parameter whose .grad is None: no decay, no step count, so
its bias corrections lag two steps behind). Gradients come from loss = sum(p * g_t), so they are
exactly the stored g_t. The learning rate changes at every step (lr_t, stored), as MoCo's
per-iteration schedules change it; weight decay 0.1, torch's default betas and eps.
Stored: initial values `*.p0`, gradients `*.grads` (steps x shape), `lr`, and the trajectory
after every step `*.traj` (steps x shape).
"""
import os

import torch
from safetensors.torch import save_file

torch.manual_seed(0)
STEPS = 6
shapes = {"w": (3, 4), "b": (4,), "late": (5,)}
first = {"w": 0, "b": 0, "late": 2}
out = {}
params = {}
for name, shape in shapes.items():
    p0 = torch.randn(shape)
    out[f"{name}.p0"] = p0.clone()
    out[f"{name}.grads"] = torch.randn((STEPS,) + shape) * (10.0 if name == "b" else 1.0)
    params[name] = p0.clone().requires_grad_(True)
lr = 1e-2 * torch.linspace(0.2, 1.0, STEPS, dtype=torch.float64)
out["lr"] = lr
opt = torch.optim.AdamW(list(params.values()), lr=float(lr[0]), weight_decay=0.1)
traj = {n: [] for n in shapes}
for t in range(STEPS):
    for group in opt.param_groups:
        group["lr"] = float(lr[t])
    opt.zero_grad(set_to_none=True)
    loss = sum((params[n] * out[f"{n}.grads"][t]).sum() for n in shapes if t >= first[n])
    loss.backward()
    opt.step()
    for n in shapes:
        traj[n].append(params[n].detach().clone())
for n in shapes:
    out[f"{n}.traj"] = torch.stack(traj[n])
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adamw_golden.safetensors")
save_file({k: v.contiguous() for k, v in out.items()}, path)
print(f"wrote {path}: {len(out)} tensors")
