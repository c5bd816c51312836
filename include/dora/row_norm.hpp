#pragma once
/// \file row_norm.hpp
/// The DoRA row norm n_i = ||W_i + s B_i A||_2 (per output row), without forming W + s B A.
///
///   n_i^2 = ||W_i||^2 + 2 s <B_i, P_i> + s^2 <(B K)_i, B_i>,   P = W A^T (d_out x r), K = A A^T (r x r)
///
/// ||W_i||^2 is fixed for a frozen W. The expansion is a difference of large terms when
/// ||V_i|| << ||W_i|| (an adapter that nearly cancels a row), and squares can overflow or
/// underflow where the norm itself is representable; those rows, and only those, are recomputed
/// directly as ||W_i + s B_i A|| with a scaled (overflow-safe) norm, a d_in-vector of work each.
/// So the result has the accuracy of the dense computation for every row at the cost of one
/// d_out x d_in x r product.

#include <cmath>
#include <limits>
#include <type_traits>

#include "base_layer.hpp"
#include "detail/parallel.hpp"
#include "detail/stored_product.hpp"

namespace dora {

namespace detail {

template <typename DW, typename DA, typename DB>
constexpr void check_row_norm_types() {
  using Scalar = typename DW::Scalar;
  static_assert(std::is_floating_point<Scalar>::value, "dora: row norm of a non-floating-point W");
  static_assert(std::is_same<typename DA::Scalar, Scalar>::value && std::is_same<typename DB::Scalar, Scalar>::value,
                "dora: W, A and B must have the same Scalar (cast them first)");
}

/// W as the factored norm reads it: a row-major view with contiguous rows. It binds without a copy
/// to a row-major Matrix, Map (any row stride), Ref, or a block of one; any other argument
/// (column-major storage, an expression) is evaluated once into a row-major matrix the Ref owns.
template <typename Scalar>
using RowMajorRef = Eigen::Ref<const Matrix<Scalar>, 0, Eigen::OuterStride<>>;

/// The small factors A and B as the row-major Matrix the factored norm takes: the argument itself
/// when it is one, else a copy (r x d_in and d_out x r: small next to W).
template <typename Scalar>
const Matrix<Scalar>& as_matrix(const Matrix<Scalar>& a) {
  return a;
}
template <typename Scalar, typename Derived>
Matrix<Scalar> as_matrix(const Eigen::MatrixBase<Derived>& a) {
  return a;
}

}  // namespace detail

/// Dense reference: forms V = W + s B A (d_out x d_in) as PEFT does. Test oracle and benchmark
/// baseline only; it allocates a matrix the size of W. W, A, B: any Eigen dense matrices or
/// expressions of the same Scalar.
template <typename DW, typename DA, typename DB>
Vector<typename DW::Scalar> row_norm_dense(const Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<DA>& A,
                                           const Eigen::MatrixBase<DB>& B, typename DW::Scalar scaling) {
  using Scalar = typename DW::Scalar;
  detail::check_row_norm_types<DW, DA, DB>();
  DORA_CHECK_ARG(A.cols() == W.cols() && B.rows() == W.rows() && B.cols() == A.rows(), "row_norm_dense: W is ",
                 W.rows(), " x ", W.cols(), ", A is ", A.rows(), " x ", A.cols(), ", B is ", B.rows(), " x ", B.cols());
  Matrix<Scalar> V = W;
  V.noalias() += scaling * B * A;
  return V.rowwise().norm();
}

namespace detail {

/// Workspaces and the computation of the factored row norm. Sized once per layer.
template <typename Scalar>
class FactoredRowNorm {
 public:
  void resize(Eigen::Index d_out, Eigen::Index d_in, Eigen::Index rank) {
    K_.resize(rank, rank);
    BK_.resize(d_out, rank);
    v_.resize(1, d_in);
  }

  /// Computes P^T = A W^T itself (one d_out x d_in x r product), then the norms. Its r x d_out
  /// buffer is allocated on first use only: a training layer gets P^T from its stacked product.
  template <typename WeightMap>
  Eigen::Index compute(const WeightMap& W, const Vector<Scalar>& w_sq, const Matrix<Scalar>& A, const Matrix<Scalar>& B,
                       Scalar s, Vector<Scalar>& n) {
    PT_.resize(A.rows(), W.rows());
    detail::weight_product(A, W, PT_);
    return compute_with(W, w_sq, A, B, s, PT_, n);
  }

  /// Norms from a P^T = A W^T (r x d_out) that the caller computed, e.g. stacked under x W^T so
  /// that W is read once. w_sq: ||W_i||^2 for every row (precomputed). Keeps K = A A^T for the
  /// exact gradient, and B K. Returns how many rows needed the direct computation.
  template <typename WeightMap, typename PTMatrix>
  Eigen::Index compute_with(const WeightMap& W, const Vector<Scalar>& w_sq, const Matrix<Scalar>& A,
                            const Matrix<Scalar>& B, Scalar s, const Eigen::MatrixBase<PTMatrix>& PT,
                            Vector<Scalar>& n) {
    gemm(A, false, A, true, K_);
    BK_.resize(B.rows(), B.cols());
    gemm(B, false, K_, false, BK_);
    const Scalar tiny = std::numeric_limits<Scalar>::min() / std::numeric_limits<Scalar>::epsilon();
    // Rows are independent: spread over threads; a row that needs the direct computation is marked
    // with -1 (no norm is negative) and done afterwards, one d_in-vector each.
    parallel_rows(W.rows(), 4 * B.cols(), [&](Eigen::Index begin, Eigen::Index end) {
      for (Eigen::Index i = begin; i < end; ++i) {
        const Scalar cross = Scalar(2) * s * B.row(i).dot(PT.col(i).transpose());
        const Scalar quad = s * s * BK_.row(i).dot(B.row(i));
        const Scalar n2 = w_sq[i] + cross + quad;
        // Sum of magnitudes: the rounding error of n2 is a few ulps of this.
        const Scalar mag = w_sq[i] + std::abs(cross) + quad;
        n[i] = std::isfinite(mag) && mag >= tiny && n2 >= mag * kCancellation ? std::sqrt(n2) : Scalar(-1);
      }
    });
    Eigen::Index direct = 0;
    for (Eigen::Index i = 0; i < W.rows(); ++i) {
      if (!(n[i] < Scalar(0))) continue;
      detail::weight_row(W, i, v_);
      gemm(B.row(i), false, A, false, v_, s, Scalar(1));
      n[i] = v_.stableNorm();  // scaled: no overflow/underflow in the squares; NaN propagates
      ++direct;
    }
    return direct;
  }

  /// P^T = A W^T from the last compute() (not compute_with()).
  const Matrix<Scalar>& PT() const { return PT_; }
  /// K = A A^T and B K (d_out x r) from the last computation.
  const Matrix<Scalar>& K() const { return K_; }
  const Matrix<Scalar>& BK() const { return BK_; }

  /// Rows whose n_i^2 fell below this fraction of the sum of magnitudes of its three terms
  /// are recomputed directly: the factored value then keeps at least 1/kCancellation of its
  /// significant digits minus a few ulps, i.e. relative error <= ~8 * (d_in + r) * eps.
  static constexpr Scalar kCancellation = Scalar(0.125);

 private:
  Matrix<Scalar> PT_, K_, BK_;
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> v_;
};

}  // namespace detail

/// Factored row norm of W + s B A (allocates its small workspaces; layers keep theirs).
/// W (d_out x d_in), A (r x d_in), B (d_out x r): any Eigen dense matrices or expressions of the
/// same Scalar (Matrix, Map over raw memory, Ref, blocks, column-major storage). A row-major W
/// with contiguous rows (Matrix, Map, Ref, a block of one) is read in place; any other W is
/// evaluated once into a row-major temporary the size of W (detail::RowMajorRef). A and B are
/// copied into row-major matrices unless they are ones already.
template <typename DW, typename DA, typename DB>
Vector<typename DW::Scalar> row_norm(const Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<DA>& A,
                                     const Eigen::MatrixBase<DB>& B, typename DW::Scalar scaling) {
  using Scalar = typename DW::Scalar;
  detail::check_row_norm_types<DW, DA, DB>();
  DORA_CHECK_ARG(A.cols() == W.cols() && B.rows() == W.rows() && B.cols() == A.rows(), "row_norm: W is ", W.rows(),
                 " x ", W.cols(), ", A is ", A.rows(), " x ", A.cols(), ", B is ", B.rows(), " x ", B.cols());
  // A Ref is a view: "copying" one made from a Ref copies a pointer and strides (clang-tidy sees a
  // copy); from any other non-row-major W it is the one evaluation the comment above promises.
  // NOLINTNEXTLINE(performance-unnecessary-copy-initialization)
  const detail::RowMajorRef<Scalar> Wr(W.derived());
  const Matrix<Scalar>& Am = detail::as_matrix<Scalar>(A.derived());
  const Matrix<Scalar>& Bm = detail::as_matrix<Scalar>(B.derived());
  const Vector<Scalar> w_sq = Wr.rowwise().squaredNorm();
  detail::FactoredRowNorm<Scalar> work;
  work.resize(Wr.rows(), Wr.cols(), Am.rows());
  Vector<Scalar> n(Wr.rows());
  work.compute(Wr, w_sq, Am, Bm, scaling, n);
  return n;
}

}  // namespace dora
