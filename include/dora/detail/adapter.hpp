#pragma once
/// \file detail/adapter.hpp
/// What LoRA and DoRA layers share: the borrowed base, the factors A and B with their gradients,
/// configuration, mode, dropout and the activations saved for backward.

#include <functional>
#include <string>
#include <vector>

#include "../base_layer.hpp"
#include "../config.hpp"
#include "../init.hpp"
#include "random.hpp"

namespace dora {

/// A flat view of one trainable tensor and its gradient, for optimizers that treat parameters
/// uniformly (the view aliases the layer's own storage).
template <typename Scalar>
struct Parameter {
  std::string name;  ///< PEFT's name: "lora_A", "lora_B", "lora_magnitude_vector"
  Eigen::Map<Vector<Scalar>> value;
  Eigen::Map<Vector<Scalar>> grad;
};

namespace detail {

// True when [a, a + na) and [b, b + nb) share memory: an output must not alias an input.
template <typename Scalar>
bool overlaps(const Scalar* a, Eigen::Index na, const Scalar* b, Eigen::Index nb) {
  if (na == 0 || nb == 0) return false;
  return std::less<const Scalar*>()(a, b + nb) && std::less<const Scalar*>()(b, a + na);
}

template <typename Scalar>
class Adapter {
 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;

  Index d_in() const { return base_.d_in(); }
  Index d_out() const { return base_.d_out(); }
  Index rank() const { return config_.rank; }
  /// s = alpha / r (or alpha / sqrt(r) with rsLoRA), in the layer's Scalar.
  Scalar scaling() const { return scaling_; }
  const AdapterConfig& config() const { return config_; }
  const BaseLayer<Scalar>& base() const { return base_; }

  /// Training mode: dropout (if p > 0) is applied. Default after construction, as in PEFT.
  void train(bool on = true) { training_ = on; }
  /// Evaluation mode: no dropout.
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  /// A (r x d_in), PEFT lora_A.weight. The mutable view cannot be resized.
  const MatrixType& lora_A() const { return A_; }
  Eigen::Ref<MatrixType> lora_A() { return A_; }
  /// B (d_out x r), PEFT lora_B.weight.
  const MatrixType& lora_B() const { return B_; }
  Eigen::Ref<MatrixType> lora_B() { return B_; }
  /// Accumulated gradients; zero_grad() clears them.
  const MatrixType& grad_lora_A() const { return grad_A_; }
  Eigen::Ref<MatrixType> grad_lora_A() { return grad_A_; }
  const MatrixType& grad_lora_B() const { return grad_B_; }
  Eigen::Ref<MatrixType> grad_lora_B() { return grad_B_; }

  void set_lora_A(const Eigen::Ref<const MatrixType>& A) {
    DORA_CHECK_ARG(A.rows() == rank() && A.cols() == d_in(), "lora_A must be r x d_in = ", rank(), " x ", d_in(),
                   ", got ", A.rows(), " x ", A.cols());
    A_ = A;
  }
  void set_lora_B(const Eigen::Ref<const MatrixType>& B) {
    DORA_CHECK_ARG(B.rows() == d_out() && B.cols() == rank(), "lora_B must be d_out x r = ", d_out(), " x ", rank(),
                   ", got ", B.rows(), " x ", B.cols());
    B_ = B;
  }

  /// Reseeds the dropout mask generator: the same seed gives the same masks, and
  /// seed_dropout(config().seed) restarts the stream a new layer starts with. The seed is mixed
  /// with a constant so that masks never replay the draws that initialised A from the same seed.
  void seed_dropout(std::uint64_t seed) { dropout_rng_.seed(seed ^ kDropoutStream); }
  /// The mask of the last training forward with dropout: entries 0 or 1/(1-p), N x d_in.
  const MatrixType& dropout_mask() const { return mask_; }

  /// True between a forward and the backward that consumes its saved activations.
  bool has_saved_activations() const { return saved_; }

 protected:
  Adapter(const BaseLayer<Scalar>& base, const AdapterConfig& config) : base_(base), config_(config) {
    setup();
    DORA_CHECK_ARG(config_.init != Init::user, "Init::user needs A and B passed to the layer's constructor");
    detail::Rng init_rng(config_.seed);
    A_ = initial_lora_A<Scalar>(config_.rank, d_in(), config_.init, init_rng);
    B_ = MatrixType::Zero(d_out(), config_.rank);
  }

  Adapter(const BaseLayer<Scalar>& base, const AdapterConfig& config, const Eigen::Ref<const MatrixType>& A,
          const Eigen::Ref<const MatrixType>& B)
      : base_(base), config_(config) {
    config_.init = Init::user;
    setup();
    set_lora_A(A);
    set_lora_B(B);
  }

  void setup() {
    config_.validate();
    scaling_ = static_cast<Scalar>(config_.scaling());
    seed_dropout(config_.seed);
    grad_A_ = MatrixType::Zero(config_.rank, d_in());
    grad_B_ = MatrixType::Zero(d_out(), config_.rank);
  }

  bool dropout_active() const { return training_ && config_.dropout > 0.0; }

  static constexpr std::uint64_t kDropoutStream = 0x9E3779B97F4A7C15ULL;

  void check_input(const Eigen::Ref<const MatrixType>& x, const Eigen::Ref<MatrixType>& y) const {
    DORA_CHECK_ARG(x.cols() == d_in(), "x must have d_in = ", d_in(), " columns, got ", x.rows(), " x ", x.cols());
    DORA_CHECK_ARG(y.rows() == x.rows() && y.cols() == d_out(), "y must be N x d_out = ", x.rows(), " x ", d_out(),
                   ", got ", y.rows(), " x ", y.cols());
    DORA_CHECK_ARG(!overlaps(x.data(), x.size(), y.data(), y.size()), "y must not share memory with x");
  }

  void check_grad_output(const Eigen::Ref<const MatrixType>& dy, const Eigen::Ref<MatrixType>* dx) const {
    DORA_CHECK_STATE(saved_,
                     "backward needs a forward first (and one forward per backward: the saved "
                     "activations are released by backward)");
    DORA_CHECK_ARG(dy.rows() == batch_ && dy.cols() == d_out(), "dy must be N x d_out = ", batch_, " x ", d_out(),
                   " (N from the last forward), got ", dy.rows(), " x ", dy.cols());
    if (dx != nullptr) {
      DORA_CHECK_ARG(dx->rows() == batch_ && dx->cols() == d_in(), "dx must be N x d_in = ", batch_, " x ", d_in(),
                     ", got ", dx->rows(), " x ", dx->cols());
      DORA_CHECK_ARG(!overlaps(dx->data(), dx->size(), dy.data(), dy.size()), "dx must not share memory with dy");
    }
  }

  /// Saves xd = dropout(x) (or x) and u = xd A^T. The copy of x decouples the layer from the
  /// caller's buffer, which is free to change between forward and backward. The buffer has
  /// extra_rows more rows below xd, for a caller that stacks another operand under x so that one
  /// product reads W once for both (DoRA stacks A: [xd; A] W^T gives x W^T and (W A^T)^T).
  void save_input(const Eigen::Ref<const MatrixType>& x, Index extra_rows = 0) {
    batch_ = x.rows();
    xd_.resize(batch_ + extra_rows, d_in());
    u_.resize(batch_, rank());
    if (dropout_active()) {
      mask_.resize(batch_, d_in());
      const double p = config_.dropout;
      const Scalar keep_scale = static_cast<Scalar>(1.0 / (1.0 - p));
      for (Index i = 0; i < mask_.size(); ++i) mask_.data()[i] = dropout_rng_.uniform() < p ? Scalar(0) : keep_scale;
      xd() = x.cwiseProduct(mask_);
      dropout_applied_ = true;
    } else {
      xd() = x;
      dropout_applied_ = false;
    }
    u_.noalias() = xd() * A_.transpose();
  }

  /// The saved (dropped) input: the top batch rows of the stacked buffer.
  typename MatrixType::RowsBlockXpr xd() { return xd_.topRows(batch_); }

  /// du = s * Gs B and dA += du^T xd, where Gs is the gradient reaching the adapter branch.
  template <typename DG>
  void accumulate_A(const Eigen::MatrixBase<DG>& Gs) {
    du_.resize(batch_, rank());
    du_.noalias() = scaling_ * Gs * B_;
    grad_A_.noalias() += du_.transpose() * xd();
  }

  BaseLayer<Scalar> base_;
  AdapterConfig config_;
  Scalar scaling_ = 0;
  bool training_ = true;
  MatrixType A_, B_, grad_A_, grad_B_;
  detail::Rng dropout_rng_;

  // Saved by forward for backward; workspaces resized only when the batch size changes.
  bool saved_ = false;
  bool dropout_applied_ = false;  // whether the saved forward used a mask (the mode may change before backward)
  Index batch_ = 0;
  MatrixType xd_, mask_, u_, du_;
};

}  // namespace detail
}  // namespace dora
