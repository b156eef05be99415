// Host-side helpers of a SAM step (issue #16): the per-tensor reads every step makes (addresses,
// sizes, gradients, contiguity, version bumps) as one C loop over a tensor list each, instead of a
// Python-level pass per attribute (~50-100 ns a tensor through the tensor's Python getters; here
// ~5-10 ns). Loaded by fastsam/_host.py, which keeps pure-Python twins of every function and uses
// them when this module cannot be built; both give the same values (tests/test_host_ext.py).
//
// Every function takes a list or tuple of tensors (None allowed where documented) and raises a
// TypeError naming the position of anything else. Tensors without storage (tensor subclasses such
// as DTensor, meta tensors) report address 0, as fastsam's callers expect.

#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

namespace {

PyObject* newref(PyObject* o) {  // Py_NewRef is Python >= 3.10
  Py_INCREF(o);
  return o;
}

// The last type that passed THPVariable_Check: Parameters are a subclass, whose check walks the
// MRO (~20 ns); a model's list is one or two types, so this skips nearly every check.
PyTypeObject* g_ok_type = nullptr;

const at::Tensor& tensor_at(PyObject* seq, Py_ssize_t i, PyObject* o, const char* what) {
  if (Py_TYPE(o) != g_ok_type) {
    if (!THPVariable_Check(o)) {
      (void)seq;
      throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is not a tensor");
    }
    g_ok_type = Py_TYPE(o);
  }
  return THPVariable_Unpack(o);
}

// data_ptr() as Python computes it (storage base + offset * itemsize; 0 without storage), without
// the checks of TensorImpl::data() (~10 ns a tensor, most of this module's time otherwise).
int64_t address_of(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (!impl->has_storage()) return 0;
  const auto base = reinterpret_cast<int64_t>(impl->unsafe_storage().data());
  return base + impl->storage_offset() * static_cast<int64_t>(impl->itemsize());
}

// The list or tuple as a fast sequence (a new reference), with a clear error otherwise.
PyObject* fast(py::handle seq, const char* what) {
  PyObject* f = PySequence_Fast(seq.ptr(), what);
  if (f == nullptr) throw py::error_already_set();
  return f;
}

// Addresses (0 for None / no storage) as a tuple of ints.
py::tuple addresses(py::handle seq) {
  PyObject* f = fast(seq, "addresses: expected a list or tuple of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f);
  PyObject** items = PySequence_Fast_ITEMS(f);
  PyObject* out = PyTuple_New(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    int64_t a = 0;
    if (items[i] != Py_None) {
      try {
        a = address_of(tensor_at(f, i, items[i], "tensors"));
      } catch (...) {
        Py_DECREF(out);
        Py_DECREF(f);
        throw;
      }
    }
    PyTuple_SET_ITEM(out, i, PyLong_FromLongLong(a));
  }
  Py_DECREF(f);
  return py::reinterpret_steal<py::tuple>(out);
}

// (addresses, numels) of a list of tensors (no None): the parameter check's key.
py::tuple layout(py::handle seq) {
  PyObject* f = fast(seq, "layout: expected a list or tuple of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f);
  PyObject** items = PySequence_Fast_ITEMS(f);
  PyObject* ptrs = PyTuple_New(n);
  PyObject* sizes = PyTuple_New(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    try {
      const at::Tensor& t = tensor_at(f, i, items[i], "tensors");
      PyTuple_SET_ITEM(ptrs, i, PyLong_FromLongLong(address_of(t)));
      PyTuple_SET_ITEM(sizes, i, PyLong_FromLongLong(t.numel()));
    } catch (...) {
      for (Py_ssize_t k = i; k < n; ++k) {  // the tuples must be complete before they are freed
        if (PyTuple_GET_ITEM(ptrs, k) == nullptr) PyTuple_SET_ITEM(ptrs, k, newref(Py_None));
        if (PyTuple_GET_ITEM(sizes, k) == nullptr) PyTuple_SET_ITEM(sizes, k, newref(Py_None));
      }
      Py_DECREF(ptrs);
      Py_DECREF(sizes);
      Py_DECREF(f);
      throw;
    }
  }
  Py_DECREF(f);
  PyObject* out = PyTuple_Pack(2, ptrs, sizes);
  Py_DECREF(ptrs);
  Py_DECREF(sizes);
  return py::reinterpret_steal<py::tuple>(out);
}

// Whether the tensors still have these addresses (and, with `numels`, these sizes): the check of a
// cached layout, without building the tuples (no Python ints made on the usual step).
bool layout_equal(py::handle seq, py::handle ptrs, py::handle numels) {
  PyObject* f = fast(seq, "layout_equal: expected a list or tuple of tensors");
  PyObject* fp = PySequence_Fast(ptrs.ptr(), "layout_equal: expected a tuple of addresses");
  PyObject* fn = nullptr;
  if (fp != nullptr && !numels.is_none()) fn = PySequence_Fast(numels.ptr(), "layout_equal: expected a tuple of sizes");
  if (fp == nullptr || (fn == nullptr && !numels.is_none())) {
    Py_DECREF(f);
    Py_XDECREF(fp);
    throw py::error_already_set();
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f);
  bool ok = PySequence_Fast_GET_SIZE(fp) == n && (fn == nullptr || PySequence_Fast_GET_SIZE(fn) == n);
  PyObject** items = PySequence_Fast_ITEMS(f);
  PyObject** pi = PySequence_Fast_ITEMS(fp);
  PyObject** ni = fn == nullptr ? nullptr : PySequence_Fast_ITEMS(fn);
  try {
    for (Py_ssize_t i = 0; ok && i < n; ++i) {
      const at::Tensor& t = tensor_at(f, i, items[i], "tensors");
      const long long want = PyLong_AsLongLong(pi[i]);
      ok = !(want == -1 && PyErr_Occurred()) && want == address_of(t);
      if (ok && ni != nullptr) {
        const long long k = PyLong_AsLongLong(ni[i]);
        ok = !(k == -1 && PyErr_Occurred()) && k == t.numel();
      }
    }
  } catch (...) {
    Py_DECREF(f);
    Py_DECREF(fp);
    Py_XDECREF(fn);
    throw;
  }
  PyErr_Clear();  // a non-int entry only means "not equal"
  Py_DECREF(f);
  Py_DECREF(fp);
  Py_XDECREF(fn);
  return ok;
}

// The .grad of every tensor (None where it has none), as a list.
py::list grads(py::handle seq) {
  PyObject* f = fast(seq, "grads: expected a list or tuple of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f);
  PyObject** items = PySequence_Fast_ITEMS(f);
  PyObject* out = PyList_New(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* g = nullptr;
    try {
      const at::Tensor& t = tensor_at(f, i, items[i], "params");
      const at::Tensor& gr = t.grad();
      g = gr.defined() ? THPVariable_Wrap(gr) : newref(Py_None);
    } catch (...) {
      for (Py_ssize_t k = i; k < n; ++k) PyList_SET_ITEM(out, k, newref(Py_None));
      Py_DECREF(out);
      Py_DECREF(f);
      throw;
    }
    if (g == nullptr) {
      for (Py_ssize_t k = i; k < n; ++k) PyList_SET_ITEM(out, k, newref(Py_None));
      Py_DECREF(out);
      Py_DECREF(f);
      throw py::error_already_set();
    }
    PyList_SET_ITEM(out, i, g);
  }
  Py_DECREF(f);
  return py::reinterpret_steal<py::list>(out);
}

// True when every tensor (None skipped) is strided and contiguous; False as soon as one is not
// (the caller's own checks then name what: sparse, non-contiguous).
bool all_contiguous(py::handle seq) {
  PyObject* f = fast(seq, "all_contiguous: expected a list or tuple of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f);
  PyObject** items = PySequence_Fast_ITEMS(f);
  bool ok = true;
  try {
    for (Py_ssize_t i = 0; i < n && ok; ++i) {
      if (items[i] == Py_None) continue;
      const at::Tensor& t = tensor_at(f, i, items[i], "tensors");
      ok = t.layout() == at::kStrided && t.is_contiguous();
    }
  } catch (...) {
    Py_DECREF(f);
    throw;
  }
  Py_DECREF(f);
  return ok;
}

// Bump the autograd version counter of every tensor (None skipped), as an in-place op does.
void bump_versions(py::handle seq) {
  PyObject* f = fast(seq, "bump_versions: expected a list or tuple of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f);
  PyObject** items = PySequence_Fast_ITEMS(f);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (items[i] == Py_None) continue;
      tensor_at(f, i, items[i], "tensors").unsafeGetTensorImpl()->bump_version();
    }
  } catch (...) {
    Py_DECREF(f);
    throw;
  }
  Py_DECREF(f);
}

// How many entries are None (a gradient pattern's summary: 0 on the usual step).
Py_ssize_t count_none(py::handle seq) {
  PyObject* f = fast(seq, "count_none: expected a list or tuple");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f);
  PyObject** items = PySequence_Fast_ITEMS(f);
  Py_ssize_t k = 0;
  for (Py_ssize_t i = 0; i < n; ++i) k += items[i] == Py_None;
  Py_DECREF(f);
  return k;
}

// Whether the tensors are 0-dim views of one storage at consecutive offsets, in order (the Adam
// step counters as fastsam.SAM keeps them: one op then moves them all).
bool consecutive_scalars(py::handle seq) {
  PyObject* f = fast(seq, "consecutive_scalars: expected a list or tuple of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f);
  PyObject** items = PySequence_Fast_ITEMS(f);
  bool ok = n > 0;
  const c10::StorageImpl* st = nullptr;
  int64_t off0 = 0;
  try {
    for (Py_ssize_t i = 0; ok && i < n; ++i) {
      if (items[i] == Py_None) {
        ok = false;
        break;
      }
      const c10::TensorImpl* impl = tensor_at(f, i, items[i], "tensors").unsafeGetTensorImpl();
      ok = impl->has_storage() && impl->dim() == 0;
      if (!ok) break;
      if (i == 0) {
        st = impl->unsafe_storage().unsafeGetStorageImpl();
        off0 = impl->storage_offset();
      } else {
        ok = impl->unsafe_storage().unsafeGetStorageImpl() == st && impl->storage_offset() == off0 + i;
      }
    }
  } catch (...) {
    Py_DECREF(f);
    throw;
  }
  Py_DECREF(f);
  return ok;
}

// Whether two sequences hold the same objects (identity, in order): a cached plan's check that
// the parameters are the ones it was built for.
bool same(py::handle a, py::handle b) {
  PyObject* fa = fast(a, "same: expected a list or tuple");
  PyObject* fb = PySequence_Fast(b.ptr(), "same: expected a list or tuple");
  if (fb == nullptr) {
    Py_DECREF(fa);
    throw py::error_already_set();
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fa);
  bool ok = n == PySequence_Fast_GET_SIZE(fb);
  PyObject** ia = PySequence_Fast_ITEMS(fa);
  PyObject** ib = PySequence_Fast_ITEMS(fb);
  for (Py_ssize_t i = 0; ok && i < n; ++i) ok = ia[i] == ib[i];
  Py_DECREF(fa);
  Py_DECREF(fb);
  return ok;
}

// Whether a base optimizer's state is as a cached plan saw it: the same keys (in order) mapping to
// the same dicts (`svals`), which hold the same objects (`entries`, every dict's values in order).
// A state dict replaced, an entry added or removed, or a tensor in it replaced: False.
bool state_same(py::handle state, py::handle skeys, py::handle svals, py::handle entries) {
  if (!PyDict_Check(state.ptr())) return false;
  PyObject* fk = fast(skeys, "state_same: expected a tuple of keys");
  PyObject* fv = PySequence_Fast(svals.ptr(), "state_same: expected a tuple of dicts");
  PyObject* fe = fv == nullptr ? nullptr : PySequence_Fast(entries.ptr(), "state_same: expected a tuple of entries");
  if (fe == nullptr) {
    Py_DECREF(fk);
    Py_XDECREF(fv);
    throw py::error_already_set();
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fk);
  bool ok = PyDict_Size(state.ptr()) == n && PySequence_Fast_GET_SIZE(fv) == n;
  PyObject** keys = PySequence_Fast_ITEMS(fk);
  PyObject** vals = PySequence_Fast_ITEMS(fv);
  PyObject* k = nullptr;
  PyObject* v = nullptr;
  Py_ssize_t pos = 0, i = 0;
  while (ok && PyDict_Next(state.ptr(), &pos, &k, &v)) {
    ok = i < n && k == keys[i] && v == vals[i];
    ++i;
  }
  const Py_ssize_t ne = PySequence_Fast_GET_SIZE(fe);
  PyObject** ents = PySequence_Fast_ITEMS(fe);
  Py_ssize_t j = 0;
  for (Py_ssize_t d = 0; ok && d < n; ++d) {
    if (!PyDict_Check(vals[d])) {
      ok = false;
      break;
    }
    Py_ssize_t dp = 0;
    while (ok && PyDict_Next(vals[d], &dp, &k, &v)) {
      ok = j < ne && v == ents[j];
      ++j;
    }
  }
  ok = ok && j == ne;
  Py_DECREF(fk);
  Py_DECREF(fv);
  Py_DECREF(fe);
  return ok;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastsam host helpers: per-tensor reads of a SAM step as one C loop per list (issue #16)";
  m.def("addresses", &addresses, "data_ptr of every tensor (0: None or no storage), as a tuple");
  m.def("layout", &layout, "(addresses, numels) of a list of tensors");
  m.def("layout_equal", &layout_equal, "the tensors still have these addresses (and sizes, unless None)",
        py::arg("tensors"), py::arg("ptrs"), py::arg("numels") = py::none());
  m.def("grads", &grads, ".grad of every tensor (None where absent), as a list");
  m.def("all_contiguous", &all_contiguous, "every tensor (None skipped) strided and contiguous");
  m.def("bump_versions", &bump_versions, "bump the version counter of every tensor (None skipped)");
  m.def("consecutive_scalars", &consecutive_scalars, "0-dim views of one storage at consecutive offsets");
  m.def("count_none", &count_none, "how many entries are None");
  m.def("same", &same, "two sequences hold the same objects, in order");
  m.def("state_same", &state_same, "a base optimizer state as a cached plan saw it (keys, dicts, entries)");
}
