// Hypha compression kernels: the torch-free core API.
//
// Every function works on raw pointers and element counts. The meaning of each op is defined by
// the pure-torch reference in hypha/ops/_reference.py and in docs/kernels.md; implementations
// reproduce it bit for bit (fp32, no fused multiply-add, fixed operation order).
//
// Callers (csrc/bindings.cpp) validate arguments; these functions assume:
//   * bits is 8, 4 or 2; block_size is a power of two in [16, 4096];
//   * codes has packed_nbytes(n, bits) bytes, scales has num_blocks(n, block_size) floats;
//   * buffers do not overlap, except where a parameter is documented as in/out.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hypha {

constexpr float kTinyAbsmax = 0x1p-120f;
constexpr int kMinBlockSize = 16;
constexpr int kMaxBlockSize = 4096;

inline int64_t packed_nbytes(int64_t n, int bits) { return (n * bits + 7) / 8; }
inline int64_t num_blocks(int64_t n, int64_t block_size) { return (n + block_size - 1) / block_size; }

// Quantization parameters shared by quantize and encode_delta.
struct QuantParams {
  int bits = 8;             // 8, 4 or 2
  int64_t block_size = 128; // elements per scale
  bool stochastic = false;  // stochastic rounding instead of round-to-nearest (ties up)
  uint32_t key = 0;         // seed_key(seed), computed once by the caller (see hash32 below)
  uint64_t offset = 0;      // index of element 0 in the random stream (chunked calls)
};

// The 'lowbias32' hash used by the stochastic-rounding stream.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Mixes a 64-bit user seed into the 32-bit stream key.
inline uint32_t seed_key(uint64_t seed) {
  return hash32(static_cast<uint32_t>(seed) ^ hash32(static_cast<uint32_t>(seed >> 32) ^ 0x9E3779B9u));
}

namespace cpu {

// codes/scales <- quantize(x[0..n)).
void quantize(const float* x, int64_t n, const QuantParams& p, uint8_t* codes, float* scales);

// out[0..n) <- (code - mid) * scale.
void dequantize(const uint8_t* codes, const float* scales, int64_t n, int bits, int64_t block_size,
                float* out);

// acc[0..n) <- acc + (code - mid) * scale.
void dequantize_accumulate(const uint8_t* codes, const float* scales, int64_t n, int bits,
                           int64_t block_size, float* acc);

// delta = (global - local) + ef  (local may be null: delta = global + ef; ef may be null: no ef);
// codes/scales <- quantize(delta); ef <- delta - dequant(codes) when ef is not null (in/out).
void encode_delta(const float* global, const float* local, float* ef, int64_t n,
                  const QuantParams& p, uint8_t* codes, float* scales);

// m <- mu*m + g; p <- p - lr*(g + mu*m)   (param and momentum in/out).
void nesterov(float* param, float* momentum, const float* grad, int64_t n, float lr, float mu);

// Which SIMD path the dispatcher picked at run time ("avx512", "avx2", "sse2", ...).
const char* simd_path();

}  // namespace cpu

#if defined(HYPHA_WITH_CUDA)
namespace cuda {

// Same contracts as hypha::cpu, on device pointers, enqueued on `stream` (a cudaStream_t).
// Each returns the launch status as an int (cudaError_t); 0 is success.
int quantize(const float* x, int64_t n, const QuantParams& p, uint8_t* codes, float* scales,
             void* stream);
int dequantize(const uint8_t* codes, const float* scales, int64_t n, int bits, int64_t block_size,
               float* out, void* stream);
int dequantize_accumulate(const uint8_t* codes, const float* scales, int64_t n, int bits,
                          int64_t block_size, float* acc, void* stream);
int encode_delta(const float* global, const float* local, float* ef, int64_t n,
                 const QuantParams& p, uint8_t* codes, float* scales, void* stream);
int nesterov(float* param, float* momentum, const float* grad, int64_t n, float lr, float mu,
             void* stream);

}  // namespace cuda
#endif

}  // namespace hypha
