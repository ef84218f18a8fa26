// Every SIMD path the CPU supports must give exactly the bytes of the portable path ("sse2" /
// "generic"), on random data salted with special values (NaN, +-inf, denormals, signed zeros,
// tiny and huge blocks), for every op, bit width, block size and rounding mode.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "harness.h"
#include "oracle.h"

using testutil::params;

namespace {

std::vector<float> salted(int64_t n, uint32_t seed) {
  std::vector<float> x = oracle::random_vector(n, seed);
  std::mt19937 rng(seed * 7 + 1);
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            1e-40f,
                            -1e-45f,
                            -0.0f,
                            0.0f,
                            3.4e38f,
                            std::ldexp(1.0f, -120)};
  for (int64_t k = 0; k < n / 500; ++k) {
    x[rng() % static_cast<uint32_t>(n)] = specials[rng() % (sizeof specials / sizeof *specials)];
  }
  // A whole tiny block and a whole zero block.
  for (int64_t i = 0; i < std::min<int64_t>(n, 4096); ++i) {
    if (i >= 256 && i < 512) x[i] = 1e-38f * static_cast<float>(i % 3);
    if (i >= 512 && i < 768) x[i] = 0.0f;
  }
  return x;
}

struct Results {
  oracle::Q q, ed;
  std::vector<float> dq, acc, ef, p, m;
};

Results run_all(const std::vector<float>& x, const std::vector<float>& l, const hypha::QuantParams& p,
                int variant) {
  const auto n = static_cast<int64_t>(x.size());
  Results r;
  r.q = testutil::quantize(x, p);
  r.dq = testutil::dequantize(r.q, n, p.bits, p.block_size);
  r.acc = l;
  hypha::cpu::dequantize_accumulate(r.q.codes.data(), r.q.scales.data(), n, p.bits, p.block_size,
                                    r.acc.data());
  r.ef.assign(x.size(), 0.0f);
  for (int64_t i = 0; i < n; i += 3) r.ef[i] = 1e-3f * static_cast<float>(i % 17);
  r.ed = testutil::encode_delta(x, (variant & 1) ? &l : nullptr, (variant & 2) ? &r.ef : nullptr, p);
  r.p = x;
  r.m = l;
  hypha::cpu::nesterov(r.p.data(), r.m.data(), l.data(), n, 0.05f, 0.9f);
  return r;
}

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         oracle::first_float_mismatch(a.data(), b.data(), static_cast<int64_t>(a.size())) < 0;
}

}  // namespace

TEST(simd_paths_agree_with_portable_path) {
  const std::vector<std::string> paths = hypha::cpu::detail::supported_simd_paths();
  std::fprintf(stderr, "  paths:");
  for (const auto& s : paths) std::fprintf(stderr, " %s", s.c_str());
  std::fprintf(stderr, " (default %s)\n", hypha::cpu::simd_path());
  CHECK(!paths.empty());
  const std::string initial = hypha::cpu::simd_path();
  int compared = 0;
  for (int64_t n : {1, 9, 16, 17, 47, 64, 65, 200, 1000, 4096, 5000, 5 * 123 * 123, 70001}) {
    const std::vector<float> x = salted(n, static_cast<uint32_t>(n));
    const std::vector<float> l = oracle::random_vector(n, static_cast<uint32_t>(n) + 1);
    for (int bits : {8, 4, 2}) {
      for (int64_t bs : {16, 32, 64, 128, 1024, 4096}) {
        for (bool sr : {false, true}) {
          const int variant = static_cast<int>((n + bs + bits) % 4);
          const auto p = params(bits, bs, sr, hypha::seed_key(static_cast<uint64_t>(n) * 31 + bits),
                                static_cast<uint64_t>(bs) * 1000003u);
          hypha::cpu::detail::set_simd_path(paths.front());
          const Results want = run_all(x, l, p, variant);
          for (size_t k = 1; k < paths.size(); ++k) {
            hypha::cpu::detail::set_simd_path(paths[k]);
            const Results got = run_all(x, l, p, variant);
            const std::string what = paths[k] + " n=" + std::to_string(n) + " bits=" +
                                     std::to_string(bits) + " bs=" + std::to_string(bs) +
                                     " sr=" + std::to_string(sr);
            CHECK_MSG(got.q.codes == want.q.codes, what << " quantize codes");
            CHECK_MSG(same(got.q.scales, want.q.scales), what << " quantize scales");
            CHECK_MSG(same(got.dq, want.dq), what << " dequantize");
            CHECK_MSG(same(got.acc, want.acc), what << " dequantize_accumulate");
            CHECK_MSG(got.ed.codes == want.ed.codes, what << " encode_delta codes v" << variant);
            CHECK_MSG(same(got.ed.scales, want.ed.scales), what << " encode_delta scales");
            CHECK_MSG(same(got.ef, want.ef), what << " encode_delta ef");
            CHECK_MSG(same(got.p, want.p) && same(got.m, want.m), what << " nesterov");
            ++compared;
          }
        }
      }
    }
  }
  hypha::cpu::detail::set_simd_path(initial);
  if (paths.size() == 1) std::fprintf(stderr, "  only the portable path is supported here\n");
  std::fprintf(stderr, "  %d path comparisons\n", compared);
}

TEST(simd_path_switching) {
  const std::vector<std::string> paths = hypha::cpu::detail::supported_simd_paths();
  const std::string initial = hypha::cpu::simd_path();
  CHECK(paths.back() == initial || std::getenv("HYPHA_CPU_SIMD") != nullptr);
  for (const auto& s : paths) {
    CHECK(hypha::cpu::detail::set_simd_path(s));
    CHECK(s == hypha::cpu::simd_path());
  }
  CHECK(hypha::cpu::detail::set_simd_path("scalar"));  // alias of the portable path
  CHECK(paths.front() == hypha::cpu::simd_path());
  CHECK(!hypha::cpu::detail::set_simd_path("neon-on-x86"));
  CHECK(paths.front() == hypha::cpu::simd_path());  // unchanged by a failed switch
  hypha::cpu::detail::set_simd_path(initial);
}
