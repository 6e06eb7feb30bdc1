#include "server/jinja/value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "models/tokenizer/utf8.h"
#include "server/chat_template.h"  // ChatTemplateError

namespace fineserve::jinja {

std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const utf8::Decoded d = utf8::decode(s, i);
    out.push_back(d.code_point == utf8::kInvalid ? U'\uFFFD' : static_cast<char32_t>(d.code_point));
    i += d.length;
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) { utf8::append(static_cast<uint32_t>(cp), out); }

std::string encode_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

bool py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

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

std::string py_strip(std::string_view s, const std::u32string* chars, bool left, bool right) {
  const std::u32string u = decode_utf8(s);
  auto drop = [&](char32_t c) { return chars ? chars->find(c) != std::u32string::npos : py_space(c); };
  size_t b = 0, e = u.size();
  if (left) while (b < e && drop(u[b])) ++b;
  if (right) while (e > b && drop(u[e - 1])) --e;
  return encode_utf8(std::u32string_view(u).substr(b, e - b));
}

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

}  // namespace fineserve::jinja
