// Activation statistics for `quantize --calibration FILE`: the source model is run on calibration
// text, and for every linear weight the mean square of each of its input columns is recorded,
// E[x_k²]. That is the weight of column k in the output error of the layer, Σ_k E[x_k²] ΔW_jk²
// for inputs with uncorrelated columns, which the calibrated search minimises instead of the
// plain Σ ΔW_jk² (AWQ's activation-magnitude salience; llama.cpp's importance matrix).
//
// How the inputs are seen: the model runs on a Backend that forwards every call to the CPU backend
// and, in linear(), adds the squares of x's columns to the matrix's sums. A weight is told apart by
// its bytes: every dense source matrix's FNV-1a hash is computed from the checkpoint, and the
// matrix the loader uploads is matched to it (or, for the Llama family's stacked gate_up, each half
// of its rows to one source matrix, which then share the input statistics).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace fineserve::quant {

struct CalibrationOptions {
  int ctx = 512;             // tokens per window (non-overlapping windows; capped at the model's context)
  int64_t max_tokens = 0;    // > 0: only the first max_tokens tokens
};

struct ActivationStats {
  // Per source weight name ("model.layers.0.mlp.up_proj.weight"): E[x_k²] over the tokens that
  // reached it, one per input column.
  std::map<std::string, std::vector<float>> mean_sq;
  int64_t tokens = 0;  // tokens run through the model
};

// Runs the dense checkpoint `model_dir` (the one being quantized) on the token ids on the CPU.
// Throws fineserve::Error for a quantized checkpoint, fewer than 2 tokens or a model that cannot be
// loaded.
ActivationStats collect_activation_stats(const std::filesystem::path& model_dir, const std::vector<int32_t>& ids,
                                         const CalibrationOptions& options = {});

}  // namespace fineserve::quant
