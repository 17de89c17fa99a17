// SPDX-License-Identifier: Apache-2.0
// The Python module `posenc`: posenc's encoders and blockwise attention on NumPy arrays.
//
// Arrays are used in place, never copied: a float32 or float64 array whose last axis has unit
// stride (C-contiguous, or a slice of rows of one) becomes a posenc::strided_view. Anything else
// raises TypeError (wrong type or dtype) or ValueError (wrong ndim, shape, layout, read-only
// output) naming the function and the argument, before any work starts. Parameter errors from the
// library (std::invalid_argument, "posenc: rope_params.base = -1: ...") become ValueError too.
// The GIL is released while rotating, encoding and attending.

// Shape bugs that slip past the checks here raise posenc.PreconditionError (a ValueError).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
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
  if (s.size() > 40) s = s.substr(0, 20) + "..." + s.substr(s.size() - 10) + " (" + std::to_string(s.size()) + " digits)";
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
/// when it came as a 3-D `[tokens, heads, head_dim]` array (0 for 2-D).
template <class S>
struct matrix_arg {
  posenc::strided_view<S> view;
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
    return posenc::positions(std::span<const position>(list_ ? list_ : owned_.data(), static_cast<std::size_t>(count_)));
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

elem parse_dtype(py::handle obj, const std::string& where) {
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
      m[k] = value.cast<std::int64_t>();
    } else if (py::isinstance<py::float_>(value)) {
      m[k] = value.cast<double>();
    } else if (py::isinstance<py::str>(value)) {
      m[k] = value.cast<std::string>();
    } else if (value.is_none()) {
      continue;  // JSON null: as if absent, as HF reads it
    } else if (py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value) ||
               py::isinstance<py::array>(value)) {
      try {
        m[k] = value.cast<std::vector<double>>();
      } catch (const py::cast_error&) {
        type_error("Rope", "rope_scaling['" + k + "'] must be a list of numbers");
      }
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

py_rope make_rope(index_t head_dim, index_t rotary_dim, double base, const std::string& layout, py::handle scaling,
                  std::optional<py::dict> rope_scaling, std::optional<double> attention_factor) {
  posenc::rope_params p{
      .head_dim = head_dim,
      .rotary_dim = rotary_dim,
      .layout = enum_of<posenc::rope_layout>(
          layout, {{"half_split", posenc::rope_layout::half_split}, {"interleaved", posenc::rope_layout::interleaved}},
          "Rope", "layout"),
      .base = base,
      .scaling = scaling_of(scaling),
      .attention_factor = attention_factor};
  if (rope_scaling) {
    if (!scaling.is_none()) value_error("Rope", "give scaling or rope_scaling, not both");
    const auto cfg = config_of(*rope_scaling);
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
  if (m.head_dim3 && m.head_dim3 != r.f.head_dim())
    value_error("Rope.rotate", "x has head_dim " + std::to_string(m.head_dim3) +
                                   " (its last axis) but the encoder has head_dim " + std::to_string(r.f.head_dim()));
  if (m.view.cols % r.f.head_dim() != 0)
    value_error("Rope.rotate", "x has " + std::to_string(m.view.cols) + " columns, not a multiple of head_dim " +
                                   std::to_string(r.f.head_dim()));
  position_arg p(pos, m.view.rows, "Rope.rotate", "positions");
  py::gil_scoped_release unlocked;
  r.get<T>().rotate(m.view, p.get());
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
  const std::string where = name + ".bias_tile";
  c.def(
       "bias", [](const W& w, index_t head, position q, position k) { return w.d.bias(head, q, k); }, "head"_a,
       "qpos"_a, "kpos"_a, "The bias (float64) of local head `head` for a query at qpos and a key at kpos.")
      .def(
          "bias_tile",
          [where](const W& w, index_t head, py::handle qpos, py::handle kpos, py::handle dt) {
            const auto& p = w.d.params();
            return parse_dtype(dt, where) == elem::f32
                       ? bias_tile<float>(w, head, qpos, kpos, p.num_heads, p.head_offset, where)
                       : bias_tile<double>(w, head, qpos, kpos, p.num_heads, p.head_offset, where);
          },
          "head"_a, "qpos"_a, "kpos"_a, "dtype"_a = "float32",
          "A new [len(qpos), len(kpos)] array of the biases of local head `head`.");
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

template <class T>
py::object attention_typed(const py::array& qa, const py::array& ka, const py::array& va, py::handle qpos,
                           py::handle kpos, py::handle encoding, std::optional<index_t> heads,
                           std::optional<index_t> kv_heads, attention_knobs kn, py::handle out_obj) {
  const std::string w = "attention";
  const auto q = matrix_of<const T>(qa, w, "q", true);
  const auto k = matrix_of<const T>(ka, w, "k", true);
  const auto v = matrix_of<const T>(va, w, "v", true);
  // Heads: given, else from 3-D arrays, else 1 (kv_heads: heads).
  const index_t h = heads ? *heads : (q.heads3 ? q.heads3 : 1);
  const index_t hk = kv_heads ? *kv_heads : (k.heads3 ? k.heads3 : h);
  if (h <= 0) value_error(w, "heads = " + std::to_string(h) + ": must be positive");
  if (hk <= 0 || h % hk != 0)
    value_error(w, "kv_heads = " + std::to_string(hk) + ": must be positive and divide heads = " + std::to_string(h));
  if (q.heads3 && q.heads3 != h)
    value_error(w, "q has " + std::to_string(q.heads3) + " heads (axis 1) but heads = " + std::to_string(h));
  if (q.view.cols % h != 0)
    value_error(w, "q has " + std::to_string(q.view.cols) + " columns, not a multiple of heads = " + std::to_string(h));
  const index_t d = q.view.cols / h;
  if (d == 0) value_error(w, "q has head_dim 0");
  for (auto [m, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    if (m->view.cols != hk * d)
      value_error(w, std::string(name) + " has " + std::to_string(m->view.cols) +
                         " columns but kv_heads * head_dim = " + std::to_string(hk) + " * " + std::to_string(d) +
                         " = " + std::to_string(hk * d) + " are needed");
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

py::object attention(py::handle q, py::handle k, py::handle v, py::handle qpos, py::handle kpos, py::handle encoding,
                     std::optional<index_t> heads, std::optional<index_t> kv_heads, std::optional<double> scale,
                     bool causal, std::pair<position, position> window, bool return_lse, const std::string& rotation,
                     py::handle out, int threads, index_t q_tile, index_t k_tile) {
  elem kq, kk, kv;
  auto qa = float_array(q, "attention", "q", kq);
  auto ka = float_array(k, "attention", "k", kk);
  auto va = float_array(v, "attention", "v", kv);
  require_dtype(kk, kq, "attention", "k", "q");
  require_dtype(kv, kq, "attention", "v", "q");
  attention_knobs kn;
  kn.p.scale = scale;
  kn.p.causal = causal;
  kn.p.window_left = window.first;
  kn.p.window_right = window.second;
  kn.p.rotation = enum_of<posenc::rotation_mode>(
      rotation,
      {{"in_kernel", posenc::rotation_mode::in_kernel}, {"already_rotated", posenc::rotation_mode::already_rotated}},
      "attention", "rotation");
  kn.p.threads = threads;
  kn.p.q_tile = q_tile;
  kn.p.k_tile = k_tile;
  kn.want_lse = return_lse;
  if (kq == elem::f32) return attention_typed<float>(qa, ka, va, qpos, kpos, encoding, heads, kv_heads, kn, out);
  return attention_typed<double>(qa, ka, va, qpos, kpos, encoding, heads, kv_heads, kn, out);
}

template <class R>
py::array_t<double> to_numpy(const R& values) {
  py::array_t<double> a(static_cast<py::ssize_t>(std::size(values)));
  std::copy(std::begin(values), std::end(values), a.mutable_data());
  return a;
}

}  // namespace

PYBIND11_MODULE(posenc, m) {
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
  py::class_<posenc::linear_scaling>(m, "LinearScaling",
                                     "Position interpolation (Chen et al. 2023): inv_freq / factor.")
      .def(py::init([](double factor) { return posenc::linear_scaling{factor}; }), py::kw_only(), "factor"_a = 1.0)
      .def_readonly("factor", &posenc::linear_scaling::factor);
  py::class_<posenc::ntk_aware_scaling>(m, "NtkAwareScaling", "NTK-aware: base * alpha^(r/(r-2)).")
      .def(py::init([](double alpha) { return posenc::ntk_aware_scaling{alpha}; }), py::kw_only(), "alpha"_a = 1.0)
      .def_readonly("alpha", &posenc::ntk_aware_scaling::alpha);
  py::class_<posenc::dynamic_ntk_scaling>(
      m, "DynamicNtkScaling", "Dynamic NTK: base * (s L / L0 - (s - 1))^(r/(r-2)) for L = sequence_length > L0.")
      .def(py::init([](double factor, position original_max_position, position sequence_length) {
             return posenc::dynamic_ntk_scaling{factor, original_max_position, sequence_length};
           }),
           py::kw_only(), "factor"_a = 1.0, "original_max_position"_a = 2048, "sequence_length"_a = 0)
      .def_readonly("factor", &posenc::dynamic_ntk_scaling::factor)
      .def_readonly("original_max_position", &posenc::dynamic_ntk_scaling::original_max_position)
      .def_readonly("sequence_length", &posenc::dynamic_ntk_scaling::sequence_length);
  py::class_<posenc::yarn_scaling>(
      m, "YarnScaling", "YaRN (Peng et al. 2023): ramp between inv and inv / factor; magnitude 0.1 ln s + 1.")
      .def(py::init([](double factor, position original_max_position, double beta_fast, double beta_slow, double mscale,
                       double mscale_all_dim, bool truncate) {
             return posenc::yarn_scaling{factor, original_max_position, beta_fast, beta_slow,
                                         mscale, mscale_all_dim,        truncate};
           }),
           py::kw_only(), "factor"_a = 1.0, "original_max_position"_a = 4096, "beta_fast"_a = 32.0, "beta_slow"_a = 1.0,
           "mscale"_a = 0.0, "mscale_all_dim"_a = 0.0, "truncate"_a = true)
      .def_readonly("factor", &posenc::yarn_scaling::factor)
      .def_readonly("original_max_position", &posenc::yarn_scaling::original_max_position);
  py::class_<posenc::llama3_scaling>(m, "Llama3Scaling",
                                     "Llama 3.1: keep, divide or blend each frequency by its wavelength.")
      .def(py::init([](double factor, double low_freq_factor, double high_freq_factor, position original_max_position) {
             return posenc::llama3_scaling{factor, low_freq_factor, high_freq_factor, original_max_position};
           }),
           py::kw_only(), "factor"_a = 8.0, "low_freq_factor"_a = 1.0, "high_freq_factor"_a = 4.0,
           "original_max_position"_a = 8192)
      .def_readonly("factor", &posenc::llama3_scaling::factor)
      .def_readonly("original_max_position", &posenc::llama3_scaling::original_max_position);
  py::class_<posenc::longrope_scaling>(m, "LongRopeScaling",
                                       "LongRoPE (Phi-3): 1 / (f_i base^(2i/r)) with short or long factors.")
      .def(
          py::init([](std::vector<double> short_factor, std::vector<double> long_factor, position original_max_position,
                      position max_position, const std::string& choice, position sequence_length, double factor) {
            return posenc::longrope_scaling{
                std::move(short_factor),
                std::move(long_factor),
                original_max_position,
                max_position,
                enum_of<posenc::longrope_choice>(choice,
                                                 {{"per_length", posenc::longrope_choice::per_length},
                                                  {"fixed_long", posenc::longrope_choice::fixed_long}},
                                                 "LongRopeScaling", "choice"),
                sequence_length,
                factor};
          }),
          py::kw_only(), "short_factor"_a, "long_factor"_a, "original_max_position"_a = 4096, "max_position"_a = 0,
          "choice"_a = "per_length", "sequence_length"_a = 0, "factor"_a = 0.0);

  py::class_<py_rope>(m, "Rope",
                      "Rotary position embedding (Su et al. 2021) with an optional frequency policy.\n\n"
                      "Rope(head_dim=128, rotary_dim=0, base=10000.0, layout='half_split' | 'interleaved',\n"
                      "     scaling=None | LinearScaling(...) | ..., rope_scaling=None | {HF rope_scaling dict},\n"
                      "     attention_factor=None)\n"
                      "rope_scaling reads a Hugging Face config's dict ('rope_type', 'factor', 'rope_theta', ...).")
      .def(py::init(&make_rope), py::kw_only(), "head_dim"_a = 128, "rotary_dim"_a = 0, "base"_a = 10000.0,
           "layout"_a = "half_split", "scaling"_a = py::none(), "rope_scaling"_a = py::none(),
           "attention_factor"_a = py::none())
      .def(
          "rotate",
          [](const py_rope& r, py::handle x, py::handle positions) {
            elem kind;
            auto a = float_array(x, "Rope.rotate", "x", kind);
            if (kind == elem::f32) {
              rope_rotate<float>(r, a, positions);
            } else {
              rope_rotate<double>(r, a, positions);
            }
          },
          "x"_a, "positions"_a = py::none(),
          "Rotates every head of x ([tokens, heads * head_dim] or [tokens, heads, head_dim]) in place, row i by "
          "positions[i].")
      .def(
          "cos_sin",
          [](const py_rope& r, py::handle positions) {
            auto p = free_positions(positions, "Rope.cos_sin", "positions");
            const index_t half = r.f.rotary_dim() / 2;
            auto c = new_array<double>({p.size(), half});
            auto s = new_array<double>({p.size(), half});
            const auto pp = p.get();
            for (index_t i = 0; i < p.size(); ++i) r.d.unit_cos_sin(pp[i], c.mutable_data(i, 0), s.mutable_data(i, 0));
            return py::make_tuple(c, s);
          },
          "positions"_a,
          "(cos, sin), each [len(positions), rotary_dim / 2] float64: cos and sin of position * inv_freq "
          "(without the magnitude).")
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

  py::class_<py_sinusoidal>(m, "Sinusoidal",
                            "Sinusoidal absolute position encoding (Vaswani et al. 2017), added to token embeddings.")
      .def(py::init([](index_t dim, double base, const std::string& layout, bool shifted_denominator,
                       position position_offset) {
             const posenc::sinusoidal_params p{.dim = dim,
                                               .base = base,
                                               .layout = enum_of<posenc::sinusoidal_layout>(
                                                   layout,
                                                   {{"interleaved", posenc::sinusoidal_layout::interleaved},
                                                    {"concatenated", posenc::sinusoidal_layout::concatenated}},
                                                   "Sinusoidal", "layout"),
                                               .shifted_denominator = shifted_denominator,
                                               .position_offset = position_offset};
             return py_sinusoidal{posenc::sinusoidal<float>(p), posenc::sinusoidal<double>(p)};
           }),
           py::kw_only(), "dim"_a = 512, "base"_a = 10000.0, "layout"_a = "interleaved",
           "shifted_denominator"_a = false, "position_offset"_a = 0)
      .def(
          "add_to",
          [](const py_sinusoidal& s, py::handle x, py::handle positions) {
            elem kind;
            auto a = float_array(x, "Sinusoidal.add_to", "x", kind);
            if (kind == elem::f32) {
              sinusoidal_add<float>(s, a, positions);
            } else {
              sinusoidal_add<double>(s, a, positions);
            }
          },
          "x"_a, "positions"_a = py::none(), "x[i] += PE[positions[i]] in place; x is [tokens, dim].")
      .def(
          "table",
          [](const py_sinusoidal& s, py::handle positions, py::handle dt) {
            auto p = free_positions(positions, "Sinusoidal.table", "positions");
            return parse_dtype(dt, "Sinusoidal.table") == elem::f32 ? sinusoidal_table<float>(s, p)
                                                                    : sinusoidal_table<double>(s, p);
          },
          "positions"_a, "dtype"_a = "float32", "A new [len(positions), dim] array of PE[positions[i]].")
      .def_property_readonly("dim", [](const py_sinusoidal& s) { return s.f.dim(); })
      .def_property_readonly("frequencies", [](const py_sinusoidal& s) { return to_numpy(s.d.frequencies()); });

  py::class_<py_alibi> alibi_class(m, "Alibi",
                                   "ALiBi (Press et al. 2022): bias -slope_h * (qpos - kpos), or * |qpos - kpos|.");
  alibi_class
      .def(py::init([](index_t num_heads, index_t head_offset, const std::string& form, double max_bias) {
             const posenc::alibi_params p{
                 .num_heads = num_heads,
                 .head_offset = head_offset,
                 .form = enum_of<posenc::alibi_form>(
                     form, {{"causal", posenc::alibi_form::causal}, {"symmetric", posenc::alibi_form::symmetric}},
                     "Alibi", "form"),
                 .max_bias = max_bias};
             return py_alibi{posenc::alibi<float>(p), posenc::alibi<double>(p)};
           }),
           py::kw_only(), "num_heads"_a = 8, "head_offset"_a = 0, "form"_a = "causal", "max_bias"_a = 8.0)
      .def_property_readonly(
          "slopes",
          [](const py_alibi& a) {
            return to_numpy(posenc::alibi<double>::slopes(a.d.params().num_heads, a.d.params().max_bias));
          },
          "The slopes of all num_heads global heads (float64).");
  def_bias_methods(alibi_class, "Alibi");

  py::class_<py_t5> t5_class(m, "T5Bias",
                             "T5 bucketed relative position bias with a learned [num_buckets, num_heads] table.");
  t5_class
      .def(py::init([](py::handle table, position max_distance, bool bidirectional, index_t head_offset) {
             const auto t = table_of(table, "T5Bias", "table");
             const posenc::t5_bias_params p{.num_heads = t.cols(),
                                            .num_buckets = t.rows(),
                                            .max_distance = max_distance,
                                            .bidirectional = bidirectional,
                                            .head_offset = head_offset};
             const posenc::row_matrix<float> tf = t.cast<float>();
             return py_t5{posenc::t5_relative_bias<float>(p, tf), posenc::t5_relative_bias<double>(p, t)};
           }),
           "table"_a, py::kw_only(), "max_distance"_a = 128, "bidirectional"_a = true, "head_offset"_a = 0,
           "table: [num_buckets, num_heads] float32/float64 (copied).")
      .def(
          "bucket", [](const py_t5& t, position relative) { return t.d.bucket(relative); }, "relative"_a,
          "The bucket of relative = kpos - qpos.");
  def_bias_methods(t5_class, "T5Bias");

  py::class_<py_shaw>(m, "ShawRelative",
                      "Shaw et al. 2018 relative keys and values: tables [2K + 1, head_dim], row r = distance r - K.")
      .def(py::init([](py::handle key_table, py::handle value_table) {
             const auto ak = table_of(key_table, "ShawRelative", "key_table");
             const auto av = table_of(value_table, "ShawRelative", "value_table");
             if (ak.rows() % 2 != 1)
               value_error("ShawRelative", "key_table has " + std::to_string(ak.rows()) + " rows; it needs 2K + 1");
             const posenc::shaw_params p{.head_dim = ak.cols(), .max_relative_position = (ak.rows() - 1) / 2};
             const posenc::row_matrix<float> akf = ak.cast<float>(), avf = av.cast<float>();
             return py_shaw{posenc::shaw_relative<float>(p, akf, avf), posenc::shaw_relative<double>(p, ak, av)};
           }),
           "key_table"_a, "value_table"_a)
      .def_property_readonly("head_dim", [](const py_shaw& s) { return s.d.head_dim(); })
      .def_property_readonly("max_relative_position", [](const py_shaw& s) { return s.d.max_relative_position(); });

  m.def("attention", &attention, "q"_a, "k"_a, "v"_a, "qpos"_a = py::none(), "kpos"_a = py::none(),
        "encoding"_a = py::none(), py::kw_only(), "heads"_a = py::none(), "kv_heads"_a = py::none(),
        "scale"_a = py::none(), "causal"_a = false, "window"_a = std::pair<position, position>{-1, -1},
        "return_lse"_a = false, "rotation"_a = "in_kernel", "out"_a = py::none(), "threads"_a = 0, "q_tile"_a = 0,
        "k_tile"_a = 0,
        "Blockwise softmax attention: out_i = sum_j softmax_j(scale q_i.k_j + bias_ij) v_j.\n\n"
        "q: [n_q, heads * d] or [n_q, heads, d]; k, v: [n_kv, kv_heads * d] or [n_kv, kv_heads, d] (GQA: query head h "
        "reads kv head h // (heads // kv_heads)); all float32 or all float64. heads / kv_heads default to the 3-D "
        "arrays' axis 1, else 1 / heads. qpos, kpos: positions (default 0..n-1). encoding: None, Rope (rotates copies "
        "of q and k unless rotation='already_rotated'), Alibi, T5Bias or ShawRelative. causal: key visible when "
        "kpos <= qpos. window=(left, right): keys within [qpos - left, qpos + right], -1 unbounded. scale defaults "
        "to 1/sqrt(d). Returns out (shape of q), or (out, lse [n_q, heads], -inf for a fully masked row) with "
        "return_lse. The GIL is released while it runs.");
}
