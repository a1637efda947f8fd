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
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

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
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  p[i] = static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : r);
}

// exp(x) for float, vectorisable: Cody-Waite reduction and the Cephes minimax polynomial (about 1 ulp).
inline float exp_f(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, 4);
  return p * s;
}
inline float sigmoid_f(float z) { return 1.0f / (1.0f + exp_f(-z)); }

struct Shape {
  long n, c, hw, g;
  bool channels_last;
  long index(long p, long ch) const { return channels_last ? p * c + ch : ch * hw + p; }
};

// sum over pixels of f(value, channel) for every channel of one sample -> acc[c]
template <typename T, typename F>
void channel_sums(const Shape& s, const T* x, float* acc, F f) {
  if (s.channels_last) {
    for (long ch = 0; ch < s.c; ++ch) acc[ch] = 0.0f;
    for (long p = 0; p < s.hw; ++p) {
      const T* row = x + p * s.c;
#pragma omp simd
      for (long ch = 0; ch < s.c; ++ch) acc[ch] += f(load(row, ch), ch);
    }
  } else {
    for (long ch = 0; ch < s.c; ++ch) {
      const T* col = x + ch * s.hw;
      float a = 0.0f;
#pragma omp simd reduction(+ : a)
      for (long p = 0; p < s.hw; ++p) a += f(load(col, p), ch);
      acc[ch] = a;
    }
  }
}

// per-channel statistics of one sample -> mean_c[c], rstd_c[c] (broadcast from the groups), and mean/rstd[g]
template <typename T>
void sample_stats(const Shape& s, const T* x, float eps, float* work, float* mean_c, float* rstd_c, float* mean_g,
                  float* rstd_g) {
  const long cg = s.c / s.g;
  const float inv_m = 1.0f / static_cast<float>(cg * s.hw);
  channel_sums(s, x, work, [](float v, long) { return v; });
  for (long g = 0; g < s.g; ++g) {
    float a = 0.0f;
    for (long k = 0; k < cg; ++k) a += work[g * cg + k];
    mean_g[g] = a * inv_m;
    for (long k = 0; k < cg; ++k) mean_c[g * cg + k] = mean_g[g];
  }
  channel_sums(s, x, work, [mean_c](float v, long ch) {
    const float d = v - mean_c[ch];
    return d * d;
  });
  for (long g = 0; g < s.g; ++g) {
    float a = 0.0f;
    for (long k = 0; k < cg; ++k) a += work[g * cg + k];
    rstd_g[g] = 1.0f / std::sqrt(a * inv_m + eps);
    for (long k = 0; k < cg; ++k) rstd_c[g * cg + k] = rstd_g[g];
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

// y[i] = f(x[i], channel) over one sample, in memory order
template <typename T, typename U, typename F>
void map_sample(const Shape& s, const T* x, U* y, F f) {
  if (s.channels_last) {
    for (long p = 0; p < s.hw; ++p) {
      const long o = p * s.c;
#pragma omp simd
      for (long ch = 0; ch < s.c; ++ch) store(y, o + ch, f(load(x, o + ch), o + ch, ch));
    }
  } else {
    for (long ch = 0; ch < s.c; ++ch) {
      const long o = ch * s.hw;
#pragma omp simd
      for (long p = 0; p < s.hw; ++p) store(y, o + p, f(load(x, o + p), o + p, ch));
    }
  }
}

template <typename T>
void forward(const Shape& s, const T* x, T* y, float* mean, float* rstd, const float* gamma, const float* beta,
             const float* scale, const float* shift, float eps, bool act, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buf(6 * s.c);
    float *work = buf.data(), *mean_c = work + s.c, *rstd_c = mean_c + s.c, *k1 = rstd_c + s.c;
    float *a = k1 + s.c, *b = a + s.c;
#pragma omp for schedule(static)
    for (long n = 0; n < s.n; ++n) {
      const long off = n * s.c * s.hw;
      sample_stats(s, x + off, eps, work, mean_c, rstd_c, mean + n * s.g, rstd + n * s.g);
      coefficients(s, n, mean_c, rstd_c, gamma, beta, scale, shift, k1, a, b);
      if (act)
        map_sample(s, x + off, y + off, [a, b](float v, long, long ch) {
          const float z = a[ch] * v + b[ch];
          return z * sigmoid_f(z);
        });
      else
        map_sample(s, x + off, y + off, [a, b](float v, long, long ch) { return a[ch] * v + b[ch]; });
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
    std::vector<float> buf(9 * s.c);
    float *mean_c = buf.data(), *rstd_c = mean_c + s.c, *k1 = rstd_c + s.c, *a = k1 + s.c, *b = a + s.c;
    float *pc = b + s.c, *qc = pc + s.c, *rc = qc + s.c, *acc = rc + s.c;
    std::vector<float> dz_buf(s.c * s.hw);
    float* dz = dz_buf.data();
#pragma omp for schedule(static)
    for (long n = 0; n < s.n; ++n) {
      const long off = n * s.c * s.hw;
      const T *xs = x + off, *dys = dy + off;
      for (long ch = 0; ch < s.c; ++ch) {
        mean_c[ch] = mean[n * s.g + ch / cg];
        rstd_c[ch] = rstd[n * s.g + ch / cg];
      }
      coefficients(s, n, mean_c, rstd_c, gamma, beta, scale, shift, k1, a, b);
      // dz = dy * act'(z), kept in float for the second pass
      map_sample(s, dys, dz, [xs, a, b, act](float g, long i, long ch) {
        if (!act) return g;
        const float z = a[ch] * load(xs, i) + b[ch];
        const float sg = sigmoid_f(z);
        return g * sg * (1.0f + z * (1.0f - sg));
      });
      float* t1 = s1 + n * s.c;
      float* t2 = s2 + n * s.c;
      channel_sums(s, dz, t1, [](float v, long) { return v; });
      if (s.channels_last) {  // sum of dz * xhat per channel
        for (long ch = 0; ch < s.c; ++ch) acc[ch] = 0.0f;
        for (long p = 0; p < s.hw; ++p) {
          const long o = p * s.c;
#pragma omp simd
          for (long ch = 0; ch < s.c; ++ch) acc[ch] += dz[o + ch] * (load(xs, o + ch) - mean_c[ch]) * rstd_c[ch];
        }
      } else {
        for (long ch = 0; ch < s.c; ++ch) {
          const long o = ch * s.hw;
          float q = 0.0f;
#pragma omp simd reduction(+ : q)
          for (long p = 0; p < s.hw; ++p) q += dz[o + p] * (load(xs, o + p) - mean_c[ch]);
          acc[ch] = q * rstd_c[ch];
        }
      }
      for (long ch = 0; ch < s.c; ++ch) t2[ch] = acc[ch];
      // dx = r (kk dz - mean_g(kk dz) - xhat mean_g(kk dz xhat)) = pc * dz + qc * x + rc, kk = (1 + scale) gamma
      for (long g = 0; g < s.g; ++g) {
        float ga = 0.0f, gb = 0.0f;
        for (long k = 0; k < cg; ++k) {
          const long ch = g * cg + k;
          ga += k1[ch] * gamma[ch] * t1[ch];
          gb += k1[ch] * gamma[ch] * t2[ch];
        }
        ga *= inv_m;
        gb *= inv_m;
        const float r = rstd[n * s.g + g], m = mean[n * s.g + g];
        for (long k = 0; k < cg; ++k) {
          const long ch = g * cg + k;
          pc[ch] = r * k1[ch] * gamma[ch];
          qc[ch] = -r * r * gb;
          rc[ch] = -r * ga + r * r * m * gb;
        }
      }
      map_sample(s, xs, dx + off, [dz, pc, qc, rc](float v, long i, long ch) { return pc[ch] * dz[i] + qc[ch] * v + rc[ch]; });
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
}
