// Scalar math shared by the CUDA kernels and their host-side tests: compiled for the device by nvcc
// and for the host by the C++ compiler, so that the formulas (activation variants, the router's
// top-k and tie rule) are checked against the CPU reference on any machine.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/ops.h"

#if defined(__CUDACC__)
#define FS_HD __host__ __device__
#else
#define FS_HD
#endif

namespace fineserve::cuda {

// The CPU backend's activations (kernels/cpu/reference.h) in fp32.
FS_HD inline float activate(Activation kind, float x) {
  switch (kind) {
    case Activation::ReLU: return x > 0.0f ? x : 0.0f;
    case Activation::GELU:
      // 0.5 x (1 + erf(x/√2)) written with erfc, which keeps its relative accuracy in the negative tail
      // where 1 + erf would cancel.
      return 0.5f * x * ::erfcf(-0.70710678118654752f * x);
    case Activation::GELUTanh: {
      // 0.5 x (1 + tanh u) = x / (1 + e^(-2u)): no cancellation near u = 0 or for large |u|.
      const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      return x / (1.0f + ::expf(-2.0f * u));
    }
    case Activation::SiLU: return x / (1.0f + ::expf(-x));
  }
  return x;
}

// Mixtral routing for one token (Backend::moe_route): the top_k experts by softmax probability,
// most probable first, ties to the lower index, and their probabilities renormalised over the
// top_k. Softmax is monotonic, so experts are ranked by their logits (exact ties stay ties); the
// renormalised weight of expert e is exp(x_e - max) / Σ_top exp(x_j - max), the full softmax sum
// cancelling. `logit(e)` reads expert e's logit as fp32. n_experts <= 256.
template <class Logit>
FS_HD void route_top_k(Logit logit, int n_experts, int top_k, int32_t* ids, float* weights) {
  uint32_t taken[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float mx = -INFINITY;
  for (int e = 0; e < n_experts; ++e) mx = fmaxf(mx, logit(e));
  float sum = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    int best = -1;
    float best_x = 0.0f;
    for (int e = 0; e < n_experts; ++e) {
      if ((taken[e >> 5] >> (e & 31)) & 1u) continue;
      const float x = logit(e);
      if (best < 0 || x > best_x) {  // strict: an equal logit later in the list does not win
        best = e;
        best_x = x;
      }
    }
    taken[best >> 5] |= 1u << (best & 31);
    ids[j] = best;
    weights[j] = ::expf(best_x - mx);
    sum += weights[j];
  }
  for (int j = 0; j < top_k; ++j) weights[j] /= sum;
}

}  // namespace fineserve::cuda
