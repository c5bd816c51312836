#pragma once
/// \file detail/parallel.hpp
/// The frozen product Y = X W^T for a few rows of X (single-token and small-batch inference).
/// Eigen's GEMM packs all of W on every call, which at n = 2..32 rows costs more than the
/// arithmetic (4096 x 4096, n = 4: 20 ms against 2.5 ms for reading W once), and Eigen does not
/// thread a matrix-vector product. So for n <= kSmallBatch:
///   - n = 1: Eigen's matrix-vector product, split over blocks of W's rows with OpenMP;
///   - n = 2..min(32, 8 x threads): blocks of 16 rows of W, each read once from memory and reused
///     from cache for all n rows of X (coefficient-wise dot products of contiguous rows), blocks
///     spread over threads.
/// The path depends only on the shapes and the thread count, and a layer's evaluation forward and
/// its infer() call this same function, so they agree bit for bit. Above kSmallBatch rows, without OpenMP, or inside a
/// parallel region: Eigen's product (single-threaded inside a parallel region).

#include <algorithm>

#include "../base_layer.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dora {
namespace detail {

/// Rows of X up to which the frozen product takes the small-batch path.
inline constexpr Eigen::Index kSmallBatch = 32;
/// Entries of W from which the small-batch product is spread over OpenMP threads.
inline constexpr Eigen::Index kParallelWork = Eigen::Index(1) << 18;

/// Y = X W^T (Y: N x d_out, X: N x d_in, W: d_out x d_in, all row-major), overwritten.
template <typename DX, typename WeightMap, typename DY>
void frozen_product(const Eigen::MatrixBase<DX>& X, const WeightMap& W, DY&& Y) {
  using Index = Eigen::Index;
  const Index N = X.rows(), d_out = W.rows();
  int threads = 1;
#ifdef _OPENMP
  // Threads only where W is large enough (1 MB in float) for the split to pay for waking a team.
  if (!omp_in_parallel() && d_out * W.cols() >= kParallelWork && d_out >= 64 * omp_get_max_threads())
    threads = omp_get_max_threads();
#endif
  // Dot products beat Eigen's GEMM while the rows per thread are few: measured on a 16-core Xeon
  // (AVX-512), 4096 x 4096, one thread: n = 4 7.6 against 13 ms, n = 32 27 against 20 ms; 16
  // threads, n = 32: 6 against 11 ms. So up to 8 rows per thread.
  if (N > kSmallBatch || N == 0 || (N == 1 && threads == 1) || N > 8 * threads) {
    Y.noalias() = X * W.transpose();
    return;
  }
  if (N == 1) {
    // Blocks of whole cache lines of Y (16 floats), as even as that allows; one per thread.
    const Index per = ((d_out + threads - 1) / threads + 15) / 16 * 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; ++t) {
      const Index begin = std::min<Index>(d_out, static_cast<Index>(t) * per);
      const Index size = std::min<Index>(d_out, begin + per) - begin;
      if (size > 0) Y.middleCols(begin, size).noalias() = X * W.middleRows(begin, size).transpose();
    }
    return;
  }
  constexpr Index kBlock = 16;
  const Index blocks = (d_out + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (Index b = 0; b < blocks; ++b) {
    const Index begin = b * kBlock, size = std::min<Index>(kBlock, d_out - begin);
    Y.middleCols(begin, size).noalias() = X.lazyProduct(W.middleRows(begin, size).transpose());
  }
}

}  // namespace detail
}  // namespace dora
