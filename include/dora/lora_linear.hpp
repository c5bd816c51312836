#pragma once
/// \file lora_linear.hpp
/// LoRA on a frozen linear layer (PEFT's lora.Linear with use_dora=False):
///   y = x W^T + b + s * dropout(x) A^T B^T

#include "detail/dense.hpp"
#include "detail/parallel.hpp"

namespace dora {
namespace detail {

/// LoRA's products on a lowered dense input X (N x d_in); shared by LoraLinear and LoraConv.
template <typename Derived, typename Scalar, typename Storage = Scalar>
class DenseLora : public DenseAdapter<Derived, Scalar, Storage> {
  using Base = DenseAdapter<Derived, Scalar, Storage>;

 public:
  using MatrixType = Matrix<Scalar>;
  using Index = Eigen::Index;

  /// W' = W + s B A (PEFT merge), lowered (d_out x d_in); the bias is unchanged.
  MatrixType merged_weight() const {
    this->check_mergeable();
    MatrixType merged = weight_dense<Scalar>(this->base_.weight);
    gemm(this->B_, false, this->A_, false, merged, this->scaling_, Scalar(1));
    return merged;
  }
  /// W = W' - s B A (PEFT unmerge), with the current A and B.
  MatrixType unmerge(const Eigen::Ref<const MatrixType>& merged) const {
    this->check_mergeable();
    DORA_CHECK_ARG(merged.rows() == this->base_.d_out() && merged.cols() == this->base_.d_in(),
                   "merged weight must be ", this->spec_.b_rows, " x ", this->spec_.a_cols, " = ", this->base_.d_out(),
                   " x ", this->base_.d_in(), ", got ", merged.rows(), " x ", merged.cols());
    MatrixType W = merged;
    gemm(this->B_, false, this->A_, false, W, -this->scaling_, Scalar(1));
    return W;
  }

 protected:
  friend class Adapter<Derived, Scalar, Eigen::Ref<const Matrix<Scalar>>>;
  static constexpr bool kHasInputGradient = true;
  using Base::Base;

  bool extra_parameters_match(const std::vector<Parameter<Scalar>>& p) const { return p.size() == 2; }
  void add_extra_parameters(std::vector<Parameter<Scalar>>&) {}
  void zero_extra_grad() {}

  /// y = x W^T + b + s (xd A^T) B^T on the lowered input.
  void forward_lowered(const Eigen::Ref<const MatrixType>& x, const MatrixType* mask, Eigen::Ref<MatrixType> y) {
    this->save_input(x, 0, mask);
    this->base_product(x, y);
    this->add_up_product(this->u_, y);
    this->add_bias(y);
    this->saved_ = true;
  }

  void infer_lowered(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y, MatrixType& u) const {
    u.resize(x.rows(), this->rank());
    gemm(x, false, this->A_, true, u);
    this->base_product(x, y);
    this->add_up_product(u, y);
    this->add_bias(y);
  }

  /// dA, dB from G (N x d_out); dx (lowered, N x d_in) if asked.
  void backward_lowered(const Eigen::Ref<const MatrixType>& G, Eigen::Ref<MatrixType>* dx) {
    this->accumulate_B(G);
    this->accumulate_A(G);
    if (dx != nullptr) {
      this->base_adjoint(G, *dx);
      if (this->dropout_applied_) {
        // dxd = du A reaches x through the mask; xd is no longer needed, so it holds dxd.
        gemm(this->du_, false, this->A_, false, this->xd());
        *dx += this->xd().cwiseProduct(this->mask_);
      } else {
        rank_product(rounds_operands<Scalar>(this->base_.weight), this->du_, false, this->A_, false, Scalar(1),
                     Scalar(1), *dx);
      }
    }
    this->saved_ = false;
  }
};

}  // namespace detail

/// Storage: how W is stored (Scalar, or bfloat16 / float16 / BlockQ8_0 / BlockQ4_0: storage.hpp).
template <typename Scalar, typename Storage = Scalar>
class LoraLinear : public detail::DenseLora<LoraLinear<Scalar, Storage>, Scalar, Storage> {
  using Base = detail::DenseLora<LoraLinear<Scalar, Storage>, Scalar, Storage>;
  friend class detail::Adapter<LoraLinear<Scalar, Storage>, Scalar, Eigen::Ref<const Matrix<Scalar>>>;

 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;
  using InferWorkspace = MatrixType;
  using Base::forward;
  using Base::infer;

  /// Initialises A as config.init says and B = 0. Borrows base (see BaseLayer's lifetime rule).
  LoraLinear(const BaseLayer<Scalar, Storage>& base, const AdapterConfig& config)
      : Base(detail::kLinearFactors, base, config) {}
  /// Starts from the given A (r x d_in) and B (d_out x r); config.init is ignored.
  LoraLinear(const BaseLayer<Scalar, Storage>& base, const AdapterConfig& config, const Eigen::Ref<const MatrixType>& A,
             const Eigen::Ref<const MatrixType>& B)
      : Base(detail::kLinearFactors, base, config, A, B) {}

  Index d_in() const { return this->base_.d_in(); }
  Index d_out() const { return this->base_.d_out(); }

  /// y = x W^T + b + s (xd A^T) B^T for x of N x d_in; y must be N x d_out and not alias x.
  void forward(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y) {
    this->check_lowered_input(x, y);
    this->forward_lowered(x, nullptr, y);
  }

  /// Forward without dropout that modifies nothing: several threads may call it on one layer at
  /// once, each with its own workspace (resized to N x r on first use), while nothing modifies the
  /// layer. Same result as forward() in evaluation mode.
  void infer(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y, MatrixType& u_workspace) const {
    this->check_lowered_input(x, y);
    this->infer_lowered(x, y, u_workspace);
  }

  /// The mask of the last training forward with dropout: entries 0 or 1/(1-p), N x d_in.
  const MatrixType& dropout_mask() const { return this->mask_; }

 private:
  Index output_cols() const { return d_out(); }
  Index input_cols() const { return d_in(); }
  Index saved_batch() const { return this->batch_; }
  void backward_impl(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType>* dx) {
    this->backward_lowered(dy, dx);
  }
};

}  // namespace dora
