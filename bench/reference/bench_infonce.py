"""InfoNCE + enqueue at MoCo's ImageNet scale in PyTorch on the CPU: the reference for
`cargo bench -p moco-core --bench infonce` (same sizes, same phases, medians of the same count).

python3 bench/reference/bench_infonce.py [--steps S] [--threads T]

The loss is the official builder's: l_pos = einsum('nc,nc->n'), l_neg = einsum('nc,ck->nk') with
the queue, logits = cat([l_pos, l_neg], 1) / T, cross-entropy against label 0; the enqueue writes
the N keys into the queue's columns at the pointer.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)

N, C, K, T = 256, 128, 65536, 0.07
queue = F.normalize(torch.randn(C, K), dim=0)
ptr = 0
fwd, bwd, enq = [], [], []
for i in range(args.steps + 2):
    q = F.normalize(torch.randn(N, C), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(N, C), dim=1)
    t0 = time.perf_counter()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue.clone().detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    loss = F.cross_entropy(logits, torch.zeros(N, dtype=torch.long))
    loss.item()
    t1 = time.perf_counter()
    loss.backward()
    q.grad.sum().item()
    t2 = time.perf_counter()
    with torch.no_grad():
        queue[:, ptr : ptr + N] = k.T
        ptr = (ptr + N) % K
    t3 = time.perf_counter()
    if i >= 2:  # the first two steps warm up the allocator and thread pool
        fwd.append((t1 - t0) * 1e3)
        bwd.append((t2 - t1) * 1e3)
        enq.append((t3 - t2) * 1e3)
f, b, e = (statistics.median(v) for v in (fwd, bwd, enq))
print(f"PyTorch {torch.__version__} InfoNCE + enqueue, N={N} C={C} K={K}, CPU, {args.threads} threads, median of {args.steps} steps")
print(f"  loss forward   {f:8.2f} ms")
print(f"  loss backward  {b:8.2f} ms")
print(f"  enqueue        {e:8.2f} ms")
print(f"  total per step {f + b + e:8.2f} ms")
