// CPU kernels of the fused SAM step (backend="cpp"): OpenMP over fixed work items, inner loops
// written for the auto-vectorizer (`#pragma omp simd`, no calls, no per-element branches on
// loop-invariant options other than selects).
//
// Work partition. Every tensor is cut into items of kChunk elements; items of all tensors (and
// all dtypes) form one list that the threads share (dynamic schedule). Reductions write one
// float64 partial per item and the op sums the partials in item order, so results do not
// depend on the thread count or the schedule (no float atomics).
//
// Passes over parameter-sized memory, fp32 AdamW (docs/design.md section 4.2): K1 reads g (1); K2 reads w, g
// and writes w, w_old (4); K3 reads w_old, g, m, v and writes w, m, v (7): 12 in all. A plain
// store to a line that is not cached first reads it (write-allocate), so w_old in K2 and w in
// K3 (written, never read) would cost 2 passes more; they are written with non-temporal
// streaming stores when the op asks for it (large calls, see PerturbScalars::nt).
//
// Math: float32 for fp32/bf16/fp16 storage, float64 for fp64; rounded once to the storage type
// on store (bf16/fp16 round to nearest even). Norms and dot products accumulate in float64
// (free here, the loops are bandwidth-bound: products of fp32 inputs are exact and |u| above
// 1.8e19 does not overflow the square, as the float64 reference does not).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "fastsam_common.h"
#include "kernels.h"

namespace fastsam {
namespace cpu {
namespace {

// 32768 elements (128 KiB of fp32 per stream) per work item: ~2600 items for a ViT-B (86M
// elements) keep 2 threads balanced under a dynamic schedule at ~0.1 us of scheduling per item,
// and a tensor's tail item is at most this long.
constexpr int64_t kChunk = 32768;
// Items are walked in sub-blocks of 2048 elements: a sub-block of w (8 KiB fp32) is copied to
// w_old and then updated while it is still in L1 (64 KiB here), and the stack buffers of the
// ESAM mask and of streamed results stay small (<= 16 KiB for fp64).
constexpr int64_t kSub = 2048;
// Below 2^16 elements in total one thread does the work: a parallel region costs a few us,
// about what 2^16 elements of a fused update cost on one core.
constexpr int64_t kParallelMin = int64_t{1} << 16;
// Streaming stores only pay off for copies of at least this many bytes (below, a plain memcpy).
constexpr size_t kStreamMinBytes = 256;
// K1 reads each item as 4 interleaved sub-ranges: a core then has 4 sequential read streams in
// flight instead of one. Measured on this 2-core EPYC (1 thread, ViT-B gradients): 1 stream
// 24-26 ms, 2: 19-20, 4: 17-18, 8: 18-19. (The same interleaving of K2/K3 sub-blocks, which
// already read 2-4 arrays at once, made them 20-40% slower.)
constexpr int kStreams = 4;

// --------------------------------------------------------------------------- storage access
template <class Tag>
struct IO;

template <>
struct IO<float> {
  using S = float;
  using C = float;
  static C ld(const S* p, int64_t i) { return p[i]; }
  static void st(S* p, int64_t i, C v) { p[i] = v; }
};

template <>
struct IO<double> {
  using S = double;
  using C = double;
  static C ld(const S* p, int64_t i) { return p[i]; }
  static void st(S* p, int64_t i, C v) { p[i] = v; }
};

template <>
struct IO<bf16_t> {
  using S = uint16_t;
  using C = float;
  static C ld(const S* p, int64_t i) { return bf16_to_f32(p[i]); }
  static void st(S* p, int64_t i, C v) { p[i] = f32_to_bf16(v); }
};

template <>
struct IO<f16_t> {
  using S = uint16_t;
  using C = float;
  static C ld(const S* p, int64_t i) { return f16_to_f32(p[i]); }
  static void st(S* p, int64_t i, C v) { p[i] = f32_to_f16(v); }
};

// Exact byte copy; with nt, 16-byte non-temporal stores (no read-for-ownership of dst).
// `touch` (optional, at least n bytes): another array to prefetch at the same offsets while
// copying, so that the next loop finds it in cache and the copy is not the only read stream
// (one core reads ~15 GB/s from a single stream here; K2 on 1 thread: 53-61 ms -> 46-51 ms).
void copy_bytes(void* dst, const void* src, size_t n, bool nt, const void* touch = nullptr) {
#if defined(__SSE2__)
  if (nt && n >= kStreamMinBytes) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    const char* t = static_cast<const char*>(touch);
    const size_t head = (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15;
    std::memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    const size_t body = n & ~static_cast<size_t>(63);
    for (size_t k = 0; k < body; k += 64) {
      if (t != nullptr) _mm_prefetch(t + head + k, _MM_HINT_T0);
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k + 32));
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + k), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + k + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + k + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + k + 48), e);
    }
    std::memcpy(d + body, s + body, n - body);
    return;
  }
#else
  (void)nt;
#endif
  (void)touch;
  std::memcpy(dst, src, n);
}

// Streaming stores are weakly ordered: fence before another thread (or the caller) reads them.
inline void stream_fence(bool nt) {
#if defined(__SSE2__)
  if (nt) _mm_sfence();
#else
  (void)nt;
#endif
}

size_t elem_size(int32_t dt) { return dt == kF64 ? 8 : (dt == kF32 ? 4 : 2); }

// ---------------------------------------------------------------------------------- work items
struct Item {
  int64_t row;
  int64_t begin;
  int64_t end;
};

// Items of the rows r (in row order) with use(r); *total = their element count.
template <class Row, class Pred>
std::vector<Item> make_items(const Row* rows, int64_t nrows, Pred use, int64_t* total) {
  std::vector<Item> items;
  int64_t tot = 0;
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t n = rows[r].numel;
    if (n == 0 || !use(r)) continue;
    tot += n;
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({r, b, std::min(n, b + kChunk)});
  }
  *total = tot;
  return items;
}

// f(item, index) for every item, in parallel when the call is big enough.
template <class F>
void for_items(const std::vector<Item>& items, int64_t total, int nthreads, F&& f) {
  const int64_t n = static_cast<int64_t>(items.size());
  const int nt = total >= kParallelMin ? static_cast<int>(std::min<int64_t>(std::max(nthreads, 1), n)) : 1;
  if (nt <= 1) {
    for (int64_t k = 0; k < n; ++k) f(items[k], k);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t k = 0; k < n; ++k) f(items[k], k);
}

// ------------------------------------------------------------------------------ K1: norm part
// u = T * d, d = g - sigma * m (FS) or g, T = |w| + eta (AD) or 1.
template <class Tag, bool FS, bool AD>
inline typename IO<Tag>::C u_at(const typename IO<Tag>::S* g, const typename IO<Tag>::S* m,
                                const typename IO<Tag>::S* w, typename IO<Tag>::C sigma,
                                typename IO<Tag>::C eta, int64_t i) {
  using io = IO<Tag>;
  auto u = io::ld(g, i);
  if constexpr (FS) u = u - sigma * io::ld(m, i);
  if constexpr (AD) u = u * (std::fabs(io::ld(w, i)) + eta);
  return u;
}

// |u| in float64 for float32/bf16/fp16 data, as fastsam.reference forms it: T = |w| + eta and
// d = g - sigma m in float64, u = T d (no overflow for any finite input: |u| < 3.4e38^2 (1 + |sigma|)).
template <class Tag, bool FS, bool AD>
inline double u64_at(const typename IO<Tag>::S* g, const typename IO<Tag>::S* m, const typename IO<Tag>::S* w,
                     double sigma, double eta, int64_t i) {
  using io = IO<Tag>;
  double u = static_cast<double>(io::ld(g, i));
  if constexpr (FS) u = u - sigma * static_cast<double>(io::ld(m, i));
  if constexpr (AD) u = u * (std::fabs(static_cast<double>(io::ld(w, i))) + eta);
  return u;
}

// u of float64 data split as |u| = mu * 2^ku (mu in [0.5, 1), 0 for u = 0; NaN / inf for non-finite
// inputs), never overflowing: d = g - sigma m is taken as (g 2^-sh - (sigma 2^-sh) m) 2^sh where it
// overflows, and T * d as the product of the mantissas with the exponents added.
template <bool FS, bool AD>
inline void split_at(const double* g, const double* m, const double* w, double sigma, double eta, int sh, int64_t i,
                     double* mu, int* ku, double* sgn) {
  double d = g[i];
  int kd = 0;
  if constexpr (FS) {
    d = g[i] - sigma * m[i];
    if (!std::isfinite(d) && std::isfinite(g[i]) && std::isfinite(m[i])) {
      const double c = std::ldexp(1.0, -sh);
      d = g[i] * c - (sigma * c) * m[i];
      kd = sh;
    }
  }
  *sgn = d > 0.0 ? 1.0 : (d < 0.0 ? -1.0 : d);  // +-0 keep their sign
  int k1 = 0;
  double md = std::frexp(std::fabs(d), &k1);
  kd += k1;
  if constexpr (AD) {
    int kt = 0, k2 = 0;
    const double mt = std::frexp(std::fabs(w[i]) + eta, &kt);
    md = std::frexp(mt * md, &k2);  // in [0.25, 1): exact renormalization
    kd += kt + k2;
  }
  *mu = md;
  *ku = kd;
}

// One term of a general-q scaled sum: |u|^q / 2^(q F) = 2^(q (log2(x) - ff)), x = |u| 2^-floor(F),
// ff = F - floor(F) (0 for x = 0; NaN / inf propagate).
inline double q_term(double x, double q, double ff) { return x != 0.0 ? std::exp2(q * (std::log2(x) - ff)) : 0.0; }

// Scaled sum over [b, e) of |u|^q with |u| = absu(i) a double: pass 1 finds the max (from cache
// in pass 2), then the terms relative to it (kernels.h Scaled).
template <int QM, class AbsU>
Scaled scaled_sum(int64_t b, int64_t e, double q, AbsU absu) {
  double mx = 0.0;
  bool bad = false;
  for (int64_t i = b; i < e; ++i) {
    const double a = absu(i);
    bad = bad || !std::isfinite(a);
    mx = a > mx ? a : mx;
  }
  if (bad) return Scaled{NAN, 0.0};
  if (mx == 0.0) return Scaled{0.0, -INFINITY};
  double acc = 0.0;
  if constexpr (QM == 0) {
    const double F = log_scale(std::log2(mx)), fi = std::floor(F), ff = F - fi;
    const Pow2Scale inv(fi);
    for (int64_t i = b; i < e; ++i) acc += q_term(inv(absu(i)), q, ff);
    return Scaled{acc, F};
  } else {
    int k = 0;
    std::frexp(mx, &k);
    k = std::max(k, -1000);
    const double inv = std::ldexp(1.0, -k);  // k <= 1024: 2^-1024 is a (subnormal) double, exactly
    for (int64_t i = b; i < e; ++i) {
      const double a = absu(i) * inv;
      acc += QM == 2 ? a * a : a;
    }
    return Scaled{acc, static_cast<double>(k)};
  }
}

// The same for float64 data whose u overflowed: |u| = mu * 2^ku (split_at).
template <int QM, bool FS, bool AD>
Scaled split_sum(const PerturbRow& r, int64_t b, int64_t e, const PerturbScalars& s) {
  const double* g = static_cast<const double*>(r.g);
  const double* m = static_cast<const double*>(r.ema);
  const double* w = static_cast<const double*>(r.w);
  const int sh = fsam_shift(s.sigma);
  double mmax = 0.0, sg = 0.0;
  int kmax = 0;
  bool bad = false;
  for (int64_t i = b; i < e; ++i) {
    double mu = 0.0;
    int ku = 0;
    split_at<FS, AD>(g, m, w, s.sigma, r.eta, sh, i, &mu, &ku, &sg);
    bad = bad || !std::isfinite(mu);
    if (mu != 0.0 && (mmax == 0.0 || ku > kmax || (ku == kmax && mu > mmax))) {
      mmax = mu;
      kmax = ku;
    }
  }
  if (bad) return Scaled{NAN, 0.0};
  if (mmax == 0.0) return Scaled{0.0, -INFINITY};
  const double F = QM == 0 ? log_scale(kmax + std::log2(mmax)) : static_cast<double>(kmax);
  const double fi = std::floor(F), ff = F - fi;
  double acc = 0.0;
  for (int64_t i = b; i < e; ++i) {
    double mu = 0.0;
    int ku = 0;
    split_at<FS, AD>(g, m, w, s.sigma, r.eta, sh, i, &mu, &ku, &sg);
    const double x = std::ldexp(mu, ku - static_cast<int>(fi));
    acc += QM == 0 ? q_term(x, s.q, ff) : (QM == 2 ? x * x : x);
  }
  return Scaled{acc, F};
}

// Sum over [b, e) of |u|^q as (S, E) (kernels.h Scaled).
// * float32/bf16/fp16 data, q = 1, 2: float64 sums of float32 values (E = 0), the single-pass
//   vectorized loop; where T * d or g - sigma m overflowed float32 (a non-finite sum from finite
//   inputs), the item again with u in float64 (u64_at, scaled: E up to ~260).
// * float32/bf16/fp16 data, general q: u in float64, scaled sum (a second pass over the item, from
//   cache).
// * float64 data: u in float64, scaled sum; where u overflowed, the item again split (split_sum).
template <class Tag, int QM, bool FS, bool AD>
Scaled norm_item(const PerturbRow& r, int64_t b, int64_t e, const PerturbScalars& s) {
  using io = IO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  const S* g = static_cast<const S*>(r.g);
  const S* m = static_cast<const S*>(r.ema);
  const S* w = static_cast<const S*>(r.w);
  const C sigma = static_cast<C>(s.sigma);
  const C eta = static_cast<C>(r.eta);
  constexpr bool kF64 = std::is_same<Tag, double>::value;
  if constexpr (kF64) {
    const Scaled v = scaled_sum<QM>(b, e, s.q, [&](int64_t i) {
      return std::fabs(u_at<Tag, FS, AD>(g, m, w, sigma, eta, i));
    });
    if constexpr (FS || AD) {
      if (!std::isfinite(v.s)) return split_sum<QM, FS, AD>(r, b, e, s);  // overflow, or a real NaN / inf
    }
    return v;
  } else if constexpr (QM == 0) {
    return scaled_sum<QM>(b, e, s.q, [&](int64_t i) {
      return std::fabs(u64_at<Tag, FS, AD>(g, m, w, s.sigma, r.eta, i));
    });
  } else {
    double acc = 0.0;
    // kStreams interleaved sub-ranges of the item: one core then has kStreams sequential read
    // streams in flight instead of one (a single stream of g alone is latency-bound)
    const int64_t len = e - b;
    const int64_t q = (len / kStreams) & ~int64_t{15};  // 16-element aligned sub-range length
    auto val = [&](int64_t i) -> double {
      const double ud = static_cast<double>(u_at<Tag, FS, AD>(g, m, w, sigma, eta, i));
      if constexpr (QM == 2) {
        return ud * ud;
      } else {
        return std::fabs(ud);
      }
    };
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < q; ++j) {
      for (int k = 0; k < kStreams; ++k) acc += val(b + k * q + j);
    }
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b + kStreams * q; i < e; ++i) acc += val(i);
    if constexpr (FS || AD) {
      if (!std::isfinite(acc)) {  // overflow in float32 (or a real NaN / inf: it stays)
        return scaled_sum<QM>(b, e, s.q, [&](int64_t i) {
          return std::fabs(u64_at<Tag, FS, AD>(g, m, w, s.sigma, r.eta, i));
        });
      }
    }
    return Scaled{acc, 0.0};
  }
}

template <class Tag, int QM>
Scaled norm_dispatch_fs(const PerturbRow& r, int64_t b, int64_t e, const PerturbScalars& s) {
  const bool fs = s.fsam && r.ready_now;
  if (fs) {
    return r.adaptive ? norm_item<Tag, QM, true, true>(r, b, e, s) : norm_item<Tag, QM, true, false>(r, b, e, s);
  }
  return r.adaptive ? norm_item<Tag, QM, false, true>(r, b, e, s) : norm_item<Tag, QM, false, false>(r, b, e, s);
}

template <class Tag>
Scaled norm_dispatch(const PerturbRow& r, int64_t b, int64_t e, const PerturbScalars& s) {
  switch (s.qmode) {
    case 2: return norm_dispatch_fs<Tag, 2>(r, b, e, s);
    case 1: return norm_dispatch_fs<Tag, 1>(r, b, e, s);
    default: return norm_dispatch_fs<Tag, 0>(r, b, e, s);
  }
}

// ----------------------------------------------------------------------------- K2: perturbation
// FS: 0 F-SAM off, 1 F-SAM on and the tensor's EMA not ready (d = g, m' = g), 2 ready
// (d = g - sigma * m, m' = lam * m + (1 - lam) * g); m is read from ema, m' written to ema_out.
// e = rho T sign(u) |u|^(q-1) / (N^(q-1) + 1e-12) from the scaled norm (kernels.h DualNorm):
// q = 2: (rho / denom) * (u inv) * T; p = inf: rho fac sign(u) T;
// general q: rho fac sign(u) 2^((q-1) (log2(|u| 2^-fi) - c0)) T, in float64 with u as fastsam.reference
// forms it (float32 data: u64_at; float64 data: u, or split_at on a wide call);
// q = 2 on a wide call (row_wide): rho T sign(u) (|u| 2^-e2w) / denom_w in float64 (u64_at / split_at).
template <class Tag, int QM, int FS, bool SWP>
void apply_item(const PerturbRow& r, int64_t b, int64_t e, const PerturbScalars& s, const DualNorm& dn) {
  using io = IO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  constexpr bool kF64 = std::is_same<Tag, double>::value;
  S* w = static_cast<S*>(r.w);
  const S* g = static_cast<const S*>(r.g);
  const S* m = static_cast<const S*>(r.ema);
  S* mo = static_cast<S*>(r.ema_out);
  const bool nt = s.nt != 0;
  // the per-row factor in float64, rounded once: a multiply per element instead of a divide
  // (AVX2 divides 8 floats per ~5 cycles, which alone would cap one core near the bandwidth)
  const C scale = static_cast<C>(QM == 2 ? r.rho / dn.denom : r.rho * dn.fac);
  const C inv = static_cast<C>(dn.inv);  // a power of two: u * inv is exact
  const C eta = static_cast<C>(r.eta);
  const C sigma = static_cast<C>(s.sigma);
  const C lam = static_cast<C>(s.lam);
  const C one_m_lam = static_cast<C>(1.0 - s.lam);
  const C inv_beta = static_cast<C>(1.0 / s.beta);
  const double qm1 = s.q - 1.0;
  const bool ad = r.adaptive != 0;
  const bool wide = row_wide(dn, QM, kF64);
  const int sh = fsam_shift(s.sigma);
  // wide q = 2 / general q: the scale of |u| (2^-e2w / 2^-fi) and the float64 factor
  const double wk = QM == 2 ? dn.e2w : dn.fi;
  const double wfac = QM == 2 ? r.rho / dn.denom_w : r.rho * dn.fac;
  const Pow2Scale winv(wk);
  alignas(64) uint8_t keep[kSub];
  for (int64_t sb = b; sb < e; sb += kSub) {
    const int64_t len = std::min(kSub, e - sb);
    copy_bytes(static_cast<S*>(r.w_old) + sb, w + sb, len * sizeof(S), nt, g + sb);
    if (r.g_old != nullptr) copy_bytes(static_cast<S*>(r.g_old) + sb, g + sb, len * sizeof(S), nt);
    if constexpr (SWP) {
      const uint64_t base = static_cast<uint64_t>(r.offset + sb);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        keep[j] = esam_keep(base + static_cast<uint64_t>(j), s.seed, s.step, s.threshold) ? 1 : 0;
      }
    }
    S* wp = w + sb;
    const S* gp = g + sb;
    const S* mp = FS == 2 ? m + sb : nullptr;
    S* mop = FS ? mo + sb : nullptr;
    if (QM == 0 || (QM == 2 && wide)) {
      // float64 per element; not vectorized (general q: pow; wide: rare)
      for (int64_t j = 0; j < len; ++j) {
        const C wv = io::ld(wp, j), gv = io::ld(gp, j);
        C mv = C(0);
        if constexpr (FS == 2) mv = io::ld(mp, j);
        const double T = ad ? std::fabs(static_cast<double>(wv)) + r.eta : 1.0;
        double x = 0.0, sg = 0.0;  // |u| 2^-wk and sign(u)
        bool split = false;
        if constexpr (kF64) {
          if (wide) {  // u may overflow float64: mantissa and exponent
            double mu = 0.0;
            int ku = 0;
            if (ad) {
              split_at<FS == 2, true>(gp, mp, wp, s.sigma, r.eta, sh, j, &mu, &ku, &sg);
            } else {
              split_at<FS == 2, false>(gp, mp, wp, s.sigma, r.eta, sh, j, &mu, &ku, &sg);
            }
            x = std::ldexp(mu, ku - static_cast<int>(wk));
            split = true;
          }
        }
        if (!split) {  // u as u_at (float64 data) / u64_at (others) forms it
          double d = static_cast<double>(gv);
          if constexpr (FS == 2) {
            d = kF64 ? static_cast<double>(gv - sigma * mv) : d - s.sigma * static_cast<double>(mv);
          }
          const double u = d * T;
          sg = u > 0.0 ? 1.0 : (u < 0.0 ? -1.0 : u);  // +-0 keep their sign (w + -0.0 = w)
          x = winv(std::fabs(u));
        }
        const double mag = QM == 0 ? (x != 0.0 ? std::exp2(qm1 * (std::log2(x) - dn.c0)) : 0.0) : x;  // <= 1
        C ev = static_cast<C>(wfac * sg * mag * T);
        if constexpr (SWP) ev = keep[j] ? ev * inv_beta : C(0);
        io::st(wp, j, wv + ev);
        if constexpr (FS == 1) io::st(mop, j, gv);
        if constexpr (FS == 2) io::st(mop, j, lam * mv + one_m_lam * gv);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const C wv = io::ld(wp, j), gv = io::ld(gp, j);
        C u = gv, mv = C(0);
        if constexpr (FS == 2) {
          mv = io::ld(mp, j);
          u = gv - sigma * mv;
        }
        const C T = ad ? std::fabs(wv) + eta : C(1);  // x * 1 is exact: non-adaptive rows unchanged
        u = u * T;
        C mag;
        if constexpr (QM == 2) {
          mag = u * inv;
        } else {
          // sign(u) from two compares, branch-free: a ternary here compiled to a scalar loop with an
          // unpredictable branch per element (p = inf first step 570 ms -> see bench/NOTES.md)
          mag = static_cast<C>(u > C(0)) - static_cast<C>(u < C(0));
        }
        C ev = scale * mag * T;
        if constexpr (SWP) ev = keep[j] ? ev * inv_beta : C(0);
        io::st(wp, j, wv + ev);
        if constexpr (FS == 1) io::st(mop, j, gv);
        if constexpr (FS == 2) io::st(mop, j, lam * mv + one_m_lam * gv);
      }
    }
  }
}

template <class Tag, int QM, int FS>
void apply_dispatch_swp(const PerturbRow& r, int64_t b, int64_t e, const PerturbScalars& s, const DualNorm& d) {
  if (s.swp) {
    apply_item<Tag, QM, FS, true>(r, b, e, s, d);
  } else {
    apply_item<Tag, QM, FS, false>(r, b, e, s, d);
  }
}

template <class Tag, int QM>
void apply_dispatch_fs(const PerturbRow& r, int64_t b, int64_t e, const PerturbScalars& s, const DualNorm& d) {
  if (!s.fsam) {
    apply_dispatch_swp<Tag, QM, 0>(r, b, e, s, d);
  } else if (!r.ready_now) {
    apply_dispatch_swp<Tag, QM, 1>(r, b, e, s, d);
  } else {
    apply_dispatch_swp<Tag, QM, 2>(r, b, e, s, d);
  }
}

template <class Tag>
void apply_dispatch(const PerturbRow& r, int64_t b, int64_t e, const PerturbScalars& s, const DualNorm& d) {
  switch (s.qmode) {
    case 2: apply_dispatch_fs<Tag, 2>(r, b, e, s, d); break;
    case 1: apply_dispatch_fs<Tag, 1>(r, b, e, s, d); break;
    default: apply_dispatch_fs<Tag, 0>(r, b, e, s, d); break;
  }
}

// --------------------------------------------------------------------------- K3: second step
struct StepConst {
  double coef;   // GSAM: g <- coef * gs - alpha * g_old (mix: coef = c1, alpha = -c2)
  double alpha;
  bool nesterov, maximize, decoupled, nt;
  bool writeback;  // SGD / Adam: the combined gradient is stored back into g
  bool correct;    // then w <- w - corr * (g - g_old) (decoupled WSAM)
  double corr;
};

// torch.optim.SGD (see fastsam.reference.sam_restore_sgd_), restore and GSAM fused in.
template <class Tag, bool GS, bool MOM, bool FRESH>
void sgd_item(const StepRow& r, int64_t b, int64_t e, const StepConst& k) {
  using io = IO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  S* w = static_cast<S*>(r.w);
  const S* src = r.w_old != nullptr ? static_cast<const S*>(r.w_old) : w;
  S* g = static_cast<S*>(r.g);
  const S* go = static_cast<const S*>(r.g_old);
  S* buf = static_cast<S*>(r.s1);
  const C lr = static_cast<C>(r.hyp[0]), wd = static_cast<C>(r.hyp[1]);
  const C mom = static_cast<C>(r.hyp[2]), one_m_damp = static_cast<C>(r.hyp[3]);
  const C coef = static_cast<C>(k.coef), alpha = static_cast<C>(k.alpha), corr = static_cast<C>(k.corr);
  const bool has_wd = r.hyp[1] != 0.0, maximize = k.maximize, nesterov = k.nesterov;
  const bool stream = k.nt && r.w_old != nullptr;  // w is only written: stream it
  alignas(64) S tmp[kSub];
  for (int64_t sb = b; sb < e; sb += kSub) {
    const int64_t len = std::min(kSub, e - sb);
    S* out = stream ? tmp : w + sb;
    const S* sp = src + sb;
    S* gp = g + sb;
    const S* gop = GS ? go + sb : nullptr;
    S* bp = MOM ? buf + sb : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const C wv = io::ld(sp, j);
      C gv = io::ld(gp, j);
      const C graw = gv;
      if constexpr (GS) {
        gv = coef * gv - alpha * io::ld(gop, j);
        if (k.writeback) io::st(gp, j, gv);  // .grad holds the combined gradient, as on the unfused path
      }
      gv = maximize ? -gv : gv;
      gv = has_wd ? gv + wd * wv : gv;
      if constexpr (MOM) {
        C bv;
        if constexpr (FRESH) {
          bv = gv;
        } else {
          bv = mom * io::ld(bp, j) + one_m_damp * gv;
        }
        io::st(bp, j, bv);
        gv = nesterov ? gv + mom * bv : bv;
      }
      C wn = wv - lr * gv;
      if constexpr (GS) {
        if (k.correct) wn = wn - corr * (graw - io::ld(gop, j));  // decoupled WSAM, after the update
      }
      io::st(out, j, wn);
    }
    if (stream) copy_bytes(w + sb, tmp, len * sizeof(S), true);
  }
}

// torch.optim.Adam / AdamW (see fastsam.reference.sam_restore_adam_), restore and GSAM fused in.
template <class Tag, bool GS, bool AMS>
void adam_item(const StepRow& r, int64_t b, int64_t e, const StepConst& k) {
  using io = IO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  S* w = static_cast<S*>(r.w);
  const S* src = r.w_old != nullptr ? static_cast<const S*>(r.w_old) : w;
  S* g = static_cast<S*>(r.g);
  const S* go = static_cast<const S*>(r.g_old);
  S* ms = static_cast<S*>(r.s1);
  S* vs = static_cast<S*>(r.s2);
  S* vms = static_cast<S*>(r.s3);
  const C wd = static_cast<C>(r.hyp[0]), one_m_b1 = static_cast<C>(r.hyp[1]);
  const C b2 = static_cast<C>(r.hyp[2]), one_m_b2 = static_cast<C>(r.hyp[3]);
  const C eps = static_cast<C>(r.hyp[4]), step_size = static_cast<C>(r.hyp[5]);
  // 1 / sqrt(1 - beta2^t) as a multiplier: one divide per element (m / denom) instead of two
  const C inv_bc2_sqrt = static_cast<C>(1.0 / r.hyp[6]), decay = static_cast<C>(r.hyp[7]);
  const C coef = static_cast<C>(k.coef), alpha = static_cast<C>(k.alpha), corr = static_cast<C>(k.corr);
  const bool has_wd = r.hyp[0] != 0.0;
  const bool dec = has_wd && k.decoupled, coupled = has_wd && !k.decoupled, maximize = k.maximize;
  const bool stream = k.nt && r.w_old != nullptr;
  alignas(64) S tmp[kSub];
  for (int64_t sb = b; sb < e; sb += kSub) {
    const int64_t len = std::min(kSub, e - sb);
    S* out = stream ? tmp : w + sb;
    const S* sp = src + sb;
    S* gp = g + sb;
    const S* gop = GS ? go + sb : nullptr;
    S* mp = ms + sb;
    S* vp = vs + sb;
    S* vmp = AMS ? vms + sb : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      C wv = io::ld(sp, j);
      C gv = io::ld(gp, j);
      const C graw = gv;
      if constexpr (GS) {
        gv = coef * gv - alpha * io::ld(gop, j);
        if (k.writeback) io::st(gp, j, gv);
      }
      gv = maximize ? -gv : gv;
      wv = dec ? wv * decay : wv;
      gv = coupled ? gv + wd * wv : gv;
      C mv = io::ld(mp, j);
      C vv = io::ld(vp, j);
      mv = mv + one_m_b1 * (gv - mv);
      vv = b2 * vv + one_m_b2 * (gv * gv);
      io::st(mp, j, mv);
      io::st(vp, j, vv);
      if constexpr (AMS) {
        const C vm = io::ld(vmp, j);
        vv = vm > vv ? vm : vv;
        io::st(vmp, j, vv);
      }
      C wn = wv - step_size * (mv / (std::sqrt(vv) * inv_bc2_sqrt + eps));
      if constexpr (GS) {
        if (k.correct) wn = wn - corr * (graw - io::ld(gop, j));  // decoupled WSAM, after the update
      }
      io::st(out, j, wn);
    }
    if (stream) copy_bytes(w + sb, tmp, len * sizeof(S), true);
  }
}

// GSAM combine without an update: g <- coef * g - alpha * g_old.
template <class Tag>
void combine_item(const StepRow& r, int64_t b, int64_t e, const StepConst& k) {
  using io = IO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  S* g = static_cast<S*>(r.g);
  const S* go = static_cast<const S*>(r.g_old);
  const C coef = static_cast<C>(k.coef), alpha = static_cast<C>(k.alpha);
#pragma omp simd
  for (int64_t i = b; i < e; ++i) io::st(g, i, coef * io::ld(g, i) - alpha * io::ld(go, i));
}

// m-SAM micro-batch (see fastsam.reference.sam_restore_accumulate_): w <- w_old (when perturbed),
// acc <- scale * ((0 if reset else acc) + weight * g), g GSAM-combined (not written back), 0 without g.
template <class Tag, bool GS, bool HAS_G, bool RESET>
void accum_item(const StepRow& r, int64_t b, int64_t e, const StepConst& k) {
  using io = IO<Tag>;
  using S = typename io::S;
  using C = typename io::C;
  S* acc = static_cast<S*>(r.s1);
  const S* acc_in = r.s2 != nullptr ? static_cast<const S*>(r.s2) : acc;
  const S* g = static_cast<const S*>(r.g);
  const S* go = static_cast<const S*>(r.g_old);
  const C weight = static_cast<C>(r.hyp[0]), scale = static_cast<C>(r.hyp[1]);
  const C coef = static_cast<C>(k.coef), alpha = static_cast<C>(k.alpha);
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    C v = C(0);
    if constexpr (HAS_G) {
      C gv = io::ld(g, i);
      if constexpr (GS) gv = coef * gv - alpha * io::ld(go, i);
      v = weight * gv;
    }
    if constexpr (!RESET) v = io::ld(acc_in, i) + v;
    io::st(acc, i, scale * v);
  }
}

template <class Tag>
void accum_dispatch(const StepRow& r, int64_t b, int64_t e, bool gs, const StepConst& k) {
  if (r.w_old != nullptr) {
    const size_t es = sizeof(typename IO<Tag>::S);
    copy_bytes(static_cast<char*>(r.w) + b * es, static_cast<const char*>(r.w_old) + b * es, (e - b) * es, k.nt);
  }
  if (r.s1 == nullptr) return;
  const bool reset = r.fresh != 0;
  if (r.g == nullptr) {
    if (reset) accum_item<Tag, false, false, true>(r, b, e, k);
    else accum_item<Tag, false, false, false>(r, b, e, k);
  } else if (gs) {
    if (reset) accum_item<Tag, true, true, true>(r, b, e, k);
    else accum_item<Tag, true, true, false>(r, b, e, k);
  } else {
    if (reset) accum_item<Tag, false, true, true>(r, b, e, k);
    else accum_item<Tag, false, true, false>(r, b, e, k);
  }
}

// GSAM partial sums of one item. float64 sums of float32-range values cannot overflow
// (es = eo = 0); float64 tensors are scaled by 2^-es / 2^-eo just above their max |.| (a second
// pass over the item, from cache).
template <class Tag>
GsamSums gsam_sums_item(const StepRow& r, int64_t b, int64_t e) {
  using io = IO<Tag>;
  using S = typename io::S;
  const S* g = static_cast<const S*>(r.g);
  const S* go = static_cast<const S*>(r.g_old);
  double is = 1.0, io_ = 1.0, es = 0.0, eo = 0.0;
  if constexpr (std::is_same<Tag, double>::value) {
    double ms = 0.0, mo = 0.0;
    for (int64_t i = b; i < e; ++i) {
      ms = std::max(ms, std::fabs(static_cast<double>(io::ld(g, i))));
      mo = std::max(mo, std::fabs(static_cast<double>(io::ld(go, i))));
    }
    int ks = 0, ko = 0;
    if (std::isfinite(ms) && ms > 0.0) std::frexp(ms, &ks);
    if (std::isfinite(mo) && mo > 0.0) std::frexp(mo, &ko);
    ks = std::max(ks, -1000);
    ko = std::max(ko, -1000);
    es = ks;
    eo = ko;
    is = std::ldexp(1.0, -ks);
    io_ = std::ldexp(1.0, -ko);
  }
  double dot = 0.0, ssn = 0.0, sso = 0.0;
#pragma omp simd reduction(+ : dot, ssn, sso)
  for (int64_t i = b; i < e; ++i) {
    const double x = static_cast<double>(io::ld(g, i)) * is, y = static_cast<double>(io::ld(go, i)) * io_;
    dot += x * y;
    ssn += x * x;
    sso += y * y;
  }
  return GsamSums{dot, ssn, sso, es, eo};
}

template <class Tag>
void step_item(const StepRow& r, int64_t b, int64_t e, const StepScalars& s, const StepConst& k) {
  const bool gs = s.gsam && r.g != nullptr && r.g_old != nullptr;
  if (s.mode == kModeCombine) {
    if (gs) combine_item<Tag>(r, b, e, k);
    return;
  }
  if (s.mode == kModeAccum) {
    accum_dispatch<Tag>(r, b, e, gs, k);
    return;
  }
  if (r.g == nullptr || s.mode == kModeRestore) {
    if (r.w_old != nullptr) {
      const size_t es = sizeof(typename IO<Tag>::S);
      copy_bytes(static_cast<char*>(r.w) + b * es, static_cast<const char*>(r.w_old) + b * es, (e - b) * es, k.nt);
    }
    if (s.mode == kModeRestore && gs) combine_item<Tag>(r, b, e, k);
    return;
  }
  if (s.mode == kModeSGD) {
    const bool mom = r.hyp[2] != 0.0;
    if (gs) {
      if (!mom) sgd_item<Tag, true, false, false>(r, b, e, k);
      else if (r.fresh) sgd_item<Tag, true, true, true>(r, b, e, k);
      else sgd_item<Tag, true, true, false>(r, b, e, k);
    } else {
      if (!mom) sgd_item<Tag, false, false, false>(r, b, e, k);
      else if (r.fresh) sgd_item<Tag, false, true, true>(r, b, e, k);
      else sgd_item<Tag, false, true, false>(r, b, e, k);
    }
  } else {
    if (gs) {
      if (s.amsgrad) adam_item<Tag, true, true>(r, b, e, k);
      else adam_item<Tag, true, false>(r, b, e, k);
    } else {
      if (s.amsgrad) adam_item<Tag, false, true>(r, b, e, k);
      else adam_item<Tag, false, false>(r, b, e, k);
    }
  }
}

}  // namespace

// ================================================================================ entry points
Scaled perturb_norm(const PerturbRow* rows, int64_t n, const PerturbScalars& s, int nthreads) {
  int64_t total = 0;
  const auto items = make_items(rows, n, [](int64_t) { return true; }, &total);
  std::vector<Scaled> part(items.size(), Scaled{0.0, -INFINITY});
  for_items(items, total, nthreads, [&](const Item& it, int64_t k) {
    const PerturbRow& r = rows[it.row];
    Scaled v;
    switch (r.dtype) {
      case kF32: v = norm_dispatch<float>(r, it.begin, it.end, s); break;
      case kF64: v = norm_dispatch<double>(r, it.begin, it.end, s); break;
      case kBF16: v = norm_dispatch<bf16_t>(r, it.begin, it.end, s); break;
      default: v = norm_dispatch<f16_t>(r, it.begin, it.end, s); break;
    }
    part[k] = v;
  });
  Scaled acc{0.0, -INFINITY};
  for (const Scaled& v : part) acc = scaled_add(acc, v, s.q);  // item order: independent of threads
  return acc;
}

void perturb_apply(const PerturbRow* rows, int64_t n, const PerturbScalars& s, const DualNorm& d, int nthreads) {
  int64_t total = 0;
  const auto items = make_items(rows, n, [](int64_t) { return true; }, &total);
  const bool nt = s.nt != 0;
  for_items(items, total, nthreads, [&](const Item& it, int64_t) {
    const PerturbRow& r = rows[it.row];
    if (!d.finite) {  // nothing is perturbed: w_old <- w, g_old <- 0, ema_out <- ema
      const size_t es = elem_size(r.dtype);
      const size_t off = it.begin * es, len = (it.end - it.begin) * es;
      copy_bytes(static_cast<char*>(r.w_old) + off, static_cast<const char*>(r.w) + off, len, nt);
      if (r.g_old != nullptr) std::memset(static_cast<char*>(r.g_old) + off, 0, len);
      if (r.ema_out != nullptr && r.ema_out != r.ema) {
        std::memcpy(static_cast<char*>(r.ema_out) + off, static_cast<const char*>(r.ema) + off, len);
      }
    } else {
      switch (r.dtype) {
        case kF32: apply_dispatch<float>(r, it.begin, it.end, s, d); break;
        case kF64: apply_dispatch<double>(r, it.begin, it.end, s, d); break;
        case kBF16: apply_dispatch<bf16_t>(r, it.begin, it.end, s, d); break;
        default: apply_dispatch<f16_t>(r, it.begin, it.end, s, d); break;
      }
    }
    stream_fence(nt);
  });
}

GsamSums gsam_sums(const StepRow* rows, int64_t n, int nthreads) {
  int64_t total = 0;
  const auto items = make_items(
      rows, n, [&](int64_t r) { return rows[r].g != nullptr && rows[r].g_old != nullptr; },
      &total);
  std::vector<GsamSums> part(items.size());
  for_items(items, total, nthreads, [&](const Item& it, int64_t k) {
    const StepRow& r = rows[it.row];
    switch (r.dtype) {
      case kF32: part[k] = gsam_sums_item<float>(r, it.begin, it.end); break;
      case kF64: part[k] = gsam_sums_item<double>(r, it.begin, it.end); break;
      case kBF16: part[k] = gsam_sums_item<bf16_t>(r, it.begin, it.end); break;
      default: part[k] = gsam_sums_item<f16_t>(r, it.begin, it.end); break;
    }
  });
  GsamSums out{0.0, 0.0, 0.0, -INFINITY, -INFINITY};
  for (const GsamSums& p : part) out = gsam_add(out, p);  // item order
  return out;
}

void second_step(const StepRow* rows, int64_t n, const StepScalars& s, double coef, int nthreads) {
  int64_t total = 0;
  const auto items = make_items(rows, n, [](int64_t) { return true; }, &total);
  // mix: (c1, c2) read here (CPU memory), g <- c1 * gs - (-c2) * g_old
  const double alpha = s.mix ? -s.mixc[1] : s.alpha;
  const StepConst k{s.mix ? s.mixc[0] : coef, alpha, s.nesterov != 0, s.maximize != 0, s.decoupled != 0, s.nt != 0,
                    s.writeback != 0, s.correct != 0, s.correct ? s.mixc[2] : 0.0};
  for_items(items, total, nthreads, [&](const Item& it, int64_t) {
    const StepRow& r = rows[it.row];
    switch (r.dtype) {
      case kF32: step_item<float>(r, it.begin, it.end, s, k); break;
      case kF64: step_item<double>(r, it.begin, it.end, s, k); break;
      case kBF16: step_item<bf16_t>(r, it.begin, it.end, s, k); break;
      default: step_item<f16_t>(r, it.begin, it.end, s, k); break;
    }
    stream_fence(k.nt);
  });
}

}  // namespace cpu
}  // namespace fastsam
