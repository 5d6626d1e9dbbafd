#ifndef MARS_PL_VEC_PASS
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
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

// GCC only: Clang ignores `#pragma GCC target` (it gets the scalar loop).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MARS_PL_VEC 1
#else
#define MARS_PL_VEC 0
#endif

#include "../policy_loss_args.h"

namespace mars {
namespace {

using at::Tensor;

template <typename T>
struct StdExp {
  T operator()(T x) const { return std::exp(x); }
};

// >= 64k tokens per task: small batches stay on one thread (no fork/join cost, and no
// stall when another process holds the other core), large ones split across threads.
int64_t row_grain(int64_t Tn) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, Tn)); }

template <typename scalar_t, typename T>
void policy_loss_rows(const scalar_t* __restrict__ lp, const scalar_t* __restrict__ old,
                      const scalar_t* __restrict__ adv, bool adv_2d, const bool* __restrict__ mask,
                      const scalar_t* __restrict__ ref, const scalar_t* __restrict__ isw,
                      const pl::Params& p, int64_t B, int64_t Tn, T* __restrict__ grad,
                      double* __restrict__ part) {
  const T c = static_cast<T>(p.clamp);
  const T kc = static_cast<T>(p.kl_coef);
  at::parallel_for(0, B, row_grain(Tn), [&](int64_t begin, int64_t end) {
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
      const T w_row = p.has_is && !p.is_2d ? static_cast<T>(isw[i]) : T(1);
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
        if (p.has_is) pl::is_weight(p.is_2d ? static_cast<T>(isw[o + t]) : w_row, l, dl);
        T gt;
        if (p.seq) {
          G += static_cast<double>(dl);
          gt = T(0);
        } else {
          gt = dl * inside;
        }
        if (p.has_ref) {
          T kl, dkl, dkl_dlr = T(0);
          pl::kl_term(x, static_cast<T>(ref[o + t]), p.kl_type, static_cast<T>(p.kl_dmax),
                      static_cast<T>(p.kl_kmax), StdExp<T>(), kl, dkl);
          if (p.kl_type == 3) pl::kl_ratio(r, kl, dkl, dkl_dlr);
          rkl += static_cast<double>(kl);
          if (p.has_kl) {
            l = l + kc * kl;
            gt += kc * dkl;
            if (p.kl_type == 3) {  // the ratio's share: through the row's ratio (GSPO) or lr
              if (p.seq) G += static_cast<double>(kc * dkl_dlr);
              else if (inside != T(0)) gt += kc * dkl_dlr;
            }
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

// ----------------------------------------------------------------------------------------
// Vectorised float path (fp32 / bf16 inputs) on x86-64 with GCC: the same per-token math as
// policy_loss_rows on GCC vector extensions, compiled twice, for AVX2+FMA (8 lanes) and
// AVX-512 (16 lanes), by including this file into itself under `#pragma GCC target` (below),
// and chosen at run time from the CPU (cpu_isa). No global -march flag: the extension still
// runs on any x86-64, falling back to the scalar loop above (as do fp64 / fp16 inputs and
// other compilers). Branch-free: every token of a vector is computed and masked tokens
// are dropped by selects (bit operations), never by arithmetic, so -inf / NaN under the
// mask never reaches a sum or a gradient. exp is a Cephes-style polynomial (<= 2 ulp,
// inf / 0 / NaN like std::exp, subnormal results rounded once). Row sums go to per-lane
// double accumulators reduced in lane order at the end of the row: a fixed order per row,
// so the result does not depend on the thread count.
#if MARS_PL_VEC
// Row-block arguments of the vectorised path (In: float or c10::BFloat16).
struct VArgs {
  const void *lp, *old, *adv, *ref, *isw;
  const bool* mask;
  bool adv_2d;
  const pl::Params* p;
  int64_t Tn;
  float* grad;
  double* part;
};

using VRowsFn = void (*)(const VArgs&, int64_t, int64_t);
#define MARS_PL_INLINE inline __attribute__((always_inline))
#endif

}  // namespace
}  // namespace mars

#if MARS_PL_VEC
// Everything defined between push_options and pop_options (the included body's templates
// included) is compiled for that instruction set only; the headers were included above, so
// no inline function of torch / the standard library gets a copy compiled for it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c")
#define MARS_PL_VEC_PASS 8
namespace mars { namespace { namespace avx2 {
#include "policy_loss.cpp"
}}}  // namespace mars::(anonymous)::avx2
#undef MARS_PL_VEC_PASS
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
#define MARS_PL_VEC_PASS 16
namespace mars { namespace { namespace avx512 {
#include "policy_loss.cpp"
}}}  // namespace mars::(anonymous)::avx512
#undef MARS_PL_VEC_PASS
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif  // MARS_PL_VEC

namespace mars {
namespace {

// Instruction set of the float path: the best the CPU has, capped by MARS_CPU_ISA
// ("scalar", "avx2", "avx512"; read per call, for tests and benchmarks) and by torch's own
// ATEN_CPU_CAPABILITY ("default" means scalar here too).
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa cap_from_env(const char* name, Isa best) {
  const char* v = std::getenv(name);
  if (!v || !*v) return best;
  Isa want = best;
  if (!std::strcmp(v, "scalar") || !std::strcmp(v, "default")) want = Isa::kScalar;
  else if (!std::strcmp(v, "avx2")) want = Isa::kAvx2;
  else if (!std::strcmp(v, "avx512")) want = Isa::kAvx512;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

Isa cpu_isa() {
#if MARS_PL_VEC
  static const Isa hw = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return cap_from_env("MARS_CPU_ISA", cap_from_env("ATEN_CPU_CAPABILITY", hw));
#else
  return Isa::kScalar;
#endif
}

pl::Outputs policy_loss_cpu(const pl::Inputs& in) {
  const pl::Params& p = in.p;
  const int64_t B = in.B, Tn = in.Tn;
  const bool adv_2d = in.adv_2d;
  const auto acc = in.acc;
  const Tensor &x = in.x, &o = in.o, &a = in.a, &m = in.m, &r = in.r, &iw = in.iw;
  Tensor grad = at::empty({B, Tn}, x.options().dtype(acc));
  std::vector<double> part(static_cast<size_t>(B) * pl::kNCol);
  const auto st = x.scalar_type();
  const Isa isa = (st == at::kFloat || st == at::kBFloat16) ? cpu_isa() : Isa::kScalar;
  if (isa != Isa::kScalar) {
#if MARS_PL_VEC
    const bool f32 = st == at::kFloat;
    const VRowsFn fn = isa == Isa::kAvx512 ? (f32 ? avx512::rows_f32 : avx512::rows_bf16)
                                           : (f32 ? avx2::rows_f32 : avx2::rows_bf16);
    const VArgs va{x.data_ptr(), o.data_ptr(), a.data_ptr(), r.data_ptr(), iw.data_ptr(),
                   m.data_ptr<bool>(),
                   adv_2d, &p, Tn, grad.data_ptr<float>(), part.data()};
    at::parallel_for(0, B, row_grain(Tn), [&](int64_t begin, int64_t end) { fn(va, begin, end); });
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "mars_policy_loss_cpu", [&] {
      using T = at::opmath_type<scalar_t>;
      policy_loss_rows<scalar_t, T>(x.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                    a.data_ptr<scalar_t>(), adv_2d, m.data_ptr<bool>(),
                                    r.data_ptr<scalar_t>(), iw.data_ptr<scalar_t>(), p, B, Tn,
                                    grad.data_ptr<T>(),
                                    part.data());
    });
  }
  // Fixed-order aggregation over rows, in double.
  double N = 0, nseq = 0, cnt[pl::kNCol] = {0};
  for (int64_t i = 0; i < B; ++i) {
    const double* pr = part.data() + i * pl::kNCol;
    N += pr[pl::kL];
    nseq += pr[pl::kL] > 0;
    for (int k = pl::kHigh; k < pl::kNCol; ++k) cnt[k] += pr[k];
  }
  const double denom = pl::agg_denominator(in.agg, N, nseq, in.num_tokens, in.num_seqs,
                                           in.loss_scale, static_cast<double>(Tn));
  // Small outputs written straight in the accumulation dtype (values computed in double,
  // rounded once: what a double tensor .to(acc) gives, without three extra copies).
  Tensor row_scale = at::empty({B}, x.options().dtype(acc));
  Tensor metrics = at::empty({6}, x.options().dtype(acc));
  Tensor loss = at::empty({}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "mars_policy_loss_cpu_out", [&] {
    scalar_t* rs = row_scale.data_ptr<scalar_t>();
    double total = 0;
    for (int64_t i = 0; i < B; ++i) {
      const double* pr = part.data() + i * pl::kNCol;
      const double w = pl::row_weight(in.agg, pr[pl::kL]);
      total += pr[pl::kS] * w;
      rs[i] = static_cast<scalar_t>(w / denom);
    }
    const double n1 = N > 1 ? N : 1.0;
    scalar_t* mt = metrics.data_ptr<scalar_t>();
    mt[0] = static_cast<scalar_t>(cnt[pl::kHigh] / n1);
    mt[1] = static_cast<scalar_t>(cnt[pl::kLow] / n1);
    mt[2] = static_cast<scalar_t>(cnt[pl::kDual] / n1);
    mt[3] = static_cast<scalar_t>(cnt[pl::kAkl] / n1);
    mt[4] = static_cast<scalar_t>(cnt[pl::kRkl] / n1);
    mt[5] = static_cast<scalar_t>(N);
    *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(total / denom);
  });
  return {loss, metrics, grad, row_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars, CPU, m) {
  m.impl("policy_loss", &pl::entry<policy_loss_cpu>);
}

}  // namespace mars

#else  // MARS_PL_VEC_PASS: the vectorised body, W = MARS_PL_VEC_PASS lanes (see above)

constexpr int W = MARS_PL_VEC_PASS;


typedef float F __attribute__((vector_size(4 * W)));
typedef int32_t I __attribute__((vector_size(4 * W)));
typedef uint32_t U __attribute__((vector_size(4 * W)));
typedef double D __attribute__((vector_size(8 * W)));
typedef uint16_t H __attribute__((vector_size(2 * W)));
typedef uint8_t Bt __attribute__((vector_size(W)));

struct V {

  // Broadcasts written as scalar-vector operations (an element-wise loop makes GCC 12
  // scalarise the AVX-512 comparisons that use them).
  static MARS_PL_INLINE F splat(float v) { return v - F{}; }
  static MARS_PL_INLINE I isplat(int32_t v) { return v + I{}; }
  static MARS_PL_INLINE I bits(F a) {
    I r;
    std::memcpy(&r, &a, sizeof(r));
    return r;
  }
  static MARS_PL_INLINE F flt(I a) {
    F r;
    std::memcpy(&r, &a, sizeof(r));
    return r;
  }
  // m ? a : b, m a comparison result (lanes all-ones or zero).
  static MARS_PL_INLINE F sel(I m, F a, F b) { return flt((m & bits(a)) | (~m & bits(b))); }

  static MARS_PL_INLINE F load(const float* p) {
    F r;
    std::memcpy(&r, p, sizeof(r));
    return r;
  }
  static MARS_PL_INLINE F load(const c10::BFloat16* p) {  // bf16 -> f32: bits << 16, exact
    H h;
    std::memcpy(&h, p, sizeof(h));
    return flt((I)(__builtin_convertvector(h, U) << 16));
  }
  static MARS_PL_INLINE I load_mask(const bool* p) {
    Bt b;
    std::memcpy(&b, p, sizeof(b));
    return __builtin_convertvector(b, I) != isplat(0);
  }
  static MARS_PL_INLINE D widen(F a) { return __builtin_convertvector(a, D); }

  // exp on float lanes: n = round(x log2 e), r = x - n ln2 (Cody-Waite), e^r by Cephes'
  // degree-6 polynomial on |r| <= ln2/2, times 2^n applied as 2^(n/2) 2^(n - n/2) so that
  // overflow gives inf and underflow a once-rounded subnormal or 0. NaN passes through.
  static MARS_PL_INLINE F exp(F x) {
    const I lo = x < splat(-104.0f), hi = x > splat(89.0f);
    const F xc = sel(lo, splat(-104.0f), sel(hi, splat(89.0f), x));
    const F big = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const F nf = (xc * splat(1.44269504088896341f) + big) - big;
    F r = xc - nf * splat(0.693359375f);
    r = r - nf * splat(-2.12194440e-4f);
    F q = splat(1.9875691500e-4f);
    q = q * r + splat(1.3981999507e-3f);
    q = q * r + splat(8.3334519073e-3f);
    q = q * r + splat(4.1665795894e-2f);
    q = q * r + splat(1.6666665459e-1f);
    q = q * r + splat(5.0000001201e-1f);
    const F e = q * (r * r) + r + splat(1.0f);
    const I n = __builtin_convertvector(nf, I);
    const I n1 = n >> 1, n2 = n - n1;
    const F s1 = flt((n1 + isplat(127)) << 23), s2 = flt((n2 + isplat(127)) << 23);
    const F y = e * s1 * s2;
    return sel(x != x, x, y);
  }

  static MARS_PL_INLINE double hsum(D a) {
    double s = 0.0;
    for (int k = 0; k < W; ++k) s += a[k];
    return s;
  }
  static MARS_PL_INLINE int64_t hsum(I a) {
    int64_t s = 0;
    for (int k = 0; k < W; ++k) s += a[k];
    return s;
  }
};

// One vector of W tokens at offset t of a row (n == W) or the row's tail (n < W: copied to
// zero-padded, masked-off buffers first).
struct RowState {
  D S, akl, rkl, G;
  I L, nh, nl, nd;
};

template <typename In>
MARS_PL_INLINE void vec_tokens(const In* lp, const In* old, const In* adv, float a_row,
                               const bool* m8, const In* ref, const In* isw, float w_row,
                               const pl::Params& p, float r_seq, float* g, RowState& st) {
  const I m = V::load_mask(m8);
  const F x = V::load(lp);
  const F A = adv ? V::load(adv) : V::splat(a_row);
  const F lr0 = x - V::load(old);
  F lr = lr0, inside = V::splat(1.0f);
  if (p.has_clamp) {
    const float c = static_cast<float>(p.clamp);
    const I below = lr0 < V::splat(-c), above = lr0 > V::splat(c);
    lr = V::sel(below, V::splat(-c), V::sel(above, V::splat(c), lr0));
    inside = V::sel(below | above, V::splat(0.0f), inside);
  }
  const F r = p.seq ? V::splat(r_seq) : V::exp(lr);
  // pl::pg_term
  const F lo = V::splat(static_cast<float>(1.0 - p.clip_low));
  const F hi = V::splat(static_cast<float>(1.0 + p.clip_high));
  const F zero = V::splat(0.0f);
  const F nA = -A;
  const F l1 = nA * r;
  const F rc = V::sel(r < lo, lo, V::sel(r > hi, hi, r));
  const F l2 = nA * rc;
  const I clipped = l2 > l1;
  F l = V::sel(clipped, l2, l1);
  F dl = V::sel(clipped, zero, l1);
  const I high = (A > zero) & (r > hi);
  const I low = (A < zero) & (r < lo);
  I dual = V::isplat(0);
  if (p.has_dual) {
    const F l3 = nA * V::splat(static_cast<float>(p.dual_clip));
    dual = (A < zero) & (l > l3);
    l = V::sel(dual, l3, l);
    dl = V::sel(dual, zero, dl);
  }
  const I a0 = A == zero;  // A == 0: l = 0 and no gradient, even for r = inf (0 * inf)
  l = V::sel(a0, zero, l);
  dl = V::sel(a0, zero, dl);
  if (p.has_is) {  // pl::is_weight: w == 0 gives 0, never 0 * inf
    const F w = isw ? V::load(isw) : V::splat(w_row);
    const I w0 = w == zero;
    l = V::sel(w0, zero, l * w);
    dl = V::sel(w0, zero, dl * w);
  }
  F gt;
  if (p.seq) {
    st.G += V::widen(V::sel(m, dl, zero));
    gt = zero;
  } else {
    gt = dl * inside;
  }
  if (p.has_ref) {  // pl::kl_term
    const F d = V::load(ref) - x;
    F kl, dkl;
    if (p.kl_type == 0) {
      kl = -d;
      dkl = V::splat(1.0f);
    } else if (p.kl_type == 1) {
      kl = V::splat(0.5f) * d * d;
      dkl = -d;
    } else {
      const float dmax = static_cast<float>(p.kl_dmax), kmax = static_cast<float>(p.kl_kmax);
      const I below = d < V::splat(-dmax), above = d > V::splat(dmax);
      const F dc = V::sel(below, V::splat(-dmax), V::sel(above, V::splat(dmax), d));
      const F ins = V::sel(below | above, zero, V::splat(1.0f));
      // pl::k3_expm1: the series below |d| < 0.5, exp(d) - 1 above (same order of ops)
      F q = V::splat(static_cast<float>(7.647163731819816e-13));
      q = q * dc + V::splat(static_cast<float>(1.1470745597729725e-11));
      q = q * dc + V::splat(static_cast<float>(1.6059043836821613e-10));
      q = q * dc + V::splat(static_cast<float>(2.08767569878681e-09));
      q = q * dc + V::splat(static_cast<float>(2.505210838544172e-08));
      q = q * dc + V::splat(static_cast<float>(2.755731922398589e-07));
      q = q * dc + V::splat(static_cast<float>(2.7557319223985893e-06));
      q = q * dc + V::splat(static_cast<float>(2.48015873015873e-05));
      q = q * dc + V::splat(static_cast<float>(0.0001984126984126984));
      q = q * dc + V::splat(static_cast<float>(0.001388888888888889));
      q = q * dc + V::splat(static_cast<float>(0.008333333333333333));
      q = q * dc + V::splat(static_cast<float>(0.041666666666666664));
      q = q * dc + V::splat(static_cast<float>(0.16666666666666666));
      q = q * dc + V::splat(0.5f);
      const F ks = q * dc * dc;
      const I small = (dc < V::splat(static_cast<float>(pl::kK3SeriesBelow))) &
                      (dc > V::splat(-static_cast<float>(pl::kK3SeriesBelow)));
      const F eb = V::exp(dc) - V::splat(1.0f);
      const F em1 = V::sel(small, dc + ks, eb);
      const F k = V::sel(small, ks, eb - dc);
      const I klo = k < V::splat(-kmax), khi = k > V::splat(kmax);
      kl = V::sel(klo, V::splat(-kmax), V::sel(khi, V::splat(kmax), k));
      dkl = V::sel(klo | khi, zero, -em1 * ins);
    }
    F dkl_dlr = zero;
    if (p.kl_type == 3) {  // pl::kl_ratio: k3 r; 0 where k3 (or dk3) is 0, never 0 * inf
      const I k0 = kl == zero;
      dkl = V::sel(k0 | (dkl == zero), zero, dkl * r);
      kl = V::sel(k0, zero, kl * r);
      dkl_dlr = kl;
    }
    st.rkl += V::widen(V::sel(m, kl, zero));
    if (p.has_kl) {
      const F kc = V::splat(static_cast<float>(p.kl_coef));
      l = l + kc * kl;
      gt += kc * dkl;
      if (p.kl_type == 3) {  // the ratio's share: through the row's ratio (GSPO) or lr
        if (p.seq) st.G += V::widen(V::sel(m, kc * dkl_dlr, zero));
        else gt += V::sel(inside == zero, zero, kc * dkl_dlr);
      }
    }
  }
  const F gm = V::sel(m, gt, zero);
  std::memcpy(g, &gm, sizeof(gm));
  st.S += V::widen(V::sel(m, l, zero));
  st.akl -= V::widen(V::sel(m, lr, zero));
  st.L -= m;
  st.nh -= m & high;
  st.nl -= m & low;
  st.nd -= m & dual;
}

template <typename In>
MARS_PL_INLINE void vec_rows(const VArgs& a, int64_t begin, int64_t end) {
  const pl::Params& p = *a.p;
  const int64_t Tn = a.Tn, Tv = Tn - Tn % W;
  const In* lp = static_cast<const In*>(a.lp);
  const In* old = static_cast<const In*>(a.old);
  const In* adv = static_cast<const In*>(a.adv);
  const In* ref = static_cast<const In*>(a.ref);
  const In* isw = static_cast<const In*>(a.isw);
  const bool is_2d = p.has_is && p.is_2d;
  const float c = static_cast<float>(p.clamp);
  // Tail buffers: zero-padded inputs, mask off past the row's end.
  alignas(64) In tb[5][W];
  alignas(64) bool tm[W];
  alignas(64) float tg[W];
  const int rem = static_cast<int>(Tn - Tv);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t o = i * Tn;
    const bool* m = a.mask + o;
    float* g = a.grad + o;
    const In* ad = a.adv_2d ? adv + o : nullptr;
    const float a_row = a.adv_2d ? 0.0f : static_cast<float>(adv[i]);
    const In* iw = is_2d ? isw + o : nullptr;
    const float w_row = p.has_is && !is_2d ? static_cast<float>(isw[i]) : 1.0f;
    if (rem) {
      for (int k = 0; k < W; ++k) {
        const bool in = k < rem;
        tm[k] = in && m[Tv + k];
        tb[0][k] = in ? lp[o + Tv + k] : In(0);
        tb[1][k] = in ? old[o + Tv + k] : In(0);
        tb[2][k] = in && a.adv_2d ? adv[o + Tv + k] : In(0);
        tb[3][k] = in && p.has_ref ? ref[o + Tv + k] : In(0);
        tb[4][k] = in && is_2d ? isw[o + Tv + k] : In(0);
      }
    }
    float r_seq = 1.0f, dlw = 1.0f;
    if (p.seq) {  // GSPO: log w_i = clamp(sum_t m (logp - old) / L_i)
      D s = D{};
      I n = V::isplat(0);
      const F zero = V::splat(0.0f);
      for (int64_t t = 0; t < Tv; t += W) {
        const I mk = V::load_mask(m + t);
        s += V::widen(V::sel(mk, V::load(lp + o + t) - V::load(old + o + t), zero));
        n -= mk;
      }
      if (rem) {
        const I mk = V::load_mask(tm);
        s += V::widen(V::sel(mk, V::load(tb[0]) - V::load(tb[1]), zero));
        n -= mk;
      }
      const int64_t L = V::hsum(n);
      const float lw = pl::clamp_lr(static_cast<float>(V::hsum(s) / static_cast<double>(L > 1 ? L : 1)),
                                    c, p.has_clamp, dlw);
      r_seq = std::exp(lw);
    }
    RowState st;
    st.S = st.akl = st.rkl = st.G = D{};
    st.L = st.nh = st.nl = st.nd = V::isplat(0);
    for (int64_t t = 0; t < Tv; t += W)
      vec_tokens<In>(lp + o + t, old + o + t, ad ? ad + t : nullptr, a_row, m + t,
                     ref + o + t, iw ? iw + t : nullptr, w_row, p, r_seq, g + t, st);
    if (rem) {
      vec_tokens<In>(tb[0], tb[1], ad ? tb[2] : nullptr, a_row, tm, tb[3], iw ? tb[4] : nullptr,
                     w_row, p, r_seq, tg, st);
      std::memcpy(g + Tv, tg, sizeof(float) * rem);
    }
    const int64_t L = V::hsum(st.L);
    if (p.seq && L > 0) {  // d l_it / d logp_is = dl_it/dlw * dlw * m_is / L_i
      const float add = static_cast<float>(V::hsum(st.G) / static_cast<double>(L)) * dlw;
      for (int64_t t = 0; t < Tn; ++t)
        if (m[t]) g[t] += add;
    }
    double* pr = a.part + i * pl::kNCol;
    pr[pl::kS] = V::hsum(st.S);
    pr[pl::kL] = static_cast<double>(L);
    pr[pl::kHigh] = static_cast<double>(V::hsum(st.nh));
    pr[pl::kLow] = static_cast<double>(V::hsum(st.nl));
    pr[pl::kDual] = static_cast<double>(V::hsum(st.nd));
    pr[pl::kAkl] = V::hsum(st.akl);
    pr[pl::kRkl] = V::hsum(st.rkl);
  }
}

void rows_f32(const VArgs& a, int64_t b, int64_t e) { vec_rows<float>(a, b, e); }
void rows_bf16(const VArgs& a, int64_t b, int64_t e) { vec_rows<c10::BFloat16>(a, b, e); }

#endif  // MARS_PL_VEC_PASS
