// Plain-C++ interface between the op layer (ops_*.cpp: torch tensors, validation, registration)
// and the kernels (cpu_kernels.cpp, cuda_kernels.cu). Nothing here includes torch, so the kernel
// translation units compile in seconds and in parallel with the heavy torch headers.
//
// A "row" describes one tensor of an op's lists: raw data pointers (nullptr = no entry), its
// element count, and its per-tensor options. Rows of one call may mix storage dtypes; every row's
// companion tensors (grad, w_old, state) have the row's dtype and element count (checked by the
// op layer), and all tensors are contiguous (row-major element index = memory index).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastsam_common.h"

namespace fastsam {

enum DType : int32_t { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

// ---------------------------------------------------------------------------------- first step
struct PerturbRow {
  void* w;            // parameter, updated in place: w <- w + e
  const void* g;      // gradient
  void* w_old;        // receives an exact copy of w
  void* ema;          // F-SAM EMA m, read (nullptr when F-SAM is off)
  void* ema_out;      // F-SAM: receives m' (== ema: in place; else the caller keeps m for a rollback)
  void* g_old;        // GSAM copy of g (nullptr when GSAM is off)
  float* ready;       // F-SAM 0-dim float32 flag, read (nullptr when F-SAM is off)
  float* ready_out;   // F-SAM: receives the new flag (may be == ready)
  int64_t numel;
  int64_t offset;     // global element index of element 0 (ESAM mask counter)
  double rho;
  double eta;
  int32_t dtype;      // DType
  int32_t adaptive;   // 1: T = |w| + eta, else T = 1
  int32_t ready_now;  // CPU: snapshot of *ready taken before the op (0 / 1)
  int32_t vec;        // CUDA: every pointer of the row is 16-byte aligned (vector loads/stores)
};

struct PerturbScalars {
  double q;            // dual exponent p / (p - 1); 1 for p = inf
  int32_t qmode;       // 2: q == 2, 1: q == 1, 0: general q
  int32_t fsam;        // F-SAM on (rows carry ema / ready)
  double sigma;        // F-SAM: d = g - sigma * m
  double lam;          // F-SAM: m <- lam * m + (1 - lam) * g
  double beta;         // ESAM keep probability (swp off when >= 1)
  uint32_t seed;       // ESAM Philox key word 0
  uint32_t step;       // ESAM Philox key word 1
  uint32_t threshold;  // floor(beta * 2^32), valid when swp
  int32_t swp;         // ESAM stochastic weight perturbation on
  int32_t nt;          // CPU: non-temporal stores for w_old / g_old (large calls)
  int32_t pad_;
};

// Scaled norms (see fastsam/reference.py "Scaled norms"). A sum of |u|^q overflows long before the
// norm does (float64: |u|^21 > 1.8e308 at p = 1.05; |u|^2 at |u| > 1.3e154), so reductions return
// (S, E) with the sum = S * 2^(q E):
// * q = 1, 2: the terms are |u * 2^-E|^2 or |u * 2^-E|, 2^E a power of two just above the max (exact
//   scaling). float32-stored tensors need no scaling in float64 sums (|u| <= 3.4e38) and use E = 0.
// * general q: E = F is the max's log2 rounded down to a multiple of 2^-15 (log_scale), so the
//   largest term 2^(q (log2 max - F)) is in [1, 2^(q / 32768)): with a power of two just above the max
//   it would be in [2^-q, 1), which underflows once q = p / (p - 1) is large (p -> 1). F is exact in
//   float32 (|F| < 512 for float32 data), as Triton's partials store it.
// u = T * d itself can overflow the math type (ASAM (|w| + eta) g, F-SAM g - sigma m) for finite
// inputs: the kernels then take u in float64 (float32 data, exact products) or split into mantissa
// and exponent (float64 data), and E goes beyond the math type's range ("wide", see row_wide).
struct Scaled {
  double s;
  double e;  // -inf for an empty partial
};

constexpr double kLogRes = 32768.0;  // general-q scales are multiples of 1 / kLogRes

// F = floor(log2(m) * 2^15) / 2^15 for log2m = log2 of a max > 0.
FASTSAM_HD double log_scale(double log2m) { return floor(log2m * kLogRes) / kLogRes; }

// x -> x * 2^-k for an integer-valued k in [-2100, 2100], as two multiplies by normal powers of two
// (2^-k alone may not be a double); exact while the result is normal, and for k in [-1000, 1000] the
// bits of x * 2^-k (the second factor is 1).
struct Pow2Scale {
  double a, b;
  FASTSAM_HD explicit Pow2Scale(double k) {
    const double k1 = k < -1000.0 ? -1000.0 : (k > 1000.0 ? 1000.0 : k);
    a = exp2(-k1);
    b = exp2(k1 - k);
  }
  FASTSAM_HD double operator()(double x) const { return x * a * b; }
};

// F-SAM: s with 1 + |sigma| < 2^s, so g 2^-s - (sigma 2^-s) m is finite for finite g, m
// (fastsam.reference.fsam_shift).
FASTSAM_HD int fsam_shift(double sigma) {
  int k = 0;
  frexp(1.0 + fabs(sigma), &k);
  return k;
}

// (S, E) + (S', E') at the larger exponent; `w` = q (the power the exponents are weighted by).
// isfinite without <cmath>'s host/device overload questions: x - x is 0 for finite x, NaN else.
FASTSAM_HD bool finite_d(double x) { return x - x == 0.0; }

FASTSAM_HD Scaled scaled_add(Scaled a, Scaled b, double w) {
  if (b.e > a.e) {
    const Scaled t = a;
    a = b;
    b = t;
  }
  if (b.e == -INFINITY) return a;
  return Scaled{a.s + b.s * exp2(w * (b.e - a.e)), a.e};
}

// What K2 needs from the global sum (S, E) of |u|^q:
//   q = 2: N = 2^E2 * n_hat with n_hat in [0.5, 1) (E2 clamped so 2^-E2 is finite in the math type),
//          inv = 2^-E2 (|u| * inv <= n_hat <= 1), denom = n_hat + 1e-12 * inv
//          (e = rho T (u inv) / denom = rho T u / (N + 1e-12));
//          rows whose u may overflow (row_wide): the same unclamped, N = n_hat_w * 2^e2w, in float64;
//   q = 1: fac = 1 / (1 + 1e-12);
//   else:  log2 N = E + log2(S) / q, fac = 1 / (1 + 1e-12 N^-(q-1)), and with fi = floor(E),
//          c0 = (E - fi) + log2(S) / q: (|u| / N)^(q-1) = 2^((q-1) (log2(|u| 2^-fi) - c0)).
struct DualNorm {
  double inv, n_hat, denom, fac;
  double e_top;                  // E of the sum (general q: decides row_wide)
  double e2w, n_hat_w, denom_w;  // q = 2, wide rows
  double fi, c0;                 // general q
  int finite;
};

FASTSAM_HD DualNorm dual_norm_scaled(Scaled sum, double q, int32_t qmode, int e_min, int e_max) {
  DualNorm d{1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1};
  d.finite = finite_d(sum.s) ? 1 : 0;
  if (!d.finite) return d;
  const double se = sum.e == -INFINITY ? 0.0 : sum.e;
  d.e_top = se;
  if (qmode == 1) {
    d.fac = 1.0 / (1.0 + 1e-12);
    return d;
  }
  if (sum.s == 0.0) {  // every u is 0: e = 0 (n_hat = 1 keeps |u inv| / n_hat = 0, not 0 / 0)
    d.n_hat = 1.0;
    d.denom = 1.0;
    d.fac = 0.0;
    return d;
  }
  if (qmode == 0) {
    const double lq = log2(sum.s) / q;  // S >= 1: the largest term is >= 1
    d.fac = 1.0 / (1.0 + 1e-12 * exp2(-(q - 1.0) * (se + lq)));
    d.fi = floor(se);
    d.c0 = (se - d.fi) + lq;
    return d;
  }
  const double nh = sqrt(sum.s);  // N = nh * 2^E
  int k = 0;
  const double f = frexp(nh, &k);  // nh = f * 2^k, f in [0.5, 1)
  d.e2w = se + k;
  d.n_hat_w = f;
  d.denom_w = f + 1e-12 * exp2(-d.e2w);
  double e2 = d.e2w;
  e2 = e2 < e_min ? e_min : (e2 > e_max ? e_max : e2);
  // n_hat = N * 2^-E2 exactly (a power-of-two rescale of f unless clamped)
  d.n_hat = ldexp(f, static_cast<int>(se + k - e2));
  d.inv = exp2(-e2);
  d.denom = d.n_hat + 1e-12 * d.inv;
  return d;
}

// K2 of a row must not form u in its math type: some |u| of the call may exceed it (q = 2: N >= max|u|
// reaches 2^127 (float32 math) / 2^1023 (float64); general q: the scale F of float64 rows from 2^1023,
// float32 rows always take u in float64). q = 1 needs only sign(u), which an overflow keeps.
FASTSAM_HD bool row_wide(const DualNorm& d, int32_t qmode, bool f64) {
  if (qmode == 2) return d.e2w >= (f64 ? 1024.0 : 128.0);
  if (qmode == 0) return f64 && d.e_top >= 1023.0;
  return false;
}

// ---------------------------------------------------------------------------------- second step
enum StepMode : int32_t { kModeRestore = 0, kModeSGD = 1, kModeAdam = 2, kModeCombine = 3, kModeAccum = 4 };

// SGD hyp:  lr, weight_decay, momentum, 1 - dampening, -, -, -, -
// Adam hyp: weight_decay, 1 - beta1, beta2, 1 - beta2, eps, lr / (1 - beta1^t), sqrt(1 - beta2^t), 1 - lr * wd
// Accum hyp (m-SAM micro-batch): weight, scale, -, ...; fresh = reset. Rows with s1 (the accumulator):
//   s1 <- scale * ((0 if reset else acc_in) + weight * g), g the GSAM-combined gradient (not written back), 0
//   if the row has no gradient; acc_in = s2 when set (out of place: the caller keeps the old sum), else s1.
//   Every row with w_old is restored.
constexpr int kNumHyp = 8;

struct StepRow {
  void* w;             // parameter (restore target / updated); nullptr in kModeCombine
  void* g;             // gradient (nullptr: no update, restore only); GSAM writes the combined one back
  const void* w_old;   // restore source (nullptr: not perturbed, the update starts from w)
  const void* g_old;   // GSAM first-step gradient (nullptr: not combined)
  void* s1;            // SGD momentum buffer / Adam exp_avg / accumulator (kModeAccum)
  void* s2;            // Adam exp_avg_sq
  void* s3;            // Adam max_exp_avg_sq (amsgrad)
  int64_t numel;
  double hyp[kNumHyp];
  int32_t dtype;
  int32_t fresh;       // SGD: momentum buffer not initialised yet (buf = d); kModeAccum: reset
  int32_t vec;         // CUDA: every pointer of the row is 16-byte aligned (vector loads/stores)
  int32_t pad_;
};

struct StepScalars {
  int32_t mode;        // StepMode
  int32_t gsam;        // GSAM combine on rows with g and g_old
  double alpha;        // GSAM alpha
  int32_t nesterov;
  int32_t maximize;
  int32_t amsgrad;
  int32_t decoupled;   // AdamW: w <- w * (1 - lr * wd) instead of g += wd * w
  int32_t nt;          // CPU: non-temporal stores for w when it is restored from w_old
  int32_t mix;         // SGD / Adam: g <- c1 * gs + c2 * g_old with (c1, c2) = mixc[0..1] instead of GSAM
  int32_t writeback;   // the combined gradient is stored back into g (GSAM always; mix when asked)
  int32_t correct;     // mix with c3 = mixc[2]: w <- w - c3 * (g - g_old) after the update (decoupled WSAM)
  const double* mixc;  // mix: (c1, c2[, c3]), float64, on the rows' device (CUDA reads it in the kernel)
};

// GSAM: from the global sums (dot = <g_old, gs>, ss_new = |gs|^2, ss_old = |g_old|^2),
// coef = 1 + alpha * cos * |g_old| / (|gs| + 1e-12) with cos = dot / (|gs| |g_old| + 1e-12),
// so that gs - alpha * (g_old - cos |g_old| gs / (|gs| + 1e-12)) = coef * gs - alpha * g_old.
// The sums come scaled: gs by 2^-es, g_old by 2^-eo (dot by 2^-(es+eo)); es = eo = 0 unscaled.
FASTSAM_HD double gsam_coef(double dot, double ss_new, double ss_old, double es, double eo, double alpha) {
  const double n_new = sqrt(ss_new), n_old = sqrt(ss_old);  // |gs| = n_new 2^es, |g_old| = n_old 2^eo
  const double cos = dot / (n_new * n_old + 1e-12 * exp2(-(es + eo)));
  const double ratio = n_old / (n_new * exp2(es - eo) + 1e-12 * exp2(-eo));
  return 1.0 + alpha * (cos * ratio);
}

// Sums of one GSAM partial: scaled like `Scaled`, one exponent per vector.
struct GsamSums {
  double dot, ssn, sso, es, eo;
};

FASTSAM_HD GsamSums gsam_add(GsamSums a, const GsamSums& b) {
  const double es = a.es > b.es ? a.es : b.es, eo = a.eo > b.eo ? a.eo : b.eo;
  if (es == -INFINITY || eo == -INFINITY) return a.es == -INFINITY ? b : a;
  const double fa_s = a.es == -INFINITY ? 0.0 : exp2(a.es - es), fb_s = b.es == -INFINITY ? 0.0 : exp2(b.es - es);
  const double fa_o = a.eo == -INFINITY ? 0.0 : exp2(a.eo - eo), fb_o = b.eo == -INFINITY ? 0.0 : exp2(b.eo - eo);
  return GsamSums{a.dot * fa_s * fa_o + b.dot * fb_s * fb_o, a.ssn * fa_s * fa_s + b.ssn * fb_s * fb_s,
                  a.sso * fa_o * fa_o + b.sso * fb_o * fb_o, es, eo};
}

namespace cpu {
// Sum over all rows of |u|^q (u = T * d), accumulated in float64 with a fixed partition of the
// elements (independent of the thread count), scaled (see Scaled). Reads the ready_now snapshots.
Scaled perturb_norm(const PerturbRow* rows, int64_t n, const PerturbScalars& s, int nthreads);
// w_old <- w; if finite: w <- w + e, F-SAM EMA update into ema_out, g_old <- g; else g_old <- 0
// and ema_out <- ema. Does not touch the ready flags (the op layer sets them).
void perturb_apply(const PerturbRow* rows, int64_t n, const PerturbScalars& s, const DualNorm& d, int nthreads);
// <g_old, gs>, |gs|^2, |g_old|^2 over rows with both g and g_old (float64, scaled).
GsamSums gsam_sums(const StepRow* rows, int64_t n, int nthreads);
// Restore / combine / SGD / Adam over all rows (coef from gsam_coef when s.gsam).
void second_step(const StepRow* rows, int64_t n, const StepScalars& s, double coef, int nthreads);
}  // namespace cpu

namespace cuda {
// Work item: chunk `chunk` (kChunk elements) of row `row`. Items are grouped by storage dtype,
// one launch per group; every launch uses a fixed grid whose blocks stride over the group's
// items, so each block always sums the same elements in the same order (deterministic partials).
struct Item {
  int32_t row;
  int32_t chunk;
};
struct Group {
  int64_t begin;  // first item of the group in the item table
  int64_t count;
  int32_t dtype;
  int32_t pad_;
};
// 16384 elements per item (64 KiB of fp32): 16 iterations of a 256-thread block with 16-byte
// loads; a ViT-B (86M elements) is ~5300 items, ~10 per block of the persistent grid.
constexpr int64_t kChunk = 16384;
constexpr int kThreads = 256;
// 8 blocks of 256 threads per SM: the 2048-thread occupancy limit of sm_80/sm_90, so each SM
// keeps ~2048 x 16 B = 32 KiB per stream in flight (an H100 needs ~3.3 TB/s x ~1 us / 132 SMs
// ~ 25 KiB per SM to cover DRAM latency). Only a cap: every grid is sized from its kernel's
// occupancy (cuda_kernels.cu, resident_blocks), as registers allow fewer blocks (sm_90, 256
// threads: 40 registers -> 6 blocks, 64 -> 4, 94 -> 2).
constexpr int kBlocksPerSM = 8;

// Grid of one launch: one block per item up to `per_sm` resident blocks per SM.
inline int64_t grid_of(int64_t count, int sms, int per_sm = kBlocksPerSM) {
  const int64_t cap = static_cast<int64_t>(sms) * per_sm;
  return count < cap ? (count > 0 ? count : 1) : cap;
}
// Partial slots (per reduced quantity) that the first step's K1 (`qmode`: 2, 1 or 0 for general
// q) and the second step's GSAM sums write for these groups: the sum of their launches' grids,
// each sized from its kernel's occupancy (cuda_kernels.cu). The host allocates the partial buffer
// from these, so they must be the launches' own grids.
int64_t perturb_slots(const Group* groups, int ngroups, int sms, int qmode);
int64_t gsam_slots(const Group* groups, int ngroups, int sms);

// First step: K1 (scaled partials of sum |u|^q: S in part[0..slots), E in part[slots..2 slots); F-SAM
// flag snapshot into snap[row]) then K2 (every block reduces all partials, block 0 writes
// *ok = isfinite(N)). Rows and items live in device memory; groups on the host. Asynchronous on
// `stream` (a cudaStream_t).
void perturb(const PerturbRow* rows, const Item* items, const Group* groups, int ngroups, const PerturbScalars& s,
             double* part, int32_t* snap, bool* ok, int sms, void* stream);
// The first step split at its global sum (sharded parameters, FSDP2; no host sync): phase 1 runs K1
// on this rank's rows and reduces its partials on the device to out[0..1] = (S, E) of this rank;
// phase 2 (after the caller gathered every rank's pair into table = S_0..S_{n-1}, E_0..E_{n-1})
// snapshots the F-SAM flags and runs K2 with the table as its partials, so every rank combines
// the same numbers in the same order.
void perturb_partial(const PerturbRow* rows, const Item* items, const Group* groups, int ngroups,
                     const PerturbScalars& s, double* part, int32_t* snap, double* out, int sms, void* stream);
void perturb_apply_global(const PerturbRow* rows, int64_t nrows, const Item* items, const Group* groups,
                          int ngroups, const PerturbScalars& s, const double* table, int64_t nranks, int32_t* snap,
                          bool* ok, int sms, void* stream);
// Second step (restore / combine / SGD / Adam / accumulate); with s.gsam, a partial pass first (5 slots
// per block: <g_old, gs>, |gs|^2, |g_old|^2, and their two exponents in part[k * slots + block]).
void second_step(const StepRow* rows, const Item* items, const Group* groups, int ngroups, const StepScalars& s,
                 double* part, int sms, void* stream);
}  // namespace cuda

}  // namespace fastsam
