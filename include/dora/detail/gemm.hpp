#pragma once
/// \file detail/gemm.hpp
/// The one matrix product of the library: C = beta C + alpha op(A) op(B), op a transpose or not, on
/// row-major views (pointer, sizes, row stride), like BLAS's gemm. Every product the layers compute
/// (frozen, rank-r, merge, norm) is a call to gemm().
///
/// Why one function: Eigen instantiates its product machinery (the GEMM driver, its OpenMP split, the
/// coefficient-based path for small sizes, the matrix-vector fallbacks) once per combination of
/// operand expression types, and a Block of a Ref, a Map, a Block of a Map ... are all different
/// types. Written as Eigen expressions at each site, one DoRA Linear layer held 44 such
/// combinations, each about a second of -O3 compile time: most of the minute it took to compile.
/// Through gemm() every layer, scalar type aside, shares the same eight product expressions.
///
/// Callers pass the operands as they are and say where they are transposed (ta, tb); an operand
/// must be a row-major block of memory with unit inner stride, a column vector, or the transpose of
/// one of those, which a static_assert enforces: any other expression would be copied silently.

#include <type_traits>

#include "check.hpp"
#include "eigen.hpp"

namespace dora {
namespace detail {

template <typename Scalar>
using GemmMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Scalar>
using ConstGemmView = Eigen::Map<const GemmMatrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <typename Scalar>
using GemmView = Eigen::Map<GemmMatrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Whether an expression type is memory gemm() can read as a row-major view.
template <typename D>
constexpr bool gemm_viewable() {
  using T = std::decay_t<D>;
  return (Eigen::internal::traits<T>::Flags & Eigen::DirectAccessBit) != 0 &&
         (static_cast<bool>(T::IsRowMajor) || T::ColsAtCompileTime == 1);
}

template <typename D>
Eigen::Index gemm_row_stride(const D& m) {
  // A column vector's rows are its inner stride apart; a row-major block's, its outer stride.
  if constexpr (static_cast<bool>(D::IsRowMajor))
    return m.outerStride();
  else
    return m.innerStride();
}

template <typename D>
ConstGemmView<typename D::Scalar> gemm_view(const Eigen::MatrixBase<D>& m) {
  static_assert(gemm_viewable<D>(),
                "dora::detail::gemm takes row-major memory (or a column vector); pass a transpose flag, not a "
                "transposed expression");
  const D& d = m.derived();
  eigen_assert(!static_cast<bool>(D::IsRowMajor) || d.rows() <= 1 || d.cols() <= 1 || d.innerStride() == 1);
  return ConstGemmView<typename D::Scalar>(d.data(), d.rows(), d.cols(), Eigen::OuterStride<>(gemm_row_stride(d)));
}

template <typename D>
GemmView<typename std::decay_t<D>::Scalar> gemm_out(D&& m) {
  using T = std::decay_t<D>;
  static_assert(gemm_viewable<T>(), "dora::detail::gemm writes row-major memory (or a column vector)");
  return GemmView<typename T::Scalar>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(gemm_row_stride(m)));
}

/// The product on views: one Eigen expression per transpose case.
template <typename Scalar>
void gemm_views(const ConstGemmView<Scalar>& A, bool ta, const ConstGemmView<Scalar>& B, bool tb, Scalar alpha,
                Scalar beta, GemmView<Scalar> C) {
  // beta = 0 overwrites (a NaN in C does not survive), as BLAS does; Eigen's own `C = A B` is this
  // setZero followed by the same accumulation, so results are those of the expressions it replaces.
  if (beta == Scalar(0))
    C.setZero();
  else if (beta != Scalar(1))
    C *= beta;
  if (C.size() == 0 || (ta ? A.rows() : A.cols()) == 0) return;
  // alpha = 1 has expressions of its own: where C is a single row or column at run time, Eigen
  // turns the product into a matrix-vector one, and the vector taken from a scaled operand would
  // be evaluated into a temporary (an allocation in a loop that must make none).
  if (alpha == Scalar(1)) {
    if (ta && tb)
      C.noalias() += A.transpose() * B.transpose();
    else if (ta)
      C.noalias() += A.transpose() * B;
    else if (tb)
      C.noalias() += A * B.transpose();
    else
      C.noalias() += A * B;
  } else {
    if (ta && tb)
      C.noalias() += alpha * A.transpose() * B.transpose();
    else if (ta)
      C.noalias() += alpha * A.transpose() * B;
    else if (tb)
      C.noalias() += alpha * A * B.transpose();
    else
      C.noalias() += alpha * A * B;
  }
}

template <typename D>
struct is_transpose : std::false_type {};
template <typename D>
struct is_transpose<Eigen::Transpose<D>> : std::true_type {};

/// An operand's memory: a transposed expression (an embedding's lowered W is its table transposed)
/// is its nested matrix with the transpose flag flipped.
template <typename D>
ConstGemmView<typename D::Scalar> gemm_operand(const Eigen::MatrixBase<D>& m, bool& transposed) {
  if constexpr (is_transpose<D>::value) {
    transposed = !transposed;
    return gemm_operand(m.derived().nestedExpression(), transposed);
  } else {
    return gemm_view(m);
  }
}

/// C = beta C + alpha op(A) op(B), op(X) = X^T where the flag is set. C must not overlap A or B.
template <typename DA, typename DB, typename DC>
void gemm(const Eigen::MatrixBase<DA>& A, bool ta, const Eigen::MatrixBase<DB>& B, bool tb, DC&& C,
          typename DA::Scalar alpha = 1, typename DA::Scalar beta = 0) {
  const ConstGemmView<typename DA::Scalar> a = gemm_operand(A, ta);
  const ConstGemmView<typename DA::Scalar> b = gemm_operand(B, tb);
  const Eigen::Index rows = ta ? a.cols() : a.rows(), cols = tb ? b.rows() : b.cols();
  // An owning destination is sized by an overwrite, as Eigen's `C = A B` would size it.
  if constexpr (std::is_base_of<Eigen::PlainObjectBase<std::decay_t<DC>>, std::decay_t<DC>>::value)
    if (beta == typename DA::Scalar(0)) C.resize(rows, cols);
  DORA_CHECK_STATE((ta ? a.rows() : a.cols()) == (tb ? b.cols() : b.rows()) && C.rows() == rows && C.cols() == cols,
                   "internal product of mismatched sizes: ", rows, " x ", (ta ? a.rows() : a.cols()), " times ",
                   (tb ? b.cols() : b.rows()), " x ", cols, " into ", C.rows(), " x ", C.cols());
  gemm_views<typename DA::Scalar>(a, ta, b, tb, alpha, beta, gemm_out(std::forward<DC>(C)));
}

}  // namespace detail
}  // namespace dora
