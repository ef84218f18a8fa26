// An independent, deliberately naive statement of each op (one element at a time, std::floor,
// fmaxf/fminf, sticky NaN), written from hypha/ops/_reference.py without sharing code with
// csrc/core. The unit tests compare the kernels (every SIMD path, any thread count) to it bit for
// bit, and check it against hand-computed values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "hypha/kernels.h"

namespace oracle {

struct Q {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
};

inline uint32_t levels(int bits) { return (1u << bits) - 1u; }
inline float mid(int bits) { return static_cast<float>(levels(bits)) / 2.0f; }

inline uint32_t lowbias32(uint32_t x) {  // written out again on purpose
  x ^= x >> 16;
  x = static_cast<uint32_t>(static_cast<uint64_t>(x) * 0x7FEB352Du);
  x ^= x >> 15;
  x = static_cast<uint32_t>(static_cast<uint64_t>(x) * 0x846CA68Bu);
  x ^= x >> 16;
  return x;
}

inline float uniform(uint64_t offset, int64_t i, uint32_t key) {
  const auto idx = static_cast<uint32_t>((offset + static_cast<uint64_t>(i)) & 0xFFFFFFFFull);
  return static_cast<float>(lowbias32(idx ^ key) >> 8) * std::ldexp(1.0f, -24);
}

inline Q quantize(const float* x, int64_t n, const hypha::QuantParams& p) {
  const int bits = p.bits;
  const int64_t bs = p.block_size;
  const int64_t nb = (n + bs - 1) / bs;
  Q q;
  q.codes.assign(static_cast<size_t>((n * bits + 7) / 8), 0);
  q.scales.resize(static_cast<size_t>(nb));
  const float m = mid(bits);
  const float L = static_cast<float>(levels(bits));
  for (int64_t b = 0; b < nb; ++b) {
    float absmax = 0.0f;
    for (int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) {
      const float a = std::fabs(x[i]);
      if (std::isnan(a) || std::isnan(absmax)) {
        absmax = std::isnan(absmax) ? absmax : a;
      } else if (a > absmax) {
        absmax = a;
      }
    }
    const bool tiny = absmax < std::ldexp(1.0f, -120);
    const float scale = tiny ? 0.0f : absmax / m;
    const float inv = tiny ? 0.0f : m / absmax;
    q.scales[static_cast<size_t>(b)] = scale;
    for (int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) {
      float t = x[i] * inv;
      const float off = p.stochastic ? m + uniform(p.offset, i, p.key)
                                     : static_cast<float>(1 << (bits - 1));
      t = t + off;
      t = std::floor(t);
      if (std::isnan(t)) t = 0.0f;
      t = std::fmin(std::fmax(t, 0.0f), L);
      const auto code = static_cast<uint32_t>(t);
      const int per = 8 / bits;
      q.codes[static_cast<size_t>(i / per)] |= static_cast<uint8_t>(code << ((i % per) * bits));
    }
  }
  return q;
}

inline uint32_t code_at(const uint8_t* codes, int64_t i, int bits) {
  const int per = 8 / bits;
  return (codes[i / per] >> ((i % per) * bits)) & levels(bits);
}

inline std::vector<float> dequantize(const uint8_t* codes, const float* scales, int64_t n, int bits,
                                     int64_t bs) {
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out[static_cast<size_t>(i)] =
        (static_cast<float>(code_at(codes, i, bits)) - mid(bits)) * scales[i / bs];
  }
  return out;
}

inline std::vector<float> delta(const float* g, const float* l, const float* e, int64_t n) {
  std::vector<float> d(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    float v = g[i];
    if (l != nullptr) v = v - l[i];
    if (e != nullptr) v = v + e[i];
    d[static_cast<size_t>(i)] = v;
  }
  return d;
}

inline void nesterov(float* p, float* m, const float* g, int64_t n, float lr, float mu) {
  for (int64_t i = 0; i < n; ++i) {
    m[i] = m[i] * mu + g[i];
    const float d = g[i] + m[i] * mu;
    p[i] = p[i] - d * lr;
  }
}

// Bit equality of float arrays, NaN == NaN (any payload).
inline bool same_float(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  return ua == ub;
}

inline int64_t first_float_mismatch(const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!same_float(a[i], b[i])) return i;
  }
  return -1;
}

inline int64_t first_byte_mismatch(const uint8_t* a, const uint8_t* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return i;
  }
  return -1;
}

// Normal values spread over many magnitudes, with a few blocks scaled way up or down.
inline std::vector<float> random_vector(int64_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, sigma);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = nd(rng);
  for (int64_t i = 0; i + 64 <= n; i += 997) {  // a few extreme stretches
    const float f = (i / 997) % 3 == 0 ? 1e30f : ((i / 997) % 3 == 1 ? 1e-30f : 1.0f);
    for (int64_t j = i; j < i + 64; ++j) v[static_cast<size_t>(j)] *= f;
  }
  return v;
}

}  // namespace oracle
