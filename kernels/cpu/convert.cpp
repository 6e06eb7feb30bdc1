#include "kernels/cpu/convert.h"

#include <cstring>

#include <immintrin.h>

#include "kernels/base.h"
#include "kernels/cpu/simd.h"
#include "kernels/half.h"

namespace fineserve::cpu {
namespace {

// F16C converts 8 halves per instruction; chosen at run time so the binary stays portable.
__attribute__((target("avx2,f16c"))) void f16_to_f32_f16c(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + i, 2);
    dst[i] = half_to_float(h);
  }
}

__attribute__((target("avx2,f16c"))) void f32_to_f16_f16c(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}

// bf16 -> f32 is a 16-bit shift; AVX2 does 8 at a time.
__attribute__((target("avx2"))) void bf16_to_f32_avx2(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
  }
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + i, 2);
    dst[i] = bf16_to_float(h);
  }
}

// F16C comes with every AVX2 CPU we dispatch to (has_avx2 checks avx2, fma and f16c).
bool has_f16c() { return has_avx2(); }

}  // namespace

void to_f32(const void* src, DType src_dtype, int64_t n, float* dst) {
  if (n <= 0) return;  // memcpy with a null pointer is undefined even for 0 bytes
  // Unaligned 16-bit loads through memcpy-like intrinsics; the pointer cast never dereferences.
  const auto* s16 = static_cast<const uint16_t*>(src);
  switch (src_dtype) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case DType::F16:
      if (has_f16c()) return f16_to_f32_f16c(s16, n, dst);
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, static_cast<const char*>(src) + 2 * i, 2);
        dst[i] = half_to_float(h);
      }
      return;
    case DType::BF16:
      if (has_f16c()) return bf16_to_f32_avx2(s16, n, dst);
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, static_cast<const char*>(src) + 2 * i, 2);
        dst[i] = bf16_to_float(h);
      }
      return;
    default:
      FS_ASSERT(false, "to_f32: not a float dtype");
  }
}

void from_f32(const float* src, int64_t n, DType dst_dtype, void* dst) {
  if (n <= 0) return;
  auto* d16 = static_cast<uint16_t*>(dst);
  switch (dst_dtype) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case DType::F16:
      if (has_f16c()) return f32_to_f16_f16c(src, n, d16);
      for (int64_t i = 0; i < n; ++i) d16[i] = float_to_half(src[i]);
      return;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) d16[i] = float_to_bf16(src[i]);
      return;
    default:
      FS_ASSERT(false, "from_f32: not a float dtype");
  }
}

}  // namespace fineserve::cpu
