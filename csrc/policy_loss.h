// Per-token math of mars::policy_loss shared by the CPU (cpu/policy_loss.cpp) and CUDA
// (cuda/policy_loss.cu) bodies, so both compute exactly mars.reference.per_token_policy_loss
// in the same order of operations (and the same float comparisons) as the reference.
#pragma once

#ifdef __CUDACC__
#define MARS_HD __host__ __device__ __forceinline__
#else
#define MARS_HD inline
#endif

namespace mars {
namespace pl {

// Aggregation modes, in the order of mars.reference.LOSS_AGGS.
enum Agg { kTokenMean = 0, kTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSum = 3,
           kSeqMeanTokenSumNorm = 4 };
// Columns of the per-row partials: loss sum, valid tokens, clip-high / clip-low / dual-clip
// counts, sum of (old - logp) (approx KL), sum of the KL estimate to the reference.
enum Col { kS = 0, kL = 1, kHigh = 2, kLow = 3, kDual = 4, kAkl = 5, kRkl = 6, kNCol = 7 };

struct Params {
  double clip_low, clip_high, dual_clip, kl_coef, clamp;
  // k3's clamps (verl's low_var_kl): d = ref - logp to [-kl_dmax, kl_dmax], k3 to
  // [-kl_kmax, kl_kmax]; 20 and the kl_clamp option (10) when on, +inf both when off (TRL).
  double kl_dmax, kl_kmax;
  int kl_type;  // 0 k1, 1 k2, 2 k3, 3 k3_ratio (k3 times the policy ratio)
  bool has_ref, has_dual, has_clamp, has_kl, seq;
  bool has_is, is_2d;  // importance-sampling weights given; [B, T] (else [B])
};

// Clamp of the log-ratio: returns the clamped value; `inside` is the clamp's derivative
// (torch.clamp passes the gradient where min <= x <= max).
template <typename T>
MARS_HD T clamp_lr(T lr, T c, bool on, T& inside) {
  inside = T(1);
  if (!on) return lr;
  if (lr < -c) { inside = T(0); return -c; }
  if (lr > c) { inside = T(0); return c; }
  return lr;
}

// Policy term for ratio r = exp(lr) and advantage A: l = max(-A r, -A clip(r)), then
// min(l, -A c) for A < 0 with dual clip; A == 0 gives l = 0 (also for r = inf: never
// 0 * inf). dl_dlr = d l / d lr (0 where a bound decides l). A tie (r inside the clip
// range) takes the unclipped term. With r = inf (clamp off) and A < 0 without dual clip,
// l = dl_dlr = +inf, the true value (docs/loss.md, "Huge ratios").
template <typename T>
MARS_HD void pg_term(T r, T A, const Params& p, T& l, T& dl_dlr, bool& high, bool& low,
                     bool& dual) {
  const T lo = static_cast<T>(1.0 - p.clip_low), hi = static_cast<T>(1.0 + p.clip_high);
  high = A > T(0) && r > hi;
  low = A < T(0) && r < lo;
  dual = false;
  if (A == T(0)) {
    l = T(0);
    dl_dlr = T(0);
    return;
  }
  const T l1 = -A * r;
  const T rc = r < lo ? lo : (r > hi ? hi : r);
  const T l2 = -A * rc;
  const bool clipped = l2 > l1;
  l = clipped ? l2 : l1;
  dl_dlr = clipped ? T(0) : l1;  // d(-A r)/d lr = -A r
  if (p.has_dual && A < T(0)) {
    const T l3 = -A * static_cast<T>(p.dual_clip);
    if (l > l3) {
      l = l3;
      dl_dlr = T(0);
      dual = true;
    }
  }
}

// Importance-sampling weight w of the policy term (not of the KL term): l = l w and
// dl = dl w; w == 0 gives l = dl = 0, also where l is inf (never 0 * inf), like A == 0.
template <typename T>
MARS_HD void is_weight(T w, T& l, T& dl_dlr) {
  if (w == T(0)) {
    l = T(0);
    dl_dlr = T(0);
  } else {
    l = l * w;
    dl_dlr = dl_dlr * w;
  }
}

// Below this |d|, k3 = e^d - 1 - d is its Taylor series (mars.reference.K3_SERIES_BELOW).
constexpr double kK3SeriesBelow = 0.5;

// k3 = e^d - 1 - d and em1 = e^d - 1 without cancellation near d = 0
// (mars.reference.kl_estimate): |d| < 0.5: k3 = sum_(n=2..15) d^n / n! by Horner's rule
// (highest term first, the reference's order), em1 = d + k3; else em1 = exp(d) - 1 and
// k3 = em1 - d (no cancellation there: |em1| >= 0.39, k3 >= 0.1).
template <typename T, typename ExpF>
MARS_HD void k3_expm1(T d, ExpF expf, T& k3, T& em1) {
  const T ad = d < T(0) ? -d : d;
  if (ad < T(kK3SeriesBelow)) {
    T p = T(7.647163731819816e-13);
    p = p * d + T(1.1470745597729725e-11);
    p = p * d + T(1.6059043836821613e-10);
    p = p * d + T(2.08767569878681e-09);
    p = p * d + T(2.505210838544172e-08);
    p = p * d + T(2.755731922398589e-07);
    p = p * d + T(2.7557319223985893e-06);
    p = p * d + T(2.48015873015873e-05);
    p = p * d + T(0.0001984126984126984);
    p = p * d + T(0.001388888888888889);
    p = p * d + T(0.008333333333333333);
    p = p * d + T(0.041666666666666664);
    p = p * d + T(0.16666666666666666);
    p = p * d + T(0.5);
    k3 = p * d * d;
    em1 = d + k3;
  } else {
    em1 = expf(d) - T(1);
    k3 = em1 - d;
  }
}

// KL estimate to the reference and its derivative in logp x (k3 clamps: d to +-dmax, k3 to
// [-kmax, kmax], verl's 20 and 10; +inf both: no clamp, TRL; d/dx k3 = -expm1(d), 0 where
// a clamp bites). kl_type 3 gives k3 here; kl_ratio then multiplies it by the ratio.
template <typename T, typename ExpF>
MARS_HD void kl_term(T x, T ref, int kl_type, T dmax, T kmax, ExpF expf, T& kl, T& dkl) {
  const T d = ref - x;
  if (kl_type == 0) {
    kl = -d;
    dkl = T(1);
  } else if (kl_type == 1) {
    kl = T(0.5) * d * d;
    dkl = -d;
  } else {
    T inside;
    const T dc = clamp_lr(d, dmax, true, inside);
    T k, em1;
    k3_expm1(dc, expf, k, em1);
    if (k < -kmax) { kl = -kmax; dkl = T(0); }
    else if (k > kmax) { kl = kmax; dkl = T(0); }
    else { kl = k; dkl = -em1 * inside; }
  }
}

// kl_type 3 (k3_ratio, TRL's use_bias_correction_kl): kl := k3 r with r the policy ratio
// e^lr of the token (or of the row, GSPO), differentiated through both factors:
// dkl := dk3 r (through logp in k3) and dkl_dlr := k3 r (through lr: d e^lr / d lr = e^lr).
// k3 == 0 gives 0 and 0, dk3 == 0 gives 0, also for r = inf (never 0 * inf)
// (mars.reference.kl_estimate).
template <typename T>
MARS_HD void kl_ratio(T r, T& kl, T& dkl, T& dkl_dlr) {
  if (kl == T(0)) {
    dkl = T(0);
    dkl_dlr = T(0);
    return;
  }
  dkl = dkl == T(0) ? T(0) : dkl * r;
  kl = kl * r;
  dkl_dlr = kl;
}

// Global scale c and per-row weight w_i of the aggregation: loss = c * sum_i w_i S_i.
// N, nseq: local token / non-empty row counts; num_tokens, num_seqs, loss_scale <= 0: local.
MARS_HD double agg_denominator(int agg, double N, double nseq, double num_tokens,
                               double num_seqs, double loss_scale, double T) {
  if (agg == kTokenMean) return num_tokens > 0 ? num_tokens : (N > 1 ? N : 1.0);
  if (agg == kTokenSum) return 1.0;
  const double ns = num_seqs > 0 ? num_seqs : (nseq > 1 ? nseq : 1.0);
  if (agg == kSeqMeanTokenSumNorm) return ns * (loss_scale > 0 ? loss_scale : T);
  return ns;
}

MARS_HD double row_weight(int agg, double L) {
  return agg == kSeqMeanTokenMean ? 1.0 / (L > 1 ? L : 1.0) : 1.0;
}

}  // namespace pl
}  // namespace mars
