// The portable path: plain C++ built for the baseline target (SSE2 on x86-64), written as simple
// loops the compiler can auto-vectorise. It is the fallback on CPUs without AVX2 and the
// yardstick the SIMD paths are tested against.
#include <cstdint>

#include "impl.h"

namespace hypha::cpu::impl {
namespace {

// Codes of x[0..len) as int32 (stage 1 of a block), narrowed to one byte each (stage 2), then
// packed (stage 3): simple loops the compiler vectorises well, where the fused per-byte loop of
// quant_seg_scalar would not (an int32 stage first is ~2x faster with SSE2 than converting
// straight to bytes).
template <int BITS, bool STOCH, bool EF>
void quant_block_generic(const float* x, int64_t len, float scale, float inv, uint32_t idx0,
                         uint32_t key, uint8_t* codes, float* ef) {
  alignas(64) int32_t c32[kMaxBlockSize];
  alignas(64) uint8_t c8[kMaxBlockSize];
  for (int64_t j = 0; j < len; ++j) {
    c32[j] = static_cast<int32_t>(
        quant1<BITS, STOCH>(x[j], inv, idx0 + static_cast<uint32_t>(j), key));
  }
  if constexpr (EF) {
    for (int64_t j = 0; j < len; ++j) {
      ef[j] = x[j] - dequant1<BITS>(static_cast<uint32_t>(c32[j]), scale);
    }
  }
  constexpr int per = Q<BITS>::kPer;
  if constexpr (per == 1) {
    for (int64_t j = 0; j < len; ++j) codes[j] = static_cast<uint8_t>(c32[j]);
  } else {
    for (int64_t j = 0; j < len; ++j) c8[j] = static_cast<uint8_t>(c32[j]);
    const int64_t full = len / per;
    for (int64_t b = 0; b < full; ++b) {
      uint32_t byte = 0;
      for (int k = 0; k < per; ++k) byte |= static_cast<uint32_t>(c8[b * per + k]) << (k * BITS);
      codes[b] = static_cast<uint8_t>(byte);
    }
    if (full * per < len) {
      uint32_t byte = 0;
      for (int64_t k = 0; full * per + k < len; ++k) {
        byte |= static_cast<uint32_t>(c8[full * per + k]) << (k * BITS);
      }
      codes[full] = static_cast<uint8_t>(byte);
    }
  }
}

template <int BITS, bool STOCH>
void quantize_range_t(const float* x, int64_t n, const QuantParams& p, uint8_t* codes,
                      float* scales, int64_t b0, int64_t b1) {
  const int64_t bs = p.block_size;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs;
    const int64_t len = min64(bs, n - start);
    const BlockScale s = block_scale<BITS>(absmax_bits_scalar(x + start, len));
    scales[b] = s.scale;
    quant_block_generic<BITS, STOCH, false>(x + start, len, s.scale, s.inv,
                                            stream_index(p.offset, start), p.key,
                                            codes + start * BITS / 8, nullptr);
  }
}

template <int BITS, bool ACC>
void dequantize_range_t(const uint8_t* codes, const float* scales, int64_t n, int64_t bs,
                        float* out, int64_t b0, int64_t b1) {
  constexpr int per = Q<BITS>::kPer;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs;
    const int64_t len = min64(bs, n - start);
    const float scale = scales[b];
    const uint8_t* c = codes + start * BITS / 8;
    float* o = out + start;
    if constexpr (per == 1) {
      for (int64_t j = 0; j < len; ++j) {
        const float v = dequant1<BITS>(c[j], scale);
        if constexpr (ACC) {
          o[j] = o[j] + v;
        } else {
          o[j] = v;
        }
      }
    } else {
      deq_seg_scalar<BITS, ACC>(c, len, scale, o);
    }
  }
}

template <int BITS, bool STOCH, bool LOCAL, bool EF>
void encode_delta_range_t(const float* g, const float* l, float* e, int64_t n,
                          const QuantParams& p, uint8_t* codes, float* scales, int64_t b0,
                          int64_t b1) {
  alignas(64) float buf[kMaxBlockSize];
  const int64_t bs = p.block_size;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs;
    const int64_t len = min64(bs, n - start);
    for (int64_t j = 0; j < len; ++j) buf[j] = delta1<LOCAL, EF>(g + start, l + start, e + start, j);
    const BlockScale s = block_scale<BITS>(absmax_bits_scalar(buf, len));
    scales[b] = s.scale;
    quant_block_generic<BITS, STOCH, EF>(buf, len, s.scale, s.inv, stream_index(p.offset, start),
                                         p.key, codes + start * BITS / 8,
                                         EF ? e + start : nullptr);
  }
}

#include "range_dispatch.inc"

void nesterov_range(float* __restrict param, float* __restrict momentum,
                    const float* __restrict grad, int64_t i0, int64_t i1, float lr, float mu) {
  for (int64_t i = i0; i < i1; ++i) nesterov1(param, momentum, grad, i, lr, mu);
}

}  // namespace

const KernelTable* generic_table() {
#if defined(__x86_64__) || defined(_M_X64)
  static const KernelTable t{"sse2", quantize_range, dequantize_range, encode_delta_range,
                             nesterov_range};
#else
  static const KernelTable t{"generic", quantize_range, dequantize_range, encode_delta_range,
                             nesterov_range};
#endif
  return &t;
}

}  // namespace hypha::cpu::impl
