// The operator schemas (namespace mnemonics_fast) and the Python module `mnemonics_fast._C`.
//
// Importing _C runs the static registrations: the schemas below and the CUDA kernels registered next to their code
// (TORCH_LIBRARY_IMPL in cosine_linear.cu / exemplar_sgd.cu). The CPU implementations, fake (meta) kernels, autograd
// and autocast rules are registered from Python (mnemonics_fast/ops/), where the plain-PyTorch references live.
// mnemonics_fast/ops/_extension.py holds a copy of these schema strings for when the extension is not built;
// tests/test_ops.py checks that the two agree.

#include <Python.h>

#include <torch/library.h>

#include "build_info.h"
#include "mnemonics_fast.h"

TORCH_LIBRARY(mnemonics_fast, m) {
  m.def("cosine_linear(Tensor x, Tensor weight, Tensor sigma) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("cosine_linear_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, Tensor sigma) "
        "-> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("exemplar_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr, "
        "float momentum, float weight_decay, float clamp_min, float clamp_max) -> ()",
        {at::Tag::pt2_compliant_tag});
}

namespace mnemonics_fast {

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + "]";
}

}  // namespace mnemonics_fast

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:s,s:s,s:i,s:s}", "torch_version", MNEMONICS_FAST_BUILD_TORCH_VERSION,
                       "torch_cuda_version", MNEMONICS_FAST_BUILD_TORCH_CUDA_VERSION, "arch_list",
                       MNEMONICS_FAST_BUILD_ARCH_LIST, "cuda_runtime_version",
                       mnemonics_fast::cuda_runtime_version_built(), "build_system", MNEMONICS_FAST_BUILD_SYSTEM);
}

PyObject* set_cosine_linear_path(PyObject*, PyObject* arg) {
  const long path = PyLong_AsLong(arg);
  if (path == -1 && PyErr_Occurred() != nullptr) return nullptr;
  if (path < 0 || path > 2) {
    PyErr_SetString(PyExc_ValueError, "cosine_linear path must be 0 (auto), 1 (fused) or 2 (blas)");
    return nullptr;
  }
  mnemonics_fast::set_cosine_linear_path(static_cast<int>(path));
  Py_RETURN_NONE;
}

PyObject* get_cosine_linear_path(PyObject*, PyObject*) {
  return PyLong_FromLong(mnemonics_fast::get_cosine_linear_path());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "Versions and CUDA archs this extension was compiled for."},
    {"set_cosine_linear_path", set_cosine_linear_path, METH_O,
     "Select cosine_linear's CUDA implementation: 0 auto, 1 fused kernels, 2 cuBLAS."},
    {"get_cosine_linear_path", get_cosine_linear_path, METH_NOARGS, "The current cosine_linear path (0, 1, 2)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "mnemonics_fast custom operators; importing it registers them with torch.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
