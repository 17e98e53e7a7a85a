// CUDA implementation of fused_balance::balanced_adamw_ (list API): the combined gradient
// sum_k w[seg(p), k] g_k[p] is formed in registers and fed to torch.optim.AdamW's update in one
// launch over the metadata table of cuda_launch.cuh; params and moments are read and written
// once, in their own dtypes. The element update is multi_tensor.h's adamw_update, shared with the
// CPU kernels. When the moments share the parameters' dtype (the usual case), adamw_kernel is
// compiled per (gradient, parameter) dtype pair and reads each chunk's gradient pointers once,
// into shared memory, with 16-byte accesses where the chunk is aligned; otherwise
// adamw_mixed_kernel switches on the dtype codes per element. Both round alike, bit for bit.
// Registers its own op (see gram_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <vector>

#include "cuda_launch.cuh"
#include "ops_common.h"

namespace fused_balance {
namespace cuda {
namespace {

// The fast path: T the gradients' dtype, PT the parameters' and both moments' (one dtype for the
// three, the common case). Per chunk, the K gradient pointers of the chunk and the segment's K
// weights are read once from the metadata table into shared memory (dynamic: K entries of each);
// the element loop then reads only data, with no run-time dtype switch, in 16-byte accesses where
// every stream of the chunk is 16-byte aligned (scalar head and tail). The arithmetic is the
// scalar one, element by element: combine_element's order and roundings (products and sums in
// acc_t<T>, objective order), round_through<T>, adamw_update in acc_t<PT>.
constexpr int64_t kSharedBytes = 48 * 1024;  // dynamic shared memory without an opt-in

template <typename T>
constexpr int64_t shared_bytes_for(int64_t K) {
  return K * int64_t(sizeof(const T*) + sizeof(acc_t<T>));
}

// Elements [i, i + N) of sum_k ws[k] g_k: gs[k] + i 16-byte aligned for every k when N > 1;
// N == 1 is the scalar access. Row k + 1 is loaded before row k is used.
template <int N, typename T, typename GA>
__device__ __forceinline__ void combine_ptrs(const T* const* gs, const GA* ws, int K, int64_t i, GA (&d)[N]) {
  RawElems<N, T> row, next;
  load_raw<N>(global_ptr(gs[0]) + i, row);
  if (K > 1) load_raw<N>(global_ptr(gs[1]) + i, next);
  GA x[N];
  unpack_elems(row, x);
  const GA w0 = ws[0];
#pragma unroll
  for (int j = 0; j < N; ++j) d[j] = mul_rn(w0, x[j]);
#pragma unroll 1
  for (int k = 1; k < K; ++k) {
    row = next;
    if (k + 1 < K) load_raw<N>(global_ptr(gs[k + 1]) + i, next);
    unpack_elems(row, x);
    const GA wk = ws[k];
#pragma unroll
    for (int j = 0; j < N; ++j) d[j] = add_rn(d[j], mul_rn(wk, x[j]));
  }
}

// Elements [i, i + N) of a chunk: the combined gradient rounded through T, then the AdamW update
// of the parameter and its moments (loaded after the combination: fewer registers live across
// the K loop).
template <int N, typename T, typename PT, typename GA, typename A>
__device__ __forceinline__ void adamw_elems(const T* const* gs, const GA* ws, int K, PT* p, PT* m, PT* v,
                                            int64_t i, const AdamWConsts<A>& consts) {
  GA d[N];
  combine_ptrs<N>(gs, ws, K, i, d);
  A pa[N], ma[N], va[N];
  load_elems<N>(p + i, pa);
  load_elems<N>(m + i, ma);
  load_elems<N>(v + i, va);
#pragma unroll
  for (int j = 0; j < N; ++j) adamw_update(pa[j], ma[j], va[j], A(round_through<T>(d[j])), consts);
  store_elems<N>(p + i, pa);
  store_elems<N>(m + i, ma);
  store_elems<N>(v + i, va);
}

template <typename T, typename PT>
__global__ void __launch_bounds__(kThreads) adamw_kernel(Meta meta, int64_t num_chunks, const acc_t<T>* weights,
                                                         const bool* skip, AdamWConsts<acc_t<PT>> base) {
  using GA = acc_t<T>;
  using A = acc_t<PT>;
  // elements per vector: 16 bytes of the narrower of T and PT (the wider one takes two packs)
  constexpr int N = Pack16<T>::n > Pack16<PT>::n ? Pack16<T>::n : Pack16<PT>::n;
  if (skip != nullptr && *skip) return;  // uniform per block: before any barrier
  extern __shared__ int64_t shared_words[];  // [K] gradient pointers, then [K] weights
  const T** gs = reinterpret_cast<const T**>(shared_words);
  GA* ws = reinterpret_cast<GA*>(shared_words + meta.K);
  const int K = meta.K;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {  // uniform per block
    const auto [p, start, len, g, w] = weighted_chunk<T>(meta, c, weights);
    AdamWConsts<A> consts = base;
    consts.decay = A(meta.decay[p]);
    consts.step_size = A(meta.step_size[p]);
    PT* param = global_ptr(reinterpret_cast<PT*>(meta.out_ptrs[p])) + start;
    PT* exp_avg = global_ptr(reinterpret_cast<PT*>(meta.exp_avg_ptrs[p])) + start;
    PT* exp_avg_sq = global_ptr(reinterpret_cast<PT*>(meta.exp_avg_sq_ptrs[p])) + start;
    // head elements align exp_avg to 16 bytes; the chunk is vectorised when every other stream is
    // 16-byte aligned there too (decided by the whole block in the barrier that publishes gs / ws).
    const int64_t lead = int64_t(((16u - (reinterpret_cast<uintptr_t>(exp_avg) & 15u)) & 15u) / sizeof(PT));
    const int64_t head = lead < len ? lead : len;
    bool ok = aligned16(param + head) && aligned16(exp_avg_sq + head);
    __syncthreads();  // the previous chunk's readers of gs / ws are done
    for (int k = threadIdx.x; k < K; k += kThreads) {
      const T* gk = g[k];
      gs[k] = gk;
      ws[k] = w[k];
      ok = ok && aligned16(gk + head);
    }
    const bool vec = __syncthreads_and(ok) != 0;
    const int64_t nvec = vec ? (len - head) / N : 0;
    for (int64_t vi = threadIdx.x; vi < nvec; vi += kThreads)
      adamw_elems<N, T>(gs, ws, K, param, exp_avg, exp_avg_sq, head + vi * N, consts);
    for (int64_t j = threadIdx.x; j < len - nvec * N; j += kThreads)
      adamw_elems<1, T>(gs, ws, K, param, exp_avg, exp_avg_sq, j < head ? j : j + nvec * N, consts);
  }
}

// The general path (moments in a dtype other than the parameters', or more objectives than the
// shared table holds): T the gradient dtype, A the math type (double for fp64 params, else
// float); every element reads its gradients through the table and switches on the dtype codes.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) adamw_mixed_kernel(Meta meta, int64_t num_chunks,
                                                               const acc_t<T>* weights, const bool* skip,
                                                               int32_t p_code, int32_t m_code, int32_t v_code,
                                                               AdamWConsts<A> base) {
  using GA = acc_t<T>;
  if (skip != nullptr && *skip) return;
  const int K = meta.K;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const auto [p, start, len, g, w] = weighted_chunk<T>(meta, c, weights);
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

void balanced_adamw_cuda(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids,
                         at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                         at::ArrayRef<double> lrs, at::ArrayRef<double> weight_decays, double beta1, double beta2,
                         double eps, int64_t step, const std::optional<at::Tensor>& skip) {
  const GradTable g = adamw_grad_table(grads, weights, segment_ids, skip, beta1, beta2, eps, step, at::kCUDA);
  const c10::cuda::CUDAGuard guard(g.device);
  AdamWArgs a = adamw_args(g, params, exp_avgs, exp_avg_sqs, lrs, weight_decays);
  const int64_t C = g.num_chunks();
  if (C > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device.index()).stream();
    const at::Tensor w = device_weights(weights, g);
    std::vector<double> decay(g.P), step_size(g.P);
    for (int64_t p = 0; p < g.P; ++p) {
      const AdamWConsts<double> c = make_adamw_consts<double>(a.lr[p], a.weight_decay[p], beta1, beta2, eps, step);
      decay[p] = c.decay;
      step_size[p] = c.step_size;
    }
    MetaTable table(g);
    table.put(&Meta::out_ptrs, addresses(a.params.ptrs));
    table.put(&Meta::exp_avg_ptrs, addresses(a.exp_avgs.ptrs));
    table.put(&Meta::exp_avg_sq_ptrs, addresses(a.exp_avg_sqs.ptrs));
    table.put(&Meta::decay, decay);
    table.put(&Meta::step_size, step_size);
    const Meta meta = table.upload(g.device);
    const bool* skip_ptr = skip_pointer(skip);
    const int32_t p_code = a.params.code, m_code = a.exp_avgs.code, v_code = a.exp_avg_sqs.code;
    with_type(g.code, [&](auto tag) {
      using T = decltype(tag);
      const auto* wp = static_cast<const acc_t<T>*>(w.data_ptr());
      const int64_t shared = shared_bytes_for<T>(g.K);
      if (m_code == p_code && v_code == p_code && shared <= kSharedBytes) {
        with_type(p_code, [&](auto ptag) {
          using PT = decltype(ptag);
          const auto base = make_adamw_consts<acc_t<PT>>(0.0, 0.0, beta1, beta2, eps, step);
          adamw_kernel<T, PT><<<grid_for(adamw_kernel<T, PT>, C, size_t(shared)), kThreads, size_t(shared), stream>>>(
              meta, C, wp, skip_ptr, base);
        });
      } else if (p_code == kFloat64) {
        const auto base = make_adamw_consts<double>(0.0, 0.0, beta1, beta2, eps, step);
        adamw_mixed_kernel<T, double><<<grid_for(adamw_mixed_kernel<T, double>, C), kThreads, 0, stream>>>(
            meta, C, wp, skip_ptr, p_code, m_code, v_code, base);
      } else {
        const auto base = make_adamw_consts<float>(0.0, 0.0, beta1, beta2, eps, step);
        adamw_mixed_kernel<T, float><<<grid_for(adamw_mixed_kernel<T, float>, C), kThreads, 0, stream>>>(
            meta, C, wp, skip_ptr, p_code, m_code, v_code, base);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  a.finish();
}

}  // namespace
}  // namespace cuda
}  // namespace fused_balance

TORCH_LIBRARY_IMPL(fused_balance, CUDA, m) {
  m.impl("balanced_adamw_", &fused_balance::cuda::balanced_adamw_cuda);
}
