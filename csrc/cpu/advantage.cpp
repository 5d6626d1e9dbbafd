// CPU body of mars::mono_anchored_advantage (matches mars.reference.mono_anchored_advantage),
// and mars::advantage_int_labels: the same with the int labels factorised and the values
// checked in the one call (the eager fast path of mars.mono_anchored_advantage).
//
// Each group is reduced in double, shifted by its first row's reward so identical values
// give exactly 0, with a two-pass variance. Batches whose groups all hold the same number
// of rows (GRPO's n rollouts per prompt) are laid out row-of-group by group, so each pass
// runs over all groups at once in SIMD lanes; other small batches stream over the rows
// with per-group accumulators; large ones (several threads) sort rows by group (counting
// sort, O(B + K)) and reduce groups in parallel. Deterministic, and all paths bitwise
// equal: every sum runs in row order, then anchor order, with the same operations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../advantage.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

namespace mars {

// cpu/labels.cpp: l [n], a [k] int64 labels -> index [n] (dense, ascending label order),
// aindex [k] (-1: absent); returns the distinct labels, ascending.
std::vector<int64_t> factorize_int(const int64_t* lp, int64_t n, const int64_t* ap, int64_t k,
                                   int64_t* ip, int64_t* aip);

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
// An AVX2 clone picked at load time where the CPU has it. AVX2 without FMA: no contraction,
// so every clone rounds exactly as the scalar code does.
#define MARS_CLONES __attribute__((target_clones("avx2", "default")))
#define MARS_INT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MARS_CLONES
#define MARS_INT_CLONES
#endif

namespace {

using at::Tensor;

// Min and max of n >= 1 int64 values (a loop the compiler vectorises; AVX-512 has the
// 64-bit min and max).
MARS_INT_CLONES void minmax_int64(const int64_t* p, int64_t n, int64_t* lo_out, int64_t* hi_out) {
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 0; i < n; ++i) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
  }
  *lo_out = lo;
  *hi_out = hi;
}

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


// ---- uniform groups: lanes over groups ---------------------------------------------------
// x [n * G]: row j (in row order) of group g at j * G + g, as float (exact for float, half
// and bfloat16 rewards) or double. Each loop runs over the groups in SIMD lanes, and
// within a lane over j in row order: each group's sums are the streaming path's,
// operation for operation, in double.

#define MARS_LANES(X)                                                                          \
  MARS_CLONES void lanes_sum(const X* x, int64_t n, int64_t G, const double* shift,            \
                             double* sr) {                                                     \
    for (int64_t g = 0; g < G; ++g) sr[g] = 0.0;                                               \
    for (int64_t j = 0; j < n; ++j) {                                                          \
      const X* xj = x + j * G;                                                                 \
      for (int64_t g = 0; g < G; ++g) sr[g] += static_cast<double>(xj[g]) - shift[g];          \
    }                                                                                          \
  }                                                                                            \
  MARS_CLONES void lanes_ss(const X* x, int64_t n, int64_t G, const double* shift,             \
                            const double* mu, double* ss) {                                    \
    for (int64_t g = 0; g < G; ++g) ss[g] = 0.0;                                               \
    for (int64_t j = 0; j < n; ++j) {                                                          \
      const X* xj = x + j * G;                                                                 \
      for (int64_t g = 0; g < G; ++g) {                                                        \
        const double d = static_cast<double>(xj[g]) - shift[g] - mu[g];                        \
        ss[g] += d * d;                                                                        \
      }                                                                                        \
    }                                                                                          \
  }                                                                                            \
  MARS_CLONES void lanes_adv(const X* x, int64_t n, int64_t G, const double* shift,            \
                             const double* mu, const double* den, float* out) {                \
    for (int64_t j = 0; j < n; ++j) {                                                          \
      const X* xj = x + j * G;                                                                 \
      float* oj = out + j * G;                                                                 \
      for (int64_t g = 0; g < G; ++g)                                                          \
        oj[g] = static_cast<float>((static_cast<double>(xj[g]) - shift[g] - mu[g]) / den[g]);  \
    }                                                                                          \
  }
MARS_LANES(float)
MARS_LANES(double)
#undef MARS_LANES

template <typename T>
using Buffer = std::unique_ptr<T[]>;  // uninitialised scratch

// The uniform path once the rows are placed: x [n * G] (the layout above), ord [B] (row
// i's place among its group's rows), gi(i): row i's group. Every group holds n rows.
template <typename scalar_t, typename X, typename GroupOf>
void advantage_lanes(const scalar_t* r, const X* x, const int32_t* ord, GroupOf gi,
                     int64_t B, int64_t n, const scalar_t* m, const int64_t* ai, int64_t K,
                     int64_t G, const Options& o, float* adv, float* mean, float* std_out,
                     int64_t* count, float* gain) {
  std::vector<double> shift(G), sr(G), sa(G, 0.0), mu(G), ss(G), sigma(G), den(G);
  std::vector<int64_t> na(G, 0);
  Buffer<float> out(new float[B]);
  for (int64_t g = 0; g < G; ++g) shift[g] = static_cast<double>(x[g]);
  lanes_sum(x, n, G, shift.data(), sr.data());
  for (int64_t j = 0; j < K; ++j) {
    const int64_t g = ai[j];
    TORCH_CHECK_VALUE(g >= 0 && g < G, "anchor_index[", j, "] = ", g, " is outside [0, ", G, ")");
    sa[g] += static_cast<double>(m[j]) - shift[g];
    ++na[g];
  }
  for (int64_t g = 0; g < G; ++g) mu[g] = (sr[g] + sa[g]) / (n + na[g]);
  lanes_ss(x, n, G, shift.data(), mu.data(), ss.data());
  for (int64_t j = 0; j < K; ++j) {
    const int64_t g = ai[j];
    const double d = static_cast<double>(m[j]) - shift[g] - mu[g];
    ss[g] += d * d;
  }
  bool special = false;  // a pool of one, or sigma + eps not > 0: advantage_value decides
  for (int64_t g = 0; g < G; ++g) {
    sigma[g] = pool_std(ss[g], n + na[g], o);
    write_stats(g, shift[g], mu[g], sigma[g], sr[g], sa[g], n, na[g], mean, std_out, count, gain);
    den[g] = o.norm_by_std ? sigma[g] + o.eps : 1.0;  // centred / 1.0 == centred
    if (n + na[g] == 1 || !(den[g] > 0)) {
      special = true;
      den[g] = 1.0;
    }
  }
  lanes_adv(x, n, G, shift.data(), mu.data(), den.data(), out.get());
  for (int64_t i = 0; i < B; ++i) adv[i] = out[ord[i] * G + gi(i)];
  if (!special) return;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t g = gi(i), pool = n + na[g];
    if (pool == 1 || (o.norm_by_std && !(sigma[g] + o.eps > 0)))
      adv[i] = advantage_value(static_cast<double>(r[i]), shift[g], mu[g], sigma[g], pool, o);
  }
}

template <typename scalar_t>
using XOf = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Every group holds n = B / G rows; gi [B] their groups, checked.
template <typename scalar_t>
void advantage_uniform(const scalar_t* r, const int64_t* gi, int64_t B, int64_t n,
                       const scalar_t* m, const int64_t* ai, int64_t K, int64_t G,
                       const Options& o, float* adv, float* mean, float* std_out, int64_t* count,
                       float* gain) {
  using X = XOf<scalar_t>;
  Buffer<X> x(new X[B]);
  Buffer<int32_t> ord(new int32_t[B]);
  std::vector<int32_t> cur(G, 0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t g = gi[i];
    const int32_t c = cur[g]++;
    ord[i] = c;
    x[c * G + g] = static_cast<X>(r[i]);
  }
  advantage_lanes(r, x.get(), ord.get(), [gi](int64_t i) { return gi[i]; }, B, n, m, ai, K, G, o,
                  adv, mean, std_out, count, gain);
}

// Below this many values one thread is faster than threads (their start-up, and on a busy
// machine OpenMP's wait for a free core, cost more than the work).
constexpr int64_t kParallelValues = 65536;

inline bool use_sorted(int64_t B, int64_t K) {
  return B + K > kParallelValues && at::get_num_threads() > 1;
}

// The uniform layout's row places are int32.
inline bool uniform_fits(int64_t B) { return B < std::numeric_limits<int32_t>::max(); }

// The kernel for dense indices: checks them (as the streaming path does, same messages),
// then picks the path.
template <typename scalar_t>
void advantage_run(const scalar_t* r, const int64_t* gi, int64_t B, const scalar_t* m,
                   const int64_t* ai, int64_t K, int64_t G, const Options& o, float* adv,
                   float* mean, float* std_out, int64_t* count, float* gain) {
  if (use_sorted(B, K)) {
    advantage_sorted(r, gi, B, m, ai, K, G, o, adv, mean, std_out, count, gain);
    return;
  }
  if (uniform_fits(B)) {
    std::vector<int64_t> cnt(G, 0);
    for (int64_t i = 0; i < B; ++i) {
      const int64_t g = gi[i];
      TORCH_CHECK_VALUE(g >= 0 && g < G, "group_index[", i, "] = ", g, " is outside [0, ", G, ")");
      ++cnt[g];
    }
    bool uniform = true;
    for (int64_t g = 0; g < G; ++g) {
      TORCH_CHECK_VALUE(cnt[g] > 0, "group ", g, " has no rows (empty group)");
      uniform &= cnt[g] == cnt[0];
    }
    if (uniform) {
      advantage_uniform(r, gi, B, cnt[0], m, ai, K, G, o, adv, mean, std_out, count, gain);
      return;
    }
  }
  advantage_streaming(r, gi, B, m, ai, K, G, o, adv, mean, std_out, count, gain);
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
  const Options o{norm_by_std, unbiased, singleton_raw, eps};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "mars_advantage_cpu", [&] {
    advantage_run(r.data_ptr<scalar_t>(), gi.data_ptr<int64_t>(), B, m.data_ptr<scalar_t>(),
                  ai.data_ptr<int64_t>(), K, G, o, adv.data_ptr<float>(), mean.data_ptr<float>(),
                  sd.data_ptr<float>(), count.data_ptr<int64_t>(), gain.data_ptr<float>());
  });
  return out;
}

// ---- mars::advantage_int_labels ----------------------------------------------------------

// mars.groups' value check: True when some value is not finite or |value| > 1e150 (its
// squared spread would overflow float64); NaN fails the comparison.
constexpr double kMaxReward = 1e150;

// On the bits, so that the loops vectorise: a float's |x| is above 1e150 only if it is inf
// or NaN; a double's absolute bits order as its absolute values, NaN above inf.
MARS_CLONES bool any_bad_f32(const float* p, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, p + i, sizeof b);
    bad |= (b & 0x7fffffffu) >= 0x7f800000u;
  }
  return bad != 0;
}

MARS_CLONES bool any_bad_f64(const double* p, int64_t n) {
  uint64_t kMaxBits;  // std::bit_cast is C++20; torch <= 2.11 builds extensions as C++17
  std::memcpy(&kMaxBits, &kMaxReward, sizeof kMaxBits);
  uint64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t b;
    std::memcpy(&b, p + i, sizeof b);
    bad |= (b & 0x7fffffffffffffffull) > kMaxBits;
  }
  return bad != 0;
}

template <typename scalar_t>
bool any_bad(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) return any_bad_f32(p, n);
  else if constexpr (std::is_same_v<scalar_t, double>) return any_bad_f64(p, n);
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= !(std::fabs(static_cast<double>(p[i])) <= kMaxReward);
  return bad;
}

using LabelOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                int64_t>;

// The body of advantage_int_labels for one dtype; returns the status (below). Labels in
// a range of at most a few times their number (factorize_int's one-pass case) are
// factorised here, so that uniform groups are known, and placed, while the labels are read:
// labels lo..hi each holding B / (hi - lo + 1) rows are placed in one pass, other uniform
// ones after a count. Everything else: factorize_int, then advantage_run.
template <typename scalar_t>
int64_t int_labels_impl(const Tensor& rewards, const scalar_t* r, const int64_t* lp, int64_t B,
                        const scalar_t* m, const int64_t* ap, int64_t K, const Options& o,
                        int64_t* ip, int64_t* aip, std::vector<int64_t>& uniq,
                        advantage::Outputs& out, bool want_index) {
  using X = XOf<scalar_t>;
  int64_t status = (any_bad(r, B) ? 1 : 0) | (any_bad(m, K) ? 2 : 0);
  auto finish = [&](int64_t G) {  // the anchors' status; allocates the outputs
    for (int64_t j = 0; j < K; ++j) status |= aip[j] < 0 ? 4 : 0;
    out = advantage::empty_outputs(rewards, status ? 0 : G);
    return status == 0 && G > 0;
  };
  auto ptrs = [&]() {
    auto& [adv, mean, sd, count, gain] = out;
    return std::make_tuple(adv.data_ptr<float>(), mean.data_ptr<float>(), sd.data_ptr<float>(),
                           count.data_ptr<int64_t>(), gain.data_ptr<float>());
  };
  if (B > 0 && uniform_fits(B) && !use_sorted(B, K)) {
    int64_t lo, hi;
    minmax_int64(lp, B, &lo, &hi);
    const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
    auto anchors = [&](const int64_t* rank) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t v = ap[j];
        aip[j] = (v < lo || v > hi) ? -1
                 : rank ? rank[static_cast<uint64_t>(v) - static_cast<uint64_t>(lo)]
                        : static_cast<int64_t>(static_cast<uint64_t>(v) - static_cast<uint64_t>(lo));
      }
    };
    if (range < static_cast<uint64_t>(B) && B % static_cast<int64_t>(range + 1) == 0) {
      // every label of lo..hi present with B / R rows, if the counts say so once placed
      const int64_t R = static_cast<int64_t>(range) + 1, per = B / R;
      Buffer<X> x(new X[B]);
      Buffer<int32_t> ord(new int32_t[B]);
      std::vector<int32_t> cur(R, 0);
      for (int64_t i = 0; i < B; ++i) {
        const int64_t g = lp[i] - lo;
        const int32_t c = cur[g]++;
        ord[i] = c;
        if (c < per) x[c * R + g] = static_cast<X>(r[i]);
      }
      bool uniform = true;
      for (int64_t g = 0; g < R; ++g) uniform &= cur[g] == per;
      if (uniform) {
        if (want_index)
          for (int64_t i = 0; i < B; ++i) ip[i] = lp[i] - lo;
        uniq.resize(R);
        std::iota(uniq.begin(), uniq.end(), lo);
        anchors(nullptr);
        if (finish(R)) {
          auto [advp, meanp, sdp, countp, gainp] = ptrs();
          advantage_lanes(r, x.get(), ord.get(), [lp, lo](int64_t i) { return lp[i] - lo; }, B,
                          per, m, aip, K, R, o, advp, meanp, sdp, countp, gainp);
        }
        return status;
      }
    }
    if (range <= static_cast<uint64_t>(4 * B + 1024)) {
      std::vector<int64_t> rank(range + 1, 0);
      for (int64_t i = 0; i < B; ++i) ++rank[lp[i] - lo];
      int64_t per = -1;  // the rows of every group, 0 if they differ
      for (uint64_t v = 0; v <= range; ++v) {
        if (rank[v] == 0) {
          rank[v] = -1;
          continue;
        }
        per = per < 0 ? rank[v] : (per == rank[v] ? per : 0);
        rank[v] = static_cast<int64_t>(uniq.size());
        uniq.push_back(lo + static_cast<int64_t>(v));
      }
      anchors(rank.data());
      const int64_t G = static_cast<int64_t>(uniq.size());
      if (!finish(G)) return status;
      auto [advp, meanp, sdp, countp, gainp] = ptrs();
      if (per > 0) {
        Buffer<X> x(new X[B]);
        Buffer<int32_t> ord(new int32_t[B]);
        std::vector<int32_t> cur(G, 0);
        for (int64_t i = 0; i < B; ++i) {
          const int64_t g = rank[lp[i] - lo];
          ip[i] = g;
          const int32_t c = cur[g]++;
          ord[i] = c;
          x[c * G + g] = static_cast<X>(r[i]);
        }
        advantage_lanes(r, x.get(), ord.get(), [ip](int64_t i) { return ip[i]; }, B, per, m, aip,
                        K, G, o, advp, meanp, sdp, countp, gainp);
      } else {
        for (int64_t i = 0; i < B; ++i) ip[i] = rank[lp[i] - lo];
        advantage_run(r, ip, B, m, aip, K, G, o, advp, meanp, sdp, countp, gainp);
      }
      return status;
    }
  }
  uniq = factorize_int(lp, B, ap, K, ip, aip);
  const int64_t G = static_cast<int64_t>(uniq.size());
  if (finish(G)) {
    auto [advp, meanp, sdp, countp, gainp] = ptrs();
    advantage_run(r, ip, B, m, aip, K, G, o, advp, meanp, sdp, countp, gainp);
  }
  return status;
}

// Status bits: 1 rewards, 2 anchor_rewards hold a non-finite or too large value, 4 some
// anchor label does not occur in labels. With a status the outputs are not computed:
// mars.groups then runs its checks, which name the rows and labels.
LabelOutputs advantage_int_labels_cpu(const Tensor& rewards, const Tensor& labels,
                                      const Tensor& anchor_rewards, const Tensor& anchor_labels,
                                      bool norm_by_std, double eps, bool unbiased,
                                      bool singleton_raw, bool want_index) {
  TORCH_CHECK_VALUE(labels.dim() == 1 && anchor_labels.dim() == 1, "labels must be 1-D");
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong && anchor_labels.scalar_type() == at::kLong,
                    "labels and anchor_labels must be int64");
  advantage::check_args(rewards, labels, anchor_rewards, anchor_labels);
  const int64_t B = rewards.numel(), K = anchor_rewards.numel();
  const Tensor r = rewards.contiguous(), m = anchor_rewards.contiguous();
  const Tensor l = labels.contiguous(), a = anchor_labels.contiguous();
  auto lopts = l.options();
  Tensor index = at::empty({B}, lopts), aindex = at::empty({K}, lopts);
  const Options o{norm_by_std, unbiased, singleton_raw, eps};
  std::vector<int64_t> uniq;
  advantage::Outputs out;
  int64_t status = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "mars_advantage_cpu", [&] {
    status = int_labels_impl(rewards, r.data_ptr<scalar_t>(), l.data_ptr<int64_t>(), B,
                             m.data_ptr<scalar_t>(), a.data_ptr<int64_t>(), K, o,
                             index.data_ptr<int64_t>(), aindex.data_ptr<int64_t>(), uniq, out,
                             want_index);
  });
  const int64_t G = status ? 0 : static_cast<int64_t>(uniq.size());
  Tensor u = at::empty({G}, lopts);
  std::copy(uniq.begin(), uniq.begin() + G, u.data_ptr<int64_t>());
  auto& [adv, mean, sd, count, gain] = out;
  return {adv, mean, sd, count, gain, index, aindex, u, status};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mars, m) {
  // mono_anchored_advantage on int64 labels, factorised here (as dense_labels), with the
  // value checks of mars.groups. Returns (advantages, mean, std, count, gain, index [B]
  // (not always written unless want_index), anchor_index [K], labels [G], status);
  // status != 0 (bits: 1 rewards, 2 anchor_rewards not finite or beyond +-1e150, 4 an
  // anchor label absent): nothing computed, the caller raises. CPU only: the eager fast
  // path of mars.mono_anchored_advantage.
  m.def("advantage_int_labels(Tensor rewards, Tensor labels, Tensor anchor_rewards, "
        "Tensor anchor_labels, bool norm_by_std, float eps, bool unbiased, bool singleton_raw, "
        "bool want_index) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int)");
}

TORCH_LIBRARY_IMPL(mars, CPU, m) {
  m.impl("mono_anchored_advantage", &mono_anchored_advantage_cpu);
  m.impl("advantage_int_labels", &advantage_int_labels_cpu);
}

}  // namespace mars
