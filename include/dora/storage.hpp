#pragma once
/// \file storage.hpp
/// Frozen weights stored in a narrower type than the layer computes in: bfloat16, float16, or
/// GGML's block formats Q8_0 (8 bits) and Q4_0 (4 bits). The layer borrows the stored W as it is (a memory-mapped
/// checkpoint's bf16 tensor, a quantized buffer) and never forms a dense dequantized copy: its
/// products with W dequantize one tile of rows at a time into a small per-thread buffer
/// (detail/stored_product.hpp), and ||W_i||^2 is taken once from the stored values.
///
/// Q8_0 (GGML's `block_q8_0`, ggml-common.h): each row of W is cut into blocks of 32 consecutive
/// entries; a block is 34 bytes, an IEEE half scale d followed by 32 signed bytes q, and encodes
/// w_j = d * q_j. A row of d_in entries is d_in / 32 blocks (d_in must be a multiple of 32), rows
/// follow each other. Quantizing (quantize_q8_0, GGML's quantize_row_q8_0_ref): per block,
/// amax = max |w_j|, d = amax / 127, q_j = round(w_j / d) to nearest with ties away from zero
/// (std::round), 0 when amax = 0; d is then stored rounded to half. So |w_j - d q_j| <=
/// d / 2 + 127 |d - half(d)| <= amax (1/254 + 2^-11 127/127) per entry.
///
/// Q4_0 (GGML's `block_q4_0`): blocks of 32 entries too, 18 bytes: a half scale d, then 16 bytes
/// whose low nibbles hold q_0..q_15 and high nibbles q_16..q_31 (unsigned, 0..15), encoding
/// w_j = d (q_j - 8). Quantizing (quantize_q4_0, GGML's quantize_row_q4_0_ref): per block, the
/// entry of largest magnitude, max (its sign kept), gives d = max / -8; q_j = min(15, trunc(w_j / d
/// + 8.5)). So max itself is exact (q = 0) and the range [-8, 7] d is used in full on its side; an
/// entry of the other sign within amax/16 of -max clamps to q = 15. Per entry |w_j - half(d) (q_j - 8)|
/// <= amax / 16 + 8 |d - half(d)|, and <= amax / 8 + ... for the clamped ones: <= amax (1/8 + 2^-11).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "detail/check.hpp"
#include "detail/eigen.hpp"

namespace dora {

using bfloat16 = Eigen::bfloat16;
using float16 = Eigen::half;

/// One GGML Q8_0 block: 32 weights w_j = d * q_j. Binary layout as GGML's block_q8_0 (34 bytes).
struct BlockQ8_0 {
  static constexpr int kSize = 32;
  float16 d;
  std::int8_t q[kSize];
};
static_assert(sizeof(BlockQ8_0) == 34, "BlockQ8_0 must have GGML's 34-byte layout");

/// One GGML Q4_0 block: 32 weights w_j = d * (q_j - 8), q_j in 0..15, two to a byte (q_j in the
/// low nibble of qs[j], q_{j+16} in its high nibble). Binary layout as GGML's block_q4_0 (18 bytes).
struct BlockQ4_0 {
  static constexpr int kSize = 32;
  float16 d;
  std::uint8_t qs[kSize / 2];
};
static_assert(sizeof(BlockQ4_0) == 18, "BlockQ4_0 must have GGML's 18-byte layout");
static_assert(sizeof(bfloat16) == 2 && sizeof(float16) == 2, "Eigen's 16-bit types must be 2 bytes");

namespace detail {

/// What the layers need of a storage format: its name, how many weights one stored element holds
/// (a block), and dequantizing a run of whole elements into the compute type.
template <typename Storage>
struct StorageTraits;

template <>
struct StorageTraits<bfloat16> {
  static constexpr const char* name = "bf16";
  static constexpr Eigen::Index block = 1;
  template <typename Scalar>
  static void dequantize(const bfloat16* src, Eigen::Index count, Scalar* dst) {
    // bf16 is the top half of a float: the widening is a shift, exact. Written on the raw bits so
    // that the compiler vectorizes it (Eigen's bfloat16 -> float cast is twice as slow here).
    for (Eigen::Index j = 0; j < count; ++j) {
      std::uint16_t half = 0;
      std::memcpy(&half, src + j, sizeof half);
      const std::uint32_t word = static_cast<std::uint32_t>(half) << 16;
      float f = 0.0f;
      std::memcpy(&f, &word, sizeof f);
      dst[j] = static_cast<Scalar>(f);
    }
  }
};

template <>
struct StorageTraits<float16> {
  static constexpr const char* name = "f16";
  static constexpr Eigen::Index block = 1;
  template <typename Scalar>
  static void dequantize(const float16* src, Eigen::Index count, Scalar* dst) {
    // Exact, on the raw bits, so that it vectorizes on any x86-64 (Eigen's cast is scalar without
    // F16C): the 15 exponent-and-mantissa bits shifted into a float's place encode the value
    // times 2^-112, normal and subnormal halves alike, so one multiply by 2^112 gives it; inf and
    // NaN keep an all-ones exponent. One unconditional copy of the bits (GCC warned of an
    // uninitialised float when the copy was in a branch).
    for (Eigen::Index j = 0; j < count; ++j) {
      std::uint16_t h = 0;
      std::memcpy(&h, src + j, sizeof h);
      const std::uint32_t shifted = static_cast<std::uint32_t>(h & 0x7fffu) << 13;
      const bool special = shifted >= (0x7c00u << 13);  // inf or NaN
      const std::uint32_t word = special ? (shifted | 0x7f800000u) : shifted;
      float f = 0.0f;
      std::memcpy(&f, &word, sizeof f);
      f = special ? f : f * 0x1p112f;
      dst[j] = static_cast<Scalar>((h & 0x8000u) != 0 ? -f : f);
    }
  }
};

template <>
struct StorageTraits<BlockQ8_0> {
  static constexpr const char* name = "q8_0";
  static constexpr Eigen::Index block = BlockQ8_0::kSize;
  template <typename Scalar>
  static void dequantize(const BlockQ8_0* src, Eigen::Index blocks, Scalar* dst) {
    for (Eigen::Index b = 0; b < blocks; ++b) {
      const Scalar d = static_cast<Scalar>(static_cast<float>(src[b].d));
      Scalar* out = dst + b * BlockQ8_0::kSize;
      for (int j = 0; j < BlockQ8_0::kSize; ++j) out[j] = d * static_cast<Scalar>(src[b].q[j]);
    }
  }
};

template <>
struct StorageTraits<BlockQ4_0> {
  static constexpr const char* name = "q4_0";
  static constexpr Eigen::Index block = BlockQ4_0::kSize;
  template <typename Scalar>
  static void dequantize(const BlockQ4_0* src, Eigen::Index blocks, Scalar* dst) {
    // d has 11 significant bits and q - 8 four: every product is exact in float. The nibble goes
    // into the low mantissa bits of 2^23 (the float 2^23 + q), and subtracting 2^23 + 8 gives
    // q - 8 exactly: integer ops and one float subtraction, which vectorize on any x86-64 (the
    // nibble -> int -> float conversion ran 3.4x slower with AVX-512 and 3.8x with SSE2, GCC 12).
    constexpr int half = BlockQ4_0::kSize / 2;
    for (Eigen::Index b = 0; b < blocks; ++b) {
      const Scalar d = static_cast<Scalar>(static_cast<float>(src[b].d));
      std::uint8_t qs[half];
      std::memcpy(qs, src[b].qs, sizeof qs);
      std::uint32_t words[BlockQ4_0::kSize];
      for (int j = 0; j < half; ++j) {
        words[j] = 0x4b000000u | (qs[j] & 0x0fu);
        words[j + half] = 0x4b000000u | (qs[j] >> 4);
      }
      float values[BlockQ4_0::kSize];
      std::memcpy(values, words, sizeof values);
      Scalar* out = dst + b * BlockQ4_0::kSize;
      for (int j = 0; j < BlockQ4_0::kSize; ++j) out[j] = d * static_cast<Scalar>(values[j] - 8388616.0f);
    }
  }
};

template <typename Storage>
constexpr bool is_stored_format() {
  return std::is_same<Storage, bfloat16>::value || std::is_same<Storage, float16>::value ||
         std::is_same<Storage, BlockQ8_0>::value || std::is_same<Storage, BlockQ4_0>::value;
}

/// The format's name for messages ("bf16", ...; the compute type's for a W stored as it).
template <typename Storage>
constexpr const char* storage_name() {
  if constexpr (is_stored_format<Storage>())
    return StorageTraits<Storage>::name;
  else
    return std::is_same<Storage, double>::value ? "double" : "float";
}

/// Weights per stored element: 32 for Q8_0, else 1 (also for W stored as the compute type).
template <typename Storage>
constexpr Eigen::Index storage_block() {
  if constexpr (is_stored_format<Storage>())
    return StorageTraits<Storage>::block;
  else
    return 1;
}

}  // namespace detail

/// A borrowed d_out x d_in weight in a stored format: row i starts at data + i * row_stride
/// (row_stride counted in stored elements: values for bf16/f16, blocks for Q8_0 and Q4_0).
template <typename Storage>
struct StoredWeight {
  static_assert(detail::is_stored_format<Storage>(),
                "dora: stored weights are bfloat16, float16, BlockQ8_0 or BlockQ4_0");
  using Traits = detail::StorageTraits<Storage>;

  StoredWeight(const Storage* data_, Eigen::Index d_out, Eigen::Index d_in, Eigen::Index row_stride_)
      : data(data_), rows_(d_out), cols_(d_in), row_stride(row_stride_) {
    DORA_CHECK_ARG(d_out >= 1 && d_in >= 1, "base weight must be non-empty, got ", d_out, " x ", d_in);
    DORA_CHECK_ARG(data_ != nullptr, "base weight data is null");
    DORA_CHECK_ARG(d_in % Traits::block == 0, "a ", Traits::name, " weight needs d_in a multiple of ", Traits::block,
                   " (its block size), got ", d_out, " x ", d_in);
    DORA_CHECK_ARG(row_stride_ >= d_in / Traits::block, "base weight row stride ", row_stride_, " is less than the ",
                   d_in / Traits::block, " stored elements of a row (", Traits::name, ", d_in ", d_in, ")");
  }

  Eigen::Index rows() const { return rows_; }
  Eigen::Index cols() const { return cols_; }
  /// Bytes of the stored W (what the checkpoint holds), row padding excluded.
  std::size_t bytes() const {
    return static_cast<std::size_t>(rows_) * static_cast<std::size_t>(cols_ / Traits::block) * sizeof(Storage);
  }

  /// Dequantizes rows [row, row + count) x columns [col, col + cols) into dst (row-major, leading
  /// dimension ld). col and cols must be multiples of the block size.
  template <typename Scalar>
  void dequantize(Eigen::Index row, Eigen::Index count, Eigen::Index col, Eigen::Index cols, Scalar* dst,
                  Eigen::Index ld) const {
    for (Eigen::Index i = 0; i < count; ++i)
      Traits::dequantize(data + (row + i) * row_stride + col / Traits::block, cols / Traits::block, dst + i * ld);
  }

  /// Rows [begin, begin + count), in place.
  StoredWeight middle_rows(Eigen::Index begin, Eigen::Index count) const {
    return StoredWeight(data + begin * row_stride, count, cols_, row_stride);
  }
  /// Rows first, first + step, first + 2 step, ... (count of them), in place.
  StoredWeight strided_rows(Eigen::Index first, Eigen::Index step, Eigen::Index count) const {
    return StoredWeight(data + first * row_stride, count, cols_, step * row_stride);
  }

  const Storage* data;

 private:
  Eigen::Index rows_, cols_;

 public:
  Eigen::Index row_stride;
};

/// Rounds a float (or double) W to bf16 / f16 (round to nearest even, Eigen's conversions).
template <typename Storage, typename Derived>
Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> round_weight(
    const Eigen::MatrixBase<Derived>& W) {
  static_assert(
      std::is_same<Storage, bfloat16>::value || std::is_same<Storage, float16>::value,
      "dora: round_weight makes bf16 or f16; quantize_q8_0 / quantize_q4_0 (or encode_weight) the block formats");
  return W.template cast<float>().template cast<Storage>();
}

namespace detail {
/// Quantizes W block by block: quantize(x, block) fills one block from 32 floats.
template <typename Block, typename Derived, typename QuantizeBlock>
std::vector<Block> quantize_blocks(const Eigen::MatrixBase<Derived>& W, const char* what, QuantizeBlock&& quantize) {
  const Eigen::Index d_out = W.rows(), d_in = W.cols(), per_row = d_in / Block::kSize;
  DORA_CHECK_ARG(d_in % Block::kSize == 0 && d_in > 0 && d_out > 0, what, ": W must have a positive multiple of ",
                 Block::kSize, " columns, got ", d_out, " x ", d_in);
  std::vector<Block> out(static_cast<std::size_t>(d_out * per_row));
  float x[Block::kSize];
  for (Eigen::Index i = 0; i < d_out; ++i) {
    for (Eigen::Index b = 0; b < per_row; ++b) {
      for (int j = 0; j < Block::kSize; ++j) {
        x[j] = static_cast<float>(W(i, b * Block::kSize + j));
        DORA_CHECK_ARG(std::isfinite(x[j]), what, ": W(", i, ", ", b * Block::kSize + j, ") is not finite");
      }
      Block& block = out[static_cast<std::size_t>(i * per_row + b)];
      quantize(x, block);
      DORA_CHECK_ARG(std::isfinite(static_cast<float>(block.d)), what, ": the scale of row ", i, "'s block ", b,
                     " overflows a half (the block's largest |w| is too large for this format)");
    }
  }
  return out;
}
}  // namespace detail

/// Quantizes W (d_out x d_in, d_in a multiple of 32) to Q8_0 as GGML's quantize_row_q8_0_ref does
/// (see the file comment); rows follow each other, d_in / 32 blocks each.
template <typename Derived>
std::vector<BlockQ8_0> quantize_q8_0(const Eigen::MatrixBase<Derived>& W) {
  return detail::quantize_blocks<BlockQ8_0>(W, "quantize_q8_0", [](const float* x, BlockQ8_0& block) {
    float amax = 0.0f;
    for (int j = 0; j < BlockQ8_0::kSize; ++j) amax = std::max(amax, std::abs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    block.d = float16(d);
    for (int j = 0; j < BlockQ8_0::kSize; ++j) block.q[j] = static_cast<std::int8_t>(std::round(x[j] * id));
  });
}

/// Quantizes W (d_out x d_in, d_in a multiple of 32) to Q4_0 as GGML's quantize_row_q4_0_ref does
/// (see the file comment); rows follow each other, d_in / 32 blocks each.
template <typename Derived>
std::vector<BlockQ4_0> quantize_q4_0(const Eigen::MatrixBase<Derived>& W) {
  return detail::quantize_blocks<BlockQ4_0>(W, "quantize_q4_0", [](const float* x, BlockQ4_0& block) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < BlockQ4_0::kSize; ++j) {
      if (amax < std::abs(x[j])) {
        amax = std::abs(x[j]);
        max = x[j];
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    block.d = float16(d);
    constexpr int half = BlockQ4_0::kSize / 2;
    for (int j = 0; j < half; ++j) {
      // GGML truncates toward zero (a C cast) after adding 8.5: round half up on [0, 16], then clamps.
      const float x0 = x[j] * id, x1 = x[j + half] * id;
      const int lo = std::min(15, static_cast<int>(static_cast<std::int8_t>(x0 + 8.5f)));
      const int hi = std::min(15, static_cast<int>(static_cast<std::int8_t>(x1 + 8.5f)));
      block.qs[j] = static_cast<std::uint8_t>(lo | (hi << 4));
    }
  });
}

/// W in any stored format, rows following each other: bf16 / f16 rounded to nearest even, Q8_0 and
/// Q4_0 quantized as GGML does. Borrow the result with borrow<Scalar>(stored, d_out, d_in).
template <typename Storage, typename Derived>
std::vector<Storage> encode_weight(const Eigen::MatrixBase<Derived>& W) {
  static_assert(detail::is_stored_format<Storage>(), "dora: encode_weight makes bf16, f16, Q8_0 or Q4_0");
  if constexpr (std::is_same<Storage, BlockQ8_0>::value) {
    return quantize_q8_0(W);
  } else if constexpr (std::is_same<Storage, BlockQ4_0>::value) {
    return quantize_q4_0(W);
  } else {
    const Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rounded = round_weight<Storage>(W);
    return std::vector<Storage>(rounded.data(), rounded.data() + rounded.size());
  }
}

/// The dense W a stored weight encodes (tests and merging only: the size of W in Scalar).
template <typename Scalar, typename Storage>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> dequantize(const StoredWeight<Storage>& W) {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> out(W.rows(), W.cols());
  W.dequantize(0, W.rows(), 0, W.cols(), out.data(), W.cols());
  return out;
}

}  // namespace dora
