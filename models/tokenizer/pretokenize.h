// GPT-2's pre-tokenizer: the split that happens before BPE merges, so that merges never cross
// word, number, punctuation or whitespace boundaries. Hugging Face (and OpenAI's encoder.py) write
// it as the regex
//
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// matched leftmost-first, alternative by alternative. split_gpt2_pretokens is a hand-written
// matcher for exactly that regex over UTF-8 code points (std::regex has no \p{L}). A byte that is
// not part of well-formed UTF-8 counts as a character of its own in the [^\s\p{L}\p{N}] class,
// so arbitrary bytes split deterministically and never fail.
#pragma once

#include <string_view>
#include <vector>

namespace fineserve {

// Replaces `out` with the pieces of `text`, in order; their concatenation is `text`.
void split_gpt2_pretokens(std::string_view text, std::vector<std::string_view>& out);

// Hugging Face's "Digits" pre-tokenizer (SmolLM, StarCoder): characters of \p{N} are isolated
// from the rest, each on its own when `individual` is set, else as runs. Replaces `out`.
void split_digits(std::string_view text, bool individual, std::vector<std::string_view>& out);

}  // namespace fineserve
