// The public hypha::cpu API: picks the SIMD path once (run-time CPU detection) and splits large
// calls into one contiguous range of blocks per OpenMP thread. Small calls (< 64K elements) stay
// on the calling thread: a parallel region costs a few microseconds, as much as the whole call.
//
// Results never depend on the split: every block is computed the same way whichever thread runs
// it, and the random stream is indexed by element, not by thread.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "dispatch.h"
#include "hypha/kernels.h"
#include "impl.h"

namespace hypha::cpu {
namespace {

using impl::KernelTable;

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the vector state (XCR0).
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// Narrowest first.
std::vector<const KernelTable*> supported_tables() {
  std::vector<const KernelTable*> t{impl::generic_table()};
  if (impl::avx2_table() != nullptr && cpu_has_avx2()) t.push_back(impl::avx2_table());
  if (impl::avx512_table() != nullptr && cpu_has_avx512()) t.push_back(impl::avx512_table());
  return t;
}

const KernelTable* find_table(const std::string& name) {
  const std::string want = (name == "scalar" || name == "generic" || name == "sse2")
                               ? std::string(impl::generic_table()->name)
                               : name;
  for (const KernelTable* t : supported_tables()) {
    if (want == t->name) return t;
  }
  return nullptr;
}

const KernelTable* initial_table() {
  if (const char* env = std::getenv("HYPHA_CPU_SIMD"); env != nullptr && *env != '\0') {
    if (const KernelTable* t = find_table(env)) return t;
    // An unknown or unsupported name falls through to the best path rather than failing.
  }
  return supported_tables().back();
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable& table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {  // first use; a race only computes the same answer twice
    t = initial_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

// Threads for a call over n elements: 1 below kParallelMinElems, else up to the OpenMP limit
// with at least half that many elements each.
int threads_for(int64_t n, int64_t units) {
#if defined(_OPENMP)
  if (n < detail::kParallelMinElems || omp_in_parallel()) return 1;
  int64_t nt = omp_get_max_threads();
  const int64_t cap = n / (detail::kParallelMinElems / 2);
  if (cap < nt) nt = cap;
  if (units < nt) nt = units;
  return nt < 1 ? 1 : static_cast<int>(nt);
#else
  (void)n;
  (void)units;
  return 1;
#endif
}

// Calls f(lo, hi) on disjoint contiguous ranges covering [0, count), in parallel for large n;
// inner range boundaries are multiples of `align`.
template <class F>
void parallel_ranges(int64_t count, int64_t n, int64_t align, const F& f) {
  const int nt = threads_for(n, count / align);
  if (nt <= 1) {
    f(int64_t{0}, count);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
  {
    const int64_t nthreads = omp_get_num_threads();
    const int64_t t = omp_get_thread_num();
    const int64_t lo = t == 0 ? 0 : (count * t / nthreads) / align * align;
    const int64_t hi = t == nthreads - 1 ? count : (count * (t + 1) / nthreads) / align * align;
    if (lo < hi) f(lo, hi);
  }
#endif
}

}  // namespace

void quantize(const float* x, int64_t n, const QuantParams& p, uint8_t* codes, float* scales) {
  if (n <= 0) return;
  const KernelTable& k = table();
  parallel_ranges(num_blocks(n, p.block_size), n, 1, [&](int64_t lo, int64_t hi) {
    k.quantize(x, n, p, codes, scales, lo, hi);
  });
}

void dequantize(const uint8_t* codes, const float* scales, int64_t n, int bits, int64_t block_size,
                float* out) {
  if (n <= 0) return;
  const KernelTable& k = table();
  parallel_ranges(num_blocks(n, block_size), n, 1, [&](int64_t lo, int64_t hi) {
    k.dequantize(codes, scales, n, bits, block_size, out, false, lo, hi);
  });
}

void dequantize_accumulate(const uint8_t* codes, const float* scales, int64_t n, int bits,
                           int64_t block_size, float* acc) {
  if (n <= 0) return;
  const KernelTable& k = table();
  parallel_ranges(num_blocks(n, block_size), n, 1, [&](int64_t lo, int64_t hi) {
    k.dequantize(codes, scales, n, bits, block_size, acc, true, lo, hi);
  });
}

void encode_delta(const float* global, const float* local, float* ef, int64_t n,
                  const QuantParams& p, uint8_t* codes, float* scales) {
  if (n <= 0) return;
  if (local == nullptr && ef == nullptr) {  // delta = global: a plain quantize
    quantize(global, n, p, codes, scales);
    return;
  }
  const KernelTable& k = table();
  parallel_ranges(num_blocks(n, p.block_size), n, 1, [&](int64_t lo, int64_t hi) {
    k.encode_delta(global, local, ef, n, p, codes, scales, lo, hi);
  });
}

void nesterov(float* param, float* momentum, const float* grad, int64_t n, float lr, float mu) {
  if (n <= 0) return;
  const KernelTable& k = table();
  // Ranges split on 16-element (64-byte) boundaries: no cache line is written by two threads.
  parallel_ranges(n, n, 16, [&](int64_t lo, int64_t hi) {
    k.nesterov(param, momentum, grad, lo, hi, lr, mu);
  });
}

const char* simd_path() { return table().name; }

namespace detail {

std::vector<std::string> supported_simd_paths() {
  std::vector<std::string> names;
  for (const KernelTable* t : supported_tables()) names.emplace_back(t->name);
  return names;
}

bool set_simd_path(const std::string& name) {
  const KernelTable* t = find_table(name);
  if (t == nullptr) return false;
  g_table.store(t, std::memory_order_release);
  return true;
}

}  // namespace detail
}  // namespace hypha::cpu
