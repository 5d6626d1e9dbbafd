// The schemas of mars's ops, registered once. CPU bodies live in cpu/, CUDA bodies in
// cuda/; autograd and fake (meta) implementations are registered from Python (mars/ops/_ext.py).
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
  // docs/advantage.md. group_index/anchor_index: int64 dense labels in [0, num_groups), every
  // group holding at least one row (mars.groups.factorize guarantees it).
  // Returns (advantages [B] f32, mean [G] f32, std [G] f32, count [G] i64, gain [G] f32).
  m.def(
      "mono_anchored_advantage(Tensor rewards, Tensor group_index, Tensor anchor_rewards, "
      "Tensor anchor_index, SymInt num_groups, bool norm_by_std, float eps, bool unbiased, "
      "bool singleton_raw) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Int group labels -> (index [B], anchor_index [K] (-1: label absent), labels [G]), dense
  // in ascending label order like torch.unique. CPU only: the eager fast path of
  // mars.groups.factorize; elsewhere torch.unique does it.
  m.def("dense_labels(Tensor labels, Tensor anchor_labels) -> (Tensor, Tensor, Tensor)");
  // The policy loss (mars.reference.policy_loss; docs/loss.md). logp/old_logp/ref_logp
  // [B, T] one float dtype, advantages and is_weights [B] or [B, T] of that dtype, mask
  // [B, T] bool, all on one device. is_weights (importance-sampling weights) multiply the
  // policy term of each token; their values (finite, >= 0 where the mask is set) are
  // mars.loss's to check: the op reads no value on the host.
  // dual_clip <= 0 and log_ratio_clamp <= 0 mean off; num_tokens/num_seqs/loss_scale <= 0
  // mean local (loss_scale: T). kl_type: 0 k1, 1 k2, 2 k3, 3 k3_ratio; agg: index in
  // mars.reference.LOSS_AGGS. NaN options, clip_low outside [0, 1), clip_high < 0, a
  // dual_clip in (0, 1] or inf, kl_coef < 0 or inf, an infinite clamp or normaliser raise
  // ValueError (mars.loss validates the full ranges before calling). kl_clamp: k3 (and
  // k3_ratio's k3) clamped to [-kl_clamp, kl_clamp] with d = ref - logp to +-20 (verl's
  // low_var_kl, default 10); <= 0 or inf: neither clamp (TRL's k3); NaN raises.
  // Returns (loss 0-dim, metrics [6] (mars.reference.LOSS_METRICS), grad [B, T] =
  // d(row loss sum)/d(logp) unscaled, row_scale [B]: d(loss)/d(logp) = grad * row_scale[:, None]);
  // float32 outputs (float64 for float64 inputs).
  m.def(
      "policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
      "Tensor? ref_logp, Tensor? is_weights, float clip_low, float clip_high, float dual_clip, "
      "float kl_coef, "
      "int kl_type, int agg, float num_tokens, float num_seqs, float loss_scale, bool seq_ratio, "
      "float log_ratio_clamp, float kl_clamp=10.0) -> (Tensor, Tensor, Tensor, Tensor)");
}
