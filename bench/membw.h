// Memory read bandwidth of this machine, measured the way a memory-bound kernel reads: a
// multi-threaded streaming pass over a buffer much larger than the caches; and its peak
// multiply-add rate for each arithmetic the CPU kernels use (the compute-bound ceiling).
#pragma once

namespace fineserve::bench {

// GB/s (1e9 bytes/s) of a streaming read of a 256 MiB buffer split over `threads` OpenMP threads
// (<= 0: OpenMP's default), best of several passes.
double measure_read_bandwidth_gbs(int threads);

// Peak multiply-adds per second (1e9/s) over `threads` OpenMP threads, register-only loops with
// enough independent accumulators to cover latency; best of several runs. 0 where the CPU lacks
// the instructions. cpu_clock: each thread's rate over its own CPU time (not wall time), summed, so
// that other work on the machine does not lower the figure.
struct ComputePeak {
  double fp32_fma_avx2 = 0;     // 256-bit vfmadd231ps: 8 multiply-adds each
  double fp32_fma_avx512 = 0;   // 512-bit vfmadd231ps: 16
  double int8_avx2 = 0;         // vpmaddubsw + vpmaddwd + vpaddd: 32 u8·s8 products per triple
  double int8_vnni_avx512 = 0;  // 512-bit vpdpbusd: 64 u8·s8 products
};
ComputePeak measure_compute_peak(int threads, bool cpu_clock = false);

}  // namespace fineserve::bench
