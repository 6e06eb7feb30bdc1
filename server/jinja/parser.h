// The template parser: tokens -> a small AST, with Jinja's operator precedence; and the parsed
// template the renderer runs.
#pragma once

#include <cstddef>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "server/chat_template.h"  // ChatTemplateLimits
#include "server/jinja/lexer.h"

namespace fineserve::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class K : uint8_t { Const, List, Dict, Name, Attr, Item, Slice, Call, Filter, Test, Neg, Pos, Not, And, Or,
                           Bin, Cmp, Cond, Concat };
  K k;
  size_t pos;
  Json value;                      // Const
  std::string name;                // Name, Attr, Filter, Test, Bin (the operator)
  std::vector<ExprPtr> args;       // operands; Call: callee then arguments; Filter/Test: operand first;
                                   // Slice: object, start, stop, step (null when absent); Dict: k, v, k, v...
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;    // Cmp: the operators between args
  bool negated = false;            // Test
  int height = 1;                  // of the tree below (evaluation recurses this deep)
};

struct Stmt {
  enum class K : uint8_t { Text, Output, If, For, Set, SetBlock, Break, Continue, Block };
  K k;
  size_t pos;
  std::string text;                                      // Text
  ExprPtr expr;                                          // Output, Set, For (the iterable)
  ExprPtr filter;                                        // For: the `if` condition
  std::vector<std::string> targets;                      // For: loop variables; Set: name [, attribute]
  std::vector<std::pair<ExprPtr, std::vector<Stmt>>> branches;  // If: (condition, body)...
  std::vector<Stmt> body, else_body;
};

// The filter and test names the renderer implements (the parser rejects others up front).
const std::set<std::string>& known_filters();
const std::set<std::string>& known_tests();

// The statements of a lexed template; `max_depth` bounds the nesting of expressions and blocks.
std::vector<Stmt> parse(std::vector<Token> tokens, int max_depth, const FailAt& fail);

// "line L, column C" of a byte offset.
std::string position_of(const std::string& src, size_t pos);

// A parsed template: what the renderer runs.
struct Template {
  std::string name;
  std::string normalized;  // newlines normalized, one trailing newline dropped (what positions index)
  ChatTemplateLimits limits;
  std::vector<Stmt> body;
};

}  // namespace fineserve::jinja
