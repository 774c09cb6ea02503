// Shared helpers of the CPU kernels of fastgrpo._C: element types, block loads/stores in float32, a
// vectorisable exp, and the per-ISA clones of the hot loops.
//
// The kernel files include only this header (no torch headers: they compile in seconds); csrc/bindings.cpp turns
// tensors into raw pointers. Every kernel works on blocks: a block of a row is converted to float32 in a small
// buffer on the stack (a no-op view for float32 inputs), and the arithmetic runs on plain float arrays in loops
// without branches, which the compiler vectorises. Reductions are `#pragma omp simd reduction` loops: OpenMP
// allows the vector lanes to be summed separately (no -ffast-math needed), in an order fixed at compile time, so
// results do not depend on the number of threads.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace fastgrpo {

// float64 is accepted like the Triton kernels do: read and converted to float32, gradients written back.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

constexpr int BLOCK = 1024;  // elements per float32 staging block: 4 KiB, stays in L1 beside its peers

// A read-only array of some element type.
struct In {
  const void* ptr = nullptr;
  DType dtype = DType::F32;
  bool present() const { return ptr != nullptr; }
};

inline size_t element_size(DType d) { return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2; }

// Float32 view of elements [off, off + n) of `a`: the array itself for float32, else converted into `buf`.
inline const float* load_block(const In& a, int64_t off, int n, float* buf) {
  switch (a.dtype) {
    case DType::F32:
      return static_cast<const float*>(a.ptr) + off;
    case DType::F16: {
      const c10::Half* p = static_cast<const c10::Half*>(a.ptr) + off;
      for (int i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
      return buf;
    }
    case DType::BF16: {
      const c10::BFloat16* p = static_cast<const c10::BFloat16*>(a.ptr) + off;
      for (int i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
      return buf;
    }
    case DType::F64: {
      const double* p = static_cast<const double*>(a.ptr) + off;
      for (int i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
      return buf;
    }
  }
  return buf;
}

// Write n float32 values into elements [off, off + n) of `out`, rounding to its type (round to nearest even,
// as torch's .to(dtype)).
inline void store_block(void* out, DType dtype, int64_t off, int n, const float* src) {
  switch (dtype) {
    case DType::F32:
      std::memcpy(static_cast<float*>(out) + off, src, sizeof(float) * n);
      return;
    case DType::F16: {
      c10::Half* p = static_cast<c10::Half*>(out) + off;
      for (int i = 0; i < n; ++i) p[i] = c10::Half(src[i]);
      return;
    }
    case DType::BF16: {
      c10::BFloat16* p = static_cast<c10::BFloat16*>(out) + off;
      for (int i = 0; i < n; ++i) p[i] = c10::BFloat16(src[i]);
      return;
    }
    case DType::F64: {
      double* p = static_cast<double*>(out) + off;
      for (int i = 0; i < n; ++i) p[i] = src[i];
      return;
    }
  }
}

// exp(x) in float32 without libm, so that loops calling it vectorise.
//
// Textbook range reduction (e.g. J.-M. Muller, "Elementary Functions", ch. 11): x = n ln2 + r with
// n = round(x / ln2) and |r| <= ln2 / 2, exp(x) = 2^n exp(r). ln2 is split in a high part with few significant
// bits (n * LN2_HI is exact for |n| < 2^8) and a low part (Cody and Waite), so r is accurate to float rounding.
// exp(r) is its Taylor series to degree 7: the truncation error is below (ln2/2)^8 / 8! ~ 5e-9, under one float
// ulp. Rounding adds a few ulps at most. Results below FLT_MIN (x < -87) are flushed to 0, which never matters
// next to the terms a softmax keeps (the largest is exp(0) = 1); x = -inf gives exactly 0, x > 88.7 gives inf,
// NaN gives NaN.
inline float exp_f32(float x) {
  constexpr float LOG2E = 1.44269504088896341f;
  constexpr float LN2_HI = 0.693145751953125f;     // ln2 rounded to 16 significant bits
  constexpr float LN2_LO = 1.42860682030941723e-6f;  // ln2 - LN2_HI
  constexpr float ROUND = 12582912.0f;              // 1.5 * 2^23: adding and subtracting it rounds to an integer
  float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float n = (xc * LOG2E + ROUND) - ROUND;
  float r = (xc - n * LN2_HI) - n * LN2_LO;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < -87.0f ? 0.0f : y;
  y = x > 88.72f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

}  // namespace fastgrpo

// Hot loops are compiled twice on x86-64 with GCC -- for AVX2+FMA (x86-64-v3) and for the baseline -- and the
// loader picks the clone the CPU supports at run time, so one build is both fast and portable (a build cache may
// be shared by machines). Elsewhere (clang, ARM) they are compiled once for the target.
// (-DFASTGRPO_HOT= builds one version, for the target of -march: fastgrpo/_ext.py passes it with the ISA builds,
// FASTGRPO_CPU_ISA=avx512/avx2/native; the portable generic build keeps the clones.)
#ifndef FASTGRPO_HOT
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTGRPO_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTGRPO_HOT
#endif
#endif
