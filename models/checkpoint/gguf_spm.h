// A GGUF's SentencePiece vocabulary (tokenizer.ggml.model "llama": Llama, Llama 2, Mistral, Mixtral,
// TinyLlama, ...) turned back into the `tokenizer.model` it was converted from.
//
// llama.cpp's converter (convert_hf_to_gguf.py, _create_vocab_sentencepiece) stores every piece of
// the model's tokenizer.model by id: its text (tokenizer.ggml.tokens), its score
// (tokenizer.ggml.scores) and its type (tokenizer.ggml.token_type, llama.cpp's llama_token_type,
// numbered as SentencePiece's own piece types: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
// UNUSED 5, BYTE 6). Added tokens of tokenizer_config.json come after them (or replace them) as
// CONTROL ("special") or USER_DEFINED pieces, and a vocabulary shorter than the model's embedding is
// padded with UNUSED "[PADn]" pieces.
//
// A SentencePiece BPE model with those pieces encodes as the original did: BPE over pieces merges
// the adjacent pair whose joined text is the highest-scoring piece, and falls back to <0xNN> byte
// pieces for what no piece covers. That is also what llama.cpp's SPM tokenizer does with the
// scores. So the import writes a ModelProto (BPE, byte fallback, Llama's identity normalizer with
// the dummy prefix of tokenizer.ggml.add_space_prefix) and the tokenizer reads it as it reads any
// Llama checkpoint's tokenizer.model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fineserve::ckpt {

// Piece types of tokenizer.ggml.token_type: llama.cpp's llama_token_type, which has the numbers of
// sentencepiece_model.proto's SentencePiece.Type.
enum GgufTokenType : int64_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

struct GgufSpmVocab {
  std::vector<std::string> tokens;  // by id
  std::vector<float> scores;        // by id
  std::vector<int64_t> types;       // by id (GgufTokenType)
  int64_t unk_id = -1;              // tokenizer.ggml.unknown_token_id; -1: the one UNKNOWN piece
  int64_t bos_id = -1, eos_id = -1, pad_id = -1;  // -1: none
  bool add_space_prefix = true;     // tokenizer.ggml.add_space_prefix (llama.cpp's default for SPM)
};

// The id of the unknown piece: unk_id when given, otherwise the one piece of type UNKNOWN.
// Throws fineserve::Error starting with `label` when there is none, or two UNKNOWN pieces.
int64_t gguf_spm_unknown_id(const GgufSpmVocab& vocab, const std::string& label);

// The serialized sentencepiece ModelProto (a tokenizer.model) of the vocabulary. Throws
// fineserve::Error starting with `label` and naming the tokenizer.ggml key at fault where
// SentencePiece would refuse the model: lists of different lengths, a type outside 1..6, an empty
// piece, the same piece twice, a BYTE piece that is not "<0xNN>" or a byte without its piece, a
// missing or repeated unknown piece, a score that is not a number, an id past the vocabulary.
std::string gguf_spm_model_proto(const GgufSpmVocab& vocab, const std::string& label);

}  // namespace fineserve::ckpt
