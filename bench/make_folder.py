"""An ImageNet-like folder for `moco bench data`: N JPEG photos of about 500x375 (ImageNet's
typical size) in 4 class folders, cut at random from scikit-image's sample photos and rescaled.

python3 bench/make_folder.py OUT_DIR [N]   (needs pillow, numpy, scikit-image)
"""
import os
import random
import sys

import numpy as np
from PIL import Image
from skimage import data

out = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
random.seed(0)
photos = [Image.fromarray(x) for x in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field())]
for c in range(4):
    os.makedirs(os.path.join(out, "train", f"class{c}"), exist_ok=True)
for i in range(n):
    src = photos[i % len(photos)]
    w, h = src.size
    cw, ch = random.randint(w // 3, w), random.randint(h // 3, h)
    x, y = random.randint(0, w - cw), random.randint(0, h - ch)
    size = random.choice([(500, 375), (375, 500), (500, 333), (640, 480)])
    img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
    img.save(os.path.join(out, "train", f"class{i % 4}", f"{i:05d}.jpg"), quality=90)
print(f"{n} images under {out}/train")
