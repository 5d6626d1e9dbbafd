// CUDA body of mars::mono_anchored_advantage (matches mars.reference.mono_anchored_advantage).
//
// The launcher lays rollouts and anchors out together by group: one stable sort of the
// B + K group indices and CSR offsets by searchsorted of 0..G in the sorted keys (torch ops
// on the device, no host sync: bincount would read its input's maximum on the host). One
// warp then reduces one group: shifted by the group's first row, a two-pass variance in
// double, warp-shuffle reductions in a fixed tree order, so the result is deterministic (no
// float atomics) and identical values give exactly 0.
//
// The kernel checks the op's contract itself, as the CPU body does, without a host sync:
// an index outside [0, num_groups) (its key sorts before offset 0 or after offset G) or a
// group with no rollout (no element, or an anchor first: rollouts precede anchors in the
// stable sort) makes the outputs it touches NaN and fails a device-side assert
// (CUDA_KERNEL_ASSERT, as PyTorch's own index checks: the error surfaces at the next
// synchronisation). mars.groups never passes such indices.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "../advantage.h"

#include <math_constants.h>

#include <cmath>

namespace mars {
namespace {

using at::Tensor;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// x = cat(rewards, anchors): element e < B is rollout e, e >= B is anchor e - B. Elements
// are stably sorted by group, so each group's first element is its first rollout.
// Rows whose index lies outside [0, G) sit in ord[0, off[0]) and ord[off[G], total): NaN.
__device__ void nan_outside(const int64_t* __restrict__ ord, int64_t from, int64_t to, int64_t B,
                            int lane, float* __restrict__ adv) {
  for (int64_t j = from + lane; j < to; j += kWarp)
    if (ord[j] < B) adv[ord[j]] = CUDART_NAN_F;
}

template <typename scalar_t>
__global__ void advantage_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ off,
                                 const int64_t* __restrict__ ord, int64_t B, int64_t total,
                                 int64_t G, bool norm_by_std, double eps, bool unbiased,
                                 bool singleton_raw, float* __restrict__ adv,
                                 float* __restrict__ mean, float* __restrict__ std_out,
                                 int64_t* __restrict__ count, float* __restrict__ gain) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (g >= G) return;  // whole warp leaves together
  if (g == 0 && off[0] != 0) {  // indices below 0
    nan_outside(ord, 0, off[0], B, lane, adv);
    CUDA_KERNEL_ASSERT(false && "mars::mono_anchored_advantage: an index is outside [0, num_groups)");
  }
  if (g == G - 1 && off[G] != total) {  // indices >= num_groups
    nan_outside(ord, off[G], total, B, lane, adv);
    CUDA_KERNEL_ASSERT(false && "mars::mono_anchored_advantage: an index is outside [0, num_groups)");
  }
  const int64_t start = off[g], end = off[g + 1], n = end - start;
  if (n == 0 || ord[start] >= B) {  // a group without rollouts (empty, or anchors only)
    if (lane == 0) {
      mean[g] = std_out[g] = gain[g] = CUDART_NAN_F;
      count[g] = n;
    }
    CUDA_KERNEL_ASSERT(false && "mars::mono_anchored_advantage: a group has no rows (empty group)");
    return;
  }
  const double shift = static_cast<double>(x[ord[start]]);
  double sr = 0.0, sa = 0.0, nr = 0.0;
  for (int64_t j = start + lane; j < end; j += kWarp) {  // pass 1: shifted sums
    const int64_t e = ord[j];
    const double d = static_cast<double>(x[e]) - shift;
    if (e < B) { sr += d; nr += 1.0; } else { sa += d; }
  }
  sr = warp_sum(sr);
  sa = warp_sum(sa);
  nr = warp_sum(nr);
  const double na = static_cast<double>(n) - nr;
  const double mu = (sr + sa) / n;
  double ss = 0.0;
  for (int64_t j = start + lane; j < end; j += kWarp) {  // pass 2: squared deviations
    const double d = static_cast<double>(x[ord[j]]) - shift - mu;
    ss += d * d;
  }
  ss = warp_sum(ss);
  const double sigma = n > 1 ? sqrt(ss / (unbiased ? n - 1 : n)) : 0.0;
  for (int64_t j = start + lane; j < end; j += kWarp) {  // pass 3: rollouts' advantages
    const int64_t e = ord[j];
    if (e >= B) continue;
    const double v = static_cast<double>(x[e]);
    double a;
    if (n == 1) a = singleton_raw ? v : 0.0;
    else a = norm_by_std ? (sigma + eps > 0 ? (v - shift - mu) / (sigma + eps) : 0.0) : (v - shift - mu);
    adv[e] = static_cast<float>(a);
  }
  if (lane == 0) {
    mean[g] = static_cast<float>(shift + mu);
    std_out[g] = static_cast<float>(sigma);
    count[g] = n;
    gain[g] = na > 0 ? static_cast<float>(sr / nr - sa / na) : CUDART_NAN_F;
  }
}

advantage::Outputs mono_anchored_advantage_cuda(
    const Tensor& rewards, const Tensor& group_index, const Tensor& anchor_rewards,
    const Tensor& anchor_index, int64_t num_groups, bool norm_by_std, double eps, bool unbiased,
    bool singleton_raw) {
  advantage::check_args(rewards, group_index, anchor_rewards, anchor_index);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.numel(), G = num_groups;
  TORCH_CHECK_VALUE(G >= 0, "num_groups must be >= 0, got ", G);
  // Sizes are host values: no group for B + K > 0 values means every index is out of range.
  TORCH_CHECK_VALUE(G > 0 || B + anchor_rewards.numel() == 0, "group_index / anchor_index: "
                    "every index is outside [0, num_groups) = [0, 0)");
  auto out = advantage::empty_outputs(rewards, G);
  auto& [adv, mean, sd, count, gain] = out;
  if (G == 0) return out;
  // One layout for rollouts and anchors together: a stable sort of B + K keys, CSR
  // offsets off[g] = first position of a key >= g (searchsorted), g = 0 .. G; torch ops on
  // the device, no host sync.
  const Tensor x = at::cat({rewards, anchor_rewards});
  const Tensor keys = at::cat({group_index, anchor_index});
  const int64_t total = keys.numel();
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const Tensor& sorted_keys = std::get<0>(sorted);
  const Tensor& ord = std::get<1>(sorted);
  const Tensor off = at::searchsorted(sorted_keys, at::arange(G + 1, keys.options()));
  const int blocks = static_cast<int>((G + kWarpsPerBlock - 1) / kWarpsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mars_advantage_cuda", [&] {
    advantage_kernel<scalar_t><<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(
        x.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), ord.data_ptr<int64_t>(), B, total, G,
        norm_by_std, eps, unbiased, singleton_raw, adv.data_ptr<float>(), mean.data_ptr<float>(),
        sd.data_ptr<float>(), count.data_ptr<int64_t>(), gain.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mars, CUDA, m) {
  m.impl("mono_anchored_advantage", &mono_anchored_advantage_cuda);
}

}  // namespace mars
