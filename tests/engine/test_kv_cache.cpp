#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "engine/kv_cache.h"
#include "kernels/base.h"

namespace fineserve {
namespace {

std::vector<int32_t> table_vec(const BlockManager& bm, SeqId seq) {
  const auto t = bm.block_table(seq);
  return {t.begin(), t.end()};
}

TEST(BlockManager, RejectsBadSizes) {
  EXPECT_THROW(BlockManager(0, 16), Error);
  EXPECT_THROW(BlockManager(-3, 16), Error);
  EXPECT_THROW(BlockManager(8, 0), Error);
  EXPECT_NO_THROW(BlockManager(1, 1));
}

TEST(BlockManager, BlocksForTokensRoundsUp) {
  const BlockManager bm(4, 16);
  EXPECT_EQ(bm.blocks_for_tokens(0), 0);
  EXPECT_EQ(bm.blocks_for_tokens(1), 1);
  EXPECT_EQ(bm.blocks_for_tokens(16), 1);
  EXPECT_EQ(bm.blocks_for_tokens(17), 2);
  EXPECT_EQ(bm.blocks_for_tokens(33), 3);
}

TEST(BlockManager, GrowsAcrossBlockBoundaries) {
  BlockManager bm(10, 4);
  EXPECT_EQ(bm.num_free_blocks(), 10);
  EXPECT_DOUBLE_EQ(bm.usage(), 0.0);

  ASSERT_TRUE(bm.ensure_capacity(7, 1));
  EXPECT_EQ(table_vec(bm, 7), (std::vector<int32_t>{0}));
  EXPECT_EQ(bm.capacity(7), 4);
  for (int n = 2; n <= 4; ++n) {  // still inside the first block
    ASSERT_TRUE(bm.ensure_capacity(7, n));
    EXPECT_EQ(bm.block_table(7).size(), 1u);
  }
  ASSERT_TRUE(bm.ensure_capacity(7, 5));  // crosses into a second block
  EXPECT_EQ(table_vec(bm, 7), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(bm.capacity(7), 8);
  ASSERT_TRUE(bm.ensure_capacity(7, 3));  // never shrinks
  EXPECT_EQ(bm.block_table(7).size(), 2u);
  ASSERT_TRUE(bm.ensure_capacity(7, 13));  // several blocks at once (a prefill chunk)
  EXPECT_EQ(table_vec(bm, 7), (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(bm.num_free_blocks(), 6);
  EXPECT_EQ(bm.num_used_blocks(), 4);
  EXPECT_DOUBLE_EQ(bm.usage(), 0.4);
  EXPECT_EQ(bm.new_blocks_needed(7, 16), 0);
  EXPECT_EQ(bm.new_blocks_needed(7, 17), 1);
  EXPECT_EQ(bm.new_blocks_needed(99, 17), 5);  // unknown: holds none
}

TEST(BlockManager, ZeroTokensRegistersTheSequence) {
  BlockManager bm(2, 8);
  EXPECT_FALSE(bm.contains(5));
  ASSERT_TRUE(bm.ensure_capacity(5, 0));
  EXPECT_TRUE(bm.contains(5));
  EXPECT_TRUE(bm.block_table(5).empty());
  EXPECT_EQ(bm.num_free_blocks(), 2);
  bm.free(5);
  EXPECT_FALSE(bm.contains(5));
}

TEST(BlockManager, ExhaustionFailsWithoutPartialAllocation) {
  BlockManager bm(5, 3);
  ASSERT_TRUE(bm.ensure_capacity(1, 9));  // 3 blocks
  EXPECT_EQ(bm.num_free_blocks(), 2);

  // A new sequence needing 4 blocks does not fit: nothing is taken, the id is not registered.
  EXPECT_FALSE(bm.can_allocate(10));
  EXPECT_FALSE(bm.ensure_capacity(2, 10));
  EXPECT_FALSE(bm.contains(2));
  EXPECT_EQ(bm.num_free_blocks(), 2);

  // Growing an existing one by 3 blocks with 2 free fails and leaves its table as it was.
  const auto before = table_vec(bm, 1);
  EXPECT_FALSE(bm.can_grow(1, 16));
  EXPECT_FALSE(bm.ensure_capacity(1, 16));
  EXPECT_EQ(table_vec(bm, 1), before);
  EXPECT_EQ(bm.capacity(1), 9);
  EXPECT_EQ(bm.num_free_blocks(), 2);

  // Exactly the free blocks succeeds, and then everything is used.
  EXPECT_TRUE(bm.can_grow(1, 15));
  ASSERT_TRUE(bm.ensure_capacity(1, 15));
  EXPECT_EQ(bm.num_free_blocks(), 0);
  EXPECT_DOUBLE_EQ(bm.usage(), 1.0);
  EXPECT_TRUE(bm.can_allocate(0));
  EXPECT_FALSE(bm.can_allocate(1));
  EXPECT_FALSE(bm.ensure_capacity(3, 1));
}

TEST(BlockManager, FreeReturnsBlocksForReuse) {
  BlockManager bm(6, 2);
  ASSERT_TRUE(bm.ensure_capacity(10, 5));  // blocks 0 1 2
  ASSERT_TRUE(bm.ensure_capacity(11, 6));  // blocks 3 4 5
  EXPECT_EQ(bm.num_free_blocks(), 0);
  bm.free(10);
  EXPECT_FALSE(bm.contains(10));
  EXPECT_EQ(bm.num_free_blocks(), 3);
  EXPECT_EQ(bm.num_seqs(), 1);
  // A preempted id can come back; it gets exactly the freed blocks.
  ASSERT_TRUE(bm.ensure_capacity(10, 6));
  const auto t = table_vec(bm, 10);
  EXPECT_EQ(std::set<int32_t>(t.begin(), t.end()), (std::set<int32_t>{0, 1, 2}));
  bm.free(10);
  bm.free(11);
  EXPECT_EQ(bm.num_free_blocks(), 6);
  EXPECT_EQ(bm.num_seqs(), 0);
}

TEST(BlockManager, DenseBlockTablePadsWithBlockZero) {
  BlockManager bm(16, 4);
  // Interleave growth so the tables are not contiguous ranges.
  ASSERT_TRUE(bm.ensure_capacity(-5, 1));   // negative ids are fine too
  ASSERT_TRUE(bm.ensure_capacity(8, 4));
  ASSERT_TRUE(bm.ensure_capacity(-5, 9));
  ASSERT_TRUE(bm.ensure_capacity(3, 0));
  const std::vector<SeqId> seqs = {8, -5, 3};
  const int max_blocks = bm.max_table_len(seqs);
  EXPECT_EQ(max_blocks, 3);
  EXPECT_EQ(bm.max_table_len({}), 0);

  const std::vector<int32_t> dense = bm.dense_block_table(seqs, max_blocks + 1);  // extra column
  ASSERT_EQ(dense.size(), 3u * 4u);
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto t = bm.block_table(seqs[s]);
    for (size_t j = 0; j < 4; ++j) {
      const int32_t want = j < t.size() ? t[j] : 0;
      EXPECT_EQ(dense[s * 4 + j], want) << "row " << s << " col " << j;
    }
  }
  EXPECT_EQ(table_vec(bm, 8), (std::vector<int32_t>{1}));
  EXPECT_EQ(table_vec(bm, -5), (std::vector<int32_t>{0, 2, 3}));

  std::vector<int32_t> buf(6, -1);
  bm.fill_block_table(std::vector<SeqId>{-5, 8}, 3, buf);
  EXPECT_EQ(buf, (std::vector<int32_t>{0, 2, 3, 1, 0, 0}));
}

// Random ensure/free against a model that only counts blocks; checks that the tables always
// partition the used blocks (no block owned twice, none lost).
TEST(BlockManager, RandomOpsMatchACountingModel) {
  for (int block_size : {1, 3, 16}) {
    const int num_blocks = 61;
    BlockManager bm(num_blocks, block_size);
    std::map<SeqId, int64_t> model_tokens;  // seq -> tokens it was grown to
    int64_t model_free = num_blocks;
    std::mt19937_64 rng(1234 + block_size);
    const auto blocks_of = [&](int64_t n) { return (n + block_size - 1) / block_size; };

    for (int op = 0; op < 4000; ++op) {
      const SeqId seq = static_cast<SeqId>(rng() % 12) - 3;
      if (rng() % 4 == 0) {
        if (model_tokens.contains(seq)) {
          model_free += blocks_of(model_tokens[seq]);
          model_tokens.erase(seq);
          bm.free(seq);
        }
      } else {
        const int64_t have = model_tokens.contains(seq) ? model_tokens[seq] : 0;
        const int64_t want = have + static_cast<int64_t>(rng() % (3 * static_cast<uint64_t>(block_size) + 2));
        const int64_t extra = blocks_of(std::max(want, have)) - blocks_of(have);
        const bool fits = extra <= model_free;
        EXPECT_EQ(bm.can_grow(seq, want), fits);
        ASSERT_EQ(bm.ensure_capacity(seq, want), fits) << "op " << op;
        if (fits) {
          model_tokens[seq] = std::max(want, have);
          model_free -= extra;
        }
      }
      ASSERT_EQ(bm.num_free_blocks(), model_free);
      ASSERT_EQ(bm.num_seqs(), static_cast<int>(model_tokens.size()));
      std::vector<int> owner(num_blocks, 0);
      for (const auto& [s, n] : model_tokens) {
        ASSERT_TRUE(bm.contains(s));
        const auto t = bm.block_table(s);
        ASSERT_EQ(static_cast<int64_t>(t.size()), blocks_of(n));
        for (int32_t b : t) {
          ASSERT_GE(b, 0);
          ASSERT_LT(b, num_blocks);
          ++owner[static_cast<size_t>(b)];
        }
      }
      const auto owned = std::count(owner.begin(), owner.end(), 1);
      ASSERT_EQ(std::count_if(owner.begin(), owner.end(), [](int c) { return c > 1; }), 0);
      ASSERT_EQ(owned, num_blocks - model_free);
    }
  }
}

TEST(BlockManagerDeathTest, DoubleFreeAndUnknownSequencesAbort) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        BlockManager bm(4, 4);
        (void)bm.ensure_capacity(1, 3);
        bm.free(1);
        bm.free(1);
      },
      "double free");
  EXPECT_DEATH(
      {
        const BlockManager bm(4, 4);
        (void)bm.block_table(42);
      },
      "unknown sequence");
  EXPECT_DEATH(
      {
        BlockManager bm(4, 4);
        (void)bm.ensure_capacity(1, 9);  // 3 blocks
        std::vector<int32_t> buf(2);
        bm.fill_block_table(std::vector<SeqId>{1}, 2, buf);
      },
      "longer than max_blocks");
}

TEST(KvBudget, BlocksForBudget) {
  // Llama-2-7B in fp16, block 16: 2 * 32 layers * 16 * 32 heads * 128 * 2 bytes = 8 MiB a block.
  EXPECT_EQ(kv_block_bytes(32, 32, 128, 16, 2), 8ll << 20);
  EXPECT_EQ(blocks_for_budget(10ll << 30, 32, 32, 128, 16, 2), 1280);
  EXPECT_EQ(blocks_for_budget((10ll << 30) - 1, 32, 32, 128, 16, 2), 1279);
  EXPECT_EQ(blocks_for_budget((8ll << 20) - 1, 32, 32, 128, 16, 2), 0);
  EXPECT_EQ(blocks_for_budget(0, 32, 32, 128, 16, 2), 0);
  EXPECT_EQ(blocks_for_budget(-5, 32, 32, 128, 16, 2), 0);
  // An awkward shape: 3 layers, 5 kv heads, head_dim 7, block 3, fp32 -> 2*3*3*5*7*4 = 2520 bytes.
  EXPECT_EQ(kv_block_bytes(3, 5, 7, 3, 4), 2520);
  EXPECT_EQ(blocks_for_budget(2520 * 17 + 2519, 3, 5, 7, 3, 4), 17);
  // Capped at INT32_MAX: block ids are int32.
  EXPECT_EQ(blocks_for_budget(std::numeric_limits<int64_t>::max(), 1, 1, 1, 1, 1),
            std::numeric_limits<int32_t>::max());
}

TEST(KvBudget, RejectsBadArguments) {
  EXPECT_THROW(blocks_for_budget(1 << 30, 0, 32, 128, 16, 2), Error);
  EXPECT_THROW(blocks_for_budget(1 << 30, 32, -1, 128, 16, 2), Error);
  EXPECT_THROW(blocks_for_budget(1 << 30, 32, 32, 0, 16, 2), Error);
  EXPECT_THROW(blocks_for_budget(1 << 30, 32, 32, 128, 0, 2), Error);
  EXPECT_THROW(blocks_for_budget(1 << 30, 32, 32, 128, 16, 0), Error);
  const int big = std::numeric_limits<int>::max();
  EXPECT_THROW(kv_block_bytes(big, big, big, 16, 2), Error);  // overflows int64
}

}  // namespace
}  // namespace fineserve
