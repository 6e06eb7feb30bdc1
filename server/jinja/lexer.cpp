#include "server/jinja/lexer.h"

#include <charconv>
#include <cstring>

#include "kernels/base.h"

namespace fineserve::jinja {
namespace {

class Lexer {
 public:
  Lexer(const std::string& src, const std::function<void(size_t, const std::string&)>& fail)
      : s_(src), fail_(fail) {}

  std::vector<Token> run() {
    size_t pos = 0;
    bool line_starting = true;
    const size_t n = s_.size();
    while (pos < n) {
      size_t start = pos;
      char kind = 0;
      for (; start + 1 < n; ++start) {
        if (s_[start] == '{' && (s_[start + 1] == '{' || s_[start + 1] == '%' || s_[start + 1] == '#')) {
          kind = s_[start + 1];
          break;
        }
      }
      if (!kind) {
        emit_text(s_.substr(pos), pos);
        break;
      }
      std::string text = s_.substr(pos, start - pos);
      size_t p = start + 2;
      const char sign = p < n && (s_[p] == '-' || s_[p] == '+') ? s_[p] : 0;
      if (sign) ++p;
      if (sign == '-') {
        text = rstrip_ws(text);
      } else if (sign != '+' && kind != '{') {
        // lstrip_blocks: a block or comment tag alone on its line (after whitespace) takes the
        // whitespace before it away.
        const size_t nl = text.rfind('\n');
        const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size() &&
            std::all_of(text.begin() + static_cast<std::ptrdiff_t>(l_pos), text.end(), is_ws))
          text.resize(l_pos);
      }
      emit_text(text, pos);
      if (kind == '#') {
        const size_t close = s_.find("#}", p);
        if (close == std::string::npos) fail_(start, "missing end of comment tag");
        size_t after = close + 2;
        const char before = close > p ? s_[close - 1] : 0;
        if (before == '-') {
          while (after < n && is_ws(s_[after])) ++after;
        } else if (before != '+' && after < n && s_[after] == '\n') {
          ++after;  // trim_blocks
        }
        line_starting = after > 0 && s_[after - 1] == '\n';
        pos = after;
        continue;
      }
      const bool block = kind == '%';
      tokens_.push_back({block ? Tok::BlockBegin : Tok::VarBegin, "", start, {}});
      pos = lex_tag(p, block, line_starting);
    }
    tokens_.push_back({Tok::Eof, "", n, {}});
    return std::move(tokens_);
  }

 private:
  static bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
  static std::string rstrip_ws(const std::string& t) {
    size_t e = t.size();
    while (e > 0 && is_ws(t[e - 1])) --e;
    return t.substr(0, e);
  }
  void emit_text(const std::string& t, size_t pos) {
    if (!t.empty()) tokens_.push_back({Tok::Text, t, pos, {}});
  }

  // The tokens of one {{ }} or {% %} from `p`; returns the position after its end delimiter.
  size_t lex_tag(size_t p, bool block, bool& line_starting) {
    const size_t n = s_.size();
    std::vector<char> brackets;  // end delimiters count only outside brackets, as in Jinja
    while (true) {
      while (p < n && is_ws(s_[p])) ++p;
      if (p >= n) fail_(p, block ? "missing end of block tag '%}'" : "missing end of output tag '}}'");
      if (brackets.empty()) {
        const char* end = block ? "%}" : "}}";
        auto at = [&](size_t q, const char* what) { return s_.compare(q, std::strlen(what), what) == 0; };
        if (at(p, end) || ((s_[p] == '-' || (block && s_[p] == '+')) && at(p + 1, end))) {
          const char sign = s_[p] == '-' || s_[p] == '+' ? s_[p] : 0;
          size_t after = p + (sign ? 1 : 0) + 2;
          if (sign == '-') {
            while (after < n && is_ws(s_[after])) ++after;
          } else if (block && sign != '+' && after < n && s_[after] == '\n') {
            ++after;  // trim_blocks
          }
          tokens_.push_back({block ? Tok::BlockEnd : Tok::VarEnd, "", p, {}});
          line_starting = s_[after - 1] == '\n';
          return after;
        }
      }
      const char c = s_[p];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = p;
        while (e < n && (std::isalnum(static_cast<unsigned char>(s_[e])) || s_[e] == '_')) ++e;
        tokens_.push_back({Tok::Name, s_.substr(p, e - p), p, {}});
        p = e;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        p = lex_number(p);
      } else if (c == '\'' || c == '"') {
        p = lex_string(p);
      } else {
        static const char* ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">",
                                    "(", ")", "[", "]", "{", "}", ",", ".", ":", "|", "="};
        const char* op = nullptr;
        for (const char* o : ops)
          if (s_.compare(p, std::strlen(o), o) == 0) {
            op = o;
            break;
          }
        if (!op) fail_(p, std::string("unexpected character '") + c + "'");
        const std::string o(op);
        if (o == "(" || o == "[" || o == "{") brackets.push_back(o == "(" ? ')' : o == "[" ? ']' : '}');
        if (o == ")" || o == "]" || o == "}") {
          if (brackets.empty() || brackets.back() != o[0]) fail_(p, "unexpected '" + o + "'");
          brackets.pop_back();
        }
        tokens_.push_back({Tok::Op, o, p, {}});
        p += o.size();
      }
    }
  }

  size_t lex_number(size_t p) {
    const size_t n = s_.size();
    auto digits = [&](size_t q) {
      while (q < n && (std::isdigit(static_cast<unsigned char>(s_[q])) ||
                       (s_[q] == '_' && q + 1 < n && std::isdigit(static_cast<unsigned char>(s_[q + 1])))))
        ++q;
      return q;
    };
    size_t e = digits(p);
    bool is_float = false;
    if (e + 1 < n && s_[e] == '.' && std::isdigit(static_cast<unsigned char>(s_[e + 1]))) {
      e = digits(e + 1);
      is_float = true;
    }
    if (e < n && (s_[e] == 'e' || s_[e] == 'E')) {
      size_t q = e + 1;
      if (q < n && (s_[q] == '+' || s_[q] == '-')) ++q;
      if (q < n && std::isdigit(static_cast<unsigned char>(s_[q]))) {
        e = digits(q);
        is_float = true;
      }
    }
    std::string t = s_.substr(p, e - p);
    t.erase(std::remove(t.begin(), t.end(), '_'), t.end());
    Token tok{is_float ? Tok::Float : Tok::Int, t, p, {}};
    if (is_float) {
      tok.number = std::strtod(t.c_str(), nullptr);
    } else {
      int64_t v = 0;
      auto r = std::from_chars(t.data(), t.data() + t.size(), v);
      if (r.ec != std::errc()) fail_(p, "integer literal too large");
      tok.number = v;
    }
    tokens_.push_back(std::move(tok));
    return e;
  }

  // A string literal with Python's escapes (Jinja decodes them with "unicode-escape"); unknown
  // escapes stay as written.
  size_t lex_string(size_t p) {
    const char q = s_[p];
    const size_t n = s_.size();
    std::string out;
    size_t i = p + 1;
    auto hex = [&](size_t at, int len) -> int64_t {
      if (at + len > n) return -1;
      int64_t v = 0;
      for (int k = 0; k < len; ++k) {
        const char h = s_[at + k];
        int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
      }
      return v;
    };
    while (true) {
      if (i >= n) fail_(p, "unterminated string literal");
      const char c = s_[i];
      if (c == q) break;
      if (c != '\\') {
        out += c;
        ++i;
        continue;
      }
      if (i + 1 >= n) fail_(p, "unterminated string literal");
      const char e = s_[i + 1];
      i += 2;
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'v': out += '\v'; break;
        case '\n': break;  // line continuation
        case 'x':
        case 'u':
        case 'U': {
          const int len = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          const int64_t v = hex(i, len);
          if (v < 0 || v > 0x10FFFF) fail_(i - 2, "invalid \\" + std::string(1, e) + " escape in a string literal");
          append_utf8(out, static_cast<char32_t>(v));
          i += len;
          break;
        }
        default:
          if (e >= '0' && e <= '7') {
            int v = e - '0';
            for (int k = 0; k < 2 && i < n && s_[i] >= '0' && s_[i] <= '7'; ++k, ++i) v = v * 8 + (s_[i] - '0');
            append_utf8(out, static_cast<char32_t>(v));
          } else {
            out += '\\';
            out += e;
          }
      }
    }
    tokens_.push_back({Tok::String, out, p, {}});
    return i + 1;
  }

  const std::string& s_;
  std::function<void(size_t, const std::string&)> fail_;
  std::vector<Token> tokens_;
};

}  // namespace

std::vector<Token> lex(const std::string& src, const FailAt& fail) { return Lexer(src, fail).run(); }

}  // namespace fineserve::jinja
