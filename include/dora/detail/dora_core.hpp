#pragma once
/// \file detail/dora_core.hpp
/// DoRA's magnitude machinery, written once for every DoRA layer type: the magnitude m and its
/// gradient, the factored norm n of the lowered direction V = W + s B A (one entry per row of the
/// lowered map: output feature, output channel, or embedding dimension), the scale g = m / n with
/// the inactive-row rule, the evaluation-mode cache, the norm's gradient terms, merge and unmerge.
///
/// The layer type (Derived) supplies its lowered weight view, lowered_weight(): W for a linear
/// layer, the flattened kernel for a convolution, the transposed table for an embedding. The
/// norm's formulas are those of row_norm.hpp and docs/math.md, whatever the layer type.

#include <limits>

#include "../magnitude.hpp"
#include "../row_norm.hpp"

namespace dora {

/// What merge() returns: the merged weight and what unmerge() needs (PEFT caches the same).
template <typename Scalar>
struct DoraMerge {
  Matrix<Scalar> weight;    ///< W' = diag(m / n) (W + s B A), in the layer's stored layout
  Vector<Scalar> row_norm;  ///< n at merge time
  Vector<Scalar> scale;     ///< m / n at merge time (0 on inactive rows)
};

namespace detail {

template <typename Derived, typename Scalar>
class DoraMagnitude {
 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;

  /// m, PEFT lora_magnitude_vector (one entry per row of the lowered map).
  const VectorType& magnitude() const { return m_; }
  Eigen::Ref<VectorType> magnitude() { return m_; }
  const VectorType& grad_magnitude() const { return grad_m_; }
  Eigen::Ref<VectorType> grad_magnitude() { return grad_m_; }
  void set_magnitude(const Eigen::Ref<const VectorType>& m) {
    DORA_CHECK_ARG(m.size() == m_.size(), "magnitude must have ", self().spec_.b_rows, " = ", m_.size(),
                   " entries, got ", m.size());
    m_ = m;
  }
  /// m = n with the current A and B (PEFT's magnitude initialisation).
  void reset_magnitude() { m_ = compute_row_norm(); }

  /// Call after changing the borrowed W (or bias) in place: ||W_i||^2 is cached.
  void refresh_base() {
    w_sq_ = self().lowered_weight().rowwise().squaredNorm();
    cache_valid_ = false;
  }

  NormGradient norm_gradient() const { return self().config_.norm_gradient; }
  void set_norm_gradient(NormGradient mode) { self().config_.norm_gradient = mode; }

  /// Norms n used by the last forward.
  const VectorType& row_norm() const { return n_; }
  /// Norms of the lowered W + s B A with the current A, B (factored; see row_norm.hpp).
  VectorType compute_row_norm() const {
    const Index d_out = self().lora_B().rows();
    detail::FactoredRowNorm<Scalar> work;
    work.resize(d_out, self().lora_A().cols(), self().rank());
    VectorType n(d_out);
    work.compute(self().lowered_weight(), w_sq_, self().lora_A(), self().lora_B(), self().scaling(), n);
    return n;
  }
  /// Rows recomputed directly by the last norm computation (cancellation, overflow, underflow).
  Index rows_recomputed() const { return rows_recomputed_; }

  /// Switches to evaluation mode and computes the norm for the current A, B, m, so that infer()
  /// may be called (from any number of threads).
  void prepare_inference() {
    derived().eval();
    if (!cache_matches()) compute_norm_alone();
  }

 protected:
  Derived& derived() { return static_cast<Derived&>(*this); }
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  /// Sizes the state and sets m = n (call once the factors exist).
  void setup_magnitude() {
    const Index d_out = self().lora_B().rows();
    const Index r = self().rank();
    norm_.resize(d_out, self().lora_A().cols(), r);
    n_.resize(d_out);
    n_div_.resize(d_out);
    g_.resize(d_out);
    dm_.resize(d_out);
    beta_n_.resize(d_out);
    t_.resize(1, r);
    Kb_.resize(r, r);
    grad_m_ = VectorType::Zero(d_out);
    refresh_base();
    reset_magnitude();
  }

  bool extra_parameters_match(const std::vector<Parameter<Scalar>>& p) const {
    return p.size() == 3 && p[2].value.data() == m_.data() && p[2].grad.data() == grad_m_.data();
  }
  void add_extra_parameters(std::vector<Parameter<Scalar>>& p) {
    p.push_back({"lora_magnitude_vector", {m_.data(), m_.size()}, {grad_m_.data(), grad_m_.size()}});
  }
  void zero_extra_grad() { grad_m_.setZero(); }

  bool cache_matches() const {
    return cache_valid_ && A_seen_ == self().lora_A() && B_seen_ == self().lora_B() && m_seen_ == m_;
  }

  /// n and g from a P^T = A W^T (r x d_out) the layer computed with its own product.
  template <typename PTMatrix>
  void compute_norm_with(const Eigen::MatrixBase<PTMatrix>& PT) {
    rows_recomputed_ =
        norm_.compute_with(self().lowered_weight(), w_sq_, self().lora_A(), self().lora_B(), self().scaling(), PT, n_);
    update_scale_from_norm();
  }
  /// n and g with P^T computed here (evaluation mode, or a layer that has no stacked product).
  void compute_norm_alone() {
    rows_recomputed_ =
        norm_.compute(self().lowered_weight(), w_sq_, self().lora_A(), self().lora_B(), self().scaling(), n_);
    update_scale_from_norm();
  }
  /// P^T from the last compute_norm_alone().
  const MatrixType& norm_PT() const { return norm_.PT(); }

  // g (and the divisor for dm) from the freshly computed n. Evaluation mode reuses them while A,
  // B and m are bitwise unchanged: the comparison costs r (d_in + d_out) + d_out reads, against
  // d_out d_in r for recomputing, and cannot go stale whichever way the parameters were changed.
  void update_scale_from_norm() {
    for (Index i = 0; i < n_.size(); ++i) {
      g_[i] = magnitude_scale(m_[i], n_[i]);
      // Dividing by +inf makes dm_i and the exact-mode term vanish on inactive rows.
      n_div_[i] = inactive_row(m_[i], n_[i]) ? std::numeric_limits<Scalar>::infinity() : n_[i];
    }
    // Training changes A, B, m every step: a snapshot would cost r (d_in + d_out) of memory for nothing.
    cache_valid_ = !self().is_training();
    if (cache_valid_) {
      A_seen_ = self().lora_A();
      B_seen_ = self().lora_B();
      m_seen_ = m_;
    }
  }

  /// dm_i = sum_t G_ti h_ti / n_i, added to grad_m, with h = xd V^T the saved branch output.
  template <typename DG, typename DH>
  void accumulate_magnitude_grad(const Eigen::MatrixBase<DG>& G, const Eigen::MatrixBase<DH>& h) {
    dm_.noalias() = G.cwiseProduct(h).colwise().sum().transpose();
    dm_.array() /= n_div_.array();
    grad_m_ += dm_;
  }

  // The norm's share of dA and dB (exact mode), with beta_i = -g_i dm_i / n_i = dL/dn_i / n_i:
  //   dB += s diag(beta) (P + s B K),   dA += s [(diag(beta) B)^T W + s ((diag(beta) B)^T B) A]
  // PT holds P^T on entry and s (diag(beta) B)^T on exit; the (diag(beta) B)^T W term is added here
  // unless the layer folds it into a product it makes anyway (add_weight_term = false).
  // beta_i itself is never formed: on a row with a tiny n_i and a large finite g_i it overflows
  // (float: n ~ 1e-25, g ~ 1e19) although its products are representable. beta_n_i = beta_i n_i =
  // -g_i dm_i is, and so are (P + s B K)_i / n_i = (V_i A^T) / n_i (at most ||A||) and B_i / n_i
  // wherever the true gradient is.
  template <typename PTMatrix>
  void accumulate_norm_gradient(PTMatrix&& PT, bool add_weight_term) {
    const Scalar s = self().scaling();
    const MatrixType& B = self().lora_B();
    Eigen::Ref<MatrixType> grad_B = derived().grad_lora_B();
    beta_n_ = -(g_.array() * dm_.array()).matrix();
    for (Index i = 0; i < n_.size(); ++i) {
      // (P + s B K)_i one row at a time: no d_out x r buffer.
      t_.noalias() = B.row(i) * norm_.K();
      t_ = (s * t_ + PT.col(i).transpose()) / n_div_[i];
      grad_B.row(i) += (s * beta_n_[i]) * t_;
      PT.col(i) = (s * beta_n_[i]) * (B.row(i).transpose() / n_div_[i]);
    }
    Eigen::Ref<MatrixType> grad_A = derived().grad_lora_A();
    if (add_weight_term) grad_A.noalias() += PT * self().lowered_weight();
    Kb_.noalias() = PT * B;  // s (diag(beta) B)^T B
    grad_A.noalias() += s * Kb_ * self().lora_A();
  }

  /// The merge's row scales (and norms) with the current parameters.
  void merge_scales(DoraMerge<Scalar>& out) const {
    out.row_norm = compute_row_norm();
    out.scale.resize(m_.size());
    for (Index i = 0; i < m_.size(); ++i) out.scale[i] = magnitude_scale(m_[i], out.row_norm[i]);
  }

  VectorType m_, grad_m_;
  VectorType w_sq_;  // ||W_i||^2 of the lowered W, fixed while W is
  detail::FactoredRowNorm<Scalar> norm_;
  VectorType n_, n_div_, g_, dm_, beta_n_;
  MatrixType Kb_;
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> t_;
  Index rows_recomputed_ = 0;
  // Evaluation-mode cache of n and g: valid for exactly these parameter values.
  bool cache_valid_ = false;
  MatrixType A_seen_, B_seen_;
  VectorType m_seen_;
};

}  // namespace detail
}  // namespace dora
