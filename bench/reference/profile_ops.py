"""PIL/torchvision side of `cargo run --release -p moco-data --example profile_aug -- DIR`: the
same operations with the same fixed factors on the same (first 100) photos, ms per image.

python3 bench/reference/profile_ops.py DIR
"""
import glob
import os
import sys
import time

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

torch.set_num_threads(1)
torch.manual_seed(0)
d = sys.argv[1]
files = sorted(p for p in glob.glob(os.path.join(d, "*")) if os.path.isfile(p))[:100]
n = len(files)


def timed(name, f, items):
    t = time.perf_counter()
    out = [f(x) for x in items]
    print(f"{name:7} {(time.perf_counter() - t) * 1e3 / n:6.2f} ms/img")
    return out


imgs = timed("decode", lambda p: Image.open(p).convert("RGB"), files)
crops = timed("rrc", T.RandomResizedCrop(224, scale=(0.2, 1.0)), imgs)
timed("bright", lambda c: F.adjust_brightness(c, 1.2), crops)
timed("contr", lambda c: F.adjust_contrast(c, 1.2), crops)
timed("sat", lambda c: F.adjust_saturation(c, 1.2), crops)
timed("hue", lambda c: F.adjust_hue(c, 0.05), crops)
timed("blur", lambda c: c.filter(ImageFilter.GaussianBlur(radius=1.0)), crops)
norm = T.Normalize([0.5] * 3, [0.2] * 3)
timed("tensor", lambda c: norm(F.to_tensor(c)), crops)
