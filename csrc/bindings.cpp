// hypha._C: the Python bindings of the compression kernels.
//
// The low-level functions below are called by hypha/ops/__init__.py, which allocates the
// outputs; they validate everything again at this boundary (dtype, device, contiguity, sizes,
// bits, block_size, key/offset ranges), then dispatch on the device: CPU tensors to hypha::cpu
// (with the GIL released), CUDA tensors to hypha::cuda when the extension was built with CUDA.
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/dispatch.h"
#include "hypha/kernels.h"

#if defined(HYPHA_WITH_CUDA)
// c10's stream header is enough (what at::cuda::getCurrentCUDAStream forwards to); it avoids
// ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace py = pybind11;

namespace {

constexpr const char* kPrefix = "hypha._C.";

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

// "a non-contiguous float16 tensor on cuda:0"
std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << (t.is_contiguous() ? "a contiguous " : "a non-contiguous ") << dtype_name(t.scalar_type())
    << " tensor on " << t.device();
  return s.str();
}

// x must be a contiguous tensor of `dtype`; `inplace` tensors are written by the kernel.
void check_tensor(const char* fn, const char* name, const at::Tensor& t, at::ScalarType dtype,
                  bool inplace) {
  TORCH_CHECK_VALUE(t.defined(), kPrefix, fn, ": ", name, " is an undefined tensor");
  if (t.scalar_type() != dtype) {
    TORCH_CHECK_TYPE(false, kPrefix, fn, ": expected ", name, " to be a contiguous ",
                     dtype_name(dtype), " tensor, got ", describe(t), ". ",
                     inplace ? "It is written in place, so pass a tensor of that dtype."
                             : "Convert it first, e.g. with .to(torch." + dtype_name(dtype) + ").");
  }
  if (!t.is_contiguous()) {
    TORCH_CHECK_VALUE(false, kPrefix, fn, ": expected ", name, " to be a contiguous ",
                      dtype_name(dtype), " tensor, got ", describe(t), ". ",
                      inplace ? "It is written in place, so a .contiguous() copy would not "
                                "receive the result: pass a contiguous tensor."
                              : "Call .contiguous() on it first.");
  }
}

void check_same_device(const char* fn, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), kPrefix, fn,
                    ": expected all tensors on the same device, but ", name, " is on ",
                    t.device(), " and ", ref_name, " is on ", ref.device(),
                    ". Move them to one device first.");
}

void check_numel(const char* fn, const char* name, const at::Tensor& t, int64_t expected,
                 const std::string& why) {
  TORCH_CHECK_VALUE(t.numel() == expected, kPrefix, fn, ": expected ", name, " to have ", why,
                    " = ", expected, " elements, got ", t.numel());
}

// Byte ranges of two tensors must not overlap (the kernels assume distinct buffers).
void check_no_overlap(const char* fn, const char* a_name, const at::Tensor& a, const char* b_name,
                      const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return;
  const auto* a0 = static_cast<const char*>(a.data_ptr());
  const auto* b0 = static_cast<const char*>(b.data_ptr());
  const auto* a1 = a0 + a.numel() * a.element_size();
  const auto* b1 = b0 + b.numel() * b.element_size();
  TORCH_CHECK_VALUE(a1 <= b0 || b1 <= a0, kPrefix, fn, ": ", a_name, " and ", b_name,
                    " share memory; pass separate tensors (e.g. clone one of them)");
}

void check_bits(const char* fn, int64_t bits) {
  TORCH_CHECK_VALUE(bits == 8 || bits == 4 || bits == 2, kPrefix, fn,
                    ": bits must be 8, 4 or 2, got ", bits);
}

void check_block_size(const char* fn, int64_t bs) {
  TORCH_CHECK_VALUE(bs >= hypha::kMinBlockSize && bs <= hypha::kMaxBlockSize && (bs & (bs - 1)) == 0,
                    kPrefix, fn, ": block_size must be a power of two in [", hypha::kMinBlockSize,
                    ", ", hypha::kMaxBlockSize, "], got ", bs);
}

// A Python int in [0, limit] (limit = 2^32-1 for key, 2^64-1 for offset).
uint64_t to_uint(const char* fn, const char* name, const py::handle& obj, uint64_t limit,
                 const char* range) {
  PyObject* o = obj.ptr();
  TORCH_CHECK_TYPE(PyLong_Check(o) && !PyBool_Check(o), kPrefix, fn, ": expected ", name,
                   " to be an int in ", range, ", got ",
                   std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow == 0 && v == -1 && PyErr_Occurred()) throw py::error_already_set();
  bool ok = false;
  uint64_t u = 0;
  if (overflow == 0) {
    ok = v >= 0 && static_cast<uint64_t>(v) <= limit;
    u = static_cast<uint64_t>(v);
  } else if (overflow > 0) {
    const unsigned long long w = PyLong_AsUnsignedLongLong(o);
    if (w == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();  // larger than 2^64 - 1
    } else {
      ok = static_cast<uint64_t>(w) <= limit;
      u = static_cast<uint64_t>(w);
    }
  }
  TORCH_CHECK_VALUE(ok, kPrefix, fn, ": ", name, " must be in ", range, ", got ",
                    std::string(py::str(obj)));
  return u;
}

hypha::QuantParams make_params(const char* fn, int64_t bits, int64_t block_size, bool stochastic,
                               const py::object& key, const py::object& offset) {
  check_bits(fn, bits);
  check_block_size(fn, block_size);
  hypha::QuantParams p;
  p.bits = static_cast<int>(bits);
  p.block_size = block_size;
  p.stochastic = stochastic;
  p.key = static_cast<uint32_t>(to_uint(fn, "key", key, 0xFFFFFFFFull, "[0, 2**32)"));
  p.offset = to_uint(fn, "offset", offset, ~0ull, "[0, 2**64)");
  return p;
}

// codes / scales of a quantized tensor of n elements.
void check_q(const char* fn, const at::Tensor& codes, const at::Tensor& scales, int64_t n,
             int64_t bits, int64_t block_size, bool codes_out) {
  check_tensor(fn, "codes", codes, at::kByte, codes_out);
  check_tensor(fn, "scales", scales, at::kFloat, codes_out);
  check_same_device(fn, "scales", scales, "codes", codes);
  check_numel(fn, "codes", codes, hypha::packed_nbytes(n, static_cast<int>(bits)),
              "packed_nbytes(numel=" + std::to_string(n) + ", bits=" + std::to_string(bits) +
                  ")");
  check_numel(fn, "scales", scales, hypha::num_blocks(n, block_size),
              "num_blocks(numel=" + std::to_string(n) + ", block_size=" +
                  std::to_string(block_size) + ")");
}

// CPU always; CUDA when built with it. Checked before anything touches the data.
void check_device_supported(const char* fn, const at::Device& d) {
  if (d.is_cpu()) return;
#if defined(HYPHA_WITH_CUDA)
  TORCH_CHECK_VALUE(d.is_cuda(), kPrefix, fn, ": tensors on ", d,
                    " are not supported; use CPU or CUDA tensors");
#else
  TORCH_CHECK(!d.is_cuda(), kPrefix, fn, ": got CUDA tensors, but hypha._C was built without "
              "CUDA support. Rebuild it with a CUDA toolkit and a CUDA build of torch (and "
              "without HYPHA_SKIP_CUDA=1), use backend=\"triton\" or \"reference\", or move the "
              "tensors to the CPU.");
  TORCH_CHECK_VALUE(false, kPrefix, fn, ": tensors on ", d,
                    " are not supported; use CPU tensors");
#endif
}

#if defined(HYPHA_WITH_CUDA)
void check_cuda(const char* fn, int err) {
  TORCH_CHECK(err == 0, kPrefix, fn, ": CUDA kernel failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}
void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

template <class T>
const T* cptr(const at::Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}
template <class T>
T* mptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// --- ops -----------------------------------------------------------------------------------------

void quantize(const at::Tensor& x, int64_t bits, int64_t block_size, bool stochastic,
              const py::object& key, const py::object& offset, const at::Tensor& codes,
              const at::Tensor& scales) {
  constexpr const char* fn = "quantize";
  const hypha::QuantParams p = make_params(fn, bits, block_size, stochastic, key, offset);
  check_tensor(fn, "x", x, at::kFloat, false);
  const int64_t n = x.numel();
  check_q(fn, codes, scales, n, bits, block_size, true);
  check_same_device(fn, "codes", codes, "x", x);
  check_device_supported(fn, x.device());
  check_no_overlap(fn, "codes", codes, "x", x);
  check_no_overlap(fn, "scales", scales, "x", x);
  check_no_overlap(fn, "codes", codes, "scales", scales);
  if (n == 0) return;
  const at::Device dev = x.device();
  if (dev.is_cpu()) {
    py::gil_scoped_release nogil;
    hypha::cpu::quantize(cptr<float>(x), n, p, mptr<uint8_t>(codes), mptr<float>(scales));
    return;
  }
#if defined(HYPHA_WITH_CUDA)
  if (dev.is_cuda()) {
    const c10::cuda::CUDAGuard guard(dev);
    int err = 0;
    {
      py::gil_scoped_release nogil;
      err = hypha::cuda::quantize(cptr<float>(x), n, p, mptr<uint8_t>(codes), mptr<float>(scales),
                                  current_stream());
    }
    check_cuda(fn, err);
    return;
  }
#endif
  TORCH_CHECK(false, kPrefix, fn, ": unreachable device ", dev);
}

void dequantize_impl(const char* fn, const char* out_name, const at::Tensor& codes,
                     const at::Tensor& scales, int64_t numel, int64_t bits, int64_t block_size,
                     const at::Tensor& out, bool accumulate) {
  check_bits(fn, bits);
  check_block_size(fn, block_size);
  TORCH_CHECK_VALUE(numel >= 0, kPrefix, fn, ": numel must be >= 0, got ", numel);
  check_q(fn, codes, scales, numel, bits, block_size, false);
  check_tensor(fn, out_name, out, at::kFloat, true);
  check_same_device(fn, out_name, out, "codes", codes);
  check_numel(fn, out_name, out, numel, "numel");
  check_device_supported(fn, out.device());
  check_no_overlap(fn, out_name, out, "codes", codes);
  check_no_overlap(fn, out_name, out, "scales", scales);
  if (numel == 0) return;
  const int b = static_cast<int>(bits);
  const at::Device dev = out.device();
  if (dev.is_cpu()) {
    py::gil_scoped_release nogil;
    if (accumulate) {
      hypha::cpu::dequantize_accumulate(cptr<uint8_t>(codes), cptr<float>(scales), numel, b,
                                        block_size, mptr<float>(out));
    } else {
      hypha::cpu::dequantize(cptr<uint8_t>(codes), cptr<float>(scales), numel, b, block_size,
                             mptr<float>(out));
    }
    return;
  }
#if defined(HYPHA_WITH_CUDA)
  if (dev.is_cuda()) {
    const c10::cuda::CUDAGuard guard(dev);
    int err = 0;
    {
      py::gil_scoped_release nogil;
      err = accumulate ? hypha::cuda::dequantize_accumulate(cptr<uint8_t>(codes),
                                                            cptr<float>(scales), numel, b,
                                                            block_size, mptr<float>(out),
                                                            current_stream())
                       : hypha::cuda::dequantize(cptr<uint8_t>(codes), cptr<float>(scales),
                                                 numel, b, block_size, mptr<float>(out),
                                                 current_stream());
    }
    check_cuda(fn, err);
    return;
  }
#endif
  TORCH_CHECK(false, kPrefix, fn, ": unreachable device ", dev);
}

void dequantize(const at::Tensor& codes, const at::Tensor& scales, int64_t numel, int64_t bits,
                int64_t block_size, const at::Tensor& out) {
  dequantize_impl("dequantize", "out", codes, scales, numel, bits, block_size, out, false);
}

void dequantize_accumulate(const at::Tensor& codes, const at::Tensor& scales, int64_t numel,
                           int64_t bits, int64_t block_size, const at::Tensor& acc) {
  dequantize_impl("dequantize_accumulate", "acc", codes, scales, numel, bits, block_size, acc,
                  true);
}

void encode_delta(const at::Tensor& global, const std::optional<at::Tensor>& local,
                  const std::optional<at::Tensor>& ef, int64_t bits, int64_t block_size,
                  bool stochastic, const py::object& key, const py::object& offset,
                  const at::Tensor& codes, const at::Tensor& scales) {
  constexpr const char* fn = "encode_delta";
  const hypha::QuantParams p = make_params(fn, bits, block_size, stochastic, key, offset);
  check_tensor(fn, "global_", global, at::kFloat, false);
  const int64_t n = global.numel();
  const at::Tensor* l = local.has_value() ? &*local : nullptr;
  const at::Tensor* e = ef.has_value() ? &*ef : nullptr;
  if (l != nullptr) {
    check_tensor(fn, "local", *l, at::kFloat, false);
    check_same_device(fn, "local", *l, "global_", global);
    check_numel(fn, "local", *l, n, "global_.numel()");
  }
  if (e != nullptr) {
    check_tensor(fn, "error_feedback", *e, at::kFloat, true);
    check_same_device(fn, "error_feedback", *e, "global_", global);
    check_numel(fn, "error_feedback", *e, n, "global_.numel()");
  }
  check_q(fn, codes, scales, n, bits, block_size, true);
  check_same_device(fn, "codes", codes, "global_", global);
  check_device_supported(fn, global.device());
  if (e != nullptr) {
    check_no_overlap(fn, "error_feedback", *e, "global_", global);
    if (l != nullptr) check_no_overlap(fn, "error_feedback", *e, "local", *l);
  }
  check_no_overlap(fn, "codes", codes, "scales", scales);
  for (const at::Tensor* in : {&global, l, e}) {
    if (in == nullptr) continue;
    check_no_overlap(fn, "codes", codes, "an input", *in);
    check_no_overlap(fn, "scales", scales, "an input", *in);
  }
  if (n == 0) return;
  const float* lp = l != nullptr ? cptr<float>(*l) : nullptr;
  float* ep = e != nullptr ? mptr<float>(*e) : nullptr;
  const at::Device dev = global.device();
  if (dev.is_cpu()) {
    py::gil_scoped_release nogil;
    hypha::cpu::encode_delta(cptr<float>(global), lp, ep, n, p, mptr<uint8_t>(codes),
                             mptr<float>(scales));
    return;
  }
#if defined(HYPHA_WITH_CUDA)
  if (dev.is_cuda()) {
    const c10::cuda::CUDAGuard guard(dev);
    int err = 0;
    {
      py::gil_scoped_release nogil;
      err = hypha::cuda::encode_delta(cptr<float>(global), lp, ep, n, p, mptr<uint8_t>(codes),
                                      mptr<float>(scales), current_stream());
    }
    check_cuda(fn, err);
    return;
  }
#endif
  TORCH_CHECK(false, kPrefix, fn, ": unreachable device ", dev);
}

void nesterov(const at::Tensor& param, const at::Tensor& momentum, const at::Tensor& grad,
              double lr, double mu) {
  constexpr const char* fn = "nesterov";
  check_tensor(fn, "param", param, at::kFloat, true);
  check_tensor(fn, "momentum", momentum, at::kFloat, true);
  check_tensor(fn, "grad", grad, at::kFloat, false);
  check_same_device(fn, "momentum", momentum, "param", param);
  check_same_device(fn, "grad", grad, "param", param);
  const int64_t n = param.numel();
  check_numel(fn, "momentum", momentum, n, "param.numel()");
  check_numel(fn, "grad", grad, n, "param.numel()");
  check_device_supported(fn, param.device());
  check_no_overlap(fn, "param", param, "momentum", momentum);
  check_no_overlap(fn, "param", param, "grad", grad);
  check_no_overlap(fn, "momentum", momentum, "grad", grad);
  // The reference rounds lr and mu to fp32 first (round to nearest, as a C++ cast does).
  const auto lr32 = static_cast<float>(lr);
  const auto mu32 = static_cast<float>(mu);
  if (n == 0) return;
  const at::Device dev = param.device();
  if (dev.is_cpu()) {
    py::gil_scoped_release nogil;
    hypha::cpu::nesterov(mptr<float>(param), mptr<float>(momentum), cptr<float>(grad), n, lr32,
                         mu32);
    return;
  }
#if defined(HYPHA_WITH_CUDA)
  if (dev.is_cuda()) {
    const c10::cuda::CUDAGuard guard(dev);
    int err = 0;
    {
      py::gil_scoped_release nogil;
      err = hypha::cuda::nesterov(mptr<float>(param), mptr<float>(momentum), cptr<float>(grad), n,
                                  lr32, mu32, current_stream());
    }
    check_cuda(fn, err);
    return;
  }
#endif
  TORCH_CHECK(false, kPrefix, fn, ": unreachable device ", dev);
}

bool has_cuda() {
#if defined(HYPHA_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

std::string set_simd_path(const std::string& name) {
  std::string previous = hypha::cpu::simd_path();
  if (!hypha::cpu::detail::set_simd_path(name)) {
    std::ostringstream s;
    for (const auto& p : hypha::cpu::detail::supported_simd_paths()) s << " " << p;
    TORCH_CHECK_VALUE(false, kPrefix, "_set_simd_path: ", name,
                      " is not supported here; available:", s.str());
  }
  return previous;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Hypha compression kernels (C++ CPU, and CUDA when built with it). Call them through "
            "hypha.ops, which allocates outputs and checks arguments.";
  m.def("quantize", &quantize, py::arg("x"), py::arg("bits"), py::arg("block_size"),
        py::arg("stochastic"), py::arg("key"), py::arg("offset"), py::arg("codes"),
        py::arg("scales"),
        "codes/scales <- blockwise quantize(x); key = seed_key(seed), offset = stream index of "
        "x[0].");
  m.def("dequantize", &dequantize, py::arg("codes"), py::arg("scales"), py::arg("numel"),
        py::arg("bits"), py::arg("block_size"), py::arg("out"),
        "out <- (code - mid) * scale, elementwise.");
  m.def("dequantize_accumulate", &dequantize_accumulate, py::arg("codes"), py::arg("scales"),
        py::arg("numel"), py::arg("bits"), py::arg("block_size"), py::arg("acc"),
        "acc <- acc + (code - mid) * scale, in place.");
  m.def("encode_delta", &encode_delta, py::arg("global_"), py::arg("local").none(true),
        py::arg("ef").none(true), py::arg("bits"), py::arg("block_size"), py::arg("stochastic"),
        py::arg("key"), py::arg("offset"), py::arg("codes"), py::arg("scales"),
        "delta = (global - local) + ef; codes/scales <- quantize(delta); ef <- delta - "
        "dequant (in place). local and ef may be None.");
  m.def("nesterov", &nesterov, py::arg("param"), py::arg("momentum"), py::arg("grad"),
        py::arg("lr"), py::arg("mu"),
        "m <- mu*m + g; p <- p - lr*(g + mu*m), in place (lr and mu rounded to fp32).");
  m.def("has_cuda", &has_cuda, "Whether this build contains the CUDA kernels.");
  m.def("simd_path", [] { return std::string(hypha::cpu::simd_path()); },
        "The CPU SIMD path in use: 'avx512', 'avx2' or 'sse2' (portable C++).");
  m.def("_simd_paths", &hypha::cpu::detail::supported_simd_paths,
        "The CPU SIMD paths this build and CPU support, narrowest first (for tests).");
  m.def("_set_simd_path", &set_simd_path, py::arg("name"),
        "Switches the CPU SIMD path (for tests and benchmarks); returns the previous one.");
}
