// The CUDA GEMM's device weight layout and code->number tricks, checked on the host (no GPU needed):
// kernels/cuda/gemm_layout.h is plain C++ shared with the kernels, so these are the functions the
// kernels call.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/gemm_layout.h"
#include "kernels/half.h"
#include "tests/kernels/kernel_test_util.h"

namespace fineserve {
namespace {

namespace L = cuda::layout;

// A random checkpoint-layout matrix: codes (int4 nibbles 0..15 = code + 8, int8 -128..127) and
// scales (fp16 bits) drawn directly, so every bit pattern the format allows shows up.
struct HostMatrix {
  WeightMatrix w;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> scales;
};

HostMatrix random_matrix(int64_t rows, int64_t cols, int bits, int64_t group, uint32_t seed) {
  std::mt19937 rng(seed);
  HostMatrix h;
  h.codes.resize(static_cast<size_t>(bits == 4 ? rows * cols / 2 : rows * cols));
  for (auto& b : h.codes) b = static_cast<uint8_t>(rng());
  h.scales.resize(static_cast<size_t>(rows * (cols / group)));
  for (auto& s : h.scales) s = static_cast<uint16_t>(0x1000 + rng() % 0x4000);  // positive, finite
  h.w.rows = rows;
  h.w.cols = cols;
  h.w.bits = bits;
  h.w.group = group;
  h.w.dtype = bits == 4 ? DType::U8 : DType::I8;
  h.w.data = h.codes.data();
  h.w.scales = h.scales.data();
  return h;
}

int checkpoint_code(const HostMatrix& h, int64_t r, int64_t k) {
  if (h.w.bits == 8) return static_cast<int8_t>(h.codes[static_cast<size_t>(r * h.w.cols + k)]);
  const uint8_t b = h.codes[static_cast<size_t>(r * (h.w.cols / 2) + k / 2)];
  return static_cast<int>((k & 1) ? b >> 4 : b & 0xF) - 8;
}

uint32_t word_at(const std::vector<uint8_t>& bytes, int64_t offset) {
  uint32_t w;
  std::memcpy(&w, bytes.data() + offset, 4);
  return w;
}

struct Shape {
  int64_t rows, cols;
  int bits;
  int64_t group;
};

// Awkward shapes: K not a multiple of the 64-wide k tile, N not a multiple of the 128-row tile,
// column-wise groups, the smallest allowed matrices, odd K for int8.
const std::vector<Shape> kShapes = {
    {1, 2, 4, 2},     {1, 1, 8, 1},      {1, 32, 4, 32},    {3, 96, 4, 32},    {3, 96, 8, 32},
    {131, 200, 4, 200}, {8, 130, 4, 130}, {5, 131, 8, 131}, {520, 256, 8, 64}, {7, 64, 4, 64},
    {129, 512, 4, 128}, {130, 160, 8, 32}, {2, 4096, 4, 4096}, {256, 192, 4, 64},
};

std::string name(const Shape& s) {
  return std::to_string(s.rows) + "x" + std::to_string(s.cols) + " int" + std::to_string(s.bits) + " g" +
         std::to_string(s.group);
}

TEST(CudaGemmLayout, PaddingAndGroups) {
  for (const Shape& s : kShapes) {
    const L::QuantLayout l = L::make_layout(s.rows, s.cols, s.bits, s.group);
    SCOPED_TRACE(name(s));
    EXPECT_EQ(l.padded_rows % L::kRowAlign, 0);
    EXPECT_EQ(l.padded_cols % L::kColAlign, 0);
    EXPECT_GE(l.padded_rows, s.rows);
    EXPECT_LT(l.padded_rows - s.rows, L::kRowAlign);
    EXPECT_GE(l.padded_cols, s.cols);
    EXPECT_LT(l.padded_cols - s.cols, L::kColAlign);
    EXPECT_EQ(l.padded_cols % l.group_eff, 0);
    // A 16-byte chunk (32 int4 / 16 int8 codes) never straddles two groups.
    EXPECT_EQ(l.group_eff % (s.bits == 4 ? 32 : 16), 0);
    // Every real column keeps its checkpoint group.
    for (int64_t k = 0; k < s.cols; ++k) ASSERT_EQ(k / l.group_eff, k / s.group) << "k " << k;
    EXPECT_EQ(l.row_bytes() % 16, 0);
  }
}

TEST(CudaGemmLayout, CodePositionsAreABijection) {
  for (const Shape& s : kShapes) {
    const L::QuantLayout l = L::make_layout(s.rows, s.cols, s.bits, s.group);
    SCOPED_TRACE(name(s));
    // Every (row, k) of the padded matrix lands on its own slot (nibble or byte), and every slot is used.
    const int slots_per_byte = s.bits == 4 ? 2 : 1;
    std::vector<uint8_t> hits(static_cast<size_t>(l.code_bytes() * slots_per_byte), 0);
    for (int64_t r = 0; r < l.padded_rows; ++r)
      for (int64_t k = 0; k < l.padded_cols; ++k) {
        const L::CodePos p = L::code_pos(s.bits, l.row_bytes(), r, k);
        ASSERT_GE(p.byte, 0);
        ASSERT_LT(p.byte, l.code_bytes());
        ASSERT_TRUE(p.nibble == 0 || (s.bits == 4 && p.nibble == 1));
        ASSERT_EQ(hits[static_cast<size_t>(p.byte * slots_per_byte + p.nibble)]++, 0) << "r " << r << " k " << k;
      }
    for (uint8_t h : hits) ASSERT_EQ(h, 1);
    // Scales: every (row, group) has its own slot.
    std::vector<uint8_t> scale_hits(static_cast<size_t>(l.scale_count()), 0);
    for (int64_t r = 0; r < l.padded_rows; ++r)
      for (int64_t k = 0; k < l.padded_cols; k += l.group_eff) ++scale_hits[static_cast<size_t>(
          L::scale_index(l.padded_rows, l.group_eff, r, k))];
    for (uint8_t h : scale_hits) ASSERT_EQ(h, 1);
  }
}

TEST(CudaGemmLayout, InverseTablesAgree) {
  for (int e = 0; e < 8; ++e) EXPECT_EQ(L::int4_nibble_element(L::int4_element_nibble(e)), e);
  for (int b = 0; b < 16; ++b) EXPECT_EQ(L::int8_element_byte(L::int8_byte_element(b)), b);
  // Consecutive pairs: nibbles t and t + 4 hold elements 2t and 2t + 1.
  for (int t = 0; t < 4; ++t) {
    EXPECT_EQ(L::int4_nibble_element(t), 2 * t);
    EXPECT_EQ(L::int4_nibble_element(t + 4), 2 * t + 1);
    // int8 word t: {2t, 2t+1, 2t+8, 2t+9}.
    EXPECT_EQ(L::int8_byte_element(4 * t + 0), 2 * t);
    EXPECT_EQ(L::int8_byte_element(4 * t + 1), 2 * t + 1);
    EXPECT_EQ(L::int8_byte_element(4 * t + 2), 2 * t + 8);
    EXPECT_EQ(L::int8_byte_element(4 * t + 3), 2 * t + 9);
  }
}

TEST(CudaGemmLayout, RelayoutKeepsEveryCodeAndScale) {
  uint32_t seed = 1;
  for (const Shape& s : kShapes) {
    const HostMatrix h = random_matrix(s.rows, s.cols, s.bits, s.group, seed++);
    const L::DeviceImage img = L::relayout(h.w);
    const L::QuantLayout& l = img.layout;
    SCOPED_TRACE(name(s));
    ASSERT_EQ(static_cast<int64_t>(img.codes.size()), l.code_bytes());
    ASSERT_EQ(static_cast<int64_t>(img.scales.size()), l.scale_count());
    for (int64_t r = 0; r < l.padded_rows; ++r)
      for (int64_t k = 0; k < l.padded_cols; ++k) {
        const int want = r < s.rows && k < s.cols ? checkpoint_code(h, r, k) : 0;  // padding is code 0
        ASSERT_EQ(L::device_code_at(l, img.codes.data(), r, k), want) << "r " << r << " k " << k;
      }
    // Scale slot (r, gi) is real when r < N and gi < K / group; everything else is padding (0).
    for (int64_t r = 0; r < l.padded_rows; ++r)
      for (int64_t gi = 0; gi < l.groups; ++gi) {
        const uint16_t got = img.scales[static_cast<size_t>(L::scale_index(l.padded_rows, l.group_eff, r, gi * l.group_eff))];
        const bool real = r < s.rows && gi < s.cols / s.group;
        const uint16_t want = real ? h.scales[static_cast<size_t>(r * (s.cols / s.group) + gi)] : uint16_t{0};
        ASSERT_EQ(got, want) << "r " << r << " group " << gi;
      }
  }
}

// An asymmetric matrix's offsets land transposed like its scales ([groups, padded_rows]), padding 0.
TEST(CudaGemmLayout, RelayoutKeepsEveryOffset) {
  uint32_t seed = 300;
  for (const Shape& s : kShapes) {
    HostMatrix h = random_matrix(s.rows, s.cols, s.bits, s.group, seed++);
    std::vector<float> offsets;
    testing::make_asymmetric(h.w, offsets, nullptr, seed++);
    const L::DeviceImage img = L::relayout(h.w);
    const L::QuantLayout& l = img.layout;
    SCOPED_TRACE(name(s));
    ASSERT_EQ(static_cast<int64_t>(img.offsets.size()), l.scale_count());
    for (int64_t r = 0; r < l.padded_rows; ++r)
      for (int64_t gi = 0; gi < l.groups; ++gi) {
        const float got = img.offsets[static_cast<size_t>(L::scale_index(l.padded_rows, l.group_eff, r, gi * l.group_eff))];
        const bool real = r < s.rows && gi < s.cols / s.group;
        const float want = real ? offsets[static_cast<size_t>(r * (s.cols / s.group) + gi)] : 0.0f;
        ASSERT_EQ(got, want) << "r " << r << " group " << gi;
      }
    h.w.offsets = nullptr;
    EXPECT_TRUE(L::relayout(h.w).offsets.empty());  // symmetric: no offsets at all
  }
}

// What the GEMV and the dequantization kernel compute from a 16-byte chunk's words: every word's
// nibble / byte decodes, through the fp32 magic number, to the code of the element the tables name.
TEST(CudaGemmLayout, ChunkWordsDecodeToTheirElements) {
  uint32_t seed = 100;
  for (const Shape& s : kShapes) {
    const HostMatrix h = random_matrix(s.rows, s.cols, s.bits, s.group, seed++);
    const L::DeviceImage img = L::relayout(h.w);
    const L::QuantLayout& l = img.layout;
    SCOPED_TRACE(name(s));
    const int elems = s.bits == 4 ? 32 : 16;
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t c = 0; c < l.row_bytes() / 16; ++c)
        for (int j = 0; j < 4; ++j) {
          const uint32_t word = word_at(img.codes, r * l.row_bytes() + c * 16 + 4 * j);
          for (int p = 0; p < (s.bits == 4 ? 8 : 4); ++p) {
            const int64_t k = c * elems + (s.bits == 4 ? 8 * j + L::int4_nibble_element(p) : L::int8_byte_element(4 * j + p));
            const int want = k < s.cols ? checkpoint_code(h, r, k) : 0;
            const float got = s.bits == 4 ? L::int4_code_f32(word, p) : L::int8_code_f32(word, p);
            ASSERT_EQ(got, static_cast<float>(want)) << "r " << r << " k " << k;
          }
        }
  }
}

// What the tensor-core kernel feeds mma.m16n8k16 as operand A: lane (g, t) needs, for k16 step s,
// the pairs (2t, 2t+1) and (2t+8, 2t+9) of its row as packed fp16 / bf16 codes.
TEST(CudaGemmLayout, TensorCoreFragmentsHoldTheRightCodes) {
  uint32_t seed = 200;
  for (const Shape& s : kShapes) {
    const HostMatrix h = random_matrix(s.rows, s.cols, s.bits, s.group, seed++);
    const L::DeviceImage img = L::relayout(h.w);
    const L::QuantLayout& l = img.layout;
    SCOPED_TRACE(name(s));
    auto code = [&](int64_t r, int64_t k) { return k < s.cols ? checkpoint_code(h, r, k) : 0; };
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t step = 0; step < l.padded_cols / 16; ++step)
        for (int t = 0; t < 4; ++t) {
          const int64_t k0 = step * 16;
          uint32_t f16[2], bf16[2];  // pair j: k0 + 2t + 8j + {0, 1}
          if (s.bits == 4) {
            const int64_t off = r * l.row_bytes() + step * 8 + L::tc_a_word_offset(4, t);
            for (int j = 0; j < 2; ++j) {
              const uint32_t w = word_at(img.codes, off + 4 * j);
              const uint32_t hb = L::int4_pair_magic(w, t, L::kF16Magic2);
              const uint32_t bb = L::int4_pair_magic(w, t, L::kBF16Magic2);
              // The kernel's packed subtraction: exact, since the difference is a small integer.
              auto sub_h = [](uint16_t b, float c) { return float_to_half(half_to_float(b) - c); };
              auto sub_b = [](uint16_t b, float c) { return float_to_bf16(bf16_to_float(b) - c); };
              f16[j] = sub_h(static_cast<uint16_t>(hb), L::kF16MagicInt4) |
                       static_cast<uint32_t>(sub_h(static_cast<uint16_t>(hb >> 16), L::kF16MagicInt4)) << 16;
              bf16[j] = sub_b(static_cast<uint16_t>(bb), L::kBF16MagicInt4) |
                        static_cast<uint32_t>(sub_b(static_cast<uint16_t>(bb >> 16), L::kBF16MagicInt4)) << 16;
            }
          } else {
            const uint32_t w = word_at(img.codes, r * l.row_bytes() + step * 16 + L::tc_a_word_offset(8, t));
            for (int j = 0; j < 2; ++j) {
              const uint32_t hb = L::int8_pair_magic_f16(w, j);
              f16[j] = float_to_half(half_to_float(static_cast<uint16_t>(hb)) - L::kF16MagicInt8) |
                       static_cast<uint32_t>(float_to_half(half_to_float(static_cast<uint16_t>(hb >> 16)) -
                                                           L::kF16MagicInt8))
                           << 16;
              bf16[j] = L::int8_pair_bf16(w, j);
            }
          }
          for (int j = 0; j < 2; ++j)
            for (int hi = 0; hi < 2; ++hi) {
              const int64_t k = k0 + 2 * t + 8 * j + hi;
              const auto want = static_cast<float>(code(r, k));
              ASSERT_EQ(half_to_float(static_cast<uint16_t>(f16[j] >> (16 * hi))), want) << "r " << r << " k " << k;
              ASSERT_EQ(bf16_to_float(static_cast<uint16_t>(bf16[j] >> (16 * hi))), want) << "r " << r << " k " << k;
            }
        }
  }
}

// The magic numbers themselves, for every stored value.
TEST(CudaGemmLayout, MagicNumbersAreExact) {
  for (uint32_t u = 0; u < 16; ++u) {
    const int code = static_cast<int>(u) - 8;
    // fp16: 0x6400 | u is 1024 + u; minus 1032 is the code, exactly representable.
    EXPECT_EQ(half_to_float(static_cast<uint16_t>(0x6400 | u)), 1024.0f + static_cast<float>(u));
    EXPECT_EQ(half_to_float(float_to_half(half_to_float(static_cast<uint16_t>(0x6400 | u)) - L::kF16MagicInt4)),
              static_cast<float>(code));
    // bf16: 0x4300 | u is 128 + u; minus 136.
    EXPECT_EQ(bf16_to_float(static_cast<uint16_t>(0x4300 | u)), 128.0f + static_cast<float>(u));
    EXPECT_EQ(bf16_to_float(float_to_bf16(bf16_to_float(static_cast<uint16_t>(0x4300 | u)) - L::kBF16MagicInt4)),
              static_cast<float>(code));
    for (int p = 0; p < 8; ++p) {
      const uint32_t word = (0x88888888u & ~(0xFu << (4 * p))) | (u << (4 * p));  // other nibbles: code 0
      EXPECT_EQ(L::int4_code_f32(word, p), static_cast<float>(code)) << "nibble " << p;
      EXPECT_EQ(L::int4_code_f32(word, (p + 1) % 8), 0.0f);
    }
    for (int t = 0; t < 4; ++t) {
      const uint32_t word = (0x88888888u & ~(0xFu << (4 * t))) | (u << (4 * t));
      EXPECT_EQ(L::int4_pair_magic(word, t, L::kF16Magic2), 0x64086400u | u);
      EXPECT_EQ(L::int4_pair_magic(word, t, L::kBF16Magic2), 0x43084300u | u);
    }
  }
  for (uint32_t b = 0; b < 256; ++b) {
    const int code = static_cast<int>(b) - 128;
    for (int i = 0; i < 4; ++i) {
      const uint32_t word = (0x80808080u & ~(0xFFu << (8 * i))) | (b << (8 * i));
      EXPECT_EQ(L::int8_code_f32(word, i), static_cast<float>(code)) << "byte " << i;
      const int j = i / 2;
      const uint32_t pair_h = L::int8_pair_magic_f16(word, j);
      const auto mine = static_cast<uint16_t>(pair_h >> (16 * (i & 1)));
      EXPECT_EQ(half_to_float(mine), 1024.0f + static_cast<float>(b));
      EXPECT_EQ(half_to_float(float_to_half(half_to_float(mine) - L::kF16MagicInt8)), static_cast<float>(code));
      const uint32_t pair_b = L::int8_pair_bf16(word, j);
      EXPECT_EQ(bf16_to_float(static_cast<uint16_t>(pair_b >> (16 * (i & 1)))), static_cast<float>(code));
      EXPECT_EQ(bf16_to_float(static_cast<uint16_t>(pair_b >> (16 * (1 - (i & 1))))), 0.0f);  // the other byte
    }
  }
}

TEST(CudaGemmLayout, BytePermMatchesPtxPrmt) {
  const uint32_t a = 0x33221100u, b = 0x77665544u;
  EXPECT_EQ(L::byte_perm(a, b, 0x3210u), a);
  EXPECT_EQ(L::byte_perm(a, b, 0x7654u), b);
  EXPECT_EQ(L::byte_perm(a, b, 0x4140u), 0x44114400u);
  EXPECT_EQ(L::byte_perm(a, b, 0x7632u), 0x77663322u);
  EXPECT_EQ(L::byte_perm(a, b, 0x0000u), 0x00000000u);
  EXPECT_EQ(L::byte_perm(a, b, 0x5555u), 0x55555555u);
}

TEST(CudaGemmLayout, SplitPlansCoverEveryUnitOnce) {
  for (int64_t units : {1, 2, 3, 7, 64, 65, 100, 193, 768, 4096})
    for (int64_t base : {1, 3, 40, 96, 1000})
      for (int64_t min_units : {1, 4, 64})
        for (int64_t max_splits : {0, 1, 2, 1000}) {
          const L::SplitPlan p = L::plan_split(base, 528, units, min_units, max_splits);
          SCOPED_TRACE(std::to_string(units) + " " + std::to_string(base) + " " + std::to_string(min_units));
          ASSERT_GE(p.splits, 1);
          ASSERT_GE(p.per_split, 1);
          ASSERT_LE(p.splits, std::max<int64_t>(1, max_splits));
          // Slices [s * per, min(units, (s + 1) * per)) are non-empty and cover [0, units).
          ASSERT_LT((p.splits - 1) * p.per_split, units);
          ASSERT_GE(p.splits * p.per_split, units);
          if (p.splits > 1) {
            ASSERT_GE(units / p.splits, min_units);
          }
          if (base >= 528) {
            ASSERT_EQ(p.splits, 1);
          }
        }
}


// Grids that already give >= 2 CTAs per SM run unsplit (no reduction kernel); smaller ones split.
TEST(CudaGemmLayout, SplitOnlyWhenTheGridLeavesSmsIdle) {
  const int64_t sms = 132;
  for (int64_t base : {1, 40, 131, 263, 264, 500, 5000}) {
    const int64_t target = L::split_target_ctas(base, sms, 4);
    const L::SplitPlan p = L::plan_split(base, target, 4096, 1, 1000);
    SCOPED_TRACE("base " + std::to_string(base));
    if (base >= L::kNoSplitCtasPerSm * sms) {
      EXPECT_EQ(p.splits, 1);
    } else {
      // A small grid aims for 4 CTAs per SM, as plan_split does with that target.
      EXPECT_GT(p.splits, 1);
      EXPECT_EQ(p.splits, L::plan_split(base, 4 * sms, 4096, 1, 1000).splits);
    }
  }
  // Forced splits cover every unit once, within the work and workspace limits.
  for (int64_t units : {1, 5, 64, 128, 256})
    for (int64_t want : {1, 3, 5, 7, 1000})
      for (int64_t max_splits : {0, 2, 1000}) {
        const L::SplitPlan p = L::plan_forced_split(units, want, max_splits);
        ASSERT_GE(p.splits, 1);
        ASSERT_LE(p.splits, std::min({want, units, std::max<int64_t>(1, max_splits)}));
        ASSERT_LT((p.splits - 1) * p.per_split, units);
        ASSERT_GE(p.splits * p.per_split, units);
      }
}

// The kernels' shift and per-tile mask give the same groups as dividing by the group size.
TEST(CudaGemmLayout, GroupShiftsAndTileMasksMatchDivision) {
  struct Case {
    int64_t cols, group;
  };
  const Case cases[] = {{96, 32},   {256, 32},  {256, 64},   {4096, 128}, {4096, 256}, {12288, 128},
                        {200, 200}, {131, 131}, {4096, 4096}, {1024, 512}, {49152, 128}};
  for (const Case& c : cases)
    for (int bits : {4, 8}) {
      if (bits == 4 && c.cols % 2) continue;
      const L::QuantLayout l = L::make_layout(8, c.cols, bits, c.group);
      SCOPED_TRACE("cols " + std::to_string(c.cols) + " group " + std::to_string(c.group));
      const int shift = L::group_shift(l);
      for (int64_t k = 0; k < l.padded_cols; ++k) ASSERT_EQ(k >> shift, k / l.group_eff) << "k " << k;
      // The Gemv's chunk shift (32 int4 / 16 int8 codes a chunk), capped at 31 for an int index.
      const int chunk_shift = std::min(shift - (bits == 4 ? 5 : 4), 31);
      const int elems = bits == 4 ? 32 : 16;
      for (int32_t ch = 0; ch < static_cast<int32_t>(l.padded_cols / elems); ++ch)
        ASSERT_EQ(ch >> chunk_shift, ch * elems / l.group_eff) << "chunk " << ch;
      // The tensor-core kernel folds a group after k-step s (16 wide) of tile kt when a group ends
      // there; the end of the last tile (the slice's end) it checks separately.
      const L::TcGroupEnds e = L::tc_group_ends(l);
      const int64_t k_tiles = l.padded_cols / L::kColAlign;
      for (int64_t kt = 0; kt < k_tiles; ++kt)
        for (int s = 0; s < 4; ++s) {
          const int64_t kn = kt * L::kColAlign + 16 * (s + 1);
          const bool want = kn % l.group_eff == 0 && kn != l.padded_cols;
          const bool got = kn != l.padded_cols &&
                           (s == 3 ? ((kt + 1) & e.tile_mask) == 0 : s == 1 && e.half_tile);
          ASSERT_EQ(got, want) << "tile " << kt << " step " << s;
        }
    }
}

}  // namespace
}  // namespace fineserve
