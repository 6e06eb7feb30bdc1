#include "models/tokenizer/tokenizer.h"

#include <functional>
#include <system_error>

#include "kernels/base.h"
#include "models/tokenizer/bpe.h"
#include "models/tokenizer/sentencepiece.h"
#include "models/tokenizer/utf8.h"

namespace fineserve {

namespace {

// Whether decoding `id` counts as a token (HF's decoders see it): a known id, not skipped.
bool is_decoded(const Tokenizer& tok, int32_t id, bool skip_special_tokens) {
  return tok.id_to_token(id).has_value() && !(skip_special_tokens && tok.is_special(id));
}

}  // namespace

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  bool at_start = true;
  for (const int32_t id : ids) {
    append_token_bytes(id, skip_special_tokens, at_start, bytes);
    if (at_start && is_decoded(*this, id, skip_special_tokens)) at_start = false;
  }
  return utf8::replace_invalid(bytes);
}

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(&tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string StreamDecoder::feed(int32_t id) {
  tokenizer_->append_token_bytes(id, skip_special_tokens_, at_start_, pending_);
  if (at_start_ && is_decoded(*tokenizer_, id, skip_special_tokens_)) at_start_ = false;
  std::string out;
  const size_t used = utf8::append_replacing_invalid(pending_, /*final=*/false, out);
  pending_.erase(0, used);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = utf8::replace_invalid(pending_);
  pending_.clear();
  at_start_ = true;
  return out;
}

namespace {

bool is_file(const std::filesystem::path& p) {
  std::error_code ec;
  return std::filesystem::is_regular_file(p, ec);
}

// The tokenizer formats, most specific first. A new format is one more entry.
struct TokenizerFormat {
  std::function<bool(const std::filesystem::path&)> present;
  std::function<std::unique_ptr<Tokenizer>(const std::filesystem::path&)> load;
};

// tokenizer.json is what HF writes, so it comes first; but Llama-style checkpoints ship one with a
// SentencePiece-style BPE (byte_fallback, Metaspace) that the byte-level BPE does not read: those
// are read from their tokenizer.model, when there is one.
std::unique_ptr<Tokenizer> load_tokenizer_json(const std::filesystem::path& dir) {
  try {
    return load_bpe_tokenizer_json(dir);
  } catch (const Error& json_error) {
    if (!is_file(dir / "tokenizer.model")) {
      throw Error(std::string(json_error.what()) +
                  "; and there is no tokenizer.model (SentencePiece) to read instead");
    }
    try {
      return load_sentencepiece_tokenizer(dir);
    } catch (const Error& model_error) {
      throw Error(std::string(json_error.what()) + "; and reading tokenizer.model instead failed: " +
                  model_error.what());
    }
  }
}

const std::vector<TokenizerFormat>& formats() {
  static const std::vector<TokenizerFormat> all = {
      {[](const auto& dir) { return is_file(dir / "tokenizer.json"); }, load_tokenizer_json},
      {[](const auto& dir) { return is_file(dir / "tokenizer.model"); },
       [](const auto& dir) -> std::unique_ptr<Tokenizer> { return load_sentencepiece_tokenizer(dir); }},
      {[](const auto& dir) { return is_file(dir / "vocab.json") && is_file(dir / "merges.txt"); },
       [](const auto& dir) -> std::unique_ptr<Tokenizer> { return load_bpe_vocab_merges(dir); }},
  };
  return all;
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    throw Error("tokenizer folder " + dir.string() + " does not exist or is not a folder");
  }
  for (const TokenizerFormat& f : formats()) {
    if (f.present(dir)) return f.load(dir);
  }
  std::string hint;
  if (is_file(dir / "vocab.json")) hint = "; found vocab.json but no merges.txt";
  if (is_file(dir / "merges.txt")) hint = "; found merges.txt but no vocab.json";
  throw Error("no tokenizer in " + dir.string() +
              " (need tokenizer.json or vocab.json + merges.txt, or a SentencePiece tokenizer.model" + hint + ")");
}

}  // namespace fineserve
