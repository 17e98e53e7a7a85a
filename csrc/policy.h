// The built-in balancing policies on one segment's K x K Gram: HOST_DEVICE and free of torch
// headers, so the CPU op (policy_cpu.cpp, a loop over segments) and the CUDA kernel
// (policy_cuda.cu, one thread per segment) run the same arithmetic. The reference is
// fused_balance/policies.py and fused_balance/solvers.py; every step below mirrors a line there
// (same decisions, same tolerances), in float64 whatever the Gram's dtype.
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

struct Options {
  int64_t code;
  double tau;
  bool rescale_to_sum;
  double rounding;  // relative rounding level of the input Gram (K=2 "identical" test)
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

// Working memory of one segment (on a GPU: one thread's local memory).
struct Workspace {
  double G[kMaxObjectives * kMaxObjectives];   // clean, symmetric Gram
  double Gn[kMaxObjectives * kMaxObjectives];  // trace-normalised copy for the min-norm solve
  double A[(kMaxObjectives + 1) * (kMaxObjectives + 2)];  // bordered system, augmented
  double w[kMaxObjectives], v[kMaxObjectives], Gv[kMaxObjectives], minnorm[kMaxObjectives];
  int idx[kMaxObjectives];
  bool active[kMaxObjectives], corral[kMaxObjectives];
};

// Non-finite entries as 0 (flagged elsewhere, never solved); symmetrised by halves.
template <typename T>
FB_INLINE void load_gram(const T* g, const bool* active_in, int K, Workspace& ws) {
  for (int k = 0; k < K; ++k) {
    for (int l = 0; l < K; ++l) {
      double a = double(g[k * K + l]), b = double(g[l * K + k]);
      a = p_finite(a) ? a : 0.0;
      b = p_finite(b) ? b : 0.0;
      ws.G[k * K + l] = 0.5 * a + 0.5 * b;
    }
  }
  for (int k = 0; k < K; ++k) ws.active[k] = active_in ? active_in[k] : ws.G[k * K + k] > 0;
}

FB_INLINE double quadratic(const double* w, const double* G, int K) {
  double total = 0.0;
  for (int k = 0; k < K; ++k) {
    double row = 0.0;
    for (int l = 0; l < K; ++l) row += G[k * K + l] * w[l];
    total += w[k] * row;
  }
  return total;
}

// K=2 closed form on a trace-normalised Gram (solvers._two_objectives).
FB_INLINE void two_objectives(const double* G, const bool* active, double rounding, double* w) {
  const double g11 = G[0], g22 = G[3], g12 = G[1];
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
FB_INLINE bool affine_min_norm(const double* G, int K, Workspace& ws) {
  int m = 0;
  for (int k = 0; k < K; ++k) if (ws.corral[k]) ws.idx[m++] = k;
  const int n = m + 1, cols = n + 1;
  double* A = ws.A;
  for (int r = 0; r < m; ++r) {
    for (int c = 0; c < m; ++c) A[r * cols + c] = G[ws.idx[r] * K + ws.idx[c]];
    A[r * cols + m] = 1.0;
    A[r * cols + n] = 0.0;
  }
  for (int c = 0; c < m; ++c) A[m * cols + c] = 1.0;
  A[m * cols + m] = 0.0;
  A[m * cols + n] = 1.0;
  for (int col = 0; col < n; ++col) {
    int pivot = col;
    for (int r = col + 1; r < n; ++r)
      if (p_abs(A[r * cols + col]) > p_abs(A[pivot * cols + col])) pivot = r;
    if (A[pivot * cols + col] == 0.0) return false;
    if (pivot != col)
      for (int c = 0; c < cols; ++c) {
        const double t = A[col * cols + c];
        A[col * cols + c] = A[pivot * cols + c];
        A[pivot * cols + c] = t;
      }
    const double inv = 1.0 / A[col * cols + col];
    for (int r = col + 1; r < n; ++r) {
      const double f = A[r * cols + col] * inv;
      if (f == 0.0) continue;
      for (int c = col; c < cols; ++c) A[r * cols + c] -= f * A[col * cols + c];
    }
  }
  for (int r = n - 1; r >= 0; --r) {  // back substitution into the augmented column
    double x = A[r * cols + n];
    for (int c = r + 1; c < n; ++c) x -= A[r * cols + c] * A[c * cols + n];
    A[r * cols + n] = x / A[r * cols + r];
  }
  for (int k = 0; k < K; ++k) ws.v[k] = 0.0;
  bool finite = true;
  for (int r = 0; r < m; ++r) {
    ws.v[ws.idx[r]] = A[r * cols + n];
    finite = finite && p_finite(A[r * cols + n]);
  }
  return finite;
}

FB_INLINE int active_set_budget(int K) { return 4 * K + 4; }

// Wolfe's minimum-norm-point method (solvers.active_set_min_norm) on the trace-normalised Gram;
// a finished segment stops early, which gives the masked torch loop's result.
FB_INLINE void active_set_min_norm(const double* G, int K, Workspace& ws, double* w) {
  const double tol = 4.0 * K * kEps64;
  int start = -1;
  for (int k = 0; k < K; ++k)
    if (ws.active[k] && (start < 0 || G[k * K + k] < G[start * K + start])) start = k;
  for (int k = 0; k < K; ++k) {
    ws.corral[k] = k == start;
    w[k] = k == start ? 1.0 : 0.0;
  }
  if (start < 0) return;
  const int budget = active_set_budget(K);
  for (int it = 0; it < budget; ++it) {
    if (!affine_min_norm(G, K, ws)) return;  // never seen: keep the last point of the simplex
    bool inside = true;
    for (int k = 0; k < K; ++k) inside = inside && (!ws.corral[k] || ws.v[k] > 0);
    if (inside) {
      for (int k = 0; k < K; ++k) w[k] = ws.v[k];
      double level = 0.0;
      for (int k = 0; k < K; ++k) {
        double row = 0.0;
        for (int l = 0; l < K; ++l) row += G[k * K + l] * ws.v[l];
        ws.Gv[k] = row;
        level += ws.v[k] * row;
      }
      int j = -1;
      for (int k = 0; k < K; ++k)
        if (ws.active[k] && !ws.corral[k] && (j < 0 || ws.Gv[k] < ws.Gv[j])) j = k;
      if (j < 0 || !(ws.Gv[j] < level - tol)) return;  // KKT conditions hold
      ws.corral[j] = true;
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
    double total = 0.0;
    for (int k = 0; k < K; ++k) {
      double x = p_max(w[k] + theta * (ws.v[k] - w[k]), 0.0);
      const bool keep = ws.corral[k] && k != leaving && x > 0;
      x = keep ? x : 0.0;
      ws.corral[k] = keep;
      w[k] = x;
      total += x;
    }
    total = p_max(total, kTiny64);
    for (int k = 0; k < K; ++k) w[k] = w[k] / total;
  }
}

// Min-norm weights of the active objectives (solvers.min_norm_float64) into ws.minnorm.
FB_INLINE void min_norm(int K, double rounding, Workspace& ws) {
  double* w = ws.minnorm;
  if (K == 1) { w[0] = 1.0; return; }
  double trace = 0.0;
  for (int k = 0; k < K; ++k) trace += ws.G[k * K + k];
  const double scale = trace > 0 ? trace : 1.0;
  for (int i = 0; i < K * K; ++i) ws.Gn[i] = ws.G[i] / scale;
  if (K == 2) { two_objectives(ws.Gn, ws.active, rounding, w); return; }
  bool any = false;
  for (int k = 0; k < K; ++k) any = any || ws.active[k];
  if (!any) {
    for (int k = 0; k < K; ++k) w[k] = 1.0 / K;
    return;
  }
  active_set_min_norm(ws.Gn, K, ws, w);
}

// policies.restore_sum_magnitude: a combination that is zero to rounding level stays as it is.
FB_INLINE void restore_sum_magnitude(double* w, int K, double rounding, Workspace& ws, bool only_up) {
  double reach = 0.0;
  for (int k = 0; k < K; ++k) {
    ws.v[k] = ws.active[k] ? 1.0 : 0.0;
    reach += p_abs(w[k]) * p_sqrt(p_max(ws.G[k * K + k], 0.0));
  }
  const double target = p_max(quadratic(ws.v, ws.G, K), 0.0);
  const double current = p_max(quadratic(w, ws.G, K), 0.0);
  double factor = current > rounding * reach * reach ? p_sqrt(target) / p_sqrt(current) : 1.0;
  if (only_up) factor = p_max(factor, 1.0);
  for (int k = 0; k < K; ++k) w[k] = w[k] * factor;
}

FB_INLINE double cosine(const Workspace& ws, int K, int k, int l) {
  const double nk = p_sqrt(p_max(ws.G[k * K + k], 0.0)), nl = p_sqrt(p_max(ws.G[l * K + l], 0.0));
  const double denom = nk * nl;
  return denom > 0 ? p_clamp(ws.G[k * K + l] / denom, -1.0, 1.0) : 0.0;
}

// Any two distinct active objectives whose cosine is < 0 (or <= 0 with or_zero).
FB_INLINE bool any_pair_below_zero(const Workspace& ws, int K, bool or_zero) {
  for (int k = 0; k < K; ++k)
    for (int l = 0; l < K; ++l) {
      if (k == l || !ws.active[k] || !ws.active[l]) continue;
      const double c = cosine(ws, K, k, l);
      if (c < 0 || (or_zero && c <= 0)) return true;
    }
  return false;
}

// One segment: weights (float64) and branch. ws.G and ws.active must be loaded.
FB_INLINE int64_t solve_segment(const Options& o, int K, Workspace& ws, double* out) {
  int count = 0;
  for (int k = 0; k < K; ++k) count += ws.active[k] ? 1 : 0;
  if (o.code == kSum) {
    for (int k = 0; k < K; ++k) out[k] = 1.0;
    return kBranchSum;
  }
  if (o.code == kMmPareto) {
    const bool disagree = any_pair_below_zero(ws, K, true);
    if (disagree) {
      min_norm(K, o.rounding, ws);
      for (int k = 0; k < K; ++k) out[k] = ws.minnorm[k];
    } else {
      const double c = count > 0 ? double(count) : 1.0;
      for (int k = 0; k < K; ++k) out[k] = (ws.active[k] ? 1.0 : 0.0) / c;
    }
    restore_sum_magnitude(out, K, o.rounding, ws, true);
    return disagree ? kBranchConflict : kBranchSum;
  }
  const bool conflict = o.code == kMgda || any_pair_below_zero(ws, K, false);
  if (conflict) {
    min_norm(K, o.rounding, ws);
    for (int k = 0; k < K; ++k) out[k] = ws.minnorm[k];
    if (o.rescale_to_sum) restore_sum_magnitude(out, K, o.rounding, ws, false);
    return kBranchConflict;
  }
  // pareto_lora without conflict: rescale to the mean norm when imbalanced, else the plain sum.
  double big = 0.0, small = 0.0, total = 0.0;
  for (int k = 0, seen = 0; k < K; ++k) {
    if (!ws.active[k]) continue;
    const double n = p_sqrt(p_max(ws.G[k * K + k], 0.0));
    big = p_max(big, n);
    small = seen++ ? p_min(small, n) : n;
    total += n;
  }
  const bool imbalanced = count >= 2 && big > o.tau * small;
  if (!imbalanced) {
    for (int k = 0; k < K; ++k) out[k] = ws.active[k] ? 1.0 : 0.0;
    return kBranchSum;
  }
  const double mean = total / double(count);
  for (int k = 0; k < K; ++k)
    out[k] = ws.active[k] ? mean / p_sqrt(p_max(ws.G[k * K + k], 0.0)) : 0.0;
  return kBranchRescale;
}

// Weights beyond the output dtype's range saturate, never inf.
template <typename T>
FB_INLINE T saturate_to(double x, double largest) { return T(p_clamp(x, -largest, largest)); }

}  // namespace policy
}  // namespace fused_balance
