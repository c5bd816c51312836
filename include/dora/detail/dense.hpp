#pragma once
/// \file detail/dense.hpp
/// The dense-input machinery of layers whose lowered input is a matrix X (N x d_in): Linear, where
/// X is x itself, and convolutions, where X is x unfolded (im2col). It saves xd = dropout(X) and
/// u = xd A^T for backward. The frozen product reads the borrowed lowered weight W (d_out x d_in).
///
/// Grouped convolutions (groups G > 1, conv.hpp): W is d_out x (d_in / G) and output block g (rows
/// [g d_out/G, (g+1) d_out/G)) sees input block g only; B (d_out x r/G) is PEFT's grouped 1x1
/// lora_B, so output block g reads u's columns [g r/G, (g+1) r/G); A (r x d_in) stays dense (PEFT's
/// lora_A has groups 1). The products below are those block-diagonal maps, one GEMM per group.

#include "adapter.hpp"
#include "parallel.hpp"
#include "stored_product.hpp"

namespace dora {
namespace detail {

inline constexpr FactorSpec kLinearFactors{"lora_A", "lora_B", "d_in", "d_out", false, "d_out", "d_in"};

template <typename Derived, typename Scalar, typename Storage = Scalar>
class DenseAdapter : public Adapter<Derived, Scalar, Eigen::Ref<const Matrix<Scalar>>> {
  using Base = Adapter<Derived, Scalar, Eigen::Ref<const Matrix<Scalar>>>;

 public:
  using MatrixType = Matrix<Scalar>;
  using Index = Eigen::Index;

  using BaseType = BaseLayer<Scalar, Storage>;

  /// The frozen layer as the adapter sees it (lowered: d_out x d_in).
  const BaseType& base() const { return base_; }

 protected:
  DenseAdapter(const FactorSpec& spec, const BaseType& base, const AdapterConfig& config, Index groups = 1)
      : Base(spec, base.d_in() * groups, base.d_out(), config, groups), base_(base) {}
  DenseAdapter(const FactorSpec& spec, const BaseType& base, const AdapterConfig& config,
               const Eigen::Ref<const MatrixType>& A, const Eigen::Ref<const MatrixType>& B, Index groups = 1)
      : Base(spec, base.d_in() * groups, base.d_out(), config, A, B, groups), base_(base) {}

  /// Columns of the lowered input: d_in (G d_in of the grouped W's columns).
  Index lowered_cols() const { return this->A_.cols(); }

  void check_lowered_input(const Eigen::Ref<const MatrixType>& x, const Eigen::Ref<MatrixType>& y) const {
    DORA_CHECK_ARG(x.cols() == lowered_cols(), "x must have d_in = ", lowered_cols(), " columns, got ", x.rows(), " x ",
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
    xd_.resize(this->batch_ + extra_rows, lowered_cols());
    u_.resize(this->batch_, this->rank());
    if (mask != nullptr || this->dropout_active()) {
      if (mask != nullptr) {
        mask_ = *mask;
      } else {
        mask_.resize(this->batch_, lowered_cols());
        this->draw_dropout_mask(mask_);
      }
      parallel_rows(this->batch_, x.cols(), [&](Index begin, Index end) {
        xd_.middleRows(begin, end - begin) =
            x.middleRows(begin, end - begin).cwiseProduct(mask_.middleRows(begin, end - begin));
      });
      dropout_applied_ = true;
    } else {
      parallel_rows(this->batch_, x.cols(), [&](Index begin, Index end) {
        xd_.middleRows(begin, end - begin) = x.middleRows(begin, end - begin);
      });
      dropout_applied_ = false;
    }
    rank_product(rounds_operands<Scalar>(base_.weight), xd(), false, this->A_, true, Scalar(1), Scalar(0), u_);
  }

  /// The saved (dropped) input: the top batch rows of the stacked buffer.
  typename MatrixType::RowsBlockXpr xd() { return xd_.topRows(this->batch_); }

  /// du = s * Gs B and dA += du^T xd, where Gs is the gradient reaching the adapter branch.
  template <typename DG>
  void accumulate_A(const Eigen::MatrixBase<DG>& Gs) {
    du_.resize(this->batch_, this->rank());
    if (this->groups_ == 1) {
      rank_product(rounds_operands<Scalar>(base_.weight), Gs, false, this->B_, false, this->scaling_, Scalar(0), du_);
    } else {
      const Index o = this->B_.rows() / this->groups_, q = this->B_.cols();
      for (Index g = 0; g < this->groups_; ++g)
        gemm(Gs.middleCols(g * o, o), false, this->B_.middleRows(g * o, o), false, du_.middleCols(g * q, q),
             this->scaling_);
    }
    rank_product(rounds_operands<Scalar>(base_.weight), du_, true, xd(), false, Scalar(1), Scalar(1), this->grad_A_);
  }

  /// Y = X W^T, overwritten (grouped: block g of Y's columns from block g of X's, one GEMM each).
  template <typename DX, typename DY>
  void base_product(const Eigen::MatrixBase<DX>& X, DY&& Y) const {
    if (this->groups_ == 1) {
      frozen_product(X, base_.weight, Y);
      return;
    }
    const Index o = base_.d_out() / this->groups_, c = base_.d_in();
    for (Index g = 0; g < this->groups_; ++g) {
      if constexpr (BaseType::kNative)
        gemm(X.middleCols(g * c, c), false, base_.weight.middleRows(g * o, o), true, Y.middleCols(g * o, o));
      else
        split_product(X.middleCols(g * c, c), base_.weight.middle_rows(g * o, o), Y.middleCols(g * o, o));
    }
  }
  /// dX = G W, overwritten (grouped: block g of dX's columns from block g of G's).
  template <typename DG, typename DX>
  void base_adjoint(const Eigen::MatrixBase<DG>& G, DX&& dX) const {
    if (this->groups_ == 1) {
      split_adjoint_product(G, base_.weight, dX);
      return;
    }
    const Index o = base_.d_out() / this->groups_, c = base_.d_in();
    for (Index g = 0; g < this->groups_; ++g) {
      if constexpr (BaseType::kNative)
        gemm(G.middleCols(g * o, o), false, base_.weight.middleRows(g * o, o), false, dX.middleCols(g * c, c));
      else
        stored_adjoint(G.middleCols(g * o, o), base_.weight.middle_rows(g * o, o), dX.middleCols(g * c, c), false);
    }
  }
  /// y += b (rows spread over threads); nothing without a bias.
  template <typename DY>
  void add_bias(DY&& y) const {
    if (!base_.has_bias()) return;
    parallel_rows(y.rows(), y.cols(), [&](Index begin, Index end) {
      y.middleRows(begin, end - begin).rowwise() += base_.bias.transpose();
    });
  }

  /// Refuses merging a grouped layer: its low-rank path is dense over all inputs (PEFT's lora_A
  /// has groups 1), which no grouped kernel of W's shape can hold; PEFT 0.21 refuses too.
  void check_mergeable() const {
    DORA_CHECK_STATE(this->groups_ == 1, "a convolution with groups = ", this->groups_,
                     " cannot be merged: its adapter (lora_A with groups 1) reaches every input channel, which a "
                     "grouped kernel cannot hold (PEFT 0.21 refuses too: \"Merging is not supported for _ConvNd "
                     "layers with groups > 1\")");
  }
  /// Y += s u B^T (B block-diagonal when grouped).
  template <typename DU, typename DY>
  void add_up_product(const Eigen::MatrixBase<DU>& u, DY&& Y) const {
    if (this->groups_ == 1) {
      rank_product(rounds_operands<Scalar>(base_.weight), u, false, this->B_, true, this->scaling_, Scalar(1), Y);
      return;
    }
    const Index o = this->B_.rows() / this->groups_, q = this->B_.cols();
    for (Index g = 0; g < this->groups_; ++g)
      gemm(u.middleCols(g * q, q), false, this->B_.middleRows(g * o, o), true, Y.middleCols(g * o, o), this->scaling_,
           Scalar(1));
  }
  /// dB += s Gs^T u (only B's blocks when grouped).
  template <typename DG>
  void accumulate_B(const Eigen::MatrixBase<DG>& Gs) {
    if (this->groups_ == 1) {
      rank_product(rounds_operands<Scalar>(base_.weight), Gs, true, u_, false, this->scaling_, Scalar(1),
                   this->grad_B_);
      return;
    }
    const Index o = this->B_.rows() / this->groups_, q = this->B_.cols();
    for (Index g = 0; g < this->groups_; ++g)
      gemm(Gs.middleCols(g * o, o), true, u_.middleCols(g * q, q), false, this->grad_B_.middleRows(g * o, o),
           this->scaling_, Scalar(1));
  }

  BaseType base_;
  bool dropout_applied_ = false;  // whether the saved forward used a mask (the mode may change before backward)
  MatrixType xd_, mask_, u_, du_;
};

}  // namespace detail
}  // namespace dora
