// Fast CPU norms, activations, softmax, rotary, embedding and residual add (see fast_ops.h).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/fast_ops.h"
#include "kernels/cpu/simd.h"

namespace fineserve::cpu {
namespace {

int team(int threads) { return threads > 0 ? threads : omp_get_max_threads(); }
// Elementwise work below this many elements runs on the calling thread: a team costs microseconds.
constexpr int64_t kParallelElems = 1 << 15;

// fp32 view of a parameter vector: the pointer itself for F32, else a converted per-thread copy.
const float* params_f32(const void* p, DType dtype, int64_t n, std::vector<float>& scratch) {
  if (!p) return nullptr;
  if (dtype == DType::F32) return static_cast<const float*>(p);
  scratch.resize(static_cast<size_t>(n));
  to_f32(p, dtype, n, scratch.data());
  return scratch.data();
}

FS_AVX2 __m256 act8(Activation kind, __m256 x) {
  switch (kind) {
    case Activation::ReLU: return _mm256_max_ps(x, _mm256_setzero_ps());
    case Activation::GELU: {
      // 0.5 x erfc(-x/√2): x - h for x >= 0, h for x < 0, with h = 0.5 x erfc(|x|/√2).
      const __m256 h = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x),
                                     simd::erfc_abs(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f))));
      return _mm256_blendv_ps(_mm256_sub_ps(x, h), h, x);  // blendv picks by the sign bit of x
    }
    case Activation::GELUTanh: {
      // 0.5 x (1 + tanh u) = x / (1 + e^(-2u)): no cancellation near u = 0 or for large |u|.
      const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
      const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
      const __m256 e = simd::exp(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u));
      return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    }
    case Activation::SiLU: {
      const __m256 e = simd::exp(_mm256_sub_ps(_mm256_setzero_ps(), x));
      return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    }
  }
  return x;
}

// Applies act8 to [begin, end) of x in place; the tail goes through a zero-padded vector.
FS_AVX2 void act_range(Activation kind, float* x, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) _mm256_storeu_ps(x + i, act8(kind, _mm256_loadu_ps(x + i)));
  if (i < end) {
    alignas(32) float tmp[8] = {};
    std::memcpy(tmp, x + i, static_cast<size_t>(end - i) * 4);
    _mm256_store_ps(tmp, act8(kind, _mm256_load_ps(tmp)));
    std::memcpy(x + i, tmp, static_cast<size_t>(end - i) * 4);
  }
}

FS_AVX2 void gated_row(Activation kind, const float* gate, const float* up, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(out + j, _mm256_mul_ps(act8(kind, _mm256_loadu_ps(gate + j)), _mm256_loadu_ps(up + j)));
  if (j < n) {
    alignas(32) float g[8] = {}, u[8] = {};
    std::memcpy(g, gate + j, static_cast<size_t>(n - j) * 4);
    std::memcpy(u, up + j, static_cast<size_t>(n - j) * 4);
    _mm256_store_ps(g, _mm256_mul_ps(act8(kind, _mm256_load_ps(g)), _mm256_load_ps(u)));
    std::memcpy(out + j, g, static_cast<size_t>(n - j) * 4);
  }
}

FS_AVX2 float sum_row(const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + j));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + j + 8));
  }
  float s = simd::hsum(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) s += x[j];
  return s;
}

// Σ (x - c)²
FS_AVX2 float sq_dev_row(const float* x, int64_t n, float c) {
  const __m256 cv = _mm256_set1_ps(c);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + j), cv), d1 = _mm256_sub_ps(_mm256_loadu_ps(x + j + 8), cv);
    a0 = _mm256_fmadd_ps(d0, d0, a0);
    a1 = _mm256_fmadd_ps(d1, d1, a1);
  }
  float s = simd::hsum(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) s += (x[j] - c) * (x[j] - c);
  return s;
}

// y = (x - shift) * inv * gamma + beta (gamma / beta may be null).
FS_AVX2 void normalize_row(const float* x, int64_t n, float shift, float inv, const float* gamma, const float* beta,
                           float* y) {
  const __m256 sv = _mm256_set1_ps(shift), iv = _mm256_set1_ps(inv);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), sv), iv);
    if (gamma) v = _mm256_mul_ps(v, _mm256_loadu_ps(gamma + j));
    if (beta) v = _mm256_add_ps(v, _mm256_loadu_ps(beta + j));
    _mm256_storeu_ps(y + j, v);
  }
  for (; j < n; ++j) {
    float v = (x[j] - shift) * inv;
    if (gamma) v *= gamma[j];
    if (beta) v += beta[j];
    y[j] = v;
  }
}

FS_AVX2 void softmax_row(const float* x, int64_t n, float* y) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float mx = *std::max_element(lanes, lanes + 8);
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  if (mx == -INFINITY) mx = 0;  // an all -inf row gives 0/0 = NaN, as the reference does
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = simd::exp(_mm256_sub_ps(_mm256_loadu_ps(x + j), mxv));
    _mm256_storeu_ps(y + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = simd::hsum(sv);
  for (; j < n; ++j) sum += (y[j] = std::exp(x[j] - mx));
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(y + j), inv));
  for (; j < n; ++j) y[j] *= 1.0f / sum;
}

// Rotates one head: (a, b) = (v[i], v[i + half]) -> (a c - b s, b c + a s).
FS_AVX2 void rotate_head(float* v, const float* c, const float* s, int half) {
  int i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + i + half);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    _mm256_storeu_ps(v + i, _mm256_fmsub_ps(a, cv, _mm256_mul_ps(b, sv)));
    _mm256_storeu_ps(v + i + half, _mm256_fmadd_ps(b, cv, _mm256_mul_ps(a, sv)));
  }
  for (; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * c[i] - b * s[i];
    v[i + half] = b * c[i] + a * s[i];
  }
}

FS_AVX2 void add_range(float* x, const float* y, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < end; ++i) x[i] += y[i];
}

// Splits [0, n) evenly over the calling team.
void range(int64_t n, int64_t* b, int64_t* e) {
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
  *b = n * t / nt;
  *e = n * (t + 1) / nt;
}

}  // namespace

void embedding(const void* table, DType table_dtype, int64_t dim, const int32_t* ids, int64_t n, bool accumulate,
               float* out, int threads) {
  const int64_t row_bytes = dim * static_cast<int64_t>(dtype_size(table_dtype));
#pragma omp parallel num_threads(team(threads)) if (n * dim >= kParallelElems)
  {
    std::vector<float> tmp(accumulate ? static_cast<size_t>(dim) : 0);
    int64_t b, e;
    range(n, &b, &e);
    for (int64_t i = b; i < e; ++i) {
      FS_ASSERT(ids[i] >= 0, "negative token id reached embedding");
      const void* row = static_cast<const char*>(table) + static_cast<int64_t>(ids[i]) * row_bytes;
      if (!accumulate) {
        to_f32(row, table_dtype, dim, out + i * dim);
      } else {
        to_f32(row, table_dtype, dim, tmp.data());
        add_range(out + i * dim, tmp.data(), 0, dim);
      }
    }
  }
}

void layer_norm(const float* x, int64_t m, int64_t n, const void* gamma, const void* beta, DType param_dtype,
                float eps, float* y, int threads) {
  thread_local std::vector<float> g_scratch, b_scratch;
  const float* g = params_f32(gamma, param_dtype, n, g_scratch);
  const float* bt = params_f32(beta, param_dtype, n, b_scratch);
#pragma omp parallel for num_threads(team(threads)) if (m * n >= kParallelElems) schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * n;
    const float mean = sum_row(xi, n) / static_cast<float>(n);
    const float var = sq_dev_row(xi, n, mean) / static_cast<float>(n);
    normalize_row(xi, n, mean, 1.0f / std::sqrt(var + eps), g, bt, y + i * n);
  }
}

void rms_norm(const float* x, int64_t m, int64_t n, const void* gamma, DType param_dtype, float eps, float* y,
              int threads) {
  thread_local std::vector<float> g_scratch;
  const float* g = params_f32(gamma, param_dtype, n, g_scratch);
#pragma omp parallel for num_threads(team(threads)) if (m * n >= kParallelElems) schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * n;
    const float ms = sq_dev_row(xi, n, 0.0f) / static_cast<float>(n);
    normalize_row(xi, n, 0.0f, 1.0f / std::sqrt(ms + eps), g, nullptr, y + i * n);
  }
}

void activation(Activation kind, float* x, int64_t count, int threads) {
#pragma omp parallel num_threads(team(threads)) if (count >= kParallelElems)
  {
    int64_t b, e;
    range(count / 8, &b, &e);  // whole vectors per thread; the last thread takes the tail
    const bool last = omp_get_thread_num() == omp_get_num_threads() - 1;
    act_range(kind, x, b * 8, last ? count : e * 8);
  }
}

void gated_activation(Activation kind, const float* gate_up, int64_t m, int64_t n, float* out, int threads) {
#pragma omp parallel for num_threads(team(threads)) if (m * n >= kParallelElems) schedule(static)
  for (int64_t i = 0; i < m; ++i) gated_row(kind, gate_up + i * 2 * n, gate_up + i * 2 * n + n, n, out + i * n);
}

void add(float* x, const float* y, int64_t count, int threads) {
#pragma omp parallel num_threads(team(threads)) if (count >= 4 * kParallelElems)
  {
    int64_t b, e;
    range(count, &b, &e);
    add_range(x, y, b, e);
  }
}

void softmax(const float* x, int64_t m, int64_t n, float* y, int threads) {
#pragma omp parallel for num_threads(team(threads)) if (m * n >= kParallelElems) schedule(static)
  for (int64_t i = 0; i < m; ++i) softmax_row(x + i * n, n, y + i * n);
}

void rotary(float* q, float* k, const int32_t* positions, int64_t n_tokens, int n_heads, int n_kv_heads,
            int head_dim, int rotary_dim, const float* inv_freq, int threads) {
  FS_ASSERT(rotary_dim % 2 == 0 && rotary_dim <= head_dim, "rotary_dim must be even and <= head_dim");
  const int half = rotary_dim / 2;
#pragma omp parallel num_threads(team(threads)) if (n_tokens * (n_heads + n_kv_heads) * head_dim >= kParallelElems)
  {
    std::vector<float> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
    int64_t b, e;
    range(n_tokens, &b, &e);
    for (int64_t t = b; t < e; ++t) {
      // The angle is rounded to fp32 first, as HF computes it; sin/cos of it to < 1 ulp.
      for (int i = 0; i < half; ++i) {
        const float theta = static_cast<float>(positions[t]) * inv_freq[i];
        c[static_cast<size_t>(i)] = std::cos(theta);
        s[static_cast<size_t>(i)] = std::sin(theta);
      }
      for (int h = 0; h < n_heads; ++h) rotate_head(q + (t * n_heads + h) * head_dim, c.data(), s.data(), half);
      for (int h = 0; h < n_kv_heads; ++h) rotate_head(k + (t * n_kv_heads + h) * head_dim, c.data(), s.data(), half);
    }
  }
}

}  // namespace fineserve::cpu
