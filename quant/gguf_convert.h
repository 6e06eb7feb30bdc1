// GGUF -> FineQuant checkpoint without the round trip: what `fineserve import-gguf` does by default
// and what `fineserve serve --model FILE.gguf` runs first.
//
// llama.cpp's legacy block types are FineQuant matrices with group 32 already, so their blocks are
// re-laid, not dequantized (ggml's formulas, gguf.cpp; codes here as quantizer.h stores them):
//   Q4_0  d (fp16), 16 bytes: x = d · (q − 8), q = 0..15 with element j in the low nibble of byte j
//         and element j + 16 in its high nibble   -> int4 code q − 8, scale d (symmetric)
//   Q8_0  d (fp16), 32 int8 q: x = d · q         -> int8 code q, scale d (symmetric)
//   Q4_1  d, m (fp16), 16 bytes: x = d · q + m   -> int4 code q − 8, scale d, offset m + 8 d (fp32,
//         exact for real files: both are fp16, so the sum needs far fewer than 24 bits)
// Every other quantized type of a matrix (Q5_0, Q5_1, the K-quants) has no exact FineQuant layout:
// it is dequantized and quantized again to int8 with group 32 (never fewer bits than its source),
// with a warning naming the tensor. F32 / F16 / BF16 tensors are kept as they are (dense), and so
// are the norms. The checkpoint records each matrix's source format ("gguf:Q4_1",
// "gguf:Q6_K/requantized", "gguf:F16"; quant/format.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "models/checkpoint/gguf_import.h"
#include "quant/quantizer.h"

namespace fineserve::quant {

struct GgufConvertOptions {
  std::filesystem::path gguf;  // the source .gguf file
  std::filesystem::path out;   // the checkpoint directory to create (appears only when complete)
  uint64_t max_shard_bytes = 4ull << 30;
  bool overwrite = false;
};

struct GgufConvertReport {
  ckpt::GgufImportReport import;             // architecture, name, source types, bytes, seconds
  size_t exact = 0;                          // matrices re-laid exactly (Q4_0, Q8_0, Q4_1)
  size_t requantized = 0;                    // matrices dequantized and quantized again
  size_t dense = 0;                          // tensors kept dense (F32 / F16 / BF16 matrices, norms)
  std::vector<std::string> requantized_tensors;  // their GGUF names
};

// Throws fineserve::Error as ckpt::import_gguf does (malformed file, unsupported architecture,
// tokenizer or tensor type, wrong shapes).
GgufConvertReport convert_gguf(const GgufConvertOptions& options,
                               const std::function<void(size_t done, size_t total, const std::string& tensor)>& progress = {});

// The FineQuant form of a [rows, cols] GGUF tensor stored as Q4_0, Q8_0 or Q4_1 (`data` holds
// exactly its bytes; GGUF row r becomes row r), group 32; nullopt for any other type.
std::optional<QuantizedMatrix> relay_gguf_blocks(uint32_t type, std::span<const std::byte> data, int64_t rows,
                                                 int64_t cols);

// The directory `fineserve serve --model FILE.gguf` serves: FILE.gguf converted (convert_gguf)
// into `FILE.fineserve/` next to it, or, where that directory cannot be written, into
// `<temp dir>/fineserve-gguf/<name>-<hash of the path>/`. A conversion already there is reused
// while its stamp (gguf_source.json: the file's size and modification time, the format version)
// matches the file. Any other path is returned unchanged.
std::filesystem::path model_dir_for(const std::filesystem::path& model);

}  // namespace fineserve::quant
