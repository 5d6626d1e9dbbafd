// The schemas of mars's ops, registered once. CPU bodies live in cpu/, CUDA bodies in
// cuda/; autograd and fake (meta) implementations are registered from Python (mars/_ext.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing `mars._C` loads this library, which runs the TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mars, m) {
  // SPEC section 2. group_index/anchor_index: int64 dense labels in [0, num_groups), every
  // group holding at least one row (mars.groups.factorize guarantees it).
  // Returns (advantages [B] f32, mean [G] f32, std [G] f32, count [G] i64, gain [G] f32).
  m.def(
      "mono_anchored_advantage(Tensor rewards, Tensor group_index, Tensor anchor_rewards, "
      "Tensor anchor_index, SymInt num_groups, bool norm_by_std, float eps, bool unbiased, "
      "bool singleton_raw) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
