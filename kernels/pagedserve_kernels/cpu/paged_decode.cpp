// Paged decode attention for the CPU: each decode row reads its request's keys and values once,
// straight from the cache blocks, for all the query heads that share a KV head (GQA).
//
// query        [num_rows, num_heads, head_dim]               float32, rows = decode tokens
// kv_cache     [2, num_blocks, block_size, num_kv_heads, head_dim]  float32, contiguous
// seq_lens     [num_rows] int32   context length of each row (its own token included)
// block_table  [num_rows, width] int32 (any row stride)
// out          [num_rows, num_heads, head_dim]               float32
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

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
                  torch::Tensor& out) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && kv_cache.dtype() == torch::kFloat32,
              "paged_decode takes float32 tensors");
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
  const float* k_cache = kv_cache.data_ptr<float>();
  const float* v_cache = k_cache + num_blocks * block_size * kv_heads * dim;
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t table_stride = block_table.stride(0);
  float* o = out.data_ptr<float>();
  const int64_t token_stride = kv_heads * dim, block_stride = block_size * token_stride;
  const float fscale = static_cast<float>(scale);

  // One task per (row, kv head): it owns `group` query heads and one pass over the context.
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
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
        const float* k = k_cache + blocks[p / block_size] * block_stride +
                         (p % block_size) * token_stride + h * dim;
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
        const float inv = 1.f / total;
        for (int64_t p = 0; p < len; ++p) s[p] *= inv;
      }
      for (int64_t p = 0; p < len; ++p) {
        const float* v = v_cache + blocks[p / block_size] * block_stride +
                         (p % block_size) * token_stride + h * dim;
        for (int64_t g = 0; g < group; ++g) axpy(scores[g * len + p], v, o_row + g * dim, dim);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (CPU, float32)");
}
