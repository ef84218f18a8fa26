// Private: host-side launchers for the kernels in kernels.cuh (nvcc only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"

namespace hypha {
namespace cuda_detail {

inline bool aligned_to(const void* p, uintptr_t a) {
  return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0;
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Launches encode_kernel<BITS, B, ...> for the given optional inputs; returns the launch status.
template <int BITS, int B>
int launch_encode_block(const float* g, const float* l, float* ef, int64_t n, const QuantParams& p,
                        uint8_t* codes, float* scales, void* stream) {
  using C = QCfg<B>;
  const unsigned grid = grid_for(num_tiles(n, C::TILE));
  int align = 0;
  if (aligned_to(g, 16) && (l == nullptr || aligned_to(l, 16)) &&
      (ef == nullptr || aligned_to(ef, 16))) {
    align |= kAlignFloats;
  }
  if (aligned_to(codes, QBits<BITS>::kUnitBytes)) align |= kAlignCodes;
  const int stochastic = p.stochastic ? 1 : 0;
  const uint32_t off32 = static_cast<uint32_t>(p.offset);  // the stream index is mod 2^32
  cudaStream_t s = as_stream(stream);
  if (l != nullptr && ef != nullptr) {
    encode_kernel<BITS, B, true, true>
        <<<grid, kThreads, 0, s>>>(g, l, ef, n, codes, scales, stochastic, p.key, off32, align);
  } else if (l != nullptr) {
    encode_kernel<BITS, B, true, false>
        <<<grid, kThreads, 0, s>>>(g, l, ef, n, codes, scales, stochastic, p.key, off32, align);
  } else if (ef != nullptr) {
    encode_kernel<BITS, B, false, true>
        <<<grid, kThreads, 0, s>>>(g, l, ef, n, codes, scales, stochastic, p.key, off32, align);
  } else {
    encode_kernel<BITS, B, false, false>
        <<<grid, kThreads, 0, s>>>(g, l, ef, n, codes, scales, stochastic, p.key, off32, align);
  }
  return static_cast<int>(cudaGetLastError());
}

// Dispatches on the block size for one bit width (instantiated once per width, in its own .cu).
template <int BITS>
int launch_encode(const float* g, const float* l, float* ef, int64_t n, const QuantParams& p,
                  uint8_t* codes, float* scales, void* stream) {
  switch (p.block_size) {
    case 16: return launch_encode_block<BITS, 16>(g, l, ef, n, p, codes, scales, stream);
    case 32: return launch_encode_block<BITS, 32>(g, l, ef, n, p, codes, scales, stream);
    case 64: return launch_encode_block<BITS, 64>(g, l, ef, n, p, codes, scales, stream);
    case 128: return launch_encode_block<BITS, 128>(g, l, ef, n, p, codes, scales, stream);
    case 256: return launch_encode_block<BITS, 256>(g, l, ef, n, p, codes, scales, stream);
    case 512: return launch_encode_block<BITS, 512>(g, l, ef, n, p, codes, scales, stream);
    case 1024: return launch_encode_block<BITS, 1024>(g, l, ef, n, p, codes, scales, stream);
    case 2048: return launch_encode_block<BITS, 2048>(g, l, ef, n, p, codes, scales, stream);
    case 4096: return launch_encode_block<BITS, 4096>(g, l, ef, n, p, codes, scales, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

// Defined in encode_b8.cu / encode_b4.cu / encode_b2.cu (split so the 108 kernel instantiations
// compile in parallel).
int launch_encode_b8(const float* g, const float* l, float* ef, int64_t n, const QuantParams& p,
                     uint8_t* codes, float* scales, void* stream);
int launch_encode_b4(const float* g, const float* l, float* ef, int64_t n, const QuantParams& p,
                     uint8_t* codes, float* scales, void* stream);
int launch_encode_b2(const float* g, const float* l, float* ef, int64_t n, const QuantParams& p,
                     uint8_t* codes, float* scales, void* stream);

}  // namespace cuda_detail
}  // namespace hypha
