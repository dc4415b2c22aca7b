// CPU implementations of sgd_step, sgd_reduce and boundary_pass (schemas: csrc/bindings.cpp).
//
// sgd_step     reads params, grads, buffers (momentum), prevs (regret); writes params, buffers,
//              prevs (store); with a boundary it also reads and writes snapshots and
//              prev_displacements and accumulates float32 accumulators: one pass over memory.
// sgd_reduce   reads params (weight decay), grads, buffers (momentum), prevs; writes nothing but
//              the (n, 2) statistics <a, prev>, ||a||^2 of the regularized gradient or direction a.
// boundary_pass reads params; reads and writes snapshots, prev_displacements, accumulators;
//              returns the (n, 3) statistics <u, prev>, ||u||^2, ||prev||^2.
#include <torch/library.h>

#include "autolr_fused/common.h"
#include "multi_tensor_cpu.h"

namespace autolr_fused {
namespace cpu {
namespace {

struct Block {
  alignas(64) float P[kBlock];
  alignas(64) float R[kBlock];
  alignas(64) float M[kBlock];
  alignas(64) float D[kBlock];
  alignas(64) float Q[kBlock];
};

// Stages P (the parameters), R (the regularized gradient), M (the new momentum buffer) and
// returns the direction: R, M or D (Nesterov), in torch.optim.SGD's order of operations.
template <typename T>
inline const float* stage_sgd(const SgdHyper& h, const float* grad_scale, const T* p, const T* g, const T* buf,
                              int64_t n, bool need_p, Block& b) {
  if (need_p) load(b.P, p, n);
  load(b.R, g, n);
  if (grad_scale != nullptr) {
    const float s = *grad_scale;
    for (int64_t i = 0; i < n; ++i) b.R[i] = b.R[i] / s;
  }
  if (h.maximize)
    for (int64_t i = 0; i < n; ++i) b.R[i] = -b.R[i];
  if (h.weight_decay != 0.0f)
    for (int64_t i = 0; i < n; ++i) b.R[i] = madd(h.weight_decay, b.P[i], b.R[i]);
  if (h.momentum == 0.0f) return b.R;
  if (h.first_step) {
    std::copy(b.R, b.R + n, b.M);
  } else {
    load(b.M, buf, n);
    for (int64_t i = 0; i < n; ++i) b.M[i] = madd(h.one_minus_dampening, b.R[i], b.M[i] * h.momentum);
  }
  if (!h.nesterov) return b.M;
  for (int64_t i = 0; i < n; ++i) b.D[i] = madd(h.momentum, b.M[i], b.R[i]);
  return b.D;
}

struct BoundaryArgs {
  std::vector<void*> snapshots, prev_displacements;
  std::vector<float*> accumulators;
  PerTensor scale;
  bool has_scale = false;
  float accumulate_weight = 0.0f;
};

// The boundary pass of one block whose parameters after the update are P (as stored).
template <typename T>
inline void boundary_block(const BoundaryArgs& a, int64_t t, int64_t off, int64_t n, const float* P, Block& b,
                           double* sums) {
  T* snap = static_cast<T*>(a.snapshots[t]) + off;
  T* prev = static_cast<T*>(a.prev_displacements[t]) + off;
  float* U = b.M;  // free once the update is stored
  load(U, snap, n);
  for (int64_t i = 0; i < n; ++i) U[i] = P[i] - U[i];
  if (a.has_scale) {
    const float s = a.scale.at(t);
    for (int64_t i = 0; i < n; ++i) U[i] = U[i] / s;
  }
  load(b.Q, prev, n);
  sums[0] += dot_block(U, b.Q, n);
  sums[1] += dot_block(U, U, n);
  sums[2] += dot_block(b.Q, b.Q, n);
  store(prev, U, n);
  store(snap, P, n);
  if (!a.accumulators.empty()) {
    float* z = a.accumulators[t] + off;
    const float w = a.accumulate_weight;
    for (int64_t i = 0; i < n; ++i) z[i] = madd(w, P[i], z[i]);
  }
}

BoundaryArgs boundary_args(const TensorList& snapshots, const TensorList& prev_displacements,
                           const std::optional<at::Tensor>& scale, const TensorList& accumulators, double weight) {
  BoundaryArgs a;
  for (const auto& t : snapshots) a.snapshots.push_back(t.data_ptr());
  for (const auto& t : prev_displacements) a.prev_displacements.push_back(t.data_ptr());
  for (const auto& t : accumulators) a.accumulators.push_back(t.data_ptr<float>());
  a.scale = per_tensor(scale, 1.0);
  a.has_scale = scale.has_value();
  a.accumulate_weight = static_cast<float>(weight);
  return a;
}

void check_boundary(const TensorList& params, const TensorList& snapshots, const TensorList& prev_displacements,
                    const std::optional<at::Tensor>& scale, const TensorList& accumulators) {
  check_list(params, snapshots, "snapshots", false);
  check_list(params, prev_displacements, "prev_displacements", false);
  check_list(params, accumulators, "accumulators", true, false, true);
  if (!params.empty()) check_vector(scale, "scale", params.size(), true, params[0].device());
}

at::Tensor sgd_step_cpu(at::TensorList params_in, at::TensorList grads_in, at::TensorList buffers_in,
                        const std::optional<at::Tensor>& lr, double lr_value, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool maximize, bool first_step, at::TensorList prevs_in,
                        int64_t store_kind, const std::optional<at::Tensor>& regret, at::TensorList snapshots_in,
                        at::TensorList prev_displacements_in, const std::optional<at::Tensor>& scale,
                        at::TensorList accumulators_in, double accumulate_weight,
                        const std::optional<at::Tensor>& grad_scale) {
  TensorList params = params_in.vec();
  check_params(params);
  const SgdHyper h = make_sgd_hyper(momentum, dampening, weight_decay, nesterov, maximize, first_step);
  const bool use_prevs = store_kind != 0 || regret.has_value();
  const bool boundary = !snapshots_in.empty();
  check_list(params, grads_in.vec(), "grads", false);
  check_list(params, buffers_in.vec(), "buffers", h.momentum == 0.0f);
  check_list(params, prevs_in.vec(), "prevs", !use_prevs);
  TORCH_CHECK(store_kind >= 0 && store_kind <= 2, "autolr_fused: store must be 0, 1 or 2");
  if (boundary) check_boundary(params, snapshots_in.vec(), prev_displacements_in.vec(), scale, accumulators_in.vec());
  if (params.empty()) return at::empty({0, 3}, at::TensorOptions().dtype(at::kFloat));
  check_vector(lr, "lr", params.size(), true, params[0].device());
  check_vector(regret, "regret", params.size(), false, params[0].device());

  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const TensorList grads = aligner.align(grads_in.vec(), false);
  const TensorList buffers = aligner.align(buffers_in.vec(), true);
  const TensorList prevs = aligner.align(prevs_in.vec(), true);
  const TensorList snapshots = aligner.align(snapshots_in.vec(), true);
  const TensorList prev_displacements = aligner.align(prev_displacements_in.vec(), true);
  const TensorList accumulators = aligner.align(accumulators_in.vec(), true);
  const BoundaryArgs bargs = boundary_args(snapshots, prev_displacements, scale, accumulators, accumulate_weight);
  const PerTensor lrs = per_tensor(lr, lr_value);
  const float* regrets = regret ? regret->data_ptr<float>() : nullptr;
  const float* gscale = scale_ptr(grad_scale);
  const bool has_momentum = h.momentum != 0.0f;

  const auto chunks = make_chunks(work);
  std::vector<double> partial(boundary ? chunks.size() * 3 : 0, 0.0);
  parallel_chunks(chunks, [&](const Chunk& c, int64_t index) {
    const int64_t t = c.tensor;
    dispatch_dtype(work[t].scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      T* p = work[t].data_ptr<T>();
      const T* g = grads[t].data_ptr<T>();
      T* buf = has_momentum ? buffers[t].data_ptr<T>() : nullptr;
      T* prev = use_prevs ? prevs[t].data_ptr<T>() : nullptr;
      const float neg_lr = -lrs.at(t);
      const float rd = regrets != nullptr ? regrets[t] : 0.0f;
      double sums[3] = {0.0, 0.0, 0.0};
      Block b;
      for (int64_t off = c.begin; off < c.end; off += kBlock) {
        const int64_t n = std::min(kBlock, c.end - off);
        const float* dir = stage_sgd<T>(h, gscale, p + off, g + off, has_momentum ? buf + off : nullptr, n, true, b);
        if (has_momentum) store(buf + off, b.M, n);
        if (regrets != nullptr) {
          load(b.Q, prev + off, n);
          for (int64_t i = 0; i < n; ++i) b.P[i] = madd(b.Q[i], rd, b.P[i]);
        }
        for (int64_t i = 0; i < n; ++i) b.P[i] = madd(neg_lr, dir[i], b.P[i]);
        store(p + off, b.P, n);
        if (store_kind != 0) store(prev + off, store_kind == 1 ? b.R : dir, n);
        if (boundary) {
          round_to<T>(b.P, n);
          boundary_block<T>(bargs, t, off, n, b.P, b, sums);
        }
      }
      if (boundary)
        for (int k = 0; k < 3; ++k) partial[index * 3 + k] = sums[k];
    });
  });
  aligner.finish();
  if (!boundary) return at::empty({0, 3}, at::TensorOptions().dtype(at::kFloat));
  return sum_partials(chunks, partial, static_cast<int64_t>(work.size()), 3);
}

at::Tensor sgd_reduce_cpu(at::TensorList params_in, at::TensorList grads_in, at::TensorList buffers_in,
                          at::TensorList prevs_in, double momentum, double dampening, double weight_decay,
                          bool nesterov, bool maximize, bool first_step, bool of_direction,
                          const std::optional<at::Tensor>& grad_scale) {
  TensorList params = params_in.vec();
  check_params(params);
  const SgdHyper h = make_sgd_hyper(momentum, dampening, weight_decay, nesterov, maximize, first_step);
  const bool has_momentum = h.momentum != 0.0f && of_direction;
  check_list(params, grads_in.vec(), "grads", false);
  check_list(params, buffers_in.vec(), "buffers", !has_momentum);
  check_list(params, prevs_in.vec(), "prevs", false);
  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const TensorList grads = aligner.align(grads_in.vec(), false);
  const TensorList buffers = aligner.align(buffers_in.vec(), false);
  const TensorList prevs = aligner.align(prevs_in.vec(), false);
  const float* gscale = scale_ptr(grad_scale);
  // The regularized gradient needs no momentum: stage it without touching the buffers.
  SgdHyper staged = h;
  if (!has_momentum) staged.momentum = 0.0f;
  const bool need_p = h.weight_decay != 0.0f;

  const auto chunks = make_chunks(work);
  std::vector<double> partial(chunks.size() * 2, 0.0);
  parallel_chunks(chunks, [&](const Chunk& c, int64_t index) {
    const int64_t t = c.tensor;
    dispatch_dtype(work[t].scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      const T* p = work[t].data_ptr<T>();
      const T* g = grads[t].data_ptr<T>();
      const T* buf = has_momentum ? buffers[t].data_ptr<T>() : nullptr;
      const T* prev = prevs[t].data_ptr<T>();
      double sums[2] = {0.0, 0.0};
      Block b;
      for (int64_t off = c.begin; off < c.end; off += kBlock) {
        const int64_t n = std::min(kBlock, c.end - off);
        const float* dir = stage_sgd<T>(staged, gscale, p + off, g + off, buf ? buf + off : nullptr, n, need_p, b);
        const float* a = of_direction ? dir : b.R;
        load(b.Q, prev + off, n);
        sums[0] += dot_block(a, b.Q, n);
        sums[1] += dot_block(a, a, n);
      }
      partial[index * 2] = sums[0];
      partial[index * 2 + 1] = sums[1];
    });
  });
  return sum_partials(chunks, partial, static_cast<int64_t>(work.size()), 2);
}

at::Tensor boundary_pass_cpu(at::TensorList params_in, at::TensorList snapshots_in,
                             at::TensorList prev_displacements_in, const std::optional<at::Tensor>& scale,
                             at::TensorList accumulators_in, double accumulate_weight) {
  TensorList params = params_in.vec();
  check_params(params);
  check_boundary(params, snapshots_in.vec(), prev_displacements_in.vec(), scale, accumulators_in.vec());
  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const TensorList snapshots = aligner.align(snapshots_in.vec(), true);
  const TensorList prev_displacements = aligner.align(prev_displacements_in.vec(), true);
  const TensorList accumulators = aligner.align(accumulators_in.vec(), true);
  const BoundaryArgs bargs = boundary_args(snapshots, prev_displacements, scale, accumulators, accumulate_weight);

  const auto chunks = make_chunks(work);
  std::vector<double> partial(chunks.size() * 3, 0.0);
  parallel_chunks(chunks, [&](const Chunk& c, int64_t index) {
    const int64_t t = c.tensor;
    dispatch_dtype(work[t].scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      const T* p = work[t].data_ptr<T>();
      double sums[3] = {0.0, 0.0, 0.0};
      Block b;
      for (int64_t off = c.begin; off < c.end; off += kBlock) {
        const int64_t n = std::min(kBlock, c.end - off);
        load(b.P, p + off, n);
        boundary_block<T>(bargs, t, off, n, b.P, b, sums);
      }
      for (int k = 0; k < 3; ++k) partial[index * 3 + k] = sums[k];
    });
  });
  aligner.finish();
  return sum_partials(chunks, partial, static_cast<int64_t>(work.size()), 3);
}

}  // namespace

TORCH_LIBRARY_IMPL(autolr_fused, CPU, m) {
  m.impl("sgd_step", &sgd_step_cpu);
  m.impl("sgd_reduce", &sgd_reduce_cpu);
  m.impl("boundary_pass", &boundary_pass_cpu);
}

}  // namespace cpu
}  // namespace autolr_fused
