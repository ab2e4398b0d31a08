"""Golden values for moco-eval's linear protocol (`train_cached`), computed with torch as the
official main_lincls.py trains its classifier: nn.Linear(D, C) from given initial weights,
nn.CrossEntropyLoss (mean), torch.optim.SGD with momentum 0.9, the learning rate set once per
epoch by main_lincls.py's adjust_learning_rate (MoCo v1/v2: x0.1 at each milestone reached;
MoCo v3: lr * 0.5 * (1 + cos(pi * epoch / epochs))), and the test set evaluated after every
epoch (top-1 of the argmax). One batch per epoch (the whole training set), so that the order in
which samples are drawn does not matter.

Run from the repository root:  python3 tests/reference/linear_golden.py
Writes tests/reference/linear_golden.safetensors; moco-eval/tests/eval.rs compares.

Stored: `train.x` (N x D, non-negative like pooled ReLU features), `train.y`, `test.x`,
`test.y`, `init.weight` (C x D, N(0, 0.01)), and per configuration K in `v1`, `v1_wd`, `v3`:
`K.weight`, `K.bias` after the last epoch, `K.loss` (the loss of each epoch's step), `K.lr`,
`K.test_top1` (percent, after each epoch).
"""
import math
import os

import torch
from safetensors.torch import save_file

torch.manual_seed(0)
N, NT, D, C, EPOCHS = 96, 64, 24, 5, 6
centers = torch.randn(C, D)
y = torch.randint(0, C, (N,))
yt = torch.randint(0, C, (NT,))
x = (centers[y] + 1.5 * torch.randn(N, D)).abs()
xt = (centers[yt] + 1.5 * torch.randn(NT, D)).abs()
w0 = torch.randn(C, D) * 0.01
out = {"train.x": x, "train.y": y, "test.x": xt, "test.y": yt, "init.weight": w0}

configs = {
    # name: (base lr, weight decay, lr of epoch e)
    "v1": (1.0, 0.0, lambda lr, e: lr * (0.1 if e >= 3 else 1.0) * (0.1 if e >= 5 else 1.0)),
    "v1_wd": (1.0, 0.05, lambda lr, e: lr * (0.1 if e >= 3 else 1.0) * (0.1 if e >= 5 else 1.0)),
    "v3": (0.5, 0.0, lambda lr, e: lr * 0.5 * (1.0 + math.cos(math.pi * e / EPOCHS))),
}
for name, (base, wd, sched) in configs.items():
    fc = torch.nn.Linear(D, C)
    with torch.no_grad():
        fc.weight.copy_(w0)
        fc.bias.zero_()
    opt = torch.optim.SGD(fc.parameters(), base, momentum=0.9, weight_decay=wd)
    crit = torch.nn.CrossEntropyLoss()
    losses, lrs, tops = [], [], []
    for e in range(EPOCHS):
        lr = sched(base, e)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = crit(fc(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            top1 = (fc(xt).argmax(1) == yt).float().mean().item() * 100.0
        losses.append(loss.item())
        lrs.append(lr)
        tops.append(top1)
    out[f"{name}.weight"] = fc.weight.detach().clone()
    out[f"{name}.bias"] = fc.bias.detach().clone()
    out[f"{name}.loss"] = torch.tensor(losses)
    out[f"{name}.lr"] = torch.tensor(lrs, dtype=torch.float64)
    out[f"{name}.test_top1"] = torch.tensor(tops, dtype=torch.float64)
    print(name, "losses", [round(v, 4) for v in losses], "test top-1", tops)

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "linear_golden.safetensors")
save_file({k: v.contiguous() for k, v in out.items()}, path)
print("wrote", path)
