// Host-side argument checks of mars::policy_loss, shared by the CPU and CUDA bodies.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "policy_loss.h"

namespace mars {
namespace pl {

// Raises ValueError for a bad shape, dtype or option; returns the kernels' parameters.
// mars.reference.check_policy_loss_args validates the options for every backend; this
// repeats the op's own contract (csrc/ops.cpp) for direct callers of torch.ops.mars: no
// NaN, no inf where it means nothing, so every branch below is well defined.
inline Params check_args(const at::Tensor& logp, const at::Tensor& old_logp,
                         const at::Tensor& advantages, const at::Tensor& mask,
                         const std::optional<at::Tensor>& ref_logp,
                         const std::optional<at::Tensor>& is_weights, double clip_low,
                         double clip_high, double dual_clip, double kl_coef, int64_t kl_type,
                         int64_t agg, double num_tokens, double num_seqs, double loss_scale,
                         bool seq_ratio, double log_ratio_clamp, double kl_clamp) {
  TORCH_CHECK_VALUE(clip_low >= 0 && clip_low < 1, "clip_low must be in [0, 1), got ", clip_low);
  TORCH_CHECK_VALUE(clip_high >= 0, "clip_high must be >= 0, got ", clip_high);
  TORCH_CHECK_VALUE(dual_clip <= 0 || (dual_clip > 1 && std::isfinite(dual_clip)),
                    "dual_clip must be <= 0 (off) or a finite number > 1, got ", dual_clip);
  TORCH_CHECK_VALUE(kl_coef >= 0 && std::isfinite(kl_coef),
                    "kl_coef must be a finite number >= 0, got ", kl_coef);
  TORCH_CHECK_VALUE(log_ratio_clamp <= 0 || std::isfinite(log_ratio_clamp),
                    "log_ratio_clamp must be <= 0 (off) or a finite number > 0, got ",
                    log_ratio_clamp);
  TORCH_CHECK_VALUE(!std::isnan(kl_clamp),
                    "kl_clamp must be <= 0 or inf (off) or a number > 0, got ", kl_clamp);
  TORCH_CHECK_VALUE(std::isfinite(num_tokens) && std::isfinite(num_seqs) &&
                        std::isfinite(loss_scale),
                    "num_tokens, num_seqs and loss_scale must be finite (<= 0: local), got ",
                    num_tokens, ", ", num_seqs, ", ", loss_scale);
  TORCH_CHECK_VALUE(logp.dim() == 2, "logp must be [B, T], got ", logp.sizes());
  // One device for every input: the kernels read them all through raw pointers.
  const auto dev = logp.device();
  TORCH_CHECK_VALUE(old_logp.device() == dev, "old_logp is on ", old_logp.device(),
                    " but logp is on ", dev);
  TORCH_CHECK_VALUE(advantages.device() == dev, "advantages is on ", advantages.device(),
                    " but logp is on ", dev);
  TORCH_CHECK_VALUE(mask.device() == dev, "mask is on ", mask.device(), " but logp is on ", dev);
  if (ref_logp.has_value())
    TORCH_CHECK_VALUE(ref_logp->device() == dev, "ref_logp is on ", ref_logp->device(),
                      " but logp is on ", dev);
  if (is_weights.has_value())
    TORCH_CHECK_VALUE(is_weights->device() == dev, "is_weights is on ", is_weights->device(),
                      " but logp is on ", dev);
  TORCH_CHECK_VALUE(old_logp.sizes() == logp.sizes(), "old_logp must have logp's shape");
  TORCH_CHECK_VALUE(mask.sizes() == logp.sizes(), "mask must have logp's shape");
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, "mask must be bool");
  TORCH_CHECK_VALUE(old_logp.scalar_type() == logp.scalar_type() &&
                        advantages.scalar_type() == logp.scalar_type(),
                    "old_logp and advantages must have logp's dtype");
  const bool adv_2d = advantages.dim() == 2;
  TORCH_CHECK_VALUE(adv_2d ? advantages.sizes() == logp.sizes()
                           : (advantages.dim() == 1 && advantages.size(0) == logp.size(0)),
                    "advantages must be [B] or [B, T]");
  TORCH_CHECK_VALUE(kl_type >= 0 && kl_type <= 3, "kl_type must be 0, 1, 2 or 3");
  TORCH_CHECK_VALUE(agg >= 0 && agg <= 4, "agg must be in [0, 4]");
  const bool has_ref = ref_logp.has_value();
  if (has_ref) {
    TORCH_CHECK_VALUE(ref_logp->sizes() == logp.sizes() &&
                          ref_logp->scalar_type() == logp.scalar_type(),
                      "ref_logp must have logp's shape and dtype");
  }
  TORCH_CHECK_VALUE(!(kl_coef > 0) || has_ref, "kl_coef > 0 needs ref_logp");
  const bool has_is = is_weights.has_value();
  bool is_2d = false;
  if (has_is) {
    is_2d = is_weights->dim() == 2;
    TORCH_CHECK_VALUE(is_2d ? is_weights->sizes() == logp.sizes()
                            : (is_weights->dim() == 1 && is_weights->size(0) == logp.size(0)),
                      "is_weights must be [B] or [B, T], got ", is_weights->sizes());
    TORCH_CHECK_VALUE(is_weights->scalar_type() == logp.scalar_type(),
                      "is_weights must have logp's dtype");
  }
  const bool kl_clamped = kl_clamp > 0 && std::isfinite(kl_clamp);
  const double inf = std::numeric_limits<double>::infinity();
  return Params{clip_low, clip_high, dual_clip, kl_coef, log_ratio_clamp,
                kl_clamped ? 20.0 : inf, kl_clamped ? kl_clamp : inf, static_cast<int>(kl_type),
                has_ref, dual_clip > 0, log_ratio_clamp > 0, kl_coef > 0 && has_ref, seq_ratio,
                has_is, is_2d};
}

// What both bodies read: the checked parameters, contiguous inputs (r and iw alias x when
// ref_logp / is_weights are absent: the kernels never read them then), the aggregation
// options and the accumulation dtype (double for double inputs, else float).
struct Inputs {
  Params p;
  int64_t B, Tn;
  bool adv_2d;
  at::ScalarType acc;
  int agg;
  double num_tokens, num_seqs, loss_scale;
  at::Tensor x, o, a, m, r, iw;
};

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // loss, metrics, grad, row_scale

// The op's C++ signature (csrc/ops.cpp) around a device body `Run`: checks and prepares the
// inputs once, so the CPU and CUDA registrations share one argument list.
template <Outputs (*Run)(const Inputs&)>
Outputs entry(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
              const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
              const std::optional<at::Tensor>& is_weights, double clip_low, double clip_high,
              double dual_clip, double kl_coef, int64_t kl_type, int64_t agg, double num_tokens,
              double num_seqs, double loss_scale, bool seq_ratio, double log_ratio_clamp,
              double kl_clamp) {
  const Params p = check_args(logp, old_logp, advantages, mask, ref_logp, is_weights, clip_low,
                              clip_high, dual_clip, kl_coef, kl_type, agg, num_tokens, num_seqs,
                              loss_scale, seq_ratio, log_ratio_clamp, kl_clamp);
  const at::Tensor x = logp.contiguous();
  const at::ScalarType acc = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return Run(Inputs{p, logp.size(0), logp.size(1), advantages.dim() == 2, acc,
                    static_cast<int>(agg), num_tokens, num_seqs, loss_scale, x,
                    old_logp.contiguous(), advantages.contiguous(), mask.contiguous(),
                    p.has_ref ? ref_logp->contiguous() : x,
                    p.has_is ? is_weights->contiguous() : x});
}

}  // namespace pl
}  // namespace mars
