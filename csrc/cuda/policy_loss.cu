// CUDA body of mars::policy_loss (matches mars.reference.policy_loss; math in ../policy_loss.h).
//
// Kernel 1: one block per row. Vectorised 16-byte loads (when T and the pointers allow) of
// logp, old_logp, (ref_logp), (advantages [B, T]), (is_weights [B, T]) and the mask; per
// token the loss, d(loss)/d(logp) (written at once, unscaled by the aggregation) and metric
// counts; the row's partial sums are reduced in double by warp shuffles and a fixed-order
// pass over the warps. GSPO first reduces the row's mean log-ratio, then adds the sequence term to
// the row's gradient. Kernel 2: one block reduces the row partials in a fixed order and
// writes the loss, the metrics and the per-row scale. No atomics: deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../policy_loss_args.h"

namespace mars {
namespace {

using at::Tensor;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

struct DevExp {
  __device__ __forceinline__ float operator()(float x) const { return expf(x); }
  __device__ __forceinline__ double operator()(double x) const { return exp(x); }
};

// Sum of v[0..N) over the block, identical in every thread; fixed order (deterministic).
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    double x = v[k];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    v[k] = x;
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) smem[warp * N + k] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 0; k < N; ++k) {
      double s = 0.0;
      for (int w = 0; w < kWarps; ++w) s += smem[w * N + k];
      smem[kWarps * N + k] = s;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = smem[kWarps * N + k];
  __syncthreads();  // smem may be reused right after
}

struct RowAcc {
  double S = 0.0, akl = 0.0, rkl = 0.0, G = 0.0;
  int nh = 0, nl = 0, nd = 0, L = 0;
};

// One valid token: updates acc, returns the unscaled gradient (sequence term added later).
template <typename T>
__device__ __forceinline__ T token(T x, T o, T A, T ref, T w, T r_seq, const pl::Params& p,
                                   RowAcc& acc) {
  const T c = static_cast<T>(p.clamp);
  T inside;
  const T lr = pl::clamp_lr(x - o, c, p.has_clamp, inside);
  const T r = p.seq ? r_seq : DevExp()(lr);
  T l, dl;
  bool high, low, dual;
  pl::pg_term(r, A, p, l, dl, high, low, dual);
  if (p.has_is) pl::is_weight(w, l, dl);
  T gt;
  if (p.seq) {
    acc.G += static_cast<double>(dl);
    gt = T(0);
  } else {
    gt = dl * inside;
  }
  if (p.has_ref) {
    T kl, dkl, dkl_dlr = T(0);
    pl::kl_term(x, ref, p.kl_type, static_cast<T>(p.kl_dmax), static_cast<T>(p.kl_kmax), DevExp(),
                kl, dkl);
    if (p.kl_type == 3) pl::kl_ratio(r, kl, dkl, dkl_dlr);
    acc.rkl += static_cast<double>(kl);
    if (p.has_kl) {
      const T kc = static_cast<T>(p.kl_coef);
      l = l + kc * kl;
      gt += kc * dkl;
      if (p.kl_type == 3) {  // the ratio's share: through the row's ratio (GSPO) or lr
        if (p.seq) acc.G += static_cast<double>(kc * dkl_dlr);
        else if (inside != T(0)) gt += kc * dkl_dlr;
      }
    }
  }
  acc.S += static_cast<double>(l);
  acc.akl -= static_cast<double>(lr);
  acc.L += 1;
  acc.nh += high;
  acc.nl += low;
  acc.nd += dual;
  return gt;
}

template <typename scalar_t, typename T, int VEC>
__global__ void __launch_bounds__(kThreads) policy_loss_rows_kernel(
    const scalar_t* __restrict__ lp, const scalar_t* __restrict__ old,
    const scalar_t* __restrict__ adv, bool adv_2d, const bool* __restrict__ mask,
    const scalar_t* __restrict__ ref, const scalar_t* __restrict__ isw, pl::Params p,
    int64_t Tn, T* __restrict__ grad, double* __restrict__ part) {
  __shared__ double smem[(kWarps + 1) * 8];
  const int64_t i = blockIdx.x;
  const int64_t o = i * Tn;
  T r_seq = T(1), dlw = T(1);
  if (p.seq) {  // GSPO: log w_i = clamp(sum_t m (logp - old) / L_i)
    double v[2] = {0.0, 0.0};
    for (int64_t t = threadIdx.x; t < Tn; t += kThreads) {
      if (!mask[o + t]) continue;
      v[0] += static_cast<double>(static_cast<T>(lp[o + t]) - static_cast<T>(old[o + t]));
      v[1] += 1.0;
    }
    block_sum<2>(v, smem);
    const T lw = pl::clamp_lr(static_cast<T>(v[0] / (v[1] > 1.0 ? v[1] : 1.0)),
                              static_cast<T>(p.clamp), p.has_clamp, dlw);
    r_seq = DevExp()(lw);
  }
  const T a_row = adv_2d ? T(0) : static_cast<T>(adv[i]);
  const bool is_2d = p.has_is && p.is_2d;
  const T w_row = p.has_is && !p.is_2d ? static_cast<T>(isw[i]) : T(1);
  RowAcc acc;
  for (int64_t t0 = static_cast<int64_t>(threadIdx.x) * VEC; t0 < Tn;
       t0 += static_cast<int64_t>(kThreads) * VEC) {
    const auto m = *reinterpret_cast<const Vec<bool, VEC>*>(mask + o + t0);
    const auto x = *reinterpret_cast<const Vec<scalar_t, VEC>*>(lp + o + t0);
    const auto ol = *reinterpret_cast<const Vec<scalar_t, VEC>*>(old + o + t0);
    Vec<scalar_t, VEC> rf, a, w;
    if (p.has_ref) rf = *reinterpret_cast<const Vec<scalar_t, VEC>*>(ref + o + t0);
    if (adv_2d) a = *reinterpret_cast<const Vec<scalar_t, VEC>*>(adv + o + t0);
    if (is_2d) w = *reinterpret_cast<const Vec<scalar_t, VEC>*>(isw + o + t0);
    Vec<T, VEC> g;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      g.v[k] = T(0);
      if (!m.v[k]) continue;  // select before any arithmetic: -inf / NaN never used
      g.v[k] = token<T>(static_cast<T>(x.v[k]), static_cast<T>(ol.v[k]),
                        adv_2d ? static_cast<T>(a.v[k]) : a_row,
                        p.has_ref ? static_cast<T>(rf.v[k]) : T(0),
                        is_2d ? static_cast<T>(w.v[k]) : w_row, r_seq, p, acc);
    }
    *reinterpret_cast<Vec<T, VEC>*>(grad + o + t0) = g;
  }
  double v[8] = {acc.S, static_cast<double>(acc.L), static_cast<double>(acc.nh),
                 static_cast<double>(acc.nl), static_cast<double>(acc.nd), acc.akl, acc.rkl,
                 acc.G};
  block_sum<8>(v, smem);
  if (p.seq && v[pl::kL] > 0) {  // d l_it / d logp_is = dl_it/dlw * dlw * m_is / L_i
    __syncthreads();
    const T add = static_cast<T>(v[7] / v[pl::kL]) * dlw;
    for (int64_t t = threadIdx.x; t < Tn; t += kThreads)
      if (mask[o + t]) grad[o + t] += add;
  }
  if (threadIdx.x < pl::kNCol) part[i * pl::kNCol + threadIdx.x] = v[threadIdx.x];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) policy_loss_finalize_kernel(
    const double* __restrict__ part, int64_t B, int agg, double num_tokens, double num_seqs,
    double loss_scale, double Tn, T* __restrict__ loss, T* __restrict__ metrics,
    T* __restrict__ row_scale) {
  __shared__ double smem[(kWarps + 1) * 8];
  double v[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // total, N, nseq, high, low, dual, akl, rkl
  for (int64_t i = threadIdx.x; i < B; i += kThreads) {
    const double* pr = part + i * pl::kNCol;
    v[0] += pr[pl::kS] * pl::row_weight(agg, pr[pl::kL]);
    v[1] += pr[pl::kL];
    v[2] += pr[pl::kL] > 0 ? 1.0 : 0.0;
    for (int k = pl::kHigh; k < pl::kNCol; ++k) v[k + 1] += pr[k];
  }
  block_sum<8>(v, smem);
  const double denom = pl::agg_denominator(agg, v[1], v[2], num_tokens, num_seqs, loss_scale, Tn);
  if (threadIdx.x == 0) {
    const double n1 = v[1] > 1 ? v[1] : 1.0;
    *loss = static_cast<T>(v[0] / denom);
    for (int k = 0; k < 5; ++k) metrics[k] = static_cast<T>(v[k + 3] / n1);
    metrics[5] = static_cast<T>(v[1]);
  }
  for (int64_t i = threadIdx.x; i < B; i += kThreads)
    row_scale[i] = static_cast<T>(pl::row_weight(agg, part[i * pl::kNCol + pl::kL]) / denom);
}

bool aligned(const void* ptr, size_t n) { return reinterpret_cast<std::uintptr_t>(ptr) % n == 0; }
bool aligned16(const void* ptr) { return aligned(ptr, 16); }

pl::Outputs policy_loss_cuda(const pl::Inputs& in) {
  const pl::Params& p = in.p;
  const int64_t B = in.B, Tn = in.Tn;
  const bool adv_2d = in.adv_2d;
  TORCH_CHECK_VALUE(B <= 2147483647LL, "too many rows");
  const c10::cuda::CUDAGuard guard(in.x.device());
  const Tensor &x = in.x, &o = in.o, &a = in.a, &m = in.m, &r = in.r, &iw = in.iw;
  auto opts = x.options().dtype(in.acc);
  Tensor grad = at::empty({B, Tn}, opts);
  Tensor loss = at::empty({}, opts), metrics = at::empty({6}, opts), row_scale = at::empty({B}, opts);
  Tensor part = at::empty({B, pl::kNCol}, x.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mars_policy_loss_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = Tn % kVec == 0 && aligned16(x.data_ptr()) && aligned16(o.data_ptr()) &&
                     aligned16(r.data_ptr()) && aligned16(a.data_ptr()) &&
                     (!(p.has_is && p.is_2d) || aligned16(iw.data_ptr())) &&
                     aligned16(m.data_ptr()) && aligned(grad.data_ptr(), sizeof(T) * kVec);
    if (B > 0) {
      if (vec) {
        policy_loss_rows_kernel<scalar_t, T, kVec><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), adv_2d,
            m.data_ptr<bool>(), r.data_ptr<scalar_t>(), iw.data_ptr<scalar_t>(), p, Tn,
            grad.data_ptr<T>(), part.data_ptr<double>());
      } else {
        policy_loss_rows_kernel<scalar_t, T, 1><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), adv_2d,
            m.data_ptr<bool>(), r.data_ptr<scalar_t>(), iw.data_ptr<scalar_t>(), p, Tn,
            grad.data_ptr<T>(), part.data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    policy_loss_finalize_kernel<T><<<1, kThreads, 0, stream>>>(
        part.data_ptr<double>(), B, in.agg, in.num_tokens, in.num_seqs, in.loss_scale,
        static_cast<double>(Tn), loss.data_ptr<T>(), metrics.data_ptr<T>(),
        row_scale.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, metrics, grad, row_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars, CUDA, m) {
  m.impl("policy_loss", &pl::entry<policy_loss_cuda>);
}

}  // namespace mars
