// Host-side planning for the CUDA backend's attention and KV-write kernels (ops_attention.cu,
// ops_elementwise.cu), and the host mirror of small index arrays that feeds it. Plain C++ (no CUDA
// headers), so that the tests check the plan on any machine.
//
// Why a plan: PagedAttention's index arrays live in device memory, but the launch shape (how many
// query tiles, how many CTAs, whether to split long contexts) depends on their values. The backend
// keeps a host copy of every small copy_to_device (IndexMirror) and plans from it; when the arrays
// were not copied from the host it reads them back (one synchronisation). The kernels re-read the
// device arrays and flag a mismatch with what the plan saw (kFaultAttentionPlan), so a stale plan
// stops the process at the next synchronisation instead of giving wrong attention silently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include "kernels/ops.h"

namespace fineserve::cuda {

// ---- the attention kernel's geometry (ops_attention.cu) ------------------------------------
// A CTA of kAttnWarps warps holds kAttnRows (query, head) rows of one KV head: a tile of queries
// of one sequence times the query heads that share that KV head (GQA), so that K and V are read
// once for all of them. It walks the keys kAttnKeys at a time, one key per lane.
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = 32 * kAttnWarps;
constexpr int kAttnRows = 16;  // kAttnWarps warps x 4 rows
constexpr int kAttnKeys = 32;
constexpr int kAttnMaxHeadDim = 256;
// Splitting one tile's keys over several CTAs (flash-decoding) pays only for long contexts.
constexpr int kAttnMinSplitKeys = 256;
constexpr int kAttnMaxSplits = 64;

// Bits of the backend's fault word, set by kernels that find their inputs broken.
constexpr int kFaultAttentionPlan = 1;  // index arrays differ from what the host planned with
constexpr int kFaultScatterRow = 2;     // scatter_add_rows: a row outside [0, dst_rows)
constexpr int kFaultEmbeddingId = 4;    // embedding: a negative id
constexpr int kFaultBlockTable = 8;     // write_kv / attention: a negative block id for a live position

// One CTA's work (int32 fields only: uploaded as is).
struct AttentionItem {
  int32_t seq;      // the sequence
  int32_t q_first;  // its first query in the tile, counted within the sequence's queries
  int32_t n_q;      // queries in the tile (<= queries_per_cta)
  int32_t key_lo;   // the cache positions this CTA visits, inclusive
  int32_t key_hi;
  int32_t partial;  // -1: writes the output; else the slot of this split's partial result
  // What the plan saw: query_start[seq], query_start[seq + 1], context_len[seq].
  int32_t seen_q0, seen_q_end, seen_ctx;
};

// The splits of one tile, combined by a second kernel: items [first, first + count) whose partial
// slots are [first_slot, first_slot + count).
struct AttentionGroup {
  int32_t first;
  int32_t count;
  int32_t first_slot;
};

struct AttentionPlan {
  int group = 1;               // query heads per KV head
  int heads_per_cta = 1;       // query heads of one KV head a CTA holds (<= kAttnRows)
  int chunks_per_kv_head = 1;  // ceil(group / heads_per_cta)
  int queries_per_cta = 1;     // kAttnRows / heads_per_cta
  int grid_y = 1;              // n_kv_heads * chunks_per_kv_head
  int64_t n_tokens = 0;        // query_start[n_seqs] - query_start[0]
  int32_t q_begin = 0, q_end = 0;  // query_start[0], query_start[n_seqs]
  std::vector<AttentionItem> items;
  std::vector<AttentionGroup> groups;
  int n_partials = 0;          // partial slots (each grid_y * kAttnRows rows of head_dim + 2 floats)
};

// Plans attention for `p` whose query_start / context_len point to HOST copies (block_table is
// not read). Tiles whose key range is long are split while there are fewer than `target_ctas`
// CTAs (about two per SM). FS_ASSERTs the PagedAttention invariants (kernels/ops.h).
AttentionPlan plan_attention(const PagedAttention& p, int target_ctas);

// Host copies of recent small host-to-device copies, by device address.
class IndexMirror {
 public:
  static constexpr size_t kMaxBytes = 64 * 1024;  // larger copies are not kept
  static constexpr size_t kMaxEntries = 1024;     // past it, everything is forgotten

  // copy_to_device(dev, host, bytes): remembers the bytes when small, forgets what they overwrite.
  void record(const void* dev, const void* host, size_t bytes);
  // Any other write to [dev, dev + bytes) (a device copy, a free): entries overlapping it go.
  void forget(const void* dev, size_t bytes);
  void clear() { entries_.clear(); }
  // Copies `count` int32 at `dev` into `out` when one recorded copy holds them all; else false.
  bool read_i32(const void* dev, size_t count, std::vector<int32_t>& out) const;
  size_t size() const { return entries_.size(); }

 private:
  std::map<uintptr_t, std::vector<unsigned char>> entries_;  // start address -> bytes
};

}  // namespace fineserve::cuda
