#pragma once
/// \file dora_linear.hpp
/// DoRA on a frozen linear layer (PEFT's lora.Linear with use_dora=True):
///   V = W + s B A,  n_i = ||V_i||,  g = m / n,  y = (x V^T) diag(g) + b
/// with PEFT's dropout semantics in training (dropout acts on the adapter branch only):
///   y = x W^T + b + (g - 1) (xd W^T) + g (s (xd A^T) B^T)
///
/// Rows with a zero direction (n_i = 0, or m_i / n_i overflowing) are inactive: g_i = 0, output =
/// bias (plus the undropped base part under dropout), merged row = 0, dm_i = 0. The rule is
/// dora::inactive_row in magnitude.hpp, shared with dora::io's merge. Non-finite m, W, A, B or x are not hidden:
/// NaN/inf propagate.

#include <limits>

#include "detail/adapter.hpp"
#include "magnitude.hpp"
#include "row_norm.hpp"

namespace dora {

/// What merge() returns: the merged weight and what unmerge() needs (PEFT caches the same).
template <typename Scalar>
struct DoraMerge {
  Matrix<Scalar> weight;    ///< W' = diag(m / n) (W + s B A), d_out x d_in
  Vector<Scalar> row_norm;  ///< n at merge time
  Vector<Scalar> scale;     ///< m / n at merge time (0 on inactive rows)
};

template <typename Scalar>
class DoraLinear : public detail::Adapter<Scalar> {
  using Base = detail::Adapter<Scalar>;

 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;

  /// A as config.init says, B = 0, m = ||W_i|| (so the layer starts equal to the base layer).
  DoraLinear(const BaseLayer<Scalar>& base, const AdapterConfig& config) : Base(base, config) { setup(); }
  /// Starts from the given A and B; m = row norms of W + s B A (PEFT's magnitude initialisation).
  DoraLinear(const BaseLayer<Scalar>& base, const AdapterConfig& config, const Eigen::Ref<const MatrixType>& A,
             const Eigen::Ref<const MatrixType>& B)
      : Base(base, config, A, B) {
    setup();
  }

  /// m (d_out), PEFT lora_magnitude_vector.
  const VectorType& magnitude() const { return m_; }
  Eigen::Ref<VectorType> magnitude() { return m_; }
  const VectorType& grad_magnitude() const { return grad_m_; }
  Eigen::Ref<VectorType> grad_magnitude() { return grad_m_; }
  void set_magnitude(const Eigen::Ref<const VectorType>& m) {
    DORA_CHECK_ARG(m.size() == this->d_out(), "magnitude must have d_out = ", this->d_out(), " entries, got ",
                   m.size());
    m_ = m;
  }
  /// m = ||W_i + s B_i A|| with the current A and B.
  void reset_magnitude() { m_ = compute_row_norm(); }

  /// Call after changing the borrowed W (or bias) in place: ||W_i||^2 is cached.
  void refresh_base() {
    w_sq_ = this->base_.weight.rowwise().squaredNorm();
    cache_valid_ = false;
  }

  NormGradient norm_gradient() const { return this->config_.norm_gradient; }
  void set_norm_gradient(NormGradient mode) { this->config_.norm_gradient = mode; }

  /// Row norms n used by the last forward.
  const VectorType& row_norm() const { return n_; }
  /// Row norms of W + s B A with the current A, B (factored; see row_norm.hpp).
  VectorType compute_row_norm() const {
    detail::FactoredRowNorm<Scalar> work;
    work.resize(this->d_out(), this->d_in(), this->rank());
    VectorType n(this->d_out());
    work.compute(this->base_.weight, w_sq_, this->A_, this->B_, this->scaling_, n);
    return n;
  }
  /// Rows recomputed directly by the last norm computation (cancellation, overflow, underflow).
  Index rows_recomputed() const { return rows_recomputed_; }

  /// y = (x V^T) diag(m / n) + b (with dropout in training mode). y is N x d_out, not aliasing x.
  /// In evaluation mode n is computed once and reused while A, B and m are unchanged.
  ///
  /// Cost: when n must be (re)computed, A is stacked under x and one product [xd; A] W^T gives
  /// both x W^T and P^T = A W^T, so W is read once, as in LoRA; the norm's extra work is r more
  /// rows in that product (1 + r / (2N) of a LoRA step).
  void forward(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y) {
    this->check_input(x, y);
    const Index r = this->rank();
    // Training stacks A under x (the norm changes every step). Evaluation computes the norm on its
    // own when the cache is stale, so that every evaluation forward runs the same x W^T product and
    // repeated calls give bitwise identical outputs.
    stacked_ = this->training_ ? r : 0;
    if (!this->training_ && !cache_matches()) {
      rows_recomputed_ = norm_.compute(this->base_.weight, w_sq_, this->A_, this->B_, this->scaling_, n_);
      update_scale_from_norm();
    }
    this->save_input(x, stacked_);
    if (stacked_ != 0) this->xd_.bottomRows(r) = this->A_;
    const typename BaseLayer<Scalar>::WeightMap& W = this->base_.weight;
    const Scalar s = this->scaling_;
    const Index N = this->batch_;
    H_.resize(N + stacked_, this->d_out());
    H_.noalias() = this->xd_ * W.transpose();
    if (stacked_ != 0) {
      rows_recomputed_ = norm_.compute_with(W, w_sq_, this->A_, this->B_, this->scaling_, H_.bottomRows(r), n_);
      update_scale_from_norm();
    }
    h().noalias() += s * this->u_ * this->B_.transpose();
    if (!this->dropout_applied_) {
      // One pass for the compose and the bias.
      if (this->base_.has_bias()) {
        for (Index t = 0; t < N; ++t) y.row(t) = H_.row(t).cwiseProduct(g_.transpose()) + this->base_.bias.transpose();
      } else {
        for (Index t = 0; t < N; ++t) y.row(t) = H_.row(t).cwiseProduct(g_.transpose());
      }
    } else {
      // y = x W^T + s u B^T + (g - 1) hd: the base product of the undropped x is needed too.
      y.noalias() = x * W.transpose();
      y.noalias() += s * this->u_ * this->B_.transpose();
      for (Index t = 0; t < N; ++t) y.row(t).array() += H_.row(t).array() * (g_.transpose().array() - Scalar(1));
      if (this->base_.has_bias()) y.rowwise() += this->base_.bias.transpose();
    }
    this->saved_ = true;
  }
  MatrixType forward(const Eigen::Ref<const MatrixType>& x) {
    MatrixType y(x.rows(), this->d_out());
    forward(x, y);
    return y;
  }

  /// Switches to evaluation mode and computes the row norm for the current A, B, m, so that
  /// infer() may be called (from any number of threads).
  void prepare_inference() {
    this->eval();
    if (!cache_matches()) {
      rows_recomputed_ = norm_.compute(this->base_.weight, w_sq_, this->A_, this->B_, this->scaling_, n_);
      update_scale_from_norm();
    }
  }

  /// Evaluation-mode forward that modifies nothing: several threads may call it on one layer at
  /// once, each with its own workspace (resized to N x r on first use), while nothing modifies the
  /// layer. Same result, bit for bit, as forward() in evaluation mode.
  /// Precondition: prepare_inference() since the last change of A, B or m (checked: std::logic_error).
  void infer(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y, MatrixType& u_workspace) const {
    this->check_input(x, y);
    DORA_CHECK_STATE(cache_matches(), "infer() needs prepare_inference() after the last change of A, B or m");
    const Index N = x.rows();
    u_workspace.resize(N, this->rank());
    u_workspace.noalias() = x * this->A_.transpose();
    y.noalias() = x * this->base_.weight.transpose();
    y.noalias() += this->scaling_ * u_workspace * this->B_.transpose();
    if (this->base_.has_bias()) {
      for (Index t = 0; t < N; ++t) y.row(t) = y.row(t).cwiseProduct(g_.transpose()) + this->base_.bias.transpose();
    } else {
      for (Index t = 0; t < N; ++t) y.row(t) = y.row(t).cwiseProduct(g_.transpose());
    }
  }
  MatrixType infer(const Eigen::Ref<const MatrixType>& x) const {
    MatrixType y(x.rows(), this->d_out()), u;
    infer(x, y, u);
    return y;
  }

  /// Accumulates dA, dB, dm from dy (N x d_out) and writes dx (N x d_in). Releases the saved activations.
  void backward(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType> dx) {
    this->check_grad_output(dy, &dx);
    backward_impl(dy, &dx);
  }
  MatrixType backward(const Eigen::Ref<const MatrixType>& dy) {
    MatrixType dx(this->batch_, this->d_in());
    backward(dy, dx);
    return dx;
  }
  /// Accumulates dA, dB, dm only.
  void backward_parameters(const Eigen::Ref<const MatrixType>& dy) {
    this->check_grad_output(dy, nullptr);
    backward_impl(dy, nullptr);
  }

  void zero_grad() {
    this->grad_A_.setZero();
    this->grad_B_.setZero();
    grad_m_.setZero();
  }

  std::vector<Parameter<Scalar>> parameters() {
    return {{"lora_A", {this->A_.data(), this->A_.size()}, {this->grad_A_.data(), this->grad_A_.size()}},
            {"lora_B", {this->B_.data(), this->B_.size()}, {this->grad_B_.data(), this->grad_B_.size()}},
            {"lora_magnitude_vector", {m_.data(), m_.size()}, {grad_m_.data(), grad_m_.size()}}};
  }

  /// W' = diag(m / n) (W + s B A) with the current parameters (PEFT merge); bias unchanged.
  DoraMerge<Scalar> merge() const {
    DoraMerge<Scalar> out;
    out.row_norm = compute_row_norm();
    out.scale.resize(this->d_out());
    for (Index i = 0; i < this->d_out(); ++i) out.scale[i] = magnitude_scale(m_[i], out.row_norm[i]);
    out.weight = this->base_.weight;
    out.weight.noalias() += this->scaling_ * this->B_ * this->A_;
    out.weight = out.scale.asDiagonal() * out.weight;
    return out;
  }
  /// W = W' / (m / n) - s B A, with the scale cached at merge time and the current A, B (PEFT unmerge).
  /// An inactive row (scale 0) returns -s B_i A: W_i exactly when n_i was 0 (V_i = 0); when m_i / n_i
  /// overflowed, V_i was not zero but ||V_i|| < m_i / max(Scalar), the error of that row.
  MatrixType unmerge(const DoraMerge<Scalar>& merged) const {
    DORA_CHECK_ARG(merged.weight.rows() == this->d_out() && merged.weight.cols() == this->d_in() &&
                       merged.scale.size() == this->d_out(),
                   "merged weight must be d_out x d_in = ", this->d_out(), " x ", this->d_in(), " with ", this->d_out(),
                   " scales, got ", merged.weight.rows(), " x ", merged.weight.cols(), " and ", merged.scale.size());
    MatrixType W(this->d_out(), this->d_in());
    for (Index i = 0; i < this->d_out(); ++i) {
      const Scalar g = merged.scale[i];
      if (g != Scalar(0))
        W.row(i) = merged.weight.row(i) / g;
      else
        W.row(i).setZero();
    }
    W.noalias() -= this->scaling_ * this->B_ * this->A_;
    return W;
  }

 private:
  void setup() {
    const Index d_out = this->d_out();
    norm_.resize(d_out, this->d_in(), this->rank());
    n_.resize(d_out);
    n_div_.resize(d_out);
    g_.resize(d_out);
    dm_.resize(d_out);
    beta_n_.resize(d_out);
    t_.resize(1, this->rank());
    Kb_.resize(this->rank(), this->rank());
    grad_m_ = VectorType::Zero(d_out);
    refresh_base();
    reset_magnitude();
  }

  bool cache_matches() const { return cache_valid_ && A_seen_ == this->A_ && B_seen_ == this->B_ && m_seen_ == m_; }

  // g (and the divisor for dm) from the freshly computed n. Evaluation mode reuses them while A,
  // B and m are bitwise unchanged: the comparison costs r (d_in + d_out) + d_out reads, against
  // d_out d_in r for recomputing, and cannot go stale whichever way the parameters were changed.
  void update_scale_from_norm() {
    for (Index i = 0; i < this->d_out(); ++i) {
      g_[i] = magnitude_scale(m_[i], n_[i]);
      // Dividing by +inf makes dm_i and the exact-mode term vanish on inactive rows.
      n_div_[i] = inactive_row(m_[i], n_[i]) ? std::numeric_limits<Scalar>::infinity() : n_[i];
    }
    // Training changes A, B, m every step: a snapshot would cost r (d_in + d_out) of memory for nothing.
    cache_valid_ = !this->training_;
    if (cache_valid_) {
      A_seen_ = this->A_;
      B_seen_ = this->B_;
      m_seen_ = m_;
    }
  }

  // The saved h = xd V^T: the top rows of the stacked product.
  typename MatrixType::RowsBlockXpr h() { return H_.topRows(this->batch_); }

  void backward_impl(const Eigen::Ref<const MatrixType>& G, Eigen::Ref<MatrixType>* dx) {
    const typename BaseLayer<Scalar>::WeightMap& W = this->base_.weight;
    const Scalar s = this->scaling_;
    const Index N = this->batch_;
    const Index r = this->rank();
    const bool exact = this->config_.norm_gradient == NormGradient::exact;
    // dm_i = sum_t G_ti h_ti / n_i (h is the dropped-input branch under dropout).
    dm_.noalias() = G.cwiseProduct(h()).colwise().sum().transpose();
    dm_.array() /= n_div_.array();
    grad_m_ += dm_;
    // h is no longer needed: it becomes Gg = G diag(g), so DoRA keeps one N x d_out buffer, not two.
    for (Index t = 0; t < N; ++t) H_.row(t) = G.row(t).cwiseProduct(g_.transpose());
    this->grad_B_.noalias() += s * h().transpose() * this->u_;
    this->accumulate_A(h());
    // With the exact gradient, dA gains s (diag(beta) B)^T W: stacked under Gg, one product
    // [Gg; s (diag(beta) B)^T] W gives dx's share and dA's, reading W once.
    const bool stack = exact && dx != nullptr && !this->dropout_applied_ && stacked_ == r;
    if (exact) accumulate_norm_gradient(stack);
    if (dx != nullptr) {
      if (!this->dropout_applied_) {
        if (stack) {
          this->xd_.noalias() = H_ * W;  // xd is no longer needed: (N + r) x d_in
          *dx = this->xd();
          this->grad_A_ += this->xd_.bottomRows(r);
        } else {
          dx->noalias() = h() * W;
        }
        dx->noalias() += this->du_ * this->A_;
      } else {
        // dx = G W + mask * [(Gg - G) W + du A]; xd is no longer needed and holds the bracket.
        dx->noalias() = G * W;
        h() -= G;
        this->xd().noalias() = h() * W;
        this->xd().noalias() += this->du_ * this->A_;
        *dx += this->xd().cwiseProduct(this->mask_);
      }
    }
    this->saved_ = false;
  }

  // The norm's share of dA and dB, with beta_i = -g_i dm_i / n_i = dL/dn_i / n_i:
  //   dB += s diag(beta) (P + s B K),   dA += s [(diag(beta) B)^T W + s ((diag(beta) B)^T B) A]
  // s (diag(beta) B)^T is built in the r rows of H below Gg (where P^T was): with stack, the
  // caller's product [Gg; s (diag(beta) B)^T] W then adds its share to dA.
  // beta_i itself is never formed: on a row with a tiny n_i and a large finite g_i it overflows
  // (float: n ~ 1e-25, g ~ 1e19) although its products are representable. beta_n_i = beta_i n_i =
  // -g_i dm_i is, and so are (P + s B K)_i / n_i = (V_i A^T) / n_i (at most ||A||) and B_i / n_i
  // wherever the true gradient is.
  void accumulate_norm_gradient(bool stack) {
    const Index r = this->rank();
    beta_n_ = -(g_.array() * dm_.array()).matrix();
    if (stacked_ == r) {
      norm_gradient_terms(H_.bottomRows(r), stack);
    } else {
      // The forward used a cached norm (evaluation mode): P^T is computed here.
      norm_.compute(this->base_.weight, w_sq_, this->A_, this->B_, this->scaling_, n_);
      Qt_ = norm_.PT();
      norm_gradient_terms(Qt_, false);
    }
  }

  // PT: r x d_out holding P^T on entry and s (diag(beta) B)^T on exit.
  template <typename PTMatrix>
  void norm_gradient_terms(PTMatrix&& PT, bool stack) {
    const Scalar s = this->scaling_;
    for (Index i = 0; i < this->d_out(); ++i) {
      // (P + s B K)_i one row at a time: no d_out x r buffer.
      t_.noalias() = this->B_.row(i) * norm_.K();
      t_ = (s * t_ + PT.col(i).transpose()) / n_div_[i];
      this->grad_B_.row(i) += (s * beta_n_[i]) * t_;
      PT.col(i) = (s * beta_n_[i]) * (this->B_.row(i).transpose() / n_div_[i]);
    }
    if (!stack) this->grad_A_.noalias() += PT * this->base_.weight;
    Kb_.noalias() = PT * this->B_;  // s (diag(beta) B)^T B
    this->grad_A_.noalias() += s * Kb_ * this->A_;
  }

  VectorType m_, grad_m_;
  VectorType w_sq_;  // ||W_i||^2, fixed while W is
  detail::FactoredRowNorm<Scalar> norm_;
  VectorType n_, n_div_, g_, dm_, beta_n_;
  MatrixType H_, Kb_;  // H: [h; P^T] after forward, [Gg; s (diag(beta) B)^T] in backward
  MatrixType Qt_;      // P^T when the forward did not stack A (allocated only then)
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> t_;
  Index stacked_ = 0;  // rows of A stacked under x in the last forward (r, or 0 with a cached norm)
  Index rows_recomputed_ = 0;
  // Evaluation-mode cache of n and g: valid for exactly these parameter values.
  bool cache_valid_ = false;
  MatrixType A_seen_, B_seen_;
  VectorType m_seen_;
};

}  // namespace dora
