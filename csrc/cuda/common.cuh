// Private helpers shared by the Hypha CUDA kernels (not part of the public API).
//
// Exact fp32 arithmetic: every add / sub / mul / div / floor below is written as an explicit PTX
// instruction *without* the .ftz modifier. That pins down two things the reference
// (hypha/ops/_reference.py) relies on, whatever flags the file is compiled with:
//   * no contraction into fused multiply-add (the build also passes --fmad=false);
//   * subnormals are kept (a scale near the 2^-120 cut-off, absmax / mid, is subnormal), even if
//     someone builds with -ftz=true or --use_fast_math, which would make the __fadd_rn family
//     flush them.
// div.rn.f32 is the IEEE-correctly-rounded division (the same as __fdiv_rn without -ftz).
//
// Everything in this header also compiles as plain host C++ (with a small emulation header that
// provides threadIdx & co.), so the kernels' index and packing logic can be checked on a machine
// without a GPU; on the host the same operations are ordinary IEEE float arithmetic (compile with
// -ffp-contract=off).
#pragma once

#include <cstdint>

#include "hypha/kernels.h"

#if defined(__CUDACC__)
#define HYPHA_HD __host__ __device__ __forceinline__
#define HYPHA_D __device__ __forceinline__
#else
#define HYPHA_HD inline
#define HYPHA_D inline
#endif

namespace hypha {
namespace cuda_detail {

constexpr int kThreads = 256;  // threads per CTA for every kernel
constexpr int kWarps = kThreads / 32;

// --- exact fp32 operations ----------------------------------------------------------------------

#if defined(__CUDA_ARCH__)
#define HYPHA_PTX_BINOP(name, insn, host_expr)                     \
  HYPHA_HD float name(float a, float b) {                          \
    float r;                                                       \
    asm(insn " %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));           \
    return r;                                                      \
  }
#define HYPHA_PTX_UNOP(name, insn, host_expr)                      \
  HYPHA_HD float name(float a) {                                   \
    float r;                                                       \
    asm(insn " %0, %1;" : "=f"(r) : "f"(a));                       \
    return r;                                                      \
  }
#else
#define HYPHA_PTX_BINOP(name, insn, host_expr) \
  HYPHA_HD float name(float a, float b) { return host_expr; }
#define HYPHA_PTX_UNOP(name, insn, host_expr) \
  HYPHA_HD float name(float a) { return host_expr; }
#endif

HYPHA_PTX_BINOP(f_add, "add.rn.f32", a + b)
HYPHA_PTX_BINOP(f_sub, "sub.rn.f32", a - b)
HYPHA_PTX_BINOP(f_mul, "mul.rn.f32", a * b)
HYPHA_PTX_BINOP(f_div, "div.rn.f32", a / b)
// maxNum / minNum: a NaN operand yields the other operand (as fmaxf / fminf).
HYPHA_PTX_BINOP(f_max, "max.f32", __builtin_fmaxf(a, b))
HYPHA_PTX_BINOP(f_min, "min.f32", __builtin_fminf(a, b))
// Round toward -inf to an integral value (floorf).
HYPHA_PTX_UNOP(f_floor, "cvt.rmi.f32.f32", __builtin_floorf(a))

#undef HYPHA_PTX_BINOP
#undef HYPHA_PTX_UNOP

HYPHA_HD uint32_t f_bits(float a) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(a);
#else
  uint32_t u;
  __builtin_memcpy(&u, &a, 4);
  return u;
#endif
}
HYPHA_HD float f_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float a;
  __builtin_memcpy(&a, &u, 4);
  return a;
#endif
}

HYPHA_HD uint32_t u_max(uint32_t a, uint32_t b) { return a > b ? a : b; }

// --- quantization constants ---------------------------------------------------------------------

template <int BITS>
struct QBits {
  static_assert(BITS == 8 || BITS == 4 || BITS == 2, "bits must be 8, 4 or 2");
  static constexpr uint32_t kMask = (1u << BITS) - 1u;           // L as an integer
  static constexpr float kLevels = static_cast<float>(kMask);   // L = 2^bits - 1
  static constexpr float kMid = static_cast<float>(kMask) / 2;  // L / 2 (exact)
  static constexpr float kRtnOff = static_cast<float>(1u << (BITS - 1));
  static constexpr int kPerByte = 8 / BITS;    // codes per byte
  static constexpr int kUnitBytes = BITS / 2;  // bytes holding one 4-element unit: 4, 2, 1
};

// u in [0, 1) for stream index idx (already reduced mod 2^32): (hash32(idx ^ key) >> 8) * 2^-24.
HYPHA_HD float uniform01(uint32_t idx, uint32_t key) {
  return f_mul(static_cast<float>(hash32(idx ^ key) >> 8), 0x1p-24f);
}

// absmax bit pattern of |x|: ordering non-negative floats as integers puts NaN above +Inf, so an
// integer max over these propagates NaN like torch's amax does.
HYPHA_HD uint32_t abs_bits(float x) { return f_bits(x) & 0x7fffffffu; }

// --- 4-element units ----------------------------------------------------------------------------
// Every kernel works on units of 4 consecutive elements starting at a multiple of 4 (one float4).
// Block sizes are multiples of 16, so a unit never straddles a quantization block, and its codes
// fill whole bytes (8 bits: 4 bytes, 4 bits: 2 bytes, 2 bits: 1 byte) that no other unit touches.

// Byte offset of the codes of the unit starting at element e (e % 4 == 0).
template <int BITS>
HYPHA_HD int64_t unit_code_byte(int64_t e) {
  return (e >> 2) * QBits<BITS>::kUnitBytes;
}

// Loads the packed codes of the unit at element e as one little-endian word (bits of elements at
// or past n read as zero). `full` means e + 4 <= n and the codes pointer is aligned for the word.
template <int BITS>
HYPHA_D uint32_t load_unit_codes(const uint8_t* __restrict__ codes, int64_t e, int64_t n,
                                 bool full) {
  const uint8_t* p = codes + unit_code_byte<BITS>(e);
  if constexpr (BITS == 2) return *p;
  if (full) {
    if constexpr (BITS == 8) return *reinterpret_cast<const uint32_t*>(p);
    return *reinterpret_cast<const uint16_t*>(p);
  }
  uint32_t w = 0;
#pragma unroll
  for (int b = 0; b < QBits<BITS>::kUnitBytes; ++b) {
    if (e + static_cast<int64_t>(b) * QBits<BITS>::kPerByte < n) {
      w |= static_cast<uint32_t>(p[b]) << (8 * b);
    }
  }
  return w;
}

// Stores the packed codes of the unit at element e; bytes holding no element < n are not written.
template <int BITS>
HYPHA_D void store_unit_codes(uint8_t* __restrict__ codes, int64_t e, int64_t n, uint32_t w,
                              bool full) {
  uint8_t* p = codes + unit_code_byte<BITS>(e);
  if constexpr (BITS == 2) {
    *p = static_cast<uint8_t>(w);
    return;
  }
  if (full) {
    if constexpr (BITS == 8) {
      *reinterpret_cast<uint32_t*>(p) = w;
    } else {
      *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(w);
    }
    return;
  }
#pragma unroll
  for (int b = 0; b < QBits<BITS>::kUnitBytes; ++b) {
    if (e + static_cast<int64_t>(b) * QBits<BITS>::kPerByte < n) {
      p[b] = static_cast<uint8_t>(w >> (8 * b));
    }
  }
}

// Loads 4 floats at p + e into v; `vec` means all 4 are in range and p + e is 16-byte aligned,
// otherwise elements at or past n read as 0.
HYPHA_D void load4(const float* __restrict__ p, int64_t e, int64_t n, bool vec, float (&v)[4]) {
  if (vec) {
    const float4 q = *reinterpret_cast<const float4*>(p + e);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = (e + i < n) ? p[e + i] : 0.0f;
  }
}

// Stores the elements of v that are < n at p + e (one 16-byte store when `vec`).
HYPHA_D void store4(float* __restrict__ p, int64_t e, int64_t n, bool vec, const float (&v)[4]) {
  if (vec) {
    float4 q;
    q.x = v[0];
    q.y = v[1];
    q.z = v[2];
    q.w = v[3];
    *reinterpret_cast<float4*>(p + e) = q;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (e + i < n) p[e + i] = v[i];
    }
  }
}

// Number of tiles of `tile` elements covering n elements.
HYPHA_HD int64_t num_tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// CTAs to launch for `tiles` tiles: one per tile (best balance for streaming kernels), capped at
// the grid limit; the kernels loop (grid-stride) over the rest.
HYPHA_HD unsigned grid_for(int64_t tiles) {
  const int64_t kMaxGrid = 0x7fffffff;
  return static_cast<unsigned>(tiles < kMaxGrid ? (tiles > 0 ? tiles : 1) : kMaxGrid);
}

}  // namespace cuda_detail
}  // namespace hypha
