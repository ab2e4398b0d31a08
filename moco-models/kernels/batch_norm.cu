// BatchNorm's CUDA kernels (float32, contiguous (N, C, L) tensors in `splits` groups): thin
// wrappers of batch_norm.cuh, launched by ops/batch_norm/cuda.rs. host_check.cpp runs the same
// header functions over the same grid on the CPU. Each (group, channel) pair `gc` has
// bn_count values, reduced in `parts` blocks of kBlock threads: block b = gc * parts + part.
//
// Training forward: bn_stats -> bn_finalize -> bn_apply (3 launches, 2 passes over x).
// Backward: bn_backward_reduce -> bn_backward_finalize -> bn_backward_input (3 launches, 2
// passes over x and the gradient; for a downsampling pair the first two run per BatchNorm).
// Evaluation: bn_apply with the running statistics' scale and shift.

#include "batch_norm.cuh"

using namespace moco;

namespace {

template <class T>
__device__ void block_reduce(T* slots) {
    __syncthreads();
    for (unsigned stride = kBlock / 2; stride > 0; stride >>= 1) {
        tree_level(slots, threadIdx.x, stride);
        __syncthreads();
    }
}

}  // namespace

// partials[b]: the Welford accumulation of block b's share of its (group, channel).
extern "C" __global__ void __launch_bounds__(kBlock)
    moco_bn_stats(const float* x, unsigned n, unsigned c, unsigned l, unsigned splits,
                  unsigned parts, Welford* partials) {
    __shared__ Welford slots[kBlock];
    BnShape s = bn_shape(n, c, l, splits);
    unsigned gc = blockIdx.x / parts, part = blockIdx.x % parts;
    slots[threadIdx.x] = bn_stats_thread(x, s, gc, part, parts, threadIdx.x, kBlock);
    block_reduce(slots);
    if (threadIdx.x == 0) partials[blockIdx.x] = slots[0];
}

// One thread per channel: stats = [mean, invstd, scale, shift] (each splits * c), running =
// [running mean, running var] (each c), moved in place.
extern "C" __global__ void __launch_bounds__(kBlock)
    moco_bn_finalize(const Welford* partials, unsigned n, unsigned c, unsigned l, unsigned splits,
                     unsigned parts, float eps, float momentum, const float* weight,
                     const float* bias, float* stats, float* running) {
    unsigned ch = blockIdx.x * kBlock + threadIdx.x;
    if (ch >= c) return;
    BnShape s = bn_shape(n, c, l, splits);
    unsigned gcs = splits * c;
    bn_finalize_channel(partials, s, ch, parts, eps, momentum, weight, bias, stats,
                        stats + gcs, stats + 2 * gcs, stats + 3 * gcs, running, running + c);
}

// y = end(x * scale + shift, other, scale2, shift2), grid-stride over every value; scale and
// shift (and scale2, shift2) indexed by (group, channel).
extern "C" __global__ void __launch_bounds__(kBlock)
    moco_bn_apply(const float* x, unsigned n, unsigned c, unsigned l, unsigned splits,
                  const float* scale, const float* shift, int end, const float* other,
                  const float* scale2, const float* shift2, float* y) {
    BnShape s = bn_shape(n, c, l, splits);
    size_t total = (size_t)n * c * l;
    for (size_t i = (size_t)blockIdx.x * kBlock + threadIdx.x; i < total;
         i += (size_t)gridDim.x * kBlock) {
        bn_apply_at(i, x, s, scale, shift, end, other, scale2, shift2, y);
    }
}

// partials[b]: block b's sums of dy and dy * xhat (dy: the gradient through the ReLU whose
// output is `out`; out null: no ReLU). stats: the forward's [mean, invstd, ...].
extern "C" __global__ void __launch_bounds__(kBlock)
    moco_bn_backward_reduce(const float* x, const float* grad, const float* out, unsigned n,
                            unsigned c, unsigned l, unsigned splits, unsigned parts,
                            const float* stats, Sum2* partials) {
    __shared__ Sum2 slots[kBlock];
    BnShape s = bn_shape(n, c, l, splits);
    unsigned gcs = splits * c;
    unsigned gc = blockIdx.x / parts, part = blockIdx.x % parts;
    slots[threadIdx.x] = bn_backward_thread(x, grad, out, s, gc, part, parts, threadIdx.x, kBlock,
                                            stats[gc], stats[gcs + gc]);
    block_reduce(slots);
    if (threadIdx.x == 0) partials[blockIdx.x] = slots[0];
}

// One thread per channel: coef = [k, mean(dy), mean(dy * xhat)] (each splits * c), dwb =
// [dweight, dbias] (each c).
extern "C" __global__ void __launch_bounds__(kBlock)
    moco_bn_backward_finalize(const Sum2* partials, unsigned n, unsigned c, unsigned l,
                              unsigned splits, unsigned parts, const float* weight,
                              const float* stats, float* coef, float* dwb) {
    unsigned ch = blockIdx.x * kBlock + threadIdx.x;
    if (ch >= c) return;
    BnShape s = bn_shape(n, c, l, splits);
    unsigned gcs = splits * c;
    bn_backward_finalize_channel(partials, s, ch, parts, weight, stats + gcs, coef, coef + gcs,
                                 coef + 2 * gcs, dwb, dwb + c);
}

// dx from the coefficients, grid-stride; and what the second operand gets (`second`): 0
// nothing, 1 the residual's gradient (dy itself), 2 the downsampling BatchNorm's input
// gradient (its input z, stats2, coef2).
extern "C" __global__ void __launch_bounds__(kBlock)
    moco_bn_backward_input(const float* x, const float* grad, const float* out, unsigned n,
                           unsigned c, unsigned l, unsigned splits, const float* stats,
                           const float* coef, int second, const float* z, const float* stats2,
                           const float* coef2, float* dx, float* d2) {
    BnShape s = bn_shape(n, c, l, splits);
    size_t total = (size_t)n * c * l;
    for (size_t i = (size_t)blockIdx.x * kBlock + threadIdx.x; i < total;
         i += (size_t)gridDim.x * kBlock) {
        bn_backward_input_at(i, x, grad, out, s, stats, coef, second, z, stats2, coef2, dx, d2);
    }
}
