#pragma once
/// \file detail/parallel.hpp
/// The frozen product Y = X W^T for a few rows of X (single-token and small-batch inference).
/// Eigen's GEMM packs all of W on every call, which at n = 2..32 rows costs more than the
/// arithmetic (4096 x 4096, n = 4: 20 ms against 2.5 ms for reading W once), and Eigen does not
/// thread a matrix-vector product. So for n <= kSmallBatch:
///   - n = 1: Eigen's matrix-vector product, split over blocks of W's rows with OpenMP;
///   - n = 2..8: blocks of 16 rows of W, each read once from memory and reused from cache for all n
///     rows of X (coefficient-wise dot products of contiguous rows), blocks spread over threads.
/// The path depends only on the shapes and the thread count, and a layer's evaluation forward and
/// its infer() call this same function, so they agree bit for bit.
///
/// Above kSmallBatch rows the large products are split by the layer itself, not by Eigen: Y = X W^T
/// over W's rows (output features) and dX = G W over W's columns (input features), one block of W
/// per thread, each block an Eigen GEMM running single-threaded inside the parallel region (Eigen
/// does not nest: it threads a product only outside one). So W is read once in total and no packed
/// panel is shared between threads. Measured on the 16-core Xeon (AVX-512), fp32, 16 threads,
/// 4096 x 4096: [x; A] W^T with 512 + 16 rows 28.0 ms with Eigen's threading against 16.2 ms split,
/// G W 20.4 against 15.6 ms; 11008 x 4096, 512 + 64 rows: 64.1 against 46.5, G W 60.9 against 42.7;
/// at 32 rows 10.8 against 1.7 ms (Eigen packs all of W per call and barely threads such a product).
/// Without OpenMP, with one thread, or inside a parallel region: Eigen's product.

#include <algorithm>
#include <utility>

#include "../base_layer.hpp"
#include "gemm.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dora {
namespace detail {

/// Rows of X up to which the frozen product takes the small-batch path (dot products).
inline constexpr Eigen::Index kSmallBatch = 8;
/// Entries of W from which the small-batch product is spread over OpenMP threads.
inline constexpr Eigen::Index kParallelWork = Eigen::Index(1) << 18;

/// Threads for a product with W (d_out x d_in) split along a side of `extent`: OpenMP's maximum
/// where W is large enough (1 MB in float) for the split to pay for waking a team and every thread
/// gets at least 64 rows or columns of W; else 1 (and 1 inside a parallel region).
inline int product_threads(Eigen::Index weight_entries, Eigen::Index extent) {
#ifdef _OPENMP
  if (!omp_in_parallel() && weight_entries >= kParallelWork && extent >= 64 * omp_get_max_threads())
    return omp_get_max_threads();
#else
  (void)weight_entries;
  (void)extent;
#endif
  return 1;
}

/// With EIGEN_USE_BLAS (-DDORA_USE_BLAS=ON) Eigen hands the large products to a BLAS that runs its
/// own threads: splitting them over OpenMP threads too would oversubscribe the cores.
constexpr bool blas_threads_itself() {
#ifdef EIGEN_USE_BLAS
  return true;
#else
  return false;
#endif
}

/// [begin, end) of part t of [0, extent) cut into `parts` blocks of whole 16-entry groups (a cache
/// line of floats) as even as that allows.
inline std::pair<Eigen::Index, Eigen::Index> split_range(Eigen::Index extent, int parts, int t) {
  const Eigen::Index per = ((extent + parts - 1) / parts + 15) / 16 * 16;
  const Eigen::Index begin = std::min<Eigen::Index>(extent, static_cast<Eigen::Index>(t) * per);
  return {begin, std::min<Eigen::Index>(extent, begin + per)};
}

/// Y = X W^T (Y: N x d_out), overwritten, split over W's rows when threads pay (see the file
/// comment); any N.
template <typename DX, typename WeightMap, typename DY>
void split_product(const Eigen::MatrixBase<DX>& X, const WeightMap& W, DY&& Y) {
  const int threads = blas_threads_itself() ? 1 : product_threads(W.rows() * W.cols(), W.rows());
  if (threads == 1) {
    gemm(X, false, W, true, Y);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; ++t) {
    const std::pair<Eigen::Index, Eigen::Index> part = split_range(W.rows(), threads, t);
    if (part.second > part.first)
      gemm(X, false, W.middleRows(part.first, part.second - part.first), true,
           Y.middleCols(part.first, part.second - part.first));
  }
}

/// dX = G W (dX: N x d_in), overwritten, split over W's columns when threads pay.
template <typename DG, typename WeightMap, typename DX>
void split_adjoint_product(const Eigen::MatrixBase<DG>& G, const WeightMap& W, DX&& dX) {
  const int threads = blas_threads_itself() ? 1 : product_threads(W.rows() * W.cols(), W.cols());
  if (threads == 1) {
    gemm(G, false, W, false, dX);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; ++t) {
    const std::pair<Eigen::Index, Eigen::Index> part = split_range(W.cols(), threads, t);
    if (part.second > part.first)
      gemm(G, false, W.middleCols(part.first, part.second - part.first), false,
           dX.middleCols(part.first, part.second - part.first));
  }
}

/// Runs f(begin, end) over [0, rows) in one block per thread when the pass touches at least
/// kParallelWork entries (cols per row), else once over everything: for the layers' element-wise
/// passes (compose, G diag(g), the norm's row terms), each row independent of the others.
template <typename F>
void parallel_rows(Eigen::Index rows, Eigen::Index cols, F&& f) {
  int threads = 1;
#ifdef _OPENMP
  if (!omp_in_parallel() && rows * cols >= kParallelWork && rows >= 2 * omp_get_max_threads())
    threads = omp_get_max_threads();
#else
  (void)cols;
#endif
  if (threads == 1) {
    f(Eigen::Index(0), rows);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; ++t) {
    const Eigen::Index per = (rows + threads - 1) / threads;
    const Eigen::Index begin = std::min<Eigen::Index>(rows, static_cast<Eigen::Index>(t) * per);
    const Eigen::Index end = std::min<Eigen::Index>(rows, begin + per);
    if (end > begin) f(begin, end);
  }
}

/// Y = X W^T (Y: N x d_out, X: N x d_in, W: d_out x d_in, all row-major), overwritten: the
/// small-batch path up to kSmallBatch rows, split_product above.
template <typename DX, typename WeightMap, typename DY>
void frozen_product(const Eigen::MatrixBase<DX>& X, const WeightMap& W, DY&& Y) {
  using Index = Eigen::Index;
  const Index N = X.rows(), d_out = W.rows();
  const int threads = product_threads(d_out * W.cols(), d_out);
  // Dot products beat Eigen's GEMM only at a few rows: measured on a 16-core Xeon (AVX-512),
  // 4096 x 4096, one thread: n = 4 7.6 against 13 ms, n = 32 27 against 20 ms; 16 threads: n = 4
  // 1.0 ms, n = 32 6 ms against 1.7 ms for split_product.
  if (N > kSmallBatch || N == 0 || (N == 1 && threads == 1)) {
    split_product(X, W, Y);
    return;
  }
  if (N == 1) {
    // Blocks of whole cache lines of Y (16 floats), as even as that allows; one per thread.
    const Index per = ((d_out + threads - 1) / threads + 15) / 16 * 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; ++t) {
      const Index begin = std::min<Index>(d_out, static_cast<Index>(t) * per);
      const Index size = std::min<Index>(d_out, begin + per) - begin;
      if (size > 0) gemm(X, false, W.middleRows(begin, size), true, Y.middleCols(begin, size));
    }
    return;
  }
  constexpr Index kBlock = 16;
  const Index blocks = (d_out + kBlock - 1) / kBlock;
  // On views, so that every caller's operand types share one instantiation (gemm.hpp).
  const ConstGemmView<typename DX::Scalar> x = gemm_view(X);
  const ConstGemmView<typename DX::Scalar> w = gemm_view(W);
  GemmView<typename DX::Scalar> y = gemm_out(std::forward<DY>(Y));
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (Index b = 0; b < blocks; ++b) {
    const Index begin = b * kBlock, size = std::min<Index>(kBlock, d_out - begin);
    y.middleCols(begin, size).noalias() = x.lazyProduct(w.middleRows(begin, size).transpose());
  }
}

}  // namespace detail
}  // namespace dora
