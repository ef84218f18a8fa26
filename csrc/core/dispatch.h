// Private to hypha (core, bindings and C++ tests): choosing the CPU SIMD path at run time.
//
// By default the widest path the CPU supports is used ("avx512" > "avx2" > "sse2"/"generic").
// The environment variable HYPHA_CPU_SIMD, read once at first use, can force a narrower one (for
// benchmarks and debugging); set_simd_path switches it at run time (tests compare the paths).
#pragma once

#include <string>
#include <vector>

namespace hypha::cpu::detail {

// The paths this build contains that the running CPU supports, narrowest first.
std::vector<std::string> supported_simd_paths();

// Switches every following call to `name`. Returns false (and changes nothing) if `name` is not
// one of supported_simd_paths(). Not meant to be called while kernels run on other threads.
bool set_simd_path(const std::string& name);

// Below this many elements a call runs on the calling thread only; above it, on up to
// omp_get_max_threads() threads (one contiguous range of blocks each).
constexpr long long kParallelMinElems = 1LL << 16;

}  // namespace hypha::cpu::detail
