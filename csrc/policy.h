// The built-in balancing policies on one segment's K x K Gram: HOST_DEVICE and free of torch
// headers, so the CPU op (policy_cpu.cpp, a loop over segments) and the CUDA kernel
// (policy_cuda.cu, one warp per segment) run the same arithmetic. The reference is
// fused_balance/policies.py and fused_balance/solvers.py; every step below mirrors a line there
// (same decisions, same tolerances), in float64 whatever the Gram's dtype.
//
// Every function takes `rows`, which says how a loop over independent rows (objectives, rows of
// the KKT system, entries of the Gram) is spread: SerialRows runs it in order on one thread (the
// CPU), StridedRows over the lanes of a group that meet at a barrier (the CUDA kernel's warp, its
// workspace in shared memory). A row is computed by one lane, its inner sums in the CPU's order;
// what depends on earlier rows (the pivot choice, sums over rows, the step length) every lane
// computes itself from the workspace, in that same order, so control flow stays uniform; the back
// substitution runs on lane 0. So the weights are bitwise the same either way. Only rows.each and
// rows.single write the workspace.
#pragma once

#include <cmath>
#include <cstdint>

#include "multi_tensor.h"  // FB_HOST_DEVICE, FB_INLINE

namespace fused_balance {
namespace policy {

constexpr int kMaxObjectives = 32;

// Codes shared with fused_balance/policies.py (BuiltinPolicy.code, BRANCH_*).
enum PolicyCode : int64_t { kSum = 0, kMgda = 1, kParetoLora = 2, kMmPareto = 3 };
enum BranchCode : int64_t { kBranchSum = 0, kBranchRescale = 1, kBranchConflict = 2 };
// Pareto-LoRA's magnitude rule (its rescale branch): every active objective brought to the mean
// norm, only those below it raised to it, or (an index >= 0) only that protected objective raised.
enum MagnitudeRule : int64_t { kMagnitudeMean = -1, kMagnitudeWeaker = -2 };

struct Options {
  int64_t code;
  double tau;
  double rescale;  // the conflict branch scaled to rescale x the plain sum's norm; 0: not scaled
  double rounding;  // relative rounding level of the input Gram (K=2 "identical" test)
  int64_t magnitude = kMagnitudeMean;  // MagnitudeRule, or the protected objective's index
};

#if defined(__CUDA_ARCH__)
FB_INLINE double p_sqrt(double x) { return ::sqrt(x); }
FB_INLINE bool p_finite(double x) { return ::isfinite(x); }
#else
FB_INLINE double p_sqrt(double x) { return std::sqrt(x); }
FB_INLINE bool p_finite(double x) { return std::isfinite(x); }
#endif
FB_INLINE double p_abs(double x) { return x < 0 ? -x : x; }
FB_INLINE double p_min(double a, double b) { return a < b ? a : b; }
FB_INLINE double p_max(double a, double b) { return a > b ? a : b; }
FB_INLINE double p_clamp(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); }
constexpr double kEps64 = 2.220446049250313e-16;
constexpr double kTiny64 = 2.2250738585072014e-308;

// Row stride of the matrices in a Workspace (a K x K Gram at row_stride(K)): odd, so the lanes of
// a warp that each read their own row of one column hit distinct shared-memory banks (rows of 32
// doubles would send every lane to one bank).
FB_INLINE int row_stride(int columns) { return columns | 1; }

// How a loop over independent rows is spread; see the top of the file.
struct SerialRows {
  template <class F>
  FB_INLINE void each(int begin, int end, F&& row) const {
    for (int r = begin; r < end; ++r) row(r);
  }
  template <class F>
  FB_INLINE void single(F&& step) const { step(); }
};

// Rows begin + lane, begin + lane + lanes, ... on each of `lanes` threads that share the workspace;
// barrier() synchronises them (and orders their workspace accesses), e.g. __syncwarp().
template <class Barrier>
struct StridedRows {
  int lane, lanes;
  Barrier barrier;
  template <class F>
  FB_INLINE void each(int begin, int end, F&& row) const {
    barrier();  // no lane still reads what these rows overwrite
    for (int r = begin + lane; r < end; r += lanes) row(r);
    barrier();  // every lane sees every row
  }
  template <class F>
  FB_INLINE void single(F&& step) const {
    barrier();
    if (lane == 0) step();
    barrier();
  }
};

// Working memory of one segment of up to KMAX objectives (on a GPU: its warp's shared memory),
// its matrices' rows row_stride apart for the segment's own K.
template <int KMAX>
struct Workspace {
  double G[KMAX * (KMAX + 1)];   // clean, symmetric Gram
  double Gn[KMAX * (KMAX + 1)];  // trace-normalised copy for the min-norm solve
  double A[(KMAX + 1) * (KMAX + 3)];  // bordered system, augmented
  double weights[KMAX];  // the solve's result
  double minnorm[KMAX];  // min-norm weights
  double v[KMAX], Gv[KMAX];  // affine min-norm point (or a mask) and G times it
  int idx[KMAX];  // the corral's objectives, rows of A
  bool active[KMAX], corral[KMAX];
  bool below[KMAX];  // per objective: a pair with it below zero (any_pair_below_zero)
};

// Non-finite entries as 0 (flagged elsewhere, never solved); symmetrised by halves.
template <typename T, class Rows, int KMAX>
FB_INLINE void load_gram(const Rows& rows, const T* g, const bool* active_in, int K, Workspace<KMAX>& ws) {
  const int ld = row_stride(K);
  rows.each(0, K * K, [&](int i) {
    const int k = i / K, l = i % K;
    double a = double(g[k * K + l]), b = double(g[l * K + k]);
    a = p_finite(a) ? a : 0.0;
    b = p_finite(b) ? b : 0.0;
    ws.G[k * ld + l] = 0.5 * a + 0.5 * b;
  });
  rows.each(0, K, [&](int k) { ws.active[k] = active_in ? active_in[k] : ws.G[k * ld + k] > 0; });
}

// y = G x, one row per thread.
template <class Rows>
FB_INLINE void multiply(const Rows& rows, const double* G, const double* x, int K, double* y) {
  const int ld = row_stride(K);
  rows.each(0, K, [&](int k) {
    double row = 0.0;
    for (int l = 0; l < K; ++l) row += G[k * ld + l] * x[l];
    y[k] = row;
  });
}

FB_INLINE double dot(const double* x, const double* y, int K) {
  double total = 0.0;
  for (int k = 0; k < K; ++k) total += x[k] * y[k];
  return total;
}

// x^T G x on the clean Gram (ws.Gv as scratch).
template <class Rows, int KMAX>
FB_INLINE double quadratic(const Rows& rows, const double* x, int K, Workspace<KMAX>& ws) {
  multiply(rows, ws.G, x, K, ws.Gv);
  return dot(x, ws.Gv, K);
}

// K=2 closed form on a trace-normalised Gram, rows row_stride(2) apart (solvers._two_objectives).
FB_INLINE void two_objectives(const double* G, const bool* active, double rounding, double* w) {
  const double g11 = G[0], g22 = G[row_stride(2) + 1], g12 = G[1];
  const double to_first = g22 - g12, to_second = g11 - g12;
  const double tol = rounding * (g11 + g22);
  const bool identical = to_first <= tol && to_second <= tol;
  const double safe = identical ? 1.0 : to_first + to_second;
  double first = to_second <= 0 ? 1.0 : (to_first <= 0 ? 0.0 : to_first / safe);
  double second = to_second <= 0 ? 0.0 : (to_first <= 0 ? 1.0 : to_second / safe);
  w[0] = identical ? 0.5 : p_clamp(first, 0.0, 1.0);
  w[1] = identical ? 0.5 : p_clamp(second, 0.0, 1.0);
  if (active[0] && !active[1]) { w[0] = 1.0; w[1] = 0.0; }
  if (active[1] && !active[0]) { w[0] = 0.0; w[1] = 1.0; }
}

// v minimising v^T G v with sum(v) = 1, v = 0 off the corral: the bordered KKT system on the
// corral's m objectives, by Gaussian elimination with partial pivoting. false if singular.
template <class Rows, int KMAX>
FB_INLINE bool affine_min_norm(const Rows& rows, const double* G, int K, Workspace<KMAX>& ws) {
  int m = 0;
  for (int k = 0; k < K; ++k) m += ws.corral[k] ? 1 : 0;
  rows.single([&] {
    for (int k = 0, r = 0; k < K; ++k) if (ws.corral[k]) ws.idx[r++] = k;
  });
  const int n = m + 1, cols = n + 1, lda = row_stride(cols), ld = row_stride(K);
  double* A = ws.A;
  rows.each(0, n, [&](int r) {
    for (int c = 0; c < m; ++c) A[r * lda + c] = r < m ? G[ws.idx[r] * ld + ws.idx[c]] : 1.0;
    A[r * lda + m] = r < m ? 1.0 : 0.0;
    A[r * lda + n] = r < m ? 0.0 : 1.0;
  });
  for (int col = 0; col < n; ++col) {
    int pivot = col;
    for (int r = col + 1; r < n; ++r)
      if (p_abs(A[r * lda + col]) > p_abs(A[pivot * lda + col])) pivot = r;
    if (A[pivot * lda + col] == 0.0) return false;
    if (pivot != col)
      rows.each(0, cols, [&](int c) {
        const double t = A[col * lda + c];
        A[col * lda + c] = A[pivot * lda + c];
        A[pivot * lda + c] = t;
      });
    const double inv = 1.0 / A[col * lda + col];
    rows.each(col + 1, n, [&](int r) {
      const double f = A[r * lda + col] * inv;
      if (f == 0.0) return;
      for (int c = col; c < cols; ++c) A[r * lda + c] -= f * A[col * lda + c];
    });
  }
  rows.single([&] {  // back substitution into the augmented column: each row needs the later ones
    for (int r = n - 1; r >= 0; --r) {
      double x = A[r * lda + n];
      for (int c = r + 1; c < n; ++c) x -= A[r * lda + c] * A[c * lda + n];
      A[r * lda + n] = x / A[r * lda + r];
    }
  });
  rows.each(0, K, [&](int k) { ws.v[k] = 0.0; });
  rows.each(0, m, [&](int r) { ws.v[ws.idx[r]] = A[r * lda + n]; });
  bool finite = true;
  for (int r = 0; r < m; ++r) finite = finite && p_finite(A[r * lda + n]);
  return finite;
}

FB_INLINE int active_set_budget(int K) { return 4 * K + 4; }

// Wolfe's minimum-norm-point method (solvers.active_set_min_norm) on the trace-normalised Gram;
// a finished segment stops early, which gives the masked torch loop's result.
template <class Rows, int KMAX>
FB_INLINE void active_set_min_norm(const Rows& rows, const double* G, int K, Workspace<KMAX>& ws, double* w) {
  const double tol = 4.0 * K * kEps64;
  const int ld = row_stride(K);
  int start = -1;
  for (int k = 0; k < K; ++k)
    if (ws.active[k] && (start < 0 || G[k * ld + k] < G[start * ld + start])) start = k;
  rows.each(0, K, [&](int k) {
    ws.corral[k] = k == start;
    w[k] = k == start ? 1.0 : 0.0;
  });
  if (start < 0) return;
  const int budget = active_set_budget(K);
  for (int it = 0; it < budget; ++it) {
    if (!affine_min_norm(rows, G, K, ws)) return;  // never seen: keep the last point of the simplex
    bool inside = true;
    for (int k = 0; k < K; ++k) inside = inside && (!ws.corral[k] || ws.v[k] > 0);
    if (inside) {
      rows.each(0, K, [&](int k) { w[k] = ws.v[k]; });
      multiply(rows, G, ws.v, K, ws.Gv);
      const double level = dot(ws.v, ws.Gv, K);
      int j = -1;
      for (int k = 0; k < K; ++k)
        if (ws.active[k] && !ws.corral[k] && (j < 0 || ws.Gv[k] < ws.Gv[j])) j = k;
      if (j < 0 || !(ws.Gv[j] < level - tol)) return;  // KKT conditions hold
      rows.single([&] { ws.corral[j] = true; });
      continue;
    }
    double theta = 0.0;
    int leaving = -1;
    for (int k = 0; k < K; ++k) {
      if (!ws.corral[k] || ws.v[k] > 0) continue;
      const double den = w[k] - ws.v[k];
      const double ratio = w[k] / (den > 0 ? den : 1.0);
      if (leaving < 0 || ratio < theta) { theta = ratio; leaving = k; }
    }
    theta = p_clamp(theta, 0.0, 1.0);
    rows.each(0, K, [&](int k) {
      double x = p_max(w[k] + theta * (ws.v[k] - w[k]), 0.0);
      const bool keep = ws.corral[k] && k != leaving && x > 0;
      ws.corral[k] = keep;
      w[k] = keep ? x : 0.0;
    });
    double total = 0.0;
    for (int k = 0; k < K; ++k) total += w[k];
    total = p_max(total, kTiny64);
    rows.each(0, K, [&](int k) { w[k] = w[k] / total; });
  }
}

// Min-norm weights of the active objectives (solvers.min_norm_float64) into ws.minnorm.
template <class Rows, int KMAX>
FB_INLINE void min_norm(const Rows& rows, int K, double rounding, Workspace<KMAX>& ws) {
  double* w = ws.minnorm;
  if (K == 1) {
    rows.single([&] { w[0] = 1.0; });
    return;
  }
  const int ld = row_stride(K);
  double trace = 0.0;
  for (int k = 0; k < K; ++k) trace += ws.G[k * ld + k];
  const double scale = trace > 0 ? trace : 1.0;
  rows.each(0, K * K, [&](int i) {
    const int at = i / K * ld + i % K;
    ws.Gn[at] = ws.G[at] / scale;
  });
  if (K == 2) {
    rows.single([&] { two_objectives(ws.Gn, ws.active, rounding, w); });
    return;
  }
  bool any = false;
  for (int k = 0; k < K; ++k) any = any || ws.active[k];
  if (!any) {
    rows.each(0, K, [&](int k) { w[k] = 1.0 / K; });
    return;
  }
  active_set_min_norm(rows, ws.Gn, K, ws, w);
}

// policies.restore_sum_magnitude: w scaled so its combination is `gamma` times as long as the plain
// sum; a combination that is zero to rounding level stays as it is.
template <class Rows, int KMAX>
FB_INLINE void restore_sum_magnitude(const Rows& rows, double* w, int K, double rounding, Workspace<KMAX>& ws,
                                     double gamma, bool only_up) {
  rows.each(0, K, [&](int k) { ws.v[k] = ws.active[k] ? 1.0 : 0.0; });
  const int ld = row_stride(K);
  double reach = 0.0;
  for (int k = 0; k < K; ++k) reach += p_abs(w[k]) * p_sqrt(p_max(ws.G[k * ld + k], 0.0));
  const double target = p_max(quadratic(rows, ws.v, K, ws), 0.0);
  const double current = p_max(quadratic(rows, w, K, ws), 0.0);
  double factor = current > rounding * reach * reach ? gamma * p_sqrt(target) / p_sqrt(current) : 1.0;
  if (only_up) factor = p_max(factor, 1.0);
  rows.each(0, K, [&](int k) { w[k] = w[k] * factor; });
}

template <int KMAX>
FB_INLINE double cosine(const Workspace<KMAX>& ws, int K, int k, int l) {
  const int ld = row_stride(K);
  const double nk = p_sqrt(p_max(ws.G[k * ld + k], 0.0)), nl = p_sqrt(p_max(ws.G[l * ld + l], 0.0));
  const double denom = nk * nl;
  return denom > 0 ? p_clamp(ws.G[k * ld + l] / denom, -1.0, 1.0) : 0.0;
}

// Any two distinct active objectives whose cosine is < 0 (or <= 0 with or_zero).
template <class Rows, int KMAX>
FB_INLINE bool any_pair_below_zero(const Rows& rows, Workspace<KMAX>& ws, int K, bool or_zero) {
  rows.each(0, K, [&](int k) {
    bool below = false;
    for (int l = 0; l < K && !below; ++l) {
      if (k == l || !ws.active[k] || !ws.active[l]) continue;
      const double c = cosine(ws, K, k, l);
      below = c < 0 || (or_zero && c <= 0);
    }
    ws.below[k] = below;
  });
  bool any = false;
  for (int k = 0; k < K; ++k) any = any || ws.below[k];
  return any;
}

// One segment: weights (float64, into ws.weights) and branch. ws.G and ws.active must be loaded.
template <class Rows, int KMAX>
FB_INLINE int64_t solve_segment(const Rows& rows, const Options& o, int K, Workspace<KMAX>& ws) {
  double* out = ws.weights;
  int count = 0;
  for (int k = 0; k < K; ++k) count += ws.active[k] ? 1 : 0;
  if (o.code == kSum) {
    rows.each(0, K, [&](int k) { out[k] = 1.0; });
    return kBranchSum;
  }
  if (o.code == kMmPareto) {
    const bool disagree = any_pair_below_zero(rows, ws, K, true);
    if (disagree) {
      min_norm(rows, K, o.rounding, ws);
      rows.each(0, K, [&](int k) { out[k] = ws.minnorm[k]; });
    } else {
      const double c = count > 0 ? double(count) : 1.0;
      rows.each(0, K, [&](int k) { out[k] = (ws.active[k] ? 1.0 : 0.0) / c; });
    }
    if (o.rescale > 0) restore_sum_magnitude(rows, out, K, o.rounding, ws, o.rescale, true);
    return disagree ? kBranchConflict : kBranchSum;
  }
  const bool conflict = o.code == kMgda || any_pair_below_zero(rows, ws, K, false);
  if (conflict) {
    min_norm(rows, K, o.rounding, ws);
    rows.each(0, K, [&](int k) { out[k] = ws.minnorm[k]; });
    if (o.rescale > 0) restore_sum_magnitude(rows, out, K, o.rounding, ws, o.rescale, false);
    return kBranchConflict;
  }
  // pareto_lora without conflict: rescale to the mean norm when imbalanced, else the plain sum.
  const int ld = row_stride(K);
  double big = 0.0, small = 0.0, total = 0.0;
  for (int k = 0, seen = 0; k < K; ++k) {
    if (!ws.active[k]) continue;
    const double n = p_sqrt(p_max(ws.G[k * ld + k], 0.0));
    big = p_max(big, n);
    small = seen++ ? p_min(small, n) : n;
    total += n;
  }
  const bool imbalanced = count >= 2 && big > o.tau * small;
  if (!imbalanced) {
    rows.each(0, K, [&](int k) { out[k] = ws.active[k] ? 1.0 : 0.0; });
    return kBranchSum;
  }
  const double mean = total / double(count);
  rows.each(0, K, [&](int k) {
    if (!ws.active[k]) {
      out[k] = 0.0;
      return;
    }
    const double to_mean = mean / p_sqrt(p_max(ws.G[k * ld + k], 0.0));
    if (o.magnitude == kMagnitudeMean) out[k] = to_mean;
    else if (o.magnitude == kMagnitudeWeaker || o.magnitude == k) out[k] = p_max(to_mean, 1.0);
    else out[k] = 1.0;
  });
  return kBranchRescale;
}

// Weights beyond the output dtype's range saturate, never inf.
template <typename T>
FB_INLINE T saturate_to(double x, double largest) { return T(p_clamp(x, -largest, largest)); }

}  // namespace policy
}  // namespace fused_balance
