// Op-layer helpers shared by the CPU (ops_cpu.cpp) and CUDA (ops_cuda.cpp) registrations:
// argument validation and the translation of tensor lists into kernel rows (kernels.h).
//
// Op schemas (namespace fastsam_cpu / fastsam_cuda; one op set, two implementations):
//
//   sam_perturb(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] w_old, Tensor(c!)[] ema,
//               Tensor(d!)[] ema_ready, Tensor(e!)[] g_old, float[] rhos, float[] etas,
//               int[] adaptive, int[] offsets, float q, bool fsam, float sigma, float lam,
//               float beta, int seed, int step, bool nt, Tensor(f!)[] ema_out,
//               Tensor(g!)[] ready_out) -> Tensor
//     ema / ema_ready empty unless fsam, g_old empty unless GSAM; ema_out / ready_out empty: the
//     EMA and flags are updated in place, else they receive the new values (ema / ema_ready only
//     read: the caller keeps them for a rollback). Returns "N finite" (0-dim bool).
//
//   sam_second_step(int mode, Tensor(a!)[] params, Tensor(b!)[] grads, int[] grad_idx,
//                   Tensor[] w_old, int[] w_old_idx, Tensor[] g_old, int[] g_old_idx,
//                   Tensor(c!)[] s1, int[] s1_idx, Tensor(d!)[] s2, int[] s2_idx,
//                   Tensor(e!)[] s3, int[] s3_idx, float[] hyp, int[] fresh, float alpha,
//                   bool nesterov, bool maximize, bool amsgrad, bool decoupled, bool nt,
//                   Tensor? mix=None, bool mix_writeback=False) -> ()
//     Optional per-tensor entries travel as dense lists plus the index of the parameter each
//     belongs to (schemas have no list of optional tensors that can be mutated). hyp holds
//     kNumHyp floats per parameter (see kernels.h). mode: kernels.h StepMode; in kModeCombine
//     params are the gradients themselves and only g <- coef * g - alpha * g_old is done; in
//     kModeAccum s1 holds the accumulators (grads only read), hyp[0..1] = weight, scale, fresh = reset,
//     s2 (optional) the running sums to add to (default: s1, in place). mix (kModeSGD / kModeAdam,
//     alpha 0): a float64 tensor (c1, c2) or (c1, c2, c3) on the parameters' device; rows with g
//     and g_old update with c1 * g + c2 * g_old (WSAM, LookSAM's reuse), stored back into g only if
//     mix_writeback; with c3, the updated w then gets w - c3 * (g - g_old) (decoupled WSAM).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "kernels.h"

namespace fastsam {

inline int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "fastsam: parameters must be float32, float64, bfloat16 or float16, got ", t);
  }
  return kF32;
}

inline void check_param(const at::Tensor& w, c10::DeviceType dev, int64_t i) {
  TORCH_CHECK(w.device().type() == dev, "fastsam: params[", i, "] is on ", w.device(), ", expected a ",
              c10::DeviceTypeName(dev), " tensor");
  TORCH_CHECK(w.is_contiguous(), "fastsam: params[", i, "] must be contiguous (the Python wrapper stages others)");
  dtype_code(w.scalar_type());
}

// A companion of params[i] (grad, w_old, state): same dtype, element count, device; contiguous.
inline void check_companion(const at::Tensor& t, const at::Tensor& w, const char* what, int64_t i) {
  TORCH_CHECK(t.scalar_type() == w.scalar_type(), "fastsam: ", what, "[", i, "] has dtype ", t.scalar_type(),
              ", its parameter ", w.scalar_type());
  TORCH_CHECK(t.numel() == w.numel(), "fastsam: ", what, "[", i, "] has ", t.numel(), " elements, its parameter ",
              w.numel());
  TORCH_CHECK(t.device() == w.device(), "fastsam: ", what, "[", i, "] is on ", t.device(), ", its parameter on ",
              w.device());
  TORCH_CHECK(t.is_contiguous(), "fastsam: ", what, "[", i, "] must be contiguous");
}

// F-SAM flags are 0-dim float32 tensors (fastsam.SAM keeps them next to the EMA).
inline void check_flag(const at::Tensor& t, const at::Tensor& w, int64_t i) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == w.device(),
              "fastsam: ema_ready[", i, "] must be a one-element float32 tensor on the parameter's device");
}

struct PerturbArgs {
  std::vector<PerturbRow> rows;
  PerturbScalars s;
};

inline PerturbArgs perturb_rows(at::TensorList params, at::TensorList grads, at::TensorList w_old,
                                at::TensorList ema, at::TensorList ema_ready, at::TensorList g_old,
                                at::ArrayRef<double> rhos, at::ArrayRef<double> etas, at::IntArrayRef adaptive,
                                at::IntArrayRef offsets, double q, bool fsam, double sigma, double lam, double beta,
                                int64_t seed, int64_t step, bool nt, at::TensorList ema_out,
                                at::TensorList ready_out, c10::DeviceType dev) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(w_old.size()) == n &&
                  static_cast<int64_t>(rhos.size()) == n && static_cast<int64_t>(etas.size()) == n &&
                  static_cast<int64_t>(adaptive.size()) == n && static_cast<int64_t>(offsets.size()) == n,
              "fastsam: sam_perturb lists must have one entry per parameter");
  TORCH_CHECK(!fsam || (static_cast<int64_t>(ema.size()) == n && static_cast<int64_t>(ema_ready.size()) == n),
              "fastsam: F-SAM needs ema and ema_ready for every parameter");
  TORCH_CHECK(g_old.empty() || static_cast<int64_t>(g_old.size()) == n,
              "fastsam: g_old must be empty or have one entry per parameter");
  TORCH_CHECK((ema_out.empty() || (fsam && static_cast<int64_t>(ema_out.size()) == n)) &&
                  ema_out.size() == ready_out.size(),
              "fastsam: ema_out and ready_out must both be empty or have one entry per parameter (F-SAM)");
  TORCH_CHECK(q >= 1.0 && std::isfinite(q), "fastsam: dual exponent q must be in [1, inf), got ", q);
  PerturbArgs a;
  a.rows.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& w = params[i];
    check_param(w, dev, i);
    check_companion(grads[i], w, "grads", i);
    check_companion(w_old[i], w, "w_old", i);
    TORCH_CHECK(offsets[i] >= 0, "fastsam: offsets[", i, "] must be >= 0");
    PerturbRow& r = a.rows[i];
    r = PerturbRow{};
    r.w = w.data_ptr();
    r.g = grads[i].data_ptr();
    r.w_old = w_old[i].data_ptr();
    r.numel = w.numel();
    r.offset = offsets[i];
    r.rho = rhos[i];
    r.eta = etas[i];
    r.dtype = dtype_code(w.scalar_type());
    r.adaptive = adaptive[i] != 0;
    if (fsam) {
      check_companion(ema[i], w, "ema", i);
      check_flag(ema_ready[i], w, i);
      r.ema = ema[i].data_ptr();
      r.ready = ema_ready[i].data_ptr<float>();
      r.ema_out = r.ema;
      r.ready_out = r.ready;
      if (!ema_out.empty()) {
        check_companion(ema_out[i], w, "ema_out", i);
        TORCH_CHECK(ready_out[i].numel() == 1 && ready_out[i].scalar_type() == at::kFloat &&
                        ready_out[i].device() == w.device(),
                    "fastsam: ready_out[", i, "] must be a one-element float32 tensor on the parameter's device");
        r.ema_out = ema_out[i].data_ptr();
        r.ready_out = ready_out[i].data_ptr<float>();
      }
    }
    if (!g_old.empty()) {
      check_companion(g_old[i], w, "g_old", i);
      r.g_old = g_old[i].data_ptr();
    }
  }
  PerturbScalars& s = a.s;
  s = PerturbScalars{};
  s.q = q;
  s.qmode = q == 2.0 ? 2 : (q == 1.0 ? 1 : 0);
  s.fsam = fsam;
  s.sigma = sigma;
  s.lam = lam;
  s.beta = beta;
  s.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);
  s.step = static_cast<uint32_t>(static_cast<uint64_t>(step) & 0xFFFFFFFFu);
  s.swp = beta < 1.0;
  if (s.swp) {
    TORCH_CHECK(beta > 0.0, "fastsam: swp_keep must be in (0, 1], got ", beta);
    s.threshold = static_cast<uint32_t>(beta * 4294967296.0);  // floor(beta * 2^32) < 2^32 for beta < 1
  }
  s.nt = nt;
  return a;
}

// Exponent range of the K2 scale 2^-E2 in the math type (kernels.h dual_norm_scaled): float32
// math for every storage type but float64 (2^100 and 2^-127 are float32 numbers).
inline void math_exponent_range(const std::vector<PerturbRow>& rows, int* e_min, int* e_max) {
  bool f64 = false;
  for (const auto& r : rows) f64 = f64 || r.dtype == kF64;
  *e_min = f64 ? -1000 : -100;
  *e_max = f64 ? 1000 : 127;
}

// Dense optional list -> per-parameter tensor pointer (nullptr where absent).
inline std::vector<const at::Tensor*> scatter(at::TensorList dense, at::IntArrayRef idx, int64_t n, const char* what) {
  TORCH_CHECK(dense.size() == idx.size(), "fastsam: ", what, " and its index list differ in length");
  std::vector<const at::Tensor*> out(n, nullptr);
  for (size_t k = 0; k < dense.size(); ++k) {
    TORCH_CHECK(idx[k] >= 0 && idx[k] < n, "fastsam: ", what, " index ", idx[k], " out of range");
    out[idx[k]] = &dense[k];
  }
  return out;
}

struct StepArgs {
  std::vector<StepRow> rows;
  StepScalars s;
};

inline StepArgs step_rows(int64_t mode, at::TensorList params, at::TensorList grads, at::IntArrayRef grad_idx,
                          at::TensorList w_old, at::IntArrayRef w_old_idx, at::TensorList g_old,
                          at::IntArrayRef g_old_idx, at::TensorList s1, at::IntArrayRef s1_idx, at::TensorList s2,
                          at::IntArrayRef s2_idx, at::TensorList s3, at::IntArrayRef s3_idx,
                          at::ArrayRef<double> hyp, at::IntArrayRef fresh, double alpha, bool nesterov,
                          bool maximize, bool amsgrad, bool decoupled, bool nt, c10::DeviceType dev,
                          const c10::optional<at::Tensor>& mix = c10::nullopt, bool mix_writeback = false) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(mode >= kModeRestore && mode <= kModeAccum, "fastsam: bad second-step mode ", mode);
  const bool updates = mode == kModeSGD || mode == kModeAdam;
  TORCH_CHECK(!(updates || mode == kModeAccum) || (static_cast<int64_t>(hyp.size()) == n * kNumHyp &&
                           static_cast<int64_t>(fresh.size()) == n),
              "fastsam: hyp must hold ", kNumHyp, " values and fresh one per parameter");
  const auto G = scatter(grads, grad_idx, n, "grads");
  const auto WO = scatter(w_old, w_old_idx, n, "w_old");
  const auto GO = scatter(g_old, g_old_idx, n, "g_old");
  const auto A = scatter(s1, s1_idx, n, "state1");
  const auto B = scatter(s2, s2_idx, n, "state2");
  const auto Cs = scatter(s3, s3_idx, n, "state3");
  StepArgs a;
  a.rows.resize(n);
  bool any_pair = false;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& w = params[i];
    check_param(w, dev, i);
    StepRow& r = a.rows[i];
    r = StepRow{};
    r.numel = w.numel();
    r.dtype = dtype_code(w.scalar_type());
    r.w = mode == kModeCombine ? nullptr : w.data_ptr();
    if (G[i]) {
      check_companion(*G[i], w, "grads", i);
      r.g = G[i]->data_ptr();
    }
    if (WO[i]) {
      check_companion(*WO[i], w, "w_old", i);
      r.w_old = WO[i]->data_ptr();
    }
    if (GO[i]) {
      check_companion(*GO[i], w, "g_old", i);
      r.g_old = GO[i]->data_ptr();
    }
    any_pair = any_pair || (r.g != nullptr && r.g_old != nullptr);
    if (mode == kModeAccum) {
      TORCH_CHECK(r.g == nullptr || A[i] != nullptr, "fastsam: params[", i, "] has a gradient but no acc buffer");
      if (A[i]) {
        check_companion(*A[i], w, "acc", i);
        r.s1 = A[i]->data_ptr();
        for (int k = 0; k < kNumHyp; ++k) r.hyp[k] = hyp[i * kNumHyp + k];
        r.fresh = fresh[i] != 0;
        if (B[i]) {
          check_companion(*B[i], w, "acc_in", i);
          r.s2 = B[i]->data_ptr();
        }
      }
      continue;
    }
    if (updates && r.g != nullptr) {
      for (int k = 0; k < kNumHyp; ++k) r.hyp[k] = hyp[i * kNumHyp + k];
      r.fresh = fresh[i] != 0;
      if (mode == kModeSGD && r.hyp[2] != 0.0) {
        TORCH_CHECK(A[i] != nullptr, "fastsam: SGD with momentum needs a momentum buffer for params[", i, "]");
        check_companion(*A[i], w, "momentum_buffers", i);
        r.s1 = A[i]->data_ptr();
      }
      if (mode == kModeAdam) {
        TORCH_CHECK(A[i] != nullptr && B[i] != nullptr, "fastsam: Adam needs exp_avg and exp_avg_sq for params[", i,
                    "]");
        check_companion(*A[i], w, "exp_avgs", i);
        check_companion(*B[i], w, "exp_avg_sqs", i);
        r.s1 = A[i]->data_ptr();
        r.s2 = B[i]->data_ptr();
        if (amsgrad) {
          TORCH_CHECK(Cs[i] != nullptr, "fastsam: amsgrad needs max_exp_avg_sqs for params[", i, "]");
          check_companion(*Cs[i], w, "max_exp_avg_sqs", i);
          r.s3 = Cs[i]->data_ptr();
        }
      }
    }
  }
  StepScalars& s = a.s;
  s = StepScalars{};
  s.mode = static_cast<int32_t>(mode);
  const bool use_mix = mix.has_value() && mix->defined();
  if (use_mix) {
    TORCH_CHECK(mode == kModeSGD || mode == kModeAdam, "fastsam: mix needs an SGD or Adam update");
    TORCH_CHECK(alpha == 0.0, "fastsam: mix and GSAM (alpha > 0) exclude each other");
    TORCH_CHECK(mix->scalar_type() == at::kDouble && (mix->numel() == 2 || mix->numel() == 3) &&
                    mix->is_contiguous(),
                "fastsam: mix must be a contiguous float64 tensor (c1, c2) or (c1, c2, c3)");
    TORCH_CHECK(mix->device().type() == dev, "fastsam: mix must be on the parameters' device");
  }
  s.gsam = (alpha > 0.0 || use_mix) && any_pair;
  s.mix = use_mix && s.gsam;
  s.writeback = s.mix ? mix_writeback : 1;
  s.correct = s.mix && mix->numel() == 3;
  s.mixc = s.mix ? mix->data_ptr<double>() : nullptr;
  s.alpha = alpha;
  s.nesterov = nesterov;
  s.maximize = maximize;
  s.amsgrad = amsgrad;
  s.decoupled = decoupled;
  s.nt = nt;
  return a;
}

}  // namespace fastsam
