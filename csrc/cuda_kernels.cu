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

__device__ __forceinline__ void item_range(const Item& it, int64_t numel, int64_t* start, int64_t* end) {
  *start = static_cast<int64_t>(it.chunk) * kChunk;
  const int64_t e = *start + kChunk;
  *end = e < numel ? e : numel;
}

// ------------------------------------------------------------------------------ u = T * d
// u in float64 for float32/bf16/fp16 data, as fastsam.reference forms it (T = |w| + eta and
// d = g - sigma m in float64): no overflow for finite inputs. `m` / `w` are ignored when fs / ad is off.
__device__ __forceinline__ double u64_of(double g, double m, double w, bool fs, bool ad, double sigma, double eta) {
  double u = fs ? g - sigma * m : g;
  return ad ? u * (fabs(w) + eta) : u;
}

// u of float64 data split as |u| = mu * 2^ku (mu in [0.5, 1), 0 for u = 0), never overflowing: where
// d = g - sigma m overflows it is (g 2^-sh - (sigma 2^-sh) m) 2^sh, and T * d a product of mantissas.
// Returns sign(d) (+-0 keep their sign).
__device__ __forceinline__ double split_of(double g, double m, double w, bool fs, bool ad, double sigma, double eta,
                                           int sh, double* mu, int* ku) {
  double d = fs ? g - sigma * m : g;
  int kd = 0;
  if (fs && !finite_d(d) && finite_d(g) && finite_d(m)) {
    const double c = ldexp(1.0, -sh);
    d = g * c - (sigma * c) * m;
    kd = sh;
  }
  const double sg = d > 0.0 ? 1.0 : (d < 0.0 ? -1.0 : d);
  int k1 = 0;
  double md = frexp(fabs(d), &k1);
  kd += k1;
  if (ad) {
    int kt = 0, k2 = 0;
    const double mt = frexp(fabs(w) + eta, &kt);
    md = frexp(mt * md, &k2);  // in [0.25, 1): exact renormalization
    kd += kt + k2;
  }
  *mu = md;
  *ku = kd;
  return sg;
}

// ------------------------------------------------------------------------------ K1: norm partials
// One thread's running scaled sum of |u|^w (kernels.h Scaled): the sum is s * 2^(w e); q = 1, 2: e an
// integer exponent (|u| 2^-e <= 1), general q: e = F, the max's log2 rounded down to 2^-15 (log_scale),
// the terms 2^(q (log2(|u| 2^-floor(F)) - (F - floor(F)))) (the largest >= 1: no underflow for large q).
template <int QM>
struct PerturbSum {
  double s = 0.0, e = -INFINITY;
  double inv1 = 1.0, inv2 = 1.0;  // x -> x 2^-floor(e) = x inv1 inv2 (q = 1, 2: inv2 = 1 unused; 2^-e is 0 or exact)
  bool bad = false;
  __device__ __forceinline__ void raise(double e_new, double w) {
    if (e_new > e) {
      s = e == -INFINITY ? 0.0 : s * exp2(w * (e - e_new));
      e = e_new;
      if (QM == 0) {
        const Pow2Scale p(floor(e));
        inv1 = p.a;
        inv2 = p.b;
      } else {
        inv1 = exp2(-e);
      }
    }
  }
  __device__ __forceinline__ double scaled(double x) const { return QM == 0 ? x * inv1 * inv2 : x * inv1; }
};

// Partial (S, E) of sum |u|^q per block: S in part[slot0 + block], E in part[nslots + slot0 + block]
// (kernels.h Scaled). float32/bf16/fp16 data at q = 1, 2: float64 sums of |u| in the math type (E = 0,
// no scaling), |u| in float64 where T * d or g - sigma m overflowed (|u| < 3.4e38^2: its square still a
// double). float64 data and general q: scaled by a running power of two / F per thread; float32 data
// at general q take u in float64, float64 data split it where it overflowed.
template <class Tag, int QM>
__global__ void __launch_bounds__(kThreads) perturb_norm_kernel(const PerturbRow* rows, const Item* items,
                                                                int64_t count, PerturbScalars s, double* part,
                                                                int64_t nslots, int64_t slot0, int32_t* snap) {
  using io = DIO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  constexpr int N = Pack<S>::N;
  constexpr bool kF64 = sizeof(S) == 8;
  constexpr bool kScaled = QM == 0 || kF64;
  const double w = QM == 2 ? 2.0 : (QM == 1 ? 1.0 : s.q);
  PerturbSum<QM> rs;
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
      if (!kScaled) {
        double add = 0.0;
#pragma unroll
        for (int j = 0; j < N; ++j) add += QM == 2 ? ud[j] * ud[j] : ud[j];
        if ((fs || ad) && !finite_d(add)) {
          // T * d or g - sigma m overflowed the math type (or a real NaN / inf, which stays): the pack
          // again, u in float64 (reloaded: nothing of the loop above stays live for this rare path)
          add = 0.0;
#pragma unroll 1
          for (int64_t j = i; j < i + N && j < end; ++j) {
            const double a = fabs(u64_of(io::cv(g[j]), fs ? io::cv(m[j]) : 0.0, ad ? io::cv(wt[j]) : 0.0, fs, ad,
                                         s.sigma, r.eta));
            add += QM == 2 ? a * a : a;
          }
        }
        rs.s += add;
        continue;
      }
      if (QM == 0 && !kF64) {  // general q, float32 data: u in float64
        mx = 0.0;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          ud[j] = fabs(u64_of(io::cv(gp.v[j]), io::cv(mp.v[j]), io::cv(wp.v[j]), fs, ad, s.sigma, r.eta));
          mx = (ud[j] > mx || !finite_d(ud[j])) ? ud[j] : mx;
        }
      }
      if (kF64 && (fs || ad) && !finite_d(mx)) {
        // u overflowed float64 (or a real NaN / inf): the pack again split, |u| = mu 2^ku (reloaded
        // element by element: nothing of the loop above stays live for this rare path)
        const int sh = fsam_shift(s.sigma);
        const int64_t stop = i + N < end ? i + N : end;
        double lmx = -INFINITY, mu = 0.0;
        int ku = 0;
#pragma unroll 1
        for (int64_t j = i; j < stop; ++j) {
          split_of(static_cast<double>(io::cv(g[j])), fs ? static_cast<double>(io::cv(m[j])) : 0.0,
                   ad ? static_cast<double>(io::cv(wt[j])) : 0.0, fs, ad, s.sigma, r.eta, sh, &mu, &ku);
          rs.bad = rs.bad || !finite_d(mu);
          if (mu != 0.0) lmx = fmax(lmx, QM == 0 ? ku + log2(mu) : static_cast<double>(ku));
        }
        if (rs.bad) continue;
        if (lmx > -INFINITY) rs.raise(QM == 0 ? log_scale(lmx) : lmx, w);
        const double fi = floor(rs.e), ff = rs.e - fi;
#pragma unroll 1
        for (int64_t j = i; j < stop; ++j) {
          split_of(static_cast<double>(io::cv(g[j])), fs ? static_cast<double>(io::cv(m[j])) : 0.0,
                   ad ? static_cast<double>(io::cv(wt[j])) : 0.0, fs, ad, s.sigma, r.eta, sh, &mu, &ku);
          const double x = ldexp(mu, ku - static_cast<int>(fi));
          rs.s += QM == 2 ? x * x : (QM == 1 ? x : (x != 0.0 ? exp2(s.q * (log2(x) - ff)) : 0.0));
        }
        continue;
      }
      if (!finite_d(mx)) {
        rs.bad = true;
        continue;
      }
      if (mx > 0.0) {
        int e2 = 0;
        frexp(mx, &e2);
        rs.raise(QM == 0 ? log_scale(log2(mx)) : fmax(static_cast<double>(e2), -1000.0), w);
      }
      const double ff = rs.e - floor(rs.e);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const double x = rs.scaled(ud[j]);
        if (QM == 2) {
          rs.s += x * x;
        } else if (QM == 1) {
          rs.s += x;
        } else {
          rs.s += x != 0.0 ? exp2(s.q * (log2(x) - ff)) : 0.0;
        }
      }
    }
  }
  const double e = block_max(rs.e);
  double v = rs.e == -INFINITY ? 0.0 : rs.s * exp2(w * (rs.e - e));
  if (rs.bad) v = NAN;
  const Scaled tot{block_sum(v), e};
  if (threadIdx.x == 0) {
    part[slot0 + blockIdx.x] = tot.s;
    part[nslots + slot0 + blockIdx.x] = tot.e;
  }
}

// Sharded first step (FSDP2), phase 1: this rank's K1 partials reduced to one (S, E) pair (the
// scaled sum every K2 block forms), gathered across ranks by the caller. One block.
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const double* part, int64_t nslots, double w,
                                                                   double* out) {
  const Scaled t = sum_scaled_partials(part, nslots, w);
  if (threadIdx.x == 0) {
    out[0] = t.s;
    out[1] = t.e;
  }
}

// Sharded first step, phase 2: the F-SAM flag snapshot that K1 takes in an unsplit step.
__global__ void __launch_bounds__(kThreads) snap_kernel(const PerturbRow* rows, int64_t nrows, int32_t* snap) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r < nrows) snap[r] = (rows[r].ready != nullptr && *rows[r].ready != 0.0f) ? 1 : 0;
}

// ------------------------------------------------------------------------------ K2: perturbation
// e from the scaled global norm (kernels.h DualNorm): q = 2: rho T (u inv) / denom; p = inf:
// rho fac sign(u) T; general q: rho fac sign(u) 2^((q-1) (log2(|u| 2^-fi) - c0)) T with u as K1 forms it
// (float64 for float32 data; split for float64 data on a wide call); q = 2 on a wide call (row_wide):
// rho T sign(u) (|u| 2^-e2w) / denom_w in float64. F-SAM reads m from ema and writes m' to ema_out (the
// same tensor when in place); the flag goes to ready_out.
template <class Tag, int QM>
__global__ void __launch_bounds__(kThreads) perturb_apply_kernel(const PerturbRow* rows, const Item* items,
                                                                 int64_t count, PerturbScalars s,
                                                                 const double* part, int64_t nslots,
                                                                 const int32_t* snap, bool* ok) {
  using io = DIO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  constexpr int N = Pack<S>::N;
  constexpr bool kF64 = sizeof(S) == 8;
  const double wq = QM == 2 ? 2.0 : (QM == 1 ? 1.0 : s.q);
  const Scaled sum = sum_scaled_partials(part, nslots, wq);
  const DualNorm dn = sizeof(C) == 8 ? dual_norm_scaled(sum, s.q, QM, -1000, 1000)
                                     : dual_norm_scaled(sum, s.q, QM, -100, 127);
  const bool finite = dn.finite != 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) *ok = finite;
  const bool wide = row_wide(dn, QM, kF64);
  const double qm1 = s.q - 1.0;
  const int sh = fsam_shift(s.sigma);
  const double wk = QM == 2 ? dn.e2w : dn.fi;  // general q / wide q = 2: |u| 2^-wk
  const Pow2Scale winv(wk);
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
    const double wfac = QM == 2 ? r.rho / dn.denom_w : r.rho * dn.fac;  // general q / wide q = 2, float64
    const C sigma = static_cast<C>(s.sigma), lam = static_cast<C>(s.lam), one_m_lam = static_cast<C>(1.0 - s.lam);
    const C inv_beta = static_cast<C>(1.0 / s.beta);
    // e of one element from u as K1 forms it, in float64 (general q; q = 2 on a wide call)
    auto e64 = [&](C wv, C gv, C mv) -> C {
      const double T = ad ? fabs(static_cast<double>(wv)) + r.eta : 1.0;
      double x, sg;
      if (kF64 && wide) {
        double mu = 0.0;
        int ku = 0;
        sg = split_of(static_cast<double>(gv), static_cast<double>(mv), static_cast<double>(wv), fsm == 2, ad,
                      s.sigma, r.eta, sh, &mu, &ku);
        x = ldexp(mu, ku - static_cast<int>(wk));
      } else {
        const double d = kF64 ? static_cast<double>(fsm == 2 ? gv - sigma * mv : gv)
                              : (fsm == 2 ? static_cast<double>(gv) - s.sigma * static_cast<double>(mv)
                                          : static_cast<double>(gv));
        const double u = d * T;
        sg = u > 0.0 ? 1.0 : (u < 0.0 ? -1.0 : u);  // +-0 keep their sign (w + -0.0 = w)
        x = winv(fabs(u));
      }
      const double mag = QM == 0 ? (x != 0.0 ? exp2(qm1 * (log2(x) - dn.c0)) : 0.0) : x;  // <= 1
      return static_cast<C>(wfac * sg * mag * T);
    };
    if (QM == 2 && wide && finite) {
      // a wide call (some |u| beyond the math type): element by element, out of the vectorized loop
      // below (its registers stay out of that loop's budget; rare)
#pragma unroll 1
      for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
        const S ws = w[i], gs = g[i];
        wo[i] = ws;
        if (go != nullptr) go[i] = gs;
        const C wv = io::cv(ws), gv = io::cv(gs);
        const C mv = fsm == 2 ? io::cv(m[i]) : C(0);
        C ev = e64(wv, gv, mv);
        if (s.swp) {
          ev = esam_keep(static_cast<uint64_t>(r.offset + i), s.seed, s.step, s.threshold) ? ev * inv_beta : C(0);
        }
        w[i] = io::to(wv + ev);
        if (fsm == 1) mo[i] = gs;
        if (fsm == 2) mo[i] = io::to(lam * mv + one_m_lam * gv);
      }
      if (fsm != 0 && it.chunk == 0 && threadIdx.x == 0) *r.ready_out = 1.0f;
      continue;
    }
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
        C mv = C(0);
        if (fsm == 2) mv = io::cv(mp.v[j]);
        C ev;
        if (QM == 0) {
          ev = e64(wv, gv, mv);
        } else {
          C u = gv;
          if (fsm == 2) u = gv - sigma * mv;
          const C T = ad ? fabs(wv) + eta : C(1);
          u = u * T;
          const C mag = QM == 2 ? u * inv : (u > 0 ? C(1) : (u < 0 ? C(-1) : C(0)));
          ev = scale * mag * T;
        }
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
  double coef_d = 1.0, alpha_d = s.alpha;
  if (s.mix) {  // (c1, c2) from device memory: g <- c1 * gs - (-c2) * g_old
    coef_d = s.mixc[0];
    alpha_d = -s.mixc[1];
  } else if (s.gsam) {
    const GsamSums g = sum_gsam_partials(part, nslots);
    coef_d = gsam_coef(g.dot, g.ssn, g.sso, g.es, g.eo, s.alpha);
  }
  const C coef = static_cast<C>(coef_d), alpha = static_cast<C>(alpha_d);
  const C corr = static_cast<C>(s.correct ? s.mixc[2] : 0.0);  // decoupled WSAM's c3
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
          const C graw = gv;
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
          C wn = wv - lr * gv;
          if (gs && s.correct) wn = wn - corr * (graw - io::cv(gop.v[j]));  // decoupled WSAM, after the update
          wp.v[j] = io::to(wn);
        }
        stp(w, i, end, vec, wp);
        if (gs && s.writeback) stp(g, i, end, vec, gp);
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
          const C graw = gv;
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
          C wn = wv - step_size * (mv / (sqrt(vv) * inv_bc2_sqrt + eps));
          if (gs && s.correct) wn = wn - corr * (graw - io::cv(gop.v[j]));  // decoupled WSAM, after the update
          wp.v[j] = io::to(wn);
        }
        stp(w, i, end, vec, wp);
        stp(ms, i, end, vec, mp);
        stp(vs, i, end, vec, vp);
        if (gs && s.writeback) stp(g, i, end, vec, gp);
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

// Blocks of kThreads that one SM holds at once for `kernel` (registers and shared memory
// decide: the Adam step (94 registers) and the general-p apply kernel (98) fit 2 blocks of 256
// threads per SM, not kBlocksPerSM = 8), capped at kBlocksPerSM. Asked once per kernel
// instantiation (one device architecture per process assumed); 1 if the query fails.
template <class K>
int resident_blocks(K kernel) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the non-sticky error: the next launch must not report it
    n = 1;
  }
  return n < 1 ? 1 : (n > kBlocksPerSM ? kBlocksPerSM : n);
}

// Grid of a kernel that only consumes partials (apply, second step): one resident wave, each
// block looping over items, so its size never changes a result (partial slots are fixed by the
// producers' grid_of). A grid larger than what is resident would run in waves and leave the
// last one mostly idle.
inline int64_t resident_grid(int64_t count, int sms, int per_sm) {
  const int64_t cap = static_cast<int64_t>(sms) * per_sm;
  return count < cap ? (count > 0 ? count : 1) : cap;
}

template <class Tag, int Q>
int64_t apply_grid(int64_t count, int sms) {
  static const int per_sm = resident_blocks(perturb_apply_kernel<Tag, Q>);
  return resident_grid(count, sms, per_sm);
}

// Resident blocks per SM of the partial-writing kernels of a step, the smallest over the dtypes
// (groups of one step may differ in dtype; one per-SM count keeps the slot formula simple).
template <int Q>
int norm_per_sm() {
  static const int n = [] {
    int m = resident_blocks(perturb_norm_kernel<float, Q>);
    const int b = resident_blocks(perturb_norm_kernel<double, Q>);
    const int c = resident_blocks(perturb_norm_kernel<bf16_t, Q>);
    const int d = resident_blocks(perturb_norm_kernel<f16_t, Q>);
    m = b < m ? b : m;
    m = c < m ? c : m;
    return d < m ? d : m;
  }();
  return n;
}
int norm_per_sm_q(int qmode) { return qmode == 2 ? norm_per_sm<2>() : qmode == 1 ? norm_per_sm<1>() : norm_per_sm<0>(); }
int gsam_per_sm() {
  static const int n = [] {
    int m = resident_blocks(gsam_sums_kernel<float>);
    const int b = resident_blocks(gsam_sums_kernel<double>);
    const int c = resident_blocks(gsam_sums_kernel<bf16_t>);
    const int d = resident_blocks(gsam_sums_kernel<f16_t>);
    m = b < m ? b : m;
    m = c < m ? c : m;
    return d < m ? d : m;
  }();
  return n;
}

template <class Tag>
struct LaunchApply {
  static void run(int sms, cudaStream_t st, const PerturbRow* rows, const Item* items, int64_t count,
                  const PerturbScalars& s, const double* part, int64_t nslots, const int32_t* snap, bool* ok) {
    const dim3 b(kThreads);
    if (s.qmode == 2) {
      const dim3 g(static_cast<unsigned>(apply_grid<Tag, 2>(count, sms)));
      perturb_apply_kernel<Tag, 2><<<g, b, 0, st>>>(rows, items, count, s, part, nslots, snap, ok);
    } else if (s.qmode == 1) {
      const dim3 g(static_cast<unsigned>(apply_grid<Tag, 1>(count, sms)));
      perturb_apply_kernel<Tag, 1><<<g, b, 0, st>>>(rows, items, count, s, part, nslots, snap, ok);
    } else {
      const dim3 g(static_cast<unsigned>(apply_grid<Tag, 0>(count, sms)));
      perturb_apply_kernel<Tag, 0><<<g, b, 0, st>>>(rows, items, count, s, part, nslots, snap, ok);
    }
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

template <class Tag, int M>
void launch_step(int sms, cudaStream_t st, const StepRow* rows, const Item* items, int64_t count,
                 const StepScalars& s, const double* part, int64_t nslots) {
  static const int per_sm = resident_blocks(second_step_kernel<Tag, M>);
  const dim3 g(static_cast<unsigned>(resident_grid(count, sms, per_sm))), b(kThreads);
  second_step_kernel<Tag, M><<<g, b, 0, st>>>(rows, items, count, s, part, nslots);
}

template <class Tag>
struct LaunchStep {
  static void run(int sms, cudaStream_t st, const StepRow* rows, const Item* items, int64_t count,
                  const StepScalars& s, const double* part, int64_t nslots) {
    switch (s.mode) {
      case kModeSGD: launch_step<Tag, kModeSGD>(sms, st, rows, items, count, s, part, nslots); break;
      case kModeAdam: launch_step<Tag, kModeAdam>(sms, st, rows, items, count, s, part, nslots); break;
      case kModeCombine: launch_step<Tag, kModeCombine>(sms, st, rows, items, count, s, part, nslots); break;
      case kModeAccum: launch_step<Tag, kModeAccum>(sms, st, rows, items, count, s, part, nslots); break;
      default: launch_step<Tag, kModeRestore>(sms, st, rows, items, count, s, part, nslots); break;
    }
  }
};

}  // namespace

int64_t perturb_slots(const Group* groups, int ngroups, int sms, int qmode) {
  const int per_sm = norm_per_sm_q(qmode);
  int64_t t = 0;
  for (int k = 0; k < ngroups; ++k) t += grid_of(groups[k].count, sms, per_sm);
  return t;
}

int64_t gsam_slots(const Group* groups, int ngroups, int sms) {
  const int per_sm = gsam_per_sm();
  int64_t t = 0;
  for (int k = 0; k < ngroups; ++k) t += grid_of(groups[k].count, sms, per_sm);
  return t;
}

namespace {
// K1 over every group into part (S then E, nslots each); returns nslots.
int64_t launch_norms(const PerturbRow* rows, const Item* items, const Group* groups, int ngroups,
                     const PerturbScalars& s, double* part, int32_t* snap, int sms, cudaStream_t st) {
  const int per_sm = norm_per_sm_q(s.qmode);
  const int64_t nslots = perturb_slots(groups, ngroups, sms, s.qmode);
  int64_t slot = 0;
  for (int k = 0; k < ngroups; ++k) {
    const Group& gr = groups[k];
    const int64_t grid = grid_of(gr.count, sms, per_sm);
    by_dtype<LaunchNorm>(gr.dtype, grid, st, rows, items + gr.begin, gr.count, s, part, nslots, slot, snap);
    slot += grid;
  }
  return nslots;
}

// K2 over every group, reducing `nslots` (S, E) partials (K1's, or every rank's pair).
void launch_applies(const PerturbRow* rows, const Item* items, const Group* groups, int ngroups,
                    const PerturbScalars& s, const double* part, int64_t nslots, const int32_t* snap, bool* ok, int sms,
                    cudaStream_t st) {
  for (int k = 0; k < ngroups; ++k) {
    const Group& gr = groups[k];
    by_dtype<LaunchApply>(gr.dtype, sms, st, rows, items + gr.begin, gr.count, s, part, nslots, snap, ok);
  }
}
}  // namespace

void perturb_partial(const PerturbRow* rows, const Item* items, const Group* groups, int ngroups,
                     const PerturbScalars& s, double* part, int32_t* snap, double* out, int sms, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t nslots = launch_norms(rows, items, groups, ngroups, s, part, snap, sms, st);
  const double w = s.qmode == 2 ? 2.0 : (s.qmode == 1 ? 1.0 : s.q);
  reduce_partials_kernel<<<dim3(1), dim3(kThreads), 0, st>>>(part, nslots, w, out);
}

void perturb_apply_global(const PerturbRow* rows, int64_t nrows, const Item* items, const Group* groups,
                          int ngroups, const PerturbScalars& s, const double* table, int64_t nranks, int32_t* snap,
                          bool* ok, int sms, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (s.fsam) {  // K1 took the snapshot in phase 1, in another call: again (nothing wrote the flags since)
    const int64_t blocks = (nrows + kThreads - 1) / kThreads;
    snap_kernel<<<dim3(static_cast<unsigned>(blocks > 0 ? blocks : 1)), dim3(kThreads), 0, st>>>(rows, nrows, snap);
  }
  launch_applies(rows, items, groups, ngroups, s, table, nranks, snap, ok, sms, st);
}

void perturb(const PerturbRow* rows, const Item* items, const Group* groups, int ngroups, const PerturbScalars& s,
             double* part, int32_t* snap, bool* ok, int sms, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t nslots = launch_norms(rows, items, groups, ngroups, s, part, snap, sms, st);
  launch_applies(rows, items, groups, ngroups, s, part, nslots, snap, ok, sms, st);
}

void second_step(const StepRow* rows, const Item* items, const Group* groups, int ngroups, const StepScalars& s,
                 double* part, int sms, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool sums = s.gsam && !s.mix;  // mix: the coefficients are given, no partial sums
  const int64_t nslots = sums ? gsam_slots(groups, ngroups, sms) : 1;
  if (sums) {
    const int per_sm = gsam_per_sm();
    int64_t slot = 0;
    for (int k = 0; k < ngroups; ++k) {
      const Group& gr = groups[k];
      const int64_t grid = grid_of(gr.count, sms, per_sm);
      by_dtype<LaunchGsam>(gr.dtype, grid, st, rows, items + gr.begin, gr.count, part, nslots, slot);
      slot += grid;
    }
  }
  for (int k = 0; k < ngroups; ++k) {
    const Group& gr = groups[k];
    by_dtype<LaunchStep>(gr.dtype, sms, st, rows, items + gr.begin, gr.count, s,
                         static_cast<const double*>(part), nslots);
  }
}

}  // namespace cuda
}  // namespace fastsam
