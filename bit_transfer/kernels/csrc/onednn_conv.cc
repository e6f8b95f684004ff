// Convolution forward, backward-data and backward-weights on oneDNN 3.x for MindSpore CPU custom
// (aot) ops. Activations are channels-last (N, H, W, C), which oneDNN 3's brgemm convolutions read
// and write as they are (no reorder per call; they run near the FMA peak on AVX2 and AVX-512), or,
// as 5-dim tensors, oneDNN's blocked nChw8c (N, C/8, H, W, 8) (faster on AVX2: activation_block);
// weights stay (O, I, kh, kw) and reach oneDNN's blocked layouts standardised by the conv_ws_*
// kernels, reordered per call (conv_fwd, conv_bwd_*) or packed once (conv_fwd, cfg[3]). MindSpore 2.8
// (its own oneDNN 2.2, plain NCHW) runs every convolution as im2col + GEMM.
// Built with -fvisibility=hidden: only the kernel entry points are exported, and oneDNN (a private
// copy under its own soname, onednn_conv.private_library) is a dependency of this library alone.
#include <oneapi/dnnl/dnnl.hpp>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <omp.h>

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {
using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

engine &cpu() {
  static engine e(engine::kind::cpu, 0);
  return e;
}

// One convolution's shapes, padding and activation layout. cfg = [stride, pad, same, ...]: `same` =
// TF-SAME padding from the input size (the odd pixel after), else `pad` on every side.
struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
  tag act;  // the activations' layout: nhwc, or nChw8c (AVX2 machines; see activation_block)
  std::string key() const {
    std::string k = std::to_string(static_cast<int>(act)) + ":";
    for (const auto *d : {&src, &wei, &strides, &pad_l, &pad_r})
      for (auto v : *d) k += std::to_string(v) + ",";
    return k;
  }
};

// x: the activation's shape, (N, H, W, C) channels-last or (N, C/8, H, W, 8) in oneDNN's blocked
// nChw8c (its 5 dims say so); oneDNN's dims are (N, C, H, W) whatever the layout.
Geometry geometry(const int64_t *x, int ndim, const int64_t *ws, const int32_t *cfg) {
  const int64_t s = cfg[0], p = cfg[1];
  const bool blocked = ndim == 5;
  const int64_t xs[4] = {x[0], blocked ? x[1] * x[4] : x[3], blocked ? x[2] : x[1], blocked ? x[3] : x[2]};
  if (blocked && x[4] != 8) throw std::invalid_argument("blocked activations must have blocks of 8 channels");
  Geometry g;
  g.act = blocked ? tag::nChw8c : tag::nhwc;
  g.src = {xs[0], xs[1], xs[2], xs[3]};
  g.wei = {ws[0], ws[1], ws[2], ws[3]};
  g.strides = {s, s};
  g.dst = {xs[0], ws[0], 0, 0};
  g.pad_l = {p, p};
  g.pad_r = {p, p};
  for (int d = 0; d < 2; ++d) {
    const int64_t size = xs[2 + d], k = ws[2 + d];
    if (cfg[2]) {
      const int64_t total = std::max<int64_t>((size + s - 1) / s * s - s + k - size, 0);
      g.pad_l[d] = total / 2;
      g.pad_r[d] = total - total / 2;
    }
    g.dst[2 + d] = (size + g.pad_l[d] + g.pad_r[d] - k) / s + 1;
  }
  return g;
}

memory::desc plain(const memory::dims &d, tag t) { return memory::desc(d, dt::f32, t); }
memory::desc any(const memory::dims &d) { return memory::desc(d, dt::f32, tag::any); }

primitive_attr user_scratchpad() {
  primitive_attr attr;
  attr.set_scratchpad_mode(scratchpad_mode::user);
  return attr;
}

// Buffers per thread, grown to the largest request and reused (a fresh allocation per call meant
// page faults on ~3x the model's weights every step): slot 0 the blocked copy of a weight (or
// training's Winograd-transformed weight or its gradient), slot 1 oneDNN's scratchpad, slots 2-4
// activations in another layout (Op::execute), 5-6 Winograd's transformed tiles, 7 training's
// Winograd weight gradient before the standardisation's backward. The scratchpad is ours
// (scratchpad_mode::user), not the library's: with the library's, a primitive created in one thread
// failed to run in another ("could not execute a primitive": AVX2's GEMM backward-data, first run
// eagerly, then in MindSpore's graph thread).
void *scratch(size_t bytes, int slot) {
  struct Buffer {
    void *data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  static thread_local Buffer buffers[8];
  Buffer &b = buffers[slot];
  if (bytes > b.size) {
    std::free(b.data);
    b.size = (bytes + 4095) / 4096 * 4096;
    b.data = std::aligned_alloc(64, b.size);
    if (!b.data) {
      b.size = 0;
      throw std::bad_alloc();
    }
  }
  return b.data;
}

// Where element (o, i, h, w) of a weight lives in a oneDNN layout: out[o] + in[(i * kh + h) * kw + w].
// A blocked layout places each index on its own (outer strides, inner blocks), so the offset is a
// sum of one term per dimension. Lets the weight standardisation write (and its backward read)
// oneDNN's blocked layouts directly, in loops the compiler vectorises (gathers / scatters).
struct Offsets {
  std::vector<int64_t> out, in;
  bool padded;  // blocks larger than the dims: the padding must read as zeros
  int64_t ob = 1, ib = 1;  // the innermost block, when it is of output (ob) or input (ib) channels
  explicit Offsets(const memory::desc &md) : padded(md.get_padded_dims() != md.get_dims()) {
    const memory::dims dims = md.get_dims(), strides = md.get_strides();
    const memory::dims blks = md.get_inner_blks(), idxs = md.get_inner_idxs();
    const int n = md.get_inner_nblks();
    if (n && idxs[n - 1] == 0) ob = blks[n - 1];
    if (n && idxs[n - 1] == 1) ib = blks[n - 1];
    std::vector<int64_t> t[4];
    for (int d = 0; d < 4; ++d) {
      int64_t block = 1;
      for (int k = 0; k < n; ++k)
        if (idxs[k] == d) block *= blks[k];
      for (int64_t v = 0; v < dims[d]; ++v) {
        int64_t off = v / block * strides[d], below = 1, inner = 1;
        for (int k = n - 1; k >= 0; --k) {  // innermost block first
          if (idxs[k] == d) {
            off += v / below % blks[k] * inner;
            below *= blks[k];
          }
          inner *= blks[k];
        }
        t[d].push_back(off);
      }
    }
    out = t[0];
    for (auto i : t[1])
      for (auto h : t[2])
        for (auto w : t[3]) in.push_back(i + h + w);
  }
};

// The activation arguments a convolution may take (Op reorders those its primitive runs in another layout).
const int ACTIVATIONS[] = {DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                           DNNL_ARG_DST, DNNL_ARG_DIFF_SRC};
bool is_output(int arg) { return arg == DNNL_ARG_DST || arg == DNNL_ARG_DIFF_SRC; }

// One primitive of geometry g with its activations in the model's layout (g.act, bound as they are,
// unless the primitive runs another: `implemented` below) and its weight (DNNL_ARG_WEIGHTS) or weight
// gradient (DNNL_ARG_DIFF_WEIGHTS) in the blocked layout the primitive chose: the reorder from/to the
// user's OIHW buffer is built once.
struct Op {
  primitive prim;
  int weights_arg;
  memory::desc user, blocked, scratchpad, convert_scratchpad;
  reorder convert;
  bool output;  // the weight gradient: reordered back after the primitive
  Offsets at;   // of the blocked layout
  std::unordered_map<int, memory::desc> relaid;  // activations the primitive runs in another layout

  template <typename PD>
  Op(const PD &pd, int arg, const Geometry &g)
      : prim(pd), weights_arg(arg), user(plain(g.wei, tag::oihw)), blocked(pd.query_md(query::exec_arg_md, arg)),
        scratchpad(pd.scratchpad_desc()), output(arg == DNNL_ARG_DIFF_WEIGHTS), at(blocked) {
    for (int a : ACTIVATIONS) {
      const memory::desc md = pd.query_md(query::exec_arg_md, a);
      if (!md.is_zero() && md != plain(md.get_dims(), g.act)) relaid.emplace(a, md);
    }
    if (user != blocked) {
      auto rpd = output ? reorder::primitive_desc(cpu(), blocked, cpu(), user, user_scratchpad())
                        : reorder::primitive_desc(cpu(), user, cpu(), blocked, user_scratchpad());
      convert = reorder(rpd);
      convert_scratchpad = rpd.scratchpad_desc();
    }
  }

  void reorder_weights(stream &s, memory &from, memory &to) const {
    convert.execute(s, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                        {DNNL_ARG_SCRATCHPAD, memory(convert_scratchpad, cpu(), scratch(convert_scratchpad.get_size(), 1))}});
  }

  // This thread's buffer for the weight (or its gradient) in the blocked layout.
  float *buffer() const { return static_cast<float *>(scratch(blocked.get_size(), 0)); }

  // `weights`: the user's OIHW buffer, or (`packed`) a buffer in the blocked layout (a weight
  // gradient is left there).
  void execute(std::unordered_map<int, memory> args, void *weights, bool packed = false) const {
    stream s(cpu());
    std::vector<std::pair<memory, memory>> back = relayout(s, args);
    memory mine(packed ? blocked : user, cpu(), weights);
    if (!packed && user != blocked) {
      memory tmp(blocked, cpu(), buffer());
      if (!output) reorder_weights(s, mine, tmp);
      mine = tmp;
    }
    args.emplace(weights_arg, mine);
    args.emplace(DNNL_ARG_SCRATCHPAD, memory(scratchpad, cpu(), scratch(scratchpad.get_size(), 1)));
    prim.execute(s, args);
    if (output && !packed && user != blocked) {
      memory mine_back(user, cpu(), weights);
      reorder_weights(s, args.at(weights_arg), mine_back);
    }
    for (auto &[from, to] : back) reorder(from, to).execute(s, from, to);
    s.wait();
  }

 private:
  // The activations the primitive runs in another layout than the model's (none, but where
  // `implemented` fell back) go through this thread's buffers: inputs reordered now; the outputs'
  // (buffer, user memory) pairs returned, to reorder after.
  std::vector<std::pair<memory, memory>> relayout(stream &s, std::unordered_map<int, memory> &args) const {
    std::vector<std::pair<memory, memory>> back;
    int slot = 2;
    for (const auto &[a, md] : relaid) {
      auto bound = args.find(a);
      if (bound == args.end()) continue;
      memory mine(md, cpu(), scratch(md.get_size(), slot++));
      if (is_output(a)) back.emplace_back(mine, bound->second);
      else reorder(bound->second, mine).execute(s, bound->second, mine);
      bound->second = mine;
    }
    return back;
  }
};

// oneDNN's nChw8c kernels do not cover every geometry: where only its reference implementation is
// left (a 3x3 stride-2 convolution from 2x2 to 1x1 pixels: backward-weights 260 ms at micro-batch
// 128 instead of ~1), the primitive runs channels-last and Op reorders the activations around it.
template <typename Make>
auto implemented(Make make, const Geometry &g) -> decltype(make(g.act)) {
  auto pd = make(g.act);
  if (g.act == tag::nhwc || std::strncmp(pd.impl_info_str(), "ref", 3) != 0) return pd;
  return make(tag::nhwc);
}

// oneDNN's first choice on AVX-512 is brgconv, whose kernels block along output rows; for outputs of
// at most 4x4 pixels (R50's last stage at 128 px) its older direct kernels ("jit:avx512_core") run
// forward and backward-data 1.2-1.9x faster (R50x1's shapes, weights cold as in a step, micro-batch
// 8 and 32; at 7x7 the two tie, from 8x8 brgconv wins). Backward-weights keeps the first choice
// (jit_1x1 there already), and so does AVX2, where "jit:avx2" is 1.5-4x slower than brgconv.
template <typename Make>
auto preferred(Make make, const Geometry &g) -> decltype(make()) {
  auto pd = make();
  if (g.dst[2] * g.dst[3] > 16) return pd;
  do {
    if (std::strcmp(pd.impl_info_str(), "jit:avx512_core") == 0) return pd;
  } while (pd.next_impl());
  return make();  // not on this CPU: the first choice (the iteration has moved past it)
}

// The three primitives of one geometry, built on first use and kept (creating one costs ~0.1-1 ms).
struct Convs {
  Geometry g;
  convolution_forward::primitive_desc fwd_pd;
  Op fwd;
  std::unique_ptr<Op> add, data, weights;
  std::once_flag add_once, data_once, weights_once;

  explicit Convs(const Geometry &geo)
      : g(geo),
        fwd_pd(forward_pd(false)),
        fwd(fwd_pd, DNNL_ARG_WEIGHTS, g) {}

  // The forward with the residual added in its epilogue (a binary post-op: no separate pass).
  const Op &forward_add() {
    std::call_once(add_once, [&] { add = std::make_unique<Op>(forward_pd(true), DNNL_ARG_WEIGHTS, g); });
    return *add;
  }
  const Op &backward_data() {
    return backward<convolution_backward_data::primitive_desc>(data_once, data, DNNL_ARG_WEIGHTS);
  }
  const Op &backward_weights() {
    return backward<convolution_backward_weights::primitive_desc>(weights_once, weights, DNNL_ARG_DIFF_WEIGHTS);
  }

 private:
  convolution_forward::primitive_desc forward_pd(bool residual) const {
    auto make = [&](tag t) {
      primitive_attr attr = user_scratchpad();
      if (residual) {
        post_ops ops;
        ops.append_binary(algorithm::binary_add, plain(g.dst, t));
        attr.set_post_ops(ops);
      }
      return convolution_forward::primitive_desc(cpu(), prop_kind::forward_training, algorithm::convolution_direct,
                                                 plain(g.src, t), any(g.wei), plain(g.dst, t), g.strides, g.pad_l,
                                                 g.pad_r, attr);
    };
    return preferred([&] { return implemented(make, g); }, g);
  }

  template <typename PD>
  const Op &backward(std::once_flag &once, std::unique_ptr<Op> &slot, int weights_arg) {
    std::call_once(once, [&] {
      auto make = [&](tag t) {
        return PD(cpu(), algorithm::convolution_direct, plain(g.src, t), any(g.wei), plain(g.dst, t), g.strides,
                  g.pad_l, g.pad_r, fwd_pd, user_scratchpad());
      };
      auto made = [&] { return implemented(make, g); };
      slot = std::make_unique<Op>(weights_arg == DNNL_ARG_WEIGHTS ? preferred(made, g) : made(), weights_arg, g);
    });
    return *slot;
  }
};

// One T (Convs, Winograd) per geometry, built on first use and kept.
template <typename T>
T &per_geometry(const Geometry &g) {
  static std::mutex lock;
  static std::unordered_map<std::string, std::unique_ptr<T>> cache;
  std::lock_guard<std::mutex> hold(lock);
  auto &slot = cache[g.key()];
  if (!slot) slot = std::make_unique<T>(g);
  return *slot;
}

Convs &convs(const Geometry &g) { return per_geometry<Convs>(g); }

memory bind(const Geometry &g, const memory::dims &d, void *data) { return memory(plain(d, g.act), cpu(), data); }

// A forward's activations: x, y and, for the residual variant, r (the binary post-op's input).
std::unordered_map<int, memory> forward_args(const Geometry &g, float *x, float *y, float *r) {
  std::unordered_map<int, memory> args{{DNNL_ARG_SRC, bind(g, g.src, x)}, {DNNL_ARG_DST, bind(g, g.dst, y)}};
  if (r) args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, bind(g, g.dst, r));
  return args;
}

// Inference weights (FoldedConv2d: fixed between refreshes) in the forward's blocked layout, packed
// once per geometry and weight buffer instead of reordered on every call. conv_forget() drops them
// all (FoldedResNetV2.refresh, after it rewrites the weights); a sample of the values, compared on
// every call, repacks a buffer overwritten without a refresh. Shared pointers: a forget while a
// convolution runs frees its copy after it.
struct Packed {
  std::shared_ptr<void> data;
  std::vector<float> sample;
  int64_t bytes = 0;
};
std::mutex packed_lock;
std::unordered_map<std::string, Packed> packed;

std::vector<float> sample_of(const float *w, size_t n) {
  const size_t k = std::min<size_t>(n, 64);
  std::vector<float> out(k);
  for (size_t i = 0; i < k; ++i) out[i] = w[i * (n / k)];
  return out;
}

// A copy of weight w (n floats) made by pack(dst) into `bytes`, kept under `key` and w's address.
template <typename Pack>
std::shared_ptr<void> kept(const std::string &key, const float *w, size_t n, size_t bytes, Pack pack) {
  std::vector<float> sample = sample_of(w, n);
  std::lock_guard<std::mutex> hold(packed_lock);
  Packed &p = packed[key + std::to_string(reinterpret_cast<uintptr_t>(w))];
  const bool same = p.data && std::equal(sample.begin(), sample.end(), p.sample.begin(), p.sample.end(),
                                         [](float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; });
  if (!same) {
    bytes = (bytes + 63) / 64 * 64;
    std::shared_ptr<void> data(std::aligned_alloc(64, bytes), std::free);
    if (!data) throw std::bad_alloc();
    pack(data.get());
    p = {data, sample, static_cast<int64_t>(bytes)};
  }
  return p.data;
}

// `op`'s blocked copy of w (null: the primitive takes OIHW as it is); `key` names the op's geometry.
std::shared_ptr<void> packed_weights(const Op &op, const std::string &key, float *w) {
  if (op.user == op.blocked) return nullptr;
  return kept(key, w, op.user.get_size() / sizeof(float), op.blocked.get_size(), [&](void *to) {
    stream s(cpu());
    memory from(op.user, cpu(), w), dst(op.blocked, cpu(), to);
    op.reorder_weights(s, from, dst);
    s.wait();
  });
}

template <typename F>
int guarded(const char *what, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception &e) {
    std::fprintf(stderr, "bit-transfer %s: %s\n", what, e.what());
    return 1;
  }
}

#define F32(i) static_cast<float *>(params[i])
#define CFG(i) static_cast<const int32_t *>(params[i])

// Winograd F(4x4, 3x3) or F(2x2, 3x3) for packed (inference) weights, below: true where it ran the
// convolution.
bool winograd_fwd(const Geometry &g, const float *x, float *w, float *y);
// The same for training's standardised weights (transformed on every call): the forward,
// backward-data and backward-weights.
bool winograd_ws(const Geometry &g, const float *x, const float *w, const float *mean, const float *rstd, bool flipped,
                 float *y);
bool winograd_ws_data(const Geometry &g, const float *dy, const float *w, const float *mean, const float *rstd,
                      float *dx);
bool winograd_ws_weights(const Geometry &g, const float *dy, const float *x, const float *w, const float *mean,
                         const float *rstd, float *dw);
}  // namespace

// (x (N,H,W,C), w (O,C,kh,kw), [r (N,OH,OW,O),] cfg (4,) int32) -> y (N,OH,OW,O) = conv(x, w) [+ r]
// (or blocked: x (N,C/8,H,W,8), r and y (N,O/8,OH,OW,8)).
// cfg = [stride, pad, same, packed]; `packed`: w is fixed until conv_forget() (inference), so its
// blocked copy is made once and kept.
EXPORT int conv_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4 && nparam != 5) return 1;
  return guarded("conv_fwd", [&] {
    const bool residual = nparam == 5;
    const int32_t *cfg = CFG(nparam - 2);
    const Geometry g = geometry(shapes[0], ndims[0], shapes[1], cfg);
    if (cfg[3] && !residual && winograd_fwd(g, F32(0), F32(1), F32(nparam - 1))) return;
    Convs &c = convs(g);
    const Op &op = residual ? c.forward_add() : c.fwd;
    std::shared_ptr<void> w = cfg[3] ? packed_weights(op, g.key() + (residual ? "+" : ""), F32(1)) : nullptr;
    op.execute(forward_args(g, F32(0), F32(nparam - 1), residual ? F32(2) : nullptr), w ? w.get() : F32(1), w != nullptr);
  });
}

// Drops every packed weight (the next packed convolution packs again).
EXPORT void conv_forget() {
  std::lock_guard<std::mutex> hold(packed_lock);
  packed.clear();
}

// The bytes packed weights hold now (what FoldedResNetV2 costs beyond its parameters).
EXPORT int64_t conv_packed_bytes() {
  std::lock_guard<std::mutex> hold(packed_lock);
  int64_t total = 0;
  for (const auto &entry : packed) total += entry.second.bytes;
  return total;
}

// Weight standardisation (BiT's StdConv2d: w_hat = (w - mean) * rstd per output channel, over its
// I*kh*kw values) fused into the convolutions: the forward writes w_hat straight into the blocked
// layout its primitive reads, backward-data writes it again into its own (from the saved
// statistics), backward-weights reads the blocked weight gradient and writes the raw weight's. No
// standardised OIHW copy, no reorders, no separate ops. Statistics and formulas are cpu_kernels'
// ws_fwd / ws_bwd (SHARED_SOURCE's row_statistics): the same bits as the folded inference weights.
#pragma GCC push_options
#pragma GCC optimize("O3")  // these loops only: the rest binds buffers and calls oneDNN (-O1: 1 s less to build)
#include "common.h"

struct Rows {
  int64_t O, I, K;
  explicit Rows(const memory::dims &w) : O(w[0]), I(w[1]), K(w[1] * w[2] * w[3]) {}
  int threads() const { return ::threads(O * K); }
};

void ws_statistics(const float *w, const Rows &r, float eps, float *mean, float *rstd) {
#pragma omp parallel for num_threads(r.threads()) schedule(static)
  for (int64_t o = 0; o < r.O; ++o) row_statistics(w + o * r.K, r.K, eps, mean + o, rstd + o);
}

// The loops run along the layout's innermost block (contiguous stores and loads): `ob` output
// channels side by side (the forward's and backward-weights' layouts), else `ib` input channels
// (backward-data's), else element by element. A group of ob rows of w stays in L2 meanwhile.
// Writes into `op`'s buffer (its blocked layout) and returns it.
float *standardise_into(const Op &op, const float *w, const Rows &r, const float *mean, const float *rstd) {
  const Offsets &at = op.at;
  float *dst = op.buffer();
  if (at.padded) std::memset(dst, 0, op.blocked.get_size());
  const int64_t *in = at.in.data(), K = r.K, B = at.ob, IB = at.ib, KHW = K / r.I;
#pragma omp parallel for num_threads(r.threads()) schedule(static)
  for (int64_t o0 = 0; o0 < r.O; o0 += B) {
    const int64_t nb = std::min(B, r.O - o0);
    if (B > 1) {  // out[o0 + j] == out[o0] + j
      for (int64_t k = 0; k < K; ++k) {
        const float *wk = w + o0 * K + k;
        float *d = dst + at.out[o0] + in[k];
#pragma omp simd
        for (int64_t j = 0; j < nb; ++j) d[j] = (wk[j * K] - mean[o0 + j]) * rstd[o0 + j];
      }
      continue;
    }
    const float m = mean[o0], a = rstd[o0], *wo = w + o0 * K;
    float *d = dst + at.out[o0];
    for (int64_t hw = 0; hw < KHW; ++hw)
      for (int64_t i0 = 0; i0 < r.I; i0 += IB) {  // in[(i0 + j) * KHW + hw] == in[i0 * KHW + hw] + j
        const int64_t ni = std::min(IB, r.I - i0);
        float *di = d + in[i0 * KHW + hw];
#pragma omp simd
        for (int64_t j = 0; j < ni; ++j) di[j] = (wo[(i0 + j) * KHW + hw] - m) * a;
      }
  }
  return dst;
}

// dw = rstd * (g - mean(g) - w_hat * mean(g * w_hat)) per output channel, g gathered from the
// layout (consecutive channels on one thread read the same cache lines; float sums as cpu_kernels'
// ws_bwd). Along the innermost block, as standardise_into, was 5 % slower here.
void ws_backward(const float *g, const Offsets &at, const float *w, const Rows &r, const float *mean, const float *rstd,
                 float *dw) {
  const int64_t *in = at.in.data();
#pragma omp parallel for num_threads(r.threads()) schedule(static)
  for (int64_t o = 0; o < r.O; ++o) {
    const float m = mean[o], a = rstd[o], *wo = w + o * r.K, *go = g + at.out[o];
    float sg = 0.f, sgx = 0.f;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t k = 0; k < r.K; ++k) {
      const float d = go[in[k]];
      sgx += d * ((wo[k] - m) * a);
      sg += d;
    }
    const float mg = sg / r.K, mgx = sgx / r.K;
    float *dwo = dw + o * r.K;
#pragma omp simd
    for (int64_t k = 0; k < r.K; ++k) dwo[k] = a * go[in[k]] - a * (mg + ((wo[k] - m) * a) * mgx);
  }
}

namespace {
// Winograd F(m x m, 3x3) (Lavin & Gray 2016, "Fast algorithms for convolutional neural networks"):
// y = A^T [(G w G^T) . (B^T d B)] A for every (m + 2) x (m + 2) input tile d and its m x m
// outputs, so (m + 2)^2 products per m x m outputs and channel pair instead of 9 m^2: F(4x4, 3x3) 4x
// fewer, F(2x2, 3x3) 2.25x. The products are one batched GEMM ((m + 2)^2 x (tiles, C) @ (C, O):
// oneDNN's matmul, or panel::gemm for inference on AVX2), the transforms are ours, 8 channels at a
// time in either activation layout.
// F(4x4, 3x3) takes the Toom-Cook points 0, 1, -1, 1/2, -2 (and infinity) instead of the usual
// 0, +-1, +-2: in float32 ~2.5x less rounding error (Barabasz et al. 2020, "Error analysis and
// improving the accuracy of Winograd convolution for deep neural networks"), ~3e-6 of the largest
// output at R50's widths, ~2-3x a direct convolution's; F(2x2, 3x3) (points 0, 1, -1) about a direct
// convolution's. For inference the weights' transform is done once, in float64, and kept like the
// other packed weights ((m + 2)^2 / 9 times the bytes of the 3x3 weight: 4x, 1.8x). Training
// standardises and transforms its weights on every call, in float32, for the forward and for
// backward-data (the transposed convolution: w rotated by 180 degrees, its channels swapped, the
// padding mirrored); its backward-weights is the forward's adjoint (weights_grad: the tiles'
// products summed by a GEMM over the tiles, then G^T dU G), exact as the forward is.
// Tiles per GEMM, about: the transformed tiles (V) and products (M) of 128 tiles stay in L2 between
// the transforms and the GEMM (1.2 MB each at 64 channels). R50's stage 1 at micro-batch 8 (512
// tiles) in one GEMM took 2.0 ms per convolution on AVX2, in 128-tile parts 1.7 (micro-batch 32: 9.1
// -> 6.8 ms; AVX-512 6.6 -> 5.4); 64 tiles were no faster.
constexpr int64_t WINO_ROWS = 128;

// B^T along one dimension of a tile, 8 channels at a time: t[k * s] from d[k * s], k = 0..m + 1.
template <int M>
__attribute__((always_inline)) inline void wino_in(const float (*d)[8], float (*t)[8], int s) {
#pragma omp simd
  for (int j = 0; j < 8; ++j) {
    if constexpr (M == 4) {
      const float d0 = d[0][j], d1 = d[s][j], d2 = d[2 * s][j], d3 = d[3 * s][j], d4 = d[4 * s][j], d5 = d[5 * s][j];
      t[0][j] = d0 - 1.5f * d1 - 2.f * d2 + 1.5f * d3 + d4;
      t[s][j] = -d1 + 0.5f * d2 + 2.5f * d3 + d4;
      t[2 * s][j] = d1 - 2.5f * d2 + 0.5f * d3 + d4;
      t[3 * s][j] = -2.f * d1 - d2 + 2.f * d3 + d4;
      t[4 * s][j] = 0.5f * d1 - d2 - 0.5f * d3 + d4;
      t[5 * s][j] = d1 - 1.5f * d2 - 2.f * d3 + 1.5f * d4 + d5;
    } else {
      const float d0 = d[0][j], d1 = d[s][j], d2 = d[2 * s][j], d3 = d[3 * s][j];
      t[0][j] = d0 - d2;
      t[s][j] = d1 + d2;
      t[2 * s][j] = d2 - d1;
      t[3 * s][j] = d1 - d3;
    }
  }
}

// A^T along one dimension: y[k * so], k = 0..m - 1, from m[k * si], k = 0..m + 1.
template <int M>
__attribute__((always_inline)) inline void wino_out(const float (*m)[8], float (*y)[8], int si, int so) {
#pragma omp simd
  for (int j = 0; j < 8; ++j) {
    if constexpr (M == 4) {
      const float m0 = m[0][j], m1 = m[si][j], m2 = m[2 * si][j], m3 = m[3 * si][j], m4 = m[4 * si][j],
                  m5 = m[5 * si][j];
      const float a = m1 + m2, b = m1 - m2;
      y[0][j] = m0 + a + m3 + m4;
      y[so][j] = b + 0.5f * m3 - 2.f * m4;
      y[2 * so][j] = a + 0.25f * m3 + 4.f * m4;
      y[3 * so][j] = b + 0.125f * m3 - 8.f * m4 + m5;
    } else {
      const float m0 = m[0][j], m1 = m[si][j], m2 = m[2 * si][j], m3 = m[3 * si][j];
      y[0][j] = m0 + m1 + m2;
      y[so][j] = m1 - m2 - m3;
    }
  }
}

// A along one dimension, the adjoint of wino_out (backward-weights' output-gradient tiles): t[k * so],
// k = 0..m + 1, from y[k * si], k = 0..m - 1.
template <int M>
__attribute__((always_inline)) inline void wino_out_adjoint(const float (*y)[8], float (*t)[8], int si, int so) {
#pragma omp simd
  for (int j = 0; j < 8; ++j) {
    if constexpr (M == 4) {
      const float y0 = y[0][j], y1 = y[si][j], y2 = y[2 * si][j], y3 = y[3 * si][j];
      t[0][j] = y0;
      t[so][j] = y0 + y1 + y2 + y3;
      t[2 * so][j] = y0 - y1 + y2 - y3;
      t[3 * so][j] = y0 + 0.5f * y1 + 0.25f * y2 + 0.125f * y3;
      t[4 * so][j] = y0 - 2.f * y1 + 4.f * y2 - 8.f * y3;
      t[5 * so][j] = y3;
    } else {
      const float y0 = y[0][j], y1 = y[si][j];
      t[0][j] = y0;
      t[so][j] = y0 + y1;
      t[2 * so][j] = y0 - y1;
      t[3 * so][j] = -y1;
    }
  }
}

// G of F(m x m, 3x3): (m + 2) x 3, the transform of a kernel's rows and columns (its points, above).
template <int M>
const double (*wino_g())[3] {
  static const double G4[6][3] = {{1, 0, 0}, {1. / 3, 1. / 3, 1. / 3}, {-1. / 3, 1. / 3, -1. / 3},
                                  {-16. / 15, -8. / 15, -4. / 15}, {1. / 15, -2. / 15, 4. / 15}, {0, 0, 1}};
  static const double G2[4][3] = {{1, 0, 0}, {.5, .5, .5}, {.5, -.5, .5}, {0, 0, 1}};
  return M == 4 ? G4 : G2;
}

// wino_g in float32, for training's transforms (made on every call).
template <int M>
struct GFloat {
  float g[M + 2][3];
  GFloat() {
    const double(*G)[3] = wino_g<M>();
    for (int i = 0; i < M + 2; ++i)
      for (int j = 0; j < 3; ++j) g[i][j] = static_cast<float>(G[i][j]);
  }
};

// The Winograd tile (4 or 2 outputs a side) for this convolution, 0 for the direct kernels. Used
// for 3x3 stride-1 convolutions with channels in 8s where the batch has enough tiles: F(4x4, 3x3)
// from 16 tiles (fewer: the GEMM reads 4x the weight bytes for too little work and ran slower than
// oneDNN's direct kernels), else F(2x2, 3x3) from 32 (R50's last stage at micro-batch 8: AVX2
// 4.1 -> 2.0-2.5 ms, AVX-512 3.2 -> 1.6 for the GEMM; at micro-batch 2 it lost on AVX2). Tiles are
// at least half outputs (not a 2x2 or 5x5 map in 4x4 tiles: mostly padding), and the transformed
// weight is at most 64 MB (larger ones, R50x3's and R152x4's last stages, would cost GBs of memory).
// `training` (weights standardised and transformed on every call; forward, backward-data and
// backward-weights): either tile from 64 tiles. Fewer lost to the transform: R50's stage 3 at
// micro-batch 8 (32 tiles of 4x4) 1.9 -> 2.6 ms on AVX-512, stage 4 at 32 (32 tiles) 8.4 -> 21 ms;
// from 64 every R50 geometry won, and the whole R50x1 step (128 px) went 520 -> 481 ms at
// micro-batch 8 and 1728 -> 1502 at 32 on AVX2, 397 -> 386 and 1257 -> 1189 on AVX-512.
// BIT_TRANSFER_WINOGRAD=0: never.
int winograd_tile(const Geometry &g, bool training = false) {
  const char *off = std::getenv("BIT_TRANSFER_WINOGRAD");
  const int64_t O = g.wei[0], C = g.wei[1], OH = g.dst[2], OW = g.dst[3];
  if ((off && std::strcmp(off, "0") == 0) || g.wei[2] != 3 || g.wei[3] != 3 || g.strides[0] != 1 ||
      g.strides[1] != 1 || C % 8 != 0 || O % 8 != 0)
    return 0;
  for (const int m : {4, 2}) {
    const int64_t tiles = (OH + m - 1) / m * ((OW + m - 1) / m);
    const int64_t least = training ? 64 : m == 4 ? 16 : 32;
    if (g.src[0] * tiles >= least && 2 * OH * OW >= m * m * tiles &&
        (m + 2) * (m + 2) * C * O * 4 <= (int64_t{64} << 20))
      return m;
  }
  return 0;
}

// Inference's Winograd GEMM where oneDNN's matmul would be its reference gemm (AVX2 without
// AVX-512): per point (rows, C) @ (C, O), the kept weight in panels of 16 outputs, each (C, 16)
// contiguous, so no call repacks it (oneDNN's gemm packs the weight on every call; at micro-batch 8
// R50's stage 4 multiplies 32 tiles by 16 MB of weight). 6 x 16 register blocks; each panel's
// successor is prefetched, a share per row block (the weight streams from memory). On AVX2, weights
// cold: 16 x (32, 512) @ (512, 512) 124 -> 149 GF/s, 36 x (32, 256) @ (256, 256) 135 -> 157,
// 36 x (128, 128) @ (128, 128) 178 -> 200. On AVX-512 oneDNN's brgemm (blocked weights) was 2-4x
// faster than this code, so it keeps the matmul there.
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr bool PANEL_GEMM = true;
#else
constexpr bool PANEL_GEMM = false;
#endif
namespace panel {
constexpr int W = 8, NR = 16, MR = 6;  // floats per register, outputs per panel, rows per block
typedef float vf __attribute__((vector_size(32), aligned(4)));

int64_t count(int64_t N) { return (N + NR - 1) / NR; }

// w (P, K, N) into panels: P x count(N) blocks of (K, NR), zeros past N.
void pack(const float *w, int64_t P, int64_t K, int64_t N, float *to) {
  const int64_t NP = count(N);
  for (int64_t q = 0; q < P * NP; ++q)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < NR; ++c) {
        const int64_t p = q / NP, n = q % NP * NR + c;
        to[(q * K + k) * NR + c] = n < N ? w[(p * K + k) * N + n] : 0.f;
      }
}

// C (m rows, ncols of ldc) = A (m rows of K) @ one panel; the first `ahead` lines of `next` prefetched.
template <int m>
__attribute__((always_inline)) inline void block(const float *A, int64_t K, const float *panel, float *C, int64_t ldc,
                                                 int64_t ncols, const float *next, int64_t ahead) {
  vf acc[m][2] = {};
  for (int64_t k = 0; k < K; ++k) {
    if (k < ahead) __builtin_prefetch(next + k * NR);
    vf b0, b1;
    std::memcpy(&b0, panel + k * NR, sizeof b0);
    std::memcpy(&b1, panel + k * NR + W, sizeof b1);
    for (int i = 0; i < m; ++i) {
      const float a = A[i * K + k];
      acc[i][0] += a * b0;
      acc[i][1] += a * b1;
    }
  }
  for (int i = 0; i < m; ++i) {
    alignas(32) float out[NR];
    std::memcpy(out, acc[i], sizeof out);
    if (ncols == NR) std::memcpy(C + i * ldc, out, sizeof out);  // a constant size: no call to libc
    else std::memcpy(C + i * ldc, out, ncols * sizeof(float));
  }
}

// All R rows against one panel: blocks of MR, then the rest one row at a time (two instantiations
// of `block`, not MR: the library is built during a first run's start-up).
void rows(const float *A, int64_t R, int64_t K, const float *panel, float *C, int64_t ldc, int64_t ncols, const float *next) {
  const int64_t blocks = R / MR, share = blocks ? (K + blocks - 1) / blocks : 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * share, ahead = next && k0 < K ? std::min(share, K - k0) : 0;
    block<MR>(A + b * MR * K, K, panel, C + b * MR * ldc, ldc, ncols, ahead ? next + k0 * NR : nullptr, ahead);
  }
  for (int64_t i = blocks * MR; i < R; ++i) block<1>(A + i * K, K, panel, C + i * ldc, ldc, ncols, nullptr, 0);
}

// C (P, R, N) = A (P, R, K) @ the panels of B (P, K, N).
void gemm(int64_t P, int64_t R, int64_t K, int64_t N, const float *A, const float *panels, float *C) {
  const int64_t NP = count(N), tasks = P * NP;
#pragma omp parallel for num_threads(threads(P * R * K * N >> 4)) schedule(static)
  for (int64_t q = 0; q < tasks; ++q) {
    const int64_t p = q / NP, j = q % NP;
    rows(A + p * R * K, R, K, panels + q * K * NR, C + p * R * N + j * NR, N, std::min<int64_t>(NR, N - j * NR),
         q + 1 < tasks ? panels + (q + 1) * K * NR : nullptr);
  }
}
}  // namespace panel

// Where channels 8 * cb .. 8 * cb + 7 of pixel (n, h, w) of a (N, C, H, W) activation are, channels-last
// or nChw8c (both keep these 8 side by side): n * image + cb * block + h * row + w * pixel.
struct Strides8 {
  int64_t image, block, row, pixel;
  Strides8(const Geometry &g, const memory::dims &d)
      : image(d[1] * d[2] * d[3]), block(g.act == tag::nChw8c ? d[2] * d[3] * 8 : 8),
        row(g.act == tag::nChw8c ? d[3] * 8 : d[3] * d[1]), pixel(g.act == tag::nChw8c ? 8 : d[1]) {}
};

// The transforms do a few flops and a scattered 32-byte store per value, so they take more threads
// than the shared rule gives: one per 32 K values (a 64-channel map at micro-batch 32: 15.0 -> 12.3 ms
// per convolution on AVX2 with both threads).
int transform_threads(int64_t values) { return threads(values << 3); }

// The GEMM's layout of a transformed weight, as a key: copies are shared by batch sizes that agree.
std::string layout_key(const memory::desc &md) {
  std::string k = "wino:";
  for (const auto &d : {md.get_dims(), md.get_strides(), md.get_inner_blks(), md.get_inner_idxs()})
    for (auto v : d) k += std::to_string(v) + ",";
  return k;
}

// `fresh`: the weights are transformed on every call (training: pack_standardised), so the GEMM reads
// them in the plain (AA, C, O) layout that transform writes. oneDNN's own choice (AVX-512: a blocked
// layout, reordered into on every call) ran R50's stage 3 at micro-batch 32 in 4.6 ms, plain 3.4.
// A constructor argument, not a template one: one copy of the code per tile (the library is built
// during a first run's start-up: 0.4 s more with two).
template <int M>
struct Winograd {
  static constexpr int A = M + 2, AA = A * A;  // input tile side, products per tile and channel pair
  Geometry g;
  int64_t C, O, th, tw, T, rows;  // tiles per image along h and w, in the batch, per GEMM (the last padded)
  memory::desc v, u, m, scratchpad;
  matmul gemm;
  // `fresh` only, backward-weights: dU = V^T dM per point, (C, rows) @ (rows, O), the tiles summed over
  // the parts (the first part writes, the others add: a sum post-op).
  matmul wgemm_first, wgemm_add;
  memory::desc vt, du, wscratchpad;  // its tiles (V read as (AA, C, rows)), its dU (AA, C, O), scratchpad
  bool panels;  // inference on AVX2: panel::gemm on the kept weight in panels, not the matmul
  size_t weight_bytes;  // of the transformed weight the GEMM reads
  std::string weights_key;  // its layout, made once: it names the kept weight copy on every call
  Offsets plain_at{plain(g.wei, tag::oihw)};  // where ws_backward reads weights_grad's plain gradient

  Winograd(const Geometry &geo, bool fresh)
      : g(geo), C(g.wei[1]), O(g.wei[0]), th((g.dst[2] + M - 1) / M), tw((g.dst[3] + M - 1) / M),
        T(g.src[0] * th * tw), panels(PANEL_GEMM && !fresh) {
    const int64_t parts = (T + WINO_ROWS - 1) / WINO_ROWS;
    rows = (T + parts - 1) / parts;  // parts of equal size: the last one pads at most parts - 1 rows
    v = plain({AA, rows, C}, tag::abc);
    m = plain({AA, rows, O}, tag::abc);
    if (panels) {
      weight_bytes = AA * panel::count(O) * C * panel::NR * sizeof(float);
      weights_key = "wino-panels:" + std::to_string(AA) + "," + std::to_string(C) + "," + std::to_string(O);
    } else {
      matmul::primitive_desc pd(cpu(), v, fresh ? plain({AA, C, O}, tag::abc) : any({AA, C, O}), m, user_scratchpad());
      u = pd.weights_desc();
      scratchpad = pd.scratchpad_desc();
      gemm = matmul(pd);
      weight_bytes = u.get_size();
      weights_key = layout_key(u);
    }
    if (fresh) {
      vt = plain({AA, C, rows}, tag::acb), du = plain({AA, C, O}, tag::abc);
      primitive_attr add = user_scratchpad();
      post_ops sum;
      sum.append_sum(1.f);
      add.set_post_ops(sum);
      matmul::primitive_desc first(cpu(), vt, m, du, user_scratchpad()), then(cpu(), vt, m, du, add);
      wgemm_first = matmul(first), wgemm_add = matmul(then);
      wscratchpad = std::max(first.scratchpad_desc(), then.scratchpad_desc(),
                             [](const memory::desc &a, const memory::desc &b) { return a.get_size() < b.get_size(); });
    }
  }

  // G w G^T for every (output, input) channel pair, in float64, into (AA, C, O) and then the GEMM's layout.
  void pack(const float *w, void *to) const {
    const double(*G)[3] = wino_g<M>();
    std::vector<float> plain_u(AA * C * O);
#pragma omp parallel for num_threads(threads(AA * C * O)) schedule(static)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t c = 0; c < C; ++c) {
        const float *k = w + (o * C + c) * 9;
        double gk[A][3];
        for (int i = 0; i < A; ++i)
          for (int j = 0; j < 3; ++j) gk[i][j] = G[i][0] * k[j] + G[i][1] * k[3 + j] + G[i][2] * k[6 + j];
        for (int i = 0; i < A; ++i)
          for (int j = 0; j < A; ++j)
            plain_u[((i * A + j) * C + c) * O + o] =
                static_cast<float>(gk[i][0] * G[j][0] + gk[i][1] * G[j][1] + gk[i][2] * G[j][2]);
      }
    if (panels) return panel::pack(plain_u.data(), AA, C, O, static_cast<float *>(to));
    stream s(cpu());
    memory from(plain({AA, C, O}, tag::abc), cpu(), plain_u.data()), dst(u, cpu(), to);
    reorder(from, dst).execute(s, from, dst);
    s.wait();
  }

  // Training's weights change every step, so their transform is made on every call, in float32 and
  // from the raw weight: G w_hat G^T with w_hat = (w - mean) * rstd (BiT's standardisation), plain
  // (AA, C, O), 8 GEMM outputs side by side. `flipped` (backward-data: this geometry is the
  // transposed convolution's, so its C is w's output channels and its O w's inputs): the kernel
  // rotated by 180 degrees, G rot(w_hat[c][o]) G^T.
  void pack_standardised(const float *w, const float *mean, const float *rstd, bool flipped, float *plain_u) const {
    const GFloat<M> gf;
    const float(*G)[3] = gf.g;
    // 8 input channels at a time for all outputs: each plane's 8 rows are written whole (one 32-byte
    // store per (c, o-block) along c halved its speed: R50's stage 3, 1.2 -> 0.5 ms per call).
#pragma omp parallel for num_threads(transform_threads(AA * C * O)) schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += 8)
      for (int64_t ob = 0; ob < O / 8; ++ob)
        for (int64_t c = c0; c < c0 + 8; ++c) {
          alignas(32) float k[9][8], gk[A][3][8];
          for (int j = 0; j < 8; ++j) {
            const int64_t o = ob * 8 + j, row = flipped ? c : o;
            const float *src = w + (flipped ? c * O + o : o * C + c) * 9;
            const float m = mean[row], a = rstd[row];
            for (int t = 0; t < 9; ++t) k[t][j] = (src[flipped ? 8 - t : t] - m) * a;
          }
          for (int i = 0; i < A; ++i)
            for (int r = 0; r < 3; ++r)
#pragma omp simd
              for (int j = 0; j < 8; ++j) gk[i][r][j] = G[i][0] * k[r][j] + G[i][1] * k[3 + r][j] + G[i][2] * k[6 + r][j];
          for (int i = 0; i < A; ++i)
            for (int jj = 0; jj < A; ++jj) {
              float *dst = plain_u + ((i * A + jj) * C + c) * O + ob * 8;
#pragma omp simd
              for (int j = 0; j < 8; ++j) dst[j] = gk[i][0][j] * G[jj][0] + gk[i][1][j] * G[jj][1] + gk[i][2][j] * G[jj][2];
            }
        }
  }

  // Tile t's image and the output pixel at its top-left corner.
  __attribute__((always_inline)) void origin(int64_t t, int64_t &n, int64_t &h0, int64_t &w0) const {
    n = t / (th * tw), h0 = t / tw % th * M, w0 = t % tw * M;
  }

  // B^T d B of tiles t0 .. t0 + rows into V (AA, rows, C); tiles past the batch are zeros.
  void tiles_in(const float *x, int64_t t0, float *V) const {
    const int64_t CB = C / 8, H = g.src[2], W = g.src[3];
    const Strides8 at(g, g.src);
#pragma omp parallel for collapse(2) num_threads(transform_threads(AA * rows * C)) schedule(static)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t cb = 0; cb < CB; ++cb) {
        alignas(32) float d[AA][8], r[AA][8];
        const int64_t t = t0 + i;
        int64_t n, h0, w0;
        origin(t, n, h0, w0);
        h0 -= g.pad_l[0], w0 -= g.pad_l[1];
        const float *tile = x + n * at.image + cb * at.block + h0 * at.row + w0 * at.pixel;
        const bool inside = t < T && h0 >= 0 && w0 >= 0 && h0 + A <= H && w0 + A <= W;
        for (int a = 0; a < A; ++a)
          for (int b = 0; b < A; ++b) {
            const int64_t h = h0 + a, w = w0 + b;
            if (inside || (t < T && h >= 0 && h < H && w >= 0 && w < W)) std::memcpy(d[a * A + b], tile + a * at.row + b * at.pixel, 32);
            else std::memset(d[a * A + b], 0, 32);
          }
        for (int a = 0; a < A; ++a) wino_in<M>(d + a * A, r + a * A, 1);  // along w
        for (int b = 0; b < A; ++b) wino_in<M>(r + b, d + b, A);          // along h
        for (int a = 0; a < AA; ++a) std::memcpy(V + (a * rows + i) * C + cb * 8, d[a], 32);
      }
  }

  // A^T M A of M (AA, rows, O) into the outputs of tiles t0 .. t0 + rows (inside the map).
  void tiles_out(const float *Mt, int64_t t0, float *y) const {
    const int64_t OB = O / 8, OH = g.dst[2], OW = g.dst[3];
    const Strides8 at(g, g.dst);
#pragma omp parallel for collapse(2) num_threads(transform_threads(AA * rows * O)) schedule(static)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t ob = 0; ob < OB; ++ob) {
        const int64_t t = t0 + i;
        if (t >= T) continue;
        alignas(32) float mt[AA][8], r[A * M][8], q[M * M][8];
        for (int a = 0; a < AA; ++a) std::memcpy(mt[a], Mt + (a * rows + i) * O + ob * 8, 32);
        for (int a = 0; a < A; ++a) wino_out<M>(mt + a * A, r + a * M, 1, 1);  // along w: A -> M
        for (int b = 0; b < M; ++b) wino_out<M>(r + b, q + b, M, M);          // along h
        int64_t n, h0, w0;
        origin(t, n, h0, w0);
        float *tile = y + n * at.image + ob * at.block + h0 * at.row + w0 * at.pixel;
        for (int a = 0; a < M && h0 + a < OH; ++a)
          for (int b = 0; b < M && w0 + b < OW; ++b) std::memcpy(tile + a * at.row + b * at.pixel, q[a * M + b], 32);
      }
  }

  // A dY A^T of the output gradient's tiles t0 .. t0 + rows into (AA, rows, O): tiles_out's adjoint
  // (outputs past the map and tiles past the batch read as zeros).
  void grads_in(const float *dy, int64_t t0, float *Mt) const {
    const int64_t OB = O / 8, OH = g.dst[2], OW = g.dst[3];
    const Strides8 at(g, g.dst);
#pragma omp parallel for collapse(2) num_threads(transform_threads(AA * rows * O)) schedule(static)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t ob = 0; ob < OB; ++ob) {
        alignas(32) float q[M * M][8], r[M * A][8], mt[AA][8];
        const int64_t t = t0 + i;
        int64_t n, h0, w0;
        origin(t, n, h0, w0);
        const float *tile = dy + n * at.image + ob * at.block + h0 * at.row + w0 * at.pixel;
        for (int a = 0; a < M; ++a)
          for (int b = 0; b < M; ++b) {
            if (t < T && h0 + a < OH && w0 + b < OW) std::memcpy(q[a * M + b], tile + a * at.row + b * at.pixel, 32);
            else std::memset(q[a * M + b], 0, 32);
          }
        for (int a = 0; a < M; ++a) wino_out_adjoint<M>(q + a * M, r + a * A, 1, 1);  // along w: M -> A
        for (int b = 0; b < A; ++b) wino_out_adjoint<M>(r + b, mt + b, A, A);          // along h
        for (int a = 0; a < AA; ++a) std::memcpy(Mt + (a * rows + i) * O + ob * 8, mt[a], 32);
      }
  }

  // Backward-weights (`fresh`): the gradient of the standardised weight, plain (O, C, 3, 3), as the
  // forward's adjoint: dU = sum over tiles of (A dY A^T) . (B^T d B), then G^T dU G per channel pair.
  void weights_grad(const float *x, const float *dy, float *dU, float *dw_hat) const {
    float *V = static_cast<float *>(scratch(v.get_size(), 5)), *Mt = static_cast<float *>(scratch(m.get_size(), 6));
    stream s(cpu());
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
      tiles_in(x, t0, V);
      grads_in(dy, t0, Mt);
      (t0 ? wgemm_add : wgemm_first)
          .execute(s, {{DNNL_ARG_SRC, memory(vt, cpu(), V)},
                       {DNNL_ARG_WEIGHTS, memory(m, cpu(), Mt)},
                       {DNNL_ARG_DST, memory(du, cpu(), dU)},
                       {DNNL_ARG_SCRATCHPAD, memory(wscratchpad, cpu(), scratch(wscratchpad.get_size(), 1))}});
      s.wait();
    }
    const GFloat<M> gf;
    const float(*G)[3] = gf.g;
#pragma omp parallel for num_threads(transform_threads(AA * C * O)) schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += 8)
      for (int64_t ob = 0; ob < O / 8; ++ob)
        for (int64_t c = c0; c < c0 + 8; ++c) {
          alignas(32) float gd[3][A][8], k[9][8];  // G^T dU, then (G^T dU) G
          for (int r = 0; r < 3; ++r)
            for (int jj = 0; jj < A; ++jj) {
#pragma omp simd
              for (int j = 0; j < 8; ++j) gd[r][jj][j] = 0.f;
              for (int i = 0; i < A; ++i) {
                const float *d = dU + ((i * A + jj) * C + c) * O + ob * 8;
#pragma omp simd
                for (int j = 0; j < 8; ++j) gd[r][jj][j] += G[i][r] * d[j];
              }
            }
          for (int r = 0; r < 3; ++r)
            for (int q = 0; q < 3; ++q) {
#pragma omp simd
              for (int j = 0; j < 8; ++j) {
                float acc = 0.f;
                for (int jj = 0; jj < A; ++jj) acc += gd[r][jj][j] * G[jj][q];
                k[r * 3 + q][j] = acc;
              }
            }
          for (int j = 0; j < 8; ++j)
            for (int t = 0; t < 9; ++t) dw_hat[((ob * 8 + j) * C + c) * 9 + t] = k[t][j];
        }
  }

  void run(const float *x, const void *U, float *y) const {
    float *V = static_cast<float *>(scratch(v.get_size(), 5)), *Mt = static_cast<float *>(scratch(m.get_size(), 6));
    stream s(cpu());
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
      tiles_in(x, t0, V);
      if (panels) panel::gemm(AA, rows, C, O, V, static_cast<const float *>(U), Mt);
      else gemm.execute(s, {{DNNL_ARG_SRC, memory(v, cpu(), V)}, {DNNL_ARG_WEIGHTS, memory(u, cpu(), const_cast<void *>(U))},
                       {DNNL_ARG_DST, memory(m, cpu(), Mt)},
                       {DNNL_ARG_SCRATCHPAD, memory(scratchpad, cpu(), scratch(scratchpad.get_size(), 1))}});
      s.wait();
      tiles_out(Mt, t0, y);
    }
  }
};

// f(std::integral_constant<int, m>) for tile m (4 or 2): false where m is 0 (the direct kernels).
template <typename F>
bool with_tile(int m, F f) {
  switch (m) {
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    default: return false;
  }
}

// Inference's (weights packed once) and training's (`fresh`) Winograd per geometry, kept apart.
template <int M>
struct PackedWinograd : Winograd<M> {
  explicit PackedWinograd(const Geometry &g) : Winograd<M>(g, false) {}
};
template <int M>
struct FreshWinograd : Winograd<M> {
  explicit FreshWinograd(const Geometry &g) : Winograd<M>(g, true) {}
};

template <int M>
void winograd_run(const Geometry &g, const float *x, float *w, float *y) {
  const Winograd<M> &op = per_geometry<PackedWinograd<M>>(g);
  std::shared_ptr<void> U = kept(op.weights_key, w, op.C * op.O * 9, op.weight_bytes,
                                 [&](void *to) { op.pack(w, to); });
  op.run(x, U.get(), y);
}

// y = conv(x, w standardised), or (`flipped`: g is transposed(w's geometry)) w's backward-data.
template <int M>
void winograd_ws_run(const Geometry &g, const float *x, const float *w, const float *mean, const float *rstd,
                     bool flipped, float *y) {
  const Winograd<M> &op = per_geometry<FreshWinograd<M>>(g);
  float *U = static_cast<float *>(scratch(op.weight_bytes, 0));
  op.pack_standardised(w, mean, rstd, flipped, U);
  op.run(x, U, y);
}

bool winograd_ws(const Geometry &g, const float *x, const float *w, const float *mean, const float *rstd, bool flipped,
                 float *y) {
  return with_tile(winograd_tile(g, true),
                   [&](auto m) { winograd_ws_run<decltype(m)::value>(g, x, w, mean, rstd, flipped, y); });
}

// At stride 1, g's backward-data (dx from dy) is a forward convolution of dy with w rotated
// (pack_standardised's `flipped`), its channels swapped and the padding mirrored: that convolution's
// geometry, or none (a stride; padding wider than the kernel, a crop rather than tiles).
std::optional<Geometry> transposed(const Geometry &g) {
  if (g.strides[0] != 1 || g.strides[1] != 1) return std::nullopt;
  Geometry t = g;
  t.src = g.dst, t.dst = g.src;
  t.wei = {g.wei[1], g.wei[0], g.wei[2], g.wei[3]};
  for (int d = 0; d < 2; ++d) {
    t.pad_l[d] = g.wei[2 + d] - 1 - g.pad_l[d], t.pad_r[d] = g.wei[2 + d] - 1 - g.pad_r[d];
    if (t.pad_l[d] < 0 || t.pad_r[d] < 0) return std::nullopt;
  }
  return t;
}

// Backward-weights of the standardised weight by Winograd where the forward runs it: dw (raw w's).
template <int M>
void winograd_ws_weights_run(const Geometry &g, const float *dy, const float *x, const float *w, const float *mean,
                             const float *rstd, float *dw) {
  const Winograd<M> &op = per_geometry<FreshWinograd<M>>(g);
  float *dU = static_cast<float *>(scratch(op.du.get_size(), 0));
  float *dw_hat = static_cast<float *>(scratch(op.C * op.O * 9 * sizeof(float), 7));
  op.weights_grad(x, dy, dU, dw_hat);
  ws_backward(dw_hat, op.plain_at, w, Rows(g.wei), mean, rstd, dw);
}

bool winograd_ws_weights(const Geometry &g, const float *dy, const float *x, const float *w, const float *mean,
                         const float *rstd, float *dw) {
  return with_tile(winograd_tile(g, true),
                   [&](auto m) { winograd_ws_weights_run<decltype(m)::value>(g, dy, x, w, mean, rstd, dw); });
}

bool winograd_ws_data(const Geometry &g, const float *dy, const float *w, const float *mean, const float *rstd,
                      float *dx) {
  const std::optional<Geometry> t = transposed(g);
  return t && winograd_ws(*t, dy, w, mean, rstd, true, dx);
}

bool winograd_fwd(const Geometry &g, const float *x, float *w, float *y) {
  return with_tile(winograd_tile(g), [&](auto m) { winograd_run<decltype(m)::value>(g, x, w, y); });
}
}  // namespace

#pragma GCC pop_options

// (x, w, [r,] eps (1,), cfg) -> (y, mean (O,), rstd (O,)): y = conv(x, standardised w) [+ r].
EXPORT int conv_ws_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 7 && nparam != 8) return 1;
  return guarded("conv_ws_fwd", [&] {
    const bool residual = nparam == 8;
    const int e = residual ? 3 : 2;  // eps; then cfg, y, mean, rstd
    const Geometry g = geometry(shapes[0], ndims[0], shapes[1], CFG(e + 1));
    const Rows rows(g.wei);
    ws_statistics(F32(1), rows, *F32(e), F32(e + 3), F32(e + 4));
    if (!residual && winograd_ws(g, F32(0), F32(1), F32(e + 3), F32(e + 4), false, F32(e + 2))) return;
    Convs &c = convs(g);
    const Op &op = residual ? c.forward_add() : c.fwd;
    float *blocked = standardise_into(op, F32(1), rows, F32(e + 3), F32(e + 4));
    op.execute(forward_args(g, F32(0), F32(e + 2), residual ? F32(2) : nullptr), blocked, true);
  });
}

// (dy, w, mean, rstd, x (its shape only), cfg) -> dx
EXPORT int conv_ws_bwd_data(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 7) return 1;
  return guarded("conv_ws_bwd_data", [&] {
    const Geometry g = geometry(shapes[4], ndims[4], shapes[1], CFG(5));
    if (winograd_ws_data(g, F32(0), F32(1), F32(2), F32(3), F32(6))) return;
    const Op &op = convs(g).backward_data();
    float *blocked = standardise_into(op, F32(1), Rows(g.wei), F32(2), F32(3));
    op.execute({{DNNL_ARG_DIFF_DST, bind(g, g.dst, F32(0))}, {DNNL_ARG_DIFF_SRC, bind(g, g.src, F32(6))}}, blocked, true);
  });
}

// (dy, x, w, mean, rstd, cfg) -> dw (of the raw weight)
EXPORT int conv_ws_bwd_weights(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 7) return 1;
  return guarded("conv_ws_bwd_weights", [&] {
    const Geometry g = geometry(shapes[1], ndims[1], shapes[2], CFG(5));
    if (winograd_ws_weights(g, F32(0), F32(1), F32(2), F32(3), F32(4), F32(6))) return;
    const Op &op = convs(g).backward_weights();
    float *blocked = op.buffer();
    op.execute({{DNNL_ARG_DIFF_DST, bind(g, g.dst, F32(0))}, {DNNL_ARG_SRC, bind(g, g.src, F32(1))}}, blocked, true);
    ws_backward(blocked, op.at, F32(2), Rows(g.wei), F32(3), F32(4), F32(6));
  });
}

// (dy, w, x (its shape only), cfg) -> dx
EXPORT int conv_bwd_data(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 5) return 1;
  return guarded("conv_bwd_data", [&] {
    const Geometry g = geometry(shapes[2], ndims[2], shapes[1], CFG(3));
    convs(g).backward_data().execute(
        {{DNNL_ARG_DIFF_DST, bind(g, g.dst, F32(0))}, {DNNL_ARG_DIFF_SRC, bind(g, g.src, F32(4))}}, F32(1));
  });
}

// (dy, x, w (its shape only), cfg) -> dw
EXPORT int conv_bwd_weights(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 5) return 1;
  return guarded("conv_bwd_weights", [&] {
    const Geometry g = geometry(shapes[1], ndims[1], shapes[2], CFG(3));
    convs(g).backward_weights().execute(
        {{DNNL_ARG_DIFF_DST, bind(g, g.dst, F32(0))}, {DNNL_ARG_SRC, bind(g, g.src, F32(1))}}, F32(4));
  });
}

// The activation layout to run: 8 (oneDNN's blocked nChw8c) where the best instruction set oneDNN
// uses is AVX2 without AVX-512 (ONEDNN_MAX_CPU_ISA counts), else 0 (channels-last). On AVX2,
// oneDNN 3.2's nChw8c kernels ran R50x1's convolutions 10 % faster than its channels-last ones
// (forward 100 vs 108 ms, backward-data 99 vs 111, backward-weights 109 vs 124: micro-batch 8,
// 128 px, caches cold); on AVX-512 the two were within noise of each other, and channels-last stays.
EXPORT int onednn_activation_block() {
  const int isa = static_cast<int>(get_effective_cpu_isa());
  const int avx2 = dnnl_cpu_isa_avx2, avx512 = dnnl_cpu_isa_avx512_core;
  return (isa & avx2) == avx2 && (isa & avx512) != avx512 ? 8 : 0;
}

// The Winograd tile (4, 2; 0: the direct kernels) conv_ws_fwd (backward_data 0) or conv_ws_bwd_data
// (1) runs for this geometry, x and w shaped as they are.
EXPORT int conv_ws_winograd_tile(const int64_t *x, int ndim, const int64_t *w, const int32_t *cfg, int backward_data) {
  try {
    const Geometry g = geometry(x, ndim, w, cfg);
    if (!backward_data) return winograd_tile(g, true);
    const std::optional<Geometry> t = transposed(g);
    return t ? winograd_tile(*t, true) : 0;
  } catch (const std::exception &) {
    return -1;  // not a geometry these kernels take
  }
}

// The oneDNN this library runs on, as major * 10000 + minor * 100 + patch (the separation test
// checks it is the one compiled against while MindSpore's own answers with its version in the same process).
EXPORT int onednn_version() {
  const dnnl_version_t *v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// The file of the oneDNN this library's calls go to (its dnnl_version, as the loader bound it); ""
// if the loader cannot say.
EXPORT const char *onednn_library() {
  Dl_info info;
  return dladdr(reinterpret_cast<void *>(&dnnl_version), &info) && info.dli_fname ? info.dli_fname : "";
}
