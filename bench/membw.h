// Memory read bandwidth of this machine, measured the way a memory-bound kernel reads: a
// multi-threaded streaming pass over a buffer much larger than the caches.
#pragma once

namespace fineserve::bench {

// GB/s (1e9 bytes/s) of a streaming read of a 256 MiB buffer split over `threads` OpenMP threads
// (<= 0: OpenMP's default), best of several passes.
double measure_read_bandwidth_gbs(int threads);

}  // namespace fineserve::bench
