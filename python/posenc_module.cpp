// SPDX-License-Identifier: Apache-2.0
// The Python module `posenc`: posenc's encoders and blockwise attention on NumPy arrays.
//
// Arrays are used in place, never copied: a float32 or float64 array whose last axis has unit
// stride (C-contiguous, or a slice of rows of one) becomes a posenc::strided_view. Anything else
// raises TypeError (wrong type or dtype) or ValueError (wrong ndim, shape, layout, read-only
// output) naming the function and the argument, before any work starts. Parameter errors from the
// library (std::invalid_argument, "posenc: rope_params.base = -1: ...") become ValueError too;
// shape bugs that slip past the checks here raise posenc.PreconditionError (a ValueError). An int
// that does not fit in int64 raises OverflowError naming the argument. A call with an unknown
// keyword, a missing argument or too many positionals raises a short TypeError (`call_args`).
// The GIL is released while rotating, encoding and attending.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include "posenc/posenc.hpp"

namespace py = pybind11;
using namespace pybind11::literals;
using posenc::index_t;
using posenc::position;

namespace {

// ---------------------------------------------------------------------------------------------
// Threads: the module's calls run on one pool of one worker per hardware thread, started by the
// first call that uses it (threads=1 keeps a call on the calling thread).

posenc::thread_pool& workers() {
  static posenc::thread_pool pool;
  return pool;
}

// ---------------------------------------------------------------------------------------------
// Arguments

std::string type_name(py::handle h) { return py::str(py::type::handle_of(h).attr("__name__")); }

[[noreturn]] void type_error(const std::string& where, const std::string& what) {
  throw py::type_error("posenc." + where + ": " + what);
}
[[noreturn]] void value_error(const std::string& where, const std::string& what) {
  throw py::value_error("posenc." + where + ": " + what);
}

[[noreturn]] void overflow_error(const std::string& where, const std::string& what) {
  PyErr_SetString(PyExc_OverflowError, ("posenc." + where + ": " + what).c_str());
  throw py::error_already_set();
}

/// `str(i)` of a Python int, its middle elided past 40 digits (an int of 10**400 stays one line).
std::string int_text(py::handle i) {
  std::string s = py::str(i);
  if (s.size() > 40)
    s = s.substr(0, 20) + "..." + s.substr(s.size() - 10) + " (" + std::to_string(s.size()) + " digits)";
  return s;
}

// ---------------------------------------------------------------------------------------------
// Scalar arguments. Python ints are unbounded and posenc's are int64: a value that does not fit
// raises OverflowError naming the argument and the value, never a generic cast failure.

/// An int (or anything with `__index__`, such as numpy.int64) as int64.
std::int64_t int64_of(py::handle obj, const std::string& where, const std::string& arg) {
  if (!PyIndex_Check(obj.ptr())) type_error(where, arg + " must be an int, got " + type_name(obj));
  auto i = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!i) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  if (overflow != 0) overflow_error(where, arg + " = " + int_text(i) + " does not fit in int64");
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

/// A float, an int or a NumPy number as double.
double float_of(py::handle obj, const std::string& where, const std::string& arg) {
  const auto* num = Py_TYPE(obj.ptr())->tp_as_number;
  if (!PyFloat_Check(obj.ptr()) && !PyIndex_Check(obj.ptr()) && (num == nullptr || num->nb_float == nullptr))
    type_error(where, arg + " must be a float, got " + type_name(obj));
  const double v = PyFloat_AsDouble(obj.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw py::error_already_set();
    PyErr_Clear();
    overflow_error(where, arg + " = " + int_text(obj) + " does not fit in float64");
  }
  return v;
}

/// True/False (also numpy.bool_ and ints, by their truth value).
bool bool_of(py::handle obj, const std::string& where, const std::string& arg) {
  const std::string_view type = Py_TYPE(obj.ptr())->tp_name;
  const bool numpy_bool = type == "numpy.bool_" || type == "numpy.bool";  // NumPy 1, NumPy 2
  if (!PyBool_Check(obj.ptr()) && !numpy_bool && !PyIndex_Check(obj.ptr()))
    type_error(where, arg + " must be a bool, got " + type_name(obj));
  const int v = PyObject_IsTrue(obj.ptr());
  if (v < 0) throw py::error_already_set();
  return v != 0;
}

std::string str_of(py::handle obj, const std::string& where, const std::string& arg) {
  if (!py::isinstance<py::str>(obj)) type_error(where, arg + " must be a str, got " + type_name(obj));
  return obj.cast<std::string>();
}

/// A list, tuple or 1-D array of numbers, as doubles.
std::vector<double> floats_of(py::handle obj, const std::string& where, const std::string& arg) {
  const bool array = py::isinstance<py::array>(obj) && py::reinterpret_borrow<py::array>(obj).ndim() == 1;
  if (!array && !py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    type_error(where, arg + " must be a list of numbers, got " + type_name(obj));
  std::vector<double> out;
  for (auto item : obj) out.push_back(float_of(item, where, arg + "[" + std::to_string(out.size()) + "]"));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Calls. Every function, method and constructor takes (*args, **kwargs) and binds them itself, as
// Python binds a def's parameters, so that a wrong call raises a short TypeError naming the
// argument ("did you mean" for a mistyped keyword) where pybind11's would print every argument,
// arrays included. Each docstring starts with the Python signature for help() and inspect.

/// A parameter: positional-or-keyword unless `keyword_only`; a `required` one has no default.
struct param {
  std::string name;
  bool keyword_only = false;
  bool required = false;
};

/// What a function is called in messages ("attention", "Rope.rotate", "Rope" for a constructor),
/// its parameters in order, and keywords it no longer takes with what to do instead.
struct signature {
  std::string name;
  std::vector<param> params;
  std::vector<std::pair<std::string, std::string>> removed = {};
};

/// The signature of `name` from its Python parameter list, e.g. "x, positions=None" or
/// "q, k, v, qpos=None, *, heads=None": a parameter without a default is required, those after
/// "*" are keyword-only. The same text heads the docstring (see `doc_of`), so the two cannot differ.
signature sig_of(std::string name, std::string_view params,
                 std::vector<std::pair<std::string, std::string>> removed = {}) {
  signature s{std::move(name), {}, std::move(removed)};
  bool keyword_only = false;
  int depth = 0;
  std::size_t begin = 0;
  for (std::size_t i = 0; i <= params.size(); ++i) {
    const char c = i < params.size() ? params[i] : ',';
    if (c == '(' || c == '[') ++depth;
    if (c == ')' || c == ']') --depth;
    if (c != ',' || depth != 0) continue;
    std::string_view item = params.substr(begin, i - begin);
    begin = i + 1;
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    if (item == "*") {
      keyword_only = true;
    } else if (!item.empty()) {
      const auto eq = item.find('=');
      s.params.push_back(param{std::string(item.substr(0, eq)), keyword_only, eq == std::string_view::npos});
    }
  }
  return s;
}

/// A docstring whose first line CPython reads as the signature (`__text_signature__`, shown by
/// help() and inspect.signature): "name(self, params)\n--\n\n" then `doc`. A method names `self`
/// plainly: CPython's "$self" marks an argument that is already bound, and pybind11's function
/// objects count as bound to the module.
std::string doc_of(std::string_view name, bool method, std::string_view params, std::string_view doc) {
  std::string s(name);
  s += method ? "(self, " : "(";
  return s.append(params).append(")\n--\n\n").append(doc);
}

[[noreturn]] void call_error(const signature& sig, const std::string& what) {
  throw py::type_error("posenc." + sig.name + "() " + what);
}

/// The parameter name closest to a mistyped keyword (Python's difflib), or "".
std::string close_match(const signature& sig, const std::string& word) {
  py::list names;
  for (const auto& p : sig.params) names.append(p.name);
  py::list best = py::module_::import("difflib").attr("get_close_matches")(word, names, 1);
  return best.empty() ? std::string() : best[0].cast<std::string>();
}

std::string plural(std::size_t n, const char* word) { return std::to_string(n) + " " + word + (n == 1 ? "" : "s"); }

/// The arguments of one call bound to the parameters of `sig`; an argument left to its default is
/// a null handle. The handles borrow from the call's args and kwargs, which outlive this.
class call_args {
 public:
  call_args(const signature& sig, const py::args& args, const py::kwargs& kwargs)
      : sig_(sig), values_(sig.params.size()) {
    std::size_t max_positional = 0, min_positional = 0;
    for (const auto& p : sig.params) {
      if (p.keyword_only) break;
      ++max_positional;
      if (p.required) min_positional = max_positional;
    }
    if (args.size() > max_positional) {
      const std::string given = std::to_string(args.size()) + (args.size() == 1 ? " was" : " were");
      if (max_positional == 0) call_error(sig, "takes no positional arguments but " + given + " given");
      if (min_positional == max_positional)
        call_error(sig, "takes " + plural(max_positional, "positional argument") + " but " + given + " given");
      call_error(sig, "takes from " + std::to_string(min_positional) + " to " + std::to_string(max_positional) +
                          " positional arguments but " + given + " given");
    }
    for (std::size_t i = 0; i < args.size(); ++i) values_[i] = args[i];
    for (auto [key, value] : kwargs) {
      const auto name = key.cast<std::string>();
      const auto i = index_of(name);
      if (i == sig.params.size()) {
        for (const auto& [old, instead] : sig.removed)
          if (name == old) call_error(sig, "got an unexpected keyword argument '" + name + "' (" + instead + ")");
        const auto near = close_match(sig, name);
        call_error(sig, "got an unexpected keyword argument '" + name + "'" +
                            (near.empty() ? "" : " (did you mean '" + near + "'?)"));
      }
      if (values_[i]) call_error(sig, "got multiple values for argument '" + name + "'");
      values_[i] = value;
    }
    for (std::size_t i = 0; i < sig.params.size(); ++i)
      if (sig.params[i].required && !values_[i])
        call_error(sig, std::string("missing required ") + (sig.params[i].keyword_only ? "keyword " : "") +
                            "argument '" + sig.params[i].name + "'");
  }

  /// The argument, or None when it was left to its default.
  py::handle operator[](std::string_view name) const {
    const py::handle h = values_[checked_index(name)];
    return h ? h : py::handle(Py_None);
  }
  /// Given and not None.
  bool has(std::string_view name) const { return !(*this)[name].is_none(); }

  std::int64_t int64(std::string_view name, std::int64_t def) const {
    return has(name) ? int64_of((*this)[name], sig_.name, std::string(name)) : def;
  }
  std::optional<std::int64_t> optional_int64(std::string_view name) const {
    if (!has(name)) return std::nullopt;
    return int64_of((*this)[name], sig_.name, std::string(name));
  }
  double float64(std::string_view name, double def) const {
    return has(name) ? float_of((*this)[name], sig_.name, std::string(name)) : def;
  }
  std::optional<double> optional_float64(std::string_view name) const {
    if (!has(name)) return std::nullopt;
    return float_of((*this)[name], sig_.name, std::string(name));
  }
  bool flag(std::string_view name, bool def) const {
    return has(name) ? bool_of((*this)[name], sig_.name, std::string(name)) : def;
  }
  std::string str(std::string_view name, const char* def) const {
    return has(name) ? str_of((*this)[name], sig_.name, std::string(name)) : std::string(def);
  }

 private:
  std::size_t index_of(std::string_view name) const {
    std::size_t i = 0;
    while (i < sig_.params.size() && name != sig_.params[i].name) ++i;
    return i;
  }
  std::size_t checked_index(std::string_view name) const {
    const auto i = index_of(name);
    if (i == sig_.params.size()) throw std::logic_error("posenc module: no parameter " + std::string(name));
    return i;
  }

  const signature& sig_;
  std::vector<py::handle> values_;
};

enum class elem { f32, f64 };

std::string dtype_name(const py::array& a) { return py::str(py::handle(a.dtype())); }

const char* dtype_text(elem d) { return d == elem::f32 ? "float32" : "float64"; }

/// `obj` as a float32 or float64 ndarray (TypeError otherwise).
py::array float_array(py::handle obj, const std::string& where, const char* arg, elem& kind) {
  if (!py::isinstance<py::array>(obj))
    type_error(where, std::string(arg) + " must be a numpy.ndarray of float32 or float64, got " + type_name(obj));
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (a.dtype().is(py::dtype::of<float>())) {
    kind = elem::f32;
  } else if (a.dtype().is(py::dtype::of<double>())) {
    kind = elem::f64;
  } else {
    type_error(where, std::string(arg) + " must have dtype float32 or float64, got " + dtype_name(a) +
                          " (convert with .astype(numpy.float32))");
  }
  return a;
}

void require_dtype(elem got, elem want, const std::string& where, const char* arg, const char* of) {
  if (got != want)
    type_error(where, std::string(arg) + " has dtype " + dtype_text(got) + " but " + of + " has dtype " +
                          dtype_text(want) + "; they must match");
}

std::string shape_text(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string strides_text(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.strides(i));
  return s + ")";
}

/// A matrix argument as posenc sees it: `[rows, cols]` with a row stride, plus the head count
/// and head_dim when it came as a 3-D `[tokens, heads, head_dim]` array (`ndim` 3).
template <class S>
struct matrix_arg {
  posenc::strided_view<S> view;
  int ndim = 2;
  index_t heads3 = 0;
  index_t head_dim3 = 0;
};

/// Views a 2-D `[rows, cols]` (or, when `allow_3d`, 3-D `[rows, heads, head_dim]`) array in
/// place. The last axis must have unit stride; for 3-D the middle one must be dense too; rows may
/// be any non-negative multiple of the element size apart, at least a row long. An array with no
/// elements addresses no memory, so its strides (NumPy gives such arrays zero strides) do not
/// matter and nothing is written to it, read-only or not.
template <class S>
matrix_arg<S> matrix_of(const py::array& a, const std::string& where, const char* arg, bool allow_3d) {
  using T = std::remove_const_t<S>;
  constexpr auto item = static_cast<py::ssize_t>(sizeof(T));
  const py::ssize_t nd = a.ndim();
  if (nd != 2 && !(allow_3d && nd == 3))
    value_error(where, std::string(arg) + " must be " +
                           (allow_3d ? "2-D [tokens, heads * head_dim] or 3-D [tokens, heads, head_dim]" : "2-D") +
                           ", got shape " + shape_text(a));
  const py::ssize_t rows = a.shape(0);
  const py::ssize_t inner = a.shape(nd - 1);
  const py::ssize_t cols = nd == 3 ? a.shape(1) * inner : inner;
  const bool empty = a.size() == 0;
  bool ok = inner <= 1 || a.strides(nd - 1) == item;
  if (nd == 3) ok = ok && (a.shape(1) <= 1 || a.strides(1) == inner * item);
  const py::ssize_t rs = a.strides(0);
  ok = ok && (rows <= 1 || (rs >= 0 && rs % item == 0 && rs / item >= cols));
  if (!ok && !empty)
    value_error(where, std::string(arg) + " with shape " + shape_text(a) + " and strides " + strides_text(a) +
                           " is not laid out as rows of contiguous elements; pass a C-contiguous array "
                           "(numpy.ascontiguousarray) or a slice of rows of one");
  S* data;
  if constexpr (std::is_const_v<S>) {
    data = static_cast<S*>(a.data());
  } else {
    if (!a.writeable() && !empty) value_error(where, std::string(arg) + " is read-only; it is written in place");
    data = const_cast<S*>(static_cast<const S*>(a.data()));
  }
  const index_t stride = rows <= 1 || empty ? cols : rs / item;
  matrix_arg<S> m{posenc::strided_view<S>(data, rows, cols, stride)};
  if (nd == 3) {
    m.ndim = 3;
    m.heads3 = a.shape(1);
    m.head_dim3 = inner;
  }
  return m;
}

/// Positions: None (0, 1, ..., n-1), a `range` with step 1, an int64 ndarray (borrowed in place),
/// or a list/tuple of ints (copied). `n` is the number needed (one per row), or -1 for any number
/// (then None is not accepted). A position past int64 raises OverflowError naming its index.
class position_arg {
 public:
  position_arg(py::handle obj, index_t n, const std::string& where, const std::string& arg) {
    if (obj.is_none() && n >= 0) {
      start_ = 0;
      count_ = n;
      range_ = true;
    } else if (py::isinstance<py::array>(obj)) {
      auto a = py::reinterpret_borrow<py::array>(obj);
      if (!a.dtype().is(py::dtype::of<std::int64_t>()))
        type_error(where, arg + " must have dtype int64, got " + dtype_name(a) +
                              " (positions are 64-bit integers; convert with .astype(numpy.int64))");
      if (a.ndim() != 1) value_error(where, arg + " must be 1-D, got shape " + shape_text(a));
      if (a.shape(0) > 1 && a.strides(0) != static_cast<py::ssize_t>(sizeof(std::int64_t)))
        value_error(where, arg + " must be contiguous, got strides " + strides_text(a));
      keep_ = a;
      list_ = static_cast<const position*>(a.data());
      count_ = a.shape(0);
      check_count(n, where, arg);
    } else if (PyRange_Check(obj.ptr())) {
      // The bounds are Python ints, unbounded: compare and subtract them as such.
      const py::object step = obj.attr("step"), first = obj.attr("start"), stop = obj.attr("stop");
      if (!step.equal(py::int_(1)))
        value_error(where, arg + " must be a range with step 1, got step " + int_text(step));
      py::object length = stop - first;
      if (length < py::int_(0)) length = py::int_(0);
      if (n >= 0 && !length.equal(py::int_(n)))
        value_error(where, arg + " has " + int_text(length) + " positions but " + std::to_string(n) +
                               " are needed (one per row)");
      range_ = true;
      if (length > py::int_(0)) {
        start_ = int64_of(first, where, arg + "[0]");
        int64_of(stop - py::int_(1), where, arg + "[" + int_text(length - py::int_(1)) + "]");
        count_ = int64_of(length, where, "len(" + arg + ")");
      }
    } else if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
      const auto size = static_cast<index_t>(py::len(obj));
      if (n >= 0 && size != n)
        value_error(where, arg + " has " + std::to_string(size) + " positions but " + std::to_string(n) +
                               " are needed (one per row)");
      owned_.reserve(static_cast<std::size_t>(size));
      for (auto item : obj) owned_.push_back(int64_of(item, where, arg + "[" + std::to_string(owned_.size()) + "]"));
      count_ = size;
    } else {
      type_error(where, arg + " must be " + (n >= 0 ? "None, " : "") +
                            "a range, an int64 numpy.ndarray or a list of ints, got " + type_name(obj));
    }
  }

  posenc::positions get() const {
    if (range_) return posenc::arange(start_, count_);
    return posenc::positions(
        std::span<const position>(list_ ? list_ : owned_.data(), static_cast<std::size_t>(count_)));
  }
  index_t size() const { return count_; }

 private:
  void check_count(index_t n, const std::string& where, const std::string& arg) const {
    if (n >= 0 && count_ != n)
      value_error(where, arg + " has " + std::to_string(count_) + " positions but " + std::to_string(n) +
                             " are needed (one per row)");
  }

  py::object keep_;
  const position* list_ = nullptr;
  std::vector<position> owned_;
  bool range_ = false;
  position start_ = 0;
  index_t count_ = 0;
};

/// Positions whose count is not tied to a matrix (bias tiles, cos/sin tables).
position_arg free_positions(py::handle obj, const std::string& where, const char* arg) {
  return position_arg(obj, -1, where, arg);
}

/// The `dtype` argument of `table` and `bias_tile`; left out (None), their default float32 (NumPy
/// would read None as float64).
elem parse_dtype(py::handle obj, const std::string& where) {
  if (obj.is_none()) return elem::f32;
  const auto d = py::dtype::from_args(py::reinterpret_borrow<py::object>(obj));
  if (d.is(py::dtype::of<float>())) return elem::f32;
  if (d.is(py::dtype::of<double>())) return elem::f64;
  type_error(where, "dtype must be float32 or float64, got " + std::string(py::str(py::handle(d))));
}

template <class T>
py::array_t<T> new_array(std::vector<py::ssize_t> shape) {
  return py::array_t<T>(std::move(shape));
}

// ---------------------------------------------------------------------------------------------
// Encoders: each Python object holds the float and the double encoder, and picks the one that
// matches the array it is given.

template <template <class> class E>
struct both {
  E<float> f;
  E<double> d;
  template <class T>
  const E<T>& get() const {
    if constexpr (std::same_as<T, float>) {
      return f;
    } else {
      return d;
    }
  }
};

using py_rope = both<posenc::rope>;
using py_sinusoidal = both<posenc::sinusoidal>;
using py_alibi = both<posenc::alibi>;
using py_t5 = both<posenc::t5_relative_bias>;
using py_shaw = both<posenc::shaw_relative>;

/// A Hugging Face `rope_scaling` dict as a posenc::config_map.
posenc::config_map config_of(const py::dict& d) {
  posenc::config_map m;
  for (auto [key, value] : d) {
    if (!py::isinstance<py::str>(key)) type_error("Rope", "rope_scaling keys must be strings, got " + type_name(key));
    const auto k = key.cast<std::string>();
    if (py::isinstance<py::bool_>(value)) {
      m[k] = value.cast<bool>();
    } else if (py::isinstance<py::int_>(value)) {
      m[k] = int64_of(value, "Rope", "rope_scaling['" + k + "']");
    } else if (py::isinstance<py::float_>(value)) {
      m[k] = value.cast<double>();
    } else if (py::isinstance<py::str>(value)) {
      m[k] = value.cast<std::string>();
    } else if (value.is_none()) {
      continue;  // JSON null: as if absent, as HF reads it
    } else if (py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value) ||
               py::isinstance<py::array>(value)) {
      m[k] = floats_of(value, "Rope", "rope_scaling['" + k + "']");
    } else {
      type_error("Rope", "rope_scaling['" + k + "'] has unsupported type " + type_name(value));
    }
  }
  return m;
}

posenc::rope_scaling scaling_of(py::handle obj) {
  if (obj.is_none()) return posenc::no_scaling{};
  if (py::isinstance<posenc::linear_scaling>(obj)) return obj.cast<posenc::linear_scaling>();
  if (py::isinstance<posenc::ntk_aware_scaling>(obj)) return obj.cast<posenc::ntk_aware_scaling>();
  if (py::isinstance<posenc::dynamic_ntk_scaling>(obj)) return obj.cast<posenc::dynamic_ntk_scaling>();
  if (py::isinstance<posenc::yarn_scaling>(obj)) return obj.cast<posenc::yarn_scaling>();
  if (py::isinstance<posenc::llama3_scaling>(obj)) return obj.cast<posenc::llama3_scaling>();
  if (py::isinstance<posenc::longrope_scaling>(obj)) return obj.cast<posenc::longrope_scaling>();
  type_error("Rope",
             "scaling must be None or one of LinearScaling, NtkAwareScaling, DynamicNtkScaling, "
             "YarnScaling, Llama3Scaling, LongRopeScaling, got " +
                 type_name(obj));
}

template <class E>
E enum_of(const std::string& s, std::initializer_list<std::pair<const char*, E>> names, const std::string& where,
          const char* arg) {
  std::string all;
  for (const auto& [n, e] : names) {
    if (s == n) return e;
    all += (all.empty() ? "'" : ", '") + std::string(n) + "'";
  }
  value_error(where, std::string(arg) + " = '" + s + "': must be one of " + all);
}

py_rope make_rope(const call_args& a) {
  posenc::rope_params p{.head_dim = a.int64("head_dim", 128),
                        .rotary_dim = a.int64("rotary_dim", 0),
                        .layout = enum_of<posenc::rope_layout>(a.str("layout", "half_split"),
                                                               {{"half_split", posenc::rope_layout::half_split},
                                                                {"interleaved", posenc::rope_layout::interleaved}},
                                                               "Rope", "layout"),
                        .base = a.float64("base", 10000.0),
                        .scaling = scaling_of(a["scaling"]),
                        .attention_factor = a.optional_float64("attention_factor")};
  if (a.has("rope_scaling")) {
    if (!py::isinstance<py::dict>(a["rope_scaling"]))
      type_error("Rope", "rope_scaling must be a dict, got " + type_name(a["rope_scaling"]));
    if (a.has("scaling")) value_error("Rope", "give scaling or rope_scaling, not both");
    const auto cfg = config_of(py::reinterpret_borrow<py::dict>(a["rope_scaling"]));
    p = posenc::rope_params_from_config(p, cfg);
  }
  return py_rope{posenc::rope<float>(p), posenc::rope<double>(p)};
}

/// The `[rows, cols]` table of a float32/float64 array argument, copied into double (encoder
/// tables are copied by the encoders anyway).
posenc::row_matrix<double> table_of(py::handle obj, const std::string& where, const char* arg) {
  elem kind;
  auto a = float_array(obj, where, arg, kind);
  auto dense = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a);
  if (dense.ndim() != 2) value_error(where, std::string(arg) + " must be 2-D, got shape " + shape_text(a));
  posenc::row_matrix<double> m(dense.shape(0), dense.shape(1));
  std::copy_n(dense.data(), m.size(), m.data());
  return m;
}

// ---------------------------------------------------------------------------------------------
// Encoder methods, per element type.

template <class T>
void rope_rotate(const py_rope& r, const py::array& a, py::handle pos) {
  auto m = matrix_of<T>(a, "Rope.rotate", "x", true);
  if (m.ndim == 3 && m.head_dim3 != r.f.head_dim())
    value_error("Rope.rotate", "x has head_dim " + std::to_string(m.head_dim3) +
                                   " (its last axis) but the encoder has head_dim " + std::to_string(r.f.head_dim()));
  if (m.view.cols % r.f.head_dim() != 0)
    value_error("Rope.rotate", "x has " + std::to_string(m.view.cols) + " columns, not a multiple of head_dim " +
                                   std::to_string(r.f.head_dim()));
  position_arg p(pos, m.view.rows, "Rope.rotate", "positions");
  py::gil_scoped_release unlocked;
  r.get<T>().rotate(m.view, p.get(), &workers());
}

template <class T>
void sinusoidal_add(const py_sinusoidal& s, const py::array& a, py::handle pos) {
  auto m = matrix_of<T>(a, "Sinusoidal.add_to", "x", false);
  if (m.view.cols != s.f.dim())
    value_error("Sinusoidal.add_to",
                "x has " + std::to_string(m.view.cols) + " columns but dim is " + std::to_string(s.f.dim()));
  position_arg p(pos, m.view.rows, "Sinusoidal.add_to", "positions");
  py::gil_scoped_release unlocked;
  s.get<T>().add_to(m.view, p.get());
}

template <class T>
py::array sinusoidal_table(const py_sinusoidal& s, const position_arg& p) {
  auto out = new_array<T>({p.size(), s.f.dim()});
  posenc::strided_view<T> v(out.mutable_data(), p.size(), s.f.dim());
  py::gil_scoped_release unlocked;
  s.get<T>().write_table(v, p.get());
  return out;
}

/// `[len(qpos), len(kpos)]` tile of zeros plus the encoder's bias for `head`.
template <class T, class Enc>
py::array bias_tile(const Enc& e, index_t head, py::handle qpos, py::handle kpos, index_t num_heads,
                    index_t head_offset, const std::string& where) {
  if (head < 0 || head + head_offset >= num_heads)
    value_error(where,
                "head = " + std::to_string(head) + ": must be in [0, " + std::to_string(num_heads - head_offset) + ")");
  auto qp = free_positions(qpos, where, "qpos");
  auto kp = free_positions(kpos, where, "kpos");
  auto out = new_array<T>({qp.size(), kp.size()});
  posenc::strided_view<T> v(out.mutable_data(), qp.size(), kp.size());
  std::fill_n(v.data, qp.size() * kp.size(), T(0));
  e.template get<T>().add_bias_tile(v, head, qp.get(), kp.get());
  return out;
}

/// Adds `bias(head, qpos, kpos)` and `bias_tile(head, qpos, kpos, dtype)` to the class of a
/// position-bias encoder (ALiBi, T5).
template <class W>
void def_bias_methods(py::class_<W>& c, const std::string& name) {
  constexpr const char* bias_params = "head, qpos, kpos";
  constexpr const char* tile_params = "head, qpos, kpos, dtype='float32'";
  c.def(
       "bias",
       [sig = sig_of(name + ".bias", bias_params)](const W& w, py::args args, py::kwargs kwargs) {
         const call_args a(sig, args, kwargs);
         return w.d.bias(a.int64("head", 0), a.int64("qpos", 0), a.int64("kpos", 0));
       },
       doc_of("bias", true, bias_params,
              "The bias (float64) of local head `head` for a query at qpos and a key at kpos.")
           .c_str())
      .def(
          "bias_tile",
          [sig = sig_of(name + ".bias_tile", tile_params)](const W& w, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            const auto& p = w.d.params();
            const index_t head = a.int64("head", 0);
            return parse_dtype(a["dtype"], sig.name) == elem::f32
                       ? bias_tile<float>(w, head, a["qpos"], a["kpos"], p.num_heads, p.head_offset, sig.name)
                       : bias_tile<double>(w, head, a["qpos"], a["kpos"], p.num_heads, p.head_offset, sig.name);
          },
          doc_of("bias_tile", true, tile_params,
                 "A new [len(qpos), len(kpos)] array of the biases of local head `head`.")
              .c_str());
}

// ---------------------------------------------------------------------------------------------
// Attention

struct attention_knobs {
  posenc::attention_params p;
  bool want_lse = false;
};

/// The encoder's head_dim must be the one of q.
void check_head_dim(index_t enc, index_t d, const char* encoder) {
  if (enc != d)
    value_error("attention", std::string("the ") + encoder + " has head_dim " + std::to_string(enc) +
                                 " but q has head_dim " + std::to_string(d));
}

/// A score-bias encoder must cover `heads` global heads from its head_offset.
template <class P>
void check_heads(const P& p, index_t heads, const char* what) {
  if (p.head_offset + heads > p.num_heads)
    value_error("attention", std::string("the ") + what + " for " + std::to_string(p.num_heads - p.head_offset) +
                                 " heads (num_heads - head_offset) but heads = " + std::to_string(heads));
}

template <class T, class Enc>
void run_attention(const matrix_arg<const T>& q, const matrix_arg<const T>& k, const matrix_arg<const T>& v,
                   posenc::strided_view<T> out, const position_arg& qp, const position_arg& kp, const Enc& enc,
                   const attention_knobs& kn, posenc::strided_view<T> lse) {
  py::gil_scoped_release unlocked;
  if (kn.want_lse) {
    posenc::attention(q.view, k.view, v.view, out, qp.get(), kp.get(), enc, kn.p, lse);
  } else {
    posenc::attention(q.view, k.view, v.view, out, qp.get(), kp.get(), enc, kn.p);
  }
}

/// The message for a 3-D `name` whose axis 1 is not `want` heads (kv heads when `kv`).
/// `transposed`: its axis 0 is, so it is most likely `[heads, tokens, head_dim]`, the per-head
/// layout of many PyTorch models.
std::string axis1_error(const py::array& a, const char* name, bool kv, index_t want, bool transposed) {
  const std::string heads = kv ? "kv_heads" : "heads";
  const std::string head = std::string(name) + " has shape " + shape_text(a) + ": ";
  if (transposed)
    return head + "posenc takes [tokens, " + heads + ", head_dim]; this looks like [" + heads +
           ", tokens, head_dim]; pass " + name + ".transpose(1, 0, 2) made contiguous";
  return head + "its axis 1 holds the " + (kv ? "kv heads" : "heads") + " but " + heads + " = " + std::to_string(want);
}

template <class T>
py::object attention_typed(const py::array& qa, const py::array& ka, const py::array& va, py::handle qpos,
                           py::handle kpos, py::handle encoding, std::optional<index_t> heads,
                           std::optional<index_t> kv_heads, attention_knobs kn, py::handle out_obj) {
  const std::string w = "attention";
  const auto q = matrix_of<const T>(qa, w, "q", true);
  const auto k = matrix_of<const T>(ka, w, "k", true);
  const auto v = matrix_of<const T>(va, w, "v", true);
  // Heads: given, else a 3-D q's axis 1. A 2-D q has no head axis, and taking it as one head
  // would attend across the columns of what may be many heads: heads= is required.
  if (!heads && q.ndim == 2)
    value_error(w, "q is 2-D [tokens, heads * head_dim]: pass heads= (and kv_heads= for GQA/MQA)");
  const index_t h = heads ? *heads : q.heads3;
  if (h <= 0) value_error(w, "heads = " + std::to_string(h) + ": must be positive");
  if (q.ndim == 3 && q.heads3 != h) value_error(w, axis1_error(qa, "q", false, h, qa.shape(0) == h));
  // kv_heads: given, else a 3-D k's axis 1, else heads.
  const index_t hk = kv_heads ? *kv_heads : (k.ndim == 3 ? k.heads3 : h);
  if (!kv_heads && k.ndim == 3 && (hk <= 0 || h % hk != 0)) {
    const index_t k0 = ka.shape(0);
    if (k0 > 0 && h % k0 == 0) value_error(w, axis1_error(ka, "k", true, k0, true));
    value_error(w, "k has shape " + shape_text(ka) + ": its axis 1 holds the kv heads, and " + std::to_string(hk) +
                       " does not divide heads = " + std::to_string(h));
  }
  for (auto [m, a, name] : {std::tuple{&k, &ka, "k"}, std::tuple{&v, &va, "v"}})
    if (m->ndim == 3 && m->heads3 != hk) value_error(w, axis1_error(*a, name, true, hk, a->shape(0) == hk));
  if (hk <= 0 || h % hk != 0)
    value_error(w, "kv_heads = " + std::to_string(hk) + ": must be positive and divide heads = " + std::to_string(h));
  if (q.view.cols % h != 0)
    value_error(w, "q has " + std::to_string(q.view.cols) + " columns, not a multiple of heads = " + std::to_string(h));
  const index_t d = q.view.cols / h;
  if (d == 0) value_error(w, "q has head_dim 0");
  for (auto [m, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    if (m->view.cols != hk * d)
      value_error(w, std::string(name) + " has " + std::to_string(m->view.cols) +
                         " columns but kv_heads * head_dim = " + std::to_string(hk) + " * " + std::to_string(d) +
                         " = " + std::to_string(hk * d) + " are needed" +
                         (!kv_heads && m->ndim == 2 ? "; pass kv_heads= for GQA/MQA" : ""));
  }
  if (v.view.rows != k.view.rows)
    value_error(w, "v has " + std::to_string(v.view.rows) + " rows but k has " + std::to_string(k.view.rows));
  position_arg qp(qpos, q.view.rows, w, "qpos");
  position_arg kp(kpos, k.view.rows, w, "kpos");
  kn.p.heads = h;
  kn.p.kv_heads = hk;

  py::array out_arr;
  if (out_obj.is_none()) {
    std::vector<py::ssize_t> shape(qa.shape(), qa.shape() + qa.ndim());
    out_arr = new_array<T>(shape);
  } else {
    elem kind;
    out_arr = float_array(out_obj, w, "out", kind);
    require_dtype(kind, std::same_as<T, float> ? elem::f32 : elem::f64, w, "out", "q");
  }
  const auto o = matrix_of<T>(out_arr, w, "out", true);
  if (o.view.rows != q.view.rows || o.view.cols != q.view.cols)
    value_error(w, "out has shape " + shape_text(out_arr) + " but q has shape " + shape_text(qa));

  py::array_t<T> lse_arr;
  posenc::strided_view<T> lse;
  if (kn.want_lse) {
    lse_arr = new_array<T>({q.view.rows, h});
    lse = posenc::strided_view<T>(lse_arr.mutable_data(), q.view.rows, h);
  }

  if (encoding.is_none()) {
    run_attention<T>(q, k, v, o.view, qp, kp, posenc::no_position<T>{}, kn, lse);
  } else if (py::isinstance<py_rope>(encoding)) {
    const auto& r = encoding.cast<const py_rope&>().get<T>();
    check_head_dim(r.head_dim(), d, "Rope");
    run_attention<T>(q, k, v, o.view, qp, kp, r, kn, lse);
  } else if (py::isinstance<py_alibi>(encoding)) {
    const auto& a = encoding.cast<const py_alibi&>().get<T>();
    check_heads(a.params(), h, "Alibi has slopes");
    run_attention<T>(q, k, v, o.view, qp, kp, a, kn, lse);
  } else if (py::isinstance<py_t5>(encoding)) {
    const auto& t = encoding.cast<const py_t5&>().get<T>();
    check_heads(t.params(), h, "T5Bias has a table");
    run_attention<T>(q, k, v, o.view, qp, kp, t, kn, lse);
  } else if (py::isinstance<py_shaw>(encoding)) {
    const auto& s = encoding.cast<const py_shaw&>().get<T>();
    check_head_dim(s.head_dim(), d, "ShawRelative");
    run_attention<T>(q, k, v, o.view, qp, kp, s, kn, lse);
  } else if (py::isinstance<py_sinusoidal>(encoding)) {
    type_error(w,
               "Sinusoidal is an additive-input encoding: add it to the token embeddings before the Q/K/V "
               "projections (Sinusoidal.add_to) and pass encoding=None here");
  } else {
    type_error(w, "encoding must be None, Rope, Alibi, T5Bias or ShawRelative, got " + type_name(encoding));
  }
  if (kn.want_lse) return py::make_tuple(out_arr, lse_arr);
  return out_arr;
}

/// `window`: None, or a pair (left, right) of ints.
std::pair<position, position> window_of(py::handle obj) {
  if (obj.is_none()) return {-1, -1};
  if (!(py::isinstance<py::tuple>(obj) || py::isinstance<py::list>(obj)) || py::len(obj) != 2)
    type_error("attention", "window must be a pair (left, right) of ints, -1 for unbounded, got " + type_name(obj));
  auto s = py::reinterpret_borrow<py::sequence>(obj);
  return {int64_of(s[0], "attention", "window[0]"), int64_of(s[1], "attention", "window[1]")};
}

constexpr const char* attention_params_text =
    "q, k, v, qpos=None, kpos=None, encoding=None, *, heads=None, kv_heads=None, scale=None, causal=False, "
    "window=(-1, -1), return_lse=False, out=None, threads=0, q_tile=0, k_tile=0";

py::object attention(const call_args& a) {
  const std::string w = "attention";
  elem kq, kk, kv;
  auto qa = float_array(a["q"], w, "q", kq);
  auto ka = float_array(a["k"], w, "k", kk);
  auto va = float_array(a["v"], w, "v", kv);
  require_dtype(kk, kq, w, "k", "q");
  require_dtype(kv, kq, w, "v", "q");
  attention_knobs kn;
  kn.p.scale = a.optional_float64("scale");
  kn.p.causal = a.flag("causal", false);
  std::tie(kn.p.window_left, kn.p.window_right) = window_of(a["window"]);
  const std::int64_t threads = a.int64("threads", 0);
  if (threads < std::numeric_limits<int>::min() || threads > std::numeric_limits<int>::max())
    overflow_error(w, "threads = " + std::to_string(threads) + " does not fit in int");
  kn.p.threads = static_cast<int>(threads);
  kn.p.executor = &workers();
  kn.p.q_tile = a.int64("q_tile", 0);
  kn.p.k_tile = a.int64("k_tile", 0);
  kn.want_lse = a.flag("return_lse", false);
  const auto heads = a.optional_int64("heads"), kv_heads = a.optional_int64("kv_heads");
  if (kq == elem::f32)
    return attention_typed<float>(qa, ka, va, a["qpos"], a["kpos"], a["encoding"], heads, kv_heads, kn, a["out"]);
  return attention_typed<double>(qa, ka, va, a["qpos"], a["kpos"], a["encoding"], heads, kv_heads, kn, a["out"]);
}

template <class R>
py::array_t<double> to_numpy(const R& values) {
  py::array_t<double> a(static_cast<py::ssize_t>(std::size(values)));
  std::copy(std::begin(values), std::end(values), a.mutable_data());
  return a;
}

/// A constructor of `cls` taking (*args, **kwargs), bound by `params` and built by
/// `make(call_args)`; its docstring comes from `doc_of("__init__", true, params, ...)`.
template <class F>
auto init_of(std::string cls, const char* params, F make) {
  return py::init([sig = sig_of(std::move(cls), params), make](py::args args, py::kwargs kwargs) {
    return make(call_args(sig, args, kwargs));
  });
}

}  // namespace

PYBIND11_MODULE(posenc, m) {
  // Every function below writes its Python signature as the first line of its docstring.
  py::options options;
  options.disable_function_signatures();

  m.doc() =
      "posenc: positional encodings (sinusoidal, RoPE and its scalings, ALiBi, T5 bias, Shaw) and blockwise "
      "attention on numpy float32/float64 arrays, used in place.\n\n"
      "Matrices are [tokens, heads * head_dim] (2-D) or [tokens, heads, head_dim] (3-D), with unit stride along "
      "the last axis (C-contiguous, or a slice of rows of one). Positions are None (0..n-1), a range with step 1, "
      "an int64 array or a list of ints.";
  m.attr("__version__") = std::to_string(POSENC_VERSION_MAJOR) + "." + std::to_string(POSENC_VERSION_MINOR) + "." +
                          std::to_string(POSENC_VERSION_PATCH);
  py::register_exception<posenc::precondition_error>(m, "PreconditionError", PyExc_ValueError);

  // Frequency policies (docs/rope_scaling.md), keyword arguments with the C++ aggregates' names and defaults.
  constexpr const char* linear_params = "*, factor=1.0";
  py::class_<posenc::linear_scaling>(m, "LinearScaling",
                                     "Position interpolation (Chen et al. 2023): inv_freq / factor.")
      .def(init_of("LinearScaling", linear_params,
                   [](const call_args& a) { return posenc::linear_scaling{a.float64("factor", 1.0)}; }),
           doc_of("__init__", true, linear_params, "").c_str())
      .def_readonly("factor", &posenc::linear_scaling::factor);
  constexpr const char* ntk_params = "*, alpha=1.0";
  py::class_<posenc::ntk_aware_scaling>(m, "NtkAwareScaling", "NTK-aware: base * alpha^(r/(r-2)).")
      .def(init_of("NtkAwareScaling", ntk_params,
                   [](const call_args& a) { return posenc::ntk_aware_scaling{a.float64("alpha", 1.0)}; }),
           doc_of("__init__", true, ntk_params, "").c_str())
      .def_readonly("alpha", &posenc::ntk_aware_scaling::alpha);
  constexpr const char* dynamic_params = "*, factor=1.0, original_max_position=2048, sequence_length=0";
  py::class_<posenc::dynamic_ntk_scaling>(
      m, "DynamicNtkScaling", "Dynamic NTK: base * (s L / L0 - (s - 1))^(r/(r-2)) for L = sequence_length > L0.")
      .def(init_of("DynamicNtkScaling", dynamic_params,
                   [](const call_args& a) {
                     return posenc::dynamic_ntk_scaling{a.float64("factor", 1.0),
                                                        a.int64("original_max_position", 2048),
                                                        a.int64("sequence_length", 0)};
                   }),
           doc_of("__init__", true, dynamic_params, "").c_str())
      .def_readonly("factor", &posenc::dynamic_ntk_scaling::factor)
      .def_readonly("original_max_position", &posenc::dynamic_ntk_scaling::original_max_position)
      .def_readonly("sequence_length", &posenc::dynamic_ntk_scaling::sequence_length);
  constexpr const char* yarn_params =
      "*, factor=1.0, original_max_position=4096, beta_fast=32.0, beta_slow=1.0, mscale=0.0, mscale_all_dim=0.0, "
      "truncate=True";
  py::class_<posenc::yarn_scaling>(
      m, "YarnScaling", "YaRN (Peng et al. 2023): ramp between inv and inv / factor; magnitude 0.1 ln s + 1.")
      .def(init_of("YarnScaling", yarn_params,
                   [](const call_args& a) {
                     return posenc::yarn_scaling{a.float64("factor", 1.0),     a.int64("original_max_position", 4096),
                                                 a.float64("beta_fast", 32.0), a.float64("beta_slow", 1.0),
                                                 a.float64("mscale", 0.0),     a.float64("mscale_all_dim", 0.0),
                                                 a.flag("truncate", true)};
                   }),
           doc_of("__init__", true, yarn_params, "").c_str())
      .def_readonly("factor", &posenc::yarn_scaling::factor)
      .def_readonly("original_max_position", &posenc::yarn_scaling::original_max_position);
  constexpr const char* llama3_params =
      "*, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192";
  py::class_<posenc::llama3_scaling>(m, "Llama3Scaling",
                                     "Llama 3.1: keep, divide or blend each frequency by its wavelength.")
      .def(init_of("Llama3Scaling", llama3_params,
                   [](const call_args& a) {
                     return posenc::llama3_scaling{a.float64("factor", 8.0), a.float64("low_freq_factor", 1.0),
                                                   a.float64("high_freq_factor", 4.0),
                                                   a.int64("original_max_position", 8192)};
                   }),
           doc_of("__init__", true, llama3_params, "").c_str())
      .def_readonly("factor", &posenc::llama3_scaling::factor)
      .def_readonly("original_max_position", &posenc::llama3_scaling::original_max_position);
  constexpr const char* longrope_params =
      "*, short_factor, long_factor, original_max_position=4096, max_position=0, choice='per_length', "
      "sequence_length=0, factor=0.0";
  py::class_<posenc::longrope_scaling>(m, "LongRopeScaling",
                                       "LongRoPE (Phi-3): 1 / (f_i base^(2i/r)) with short or long factors.")
      .def(init_of("LongRopeScaling", longrope_params,
                   [](const call_args& a) {
                     return posenc::longrope_scaling{
                         floats_of(a["short_factor"], "LongRopeScaling", "short_factor"),
                         floats_of(a["long_factor"], "LongRopeScaling", "long_factor"),
                         a.int64("original_max_position", 4096),
                         a.int64("max_position", 0),
                         enum_of<posenc::longrope_choice>(a.str("choice", "per_length"),
                                                          {{"per_length", posenc::longrope_choice::per_length},
                                                           {"fixed_long", posenc::longrope_choice::fixed_long}},
                                                          "LongRopeScaling", "choice"),
                         a.int64("sequence_length", 0),
                         a.float64("factor", 0.0)};
                   }),
           doc_of("__init__", true, longrope_params, "").c_str());

  constexpr const char* rope_params =
      "*, head_dim=128, rotary_dim=0, base=10000.0, layout='half_split', scaling=None, rope_scaling=None, "
      "attention_factor=None";
  constexpr const char* rotate_params = "x, positions=None";
  constexpr const char* cos_sin_params = "positions";
  py::class_<py_rope>(m, "Rope",
                      "Rotary position embedding (Su et al. 2021) with an optional frequency policy.\n\n"
                      "Rope(head_dim=128, rotary_dim=0, base=10000.0, layout='half_split' | 'interleaved',\n"
                      "     scaling=None | LinearScaling(...) | ..., rope_scaling=None | {HF rope_scaling dict},\n"
                      "     attention_factor=None)\n"
                      "rope_scaling reads a Hugging Face config's dict ('rope_type', 'factor', 'rope_theta', ...).")
      .def(init_of("Rope", rope_params, make_rope), doc_of("__init__", true, rope_params, "").c_str())
      .def(
          "rotate",
          [sig = sig_of("Rope.rotate", rotate_params)](const py_rope& r, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            elem kind;
            auto x = float_array(a["x"], sig.name, "x", kind);
            if (kind == elem::f32) {
              rope_rotate<float>(r, x, a["positions"]);
            } else {
              rope_rotate<double>(r, x, a["positions"]);
            }
          },
          doc_of("rotate", true, rotate_params,
                 "Rotates every head of x ([tokens, heads * head_dim] or [tokens, heads, head_dim]) in place, row i "
                 "by positions[i].")
              .c_str())
      .def(
          "cos_sin",
          [sig = sig_of("Rope.cos_sin", cos_sin_params)](const py_rope& r, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            auto p = free_positions(a["positions"], sig.name, "positions");
            const index_t half = r.f.rotary_dim() / 2;
            auto c = new_array<double>({p.size(), half});
            auto s = new_array<double>({p.size(), half});
            const auto pp = p.get();
            for (index_t i = 0; i < p.size(); ++i) r.d.unit_cos_sin(pp[i], c.mutable_data(i, 0), s.mutable_data(i, 0));
            return py::make_tuple(c, s);
          },
          doc_of("cos_sin", true, cos_sin_params,
                 "(cos, sin), each [len(positions), rotary_dim / 2] float64: cos and sin of position * inv_freq "
                 "(without the magnitude).")
              .c_str())
      .def_property_readonly("head_dim", [](const py_rope& r) { return r.f.head_dim(); })
      .def_property_readonly("rotary_dim", [](const py_rope& r) { return r.f.rotary_dim(); })
      .def_property_readonly("base", [](const py_rope& r) { return r.f.base(); })
      .def_property_readonly("layout",
                             [](const py_rope& r) {
                               return r.f.layout() == posenc::rope_layout::half_split ? "half_split" : "interleaved";
                             })
      .def_property_readonly(
          "inv_freq", [](const py_rope& r) { return to_numpy(r.d.inv_freq()); },
          "The rotary_dim / 2 inverse frequencies after the scaling policy (float64 copy).")
      .def_property_readonly(
          "magnitude", [](const py_rope& r) { return r.f.magnitude(); },
          "The factor multiplying cos and sin (YaRN's 0.1 ln s + 1, ...).")
      .def_property_readonly("name", [](const py_rope& r) { return std::string(r.f.name()); });

  constexpr const char* sinusoidal_params =
      "*, dim=512, base=10000.0, layout='interleaved', shifted_denominator=False, position_offset=0";
  constexpr const char* add_to_params = "x, positions=None";
  constexpr const char* table_params = "positions, dtype='float32'";
  py::class_<py_sinusoidal>(m, "Sinusoidal",
                            "Sinusoidal absolute position encoding (Vaswani et al. 2017), added to token embeddings.")
      .def(init_of("Sinusoidal", sinusoidal_params,
                   [](const call_args& a) {
                     const posenc::sinusoidal_params p{.dim = a.int64("dim", 512),
                                                       .base = a.float64("base", 10000.0),
                                                       .layout = enum_of<posenc::sinusoidal_layout>(
                                                           a.str("layout", "interleaved"),
                                                           {{"interleaved", posenc::sinusoidal_layout::interleaved},
                                                            {"concatenated", posenc::sinusoidal_layout::concatenated}},
                                                           "Sinusoidal", "layout"),
                                                       .shifted_denominator = a.flag("shifted_denominator", false),
                                                       .position_offset = a.int64("position_offset", 0)};
                     return py_sinusoidal{posenc::sinusoidal<float>(p), posenc::sinusoidal<double>(p)};
                   }),
           doc_of("__init__", true, sinusoidal_params, "").c_str())
      .def(
          "add_to",
          [sig = sig_of("Sinusoidal.add_to", add_to_params)](const py_sinusoidal& s, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            elem kind;
            auto x = float_array(a["x"], sig.name, "x", kind);
            if (kind == elem::f32) {
              sinusoidal_add<float>(s, x, a["positions"]);
            } else {
              sinusoidal_add<double>(s, x, a["positions"]);
            }
          },
          doc_of("add_to", true, add_to_params, "x[i] += PE[positions[i]] in place; x is [tokens, dim].").c_str())
      .def(
          "table",
          [sig = sig_of("Sinusoidal.table", table_params)](const py_sinusoidal& s, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            auto p = free_positions(a["positions"], sig.name, "positions");
            return parse_dtype(a["dtype"], sig.name) == elem::f32 ? sinusoidal_table<float>(s, p)
                                                                  : sinusoidal_table<double>(s, p);
          },
          doc_of("table", true, table_params, "A new [len(positions), dim] array of PE[positions[i]].").c_str())
      .def_property_readonly("dim", [](const py_sinusoidal& s) { return s.f.dim(); })
      .def_property_readonly("frequencies", [](const py_sinusoidal& s) { return to_numpy(s.d.frequencies()); });

  constexpr const char* alibi_params = "*, num_heads=8, head_offset=0, form='causal', max_bias=8.0";
  py::class_<py_alibi> alibi_class(m, "Alibi",
                                   "ALiBi (Press et al. 2022): bias -slope_h * (qpos - kpos), or * |qpos - kpos|.");
  alibi_class
      .def(init_of("Alibi", alibi_params,
                   [](const call_args& a) {
                     const posenc::alibi_params p{
                         .num_heads = a.int64("num_heads", 8),
                         .head_offset = a.int64("head_offset", 0),
                         .form = enum_of<posenc::alibi_form>(
                             a.str("form", "causal"),
                             {{"causal", posenc::alibi_form::causal}, {"symmetric", posenc::alibi_form::symmetric}},
                             "Alibi", "form"),
                         .max_bias = a.float64("max_bias", 8.0)};
                     return py_alibi{posenc::alibi<float>(p), posenc::alibi<double>(p)};
                   }),
           doc_of("__init__", true, alibi_params, "").c_str())
      .def_property_readonly(
          "slopes",
          [](const py_alibi& a) {
            return to_numpy(posenc::alibi<double>::slopes(a.d.params().num_heads, a.d.params().max_bias));
          },
          "The slopes of all num_heads global heads (float64).");
  def_bias_methods(alibi_class, "Alibi");

  constexpr const char* t5_params = "table, *, max_distance=128, bidirectional=True, head_offset=0";
  constexpr const char* bucket_params = "relative";
  py::class_<py_t5> t5_class(m, "T5Bias",
                             "T5 bucketed relative position bias with a learned [num_buckets, num_heads] table.");
  t5_class
      .def(init_of("T5Bias", t5_params,
                   [](const call_args& a) {
                     const auto t = table_of(a["table"], "T5Bias", "table");
                     const posenc::t5_bias_params p{.num_heads = t.cols(),
                                                    .num_buckets = t.rows(),
                                                    .max_distance = a.int64("max_distance", 128),
                                                    .bidirectional = a.flag("bidirectional", true),
                                                    .head_offset = a.int64("head_offset", 0)};
                     const posenc::row_matrix<float> tf = t.cast<float>();
                     return py_t5{posenc::t5_relative_bias<float>(p, tf), posenc::t5_relative_bias<double>(p, t)};
                   }),
           doc_of("__init__", true, t5_params, "table: [num_buckets, num_heads] float32/float64 (copied).").c_str())
      .def(
          "bucket",
          [sig = sig_of("T5Bias.bucket", bucket_params)](const py_t5& t, py::args args, py::kwargs kwargs) {
            return t.d.bucket(call_args(sig, args, kwargs).int64("relative", 0));
          },
          doc_of("bucket", true, bucket_params, "The bucket of relative = kpos - qpos.").c_str());
  def_bias_methods(t5_class, "T5Bias");

  constexpr const char* shaw_params = "key_table, value_table";
  py::class_<py_shaw>(m, "ShawRelative",
                      "Shaw et al. 2018 relative keys and values: tables [2K + 1, head_dim], row r = distance r - K.")
      .def(init_of(
               "ShawRelative", shaw_params,
               [](const call_args& a) {
                 const auto ak = table_of(a["key_table"], "ShawRelative", "key_table");
                 const auto av = table_of(a["value_table"], "ShawRelative", "value_table");
                 if (ak.rows() % 2 != 1)
                   value_error("ShawRelative", "key_table has " + std::to_string(ak.rows()) + " rows; it needs 2K + 1");
                 const posenc::shaw_params p{.head_dim = ak.cols(), .max_relative_position = (ak.rows() - 1) / 2};
                 const posenc::row_matrix<float> akf = ak.cast<float>(), avf = av.cast<float>();
                 return py_shaw{posenc::shaw_relative<float>(p, akf, avf), posenc::shaw_relative<double>(p, ak, av)};
               }),
           doc_of("__init__", true, shaw_params, "").c_str())
      .def_property_readonly("head_dim", [](const py_shaw& s) { return s.d.head_dim(); })
      .def_property_readonly("max_relative_position", [](const py_shaw& s) { return s.d.max_relative_position(); });

  m.def(
      "attention",
      [sig = sig_of("attention", attention_params_text,
                    {{"rotation",
                      "removed: the encoding is always applied in the kernel; for q and k already rotated "
                      "with Rope.rotate, pass encoding=None"}})](py::args args, py::kwargs kwargs) {
        return attention(call_args(sig, args, kwargs));
      },
      doc_of("attention", false, attention_params_text,
             "Blockwise softmax attention: out_i = sum_j softmax_j(scale q_i.k_j + bias_ij) v_j.\n\n"
             "q: [n_q, heads, d], or [n_q, heads * d] with heads=; k, v: [n_kv, kv_heads, d], or [n_kv, kv_heads * d]\n"
             "(heads and kv_heads default to the 3-D arrays' axis 1, kv_heads to heads for a 2-D k). GQA/MQA:\n"
             "query head h reads kv head h // (heads // kv_heads). All float32 or all float64.\n"
             "qpos, kpos: positions (default 0..n-1).\n"
             "encoding: None, Rope, Alibi, T5Bias or ShawRelative, always applied in the kernel (a Rope rotates\n"
             "copies of the q and k tiles). For q and k the caller rotated (Rope.rotate, a cache of rotated keys)\n"
             "pass encoding=None: never both.\n"
             "causal: key j visible when kpos[j] <= qpos[i]. window=(left, right): keys within\n"
             "[qpos - left, qpos + right], -1 unbounded. scale defaults to 1/sqrt(d).\n"
             "Returns out (the shape of q; written into out= when given), or (out, lse [n_q, heads], -inf for a\n"
             "query with no visible key) with return_lse. The GIL is released while it runs.")
          .c_str());
}
