// Private: the Hypha CUDA kernels as templates. csrc/cuda/*.cu instantiate and launch them.
//
// All kernels are memory-bound streaming kernels built from 4-element units (one float4, see
// common.cuh), 256 threads per CTA, one tile of units per CTA and a grid-stride loop over tiles
// (the loop runs once per CTA unless the tile count exceeds the grid limit). Each thread first
// issues every load of its tile, then computes and stores, so several 16-byte loads per thread
// are in flight.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace hypha {
namespace cuda_detail {

// --- quantize / encode_delta --------------------------------------------------------------------
//
// Thread mapping for quantization block size B (elements):
//   * a *group* of TPB consecutive threads owns one quantization block; a thread owns IPB units of
//     that block: unit j (0 <= j < IPB) of lane r (0 <= r < TPB) holds elements
//     [(j*TPB + r)*4, (j*TPB + r)*4 + 4) of the block, so each warp-wide access is contiguous;
//   * a CTA has kThreads/TPB groups; each thread handles REPS blocks per tile (rep q of group g is
//     block q*GROUPS + g of the tile), so a thread always has REPS*IPB (2 or 4) float4 loads
//     (x3 for encode_delta with local and ef) in flight;
//   * absmax: a thread reduces its units, then the group reduces with __shfl_xor_sync over
//     min(TPB, 32) lanes (groups are aligned within a warp, so xor partners stay in the group);
//     when TPB > 32 (B >= 1024) the per-warp maxima go through shared memory.
//
//     B      TPB  IPB  REPS  blocks/tile  elements/tile
//     16       4    1     2          128           2048
//     32       8    1     2           64           2048
//     64      16    1     2           32           2048
//     128     32    1     2           16           2048
//     256     32    2     1            8           2048
//     512     32    4     1            8           4096
//     1024    64    4     1            4           4096
//     2048   128    4     1            2           4096
//     4096   256    4     1            1           4096
template <int B>
struct QCfg {
  static_assert(B >= 16 && B <= 4096 && (B & (B - 1)) == 0,
                "block size: power of two in [16, 4096]");
  static constexpr int TPB = B <= 128 ? B / 4 : (B <= 512 ? 32 : B / 16);
  static constexpr int IPB = B / (4 * TPB);
  static constexpr int REPS = IPB == 1 ? 2 : 1;
  static constexpr int GROUPS = kThreads / TPB;
  static constexpr int BLOCKS_PER_TILE = REPS * GROUPS;
  static constexpr int64_t TILE = static_cast<int64_t>(BLOCKS_PER_TILE) * B;
  static constexpr int RED = TPB < 32 ? TPB : 32;  // lanes reduced with shuffles
  static constexpr int WARPS_PER_GROUP = TPB > 32 ? TPB / 32 : 1;
  static_assert(IPB * TPB * 4 == B, "mapping must cover the block");
  static_assert(TPB <= kThreads && kThreads % TPB == 0, "groups must tile the CTA");
  static_assert(TPB <= 32 || REPS == 1, "cross-warp groups handle one block per tile");
};

// Alignment flags passed to the quantize / encode kernel (all warp-uniform).
enum : int {
  kAlignFloats = 1,  // every float pointer is 16-byte aligned: whole units use float4
  kAlignCodes = 2,   // codes is aligned to the unit's code word (4 / 2 / 1 bytes)
};

// delta = (g - l) + ef over n elements (l, ef optional at compile time), then blockwise
// quantization of delta to codes/scales, then ef <- delta - dequant when HAS_EF. With neither
// local nor ef this is plain quantize(g).
template <int BITS, int B, bool HAS_LOCAL, bool HAS_EF>
__global__ void __launch_bounds__(kThreads)
    encode_kernel(const float* __restrict__ g, const float* __restrict__ l, float* __restrict__ ef,
                  int64_t n, uint8_t* __restrict__ codes, float* __restrict__ scales,
                  int stochastic, uint32_t key, uint32_t offset32, int align) {
  using C = QCfg<B>;
  using Q = QBits<BITS>;
  constexpr float kMid = Q::kMid;

  // Per-warp maxima for groups spanning several warps, double-buffered by tile parity so one
  // __syncthreads per tile suffices.
  __shared__ uint32_t red[2][kWarps];

  const int tid = static_cast<int>(threadIdx.x);
  const int r = tid % C::TPB;    // lane within the group
  const int grp = tid / C::TPB;  // group within the CTA
  const bool vec_f = (align & kAlignFloats) != 0;
  const bool vec_c = (align & kAlignCodes) != 0;
  const int64_t nblocks = (n + B - 1) / B;
  const int64_t ntiles = num_tiles(n, C::TILE);
  int parity = 0;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    // ---- load: v = delta for every unit this thread owns (0 past n) ----
    float v[C::REPS][C::IPB][4];
#pragma unroll
    for (int q = 0; q < C::REPS; ++q) {
      const int64_t blk = tile * C::BLOCKS_PER_TILE + q * C::GROUPS + grp;
#pragma unroll
      for (int j = 0; j < C::IPB; ++j) {
        const int64_t e = blk * B + (j * C::TPB + r) * 4;
        const bool vec = vec_f && e + 4 <= n;
        load4(g, e, n, vec, v[q][j]);
        if constexpr (HAS_LOCAL) {
          float lv[4];
          load4(l, e, n, vec, lv);
#pragma unroll
          for (int i = 0; i < 4; ++i) v[q][j][i] = f_sub(v[q][j][i], lv[i]);
        }
        if constexpr (HAS_EF) {
          float ev[4];
          load4(ef, e, n, vec, ev);
#pragma unroll
          for (int i = 0; i < 4; ++i) v[q][j][i] = f_add(v[q][j][i], ev[i]);
        }
      }
    }

    // ---- absmax per block (bit patterns of |delta|; padding is +0 and contributes nothing) ----
    uint32_t am[C::REPS];
#pragma unroll
    for (int q = 0; q < C::REPS; ++q) {
      uint32_t m = 0;
#pragma unroll
      for (int j = 0; j < C::IPB; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) m = u_max(m, abs_bits(v[q][j][i]));
      }
#pragma unroll
      for (int s = C::RED / 2; s > 0; s >>= 1) m = u_max(m, __shfl_xor_sync(0xffffffffu, m, s));
      am[q] = m;
    }
    if constexpr (C::WARPS_PER_GROUP > 1) {
      // Groups span whole warps here and REPS == 1.
      if ((tid & 31) == 0) red[parity][tid >> 5] = am[0];
      __syncthreads();
      uint32_t m = 0;
#pragma unroll
      for (int w = 0; w < C::WARPS_PER_GROUP; ++w) {
        m = u_max(m, red[parity][grp * C::WARPS_PER_GROUP + w]);
      }
      am[0] = m;
      parity ^= 1;
    }

    // ---- codes, scales and error feedback ----
#pragma unroll
    for (int q = 0; q < C::REPS; ++q) {
      const int64_t blk = tile * C::BLOCKS_PER_TILE + q * C::GROUPS + grp;
      const float absmax = f_from_bits(am[q]);
      // NaN absmax is not < tiny: scale and inv become NaN, as in the reference.
      const bool tiny = absmax < kTinyAbsmax;
      const float scale = tiny ? 0.0f : f_div(absmax, kMid);
      const float inv = tiny ? 0.0f : f_div(kMid, absmax);
      if (r == 0 && blk < nblocks) scales[blk] = scale;
#pragma unroll
      for (int j = 0; j < C::IPB; ++j) {
        const int64_t e = blk * B + (j * C::TPB + r) * 4;
        if (e >= n) continue;
        uint32_t word = 0;
        float err[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float off;
          if (stochastic) {
            const uint32_t idx = offset32 + static_cast<uint32_t>(e + i);  // (offset + i) mod 2^32
            off = f_add(kMid, uniform01(idx, key));
          } else {
            off = Q::kRtnOff;
          }
          const float t = f_add(f_mul(v[q][j][i], inv), off);
          // floor, then clamp to [0, L]; NaN -> 0 (maxNum), +Inf -> L.
          const float c = f_min(f_max(f_floor(t), 0.0f), Q::kLevels);
          uint32_t code = static_cast<uint32_t>(c);
          if (e + i >= n) code = 0;  // padding bits of the last byte are zero
          word |= code << (i * BITS);
          if constexpr (HAS_EF) {
            const float dq = f_mul(f_sub(static_cast<float>(code), kMid), scale);
            err[i] = f_sub(v[q][j][i], dq);
          }
        }
        const bool full = e + 4 <= n;
        store_unit_codes<BITS>(codes, e, n, word, full && vec_c);
        if constexpr (HAS_EF) store4(ef, e, n, full && vec_f, err);
      }
    }
  }
}

// --- dequantize / dequantize_accumulate ---------------------------------------------------------
//
// Thread mapping: a tile is kThreads * 4 * DQ_UNITS elements; thread t owns units
// k*kThreads + t (k < DQ_UNITS) of the tile, i.e. whole code bytes (4 codes = 4/2/1 bytes) and
// the 4 floats they expand to (one float4 store, plus one float4 load of acc when accumulating).
constexpr int DQ_UNITS = 4;
constexpr int64_t DQ_TILE = static_cast<int64_t>(kThreads) * 4 * DQ_UNITS;

// Alignment flags for the dequantize kernel.
enum : int {
  kAlignOut = 1,     // out/acc is 16-byte aligned
  kAlignInCodes = 2, // codes is aligned to the unit's code word
};

template <int BITS, bool ACC>
__global__ void __launch_bounds__(kThreads)
    dequant_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales, int64_t n,
                   int log2_block, float* __restrict__ out, int align) {
  using Q = QBits<BITS>;
  const int tid = static_cast<int>(threadIdx.x);
  const bool vec_o = (align & kAlignOut) != 0;
  const bool vec_c = (align & kAlignInCodes) != 0;
  const int64_t ntiles = num_tiles(n, DQ_TILE);

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    uint32_t w[DQ_UNITS];
    float s[DQ_UNITS];
    float a[DQ_UNITS][4];
#pragma unroll
    for (int k = 0; k < DQ_UNITS; ++k) {
      const int64_t e = tile * DQ_TILE + static_cast<int64_t>(k * kThreads + tid) * 4;
      w[k] = 0;
      s[k] = 0.0f;
      if (e < n) {
        const bool full = e + 4 <= n;
        w[k] = load_unit_codes<BITS>(codes, e, n, full && vec_c);
        s[k] = scales[e >> log2_block];
        if constexpr (ACC) load4(out, e, n, full && vec_o, a[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < DQ_UNITS; ++k) {
      const int64_t e = tile * DQ_TILE + static_cast<int64_t>(k * kThreads + tid) * 4;
      if (e >= n) continue;
      float o[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t code = (w[k] >> (i * BITS)) & Q::kMask;
        const float d = f_mul(f_sub(static_cast<float>(code), Q::kMid), s[k]);
        if constexpr (ACC) {
          o[i] = f_add(a[k][i], d);
        } else {
          o[i] = d;
        }
      }
      store4(out, e, n, vec_o && e + 4 <= n, o);
    }
  }
}

// --- nesterov -----------------------------------------------------------------------------------
//
// Thread mapping as for dequantize: thread t owns units k*kThreads + t of a tile of
// kThreads * 4 * NV_UNITS elements.
constexpr int NV_UNITS = 2;
constexpr int64_t NV_TILE = static_cast<int64_t>(kThreads) * 4 * NV_UNITS;

// ALIGNED: param, mom and grad are all 16-byte aligned (whole units use float4). A template (rather
// than a plain __global__ function) so that this header can be included by several .cu files.
template <bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
    nesterov_kernel(float* __restrict__ param, float* __restrict__ mom,
                    const float* __restrict__ grad, int64_t n, float lr, float mu) {
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t ntiles = num_tiles(n, NV_TILE);
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    float p[NV_UNITS][4], m[NV_UNITS][4], gr[NV_UNITS][4];
#pragma unroll
    for (int k = 0; k < NV_UNITS; ++k) {
      const int64_t e = tile * NV_TILE + static_cast<int64_t>(k * kThreads + tid) * 4;
      if (e < n) {
        const bool vec = ALIGNED && e + 4 <= n;
        load4(param, e, n, vec, p[k]);
        load4(mom, e, n, vec, m[k]);
        load4(grad, e, n, vec, gr[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < NV_UNITS; ++k) {
      const int64_t e = tile * NV_TILE + static_cast<int64_t>(k * kThreads + tid) * 4;
      if (e >= n) continue;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // m <- m*mu + g;  d = g + m*mu;  p <- p - d*lr   (each step rounded separately)
        m[k][i] = f_add(f_mul(m[k][i], mu), gr[k][i]);
        const float d = f_add(gr[k][i], f_mul(m[k][i], mu));
        p[k][i] = f_sub(p[k][i], f_mul(d, lr));
      }
      const bool vec = ALIGNED && e + 4 <= n;
      store4(mom, e, n, vec, m[k]);
      store4(param, e, n, vec, p[k]);
    }
  }
}

}  // namespace cuda_detail
}  // namespace hypha
