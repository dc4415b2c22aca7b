// Host-side pieces every device's implementation shares: argument checks, the hyperparameter
// records, and the layout alignment that lets a kernel walk a parameter and its state tensors as
// one flat array each.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>
#include <vector>

namespace autolr_fused {

using TensorList = std::vector<at::Tensor>;

struct SgdHyper {
  float momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize, first_step;
};

struct AdamHyper {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  bool decoupled_weight_decay, maximize;
  float bias_correction1, bias_correction2_sqrt;
};

inline SgdHyper make_sgd_hyper(double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                               bool first_step) {
  return {static_cast<float>(momentum), static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay),
          nesterov, maximize, first_step};
}

inline AdamHyper make_adam_hyper(double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                                 bool maximize, double bias_correction1, double bias_correction2_sqrt) {
  return {static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2), static_cast<float>(eps), static_cast<float>(weight_decay),
          decoupled, maximize, static_cast<float>(bias_correction1), static_cast<float>(bias_correction2_sqrt)};
}

// A list that must have one tensor per parameter, the parameter's shape and device, and (unless
// `any_float`) its dtype; an empty list passes when `optional`.
inline void check_list(const TensorList& params, const TensorList& list, const char* name, bool optional,
                       bool any_float = false, bool float32 = false) {
  if (optional && list.empty()) return;
  TORCH_CHECK(list.size() == params.size(), "autolr_fused: ", name, " has ", list.size(), " tensors, params has ",
              params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    const auto& p = params[i];
    TORCH_CHECK(t.device() == p.device(), "autolr_fused: ", name, "[", i, "] is on ", t.device(),
                ", its parameter on ", p.device());
    TORCH_CHECK(t.sizes() == p.sizes(), "autolr_fused: ", name, "[", i, "] has shape ", t.sizes(),
                ", its parameter ", p.sizes());
    if (float32) {
      TORCH_CHECK(t.scalar_type() == at::kFloat, "autolr_fused: ", name, "[", i, "] must be float32");
    } else if (!any_float) {
      TORCH_CHECK(t.scalar_type() == p.scalar_type(), "autolr_fused: ", name, "[", i, "] has dtype ",
                  t.scalar_type(), ", its parameter ", p.scalar_type());
    } else {
      TORCH_CHECK(at::isFloatingType(t.scalar_type()), "autolr_fused: ", name, "[", i, "] must be floating point");
    }
  }
}

inline void check_params(const TensorList& params) {
  for (size_t i = 0; i < params.size(); ++i) {
    auto dtype = params[i].scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "autolr_fused: params[", i, "] has dtype ", dtype, "; the fused kernels take float32, bfloat16 and "
                "float16 parameters");
    TORCH_CHECK(params[i].device() == params[0].device(), "autolr_fused: all params must be on one device");
  }
}

// A float32 vector argument of 1 or n elements (lr, scale) or exactly n (regret).
inline void check_vector(const std::optional<at::Tensor>& v, const char* name, size_t n, bool allow_one,
                         const at::Device& device) {
  if (!v) return;
  TORCH_CHECK(v->scalar_type() == at::kFloat, "autolr_fused: ", name, " must be a float32 tensor");
  TORCH_CHECK(v->device() == device, "autolr_fused: ", name, " is on ", v->device(), ", the params on ", device);
  TORCH_CHECK(v->is_contiguous(), "autolr_fused: ", name, " must be contiguous");
  TORCH_CHECK(static_cast<size_t>(v->numel()) == n || (allow_one && v->numel() == 1), "autolr_fused: ", name,
              " has ", v->numel(), " elements for ", n, " tensors");
}

// The lists every Adam op takes, aligned with params.
inline void check_adam_lists(const TensorList& params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs) {
  check_params(params);
  check_list(params, grads.vec(), "grads", false);
  check_list(params, exp_avgs.vec(), "exp_avgs", false);
  check_list(params, exp_avg_sqs.vec(), "exp_avg_sqs", false);
}

// sgd_step's regret without prevs reads the previous direction from the momentum buffers (before this step's
// update), which hold it only with momentum, without nesterov, and once they hold a step; nothing is stored then.
inline void check_regret_from_buffer(const SgdHyper& h, int64_t store_kind) {
  TORCH_CHECK(h.momentum != 0.0f && !h.nesterov && !h.first_step && store_kind == 0,
              "autolr_fused: a regret without prevs reads the momentum buffers, which needs momentum without "
              "nesterov, not the first step, and no store");
}

// The lists of a boundary pass (AutoDrop's epoch end, TLR's window end).
inline void check_boundary(const TensorList& params, const TensorList& snapshots,
                           const TensorList& prev_displacements, const std::optional<at::Tensor>& scale,
                           const TensorList& accumulators) {
  check_list(params, snapshots, "snapshots", false);
  check_list(params, prev_displacements, "prev_displacements", false);
  check_list(params, accumulators, "accumulators", true, false, true);
  if (!params.empty()) check_vector(scale, "scale", params.size(), true, params[0].device());
}

// Makes every tensor of a step walkable as one flat array in the parameter's memory order.
// A parameter that is not dense is replaced by a contiguous copy; a state tensor whose strides
// differ from its (working) parameter's by a copy with the parameter's layout. The aligner owns
// the copies; those of tensors the op writes are copied back by finish().
class LayoutAligner {
 public:
  explicit LayoutAligner(const TensorList& params) {
    work_params_.reserve(params.size());
    for (const auto& p : params) {
      if (p.is_non_overlapping_and_dense()) {
        work_params_.push_back(p);
      } else {
        auto copy = p.contiguous();
        write_back_.emplace_back(p, copy);
        work_params_.push_back(copy);
      }
    }
  }

  const TensorList& params() const { return work_params_; }

  TensorList align(const TensorList& list, bool written) {
    TensorList out;
    out.reserve(list.size());
    for (size_t i = 0; i < list.size(); ++i) {
      const auto& t = list[i];
      const auto& p = work_params_[i];
      if (t.strides() == p.strides()) {
        out.push_back(t);
      } else {
        auto copy = at::empty_like(p, t.options()).copy_(t);
        if (written) write_back_.emplace_back(t, copy);
        copies_.push_back(copy);  // alive until the aligner goes: kernels hold raw pointers into it
        out.push_back(copy);
      }
    }
    return out;
  }

  void finish() {
    for (auto& pair : write_back_) pair.first.copy_(pair.second);
    write_back_.clear();
  }

 private:
  TensorList work_params_;
  TensorList copies_;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back_;
};

}  // namespace autolr_fused
