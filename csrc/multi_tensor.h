// Chunk planning and per-element arithmetic shared by the CPU and CUDA kernels.
//
// Everything here is HOST_DEVICE and free of torch headers, so that the CPU kernels (compiled
// once per ISA), the ATen glue and the CUDA kernels all run the same code: the CPU tests then
// exercise the arithmetic the GPU runs (pair indexing, chunk tables, the combine order, the AdamW
// element update, the 16-bit conversions).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FB_HOST_DEVICE __host__ __device__
#else
#define FB_HOST_DEVICE
#endif
#define FB_INLINE FB_HOST_DEVICE inline

namespace fused_balance {

// ---------------------------------------------------------------------------------------------
// Element types. 16-bit floats are carried as raw bits so that no framework header is needed.
// ---------------------------------------------------------------------------------------------
enum ElemType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

#if defined(__CUDA_ARCH__)
FB_INLINE float bits_to_float(uint32_t u) { return __uint_as_float(u); }
FB_INLINE uint32_t float_to_bits(float f) { return __float_as_uint(f); }
#else
union FloatBits { uint32_t u; float f; };
FB_INLINE float bits_to_float(uint32_t u) { FloatBits c; c.u = u; return c.f; }
FB_INLINE uint32_t float_to_bits(float f) { FloatBits c; c.f = f; return c.u; }
#endif

FB_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even, NaN -> 0x7FC0: the rounding c10::BFloat16 uses.
FB_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t(0x7fc0);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

FB_INLINE float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// IEEE binary16, round to nearest even (what F16C and c10::Half do), subnormals included.
FB_INLINE uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);       // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);      // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                      // below the smallest normal half
    const uint32_t e = a >> 23;
    if (e < 102u) return sign;                                // < 2^-25: rounds to zero
    const uint32_t full = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;                          // 14..24
    uint32_t q = full >> shift;
    const uint32_t rem = full & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;         // q == 1024 is the smallest normal
    return uint16_t(sign | q);
  }
  const uint32_t rebased = a - 0x38000000u;                   // exponent bias 127 -> 15
  return uint16_t(sign | ((rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13));
}

// The accumulate (math) type of an element type: double for double, float otherwise.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

// Calls f(T{}) with T the C++ type of an ElemType code (host code; codes are checked on entry).
template <typename F>
inline void with_type(int32_t code, F&& f) {
  switch (code) {
    case kFloat64: f(double{}); break;
    case kBFloat16: f(bf16_t{}); break;
    case kFloat16: f(f16_t{}); break;
    default: f(float{}); break;
  }
}

template <typename A> FB_INLINE A to_acc(float x) { return A(x); }
template <typename A> FB_INLINE A to_acc(double x) { return A(x); }
template <typename A> FB_INLINE A to_acc(bf16_t x) { return A(bf16_to_float(x.bits)); }
template <typename A> FB_INLINE A to_acc(f16_t x) { return A(f16_to_float(x.bits)); }

template <typename T> struct FromAcc;
template <> struct FromAcc<float> {
  template <typename A> FB_INLINE static float cast(A x) { return float(x); }
};
template <> struct FromAcc<double> {
  template <typename A> FB_INLINE static double cast(A x) { return double(x); }
};
template <> struct FromAcc<bf16_t> {
  template <typename A> FB_INLINE static bf16_t cast(A x) { return bf16_t{float_to_bf16(float(x))}; }
};
template <> struct FromAcc<f16_t> {
  template <typename A> FB_INLINE static f16_t cast(A x) { return f16_t{float_to_f16(float(x))}; }
};
template <typename T, typename A> FB_INLINE T from_acc(A x) { return FromAcc<T>::cast(x); }

// Explicitly rounded product, sum, square root and quotient: nvcc would otherwise contract a*b+c
// into an FMA (the host is built with -ffp-contract=off), and the combine / AdamW results would
// differ between the CPU, the GPU and the float64-checked reference by a rounding. FB_RN picks the
// device's round-to-nearest intrinsic in device code, the plain operation on the host.
#if defined(__CUDA_ARCH__)
#define FB_RN(device, host) device
#else
#define FB_RN(device, host) host
#endif
FB_INLINE float mul_rn(float a, float b) { return FB_RN(__fmul_rn(a, b), a * b); }
FB_INLINE double mul_rn(double a, double b) { return FB_RN(__dmul_rn(a, b), a * b); }
FB_INLINE float add_rn(float a, float b) { return FB_RN(__fadd_rn(a, b), a + b); }
FB_INLINE double add_rn(double a, double b) { return FB_RN(__dadd_rn(a, b), a + b); }
FB_INLINE float sqrt_rn(float a) { return FB_RN(__fsqrt_rn(a), __builtin_sqrtf(a)); }
FB_INLINE double sqrt_rn(double a) { return FB_RN(__dsqrt_rn(a), __builtin_sqrt(a)); }
FB_INLINE float div_rn(float a, float b) { return FB_RN(__fdiv_rn(a, b), a / b); }
FB_INLINE double div_rn(double a, double b) { return FB_RN(__ddiv_rn(a, b), a / b); }
#undef FB_RN

// ---------------------------------------------------------------------------------------------
// Chunk planning. Every tensor is cut into chunks of a fixed number of elements (the last one of
// a tensor may be shorter); a chunk never spans two tensors. The chunk size is a constant, never
// derived from the thread or SM count, so partial sums (and thus results) do not depend on them.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kChunkElems = int64_t(1) << 15;

FB_INLINE int64_t chunks_in_tensor(int64_t numel, int64_t chunk) { return (numel + chunk - 1) / chunk; }

FB_INLINE int64_t chunk_length(int64_t numel, int64_t start, int64_t chunk) {
  const int64_t rest = numel - start;
  return rest < chunk ? rest : chunk;
}

// Fills chunk -> (tensor, first element) for P tensors, tensor by tensor; returns the count.
// With null output arrays it only counts.
FB_INLINE int64_t split_into_chunks(const int64_t* numels, int64_t P, int64_t chunk,
                                    int32_t* chunk_tensor, int64_t* chunk_start) {
  int64_t c = 0;
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t start = 0; start < numels[p]; start += chunk, ++c) {
      if (chunk_tensor) chunk_tensor[c] = int32_t(p);
      if (chunk_start) chunk_start[c] = start;
    }
  }
  return c;
}

// Chunks grouped by segment (a stable counting sort, so each segment lists its chunks in chunk
// order): segment s owns seg_chunks[seg_offsets[s] .. seg_offsets[s+1]). seg_offsets has S+1
// entries. This is the fixed order in which per-chunk partial sums are reduced.
FB_INLINE void plan_segment_chunks(const int32_t* chunk_tensor, int64_t num_chunks,
                                   const int64_t* segment_of_tensor, int64_t S,
                                   int64_t* seg_offsets, int32_t* seg_chunks) {
  for (int64_t s = 0; s <= S; ++s) seg_offsets[s] = 0;
  for (int64_t c = 0; c < num_chunks; ++c) ++seg_offsets[segment_of_tensor[chunk_tensor[c]] + 1];
  for (int64_t s = 0; s < S; ++s) seg_offsets[s + 1] += seg_offsets[s];
  // Second pass: a running cursor per segment, kept in seg_offsets[s] and restored afterwards.
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t s = segment_of_tensor[chunk_tensor[c]];
    seg_chunks[seg_offsets[s]++] = int32_t(c);
  }
  for (int64_t s = S; s > 0; --s) seg_offsets[s] = seg_offsets[s - 1];
  seg_offsets[0] = 0;
}

// Blocks for a grid-stride loop over work_items equal items: one block per item up to one whole
// wave of resident blocks (wave = SMs x blocks resident per SM), never more: a large grid is
// exactly one wave and every block strides over the items (a persistent grid; at least one block).
FB_INLINE int64_t whole_wave_blocks(int64_t work_items, int64_t wave) {
  const int64_t cap = wave > 0 ? wave : 1;
  return work_items < 1 ? 1 : (work_items < cap ? work_items : cap);
}

// Slices per chunk for the kernels with no per-chunk sums to keep (the plan's combine and AdamW):
// the fewest of 1, 2, 4, .. kMaxChunkSlices whose chunks x slices items keep the wave's slots at
// least 90% busy until the last item ends (items / (waves x wave)). 40 M parameters: 1,220 chunks
// on 1,056 resident blocks keep 58% busy (1.16 waves: a second wave of 164 blocks), in quarter
// chunks 92% (4,880 items, 4.6 waves); 100 chunks take 8 slices (800 of the 1,056 blocks busy).
constexpr int kMaxChunkSlices = 8;
FB_INLINE int chunk_slices(int64_t chunks, int64_t wave) {
  const int64_t cap = wave > 0 ? wave : 1;
  for (int slices = 1; slices < kMaxChunkSlices; slices *= 2) {
    const int64_t items = chunks * slices;
    const int64_t waves = (items + cap - 1) / cap;
    if (items * 10 >= waves * cap * 9) return slices;
  }
  return kMaxChunkSlices;
}

// Slice s of `slices` of the range [0, count): [slice_begin(count, s, .), slice_begin(count, s + 1, .)),
// sizes differing by one at most.
FB_INLINE int64_t slice_begin(int64_t count, int s, int slices) { return count * s / slices; }

// ---------------------------------------------------------------------------------------------
// Pairs (k, l), k <= l, of the K objectives: the K(K+1)/2 entries of the Gram's upper triangle,
// row-major: (0,0) (0,1) .. (0,K-1) (1,1) .. (K-1,K-1).
// ---------------------------------------------------------------------------------------------
FB_INLINE int pair_count(int K) { return K * (K + 1) / 2; }
FB_INLINE int pair_index(int k, int l, int K) { return k * K - k * (k - 1) / 2 + (l - k); }
FB_INLINE void pair_of_index(int q, int K, int* k, int* l) {
  int row = 0;
  while (q >= K - row) { q -= K - row; ++row; }
  *k = row;
  *l = row + q;
}

// Gram tiles (the CUDA Gram for K > 8): the objectives in blocks of kGramTile rows; a tile is a
// pair of blocks bi <= bj (tile t = pair_of_index(t, gram_row_blocks(K))) and covers the pairs
// (bi kGramTile + i, bj kGramTile + j), i, j < kGramTile. Every pair (k, l), k <= l < K, lies in
// exactly one tile; gram_tile_pair says which pair a tile slot is (-1: none, off the triangle or
// past K).
constexpr int kGramTile = 8;
FB_INLINE int gram_row_blocks(int K) { return (K + kGramTile - 1) / kGramTile; }
FB_INLINE int gram_tile_count(int K) { return pair_count(gram_row_blocks(K)); }
FB_INLINE int gram_tile_pair(int K, int bi, int bj, int i, int j) {
  const int k = bi * kGramTile + i, l = bj * kGramTile + j;
  return (k <= l && l < K) ? pair_index(k, l, K) : -1;
}
// Passes over a chunk when `tiles_per_pass` tiles are summed at once (one per warp): each pass
// reads the chunk's K rows once, so a Gram reads gram_tile_passes(K, .) * K elements per element
// position (K = 9..24: 1, K = 25..40: 2 with 8 tiles a pass).
FB_INLINE int gram_tile_passes(int K, int tiles_per_pass) {
  return (gram_tile_count(K) + tiles_per_pass - 1) / tiles_per_pass;
}

// Per-chunk Gram partial: pairs[q] += sum_i g_k[i] g_l[i] over [begin, end), pair by pair and in
// index order. This is the whole computation on the portable CPU path and the tail everywhere.
template <typename A, typename T>
FB_INLINE A dot_range(const T* a, const T* b, int64_t begin, int64_t end) {
  A acc = A(0);
  for (int64_t i = begin; i < end; ++i) acc += to_acc<A>(a[i]) * to_acc<A>(b[i]);
  return acc;
}

template <typename A, typename T>
FB_INLINE void accumulate_products(const T* const* g, int K, int64_t begin, int64_t end, A* pairs) {
  int q = 0;
  for (int k = 0; k < K; ++k)
    for (int l = k; l < K; ++l, ++q) pairs[q] += dot_range<A>(g[k], g[l], begin, end);
}

// Sum of the per-chunk partials of segment s for pair q, in chunk order (partials[c * npairs + q]).
template <typename R>
FB_INLINE R reduce_segment_pair(const R* partials, int npairs, const int64_t* seg_offsets,
                                const int32_t* seg_chunks, int64_t s, int q) {
  R total = R(0);
  for (int64_t j = seg_offsets[s]; j < seg_offsets[s + 1]; ++j)
    total += partials[int64_t(seg_chunks[j]) * npairs + q];
  return total;
}

// d = sum_k w[k] g_k[i], each product and sum rounded in A, in objective order: the exact
// sequence of roundings of the reference (w0*g0 + w1*g1 + ...).
// G: anything with g[k] a pointer to objective k's elements (an array of pointers on the CPU, a
// view of the metadata table on the GPU).
template <typename A, typename G>
FB_INLINE A combine_element(const G& g, int K, const A* w, int64_t i) {
  A d = mul_rn(w[0], to_acc<A>(g[0][i]));
  for (int k = 1; k < K; ++k) d = add_rn(d, mul_rn(w[k], to_acc<A>(g[k][i])));
  return d;
}

// ---------------------------------------------------------------------------------------------
// AdamW (torch.optim.AdamW semantics, decoupled weight decay) on one element.
// ---------------------------------------------------------------------------------------------
template <typename A>
struct AdamWConsts {
  A decay;            // 1 - lr * weight_decay
  A beta1, one_minus_beta1;
  A beta2, one_minus_beta2;
  A bias_correction2; // 1 - beta2^step
  A eps;
  A step_size;        // lr / (1 - beta1^step)
};

// Host-side: constants computed in double, as Python does, then rounded once to A.
template <typename A>
FB_INLINE AdamWConsts<A> make_adamw_consts(double lr, double weight_decay, double beta1,
                                           double beta2, double eps, int64_t step) {
  // pow(), as Python's `beta ** step` (a product loop can differ in the last bit).
  const double pow1 = pow(beta1, double(step));
  const double pow2 = pow(beta2, double(step));
  AdamWConsts<A> c;
  c.decay = A(1.0 - lr * weight_decay);
  c.beta1 = A(beta1);
  c.one_minus_beta1 = A(1.0 - beta1);
  c.beta2 = A(beta2);
  c.one_minus_beta2 = A(1.0 - beta2);
  c.bias_correction2 = A(1.0 - pow2);
  c.eps = A(eps);
  c.step_size = A(lr / (1.0 - pow1));
  return c;
}

// p *= 1 - lr wd; m = b1 m + (1-b1) d; v = b2 v + (1-b2) d^2; p -= (lr/bc1) m / (sqrt(v/bc2) + eps)
template <typename A>
FB_INLINE void adamw_update(A& p, A& m, A& v, A d, const AdamWConsts<A>& c) {
  p = mul_rn(p, c.decay);
  m = add_rn(mul_rn(c.beta1, m), mul_rn(c.one_minus_beta1, d));
  v = add_rn(mul_rn(c.beta2, v), mul_rn(mul_rn(c.one_minus_beta2, d), d));
  const A denom = add_rn(sqrt_rn(div_rn(v, c.bias_correction2)), c.eps);
  p = p - div_rn(mul_rn(c.step_size, m), denom);
}

// ---------------------------------------------------------------------------------------------
// Plan tables (BalancePlan): the K gradients live in one [K, ld] bank, so a chunk is just a range
// of a row, identical for every objective. One int64 row per chunk, chunks grouped by segment in
// row order (the fixed reduction order of the Gram). Built once, on the host, by the plan.
// ---------------------------------------------------------------------------------------------
enum PlanColumn : int {
  kColStart = 0,      // first element of the chunk in a bank row (and in the flat buffers)
  kColLength = 1,     // elements, 1 .. kChunkElems
  kColSegment = 2,    // segment id
  kColParam = 3,      // parameter index (AdamW: the params pointer table)
  kColParamOffset = 4,// first element of the chunk inside its parameter
  kColGroup = 5,      // hyper-parameter group (AdamW: the [G, 5] hyper table)
  kPlanColumns = 6
};
// Hyper-parameter table of the planned AdamW, one float64 row per group.
enum HyperColumn : int { kHyLr = 0, kHyWeightDecay = 1, kHyBeta1 = 2, kHyBeta2 = 3, kHyEps = 4, kHyperColumns = 5 };

// A weight in the math type A; weights beyond float's range (rescale factors for norm ratios past
// ~1e38, solved in double) saturate at its largest value, never inf (as the list API's clamp).
template <typename A> FB_INLINE A weight_as(double w) { return A(w); }
template <> FB_INLINE float weight_as<float>(double w) {
  const double big = 3.4028234663852886e38;
  return float(w > big ? big : (w < -big ? -big : w));
}

// The stored-dtype rounding of a combined gradient: a 16-bit gradient's combination is rounded
// to that dtype before the AdamW moments see it (one rule in every backend).
template <typename T, typename A> FB_INLINE A round_through(A d) { return d; }
template <> FB_INLINE float round_through<bf16_t, float>(float d) { return bf16_to_float(float_to_bf16(d)); }
template <> FB_INLINE float round_through<f16_t, float>(float d) { return f16_to_float(float_to_f16(d)); }

}  // namespace fused_balance
