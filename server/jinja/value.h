// Template values with Python's semantics, and the Python string helpers they print with: what the
// renderer and the built-in filters compute on. Strings are UTF-8; where Python counts code points
// (len, slicing, strip) they are decoded with models/tokenizer/utf8.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace fineserve::jinja {

using Json = nlohmann::ordered_json;

// ---- UTF-8 and Python string helpers ----

// Python strings are sequences of code points; templates index, slice and measure them so.
std::u32string decode_utf8(std::string_view s);
void append_utf8(std::string& out, char32_t cp);
std::string encode_utf8(std::u32string_view s);
// str.isspace() (what strip() and split() remove).
bool py_space(char32_t c);
// Case mapping is ASCII-only (role names and markers are ASCII; documented in docs/api.md).
char32_t to_upper(char32_t c);
char32_t to_lower(char32_t c);
bool is_alpha(char32_t c);
std::string str_upper(std::string s);
std::string str_lower(std::string s);
// str.strip(chars) / lstrip / rstrip; chars == nullptr: whitespace.
std::string py_strip(std::string_view s, const std::u32string* chars, bool left, bool right);
// Python's repr() of a float: the shortest round-trip digits, in fixed notation for exponents in
// [-4, 16) (with at least one decimal) and scientific otherwise.
std::string py_float(double d);
// Python's repr() of a str.
std::string py_repr_str(const std::string& s);
// json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=sort_keys): what transformers'
// tojson filter returns.
void py_dumps(const Json& j, int indent, bool sort_keys, int level, int max_depth, std::string& out);

// ---- values ----

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

Value jv(Json j);
Value undefined_value(std::string message);
Value function_value(std::string name);
const char* type_name(const Value& v);
bool is_int(const Json& j);  // bool is an int in Python
bool is_num(const Json& j);
int64_t as_int(const Json& j);
double as_double(const Json& j);
bool truthy(const Value& v);
// Python's repr() of data (inside lists and dicts) and str() (at the top level).
void py_repr(const Json& j, std::string& out, int depth, int max_depth);

}  // namespace fineserve::jinja
