// The fused ops' schemas, declared once; csrc/cpu and csrc/cuda register implementations under
// the same names (TORCH_LIBRARY_IMPL), autolr_fused/backends/_ops.py registers fake (meta) kernels
// for torch.compile. Semantics: autolr_fused/backends/reference.py; conventions: primitives.py.
//
// Tensor lists are aligned, one entry per parameter. An unused list is empty. `lr` is a float32
// tensor of 1 or n elements, or None and then `lr_value` is the lr. `store`: 0 nothing, 1 the
// regularized gradient, 2 the direction, into `prevs`. Statistics come back as a float32 (n, k)
// tensor on the parameters' device.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

TORCH_LIBRARY(autolr_fused, m) {
  m.def(
      "sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] buffers, Tensor? lr, float lr_value, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, "
      "Tensor(c!)[] prevs, int store, Tensor? regret, Tensor(d!)[] snapshots, Tensor(e!)[] prev_displacements, "
      "Tensor? scale, Tensor(f!)[] accumulators, float accumulate_weight, Tensor? grad_scale) -> Tensor");
  m.def(
      "sgd_reduce(Tensor[] params, Tensor[] grads, Tensor[] buffers, Tensor[] prevs, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, bool of_direction, "
      "Tensor? grad_scale) -> Tensor");
  m.def(
      "boundary_pass(Tensor[] params, Tensor(a!)[] snapshots, Tensor(b!)[] prev_displacements, Tensor? scale, "
      "Tensor(c!)[] accumulators, float accumulate_weight) -> Tensor");
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor? lr, "
      "float lr_value, float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool maximize, float bias_correction1, float bias_correction2_sqrt, Tensor(d!)[] prevs, Tensor? regret, "
      "Tensor? grad_scale) -> ()");
  m.def(
      "adam_reduce(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] prevs, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool maximize, "
      "float bias_correction1, float bias_correction2_sqrt, Tensor? grad_scale) -> Tensor");
}

// An optimizer step is not differentiated (it runs under no_grad): autograd passes straight through to
// the device kernels instead of warning that no backward exists.
TORCH_LIBRARY_IMPL(autolr_fused, Autograd, m) {
  for (const char* op : {"sgd_step", "sgd_reduce", "boundary_pass", "adam_step", "adam_reduce"}) {
    m.impl(op, torch::CppFunction::makeFallthrough());
  }
}

// first_bad_gradient(params): the index of the first tensor of the list `params` whose .grad an optimizer
// step refuses (sparse or other non-strided layout, complex, or a shape other than the parameter's), or -1.
// It is the per-step check of autolr_fused/_validation.py's check_gradients, which words the error; in
// Python the same test is several attribute lookups per tensor. It reads metadata only, never device
// memory. An entry that is not a tensor is reported as bad too (Python then says what is wrong with it).
static PyObject* first_bad_gradient(PyObject* /*module*/, PyObject* params) {
  PyObject* seq = PySequence_Fast(params, "first_bad_gradient takes a list of tensors");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  Py_ssize_t bad = -1;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(items[i])) {
      bad = i;
      break;
    }
    const at::Tensor& p = THPVariable_Unpack(items[i]);
    const at::Tensor& g = p.grad();
    if (g.defined() &&
        (g.layout() != c10::kStrided || g.is_complex() || p.is_complex() || !g.sizes().equals(p.sizes()))) {
      bad = i;
      break;
    }
  }
  Py_DECREF(seq);
  return PyLong_FromSsize_t(bad);
}

static PyMethodDef autolr_fused_methods[] = {
    {"first_bad_gradient", first_bad_gradient, METH_O,
     "Index of the first tensor whose .grad a step refuses (sparse, complex, other shape), or -1."},
    {nullptr, nullptr, 0, nullptr}};

// `import autolr_fused._C` runs the registrations above; the module holds first_bad_gradient.
static struct PyModuleDef autolr_fused_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, autolr_fused_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&autolr_fused_module); }
