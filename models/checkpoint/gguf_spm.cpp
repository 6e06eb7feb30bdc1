// GGUF SentencePiece vocabulary -> tokenizer.model (see gguf_spm.h).
#include "models/checkpoint/gguf_spm.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <unordered_map>

#include "kernels/base.h"

namespace fineserve::ckpt {
namespace {

// ---- protobuf wire format (https://protobuf.dev/programming-guides/encoding/) --------------------
//
// Debian's libsentencepiece-dev ships no sentencepiece_model.pb.h, so the ModelProto is written by
// hand. Field numbers from sentencepiece_model.proto:
//   ModelProto      pieces = 1 (repeated SentencePiece), trainer_spec = 2, normalizer_spec = 3
//   SentencePiece   piece = 1 (string), score = 2 (float), type = 3 (enum; NORMAL = 1 is the default)
//   TrainerSpec     model_type = 3 (BPE = 2), vocab_size = 4, byte_fallback = 35, unk_id = 40,
//                   bos_id = 41, eos_id = 42, pad_id = 43, unk_piece = 45, bos_piece = 46,
//                   eos_piece = 47, pad_piece = 48
//   NormalizerSpec  name = 1, add_dummy_prefix = 3, remove_extra_whitespaces = 4,
//                   escape_whitespaces = 5

class WireWriter {
 public:
  void varint(uint32_t field, uint64_t value) {
    key(field, 0);
    raw_varint(value);
  }
  // int32 fields: a negative value is sign-extended to 64 bits, as protobuf encodes it.
  void int32(uint32_t field, int64_t value) { varint(field, static_cast<uint64_t>(value)); }
  void boolean(uint32_t field, bool value) { varint(field, value ? 1 : 0); }
  void fixed32(uint32_t field, float value) {
    key(field, 5);
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    for (int i = 0; i < 4; ++i) out_ += static_cast<char>((bits >> (8 * i)) & 0xFF);  // little-endian
  }
  void bytes(uint32_t field, std::string_view value) {
    key(field, 2);
    raw_varint(value.size());
    out_ += value;
  }
  const std::string& str() const { return out_; }

 private:
  void key(uint32_t field, uint32_t wire_type) { raw_varint((uint64_t{field} << 3) | wire_type); }
  void raw_varint(uint64_t v) {
    while (v >= 0x80) {
      out_ += static_cast<char>((v & 0x7F) | 0x80);
      v >>= 7;
    }
    out_ += static_cast<char>(v);
  }
  std::string out_;
};

// SentencePiece keeps two piece tables, and a text may appear once in each: NORMAL, USER_DEFINED and
// UNUSED pieces in one, UNKNOWN, CONTROL and BYTE pieces in the other.
bool in_normal_table(int64_t type) { return type == kNormal || type == kUserDefined || type == kUnused; }

// "<0xNN>", exactly as SentencePiece spells byte pieces (two upper-case hex digits).
int byte_of_piece(const std::string& piece) {
  static const std::unordered_map<std::string, int> bytes = [] {
    std::unordered_map<std::string, int> m;
    char buf[8];
    for (int b = 0; b < 256; ++b) {
      std::snprintf(buf, sizeof buf, "<0x%02X>", b);
      m.emplace(buf, b);
    }
    return m;
  }();
  const auto it = bytes.find(piece);
  return it == bytes.end() ? -1 : it->second;
}

std::string quoted(const std::string& piece) { return "'" + piece.substr(0, 64) + "'"; }

}  // namespace

int64_t gguf_spm_unknown_id(const GgufSpmVocab& v, const std::string& label) {
  const auto n = static_cast<int64_t>(v.tokens.size());
  int64_t typed = -1;
  for (int64_t i = 0; i < static_cast<int64_t>(v.types.size()); ++i) {
    if (v.types[static_cast<size_t>(i)] != kUnknown) continue;
    if (typed >= 0 && v.unk_id < 0)
      throw Error(label + ": tokenizer.ggml.token_type marks two tokens UNKNOWN (" + std::to_string(typed) + " and " +
                  std::to_string(i) + "), and SentencePiece allows one");
    if (typed < 0) typed = i;
  }
  if (v.unk_id >= n)
    throw Error(label + ": metadata key tokenizer.ggml.unknown_token_id = " + std::to_string(v.unk_id) + " is past the " +
                std::to_string(n) + " tokens");
  if (v.unk_id >= 0) return v.unk_id;
  if (typed < 0)
    throw Error(label + ": the SentencePiece vocabulary has no unknown token (no tokenizer.ggml.unknown_token_id, "
                "and no token of type UNKNOWN in tokenizer.ggml.token_type)");
  return typed;
}

std::string gguf_spm_model_proto(const GgufSpmVocab& v, const std::string& label) {
  const size_t n = v.tokens.size();
  if (n == 0) throw Error(label + ": metadata key tokenizer.ggml.tokens is empty");
  if (v.scores.size() != n)
    throw Error(label + ": tokenizer.ggml.scores has " + std::to_string(v.scores.size()) + " entries for " +
                std::to_string(n) + " tokens");
  if (v.types.size() != n)
    throw Error(label + ": tokenizer.ggml.token_type has " + std::to_string(v.types.size()) + " entries for " +
                std::to_string(n) + " tokens");
  auto check_id = [&](int64_t id, const char* key) {
    if (id >= static_cast<int64_t>(n))
      throw Error(label + ": metadata key " + key + " = " + std::to_string(id) + " is past the " + std::to_string(n) +
                  " tokens");
  };
  check_id(v.bos_id, "tokenizer.ggml.bos_token_id");
  check_id(v.eos_id, "tokenizer.ggml.eos_token_id");
  check_id(v.pad_id, "tokenizer.ggml.padding_token_id");
  const int64_t unk = gguf_spm_unknown_id(v, label);

  // The pieces, checked as SentencePiece checks them on load, so that the error names the GGUF key.
  std::vector<int64_t> types = v.types;
  for (size_t i = 0; i < n; ++i) {
    // The unknown piece is UNKNOWN whatever its type says: llama.cpp's converter makes <unk> CONTROL
    // when tokenizer_config.json lists it as a special added token; any other UNKNOWN-typed piece
    // becomes CONTROL (SentencePiece has one unknown piece).
    if (static_cast<int64_t>(i) == unk) {
      types[i] = kUnknown;
    } else if (types[i] == kUnknown) {
      types[i] = kControl;
    }
  }
  std::unordered_map<std::string, size_t> normal_table, special_table;
  std::vector<bool> has_byte(256, false);
  size_t byte_pieces = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::string& piece = v.tokens[i];
    const std::string at = "token " + std::to_string(i);
    if (v.types[i] < kNormal || v.types[i] > kByte)
      throw Error(label + ": tokenizer.ggml.token_type of " + at + " (" + quoted(piece) + ") is " +
                  std::to_string(v.types[i]) + ", not a token type (1 normal .. 6 byte)");
    if (piece.empty()) throw Error(label + ": tokenizer.ggml.tokens: " + at + " is empty");
    if (std::isnan(v.scores[i]))
      throw Error(label + ": tokenizer.ggml.scores: the score of " + at + " (" + quoted(piece) + ") is not a number");
    auto& table = in_normal_table(types[i]) ? normal_table : special_table;
    if (const auto [it, fresh] = table.emplace(piece, i); !fresh)
      throw Error(label + ": tokenizer.ggml.tokens holds " + quoted(piece) + " twice (tokens " +
                  std::to_string(it->second) + " and " + std::to_string(i) + "), which SentencePiece does not allow");
    if (types[i] == kByte) {
      const int b = byte_of_piece(piece);
      if (b < 0)
        throw Error(label + ": tokenizer.ggml.token_type marks " + at + " (" + quoted(piece) +
                    ") as a byte, but byte tokens are spelled <0xNN>");
      has_byte[static_cast<size_t>(b)] = true;
      ++byte_pieces;
    }
  }
  // Byte fallback needs a piece for every byte; a vocabulary without byte pieces has none.
  if (byte_pieces > 0) {
    for (int b = 0; b < 256; ++b) {
      if (has_byte[static_cast<size_t>(b)]) continue;
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      throw Error(label + ": the SentencePiece vocabulary has byte tokens but no " + name +
                  " (byte fallback needs all 256)");
    }
  }

  WireWriter model;
  for (size_t i = 0; i < n; ++i) {
    WireWriter p;
    p.bytes(1, v.tokens[i]);
    p.fixed32(2, v.scores[i]);
    if (types[i] != kNormal) p.varint(3, static_cast<uint64_t>(types[i]));
    model.bytes(1, p.str());
  }
  WireWriter trainer;
  trainer.varint(3, 2);  // BPE: what llama.cpp's SPM tokenizer does with the scores
  trainer.int32(4, static_cast<int64_t>(n));
  trainer.boolean(35, byte_pieces > 0);
  // The special ids as the trainer would have recorded them (-1: none); SentencePiece's defaults
  // otherwise say bos 1 and eos 2.
  trainer.int32(40, unk);
  trainer.int32(41, v.bos_id);
  trainer.int32(42, v.eos_id);
  trainer.int32(43, v.pad_id);
  auto piece_of = [&](int64_t id) { return v.tokens[static_cast<size_t>(id)]; };
  trainer.bytes(45, piece_of(unk));
  if (v.bos_id >= 0) trainer.bytes(46, piece_of(v.bos_id));
  if (v.eos_id >= 0) trainer.bytes(47, piece_of(v.eos_id));
  if (v.pad_id >= 0) trainer.bytes(48, piece_of(v.pad_id));
  model.bytes(2, trainer.str());
  // Llama's normalizer: no character map, spaces kept as they are (escaped to '▁'), and a '▁' before
  // the text when add_space_prefix says so.
  WireWriter normalizer;
  normalizer.bytes(1, "identity");
  normalizer.boolean(3, v.add_space_prefix);
  normalizer.boolean(4, false);
  normalizer.boolean(5, true);
  model.bytes(3, normalizer.str());
  return model.str();
}

}  // namespace fineserve::ckpt
