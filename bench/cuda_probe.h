// GPU facts the benchmarks report beside their figures: the device's name, its memory in use
// (cudaMemGetInfo), and the bandwidth of device-to-device copies measured in the same run (the
// yardstick for memory-bound decode, as bench/membw.h is on the CPU). The CUDA runtime is used
// only in builds with the CUDA backend (FINESERVE_HAVE_CUDA); elsewhere every call throws.
#pragma once

#include <cstdint>
#include <string>

namespace fineserve::bench {

// Whether this build has the CUDA backend.
bool cuda_built();

struct GpuMemory {
  uint64_t free = 0, total = 0;
  uint64_t used() const { return total - free; }
};

// These throw fineserve::Error in a build without CUDA or when `device` is not usable.
std::string gpu_name(int device);
GpuMemory gpu_memory(int device);
// GB/s (1e9 bytes/s) of cudaMemcpy device-to-device copies of a `bytes` buffer, best of several
// timed passes, counting 2 x bytes per copy (each byte is read once and written once): the DRAM
// traffic a copy achieves, a practical ceiling for a kernel that streams weights.
double measure_copy_bandwidth_gbs(int device, uint64_t bytes = 1ull << 30);

}  // namespace fineserve::bench
