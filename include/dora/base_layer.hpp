#pragma once
/// \file base_layer.hpp
/// The frozen base layer (W, and optionally the bias b), borrowed, never copied.
///
/// Lifetime rule: a BaseLayer is a view. The weight and bias it was made from must outlive every
/// adapter built on it and must not be resized or moved while one exists; their values may change
/// only between calls (an adapter caches ||W_i||^2 at construction: call refresh_base() on it
/// after editing W in place). borrow() refuses temporaries at compile time so that a view can
/// never be made of an object about to die.

#include <cstddef>
#include <type_traits>
#include <vector>

#include "detail/check.hpp"
#include "detail/eigen.hpp"
#include "storage.hpp"

namespace dora {

/// Row-major dense matrix: the PyTorch / safetensors layout (W is d_out x d_in, x is N x d_in).
template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// Column vector (bias, magnitude, row norms).
template <typename Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// A borrowed view of a frozen linear layer: y = x W^T + b. Scalar is the type the layer computes
/// in (and the bias's); Storage the type W is stored as: Scalar itself (an Eigen view of W), or
/// bfloat16, float16, BlockQ8_0 or BlockQ4_0 (a StoredWeight, storage.hpp: the products dequantize tiles).
template <typename Scalar, typename Storage = Scalar>
struct BaseLayer {
  static_assert(std::is_floating_point<Scalar>::value, "dora: Scalar must be float, double or long double");
  static_assert(std::is_same<Scalar, Storage>::value || detail::is_stored_format<Storage>(),
                "dora: W is stored as the layer's Scalar, bfloat16, float16, BlockQ8_0 or BlockQ4_0");
  /// Whether W is stored as Scalar (an Eigen map) rather than in a narrower format.
  static constexpr bool kNative = std::is_same<Scalar, Storage>::value;
  using WeightMap =
      std::conditional_t<kNative, Eigen::Map<const Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>,
                         StoredWeight<Storage>>;
  using BiasMap = Eigen::Map<const Vector<Scalar>>;

  /// View of d_out x d_in row-major data with the given row stride (in stored elements: values, or
  /// blocks for Q8_0, Q4_0); bias may be null.
  /// Precondition: weight points to at least (d_out - 1) * row_stride + d_in stored values,
  /// bias (if not null) to d_out elements.
  BaseLayer(const Storage* weight_data, Eigen::Index d_out, Eigen::Index d_in, Eigen::Index row_stride,
            const Scalar* bias_data)
      : weight(make_weight(weight_data, d_out, d_in, row_stride)), bias(bias_data, bias_data != nullptr ? d_out : 0) {}

  Eigen::Index d_out() const { return weight.rows(); }
  Eigen::Index d_in() const { return weight.cols(); }
  bool has_bias() const { return bias.size() != 0; }
  /// Bytes of the stored W (row padding excluded).
  std::size_t weight_bytes() const {
    if constexpr (kNative)
      return static_cast<std::size_t>(weight.rows()) * static_cast<std::size_t>(weight.cols()) * sizeof(Scalar);
    else
      return weight.bytes();
  }

  WeightMap weight;  ///< W, d_out x d_in
  BiasMap bias;      ///< b, d_out; size 0 when the layer has no bias

 private:
  static WeightMap make_weight(const Storage* data, Eigen::Index d_out, Eigen::Index d_in, Eigen::Index row_stride) {
    if constexpr (kNative) {
      DORA_CHECK_ARG(d_out >= 1 && d_in >= 1, "base weight must be non-empty, got ", d_out, " x ", d_in);
      DORA_CHECK_ARG(row_stride >= d_in, "base weight row stride ", row_stride, " is less than d_in ", d_in);
      DORA_CHECK_ARG(data != nullptr, "base weight data is null");
      return WeightMap(data, d_out, d_in, Eigen::OuterStride<>(row_stride));
    } else {
      return WeightMap(data, d_out, d_in, row_stride);
    }
  }
};

/// Borrow W (no bias). The matrix must outlive the adapter (see the lifetime rule above).
template <typename Scalar>
BaseLayer<Scalar> borrow(const Matrix<Scalar>& weight) {
  return BaseLayer<Scalar>(weight.data(), weight.rows(), weight.cols(), weight.cols(), nullptr);
}

/// Borrow W and b; b must have d_out entries.
template <typename Scalar>
BaseLayer<Scalar> borrow(const Matrix<Scalar>& weight, const Vector<Scalar>& bias) {
  DORA_CHECK_ARG(bias.size() == weight.rows(), "bias has ", bias.size(), " entries but W has d_out = ", weight.rows(),
                 " rows (W is ", weight.rows(), " x ", weight.cols(), ")");
  return BaseLayer<Scalar>(weight.data(), weight.rows(), weight.cols(), weight.cols(), bias.data());
}

// A view of a temporary would dangle at the end of the full expression.
template <typename Scalar>
BaseLayer<Scalar> borrow(Matrix<Scalar>&&) = delete;
template <typename Scalar>
BaseLayer<Scalar> borrow(Matrix<Scalar>&&, const Vector<Scalar>&) = delete;
template <typename Scalar>
BaseLayer<Scalar> borrow(const Matrix<Scalar>&, Vector<Scalar>&&) = delete;
template <typename Scalar>
BaseLayer<Scalar> borrow(Matrix<Scalar>&&, Vector<Scalar>&&) = delete;

/// Borrow raw row-major memory, e.g. a tensor inside a memory-mapped checkpoint.
template <typename Scalar>
BaseLayer<Scalar> borrow(const Scalar* weight, Eigen::Index d_out, Eigen::Index d_in, const Scalar* bias = nullptr) {
  return BaseLayer<Scalar>(weight, d_out, d_in, d_in, bias);
}

/// Borrow a W stored as bf16, f16, Q8_0 or Q4_0 for a layer computing in Scalar, e.g. a tensor of a
/// memory-mapped checkpoint: `dora::borrow<float>(w_bf16, d_out, d_in)`. Nothing is copied or
/// converted. For Q8_0 and Q4_0, weight points to d_out x d_in / 32 blocks (storage.hpp).
template <typename Scalar, typename Storage, typename = std::enable_if_t<detail::is_stored_format<Storage>()>>
BaseLayer<Scalar, Storage> borrow(const Storage* weight, Eigen::Index d_out, Eigen::Index d_in,
                                  const Scalar* bias = nullptr) {
  return BaseLayer<Scalar, Storage>(weight, d_out, d_in, d_in / detail::StorageTraits<Storage>::block, bias);
}
/// Borrow a bf16 or f16 Eigen matrix (e.g. from dora::round_weight), with or without a bias.
template <typename Scalar, typename Storage, typename = std::enable_if_t<detail::is_stored_format<Storage>()>>
BaseLayer<Scalar, Storage> borrow(
    const Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& weight) {
  return BaseLayer<Scalar, Storage>(weight.data(), weight.rows(), weight.cols(), weight.cols(), nullptr);
}
template <typename Scalar, typename Storage, typename = std::enable_if_t<detail::is_stored_format<Storage>()>>
BaseLayer<Scalar, Storage> borrow(const Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& weight,
                                  const Vector<Scalar>& bias) {
  DORA_CHECK_ARG(bias.size() == weight.rows(), "bias has ", bias.size(), " entries but W has d_out = ", weight.rows(),
                 " rows (W is ", weight.rows(), " x ", weight.cols(), ")");
  return BaseLayer<Scalar, Storage>(weight.data(), weight.rows(), weight.cols(), weight.cols(), bias.data());
}
template <typename Scalar, typename Storage, typename = std::enable_if_t<detail::is_stored_format<Storage>()>>
BaseLayer<Scalar, Storage> borrow(Eigen::Matrix<Storage, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>&&) = delete;

/// Borrow W in any stored format as encode_weight (or quantize_q8_0, quantize_q4_0) returns it:
/// d_out rows of d_in values (bf16, f16) or d_in / 32 blocks (Q8_0, Q4_0), with an optional bias.
template <typename Scalar, typename Storage, typename = std::enable_if_t<detail::is_stored_format<Storage>()>>
BaseLayer<Scalar, Storage> borrow(const std::vector<Storage>& stored, Eigen::Index d_out, Eigen::Index d_in,
                                  const Scalar* bias = nullptr) {
  constexpr Eigen::Index block = detail::StorageTraits<Storage>::block;
  DORA_CHECK_ARG(d_out >= 1 && d_in >= 1 && d_in % block == 0 &&
                     static_cast<std::size_t>(d_out) * static_cast<std::size_t>(d_in / block) == stored.size(),
                 "a ", detail::storage_name<Storage>(), " weight of ", d_out, " x ", d_in, " needs ", d_out, " x ",
                 d_in / block, block > 1 ? " blocks (d_in a multiple of 32)" : " values", ", got ", stored.size());
  return BaseLayer<Scalar, Storage>(stored.data(), d_out, d_in, d_in / block, bias);
}
template <typename Scalar, typename Storage, typename = std::enable_if_t<detail::is_stored_format<Storage>()>>
BaseLayer<Scalar, Storage> borrow(std::vector<Storage>&&, Eigen::Index, Eigen::Index, const Scalar* = nullptr) = delete;

/// Borrow a Q8_0 weight made by quantize_q8_0 (d_out x d_in), with an optional bias.
template <typename Scalar>
BaseLayer<Scalar, BlockQ8_0> borrow_q8_0(const std::vector<BlockQ8_0>& blocks, Eigen::Index d_out, Eigen::Index d_in,
                                         const Scalar* bias = nullptr) {
  return borrow<Scalar>(blocks, d_out, d_in, bias);
}
template <typename Scalar>
BaseLayer<Scalar, BlockQ8_0> borrow_q8_0(std::vector<BlockQ8_0>&&, Eigen::Index, Eigen::Index,
                                         const Scalar* = nullptr) = delete;

}  // namespace dora
