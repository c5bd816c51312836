// Layer behaviour that is not a gradient: initialisation, merge/unmerge, dropout semantics,
// modes, the evaluation-mode norm cache, and the policy for rows with a zero direction.

#include <catch2/catch.hpp>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "test_support.hpp"

using namespace dora_test;

TEST_CASE("Kaiming-uniform initialisation follows PEFT: |A| <= 1/sqrt(d_in), B = 0, m = ||W_i||", "[init]") {
  const Eigen::Index d_out = 64, d_in = 400, r = 16;
  const Mat<double> W = random_matrix<double>(d_out, d_in, 1);
  dora::AdapterConfig c;
  c.rank = r;
  c.seed = 42;
  dora::DoraLinear<double> layer(dora::borrow(W), c);
  const double bound = 1.0 / std::sqrt(static_cast<double>(d_in));
  const Mat<double>& A = layer.lora_A();
  const double mean = A.mean();
  const double var = (A.array() - mean).square().mean();
  INFO("max |A| = " << A.cwiseAbs().maxCoeff() << " bound " << bound << "; var " << var << " expected "
                    << bound * bound / 3);
  CHECK(A.cwiseAbs().maxCoeff() <= bound);
  CHECK(A.cwiseAbs().maxCoeff() > 0.99 * bound);
  CHECK(std::abs(mean) < 0.05 * bound);
  CHECK(std::abs(var / (bound * bound / 3) - 1.0) < 0.05);
  CHECK(layer.lora_B().isZero(0.0));
  const Vec<double> norms = W.rowwise().norm();
  INFO("m vs ||W_i||: " << rel_err(layer.magnitude(), norms));
  CHECK(rel_err(layer.magnitude(), norms) <= 1e-15);
  // Same seed, same A; another seed, another A.
  dora::DoraLinear<double> again(dora::borrow(W), c);
  CHECK(again.lora_A() == layer.lora_A());
  c.seed = 43;
  dora::DoraLinear<double> other(dora::borrow(W), c);
  CHECK(other.lora_A() != layer.lora_A());
}

TEST_CASE("Gaussian initialisation follows PEFT: A ~ N(0, std 1/r)", "[init]") {
  const Mat<float> W = random_matrix<float>(32, 500, 2);
  dora::AdapterConfig c;
  c.rank = 4;
  c.init = dora::Init::gaussian;
  dora::LoraLinear<float> layer(dora::borrow(W), c);
  const Mat<double> A = layer.lora_A().cast<double>();
  const double mean = A.mean();
  const double sd = std::sqrt((A.array() - mean).square().mean());
  INFO("sample std " << sd << " expected " << 1.0 / 4);
  CHECK(std::abs(sd / 0.25 - 1.0) < 0.05);
  CHECK(std::abs(mean) < 0.02);
  CHECK(layer.lora_B().isZero(0.0f));
}

TEST_CASE("A new adapter leaves the layer's output unchanged", "[init]") {
  const Mat<double> W = random_matrix<double>(10, 7, 3);
  const Vec<double> b = random_vector<double>(10, 4);
  const Mat<double> x = random_matrix<double>(5, 7, 5);
  Mat<double> base = x * W.transpose();
  base.rowwise() += b.transpose();
  dora::AdapterConfig c;
  c.rank = 3;
  dora::DoraLinear<double> dora_layer(dora::borrow(W, b), c);
  dora::LoraLinear<double> lora_layer(dora::borrow(W, b), c);
  INFO("DoRA " << rel_err(dora_layer.forward(x), base) << " LoRA " << rel_err(lora_layer.forward(x), base));
  CHECK(rel_err(dora_layer.forward(x), base) <= 1e-15);
  CHECK(rel_err(lora_layer.forward(x), base) <= 1e-15);
}

TEST_CASE("Scaling is alpha/r, or alpha/sqrt(r) with rsLoRA", "[config]") {
  dora::AdapterConfig c;
  c.rank = 16;
  c.alpha = 32;
  CHECK(c.scaling() == 2.0);
  c.use_rslora = true;
  CHECK(c.scaling() == 8.0);
}

template <typename Scalar>
void check_merge(double tol) {
  const Mat<Scalar> W = random_matrix<Scalar>(9, 13, 10);
  const Vec<Scalar> b = random_vector<Scalar>(9, 11);
  const Mat<Scalar> A = random_matrix<Scalar>(3, 13, 12, 0.5);
  const Mat<Scalar> B = random_matrix<Scalar>(9, 3, 13, 0.5);
  const Mat<Scalar> x = random_matrix<Scalar>(6, 13, 14);
  dora::AdapterConfig c;
  c.rank = 3;
  c.alpha = 5;
  dora::DoraLinear<Scalar> layer(dora::borrow(W, b), c, A, B);
  layer.magnitude().array() *= Scalar(1.3);
  layer.eval();
  const Mat<Scalar> y = layer.forward(x);
  const dora::DoraMerge<Scalar> merged = layer.merge();
  Mat<Scalar> y_merged = x * merged.weight.transpose();
  y_merged.rowwise() += b.transpose();
  INFO("DoRA merged forward vs adapter forward: " << rel_err(y_merged, y));
  CHECK(rel_err(y_merged, y) <= tol);
  const Mat<Scalar> W_back = layer.unmerge(merged);
  INFO("DoRA unmerge(merge(W)) vs W: " << rel_err(W_back, W));
  CHECK(rel_err(W_back, W) <= tol);

  dora::LoraLinear<Scalar> lora(dora::borrow(W, b), c, A, B);
  const Mat<Scalar> y_lora = lora.forward(x);
  const Mat<Scalar> Wl = lora.merged_weight();
  Mat<Scalar> y_lora_merged = x * Wl.transpose();
  y_lora_merged.rowwise() += b.transpose();
  INFO("LoRA merged vs adapter: " << rel_err(y_lora_merged, y_lora) << ", unmerge: " << rel_err(lora.unmerge(Wl), W));
  CHECK(rel_err(y_lora_merged, y_lora) <= tol);
  CHECK(rel_err(lora.unmerge(Wl), W) <= tol);
}

TEST_CASE("Merge then a plain matmul equals the adapter's forward and unmerge returns W", "[merge]") {
  check_merge<double>(1e-14);
  check_merge<float>(1e-5);
}

TEST_CASE("Dropout: PEFT semantics, a mask of 0 and 1/(1-p), off in evaluation mode", "[dropout]") {
  const Mat<double> W = random_matrix<double>(20, 30, 20);
  const Mat<double> x = random_matrix<double>(200, 30, 21);
  dora::AdapterConfig c;
  c.rank = 4;
  c.dropout = 0.3;
  const Mat<double> A = random_matrix<double>(4, 30, 22);
  const Mat<double> B = random_matrix<double>(20, 4, 23);
  dora::LoraLinear<double> layer(dora::borrow(W), c, A, B);
  const Mat<double> y_train = layer.forward(x);
  const Mat<double>& mask = layer.dropout_mask();
  const double keep = 1.0 / 0.7;
  const Eigen::Index zeros = (mask.array() == 0.0).count();
  const Eigen::Index kept = (mask.array() == keep).count();
  const double frac = static_cast<double>(zeros) / static_cast<double>(mask.size());
  INFO("dropped fraction " << frac << " (p = 0.3)");
  CHECK(zeros + kept == mask.size());
  CHECK(std::abs(frac - 0.3) < 0.02);
  // LoRA with dropout: y = x W^T + s ((x .* mask) A^T) B^T: the base path sees the full x.
  const Mat<double> expected =
      x * W.transpose() + layer.scaling() * (x.cwiseProduct(mask) * A.transpose()) * B.transpose();
  INFO("train output vs formula: " << rel_err(y_train, expected));
  CHECK(rel_err(y_train, expected) <= 1e-14);
  // Evaluation: no dropout, equal to the p = 0 layer.
  layer.eval();
  c.dropout = 0.0;
  dora::LoraLinear<double> no_dropout(dora::borrow(W), c, A, B);
  CHECK(rel_err(layer.forward(x), no_dropout.forward(x)) == 0.0);
  // Reseeding reproduces the mask.
  layer.train();
  layer.seed_dropout(5);
  layer.forward(x);
  const Mat<double> first = layer.dropout_mask();
  layer.seed_dropout(5);
  layer.forward(x);
  CHECK(first == layer.dropout_mask());
  layer.forward(x);
  CHECK(first != layer.dropout_mask());
}

TEST_CASE("Evaluation mode reuses the row norm only while A, B and m are unchanged", "[eval][cache]") {
  const Mat<double> W = random_matrix<double>(8, 6, 30);
  const Mat<double> x = random_matrix<double>(4, 6, 31);
  dora::AdapterConfig c;
  c.rank = 2;
  dora::DoraLinear<double> layer(dora::borrow(W), c, random_matrix<double>(2, 6, 32), random_matrix<double>(8, 2, 33));
  layer.eval();
  const Mat<double> y0 = layer.forward(x);
  const Mat<double> y0_again = layer.forward(x);
  CHECK(y0 == y0_again);
  const auto fresh = [&] {
    dora::DoraLinear<double> ref(dora::borrow(W), c, layer.lora_A(), layer.lora_B());
    ref.set_magnitude(layer.magnitude());
    ref.eval();
    return ref.forward(x);
  };
  // Every way of changing a parameter through the public API shows in the next forward.
  layer.lora_A()(0, 0) += 0.5;
  Mat<double> y = layer.forward(x);
  INFO("after editing A: " << rel_err(y, fresh()));
  CHECK(rel_err(y, y0) > 1e-6);
  CHECK(rel_err(y, fresh()) <= 1e-15);
  layer.lora_B()(3, 1) -= 0.25;
  y = layer.forward(x);
  CHECK(rel_err(y, fresh()) <= 1e-15);
  layer.magnitude()[2] *= 2.0;
  y = layer.forward(x);
  CHECK(rel_err(y, fresh()) <= 1e-15);
  layer.set_lora_A(random_matrix<double>(2, 6, 34));
  y = layer.forward(x);
  CHECK(rel_err(y, fresh()) <= 1e-15);
  for (dora::Parameter<double>& p : layer.parameters()) p.value.array() += 0.01;
  y = layer.forward(x);
  CHECK(rel_err(y, fresh()) <= 1e-15);
}

TEST_CASE("refresh_base() makes the layer see a W edited in place", "[eval][cache]") {
  Mat<double> W = random_matrix<double>(8, 6, 35);
  const Mat<double> x = random_matrix<double>(4, 6, 36);
  dora::AdapterConfig c;
  c.rank = 2;
  const Mat<double> A = random_matrix<double>(2, 6, 37), B = random_matrix<double>(8, 2, 38);
  for (bool eval_mode : {true, false}) {
    Mat<double> W_edit = W;
    dora::DoraLinear<double> layer(dora::borrow(W_edit), c, A, B);
    if (eval_mode) layer.eval();
    layer.forward(x);
    W_edit.row(0) *= 2.0;
    layer.refresh_base();
    dora::DoraLinear<double> fresh(dora::borrow(W_edit), c, A, B);
    fresh.set_magnitude(layer.magnitude());
    if (eval_mode) fresh.eval();
    const double diff = rel_err(layer.forward(x), fresh.forward(x));
    INFO("eval " << eval_mode << ": after refresh_base vs a fresh layer: " << diff);
    CHECK(diff <= 1e-15);
  }
}

TEST_CASE("A row whose direction is zero is inactive: finite output (the bias), no NaN", "[policy]") {
  Mat<double> W = random_matrix<double>(5, 4, 40);
  const Vec<double> b = random_vector<double>(5, 41);
  W.row(2).setZero();  // a pruned row
  const Mat<double> x = random_matrix<double>(3, 4, 42);
  const Mat<double> dy = random_matrix<double>(3, 5, 43);
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
    dora::AdapterConfig c;
    c.rank = 2;
    c.norm_gradient = mode;
    dora::DoraLinear<double> layer(dora::borrow(W, b), c);  // B = 0: row 2 of V is zero
    const Mat<double> y = layer.forward(x);
    const Mat<double> dx = layer.backward(dy);
    INFO("row norm " << layer.row_norm().transpose());
    CHECK(layer.row_norm()[2] == 0.0);
    CHECK(y.allFinite());
    CHECK(dx.allFinite());
    CHECK(layer.grad_lora_A().allFinite());
    CHECK(layer.grad_lora_B().allFinite());
    CHECK(layer.grad_magnitude().allFinite());
    CHECK(layer.grad_magnitude()[2] == 0.0);
    CHECK((y.col(2).array() == b[2]).all());
    const dora::DoraMerge<double> merged = layer.merge();
    CHECK(merged.weight.allFinite());
    CHECK(merged.weight.row(2).isZero(0.0));
    CHECK(rel_err(layer.unmerge(merged), W) <= 1e-15);
  }
  // NaN in the input is not hidden.
  dora::AdapterConfig c;
  c.rank = 2;
  dora::DoraLinear<double> layer(dora::borrow(W, b), c);
  Mat<double> bad = x;
  bad(1, 1) = std::numeric_limits<double>::quiet_NaN();
  const Mat<double> y = layer.forward(bad);
  CHECK(y.row(1).hasNaN());
  CHECK(y.row(0).allFinite());
}

TEST_CASE("Factored row norm equals the dense one and rows with heavy cancellation are recomputed", "[norm]") {
  const Mat<double> W = random_matrix<double>(40, 30, 50);
  const Mat<double> A = random_matrix<double>(5, 30, 51);
  Mat<double> B = random_matrix<double>(40, 5, 52, 0.1);
  const double s = 0.5;
  Vec<double> dense = dora::row_norm_dense(W, A, B, s);
  INFO("factored vs dense: " << rel_err(dora::row_norm(W, A, B, s), dense));
  CHECK(rel_err(dora::row_norm(W, A, B, s), dense) <= 1e-14);
  // Make row 7 of V tiny: W_7 = -s B_7 A + 1e-9 * e_0 cannot be built from a fixed W, so choose B_7
  // to cancel the component of W_7 in the row space of A instead, and compare row by row.
  const Mat<double> A2 = W.topRows(5);  // A spans W's first 5 rows
  Mat<double> B2 = Mat<double>::Zero(40, 5);
  B2(3, 3) = -1.0 / s + 1e-7;  // V_3 = 1e-7 * s * W_3: ||V_3|| / ||W_3|| = 5e-8
  const Vec<double> f = dora::row_norm(W, A2, B2, s);
  const Vec<double> d = dora::row_norm_dense(W, A2, B2, s);
  const double expected = 1e-7 * s * W.row(3).norm();
  INFO("cancelling row: factored " << f[3] << " dense " << d[3] << " exact " << expected);
  CHECK(std::abs(f[3] - expected) <= 1e-8 * expected);
  CHECK(rel_err(f, d) <= 1e-14);
}

// The dropout mask stream, pinned. The expected masks come from an MT19937-64 and a mask rule
// written out here from their documented definitions, not from dora::detail::Rng:
//  - MT19937-64 (Matsumoto and Nishimura; the parameters of std::mt19937_64 in [rand.predef]);
//  - uniform in [0, 1) = (top 53 bits of a 64-bit draw) * 2^-53 (detail/random.hpp);
//  - a layer made with config.seed = s draws its masks from the generator seeded with
//    s ^ 0x9E3779B97F4A7C15 (its initialisation of A uses the generator seeded with s);
//    seed_dropout(k) reseeds it with k as given;
//  - mask entry = 0 if u < p else 1 / (1 - p), one draw per entry in row-major order (row by row),
//    continuing across forwards; evaluation-mode forwards draw nothing.
namespace {

class ReferenceMt64 {
 public:
  explicit ReferenceMt64(std::uint64_t seed) {
    state_[0] = seed;
    for (int i = 1; i < kN; ++i)
      state_[i] = 6364136223846793005ULL * (state_[i - 1] ^ (state_[i - 1] >> 62)) + static_cast<std::uint64_t>(i);
  }
  std::uint64_t next() {
    if (index_ == kN) twist();
    std::uint64_t y = state_[index_++];
    y ^= (y >> 29) & 0x5555555555555555ULL;
    y ^= (y << 17) & 0x71D67FFFEDA60000ULL;
    y ^= (y << 37) & 0xFFF7EEE000000000ULL;
    y ^= y >> 43;
    return y;
  }
  double uniform() { return static_cast<double>(next() >> 11) / 9007199254740992.0; }  // 2^53

 private:
  void twist() {
    for (int i = 0; i < kN; ++i) {
      const std::uint64_t x = (state_[i] & kUpper) | (state_[(i + 1) % kN] & kLower);
      std::uint64_t xa = x >> 1;
      if ((x & 1U) != 0) xa ^= 0xB5026F5AA96619E9ULL;
      state_[i] = state_[(i + kM) % kN] ^ xa;
    }
    index_ = 0;
  }
  static constexpr int kN = 312, kM = 156;
  static constexpr std::uint64_t kUpper = 0xFFFFFFFF80000000ULL, kLower = 0x7FFFFFFFULL;
  std::uint64_t state_[kN] = {};
  int index_ = kN;
};

constexpr std::uint64_t kDropoutStream = 0x9E3779B97F4A7C15ULL;

template <typename S>
Mat<S> reference_mask(ReferenceMt64& gen, Eigen::Index rows, Eigen::Index cols, double p) {
  Mat<S> mask(rows, cols);
  const S keep = static_cast<S>(1.0 / (1.0 - p));
  for (Eigen::Index i = 0; i < rows; ++i)
    for (Eigen::Index j = 0; j < cols; ++j) mask(i, j) = gen.uniform() < p ? S(0) : keep;
  return mask;
}

template <typename S>
Eigen::Index mismatches(const Mat<S>& a, const Mat<S>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return std::max<Eigen::Index>(a.size(), b.size());
  return (a.array() != b.array()).count();
}

struct MaskCase {
  std::uint64_t seed;
  Eigen::Index d_out, d_in, rank, batch;
  double p;
};
const MaskCase kMaskCases[] = {{0, 4, 5, 2, 3, 0.3}, {42, 6, 9, 3, 7, 0.5}, {0xFFFFFFFFFFFFFFFFULL, 3, 17, 1, 4, 0.1}};

template <typename S, typename Layer>
void check_mask_stream(Layer& layer, const MaskCase& mc) {
  const Mat<S> x1 = random_matrix<S>(mc.batch, mc.d_in, 60);
  const Mat<S> x2 = random_matrix<S>(mc.batch + 2, mc.d_in, 61);
  ReferenceMt64 gen(mc.seed ^ kDropoutStream);
  layer.forward(x1);
  Mat<S> expected = reference_mask<S>(gen, mc.batch, mc.d_in, mc.p);
  INFO("first mask: " << mismatches(layer.dropout_mask(), expected) << " entries differ from the reference");
  CHECK(mismatches(layer.dropout_mask(), expected) == 0);
  // An evaluation forward draws nothing; the next training forward continues the stream.
  layer.eval();
  layer.forward(x2);
  layer.train();
  layer.forward(x2);
  expected = reference_mask<S>(gen, mc.batch + 2, mc.d_in, mc.p);
  INFO("second mask (after an evaluation forward): " << mismatches(layer.dropout_mask(), expected) << " differ");
  CHECK(mismatches(layer.dropout_mask(), expected) == 0);
  // seed_dropout(k) restarts the generator at k (mixed with the stream constant), reproducibly;
  // seed_dropout(config seed) is the stream a new layer starts with, not A's initialisation stream.
  for (std::uint64_t k : {std::uint64_t{7}, mc.seed + 1, mc.seed}) {
    ReferenceMt64 reseeded(k ^ kDropoutStream);
    const Mat<S> after_seed = reference_mask<S>(reseeded, mc.batch, mc.d_in, mc.p);
    layer.seed_dropout(k);
    layer.forward(x1);
    INFO("seed_dropout(" << k << "): " << mismatches(layer.dropout_mask(), after_seed) << " differ");
    CHECK(mismatches(layer.dropout_mask(), after_seed) == 0);
    layer.forward(x1);
    CHECK(mismatches(layer.dropout_mask(), after_seed) > 0);  // the stream moved on
    layer.seed_dropout(k);
    layer.forward(x1);
    CHECK(mismatches(layer.dropout_mask(), after_seed) == 0);
  }
}

}  // namespace

TEST_CASE("The reference MT19937-64 of the mask test is the standard's", "[dropout][rng]") {
  // [rand.predef]: the 10000th consecutive invocation of a default-constructed mt19937_64
  // (seed 5489) produces 9981545732273789042.
  ReferenceMt64 gen(5489);
  for (int i = 1; i < 10000; ++i) gen.next();
  CHECK(gen.next() == 9981545732273789042ULL);
  // The library's generator is the same engine with the same conversion to [0, 1).
  dora::detail::Rng rng(5489);
  ReferenceMt64 again(5489);
  for (int i = 0; i < 1000; ++i) REQUIRE(rng.uniform() == again.uniform());
}

TEMPLATE_TEST_CASE("Dropout masks for a seed are pinned: MT19937-64 at seed ^ 0x9E3779B97F4A7C15, 0 if u < p",
                   "[dropout][rng]", float, double) {
  using S = TestType;
  for (const MaskCase& mc : kMaskCases) {
    INFO("seed " << mc.seed << " d_out " << mc.d_out << " d_in " << mc.d_in << " N " << mc.batch << " p " << mc.p);
    const Mat<S> W = random_matrix<S>(mc.d_out, mc.d_in, 62);
    dora::AdapterConfig c;
    c.rank = mc.rank;
    c.dropout = mc.p;
    c.seed = mc.seed;
    dora::LoraLinear<S> lora(dora::borrow(W), c);
    check_mask_stream<S>(lora, mc);
    dora::DoraLinear<S> dora_layer(dora::borrow(W), c);
    check_mask_stream<S>(dora_layer, mc);
  }
}

TEMPLATE_TEST_CASE("The dropout stream is not the stream that initialised A", "[dropout][rng]", float, double) {
  using S = TestType;
  for (const MaskCase& mc : kMaskCases) {
    INFO("seed " << mc.seed << " d_in " << mc.d_in << " r " << mc.rank << " p " << mc.p);
    const Mat<S> W = random_matrix<S>(mc.d_out, mc.d_in, 63);
    dora::AdapterConfig c;
    c.rank = mc.rank;
    c.dropout = mc.p;
    c.seed = mc.seed;
    dora::DoraLinear<S> layer(dora::borrow(W), c);
    // A is drawn from the generator seeded with config.seed: A_k = -b + 2b u_k, b = 1/sqrt(d_in).
    ReferenceMt64 init_stream(mc.seed);
    const double bound = 1.0 / std::sqrt(static_cast<double>(mc.d_in));
    Mat<S> expected_A(mc.rank, mc.d_in);
    std::vector<double> u(static_cast<std::size_t>(expected_A.size()));
    for (Eigen::Index k = 0; k < expected_A.size(); ++k) {
      u[static_cast<std::size_t>(k)] = init_stream.uniform();
      expected_A.data()[k] = static_cast<S>(-bound + (bound - -bound) * u[static_cast<std::size_t>(k)]);
    }
    // (Not bitwise: a build may contract lo + (hi - lo) u into an FMA in one place and not the other.)
    const double A_err = rel_err(layer.lora_A(), expected_A);
    INFO("A vs the reference init stream: " << A_err);
    CHECK(A_err <= (std::is_same<S, float>::value ? 1e-6 : 1e-15));
    // The masks of a long enough batch are not A's draws thresholded at p, in either order.
    const Eigen::Index batch = (expected_A.size() + mc.d_in - 1) / mc.d_in;
    layer.forward(random_matrix<S>(batch, mc.d_in, 64));
    const Mat<S>& mask = layer.dropout_mask();
    Eigen::Index agree = 0;
    for (Eigen::Index k = 0; k < expected_A.size(); ++k)
      agree += (mask.data()[k] == S(0)) == (u[static_cast<std::size_t>(k)] < mc.p) ? 1 : 0;
    INFO(agree << " of " << expected_A.size() << " mask entries agree with A's draws thresholded at p");
    CHECK(agree < expected_A.size());
    ReferenceMt64 replay(mc.seed);
    CHECK(mismatches(mask, reference_mask<S>(replay, batch, mc.d_in, mc.p)) > 0);
  }
}

namespace {

template <typename S>
void check_row_norm_argument(const char* what, const Vec<S>& got, const Vec<S>& dense, const Vec<S>& from_matrix) {
  const double tol = std::is_same<S, float>::value ? 1e-5 : 1e-14;
  INFO(what << ": vs row_norm_dense " << rel_err(got, dense) << ", vs the Matrix call " << rel_err(got, from_matrix));
  CHECK(rel_err(got, dense) <= tol);
  CHECK(rel_err(got, from_matrix) <= tol);
}

}  // namespace

TEMPLATE_TEST_CASE("row_norm and row_norm_dense take any Eigen dense W, A, B", "[norm]", float, double) {
  using S = TestType;
  using ColMajor = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  const Eigen::Index d_out = 7, d_in = 9, r = 3;
  const Mat<S> W = random_matrix<S>(d_out, d_in, 70);
  const Mat<S> A = random_matrix<S>(r, d_in, 71);
  const Mat<S> B = random_matrix<S>(d_out, r, 72, 0.3);
  const S s = S(0.75);
  const Vec<S> dense = dora::row_norm_dense(W, A, B, s);
  const Vec<S> from_matrix = dora::row_norm(W, A, B, s);
  check_row_norm_argument<S>("Matrix", from_matrix, dense, from_matrix);

  // A row-major Map over a raw buffer, contiguous and with padded rows.
  std::vector<S> buffer(static_cast<std::size_t>(W.size()));
  Eigen::Map<Mat<S>>(buffer.data(), d_out, d_in) = W;
  const Eigen::Map<const Mat<S>> W_map(buffer.data(), d_out, d_in);
  check_row_norm_argument<S>("row-major Map", dora::row_norm(W_map, A, B, s), dense, from_matrix);
  check_row_norm_argument<S>("row-major Map (dense)", dora::row_norm_dense(W_map, A, B, s), dense, from_matrix);
  const Eigen::Index stride = d_in + 3;
  std::vector<S> padded(static_cast<std::size_t>(d_out * stride), std::numeric_limits<S>::quiet_NaN());
  using StridedMap = Eigen::Map<const Mat<S>, Eigen::Unaligned, Eigen::OuterStride<>>;
  for (Eigen::Index i = 0; i < d_out; ++i)
    for (Eigen::Index j = 0; j < d_in; ++j) padded[static_cast<std::size_t>(i * stride + j)] = W(i, j);
  const StridedMap W_strided(padded.data(), d_out, d_in, Eigen::OuterStride<>(stride));
  check_row_norm_argument<S>("Map with padded rows", dora::row_norm(W_strided, A, B, s), dense, from_matrix);
  // The layer's own view of a borrowed W.
  check_row_norm_argument<S>("BaseLayer::weight", dora::row_norm(dora::borrow(W).weight, A, B, s), dense, from_matrix);

  // Eigen::Ref, of W and of A and B.
  const Eigen::Ref<const Mat<S>> W_ref(W), A_ref(A), B_ref(B);
  check_row_norm_argument<S>("Ref", dora::row_norm(W_ref, A_ref, B_ref, s), dense, from_matrix);

  // Blocks of larger matrices (W's rows are not contiguous in the big one's storage).
  Mat<S> big = random_matrix<S>(d_out + 4, d_in + 5, 73);
  big.block(2, 3, d_out, d_in) = W;
  ColMajor big_A = random_matrix<S>(r + 2, d_in + 1, 74);
  big_A.block(1, 1, r, d_in) = A;
  check_row_norm_argument<S>("blocks", dora::row_norm(big.block(2, 3, d_out, d_in), big_A.block(1, 1, r, d_in), B, s),
                             dense, from_matrix);
  check_row_norm_argument<S>("blocks (dense)",
                             dora::row_norm_dense(big.block(2, 3, d_out, d_in), big_A.block(1, 1, r, d_in), B, s),
                             dense, from_matrix);

  // Column-major storage, its transpose, and expressions.
  const ColMajor W_col = W, A_col = A, B_col = B;
  check_row_norm_argument<S>("column-major", dora::row_norm(W_col, A_col, B_col, s), dense, from_matrix);
  check_row_norm_argument<S>("column-major (dense)", dora::row_norm_dense(W_col, A_col, B_col, s), dense, from_matrix);
  const ColMajor Wt_col = W.transpose();  // d_in x d_out: its transpose is a row-major view of W
  check_row_norm_argument<S>("transpose of column-major", dora::row_norm(Wt_col.transpose(), A, B, s), dense,
                             from_matrix);
  const Mat<S> W_half = W / S(2);
  check_row_norm_argument<S>("expressions", dora::row_norm(W_half + W_half, A * S(1), B.array().matrix(), s), dense,
                             from_matrix);

  // Row-major views with contiguous rows are read in place; anything else is evaluated once.
  CHECK(dora::detail::RowMajorRef<S>(W).data() == W.data());
  CHECK(dora::detail::RowMajorRef<S>(W_map).data() == buffer.data());
  CHECK(dora::detail::RowMajorRef<S>(W_strided).data() == padded.data());
  CHECK(dora::detail::RowMajorRef<S>(W_ref).data() == W.data());
  CHECK(dora::detail::RowMajorRef<S>(big.block(2, 3, d_out, d_in)).data() == &big(2, 3));
  CHECK(dora::detail::RowMajorRef<S>(Wt_col.transpose()).data() == Wt_col.data());
  const dora::detail::RowMajorRef<S> W_copy(W_col);
  CHECK(W_copy.data() != W_col.data());
  CHECK(W_copy == W);
}
