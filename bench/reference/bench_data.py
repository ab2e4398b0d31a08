"""torchvision's side of `moco bench data`: the official MoCo two-crop loader (main_moco.py's
augmentation and TwoCropsTransform, torchvision ImageFolder + DataLoader), timed the same way:
the clock starts when the first batch arrives; images/s over the rest.

python3 bench/reference/bench_data.py --data-dir DIR --preset v2 --image-size 224 --workers N --images M [--json]
python3 bench/reference/bench_data.py --dataset fashion-mnist --data-dir DIR --preset cifar --workers N --images M
(the idx files as torchvision's FashionMNIST serves them: PIL "L" images, 28x28)
--preset eval: the evaluation transform of main_lincls.py (Resize(size * 256 / 224),
CenterCrop(size)), one view per image, unshuffled: what feature extraction loads.
"""
import gzip
import argparse
import json
import os
import random
import time

import numpy as np
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


def augmentation(preset, size, norm):
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
    if preset == "cifar":
        # The official CIFAR demo's augmentation.
        return [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            norm,
        ]
    if preset == "eval":
        return [T.Resize(size * 256 // 224), T.CenterCrop(size), T.ToTensor(), norm]
    raise SystemExit(f"preset {preset} not in this script (v1, v2, cifar, eval)")


class FashionMnist(torch.utils.data.Dataset):
    """torchvision's FashionMNIST serving (a PIL "L" image per item), from the gzipped idx files
    directly (torchvision's class wants its own download layout)."""

    def __init__(self, root, transform):
        with gzip.open(os.path.join(root, "train-images-idx3-ubyte.gz")) as f:
            self.images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(os.path.join(root, "train-labels-idx1-ubyte.gz")) as f:
            self.labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


p = argparse.ArgumentParser()
p.add_argument("--dataset", default="folder", choices=["folder", "fashion-mnist"])
p.add_argument("--data-dir", required=True)
p.add_argument("--preset", default="v2")
p.add_argument("--image-size", type=int, default=None)
p.add_argument("--workers", type=int, default=2)
p.add_argument("--images", type=int, default=1024)
p.add_argument("--json", action="store_true")
a = p.parse_args()
torch.set_num_threads(1)
views = (lambda t: t) if a.preset == "eval" else TwoCrops
if a.dataset == "fashion-mnist":
    root = a.data_dir
    a.image_size = a.image_size or 28
    norm = T.Normalize(mean=[0.2860], std=[0.3530])
    ds = FashionMnist(root, views(T.Compose(augmentation(a.preset, a.image_size, norm))))
else:
    root = os.path.join(a.data_dir, "train") if os.path.isdir(os.path.join(a.data_dir, "train")) else a.data_dir
    a.image_size = a.image_size or 224
    norm = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    ds = datasets.ImageFolder(root, views(T.Compose(augmentation(a.preset, a.image_size, norm))))
ds = torch.utils.data.Subset(ds, range(min(a.images, len(ds))))
shuffle = a.preset != "eval"
loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=shuffle, num_workers=a.workers, drop_last=True, persistent_workers=False)
it = iter(loader)
next(it)
t0 = time.perf_counter()
count = 0
for x, _ in it:
    count += (x if a.preset == "eval" else x[0]).shape[0]
secs = time.perf_counter() - t0
ips = count / secs
crops = "1 view" if a.preset == "eval" else "2 crops"
print(f"torchvision {root}: preset {a.preset}, {a.image_size}x{a.image_size}, {a.workers} worker(s), {count} images x {crops} in {secs:.2f} s: {ips:.1f} images/s")
if a.json:
    print(json.dumps({"images_per_s": ips, "images": count, "seconds": secs, "workers": a.workers}))
