// Private to csrc/core: the per-ISA kernel tables and the scalar building blocks they share.
//
// Every ISA translation unit (generic.cpp, avx2.cpp, avx512.cpp) fills one KernelTable. Each entry
// processes a contiguous range of blocks (or elements, for nesterov) of a whole tensor, so the
// dispatcher (dispatch.cpp) can hand disjoint ranges to OpenMP threads. Every block starts on a
// byte boundary of the packed codes (block_size >= 16 is a multiple of 8 / bits), so ranges never
// share a byte.
//
// The scalar helpers below are the element-wise definition of each op, written as single fp32
// operations in the reference's order; the SIMD paths use them for tails (the last < 16 elements
// of the last block), and the generic path uses them for everything. They live in an anonymous
// namespace so that each ISA translation unit gets its own copy (no ODR merging of code compiled
// for different instruction sets).
#pragma once

#include <cstdint>
#include <cstring>

#include "hypha/kernels.h"

namespace hypha::cpu::impl {

struct KernelTable {
  const char* name;
  // Blocks [b0, b1) of quantize(x[0..n)).
  void (*quantize)(const float* x, int64_t n, const QuantParams& p, uint8_t* codes, float* scales,
                   int64_t b0, int64_t b1);
  // Blocks [b0, b1) of out = dequant (accumulate=false) or out += dequant (accumulate=true).
  void (*dequantize)(const uint8_t* codes, const float* scales, int64_t n, int bits,
                     int64_t block_size, float* out, bool accumulate, int64_t b0, int64_t b1);
  // Blocks [b0, b1) of encode_delta; local and/or ef may be null.
  void (*encode_delta)(const float* global, const float* local, float* ef, int64_t n,
                       const QuantParams& p, uint8_t* codes, float* scales, int64_t b0,
                       int64_t b1);
  // Elements [i0, i1) of the Nesterov step.
  void (*nesterov)(float* param, float* momentum, const float* grad, int64_t i0, int64_t i1,
                   float lr, float mu);
};

// The tables; avx2_table()/avx512_table() return nullptr when not compiled in (non-x86 builds).
// Whether the running CPU supports them is decided by dispatch.cpp.
const KernelTable* generic_table();
const KernelTable* avx2_table();
const KernelTable* avx512_table();

namespace {  // NOLINT(build/namespaces): one private copy per ISA translation unit

template <int BITS>
struct Q {
  static constexpr int kLevels = (1 << BITS) - 1;
  static constexpr float kL = static_cast<float>(kLevels);
  static constexpr float kMid = static_cast<float>(kLevels) / 2.0f;  // 127.5, 7.5, 1.5 (exact)
  static constexpr float kRtnOff = static_cast<float>(1 << (BITS - 1));
  static constexpr int kPer = 8 / BITS;  // codes per byte
};

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Largest |x| as the bits of a float: integer max of (bits & 0x7fffffff) orders every finite
// value, +inf and NaN (NaN > inf > finite), so a NaN anywhere makes the result NaN, as torch's
// amax does.
// (Signed compares: the values are < 2^31, and SSE2 has no unsigned 32-bit compare.)
inline uint32_t absmax_bits_scalar(const float* x, int64_t n) {
  int32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const auto a = static_cast<int32_t>(f2u(x[i]) & 0x7fffffffu);
    m = a > m ? a : m;
  }
  return static_cast<uint32_t>(m);
}

struct BlockScale {
  float scale;
  float inv;
};

// scale = absmax / mid, inv = mid / absmax (IEEE divisions), both 0 for tiny blocks. A NaN
// absmax fails the comparison and gives NaN for both, as in the reference.
template <int BITS>
inline BlockScale block_scale(uint32_t absmax_bits) {
  const float a = u2f(absmax_bits);
  if (a < kTinyAbsmax) return {0.0f, 0.0f};
  return {a / Q<BITS>::kMid, Q<BITS>::kMid / a};
}

// u in [0, 1): (hash32(idx ^ key) >> 8) * 2^-24, exact in fp32.
inline float uniform01(uint32_t idx, uint32_t key) {
  return static_cast<float>(hash32(idx ^ key) >> 8) * 0x1p-24f;
}

// One code: min(max(floor(x*inv + off), 0), L) with NaN -> 0. For t >= 0 floor is truncation,
// so clamping first and truncating gives the same integer.
template <int BITS, bool STOCH>
inline uint32_t quant1(float x, float inv, uint32_t idx, uint32_t key) {
  float t = x * inv;
  float off;
  if constexpr (STOCH) {
    off = Q<BITS>::kMid + uniform01(idx, key);
  } else {
    off = Q<BITS>::kRtnOff;
  }
  t = t + off;
  t = t > 0.0f ? t : 0.0f;  // NaN -> 0
  t = t < Q<BITS>::kL ? t : Q<BITS>::kL;
  return static_cast<uint32_t>(static_cast<int32_t>(t));
}

template <int BITS>
inline float dequant1(uint32_t code, float scale) {
  return (static_cast<float>(code) - Q<BITS>::kMid) * scale;
}

// Quantizes x[0..len) (element 0 at stream index idx0) into packed bytes starting at codes
// (byte aligned); with EF, ef[j] = x[j] - dequant(code_j). The last partial byte's unused bits
// are 0.
template <int BITS, bool STOCH, bool EF>
inline void quant_seg_scalar(const float* x, int64_t len, float scale, float inv, uint32_t idx0,
                             uint32_t key, uint8_t* codes, float* ef) {
  constexpr int per = Q<BITS>::kPer;
  for (int64_t j = 0; j < len; j += per) {
    uint32_t byte = 0;
    for (int k = 0; k < per && j + k < len; ++k) {
      const uint32_t c =
          quant1<BITS, STOCH>(x[j + k], inv, idx0 + static_cast<uint32_t>(j + k), key);
      if constexpr (EF) ef[j + k] = x[j + k] - dequant1<BITS>(c, scale);
      byte |= c << (k * BITS);
    }
    codes[j / per] = static_cast<uint8_t>(byte);
  }
}

// out[0..len) = dequant (or += with ACC) of packed codes starting at a byte boundary.
template <int BITS, bool ACC>
inline void deq_seg_scalar(const uint8_t* codes, int64_t len, float scale, float* out) {
  constexpr int per = Q<BITS>::kPer;
  for (int64_t j = 0; j < len; ++j) {
    const uint32_t c = (codes[j / per] >> ((j % per) * BITS)) & Q<BITS>::kLevels;
    const float v = dequant1<BITS>(c, scale);
    if constexpr (ACC) {
      out[j] = out[j] + v;
    } else {
      out[j] = v;
    }
  }
}

// delta = (g - l) + e, each step rounded, with the optional operands left out.
template <bool LOCAL, bool EF>
inline float delta1(const float* g, const float* l, const float* e, int64_t i) {
  float d = g[i];
  if constexpr (LOCAL) d = d - l[i];
  if constexpr (EF) d = d + e[i];
  return d;
}

inline void nesterov1(float* p, float* m, const float* g, int64_t i, float lr, float mu) {
  const float gi = g[i];
  const float mi = m[i] * mu + gi;
  const float d = gi + mi * mu;
  m[i] = mi;
  p[i] = p[i] - d * lr;
}

// Stream index of element `start` of a call: (offset + start) mod 2^32.
inline uint32_t stream_index(uint64_t offset, int64_t start) {
  return static_cast<uint32_t>(offset + static_cast<uint64_t>(start));
}

}  // namespace
}  // namespace hypha::cpu::impl
