// CUDA implementations of adam_step and adam_reduce (schemas: csrc/bindings.cpp).
//
// adam_step    reads params, grads, exp_avgs, exp_avg_sqs, prevs (regret); writes params, exp_avgs,
//              exp_avg_sqs and prevs (this step's direction d, when prevs is given).
// adam_reduce  reads params (coupled weight decay), grads, exp_avgs, exp_avg_sqs, prevs; returns the
//              (n, 2) statistics <d, prev>, ||d||^2 and writes nothing.
//
// The arithmetic is csrc/cpu/adam_cpu.cpp's, operation for operation: float32, fma exactly where the
// CPU code calls madd and correctly rounded single operations elsewhere (the __f*_rn intrinsics, which
// the compiler never contracts), one rounding to the storage dtype on store.
#include <torch/library.h>

#include "multi_tensor_apply.cuh"

namespace autolr_fused {
namespace cuda {
namespace {

// Stages, from the parameters P, the gradient group in G and the old moments in M and V: G the
// (unscaled, regularized) gradient, the new moments M and V, and the direction D, in
// torch.optim.Adam's order of operations (lerp as torch computes it on either side of 0.5).
template <int N>
__device__ __forceinline__ void stage_adam(const AdamHyper& h, const float* grad_scale, const float (&P)[N],
                                           float (&G)[N], float (&M)[N], float (&V)[N], float (&D)[N]) {
  const float grad_factor = gradient_factor(h.maximize, grad_scale);
  const float w = h.one_minus_beta1;
  const float w1 = __fsub_rn(1.0f, w);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float g = __fmul_rn(G[k], grad_factor);
    if (h.weight_decay != 0.0f && !h.decoupled_weight_decay) g = __fmaf_rn(h.weight_decay, P[k], g);
    G[k] = g;
    const float diff = __fsub_rn(g, M[k]);
    M[k] = w < 0.5f ? __fmaf_rn(w, diff, M[k]) : __fmaf_rn(-w1, diff, g);
    V[k] = __fadd_rn(__fmul_rn(V[k], h.beta2), __fmul_rn(__fmul_rn(h.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(V[k]), h.bias_correction2_sqrt), h.eps);
    D[k] = __fdiv_rn(__fdiv_rn(M[k], h.bias_correction1), denom);
  }
}

// Lists: params, grads, exp_avgs, exp_avg_sqs, prevs.
struct AdamStepOp {
  static constexpr int kLists = 5;
  static constexpr int kStats = 0;
  AdamHyper h;
  bool decay;  // decoupled weight decay
  PerTensor lr;
  const float* regret;
  const float* grad_scale;

  template <typename T>
  __device__ __forceinline__ void run(const ChunkView<kLists>& c, double*) const {
    constexpr int N = kVec<T>;
    T* p = c.template at<T>(0);
    const T* g = c.template at<T>(1);
    T* m = c.template at<T>(2);
    T* v2 = c.template at<T>(3);
    T* prev = c.template at<T>(4);
    const float lr_t = lr.at(c.index);
    const float keep = __fsub_rn(1.0f, __fmul_rn(lr_t, h.weight_decay));
    const float rd = regret != nullptr ? regret[c.index] : 0.0f;
    for_each_group<N>(c.begin, c.end, [&](int64_t i, int n) {
      const bool v = c.aligned && n == N;
      float P[N], G[N], M[N], V[N], D[N];
      load(P, p + i, n, v);
      load(G, g + i, n, v);
      load(M, m + i, n, v);
      load(V, v2 + i, n, v);
      stage_adam(h, grad_scale, P, G, M, V, D);
      if (regret != nullptr) {
        float Q[N];
        load(Q, prev + i, n, v);
#pragma unroll
        for (int k = 0; k < N; ++k) P[k] = __fmaf_rn(Q[k], rd, P[k]);
      }
      if (decay) {
#pragma unroll
        for (int k = 0; k < N; ++k) P[k] = __fmul_rn(P[k], keep);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) P[k] = __fmaf_rn(-lr_t, D[k], P[k]);
      store(p + i, P, n, v);
      store(m + i, M, n, v);
      store(v2 + i, V, n, v);
      if (prev != nullptr) store(prev + i, D, n, v);
    });
  }
};

// Lists: params, grads, exp_avgs, exp_avg_sqs, prevs.
struct AdamReduceOp {
  static constexpr int kLists = 5;
  static constexpr int kStats = 2;
  AdamHyper h;
  const float* grad_scale;

  template <typename T>
  __device__ __forceinline__ void run(const ChunkView<kLists>& c, double* sums) const {
    constexpr int N = kVec<T>;
    const T* p = c.template at<T>(0);
    const T* g = c.template at<T>(1);
    const T* m = c.template at<T>(2);
    const T* v2 = c.template at<T>(3);
    const T* prev = c.template at<T>(4);
    for_each_group<N>(c.begin, c.end, [&](int64_t i, int n) {
      const bool v = c.aligned && n == N;
      float P[N], G[N], M[N], V[N], D[N], Q[N];
      load(P, p + i, n, v);
      load(G, g + i, n, v);
      load(M, m + i, n, v);
      load(V, v2 + i, n, v);
      stage_adam(h, grad_scale, P, G, M, V, D);
      load(Q, prev + i, n, v);
      dot(sums[0], D, Q, n);
      dot(sums[1], D, D, n);
    });
  }
};

void adam_step_cuda(at::TensorList params_in, at::TensorList grads_in, at::TensorList exp_avgs_in,
                    at::TensorList exp_avg_sqs_in, const std::optional<at::Tensor>& lr, double lr_value,
                    double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                    bool maximize, double bias_correction1, double bias_correction2_sqrt, at::TensorList prevs_in,
                    const std::optional<at::Tensor>& regret, const std::optional<at::Tensor>& grad_scale) {
  TensorList params = params_in.vec();
  check_adam_lists(params, grads_in, exp_avgs_in, exp_avg_sqs_in);
  check_list(params, prevs_in.vec(), "prevs", !regret.has_value());
  if (params.empty()) return;
  const at::Device device = params[0].device();
  check_vector(lr, "lr", params.size(), true, device);
  check_vector(regret, "regret", params.size(), false, device);
  const AdamHyper h = make_adam_hyper(beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
                                      bias_correction1, bias_correction2_sqrt);
  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const TensorList grads = aligner.align(grads_in.vec(), false);
  const TensorList exp_avgs = aligner.align(exp_avgs_in.vec(), true);
  const TensorList exp_avg_sqs = aligner.align(exp_avg_sqs_in.vec(), true);
  const TensorList prevs = aligner.align(prevs_in.vec(), true);
  const AdamStepOp op{h,
                      h.decoupled_weight_decay && h.weight_decay != 0.0f,
                      per_tensor(lr, lr_value),
                      regret ? regret->data_ptr<float>() : nullptr,
                      scale_ptr(grad_scale, device)};
  multi_tensor_apply(std::array<const TensorList*, 5>{&work, &grads, &exp_avgs, &exp_avg_sqs, &prevs}, op);
  aligner.finish();
}

at::Tensor adam_reduce_cuda(at::TensorList params_in, at::TensorList grads_in, at::TensorList exp_avgs_in,
                            at::TensorList exp_avg_sqs_in, at::TensorList prevs_in, double beta1, double beta2,
                            double eps, double weight_decay, bool decoupled_weight_decay, bool maximize,
                            double bias_correction1, double bias_correction2_sqrt,
                            const std::optional<at::Tensor>& grad_scale) {
  TensorList params = params_in.vec();
  check_adam_lists(params, grads_in, exp_avgs_in, exp_avg_sqs_in);
  check_list(params, prevs_in.vec(), "prevs", false);
  if (params.empty()) return at::empty({0, 2}, at::TensorOptions().dtype(at::kFloat));
  const AdamHyper h = make_adam_hyper(beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
                                      bias_correction1, bias_correction2_sqrt);
  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const TensorList grads = aligner.align(grads_in.vec(), false);
  const TensorList exp_avgs = aligner.align(exp_avgs_in.vec(), false);
  const TensorList exp_avg_sqs = aligner.align(exp_avg_sqs_in.vec(), false);
  const TensorList prevs = aligner.align(prevs_in.vec(), false);
  const AdamReduceOp op{h, scale_ptr(grad_scale, params[0].device())};
  return multi_tensor_apply(std::array<const TensorList*, 5>{&work, &grads, &exp_avgs, &exp_avg_sqs, &prevs}, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(autolr_fused, CUDA, m) {
  m.impl("adam_step", &adam_step_cuda);
  m.impl("adam_reduce", &adam_reduce_cuda);
}

}  // namespace cuda
}  // namespace autolr_fused
