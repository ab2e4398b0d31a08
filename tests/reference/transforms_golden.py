"""Golden values for moco-data's image transforms and `moco extract`, from torchvision on PIL.

Run from the repository root:  python3 tests/reference/transforms_golden.py
(needs torch, torchvision, pillow, safetensors, scikit-image; the last only to (re)create the
photos in tests/reference/images/, small crops of scikit-image's sample photos).

Writes tests/reference/transforms_golden.safetensors with, per image `NAME`:
- `NAME.rgb`: Image.open(path).convert("RGB") as uint8 HWC (decoding as PIL does);
- `NAME.resize_S`: Resize(S) (shorter side, PIL bilinear with antialiasing), uint8 HWC;
- `NAME.crop_S`: CenterCrop(S) of the decoded image, uint8 HWC;
- `NAME.eval_S`: Resize(S*256//224), CenterCrop(S), ToTensor, Normalize(ImageNet), float CHW;
`NAME.aug.input` and `NAME.aug.OP`: each augmentation with fixed parameters (uint8 HWC), on 64x48
regions of the photos and on a 28x28 grayscale Fashion-MNIST image (`fmnist`, PIL mode L): resized crop, brightness, contrast,
saturation and hue at several factors, grayscale, the official MoCo GaussianBlur (PIL radius =
sigma) at several sigmas, horizontal flip, solarize;
`rrc.W_H_S0`: statistics of 20000 draws of RandomResizedCrop.get_params on a WxH image with
scale (S0, 1): mean and standard deviation of the area fraction, of log(w/h), of the crop's
horizontal centre (as a fraction of the width), and the fraction of full-image crops;
and `extract.features`: pooled features of the query encoder of checkpoint_r50_zip.pth.tar
(eval mode) on the eval transform (S = 64) of every PNG in images/, sorted by file name.
"""
import os

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, "images")


def make_photos():
    from skimage import data

    os.makedirs(IMAGES, exist_ok=True)
    Image.fromarray(data.coffee()).resize((151, 101), Image.BICUBIC).save(os.path.join(IMAGES, "coffee.png"))
    Image.fromarray(data.chelsea()).convert("L").resize((90, 61), Image.BICUBIC).save(os.path.join(IMAGES, "chelsea_gray.png"))
    a = Image.fromarray(data.astronaut()).resize((97, 97), Image.BICUBIC).convert("RGBA")
    a.putalpha(Image.linear_gradient("L").resize((97, 97)))
    a.save(os.path.join(IMAGES, "astronaut_rgba.png"))
    Image.fromarray(data.rocket()).resize((64, 112), Image.BICUBIC).save(os.path.join(IMAGES, "rocket.jpg"), quality=90)


if not os.path.isdir(IMAGES) or len(os.listdir(IMAGES)) < 4:
    make_photos()

out = {}
norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
to_u8 = lambda img: torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
for name in sorted(os.listdir(IMAGES)):
    tag = os.path.splitext(name)[0]
    img = Image.open(os.path.join(IMAGES, name)).convert("RGB")
    out[f"{tag}.rgb"] = to_u8(img)
    for s in (36, 50, 73, 160):
        out[f"{tag}.resize_{s}"] = to_u8(T.Resize(s)(img))
    for s in (32, 64, 120):
        out[f"{tag}.crop_{s}"] = to_u8(T.CenterCrop(s)(img))
    for s in (32, 64):
        t = T.Compose([T.Resize(s * 256 // 224), T.CenterCrop(s), T.ToTensor(), norm])
        out[f"{tag}.eval_{s}"] = t(img)

# Augmentations with fixed parameters.
import gzip

import torchvision.transforms.functional as F
from PIL import ImageFilter, ImageOps

fm = gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").read()[16 : 16 + 784]
# 64x48 regions of the photos (the size does not matter for exactness; it keeps the file small).
subjects = {
    os.path.splitext(n)[0]: Image.open(os.path.join(IMAGES, n)).convert("RGB").crop((10, 6, 74, 54))
    for n in sorted(os.listdir(IMAGES))
    if n.endswith(".png")
}
subjects["fmnist"] = Image.frombytes("L", (28, 28), fm)
for tag, img in subjects.items():
    out[f"{tag}.aug.input"] = to_u8(img)
    w, h = img.size
    ops = {
        "crop": F.resized_crop(img, h // 5, w // 7, h // 2, (2 * w) // 3, [24, 24], antialias=True),
        "crop_up": F.resized_crop(img, 1, 2, 9, 13, [20, 20], antialias=True),
        "gray": F.to_grayscale(img, num_output_channels=len(img.getbands())),
        "flip": F.hflip(img),
        "solarize": ImageOps.solarize(img, 128),
    }
    for f in (0.0, 0.6, 1.0, 1.37):
        ops[f"brightness_{f}"] = F.adjust_brightness(img, f)
        ops[f"contrast_{f}"] = F.adjust_contrast(img, f)
        ops[f"saturation_{f}"] = F.adjust_saturation(img, f)
    for f in (-0.4, -0.1, 0.07, 0.33):
        ops[f"hue_{f}"] = F.adjust_hue(img, f)
    for sg in (0.1, 0.5, 1.3, 2.0):
        ops[f"blur_{sg}"] = img.filter(ImageFilter.GaussianBlur(radius=sg))
    for k, v in ops.items():
        out[f"{tag}.aug.{k}"] = to_u8(v)

# Random crop parameters, summarised.
torch.manual_seed(0)
for (w, h, s0) in [(100, 80, 0.2), (32, 32, 0.08), (28, 28, 0.2)]:
    dummy = Image.new("L", (w, h))
    rows = [T.RandomResizedCrop.get_params(dummy, [s0, 1.0], [3 / 4, 4 / 3]) for _ in range(20000)]
    t = torch.tensor(rows, dtype=torch.float64)  # i, j, h, w
    area = t[:, 2] * t[:, 3] / (w * h)
    logar = torch.log(t[:, 3] / t[:, 2])
    cx = (t[:, 1] + t[:, 3] / 2) / w
    full = ((t[:, 2] == h) & (t[:, 3] == w)).double()
    out[f"rrc.{w}_{h}_{s0}"] = torch.stack([area.mean(), area.std(), logar.mean(), logar.std(), cx.mean(), cx.std(), full.mean()])

# Features for `moco extract`: rebuild the checkpoint's query encoder in torchvision.

src = open(os.path.join(HERE, "official_checkpoint.py")).read().split("out = {}")[0]
ns = {"__file__": os.path.join(HERE, "official_checkpoint.py")}
exec(src, ns)
from torchvision.models.resnet import Bottleneck

q = ns["resnet"](Bottleneck, [3, 4, 6, 3], 2, 3, False, 8, False)
sd = torch.load(os.path.join(HERE, "checkpoint_r50_zip.pth.tar"), weights_only=False)["state_dict"]
q.load_state_dict({k[len("module.encoder_q."):]: v for k, v in sd.items() if k.startswith("module.encoder_q.")})
q.eval()
q.fc = torch.nn.Identity()
t = T.Compose([T.Resize(64 * 256 // 224), T.CenterCrop(64), T.ToTensor(), norm])
pngs = sorted(n for n in os.listdir(IMAGES) if n.endswith(".png"))
x = torch.stack([t(Image.open(os.path.join(IMAGES, n)).convert("RGB")) for n in pngs])
with torch.no_grad():
    out["extract.features"] = q(x)
save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(HERE, "transforms_golden.safetensors"))
print(f"wrote {len(out)} tensors; images: {sorted(os.listdir(IMAGES))}")
