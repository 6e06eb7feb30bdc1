// The template renderer: a parsed template + variables -> text, with Python's semantics for the
// values (str(), ==, truthiness, slicing, json.dumps for tojson). Statements and expressions are in
// renderer.cpp; the built-in functions, methods, tests and filters in builtins.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "server/jinja/parser.h"
#include "server/jinja/value.h"

namespace fineserve::jinja {

using Args = std::vector<Value>;
using Kwargs = std::vector<std::pair<std::string, Value>>;

enum class Flow : uint8_t { Normal, Break, Continue };

class Renderer {
 public:
  Renderer(const Template& t, const Json& context);
  std::string run();

 private:
  // ---- errors and budgets ----
  [[noreturn]] void fail(size_t pos, const std::string& msg) const;
  void charge(size_t pos, int64_t units);
  void check_size(size_t pos, size_t bytes);
  // Using an undefined value as data is an error (Jinja's default Undefined).
  const Value& need(const Value& v, size_t pos) const;

  // ---- conversions ----
  std::string str(const Value& v, size_t pos) const;
  std::string repr(const Json& j, size_t pos) const;
  // The value as JSON data (for storing in lists, dicts, tojson).
  Json to_json(const Value& v, size_t pos) const;
  int64_t to_int(const Value& v, size_t pos, const char* what) const;
  std::string to_string_arg(const Value& v, size_t pos, const char* what) const;

  // A value about to go one level deeper into a list or dict. Copying and printing JSON recurse
  // per level, so a template nesting [[[...]]] in a loop must stop before the stack does.
  Json nestable(Json j, size_t pos);

  // Python ==.
  bool equal(const Value& a, const Value& b, int depth = 0) const;
  bool json_equal(const Json& a, const Json& b, int depth) const;
  // Python <, for numbers, strings and lists; -1, 0, 1.
  int compare(const Json& a, const Json& b, size_t pos, int depth = 0) const;
  bool contains(const Value& container, const Value& item, size_t pos) const;

  // The items a for loop or a filter walks: list elements, dict keys, string characters.
  std::vector<Json> iterate(const Value& v, size_t pos) const;

  // ---- variables ----
  Value lookup(const std::string& name) const;

  // obj.name (Jinja: the attribute, else the item).
  Value getattr(const Value& obj, const std::string& name, size_t pos) const;

  // obj[key].
  Value getitem(const Value& obj, const Value& key, size_t pos) const;

  // Python's slice indices for a sequence of length n.
  std::vector<int64_t> slice_indices(int64_t n, const Value* a, const Value* b, const Value* c, size_t pos) const;

  // ---- statements ----
  Flow exec(const std::vector<Stmt>& body, std::string& out);
  void assign(const Stmt& s, Value v);
  void bind(const std::vector<std::string>& targets, const Json& item, size_t pos);
  void exec_for(const Stmt& s, std::string& out);

  // ---- expressions ----
  Value eval(const Expr& e);
  void eval_args(const Expr& e, size_t first, Args& args, Kwargs& kwargs);
  bool cmp(const std::string& op, const Value& a, const Value& b, size_t pos) const;
  Value binop(const std::string& op, const Value& l, const Value& r, size_t pos);
  Value eval_slice(const Expr& e);

  // ---- calls: built-in functions and methods ----
  Value eval_call(const Expr& e);
  static const Value* kwarg(const Kwargs& kw, const char* name);
  // Positional argument i, else keyword `name`, else nullptr.
  static const Value* arg(const Args& a, const Kwargs& kw, size_t i, const char* name);
  Value call_function(const std::string& name, const Args& args, const Kwargs& kwargs, size_t pos);
  Value method(const Value& obj, const std::string& name, const Args& args, const Kwargs& kwargs, size_t pos);
  static std::string capitalize(const std::string& s);
  std::string replace(const std::string& s, const std::string& from, const std::string& to, int64_t count, size_t pos);

  // ---- tests ----
  bool test(const std::string& name, const Value& v, const Args& args, size_t pos);

  // ---- filters ----
  // An attribute path ("a.b") of an item, as Jinja's make_attrgetter reads it.
  Value attr_path(const Json& item, const std::string& path, size_t pos) const;
  Value filter(const std::string& name, const Value& v, const Args& args, const Kwargs& kwargs, size_t pos);
  const Template& t_;
  const ChatTemplateLimits& lim_;
  std::vector<std::unordered_map<std::string, Value>> frames_;
  std::string out_;
  int64_t steps_ = 0;
};

}  // namespace fineserve::jinja
