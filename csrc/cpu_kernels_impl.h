// One CPU kernel translation unit. cpu_kernels_{default,avx2,avx512}.cpp each define
//   FB_ISA     the path's name (default, avx2, avx512): namespace cpu::isa_<FB_ISA>, the table
//              getter cpu::kernels_<FB_ISA>() and the table's name;
//   FB_SIMD    0 (scalar), 2 (AVX2) or 3 (AVX-512);
//   FB_TARGET  for a SIMD path, the `target` attribute its kernels are compiled for;
// then include this header. It compiles the kernels for that instruction set only and defines the
// table getter after the target region, so that fetching the table is safe on any CPU (ops_cpu.cpp
// checks the CPU capability before using it). A SIMD path in a non-x86 build has a null table.
//
// The algorithms are written once against a tiny vector wrapper (VF: floats, VD: doubles); the
// default build has no wrapper and runs the scalar code of multi_tensor.h throughout, which is
// also every SIMD path's tail. Everything lives in the per-ISA namespace so that code compiled
// for AVX2 can never be picked by the linker for a caller on the default path: do not include
// this header anywhere else.

#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"

#define FB_CAT_(a, b) a##b
#define FB_CAT(a, b) FB_CAT_(a, b)
#define FB_STR_(a) #a
#define FB_STR(a) FB_STR_(a)
#define FB_ISA_NS FB_CAT(isa_, FB_ISA)
#define FB_ISA_TABLE FB_CAT(kernels_, FB_ISA)

#if FB_SIMD && !(defined(__x86_64__) || defined(_M_X64))
namespace fused_balance {
namespace cpu {
const KernelTable* FB_ISA_TABLE() { return nullptr; }  // not compiled in
}  // namespace cpu
}  // namespace fused_balance
#else  // the scalar path, or a SIMD path on x86: the kernels, then the table

#if FB_SIMD
#include <immintrin.h>
#define FB_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(__clang__)
#define FB_TARGET_PUSH(t) FB_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define FB_TARGET_POP FB_PRAGMA(clang attribute pop)
#else
#define FB_TARGET_PUSH(t) FB_PRAGMA(GCC push_options) FB_PRAGMA(GCC target(t))
#define FB_TARGET_POP FB_PRAGMA(GCC pop_options)
#endif
FB_TARGET_PUSH(FB_TARGET)
#endif

namespace fused_balance {
namespace cpu {
namespace FB_ISA_NS {
namespace {

// kTile: the Gram's fp32 lanes accumulate over at most this many elements of a chunk before their
// sums are added in double (short fp32 accumulations keep the Gram's error small); the float64
// Gram walks the same tiles so that its pairwise path re-reads each from L1.
// kAdamTile: AdamW converts this many elements at a time to the math type, in L1 buffers.
constexpr int64_t kTile = 2048;
constexpr int64_t kAdamTile = 1024;  // five L1 buffers of it on the stack
constexpr int kStackObjectives = 64;

template <typename A> struct AccCode;
template <> struct AccCode<float> { static constexpr int value = kFloat32; };
template <> struct AccCode<double> { static constexpr int value = kFloat64; };

#if FB_SIMD
// ------------------------------------------------------------------------ vector wrappers
// VF (floats) and VD (doubles) are written once over the ISA's intrinsic names: FB_MM(op) is the
// full-width intrinsic (_mm256_op, _mm512_op), FB_MH(op) the half-width one (a VD's worth of
// floats), FB_SI(op) the half-width integer access that moves a VF's worth of 16-bit values. What
// differs by more than the width is spelled out per ISA: the halves of a float vector, the sum of
// a double vector and the bf16 rounding store.
#if FB_SIMD == 2  // AVX2: 8 floats, 4 doubles
#define FB_MM(op) _mm256_##op
#define FB_MH(op) _mm_##op
#define FB_SI(op) _mm_##op##_si128
using RegF = __m256;
using RegD = __m256d;
using RegI = __m256i;
using HalfI = __m128i;
inline RegF int_bits_as_ps(RegI x) { return _mm256_castsi256_ps(x); }
inline __m128 low_half(RegF v) { return _mm256_castps256_ps128(v); }
inline __m128 high_half(RegF v) { return _mm256_extractf128_ps(v, 1); }

inline double hsum_pd(RegD v) {
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

inline void store_bf16(RegF v, bf16_t* p) {  // round to nearest even, NaN -> 0x7FC0 (as float_to_bf16)
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

#elif FB_SIMD == 3  // AVX-512: 16 floats, 8 doubles
#define FB_MM(op) _mm512_##op
#define FB_MH(op) _mm256_##op
#define FB_SI(op) _mm256_##op##_si256
using RegF = __m512;
using RegD = __m512d;
using RegI = __m512i;
using HalfI = __m256i;
inline RegF int_bits_as_ps(RegI x) { return _mm512_castsi512_ps(x); }
inline __m256 low_half(RegF v) { return _mm512_castps512_ps256(v); }
inline __m256 high_half(RegF v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

inline double hsum_pd(RegD v) { return _mm512_reduce_add_pd(v); }

inline void store_bf16(RegF v, bf16_t* p) {  // round to nearest even, NaN -> 0x7FC0 (as float_to_bf16)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
#endif

struct VF {
  static constexpr int W = sizeof(RegF) / sizeof(float);
  RegF v;
  static VF zero() { return {FB_MM(setzero_ps)()}; }
  static VF set1(float x) { return {FB_MM(set1_ps)(x)}; }
  static VF load(const float* p) { return {FB_MM(loadu_ps)(p)}; }
  static VF load(const bf16_t* p) {  // the bits of the float with the same upper half
    const RegI wide = FB_MM(cvtepu16_epi32)(FB_SI(loadu)(reinterpret_cast<const HalfI*>(p)));
    return {int_bits_as_ps(FB_MM(slli_epi32)(wide, 16))};
  }
  static VF load(const f16_t* p) { return {FB_MM(cvtph_ps)(FB_SI(loadu)(reinterpret_cast<const HalfI*>(p)))}; }
  void store(float* p) const { FB_MM(storeu_ps)(p, v); }
  void store(bf16_t* p) const { store_bf16(v, p); }
  void store(f16_t* p) const {
    FB_SI(storeu)(reinterpret_cast<HalfI*>(p), FB_MM(cvtps_ph)(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  double hsum() const {  // in double: the two halves widened (exact), added, then summed
    return hsum_pd(FB_MM(add_pd)(FB_MM(cvtps_pd)(low_half(v)), FB_MM(cvtps_pd)(high_half(v))));
  }
};
inline VF fmadd(VF a, VF b, VF c) { return {FB_MM(fmadd_ps)(a.v, b.v, c.v)}; }
inline VF mul(VF a, VF b) { return {FB_MM(mul_ps)(a.v, b.v)}; }
inline VF add(VF a, VF b) { return {FB_MM(add_ps)(a.v, b.v)}; }

struct VD {
  static constexpr int W = sizeof(RegD) / sizeof(double);
  RegD v;
  static VD zero() { return {FB_MM(setzero_pd)()}; }
  static VD set1(double x) { return {FB_MM(set1_pd)(x)}; }
  static VD load(const double* p) { return {FB_MM(loadu_pd)(p)}; }
  static VD load(const float* p) { return {FB_MM(cvtps_pd)(FB_MH(loadu_ps)(p))}; }  // exact widening
  void store(double* p) const { FB_MM(storeu_pd)(p, v); }
  double hsum() const { return hsum_pd(v); }
};
inline VD fmadd(VD a, VD b, VD c) { return {FB_MM(fmadd_pd)(a.v, b.v, c.v)}; }
inline VD mul(VD a, VD b) { return {FB_MM(mul_pd)(a.v, b.v)}; }
inline VD add(VD a, VD b) { return {FB_MM(add_pd)(a.v, b.v)}; }
#endif

#if FB_SIMD
// The vector type holding the accumulator type A of element type T.
template <typename T> struct VecOf { using type = VF; };
template <> struct VecOf<double> { using type = VD; };
#endif

// ------------------------------------------------------------------------------------ Gram
#if FB_SIMD
// The vector part of a fused Gram tile over the KC streams g[k] + off: all KC(KC+1)/2 products
// accumulate in V registers, U independent accumulators per product to hide the FMA latency;
// pairs[q] += their sums. Returns where the scalar tail starts.
template <int KC, typename V, typename T>
int64_t fused_pairs_simd(const T* const* g, int64_t off, int64_t len, double* pairs) {
  constexpr int NP = KC * (KC + 1) / 2;
  constexpr int U = KC <= 2 ? 2 : 1;
  int64_t i = 0;
  V acc[NP][U];
  for (int q = 0; q < NP; ++q)
    for (int u = 0; u < U; ++u) acc[q][u] = V::zero();
  for (; i + U * V::W <= len; i += U * V::W) {
    for (int u = 0; u < U; ++u) {
      V x[KC];
      for (int k = 0; k < KC; ++k) x[k] = V::load(g[k] + off + i + u * V::W);
      int q = 0;
      for (int k = 0; k < KC; ++k)
        for (int l = k; l < KC; ++l, ++q) acc[q][u] = fmadd(x[k], x[l], acc[q][u]);
    }
  }
  for (int q = 0; q < NP; ++q) {
    V s = acc[q][0];
    for (int u = 1; u < U; ++u) s = add(s, acc[q][u]);
    pairs[q] += s.hsum();
  }
  return i;
}

// The vector part of one pair's dot product over a tile (two accumulators); *pair += its sum.
// Returns where the scalar tail starts.
template <typename V, typename T>
int64_t dot_simd(const T* a, const T* b, int64_t len, double* pair) {
  int64_t i = 0;
  V s0 = V::zero(), s1 = V::zero();
  for (; i + 2 * V::W <= len; i += 2 * V::W) {
    s0 = fmadd(V::load(a + i), V::load(b + i), s0);
    s1 = fmadd(V::load(a + i + V::W), V::load(b + i + V::W), s1);
  }
  *pair += add(s0, s1).hsum();
  return i;
}
#endif

// KC objectives (compile-time) fused: each element of each stream is loaded once per tile and
// all KC(KC+1)/2 products accumulate in registers (fused_pairs_simd), the tail in scalar code.
template <int KC, typename A, typename T>
void gram_tile_fused(const T* const* g, int64_t off, int64_t len, double* pairs) {
  constexpr int NP = KC * (KC + 1) / 2;
  int64_t i = 0;
#if FB_SIMD
  i = fused_pairs_simd<KC, typename VecOf<T>::type>(g, off, len, pairs);
#endif
  A tail[NP];
  for (int q = 0; q < NP; ++q) tail[q] = A(0);
  const T* base[KC];
  for (int k = 0; k < KC; ++k) base[k] = g[k] + off;
  accumulate_products<A>(base, KC, i, len, tail);
  for (int q = 0; q < NP; ++q) pairs[q] += double(tail[q]);
}

// Any K: one pair at a time over the tile (the tile stays in L1 between pairs).
template <typename A, typename T>
void gram_tile_pairwise(const T* const* g, int K, int64_t off, int64_t len, double* pairs) {
  int q = 0;
  for (int k = 0; k < K; ++k) {
    for (int l = k; l < K; ++l, ++q) {
      const T* a = g[k] + off;
      const T* b = g[l] + off;
      int64_t i = 0;
#if FB_SIMD
      i = dot_simd<typename VecOf<T>::type>(a, b, len, &pairs[q]);
#endif
      pairs[q] += double(dot_range<A>(a, b, i, len));
    }
  }
}

template <typename A, typename T>
void gram_typed(const void* const* g_raw, int K, int64_t n, double* pairs) {
  const T* const* g = reinterpret_cast<const T* const*>(g_raw);
  for (int q = 0; q < pair_count(K); ++q) pairs[q] = 0.0;
  for (int64_t off = 0; off < n; off += kTile) {
    const int64_t len = n - off < kTile ? n - off : kTile;
    switch (K) {
      case 1: gram_tile_fused<1, A>(g, off, len, pairs); break;
      case 2: gram_tile_fused<2, A>(g, off, len, pairs); break;
      case 3: gram_tile_fused<3, A>(g, off, len, pairs); break;
      case 4: gram_tile_fused<4, A>(g, off, len, pairs); break;
      default: gram_tile_pairwise<A>(g, K, off, len, pairs); break;
    }
  }
}

void gram_chunk(const void* const* g, int K, int dtype, int64_t n, double* pairs) {
  with_type(dtype, [&](auto t) { gram_typed<acc_t<decltype(t)>, decltype(t)>(g, K, n, pairs); });
}

// --------------------------------------------------------------------------------- Combine
// out[i] = sum_k w[k] g_k[i] for i in [0, n), A arithmetic, stored as O (O = T, or A when the
// combined gradient feeds the AdamW update). Products and sums rounded separately (no FMA): the
// same roundings as combine_element, hence as the reference.
template <typename A, typename T, typename O>
void combine_range(const T* const* g, int K, int64_t n, const A* w, O* out) {
  int64_t i = 0;
#if FB_SIMD
  using V = typename VecOf<T>::type;
  for (; i + V::W <= n; i += V::W) {
    V d = mul(V::set1(w[0]), V::load(g[0] + i));
    for (int k = 1; k < K; ++k) d = add(d, mul(V::set1(w[k]), V::load(g[k] + i)));
    d.store(out + i);
  }
#endif
  for (; i < n; ++i) out[i] = from_acc<O>(combine_element<A>(g, K, w, i));
}

// K pointers advanced by off, on the stack for small K.
template <typename T>
struct Offsets {
  const T* small[kStackObjectives];
  const T** ptr;
  Offsets(const void* const* g, int K, int64_t off) : ptr(K <= kStackObjectives ? small : new const T*[K]) {
    for (int k = 0; k < K; ++k) ptr[k] = reinterpret_cast<const T*>(g[k]) + off;
  }
  ~Offsets() { if (ptr != small) delete[] ptr; }
  Offsets(const Offsets&) = delete;
  Offsets& operator=(const Offsets&) = delete;
};

template <typename A>
struct Weights {
  A small[kStackObjectives];
  A* ptr;
  Weights(const double* w, int K) : ptr(K <= kStackObjectives ? small : new A[K]) {
    for (int k = 0; k < K; ++k) ptr[k] = A(w[k]);
  }
  ~Weights() { if (ptr != small) delete[] ptr; }
  Weights(const Weights&) = delete;
  Weights& operator=(const Weights&) = delete;
};

template <typename A, typename T>
void combine_typed(const void* const* g, int K, int64_t n, const double* w, void* out) {
  const Weights<A> wa(w, K);
  const Offsets<T> base(g, K, 0);
  combine_range<A>(base.ptr, K, n, wa.ptr, reinterpret_cast<T*>(out));
}

void combine_chunk(const void* const* g, int K, int dtype, int64_t n, const double* w, void* out) {
  with_type(dtype, [&](auto t) { combine_typed<acc_t<decltype(t)>, decltype(t)>(g, K, n, w, out); });
}

// ----------------------------------------------------------------------------------- AdamW
// Tile conversion between a stored dtype and the math type, either way (load: From is stored,
// store: To is): 16-bit <-> float in VF lanes (the SIMD loads / stores round as the scalar code),
// everything else and the tail element by element.
template <typename From, typename To>
void convert_tile(const From* src, To* dst, int64_t n) {
  int64_t i = 0;
#if FB_SIMD
  if constexpr ((sizeof(From) == 2 && sizeof(To) == 4) || (sizeof(From) == 4 && sizeof(To) == 2)) {
    for (; i + VF::W <= n; i += VF::W) VF::load(src + i).store(dst + i);
  }
#endif
  for (; i < n; ++i) {
    if constexpr (sizeof(From) == 2) dst[i] = to_acc<To>(src[i]);
    else dst[i] = from_acc<To>(src[i]);
  }
}

// Elements [off, off + n) of a tensor of ElemType dtype, to / from the math type A.
template <typename A>
void load_any(const void* base, int dtype, int64_t off, A* dst, int64_t n) {
  with_type(dtype, [&](auto t) { convert_tile(static_cast<const decltype(t)*>(base) + off, dst, n); });
}

template <typename A>
void store_any(const A* src, void* base, int dtype, int64_t off, int64_t n) {
  with_type(dtype, [&](auto t) { convert_tile(src, static_cast<decltype(t)*>(base) + off, n); });
}

// x[i] = float(T(x[i])): the stored-dtype rounding of a tile (SIMD stores/loads round alike).
template <typename T>
void round_tile_through(float* x, int64_t n) {
  alignas(64) T tmp[kAdamTile];
  convert_tile(x, tmp, n);
  convert_tile(tmp, x, n);
}

// The element update of multi_tensor.h over a tile; a plain loop the compiler vectorises for the
// TU's ISA (sqrt and division included: the build uses -fno-math-errno, not -ffast-math).
template <typename A>
void adamw_tile(A* __restrict p, A* __restrict m, A* __restrict v, const A* __restrict d, int64_t n,
                const AdamWConsts<A> c) {
  for (int64_t i = 0; i < n; ++i) adamw_update(p[i], m[i], v[i], d[i], c);
}

// A: math type (of the parameter); GA: accumulate type of the gradients; T: gradient dtype.
template <typename A, typename GA, typename T>
void adamw_typed(const AdamWChunk& t, const AdamWConsts<A>& c) {
  const Weights<GA> wa(t.weights, t.K);
  alignas(64) GA dbuf[kAdamTile];
  alignas(64) A dconv[sizeof(A) == sizeof(GA) ? 1 : kAdamTile];
  alignas(64) A pbuf[kAdamTile], mbuf[kAdamTile], vbuf[kAdamTile];
  constexpr int code = AccCode<A>::value;
  for (int64_t off = 0; off < t.n; off += kAdamTile) {
    const int64_t len = t.n - off < kAdamTile ? t.n - off : kAdamTile;
    const Offsets<T> g(t.grads, t.K, off);
    combine_range<GA>(g.ptr, t.K, len, wa.ptr, dbuf);
    // One rounding rule in every backend: a 16-bit combined gradient is rounded to the gradient
    // dtype before the moments see it (as combining into a bf16 .grad, then torch AdamW).
    if constexpr (sizeof(T) == 2) round_tile_through<T>(dbuf, len);
    const A* d = dconv;
    if constexpr (sizeof(A) == sizeof(GA)) {
      d = dbuf;
    } else {
      for (int64_t i = 0; i < len; ++i) dconv[i] = A(dbuf[i]);
    }
    // Operate in place where the stored dtype is the math type, else through an L1 tile.
    A* p = t.param_dtype == code ? reinterpret_cast<A*>(t.param) + off : pbuf;
    A* m = t.exp_avg_dtype == code ? reinterpret_cast<A*>(t.exp_avg) + off : mbuf;
    A* v = t.exp_avg_sq_dtype == code ? reinterpret_cast<A*>(t.exp_avg_sq) + off : vbuf;
    if (p == pbuf) load_any(t.param, t.param_dtype, off, pbuf, len);
    if (m == mbuf) load_any(t.exp_avg, t.exp_avg_dtype, off, mbuf, len);
    if (v == vbuf) load_any(t.exp_avg_sq, t.exp_avg_sq_dtype, off, vbuf, len);
    adamw_tile(p, m, v, d, len, c);
    if (p == pbuf) store_any(pbuf, t.param, t.param_dtype, off, len);
    if (m == mbuf) store_any(mbuf, t.exp_avg, t.exp_avg_dtype, off, len);
    if (v == vbuf) store_any(vbuf, t.exp_avg_sq, t.exp_avg_sq_dtype, off, len);
  }
}

template <typename A>
void adamw_for_math(const AdamWChunk& t, const AdamWConsts<A>& c) {
  with_type(t.grad_dtype, [&](auto g) { adamw_typed<A, acc_t<decltype(g)>, decltype(g)>(t, c); });
}

void adamw_chunk(const AdamWChunk* t) {
  if (t->param_dtype == kFloat64) adamw_for_math<double>(*t, t->consts_f64);
  else adamw_for_math<float>(*t, t->consts_f32);
}


// ------------------------------------------------------------------------- float64 Gram
// The plan's Gram: every product and sum in double. A product of two fp32 (bf16, fp16) values
// is exact in double and the sums cannot overflow, so the Gram of any finite fp32 gradients is
// finite and correct to double rounding (1e-30 .. 1e20 gradients alike); only a real NaN/Inf
// makes it non-finite. S streams of float or double (16-bit inputs are widened to float first).
template <int KC, typename S>
void gram64_tile_fused(const S* const* g, int64_t len, double* pairs) {
  int64_t i = 0;
#if FB_SIMD
  i = fused_pairs_simd<KC, VD>(g, 0, len, pairs);
#endif
  accumulate_products<double>(g, KC, i, len, pairs);
}

template <typename S>
void gram64_tile_pairwise(const S* const* g, int K, int64_t len, double* pairs) {
  int q = 0;
  for (int k = 0; k < K; ++k) {
    for (int l = k; l < K; ++l, ++q) {
      int64_t i = 0;
#if FB_SIMD
      i = dot_simd<VD>(g[k], g[l], len, &pairs[q]);
#endif
      pairs[q] += dot_range<double>(g[k], g[l], i, len);
    }
  }
}

template <typename S>
void gram64_streams(const S* const* g, int K, int64_t len, double* pairs) {
  switch (K) {
    case 1: gram64_tile_fused<1>(g, len, pairs); break;
    case 2: gram64_tile_fused<2>(g, len, pairs); break;
    case 3: gram64_tile_fused<3>(g, len, pairs); break;
    case 4: gram64_tile_fused<4>(g, len, pairs); break;
    default: gram64_tile_pairwise(g, K, len, pairs); break;
  }
}

// 16-bit gradients: widened to float through an L1 tile of kWiden elements per stream.
constexpr int64_t kWiden = 256;

template <typename T>
void gram64_half(const void* const* g_raw, int K, int64_t n, double* pairs) {
  float small[8][kWiden];
  float* heap = K > 8 ? new float[size_t(K) * kWiden] : nullptr;
  const float* rows_small[kStackObjectives];
  const float** rows = K <= kStackObjectives ? rows_small : new const float*[K];
  for (int k = 0; k < K; ++k) rows[k] = heap ? heap + k * kWiden : small[k];
  for (int64_t off = 0; off < n; off += kWiden) {
    const int64_t len = n - off < kWiden ? n - off : kWiden;
    for (int k = 0; k < K; ++k)
      convert_tile(reinterpret_cast<const T*>(g_raw[k]) + off, const_cast<float*>(rows[k]), len);
    gram64_streams(rows, K, len, pairs);
  }
  if (rows != rows_small) delete[] rows;
  delete[] heap;
}

// Tiles of kTile elements, so that the pairwise path re-reads each tile from L1.
template <typename T>
void gram64_tiled(const void* const* g, int K, int64_t n, double* pairs) {
  for (int64_t off = 0; off < n; off += kTile) {
    const Offsets<T> rows(g, K, off);
    gram64_streams(rows.ptr, K, n - off < kTile ? n - off : kTile, pairs);
  }
}

void gram64_chunk(const void* const* g, int K, int dtype, int64_t n, double* pairs) {
  for (int q = 0; q < pair_count(K); ++q) pairs[q] = 0.0;
  with_type(dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (sizeof(T) == 2) gram64_half<T>(g, K, n, pairs);
    else gram64_tiled<T>(g, K, n, pairs);
  });
}

}  // namespace
}  // namespace FB_ISA_NS
}  // namespace cpu
}  // namespace fused_balance

#if FB_SIMD
FB_TARGET_POP
#endif

namespace fused_balance {
namespace cpu {
const KernelTable* FB_ISA_TABLE() {
  static const KernelTable table{FB_STR(FB_ISA), FB_ISA_NS::gram_chunk, FB_ISA_NS::combine_chunk,
                                 FB_ISA_NS::adamw_chunk, FB_ISA_NS::gram64_chunk};
  return &table;
}
}  // namespace cpu
}  // namespace fused_balance

#endif
