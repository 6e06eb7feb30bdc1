// Tokenizers: text <-> token ids, exactly as the checkpoint's Hugging Face tokenizer does it.
//
//   auto tok = fineserve::load_tokenizer(checkpoint_dir);
//   std::vector<int32_t> ids = tok->encode("Hello world");      // BOS added if the model wants it
//   std::string text = tok->decode(ids);                        // special tokens skipped
//
//   fineserve::StreamDecoder stream(*tok);                      // while generating:
//   for (int32_t id : generated) send(stream.feed(id));         //   whole characters only
//   send(stream.flush());
//
// Every tokenizer is thread-safe for concurrent encode/decode calls.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fineserve {

// A byte range [begin, end) of a text.
struct TextRange {
  size_t begin = 0;
  size_t end = 0;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Text (UTF-8; ill-formed bytes are tokenized byte by byte and never fail) -> ids. Added and
  // special tokens written in the text, such as "<|endoftext|>", become their ids, as in HF.
  // add_special_tokens: also add what the checkpoint's post-processor adds (e.g. a BOS first).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const {
    return encode(text, add_special_tokens, {});
  }
  // As above, except that special tokens are not matched where they overlap `literal` (byte
  // ranges of `text`, sorted, not overlapping): that text is tokenized as ordinary text (HF's
  // split_special_tokens, for those ranges only). A chat server passes the ranges that came from
  // message content, so that a user cannot write the template's control tokens. Added tokens that
  // are not special still match, as in HF.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special_tokens,
                                      std::span<const TextRange> literal) const = 0;

  // Ids -> text. Bytes that do not form valid UTF-8 become U+FFFD (HF's errors="replace"); ids that
  // name no token are skipped, as HF does; no "clean up tokenization spaces" step.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = true) const;

  // One past the largest id of the vocabulary and the added tokens (HF's len(tokenizer)). The
  // model's embedding table may have more rows than this.
  virtual int32_t vocab_size() const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;

  // Token strings as the vocabulary spells them (GPT-2: "Ġthe" for " the").
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::optional<std::string> id_to_token(int32_t id) const = 0;
  virtual bool is_special(int32_t id) const = 0;

  // The decode hook every tokenizer implements: appends the raw bytes token `id` contributes to
  // decoded text (possibly part of a UTF-8 character; nothing for an unknown id or for a skipped
  // special token). `at_start` says that no token has been decoded yet (every id before it was
  // unknown or a skipped special token), for tokenizers that treat the first piece differently
  // (SentencePiece drops its leading space).
  virtual void append_token_bytes(int32_t id, bool skip_special_tokens, bool at_start,
                                  std::string& out) const = 0;
};

// Incremental decoding for streaming: feed ids one at a time and get back the text that became
// complete. The pieces never split a UTF-8 character, and their concatenation (with flush()) is
// exactly decode(all ids, skip_special_tokens).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = true);

  std::string feed(int32_t id);
  // The rest (an unfinished character becomes U+FFFD); the decoder then starts a new sequence.
  std::string flush();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_tokens_;
  bool at_start_ = true;
  std::string pending_;  // bytes of a character not yet complete
};

// Reads the tokenizer of a Hugging Face checkpoint folder, choosing by the files present:
//   tokenizer.json             byte-level BPE (GPT-2, OPT, GPT-NeoX style)
//   tokenizer.model            SentencePiece BPE (Llama, Mistral), with tokenizer_config.json; also
//                              used when tokenizer.json is SentencePiece-style (byte_fallback)
//   vocab.json + merges.txt    GPT-2 style BPE files, with tokenizer_config.json and
//                              special_tokens_map.json when present (OPT)
// Throws fineserve::Error when there is none, or when the files are unreadable, malformed or
// describe a tokenizer FineServe does not implement.
std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& dir);

}  // namespace fineserve
