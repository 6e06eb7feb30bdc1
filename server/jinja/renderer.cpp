#include "server/jinja/renderer.h"

#include <algorithm>
#include <cmath>

namespace fineserve::jinja {

Renderer::Renderer(const Template& t, const Json& context) : t_(t), lim_(t.limits) {
  frames_.emplace_back();
  for (const char* f : {"raise_exception", "range", "namespace", "strftime_now", "dict"})
    frames_.back()[f] = function_value(f);
  if (context.is_object())
    for (auto it = context.begin(); it != context.end(); ++it) frames_.back()[it.key()] = jv(it.value());
}

std::string Renderer::run() {
  exec(t_.body, out_);
  return std::move(out_);
}

void Renderer::fail(size_t pos, const std::string& msg) const {
  throw ChatTemplateError(t_.name + ":" + position_of(t_.normalized, pos) + ": " + msg);
}

void Renderer::charge(size_t pos, int64_t units) {
  steps_ += units;
  if (steps_ > lim_.max_steps) fail(pos, "the chat template ran too long (more than " + std::to_string(lim_.max_steps) + " steps)");
}

void Renderer::check_size(size_t pos, size_t bytes) {
  if (bytes > lim_.max_output_bytes)
    fail(pos, "the chat template built a value larger than " + std::to_string(lim_.max_output_bytes) + " bytes");
  charge(pos, static_cast<int64_t>(bytes / 16));
}

const Value& Renderer::need(const Value& v, size_t pos) const {
  if (v.undefined()) fail(pos, v.name);
  return v;
}

std::string Renderer::str(const Value& v, size_t pos) const {
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

std::string Renderer::repr(const Json& j, size_t pos) const {
  std::string out;
  try {
    py_repr(j, out, 0, lim_.max_depth);
  } catch (const ChatTemplateError& e) {
    fail(pos, e.what());
  }
  return out;
}

Json Renderer::to_json(const Value& v, size_t pos) const {
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

int64_t Renderer::to_int(const Value& v, size_t pos, const char* what) const {
  if (!v.is_data() || !is_int(v.j())) fail(pos, std::string(what) + " must be an integer, not " + type_name(v));
  return as_int(v.j());
}

std::string Renderer::to_string_arg(const Value& v, size_t pos, const char* what) const {
  if (!v.is(Json::value_t::string)) fail(pos, std::string(what) + " must be a string, not " + type_name(v));
  return v.j().get<std::string>();
}

Json Renderer::nestable(Json j, size_t pos) {
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

bool Renderer::equal(const Value& a, const Value& b, int depth) const {
  if (a.kind != b.kind) return false;
  if (a.undefined()) return true;
  if (a.kind == Value::Kind::Namespace) return a.ns == b.ns;
  if (a.kind == Value::Kind::Function) return a.name == b.name;
  return json_equal(a.j(), b.j(), depth);
}

bool Renderer::json_equal(const Json& a, const Json& b, int depth) const {
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

int Renderer::compare(const Json& a, const Json& b, size_t pos, int depth) const {
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

bool Renderer::contains(const Value& container, const Value& item, size_t pos) const {
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

std::vector<Json> Renderer::iterate(const Value& v, size_t pos) const {
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

Value Renderer::lookup(const std::string& name) const {
  for (auto f = frames_.rbegin(); f != frames_.rend(); ++f) {
    auto it = f->find(name);
    if (it != f->end()) return it->second;
  }
  return undefined_value("'" + name + "' is undefined");
}

Value Renderer::getattr(const Value& obj, const std::string& name, size_t pos) const {
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

Value Renderer::getitem(const Value& obj, const Value& key, size_t pos) const {
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

std::vector<int64_t> Renderer::slice_indices(int64_t n, const Value* a, const Value* b, const Value* c, size_t pos) const {
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

Flow Renderer::exec(const std::vector<Stmt>& body, std::string& out) {
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

void Renderer::assign(const Stmt& s, Value v) {
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

void Renderer::bind(const std::vector<std::string>& targets, const Json& item, size_t pos) {
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

void Renderer::exec_for(const Stmt& s, std::string& out) {
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

Value Renderer::eval(const Expr& e) {
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

void Renderer::eval_args(const Expr& e, size_t first, Args& args, Kwargs& kwargs) {
  for (size_t i = first; i < e.args.size(); ++i) args.push_back(eval(*e.args[i]));
  for (const auto& [k, x] : e.kwargs) kwargs.emplace_back(k, eval(*x));
}

bool Renderer::cmp(const std::string& op, const Value& a, const Value& b, size_t pos) const {
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

Value Renderer::binop(const std::string& op, const Value& l, const Value& r, size_t pos) {
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

Value Renderer::eval_slice(const Expr& e) {
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

}  // namespace fineserve::jinja
