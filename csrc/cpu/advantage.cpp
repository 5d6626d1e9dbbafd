// CPU body of mars::mono_anchored_advantage (matches mars.reference.mono_anchored_advantage).
//
// Layout: a stable counting sort of rows and anchors by group (O(B + K), no comparison
// sort), then one at::parallel_for task per block of groups. Each group is reduced in
// double, shifted by its first row's reward so identical values give exactly 0, with a
// two-pass variance. Deterministic: the order of every sum is fixed by the row order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../advantage.h"

#include <cmath>
#include <limits>
#include <vector>

namespace mars {
namespace {

using at::Tensor;

// Stable counting sort of `index` (values in [0, G)) -> (offsets [G+1], order [n]).
void counting_sort(const int64_t* index, int64_t n, int64_t G, const char* name,
                   std::vector<int64_t>& offsets, std::vector<int64_t>& order) {
  offsets.assign(G + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = index[i];
    TORCH_CHECK_VALUE(g >= 0 && g < G, name, "[", i, "] = ", g, " is outside [0, ", G, ")");
    ++offsets[g + 1];
  }
  for (int64_t g = 0; g < G; ++g) offsets[g + 1] += offsets[g];
  order.resize(n);
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) order[cursor[index[i]]++] = i;
}

template <typename scalar_t>
void advantage_kernel(const scalar_t* r, const scalar_t* m, const std::vector<int64_t>& roff,
                      const std::vector<int64_t>& rord, const std::vector<int64_t>& aoff,
                      const std::vector<int64_t>& aord, int64_t G, bool norm_by_std, double eps,
                      bool unbiased, bool singleton_raw, float* adv, float* mean, float* std_out,
                      int64_t* count, float* gain) {
  // Threads pay off only past ~64k values: below, their start-up (and, on a busy machine,
  // OpenMP's wait for a free core) costs more than the work.
  const int64_t per_group = std::max<int64_t>(1, (roff[G] + aoff[G]) / G);
  const int64_t grain = std::max<int64_t>(1, 65536 / per_group);
  at::parallel_for(0, G, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t r0 = roff[g], r1 = roff[g + 1], a0 = aoff[g], a1 = aoff[g + 1];
      const int64_t nr = r1 - r0, na = a1 - a0, n = nr + na;
      const double shift = static_cast<double>(r[rord[r0]]);
      double sr = 0.0, sa = 0.0;
      for (int64_t j = r0; j < r1; ++j) sr += static_cast<double>(r[rord[j]]) - shift;
      for (int64_t j = a0; j < a1; ++j) sa += static_cast<double>(m[aord[j]]) - shift;
      const double mu = (sr + sa) / n;  // mean of the shifted pool
      double ss = 0.0;
      for (int64_t j = r0; j < r1; ++j) {
        const double d = static_cast<double>(r[rord[j]]) - shift - mu;
        ss += d * d;
      }
      for (int64_t j = a0; j < a1; ++j) {
        const double d = static_cast<double>(m[aord[j]]) - shift - mu;
        ss += d * d;
      }
      const double sigma = n > 1 ? std::sqrt(ss / (unbiased ? n - 1 : n)) : 0.0;
      for (int64_t j = r0; j < r1; ++j) {
        const int64_t i = rord[j];
        const double x = static_cast<double>(r[i]);
        double a;
        if (n == 1) a = singleton_raw ? x : 0.0;
        else a = norm_by_std ? (sigma + eps > 0 ? (x - shift - mu) / (sigma + eps) : 0.0) : (x - shift - mu);
        adv[i] = static_cast<float>(a);
      }
      mean[g] = static_cast<float>(shift + mu);
      std_out[g] = static_cast<float>(sigma);
      count[g] = n;
      gain[g] = na > 0 ? static_cast<float>(sr / nr - sa / na)
                       : std::numeric_limits<float>::quiet_NaN();
    }
  });
}

advantage::Outputs mono_anchored_advantage_cpu(
    const Tensor& rewards, const Tensor& group_index, const Tensor& anchor_rewards,
    const Tensor& anchor_index, int64_t num_groups, bool norm_by_std, double eps, bool unbiased,
    bool singleton_raw) {
  advantage::check_args(rewards, group_index, anchor_rewards, anchor_index);
  const int64_t B = rewards.numel(), K = anchor_rewards.numel(), G = num_groups;
  const Tensor r = rewards.contiguous(), m = anchor_rewards.contiguous();
  const Tensor gi = group_index.contiguous(), ai = anchor_index.contiguous();
  auto out = advantage::empty_outputs(rewards, G);
  auto& [adv, mean, sd, count, gain] = out;
  if (G == 0) return out;
  std::vector<int64_t> roff, rord, aoff, aord;
  counting_sort(gi.data_ptr<int64_t>(), B, G, "group_index", roff, rord);
  counting_sort(ai.data_ptr<int64_t>(), K, G, "anchor_index", aoff, aord);
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK_VALUE(roff[g + 1] > roff[g], "group ", g, " has no rows (empty group)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "mars_advantage_cpu", [&] {
    advantage_kernel<scalar_t>(r.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), roff, rord, aoff,
                               aord, G, norm_by_std, eps, unbiased, singleton_raw,
                               adv.data_ptr<float>(), mean.data_ptr<float>(), sd.data_ptr<float>(),
                               count.data_ptr<int64_t>(), gain.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mars, CPU, m) {
  m.impl("mono_anchored_advantage", &mono_anchored_advantage_cpu);
}

}  // namespace mars
