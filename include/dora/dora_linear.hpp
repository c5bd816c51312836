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

#include "detail/dense.hpp"
#include "detail/dora_core.hpp"
#include "detail/parallel.hpp"

namespace dora {
namespace detail {

/// DoRA's products on a lowered dense input X (N x d_in); shared by DoraLinear and DoraConv.
template <typename Derived, typename Scalar, typename Storage = Scalar>
class DenseDora : public DenseAdapter<Derived, Scalar, Storage>, public DoraMagnitude<Derived, Scalar> {
  using Base = DenseAdapter<Derived, Scalar, Storage>;
  using Magnitude = DoraMagnitude<Derived, Scalar>;
  friend class Adapter<Derived, Scalar, Eigen::Ref<const Matrix<Scalar>>>;
  friend class DoraMagnitude<Derived, Scalar>;

 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;

  /// W' = diag(m / n) (W + s B A) with the current parameters (PEFT merge), lowered; bias unchanged.
  DoraMerge<Scalar> merge() const {
    this->check_mergeable();
    DoraMerge<Scalar> out;
    this->merge_scales(out);
    out.weight = weight_dense<Scalar>(this->base_.weight);
    gemm(this->B_, false, this->A_, false, out.weight, this->scaling_, Scalar(1));
    out.weight = out.scale.asDiagonal() * out.weight;
    return out;
  }
  /// W = W' / (m / n) - s B A, with the scale cached at merge time and the current A, B (PEFT unmerge).
  /// An inactive row (scale 0) returns -s B_i A: W_i exactly when n_i was 0 (V_i = 0); when m_i / n_i
  /// overflowed, V_i was not zero but ||V_i|| < m_i / max(Scalar), the error of that row.
  MatrixType unmerge(const DoraMerge<Scalar>& merged) const {
    this->check_mergeable();
    const Index d_out = this->base_.d_out(), d_in = this->base_.d_in();
    DORA_CHECK_ARG(merged.weight.rows() == d_out && merged.weight.cols() == d_in && merged.scale.size() == d_out,
                   "merged weight must be ", this->spec_.b_rows, " x ", this->spec_.a_cols, " = ", d_out, " x ", d_in,
                   " with ", d_out, " scales, got ", merged.weight.rows(), " x ", merged.weight.cols(), " and ",
                   merged.scale.size());
    MatrixType W(d_out, d_in);
    for (Index i = 0; i < d_out; ++i) {
      const Scalar g = merged.scale[i];
      if (g != Scalar(0))
        W.row(i) = merged.weight.row(i) / g;
      else
        W.row(i).setZero();
    }
    gemm(this->B_, false, this->A_, false, W, -this->scaling_, Scalar(1));
    return W;
  }

 protected:
  static constexpr bool kHasInputGradient = true;

  DenseDora(const FactorSpec& spec, const BaseLayer<Scalar, Storage>& base, const AdapterConfig& config,
            Index groups = 1)
      : Base(spec, base, config, groups) {
    this->norm_groups_ = groups;
    this->setup_magnitude();
  }
  DenseDora(const FactorSpec& spec, const BaseLayer<Scalar, Storage>& base, const AdapterConfig& config,
            const Eigen::Ref<const MatrixType>& A, const Eigen::Ref<const MatrixType>& B, Index groups = 1)
      : Base(spec, base, config, A, B, groups) {
    this->norm_groups_ = groups;
    this->setup_magnitude();
  }

  using Magnitude::add_extra_parameters;
  using Magnitude::extra_parameters_match;
  using Magnitude::zero_extra_grad;
  const typename BaseLayer<Scalar, Storage>::WeightMap& lowered_weight() const { return this->base_.weight; }

  /// y = (x V^T) diag(g) + b on the lowered input (PEFT's dropout semantics with a mask).
  ///
  /// Cost: when n must be (re)computed, A is stacked under x and one product [xd; A] W^T gives
  /// both x W^T and P^T = A W^T, so W is read once, as in LoRA; the norm's extra work is r more
  /// rows in that product (1 + r / (2N) of a LoRA step).
  void forward_lowered(const Eigen::Ref<const MatrixType>& x, const MatrixType* mask, Eigen::Ref<MatrixType> y) {
    const Index r = this->rank();
    // Training stacks A under x (the norm changes every step). Evaluation computes the norm on its
    // own when the cache is stale, so that every evaluation forward runs the same x W^T product and
    // repeated calls give bitwise identical outputs. A grouped convolution's norm is not a product
    // with W's rows as the base product reads them (dora_core.hpp): it is computed on its own.
    stacked_ = this->training_ && this->groups_ == 1 ? r : 0;
    if (stacked_ == 0 && (this->training_ || !this->cache_matches())) this->compute_norm_alone();
    const typename BaseLayer<Scalar, Storage>::WeightMap& W = this->base_.weight;
    // Where the product rounds its operand to bf16 (the oneDNN backend), A is stacked as two bf16
    // parts, A_hi = bf16(A) and A_lo = A - A_hi, so that the norm's P^T = A W^T keeps float
    // precision (2^-16 relative in A) at the cost of r more rows in the one product.
    parts_ = rounds_operands<Scalar>(W) ? 2 : 1;
    // With threads, oneDNN 2.6 spreads a product of N + 2r rows unevenly over them: interleaved on
    // the 16-core Xeon, 512 x 4096 x 4096 took 5.45 ms, 544 rows 8.50, 512 rows then 32 rows 6.31
    // (11008 x 4096, 640 rows: 20.3 stacked, 20.6 apart; one thread: stacked 3-6% faster;
    // bench/results/device/2026-12-01-dnnl-gemm-probe.txt). With threads the two parts of A therefore
    // go in their own product.
    separate_ = parts_ == 2 && product_threads(W.rows() * W.cols(), W.rows()) > 1;
    // The buffers always have the rows below the batch, used or not, so that switching between
    // training and evaluation does not reallocate them.
    this->save_input(x, parts_ * r, mask);
    const Index N = this->batch_;
    if (stacked_ != 0) stack_in_parts(this->A_, this->xd_.bottomRows(parts_ * r));
    H_.resize(N + parts_ * r, this->base_.d_out());
    if (stacked_ != 0 && separate_) {
      split_product(this->xd_.topRows(N), W, H_.topRows(N));
      split_product(this->xd_.bottomRows(2 * r), W, H_.bottomRows(2 * r));
      H_.middleRows(N, r) += H_.bottomRows(r);
    } else if (stacked_ != 0) {
      split_product(this->xd_, W, H_);
      if (parts_ == 2) H_.middleRows(N, r) += H_.bottomRows(r);
    } else {
      // Evaluation: the same product as infer() (split over W's rows at small n), bit for bit.
      this->base_product(this->xd_.topRows(N), H_.topRows(N));
    }
    if (stacked_ != 0) this->compute_norm_with(H_.middleRows(N, r));
    this->add_up_product(this->u_, h());
    const VectorType& g = this->g_;
    if (!this->dropout_applied_) {
      // One pass for the compose and the bias, rows spread over threads.
      const bool bias = this->base_.has_bias();
      parallel_rows(N, y.cols(), [&](Index begin, Index end) {
        for (Index t = begin; t < end; ++t) {
          if (bias)
            y.row(t) = H_.row(t).cwiseProduct(g.transpose()) + this->base_.bias.transpose();
          else
            y.row(t) = H_.row(t).cwiseProduct(g.transpose());
        }
      });
    } else {
      // y = x W^T + s u B^T + (g - 1) hd: the base product of the undropped x is needed too.
      this->base_product(x, y);
      this->add_up_product(this->u_, y);
      for (Index t = 0; t < N; ++t) y.row(t).array() += H_.row(t).array() * (g.transpose().array() - Scalar(1));
      this->add_bias(y);
    }
    this->saved_ = true;
  }

  void infer_lowered(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y, MatrixType& u) const {
    DORA_CHECK_STATE(this->cache_matches(), "infer() needs prepare_inference() after the last change of A, B or m");
    const Index N = x.rows();
    const VectorType& g = this->g_;
    u.resize(N, this->rank());
    gemm(x, false, this->A_, true, u);
    this->base_product(x, y);
    this->add_up_product(u, y);
    const bool bias = this->base_.has_bias();
    parallel_rows(N, y.cols(), [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        if (bias)
          y.row(t) = y.row(t).cwiseProduct(g.transpose()) + this->base_.bias.transpose();
        else
          y.row(t) = y.row(t).cwiseProduct(g.transpose());
      }
    });
  }

  // The saved h = xd V^T: the top rows of the stacked product.
  typename MatrixType::RowsBlockXpr h() { return H_.topRows(this->batch_); }

  void backward_lowered(const Eigen::Ref<const MatrixType>& G, Eigen::Ref<MatrixType>* dx) {
    const typename BaseLayer<Scalar, Storage>::WeightMap& W = this->base_.weight;
    const Index N = this->batch_;
    const Index r = this->rank();
    const bool exact = this->config_.norm_gradient == NormGradient::exact;
    this->accumulate_magnitude_grad(G, h());
    // h is no longer needed: it becomes Gg = G diag(g), so DoRA keeps one N x d_out buffer, not two.
    parallel_rows(N, H_.cols(), [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) H_.row(t) = G.row(t).cwiseProduct(this->g_.transpose());
    });
    this->accumulate_B(h());
    this->accumulate_A(h());
    // With the exact gradient, dA gains s (diag(beta) B)^T W: stacked under Gg, one product
    // [Gg; s (diag(beta) B)^T] W gives dx's share and dA's, reading W once.
    const bool stack = exact && dx != nullptr && !this->dropout_applied_ && stacked_ == r;
    if (exact) {
      if (stacked_ == r) {
        this->accumulate_norm_gradient(H_.middleRows(N, r), !stack);
      } else if (this->groups_ > 1) {
        // The forward computed this norm on its own (or found it cached): its chunks' P^T are kept.
        if constexpr (Magnitude::groupable()) this->accumulate_grouped_norm_gradient();
      } else {
        // The forward used a cached norm (evaluation mode): P^T is computed here.
        this->compute_norm_alone();
        Qt_ = this->norm_PT();
        this->accumulate_norm_gradient(Qt_, true);
      }
    }
    if (dx != nullptr) {
      if (!this->dropout_applied_) {
        if (stack) {
          // s (diag(beta) B)^T in two bf16 parts where the product rounds, as A in the forward.
          if (parts_ == 2) stack_in_parts(H_.middleRows(N, r), H_.bottomRows(2 * r));
          if (separate_) {
            split_adjoint_product(H_.topRows(N), W, this->xd_.topRows(N));
            split_adjoint_product(H_.bottomRows(2 * r), W, this->xd_.bottomRows(2 * r));
          } else {
            split_adjoint_product(H_, W, this->xd_);  // xd is no longer needed: (N + parts r) x d_in
          }
          parallel_rows(N, dx->cols(), [&](Index begin, Index end) {
            dx->middleRows(begin, end - begin) = this->xd_.middleRows(begin, end - begin);
          });
          this->grad_A_ += this->xd_.middleRows(N, r);
          if (parts_ == 2) this->grad_A_ += this->xd_.bottomRows(r);
        } else {
          this->base_adjoint(h(), *dx);
        }
        rank_product(rounds_operands<Scalar>(W), this->du_, false, this->A_, false, Scalar(1), Scalar(1), *dx);
      } else {
        // dx = G W + mask * [(Gg - G) W + du A]; xd is no longer needed and holds the bracket.
        this->base_adjoint(G, *dx);
        h() -= G;
        this->base_adjoint(h(), this->xd());
        gemm(this->du_, false, this->A_, false, this->xd(), Scalar(1), Scalar(1));
        *dx += this->xd().cwiseProduct(this->mask_);
      }
    }
    this->saved_ = false;
  }

  // dst (2 rows(src) x cols) = [bf16(src); src - bf16(src)] where parts_ is 2, else src: a matrix
  // that a bf16-rounding product then carries to 2^-16 relative. dst may start at src's first row.
  template <typename Src, typename Dst>
  void stack_in_parts(const Src& src, Dst&& dst) {
    const Index r = src.rows();
    if (parts_ == 1) {
      dst = src;
      return;
    }
    for (Index i = r - 1; i >= 0; --i)  // last row first: dst's rows r.. may be src's own
      for (Index j = 0; j < src.cols(); ++j) {
        const Scalar v = src(i, j);
        const Scalar hi = static_cast<Scalar>(static_cast<float>(bfloat16(static_cast<float>(v))));
        dst(r + i, j) = v - hi;
        dst(i, j) = hi;
      }
  }

  MatrixType H_;           // [h; P^T(; P^T_lo)] after forward, [Gg; s (diag(beta) B)^T (; its lo part)] in backward
  MatrixType Qt_;          // P^T when the forward did not stack A (allocated only then)
  Index stacked_ = 0;      // rows of A stacked under x in the last forward (r, or 0 with a cached norm)
  Index parts_ = 1;        // 2 where A (and the exact gradient's term) is stacked as two bf16 parts
  bool separate_ = false;  // those two parts in a product of their own (threads: forward_lowered)
};

}  // namespace detail

/// Storage: how W is stored (Scalar, or bfloat16 / float16 / BlockQ8_0 / BlockQ4_0: storage.hpp).
template <typename Scalar, typename Storage = Scalar>
class DoraLinear : public detail::DenseDora<DoraLinear<Scalar, Storage>, Scalar, Storage> {
  using Base = detail::DenseDora<DoraLinear<Scalar, Storage>, Scalar, Storage>;
  friend class detail::Adapter<DoraLinear<Scalar, Storage>, Scalar, Eigen::Ref<const Matrix<Scalar>>>;
  friend class detail::DoraMagnitude<DoraLinear<Scalar, Storage>, Scalar>;

 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;
  using InferWorkspace = MatrixType;
  using Base::forward;
  using Base::infer;

  /// A as config.init says, B = 0, m = ||W_i|| (so the layer starts equal to the base layer).
  DoraLinear(const BaseLayer<Scalar, Storage>& base, const AdapterConfig& config)
      : Base(detail::kLinearFactors, base, config) {}
  /// Starts from the given A and B; m = row norms of W + s B A (PEFT's magnitude initialisation).
  DoraLinear(const BaseLayer<Scalar, Storage>& base, const AdapterConfig& config, const Eigen::Ref<const MatrixType>& A,
             const Eigen::Ref<const MatrixType>& B)
      : Base(detail::kLinearFactors, base, config, A, B) {}

  Index d_in() const { return this->base_.d_in(); }
  Index d_out() const { return this->base_.d_out(); }

  /// y = (x V^T) diag(m / n) + b (with dropout in training mode). y is N x d_out, not aliasing x.
  /// In evaluation mode n is computed once and reused while A, B and m are unchanged.
  void forward(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y) {
    this->check_lowered_input(x, y);
    this->forward_lowered(x, nullptr, y);
  }

  /// Evaluation-mode forward that modifies nothing: several threads may call it on one layer at
  /// once, each with its own workspace (resized to N x r on first use), while nothing modifies the
  /// layer. Same result, bit for bit, as forward() in evaluation mode.
  /// Precondition: prepare_inference() since the last change of A, B or m (checked: std::logic_error).
  void infer(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y, MatrixType& u_workspace) const {
    this->check_lowered_input(x, y);
    this->infer_lowered(x, y, u_workspace);
  }

  /// The mask of the last training forward with dropout: entries 0 or 1/(1-p), N x d_in.
  const MatrixType& dropout_mask() const { return this->mask_; }

 private:
  Index output_cols() const { return d_out(); }
  Index input_cols() const { return d_in(); }
  Index saved_batch() const { return this->batch_; }
  void backward_impl(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType>* dx) {
    this->backward_lowered(dy, dx);
  }
};

}  // namespace dora
