#pragma once
/// \file embedding.hpp
/// LoRA and DoRA on a frozen embedding table (PEFT's lora.Embedding, use_dora False / True).
///
/// The table W is num_embeddings x embedding_dim (torch's nn.Embedding.weight); ids select rows.
/// PEFT's factors are lora_embedding_A (r x num_embeddings) and lora_embedding_B (embedding_dim x r):
///   LoRA:  y_t = W[i_t] + s A^T[i_t] B^T
///   DoRA:  y_t = (W[i_t] + s A^T[i_t] B^T) * g,  g = m / n,  n_j = ||(W + s (B A)^T)[:, j]||
/// so the layer is a linear layer on the lowered map W^T (embedding_dim x num_embeddings) applied to
/// one-hot inputs, and DoRA's norm is that map's row norm: one per embedding dimension, over the
/// whole vocabulary (docs/math.md, section on embeddings). The products are gathers and
/// scatter-adds: forward and the detached backward touch only the rows (ids) the batch hits, plus
/// the norm, whose P^T = A W costs r x num_embeddings x embedding_dim per training step (evaluation
/// caches it, like every DoRA layer).
///
/// As in PEFT 0.21: no dropout (PEFT's Embedding never applies lora_dropout; config.dropout is
/// accepted and ignored), no bias, and padding_idx only blocks the gradient of column padding_idx
/// of A through the lookup (the forward reads that row like any other). Initialisation follows
/// PEFT's rule for embeddings: A = 0, B ~ N(0, 1).

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "detail/adapter.hpp"
#include "detail/dora_core.hpp"

namespace dora {

/// Token ids, one per row of the output.
using TokenIds = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;

/// A borrowed view of a frozen embedding table W (num_embeddings x embedding_dim, row-major).
/// Storage: how the table is stored: Scalar (an Eigen view), or bfloat16 / float16 / BlockQ8_0 /
/// BlockQ4_0 (a StoredWeight: rows are dequantized as the lookup reads them, and the norm's products
/// with the table run over dequantized tiles; the block formats need embedding_dim a multiple of 32).
template <typename Scalar, typename Storage = Scalar>
struct EmbeddingBase {
  static_assert(std::is_floating_point<Scalar>::value, "dora: Scalar must be float, double or long double");
  static_assert(std::is_same<Scalar, Storage>::value || detail::is_stored_format<Storage>(),
                "dora: the table is stored as the layer's Scalar, bfloat16, float16, BlockQ8_0 or BlockQ4_0");
  static constexpr bool kNative = std::is_same<Scalar, Storage>::value;
  using WeightMap =
      std::conditional_t<kNative, Eigen::Map<const Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>,
                         StoredWeight<Storage>>;

  /// padding_idx: the id whose column of A gets no gradient through the lookup (torch's
  /// nn.Embedding padding_idx; a negative value counts from the end, as in torch); no_padding: none.
  /// row_stride counts stored elements (values, or blocks for Q8_0 and Q4_0).
  EmbeddingBase(const Storage* weight_data, Eigen::Index num_embeddings, Eigen::Index embedding_dim,
                Eigen::Index row_stride, Eigen::Index padding_idx)
      : weight(make_weight(weight_data, num_embeddings, embedding_dim, row_stride)) {
    if (padding_idx != no_padding) {
      DORA_CHECK_ARG(padding_idx >= -num_embeddings && padding_idx < num_embeddings, "padding_idx ", padding_idx,
                     " is outside [-num_embeddings, num_embeddings) = [", -num_embeddings, ", ", num_embeddings, ")");
      this->padding_idx = padding_idx < 0 ? padding_idx + num_embeddings : padding_idx;
    }
  }

  Eigen::Index num_embeddings() const { return weight.rows(); }
  Eigen::Index embedding_dim() const { return weight.cols(); }
  bool has_padding_idx() const { return padding_idx != no_padding; }
  /// Bytes of the stored table (row padding excluded).
  std::size_t weight_bytes() const {
    if constexpr (kNative)
      return static_cast<std::size_t>(weight.rows()) * static_cast<std::size_t>(weight.cols()) * sizeof(Scalar);
    else
      return weight.bytes();
  }

  static constexpr Eigen::Index no_padding = std::numeric_limits<Eigen::Index>::min();
  WeightMap weight;                       ///< W, num_embeddings x embedding_dim
  Eigen::Index padding_idx = no_padding;  ///< in [0, num_embeddings), or no_padding

 private:
  static WeightMap make_weight(const Storage* data, Eigen::Index num_embeddings, Eigen::Index embedding_dim,
                               Eigen::Index row_stride) {
    constexpr Eigen::Index block = detail::storage_block<Storage>();
    DORA_CHECK_ARG(data != nullptr, "embedding table data is null");
    DORA_CHECK_ARG(num_embeddings >= 1 && embedding_dim >= 1, "embedding table must be non-empty, got ", num_embeddings,
                   " x ", embedding_dim);
    DORA_CHECK_ARG(embedding_dim % block == 0, "a ", detail::storage_name<Storage>(),
                   " embedding table needs embedding_dim a multiple of ", block, ", got ", num_embeddings, " x ",
                   embedding_dim);
    DORA_CHECK_ARG(row_stride >= embedding_dim / block, "embedding table row stride ", row_stride,
                   " is less than embedding_dim ", embedding_dim, block > 1 ? " / 32" : "");
    if constexpr (kNative)
      return WeightMap(data, num_embeddings, embedding_dim, Eigen::OuterStride<>(row_stride));
    else
      return WeightMap(data, num_embeddings, embedding_dim, row_stride);
  }
};

/// Borrow a table (no padding_idx). It must outlive the adapter (BaseLayer's lifetime rule).
template <typename Scalar>
EmbeddingBase<Scalar> borrow_embedding(const Matrix<Scalar>& weight,
                                       Eigen::Index padding_idx = EmbeddingBase<Scalar>::no_padding) {
  return EmbeddingBase<Scalar>(weight.data(), weight.rows(), weight.cols(), weight.cols(), padding_idx);
}
template <typename Scalar>
EmbeddingBase<Scalar> borrow_embedding(Matrix<Scalar>&&, Eigen::Index = 0) = delete;
/// Borrow raw row-major memory, e.g. a tensor inside a memory-mapped checkpoint.
template <typename Scalar>
EmbeddingBase<Scalar> borrow_embedding(const Scalar* weight, Eigen::Index num_embeddings, Eigen::Index embedding_dim,
                                       Eigen::Index padding_idx = EmbeddingBase<Scalar>::no_padding) {
  return EmbeddingBase<Scalar>(weight, num_embeddings, embedding_dim, embedding_dim, padding_idx);
}
/// Borrow a table stored as bf16, f16, Q8_0 or Q4_0 for a layer computing in Scalar, e.g. a
/// memory-mapped checkpoint's bf16 tensor: `borrow_embedding<float>(table_bf16, V, E)`. For the block
/// formats, weight points to num_embeddings x embedding_dim / 32 blocks. Nothing is copied.
template <typename Scalar, typename Storage, typename = std::enable_if_t<detail::is_stored_format<Storage>()>>
EmbeddingBase<Scalar, Storage> borrow_embedding(const Storage* weight, Eigen::Index num_embeddings,
                                                Eigen::Index embedding_dim,
                                                Eigen::Index padding_idx = EmbeddingBase<Scalar>::no_padding) {
  return EmbeddingBase<Scalar, Storage>(weight, num_embeddings, embedding_dim,
                                        embedding_dim / detail::storage_block<Storage>(), padding_idx);
}
/// Borrow a table as encode_weight returns it.
template <typename Scalar, typename Storage, typename = std::enable_if_t<detail::is_stored_format<Storage>()>>
EmbeddingBase<Scalar, Storage> borrow_embedding(const std::vector<Storage>& stored, Eigen::Index num_embeddings,
                                                Eigen::Index embedding_dim,
                                                Eigen::Index padding_idx = EmbeddingBase<Scalar>::no_padding) {
  constexpr Eigen::Index block = detail::storage_block<Storage>();
  DORA_CHECK_ARG(
      num_embeddings >= 1 && embedding_dim >= 1 && embedding_dim % block == 0 &&
          static_cast<std::size_t>(num_embeddings) * static_cast<std::size_t>(embedding_dim / block) == stored.size(),
      "a ", detail::storage_name<Storage>(), " embedding table of ", num_embeddings, " x ", embedding_dim, " needs ",
      num_embeddings, " x ", embedding_dim / block, block > 1 ? " blocks (embedding_dim a multiple of 32)" : " values",
      ", got ", stored.size());
  return borrow_embedding<Scalar>(stored.data(), num_embeddings, embedding_dim, padding_idx);
}
template <typename Scalar, typename Storage, typename = std::enable_if_t<detail::is_stored_format<Storage>()>>
EmbeddingBase<Scalar, Storage> borrow_embedding(std::vector<Storage>&&, Eigen::Index, Eigen::Index,
                                                Eigen::Index = 0) = delete;

namespace detail {

inline constexpr FactorSpec kEmbeddingFactors{
    "lora_embedding_A", "lora_embedding_B",   "num_embeddings", "embedding_dim", true,
    "embedding_dim",    "(no input gradient)"};

/// What LoRA and DoRA embeddings share: the lookup, the saved ids and u = A^T[ids], the scatter-add.
template <typename Derived, typename Scalar, typename Storage>
class EmbeddingAdapter : public Adapter<Derived, Scalar, Eigen::Ref<const TokenIds>> {
  using Base = Adapter<Derived, Scalar, Eigen::Ref<const TokenIds>>;
  friend Base;

 public:
  using MatrixType = Matrix<Scalar>;
  using Index = Eigen::Index;
  using InferWorkspace = MatrixType;

  const EmbeddingBase<Scalar, Storage>& base() const { return base_; }
  Index num_embeddings() const { return base_.num_embeddings(); }
  Index embedding_dim() const { return base_.embedding_dim(); }

 protected:
  static constexpr bool kHasInputGradient = false;

  EmbeddingAdapter(const EmbeddingBase<Scalar, Storage>& base, const AdapterConfig& config)
      : Base(kEmbeddingFactors, base.num_embeddings(), base.embedding_dim(), config), base_(base) {}
  EmbeddingAdapter(const EmbeddingBase<Scalar, Storage>& base, const AdapterConfig& config,
                   const Eigen::Ref<const MatrixType>& A, const Eigen::Ref<const MatrixType>& B)
      : Base(kEmbeddingFactors, base.num_embeddings(), base.embedding_dim(), config, A, B), base_(base) {}

  Index output_cols() const { return embedding_dim(); }
  Index input_cols() const { return 0; }
  Index saved_batch() const { return this->batch_; }

  void check_ids(const Eigen::Ref<const TokenIds>& ids, const Eigen::Ref<MatrixType>& y) const {
    DORA_CHECK_ARG(y.rows() == ids.rows() && y.cols() == embedding_dim(), "y must be N x embedding_dim = ", ids.rows(),
                   " x ", embedding_dim(), ", got ", y.rows(), " x ", y.cols());
    for (Index t = 0; t < ids.rows(); ++t) {
      DORA_CHECK_ARG(ids[t] >= 0 && ids[t] < num_embeddings(), "ids[", t, "] = ", ids[t],
                     " is outside [0, num_embeddings) = [0, ", num_embeddings(), ")");
    }
  }

  /// u = A^T[ids] (N x r), the lookup of the low-rank branch.
  void gather_u(const Eigen::Ref<const TokenIds>& ids, MatrixType& u) const {
    u.resize(ids.rows(), this->rank());
    for (Index t = 0; t < ids.rows(); ++t) u.row(t) = this->A_.col(static_cast<Index>(ids[t])).transpose();
  }

  /// y = W[ids] + s u B^T (the undecorated lookup: LoRA's output, DoRA's h).
  template <typename Out>
  void lookup(const Eigen::Ref<const TokenIds>& ids, const MatrixType& u, Out& y) const {
    for (Index t = 0; t < ids.rows(); ++t) {
      typename Out::RowXpr row = y.row(t);
      weight_row(base_.weight, static_cast<Index>(ids[t]), row);
    }
    gemm(u, false, this->B_, true, y, this->scaling_, Scalar(1));
  }

  void save_ids(const Eigen::Ref<const TokenIds>& ids) {
    this->batch_ = ids.rows();
    ids_ = ids;
    gather_u(ids, u_);
  }

  /// dB += s Gs^T u, du = s Gs B, and the scatter-add dA[:, i_t] += du_t (not into padding_idx).
  template <typename DG>
  void accumulate_factors(const Eigen::MatrixBase<DG>& Gs) {
    gemm(Gs, true, u_, false, this->grad_B_, this->scaling_, Scalar(1));
    du_.resize(this->batch_, this->rank());
    gemm(Gs, false, this->B_, false, du_, this->scaling_);
    for (Index t = 0; t < this->batch_; ++t) {
      const Index id = static_cast<Index>(ids_[t]);
      if (id != base_.padding_idx) this->grad_A_.col(id) += du_.row(t).transpose();
    }
  }

  EmbeddingBase<Scalar, Storage> base_;
  TokenIds ids_;
  MatrixType u_, du_;
};

}  // namespace detail

/// Storage: how the table is stored (Scalar, or bfloat16 / float16 / BlockQ8_0 / BlockQ4_0).
template <typename Scalar, typename Storage = Scalar>
class LoraEmbedding : public detail::EmbeddingAdapter<LoraEmbedding<Scalar, Storage>, Scalar, Storage> {
  using Base = detail::EmbeddingAdapter<LoraEmbedding<Scalar, Storage>, Scalar, Storage>;
  friend class detail::Adapter<LoraEmbedding<Scalar, Storage>, Scalar, Eigen::Ref<const TokenIds>>;

 public:
  using MatrixType = Matrix<Scalar>;
  using Index = Eigen::Index;
  using Base::forward;
  using Base::infer;

  /// A = 0, B ~ N(0, 1) (PEFT's embedding initialisation). Borrows base.
  LoraEmbedding(const EmbeddingBase<Scalar, Storage>& base, const AdapterConfig& config) : Base(base, config) {}
  /// Starts from the given A (r x num_embeddings) and B (embedding_dim x r).
  LoraEmbedding(const EmbeddingBase<Scalar, Storage>& base, const AdapterConfig& config,
                const Eigen::Ref<const MatrixType>& A, const Eigen::Ref<const MatrixType>& B)
      : Base(base, config, A, B) {}

  /// y_t = W[i_t] + s A^T[i_t] B^T; y is N x embedding_dim.
  void forward(const Eigen::Ref<const TokenIds>& ids, Eigen::Ref<MatrixType> y) {
    this->check_ids(ids, y);
    this->save_ids(ids);
    this->lookup(ids, this->u_, y);
    this->saved_ = true;
  }
  /// Same as forward() in evaluation mode, modifying nothing (thread-safe; u is N x r workspace).
  void infer(const Eigen::Ref<const TokenIds>& ids, Eigen::Ref<MatrixType> y, MatrixType& u) const {
    this->check_ids(ids, y);
    this->gather_u(ids, u);
    this->lookup(ids, u, y);
  }

  /// W' = W + s (B A)^T (PEFT merge), num_embeddings x embedding_dim.
  MatrixType merged_weight() const {
    MatrixType merged = detail::weight_dense<Scalar>(this->base_.weight);
    detail::gemm(this->A_, true, this->B_, true, merged, this->scaling_, Scalar(1));
    return merged;
  }
  /// W = W' - s (B A)^T (PEFT unmerge).
  MatrixType unmerge(const Eigen::Ref<const MatrixType>& merged) const {
    DORA_CHECK_ARG(merged.rows() == this->num_embeddings() && merged.cols() == this->embedding_dim(),
                   "merged table must be num_embeddings x embedding_dim = ", this->num_embeddings(), " x ",
                   this->embedding_dim(), ", got ", merged.rows(), " x ", merged.cols());
    MatrixType W = merged;
    detail::gemm(this->A_, true, this->B_, true, W, -this->scaling_, Scalar(1));
    return W;
  }

 private:
  bool extra_parameters_match(const std::vector<Parameter<Scalar>>& p) const { return p.size() == 2; }
  void add_extra_parameters(std::vector<Parameter<Scalar>>&) {}
  void zero_extra_grad() {}
  void backward_impl(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType>*) {
    this->accumulate_factors(dy);
    this->saved_ = false;
  }
};

/// Storage: how the table is stored (Scalar, or bfloat16 / float16 / BlockQ8_0 / BlockQ4_0).
template <typename Scalar, typename Storage = Scalar>
class DoraEmbedding : public detail::EmbeddingAdapter<DoraEmbedding<Scalar, Storage>, Scalar, Storage>,
                      public detail::DoraMagnitude<DoraEmbedding<Scalar, Storage>, Scalar> {
  using Base = detail::EmbeddingAdapter<DoraEmbedding<Scalar, Storage>, Scalar, Storage>;
  using Magnitude = detail::DoraMagnitude<DoraEmbedding<Scalar, Storage>, Scalar>;
  friend class detail::Adapter<DoraEmbedding<Scalar, Storage>, Scalar, Eigen::Ref<const TokenIds>>;
  friend Magnitude;

 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;
  using Base::forward;
  using Base::infer;

  /// A = 0, B ~ N(0, 1), m = n (the layer starts equal to the base table).
  DoraEmbedding(const EmbeddingBase<Scalar, Storage>& base, const AdapterConfig& config) : Base(base, config) {
    this->setup_magnitude();
  }
  /// Starts from the given A and B; m = n (PEFT's magnitude initialisation).
  DoraEmbedding(const EmbeddingBase<Scalar, Storage>& base, const AdapterConfig& config,
                const Eigen::Ref<const MatrixType>& A, const Eigen::Ref<const MatrixType>& B)
      : Base(base, config, A, B) {
    this->setup_magnitude();
  }

  /// y_t = (W[i_t] + s A^T[i_t] B^T) * g. In evaluation mode n is computed once and reused while
  /// A, B and m are unchanged; in training it costs one r x num_embeddings x embedding_dim product.
  void forward(const Eigen::Ref<const TokenIds>& ids, Eigen::Ref<MatrixType> y) {
    this->check_ids(ids, y);
    if (this->training_ || !this->cache_matches()) this->compute_norm_alone();
    this->save_ids(ids);
    h_.resize(ids.rows(), this->embedding_dim());
    this->lookup(ids, this->u_, h_);
    for (Index t = 0; t < h_.rows(); ++t) y.row(t) = h_.row(t).cwiseProduct(this->g_.transpose());
    this->saved_ = true;
  }
  /// Evaluation-mode forward that modifies nothing (thread-safe); needs prepare_inference().
  void infer(const Eigen::Ref<const TokenIds>& ids, Eigen::Ref<MatrixType> y, MatrixType& u) const {
    this->check_ids(ids, y);
    DORA_CHECK_STATE(this->cache_matches(), "infer() needs prepare_inference() after the last change of A, B or m");
    this->gather_u(ids, u);
    this->lookup(ids, u, y);
    for (Index t = 0; t < y.rows(); ++t) y.row(t) = y.row(t).cwiseProduct(this->g_.transpose());
  }

  /// W' = (W + s (B A)^T) diag(m / n) (PEFT merge: column j scaled by g_j), num_embeddings x embedding_dim.
  DoraMerge<Scalar> merge() const {
    DoraMerge<Scalar> out;
    this->merge_scales(out);
    out.weight = detail::weight_dense<Scalar>(this->base_.weight);
    detail::gemm(this->A_, true, this->B_, true, out.weight, this->scaling_, Scalar(1));
    out.weight = out.weight * out.scale.asDiagonal();
    return out;
  }
  /// W = W' / g - s (B A)^T per column, with the scales cached at merge time (PEFT unmerge); an
  /// inactive column (scale 0) returns -s (B A)^T there.
  MatrixType unmerge(const DoraMerge<Scalar>& merged) const {
    const Index V = this->num_embeddings(), E = this->embedding_dim();
    DORA_CHECK_ARG(merged.weight.rows() == V && merged.weight.cols() == E && merged.scale.size() == E,
                   "merged table must be num_embeddings x embedding_dim = ", V, " x ", E, " with ", E, " scales, got ",
                   merged.weight.rows(), " x ", merged.weight.cols(), " and ", merged.scale.size());
    MatrixType W(V, E);
    for (Index j = 0; j < E; ++j) {
      const Scalar g = merged.scale[j];
      if (g != Scalar(0))
        W.col(j) = merged.weight.col(j) / g;
      else
        W.col(j).setZero();
    }
    detail::gemm(this->A_, true, this->B_, true, W, -this->scaling_, Scalar(1));
    return W;
  }

 private:
  using Magnitude::add_extra_parameters;
  using Magnitude::extra_parameters_match;
  using Magnitude::zero_extra_grad;

  /// The lowered map's W: the transposed table (embedding_dim x num_embeddings), a view.
  using WeightMap = typename EmbeddingBase<Scalar, Storage>::WeightMap;
  std::conditional_t<EmbeddingBase<Scalar, Storage>::kNative, Eigen::Transpose<const WeightMap>,
                     detail::TransposedStored<Storage>>
  lowered_weight() const {
    if constexpr (EmbeddingBase<Scalar, Storage>::kNative)
      return this->base_.weight.transpose();
    else
      return detail::TransposedStored<Storage>{this->base_.weight};
  }

  void backward_impl(const Eigen::Ref<const MatrixType>& G, Eigen::Ref<MatrixType>*) {
    this->accumulate_magnitude_grad(G, h_);
    // h is no longer needed: it becomes Gg = G diag(g).
    for (Index t = 0; t < h_.rows(); ++t) h_.row(t) = G.row(t).cwiseProduct(this->g_.transpose());
    this->accumulate_factors(h_);
    if (this->config_.norm_gradient == NormGradient::exact) {
      // The norm's terms are dense over the vocabulary (every column of A moves n): they are
      // r x embedding_dim and r x r factors applied once, never a num_embeddings x embedding_dim matrix.
      Qt_ = this->norm_PT();
      this->accumulate_norm_gradient(Qt_, true);
    }
    this->saved_ = false;
  }

  MatrixType h_;   // h = W[ids] + s u B^T after forward, Gg in backward
  MatrixType Qt_;  // P^T = A W (r x embedding_dim), made s (diag(beta) B)^T by the exact gradient
};

}  // namespace dora
