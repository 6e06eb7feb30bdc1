// Hugging Face quantized checkpoints — GPTQ, AWQ and compressed-tensors `pack-quantized` — read
// as config.json's "quantization_config" declares them and re-laid, one matrix at a time, into
// FineServe's in-memory quantized form (kernels/ops.h WeightMatrix): the same integer codes, one
// fp16 scale and, where the source has a zero point, one fp32 offset per (output row, group). No
// weight is dequantized and quantized again: every source format here is w = s · (q − z) per
// (row, group), which is w = s · c + o with c = q − 2^(bits−1) (FineQuant's signed code) and
// o = s · (2^(bits−1) − z).
//
// Source layouts (each format's own packing; N = output features, K = input features, G = groups):
//   GPTQ   `stem`.qweight I32 [K·bits/32, N]  codes packed along K, low bits first, unsigned q
//          `stem`.qzeros  I32 [G, N·bits/32]  zero points packed along N, low bits first; the
//                                             "gptq" (v1) checkpoint_format stores z − 1
//          `stem`.scales  F16 [G, N]
//          `stem`.g_idx   I32 [K] (optional)  the group of each input channel (desc_act)
//   AWQ    `stem`.qweight I32 [K, N/8]        GEMM packing: nibble i of a word holds output column
//          `stem`.qzeros  I32 [G, N/8]        8·w + {0, 2, 4, 6, 1, 3, 5, 7}[i] (AutoAWQ's order)
//          `stem`.scales  F16 [G, N]
//   compressed-tensors (format "pack-quantized", weight-only int4 / int8)
//          `stem`.weight_packed     I32 [N, K·bits/32]  signed q + 2^(bits−1), packed along K
//          `stem`.weight_scale      float [N, G]
//          `stem`.weight_zero_point I32 [ceil(N·bits/32), G] packed along N (asymmetric only)
//          `stem`.weight_shape      I64 [2] = [N, K]
//          `stem`.weight_g_idx      I32 [K] (optional, activation ordering)
//
// Activation order (GPTQ desc_act, compressed-tensors actorder): groups are sets of input channels
// named by g_idx rather than runs of K. The matrix is re-laid with its K permuted once at load so
// that every group is a contiguous run again (RelaidMatrix::k_order); the model then multiplies it
// with the activation gathered in that order (see models/llama.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/checkpoint/safetensors.h"

namespace fineserve::ckpt {

enum class HfQuantMethod { Gptq, Awq, CompressedTensors };

// config.json's "quantization_config", checked.
struct HfQuantConfig {
  HfQuantMethod method = HfQuantMethod::Gptq;
  int bits = 4;               // 4 or 8 (AWQ: 4)
  int64_t group_size = 128;   // > 0, or -1: one group spanning K
  bool symmetric = true;      // the config's claim; a matrix gets offsets when its zero points say so
  bool desc_act = false;      // GPTQ desc_act / compressed-tensors actorder
  bool zeros_minus_one = false;  // GPTQ checkpoint_format "gptq" (v1): qzeros hold z − 1

  // "gptq", "awq" or "compressed-tensors" (the quant_method, and the source format /info names).
  std::string method_name() const;
  // For messages: "GPTQ 4-bit group_size 128 asymmetric desc_act".
  std::string describe() const;
};

// The Hugging Face quantization that config.json declares: nullopt when there is no
// "quantization_config" or it is FineServe's own ("finequant"). fineserve::Error naming `source`,
// the field and its value for anything not supported (an unknown quant_method, bits other than
// 4 / 8, a group_size that is neither positive nor -1, AWQ versions other than "gemm", a
// compressed-tensors format other than pack-quantized, quantized activations, ...).
std::optional<HfQuantConfig> parse_hf_quant_config(const nlohmann::json& config, const std::string& source);
// parse_hf_quant_config of the config.json beside the checkpoint's files (nullopt without one).
std::optional<HfQuantConfig> read_hf_quant_config(const Checkpoint& checkpoint);

// Whether the checkpoint holds the linear weight `stem` quantized in this format (else it is dense,
// e.g. an lm_head a quantizer left alone).
bool has_hf_quantized(const Checkpoint& checkpoint, const HfQuantConfig& q, const std::string& stem);

// One matrix [rows, cols] re-laid into FineServe's quantized form (kernels/ops.h WeightMatrix).
struct RelaidMatrix {
  int bits = 0;
  int64_t group = 0;              // cols when the source has one group over K
  std::vector<uint8_t> codes;     // int8 codes [rows, cols], or int4 [rows, cols / 2] (code + 8 per nibble)
  std::vector<uint16_t> scales;   // fp16 [rows, cols / group]
  std::vector<float> offsets;     // fp32 [rows, cols / group]; empty when every offset is zero
  // Empty, or (activation order) the input channel each column of the re-laid matrix reads:
  // column j multiplies x[k_order[j]].
  std::vector<int32_t> k_order;
};

// Re-lays `stem` ([rows, cols] as config.json implies). fineserve::Error naming the checkpoint and
// the tensor for a missing tensor, a wrong dtype or shape, a scale outside fp16's range, or a g_idx
// that does not make `group` channels per group.
RelaidMatrix relay_hf_matrix(const Checkpoint& checkpoint, const HfQuantConfig& q, const std::string& stem,
                             int64_t rows, int64_t cols);

}  // namespace fineserve::ckpt
