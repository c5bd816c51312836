#pragma once
// A DoRA layer computed the way PEFT 0.21 does it: the dense d_out x d_in matrix V = W + s B A is
// formed on every forward and its row norms taken directly. Used as a test oracle and as the
// DoraDense benchmark baseline; not part of the library. Detached norm gradient (as PEFT), no
// dropout. V is a member so the baseline pays PEFT's memory traffic, not an allocator's.

#include <dora/dora.hpp>

namespace dora_test {

template <typename Scalar>
class DenseDora {
 public:
  using MatrixType = dora::Matrix<Scalar>;
  using VectorType = dora::Vector<Scalar>;

  DenseDora(const dora::BaseLayer<Scalar>& base, const MatrixType& A, const MatrixType& B, Scalar scaling)
      : base_(base), A_(A), B_(B), s_(scaling) {
    V_.resize(base.d_out(), base.d_in());
    V_ = base_.weight;
    V_.noalias() += s_ * B_ * A_;
    m_ = V_.rowwise().norm();
    grad_A_ = MatrixType::Zero(A.rows(), A.cols());
    grad_B_ = MatrixType::Zero(B.rows(), B.cols());
    grad_m_ = VectorType::Zero(m_.size());
  }

  VectorType& magnitude() { return m_; }
  const MatrixType& grad_lora_A() const { return grad_A_; }
  const MatrixType& grad_lora_B() const { return grad_B_; }
  const VectorType& grad_magnitude() const { return grad_m_; }
  const VectorType& row_norm() const { return n_; }

  void forward(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y) {
    V_ = base_.weight;
    V_.noalias() += s_ * B_ * A_;
    n_ = V_.rowwise().norm();
    g_ = m_.cwiseQuotient(n_);
    x_ = x;
    u_.noalias() = x * A_.transpose();
    h_.noalias() = x * base_.weight.transpose();
    h_.noalias() += s_ * u_ * B_.transpose();
    y.noalias() = h_ * g_.asDiagonal();
    if (base_.has_bias()) y.rowwise() += base_.bias.transpose();
  }

  void backward(const Eigen::Ref<const MatrixType>& G, Eigen::Ref<MatrixType> dx) {
    grad_m_.noalias() += G.cwiseProduct(h_).colwise().sum().transpose().cwiseQuotient(n_);
    Gg_.noalias() = G * g_.asDiagonal();
    grad_B_.noalias() += s_ * Gg_.transpose() * u_;
    du_.noalias() = s_ * Gg_ * B_;
    grad_A_.noalias() += du_.transpose() * x_;
    dx.noalias() = Gg_ * base_.weight;
    dx.noalias() += du_ * A_;
  }

 private:
  dora::BaseLayer<Scalar> base_;
  MatrixType A_, B_, V_, x_, u_, h_, Gg_, du_, grad_A_, grad_B_;
  VectorType m_, n_, g_, grad_m_;
  Scalar s_;
};

}  // namespace dora_test
