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
  int kl_type;  // 0 k1, 1 k2, 2 k3
  bool has_ref, has_dual, has_clamp, has_kl, seq;
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
// min(l, -A c) for A < 0 with dual clip. dl_dlr = d l / d lr (0 where a clip is active).
template <typename T>
MARS_HD void pg_term(T r, T A, const Params& p, T& l, T& dl_dlr, bool& high, bool& low,
                     bool& dual) {
  const T lo = static_cast<T>(1.0 - p.clip_low), hi = static_cast<T>(1.0 + p.clip_high);
  const T l1 = -A * r;
  const T rc = r < lo ? lo : (r > hi ? hi : r);
  const T l2 = -A * rc;
  const bool clipped = l2 > l1;
  l = clipped ? l2 : l1;
  dl_dlr = clipped ? T(0) : l1;  // d(-A r)/d lr = -A r
  high = A > T(0) && r > hi;
  low = A < T(0) && r < lo;
  dual = false;
  if (p.has_dual && A < T(0)) {
    const T l3 = -A * static_cast<T>(p.dual_clip);
    if (l > l3) {
      l = l3;
      dl_dlr = T(0);
      dual = true;
    }
  }
}

// KL estimate to the reference and its derivative in logp x (verl's k3 numerics).
template <typename T, typename ExpF>
MARS_HD void kl_term(T x, T ref, int kl_type, ExpF expf, T& kl, T& dkl) {
  const T d = ref - x;
  if (kl_type == 0) {
    kl = -d;
    dkl = T(1);
  } else if (kl_type == 1) {
    kl = T(0.5) * d * d;
    dkl = -d;
  } else {
    T inside;
    const T dc = clamp_lr(d, T(20), true, inside);
    const T e = expf(dc);
    const T k = e - dc - T(1);
    if (k < T(-10)) { kl = T(-10); dkl = T(0); }
    else if (k > T(10)) { kl = T(10); dkl = T(0); }
    else { kl = k; dkl = -(e - T(1)) * inside; }
  }
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
