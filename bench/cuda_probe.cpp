#include "bench/cuda_probe.h"

#include "kernels/base.h"

#ifdef FINESERVE_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#endif

namespace fineserve::bench {

#ifdef FINESERVE_HAVE_CUDA

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string(what) + " failed: " + cudaGetErrorString(e));
}

// Frees device memory on every path out (a failed copy or event call throws).
struct DeviceAlloc {
  void* ptr = nullptr;
  ~DeviceAlloc() {
    if (ptr) (void)cudaFree(ptr);
  }
};

struct Event {
  cudaEvent_t ev = nullptr;
  Event() { check(cudaEventCreate(&ev), "cudaEventCreate"); }
  ~Event() { (void)cudaEventDestroy(ev); }
};

}  // namespace

bool cuda_built() { return true; }

std::string gpu_name(int device) {
  cudaDeviceProp p{};
  check(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
  return p.name;
}

GpuMemory gpu_memory(int device) {
  check(cudaSetDevice(device), "cudaSetDevice");
  size_t free = 0, total = 0;
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return {free, total};
}

double measure_copy_bandwidth_gbs(int device, uint64_t bytes) {
  check(cudaSetDevice(device), "cudaSetDevice");
  DeviceAlloc src, dst;
  check(cudaMalloc(&src.ptr, bytes), "cudaMalloc");
  check(cudaMalloc(&dst.ptr, bytes), "cudaMalloc");
  check(cudaMemset(src.ptr, 1, bytes), "cudaMemset");
  Event start, stop;
  constexpr int kCopiesPerPass = 4, kPasses = 5;
  // One untimed copy first: it pays for the lazy page mapping of both buffers.
  check(cudaMemcpy(dst.ptr, src.ptr, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy");
  float best_ms = 0;
  for (int pass = 0; pass < kPasses; ++pass) {
    check(cudaEventRecord(start.ev), "cudaEventRecord");
    for (int i = 0; i < kCopiesPerPass; ++i)
      check(cudaMemcpyAsync(dst.ptr, src.ptr, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpyAsync");
    check(cudaEventRecord(stop.ev), "cudaEventRecord");
    check(cudaEventSynchronize(stop.ev), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start.ev, stop.ev), "cudaEventElapsedTime");
    best_ms = pass == 0 ? ms : std::min(best_ms, ms);
  }
  return 2.0 * static_cast<double>(bytes) * kCopiesPerPass / (best_ms * 1e-3) / 1e9;
}

#else  // no CUDA in this build

namespace {
[[noreturn]] void no_cuda() {
  throw Error("this fineserve was built without the CUDA backend (configure with nvcc available, "
              "-DFINESERVE_CUDA=ON, to build it)");
}
}  // namespace

bool cuda_built() { return false; }
std::string gpu_name(int) { no_cuda(); }
GpuMemory gpu_memory(int) { no_cuda(); }
double measure_copy_bandwidth_gbs(int, uint64_t) { no_cuda(); }

#endif

}  // namespace fineserve::bench
