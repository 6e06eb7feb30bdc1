// A compact interpreter for the Jinja2 subset of Hugging Face chat templates (see chat_template.h).
// Three parts, in reading order: the lexer (template text -> tokens, applying whitespace control
// the way Jinja's lexer does with trim_blocks and lstrip_blocks), the parser (tokens -> a small
// AST, with Jinja's operator precedence), and the renderer (AST + variables -> text, with Python's
// semantics for the values: str(), ==, truthiness, slicing, json.dumps for tojson).
#include "server/chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <unordered_map>

namespace fineserve {

using Json = nlohmann::ordered_json;

namespace {

// ---- UTF-8 and Python string helpers -----------------------------------------------------------

// Python strings are sequences of code points; templates index, slice and measure them so.
std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) {  // invalid byte: keep it as one code point (U+FFFD-like)
      out.push_back(0xFFFD);
      ++i;
      continue;
    }
    char32_t cp = n == 1 ? c : c & (0x7F >> n);
    bool ok = true;
    for (int k = 1; k < n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) ok = false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if (!ok) {
      out.push_back(0xFFFD);
      ++i;
      continue;
    }
    out.push_back(cp);
    i += n;
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

std::string encode_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

// str.isspace() (what strip() and split() remove).
bool py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Case mapping is ASCII-only (role names and markers are ASCII; documented in docs/api.md).
char32_t to_upper(char32_t c) { return c >= 'a' && c <= 'z' ? c - 32 : c; }
char32_t to_lower(char32_t c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }
bool is_alpha(char32_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

std::string str_upper(std::string s) {
  for (char& c : s) if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 32);
  return s;
}
std::string str_lower(std::string s) {
  for (char& c : s) if (c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
  return s;
}

// str.strip(chars) / lstrip / rstrip; chars == nullptr: whitespace.
std::string py_strip(std::string_view s, const std::u32string* chars, bool left, bool right) {
  const std::u32string u = decode_utf8(s);
  auto drop = [&](char32_t c) { return chars ? chars->find(c) != std::u32string::npos : py_space(c); };
  size_t b = 0, e = u.size();
  if (left) while (b < e && drop(u[b])) ++b;
  if (right) while (e > b && drop(u[e - 1])) --e;
  return encode_utf8(std::u32string_view(u).substr(b, e - b));
}

// Python's repr() of a float: the shortest round-trip digits, in fixed notation for exponents in
// [-4, 16) (with at least one decimal) and scientific otherwise.
std::string py_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  std::string sign;
  if (sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  const size_t epos = sci.find('e');
  std::string digits = sci.substr(0, epos);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp = std::stoi(sci.substr(epos + 1));
  if (exp >= -4 && exp < 16) {
    std::string out;
    if (exp >= 0) {
      std::string ip = digits.substr(0, std::min<size_t>(digits.size(), exp + 1));
      while (static_cast<int>(ip.size()) < exp + 1) ip += '0';
      std::string fp = digits.size() > static_cast<size_t>(exp + 1) ? digits.substr(exp + 1) : "0";
      out = ip + "." + fp;
    } else {
      out = "0." + std::string(-exp - 1, '0') + digits;
    }
    return sign + out;
  }
  std::string m = digits.substr(0, 1);
  if (digits.size() > 1) m += "." + digits.substr(1);
  char e[16];
  std::snprintf(e, sizeof e, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
  return sign + m + e;
}

// Python's repr() of a str.
std::string py_repr_str(const std::string& s) {
  const bool has_single = s.find('\'') != std::string::npos, has_double = s.find('"') != std::string::npos;
  const char q = has_single && !has_double ? '"' : '\'';
  std::string out(1, q);
  for (char32_t c : decode_utf8(s)) {
    if (c == static_cast<char32_t>(q) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", static_cast<unsigned>(c));
      out += b;
    } else {
      append_utf8(out, c);
    }
  }
  out += q;
  return out;
}

// json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=sort_keys): what transformers'
// tojson filter returns.
void py_dumps(const Json& j, int indent, bool sort_keys, int level, int max_depth, std::string& out) {
  if (level > max_depth) throw ChatTemplateError("tojson: the value nests too deeply");
  auto newline = [&](int lv) {
    if (indent < 0) return;
    out += '\n';
    out.append(static_cast<size_t>(indent) * lv, ' ');
  };
  switch (j.type()) {
    case Json::value_t::null: out += "null"; return;
    case Json::value_t::boolean: out += j.get<bool>() ? "true" : "false"; return;
    case Json::value_t::number_integer: out += std::to_string(j.get<int64_t>()); return;
    case Json::value_t::number_unsigned: out += std::to_string(j.get<uint64_t>()); return;
    case Json::value_t::number_float: {
      const double d = j.get<double>();
      out += std::isnan(d) ? "NaN" : std::isinf(d) ? (d < 0 ? "-Infinity" : "Infinity") : py_float(d);
      return;
    }
    case Json::value_t::string: {
      out += '"';
      for (char c : j.get_ref<const std::string&>()) {
        switch (c) {
          case '"': out += "\\\""; break;
          case '\\': out += "\\\\"; break;
          case '\n': out += "\\n"; break;
          case '\r': out += "\\r"; break;
          case '\t': out += "\\t"; break;
          case '\b': out += "\\b"; break;
          case '\f': out += "\\f"; break;
          default:
            if (static_cast<unsigned char>(c) < 0x20) {
              char b[8];
              std::snprintf(b, sizeof b, "\\u%04x", static_cast<unsigned>(c));
              out += b;
            } else {
              out += c;
            }
        }
      }
      out += '"';
      return;
    }
    case Json::value_t::array: {
      if (j.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < j.size(); ++i) {
        if (i) out += indent < 0 ? ", " : ",";
        newline(level + 1);
        py_dumps(j[i], indent, sort_keys, level + 1, max_depth, out);
      }
      newline(level);
      out += ']';
      return;
    }
    case Json::value_t::object: {
      if (j.empty()) {
        out += "{}";
        return;
      }
      std::vector<const std::string*> keys;
      for (auto it = j.begin(); it != j.end(); ++it) keys.push_back(&it.key());
      if (sort_keys) std::sort(keys.begin(), keys.end(), [](auto* a, auto* b) { return *a < *b; });
      out += '{';
      bool first = true;
      for (const std::string* k : keys) {
        if (!first) out += indent < 0 ? ", " : ",";
        first = false;
        newline(level + 1);
        py_dumps(Json(*k), indent, sort_keys, level + 1, max_depth, out);
        out += ": ";
        py_dumps(j.at(*k), indent, sort_keys, level + 1, max_depth, out);
      }
      newline(level);
      out += '}';
      return;
    }
    default: throw ChatTemplateError("tojson: a value that is not JSON");
  }
}

// ---- values ------------------------------------------------------------------------------------

struct Namespace;

// A template value: JSON data (shared, so that passing `messages` around copies nothing), an
// undefined name (Jinja's Undefined: prints as "", is false, fails when used as data), a
// namespace() object (mutable and shared by reference, like the Python object), or a built-in
// function.
struct Value {
  enum class Kind : uint8_t { Data, Undefined, Namespace, Function };
  Kind kind = Kind::Undefined;
  std::shared_ptr<const Json> data;
  std::shared_ptr<Namespace> ns;
  std::string name;  // Undefined: the message for using it; Function: its name

  const Json& j() const { return *data; }
  bool is(Json::value_t t) const { return kind == Kind::Data && data->type() == t; }
  bool is_data() const { return kind == Kind::Data; }
  bool undefined() const { return kind == Kind::Undefined; }
};

struct Namespace {
  std::vector<std::pair<std::string, Value>> attrs;
  Value* find(const std::string& k) {
    for (auto& [name, v] : attrs)
      if (name == k) return &v;
    return nullptr;
  }
};

Value jv(Json j) {
  Value v;
  v.kind = Value::Kind::Data;
  v.data = std::make_shared<const Json>(std::move(j));
  return v;
}
Value undefined_value(std::string message) {
  Value v;
  v.kind = Value::Kind::Undefined;
  v.name = std::move(message);
  return v;
}
Value function_value(std::string name) {
  Value v;
  v.kind = Value::Kind::Function;
  v.name = std::move(name);
  return v;
}

const char* type_name(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return "Undefined";
    case Value::Kind::Namespace: return "Namespace";
    case Value::Kind::Function: return "function";
    case Value::Kind::Data: break;
  }
  switch (v.j().type()) {
    case Json::value_t::null: return "NoneType";
    case Json::value_t::boolean: return "bool";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return "int";
    case Json::value_t::number_float: return "float";
    case Json::value_t::string: return "str";
    case Json::value_t::array: return "list";
    case Json::value_t::object: return "dict";
    default: return "object";
  }
}

bool is_int(const Json& j) { return j.is_number_integer() || j.is_boolean(); }  // bool is an int in Python
bool is_num(const Json& j) { return j.is_number() || j.is_boolean(); }
int64_t as_int(const Json& j) {
  if (j.is_boolean()) return j.get<bool>() ? 1 : 0;
  if (j.is_number_unsigned() && j.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    throw ChatTemplateError("integer too large");
  return j.get<int64_t>();
}
double as_double(const Json& j) { return j.is_boolean() ? (j.get<bool>() ? 1.0 : 0.0) : j.get<double>(); }

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return false;
    case Value::Kind::Namespace:
    case Value::Kind::Function: return true;
    case Value::Kind::Data: break;
  }
  const Json& j = v.j();
  switch (j.type()) {
    case Json::value_t::null: return false;
    case Json::value_t::boolean: return j.get<bool>();
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return as_int(j) != 0;
    case Json::value_t::number_float: return j.get<double>() != 0.0;
    case Json::value_t::string: return !j.get_ref<const std::string&>().empty();
    default: return !j.empty();
  }
}

// Python's repr() of data (inside lists and dicts) and str() (at the top level).
void py_repr(const Json& j, std::string& out, int depth, int max_depth) {
  if (depth > max_depth) throw ChatTemplateError("a value nests too deeply to print");
  switch (j.type()) {
    case Json::value_t::null: out += "None"; return;
    case Json::value_t::boolean: out += j.get<bool>() ? "True" : "False"; return;
    case Json::value_t::number_integer: out += std::to_string(j.get<int64_t>()); return;
    case Json::value_t::number_unsigned: out += std::to_string(j.get<uint64_t>()); return;
    case Json::value_t::number_float: out += py_float(j.get<double>()); return;
    case Json::value_t::string: out += py_repr_str(j.get_ref<const std::string&>()); return;
    case Json::value_t::array:
      out += '[';
      for (size_t i = 0; i < j.size(); ++i) {
        if (i) out += ", ";
        py_repr(j[i], out, depth + 1, max_depth);
      }
      out += ']';
      return;
    case Json::value_t::object: {
      out += '{';
      bool first = true;
      for (auto it = j.begin(); it != j.end(); ++it) {
        if (!first) out += ", ";
        first = false;
        out += py_repr_str(it.key());
        out += ": ";
        py_repr(it.value(), out, depth + 1, max_depth);
      }
      out += '}';
      return;
    }
    default: out += "?"; return;
  }
}

// ---- lexer -------------------------------------------------------------------------------------

enum class Tok : uint8_t { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };

struct Token {
  Tok type;
  std::string text;  // Text: the data; Name, Op: the spelling; String: the decoded value
  size_t pos;        // byte offset in the (newline-normalized) source
  Json number;       // Int, Float
};

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

// ---- AST ---------------------------------------------------------------------------------------

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

// ---- parser ------------------------------------------------------------------------------------

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

// "line L, column C" of a byte offset.
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

}  // namespace

// ---- renderer ----------------------------------------------------------------------------------

struct ChatTemplate::Impl {
  std::string name;
  std::string source;      // as given
  std::string normalized;  // newlines normalized, one trailing newline dropped (what positions index)
  ChatTemplateLimits limits;
  std::vector<Stmt> body;
};

namespace {

using Args = std::vector<Value>;
using Kwargs = std::vector<std::pair<std::string, Value>>;

enum class Flow : uint8_t { Normal, Break, Continue };

class Renderer {
 public:
  Renderer(const ChatTemplate::Impl& t, const Json& context) : t_(t), lim_(t.limits) {
    frames_.emplace_back();
    for (const char* f : {"raise_exception", "range", "namespace", "strftime_now", "dict"})
      frames_.back()[f] = function_value(f);
    if (context.is_object())
      for (auto it = context.begin(); it != context.end(); ++it) frames_.back()[it.key()] = jv(it.value());
  }

  std::string run() {
    exec(t_.body, out_);
    return std::move(out_);
  }

 private:
  // ---- errors and budgets ----
  [[noreturn]] void fail(size_t pos, const std::string& msg) const {
    throw ChatTemplateError(t_.name + ":" + position_of(t_.normalized, pos) + ": " + msg);
  }
  void charge(size_t pos, int64_t units) {
    steps_ += units;
    if (steps_ > lim_.max_steps) fail(pos, "the chat template ran too long (more than " + std::to_string(lim_.max_steps) + " steps)");
  }
  void check_size(size_t pos, size_t bytes) {
    if (bytes > lim_.max_output_bytes)
      fail(pos, "the chat template built a value larger than " + std::to_string(lim_.max_output_bytes) + " bytes");
    charge(pos, static_cast<int64_t>(bytes / 16));
  }
  // Using an undefined value as data is an error (Jinja's default Undefined).
  const Value& need(const Value& v, size_t pos) const {
    if (v.undefined()) fail(pos, v.name);
    return v;
  }

  // ---- conversions ----
  std::string str(const Value& v, size_t pos) const {
    switch (v.kind) {
      case Value::Kind::Undefined: return "";
      case Value::Kind::Function: return "<function " + v.name + ">";
      case Value::Kind::Namespace: {
        std::string s = "<Namespace {";
        bool first = true;
        for (const auto& [k, a] : v.ns->attrs) {
          if (!first) s += ", ";
          first = false;
          s += py_repr_str(k) + ": " + (a.is_data() ? repr(a.j(), pos) : str(a, pos));
        }
        return s + "}>";
      }
      case Value::Kind::Data: break;
    }
    if (v.j().is_string()) return v.j().get<std::string>();
    return repr(v.j(), pos);
  }
  std::string repr(const Json& j, size_t pos) const {
    std::string out;
    try {
      py_repr(j, out, 0, lim_.max_depth);
    } catch (const ChatTemplateError& e) {
      fail(pos, e.what());
    }
    return out;
  }
  // The value as JSON data (for storing in lists, dicts, tojson).
  Json to_json(const Value& v, size_t pos) const {
    switch (v.kind) {
      case Value::Kind::Data: return v.j();
      case Value::Kind::Namespace: {
        Json o = Json::object();
        for (const auto& [k, a] : v.ns->attrs) o[k] = to_json(a, pos);
        return o;
      }
      case Value::Kind::Undefined: fail(pos, v.name);
      case Value::Kind::Function: fail(pos, "a function cannot be used as data");
    }
    return nullptr;
  }
  int64_t to_int(const Value& v, size_t pos, const char* what) const {
    if (!v.is_data() || !is_int(v.j())) fail(pos, std::string(what) + " must be an integer, not " + type_name(v));
    return as_int(v.j());
  }
  std::string to_string_arg(const Value& v, size_t pos, const char* what) const {
    if (!v.is(Json::value_t::string)) fail(pos, std::string(what) + " must be a string, not " + type_name(v));
    return v.j().get<std::string>();
  }

  // A value about to go one level deeper into a list or dict. Copying and printing JSON recurse
  // per level, so a template nesting [[[...]]] in a loop must stop before the stack does.
  Json nestable(Json j, size_t pos) {
    int64_t nodes = 0;
    std::function<int(const Json&, int)> depth = [&](const Json& x, int d) {
      if (d > lim_.max_depth) return d;
      int deepest = d;
      if (x.is_array() || x.is_object())
        for (const Json& c : x) {
          ++nodes;
          deepest = std::max(deepest, depth(c, d + 1));
          if (deepest > lim_.max_depth) break;
        }
      return deepest;
    };
    if (depth(j, 1) >= lim_.max_depth) fail(pos, "a value nests too deeply");
    charge(pos, nodes / 8);
    return j;
  }

  // Python ==.
  bool equal(const Value& a, const Value& b, int depth = 0) const {
    if (a.kind != b.kind) return false;
    if (a.undefined()) return true;
    if (a.kind == Value::Kind::Namespace) return a.ns == b.ns;
    if (a.kind == Value::Kind::Function) return a.name == b.name;
    return json_equal(a.j(), b.j(), depth);
  }
  bool json_equal(const Json& a, const Json& b, int depth) const {
    if (depth > lim_.max_depth) throw ChatTemplateError("comparison of values that nest too deeply");
    if (is_num(a) && is_num(b)) {
      if (a.is_number_float() || b.is_number_float()) return as_double(a) == as_double(b);
      return as_int(a) == as_int(b);
    }
    if (a.type() != b.type()) return false;
    if (a.is_array()) {
      if (a.size() != b.size()) return false;
      for (size_t i = 0; i < a.size(); ++i)
        if (!json_equal(a[i], b[i], depth + 1)) return false;
      return true;
    }
    if (a.is_object()) {
      if (a.size() != b.size()) return false;
      for (auto it = a.begin(); it != a.end(); ++it) {
        auto f = b.find(it.key());
        if (f == b.end() || !json_equal(it.value(), *f, depth + 1)) return false;
      }
      return true;
    }
    return a == b;
  }
  // Python <, for numbers, strings and lists; -1, 0, 1.
  int compare(const Json& a, const Json& b, size_t pos, int depth = 0) const {
    if (depth > lim_.max_depth) fail(pos, "comparison of values that nest too deeply");
    if (is_num(a) && is_num(b)) {
      if (a.is_number_float() || b.is_number_float()) {
        const double x = as_double(a), y = as_double(b);
        return x < y ? -1 : x > y ? 1 : 0;
      }
      const int64_t x = as_int(a), y = as_int(b);
      return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a.is_string() && b.is_string()) {
      const int c = a.get_ref<const std::string&>().compare(b.get_ref<const std::string&>());
      return c < 0 ? -1 : c > 0 ? 1 : 0;
    }
    if (a.is_array() && b.is_array()) {
      for (size_t i = 0; i < a.size() && i < b.size(); ++i)
        if (!json_equal(a[i], b[i], depth + 1)) return compare(a[i], b[i], pos, depth + 1);
      return a.size() < b.size() ? -1 : a.size() > b.size() ? 1 : 0;
    }
    fail(pos, std::string("cannot order ") + type_name(jv(a)) + " and " + type_name(jv(b)));
  }
  bool contains(const Value& container, const Value& item, size_t pos) const {
    if (container.undefined()) return false;
    if (!container.is_data()) fail(pos, std::string("'in' needs a container, not ") + type_name(container));
    const Json& c = container.j();
    if (c.is_string()) {
      if (!item.is(Json::value_t::string)) fail(pos, std::string("'in <string>' needs a string, not ") + type_name(item));
      return c.get_ref<const std::string&>().find(item.j().get_ref<const std::string&>()) != std::string::npos;
    }
    if (c.is_array()) {
      for (const Json& e : c)
        if (item.is_data() && json_equal(e, item.j(), 0)) return true;
      return false;
    }
    if (c.is_object()) return item.is(Json::value_t::string) && c.contains(item.j().get<std::string>());
    fail(pos, std::string("argument of type '") + type_name(container) + "' is not iterable");
  }

  // The items a for loop or a filter walks: list elements, dict keys, string characters.
  std::vector<Json> iterate(const Value& v, size_t pos) const {
    std::vector<Json> items;
    if (v.undefined()) return items;
    if (!v.is_data()) fail(pos, std::string("'") + type_name(v) + "' object is not iterable");
    const Json& j = v.j();
    if (j.is_array()) {
      items.assign(j.begin(), j.end());
    } else if (j.is_object()) {
      for (auto it = j.begin(); it != j.end(); ++it) items.emplace_back(it.key());
    } else if (j.is_string()) {
      for (char32_t c : decode_utf8(j.get_ref<const std::string&>())) items.emplace_back(encode_utf8(std::u32string(1, c)));
    } else {
      fail(pos, std::string("'") + type_name(v) + "' object is not iterable");
    }
    return items;
  }

  // ---- variables ----
  Value lookup(const std::string& name) const {
    for (auto f = frames_.rbegin(); f != frames_.rend(); ++f) {
      auto it = f->find(name);
      if (it != f->end()) return it->second;
    }
    return undefined_value("'" + name + "' is undefined");
  }

  // obj.name (Jinja: the attribute, else the item).
  Value getattr(const Value& obj, const std::string& name, size_t pos) const {
    need(obj, pos);
    if (obj.kind == Value::Kind::Namespace) {
      if (Value* v = obj.ns->find(name)) return *v;
      return undefined_value("'Namespace' object has no attribute '" + name + "'");
    }
    if (obj.is(Json::value_t::object)) {
      auto it = obj.j().find(name);
      if (it != obj.j().end()) return jv(*it);
    }
    return undefined_value(std::string("'") + type_name(obj) + " object' has no attribute '" + name + "'");
  }

  // obj[key].
  Value getitem(const Value& obj, const Value& key, size_t pos) const {
    need(obj, pos);
    if (obj.kind == Value::Kind::Namespace && key.is(Json::value_t::string)) return getattr(obj, key.j().get<std::string>(), pos);
    if (obj.is_data()) {
      const Json& j = obj.j();
      if (j.is_object() && key.is(Json::value_t::string)) {
        auto it = j.find(key.j().get<std::string>());
        if (it != j.end()) return jv(*it);
      } else if ((j.is_array() || j.is_string()) && key.is_data() && is_int(key.j())) {
        int64_t i = as_int(key.j());
        if (j.is_array()) {
          const auto n = static_cast<int64_t>(j.size());
          if (i < 0) i += n;
          if (i >= 0 && i < n) return jv(j[static_cast<size_t>(i)]);
        } else {
          const std::u32string u = decode_utf8(j.get_ref<const std::string&>());
          const auto n = static_cast<int64_t>(u.size());
          if (i < 0) i += n;
          if (i >= 0 && i < n) return jv(encode_utf8(std::u32string(1, u[static_cast<size_t>(i)])));
        }
      }
    }
    return undefined_value(std::string("'") + type_name(obj) + " object' has no item " +
                           (key.is_data() ? repr(key.j(), pos) : std::string("?")));
  }

  // Python's slice indices for a sequence of length n.
  std::vector<int64_t> slice_indices(int64_t n, const Value* a, const Value* b, const Value* c, size_t pos) const {
    const int64_t step = c ? to_int(*c, pos, "a slice step") : 1;
    if (step == 0) fail(pos, "slice step cannot be zero");
    auto norm = [&](const Value* v, int64_t dflt) {
      if (!v) return dflt;
      int64_t i = to_int(*v, pos, "a slice index");
      if (i < 0) i += n;
      if (step > 0) return std::clamp<int64_t>(i, 0, n);
      return std::clamp<int64_t>(i, -1, n - 1);
    };
    const int64_t start = norm(a, step > 0 ? 0 : n - 1), stop = norm(b, step > 0 ? n : -1);
    std::vector<int64_t> idx;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) idx.push_back(i);
    return idx;
  }

  // ---- statements ----
  Flow exec(const std::vector<Stmt>& body, std::string& out) {
    for (const Stmt& s : body) {
      charge(s.pos, 1);
      switch (s.k) {
        case Stmt::K::Text:
          out += s.text;
          break;
        case Stmt::K::Output:
          out += str(eval(*s.expr), s.expr->pos);
          break;
        case Stmt::K::If: {
          const std::vector<Stmt>* chosen = &s.else_body;
          for (const auto& [cond, b] : s.branches)
            if (truthy(eval(*cond))) {
              chosen = &b;
              break;
            }
          const Flow f = exec(*chosen, out);
          if (f != Flow::Normal) return f;
          break;
        }
        case Stmt::K::For:
          exec_for(s, out);
          break;
        case Stmt::K::Set:
          assign(s, eval(*s.expr));
          break;
        case Stmt::K::SetBlock: {
          std::string captured;
          const Flow f = exec(s.body, captured);
          assign(s, jv(std::move(captured)));
          if (f != Flow::Normal) return f;
          break;
        }
        case Stmt::K::Break: return Flow::Break;
        case Stmt::K::Continue: return Flow::Continue;
        case Stmt::K::Block: {
          const Flow f = exec(s.body, out);
          if (f != Flow::Normal) return f;
          break;
        }
      }
      if (out.size() > lim_.max_output_bytes)
        fail(s.pos, "the rendered prompt is larger than " + std::to_string(lim_.max_output_bytes) + " bytes");
    }
    return Flow::Normal;
  }

  void assign(const Stmt& s, Value v) {
    if (s.targets.size() == 1) {
      frames_.back()[s.targets[0]] = std::move(v);
      return;
    }
    Value obj = lookup(s.targets[0]);
    if (obj.kind != Value::Kind::Namespace)
      fail(s.pos, "cannot assign attribute '" + s.targets[1] + "' on '" + s.targets[0] + "', which is not a namespace()");
    // (A namespace inside a namespace could form a cycle; chat templates never need one.)
    if (v.kind == Value::Kind::Namespace) fail(s.pos, "a namespace attribute cannot hold a namespace");
    if (Value* a = obj.ns->find(s.targets[1])) *a = std::move(v);
    else obj.ns->attrs.emplace_back(s.targets[1], std::move(v));
  }

  void bind(const std::vector<std::string>& targets, const Json& item, size_t pos) {
    auto& f = frames_.back();
    if (targets.size() == 1) {
      f[targets[0]] = jv(item);
      return;
    }
    std::vector<Json> parts;
    if (item.is_array()) parts.assign(item.begin(), item.end());
    else if (item.is_string()) parts = iterate(jv(item), pos);
    else if (item.is_object()) parts = iterate(jv(item), pos);
    if (parts.size() != targets.size())
      fail(pos, "cannot unpack " + std::to_string(parts.size()) + " values into " + std::to_string(targets.size()) + " loop variables");
    for (size_t i = 0; i < targets.size(); ++i) f[targets[i]] = jv(std::move(parts[i]));
  }

  void exec_for(const Stmt& s, std::string& out) {
    std::vector<Json> items = iterate(eval(*s.expr), s.expr->pos);
    if (s.filter) {
      std::vector<Json> kept;
      for (Json& it : items) {
        charge(s.pos, 1);
        frames_.emplace_back();
        bind(s.targets, it, s.pos);
        const bool keep = truthy(eval(*s.filter));
        frames_.pop_back();
        if (keep) kept.push_back(std::move(it));
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      frames_.emplace_back();
      exec(s.else_body, out);
      frames_.pop_back();
      return;
    }
    const auto n = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < n; ++i) {
      charge(s.pos, 1);
      // Each iteration has its own scope: a {% set %} inside the body lasts until the iteration ends.
      frames_.emplace_back();
      bind(s.targets, items[static_cast<size_t>(i)], s.pos);
      Json loop = {{"index", i + 1}, {"index0", i},        {"revindex", n - i}, {"revindex0", n - i - 1},
                   {"first", i == 0}, {"last", i == n - 1}, {"length", n},        {"depth", 1}, {"depth0", 0}};
      if (i > 0) loop["previtem"] = items[static_cast<size_t>(i - 1)];
      if (i + 1 < n) loop["nextitem"] = items[static_cast<size_t>(i + 1)];
      frames_.back()["loop"] = jv(std::move(loop));
      const Flow f = exec(s.body, out);
      frames_.pop_back();
      if (f == Flow::Break) break;
    }
  }

  // ---- expressions ----
  Value eval(const Expr& e) {
    charge(e.pos, 1);
    switch (e.k) {
      case Expr::K::Const: return jv(e.value);
      case Expr::K::List: {
        Json a = Json::array();
        for (const ExprPtr& x : e.args) a.push_back(nestable(to_json(eval(*x), x->pos), x->pos));
        return jv(std::move(a));
      }
      case Expr::K::Dict: {
        Json o = Json::object();
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          Value k = eval(*e.args[i]);
          if (!k.is(Json::value_t::string)) fail(e.args[i]->pos, "dict keys must be strings here");
          o[k.j().get<std::string>()] = nestable(to_json(eval(*e.args[i + 1]), e.args[i + 1]->pos), e.args[i + 1]->pos);
        }
        return jv(std::move(o));
      }
      case Expr::K::Name: return lookup(e.name);
      case Expr::K::Attr: return getattr(eval(*e.args[0]), e.name, e.pos);
      case Expr::K::Item: return getitem(eval(*e.args[0]), eval(*e.args[1]), e.pos);
      case Expr::K::Slice: return eval_slice(e);
      case Expr::K::Call: return eval_call(e);
      case Expr::K::Filter: {
        Value v = eval(*e.args[0]);
        Args args;
        Kwargs kwargs;
        eval_args(e, 1, args, kwargs);
        return filter(e.name, v, args, kwargs, e.pos);
      }
      case Expr::K::Test: {
        Value v = eval(*e.args[0]);
        Args args;
        Kwargs kwargs;
        eval_args(e, 1, args, kwargs);
        return jv(test(e.name, v, args, e.pos) != e.negated);
      }
      case Expr::K::Neg:
      case Expr::K::Pos: {
        Value v = need(eval(*e.args[0]), e.pos);
        if (!v.is_data() || !is_num(v.j())) fail(e.pos, std::string("bad operand type for unary -: '") + type_name(v) + "'");
        if (e.k == Expr::K::Pos) return v.j().is_boolean() ? jv(as_int(v.j())) : v;
        if (v.j().is_number_float()) return jv(-v.j().get<double>());
        const int64_t i = as_int(v.j());
        if (i == INT64_MIN) fail(e.pos, "integer overflow");
        return jv(-i);
      }
      case Expr::K::Not: return jv(!truthy(eval(*e.args[0])));
      case Expr::K::And: {
        Value l = eval(*e.args[0]);
        return truthy(l) ? eval(*e.args[1]) : l;
      }
      case Expr::K::Or: {
        Value l = eval(*e.args[0]);
        return truthy(l) ? l : eval(*e.args[1]);
      }
      case Expr::K::Bin: return binop(e.name, eval(*e.args[0]), eval(*e.args[1]), e.pos);
      case Expr::K::Cmp: {
        Value left = eval(*e.args[0]);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value right = eval(*e.args[i + 1]);
          if (!cmp(e.ops[i], left, right, e.pos)) return jv(false);
          left = std::move(right);
        }
        return jv(true);
      }
      case Expr::K::Cond:
        if (truthy(eval(*e.args[1]))) return eval(*e.args[0]);
        if (e.args[2]) return eval(*e.args[2]);
        return undefined_value("the conditional expression had no else branch");
      case Expr::K::Concat: {
        std::string s;
        for (const ExprPtr& x : e.args) {
          s += str(eval(*x), x->pos);
          check_size(e.pos, s.size());
        }
        return jv(std::move(s));
      }
    }
    fail(e.pos, "internal: unknown expression");
  }

  void eval_args(const Expr& e, size_t first, Args& args, Kwargs& kwargs) {
    for (size_t i = first; i < e.args.size(); ++i) args.push_back(eval(*e.args[i]));
    for (const auto& [k, x] : e.kwargs) kwargs.emplace_back(k, eval(*x));
  }

  bool cmp(const std::string& op, const Value& a, const Value& b, size_t pos) const {
    if (op == "==") return equal(a, b);
    if (op == "!=") return !equal(a, b);
    if (op == "in") return contains(b, a, pos);
    if (op == "not in") return !contains(b, a, pos);
    need(a, pos);
    need(b, pos);
    if (!a.is_data() || !b.is_data()) fail(pos, std::string("cannot order ") + type_name(a) + " and " + type_name(b));
    const int c = compare(a.j(), b.j(), pos);
    if (op == "<") return c < 0;
    if (op == "<=") return c <= 0;
    if (op == ">") return c > 0;
    return c >= 0;
  }

  Value binop(const std::string& op, const Value& l, const Value& r, size_t pos) {
    need(l, pos);
    need(r, pos);
    auto bad = [&]() {
      fail(pos, "unsupported operand types for " + op + ": '" + type_name(l) + "' and '" + type_name(r) + "'");
    };
    if (!l.is_data() || !r.is_data()) bad();
    const Json &a = l.j(), &b = r.j();
    if (is_num(a) && is_num(b)) {
      const bool fl = a.is_number_float() || b.is_number_float();
      if (op == "/") {
        if (as_double(b) == 0) fail(pos, "division by zero");
        return jv(as_double(a) / as_double(b));
      }
      if (op == "**") {
        if (!fl && as_int(b) >= 0) {
          int64_t base = as_int(a), e = as_int(b), acc = 1;
          for (int64_t k = 0; k < e; ++k) {
            charge(pos, 1);
            if (__builtin_mul_overflow(acc, base, &acc)) fail(pos, "integer overflow");
            if (acc == 0 || acc == 1) break;
          }
          return jv(acc);
        }
        return jv(std::pow(as_double(a), as_double(b)));
      }
      if (fl) {
        const double x = as_double(a), y = as_double(b);
        if (op == "+") return jv(x + y);
        if (op == "-") return jv(x - y);
        if (op == "*") return jv(x * y);
        if (y == 0) fail(pos, "division by zero");
        if (op == "//") return jv(std::floor(x / y));
        if (op == "%") {
          double m = std::fmod(x, y);
          if (m != 0 && ((m < 0) != (y < 0))) m += y;
          return jv(m);
        }
      } else {
        const int64_t x = as_int(a), y = as_int(b);
        int64_t res = 0;
        if (op == "+" && !__builtin_add_overflow(x, y, &res)) return jv(res);
        if (op == "-" && !__builtin_sub_overflow(x, y, &res)) return jv(res);
        if (op == "*" && !__builtin_mul_overflow(x, y, &res)) return jv(res);
        if (op == "+" || op == "-" || op == "*") fail(pos, "integer overflow");
        if (y == 0) fail(pos, "integer division or modulo by zero");
        if (x == INT64_MIN && y == -1) fail(pos, "integer overflow");
        int64_t q = x / y, m = x % y;
        if (m != 0 && ((m < 0) != (y < 0))) {  // Python floors
          q -= 1;
          m += y;
        }
        return jv(op == "//" ? q : m);
      }
    }
    if (op == "+") {
      if (a.is_string() && b.is_string()) {
        check_size(pos, a.get_ref<const std::string&>().size() + b.get_ref<const std::string&>().size());
        return jv(a.get<std::string>() + b.get<std::string>());
      }
      if (a.is_array() && b.is_array()) {
        check_size(pos, (a.size() + b.size()) * 16);
        Json c = a;
        for (const Json& x : b) c.push_back(x);
        return jv(std::move(c));
      }
    }
    if (op == "*" && (((a.is_string() || a.is_array()) && is_int(b)) || ((b.is_string() || b.is_array()) && is_int(a)))) {
      const Json& seq = a.is_string() || a.is_array() ? a : b;
      const int64_t times = std::max<int64_t>(0, as_int(a.is_string() || a.is_array() ? b : a));
      const size_t unit = seq.is_string() ? seq.get_ref<const std::string&>().size() : seq.size() * 16;
      if (unit > 0 && static_cast<uint64_t>(times) > lim_.max_output_bytes / unit + 1) check_size(pos, lim_.max_output_bytes + 1);
      check_size(pos, unit * static_cast<size_t>(times));
      if (seq.is_string()) {
        std::string s;
        for (int64_t k = 0; k < times; ++k) s += seq.get_ref<const std::string&>();
        return jv(std::move(s));
      }
      Json c = Json::array();
      for (int64_t k = 0; k < times; ++k)
        for (const Json& x : seq) c.push_back(x);
      return jv(std::move(c));
    }
    bad();
    return {};
  }

  Value eval_slice(const Expr& e) {
    Value obj = need(eval(*e.args[0]), e.pos);
    std::optional<Value> a, b, c;
    if (e.args[1]) a = eval(*e.args[1]);
    if (e.args[2]) b = eval(*e.args[2]);
    if (e.args[3]) c = eval(*e.args[3]);
    auto opt = [](std::optional<Value>& v) -> const Value* { return v && !(v->is(Json::value_t::null)) ? &*v : nullptr; };
    if (obj.is(Json::value_t::array)) {
      const Json& j = obj.j();
      Json out = Json::array();
      for (int64_t i : slice_indices(static_cast<int64_t>(j.size()), opt(a), opt(b), opt(c), e.pos)) out.push_back(j[static_cast<size_t>(i)]);
      return jv(std::move(out));
    }
    if (obj.is(Json::value_t::string)) {
      const std::u32string u = decode_utf8(obj.j().get_ref<const std::string&>());
      std::u32string out;
      for (int64_t i : slice_indices(static_cast<int64_t>(u.size()), opt(a), opt(b), opt(c), e.pos)) out += u[static_cast<size_t>(i)];
      return jv(encode_utf8(out));
    }
    fail(e.pos, std::string("'") + type_name(obj) + "' object cannot be sliced");
  }

  // ---- calls: built-in functions and methods ----
  Value eval_call(const Expr& e) {
    const Expr& callee = *e.args[0];
    Args args;
    Kwargs kwargs;
    if (callee.k == Expr::K::Attr) {
      Value obj = eval(*callee.args[0]);
      eval_args(e, 1, args, kwargs);
      if (obj.is_data() && (obj.j().is_string() || obj.j().is_object()))
        return method(obj, callee.name, args, kwargs, e.pos);
      Value f = getattr(obj, callee.name, e.pos);
      if (f.kind != Value::Kind::Function) fail(e.pos, std::string("'") + type_name(obj) + "' object has no method '" + callee.name + "'");
      return call_function(f.name, args, kwargs, e.pos);
    }
    Value f = eval(callee);
    eval_args(e, 1, args, kwargs);
    if (f.kind != Value::Kind::Function) {
      need(f, e.pos);
      fail(e.pos, std::string("'") + type_name(f) + "' object is not callable");
    }
    return call_function(f.name, args, kwargs, e.pos);
  }

  static const Value* kwarg(const Kwargs& kw, const char* name) {
    for (const auto& [k, v] : kw)
      if (k == name) return &v;
    return nullptr;
  }
  // Positional argument i, else keyword `name`, else nullptr.
  static const Value* arg(const Args& a, const Kwargs& kw, size_t i, const char* name) {
    return i < a.size() ? &a[i] : kwarg(kw, name);
  }

  Value call_function(const std::string& name, const Args& args, const Kwargs& kwargs, size_t pos) {
    if (name == "raise_exception") {
      const std::string msg = args.empty() ? "the chat template raised an error" : str(args[0], pos);
      throw ChatTemplateError(msg);
    }
    if (name == "range") {
      if (args.empty() || args.size() > 3) fail(pos, "range expects 1 to 3 integers");
      int64_t start = 0, stop, step = 1;
      if (args.size() == 1) {
        stop = to_int(args[0], pos, "range()'s argument");
      } else {
        start = to_int(args[0], pos, "range()'s argument");
        stop = to_int(args[1], pos, "range()'s argument");
        if (args.size() == 3) step = to_int(args[2], pos, "range()'s argument");
      }
      if (step == 0) fail(pos, "range() step must not be zero");
      Json out = Json::array();
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        charge(pos, 1);
        check_size(pos, out.size() * 16);
        out.push_back(i);
      }
      return jv(std::move(out));
    }
    if (name == "namespace" || name == "dict") {
      auto ns = std::make_shared<Namespace>();
      for (const Value& a : args) {  // namespace({'a': 1}) also works
        if (!a.is(Json::value_t::object)) fail(pos, name + "() takes keyword arguments or a dict");
        for (auto it = a.j().begin(); it != a.j().end(); ++it) ns->attrs.emplace_back(it.key(), jv(it.value()));
      }
      for (const auto& [k, v] : kwargs) {
        if (v.kind == Value::Kind::Namespace) fail(pos, "a namespace attribute cannot hold a namespace");
        if (Value* old = ns->find(k)) *old = v;
        else ns->attrs.emplace_back(k, v);
      }
      if (name == "dict") {
        Json o = Json::object();
        for (const auto& [k, v] : ns->attrs) o[k] = nestable(to_json(v, pos), pos);
        return jv(std::move(o));
      }
      Value v;
      v.kind = Value::Kind::Namespace;
      v.ns = std::move(ns);
      return v;
    }
    if (name == "strftime_now") {
      const std::string fmt = args.empty() ? std::string("%Y-%m-%d") : to_string_arg(args[0], pos, "strftime_now()'s format");
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"  // the template chooses the format, as in Python
      const size_t n = fmt.size() < 128 ? std::strftime(buf, sizeof buf, fmt.c_str(), &tm) : 0;
#pragma GCC diagnostic pop
      return jv(std::string(buf, n));
    }
    fail(pos, "'" + name + "' is not callable");
  }

  Value method(const Value& obj, const std::string& name, const Args& args, const Kwargs& kwargs, size_t pos) {
    const Json& j = obj.j();
    if (j.is_object()) {
      if (name == "items" || name == "keys" || name == "values") {
        Json out = Json::array();
        for (auto it = j.begin(); it != j.end(); ++it) {
          if (name == "items") out.push_back(Json::array({it.key(), it.value()}));
          else if (name == "keys") out.push_back(it.key());
          else out.push_back(it.value());
        }
        return jv(std::move(out));
      }
      if (name == "get") {
        if (args.empty()) fail(pos, "get() needs a key");
        if (args[0].is(Json::value_t::string)) {
          auto it = j.find(args[0].j().get<std::string>());
          if (it != j.end()) return jv(*it);
        }
        return args.size() > 1 ? args[1] : jv(nullptr);
      }
      fail(pos, "'dict' object has no method '" + name + "'");
    }
    const std::string& s = j.get_ref<const std::string&>();
    auto chars_arg = [&](size_t i) -> std::optional<std::u32string> {
      const Value* c = arg(args, kwargs, i, "chars");
      if (!c || c->is(Json::value_t::null)) return std::nullopt;
      return decode_utf8(to_string_arg(*c, pos, "the characters to strip"));
    };
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      auto chars = chars_arg(0);
      return jv(py_strip(s, chars ? &*chars : nullptr, name != "rstrip", name != "lstrip"));
    }
    if (name == "upper") return jv(str_upper(s));
    if (name == "lower") return jv(str_lower(s));
    if (name == "capitalize") return jv(capitalize(s));
    if (name == "title") {
      std::u32string u = decode_utf8(s);
      bool prev_cased = false;
      for (char32_t& c : u) {
        c = prev_cased ? to_lower(c) : to_upper(c);
        prev_cased = is_alpha(c);
      }
      return jv(encode_utf8(u));
    }
    if (name == "startswith" || name == "endswith") {
      const Value* p = arg(args, kwargs, 0, "prefix");
      if (!p) fail(pos, name + "() needs an argument");
      std::vector<std::string> cands;
      if (p->is(Json::value_t::array)) {
        for (const Json& x : p->j()) cands.push_back(to_string_arg(jv(x), pos, "a prefix"));
      } else {
        cands.push_back(to_string_arg(*p, pos, "a prefix"));
      }
      for (const std::string& c : cands) {
        if (c.size() > s.size()) continue;
        if (name == "startswith" ? s.compare(0, c.size(), c) == 0 : s.compare(s.size() - c.size(), c.size(), c) == 0)
          return jv(true);
      }
      return jv(false);
    }
    if (name == "split" || name == "rsplit") {
      const Value* sep = arg(args, kwargs, 0, "sep");
      const Value* maxv = arg(args, kwargs, 1, "maxsplit");
      const int64_t maxsplit = maxv ? to_int(*maxv, pos, "maxsplit") : -1;
      Json out = Json::array();
      if (!sep || sep->is(Json::value_t::null)) {
        if (name == "rsplit" && maxsplit >= 0) fail(pos, "rsplit() with a limit is not supported");
        const std::u32string u = decode_utf8(s);
        size_t i = 0;
        int64_t done = 0;
        while (true) {
          while (i < u.size() && py_space(u[i])) ++i;
          if (i >= u.size()) break;
          if (maxsplit >= 0 && done == maxsplit) {
            size_t e = u.size();
            while (e > i && py_space(u[e - 1])) --e;
            out.push_back(encode_utf8(u.substr(i, e - i)));
            break;
          }
          size_t e = i;
          while (e < u.size() && !py_space(u[e])) ++e;
          out.push_back(encode_utf8(u.substr(i, e - i)));
          ++done;
          i = e;
        }
        return jv(std::move(out));
      }
      const std::string d = to_string_arg(*sep, pos, "the separator");
      if (d.empty()) fail(pos, "empty separator");
      std::vector<std::string> parts;
      if (name == "split") {
        size_t start = 0;
        int64_t done = 0;
        while (true) {
          const size_t f = maxsplit >= 0 && done == maxsplit ? std::string::npos : s.find(d, start);
          if (f == std::string::npos) {
            parts.push_back(s.substr(start));
            break;
          }
          parts.push_back(s.substr(start, f - start));
          start = f + d.size();
          ++done;
        }
      } else {
        size_t end = s.size();
        int64_t done = 0;
        while (true) {
          const size_t f = (maxsplit >= 0 && done == maxsplit) || end < d.size() ? std::string::npos : s.rfind(d, end - d.size());
          if (f == std::string::npos) {
            parts.insert(parts.begin(), s.substr(0, end));
            break;
          }
          parts.insert(parts.begin(), s.substr(f + d.size(), end - f - d.size()));
          end = f;
          ++done;
        }
      }
      for (std::string& p : parts) out.push_back(std::move(p));
      return jv(std::move(out));
    }
    if (name == "replace") {
      if (args.size() < 2) fail(pos, "replace() needs two arguments");
      const int64_t count = args.size() > 2 ? to_int(args[2], pos, "replace()'s count") : -1;
      return jv(replace(s, to_string_arg(args[0], pos, "replace()'s argument"), to_string_arg(args[1], pos, "replace()'s argument"), count, pos));
    }
    if (name == "find" || name == "count") {
      if (args.empty()) fail(pos, name + "() needs an argument");
      const std::string sub = to_string_arg(args[0], pos, "the substring");
      if (name == "find") {
        const size_t f = s.find(sub);
        return jv(f == std::string::npos ? int64_t{-1} : static_cast<int64_t>(decode_utf8(s.substr(0, f)).size()));
      }
      if (sub.empty()) return jv(static_cast<int64_t>(decode_utf8(s).size() + 1));
      int64_t n = 0;
      for (size_t f = s.find(sub); f != std::string::npos; f = s.find(sub, f + sub.size())) ++n;
      return jv(n);
    }
    if (name == "join") {
      if (args.empty()) fail(pos, "join() needs an argument");
      std::string out;
      bool first = true;
      for (const Json& x : iterate(args[0], pos)) {
        if (!first) out += s;
        first = false;
        out += to_string_arg(jv(x), pos, "join()'s items");
        check_size(pos, out.size());
      }
      return jv(std::move(out));
    }
    if (name == "isdigit" || name == "isalpha" || name == "isspace" || name == "islower" || name == "isupper") {
      if (s.empty()) return jv(false);
      bool ok = true, cased = false;
      for (char32_t c : decode_utf8(s)) {
        if (name == "isdigit") ok = ok && c >= '0' && c <= '9';
        else if (name == "isalpha") ok = ok && is_alpha(c);
        else if (name == "isspace") ok = ok && py_space(c);
        else if (name == "islower") { ok = ok && !(c >= 'A' && c <= 'Z'); cased = cased || (c >= 'a' && c <= 'z'); }
        else { ok = ok && !(c >= 'a' && c <= 'z'); cased = cased || (c >= 'A' && c <= 'Z'); }
      }
      return jv(ok && (name == "islower" || name == "isupper" ? cased : true));
    }
    fail(pos, "'str' object has no method '" + name + "'");
  }

  static std::string capitalize(const std::string& s) {
    std::u32string u = decode_utf8(s);
    for (size_t i = 0; i < u.size(); ++i) u[i] = i == 0 ? to_upper(u[i]) : to_lower(u[i]);
    return encode_utf8(u);
  }

  std::string replace(const std::string& s, const std::string& from, const std::string& to, int64_t count, size_t pos) {
    std::string out;
    int64_t done = 0;
    if (from.empty()) {  // Python inserts `to` around every character
      const std::u32string u = decode_utf8(s);
      for (size_t i = 0; i <= u.size(); ++i) {
        if (count < 0 || done < count) {
          out += to;
          ++done;
        }
        if (i < u.size()) append_utf8(out, u[i]);
        check_size(pos, out.size());
      }
      return out;
    }
    size_t start = 0;
    while (true) {
      const size_t f = count >= 0 && done >= count ? std::string::npos : s.find(from, start);
      if (f == std::string::npos) break;
      out.append(s, start, f - start);
      out += to;
      start = f + from.size();
      ++done;
      check_size(pos, out.size());
    }
    out.append(s, start);
    check_size(pos, out.size());
    return out;
  }

  // ---- tests ----
  bool test(const std::string& name, const Value& v, const Args& args, size_t pos) {
    auto need_arg = [&]() -> const Value& {
      if (args.empty()) fail(pos, "the test '" + name + "' needs an argument");
      return args[0];
    };
    const bool d = v.is_data();
    if (name == "defined") return !v.undefined();
    if (name == "undefined") return v.undefined();
    if (name == "none") return v.is(Json::value_t::null);
    if (name == "string") return v.is(Json::value_t::string);
    if (name == "number") return d && is_num(v.j());
    if (name == "integer") return d && v.j().is_number_integer();
    if (name == "float") return v.is(Json::value_t::number_float);
    if (name == "boolean") return v.is(Json::value_t::boolean);
    if (name == "true") return v.is(Json::value_t::boolean) && v.j().get<bool>();
    if (name == "false") return v.is(Json::value_t::boolean) && !v.j().get<bool>();
    if (name == "mapping") return v.is(Json::value_t::object);
    if (name == "iterable" || name == "sequence")
      return v.undefined() || (d && (v.j().is_string() || v.j().is_array() || v.j().is_object()));
    if (name == "callable") return v.kind == Value::Kind::Function;
    if (name == "escaped") return false;
    if (name == "lower" || name == "upper") {
      if (!v.is(Json::value_t::string)) return false;
      const std::string& s = v.j().get_ref<const std::string&>();
      return s == (name == "lower" ? str_lower(s) : str_upper(s));
    }
    if (name == "odd" || name == "even" || name == "divisibleby") {
      const int64_t i = to_int(v, pos, "the tested value");
      if (name == "odd") return ((i % 2) + 2) % 2 == 1;
      if (name == "even") return i % 2 == 0;
      const int64_t by = to_int(need_arg(), pos, "divisibleby's argument");
      if (by == 0) fail(pos, "division by zero");
      return i % by == 0;
    }
    if (name == "equalto" || name == "eq" || name == "==") return equal(v, need_arg());
    if (name == "ne" || name == "!=") return !equal(v, need_arg());
    if (name == "sameas") {  // identity: meaningful for none, true and false
      const Value& o = need_arg();
      if (v.kind == Value::Kind::Namespace) return o.kind == v.kind && v.ns == o.ns;
      return d && o.is_data() && v.j().type() == o.j().type() && (v.j().is_null() || v.j().is_boolean()) && v.j() == o.j();
    }
    if (name == "in") return contains(need_arg(), v, pos);
    static const std::map<std::string, std::string> order = {{"lt", "<"}, {"lessthan", "<"}, {"<", "<"},
                                                             {"le", "<="}, {"<=", "<="}, {"gt", ">"},
                                                             {"greaterthan", ">"}, {">", ">"}, {"ge", ">="}, {">=", ">="}};
    auto it = order.find(name);
    if (it != order.end()) return cmp(it->second, v, need_arg(), pos);
    fail(pos, "no test named '" + name + "'");
  }

  // ---- filters ----
  // An attribute path ("a.b") of an item, as Jinja's make_attrgetter reads it.
  Value attr_path(const Json& item, const std::string& path, size_t pos) const {
    Value v = jv(item);
    size_t start = 0;
    while (true) {
      const size_t dot = path.find('.', start);
      const std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      if (v.undefined()) return v;
      const bool digits = !part.empty() && part.size() < 18 && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
      v = digits ? getitem(v, jv(std::stoll(part)), pos) : getattr(v, part, pos);
      if (dot == std::string::npos) return v;
      start = dot + 1;
    }
  }

  Value filter(const std::string& name, const Value& v, const Args& args, const Kwargs& kwargs, size_t pos) {
    auto s = [&]() { return str(v, pos); };
    if (name == "safe") return v;
    if (name == "trim") {
      const Value* c = arg(args, kwargs, 0, "chars");
      std::optional<std::u32string> chars;
      if (c && !c->is(Json::value_t::null)) chars = decode_utf8(to_string_arg(*c, pos, "trim's characters"));
      return jv(py_strip(s(), chars ? &*chars : nullptr, true, true));
    }
    if (name == "upper") return jv(str_upper(s()));
    if (name == "lower") return jv(str_lower(s()));
    if (name == "capitalize") return jv(capitalize(s()));
    if (name == "title") {  // Jinja's do_title: a capital after -, whitespace and opening brackets
      std::u32string u = decode_utf8(s());
      bool start = true;
      for (char32_t& c : u) {
        const bool delim = c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || py_space(c);
        c = delim ? c : start ? to_upper(c) : to_lower(c);
        start = delim;
      }
      return jv(encode_utf8(u));
    }
    if (name == "string") return jv(s());
    if (name == "length" || name == "count") {
      if (v.undefined()) return jv(0);
      if (v.kind == Value::Kind::Namespace) return jv(static_cast<int64_t>(v.ns->attrs.size()));
      if (!v.is_data() || !(v.j().is_string() || v.j().is_array() || v.j().is_object()))
        fail(pos, std::string("object of type '") + type_name(v) + "' has no len()");
      if (v.j().is_string()) return jv(static_cast<int64_t>(decode_utf8(v.j().get_ref<const std::string&>()).size()));
      return jv(static_cast<int64_t>(v.j().size()));
    }
    if (name == "wordcount") {
      int64_t n = 0;
      bool in_word = false;
      for (char32_t c : decode_utf8(s())) {
        const bool w = (c >= '0' && c <= '9') || is_alpha(c) || c == '_' || c > 0x7F;
        if (w && !in_word) ++n;
        in_word = w;
      }
      return jv(n);
    }
    if (name == "tojson") {
      const Value* ind = arg(args, kwargs, 0, "indent");
      const Value* sk = kwarg(kwargs, "sort_keys");
      const int indent = ind && !ind->is(Json::value_t::null) ? static_cast<int>(std::clamp<int64_t>(to_int(*ind, pos, "tojson's indent"), 0, 64)) : -1;
      std::string out;
      try {
        py_dumps(to_json(v, pos), indent, sk && truthy(*sk), 0, lim_.max_depth, out);
      } catch (const ChatTemplateError& e) {
        fail(pos, e.what());
      }
      check_size(pos, out.size());
      return jv(std::move(out));
    }
    if (name == "default" || name == "d") {
      const Value* dflt = arg(args, kwargs, 0, "default_value");
      const Value* boolean = arg(args, kwargs, 1, "boolean");
      const bool use = v.undefined() || (boolean && truthy(*boolean) && !truthy(v));
      return use ? (dflt ? *dflt : jv(std::string())) : v;
    }
    if (name == "first" || name == "last") {
      std::vector<Json> items = iterate(v, pos);
      if (items.empty()) return undefined_value("'" + name + "' of an empty sequence");
      return jv(name == "first" ? items.front() : items.back());
    }
    if (name == "list") return jv(Json(iterate(v, pos)));
    if (name == "reverse") {
      if (v.is(Json::value_t::string)) {
        std::u32string u = decode_utf8(v.j().get_ref<const std::string&>());
        std::reverse(u.begin(), u.end());
        return jv(encode_utf8(u));
      }
      std::vector<Json> items = iterate(v, pos);
      std::reverse(items.begin(), items.end());
      return jv(Json(std::move(items)));
    }
    if (name == "join") {
      const Value* sep = arg(args, kwargs, 0, "d");
      const Value* attribute = arg(args, kwargs, 1, "attribute");
      const std::string d = sep ? str(*sep, pos) : "";
      std::string out;
      bool first = true;
      for (const Json& x : iterate(v, pos)) {
        if (!first) out += d;
        first = false;
        out += attribute ? str(attr_path(x, str(*attribute, pos), pos), pos) : str(jv(x), pos);
        check_size(pos, out.size());
      }
      return jv(std::move(out));
    }
    if (name == "replace") {
      if (args.size() < 2) fail(pos, "replace needs two arguments");
      const int64_t count = args.size() > 2 ? to_int(args[2], pos, "replace's count") : -1;
      return jv(replace(s(), str(args[0], pos), str(args[1], pos), count, pos));
    }
    if (name == "items") {
      if (v.undefined()) return jv(Json::array());
      if (!v.is(Json::value_t::object)) fail(pos, "items needs a mapping");
      Json out = Json::array();
      for (auto it = v.j().begin(); it != v.j().end(); ++it) out.push_back(Json::array({it.key(), it.value()}));
      return jv(std::move(out));
    }
    if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
      const bool by_attr = name == "selectattr" || name == "rejectattr";
      const bool keep_if = name == "selectattr" || name == "select";
      size_t i = 0;
      std::string attr;
      if (by_attr) {
        if (args.empty()) fail(pos, name + " needs an attribute name");
        attr = str(args[i++], pos);
      }
      std::string test_name;
      if (i < args.size()) {
        test_name = str(args[i++], pos);
        if (!known_tests().count(test_name)) fail(pos, "no test named '" + test_name + "'");
      }
      const Args test_args(args.begin() + static_cast<std::ptrdiff_t>(i), args.end());
      Json out = Json::array();
      for (const Json& x : iterate(v, pos)) {
        charge(pos, 1);
        Value subject = by_attr ? attr_path(x, attr, pos) : jv(x);
        const bool ok = test_name.empty() ? truthy(subject) : test(test_name, subject, test_args, pos);
        if (ok == keep_if) out.push_back(x);
      }
      return jv(std::move(out));
    }
    if (name == "map") {
      Json out = Json::array();
      if (const Value* attribute = kwarg(kwargs, "attribute")) {
        const Value* dflt = kwarg(kwargs, "default");
        for (const Json& x : iterate(v, pos)) {
          Value a = attr_path(x, str(*attribute, pos), pos);
          if (a.undefined() && dflt) a = *dflt;
          out.push_back(to_json(a, pos));
        }
        return jv(std::move(out));
      }
      if (args.empty()) fail(pos, "map needs a filter name or attribute=");
      const std::string f = str(args[0], pos);
      if (!known_filters().count(f) || f == "map") fail(pos, "no filter named '" + f + "'");
      const Args rest(args.begin() + 1, args.end());
      for (const Json& x : iterate(v, pos)) {
        charge(pos, 1);
        out.push_back(to_json(filter(f, jv(x), rest, kwargs, pos), pos));
      }
      return jv(std::move(out));
    }
    if (name == "unique") {
      Json out = Json::array();
      for (const Json& x : iterate(v, pos)) {
        charge(pos, static_cast<int64_t>(out.size()));
        bool seen = false;
        for (const Json& y : out) seen = seen || json_equal(x, y, 0);
        if (!seen) out.push_back(x);
      }
      return jv(std::move(out));
    }
    if (name == "sort" || name == "min" || name == "max") {
      std::vector<Json> items = iterate(v, pos);
      const Value* attribute = kwarg(kwargs, "attribute");
      const Value* rev = name == "sort" ? arg(args, kwargs, 0, "reverse") : nullptr;
      auto key = [&](const Json& x) { return attribute ? to_json(attr_path(x, str(*attribute, pos), pos), pos) : x; };
      charge(pos, static_cast<int64_t>(items.size()) * 8);
      std::stable_sort(items.begin(), items.end(), [&](const Json& a, const Json& b) { return compare(key(a), key(b), pos) < 0; });
      if (name == "min") return items.empty() ? undefined_value("min of an empty sequence") : jv(items.front());
      if (name == "max") return items.empty() ? undefined_value("max of an empty sequence") : jv(items.back());
      if (rev && truthy(*rev)) std::reverse(items.begin(), items.end());
      return jv(Json(std::move(items)));
    }
    if (name == "sum") {
      Value total = kwarg(kwargs, "start") ? *kwarg(kwargs, "start") : jv(0);
      const Value* attribute = arg(args, kwargs, 0, "attribute");
      for (const Json& x : iterate(v, pos)) total = binop("+", total, attribute ? attr_path(x, str(*attribute, pos), pos) : jv(x), pos);
      return total;
    }
    if (name == "int" || name == "float") {
      const Value* dflt = arg(args, kwargs, 0, "default");
      const bool to_float = name == "float";
      Json r;
      if (v.is_data() && is_num(v.j())) {
        r = to_float ? Json(as_double(v.j())) : v.j().is_number_float() ? Json(static_cast<int64_t>(std::trunc(v.j().get<double>()))) : Json(as_int(v.j()));
      } else if (v.is(Json::value_t::string)) {
        const std::string t = py_strip(v.j().get_ref<const std::string&>(), nullptr, true, true);
        char* end = nullptr;
        if (to_float) {
          const double dv = std::strtod(t.c_str(), &end);
          if (!t.empty() && end == t.c_str() + t.size()) r = dv;
        } else {
          int64_t iv = 0;
          auto res = std::from_chars(t.data(), t.data() + t.size(), iv);
          if (!t.empty() && res.ec == std::errc() && res.ptr == t.data() + t.size()) r = iv;
          else {
            const double dv = std::strtod(t.c_str(), &end);
            if (!t.empty() && end == t.c_str() + t.size() && std::isfinite(dv) && std::fabs(dv) < 9e18) r = static_cast<int64_t>(std::trunc(dv));
          }
        }
      }
      if (r.is_null()) return dflt ? *dflt : to_float ? jv(0.0) : jv(0);
      return jv(std::move(r));
    }
    if (name == "abs") {
      need(v, pos);
      if (!v.is_data() || !is_num(v.j())) fail(pos, std::string("bad operand type for abs(): '") + type_name(v) + "'");
      if (v.j().is_number_float()) return jv(std::fabs(v.j().get<double>()));
      const int64_t i = as_int(v.j());
      if (i == INT64_MIN) fail(pos, "integer overflow");
      return jv(i < 0 ? -i : i);
    }
    if (name == "round") {
      need(v, pos);
      if (!v.is_data() || !is_num(v.j())) fail(pos, "round needs a number");
      const Value* prec = arg(args, kwargs, 0, "precision");
      const int64_t p = prec ? std::clamp<int64_t>(to_int(*prec, pos, "round's precision"), -20, 20) : 0;
      const double scale = std::pow(10.0, static_cast<double>(p));
      return jv(std::nearbyint(as_double(v.j()) * scale) / scale);  // half to even, as Python's round()
    }
    if (name == "indent") {
      const Value* w = arg(args, kwargs, 0, "width");
      const Value* first = arg(args, kwargs, 1, "first");
      const Value* blank = arg(args, kwargs, 2, "blank");
      std::string pad = "    ";
      if (w) pad = w->is(Json::value_t::string) ? w->j().get<std::string>() : std::string(static_cast<size_t>(std::clamp<int64_t>(to_int(*w, pos, "indent's width"), 0, 1024)), ' ');
      const std::string text = s();
      std::vector<std::string> lines;
      size_t start = 0;
      while (true) {
        const size_t nl = text.find('\n', start);
        lines.push_back(text.substr(start, nl == std::string::npos ? std::string::npos : nl - start));
        if (nl == std::string::npos) break;
        start = nl + 1;
      }
      std::string out;
      for (size_t i = 0; i < lines.size(); ++i) {
        if (i) out += '\n';
        const bool indent_it = (i > 0 || (first && truthy(*first))) && (!lines[i].empty() || (blank && truthy(*blank)));
        if (indent_it) out += pad;
        out += lines[i];
        check_size(pos, out.size());
      }
      return jv(std::move(out));
    }
    if (name == "escape" || name == "e") {
      std::string out;
      for (char c : s()) {
        switch (c) {
          case '&': out += "&amp;"; break;
          case '<': out += "&lt;"; break;
          case '>': out += "&gt;"; break;
          case '"': out += "&#34;"; break;
          case '\'': out += "&#39;"; break;
          default: out += c;
        }
      }
      return jv(std::move(out));
    }
    fail(pos, "no filter named '" + name + "'");
  }

  const ChatTemplate::Impl& t_;
  const ChatTemplateLimits& lim_;
  std::vector<std::unordered_map<std::string, Value>> frames_;
  std::string out_;
  int64_t steps_ = 0;
};

}  // namespace

// ---- ChatTemplate ------------------------------------------------------------------------------

ChatTemplate::ChatTemplate(const std::string& source, std::string name, ChatTemplateLimits limits)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.name = std::move(name);
  m.source = source;
  m.limits = limits;
  // As Jinja: \r\n and \r become \n, and one trailing newline is dropped (keep_trailing_newline off).
  m.normalized.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      m.normalized += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      m.normalized += source[i];
    }
  }
  if (!m.normalized.empty() && m.normalized.back() == '\n') m.normalized.pop_back();
  auto fail = [&m](size_t pos, const std::string& msg) {
    throw Error(m.name + ":" + position_of(m.normalized, pos) + ": " + msg);
  };
  Lexer lexer(m.normalized, fail);
  Parser parser(lexer.run(), m.limits.max_depth, fail);
  m.body = parser.parse();
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::string ChatTemplate::render(const nlohmann::ordered_json& context) const {
  Renderer r(*impl_, context);
  return r.run();
}

const std::string& ChatTemplate::source() const { return impl_->source; }

// ---- ChatFormat --------------------------------------------------------------------------------

ChatFormat ChatFormat::chatml() {
  ChatFormat f;
  f.origin = "chatml (built-in default)";
  f.stop = {"<|im_end|>"};
  return f;
}

std::string ChatFormat::render(const nlohmann::ordered_json& messages, bool add_generation_prompt) const {
  if (!tmpl) {
    std::string out;
    for (const Json& m : messages)
      out += "<|im_start|>" + m.value("role", std::string()) + "\n" + m.value("content", std::string()) + "<|im_end|>\n";
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
  }
  Json ctx = special_tokens.is_object() ? special_tokens : Json::object();
  ctx["messages"] = messages;
  ctx["add_generation_prompt"] = add_generation_prompt;
  ctx["tools"] = nullptr;
  ctx["documents"] = nullptr;
  return tmpl->render(ctx);
}

ChatFormat make_chat_format(const std::string& source, const std::string& origin, nlohmann::ordered_json special_tokens) {
  ChatFormat f;
  f.tmpl = std::make_shared<const ChatTemplate>(source, origin);
  f.origin = origin;
  f.special_tokens = std::move(special_tokens);
  // The model's end of turn: generation stops at the tokenizer's EOS token (the engine's rule), and
  // at the end-of-turn markers of the well-known template families when the template writes them
  // (their generation_config.json lists them as EOS ids too).
  for (const char* marker : {"<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"})
    if (source.find(marker) != std::string::npos) f.stop.emplace_back(marker);
  return f;
}

namespace {

std::string read_text_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw Error("cannot read " + p.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A special token as tokenizer_config.json writes it: "<s>" or {"content": "<s>", ...}.
std::optional<std::string> token_text(const Json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

ChatFormat load_chat_format(const std::filesystem::path& dir, const std::string& override_file) {
  Json tc = Json::object();
  if (std::filesystem::exists(dir / "tokenizer_config.json")) {
    tc = Json::parse(read_text_file(dir / "tokenizer_config.json"), nullptr, /*allow_exceptions=*/false);
    if (!tc.is_object()) throw Error((dir / "tokenizer_config.json").string() + " is not a JSON object");
  }
  // transformers passes every named special token it knows to the template.
  Json special = Json::object();
  Json stm = Json::object();
  if (std::filesystem::exists(dir / "special_tokens_map.json"))
    stm = Json::parse(read_text_file(dir / "special_tokens_map.json"), nullptr, false);
  for (const char* k : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
    std::optional<std::string> t;
    if (tc.contains(k)) t = token_text(tc[k]);
    if (!t && stm.is_object() && stm.contains(k)) t = token_text(stm[k]);
    if (t) special[k] = *t;
  }

  if (!override_file.empty()) return make_chat_format(read_text_file(override_file), override_file, special);
  if (std::filesystem::exists(dir / "chat_template.jinja"))
    return make_chat_format(read_text_file(dir / "chat_template.jinja"), "chat_template.jinja", special);
  if (tc.contains("chat_template")) {
    const Json& ct = tc["chat_template"];
    const std::string where = "tokenizer_config.json chat_template";
    if (ct.is_string()) return make_chat_format(ct.get<std::string>(), where, special);
    if (ct.is_array()) {
      for (const Json& entry : ct)
        if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") && entry["template"].is_string())
          return make_chat_format(entry["template"].get<std::string>(), where + " 'default'", special);
      throw Error((dir / "tokenizer_config.json").string() +
                  ": chat_template lists several templates and none is named \"default\"; pass --chat-template FILE");
    }
    if (!ct.is_null()) throw Error((dir / "tokenizer_config.json").string() + ": chat_template must be a string or a list");
  }
  return ChatFormat::chatml();
}

}  // namespace fineserve
