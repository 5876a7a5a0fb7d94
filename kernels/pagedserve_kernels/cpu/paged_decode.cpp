// Paged decode attention for the CPU: each decode row reads its request's keys and values once,
// straight from the cache blocks, for all the query heads that share a KV head (GQA).
//
// query        [num_rows, num_heads, head_dim]               float32, rows = decode tokens
// kv_cache     [2, num_blocks, block_size, num_kv_heads, head_dim]  float32, contiguous; or
//              float8_e4m3fn / float8_e5m2 holding x / k_scale and x / v_scale (an fp8 cache)
// seq_lens     [num_rows] int32   context length of each row (its own token included)
// block_table  [num_rows, width] int32 (any row stride)
// out          [num_rows, num_heads, head_dim]               float32
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// Every fp8 byte's value, so that a cache row converts by table lookups.
template <typename Fp8>
std::array<float, 256> fp8_table() {
  std::array<float, 256> table{};
  for (int b = 0; b < 256; ++b) {
    table[b] = static_cast<float>(Fp8(static_cast<uint8_t>(b), Fp8::from_bits()));
  }
  return table;
}

// A cache row as floats: the row itself for a float32 cache, else converted into `buf`.
struct RowReader {
  const float* table;  // nullptr: a float32 cache
  const char* base;
  const float* row(int64_t offset, float* buf, int64_t n) const {
    if (table == nullptr) return reinterpret_cast<const float*>(base) + offset;
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) buf[i] = table[bytes[i]];
    return buf;
  }
};

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

void paged_decode(const torch::Tensor& query, const torch::Tensor& kv_cache,
                  const torch::Tensor& seq_lens, const torch::Tensor& block_table, double scale,
                  torch::Tensor& out, double k_scale, double v_scale) {
  static const std::array<float, 256> e4m3 = fp8_table<c10::Float8_e4m3fn>();
  static const std::array<float, 256> e5m2 = fp8_table<c10::Float8_e5m2>();
  const float* fp8_values = nullptr;
  if (kv_cache.scalar_type() == at::ScalarType::Float8_e4m3fn) {
    fp8_values = e4m3.data();
  } else if (kv_cache.scalar_type() == at::ScalarType::Float8_e5m2) {
    fp8_values = e5m2.data();
  } else {
    TORCH_CHECK(kv_cache.dtype() == torch::kFloat32, "paged_decode takes a float32 or fp8 cache");
    k_scale = v_scale = 1.0;  // the scales belong to an fp8 cache only
  }
  TORCH_CHECK(query.dtype() == torch::kFloat32 && out.dtype() == torch::kFloat32,
              "paged_decode takes float32 queries");
  TORCH_CHECK(query.is_contiguous() && kv_cache.is_contiguous() && out.is_contiguous(),
              "paged_decode needs contiguous query, cache and output");
  TORCH_CHECK(seq_lens.dtype() == torch::kInt32 && block_table.dtype() == torch::kInt32,
              "seq_lens and block_table must be int32");
  TORCH_CHECK(block_table.stride(1) == 1, "block_table must be contiguous in its last dim");
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2);
  const int64_t kv_heads = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == dim && heads % kv_heads == 0, "shape mismatch");
  const int64_t group = heads / kv_heads;
  const float* q = query.data_ptr<float>();
  const RowReader k_cache{fp8_values, static_cast<const char*>(kv_cache.data_ptr())};
  const RowReader v_cache{
      fp8_values, k_cache.base + num_blocks * block_size * kv_heads * dim * kv_cache.element_size()};
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t table_stride = block_table.stride(0);
  float* o = out.data_ptr<float>();
  const int64_t token_stride = kv_heads * dim, block_stride = block_size * token_stride;
  // An fp8 cache is read as x * k_scale, x * v_scale: k's scale joins the softmax scale, v's
  // multiplies the output once.
  const float fscale = static_cast<float>(scale * k_scale);
  const float out_scale = static_cast<float>(v_scale);

  // One task per (row, kv head): it owns `group` query heads and one pass over the context.
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> row_buf(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / kv_heads, h = task % kv_heads;
      const int64_t len = lens[row];
      const int32_t* blocks = table + row * table_stride;
      const float* q_row = q + (row * heads + h * group) * dim;
      float* o_row = o + (row * heads + h * group) * dim;
      std::fill(o_row, o_row + group * dim, 0.f);
      if (len <= 0) continue;
      scores.resize(group * len);
      for (int64_t p = 0; p < len; ++p) {
        const float* k = k_cache.row(blocks[p / block_size] * block_stride +
                                     (p % block_size) * token_stride + h * dim,
                                     row_buf.data(), dim);
        for (int64_t g = 0; g < group; ++g) scores[g * len + p] = dot(q_row + g * dim, k, dim) * fscale;
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        float max_score = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < len; ++p) max_score = std::max(max_score, s[p]);
        // Separate loops so that the compiler vectorizes exp (libmvec) and the sum.
        for (int64_t p = 0; p < len; ++p) s[p] = std::exp(s[p] - max_score);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t p = 0; p < len; ++p) total += s[p];
        const float inv = out_scale / total;
        for (int64_t p = 0; p < len; ++p) s[p] *= inv;
      }
      for (int64_t p = 0; p < len; ++p) {
        const float* v = v_cache.row(blocks[p / block_size] * block_stride +
                                     (p % block_size) * token_stride + h * dim,
                                     row_buf.data(), dim);
        for (int64_t g = 0; g < group; ++g) axpy(scores[g * len + p], v, o_row + g * dim, dim);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (CPU, float32 or fp8 cache)");
}
