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
///
/// Grouped convolutions (norm_groups_ = G > 1) have PEFT 0.21's norm, which is not the norm of the
/// applied kernel: PEFT forms V = W + s reshape(B.view(-1, r) @ A.view(r, -1), W.shape), i.e. it
/// reads B's (d_out x r/G) buffer as B' (d_out/G x r) and cuts each row of B' A (d_in G columns)
/// into G pieces. So row o of the lowered W (d_out x d_in) has the direction
///   V_o = W_o + s B'_{o / G} A_{o mod G},   A_c = columns [c d_in, (c+1) d_in) of A,
/// and the rows o = c, c + G, c + 2G, ... form an ordinary factored norm of (W_c, A_c, B'), W_c
/// those rows of W (a strided view, no copy). The norm and its exact gradient are computed chunk by
/// chunk with the same code as for G = 1 (docs/math.md, section 13).

#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../magnitude.hpp"
#include "../row_norm.hpp"
#include "stored_product.hpp"

namespace dora {

/// What merge() returns: the merged weight and what unmerge() needs (PEFT caches the same).
template <typename Scalar>
struct DoraMerge {
  Matrix<Scalar> weight;    ///< W' = diag(m / n) (W + s B A), in the layer's stored layout
  Vector<Scalar> row_norm;  ///< n at merge time
  Vector<Scalar> scale;     ///< m / n at merge time (0 on inactive rows)
};

namespace detail {

/// The norm's row terms of the exact gradient, for every row i of the lowered map (rows spread over
/// threads), with beta_n_i = -g_i dm_i and n_div the norms (+inf on inactive rows):
///   dB_i += s beta_n_i (s (B K)_i + P_i) / n_div_i,   PT.col(i) := s beta_n_i B_i^T / n_div_i
/// PT holds P^T = A W^T on entry and s (diag(beta) B)^T on exit (see accumulate_norm_gradient).
/// Shared by the single-adapter layers and the multi-adapter ones (multi_adapter.hpp).
template <typename Scalar, typename PTMatrix, typename GradB>
void norm_gradient_rows(Scalar s, const Matrix<Scalar>& B, const Matrix<Scalar>& BK, const Vector<Scalar>& beta_n,
                        const Vector<Scalar>& n_div, PTMatrix& PT, GradB& grad_B) {
  using Index = Eigen::Index;
  parallel_rows(beta_n.size(), 4 * B.cols(), [&](Index begin, Index end) {
    for (Index i = begin; i < end; ++i) {
      grad_B.row(i) += (s * beta_n[i]) * ((s * BK.row(i) + PT.col(i).transpose()) / n_div[i]);
      PT.col(i) = (s * beta_n[i]) * (B.row(i).transpose() / n_div[i]);
    }
  });
}

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
    w_sq_ = weight_row_squared_norms<Scalar>(self().lowered_weight());
    cache_valid_ = false;
  }

  NormGradient norm_gradient() const { return self().config_.norm_gradient; }
  void set_norm_gradient(NormGradient mode) { self().config_.norm_gradient = mode; }

  /// Norms n used by the last forward.
  const VectorType& row_norm() const { return n_; }
  /// Norms of the lowered W + s B A with the current A, B (factored; see row_norm.hpp).
  VectorType compute_row_norm() const {
    const Index d_out = self().lora_B().rows();
    VectorType n(d_out);
    if constexpr (groupable()) {
      if (norm_groups_ > 1) {
        std::vector<NormChunk> chunks;
        MatrixType Bp;
        grouped_norm(chunks, Bp, n);
        return n;
      }
    }
    detail::FactoredRowNorm<Scalar> work;
    work.resize(d_out, self().lora_A().cols(), self().rank());
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
    bool grouped = false;
    if constexpr (groupable()) {
      grouped = norm_groups_ > 1;
      if (grouped) rows_recomputed_ = grouped_norm(chunks_, Bp_, n_);
    }
    if (!grouped)
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

  /// dm_i = sum_t G_ti h_ti / n_i, added to grad_m, with h = xd V^T the saved branch output
  /// (columns spread over threads).
  template <typename DG, typename DH>
  void accumulate_magnitude_grad(const Eigen::MatrixBase<DG>& G, const Eigen::MatrixBase<DH>& h) {
    parallel_rows(dm_.size(), G.rows(), [&](Index begin, Index end) {
      const Index size = end - begin;
      dm_.segment(begin, size).noalias() =
          G.middleCols(begin, size).cwiseProduct(h.middleCols(begin, size)).colwise().sum().transpose();
      dm_.segment(begin, size).array() /= n_div_.segment(begin, size).array();
      grad_m_.segment(begin, size) += dm_.segment(begin, size);
    });
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
    const MatrixType& BK = norm_.BK();  // B K from the norm (same B)
    beta_n_ = -(g_.array() * dm_.array()).matrix();
    norm_gradient_rows(s, B, BK, beta_n_, n_div_, PT, grad_B);
    Eigen::Ref<MatrixType> grad_A = derived().grad_lora_A();
    if (add_weight_term) weight_adjoint_add(PT, self().lowered_weight(), grad_A);
    gemm(PT, false, B, false, Kb_);  // s (diag(beta) B)^T B
    gemm(Kb_, false, self().lora_A(), false, grad_A, s, Scalar(1));
  }

  /// The exact gradient's norm terms for groups > 1, chunk by chunk, from the last
  /// compute_norm_alone() (the forward's, or the evaluation cache's: the same A, B and m).
  void accumulate_grouped_norm_gradient() {
    const Index G = norm_groups_, rows = Bp_.rows(), r = Bp_.cols();
    const Index cin = self().lora_A().cols() / G;
    const Scalar s = self().scaling();
    // B' and dB' share B's and dB's buffers (row-major d_out x r/G read as d_out/G x r).
    Eigen::Ref<MatrixType> grad_B = derived().grad_lora_B();
    Eigen::Map<MatrixType> grad_Bp(grad_B.data(), rows, r);
    Eigen::Ref<MatrixType> grad_A = derived().grad_lora_A();
    beta_n_ = -(g_.array() * dm_.array()).matrix();
    for (Index c = 0; c < G; ++c) {
      const NormChunk& chunk = chunks_[static_cast<std::size_t>(c)];
      Qc_ = chunk.norm.PT();
      // The same row terms as accumulate_norm_gradient(), for the rows o = c + j G.
      const MatrixType& BK = chunk.norm.BK();
      for (Index j = 0; j < rows; ++j) {
        const Index o = c + j * G;
        grad_Bp.row(j) += (s * beta_n_[o]) * ((s * BK.row(j) + Qc_.col(j).transpose()) / n_div_[o]);
        Qc_.col(j) = (s * beta_n_[o]) * (Bp_.row(j).transpose() / n_div_[o]);
      }
      typename Eigen::Ref<MatrixType>::ColsBlockXpr grad_Ac = grad_A.middleCols(c * cin, cin);
      weight_adjoint_add(Qc_, chunk_weight(c), grad_Ac);
      gemm(Qc_, false, Bp_, false, Kb_);
      gemm(Kb_, false, chunk.A, false, grad_A.middleCols(c * cin, cin), s, Scalar(1));
    }
  }

  /// The merge's row scales (and norms) with the current parameters.
  void merge_scales(DoraMerge<Scalar>& out) const {
    out.row_norm = compute_row_norm();
    out.scale.resize(m_.size());
    for (Index i = 0; i < m_.size(); ++i) out.scale[i] = magnitude_scale(m_[i], out.row_norm[i]);
  }

  // One chunk of a grouped norm: A_c, the chunk's ||W_o||^2 and n, and its factored norm (P^T, K).
  struct NormChunk {
    detail::FactoredRowNorm<Scalar> norm;
    MatrixType A;
    VectorType w_sq, n;
  };
  using StridedRows = Eigen::Map<const MatrixType, Eigen::Unaligned, Eigen::OuterStride<>>;
  // Whether the layer's lowered W is one whose rows a grouped norm can take in strided chunks in
  // place: a strided map (a dense W) or a stored W; the embedding's transposed table is neither, and
  // never grouped.
  static constexpr bool groupable() {
    using Lowered = std::decay_t<decltype(std::declval<const Derived&>().lowered_weight())>;
    return std::is_same<Lowered, StridedRows>::value || is_stored_weight<Lowered>::value;
  }

  // Rows c, c + G, c + 2G, ... of the lowered W, in place (a strided map, or a stored W's view).
  template <typename D = Derived>
  auto chunk_weight(Index c) const {
    const Index G = norm_groups_;
    return weight_strided_rows(static_cast<const D&>(*this).lowered_weight(), c, G,
                               static_cast<const D&>(*this).lowered_weight().rows() / G);
  }

  // n for groups > 1 (see the file comment); the workspaces keep their sizes, so a training loop
  // allocates nothing here after the first step. Returns the rows recomputed directly.
  Index grouped_norm(std::vector<NormChunk>& chunks, MatrixType& Bp, VectorType& n) const {
    const MatrixType& A = self().lora_A();
    const MatrixType& B = self().lora_B();
    const Index G = norm_groups_, rows = B.rows() / G, r = A.rows(), cin = A.cols() / G;
    Bp = Eigen::Map<const MatrixType>(B.data(), rows, r);
    chunks.resize(static_cast<std::size_t>(G));
    Index direct = 0;
    for (Index c = 0; c < G; ++c) {
      NormChunk& chunk = chunks[static_cast<std::size_t>(c)];
      chunk.A = A.middleCols(c * cin, cin);
      chunk.w_sq =
          Eigen::Map<const VectorType, 0, Eigen::InnerStride<>>(w_sq_.data() + c, rows, Eigen::InnerStride<>(G));
      chunk.n.resize(rows);
      chunk.norm.resize(rows, cin, r);
      direct += chunk.norm.compute(chunk_weight(c), chunk.w_sq, chunk.A, Bp, self().scaling(), chunk.n);
      for (Index j = 0; j < rows; ++j) n[c + j * G] = chunk.n[j];
    }
    return direct;
  }

  Index norm_groups_ = 1;  // > 1: a grouped convolution's norm (set by the layer before setup_magnitude)
  std::vector<NormChunk> chunks_;
  MatrixType Bp_, Qc_;
  VectorType m_, grad_m_;
  VectorType w_sq_;  // ||W_i||^2 of the lowered W, fixed while W is
  detail::FactoredRowNorm<Scalar> norm_;
  VectorType n_, n_div_, g_, dm_, beta_n_;
  MatrixType Kb_;
  Index rows_recomputed_ = 0;
  // Evaluation-mode cache of n and g: valid for exactly these parameter values.
  bool cache_valid_ = false;
  MatrixType A_seen_, B_seen_;
  VectorType m_seen_;
};

}  // namespace detail
}  // namespace dora
