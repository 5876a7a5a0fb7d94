// The small per-layer ops of a decoder layer on the CPU: RMSNorm (with the residual add fused),
// NeoX rotary embedding, SiLU-and-mul and the KV-cache write. Each is one pass over its rows;
// the pure-torch references chain several small ops of a few microseconds each, which is most
// of a small model's one-token step. Numerics follow pagedserve_kernels.reference: fp32
// arithmetic, rounded to the tensors' dtype (bf16, fp16) wherever the reference rounds.
//
// Bad arguments raise ValueError (IndexError for a position or slot out of range).
//
// Rows run in torch's thread pool only when there are many (at::parallel_for runs inline below
// its grain): at one token a parallel region costs more than the work.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <vector>

namespace {

// Elements per parallel chunk: below this many, threads cost more than they save.
constexpr int64_t kGrainElements = 1 << 15;

int64_t row_grain(int64_t row_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements));
}

// `v` rounded to T and widened back: the rounding a torch op in T applies to its result.
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <>
inline float round_to<float>(float v) {
  return v;
}

// exp(x) for x <= 0 as the compiler can vectorize it (std::exp is a libm call): 2^n times a
// degree-7 polynomial on [-ln2/2, ln2/2], within 2 ulp of expf; below -87 it returns
// exp(-87) ~ 1.6e-38 rather than less (a SiLU's value there is ~0 either way). NaN stays NaN.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // (x < -87 ? -87 : x): NaN passes through
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no floor call, which would not vectorize):
  // the sum's low mantissa bits hold n as an integer.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  int32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  const int32_t ni = n_bits - 0x4B400000;
  float r = x - n * 0.693359375f;  // ln 2 split in two, exact high part first
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// SiLU through exp of a non-positive argument only: x * sigmoid(x). Branch-free (both
// sigmoid forms computed, one selected) so that the loop vectorizes.
inline float silu(float x) {
  const float e = exp_nonpositive(-std::fabs(x));  // exp(-|x|)
  const float inv = 1.0f / (1.0f + e);
  const float sig = x >= 0.0f ? inv : e * inv;
  return x * sig;
}

// `t` as [rows, last] with unit stride in the last dim (a view where it can be one).
torch::Tensor as_rows(const torch::Tensor& t) {
  torch::Tensor rows = t.reshape({-1, t.size(-1)});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

void check_cpu(std::initializer_list<const torch::Tensor*> tensors) {
  for (const torch::Tensor* t : tensors) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "the CPU small ops take CPU tensors, got ",
                      t->device());
  }
}

void check_float_dtype(const torch::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, name,
                    " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", st);
  }
}

// out = w * round(h * rsqrt(mean(h^2) + eps)) for one row h (already rounded to T).
template <typename T>
inline void rms_row(const float* h, const T* w, T* out, int64_t n, float eps) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += h[i] * h[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<T>(round_to<T>(h[i] * inv) * static_cast<float>(w[i]));
  }
}

void check_norm_args(const torch::Tensor& x, const torch::Tensor& weight) {
  check_cpu({&x, &weight});
  check_float_dtype(x, "x");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight shape ",
                    weight.sizes(), " does not match x's last dim ", x.size(-1));
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "weight and x must share a dtype");
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  const torch::Tensor x2 = as_rows(x);
  const torch::Tensor w = weight.contiguous();
  torch::Tensor out = torch::empty(x.sizes(), x.options());
  const int64_t rows = x2.size(0), n = x2.size(1), stride = x2.stride(0);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x2.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> h(n);
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = xp + r * stride;
        for (int64_t i = 0; i < n; ++i) h[i] = static_cast<float>(xr[i]);
        rms_row<T>(h.data(), wp, op + r * n, n, static_cast<float>(eps));
      }
    });
  });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> fused_add_rms_norm(const torch::Tensor& x,
                                                            const torch::Tensor& residual,
                                                            const torch::Tensor& weight,
                                                            double eps) {
  check_norm_args(x, weight);
  check_cpu({&residual});
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "residual shape ", residual.sizes(),
                    " does not match x ", x.sizes());
  TORCH_CHECK_VALUE(residual.scalar_type() == x.scalar_type(),
                    "residual and x must share a dtype");
  const torch::Tensor x2 = as_rows(x), r2 = as_rows(residual);
  const torch::Tensor w = weight.contiguous();
  torch::Tensor out = torch::empty(x.sizes(), x.options());
  torch::Tensor summed = torch::empty(x.sizes(), x.options());
  const int64_t rows = x2.size(0), n = x2.size(1);
  const int64_t xs = x2.stride(0), rs = r2.stride(0);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x2.data_ptr<T>();
    const T* rp = r2.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    T* op = out.data_ptr<T>();
    T* sp = summed.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> h(n);
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = xp + r * xs;
        const T* rr = rp + r * rs;
        T* sr = sp + r * n;
        // The sum is rounded to T before the norm: the stored residual and the normed
        // value agree bit for bit, as in the reference.
        for (int64_t i = 0; i < n; ++i) {
          sr[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
          h[i] = static_cast<float>(sr[i]);
        }
        rms_row<T>(h.data(), wp, op + r * n, n, static_cast<float>(eps));
      }
    });
  });
  return {out, summed};
}

namespace {

// Rotates every head of one token of `src` ([heads, dim] with head stride `hs`) into `dst`
// (contiguous [heads, dim]) by cos/sin already rounded to T; each product is rounded to T
// before the sum as the reference (and HF) computes x * cos + rotate_half(x) * sin in T.
template <typename T>
inline void rotate_token(const T* src, int64_t hs, int64_t heads, const float* cos,
                         const float* sin, int64_t half, T* dst) {
  for (int64_t h = 0; h < heads; ++h) {
    const T* s = src + h * hs;
    T* d = dst + h * 2 * half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(s[i]), x2 = static_cast<float>(s[i + half]);
      d[i] = static_cast<T>(round_to<T>(x1 * cos[i]) - round_to<T>(x2 * sin[i]));
      d[i + half] = static_cast<T>(round_to<T>(x2 * cos[i]) + round_to<T>(x1 * sin[i]));
    }
  }
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> rotary_embedding(const torch::Tensor& positions,
                                                          const torch::Tensor& query,
                                                          const torch::Tensor& key,
                                                          const torch::Tensor& cos_sin_cache) {
  check_cpu({&positions, &query, &key, &cos_sin_cache});
  TORCH_CHECK_VALUE(query.dim() == 3 && key.dim() == 3,
                    "query and key must be [tokens, heads, dim]");
  check_float_dtype(query, "query");
  TORCH_CHECK_VALUE(key.scalar_type() == query.scalar_type(), "query and key must share a dtype");
  const int64_t tokens = query.size(0), dim = query.size(2);
  TORCH_CHECK_VALUE(key.size(0) == tokens && key.size(2) == dim, "key shape ", key.sizes(),
                    " does not match query ", query.sizes());
  TORCH_CHECK_VALUE(positions.numel() == tokens, "positions must have one entry per token");
  TORCH_CHECK_VALUE(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt,
                    "positions must be int64 or int32");
  TORCH_CHECK_VALUE(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == dim && dim % 2 == 0,
                    "cos_sin_cache ", cos_sin_cache.sizes(), " must be [max_positions, ", dim,
                    "] with an even head dim");
  const torch::Tensor pos = positions.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t max_pos = cos_sin_cache.size(0);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK_INDEX(pp[t] >= 0 && pp[t] < max_pos, "position ", pp[t],
                      " outside the rotary cache's ", max_pos, " positions");
  }
  // The table is fp32 as built; a model cast to another dtype casts it too, and then only the
  // rows used are widened (exactly: the reference rounds them to that dtype anyway).
  const bool direct = cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.stride(1) == 1;
  const torch::Tensor table =
      direct ? cos_sin_cache : cos_sin_cache.index_select(0, pos).to(at::kFloat).contiguous();
  const torch::Tensor q = query.stride(2) == 1 ? query : query.contiguous();
  const torch::Tensor k = key.stride(2) == 1 ? key : key.contiguous();
  torch::Tensor q_out = torch::empty(query.sizes(), query.options());
  torch::Tensor k_out = torch::empty(key.sizes(), key.options());
  const int64_t half = dim / 2, qh = q.size(1), kh = k.size(1);
  dispatch_float(query.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    T* qo = q_out.data_ptr<T>();
    T* ko = k_out.data_ptr<T>();
    const float* tp = table.data_ptr<float>();
    const int64_t table_stride = table.stride(0);
    at::parallel_for(0, tokens, row_grain((qh + kh) * dim), [&](int64_t begin, int64_t end) {
      std::vector<float> cs(dim);
      for (int64_t t = begin; t < end; ++t) {
        const float* row = tp + (direct ? pp[t] : t) * table_stride;
        for (int64_t i = 0; i < dim; ++i) cs[i] = round_to<T>(row[i]);
        rotate_token<T>(qp + t * q.stride(0), q.stride(1), qh, cs.data(), cs.data() + half, half,
                        qo + t * qh * dim);
        rotate_token<T>(kp + t * k.stride(0), k.stride(1), kh, cs.data(), cs.data() + half, half,
                        ko + t * kh * dim);
      }
    });
  });
  return {q_out, k_out};
}

torch::Tensor silu_and_mul(const torch::Tensor& x) {
  check_cpu({&x});
  check_float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.size(-1) % 2 == 0, "x's last dim ", x.size(-1), " must be even");
  const torch::Tensor x2 = as_rows(x);
  const int64_t rows = x2.size(0), d = x2.size(1) / 2, stride = x2.stride(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d;
  torch::Tensor out = torch::empty(out_shape, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x2.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(2 * d), [&](int64_t begin, int64_t end) {
      std::vector<float> act(d);
      for (int64_t r = begin; r < end; ++r) {
        const T* gate = xp + r * stride;
        const T* up = gate + d;
        T* o = op + r * d;
        // Widen first, then one branch-free loop the compiler vectorizes (exp included).
        for (int64_t i = 0; i < d; ++i) act[i] = static_cast<float>(gate[i]);
        for (int64_t i = 0; i < d; ++i) act[i] = silu(act[i]);
        // The reference rounds silu(gate) to T before the multiply.
        for (int64_t i = 0; i < d; ++i) {
          o[i] = static_cast<T>(round_to<T>(act[i]) * static_cast<float>(up[i]));
        }
      }
    });
  });
  return out;
}

namespace {

template <typename I>
void write_rows(const I* slots, int64_t tokens, int64_t num_slots, const char* k, const char* v,
                int64_t ks, int64_t khs, int64_t vs, int64_t vhs, int64_t heads,
                int64_t row_bytes, char* k_cache, char* v_cache) {
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK_INDEX(slots[t] < num_slots, "slot ", static_cast<int64_t>(slots[t]),
                      " outside the cache's ", num_slots, " slots");
  }
  const int64_t slot_bytes = heads * row_bytes;
  at::parallel_for(0, tokens, row_grain(2 * slot_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // a padding row: nothing to store
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(k_cache + slot * slot_bytes + h * row_bytes, k + t * ks + h * khs, row_bytes);
        std::memcpy(v_cache + slot * slot_bytes + h * row_bytes, v + t * vs + h * vhs, row_bytes);
      }
    }
  });
}

}  // namespace

void reshape_and_cache(const torch::Tensor& key, const torch::Tensor& value,
                       torch::Tensor& kv_cache, const torch::Tensor& slot_mapping) {
  check_cpu({&key, &value, &kv_cache, &slot_mapping});
  TORCH_CHECK_VALUE(kv_cache.dim() == 5 && kv_cache.size(0) == 2, "kv_cache ", kv_cache.sizes(),
                    " must be [2, blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK_VALUE(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  const int64_t heads = kv_cache.size(3), dim = kv_cache.size(4);
  TORCH_CHECK_VALUE(key.dim() == 3 && key.size(1) == heads && key.size(2) == dim &&
                    value.sizes() == key.sizes(),
                    "key ", key.sizes(), " / value ", value.sizes(), " must be [tokens, ", heads,
                    ", ", dim, "]");
  TORCH_CHECK_VALUE(key.scalar_type() == kv_cache.scalar_type() &&
                    value.scalar_type() == kv_cache.scalar_type(),
                    "key, value and kv_cache must share a dtype");
  const int64_t tokens = key.size(0);
  TORCH_CHECK_VALUE(slot_mapping.numel() >= tokens, "slot_mapping shorter than key");
  TORCH_CHECK_VALUE(
      slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt,
      "slot_mapping must be int64 or int32");
  const torch::Tensor k = key.stride(2) == 1 ? key : key.contiguous();
  const torch::Tensor v = value.stride(2) == 1 ? value : value.contiguous();
  const torch::Tensor slots = slot_mapping.reshape({-1}).slice(0, 0, tokens).contiguous();
  const int64_t es = kv_cache.element_size();
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  char* k_cache = static_cast<char*>(kv_cache.data_ptr());
  char* v_cache = k_cache + num_slots * heads * dim * es;
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  if (slots.scalar_type() == at::kLong) {
    write_rows(slots.data_ptr<int64_t>(), tokens, num_slots, kp, vp, k.stride(0) * es,
               k.stride(1) * es, v.stride(0) * es, v.stride(1) * es, heads, dim * es, k_cache,
               v_cache);
  } else {
    write_rows(slots.data_ptr<int32_t>(), tokens, num_slots, kp, vp, k.stride(0) * es,
               k.stride(1) * es, v.stride(0) * es, v.stride(1) * es, heads, dim * es, k_cache,
               v_cache);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (CPU)");
  m.def("fused_add_rms_norm", &fused_add_rms_norm,
        "(rms_norm(x + residual), x + residual) in one pass (CPU)");
  m.def("rotary_embedding", &rotary_embedding, "NeoX rotary on query and key (CPU)");
  m.def("silu_and_mul", &silu_and_mul, "silu(x[..., :d]) * x[..., d:] (CPU)");
  m.def("reshape_and_cache", &reshape_and_cache,
        "stores key/value rows into a model-dtype paged KV cache (CPU)");
}
