// The CPU multi-tensor engine: every tensor of a call is cut into fixed chunks of kChunk elements,
// and one parallel region (at::parallel_for, OpenMP) walks the chunks of all tensors. Kernels are
// element loops instantiated per dtype and per combination of the flags that change the memory
// traffic (momentum, what is stored, regret, boundary), so that one pass reads and writes each
// array once, computes in float32 and rounds each stored value once; the other options are
// loop-invariant selects. In a large call, an array a pass writes without reading it is written with
// streaming stores (stream_copy).
//
// Statistics are deterministic whatever the thread count: kLanes float32 lanes sum a block of
// kBlock elements, a chunk adds its blocks' sums in double, and a tensor adds its chunks' sums in
// chunk order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace autolr_fused {
namespace cpu {

constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kBlock = 512;
constexpr int64_t kLanes = 16;

// The element loops see a tensor's storage as raw_t<T>: float, or the uint16_t bits of a bfloat16 or
// float16, converted by to_f32<T> and from_f32<T> below, which work on the bits. gcc vectorises neither
// copies of c10's 16-bit structs (aggregate copies) nor their conversion operators (calls or scalar
// intrinsics to it): a bfloat16 loop written with them ran at a ninth of a float32 one. The results
// equal c10's (and ATen's) for every finite value and infinity: widening is exact, narrowing rounds to
// nearest, ties to even, with overflow to infinity and float16 subnormals; a NaN stays a NaN.
template <typename T>
struct Storage {
  using type = float;
};
template <>
struct Storage<c10::BFloat16> {
  using type = uint16_t;
};
template <>
struct Storage<c10::Half> {
  using type = uint16_t;
};
template <typename T>
using raw_t = typename Storage<T>::type;

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

template <typename T>
inline float to_f32(raw_t<T> x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bits_to_float(uint32_t{x} << 16);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const uint32_t h = x, sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    // Normal: rebias the exponent (15 -> 127). All ones: infinity or NaN. Zero: mantissa * 2^-24.
    const uint32_t normal = ((exponent + 112u) << 23) | (mantissa << 13);
    const uint32_t special = 0x7F800000u | (mantissa << 13);
    const uint32_t subnormal = float_to_bits(static_cast<float>(static_cast<int32_t>(mantissa)) * 0x1p-24f);
    return bits_to_float(sign | (exponent == 0x1Fu ? special : exponent == 0 ? subnormal : normal));
  } else {
    return x;
  }
}

template <typename T>
inline raw_t<T> from_f32(float f) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t u = float_to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // ties to even; carries reach inf
    return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);  // NaN: c10's
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    // From 2^-14 on: rebias the exponent (127 -> 15) and round the 13 dropped bits, ties to even.
    const uint32_t normal = (a - 0x38000000u + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
    // Below: the float unit rounds |f| into 0.5 + k * 2^-24 (the ulp at 0.5), k the subnormal's bits
    // (k = 1024 is 2^-14, the smallest normal, whose bits are the same).
    const uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - 0x3F000000u;
    uint32_t h = a < 0x38800000u ? subnormal : normal;
    h = a >= 0x477FF000u ? 0x7C00u : h;  // 65520 and up round to infinity
    h = a > 0x7F800000u ? 0x7E00u : h;   // NaN
    return static_cast<uint16_t>(sign | h);
  } else {
    return f;
  }
}

// Non-temporal ("streaming") stores, for an array a pass writes without reading (the stored gradient
// or direction of TLR's step mode and SGD-HD). An ordinary store to a line that is not in cache first
// reads the line from memory (read-for-ownership); in a large call that array was last touched by the
// previous pass, far more bytes ago than the caches hold, so each of its lines costs a read and a
// write. Streaming stores write whole lines without reading them, but they also take them out of the
// cache, a loss when the next pass would have found them there: a call streams only when the
// parameter-sized tensors it reads and writes exceed kStreamBytes in all. 16 MiB is far above a core's
// L2 and half of a 32 MiB L3. Measured on a 2-core EPYC with a 32 MiB L3, an sgd_step(store) call
// streaming was 9% slower at 1 MiB (resnet50's shapes scaled down) and 3-15% faster from 8 MiB to
// resnet50's 400 MiB (many_small's 2000 tensors, 64 MiB, included).
// The stored values are the same; only the store instruction changes.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

inline int64_t bytes_of(const std::vector<at::Tensor>& list) {
  int64_t bytes = 0;
  for (const auto& t : list) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  return bytes;
}

// Whether a call whose parameter-sized tensors take `call_bytes` streams its write-only arrays.
inline bool streams(int64_t call_bytes) { return call_bytes > kStreamBytes; }

// dst[0, n) = src[0, n), src a block's staged values in L1: 16-byte streaming stores from the first
// 16-byte aligned element on, ordinary stores for the elements before it and for the tail. Plain
// copies where the target has no SSE2.
template <typename T>
inline void stream_copy(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  int64_t j = 0;
#if defined(__SSE2__)
  constexpr int64_t kPerStore = 16 / sizeof(T);
  for (; j < n && reinterpret_cast<std::uintptr_t>(dst + j) % 16 != 0; ++j) dst[j] = src[j];
  for (; j + kPerStore <= n; j += kPerStore) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + j), v);
  }
#endif
  for (; j < n; ++j) dst[j] = src[j];
}

// Streaming stores are weakly ordered: parallel_chunks fences them at the end of each thread's share,
// so that every thread sees them once the parallel region ends (a fence with none pending is cheap).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

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

// f(chunk, chunk_index) for every chunk, in one parallel region. Each thread fences the streaming
// stores its chunks made (stream_copy) before its share ends.
template <class F>
void parallel_chunks(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(chunks[i], i);
    stream_fence();
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

// Before an element loop whose arrays are distinct tensors: they never overlap, so the compiler may
// vectorise without runtime alias checks (with many arrays it gives up on the checks otherwise).
#if defined(__clang__)
#define AUTOLR_FUSED_NO_ALIAS _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define AUTOLR_FUSED_NO_ALIAS _Pragma("GCC ivdep")
#else
#define AUTOLR_FUSED_NO_ALIAS
#endif

// f(j, k) for j in [0, n) with k = j % kLanes; full groups of kLanes are a constant-trip inner
// loop the compiler vectorises, so per-lane accumulators stay in vector registers (the arrays f
// touches are distinct tensors).
template <class F>
inline void for_lanes(int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    AUTOLR_FUSED_NO_ALIAS
    for (int64_t k = 0; k < kLanes; ++k) f(j + k, k);
  }
  for (int64_t k = 0; j < n; ++j, ++k) f(j, k);
}

// Adds the lanes to a double accumulator in a fixed order and clears them.
inline void flush(float (&lanes)[kLanes], double& sum) {
  double s = 0.0;
  for (int64_t k = 0; k < kLanes; ++k) {
    s += lanes[k];
    lanes[k] = 0.0f;
  }
  sum += s;
}

// f(std::true_type{}) or f(std::false_type{}): a runtime flag as a compile-time constant, so that the
// element loop f instantiates has no test of it.
template <class F>
inline void with_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
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

inline std::vector<void*> pointers(const std::vector<at::Tensor>& list) {
  std::vector<void*> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(t.data_ptr());
  return out;
}

// Runs pick(TypeTag<T>{})(args, tensor, begin, end, sums) over every chunk in one parallel region,
// with T the chunk's tensor's dtype, and returns the (n, cols) statistics (an empty (0, 3) tensor
// when cols is 0). `sums` points at the chunk's cols partial sums.
template <class Args, class Pick>
at::Tensor run_chunks(const std::vector<at::Tensor>& work, const Args& args, int64_t cols, const Pick& pick) {
  const auto chunks = make_chunks(work);
  std::vector<double> partial(chunks.size() * cols + 3, 0.0);
  parallel_chunks(chunks, [&](const Chunk& c, int64_t index) {
    double* sums = cols != 0 ? partial.data() + index * cols : partial.data() + chunks.size() * cols;
    dispatch_dtype(work[c.tensor].scalar_type(), [&](auto tag) { pick(tag)(args, c.tensor, c.begin, c.end, sums); });
  });
  if (cols == 0) return at::empty({0, 3}, at::TensorOptions().dtype(at::kFloat));
  return sum_partials(chunks, partial, static_cast<int64_t>(work.size()), cols);
}

}  // namespace cpu
}  // namespace autolr_fused
