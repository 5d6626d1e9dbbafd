// CUDA body of mars::mono_anchored_advantage (matches mars.reference.mono_anchored_advantage).
//
// The launcher lays rows and anchors out by group (stable sort + offsets, as torch ops on
// the device, no host sync); one warp then reduces one group: shifted by the group's first
// row, a two-pass variance in double, warp-shuffle reductions in a fixed tree order, so
// the result is deterministic (no float atomics) and identical values give exactly 0.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

template <typename scalar_t>
__global__ void advantage_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ m,
                                 const int64_t* __restrict__ roff, const int64_t* __restrict__ rord,
                                 const int64_t* __restrict__ aoff, const int64_t* __restrict__ aord,
                                 int64_t G, bool norm_by_std, double eps, bool unbiased,
                                 bool singleton_raw, float* __restrict__ adv,
                                 float* __restrict__ mean, float* __restrict__ std_out,
                                 int64_t* __restrict__ count, float* __restrict__ gain) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (g >= G) return;  // whole warp leaves together
  const int64_t r0 = roff[g], r1 = roff[g + 1], a0 = aoff[g], a1 = aoff[g + 1];
  const int64_t nr = r1 - r0, na = a1 - a0, n = nr + na;
  const double shift = static_cast<double>(r[rord[r0]]);
  double sr = 0.0, sa = 0.0;
  for (int64_t j = r0 + lane; j < r1; j += kWarp) sr += static_cast<double>(r[rord[j]]) - shift;
  for (int64_t j = a0 + lane; j < a1; j += kWarp) sa += static_cast<double>(m[aord[j]]) - shift;
  sr = warp_sum(sr);
  sa = warp_sum(sa);
  const double mu = (sr + sa) / n;
  double ss = 0.0;
  for (int64_t j = r0 + lane; j < r1; j += kWarp) {
    const double d = static_cast<double>(r[rord[j]]) - shift - mu;
    ss += d * d;
  }
  for (int64_t j = a0 + lane; j < a1; j += kWarp) {
    const double d = static_cast<double>(m[aord[j]]) - shift - mu;
    ss += d * d;
  }
  ss = warp_sum(ss);
  const double sigma = n > 1 ? sqrt(ss / (unbiased ? n - 1 : n)) : 0.0;
  for (int64_t j = r0 + lane; j < r1; j += kWarp) {
    const int64_t i = rord[j];
    const double x = static_cast<double>(r[i]);
    double a;
    if (n == 1) a = singleton_raw ? x : 0.0;
    else a = norm_by_std ? (x - shift - mu) / (sigma + eps) : (x - shift - mu);
    adv[i] = static_cast<float>(a);
  }
  if (lane == 0) {
    mean[g] = static_cast<float>(shift + mu);
    std_out[g] = static_cast<float>(sigma);
    count[g] = n;
    gain[g] = na > 0 ? static_cast<float>(sr / nr - sa / na) : CUDART_NAN_F;
  }
}

// (offsets [G+1], stable order) of `index` over G groups, on the device, without a sync.
std::pair<Tensor, Tensor> csr(const Tensor& index, int64_t G) {
  Tensor order = std::get<1>(at::sort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  Tensor counts = at::bincount(index, {}, G);  // length exactly G for valid indices
  Tensor offsets = at::zeros({G + 1}, index.options());
  offsets.narrow(0, 1, G).copy_(at::cumsum(counts, 0));
  return {offsets, order};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mono_anchored_advantage_cuda(
    const Tensor& rewards, const Tensor& group_index, const Tensor& anchor_rewards,
    const Tensor& anchor_index, int64_t num_groups, bool norm_by_std, double eps, bool unbiased,
    bool singleton_raw) {
  TORCH_CHECK_VALUE(rewards.dim() == 1, "rewards must be 1-D, got ", rewards.sizes());
  TORCH_CHECK_VALUE(group_index.scalar_type() == at::kLong && anchor_index.scalar_type() == at::kLong,
                    "group_index and anchor_index must be int64");
  TORCH_CHECK_VALUE(group_index.numel() == rewards.numel(), "group_index length must match rewards");
  TORCH_CHECK_VALUE(anchor_index.numel() == anchor_rewards.numel(),
                    "anchor_index length must match anchor_rewards");
  TORCH_CHECK_VALUE(anchor_rewards.scalar_type() == rewards.scalar_type(),
                    "anchor_rewards dtype must match rewards");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.numel(), G = num_groups;
  const Tensor r = rewards.contiguous(), m = anchor_rewards.contiguous();
  auto f32 = rewards.options().dtype(at::kFloat);
  Tensor adv = at::empty({B}, f32), mean = at::empty({G}, f32), sd = at::empty({G}, f32);
  Tensor gain = at::empty({G}, f32), count = at::empty({G}, rewards.options().dtype(at::kLong));
  if (G == 0) return {adv, mean, sd, count, gain};
  auto [roff, rord] = csr(group_index.contiguous(), G);
  auto [aoff, aord] = csr(anchor_index.contiguous(), G);
  const int blocks = static_cast<int>((G + kWarpsPerBlock - 1) / kWarpsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "mars_advantage_cuda", [&] {
    advantage_kernel<scalar_t><<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(
        r.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), roff.data_ptr<int64_t>(),
        rord.data_ptr<int64_t>(), aoff.data_ptr<int64_t>(), aord.data_ptr<int64_t>(), G,
        norm_by_std, eps, unbiased, singleton_raw, adv.data_ptr<float>(), mean.data_ptr<float>(),
        sd.data_ptr<float>(), count.data_ptr<int64_t>(), gain.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {adv, mean, sd, count, gain};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars, CUDA, m) {
  m.impl("mono_anchored_advantage", &mono_anchored_advantage_cuda);
}

}  // namespace mars
