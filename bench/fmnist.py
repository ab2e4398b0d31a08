"""`moco pretrain` and its PyTorch reference (bench/reference/moco_fmnist.py) side by side, one
after the other in one invocation, on the same Fashion-MNIST files, with the default run's recipe
(ResNet-18 small-image stem, width 8, batch 64, K 2048, 3 epochs, v1 augmentation). Prints a
markdown table: training images/s and their ratio, wall time, peak RSS, kNN top-1 per epoch,
linear-probe top-1 (cached features), and the random-init and raw-pixel kNN baselines.

python3 bench/fmnist.py                    # moco-rs's embedded subset: 4000 train / 1000 test
python3 bench/fmnist.py --full             # /usr/share/datasets/fashion-mnist: pretraining on a
                                           # seeded subset of 10000 of the 60000 train images
                                           # (--subset N to change), kNN bank = all 60000,
                                           # evaluation on the 10000 test images
(needs torch, torchvision; builds the moco binary)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--full", action="store_true")
ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
ap.add_argument("--subset", type=int, default=10000)
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--seed", type=int, default=0, help="seed of both runs (initialisation, data order, augmentations)")
args = ap.parse_args()
if args.full:
    data = ["--dataset", "fashion-mnist", "--data-dir", args.data_dir]
    pre = data + ["--subset", str(args.subset)]
    ref_data = ["--data-dir", args.data_dir, "--prefix", "", "--subset", str(args.subset)]
    print(f"full Fashion-MNIST in {args.data_dir}: pretraining on {args.subset} of 60000 train images, {args.epochs} epochs; kNN bank 60000, test 10000", flush=True)
else:
    data, pre, ref_data = ["--dataset", "default"], [], []
    print(f"embedded subset: 4000 train / 1000 test images, {args.epochs} epochs", flush=True)
epochs = ["--epochs", str(args.epochs), "--seed", str(args.seed)]

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(root)
subprocess.run(["cargo", "build", "--release", "-q", "-p", "moco-cli"], check=True)
moco = os.path.join(root, "target/release/moco")


def timed(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return out, wall, max(rss, before) / 1024


with tempfile.TemporaryDirectory() as d:
    run = os.path.join(d, "run")
    _, wall, rss = timed([moco, "pretrain", "--quiet", "--out", run] + pre + epochs)
    lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    ips = [l["images_per_s"] for l in lines if "images_per_s" in l]
    knn = [l["knn_top1"] for l in lines if "knn_top1" in l]
    init_out, _, _ = timed([moco, "pretrain", "--quiet", "--max-steps", "0", "--out", os.path.join(d, "init")] + pre + epochs)
    init = [json.loads(l)["knn_top1"] for l in open(os.path.join(d, "init", "metrics.jsonl")) if "knn_top1" in l][-1]
    lin_out, _, _ = timed([moco, "linear-eval", "--weights", run, "--cached-features", "--json", "--out", os.path.join(d, "lin")] + data)
    lin = json.loads(lin_out.strip().splitlines()[-1])["top1"]
ref_out, ref_wall, ref_rss = timed([sys.executable, "bench/reference/moco_fmnist.py", "--json"] + ref_data + epochs)
ref = json.loads(ref_out.strip().splitlines()[-1])

ours_ips = sum(ips) / len(ips)
print("| | moco-rs | PyTorch reference |")
print("|---|---|---|")
print(f"| training images/s (ratio) | {ours_ips:.1f} ({ours_ips / ref['images_per_s']:.3f}x) | {ref['images_per_s']:.1f} |")
print(f"| wall time, whole run incl. kNN evaluations | {wall:.0f} s | {ref_wall:.0f} s |")
print(f"| peak RSS | {rss:.0f} MB | {ref_rss:.0f} MB |")
print(f"| kNN top-1 after each epoch | {', '.join(f'{k:.1f}' for k in knn)} | {', '.join(f'{k:.1f}' for k in ref['knn_per_epoch'])} |")
print(f"| kNN top-1, same network at random init | {init:.1f} | {ref['random_init_knn_top1']:.1f} |")
print(f"| kNN top-1, raw pixels | {ref['raw_pixels_knn_top1']:.1f} | {ref['raw_pixels_knn_top1']:.1f} |")
print(f"| linear probe top-1 (cached features, 100 epochs) | {lin:.1f} | {ref['linear_top1']:.1f} |")
