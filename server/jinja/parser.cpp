#include "server/jinja/parser.h"

#include <algorithm>

namespace fineserve::jinja {

const std::set<std::string>& known_filters() {
  static const std::set<std::string> f = {
      "abs", "capitalize", "count", "d", "default", "e", "escape", "first", "float", "indent", "int", "items",
      "join", "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace",
      "reverse", "round", "safe", "select", "selectattr", "sort", "string", "sum", "title", "tojson", "trim",
      "unique", "upper", "wordcount"};
  return f;
}
const std::set<std::string>& known_tests() {
  static const std::set<std::string> t = {
      "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "escaped", "even", "false", "float",
      "ge", "greaterthan", "gt", "in", "integer", "iterable", "le", "lessthan", "lower", "lt", "mapping", "ne",
      "none", "number", "odd", "sameas", "sequence", "string", "true", "undefined", "upper",
      "==", "!=", "<", "<=", ">", ">="};
  return t;
}

namespace {

class Parser {
 public:
  Parser(std::vector<Token> toks, int max_depth, std::function<void(size_t, const std::string&)> fail)
      : t_(std::move(toks)), max_depth_(max_depth), fail_(std::move(fail)) {}

  std::vector<Stmt> parse() {
    std::vector<Stmt> body = parse_body({});
    if (cur().type != Tok::Eof) fail_(cur().pos, "unexpected '" + peek_keyword() + "'");
    return body;
  }

 private:
  const Token& cur() const { return t_[i_]; }
  const Token& next_tok() const { return t_[std::min(i_ + 1, t_.size() - 1)]; }
  void advance() {
    if (i_ + 1 < t_.size()) ++i_;
  }
  bool is_op(const char* o) const { return cur().type == Tok::Op && cur().text == o; }
  bool is_name(const char* n) const { return cur().type == Tok::Name && cur().text == n; }
  void expect_op(const char* o) {
    if (!is_op(o)) fail_(cur().pos, std::string("expected '") + o + "', got " + describe(cur()));
    advance();
  }
  std::string expect_name() {
    if (cur().type != Tok::Name) fail_(cur().pos, "expected a name, got " + describe(cur()));
    std::string n = cur().text;
    advance();
    return n;
  }
  void expect_block_end() {
    if (cur().type != Tok::BlockEnd) fail_(cur().pos, "expected '%}', got " + describe(cur()));
    advance();
  }
  static std::string describe(const Token& t) {
    switch (t.type) {
      case Tok::Eof: return "the end of the template";
      case Tok::BlockEnd: return "'%}'";
      case Tok::VarEnd: return "'}}'";
      case Tok::String: return "a string";
      case Tok::Int:
      case Tok::Float: return "a number";
      default: return "'" + t.text + "'";
    }
  }
  std::string peek_keyword() const {
    return cur().type == Tok::BlockBegin && next_tok().type == Tok::Name ? next_tok().text : describe(cur());
  }
  struct DepthGuard {
    Parser& p;
    DepthGuard(Parser& parser, size_t pos) : p(parser) {
      if (++p.depth_ > p.max_depth_) p.fail_(pos, "the template nests too deeply");
    }
    ~DepthGuard() { --p.depth_; }
  };

  ExprPtr node(Expr::K k, size_t pos) {
    auto e = std::make_unique<Expr>();
    e->k = k;
    e->pos = pos;
    return e;
  }
  // Evaluation recurses once per level of the tree, and left-deep chains (a + b + c ...) are built
  // without parser recursion: bound the tree's height too.
  ExprPtr sealed(ExprPtr e) {
    int h = 0;
    for (const ExprPtr& a : e->args)
      if (a) h = std::max(h, a->height);
    for (const auto& kv : e->kwargs) h = std::max(h, kv.second->height);
    e->height = h + 1;
    if (e->height > max_depth_) fail_(e->pos, "the template nests too deeply");
    return e;
  }

  // Statements until a {% <one of ends> %} (not consumed) or the end of the template.
  std::vector<Stmt> parse_body(const std::set<std::string>& ends) {
    DepthGuard g(*this, cur().pos);
    std::vector<Stmt> out;
    while (true) {
      const Token& t = cur();
      if (t.type == Tok::Eof) {
        if (!ends.empty()) fail_(t.pos, "unexpected end of template; expected '" + *ends.begin() + "'");
        return out;
      }
      if (t.type == Tok::Text) {
        Stmt s{Stmt::K::Text, t.pos, t.text, {}, {}, {}, {}, {}, {}};
        out.push_back(std::move(s));
        advance();
      } else if (t.type == Tok::VarBegin) {
        advance();
        Stmt s{Stmt::K::Output, t.pos, {}, parse_expression(), {}, {}, {}, {}, {}};
        if (cur().type != Tok::VarEnd) fail_(cur().pos, "expected '}}', got " + describe(cur()));
        advance();
        out.push_back(std::move(s));
      } else if (t.type == Tok::BlockBegin) {
        if (next_tok().type == Tok::Name && ends.count(next_tok().text)) return out;
        out.push_back(parse_statement());
      } else {
        fail_(t.pos, "unexpected " + describe(t));
      }
    }
  }

  Stmt parse_statement() {
    const size_t pos = cur().pos;
    advance();  // {%
    if (cur().type != Tok::Name) fail_(cur().pos, "expected a tag name, got " + describe(cur()));
    const std::string kw = cur().text;
    advance();
    Stmt s{Stmt::K::Text, pos, {}, {}, {}, {}, {}, {}, {}};
    if (kw == "if") {
      s.k = Stmt::K::If;
      ExprPtr cond = parse_expression();
      expect_block_end();
      std::vector<Stmt> body = parse_body({"elif", "else", "endif"});
      s.branches.emplace_back(std::move(cond), std::move(body));
      while (true) {
        advance();  // {%
        const std::string e = cur().text;
        advance();
        if (e == "elif") {
          ExprPtr c = parse_expression();
          expect_block_end();
          std::vector<Stmt> b = parse_body({"elif", "else", "endif"});
          s.branches.emplace_back(std::move(c), std::move(b));
        } else if (e == "else") {
          expect_block_end();
          s.else_body = parse_body({"endif"});
        } else {  // endif
          expect_block_end();
          break;
        }
      }
    } else if (kw == "for") {
      s.k = Stmt::K::For;
      const bool paren = is_op("(");
      if (paren) advance();
      s.targets.push_back(expect_name());
      while (is_op(",")) {
        advance();
        s.targets.push_back(expect_name());
      }
      if (paren) expect_op(")");
      if (!is_name("in")) fail_(cur().pos, "expected 'in', got " + describe(cur()));
      advance();
      s.expr = parse_or();
      if (is_name("if")) {
        advance();
        s.filter = parse_expression();
      }
      if (is_name("recursive")) fail_(cur().pos, "recursive loops are not supported");
      expect_block_end();
      ++loop_depth_;
      s.body = parse_body({"else", "endfor"});
      --loop_depth_;
      advance();
      const std::string e = cur().text;
      advance();
      expect_block_end();
      if (e == "else") {
        s.else_body = parse_body({"endfor"});
        advance();
        advance();
        expect_block_end();
      }
    } else if (kw == "set") {
      s.targets.push_back(expect_name());
      if (is_op(".")) {
        advance();
        s.targets.push_back(expect_name());
      }
      if (is_op(",")) fail_(cur().pos, "assigning to several names is not supported");
      if (is_op("=")) {
        s.k = Stmt::K::Set;
        advance();
        s.expr = parse_tuple_or_expression();
        expect_block_end();
      } else {
        s.k = Stmt::K::SetBlock;
        expect_block_end();
        s.body = parse_body({"endset"});
        advance();
        advance();
        expect_block_end();
      }
    } else if (kw == "break" || kw == "continue") {
      if (loop_depth_ == 0) fail_(pos, "'" + kw + "' outside a loop");
      s.k = kw == "break" ? Stmt::K::Break : Stmt::K::Continue;
      expect_block_end();
    } else if (kw == "generation") {
      // transformers' extension marking the assistant's tokens for training masks; renders its body.
      s.k = Stmt::K::Block;
      expect_block_end();
      s.body = parse_body({"endgeneration"});
      advance();
      advance();
      expect_block_end();
    } else {
      fail_(pos, "unknown or unsupported tag '" + kw + "'");
    }
    return s;
  }

  // `a, b` (a tuple, as a list) or one expression.
  ExprPtr parse_tuple_or_expression() {
    const size_t pos = cur().pos;
    ExprPtr first = parse_expression();
    if (!is_op(",")) return first;
    ExprPtr list = node(Expr::K::List, pos);
    list->args.push_back(std::move(first));
    while (is_op(",")) {
      advance();
      if (cur().type == Tok::BlockEnd || cur().type == Tok::VarEnd) break;
      list->args.push_back(parse_expression());
    }
    return sealed(std::move(list));
  }

  ExprPtr parse_expression() {
    DepthGuard g(*this, cur().pos);
    ExprPtr e = parse_or();
    while (is_name("if")) {
      const size_t pos = cur().pos;
      advance();
      ExprPtr cond = parse_or();
      ExprPtr otherwise;
      if (is_name("else")) {
        advance();
        otherwise = parse_expression();
      }
      ExprPtr c = node(Expr::K::Cond, pos);
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(cond));
      c->args.push_back(std::move(otherwise));
      e = sealed(std::move(c));
    }
    return e;
  }

  ExprPtr binary(Expr::K k, ExprPtr l, ExprPtr r, size_t pos, std::string op = "") {
    ExprPtr e = node(k, pos);
    e->name = std::move(op);
    e->args.push_back(std::move(l));
    e->args.push_back(std::move(r));
    return sealed(std::move(e));
  }

  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (is_name("or")) {
      const size_t pos = cur().pos;
      advance();
      e = binary(Expr::K::Or, std::move(e), parse_and(), pos);
    }
    return e;
  }
  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (is_name("and")) {
      const size_t pos = cur().pos;
      advance();
      e = binary(Expr::K::And, std::move(e), parse_not(), pos);
    }
    return e;
  }
  ExprPtr parse_not() {
    if (is_name("not")) {
      DepthGuard g(*this, cur().pos);
      ExprPtr e = node(Expr::K::Not, cur().pos);
      advance();
      e->args.push_back(parse_not());
      return sealed(std::move(e));
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    const size_t pos = cur().pos;
    ExprPtr first = parse_math1();
    ExprPtr cmp;
    while (true) {
      std::string op;
      if (cur().type == Tok::Op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                    cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        op = cur().text;
        advance();
      } else if (is_name("in")) {
        op = "in";
        advance();
      } else if (is_name("not") && next_tok().type == Tok::Name && next_tok().text == "in") {
        op = "not in";
        advance();
        advance();
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(Expr::K::Cmp, pos);
        cmp->args.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? sealed(std::move(cmp)) : std::move(first);
  }
  ExprPtr parse_math1() {
    ExprPtr e = parse_concat();
    while (is_op("+") || is_op("-")) {
      const size_t pos = cur().pos;
      std::string op = cur().text;
      advance();
      e = binary(Expr::K::Bin, std::move(e), parse_concat(), pos, op);
    }
    return e;
  }
  ExprPtr parse_concat() {
    const size_t pos = cur().pos;
    ExprPtr e = parse_math2();
    if (!is_op("~")) return e;
    ExprPtr c = node(Expr::K::Concat, pos);
    c->args.push_back(std::move(e));
    while (is_op("~")) {
      advance();
      c->args.push_back(parse_math2());
    }
    return sealed(std::move(c));
  }
  ExprPtr parse_math2() {
    ExprPtr e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const size_t pos = cur().pos;
      std::string op = cur().text;
      advance();
      e = binary(Expr::K::Bin, std::move(e), parse_pow(), pos, op);
    }
    return e;
  }
  ExprPtr parse_pow() {
    ExprPtr e = parse_unary(true);
    while (is_op("**")) {
      const size_t pos = cur().pos;
      advance();
      e = binary(Expr::K::Bin, std::move(e), parse_unary(true), pos, "**");
    }
    return e;
  }
  ExprPtr parse_unary(bool with_filter) {
    DepthGuard g(*this, cur().pos);
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      e = node(is_op("-") ? Expr::K::Neg : Expr::K::Pos, cur().pos);
      advance();
      e->args.push_back(parse_unary(false));
      e = sealed(std::move(e));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token& t = cur();
    const size_t pos = t.pos;
    switch (t.type) {
      case Tok::Name: {
        ExprPtr e = node(Expr::K::Const, pos);
        if (t.text == "true" || t.text == "True") e->value = true;
        else if (t.text == "false" || t.text == "False") e->value = false;
        else if (t.text == "none" || t.text == "None") e->value = nullptr;
        else {
          e->k = Expr::K::Name;
          e->name = t.text;
        }
        advance();
        return e;
      }
      case Tok::String: {
        std::string s;
        while (cur().type == Tok::String) {
          s += cur().text;
          advance();
        }
        ExprPtr e = node(Expr::K::Const, pos);
        e->value = s;
        return e;
      }
      case Tok::Int:
      case Tok::Float: {
        ExprPtr e = node(Expr::K::Const, pos);
        e->value = t.number;
        advance();
        return e;
      }
      case Tok::Op:
        if (t.text == "(") {
          advance();
          if (is_op(")")) {  // the empty tuple
            advance();
            ExprPtr e = node(Expr::K::List, pos);
            return e;
          }
          ExprPtr first = parse_expression();
          if (is_op(",")) {
            ExprPtr list = node(Expr::K::List, pos);
            list->args.push_back(std::move(first));
            while (is_op(",")) {
              advance();
              if (is_op(")")) break;
              list->args.push_back(parse_expression());
            }
            first = sealed(std::move(list));
          }
          expect_op(")");
          return first;
        }
        if (t.text == "[") {
          advance();
          ExprPtr e = node(Expr::K::List, pos);
          while (!is_op("]")) {
            e->args.push_back(parse_expression());
            if (!is_op(",")) break;
            advance();
          }
          expect_op("]");
          return sealed(std::move(e));
        }
        if (t.text == "{") {
          advance();
          ExprPtr e = node(Expr::K::Dict, pos);
          while (!is_op("}")) {
            e->args.push_back(parse_expression());
            expect_op(":");
            e->args.push_back(parse_expression());
            if (!is_op(",")) break;
            advance();
          }
          expect_op("}");
          return sealed(std::move(e));
        }
        break;
      default: break;
    }
    fail_(pos, "unexpected " + describe(t));
    return nullptr;
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      if (is_op(".")) {
        const size_t pos = cur().pos;
        advance();
        if (cur().type == Tok::Int) {
          ExprPtr item = node(Expr::K::Item, pos);
          ExprPtr idx = node(Expr::K::Const, cur().pos);
          idx->value = cur().number;
          advance();
          item->args.push_back(std::move(e));
          item->args.push_back(std::move(idx));
          e = sealed(std::move(item));
        } else {
          ExprPtr a = node(Expr::K::Attr, pos);
          a->name = expect_name();
          a->args.push_back(std::move(e));
          e = sealed(std::move(a));
        }
      } else if (is_op("[")) {
        e = parse_subscript(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr obj) {
    const size_t pos = cur().pos;
    advance();  // [
    ExprPtr start, stop, step;
    bool slice = false;
    if (!is_op(":")) start = parse_expression();
    if (is_op(":")) {
      slice = true;
      advance();
      if (!is_op("]") && !is_op(":")) stop = parse_expression();
      if (is_op(":")) {
        advance();
        if (!is_op("]")) step = parse_expression();
      }
    }
    expect_op("]");
    ExprPtr e = node(slice ? Expr::K::Slice : Expr::K::Item, pos);
    e->args.push_back(std::move(obj));
    e->args.push_back(std::move(start));
    if (slice) {
      e->args.push_back(std::move(stop));
      e->args.push_back(std::move(step));
    }
    return sealed(std::move(e));
  }

  // (args) onto `e`: positional first, then name=value.
  void parse_args(Expr& e) {
    expect_op("(");
    while (!is_op(")")) {
      if (is_op("*") || is_op("**")) fail_(cur().pos, "*args and **kwargs are not supported");
      if (cur().type == Tok::Name && next_tok().type == Tok::Op && next_tok().text == "=") {
        std::string key = cur().text;
        advance();
        advance();
        e.kwargs.emplace_back(std::move(key), parse_expression());
      } else {
        if (!e.kwargs.empty()) fail_(cur().pos, "a positional argument after a keyword argument");
        e.args.push_back(parse_expression());
      }
      if (!is_op(",")) break;
      advance();
    }
    expect_op(")");
  }

  ExprPtr parse_call(ExprPtr callee) {
    ExprPtr e = node(Expr::K::Call, cur().pos);
    e->args.push_back(std::move(callee));
    parse_args(*e);
    return sealed(std::move(e));
  }

  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      if (is_op("|")) {
        const size_t pos = cur().pos;
        advance();
        ExprPtr f = node(Expr::K::Filter, pos);
        f->name = expect_name();
        if (!known_filters().count(f->name)) fail_(pos, "no filter named '" + f->name + "'");
        f->args.push_back(std::move(e));
        if (is_op("(")) parse_args(*f);
        e = sealed(std::move(f));
      } else if (is_name("is")) {
        const size_t pos = cur().pos;
        advance();
        ExprPtr t = node(Expr::K::Test, pos);
        if (is_name("not")) {
          t->negated = true;
          advance();
        }
        if (cur().type == Tok::Op && known_tests().count(cur().text)) {
          t->name = cur().text;
          advance();
        } else {
          t->name = expect_name();
        }
        if (!known_tests().count(t->name)) fail_(pos, "no test named '" + t->name + "'");
        t->args.push_back(std::move(e));
        if (is_op("(")) {
          parse_args(*t);
        } else if ((cur().type == Tok::Name || cur().type == Tok::String || cur().type == Tok::Int ||
                    cur().type == Tok::Float || is_op("[") || is_op("{")) &&
                   !is_name("else") && !is_name("or") && !is_name("and")) {
          if (is_name("is")) fail_(cur().pos, "tests cannot be chained with 'is'");
          t->args.push_back(parse_postfix(parse_primary()));  // `x is divisibleby 3`
        }
        e = sealed(std::move(t));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
  int max_depth_;
  std::function<void(size_t, const std::string&)> fail_;
};

}  // namespace

std::vector<Stmt> parse(std::vector<Token> tokens, int max_depth, const FailAt& fail) {
  return Parser(std::move(tokens), max_depth, fail).parse();
}

std::string position_of(const std::string& src, size_t pos) {
  pos = std::min(pos, src.size());
  size_t line = 1, col = 1;
  for (size_t i = 0; i < pos; ++i) {
    if (src[i] == '\n') {
      ++line;
      col = 1;
    } else if ((static_cast<unsigned char>(src[i]) & 0xC0) != 0x80) {
      ++col;
    }
  }
  return std::to_string(line) + ":" + std::to_string(col);
}

}  // namespace fineserve::jinja
