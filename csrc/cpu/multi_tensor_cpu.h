// The CPU multi-tensor engine: every tensor of a call is cut into fixed chunks of kChunk elements,
// and one parallel region (at::parallel_for, OpenMP) walks the chunks of all tensors. Inside a
// chunk, kernels stage kBlock elements at a time in float32 arrays on the stack, so each stage is
// a branch-free loop the compiler vectorises and every value is rounded to its storage dtype once.
//
// Statistics are deterministic whatever the thread count: a block sums in kLanes float32 lanes,
// a chunk adds its blocks' sums in double, and a tensor adds its chunks' sums in chunk order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace autolr_fused {
namespace cpu {

constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kBlock = 512;
constexpr int64_t kLanes = 16;

struct Chunk {
  int64_t tensor, begin, end;
};

inline std::vector<Chunk> make_chunks(const std::vector<at::Tensor>& params) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({static_cast<int64_t>(t), b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// f(chunk, chunk_index) for every chunk, in one parallel region.
template <class F>
void parallel_chunks(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(chunks[i], i);
  });
}

// Per-chunk partial sums (cols per chunk) to a float32 (n_tensors, cols) tensor, in chunk order.
inline at::Tensor sum_partials(const std::vector<Chunk>& chunks, const std::vector<double>& partial, int64_t n_tensors,
                               int64_t cols) {
  std::vector<double> totals(static_cast<size_t>(n_tensors * cols), 0.0);
  for (size_t i = 0; i < chunks.size(); ++i)
    for (int64_t c = 0; c < cols; ++c) totals[chunks[i].tensor * cols + c] += partial[i * cols + c];
  auto out = at::empty({n_tensors, cols}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (size_t i = 0; i < totals.size(); ++i) o[i] = static_cast<float>(totals[i]);
  return out;
}

// a * b + c rounded once where the CPU has FMA (as torch's own vectorised add(alpha=) and
// lerp kernels compute it, so FusedSGD matches torch.optim.SGD bit for bit), else twice.
inline float madd(float a, float b, float c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

template <typename T>
inline void load(float* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void store(T* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// The values `src` takes once stored as T (identity for float).
template <typename T>
inline void round_to(float* __restrict__ x, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(static_cast<T>(x[i]));
  }
}

// sum a[i] * b[i] over a block, in fixed lanes.
inline double dot_block(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += a[i + k] * b[i + k];
  for (int64_t k = 0; i < n; ++i, ++k) lanes[k] += a[i] * b[i];
  double s = 0.0;
  for (int64_t k = 0; k < kLanes; ++k) s += lanes[k];
  return s;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the C++ type of `dtype` (float, BFloat16, Half).
template <class F>
void dispatch_dtype(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      f(TypeTag<float>{});
      break;
    case at::kBFloat16:
      f(TypeTag<c10::BFloat16>{});
      break;
    case at::kHalf:
      f(TypeTag<c10::Half>{});
      break;
    default:
      TORCH_CHECK(false, "autolr_fused: unsupported dtype ", dtype);
  }
}

// A per-tensor float32 argument of 1 or n elements (lr, scale), or a constant.
struct PerTensor {
  const float* data = nullptr;
  int64_t numel = 0;
  float value = 0.0f;
  float at(int64_t t) const { return data == nullptr ? value : data[numel == 1 ? 0 : t]; }
};

inline PerTensor per_tensor(const std::optional<at::Tensor>& v, double fallback) {
  PerTensor out;
  out.value = static_cast<float>(fallback);
  if (v) {
    out.data = v->data_ptr<float>();
    out.numel = v->numel();
  }
  return out;
}

// GradScaler's scale (1 element), or nullptr.
inline const float* scale_ptr(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale) return nullptr;
  TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == at::kFloat,
              "autolr_fused: grad_scale must be a 1-element float32 tensor");
  return grad_scale->data_ptr<float>();
}

}  // namespace cpu
}  // namespace autolr_fused
