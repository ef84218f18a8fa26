// The AVX-512 path (F + BW + VL + DQ: Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4 and later).
//
// Compiled for the baseline target like every other file; only the code between the
// push_options/pop_options pragmas below uses AVX-512, and it is reached only through
// avx512_table() after dispatch.cpp checked the CPU. Everything in that region has internal
// linkage, and all headers are included before it, so no AVX-512 code can be merged into (and
// leak through) an inline function shared with the other paths.
//
// Per block of a quantize: one pass computes absmax (integer max of the sign-cleared bits, which
// propagates NaN) while pulling the block into L1, the second pass quantizes 64 elements per
// iteration from L1 and packs the codes with pack/shuffle instructions. Every floating-point step
// is one IEEE instruction in the reference's order (the build uses -ffp-contract=off, so no FMA
// is formed). Tails shorter than 16 elements (only in the last block) use the scalar helpers.
#include <cstdint>
#include <cstring>

#include "impl.h"

#if defined(__x86_64__) || defined(__i386__)
// GCC 12 warns spuriously about the _mm512_undefined_* placeholders inside its own AVX-512
// intrinsics when they are inlined (GCC bug 105593, fixed in 12.3/13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi,bmi2,popcnt")

namespace hypha::cpu::impl {
namespace {

inline __m512i vhash32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

inline __m512i vabs_bits(__m512i bits) {
  return _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
}

inline __mmask16 tail_mask(int64_t r) { return static_cast<__mmask16>((1u << r) - 1u); }

// Bits of max |x[0..len)|; see absmax_bits_scalar.
uint32_t absmax_bits(const float* x, int64_t len) {
  __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 64 <= len; j += 64) {
    m0 = _mm512_max_epu32(m0, vabs_bits(_mm512_loadu_si512(x + j)));
    m1 = _mm512_max_epu32(m1, vabs_bits(_mm512_loadu_si512(x + j + 16)));
    m2 = _mm512_max_epu32(m2, vabs_bits(_mm512_loadu_si512(x + j + 32)));
    m3 = _mm512_max_epu32(m3, vabs_bits(_mm512_loadu_si512(x + j + 48)));
  }
  for (; j + 16 <= len; j += 16) m0 = _mm512_max_epu32(m0, vabs_bits(_mm512_loadu_si512(x + j)));
  if (j < len) {
    m1 = _mm512_max_epu32(m1, vabs_bits(_mm512_maskz_loadu_epi32(tail_mask(len - j), x + j)));
  }
  m0 = _mm512_max_epu32(_mm512_max_epu32(m0, m1), _mm512_max_epu32(m2, m3));
  return _mm512_reduce_max_epu32(m0);
}

// Quantizes 16 floats at a time; holds the block's constants and the running stream index.
template <int BITS, bool STOCH>
struct Quantizer {
  __m512 inv, scale, off, mid, levels;
  __m512i idx, key;

  Quantizer(float scale_, float inv_, uint32_t idx0, uint32_t key_)
      : inv(_mm512_set1_ps(inv_)),
        scale(_mm512_set1_ps(scale_)),
        off(_mm512_set1_ps(Q<BITS>::kRtnOff)),
        mid(_mm512_set1_ps(Q<BITS>::kMid)),
        levels(_mm512_set1_ps(Q<BITS>::kL)),
        idx(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(idx0)),
                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                               15))),
        key(_mm512_set1_epi32(static_cast<int>(key_))) {}

  // Codes (as int32 lanes) of the next 16 elements of the stream.
  __m512i operator()(__m512 x) {
    __m512 t = _mm512_mul_ps(x, inv);
    if constexpr (STOCH) {
      const __m512i h = vhash32(_mm512_xor_si512(idx, key));
      idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
      const __m512 u =
          _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), _mm512_set1_ps(0x1p-24f));
      t = _mm512_add_ps(t, _mm512_add_ps(mid, u));
    } else {
      t = _mm512_add_ps(t, off);
    }
    t = _mm512_max_ps(t, _mm512_setzero_ps());  // maxps returns the 2nd operand for NaN: NaN -> 0
    t = _mm512_min_ps(t, levels);
    return _mm512_cvttps_epi32(t);  // t in [0, L]: truncation == floor
  }

  __m512 dequant(__m512i c) const {
    return _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), mid), scale);
  }
};

// Packs 64 codes (4 x 16 int32 lanes, in element order) to 64*BITS/8 bytes at dst.
template <int BITS>
inline void store_codes64(uint8_t* dst, __m512i c0, __m512i c1, __m512i c2, __m512i c3) {
  // packus works inside 128-bit lanes: lane L of b holds 4 codes of each input's group L.
  const __m512i b0 =
      _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
  const __m512i b = _mm512_permutexvar_epi32(
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), b0);
  if constexpr (BITS == 8) {
    _mm512_storeu_si512(dst, b);
  } else if constexpr (BITS == 4) {  // byte k = c[2k] + 16 c[2k+1]
    const __m512i w = _mm512_maddubs_epi16(b, _mm512_set1_epi16(0x1001));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi16_epi8(w));
  } else {  // byte k = c[4k] + 4 c[4k+1] + 16 c[4k+2] + 64 c[4k+3]
    const __m512i w = _mm512_maddubs_epi16(b, _mm512_set1_epi16(0x0401));
    const __m512i d = _mm512_madd_epi16(w, _mm512_set1_epi32(0x00100001));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(d));
  }
}

// Packs 16 codes to 16*BITS/8 bytes at dst.
template <int BITS>
inline void store_codes16(uint8_t* dst, __m512i c) {
  const __m128i b = _mm512_cvtepi32_epi8(c);
  if constexpr (BITS == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), b);
  } else if constexpr (BITS == 4) {
    const __m128i w = _mm_maddubs_epi16(b, _mm_set1_epi16(0x1001));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(w, w));
  } else {
    const __m128i w = _mm_maddubs_epi16(b, _mm_set1_epi16(0x0401));
    const uint32_t v = static_cast<uint32_t>(
        _mm_cvtsi128_si32(_mm_cvtepi32_epi8(_mm_madd_epi16(w, _mm_set1_epi32(0x00100001)))));
    std::memcpy(dst, &v, 4);
  }
}

// Unpacks the 16 codes at src (16*BITS/8 bytes) to int32 lanes.
template <int BITS>
inline __m512i load_codes16(const uint8_t* src) {
  if constexpr (BITS == 8) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  } else if constexpr (BITS == 4) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
    b = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
    const __m512i c = _mm512_srlv_epi32(
        _mm512_cvtepu8_epi32(b),
        _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4));
    return _mm512_and_si512(c, _mm512_set1_epi32(15));
  } else {
    uint32_t v;
    std::memcpy(&v, src, 4);
    __m128i b = _mm_cvtsi32_si128(static_cast<int>(v));
    b = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    const __m512i c = _mm512_srlv_epi32(
        _mm512_cvtepu8_epi32(b),
        _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6));
    return _mm512_and_si512(c, _mm512_set1_epi32(3));
  }
}

// Quantizes one block x[0..len) whose absmax gave (scale, inv); with EF, ef = x - dequant.
template <int BITS, bool STOCH, bool EF>
inline void quant_block(const float* x, int64_t len, float scale, float inv, uint32_t idx0,
                        uint32_t key, uint8_t* codes, float* ef) {
  Quantizer<BITS, STOCH> q(scale, inv, idx0, key);
  int64_t j = 0;
  for (; j + 64 <= len; j += 64) {
    const __m512 x0 = _mm512_loadu_ps(x + j);
    const __m512 x1 = _mm512_loadu_ps(x + j + 16);
    const __m512 x2 = _mm512_loadu_ps(x + j + 32);
    const __m512 x3 = _mm512_loadu_ps(x + j + 48);
    const __m512i c0 = q(x0);
    const __m512i c1 = q(x1);
    const __m512i c2 = q(x2);
    const __m512i c3 = q(x3);
    if constexpr (EF) {
      _mm512_storeu_ps(ef + j, _mm512_sub_ps(x0, q.dequant(c0)));
      _mm512_storeu_ps(ef + j + 16, _mm512_sub_ps(x1, q.dequant(c1)));
      _mm512_storeu_ps(ef + j + 32, _mm512_sub_ps(x2, q.dequant(c2)));
      _mm512_storeu_ps(ef + j + 48, _mm512_sub_ps(x3, q.dequant(c3)));
    }
    store_codes64<BITS>(codes + j * BITS / 8, c0, c1, c2, c3);
  }
  for (; j + 16 <= len; j += 16) {
    const __m512 x0 = _mm512_loadu_ps(x + j);
    const __m512i c0 = q(x0);
    if constexpr (EF) _mm512_storeu_ps(ef + j, _mm512_sub_ps(x0, q.dequant(c0)));
    store_codes16<BITS>(codes + j * BITS / 8, c0);
  }
  if (j < len) {
    quant_seg_scalar<BITS, STOCH, EF>(x + j, len - j, scale, inv, idx0 + static_cast<uint32_t>(j),
                                      key, codes + j * BITS / 8, EF ? ef + j : nullptr);
  }
}

// NOTE: the block loops below mirror generic.cpp on purpose: each ISA file is compiled under
// its own `#pragma GCC target`, and a loop shared through a header would inline the helpers of
// whichever target instantiated it first. Duplicated loops keep every path fully inlined.
template <int BITS, bool STOCH>
void quantize_range_t(const float* x, int64_t n, const QuantParams& p, uint8_t* codes,
                      float* scales, int64_t b0, int64_t b1) {
  const int64_t bs = p.block_size;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs;
    const int64_t len = min64(bs, n - start);
    const BlockScale s = block_scale<BITS>(absmax_bits(x + start, len));
    scales[b] = s.scale;
    quant_block<BITS, STOCH, false>(x + start, len, s.scale, s.inv,
                                    stream_index(p.offset, start), p.key,
                                    codes + start * BITS / 8, nullptr);
  }
}

template <int BITS, bool ACC>
inline void deq16(const uint8_t* c, __m512 mid, __m512 scale, float* o) {
  __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(load_codes16<BITS>(c)), mid), scale);
  if constexpr (ACC) v = _mm512_add_ps(_mm512_loadu_ps(o), v);
  _mm512_storeu_ps(o, v);
}

template <int BITS, bool ACC>
void dequantize_range_t(const uint8_t* codes, const float* scales, int64_t n, int64_t bs,
                        float* out, int64_t b0, int64_t b1) {
  const __m512 mid = _mm512_set1_ps(Q<BITS>::kMid);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs;
    const int64_t len = min64(bs, n - start);
    const __m512 scale = _mm512_set1_ps(scales[b]);
    const uint8_t* c = codes + start * BITS / 8;
    float* o = out + start;
    int64_t j = 0;
    for (; j + 64 <= len; j += 64) {
      deq16<BITS, ACC>(c + j * BITS / 8, mid, scale, o + j);
      deq16<BITS, ACC>(c + (j + 16) * BITS / 8, mid, scale, o + j + 16);
      deq16<BITS, ACC>(c + (j + 32) * BITS / 8, mid, scale, o + j + 32);
      deq16<BITS, ACC>(c + (j + 48) * BITS / 8, mid, scale, o + j + 48);
    }
    for (; j + 16 <= len; j += 16) deq16<BITS, ACC>(c + j * BITS / 8, mid, scale, o + j);
    if (j < len) deq_seg_scalar<BITS, ACC>(c + j * BITS / 8, len - j, scales[b], o + j);
  }
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }

// delta = (g - l) + e for elements [j, j+16) (masked: lanes outside k are 0).
template <bool LOCAL, bool EF, class... Mask>
inline __m512 delta16(const float* g, const float* l, const float* e, int64_t j, Mask... k) {
  __m512 d = load16(g + j, k...);
  if constexpr (LOCAL) d = _mm512_sub_ps(d, load16(l + j, k...));
  if constexpr (EF) d = _mm512_add_ps(d, load16(e + j, k...));
  return d;
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
    const float* gb = g + start;
    const float* lb = LOCAL ? l + start : l;
    float* eb = EF ? e + start : e;
    // Pass 1: delta into the L1-resident buffer, and its absmax.
    __m512i m0 = _mm512_setzero_si512(), m1 = m0;
    int64_t j = 0;
    for (; j + 32 <= len; j += 32) {
      const __m512 d0 = delta16<LOCAL, EF>(gb, lb, eb, j);
      const __m512 d1 = delta16<LOCAL, EF>(gb, lb, eb, j + 16);
      _mm512_store_ps(buf + j, d0);
      _mm512_store_ps(buf + j + 16, d1);
      m0 = _mm512_max_epu32(m0, vabs_bits(_mm512_castps_si512(d0)));
      m1 = _mm512_max_epu32(m1, vabs_bits(_mm512_castps_si512(d1)));
    }
    for (; j + 16 <= len; j += 16) {
      const __m512 d0 = delta16<LOCAL, EF>(gb, lb, eb, j);
      _mm512_store_ps(buf + j, d0);
      m0 = _mm512_max_epu32(m0, vabs_bits(_mm512_castps_si512(d0)));
    }
    if (j < len) {  // masked tail: the lanes past len load 0 and do not move the max
      const __m512 d0 = delta16<LOCAL, EF>(gb, lb, eb, j, tail_mask(len - j));
      _mm512_store_ps(buf + j, d0);
      m1 = _mm512_max_epu32(m1, vabs_bits(_mm512_castps_si512(d0)));
    }
    const BlockScale s =
        block_scale<BITS>(_mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1)));
    scales[b] = s.scale;
    // Pass 2: quantize from the buffer; ef <- delta - dequant.
    quant_block<BITS, STOCH, EF>(buf, len, s.scale, s.inv, stream_index(p.offset, start), p.key,
                                 codes + start * BITS / 8, eb);
  }
}

#include "range_dispatch.inc"

template <class... Mask>
inline void nesterov16(float* p, float* m, const float* g, __m512 lr, __m512 mu, Mask... k) {
  const __m512 gv = load16(g, k...);
  const __m512 mv = _mm512_add_ps(_mm512_mul_ps(load16(m, k...), mu), gv);
  const __m512 d = _mm512_add_ps(gv, _mm512_mul_ps(mv, mu));
  const __m512 pv = _mm512_sub_ps(load16(p, k...), _mm512_mul_ps(d, lr));
  if constexpr (sizeof...(k) == 0) {
    _mm512_storeu_ps(m, mv);
    _mm512_storeu_ps(p, pv);
  } else {
    _mm512_mask_storeu_ps(m, k..., mv);
    _mm512_mask_storeu_ps(p, k..., pv);
  }
}

void nesterov_range(float* param, float* momentum, const float* grad, int64_t i0, int64_t i1,
                    float lr, float mu) {
  const __m512 vlr = _mm512_set1_ps(lr);
  const __m512 vmu = _mm512_set1_ps(mu);
  int64_t i = i0;
  for (; i + 32 <= i1; i += 32) {
    nesterov16(param + i, momentum + i, grad + i, vlr, vmu);
    nesterov16(param + i + 16, momentum + i + 16, grad + i + 16, vlr, vmu);
  }
  for (; i + 16 <= i1; i += 16) nesterov16(param + i, momentum + i, grad + i, vlr, vmu);
  if (i < i1) nesterov16(param + i, momentum + i, grad + i, vlr, vmu, tail_mask(i1 - i));
}

}  // namespace
}  // namespace hypha::cpu::impl

#pragma GCC pop_options

namespace hypha::cpu::impl {
const KernelTable* avx512_table() {
  static const KernelTable t{"avx512", quantize_range, dequantize_range, encode_delta_range,
                             nesterov_range};
  return &t;
}
}  // namespace hypha::cpu::impl

#else  // not x86

namespace hypha::cpu::impl {
const KernelTable* avx512_table() { return nullptr; }
}  // namespace hypha::cpu::impl

#endif
