// The CUDA kernels' arithmetic on the CPU: each function below runs one kernel of
// batch_norm.cu or max_pool.cu over the same grid (blocks, threads, the same tree reductions)
// with the same header functions, compiled as ordinary C++ (build.rs, always; no CUDA
// needed). The Rust tests (ops/cuda_host.rs) drive them in the order ops/*/cuda.rs launches
// the kernels and compare with the CPU kernels and the float64 generic path. `moco_bn_parts`
// is also what the CUDA launches use to size their grids.
//
// Compiled with floating-point contraction off, as the kernels are with --fmad=false, so that
// both sides round the same operations the same way.

#include <vector>

#include "batch_norm.cuh"
#include "max_pool.cuh"

using namespace moco;

namespace {

template <class T>
void block_reduce(std::vector<T>& slots) {
    for (unsigned stride = kBlock / 2; stride > 0; stride >>= 1)
        for (unsigned tid = 0; tid < kBlock; ++tid) tree_level(slots.data(), tid, stride);
}

// The values a grid-stride kernel's threads visit, in some order (each exactly once; the
// kernels' per-value work is independent).
template <class F>
void each_value(size_t total, F f) {
    for (size_t i = 0; i < total; ++i) f(i);
}

}  // namespace

extern "C" {

unsigned moco_bn_parts(unsigned groups_channels, unsigned count) {
    return bn_parts(groups_channels, count);
}

void moco_host_bn_stats(const float* x, unsigned n, unsigned c, unsigned l, unsigned splits,
                        unsigned parts, Welford* partials) {
    BnShape s = bn_shape(n, c, l, splits);
    std::vector<Welford> slots(kBlock);
    for (unsigned b = 0; b < splits * c * parts; ++b) {
        unsigned gc = b / parts, part = b % parts;
        for (unsigned t = 0; t < kBlock; ++t)
            slots[t] = bn_stats_thread(x, s, gc, part, parts, t, kBlock);
        block_reduce(slots);
        partials[b] = slots[0];
    }
}

void moco_host_bn_finalize(const Welford* partials, unsigned n, unsigned c, unsigned l,
                           unsigned splits, unsigned parts, float eps, float momentum,
                           const float* weight, const float* bias, float* stats,
                           float* running) {
    BnShape s = bn_shape(n, c, l, splits);
    unsigned gcs = splits * c;
    for (unsigned ch = 0; ch < c; ++ch)
        bn_finalize_channel(partials, s, ch, parts, eps, momentum, weight, bias, stats,
                            stats + gcs, stats + 2 * gcs, stats + 3 * gcs, running, running + c);
}

void moco_host_bn_apply(const float* x, unsigned n, unsigned c, unsigned l, unsigned splits,
                        const float* scale, const float* shift, int end, const float* other,
                        const float* scale2, const float* shift2, float* y) {
    BnShape s = bn_shape(n, c, l, splits);
    each_value((size_t)n * c * l, [&](size_t i) {
        bn_apply_at(i, x, s, scale, shift, end, other, scale2, shift2, y);
    });
}

void moco_host_bn_backward_reduce(const float* x, const float* grad, const float* out,
                                  unsigned n, unsigned c, unsigned l, unsigned splits,
                                  unsigned parts, const float* stats, Sum2* partials) {
    BnShape s = bn_shape(n, c, l, splits);
    unsigned gcs = splits * c;
    std::vector<Sum2> slots(kBlock);
    for (unsigned b = 0; b < gcs * parts; ++b) {
        unsigned gc = b / parts, part = b % parts;
        for (unsigned t = 0; t < kBlock; ++t)
            slots[t] = bn_backward_thread(x, grad, out, s, gc, part, parts, t, kBlock, stats[gc],
                                          stats[gcs + gc]);
        block_reduce(slots);
        partials[b] = slots[0];
    }
}

void moco_host_bn_backward_finalize(const Sum2* partials, unsigned n, unsigned c, unsigned l,
                                    unsigned splits, unsigned parts, const float* weight,
                                    const float* stats, float* coef, float* dwb) {
    BnShape s = bn_shape(n, c, l, splits);
    unsigned gcs = splits * c;
    for (unsigned ch = 0; ch < c; ++ch)
        bn_backward_finalize_channel(partials, s, ch, parts, weight, stats + gcs, coef,
                                     coef + gcs, coef + 2 * gcs, dwb, dwb + c);
}

void moco_host_bn_backward_input(const float* x, const float* grad, const float* out, unsigned n,
                                 unsigned c, unsigned l, unsigned splits, const float* stats,
                                 const float* coef, int second, const float* z,
                                 const float* stats2, const float* coef2, float* dx, float* d2) {
    BnShape s = bn_shape(n, c, l, splits);
    each_value((size_t)n * c * l, [&](size_t i) {
        bn_backward_input_at(i, x, grad, out, s, stats, coef, second, z, stats2, coef2, dx, d2);
    });
}

void moco_host_max_pool_forward(const float* x, unsigned planes, unsigned h, unsigned w,
                                unsigned ho, unsigned wo, unsigned kernel, unsigned stride,
                                unsigned padding, float* y) {
    PoolShape s = pool_shape(h, w, ho, wo, kernel, stride, padding);
    each_value((size_t)planes * ho * wo, [&](size_t o) { y[o] = pool_forward_value(x, s, o); });
}

void moco_host_max_pool_backward(const float* x, const float* gy, unsigned planes, unsigned h,
                                 unsigned w, unsigned ho, unsigned wo, unsigned kernel,
                                 unsigned stride, unsigned padding, float* gx) {
    PoolShape s = pool_shape(h, w, ho, wo, kernel, stride, padding);
    each_value((size_t)planes * h * w, [&](size_t i) { gx[i] = pool_backward_value(x, gy, s, i); });
}

}  // extern "C"
