// The three passes of a 2-D convolution (forward, gradient wrt the input, gradient wrt the
// weight) on oneDNN, the library PyTorch's CPU convolutions run on, behind a C interface for
// moco-models' `onednn` feature.
//
// The caller's tensors are plain float32 NCHW / OIHW (GOIHW with groups). Each pass is a oneDNN
// primitive created once per geometry and algorithm with `format_tag::any`, so that oneDNN picks
// its blocked layouts and its JIT kernels: the direct ones PyTorch runs, or, where the caller
// asks and oneDNN has them (3x3, stride 1, AVX-512), the Winograd F(4x4, 3x3) ones; operands are
// reordered into and out of those layouts on every call. The blocked copies and the scratchpad
// live in buffers owned by the calling thread and kept between calls (fresh allocations cost a
// third of a training step in page faults); a user scratchpad also makes concurrent calls from
// several threads safe (data-parallel ranks on threads of one process).

#include <oneapi/dnnl/dnnl.hpp>

// Each call runs on one thread (the Rust side splits the batch over its own threads). With
// oneDNN's OpenMP runtime (Debian's build, the one tested) that is omp_set_num_threads(1) on the
// calling thread; other runtimes keep their defaults. oneDNN fixes a primitive's thread count
// when the primitive is created (its kernels split the work, and size the scratchpad, for the
// thread count of that moment, and run that many threads whatever the caller's setting), so the
// count is set before a plan is made, and plans are kept per thread count.
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#define MOCO_SET_THREADS(n) omp_set_num_threads(n)
#define MOCO_MAX_THREADS() omp_get_max_threads()
#else
#define MOCO_SET_THREADS(n) ((void)(n))
#define MOCO_MAX_THREADS() 0
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

enum Pass { kForward = 0, kGradInput = 1, kGradWeight = 2 };
enum Algorithm { kDirect = 0, kWinograd = 1 };

// n, c, h, w, o, kh, kw, stride, padding, groups
using Geometry = std::array<int64_t, 10>;

dnnl::engine &cpu_engine() {
    static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return engine;
}

// One pass for one geometry: the primitive, the reorders around it and the layouts.
struct Plan {
    dnnl::primitive prim;
    int arg_a = 0, arg_b = 0, arg_out = 0;
    memory::desc user_a, user_b, user_out;  // plain layouts of the caller's buffers
    memory::desc want_a, want_b, want_out;  // the primitive's layouts
    std::optional<dnnl::reorder> into_a, into_b, out_of;
    memory::desc scratch;
    int algorithm = kDirect;
};

memory::desc plain(const memory::dims &d, tag t) { return memory::desc(d, dt::f32, t); }
memory::desc any(const memory::dims &d) { return memory::desc(d, dt::f32, tag::any); }

std::shared_ptr<Plan> make_plan(int pass, const Geometry &g, int algorithm) {
    const auto [n, c, h, w, o, kh, kw, stride, pad, groups] = g;
    const int64_t ho = (h + 2 * pad - kh) / stride + 1;
    const int64_t wo = (w + 2 * pad - kw) / stride + 1;
    const memory::dims xd{n, c, h, w}, yd{n, o, ho, wo};
    const memory::dims wd = groups == 1 ? memory::dims{o, c, kh, kw}
                                        : memory::dims{groups, o / groups, c / groups, kh, kw};
    const tag wtag = groups == 1 ? tag::oihw : tag::goihw;
    const memory::dims strides{stride, stride}, pad_l{pad, pad};
    // Right padding so that the output has exactly ho x wo (may be below `pad` when the last
    // stride does not reach the padded edge).
    const memory::dims pad_r{(ho - 1) * stride + kh - h - pad, (wo - 1) * stride + kw - w - pad};

    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const auto algo = algorithm == kWinograd ? dnnl::algorithm::convolution_winograd
                                             : dnnl::algorithm::convolution_direct;
    auto &eng = cpu_engine();
    dnnl::convolution_forward::desc fd(dnnl::prop_kind::forward_training, algo, any(xd), any(wd),
                                       any(yd), strides, pad_l, pad_r);
    dnnl::convolution_forward::primitive_desc fpd(fd, attr, eng);

    auto plan = std::make_shared<Plan>();
    plan->algorithm = algorithm;
    const auto x_md = plain(xd, tag::nchw), w_md = plain(wd, wtag), y_md = plain(yd, tag::nchw);
    if (pass == kForward) {
        plan->prim = dnnl::convolution_forward(fpd);
        plan->arg_a = DNNL_ARG_SRC, plan->arg_b = DNNL_ARG_WEIGHTS, plan->arg_out = DNNL_ARG_DST;
        plan->user_a = x_md, plan->user_b = w_md, plan->user_out = y_md;
        plan->want_a = fpd.src_desc(), plan->want_b = fpd.weights_desc();
        plan->want_out = fpd.dst_desc(), plan->scratch = fpd.scratchpad_desc();
    } else if (pass == kGradInput) {
        dnnl::convolution_backward_data::desc bd(algo, any(xd), any(wd), any(yd), strides, pad_l,
                                                 pad_r);
        dnnl::convolution_backward_data::primitive_desc pd(bd, attr, eng, fpd);
        plan->prim = dnnl::convolution_backward_data(pd);
        plan->arg_a = DNNL_ARG_DIFF_DST, plan->arg_b = DNNL_ARG_WEIGHTS;
        plan->arg_out = DNNL_ARG_DIFF_SRC;
        plan->user_a = y_md, plan->user_b = w_md, plan->user_out = x_md;
        plan->want_a = pd.diff_dst_desc(), plan->want_b = pd.weights_desc();
        plan->want_out = pd.diff_src_desc(), plan->scratch = pd.scratchpad_desc();
    } else {
        dnnl::convolution_backward_weights::desc bd(algo, any(xd), any(wd), any(yd), strides,
                                                    pad_l, pad_r);
        dnnl::convolution_backward_weights::primitive_desc pd(bd, attr, eng, fpd);
        plan->prim = dnnl::convolution_backward_weights(pd);
        plan->arg_a = DNNL_ARG_SRC, plan->arg_b = DNNL_ARG_DIFF_DST;
        plan->arg_out = DNNL_ARG_DIFF_WEIGHTS;
        plan->user_a = x_md, plan->user_b = y_md, plan->user_out = w_md;
        plan->want_a = pd.src_desc(), plan->want_b = pd.diff_dst_desc();
        plan->want_out = pd.diff_weights_desc(), plan->scratch = pd.scratchpad_desc();
    }
    if (plan->want_a != plan->user_a)
        plan->into_a = dnnl::reorder(dnnl::reorder::primitive_desc(eng, plan->user_a, eng,
                                                                   plan->want_a));
    if (plan->want_b != plan->user_b)
        plan->into_b = dnnl::reorder(dnnl::reorder::primitive_desc(eng, plan->user_b, eng,
                                                                   plan->want_b));
    if (plan->want_out != plan->user_out)
        plan->out_of = dnnl::reorder(dnnl::reorder::primitive_desc(eng, plan->want_out, eng,
                                                                   plan->user_out));
    return plan;
}

// Plans by (pass, algorithm, thread count, geometry); a null plan records one oneDNN has no
// kernel for.
std::mutex plans_lock;
std::map<std::tuple<int, int, int, Geometry>, std::shared_ptr<Plan>> plans;

// The plan of a pass on the geometry at `geometry` (10 values) for `threads` threads (> 0; the
// calling thread's setting is changed to it), made on first use: Winograd's where asked for and
// oneDNN has it, else the direct one; null when oneDNN has neither.
std::shared_ptr<Plan> find_plan(int pass, const int64_t *geometry, int algorithm, int threads) {
    if (pass < kForward || pass > kGradWeight)
        throw std::invalid_argument("unknown convolution pass");
    if (threads < 1) throw std::invalid_argument("thread count below 1");
    MOCO_SET_THREADS(threads);
    const int nthr = MOCO_MAX_THREADS();
    Geometry g;
    std::memcpy(g.data(), geometry, sizeof(g));
    std::lock_guard<std::mutex> guard(plans_lock);
    for (int algo : {algorithm, static_cast<int>(kDirect)}) {
        auto key = std::make_tuple(pass, algo, nthr, g);
        auto found = plans.find(key);
        if (found == plans.end()) {
            std::shared_ptr<Plan> made;
            try {
                made = make_plan(pass, g, algo);
            } catch (const dnnl::error &e) {
                if (e.status != dnnl_unimplemented) throw;
            }
            found = plans.emplace(key, made).first;
        }
        if (found->second) return found->second;
    }
    return nullptr;
}

// A 64-byte aligned buffer that only grows, one per use per calling thread.
class Buffer {
  public:
    Buffer() = default;
    Buffer(const Buffer &) = delete;
    Buffer &operator=(const Buffer &) = delete;
    ~Buffer() { std::free(data_); }
    void *get(size_t bytes) {
        if (bytes > size_) {
            std::free(data_);
            size_ = (bytes + 4095) / 4096 * 4096;
            data_ = std::aligned_alloc(64, size_);
            if (!data_) {
                size_ = 0;
                throw std::bad_alloc();
            }
        }
        return data_;
    }

  private:
    void *data_ = nullptr;
    size_t size_ = 0;
};

struct Buffers {
    Buffer a, b, out, scratch;
};

// A memory object of layout `md` on this thread's `buffer`.
memory on(Buffer &buffer, const memory::desc &md) {
    return memory(md, cpu_engine(), buffer.get(std::max<size_t>(md.get_size(), 1)));
}

void set_error(char *err, size_t err_len, const char *what) {
    if (err && err_len > 0) std::snprintf(err, err_len, "%s", what);
}

}  // namespace

extern "C" {

// The major version of the linked oneDNN.
int moco_onednn_major_version() { return dnnl_version()->major; }

// The algorithm that runs `pass` on `geometry` with `threads` threads when `algorithm` is asked
// for: 0 direct, 1 Winograd, -1 no kernel, -2 an error (message in `err`). Makes the plan if
// needed.
int moco_onednn_plan_algorithm(int pass, const int64_t *geometry, int algorithm, int threads,
                               char *err, size_t err_len) {
    try {
        auto plan = find_plan(pass, geometry, algorithm, threads);
        return plan ? plan->algorithm : -1;
    } catch (const std::exception &e) {
        set_error(err, err_len, e.what());
        return -2;
    }
}

// Returns 0 on success, 1 when oneDNN has no implementation for this geometry (the caller falls
// back to its own kernel), 2 on any other error (message in `err`). `algorithm`: 0 direct,
// 1 Winograd where oneDNN has it for this geometry (else direct). `threads` (>= 1): the OpenMP
// threads the pass runs on (the calling thread's setting is changed to it).
//   forward:     a = x (N,C,H,W), b = w,  out = y
//   grad input:  a = gy,          b = w,  out = gx
//   grad weight: a = x,           b = gy, out = gw
int moco_onednn_conv(int pass, const int64_t *geometry, int algorithm, int threads,
                     const float *a, const float *b, float *out, char *err, size_t err_len) {
    try {
        std::shared_ptr<Plan> plan = find_plan(pass, geometry, algorithm, threads);
        if (!plan) return 1;

        thread_local Buffers buffers;
        auto &eng = cpu_engine();
        dnnl::stream stream(eng);
        memory user_a(plan->user_a, eng, const_cast<float *>(a));
        memory user_b(plan->user_b, eng, const_cast<float *>(b));
        memory user_out(plan->user_out, eng, out);
        memory in_a = user_a, in_b = user_b, res = user_out;
        if (plan->into_a) {
            in_a = on(buffers.a, plan->want_a);
            plan->into_a->execute(stream, user_a, in_a);
        }
        if (plan->into_b) {
            in_b = on(buffers.b, plan->want_b);
            plan->into_b->execute(stream, user_b, in_b);
        }
        if (plan->out_of) res = on(buffers.out, plan->want_out);
        memory scratch = on(buffers.scratch, plan->scratch);
        plan->prim.execute(stream, {{plan->arg_a, in_a},
                                    {plan->arg_b, in_b},
                                    {plan->arg_out, res},
                                    {DNNL_ARG_SCRATCHPAD, scratch}});
        if (plan->out_of) plan->out_of->execute(stream, res, user_out);
        stream.wait();
        return 0;
    } catch (const dnnl::error &e) {
        set_error(err, err_len, e.what());
        return 2;
    } catch (const std::exception &e) {
        set_error(err, err_len, e.what());
        return 2;
    }
}

}  // extern "C"
