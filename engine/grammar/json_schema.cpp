#include "engine/grammar/json_schema.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string>

#include "kernels/base.h"

namespace fineserve::grammar {

namespace {

using json = nlohmann::ordered_json;

// ---- Building blocks --------------------------------------------------------------------------

NodePtr chars(std::string_view set) {
  ByteSet b;
  for (unsigned char c : set) b.set(c);
  return byte_set(b);
}

NodePtr digit() { return chars("0123456789"); }
NodePtr digits(int min, int max) { return repeat(digit(), min, max); }

// One character of a JSON string: any UTF-8 character but '"', '\\' and controls, or an escape.
NodePtr string_char() {
  static const NodePtr c = [] {
    NodePtr plain = utf8_class({{0x20, 0x21}, {0x23, 0x5B}, {0x5D, 0x10FFFF}});
    NodePtr hex = chars("0123456789abcdefABCDEF");
    NodePtr escape = seq({literal("\\"), alt({chars("\"\\/bfnrt"), seq({literal("u"), repeat(hex, 4, 4)})})});
    return alt({plain, escape});
  }();
  return c;
}

NodePtr quoted(NodePtr content) { return seq({literal("\""), std::move(content), literal("\"")}); }

// Integers up to 19 digits: a model cannot run away with digits, and every value fits int64.
NodePtr integer_grammar() {
  return seq({optional(literal("-")), alt({literal("0"), seq({chars("123456789"), digits(0, 18)})})});
}

NodePtr number_grammar() {
  return seq({integer_grammar(), optional(seq({literal("."), digits(1, 16)})),
              optional(seq({chars("eE"), optional(chars("+-")), digits(1, 3)}))});
}

// Decimal strings of equal length between lo and hi (inclusive), digit by digit.
NodePtr same_length_range(const std::string& lo, const std::string& hi) {
  if (lo.empty()) return empty();
  if (lo[0] == hi[0]) return seq({literal(lo.substr(0, 1)), same_length_range(lo.substr(1), hi.substr(1))});
  const size_t rest = lo.size() - 1;
  const std::string nines(rest, '9'), zeros(rest, '0');
  auto digit_range = [](char a, char b) {
    ByteSet s;
    for (char c = a; c <= b; ++c) s.set(static_cast<unsigned char>(c));
    return byte_set(s);
  };
  if (lo.substr(1) == zeros && hi.substr(1) == nines) return seq({digit_range(lo[0], hi[0]), digits(static_cast<int>(rest), static_cast<int>(rest))});
  std::vector<NodePtr> options;
  options.push_back(seq({literal(lo.substr(0, 1)), same_length_range(lo.substr(1), nines)}));
  if (hi[0] - lo[0] > 1)
    options.push_back(seq({digit_range(static_cast<char>(lo[0] + 1), static_cast<char>(hi[0] - 1)), digits(static_cast<int>(rest), static_cast<int>(rest))}));
  options.push_back(seq({literal(hi.substr(0, 1)), same_length_range(zeros, hi.substr(1))}));
  return alt(std::move(options));
}

constexpr int64_t kMaxMagnitude = 999999999999999999;  // 18 nines: stays far from int64 limits

// Non-negative integers in [lo, hi] without leading zeros.
NodePtr natural_range(int64_t lo, int64_t hi) {
  if (lo > hi) return nothing();
  std::vector<NodePtr> options;
  const std::string hs = std::to_string(hi);
  for (size_t len = std::to_string(lo).size(); len <= hs.size(); ++len) {
    const int64_t first = len == 1 ? 0 : static_cast<int64_t>(std::pow(10.0, static_cast<double>(len - 1)));
    const int64_t a = std::max(lo, first);
    const int64_t b = len == hs.size() ? hi : static_cast<int64_t>(std::pow(10.0, static_cast<double>(len))) - 1;
    if (a <= b) options.push_back(same_length_range(std::to_string(a), std::to_string(b)));
  }
  return alt(std::move(options));
}

NodePtr integer_range(int64_t lo, int64_t hi) {
  std::vector<NodePtr> options;
  if (hi >= 0) options.push_back(natural_range(std::max<int64_t>(lo, 0), hi));
  if (lo < 0) options.push_back(seq({literal("-"), natural_range(std::max<int64_t>(-hi, 1), -lo)}));
  return alt(std::move(options));
}

NodePtr format_grammar(const std::string& format) {
  auto re = [](std::string_view p) { return parse_regex(p); };
  static const std::map<std::string, std::string, std::less<>> kFormats = {
      {"date", R"([0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01]))"},
      {"time", R"(([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9]))"},
      {"date-time", R"([0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9]))"},
      {"uuid", R"([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"},
      {"email", R"([A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63}){1,4})"},
      {"ipv4", R"(((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]))"},
      {"hostname", R"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,4})"},
  };
  auto it = kFormats.find(format);
  return it == kFormats.end() ? nullptr : re(it->second);
}

// Validation keywords FineServe cannot enforce: rejected by name rather than silently ignored.
const std::set<std::string, std::less<>>& unsupported_keywords() {
  static const std::set<std::string, std::less<>> k = {
      "not", "if", "then", "else", "patternProperties", "propertyNames", "dependentRequired",
      "dependentSchemas", "dependencies", "unevaluatedProperties", "unevaluatedItems",
      "minProperties", "maxProperties", "uniqueItems", "contains", "minContains", "maxContains",
      "multipleOf", "additionalItems", "$dynamicRef", "$recursiveRef", "contentSchema"};
  return k;
}

class Compiler {
 public:
  Compiler(const json& root, const JsonGrammarOptions& o) : root_(root), o_(o) {
    ws_ = repeat(chars(" \t\n"), 0, o.max_whitespace);
  }

  NodePtr compile(const json& s, const std::string& path, int depth) {
    if (depth > o_.max_schema_depth) fail(path, "schema nested deeper than " + std::to_string(o_.max_schema_depth) + " levels");
    if (s.is_boolean()) return s.get<bool>() ? any_value(o_.max_any_depth) : nothing();
    if (!s.is_object()) fail(path, "a schema must be an object or a boolean");
    for (const auto& [key, value] : s.items()) {
      if (unsupported_keywords().count(key)) fail(path, "unsupported JSON Schema keyword '" + key + "'");
    }

    if (s.contains("$ref")) return compile_ref(s, path, depth);
    if (s.contains("const")) return literal_value(s["const"]);
    if (s.contains("enum")) {
      const json& e = s["enum"];
      if (!e.is_array() || e.empty()) fail(path + "/enum", "'enum' must be a non-empty array");
      std::vector<NodePtr> options;
      for (const json& v : e) options.push_back(literal_value(v));
      return alt(std::move(options));
    }
    if (s.contains("allOf")) {
      const json& a = s["allOf"];
      if (!a.is_array() || a.size() != 1) fail(path + "/allOf", "unsupported JSON Schema keyword 'allOf' with more than one subschema");
      return compile(a[0], path + "/allOf/0", depth + 1);
    }
    for (const char* key : {"anyOf", "oneOf"}) {
      if (!s.contains(key)) continue;
      const json& a = s[key];
      if (!a.is_array() || a.empty()) fail(path + "/" + key, std::string("'") + key + "' must be a non-empty array");
      // Sibling keywords apply to every branch (e.g. {"type": "object", "anyOf": [...]}).
      json base = s;
      base.erase(key);
      std::vector<NodePtr> options;
      for (size_t i = 0; i < a.size(); ++i) {
        json branch = a[i];
        if (branch.is_object())
          for (const auto& [k, v] : base.items())
            if (!branch.contains(k)) branch[k] = v;
        options.push_back(compile(branch, path + "/" + key + "/" + std::to_string(i), depth + 1));
      }
      return alt(std::move(options));
    }

    NodePtr out;
    if (s.contains("type")) {
      const json& t = s["type"];
      if (t.is_string()) {
        out = typed(s, t.get<std::string>(), path, depth);
      } else if (t.is_array() && !t.empty()) {
        std::vector<NodePtr> options;
        for (const json& one : t) {
          if (!one.is_string()) fail(path + "/type", "'type' entries must be strings");
          options.push_back(typed(s, one.get<std::string>(), path, depth));
        }
        out = alt(std::move(options));
      } else {
        fail(path + "/type", "'type' must be a string or a non-empty array of strings");
      }
    } else if (s.contains("properties") || s.contains("required") || s.contains("additionalProperties")) {
      out = typed(s, "object", path, depth);
    } else if (s.contains("items") || s.contains("prefixItems") || s.contains("minItems") || s.contains("maxItems")) {
      out = typed(s, "array", path, depth);
    } else if (s.contains("pattern") || s.contains("format") || s.contains("minLength") || s.contains("maxLength")) {
      out = typed(s, "string", path, depth);
    } else {
      out = any_value(o_.max_any_depth);
    }
    if (s.value("nullable", false)) out = alt({out, literal("null")});
    return out;
  }

  NodePtr any_value(int depth) {
    if (depth < 0) depth = 0;
    if (static_cast<size_t>(depth) < any_cache_.size() && any_cache_[static_cast<size_t>(depth)]) return any_cache_[static_cast<size_t>(depth)];
    std::vector<NodePtr> options = {string_grammar(0, -1), number_grammar(), literal("true"), literal("false"), literal("null")};
    if (depth > 0) {
      NodePtr inner = any_value(depth - 1);
      options.push_back(array_of(inner, 0, -1));
      options.push_back(object_of({}, {}, seq({string_grammar(0, -1), ws_, literal(":"), ws_, inner})));
    }
    NodePtr v = alt(std::move(options));
    if (any_cache_.size() <= static_cast<size_t>(depth)) any_cache_.resize(static_cast<size_t>(depth) + 1);
    any_cache_[static_cast<size_t>(depth)] = v;
    return v;
  }

  NodePtr any_object() {
    NodePtr inner = any_value(o_.max_any_depth - 1);
    return object_of({}, {}, seq({string_grammar(0, -1), ws_, literal(":"), ws_, inner}));
  }

 private:
  [[noreturn]] static void fail(const std::string& path, const std::string& what) {
    throw Error("JSON schema at '" + (path.empty() ? std::string("#") : "#" + path) + "': " + what);
  }

  NodePtr literal_value(const json& v) { return literal(v.dump()); }

  int count(const json& s, const char* key, const std::string& path, int fallback) {
    if (!s.contains(key)) return fallback;
    const json& v = s[key];
    if (!v.is_number_integer() || v.get<int64_t>() < 0) fail(path + "/" + key, std::string("'") + key + "' must be a non-negative integer");
    if (v.get<int64_t>() > o_.max_repeat) fail(path + "/" + key, std::string("'") + key + "' above " + std::to_string(o_.max_repeat) + " is not supported");
    return static_cast<int>(v.get<int64_t>());
  }

  NodePtr string_grammar(int min, int max) { return quoted(repeat(string_char(), min, max)); }

  NodePtr array_of(const NodePtr& item, int min, int max) {
    NodePtr sep = seq({ws_, literal(","), ws_});
    NodePtr body;
    if (max == 0) {
      body = empty();
    } else {
      body = seq({item, repeat(seq({sep, item}), std::max(min - 1, 0), max < 0 ? -1 : max - 1)});
      if (min == 0) body = optional(body);
    }
    return seq({literal("["), ws_, body, ws_, literal("]")});
  }

  NodePtr object_of(std::vector<NodePtr> members_list, std::vector<bool> required, NodePtr extra) {
    NodePtr sep = seq({ws_, literal(","), ws_});
    return seq({literal("{"), ws_, members(std::move(members_list), std::move(required), sep, std::move(extra)), ws_, literal("}")});
  }

  NodePtr typed(const json& s, const std::string& type, const std::string& path, int depth) {
    if (type == "null") return literal("null");
    if (type == "boolean") return alt({literal("true"), literal("false")});
    if (type == "number") {
      for (const char* k : {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
        if (s.contains(k)) fail(path, std::string("unsupported JSON Schema keyword '") + k + "' for type number (supported for integers)");
      return number_grammar();
    }
    if (type == "integer") return integer(s, path);
    if (type == "string") return string(s, path);
    if (type == "array") return array(s, path, depth);
    if (type == "object") return object(s, path, depth);
    fail(path + "/type", "unknown type '" + type + "'");
  }

  NodePtr integer(const json& s, const std::string& path) {
    bool bounded = false;
    int64_t lo = -kMaxMagnitude, hi = kMaxMagnitude;
    auto bound = [&](const char* key, int64_t adjust, bool is_min) {
      if (!s.contains(key)) return;
      const json& v = s[key];
      if (!v.is_number()) fail(path + "/" + key, std::string("'") + key + "' must be a number");
      const double d = v.get<double>();
      // Integer bounds of a possibly fractional limit: minimum 1.5 -> 2, maximum 1.5 -> 1.
      double b = is_min ? std::ceil(d) : std::floor(d);
      if (adjust != 0 && b == d) b += static_cast<double>(adjust);
      b = std::clamp(b, static_cast<double>(-kMaxMagnitude), static_cast<double>(kMaxMagnitude));
      if (is_min) lo = std::max(lo, static_cast<int64_t>(b));
      else hi = std::min(hi, static_cast<int64_t>(b));
      bounded = true;
    };
    bound("minimum", 0, true);
    bound("exclusiveMinimum", 1, true);
    bound("maximum", 0, false);
    bound("exclusiveMaximum", -1, false);
    if (!bounded) return integer_grammar();
    if (lo > hi) fail(path, "no integer satisfies minimum/maximum");
    return integer_range(lo, hi);
  }

  NodePtr string(const json& s, const std::string& path) {
    const int min = count(s, "minLength", path, 0);
    const int max = s.contains("maxLength") ? count(s, "maxLength", path, -1) : -1;
    if (max >= 0 && max < min) fail(path, "maxLength is below minLength");
    if (s.contains("pattern")) {
      if (!s["pattern"].is_string()) fail(path + "/pattern", "'pattern' must be a string");
      if (s.contains("minLength") || s.contains("maxLength")) fail(path, "'pattern' together with minLength/maxLength is not supported");
      NodePtr p;
      try {
        p = parse_regex(s["pattern"].get<std::string>());
      } catch (const Error& e) {
        fail(path + "/pattern", e.what());
      }
      ByteSet banned;
      for (int b = 0; b < 0x20; ++b) banned.set(static_cast<size_t>(b));
      banned.set('"');
      banned.set('\\');
      return quoted(without_bytes(p, banned));
    }
    if (s.contains("format")) {
      if (!s["format"].is_string()) fail(path + "/format", "'format' must be a string");
      NodePtr f = format_grammar(s["format"].get<std::string>());
      if (f) return quoted(f);
    }
    return string_grammar(min, max);
  }

  NodePtr array(const json& s, const std::string& path, int depth) {
    const int min = count(s, "minItems", path, 0);
    const int max = s.contains("maxItems") ? count(s, "maxItems", path, -1) : -1;
    if (max >= 0 && max < min) fail(path, "maxItems is below minItems");
    std::vector<NodePtr> prefix;
    if (s.contains("prefixItems")) {
      const json& p = s["prefixItems"];
      if (!p.is_array()) fail(path + "/prefixItems", "'prefixItems' must be an array");
      for (size_t i = 0; i < p.size(); ++i) prefix.push_back(compile(p[i], path + "/prefixItems/" + std::to_string(i), depth + 1));
    }
    NodePtr item = s.contains("items") ? compile(s["items"], path + "/items", depth + 1) : any_value(o_.max_any_depth - 1);
    if (prefix.empty()) return array_of(item, min, max);
    // Prefix items in order (each present only if all before it are), then `items`.
    NodePtr sep = seq({ws_, literal(","), ws_});
    const int n = static_cast<int>(prefix.size());
    std::vector<NodePtr> options;
    for (int k = 0; k <= n; ++k) {
      if (k < min && k < n) continue;
      if (max >= 0 && k > max) break;
      std::vector<NodePtr> parts;
      for (int i = 0; i < k; ++i) {
        if (i) parts.push_back(sep);
        parts.push_back(prefix[static_cast<size_t>(i)]);
      }
      if (k == n) {
        const int rest_min = std::max(min - n, 0);
        const int rest_max = max < 0 ? -1 : max - n;
        if (rest_max != 0) {
          parts.push_back(repeat(seq({sep, item}), rest_min, rest_max));
        }
      }
      options.push_back(seq(std::move(parts)));
    }
    return seq({literal("["), ws_, alt(std::move(options)), ws_, literal("]")});
  }

  NodePtr object(const json& s, const std::string& path, int depth) {
    const json props = s.value("properties", json::object());
    if (!props.is_object()) fail(path + "/properties", "'properties' must be an object");
    std::set<std::string> required;
    if (s.contains("required")) {
      if (!s["required"].is_array()) fail(path + "/required", "'required' must be an array of names");
      for (const json& r : s["required"]) {
        if (!r.is_string()) fail(path + "/required", "'required' must be an array of names");
        required.insert(r.get<std::string>());
      }
    }
    std::vector<NodePtr> list;
    std::vector<bool> req;
    for (const auto& [name, sub] : props.items()) {
      NodePtr value = compile(sub, path + "/properties/" + name, depth + 1);
      NodePtr member = seq({literal(json(name).dump()), ws_, literal(":"), ws_, value});
      if (value->kind == Node::Kind::Nothing) {
        if (required.count(name)) fail(path + "/properties/" + name, "a required property whose schema allows no value");
        continue;
      }
      list.push_back(member);
      req.push_back(required.count(name) > 0);
    }
    // Required names without a schema take any value.
    for (const std::string& name : required) {
      if (props.contains(name)) continue;
      list.push_back(seq({literal(json(name).dump()), ws_, literal(":"), ws_, any_value(o_.max_any_depth - 1)}));
      req.push_back(true);
    }
    NodePtr extra;
    const bool open_by_default = !s.contains("properties") && required.empty();
    if (s.contains("additionalProperties")) {
      const json& a = s["additionalProperties"];
      if (!(a.is_boolean() && !a.get<bool>()))
        extra = seq({string_grammar(0, -1), ws_, literal(":"), ws_, compile(a, path + "/additionalProperties", depth + 1)});
    } else if (open_by_default) {
      extra = seq({string_grammar(0, -1), ws_, literal(":"), ws_, any_value(o_.max_any_depth - 1)});
    }
    return object_of(std::move(list), std::move(req), std::move(extra));
  }

  NodePtr compile_ref(const json& s, const std::string& path, int depth) {
    const json& r = s["$ref"];
    if (!r.is_string()) fail(path + "/$ref", "'$ref' must be a string");
    const std::string ref = r.get<std::string>();
    if (ref.empty() || ref[0] != '#') fail(path + "/$ref", "only local references ('#...') are supported, got '" + ref + "'");
    const json* target = nullptr;
    try {
      target = ref == "#" ? &root_ : &root_.at(json::json_pointer(ref.substr(1)));
    } catch (const std::exception&) {
      fail(path + "/$ref", "'" + ref + "' does not resolve");
    }
    int& active = ref_depth_[ref];
    if (active >= o_.max_ref_depth) return nothing();  // recursion cut off: that branch is not generated
    ++active;
    NodePtr out;
    try {
      out = compile(*target, ref.substr(1), depth + 1);
    } catch (...) {
      --active;
      throw;
    }
    --active;
    return out;
  }

  const json& root_;
  const JsonGrammarOptions& o_;
  NodePtr ws_;
  std::vector<NodePtr> any_cache_;
  std::map<std::string, int> ref_depth_;
};

}  // namespace

NodePtr json_schema_grammar(const nlohmann::ordered_json& schema, const JsonGrammarOptions& options) {
  Compiler c(schema, options);
  NodePtr n = c.compile(schema, "", 0);
  if (n->kind == Node::Kind::Nothing) throw Error("JSON schema: no JSON value satisfies this schema");
  return n;
}

NodePtr any_json_value(const JsonGrammarOptions& options) {
  nlohmann::ordered_json root = true;
  Compiler c(root, options);
  return c.any_value(options.max_any_depth);
}

NodePtr any_json_object(const JsonGrammarOptions& options) {
  nlohmann::ordered_json root = true;
  Compiler c(root, options);
  return c.any_object();
}

}  // namespace fineserve::grammar
