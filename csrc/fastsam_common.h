// Shared scalar helpers of the fastsam C++ (CPU) and CUDA kernels.
//
// Everything here is a pure function of its arguments so that the CPU and CUDA builds give the
// same bits where the spec demands it (the ESAM keep-mask) and the same rounding elsewhere:
//
// * storage conversions: bfloat16 / float16 <-> float32, round to nearest even on the way down,
//   written branch-free (selects only) so that gcc vectorizes loops that call them;
// * Philox4x32-10 (Salmon et al., SC'11), the ESAM mask function of docs/design.md section 2.5:
//     r = Philox(counter = (i mod 2^32, i div 2^32, 0, 0), key = (seed mod 2^32, step mod 2^32))[0]
//     keep iff r < floor(beta * 2^32)   (unsigned compare)
//   identical to fastsam/_philox.py and to Triton's tl.randint(step * 2^32 + seed, i).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTSAM_HD __host__ __device__ __forceinline__
#else
#define FASTSAM_HD inline __attribute__((always_inline))
#endif

namespace fastsam {

// Storage tags for the 16-bit float formats (raw bits; all math happens in float32).
struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

FASTSAM_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FASTSAM_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// bfloat16 is the upper half of a float32: widening is exact.
FASTSAM_HD float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
// Adding 0x7FFF plus the lowest kept bit rounds the 16 dropped bits half-to-even; a carry out of
// the mantissa bumps the exponent, which is the correctly rounded result (up to inf).
FASTSAM_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}

// float16 -> float32, exact for every input (normals, subnormals, zeros, inf, NaN).
FASTSAM_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7FFFu;  // exponent and mantissa
  const uint32_t exp = h & 0x7C00u;
  // normal: re-bias the exponent (127 - 15 = 112) and widen the mantissa (10 -> 23 bits)
  const uint32_t normal = (mag << 13) + (112u << 23);
  // inf / NaN: all-ones float exponent, mantissa (NaN payload) kept
  const uint32_t special = (mag << 13) | 0x7F800000u;
  // zero / subnormal: value = m * 2^-24. Reading the mantissa as the fraction of 2^-14 * (1 + m/1024)
  // and subtracting 2^-14 gives it exactly (both terms and the difference are float32-exact).
  const float sub = bits_to_f32((mag << 13) + (113u << 23)) - bits_to_f32(113u << 23);
  const uint32_t r = exp == 0x7C00u ? special : (exp == 0 ? f32_to_bits(sub) : normal);
  return bits_to_f32(r | sign);
}

// float32 -> float16, round to nearest even, overflow to inf, NaN to a quiet NaN.
FASTSAM_HD uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // |f| >= 2^16: beyond the largest finite half after rounding (65504; 65520 and up round to inf)
  const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
  // |f| < 2^-14 (half subnormal range): adding 0.5 puts the value in [0.5, 1), where the float32
  // spacing is 2^-24 = one half subnormal step, so the FPU's round-to-nearest-even does the
  // rounding; the low mantissa bits are then the half's bits (0x400 = rounded up to the smallest normal).
  const uint32_t small = f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3F000000u;
  // normal: re-bias (15 - 127) and round the 13 dropped mantissa bits half-to-even
  const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;  // 0xC8000000 = (15 - 127) << 23 mod 2^32
  const uint32_t r = a >= 0x47800000u ? big : (a < 0x38800000u ? small : normal);
  return static_cast<uint16_t>(r | sign);
}

// ------------------------------------------------------------------------------------ Philox
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers (Random123)
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // Weyl key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// First output word of Philox4x32-10 for counter (lo, hi, 0, 0) and key (k0, k1).
FASTSAM_HD uint32_t philox_word0(uint32_t lo, uint32_t hi, uint32_t k0, uint32_t k1) {
  uint32_t c0 = lo, c1 = hi, c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c0;
}

// ESAM keep bit of global element index i (threshold = floor(beta * 2^32) < 2^32).
FASTSAM_HD bool esam_keep(uint64_t i, uint32_t seed, uint32_t step, uint32_t threshold) {
  return philox_word0(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), seed, step) < threshold;
}

}  // namespace fastsam
