#pragma once
/// \file lora_linear.hpp
/// LoRA on a frozen linear layer (PEFT's lora.Linear with use_dora=False):
///   y = x W^T + b + s * dropout(x) A^T B^T

#include "detail/adapter.hpp"

namespace dora {

template <typename Scalar>
class LoraLinear : public detail::Adapter<Scalar> {
  using Base = detail::Adapter<Scalar>;

 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;

  /// Initialises A as config.init says and B = 0. Borrows base (see BaseLayer's lifetime rule).
  LoraLinear(const BaseLayer<Scalar>& base, const AdapterConfig& config) : Base(base, config) {}
  /// Starts from the given A (r x d_in) and B (d_out x r); config.init is ignored.
  LoraLinear(const BaseLayer<Scalar>& base, const AdapterConfig& config, const Eigen::Ref<const MatrixType>& A,
             const Eigen::Ref<const MatrixType>& B)
      : Base(base, config, A, B) {}

  /// y = x W^T + b + s (xd A^T) B^T for x of N x d_in; y must be N x d_out and not alias x.
  void forward(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y) {
    this->check_input(x, y);
    this->save_input(x);
    y.noalias() = x * this->base_.weight.transpose();
    y.noalias() += this->scaling_ * this->u_ * this->B_.transpose();
    if (this->base_.has_bias()) y.rowwise() += this->base_.bias.transpose();
    this->saved_ = true;
  }
  MatrixType forward(const Eigen::Ref<const MatrixType>& x) {
    MatrixType y(x.rows(), this->d_out());
    forward(x, y);
    return y;
  }

  /// Forward without dropout that modifies nothing: several threads may call it on one layer at
  /// once, each with its own workspace (resized to N x r on first use), while nothing modifies the
  /// layer. Same result as forward() in evaluation mode.
  void infer(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y, MatrixType& u_workspace) const {
    this->check_input(x, y);
    u_workspace.resize(x.rows(), this->rank());
    u_workspace.noalias() = x * this->A_.transpose();
    y.noalias() = x * this->base_.weight.transpose();
    y.noalias() += this->scaling_ * u_workspace * this->B_.transpose();
    if (this->base_.has_bias()) y.rowwise() += this->base_.bias.transpose();
  }
  MatrixType infer(const Eigen::Ref<const MatrixType>& x) const {
    MatrixType y(x.rows(), this->d_out()), u;
    infer(x, y, u);
    return y;
  }

  /// Accumulates dA, dB from dy (N x d_out) and writes dx (N x d_in). Releases the saved activations.
  void backward(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType> dx) {
    this->check_grad_output(dy, &dx);
    backward_impl(dy, &dx);
  }
  MatrixType backward(const Eigen::Ref<const MatrixType>& dy) {
    MatrixType dx(this->batch_, this->d_in());
    backward(dy, dx);
    return dx;
  }
  /// Accumulates dA, dB only (the input gradient is not needed, e.g. for a first layer).
  void backward_parameters(const Eigen::Ref<const MatrixType>& dy) {
    this->check_grad_output(dy, nullptr);
    backward_impl(dy, nullptr);
  }

  void zero_grad() {
    this->grad_A_.setZero();
    this->grad_B_.setZero();
  }

  std::vector<Parameter<Scalar>> parameters() {
    return {{"lora_A", {this->A_.data(), this->A_.size()}, {this->grad_A_.data(), this->grad_A_.size()}},
            {"lora_B", {this->B_.data(), this->B_.size()}, {this->grad_B_.data(), this->grad_B_.size()}}};
  }

  /// W' = W + s B A (PEFT merge); the bias is unchanged.
  MatrixType merged_weight() const {
    MatrixType merged = this->base_.weight;
    merged.noalias() += this->scaling_ * this->B_ * this->A_;
    return merged;
  }
  /// W = W' - s B A (PEFT unmerge), with the current A and B.
  MatrixType unmerge(const Eigen::Ref<const MatrixType>& merged) const {
    DORA_CHECK_ARG(merged.rows() == this->d_out() && merged.cols() == this->d_in(),
                   "merged weight must be d_out x d_in = ", this->d_out(), " x ", this->d_in(), ", got ", merged.rows(),
                   " x ", merged.cols());
    MatrixType W = merged;
    W.noalias() -= this->scaling_ * this->B_ * this->A_;
    return W;
  }

 private:
  void backward_impl(const Eigen::Ref<const MatrixType>& G, Eigen::Ref<MatrixType>* dx) {
    this->grad_B_.noalias() += this->scaling_ * G.transpose() * this->u_;
    this->accumulate_A(G);
    if (dx != nullptr) {
      dx->noalias() = G * this->base_.weight;
      if (this->dropout_applied_) {
        // dxd = du A reaches x through the mask; xd is no longer needed, so it holds dxd.
        this->xd().noalias() = this->du_ * this->A_;
        *dx += this->xd().cwiseProduct(this->mask_);
      } else {
        dx->noalias() += this->du_ * this->A_;
      }
    }
    this->saved_ = false;
  }
};

}  // namespace dora
