// CPU body of mars::mono_anchored_advantage (matches mars.reference.mono_anchored_advantage).
//
// Each group is reduced in double, shifted by its first row's reward so identical values
// give exactly 0, with a two-pass variance. Small batches stream over the rows with
// per-group accumulators; large ones sort rows by group (counting sort, O(B + K)) and
// reduce groups in parallel. Deterministic, and both paths bitwise equal: every sum runs
// in row order.
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

struct Options {
  bool norm_by_std, unbiased, singleton_raw;
  double eps;
};

// A rollout's advantage from its group's shift, shifted mean mu, std sigma and pool size n.
inline float advantage_value(double x, double shift, double mu, double sigma, int64_t n,
                             const Options& o) {
  if (n == 1) return static_cast<float>(o.singleton_raw ? x : 0.0);
  const double centred = x - shift - mu;
  if (!o.norm_by_std) return static_cast<float>(centred);
  return static_cast<float>(sigma + o.eps > 0 ? centred / (sigma + o.eps) : 0.0);
}

inline double pool_std(double ss, int64_t n, const Options& o) {
  return n > 1 ? std::sqrt(ss / (o.unbiased ? n - 1 : n)) : 0.0;
}

inline void write_stats(int64_t g, double shift, double mu, double sigma, double sr, double sa,
                        int64_t nr, int64_t na, float* mean, float* std_out, int64_t* count,
                        float* gain) {
  mean[g] = static_cast<float>(shift + mu);
  std_out[g] = static_cast<float>(sigma);
  count[g] = nr + na;
  gain[g] = na > 0 ? static_cast<float>(sr / nr - sa / na) : std::numeric_limits<float>::quiet_NaN();
}

// Small batches: three streaming passes over rows and anchors with per-group accumulators,
// no sort. Each group's sums run in row order, exactly as in the sorted path below, so
// both paths give bitwise-equal results.
template <typename scalar_t>
void advantage_streaming(const scalar_t* r, const int64_t* gi, int64_t B, const scalar_t* m,
                         const int64_t* ai, int64_t K, int64_t G, const Options& o, float* adv,
                         float* mean, float* std_out, int64_t* count, float* gain) {
  std::vector<double> shift(G), sr(G, 0.0), sa(G, 0.0), mu(G), ss(G, 0.0), sigma(G);
  std::vector<int64_t> nr(G, 0), na(G, 0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t g = gi[i];
    TORCH_CHECK_VALUE(g >= 0 && g < G, "group_index[", i, "] = ", g, " is outside [0, ", G, ")");
    const double x = static_cast<double>(r[i]);
    if (nr[g]++ == 0) shift[g] = x;
    sr[g] += x - shift[g];
  }
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK_VALUE(nr[g] > 0, "group ", g, " has no rows (empty group)");
  for (int64_t j = 0; j < K; ++j) {
    const int64_t g = ai[j];
    TORCH_CHECK_VALUE(g >= 0 && g < G, "anchor_index[", j, "] = ", g, " is outside [0, ", G, ")");
    sa[g] += static_cast<double>(m[j]) - shift[g];
    ++na[g];
  }
  for (int64_t g = 0; g < G; ++g) mu[g] = (sr[g] + sa[g]) / (nr[g] + na[g]);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t g = gi[i];
    const double d = static_cast<double>(r[i]) - shift[g] - mu[g];
    ss[g] += d * d;
  }
  for (int64_t j = 0; j < K; ++j) {
    const int64_t g = ai[j];
    const double d = static_cast<double>(m[j]) - shift[g] - mu[g];
    ss[g] += d * d;
  }
  for (int64_t g = 0; g < G; ++g) {
    sigma[g] = pool_std(ss[g], nr[g] + na[g], o);
    write_stats(g, shift[g], mu[g], sigma[g], sr[g], sa[g], nr[g], na[g], mean, std_out, count, gain);
  }
  for (int64_t i = 0; i < B; ++i) {
    const int64_t g = gi[i];
    adv[i] = advantage_value(static_cast<double>(r[i]), shift[g], mu[g], sigma[g], nr[g] + na[g], o);
  }
}

// Large batches: rows and anchors sorted by group (stable counting sort), then one
// at::parallel_for task per block of groups, each group reduced in row order.
template <typename scalar_t>
void advantage_sorted(const scalar_t* r, const int64_t* gi, int64_t B, const scalar_t* m,
                      const int64_t* ai, int64_t K, int64_t G, const Options& o, float* adv,
                      float* mean, float* std_out, int64_t* count, float* gain) {
  std::vector<int64_t> roff, rord, aoff, aord;
  counting_sort(gi, B, G, "group_index", roff, rord);
  counting_sort(ai, K, G, "anchor_index", aoff, aord);
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK_VALUE(roff[g + 1] > roff[g], "group ", g, " has no rows (empty group)");
  const int64_t per_group = std::max<int64_t>(1, (B + K) / G);
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
      const double sigma = pool_std(ss, n, o);
      for (int64_t j = r0; j < r1; ++j)
        adv[rord[j]] = advantage_value(static_cast<double>(r[rord[j]]), shift, mu, sigma, n, o);
      write_stats(g, shift, mu, sigma, sr, sa, nr, na, mean, std_out, count, gain);
    }
  });
}

// Below this many values one thread is faster than threads (their start-up, and on a busy
// machine OpenMP's wait for a free core, cost more than the work).
constexpr int64_t kParallelValues = 65536;

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
  const Options o{norm_by_std, unbiased, singleton_raw, eps};
  const bool sorted = B + K > kParallelValues && at::get_num_threads() > 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "mars_advantage_cpu", [&] {
    auto run = sorted ? advantage_sorted<scalar_t> : advantage_streaming<scalar_t>;
    run(r.data_ptr<scalar_t>(), gi.data_ptr<int64_t>(), B, m.data_ptr<scalar_t>(),
        ai.data_ptr<int64_t>(), K, G, o, adv.data_ptr<float>(), mean.data_ptr<float>(),
        sd.data_ptr<float>(), count.data_ptr<int64_t>(), gain.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mars, CPU, m) {
  m.impl("mono_anchored_advantage", &mono_anchored_advantage_cpu);
}

}  // namespace mars
