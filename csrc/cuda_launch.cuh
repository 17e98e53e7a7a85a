// What every CUDA translation unit of the extension shares: launch shape, grid sizing, the element
// load/store helpers, and the list ops' metadata table (accumulate types and the dtype dispatch
// with_type come from multi_tensor.h, shared with the CPU kernels).
//
// The list ops (gram_cuda.cu, combine_cuda.cu, adamw_cuda.cu) build a metadata table on the host
// (tensor pointers, sizes, segment ids, chunk -> tensor/offset, segment -> chunks), copy it to the
// device with one asynchronous copy from pinned memory on the current stream, and launch one
// kernel per stage over all chunks of all tensors, whatever their number. The plan ops
// (bank_cuda.cu) read a table the plan uploaded once and use only the launch helpers.
//
// Included by several .cu files, so nothing here has internal-only linkage needs: host functions
// are inline, device helpers __forceinline__ (inline) or templates, constants constexpr.
// Only c10/cuda headers are used (ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_runtime.h>

#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "multi_tensor.h"
#include "ops_common.h"

namespace fused_balance {
namespace cuda {

constexpr int kThreads = 256;              // threads per block, every chunk kernel
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 4;                    // elements per vectorised access

// Multiprocessors of `device`, read once per device.
inline int sm_count(int device) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it == counts.end()) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    it = counts.emplace(device, n).first;
  }
  return it->second;
}

// Blocks of `kernel` (kThreads threads, `dynamic_smem` bytes of dynamic shared memory) resident on
// one multiprocessor of `device`, asked once per (kernel, device, dynamic_smem). A host query: no
// device work, no synchronisation, nothing a CUDA graph capture minds.
inline int resident_blocks_per_sm(const void* kernel, int device, size_t dynamic_smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t>, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, dynamic_smem);
  auto it = counts.find(key);
  if (it == counts.end()) {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, dynamic_smem));
    it = counts.emplace(key, n).first;
  }
  return it->second;
}

// Blocks of `kernel` resident on the whole current device at once: one wave.
template <typename... Args>
int64_t wave_of(void (*kernel)(Args...), size_t dynamic_smem = 0) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const void* entry = reinterpret_cast<const void*>(kernel);
  return int64_t(sm_count(device)) * resident_blocks_per_sm(entry, device, dynamic_smem);
}

// Grid for `kernel`'s grid-stride loop over work_items chunks (or slices): one block per item up to
// one whole wave (whole_wave_blocks, multi_tensor.h), so a large launch is a persistent grid that
// fills every SM once instead of a wave and a fraction.
template <typename... Args>
int grid_for(void (*kernel)(Args...), int64_t work_items, size_t dynamic_smem = 0) {
  return int(whole_wave_blocks(work_items, wave_of(kernel, dynamic_smem)));
}

// The optional device-side skip flag (kernels return at once when it is set), or null.
inline const bool* skip_pointer(const std::optional<at::Tensor>& skip) {
  return (skip.has_value() && skip->defined()) ? skip->data_ptr<bool>() : nullptr;
}

// ------------------------------------------------------------------------ device helpers
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename T>
__device__ __forceinline__ void load_vec(const T* ptr, acc_t<T> (&x)[kVec]);

template <>
__device__ __forceinline__ void load_vec<float>(const float* ptr, float (&x)[kVec]) {
  const float4 v = *reinterpret_cast<const float4*>(ptr);
  x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
}
template <>
__device__ __forceinline__ void load_vec<double>(const double* ptr, double (&x)[kVec]) {
  const double2 a = reinterpret_cast<const double2*>(ptr)[0];
  const double2 b = reinterpret_cast<const double2*>(ptr)[1];
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}
template <typename H>
__device__ __forceinline__ void load_vec16(const H* ptr, float (&x)[kVec]) {
  const uint2 v = *reinterpret_cast<const uint2*>(ptr);
  const H h[kVec] = {H{uint16_t(v.x & 0xffffu)}, H{uint16_t(v.x >> 16)}, H{uint16_t(v.y & 0xffffu)},
                     H{uint16_t(v.y >> 16)}};
#pragma unroll
  for (int j = 0; j < kVec; ++j) x[j] = to_acc<float>(h[j]);
}
template <>
__device__ __forceinline__ void load_vec<bf16_t>(const bf16_t* ptr, float (&x)[kVec]) { load_vec16(ptr, x); }
template <>
__device__ __forceinline__ void load_vec<f16_t>(const f16_t* ptr, float (&x)[kVec]) { load_vec16(ptr, x); }

template <typename T>
__device__ __forceinline__ void store_vec(T* ptr, const acc_t<T> (&x)[kVec]);

template <>
__device__ __forceinline__ void store_vec<float>(float* ptr, const float (&x)[kVec]) {
  *reinterpret_cast<float4*>(ptr) = make_float4(x[0], x[1], x[2], x[3]);
}
template <>
__device__ __forceinline__ void store_vec<double>(double* ptr, const double (&x)[kVec]) {
  reinterpret_cast<double2*>(ptr)[0] = make_double2(x[0], x[1]);
  reinterpret_cast<double2*>(ptr)[1] = make_double2(x[2], x[3]);
}
template <typename H>
__device__ __forceinline__ void store_vec16(H* ptr, const float (&x)[kVec]) {
  uint16_t h[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) h[j] = from_acc<H>(x[j]).bits;
  *reinterpret_cast<uint2*>(ptr) = make_uint2(uint32_t(h[0]) | (uint32_t(h[1]) << 16),
                                              uint32_t(h[2]) | (uint32_t(h[3]) << 16));
}
template <>
__device__ __forceinline__ void store_vec<bf16_t>(bf16_t* ptr, const float (&x)[kVec]) { store_vec16(ptr, x); }
template <>
__device__ __forceinline__ void store_vec<f16_t>(f16_t* ptr, const float (&x)[kVec]) { store_vec16(ptr, x); }

// 16-byte accesses: N elements of T (N * sizeof(T) a multiple of 16) as 128-bit loads / stores
// of raw bits, each element converted with to_acc / from_acc exactly as a scalar access is, so a
// vector loop rounds like the scalar one. N == 1 is the plain scalar access (the tail). The
// pointer must be 16-byte aligned when N > 1 (aligned16).
__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ uint32_t word_of(const uint4& u, int w) {
  return w == 0 ? u.x : (w == 1 ? u.y : (w == 2 ? u.z : u.w));
}
__device__ __forceinline__ void set_word(uint4& u, int w, uint32_t x) {
  if (w == 0) u.x = x;
  else if (w == 1) u.y = x;
  else if (w == 2) u.z = x;
  else u.w = x;
}

// Element j of a 16-byte pack of T: its value in A, and its bits set from a value in A.
template <typename T> struct Pack16;
template <> struct Pack16<float> {
  static constexpr int n = 4;
  template <typename A> __device__ __forceinline__ static A get(const uint4& u, int j) {
    return to_acc<A>(__uint_as_float(word_of(u, j)));
  }
  template <typename A> __device__ __forceinline__ static void put(uint4& u, int j, A x) {
    set_word(u, j, __float_as_uint(from_acc<float>(x)));
  }
};
template <> struct Pack16<double> {
  static constexpr int n = 2;
  template <typename A> __device__ __forceinline__ static A get(const uint4& u, int j) {
    return to_acc<A>(__hiloint2double(int(word_of(u, 2 * j + 1)), int(word_of(u, 2 * j))));
  }
  template <typename A> __device__ __forceinline__ static void put(uint4& u, int j, A x) {
    const double d = from_acc<double>(x);
    set_word(u, 2 * j, uint32_t(__double2loint(d)));
    set_word(u, 2 * j + 1, uint32_t(__double2hiint(d)));
  }
};
template <typename H> struct Pack16Half {  // bf16_t, f16_t: two elements per 32-bit word
  static constexpr int n = 8;
  template <typename A> __device__ __forceinline__ static A get(const uint4& u, int j) {
    return to_acc<A>(H{uint16_t(word_of(u, j / 2) >> (16 * (j % 2)))});
  }
  template <typename A> __device__ __forceinline__ static void put(uint4& u, int j, A x) {
    const uint32_t bits = from_acc<H>(x).bits;
    set_word(u, j / 2, j % 2 ? (word_of(u, j / 2) & 0xffffu) | (bits << 16) : bits);  // low half first
  }
};
template <> struct Pack16<bf16_t> : Pack16Half<bf16_t> {};
template <> struct Pack16<f16_t> : Pack16Half<f16_t> {};

// p, known to address global memory: a pointer read from memory (a metadata table, shared
// memory) is generic to the compiler, and generic accesses (LD.E / ST.E) replace LDG / STG.
template <typename T>
__device__ __forceinline__ T* global_ptr(T* p) {
  __builtin_assume(__isGlobal(p));
  return p;
}

// ReadOnly: through the read-only data cache (ld.global.nc, __ldg), for data no thread of the
// kernel writes (a bank the kernel only reads; the pointer arithmetic of the alignment tests
// would otherwise keep the compiler from proving it from __restrict__).
template <typename T>
__device__ __forceinline__ T ldg_elem(const T* p) {
  if constexpr (sizeof(T) == 2) return T{__ldg(reinterpret_cast<const unsigned short*>(p))};
  else return __ldg(p);
}

// N elements of T as loaded, not yet converted (raw packs: a load in flight is not waited for
// until unpack_elems reads it, so a caller can issue the next load first).
template <int N, typename T>
struct RawElems {
  static constexpr int packs = N == 1 ? 1 : N / Pack16<T>::n;
  static_assert(N == 1 || N % Pack16<T>::n == 0, "whole 16-byte packs");
  uint4 pack[N == 1 ? 1 : packs];
  T scalar;
};

template <int N, bool ReadOnly = false, typename T>
__device__ __forceinline__ void load_raw(const T* ptr, RawElems<N, T>& raw) {
  if constexpr (N == 1) {
    raw.scalar = ReadOnly ? ldg_elem(ptr) : *ptr;
  } else {
#pragma unroll
    for (int q = 0; q < RawElems<N, T>::packs; ++q) {
      const uint4* pack = reinterpret_cast<const uint4*>(ptr) + q;
      raw.pack[q] = ReadOnly ? __ldg(pack) : *pack;
    }
  }
}

template <int N, typename T, typename A>
__device__ __forceinline__ void unpack_elems(const RawElems<N, T>& raw, A (&x)[N]) {
  if constexpr (N == 1) {
    x[0] = to_acc<A>(raw.scalar);
  } else {
    constexpr int n = Pack16<T>::n;
#pragma unroll
    for (int q = 0; q < N / n; ++q) {
#pragma unroll
      for (int j = 0; j < n; ++j) x[q * n + j] = Pack16<T>::template get<A>(raw.pack[q], j);
    }
  }
}

template <int N, bool ReadOnly = false, typename T, typename A>
__device__ __forceinline__ void load_elems(const T* ptr, A (&x)[N]) {
  RawElems<N, T> raw;
  load_raw<N, ReadOnly>(ptr, raw);
  unpack_elems(raw, x);
}

// One weak 128-bit global store (STG.E.128). A plain `*p = u` of a uint4 assembled from converted
// elements is split by the compiler into narrower stores, and __stwb compiles to a strong
// (STG.E.128.STRONG.SM) store. Global memory is addressed identically through generic pointers.
__device__ __forceinline__ void store16(uint4* p, const uint4& u) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
               : "memory");
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store_elems(T* ptr, const A (&x)[N]) {
  if constexpr (N == 1) {
    *ptr = from_acc<T>(x[0]);
  } else {
    constexpr int n = Pack16<T>::n;
    static_assert(N % n == 0, "whole 16-byte packs");
#pragma unroll
    for (int q = 0; q < N / n; ++q) {
      uint4 u = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int j = 0; j < n; ++j) Pack16<T>::template put<A>(u, j, x[q * n + j]);
      store16(reinterpret_cast<uint4*>(ptr) + q, u);
    }
  }
}

// Element i of a tensor whose dtype is known only at run time (ElemType code), in math type A.
template <typename A>
__device__ __forceinline__ A load_as(const void* base, int32_t code, int64_t i) {
  switch (code) {
    case kFloat64: return A(static_cast<const double*>(base)[i]);
    case kBFloat16: return A(to_acc<float>(static_cast<const bf16_t*>(base)[i]));
    case kFloat16: return A(to_acc<float>(static_cast<const f16_t*>(base)[i]));
    default: return A(static_cast<const float*>(base)[i]);
  }
}

template <typename A>
__device__ __forceinline__ void store_as(void* base, int32_t code, int64_t i, A x) {
  switch (code) {
    case kFloat64: static_cast<double*>(base)[i] = double(x); break;
    case kBFloat16: static_cast<bf16_t*>(base)[i] = from_acc<bf16_t>(x); break;
    case kFloat16: static_cast<f16_t*>(base)[i] = from_acc<f16_t>(x); break;
    default: static_cast<float*>(base)[i] = float(x); break;
  }
}

// ------------------------------------------------------------- list ops: metadata table
// Device view of the table; every field points into one device buffer.
struct Meta {
  const int64_t* grad_ptrs = nullptr;    // [K * P] addresses, objective-major
  const int64_t* numel = nullptr;        // [P]
  const int64_t* segment = nullptr;      // [P]
  const int32_t* vec_ok = nullptr;       // [P] all pointers of tensor p allow kVec-wide accesses
  const int32_t* chunk_tensor = nullptr; // [C]
  const int64_t* chunk_start = nullptr;  // [C]
  const int64_t* seg_offsets = nullptr;  // [S + 1]
  const int32_t* seg_chunks = nullptr;   // [C]
  const int64_t* out_ptrs = nullptr;     // [P] combine outputs / AdamW params
  const int64_t* exp_avg_ptrs = nullptr; // [P]
  const int64_t* exp_avg_sq_ptrs = nullptr;  // [P]
  const double* decay = nullptr;         // [P] 1 - lr wd
  const double* step_size = nullptr;     // [P] lr / (1 - beta1^step)
  int32_t K = 0;
  int32_t P = 0;
};

// Objective k's gradient of tensor p, as a typed pointer (g[k] for combine_element).
template <typename T>
struct GradsOf {
  const int64_t* ptrs;
  int32_t P, p;
  int64_t start;
  __device__ const T* operator[](int k) const {
    return reinterpret_cast<const T*>(ptrs[int64_t(k) * P + p]) + start;
  }
};

// Chunk c of the table: its tensor, first element and length (kernels bind them by name:
// `const auto [p, start, len] = chunk_span(meta, c);`).
struct ChunkSpan {
  int p;
  int64_t start, len;
};

__device__ __forceinline__ ChunkSpan chunk_span(const Meta& meta, int64_t c) {
  const int p = meta.chunk_tensor[c];
  const int64_t start = meta.chunk_start[c];
  return {p, start, chunk_length(meta.numel[p], start, kChunkElems)};
}

// Chunk c of a weighted op (combine, AdamW): its span, the K gradients there and the weights of
// the tensor's segment.
template <typename T>
struct WeightedChunk {
  int p;
  int64_t start, len;
  GradsOf<T> g;
  const acc_t<T>* w;
};

template <typename T>
__device__ __forceinline__ WeightedChunk<T> weighted_chunk(const Meta& meta, int64_t c, const acc_t<T>* weights) {
  const ChunkSpan s = chunk_span(meta, c);
  return {s.p, s.start, s.len, GradsOf<T>{meta.grad_ptrs, meta.P, s.p, s.start}, weights + meta.segment[s.p] * meta.K};
}

template <typename V>
std::vector<int64_t> addresses(const std::vector<V*>& ptrs) {
  std::vector<int64_t> out(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) out[i] = int64_t(reinterpret_cast<uintptr_t>(ptrs[i]));
  return out;
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0; }

// vec_ok[p]: the K gradients (and the extra pointers, e.g. outputs) of tensor p start on a
// kVec-element boundary. Chunk starts are multiples of kChunkElems, so chunks inherit it.
inline std::vector<int32_t> vector_alignment(const GradTable& g, const std::vector<void*>* extra,
                                             int64_t extra_esize) {
  std::vector<int32_t> ok(g.P, 1);
  const int64_t bytes = kVec * elem_size(g.code);
  for (int64_t p = 0; p < g.P; ++p) {
    for (int64_t k = 0; k < g.K; ++k) ok[p] &= aligned(g.ptr(k, p), bytes);
    if (extra) ok[p] &= aligned((*extra)[p], kVec * extra_esize);
  }
  return ok;
}

// Packs host arrays into one pinned buffer, then one cudaMemcpyAsync (through Tensor::to, which
// also keeps the pinned block alive until the copy has run) on the current stream. Starts with
// the fields every list op reads (gradients, sizes, segments, chunk table, K, P); put() adds more.
class MetaTable {
 public:
  explicit MetaTable(const GradTable& g) {
    put(&Meta::grad_ptrs, addresses(g.ptrs));
    put(&Meta::numel, g.numel);
    put(&Meta::segment, g.segment);
    put(&Meta::chunk_tensor, g.chunk_tensor);
    put(&Meta::chunk_start, g.chunk_start);
    meta_.K = int32_t(g.K);
    meta_.P = int32_t(g.P);
  }

  // meta.*field will point at the device copy of values.
  template <typename E>
  void put(const E* Meta::*field, const std::vector<E>& values) {
    const size_t offset = (bytes_.size() + 15) & ~size_t(15);
    bytes_.resize(offset + values.size() * sizeof(E));
    if (!values.empty()) std::memcpy(bytes_.data() + offset, values.data(), values.size() * sizeof(E));
    fields_.push_back([field, offset](Meta& m, const uint8_t* base) {
      m.*field = reinterpret_cast<const E*>(base + offset);
    });
  }

  // Copies the table to `device` (stream-ordered) and returns the kernels' view of it; the device
  // buffer lives as long as this object.
  Meta upload(const at::Device& device) {
    at::Tensor host = at::empty({int64_t(bytes_.size()) + 16},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), bytes_.data(), bytes_.size());
    device_ = host.to(host.options().device(device).pinned_memory(std::nullopt), /*non_blocking=*/true);
    const auto* base = static_cast<const uint8_t*>(device_.data_ptr());
    for (const auto& set : fields_) set(meta_, base);
    return meta_;
  }

 private:
  std::vector<uint8_t> bytes_;
  std::vector<std::function<void(Meta&, const uint8_t*)>> fields_;
  Meta meta_;
  at::Tensor device_;
};

// Weights in the gradients' accumulate type, contiguous, on the device.
inline at::Tensor device_weights(const at::Tensor& weights, const GradTable& g) {
  return weights.to(accumulate_type(g.dtype)).contiguous();
}

}  // namespace cuda
}  // namespace fused_balance
