// The conversion pipeline: a Hugging Face checkpoint in, a FineQuant checkpoint out.
//
// Streams tensor by tensor (peak memory: the tensor being converted plus its codes), decides each
// linear weight's group size (quant/adaptive.h), quantizes it, and writes
//   <name>.qweight  int8 codes [N, K] (8 bits) or packed int4 [N, K/2] (4 bits, see quantizer.h)
//   <name>.scales   fp16 [N, K/group]
// in place of <name>.weight (quant/format.h owns the format: tensor names, metadata); every other
// tensor is copied (fp32 ones stored as fp16). Files other than safetensors (config.json,
// tokenizer files) are copied, and config.json gains a "quantization_config" entry. The output appears only when complete (AtomicDirectory), with
// quant_report.json beside the weights.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "quant/adaptive.h"
#include "quant/bit_budget.h"
#include "quant/format.h"

namespace fineserve::quant {

// MoE expert matrices (Mixtral's block_sparse_moe.experts.E.w1/w2/w3, Qwen-MoE's mlp.experts.E.*):
// the ones ConvertOptions::expert_bits applies to.
inline constexpr const char* kExpertPattern = "\\.experts\\.[0-9]+\\.";
// MoE routers (Mixtral's block_sparse_moe.gate): always kept in 16 bits, whatever --keep says. A
// router is tiny (n_experts x hidden) and sensitive: its error moves tokens to other experts.
inline constexpr const char* kRouterPattern = "(block_sparse_moe|mlp)\\.gate\\.weight$|router";

struct ConvertOptions {
  std::filesystem::path model;  // the source checkpoint (directory or .safetensors file)
  std::filesystem::path out;    // the FineQuant checkpoint directory to create
  GroupOptions group;           // bits, the group-size rule and the scale rule
  // > 0: `--target-bits`: every quantized matrix gets its bits (8/4) and group from the bit budget
  // (quant/bit_budget.h), averaging at most this many bits per weight (codes + scales).
  double target_bits = 0;
  // --target-bits: the error weight of matrices by name (default_salience_priors(): none, all 1).
  std::vector<SaliencePrior> salience = default_salience_priors();
  // `--calibration`: per source weight name (".weight"), the importance of each of its input columns
  // ([K], finite, >= 0): the mean square of that input's activations over calibration text
  // (quant/calibration/activation_stats.h). A matrix listed is quantized with the importance-weighted
  // search (quantize()), and with --target-bits its errors are importance-weighted too. Empty (the
  // default): data-free.
  std::map<std::string, std::vector<float>> importance;
  std::string calibration;  // what the importances came from, for the report ("FILE, N tokens")
  // > 0: the bits (8 or 4) of MoE expert matrices (kExpertPattern), e.g. 8-bit attention with
  // 4-bit experts. The checkpoint's metadata then records each matrix's bits ("matrix_bits").
  int expert_bits = 0;
  // Linear weights whose names match any of these (ECMAScript regex, searched) stay in 16 bits.
  std::vector<std::string> keep;
  uint64_t max_shard_bytes = 4ull << 30;
  bool overwrite = false;
};

// The default `keep` list: embeddings, the LM head, norms and MoE routers stay in 16 bits.
std::vector<std::string> default_keep_patterns();
// default_keep_patterns() less the token embedding and LM head ones (`quantize --quantize-embeddings`):
// the models load such an embedding dequantized for lookups and run a tied LM head on its codes.
std::vector<std::string> keep_patterns_quantizing_embeddings();

struct MatrixReport {
  std::string name;  // the source tensor (".weight")
  int64_t rows = 0, cols = 0;
  int bits = 0;
  GroupDecision decision;
  double rel_error = 0;
  double absmax = 0;
  double bits_per_weight = 0;  // code bits + 16 / group (scales)
  bool calibrated = false;        // quantized with ConvertOptions::importance
  double weighted_rel_error = 0;  // importance-weighted relative error (= rel_error when not calibrated)
  uint64_t bytes_in = 0, bytes_out = 0;
};

struct ConvertReport {
  std::string source;
  std::string fingerprint;
  GroupOptions options;
  int expert_bits = 0;  // ConvertOptions::expert_bits
  double target_bits = 0;  // ConvertOptions::target_bits
  std::vector<SaliencePrior> salience;  // ConvertOptions::salience, when target_bits > 0
  std::string calibration;              // ConvertOptions::calibration (empty: data-free)
  std::vector<MatrixReport> matrices;
  struct Kept {
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
    std::string why;
  };
  std::vector<Kept> kept;
  uint64_t bytes_in = 0, bytes_out = 0;  // all tensors
  double seconds = 0;
};

struct Progress {
  size_t tensors_done = 0, tensors_total = 0;
  uint64_t bytes_done = 0, bytes_total = 0;
  std::string current;
};

ConvertReport convert_checkpoint(const ConvertOptions& options,
                                 const std::function<void(const Progress&)>& progress = {});

nlohmann::json to_json(const ConvertReport& report);
// The per-matrix table and the totals, as `fineserve quantize` prints them.
std::string format_report(const ConvertReport& report);

// A fingerprint of a checkpoint that is cheap to compute on hundreds of GB: FNV-1a 64 over
// config.json and every safetensors header (names, dtypes, shapes, offsets) and file size.
std::string source_fingerprint(const std::filesystem::path& model_dir);

}  // namespace fineserve::quant
