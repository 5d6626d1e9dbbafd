// Shared by the CPU (cpu/advantage.cpp) and CUDA (cuda/advantage.cu) bodies of
// mars::mono_anchored_advantage: the argument checks and the outputs' allocation.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace mars {
namespace advantage {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_args(const at::Tensor& rewards, const at::Tensor& group_index,
                       const at::Tensor& anchor_rewards, const at::Tensor& anchor_index) {
  TORCH_CHECK_VALUE(rewards.dim() == 1, "rewards must be 1-D, got ", rewards.sizes());
  TORCH_CHECK_VALUE(group_index.scalar_type() == at::kLong && anchor_index.scalar_type() == at::kLong,
                    "group_index and anchor_index must be int64");
  TORCH_CHECK_VALUE(group_index.numel() == rewards.numel(), "group_index has ", group_index.numel(),
                    " entries for ", rewards.numel(), " rewards");
  TORCH_CHECK_VALUE(anchor_index.numel() == anchor_rewards.numel(), "anchor_index has ",
                    anchor_index.numel(), " entries for ", anchor_rewards.numel(), " anchor_rewards");
  TORCH_CHECK_VALUE(anchor_rewards.scalar_type() == rewards.scalar_type(),
                    "anchor_rewards dtype must match rewards");
}

// (advantages [B] f32, mean [G] f32, std [G] f32, count [G] i64, gain [G] f32), uninitialised.
inline Outputs empty_outputs(const at::Tensor& rewards, int64_t num_groups) {
  auto f32 = rewards.options().dtype(at::kFloat);
  return {at::empty({rewards.numel()}, f32), at::empty({num_groups}, f32),
          at::empty({num_groups}, f32), at::empty({num_groups}, rewards.options().dtype(at::kLong)),
          at::empty({num_groups}, f32)};
}

}  // namespace advantage
}  // namespace mars
