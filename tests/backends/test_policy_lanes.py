"""policy.h's solve spread over lanes, as the CUDA kernel's warp runs it, on the CPU: threads that
share one workspace and meet at a std::barrier (StridedRows, the lanes' rows interleaved as on
the GPU) give bitwise the weights and branch of the serial solve (SerialRows, the CPU op), and
both agree with the torch reference. policy.h is free of torch headers: a small program built
with the extension's host flags runs it, no GPU or extension build needed.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fused_balance import _extension
from fused_balance import policies as P
from fused_balance.solvers import clean_gram, rounding_of

# Reads segments (header: S K code has_mask as int64, tau rounding rescale as double; then the
# [S, K, K] float64 Gram and, with has_mask, the [S, K] mask bytes) from argv[1]; for the serial
# solve and then each lane count in argv[3...] writes [S, K] float64 weights and [S] int64 branch
# codes to argv[2]. The workspace capacity is the kernel's choice for K (8, 16, 32).
PROGRAM = r"""
#include <barrier>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>
#include "policy.h"

using namespace fused_balance::policy;

struct ThreadBarrier {
  std::barrier<>* shared;
  void operator()() const { shared->arrive_and_wait(); }
};

struct Problem {
  int64_t S, K;
  Options options;
  std::vector<double> gram;
  std::vector<unsigned char> mask;  // empty: the diagonal decides
  const bool* mask_of(int64_t s) const {
    return mask.empty() ? nullptr : reinterpret_cast<const bool*>(mask.data()) + s * K;
  }
};

template <int KMAX>
void solve_all(const Problem& p, int lanes, double* weights, int64_t* branch) {
  const int K = int(p.K);
  for (int64_t s = 0; s < p.S; ++s) {
    auto ws = std::make_unique<Workspace<KMAX>>();
    const double* g = p.gram.data() + s * K * K;
    if (lanes == 0) {
      const SerialRows rows;
      load_gram(rows, g, p.mask_of(s), K, *ws);
      branch[s] = solve_segment(rows, p.options, K, *ws);
    } else {
      std::barrier<> barrier(lanes);
      std::vector<int64_t> codes(lanes);
      std::vector<std::thread> threads;
      for (int lane = 0; lane < lanes; ++lane)
        threads.emplace_back([&, lane] {
          const StridedRows<ThreadBarrier> rows{lane, lanes, ThreadBarrier{&barrier}};
          load_gram(rows, g, p.mask_of(s), K, *ws);
          codes[lane] = solve_segment(rows, p.options, K, *ws);
        });
      for (auto& t : threads) t.join();
      for (int lane = 1; lane < lanes; ++lane)
        if (codes[lane] != codes[0]) { std::fprintf(stderr, "lanes disagree on the branch\n"); std::exit(3); }
      branch[s] = codes[0];
    }
    for (int k = 0; k < K; ++k) weights[s * K + k] = ws->weights[k];
  }
}

int main(int argc, char** argv) {
  FILE* in = std::fopen(argv[1], "rb");
  int64_t header[4];
  double scalars[3];
  if (!in || std::fread(header, sizeof header, 1, in) != 1 || std::fread(scalars, sizeof scalars, 1, in) != 1) return 2;
  Problem p{header[0], header[1], Options{header[2], scalars[0], scalars[2], scalars[1]}, {}, {}};
  p.gram.resize(p.S * p.K * p.K);
  if (std::fread(p.gram.data(), sizeof(double), p.gram.size(), in) != p.gram.size()) return 2;
  if (header[3]) {
    p.mask.resize(p.S * p.K);
    if (std::fread(p.mask.data(), 1, p.mask.size(), in) != p.mask.size()) return 2;
  }
  std::fclose(in);
  FILE* out = std::fopen(argv[2], "wb");
  for (int run = 2; run < argc; ++run) {
    const int lanes = run == 2 ? 0 : std::atoi(argv[run]);
    std::vector<double> weights(p.S * p.K);
    std::vector<int64_t> branch(p.S);
    if (p.K <= 8) solve_all<8>(p, lanes, weights.data(), branch.data());
    else if (p.K <= 16) solve_all<16>(p, lanes, weights.data(), branch.data());
    else solve_all<kMaxObjectives>(p, lanes, weights.data(), branch.data());
    std::fwrite(weights.data(), sizeof(double), weights.size(), out);
    std::fwrite(branch.data(), sizeof(int64_t), branch.size(), out);
  }
  std::fclose(out);
  return 0;
}
"""


def build(folder, flags):
    """PROGRAM built in folder with the C++ compiler and flags; None if no compiler is found."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return None
    (folder / "lanes.cpp").write_text(PROGRAM)
    proc = subprocess.run([compiler, "-std=c++20", *flags, "-pthread", f"-I{_extension.CSRC_DIR}",
                           str(folder / "lanes.cpp"), "-o", str(folder / "lanes")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder / "lanes"


@pytest.fixture(scope="module")
def lanes_program(tmp_path_factory):
    program = build(tmp_path_factory.mktemp("policy_lanes"), [f for f in _extension._CXX_FLAGS if f != "-fopenmp"])
    if program is None:
        pytest.skip("no C++ compiler (CXX, c++)")
    return program


def solve(program, G, code, tau, rescale, rounding, mask, lane_counts):
    """[(weights [S, K] float64, branch [S])] for the serial solve, then each lane count."""
    S, K = G.shape[0], G.shape[1]
    folder = program.parent
    header = np.array([S, K, code, mask is not None], dtype=np.int64).tobytes()
    data = header + np.array([tau, rounding, rescale]).tobytes() + G.double().contiguous().numpy().tobytes()
    if mask is not None:
        data += mask.numpy().astype(np.uint8).tobytes()
    (folder / "in.bin").write_bytes(data)
    proc = subprocess.run([str(program), str(folder / "in.bin"), str(folder / "out.bin"),
                           *map(str, lane_counts)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1"})
    assert proc.returncode == 0, proc.stderr
    raw = (folder / "out.bin").read_bytes()
    size = S * K * 8 + S * 8
    assert len(raw) == size * (1 + len(lane_counts))
    runs = []
    for i in range(1 + len(lane_counts)):
        chunk = raw[i * size:(i + 1) * size]
        weights = torch.from_numpy(np.frombuffer(chunk[:S * K * 8], dtype=np.float64).reshape(S, K).copy())
        branch = torch.from_numpy(np.frombuffer(chunk[S * K * 8:], dtype=np.int64).copy())
        runs.append((weights, branch))
    return runs


def segments(S, K, seed):
    """Grams of scattered gradients with the hard cases: a zero objective, an exact conflict,
    identical objectives, a NaN entry, and an ill-conditioned min-norm point."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(S, K, 3 * K, generator=gen, dtype=torch.float64)
    g = g * torch.exp(2.0 * torch.randn(S, K, 1, generator=gen, dtype=torch.float64))
    g[1, 0] = 0
    if K > 1:
        g[2, 1] = -g[2, 0]
        g[3] = g[3, :1]
        g[5] = g[5] - (1 - 1e-3) * g[5].mean(0, keepdim=True)
    G = g @ g.transpose(1, 2)
    G[4, 0, 0] = float("nan")
    return G


SETTINGS = [("sum", None), ("mgda", "none"), ("mgda", "sum"), ("pareto_lora", "sum"),
            ("pareto_lora", "none"), ("pareto_lora", 2.5), ("mmpareto", None), ("mmpareto", 0.5)]


@pytest.mark.parametrize("name, rescale", SETTINGS)
@pytest.mark.parametrize("K", [1, 2, 3, 5, 8, 13, 32])
def test_solve_over_lanes_is_bitwise_the_serial_solve(lanes_program, name, rescale, K):
    G = segments(6 if K == 32 else 8, K, 700 + K)
    policy = P.resolve_policy(name, tau=3.0, rescale=rescale, rounding=rounding_of(G.dtype))
    # 3 lanes: rows interleave unevenly; 32: the warp (K = 32 with 33 rows in the KKT system).
    lane_counts = [3, 32] if K in (5, 32) else [3]
    (w, branch), *spread = solve(lanes_program, G, policy.code, policy.tau, policy.rescale_factor,
                                 policy.rounding, None, lane_counts)
    for lanes, (w_lanes, branch_lanes) in zip(lane_counts, spread):
        assert torch.equal(branch_lanes, branch), lanes
        assert torch.equal(w_lanes.view(torch.int64), w.view(torch.int64)), (lanes, (w_lanes - w).abs().max())
    Gc = clean_gram(G)
    w_ref, b_ref = policy.reference(Gc, torch.diagonal(Gc, dim1=1, dim2=2) > 0)
    assert torch.equal(branch, b_ref)
    # the weights of segment 5 are ill-determined: compare its combination's squared norm
    well = torch.arange(G.shape[0]) != 5
    torch.testing.assert_close(w[well], w_ref[well], rtol=1e-8, atol=1e-12)
    q = lambda w: torch.einsum("k,kl,l->", w, Gc[5], w)  # noqa: E731
    assert (q(w[5]) - q(w_ref[5])).abs() <= 1e-9 * torch.einsum("k,kl,l->", w_ref[5].abs(), Gc[5].abs(),
                                                               w_ref[5].abs())


def test_solve_over_lanes_with_an_active_mask(lanes_program):
    K = 6
    G = segments(8, K, 17)
    mask = torch.rand(8, K, generator=torch.Generator().manual_seed(3)) > 0.3
    policy = P.resolve_policy("mgda", rounding=rounding_of(G.dtype))
    (w, branch), (w_lanes, branch_lanes) = solve(lanes_program, G, policy.code, policy.tau,
                                                 policy.rescale_factor, policy.rounding, mask, [4])
    assert torch.equal(branch_lanes, branch) and torch.equal(w_lanes.view(torch.int64), w.view(torch.int64))
    w_ref, _ = policy.reference(clean_gram(G), mask)
    assert (w[~mask] == 0).all()
    well = torch.arange(G.shape[0]) != 5  # segment 5's weights are ill-determined
    torch.testing.assert_close(w[well], w_ref[well], rtol=1e-8, atol=1e-12)


def test_lanes_never_race_on_the_workspace(tmp_path):
    """Every workspace write is ordered against the other lanes' reads by a barrier (on the GPU,
    __syncwarp): ThreadSanitizer watches the lanes of the same program through every branch of
    the solve (active set, K = 2 closed form, rescale, mask) and reports no data race."""
    program = build(tmp_path, ["-O1", "-g", "-ffp-contract=off", "-fsanitize=thread"])
    if program is None:
        pytest.skip("no C++ compiler (CXX, c++)")
    for K in (2, 7, 9):
        G = segments(6, K, 900 + K)
        mask = torch.rand(6, K, generator=torch.Generator().manual_seed(K)) > 0.2
        for name, rescale in SETTINGS:
            policy = P.resolve_policy(name, tau=3.0, rescale=rescale, rounding=rounding_of(G.dtype))
            (w, branch), *spread = solve(program, G, policy.code, policy.tau, policy.rescale_factor,
                                         policy.rounding, mask if name == "mgda" else None, [3, 32])
            for w_lanes, branch_lanes in spread:
                assert torch.equal(branch_lanes, branch)
                assert torch.equal(w_lanes.view(torch.int64), w.view(torch.int64))


# ----------------------------------------------------------------------------- the CUDA kernel
@pytest.fixture(scope="module")
def native_cuda():
    from fused_balance import ops

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ok, why = ops.availability(torch.device("cuda"))
    if not ok:
        pytest.skip(f"no CUDA kernels: {why}")
    ops._ops()
    return torch.ops.fused_balance.policy_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 2, 3, 8, 9, 16, 17, 32])  # each workspace capacity and its edges
def test_cuda_solve_is_bitwise_the_cpu_solve(native_cuda, K, dtype):
    """One warp per segment (several per block: S = 21 leaves the last block part empty) gives the
    CPU op's weights bit for bit, with and without an active mask, and replays in a CUDA graph."""
    G = segments(21, K, 800 + K).to(dtype)
    mask = torch.rand(21, K, generator=torch.Generator().manual_seed(K)) > 0.2
    G_cuda, mask_cuda = G.cuda(), mask.cuda()
    for name, rescale in SETTINGS:
        policy = P.resolve_policy(name, tau=3.0, rescale=rescale, rounding=rounding_of(dtype))
        args = (policy.code, policy.tau, policy.rescale_factor, policy.rounding)
        for active, active_cuda in ((None, None), (mask, mask_cuda)):
            w_cpu, b_cpu = native_cuda(G, *args, active)
            w_gpu, b_gpu = native_cuda(G_cuda, *args, active_cuda)
            assert torch.equal(b_gpu.cpu(), b_cpu), (name, rescale)
            assert torch.equal(w_gpu.cpu(), w_cpu), (name, rescale, (w_gpu.cpu() - w_cpu).abs().max())
    graph = torch.cuda.CUDAGraph()
    static = G_cuda.clone()
    with torch.cuda.graph(graph):
        w_graph, b_graph = native_cuda(static, *args, None)
    static.copy_(G_cuda.flip(0))
    graph.replay()
    w_cpu, b_cpu = native_cuda(G.flip(0), *args, None)
    assert torch.equal(w_graph.cpu(), w_cpu) and torch.equal(b_graph.cpu(), b_cpu)
