#include "kernels/cuda/ops_plan.h"

#include <algorithm>
#include <cstring>
#include <iterator>

#include "kernels/base.h"

namespace fineserve::cuda {

AttentionPlan plan_attention(const PagedAttention& p, int target_ctas) {
  FS_ASSERT(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0, "n_kv_heads must divide n_heads");
  FS_ASSERT(p.head_dim > 0 && p.block_size > 0 && p.n_seqs >= 0 && p.sliding_window >= 0);
  FS_ASSERT(p.n_seqs == 0 || (p.query_start && p.context_len && p.max_blocks > 0));
  AttentionPlan plan;
  plan.group = p.n_heads / p.n_kv_heads;
  plan.heads_per_cta = std::min(plan.group, kAttnRows);
  plan.chunks_per_kv_head = (plan.group + plan.heads_per_cta - 1) / plan.heads_per_cta;
  plan.queries_per_cta = kAttnRows / plan.heads_per_cta;
  plan.grid_y = p.n_kv_heads * plan.chunks_per_kv_head;
  if (p.n_seqs == 0) return plan;
  plan.q_begin = p.query_start[0];
  plan.q_end = p.query_start[p.n_seqs];
  plan.n_tokens = static_cast<int64_t>(plan.q_end) - plan.q_begin;
  FS_ASSERT(plan.n_tokens >= 0, "query_start must not decrease");

  // Query tiles: up to queries_per_cta consecutive queries of one sequence. A tile visits the keys
  // from its first query's window start to its last query's position (the causal mask inside).
  std::vector<AttentionItem> tiles;
  for (int s = 0; s < p.n_seqs; ++s) {
    const int32_t q0 = p.query_start[s], q1 = p.query_start[s + 1], ctx = p.context_len[s], nq = q1 - q0;
    FS_ASSERT(nq >= 0 && nq <= ctx, "a sequence has more queries than context");
    FS_ASSERT((static_cast<int64_t>(ctx) + p.block_size - 1) / p.block_size <= p.max_blocks,
              "context does not fit the block table");
    for (int32_t i0 = 0; i0 < nq; i0 += plan.queries_per_cta) {
      AttentionItem t{};
      t.seq = s;
      t.q_first = i0;
      t.n_q = std::min(plan.queries_per_cta, nq - i0);
      const int32_t pos_first = ctx - nq + i0;
      t.key_lo = p.sliding_window > 0 ? std::max(0, pos_first - p.sliding_window + 1) : 0;
      t.key_hi = pos_first + t.n_q - 1;
      t.partial = -1;
      t.seen_q0 = q0;
      t.seen_q_end = q1;
      t.seen_ctx = ctx;
      tiles.push_back(t);
    }
  }

  // Too few CTAs for the GPU (decode of a small batch): split long key ranges into chunks of whole
  // key tiles, each CTA a partial softmax, combined afterwards.
  const int64_t base = static_cast<int64_t>(tiles.size()) * plan.grid_y;
  int want = 1;
  if (base > 0 && base < target_ctas) want = static_cast<int>(std::min<int64_t>((target_ctas + base - 1) / base, kAttnMaxSplits));
  for (const AttentionItem& t : tiles) {
    const int64_t len = static_cast<int64_t>(t.key_hi) - t.key_lo + 1;
    const int64_t by_len = (len + kAttnMinSplitKeys - 1) / kAttnMinSplitKeys;
    int64_t n_split = std::min<int64_t>(want, by_len);
    if (n_split <= 1) {
      plan.items.push_back(t);
      continue;
    }
    int64_t chunk = (len + n_split - 1) / n_split;
    chunk = (chunk + kAttnKeys - 1) / kAttnKeys * kAttnKeys;
    n_split = (len + chunk - 1) / chunk;
    AttentionGroup g{static_cast<int32_t>(plan.items.size()), static_cast<int32_t>(n_split), plan.n_partials};
    for (int64_t i = 0; i < n_split; ++i) {
      AttentionItem part = t;
      part.key_lo = static_cast<int32_t>(t.key_lo + i * chunk);
      part.key_hi = static_cast<int32_t>(std::min<int64_t>(t.key_hi, t.key_lo + (i + 1) * chunk - 1));
      part.partial = plan.n_partials++;
      plan.items.push_back(part);
    }
    plan.groups.push_back(g);
  }
  return plan;
}

void IndexMirror::record(const void* dev, const void* host, size_t bytes) {
  forget(dev, bytes);
  if (bytes == 0 || bytes > kMaxBytes) return;
  if (entries_.size() >= kMaxEntries) entries_.clear();
  const auto* h = static_cast<const unsigned char*>(host);
  entries_.emplace(reinterpret_cast<uintptr_t>(dev), std::vector<unsigned char>(h, h + bytes));
}

void IndexMirror::forget(const void* dev, size_t bytes) {
  if (bytes == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(dev);
  // Recorded ranges never overlap each other, so only the entry just before `a` can reach into it.
  auto it = entries_.upper_bound(a);
  if (it != entries_.begin()) {
    auto prev = std::prev(it);
    if (prev->first + prev->second.size() > a) it = prev;
  }
  while (it != entries_.end() && it->first < a + bytes) it = entries_.erase(it);
}

bool IndexMirror::read_i32(const void* dev, size_t count, std::vector<int32_t>& out) const {
  const uintptr_t a = reinterpret_cast<uintptr_t>(dev);
  auto it = entries_.upper_bound(a);
  if (it == entries_.begin()) return false;
  --it;
  const size_t offset = a - it->first, bytes = count * 4;
  if (offset + bytes > it->second.size()) return false;
  out.resize(count);
  if (bytes) std::memcpy(out.data(), it->second.data() + offset, bytes);
  return true;
}

}  // namespace fineserve::cuda
