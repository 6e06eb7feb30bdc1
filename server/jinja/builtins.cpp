// The built-in functions (range, namespace, dict, strftime_now, raise_exception), the methods of
// str, list and dict, and Jinja's tests and filters, as Python and Jinja define them.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>

#include "server/jinja/renderer.h"

namespace fineserve::jinja {

Value Renderer::eval_call(const Expr& e) {
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

const Value* Renderer::kwarg(const Kwargs& kw, const char* name) {
  for (const auto& [k, v] : kw)
    if (k == name) return &v;
  return nullptr;
}

const Value* Renderer::arg(const Args& a, const Kwargs& kw, size_t i, const char* name) {
  return i < a.size() ? &a[i] : kwarg(kw, name);
}

Value Renderer::call_function(const std::string& name, const Args& args, const Kwargs& kwargs, size_t pos) {
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

Value Renderer::method(const Value& obj, const std::string& name, const Args& args, const Kwargs& kwargs, size_t pos) {
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

std::string Renderer::capitalize(const std::string& s) {
  std::u32string u = decode_utf8(s);
  for (size_t i = 0; i < u.size(); ++i) u[i] = i == 0 ? to_upper(u[i]) : to_lower(u[i]);
  return encode_utf8(u);
}

std::string Renderer::replace(const std::string& s, const std::string& from, const std::string& to, int64_t count, size_t pos) {
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

bool Renderer::test(const std::string& name, const Value& v, const Args& args, size_t pos) {
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

Value Renderer::attr_path(const Json& item, const std::string& path, size_t pos) const {
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

Value Renderer::filter(const std::string& name, const Value& v, const Args& args, const Kwargs& kwargs, size_t pos) {
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

}  // namespace fineserve::jinja
