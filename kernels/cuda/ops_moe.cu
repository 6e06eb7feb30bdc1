// CUDA MoE routing ops: Mixtral's top-k router and the weighted scatter-add of expert outputs
// (semantics: kernels/backend.h).
#include "kernels/cuda/ops.h"
#include "kernels/cuda/ops_device.h"
#include "kernels/cuda/ops_math.h"

namespace fineserve::cuda {
namespace {

using dev::from_f;
using dev::to_f;

constexpr int kScatterThreads = 256;

// One thread per token (n_experts is small: 8 for Mixtral).
template <typename T>
__global__ void moe_route_kernel(const T* __restrict__ logits,  // [n_tokens, n_experts]
                                 int64_t n_tokens, int n_experts, int top_k,
                                 int32_t* __restrict__ expert_ids,  // [n_tokens, top_k]
                                 float* __restrict__ weights) {     // [n_tokens, top_k]
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n_tokens) return;
  const T* row = logits + t * n_experts;
  route_top_k([&](int e) { return to_f(row[e]); }, n_experts, top_k, expert_ids + t * top_k, weights + t * top_k);
}

// dst[rows[i], :] += weights[i] * src[i, :] for i in order, deterministically and without atomics:
// one block per destination row r. The block scans rows[] a tile of blockDim.x entries at a time
// and lists the i with rows[i] == r in increasing order (a warp ballot plus the lane's prefix count
// keeps the order within a warp; warps cover increasing i); then each thread owns columns of row r
// and adds those i's contributions in that order with fp32 accumulation, rounding to the
// activation type once per tile. Every element therefore sums in the order of i, as the CPU does,
// whatever the repeats, and a run gives the same bits every time.
template <typename T>
__global__ void scatter_add_kernel(const T* src,                    // [n, dim]
                                   const int32_t* __restrict__ rows,  // [n]
                                   const float* __restrict__ weights,  // [n]
                                   int64_t n, int64_t dim, int64_t dst_rows, int* fault,
                                   T* dst) {  // [dst_rows, dim]
  __shared__ int hits[kScatterThreads];
  __shared__ int warp_hits[kScatterThreads / 32];
  const int64_t r = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  T* d = dst + r * dim;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int32_t ri = i < n ? rows[i] : -1;
    if (r == 0 && i < n && (ri < 0 || ri >= dst_rows)) dev::raise_fault(fault, kFaultScatterRow);
    const bool hit = ri == r;
    const unsigned ballot = __ballot_sync(dev::kFullMask, hit);
    if (lane == 0) warp_hits[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0, total = 0;
    for (int w = 0; w < n_warps; ++w) {
      offset += w < warp ? warp_hits[w] : 0;
      total += warp_hits[w];
    }
    if (hit) hits[offset + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int>(i - base);
    __syncthreads();
    if (total > 0) {
      for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
        float acc = to_f(d[c]);
        for (int h = 0; h < total; ++h) {
          const int64_t ii = base + hits[h];
          acc = fmaf(weights[ii], to_f(src[ii * dim + c]), acc);
        }
        d[c] = from_f<T>(acc);
      }
    }
    __syncthreads();  // hits and warp_hits are refilled by the next tile
  }
}

}  // namespace

// grid: ceil(n_tokens / 128) blocks of 128 threads, one thread per token.
void moe_route(DType act, const void* router_logits, int64_t n_tokens, int n_experts, int top_k, int32_t* expert_ids,
               float* weights, cudaStream_t stream) {
  FS_ASSERT(n_experts > 0 && n_experts <= 256 && top_k >= 1 && top_k <= n_experts,
            "moe_route: need 1 <= top_k <= n_experts <= 256");
  if (n_tokens <= 0) return;
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    moe_route_kernel<T><<<static_cast<unsigned>((n_tokens + 127) / 128), 128, 0, stream>>>(
        static_cast<const T*>(router_logits), n_tokens, n_experts, top_k, expert_ids, weights);
  });
  check_launch("moe_route");
}

// grid: dst_rows blocks (one per destination row); block: 256 threads.
void scatter_add_rows(DType act, const void* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim,
                      void* dst, int64_t dst_rows, int* fault, cudaStream_t stream) {
  if (n <= 0 || dim <= 0) return;
  FS_ASSERT(dst_rows > 0, "scatter_add_rows: rows but no destination");
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    scatter_add_kernel<T><<<static_cast<unsigned>(dst_rows), kScatterThreads, 0, stream>>>(
        static_cast<const T*>(src), rows, weights, n, dim, dst_rows, fault, static_cast<T*>(dst));
  });
  check_launch("scatter_add_rows");
}

}  // namespace fineserve::cuda
