// Helpers shared by the C++ unit tests: calling the kernels into fresh buffers, iterating over the
// SIMD paths and thread counts.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "core/dispatch.h"
#include "hypha/kernels.h"
#include "oracle.h"

namespace testutil {

inline hypha::QuantParams params(int bits, int64_t block_size, bool stochastic = false,
                                 uint32_t key = 0, uint64_t offset = 0) {
  hypha::QuantParams p;
  p.bits = bits;
  p.block_size = block_size;
  p.stochastic = stochastic;
  p.key = key;
  p.offset = offset;
  return p;
}

// The kernel's output, in buffers pre-filled with a sentinel so that unwritten bytes show up.
inline oracle::Q quantize(const std::vector<float>& x, const hypha::QuantParams& p) {
  const auto n = static_cast<int64_t>(x.size());
  oracle::Q q;
  q.codes.assign(static_cast<size_t>(hypha::packed_nbytes(n, p.bits)), 0xA5);
  q.scales.assign(static_cast<size_t>(hypha::num_blocks(n, p.block_size)), -12345.0f);
  hypha::cpu::quantize(x.data(), n, p, q.codes.data(), q.scales.data());
  return q;
}

inline oracle::Q encode_delta(const std::vector<float>& g, const std::vector<float>* l,
                              std::vector<float>* e, const hypha::QuantParams& p) {
  const auto n = static_cast<int64_t>(g.size());
  oracle::Q q;
  q.codes.assign(static_cast<size_t>(hypha::packed_nbytes(n, p.bits)), 0xA5);
  q.scales.assign(static_cast<size_t>(hypha::num_blocks(n, p.block_size)), -12345.0f);
  hypha::cpu::encode_delta(g.data(), l != nullptr ? l->data() : nullptr,
                           e != nullptr ? e->data() : nullptr, n, p, q.codes.data(),
                           q.scales.data());
  return q;
}

inline std::vector<float> dequantize(const oracle::Q& q, int64_t n, int bits, int64_t bs) {
  std::vector<float> out(static_cast<size_t>(n), -777.0f);
  hypha::cpu::dequantize(q.codes.data(), q.scales.data(), n, bits, bs, out.data());
  return out;
}

// The SIMD paths this CPU supports, with the thread counts to try on each.
inline void for_each_path(const std::function<void(const std::string&)>& fn) {
  const std::vector<std::string> paths = hypha::cpu::detail::supported_simd_paths();
  const std::string initial = hypha::cpu::simd_path();
  for (const std::string& path : paths) {
    hypha::cpu::detail::set_simd_path(path);
    fn(path);
  }
  hypha::cpu::detail::set_simd_path(initial);
}

inline void set_threads(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(n);
#else
  (void)n;
#endif
}

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace testutil
