// Max pooling's CUDA kernels (float32, contiguous (N, C, H, W)): thin wrappers of
// max_pool.cuh, launched by ops/pool/cuda.rs; host_check.cpp runs the same functions over the
// same indices on the CPU.

#include "max_pool.cuh"

using namespace moco;

// y (planes, ho, wo), one thread per output value, grid-stride.
extern "C" __global__ void __launch_bounds__(kBlock)
    moco_max_pool_forward(const float* x, unsigned planes, unsigned h, unsigned w, unsigned ho,
                          unsigned wo, unsigned kernel, unsigned stride, unsigned padding,
                          float* y) {
    PoolShape s = pool_shape(h, w, ho, wo, kernel, stride, padding);
    size_t total = (size_t)planes * ho * wo;
    for (size_t o = (size_t)blockIdx.x * kBlock + threadIdx.x; o < total;
         o += (size_t)gridDim.x * kBlock)
        y[o] = pool_forward_value(x, s, o);
}

// gx (planes, h, w) from the output gradient gy (planes, ho, wo), one thread per input value.
extern "C" __global__ void __launch_bounds__(kBlock)
    moco_max_pool_backward(const float* x, const float* gy, unsigned planes, unsigned h,
                           unsigned w, unsigned ho, unsigned wo, unsigned kernel, unsigned stride,
                           unsigned padding, float* gx) {
    PoolShape s = pool_shape(h, w, ho, wo, kernel, stride, padding);
    size_t total = (size_t)planes * h * w;
    for (size_t i = (size_t)blockIdx.x * kBlock + threadIdx.x; i < total;
         i += (size_t)gridDim.x * kBlock)
        gx[i] = pool_backward_value(x, gy, s, i);
}
