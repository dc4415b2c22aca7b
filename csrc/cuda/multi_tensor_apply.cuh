// The CUDA multi-tensor engine every kernel of csrc/cuda shares.
//
// Takes: Op::kLists aligned tensor lists (list l, tensor t; an absent list is empty and its pointers
// are null), one entry per parameter, each tensor walked as one flat array in its parameter's memory
// order (LayoutAligner, common.h, makes that true). Writes: whatever the op writes in place; with
// Op::kStats > 0 also a float32 (n, kStats) statistics tensor, returned.
//
// Metadata: every tensor is cut into chunks of kChunk elements (an empty tensor into one empty
// chunk, so that every tensor owns a statistics slot), and one thread block handles one chunk. The
// pointers, sizes, dtypes and cumulative chunk counts of up to kMaxTensors tensors travel by value
// in the launch's kernel arguments (TensorListMeta, about kMetadataBytes: kernel arguments above
// 4 KB need CUDA 12.1 and a Volta or newer GPU); a block finds its tensor by binary search over the
// cumulative chunk counts, so the number of chunks per launch is unbounded. Kernel arguments are
// captured by value in a CUDA graph, so no host memory is read after the launch and nothing is
// copied to the device. A call over more tensors than one launch holds makes several launches.
//
// Statistics are deterministic: each thread sums its elements' products in double (a product of
// two floats is exact in double), a block adds its threads' sums in a fixed tree and writes them to
// the chunk's slot of a float64 scratch buffer (slots are numbered in tensor order, chunks in
// element order); the block that handles a tensor's first chunk also writes the tensor's slot
// range. A second kernel, one warp per tensor, adds each tensor's slots in a fixed order and
// rounds to float32 once. No atomics: reruns are bit-identical. Hence at most 2 kernel launches
// per call while the tensors fit one launch's metadata.
//
// Elements: one thread handles kVec<T> = 16 / sizeof(T) consecutive elements at a time, loaded and
// stored with 16-byte accesses when every pointer of the tensor is 16-byte aligned (else one
// element at a time, bounds-checked). Values are computed in float32 and rounded to the storage
// dtype once, on store. Offsets are 64-bit: a tensor may have more than 2^31 elements.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "autolr_fused/common.h"

namespace autolr_fused {
namespace cuda {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Two resident blocks per multiprocessor (1024 threads) cap a thread at 64 registers: no spills in
// any op, and 16-byte loads of every list in flight, far more than the memory system needs.
constexpr int kMinBlocks = 2;
constexpr int64_t kChunk = int64_t{1} << 16;
// Bytes of per-tensor metadata one launch carries in its kernel arguments (limit: 32764 bytes in
// all): 334 tensors a launch for 4 lists, 287 for 5 (Adam), 224 for 7 (sgd_step with a boundary).
constexpr int kMetadataBytes = 16384;

enum Dtype : uint8_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline Dtype dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kFloat32;
    case at::kBFloat16:
      return kBFloat16;
    case at::kHalf:
      return kFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "autolr_fused: unsupported dtype ", t);
  return kFloat32;
}

// ------------------------------------------------------------------------------ element access
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// The value x takes once stored as T.
template <typename T>
__device__ __forceinline__ float rounded(float x) {
  return to_float(from_float<T>(x));
}

template <typename S>
struct alignas(16) Pack {
  S v[16 / sizeof(S)];
};

// x[k] = src[k] for k < n (0 beyond); `vector`: n is N and src 16-byte aligned.
template <int N, typename S>
__device__ __forceinline__ void load(float (&x)[N], const S* src, int n, bool vector) {
  constexpr int kPer = 16 / sizeof(S);
  static_assert(N % kPer == 0, "a group is whole 16-byte packs");
  if (vector) {
#pragma unroll
    for (int j = 0; j < N / kPer; ++j) {
      const Pack<S> pack = reinterpret_cast<const Pack<S>*>(src)[j];
#pragma unroll
      for (int k = 0; k < kPer; ++k) x[j * kPer + k] = to_float(pack.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] = k < n ? to_float(src[k]) : 0.0f;
  }
}

// dst[k] = x[k] rounded to S, for k < n.
template <int N, typename S>
__device__ __forceinline__ void store(S* dst, const float (&x)[N], int n, bool vector) {
  constexpr int kPer = 16 / sizeof(S);
  if (vector) {
#pragma unroll
    for (int j = 0; j < N / kPer; ++j) {
      Pack<S> pack;
#pragma unroll
      for (int k = 0; k < kPer; ++k) pack.v[k] = from_float<S>(x[j * kPer + k]);
      reinterpret_cast<Pack<S>*>(dst)[j] = pack;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < n) dst[k] = from_float<S>(x[k]);
  }
}

// sum += a[k] * b[k] over the n valid elements, exactly per product.
template <int N>
__device__ __forceinline__ void dot(double& sum, const float (&a)[N], const float (&b)[N], int n) {
#pragma unroll
  for (int k = 0; k < N; ++k)
    if (k < n) sum = fma(static_cast<double>(a[k]), static_cast<double>(b[k]), sum);
}

// What multiplies every gradient: (maximize ? -1 : 1) / GradScaler's scale, as the CPU kernels (and
// torch's fused optimizers) unscale, by the scale's reciprocal.
__device__ __forceinline__ float gradient_factor(bool maximize, const float* grad_scale) {
  const float inverse_scale = grad_scale != nullptr ? __fdiv_rn(1.0f, *grad_scale) : 1.0f;
  return maximize ? -inverse_scale : inverse_scale;
}

// What an op sees of one chunk: its tensor's pointers, the tensor's position in the call, and the
// element range [begin, end) with the 16-byte alignment of every pointer.
template <int Lists>
struct ChunkView {
  void* const* ptr;  // ptr[l]: list l's tensor (null when the list is absent)
  int64_t index, begin, end;
  bool aligned;

  template <typename S>
  __device__ __forceinline__ S* at(int list) const {
    return static_cast<S*>(ptr[list]);
  }
};

// f(first element, element count) for each group of N elements this thread handles in [begin, end).
template <int N, class F>
__device__ __forceinline__ void for_each_group(int64_t begin, int64_t end, const F& f) {
  for (int64_t base = begin + static_cast<int64_t>(threadIdx.x) * N; base < end;
       base += static_cast<int64_t>(kThreads) * N) {
    f(base, static_cast<int>(end - base < N ? end - base : N));
  }
}

// ------------------------------------------------------------------------------ metadata
template <int Lists>
struct TensorListMeta {
  static constexpr int kPerTensor = 8 * Lists + 8 + 4 + 4 + 1;
  static constexpr int kMaxTensors = (kMetadataBytes - 16) / kPerTensor;

  int64_t first_slot;  // the call's slot number of this launch's first chunk
  int32_t n_tensors;
  void* ptr[kMaxTensors][Lists];
  int64_t numel[kMaxTensors];
  int32_t chunk_end[kMaxTensors];  // chunks of tensors 0..t of this launch
  int32_t index[kMaxTensors];      // the tensor's position in the call
  uint8_t dtype[kMaxTensors];
};

// Where each block writes its chunk's statistics, and each tensor its slot range.
struct Partials {
  double* sums;     // (slots, kStats)
  int64_t* ranges;  // (n, 2): first slot, slot count
};

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Thread 0 gets the block's sums of `sums`, added in a fixed tree.
template <int K>
__device__ __forceinline__ void block_sum(double (&sums)[K]) {
  __shared__ double warp_sums[kWarps][K];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const double v = warp_sum(sums[k]);
    if (lane == 0) warp_sums[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double s = 0.0;
      for (int w = 0; w < kWarps; ++w) s += warp_sums[w][k];
      sums[k] = s;
    }
  }
}

// One block per chunk: find the chunk's tensor, run `op` on it with the tensor's dtype, and write
// the chunk's statistics.
template <class Op>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    multi_tensor_kernel(const __grid_constant__ TensorListMeta<Op::kLists> meta, const Op op, Partials partials) {
  const int32_t chunk = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = meta.n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (meta.chunk_end[mid] > chunk) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int t = lo;
  const int32_t first_chunk = t == 0 ? 0 : meta.chunk_end[t - 1];
  const int64_t begin = static_cast<int64_t>(chunk - first_chunk) * kChunk;
  const int64_t numel = meta.numel[t];
  uintptr_t bits = 0;
#pragma unroll
  for (int l = 0; l < Op::kLists; ++l) bits |= reinterpret_cast<uintptr_t>(meta.ptr[t][l]);
  const ChunkView<Op::kLists> view{meta.ptr[t], meta.index[t], begin, numel < begin + kChunk ? numel : begin + kChunk,
                                   bits % 16 == 0};

  double sums[Op::kStats > 0 ? Op::kStats : 1] = {};
  switch (meta.dtype[t]) {
    case kFloat32:
      op.template run<float>(view, sums);
      break;
    case kBFloat16:
      op.template run<__nv_bfloat16>(view, sums);
      break;
    default:
      op.template run<__half>(view, sums);
      break;
  }
  if constexpr (Op::kStats > 0) {
    block_sum(sums);
    if (threadIdx.x == 0) {
      const int64_t slot = meta.first_slot + chunk;
#pragma unroll
      for (int k = 0; k < Op::kStats; ++k) partials.sums[slot * Op::kStats + k] = sums[k];
      if (begin == 0) {
        partials.ranges[2 * view.index] = slot;
        partials.ranges[2 * view.index + 1] = meta.chunk_end[t] - first_chunk;
      }
    }
  }
}

// One warp per tensor: out[t] = the sum of tensor t's slots, in a fixed order, rounded once.
template <int K>
__global__ void sum_partials_kernel(const double* __restrict__ sums, const int64_t* __restrict__ ranges,
                                    float* __restrict__ out, int64_t n_tensors) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (t >= n_tensors) return;  // warp-uniform
  const int64_t first = ranges[2 * t], count = ranges[2 * t + 1];
  double s[K] = {};
  for (int64_t j = lane; j < count; j += 32)
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] += sums[(first + j) * K + k];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const double v = warp_sum(s[k]);
    if (lane == 0) out[t * K + k] = static_cast<float>(v);
  }
}

// ------------------------------------------------------------------------------ host side
// A per-tensor float32 argument of 1 or n elements (lr, scale) in device memory, or a constant.
struct PerTensor {
  const float* data = nullptr;
  int64_t numel = 0;
  float value = 0.0f;
  __device__ __forceinline__ float at(int64_t t) const { return data == nullptr ? value : data[numel == 1 ? 0 : t]; }
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

// GradScaler's scale (1 element, on the parameters' device), or nullptr.
inline const float* scale_ptr(const std::optional<at::Tensor>& grad_scale, const at::Device& device) {
  if (!grad_scale) return nullptr;
  TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == at::kFloat,
              "autolr_fused: grad_scale must be a 1-element float32 tensor");
  TORCH_CHECK(grad_scale->device() == device, "autolr_fused: grad_scale is on ", grad_scale->device(),
              ", the params on ", device);
  return grad_scale->data_ptr<float>();
}

inline int64_t chunks_of(const at::Tensor& t) { return std::max<int64_t>(1, (t.numel() + kChunk - 1) / kChunk); }

// Runs `op` over every tensor of `lists` (lists[0]: the parameters, which fix the dtype and the
// device); returns the float32 (n, Op::kStats) statistics when the op has any, else an undefined
// tensor. Everything runs on the current stream of the parameters' device; nothing synchronises.
template <class Op>
at::Tensor multi_tensor_apply(const std::array<const TensorList*, Op::kLists>& lists, const Op& op) {
  using Meta = TensorListMeta<Op::kLists>;
  static_assert(sizeof(Meta) + sizeof(Op) + sizeof(Partials) <= 32764, "kernel arguments over the limit");
  const TensorList& params = *lists[0];
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) return Op::kStats > 0 ? at::empty({0, Op::kStats}, at::TensorOptions().dtype(at::kFloat)) : at::Tensor();
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto options = params[0].options();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Partials partials{nullptr, nullptr};
  at::Tensor sums, ranges;
  if constexpr (Op::kStats > 0) {
    int64_t slots = 0;
    for (const auto& p : params) slots += chunks_of(p);
    sums = at::empty({slots, Op::kStats}, options.dtype(at::kDouble));
    ranges = at::empty({n, 2}, options.dtype(at::kLong));
    partials = {sums.data_ptr<double>(), ranges.data_ptr<int64_t>()};
  }

  Meta meta{};
  int64_t chunks = 0;  // in the launch being filled
  int64_t next_slot = 0;
  auto launch = [&]() {
    multi_tensor_kernel<Op><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(meta, op, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    next_slot += chunks;
    meta.first_slot = next_slot;
    meta.n_tensors = 0;
    chunks = 0;
  };
  for (int64_t t = 0; t < n; ++t) {
    const int64_t c = chunks_of(params[t]);
    TORCH_CHECK(c < std::numeric_limits<int32_t>::max(), "autolr_fused: params[", t, "] is too large");
    if (meta.n_tensors == Meta::kMaxTensors || chunks + c > std::numeric_limits<int32_t>::max()) launch();
    const int i = meta.n_tensors++;
    for (int l = 0; l < Op::kLists; ++l) meta.ptr[i][l] = lists[l]->empty() ? nullptr : (*lists[l])[t].data_ptr();
    meta.numel[i] = params[t].numel();
    chunks += c;
    meta.chunk_end[i] = static_cast<int32_t>(chunks);
    meta.index[i] = static_cast<int32_t>(t);
    meta.dtype[i] = dtype_code(params[t].scalar_type());
  }
  launch();

  if constexpr (Op::kStats > 0) {
    at::Tensor out = at::empty({n, Op::kStats}, options.dtype(at::kFloat));
    constexpr int kReduceThreads = 256;
    const int64_t blocks = (n * 32 + kReduceThreads - 1) / kReduceThreads;
    sum_partials_kernel<Op::kStats><<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(
        partials.sums, partials.ranges, out.data_ptr<float>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  return at::Tensor();
}

}  // namespace cuda
}  // namespace autolr_fused
