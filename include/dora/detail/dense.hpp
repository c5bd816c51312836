#pragma once
/// \file detail/dense.hpp
/// The dense-input machinery of layers whose lowered input is a matrix X (N x d_in): Linear, where
/// X is x itself, and convolutions, where X is x unfolded (im2col). It saves xd = dropout(X) and
/// u = xd A^T for backward. The frozen product reads the borrowed lowered weight W (d_out x d_in).

#include "adapter.hpp"

namespace dora {
namespace detail {

inline constexpr FactorSpec kLinearFactors{"lora_A", "lora_B", "d_in", "d_out", false, "d_out", "d_in"};

template <typename Derived, typename Scalar>
class DenseAdapter : public Adapter<Derived, Scalar, Eigen::Ref<const Matrix<Scalar>>> {
  using Base = Adapter<Derived, Scalar, Eigen::Ref<const Matrix<Scalar>>>;

 public:
  using MatrixType = Matrix<Scalar>;
  using Index = Eigen::Index;

  /// The frozen layer as the adapter sees it (lowered: d_out x d_in).
  const BaseLayer<Scalar>& base() const { return base_; }

 protected:
  DenseAdapter(const FactorSpec& spec, const BaseLayer<Scalar>& base, const AdapterConfig& config)
      : Base(spec, base.d_in(), base.d_out(), config), base_(base) {}
  DenseAdapter(const FactorSpec& spec, const BaseLayer<Scalar>& base, const AdapterConfig& config,
               const Eigen::Ref<const MatrixType>& A, const Eigen::Ref<const MatrixType>& B)
      : Base(spec, base.d_in(), base.d_out(), config, A, B), base_(base) {}

  void check_lowered_input(const Eigen::Ref<const MatrixType>& x, const Eigen::Ref<MatrixType>& y) const {
    DORA_CHECK_ARG(x.cols() == base_.d_in(), "x must have d_in = ", base_.d_in(), " columns, got ", x.rows(), " x ",
                   x.cols());
    DORA_CHECK_ARG(y.rows() == x.rows() && y.cols() == base_.d_out(), "y must be N x d_out = ", x.rows(), " x ",
                   base_.d_out(), ", got ", y.rows(), " x ", y.cols());
    DORA_CHECK_ARG(!overlaps(x.data(), x.size(), y.data(), y.size()), "y must not share memory with x");
  }

  /// Saves xd = dropout(x) (or x) and u = xd A^T. The copy of x decouples the layer from the
  /// caller's buffer, which is free to change between forward and backward. The buffer has
  /// extra_rows more rows below xd, for a caller that stacks another operand under x so that one
  /// product reads W once for both (DoRA stacks A: [xd; A] W^T gives x W^T and (W A^T)^T).
  /// mask: a dropout mask the layer type made itself (a convolution unfolds the mask it drew on its
  /// input, so that every copy of an input element shares its draw); null: drawn here if dropout is on.
  void save_input(const Eigen::Ref<const MatrixType>& x, Index extra_rows, const MatrixType* mask) {
    this->batch_ = x.rows();
    xd_.resize(this->batch_ + extra_rows, base_.d_in());
    u_.resize(this->batch_, this->rank());
    if (mask != nullptr || this->dropout_active()) {
      if (mask != nullptr) {
        mask_ = *mask;
      } else {
        mask_.resize(this->batch_, base_.d_in());
        this->draw_dropout_mask(mask_);
      }
      xd() = x.cwiseProduct(mask_);
      dropout_applied_ = true;
    } else {
      xd() = x;
      dropout_applied_ = false;
    }
    u_.noalias() = xd() * this->A_.transpose();
  }

  /// The saved (dropped) input: the top batch rows of the stacked buffer.
  typename MatrixType::RowsBlockXpr xd() { return xd_.topRows(this->batch_); }

  /// du = s * Gs B and dA += du^T xd, where Gs is the gradient reaching the adapter branch.
  template <typename DG>
  void accumulate_A(const Eigen::MatrixBase<DG>& Gs) {
    du_.resize(this->batch_, this->rank());
    du_.noalias() = this->scaling_ * Gs * this->B_;
    this->grad_A_.noalias() += du_.transpose() * xd();
  }

  BaseLayer<Scalar> base_;
  bool dropout_applied_ = false;  // whether the saved forward used a mask (the mode may change before backward)
  MatrixType xd_, mask_, u_, du_;
};

}  // namespace detail
}  // namespace dora
