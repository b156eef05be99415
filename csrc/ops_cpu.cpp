// CPU registration of the fused SAM ops (torch.ops.fastsam_cpu.*); schemas in ops_common.h.
//
// The kernels run on at::get_num_threads() OpenMP threads (torch.set_num_threads applies; the
// extension links the libgomp that torch itself loaded, so there is one thread pool).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include "ops_common.h"

namespace fastsam {
namespace {

at::Tensor sam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList w_old, at::TensorList ema,
                           at::TensorList ema_ready, at::TensorList g_old, at::ArrayRef<double> rhos,
                           at::ArrayRef<double> etas, at::IntArrayRef adaptive, at::IntArrayRef offsets, double q,
                           bool fsam, double sigma, double lam, double beta, int64_t seed, int64_t step, bool nt,
                           at::TensorList ema_out, at::TensorList ready_out) {
  PerturbArgs a = perturb_rows(params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets, q, fsam,
                               sigma, lam, beta, seed, step, nt, ema_out, ready_out, c10::DeviceType::CPU);
  const int64_t n = static_cast<int64_t>(a.rows.size());
  // Snapshot the F-SAM flags: the perturbation reads them for every element of a tensor while the
  // op sets them (once, after the kernels; ready_out may be the flag itself).
  for (auto& r : a.rows) r.ready_now = (r.ready != nullptr && *r.ready != 0.0f) ? 1 : 0;
  const int nthreads = at::get_num_threads();
  const Scaled sum = n ? cpu::perturb_norm(a.rows.data(), n, a.s, nthreads) : Scaled{0.0, -INFINITY};
  int e_min = -100, e_max = 127;
  math_exponent_range(a.rows, &e_min, &e_max);
  const DualNorm d = dual_norm_scaled(sum, a.s.q, a.s.qmode, e_min, e_max);
  if (n) cpu::perturb_apply(a.rows.data(), n, a.s, d, nthreads);
  if (fsam) {
    for (auto& r : a.rows) *r.ready_out = d.finite ? 1.0f : (r.ready_now ? 1.0f : 0.0f);
  }
  return at::scalar_tensor(static_cast<bool>(d.finite), at::TensorOptions().dtype(at::kBool));
}

// The first step split at its global sum, for sharded parameters (FSDP2: fastsam/_shard.py): phase 1
// runs K1 on this rank's shards and returns its partial (S, E) as a float64 [2] tensor, writing nothing;
// the caller combines every rank's partial as scaled_add does (E the max, S rescaled by 2^(q (E_r - E)))
// and phase 2 runs K2 with the global (norm_s, norm_e), returning the bool "N finite". Same arguments
// and checks as sam_perturb in both phases.
at::Tensor sam_perturb_sharded_cpu(int64_t phase, at::TensorList params, at::TensorList grads,
                                   at::TensorList w_old, at::TensorList ema, at::TensorList ema_ready,
                                   at::TensorList g_old, at::ArrayRef<double> rhos, at::ArrayRef<double> etas,
                                   at::IntArrayRef adaptive, at::IntArrayRef offsets, double q, bool fsam,
                                   double sigma, double lam, double beta, int64_t seed, int64_t step, bool nt,
                                   at::TensorList ema_out, at::TensorList ready_out, double norm_s,
                                   double norm_e, const c10::optional<at::Tensor>& table) {
  (void)table;  // the CUDA op's device-side table; here the caller combined the ranks on the host
  TORCH_CHECK(phase == 1 || phase == 2, "fastsam: sam_perturb_sharded phase must be 1 or 2, got ", phase);
  PerturbArgs a = perturb_rows(params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets, q, fsam,
                               sigma, lam, beta, seed, step, nt, ema_out, ready_out, c10::DeviceType::CPU);
  const int64_t n = static_cast<int64_t>(a.rows.size());
  for (auto& r : a.rows) r.ready_now = (r.ready != nullptr && *r.ready != 0.0f) ? 1 : 0;
  const int nthreads = at::get_num_threads();
  if (phase == 1) {
    const Scaled sum = n ? cpu::perturb_norm(a.rows.data(), n, a.s, nthreads) : Scaled{0.0, -INFINITY};
    at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
    out.data_ptr<double>()[0] = sum.s;
    out.data_ptr<double>()[1] = sum.e;
    return out;
  }
  int e_min = -100, e_max = 127;
  math_exponent_range(a.rows, &e_min, &e_max);
  const DualNorm d = dual_norm_scaled(Scaled{norm_s, norm_e}, a.s.q, a.s.qmode, e_min, e_max);
  if (n) cpu::perturb_apply(a.rows.data(), n, a.s, d, nthreads);
  if (fsam) {
    for (auto& r : a.rows) *r.ready_out = d.finite ? 1.0f : (r.ready_now ? 1.0f : 0.0f);
  }
  return at::scalar_tensor(static_cast<bool>(d.finite), at::TensorOptions().dtype(at::kBool));
}

void sam_second_step_cpu(int64_t mode, at::TensorList params, at::TensorList grads, at::IntArrayRef grad_idx,
                         at::TensorList w_old, at::IntArrayRef w_old_idx, at::TensorList g_old,
                         at::IntArrayRef g_old_idx, at::TensorList s1, at::IntArrayRef s1_idx, at::TensorList s2,
                         at::IntArrayRef s2_idx, at::TensorList s3, at::IntArrayRef s3_idx, at::ArrayRef<double> hyp,
                         at::IntArrayRef fresh, double alpha, bool nesterov, bool maximize, bool amsgrad,
                         bool decoupled, bool nt, const c10::optional<at::Tensor>& mix, bool mix_writeback) {
  StepArgs a = step_rows(mode, params, grads, grad_idx, w_old, w_old_idx, g_old, g_old_idx, s1, s1_idx, s2, s2_idx,
                         s3, s3_idx, hyp, fresh, alpha, nesterov, maximize, amsgrad, decoupled, nt,
                         c10::DeviceType::CPU, mix, mix_writeback);
  const int64_t n = static_cast<int64_t>(a.rows.size());
  if (n == 0) return;
  const int nthreads = at::get_num_threads();
  double coef = 1.0;
  if (a.s.gsam && !a.s.mix) {
    const GsamSums g = cpu::gsam_sums(a.rows.data(), n, nthreads);
    coef = gsam_coef(g.dot, g.ssn, g.sso, g.es, g.eo, alpha);
  }
  cpu::second_step(a.rows.data(), n, a.s, coef, nthreads);
}

}  // namespace
}  // namespace fastsam

// Schemas here, kernels for the CPU dispatch key below: a catch-all kernel would be
// CompositeImplicitAutograd and could not have the fake (meta) kernels that torch.compile needs
// (registered from Python, fastsam/kernels/cpp_sam.py).
TORCH_LIBRARY(fastsam_cpu, m) {
  m.def(
      "sam_perturb(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] w_old, Tensor(c!)[] ema, "
      "Tensor(d!)[] ema_ready, Tensor(e!)[] g_old, float[] rhos, float[] etas, int[] adaptive, int[] offsets, "
      "float q, bool fsam, float sigma, float lam, float beta, int seed, int step, bool nt, Tensor(f!)[] ema_out, "
      "Tensor(g!)[] ready_out) -> Tensor");
  m.def(
      "sam_perturb_sharded(int phase, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] w_old, Tensor(c!)[] ema, "
      "Tensor(d!)[] ema_ready, Tensor(e!)[] g_old, float[] rhos, float[] etas, int[] adaptive, int[] offsets, "
      "float q, bool fsam, float sigma, float lam, float beta, int seed, int step, bool nt, Tensor(f!)[] ema_out, "
      "Tensor(g!)[] ready_out, float norm_s, float norm_e, Tensor? table=None) -> Tensor");
  m.def(
      "sam_second_step(int mode, Tensor(a!)[] params, Tensor(b!)[] grads, int[] grad_idx, Tensor[] w_old, "
      "int[] w_old_idx, Tensor[] g_old, int[] g_old_idx, Tensor(c!)[] s1, int[] s1_idx, Tensor(d!)[] s2, "
      "int[] s2_idx, Tensor(e!)[] s3, int[] s3_idx, float[] hyp, int[] fresh, float alpha, bool nesterov, "
      "bool maximize, bool amsgrad, bool decoupled, bool nt, Tensor? mix=None, bool mix_writeback=False) -> ()");
}

TORCH_LIBRARY_IMPL(fastsam_cpu, CPU, m) {
  m.impl("sam_perturb", &fastsam::sam_perturb_cpu);
  m.impl("sam_perturb_sharded", &fastsam::sam_perturb_sharded_cpu);
  m.impl("sam_second_step", &fastsam::sam_second_step_cpu);
}
