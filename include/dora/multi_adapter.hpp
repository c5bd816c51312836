#pragma once
/// \file multi_adapter.hpp
/// Several named LoRA / DoRA adapters on one borrowed frozen layer (Linear, Conv1d/2d/3d, Embedding):
/// add, remove, choose the active set, disable them all; several active at once with PEFT 0.21's
/// semantics, forward and backward (training several at once, detached or exact norm gradient);
/// a mixed batch where each row names its adapter; merge in order and unmerge in reverse.
///
/// PEFT 0.21's rule for several active adapters (lora/layer.py Linear/Embedding/_ConvNd.forward,
/// lora/dora.py Dora*Variant.forward), on the lowered map (docs/math.md, section 15): with R the
/// layer's output without the bias, R_0 = x W^T, and for each active adapter k in order
///   LoRA: R_k = R_{k-1} + s_k L_k                   L_k = x A_k^T B_k^T
///   DoRA: R_k = g_k (R_{k-1} + s_k L_k)             g_k = m_k / ||W + s_k B_k A_k||  (rows)
/// so a DoRA adapter rescales everything stacked before it and the order matters. Each DoRA norm is
/// the base W's, so merging in order with base-W norms (PEFT 0.21, huggingface/peft#3609) gives the
/// stacked layer exactly. With dropout in training (Linear, Conv; PEFT's Embedding has none), PEFT
/// takes a DoRA adapter's base part from the dropped input alone: R_k = R_{k-1} + (g_k - 1) x_d W^T +
/// g_k s_k L_k(x_d), and a LoRA adapter adds s_k L_k(x_d); each adapter draws its own mask.
///
/// Cost: W is read once per forward however many adapters are active: the batch, the dropped inputs
/// of DoRA adapters with dropout and every active DoRA adapter's A are stacked into one product
/// [x; x_d...; A_1; ...; A_k] W^T, which gives x W^T, the x_d W^T and every P_k^T = A_k W^T (the
/// norms' products). Backward reads W once too: [G_0; dP_d...; Q_1; ...] W gives dx and every
/// exact-mode norm term. Evaluation mode caches each DoRA adapter's norm while its A, B and m are
/// bitwise unchanged (the single-adapter layers' rule); prepare_inference() fills the caches of all
/// adapters in one stacked pass, after which infer_mixed() may run from any number of threads.
///
/// The mixed batch (infer_mixed): row t of x goes through the adapter of_row[t] alone (or the base):
/// one frozen product for the whole batch, then each adapter's low-rank product over its rows and,
/// for DoRA, its scale on those rows. PEFT does this for LoRA (forward(x, adapter_names=...)) and
/// refuses DoRA; here a DoRA row is exactly that adapter's single-adapter layer.
///
/// Not supported: grouped convolutions (groups > 1; refused with the reason).

#include <algorithm>
#include <array>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "conv.hpp"
#include "embedding.hpp"

namespace dora {

/// LoRA or DoRA.
enum class AdapterKind { lora, dora };

/// One named adapter of a multi-adapter layer: its configuration and its parameters on the layer's
/// lowered map (d_out x d_in: W itself, the flattened kernel, the transposed table), PEFT's layouts
/// as the single-adapter layers hold them. Change A, B and m freely: DoRA's cached norms notice.
template <typename Scalar>
struct NamedAdapter {
  std::string name;
  AdapterKind kind = AdapterKind::lora;
  AdapterConfig config;
  Scalar scaling = 0;             ///< s = alpha / r (or alpha / sqrt(r)), PEFT scaling[name]
  Matrix<Scalar> A, B;            ///< lora_A (r x d_in), lora_B (d_out x r)
  Matrix<Scalar> grad_A, grad_B;  ///< accumulated by backward; zero_grad() clears them
  Vector<Scalar> m, grad_m;       ///< DoRA: lora_magnitude_vector (d_out); empty for LoRA

  bool is_dora() const { return kind == AdapterKind::dora; }
};

/// What MultiAdapter::merge() returns: the merged weight (the layer's layout: d_out x d_in for Linear
/// and the flattened kernel, num_embeddings x embedding_dim for an embedding) and, per merged adapter
/// in order, its name and DoRA row scales m / n at merge time (empty for LoRA): unmerge() needs them.
template <typename Scalar>
struct MultiMerge {
  Matrix<Scalar> weight;
  std::vector<std::string> order;
  std::vector<Vector<Scalar>> scale;
};

namespace detail {

/// The machinery every multi-adapter layer shares, on the lowered map. Embedding = true: the input
/// is token ids (one-hot rows: gathers and scatter-adds, no input gradient, no dropout); false: a
/// dense lowered input (Linear's x, a convolution's unfolded patches).
template <typename Scalar, typename Storage, bool Embedding>
class MultiAdapter {
 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;
  using AdapterType = NamedAdapter<Scalar>;
  using BaseType = std::conditional_t<Embedding, EmbeddingBase<Scalar, Storage>, BaseLayer<Scalar, Storage>>;

  /// Adds an adapter with the given factors (lowered shapes: A r x d_in, B d_out x r). DoRA: m = n
  /// with these factors (PEFT's initialisation). Names are unique; a new adapter is not active.
  AdapterType& add(const std::string& name, AdapterKind kind, const AdapterConfig& config,
                   const Eigen::Ref<const MatrixType>& A, const Eigen::Ref<const MatrixType>& B) {
    config.validate();
    DORA_CHECK_ARG(!name.empty() && name != "__base__", "an adapter cannot be named '", name,
                   "' (\"\" and \"__base__\" mean the base layer in a mixed batch)");
    DORA_CHECK_ARG(find(name) < 0, "an adapter named '", name, "' exists already");
    const Index r = config.rank;
    DORA_CHECK_ARG(A.rows() == r && A.cols() == d_in(), "adapter '", name, "': ", spec().a_name, " must be r x ",
                   spec().a_cols, " = ", r, " x ", d_in(), ", got ", A.rows(), " x ", A.cols());
    DORA_CHECK_ARG(B.rows() == d_out() && B.cols() == r, "adapter '", name, "': ", spec().b_name, " must be ",
                   spec().b_rows, " x r = ", d_out(), " x ", r, ", got ", B.rows(), " x ", B.cols());
    Slot s;
    s.a.name = name;
    s.a.kind = kind;
    s.a.config = config;
    s.a.scaling = static_cast<Scalar>(config.scaling());
    s.a.A = A;
    s.a.B = B;
    s.a.grad_A = MatrixType::Zero(r, d_in());
    s.a.grad_B = MatrixType::Zero(d_out(), r);
    s.dropout_rng.seed(config.seed ^ kDropoutStream);
    s.norm.resize(d_out(), d_in(), r);
    s.n.resize(d_out());
    s.g.resize(d_out());
    s.n_div.resize(d_out());
    if (kind == AdapterKind::dora) {
      s.a.m.resize(d_out());
      s.norm.compute(lowered(), w_sq_, s.a.A, s.a.B, s.a.scaling, s.a.m);
      s.a.grad_m = VectorType::Zero(d_out());
    }
    slots_.push_back(std::move(s));
    return slots_.back().a;
  }
  /// Adds an adapter initialised as PEFT does for the layer type (config.init and config.seed; an
  /// embedding: A = 0, B ~ N(0, 1); otherwise B = 0): the layer's output does not change.
  AdapterType& add(const std::string& name, AdapterKind kind, const AdapterConfig& config) {
    config.validate();
    DORA_CHECK_ARG(config.init != Init::user, "adapter '", name, "': Init::user needs A and B (the other add())");
    Rng rng(config.seed);
    MatrixType A, B;
    if (Embedding) {
      A = MatrixType::Zero(config.rank, d_in());
      B.resize(d_out(), config.rank);
      for (Index i = 0; i < B.size(); ++i) B.data()[i] = static_cast<Scalar>(rng.normal());
    } else {
      A = initial_lora_A<Scalar>(config.rank, d_in(), config.init, rng);
      B = MatrixType::Zero(d_out(), config.rank);
    }
    return add(name, kind, config, A, B);
  }

  /// PEFT's add_weighted_adapter(adapters, weights, name, combination_type="cat"): a new LoRA
  /// adapter with A = [w_1 s_1 A_1; ...; w_k s_k A_k], B = [B_1, ..., B_k], r = sum r_k and
  /// alpha = r (scaling 1), so that its delta s B A = sum_k w_k s_k B_k A_k exactly: the weighted
  /// sum of the LoRA adapters. A DoRA adapter is refused: its effect diag(m / ||W + s B A||)
  /// (W + s B A) - W is not a low-rank delta, so no combination of factors reproduces it (PEFT does
  /// not refuse and returns something else, huggingface/peft#3761).
  AdapterType& add_weighted_cat(const std::string& name, const std::vector<std::string>& adapters,
                                const std::vector<double>& weights) {
    DORA_CHECK_ARG(!adapters.empty() && adapters.size() == weights.size(), "add_weighted_cat: ", adapters.size(),
                   " adapters and ", weights.size(), " weights (one weight per adapter, at least one)");
    Index r = 0;
    for (const std::string& n : adapters) {
      const AdapterType& a = adapter(n);
      DORA_CHECK_ARG(!a.is_dora(), "add_weighted_cat: adapter '", n,
                     "' is DoRA, and no combination of DoRA adapters' factors is exact: a DoRA adapter rescales the "
                     "rows of W + s B A by m / ||W + s B A||, which is not a low-rank delta (PEFT's "
                     "add_weighted_adapter does not refuse and returns a different layer, huggingface/peft#3761); "
                     "stack the adapters (set_active) or merge them (merge()) instead");
      r += a.config.rank;
    }
    MatrixType A(r, d_in()), B(d_out(), r);
    Index at = 0;
    for (std::size_t k = 0; k < adapters.size(); ++k) {
      const AdapterType& a = adapter(adapters[k]);
      A.middleRows(at, a.config.rank) = (static_cast<Scalar>(weights[k]) * a.scaling) * a.A;
      B.middleCols(at, a.config.rank) = a.B;
      at += a.config.rank;
    }
    AdapterConfig config = adapter(adapters.front()).config;
    config.rank = r;
    config.alpha = static_cast<double>(r);
    config.use_rslora = false;
    config.init = Init::user;
    return add(name, AdapterKind::lora, config, A, B);
  }

  /// Removes the adapter (and from the active set).
  void remove(const std::string& name) {
    const Index k = index_of(name);
    slots_.erase(slots_.begin() + k);
    std::vector<Index> active;
    for (const Index a : active_)
      if (a != k) active.push_back(a > k ? a - 1 : a);
    active_ = std::move(active);
    steps_.clear();
    saved_ = false;
  }

  bool has_adapter(const std::string& name) const { return find(name) >= 0; }
  /// The adapter's position (what infer_mixed's indexed form takes); throws if there is none.
  Index index_of(const std::string& name) const {
    const Index k = find(name);
    DORA_CHECK_ARG(k >= 0, "no adapter named '", name, "' (the layer has ", names_list(), ")");
    return k;
  }
  AdapterType& adapter(const std::string& name) { return slots_[static_cast<std::size_t>(index_of(name))].a; }
  const AdapterType& adapter(const std::string& name) const {
    return slots_[static_cast<std::size_t>(index_of(name))].a;
  }
  Index adapter_count() const { return static_cast<Index>(slots_.size()); }
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> out;
    for (const Slot& s : slots_) out.push_back(s.a.name);
    return out;
  }

  /// The active adapters, applied in this order (PEFT's set_adapter([...])); empty: the base alone.
  void set_active(const std::vector<std::string>& names) {
    std::vector<Index> order;
    for (const std::string& n : names) {
      const Index k = index_of(n);
      DORA_CHECK_ARG(std::find(order.begin(), order.end(), k) == order.end(), "set_active: adapter '", n,
                     "' is named twice");
      order.push_back(k);
    }
    active_ = std::move(order);
    saved_ = false;
  }
  std::vector<std::string> active() const {
    std::vector<std::string> out;
    for (const Index k : active_) out.push_back(slots_[static_cast<std::size_t>(k)].a.name);
    return out;
  }
  /// PEFT's disable_adapter(): while off, forward is the base layer (the active set is kept).
  void enable_adapters(bool on = true) {
    enabled_ = on;
    saved_ = false;
  }
  bool adapters_enabled() const { return enabled_; }

  /// Training mode (the default, as in PEFT): dropout applies, norms are recomputed every forward.
  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  /// Reseeds the adapter's dropout stream (the single-adapter layers' seed_dropout: the same seed
  /// gives the same masks).
  void seed_dropout(const std::string& name, std::uint64_t seed) {
    slots_[static_cast<std::size_t>(index_of(name))].dropout_rng.seed(seed ^ kDropoutStream);
  }
  /// The adapter's dropout stream's exact state (text), for checkpoints; set_dropout_state restores it.
  std::string dropout_state(const std::string& name) const {
    return slots_[static_cast<std::size_t>(index_of(name))].dropout_rng.state();
  }
  void set_dropout_state(const std::string& name, const std::string& state) {
    slots_[static_cast<std::size_t>(index_of(name))].dropout_rng.set_state(state);
  }
  /// The adapter's dropout mask of the last training forward (lowered: N x d_in, entries 0 or
  /// 1 / (1 - p)); empty if it drew none.
  const MatrixType& dropout_mask(const std::string& name) const {
    const Index k = index_of(name);
    for (const Step& st : steps_)
      if (st.slot == k && st.dropout) return st.mask;
    return empty_;
  }

  void zero_grad() {
    for (Slot& s : slots_) {
      s.a.grad_A.setZero();
      s.a.grad_B.setZero();
      s.a.grad_m.setZero();
    }
  }

  /// Views of every adapter's trainable tensors and gradients, named "<PEFT name>.<adapter>"
  /// (lora_A.<name>, lora_B.<name>, lora_magnitude_vector.<name>). Views stay valid until an
  /// adapter is added or removed.
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> p;
    for (Slot& s : slots_) {
      AdapterType& a = s.a;
      p.push_back(
          {std::string(spec().a_name) + "." + a.name, {a.A.data(), a.A.size()}, {a.grad_A.data(), a.grad_A.size()}});
      p.push_back(
          {std::string(spec().b_name) + "." + a.name, {a.B.data(), a.B.size()}, {a.grad_B.data(), a.grad_B.size()}});
      if (a.is_dora())
        p.push_back({"lora_magnitude_vector." + a.name, {a.m.data(), a.m.size()}, {a.grad_m.data(), a.grad_m.size()}});
    }
    return p;
  }

  /// Evaluation mode, and every DoRA adapter's norm computed for its current A, B, m (one stacked
  /// product over W for all of them), so that infer_mixed() may be called from any number of threads.
  void prepare_inference() {
    eval();
    Index rows = 0;
    for (Slot& s : slots_) rows += s.a.is_dora() && !cache_matches(s) ? s.a.config.rank : 0;
    if (rows == 0) return;
    grow(XS_, rows, d_in());
    Index at = 0;
    for (Slot& s : slots_)
      if (s.a.is_dora() && !cache_matches(s)) {
        XS_.middleRows(at, s.a.config.rank) = s.a.A;
        at += s.a.config.rank;
      }
    grow(P_, rows, d_out());
    stacked_product(XS_.topRows(rows), P_.topRows(rows));
    at = 0;
    for (Slot& s : slots_)
      if (s.a.is_dora() && !cache_matches(s)) {
        update_norm(s, P_.middleRows(at, s.a.config.rank));
        at += s.a.config.rank;
      }
  }
  /// Call after changing the borrowed W in place: ||W_i||^2 is cached, and so are DoRA norms.
  void refresh_base() {
    w_sq_ = weight_row_squared_norms<Scalar>(lowered());
    for (Slot& s : slots_) s.cache_valid = false;
  }

  /// The active adapters merged into W in order (PEFT 0.21's merge_and_unload(adapter_names=active)):
  /// LoRA adds s B A; DoRA adds s B A and scales the rows by m / ||W + s B A||, the norm of the base W
  /// (huggingface/peft#3609), so the merged layer equals the stacked one. Bias unchanged.
  MultiMerge<Scalar> merge() const {
    DORA_CHECK_STATE(!active_.empty(), "merge(): no active adapter (set_active first)");
    MultiMerge<Scalar> out;
    MatrixType W = weight_dense<Scalar>(lowered());
    for (const Index k : active_) {
      const Slot& s = slots_[static_cast<std::size_t>(k)];
      gemm(s.a.B, false, s.a.A, false, W, s.a.scaling, Scalar(1));
      VectorType scale;
      if (s.a.is_dora()) {
        FactoredRowNorm<Scalar> work;
        work.resize(d_out(), d_in(), s.a.config.rank);
        VectorType n(d_out());
        work.compute(lowered(), w_sq_, s.a.A, s.a.B, s.a.scaling, n);
        scale.resize(d_out());
        for (Index i = 0; i < d_out(); ++i) scale[i] = magnitude_scale(s.a.m[i], n[i]);
        W = scale.asDiagonal() * W;
      }
      out.order.push_back(s.a.name);
      out.scale.push_back(std::move(scale));
    }
    if constexpr (Embedding)
      out.weight = W.transpose();
    else
      out.weight = std::move(W);
    return out;
  }
  /// Undoes merge() in reverse order with the scales cached at merge time and the named adapters'
  /// current A and B (PEFT's unmerge): DoRA rows are divided by their scale (an inactive row, scale
  /// 0, comes back as 0 - s B_i A), then s B A is subtracted. Returns the base weight (same layout).
  MatrixType unmerge(const MultiMerge<Scalar>& merged) const {
    const Index rows = Embedding ? d_in() : d_out(), cols = Embedding ? d_out() : d_in();
    DORA_CHECK_ARG(
        merged.weight.rows() == rows && merged.weight.cols() == cols && merged.scale.size() == merged.order.size(),
        "unmerge(): the merged weight must be ", rows, " x ", cols,
        " with one scale entry per merged "
        "adapter, got ",
        merged.weight.rows(), " x ", merged.weight.cols(), " and ", merged.scale.size(), " scales for ",
        merged.order.size(), " adapters");
    MatrixType W = Embedding ? MatrixType(merged.weight.transpose()) : merged.weight;
    for (std::size_t i = merged.order.size(); i-- > 0;) {
      const AdapterType& a = adapter(merged.order[i]);
      const VectorType& scale = merged.scale[i];
      if (a.is_dora()) {
        DORA_CHECK_ARG(scale.size() == d_out(), "unmerge(): DoRA adapter '", a.name, "' needs ", d_out(),
                       " scales, got ", scale.size());
        for (Index j = 0; j < d_out(); ++j) {
          if (scale[j] != Scalar(0))
            W.row(j) /= scale[j];
          else
            W.row(j).setZero();
        }
      }
      gemm(a.B, false, a.A, false, W, -a.scaling, Scalar(1));
    }
    if constexpr (Embedding) return W.transpose();
    return W;
  }

  /// Rows of the lowered map (d_out, out_channels, embedding_dim) and its columns.
  Index d_out() const { return lowered().rows(); }
  Index d_in() const { return lowered().cols(); }
  const BaseType& base() const { return base_; }

  /// infer_mixed()'s workspace (one per thread).
  struct MixedWorkspace {
    struct Buffers {
      MatrixType xk, u, h;
    };
    std::vector<Buffers> threads;             // one set per thread
    std::vector<std::array<Index, 3>> tasks;  // adapter, first and last + 1 position in order
    std::vector<Index> order, start;
    std::vector<char> stale;
    TokenIds ids;  // an embedding's ids
  };

 protected:
  explicit MultiAdapter(const BaseType& base) : base_(base) { refresh_base(); }

  static constexpr std::uint64_t kDropoutStream = 0x9E3779B97F4A7C15ULL;  // the single layers' stream
  static constexpr Index kMixedChunk = 64;                                // rows per task of a mixed batch

  // An adapter and its working state: the norm (and the evaluation cache), the dropout stream.
  struct Slot {
    AdapterType a;
    FactoredRowNorm<Scalar> norm;
    VectorType n, g, n_div;
    bool cache_valid = false;
    MatrixType A_seen, B_seen;
    VectorType m_seen;
    Rng dropout_rng;
  };
  // One active adapter in one forward: where its rows sit in the stacked buffers, u = x_k A^T, the
  // DoRA branch H, the dropout mask and the gradient reaching its dropped input.
  struct Step {
    Index slot = 0;
    bool dropout = false;
    Index xrow = -1;    // its dropped input's rows in XS_ (dropout)
    Index prow = -1;    // its P^T's rows in P_ (a DoRA norm computed in this forward)
    Index qrow = -1;    // its exact-mode Q's rows in GS_ / DS_
    Index xd_adj = -1;  // its dropped input's adjoint rows in GS_ / DS_ (DoRA with dropout)
    MatrixType u, H, mask, dxd, du;
  };

  static const FactorSpec& spec() {
    if constexpr (Embedding)
      return kEmbeddingFactors;
    else
      return kLinearFactors;
  }

  auto lowered() const {
    if constexpr (!Embedding)
      return base_.weight;
    else if constexpr (EmbeddingBase<Scalar, Storage>::kNative)
      return base_.weight.transpose();
    else
      return TransposedStored<Storage>{base_.weight};
  }

  Index find(const std::string& name) const {
    for (std::size_t k = 0; k < slots_.size(); ++k)
      if (slots_[k].a.name == name) return static_cast<Index>(k);
    return -1;
  }
  std::string names_list() const {
    if (slots_.empty()) return "no adapters";
    std::string out = "adapters";
    for (const Slot& s : slots_) out += " '" + s.a.name + "'";
    return out;
  }

  bool cache_matches(const Slot& s) const {
    return s.cache_valid && s.A_seen == s.a.A && s.B_seen == s.a.B && s.m_seen == s.a.m;
  }
  // n, g and n_div from P^T = A W^T; in evaluation mode the values are cached for these A, B, m.
  template <typename PT>
  void update_norm(Slot& s, const PT& pt) {
    s.norm.compute_with(lowered(), w_sq_, s.a.A, s.a.B, s.a.scaling, pt, s.n);
    for (Index i = 0; i < d_out(); ++i) {
      s.g[i] = magnitude_scale(s.a.m[i], s.n[i]);
      s.n_div[i] = inactive_row(s.a.m[i], s.n[i]) ? std::numeric_limits<Scalar>::infinity() : s.n[i];
    }
    s.cache_valid = !training_;
    if (s.cache_valid) {
      s.A_seen = s.a.A;
      s.B_seen = s.a.B;
      s.m_seen = s.a.m;
    }
  }

  // Sizes a stacked buffer to at least rows x cols, never shrinking it: the number of stacked rows
  // changes between training and evaluation forwards, and a steady state must not reallocate.
  static void grow(MatrixType& M, Index rows, Index cols) {
    if (M.rows() < rows || M.cols() != cols) M.resize(std::max(rows, M.cols() == cols ? M.rows() : Index(0)), cols);
  }

  // Y = X W^T over the lowered map (one pass over W), overwritten.
  template <typename DX, typename DY>
  void stacked_product(const Eigen::MatrixBase<DX>& X, DY&& Y) const {
    if constexpr (Embedding)
      weight_product(X, lowered(), Y);  // Y: a named parameter, an lvalue here
    else
      split_product(X, base_.weight, Y);
  }

  Slot& slot_of(const Step& st) { return slots_[static_cast<std::size_t>(st.slot)]; }

  // Whether a forward draws a dropout mask for this active adapter (embeddings never do, as PEFT).
  bool draws_mask(const AdapterType& a) const { return !Embedding && training_ && a.config.dropout > 0.0; }

  // Advances by `draws` the dropout stream of every adapter a forward would draw a mask for.
  void skip_dropout_draws(std::uint64_t draws) {
    if (!enabled_) return;  // forward then runs no adapter
    for (Index k : active_) {
      Slot& s = slots_[static_cast<std::size_t>(k)];
      if (draws_mask(s.a)) s.dropout_rng.discard(draws);
    }
  }

  /// The stacked forward on the lowered input (dense: X, N x d_in; embedding: ids_ already saved),
  /// y lowered (N x d_out). draw(rng, mask): fills a lowered dropout mask from an adapter's stream.
  template <typename Input, typename DrawMask>
  void forward_lowered(const Input& X, Index N, Eigen::Ref<MatrixType> y, DrawMask&& draw) {
    const std::size_t K = enabled_ ? active_.size() : 0;
    steps_.resize(K);
    // Rows of the stacked product: the batch, the dropped inputs of DoRA adapters with dropout, the
    // A's of DoRA adapters whose norm is computed now; then (outside the product) the dropped
    // inputs of LoRA adapters with dropout.
    Index rows = Embedding ? 0 : N;
    for (std::size_t i = 0; i < K; ++i) {
      Step& st = steps_[i];
      st.slot = active_[i];
      st.xrow = st.prow = st.qrow = st.xd_adj = -1;
      const AdapterType& a = slot_of(st).a;
      st.dropout = draws_mask(a);
      if (st.dropout && a.is_dora()) st.xrow = rows, rows += N;
    }
    for (std::size_t i = 0; i < K; ++i) {
      Step& st = steps_[i];
      const Slot& s = slot_of(st);
      if (s.a.is_dora() && (training_ || !cache_matches(s))) st.prow = rows, rows += s.a.config.rank;
    }
    const Index product_rows = rows;
    for (std::size_t i = 0; i < K; ++i) {
      Step& st = steps_[i];
      if (st.dropout && !slot_of(st).a.is_dora()) st.xrow = rows, rows += N;
    }
    grow(XS_, rows, d_in());
    if constexpr (!Embedding)
      parallel_rows(N, d_in(), [&](Index b, Index e) { XS_.middleRows(b, e - b) = X.middleRows(b, e - b); });
    for (std::size_t i = 0; i < K; ++i) {
      Step& st = steps_[i];
      Slot& s = slot_of(st);
      if (st.dropout) {
        st.mask.resize(N, d_in());
        draw(s.dropout_rng, s.a.config.dropout, st.mask);
        parallel_rows(N, d_in(), [&](Index b, Index e) {
          XS_.middleRows(st.xrow + b, e - b) = XS_.middleRows(b, e - b).cwiseProduct(st.mask.middleRows(b, e - b));
        });
      }
      if (st.prow >= 0) XS_.middleRows(st.prow, s.a.config.rank) = s.a.A;
    }
    // One pass over W for everything that needs it.
    grow(P_, Embedding ? N + product_rows : product_rows, d_out());
    if constexpr (Embedding) {
      gather_base(P_.topRows(N));
      if (product_rows > 0) stacked_product(XS_.topRows(product_rows), P_.middleRows(N, product_rows));
    } else {
      stacked_product(XS_.topRows(product_rows), P_.topRows(product_rows));
    }
    const Index shift = Embedding ? N : 0;  // P_'s rows sit below the gathered batch for an embedding
    for (std::size_t i = 0; i < K; ++i) {
      Step& st = steps_[i];
      if (st.prow >= 0) update_norm(slot_of(st), P_.middleRows(shift + st.prow, slot_of(st).a.config.rank));
    }
    // Compose in order on R = P_.topRows(N).
    typename MatrixType::RowsBlockXpr R = P_.topRows(N);
    for (std::size_t i = 0; i < K; ++i) {
      Step& st = steps_[i];
      const Slot& s = slot_of(st);
      const AdapterType& a = s.a;
      st.u.resize(N, a.config.rank);
      low_rank_in(X, st, a.A, st.u);
      if (!a.is_dora()) {
        gemm(st.u, false, a.B, true, R, a.scaling, Scalar(1));
        continue;
      }
      st.H.resize(N, d_out());
      if (st.dropout) {
        // R += (g - 1) x_d W^T + g s L(x_d) = g H - x_d W^T, H = x_d W^T + s L(x_d).
        compose_rows(N, [&](Index t) { st.H.row(t) = P_.row(st.xrow + t); });
        gemm(st.u, false, a.B, true, st.H, a.scaling, Scalar(1));
        compose_rows(N, [&](Index t) { R.row(t) += st.H.row(t).cwiseProduct(s.g.transpose()) - P_.row(st.xrow + t); });
      } else {
        // H = R_{k-1} + s L (kept for backward), R_k = H g: one pass after the product.
        gemm(st.u, false, a.B, true, R, a.scaling, Scalar(1));
        compose_rows(N, [&](Index t) {
          st.H.row(t) = R.row(t);
          R.row(t) = R.row(t).cwiseProduct(s.g.transpose());
        });
      }
    }
    const bool bias = has_bias();
    compose_rows(N, [&](Index t) {
      if (bias)
        y.row(t) = R.row(t) + bias_row();
      else
        y.row(t) = R.row(t);
    });
    batch_ = N;
    saved_ = true;
  }

  /// Accumulates every active adapter's gradients; dX (lowered, N x d_in; dense only) is
  /// overwritten with the input gradient when not null.
  template <typename Input>
  void backward_lowered(const Input& X, const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType>* dX) {
    DORA_CHECK_STATE(saved_, "backward needs a forward first (and one forward per backward)");
    const Index N = batch_;
    // Rows of the stacked adjoint GS_: G (the gradient reaching R_0 = x W^T, on top; read by the
    // adjoint when dx is wanted), dP_d of DoRA adapters with dropout (when dx is wanted), Q of
    // exact-mode DoRA adapters. One product [G; dP_d...; Q...] W reads W once.
    const bool want_dx = !Embedding && dX != nullptr;
    Index rows = N;
    for (Step& st : steps_) {
      const AdapterType& a = slot_of(st).a;
      st.qrow = st.xd_adj = -1;
      if (a.is_dora() && st.dropout && want_dx) st.xd_adj = rows, rows += N;
    }
    for (Step& st : steps_) {
      const AdapterType& a = slot_of(st).a;
      if (a.is_dora() && a.config.norm_gradient == NormGradient::exact) st.qrow = rows, rows += a.config.rank;
    }
    grow(GS_, rows, d_out());
    typename MatrixType::RowsBlockXpr G = GS_.topRows(N);
    compose_rows(N, [&](Index t) { G.row(t) = dy.row(t); });
    const Index shift = Embedding ? N : 0;
    for (std::size_t i = steps_.size(); i-- > 0;) {
      Step& st = steps_[i];
      Slot& s = slot_of(st);
      AdapterType& a = s.a;
      const bool split = a.is_dora() && st.dropout;  // the branch's gradient differs from R_{k-1}'s
      if (a.is_dora()) {
        // dg_j = sum_t G_tj H_tj (columns spread over threads), dm = dg / n.
        dg_.resize(d_out());
        parallel_rows(d_out(), N, [&](Index b, Index e) {
          dg_.segment(b, e - b).noalias() =
              G.middleCols(b, e - b).cwiseProduct(st.H.middleCols(b, e - b)).colwise().sum().transpose();
        });
        dm_ = dg_.cwiseQuotient(s.n_div);
        a.grad_m += dm_;
        if (a.config.norm_gradient == NormGradient::exact) {
          // P^T of this forward's norm (or, with a cached norm, computed now), made Q by the row terms.
          Qt_.resize(a.config.rank, d_out());
          if (st.prow >= 0)
            Qt_ = P_.middleRows(shift + st.prow, a.config.rank);
          else
            weight_product(a.A, lowered(), Qt_);
          beta_n_ = -(s.g.array() * dm_.array()).matrix();
          norm_gradient_rows(a.scaling, a.B, s.norm.BK(), beta_n_, s.n_div, Qt_, a.grad_B);
          GS_.middleRows(st.qrow, a.config.rank) = Qt_;
          gemm(Qt_, false, a.B, false, Kb_);
          gemm(Kb_, false, a.A, false, a.grad_A, a.scaling, Scalar(1));
        }
        if (split) {
          // R_{k-1} passes G on unchanged; the branch gets G g and the dropped base part x_d W^T
          // gets G (g - 1).
          Gs_.resize(N, d_out());
          compose_rows(N, [&](Index t) {
            Gs_.row(t) = G.row(t).cwiseProduct(s.g.transpose());
            if (want_dx) GS_.row(st.xd_adj + t) = Gs_.row(t) - G.row(t);
          });
        } else {
          compose_rows(N, [&](Index t) { G.row(t) = G.row(t).cwiseProduct(s.g.transpose()); });
        }
      }
      const Eigen::Ref<const MatrixType> Gs =
          split ? Eigen::Ref<const MatrixType>(Gs_) : Eigen::Ref<const MatrixType>(G);
      gemm(Gs, true, st.u, false, a.grad_B, a.scaling, Scalar(1));
      st.du.resize(N, a.config.rank);
      gemm(Gs, false, a.B, false, st.du, a.scaling);
      low_rank_grad(X, st, st.du, a.grad_A);
    }
    // The one adjoint pass: straight into dx when it is all there is.
    const Index first = want_dx ? 0 : N;
    if (want_dx && rows == N) {
      stacked_adjoint(G, *dX);
    } else if (rows > first) {
      grow(DS_, rows, d_in());
      typename MatrixType::RowsBlockXpr DS = DS_.middleRows(first, rows - first);
      stacked_adjoint(GS_.middleRows(first, rows - first), DS);
      if (want_dx) {
        Eigen::Ref<MatrixType>& dx = *dX;
        parallel_rows(N, d_in(), [&](Index b, Index e) { dx.middleRows(b, e - b) = DS_.middleRows(b, e - b); });
      }
    }
    for (Step& st : steps_) {
      AdapterType& a = slot_of(st).a;
      if (st.qrow >= 0) a.grad_A += DS_.middleRows(st.qrow, a.config.rank);
      if (!want_dx) continue;
      if (!st.dropout) {
        gemm(st.du, false, a.A, false, *dX, Scalar(1), Scalar(1));
        continue;
      }
      // dx += mask . (du A + dP_d W) for an adapter that saw the dropped input.
      st.dxd.resize(N, d_in());
      gemm(st.du, false, a.A, false, st.dxd);
      if (a.is_dora()) st.dxd += DS_.middleRows(st.xd_adj, N);
      Eigen::Ref<MatrixType>& dx = *dX;
      parallel_rows(N, d_in(), [&](Index b, Index e) {
        dx.middleRows(b, e - b) += st.dxd.middleRows(b, e - b).cwiseProduct(st.mask.middleRows(b, e - b));
      });
    }
    saved_ = false;
  }

  // dX = G W over the lowered map (dense: split over W's columns; embedding: the transposed table).
  template <typename DG, typename DX>
  void stacked_adjoint(const Eigen::MatrixBase<DG>& G, DX& dX) const {
    if constexpr (Embedding) {
      dX.setZero();
      weight_adjoint_add(G, lowered(), dX);
    } else {
      split_adjoint_product(G, base_.weight, dX);
    }
  }

  // u = x_k A^T: the dense (possibly dropped) input, or the embedding's gather A^T[ids].
  template <typename Input>
  void low_rank_in(const Input& X, const Step& st, const MatrixType& A, MatrixType& u) const {
    if constexpr (Embedding) {
      (void)X;
      (void)st;
      for (Index t = 0; t < ids_.rows(); ++t) u.row(t) = A.col(static_cast<Index>(ids_[t])).transpose();
    } else {
      (void)X;
      if (st.dropout)
        gemm(XS_.middleRows(st.xrow, u.rows()), false, A, true, u);
      else
        gemm(XS_.topRows(u.rows()), false, A, true, u);
    }
  }
  // dA += du^T x_k (embedding: the scatter-add, none into padding_idx).
  template <typename Input>
  void low_rank_grad(const Input& X, const Step& st, const MatrixType& du, MatrixType& grad_A) const {
    if constexpr (Embedding) {
      (void)X;
      (void)st;
      for (Index t = 0; t < ids_.rows(); ++t) {
        const Index id = static_cast<Index>(ids_[t]);
        if (id != base_.padding_idx) grad_A.col(id) += du.row(t).transpose();
      }
    } else {
      const Index N = du.rows();
      if (st.dropout)
        gemm(du, true, XS_.middleRows(st.xrow, N), false, grad_A, Scalar(1), Scalar(1));
      else
        gemm(du, true, XS_.topRows(N), false, grad_A, Scalar(1), Scalar(1));
    }
  }
  // Rows of the batch, spread over threads when large.
  template <typename F>
  void compose_rows(Index N, F&& f) const {
    parallel_rows(N, d_out(), [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) f(t);
    });
  }

  bool has_bias() const {
    if constexpr (Embedding)
      return false;
    else
      return base_.has_bias();
  }
  auto bias_row() const {
    if constexpr (Embedding)
      return VectorType::Zero(0).transpose();
    else
      return base_.bias.transpose();
  }

  // The embedding's base lookup: rows W[ids] (dequantized from a stored table).
  template <typename Out>
  void gather_base(Out&& R) const {
    if constexpr (Embedding) {
      for (Index t = 0; t < ids_.rows(); ++t) {
        typename std::decay_t<Out>::RowXpr row = R.row(t);
        weight_row(base_.weight, static_cast<Index>(ids_[t]), row);
      }
    } else {
      (void)R;
    }
  }

  /// The mixed batch on the lowered input: lowered row t goes through adapter of_row[t] (-1: the
  /// base). y lowered (rows x d_out), overwritten. Thread-safe (reads the caches only).
  template <typename Input>
  void infer_mixed_lowered(const Input& X, const TokenIds* ids, const Index* of_row, Index rows,
                           Eigen::Ref<MatrixType> y, MixedWorkspace& w) const {
    const Index K = adapter_count();
    // Counting sort of the rows by adapter: w.order[w.start[k] .. w.start[k + 1]) are adapter k's.
    w.start.assign(static_cast<std::size_t>(K + 2), 0);
    for (Index t = 0; t < rows; ++t) {
      const Index k = of_row[t];
      DORA_CHECK_ARG(k >= -1 && k < K, "infer_mixed: row ", t, " names adapter ", k, " but the layer has ", K,
                     " adapters (-1: the base)");
      ++w.start[static_cast<std::size_t>(k + 2)];
    }
    for (std::size_t k = 1; k < w.start.size(); ++k) w.start[k] += w.start[k - 1];
    w.order.resize(static_cast<std::size_t>(rows));
    for (Index t = 0; t < rows; ++t)
      w.order[static_cast<std::size_t>(w.start[static_cast<std::size_t>(of_row[t] + 1)]++)] = t;
    // w.start[k + 1] is now where adapter k's rows end; they begin at w.start[k].
    // Each used DoRA adapter's cache must match its parameters: r (d_in + d_out) + d_out reads per
    // adapter, spread over threads (16 adapters of rank 16 at 4096 x 4096 are 8 MB).
    w.stale.assign(static_cast<std::size_t>(K), 0);
#pragma omp parallel for schedule(dynamic) if (K > 1 && !omp_in_parallel())
    for (Index k = 0; k < K; ++k) {
      const Slot& s = slots_[static_cast<std::size_t>(k)];
      const Index begin = w.start[static_cast<std::size_t>(k)], end = w.start[static_cast<std::size_t>(k + 1)];
      if (begin < end && s.a.is_dora() && !cache_matches(s)) w.stale[static_cast<std::size_t>(k)] = 1;
    }
    for (Index k = 0; k < K; ++k)
      DORA_CHECK_STATE(!w.stale[static_cast<std::size_t>(k)], "infer_mixed: DoRA adapter '",
                       slots_[static_cast<std::size_t>(k)].a.name,
                       "' has no cached norm for its current A, B, m: call prepare_inference() first");
    if constexpr (Embedding) {
      for (Index t = 0; t < rows; ++t) {
        typename Eigen::Ref<MatrixType>::RowXpr row = y.row(t);
        weight_row(base_.weight, static_cast<Index>((*ids)[t]), row);
      }
    } else {
      (void)ids;
      frozen_product(X, base_.weight, y);
    }
    // Tasks of at most kMixedChunk rows of one adapter, spread over threads (the rows of different
    // tasks are disjoint), each thread with its own buffers: a thread's products are small and run
    // on that thread alone, and many adapters with few rows each keep every thread busy.
    w.tasks.clear();
    Index rank = 0;
    for (Index k = 0; k < K; ++k) {
      const Index begin = w.start[static_cast<std::size_t>(k)], end = w.start[static_cast<std::size_t>(k + 1)];
      for (Index b = begin; b < end; b += kMixedChunk) w.tasks.push_back({k, b, std::min(end, b + kMixedChunk)});
      rank = std::max(rank, slots_[static_cast<std::size_t>(k)].a.config.rank);
    }
    int threads = 1;
#ifdef _OPENMP
    if (!omp_in_parallel() && w.tasks.size() > 1)
      threads = std::max(1, std::min(omp_get_max_threads(), static_cast<int>(w.tasks.size())));
#endif
    if (w.threads.size() < static_cast<std::size_t>(threads)) w.threads.resize(static_cast<std::size_t>(threads));
    for (int t = 0; t < threads; ++t) {
      typename MixedWorkspace::Buffers& buf = w.threads[static_cast<std::size_t>(t)];
      grow(buf.u, kMixedChunk, rank);
      grow(buf.h, kMixedChunk, d_out());
      if constexpr (!Embedding) grow(buf.xk, kMixedChunk, d_in());
    }
    const Index tasks = static_cast<Index>(w.tasks.size());
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (threads > 1)
    for (Index task = 0; task < tasks; ++task) {
      int me = 0;
#ifdef _OPENMP
      if (threads > 1) me = omp_get_thread_num();
#endif
      typename MixedWorkspace::Buffers& buf = w.threads[static_cast<std::size_t>(me)];
      const std::array<Index, 3>& job = w.tasks[static_cast<std::size_t>(task)];
      const Slot& s = slots_[static_cast<std::size_t>(job[0])];
      const AdapterType& a = s.a;
      const Index n = job[2] - job[1], r = a.config.rank;
      const Index* rows_k = w.order.data() + job[1];
      // u contiguous (a map on the buffer, not a corner of it): a one-row product is then a gemv on
      // its data, where a strided corner would be copied.
      Eigen::Map<MatrixType> u(buf.u.data(), n, r);
      typename MatrixType::RowsBlockXpr h = buf.h.topRows(n);
      if constexpr (Embedding) {
        for (Index i = 0; i < n; ++i) u.row(i) = a.A.col(static_cast<Index>((*ids)[rows_k[i]])).transpose();
      } else {
        typename MatrixType::RowsBlockXpr xk = buf.xk.topRows(n);
        for (Index i = 0; i < n; ++i) xk.row(i) = X.row(rows_k[i]);
        gemm(xk, false, a.A, true, u);
      }
      for (Index i = 0; i < n; ++i) h.row(i) = y.row(rows_k[i]);
      u *= a.scaling;  // scaled first: a scaled operand of a one-row product would be copied
      gemm(u, false, a.B, true, h, Scalar(1), Scalar(1));
      for (Index i = 0; i < n; ++i) {
        if (a.is_dora())
          y.row(rows_k[i]) = h.row(i).cwiseProduct(s.g.transpose());
        else
          y.row(rows_k[i]) = h.row(i);
      }
    }
    if (has_bias()) {
      compose_rows(rows, [&](Index t) { y.row(t) += bias_row(); });
    }
  }

  /// Names per row -> adapter indices (-1 for "" and "__base__").
  std::vector<Index> indices_of(const std::vector<std::string>& names) const {
    std::vector<Index> out(names.size());
    for (std::size_t t = 0; t < names.size(); ++t) {
      const std::string& n = names[t];
      if (n.empty() || n == "__base__") {
        out[t] = -1;
        continue;
      }
      const Index k = find(n);
      DORA_CHECK_ARG(k >= 0, "row ", t, " names no adapter: '", n, "' (the layer has ", names_list(), ")");
      out[t] = k;
    }
    return out;
  }

  BaseType base_;
  VectorType w_sq_;
  std::vector<Slot> slots_;
  std::vector<Index> active_;
  bool enabled_ = true, training_ = true, saved_ = false;
  Index batch_ = 0;
  std::vector<Step> steps_;
  TokenIds ids_;  // embedding: the last forward's ids
  MatrixType XS_, P_, Gs_, GS_, DS_, Qt_, Kb_, empty_;
  VectorType dg_, dm_, beta_n_;
};

}  // namespace detail

/// Several adapters on one frozen linear layer (PEFT's lora.Linear with several adapters).
/// Storage: how W is stored (storage.hpp).
template <typename Scalar, typename Storage = Scalar>
class MultiLinear : public detail::MultiAdapter<Scalar, Storage, false> {
  using Core = detail::MultiAdapter<Scalar, Storage, false>;

 public:
  using MatrixType = Matrix<Scalar>;
  using Index = Eigen::Index;
  using MixedWorkspace = typename Core::MixedWorkspace;

  explicit MultiLinear(const BaseLayer<Scalar, Storage>& base) : Core(base) {}

  /// Advances each active adapter's dropout stream past the masks of `rows` input rows, as a training
  /// forward on `rows` rows would (the single-adapter layers' skip_dropout_rows; data-parallel
  /// training: dora::mpi::DataParallel::dropout_begin/end).
  void skip_dropout_rows(Index rows) {
    DORA_CHECK_ARG(rows >= 0, "skip_dropout_rows: rows must be >= 0, got ", rows);
    this->skip_dropout_draws(static_cast<std::uint64_t>(rows * this->d_in()));
  }

  /// y = the stacked layer (the active adapters in order; see the file comment); saves what
  /// backward needs. x: N x d_in, y: N x d_out.
  void forward(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y) {
    check_io(x, y);
    this->forward_lowered(x, x.rows(), y,
                          [](detail::Rng& rng, double p, MatrixType& mask) { detail::draw_dropout(rng, p, mask); });
  }
  MatrixType forward(const Eigen::Ref<const MatrixType>& x) {
    MatrixType y(x.rows(), this->d_out());
    forward(x, y);
    return y;
  }
  /// Adds every active adapter's gradients of sum(y . dy) and writes dx (N x d_in).
  void backward(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType> dx) {
    check_grad(dy);
    DORA_CHECK_ARG(dx.rows() == this->batch_ && dx.cols() == this->d_in(), "dx must be N x d_in = ", this->batch_,
                   " x ", this->d_in(), ", got ", dx.rows(), " x ", dx.cols());
    DORA_CHECK_ARG(!detail::overlaps(dx.data(), dx.size(), dy.data(), dy.size()), "dx must not share memory with dy");
    this->backward_lowered(dy, dy, &dx);
  }
  MatrixType backward(const Eigen::Ref<const MatrixType>& dy) {
    MatrixType dx(this->batch_, this->d_in());
    backward(dy, dx);
    return dx;
  }
  /// The parameter gradients only (no input gradient).
  void backward_parameters(const Eigen::Ref<const MatrixType>& dy) {
    check_grad(dy);
    this->backward_lowered(dy, dy, nullptr);
  }

  /// The mixed batch: row t of x goes through adapter of_row[t] alone (index_of(name); -1: the base).
  /// Needs prepare_inference() after the last change of a DoRA adapter used; modifies nothing
  /// (thread-safe with one workspace per thread); allocates nothing once the workspace has grown.
  void infer_mixed(const Eigen::Ref<const MatrixType>& x, const std::vector<Index>& of_row, Eigen::Ref<MatrixType> y,
                   MixedWorkspace& w) const {
    check_io(x, y);
    DORA_CHECK_ARG(static_cast<Index>(of_row.size()) == x.rows(), "infer_mixed: ", of_row.size(),
                   " adapters given for ", x.rows(), " rows of x");
    this->infer_mixed_lowered(x, nullptr, of_row.data(), x.rows(), y, w);
  }
  /// The same with adapter names per row ("" or "__base__": the base layer), as PEFT's
  /// forward(x, adapter_names=[...]).
  MatrixType infer_mixed(const Eigen::Ref<const MatrixType>& x, const std::vector<std::string>& names) const {
    MatrixType y(x.rows(), this->d_out());
    MixedWorkspace w;
    infer_mixed(x, this->indices_of(names), y, w);
    return y;
  }

 private:
  void check_io(const Eigen::Ref<const MatrixType>& x, const Eigen::Ref<const MatrixType>& y) const {
    DORA_CHECK_ARG(x.cols() == this->d_in(), "x must be N x d_in = N x ", this->d_in(), ", got ", x.rows(), " x ",
                   x.cols());
    DORA_CHECK_ARG(y.rows() == x.rows() && y.cols() == this->d_out(), "y must be N x d_out = ", x.rows(), " x ",
                   this->d_out(), ", got ", y.rows(), " x ", y.cols());
    DORA_CHECK_ARG(!detail::overlaps(x.data(), x.size(), y.data(), y.size()), "y must not share memory with x");
  }
  void check_grad(const Eigen::Ref<const MatrixType>& dy) const {
    DORA_CHECK_STATE(this->saved_, "backward needs a forward first (one forward per backward)");
    DORA_CHECK_ARG(dy.rows() == this->batch_ && dy.cols() == this->d_out(), "dy must be N x d_out = ", this->batch_,
                   " x ", this->d_out(), " (N from the last forward), got ", dy.rows(), " x ", dy.cols());
  }
};

/// Several adapters on one frozen convolution (PEFT's lora.Conv1d/2d/3d with several adapters):
/// the adapters' factors are the flattened ones of LoraConv / DoraConv (A r x in k..., B out x r).
/// groups must be 1.
template <typename Scalar, typename Storage = Scalar>
class MultiConv : public detail::MultiAdapter<Scalar, Storage, false> {
  using Core = detail::MultiAdapter<Scalar, Storage, false>;

 public:
  using MatrixType = Matrix<Scalar>;
  using Index = Eigen::Index;
  /// infer_mixed()'s workspace: the unfolded x, the lowered output, the rows' adapters.
  struct MixedWorkspace : Core::MixedWorkspace {
    MatrixType cols, y;
    std::vector<Index> of_lowered_row;
  };

  explicit MultiConv(const ConvBase<Scalar, Storage>& base) : Core(checked(base).lowered), lowering_(base.geometry) {}

  /// As MultiLinear::skip_dropout_rows: one mask draw per input element (x's, before im2col).
  void skip_dropout_rows(Index rows) {
    DORA_CHECK_ARG(rows >= 0, "skip_dropout_rows: rows must be >= 0, got ", rows);
    this->skip_dropout_draws(static_cast<std::uint64_t>(rows * input_cols()));
  }

  const ConvGeometry& geometry() const { return lowering_.geometry(); }

  /// x: N x (in_channels x input size), y: N x (out_channels x output size), torch's layouts.
  void forward(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y) {
    lowering_.check_io(x, y);
    const Index N = x.rows();
    const MatrixType& X = lowering_.lower_input(x);
    MatrixType& Y = lowering_.lowered_output();
    // Dropout: one mask on x, unfolded, so that every copy of an input element shares its draw.
    this->forward_lowered(X, Y.rows(), Y, [&](detail::Rng& rng, double p, MatrixType& mask) {
      lowering_.lower_mask(
          N, [&](MatrixType& m) { detail::draw_dropout(rng, p, m); }, mask);
    });
    lowering_.fold_output(y);
  }
  MatrixType forward(const Eigen::Ref<const MatrixType>& x) {
    MatrixType y(x.rows(), output_cols());
    forward(x, y);
    return y;
  }
  void backward(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType> dx) {
    DORA_CHECK_STATE(this->saved_, "backward needs a forward first (one forward per backward)");
    DORA_CHECK_ARG(dx.rows() == lowering_.batch() && dx.cols() == input_cols(),
                   "dx must be N x (in_channels x input size) = ", lowering_.batch(), " x ", input_cols(), ", got ",
                   dx.rows(), " x ", dx.cols());
    const MatrixType& dY = lowering_.lower_grad(dy);
    // The patches (the layer kept its own copy of the lowered input) receive their gradient.
    Eigen::Ref<MatrixType> dX = lowering_.input_grad_buffer();
    this->backward_lowered(dY, dY, &dX);
    lowering_.fold_input_grad(dx);
  }
  MatrixType backward(const Eigen::Ref<const MatrixType>& dy) {
    MatrixType dx(lowering_.batch(), input_cols());
    backward(dy, dx);
    return dx;
  }
  void backward_parameters(const Eigen::Ref<const MatrixType>& dy) {
    DORA_CHECK_STATE(this->saved_, "backward needs a forward first (one forward per backward)");
    const MatrixType& dY = lowering_.lower_grad(dy);
    this->backward_lowered(dY, dY, nullptr);
  }

  /// The mixed batch: sample t goes through adapter of_row[t] alone (-1: the base); see MultiLinear.
  void infer_mixed(const Eigen::Ref<const MatrixType>& x, const std::vector<Index>& of_row, Eigen::Ref<MatrixType> y,
                   MixedWorkspace& w) const {
    lowering_.check_io(x, y);
    DORA_CHECK_ARG(static_cast<Index>(of_row.size()) == x.rows(), "infer_mixed: ", of_row.size(),
                   " adapters given for ", x.rows(), " samples of x");
    const Index N = x.rows(), L = lowering_.geometry().output_volume();
    lowering_.lower_input(x, w.cols, w.y);
    w.of_lowered_row.resize(static_cast<std::size_t>(N * L));
    for (Index n = 0; n < N; ++n)
      for (Index l = 0; l < L; ++l)
        w.of_lowered_row[static_cast<std::size_t>(n * L + l)] = of_row[static_cast<std::size_t>(n)];
    this->infer_mixed_lowered(w.cols, nullptr, w.of_lowered_row.data(), N * L, w.y, w);
    lowering_.fold_output(w.y, y);
  }
  MatrixType infer_mixed(const Eigen::Ref<const MatrixType>& x, const std::vector<std::string>& names) const {
    MatrixType y(x.rows(), output_cols());
    MixedWorkspace w;
    infer_mixed(x, this->indices_of(names), y, w);
    return y;
  }

  Index output_cols() const { return lowering_.output_cols(); }
  Index input_cols() const { return lowering_.input_cols(); }

 private:
  static const ConvBase<Scalar, Storage>& checked(const ConvBase<Scalar, Storage>& base) {
    DORA_CHECK_ARG(base.geometry.groups == 1, "MultiConv: a convolution with groups = ", base.geometry.groups,
                   " is not supported with several adapters (use LoraConv / DoraConv for one adapter)");
    return base;
  }

  detail::ConvLowering<Scalar> lowering_;
};

/// Several adapters on one frozen embedding table (PEFT's lora.Embedding with several adapters):
/// factors lora_embedding_A (r x num_embeddings) and lora_embedding_B (embedding_dim x r); no
/// dropout (PEFT's Embedding has none) and no input gradient.
template <typename Scalar, typename Storage = Scalar>
class MultiEmbedding : public detail::MultiAdapter<Scalar, Storage, true> {
  using Core = detail::MultiAdapter<Scalar, Storage, true>;

 public:
  using MatrixType = Matrix<Scalar>;
  using Index = Eigen::Index;
  using MixedWorkspace = typename Core::MixedWorkspace;

  explicit MultiEmbedding(const EmbeddingBase<Scalar, Storage>& base) : Core(base) {}

  /// Embeddings have no dropout (PEFT): nothing to skip; for dora::mpi::DataParallel::dropout_begin/end.
  void skip_dropout_rows(Index rows) { DORA_CHECK_ARG(rows >= 0, "skip_dropout_rows: rows must be >= 0, got ", rows); }

  Index num_embeddings() const { return this->d_in(); }
  Index embedding_dim() const { return this->d_out(); }

  void forward(const Eigen::Ref<const TokenIds>& ids, Eigen::Ref<MatrixType> y) {
    check_ids(ids, y);
    this->ids_ = ids;
    this->forward_lowered(ids, ids.rows(), y, [](detail::Rng&, double, MatrixType&) {});
  }
  MatrixType forward(const Eigen::Ref<const TokenIds>& ids) {
    MatrixType y(ids.rows(), embedding_dim());
    forward(ids, y);
    return y;
  }
  /// The parameter gradients of sum(y . dy) (ids have no gradient).
  void backward_parameters(const Eigen::Ref<const MatrixType>& dy) {
    DORA_CHECK_STATE(this->saved_, "backward needs a forward first (one forward per backward)");
    DORA_CHECK_ARG(dy.rows() == this->batch_ && dy.cols() == embedding_dim(),
                   "dy must be N x embedding_dim = ", this->batch_, " x ", embedding_dim(), ", got ", dy.rows(), " x ",
                   dy.cols());
    this->backward_lowered(this->ids_, dy, nullptr);
  }

  /// The mixed batch: token t goes through adapter of_row[t] alone (-1: the base); see MultiLinear.
  void infer_mixed(const Eigen::Ref<const TokenIds>& ids, const std::vector<Index>& of_row, Eigen::Ref<MatrixType> y,
                   MixedWorkspace& w) const {
    check_ids(ids, y);
    DORA_CHECK_ARG(static_cast<Index>(of_row.size()) == ids.rows(), "infer_mixed: ", of_row.size(),
                   " adapters given for ", ids.rows(), " ids");
    const TokenIds& id = ids_copy(ids, w);
    this->infer_mixed_lowered(id, &id, of_row.data(), ids.rows(), y, w);
  }
  MatrixType infer_mixed(const Eigen::Ref<const TokenIds>& ids, const std::vector<std::string>& names) const {
    MatrixType y(ids.rows(), embedding_dim());
    MixedWorkspace w;
    infer_mixed(ids, this->indices_of(names), y, w);
    return y;
  }

 private:
  void check_ids(const Eigen::Ref<const TokenIds>& ids, const Eigen::Ref<const MatrixType>& y) const {
    DORA_CHECK_ARG(y.rows() == ids.rows() && y.cols() == embedding_dim(), "y must be N x embedding_dim = ", ids.rows(),
                   " x ", embedding_dim(), ", got ", y.rows(), " x ", y.cols());
    for (Index t = 0; t < ids.rows(); ++t)
      DORA_CHECK_ARG(ids[t] >= 0 && ids[t] < num_embeddings(), "ids[", t, "] = ", ids[t],
                     " is outside [0, num_embeddings) = [0, ", num_embeddings(), ")");
  }
  // infer_mixed_lowered reads ids through a TokenIds; a Ref to a plain TokenIds is used as it is.
  static const TokenIds& ids_copy(const Eigen::Ref<const TokenIds>& ids, MixedWorkspace& w) {
    w.ids = ids;
    return w.ids;
  }
};

}  // namespace dora
