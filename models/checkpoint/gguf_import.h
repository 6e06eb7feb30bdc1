// GGUF -> Hugging Face checkpoint: what `fineserve import-gguf` does.
//
// Reads a llama.cpp GGUF file of a Llama-family model (general.architecture "llama") with an
// embedded byte-level BPE tokenizer (SmolLM, Llama 3.0, ...) or SentencePiece tokenizer (Llama 2,
// Mistral, Mixtral, TinyLlama, ...) and writes, into a directory that appears only when complete:
//   config.json              LlamaForCausalLM, from the llama.* metadata keys
//   model.safetensors        every tensor dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
//                            Q5_1, Q4_K, Q5_K, Q6_K) and stored in `dtype` under its HF name;
//                            attn_q / attn_k rows are put back in HF's order (llama.cpp's
//                            converter interleaves the two rotary halves of each head)
//   tokenizer.json           the embedded byte-level BPE tokenizer (tokenizer.ggml.model "gpt2"), or
//   tokenizer.model          the embedded SentencePiece model (tokenizer.ggml.model "llama"; gguf_spm.h)
//   tokenizer_config.json    bos / eos / unk / pad tokens, add_bos_token, chat_template (and for
//                            SentencePiece: LlamaTokenizer, add_prefix_space, the added tokens)
//   generation_config.json   bos / eos ids
// The result is a dense checkpoint that `fineserve quantize` takes like any HF checkpoint.
//
// The exact import (GGUF's Q4_0 / Q8_0 / Q4_1 blocks re-laid as FineQuant codes, no dequantization)
// is quant/gguf_convert.h: it writes a FineQuant checkpoint, so it lives above quant/'s format
// module; it reads the GGUF through plan_gguf_import() below.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/dtype.h"
#include "models/checkpoint/gguf.h"

namespace fineserve::ckpt {

struct GgufImportOptions {
  std::filesystem::path gguf;  // the source .gguf file
  std::filesystem::path out;   // the checkpoint directory to create
  DType dtype = DType::F16;    // of the written tensors: F16, BF16 or F32
  uint64_t max_shard_bytes = 4ull << 30;
  bool overwrite = false;
};

struct GgufImportReport {
  std::string architecture;
  std::string model_name;                   // general.name, when given
  std::map<std::string, int> source_types;  // ggml type name -> tensors of that type
  size_t tensors = 0;
  uint64_t bytes_in = 0, bytes_out = 0;     // tensor data read and written
  double seconds = 0;
};

// Throws fineserve::Error naming the file and the key or tensor at fault: an unreadable or malformed
// GGUF, an architecture or tokenizer other than the ones above, a tensor type it cannot dequantize,
// a missing, unexpected or mis-shaped tensor, a weight that overflows `dtype`.
GgufImportReport import_gguf(const GgufImportOptions& options,
                             const std::function<void(size_t done, size_t total, const std::string& tensor)>& progress = {});

// The parts of import_gguf, for tests and `inspect`:
// config.json for the GGUF's metadata and tensors (throws as import_gguf does).
nlohmann::json gguf_llama_config(const gguf::File& file);
// The files of its embedded tokenizer: tokenizer.json (byte-level BPE) or tokenizer.model
// (SentencePiece), and tokenizer_config.json.
struct GgufTokenizerFiles {
  nlohmann::json tokenizer;         // tokenizer.json; null for a SentencePiece vocabulary
  std::string sentencepiece_model;  // tokenizer.model (serialized ModelProto); empty for byte-level BPE
  nlohmann::json tokenizer_config;
};
GgufTokenizerFiles gguf_tokenizer_files(const gguf::File& file);

// One GGUF tensor's place in the HF checkpoint.
struct GgufTensorPlan {
  const gguf::TensorInfo* src = nullptr;
  std::string name;            // HF name ("model.layers.0.self_attn.q_proj.weight")
  std::vector<int64_t> shape;  // HF shape
  bool rotary = false;         // q or k: llama.cpp's rotary row permutation is undone
};

// A GGUF file opened and checked for import: config.json, tokenizer files, and every tensor's HF
// name and shape (all present, none unexpected). Throws as import_gguf does.
struct GgufImportPlan {
  std::unique_ptr<gguf::File> file;
  nlohmann::json config;  // config.json (torch_dtype float16)
  GgufTokenizerFiles tokenizer;
  std::vector<GgufTensorPlan> tensors;  // in file order
  std::map<std::string, int> source_types;  // ggml type name -> tensors of that type
  std::string architecture, model_name;
  int64_t head_dim = 0;

  // The HF row of GGUF row `r` of a matrix (rotary rows permuted back), and of element `j` of a
  // vector (a q / k bias); identity for everything else.
  int64_t hf_row(const GgufTensorPlan& t, int64_t r) const;
  int64_t hf_element(const GgufTensorPlan& t, int64_t j) const;
};
GgufImportPlan plan_gguf_import(const std::filesystem::path& gguf);
// Writes config.json (as given), generation_config.json and the tokenizer files of `plan` into dir.
void write_gguf_side_files(const GgufImportPlan& plan, const nlohmann::json& config, const std::filesystem::path& dir);

// The HF name of a GGUF tensor of a Llama-family model ("blk.3.attn_q.weight" ->
// "model.layers.3.self_attn.q_proj.weight"); empty for names with no HF counterpart.
std::string gguf_to_hf_name(const std::string& gguf_name);

}  // namespace fineserve::ckpt
