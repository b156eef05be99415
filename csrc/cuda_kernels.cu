// CUDA kernels of the fused SAM step (backend="cuda"): the same ops and math as cpu_kernels.cpp.
//
// Multi-tensor layout: the op layer uploads a row table (kernels.h PerturbRow / StepRow: device
// pointers, sizes, per-tensor options) and an item table (row, chunk of kChunk elements), grouped
// by storage dtype. One launch per (op phase, dtype group) covers any number of tensors: a fixed
// grid of kThreads-thread blocks strides over the group's items. Each thread moves 16 bytes per
// load/store (float4 / 8 x bf16) where the row's pointers are 16-byte aligned, element by
// element otherwise and on tails.
//
// No host sync: the first step's K1 writes one float64 partial per block, K2 (every block) sums
// all partials in a fixed order and knows N itself; block 0 writes the "N finite" flag into a
// device bool. Reductions are fixed-order (warp shuffles, then warps in order): the same bits
// on every run, no float atomics.
//
// Math: float32 for fp32/bf16/fp16 storage (IEEE sqrt/div: no fast-math), float64 for fp64;
// rounded once to the storage type (round to nearest even); sums in float64.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fastsam_common.h"
#include "kernels.h"

namespace fastsam {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------ storage access
template <class Tag>
struct DIO;

template <>
struct DIO<float> {
  using S = float;
  using C = float;
  __device__ __forceinline__ static C cv(S x) { return x; }
  __device__ __forceinline__ static S to(C v) { return v; }
};

template <>
struct DIO<double> {
  using S = double;
  using C = double;
  __device__ __forceinline__ static C cv(S x) { return x; }
  __device__ __forceinline__ static S to(C v) { return v; }
};

template <>
struct DIO<bf16_t> {
  using S = uint16_t;
  using C = float;
  __device__ __forceinline__ static C cv(S x) { return __bfloat162float(__ushort_as_bfloat16(x)); }
  __device__ __forceinline__ static S to(C v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

template <>
struct DIO<f16_t> {
  using S = uint16_t;
  using C = float;
  __device__ __forceinline__ static C cv(S x) { return __half2float(__ushort_as_half(x)); }
  __device__ __forceinline__ static S to(C v) { return __half_as_ushort(__float2half_rn(v)); }
};

// N = 16 / sizeof(S) elements: one 16-byte transaction per thread when aligned.
template <class S>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(S);
  S v[N];
};

// Load elements [i, i + N) of p (zeros past `end`); vector load when `vec` and fully inside.
template <class S>
__device__ __forceinline__ Pack<S> ldp(const S* p, int64_t i, int64_t end, bool vec) {
  Pack<S> r;
  if (vec && i + Pack<S>::N <= end) {
    r = *reinterpret_cast<const Pack<S>*>(p + i);
  } else {
#pragma unroll
    for (int k = 0; k < Pack<S>::N; ++k) r.v[k] = (i + k < end) ? p[i + k] : S(0);
  }
  return r;
}

template <class S>
__device__ __forceinline__ void stp(S* p, int64_t i, int64_t end, bool vec, const Pack<S>& r) {
  if (vec && i + Pack<S>::N <= end) {
    *reinterpret_cast<Pack<S>*>(p + i) = r;
  } else {
#pragma unroll
    for (int k = 0; k < Pack<S>::N; ++k) {
      if (i + k < end) p[i + k] = r.v[k];
    }
  }
}

// Fixed-order block sum of one double per thread (result valid in every thread).
__device__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  __shared__ double total;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) t += warp_sums[w];
    total = t;
  }
  __syncthreads();
  const double out = total;
  __syncthreads();  // the shared slots are reused by the next call
  return out;
}

// Block max of one double per thread (-inf neutral; result valid in every thread).
__device__ double block_max(double v) {
  __shared__ double warp_max[kThreads / 32];
  __shared__ double total;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_down_sync(0xFFFFFFFFu, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = -INFINITY;
    for (int w = 0; w < kThreads / 32; ++w) t = fmax(t, warp_max[w]);
    total = t;
  }
  __syncthreads();
  const double out = total;
  __syncthreads();
  return out;
}

// Sum of scaled partials (S in part[0 .. n), E in part[n .. 2n)) at their largest exponent, in a
// fixed order; w = q (kernels.h Scaled).
__device__ Scaled sum_scaled_partials(const double* part, int64_t n, double w) {
  double e = -INFINITY;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) e = fmax(e, part[n + k]);
  e = block_max(e);
  double v = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const double ek = part[n + k];
    v += ek == -INFINITY ? part[k] : part[k] * exp2(w * (ek - e));  // an empty partial is 0 (or NaN)
  }
  return Scaled{block_sum(v), e};
}

// One thread's running scaled sum of |x|^w: terms |x * 2^-e|^w, e raised (and the sum rescaled)
// when a larger |x| comes; `bad` records a non-finite x.
struct RunningSum {
  double s = 0.0, e = -INFINITY, inv = 1.0;
  bool bad = false;
  __device__ __forceinline__ void raise_to(double mx, double w) {
    if (!(mx > 0.0) || !finite_d(mx)) {
      bad = bad || !finite_d(mx);
      return;
    }
    int k = 0;
    frexp(mx, &k);
    const double ek = k < -1000 ? -1000.0 : static_cast<double>(k);
    if (ek > e) {
      s = e == -INFINITY ? 0.0 : s * exp2(w * (e - ek));
      e = ek;
      inv = exp2(-ek);
    }
  }
};

// Block reduction of the threads' running sums to one partial (S, E).
__device__ Scaled block_scaled(const RunningSum& r, double w) {
  const double e = block_max(r.e);
  double v = r.e == -INFINITY ? 0.0 : r.s * exp2(w * (r.e - e));
  if (r.bad) v = NAN;
  return Scaled{block_sum(v), e};
}

__device__ __forceinline__ void item_range(const Item& it, int64_t numel, int64_t* start, int64_t* end) {
  *start = static_cast<int64_t>(it.chunk) * kChunk;
  const int64_t e = *start + kChunk;
  *end = e < numel ? e : numel;
}

// ------------------------------------------------------------------------------ K1: norm partials
// Partial (S, E) of sum |u|^q per block: S in part[slot0 + block], E in part[nslots + slot0 + block]
// (kernels.h Scaled). float64 sums of float32 values at q = 1, 2 cannot overflow: E = 0, no scaling;
// float64 tensors and general q scale by a running power of two per thread.
template <class Tag, int QM>
__global__ void __launch_bounds__(kThreads) perturb_norm_kernel(const PerturbRow* rows, const Item* items,
                                                                int64_t count, PerturbScalars s, double* part,
                                                                int64_t nslots, int64_t slot0, int32_t* snap) {
  using io = DIO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  constexpr int N = Pack<S>::N;
  constexpr bool kScaled = QM == 0 || sizeof(S) == 8;
  const double w = QM == 2 ? 2.0 : (QM == 1 ? 1.0 : s.q);
  RunningSum rs;
  if (!kScaled) rs.e = 0.0;
  for (int64_t k = blockIdx.x; k < count; k += gridDim.x) {
    const Item it = items[k];
    const PerturbRow& r = rows[it.row];
    int64_t start, end;
    item_range(it, r.numel, &start, &end);
    bool fs = false;
    if (s.fsam) {
      fs = *r.ready != 0.0f;
      if (it.chunk == 0 && threadIdx.x == 0) snap[it.row] = fs ? 1 : 0;  // K2 reads this, not the flag
    }
    const bool ad = r.adaptive != 0, vec = r.vec != 0;
    const S* g = static_cast<const S*>(r.g);
    const S* m = static_cast<const S*>(r.ema);
    const S* wt = static_cast<const S*>(r.w);
    const C sigma = static_cast<C>(s.sigma), eta = static_cast<C>(r.eta);
    for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * N; i < end; i += static_cast<int64_t>(kThreads) * N) {
      const Pack<S> gp = ldp(g, i, end, vec);
      Pack<S> mp{}, wp{};
      if (fs) mp = ldp(m, i, end, vec);
      if (ad) wp = ldp(wt, i, end, vec);
      double ud[N];
      double mx = 0.0;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        C u = io::cv(gp.v[j]);
        if (fs) u = u - sigma * io::cv(mp.v[j]);
        if (ad) u = u * (fabs(io::cv(wp.v[j])) + eta);
        ud[j] = fabs(static_cast<double>(u));  // zeros past the end add nothing
        if (kScaled) mx = (ud[j] > mx || !finite_d(ud[j])) ? ud[j] : mx;
      }
      if (kScaled) rs.raise_to(mx, w);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const double a = kScaled ? ud[j] * rs.inv : ud[j];
        if (QM == 2) {
          rs.s += a * a;
        } else if (QM == 1) {
          rs.s += a;
        } else {
          rs.s += a != 0.0 ? pow(a, s.q) : 0.0;
        }
      }
    }
  }
  const Scaled tot = block_scaled(rs, w);
  if (threadIdx.x == 0) {
    part[slot0 + blockIdx.x] = tot.s;
    part[nslots + slot0 + blockIdx.x] = tot.e;
  }
}

// ------------------------------------------------------------------------------ K2: perturbation
// e from the scaled global norm (kernels.h DualNorm): q = 2: rho T (u inv) / denom; p = inf:
// rho fac sign(u) T; else rho fac sign(u) (|u inv| / n_hat)^(q-1) T. F-SAM reads m from ema and
// writes m' to ema_out (the same tensor when in place); the flag goes to ready_out.
template <class Tag, int QM>
__global__ void __launch_bounds__(kThreads) perturb_apply_kernel(const PerturbRow* rows, const Item* items,
                                                                 int64_t count, PerturbScalars s,
                                                                 const double* part, int64_t nslots,
                                                                 const int32_t* snap, bool* ok) {
  using io = DIO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  constexpr int N = Pack<S>::N;
  const double wq = QM == 2 ? 2.0 : (QM == 1 ? 1.0 : s.q);
  const Scaled sum = sum_scaled_partials(part, nslots, wq);
  const DualNorm dn = sizeof(C) == 8 ? dual_norm_scaled(sum, s.q, QM, -1000, 1000)
                                     : dual_norm_scaled(sum, s.q, QM, -100, 127);
  const bool finite = dn.finite != 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) *ok = finite;
  const double qm1 = s.q - 1.0, inv_nh = 1.0 / dn.n_hat;
  const C inv = static_cast<C>(dn.inv);  // a power of two: u * inv is exact
  for (int64_t k = blockIdx.x; k < count; k += gridDim.x) {
    const Item it = items[k];
    const PerturbRow& r = rows[it.row];
    int64_t start, end;
    item_range(it, r.numel, &start, &end);
    const int fsm = s.fsam ? (snap[it.row] ? 2 : 1) : 0;
    const bool ad = r.adaptive != 0, vec = r.vec != 0;
    S* w = static_cast<S*>(r.w);
    const S* g = static_cast<const S*>(r.g);
    S* wo = static_cast<S*>(r.w_old);
    const S* m = static_cast<const S*>(r.ema);
    S* mo = static_cast<S*>(r.ema_out);
    S* go = static_cast<S*>(r.g_old);
    const C scale = static_cast<C>(QM == 2 ? r.rho / dn.denom : r.rho * dn.fac), eta = static_cast<C>(r.eta);
    const C sigma = static_cast<C>(s.sigma), lam = static_cast<C>(s.lam), one_m_lam = static_cast<C>(1.0 - s.lam);
    const C inv_beta = static_cast<C>(1.0 / s.beta);
    for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * N; i < end; i += static_cast<int64_t>(kThreads) * N) {
      Pack<S> wp = ldp(w, i, end, vec);
      const Pack<S> gp = ldp(g, i, end, vec);
      stp(wo, i, end, vec, wp);  // exact copy of w, perturbed or not
      if (go != nullptr) {
        Pack<S> z{};
        stp(go, i, end, vec, finite ? gp : z);
      }
      Pack<S> mp{};
      if (fsm == 2 || (fsm != 0 && !finite && mo != m)) mp = ldp(m, i, end, vec);
      if (!finite) {
        if (fsm != 0 && mo != m) stp(mo, i, end, vec, mp);  // the EMA keeps its value
        continue;
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C wv = io::cv(wp.v[j]), gv = io::cv(gp.v[j]);
        C u = gv, mv = C(0);
        if (fsm == 2) {
          mv = io::cv(mp.v[j]);
          u = gv - sigma * mv;
        }
        const C T = ad ? fabs(wv) + eta : C(1);
        u = u * T;
        C mag;
        if (QM == 2) {
          mag = u * inv;
        } else if (QM == 1) {
          mag = u > 0 ? C(1) : (u < 0 ? C(-1) : C(0));
        } else {
          const double a = pow(fabs(static_cast<double>(u)) * dn.inv * inv_nh, qm1);  // <= 1
          mag = static_cast<C>(u < 0 ? -a : (u > 0 ? a : 0.0));
        }
        C ev = scale * mag * T;
        if (s.swp) {
          const uint64_t gi = static_cast<uint64_t>(r.offset + i + j);
          ev = esam_keep(gi, s.seed, s.step, s.threshold) ? ev * inv_beta : C(0);
        }
        wp.v[j] = io::to(wv + ev);
        if (fsm == 1) mp.v[j] = gp.v[j];
        if (fsm == 2) mp.v[j] = io::to(lam * mv + one_m_lam * gv);
      }
      stp(w, i, end, vec, wp);
      if (fsm != 0) stp(mo, i, end, vec, mp);
    }
    if (fsm != 0 && it.chunk == 0 && threadIdx.x == 0) *r.ready_out = (finite || fsm == 2) ? 1.0f : 0.0f;
  }
}

// ------------------------------------------------------------------------------ K3: second step
// GSAM partials: <g_old, gs>, |gs|^2, |g_old|^2 and the two exponents (kernels.h GsamSums) in
// part[k * nslots + slot0 + block], k = 0..4. float64 sums of float32 values cannot overflow
// (exponents 0); float64 tensors are scaled by running powers of two per thread.
template <class Tag>
__global__ void __launch_bounds__(kThreads) gsam_sums_kernel(const StepRow* rows, const Item* items, int64_t count,
                                                             double* part, int64_t nslots, int64_t slot0) {
  using io = DIO<Tag>;
  using S = typename io::S;
  constexpr int N = Pack<S>::N;
  constexpr bool kScaled = sizeof(S) == 8;
  RunningSum rn, ro;  // |gs|^2 and |g_old|^2 with their exponents
  if (!kScaled) rn.e = ro.e = 0.0;
  double dot = 0.0;
  for (int64_t k = blockIdx.x; k < count; k += gridDim.x) {
    const Item it = items[k];
    const StepRow& r = rows[it.row];
    if (r.g == nullptr || r.g_old == nullptr) continue;
    int64_t start, end;
    item_range(it, r.numel, &start, &end);
    const bool vec = r.vec != 0;
    const S* g = static_cast<const S*>(r.g);
    const S* go = static_cast<const S*>(r.g_old);
    for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * N; i < end; i += static_cast<int64_t>(kThreads) * N) {
      const Pack<S> a = ldp(g, i, end, vec), b = ldp(go, i, end, vec);
      if (kScaled) {
        double mn = 0.0, mo = 0.0;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const double x = fabs(static_cast<double>(io::cv(a.v[j]))), y = fabs(static_cast<double>(io::cv(b.v[j])));
          mn = (x > mn || !finite_d(x)) ? x : mn;
          mo = (y > mo || !finite_d(y)) ? y : mo;
        }
        const double en = rn.e, eo = ro.e;
        rn.raise_to(mn, 2.0);
        ro.raise_to(mo, 2.0);
        if (en != rn.e || eo != ro.e) {
          dot = (en == -INFINITY || eo == -INFINITY) ? 0.0 : dot * exp2((en - rn.e) + (eo - ro.e));
        }
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const double x = io::cv(a.v[j]) * rn.inv, y = io::cv(b.v[j]) * ro.inv;
        dot += x * y;
        rn.s += x * x;
        ro.s += y * y;
      }
    }
  }
  const double es = block_max(rn.e), eo = block_max(ro.e);
  const double fs = rn.e == -INFINITY ? 0.0 : exp2(rn.e - es), fo = ro.e == -INFINITY ? 0.0 : exp2(ro.e - eo);
  const bool bad = rn.bad || ro.bad;
  const double t_dot = block_sum(bad ? NAN : dot * fs * fo);
  const double t_ssn = block_sum(bad ? NAN : rn.s * fs * fs);
  const double t_sso = block_sum(bad ? NAN : ro.s * fo * fo);
  if (threadIdx.x == 0) {
    part[slot0 + blockIdx.x] = t_dot;
    part[nslots + slot0 + blockIdx.x] = t_ssn;
    part[2 * nslots + slot0 + blockIdx.x] = t_sso;
    part[3 * nslots + slot0 + blockIdx.x] = es;
    part[4 * nslots + slot0 + blockIdx.x] = eo;
  }
}

// The GSAM sums of all partials (fixed order, the same bits in every block).
__device__ GsamSums sum_gsam_partials(const double* part, int64_t n) {
  double es = -INFINITY, eo = -INFINITY;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    es = fmax(es, part[3 * n + k]);
    eo = fmax(eo, part[4 * n + k]);
  }
  es = block_max(es);
  eo = block_max(eo);
  double dot = 0.0, ssn = 0.0, sso = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const double ks = part[3 * n + k], ko = part[4 * n + k];
    const double fs = ks == -INFINITY ? 0.0 : exp2(ks - es), fo = ko == -INFINITY ? 0.0 : exp2(ko - eo);
    dot += part[k] * fs * fo;
    ssn += part[n + k] * fs * fs;
    sso += part[2 * n + k] * fo * fo;
  }
  return GsamSums{block_sum(dot), block_sum(ssn), block_sum(sso), es, eo};
}

// MODE: kModeRestore / kModeCombine (copies and the GSAM combine), kModeSGD, kModeAdam, kModeAccum.
template <class Tag, int MODE>
__global__ void __launch_bounds__(kThreads) second_step_kernel(const StepRow* rows, const Item* items, int64_t count,
                                                               StepScalars s, const double* part, int64_t nslots) {
  using io = DIO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  constexpr int N = Pack<S>::N;
  double coef_d = 1.0;
  if (s.gsam) {
    const GsamSums g = sum_gsam_partials(part, nslots);
    coef_d = gsam_coef(g.dot, g.ssn, g.sso, g.es, g.eo, s.alpha);
  }
  const C coef = static_cast<C>(coef_d), alpha = static_cast<C>(s.alpha);
  for (int64_t k = blockIdx.x; k < count; k += gridDim.x) {
    const Item it = items[k];
    const StepRow& r = rows[it.row];
    int64_t start, end;
    item_range(it, r.numel, &start, &end);
    const bool vec = r.vec != 0;
    const bool gs = s.gsam && r.g != nullptr && r.g_old != nullptr;
    S* w = static_cast<S*>(r.w);
    S* g = static_cast<S*>(r.g);
    const S* wo = static_cast<const S*>(r.w_old);
    const S* go = static_cast<const S*>(r.g_old);
    const int64_t stride = static_cast<int64_t>(kThreads) * N;
    const int64_t first = start + static_cast<int64_t>(threadIdx.x) * N;
    if (MODE == kModeAccum) {  // m-SAM micro-batch: restore, acc <- scale * ((reset ? 0 : acc_in) + weight * g)
      S* acc = static_cast<S*>(r.s1);
      const S* acc_in = r.s2 != nullptr ? static_cast<const S*>(r.s2) : acc;
      const C weight = static_cast<C>(r.hyp[0]), scale = static_cast<C>(r.hyp[1]);
      const bool reset = r.fresh != 0;
      for (int64_t i = first; i < end; i += stride) {
        if (wo != nullptr) stp(w, i, end, vec, ldp(wo, i, end, vec));
        if (acc == nullptr) continue;
        Pack<S> ap{}, gp{}, gop{};
        if (!reset) ap = ldp(acc_in, i, end, vec);
        if (g != nullptr) gp = ldp(g, i, end, vec);
        if (gs) gop = ldp(go, i, end, vec);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          C v = C(0);
          if (g != nullptr) {
            C gv = io::cv(gp.v[j]);
            if (gs) gv = coef * gv - alpha * io::cv(gop.v[j]);
            v = weight * gv;
          }
          if (!reset) v = io::cv(ap.v[j]) + v;
          ap.v[j] = io::to(scale * v);
        }
        stp(acc, i, end, vec, ap);
      }
      continue;
    }
    if (MODE == kModeRestore || MODE == kModeCombine || g == nullptr) {
      for (int64_t i = first; i < end; i += stride) {
        if (MODE != kModeCombine && wo != nullptr) stp(w, i, end, vec, ldp(wo, i, end, vec));
        if (gs && (MODE == kModeRestore || MODE == kModeCombine)) {
          const Pack<S> a = ldp(g, i, end, vec), b = ldp(go, i, end, vec);
          Pack<S> o;
#pragma unroll
          for (int j = 0; j < N; ++j) o.v[j] = io::to(coef * io::cv(a.v[j]) - alpha * io::cv(b.v[j]));
          stp(g, i, end, vec, o);
        }
      }
      continue;
    }
    const S* src = wo != nullptr ? wo : w;
    if (MODE == kModeSGD) {
      const C lr = static_cast<C>(r.hyp[0]), wd = static_cast<C>(r.hyp[1]);
      const C mom = static_cast<C>(r.hyp[2]), one_m_damp = static_cast<C>(r.hyp[3]);
      const bool has_wd = r.hyp[1] != 0.0, has_mom = r.hyp[2] != 0.0, fresh = r.fresh != 0;
      S* buf = static_cast<S*>(r.s1);
      for (int64_t i = first; i < end; i += stride) {
        Pack<S> wp = ldp(src, i, end, vec), gp = ldp(g, i, end, vec), gop{}, bp{};
        if (gs) gop = ldp(go, i, end, vec);
        if (has_mom && !fresh) bp = ldp(buf, i, end, vec);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const C wv = io::cv(wp.v[j]);
          C gv = io::cv(gp.v[j]);
          if (gs) {
            gv = coef * gv - alpha * io::cv(gop.v[j]);
            gp.v[j] = io::to(gv);
          }
          if (s.maximize) gv = -gv;
          if (has_wd) gv = gv + wd * wv;
          if (has_mom) {
            const C bv = fresh ? gv : mom * io::cv(bp.v[j]) + one_m_damp * gv;
            bp.v[j] = io::to(bv);
            gv = s.nesterov ? gv + mom * bv : bv;
          }
          wp.v[j] = io::to(wv - lr * gv);
        }
        stp(w, i, end, vec, wp);
        if (gs) stp(g, i, end, vec, gp);
        if (has_mom) stp(buf, i, end, vec, bp);
      }
    } else {  // Adam / AdamW
      const C wd = static_cast<C>(r.hyp[0]), one_m_b1 = static_cast<C>(r.hyp[1]);
      const C b2 = static_cast<C>(r.hyp[2]), one_m_b2 = static_cast<C>(r.hyp[3]);
      const C eps = static_cast<C>(r.hyp[4]), step_size = static_cast<C>(r.hyp[5]);
      const C inv_bc2_sqrt = static_cast<C>(1.0 / r.hyp[6]), decay = static_cast<C>(r.hyp[7]);
      const bool has_wd = r.hyp[0] != 0.0;
      const bool dec = has_wd && s.decoupled, coupled = has_wd && !s.decoupled;
      S* ms = static_cast<S*>(r.s1);
      S* vs = static_cast<S*>(r.s2);
      S* vms = static_cast<S*>(r.s3);
      for (int64_t i = first; i < end; i += stride) {
        Pack<S> wp = ldp(src, i, end, vec), gp = ldp(g, i, end, vec), gop{}, vmp{};
        Pack<S> mp = ldp(ms, i, end, vec), vp = ldp(vs, i, end, vec);
        if (gs) gop = ldp(go, i, end, vec);
        if (s.amsgrad) vmp = ldp(vms, i, end, vec);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          C wv = io::cv(wp.v[j]);
          C gv = io::cv(gp.v[j]);
          if (gs) {
            gv = coef * gv - alpha * io::cv(gop.v[j]);
            gp.v[j] = io::to(gv);
          }
          if (s.maximize) gv = -gv;
          if (dec) wv = wv * decay;
          if (coupled) gv = gv + wd * wv;
          C mv = io::cv(mp.v[j]), vv = io::cv(vp.v[j]);
          mv = mv + one_m_b1 * (gv - mv);
          vv = b2 * vv + one_m_b2 * (gv * gv);
          mp.v[j] = io::to(mv);
          vp.v[j] = io::to(vv);
          if (s.amsgrad) {
            const C vm = io::cv(vmp.v[j]);
            vv = vm > vv ? vm : vv;
            vmp.v[j] = io::to(vv);
          }
          wp.v[j] = io::to(wv - step_size * (mv / (sqrt(vv) * inv_bc2_sqrt + eps)));
        }
        stp(w, i, end, vec, wp);
        stp(ms, i, end, vec, mp);
        stp(vs, i, end, vec, vp);
        if (gs) stp(g, i, end, vec, gp);
        if (s.amsgrad) stp(vms, i, end, vec, vmp);
      }
    }
  }
}

// ------------------------------------------------------------------------------ dispatch
template <template <class> class F, class... A>
void by_dtype(int32_t dt, A&&... a) {
  switch (dt) {
    case kF32: F<float>::run(a...); break;
    case kF64: F<double>::run(a...); break;
    case kBF16: F<bf16_t>::run(a...); break;
    default: F<f16_t>::run(a...); break;
  }
}

template <class Tag>
struct LaunchNorm {
  static void run(int64_t grid, cudaStream_t st, const PerturbRow* rows, const Item* items, int64_t count,
                  const PerturbScalars& s, double* part, int64_t nslots, int64_t slot0, int32_t* snap) {
    const dim3 g(static_cast<unsigned>(grid)), b(kThreads);
    if (s.qmode == 2) {
      perturb_norm_kernel<Tag, 2><<<g, b, 0, st>>>(rows, items, count, s, part, nslots, slot0, snap);
    } else if (s.qmode == 1) {
      perturb_norm_kernel<Tag, 1><<<g, b, 0, st>>>(rows, items, count, s, part, nslots, slot0, snap);
    } else {
      perturb_norm_kernel<Tag, 0><<<g, b, 0, st>>>(rows, items, count, s, part, nslots, slot0, snap);
    }
  }
};

template <class Tag>
struct LaunchApply {
  static void run(int64_t grid, cudaStream_t st, const PerturbRow* rows, const Item* items, int64_t count,
                  const PerturbScalars& s, const double* part, int64_t nslots, const int32_t* snap, bool* ok) {
    const dim3 g(static_cast<unsigned>(grid)), b(kThreads);
    if (s.qmode == 2) perturb_apply_kernel<Tag, 2><<<g, b, 0, st>>>(rows, items, count, s, part, nslots, snap, ok);
    else if (s.qmode == 1) perturb_apply_kernel<Tag, 1><<<g, b, 0, st>>>(rows, items, count, s, part, nslots, snap, ok);
    else perturb_apply_kernel<Tag, 0><<<g, b, 0, st>>>(rows, items, count, s, part, nslots, snap, ok);
  }
};

template <class Tag>
struct LaunchGsam {
  static void run(int64_t grid, cudaStream_t st, const StepRow* rows, const Item* items, int64_t count, double* part,
                  int64_t nslots, int64_t slot0) {
    gsam_sums_kernel<Tag><<<dim3(static_cast<unsigned>(grid)), dim3(kThreads), 0, st>>>(rows, items, count, part,
                                                                                      nslots, slot0);
  }
};

template <class Tag>
struct LaunchStep {
  static void run(int64_t grid, cudaStream_t st, const StepRow* rows, const Item* items, int64_t count,
                  const StepScalars& s, const double* part, int64_t nslots) {
    const dim3 g(static_cast<unsigned>(grid)), b(kThreads);
    switch (s.mode) {
      case kModeSGD: second_step_kernel<Tag, kModeSGD><<<g, b, 0, st>>>(rows, items, count, s, part, nslots); break;
      case kModeAdam: second_step_kernel<Tag, kModeAdam><<<g, b, 0, st>>>(rows, items, count, s, part, nslots); break;
      case kModeCombine:
        second_step_kernel<Tag, kModeCombine><<<g, b, 0, st>>>(rows, items, count, s, part, nslots);
        break;
      case kModeAccum:
        second_step_kernel<Tag, kModeAccum><<<g, b, 0, st>>>(rows, items, count, s, part, nslots);
        break;
      default: second_step_kernel<Tag, kModeRestore><<<g, b, 0, st>>>(rows, items, count, s, part, nslots); break;
    }
  }
};

}  // namespace

void perturb(const PerturbRow* rows, const Item* items, const Group* groups, int ngroups, const PerturbScalars& s,
             double* part, int32_t* snap, bool* ok, int sms, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t nslots = partial_slots(groups, ngroups, sms);
  int64_t slot = 0;
  for (int k = 0; k < ngroups; ++k) {
    const Group& gr = groups[k];
    const int64_t grid = grid_of(gr.count, sms);
    by_dtype<LaunchNorm>(gr.dtype, grid, st, rows, items + gr.begin, gr.count, s, part, nslots, slot, snap);
    slot += grid;
  }
  for (int k = 0; k < ngroups; ++k) {
    const Group& gr = groups[k];
    by_dtype<LaunchApply>(gr.dtype, grid_of(gr.count, sms), st, rows, items + gr.begin, gr.count, s,
                          static_cast<const double*>(part), nslots, static_cast<const int32_t*>(snap), ok);
  }
}

void second_step(const StepRow* rows, const Item* items, const Group* groups, int ngroups, const StepScalars& s,
                 double* part, int sms, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t nslots = partial_slots(groups, ngroups, sms);
  if (s.gsam) {
    int64_t slot = 0;
    for (int k = 0; k < ngroups; ++k) {
      const Group& gr = groups[k];
      const int64_t grid = grid_of(gr.count, sms);
      by_dtype<LaunchGsam>(gr.dtype, grid, st, rows, items + gr.begin, gr.count, part, nslots, slot);
      slot += grid;
    }
  }
  for (int k = 0; k < ngroups; ++k) {
    const Group& gr = groups[k];
    by_dtype<LaunchStep>(gr.dtype, grid_of(gr.count, sms), st, rows, items + gr.begin, gr.count, s,
                         static_cast<const double*>(part), nslots);
  }
}

}  // namespace cuda
}  // namespace fastsam
