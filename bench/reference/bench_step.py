"""PyTorch's side of `moco bench step`: the same full MoCo training step, written from the official
MoCo semantics (moco/builder.py and the single-GPU CIFAR demo): query forward+backward, key
forward on a shuffled batch (shuffle-BN on one device) then unshuffled, InfoNCE with the queue,
SGD (lr 0.03, momentum 0.9, wd 1e-4), momentum update m = 0.999, enqueue. The encoder is
torchvision's ResNet with the small-image stem for `-small` architectures and a width multiplier,
fc = Linear(features, 128) (with --mlp, MoCo v2's Linear-ReLU-Linear head and T 0.2). Random input; median time of the timed steps after 2 warm-up steps.
A ViT (--arch vit_tiny, vit_small, vit_base or vit-DxNhH, --patch-size) is timm's
VisionTransformer as MoCo v3's vits.py builds it (qkv bias, LayerNorm eps 1e-6, fixed 2-D sin-cos
position embedding) with the same heads; timm 0.4.12 (`pip install timm==0.4.12`).

python3 bench/reference/bench_step.py --arch resnet18-small --width 16 --image-size 28 --channels 1 --batch-size 64 [--json]
python3 bench/reference/bench_step.py --arch vit-192x6h3 --patch-size 4 --image-size 32 --batch-size 64
--extract times the frozen backbone's eval-mode forward instead (fc / head replaced by the
identity, torch.no_grad()): what feature extraction, the kNN monitor and the linear protocol run.
"""
import argparse
import copy
import json
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

p = argparse.ArgumentParser()
p.add_argument("--arch", default="resnet18-small")
p.add_argument("--width", type=int, default=64)
p.add_argument("--patch-size", type=int, default=16)
p.add_argument("--image-size", type=int, default=32)
p.add_argument("--channels", type=int, default=3)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--queue-size", type=int, default=4096)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--mlp", action="store_true", help="MoCo v2: MLP head, T 0.2")
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--json", action="store_true")
p.add_argument("--extract", action="store_true",
               help="time the frozen backbone's eval-mode forward (pooled features, no_grad) instead")
p.add_argument("--profile", action="store_true",
               help="also run --steps steps under torch.profiler and print each op class's self time per step")
p.add_argument("--fp32", action="store_true",
               help="on CUDA, full float32: TF32 off for cuDNN's convolutions (on by PyTorch's default) and matmuls")
a = p.parse_args()
if a.fp32:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
torch.set_num_threads(a.threads)
torch.manual_seed(0)

base = a.arch.replace("-small", "")
small = a.arch.endswith("-small")
vit = a.arch.startswith("vit")
if not vit:
    block, layers = {
        "resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
        "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3]),
    }[base]


def vit_encoder():
    from functools import partial
    from timm.models.vision_transformer import VisionTransformer
    named = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 12), "vit_base": (768, 12, 12)}
    if a.arch in named:
        d, n, h = named[a.arch]
    else:  # vit-DxNhH
        d, rest = a.arch[4:].split("x")
        n, h = rest.split("h")
        d, n, h = int(d), int(n), int(h)
    m = VisionTransformer(img_size=a.image_size, patch_size=a.patch_size, in_chans=a.channels,
                          embed_dim=d, depth=n, num_heads=h, mlp_ratio=4, qkv_bias=True,
                          norm_layer=partial(nn.LayerNorm, eps=1e-6))
    g, q = a.image_size // a.patch_size, d // 4
    gw, gh = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000.0 ** (torch.arange(q, dtype=torch.float32) / q)
    ow, oh = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega
    pe = torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], dim=1)
    m.pos_embed = nn.Parameter(torch.cat([torch.zeros(1, d), pe])[None], requires_grad=False)
    m.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 128)) if a.mlp else nn.Linear(d, 128)
    return m


def encoder():
    if vit:
        return vit_encoder()
    w = a.width
    m = torchvision.models.resnet.ResNet(block, layers)
    m.inplanes = w
    m.conv1 = nn.Conv2d(a.channels, w, 3, 1, 1, bias=False) if small else nn.Conv2d(a.channels, w, 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(w)
    if small:
        m.maxpool = nn.Identity()
    m.layer1 = m._make_layer(block, w, layers[0])
    m.layer2 = m._make_layer(block, 2 * w, layers[1], stride=2)
    m.layer3 = m._make_layer(block, 4 * w, layers[2], stride=2)
    m.layer4 = m._make_layer(block, 8 * w, layers[3], stride=2)
    f = 8 * w * block.expansion
    m.fc = nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, 128)) if a.mlp else nn.Linear(f, 128)
    return m


dev = torch.device(a.device)
q_enc = encoder().to(dev)
k_enc = copy.deepcopy(q_enc)
for param in k_enc.parameters():
    param.requires_grad = False
queue = F.normalize(torch.randn(128, a.queue_size, device=dev), dim=0)
ptr = 0
opt = torch.optim.SGD(q_enc.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
shape = (a.batch_size, a.channels, a.image_size, a.image_size)
x1, x2 = torch.randn(shape, device=dev), torch.randn(shape, device=dev)


frozen = copy.deepcopy(q_enc)
if vit:
    frozen.head = nn.Identity()
else:
    frozen.fc = nn.Identity()
frozen.eval()


def extract():
    with torch.no_grad():
        return frozen(x1)


def step():
    global ptr
    q = F.normalize(q_enc(x1), dim=1)
    with torch.no_grad():
        idx = torch.randperm(a.batch_size, device=dev)
        k = F.normalize(k_enc(x2[idx]), dim=1)[torch.argsort(idx)]
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)
    logits = torch.cat([l_pos, l_neg], dim=1) / (0.2 if a.mlp else 0.07)
    loss = F.cross_entropy(logits, torch.zeros(a.batch_size, dtype=torch.long, device=dev))
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        for pq, pk in zip(q_enc.parameters(), k_enc.parameters()):
            pk.mul_(0.999).add_(pq.detach(), alpha=0.001)
        n = a.batch_size
        cols = [(ptr + i) % a.queue_size for i in range(n)]
        queue[:, cols] = k.T
        ptr = (ptr + n) % a.queue_size


times = []
for i in range(2 + a.steps):
    t0 = time.perf_counter()
    extract() if a.extract else step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    if i >= 2:
        times.append(time.perf_counter() - t0)
times.sort()
med = times[len(times) // 2]
ips = a.batch_size / med
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if dev.type == "cuda":
    rss = torch.cuda.max_memory_allocated() / 2**20  # peak GPU memory instead
profile = None
if a.profile:
    # The same classes as `moco bench step --profile`, from each ATen op's self time (device
    # time on CUDA, CPU time on the CPU), so that nothing is counted twice.
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(a.steps):
            extract() if a.extract else step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def op_class(name):
        n = name.lower()
        back = "backward" in n
        for key, cls in [("conv", "convolution"), ("batch_norm", "batch norm"), ("max_pool", "max pool"),
                         ("threshold", "add + relu"), ("relu", "add + relu"), ("foreach", "optimizer"),
                         ("sgd", "optimizer"), ("mm", "matrix products"), ("einsum", "matrix products"),
                         ("cross_entropy", "loss"), ("softmax", "loss"), ("nll", "loss")]:
            if key in n:
                if cls in ("optimizer", "loss"):
                    return cls
                return cls + (" backward" if back else " forward")
        return "other"

    totals = {}
    for e in prof.key_averages():
        if dev.type == "cuda":
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = e.self_cuda_time_total
        else:
            t = e.self_cpu_time_total
        c = op_class(e.key)
        totals[c] = totals.get(c, 0.0) + t / 1e3 / a.steps  # us -> ms per step
    profile = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    print(f"profile ({a.steps} steps, torch.profiler, self {'device' if dev.type == 'cuda' else 'CPU'} time):")
    print(f"  {'class':<32} {'ms/step':>10}")
    for c, ms in profile.items():
        print(f"  {c:<32} {ms:>10.2f}")
what = ("feature extraction (eval mode)" if a.extract else "MoCo step") + (" (full FP32)" if a.fp32 else "")
print(f"PyTorch {torch.__version__} {what} {a.arch} width {a.width} patch {a.patch_size} {a.image_size}x{a.image_size}x{a.channels} batch {a.batch_size}: {ips:.1f} images/s ({med:.3f} s/step), peak RSS {rss:.0f} MB")
if a.json:
    print(json.dumps({"images_per_s": ips, "peak_rss_mb": rss, "seconds_per_step": med, "profile_ms_per_step": profile}))
