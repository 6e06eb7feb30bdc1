// The CUDA backend: fp16 (or bf16) activations, weights and KV cache in device memory of one GPU,
// every op a kernel on one stream (linear layers through kernels/cuda/gemm.h, the others through
// kernels/cuda/ops.h).
//
// Threads: every method first makes the backend's GPU current on the calling thread, so the engine
// may drive it from any thread (one at a time). Memory: alloc() is cudaMalloc (alloc(0) gives a
// valid one-byte allocation); running out of device memory throws fineserve::Error with the size
// asked for and the memory free. copy_to_device() and copy() are asynchronous on the stream (a host
// source may be reused as soon as the call returns); copy_to_host(), to_host_f32() and
// synchronize() wait for the stream.
//
// Attention and write_kv plan their launch on the host from the step's query_start and
// context_len (kernels/cuda/ops_plan.h): when those arrays were written with copy_to_device the
// backend reads its host copy of them, otherwise it reads them back (a synchronisation). A kernel
// that finds broken inputs (a stale plan, a negative block id or token id, a scatter row out of
// range) records it, and the next synchronising call stops the process with the reason (the same
// programmer faults the CPU backend FS_ASSERTs).
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace fineserve {

struct CudaOptions {
  // NaN-fill every GEMM and attention workspace before each use, so a kernel that reads a slot
  // this call did not write shows up as NaNs (tests and sanitizer runs; slower).
  bool poison_workspaces = false;
};

// Throws fineserve::Error when no usable CUDA device `device_index` exists, or when this build has
// no CUDA. act: F16 (default) or BF16.
std::unique_ptr<Backend> make_cuda_backend(int device_index = 0, DType act = DType::F16, const CudaOptions& options = {});

// Whether this build of FineServe has the CUDA backend (false: make_cuda_backend always throws).
bool cuda_backend_built();

}  // namespace fineserve
