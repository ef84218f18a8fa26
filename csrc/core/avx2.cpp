// The AVX2 path (Haswell / Zen 1 and later), 8 floats per vector.
//
// Same structure and isolation rules as avx512.cpp (read its header comment): AVX2 code only
// between the push_options/pop_options pragmas, internal linkage, headers included before.
// Quantize packs 32 codes per iteration; blocks are multiples of 16, so a 16-element step ends
// every full block and only the last block can leave a scalar tail (< 16 elements).
#include <cstdint>
#include <cstring>

#include "impl.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,bmi,bmi2,popcnt")

namespace hypha::cpu::impl {
namespace {

inline __m256i vhash32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

inline __m256i vabs_bits(__m256i bits) {
  return _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
}

inline __m256i loadi(const float* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

inline uint32_t hmax_epu32(__m256i m) {
  __m128i v = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  v = _mm_max_epu32(v, _mm_shuffle_epi32(v, 0x4E));
  v = _mm_max_epu32(v, _mm_shuffle_epi32(v, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(v));
}

// Bits of max |x[0..len)|; see absmax_bits_scalar.
uint32_t absmax_bits(const float* x, int64_t len) {
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    m0 = _mm256_max_epu32(m0, vabs_bits(loadi(x + j)));
    m1 = _mm256_max_epu32(m1, vabs_bits(loadi(x + j + 8)));
    m2 = _mm256_max_epu32(m2, vabs_bits(loadi(x + j + 16)));
    m3 = _mm256_max_epu32(m3, vabs_bits(loadi(x + j + 24)));
  }
  for (; j + 8 <= len; j += 8) m0 = _mm256_max_epu32(m0, vabs_bits(loadi(x + j)));
  m0 = _mm256_max_epu32(_mm256_max_epu32(m0, m1), _mm256_max_epu32(m2, m3));
  const uint32_t r = hmax_epu32(m0);
  const uint32_t t = absmax_bits_scalar(x + j, len - j);
  return r > t ? r : t;
}

// Quantizes 8 floats at a time; holds the block's constants and the running stream index.
template <int BITS, bool STOCH>
struct Quantizer {
  __m256 inv, scale, off, mid, levels;
  __m256i idx, key;

  Quantizer(float scale_, float inv_, uint32_t idx0, uint32_t key_)
      : inv(_mm256_set1_ps(inv_)),
        scale(_mm256_set1_ps(scale_)),
        off(_mm256_set1_ps(Q<BITS>::kRtnOff)),
        mid(_mm256_set1_ps(Q<BITS>::kMid)),
        levels(_mm256_set1_ps(Q<BITS>::kL)),
        idx(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(idx0)),
                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))),
        key(_mm256_set1_epi32(static_cast<int>(key_))) {}

  __m256i operator()(__m256 x) {
    __m256 t = _mm256_mul_ps(x, inv);
    if constexpr (STOCH) {
      const __m256i h = vhash32(_mm256_xor_si256(idx, key));
      idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
      const __m256 u =
          _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(0x1p-24f));
      t = _mm256_add_ps(t, _mm256_add_ps(mid, u));
    } else {
      t = _mm256_add_ps(t, off);
    }
    t = _mm256_max_ps(t, _mm256_setzero_ps());  // maxps returns the 2nd operand for NaN: NaN -> 0
    t = _mm256_min_ps(t, levels);
    return _mm256_cvttps_epi32(t);  // t in [0, L]: truncation == floor
  }

  __m256 dequant(__m256i c) const {
    return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), mid), scale);
  }
};

// 16 codes, one per byte, in element order -> 16*BITS/8 packed bytes at dst.
template <int BITS>
inline void store_bytes16(uint8_t* dst, __m128i b) {
  if constexpr (BITS == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), b);
  } else if constexpr (BITS == 4) {
    const __m128i w = _mm_maddubs_epi16(b, _mm_set1_epi16(0x1001));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(w, w));
  } else {
    const __m128i w = _mm_maddubs_epi16(b, _mm_set1_epi16(0x0401));
    __m128i d = _mm_madd_epi16(w, _mm_set1_epi32(0x00100001));
    d = _mm_packus_epi16(_mm_packus_epi32(d, d), d);
    const uint32_t v = static_cast<uint32_t>(_mm_cvtsi128_si32(d));
    std::memcpy(dst, &v, 4);
  }
}

// Packs 32 codes (4 x 8 int32 lanes, in element order) to 32*BITS/8 bytes at dst.
template <int BITS>
inline void store_codes32(uint8_t* dst, __m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  // packus works inside 128-bit lanes: lane L of b0 holds 4 codes of each input's half L.
  const __m256i b0 =
      _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
  const __m256i b = _mm256_permutevar8x32_epi32(b0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if constexpr (BITS == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), b);
  } else if constexpr (BITS == 4) {
    const __m256i w = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x1001));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                     _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
  } else {
    const __m256i w = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x0401));
    const __m256i d = _mm256_madd_epi16(w, _mm256_set1_epi32(0x00100001));
    __m128i r = _mm_packus_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
    r = _mm_packus_epi16(r, r);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), r);
  }
}

// Packs 16 codes (2 x 8 int32 lanes) to 16*BITS/8 bytes at dst.
template <int BITS>
inline void store_codes16(uint8_t* dst, __m256i c0, __m256i c1) {
  // lane 0: c0[0..3], c1[0..3]; lane 1: c0[4..7], c1[4..7]  ->  qwords reordered 0, 2, 1, 3.
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(c0, c1), 0xD8);
  store_bytes16<BITS>(dst, _mm_packus_epi16(_mm256_castsi256_si128(w),
                                            _mm256_extracti128_si256(w, 1)));
}

// Unpacks the 16 codes at src (16*BITS/8 bytes) to two vectors of int32 lanes.
template <int BITS>
inline void load_codes16(const uint8_t* src, __m256i& c0, __m256i& c1) {
  if constexpr (BITS == 8) {
    c0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
    c1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8)));
  } else {
    __m128i b;
    __m256i shifts;
    if constexpr (BITS == 4) {
      b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
      b = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
      shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    } else {
      uint32_t v;
      std::memcpy(&v, src, 4);
      b = _mm_cvtsi32_si128(static_cast<int>(v));
      b = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
      shifts = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    }
    const __m256i mask = _mm256_set1_epi32(Q<BITS>::kLevels);
    c0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), shifts), mask);
    c1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), shifts),
                          mask);
  }
}

// Quantizes one block x[0..len) whose absmax gave (scale, inv); with EF, ef = x - dequant.
template <int BITS, bool STOCH, bool EF>
inline void quant_block(const float* x, int64_t len, float scale, float inv, uint32_t idx0,
                        uint32_t key, uint8_t* codes, float* ef) {
  Quantizer<BITS, STOCH> q(scale, inv, idx0, key);
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    const __m256 x0 = _mm256_loadu_ps(x + j);
    const __m256 x1 = _mm256_loadu_ps(x + j + 8);
    const __m256 x2 = _mm256_loadu_ps(x + j + 16);
    const __m256 x3 = _mm256_loadu_ps(x + j + 24);
    const __m256i c0 = q(x0);
    const __m256i c1 = q(x1);
    const __m256i c2 = q(x2);
    const __m256i c3 = q(x3);
    if constexpr (EF) {
      _mm256_storeu_ps(ef + j, _mm256_sub_ps(x0, q.dequant(c0)));
      _mm256_storeu_ps(ef + j + 8, _mm256_sub_ps(x1, q.dequant(c1)));
      _mm256_storeu_ps(ef + j + 16, _mm256_sub_ps(x2, q.dequant(c2)));
      _mm256_storeu_ps(ef + j + 24, _mm256_sub_ps(x3, q.dequant(c3)));
    }
    store_codes32<BITS>(codes + j * BITS / 8, c0, c1, c2, c3);
  }
  for (; j + 16 <= len; j += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + j);
    const __m256 x1 = _mm256_loadu_ps(x + j + 8);
    const __m256i c0 = q(x0);
    const __m256i c1 = q(x1);
    if constexpr (EF) {
      _mm256_storeu_ps(ef + j, _mm256_sub_ps(x0, q.dequant(c0)));
      _mm256_storeu_ps(ef + j + 8, _mm256_sub_ps(x1, q.dequant(c1)));
    }
    store_codes16<BITS>(codes + j * BITS / 8, c0, c1);
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

template <bool ACC>
inline void deq8(__m256i c, __m256 mid, __m256 scale, float* o) {
  __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), mid), scale);
  if constexpr (ACC) v = _mm256_add_ps(_mm256_loadu_ps(o), v);
  _mm256_storeu_ps(o, v);
}

template <int BITS, bool ACC>
void dequantize_range_t(const uint8_t* codes, const float* scales, int64_t n, int64_t bs,
                        float* out, int64_t b0, int64_t b1) {
  const __m256 mid = _mm256_set1_ps(Q<BITS>::kMid);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs;
    const int64_t len = min64(bs, n - start);
    const __m256 scale = _mm256_set1_ps(scales[b]);
    const uint8_t* c = codes + start * BITS / 8;
    float* o = out + start;
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
      __m256i c0, c1;
      load_codes16<BITS>(c + j * BITS / 8, c0, c1);
      deq8<ACC>(c0, mid, scale, o + j);
      deq8<ACC>(c1, mid, scale, o + j + 8);
    }
    if (j < len) deq_seg_scalar<BITS, ACC>(c + j * BITS / 8, len - j, scales[b], o + j);
  }
}

// delta = (g - l) + e for elements [j, j+8).
template <bool LOCAL, bool EF>
inline __m256 delta8(const float* g, const float* l, const float* e, int64_t j) {
  __m256 d = _mm256_loadu_ps(g + j);
  if constexpr (LOCAL) d = _mm256_sub_ps(d, _mm256_loadu_ps(l + j));
  if constexpr (EF) d = _mm256_add_ps(d, _mm256_loadu_ps(e + j));
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
    __m256i m0 = _mm256_setzero_si256(), m1 = m0;
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
      const __m256 d0 = delta8<LOCAL, EF>(gb, lb, eb, j);
      const __m256 d1 = delta8<LOCAL, EF>(gb, lb, eb, j + 8);
      _mm256_store_ps(buf + j, d0);
      _mm256_store_ps(buf + j + 8, d1);
      m0 = _mm256_max_epu32(m0, vabs_bits(_mm256_castps_si256(d0)));
      m1 = _mm256_max_epu32(m1, vabs_bits(_mm256_castps_si256(d1)));
    }
    for (; j < len; ++j) buf[j] = delta1<LOCAL, EF>(gb, lb, eb, j);
    uint32_t am = hmax_epu32(_mm256_max_epu32(m0, m1));
    const int64_t jt = len & ~int64_t{15};
    const uint32_t t = absmax_bits_scalar(buf + jt, len - jt);
    am = am > t ? am : t;
    const BlockScale s = block_scale<BITS>(am);
    scales[b] = s.scale;
    // Pass 2: quantize from the buffer; ef <- delta - dequant.
    quant_block<BITS, STOCH, EF>(buf, len, s.scale, s.inv, stream_index(p.offset, start), p.key,
                                 codes + start * BITS / 8, eb);
  }
}

#include "range_dispatch.inc"

inline void nesterov8(float* p, float* m, const float* g, __m256 lr, __m256 mu) {
  const __m256 gv = _mm256_loadu_ps(g);
  const __m256 mv = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(m), mu), gv);
  const __m256 d = _mm256_add_ps(gv, _mm256_mul_ps(mv, mu));
  _mm256_storeu_ps(m, mv);
  _mm256_storeu_ps(p, _mm256_sub_ps(_mm256_loadu_ps(p), _mm256_mul_ps(d, lr)));
}

void nesterov_range(float* param, float* momentum, const float* grad, int64_t i0, int64_t i1,
                    float lr, float mu) {
  const __m256 vlr = _mm256_set1_ps(lr);
  const __m256 vmu = _mm256_set1_ps(mu);
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    nesterov8(param + i, momentum + i, grad + i, vlr, vmu);
    nesterov8(param + i + 8, momentum + i + 8, grad + i + 8, vlr, vmu);
  }
  for (; i + 8 <= i1; i += 8) nesterov8(param + i, momentum + i, grad + i, vlr, vmu);
  for (; i < i1; ++i) nesterov1(param, momentum, grad, i, lr, mu);
}

}  // namespace
}  // namespace hypha::cpu::impl

#pragma GCC pop_options

namespace hypha::cpu::impl {
const KernelTable* avx2_table() {
  static const KernelTable t{"avx2", quantize_range, dequantize_range, encode_delta_range,
                             nesterov_range};
  return &t;
}
}  // namespace hypha::cpu::impl

#else  // not x86

namespace hypha::cpu::impl {
const KernelTable* avx2_table() { return nullptr; }
}  // namespace hypha::cpu::impl

#endif
