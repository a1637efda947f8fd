// Fused GroupNorm -> optional per-sample scale/shift -> optional SiLU for CPU tensors, forward and backward.
//
//   y = act(z),  z = (gamma * xhat + beta) * (1 + scale[n, c]) + shift[n, c],  xhat = (x - mean[n, g]) * rstd[n, g]
//
// One sample's activations fit in the L2 cache at the sizes difflab trains on CPUs, so each pass over a
// sample after the first reads from cache: the op costs about one read of x (and dy) and one write from
// memory, where the unfused chain (norm, scale-shift, SiLU and their backward) makes about ten passes.
// Samples are spread over OpenMP threads (the libgomp that torch itself loads). Layout: NCHW or NHWC
// (channels-last), float32 or bfloat16 storage; all arithmetic is float32. Built on first use by
// difflab/nets/cpu_kernels.py; plain C ABI, no torch headers.
//
// A sample is walked as "runs" of contiguous elements with per-element coefficient tables: NCHW gives one
// run per channel (every table a constant along it: `Bcast`), channels-last gives blocks of about 256
// elements, a multiple of C, with every per-channel table replicated to the block length (`Indexed`).
// The inner loops are then long and unit-stride. Where the compiler targets AVX-512 (-march=native on
// such a CPU) the run loops use intrinsics, 16 lanes at a time; elsewhere the portable loops below.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DIFFLAB_AVX512 1
#include <immintrin.h>
#endif

namespace {

// ---------------------------------------------------------------- scalar element access and maths

inline float load(const float* p, long i) { return p[i]; }
inline float load(const uint16_t* p, long i) {
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, long i, float v) { p[i] = v; }
inline void store(uint16_t* p, long i, float v) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint32_t a = u & 0x7fffffffu;
  a = a < 0x7fff7fffu ? a : 0x7fff7fffu;  // NaN payloads that would carry past the exponent stay NaN
  p[i] = static_cast<uint16_t>(((a + 0x7fffu + ((a >> 16) & 1u)) >> 16) | ((u >> 16) & 0x8000u));
}

// exp(x) for float: Cody-Waite reduction and the Cephes minimax polynomial (about 1 ulp)
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float exp_f(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * kLog2e + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  const float r2 = r * r;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * r2 + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, 4);
  return p * s;
}
inline float sigmoid_f(float z) { return 1.0f / (1.0f + exp_f(-z)); }

// ---------------------------------------------------------------- the four run loops, portable
// Tables are read as t[j] (Indexed) or t[0] (Bcast); accumulators likewise (a[j] or a[0]).

enum Mode { Bcast, Indexed };
template <Mode M>
inline long at(long j) { return M == Indexed ? j : 0; }

// sums of d = x - k and d * d (k: a value of the channel, so that the variance does not cancel)
template <Mode M, typename T>
void stats_run(const T* x, long len, const float* k, float* s1, float* s2) {
  if (M == Indexed) {
#pragma omp simd
    for (long j = 0; j < len; ++j) {
      const float d = load(x, j) - k[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  } else {
    float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
    for (long j = 0; j < len; ++j) {
      const float d = load(x, j) - k[0];
      a += d;
      b += d * d;
    }
    s1[0] += a;
    s2[0] += b;
  }
}

template <Mode M, typename T>
void forward_run(const T* x, T* y, long len, const float* a, const float* b, bool act) {
  if (act) {
#pragma omp simd
    for (long j = 0; j < len; ++j) {
      const float z = a[at<M>(j)] * load(x, j) + b[at<M>(j)];
      store(y, j, z * sigmoid_f(z));
    }
  } else {
#pragma omp simd
    for (long j = 0; j < len; ++j) store(y, j, a[at<M>(j)] * load(x, j) + b[at<M>(j)]);
  }
}

// dz = dy * act'(z) into dz (float), s1 += dz, s2 += dz * (x - mean) (times rstd later)
template <Mode M, typename T>
void backward_run(const T* x, const T* dy, float* dz, long len, const float* a, const float* b, const float* mean,
                  bool act, float* s1, float* s2) {
  float q1 = 0.0f, q2 = 0.0f;
#pragma omp simd reduction(+ : q1, q2)
  for (long j = 0; j < len; ++j) {
    const float v = load(x, j);
    float g = load(dy, j);
    if (act) {
      const float z = a[at<M>(j)] * v + b[at<M>(j)];
      const float sg = sigmoid_f(z);
      g *= sg * (1.0f + z * (1.0f - sg));
    }
    dz[j] = g;
    if (M == Indexed) {
      s1[j] += g;
      s2[j] += g * (v - mean[j]);
    } else {
      q1 += g;
      q2 += g * (v - mean[0]);
    }
  }
  if (M == Bcast) {
    s1[0] += q1;
    s2[0] += q2;
  }
}

template <Mode M, typename T>
void dx_run(const T* x, const float* dz, T* dx, long len, const float* p, const float* q, const float* r) {
#pragma omp simd
  for (long j = 0; j < len; ++j) store(dx, j, p[at<M>(j)] * dz[j] + q[at<M>(j)] * load(x, j) + r[at<M>(j)]);
}

// ---------------------------------------------------------------- the same loops with AVX-512
#ifdef DIFFLAB_AVX512

inline __mmask16 tail(long left) { return left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1u); }
inline __m512 vload(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 vload(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void vstore(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void vstore(uint16_t* p, __m512 v, __mmask16 m) {
#ifdef __AVX512BF16__
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));  // nearest even, quiet NaN
#else
  const __m512i u = _mm512_castps_si512(v);
  __m512i a = _mm512_min_epu32(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7fff7fff));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(a, 16), _mm512_set1_epi32(1));
  a = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(0x7fff)), lsb), 16);
  a = _mm512_or_si512(a, _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(a));
#endif
}
template <Mode M>
inline __m512 vtab(const float* t, long j, __mmask16 m) { return M == Indexed ? vload(t + j, m) : _mm512_set1_ps(t[0]); }

inline __m512 vexp(__m512 x) {  // x = n ln2 + r (Cody-Waite), e^r by its Taylor series to r^6, times 2^n
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));  // finite; far below, scalef flushes to 0
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
inline __m512 vsigmoid(__m512 z) {  // 1 / (1 + exp(-z)): 14-bit reciprocal and one Newton step
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), vexp(_mm512_sub_ps(_mm512_setzero_ps(), z)));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// SiLU for bfloat16 outputs, whose 8-bit significand needs far less than the float32 path gives:
// e^-z = 2^n 2^f with f in [-1/2, 1/2], 2^f by a cubic (minimax for relative error: 7.5e-5), and the
// 14-bit reciprocal without a Newton step. Relative error under 1.4e-4, a twentieth of bf16's rounding
// step, in about half the instructions. Large |z| saturate through scalef (0 or inf), NaN stays NaN.
inline __m512 vsilu_bf16(__m512 z) {
  const __m512 t = _mm512_mul_ps(z, _mm512_set1_ps(-kLog2e));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(0.055171094834804535f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24260999262332916f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6932609677314758f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999281167984009f));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, n));
  return _mm512_mul_ps(z, _mm512_rcp14_ps(d));
}

template <Mode M, typename T>
void stats_run_v(const T* x, long len, const float* k, float* s1, float* s2) {
  __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
  for (long j = 0; j < len; j += 16) {
    const __mmask16 m = tail(len - j);
    const __m512 d = _mm512_maskz_sub_ps(m, vload(x + j, m), vtab<M>(k, j, m));
    if (M == Indexed) {
      vstore(s1 + j, _mm512_add_ps(vload(s1 + j, m), d), m);
      vstore(s2 + j, _mm512_fmadd_ps(d, d, vload(s2 + j, m)), m);
    } else {
      a = _mm512_add_ps(a, d);
      b = _mm512_fmadd_ps(d, d, b);
    }
  }
  if (M == Bcast) {
    s1[0] += _mm512_reduce_add_ps(a);
    s2[0] += _mm512_reduce_add_ps(b);
  }
}

template <Mode M, typename T>
void forward_run_v(const T* x, T* y, long len, const float* a, const float* b, bool act) {
  for (long j = 0; j < len; j += 16) {
    const __mmask16 m = tail(len - j);
    __m512 z = _mm512_fmadd_ps(vtab<M>(a, j, m), vload(x + j, m), vtab<M>(b, j, m));
    if (act) z = std::is_same_v<T, uint16_t> ? vsilu_bf16(z) : _mm512_mul_ps(z, vsigmoid(z));
    vstore(y + j, z, m);
  }
}

template <Mode M, typename T>
void backward_run_v(const T* x, const T* dy, float* dz, long len, const float* a, const float* b, const float* mean,
                    bool act, float* s1, float* s2) {
  __m512 q1 = _mm512_setzero_ps(), q2 = _mm512_setzero_ps();
  const __m512 one = _mm512_set1_ps(1.0f);
  for (long j = 0; j < len; j += 16) {
    const __mmask16 m = tail(len - j);
    const __m512 v = vload(x + j, m);
    __m512 g = vload(dy + j, m);
    if (act) {
      const __m512 z = _mm512_fmadd_ps(vtab<M>(a, j, m), v, vtab<M>(b, j, m));
      const __m512 sg = vsigmoid(z);
      g = _mm512_mul_ps(g, _mm512_mul_ps(sg, _mm512_fmadd_ps(z, _mm512_sub_ps(one, sg), one)));
    }
    _mm512_mask_storeu_ps(dz + j, m, g);
    const __m512 gx = _mm512_mul_ps(g, _mm512_sub_ps(v, vtab<M>(mean, j, m)));
    if (M == Indexed) {
      vstore(s1 + j, _mm512_add_ps(vload(s1 + j, m), g), m);
      vstore(s2 + j, _mm512_add_ps(vload(s2 + j, m), gx), m);
    } else {  // masked-off lanes are zero: g and v loaded as zeros, the table broadcast times zero
      q1 = _mm512_add_ps(q1, g);
      q2 = _mm512_add_ps(q2, _mm512_maskz_mov_ps(m, gx));
    }
  }
  if (M == Bcast) {
    s1[0] += _mm512_reduce_add_ps(q1);
    s2[0] += _mm512_reduce_add_ps(q2);
  }
}

template <Mode M, typename T>
void dx_run_v(const T* x, const float* dz, T* dx, long len, const float* p, const float* q, const float* r) {
  for (long j = 0; j < len; j += 16) {
    const __mmask16 m = tail(len - j);
    const __m512 t = _mm512_fmadd_ps(vtab<M>(q, j, m), vload(x + j, m), vtab<M>(r, j, m));
    vstore(dx + j, _mm512_fmadd_ps(vtab<M>(p, j, m), vload(dz + j, m), t), m);
  }
}
// Channels-last with C a multiple of 16: walk each 16-channel column down the pixels, with the sums in
// registers (two independent sets, to hide the add latency) instead of tables in memory.
template <typename T>
void stats_columns_v(const T* x, long c, long hw, const float* k, float* s1, float* s2) {
  for (long cc = 0; cc < c; cc += 16) {
    const __m512 kv = _mm512_loadu_ps(k + cc);
    __m512 a0 = _mm512_setzero_ps(), b0 = a0, a1 = a0, b1 = a0;
    long p = 0;
    for (; p + 1 < hw; p += 2) {
      const __m512 d0 = _mm512_sub_ps(vload(x + p * c + cc, 0xffff), kv);
      const __m512 d1 = _mm512_sub_ps(vload(x + (p + 1) * c + cc, 0xffff), kv);
      a0 = _mm512_add_ps(a0, d0);
      b0 = _mm512_fmadd_ps(d0, d0, b0);
      a1 = _mm512_add_ps(a1, d1);
      b1 = _mm512_fmadd_ps(d1, d1, b1);
    }
    if (p < hw) {
      const __m512 d0 = _mm512_sub_ps(vload(x + p * c + cc, 0xffff), kv);
      a0 = _mm512_add_ps(a0, d0);
      b0 = _mm512_fmadd_ps(d0, d0, b0);
    }
    _mm512_storeu_ps(s1 + cc, _mm512_add_ps(a0, a1));
    _mm512_storeu_ps(s2 + cc, _mm512_add_ps(b0, b1));
  }
}

// the backward's first pass the same way: dz into its buffer, s1 = sum dz, s2 = sum dz * (x - mean)
template <typename T>
void backward_columns_v(const T* x, const T* dy, float* dz, long c, long hw, const float* a, const float* b,
                        const float* mean, bool act, float* s1, float* s2) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (long cc = 0; cc < c; cc += 16) {
    const __m512 av = _mm512_loadu_ps(a + cc), bv = _mm512_loadu_ps(b + cc), mv = _mm512_loadu_ps(mean + cc);
    __m512 q1 = _mm512_setzero_ps(), q2 = q1;
    for (long p = 0; p < hw; ++p) {
      const long i = p * c + cc;
      const __m512 v = vload(x + i, 0xffff);
      __m512 g = vload(dy + i, 0xffff);
      if (act) {
        const __m512 z = _mm512_fmadd_ps(av, v, bv);
        const __m512 sg = vsigmoid(z);
        g = _mm512_mul_ps(g, _mm512_mul_ps(sg, _mm512_fmadd_ps(z, _mm512_sub_ps(one, sg), one)));
      }
      _mm512_storeu_ps(dz + i, g);
      q1 = _mm512_add_ps(q1, g);
      q2 = _mm512_fmadd_ps(g, _mm512_sub_ps(v, mv), q2);
    }
    _mm512_storeu_ps(s1 + cc, q1);
    _mm512_storeu_ps(s2 + cc, q2);
  }
}
#define COLUMNS(s) ((s).channels_last && (s).c % 16 == 0)
#define RUN(name) name##_v
#else
#define COLUMNS(s) false
#define RUN(name) name
#endif

// ---------------------------------------------------------------- walking a sample

struct Shape {
  long n, c, hw, g;
  bool channels_last;
  long rep() const { return channels_last ? c * ((255 + c) / c) : c; }  // table length
};

// dst[j] = src[j % c] for j < rep (channels-last tables) or a copy (NCHW)
inline void replicate(const Shape& s, const float* src, float* dst) {
  for (long j = 0; j < s.rep(); j += s.c) std::memcpy(dst + j, src, s.c * sizeof(float));
}

// f(Mode tag, offset of the run in the sample, its length, offset of its tables) for every run
template <typename F>
inline void runs(const Shape& s, F f) {
  if (s.channels_last) {
    const long total = s.c * s.hw, r = s.rep();
    for (long blk = 0; blk < total; blk += r) f(std::integral_constant<Mode, Indexed>(), blk, total - blk < r ? total - blk : r, 0L);
  } else {
    for (long ch = 0; ch < s.c; ++ch) f(std::integral_constant<Mode, Bcast>(), ch * s.hw, s.hw, ch);
  }
}

// table-indexed accumulators -> per-channel sums: out[c] = sum of acc[j] over j = c (mod C)
inline void fold(const Shape& s, const float* acc, float* out) {
  for (long ch = 0; ch < s.c; ++ch) out[ch] = 0.0f;
  for (long j = 0; j < s.rep(); j += s.c)
    for (long ch = 0; ch < s.c; ++ch) out[ch] += acc[j + ch];
}

// the runs' accumulators (tables for channels-last, one per channel for NCHW) -> per-channel totals
inline void channel_totals(const Shape& s, const float* a1, const float* a2, float* t1, float* t2) {
  if (s.channels_last) {
    fold(s, a1, t1);
    fold(s, a2, t2);
  } else {
    std::memcpy(t1, a1, s.c * sizeof(float));
    std::memcpy(t2, a2, s.c * sizeof(float));
  }
}

// per-thread scratch: `channel_arrays` arrays of C floats, then `tables` arrays of rep() floats
struct Scratch {
  std::vector<float> mem;
  long c, r, k;
  Scratch(const Shape& s, long channel_arrays, long tables)
      : mem(channel_arrays * s.c + tables * s.rep()), c(s.c), r(s.rep()), k(channel_arrays) {}
  float* channel(long i) { return mem.data() + i * c; }
  float* table(long i) { return mem.data() + k * c + i * r; }
};

// statistics of one sample -> per-channel mean_c and rstd_c (broadcast from the groups), mean_g, rstd_g.
// One pass: per channel, sums of x - k and (x - k)^2 with k the channel's first value; channels then
// merge into groups with the parallel-variance formula, in double.
template <typename T>
void sample_stats(const Shape& s, const T* x, float eps, Scratch& m, float* mean_c, float* rstd_c, float* mean_g,
                  float* rstd_g) {
  float *k = m.channel(0), *t1 = m.channel(1), *t2 = m.channel(2);
  float *kt = m.table(0), *a1 = m.table(1), *a2 = m.table(2);
  for (long ch = 0; ch < s.c; ++ch) k[ch] = load(x, s.channels_last ? ch : ch * s.hw);
#ifdef DIFFLAB_AVX512
  if (COLUMNS(s)) {
    stats_columns_v(x, s.c, s.hw, k, t1, t2);
  } else
#endif
  {
    replicate(s, k, kt);
    for (long j = 0; j < s.rep(); ++j) a1[j] = a2[j] = 0.0f;
    runs(s, [&](auto mode, long off, long len, long toff) {
      RUN(stats_run)<decltype(mode)::value>(x + off, len, kt + toff, a1 + toff, a2 + toff);
    });
    channel_totals(s, a1, a2, t1, t2);
  }
  const long cg = s.c / s.g;
  const double per = static_cast<double>(s.hw);
  for (long g = 0; g < s.g; ++g) {
    double mean = 0.0;
    for (long i = 0; i < cg; ++i) mean += k[g * cg + i] + t1[g * cg + i] / per;
    mean /= static_cast<double>(cg);
    double m2 = 0.0;
    for (long i = 0; i < cg; ++i) {
      const long ch = g * cg + i;
      const double mc = k[ch] + t1[ch] / per;
      m2 += (t2[ch] - static_cast<double>(t1[ch]) * t1[ch] / per) + per * (mc - mean) * (mc - mean);
    }
    const double var = m2 > 0.0 ? m2 / (per * cg) : 0.0;
    mean_g[g] = static_cast<float>(mean);
    rstd_g[g] = static_cast<float>(1.0 / std::sqrt(var + eps));
    for (long i = 0; i < cg; ++i) {
      mean_c[g * cg + i] = mean_g[g];
      rstd_c[g * cg + i] = rstd_g[g];
    }
  }
}

// z = a[c] * x + b[c] for sample n: the normalisation, affine map and scale/shift folded together
void coefficients(const Shape& s, long n, const float* mean_c, const float* rstd_c, const float* gamma,
                  const float* beta, const float* scale, const float* shift, float* k1, float* a, float* b) {
  for (long ch = 0; ch < s.c; ++ch) {
    k1[ch] = scale ? 1.0f + scale[n * s.c + ch] : 1.0f;
    const float rg = rstd_c[ch] * gamma[ch];
    a[ch] = rg * k1[ch];
    b[ch] = (beta[ch] - mean_c[ch] * rg) * k1[ch] + (shift ? shift[n * s.c + ch] : 0.0f);
  }
}

template <typename T>
void forward(const Shape& s, const T* x, T* y, float* mean, float* rstd, const float* gamma, const float* beta,
             const float* scale, const float* shift, float eps, bool act, int threads) {
#pragma omp parallel num_threads(threads)
  {
    Scratch m(s, 8, 5);
    float *mean_c = m.channel(3), *rstd_c = m.channel(4), *k1 = m.channel(5), *a = m.channel(6), *b = m.channel(7);
    float *at = m.table(3), *bt = m.table(4);
#pragma omp for schedule(static)
    for (long n = 0; n < s.n; ++n) {
      const long base = n * s.c * s.hw;
      sample_stats(s, x + base, eps, m, mean_c, rstd_c, mean + n * s.g, rstd + n * s.g);
      coefficients(s, n, mean_c, rstd_c, gamma, beta, scale, shift, k1, a, b);
      replicate(s, a, at);
      replicate(s, b, bt);
      runs(s, [&](auto mode, long off, long len, long toff) {
        RUN(forward_run)<decltype(mode)::value>(x + base + off, y + base + off, len, at + toff, bt + toff, act);
      });
    }
  }
}

// dx, and per (sample, channel) s1 = sum dz and s2 = sum dz * xhat (the parameter and scale/shift
// gradients follow from them on the Python side)
template <typename T>
void backward(const Shape& s, const T* x, const T* dy, T* dx, const float* mean, const float* rstd, const float* gamma,
              const float* beta, const float* scale, const float* shift, bool act, float* s1, float* s2, int threads) {
  const long cg = s.c / s.g;
  const float inv_m = 1.0f / static_cast<float>(cg * s.hw);
#pragma omp parallel num_threads(threads)
  {
    Scratch m(s, 8, 8);
    float *mean_c = m.channel(0), *rstd_c = m.channel(1), *k1 = m.channel(2), *a = m.channel(3);
    float *b = m.channel(4), *pc = m.channel(5), *qc = m.channel(6), *rc = m.channel(7);
    float *at = m.table(0), *bt = m.table(1), *mt = m.table(2), *acc1 = m.table(3), *acc2 = m.table(4);
    float *pt = m.table(5), *qt = m.table(6), *rt = m.table(7);
    std::vector<float> dz_buf(s.c * s.hw);
    float* dz = dz_buf.data();
#pragma omp for schedule(static)
    for (long n = 0; n < s.n; ++n) {
      const long base = n * s.c * s.hw;
      for (long ch = 0; ch < s.c; ++ch) {
        mean_c[ch] = mean[n * s.g + ch / cg];
        rstd_c[ch] = rstd[n * s.g + ch / cg];
      }
      coefficients(s, n, mean_c, rstd_c, gamma, beta, scale, shift, k1, a, b);
      float* t1 = s1 + n * s.c;
      float* t2 = s2 + n * s.c;
      // one read of x and dy: dz = dy * act'(z) kept in float, and the sums of dz and dz * (x - mean)
#ifdef DIFFLAB_AVX512
      if (COLUMNS(s)) {
        backward_columns_v(x + base, dy + base, dz, s.c, s.hw, a, b, mean_c, act, t1, t2);
      } else
#endif
      {
        replicate(s, a, at);
        replicate(s, b, bt);
        replicate(s, mean_c, mt);
        for (long j = 0; j < s.rep(); ++j) acc1[j] = acc2[j] = 0.0f;
        runs(s, [&](auto mode, long off, long len, long toff) {
          RUN(backward_run)<decltype(mode)::value>(x + base + off, dy + base + off, dz + off, len, at + toff,
                                                   bt + toff, mt + toff, act, acc1 + toff, acc2 + toff);
        });
        channel_totals(s, acc1, acc2, t1, t2);
      }
      for (long ch = 0; ch < s.c; ++ch) t2[ch] *= rstd_c[ch];
      // dx = r (kk dz - mean_g(kk dz) - xhat mean_g(kk dz xhat)) = pc * dz + qc * x + rc, kk = (1 + scale) gamma
      for (long g = 0; g < s.g; ++g) {
        float ga = 0.0f, gb = 0.0f;
        for (long i = 0; i < cg; ++i) {
          const long ch = g * cg + i;
          ga += k1[ch] * gamma[ch] * t1[ch];
          gb += k1[ch] * gamma[ch] * t2[ch];
        }
        ga *= inv_m;
        gb *= inv_m;
        const float r = rstd[n * s.g + g], mu = mean[n * s.g + g];
        for (long i = 0; i < cg; ++i) {
          const long ch = g * cg + i;
          pc[ch] = r * k1[ch] * gamma[ch];
          qc[ch] = -r * r * gb;
          rc[ch] = -r * ga + r * r * mu * gb;
        }
      }
      replicate(s, pc, pt);
      replicate(s, qc, qt);
      replicate(s, rc, rt);
      runs(s, [&](auto mode, long off, long len, long toff) {
        RUN(dx_run)<decltype(mode)::value>(x + base + off, dz + off, dx + base + off, len, pt + toff, qt + toff, rt + toff);
      });
    }
  }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16 (x, y, dy, dx); statistics, parameters, scale/shift and sums are float32.
// scale and shift may be null ([N, C] otherwise); mean and rstd are [N, G]; s1 and s2 are [N, C].
int difflab_group_norm_act_forward(const void* x, void* y, float* mean, float* rstd, const float* gamma,
                                   const float* beta, const float* scale, const float* shift, long n, long c, long hw,
                                   long g, int channels_last, int dtype, float eps, int act, int threads) {
  if (n <= 0 || c <= 0 || hw <= 0 || g <= 0 || c % g) return 1;
  const Shape s{n, c, hw, g, channels_last != 0};
  if (dtype == 0)
    forward(s, static_cast<const float*>(x), static_cast<float*>(y), mean, rstd, gamma, beta, scale, shift, eps, act,
            threads);
  else if (dtype == 1)
    forward(s, static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), mean, rstd, gamma, beta, scale, shift, eps,
            act, threads);
  else
    return 2;
  return 0;
}

int difflab_group_norm_act_backward(const void* x, const void* dy, void* dx, const float* mean, const float* rstd,
                                    const float* gamma, const float* beta, const float* scale, const float* shift,
                                    float* s1, float* s2, long n, long c, long hw, long g, int channels_last,
                                    int dtype, int act, int threads) {
  if (n <= 0 || c <= 0 || hw <= 0 || g <= 0 || c % g) return 1;
  const Shape s{n, c, hw, g, channels_last != 0};
  if (dtype == 0)
    backward(s, static_cast<const float*>(x), static_cast<const float*>(dy), static_cast<float*>(dx), mean, rstd,
             gamma, beta, scale, shift, act, s1, s2, threads);
  else if (dtype == 1)
    backward(s, static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(dy), static_cast<uint16_t*>(dx), mean,
             rstd, gamma, beta, scale, shift, act, s1, s2, threads);
  else
    return 2;
  return 0;
}

// 1 where this build uses the AVX-512 loops, 0 for the portable ones
int difflab_kernels_avx512() {
#ifdef DIFFLAB_AVX512
  return 1;
#else
  return 0;
#endif
}
}
