#pragma once
/// \file detail/stored_product.hpp
/// Products with a frozen W, whatever it is stored as. Every use of W by the layers goes through
/// these functions: for an Eigen view of W (float or double, the layer's own Scalar) they are the
/// plain Eigen expressions; for a StoredWeight (bf16, f16, Q8_0: storage.hpp) they dequantize W one
/// tile at a time into a per-thread buffer and multiply the tile, so no dense copy of W exists.
///
/// Tiles are kTileRows x kTileCols of W (512 x 512: 1 MB in float). Y = X W^T walks W's rows (output
/// features) in blocks of kTileRows, the threads taking a block of rows each as split_product does,
/// and within a block adds the tiles along d_in: Y[:, rows] += X[:, cols] tile^T. dX = G W walks W's
/// columns, the threads a block of columns each, and adds tiles along d_out. Each W entry is
/// dequantized once per product. A GEMM repacks its other operand (X, G) for every tile, so the tile
/// is as large as a per-thread buffer should be; Eigen repacks it per block of W's rows too.

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../storage.hpp"
#include "parallel.hpp"
#ifdef DORA_WITH_DNNL
#include "../dnnl/bf16_matmul.hpp"
#endif

namespace dora {
namespace detail {

inline constexpr Eigen::Index kTileRows = 512, kTileCols = 512;

/// This thread's tile buffer (at least `entries` long). It only grows, so steady-state calls
/// allocate nothing; one per thread, so concurrent infer() calls never share it.
template <typename Scalar>
Scalar* tile_buffer(Eigen::Index entries) {
  thread_local std::vector<Scalar> buffer;
  if (buffer.size() < static_cast<std::size_t>(entries)) buffer.resize(static_cast<std::size_t>(entries));
  return buffer.data();
}

/// [begin, end) of part t of [0, extent) in whole multiples of `align`, as even as that allows.
inline std::pair<Eigen::Index, Eigen::Index> split_aligned(Eigen::Index extent, int parts, int t, Eigen::Index align) {
  const Eigen::Index per = ((extent + parts - 1) / parts + align - 1) / align * align;
  const Eigen::Index begin = std::min<Eigen::Index>(extent, static_cast<Eigen::Index>(t) * per);
  return {begin, std::min<Eigen::Index>(extent, begin + per)};
}

/// Runs f(begin, end) over [0, extent) split over `threads` threads in aligned blocks.
template <typename F>
void for_blocks(Eigen::Index extent, int threads, Eigen::Index align, F&& f) {
  if (threads == 1) {
    f(Eigen::Index(0), extent);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; ++t) {
    const std::pair<Eigen::Index, Eigen::Index> part = split_aligned(extent, threads, t, align);
    if (part.second > part.first) f(part.first, part.second);
  }
}

/// Threads for a tiled product: as for the layers' split (none under a BLAS that threads itself:
/// each tile's GEMM is then the BLAS's).
inline int stored_threads(Eigen::Index entries, Eigen::Index extent) {
  return blas_threads_itself() ? 1 : product_threads(entries, extent);
}

/// The tile walk every product with a stored W shares. The threads split W's rows (over_rows: the
/// products whose output columns are W's rows, Y = X W^T) or its columns (dX = G W), a block each;
/// each thread walks its block tile by tile, dequantizing each tile once into its buffer, and calls
/// use(r0, rows, c0, cols, tile, first) with first = the first tile of its output columns.
template <typename Scalar, typename Storage, typename Use>
void walk_tiles(const StoredWeight<Storage>& W, bool over_rows, Use&& use) {
  using Index = Eigen::Index;
  const Index d_out = W.rows(), d_in = W.cols();
  const Index tc = std::min<Index>(kTileCols, d_in);  // a multiple of the block size, or all of d_in
  const Index extent = over_rows ? d_out : d_in;
  const Index align = over_rows ? 16 : std::max<Index>(16, StorageTraits<Storage>::block);
  const Index outer_tile = over_rows ? kTileRows : tc, inner_tile = over_rows ? tc : kTileRows;
  const Index inner_extent = over_rows ? d_in : d_out;
  for_blocks(extent, stored_threads(d_out * d_in, extent), align, [&](Index begin, Index end) {
    Scalar* buffer = tile_buffer<Scalar>(kTileRows * tc);
    for (Index o0 = begin; o0 < end; o0 += outer_tile) {
      const Index outer = std::min<Index>(outer_tile, end - o0);
      for (Index i0 = 0; i0 < inner_extent; i0 += inner_tile) {
        const Index inner = std::min<Index>(inner_tile, inner_extent - i0);
        const Index r0 = over_rows ? o0 : i0, rows = over_rows ? outer : inner;
        const Index c0 = over_rows ? i0 : o0, cols = over_rows ? inner : outer;
        W.dequantize(r0, rows, c0, cols, buffer, cols);
        const Eigen::Map<const Matrix<Scalar>> tile(buffer, rows, cols);
        use(r0, rows, c0, cols, tile, i0 == 0);
      }
    }
  });
}

#ifdef DORA_WITH_DNNL
// The oneDNN bf16 backend takes float row-major operands with direct access (any leading dimension).
template <typename D>
constexpr bool dnnl_operand() {
  using T = std::decay_t<D>;
  return std::is_same<typename T::Scalar, float>::value &&
         (Eigen::internal::traits<T>::Flags & Eigen::DirectAccessBit) != 0 &&
         (Eigen::internal::traits<T>::Flags & Eigen::RowMajorBit) != 0;
}
template <typename DA, typename Storage, typename DB>
constexpr bool dnnl_eligible() {
  return std::is_same<Storage, bfloat16>::value && dnnl_operand<DA>() && dnnl_operand<DB>();
}
#endif

/// Whether products of a Scalar matrix with W round that operand to bf16 (the oneDNN backend on a
/// bf16-stored W): a layer then splits what must keep float precision into two bf16 parts.
template <typename Scalar, typename Weight>
bool rounds_operands(const Weight&) {
#ifdef DORA_WITH_DNNL
  if constexpr (std::is_same<Weight, StoredWeight<bfloat16>>::value && std::is_same<Scalar, float>::value)
    return dnnl_backend::enabled();
#endif
  return false;
}

/// C = beta C + alpha op(A) op(B) (op: transpose where ta / tb), for the adapter's own rank-r float
/// products (x A^T, u B^T, G B, du^T x, G^T u, du A). Where the layer's frozen products run on
/// oneDNN (use_dnnl: rounds_operands), these go to oneDNN's float sgemm, which on the 16-core Xeon
/// took half of Eigen's time for them (4096 x 4096, r = 16, 16 threads: 0.72 ms against 1.90;
/// bench/results/device/2026-12-01-dnnl-gemm-probe.txt); they stay float either way. Elsewhere Eigen.
template <typename DA, typename DB, typename DC>
void rank_product(bool use_dnnl, const Eigen::MatrixBase<DA>& A, bool ta, const Eigen::MatrixBase<DB>& B, bool tb,
                  typename DA::Scalar alpha, typename DA::Scalar beta, DC&& C) {
#ifdef DORA_WITH_DNNL
  if constexpr (dnnl_operand<DA>() && dnnl_operand<DB>() && dnnl_operand<DC>()) {
    if (use_dnnl && C.size() > 0) {
      const Eigen::Index K = ta ? A.rows() : A.cols();
      if (K == 0) {
        C *= beta;
        return;
      }
      const dnnl_status_t status = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', C.rows(), C.cols(), K, alpha,
                                              A.derived().data(), A.derived().outerStride(), B.derived().data(),
                                              B.derived().outerStride(), beta, C.data(), C.outerStride());
      if (status == dnnl_success) return;
    }
  }
#endif
  (void)use_dnnl;
  gemm(A, ta, B, tb, std::forward<DC>(C), alpha, beta);
}

/// Y = X W^T (accumulate: Y += X W^T) for a stored W. precise: on the oneDNN backend, X keeps
/// 2^-16 relative precision (two bf16 parts) rather than 2^-8; the other paths are float anyway.
template <typename DX, typename Storage, typename DY>
void split_product(const Eigen::MatrixBase<DX>& X, const StoredWeight<Storage>& W, DY&& Y, bool accumulate = false,
                   [[maybe_unused]] bool precise = false) {
  using Index = Eigen::Index;
#ifdef DORA_WITH_DNNL
  if constexpr (dnnl_eligible<DX, Storage, DY>()) {
    if (dnnl_backend::enabled() && X.rows() > 0) {
      dnnl_backend::product(X.derived().data(), X.rows(), X.cols(), X.derived().outerStride(), W.data, W.rows(),
                            W.row_stride, Y.data(), Y.outerStride(), accumulate, precise);
      return;
    }
  }
#endif
  walk_tiles<typename DX::Scalar>(W, true,
                                  [&](Index r0, Index rows, Index c0, Index cols,
                                      const Eigen::Map<const Matrix<typename DX::Scalar>>& tile, bool first) {
                                    const typename DX::Scalar beta(first && !accumulate ? 0 : 1);
                                    gemm(X.middleCols(c0, cols), false, tile, true, Y.middleCols(r0, rows), 1, beta);
                                  });
}

/// The evaluation path's Y = X W^T for a stored W. Up to kSmallBatch rows of X (single-token
/// inference) the product is bandwidth-bound: each row of W is dequantized into a buffer that
/// stays in L1 and used at once for the few dot products, rows of W spread over threads (a tile
/// written to and read back from L2 made n = 1 1.3-1.9x slower than a float W on the 16-core Xeon).
/// Above, the tiled product.
template <typename DX, typename Storage, typename DY>
void frozen_product(const Eigen::MatrixBase<DX>& X, const StoredWeight<Storage>& W, DY&& Y) {
  using Scalar = typename DX::Scalar;
  using Index = Eigen::Index;
  const Index N = X.rows(), d_out = W.rows(), d_in = W.cols();
  if (N > kSmallBatch || N == 0) {
    split_product(X, W, Y);
    return;
  }
  for_blocks(d_out, stored_threads(d_out * d_in, d_out), 16, [&](Index begin, Index end) {
    Scalar* row = tile_buffer<Scalar>(d_in);
    const Eigen::Map<const Vector<Scalar>> w(row, d_in);
    for (Index i = begin; i < end; ++i) {
      W.dequantize(i, 1, 0, d_in, row, d_in);
      for (Index t = 0; t < N; ++t) Y(t, i) = X.row(t).dot(w.transpose());
    }
  });
}

/// dX = G W (accumulate: dX += G W) for a stored W.
template <typename DG, typename Storage, typename DX>
void stored_adjoint(const Eigen::MatrixBase<DG>& G, const StoredWeight<Storage>& W, DX&& dX, bool accumulate,
                    [[maybe_unused]] bool precise = false) {
  using Index = Eigen::Index;
#ifdef DORA_WITH_DNNL
  if constexpr (dnnl_eligible<DG, Storage, DX>()) {
    if (dnnl_backend::enabled() && G.rows() > 0) {
      dnnl_backend::adjoint(G.derived().data(), G.rows(), G.cols(), G.derived().outerStride(), W.data, W.cols(),
                            W.row_stride, dX.data(), dX.outerStride(), accumulate, precise);
      return;
    }
  }
#endif
  walk_tiles<typename DG::Scalar>(W, false,
                                  [&](Index r0, Index rows, Index c0, Index cols,
                                      const Eigen::Map<const Matrix<typename DG::Scalar>>& tile, bool first) {
                                    const typename DG::Scalar beta(first && !accumulate ? 0 : 1);
                                    gemm(G.middleCols(r0, rows), false, tile, false, dX.middleCols(c0, cols), 1, beta);
                                  });
}

template <typename DG, typename Storage, typename DX>
void split_adjoint_product(const Eigen::MatrixBase<DG>& G, const StoredWeight<Storage>& W, DX&& dX) {
  stored_adjoint(G, W, dX, false);
}

// ---- The uses of W by DoRA's norm (dora_core.hpp, row_norm.hpp): Eigen view or stored. These
// keep float precision on the oneDNN backend too (precise). ----

/// Y = X W^T (P^T = A W^T for the norm).
template <typename DX, typename WeightMap, typename DY>
void weight_product(const Eigen::MatrixBase<DX>& X, const WeightMap& W, DY& Y) {
  gemm(X, false, W, true, Y);
}
template <typename DX, typename Storage, typename DY>
void weight_product(const Eigen::MatrixBase<DX>& X, const StoredWeight<Storage>& W, DY& Y) {
  split_product(X, W, Y, false, true);
}

/// dX += G W (the exact gradient's term of dA).
template <typename DG, typename WeightMap, typename DX>
void weight_adjoint_add(const Eigen::MatrixBase<DG>& G, const WeightMap& W, DX& dX) {
  gemm(G, false, W, false, dX, 1, 1);
}
template <typename DG, typename Storage, typename DX>
void weight_adjoint_add(const Eigen::MatrixBase<DG>& G, const StoredWeight<Storage>& W, DX& dX) {
  stored_adjoint(G, W, dX, true, true);
}

/// v = W_i (one row, for a norm computed directly).
template <typename WeightMap, typename DV>
void weight_row(const WeightMap& W, Eigen::Index i, DV& v) {
  v.noalias() = W.row(i);
}
template <typename Storage, typename DV>
void weight_row(const StoredWeight<Storage>& W, Eigen::Index i, DV& v) {
  W.dequantize(i, 1, 0, W.cols(), v.data(), W.cols());
}

/// ||W_i||^2 for every row, from the stored values.
template <typename Scalar, typename WeightMap>
Vector<Scalar> weight_row_squared_norms(const WeightMap& W) {
  return W.rowwise().squaredNorm();
}
template <typename Scalar, typename Storage>
Vector<Scalar> weight_row_squared_norms(const StoredWeight<Storage>& W) {
  Vector<Scalar> out(W.rows());
  const Eigen::Index d_in = W.cols();
  parallel_rows(W.rows(), d_in, [&](Eigen::Index begin, Eigen::Index end) {
    Scalar* row = tile_buffer<Scalar>(d_in);
    for (Eigen::Index i = begin; i < end; ++i) {
      W.dequantize(i, 1, 0, d_in, row, d_in);
      out[i] = Eigen::Map<const Vector<Scalar>>(row, d_in).squaredNorm();
    }
  });
  return out;
}

/// Rows first, first + step, ... (count of them) of W, in place (a grouped convolution's norm chunk).
template <typename Scalar>
Eigen::Map<const Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>> weight_strided_rows(
    const Eigen::Map<const Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>& W, Eigen::Index first,
    Eigen::Index step, Eigen::Index count) {
  return Eigen::Map<const Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>(
      W.data() + first * W.outerStride(), count, W.cols(), Eigen::OuterStride<>(step * W.outerStride()));
}
template <typename Storage>
StoredWeight<Storage> weight_strided_rows(const StoredWeight<Storage>& W, Eigen::Index first, Eigen::Index step,
                                          Eigen::Index count) {
  return W.strided_rows(first, step, count);
}

template <typename T>
struct is_stored_weight : std::false_type {};
template <typename Storage>
struct is_stored_weight<StoredWeight<Storage>> : std::true_type {};

/// A stored table read as its transpose: an embedding's lowered W (embedding_dim x num_embeddings)
/// when the table (num_embeddings x embedding_dim) is stored. Its products are the table's own
/// tiled products the other way round, so the table is never transposed or widened either.
template <typename Storage>
struct TransposedStored {
  StoredWeight<Storage> table;
  Eigen::Index rows() const { return table.cols(); }
  Eigen::Index cols() const { return table.rows(); }
};

/// Y = X T^T = X table.
template <typename DX, typename Storage, typename DY>
void weight_product(const Eigen::MatrixBase<DX>& X, const TransposedStored<Storage>& T, DY& Y) {
  stored_adjoint(X, T.table, Y, false, true);
}
/// dX += G T = G table^T.
template <typename DG, typename Storage, typename DX>
void weight_adjoint_add(const Eigen::MatrixBase<DG>& G, const TransposedStored<Storage>& T, DX& dX) {
  split_product(G, T.table, dX, true, true);
}
/// v = T_j, column j of the table: the block holding column j, dequantized row by row.
template <typename Storage, typename DV>
void weight_row(const TransposedStored<Storage>& T, Eigen::Index j, DV& v) {
  using Scalar = typename DV::Scalar;
  constexpr Eigen::Index block = StorageTraits<Storage>::block;
  Scalar values[block];
  const Eigen::Index c0 = j / block * block;
  for (Eigen::Index i = 0; i < T.table.rows(); ++i) {
    T.table.dequantize(i, 1, c0, block, values, block);
    v[i] = values[j - c0];
  }
}
/// ||T_j||^2 for every row of T: the table's column norms, the threads a block of columns each.
template <typename Scalar, typename Storage>
Vector<Scalar> weight_row_squared_norms(const TransposedStored<Storage>& T) {
  const StoredWeight<Storage>& table = T.table;
  Vector<Scalar> out = Vector<Scalar>::Zero(table.cols());
  const Eigen::Index align = std::max<Eigen::Index>(16, StorageTraits<Storage>::block);
  for_blocks(table.cols(), stored_threads(table.rows() * table.cols(), table.cols()), align,
             [&](Eigen::Index begin, Eigen::Index end) {
               const Eigen::Index width = end - begin;
               Scalar* row = tile_buffer<Scalar>(width);
               for (Eigen::Index i = 0; i < table.rows(); ++i) {
                 table.dequantize(i, 1, begin, width, row, width);
                 out.segment(begin, width).array() += Eigen::Map<const Vector<Scalar>>(row, width).array().square();
               }
             });
  return out;
}

/// W as a dense matrix in the compute type (merging only: it is the size of W).
template <typename Scalar, typename WeightMap>
Matrix<Scalar> weight_dense(const WeightMap& W) {
  return W;
}
template <typename Scalar, typename Storage>
Matrix<Scalar> weight_dense(const StoredWeight<Storage>& W) {
  return dequantize<Scalar>(W);
}
template <typename Scalar, typename Storage>
Matrix<Scalar> weight_dense(const TransposedStored<Storage>& T) {
  return dequantize<Scalar>(T.table).transpose();
}

}  // namespace detail
}  // namespace dora
