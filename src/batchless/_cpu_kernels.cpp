// One-pass CPU kernels of batchless: built and loaded by batchless/_cpu_kernels.py, chosen by the
// router in batchless/fused.py. The maths is batchless/functional.py's; the tests compare the two.
//
// train:    the training step as one autograd node. Forward: y = x * scale + shift and the
//           per-channel moments a = mean(x_hat), b = mean(x_hat^2) of x_hat = (x - mean) * inv,
//           in one read of x. Backward: gx = gy * scale, gweight = sum(gy * x_hat) and
//           gbias = sum(gy) in one read of gy and x; the NLL gradients of mean and of sigma's
//           parameter.
// eval:     y = x * scale + shift alone, without autograd.
// supports: whether the kernels read these tensors; train and eval require it (the router asks).
// Inputs are float32 or bfloat16 (computed in float32), in one of two layouts: contiguous (N, C, L)
// or "rows" (M, C) with the channel fastest (2-D inputs, channels-last). Sums go through float32
// partial sums of at most a few thousand terms, then float64.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

inline float load(float v) { return v; }
inline float load(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T> inline T store(float f);
template <> inline float store<float>(float f) { return f; }
// Rounds to nearest even; NaN stays NaN.
template <> inline c10::BFloat16 store<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r;
  return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
}

constexpr int64_t kBlock = 1024;     // terms per float32 partial sum (about: see the summing loops)
constexpr int64_t kGrain = 1 << 15;  // elements per thread task, at least

struct Layout {
  bool ok = false, rows = false;
  int64_t outer = 0, C = 0, inner = 1;  // (N, C, L) or (M, C, 1)
};

// (N, C, L) when contiguous with L > 1; (M, C) when dim 1 is the fastest, the others in order.
Layout layout_of(const at::Tensor& t) {
  Layout v;
  if (t.dim() < 2 || t.numel() == 0) return v;
  v.C = t.size(1);
  const int64_t n = t.size(0), L = t.numel() / (n * v.C);
  if (t.dim() > 2 && L > 1 && t.is_contiguous()) {
    v.ok = true, v.outer = n, v.inner = L;
    return v;
  }
  int64_t expected = 1;  // strides of the (0, 2, ..., d-1, 1) permutation, innermost first
  std::vector<int64_t> order{1};
  for (int64_t d = t.dim() - 1; d >= 2; --d) order.push_back(d);
  order.push_back(0);
  for (int64_t d : order) {
    if (t.size(d) != 1 && t.stride(d) != expected) return v;
    expected *= t.size(d);
  }
  v.ok = v.rows = true, v.outer = t.numel() / v.C;
  return v;
}

// Adds s1[0:n], s2[0:n] to d1, d2 and zeroes them.
inline void flush(float* s1, float* s2, int64_t n, double& d1, double& d2) {
  float t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
  for (int64_t i = 0; i < n; ++i) t1 += s1[i], t2 += s2[i];
  d1 += t1, d2 += t2;
  std::fill(s1, s1 + n, 0.f);
  std::fill(s2, s2 + n, 0.f);
}

// Runs body(t, d1, d2) for the tasks t in parallel, d1, d2 the task's zeroed (C,) float64 sums;
// out = their sums over the tasks.
template <typename Body>
void sum_tasks(int64_t tasks, int64_t C, double* out1, double* out2, const Body& body) {
  std::vector<double> p1(tasks * C), p2(tasks * C);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) body(t, p1.data() + t * C, p2.data() + t * C);
  });
  std::fill(out1, out1 + C, 0.0);
  std::fill(out2, out2 + C, 0.0);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t c = 0; c < C; ++c) out1[c] += p1[t * C + c], out2[c] += p2[t * C + c];
}

// Rows shorter than this are summed elementwise, longer ones in registers: bfloat16 rows need more
// elements to pay for the conversions and the horizontal sum.
template <typename T>
constexpr int64_t kShortRow = std::is_same<T, float>::value ? 32 : 256;

// Two channel sums over a (N, C, L) layout; at_channel(c) gives channel c's term(i, t1, t2), which
// handles element i and adds its two terms to t1, t2. Rows of L >= short_row go in memory order, in
// tasks of consecutive rows (as many as threads, unless that leaves less than kGrain elements to
// each), each summed in registers kBlock elements at a time (tasks of channels would read strided:
// BENCHMARKS.md, "Loop order"). Short rows, where the horizontal sum would cost more than the row,
// go a channel at a time into L accumulators (at most max(16, kBlock / L) terms each before
// float64).
template <typename AtChannel>
void channel_sums_ncl(const Layout& v, int64_t short_row, double* out1, double* out2,
                      const AtChannel& at_channel) {
  const int64_t C = v.C, L = v.inner, rows = v.outer * C;
  if (L < short_row) {
    const int64_t rows_per_flush = std::max<int64_t>(16, kBlock / L);
    const int64_t grain = std::max<int64_t>(1, kGrain / (v.outer * L));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      std::vector<float> s1(L), s2(L);
      float* a1 = s1.data();
      float* a2 = s2.data();
      for (int64_t c = c0; c < c1; ++c) {
        const auto term = at_channel(c);
        double d1 = 0, d2 = 0;
        for (int64_t n = 0; n < v.outer; ++n) {
          const int64_t o = (n * C + c) * L;
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) term(o + l, a1[l], a2[l]);
          if ((n + 1) % rows_per_flush == 0 || n + 1 == v.outer) flush(a1, a2, L, d1, d2);
        }
        out1[c] = d1, out2[c] = d2;
      }
    });
    return;
  }
  const int64_t threads = at::get_num_threads();
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(threads, rows * L / kGrain));
  const int64_t rows_per_task = (rows + tasks - 1) / tasks;
  sum_tasks(tasks, C, out1, out2, [&](int64_t t, double* d1, double* d2) {
    for (int64_t q = t * rows_per_task; q < std::min(rows, (t + 1) * rows_per_task); ++q) {
      const int64_t c = q % C;  // row q of the (N * C, L) view
      const auto term = at_channel(c);
      for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
        float s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t l = l0; l < std::min(L, l0 + kBlock); ++l) term(q * L + l, s1, s2);
        d1[c] += s1, d2[c] += s2;
      }
    }
  });
}

// The same over a (M, C) layout, in tasks of consecutive rows (as many as threads, unless that
// leaves less than kGrain elements to each); term(i, c, t1, t2) handles element i, of channel c,
// summed into (C,) float accumulators that go to float64 every kBlock rows (blocks of channels
// would read strided: BENCHMARKS.md, "Loop order").
template <typename Term>
void channel_sums_rows(const Layout& v, double* out1, double* out2, const Term& term) {
  const int64_t C = v.C, M = v.outer, threads = at::get_num_threads();
  const int64_t rows_per_task = std::max((M + threads - 1) / threads, kGrain / C);
  const int64_t tasks = (M + rows_per_task - 1) / rows_per_task;
  sum_tasks(tasks, C, out1, out2, [&](int64_t t, double* d1, double* d2) {
    std::vector<float> s1(C), s2(C);
    float* a1 = s1.data();
    float* a2 = s2.data();
    const int64_t r0 = t * rows_per_task, r1 = std::min(M, r0 + rows_per_task);
    for (int64_t r = r0; r < r1; ++r) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) term(r * C + c, c, a1[c], a2[c]);
      if ((r - r0 + 1) % kBlock == 0 || r + 1 == r1) {
        for (int64_t c = 0; c < C; ++c) d1[c] += a1[c], d2[c] += a2[c], a1[c] = 0.f, a2[c] = 0.f;
      }
    }
  });
}

// The two channel sums of term(i, mean, inv, scale, shift, t1, t2) over layout v, which handles
// element i given its channel's factors (the rows of factors_of) and adds its terms to t1, t2.
template <typename T, typename Term>
void channel_sums(const Layout& v, const float* f, double* out1, double* out2, const Term& term) {
  const float *mean = f, *inv = f + v.C, *scale = f + 2 * v.C, *shift = f + 3 * v.C;
  if (v.rows) {
    channel_sums_rows(v, out1, out2, [&](int64_t i, int64_t c, float& t1, float& t2) {
      term(i, mean[c], inv[c], scale[c], shift[c], t1, t2);
    });
  } else {
    channel_sums_ncl(v, kShortRow<T>, out1, out2, [&](int64_t c) {
      return [term, m = mean[c], iv = inv[c], sc = scale[c], sh = shift[c]](
                 int64_t i, float& t1, float& t2) { term(i, m, iv, sc, sh, t1, t2); };
    });
  }
}

// Forward: y = x * scale + shift; sums of x_hat and x_hat^2, x_hat = (x - mean) * inv.
template <typename T>
void forward_kernel(const Layout& v, const T* x, T* y, const float* f, double* sum1, double* sum2) {
  channel_sums<T>(v, f, sum1, sum2,
                  [x, y](int64_t i, float m, float iv, float sc, float sh, float& t1, float& t2) {
                    const float xv = load(x[i]), h = (xv - m) * iv;
                    t1 += h, t2 += h * h;
                    y[i] = store<T>(xv * sc + sh);
                  });
}

// Backward: gx = gy * scale; sums of gy * x_hat and gy.
template <typename T>
void backward_kernel(const Layout& v, const T* gy, const T* x, T* gx, const float* f,
                     double* gweight, double* gbias) {
  channel_sums<T>(v, f, gweight, gbias,
                  [gy, x, gx](int64_t i, float m, float iv, float sc, float, float& t1, float& t2) {
                    const float g = load(gy[i]);
                    t1 += g * ((load(x[i]) - m) * iv), t2 += g;
                    gx[i] = store<T>(g * sc);
                  });
}

// Evaluation: y = x * scale + shift, nothing else.
template <typename T>
void affine_kernel(const Layout& v, const T* x, T* y, const float* scale, const float* shift) {
  const int64_t C = v.C, L = v.inner;
  if (v.rows) {
    at::parallel_for(0, v.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          y[r * C + c] = store<T>(load(x[r * C + c]) * scale[c] + shift[c]);
      }
    });
  } else {
    at::parallel_for(0, v.outer * C, std::max<int64_t>(1, kGrain / L), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {  // row q of the (N * C, L) view, channel q % C
        const float sc = scale[q % C], sh = shift[q % C];
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) y[q * L + l] = store<T>(load(x[q * L + l]) * sc + sh);
      }
    });
  }
}

// Plain CPU memory of a supported element type (not a batched or storage-less tensor, as under
// torch.func or is_grads_batched, nor a lazily negated view).
bool plain(const at::Tensor& x) {
  const auto type = x.scalar_type();
  return x.device().is_cpu() && (type == at::kFloat || type == at::kBFloat16) && x.has_storage() &&
         !x.is_neg();
}

// Whether train and eval take these tensors: x plain, in one of the layouts; the per-channel
// tensors, which the kernels read directly, floating point on the CPU, 1-D with C elements (mean
// and std also a single element, 0-dim or (1,): shared). Anything else takes another route, whose
// errors say what is wrong (a CPU input for a model on the GPU, a (2,) mean for 4 channels).
bool supports(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std_,
              const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  const Layout v = layout_of(x);
  const auto ok = [C = v.C](const at::Tensor& t, bool shared) {
    return t.device().is_cpu() && c10::isFloatingType(t.scalar_type()) &&
           ((t.dim() == 1 && t.numel() == C) || (shared && t.dim() <= 1 && t.numel() == 1));
  };
  return v.ok && plain(x) && ok(mean, true) && ok(std_, true) && (!weight || ok(*weight, false)) &&
         (!bias || ok(*bias, false));
}

template <typename F>
void dispatch(const at::Tensor& x, const F& f) {  // f(T{}) for the supported element types
  x.scalar_type() == at::kFloat ? f(float{}) : f(c10::BFloat16{});
}

at::Tensor as_float(const at::Tensor& t) {  // t itself when it is contiguous float32
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  return t.detach().to(at::kFloat).contiguous();
}

// The per-channel factors as one (5, C) float32 tensor, rows: mean, inv = 1 / std, scale = weight /
// std, shift = bias - mean * scale, and d std / d (the std argument), gain included; sigma is
// batchless.functional.std_from_param of the std argument, mu mean_from_param of the mean argument
// (mean_gain times it). mean and std are (C,) or shared (1,);
// one plain loop, as a handful of ATen calls on (C,) vectors costs more than the whole layer on
// small inputs.
at::Tensor factors_of(const at::Tensor& mean, const at::Tensor& std_, const std::string& std_param,
                      double eps, double gain, double mean_gain,
                      const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, int64_t C) {
  const bool is_log = std_param == "log", is_abs = std_param == "abs", is_inv = std_param == "inv";
  TORCH_CHECK(is_log || is_abs || is_inv || std_param == "std", "batchless: unknown std_param '",
              std_param, "'");
  const at::Tensor m = as_float(mean), s = as_float(std_);
  const at::Tensor w = weight ? as_float(*weight) : at::Tensor();
  const at::Tensor b = bias ? as_float(*bias) : at::Tensor();
  const float *mp = m.data_ptr<float>(), *sp = s.data_ptr<float>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const bool m1 = m.numel() != C, s1 = s.numel() != C;
  const float e = static_cast<float>(eps), g = static_cast<float>(gain);
  const float h = static_cast<float>(mean_gain);
  auto f = at::empty({5, C}, m.options());
  float* fp = f.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    // (as float32 torch computes raw * gain; exact at a gain of 1)
    const float mu = h * mp[m1 ? 0 : c], raw = g * sp[s1 ? 0 : c];
    const float sign = raw > 0 ? 1.f : (raw < 0 ? -1.f : 0.f);
    float sd = raw, d = 1.f;
    if (is_log) sd = std::exp(raw), d = sd;
    if (is_abs) sd = std::fabs(raw) + e, d = sign;
    if (is_inv) sd = 1.f / (std::fabs(raw) + e), d = -sign * sd * sd;
    const float inv = 1.f / sd, scale = wp ? wp[c] * inv : inv;
    fp[c] = mu, fp[C + c] = inv, fp[2 * C + c] = scale;
    fp[3 * C + c] = (bp ? bp[c] : 0.f) - mu * scale, fp[4 * C + c] = d * g;
  }
  return f;
}

// Evaluation forward, y = (x - mean) / std * weight + bias, without autograd.
at::Tensor batchless_eval(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std_,
                          const std::string& std_param, double eps, double gain, double mean_gain,
                          const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(supports(x, mean, std_, weight, bias), "batchless: eval: unsupported tensors");
  const Layout v = layout_of(x);
  const auto f = factors_of(mean, std_, std_param, eps, gain, mean_gain, weight, bias, v.C);
  const float* fp = f.data_ptr<float>();
  auto y = at::empty_like(x);
  dispatch(x, [&](auto zero) {
    using T = decltype(zero);
    affine_kernel<T>(v, x.data_ptr<T>(), y.data_ptr<T>(), fp + 2 * v.C, fp + 3 * v.C);
  });
  return y;
}

// The training forward: (y, a, b, finite) for the factors f of factors_of; finite is undefined when
// every channel is, else a channel's a = 0, b = 1 where it is not (such channels add no NLL).
std::vector<at::Tensor> forward_with(const at::Tensor& x, const Layout& v, const at::Tensor& f) {
  const int64_t C = v.C;
  const float* fp = f.data_ptr<float>();
  auto y = at::empty_like(x);
  std::vector<double> sum1(C), sum2(C);
  dispatch(x, [&](auto zero) {
    using T = decltype(zero);
    forward_kernel<T>(v, x.data_ptr<T>(), y.data_ptr<T>(), fp, sum1.data(), sum2.data());
  });
  auto a = at::empty({C}, f.options()), b = at::empty({C}, f.options());
  float* ap = a.data_ptr<float>();
  float* bp = b.data_ptr<float>();
  const double n = static_cast<double>(v.outer * v.inner);
  bool all_finite = true;
  for (int64_t c = 0; c < C; ++c) {
    ap[c] = static_cast<float>(sum1[c] / n), bp[c] = static_cast<float>(sum2[c] / n);
    all_finite = all_finite && std::isfinite(ap[c]) && std::isfinite(bp[c]);
  }
  at::Tensor finite;
  if (!all_finite) {
    finite = at::isfinite(a).logical_and_(at::isfinite(b));
    a = a.where(finite, 0.0), b = b.where(finite, 1.0);
  }
  return {y, a, b, finite};
}

// (gx, gweight, gbias) by the kernel, the last two in float32; x and gy in the same layout v.
std::vector<at::Tensor> backward_with(const at::Tensor& gy, const at::Tensor& x, const Layout& v,
                                      const float* f) {
  auto gx = at::empty_like(x);
  std::vector<double> gweight(v.C), gbias(v.C);
  dispatch(x, [&](auto zero) {
    using T = decltype(zero);
    backward_kernel<T>(v, gy.data_ptr<T>(), x.data_ptr<T>(), gx.data_ptr<T>(), f, gweight.data(),
                       gbias.data());
  });
  auto gw = at::empty({v.C}, x.options().dtype(at::kFloat)), gb = at::empty({v.C}, gw.options());
  std::copy(gweight.begin(), gweight.end(), gw.data_ptr<float>());
  std::copy(gbias.begin(), gbias.end(), gb.data_ptr<float>());
  return {gx, gw, gb};
}

// (gx, gweight, gbias) by batchless.functional.output_grads, the formula itself as differentiable
// ops: for a backward that records a graph (double backward), batched gradients, and an x the
// kernel cannot read (a saved-tensor hook gave it back in another layout).
std::vector<at::Tensor> formula_backward(const at::Tensor& gy, const at::Tensor& x,
                                         const at::Tensor& f, const at::Tensor& weight) {
  pybind11::gil_scoped_acquire gil;
  const auto formula = pybind11::module_::import("batchless.functional").attr("output_grads");
  const auto w = weight.defined() ? pybind11::cast(weight) : pybind11::none();
  return formula(gy, x, f[0], f[1], w).cast<std::vector<at::Tensor>>();
}

// The training step as one autograd node, for a float NLL weight (or none: explicit mode, or the
// weight is read at backward time by the caller); the parametrizations of mu and sigma (gains
// included) are inside the node too. Gradients: x, weight, bias by the kernel above (the gradient
// copied into x's layout when it arrives in another); the mean and std arguments: nll_weight * dNLL,
// dNLL/d(mu, std) = (-a, 1 - b) / (C std) (batchless.functional.nll_grads), chained through
// mean_gain and d std / d (the std argument), and summed over channels for a shared Gaussian. Mean
// and std are constants in the output, and the NLL gradient is one in double backward.
struct Train : public torch::autograd::Function<Train> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean,
      const at::Tensor& std_, const std::string& std_param, double eps, double gain,
      double mean_gain, const c10::optional<at::Tensor>& weight,
      const c10::optional<at::Tensor>& bias, c10::optional<double> nll_weight) {
    const Layout v = layout_of(x);
    const auto f = factors_of(mean, std_, std_param, eps, gain, mean_gain, weight, bias, v.C);
    auto out = forward_with(x, v, f);  // y, a, b, finite (an output: empty, not undefined)
    if (!out[3].defined()) out[3] = at::empty({0}, x.options().dtype(at::kBool));
    ctx->save_for_backward({x, weight ? *weight : at::Tensor()});
    auto& data = ctx->saved_data;
    data["f"] = f, data["a"] = out[1], data["b"] = out[2];  // intermediates: no version counter
    data["nll_weight"] = nll_weight ? *nll_weight : -1.0;
    data["mean_gain"] = mean_gain;
    data["shared"] = std::vector<bool>{mean.numel() != v.C, std_.numel() != v.C};
    if (bias) data["bias_dtype"] = bias->scalar_type();  // (absent: no bias, no gradient)
    ctx->mark_non_differentiable({out[1], out[2], out[3]});
    ctx->set_materialize_grads(false);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &gy = grads[0];
    auto& data = ctx->saved_data;
    const at::Tensor f = data["f"].toTensor();
    const int64_t C = f.size(1);
    const float* fp = f.data_ptr<float>();
    at::Tensor gx, gmean, gstd, gweight, gbias;
    if (gy.defined()) {
      const Layout v = layout_of(x);
      std::vector<at::Tensor> out;
      if (at::GradMode::is_enabled() || !v.ok || !plain(x) || !gy.has_storage()) {
        out = formula_backward(gy, x, f, weight);
      } else {
        const Layout g = layout_of(gy);
        const bool same = g.ok && g.rows == v.rows && gy.scalar_type() == x.scalar_type() &&
                          plain(gy);
        out = backward_with(same ? gy : at::empty_like(x).copy_(gy), x, v, fp);
      }
      gx = out[0];  // a gradient for each parameter given, in its dtype
      gweight = weight.defined() ? out[1].to(weight.scalar_type()) : at::Tensor();
      if (data.count("bias_dtype")) gbias = out[2].to(data["bias_dtype"].toScalarType());
    }
    const double nll_weight = data["nll_weight"].toDouble();
    if (nll_weight >= 0) {
      const auto shared = data["shared"].toBoolList();
      const float* ap = data["a"].toTensor().data_ptr<float>();
      const float* bp = data["b"].toTensor().data_ptr<float>();
      gmean = at::empty({shared[0] ? 1 : C}, f.options());
      gstd = at::empty({shared[1] ? 1 : C}, f.options());
      float *gm = gmean.data_ptr<float>(), *gs = gstd.data_ptr<float>(), sum_m = 0.f, sum_s = 0.f;
      const float h = static_cast<float>(data["mean_gain"].toDouble());
      for (int64_t c = 0; c < C; ++c) {
        const float k = fp[C + c] * static_cast<float>(nll_weight / C);
        const float m = -ap[c] * k * h, s = (1.f - bp[c]) * k * fp[4 * C + c];
        if (shared[0]) sum_m += m; else gm[c] = m;  // a shared (1,) Gaussian: the sum over channels
        if (shared[1]) sum_s += s; else gs[c] = s;
      }
      if (shared[0]) gm[0] = sum_m;
      if (shared[1]) gs[0] = sum_s;
    }
    // (no gradient for std_param, eps, the gains and nll_weight)
    return {gx, gmean, gstd, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), gweight, gbias,
            at::Tensor()};
  }
};

// train(x, mean, std, std_param, eps, gain, mean_gain, weight, bias, nll_weight) -> [y, a, b,
// finite] through the Train node; finite is None when every channel is finite.
torch::autograd::variable_list train(const at::Tensor& x, const at::Tensor& mean,
                                     const at::Tensor& std_, const std::string& std_param,
                                     double eps, double gain, double mean_gain,
                                     const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     c10::optional<double> nll_weight) {
  TORCH_CHECK(supports(x, mean, std_, weight, bias), "batchless: train: unsupported tensors");
  auto out = Train::apply(x, mean, std_, std_param, eps, gain, mean_gain, weight, bias, nll_weight);
  if (out[3].numel() == 0) out[3] = at::Tensor();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supports", &supports, "Whether train and eval take these tensors");
  m.def("train", &train, "Training step as one autograd node: [y, a, b, finite]");
  m.def("eval", &batchless_eval, "Evaluation forward without autograd: y");
}
