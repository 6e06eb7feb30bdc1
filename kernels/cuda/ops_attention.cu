// CUDA paged attention and KV-cache writes (semantics: kernels/ops.h PagedAttention; the launch is
// planned on the host, ops_plan.h).
//
// attention_kernel: one CTA per (plan item, KV-head chunk). An item is a tile of up to
// queries_per_cta consecutive queries of one sequence; the chunk is up to heads_per_cta of the query
// heads that share one KV head. The CTA's kAttnRows rows are those (query, head) pairs: decode
// tokens of a GQA model fill the rows with the heads of a group, prefill tiles with queries, and K/V
// is read from the cache once for all rows. The CTA walks its key range kAttnKeys keys at a time:
// K and V of the tile go to shared memory (fp32), each lane scores one key for each of its warp's
// rows, and an online softmax (running max and sum per row, flash-attention style) folds the tile
// into the row's output accumulators (each lane owns head_dim / 32 output columns). Plan items that
// split a long context write unnormalised partial results (output, max, sum), which
// attention_combine_kernel merges. The math is fp32 on CUDA cores; the tensor-core version for
// long prefills is the first tuning item.
#include "kernels/cuda/ops.h"
#include "kernels/cuda/ops_device.h"

namespace fineserve::cuda {
namespace {

using dev::from_f;
using dev::to_f;

constexpr int kRowsPerWarp = kAttnRows / kAttnWarps;
static_assert(kRowsPerWarp * kAttnWarps == kAttnRows && kAttnKeys == 32, "one key per lane");

template <typename T>
struct AttnArgs {
  const T* q;        // [n_tokens, n_heads, head_dim]
  const T* k_cache;  // [num_blocks, block_size, n_kv_heads, head_dim]
  const T* v_cache;  // [num_blocks, block_size, n_kv_heads, head_dim]
  T* out;            // [n_tokens, n_heads, head_dim]
  const int32_t* query_start;  // [n_seqs + 1]
  const int32_t* context_len;  // [n_seqs]
  const int32_t* block_table;  // [n_seqs, max_blocks]
  const AttentionItem* items;
  float* partial_o;   // [slots, grid_y, kAttnRows, head_dim]
  float* partial_ml;  // [slots, grid_y, kAttnRows, 2]
  int* fault;
  int n_heads, n_kv_heads, head_dim, group, heads_per_cta, chunks, block_size, max_blocks, window, grid_y;
  float scale;
};

size_t attention_smem_bytes(int head_dim) {
  const size_t d = static_cast<size_t>(head_dim);
  return (kAttnRows * d + kAttnKeys * (d + 1) + kAttnKeys * d) * sizeof(float);
}

// The query heads of blockIdx.y: [h0, h0 + count), all reading KV head kv_head.
struct HeadChunk {
  int kv_head, h0, count;
};
template <typename T>
__device__ __forceinline__ HeadChunk head_chunk(const AttnArgs<T>& a) {
  const int kv_head = blockIdx.y / a.chunks, chunk = blockIdx.y - kv_head * a.chunks;
  const int first = chunk * a.heads_per_cta;
  return {kv_head, kv_head * a.group + first, min(a.heads_per_cta, a.group - first)};
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(const AttnArgs<T> a) {
  constexpr int ND = DMAX / 32;  // output columns per lane
  extern __shared__ float smem[];
  __shared__ int64_t key_off[kAttnKeys];  // element offset of each key's row in the cache
  const int D = a.head_dim;
  float* sQ = smem;                      // [kAttnRows, D], pre-scaled
  float* sK = sQ + kAttnRows * D;        // [kAttnKeys, D + 1]: the padding puts lane j's row j in its own bank
  float* sV = sK + kAttnKeys * (D + 1);  // [kAttnKeys, D]

  const AttentionItem it = a.items[blockIdx.x];
  const HeadChunk hc = head_chunk(a);
  const int32_t q0 = a.query_start[it.seq], q_end = a.query_start[it.seq + 1], ctx = a.context_len[it.seq];
  if (q0 != it.seen_q0 || q_end != it.seen_q_end || ctx != it.seen_ctx) {  // uniform over the CTA
    if (threadIdx.x == 0) dev::raise_fault(a.fault, kFaultAttentionPlan);
    return;
  }
  const int32_t pos_first = ctx - (q_end - q0) + it.q_first;
  const int64_t kv_row = static_cast<int64_t>(a.n_kv_heads) * D;

  for (int idx = threadIdx.x; idx < kAttnRows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx - r * D;
    const int qi = r / a.heads_per_cta, hi = r - qi * a.heads_per_cta;
    float v = 0.0f;
    if (qi < it.n_q && hi < hc.count)
      v = to_f(a.q[(static_cast<int64_t>(q0 + it.q_first + qi) * a.n_heads + hc.h0 + hi) * D + d]) * a.scale;
    sQ[idx] = v;
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][ND];
  int row_pos[kRowsPerWarp], row_lo[kRowsPerWarp];
  bool row_ok[kRowsPerWarp];
  bool warp_active = false;
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int r = warp * kRowsPerWarp + j;
    const int qi = r / a.heads_per_cta, hi = r - qi * a.heads_per_cta;
    row_ok[j] = qi < it.n_q && hi < hc.count;
    row_pos[j] = pos_first + qi;
    row_lo[j] = a.window > 0 ? max(0, row_pos[j] - a.window + 1) : 0;
    warp_active |= row_ok[j];
    m[j] = -INFINITY;
    l[j] = 0.0f;
#pragma unroll
    for (int dd = 0; dd < ND; ++dd) o[j][dd] = 0.0f;
  }

  const int32_t* table = a.block_table + static_cast<int64_t>(it.seq) * a.max_blocks;
  for (int kt = it.key_lo; kt <= it.key_hi; kt += kAttnKeys) {
    const int nk = min(kAttnKeys, it.key_hi - kt + 1);
    __syncthreads();  // everyone is done with the previous tile (and sQ is written)
    if (threadIdx.x < nk) {
      const int p = kt + threadIdx.x;
      int32_t block = table[p / a.block_size];
      if (block < 0) {
        dev::raise_fault(a.fault, kFaultBlockTable);
        block = 0;
      }
      key_off[threadIdx.x] = (static_cast<int64_t>(block) * a.block_size + p % a.block_size) * kv_row +
                             static_cast<int64_t>(hc.kv_head) * D;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nk * D; idx += blockDim.x) {
      const int j = idx / D, d = idx - j * D;
      const int64_t off = key_off[j] + d;
      sK[j * (D + 1) + d] = to_f(a.k_cache[off]);
      sV[j * D + d] = to_f(a.v_cache[off]);
    }
    __syncthreads();
    if (!warp_active) continue;  // uniform per warp; the next iteration's barriers are still reached

    // Scores: lane j takes key kt + j for each of the warp's rows (q broadcast from shared memory).
    float s[kRowsPerWarp];
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) s[j] = 0.0f;
    if (lane < nk) {
      const float* kr = sK + lane * (D + 1);
      const float* qr = sQ + warp * kRowsPerWarp * D;
      for (int d = 0; d < D; ++d) {
        const float kd = kr[d];
#pragma unroll
        for (int j = 0; j < kRowsPerWarp; ++j) s[j] = fmaf(qr[j * D + d], kd, s[j]);
      }
    }
    const int key = kt + lane;
    float p[kRowsPerWarp];
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const bool visible = row_ok[j] && lane < nk && key >= row_lo[j] && key <= row_pos[j];
      const float sj = visible ? s[j] : -INFINITY;
      const float m_new = fmaxf(m[j], dev::warp_max(sj));
      if (m_new == -INFINITY) {  // nothing visible to this row yet (warp-uniform)
        p[j] = 0.0f;
        continue;
      }
      const float alpha = expf(m[j] - m_new);  // 0 while m[j] is still -inf
      p[j] = expf(sj - m_new);                 // 0 for masked keys
      l[j] = l[j] * alpha + dev::warp_sum(p[j]);
#pragma unroll
      for (int dd = 0; dd < ND; ++dd) o[j][dd] *= alpha;
      m[j] = m_new;
    }
    // o += p · V: key jj's probability comes from lane jj by shuffle; lanes own output columns.
    for (int jj = 0; jj < nk; ++jj) {
      const float* vr = sV + jj * D;
      float vv[ND];
#pragma unroll
      for (int dd = 0; dd < ND; ++dd) {
        const int d = lane + 32 * dd;
        vv[dd] = d < D ? vr[d] : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        const float pj = __shfl_sync(dev::kFullMask, p[j], jj);
#pragma unroll
        for (int dd = 0; dd < ND; ++dd) o[j][dd] = fmaf(pj, vv[dd], o[j][dd]);
      }
    }
  }

#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    if (!row_ok[j]) continue;
    const int r = warp * kRowsPerWarp + j;
    const int qi = r / a.heads_per_cta, hi = r - qi * a.heads_per_cta;
    if (it.partial < 0) {
      const float inv = 1.0f / l[j];
      T* dst = a.out + (static_cast<int64_t>(q0 + it.q_first + qi) * a.n_heads + hc.h0 + hi) * D;
#pragma unroll
      for (int dd = 0; dd < ND; ++dd) {
        const int d = lane + 32 * dd;
        if (d < D) dst[d] = from_f<T>(o[j][dd] * inv);
      }
    } else {
      const int64_t slot_row = (static_cast<int64_t>(it.partial) * a.grid_y + blockIdx.y) * kAttnRows + r;
      float* dst = a.partial_o + slot_row * D;
#pragma unroll
      for (int dd = 0; dd < ND; ++dd) {
        const int d = lane + 32 * dd;
        if (d < D) dst[d] = o[j][dd];
      }
      if (lane == 0) {
        a.partial_ml[slot_row * 2] = m[j];
        a.partial_ml[slot_row * 2 + 1] = l[j];
      }
    }
  }
}

// One CTA per (split tile, KV-head chunk); warp w merges rows w, w + kAttnWarps, ...: with M the
// largest running max of the splits, out = Σ e^(m_s - M) o_s / Σ e^(m_s - M) l_s.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads)
    attention_combine_kernel(const AttnArgs<T> a, const AttentionGroup* __restrict__ groups) {
  const AttentionGroup g = groups[blockIdx.x];
  const AttentionItem it = a.items[g.first];
  const HeadChunk hc = head_chunk(a);
  const int32_t q0 = a.query_start[it.seq];
  if (q0 != it.seen_q0) return;  // attention_kernel flagged it
  const int D = a.head_dim, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < kAttnRows; r += kAttnWarps) {
    const int qi = r / a.heads_per_cta, hi = r - qi * a.heads_per_cta;
    if (qi >= it.n_q || hi >= hc.count) continue;
    auto slot_row = [&](int s) {
      return (static_cast<int64_t>(g.first_slot + s) * a.grid_y + blockIdx.y) * kAttnRows + r;
    };
    float mx = -INFINITY;
    for (int s = 0; s < g.count; ++s) mx = fmaxf(mx, a.partial_ml[slot_row(s) * 2]);
    float sum = 0.0f;
    for (int s = 0; s < g.count; ++s) {
      const float ms = a.partial_ml[slot_row(s) * 2];
      if (ms != -INFINITY) sum += expf(ms - mx) * a.partial_ml[slot_row(s) * 2 + 1];
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    T* dst = a.out + (static_cast<int64_t>(q0 + it.q_first + qi) * a.n_heads + hc.h0 + hi) * D;
    for (int d = lane; d < D; d += 32) {
      float acc = 0.0f;
      for (int s = 0; s < g.count; ++s) {
        const float ms = a.partial_ml[slot_row(s) * 2];
        if (ms != -INFINITY) acc = fmaf(expf(ms - mx), a.partial_o[slot_row(s) * D + d], acc);
      }
      dst[d] = from_f<T>(acc * inv);
    }
  }
}

// One block per token of the step: its sequence by binary search over query_start (the largest s
// with query_start[s] <= token, which skips sequences without queries), then its K and V rows.
template <typename T>
__global__ void write_kv_kernel(const T* __restrict__ k,  // [n_tokens, n_kv_heads * head_dim]
                                const T* __restrict__ v,
                                const int32_t* __restrict__ query_start, const int32_t* __restrict__ context_len,
                                const int32_t* __restrict__ block_table, int n_seqs, int max_blocks, int block_size,
                                int64_t row, int32_t seen_q0, int32_t seen_q_end, int* fault,
                                T* __restrict__ k_cache,  // [num_blocks, block_size, n_kv_heads * head_dim]
                                T* __restrict__ v_cache) {
  const int32_t q_begin = query_start[0], q_end = query_start[n_seqs];
  if (q_begin != seen_q0 || q_end != seen_q_end) {
    if (blockIdx.x == 0 && threadIdx.x == 0) dev::raise_fault(fault, kFaultAttentionPlan);
    return;
  }
  const int32_t t = q_begin + static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = n_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (query_start[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  const int32_t q0 = query_start[lo], nq = query_start[lo + 1] - q0;
  const int32_t pos = context_len[lo] - nq + (t - q0);
  const int32_t block = block_table[static_cast<int64_t>(lo) * max_blocks + pos / block_size];
  if (block < 0) {
    if (threadIdx.x == 0) dev::raise_fault(fault, kFaultBlockTable);
    return;
  }
  const int64_t dst = (static_cast<int64_t>(block) * block_size + pos % block_size) * row;
  const int64_t src = static_cast<int64_t>(t) * row;
  for (int64_t e = threadIdx.x; e < row; e += blockDim.x) {
    k_cache[dst + e] = k[src + e];
    v_cache[dst + e] = v[src + e];
  }
}

template <typename T, int DMAX>
void launch_attention(const AttnArgs<T>& a, const AttentionPlan& plan, const AttentionWork& work,
                      cudaStream_t stream) {
  const size_t smem = attention_smem_bytes(a.head_dim);
  // Past 48 KiB a kernel must opt in to dynamic shared memory (per device: set on every launch).
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(attention_kernel<T, DMAX>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "cudaFuncSetAttribute (attention shared memory)");
  const dim3 grid(static_cast<unsigned>(plan.items.size()), static_cast<unsigned>(plan.grid_y));
  attention_kernel<T, DMAX><<<grid, kAttnThreads, smem, stream>>>(a);
  check_launch("attention");
  if (!plan.groups.empty()) {
    const dim3 cgrid(static_cast<unsigned>(plan.groups.size()), static_cast<unsigned>(plan.grid_y));
    attention_combine_kernel<T><<<cgrid, kAttnThreads, 0, stream>>>(a, work.groups);
    check_launch("attention combine");
  }
}

}  // namespace

// grid: plan.n_tokens blocks (one per token); block: 128 threads.
void write_kv(DType act, const PagedAttention& p, const AttentionPlan& plan, const void* k, const void* v,
              void* k_cache, void* v_cache, int* fault, cudaStream_t stream) {
  if (plan.n_tokens <= 0) return;
  const int64_t row = static_cast<int64_t>(p.n_kv_heads) * p.head_dim;
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    write_kv_kernel<T><<<static_cast<unsigned>(plan.n_tokens), 128, 0, stream>>>(
        static_cast<const T*>(k), static_cast<const T*>(v), p.query_start, p.context_len, p.block_table, p.n_seqs,
        p.max_blocks, p.block_size, row, plan.q_begin, plan.q_end, fault, static_cast<T*>(k_cache),
        static_cast<T*>(v_cache));
  });
  check_launch("write_kv");
}

// grid: (plan items, plan.grid_y = KV heads x head chunks); block: kAttnThreads; dynamic shared
// memory attention_smem_bytes(head_dim) (41 KiB at head_dim 128). Split items add a combine grid
// (split tiles, grid_y).
void attention(DType act, const PagedAttention& p, const AttentionPlan& plan, const AttentionWork& work,
               const void* q, const void* k_cache, const void* v_cache, void* out, cudaStream_t stream) {
  if (plan.items.empty()) return;
  if (p.head_dim > kAttnMaxHeadDim)
    throw Error("CUDA attention supports head_dim up to " + std::to_string(kAttnMaxHeadDim) + ", got " +
                std::to_string(p.head_dim));
  FS_ASSERT(plan.grid_y <= 65535, "too many KV heads for one grid");
  dispatch_act(act, [&](auto tag) {
    using T = decltype(tag);
    AttnArgs<T> a;
    a.q = static_cast<const T*>(q);
    a.k_cache = static_cast<const T*>(k_cache);
    a.v_cache = static_cast<const T*>(v_cache);
    a.out = static_cast<T*>(out);
    a.query_start = p.query_start;
    a.context_len = p.context_len;
    a.block_table = p.block_table;
    a.items = work.items;
    a.partial_o = work.partial_o;
    a.partial_ml = work.partial_ml;
    a.fault = work.fault;
    a.n_heads = p.n_heads;
    a.n_kv_heads = p.n_kv_heads;
    a.head_dim = p.head_dim;
    a.group = plan.group;
    a.heads_per_cta = plan.heads_per_cta;
    a.chunks = plan.chunks_per_kv_head;
    a.block_size = p.block_size;
    a.max_blocks = p.max_blocks;
    a.window = p.sliding_window;
    a.grid_y = plan.grid_y;
    a.scale = p.scale;
    if (p.head_dim <= 64)
      launch_attention<T, 64>(a, plan, work, stream);
    else if (p.head_dim <= 128)
      launch_attention<T, 128>(a, plan, work, stream);
    else
      launch_attention<T, 256>(a, plan, work, stream);
  });
}

}  // namespace fineserve::cuda
