// CUDA implementation of fused_balance::policy_weights: one warp per segment runs policy.h's
// solve, its lanes taking the rows (objectives, rows of the KKT system) of each step, with the
// segment's workspace in shared memory. The workspace is sized for KMAX objectives, a compile-time
// bound chosen at launch from K (8, 16 or policy::kMaxObjectives), so small K packs several
// segments in a block. No host synchronisation: one launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "policy_ops.h"

namespace fused_balance {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;

struct WarpBarrier {
  __device__ void operator()() const { __syncwarp(); }
};
using WarpRows = policy::StridedRows<WarpBarrier>;

// Segments (warps) per block: as many workspaces as fit in 32 KB of static shared memory, at most
// 8 (K <= 8: 8 x 2.2 KB; K <= 16: 4 x 7.4 KB; K <= 32: 1 x 26.7 KB).
template <int KMAX>
constexpr int segments_per_block() {
  constexpr int fit = int(32768 / sizeof(policy::Workspace<KMAX>));
  return fit < 1 ? 1 : (fit > 8 ? 8 : fit);
}

// Minimum one block per SM: with the thread count alone ptxas held the KMAX = 8 instance (256
// threads) to 48 registers and spilled 124 B; it needs ~64.
template <typename T, int KMAX>
__global__ void __launch_bounds__(kWarpSize * segments_per_block<KMAX>(), 1)
policy_kernel(const T* __restrict__ gram, const bool* __restrict__ active, int64_t S, int K,
              policy::Options options, double largest, T* __restrict__ weights, int64_t* __restrict__ branch) {
  constexpr int kSegments = segments_per_block<KMAX>();
  __shared__ policy::Workspace<KMAX> workspaces[kSegments];
  const int warp = int(threadIdx.x) / kWarpSize;
  const int64_t s = int64_t(blockIdx.x) * kSegments + warp;
  if (s >= S) return;  // the whole warp: every lane of it takes part in each barrier
  const WarpRows rows{int(threadIdx.x) % kWarpSize, kWarpSize, WarpBarrier{}};
  policy::Workspace<KMAX>& ws = workspaces[warp];
  policy::load_gram(rows, gram + s * K * K, active ? active + s * K : nullptr, K, ws);
  const int64_t code = policy::solve_segment(rows, options, K, ws);
  if (rows.lane == 0) branch[s] = code;
  rows.each(0, K, [&](int k) { weights[s * K + k] = policy::saturate_to<T>(ws.weights[k], largest); });
}

template <typename T, int KMAX>
void launch(const PolicyCall& call, cudaStream_t stream) {
  TORCH_CHECK(call.K <= KMAX, "fused_balance::policy_weights: K = ", call.K, " beyond the kernel's ", KMAX);
  constexpr int kSegments = segments_per_block<KMAX>();
  const int64_t blocks = (call.S + kSegments - 1) / kSegments;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int>::max(), "fused_balance::policy_weights: ", call.S,
                    " segments are more than one launch takes");
  const bool* mask = call.active.has_value() ? call.active->data_ptr<bool>() : nullptr;
  policy_kernel<T, KMAX><<<unsigned(blocks), kWarpSize * kSegments, 0, stream>>>(
      call.gram.data_ptr<T>(), mask, call.S, int(call.K), call.options, call.largest, call.weights.data_ptr<T>(),
      call.branch.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The smallest workspace that holds K objectives.
template <typename T>
void launch_for_K(const PolicyCall& call, cudaStream_t stream) {
  if (call.K <= 8) launch<T, 8>(call, stream);
  else if (call.K <= 16) launch<T, 16>(call, stream);
  else launch<T, policy::kMaxObjectives>(call, stream);
}

std::tuple<at::Tensor, at::Tensor> policy_weights_cuda(const at::Tensor& gram, int64_t policy, double tau,
                                                       double rescale, double rounding,
                                                       const c10::optional<at::Tensor>& active, int64_t magnitude) {
  const c10::cuda::CUDAGuard guard(gram.device());
  PolicyCall call = prepare_policy_call(gram, policy, tau, rescale, rounding, active, magnitude);
  if (call.S == 0) return {call.weights, call.branch};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (call.gram.scalar_type() == at::kDouble) launch_for_K<double>(call, stream);
  else launch_for_K<float>(call, stream);
  return {call.weights, call.branch};
}

}  // namespace
}  // namespace cuda
}  // namespace fused_balance

TORCH_LIBRARY_IMPL(fused_balance, CUDA, m) {
  m.impl("policy_weights", &fused_balance::cuda::policy_weights_cuda);
}
