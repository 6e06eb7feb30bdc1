// The device layout of FineQuant weights for the CUDA GEMM kernels (kernels/cuda/gemm.cu), and the
// bit tricks those kernels use to turn codes into numbers. Everything here is plain C++ that also
// compiles as __host__ __device__ code, so the host tests (tests/kernels/test_cuda_gemm_layout.cpp)
// check, without a GPU, the very functions the kernels call.
//
// The device layout, from the checkpoint layout of kernels/ops.h WeightMatrix:
//  - K is padded to `padded_cols` (a multiple of kColAlign = the tensor-core kernel's k tile) and N to
//    `padded_rows` (a multiple of kRowAlign = its n tile) with code 0, so kernels never bounds-check
//    weight loads; only x loads and y stores see the real M, N, K.
//  - Rows stay row-major ([padded_rows, padded_cols * bits / 8] bytes), so a lane's 16-byte load
//    holds 32 (int4) or 16 (int8) consecutive k of one row: coalesced for the GEMV, and cp.async
//    tiles for the tensor-core kernel. 32 and 16 divide every group size (>= 32), so such a chunk
//    never straddles two groups.
//  - int4: codes stay stored as code + 8, but inside each 32-bit word (8 consecutive k) the nibbles
//    are interleaved: nibble p holds element kInt4NibbleElement[p] = {0, 2, 4, 6, 1, 3, 5, 7}.
//    Then (word >> 4t) & 0x000F000F holds elements 2t (low half) and 2t+1 (high half): one shift and
//    one LOP3 yield the consecutive pair a tensor-core fragment register needs (see int4_pair_magic).
//  - int8: stored as code + 128 (an unsigned byte), and inside each 16-byte block (16 consecutive k)
//    byte 4t + i holds element 2t + (i & 1) + 8 * (i >> 1): the four codes {2t, 2t+1, 2t+8, 2t+9}
//    that lane t of an mma.m16n8k16 A fragment needs sit in one 32-bit word.
//  - scales are transposed to [groups, padded_rows] fp16 (groups = padded_cols / group_eff), so the
//    scales of a tile's rows for one group are contiguous (one cp.async), and a GEMV lane reads the
//    scales of its 4 consecutive rows with one 8-byte load. Column-wise matrices (group == K) get
//    group_eff = padded_cols: one group still covers the whole (padded) row. Padding scales are 0.
//  - offsets (asymmetric matrices only) are fp32 and transposed the same way, [groups, padded_rows],
//    padding 0: w = code · scale + offset. The kernels add offset · (sum of x over the group) once
//    per group (gemm.cu), so the codes' path is the symmetric one.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/ops.h"

#if defined(__CUDACC__)
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline
#endif

namespace fineserve::cuda::layout {

constexpr int64_t kColAlign = 64;   // K padding: the tensor-core kernel's k tile
constexpr int64_t kRowAlign = 128;  // N padding: the tensor-core kernel's n tile

// Element (k within the 8-k word) held by nibble p of an int4 word, and its inverse.
FS_HD constexpr int int4_nibble_element(int p) { return (p & 3) * 2 + (p >> 2); }
FS_HD constexpr int int4_element_nibble(int e) { return (e >> 1) + (e & 1) * 4; }
// Element (k within the 16-k block) held by byte b of an int8 block, and its inverse.
FS_HD constexpr int int8_byte_element(int b) { return 2 * (b >> 2) + (b & 1) + 8 * ((b >> 1) & 1); }
FS_HD constexpr int int8_element_byte(int e) { return 4 * ((e & 7) >> 1) + (e & 1) + 2 * (e >> 3); }

struct QuantLayout {
  int64_t rows = 0, cols = 0;  // the logical N, K
  int bits = 0;
  int64_t group = 0;        // the checkpoint's group size
  int64_t padded_rows = 0;  // N rounded up to kRowAlign
  int64_t padded_cols = 0;  // K rounded up to kColAlign
  int64_t group_eff = 0;    // group, or padded_cols for column-wise
  int64_t groups = 0;       // padded_cols / group_eff

  int64_t row_bytes() const { return padded_cols * bits / 8; }
  int64_t code_bytes() const { return padded_rows * row_bytes(); }
  int64_t scale_count() const { return groups * padded_rows; }
};

// The layout for a valid FineQuant matrix (cpu::validate_weight has accepted it).
inline QuantLayout make_layout(int64_t rows, int64_t cols, int bits, int64_t group) {
  QuantLayout l;
  l.rows = rows;
  l.cols = cols;
  l.bits = bits;
  l.group = group;
  l.padded_rows = (rows + kRowAlign - 1) / kRowAlign * kRowAlign;
  l.padded_cols = (cols + kColAlign - 1) / kColAlign * kColAlign;
  // A power-of-two group >= 64 divides K, hence padded_cols == K; group 32 may leave one padding group.
  l.group_eff = group == cols ? l.padded_cols : group;
  l.groups = l.padded_cols / l.group_eff;
  return l;
}

// Byte offset of element (r, k) in the device codes; for int4 also which nibble (0 = low).
struct CodePos {
  int64_t byte = 0;
  int nibble = 0;
};
FS_HD CodePos code_pos(int bits, int64_t row_bytes, int64_t r, int64_t k) {
  if (bits == 4) {
    const int p = int4_element_nibble(static_cast<int>(k & 7));
    return {r * row_bytes + (k >> 3) * 4 + (p >> 1), p & 1};
  }
  return {r * row_bytes + (k >> 4) * 16 + int8_element_byte(static_cast<int>(k & 15)), 0};
}
FS_HD int64_t scale_index(int64_t padded_rows, int64_t group_eff, int64_t r, int64_t k) {
  return (k / group_eff) * padded_rows + r;
}

// The signed code at (r, k) of device codes (any r < padded_rows, k < padded_cols).
inline int device_code_at(const QuantLayout& l, const uint8_t* codes, int64_t r, int64_t k) {
  const CodePos pos = code_pos(l.bits, l.row_bytes(), r, k);
  const uint8_t b = codes[pos.byte];
  if (l.bits == 4) return static_cast<int>(pos.nibble ? b >> 4 : b & 0xF) - 8;
  return static_cast<int>(b) - 128;
}

// The device image of a checkpoint-layout matrix (host memory in, host memory out).
struct DeviceImage {
  QuantLayout layout;
  std::vector<uint8_t> codes;    // [padded_rows, row_bytes]
  std::vector<uint16_t> scales;  // [groups, padded_rows], fp16 bits
  std::vector<float> offsets;    // [groups, padded_rows] fp32; empty for a symmetric matrix
};

inline DeviceImage relayout(const WeightMatrix& w) {
  DeviceImage img;
  QuantLayout& l = img.layout;
  l = make_layout(w.rows, w.cols, w.bits, w.group);
  const auto* src = static_cast<const uint8_t*>(w.data);
  // Padding: code 0 everywhere (nibble 8 / byte 128), scale 0.
  img.codes.assign(static_cast<size_t>(l.code_bytes()), l.bits == 4 ? uint8_t{0x88} : uint8_t{0x80});
  img.scales.assign(static_cast<size_t>(l.scale_count()), 0);
  if (w.offsets) img.offsets.assign(static_cast<size_t>(l.scale_count()), 0.0f);
  const int64_t rb = l.row_bytes();
  for (int64_t r = 0; r < w.rows; ++r) {
    uint8_t* dst = img.codes.data() + r * rb;
    if (l.bits == 4) {
      const uint8_t* row = src + r * (w.cols / 2);
      // One 8-k word at a time: element e goes to nibble int4_element_nibble(e).
      for (int64_t k0 = 0; k0 < w.cols; k0 += 8) {
        uint32_t word = 0x88888888u;  // code 0 where the word runs past K
        for (int e = 0; e < 8 && k0 + e < w.cols; ++e) {
          const uint8_t b = row[(k0 + e) / 2];
          const uint32_t nib = ((k0 + e) & 1) ? b >> 4 : b & 0xF;
          const int p = int4_element_nibble(e);
          word = (word & ~(0xFu << (4 * p))) | (nib << (4 * p));
        }
        std::memcpy(dst + (k0 / 8) * 4, &word, 4);  // little-endian, as the GPU reads it
      }
    } else {
      const auto* row = reinterpret_cast<const int8_t*>(src) + r * w.cols;
      for (int64_t k = 0; k < w.cols; ++k)
        dst[(k >> 4) * 16 + int8_element_byte(static_cast<int>(k & 15))] = static_cast<uint8_t>(row[k] + 128);
    }
    const int64_t g_src = w.cols / w.group;
    for (int64_t g = 0; g < g_src; ++g) {
      img.scales[static_cast<size_t>(g * l.padded_rows + r)] = w.scales[r * g_src + g];
      if (w.offsets) img.offsets[static_cast<size_t>(g * l.padded_rows + r)] = w.offsets[r * g_src + g];
    }
  }
  return img;
}

// ---- split-K ------------------------------------------------------------------------------------

// How a kernel splits its `units` of K work (k tiles, 16-byte chunks) over grid slices: enough
// slices that base_ctas * splits reaches target_ctas, but at least min_units per slice and at most
// max_splits (the partial-sum workspace's limit). Every slice gets per_split units except the last,
// which gets the rest (>= 1): slice s covers [s * per_split, min(units, (s + 1) * per_split)).
struct SplitPlan {
  int64_t splits = 1;
  int64_t per_split = 0;
};
inline SplitPlan plan_split(int64_t base_ctas, int64_t target_ctas, int64_t units, int64_t min_units,
                            int64_t max_splits) {
  int64_t s = base_ctas >= target_ctas ? 1 : (target_ctas + base_ctas - 1) / std::max<int64_t>(1, base_ctas);
  s = std::min(s, std::max<int64_t>(1, units / std::max<int64_t>(1, min_units)));
  s = std::min(s, std::max<int64_t>(1, max_splits));
  s = std::min<int64_t>(s, 65535);  // a grid dimension
  SplitPlan p;
  p.per_split = (units + s - 1) / s;
  p.splits = (units + p.per_split - 1) / p.per_split;  // no empty slice
  return p;
}

// Split-K costs a second (reduction) kernel and a round trip of fp32 partial sums through memory.
// It pays only while the grid alone leaves SMs idle: a grid with at least kNoSplitCtasPerSm CTAs
// per SM already keeps every SM busy and runs unsplit; a smaller one aims for target_per_sm.
constexpr int64_t kNoSplitCtasPerSm = 2;
inline int64_t split_target_ctas(int64_t base_ctas, int64_t sm_count, int64_t target_per_sm) {
  return base_ctas >= kNoSplitCtasPerSm * sm_count ? base_ctas : target_per_sm * sm_count;
}

// A forced number of slices (tests: boundaries inside a group), within the same limits as plan_split.
inline SplitPlan plan_forced_split(int64_t units, int64_t splits, int64_t max_splits) {
  int64_t s = std::min({std::max<int64_t>(1, splits), std::max<int64_t>(1, units), std::max<int64_t>(1, max_splits)});
  s = std::min<int64_t>(s, 65535);
  SplitPlan p;
  p.per_split = (units + s - 1) / s;
  p.splits = (units + p.per_split - 1) / p.per_split;
  return p;
}

// ---- group arithmetic without a run-time division ---------------------------------------------
// Every group is a power of two >= 32 (cpu::validate_weight) except column-wise ones, whose single
// group spans the whole padded row. The kernels therefore find an element's group with a shift.

// k >> group_shift(l) == k / l.group_eff for every 0 <= k < l.padded_cols. A column-wise matrix has
// one group: a shift of 62 maps every k the GPU can address to group 0.
inline int group_shift(const QuantLayout& l) {
  if (l.groups == 1) return 62;
  int s = 0;
  while ((int64_t{1} << s) < l.group_eff) ++s;
  return s;  // group_eff is a power of two here
}

// Where the tensor-core kernel's k-steps (16 wide, 4 per 64-wide k tile) end a group: after
// step 1 and step 3 of every tile when the group is 32 (half a tile); otherwise after step 3 of tile
// kt when ((kt + 1) & tile_mask) == 0. A column-wise group ends only where the last slice ends,
// which the kernel checks on its own, so its mask never matches.
struct TcGroupEnds {
  bool half_tile = false;
  int32_t tile_mask = 0;
};
inline TcGroupEnds tc_group_ends(const QuantLayout& l) {
  TcGroupEnds e;
  if (l.groups == 1) {
    e.tile_mask = 0x7FFFFFFF;
  } else if (l.group_eff < kColAlign) {
    e.half_tile = true;  // group 32
  } else {
    e.tile_mask = static_cast<int32_t>(l.group_eff / kColAlign - 1);
  }
  return e;
}

// ---- numbers from codes -------------------------------------------------------------------------

// PTX prmt (byte permute): result byte i = byte sel[4i..4i+2] of the 8-byte value {b:a}.
FS_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t src = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
#endif
}

FS_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Why the magic numbers: an int -> float conversion instruction is slow (a quarter-rate pipe), but
// OR-ing a small unsigned integer u into the low mantissa bits of a float whose exponent makes the
// mantissa's last bit worth exactly 1 yields the float (magic + u) with one logic op; one subtraction
// of (magic + bias) then gives the signed code exactly, since every value involved is an integer
// the format represents exactly.

// fp32: 0x4B000000 = 2^23 (ulp 1). Codes stored with a bias (int4 +8, int8 +128) -> exact fp32 code.
constexpr uint32_t kF32Magic = 0x4B000000u;
constexpr float kF32MagicInt4 = 8388608.0f + 8.0f;
constexpr float kF32MagicInt8 = 8388608.0f + 128.0f;
// int4 code of nibble p of a device word, as fp32.
FS_HD float int4_code_f32(uint32_t word, int p) {
  return bits_to_float(((word >> (4 * p)) & 0xFu) | kF32Magic) - kF32MagicInt4;
}
// int8 code of byte i of a device word, as fp32 (prmt puts byte i under the exponent byte 0x4B).
FS_HD float int8_code_f32(uint32_t word, int i) {
  return bits_to_float(byte_perm(word, kF32Magic, 0x7440u | static_cast<uint32_t>(i))) - kF32MagicInt8;
}

// Packed 16-bit pairs (low half = lower k): the bit patterns before the one packed subtraction.
//  fp16: 0x6400 = 1024.0 (ulp 1 for [1024, 2048)); subtract 1032 (int4) or 1152 (int8).
//  bf16: 0x4300 = 128.0 (ulp 1 for [128, 256)); subtract 136 (int4). A bf16 mantissa has only 7
//        bits, too few for an int8 byte: int8 x bf16 goes through fp32 (int8_pair_bf16 below).
constexpr uint32_t kF16Magic2 = 0x64006400u;
constexpr uint32_t kBF16Magic2 = 0x43004300u;
constexpr float kF16MagicInt4 = 1032.0f;
constexpr float kF16MagicInt8 = 1152.0f;
constexpr float kBF16MagicInt4 = 136.0f;
// Elements 2t and 2t+1 of an interleaved int4 word (t in 0..3), under the given magic.
FS_HD uint32_t int4_pair_magic(uint32_t word, int t, uint32_t magic2) {
  return ((word >> (4 * t)) & 0x000F000Fu) | magic2;
}
// Bytes (2j, 2j+1) of an int8 word (j in 0..1) under the fp16 magic: each byte under a 0x64.
FS_HD uint32_t int8_pair_magic_f16(uint32_t word, int j) {
  return byte_perm(word, 0x64646464u, j ? 0x4342u : 0x4140u);
}
// Bytes (2j, 2j+1) of an int8 word as an exact bf16 pair: via the fp32 magic, then the high 16 bits
// of each float (exact: |code| <= 128 needs at most 8 significant bits, bf16 keeps 8).
FS_HD uint32_t int8_pair_bf16(uint32_t word, int j) {
  const float lo = int8_code_f32(word, 2 * j), hi = int8_code_f32(word, 2 * j + 1);
  uint32_t lo_bits, hi_bits;
#if defined(__CUDA_ARCH__)
  lo_bits = __float_as_uint(lo);
  hi_bits = __float_as_uint(hi);
#else
  std::memcpy(&lo_bits, &lo, 4);
  std::memcpy(&hi_bits, &hi, 4);
#endif
  return byte_perm(lo_bits, hi_bits, 0x7632u);
}

// ---- where the kernels find things ----------------------------------------------------------------

// Tensor-core kernel, operand A = weights (m16 = 16 rows of N, k16 = 16 k), per mma.m16n8k16 lane
// (group g = lane / 4 holds rows g and g + 8, t = lane % 4 holds k pairs {2t, 2t+1} and {2t+8, 2t+9}).
// Byte offset, inside one row's codes of one k16 step, of the 32-bit word(s) lane t reads:
//  int4: the k16 step is two words (8 bytes); the pair {2t, 2t+1} is pair t of word 0 and
//        {2t+8, 2t+9} pair t of word 1: int4_pair_magic(word0 / word1, t).
//  int8: the k16 step is one 16-byte block; lane t reads word t, whose bytes 0..1 are {2t, 2t+1} and
//        bytes 2..3 are {2t+8, 2t+9}: pair j = 0 / 1.
FS_HD int tc_a_word_offset(int bits, int t) { return bits == 4 ? 0 : 4 * t; }

}  // namespace fineserve::cuda::layout
