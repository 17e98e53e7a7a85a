// CUDA implementations of the plan ops (schemas in ops_cpu.cpp's TORCH_LIBRARY block).
//
// The gradients live in one [K, ld] bank and the chunk table (multi_tensor.h, PlanColumn) was
// copied to the device once by fused_balance.BalancePlan, so a call uploads nothing: no host
// table, no pinned copy, no host synchronisation, and every per-step scalar (weights, skip, the
// AdamW step count and hyper-parameters) is read from device memory. A planned step can
// therefore be captured in a CUDA graph and replayed.
//   bank_gram:         stage 1, one float64 partial per (chunk, pair) (products of fp32 values are
//                      exact in double; K > 8: pair tiles, gram_tiles.cuh); stage 2, one warp per
//                      (segment, pair) sums the partials in the fixed order the CPU follows too,
//                      and found_inf, on the device.
//   bank_combine_into: one launch; bank_adamw_: one launch (+ one small launch counting the steps).
//                      Both over slices of chunks (chunk_slices), on a grid of one whole wave.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "block_reduce.cuh"
#include "cuda_launch.cuh"
#include "gram_tiles.cuh"
#include "bank_common.h"

namespace fused_balance {
namespace cuda {
namespace {

constexpr int kMaxObjectives = 64;  // weights of a chunk's segment held in shared memory

void check_weights_fit_shared_memory(const char* op, const BankView& b) {
  TORCH_CHECK_VALUE(b.K <= kMaxObjectives, "fused_balance::", op, ": at most ", kMaxObjectives, " objectives");
}

// The table is built by BalancePlan and read on the device only: every chunk is checked against
// the tensors it indexes (a device-side assert, as torch's own index kernels do) instead of
// trusting it, so a table or weights of the wrong size never read or write out of bounds.
struct TableBounds {
  int64_t row;       // elements in a bank row (and in out / the moments)
  int64_t segments;  // rows of weights
  int64_t params;    // entries of param_ptrs (AdamW)
  int64_t groups;    // rows of hyper (AdamW)
};

__device__ __forceinline__ void check_chunk(const int64_t* r, const TableBounds& bounds, bool adamw) {
  CUDA_KERNEL_ASSERT(r[kColStart] >= 0 && r[kColLength] >= 1 && r[kColLength] <= kChunkElems &&
                     r[kColStart] + r[kColLength] <= bounds.row);
  CUDA_KERNEL_ASSERT(r[kColSegment] >= 0 && r[kColSegment] < bounds.segments);
  if (adamw) {
    CUDA_KERNEL_ASSERT(r[kColParam] >= 0 && r[kColParam] < bounds.params && r[kColParamOffset] >= 0);
    CUDA_KERNEL_ASSERT(r[kColGroup] >= 0 && r[kColGroup] < bounds.groups);
  }
}

// ------------------------------------------------------------- 16-byte accesses
// How a chunk's [0, len) is split for N-wide 16-byte accesses: elements [head, head + nvec N) in
// vectors, [0, head) and the tail one by one. head (< 16 bytes of elements) aligns `lead`; the
// chunk is vectorised only when every stream (`others_aligned`, tested at head) and every
// bank row (rows ld elements apart) is 16-byte aligned there too. Uniform per block (it depends
// on the chunk only), so no barrier is affected.
struct VecSplit {
  int64_t head, nvec;
  // element j of the scalar remainder (j < len - nvec N)
  __device__ __forceinline__ int64_t scalar_index(int64_t j, int N) const { return j < head ? j : j + nvec * N; }
};

template <int N, typename L, typename T>
__device__ __forceinline__ int64_t align_head(const L* lead, int64_t len) {
  static_assert(N * sizeof(L) >= 16 && N * sizeof(T) >= 16, "N elements fill 16-byte packs");
  const int64_t h = int64_t(((16u - (reinterpret_cast<uintptr_t>(lead) & 15u)) & 15u) / sizeof(L));
  return h < len ? h : len;
}

template <int N, typename T>
__device__ __forceinline__ VecSplit vec_split(int64_t head, int64_t len, const T* bank_row, int64_t ld, int K,
                                              bool others_aligned) {
  const bool ok = others_aligned && aligned16(bank_row + head) && (K == 1 || (ld * int64_t(sizeof(T))) % 16 == 0);
  return {head, ok ? (len - head) / N : 0};
}

// --------------------------------------------------------------------------------- Gram
// Elements [i, i + N) of the K rows g[k] (k < K; the others read as zeros) into the pair
// accumulators, element by element in index order (so a vector adds its products exactly as N
// scalar steps would). N > 1: one 16-byte read-only load per row (g[k] + i 16-byte aligned),
// all K issued before the first product; N == 1: the scalar path.
template <int N, int KMAX, typename T>
__device__ __forceinline__ void accumulate_rows(const T* const (&g)[KMAX], int K, int64_t i,
                                                double (&acc)[KMAX * (KMAX + 1) / 2]) {
  RawElems<N, T> raw[KMAX];
#pragma unroll
  for (int k = 0; k < KMAX; ++k)
    if (k < K) load_raw<N, true>(g[k] + i, raw[k]);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    double x[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      if constexpr (N == 1) x[k] = k < K ? to_acc<double>(raw[k].scalar) : 0.0;
      else x[k] = k < K ? Pack16<T>::template get<double>(raw[k].pack[j / Pack16<T>::n], j % Pack16<T>::n) : 0.0;
    }
    accumulate_pair_products<KMAX>(x, acc);
  }
}

// Stage 1, K <= KMAX: all pairs in registers, each bank element loaded once: 16-byte loads where
// the chunk's rows are 16-byte aligned (every chunk of a GradBank: its parameters and row stride
// are), a scalar head and tail otherwise (vec_split, as combine). Each thread's products are
// summed in a fixed order (its vectors, then its scalar elements), then the block's in a fixed
// order (warp shuffles, then warps in index order): deterministic, whatever the grid.
template <typename T, int KMAX>
__global__ void __launch_bounds__(kThreads) gram_partials(const T* __restrict__ bank, int64_t ld, int K,
                                                          const int64_t* __restrict__ chunks, int64_t C,
                                                          double* __restrict__ partials, TableBounds bounds) {
  constexpr int NPMAX = KMAX * (KMAX + 1) / 2;
  constexpr int N = Pack16<T>::n;  // elements per 16-byte vector
  __shared__ double scratch[kWarps][NPMAX];
  const int npairs = pair_count(K);
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    check_chunk(chunks + c * kPlanColumns, bounds, false);
    const int64_t start = chunks[c * kPlanColumns + kColStart];
    const int64_t len = chunks[c * kPlanColumns + kColLength];
    const T* g[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) g[k] = bank + int64_t(k < K ? k : 0) * ld + start;
    double acc[NPMAX];
#pragma unroll
    for (int q = 0; q < NPMAX; ++q) acc[q] = 0.0;
    const VecSplit split = vec_split<N>(align_head<N, T, T>(g[0], len), len, g[0], ld, K, true);
    for (int64_t vi = threadIdx.x; vi < split.nvec; vi += kThreads)
      accumulate_rows<N, KMAX>(g, K, split.head + vi * N, acc);
    const int64_t rest = len - split.nvec * N;
    for (int64_t j = threadIdx.x; j < rest; j += kThreads)
      accumulate_rows<1, KMAX>(g, K, split.scalar_index(j, N), acc);
    store_block_pair_sums<KMAX, kWarps>(acc, scratch, K, npairs, partials + c * npairs);
  }
}

// Stage 1 for K > 8: pair tiles over slabs staged in shared memory (gram_tiles.cuh).
template <typename T>
struct BankRows {  // rows[k]: objective k's first element of the chunk
  const T* first;
  int64_t ld;
  __device__ const T* operator[](int k) const { return first + int64_t(k) * ld; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gram_partials_tiled(const T* __restrict__ bank, int64_t ld, int K,
                                                                const int64_t* __restrict__ chunks, int64_t C,
                                                                double* __restrict__ partials, TableBounds bounds) {
  __shared__ uint4 stage[kStageSlots<double>];
  const int npairs = pair_count(K);
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    check_chunk(chunks + c * kPlanColumns, bounds, false);
    const int64_t start = chunks[c * kPlanColumns + kColStart];
    const int64_t len = chunks[c * kPlanColumns + kColLength];
    gram_tiles_chunk<T, double>(BankRows<T>{bank + start, ld}, K, len, partials + c * npairs, stage);
  }
}

// Stage 2: one warp per (segment, pair) sums that segment's chunk partials in the fixed order of
// reduce_partials_fixed_order (bank_common.h: lanes strided over the chunks, then the shuffle
// tree), which the CPU follows too; writes both triangles, and any non-finite total raises
// found_inf. One block (its warps take the items in turn): the flag needs no second launch.
__global__ void __launch_bounds__(kThreads) gram_reduce(const double* __restrict__ partials, int64_t C,
                                                        const int64_t* __restrict__ seg_offsets, int64_t S, int K,
                                                        double* __restrict__ out, bool* __restrict__ found_inf) {
  static_assert(kReduceLanes == 32, "one warp per (segment, pair)");
  __shared__ int nonfinite;
  if (threadIdx.x == 0) nonfinite = 0;
  __syncthreads();
  const int npairs = pair_count(K);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int bad = 0;
  for (int64_t item = warp; item < S * npairs; item += kWarps) {
    const int64_t s = item / npairs;
    const int q = int(item % npairs);
    const int64_t begin = seg_offsets[s], end = seg_offsets[s + 1];
    CUDA_KERNEL_ASSERT(begin >= 0 && begin <= end && end <= C);
    double t = 0.0;
    for (int64_t c = begin + lane; c < end; c += 32) t += partials[c * npairs + q];
    t = warp_sum(t);
    if (lane == 0) {
      int k, l;
      pair_of_index(q, K, &k, &l);
      out[(s * K + k) * K + l] = t;
      out[(s * K + l) * K + k] = t;
      bad |= !isfinite(t);
    }
  }
  if (bad) atomicOr(&nonfinite, 1);
  __syncthreads();
  if (threadIdx.x == 0) *found_inf = nonfinite != 0;
}

std::tuple<at::Tensor, at::Tensor> bank_gram_cuda(const at::Tensor& bank, const at::Tensor& chunks,
                                                  const at::Tensor& seg_offsets, int64_t num_segments) {
  const BankView b = check_bank_gram(bank, chunks, seg_offsets, num_segments, at::kCUDA);
  TORCH_CHECK_VALUE(b.K <= kMaxTiledGramObjectives, "fused_balance::bank_gram: at most ", kMaxTiledGramObjectives,
                    " objectives on CUDA, got ", b.K);
  const int64_t C = chunks.size(0);
  const c10::cuda::CUDAGuard guard(b.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(b.device.index()).stream();
  const int K = int(b.K);
  const int npairs = pair_count(K);
  at::Tensor partials = at::empty({std::max<int64_t>(C, 1) * npairs}, bank.options().dtype(at::kDouble));
  at::Tensor G = at::empty({num_segments, b.K, b.K}, bank.options().dtype(at::kDouble));
  at::Tensor found_inf = at::empty({}, bank.options().dtype(at::kBool));
  if (C > 0) {
    with_type(b.code, [&](auto tag) {
      using T = decltype(tag);
      const T* base = static_cast<const T*>(bank.data_ptr());
      const int64_t* tab = chunks.data_ptr<int64_t>();
      double* part = partials.data_ptr<double>();
      const TableBounds bounds{b.row, num_segments, 0, 0};
      const auto launch = [&](auto kernel) {
        kernel<<<grid_for(kernel, C), kThreads, 0, stream>>>(base, b.ld, K, tab, C, part, bounds);
      };
      if (K <= 2) launch(gram_partials<T, 2>);
      else if (K <= 4) launch(gram_partials<T, 4>);
      else if (K <= 8) launch(gram_partials<T, 8>);
      else launch(gram_partials_tiled<T>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  gram_reduce<<<1, kThreads, 0, stream>>>(partials.data_ptr<double>(), C, seg_offsets.data_ptr<int64_t>(),
                                          num_segments, K, G.data_ptr<double>(), found_inf.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {G, found_inf};
}

// ------------------------------------------------------------------------------ combine
// The K weights of the chunk's segment, rounded once to A (saturating), in shared memory.
template <typename A>
__device__ __forceinline__ void load_segment_weights(const double* weights, int64_t segment, int K, A* ws) {
  __syncthreads();  // the previous item's readers are done
  for (int k = threadIdx.x; k < K; k += kThreads) ws[k] = weight_as<A>(weights[segment * K + k]);
  __syncthreads();
}

// Elements [i, i + N) of sum_k ws[k] g[k ld + .]: each product and sum rounded in A, in
// objective order (the roundings of combine_element), element by element whatever N is. N > 1
// reads each row with 16-byte loads (g + k ld + i 16-byte aligned for every k); N == 1 is the
// scalar path (misaligned chunks, heads and tails). The bank is only read: read-only cache loads.
// Row k + 1 is loaded before row k is used, so two rows are in flight (K = 2 included).
template <int N, typename A, typename T>
__device__ __forceinline__ void combine_rows(const T* g, int64_t ld, int K, const A* ws, int64_t i, A (&d)[N]) {
  const T* gk = g + i;
  RawElems<N, T> row, next;
  load_raw<N, true>(gk, row);
  if (K > 1) load_raw<N, true>(gk + ld, next);
  A x[N];
  unpack_elems(row, x);
  const A w0 = ws[0];
#pragma unroll
  for (int j = 0; j < N; ++j) d[j] = mul_rn(w0, x[j]);
#pragma unroll 1
  for (int k = 1; k < K; ++k) {
    gk += ld;
    row = next;
    if (k + 1 < K) load_raw<N, true>(gk + ld, next);
    unpack_elems(row, x);
    const A wk = ws[k];
#pragma unroll
    for (int j = 0; j < N; ++j) d[j] = add_rn(d[j], mul_rn(wk, x[j]));
  }
}

// Work item `item` of a launch over chunks x slices (multi_tensor.h: chunk_slices): chunk c, and
// slice s of each of a chunk's ranges (its vectors, its scalar remainder), so blocks share a chunk's
// work in near-equal parts and the last wave is nearly full.
struct ChunkSlice {
  int64_t c;
  int s, slices;
  __device__ __forceinline__ int64_t begin(int64_t count) const { return slice_begin(count, s, slices); }
  __device__ __forceinline__ int64_t end(int64_t count) const { return slice_begin(count, s + 1, slices); }
};

__device__ __forceinline__ ChunkSlice chunk_slice(int64_t item, int slices) {
  return {item / slices, int(item % slices), slices};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_chunks(const T* __restrict__ bank, int64_t ld, int K,
                                                           const int64_t* __restrict__ chunks, int64_t C, int slices,
                                                           const double* __restrict__ weights, T* __restrict__ out,
                                                           const bool* skip, TableBounds bounds) {
  using A = acc_t<T>;
  constexpr int N = Pack16<T>::n;  // elements per 16-byte vector
  if (skip != nullptr && *skip) return;
  __shared__ A ws[kMaxObjectives];
  for (int64_t item = blockIdx.x; item < C * slices; item += gridDim.x) {
    const ChunkSlice cs = chunk_slice(item, slices);
    const int64_t* r = chunks + cs.c * kPlanColumns;
    check_chunk(r, bounds, false);
    const int64_t start = r[kColStart], len = r[kColLength];
    load_segment_weights<A>(weights, r[kColSegment], K, ws);
    const T* g = bank + start;
    T* o = out + start;
    const int64_t head = align_head<N, T, T>(o, len);
    const VecSplit split = vec_split<N>(head, len, g, ld, K, aligned16(o + head));
    for (int64_t vi = cs.begin(split.nvec) + threadIdx.x; vi < cs.end(split.nvec); vi += kThreads) {
      const int64_t i = head + vi * N;
      A d[N];
      combine_rows<N>(g, ld, K, ws, i, d);
      store_elems<N>(o + i, d);
    }
    const int64_t rest = len - split.nvec * N;
    for (int64_t j = cs.begin(rest) + threadIdx.x; j < cs.end(rest); j += kThreads) {
      const int64_t i = split.scalar_index(j, N);
      A d[1];
      combine_rows<1>(g, ld, K, ws, i, d);
      store_elems<1>(o + i, d);
    }
  }
}

void bank_combine_into_cuda(const at::Tensor& bank, const at::Tensor& weights, const at::Tensor& chunks,
                            const at::Tensor& out, const std::optional<at::Tensor>& skip) {
  const BankView b = check_bank_combine_into(bank, weights, chunks, out, skip, at::kCUDA);
  check_weights_fit_shared_memory("bank_combine_into", b);
  const int64_t C = chunks.size(0);
  if (C == 0) return;
  const c10::cuda::CUDAGuard guard(b.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(b.device.index()).stream();
  const at::Tensor w = weights.to(at::kDouble).contiguous();  // no-op for the plan's fp64 weights
  with_type(b.code, [&](auto tag) {
    using T = decltype(tag);
    const int slices = chunk_slices(C, wave_of(combine_chunks<T>));
    combine_chunks<T><<<grid_for(combine_chunks<T>, C * slices), kThreads, 0, stream>>>(
        static_cast<const T*>(bank.data_ptr()), b.ld, int(b.K), chunks.data_ptr<int64_t>(), C, slices,
        w.data_ptr<double>(), static_cast<T*>(out.data_ptr()), skip_pointer(skip),
        TableBounds{b.row, weights.size(0), 0, 0});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// -------------------------------------------------------------------------------- AdamW
// Elements [i, i + N) of a chunk: the combined gradient, rounded through T, then the AdamW update
// of the parameter and its moments, element by element (N > 1: 16-byte accesses, every pointer
// 16-byte aligned at i; N == 1: the scalar path). The parameter and moments are loaded before the
// K rows are read, so all loads are in flight together; the arithmetic is the scalar one. (The
// list kernel's twin in adamw_cuda.cu loads them after its combination instead: here that order
// spills on sm_80, there the other one raises register pressure; keep the two orders.)
template <int N, typename T, typename GA, typename PT, typename A>
__device__ __forceinline__ void adamw_elems(const T* g, int64_t ld, int K, const GA* ws, PT* p, PT* m, PT* v,
                                            int64_t i, const AdamWConsts<A>& consts) {
  A pa[N], ma[N], va[N];
  load_elems<N>(p + i, pa);
  load_elems<N>(m + i, ma);
  load_elems<N>(v + i, va);
  GA d[N];
  combine_rows<N>(g, ld, K, ws, i, d);
#pragma unroll
  for (int j = 0; j < N; ++j) adamw_update(pa[j], ma[j], va[j], A(round_through<T>(d[j])), consts);
  store_elems<N>(p + i, pa);
  store_elems<N>(m + i, ma);
  store_elems<N>(v + i, va);
}

// T: gradient dtype, PT: parameter / moment dtype. Per work item (a slice of a chunk), the
// segment's weights and the constants of (group, step count) (from the per-parameter step counts
// and the hyper table in device memory) are set up once; the element loop reads only the data. Parameters whose `live`
// flag is false are skipped (not reached this step), like torch's AdamW skips .grad None.
template <typename T, typename PT>
__global__ void __launch_bounds__(kThreads) adamw_chunks(const T* __restrict__ bank, int64_t ld, int K,
                                                         const int64_t* __restrict__ chunks, int64_t C, int slices,
                                                         const double* __restrict__ weights,
                                                         const int64_t* __restrict__ param_ptrs, PT* __restrict__ m,
                                                         PT* __restrict__ v, const double* __restrict__ hyper,
                                                         const float* __restrict__ step, const bool* skip,
                                                         const bool* __restrict__ live, TableBounds bounds) {
  using GA = acc_t<T>;
  using A = acc_t<PT>;
  // elements per vector: 16 bytes of the narrower of T and PT (the wider one takes two packs)
  constexpr int N = Pack16<T>::n > Pack16<PT>::n ? Pack16<T>::n : Pack16<PT>::n;
  if (skip != nullptr && *skip) return;
  __shared__ GA ws[kMaxObjectives];
  __shared__ AdamWConsts<A> group_consts;
  // Whose constants group_consts holds (the same for every thread): recomputed only when the
  // group or the step count changes from one item to the next (rarely: counts differ only for
  // parameters some steps did not reach).
  int64_t group = -1, counted = -1;
  for (int64_t item = blockIdx.x; item < C * slices; item += gridDim.x) {
    const ChunkSlice cs = chunk_slice(item, slices);
    const int64_t* r = chunks + cs.c * kPlanColumns;
    check_chunk(r, bounds, true);
    if (live != nullptr && !live[r[kColParam]]) continue;  // uniform per block: no barrier skipped by some
    const int64_t start = r[kColStart], len = r[kColLength];
    const int64_t t = int64_t(step[r[kColParam]]) + 1;  // the step being taken
    if (r[kColGroup] != group || t != counted) {  // by one thread (two double pow)
      __syncthreads();  // the previous item's readers are done
      if (threadIdx.x == 0) {
        const double* h = hyper + r[kColGroup] * kHyperColumns;
        group_consts = make_adamw_consts<A>(h[kHyLr], h[kHyWeightDecay], h[kHyBeta1], h[kHyBeta2], h[kHyEps], t);
      }
      group = r[kColGroup];
      counted = t;
    }
    load_segment_weights<GA>(weights, r[kColSegment], K, ws);  // its barriers publish group_consts too
    const AdamWConsts<A>& consts = group_consts;  // read from shared memory: no registers held
    PT* p = reinterpret_cast<PT*>(param_ptrs[r[kColParam]]) + r[kColParamOffset];
    const T* g = bank + start;
    PT* mc = m + start;
    PT* vc = v + start;
    const int64_t head = align_head<N, PT, T>(mc, len);
    const VecSplit split = vec_split<N>(head, len, g, ld, K, aligned16(mc + head) && aligned16(vc + head) &&
                                                                    aligned16(p + head));
    for (int64_t vi = cs.begin(split.nvec) + threadIdx.x; vi < cs.end(split.nvec); vi += kThreads)
      adamw_elems<N, T>(g, ld, K, ws, p, mc, vc, head + vi * N, consts);
    const int64_t rest = len - split.nvec * N;
    for (int64_t j = cs.begin(rest) + threadIdx.x; j < cs.end(rest); j += kThreads)
      adamw_elems<1, T>(g, ld, K, ws, p, mc, vc, split.scalar_index(j, N), consts);
  }
}

// After the update (a second launch, so no chunk reads a count already moved): every stepped
// parameter's count + 1.
__global__ void count_steps(float* step, int64_t P, const bool* skip, const bool* live) {
  if (skip != nullptr && *skip) return;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += int64_t(gridDim.x) * blockDim.x) {
    if (live == nullptr || live[p]) step[p] += 1.0f;
  }
}

void bank_adamw_cuda(const at::Tensor& bank, const at::Tensor& weights, const at::Tensor& chunks,
                     const at::Tensor& param_ptrs, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                     const at::Tensor& hyper, const at::Tensor& step, const std::optional<at::Tensor>& skip,
                     const std::optional<at::Tensor>& live) {
  const BankView b = check_bank_adamw(bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip,
                                      live, at::kCUDA);
  check_weights_fit_shared_memory("bank_adamw_", b);
  const int32_t pcode = elem_type_of(exp_avg.scalar_type(), "bank_adamw_");
  const int64_t C = chunks.size(0), P = param_ptrs.numel();
  const c10::cuda::CUDAGuard guard(b.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(b.device.index()).stream();
  const at::Tensor w = weights.to(at::kDouble).contiguous();
  const bool* skip_ptr = skip_pointer(skip);
  const bool* live_ptr = live.has_value() ? live->data_ptr<bool>() : nullptr;
  if (C > 0) {
    with_type(b.code, [&](auto gtag) {
      using T = decltype(gtag);
      with_type(pcode, [&](auto ptag) {
        using PT = decltype(ptag);
        const int slices = chunk_slices(C, wave_of(adamw_chunks<T, PT>));
        adamw_chunks<T, PT><<<grid_for(adamw_chunks<T, PT>, C * slices), kThreads, 0, stream>>>(
            static_cast<const T*>(bank.data_ptr()), b.ld, int(b.K), chunks.data_ptr<int64_t>(), C, slices,
            w.data_ptr<double>(), param_ptrs.data_ptr<int64_t>(), static_cast<PT*>(exp_avg.data_ptr()),
            static_cast<PT*>(exp_avg_sq.data_ptr()), hyper.data_ptr<double>(), step.data_ptr<float>(), skip_ptr,
            live_ptr, TableBounds{b.row, weights.size(0), P, hyper.size(0)});
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (P > 0) {
    const int threads = 256;
    const int blocks = int(std::min<int64_t>((P + threads - 1) / threads, 1024));
    count_steps<<<blocks, threads, 0, stream>>>(step.data_ptr<float>(), P, skip_ptr, live_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fused_balance

TORCH_LIBRARY_IMPL(fused_balance, CUDA, m) {
  m.impl("bank_gram", &fused_balance::cuda::bank_gram_cuda);
  m.impl("bank_combine_into", &fused_balance::cuda::bank_combine_into_cuda);
  m.impl("bank_adamw_", &fused_balance::cuda::bank_adamw_cuda);
}
