"""Golden values for moco-core, computed with PyTorch (torch only; no moco code imported).

Run from the repository root:  python3 tests/reference/moco_step.py
Writes tests/reference/moco_step.safetensors (a few KB). The Rust tests in moco-core/tests/golden.rs
read it and compare within the tolerances stated there.

What it records
- A tiny encoder f = Linear(12, 8) -> BatchNorm1d(8) -> ReLU -> Linear(8, 4) (torch's default init,
  seed 0), views x1, x2 of 3 batches of N=6, a queue of K=16 keys (C=4).
- 3 full MoCo steps in the order moco-core runs them: query forward, key forward (train mode,
  shuffle-BN does not change full-batch statistics), InfoNCE with T=0.07, backward,
  torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4), momentum update m=0.99, enqueue
  (K=16 is not a multiple of N=6: the third batch wraps around).
  The official builder runs the momentum update at the start of the next forward instead; since
  the key encoder starts as a copy of the query encoder, both orders give the same key weights at
  every key forward.
- The symmetric loss of the official CIFAR demo for step 0 (both views as queries).
- In-batch InfoNCE (MoCo v3, scale 2T) on fixed q, k, and its gradient wrt q.
- 5 steps of torch.optim.SGD with momentum 0.9, weight decay 1e-4: plain, Nesterov, dampening 0.1.
- 5 steps of MoCo v3's LARS (lr 0.5, wd 1e-2, momentum 0.9, trust 0.001) on a weight, a bias
  (no decay, no scaling) and an all-zero weight (|p| = 0: unscaled first step).
- Learning-rate schedules: MultiStepLR, per-epoch cosine (CosineAnnealingLR), and MoCo v3's
  per-iteration warm-up + cosine through LambdaLR.
"""
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(0)
torch.set_default_dtype(torch.float32)
out = {}

N, D_IN, C, K, T, M, STEPS = 6, 12, 4, 16, 0.07, 0.99, 3


def encoder():
    return nn.Sequential(nn.Linear(D_IN, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, C))


def state(model):
    # Parameters and BN running stats, torchvision-style names (num_batches_tracked left out:
    # it does not affect BatchNorm with a fixed momentum).
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "num_batches" not in k}


f_q = encoder()
f_k = encoder()
f_k.load_state_dict(f_q.state_dict())
for p in f_k.parameters():
    p.requires_grad = False
f_q.train()
f_k.train()

queue = F.normalize(torch.randn(C, K), dim=0)
ptr = 0
x1 = torch.randn(STEPS, N, D_IN)
x2 = torch.randn(STEPS, N, D_IN)

for k, v in state(f_q).items():
    out[f"init.{k}"] = v
out["init.queue"] = queue.clone()
out["views.x1"] = x1.clone()
out["views.x2"] = x2.clone()


def info_nce(q, k, queue, t):
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # N x 1
    l_neg = torch.einsum("nc,ck->nk", q, queue)  # N x K
    logits = torch.cat([l_pos, l_neg], dim=1) / t  # N x (1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, labels), logits


# The symmetric loss on step 0's views, before any update (uses copies so the main run is untouched).
with torch.no_grad():
    fk_copy = encoder()
    fk_copy.load_state_dict(f_k.state_dict())
    fk_copy.train()
    k1 = F.normalize(fk_copy(x1[0]), dim=1)
    k2 = F.normalize(fk_copy(x2[0]), dim=1)
fq_copy = encoder()
fq_copy.load_state_dict(f_q.state_dict())
fq_copy.train()
q1 = F.normalize(fq_copy(x1[0]), dim=1)
q2 = F.normalize(fq_copy(x2[0]), dim=1)
l12, _ = info_nce(q1, k2, queue, T)
l21, _ = info_nce(q2, k1, queue, T)
out["symmetric.loss"] = (l12 + l21).detach().reshape(1)
sym_queue = queue.clone()
keys = torch.cat([k1, k2], dim=0)  # 2N x C enqueued after both losses
sym_queue[:, 0 : 2 * N] = keys.T
out["symmetric.queue_after"] = sym_queue


def moco_steps(f_q, f_k, queue, x1, x2):
    """The STEPS MoCo steps from the given encoders and queue (changed in place); returns what
    is recorded of them (keys step{n}.*)."""
    rec = {}
    ptr = 0
    opt = torch.optim.SGD(f_q.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(STEPS):
        q = F.normalize(f_q(x1[step]), dim=1)  # N x C
        with torch.no_grad():
            k = F.normalize(f_k(x2[step]), dim=1)  # N x C
        loss, logits = info_nce(q, k, queue, T)
        opt.zero_grad()
        loss.backward()
        rec[f"step{step}.loss"] = loss.detach().reshape(1)
        rec[f"step{step}.logits"] = logits.detach().clone()
        for name, p in f_q.named_parameters():
            rec[f"step{step}.grad.{name}"] = p.grad.detach().clone()
        opt.step()
        with torch.no_grad():
            for pq, pk in zip(f_q.parameters(), f_k.parameters()):
                pk.data = pk.data * M + pq.data * (1.0 - M)
            # enqueue with wrap-around
            for i in range(N):
                queue[:, (ptr + i) % K] = k[i]
            ptr = (ptr + N) % K
        for kname, v in state(f_q).items():
            rec[f"step{step}.query.{kname}"] = v
        for kname, v in state(f_k).items():
            rec[f"step{step}.key.{kname}"] = v
        rec[f"step{step}.queue"] = queue.clone()
        rec[f"step{step}.queue_ptr"] = torch.tensor([ptr], dtype=torch.int64)
    return rec


# The same steps in float64 from the same start, to show how far float32 itself drifts from
# the exact values (printed at the end; not recorded): the Rust tests' tolerances allow for it.
start64 = [copy.deepcopy(f_q).double(), copy.deepcopy(f_k).double(), queue.double()]
out.update(moco_steps(f_q, f_k, queue, x1, x2))

# In-batch InfoNCE (MoCo v3): CE(q k^T / T, arange(N)) * 2T.
qb = F.normalize(torch.randn(8, 5), dim=1).requires_grad_(True)
kb = F.normalize(torch.randn(8, 5), dim=1)
T3 = 0.2
lb = F.cross_entropy(qb @ kb.T / T3, torch.arange(8)) * (2 * T3)
lb.backward()
out["inbatch.q"] = qb.detach().clone()
out["inbatch.k"] = kb
out["inbatch.loss"] = lb.detach().reshape(1)
out["inbatch.grad_q"] = qb.grad.clone()

# 5 SGD steps on a fixed parameter with fixed gradients (loss = sum(p * g) gives grad g).
p0 = torch.randn(3, 4)
grads = torch.randn(5, 3, 4)
out["sgd.p0"] = p0.clone()
out["sgd.grads"] = grads.clone()
for tag, kw in {
    "plain": dict(nesterov=False),
    "nesterov": dict(nesterov=True),
    "dampening": dict(dampening=0.1),
}.items():
    p = p0.clone().requires_grad_(True)
    o = torch.optim.SGD([p], lr=0.05, momentum=0.9, weight_decay=1e-4, **kw)
    traj = []
    for g in grads:
        o.zero_grad()
        (p * g).sum().backward()
        o.step()
        traj.append(p.detach().clone())
    out[f"sgd.{tag}"] = torch.stack(traj)


# Learning-rate schedules, read back from a real optimizer driven by torch's schedulers.
def lrs(make_sched, n):
    o = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.03)
    s = make_sched(o)
    vals = []
    for _ in range(n):
        vals.append(o.param_groups[0]["lr"])
        o.step()
        s.step()
    return torch.tensor(vals, dtype=torch.float64)


EPOCHS, IPE, WARM = 10, 4, 2
out["sched.step"] = lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [6, 8], 0.1), EPOCHS)
out["sched.cosine_epoch"] = lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, EPOCHS), EPOCHS)


def v3(i):
    e = i / IPE
    if e < WARM:
        return e / WARM
    return 0.5 * (1.0 + math.cos(math.pi * (e - WARM) / (EPOCHS - WARM)))


out["sched.warmup_cosine_iter"] = lrs(lambda o: torch.optim.lr_scheduler.LambdaLR(o, v3), EPOCHS * IPE)



# MoCo v3's LARS, written from its definition: parameters with more than one dimension get the
# weight decay, then their update is scaled by trust * |p| / |dp| (1 when either norm is 0);
# one-dimensional ones get neither. Then mu = momentum * mu + dp, p -= lr * mu.
def lars_step(params, lr, wd, momentum, trust, state):
    with torch.no_grad():
        for i, p in enumerate(params):
            dp = p.grad
            if p.ndim > 1:
                dp = dp.add(p, alpha=wd)
                pn, un = torch.norm(p), torch.norm(dp)
                one = torch.ones_like(pn)
                q = torch.where(pn > 0.0, torch.where(un > 0, trust * pn / un, one), one)
                dp = dp.mul(q)
            mu = state.setdefault(i, torch.zeros_like(p))
            mu.mul_(momentum).add_(dp)
            p.add_(mu, alpha=-lr)


lw, lb, lz = torch.randn(3, 4), torch.randn(4), torch.zeros(2, 3)
lgrads = [torch.randn(5, 3, 4), torch.randn(5, 4), torch.randn(5, 2, 3)]
for name, t in zip(["w", "b", "z"], [lw, lb, lz]):
    out[f"lars.{name}0"] = t.clone()
for name, t in zip(["w", "b", "z"], lgrads):
    out[f"lars.{name}_grads"] = t.clone()
lparams = [t.clone().requires_grad_(True) for t in (lw, lb, lz)]
lstate, ltraj = {}, [[], [], []]
for i in range(5):
    for p in lparams:
        p.grad = None
    sum((p * g[i]).sum() for p, g in zip(lparams, lgrads)).backward()
    lars_step(lparams, lr=0.5, wd=1e-2, momentum=0.9, trust=0.001, state=lstate)
    for traj, p in zip(ltraj, lparams):
        traj.append(p.detach().clone())
for name, traj in zip(["w", "b", "z"], ltraj):
    out[f"lars.{name}"] = torch.stack(traj)

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moco_step.safetensors")
save_file({k: v.contiguous() for k, v in out.items()}, path)
print(f"wrote {len(out)} tensors to {path}")

exact = moco_steps(*start64, x1.double(), x2.double())
print("torch float32 against float64, max |a - b| / (1 + |b|):")
for step in range(STEPS):
    errs = {}
    for key in ["logits", "loss", "grad", "query", "key", "queue"]:
        names = [n for n in exact if n.startswith(f"step{step}.{key}") and "ptr" not in n]
        errs[key] = max(
            ((out[n].double() - exact[n]).abs() / (1 + exact[n].abs())).max().item()
            for n in names
        )
    print(f"  step {step}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
