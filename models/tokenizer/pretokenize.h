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

// The "Split" pre-tokenizer of Llama 3 (and, with max_digits 1, Qwen2), whose tokenizer.json
// gives the regex (behavior "Isolated"):
//
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
//
// matched leftmost-first, alternative by alternative, with max_digits the bound of \p{N}{1,N}.
// Like split_gpt2_pretokens, a hand-written matcher; ill-formed UTF-8 bytes are [^\s\p{L}\p{N}].
// The contractions are matched ASCII-case-insensitively (Unicode folds such as U+017F to 's' are
// not). Replaces `out`; the pieces concatenate to `text`.
void split_llama3_pretokens(std::string_view text, int max_digits, std::vector<std::string_view>& out);

// Hugging Face's "Digits" pre-tokenizer (SmolLM, StarCoder): characters of \p{N} are isolated
// from the rest, each on its own when `individual` is set, else as runs. Replaces `out`.
void split_digits(std::string_view text, bool individual, std::vector<std::string_view>& out);

}  // namespace fineserve
