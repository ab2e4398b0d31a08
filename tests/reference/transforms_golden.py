"""Golden values for moco-data's image transforms and `moco extract`, from torchvision on PIL.

Run from the repository root:  python3 tests/reference/transforms_golden.py
(needs torch, torchvision, pillow, safetensors, scikit-image; the last only to (re)create the
photos in tests/reference/images/, small crops of scikit-image's sample photos).

Writes tests/reference/transforms_golden.safetensors with, per image `NAME`:
- `NAME.rgb`: Image.open(path).convert("RGB") as uint8 HWC (decoding as PIL does);
- `NAME.resize_S`: Resize(S) (shorter side, PIL bilinear with antialiasing), uint8 HWC;
- `NAME.crop_S`: CenterCrop(S) of the decoded image, uint8 HWC;
- `NAME.eval_S`: Resize(S*256//224), CenterCrop(S), ToTensor, Normalize(ImageNet), float CHW;
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
