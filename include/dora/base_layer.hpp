#pragma once
/// \file base_layer.hpp
/// The frozen base layer (W, and optionally the bias b), borrowed, never copied.
///
/// Lifetime rule: a BaseLayer is a view. The weight and bias it was made from must outlive every
/// adapter built on it and must not be resized or moved while one exists; their values may change
/// only between calls (an adapter caches ||W_i||^2 at construction: call refresh_base() on it
/// after editing W in place). borrow() refuses temporaries at compile time so that a view can
/// never be made of an object about to die.

#include <type_traits>

#include "detail/check.hpp"
#include "detail/eigen.hpp"

namespace dora {

/// Row-major dense matrix: the PyTorch / safetensors layout (W is d_out x d_in, x is N x d_in).
template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// Column vector (bias, magnitude, row norms).
template <typename Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// A borrowed view of a frozen linear layer: y = x W^T + b.
template <typename Scalar>
struct BaseLayer {
  static_assert(std::is_floating_point<Scalar>::value, "dora: Scalar must be float, double or long double");
  using WeightMap = Eigen::Map<const Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;
  using BiasMap = Eigen::Map<const Vector<Scalar>>;

  /// View of d_out x d_in row-major data with the given row stride (in elements); bias may be null.
  /// Precondition: weight points to at least (d_out - 1) * row_stride + d_in elements,
  /// bias (if not null) to d_out elements.
  BaseLayer(const Scalar* weight_data, Eigen::Index d_out, Eigen::Index d_in, Eigen::Index row_stride,
            const Scalar* bias_data)
      : weight(weight_data, d_out, d_in, Eigen::OuterStride<>(row_stride)),
        bias(bias_data, bias_data != nullptr ? d_out : 0) {
    DORA_CHECK_ARG(d_out >= 1 && d_in >= 1, "base weight must be non-empty, got ", d_out, " x ", d_in);
    DORA_CHECK_ARG(row_stride >= d_in, "base weight row stride ", row_stride, " is less than d_in ", d_in);
    DORA_CHECK_ARG(weight_data != nullptr, "base weight data is null");
  }

  Eigen::Index d_out() const { return weight.rows(); }
  Eigen::Index d_in() const { return weight.cols(); }
  bool has_bias() const { return bias.size() != 0; }

  WeightMap weight;  ///< W, d_out x d_in
  BiasMap bias;      ///< b, d_out; size 0 when the layer has no bias
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

}  // namespace dora
