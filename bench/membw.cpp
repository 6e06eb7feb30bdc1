#include "bench/membw.h"

// GCC 12's AVX-512 intrinsics headers start some wrappers (_mm512_broadcast_i32x4,
// _mm512_cvtepi32_ps, ...) from a deliberately undefined vector, which -Wuninitialized and
// -Wmaybe-uninitialized report inside the header once inlined at -O3 (GCC PR 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>

#include "kernels/cpu/aligned.h"
#include "kernels/cpu/dispatch.h"
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

// The compute loops: kAcc independent accumulators (latency 4-5 cycles x 2 ports needs ~10),
// `iters` rounds; each returns something derived from every accumulator so nothing is dropped.
constexpr int kAcc = 12;

FS_AVX2 float fma_avx2(int64_t iters, float seed) {
  __m256 acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm256_set1_ps(seed * static_cast<float>(j));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 12
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm256_fmadd_ps(acc[j], a, b);
  __m256 s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm256_add_ps(s, acc[j]);
  return cpu::simd::hsum(s);
}

FS_AVX512 float fma_avx512(int64_t iters, float seed) {
  __m512 acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_set1_ps(seed * static_cast<float>(j));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 12
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
  __m512 s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm512_add_ps(s, acc[j]);
  return _mm512_reduce_add_ps(s);
}

FS_AVX2 float int8_avx2(int64_t iters, float seed) {
  __m256i acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm256_set1_epi32(static_cast<int>(seed) + j);
  const __m256i u = _mm256_set1_epi8(3), s8 = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 12
    for (int j = 0; j < kAcc; ++j)
      acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_xor_si256(u, acc[j]), s8), ones));
  __m256i s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm256_add_epi32(s, acc[j]);
  return static_cast<float>(_mm256_extract_epi32(s, 0));
}

FS_AVX512 float int8_vnni(int64_t iters, float seed) {
  __m512i acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_set1_epi32(static_cast<int>(seed) + j);
  const __m512i u = _mm512_set1_epi8(3), s8 = _mm512_set1_epi8(-2);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 12
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], u, s8);
  __m512i s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm512_add_epi32(s, acc[j]);
  return static_cast<float>(_mm512_reduce_add_epi32(s));
}

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// One timed pass of a probe: a checksum of what it read or computed (kept, so that the work cannot
// be optimised away) and, for a pass that measures its own rate (per-thread CPU clocks), that rate.
struct Pass {
  double checksum = 0;
  double rate = 0;  // 0: work per pass / wall-clock seconds
};

// The best rate of `runs` short passes of `pass(run)`, each doing `work` units: on a shared
// machine some of them run undisturbed.
template <typename F>
double best_rate(int runs, double work, F pass) {
  volatile double sink = 0;
  double best = 0;
  for (int run = 0; run < runs; ++run) {
    const auto t0 = std::chrono::steady_clock::now();
    const Pass p = pass(run);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + p.checksum;
    best = std::max(best, p.rate > 0 ? p.rate : work / s);
  }
  return best;
}

// Best rate (1e9 multiply-adds/s) of `loop` over several ~20 ms runs on `threads` threads.
double peak_rate(float (*loop)(int64_t, float), double macs_per_iter, int threads, bool cpu_clock) {
  const int64_t iters = 1 << 18;
  return best_rate(8, macs_per_iter * static_cast<double>(iters) * threads / 1e9, [&](int run) {
    float total = 0;
    double rate = 0;  // summed over threads
#pragma omp parallel num_threads(threads) reduction(+ : total, rate)
    {
      const double c0 = thread_cpu_seconds();
      total += loop(iters, static_cast<float>(omp_get_thread_num() + run));
      rate += macs_per_iter * static_cast<double>(iters) / (thread_cpu_seconds() - c0) / 1e9;
    }
    return Pass{total, cpu_clock ? rate : 0};
  });
}

}  // namespace

ComputePeak measure_compute_peak(int threads, bool cpu_clock) {
  if (threads <= 0) threads = omp_get_max_threads();
  ComputePeak p;
  if (cpu::isa_supported(cpu::Isa::Avx2)) {
    p.fp32_fma_avx2 = peak_rate(fma_avx2, kAcc * 8.0, threads, cpu_clock);
    p.int8_avx2 = peak_rate(int8_avx2, kAcc * 32.0, threads, cpu_clock);
  }
  if (cpu::isa_supported(cpu::Isa::Avx512Vnni)) {
    p.fp32_fma_avx512 = peak_rate(fma_avx512, kAcc * 16.0, threads, cpu_clock);
    p.int8_vnni_avx512 = peak_rate(int8_vnni, kAcc * 64.0, threads, cpu_clock);
  }
  return p;
}

double measure_read_bandwidth_gbs(int threads) {
  if (threads <= 0) threads = omp_get_max_threads();
  constexpr size_t kBytes = size_t{256} << 20;  // 8x a 32 MiB L3: every pass streams from DRAM
  cpu::AlignedBytes buf = cpu::aligned_zeros(kBytes);
  // Touch every page with non-zero data first (zero pages could be shared and never leave the cache).
  for (size_t i = 0; i < kBytes; i += 4096) buf[i] = static_cast<uint8_t>(i >> 12);
  const bool avx2 = cpu::has_avx2();
  // Many short passes (~10 ms each), in GB/s.
  return best_rate(16, static_cast<double>(kBytes) / 1e9, [&](int) {
    uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      const size_t t = static_cast<size_t>(omp_get_thread_num()), nt = static_cast<size_t>(omp_get_num_threads());
      const size_t chunk = kBytes / nt / 128 * 128;
      const uint8_t* p = buf.get() + t * chunk;
      total += avx2 ? read_avx2(p, chunk) : read_plain(p, chunk);
    }
    return Pass{static_cast<double>(total), 0};
  });
}

}  // namespace fineserve::bench
