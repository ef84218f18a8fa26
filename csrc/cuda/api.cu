// hypha::cuda: the CUDA implementations of the core API declared in hypha/kernels.h.
//
// Every function enqueues its work on the given stream and returns cudaGetLastError() after the
// launch (0 on success). n == 0 launches nothing and returns 0. Arguments are assumed valid
// (csrc/bindings.cpp checks them); an unsupported bits / block_size returns cudaErrorInvalidValue.
#include <cuda_runtime.h>

#include <cstdint>

#include "hypha/kernels.h"
#include "launch.cuh"

#if !defined(HYPHA_WITH_CUDA)
#error "csrc/cuda/*.cu must be compiled with HYPHA_WITH_CUDA defined"
#endif

namespace hypha {
namespace cuda {

namespace {

using namespace hypha::cuda_detail;

int encode(const float* g, const float* l, float* ef, int64_t n, const QuantParams& p,
           uint8_t* codes, float* scales, void* stream) {
  if (n <= 0) return 0;
  switch (p.bits) {
    case 8: return launch_encode_b8(g, l, ef, n, p, codes, scales, stream);
    case 4: return launch_encode_b4(g, l, ef, n, p, codes, scales, stream);
    case 2: return launch_encode_b2(g, l, ef, n, p, codes, scales, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int log2_block(int64_t block_size) {
  if (block_size < kMinBlockSize || block_size > kMaxBlockSize ||
      (block_size & (block_size - 1)) != 0) {
    return -1;
  }
  int k = 0;
  while ((int64_t{1} << k) < block_size) ++k;
  return k;
}

template <int BITS, bool ACC>
int launch_dequant_bits(const uint8_t* codes, const float* scales, int64_t n, int lb, float* out,
                        void* stream) {
  int align = 0;
  if (aligned_to(out, 16)) align |= kAlignOut;
  if (aligned_to(codes, QBits<BITS>::kUnitBytes)) align |= kAlignInCodes;
  const unsigned grid = grid_for(num_tiles(n, DQ_TILE));
  dequant_kernel<BITS, ACC>
      <<<grid, kThreads, 0, as_stream(stream)>>>(codes, scales, n, lb, out, align);
  return static_cast<int>(cudaGetLastError());
}

template <bool ACC>
int launch_dequant(const uint8_t* codes, const float* scales, int64_t n, int bits,
                   int64_t block_size, float* out, void* stream) {
  if (n <= 0) return 0;
  const int lb = log2_block(block_size);
  if (lb < 0) return static_cast<int>(cudaErrorInvalidValue);
  switch (bits) {
    case 8: return launch_dequant_bits<8, ACC>(codes, scales, n, lb, out, stream);
    case 4: return launch_dequant_bits<4, ACC>(codes, scales, n, lb, out, stream);
    case 2: return launch_dequant_bits<2, ACC>(codes, scales, n, lb, out, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int quantize(const float* x, int64_t n, const QuantParams& p, uint8_t* codes, float* scales,
             void* stream) {
  return encode(x, nullptr, nullptr, n, p, codes, scales, stream);
}

int dequantize(const uint8_t* codes, const float* scales, int64_t n, int bits, int64_t block_size,
               float* out, void* stream) {
  return launch_dequant<false>(codes, scales, n, bits, block_size, out, stream);
}

int dequantize_accumulate(const uint8_t* codes, const float* scales, int64_t n, int bits,
                          int64_t block_size, float* acc, void* stream) {
  return launch_dequant<true>(codes, scales, n, bits, block_size, acc, stream);
}

int encode_delta(const float* global, const float* local, float* ef, int64_t n,
                 const QuantParams& p, uint8_t* codes, float* scales, void* stream) {
  return encode(global, local, ef, n, p, codes, scales, stream);
}

int nesterov(float* param, float* momentum, const float* grad, int64_t n, float lr, float mu,
             void* stream) {
  if (n <= 0) return 0;
  const unsigned grid = grid_for(num_tiles(n, NV_TILE));
  cudaStream_t s = as_stream(stream);
  if (aligned_to(param, 16) && aligned_to(momentum, 16) && aligned_to(grad, 16)) {
    nesterov_kernel<true><<<grid, kThreads, 0, s>>>(param, momentum, grad, n, lr, mu);
  } else {
    nesterov_kernel<false><<<grid, kThreads, 0, s>>>(param, momentum, grad, n, lr, mu);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace hypha
