// Activation order (GPTQ desc_act, compressed-tensors actorder) for the Llama family.
//
// Such a checkpoint quantizes the input channels of a matrix in an order of its own and names each
// channel's group with g_idx, so a group is a scattered set of channels. FineServe's matrices need
// each group to be a contiguous run of K, so the loader permutes K once at load
// (WeightLoader::input_order: column j of the re-laid matrix reads input channel order[j]). The
// model then has to hand that matrix its activation permuted the same way: y = W·x = W'·x[order].
//
// Why a gather at run time instead of permuting something else once: the inputs of q/k/v and
// gate/up are the RMSNorm of the residual stream, whose channel order every layer shares (each
// layer's matrices have their own order), and o_proj's input mixes heads after attention; only a
// copy of the activation in the matrix's order is exact for all of them. It costs one pass over
// [T, K] activations per distinct order (q/k/v usually share one, gate/up must), small next to
// the GEMMs that follow, and nothing at all for checkpoints without activation order.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "models/step_buffers.h"

namespace fineserve {

class InputGather {
 public:
  // `order`: [K], a permutation of 0..K-1.
  InputGather(Backend& backend, std::vector<int32_t> order);
  int64_t k() const { return static_cast<int64_t>(order_.size()); }
  const std::vector<int32_t>& order() const { return order_; }
  // out[t, j] = x[t, order[j]] for t < n_tokens; x and out are [n_tokens, K] activations.
  void forward(const void* x, int64_t n_tokens, void* out);

 private:
  Backend& be_;
  std::vector<int32_t> order_;
  DeviceBuffer ids_;       // [capacity, K]: t * K + order[j]
  int64_t capacity_ = 0;   // tokens ids_ covers
};

}  // namespace fineserve
