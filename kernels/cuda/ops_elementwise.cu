// CUDA norms, activations, residual add, embedding gather, rotary embedding and fp32 conversion
// (semantics: kernels/backend.h; launch shapes in each launcher's comment).
#include <string>

#include "kernels/cuda/ops.h"
#include "kernels/cuda/ops_device.h"
#include "kernels/cuda/ops_math.h"

namespace fineserve::cuda {
namespace {

using dev::from_f;
using dev::load_any;
using dev::to_f;

constexpr int kThreads = 256;

// Threads per row for the norms: about 8 elements per thread, a multiple of 32 in [64, 1024].
int norm_threads(int64_t n) {
  int64_t t = (n + 7) / 8;
  t = (t + 31) / 32 * 32;
  return static_cast<int>(t < 64 ? 64 : (t > 1024 ? 1024 : t));
}

// One block per row. Two passes (mean, then the squared deviations) as the CPU does, rather than
// E[x²] - mean², which cancels for rows with a large mean. x and y may be the same buffer: every
// thread reads an element before it writes it, and only the thread that owns it.
template <typename T>
__global__ void layer_norm_kernel(const T* x,  // [m, n]
                                  int64_t n, const void* gamma, const void* beta, DType param_dtype, float eps,
                                  T* y) {  // [m, n]
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * n;
  T* yr = y + blockIdx.x * n;
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += to_f(xr[j]);
  const float mean = dev::block_sum(s, scratch) / static_cast<float>(n);
  float v = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float d = to_f(xr[j]) - mean;
    v = fmaf(d, d, v);
  }
  const float var = dev::block_sum(v, scratch) / static_cast<float>(n);
  const float inv = 1.0f / sqrtf(var + eps);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    float t = (to_f(xr[j]) - mean) * inv;
    if (gamma) t *= load_any(gamma, param_dtype, j);
    if (beta) t += load_any(beta, param_dtype, j);
    yr[j] = from_f<T>(t);
  }
}

template <typename T>
__global__ void rms_norm_kernel(const T* x,  // [m, n]
                                int64_t n, const void* gamma, DType param_dtype, float eps,
                                T* y) {  // [m, n]
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * n;
  T* yr = y + blockIdx.x * n;
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float v = to_f(xr[j]);
    s = fmaf(v, v, s);
  }
  const float inv = 1.0f / sqrtf(dev::block_sum(s, scratch) / static_cast<float>(n) + eps);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    float t = to_f(xr[j]) * inv;
    if (gamma) t *= load_any(gamma, param_dtype, j);
    yr[j] = from_f<T>(t);
  }
}

template <typename T>
__global__ void activation_kernel(Activation kind, T* x, int64_t count) {  // [count], in place
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = from_f<T>(activate(kind, to_f(x[i])));
}

template <typename T>
__global__ void gated_activation_kernel(Activation kind,
                                        const T* __restrict__ gate_up,  // [m, 2n] = [gate | up]
                                        int64_t m, int64_t n,
                                        T* __restrict__ out) {  // [m, n]
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < m * n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, c = i - r * n;
    const T* row = gate_up + r * 2 * n;
    out[i] = from_f<T>(activate(kind, to_f(row[c])) * to_f(row[n + c]));
  }
}

template <typename T>
__global__ void add_kernel(T* x, const T* y, int64_t count) {  // x += y, [count]
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = from_f<T>(to_f(x[i]) + to_f(y[i]));
}

// One block per output row. The table may be the activations themselves (the MoE row gather), so
// no __restrict__ on it.
template <typename T>
__global__ void embedding_kernel(const void* table,  // [rows, dim] of table_dtype
                                 DType table_dtype, int64_t dim,
                                 const int32_t* __restrict__ ids,  // [n]
                                 bool accumulate, int* fault,
                                 T* out) {  // [n, dim]
  const int32_t id = ids[blockIdx.x];
  if (id < 0) {
    if (threadIdx.x == 0) dev::raise_fault(fault, kFaultEmbeddingId);
    return;
  }
  T* o = out + blockIdx.x * dim;
  const int64_t base = static_cast<int64_t>(id) * dim;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const float v = load_any(table, table_dtype, base + j);
    o[j] = from_f<T>(accumulate ? to_f(o[j]) + v : v);
  }
}

// One block per token: the rotation angles of its position first (shared memory, cos then sin),
// then every (head, i < half) pair of q and k. The angle is rounded to fp32 before sin/cos, as HF
// and the CPU backend compute it; sincosf (not the fast intrinsic) is accurate to ~1 ulp.
template <typename T>
__global__ void rotary_kernel(T* q,  // [n_tokens, n_heads, head_dim]
                              T* k,  // [n_tokens, n_kv_heads, head_dim]
                              const int32_t* __restrict__ positions,  // [n_tokens]
                              int n_heads, int n_kv_heads, int head_dim, int half,
                              const float* __restrict__ inv_freq) {  // [half]
  extern __shared__ float cs[];  // [2 * half]
  const int64_t t = blockIdx.x;
  const float pos = static_cast<float>(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float theta = pos * inv_freq[i];
    float s, c;
    sincosf(theta, &s, &c);
    cs[i] = c;
    cs[half + i] = s;
  }
  __syncthreads();
  const int total = (n_heads + n_kv_heads) * half;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int h = idx / half, i = idx - h * half;
    T* v = h < n_heads ? q + (t * n_heads + h) * head_dim : k + (t * n_kv_heads + (h - n_heads)) * head_dim;
    const float a = to_f(v[i]), b = to_f(v[i + half]), c = cs[i], s = cs[half + i];
    v[i] = from_f<T>(a * c - b * s);
    v[i + half] = from_f<T>(b * c + a * s);
  }
}

template <typename T>
__global__ void to_f32_kernel(const T* __restrict__ src, int64_t count, float* __restrict__ dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = to_f(src[i]);
}

void check_param_dtype(const void* p, DType t) {
  FS_ASSERT(p == nullptr || is_float(t), "norm parameters must be F32, F16 or BF16");
}

}  // namespace

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

// grid: m blocks (one per row); block: norm_threads(n).
void layer_norm(DType act, const void* x, int64_t m, int64_t n, const void* gamma, const void* beta,
                DType param_dtype, float eps, void* y, cudaStream_t stream) {
  check_param_dtype(gamma, param_dtype);
  if (m <= 0 || n <= 0) return;
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    layer_norm_kernel<T><<<static_cast<unsigned>(m), norm_threads(n), 0, stream>>>(
        static_cast<const T*>(x), n, gamma, beta, param_dtype, eps, static_cast<T*>(y));
  });
  check_launch("layer_norm");
}

// grid: m blocks (one per row); block: norm_threads(n).
void rms_norm(DType act, const void* x, int64_t m, int64_t n, const void* gamma, DType param_dtype, float eps,
              void* y, cudaStream_t stream) {
  check_param_dtype(gamma, param_dtype);
  if (m <= 0 || n <= 0) return;
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_kernel<T><<<static_cast<unsigned>(m), norm_threads(n), 0, stream>>>(
        static_cast<const T*>(x), n, gamma, param_dtype, eps, static_cast<T*>(y));
  });
  check_launch("rms_norm");
}

// grid-stride: up to 2^20 blocks of 256 threads.
void activation(DType act, Activation kind, void* x, int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    activation_kernel<T><<<grid_for(count, kThreads), kThreads, 0, stream>>>(kind, static_cast<T*>(x), count);
  });
  check_launch("activation");
}

void gated_activation(DType act, Activation kind, const void* gate_up, int64_t m, int64_t n, void* out,
                      cudaStream_t stream) {
  if (m <= 0 || n <= 0) return;
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    gated_activation_kernel<T><<<grid_for(m * n, kThreads), kThreads, 0, stream>>>(
        kind, static_cast<const T*>(gate_up), m, n, static_cast<T*>(out));
  });
  check_launch("gated_activation");
}

void add(DType act, void* x, const void* y, int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    add_kernel<T><<<grid_for(count, kThreads), kThreads, 0, stream>>>(static_cast<T*>(x), static_cast<const T*>(y),
                                                                      count);
  });
  check_launch("add");
}

// grid: n blocks (one per output row); block: 128 threads.
void embedding(DType act, const void* table, DType table_dtype, int64_t dim, const int32_t* ids, int64_t n,
               bool accumulate, void* out, int* fault, cudaStream_t stream) {
  FS_ASSERT(is_float(table_dtype), "embedding: table dtype must be F32, F16 or BF16");
  if (n <= 0 || dim <= 0) return;
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    embedding_kernel<T><<<static_cast<unsigned>(n), 128, 0, stream>>>(table, table_dtype, dim, ids, accumulate, fault,
                                                                        static_cast<T*>(out));
  });
  check_launch("embedding");
}

// grid: n_tokens blocks (one per token); block: 128 threads; shared memory: rotary_dim floats.
void rotary(DType act, void* q, void* k, const int32_t* positions, int64_t n_tokens, int n_heads, int n_kv_heads,
            int head_dim, int rotary_dim, const float* inv_freq, cudaStream_t stream) {
  FS_ASSERT(rotary_dim % 2 == 0 && rotary_dim <= head_dim, "rotary_dim must be even and <= head_dim");
  if (n_tokens <= 0 || rotary_dim == 0) return;
  const int half = rotary_dim / 2;
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    rotary_kernel<T><<<static_cast<unsigned>(n_tokens), 128, static_cast<size_t>(rotary_dim) * sizeof(float),
                       stream>>>(static_cast<T*>(q), static_cast<T*>(k), positions, n_heads, n_kv_heads, head_dim, half,
                                 inv_freq);
  });
  check_launch("rotary");
}

void to_f32(DType act, const void* src, int64_t count, float* dst, cudaStream_t stream) {
  if (count <= 0) return;
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    to_f32_kernel<T><<<grid_for(count, kThreads), kThreads, 0, stream>>>(static_cast<const T*>(src), count, dst);
  });
  check_launch("to_f32");
}

}  // namespace fineserve::cuda
