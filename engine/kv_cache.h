// Paged KV cache: host-side bookkeeping of fixed-size cache blocks (after vLLM's PagedAttention).
//
// The cache memory itself belongs to the model, which allocates it on its backend once per layer
// as K and V arrays of layout [num_blocks, block_size, n_kv_heads, head_dim]. This file only
// decides which block holds which tokens: a free list of block ids and, per sequence, a block
// table. Token position p of a sequence lives in block block_table[p / block_size], slot
// p % block_size — exactly what PagedAttention (kernels/ops.h) reads.
//
// Typical use by the scheduler, each step:
//   if (!blocks.ensure_capacity(seq, n_tokens_after_this_step)) { ...preempt someone, retry... }
//   ...
//   const int max_blocks = blocks.max_table_len(step_seqs);
//   blocks.fill_block_table(step_seqs, max_blocks, table);   // -> PagedAttention::block_table
//   ...when the request finishes or is preempted:
//   blocks.free(seq);
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

namespace fineserve {

// A sequence (request) handle; the engine chooses the values. Any int64 is a valid id.
using SeqId = int64_t;

class BlockManager {
 public:
  // num_blocks >= 1 cache blocks of block_size >= 1 token slots each; all start free.
  // Throws fineserve::Error otherwise (the counts come from flags and the memory budget).
  BlockManager(int num_blocks, int block_size);

  int num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  int num_free_blocks() const { return static_cast<int>(free_.size()); }
  int num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  // Fraction of blocks in use, in [0, 1].
  double usage() const { return static_cast<double>(num_used_blocks()) / num_blocks_; }

  // Blocks needed to hold n_tokens >= 0 tokens: ceil(n_tokens / block_size).
  int64_t blocks_for_tokens(int64_t n_tokens) const;
  // Blocks that ensure_capacity(seq, n_tokens) would take from the free list now (0 when the
  // sequence already holds that many; an unknown sequence counts as holding none).
  int64_t new_blocks_needed(SeqId seq, int64_t n_tokens) const;
  // Whether a new sequence of n_tokens tokens would fit in the free blocks now.
  bool can_allocate(int64_t n_tokens) const { return blocks_for_tokens(n_tokens) <= num_free_blocks(); }
  // Whether ensure_capacity(seq, n_tokens) would succeed now.
  bool can_grow(SeqId seq, int64_t n_tokens) const {
    return new_blocks_needed(seq, n_tokens) <= num_free_blocks();
  }

  // Makes `seq` hold at least n_tokens >= 0 tokens, taking blocks from the free list as needed.
  // An unknown sequence is registered (with zero blocks when n_tokens == 0), so a sequence freed
  // by preemption can be allocated again under the same id. Never shrinks a sequence.
  // Returns false, changing nothing, when there are not enough free blocks.
  bool ensure_capacity(SeqId seq, int64_t n_tokens);

  // Returns every block of `seq` to the free list and forgets the sequence.
  // FS_ASSERT: `seq` is known (freeing twice, or a never-allocated id, is a bug).
  void free(SeqId seq);

  bool contains(SeqId seq) const { return tables_.contains(seq); }
  int num_seqs() const { return static_cast<int>(tables_.size()); }
  // Tokens `seq` can hold without allocating: its block count * block_size. FS_ASSERT: known.
  int64_t capacity(SeqId seq) const;
  // The block ids of `seq`, in position order. FS_ASSERT: known. The span is invalidated by the
  // next ensure_capacity or free of any sequence.
  std::span<const int32_t> block_table(SeqId seq) const;

  // The longest block table among `seqs` (0 for none): the max_blocks a dense table needs.
  int max_table_len(std::span<const SeqId> seqs) const;
  // Writes the dense [seqs.size(), max_blocks] int32 table PagedAttention reads: row s holds
  // block_table(seqs[s]) followed by padding. Padding entries are block 0, a valid id, because
  // the kernels never read a slot at or past a sequence's context_len, so any valid id is safe
  // and an out-of-range one would only add a hazard. FS_ASSERT: every seq is known and fits in
  // max_blocks; out.size() == seqs.size() * max_blocks.
  void fill_block_table(std::span<const SeqId> seqs, int max_blocks, std::span<int32_t> out) const;
  // Same, returning a new vector.
  std::vector<int32_t> dense_block_table(std::span<const SeqId> seqs, int max_blocks) const;

 private:
  const std::vector<int32_t>& table_of(SeqId seq) const;

  int num_blocks_;
  int block_size_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::unordered_map<SeqId, std::vector<int32_t>> tables_;
};

// Bytes one cache block takes over all layers, K and V:
// 2 * n_layers * block_size * n_kv_heads * head_dim * dtype_bytes.
// Throws fineserve::Error when an argument is < 1 or the product overflows int64.
int64_t kv_block_bytes(int n_layers, int n_kv_heads, int head_dim, int block_size, int dtype_bytes);

// How many whole cache blocks fit in `bytes` (0 when bytes <= 0), capped at INT32_MAX because
// block ids are int32. Same argument checks as kv_block_bytes.
int blocks_for_budget(int64_t bytes, int n_layers, int n_kv_heads, int head_dim, int block_size,
                      int dtype_bytes);

}  // namespace fineserve
