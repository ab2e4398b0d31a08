"""Golden values for moco-eval's weighted kNN: the official MoCo CIFAR demo's `knn_predict`
(written here from its semantics: cosine similarity, top-k, votes exp(s / t) per class,
classes ranked by total vote) on fixed random features.

Run from the repository root:  python3 tests/reference/knn_golden.py
Writes tests/reference/knn_golden.safetensors: bank (300 x 16), bank labels, queries (50 x 16),
query labels, and for k = 20, t = 0.1 and k = 200, t = 0.07 the top-5 class rankings, plus the
top-1 / top-5 accuracies in percent.
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(0)
C = 5
bank = torch.randn(300, 16)
bank_labels = torch.randint(0, C, (300,))
# Queries near some bank points, so that the classes are predictable but not trivially.
pick = torch.randint(0, 300, (50,))
queries = bank[pick] + 0.8 * torch.randn(50, 16)
query_labels = bank_labels[pick]


def knn_predict(feature, feature_bank, feature_labels, classes, knn_k, knn_t):
    sim_matrix = torch.mm(feature, feature_bank)  # B x N
    sim_weight, sim_indices = sim_matrix.topk(k=knn_k, dim=-1)  # B x K
    sim_labels = torch.gather(feature_labels.expand(feature.size(0), -1), dim=-1, index=sim_indices)
    sim_weight = (sim_weight / knn_t).exp()
    one_hot = torch.zeros(feature.size(0) * knn_k, classes)
    one_hot = one_hot.scatter(dim=-1, index=sim_labels.view(-1, 1), value=1.0)
    pred_scores = torch.sum(one_hot.view(feature.size(0), -1, classes) * sim_weight.unsqueeze(dim=-1), dim=1)
    return pred_scores.argsort(dim=-1, descending=True)


out = {"bank": bank, "bank_labels": bank_labels, "queries": queries, "query_labels": query_labels}
fb = F.normalize(bank, dim=1).t().contiguous()
fq = F.normalize(queries, dim=1)
for k, t in [(20, 0.1), (200, 0.07)]:
    pred = knn_predict(fq.double(), fb.double(), bank_labels, C, k, t)
    out[f"rank.k{k}"] = pred[:, :5].contiguous()
    top1 = (pred[:, 0] == query_labels).float().mean() * 100
    top5 = (pred[:, :5] == query_labels[:, None]).any(dim=1).float().mean() * 100
    out[f"acc.k{k}"] = torch.tensor([top1, top5], dtype=torch.float64)
save_file(out, os.path.join(os.path.dirname(os.path.abspath(__file__)), "knn_golden.safetensors"))
print({k: v.tolist() for k, v in out.items() if k.startswith("acc")})
