// Unit tests of the hypha::cpu kernels against hand-computed values and the naive oracle, on every
// SIMD path the CPU supports.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "harness.h"
#include "oracle.h"

using testutil::for_each_path;
using testutil::params;

namespace {

const int kBits[] = {8, 4, 2};

// Packs codes the obvious way: element i at bits (i % per) * bits of byte i / per.
std::vector<uint8_t> pack(const std::vector<uint32_t>& c, int bits) {
  const int per = 8 / bits;
  std::vector<uint8_t> out((c.size() * bits + 7) / 8, 0);
  for (size_t i = 0; i < c.size(); ++i) out[i / per] |= static_cast<uint8_t>(c[i] << ((i % per) * bits));
  return out;
}

void expect_same_as_oracle(const std::string& what, const std::vector<float>& x,
                           const hypha::QuantParams& p) {
  const auto n = static_cast<int64_t>(x.size());
  const oracle::Q want = oracle::quantize(x.data(), n, p);
  const oracle::Q got = testutil::quantize(x, p);
  const int64_t bi = oracle::first_byte_mismatch(got.codes.data(), want.codes.data(),
                                                 static_cast<int64_t>(want.codes.size()));
  CHECK_MSG(bi < 0, what << " n=" << n << " bits=" << p.bits << " bs=" << p.block_size
                         << " sr=" << p.stochastic << ": code byte " << bi << " is "
                         << (bi >= 0 ? +got.codes[bi] : 0) << ", want "
                         << (bi >= 0 ? +want.codes[bi] : 0));
  const int64_t si = oracle::first_float_mismatch(got.scales.data(), want.scales.data(),
                                                  static_cast<int64_t>(want.scales.size()));
  CHECK_MSG(si < 0, what << " n=" << n << " bits=" << p.bits << " bs=" << p.block_size
                         << ": scale " << si << " is " << (si >= 0 ? got.scales[si] : 0.f)
                         << ", want " << (si >= 0 ? want.scales[si] : 0.f));
  // dequantize and dequantize_accumulate of the same codes.
  const std::vector<float> dq_want =
      oracle::dequantize(want.codes.data(), want.scales.data(), n, p.bits, p.block_size);
  const std::vector<float> dq = testutil::dequantize(want, n, p.bits, p.block_size);
  const int64_t di = oracle::first_float_mismatch(dq.data(), dq_want.data(), n);
  CHECK_MSG(di < 0, what << " dequantize n=" << n << " bits=" << p.bits << " bs="
                         << p.block_size << ": element " << di);
  std::vector<float> acc = x, acc_want = x;
  for (int64_t i = 0; i < n; ++i) acc_want[i] = acc_want[i] + dq_want[i];
  hypha::cpu::dequantize_accumulate(want.codes.data(), want.scales.data(), n, p.bits,
                                    p.block_size, acc.data());
  const int64_t ai = oracle::first_float_mismatch(acc.data(), acc_want.data(), n);
  CHECK_MSG(ai < 0, what << " dequantize_accumulate n=" << n << " bits=" << p.bits << " bs="
                         << p.block_size << ": element " << ai);
}

}  // namespace

TEST(hash32_and_seed_key_known_values) {
  // Expected values from hypha.ops._reference (_hash32_int, seed_key).
  CHECK_EQ(hypha::hash32(0u), 0u);
  CHECK_EQ(hypha::hash32(1u), 0x688990c0u);
  CHECK_EQ(hypha::hash32(2u), 0xd1132181u);
  CHECK_EQ(hypha::hash32(0x12345678u), 0xf5e71c96u);
  CHECK_EQ(hypha::hash32(0xffffffffu), 0x6768824au);
  CHECK_EQ(hypha::seed_key(0), 0xae6f80f1u);
  CHECK_EQ(hypha::seed_key(1), 0xa07c7a97u);
  CHECK_EQ(hypha::seed_key(42), 0xb7d220dcu);
  CHECK_EQ(hypha::seed_key(0x100000000ull), 0x8e374fe0u);
  CHECK_EQ(hypha::seed_key(0xffffffffffffffffull), 0x8fad8c62u);
  CHECK_EQ(hypha::seed_key(0x0123456789abcdefull), 0xf380be2fu);
  CHECK_EQ(oracle::lowbias32(0x12345678u), hypha::hash32(0x12345678u));
}

TEST(pack_layout_little_end_first) {
  // x_i = c_i - mid with a 0 code in every block: absmax = mid, so inv = scale = 1 and the codes
  // come back exactly; the packed bytes must follow the documented layout.
  for_each_path([](const std::string& path) {
    for (int bits : kBits) {
      const uint32_t L = oracle::levels(bits);
      const float mid = oracle::mid(bits);
      for (int64_t bs : {16, 64}) {
        for (int64_t n : {int64_t{16}, int64_t{21}, int64_t{16 * 9 + 5}, int64_t{1000}}) {
          std::vector<uint32_t> c(static_cast<size_t>(n));
          std::vector<float> x(static_cast<size_t>(n));
          for (int64_t i = 0; i < n; ++i) {
            c[i] = i % bs == 0 ? 0 : static_cast<uint32_t>(i * 7 + 3) % (L + 1);
            x[i] = static_cast<float>(c[i]) - mid;
          }
          const auto p = params(bits, bs);
          const oracle::Q q = testutil::quantize(x, p);
          const std::vector<uint8_t> want = pack(c, bits);
          CHECK_MSG(q.codes == want, path << " bits=" << bits << " bs=" << bs << " n=" << n);
          for (float s : q.scales) CHECK_EQ(s, 1.0f);
          const std::vector<float> dq = testutil::dequantize(q, n, bits, bs);
          CHECK_MSG(dq == x, path << " round trip bits=" << bits << " n=" << n);
        }
      }
      // A single element: one byte, unused bits zero.
      const oracle::Q q1 = testutil::quantize({-mid}, params(bits, 16));
      CHECK_EQ(q1.codes.size(), size_t{1});
      CHECK_EQ(+q1.codes[0], 0);
      const oracle::Q q2 = testutil::quantize({mid}, params(bits, 16));
      CHECK_EQ(+q2.codes[0], static_cast<int>(L));
    }
  });
}

TEST(rtn_hand_computed_codes) {
  // absmax 1: codes floor(x * mid / 1 + 2^(bits-1)).
  const std::vector<float> x = {1.0f, -1.0f, 0.5f, 0.0f, 0.25f, -0.25f, -0.0f};
  const std::vector<uint32_t> want8 = {255, 0, 191, 128, 159, 96, 128};
  const std::vector<uint32_t> want4 = {15, 0, 11, 8, 9, 6, 8};
  const std::vector<uint32_t> want2 = {3, 0, 2, 2, 2, 1, 2};
  for_each_path([&](const std::string& path) {
    for (int bits : kBits) {
      const auto& want = bits == 8 ? want8 : (bits == 4 ? want4 : want2);
      const oracle::Q q = testutil::quantize(x, params(bits, 16));
      CHECK_MSG(q.codes == pack(want, bits), path << " bits=" << bits);
      CHECK_EQ(q.scales[0], 1.0f / oracle::mid(bits));
    }
    // Ties round up: absmax 3 at 2 bits gives inv = 0.5 exactly, t = x/2 + 2.
    const oracle::Q q = testutil::quantize({3.0f, 1.0f, -1.0f, -3.0f, 2.0f}, params(2, 16));
    CHECK_MSG(q.codes == pack({3, 2, 1, 0, 3}, 2), path);
    CHECK_EQ(q.scales[0], 2.0f);
    const std::vector<float> dq = testutil::dequantize(q, 5, 2, 16);
    CHECK_MSG((dq == std::vector<float>{3.0f, 1.0f, -1.0f, -3.0f, 3.0f}), path);
  });
}

TEST(zero_tiny_and_denormal_blocks) {
  const float tiny = std::ldexp(1.0f, -120);
  for_each_path([&](const std::string& path) {
    for (int bits : kBits) {
      const uint32_t off = 1u << (bits - 1);
      for (const float v : {0.0f, -0.0f, tiny * 0.75f, 1e-40f, -1e-45f}) {
        std::vector<float> x(40, v);
        x[3] = -v;
        const oracle::Q q = testutil::quantize(x, params(bits, 16));
        for (float s : q.scales) CHECK_MSG(s == 0.0f, path << " v=" << v << " scale " << s);
        CHECK_MSG(q.codes == pack(std::vector<uint32_t>(40, off), bits), path << " v=" << v);
        for (float d : testutil::dequantize(q, 40, bits, 16)) CHECK(d == 0.0f);
        expect_same_as_oracle(path + " tiny", x, params(bits, 16));
        expect_same_as_oracle(path + " tiny sr", x, params(bits, 16, true, 99, 7));
      }
      // absmax exactly 2^-120 is not tiny: scale = absmax / mid, extreme codes.
      std::vector<float> x = {tiny, -tiny, 0.0f};
      const oracle::Q q = testutil::quantize(x, params(bits, 16));
      CHECK_EQ(q.scales[0], tiny / oracle::mid(bits));
      CHECK_EQ(oracle::code_at(q.codes.data(), 0, bits), oracle::levels(bits));
      CHECK_EQ(oracle::code_at(q.codes.data(), 1, bits), 0u);
      expect_same_as_oracle(path + " denormal mix", {1e-38f, -3e-39f, 1e-45f, 2e-38f, 0.0f},
                            params(bits, 16));
    }
  });
}

TEST(nan_and_inf_blocks) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for_each_path([&](const std::string& path) {
    for (int bits : kBits) {
      for (bool sr : {false, true}) {
        std::vector<float> x = oracle::random_vector(16 * 4 + 3, 5);
        x[5] = nan;    // block 0: NaN scale, all codes 0
        x[20] = inf;   // block 1: inf scale
        x[40] = -inf;  // block 2
        x[66] = nan;   // last (partial) block
        const auto p = params(bits, 16, sr, 1234, 77);
        const oracle::Q q = testutil::quantize(x, p);
        CHECK(std::isnan(q.scales[0]));
        CHECK(std::isinf(q.scales[1]));
        CHECK(std::isnan(q.scales[4]));
        for (int64_t i = 0; i < 16; ++i) CHECK_EQ(oracle::code_at(q.codes.data(), i, bits), 0u);
        CHECK_EQ(oracle::code_at(q.codes.data(), 20, bits), 0u);  // inf * 0 = NaN -> 0
        expect_same_as_oracle(path + " nan/inf", x, p);
      }
    }
  });
}

TEST(tail_blocks_and_odd_sizes_match_oracle) {
  for_each_path([](const std::string& path) {
    for (int64_t n : {1, 2, 3, 5, 15, 16, 17, 31, 33, 63, 65, 100, 127, 1000, 4097, 5 * 123 * 123}) {
      const std::vector<float> x = oracle::random_vector(n, static_cast<uint32_t>(n));
      for (int bits : kBits) {
        for (int64_t bs : {16, 32, 64, 128, 4096}) {
          expect_same_as_oracle(path, x, params(bits, bs));
          expect_same_as_oracle(path + " sr", x, params(bits, bs, true, hypha::seed_key(n), 3));
        }
      }
    }
  });
}

TEST(round_trip_error_bounds) {
  const int64_t n = 20000;
  const std::vector<float> x = oracle::random_vector(n, 11, 3.0f);
  for (int bits : kBits) {
    for (int64_t bs : {16, 128, 4096}) {
      for (bool sr : {false, true}) {
        const auto p = params(bits, bs, sr, 5, 0);
        const oracle::Q q = testutil::quantize(x, p);
        const std::vector<float> dq = testutil::dequantize(q, n, bits, bs);
        double worst = 0;
        for (int64_t i = 0; i < n; ++i) {
          const double s = q.scales[i / bs];
          const double err = std::fabs(static_cast<double>(x[i]) - dq[i]);
          const double bound = (sr ? 1.0 : 0.5) * s * (1 + 1e-5) + 1e-6 * std::fabs(x[i]);
          if (s > 0) worst = std::max(worst, err / bound);
          CHECK_MSG(err <= bound, "bits=" << bits << " bs=" << bs << " sr=" << sr << " i=" << i
                                          << " x=" << x[i] << " dq=" << dq[i] << " scale=" << s);
        }
        CHECK(worst > 0.3);  // the bound is not vacuous
      }
    }
  }
}

TEST(stochastic_rounding_is_unbiased) {
  // Every block: one element at absmax 1.5 (2 bits: scale 1), the rest 0.2, so each code is 2
  // with probability 0.7 and 1 with probability 0.3: E[dequant] = 0.2.
  const int64_t n = 1 << 20, bs = 4096;
  std::vector<float> x(static_cast<size_t>(n), 0.2f);
  for (int64_t i = 0; i < n; i += bs) x[i] = 1.5f;
  for (uint64_t seed : {1ull, 2ull, 0xdeadbeefcafeull}) {
    const oracle::Q q = testutil::quantize(x, params(2, bs, true, hypha::seed_key(seed), seed));
    const std::vector<float> dq = testutil::dequantize(q, n, 2, bs);
    double sum = 0;
    int64_t cnt = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (i % bs == 0) continue;
      sum += dq[i];
      ++cnt;
    }
    const double mean = sum / cnt;  // std of the mean ~ 0.46 / 1024 = 4.5e-4
    CHECK_MSG(std::fabs(mean - 0.2) < 3e-3, "seed " << seed << " mean " << mean);
  }
  // RTN on the same data is biased (always rounds 1.7 up to 2 -> 0.5), as a sanity check.
  const oracle::Q q = testutil::quantize(x, params(2, bs));
  CHECK_EQ(testutil::dequantize(q, n, 2, bs)[1], 0.5f);
}

TEST(stochastic_stream_is_split_invariant_and_keyed) {
  const int64_t bs = 128, n = bs * 10 + 7;
  const std::vector<float> x = oracle::random_vector(n, 3);
  for (uint64_t offset : {0ull, 12345ull, 0xFFFFFF00ull, 0xFFFFFFFFFFFFFF80ull}) {
    for (int bits : kBits) {
      const auto p = params(bits, bs, true, hypha::seed_key(9), offset);
      const oracle::Q whole = testutil::quantize(x, p);
      // Two calls, split on a block boundary, with the matching offset.
      const int64_t cut = bs * 4;
      const std::vector<float> a(x.begin(), x.begin() + cut), b(x.begin() + cut, x.end());
      const oracle::Q qa = testutil::quantize(a, p);
      const oracle::Q qb = testutil::quantize(b, params(bits, bs, true, hypha::seed_key(9),
                                                        offset + static_cast<uint64_t>(cut)));
      std::vector<uint8_t> joined = qa.codes;
      joined.insert(joined.end(), qb.codes.begin(), qb.codes.end());
      CHECK_MSG(joined == whole.codes, "offset " << offset << " bits " << bits);
      expect_same_as_oracle("offset wrap", x, p);
    }
  }
  const oracle::Q k1 = testutil::quantize(x, params(4, bs, true, hypha::seed_key(1)));
  const oracle::Q k2 = testutil::quantize(x, params(4, bs, true, hypha::seed_key(2)));
  CHECK(k1.codes != k2.codes);
  CHECK(k1.scales == k2.scales);
}

TEST(encode_delta_matches_oracle_and_ef_identity) {
  for_each_path([](const std::string& path) {
    for (int64_t n : {1, 17, 100, 1000, 4096 + 33, 70000}) {
      const std::vector<float> g = oracle::random_vector(n, 1), l0 = oracle::random_vector(n, 2);
      std::vector<float> l(l0);
      for (int64_t i = 0; i < n; ++i) l[i] = g[i] + 0.01f * l0[i];  // local close to global
      const std::vector<float> e0 = oracle::random_vector(n, 3, 0.001f);
      for (int bits : kBits) {
        for (int64_t bs : {16, 128, 4096}) {
          for (bool sr : {false, true}) {
            for (int variant = 0; variant < 4; ++variant) {
              const bool has_l = variant & 1, has_e = variant & 2;
              const auto p = params(bits, bs, sr, hypha::seed_key(n + bits), 5);
              std::vector<float> e = e0;
              const oracle::Q q =
                  testutil::encode_delta(g, has_l ? &l : nullptr, has_e ? &e : nullptr, p);
              const std::vector<float> d =
                  oracle::delta(g.data(), has_l ? l.data() : nullptr, has_e ? e0.data() : nullptr, n);
              const oracle::Q want = oracle::quantize(d.data(), n, p);
              const std::string what = path + " n=" + std::to_string(n) + " bits=" +
                                       std::to_string(bits) + " bs=" + std::to_string(bs) +
                                       " sr=" + std::to_string(sr) + " variant=" +
                                       std::to_string(variant);
              CHECK_MSG(q.codes == want.codes, what);
              CHECK_MSG(oracle::first_float_mismatch(q.scales.data(), want.scales.data(),
                                                     static_cast<int64_t>(want.scales.size())) < 0,
                        what);
              if (!has_e) {
                CHECK_MSG(e == e0, what << ": ef written without error feedback");
                continue;
              }
              const std::vector<float> dq =
                  oracle::dequantize(want.codes.data(), want.scales.data(), n, bits, bs);
              for (int64_t i = 0; i < n; ++i) {
                const float ef_want = d[i] - dq[i];
                if (!oracle::same_float(e[i], ef_want)) {
                  CHECK_MSG(false, what << ": ef[" << i << "] = " << e[i] << ", want " << ef_want);
                  break;
                }
                // delta == dequant + ef up to one rounding.
                const double lhs = static_cast<double>(dq[i]) + e[i];
                const double tol = std::ldexp(std::fabs(static_cast<double>(d[i])) +
                                                  std::fabs(static_cast<double>(dq[i])),
                                              -24);
                CHECK_MSG(std::fabs(lhs - d[i]) <= tol, what << " identity at " << i);
              }
            }
          }
        }
      }
    }
  });
}

TEST(nesterov_matches_scalar_loop) {
  for_each_path([](const std::string& path) {
    for (int64_t n : {1, 7, 16, 33, 1000, (1 << 18) + 5}) {
      for (float lr : {0.7f, 1e-3f, 0.0f}) {
        for (float mu : {0.9f, 0.0f, 0.99f}) {
          std::vector<float> p = oracle::random_vector(n, 1), m = oracle::random_vector(n, 2);
          const std::vector<float> g = oracle::random_vector(n, 3);
          std::vector<float> p2 = p, m2 = m;
          hypha::cpu::nesterov(p.data(), m.data(), g.data(), n, lr, mu);
          oracle::nesterov(p2.data(), m2.data(), g.data(), n, lr, mu);
          CHECK_MSG(oracle::first_float_mismatch(p.data(), p2.data(), n) < 0,
                    path << " param n=" << n << " lr=" << lr << " mu=" << mu);
          CHECK_MSG(oracle::first_float_mismatch(m.data(), m2.data(), n) < 0,
                    path << " momentum n=" << n);
        }
      }
    }
  });
}

TEST(thread_count_does_not_change_results) {
  const int64_t n = (1 << 20) + 3;
  const std::vector<float> x = oracle::random_vector(n, 21);
  const std::vector<float> l = oracle::random_vector(n, 22);
  const int saved = testutil::max_threads();
  for_each_path([&](const std::string& path) {
    for (int bits : kBits) {
      const auto p = params(bits, 64, true, 42, 1000);
      testutil::set_threads(1);
      const oracle::Q q1 = testutil::quantize(x, p);
      std::vector<float> e1(x.size(), 0.01f);
      const oracle::Q d1 = testutil::encode_delta(x, &l, &e1, p);
      std::vector<float> a1 = l;
      hypha::cpu::dequantize_accumulate(q1.codes.data(), q1.scales.data(), n, bits, 64, a1.data());
      std::vector<float> p1 = x, m1 = l;
      hypha::cpu::nesterov(p1.data(), m1.data(), x.data(), n, 0.1f, 0.9f);
      for (int threads : {2, 3}) {
        testutil::set_threads(threads);
        const oracle::Q q2 = testutil::quantize(x, p);
        CHECK_MSG(q1.codes == q2.codes && q1.scales == q2.scales, path << " threads " << threads);
        std::vector<float> e2(x.size(), 0.01f);
        const oracle::Q d2 = testutil::encode_delta(x, &l, &e2, p);
        CHECK_MSG(d1.codes == d2.codes && e1 == e2, path << " encode_delta threads " << threads);
        std::vector<float> a2 = l;
        hypha::cpu::dequantize_accumulate(q1.codes.data(), q1.scales.data(), n, bits, 64,
                                          a2.data());
        CHECK_MSG(a1 == a2, path << " dequantize_accumulate threads " << threads);
        std::vector<float> p2 = x, m2 = l;
        hypha::cpu::nesterov(p2.data(), m2.data(), x.data(), n, 0.1f, 0.9f);
        CHECK_MSG(p1 == p2 && m1 == m2, path << " nesterov threads " << threads);
      }
    }
  });
  testutil::set_threads(saved);
}

TEST(zero_elements_is_a_no_op) {
  uint8_t codes[1] = {0x5A};
  float scales[1] = {3.0f};
  hypha::cpu::quantize(nullptr, 0, params(8, 16), codes, scales);
  hypha::cpu::encode_delta(nullptr, nullptr, nullptr, 0, params(8, 16), codes, scales);
  hypha::cpu::dequantize(codes, scales, 0, 8, 16, nullptr);
  hypha::cpu::nesterov(nullptr, nullptr, nullptr, 0, 0.1f, 0.9f);
  CHECK_EQ(+codes[0], 0x5A);
  CHECK_EQ(scales[0], 3.0f);
}
