// Shared by the CUDA kernels of moco-models and by their host build (host_check.cpp, compiled
// as ordinary C++ for the tests): what is marked MOCO_HD is the kernels' arithmetic, the same
// code on both sides.
#pragma once

#include <cmath>
#include <cstddef>

#ifdef __CUDACC__
#define MOCO_HD __host__ __device__ __forceinline__
#else
#define MOCO_HD inline
#endif

namespace moco {

// Threads per block of every kernel here (a power of two: the block reductions halve it).
constexpr unsigned kBlock = 256;

// The running (count, mean, sum of squared deviations) of a set of values: Welford's update
// for one value, Chan et al.'s merge of two sets. Float32 throughout, as PyTorch's CUDA
// BatchNorm accumulates.
struct Welford {
    float n;
    float mean;
    float m2;
};

MOCO_HD Welford welford_empty() {
    Welford w;
    w.n = 0.0f;
    w.mean = 0.0f;
    w.m2 = 0.0f;
    return w;
}

MOCO_HD void welford_add(Welford& w, float x) {
    w.n += 1.0f;
    float d = x - w.mean;
    w.mean += d / w.n;
    w.m2 += d * (x - w.mean);
}

MOCO_HD Welford welford_merge(Welford a, Welford b) {
    if (b.n == 0.0f) return a;
    if (a.n == 0.0f) return b;
    Welford r;
    r.n = a.n + b.n;
    float d = b.mean - a.mean;
    float fb = b.n / r.n;
    r.mean = a.mean + d * fb;
    r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
    return r;
}

// Two float sums carried together (a BatchNorm backward's sum(dy) and sum(dy * xhat)).
struct Sum2 {
    float a;
    float b;
};

MOCO_HD Sum2 sum2_merge(Sum2 x, Sum2 y) {
    Sum2 r;
    r.a = x.a + y.a;
    r.b = x.b + y.b;
    return r;
}

// One level of a block's tree reduction: slot `tid` takes in slot `tid + stride` (for tid <
// stride). A kernel runs the levels stride = kBlock / 2, ..., 1 over shared memory with a
// barrier between them; host_check.cpp runs the same levels over an array: the same order of
// merges on both sides.
MOCO_HD void tree_level(Welford* s, unsigned tid, unsigned stride) {
    if (tid < stride) s[tid] = welford_merge(s[tid], s[tid + stride]);
}

MOCO_HD void tree_level(Sum2* s, unsigned tid, unsigned stride) {
    if (tid < stride) s[tid] = sum2_merge(s[tid], s[tid + stride]);
}

// The range [lo, hi) of part `part` of `count` items split into `parts` near-equal parts.
MOCO_HD void part_range(size_t count, unsigned part, unsigned parts, size_t* lo, size_t* hi) {
    *lo = count * part / parts;
    *hi = count * (part + 1) / parts;
}

}  // namespace moco
