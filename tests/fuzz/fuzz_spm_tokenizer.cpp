// libFuzzer target: arbitrary bytes through the SentencePiece tokenizer (tests/data/spm, relative to
// the working directory, or FINESERVE_FUZZ_SPM_DIR), as text to encode and as ids to decode.
// Checked on every input, for that fixture's Llama-2 config (prefix '▁' on the first text only, no
// stripping added tokens):
//   - encode never fails, and its tokens carry the input exactly: the bytes they stand for are the
//     input with every '▁' a space, after one space for the '▁' prefix when the input gets it;
//   - decode is valid UTF-8, and StreamDecoder's pieces are valid UTF-8 and add up to decode().
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/base.h"
#include "models/tokenizer/sentencepiece.h"
#include "models/tokenizer/tokenizer.h"
#include "models/tokenizer/utf8.h"

namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";

const fineserve::SentencePieceTokenizer& tokenizer() {
  static const std::unique_ptr<fineserve::SentencePieceTokenizer> tok = [] {
    const char* dir = std::getenv("FINESERVE_FUZZ_SPM_DIR");
    return fineserve::load_sentencepiece_tokenizer(dir != nullptr ? dir : "tests/data/spm");
  }();
  return *tok;
}

// The bytes the tokens of `text` must stand for.
std::string expected_bytes(std::string_view text) {
  std::string out;
  bool starts_with_added = false;
  for (const char* special : {"<s>", "</s>", "<unk>"}) starts_with_added |= text.starts_with(special);
  if (!text.empty() && text[0] != ' ' && !text.starts_with(kSpaceSymbol) && !starts_with_added) out += ' ';
  for (size_t pos = 0; pos < text.size();) {
    if (text.substr(pos).starts_with(kSpaceSymbol)) {
      out += ' ';
      pos += kSpaceSymbol.size();
    } else {
      out += text[pos++];
    }
  }
  return out;
}

void check_stream(const fineserve::Tokenizer& tok, const std::vector<int32_t>& ids, bool skip) {
  fineserve::StreamDecoder stream(tok, skip);
  std::string all;
  for (int32_t id : ids) {
    const std::string piece = stream.feed(id);
    FS_ASSERT(fineserve::utf8::is_valid(piece), "stream piece is not valid UTF-8");
    all += piece;
  }
  all += stream.flush();
  FS_ASSERT(all == tok.decode(ids, skip), "stream decode differs from decode");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fineserve::SentencePieceTokenizer& tok = tokenizer();
  const std::string text(reinterpret_cast<const char*>(data), size);

  const std::vector<int32_t> ids = tok.encode(text, /*add_special_tokens=*/false);
  for (int32_t id : ids) FS_ASSERT(id >= 0 && id < tok.vocab_size(), "encode produced an unknown id");
  std::string raw;
  for (int32_t id : ids) tok.append_token_bytes(id, /*skip_special_tokens=*/false, /*at_start=*/false, raw);
  FS_ASSERT(raw == expected_bytes(text), "the tokens do not carry the input bytes");
  FS_ASSERT(fineserve::utf8::is_valid(tok.decode(ids, false)), "decode is not valid UTF-8");
  check_stream(tok, ids, false);
  check_stream(tok, ids, true);

  // The same bytes as arbitrary ids (most in range, some not), decoded both ways.
  std::vector<int32_t> raw_ids(size / 4);
  if (!raw_ids.empty()) std::memcpy(raw_ids.data(), data, raw_ids.size() * 4);
  for (int32_t& id : raw_ids) {
    if ((id & 0x40000000) == 0) id = static_cast<int32_t>(static_cast<uint32_t>(id) % static_cast<uint32_t>(tok.vocab_size()));
  }
  for (const bool skip : {true, false}) {
    FS_ASSERT(fineserve::utf8::is_valid(tok.decode(raw_ids, skip)), "decode is not valid UTF-8");
    check_stream(tok, raw_ids, skip);
  }
  return 0;
}
