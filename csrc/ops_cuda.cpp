// CUDA registration of the fused SAM ops (torch.ops.fastsam_cuda.*); schemas in ops_common.h.
//
// Per call: the row and item tables (kernels.h) are packed into one pinned host buffer and copied
// to the device with a non-blocking copy on the current stream (torch's pinned-memory allocator
// keeps the buffer alive until the copy is done), then the kernels are launched on that stream.
// Nothing reads a device value on the host: the op returns the "N finite" flag as a device tensor.
// All tensors of a call must be on one device (a model split over GPUs: use backend="triton").

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "ops_common.h"

namespace fastsam {
namespace {

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Multiprocessor count of a device (asked once per device; ATen's device-properties helper lives
// in a header that needs the cuBLAS/cuSPARSE headers, which a bare toolkit may lack).
int sm_count(const at::Device& dev) {
  static std::mutex mu;
  static std::unordered_map<int, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev.index());
  if (it != cache.end()) return it->second;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev.index()));
  cache[dev.index()] = sms;
  return sms;
}

// Does an empty row still need an item? Only to set its F-SAM flag (the kernel that handles
// chunk 0 of a row sets it, as the reference sets the flag of every tensor of P).
inline bool needs_item(const PerturbRow& r) { return r.ready != nullptr; }
inline bool needs_item(const StepRow&) { return false; }

// Items of every non-empty row, grouped by storage dtype (one launch per group).
template <class Row>
void make_items(const std::vector<Row>& rows, std::vector<cuda::Item>* items, std::vector<cuda::Group>* groups) {
  for (int32_t dt : {kF32, kF64, kBF16, kF16}) {
    const int64_t begin = static_cast<int64_t>(items->size());
    for (size_t r = 0; r < rows.size(); ++r) {
      if (rows[r].dtype != dt || (rows[r].numel == 0 && !needs_item(rows[r]))) continue;
      const int64_t chunks = std::max<int64_t>(1, (rows[r].numel + cuda::kChunk - 1) / cuda::kChunk);
      TORCH_CHECK(chunks < (int64_t{1} << 31), "fastsam: tensor too large for the cuda backend");
      for (int64_t c = 0; c < chunks; ++c) items->push_back({static_cast<int32_t>(r), static_cast<int32_t>(c)});
    }
    const int64_t count = static_cast<int64_t>(items->size()) - begin;
    if (count > 0) groups->push_back({begin, count, dt, 0});
  }
}

// Rows then items in one device buffer (returned to keep it alive until the kernels are queued).
template <class Row>
at::Tensor upload(const std::vector<Row>& rows, const std::vector<cuda::Item>& items, const at::Device& dev,
                  const Row** d_rows, const cuda::Item** d_items) {
  const size_t rb = (rows.size() * sizeof(Row) + 15) & ~static_cast<size_t>(15);
  const size_t ib = items.size() * sizeof(cuda::Item);
  at::Tensor host = at::empty({static_cast<int64_t>(rb + ib)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  std::memcpy(h, rows.data(), rows.size() * sizeof(Row));
  std::memcpy(h + rb, items.data(), ib);
  at::Tensor d = host.to(at::TensorOptions().device(dev), /*non_blocking=*/true);
  *d_rows = reinterpret_cast<const Row*>(d.data_ptr<uint8_t>());
  *d_items = reinterpret_cast<const cuda::Item*>(d.data_ptr<uint8_t>() + rb);
  return d;
}

// A first step's rows marked for 16-byte vector access where every pointer of the row allows it,
// and its work items grouped by dtype (sam_perturb, sam_perturb_sharded).
void perturb_items(PerturbArgs* a, std::vector<cuda::Item>* items, std::vector<cuda::Group>* groups) {
  for (auto& r : a->rows) r.vec = aligned16(r.w) && aligned16(r.g) && aligned16(r.w_old) && aligned16(r.ema) &&
                                  aligned16(r.ema_out) && aligned16(r.g_old);
  make_items(a->rows, items, groups);
}

void check_one_device(at::TensorList ts, const at::Device& dev) {
  for (const auto& t : ts) {
    TORCH_CHECK(t.device() == dev, "fastsam: backend='cuda' needs every tensor of a call on one device (", dev,
                "), got one on ", t.device(), "; use backend='triton' for a model split over devices");
  }
}

at::Tensor sam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList w_old, at::TensorList ema,
                            at::TensorList ema_ready, at::TensorList g_old, at::ArrayRef<double> rhos,
                            at::ArrayRef<double> etas, at::IntArrayRef adaptive, at::IntArrayRef offsets, double q,
                            bool fsam, double sigma, double lam, double beta, int64_t seed, int64_t step, bool nt,
                            at::TensorList ema_out, at::TensorList ready_out) {
  TORCH_CHECK(!params.empty(), "fastsam: sam_perturb needs at least one tensor");
  const at::Device dev = params[0].device();
  check_one_device(params, dev);
  PerturbArgs a = perturb_rows(params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets, q, fsam,
                               sigma, lam, beta, seed, step, nt, ema_out, ready_out, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(dev);
  std::vector<cuda::Item> items;
  std::vector<cuda::Group> groups;
  perturb_items(&a, &items, &groups);
  at::Tensor ok = at::empty({}, at::TensorOptions().dtype(at::kBool).device(dev));
  if (groups.empty()) {  // only empty tensors: N = 0, finite
    ok.fill_(true);
    return ok;
  }
  const int sms = sm_count(dev);
  const int64_t nslots = cuda::perturb_slots(groups.data(), static_cast<int>(groups.size()), sms, a.s.qmode);
  at::Tensor part = at::empty({2 * nslots}, at::TensorOptions().dtype(at::kDouble).device(dev));  // (S, E) pairs
  at::Tensor snap = at::empty({static_cast<int64_t>(a.rows.size())}, at::TensorOptions().dtype(at::kInt).device(dev));
  const PerturbRow* d_rows = nullptr;
  const cuda::Item* d_items = nullptr;
  at::Tensor tables = upload(a.rows, items, dev, &d_rows, &d_items);
  cuda::perturb(d_rows, d_items, groups.data(), static_cast<int>(groups.size()), a.s, part.data_ptr<double>(),
                snap.data_ptr<int32_t>(), ok.data_ptr<bool>(), sms, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ok;
}

// The first step split at its global sum, for sharded parameters (FSDP2: fastsam/_shard.py), with no
// host sync: phase 1 runs K1 on this rank's shards and returns its (S, E) as a float64 [2] device
// tensor (an empty rank: (0, -inf)); the caller gathers every rank's pair and passes them as `table`
// (float64 [2, world]: S row, then E row) to phase 2, which runs K2 with them as its partials and
// returns the device bool "N finite". norm_s / norm_e (the CPU op's host values) are not used.
at::Tensor sam_perturb_sharded_cuda(int64_t phase, at::TensorList params, at::TensorList grads,
                                    at::TensorList w_old, at::TensorList ema, at::TensorList ema_ready,
                                    at::TensorList g_old, at::ArrayRef<double> rhos, at::ArrayRef<double> etas,
                                    at::IntArrayRef adaptive, at::IntArrayRef offsets, double q, bool fsam,
                                    double sigma, double lam, double beta, int64_t seed, int64_t step, bool nt,
                                    at::TensorList ema_out, at::TensorList ready_out, double norm_s, double norm_e,
                                    const c10::optional<at::Tensor>& table) {
  (void)norm_s;
  (void)norm_e;
  TORCH_CHECK(phase == 1 || phase == 2, "fastsam: sam_perturb_sharded phase must be 1 or 2, got ", phase);
  TORCH_CHECK(!params.empty(), "fastsam: sam_perturb_sharded needs at least one tensor");
  const at::Device dev = params[0].device();
  check_one_device(params, dev);
  if (phase == 2) {
    TORCH_CHECK(table.has_value() && table->defined() && table->scalar_type() == at::kDouble &&
                    table->dim() == 2 && table->size(0) == 2 && table->size(1) >= 1 && table->is_contiguous() &&
                    table->device() == dev,
                "fastsam: sam_perturb_sharded phase 2 needs the gathered (S, E) table: a contiguous float64 "
                "[2, world] tensor on the parameters' device");
  }
  PerturbArgs a = perturb_rows(params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets, q, fsam,
                               sigma, lam, beta, seed, step, nt, ema_out, ready_out, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(dev);
  std::vector<cuda::Item> items;
  std::vector<cuda::Group> groups;
  perturb_items(&a, &items, &groups);
  const int sms = sm_count(dev);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(dev);
  if (phase == 1) {
    at::Tensor out = at::empty({2}, f64);
    if (groups.empty()) {  // nothing on this rank: a sum of 0 at no scale
      out.select(0, 0).fill_(0.0);
      out.select(0, 1).fill_(-std::numeric_limits<double>::infinity());
      return out;
    }
    const int64_t nslots = cuda::perturb_slots(groups.data(), static_cast<int>(groups.size()), sms, a.s.qmode);
    at::Tensor part = at::empty({2 * nslots}, f64);
    at::Tensor snap = at::empty({static_cast<int64_t>(a.rows.size())}, f64.dtype(at::kInt));
    const PerturbRow* d_rows = nullptr;
    const cuda::Item* d_items = nullptr;
    at::Tensor tables = upload(a.rows, items, dev, &d_rows, &d_items);
    cuda::perturb_partial(d_rows, d_items, groups.data(), static_cast<int>(groups.size()), a.s,
                          part.data_ptr<double>(), snap.data_ptr<int32_t>(), out.data_ptr<double>(), sms,
                          c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  at::Tensor ok = at::empty({}, at::TensorOptions().dtype(at::kBool).device(dev));
  if (groups.empty()) {  // this rank perturbs nothing; N (every rank's) finite or not
    const at::Tensor s = table->select(0, 0);
    ok.copy_(s.isfinite().all());
    return ok;
  }
  at::Tensor snap = at::empty({static_cast<int64_t>(a.rows.size())}, f64.dtype(at::kInt));
  const PerturbRow* d_rows = nullptr;
  const cuda::Item* d_items = nullptr;
  at::Tensor tables = upload(a.rows, items, dev, &d_rows, &d_items);
  cuda::perturb_apply_global(d_rows, static_cast<int64_t>(a.rows.size()), d_items, groups.data(),
                             static_cast<int>(groups.size()), a.s, table->data_ptr<double>(), table->size(1),
                             snap.data_ptr<int32_t>(), ok.data_ptr<bool>(), sms,
                             c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ok;
}

void sam_second_step_cuda(int64_t mode, at::TensorList params, at::TensorList grads, at::IntArrayRef grad_idx,
                          at::TensorList w_old, at::IntArrayRef w_old_idx, at::TensorList g_old,
                          at::IntArrayRef g_old_idx, at::TensorList s1, at::IntArrayRef s1_idx, at::TensorList s2,
                          at::IntArrayRef s2_idx, at::TensorList s3, at::IntArrayRef s3_idx, at::ArrayRef<double> hyp,
                          at::IntArrayRef fresh, double alpha, bool nesterov, bool maximize, bool amsgrad,
                          bool decoupled, bool nt, const c10::optional<at::Tensor>& mix, bool mix_writeback) {
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  for (at::TensorList l : {params, grads, w_old, g_old, s1, s2, s3}) check_one_device(l, dev);
  StepArgs a = step_rows(mode, params, grads, grad_idx, w_old, w_old_idx, g_old, g_old_idx, s1, s1_idx, s2, s2_idx,
                         s3, s3_idx, hyp, fresh, alpha, nesterov, maximize, amsgrad, decoupled, nt,
                         c10::DeviceType::CUDA, mix, mix_writeback);
  const c10::cuda::CUDAGuard guard(dev);
  for (auto& r : a.rows) {
    r.vec = aligned16(r.w) && aligned16(r.g) && aligned16(r.w_old) && aligned16(r.g_old) && aligned16(r.s1) &&
            aligned16(r.s2) && aligned16(r.s3);
  }
  std::vector<cuda::Item> items;
  std::vector<cuda::Group> groups;
  make_items(a.rows, &items, &groups);
  if (groups.empty()) return;
  const int sms = sm_count(dev);
  const int64_t nslots = a.s.gsam ? cuda::gsam_slots(groups.data(), static_cast<int>(groups.size()), sms) : 1;
  at::Tensor part = at::empty({a.s.gsam ? 5 * nslots : 1}, at::TensorOptions().dtype(at::kDouble).device(dev));
  const StepRow* d_rows = nullptr;
  const cuda::Item* d_items = nullptr;
  at::Tensor tables = upload(a.rows, items, dev, &d_rows, &d_items);
  cuda::second_step(d_rows, d_items, groups.data(), static_cast<int>(groups.size()), a.s, part.data_ptr<double>(), sms,
                    c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fastsam

// Schemas here, kernels for the CUDA dispatch key below: a catch-all kernel would be
// CompositeImplicitAutograd and could not have the fake (meta) kernels that torch.compile needs
// (registered from Python, fastsam/kernels/cpp_sam.py).
TORCH_LIBRARY(fastsam_cuda, m) {
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

TORCH_LIBRARY_IMPL(fastsam_cuda, CUDA, m) {
  m.impl("sam_perturb", &fastsam::sam_perturb_cuda);
  m.impl("sam_perturb_sharded", &fastsam::sam_perturb_sharded_cuda);
  m.impl("sam_second_step", &fastsam::sam_second_step_cuda);
}
