#pragma once
/// \file multi_linear.hpp
/// WORK IN PROGRESS (issue 13, branch issue13-wip): several named LoRA / DoRA adapters on one
/// borrowed Linear base, with PEFT 0.21's semantics when several are active at once.
///
/// PEFT 0.21 (lora/layer.py Linear.forward, lora/dora.py DoraLinearVariant.forward), with no
/// dropout: result = x W^T + b, then for each active adapter k in order
///   LoRA: result += s_k L_k,                              L_k = x A_k^T B_k^T
///   DoRA: result += (g_k - 1) (result - b) + g_k s_k L_k,  g_k = m_k / ||W + s_k B_k A_k|| (rows)
/// so with R = result - b: R_0 = x W^T, LoRA R_k = R_{k-1} + s_k L_k, DoRA R_k = g_k (R_{k-1} + s_k L_k):
/// a DoRA adapter rescales everything stacked before it, and the order matters. Its norm is the
/// base W's (not the stacked weight's), so merging in order with base-W norms (PEFT after
/// huggingface/peft#3609) gives exactly the stacked layer. Reference data: tests/data/multi.
///
/// Backward (G_K = dy): for k = K .. 1, DoRA: dg_k = colsum(G_k . H_k) with H_k = R_{k-1} + s_k L_k,
/// dm_k = dg_k / n_k (+ the norm's terms in exact mode), G_{k-1} = G_k g_k, dL_k = s_k G_k g_k;
/// LoRA: G_{k-1} = G_k, dL_k = s_k G_k. Then dB_k = dL_k^T u_k, du_k = dL_k B_k, dA_k = du_k^T x
/// with u_k = x A_k^T, and dx = G_0 W + sum_k du_k A_k.
///
/// Not yet: threading and the stacked single pass over W for the norms (each DoRA adapter reads W
/// for its P^T here), dropout (PEFT's rule then differs: base_result is recomputed from the dropped
/// x without earlier adapters), the mixed batch, merge / unmerge, other layer types, io.

#include <string>
#include <vector>

#include "base_layer.hpp"
#include "config.hpp"
#include "detail/stored_product.hpp"
#include "magnitude.hpp"
#include "row_norm.hpp"

namespace dora {

template <typename Scalar, typename Storage = Scalar>
class MultiLinear {
 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;

  /// One named adapter: its factors, DoRA's magnitude, their gradients.
  struct Adapter {
    std::string name;
    AdapterConfig config;
    bool dora = false;
    Scalar scaling = 0;
    MatrixType A, B, grad_A, grad_B;
    VectorType m, grad_m;
  };

  explicit MultiLinear(const BaseLayer<Scalar, Storage>& base)
      : base_(base), w_sq_(detail::weight_row_squared_norms<Scalar>(base.weight)) {}

  /// Adds an adapter with the given A (r x d_in) and B (d_out x r); DoRA: m = ||W + s B A|| (PEFT's
  /// initialisation). Names are unique.
  Adapter& add(const std::string& name, const AdapterConfig& config, bool dora, const Eigen::Ref<const MatrixType>& A,
               const Eigen::Ref<const MatrixType>& B) {
    config.validate();
    DORA_CHECK_ARG(find(name) < 0, "an adapter named '", name, "' exists already");
    DORA_CHECK_ARG(config.dropout == 0.0, "adapter '", name,
                   "': dropout with several adapters is not supported yet (multi_linear.hpp)");
    const Index r = config.rank;
    DORA_CHECK_ARG(A.rows() == r && A.cols() == base_.d_in(), "adapter '", name, "': A must be r x d_in = ", r, " x ",
                   base_.d_in(), ", got ", A.rows(), " x ", A.cols());
    DORA_CHECK_ARG(B.rows() == base_.d_out() && B.cols() == r, "adapter '", name,
                   "': B must be d_out x r = ", base_.d_out(), " x ", r, ", got ", B.rows(), " x ", B.cols());
    Adapter a;
    a.name = name;
    a.config = config;
    a.dora = dora;
    a.scaling = static_cast<Scalar>(config.scaling());
    a.A = A;
    a.B = B;
    a.grad_A = MatrixType::Zero(A.rows(), A.cols());
    a.grad_B = MatrixType::Zero(B.rows(), B.cols());
    if (dora) {
      a.m = norm_of(a);
      a.grad_m = VectorType::Zero(a.m.size());
    }
    adapters_.push_back(std::move(a));
    return adapters_.back();
  }

  Adapter& adapter(const std::string& name) {
    const Index k = find(name);
    DORA_CHECK_ARG(k >= 0, "no adapter named '", name, "'");
    return adapters_[static_cast<std::size_t>(k)];
  }

  /// The active adapters, applied in this order (PEFT's set_adapter([...])); empty: the base alone.
  void set_active(const std::vector<std::string>& names) {
    std::vector<Index> order;
    for (const std::string& n : names) {
      const Index k = find(n);
      DORA_CHECK_ARG(k >= 0, "set_active: no adapter named '", n, "'");
      order.push_back(k);
    }
    active_ = order;
  }

  /// y = the stacked layer (see the file comment); saves what backward needs.
  void forward(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y) {
    DORA_CHECK_ARG(x.cols() == base_.d_in(), "x must have d_in = ", base_.d_in(), " columns, got ", x.rows(), " x ",
                   x.cols());
    DORA_CHECK_ARG(y.rows() == x.rows() && y.cols() == base_.d_out(), "y must be N x d_out = ", x.rows(), " x ",
                   base_.d_out(), ", got ", y.rows(), " x ", y.cols());
    x_ = x;
    R_.resize(x.rows(), base_.d_out());
    detail::split_product(x_, base_.weight, R_);
    steps_.resize(active_.size());
    for (std::size_t i = 0; i < active_.size(); ++i) {
      Adapter& a = adapters_[static_cast<std::size_t>(active_[i])];
      Step& st = steps_[i];
      st.u.noalias() = x_ * a.A.transpose();
      if (!a.dora) {
        R_.noalias() += a.scaling * st.u * a.B.transpose();
        continue;
      }
      st.n = norm_of(a);
      st.g.resize(st.n.size());
      for (Index j = 0; j < st.n.size(); ++j) st.g[j] = magnitude_scale(a.m[j], st.n[j]);
      st.H = R_;
      st.H.noalias() += a.scaling * st.u * a.B.transpose();
      R_ = st.H * st.g.asDiagonal();
    }
    y = R_;
    if (base_.has_bias()) y.rowwise() += base_.bias.transpose();
  }

  /// Adds every active adapter's gradients of sum(y . dy) and returns dx.
  void backward(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType> dx) {
    DORA_CHECK_ARG(dy.rows() == x_.rows() && dy.cols() == base_.d_out(), "dy must be N x d_out = ", x_.rows(), " x ",
                   base_.d_out(), ", got ", dy.rows(), " x ", dy.cols());
    G_ = dy;
    dx.setZero();
    for (std::size_t i = active_.size(); i-- > 0;) {
      Adapter& a = adapters_[static_cast<std::size_t>(active_[i])];
      Step& st = steps_[i];
      if (a.dora) {
        const VectorType dg = (G_.array() * st.H.array()).colwise().sum().transpose();
        for (Index j = 0; j < dg.size(); ++j)
          if (st.g[j] != Scalar(0)) a.grad_m[j] += dg[j] / st.n[j];
        G_ = G_ * st.g.asDiagonal();
        if (a.config.norm_gradient == NormGradient::exact) add_norm_gradient(a, st, dg);
      }
      // dL = s G; dB += dL^T u; du = dL B; dA += du^T x; dx += du A.
      a.grad_B.noalias() += a.scaling * G_.transpose() * st.u;
      du_.noalias() = a.scaling * G_ * a.B;
      a.grad_A.noalias() += du_.transpose() * x_;
      dx.noalias() += du_ * a.A;
    }
    detail::weight_adjoint_add(G_, base_.weight, dx);
  }

  /// Mixed batch (evaluation): row t of x goes through the adapter row_adapters[t] alone ("" or
  /// "__base__": the base layer), as PEFT's forward(x, adapter_names=...) does for LoRA; a DoRA
  /// row gets that adapter's own DoRA output (PEFT refuses DoRA here). One frozen product for the
  /// whole batch, then each adapter's low-rank product over its rows.
  void infer_mixed(const Eigen::Ref<const MatrixType>& x, const std::vector<std::string>& row_adapters,
                   Eigen::Ref<MatrixType> y) const {
    DORA_CHECK_ARG(x.cols() == base_.d_in(), "x must have d_in = ", base_.d_in(), " columns, got ", x.rows(), " x ",
                   x.cols());
    DORA_CHECK_ARG(static_cast<Index>(row_adapters.size()) == x.rows(), "row_adapters has ", row_adapters.size(),
                   " names but x has ", x.rows(), " rows");
    DORA_CHECK_ARG(y.rows() == x.rows() && y.cols() == base_.d_out(), "y must be N x d_out = ", x.rows(), " x ",
                   base_.d_out(), ", got ", y.rows(), " x ", y.cols());
    detail::frozen_product(x, base_.weight, y);
    std::vector<std::vector<Index>> rows(adapters_.size());
    for (std::size_t t = 0; t < row_adapters.size(); ++t) {
      const std::string& n = row_adapters[t];
      if (n.empty() || n == "__base__") continue;
      const Index k = find(n);
      DORA_CHECK_ARG(k >= 0, "row_adapters[", t, "] names no adapter: '", n, "'");
      rows[static_cast<std::size_t>(k)].push_back(static_cast<Index>(t));
    }
    for (std::size_t k = 0; k < adapters_.size(); ++k) {
      if (rows[k].empty()) continue;
      const Adapter& a = adapters_[k];
      const MatrixType xk = x(rows[k], Eigen::all);
      MatrixType h = y(rows[k], Eigen::all);
      h.noalias() += a.scaling * (xk * a.A.transpose()) * a.B.transpose();
      if (a.dora) {
        const VectorType n = norm_of(a);
        VectorType g(n.size());
        for (Index j = 0; j < n.size(); ++j) g[j] = magnitude_scale(a.m[j], n[j]);
        h = h * g.asDiagonal();
      }
      y(rows[k], Eigen::all) = h;
    }
    if (base_.has_bias()) y.rowwise() += base_.bias.transpose();
  }

  /// W merged with the active adapters in order, each DoRA adapter's norm from the base W (PEFT
  /// 0.21's merge_and_unload(adapter_names=...)): the stacked layer as one dense weight.
  MatrixType merged_weight() const {
    MatrixType W = detail::weight_dense<Scalar>(base_.weight);
    for (const Index k : active_) {
      const Adapter& a = adapters_[static_cast<std::size_t>(k)];
      W.noalias() += a.scaling * a.B * a.A;
      if (a.dora) {
        const VectorType n = norm_of(a);
        for (Index j = 0; j < n.size(); ++j) W.row(j) *= magnitude_scale(a.m[j], n[j]);
      }
    }
    return W;
  }

 private:
  struct Step {
    MatrixType u, H;
    VectorType n, g;
  };

  Index find(const std::string& name) const {
    for (std::size_t k = 0; k < adapters_.size(); ++k)
      if (adapters_[k].name == name) return static_cast<Index>(k);
    return -1;
  }

  VectorType norm_of(const Adapter& a) const {
    detail::FactoredRowNorm<Scalar> work;
    work.resize(base_.d_out(), base_.d_in(), a.A.rows());
    VectorType n(base_.d_out());
    work.compute(base_.weight, w_sq_, a.A, a.B, a.scaling, n);
    return n;
  }

  // The norm's terms (exact gradient): dn_j = -dg_j g_j / n_j; with beta_j = dn_j / n_j,
  // dB += s diag(beta) (W A^T + s B A A^T), dA += s (diag(beta) B)^T (W + s B A).
  void add_norm_gradient(Adapter& a, const Step& st, const VectorType& dg) {
    const Scalar s = a.scaling;
    VectorType beta(dg.size());
    for (Index j = 0; j < dg.size(); ++j) beta[j] = st.g[j] != Scalar(0) ? -dg[j] * st.g[j] / (st.n[j] * st.n[j]) : 0;
    MatrixType PT(a.A.rows(), base_.d_out());
    detail::weight_product(a.A, base_.weight, PT);  // A W^T
    const MatrixType K = a.A * a.A.transpose();
    a.grad_B.noalias() += s * beta.asDiagonal() * (PT.transpose() + s * a.B * K);
    const MatrixType Q = s * (beta.asDiagonal() * a.B).transpose();  // r x d_out
    detail::weight_adjoint_add(Q, base_.weight, a.grad_A);
    a.grad_A.noalias() += s * (Q * a.B) * a.A;
  }

  BaseLayer<Scalar, Storage> base_;
  VectorType w_sq_;
  std::vector<Adapter> adapters_;
  std::vector<Index> active_;
  std::vector<Step> steps_;
  MatrixType x_, R_, G_, du_;
};

}  // namespace dora
