"""Builds the Fashion-MNIST subset embedded in moco-data (class-balanced: the first 400 images of
each class of the training set, the first 100 of each class of the test set).

Source: Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist), i.e. the
original zalandoresearch/fashion-mnist idx files (MIT licence).
Run:  python3 moco-data/embedded/make_embedded.py
"""
import gzip
import os
import struct

SRC = "/usr/share/datasets/fashion-mnist"
HERE = os.path.dirname(os.path.abspath(__file__))


def read_idx(path):
    data = gzip.open(path).read()
    rank = data[3]
    dims = struct.unpack(">" + "I" * rank, data[4 : 4 + 4 * rank])
    return dims, data[4 + 4 * rank :]


def write_idx(path, dims, payload):
    header = bytes([0, 0, 8, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(header + payload)


for split, src, per_class in [("train", "train", 400), ("test", "t10k", 100)]:
    (n, h, w), pixels = read_idx(f"{SRC}/{src}-images-idx3-ubyte.gz")
    (_,), labels = read_idx(f"{SRC}/{src}-labels-idx1-ubyte.gz")
    counts = [0] * 10
    keep = []
    for i, l in enumerate(labels):
        if counts[l] < per_class:
            counts[l] += 1
            keep.append(i)
    img = b"".join(pixels[i * h * w : (i + 1) * h * w] for i in keep)
    lab = bytes(labels[i] for i in keep)
    write_idx(f"{HERE}/fashion-mnist-{split}-images-idx3-ubyte.gz", (len(keep), h, w), img)
    write_idx(f"{HERE}/fashion-mnist-{split}-labels-idx1-ubyte.gz", (len(keep),), lab)
    print(split, len(keep), "images")
