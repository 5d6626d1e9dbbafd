// Host-side argument checks of mars::policy_loss, shared by the CPU and CUDA bodies.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "policy_loss.h"

namespace mars {
namespace pl {

// Raises ValueError for a bad shape, dtype or option; returns the kernels' parameters.
inline Params check_args(const at::Tensor& logp, const at::Tensor& old_logp,
                         const at::Tensor& advantages, const at::Tensor& mask,
                         const std::optional<at::Tensor>& ref_logp, double clip_low,
                         double clip_high, double dual_clip, double kl_coef, int64_t kl_type,
                         int64_t agg, bool seq_ratio, double log_ratio_clamp) {
  TORCH_CHECK_VALUE(logp.dim() == 2, "logp must be [B, T], got ", logp.sizes());
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
  TORCH_CHECK_VALUE(kl_type >= 0 && kl_type <= 2, "kl_type must be 0, 1 or 2");
  TORCH_CHECK_VALUE(agg >= 0 && agg <= 4, "agg must be in [0, 4]");
  const bool has_ref = ref_logp.has_value();
  if (has_ref) {
    TORCH_CHECK_VALUE(ref_logp->sizes() == logp.sizes() &&
                          ref_logp->scalar_type() == logp.scalar_type(),
                      "ref_logp must have logp's shape and dtype");
  }
  TORCH_CHECK_VALUE(!(kl_coef > 0) || has_ref, "kl_coef > 0 needs ref_logp");
  return Params{clip_low, clip_high, dual_clip, kl_coef, log_ratio_clamp, static_cast<int>(kl_type),
                has_ref, dual_clip > 0, log_ratio_clamp > 0, kl_coef > 0 && has_ref, seq_ratio};
}

}  // namespace pl
}  // namespace mars
