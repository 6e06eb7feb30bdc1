// The CUDA backend: every op against the CPU backend on fresh random inputs with awkward sizes
// (skipped without a GPU), and the parts of it that run on the host, checked on any machine: the
// attention launch plan (and the kernel's algorithm emulated over it), the index mirror, the scalar
// math shared with the kernels, and the error paths.
//
// Tolerances of the GPU-vs-CPU comparisons. Every input is first rounded to the activation dtype,
// so both backends see the same values; the CPU computes in fp32 (the reference parts in double)
// and keeps fp32 outputs, the GPU computes in fp32 and rounds each output to the activation dtype
// once. The difference is that final rounding, at most half an ulp: 2^-11 relative for fp16 and
// 2^-8 for bf16, plus fp32 reassociation noise (~1e-6 relative, sums of a few thousand terms). So
// rtol is about three half-ulps (1.5e-3 for fp16, 1.2e-2 for bf16) and atol covers results that
// cancel to near zero (1e-3, 8e-3: the inputs are O(1)). Linear layers add the GEMM's own
// accumulation order and, for FineQuant weights, the rounding of dequantized weights to the
// activation dtype (see LinearMatchesCpu).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "kernels/backend.h"
#include "kernels/base.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/reference.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/ops_math.h"
#include "kernels/half.h"
#include "tests/kernels/kernel_test_util.h"

#ifdef FINESERVE_HAVE_CUDA
#include "kernels/cuda/dequant.h"  // device_available
#include "kernels/cuda/ops_plan.h"
#endif

namespace fineserve {
namespace {

using testing::expect_close;
using testing::random_floats;

// ---- on any machine -------------------------------------------------------------------------

TEST(CudaBackendErrors, BadDeviceOrDtypeIsAnError) {
  // Without CUDA in the build, without a GPU, or with one: never a crash, always fineserve::Error.
  EXPECT_THROW(make_cuda_backend(999), Error);
  EXPECT_THROW(make_cuda_backend(-1), Error);
  EXPECT_THROW(make_cuda_backend(0, DType::F32), Error);
  try {
    make_cuda_backend(999);
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_TRUE(m.find("999") != std::string::npos || m.find("CUDA") != std::string::npos) << m;
  }
}

TEST(CudaMath, ActivationsMatchTheCpuReference) {
  const std::vector<float> x = random_floats(20001, 7, -12.0f, 12.0f);
  for (Activation kind : {Activation::ReLU, Activation::GELU, Activation::GELUTanh, Activation::SiLU}) {
    std::vector<float> got(x.size()), want(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      got[i] = cuda::activate(kind, x[i]);
      want[i] = cpu::ref::activate(kind, x[i]);
    }
    // fp32 formulas against double: a few ulp, and tiny absolute values in the tails.
    expect_close(got, want, 1e-7, 4e-6, "activation " + std::to_string(static_cast<int>(kind)));
  }
}

TEST(CudaMath, RouterTopKMatchesTheCpuReference) {
  std::mt19937 rng(11);
  for (auto [n_experts, top_k] : {std::pair{8, 2}, std::pair{4, 1}, std::pair{3, 3}, std::pair{64, 6}}) {
    const int n_tokens = 41;
    std::vector<float> logits = random_floats(static_cast<size_t>(n_tokens * n_experts), rng(), -4.0f, 4.0f);
    // Exact ties: whole rows equal, and pairs of equal logits, where the lower expert must come first.
    for (int e = 0; e < n_experts; ++e) logits[static_cast<size_t>(e)] = 0.5f;
    for (int t = 1; t < n_tokens; t += 3) logits[static_cast<size_t>(t * n_experts + n_experts - 1)] =
        logits[static_cast<size_t>(t * n_experts)];
    std::vector<int32_t> want_ids(static_cast<size_t>(n_tokens * top_k)), got_ids(want_ids.size());
    std::vector<float> want_w(want_ids.size()), got_w(want_ids.size());
    cpu::ref::moe_route(logits.data(), n_tokens, n_experts, top_k, want_ids.data(), want_w.data());
    for (int t = 0; t < n_tokens; ++t) {
      const float* row = logits.data() + t * n_experts;
      cuda::route_top_k([&](int e) { return row[e]; }, n_experts, top_k, got_ids.data() + t * top_k,
                        got_w.data() + t * top_k);
    }
    EXPECT_EQ(got_ids, want_ids) << n_experts << " experts, top " << top_k;
    expect_close(got_w, want_w, 1e-7, 1e-5, "router weights");
  }
}

#ifdef FINESERVE_HAVE_CUDA

// ---- the attention plan (host) --------------------------------------------------------------

struct Seq {
  int32_t ctx, nq;
};

struct HostBatch {
  std::vector<int32_t> qstart{0}, ctx, table;
  int max_blocks = 0, num_blocks = 0;
};

// Sequences packed back to back, with shuffled physical blocks.
HostBatch make_batch(const std::vector<Seq>& seqs, int block_size, uint32_t seed) {
  HostBatch b;
  for (const Seq& s : seqs) {
    b.qstart.push_back(b.qstart.back() + s.nq);
    b.ctx.push_back(s.ctx);
    b.max_blocks = std::max(b.max_blocks, (s.ctx + block_size - 1) / block_size);
  }
  b.max_blocks += 1;  // a spare column: rows are strided, not packed
  b.num_blocks = static_cast<int>(seqs.size()) * b.max_blocks + 3;
  std::vector<int32_t> perm(static_cast<size_t>(b.num_blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937 rng(seed);
  std::shuffle(perm.begin(), perm.end(), rng);
  b.table.assign(seqs.size() * static_cast<size_t>(b.max_blocks), -1);
  size_t next = 0;
  for (size_t s = 0; s < seqs.size(); ++s)
    for (int blk = 0; blk < (seqs[s].ctx + block_size - 1) / block_size; ++blk)
      b.table[s * static_cast<size_t>(b.max_blocks) + static_cast<size_t>(blk)] = perm[next++];
  return b;
}

struct AttnShape {
  int n_heads, n_kv_heads, head_dim, block_size, window;
};

PagedAttention host_params(const AttnShape& s, const HostBatch& b) {
  PagedAttention p;
  p.n_heads = s.n_heads;
  p.n_kv_heads = s.n_kv_heads;
  p.head_dim = s.head_dim;
  p.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  p.sliding_window = s.window;
  p.block_size = s.block_size;
  p.n_seqs = static_cast<int>(b.ctx.size());
  p.max_blocks = b.max_blocks;
  p.query_start = b.qstart.data();
  p.context_len = b.ctx.data();
  p.block_table = b.table.data();
  return p;
}

// The attention kernel's algorithm (ops_attention.cu) on the host, over a plan: per item and head
// chunk, each row's online softmax over key tiles of kAttnKeys (the key tile's maximum first, then
// the rescale), partial results for split items, then the combine.
std::vector<float> emulate_kernel(const PagedAttention& p, const cuda::AttentionPlan& plan, const std::vector<float>& q,
                                  const std::vector<float>& kc, const std::vector<float>& vc) {
  const int D = p.head_dim;
  const int64_t kv_row = static_cast<int64_t>(p.n_kv_heads) * D;
  std::vector<float> out(static_cast<size_t>(plan.n_tokens * p.n_heads * D), std::numeric_limits<float>::quiet_NaN());
  const size_t slot_rows = static_cast<size_t>(plan.n_partials * plan.grid_y * cuda::kAttnRows);
  std::vector<float> po(slot_rows * static_cast<size_t>(D)), pml(slot_rows * 2);
  auto head_chunk = [&](int y, int* kvh, int* h0, int* count) {
    *kvh = y / plan.chunks_per_kv_head;
    const int first = (y % plan.chunks_per_kv_head) * plan.heads_per_cta;
    *h0 = *kvh * plan.group + first;
    *count = std::min(plan.heads_per_cta, plan.group - first);
  };
  for (const cuda::AttentionItem& it : plan.items) {
    const int32_t q0 = p.query_start[it.seq], nq_all = p.query_start[it.seq + 1] - q0, ctx = p.context_len[it.seq];
    for (int y = 0; y < plan.grid_y; ++y) {
      int kvh, h0, count;
      head_chunk(y, &kvh, &h0, &count);
      for (int r = 0; r < cuda::kAttnRows; ++r) {
        const int qi = r / plan.heads_per_cta, hi = r % plan.heads_per_cta;
        if (qi >= it.n_q || hi >= count) continue;
        const int32_t pos = ctx - nq_all + it.q_first + qi;
        const int32_t lo = p.sliding_window > 0 ? std::max(0, pos - p.sliding_window + 1) : 0;
        const int64_t tok = q0 + it.q_first + qi;
        std::vector<float> qs(static_cast<size_t>(D)), o(static_cast<size_t>(D), 0.0f);
        for (int d = 0; d < D; ++d) qs[static_cast<size_t>(d)] = q[static_cast<size_t>((tok * p.n_heads + h0 + hi) * D + d)] * p.scale;
        float m = -INFINITY, l = 0.0f;
        for (int kt = it.key_lo; kt <= it.key_hi; kt += cuda::kAttnKeys) {
          const int nk = std::min(cuda::kAttnKeys, it.key_hi - kt + 1);
          std::vector<float> s(static_cast<size_t>(nk), -INFINITY);
          float tile_max = -INFINITY;
          for (int j = 0; j < nk; ++j) {
            const int key = kt + j;
            if (key < lo || key > pos) continue;
            const int64_t row = cpu::ref::cache_row(p, it.seq, key);
            float dot = 0.0f;
            for (int d = 0; d < D; ++d) dot += qs[static_cast<size_t>(d)] * kc[static_cast<size_t>(row * kv_row + kvh * D + d)];
            s[static_cast<size_t>(j)] = dot;
            tile_max = std::max(tile_max, dot);
          }
          const float m_new = std::max(m, tile_max);
          if (m_new == -INFINITY) continue;
          const float alpha = std::exp(m - m_new);
          l *= alpha;
          for (float& v : o) v *= alpha;
          for (int j = 0; j < nk; ++j) {
            const float pj = std::exp(s[static_cast<size_t>(j)] - m_new);
            if (pj == 0.0f) continue;
            l += pj;
            const int64_t row = cpu::ref::cache_row(p, it.seq, kt + j);
            for (int d = 0; d < D; ++d) o[static_cast<size_t>(d)] += pj * vc[static_cast<size_t>(row * kv_row + kvh * D + d)];
          }
          m = m_new;
        }
        if (it.partial < 0) {
          for (int d = 0; d < D; ++d) out[static_cast<size_t>((tok * p.n_heads + h0 + hi) * D + d)] = o[static_cast<size_t>(d)] / l;
        } else {
          const size_t sr = (static_cast<size_t>(it.partial) * plan.grid_y + static_cast<size_t>(y)) * cuda::kAttnRows + r;
          std::copy(o.begin(), o.end(), po.begin() + static_cast<std::ptrdiff_t>(sr * D));
          pml[sr * 2] = m;
          pml[sr * 2 + 1] = l;
        }
      }
    }
  }
  for (const cuda::AttentionGroup& g : plan.groups) {
    const cuda::AttentionItem& it = plan.items[static_cast<size_t>(g.first)];
    const int32_t q0 = p.query_start[it.seq];
    for (int y = 0; y < plan.grid_y; ++y) {
      int kvh, h0, count;
      head_chunk(y, &kvh, &h0, &count);
      for (int r = 0; r < cuda::kAttnRows; ++r) {
        const int qi = r / plan.heads_per_cta, hi = r % plan.heads_per_cta;
        if (qi >= it.n_q || hi >= count) continue;
        auto sr = [&](int s) { return (static_cast<size_t>(g.first_slot + s) * plan.grid_y + static_cast<size_t>(y)) * cuda::kAttnRows + r; };
        float mx = -INFINITY, sum = 0.0f;
        for (int s = 0; s < g.count; ++s) mx = std::max(mx, pml[sr(s) * 2]);
        for (int s = 0; s < g.count; ++s)
          if (pml[sr(s) * 2] != -INFINITY) sum += std::exp(pml[sr(s) * 2] - mx) * pml[sr(s) * 2 + 1];
        const int64_t tok = q0 + it.q_first + qi;
        for (int d = 0; d < D; ++d) {
          float acc = 0.0f;
          for (int s = 0; s < g.count; ++s)
            if (pml[sr(s) * 2] != -INFINITY) acc += std::exp(pml[sr(s) * 2] - mx) * po[sr(s) * D + static_cast<size_t>(d)];
          out[static_cast<size_t>((tok * p.n_heads + h0 + hi) * D + d)] = acc / sum;
        }
      }
    }
  }
  return out;
}


// Random batches: every (query, head) is covered by exactly one CTA row, unsplit tiles visit the
// keys from their first query's window start to their last query's position, and a split tile's
// parts partition that range in order, in whole key tiles, with consecutive partial slots.
TEST(CudaAttentionPlan, CoversEveryQueryHeadOnceAndSplitsPartitionTheKeys) {
  std::mt19937 rng(5);
  const AttnShape shapes[] = {{8, 2, 64, 16, 0}, {8, 8, 80, 16, 7}, {32, 1, 64, 16, 0}, {12, 3, 128, 8, 300},
                              {40, 2, 128, 16, 0}};
  int split_tiles = 0;
  for (const AttnShape& s : shapes) {
    for (int target : {1, 264, 100000}) {
      for (int trial = 0; trial < 4; ++trial) {
        std::vector<Seq> seqs;
        const int n = 1 + static_cast<int>(rng() % 6);
        for (int i = 0; i < n; ++i) {
          const int32_t ctx = 1 + static_cast<int32_t>(rng() % 2000);
          const int kind = static_cast<int>(rng() % 3);  // decode, prefill chunk, idle
          const int32_t nq = kind == 0 ? 1 : kind == 1 ? 1 + static_cast<int32_t>(rng() % std::min(ctx, 70)) : 0;
          seqs.push_back({ctx, nq});
        }
        const HostBatch b = make_batch(seqs, s.block_size, static_cast<uint32_t>(rng()));
        const PagedAttention p = host_params(s, b);
        const cuda::AttentionPlan plan = cuda::plan_attention(p, target);
        const int group = s.n_heads / s.n_kv_heads;
        ASSERT_EQ(plan.group, group);
        ASSERT_EQ(plan.heads_per_cta, std::min(group, cuda::kAttnRows));
        ASSERT_EQ(plan.grid_y, s.n_kv_heads * ((group + plan.heads_per_cta - 1) / plan.heads_per_cta));
        ASSERT_EQ(plan.n_tokens, b.qstart.back());
        if (target == 1) {
          EXPECT_TRUE(plan.groups.empty());
        }

        std::vector<int> cover(static_cast<size_t>(plan.n_tokens * s.n_heads), 0);
        auto cover_tile = [&](const cuda::AttentionItem& it, int32_t key_lo, int32_t key_hi) {
          const int32_t q0 = b.qstart[static_cast<size_t>(it.seq)], nq = b.qstart[static_cast<size_t>(it.seq) + 1] - q0;
          const int32_t ctx = b.ctx[static_cast<size_t>(it.seq)];
          EXPECT_EQ(it.seen_q0, q0);
          EXPECT_EQ(it.seen_q_end, q0 + nq);
          EXPECT_EQ(it.seen_ctx, ctx);
          ASSERT_GE(it.n_q, 1);
          ASSERT_LE(it.n_q, plan.queries_per_cta);
          ASSERT_LE(it.q_first + it.n_q, nq);
          const int32_t first_pos = ctx - nq + it.q_first;
          EXPECT_EQ(key_lo, s.window > 0 ? std::max(0, first_pos - s.window + 1) : 0);
          EXPECT_EQ(key_hi, first_pos + it.n_q - 1);
          for (int y = 0; y < plan.grid_y; ++y) {
            const int kvh = y / plan.chunks_per_kv_head, first = (y % plan.chunks_per_kv_head) * plan.heads_per_cta;
            const int count = std::min(plan.heads_per_cta, group - first);
            for (int r = 0; r < cuda::kAttnRows; ++r) {
              const int qi = r / plan.heads_per_cta, hi = r % plan.heads_per_cta;
              if (qi >= it.n_q || hi >= count) continue;
              ++cover[static_cast<size_t>((q0 + it.q_first + qi) * s.n_heads + kvh * group + first + hi)];
            }
          }
        };
        std::vector<bool> in_group(plan.items.size(), false);
        int32_t next_slot = 0;
        for (const cuda::AttentionGroup& g : plan.groups) {
          ++split_tiles;
          ASSERT_GE(g.count, 2);
          EXPECT_EQ(g.first_slot, next_slot);
          next_slot += g.count;
          const cuda::AttentionItem& first = plan.items[static_cast<size_t>(g.first)];
          const cuda::AttentionItem& last = plan.items[static_cast<size_t>(g.first + g.count - 1)];
          for (int i = 0; i < g.count; ++i) {
            const cuda::AttentionItem& it = plan.items[static_cast<size_t>(g.first + i)];
            in_group[static_cast<size_t>(g.first + i)] = true;
            EXPECT_EQ(it.partial, g.first_slot + i);
            EXPECT_EQ(std::tie(it.seq, it.q_first, it.n_q), std::tie(first.seq, first.q_first, first.n_q));
            EXPECT_LE(it.key_lo, it.key_hi);
            if (i > 0) {
              EXPECT_EQ(it.key_lo, plan.items[static_cast<size_t>(g.first + i - 1)].key_hi + 1);
            }
            if (i + 1 < g.count) {
              EXPECT_EQ((it.key_hi - it.key_lo + 1) % cuda::kAttnKeys, 0);
            }
          }
          cover_tile(first, first.key_lo, last.key_hi);
        }
        EXPECT_EQ(plan.n_partials, next_slot);
        for (size_t i = 0; i < plan.items.size(); ++i) {
          if (in_group[i]) continue;
          EXPECT_EQ(plan.items[i].partial, -1);
          cover_tile(plan.items[i], plan.items[i].key_lo, plan.items[i].key_hi);
        }
        for (size_t i = 0; i < cover.size(); ++i) ASSERT_EQ(cover[i], 1) << "token-head " << i;
      }
    }
  }
  EXPECT_GT(split_tiles, 0) << "no batch exercised the split path";
}

// The kernel's algorithm over the plan (split or not) gives the reference attention: checks the
// tiling, the masks, the online softmax and the combine on any machine.
TEST(CudaAttentionPlan, KernelAlgorithmOverThePlanMatchesTheReference) {
  const std::vector<Seq> mixed = {{37, 37}, {50, 1}, {129, 17}, {1, 1}, {20, 0}, {700, 1}, {300, 5}};
  const AttnShape shapes[] = {{8, 2, 64, 16, 0}, {8, 2, 80, 16, 7}, {4, 4, 32, 8, 0}, {32, 1, 16, 16, 0},
                              {6, 3, 32, 16, 300}};
  uint32_t seed = 100;
  for (const AttnShape& s : shapes) {
    const HostBatch b = make_batch(mixed, s.block_size, ++seed);
    const PagedAttention p = host_params(s, b);
    const int64_t n_tokens = b.qstart.back(), kv_row = static_cast<int64_t>(s.n_kv_heads) * s.head_dim;
    const size_t cache = static_cast<size_t>(b.num_blocks) * s.block_size * static_cast<size_t>(kv_row);
    const std::vector<float> q = random_floats(static_cast<size_t>(n_tokens * s.n_heads * s.head_dim), ++seed, -2, 2);
    const std::vector<float> kc = random_floats(cache, ++seed), vc = random_floats(cache, ++seed);
    std::vector<float> want(q.size());
    cpu::ref::attention(p, q.data(), kc.data(), vc.data(), want.data());
    for (int target : {1, 10000}) {
      const cuda::AttentionPlan plan = cuda::plan_attention(p, target);
      if (target > 1 && s.window != 7) {  // a 7-position window leaves no long key range to split
        EXPECT_FALSE(plan.groups.empty());
      }
      expect_close(emulate_kernel(p, plan, q, kc, vc), want, 2e-6, 2e-5,
                   "emulated kernel, head_dim " + std::to_string(s.head_dim) + ", target " + std::to_string(target));
    }
  }
}

TEST(CudaIndexMirror, RecordsReadsAndForgets) {
  cuda::IndexMirror m;
  auto at = [](uintptr_t a) { return reinterpret_cast<const void*>(a); };  // device addresses: never dereferenced
  const std::vector<int32_t> v = {1, 2, 3, 4};
  std::vector<int32_t> out;
  m.record(at(0x1000), v.data(), 16);
  ASSERT_TRUE(m.read_i32(at(0x1000), 4, out));
  EXPECT_EQ(out, v);
  ASSERT_TRUE(m.read_i32(at(0x1004), 2, out));
  EXPECT_EQ(out, (std::vector<int32_t>{2, 3}));
  EXPECT_FALSE(m.read_i32(at(0x1000), 5, out));  // past the recorded bytes
  EXPECT_FALSE(m.read_i32(at(0x0ffc), 1, out));  // before them
  EXPECT_FALSE(m.read_i32(at(0x1010), 1, out));
  // A copy over part of a recorded range replaces it.
  const int32_t nine = 9;
  m.record(at(0x1008), &nine, 4);
  EXPECT_FALSE(m.read_i32(at(0x1000), 1, out));
  ASSERT_TRUE(m.read_i32(at(0x1008), 1, out));
  EXPECT_EQ(out[0], 9);
  // Any other write forgets what it overlaps, and only that.
  m.record(at(0x2000), v.data(), 16);
  m.forget(at(0x1ffc), 5);
  EXPECT_FALSE(m.read_i32(at(0x2000), 1, out));
  EXPECT_TRUE(m.read_i32(at(0x1008), 1, out));
  m.forget(at(0x1000), 8);
  EXPECT_TRUE(m.read_i32(at(0x1008), 1, out));
  m.forget(at(0x1000), 9);
  EXPECT_FALSE(m.read_i32(at(0x1008), 1, out));
  // Large copies are not kept, but still overwrite.
  m.record(at(0x3000), v.data(), 16);
  std::vector<unsigned char> big(cuda::IndexMirror::kMaxBytes + 4);
  m.record(at(0x2ff0), big.data(), big.size());
  EXPECT_FALSE(m.read_i32(at(0x3000), 1, out));
  EXPECT_EQ(m.size(), 0u);
}

// ---- the CUDA backend against the CPU backend (needs a GPU) ---------------------------------

struct Tol {
  double atol, rtol;
};

std::vector<unsigned char> encode(const std::vector<float>& v, DType t) {
  std::vector<unsigned char> out(v.size() * dtype_size(t));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::F32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = t == DType::F16 ? float_to_half(v[i]) : float_to_bf16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

class CudaOps : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
    act_ = GetParam();
    gpu_ = make_cuda_backend(0, act_);
    cpu_ = make_cpu_backend();
    tol_ = act_ == DType::F16 ? Tol{1e-3, 1.5e-3} : Tol{8e-3, 1.2e-2};
  }
  void TearDown() override {
    for (void* p : owned_) gpu_->free(p);
    owned_.clear();
  }

  float round(float v) const {
    return act_ == DType::F16 ? half_to_float(float_to_half(v)) : bf16_to_float(float_to_bf16(v));
  }
  std::vector<float> rounded(std::vector<float> v) const {
    for (float& x : v) x = round(x);
    return v;
  }
  void* alloc(size_t bytes) {
    void* p = gpu_->alloc(bytes);
    owned_.push_back(p);
    return p;
  }
  // v in the activation dtype on the GPU (v should hold rounded values already).
  void* put(const std::vector<float>& v) {
    const std::vector<unsigned char> b = encode(v, act_);
    void* p = alloc(b.size());
    gpu_->copy_to_device(p, b.data(), b.size());
    return p;
  }
  void* put_nan(size_t n) { return put(std::vector<float>(n, std::numeric_limits<float>::quiet_NaN())); }
  template <class T>
  T* put_raw(const std::vector<T>& v) {
    void* p = alloc(std::max<size_t>(v.size(), 1) * sizeof(T));
    gpu_->copy_to_device(p, v.data(), v.size() * sizeof(T));
    return static_cast<T*>(p);
  }
  const void* upload(const std::vector<unsigned char>& b) { return gpu_->upload(b.data(), b.size()); }
  std::vector<float> get(const void* p, size_t n) {
    std::vector<float> out(n, std::numeric_limits<float>::quiet_NaN());
    gpu_->to_host_f32(p, static_cast<int64_t>(n), out.data());
    return out;
  }
  void expect(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
    expect_close(got, want, tol_.atol, tol_.rtol, what + (act_ == DType::F16 ? " [f16]" : " [bf16]"));
  }

  // write_kv then attention for one batch whose tokens start at row `offset` of q, k, v and out
  // (query_start[0] == offset); the rows before it must be neither read nor written.
  void check_attention(const AttnShape& s, const std::vector<Seq>& seqs, int32_t offset, uint32_t seed,
                       const std::string& what) {
    HostBatch b = make_batch(seqs, s.block_size, seed);
    for (int32_t& q : b.qstart) q += offset;
    const int64_t n_rows = b.qstart.back(), kv_row = static_cast<int64_t>(s.n_kv_heads) * s.head_dim;
    const int64_t q_row = static_cast<int64_t>(s.n_heads) * s.head_dim;
    const size_t cache = static_cast<size_t>(b.num_blocks) * s.block_size * static_cast<size_t>(kv_row);
    const std::vector<float> k = rounded(random_floats(static_cast<size_t>(n_rows * kv_row), ++seed));
    const std::vector<float> v = rounded(random_floats(k.size(), ++seed));
    const std::vector<float> q = rounded(random_floats(static_cast<size_t>(n_rows * q_row), ++seed, -2, 2));
    const std::vector<float> k0 = rounded(random_floats(cache, ++seed)), v0 = rounded(random_floats(cache, ++seed));
    const PagedAttention hp = host_params(s, b);
    std::vector<float> kc = k0, vc = v0, want(q.size(), 0.0f);
    cpu_->write_kv(hp, k.data(), v.data(), kc.data(), vc.data());
    cpu_->attention(hp, q.data(), kc.data(), vc.data(), want.data());

    PagedAttention dp = hp;
    dp.query_start = put_raw(b.qstart);
    dp.context_len = put_raw(b.ctx);
    dp.block_table = put_raw(b.table);
    void* dkc = put(k0);
    void* dvc = put(v0);
    gpu_->write_kv(dp, put(k), put(v), dkc, dvc);
    expect_close(get(dkc, cache), kc, 0, 0, what + ": k cache");
    expect_close(get(dvc, cache), vc, 0, 0, what + ": v cache");
    void* dout = put_nan(q.size());
    gpu_->attention(dp, put(q), dkc, dvc, dout);
    const std::vector<float> got = get(dout, q.size());
    const size_t first = static_cast<size_t>(offset * q_row);
    for (size_t i = 0; i < first; ++i) ASSERT_TRUE(std::isnan(got[i])) << what << ": row " << i / q_row << " written";
    expect(std::vector<float>(got.begin() + static_cast<std::ptrdiff_t>(first), got.end()),
           std::vector<float>(want.begin() + static_cast<std::ptrdiff_t>(first), want.end()), what);
  }

  DType act_ = DType::F16;
  std::unique_ptr<Backend> gpu_, cpu_;
  Tol tol_{};
  std::vector<void*> owned_;
};

TEST_P(CudaOps, MemoryRoundTripsAndErrors) {
  EXPECT_EQ(gpu_->name().rfind("cuda:0 (", 0), 0u) << gpu_->name();
  EXPECT_EQ(gpu_->act_dtype(), act_);
  void* empty = gpu_->alloc(0);
  EXPECT_NE(empty, nullptr);
  gpu_->free(empty);
  gpu_->free(nullptr);

  std::mt19937 rng(3);
  std::vector<unsigned char> bytes(1000003);
  for (auto& c : bytes) c = static_cast<unsigned char>(rng());
  void* a = alloc(bytes.size());
  void* b = alloc(bytes.size());
  gpu_->copy_to_device(a, bytes.data(), bytes.size());
  gpu_->copy(b, a, bytes.size());
  gpu_->copy(static_cast<char*>(b) + 1, static_cast<char*>(a) + 7, 1001);  // unaligned, overlapping none
  std::vector<unsigned char> back(bytes.size());
  gpu_->copy_to_host(back.data(), b, back.size());
  std::vector<unsigned char> want = bytes;
  std::memcpy(want.data() + 1, bytes.data() + 7, 1001);
  EXPECT_EQ(back, want);

  const void* u = gpu_->upload(bytes.data(), 4096);
  std::vector<unsigned char> ub(4096);
  gpu_->copy_to_host(ub.data(), u, ub.size());
  EXPECT_TRUE(std::equal(ub.begin(), ub.end(), bytes.begin()));
  EXPECT_NE(gpu_->upload(nullptr, 0), nullptr);

  // to_host_f32 converts exactly.
  const std::vector<float> v = rounded(random_floats(777, 4, -60000, 60000));
  void* dv = put(v);
  EXPECT_EQ(get(dv, v.size()), v);
  gpu_->synchronize();

  try {
    gpu_->alloc(size_t{1} << 52);
    ADD_FAILURE() << "a 4 PiB allocation succeeded";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("out of memory"), std::string::npos) << m;
    EXPECT_NE(m.find("asked for"), std::string::npos) << m;
    EXPECT_NE(m.find("free"), std::string::npos) << m;
  }
  // The backend still works after it.
  void* dw = put(v);
  EXPECT_EQ(get(dw, v.size()), v);
}

TEST_P(CudaOps, NormsMatchCpu) {
  uint32_t seed = 10;
  const std::pair<int64_t, int64_t> sizes[] = {{1, 1}, {3, 769}, {17, 64}, {129, 769}, {3, 16411}, {1, 4096}};
  for (auto [m, n] : sizes) {
    for (DType pt : {DType::F32, DType::F16, DType::BF16}) {
      // A large mean (3) checks the two-pass variance.
      std::vector<float> x = random_floats(static_cast<size_t>(m * n), ++seed, 1.0f, 5.0f);
      x = rounded(x);
      const std::vector<float> g = random_floats(static_cast<size_t>(n), ++seed, 0.5f, 1.5f);
      const std::vector<float> bt = random_floats(static_cast<size_t>(n), ++seed, -0.5f, 0.5f);
      const std::vector<unsigned char> gb = encode(g, pt), bb = encode(bt, pt);
      const void* dg = upload(gb);
      const void* db = upload(bb);
      const std::string what = "[" + std::to_string(m) + ", " + std::to_string(n) + "] params " +
                               std::string(dtype_name(pt));
      for (int variant = 0; variant < 3; ++variant) {  // gamma + beta, gamma only, neither
        const void* hg = variant < 2 ? gb.data() : nullptr;
        const void* hb = variant < 1 ? bb.data() : nullptr;
        const void* gg = variant < 2 ? dg : nullptr;
        const void* gbeta = variant < 1 ? db : nullptr;
        std::vector<float> want(x.size());
        cpu_->layer_norm(x.data(), m, n, hg, hb, pt, 1e-5f, want.data());
        void* dx = put(x);
        void* dy = put_nan(x.size());
        gpu_->layer_norm(dx, m, n, gg, gbeta, pt, 1e-5f, dy);
        expect(get(dy, x.size()), want, "layer_norm " + what + " variant " + std::to_string(variant));
        gpu_->layer_norm(dx, m, n, gg, gbeta, pt, 1e-5f, dx);  // in place
        expect(get(dx, x.size()), want, "layer_norm in place " + what);

        if (variant == 0) continue;  // rms_norm: with gamma (1) and without (2)
        cpu_->rms_norm(x.data(), m, n, hg, pt, 1e-6f, want.data());
        void* rx = put(x);
        void* ry = put_nan(x.size());
        gpu_->rms_norm(rx, m, n, gg, pt, 1e-6f, ry);
        expect(get(ry, x.size()), want, "rms_norm " + what);
        gpu_->rms_norm(rx, m, n, gg, pt, 1e-6f, rx);
        expect(get(rx, x.size()), want, "rms_norm in place " + what);
      }
    }
  }
}

TEST_P(CudaOps, ActivationsAddAndGatedMatchCpu) {
  uint32_t seed = 20;
  for (Activation kind : {Activation::ReLU, Activation::GELU, Activation::GELUTanh, Activation::SiLU}) {
    const std::string name = "activation " + std::to_string(static_cast<int>(kind));
    for (int64_t count : {int64_t{1}, int64_t{3}, int64_t{769}, int64_t{100003}}) {
      const std::vector<float> x = rounded(random_floats(static_cast<size_t>(count), ++seed, -8.0f, 8.0f));
      std::vector<float> want = x;
      cpu_->activation(kind, want.data(), count);
      void* dx = put(x);
      gpu_->activation(kind, dx, count);
      expect(get(dx, x.size()), want, name);
    }
    for (auto [m, n] : {std::pair<int64_t, int64_t>{1, 769}, {3, 1}, {17, 769}, {129, 64}}) {
      const std::vector<float> gu = rounded(random_floats(static_cast<size_t>(m * 2 * n), ++seed, -6.0f, 6.0f));
      std::vector<float> want(static_cast<size_t>(m * n));
      cpu_->gated_activation(kind, gu.data(), m, n, want.data());
      void* dgu = put(gu);
      void* dout = put_nan(want.size());
      gpu_->gated_activation(kind, dgu, m, n, dout);
      expect(get(dout, want.size()), want, "gated " + name);
    }
  }
  for (int64_t count : {int64_t{1}, int64_t{769}, int64_t{100003}}) {
    const std::vector<float> x = rounded(random_floats(static_cast<size_t>(count), ++seed, -4, 4));
    const std::vector<float> y = rounded(random_floats(static_cast<size_t>(count), ++seed, -4, 4));
    std::vector<float> want = x;
    cpu_->add(want.data(), y.data(), count);
    void* dx = put(x);
    gpu_->add(dx, put(y), count);
    expect(get(dx, x.size()), want, "add");
  }
}

TEST_P(CudaOps, EmbeddingMatchesCpu) {
  uint32_t seed = 30;
  std::mt19937 rng(31);
  const int64_t table_rows = 50;
  for (DType t : {DType::F32, DType::F16, DType::BF16}) {  // one of them is the activations' (the MoE gather)
    for (int64_t dim : {int64_t{1}, int64_t{769}}) {
      const std::vector<float> table = random_floats(static_cast<size_t>(table_rows * dim), ++seed, -3, 3);
      const std::vector<unsigned char> tb = encode(table, t);
      const void* dt = upload(tb);
      for (int64_t n : {int64_t{1}, int64_t{3}, int64_t{129}}) {
        std::vector<int32_t> ids(static_cast<size_t>(n));
        for (auto& id : ids) id = static_cast<int32_t>(rng() % table_rows);  // repeats
        const int32_t* did = put_raw(ids);
        for (bool accumulate : {false, true}) {
          const std::vector<float> init = rounded(random_floats(static_cast<size_t>(n * dim), ++seed, -1, 1));
          std::vector<float> want = init;
          cpu_->embedding(tb.data(), t, dim, ids.data(), n, accumulate, want.data());
          void* dout = accumulate ? put(init) : put_nan(init.size());
          gpu_->embedding(dt, t, dim, did, n, accumulate, dout);
          expect(get(dout, want.size()), want,
                 "embedding " + std::string(dtype_name(t)) + " dim " + std::to_string(dim) + (accumulate ? " +=" : ""));
        }
      }
    }
  }
}

TEST_P(CudaOps, RotaryMatchesCpu) {
  uint32_t seed = 40;
  std::mt19937 rng(41);
  const int n_heads = 8, n_kv_heads = 2;
  for (int head_dim : {64, 80, 128}) {
    for (int rotary_dim : {head_dim, head_dim / 2}) {
      for (int64_t n_tokens : {int64_t{1}, int64_t{17}}) {
        std::vector<float> inv(static_cast<size_t>(rotary_dim / 2));
        for (size_t i = 0; i < inv.size(); ++i)
          inv[i] = static_cast<float>(1.0 / std::pow(10000.0, 2.0 * static_cast<double>(i) / rotary_dim));
        std::vector<int32_t> pos(static_cast<size_t>(n_tokens));
        for (auto& p : pos) p = static_cast<int32_t>(rng() % 100000);
        pos[0] = 0;
        const std::vector<float> q = rounded(random_floats(static_cast<size_t>(n_tokens * n_heads * head_dim), ++seed));
        const std::vector<float> k = rounded(random_floats(static_cast<size_t>(n_tokens * n_kv_heads * head_dim), ++seed));
        std::vector<float> wq = q, wk = k;
        cpu_->rotary(wq.data(), wk.data(), pos.data(), n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, inv.data());
        void* dq = put(q);
        void* dk = put(k);
        const auto* dinv = static_cast<const float*>(gpu_->upload(inv.data(), inv.size() * 4));
        gpu_->rotary(dq, dk, put_raw(pos), n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, dinv);
        const std::string what = "rotary head_dim " + std::to_string(head_dim) + " rotary_dim " + std::to_string(rotary_dim);
        expect(get(dq, q.size()), wq, what + " q");
        expect(get(dk, k.size()), wk, what + " k");
      }
    }
  }
}

// write_kv then attention over a shuffled block table, for batches mixing prefill chunks, decode
// tokens and idle sequences; GQA, MQA, MHA, a sliding window, head_dim 64 to 256, and long decode
// contexts that make the plan split keys over CTAs.
TEST_P(CudaOps, WriteKvAndAttentionMatchCpu) {
  const std::vector<Seq> mixed = {{37, 37}, {50, 1}, {129, 17}, {1, 1}, {20, 0}, {300, 5}, {64, 1}};
  const std::vector<Seq> long_decode = {{1500, 1}, {700, 1}};
  const std::vector<Seq> long_window = {{1500, 1}, {700, 1}, {900, 3}};
  struct Case {
    AttnShape shape;
    std::vector<Seq> seqs;
  };
  const Case cases[] = {
      {{8, 2, 64, 16, 0}, mixed},        {{8, 2, 80, 16, 7}, mixed},         {{4, 4, 128, 8, 0}, mixed},
      {{32, 1, 64, 16, 0}, mixed},       {{6, 2, 256, 16, 0}, mixed},        {{8, 2, 128, 16, 0}, long_decode},
      {{8, 2, 128, 16, 300}, long_window}, {{12, 3, 80, 32, 0}, long_window},
  };
  uint32_t seed = 50;
  for (const Case& c : cases) {
    const AttnShape& s = c.shape;
    const HostBatch b = make_batch(c.seqs, s.block_size, ++seed);
    const int64_t n_tokens = b.qstart.back(), kv_row = static_cast<int64_t>(s.n_kv_heads) * s.head_dim;
    const size_t cache = static_cast<size_t>(b.num_blocks) * s.block_size * static_cast<size_t>(kv_row);
    const std::vector<float> k = rounded(random_floats(static_cast<size_t>(n_tokens * kv_row), ++seed));
    const std::vector<float> v = rounded(random_floats(k.size(), ++seed));
    const std::vector<float> q = rounded(random_floats(static_cast<size_t>(n_tokens * s.n_heads * s.head_dim), ++seed, -2, 2));
    const std::vector<float> k0 = rounded(random_floats(cache, ++seed)), v0 = rounded(random_floats(cache, ++seed));

    const PagedAttention hp = host_params(s, b);
    std::vector<float> kc = k0, vc = v0, want(q.size());
    cpu_->write_kv(hp, k.data(), v.data(), kc.data(), vc.data());
    cpu_->attention(hp, q.data(), kc.data(), vc.data(), want.data());

    PagedAttention dp = hp;
    dp.query_start = put_raw(b.qstart);
    dp.context_len = put_raw(b.ctx);
    dp.block_table = put_raw(b.table);
    void* dkc = put(k0);
    void* dvc = put(v0);
    const std::string what = "attention heads " + std::to_string(s.n_heads) + "/" + std::to_string(s.n_kv_heads) +
                             " head_dim " + std::to_string(s.head_dim) + " window " + std::to_string(s.window);
    gpu_->write_kv(dp, put(k), put(v), dkc, dvc);
    expect_close(get(dkc, cache), kc, 0, 0, what + ": k cache");  // copies: exact
    expect_close(get(dvc, cache), vc, 0, 0, what + ": v cache");
    void* dq = put(q);
    void* dout = put_nan(q.size());
    gpu_->attention(dp, dq, dkc, dvc, dout);
    expect(get(dout, q.size()), want, what);

    // Index arrays that did not come from copy_to_device (a device-to-device copy here): the
    // backend reads them back to plan, with the same result.
    PagedAttention rp = dp;
    auto* qs2 = static_cast<int32_t*>(alloc(b.qstart.size() * 4));
    auto* ctx2 = static_cast<int32_t*>(alloc(b.ctx.size() * 4));
    gpu_->copy(qs2, dp.query_start, b.qstart.size() * 4);
    gpu_->copy(ctx2, dp.context_len, b.ctx.size() * 4);
    rp.query_start = qs2;
    rp.context_len = ctx2;
    void* dout2 = put_nan(q.size());
    gpu_->attention(rp, dq, dkc, dvc, dout2);
    expect(get(dout2, q.size()), want, what + " (index arrays read back)");
  }
}

// A step whose tokens do not start at row 0 (query_start[0] != 0): prefill chunks, decodes and
// contexts long enough that the plan splits keys over CTAs.
TEST_P(CudaOps, AttentionWithQueryStartOffset) {
  const std::vector<Seq> mixed = {{37, 37}, {50, 1}, {129, 17}, {20, 0}, {300, 5}};
  const std::vector<Seq> long_decode = {{1500, 1}, {700, 1}};
  check_attention({8, 2, 64, 16, 0}, mixed, 5, 300, "mixed, offset 5");
  check_attention({8, 2, 128, 16, 0}, long_decode, 3, 310, "long decode, offset 3");
  check_attention({12, 3, 80, 32, 300}, {{1500, 1}, {900, 3}}, 1, 320, "window, offset 1");
}

// The same with a backend that NaN-fills its workspaces before every use
// (CudaOptions::poison_workspaces): split attention tiles must read only the partial results
// this call wrote, and the linear layers only their own split-K slices.
TEST_P(CudaOps, AttentionAndLinearWithPoisonedWorkspaces) {
  gpu_ = make_cuda_backend(0, act_, CudaOptions{.poison_workspaces = true});
  check_attention({8, 2, 128, 16, 0}, {{1500, 1}, {700, 1}, {64, 1}}, 0, 330, "poisoned, long decode");
  check_attention({8, 2, 64, 16, 0}, {{37, 37}, {129, 17}, {2000, 2}}, 2, 340, "poisoned, mixed, offset 2");
  if (::testing::Test::HasFatalFailure()) return;
  // An int4 g128 GEMV whose few rows make it split K (a reduction over the poisoned workspace),
  // and the same weight at m = 600 (dequantized into the poisoned workspace for cuBLAS).
  const int64_t n = 40, k = 4096;
  std::mt19937 rng(350);
  std::vector<unsigned char> codes(static_cast<size_t>(n * k / 2));
  for (auto& c : codes) c = static_cast<unsigned char>(rng() & 0xff);
  std::vector<uint16_t> scales(static_cast<size_t>(n * (k / 128)));
  for (auto& v : scales) v = float_to_half(0.0005f + 0.001f * static_cast<float>(rng() % 1000) / 1000.0f);
  WeightMatrix w;
  w.rows = n;
  w.cols = k;
  w.bits = 4;
  w.group = 128;
  w.dtype = DType::U8;
  w.data = codes.data();
  w.scales = scales.data();
  const WeightMatrix cw = cpu_->upload_weight(w), gw = gpu_->upload_weight(w);
  for (int64_t m : {int64_t{2}, int64_t{600}}) {
    const std::vector<float> x = rounded(random_floats(static_cast<size_t>(m * k), 351));
    std::vector<float> want(static_cast<size_t>(m * n));
    cpu_->linear(cw, x.data(), m, nullptr, DType::F32, want.data());
    void* y = put_nan(want.size());
    gpu_->linear(gw, put(x), m, nullptr, DType::F32, y);
    double scale = 0;
    for (float v : want) scale = std::max(scale, static_cast<double>(std::fabs(v)));
    expect_close(get(y, want.size()), want, (act_ == DType::F16 ? 3e-3 : 2.5e-2) * std::max(scale, 1.0), tol_.rtol,
                 "poisoned linear m " + std::to_string(m));
  }
}

TEST_P(CudaOps, MoeRouteAndScatterMatchCpu) {
  uint32_t seed = 60;
  std::mt19937 rng(61);
  for (auto [n_experts, top_k] : {std::pair{8, 2}, std::pair{4, 1}, std::pair{3, 3}}) {
    for (int64_t n_tokens : {int64_t{1}, int64_t{17}, int64_t{129}}) {
      std::vector<float> logits = rounded(random_floats(static_cast<size_t>(n_tokens * n_experts), ++seed, -4, 4));
      for (int e = 0; e < n_experts; ++e) logits[static_cast<size_t>(e)] = 0.25f;  // a row of exact ties
      for (int64_t t = 1; t < n_tokens; t += 2) logits[static_cast<size_t>(t * n_experts + 1)] = logits[static_cast<size_t>(t * n_experts)];
      const size_t n = static_cast<size_t>(n_tokens * top_k);
      std::vector<int32_t> want_ids(n), got_ids(n, -7);
      std::vector<float> want_w(n), got_w(n, std::numeric_limits<float>::quiet_NaN());
      cpu_->moe_route(logits.data(), n_tokens, n_experts, top_k, want_ids.data(), want_w.data());
      auto* dids = put_raw(got_ids);  // poisoned
      auto* dw = put_raw(got_w);
      gpu_->moe_route(put(logits), n_tokens, n_experts, top_k, dids, dw);
      gpu_->copy_to_host(got_ids.data(), dids, n * 4);
      gpu_->copy_to_host(got_w.data(), dw, n * 4);
      EXPECT_EQ(got_ids, want_ids) << n_experts << " experts, top " << top_k << ", " << n_tokens << " tokens";
      expect_close(got_w, want_w, 1e-7, 1e-5, "router weights");
    }
  }
  // Scatter-add with repeated rows (more than one 256-entry tile of rows at n = 300).
  const int64_t dst_rows = 20;
  for (int64_t n : {int64_t{1}, int64_t{17}, int64_t{300}}) {
    for (int64_t dim : {int64_t{1}, int64_t{769}}) {
      const std::vector<float> src = rounded(random_floats(static_cast<size_t>(n * dim), ++seed, -1, 1));
      const std::vector<float> dst = rounded(random_floats(static_cast<size_t>(dst_rows * dim), ++seed, -1, 1));
      std::vector<int32_t> rows(static_cast<size_t>(n));
      for (auto& r : rows) r = static_cast<int32_t>(rng() % dst_rows);
      const std::vector<float> w = random_floats(static_cast<size_t>(n), ++seed, 0, 1);
      std::vector<float> want = dst;
      cpu_->scatter_add_rows(src.data(), rows.data(), w.data(), n, dim, want.data(), dst_rows);
      void* dsrc = put(src);
      const int32_t* drows = put_raw(rows);
      const float* dw = put_raw(w);
      void* ddst = put(dst);
      gpu_->scatter_add_rows(dsrc, drows, dw, n, dim, ddst, dst_rows);
      const std::vector<float> got = get(ddst, dst.size());
      expect(got, want, "scatter_add_rows n " + std::to_string(n) + " dim " + std::to_string(dim));
      void* again = put(dst);  // deterministic: the same bits every run
      gpu_->scatter_add_rows(dsrc, drows, dw, n, dim, again, dst_rows);
      EXPECT_EQ(get(again, dst.size()), got);
    }
  }
}

// Linear layers through upload_weight / linear (kernels/cuda/gemm.h). Dense weights are made
// representable in the activation dtype, so the GPU's conversion of them is exact; FineQuant codes
// times scales are rounded to the activation dtype by the dequantizing paths, a relative error of
// half an ulp per weight, which over K terms of random sign stays within ~half an ulp of the output
// scale: atol is a multiple of max|y| for those (3e-3 fp16, 2.5e-2 bf16).
TEST_P(CudaOps, LinearMatchesCpu) {
  uint32_t seed = 70;
  std::mt19937 rng(71);
  struct W {
    int bits;
    DType dtype;  // dense
    int64_t cols, group;
  };
  const W weights[] = {{0, DType::F32, 769, 0},  {0, DType::F16, 64, 0},   {0, DType::BF16, 768, 0},
                       {8, DType::I8, 769, 769}, {8, DType::I8, 768, 256}, {4, DType::U8, 768, 32},
                       {4, DType::U8, 64, 64}};
  for (const W& wd : weights) {
    for (int64_t rows : {int64_t{1}, int64_t{3}, int64_t{129}}) {
      WeightMatrix w;
      w.rows = rows;
      w.cols = wd.cols;
      w.bits = wd.bits;
      w.dtype = wd.dtype;
      w.group = wd.group;
      std::vector<unsigned char> data;
      std::vector<uint16_t> scales;
      if (wd.bits == 0) {
        data = encode(rounded(random_floats(static_cast<size_t>(rows * wd.cols), ++seed, -0.1f, 0.1f)), wd.dtype);
      } else {
        const int64_t n = rows * wd.cols;
        data.resize(static_cast<size_t>(wd.bits == 8 ? n : n / 2));
        for (auto& c : data) c = static_cast<unsigned char>(wd.bits == 8 ? (rng() % 255 + 129) & 0xff : rng() & 0xff);
        scales.resize(static_cast<size_t>(rows * (wd.cols / wd.group)));
        for (auto& s : scales) s = float_to_half(0.0005f + 0.001f * static_cast<float>(rng() % 1000) / 1000.0f);
        w.scales = scales.data();
      }
      w.data = data.data();
      const WeightMatrix cw = cpu_->upload_weight(w), gw = gpu_->upload_weight(w);
      EXPECT_EQ(std::tie(gw.rows, gw.cols, gw.bits, gw.group), std::tie(w.rows, w.cols, w.bits, w.group));
      for (DType bt : {DType::F32, DType::F16}) {
        const std::vector<unsigned char> bias = encode(rounded(random_floats(static_cast<size_t>(rows), ++seed)), bt);
        const void* dbias = upload(bias);
        for (int64_t m : {int64_t{1}, int64_t{3}, int64_t{17}, int64_t{129}}) {
          const std::vector<float> x = rounded(random_floats(static_cast<size_t>(m * wd.cols), ++seed));
          std::vector<float> want(static_cast<size_t>(m * rows));
          cpu_->linear(cw, x.data(), m, bias.data(), bt, want.data());
          void* dy = put_nan(want.size());
          gpu_->linear(gw, put(x), m, dbias, bt, dy);
          double scale = 0;
          for (float y : want) scale = std::max(scale, static_cast<double>(std::fabs(y)));
          const double atol = (wd.bits ? (act_ == DType::F16 ? 3e-3 : 2.5e-2) : tol_.atol / 4) * std::max(scale, 1.0);
          expect_close(get(dy, want.size()), want, atol, tol_.rtol,
                       "linear bits " + std::to_string(wd.bits) + " [" + std::to_string(rows) + ", " +
                           std::to_string(wd.cols) + "] m " + std::to_string(m));
        }
      }
    }
  }
}

// The engine may drive the backend from a worker thread.
TEST_P(CudaOps, WorksFromAnotherThread) {
  const std::vector<float> x = rounded(random_floats(1000, 80)), y = rounded(random_floats(1000, 81));
  std::vector<float> want = x;
  cpu_->add(want.data(), y.data(), 1000);
  void* dx = put(x);
  void* dy = put(y);
  std::vector<float> got;
  std::thread t([&] {
    gpu_->add(dx, dy, 1000);
    got = get(dx, 1000);
  });
  t.join();
  expect(got, want, "add from another thread");
}

INSTANTIATE_TEST_SUITE_P(Act, CudaOps, ::testing::Values(DType::F16, DType::BF16),
                         [](const ::testing::TestParamInfo<DType>& i) { return std::string(dtype_name(i.param)); });

#endif  // FINESERVE_HAVE_CUDA

}  // namespace
}  // namespace fineserve
