// 4-bit instantiations of the quantize / encode_delta kernel (see kernels.cuh).
#include "launch.cuh"

namespace hypha {
namespace cuda_detail {

int launch_encode_b4(const float* g, const float* l, float* ef, int64_t n, const QuantParams& p,
                     uint8_t* codes, float* scales, void* stream) {
  return launch_encode<4>(g, l, ef, n, p, codes, scales, stream);
}

}  // namespace cuda_detail
}  // namespace hypha
