// Fast CPU attention over the paged KV cache (see fast_ops.h and kernels/ops.h PagedAttention).
//
// One work item is one (query token, head): scores q·k for every visible cache position, a
// max-subtracted softmax, then the weighted sum of values; items run in parallel (dynamic schedule,
// since a prefill's later queries see more context than its first). Cache rows are walked block by
// block so the block-table lookup and the division happen once per block, not per position.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/fast_ops.h"
#include "kernels/cpu/reference.h"
#include "kernels/cpu/simd.h"
#include "kernels/cpu/validate.h"

namespace fineserve::cpu {
namespace {

FS_AVX2 float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  if (i + 8 <= n) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    i += 8;
  }
  float s = simd::hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// acc += w * v
FS_AVX2 void axpy(float w, const float* v, float* acc, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
  for (; i < n; ++i) acc[i] += w * v[i];
}

// score[i] = exp(score[i] - mx); returns the sum.
FS_AVX2 float exp_sum(float* score, int64_t n, float mx) {
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = simd::exp(_mm256_sub_ps(_mm256_loadu_ps(score + i), mv));
    _mm256_storeu_ps(score + i, e);
    sv = _mm256_add_ps(sv, e);
  }
  float s = simd::hsum(sv);
  for (; i < n; ++i) s += (score[i] = std::exp(score[i] - mx));
  return s;
}

struct Item {
  int seq;
  int64_t pos;  // cache position of this query
};

// Calls f(cache_row, index) for the positions [lo, hi] of sequence s, a block at a time.
template <class F>
void for_each_row(const PagedAttention& p, int s, int64_t lo, int64_t hi, F&& f) {
  const int32_t* table = p.block_table + static_cast<int64_t>(s) * p.max_blocks;
  for (int64_t t = lo; t <= hi;) {
    const int64_t slot = t % p.block_size;
    const int64_t n = std::min<int64_t>(p.block_size - slot, hi - t + 1);
    const int64_t base = static_cast<int64_t>(table[t / p.block_size]) * p.block_size + slot;
    for (int64_t j = 0; j < n; ++j) f(base + j, t - lo + j);
    t += n;
  }
}

// Columns per register-resident slice of the weighted sum of values: 8 AVX2 registers.
constexpr int64_t kSlice = 64;

// out[c] = inv_sum · Σ_j score[j] · v_row(j)[c] for the kSlice columns from v (a cache row's
// column offset), the positions [lo, hi] of sequence s: the sums stay in registers across rows,
// where an axpy into memory would load and store them for every row.
FS_AVX2 void weighted_sum_slice(const PagedAttention& p, int s, int64_t lo, int64_t hi, const float* score,
                                const float* v, int64_t kv_row, float inv_sum, float* out) {
  __m256 a[kSlice / 8];
  for (auto& x : a) x = _mm256_setzero_ps();
  // for_each_row's walk, written out: a lambda would not carry this function's target attribute.
  const int32_t* table = p.block_table + static_cast<int64_t>(s) * p.max_blocks;
  for (int64_t t = lo; t <= hi;) {
    const int64_t slot = t % p.block_size;
    const int64_t n = std::min<int64_t>(p.block_size - slot, hi - t + 1);
    const int64_t base = static_cast<int64_t>(table[t / p.block_size]) * p.block_size + slot;
    for (int64_t r = 0; r < n; ++r) {
      const __m256 w = _mm256_set1_ps(score[t - lo + r]);
      const float* vr = v + (base + r) * kv_row;
      for (int c = 0; c < kSlice / 8; ++c) a[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + 8 * c), a[c]);
    }
    t += n;
  }
  const __m256 scale = _mm256_set1_ps(inv_sum);
  for (int t = 0; t < kSlice / 8; ++t) _mm256_storeu_ps(out + 8 * t, _mm256_mul_ps(a[t], scale));
}

}  // namespace

void write_kv(const PagedAttention& p, const float* k, const float* v, float* k_cache, float* v_cache) {
  validate_attention(p);
  const int64_t row = static_cast<int64_t>(p.n_kv_heads) * p.head_dim;
  for (int s = 0; s < p.n_seqs; ++s) {
    const int32_t q0 = p.query_start[s], nq = p.query_start[s + 1] - q0;
    for (int32_t i = 0; i < nq; ++i) {
      const int64_t dst = ref::cache_row(p, s, p.context_len[s] - nq + i) * row;
      std::memcpy(k_cache + dst, k + (q0 + i) * row, static_cast<size_t>(row) * 4);
      std::memcpy(v_cache + dst, v + (q0 + i) * row, static_cast<size_t>(row) * 4);
    }
  }
}

void attention(const PagedAttention& p, const float* q, const float* k_cache, const float* v_cache, float* out,
               int threads) {
  validate_attention(p);
  if (p.n_seqs == 0) return;
  for (int s = 0; s < p.n_seqs; ++s)
    for (int64_t b = 0; b < (p.context_len[s] + p.block_size - 1) / p.block_size; ++b)
      FS_ASSERT(p.block_table[static_cast<int64_t>(s) * p.max_blocks + b] >= 0, "negative block id in block table");
  const int64_t n_tokens = p.query_start[p.n_seqs] - p.query_start[0];
  std::vector<Item> items(static_cast<size_t>(n_tokens));
  for (int s = 0; s < p.n_seqs; ++s) {
    const int32_t q0 = p.query_start[s], nq = p.query_start[s + 1] - q0;
    for (int32_t i = 0; i < nq; ++i) items[static_cast<size_t>(q0 - p.query_start[0] + i)] = {s, p.context_len[s] - nq + i};
  }
  const int group = p.n_heads / p.n_kv_heads;
  const int64_t hd = p.head_dim, kv_row = static_cast<int64_t>(p.n_kv_heads) * hd;
  const int64_t work = n_tokens * p.n_heads;
  int64_t total_ctx = 0;
  for (const Item& it : items) total_ctx += it.pos + 1;
#pragma omp parallel num_threads(threads > 0 ? threads : omp_get_max_threads()) if (total_ctx * p.n_heads * hd >= (1 << 16))
  {
    std::vector<float> score, acc(static_cast<size_t>(hd));
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t tok = w / p.n_heads;
      const int h = static_cast<int>(w % p.n_heads);
      const Item it = items[static_cast<size_t>(tok)];
      const int64_t lo = p.sliding_window > 0 ? std::max<int64_t>(0, it.pos - p.sliding_window + 1) : 0;
      const int64_t tok_row = p.query_start[0] + tok;
      const float* qh = q + (tok_row * p.n_heads + h) * hd;
      const int64_t kv_off = (h / group) * hd;
      score.resize(static_cast<size_t>(it.pos - lo + 1));
      float mx = -INFINITY;
      for_each_row(p, it.seq, lo, it.pos, [&](int64_t row, int64_t j) {
        const float sc = dot(qh, k_cache + row * kv_row + kv_off, hd) * p.scale;
        score[static_cast<size_t>(j)] = sc;
        mx = std::max(mx, sc);
      });
      const float inv_sum = 1.0f / exp_sum(score.data(), static_cast<int64_t>(score.size()), mx);
      float* o = out + (tok_row * p.n_heads + h) * hd;
      // Σ_j score_j v_j, 64 columns at a time in registers; a last slice narrower than 64 in acc.
      const int64_t wide = hd / kSlice * kSlice;
      for (int64_t c0 = 0; c0 < wide; c0 += kSlice)
        weighted_sum_slice(p, it.seq, lo, it.pos, score.data(), v_cache + kv_off + c0, kv_row, inv_sum, o + c0);
      if (wide < hd) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for_each_row(p, it.seq, lo, it.pos, [&](int64_t row, int64_t j) {
          axpy(score[static_cast<size_t>(j)], v_cache + row * kv_row + kv_off + wide, acc.data(), hd - wide);
        });
        for (int64_t e = wide; e < hd; ++e) o[e] = acc[static_cast<size_t>(e - wide)] * inv_sum;
      }
    }
  }
}

}  // namespace fineserve::cpu
