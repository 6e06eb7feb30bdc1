// Paged attention: the fast kernel against the reference, and prefill against token-by-token
// decode. The reference sums in double; the fast kernel in fp32 with a polynomial exp, so outputs
// (weighted means of values in [-1, 1]) agree to ~1e-5 absolute.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/simd.h"
#include "tests/kernels/kernel_test_util.h"

namespace fineserve {
namespace {

using testing::expect_close;
using testing::random_floats;

struct Shape {
  int n_heads, n_kv_heads, head_dim, block_size, window;
};

// A batch of sequences, each with its context length and number of new queries this step.
struct Batch {
  std::vector<int32_t> ctx, nq;
};

// Block tables with shuffled, non-contiguous physical blocks.
struct Cache {
  int num_blocks = 0, max_blocks = 0;
  std::vector<int32_t> table;
  std::vector<float> k, v;
};

Cache make_cache(const Shape& s, const Batch& b, uint32_t seed) {
  Cache c;
  for (int32_t len : b.ctx) c.max_blocks = std::max(c.max_blocks, (len + s.block_size - 1) / s.block_size);
  c.max_blocks += 1;  // spare column: rows are strided, not packed
  const int n = static_cast<int>(b.ctx.size());
  c.num_blocks = n * c.max_blocks + 3;
  std::vector<int32_t> perm(static_cast<size_t>(c.num_blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937 rng(seed);
  std::shuffle(perm.begin(), perm.end(), rng);
  c.table.assign(static_cast<size_t>(n * c.max_blocks), -1);
  size_t next = 0;
  for (int q = 0; q < n; ++q)
    for (int blk = 0; blk < (b.ctx[static_cast<size_t>(q)] + s.block_size - 1) / s.block_size; ++blk)
      c.table[static_cast<size_t>(q * c.max_blocks + blk)] = perm[next++];
  const size_t elems = static_cast<size_t>(c.num_blocks) * s.block_size * s.n_kv_heads * s.head_dim;
  c.k = random_floats(elems, seed + 1);  // stale data everywhere: only written rows may matter
  c.v = random_floats(elems, seed + 2);
  return c;
}

PagedAttention params(const Shape& s, const Cache& c, const std::vector<int32_t>& qstart,
                      const std::vector<int32_t>& ctx) {
  PagedAttention p;
  p.n_heads = s.n_heads;
  p.n_kv_heads = s.n_kv_heads;
  p.head_dim = s.head_dim;
  p.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  p.sliding_window = s.window;
  p.block_size = s.block_size;
  p.n_seqs = static_cast<int>(ctx.size());
  p.max_blocks = c.max_blocks;
  p.query_start = qstart.data();
  p.context_len = ctx.data();
  p.block_table = c.table.data();
  return p;
}

class AttentionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cpu::has_avx2()) GTEST_SKIP() << "no AVX2: the CPU backend runs the reference only";
  }
  std::unique_ptr<Backend> fast = make_cpu_backend();
  std::unique_ptr<Backend> ref = make_cpu_backend(CpuOptions{.reference = true});

  // One step over the batch: both backends write this step's k/v and attend; outputs compared.
  void compare(const Shape& s, const Batch& b, uint32_t seed) {
    SCOPED_TRACE("heads " + std::to_string(s.n_heads) + "/" + std::to_string(s.n_kv_heads) + " hd " +
                 std::to_string(s.head_dim) + " block " + std::to_string(s.block_size) + " window " +
                 std::to_string(s.window));
    Cache cf = make_cache(s, b, seed), cr = cf;
    std::vector<int32_t> qstart = {0};
    for (int32_t n : b.nq) qstart.push_back(qstart.back() + n);
    const int64_t T = qstart.back();
    const PagedAttention pf = params(s, cf, qstart, b.ctx), pr = params(s, cr, qstart, b.ctx);
    const int64_t kv = static_cast<int64_t>(s.n_kv_heads) * s.head_dim;
    const auto k = random_floats(static_cast<size_t>(T * kv), seed + 3), v = random_floats(static_cast<size_t>(T * kv), seed + 4);
    const auto q = random_floats(static_cast<size_t>(T * s.n_heads * s.head_dim), seed + 5, -2.0f, 2.0f);
    fast->write_kv(pf, k.data(), v.data(), cf.k.data(), cf.v.data());
    ref->write_kv(pr, k.data(), v.data(), cr.k.data(), cr.v.data());
    EXPECT_EQ(cf.k, cr.k);
    EXPECT_EQ(cf.v, cr.v);
    std::vector<float> of(static_cast<size_t>(T * s.n_heads * s.head_dim)), orf(of.size());
    testing::poison(of);
    fast->attention(pf, q.data(), cf.k.data(), cf.v.data(), of.data());
    ref->attention(pr, q.data(), cr.k.data(), cr.v.data(), orf.data());
    expect_close(of, orf, 2e-6, 2e-5, "attention");
  }
};

TEST_F(AttentionTest, MixedBatchMatchesReference) {
  // Chunked prefill (5 new of 37), a first token, a decode at 70, a whole 20-token prefill.
  const Batch mixed{{37, 1, 70, 20}, {5, 1, 1, 20}};
  uint32_t seed = 10;
  for (const Shape& s : std::vector<Shape>{{4, 4, 64, 16, 0}, {8, 2, 64, 16, 0}, {6, 1, 40, 1, 0}, {4, 2, 128, 16, 7},
                                           {3, 3, 12, 1, 5}, {2, 1, 20, 3, 1}})
    compare(s, mixed, seed++);
  compare({4, 2, 64, 16, 0}, Batch{{300}, {300}}, seed++);   // a longer prefill, parallel
  compare({32, 8, 64, 16, 0}, Batch{{1, 2, 3, 500}, {1, 1, 1, 1}}, seed++);  // decode batch
}

// A sequence processed by one prefill equals the same sequence processed token by token.
TEST_F(AttentionTest, PrefillEqualsDecode) {
  for (const Shape& s : std::vector<Shape>{{4, 2, 64, 16, 0}, {4, 4, 32, 1, 0}, {2, 1, 16, 4, 6}}) {
    const int32_t L = 41;
    const Batch whole{{L}, {L}};
    Cache c1 = make_cache(s, whole, 5), c2 = c1;
    const int64_t kv = static_cast<int64_t>(s.n_kv_heads) * s.head_dim, qd = static_cast<int64_t>(s.n_heads) * s.head_dim;
    const auto k = random_floats(static_cast<size_t>(L * kv), 6), v = random_floats(static_cast<size_t>(L * kv), 7);
    const auto q = random_floats(static_cast<size_t>(L * qd), 8, -3.0f, 3.0f);
    for (Backend* be : {fast.get(), ref.get()}) {
      Cache a = c1, b = c2;
      std::vector<int32_t> qs = {0, L}, ctx = {L};
      PagedAttention p = params(s, a, qs, ctx);
      std::vector<float> prefill(static_cast<size_t>(L * qd)), decode(prefill.size());
      be->write_kv(p, k.data(), v.data(), a.k.data(), a.v.data());
      be->attention(p, q.data(), a.k.data(), a.v.data(), prefill.data());
      for (int32_t t = 0; t < L; ++t) {
        std::vector<int32_t> qs1 = {0, 1}, ctx1 = {t + 1};
        PagedAttention p1 = params(s, b, qs1, ctx1);
        be->write_kv(p1, k.data() + t * kv, v.data() + t * kv, b.k.data(), b.v.data());
        be->attention(p1, q.data() + t * qd, b.k.data(), b.v.data(), decode.data() + t * qd);
      }
      // The same positions, values and per-query arithmetic: equal up to summation order.
      expect_close(decode, prefill, 1e-6, 1e-6, be->name() + " prefill vs decode");
    }
  }
}

TEST_F(AttentionTest, SlidingWindowIgnoresOldPositions) {
  // With window w, changing cache rows older than the window must not change the output.
  const Shape s{2, 1, 16, 4, 3};
  const Batch b{{12}, {1}};
  Cache c = make_cache(s, b, 3);
  std::vector<int32_t> qs = {0, 1};
  PagedAttention p = params(s, c, qs, b.ctx);
  const auto q = random_floats(2 * 16, 4);
  std::vector<float> o1(2 * 16), o2(2 * 16);
  fast->attention(p, q.data(), c.k.data(), c.v.data(), o1.data());
  for (int32_t pos = 0; pos < 12 - 3; ++pos) {
    const int64_t row = static_cast<int64_t>(c.table[static_cast<size_t>(pos / 4)]) * 4 + pos % 4;
    for (int e = 0; e < 16; ++e) c.k[static_cast<size_t>(row * 16 + e)] = c.v[static_cast<size_t>(row * 16 + e)] = 100.0f;
  }
  fast->attention(p, q.data(), c.k.data(), c.v.data(), o2.data());
  EXPECT_EQ(o1, o2);
}

}  // namespace
}  // namespace fineserve
