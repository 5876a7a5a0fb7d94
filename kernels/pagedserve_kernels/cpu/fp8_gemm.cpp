// FP8 (e4m3) W8A8 matmul for the CPU, reading the weight as its fp8 bytes: each weight row is
// widened to fp32 in a small per-thread buffer (exact, by bit manipulation; vectorizes) and
// multiplied there, while it is in L1, by every activation row; scales apply per K group.
// Tiles of 4 weight rows x 4 activation rows keep 16 independent sums in registers; a single
// activation row (decode at batch 1) widens the weight in registers instead (AVX-512).
//
// x        [M, K]  float32  the activations' fp8 values (unscaled codes, exact in fp32)
// x_scale  [1 or M, G] float32  per tensor / per token / per token and K group
// qweight  [N, K]  uint8    the e4m3 bytes
// w_scale  [N, G]  float32  per channel (G = 1) or per K block, expanded per row
// returns  [M, N]  float32  sum_g x_scale[m, g] * w_scale[n, g] * (x_g . w_g)
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float widen(uint8_t b) {
  const uint32_t c = b & 0x7Fu;
  uint32_t bits = (c << 20) + (120u << 23);
  float v;
  std::memcpy(&v, &bits, sizeof v);
  v = c >= 8u ? v : static_cast<float>(c) * 0x1p-9f;
  v = c == 0x7Fu ? std::numeric_limits<float>::quiet_NaN() : v;
  return (b & 0x80u) ? -v : v;
}

// e4m3fn -> fp32, exact for all 256 codes (0x7F and 0xFF are NaN). Normals (exponent field
// e > 0): the exponent is rebiased by 127 - 7 = 120 and the 3 mantissa bits move to the top of
// fp32's 23; subnormals (e = 0) are m * 2^-9. Intrinsics, because GCC does not vectorize the
// bit casts of the scalar form.
#if defined(__AVX512F__)
inline __m512 widen16(const uint8_t* q) {
  const __m512i low7 = _mm512_set1_epi32(0x7F), sign = _mm512_set1_epi32(0x80);
  const __m512i rebias = _mm512_set1_epi32(120 << 23), eight = _mm512_set1_epi32(8);
  const __m512 sub_unit = _mm512_set1_ps(0x1p-9f);
  const __m512i nan = _mm512_set1_epi32(0x7FC00000);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m512i b = _mm512_cvtepu8_epi32(raw);
  const __m512i c = _mm512_and_si512(b, low7);
  const __m512i normal = _mm512_add_epi32(_mm512_slli_epi32(c, 20), rebias);
  const __m512i sub = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(c), sub_unit));
  __m512i mag = _mm512_mask_blend_epi32(_mm512_cmpge_epi32_mask(c, eight), sub, normal);
  mag = _mm512_mask_mov_epi32(mag, _mm512_cmpeq_epi32_mask(c, low7), nan);
  return _mm512_castsi512_ps(
      _mm512_or_si512(mag, _mm512_slli_epi32(_mm512_and_si512(b, sign), 24)));
}

// One activation row (decode at batch 1) against 4 weight rows at stride k, widened in
// registers: nothing goes through memory but the weight's bytes.
inline void fused_dot4(const float* x, const uint8_t* q, int64_t k, int64_t n, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    a0 = _mm512_fmadd_ps(xv, widen16(q + i), a0);
    a1 = _mm512_fmadd_ps(xv, widen16(q + k + i), a1);
    a2 = _mm512_fmadd_ps(xv, widen16(q + 2 * k + i), a2);
    a3 = _mm512_fmadd_ps(xv, widen16(q + 3 * k + i), a3);
  }
  out[0] = _mm512_reduce_add_ps(a0), out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2), out[3] = _mm512_reduce_add_ps(a3);
  for (; i < n; ++i) {
    for (int64_t r = 0; r < 4; ++r) out[r] += x[i] * widen(q[r * k + i]);
  }
}
#endif

inline void widen_row(const uint8_t* q, float* w, int64_t k) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= k; i += 16) _mm512_storeu_ps(w + i, widen16(q + i));
#elif defined(__AVX2__)
  const __m256i low7 = _mm256_set1_epi32(0x7F), sign = _mm256_set1_epi32(0x80);
  const __m256i rebias = _mm256_set1_epi32(120 << 23), seven = _mm256_set1_epi32(7);
  const __m256 sub_unit = _mm256_set1_ps(0x1p-9f);
  const __m256 nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
  for (; i + 8 <= k; i += 8) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
    const __m256i b = _mm256_cvtepu8_epi32(raw);
    const __m256i c = _mm256_and_si256(b, low7);
    const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(c, 20), rebias));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(c), sub_unit);
    const __m256 is_normal = _mm256_castsi256_ps(_mm256_cmpgt_epi32(c, seven));
    const __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(c, low7));
    const __m256i mag = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_blendv_ps(sub, normal, is_normal), nan, is_nan));
    const __m256i bits = _mm256_or_si256(mag, _mm256_slli_epi32(_mm256_and_si256(b, sign), 24));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i), bits);
  }
#endif
  for (; i < k; ++i) w[i] = widen(q[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// x . w0..w3 at once: x is loaded once, and four independent sums keep the FMA units busy
// (one sum is bound by the FMA latency).
inline void dot4(const float* x, const float* w, int64_t stride, int64_t n, float* out) {
  const float *w0 = w, *w1 = w + stride, *w2 = w + 2 * stride, *w3 = w + 3 * stride;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < n; ++i) {
    a0 += x[i] * w0[i];
    a1 += x[i] * w1[i];
    a2 += x[i] * w2[i];
    a3 += x[i] * w3[i];
  }
  out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

// x0..x3 . w0..w3: 16 sums, each x and w vector loaded once for four FMAs.
inline void dot4x4(const float* x, int64_t xstride, const float* w, int64_t wstride, int64_t n,
                   float* out /* [4 x rows][4 w rows] */) {
  const float *x0 = x, *x1 = x + xstride, *x2 = x + 2 * xstride, *x3 = x + 3 * xstride;
  const float *w0 = w, *w1 = w + wstride, *w2 = w + 2 * wstride, *w3 = w + 3 * wstride;
  float a00 = 0.f, a01 = 0.f, a02 = 0.f, a03 = 0.f, a10 = 0.f, a11 = 0.f, a12 = 0.f, a13 = 0.f;
  float a20 = 0.f, a21 = 0.f, a22 = 0.f, a23 = 0.f, a30 = 0.f, a31 = 0.f, a32 = 0.f, a33 = 0.f;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13) \
    reduction(+ : a20, a21, a22, a23, a30, a31, a32, a33)
  for (int64_t i = 0; i < n; ++i) {
    a00 += x0[i] * w0[i]; a01 += x0[i] * w1[i]; a02 += x0[i] * w2[i]; a03 += x0[i] * w3[i];
    a10 += x1[i] * w0[i]; a11 += x1[i] * w1[i]; a12 += x1[i] * w2[i]; a13 += x1[i] * w3[i];
    a20 += x2[i] * w0[i]; a21 += x2[i] * w1[i]; a22 += x2[i] * w2[i]; a23 += x2[i] * w3[i];
    a30 += x3[i] * w0[i]; a31 += x3[i] * w1[i]; a32 += x3[i] * w2[i]; a33 += x3[i] * w3[i];
  }
  const float sums[16] = {a00, a01, a02, a03, a10, a11, a12, a13,
                          a20, a21, a22, a23, a30, a31, a32, a33};
  std::memcpy(out, sums, sizeof sums);
}

}  // namespace

torch::Tensor fp8_scaled_mm(const torch::Tensor& x, const torch::Tensor& x_scale,
                            const torch::Tensor& qweight, const torch::Tensor& w_scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x");
  TORCH_CHECK(qweight.dtype() == torch::kUInt8 && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight");
  TORCH_CHECK(x_scale.dtype() == torch::kFloat32 && x_scale.is_contiguous(), "x_scale");
  TORCH_CHECK(w_scale.dtype() == torch::kFloat32 && w_scale.is_contiguous(), "w_scale");
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  const int64_t groups = w_scale.size(1), group = k / groups;
  TORCH_CHECK(qweight.size(1) == k && w_scale.size(0) == n && group * groups == k, "shapes");
  TORCH_CHECK(x_scale.size(1) == groups && (x_scale.size(0) == 1 || x_scale.size(0) == m),
              "x_scale shape");
  const int64_t xs_row = x_scale.size(0) == 1 ? 0 : groups;
  auto out = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* xs = x_scale.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float* ws = w_scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kTile = 4;  // weight rows widened and multiplied together
  at::parallel_for(0, (n + kTile - 1) / kTile, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> w(kTile * k);
    float sums[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * kTile, rows = std::min(kTile, n - first);
#if defined(__AVX512F__)
      if (m == 1 && rows == kTile) {
        float acc[kTile] = {};
        for (int64_t g = 0; g < groups; ++g) {
          fused_dot4(xp + g * group, qp + first * k + g * group, k, group, sums);
          for (int64_t r = 0; r < kTile; ++r) {
            acc[r] += xs[g] * ws[(first + r) * groups + g] * sums[r];
          }
        }
        for (int64_t r = 0; r < kTile; ++r) op[first + r] = acc[r];
        continue;
      }
#endif
      for (int64_t r = 0; r < rows; ++r) widen_row(qp + (first + r) * k, w.data() + r * k, k);
      int64_t i = 0;
      if (rows == kTile) {
        float block[kTile * kTile];
        for (; i + kTile <= m; i += kTile) {
          float acc[kTile * kTile] = {};
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t at = g * group;
            dot4x4(xp + i * k + at, k, w.data() + at, k, group, block);
            for (int64_t a = 0; a < kTile; ++a) {
              const float xsg = xs[(i + a) * xs_row + g];
              for (int64_t r = 0; r < kTile; ++r) {
                acc[a * kTile + r] += xsg * ws[(first + r) * groups + g] * block[a * kTile + r];
              }
            }
          }
          for (int64_t a = 0; a < kTile; ++a) {
            for (int64_t r = 0; r < kTile; ++r) op[(i + a) * n + first + r] = acc[a * kTile + r];
          }
        }
      }
      for (; i < m; ++i) {
        const float* xr = xp + i * k;
        const float* xsr = xs + i * xs_row;
        float acc[kTile] = {};
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t at = g * group;
          if (rows == kTile) {
            dot4(xr + at, w.data() + at, k, group, sums);
          } else {
            for (int64_t r = 0; r < rows; ++r) sums[r] = dot(xr + at, w.data() + r * k + at, group);
          }
          for (int64_t r = 0; r < rows; ++r) {
            acc[r] += xsr[g] * ws[(first + r) * groups + g] * sums[r];
          }
        }
        for (int64_t r = 0; r < rows; ++r) op[i * n + first + r] = acc[r];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_scaled_mm", &fp8_scaled_mm, "fp8 e4m3 W8A8 matmul from the weight's bytes (CPU)");
}
