// Max pooling's arithmetic for contiguous float32 (N, C, H, W) tensors, square windows, no
// dilation, floor mode, with torch.nn.MaxPool2d's semantics: padding never wins, the first
// maximum of a window in row-major order, NaN propagated. max_pool.cu wraps these functions
// thinly (one thread per output value forward, one per input value backward) and
// host_check.cpp runs them over the same indices on the CPU for the tests.
//
// The backward pass is a gather, not a scatter: each input value sums the gradients of the
// outputs whose window's maximum it is, in increasing output order (the order the CPU kernel
// of ops/pool.rs adds them in), so there are no atomics and the result is deterministic.
#pragma once

#include "common.cuh"

namespace moco {

// One pooling geometry: planes of h x w values pooled to ho x wo.
struct PoolShape {
    unsigned h;
    unsigned w;
    unsigned ho;
    unsigned wo;
    unsigned kernel;
    unsigned stride;
    unsigned padding;
};

MOCO_HD PoolShape pool_shape(unsigned h, unsigned w, unsigned ho, unsigned wo, unsigned kernel,
                            unsigned stride, unsigned padding) {
    PoolShape s;
    s.h = h;
    s.w = w;
    s.ho = ho;
    s.wo = wo;
    s.kernel = kernel;
    s.stride = stride;
    s.padding = padding;
    return s;
}

// The index in its plane of the first maximum of output (oh, ow)'s window (`plane`: the
// input plane).
MOCO_HD unsigned pool_argmax(const float* plane, PoolShape s, unsigned oh, unsigned ow) {
    int h0 = (int)(oh * s.stride) - (int)s.padding, w0 = (int)(ow * s.stride) - (int)s.padding;
    int h1 = h0 + (int)s.kernel, w1 = w0 + (int)s.kernel;
    if (h0 < 0) h0 = 0;
    if (w0 < 0) w0 = 0;
    if (h1 > (int)s.h) h1 = (int)s.h;
    if (w1 > (int)s.w) w1 = (int)s.w;
    float best = -INFINITY;
    unsigned at = (unsigned)h0 * s.w + (unsigned)w0;
    for (int ih = h0; ih < h1; ++ih) {
        for (int iw = w0; iw < w1; ++iw) {
            unsigned i = (unsigned)ih * s.w + (unsigned)iw;
            float v = plane[i];
            if (v > best || v != v) {
                best = v;
                at = i;
            }
        }
    }
    return at;
}

// Output value `o` (plane * ho * wo + oh * wo + ow) of the forward pass.
MOCO_HD float pool_forward_value(const float* x, PoolShape s, size_t o) {
    size_t per = (size_t)s.ho * s.wo;
    size_t plane = o / per;
    unsigned r = (unsigned)(o % per);
    const float* xp = x + plane * s.h * s.w;
    return xp[pool_argmax(xp, s, r / s.wo, r % s.wo)];
}

// The first and one-past-last output index along one axis whose windows contain input index
// `i` (extent `out` outputs).
MOCO_HD void pool_outputs_of(unsigned i, unsigned kernel, unsigned stride, unsigned padding,
                             unsigned out, unsigned* lo, unsigned* hi) {
    // Output o covers inputs [o * stride - padding, o * stride - padding + kernel).
    int ip = (int)i + (int)padding;
    int first = ip - (int)kernel + 1;
    unsigned l = first <= 0 ? 0u : (unsigned)((first + (int)stride - 1) / (int)stride);
    unsigned h = (unsigned)(ip / (int)stride) + 1;
    *lo = l;
    *hi = h < out ? h : out;
}

// Input value `i` (plane * h * w + ih * w + iw) of the backward pass: the sum of the output
// gradients `gy` whose window's first maximum is this value, in increasing output order.
MOCO_HD float pool_backward_value(const float* x, const float* gy, PoolShape s, size_t i) {
    size_t per = (size_t)s.h * s.w;
    size_t plane = i / per;
    unsigned r = (unsigned)(i % per);
    unsigned ih = r / s.w, iw = r % s.w;
    const float* xp = x + plane * per;
    const float* gp = gy + plane * s.ho * s.wo;
    unsigned oh0, oh1, ow0, ow1;
    pool_outputs_of(ih, s.kernel, s.stride, s.padding, s.ho, &oh0, &oh1);
    pool_outputs_of(iw, s.kernel, s.stride, s.padding, s.wo, &ow0, &ow1);
    float acc = 0.0f;
    for (unsigned oh = oh0; oh < oh1; ++oh)
        for (unsigned ow = ow0; ow < ow1; ++ow)
            if (pool_argmax(xp, s, oh, ow) == r) acc += gp[oh * s.wo + ow];
    return acc;
}

}  // namespace moco
