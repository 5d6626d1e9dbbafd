// CPU body of mars::policy_loss (matches mars.reference.policy_loss; math in ../policy_loss.h).
//
// One at::parallel_for task per block of rows. Each row is read once: the per-token loss,
// d(loss)/d(logp) (unscaled by the aggregation), metric counts and the row's partial sums
// (in double) are produced in the same pass; GSPO (seq_ratio) first reduces the row's mean
// log-ratio. Then a sequential, fixed-order pass over the rows aggregates (deterministic:
// the result does not depend on the number of threads). Masked tokens are skipped before
// any arithmetic, so -inf / NaN under the mask never reaches exp or a gradient.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../policy_loss.h"

namespace mars {
namespace {

using at::Tensor;

template <typename T>
struct StdExp {
  T operator()(T x) const { return std::exp(x); }
};

template <typename scalar_t, typename T>
void policy_loss_rows(const scalar_t* __restrict__ lp, const scalar_t* __restrict__ old,
                      const scalar_t* __restrict__ adv, bool adv_2d, const bool* __restrict__ mask,
                      const scalar_t* __restrict__ ref, const pl::Params& p, int64_t B, int64_t Tn,
                      T* __restrict__ grad, double* __restrict__ part) {
  const T c = static_cast<T>(p.clamp);
  const T kc = static_cast<T>(p.kl_coef);
  // >= 64k tokens per task: small batches stay on one thread (no fork/join cost, and no
  // stall when another process holds the other core), large ones split across threads.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, Tn));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i * Tn;
      const bool* m = mask + o;
      T* g = grad + o;
      T r_seq = T(1), dlw = T(1);
      int64_t L = 0;
      if (p.seq) {  // GSPO: log w_i = clamp(sum_t m (logp - old) / L_i)
        double s = 0.0;
        for (int64_t t = 0; t < Tn; ++t) {
          if (!m[t]) continue;
          s += static_cast<double>(static_cast<T>(lp[o + t]) - static_cast<T>(old[o + t]));
          ++L;
        }
        const T lw = pl::clamp_lr(static_cast<T>(s / static_cast<double>(L > 1 ? L : 1)), c,
                                   p.has_clamp, dlw);
        r_seq = std::exp(lw);
        L = 0;
      }
      const T a_row = adv_2d ? T(0) : static_cast<T>(adv[i]);
      double S = 0.0, akl = 0.0, rkl = 0.0, G = 0.0;
      int64_t nh = 0, nl = 0, nd = 0;
      for (int64_t t = 0; t < Tn; ++t) {
        if (!m[t]) {
          g[t] = T(0);
          continue;
        }
        const T x = static_cast<T>(lp[o + t]);
        const T A = adv_2d ? static_cast<T>(adv[o + t]) : a_row;
        T inside;
        const T lr = pl::clamp_lr(x - static_cast<T>(old[o + t]), c, p.has_clamp, inside);
        const T r = p.seq ? r_seq : std::exp(lr);
        T l, dl;
        bool high, low, dual;
        pl::pg_term(r, A, p, l, dl, high, low, dual);
        T gt;
        if (p.seq) {
          G += static_cast<double>(dl);
          gt = T(0);
        } else {
          gt = dl * inside;
        }
        if (p.has_ref) {
          T kl, dkl;
          pl::kl_term(x, static_cast<T>(ref[o + t]), p.kl_type, StdExp<T>(), kl, dkl);
          rkl += static_cast<double>(kl);
          if (p.has_kl) {
            l = l + kc * kl;
            gt += kc * dkl;
          }
        }
        g[t] = gt;
        S += static_cast<double>(l);
        akl -= static_cast<double>(lr);
        ++L;
        nh += high;
        nl += low;
        nd += dual;
      }
      if (p.seq && L > 0) {  // d l_it / d logp_is = dl_it/dlw * dlw * m_is / L_i
        const T add = static_cast<T>(G / static_cast<double>(L)) * dlw;
        for (int64_t t = 0; t < Tn; ++t)
          if (m[t]) g[t] += add;
      }
      double* pr = part + i * pl::kNCol;
      pr[pl::kS] = S;
      pr[pl::kL] = static_cast<double>(L);
      pr[pl::kHigh] = static_cast<double>(nh);
      pr[pl::kLow] = static_cast<double>(nl);
      pr[pl::kDual] = static_cast<double>(nd);
      pr[pl::kAkl] = akl;
      pr[pl::kRkl] = rkl;
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> policy_loss_cpu(
    const Tensor& logp, const Tensor& old_logp, const Tensor& advantages, const Tensor& mask,
    const std::optional<Tensor>& ref_logp, double clip_low, double clip_high, double dual_clip,
    double kl_coef, int64_t kl_type, int64_t agg, double num_tokens, double num_seqs,
    double loss_scale, bool seq_ratio, double log_ratio_clamp) {
  TORCH_CHECK_VALUE(logp.dim() == 2, "logp must be [B, T], got ", logp.sizes());
  TORCH_CHECK_VALUE(old_logp.sizes() == logp.sizes(), "old_logp must have logp's shape");
  TORCH_CHECK_VALUE(mask.sizes() == logp.sizes(), "mask must have logp's shape");
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, "mask must be bool");
  TORCH_CHECK_VALUE(old_logp.scalar_type() == logp.scalar_type() &&
                        advantages.scalar_type() == logp.scalar_type(),
                    "old_logp and advantages must have logp's dtype");
  const int64_t B = logp.size(0), Tn = logp.size(1);
  const bool adv_2d = advantages.dim() == 2;
  TORCH_CHECK_VALUE(adv_2d ? advantages.sizes() == logp.sizes()
                           : (advantages.dim() == 1 && advantages.size(0) == B),
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
  pl::Params p{clip_low, clip_high, dual_clip, kl_coef, log_ratio_clamp, static_cast<int>(kl_type),
               has_ref, dual_clip > 0, log_ratio_clamp > 0, kl_coef > 0 && has_ref, seq_ratio};
  const auto acc = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor x = logp.contiguous(), o = old_logp.contiguous(), a = advantages.contiguous();
  const Tensor m = mask.contiguous();
  const Tensor r = has_ref ? ref_logp->contiguous() : x;
  Tensor grad = at::empty({B, Tn}, logp.options().dtype(acc));
  std::vector<double> part(static_cast<size_t>(B) * pl::kNCol);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mars_policy_loss_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    policy_loss_rows<scalar_t, T>(x.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                  a.data_ptr<scalar_t>(), adv_2d, m.data_ptr<bool>(),
                                  r.data_ptr<scalar_t>(), p, B, Tn, grad.data_ptr<T>(), part.data());
  });
  // Fixed-order aggregation over rows, in double.
  double N = 0, nseq = 0, cnt[pl::kNCol] = {0};
  for (int64_t i = 0; i < B; ++i) {
    const double* pr = part.data() + i * pl::kNCol;
    N += pr[pl::kL];
    nseq += pr[pl::kL] > 0;
    for (int k = pl::kHigh; k < pl::kNCol; ++k) cnt[k] += pr[k];
  }
  const double denom = pl::agg_denominator(static_cast<int>(agg), N, nseq, num_tokens, num_seqs,
                                           loss_scale, static_cast<double>(Tn));
  Tensor row_scale = at::empty({B}, logp.options().dtype(at::kDouble));
  double* rs = row_scale.data_ptr<double>();
  double total = 0;
  for (int64_t i = 0; i < B; ++i) {
    const double* pr = part.data() + i * pl::kNCol;
    const double w = pl::row_weight(static_cast<int>(agg), pr[pl::kL]);
    total += pr[pl::kS] * w;
    rs[i] = w / denom;
  }
  const double n1 = N > 1 ? N : 1.0;
  Tensor metrics = at::empty({6}, logp.options().dtype(at::kDouble));
  double* mt = metrics.data_ptr<double>();
  mt[0] = cnt[pl::kHigh] / n1;
  mt[1] = cnt[pl::kLow] / n1;
  mt[2] = cnt[pl::kDual] / n1;
  mt[3] = cnt[pl::kAkl] / n1;
  mt[4] = cnt[pl::kRkl] / n1;
  mt[5] = N;
  Tensor loss = at::scalar_tensor(total / denom, logp.options().dtype(at::kDouble));
  return {loss.to(acc), metrics.to(acc), grad, row_scale.to(acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars, CPU, m) {
  m.impl("policy_loss", &policy_loss_cpu);
}

}  // namespace mars
