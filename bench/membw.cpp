#include "bench/membw.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/aligned.h"
#include "kernels/cpu/simd.h"

namespace fineserve::bench {
namespace {

// Four independent 256-bit accumulators keep enough loads in flight to saturate DRAM from one
// core; the sum is returned so the reads cannot be optimised away.
FS_AVX2 uint64_t read_avx2(const uint8_t* p, size_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 128 <= bytes; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  return static_cast<uint64_t>(_mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) + _mm256_extract_epi64(s, 2) +
                               _mm256_extract_epi64(s, 3));
}

uint64_t read_plain(const uint8_t* p, size_t bytes) {
  uint64_t s = 0;
  for (size_t i = 0; i + 8 <= bytes; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    s += v;
  }
  return s;
}

}  // namespace

double measure_read_bandwidth_gbs(int threads) {
  if (threads <= 0) threads = omp_get_max_threads();
  constexpr size_t kBytes = size_t{256} << 20;  // 8x a 32 MiB L3: every pass streams from DRAM
  cpu::AlignedBytes buf = cpu::aligned_zeros(kBytes);
  // Touch every page with non-zero data first (zero pages could be shared and never leave the cache).
  for (size_t i = 0; i < kBytes; i += 4096) buf[i] = static_cast<uint8_t>(i >> 12);
  const bool avx2 = cpu::has_avx2();
  double best = 0;
  volatile uint64_t sink = 0;
  // Many short passes (~10 ms each): on a shared machine some of them run undisturbed.
  for (int run = 0; run < 16; ++run) {
    uint64_t total = 0;
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      const size_t t = static_cast<size_t>(omp_get_thread_num()), nt = static_cast<size_t>(omp_get_num_threads());
      const size_t chunk = kBytes / nt / 128 * 128;
      const uint8_t* p = buf.get() + t * chunk;
      total += avx2 ? read_avx2(p, chunk) : read_plain(p, chunk);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + total;
    best = std::max(best, static_cast<double>(kBytes) / s / 1e9);
  }
  return best;
}

}  // namespace fineserve::bench
