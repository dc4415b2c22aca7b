// The fused ops' schemas, declared once; csrc/cpu and csrc/cuda register implementations under
// the same names (TORCH_LIBRARY_IMPL), autolr_fused/backends/_ops.py registers fake (meta) kernels
// for torch.compile. Semantics: autolr_fused/backends/reference.py; conventions: primitives.py.
//
// Tensor lists are aligned, one entry per parameter. An unused list is empty. `lr` is a float32
// tensor of 1 or n elements, or None and then `lr_value` is the lr. `store`: 0 nothing, 1 the
// regularized gradient, 2 the direction, into `prevs`. Statistics come back as a float32 (n, k)
// tensor on the parameters' device.
#include <Python.h>
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

// `import autolr_fused._C` runs the registrations above; the module itself is empty.
static struct PyModuleDef autolr_fused_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&autolr_fused_module); }
