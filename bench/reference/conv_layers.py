"""PyTorch's side of `cargo run --release -p moco-models --example conv_layers -- W S`: the 3x3
convolutions of the small-image ResNet-18 (batch 64, widths W..8W, sizes S..S/8), forward and
both gradients (aten.convolution_backward), medians of 7 calls, 2 threads.

    python3 bench/reference/conv_layers.py 16 28
"""
import statistics
import sys
import time

import torch

torch.set_num_threads(2)
w, size = (int(a) for a in (sys.argv[1:3] + ["16", "28"][len(sys.argv[1:3]):]))


def median_ms(f):
    f()
    t = []
    for _ in range(7):
        t0 = time.perf_counter()
        f()
        t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)


s = size
with torch.no_grad():
    for i, c in enumerate([w, 2 * w, 4 * w, 8 * w]):
        if i > 0:
            s = (s + 1) // 2
        x = torch.randn(64, c, s, s)
        k = torch.randn(c, c, 3, 3) * 0.1
        gy = torch.randn(64, c, s, s)
        fwd = median_ms(lambda: torch.nn.functional.conv2d(x, k, padding=1))
        bwd = median_ms(
            lambda: torch.ops.aten.convolution_backward(
                gy, x, k, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
            )
        )
        gflop = 2.0 * 64 * c * c * 9 * s * s / 1e9
        print(
            f"{c:4} ch {s:2}x{s:<2}: forward {fwd:6.2} ms ({gflop / fwd * 1e3:5.1f} GFLOP/s), "
            f"both gradients {bwd:6.2} ms ({2 * gflop / bwd * 1e3:5.1f} GFLOP/s)"
        )
