// The BlockManager's automatic prefix caching: hash chain, sharing, reference counts, LRU eviction.
#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "engine/kv_cache.h"

namespace fineserve {
namespace {

std::vector<int32_t> iota_tokens(int n, int32_t first) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::vector<int32_t> table_vec(const BlockManager& bm, SeqId seq) {
  const auto t = bm.block_table(seq);
  return {t.begin(), t.end()};
}

// Admits `seq` the way the engine does: the longest cached prefix (never the whole sequence), then
// blocks for the rest, and marks every token computed. Returns the tokens found in the cache.
int64_t admit_and_compute(BlockManager& bm, SeqId seq, const std::vector<int32_t>& tokens, BlockHash salt = 0) {
  const PrefixMatch hit = bm.match_prefix(tokens, static_cast<int64_t>(tokens.size()) - 1, salt);
  EXPECT_TRUE(bm.allocate(seq, hit, static_cast<int64_t>(tokens.size())));
  bm.commit(seq, tokens, static_cast<int64_t>(tokens.size()));
  return hit.num_tokens;
}

TEST(PrefixCache, HashChainsOverTokensPrefixAndSalt) {
  const std::vector<int32_t> a = {1, 2, 3, 4};
  const std::vector<int32_t> b = {1, 2, 4, 3};
  EXPECT_EQ(hash_block(0, a), hash_block(0, a));
  EXPECT_NE(hash_block(0, a), hash_block(0, b));  // order matters
  EXPECT_NE(hash_block(0, a), hash_block(1, a));  // so does the prefix (or salt)
  EXPECT_NE(hash_block(0, std::vector<int32_t>{1, 2, 3}), hash_block(0, a));

  // Same second block after different first blocks: a different key.
  BlockManager bm(16, 4, true);
  admit_and_compute(bm, 1, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  EXPECT_EQ(bm.match_prefix(std::vector<int32_t>{0, 2, 3, 4, 5, 6, 7, 8, 9}, 8).num_tokens, 0);
  EXPECT_EQ(bm.match_prefix(std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 0, 9}, 8).num_tokens, 4);
  EXPECT_EQ(bm.match_prefix(std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9}, 8).num_tokens, 8);
  // Another salt (namespace) never matches.
  EXPECT_EQ(bm.match_prefix(std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9}, 8, 77).num_tokens, 0);
  // The partial third block (token 9) was never registered.
  EXPECT_EQ(bm.num_cached_blocks(), 2);
}

TEST(PrefixCache, SharedBlocksAreReferenceCountedAndCountedOnce) {
  BlockManager bm(16, 4, true);
  const std::vector<int32_t> p = iota_tokens(14, 100);  // 3 full blocks + 2 tokens
  EXPECT_EQ(admit_and_compute(bm, 1, p), 0);
  EXPECT_EQ(bm.num_used_blocks(), 4);

  std::vector<int32_t> q = p;
  q.resize(12);
  q.push_back(5);  // shares the 3 full blocks, then diverges
  EXPECT_EQ(admit_and_compute(bm, 2, q), 12);
  const auto t1 = table_vec(bm, 1), t2 = table_vec(bm, 2);
  ASSERT_EQ(t2.size(), 4u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(t1[static_cast<size_t>(i)], t2[static_cast<size_t>(i)]);
    EXPECT_EQ(bm.ref_count(t1[static_cast<size_t>(i)]), 2);
  }
  EXPECT_NE(t1[3], t2[3]);  // the partial block is private: a sequence never writes into a shared one
  EXPECT_EQ(bm.ref_count(t2[3]), 1);
  EXPECT_EQ(bm.num_used_blocks(), 5);  // 4 + 1 private block, shared ones once

  // Diverging inside the second block: only the first is shared.
  std::vector<int32_t> r = p;
  r[6] = 0;
  EXPECT_EQ(admit_and_compute(bm, 3, r), 4);
  EXPECT_EQ(bm.ref_count(t1[0]), 3);
  EXPECT_EQ(bm.ref_count(t1[1]), 2);

  bm.free(1);
  EXPECT_EQ(bm.ref_count(t1[0]), 2);
  EXPECT_EQ(bm.ref_count(t1[2]), 1);
  bm.free(2);
  bm.free(3);
  EXPECT_EQ(bm.num_used_blocks(), 0);
  EXPECT_EQ(bm.num_free_blocks(), 16);
  // Freed, yet still findable.
  EXPECT_EQ(bm.match_prefix(p, 13).num_tokens, 12);
}

TEST(PrefixCache, AFullyCachedPromptRecomputesItsLastBlock) {
  BlockManager bm(16, 4, true);
  const std::vector<int32_t> p = iota_tokens(8, 1);  // exactly two blocks
  admit_and_compute(bm, 1, p);
  bm.free(1);
  // At most size - 1 tokens may come from the cache: the second block is computed again (into a
  // block of its own) so that the step yields the last token's logits.
  const PrefixMatch hit = bm.match_prefix(p, 7);
  EXPECT_EQ(hit.num_tokens, 4);
  EXPECT_EQ(hit.queried_tokens, 8);
  ASSERT_TRUE(bm.allocate(2, hit, 8));
  EXPECT_EQ(bm.block_table(2).size(), 2u);
  bm.commit(2, p, 8);  // its recomputed twin is not registered a second time
  EXPECT_EQ(bm.num_cached_blocks(), 2);
  std::vector<int32_t> longer = p;
  longer.push_back(9);
  EXPECT_EQ(bm.match_prefix(longer, 8).num_tokens, 8);
}

TEST(PrefixCache, EvictsLeastRecentlyFreedBlocksOnlyWhenTheFreeListRunsDry) {
  BlockManager bm(6, 2, true);
  const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6};        // 3 full blocks
  const std::vector<int32_t> b = {7, 8, 9, 10, 11, 12, 13};  // 4 blocks
  admit_and_compute(bm, 1, a);
  bm.free(1);
  EXPECT_EQ(bm.num_free_blocks(), 6);
  EXPECT_EQ(bm.num_cached_blocks(), 3);

  // Takes the 3 never-used blocks first, then evicts a's tail block (released first).
  ASSERT_EQ(admit_and_compute(bm, 2, b), 0);
  EXPECT_EQ(bm.match_prefix(a, 5).num_tokens, 4);
  bm.free(2);  // b's 3 full blocks join the LRU after a's 2; its partial block goes to the free list
  EXPECT_EQ(bm.num_free_blocks(), 6);

  // Two new blocks: the free one, then the oldest evictable one, a's second block (a keeps its first).
  ASSERT_TRUE(bm.ensure_capacity(3, 4));
  EXPECT_EQ(bm.match_prefix(a, 5).num_tokens, 2);
  EXPECT_EQ(bm.match_prefix(b, 6).num_tokens, 6);
  // Reusing a's first block refreshes it: the next eviction takes b's tail instead.
  const PrefixMatch hit = bm.match_prefix(a, 5);
  ASSERT_TRUE(bm.allocate(4, hit, 2));
  bm.free(4);
  ASSERT_TRUE(bm.ensure_capacity(3, 6));  // b's blocks are older now; its tail goes first
  EXPECT_EQ(bm.match_prefix(b, 6).num_tokens, 4);
  EXPECT_EQ(bm.match_prefix(a, 5).num_tokens, 2);
}

TEST(PrefixCache, MatchedEvictableBlocksCountAgainstTheFreePool) {
  BlockManager bm(4, 2, true);
  const std::vector<int32_t> a = {1, 2, 3, 4};
  admit_and_compute(bm, 1, a);
  bm.free(1);
  ASSERT_TRUE(bm.ensure_capacity(2, 4));  // takes the 2 free blocks; a's 2 remain evictable
  EXPECT_EQ(bm.num_free_blocks(), 2);
  const std::vector<int32_t> longer = {1, 2, 3, 4, 5};
  const PrefixMatch hit = bm.match_prefix(longer, 4);
  ASSERT_EQ(hit.num_tokens, 4);
  // 2 evictable matched blocks + 1 new one > 2 available: refused, nothing changed.
  EXPECT_FALSE(bm.allocate(3, hit, 5));
  EXPECT_FALSE(bm.contains(3));
  EXPECT_EQ(bm.num_free_blocks(), 2);
  EXPECT_EQ(bm.stats().queries, 4u);  // only a's admission was counted
  // Only the matched blocks: fits.
  ASSERT_TRUE(bm.allocate(3, hit, 4));
  EXPECT_EQ(bm.num_free_blocks(), 0);
  EXPECT_FALSE(bm.can_grow(3, 5));
}

TEST(PrefixCache, PreemptionAndCancelKeepCountsRight) {
  BlockManager bm(12, 4, true);
  const std::vector<int32_t> prompt = iota_tokens(10, 1);
  admit_and_compute(bm, 1, prompt);
  EXPECT_EQ(admit_and_compute(bm, 2, prompt), 8);
  const auto shared = table_vec(bm, 1);
  EXPECT_EQ(bm.ref_count(shared[0]), 2);

  // Sequence 2 decodes 6 tokens (its own blocks), then is preempted: its references go, sequence
  // 1's blocks stay referenced, its own full blocks stay cached for its recomputation.
  std::vector<int32_t> seq2 = prompt;
  for (int32_t t = 50; t < 56; ++t) {
    seq2.push_back(t);
    ASSERT_TRUE(bm.ensure_capacity(2, static_cast<int64_t>(seq2.size())));
    bm.commit(2, seq2, static_cast<int64_t>(seq2.size()));
  }
  EXPECT_EQ(bm.num_used_blocks(), 3 + 2);
  bm.free(2);  // preemption
  EXPECT_EQ(bm.ref_count(shared[0]), 1);
  EXPECT_EQ(bm.ref_count(shared[1]), 1);
  EXPECT_EQ(bm.num_used_blocks(), 3);
  // Readmitted: prompt and generated tokens come back from the cache, all 4 full blocks but the
  // last (16 tokens, so the last must be computed again).
  EXPECT_EQ(admit_and_compute(bm, 2, seq2), 12);
  EXPECT_EQ(bm.ref_count(shared[0]), 2);

  // Cancel both: everything is free or evictable, nothing referenced.
  bm.free(1);
  bm.free(2);
  EXPECT_EQ(bm.num_used_blocks(), 0);
  for (int b = 0; b < bm.num_blocks(); ++b) EXPECT_EQ(bm.ref_count(b), 0);
  EXPECT_EQ(bm.stats().queries, 10u + 10u + 16u);
  EXPECT_EQ(bm.stats().hits, 0u + 8u + 12u);
}

TEST(PrefixCache, OffByDefaultBehavesAsBefore) {
  BlockManager bm(8, 2);
  EXPECT_FALSE(bm.prefix_caching());
  const std::vector<int32_t> a = {1, 2, 3, 4};
  admit_and_compute(bm, 1, a);
  bm.free(1);
  EXPECT_EQ(bm.match_prefix(a, 3).num_tokens, 0);
  EXPECT_EQ(bm.num_cached_blocks(), 0);
  EXPECT_EQ(bm.stats().queries, 0u);
  ASSERT_TRUE(bm.ensure_capacity(2, 1));
  EXPECT_EQ(table_vec(bm, 2), (std::vector<int32_t>{0}));  // the freed first block, reused first
}

// Random admissions (with shared prefixes), growth and frees against the invariants: every
// reference is a table entry, referenced + available = all blocks, and a matched block holds the
// tokens it is matched for.
TEST(PrefixCache, RandomOpsKeepInvariants) {
  const int num_blocks = 40, block_size = 3;
  BlockManager bm(num_blocks, block_size, true);
  std::mt19937_64 rng(99);
  std::map<SeqId, std::vector<int32_t>> seqs;
  std::map<int32_t, std::vector<int32_t>> content;  // block -> the tokens it was computed with
  for (int op = 0; op < 3000; ++op) {
    const SeqId id = static_cast<SeqId>(rng() % 10);
    if (seqs.contains(id)) {
      if (rng() % 3 == 0) {
        bm.free(id);
        seqs.erase(id);
      } else {
        std::vector<int32_t>& t = seqs[id];
        t.push_back(static_cast<int32_t>(rng() % 3));
        if (!bm.ensure_capacity(id, static_cast<int64_t>(t.size()))) {
          bm.free(id);  // preempted
          seqs.erase(id);
        } else {
          bm.commit(id, t, static_cast<int64_t>(t.size()));
        }
      }
    } else {
      // Prompts from a small alphabet share prefixes often.
      std::vector<int32_t> t(1 + rng() % 12);
      for (auto& x : t) x = static_cast<int32_t>(rng() % 2);
      const PrefixMatch hit = bm.match_prefix(t, static_cast<int64_t>(t.size()) - 1);
      for (size_t i = 0; i < hit.blocks.size(); ++i) {
        const std::vector<int32_t> want(t.begin() + static_cast<long>(i) * block_size,
                                        t.begin() + static_cast<long>(i + 1) * block_size);
        ASSERT_EQ(content.at(hit.blocks[i]), want) << "op " << op;
      }
      if (bm.allocate(id, hit, static_cast<int64_t>(t.size()))) {
        bm.commit(id, t, static_cast<int64_t>(t.size()));
        seqs[id] = t;
      }
    }
    // Record what each sequence's full blocks hold (their keys and values, in a real cache).
    std::vector<int> refs(num_blocks, 0);
    for (const auto& [s, t] : seqs) {
      const auto table = bm.block_table(s);
      for (size_t i = 0; i < table.size(); ++i) {
        ++refs[static_cast<size_t>(table[i])];
        if ((i + 1) * block_size <= t.size())
          content[table[i]] = std::vector<int32_t>(t.begin() + static_cast<long>(i) * block_size,
                                                   t.begin() + static_cast<long>(i + 1) * block_size);
      }
    }
    int referenced = 0;
    for (int b = 0; b < num_blocks; ++b) {
      ASSERT_EQ(bm.ref_count(b), refs[static_cast<size_t>(b)]) << "op " << op << " block " << b;
      referenced += refs[static_cast<size_t>(b)] > 0;
    }
    ASSERT_EQ(bm.num_used_blocks(), referenced);
    ASSERT_EQ(bm.num_free_blocks() + referenced, num_blocks);
  }
  EXPECT_GT(bm.stats().hits, 0u);
}

}  // namespace
}  // namespace fineserve
