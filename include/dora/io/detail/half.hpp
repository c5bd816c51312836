// Bit-exact conversions between IEEE binary16 (F16), bfloat16 (BF16) and float/double.
//
// Decoding is exact (every F16 and BF16 value is a float). Encoding starts from double so that
// double -> half rounds once; going through float first would round twice and can be off by one
// ulp on ties. Rounding is to nearest, ties to even, with overflow to infinity and gradual
// underflow to subnormals, as the hardware conversions and torch do.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dora::io::detail {

template <typename To, typename From>
inline To bit_cast(const From& from) noexcept {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// One encoder for both 16-bit formats: they differ only in mantissa width and exponent bias.
template <int MantBits, int Bias>
inline std::uint16_t encode_half(double x) noexcept {
  constexpr int kExpBits = 15 - MantBits;
  constexpr std::uint16_t kExpMask = static_cast<std::uint16_t>(((1u << kExpBits) - 1u) << MantBits);
  constexpr int kMinNormalExp = 1 - Bias;
  constexpr int kDropBits = 52 - MantBits;  // double mantissa bits that do not fit

  const std::uint64_t bits = bit_cast<std::uint64_t>(x);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 48) & 0x8000u);
  const int biased = static_cast<int>((bits >> 52) & 0x7ffu);
  const std::uint64_t mant = bits & ((std::uint64_t{1} << 52) - 1u);

  if (biased == 0x7ff) {
    if (mant == 0) return static_cast<std::uint16_t>(sign | kExpMask);  // infinity
    // Keep the top payload bits and force the quiet bit so a NaN can never become infinity.
    const std::uint16_t payload = static_cast<std::uint16_t>(mant >> kDropBits);
    return static_cast<std::uint16_t>(sign | kExpMask | (1u << (MantBits - 1)) | payload);
  }
  if (biased == 0) return sign;  // double zero or subnormal: far below half the smallest subnormal

  const int e = biased - 1023;
  if (e > Bias) return static_cast<std::uint16_t>(sign | kExpMask);  // >= 2^(Bias+1): overflow
  // Below half of the smallest subnormal (2^(kMinNormalExp - MantBits - 1)) everything rounds to
  // zero; exactly half is a tie that rounds to the even value, zero, and is handled below.
  if (e < kMinNormalExp - MantBits - 1) return sign;

  const std::uint64_t sig = mant | (std::uint64_t{1} << 52);
  const int shift = e >= kMinNormalExp ? kDropBits : kDropBits + (kMinNormalExp - e);  // <= 53
  std::uint64_t q = sig >> shift;
  const std::uint64_t rem = sig & ((std::uint64_t{1} << shift) - 1u);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;

  if (e < kMinNormalExp) {
    // q <= 2^MantBits; q == 2^MantBits is the smallest normal, whose encoding is exactly q.
    return static_cast<std::uint16_t>(sign | q);
  }
  // q is in [2^MantBits, 2^(MantBits+1)]; adding it to (exponent - 1) lets a rounding carry bump
  // the exponent, and a carry out of the largest finite binade lands exactly on infinity.
  const std::uint64_t enc = (static_cast<std::uint64_t>(e - kMinNormalExp) << MantBits) + q;
  return static_cast<std::uint16_t>(sign | enc);
}

inline std::uint16_t double_to_f16(double x) noexcept { return encode_half<10, 15>(x); }
inline std::uint16_t double_to_bf16(double x) noexcept { return encode_half<7, 127>(x); }
// float -> double is exact, so these round once as well.
inline std::uint16_t float_to_f16(float x) noexcept { return double_to_f16(static_cast<double>(x)); }
inline std::uint16_t float_to_bf16(float x) noexcept { return double_to_bf16(static_cast<double>(x)); }

inline float f16_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bit_cast<float>(sign | 0x7f800000u | (mant << 13));       // inf, NaN (payload kept)
  if (exp != 0) return bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));  // rebias 15 -> 127
  // Subnormal (or zero): mant * 2^-24 is exact in float.
  const float mag = std::ldexp(static_cast<float>(mant), -24);
  return sign ? -mag : mag;
}

inline float bf16_to_float(std::uint16_t h) noexcept {
  // bfloat16 is the top half of a float by construction.
  return bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

}  // namespace dora::io::detail
