// The template lexer: template text -> tokens, applying whitespace control the way Jinja's lexer
// does with trim_blocks and lstrip_blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "server/jinja/value.h"

namespace fineserve::jinja {

// Reports a syntax error at a byte offset of the source (does not return).
using FailAt = std::function<void(size_t, const std::string&)>;

enum class Tok : uint8_t { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };

struct Token {
  Tok type;
  std::string text;  // Text: the data; Name, Op: the spelling; String: the decoded value
  size_t pos;        // byte offset in the (newline-normalized) source
  Json number;       // Int, Float
};

// The tokens of `src` (newline-normalized), ending with Tok::Eof.
std::vector<Token> lex(const std::string& src, const FailAt& fail);

}  // namespace fineserve::jinja
