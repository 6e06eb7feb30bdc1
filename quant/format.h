// The FineQuant checkpoint format: the one module that names it, writes its metadata and reads it
// back. A FineQuant checkpoint is safetensors plus config.json; for every quantized linear weight
// `stem` it stores, in place of `stem`.weight,
//   `stem`.qweight  int8 codes [N, K] (8 bits) or packed int4 [N, K/2] (4 bits, two per byte, see
//                   kernels/ops.h WeightMatrix)
//   `stem`.scales   fp16 [N, K / group]: w = scale · code
//   `stem`.offsets  optional, fp32 [N, K / group]: an asymmetric matrix, w = scale · code + offset
//                   (a zero point z is offset = -scale · z; format version 2)
// and the checkpoint-wide metadata below, twice: in every safetensors header (strings, what the
// loaders read) and in config.json's "quantization_config" (JSON, what people and HF tools read).
//
// Extending the format (zero points, matrices re-laid from other quantized formats) means a new
// optional tensor name next to codes_name/scales_name, a new field in MatrixFormat, and a new
// optional metadata entry read and written here; every reader and writer goes through this file.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "kernels/dtype.h"
#include "models/checkpoint/safetensors.h"

namespace fineserve::quant {

// The value of the metadata entry "format" in a FineQuant checkpoint.
inline constexpr const char* kFormatName = "fineserve-finequant";
// Bumped when the quantizer changes what it writes for the same input and options.
// 1: absmax scales, codes -qmax..qmax. 2: full code range (int4 -8..7, int8 -128..127), signed
// scales, the per-group scale search (metadata "scale_rule"), mixed bits from --target-bits.
inline constexpr int kQuantizerVersion = 2;
// The version of the format itself (metadata "format_version"; absent means 1), bumped when a
// checkpoint may hold something an older reader would silently misread.
// 1: symmetric codes and scales. 2: optional per-group offsets (`stem`.offsets) and per-matrix
// source formats ("source_formats"). Readers accept every version up to this one and refuse newer.
inline constexpr int kFormatVersion = 2;

// The source format of a matrix FineQuant's own quantizer wrote. Others: "gguf:Q4_0", "gguf:Q8_0",
// "gguf:Q4_1" (re-laid exactly), "gguf:Q6_K/requantized" (dequantized and quantized again), "gptq",
// "awq", "compressed-tensors".
inline constexpr const char* kFineQuantSource = "finequant";

// How one quantized matrix [rows, cols] is stored.
struct MatrixFormat {
  int bits = 0;        // 8 or 4
  int64_t group = 0;   // weights per scale along K (cols): an allowed group size (quantizer.h)
  bool asymmetric = false;  // a `stem`.offsets tensor: w = scale · code + offset

  // int8 codes are I8; int4 codes are packed two per byte as U8.
  DType code_dtype() const { return bits == 4 ? DType::U8 : DType::I8; }
  // Bytes of one row of codes.
  int64_t code_row_bytes(int64_t cols) const { return bits == 4 ? cols / 2 : cols; }
  int64_t groups_per_row(int64_t cols) const { return cols / group; }
};

// The tensor names of the quantized matrix `stem` ("model.layers.0.mlp.up_proj").
inline std::string codes_name(const std::string& stem) { return stem + ".qweight"; }
inline std::string scales_name(const std::string& stem) { return stem + ".scales"; }
inline std::string offsets_name(const std::string& stem) { return stem + ".offsets"; }
// The dtype of `stem`.offsets: fp32, so that both forms an asymmetric source uses stay exact: an
// fp16 minimum m (GGUF Q4_1: d·q + m) and scale times an integer zero point (GPTQ, AWQ: s·(q − z),
// at most 11 + 8 significant bits).
inline constexpr DType kOffsetDType = DType::F32;

// True for bit widths a FineQuant matrix may have.
inline bool is_valid_bits(int bits) { return bits == 8 || bits == 4; }

// The checkpoint-wide metadata of a FineQuant checkpoint.
struct FormatMetadata {
  int bits = 0;             // the bits of every quantized matrix not listed in matrix_bits
  int expert_bits = 0;      // > 0: the bits of MoE expert matrices (`quantize --expert-bits`)
  // How groups were chosen: "adaptive", "alpha", "fixed", "max-rel-error" or "target-bits".
  std::string group_mode;
  std::string scale_rule;   // how each group's scale was chosen (quant/quantizer.h); "" when unknown
  double target_bits = 0;   // > 0: `quantize --target-bits` (written to the safetensors header only)
  double alpha = 0;         // the adaptive rule's alpha (written to the safetensors header only)
  std::string source_fingerprint;
  std::map<std::string, int64_t> groups;   // stem -> group, every quantized matrix
  std::map<std::string, int> matrix_bits;  // stem -> bits; written only when some differ from `bits`
  // stem -> where the matrix came from (see kFineQuantSource); matrices not listed are "finequant".
  std::map<std::string, std::string> source_formats;
  // Extra safetensors-header entries written as they are (e.g. "fineserve.synthetic").
  std::map<std::string, std::string> extra;

  // The bits of the quantized matrix `stem` (full name).
  int bits_of(const std::string& stem) const {
    const auto it = matrix_bits.find(stem);
    return it == matrix_bits.end() ? bits : it->second;
  }
  // The source format of the quantized matrix `stem` (full name): "finequant" unless listed.
  std::string source_format_of(const std::string& stem) const {
    const auto it = source_formats.find(stem);
    return it == source_formats.end() ? kFineQuantSource : it->second;
  }
  // The distinct source formats of all matrices in `groups` (and source_formats), most matrices
  // first, joined by ","; e.g. "gguf:Q4_1,gguf:Q8_0" or "finequant": what /info reports.
  std::string source_format_summary() const;
  // Whether some matrix's bits differ from `bits` (then matrix_bits and expert_bits are written).
  bool mixed_bits() const;
  // "finequant-int8", "finequant-int4", or with mixed bits "finequant-int8,experts-int4": how
  // ModelInfo::quantization, /info and the metrics name it.
  std::string quantization_name() const;
};

// The safetensors-header metadata of a FineQuant checkpoint (all values strings).
ckpt::Metadata to_header_metadata(const FormatMetadata& m);
// config.json's "quantization_config" entry.
nlohmann::json to_quantization_config(const FormatMetadata& m);

// Whether a safetensors header says "this is a FineQuant checkpoint".
bool is_finequant(const ckpt::Metadata& header);
// Reads a checkpoint's FineQuant metadata from its safetensors header: nullopt for a dense
// checkpoint (no FineQuant "format"); fineserve::Error naming `where` when an entry is invalid
// (bits not 8 or 4, matrix_bits or groups not a JSON object of integers, source_formats not a JSON
// object of strings, a format_version newer than kFormatVersion).
std::optional<FormatMetadata> read_header_metadata(const ckpt::Metadata& header, const std::string& where);

}  // namespace fineserve::quant
