"""torchvision's side of `moco bench data`: the official MoCo two-crop loader (main_moco.py's
augmentation and TwoCropsTransform, torchvision ImageFolder + DataLoader), timed the same way:
the clock starts when the first batch arrives; images/s over the rest.

python3 bench/reference/bench_data.py --data-dir DIR --preset v2 --image-size 224 --workers N --images M [--json]
"""
import argparse
import json
import os
import random
import time

import torch
import torchvision.datasets as datasets
import torchvision.transforms as T
from PIL import ImageFilter


class GaussianBlur:
    """The official MoCo GaussianBlur (moco/loader.py), written here from its semantics."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x):
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCrops:
    def __init__(self, t):
        self.t = t

    def __call__(self, x):
        return [self.t(x), self.t(x)]


def augmentation(preset, size):
    norm = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    if preset == "v2":
        return [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            norm,
        ]
    if preset == "v1":
        return [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomGrayscale(p=0.2),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            norm,
        ]
    raise SystemExit(f"preset {preset} not in this script (v1, v2)")


p = argparse.ArgumentParser()
p.add_argument("--data-dir", required=True)
p.add_argument("--preset", default="v2")
p.add_argument("--image-size", type=int, default=224)
p.add_argument("--workers", type=int, default=2)
p.add_argument("--images", type=int, default=1024)
p.add_argument("--json", action="store_true")
a = p.parse_args()
torch.set_num_threads(1)
root = os.path.join(a.data_dir, "train") if os.path.isdir(os.path.join(a.data_dir, "train")) else a.data_dir
ds = datasets.ImageFolder(root, TwoCrops(T.Compose(augmentation(a.preset, a.image_size))))
ds = torch.utils.data.Subset(ds, range(min(a.images, len(ds))))
loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=a.workers, drop_last=True, persistent_workers=False)
it = iter(loader)
next(it)
t0 = time.perf_counter()
count = 0
for (q, k), _ in it:
    count += q.shape[0]
secs = time.perf_counter() - t0
ips = count / secs
print(f"torchvision {root}: preset {a.preset}, {a.image_size}x{a.image_size}, {a.workers} worker(s), {count} images x 2 crops in {secs:.2f} s: {ips:.1f} images/s")
if a.json:
    print(json.dumps({"images_per_s": ips, "images": count, "seconds": secs, "workers": a.workers}))
