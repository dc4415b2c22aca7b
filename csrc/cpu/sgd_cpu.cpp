// CPU implementations of sgd_step, sgd_reduce and boundary_pass (schemas: csrc/bindings.cpp).
//
// sgd_step     reads params, grads, buffers (momentum), prevs (regret: the previous direction, or
//              the buffers before the update when prevs is empty); writes params, buffers,
//              prevs (store; with streaming stores in a large call without regret, as nothing reads
//              them then); with a boundary it also reads and writes snapshots and
//              prev_displacements and accumulates float32 accumulators: one pass over memory.
// sgd_reduce   reads params (weight decay), grads, buffers (momentum direction), prevs; writes
//              nothing but the (n, 2) statistics <a, prev>, ||a||^2 of the regularized gradient
//              or direction a.
// boundary_pass reads params; reads and writes snapshots, prev_displacements, accumulators;
//              returns the (n, 3) statistics <u, prev>, ||u||^2, ||prev||^2.
#include <torch/library.h>

#include "autolr_fused/common.h"
#include "multi_tensor_cpu.h"

namespace autolr_fused {
namespace cpu {
namespace {

// torch.optim.SGD's per-element arithmetic, in its order of operations.
struct SgdElement {
  float grad_factor = 1.0f;  // (maximize ? -1 : 1) / GradScaler's scale
  float weight_decay = 0.0f, momentum = 0.0f, one_minus_dampening = 1.0f;
  bool use_weight_decay = false, nesterov = false, first_step = false;

  float regularized(float g, float p) const {
    const float r = g * grad_factor;
    return use_weight_decay ? madd(weight_decay, p, r) : r;
  }
  float buffer(float old, float r) const { return first_step ? r : madd(one_minus_dampening, r, old * momentum); }
  float direction(float r, float m) const { return nesterov ? madd(momentum, m, r) : m; }
};

SgdElement sgd_element(const SgdHyper& h, const float* grad_scale) {
  const float inverse_scale = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  SgdElement e;
  e.grad_factor = h.maximize ? -inverse_scale : inverse_scale;
  e.weight_decay = h.weight_decay;
  e.momentum = h.momentum;
  e.one_minus_dampening = h.one_minus_dampening;
  e.use_weight_decay = h.weight_decay != 0.0f;
  e.nesterov = h.nesterov;
  e.first_step = h.first_step;
  return e;
}

struct BoundaryArgs {
  std::vector<void*> snapshots, prev_displacements;
  std::vector<float*> accumulators;
  PerTensor scale;
  float accumulate_weight = 0.0f;
};

// Everything a chunk of one of the three ops needs, as raw pointers per tensor.
struct Args {
  SgdElement e;
  std::vector<void*> params, grads, buffers, prevs;
  PerTensor lrs;
  const float* regrets = nullptr;
  BoundaryArgs boundary;
  bool stream_prevs = false;  // sgd_step stores prevs with streaming stores (multi_tensor_cpu.h)
};

using Range = void (*)(const Args&, int64_t tensor, int64_t begin, int64_t end, double* sums);

// One element of the snapshot pass: u = (p - snapshot) / scale (scale is exactly 1 when none is given,
// so the division changes nothing then and the loop has no branch); the three statistics; prev = u;
// snapshot = p; with kAccumulate, z += weight * p.
template <typename T, bool kAccumulate>
inline void boundary_element(raw_t<T> stored, raw_t<T>& snap, raw_t<T>& prev, float* z, float scale, float weight, float& dot, float& uu,
                             float& qq) {
  const float p = to_f32<T>(stored);
  const float u = (p - to_f32<T>(snap)) / scale;
  const float q = to_f32<T>(prev);
  dot += u * q;
  uu += u * u;
  qq += q * q;
  prev = from_f32<T>(u);
  snap = stored;
  if constexpr (kAccumulate) *z = madd(weight, p, *z);
}

// Where a regret reads the previous direction: nowhere, prevs, or the momentum buffer before this step's update.
enum RegretFrom { kNoRegret = 0, kRegretPrevs = 1, kRegretBuffer = 2 };

template <typename T, bool kMomentum, int kStore, int kRegretFrom, bool kBoundary>
void sgd_step_range(const Args& a, int64_t t, int64_t begin, int64_t end, double* sums) {
  raw_t<T>* __restrict__ p = static_cast<raw_t<T>*>(a.params[t]);
  const raw_t<T>* __restrict__ g = static_cast<const raw_t<T>*>(a.grads[t]);
  raw_t<T>* __restrict__ buf = kMomentum ? static_cast<raw_t<T>*>(a.buffers[t]) : nullptr;
  static_assert(kRegretFrom != kRegretBuffer || kMomentum, "a regret from the buffer needs momentum");
  constexpr bool kRegret = kRegretFrom != kNoRegret;
  raw_t<T>* __restrict__ prev =
      (kStore != 0 || kRegretFrom == kRegretPrevs) ? static_cast<raw_t<T>*>(a.prevs[t]) : nullptr;
  raw_t<T>* __restrict__ snap = kBoundary ? static_cast<raw_t<T>*>(a.boundary.snapshots[t]) : nullptr;
  raw_t<T>* __restrict__ disp = kBoundary ? static_cast<raw_t<T>*>(a.boundary.prev_displacements[t]) : nullptr;
  float* __restrict__ z = kBoundary && !a.boundary.accumulators.empty() ? a.boundary.accumulators[t] : nullptr;
  const SgdElement e = a.e;
  const float neg_lr = -a.lrs.at(t);
  const float rd = kRegret ? a.regrets[t] : 0.0f;
  const float scale = kBoundary ? a.boundary.scale.at(t) : 1.0f;
  const float weight = a.boundary.accumulate_weight;
  // Without a regret, prev is written but not read by this pass: a streaming call stages a block's
  // stored values in L1 and streams them out after the block.
  constexpr bool kWriteOnly = kStore != 0 && !kRegret;
  const bool stream = kWriteOnly && a.stream_prevs;
  with_flag(z != nullptr, [&](auto accumulate) {
    for (int64_t block = begin; block < end; block += kBlock) {
      float dot[kLanes] = {0}, uu[kLanes] = {0}, qq[kLanes] = {0};
      alignas(16) raw_t<T> staged[kWriteOnly ? kBlock : 1];
      raw_t<T>* __restrict__ out = kWriteOnly ? (stream ? staged : prev + block) : nullptr;
      for_lanes(std::min(kBlock, end - block), [&](int64_t j, int64_t k) {
        const int64_t i = block + j;
        float pi = to_f32<T>(p[i]);
        const float r = e.regularized(to_f32<T>(g[i]), pi);
        float d = r, q = 0.0f;  // q: the previous direction, for a regret
        if constexpr (kMomentum) {
          // The buffer is read on the first step too (uninitialised then, and ignored by buffer()): a
          // conditional load keeps gcc from turning the loop's flags into selects and vectorising it.
          const float old = to_f32<T>(buf[i]);
          if constexpr (kRegretFrom == kRegretBuffer) q = old;
          const float m = e.buffer(old, r);
          buf[i] = from_f32<T>(m);
          d = e.direction(r, m);
        }
        if constexpr (kRegretFrom == kRegretPrevs) q = to_f32<T>(prev[i]);
        if constexpr (kRegret) pi = madd(q, rd, pi);
        const raw_t<T> stored = from_f32<T>(madd(neg_lr, d, pi));
        p[i] = stored;
        if constexpr (kStore != 0) {
          const raw_t<T> stored_prev = from_f32<T>(kStore == 1 ? r : d);
          if constexpr (kWriteOnly) {
            out[j] = stored_prev;
          } else {
            prev[i] = stored_prev;
          }
        }
        if constexpr (kBoundary) {
          float* zi = accumulate() ? z + i : nullptr;
          boundary_element<T, accumulate()>(stored, snap[i], disp[i], zi, scale, weight, dot[k], uu[k], qq[k]);
        }
      });
      if constexpr (kBoundary) {
        flush(dot, sums[0]);
        flush(uu, sums[1]);
        flush(qq, sums[2]);
      }
      if (stream) stream_copy(prev + block, staged, std::min(kBlock, end - block));
    }
  });
}

// The sgd_step instantiation for the runtime flags (templated only on what changes memory traffic).
template <typename T, bool kMomentum, int kStore, int kRegretFrom>
Range pick_boundary(bool boundary) {
  return boundary ? &sgd_step_range<T, kMomentum, kStore, kRegretFrom, true>
                  : &sgd_step_range<T, kMomentum, kStore, kRegretFrom, false>;
}

template <typename T, bool kMomentum, int kStore>
Range pick_regret(RegretFrom regret, bool boundary) {
  if constexpr (kMomentum && kStore == 0) {  // sgd_step_cpu checks that this is the only use
    if (regret == kRegretBuffer) return pick_boundary<T, kMomentum, kStore, kRegretBuffer>(boundary);
  }
  return regret == kRegretPrevs ? pick_boundary<T, kMomentum, kStore, kRegretPrevs>(boundary)
                                : pick_boundary<T, kMomentum, kStore, kNoRegret>(boundary);
}

template <typename T, bool kMomentum>
Range pick_store(int64_t store, RegretFrom regret, bool boundary) {
  if (store == 1) return pick_regret<T, kMomentum, 1>(regret, boundary);
  if (store == 2) return pick_regret<T, kMomentum, 2>(regret, boundary);
  return pick_regret<T, kMomentum, 0>(regret, boundary);
}

template <typename T>
Range pick_step(bool momentum, int64_t store, RegretFrom regret, bool boundary) {
  return momentum ? pick_store<T, true>(store, regret, boundary) : pick_store<T, false>(store, regret, boundary);
}

// <a, prev> and ||a||^2 with a the regularized gradient, or the direction when kDirection.
template <typename T, bool kDirection>
void sgd_reduce_range(const Args& a, int64_t t, int64_t begin, int64_t end, double* sums) {
  const raw_t<T>* __restrict__ p = static_cast<const raw_t<T>*>(a.params[t]);
  const raw_t<T>* __restrict__ g = static_cast<const raw_t<T>*>(a.grads[t]);
  const raw_t<T>* __restrict__ buf = kDirection ? static_cast<const raw_t<T>*>(a.buffers[t]) : nullptr;
  const raw_t<T>* __restrict__ prev = static_cast<const raw_t<T>*>(a.prevs[t]);
  const SgdElement e = a.e;
  for (int64_t block = begin; block < end; block += kBlock) {
    float dot[kLanes] = {0}, nrm[kLanes] = {0};
    for_lanes(std::min(kBlock, end - block), [&](int64_t j, int64_t k) {
      const int64_t i = block + j;
      const float pi = e.use_weight_decay ? to_f32<T>(p[i]) : 0.0f;
      const float r = e.regularized(to_f32<T>(g[i]), pi);
      float x = r;
      if constexpr (kDirection) x = e.direction(r, e.buffer(to_f32<T>(buf[i]), r));  // as in sgd_step_range
      const float q = to_f32<T>(prev[i]);
      dot[k] += x * q;
      nrm[k] += x * x;
    });
    flush(dot, sums[0]);
    flush(nrm, sums[1]);
  }
}

template <typename T>
void boundary_range(const Args& a, int64_t t, int64_t begin, int64_t end, double* sums) {
  const raw_t<T>* __restrict__ p = static_cast<const raw_t<T>*>(a.params[t]);
  raw_t<T>* __restrict__ snap = static_cast<raw_t<T>*>(a.boundary.snapshots[t]);
  raw_t<T>* __restrict__ disp = static_cast<raw_t<T>*>(a.boundary.prev_displacements[t]);
  float* __restrict__ z = a.boundary.accumulators.empty() ? nullptr : a.boundary.accumulators[t];
  const float scale = a.boundary.scale.at(t);
  const float weight = a.boundary.accumulate_weight;
  with_flag(z != nullptr, [&](auto accumulate) {
    for (int64_t block = begin; block < end; block += kBlock) {
      float dot[kLanes] = {0}, uu[kLanes] = {0}, qq[kLanes] = {0};
      for_lanes(std::min(kBlock, end - block), [&](int64_t j, int64_t k) {
        const int64_t i = block + j;
        float* zi = accumulate() ? z + i : nullptr;
        boundary_element<T, accumulate()>(p[i], snap[i], disp[i], zi, scale, weight, dot[k], uu[k], qq[k]);
      });
      flush(dot, sums[0]);
      flush(uu, sums[1]);
      flush(qq, sums[2]);
    }
  });
}

// The element rule and the grads', buffers' and prevs' pointers, laid out as the aligner's params;
// `written`: the call writes buffers and prevs (a realigned copy is then copied back by aligner.finish()).
Args sgd_args(const SgdHyper& h, const std::optional<at::Tensor>& grad_scale, LayoutAligner& aligner,
              at::TensorList grads, at::TensorList buffers, at::TensorList prevs, bool written) {
  Args args;
  args.e = sgd_element(h, scale_ptr(grad_scale));
  args.params = pointers(aligner.params());
  args.grads = pointers(aligner.align(grads.vec(), false));
  args.buffers = pointers(aligner.align(buffers.vec(), written));
  args.prevs = pointers(aligner.align(prevs.vec(), written));
  return args;
}

BoundaryArgs boundary_args(const TensorList& snapshots, const TensorList& prev_displacements,
                           const std::optional<at::Tensor>& scale, const TensorList& accumulators, double weight) {
  BoundaryArgs a;
  a.snapshots = pointers(snapshots);
  a.prev_displacements = pointers(prev_displacements);
  for (const auto& t : accumulators) a.accumulators.push_back(t.data_ptr<float>());
  a.scale = per_tensor(scale, 1.0);
  a.accumulate_weight = static_cast<float>(weight);
  return a;
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
  const bool has_momentum = h.momentum != 0.0f;
  const bool has_regret = regret.has_value();
  const bool boundary = !snapshots_in.empty();
  check_list(params, grads_in.vec(), "grads", false);
  check_list(params, buffers_in.vec(), "buffers", !has_momentum);
  check_list(params, prevs_in.vec(), "prevs", store_kind == 0);
  TORCH_CHECK(store_kind >= 0 && store_kind <= 2, "autolr_fused: store must be 0, 1 or 2");
  const RegretFrom regret_from = !has_regret ? kNoRegret : !prevs_in.empty() ? kRegretPrevs : kRegretBuffer;
  if (regret_from == kRegretBuffer) check_regret_from_buffer(h, store_kind);
  if (boundary) check_boundary(params, snapshots_in.vec(), prev_displacements_in.vec(), scale, accumulators_in.vec());
  if (params.empty()) return at::empty({0, 3}, at::TensorOptions().dtype(at::kFloat));
  check_vector(lr, "lr", params.size(), true, params[0].device());
  check_vector(regret, "regret", params.size(), false, params[0].device());

  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  Args args = sgd_args(h, grad_scale, aligner, grads_in, buffers_in, prevs_in, true);
  args.lrs = per_tensor(lr, lr_value);
  args.regrets = has_regret ? regret->data_ptr<float>() : nullptr;
  args.stream_prevs = streams(bytes_of(work) + bytes_of(grads_in.vec()) + bytes_of(buffers_in.vec()) +
                              bytes_of(prevs_in.vec()) + bytes_of(snapshots_in.vec()) +
                              bytes_of(prev_displacements_in.vec()) + bytes_of(accumulators_in.vec()));
  args.boundary = boundary_args(aligner.align(snapshots_in.vec(), true),
                                aligner.align(prev_displacements_in.vec(), true), scale,
                                aligner.align(accumulators_in.vec(), true), accumulate_weight);
  auto stats = run_chunks(work, args, boundary ? 3 : 0, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return pick_step<T>(has_momentum, store_kind, regret_from, boundary);
  });
  aligner.finish();
  return stats;
}

at::Tensor sgd_reduce_cpu(at::TensorList params_in, at::TensorList grads_in, at::TensorList buffers_in,
                          at::TensorList prevs_in, double momentum, double dampening, double weight_decay,
                          bool nesterov, bool maximize, bool first_step, bool of_direction,
                          const std::optional<at::Tensor>& grad_scale) {
  TensorList params = params_in.vec();
  check_params(params);
  const SgdHyper h = make_sgd_hyper(momentum, dampening, weight_decay, nesterov, maximize, first_step);
  const bool direction = h.momentum != 0.0f && of_direction;  // without momentum the direction is r
  check_list(params, grads_in.vec(), "grads", false);
  check_list(params, buffers_in.vec(), "buffers", !direction);
  check_list(params, prevs_in.vec(), "prevs", false);
  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const Args args = sgd_args(h, grad_scale, aligner, grads_in, buffers_in, prevs_in, false);
  return run_chunks(work, args, 2, [&](auto tag) -> Range {
    using T = typename decltype(tag)::type;
    return direction ? &sgd_reduce_range<T, true> : &sgd_reduce_range<T, false>;
  });
}

at::Tensor boundary_pass_cpu(at::TensorList params_in, at::TensorList snapshots_in,
                             at::TensorList prev_displacements_in, const std::optional<at::Tensor>& scale,
                             at::TensorList accumulators_in, double accumulate_weight) {
  TensorList params = params_in.vec();
  check_params(params);
  check_boundary(params, snapshots_in.vec(), prev_displacements_in.vec(), scale, accumulators_in.vec());
  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  Args args;
  args.params = pointers(work);
  args.boundary = boundary_args(aligner.align(snapshots_in.vec(), true),
                                aligner.align(prev_displacements_in.vec(), true), scale,
                                aligner.align(accumulators_in.vec(), true), accumulate_weight);
  auto stats = run_chunks(work, args, 3, [&](auto tag) -> Range {
    using T = typename decltype(tag)::type;
    return &boundary_range<T>;
  });
  aligner.finish();
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(autolr_fused, CPU, m) {
  m.impl("sgd_step", &sgd_step_cpu);
  m.impl("sgd_reduce", &sgd_reduce_cpu);
  m.impl("boundary_pass", &boundary_pass_cpu);
}

}  // namespace cpu
}  // namespace autolr_fused
