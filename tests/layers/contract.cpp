// The contract every adapter layer type keeps, run for every family x LoRA/DoRA x scalar in
// DORA_CONTRACT_LAYERS below. Adding a layer type means writing its fixture (how to build its base
// and inputs, which layer types it has) and one DORA_CONTRACT_FAMILY line. Checked here:
//   - shapes of y and dx; error messages that name the sizes;
//   - every gradient against central finite differences in double: LoRA, DoRA exact (the true
//     gradient), DoRA detached (the gradient with g = m / n held constant, made here by rescaling m
//     so that only the public API is used), with a fixed dropout mask where the layer has dropout;
//   - merge / unmerge round trip; the evaluation output equals the merged layer's output (or, for a
//     family that cannot be merged, the refusal);
//   - zero_grad, gradient accumulation over two backwards, parameters() aliasing the layer;
//   - no heap allocation in steady state (EIGEN_RUNTIME_NO_MALLOC), parameters() included.
// clang-format off: no_malloc.hpp must come before any header that includes Eigen
#include "no_malloc.hpp"
// clang-format on
#include <catch2/catch.hpp>
#include <cstdio>
#include <functional>
#include <type_traits>
#include <vector>

#include "test_support.hpp"

using namespace dora_test;

namespace {

// What a fixture may leave at its default.
struct FixtureDefaults {
  static constexpr Eigen::Index rank = 3, groups = 1;  // B is b_rows x rank / groups
  static constexpr bool mergeable = true;
};

// A family of layer types: its name, its LoRA and DoRA layers (the LoRA one with B = 0 is the plain
// frozen layer), and For<S>: how to build its frozen base and its inputs.
struct LinearFixture {
  [[maybe_unused]] static constexpr const char* name = "linear";
  template <typename S>
  using Lora = dora::LoraLinear<S>;
  template <typename S>
  using Dora = dora::DoraLinear<S>;
  template <typename S>
  struct For : FixtureDefaults {
    static constexpr bool has_dropout = true, has_input_grad = true;
    static constexpr Eigen::Index excluded_A_column = -1;
    using Input = Mat<S>;
    Mat<S> W = random_matrix<S>(7, 5, 11);
    Vec<S> b = random_vector<S>(7, 12);
    Eigen::Index a_cols() const { return 5; }
    Eigen::Index b_rows() const { return 7; }
    Eigen::Index y_cols() const { return 7; }
    Input input(std::uint64_t seed) const { return random_matrix<S>(4, 5, seed); }
    Input bad_input() const { return random_matrix<S>(4, 6, 1); }
    const char* bad_input_message() const { return "x must have d_in = 5 columns, got 4 x 6"; }
    dora::BaseLayer<S> base_of(const Mat<S>& weight) const { return dora::borrow(weight, b); }
    dora::BaseLayer<S> base() const { return base_of(W); }
    template <typename L>
    static L make(const dora::BaseLayer<S>& base, const dora::AdapterConfig& c, const Mat<S>& A, const Mat<S>& B) {
      return L(base, c, A, B);
    }
  };
};

// A Linear layer whose W is stored as bf16, Q8_0 or Q4_0 (storage.hpp): the same contract. W here is
// the values the stored weight encodes (so every reference computed from W is exact), and the
// merged layer, being dense, is a plain LoraLinear.
template <typename Storage>
struct StoredLinearFixture {
  [[maybe_unused]] static constexpr const char* name = std::is_same<Storage, dora::bfloat16>::value ? "linear (bf16 W)"
                                                       : std::is_same<Storage, dora::BlockQ8_0>::value
                                                           ? "linear (q8_0 W)"
                                                           : "linear (q4_0 W)";
  template <typename S>
  using Lora = dora::LoraLinear<S, Storage>;
  template <typename S>
  using Dora = dora::DoraLinear<S, Storage>;
  template <typename S>
  using Plain = dora::LoraLinear<S>;
  template <typename S>
  struct For : FixtureDefaults {
    static constexpr bool has_dropout = true, has_input_grad = true;
    static constexpr Eigen::Index excluded_A_column = -1, d_out = 7, d_in = 64;  // Q8_0/Q4_0: 2 blocks per row
    using Input = Mat<S>;
    std::vector<Storage> stored = dora::encode_weight<Storage>(random_matrix<double>(d_out, d_in, 11));
    Vec<S> b = random_vector<S>(d_out, 12);
    Mat<S> W = dora::dequantize<S>(base().weight);  // after stored and b, which base() reads
    Eigen::Index a_cols() const { return d_in; }
    Eigen::Index b_rows() const { return d_out; }
    Eigen::Index y_cols() const { return d_out; }
    Input input(std::uint64_t seed) const { return random_matrix<S>(4, d_in, seed); }
    Input bad_input() const { return random_matrix<S>(4, 6, 1); }
    const char* bad_input_message() const { return "x must have d_in = 64 columns, got 4 x 6"; }
    dora::BaseLayer<S> base_of(const Mat<S>& weight) const { return dora::borrow(weight, b); }
    dora::BaseLayer<S, Storage> base() const {
      return dora::borrow<S>(stored.data(), d_out, d_in, b.size() != 0 ? b.data() : nullptr);
    }
  };
};

struct EmbeddingFixture {
  [[maybe_unused]] static constexpr const char* name = "embedding";
  template <typename S>
  using Lora = dora::LoraEmbedding<S>;
  template <typename S>
  using Dora = dora::DoraEmbedding<S>;
  template <typename S>
  struct For : FixtureDefaults {
    static constexpr bool has_dropout = false, has_input_grad = false;
    using Input = dora::TokenIds;
    Mat<S> W = random_matrix<S>(9, 6, 21);
    Eigen::Index a_cols() const { return 9; }
    Eigen::Index b_rows() const { return 6; }
    Eigen::Index y_cols() const { return 6; }
    Input input(std::uint64_t seed) const {
      dora::detail::Rng rng(seed);
      Input ids(7);
      for (Eigen::Index t = 0; t < ids.size(); ++t) ids[t] = static_cast<std::int64_t>(rng.uniform(0.0, 9.0)) % 9;
      ids[1] = ids[4] = 2;  // repeated ids accumulate
      ids[5] = 3;           // padding_idx: read by the forward, no gradient into A's column
      return ids;
    }
    Input bad_input() const {
      Input ids(3);
      ids << 0, 9, 1;
      return ids;
    }
    const char* bad_input_message() const { return "ids[1] = 9 is outside [0, num_embeddings) = [0, 9)"; }
    static constexpr Eigen::Index excluded_A_column = 3;  // padding_idx (see finite_differences)
    dora::EmbeddingBase<S> base_of(const Mat<S>& weight) const { return dora::borrow_embedding(weight, 3); }
    dora::EmbeddingBase<S> base() const { return base_of(W); }
  };
};

// An embedding on a bf16 table: the embedding contract on the values the stored table encodes
// (the norm's products then run over the stored table's transpose).
struct StoredEmbeddingFixture {
  [[maybe_unused]] static constexpr const char* name = "embedding (bf16 table)";
  template <typename S>
  using Lora = dora::LoraEmbedding<S, dora::bfloat16>;
  template <typename S>
  using Dora = dora::DoraEmbedding<S, dora::bfloat16>;
  template <typename S>
  using Plain = dora::LoraEmbedding<S>;
  template <typename S>
  struct For : EmbeddingFixture::For<S> {
    std::vector<dora::bfloat16> stored = dora::encode_weight<dora::bfloat16>(this->W);
    For() { this->W = dora::dequantize<S>(base().weight); }
    dora::EmbeddingBase<S, dora::bfloat16> base() const { return dora::borrow_embedding<S>(stored, 9, 6, 3); }
  };
};

struct ConvFixture {
  [[maybe_unused]] static constexpr const char* name = "conv";
  template <typename S>
  using Lora = dora::LoraConv<S>;
  template <typename S>
  using Dora = dora::DoraConv<S>;
  template <typename S>
  struct For : FixtureDefaults {
    static constexpr bool has_dropout = true, has_input_grad = true;
    static constexpr Eigen::Index excluded_A_column = -1;
    using Input = Mat<S>;
    static dora::ConvGeometry geometry() {
      dora::ConvGeometry g;
      g.dims = 2;
      g.in_channels = 2;
      g.out_channels = 3;
      g.kernel = {3, 2, 1};
      g.stride = {1, 2, 1};
      g.padding = {2, 1, 0};
      g.dilation = {2, 2, 1};  // on both axes: the unfolding's and its adjoint's index arithmetic
      g.input = {6, 5, 1};
      return g;
    }
    dora::ConvGeometry g = geometry();
    Mat<S> W = random_matrix<S>(3, 2 * 3 * 2, 31);
    Vec<S> b = random_vector<S>(3, 32);
    Eigen::Index a_cols() const { return g.patch_size(); }
    Eigen::Index b_rows() const { return 3; }
    Eigen::Index y_cols() const { return 3 * g.output_volume(); }
    Input input(std::uint64_t seed) const { return random_matrix<S>(2, 2 * 6 * 5, seed); }
    Input bad_input() const { return random_matrix<S>(2, 7, 1); }
    const char* bad_input_message() const {
      return "x must be N x (in_channels x input size) = N x 60 (2 x 30), got 2 x 7";
    }
    dora::ConvBase<S> base_of(const Mat<S>& weight) const { return dora::borrow_conv(weight, b, g); }
    dora::ConvBase<S> base() const { return base_of(W); }
  };
};

// A convolution whose W is stored as bf16: the conv contract on the values the stored W encodes.
struct StoredConvFixture {
  [[maybe_unused]] static constexpr const char* name = "conv (bf16 W)";
  template <typename S>
  using Lora = dora::LoraConv<S, dora::bfloat16>;
  template <typename S>
  using Dora = dora::DoraConv<S, dora::bfloat16>;
  template <typename S>
  using Plain = dora::LoraConv<S>;
  template <typename S>
  struct For : ConvFixture::For<S> {
    std::vector<dora::bfloat16> stored = dora::encode_weight<dora::bfloat16>(this->W);
    For() { this->W = dora::dequantize<S>(base().lowered.weight); }
    dora::ConvBase<S, dora::bfloat16> base() const {
      return dora::borrow_conv<S>(stored.data(), this->g, this->b.data());
    }
  };
};

// A grouped convolution (groups 2): W is out x (in/2 k), B out x r/2, PEFT's reshape norm; not
// mergeable (PEFT refuses too).
struct GroupedConvFixture {
  [[maybe_unused]] static constexpr const char* name = "grouped conv";
  template <typename S>
  using Lora = dora::LoraConv<S>;
  template <typename S>
  using Dora = dora::DoraConv<S>;
  template <typename S>
  struct For : FixtureDefaults {
    static constexpr bool has_dropout = true, has_input_grad = true, mergeable = false;
    static constexpr Eigen::Index excluded_A_column = -1, rank = 4, groups = 2;
    using Input = Mat<S>;
    static dora::ConvGeometry geometry() {
      dora::ConvGeometry g;
      g.dims = 1;
      g.in_channels = 4;
      g.out_channels = 6;
      g.groups = 2;
      g.kernel = {3, 1, 1};
      g.stride = {2, 1, 1};
      g.padding = {1, 0, 0};
      g.input = {7, 1, 1};
      return g;
    }
    dora::ConvGeometry g = geometry();
    Mat<S> W = random_matrix<S>(6, 2 * 3, 33);
    Vec<S> b = random_vector<S>(6, 34);
    Eigen::Index a_cols() const { return g.patch_size(); }
    Eigen::Index b_rows() const { return 6; }
    Eigen::Index y_cols() const { return 6 * g.output_volume(); }
    Input input(std::uint64_t seed) const { return random_matrix<S>(2, 4 * 7, seed); }
    Input bad_input() const { return random_matrix<S>(2, 7, 1); }
    const char* bad_input_message() const {
      return "x must be N x (in_channels x input size) = N x 28 (4 x 7), got 2 x 7";
    }
    dora::ConvBase<S> base_of(const Mat<S>& weight) const { return dora::borrow_conv(weight, b, g); }
    dora::ConvBase<S> base() const { return base_of(W); }
  };
};

// The layer that plays the merged weight: the family's LoRA layer, unless it names another (a
// stored W merges into a dense one).
template <typename Family, typename S, typename = void>
struct PlainOf {
  using type = typename Family::template Lora<S>;
};
template <typename Family, typename S>
struct PlainOf<Family, S, std::void_t<typename Family::template Plain<S>>> {
  using type = typename Family::template Plain<S>;
};

// One test type: a family, LoRA or DoRA, a scalar.
template <typename Family, bool IsDora, typename S>
struct Entry {
  using Scalar = S;
  using Fixture = typename Family::template For<S>;
  using Layer = std::conditional_t<IsDora, typename Family::template Dora<S>, typename Family::template Lora<S>>;
  using Plain = typename PlainOf<Family, S>::type;
  static constexpr bool kDora = IsDora;
  static const char* name() {
    static const std::string n = std::string(IsDora ? "dora " : "lora ") + Family::name +
                                 (std::is_same<S, double>::value ? " double" : " float");
    return n.c_str();
  }
};

template <typename E>
struct Case {
  using S = typename E::Scalar;
  using F = typename E::Fixture;
  using Layer = typename E::Layer;
  static constexpr bool kDora = E::kDora;
  F fx;
  dora::AdapterConfig config;
  Mat<S> A, B;

  explicit Case(dora::NormGradient mode = dora::NormGradient::detached, double dropout = 0.0) {
    config.rank = F::rank;
    config.alpha = 5.0;
    config.dropout = dropout;
    config.norm_gradient = mode;
    config.seed = 7;
    A = random_matrix<S>(F::rank, fx.a_cols(), 41, 0.5);
    B = random_matrix<S>(fx.b_rows(), F::rank / F::groups, 42, 0.5);
  }
  Layer make() const {
    Layer layer(fx.base(), config, A, B);
    if constexpr (kDora) {
      // m != n, so that g != 1 everywhere.
      layer.set_magnitude(layer.magnitude().cwiseProduct(
          (Vec<S>::Ones(layer.magnitude().size()) + random_vector<S>(layer.magnitude().size(), 43, 0.2))));
    }
    return layer;
  }
};

constexpr std::uint64_t kMaskSeed = 99;

template <typename Layer, typename Input>
double objective(Layer& layer, const Input& x, const Mat<double>& dy) {
  layer.seed_dropout(kMaskSeed);
  const Mat<double> y = layer.forward(x);
  return (y.array() * dy.array()).sum();
}

// Central differences of f with respect to every entry of p (restored afterwards).
template <typename P>
Mat<double> numerical(P&& p, const std::function<double()>& f) {
  Mat<double> g(p.rows(), p.cols());
  for (Eigen::Index i = 0; i < p.rows(); ++i)
    for (Eigen::Index j = 0; j < p.cols(); ++j) {
      const double old = p(i, j);
      const double h = 1e-6 * std::max(1.0, std::abs(old));
      p(i, j) = old + h;
      const double fp = f();
      p(i, j) = old - h;
      const double fm = f();
      p(i, j) = old;
      g(i, j) = (fp - fm) / (2.0 * h);
    }
  return g;
}

void check_gradient(const char* layer, const char* what, const Mat<double>& analytic, const Mat<double>& fd) {
  const double err = rel_err(analytic, fd);
  std::printf("contract %-28s %-26s FD relative error %.2e\n", layer, what, err);
  INFO(layer << " " << what << ": relative error vs finite differences " << err);
  CHECK(err <= 1e-6);
}

template <typename E>
void finite_differences(dora::NormGradient mode, double dropout, const char* label, bool eval = false) {
  Case<E> c(mode, dropout);
  typename E::Layer layer = c.make();
  if (eval) layer.eval();  // DoRA: a cached norm in forward, P recomputed by the exact backward
  const auto x0 = c.fx.input(51);
  const Mat<double> dy = random_matrix<double>(x0.rows(), c.fx.y_cols(), 52);
  layer.seed_dropout(kMaskSeed);
  layer.forward(x0);
  Mat<double> dx;
  if constexpr (E::Fixture::has_input_grad)
    dx = layer.backward(dy);
  else
    layer.backward_parameters(dy);
  const Mat<double> gA = layer.grad_lora_A(), gB = layer.grad_lora_B();

  // The objective as the mode defines it: exact and LoRA differentiate the output itself;
  // detached holds g = m / n at its current value (m rescaled by n' / n0 for perturbed A, B).
  const bool detached = E::kDora && mode == dora::NormGradient::detached;
  Vec<double> n0, m0;
  if constexpr (E::kDora) {
    n0 = layer.compute_row_norm();
    m0 = layer.magnitude();
  }
  const std::function<double()> f = [&]() {
    if constexpr (E::kDora) {
      if (detached) layer.set_magnitude(m0.cwiseProduct(layer.compute_row_norm()).cwiseQuotient(n0));
      const double v = objective(layer, x0, dy);
      layer.set_magnitude(m0);
      return v;
    } else {
      return objective(layer, x0, dy);
    }
  };
  Mat<double> fdA = numerical(layer.lora_A(), f);
  Mat<double> gA_checked = gA;
  const Eigen::Index pad = E::Fixture::excluded_A_column;
  if (pad >= 0) {
    // torch's padding_idx: the lookup passes no gradient into this column of A although the forward
    // reads it; only the norm's dense term (exact mode) reaches it. Compared apart from the rest.
    if (mode == dora::NormGradient::exact && E::kDora) {
      CHECK(gA.col(pad).cwiseAbs().maxCoeff() > 0.0);
    } else {
      CHECK(gA.col(pad).cwiseAbs().maxCoeff() == 0.0);
    }
    fdA.col(pad).setZero();
    gA_checked.col(pad).setZero();
  }
  check_gradient(label, eval ? "lora_A (eval)" : "lora_A", gA_checked, fdA);
  check_gradient(label, "lora_B", gB, numerical(layer.lora_B(), f));
  if constexpr (E::kDora) {
    const Mat<double> gm = layer.grad_magnitude();
    // n does not depend on m: the same difference in both modes.
    check_gradient(label, "magnitude", gm, numerical(layer.magnitude(), [&]() { return objective(layer, x0, dy); }));
  }
  if constexpr (E::Fixture::has_input_grad) {
    auto x = x0;
    check_gradient(label, "x", dx, numerical(x, [&]() { return objective(layer, x, dy); }));
  }
}

}  // namespace

// A family's four test types (Catch2 takes a type with commas in parentheses).
#define DORA_CONTRACT_FAMILY(F) \
  (Entry<F, false, float>), (Entry<F, false, double>), (Entry<F, true, float>), (Entry<F, true, double>)

// Every family the library has: a new layer type is its fixture above and one line here. This file
// is compiled twice (tests/CMakeLists.txt), each binary taking half of the families, so the two
// halves build in parallel: DORA_CONTRACT_PART 1 or 2 (and all families if it is not set).
#if !defined(DORA_CONTRACT_PART) || DORA_CONTRACT_PART == 1
#define DORA_CONTRACT_LAYERS_1                                                                            \
  DORA_CONTRACT_FAMILY(LinearFixture), DORA_CONTRACT_FAMILY(EmbeddingFixture),                            \
      DORA_CONTRACT_FAMILY(StoredLinearFixture<dora::bfloat16>), DORA_CONTRACT_FAMILY(StoredConvFixture), \
      DORA_CONTRACT_FAMILY(StoredLinearFixture<dora::BlockQ8_0>)
#endif
#if !defined(DORA_CONTRACT_PART) || DORA_CONTRACT_PART == 2
#define DORA_CONTRACT_LAYERS_2                                                 \
  DORA_CONTRACT_FAMILY(ConvFixture), DORA_CONTRACT_FAMILY(GroupedConvFixture), \
      DORA_CONTRACT_FAMILY(StoredLinearFixture<dora::BlockQ4_0>), DORA_CONTRACT_FAMILY(StoredEmbeddingFixture)
#endif
#if !defined(DORA_CONTRACT_PART)
#define DORA_CONTRACT_LAYERS DORA_CONTRACT_LAYERS_1, DORA_CONTRACT_LAYERS_2
#elif DORA_CONTRACT_PART == 1
#define DORA_CONTRACT_LAYERS DORA_CONTRACT_LAYERS_1
#else
#define DORA_CONTRACT_LAYERS DORA_CONTRACT_LAYERS_2
#endif

TEMPLATE_TEST_CASE("Contract: shapes, and errors that name the sizes", "[contract]", DORA_CONTRACT_LAYERS) {
  using E = TestType;
  using L = typename E::Layer;
  using S = typename E::Scalar;
  Case<E> c;
  L layer = c.make();
  const auto x = c.fx.input(1);
  const Mat<S> y = layer.forward(x);
  CHECK(y.rows() == x.rows());
  CHECK(y.cols() == c.fx.y_cols());
  constexpr Eigen::Index r = E::Fixture::rank, q = r / E::Fixture::groups;
  CHECK(layer.lora_A().rows() == r);
  CHECK(layer.lora_A().cols() == c.fx.a_cols());
  CHECK(layer.lora_B().rows() == c.fx.b_rows());
  if constexpr (E::Fixture::has_input_grad) {
    const Mat<S> dx = layer.backward(Mat<S>::Ones(x.rows(), c.fx.y_cols()));
    CHECK(dx.rows() == x.rows());
    CHECK(dx.cols() == x.cols());
  } else {
    layer.backward_parameters(Mat<S>::Ones(x.rows(), c.fx.y_cols()));
  }
  CHECK_THROWS_WITH(layer.forward(c.fx.bad_input()), Catch::Contains(c.fx.bad_input_message()));
  layer.forward(x);
  CHECK_THROWS_WITH(layer.backward_parameters(Mat<S>::Ones(x.rows() + 1, c.fx.y_cols())),
                    Catch::Contains("got " + std::to_string(x.rows() + 1) + " x " + std::to_string(c.fx.y_cols())));
  const std::string rs = std::to_string(r), qs = std::to_string(q);
  CHECK_THROWS_WITH(layer.set_lora_A(Mat<S>::Ones(r, c.fx.a_cols() + 1)),
                    Catch::Contains("= " + rs + " x " + std::to_string(c.fx.a_cols()) + ", got " + rs + " x " +
                                    std::to_string(c.fx.a_cols() + 1)));
  CHECK_THROWS_WITH(layer.set_lora_B(Mat<S>::Ones(c.fx.b_rows() + 1, q)),
                    Catch::Contains("= " + std::to_string(c.fx.b_rows()) + " x " + qs + ", got " +
                                    std::to_string(c.fx.b_rows() + 1) + " x " + qs));
}

TEMPLATE_TEST_CASE("Contract: every gradient agrees with finite differences (double)", "[contract][gradients]",
                   DORA_CONTRACT_LAYERS) {
  using E = TestType;
  if constexpr (std::is_same<typename E::Scalar, double>::value) {
    const double p = E::Fixture::has_dropout ? 0.3 : 0.0;
    if constexpr (E::kDora) {
      for (double dropout : {0.0, p}) {
        finite_differences<E>(dora::NormGradient::exact, dropout, E::name());
        finite_differences<E>(dora::NormGradient::detached, dropout, E::name());
      }
      finite_differences<E>(dora::NormGradient::exact, 0.0, E::name(), /*eval=*/true);
    } else {
      finite_differences<E>(dora::NormGradient::detached, 0.0, E::name());
      finite_differences<E>(dora::NormGradient::detached, p, E::name());
    }
  } else {
    SUCCEED("finite differences run in double");
  }
}

TEMPLATE_TEST_CASE("Contract: merge / unmerge round trip, and eval output equals the merged layer", "[contract]",
                   DORA_CONTRACT_LAYERS) {
  using E = TestType;
  using L = typename E::Layer;
  using S = typename E::Scalar;
  const double tol = std::is_same<S, float>::value ? 2e-5 : 1e-12;
  Case<E> c;
  L layer = c.make();
  if constexpr (!E::Fixture::mergeable) {
    // Refused, saying why, before anything is computed.
    const char* why = "cannot be merged: its adapter (lora_A with groups 1) reaches every input channel";
    if constexpr (E::kDora) {
      CHECK_THROWS_WITH(layer.merge(), Catch::Contains(why));
      CHECK_THROWS_WITH(layer.unmerge(dora::DoraMerge<S>{}), Catch::Contains(why));
    } else {
      CHECK_THROWS_WITH(layer.merged_weight(), Catch::Contains(why));
      CHECK_THROWS_WITH(layer.unmerge(c.fx.W), Catch::Contains(why));
    }
    return;
  }
  Mat<S> merged;
  if constexpr (E::kDora) {
    const dora::DoraMerge<S> m = layer.merge();
    merged = m.weight;
    const double err = rel_err(layer.unmerge(m), c.fx.W);
    std::printf("contract %-28s unmerge(merge) relative error %.2e\n", E::name(), err);
    CHECK(err <= 10 * tol);
  } else {
    merged = layer.merged_weight();
    const double err = rel_err(layer.unmerge(merged), c.fx.W);
    std::printf("contract %-28s unmerge(merge) relative error %.2e\n", E::name(), err);
    CHECK(err <= 10 * tol);
  }
  using Plain = typename E::Plain;
  Plain plain(c.fx.base_of(merged), c.config, c.A, Mat<S>::Zero(c.fx.b_rows(), E::Fixture::rank));
  plain.eval();
  layer.eval();
  const auto x = c.fx.input(3);
  const double err = rel_err(layer.forward(x), plain.forward(x));
  std::printf("contract %-28s eval vs merged layer relative error %.2e\n", E::name(), err);
  CHECK(err <= tol);
}

TEMPLATE_TEST_CASE("Contract: zero_grad, accumulation, and parameters() alias the layer", "[contract]",
                   DORA_CONTRACT_LAYERS) {
  using E = TestType;
  using L = typename E::Layer;
  using S = typename E::Scalar;
  Case<E> c(dora::NormGradient::exact);
  L layer = c.make();
  const auto x = c.fx.input(5);
  const Mat<S> dy = random_matrix<S>(x.rows(), c.fx.y_cols(), 6);
  layer.forward(x);
  layer.backward_parameters(dy);
  const Mat<S> gA = layer.grad_lora_A(), gB = layer.grad_lora_B();
  layer.forward(x);
  layer.backward_parameters(dy);
  const double tol = std::is_same<S, float>::value ? 1e-6 : 1e-14;
  CHECK(rel_err(layer.grad_lora_A(), Mat<S>(2 * gA)) <= tol);
  CHECK(rel_err(layer.grad_lora_B(), Mat<S>(2 * gB)) <= tol);
  std::vector<dora::Parameter<S>>& params = layer.parameters();
  REQUIRE(params.size() == (E::kDora ? 3u : 2u));
  CHECK(params[0].value.data() == layer.lora_A().data());
  CHECK(params[1].grad.data() == layer.grad_lora_B().data());
  CHECK(&layer.parameters() == &params);  // kept, not rebuilt
  layer.zero_grad();
  for (const dora::Parameter<S>& p : params) CHECK(p.grad.cwiseAbs().maxCoeff() == S(0));
  params[0].value.setConstant(S(0.5));
  CHECK(layer.lora_A()(0, 0) == S(0.5));
  // A copy gets views of its own storage.
  L copy = layer;
  std::vector<dora::Parameter<S>>& copied = copy.parameters();
  CHECK(copied[0].value.data() == copy.lora_A().data());
  CHECK(copied[0].value.data() != layer.lora_A().data());
}

TEMPLATE_TEST_CASE(
    "Contract: skip_dropout_rows(h) then a forward of the other rows draws them as one forward of all would",
    "[contract][dropout]", DORA_CONTRACT_LAYERS) {
  // What data-parallel training relies on (dora::mpi::DataParallel::dropout_begin/end): a rank that
  // skips the rows before its share draws exactly its rows of one process's masks.
  using E = TestType;
  using S = typename E::Scalar;
  if constexpr (E::Fixture::has_dropout) {
    Case<E> c(dora::NormGradient::detached, 0.4);
    typename E::Layer whole = c.make(), first = c.make(), second = c.make();
    const Mat<S> x = c.fx.input(6);  // the fixture's batch, split in two shares
    const Eigen::Index h = x.rows() / 2;
    REQUIRE(h >= 1);
    whole.forward(x);
    first.forward(Mat<S>(x.topRows(h)));
    first.skip_dropout_rows(x.rows() - h);
    second.skip_dropout_rows(h);
    second.forward(Mat<S>(x.bottomRows(x.rows() - h)));
    const double err = rel_err(first.dropout_mask(), Mat<S>(whole.dropout_mask().topRows(h))) +
                       rel_err(second.dropout_mask(), Mat<S>(whole.dropout_mask().bottomRows(x.rows() - h)));
    std::printf("contract %-28s dropout shards vs the whole batch: error %.1e\n", E::name(), err);
    CHECK(err == 0.0);
    CHECK(whole.dropout_mask().minCoeff() == S(0));  // the masks do drop something
    CHECK(first.dropout_state() == whole.dropout_state());
    CHECK(second.dropout_state() == whole.dropout_state());
    // Nothing is skipped where a forward would draw nothing: evaluation mode.
    const std::string before = whole.dropout_state();
    whole.eval();
    whole.skip_dropout_rows(5);
    CHECK(whole.dropout_state() == before);
  }
}

TEMPLATE_TEST_CASE("Contract: no heap allocation in steady state", "[contract][no_malloc]", DORA_CONTRACT_LAYERS) {
  using E = TestType;
  using L = typename E::Layer;
  using S = typename E::Scalar;
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
    for (double dropout : {0.0, 0.3}) {
      Case<E> c(mode, dropout);
      L layer = c.make();
      const auto x = c.fx.input(8);
      const Mat<S> dy = random_matrix<S>(x.rows(), c.fx.y_cols(), 9);
      Mat<S> y(x.rows(), c.fx.y_cols());
      Mat<S> dx(x.rows(), E::Fixture::has_input_grad ? x.cols() : 0);
      const auto step = [&]() {
        layer.forward(x, y);
        if constexpr (E::Fixture::has_input_grad)
          layer.backward(dy, dx);
        else
          layer.backward_parameters(dy);
        for (dora::Parameter<S>& p : layer.parameters()) p.value -= S(1e-3) * p.grad;
        layer.zero_grad();
      };
      step();  // sizes the workspaces, and an evaluation forward its norm cache
      layer.eval();
      layer.forward(x, y);
      layer.train();
      Eigen::internal::set_is_malloc_allowed(false);
      try {
        step();
        step();
        layer.eval();
        layer.forward(x, y);  // stale cache: the norm is recomputed, into existing buffers
        layer.forward(x, y);
        layer.train();
        step();
      } catch (...) {
        Eigen::internal::set_is_malloc_allowed(true);
        FAIL("a steady-state step allocated (" << E::name() << ", dropout " << dropout << ")");
      }
      Eigen::internal::set_is_malloc_allowed(true);
      CHECK(y.allFinite());
    }
  }
}

TEMPLATE_TEST_CASE("Contract: infer() equals the evaluation forward, and the evaluation cache follows A, B, m",
                   "[contract]", DORA_CONTRACT_LAYERS) {
  using E = TestType;
  using L = typename E::Layer;
  using S = typename E::Scalar;
  Case<E> c;
  L layer = c.make();
  const auto x = c.fx.input(13);
  if constexpr (E::kDora)
    layer.prepare_inference();
  else
    layer.eval();
  const Mat<S> y_eval = layer.forward(x);
  const double err = rel_err(layer.infer(x), y_eval);
  std::printf("contract %-28s infer vs eval forward relative error %.2e\n", E::name(), err);
  CHECK(err == 0.0);
  // Change B (and m) in evaluation mode: the next forward must be a fresh layer's.
  const Mat<S> B2 = random_matrix<S>(c.fx.b_rows(), E::Fixture::rank / E::Fixture::groups, 77, 0.5);
  layer.set_lora_B(B2);
  Case<E> c2;
  c2.B = B2;
  L fresh = c2.make();
  if constexpr (E::kDora) {
    const Vec<S> m2 = layer.magnitude() * S(1.5);
    layer.set_magnitude(m2);
    fresh.set_magnitude(m2);
  }
  fresh.eval();
  const double err2 = rel_err(layer.forward(x), fresh.forward(x));
  std::printf("contract %-28s eval forward after set_lora_B / set_magnitude vs a fresh layer %.2e\n", E::name(), err2);
  CHECK(err2 == 0.0);
}

TEMPLATE_TEST_CASE("Contract: parameters() follows storage that moved (reset_magnitude, copies)", "[contract]",
                   DORA_CONTRACT_LAYERS) {
  using E = TestType;
  using L = typename E::Layer;
  using S = typename E::Scalar;
  Case<E> c;
  L layer = c.make();
  std::vector<dora::Parameter<S>>& params = layer.parameters();
  if constexpr (E::kDora) {
    layer.reset_magnitude();  // assigns a new vector: its buffer may move
    CHECK(layer.parameters()[2].value.data() == layer.magnitude().data());
    CHECK(layer.parameters()[2].grad.data() == layer.grad_magnitude().data());
  }
  layer.set_lora_A(random_matrix<S>(E::Fixture::rank, c.fx.a_cols(), 3));
  CHECK(params[0].value.data() == layer.lora_A().data());
  CHECK(layer.parameters()[1].value.data() == layer.lora_B().data());
}

#if !defined(DORA_CONTRACT_PART) || DORA_CONTRACT_PART == 1  // (Linear only: in part 1)
// ---- Larger shapes and the guard itself (was test_no_malloc.cpp) ----
// Steady state allocates nothing: after a first forward/backward has sized the workspaces, further
// steps (LoRA, DoRA detached and exact, with and without dropout, evaluation mode with its norm
// cache) run with Eigen's heap allocation forbidden (EIGEN_RUNTIME_NO_MALLOC: any Eigen heap
// allocation aborts with an assertion). One thread: Eigen's multi-threaded product allocates its
// per-thread packing buffers (Eigen's own, not this library's); so does its single-threaded product
// beyond EIGEN_STACK_ALLOCATION_LIMIT (128 KB of packed blocks), hence the moderate sizes here.

namespace {

struct NoMalloc {
  NoMalloc() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoMalloc() { Eigen::internal::set_is_malloc_allowed(true); }
};

template <typename Layer>
void steady_state(Layer& layer, const Mat<float>& x, const Mat<float>& dy, bool with_backward) {
  Mat<float> y(x.rows(), dy.cols()), dx(x.rows(), x.cols());
  // The first step sizes the workspaces (allowed to allocate).
  layer.forward(x, y);
  if (with_backward) layer.backward(dy, dx);
  {
    NoMalloc guard;
    for (int step = 0; step < 3; ++step) {
      layer.forward(x, y);
      if (with_backward) layer.backward(dy, dx);
      layer.forward(x, y);
      if (with_backward) layer.backward_parameters(dy);
    }
  }
  CHECK(y.allFinite());
  // dx is written only by backward: an evaluation-mode run leaves it as allocated (uninitialised).
  if (with_backward) CHECK(dx.allFinite());
}

struct AllocSetup {
  Mat<float> W = random_matrix<float>(48, 40, 1);
  Vec<float> b = random_vector<float>(48, 2);
  Mat<float> x = random_matrix<float>(16, 40, 3);
  Mat<float> dy = random_matrix<float>(16, 48, 4);
  Mat<float> A = random_matrix<float>(4, 40, 5, 0.3);
  Mat<float> B = random_matrix<float>(48, 4, 6, 0.3);
};

dora::AdapterConfig alloc_config(double dropout, dora::NormGradient mode) {
  dora::AdapterConfig c;
  c.rank = 4;
  c.dropout = dropout;
  c.norm_gradient = mode;
  return c;
}

}  // namespace

TEST_CASE("Steady-state forward and backward allocate nothing", "[alloc]") {
  Eigen::setNbThreads(1);
  AllocSetup s;
  for (double p : {0.0, 0.2}) {
    INFO("dropout " << p);
    dora::LoraLinear<float> lora(dora::borrow(s.W, s.b), alloc_config(p, dora::NormGradient::detached), s.A, s.B);
    steady_state(lora, s.x, s.dy, true);
    for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
      dora::DoraLinear<float> layer(dora::borrow(s.W, s.b), alloc_config(p, mode), s.A, s.B);
      steady_state(layer, s.x, s.dy, true);
      layer.eval();
      steady_state(layer, s.x, s.dy, false);
    }
  }
}

TEST_CASE("Multi-adapter layers allocate nothing in steady state", "[multi][alloc]") {
  const Mat<float> W = random_matrix<float>(24, 16, 61), x = random_matrix<float>(6, 16, 62);
  const Mat<float> dy = random_matrix<float>(6, 24, 63);
  dora::MultiLinear<float> layer(dora::borrow(W));
  dora::AdapterConfig c;
  c.rank = 4;
  c.norm_gradient = dora::NormGradient::exact;
  c.init = dora::Init::gaussian;
  layer.add("a", dora::AdapterKind::dora, c).B.setConstant(0.1f);
  c.dropout = 0.2;
  layer.add("b", dora::AdapterKind::lora, c).B.setConstant(0.2f);
  layer.add("c", dora::AdapterKind::dora, c).B.setConstant(-0.1f);
  layer.set_active({"a", "b", "c"});
  Mat<float> y(6, 24), dx(6, 16), ym(6, 24);
  const std::vector<Eigen::Index> of_row{0, -1, 1, 2, 0, 2};
  dora::MultiLinear<float>::MixedWorkspace w;
  for (int warm = 0; warm < 2; ++warm) {
    layer.train();
    layer.forward(x, y);
    layer.backward(dy, dx);
    layer.prepare_inference();
    layer.infer_mixed(x, of_row, ym, w);
  }
  for (int step = 0; step < 3; ++step) {
    NoMalloc guard;
    layer.train();
    layer.forward(x, y);
    layer.backward(dy, dx);
    for (const char* p : {"a", "b", "c"}) layer.adapter(p).A.array() -= 1e-3f * layer.adapter(p).grad_A.array();
    layer.zero_grad();
    layer.prepare_inference();  // new A's: the norms again, into the same buffers
    layer.infer_mixed(x, of_row, ym, w);
    layer.forward(x, y);  // evaluation mode, cached norms
  }
  CHECK(y.allFinite());
  CHECK(ym.allFinite());
}

TEST_CASE("Optimizer steps and clipping allocate nothing in steady state", "[optim][alloc]") {
  AllocSetup s;
  dora::DoraLinear<float> layer(dora::borrow(s.W, s.b), alloc_config(0.1, dora::NormGradient::detached), s.A, s.B);
  dora::AdamWOptions o;
  o.amsgrad = true;
  dora::AdamW<float> adamw(dora::dora_parameter_groups(layer.parameters(), 1e-3, 0.01, 4.0), o);
  dora::SGDOptions so;
  so.momentum = 0.9;
  so.nesterov = true;
  dora::SGD<float> sgd(dora::dora_parameter_groups(layer.parameters(), 1e-3, 0.01), so);
  const dora::WarmupCosine schedule{2, 10, 0.0};
  Mat<float> y(s.x.rows(), s.W.rows()), dx(s.x.rows(), s.W.cols());
  const auto step = [&](long t) {
    layer.forward(s.x, y);
    layer.backward(s.dy, dx);
    dora::clip_grad_norm(adamw.groups(), 1.0);
    adamw.set_lr_factor(schedule(t));
    adamw.step();
    sgd.step();
    adamw.zero_grad();
  };
  step(0);  // sizes the workspaces and the optimizers' state
  {
    NoMalloc guard;
    for (long t = 1; t < 4; ++t) step(t);
  }
  CHECK(layer.lora_A().allFinite());
}

TEST_CASE("The no-malloc guard does catch an allocation", "[alloc]") {
  // Without this, the test above could pass because nothing was checked.
  Mat<float> a = random_matrix<float>(8, 8, 1);
  bool caught = false;
  try {
    NoMalloc guard;
    Mat<float> copy = a * a;  // needs a new matrix
    (void)copy;
  } catch (const std::runtime_error& e) {
    INFO(e.what());
    caught = true;
  }
  CHECK(caught);
}
#endif
