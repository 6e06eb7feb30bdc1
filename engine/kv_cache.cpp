#include "engine/kv_cache.h"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <string>

#include "kernels/base.h"
#include "models/model.h"  // kv_bytes_per_token

namespace fineserve {

namespace {

// splitmix64's finaliser: a cheap bijective mixer with full avalanche.
uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

BlockHash hash_block(BlockHash parent, std::span<const int32_t> tokens) {
  // Each step mixes the running state with the next token, so order matters; the length is mixed
  // in last so that blocks of different sizes never collide by construction.
  uint64_t h = mix(parent ^ 0x9e3779b97f4a7c15ull);
  for (int32_t t : tokens) h = mix(h ^ static_cast<uint32_t>(t)) + 0x9e3779b97f4a7c15ull;
  return mix(h ^ tokens.size());
}

BlockManager::BlockManager(int num_blocks, int block_size, bool prefix_caching)
    : num_blocks_(num_blocks), block_size_(block_size), prefix_caching_(prefix_caching) {
  if (num_blocks < 1)
    throw Error("KV cache: num_blocks must be >= 1, got " + std::to_string(num_blocks) +
                " (the memory budget holds no cache block)");
  if (block_size < 1) throw Error("KV cache: block_size must be >= 1, got " + std::to_string(block_size));
  // Pushed in reverse so that a fresh manager hands out blocks 0, 1, 2, ... in order.
  free_.reserve(static_cast<size_t>(num_blocks));
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
  state_.resize(static_cast<size_t>(num_blocks));
  if (prefix_caching_) tokens_.resize(static_cast<size_t>(num_blocks) * static_cast<size_t>(block_size));
}

int64_t BlockManager::blocks_for_tokens(int64_t n_tokens) const {
  FS_ASSERT(n_tokens >= 0);
  return n_tokens / block_size_ + (n_tokens % block_size_ != 0 ? 1 : 0);
}

int64_t BlockManager::new_blocks_needed(SeqId seq, int64_t n_tokens) const {
  const auto it = tables_.find(seq);
  const int64_t have = it == tables_.end() ? 0 : static_cast<int64_t>(it->second.table.size());
  return std::max<int64_t>(0, blocks_for_tokens(n_tokens) - have);
}

int32_t BlockManager::take_block() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {
    // The free list ran dry: evict the least recently released cached block.
    FS_ASSERT(!evictable_.empty(), "no block left to take");
    b = evictable_.front();
    evictable_.pop_front();
    BlockState& st = state_[static_cast<size_t>(b)];
    cached_.erase(st.hash);
    st.hashed = false;
  }
  FS_ASSERT(state_[static_cast<size_t>(b)].ref_count == 0);
  state_[static_cast<size_t>(b)].ref_count = 1;
  return b;
}

void BlockManager::release(int32_t b) {
  BlockState& st = state_[static_cast<size_t>(b)];
  FS_ASSERT(st.ref_count > 0, "releasing an unreferenced block");
  if (--st.ref_count > 0) return;
  if (st.hashed) {
    st.lru = evictable_.insert(evictable_.end(), b);
  } else {
    free_.push_back(b);
  }
}

bool BlockManager::ensure_capacity(SeqId seq, int64_t n_tokens) {
  const int64_t need = new_blocks_needed(seq, n_tokens);
  if (need > num_free_blocks()) return false;  // all or nothing: nothing has been touched yet
  std::vector<int32_t>& table = tables_[seq].table;
  for (int64_t i = 0; i < need; ++i) table.push_back(take_block());
  return true;
}

void BlockManager::free(SeqId seq) {
  const auto it = tables_.find(seq);
  FS_ASSERT(it != tables_.end(), "freeing an unknown sequence (double free?)");
  // Released in reverse: without caching the sequence's first block is the next one reused; with
  // it, the tail blocks go to the LRU list first and are evicted first.
  for (auto b = it->second.table.rbegin(); b != it->second.table.rend(); ++b) release(*b);
  tables_.erase(it);
  FS_ASSERT(num_free_blocks() <= num_blocks_);
}

PrefixMatch BlockManager::match_prefix(std::span<const int32_t> tokens, int64_t max_tokens, BlockHash salt) const {
  PrefixMatch m;
  m.salt = salt;
  m.queried_tokens = static_cast<int64_t>(tokens.size());
  if (!prefix_caching_) return m;
  const int64_t limit = std::min<int64_t>(max_tokens, static_cast<int64_t>(tokens.size()));
  BlockHash parent = salt;
  for (int64_t start = 0; start + block_size_ <= limit; start += block_size_) {
    const std::span<const int32_t> block = tokens.subspan(static_cast<size_t>(start), static_cast<size_t>(block_size_));
    const BlockHash h = hash_block(parent, block);
    const auto hit = cached_.find(h);
    if (hit == cached_.end()) break;
    // Compare the tokens too: a 64-bit collision must not hand out someone else's keys and values.
    const int32_t* stored = tokens_.data() + static_cast<size_t>(hit->second) * static_cast<size_t>(block_size_);
    if (!std::equal(block.begin(), block.end(), stored)) break;
    m.blocks.push_back(hit->second);
    m.hashes.push_back(h);
    parent = h;
  }
  m.num_tokens = static_cast<int64_t>(m.blocks.size()) * block_size_;
  return m;
}

bool BlockManager::allocate(SeqId seq, const PrefixMatch& match, int64_t n_tokens) {
  FS_ASSERT(n_tokens >= match.num_tokens);
  const auto existing = tables_.find(seq);
  FS_ASSERT(existing == tables_.end() || existing->second.table.empty(), "allocate() on a sequence holding blocks");
  // Matched blocks nobody references sit in the evictable pool, so taking them uses it up too.
  int64_t from_pool = blocks_for_tokens(n_tokens) - static_cast<int64_t>(match.blocks.size());
  for (int32_t b : match.blocks) {
    const BlockState& st = state_[static_cast<size_t>(b)];
    FS_ASSERT(st.hashed && cached_.at(st.hash) == b, "stale prefix match");
    if (st.ref_count == 0) ++from_pool;
  }
  if (from_pool > num_free_blocks()) return false;
  SeqBlocks& s = tables_[seq];
  s.salt = match.salt;
  s.hashes = match.hashes;
  for (int32_t b : match.blocks) {
    BlockState& st = state_[static_cast<size_t>(b)];
    if (st.ref_count++ == 0) evictable_.erase(st.lru);
    s.table.push_back(b);
  }
  while (static_cast<int64_t>(s.table.size()) < blocks_for_tokens(n_tokens)) s.table.push_back(take_block());
  if (prefix_caching_) {
    stats_.queries += static_cast<uint64_t>(match.queried_tokens);
    stats_.hits += static_cast<uint64_t>(match.num_tokens);
  }
  return true;
}

void BlockManager::commit(SeqId seq, std::span<const int32_t> tokens, int64_t num_computed) {
  if (!prefix_caching_) return;
  const auto it = tables_.find(seq);
  FS_ASSERT(it != tables_.end(), "unknown sequence");
  SeqBlocks& s = it->second;
  FS_ASSERT(num_computed <= static_cast<int64_t>(tokens.size()) && num_computed <= capacity(seq));
  const size_t full = static_cast<size_t>(num_computed / block_size_);
  while (s.hashes.size() < full) {
    const size_t i = s.hashes.size();
    const std::span<const int32_t> block = tokens.subspan(i * static_cast<size_t>(block_size_), static_cast<size_t>(block_size_));
    const BlockHash h = hash_block(i == 0 ? s.salt : s.hashes.back(), block);
    s.hashes.push_back(h);
    const int32_t b = s.table[i];
    BlockState& st = state_[static_cast<size_t>(b)];
    if (st.hashed || cached_.contains(h)) continue;  // already findable, or a twin block is
    st.hashed = true;
    st.hash = h;
    cached_.emplace(h, b);
    std::copy(block.begin(), block.end(), tokens_.begin() + static_cast<ptrdiff_t>(static_cast<size_t>(b) * static_cast<size_t>(block_size_)));
  }
}

int BlockManager::ref_count(int32_t block) const {
  FS_ASSERT(block >= 0 && block < num_blocks_);
  return state_[static_cast<size_t>(block)].ref_count;
}

const BlockManager::SeqBlocks& BlockManager::seq_of(SeqId seq) const {
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
