"""PyTorch reference of `moco pretrain`'s default run, written from the official MoCo semantics
(moco/builder.py, the single-GPU CIFAR demo and its kNN monitor), for side-by-side comparison:

- data: the same Fashion-MNIST idx files (default: moco-rs's embedded subset, 4000 train / 1000
  test), normalised with mean 0.2860, std 0.3530;
- encoder: torchvision's ResNet-18 with the small-image stem (3x3 stride-1 conv1, no max-pool),
  width 8, 1 input channel, the demo's SplitBatchNorm with 4 splits, fc = Linear(64, 128);
- MoCo: K 2048, m 0.99, T 0.1, shuffle-BN, SGD lr 0.06 momentum 0.9 wd 5e-4, cosine per epoch,
  batch 64, 3 epochs, MoCo v1 augmentation (RandomResizedCrop(28, scale 0.2-1), grayscale 0.2,
  jitter 0.4, flip);
- monitor: weighted kNN (k 200, t 0.1) of the pooled backbone features (eval mode) after each
  epoch, the bank being the whole train split; plus random-init and raw-pixel kNN baselines;
- with --subset N, pretraining draws on a seeded random subset of N train images (the kNN bank and
  the linear probe still use the whole train split);
- linear probe, cached-features mode (`moco linear-eval --cached-features`): the frozen backbone's
  pooled features (eval transform), a fresh Linear (weight N(0, 0.01), bias 0), SGD lr 30
  momentum 0.9, 100 epochs with lr x0.1 at 60 and 80, batch 256, as `main_lincls.py`.

python3 bench/reference/moco_fmnist.py [--data-dir DIR] [--subset N] [--epochs 3] [--threads 2] [--json]
"""
import argparse
import copy
import gzip
import json
import os
import resource
import struct
import time
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image
from torchvision.models.resnet import BasicBlock

HERE = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser()
p.add_argument("--data-dir", default=os.path.join(HERE, "../../moco-data/embedded"))
p.add_argument("--prefix", default="fashion-mnist-", help="file prefix ('' for the original names)")
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--subset", type=int, default=None, help="pretrain on this many train images")
p.add_argument("--json", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)


def read_idx(path):
    data = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    rank = data[3]
    dims = struct.unpack(">" + "I" * rank, data[4 : 4 + 4 * rank])
    return np.frombuffer(data[4 + 4 * rank :], dtype=np.uint8).reshape(dims)


def load(split):
    names = {"train": ("train", "train"), "test": ("test", "t10k")}[split]
    for stem in (f"{a.prefix}{names[0]}", names[1]):
        img = os.path.join(a.data_dir, f"{stem}-images-idx3-ubyte.gz")
        if os.path.exists(img):
            return read_idx(img), read_idx(os.path.join(a.data_dir, f"{stem}-labels-idx1-ubyte.gz")).astype(np.int64)
    raise SystemExit(f"no {split} idx files in {a.data_dir}")


xtr, ytr = load("train")
xte, yte = load("test")
norm = T.Normalize([0.2860], [0.3530])
aug = T.Compose([
    T.RandomResizedCrop(28, scale=(0.2, 1.0)),
    T.RandomGrayscale(p=0.2),
    T.ColorJitter(0.4, 0.4, 0.4, 0.4),
    T.RandomHorizontalFlip(),
    T.ToTensor(),
    norm,
])
evalt = T.Compose([T.ToTensor(), norm])


pre = np.arange(len(xtr)) if a.subset is None else np.random.RandomState(a.seed).choice(len(xtr), a.subset, replace=False)


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return len(pre)

    def __getitem__(self, i):
        img = Image.fromarray(xtr[pre[i]], "L")
        return aug(img), aug(img)


class SplitBatchNorm(nn.BatchNorm2d):
    """The official CIFAR demo's SplitBatchNorm (written from its semantics)."""

    def __init__(self, num_features, num_splits, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, input):
        N, C, H, W = input.shape
        if self.training or not self.track_running_stats:
            rm, rv = self.running_mean.repeat(self.num_splits), self.running_var.repeat(self.num_splits)
            y = F.batch_norm(input.view(-1, C * self.num_splits, H, W), rm, rv, self.weight.repeat(self.num_splits),
                             self.bias.repeat(self.num_splits), True, self.momentum, self.eps).view(N, C, H, W)
            self.running_mean.data.copy_(rm.view(self.num_splits, C).mean(dim=0))
            self.running_var.data.copy_(rv.view(self.num_splits, C).mean(dim=0))
            return y
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, self.momentum, self.eps)


def encoder(width=8):
    bn = partial(SplitBatchNorm, num_splits=4)
    m = torchvision.models.resnet.ResNet(BasicBlock, [2, 2, 2, 2], norm_layer=bn)
    m.inplanes = width
    m.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
    m.bn1 = bn(width)
    m.maxpool = nn.Identity()
    m.layer1 = m._make_layer(BasicBlock, width, 2)
    m.layer2 = m._make_layer(BasicBlock, 2 * width, 2, stride=2)
    m.layer3 = m._make_layer(BasicBlock, 4 * width, 2, stride=2)
    m.layer4 = m._make_layer(BasicBlock, 8 * width, 2, stride=2)
    m.fc = nn.Linear(8 * width, 128)
    # The layers above were rebuilt after torchvision's constructor initialised its own: give
    # them its initialisation (Kaiming normal, fan-out, for every convolution; BatchNorm 1 and 0),
    # which moco-rs's ResNets use. (The official demo keeps torchvision's initialisation for all
    # but its replaced conv1; moco-rs initialises that one as torchvision's too.)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    return m


def features(model, x):
    model.eval()
    head, model.fc = model.fc, nn.Identity()
    with torch.no_grad():
        f = torch.cat([model(torch.stack([evalt(Image.fromarray(i, "L")) for i in x[s : s + 500]])) for s in range(0, len(x), 500)])
    model.fc = head
    model.train()
    return f


def knn(ftr, fte, k=200, t=0.1, classes=10):
    ftr, fte = F.normalize(ftr, dim=1), F.normalize(fte, dim=1)
    sim = fte @ ftr.T
    w, idx = sim.topk(k, dim=1)
    labels = torch.from_numpy(ytr)[idx]
    scores = torch.zeros(len(fte), classes).scatter_add_(1, labels, (w / t).exp())
    return (scores.argmax(1).numpy() == yte).mean() * 100


raw = knn(torch.from_numpy(xtr.reshape(len(xtr), -1)).float(), torch.from_numpy(xte.reshape(len(xte), -1)).float())
q = encoder()
k_enc = copy.deepcopy(q)
for prm in k_enc.parameters():
    prm.requires_grad = False
init_knn = knn(features(q, xtr), features(q, xte))
queue = F.normalize(torch.randn(128, 2048), dim=0)
ptr = 0
opt = torch.optim.SGD(q.parameters(), 0.06, momentum=0.9, weight_decay=5e-4)
loader = torch.utils.data.DataLoader(Pairs(), batch_size=64, shuffle=True, drop_last=True, num_workers=2, persistent_workers=True)
log = []
t_start = time.perf_counter()
train_time, images = 0.0, 0
for epoch in range(a.epochs):
    for g in opt.param_groups:
        g["lr"] = 0.06 * 0.5 * (1.0 + np.cos(np.pi * epoch / a.epochs))
    t0 = time.perf_counter()
    for x1, x2 in loader:
        qv = F.normalize(q(x1), dim=1)
        with torch.no_grad():
            for pq, pk in zip(q.parameters(), k_enc.parameters()):  # momentum update, official order
                pk.data = pk.data * 0.99 + pq.data * 0.01
            idx = torch.randperm(64)
            kv = F.normalize(k_enc(x2[idx]), dim=1)[torch.argsort(idx)]
        logits = torch.cat([(qv * kv).sum(1, keepdim=True), qv @ queue], dim=1) / 0.1
        loss = F.cross_entropy(logits, torch.zeros(64, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            queue[:, [(ptr + i) % 2048 for i in range(64)]] = kv.T
            ptr = (ptr + 64) % 2048
        images += 64
    train_time += time.perf_counter() - t0
    acc = knn(features(q, xtr), features(q, xte))
    log.append(acc)
    print(f"epoch {epoch}: loss {loss.item():.3f} kNN top-1 {acc:.2f}%", flush=True)
wall = time.perf_counter() - t_start


def linear_probe(ftr, fte, epochs=100, classes=10):
    fc = nn.Linear(ftr.shape[1], classes)
    nn.init.normal_(fc.weight, 0.0, 0.01)
    nn.init.zeros_(fc.bias)
    o = torch.optim.SGD(fc.parameters(), 30.0, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(o, [60, 80], 0.1)
    y = torch.from_numpy(ytr)
    for _ in range(epochs):
        perm = torch.randperm(len(ftr))
        for s in range(0, len(ftr), 256):
            i = perm[s : s + 256]
            loss = F.cross_entropy(fc(ftr[i]), y[i])
            o.zero_grad()
            loss.backward()
            o.step()
        sched.step()
    with torch.no_grad():
        return (fc(fte).argmax(1).numpy() == yte).mean() * 100


t0 = time.perf_counter()
linear = linear_probe(features(q, xtr), features(q, xte))
print(f"linear probe (cached features) top-1 {linear:.2f}% in {time.perf_counter() - t0:.0f} s", flush=True)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
res = {"images_per_s": images / train_time, "wall_s": wall, "peak_rss_mb": rss, "knn_top1": log[-1], "knn_per_epoch": log, "linear_top1": linear, "pretrain_images": len(pre), "random_init_knn_top1": init_knn, "raw_pixels_knn_top1": raw}
print(f"PyTorch {torch.__version__}: {res['images_per_s']:.1f} images/s, wall {wall:.0f} s, kNN {log[-1]:.2f}% (random init {init_knn:.2f}%, raw pixels {raw:.2f}%)")
if a.json:
    print(json.dumps(res))
