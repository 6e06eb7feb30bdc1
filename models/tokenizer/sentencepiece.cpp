#include "models/tokenizer/sentencepiece.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <system_error>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/tokenizer/hf_config.h"
#include "models/tokenizer/utf8.h"

namespace fineserve {
namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // U+2581 "▁", SentencePiece's space

// ---- the few ModelProto fields FineServe reads or overrides ------------------------------------
//
// Debian's libsentencepiece-dev ships no sentencepiece_model.pb.h, so the model's protobuf is read
// and amended at the wire level (https://protobuf.dev/programming-guides/encoding/). Field numbers
// from sentencepiece_model.proto: ModelProto.trainer_spec = 2, .normalizer_spec = 3;
// TrainerSpec.model_type = 3 (UNIGRAM = 1, the default; BPE = 2); NormalizerSpec
// .precompiled_charsmap = 2, .add_dummy_prefix = 3, .remove_extra_whitespaces = 4,
// .escape_whitespaces = 5.

class WireReader {
 public:
  explicit WireReader(std::string_view data) : data_(data) {}
  bool done() const { return pos_ >= data_.size(); }

  bool varint(uint64_t& value) {
    value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= data_.size()) return false;
      const auto b = static_cast<uint8_t>(data_[pos_++]);
      value |= uint64_t(b & 0x7F) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }
  bool key(uint64_t& field, uint32_t& wire_type) {
    uint64_t k = 0;
    if (!varint(k)) return false;
    field = k >> 3;
    wire_type = static_cast<uint32_t>(k & 7);
    return true;
  }
  bool bytes(std::string_view& value) {
    uint64_t n = 0;
    if (!varint(n) || n > data_.size() - pos_) return false;
    value = data_.substr(pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return true;
  }
  bool skip(uint32_t wire_type) {
    uint64_t ignored = 0;
    std::string_view ignored_bytes;
    switch (wire_type) {
      case 0: return varint(ignored);
      case 1: return advance(8);
      case 2: return bytes(ignored_bytes);
      case 5: return advance(4);
      default: return false;  // groups (3, 4) are not used by sentencepiece_model.proto
    }
  }

 private:
  bool advance(size_t n) {
    if (n > data_.size() - pos_) return false;
    pos_ += n;
    return true;
  }
  std::string_view data_;
  size_t pos_ = 0;
};

// What FineServe reads of a serialized ModelProto: the trainer's model type and each piece's type
// (ModelProto.pieces = 1, repeated, in id order; SentencePiece.type = 3: NORMAL = 1, the default,
// UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6).
struct ModelInfo {
  uint64_t model_type = 1;
  std::vector<uint64_t> piece_types;
};
constexpr uint64_t kControl = 3, kUserDefined = 4;

// Reads a message's fields, calling on_field(field, wire_type, reader, ok) for each: it consumes
// the value and returns true (clearing `ok` when the value is malformed), or returns false to have
// the value skipped. False when the bytes do not parse.
template <class OnField>
bool for_each_field(std::string_view message, OnField&& on_field) {
  WireReader r(message);
  while (!r.done()) {
    uint64_t field = 0;
    uint32_t wire = 0;
    if (!r.key(field, wire)) return false;
    bool ok = true;
    if (!on_field(field, wire, r, ok)) ok = r.skip(wire);
    if (!ok) return false;
  }
  return true;
}

// Later occurrences of a scalar win, and repeated messages merge, as protobuf parses them.
std::optional<ModelInfo> read_model_info(std::string_view model) {
  ModelInfo info;
  const bool ok = for_each_field(model, [&](uint64_t field, uint32_t wire, WireReader& r, bool& good) {
    if (wire != 2 || (field != 1 && field != 2)) return false;
    std::string_view sub;
    if (!r.bytes(sub)) {
      good = false;
      return true;
    }
    if (field == 1) {
      uint64_t type = 1;
      good = for_each_field(sub, [&](uint64_t f, uint32_t w, WireReader& rr, bool& g) {
        if (f != 3 || w != 0) return false;
        g = rr.varint(type);
        return true;
      });
      info.piece_types.push_back(type);
    } else {
      good = for_each_field(sub, [&](uint64_t f, uint32_t w, WireReader& rr, bool& g) {
        if (f != 3 || w != 0) return false;
        g = rr.varint(info.model_type);
        return true;
      });
    }
    return true;
  });
  if (!ok) return std::nullopt;
  return info;
}

// A NormalizerSpec appended to the model: protobuf merges a repeated embedded message field into
// the earlier one, and a later scalar wins, so this switches off the model's own normalization
// (HF's LlamaTokenizer has no normalizer) while SentencePiece still writes ' ' as '▁':
// precompiled_charsmap = "", add_dummy_prefix = false, remove_extra_whitespaces = false,
// escape_whitespaces = true.
constexpr std::string_view kIdentityNormalizer{"\x1A\x08\x12\x00\x18\x00\x20\x00\x28\x01", 10};

const char* model_type_name(uint64_t type) {
  switch (type) {
    case 1: return "Unigram";
    case 2: return "BPE";
    case 3: return "word";
    case 4: return "char";
    default: return "unknown";
  }
}

// What HF's decoder chain (Replace '▁' -> ' ', ByteFallback) makes of one token string: the byte
// 0xNN for "<0xNN>", otherwise the string with every '▁' a space.
std::string token_to_bytes(std::string_view token) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  if (token.size() == 6 && token.starts_with("<0x") && token.back() == '>' && hex(token[3]) >= 0 &&
      hex(token[4]) >= 0) {
    return std::string(1, static_cast<char>(hex(token[3]) * 16 + hex(token[4])));
  }
  std::string out;
  out.reserve(token.size());
  for (size_t pos = 0; pos < token.size();) {
    if (token.substr(pos).starts_with(kSpaceSymbol)) {
      out += ' ';
      pos += kSpaceSymbol.size();
    } else {
      out += token[pos++];
    }
  }
  return out;
}

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer(SentencePieceSpec spec)
    : processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()),
      add_bos_(spec.add_bos),
      add_eos_(spec.add_eos),
      prefix_(spec.prefix),
      strip_leading_space_(spec.strip_leading_space) {
  const std::string& where = spec.source;
  // Check the type first: Unigram models load fine into SentencePiece but are not what HF's
  // LlamaTokenizer (a BPE) makes of them.
  const std::optional<ModelInfo> info = read_model_info(spec.model_bytes);
  if (!info) throw Error(where + ": not a SentencePiece model (the protobuf does not parse)");
  if (info->model_type != 2) {
    throw Error(where + ": SentencePiece " + model_type_name(info->model_type) +
                " model is not supported (FineServe reads BPE models, as Llama's)");
  }
  spec.model_bytes += kIdentityNormalizer;
  const auto status = processor_->LoadFromSerializedProto(spec.model_bytes);
  if (!status.ok()) throw Error(where + ": not a valid SentencePiece model: " + status.ToString());

  const int n = processor_->GetPieceSize();
  if (n <= 0) throw Error(where + ": the SentencePiece model has no pieces");
  if (static_cast<size_t>(n) != info->piece_types.size()) {  // protobuf corner cases we do not read alike
    throw Error(where + ": unexpected layout of the SentencePiece model's pieces");
  }
  token_strings_.resize(static_cast<size_t>(n));
  kind_.assign(static_cast<size_t>(n), kNormal);
  byte_ids_.fill(-1);
  unk_id_ = processor_->unk_id();
  std::vector<AddedToken> added;  // the model's own: control pieces special, user-defined plain
  vocab_.reserve(static_cast<size_t>(n));
  for (int id = 0; id < n; ++id) {
    std::string piece = processor_->IdToPiece(id);
    if (processor_->IsByte(id)) {
      const std::string b = token_to_bytes(piece);
      if (piece.size() == 6 && b.size() == 1) byte_ids_[static_cast<uint8_t>(b[0])] = id;
    }
    const uint64_t type = info->piece_types[static_cast<size_t>(id)];
    if (type == kControl) {
      added.push_back({piece, id, /*special=*/true, false, false, false, /*normalized=*/false});
    } else if (type == kUserDefined) {
      added.push_back({piece, id, /*special=*/false, false, false, false, /*normalized=*/false});
    }
    vocab_.emplace(piece, id);
    token_strings_[static_cast<size_t>(id)] = std::move(piece);
  }

  // Added tokens: a later entry with the same content replaces the flags of an earlier one (the
  // side files override the model); ids as HF's AddedVocabulary hands them out.
  std::unordered_map<std::string, size_t> index;
  int32_t next_id = n;
  auto add = [&](AddedToken t) {
    if (t.content.empty()) return;
    if (auto it = index.find(t.content); it != index.end()) {
      t.id = added[it->second].id;
      added[it->second] = std::move(t);
      return;
    }
    if (auto it = vocab_.find(t.content); it != vocab_.end()) {
      t.id = it->second;
    } else {
      t.id = next_id++;
    }
    index.emplace(t.content, added.size());
    added.push_back(std::move(t));
  };
  {
    std::vector<AddedToken> model_tokens = std::move(added);
    added.clear();
    for (AddedToken& t : model_tokens) add(std::move(t));
  }
  for (AddedToken& t : spec.added_tokens) add(std::move(t));

  const auto size = static_cast<size_t>(next_id);
  token_strings_.resize(size);
  kind_.resize(size, kNone);
  for (const AddedToken& t : added) {
    token_strings_[static_cast<size_t>(t.id)] = t.content;
    kind_[static_cast<size_t>(t.id)] = t.special ? kSpecial : kNormal;
  }
  token_bytes_.resize(size);
  for (size_t id = 0; id < size; ++id) {
    if (kind_[id] != kNone) token_bytes_[id] = token_to_bytes(token_strings_[id]);
  }
  added_ = AddedVocabulary(std::move(added));

  auto named = [&](const std::optional<std::string>& token, const char* what) -> std::optional<int32_t> {
    if (!token) return std::nullopt;
    if (auto id = token_to_id(*token)) return id;
    throw Error(where + ": " + what + " \"" + *token + "\" is not a token of the vocabulary");
  };
  bos_id_ = named(spec.bos_token, "bos_token");
  eos_id_ = named(spec.eos_token, "eos_token");
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::optional<int32_t> SentencePieceTokenizer::token_to_id(std::string_view token) const {
  if (auto id = added_.id_of(token)) return id;
  auto it = vocab_.find(std::string(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

std::optional<std::string> SentencePieceTokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_size() || kind_[static_cast<size_t>(id)] == kNone) return std::nullopt;
  return token_strings_[static_cast<size_t>(id)];
}

bool SentencePieceTokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && kind_[static_cast<size_t>(id)] == kSpecial;
}

void SentencePieceTokenizer::append_token_bytes(int32_t id, bool skip_special_tokens, bool at_start,
                                                std::string& out) const {
  if (id < 0 || id >= vocab_size()) return;
  const uint8_t kind = kind_[static_cast<size_t>(id)];
  if (kind == kNone || (kind == kSpecial && skip_special_tokens)) return;
  const std::string& bytes = token_bytes_[static_cast<size_t>(id)];
  // HF's Strip decoder removes one leading space of the whole text: the space that encode's '▁'
  // prefix stands for. Only the first decoded token can hold it.
  if (at_start && strip_leading_space_ && !bytes.empty() && bytes[0] == ' ') {
    out.append(bytes, 1);
  } else {
    out += bytes;
  }
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text, bool add_special_tokens,
                                                    std::span<const TextRange> literal) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 2);
  if (add_special_tokens && add_bos_ && bos_id_) ids.push_back(*bos_id_);
  if (added_.empty()) {
    encode_text(text, prefix_ != PrefixRule::kNever, ids);
  } else {
    std::vector<TextSegment> segments;
    added_.split(text, segments, literal);
    for (const TextSegment& seg : segments) {
      if (seg.token_id >= 0) {
        ids.push_back(seg.token_id);
        continue;
      }
      // Metaspace's "first" scheme: only the text that begins the input (offset 0) gets the '▁'.
      const bool prefix = prefix_ == PrefixRule::kAlways ||
                          (prefix_ == PrefixRule::kFirst && seg.text.data() == text.data());
      encode_text(seg.text, prefix, ids);
    }
  }
  if (add_special_tokens && add_eos_ && eos_id_) ids.push_back(*eos_id_);
  return ids;
}

void SentencePieceTokenizer::encode_text(std::string_view text, bool prefix, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::string prefixed;
  if (prefix && text.front() != ' ' && !text.starts_with(kSpaceSymbol)) {
    prefixed.reserve(kSpaceSymbol.size() + text.size());
    prefixed += kSpaceSymbol;
    prefixed += text;
    text = prefixed;
  }
  std::vector<int> ids;
  auto encode_valid = [&](std::string_view s) {
    if (s.empty()) return;
    const auto status = processor_->Encode(s, &ids);
    FS_ASSERT(status.ok(), "SentencePiece failed to encode valid UTF-8");
    out.insert(out.end(), ids.begin(), ids.end());
  };
  if (utf8::is_valid(text)) {
    encode_valid(text);
    return;
  }
  // SentencePiece reads ill-formed UTF-8 as U+FFFD. Keep the bytes instead: each ill-formed byte
  // becomes its <0xNN> piece (or <unk>), and the valid runs between them are encoded on their own.
  size_t run = 0;
  for (size_t pos = 0; pos < text.size();) {
    const utf8::Decoded d = utf8::decode(text, pos);
    if (d.code_point != utf8::kInvalid) {
      pos += d.length;
      continue;
    }
    encode_valid(text.substr(run, pos - run));
    const int32_t byte_id = byte_ids_[static_cast<uint8_t>(text[pos])];
    if (byte_id >= 0) {
      out.push_back(byte_id);
    } else if (unk_id_ >= 0) {
      out.push_back(unk_id_);
    }
    run = ++pos;
  }
  encode_valid(text.substr(run));
}

// ---- loading -------------------------------------------------------------------------------

namespace {

AddedToken special_from_spec(const TokenSpec& s) {
  AddedToken t;
  t.content = s.content;
  t.special = true;
  t.lstrip = s.lstrip;
  t.rstrip = s.rstrip;
  t.single_word = s.single_word;
  t.normalized = false;
  return t;
}

// transformers' tokenizer classes that read tokenizer.model the way this file does.
bool is_llama_class(const std::string& name) {
  return name == "LlamaTokenizer" || name == "LlamaTokenizerFast";
}

}  // namespace

std::unique_ptr<SentencePieceTokenizer> load_sentencepiece_tokenizer(const std::filesystem::path& dir) {
  const auto model_path = dir / "tokenizer.model";
  std::error_code ec;
  if (!std::filesystem::is_regular_file(model_path, ec)) {
    throw Error("no tokenizer.model (SentencePiece) in " + dir.string());
  }
  const HfTokenizerConfig cfg = read_hf_tokenizer_config(dir);  // small: report its errors first

  // Two fields hf_config does not keep: which class transformers would build, and its legacy flag.
  SentencePieceSpec spec;
  bool legacy = false;  // transformers 5's LlamaTokenizer default
  const auto config_path = dir / "tokenizer_config.json";
  if (std::filesystem::exists(config_path, ec)) {
    const nlohmann::json j = read_json_file(config_path);  // an object: read_hf_tokenizer_config checked
    if (auto it = j.find("tokenizer_class"); it != j.end() && !it->is_null()) {
      const std::string name = it->is_string() ? it->get<std::string>() : it->dump();
      if (!is_llama_class(name)) {
        throw Error(config_path.string() + ": tokenizer_class \"" + name +
                    "\" is not supported with tokenizer.model (FineServe reads Llama-style SentencePiece "
                    "tokenizers: LlamaTokenizer)");
      }
    }
    if (auto it = j.find("legacy"); it != j.end() && !it->is_null()) {
      if (!it->is_boolean()) throw Error(config_path.string() + ": \"legacy\" must be true or false");
      legacy = it->get<bool>();
    }
  }

  spec.source = model_path.string();
  spec.model_bytes = read_text_file(model_path);

  // The side files' added tokens in the order transformers adds them: added_tokens_decoder by id,
  // added_tokens.json by id, then the named and additional special tokens not yet present.
  std::vector<std::string> seen;
  auto contains = [&](const std::string& c) { return std::find(seen.begin(), seen.end(), c) != seen.end(); };
  for (const auto* list : {&cfg.added_tokens_decoder, &cfg.legacy_added_tokens}) {
    std::vector<AddedToken> sorted = *list;
    std::stable_sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
    for (AddedToken& t : sorted) {
      seen.push_back(t.content);
      spec.added_tokens.push_back(std::move(t));
    }
  }
  // LlamaTokenizer's defaults for the names no file gives.
  const std::pair<const char*, const char*> defaults[] = {
      {"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"}};
  auto named = [&](const char* key) -> std::optional<TokenSpec> {
    const NamedSpecialToken& slot = cfg.slot(key);
    if (slot.given) return slot.token;
    for (const auto& [k, v] : defaults) {
      if (std::string_view(k) == key) return TokenSpec{v};
    }
    return std::nullopt;
  };
  for (const NamedSpecialToken& slot : cfg.named) {
    if (auto t = named(slot.key.c_str()); t && !contains(t->content)) {
      seen.push_back(t->content);
      spec.added_tokens.push_back(special_from_spec(*t));
    }
  }
  for (const TokenSpec& t : cfg.additional_special) {
    if (!contains(t.content)) {
      seen.push_back(t.content);
      spec.added_tokens.push_back(special_from_spec(t));
    }
  }
  auto content = [](const std::optional<TokenSpec>& t) -> std::optional<std::string> {
    return t ? std::optional<std::string>(t->content) : std::nullopt;
  };
  spec.bos_token = content(named("bos_token"));
  spec.eos_token = content(named("eos_token"));
  spec.add_bos = cfg.add_bos_token.value_or(true);
  spec.add_eos = cfg.add_eos_token.value_or(false);
  const bool add_prefix_space = cfg.add_prefix_space.value_or(true);
  spec.prefix = !add_prefix_space ? PrefixRule::kNever : legacy ? PrefixRule::kAlways : PrefixRule::kFirst;
  spec.strip_leading_space = add_prefix_space;
  return std::make_unique<SentencePieceTokenizer>(std::move(spec));
}

}  // namespace fineserve
