#include "engine/kv_cache.h"

#include <algorithm>
#include <limits>
#include <string>

#include "kernels/base.h"
#include "models/model.h"  // kv_bytes_per_token

namespace fineserve {

BlockManager::BlockManager(int num_blocks, int block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks < 1)
    throw Error("KV cache: num_blocks must be >= 1, got " + std::to_string(num_blocks) +
                " (the memory budget holds no cache block)");
  if (block_size < 1) throw Error("KV cache: block_size must be >= 1, got " + std::to_string(block_size));
  // Pushed in reverse so that a fresh manager hands out blocks 0, 1, 2, ... in order.
  free_.reserve(static_cast<size_t>(num_blocks));
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

int64_t BlockManager::blocks_for_tokens(int64_t n_tokens) const {
  FS_ASSERT(n_tokens >= 0);
  return n_tokens / block_size_ + (n_tokens % block_size_ != 0 ? 1 : 0);
}

int64_t BlockManager::new_blocks_needed(SeqId seq, int64_t n_tokens) const {
  const auto it = tables_.find(seq);
  const int64_t have = it == tables_.end() ? 0 : static_cast<int64_t>(it->second.size());
  return std::max<int64_t>(0, blocks_for_tokens(n_tokens) - have);
}

bool BlockManager::ensure_capacity(SeqId seq, int64_t n_tokens) {
  const int64_t need = new_blocks_needed(seq, n_tokens);
  if (need > num_free_blocks()) return false;  // all or nothing: nothing has been touched yet
  std::vector<int32_t>& table = tables_[seq];
  for (int64_t i = 0; i < need; ++i) {
    table.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void BlockManager::free(SeqId seq) {
  const auto it = tables_.find(seq);
  FS_ASSERT(it != tables_.end(), "freeing an unknown sequence (double free?)");
  // Returned in reverse so the sequence's first block is the next one reused.
  for (auto b = it->second.rbegin(); b != it->second.rend(); ++b) free_.push_back(*b);
  tables_.erase(it);
  FS_ASSERT(static_cast<int>(free_.size()) <= num_blocks_);
}

const std::vector<int32_t>& BlockManager::table_of(SeqId seq) const {
  const auto it = tables_.find(seq);
  FS_ASSERT(it != tables_.end(), "unknown sequence");
  return it->second;
}

int64_t BlockManager::capacity(SeqId seq) const {
  return static_cast<int64_t>(table_of(seq).size()) * block_size_;
}

std::span<const int32_t> BlockManager::block_table(SeqId seq) const { return table_of(seq); }

int BlockManager::max_table_len(std::span<const SeqId> seqs) const {
  size_t longest = 0;
  for (SeqId s : seqs) longest = std::max(longest, table_of(s).size());
  return static_cast<int>(longest);
}

void BlockManager::fill_block_table(std::span<const SeqId> seqs, int max_blocks,
                                    std::span<int32_t> out) const {
  FS_ASSERT(max_blocks >= 0);
  FS_ASSERT(out.size() == seqs.size() * static_cast<size_t>(max_blocks), "block table buffer size");
  for (size_t s = 0; s < seqs.size(); ++s) {
    const std::vector<int32_t>& table = table_of(seqs[s]);
    FS_ASSERT(table.size() <= static_cast<size_t>(max_blocks), "block table longer than max_blocks");
    int32_t* row = out.data() + s * static_cast<size_t>(max_blocks);
    std::copy(table.begin(), table.end(), row);
    std::fill(row + table.size(), row + max_blocks, 0);
  }
}

std::vector<int32_t> BlockManager::dense_block_table(std::span<const SeqId> seqs, int max_blocks) const {
  FS_ASSERT(max_blocks >= 0);
  std::vector<int32_t> out(seqs.size() * static_cast<size_t>(max_blocks));
  fill_block_table(seqs, max_blocks, out);
  return out;
}

int64_t kv_block_bytes(int n_layers, int n_kv_heads, int head_dim, int block_size, int dtype_bytes) {
  const struct {
    const char* name;
    int value;
  } factors[] = {{"n_layers", n_layers},
                 {"n_kv_heads", n_kv_heads},
                 {"head_dim", head_dim},
                 {"block_size", block_size},
                 {"dtype_bytes", dtype_bytes}};
  int64_t bytes = 2;  // K and V: checked here for range and overflow, computed by the models' formula
  for (const auto& f : factors) {
    if (f.value < 1)
      throw Error(std::string("KV cache size: ") + f.name + " must be >= 1, got " + std::to_string(f.value));
    if (bytes > std::numeric_limits<int64_t>::max() / f.value)
      throw Error("KV cache size: bytes per block overflow int64");
    bytes *= f.value;
  }
  return block_size * static_cast<int64_t>(kv_bytes_per_token(n_layers, static_cast<int64_t>(n_kv_heads) * head_dim,
                                                              static_cast<uint64_t>(dtype_bytes)));
}

int blocks_for_budget(int64_t bytes, int n_layers, int n_kv_heads, int head_dim, int block_size,
                      int dtype_bytes) {
  const int64_t per_block = kv_block_bytes(n_layers, n_kv_heads, head_dim, block_size, dtype_bytes);
  if (bytes <= 0) return 0;
  return static_cast<int>(std::min<int64_t>(bytes / per_block, std::numeric_limits<int32_t>::max()));
}

}  // namespace fineserve
