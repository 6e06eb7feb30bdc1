// MoE routing ops for the CPU backend (see moe.h).
#include "kernels/cpu/moe.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/simd.h"

namespace fineserve::cpu {
namespace {

void check_rows(const int32_t* rows, int64_t n, int64_t dst_rows) {
  for (int64_t i = 0; i < n; ++i) FS_ASSERT(rows[i] >= 0 && rows[i] < dst_rows, "scatter_add_rows: row out of range");
}

// dst[rows[i], c0:c1) += weights[i] * src[i, c0:c1) for every i in order.
FS_AVX2 void scatter_slice(const float* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim,
                           float* dst, int64_t c0, int64_t c1) {
  for (int64_t i = 0; i < n; ++i) {
    const float* s = src + i * dim;
    float* d = dst + static_cast<int64_t>(rows[i]) * dim;
    const __m256 w = _mm256_set1_ps(weights[i]);
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8) _mm256_storeu_ps(d + c, _mm256_fmadd_ps(w, _mm256_loadu_ps(s + c), _mm256_loadu_ps(d + c)));
    for (; c < c1; ++c) d[c] = std::fma(weights[i], s[c], d[c]);
  }
}

}  // namespace

namespace ref {

void moe_route(const float* router_logits, int64_t n_tokens, int n_experts, int top_k, int32_t* expert_ids,
               float* weights) {
  FS_ASSERT(n_experts > 0 && top_k >= 1 && top_k <= n_experts, "moe_route: need 1 <= top_k <= n_experts");
  std::vector<double> p(static_cast<size_t>(n_experts));
  std::vector<int32_t> order(static_cast<size_t>(n_experts));
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* x = router_logits + t * n_experts;
    double mx = -std::numeric_limits<double>::infinity();
    for (int e = 0; e < n_experts; ++e) mx = std::max(mx, static_cast<double>(x[e]));
    double sum = 0;
    for (int e = 0; e < n_experts; ++e) sum += p[static_cast<size_t>(e)] = std::exp(x[e] - mx);
    for (int e = 0; e < n_experts; ++e) {
      p[static_cast<size_t>(e)] /= sum;
      order[static_cast<size_t>(e)] = e;
    }
    // Most probable first; equal probabilities keep the lower expert first.
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return p[static_cast<size_t>(a)] > p[static_cast<size_t>(b)]; });
    double top = 0;
    for (int j = 0; j < top_k; ++j) top += p[static_cast<size_t>(order[static_cast<size_t>(j)])];
    for (int j = 0; j < top_k; ++j) {
      const int32_t e = order[static_cast<size_t>(j)];
      expert_ids[t * top_k + j] = e;
      weights[t * top_k + j] = static_cast<float>(p[static_cast<size_t>(e)] / top);
    }
  }
}

void scatter_add_rows(const float* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim,
                      float* dst, int64_t dst_rows) {
  check_rows(rows, n, dst_rows);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < dim; ++c) {
      float& d = dst[static_cast<int64_t>(rows[i]) * dim + c];
      d = static_cast<float>(static_cast<double>(d) + static_cast<double>(weights[i]) * src[i * dim + c]);
    }
}

}  // namespace ref

void scatter_add_rows(const float* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim,
                      float* dst, int64_t dst_rows, int threads) {
  check_rows(rows, n, dst_rows);
  // Slices of 64 columns (256 bytes): whole cache lines per thread, so no false sharing.
  constexpr int64_t kSlice = 64;
  const int64_t slices = (dim + kSlice - 1) / kSlice;
  const int team = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel for num_threads(team) if (n * dim >= (1 << 15)) schedule(static)
  for (int64_t s = 0; s < slices; ++s)
    scatter_slice(src, rows, weights, n, dim, dst, s * kSlice, std::min(dim, (s + 1) * kSlice));
}

}  // namespace fineserve::cpu
