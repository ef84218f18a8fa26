// A tiny test harness for the C++ unit tests (no external framework needed offline).
//
//   TEST(name) { CHECK(cond); CHECK_EQ(a, b); ... }
//
// Each test file is its own executable: this header defines main(), which runs every TEST in
// the file, prints the failures and exits non-zero if any check failed. Optional argument: a
// substring selecting which tests run.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace harness {

struct Test {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Test>& registry() {
  static std::vector<Test> tests;
  return tests;
}

inline int& failures() {
  static int n = 0;
  return n;
}

inline int& current_failures() {
  static int n = 0;
  return n;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  // Print at most a handful per test: a broken kernel would otherwise flood the log.
  if (++current_failures() <= 10) std::fprintf(stderr, "  %s:%d: FAILED: %s\n", file, line, what.c_str());
}

template <class A, class B>
std::string describe_ne(const char* ea, const char* eb, const A& a, const B& b) {
  std::ostringstream s;
  s << ea << " == " << eb << " (" << +a << " vs " << +b << ")";
  return s.str();
}

}  // namespace harness

#define HARNESS_CAT2(a, b) a##b
#define HARNESS_CAT(a, b) HARNESS_CAT2(a, b)

#define TEST(name)                                                                  \
  static void name();                                                               \
  static const harness::Register HARNESS_CAT(harness_reg_, name)(#name, &name);     \
  static void name()

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) harness::fail(__FILE__, __LINE__, #cond);                          \
  } while (0)

#define CHECK_MSG(cond, msg)                                                        \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::ostringstream harness_s_;                                                \
      harness_s_ << #cond << ": " << msg;                                           \
      harness::fail(__FILE__, __LINE__, harness_s_.str());                          \
    }                                                                               \
  } while (0)

#define CHECK_EQ(a, b)                                                              \
  do {                                                                              \
    const auto harness_a_ = (a);                                                    \
    const auto harness_b_ = (b);                                                    \
    if (!(harness_a_ == harness_b_))                                                \
      harness::fail(__FILE__, __LINE__, harness::describe_ne(#a, #b, harness_a_, harness_b_)); \
  } while (0)

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : "";
  int ran = 0, failed_tests = 0;
  for (const auto& t : harness::registry()) {
    if (std::strstr(t.name, filter) == nullptr) continue;
    harness::current_failures() = 0;
    std::fprintf(stderr, "[ RUN  ] %s\n", t.name);
    t.fn();
    ++ran;
    if (harness::current_failures() > 0) {
      ++failed_tests;
      std::fprintf(stderr, "[ FAIL ] %s (%d failed checks)\n", t.name, harness::current_failures());
    } else {
      std::fprintf(stderr, "[  OK  ] %s\n", t.name);
    }
  }
  std::fprintf(stderr, "%d tests, %d failed\n", ran, failed_tests);
  return failed_tests == 0 && ran > 0 ? 0 : 1;
}
