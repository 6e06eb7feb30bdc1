// libFuzzer target: arbitrary bytes through the tokenizer, as text to encode and as ids to decode.
// The tokenizer folder is FINESERVE_FUZZ_TOKENIZER_DIR (default tests/data/gpt2, relative to the
// working directory), loaded once. Checked on every input:
//   - encode never fails, and the tokens carry the input bytes exactly (true of the GPT-2 files;
//     set FINESERVE_FUZZ_TOKENIZER_ROUND_TRIP=0 for a tokenizer whose added tokens strip spaces);
//   - decode is valid UTF-8 and equals the input with ill-formed bytes replaced;
//   - StreamDecoder's pieces are valid UTF-8 and add up to decode();
//   - the hand-written pre-tokenizer regexes (GPT-2, Llama 3, Qwen2) cut the input into non-empty
//     pieces that add up to it.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/base.h"
#include "models/tokenizer/pretokenize.h"
#include "models/tokenizer/tokenizer.h"
#include "models/tokenizer/utf8.h"

namespace {

struct Loaded {
  std::unique_ptr<fineserve::Tokenizer> tokenizer;
  bool check_round_trip;
};

const Loaded& loaded() {
  static const Loaded l = [] {
    const char* dir = std::getenv("FINESERVE_FUZZ_TOKENIZER_DIR");
    const char* round_trip = std::getenv("FINESERVE_FUZZ_TOKENIZER_ROUND_TRIP");
    return Loaded{fineserve::load_tokenizer(dir != nullptr ? dir : "tests/data/gpt2"),
                  round_trip == nullptr || std::strcmp(round_trip, "0") != 0};
  }();
  return l;
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

void check_pieces(const std::vector<std::string_view>& pieces, const std::string& text) {
  std::string joined;
  for (std::string_view p : pieces) {
    FS_ASSERT(!p.empty(), "a pre-tokenizer produced an empty piece");
    joined += p;
  }
  FS_ASSERT(joined == text, "pre-tokenizer pieces do not add up to the input");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Loaded& l = loaded();
  const fineserve::Tokenizer& tok = *l.tokenizer;
  const std::string text(reinterpret_cast<const char*>(data), size);

  std::vector<std::string_view> pieces;
  fineserve::split_gpt2_pretokens(text, pieces);
  check_pieces(pieces, text);
  for (const int max_digits : {1, 3}) {
    fineserve::split_llama3_pretokens(text, max_digits, pieces);
    check_pieces(pieces, text);
  }

  const std::vector<int32_t> ids = tok.encode(text, /*add_special_tokens=*/false);
  for (int32_t id : ids) FS_ASSERT(id >= 0 && id < tok.vocab_size(), "encode produced an unknown id");
  const std::string decoded = tok.decode(ids, /*skip_special_tokens=*/false);
  FS_ASSERT(fineserve::utf8::is_valid(decoded), "decode is not valid UTF-8");
  if (l.check_round_trip) {
    std::string raw;
    for (int32_t id : ids) tok.append_token_bytes(id, false, raw.empty(), raw);
    FS_ASSERT(raw == text, "the tokens do not carry the input bytes");
    FS_ASSERT(decoded == fineserve::utf8::replace_invalid(text), "decode(encode(x)) differs from x");
  }
  check_stream(tok, ids, false);

  // The same bytes as arbitrary ids (most out of range, some special), decoded both ways.
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
