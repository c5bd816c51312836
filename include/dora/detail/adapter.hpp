#pragma once
/// \file detail/adapter.hpp
/// What every adapter layer shares, written once: the low-rank factors A and B with their
/// gradients, the scaling, the configuration, train/eval mode, the dropout stream, the parameter
/// views, zero_grad and the allocating forward/infer/backward wrappers.
///
/// A layer type derives from Adapter<Derived, Scalar, InputRef> (CRTP) and supplies its products:
///   void forward(const InputRef& x, Eigen::Ref<MatrixType> y);
///   void infer(const InputRef& x, Eigen::Ref<MatrixType> y, MatrixType& workspace) const;
///   void backward_impl(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType>* dx);
///   Index output_cols() const;  Index input_cols() const;  (columns of y and of dx)
///   Index saved_batch() const;  (rows of the last forward's x)
///   using InferWorkspace = ...;  (what infer() needs besides y)
///   static constexpr bool kHasInputGradient;        (false for integer inputs)
///   void add_extra_parameters(std::vector<Parameter<Scalar>>&);  void zero_extra_grad();
/// The factors are those of the layer's lowered linear map V = W + s B A (d_out x d_in): for a
/// linear layer W itself, for a convolution the kernel flattened to out x (in k...), for an
/// embedding the transposed table (dim x num_embeddings).

#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "../base_layer.hpp"
#include "../config.hpp"
#include "../init.hpp"
#include "random.hpp"

namespace dora {

/// A flat view of one trainable tensor and its gradient, for optimizers that treat parameters
/// uniformly (the view aliases the layer's own storage).
template <typename Scalar_>
struct Parameter {
  using Scalar = Scalar_;
  std::string name;  ///< PEFT's name: "lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", ...
  Eigen::Map<Vector<Scalar>> value;
  Eigen::Map<Vector<Scalar>> grad;
};

namespace detail {

// True when [a, a + na) and [b, b + nb) share memory: an output must not alias an input.
template <typename Scalar>
bool overlaps(const Scalar* a, Eigen::Index na, const Scalar* b, Eigen::Index nb) {
  if (na == 0 || nb == 0) return false;
  return std::less<const Scalar*>()(a, b + nb) && std::less<const Scalar*>()(b, a + na);
}

/// How a layer type names and initialises its factors (PEFT's reset_lora_parameters).
struct FactorSpec {
  const char* a_name;   ///< "lora_A" / "lora_embedding_A"
  const char* b_name;   ///< "lora_B" / "lora_embedding_B"
  const char* a_cols;   ///< what A's columns are, for messages ("d_in", "in_channels x kernel", ...)
  const char* b_rows;   ///< what B's rows are ("d_out", "out_channels", "embedding_dim")
  bool embedding_init;  ///< PEFT's embedding rule: A = 0, B ~ N(0, 1); else A per Init, B = 0
  const char* y_cols;   ///< what the columns of y (and dy) are, for messages
  const char* x_cols;   ///< what the columns of x (and dx) are, for messages
};

/// Fills mask with 0 (probability p) or 1 / (1 - p) from rng (PEFT's nn.Dropout), in storage order.
template <typename MaskMatrix>
void draw_dropout(Rng& rng, double p, MaskMatrix& mask) {
  using Scalar = typename MaskMatrix::Scalar;
  const Scalar keep_scale = static_cast<Scalar>(1.0 / (1.0 - p));
  for (Eigen::Index i = 0; i < mask.size(); ++i) mask.data()[i] = rng.uniform() < p ? Scalar(0) : keep_scale;
}

template <typename Derived, typename Scalar, typename InputRef>
class Adapter {
 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using Index = Eigen::Index;

  Index rank() const { return config_.rank; }
  /// s = alpha / r (or alpha / sqrt(r) with rsLoRA), in the layer's Scalar.
  Scalar scaling() const { return scaling_; }
  const AdapterConfig& config() const { return config_; }

  /// Training mode: dropout (if p > 0 and the layer type has dropout) is applied. Default after
  /// construction, as in PEFT.
  void train(bool on = true) { training_ = on; }
  /// Evaluation mode: no dropout.
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  /// A (r x columns of the lowered map), PEFT lora_A.weight (flattened for convolutions,
  /// lora_embedding_A for embeddings). The mutable view cannot be resized.
  const MatrixType& lora_A() const { return A_; }
  Eigen::Ref<MatrixType> lora_A() { return A_; }
  /// B (rows of the lowered map x r), PEFT lora_B.weight (flattened) / lora_embedding_B. A grouped
  /// convolution's B is out_channels x (r / groups): PEFT's lora_B is a grouped 1x1 convolution.
  const MatrixType& lora_B() const { return B_; }
  Eigen::Ref<MatrixType> lora_B() { return B_; }
  /// Accumulated gradients; zero_grad() clears them.
  const MatrixType& grad_lora_A() const { return grad_A_; }
  Eigen::Ref<MatrixType> grad_lora_A() { return grad_A_; }
  const MatrixType& grad_lora_B() const { return grad_B_; }
  Eigen::Ref<MatrixType> grad_lora_B() { return grad_B_; }

  void set_lora_A(const Eigen::Ref<const MatrixType>& A) {
    DORA_CHECK_ARG(A.rows() == rank() && A.cols() == A_.cols(), spec_.a_name, " must be r x ", spec_.a_cols, " = ",
                   rank(), " x ", A_.cols(), ", got ", A.rows(), " x ", A.cols());
    A_ = A;
  }
  void set_lora_B(const Eigen::Ref<const MatrixType>& B) {
    DORA_CHECK_ARG(B.rows() == B_.rows() && B.cols() == B_.cols(), spec_.b_name, " must be ", spec_.b_rows,
                   groups_ == 1 ? " x r = " : " x (r / groups) = ", B_.rows(), " x ", B_.cols(), ", got ", B.rows(),
                   " x ", B.cols());
    B_ = B;
  }

  /// Reseeds the dropout mask generator: the same seed gives the same masks, and
  /// seed_dropout(config().seed) restarts the stream a new layer starts with. The seed is mixed
  /// with a constant so that masks never replay the draws that initialised A from the same seed.
  void seed_dropout(std::uint64_t seed) { dropout_rng_.seed(seed ^ kDropoutStream); }
  /// The dropout stream's exact state (text), for checkpoints: set_dropout_state() continues the
  /// stream where it was, so a resumed run draws the masks the uninterrupted one would.
  std::string dropout_state() const { return dropout_rng_.state(); }
  void set_dropout_state(const std::string& state) { dropout_rng_.set_state(state); }
  /// Advances the dropout stream past the masks of `rows` input rows, as a forward in training mode
  /// on `rows` rows would (masks are drawn row by row, one draw per input element). Does nothing
  /// when a forward would draw nothing (evaluation mode or p = 0). Data-parallel training
  /// (dora::mpi::DataParallel::dropout_begin/end) uses it so that each rank draws exactly its rows
  /// of the global batch's masks: the run then does not depend on how the batch is split.
  void skip_dropout_rows(Index rows) {
    DORA_CHECK_ARG(rows >= 0, "skip_dropout_rows: rows must be >= 0, got ", rows);
    if (dropout_active()) dropout_rng_.discard(static_cast<std::uint64_t>(rows * derived().input_cols()));
  }

  /// True between a forward and the backward that consumes its saved activations.
  bool has_saved_activations() const { return saved_; }

  /// Views of every trainable tensor and its gradient, in PEFT's order. The vector is built once
  /// and kept, so iterating it in a training loop allocates nothing; it is rebuilt only when the
  /// layer's storage moved (after a copy of the layer).
  std::vector<Parameter<Scalar>>& parameters() {
    const bool stale = params_.empty() || params_[0].value.data() != A_.data() ||
                       params_[0].grad.data() != grad_A_.data() || params_[1].value.data() != B_.data() ||
                       params_[1].grad.data() != grad_B_.data() || !derived().extra_parameters_match(params_);
    if (stale) {
      params_.clear();
      params_.push_back({spec_.a_name, {A_.data(), A_.size()}, {grad_A_.data(), grad_A_.size()}});
      params_.push_back({spec_.b_name, {B_.data(), B_.size()}, {grad_B_.data(), grad_B_.size()}});
      derived().add_extra_parameters(params_);
    }
    return params_;
  }

  /// Clears every accumulated gradient.
  void zero_grad() {
    grad_A_.setZero();
    grad_B_.setZero();
    derived().zero_extra_grad();
  }

  /// Allocating forms of the layer's forward, infer and backward.
  MatrixType forward(const InputRef& x) {
    MatrixType y(x.rows(), derived().output_cols());
    derived().forward(x, y);
    return y;
  }
  MatrixType infer(const InputRef& x) const {
    MatrixType y(x.rows(), derived().output_cols());
    typename Derived::InferWorkspace workspace;
    derived().infer(x, y, workspace);
    return y;
  }

  /// Accumulates the parameter gradients from dy and writes dx (the input gradient). Releases the
  /// saved activations.
  void backward(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType> dx) {
    static_assert(Derived::kHasInputGradient,
                  "dora: this layer's input is not differentiable (use backward_parameters)");
    check_grad_output(dy, &dx);
    derived().backward_impl(dy, &dx);
  }
  MatrixType backward(const Eigen::Ref<const MatrixType>& dy) {
    static_assert(Derived::kHasInputGradient,
                  "dora: this layer's input is not differentiable (use backward_parameters)");
    MatrixType dx(derived().saved_batch(), derived().input_cols());
    backward(dy, dx);
    return dx;
  }
  /// Accumulates the parameter gradients only (the input gradient is not needed, e.g. for a first layer).
  void backward_parameters(const Eigen::Ref<const MatrixType>& dy) {
    check_grad_output(dy, nullptr);
    derived().backward_impl(dy, nullptr);
  }

 protected:
  /// a_cols x b_rows: the lowered map's d_in and d_out. A and B from config.init (PEFT's rule for the
  /// layer type). groups > 1 (grouped convolutions): B is b_rows x (r / groups).
  Adapter(const FactorSpec& spec, Index a_cols, Index b_rows, const AdapterConfig& config, Index groups = 1)
      : spec_(spec), config_(config), groups_(groups) {
    setup(a_cols, b_rows);
    DORA_CHECK_ARG(config_.init != Init::user, "Init::user needs ", spec_.a_name, " and ", spec_.b_name,
                   " passed to the layer's constructor");
    detail::Rng init_rng(config_.seed);
    if (spec_.embedding_init) {
      // PEFT initialises embeddings the other way round (for True and "gaussian" alike): A = 0 and
      // B ~ N(0, 1), as nn.Embedding's default.
      A_ = MatrixType::Zero(config_.rank, a_cols);
      B_.resize(b_rows, config_.rank);
      for (Index i = 0; i < B_.size(); ++i) B_.data()[i] = static_cast<Scalar>(init_rng.normal());
    } else {
      A_ = initial_lora_A<Scalar>(config_.rank, a_cols, config_.init, init_rng);
      B_ = MatrixType::Zero(b_rows, config_.rank / groups_);
    }
  }

  Adapter(const FactorSpec& spec, Index a_cols, Index b_rows, const AdapterConfig& config,
          const Eigen::Ref<const MatrixType>& A, const Eigen::Ref<const MatrixType>& B, Index groups = 1)
      : spec_(spec), config_(config), groups_(groups) {
    config_.init = Init::user;
    setup(a_cols, b_rows);
    A_.resize(config_.rank, a_cols);
    B_.resize(b_rows, config_.rank / groups_);
    set_lora_A(A);
    set_lora_B(B);
  }

  // Copies and moves keep the parameter views only if they still point at this object's storage
  // (checked in parameters()).
  Adapter(const Adapter&) = default;
  Adapter(Adapter&&) noexcept = default;
  Adapter& operator=(const Adapter&) = default;
  Adapter& operator=(Adapter&&) noexcept = default;
  ~Adapter() = default;

  Derived& derived() { return static_cast<Derived&>(*this); }
  const Derived& derived() const { return static_cast<const Derived&>(*this); }

  bool dropout_active() const { return training_ && config_.dropout > 0.0; }

  /// Fills mask with 0 or 1 / (1 - p) from the layer's dropout stream (PEFT's nn.Dropout).
  template <typename MaskMatrix>
  void draw_dropout_mask(MaskMatrix& mask) {
    draw_dropout(dropout_rng_, config_.dropout, mask);
  }

  void check_grad_output(const Eigen::Ref<const MatrixType>& dy, const Eigen::Ref<MatrixType>* dx) const {
    DORA_CHECK_STATE(saved_,
                     "backward needs a forward first (and one forward per backward: the saved "
                     "activations are released by backward)");
    const Index cols = derived().output_cols();
    const Index batch = derived().saved_batch();
    DORA_CHECK_ARG(dy.rows() == batch && dy.cols() == cols, "dy must be N x ", spec_.y_cols, " = ", batch, " x ", cols,
                   " (N from the last forward), got ", dy.rows(), " x ", dy.cols());
    if (dx != nullptr) {
      const Index in = derived().input_cols();
      DORA_CHECK_ARG(dx->rows() == batch && dx->cols() == in, "dx must be N x ", spec_.x_cols, " = ", batch, " x ", in,
                     ", got ", dx->rows(), " x ", dx->cols());
      DORA_CHECK_ARG(!overlaps(dx->data(), dx->size(), dy.data(), dy.size()), "dx must not share memory with dy");
    }
  }

  static constexpr std::uint64_t kDropoutStream = 0x9E3779B97F4A7C15ULL;

  FactorSpec spec_;
  AdapterConfig config_;
  Scalar scaling_ = 0;
  Index groups_ = 1;  // > 1: a grouped convolution's block-diagonal B (conv.hpp)
  bool training_ = true;
  MatrixType A_, B_, grad_A_, grad_B_;
  detail::Rng dropout_rng_;
  bool saved_ = false;  // a forward's activations are held for backward
  Index batch_ = 0;     // rows of the last forward's (lowered) input

 private:
  void setup(Index a_cols, Index b_rows) {
    config_.validate();
    DORA_CHECK_ARG(a_cols >= 1 && b_rows >= 1, "the adapted map must be non-empty, got ", b_rows, " x ", a_cols);
    // PEFT's own refusal (LoraLayer._ConvNd.update_layer), in its words.
    DORA_CHECK_ARG(groups_ >= 1 && config_.rank % groups_ == 0 && b_rows % groups_ == 0,
                   "targeting a convolution with groups=", groups_, " and rank ", config_.rank, " (", b_rows,
                   " output channels): the rank and the output channels must be divisible by groups");
    scaling_ = static_cast<Scalar>(config_.scaling());
    seed_dropout(config_.seed);
    grad_A_ = MatrixType::Zero(config_.rank, a_cols);
    grad_B_ = MatrixType::Zero(b_rows, config_.rank / groups_);
  }

  std::vector<Parameter<Scalar>> params_;
};

}  // namespace detail
}  // namespace dora
