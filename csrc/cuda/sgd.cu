// CUDA implementations of sgd_step, sgd_reduce and boundary_pass (schemas: csrc/bindings.cpp).
//
// sgd_step     reads params, grads, buffers (momentum), prevs (regret: the previous direction, or
//              the buffers before the update when prevs is empty); writes params, buffers,
//              prevs (store); with a boundary it also reads and writes snapshots and
//              prev_displacements and accumulates float32 accumulators: one pass over memory.
// sgd_reduce   reads params (weight decay), grads, buffers (momentum), prevs; writes nothing but
//              the (n, 2) statistics <a, prev>, ||a||^2 of the regularized gradient or direction a.
// boundary_pass reads params; reads and writes snapshots, prev_displacements, accumulators;
//              returns the (n, 3) statistics <u, prev>, ||u||^2, ||prev||^2.
//
// The arithmetic is csrc/cpu/sgd_cpu.cpp's, operation for operation: float32, fma exactly where the
// CPU code calls madd and correctly rounded single operations elsewhere (the __f*_rn intrinsics, which
// the compiler never contracts), one rounding to the storage dtype on store.
#include <torch/library.h>

#include "multi_tensor_apply.cuh"

namespace autolr_fused {
namespace cuda {
namespace {

// Stages, from the parameters P and the gradient group in R (and the old momentum buffer in M
// unless first_step), R the regularized gradient, M the new momentum buffer and D the direction,
// in torch.optim.SGD's order of operations. `has_momentum` false: D = R and M is untouched.
template <int N>
__device__ __forceinline__ void stage_sgd(const SgdHyper& h, bool has_momentum, const float* grad_scale,
                                          const float (&P)[N], float (&R)[N], float (&M)[N], float (&D)[N]) {
  const float grad_factor = gradient_factor(h.maximize, grad_scale);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float r = __fmul_rn(R[k], grad_factor);
    if (h.weight_decay != 0.0f) r = __fmaf_rn(h.weight_decay, P[k], r);
    R[k] = r;
    if (!has_momentum) {
      D[k] = r;
      continue;
    }
    const float m = h.first_step ? r : __fmaf_rn(h.one_minus_dampening, r, __fmul_rn(M[k], h.momentum));
    M[k] = m;
    D[k] = h.nesterov ? __fmaf_rn(h.momentum, m, r) : m;
  }
}

// The boundary pass of one group whose parameters after the update are P (as stored).
struct BoundaryArgs {
  PerTensor scale;
  bool has_scale;
  float accumulate_weight;
};

template <typename T, int N>
__device__ __forceinline__ void boundary_group(const BoundaryArgs& a, float scale, T* snap, T* prev, float* accumulator,
                                               const float (&P)[N], int n, bool vector, double* sums) {
  float U[N], Q[N];
  load(U, snap, n, vector);
#pragma unroll
  for (int k = 0; k < N; ++k) U[k] = __fsub_rn(P[k], U[k]);
  if (a.has_scale) {
#pragma unroll
    for (int k = 0; k < N; ++k) U[k] = __fdiv_rn(U[k], scale);
  }
  load(Q, prev, n, vector);
  dot(sums[0], U, Q, n);
  dot(sums[1], U, U, n);
  dot(sums[2], Q, Q, n);
  store(prev, U, n, vector);
  store(snap, P, n, vector);
  if (accumulator != nullptr) {
    float Z[N];
    load(Z, accumulator, n, vector);
#pragma unroll
    for (int k = 0; k < N; ++k) Z[k] = __fmaf_rn(a.accumulate_weight, P[k], Z[k]);
    store(accumulator, Z, n, vector);
  }
}

// Lists: params, grads, buffers, prevs, then (kBoundary) snapshots, prev_displacements, accumulators.
template <bool kBoundary>
struct SgdStepOp {
  static constexpr int kLists = kBoundary ? 7 : 4;
  static constexpr int kStats = kBoundary ? 3 : 0;
  SgdHyper h;
  bool has_momentum;
  int store_kind;
  PerTensor lr;
  const float* regret;
  bool regret_from_buffer;  // the regret's previous direction is the momentum buffer before the update
  const float* grad_scale;
  BoundaryArgs boundary;

  template <typename T>
  __device__ __forceinline__ void run(const ChunkView<kLists>& c, double* sums) const {
    constexpr int N = kVec<T>;
    T* p = c.template at<T>(0);
    const T* g = c.template at<T>(1);
    T* buf = c.template at<T>(2);
    T* prev = c.template at<T>(3);
    const float neg_lr = -lr.at(c.index);
    const float rd = regret != nullptr ? regret[c.index] : 0.0f;
    const float scale = kBoundary && boundary.has_scale ? boundary.scale.at(c.index) : 1.0f;
    for_each_group<N>(c.begin, c.end, [&](int64_t i, int n) {
      const bool v = c.aligned && n == N;
      float P[N], R[N], M[N], D[N], Q[N];
      load(P, p + i, n, v);
      load(R, g + i, n, v);
      if (has_momentum && !h.first_step) load(M, buf + i, n, v);
      if (regret_from_buffer) {
#pragma unroll
        for (int k = 0; k < N; ++k) Q[k] = M[k];
      }
      stage_sgd(h, has_momentum, grad_scale, P, R, M, D);
      if (has_momentum) store(buf + i, M, n, v);
      if (regret != nullptr) {
        if (!regret_from_buffer) load(Q, prev + i, n, v);
#pragma unroll
        for (int k = 0; k < N; ++k) P[k] = __fmaf_rn(Q[k], rd, P[k]);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) P[k] = __fmaf_rn(neg_lr, D[k], P[k]);
      store(p + i, P, n, v);
      if (store_kind == 1) store(prev + i, R, n, v);
      if (store_kind == 2) store(prev + i, D, n, v);
      if constexpr (kBoundary) {
#pragma unroll
        for (int k = 0; k < N; ++k) P[k] = rounded<T>(P[k]);
        float* z = c.template at<float>(6);
        boundary_group<T>(boundary, scale, c.template at<T>(4) + i, c.template at<T>(5) + i,
                          z != nullptr ? z + i : nullptr, P, n, v, sums);
      }
    });
  }
};

// Lists: params, grads, buffers, prevs.
struct SgdReduceOp {
  static constexpr int kLists = 4;
  static constexpr int kStats = 2;
  SgdHyper h;  // momentum 0 when the momentum buffers are not needed
  bool has_momentum, need_p, of_direction;
  const float* grad_scale;

  template <typename T>
  __device__ __forceinline__ void run(const ChunkView<kLists>& c, double* sums) const {
    constexpr int N = kVec<T>;
    const T* p = c.template at<T>(0);
    const T* g = c.template at<T>(1);
    const T* buf = c.template at<T>(2);
    const T* prev = c.template at<T>(3);
    for_each_group<N>(c.begin, c.end, [&](int64_t i, int n) {
      const bool v = c.aligned && n == N;
      float P[N] = {}, R[N], M[N], D[N], Q[N];
      if (need_p) load(P, p + i, n, v);
      load(R, g + i, n, v);
      if (has_momentum && !h.first_step) load(M, buf + i, n, v);
      stage_sgd(h, has_momentum, grad_scale, P, R, M, D);
      load(Q, prev + i, n, v);
      if (of_direction) {
        dot(sums[0], D, Q, n);
        dot(sums[1], D, D, n);
      } else {
        dot(sums[0], R, Q, n);
        dot(sums[1], R, R, n);
      }
    });
  }
};

// Lists: params, snapshots, prev_displacements, accumulators.
struct BoundaryPassOp {
  static constexpr int kLists = 4;
  static constexpr int kStats = 3;
  BoundaryArgs boundary;

  template <typename T>
  __device__ __forceinline__ void run(const ChunkView<kLists>& c, double* sums) const {
    constexpr int N = kVec<T>;
    const T* p = c.template at<T>(0);
    T* snap = c.template at<T>(1);
    T* prev = c.template at<T>(2);
    float* z = c.template at<float>(3);
    const float scale = boundary.has_scale ? boundary.scale.at(c.index) : 1.0f;
    for_each_group<N>(c.begin, c.end, [&](int64_t i, int n) {
      const bool v = c.aligned && n == N;
      float P[N];
      load(P, p + i, n, v);
      boundary_group<T>(boundary, scale, snap + i, prev + i, z != nullptr ? z + i : nullptr, P, n, v, sums);
    });
  }
};

const TensorList kNone;

BoundaryArgs boundary_args(const std::optional<at::Tensor>& scale, double accumulate_weight) {
  return {per_tensor(scale, 1.0), scale.has_value(), static_cast<float>(accumulate_weight)};
}

at::Tensor no_statistics() { return at::empty({0, 3}, at::TensorOptions().dtype(at::kFloat)); }

at::Tensor sgd_step_cuda(at::TensorList params_in, at::TensorList grads_in, at::TensorList buffers_in,
                         const std::optional<at::Tensor>& lr, double lr_value, double momentum, double dampening,
                         double weight_decay, bool nesterov, bool maximize, bool first_step, at::TensorList prevs_in,
                         int64_t store_kind, const std::optional<at::Tensor>& regret, at::TensorList snapshots_in,
                         at::TensorList prev_displacements_in, const std::optional<at::Tensor>& scale,
                         at::TensorList accumulators_in, double accumulate_weight,
                         const std::optional<at::Tensor>& grad_scale) {
  TensorList params = params_in.vec();
  check_params(params);
  const SgdHyper h = make_sgd_hyper(momentum, dampening, weight_decay, nesterov, maximize, first_step);
  const bool boundary = !snapshots_in.empty();
  const bool has_momentum = h.momentum != 0.0f;
  const bool regret_from_buffer = regret.has_value() && prevs_in.empty();  // see check_regret_from_buffer
  const bool use_prevs = store_kind != 0 || (regret.has_value() && !regret_from_buffer);
  check_list(params, grads_in.vec(), "grads", false);
  check_list(params, buffers_in.vec(), "buffers", !has_momentum);
  check_list(params, prevs_in.vec(), "prevs", store_kind == 0);
  TORCH_CHECK(store_kind >= 0 && store_kind <= 2, "autolr_fused: store must be 0, 1 or 2");
  if (regret_from_buffer) check_regret_from_buffer(h, store_kind);
  if (boundary) check_boundary(params, snapshots_in.vec(), prev_displacements_in.vec(), scale, accumulators_in.vec());
  if (params.empty()) return no_statistics();
  const at::Device device = params[0].device();
  check_vector(lr, "lr", params.size(), true, device);
  check_vector(regret, "regret", params.size(), false, device);

  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const TensorList grads = aligner.align(grads_in.vec(), false);
  const TensorList buffers = has_momentum ? aligner.align(buffers_in.vec(), true) : kNone;
  const TensorList prevs = use_prevs ? aligner.align(prevs_in.vec(), true) : kNone;
  const TensorList snapshots = aligner.align(snapshots_in.vec(), true);
  const TensorList prev_displacements = aligner.align(prev_displacements_in.vec(), true);
  const TensorList accumulators = aligner.align(accumulators_in.vec(), true);
  const float* regrets = regret ? regret->data_ptr<float>() : nullptr;
  const float* gscale = scale_ptr(grad_scale, device);
  const PerTensor lrs = per_tensor(lr, lr_value);
  const BoundaryArgs bargs = boundary_args(scale, accumulate_weight);

  at::Tensor stats;
  if (boundary) {
    const SgdStepOp<true> op{h, has_momentum, static_cast<int>(store_kind), lrs, regrets, regret_from_buffer, gscale, bargs};
    stats = multi_tensor_apply(
        std::array<const TensorList*, 7>{&work, &grads, &buffers, &prevs, &snapshots, &prev_displacements,
                                         &accumulators},
        op);
  } else {
    const SgdStepOp<false> op{h, has_momentum, static_cast<int>(store_kind), lrs, regrets, regret_from_buffer, gscale, bargs};
    multi_tensor_apply(std::array<const TensorList*, 4>{&work, &grads, &buffers, &prevs}, op);
    stats = no_statistics();
  }
  aligner.finish();
  return stats;
}

at::Tensor sgd_reduce_cuda(at::TensorList params_in, at::TensorList grads_in, at::TensorList buffers_in,
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
  if (params.empty()) return at::empty({0, 2}, at::TensorOptions().dtype(at::kFloat));
  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const TensorList grads = aligner.align(grads_in.vec(), false);
  const TensorList buffers = has_momentum ? aligner.align(buffers_in.vec(), false) : kNone;
  const TensorList prevs = aligner.align(prevs_in.vec(), false);
  // The regularized gradient needs no momentum: stage it without touching the buffers.
  SgdHyper staged = h;
  if (!has_momentum) staged.momentum = 0.0f;
  const SgdReduceOp op{staged, has_momentum, h.weight_decay != 0.0f, of_direction,
                       scale_ptr(grad_scale, params[0].device())};
  return multi_tensor_apply(std::array<const TensorList*, 4>{&work, &grads, &buffers, &prevs}, op);
}

at::Tensor boundary_pass_cuda(at::TensorList params_in, at::TensorList snapshots_in,
                              at::TensorList prev_displacements_in, const std::optional<at::Tensor>& scale,
                              at::TensorList accumulators_in, double accumulate_weight) {
  TensorList params = params_in.vec();
  check_params(params);
  check_boundary(params, snapshots_in.vec(), prev_displacements_in.vec(), scale, accumulators_in.vec());
  if (params.empty()) return at::empty({0, 3}, at::TensorOptions().dtype(at::kFloat));
  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const TensorList snapshots = aligner.align(snapshots_in.vec(), true);
  const TensorList prev_displacements = aligner.align(prev_displacements_in.vec(), true);
  const TensorList accumulators = aligner.align(accumulators_in.vec(), true);
  const BoundaryPassOp op{boundary_args(scale, accumulate_weight)};
  at::Tensor stats = multi_tensor_apply(
      std::array<const TensorList*, 4>{&work, &snapshots, &prev_displacements, &accumulators}, op);
  aligner.finish();
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(autolr_fused, CUDA, m) {
  m.impl("sgd_step", &sgd_step_cuda);
  m.impl("sgd_reduce", &sgd_reduce_cuda);
  m.impl("boundary_pass", &boundary_pass_cuda);
}

}  // namespace cuda
}  // namespace autolr_fused
