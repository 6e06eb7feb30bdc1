// CUDA kernels of the backend ops other than linear (kernels/cuda/gemm.h): host-callable launchers
// with the semantics of the Backend methods of the same names (kernels/backend.h). Every pointer is
// device memory; activations are of `act` (F16 or BF16); parameters and tables keep their own
// dtype (F32/F16/BF16); math inside is fp32. Each launch goes on `stream`; a failed launch throws
// fineserve::Error naming the op. `fault` is the backend's fault word (ops_plan.h kFault*), which
// kernels that detect broken inputs set instead of reading or writing out of bounds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/ops_plan.h"
#include "kernels/ops.h"

namespace fineserve::cuda {

// Throws fineserve::Error("CUDA error in <what>: ...") when e is not cudaSuccess.
void check_cuda(cudaError_t e, const char* what);

// ---- ops_elementwise.cu ---------------------------------------------------------------------
void layer_norm(DType act, const void* x, int64_t m, int64_t n, const void* gamma, const void* beta,
                DType param_dtype, float eps, void* y, cudaStream_t stream);
void rms_norm(DType act, const void* x, int64_t m, int64_t n, const void* gamma, DType param_dtype, float eps,
              void* y, cudaStream_t stream);
void activation(DType act, Activation kind, void* x, int64_t count, cudaStream_t stream);
void gated_activation(DType act, Activation kind, const void* gate_up, int64_t m, int64_t n, void* out,
                      cudaStream_t stream);
void add(DType act, void* x, const void* y, int64_t count, cudaStream_t stream);
void embedding(DType act, const void* table, DType table_dtype, int64_t dim, const int32_t* ids, int64_t n,
               bool accumulate, void* out, int* fault, cudaStream_t stream);
// inv_freq: device memory, [rotary_dim / 2] fp32.
void rotary(DType act, void* q, void* k, const int32_t* positions, int64_t n_tokens, int n_heads, int n_kv_heads,
            int head_dim, int rotary_dim, const float* inv_freq, cudaStream_t stream);
// dst[count] fp32 (device) = src[count] of act.
void to_f32(DType act, const void* src, int64_t count, float* dst, cudaStream_t stream);

// ---- ops_moe.cu -----------------------------------------------------------------------------
void moe_route(DType act, const void* router_logits, int64_t n_tokens, int n_experts, int top_k, int32_t* expert_ids,
               float* weights, cudaStream_t stream);
void scatter_add_rows(DType act, const void* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim,
                      void* dst, int64_t dst_rows, int* fault, cudaStream_t stream);

// ---- ops_attention.cu -----------------------------------------------------------------------
// write_kv for the plan's tokens [plan.q_begin, plan.q_end).
void write_kv(DType act, const PagedAttention& p, const AttentionPlan& plan, const void* k, const void* v,
              void* k_cache, void* v_cache, int* fault, cudaStream_t stream);

// The plan's arrays and scratch, uploaded to device memory by the caller.
struct AttentionWork {
  const AttentionItem* items = nullptr;    // [plan.items.size()]
  const AttentionGroup* groups = nullptr;  // [plan.groups.size()]
  float* partial_o = nullptr;              // [n_partials * grid_y * kAttnRows, head_dim]
  float* partial_ml = nullptr;             // [n_partials * grid_y * kAttnRows, 2]: running max, sum
  int* fault = nullptr;
};
void attention(DType act, const PagedAttention& p, const AttentionPlan& plan, const AttentionWork& work,
               const void* q, const void* k_cache, const void* v_cache, void* out, cudaStream_t stream);

}  // namespace fineserve::cuda
