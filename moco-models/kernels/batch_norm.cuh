// BatchNorm's training and evaluation arithmetic for contiguous float32 (N, C, L) tensors (L:
// the product of the spatial sizes), normalised in `splits` groups (the official CIFAR demo's
// SplitBatchNorm: sample n belongs to group n % splits; 1 = plain BatchNorm). The kernels of
// batch_norm.cu are thin wrappers around these functions, and host_check.cpp runs the same
// functions over the same grid on the CPU for the tests.
//
// Training forward: per (group, channel) a Welford accumulation per thread over its strided
// share of one part of the values (`bn_stats_thread`), merged within the block and then over
// the parts in a fixed order (`welford_merge`), the statistics and the running-statistics
// update per channel (`bn_finalize_channel`), and one elementwise pass that normalises, scales,
// shifts and applies what follows (`bn_apply`: a ReLU, the residual add, the downsampling
// branch's BatchNorm). Backward: one pass of per-(group, channel) sums of dy and dy * xhat with
// the ReLU mask folded in (`bn_backward_thread`), the per-channel coefficients
// (`bn_backward_finalize_channel`), and one elementwise pass (`bn_backward_input`). Evaluation:
// `bn_apply` with the running statistics' scale and shift.
#pragma once

#include "common.cuh"

namespace moco {

// An input's geometry: n samples of c channels of l values, in `splits` groups.
struct BnShape {
    unsigned n;
    unsigned c;
    unsigned l;
    unsigned splits;
};

MOCO_HD BnShape bn_shape(unsigned n, unsigned c, unsigned l, unsigned splits) {
    BnShape s;
    s.n = n;
    s.c = c;
    s.l = l;
    s.splits = splits;
    return s;
}

// Values per (group, channel).
MOCO_HD unsigned bn_count(BnShape s) { return s.n / s.splits * s.l; }

// The offset of value i (0..bn_count) of (group, channel) `gc` (= group * c + channel).
MOCO_HD size_t bn_offset(BnShape s, unsigned gc, unsigned i) {
    unsigned g = gc / s.c, ch = gc % s.c;
    unsigned k = i / s.l, j = i % s.l;  // the k-th sample of the group, value j of its plane
    size_t sample = (size_t)g + (size_t)k * s.splits;
    return (sample * s.c + ch) * s.l + j;
}

// The (group, channel) of the value at `offset`.
MOCO_HD unsigned bn_group_channel(BnShape s, size_t offset) {
    size_t plane = offset / s.l;
    unsigned ch = (unsigned)(plane % s.c);
    unsigned sample = (unsigned)(plane / s.c);
    return (sample % s.splits) * s.c + ch;
}

// How many parts (blocks) the values of each of `groups_channels` (group, channel) pairs are
// split into for the reductions: enough blocks to fill an H100/H200 (132 SMs) a few times over,
// and at least 8 values per thread. The launch (ops/batch_norm/cuda.rs, through host_check.cpp)
// and the host emulation use this one function.
MOCO_HD unsigned bn_parts(unsigned groups_channels, unsigned count) {
    const unsigned target = 1056;  // 8 blocks per SM
    unsigned want = (target + groups_channels - 1) / groups_channels;
    unsigned most = (count + kBlock * 8 - 1) / (kBlock * 8);
    unsigned p = want < most ? want : most;
    return p < 1 ? 1 : p;
}

// Thread `tid` of `threads` of part `part` of `parts` of (group, channel) `gc`: its values'
// Welford accumulation.
MOCO_HD Welford bn_stats_thread(const float* x, BnShape s, unsigned gc, unsigned part,
                                unsigned parts, unsigned tid, unsigned threads) {
    size_t lo, hi;
    part_range(bn_count(s), part, parts, &lo, &hi);
    Welford w = welford_empty();
    for (size_t i = lo + tid; i < hi; i += threads) welford_add(w, x[bn_offset(s, gc, (unsigned)i)]);
    return w;
}

// Channel `ch`'s statistics from the `parts` partial accumulations of each of its groups
// (partials[(g * c + ch) * parts + p]): per group the mean and 1 / sqrt(biased variance + eps)
// and the output's scale `weight * invstd` and shift `bias - mean * scale` (weight and bias
// null: 1 and 0), indexed g * c + ch; and the running statistics moved towards the mean over
// groups of each group's mean and unbiased variance, `momentum` the weight of the batch's
// (PyTorch's), as PyTorch's `running = (1 - momentum) * running + momentum * batch`.
MOCO_HD void bn_finalize_channel(const Welford* partials, BnShape s, unsigned ch, unsigned parts,
                                 float eps, float momentum, const float* weight,
                                 const float* bias, float* mean, float* invstd, float* scale,
                                 float* shift, float* running_mean, float* running_var) {
    float count = (float)bn_count(s);
    float unbias = count / (count - 1.0f);
    float sum_mean = 0.0f, sum_var = 0.0f;
    for (unsigned g = 0; g < s.splits; ++g) {
        unsigned gc = g * s.c + ch;
        Welford w = welford_empty();
        for (unsigned p = 0; p < parts; ++p) w = welford_merge(w, partials[gc * parts + p]);
        float var = w.m2 / w.n;
        float inv = 1.0f / sqrtf(var + eps);
        float a = weight ? weight[ch] * inv : inv;
        float b = bias ? bias[ch] : 0.0f;
        mean[gc] = w.mean;
        invstd[gc] = inv;
        scale[gc] = a;
        shift[gc] = b - w.mean * a;
        sum_mean += w.mean;
        sum_var += var * unbias;
    }
    float groups = (float)s.splits;
    running_mean[ch] = running_mean[ch] * (1.0f - momentum) + (sum_mean / groups) * momentum;
    running_var[ch] = running_var[ch] * (1.0f - momentum) + (sum_var / groups) * momentum;
}

// What follows the normalisation in the same pass.
enum BnEnd : int {
    kBnNone = 0,
    kBnRelu = 1,
    // relu(y + r): the residual r.
    kBnAddRelu = 2,
    // relu(y + z * scale2 + shift2): the downsampling branch's BatchNorm on z.
    kBnPairAddRelu = 3,
};

// One output value: x * scale + shift, then `end` (`other`: the residual, or the second
// BatchNorm's input with its scale and shift). Each BatchNorm's output is rounded before the
// add, as separate passes would.
MOCO_HD float bn_apply(int end, float x, float scale, float shift, float other, float scale2,
                       float shift2) {
    float y = x * scale + shift;
    switch (end) {
        case kBnRelu:
            return y > 0.0f ? y : 0.0f;
        case kBnAddRelu: {
            float t = y + other;
            return t > 0.0f ? t : 0.0f;
        }
        case kBnPairAddRelu: {
            float t = y + (other * scale2 + shift2);
            return t > 0.0f ? t : 0.0f;
        }
        default:
            return y;
    }
}

// The output gradient through the op's ReLU: `grad` where the op's output `out` is positive
// (out null: no ReLU, the gradient as it is).
MOCO_HD float bn_masked(const float* grad, const float* out, size_t at) {
    float g = grad[at];
    return out == nullptr || out[at] > 0.0f ? g : 0.0f;
}

// Backward, thread `tid` of `threads` of part `part` of (group, channel) `gc`: the sums of dy
// and dy * xhat over its values, xhat = (x - mean) * invstd.
MOCO_HD Sum2 bn_backward_thread(const float* x, const float* grad, const float* out, BnShape s,
                                unsigned gc, unsigned part, unsigned parts, unsigned tid,
                                unsigned threads, float mean, float invstd) {
    size_t lo, hi;
    part_range(bn_count(s), part, parts, &lo, &hi);
    Sum2 acc;
    acc.a = 0.0f;
    acc.b = 0.0f;
    for (size_t i = lo + tid; i < hi; i += threads) {
        size_t at = bn_offset(s, gc, (unsigned)i);
        float dy = bn_masked(grad, out, at);
        acc.a += dy;
        acc.b += dy * ((x[at] - mean) * invstd);
    }
    return acc;
}

// Channel `ch` of the backward: per group the input gradient's coefficients (`k` = weight *
// invstd, `mg` = mean(dy), `mgx` = mean(dy * xhat), indexed g * c + ch) from the partial sums
// (partials[(g * c + ch) * parts + p]), and the weight's and bias's gradients, the sums over
// the groups (`dw`, `db`: sum(dy * xhat), sum(dy)).
MOCO_HD void bn_backward_finalize_channel(const Sum2* partials, BnShape s, unsigned ch,
                                          unsigned parts, const float* weight,
                                          const float* invstd, float* k, float* mg, float* mgx,
                                          float* dw, float* db) {
    float count = (float)bn_count(s);
    float tw = 0.0f, tb = 0.0f;
    for (unsigned g = 0; g < s.splits; ++g) {
        unsigned gc = g * s.c + ch;
        Sum2 t;
        t.a = 0.0f;
        t.b = 0.0f;
        for (unsigned p = 0; p < parts; ++p) t = sum2_merge(t, partials[gc * parts + p]);
        k[gc] = (weight ? weight[ch] : 1.0f) * invstd[gc];
        mg[gc] = t.a / count;
        mgx[gc] = t.b / count;
        tw += t.b;
        tb += t.a;
    }
    dw[ch] = tw;
    db[ch] = tb;
}

// One value of the input gradient: k * (dy - mean(dy) - xhat * mean(dy * xhat)).
MOCO_HD float bn_backward_input(float dy, float x, float mean, float invstd, float k, float mg,
                                float mgx) {
    float xhat = (x - mean) * invstd;
    return k * (dy - mg - xhat * mgx);
}

// Value i of the elementwise pass: y[i] = end(x * scale + shift, other, scale2, shift2), the
// scales and shifts indexed by (group, channel) (other, scale2, shift2 null where `end` does
// not read them).
MOCO_HD void bn_apply_at(size_t i, const float* x, BnShape s, const float* scale,
                         const float* shift, int end, const float* other, const float* scale2,
                         const float* shift2, float* y) {
    unsigned gc = bn_group_channel(s, i);
    float o = other ? other[i] : 0.0f;
    float a2 = scale2 ? scale2[gc] : 0.0f;
    float d2 = shift2 ? shift2[gc] : 0.0f;
    y[i] = bn_apply(end, x[i], scale[gc], shift[gc], o, a2, d2);
}

// What the backward's elementwise pass writes besides dx.
enum BnSecond : int {
    kBnSecondNone = 0,
    // The residual's gradient: dy itself.
    kBnSecondResidual = 1,
    // The downsampling BatchNorm's input gradient.
    kBnSecondPair = 2,
};

// Value i of the backward's elementwise pass: dx[i] from the forward's statistics `stats`
// ([mean, invstd, ...], each splits * c) and the coefficients `coef` ([k, mean(dy),
// mean(dy * xhat)]), and d2[i] as `second` says (z, stats2, coef2: the downsampling
// BatchNorm's input, statistics and coefficients).
MOCO_HD void bn_backward_input_at(size_t i, const float* x, const float* grad, const float* out,
                                  BnShape s, const float* stats, const float* coef, int second,
                                  const float* z, const float* stats2, const float* coef2,
                                  float* dx, float* d2) {
    unsigned gcs = s.splits * s.c;
    unsigned gc = bn_group_channel(s, i);
    float dy = bn_masked(grad, out, i);
    dx[i] = bn_backward_input(dy, x[i], stats[gc], stats[gcs + gc], coef[gc], coef[gcs + gc],
                              coef[2 * gcs + gc]);
    if (second == kBnSecondResidual) {
        d2[i] = dy;
    } else if (second == kBnSecondPair) {
        d2[i] = bn_backward_input(dy, z[i], stats2[gc], stats2[gcs + gc], coef2[gc],
                                  coef2[gcs + gc], coef2[2 * gcs + gc]);
    }
}

}  // namespace moco
