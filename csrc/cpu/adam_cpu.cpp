// CPU implementations of adam_step and adam_reduce (schemas: csrc/bindings.cpp).
//
// adam_step    reads params, grads, exp_avgs, exp_avg_sqs, prevs (regret); writes params, exp_avgs,
//              exp_avg_sqs and prevs (this step's direction d, when prevs is given; with streaming
//              stores in a large call without regret, as nothing reads them then).
// adam_reduce  reads params (coupled weight decay), grads, exp_avgs, exp_avg_sqs, prevs; returns the
//              (n, 2) statistics <d, prev>, ||d||^2 and writes nothing.
#include <torch/library.h>

#include <cmath>

#include "autolr_fused/common.h"
#include "multi_tensor_cpu.h"

namespace autolr_fused {
namespace cpu {
namespace {

// torch.optim.Adam's per-element arithmetic, in its order of operations.
struct AdamElement {
  float grad_factor = 1.0f;  // (maximize ? -1 : 1) / GradScaler's scale
  float weight_decay = 0.0f, beta1_weight = 0.1f, beta2 = 0.999f, one_minus_beta2 = 0.001f, eps = 1e-8f;
  float bias_correction1 = 1.0f, bias_correction2_sqrt = 1.0f;
  float lerp_factor = 0.1f;  // w, or -(1 - w) when w >= 0.5
  bool lerp_from_m = true;  // w < 0.5
  bool coupled_weight_decay = false;

  // The gradient term (kCoupled: Adam's weight decay, a template flag so that the loop has no select
  // on it, which gcc does not vectorise next to the regret's update), and m, v, d of this step.
  template <bool kCoupled>
  float gradient(float g, float p) const {
    const float x = g * grad_factor;
    if constexpr (kCoupled) return madd(weight_decay, p, x);
    return x;
  }
  // torch.lerp(m, x, w): m + w (x - m) for w < 0.5, else x - (x - m)(1 - w); both as one fma.
  float first_moment(float m, float x) const { return madd(lerp_factor, x - m, lerp_from_m ? m : x); }
  float second_moment(float v, float x) const { return v * beta2 + one_minus_beta2 * x * x; }
  float direction(float m, float v) const {
    return (m / bias_correction1) / (std::sqrt(v) / bias_correction2_sqrt + eps);
  }
};

AdamElement adam_element(const AdamHyper& h, const float* grad_scale) {
  const float inverse_scale = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  AdamElement e;
  e.grad_factor = h.maximize ? -inverse_scale : inverse_scale;
  e.weight_decay = h.weight_decay;
  e.beta1_weight = h.one_minus_beta1;
  e.lerp_from_m = h.one_minus_beta1 < 0.5f;
  e.lerp_factor = e.lerp_from_m ? h.one_minus_beta1 : -(1.0f - h.one_minus_beta1);
  e.beta2 = h.beta2;
  e.one_minus_beta2 = h.one_minus_beta2;
  e.eps = h.eps;
  e.bias_correction1 = h.bias_correction1;
  e.bias_correction2_sqrt = h.bias_correction2_sqrt;
  e.coupled_weight_decay = h.weight_decay != 0.0f && !h.decoupled_weight_decay;
  return e;
}

struct Args {
  AdamElement e;
  std::vector<void*> params, grads, exp_avgs, exp_avg_sqs, prevs;
  PerTensor lrs;
  const float* regrets = nullptr;
  float decoupled_weight_decay = 0.0f;  // AdamW's wd, 0 for Adam
  bool stream_prevs = false;  // adam_step stores prevs with streaming stores (multi_tensor_cpu.h)
};

using Range = void (*)(const Args&, int64_t tensor, int64_t begin, int64_t end, double* sums);

template <typename T, bool kRegret, bool kStore>
void adam_step_range(const Args& a, int64_t t, int64_t begin, int64_t end, double*) {
  raw_t<T>* __restrict__ p = static_cast<raw_t<T>*>(a.params[t]);
  const raw_t<T>* __restrict__ g = static_cast<const raw_t<T>*>(a.grads[t]);
  raw_t<T>* __restrict__ m = static_cast<raw_t<T>*>(a.exp_avgs[t]);
  raw_t<T>* __restrict__ v = static_cast<raw_t<T>*>(a.exp_avg_sqs[t]);
  raw_t<T>* __restrict__ prev = (kRegret || kStore) ? static_cast<raw_t<T>*>(a.prevs[t]) : nullptr;
  const AdamElement e = a.e;
  const float lr = a.lrs.at(t);
  const float keep = 1.0f - lr * a.decoupled_weight_decay;  // exactly 1 without AdamW's decay
  const float rd = kRegret ? a.regrets[t] : 0.0f;
  // Without a regret, prev is written but not read by this pass: a streaming call stages a block's
  // directions in L1 and streams them out after the block.
  constexpr bool kWriteOnly = kStore && !kRegret;
  const bool stream = kWriteOnly && a.stream_prevs;
  with_flag(e.coupled_weight_decay, [&](auto coupled) {
    for (int64_t block = begin; block < end; block += kBlock) {
      const int64_t n = std::min(kBlock, end - block);
      alignas(16) raw_t<T> staged[kWriteOnly ? kBlock : 1];
      raw_t<T>* __restrict__ out = kWriteOnly ? (stream ? staged : prev + block) : nullptr;
      AUTOLR_FUSED_NO_ALIAS
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = block + j;
        float pi = to_f32<T>(p[i]);
        const float x = e.template gradient<coupled()>(to_f32<T>(g[i]), pi);
        const float mi = e.first_moment(to_f32<T>(m[i]), x);
        const float vi = e.second_moment(to_f32<T>(v[i]), x);
        const float d = e.direction(mi, vi);
        if constexpr (kRegret) pi = madd(to_f32<T>(prev[i]), rd, pi);
        p[i] = from_f32<T>(madd(-lr, d, pi * keep));
        m[i] = from_f32<T>(mi);
        v[i] = from_f32<T>(vi);
        if constexpr (kWriteOnly) {
          out[j] = from_f32<T>(d);
        } else if constexpr (kStore) {
          prev[i] = from_f32<T>(d);
        }
      }
      if (stream) stream_copy(prev + block, staged, n);
    }
  });
}

template <typename T>
void adam_reduce_range(const Args& a, int64_t t, int64_t begin, int64_t end, double* sums) {
  const raw_t<T>* __restrict__ p = static_cast<const raw_t<T>*>(a.params[t]);
  const raw_t<T>* __restrict__ g = static_cast<const raw_t<T>*>(a.grads[t]);
  const raw_t<T>* __restrict__ m = static_cast<const raw_t<T>*>(a.exp_avgs[t]);
  const raw_t<T>* __restrict__ v = static_cast<const raw_t<T>*>(a.exp_avg_sqs[t]);
  const raw_t<T>* __restrict__ prev = static_cast<const raw_t<T>*>(a.prevs[t]);
  const AdamElement e = a.e;
  with_flag(e.coupled_weight_decay, [&](auto coupled) {
    for (int64_t block = begin; block < end; block += kBlock) {
      float dot[kLanes] = {0}, nrm[kLanes] = {0};
      for_lanes(std::min(kBlock, end - block), [&](int64_t j, int64_t k) {
        const int64_t i = block + j;
        const float pi = coupled() ? to_f32<T>(p[i]) : 0.0f;  // read only with coupled weight decay
        const float x = e.template gradient<coupled()>(to_f32<T>(g[i]), pi);
        const float d =
            e.direction(e.first_moment(to_f32<T>(m[i]), x), e.second_moment(to_f32<T>(v[i]), x));
        const float q = to_f32<T>(prev[i]);
        dot[k] += d * q;
        nrm[k] += d * d;
      });
      flush(dot, sums[0]);
      flush(nrm, sums[1]);
    }
  });
}

// The element rule and every tensor list's pointers, laid out as the aligner's params; `written`: the
// call writes the moments and prevs (a copied, realigned list is then copied back by aligner.finish()).
Args adam_args(const AdamHyper& h, const std::optional<at::Tensor>& grad_scale, LayoutAligner& aligner,
               at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList prevs,
               bool written) {
  Args args;
  args.e = adam_element(h, scale_ptr(grad_scale));
  args.params = pointers(aligner.params());
  args.grads = pointers(aligner.align(grads.vec(), false));
  args.exp_avgs = pointers(aligner.align(exp_avgs.vec(), written));
  args.exp_avg_sqs = pointers(aligner.align(exp_avg_sqs.vec(), written));
  args.prevs = pointers(aligner.align(prevs.vec(), written));
  return args;
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
  Args args = adam_args(h, grad_scale, aligner, grads_in, exp_avgs_in, exp_avg_sqs_in, prevs_in, true);
  args.lrs = per_tensor(lr, lr_value);
  args.regrets = regret ? regret->data_ptr<float>() : nullptr;
  args.decoupled_weight_decay = decoupled_weight_decay ? h.weight_decay : 0.0f;
  args.stream_prevs = streams(bytes_of(work) + bytes_of(grads_in.vec()) + bytes_of(exp_avgs_in.vec()) +
                              bytes_of(exp_avg_sqs_in.vec()) + bytes_of(prevs_in.vec()));
  const bool has_regret = regret.has_value();
  run_chunks(work, args, 0, [&](auto tag) -> Range {
    using T = typename decltype(tag)::type;
    if (has_regret) return use_prevs ? &adam_step_range<T, true, true> : &adam_step_range<T, true, false>;
    return use_prevs ? &adam_step_range<T, false, true> : &adam_step_range<T, false, false>;
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
  const Args args = adam_args(h, grad_scale, aligner, grads_in, exp_avgs_in, exp_avg_sqs_in, prevs_in, false);
  return run_chunks(work, args, 2, [&](auto tag) -> Range {
    using T = typename decltype(tag)::type;
    return &adam_reduce_range<T>;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(autolr_fused, CPU, m) {
  m.impl("adam_step", &adam_step_cpu);
  m.impl("adam_reduce", &adam_reduce_cpu);
}

}  // namespace cpu
}  // namespace autolr_fused
