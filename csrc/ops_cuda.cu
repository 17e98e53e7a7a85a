// CUDA implementations of the fused_balance ops (multi-tensor apply).
//
// One call builds a metadata table on the host (tensor pointers, sizes, segment ids, chunk ->
// tensor/offset, segment -> chunks), copies it to the device with one asynchronous copy from
// pinned memory on the current stream, and launches one kernel per stage over all chunks of all
// tensors, whatever their number:
//   gram:          stage 1 writes one partial per (chunk, pair), stage 2 sums them per segment in
//                  a fixed order (no float atomics: results are deterministic run to run);
//   combine(_into), balanced_adamw_: one launch, each element read and written once.
// The chunking, pair indexing, combine order and AdamW element update are those of
// multi_tensor.h, shared with the CPU kernels.
//
// Only c10/cuda headers are used (ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstring>
#include <vector>

#include "block_reduce.cuh"
#include "multi_tensor.h"
#include "ops_common.h"

namespace fused_balance {
namespace cuda {
namespace {

constexpr int kThreads = 256;              // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 4;                    // elements per vectorised access
constexpr int kBlocksPerSm = 32;           // grid cap for the grid-stride loops (above residency:
                                           // one chunk per block balances best)

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// ------------------------------------------------------------------------- metadata table
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

// Packs host arrays into one pinned buffer, then one cudaMemcpyAsync (through Tensor::to, which
// also keeps the pinned block alive until the copy has run) on the current stream.
class MetaBuilder {
 public:
  template <typename E>
  size_t add(const E* data, size_t count) {
    const size_t offset = (bytes_.size() + 15) & ~size_t(15);
    bytes_.resize(offset + count * sizeof(E));
    if (count) std::memcpy(bytes_.data() + offset, data, count * sizeof(E));
    return offset;
  }
  template <typename E>
  size_t add(const std::vector<E>& v) { return add(v.data(), v.size()); }

  at::Tensor upload(const at::Device& device) const {
    at::Tensor host = at::empty({int64_t(bytes_.size()) + 16}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), bytes_.data(), bytes_.size());
    return host.to(host.options().device(device).pinned_memory(std::nullopt), /*non_blocking=*/true);
  }

 private:
  std::vector<uint8_t> bytes_;
};

template <typename P>
const P* at_offset(const at::Tensor& buf, size_t offset) {
  return reinterpret_cast<const P*>(static_cast<const uint8_t*>(buf.data_ptr()) + offset);
}

std::vector<int64_t> addresses(const std::vector<const void*>& ptrs) {
  std::vector<int64_t> out(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) out[i] = int64_t(reinterpret_cast<uintptr_t>(ptrs[i]));
  return out;
}
std::vector<int64_t> addresses(const std::vector<void*>& ptrs) {
  std::vector<int64_t> out(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) out[i] = int64_t(reinterpret_cast<uintptr_t>(ptrs[i]));
  return out;
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0; }

// vec_ok[p]: the K gradients (and the extra pointers, e.g. outputs) of tensor p start on a
// kVec-element boundary. Chunk starts are multiples of kChunkElems, so chunks inherit it.
std::vector<int32_t> vector_alignment(const GradTable& g, const std::vector<void*>* extra, int64_t extra_esize) {
  std::vector<int32_t> ok(g.P, 1);
  const int64_t bytes = kVec * elem_size(g.code);
  for (int64_t p = 0; p < g.P; ++p) {
    for (int64_t k = 0; k < g.K; ++k) ok[p] &= aligned(g.ptr(k, p), bytes);
    if (extra) ok[p] &= aligned((*extra)[p], kVec * extra_esize);
  }
  return ok;
}

int grid_for(int64_t work_items) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = int64_t(sms > 0 ? sms : 1) * kBlocksPerSm;
  return int(work_items < cap ? (work_items > 0 ? work_items : 1) : cap);
}

// ------------------------------------------------------------------------ device helpers
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

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

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

// Sum over the block, in a fixed order (warp shuffles, then warps in index order); the result is
// valid in thread 0. `scratch` holds kWarps values; the caller synchronises before reusing it.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

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

// ---------------------------------------------------------------------------- Gram kernels
// Stage 1, K <= KMAX: all pairs of a chunk accumulate in registers (indexed in the KMAX layout,
// written out in the K layout), per-thread sums in the accumulate type, block sums in double.
template <typename T, int KMAX>
__global__ void __launch_bounds__(kThreads) gram_partials_kernel(Meta meta, int64_t num_chunks, double* partials) {
  using A = acc_t<T>;
  constexpr int NPMAX = KMAX * (KMAX + 1) / 2;
  __shared__ double scratch[kWarps][NPMAX];
  const int K = meta.K;
  const int npairs = pair_count(K);
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int p = meta.chunk_tensor[c];
    const int64_t start = meta.chunk_start[c];
    const int64_t len = chunk_length(meta.numel[p], start, kChunkElems);
    const T* g[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      g[k] = k < K ? reinterpret_cast<const T*>(meta.grad_ptrs[int64_t(k) * meta.P + p]) + start : nullptr;
    A acc[NPMAX];
#pragma unroll
    for (int q = 0; q < NPMAX; ++q) acc[q] = A(0);

    int64_t first_scalar = 0;
    if (meta.vec_ok[p]) {
      const int64_t nvec = len / kVec;
      for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
        A x[KMAX][kVec];
#pragma unroll
        for (int k = 0; k < KMAX; ++k) {
          if (k < K) load_vec<T>(g[k] + v * kVec, x[k]);
        }
        int q = 0;
#pragma unroll
        for (int k = 0; k < KMAX; ++k) {
#pragma unroll
          for (int l = k; l < KMAX; ++l, ++q) {
            if (l < K) {
#pragma unroll
              for (int j = 0; j < kVec; ++j) acc[q] = fma_acc(x[k][j], x[l][j], acc[q]);
            }
          }
        }
      }
      first_scalar = nvec * kVec;
    }
    for (int64_t i = first_scalar + threadIdx.x; i < len; i += kThreads) {
      A x[KMAX];
#pragma unroll
      for (int k = 0; k < KMAX; ++k) x[k] = k < K ? to_acc<A>(g[k][i]) : A(0);
      int q = 0;
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
#pragma unroll
        for (int l = k; l < KMAX; ++l, ++q) acc[q] = fma_acc(x[k], x[l], acc[q]);
      }
    }

    // Block sums of every pair, in a fixed order (shared with the plan's Gram).
    store_block_pair_sums<KMAX, kWarps>(acc, scratch, K, npairs, partials + c * npairs);
  }
}

// Stage 1 for any K: one pair at a time over the chunk (re-reads come from L2).
template <typename T>
__global__ void __launch_bounds__(kThreads) gram_partials_pairwise_kernel(Meta meta, int64_t num_chunks, double* partials) {
  using A = acc_t<T>;
  __shared__ double scratch[kWarps];
  const int K = meta.K;
  const int npairs = pair_count(K);
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int p = meta.chunk_tensor[c];
    const int64_t start = meta.chunk_start[c];
    const int64_t len = chunk_length(meta.numel[p], start, kChunkElems);
    const GradsOf<T> g{meta.grad_ptrs, meta.P, p, start};
    for (int q = 0; q < npairs; ++q) {
      int k, l;
      pair_of_index(q, K, &k, &l);
      const T* a = g[k];
      const T* b = g[l];
      A acc = A(0);
      int64_t first_scalar = 0;
      if (meta.vec_ok[p]) {
        const int64_t nvec = len / kVec;
        for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
          A xa[kVec], xb[kVec];
          load_vec<T>(a + v * kVec, xa);
          load_vec<T>(b + v * kVec, xb);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc = fma_acc(xa[j], xb[j], acc);
        }
        first_scalar = nvec * kVec;
      }
      for (int64_t i = first_scalar + threadIdx.x; i < len; i += kThreads)
        acc = fma_acc(to_acc<A>(a[i]), to_acc<A>(b[i]), acc);
      const double total = block_sum(double(acc), scratch);
      if (threadIdx.x == 0) partials[c * npairs + q] = total;
      __syncthreads();
    }
  }
}

// Stage 2: block s sums the partials of segment s's chunks for each pair and writes both
// triangles of G[s]. The order of the sum depends only on the chunk list (fixed by the host).
template <typename A>
__global__ void __launch_bounds__(kThreads) gram_reduce_kernel(Meta meta, const double* partials, A* out) {
  __shared__ double scratch[kWarps];
  const int K = meta.K;
  const int npairs = pair_count(K);
  const int64_t s = blockIdx.x;
  const int64_t begin = meta.seg_offsets[s], end = meta.seg_offsets[s + 1];
  for (int q = 0; q < npairs; ++q) {
    double v = 0.0;
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) v += partials[int64_t(meta.seg_chunks[j]) * npairs + q];
    const double total = block_sum(v, scratch);
    if (threadIdx.x == 0) {
      int k, l;
      pair_of_index(q, K, &k, &l);
      out[(s * K + k) * K + l] = A(total);
      out[(s * K + l) * K + k] = A(total);
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------- combine kernel
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(Meta meta, int64_t num_chunks, const acc_t<T>* weights,
                                                           const bool* skip) {
  using A = acc_t<T>;
  if (skip != nullptr && *skip) return;
  const int K = meta.K;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int p = meta.chunk_tensor[c];
    const int64_t start = meta.chunk_start[c];
    const int64_t len = chunk_length(meta.numel[p], start, kChunkElems);
    const GradsOf<T> g{meta.grad_ptrs, meta.P, p, start};
    const A* w = weights + meta.segment[p] * K;
    T* out = reinterpret_cast<T*>(meta.out_ptrs[p]) + start;
    int64_t first_scalar = 0;
    if (meta.vec_ok[p]) {
      const int64_t nvec = len / kVec;
      for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
        A d[kVec], x[kVec];
        load_vec<T>(g[0] + v * kVec, x);
        const A w0 = w[0];
#pragma unroll
        for (int j = 0; j < kVec; ++j) d[j] = mul_rn(w0, x[j]);
#pragma unroll 4
        for (int k = 1; k < K; ++k) {
          load_vec<T>(g[k] + v * kVec, x);
          const A wk = w[k];
#pragma unroll
          for (int j = 0; j < kVec; ++j) d[j] = add_rn(d[j], mul_rn(wk, x[j]));
        }
        store_vec<T>(out + v * kVec, d);  // after every read of this element: out may alias g[k]
      }
      first_scalar = nvec * kVec;
    }
    for (int64_t i = first_scalar + threadIdx.x; i < len; i += kThreads)
      out[i] = from_acc<T>(combine_element<A>(g, K, w, i));
  }
}

// --------------------------------------------------------------------------- AdamW kernel
// T: gradient dtype; A: math type (double for fp64 params, else float). The combined gradient is
// formed in registers; params / moments are read and written once, in their own dtypes.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) adamw_kernel(Meta meta, int64_t num_chunks, const acc_t<T>* weights,
                                                         const bool* skip, int32_t p_code, int32_t m_code,
                                                         int32_t v_code, AdamWConsts<A> base) {
  using GA = acc_t<T>;
  if (skip != nullptr && *skip) return;
  const int K = meta.K;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int p = meta.chunk_tensor[c];
    const int64_t start = meta.chunk_start[c];
    const int64_t len = chunk_length(meta.numel[p], start, kChunkElems);
    const GradsOf<T> g{meta.grad_ptrs, meta.P, p, start};
    const GA* w = weights + meta.segment[p] * K;
    AdamWConsts<A> consts = base;
    consts.decay = A(meta.decay[p]);
    consts.step_size = A(meta.step_size[p]);
    void* param = reinterpret_cast<void*>(meta.out_ptrs[p]);
    void* exp_avg = reinterpret_cast<void*>(meta.exp_avg_ptrs[p]);
    void* exp_avg_sq = reinterpret_cast<void*>(meta.exp_avg_sq_ptrs[p]);
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const int64_t e = start + i;
      // A 16-bit combination is rounded to the gradient dtype first (the rule of every backend).
      const A d = A(round_through<T>(combine_element<GA>(g, K, w, i)));
      A pv = load_as<A>(param, p_code, e);
      A mv = load_as<A>(exp_avg, m_code, e);
      A vv = load_as<A>(exp_avg_sq, v_code, e);
      adamw_update(pv, mv, vv, d, consts);
      store_as(param, p_code, e, pv);
      store_as(exp_avg, m_code, e, mv);
      store_as(exp_avg_sq, v_code, e, vv);
    }
  }
}

// ----------------------------------------------------------------------------- host side
template <typename F>
void dispatch_dtype(int32_t code, F&& f) {
  switch (code) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kBFloat16: f(bf16_t{}); break;
    case kFloat16: f(f16_t{}); break;
  }
}

void check_cuda(const char* op, const GradTable& g) {
  TORCH_CHECK_VALUE(g.device.is_cuda(), "fused_balance::", op, ": CUDA kernel called with tensors on ", g.device);
}

const bool* skip_pointer(const std::optional<at::Tensor>& skip) {
  return (skip.has_value() && skip->defined()) ? skip->data_ptr<bool>() : nullptr;
}

// Weights in the gradients' accumulate type, contiguous, on the device.
at::Tensor device_weights(const at::Tensor& weights, const GradTable& g) {
  return weights.to(accumulate_type(g.dtype)).contiguous();
}

at::Tensor gram_cuda(at::TensorList grads, int64_t num_objectives, at::IntArrayRef segment_ids, int64_t num_segments) {
  TORCH_CHECK_VALUE(num_segments >= 1, "fused_balance::gram: num_segments must be >= 1, got ", num_segments);
  const GradTable g = make_grad_table("gram", grads, num_objectives, segment_ids, num_segments);
  check_cuda("gram", g);
  const c10::cuda::CUDAGuard guard(g.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device.index()).stream();
  const at::ScalarType acc = accumulate_type(g.dtype);
  const int64_t C = g.num_chunks();
  const int npairs = pair_count(int(g.K));
  at::Tensor out = at::empty({g.S, g.K, g.K}, grads[0].options().dtype(acc));
  if (C == 0) return out.zero_();

  const SegmentChunks sc = make_segment_chunks(g);
  MetaBuilder b;
  const size_t o_ptrs = b.add(addresses(g.ptrs));
  const size_t o_numel = b.add(g.numel);
  const size_t o_vec = b.add(vector_alignment(g, nullptr, 0));
  const size_t o_ct = b.add(g.chunk_tensor);
  const size_t o_cs = b.add(g.chunk_start);
  const size_t o_so = b.add(sc.offsets);
  const size_t o_sc = b.add(sc.chunks);
  const at::Tensor table = b.upload(g.device);
  Meta meta;
  meta.grad_ptrs = at_offset<int64_t>(table, o_ptrs);
  meta.numel = at_offset<int64_t>(table, o_numel);
  meta.vec_ok = at_offset<int32_t>(table, o_vec);
  meta.chunk_tensor = at_offset<int32_t>(table, o_ct);
  meta.chunk_start = at_offset<int64_t>(table, o_cs);
  meta.seg_offsets = at_offset<int64_t>(table, o_so);
  meta.seg_chunks = at_offset<int32_t>(table, o_sc);
  meta.K = int32_t(g.K);
  meta.P = int32_t(g.P);

  at::Tensor partials = at::empty({C, npairs}, grads[0].options().dtype(at::kDouble));
  const int grid = grid_for(C);
  dispatch_dtype(g.code, [&](auto tag) {
    using T = decltype(tag);
    double* part = partials.data_ptr<double>();
    if (g.K <= 2) gram_partials_kernel<T, 2><<<grid, kThreads, 0, stream>>>(meta, C, part);
    else if (g.K <= 4) gram_partials_kernel<T, 4><<<grid, kThreads, 0, stream>>>(meta, C, part);
    else if (g.K <= 8) gram_partials_kernel<T, 8><<<grid, kThreads, 0, stream>>>(meta, C, part);
    else gram_partials_pairwise_kernel<T><<<grid, kThreads, 0, stream>>>(meta, C, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const unsigned reduce_grid = unsigned(g.S);
  if (acc == at::kDouble)
    gram_reduce_kernel<double><<<reduce_grid, kThreads, 0, stream>>>(meta, partials.data_ptr<double>(), out.data_ptr<double>());
  else
    gram_reduce_kernel<float><<<reduce_grid, kThreads, 0, stream>>>(meta, partials.data_ptr<double>(), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// combine into the table's outputs (new tensors or work copies of `out`).
void launch_combine(const GradTable& g, const at::Tensor& weights, const std::vector<void*>& out_ptrs,
                    const bool* skip) {
  const int64_t C = g.num_chunks();
  if (C == 0) return;
  const c10::cuda::CUDAGuard guard(g.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device.index()).stream();
  const at::Tensor w = device_weights(weights, g);
  MetaBuilder b;
  const size_t o_ptrs = b.add(addresses(g.ptrs));
  const size_t o_numel = b.add(g.numel);
  const size_t o_seg = b.add(g.segment);
  const size_t o_vec = b.add(vector_alignment(g, &out_ptrs, elem_size(g.code)));
  const size_t o_ct = b.add(g.chunk_tensor);
  const size_t o_cs = b.add(g.chunk_start);
  const size_t o_out = b.add(addresses(out_ptrs));
  const at::Tensor table = b.upload(g.device);
  Meta meta;
  meta.grad_ptrs = at_offset<int64_t>(table, o_ptrs);
  meta.numel = at_offset<int64_t>(table, o_numel);
  meta.segment = at_offset<int64_t>(table, o_seg);
  meta.vec_ok = at_offset<int32_t>(table, o_vec);
  meta.chunk_tensor = at_offset<int32_t>(table, o_ct);
  meta.chunk_start = at_offset<int64_t>(table, o_cs);
  meta.out_ptrs = at_offset<int64_t>(table, o_out);
  meta.K = int32_t(g.K);
  meta.P = int32_t(g.P);
  const int grid = grid_for(C);
  dispatch_dtype(g.code, [&](auto tag) {
    using T = decltype(tag);
    combine_kernel<T><<<grid, kThreads, 0, stream>>>(meta, C, static_cast<const acc_t<T>*>(w.data_ptr()), skip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<at::Tensor> combine_cuda(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids) {
  TORCH_CHECK_VALUE(weights.dim() == 2, "fused_balance::combine: weights must be [S, K], got shape ", weights.sizes());
  const GradTable g = make_grad_table("combine", grads, weights.size(1), segment_ids, weights.size(0));
  check_cuda("combine", g);
  check_weights("combine", weights, g);
  const c10::cuda::CUDAGuard guard(g.device);
  std::vector<at::Tensor> outs;
  std::vector<void*> ptrs;
  outs.reserve(g.P);
  for (int64_t p = 0; p < g.P; ++p) {
    outs.push_back(at::empty(g.tensors[p].sizes(), g.tensors[p].options()));
    ptrs.push_back(outs.back().data_ptr());
  }
  launch_combine(g, weights, ptrs, nullptr);
  return outs;
}

void combine_into_cuda(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids,
                       at::TensorList out, const std::optional<at::Tensor>& skip) {
  TORCH_CHECK_VALUE(weights.dim() == 2, "fused_balance::combine_into: weights must be [S, K], got shape ",
                    weights.sizes());
  const GradTable g = make_grad_table("combine_into", grads, weights.size(1), segment_ids, weights.size(0));
  check_cuda("combine_into", g);
  check_weights("combine_into", weights, g);
  check_skip("combine_into", skip, g);
  const c10::cuda::CUDAGuard guard(g.device);
  OutputTable o = make_output_table("combine_into", "out", out, g);
  TORCH_CHECK_TYPE(o.dtype == g.dtype, "fused_balance::combine_into: out has dtype ", o.dtype,
                   ", the gradients ", g.dtype);
  launch_combine(g, weights, o.ptrs, skip_pointer(skip));
  o.finish();  // copies of non-contiguous outputs go back on the same stream (unchanged if skipped)
}

void balanced_adamw_cuda(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids,
                         at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                         at::ArrayRef<double> lrs, at::ArrayRef<double> weight_decays, double beta1, double beta2,
                         double eps, int64_t step, const std::optional<at::Tensor>& skip) {
  const char* op = "balanced_adamw_";
  TORCH_CHECK_VALUE(weights.dim() == 2, "fused_balance::", op, ": weights must be [S, K], got shape ", weights.sizes());
  const GradTable g = make_grad_table(op, grads, weights.size(1), segment_ids, weights.size(0));
  check_cuda(op, g);
  check_weights(op, weights, g);
  check_skip(op, skip, g);
  check_adamw_scalars(beta1, beta2, eps, step);
  const c10::cuda::CUDAGuard guard(g.device);
  const std::vector<double> lr = per_tensor(op, "lrs", lrs, g.P);
  const std::vector<double> wd = per_tensor(op, "weight_decays", weight_decays, g.P);
  OutputTable Pt = make_output_table(op, "params", params, g);
  OutputTable Mt = make_output_table(op, "exp_avgs", exp_avgs, g);
  OutputTable Vt = make_output_table(op, "exp_avg_sqs", exp_avg_sqs, g);
  const int64_t C = g.num_chunks();
  if (C > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device.index()).stream();
    const at::Tensor w = device_weights(weights, g);
    std::vector<double> decay(g.P), step_size(g.P);
    for (int64_t p = 0; p < g.P; ++p) {
      const AdamWConsts<double> c = make_adamw_consts<double>(lr[p], wd[p], beta1, beta2, eps, step);
      decay[p] = c.decay;
      step_size[p] = c.step_size;
    }
    MetaBuilder b;
    const size_t o_ptrs = b.add(addresses(g.ptrs));
    const size_t o_numel = b.add(g.numel);
    const size_t o_seg = b.add(g.segment);
    const size_t o_ct = b.add(g.chunk_tensor);
    const size_t o_cs = b.add(g.chunk_start);
    const size_t o_p = b.add(addresses(Pt.ptrs));
    const size_t o_m = b.add(addresses(Mt.ptrs));
    const size_t o_v = b.add(addresses(Vt.ptrs));
    const size_t o_decay = b.add(decay);
    const size_t o_step = b.add(step_size);
    const at::Tensor table = b.upload(g.device);
    Meta meta;
    meta.grad_ptrs = at_offset<int64_t>(table, o_ptrs);
    meta.numel = at_offset<int64_t>(table, o_numel);
    meta.segment = at_offset<int64_t>(table, o_seg);
    meta.chunk_tensor = at_offset<int32_t>(table, o_ct);
    meta.chunk_start = at_offset<int64_t>(table, o_cs);
    meta.out_ptrs = at_offset<int64_t>(table, o_p);
    meta.exp_avg_ptrs = at_offset<int64_t>(table, o_m);
    meta.exp_avg_sq_ptrs = at_offset<int64_t>(table, o_v);
    meta.decay = at_offset<double>(table, o_decay);
    meta.step_size = at_offset<double>(table, o_step);
    meta.K = int32_t(g.K);
    meta.P = int32_t(g.P);
    const int grid = grid_for(C);
    const bool* skip_ptr = skip_pointer(skip);
    dispatch_dtype(g.code, [&](auto tag) {
      using T = decltype(tag);
      const auto* wp = static_cast<const acc_t<T>*>(w.data_ptr());
      if (Pt.code == kFloat64) {
        const auto base = make_adamw_consts<double>(0.0, 0.0, beta1, beta2, eps, step);
        adamw_kernel<T, double><<<grid, kThreads, 0, stream>>>(meta, C, wp, skip_ptr, Pt.code, Mt.code, Vt.code, base);
      } else {
        const auto base = make_adamw_consts<float>(0.0, 0.0, beta1, beta2, eps, step);
        adamw_kernel<T, float><<<grid, kThreads, 0, stream>>>(meta, C, wp, skip_ptr, Pt.code, Mt.code, Vt.code, base);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  Pt.finish();
  Mt.finish();
  Vt.finish();
}

}  // namespace
}  // namespace cuda
}  // namespace fused_balance

TORCH_LIBRARY_IMPL(fused_balance, CUDA, m) {
  m.impl("gram", &fused_balance::cuda::gram_cuda);
  m.impl("combine", &fused_balance::cuda::combine_cuda);
  m.impl("combine_into", &fused_balance::cuda::combine_into_cuda);
  m.impl("balanced_adamw_", &fused_balance::cuda::balanced_adamw_cuda);
}
