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
//
// Automatic prefix caching (after vLLM's), when the manager is built with prefix_caching = true:
// a full block is named by a hash chained over its tokens and its prefix's hash (BlockHash), so
// equal hashes mean equal keys and values. Blocks are reference-counted and shared by every
// sequence whose prefix they hold; a freed block that has a hash is not wiped but parked in an
// LRU list, still findable, and evicted only when the plain free list runs dry. A sequence only
// ever shares full blocks, so it never writes into a shared one (its next token opens a new block).
//   const PrefixMatch hit = blocks.match_prefix(tokens, tokens.size() - 1);  // read-only lookup
//   if (blocks.allocate(seq, hit, hit.num_tokens + chunk)) num_computed = hit.num_tokens;
//   ...after each step: blocks.commit(seq, tokens, num_computed);   // hashes newly full blocks
#pragma once

#include <cstdint>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

namespace fineserve {

// A sequence (request) handle; the engine chooses the values. Any int64 is a valid id.
using SeqId = int64_t;

// The identity of a full block's contents: hash_block(parent, tokens) chains the hash of the block
// before it (or, for a sequence's first block, a salt) with the block's token ids.
using BlockHash = uint64_t;

// The hash of a full block whose prefix hashes to `parent`. The first block of a sequence takes the
// salt as its parent: anything besides the tokens that changes the keys and values (a model
// variant, an adapter, a per-tenant namespace) goes into the salt, so such blocks never match.
BlockHash hash_block(BlockHash parent, std::span<const int32_t> tokens);

// The result of BlockManager::match_prefix: cached full blocks holding a sequence's first tokens.
struct PrefixMatch {
  int64_t num_tokens = 0;        // tokens covered: blocks.size() * block_size
  int64_t queried_tokens = 0;    // tokens the lookup was asked about (the queries metric)
  BlockHash salt = 0;
  std::vector<int32_t> blocks;   // block ids, in position order
  std::vector<BlockHash> hashes; // their hashes
};

// Cumulative prefix-cache counters, in tokens (vLLM's meaning): every admission of a sequence
// queries its tokens; hits are the tokens found in the cache.
struct PrefixCacheStats {
  uint64_t queries = 0;
  uint64_t hits = 0;
};

class BlockManager {
 public:
  // num_blocks >= 1 cache blocks of block_size >= 1 token slots each; all start free.
  // Throws fineserve::Error otherwise (the counts come from flags and the memory budget).
  BlockManager(int num_blocks, int block_size, bool prefix_caching = false);

  int num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  // Blocks a sequence can take now: the free list plus cached blocks no sequence references
  // (those are evicted on demand).
  int num_free_blocks() const { return static_cast<int>(free_.size() + evictable_.size()); }
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

  // Drops `seq`'s reference on each of its blocks and forgets the sequence. A block no sequence
  // references any more returns to the free list, or, when it has a hash, to the back of the LRU
  // list of evictable cached blocks (the sequence's last block first, so that its tails are
  // evicted before the prefixes others are likelier to share).
  // FS_ASSERT: `seq` is known (freeing twice, or a never-allocated id, is a bug).
  void free(SeqId seq);

  // --- Prefix caching (no-ops / empty results when prefix_caching is off) ---

  // The longest run of cached full blocks that holds tokens[0, n) with n <= max_tokens. Changes
  // nothing. Callers pass max_tokens = tokens.size() - 1 so that at least the last token is
  // computed again and the step that computes it yields logits.
  PrefixMatch match_prefix(std::span<const int32_t> tokens, int64_t max_tokens, BlockHash salt = 0) const;
  // Registers the unknown (or block-less) sequence `seq` holding the matched blocks (taking a
  // reference on each) plus new blocks up to n_tokens >= match.num_tokens tokens, and counts the
  // lookup in stats(). All or nothing: returns false, changing nothing, when the blocks that are
  // not already referenced do not fit in num_free_blocks(). The match must be fresh (taken since
  // the last change to the manager).
  bool allocate(SeqId seq, const PrefixMatch& match, int64_t n_tokens);
  // Gives a hash to each block of `seq` that tokens[0, num_computed) fill completely and that has
  // none yet, making it findable by match_prefix. A block whose hash some other block already
  // holds (two sequences computed the same prefix at once) stays unregistered.
  void commit(SeqId seq, std::span<const int32_t> tokens, int64_t num_computed);
  PrefixCacheStats stats() const { return stats_; }
  // Blocks that hold a hash (referenced or evictable).
  int num_cached_blocks() const { return static_cast<int>(cached_.size()); }
  // Sequences referencing `block` (0 for a free or evictable block).
  int ref_count(int32_t block) const;

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
  const std::vector<int32_t>& table_of(SeqId seq) const { return seq_of(seq).table; }

  struct SeqBlocks {
    std::vector<int32_t> table;      // block ids, in position order
    std::vector<BlockHash> hashes;   // hashes of table's first hashes.size() (full) blocks
    BlockHash salt = 0;
  };
  struct BlockState {
    int ref_count = 0;
    bool hashed = false;               // registered in cached_ under `hash`
    BlockHash hash = 0;
    std::list<int32_t>::iterator lru;  // valid while in evictable_
  };
  const SeqBlocks& seq_of(SeqId seq) const;
  int32_t take_block();            // from the free list, else evicts the least recently used
  void release(int32_t block);     // drops one reference

  int num_blocks_;
  int block_size_;
  bool prefix_caching_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::list<int32_t> evictable_;  // cached blocks without references; front = evicted first
  std::vector<BlockState> state_;  // by block id
  std::vector<int32_t> tokens_;    // [num_blocks, block_size]: the tokens of each hashed block
  std::unordered_map<BlockHash, int32_t> cached_;  // hash -> block
  std::unordered_map<SeqId, SeqBlocks> tables_;
  PrefixCacheStats stats_;
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
