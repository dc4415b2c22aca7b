// CPU implementations of adam_step and adam_reduce (schemas: csrc/bindings.cpp).
//
// adam_step    reads params, grads, exp_avgs, exp_avg_sqs, prevs (regret); writes params, exp_avgs,
//              exp_avg_sqs and prevs (this step's direction d, when prevs is given).
// adam_reduce  reads params (coupled weight decay), grads, exp_avgs, exp_avg_sqs, prevs; returns the
//              (n, 2) statistics <d, prev>, ||d||^2 and writes nothing.
#include <torch/library.h>

#include <cmath>

#include "autolr_fused/common.h"
#include "multi_tensor_cpu.h"

namespace autolr_fused {
namespace cpu {
namespace {

struct AdamBlock {
  alignas(64) float P[kBlock];
  alignas(64) float G[kBlock];
  alignas(64) float M[kBlock];
  alignas(64) float V[kBlock];
  alignas(64) float D[kBlock];
};

// Stages P, the new moments M and V, and the direction D, in torch.optim.Adam's order of operations.
template <typename T>
inline void stage_adam(const AdamHyper& h, const float* grad_scale, const T* p, const T* g, const T* m, const T* v,
                       int64_t n, AdamBlock& b) {
  load(b.P, p, n);
  load(b.G, g, n);
  if (grad_scale != nullptr) {
    const float s = *grad_scale;
    for (int64_t i = 0; i < n; ++i) b.G[i] = b.G[i] / s;
  }
  if (h.maximize)
    for (int64_t i = 0; i < n; ++i) b.G[i] = -b.G[i];
  if (h.weight_decay != 0.0f && !h.decoupled_weight_decay)
    for (int64_t i = 0; i < n; ++i) b.G[i] = madd(h.weight_decay, b.P[i], b.G[i]);
  load(b.M, m, n);
  const float w = h.one_minus_beta1;
  if (w < 0.5f) {
    for (int64_t i = 0; i < n; ++i) b.M[i] = madd(w, b.G[i] - b.M[i], b.M[i]);
  } else {
    const float w1 = 1.0f - w;
    for (int64_t i = 0; i < n; ++i) b.M[i] = madd(-w1, b.G[i] - b.M[i], b.G[i]);
  }
  load(b.V, v, n);
  for (int64_t i = 0; i < n; ++i) b.V[i] = b.V[i] * h.beta2 + h.one_minus_beta2 * b.G[i] * b.G[i];
  for (int64_t i = 0; i < n; ++i)
    b.D[i] = (b.M[i] / h.bias_correction1) / (std::sqrt(b.V[i]) / h.bias_correction2_sqrt + h.eps);
}

void check_adam_lists(const TensorList& params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs) {
  check_params(params);
  check_list(params, grads.vec(), "grads", false);
  check_list(params, exp_avgs.vec(), "exp_avgs", false);
  check_list(params, exp_avg_sqs.vec(), "exp_avg_sqs", false);
}

void adam_step_cpu(at::TensorList params_in, at::TensorList grads_in, at::TensorList exp_avgs_in,
                   at::TensorList exp_avg_sqs_in, const std::optional<at::Tensor>& lr, double lr_value, double beta1,
                   double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool maximize,
                   double bias_correction1, double bias_correction2_sqrt, at::TensorList prevs_in,
                   const std::optional<at::Tensor>& regret, const std::optional<at::Tensor>& grad_scale) {
  TensorList params = params_in.vec();
  check_adam_lists(params, grads_in, exp_avgs_in, exp_avg_sqs_in);
  const bool use_prevs = !prevs_in.empty();
  check_list(params, prevs_in.vec(), "prevs", !regret.has_value());
  if (params.empty()) return;
  check_vector(lr, "lr", params.size(), true, params[0].device());
  check_vector(regret, "regret", params.size(), false, params[0].device());
  const AdamHyper h = make_adam_hyper(beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
                                      bias_correction1, bias_correction2_sqrt);
  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const TensorList grads = aligner.align(grads_in.vec(), false);
  const TensorList exp_avgs = aligner.align(exp_avgs_in.vec(), true);
  const TensorList exp_avg_sqs = aligner.align(exp_avg_sqs_in.vec(), true);
  const TensorList prevs = aligner.align(prevs_in.vec(), true);
  const PerTensor lrs = per_tensor(lr, lr_value);
  const float* regrets = regret ? regret->data_ptr<float>() : nullptr;
  const float* gscale = scale_ptr(grad_scale);
  const bool decay = h.decoupled_weight_decay && h.weight_decay != 0.0f;

  const auto chunks = make_chunks(work);
  parallel_chunks(chunks, [&](const Chunk& c, int64_t) {
    const int64_t t = c.tensor;
    dispatch_dtype(work[t].scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      T* p = work[t].data_ptr<T>();
      const T* g = grads[t].data_ptr<T>();
      T* m = exp_avgs[t].data_ptr<T>();
      T* v = exp_avg_sqs[t].data_ptr<T>();
      T* prev = use_prevs ? prevs[t].data_ptr<T>() : nullptr;
      const float lr_t = lrs.at(t);
      const float keep = 1.0f - lr_t * h.weight_decay;
      const float rd = regrets != nullptr ? regrets[t] : 0.0f;
      AdamBlock b;
      for (int64_t off = c.begin; off < c.end; off += kBlock) {
        const int64_t n = std::min(kBlock, c.end - off);
        stage_adam<T>(h, gscale, p + off, g + off, m + off, v + off, n, b);
        if (regrets != nullptr) {
          load(b.G, prev + off, n);
          for (int64_t i = 0; i < n; ++i) b.P[i] = madd(b.G[i], rd, b.P[i]);
        }
        if (decay)
          for (int64_t i = 0; i < n; ++i) b.P[i] = b.P[i] * keep;
        for (int64_t i = 0; i < n; ++i) b.P[i] = madd(-lr_t, b.D[i], b.P[i]);
        store(p + off, b.P, n);
        store(m + off, b.M, n);
        store(v + off, b.V, n);
        if (use_prevs) store(prev + off, b.D, n);
      }
    });
  });
  aligner.finish();
}

at::Tensor adam_reduce_cpu(at::TensorList params_in, at::TensorList grads_in, at::TensorList exp_avgs_in,
                           at::TensorList exp_avg_sqs_in, at::TensorList prevs_in, double beta1, double beta2,
                           double eps, double weight_decay, bool decoupled_weight_decay, bool maximize,
                           double bias_correction1, double bias_correction2_sqrt,
                           const std::optional<at::Tensor>& grad_scale) {
  TensorList params = params_in.vec();
  check_adam_lists(params, grads_in, exp_avgs_in, exp_avg_sqs_in);
  check_list(params, prevs_in.vec(), "prevs", false);
  const AdamHyper h = make_adam_hyper(beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
                                      bias_correction1, bias_correction2_sqrt);
  LayoutAligner aligner(params);
  const TensorList& work = aligner.params();
  const TensorList grads = aligner.align(grads_in.vec(), false);
  const TensorList exp_avgs = aligner.align(exp_avgs_in.vec(), false);
  const TensorList exp_avg_sqs = aligner.align(exp_avg_sqs_in.vec(), false);
  const TensorList prevs = aligner.align(prevs_in.vec(), false);
  const float* gscale = scale_ptr(grad_scale);

  const auto chunks = make_chunks(work);
  std::vector<double> partial(chunks.size() * 2, 0.0);
  parallel_chunks(chunks, [&](const Chunk& c, int64_t index) {
    const int64_t t = c.tensor;
    dispatch_dtype(work[t].scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      double sums[2] = {0.0, 0.0};
      AdamBlock b;
      const T* prev = prevs[t].data_ptr<T>();
      for (int64_t off = c.begin; off < c.end; off += kBlock) {
        const int64_t n = std::min(kBlock, c.end - off);
        stage_adam<T>(h, gscale, work[t].data_ptr<T>() + off, grads[t].data_ptr<T>() + off,
                      exp_avgs[t].data_ptr<T>() + off, exp_avg_sqs[t].data_ptr<T>() + off, n, b);
        load(b.G, prev + off, n);
        sums[0] += dot_block(b.D, b.G, n);
        sums[1] += dot_block(b.D, b.D, n);
      }
      partial[index * 2] = sums[0];
      partial[index * 2 + 1] = sums[1];
    });
  });
  return sum_partials(chunks, partial, static_cast<int64_t>(work.size()), 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(autolr_fused, CPU, m) {
  m.impl("adam_step", &adam_step_cpu);
  m.impl("adam_reduce", &adam_reduce_cpu);
}

}  // namespace cpu
}  // namespace autolr_fused
