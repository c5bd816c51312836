// Numerical and shape edge cases (README, "Numerical policies" and "Edge cases").

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "dense_dora.hpp"
#include "test_support.hpp"

using namespace dora_test;

TEMPLATE_TEST_CASE("Zero rows of W: inactive without an adapter row, normal with one", "[edge]", float, double) {
  using S = TestType;
  Mat<S> W = random_matrix<S>(6, 5, 1);
  W.row(1).setZero();
  W.row(4).setZero();
  Mat<S> B = random_matrix<S>(6, 2, 2, 0.5);
  B.row(1).setZero();                          // row 1: W_1 = 0 and B_1 = 0, so V_1 = 0: inactive
  const Mat<S> A = random_matrix<S>(2, 5, 3);  // row 4: W_4 = 0 but V_4 = s B_4 A != 0: active
  const Vec<S> b = random_vector<S>(6, 4);
  const Mat<S> x = random_matrix<S>(3, 5, 5);
  dora::AdapterConfig c;
  c.rank = 2;
  c.norm_gradient = dora::NormGradient::exact;
  dora::DoraLinear<S> layer(dora::borrow(W, b), c, A, B);
  const Mat<S> y = layer.forward(x);
  const Mat<S> dx = layer.backward(random_matrix<S>(3, 6, 6));
  INFO("row norms " << layer.row_norm().transpose());
  CHECK(layer.row_norm()[1] == S(0));
  CHECK(layer.row_norm()[4] > S(0));
  CHECK(y.allFinite());
  CHECK(dx.allFinite());
  CHECK(layer.grad_lora_A().allFinite());
  CHECK(layer.grad_lora_B().allFinite());
  CHECK((y.col(1).array() == b[1]).all());
  // The active row equals the dense computation; m_4 = n_4, so g_4 = 1 and y_4 = x V_4^T + b_4.
  const Mat<S> V = W + static_cast<S>(layer.scaling()) * B * A;
  const Mat<S> y4 = (x * V.row(4).transpose()).array() + b[4];
  INFO("active zero-W row vs dense: " << rel_err(y.col(4), y4));
  CHECK(rel_err(y.col(4), y4) <= (std::is_same<S, float>::value ? 1e-5 : 1e-14));
}

TEMPLATE_TEST_CASE("Very large and very small weights: no overflow or underflow in the norm", "[edge]", float, double) {
  using S = TestType;
  // Squares of these overflow (or underflow to zero) while the norms are representable.
  const S big = std::is_same<S, float>::value ? S(1e25) : S(1e200);
  const S tiny = std::is_same<S, float>::value ? S(1e-25) : S(1e-200);
  for (S scale : {big, tiny}) {
    const Mat<S> W0 = random_matrix<S>(5, 7, 10);
    const Mat<S> A = random_matrix<S>(2, 7, 11);
    const Mat<S> B0 = random_matrix<S>(5, 2, 12, 0.3);
    const Mat<S> W = W0 * scale;
    const Mat<S> B = B0 * scale;  // V = scale * V0
    dora::AdapterConfig c;
    c.rank = 2;
    c.alpha = 2;
    dora::DoraLinear<S> layer(dora::borrow(W), c, A, B);
    const Vec<S> expected = dora::row_norm_dense(W0, A, B0, S(1)) * scale;  // computed at scale 1
    INFO("scale " << scale << ": row norm " << layer.row_norm().transpose() << " expected " << expected.transpose()
                  << "; rows recomputed " << layer.rows_recomputed());
    layer.forward(random_matrix<S>(2, 7, 13));
    CHECK(layer.row_norm().allFinite());
    CHECK(rel_err(layer.row_norm(), expected) <= (std::is_same<S, float>::value ? 1e-5 : 1e-13));
    CHECK(rel_err(layer.magnitude(), expected) <= (std::is_same<S, float>::value ? 1e-5 : 1e-13));
    CHECK(layer.rows_recomputed() == 5);
  }
}

TEST_CASE("Rank larger than min(d_in, d_out) works and matches the dense computation", "[edge]") {
  const Mat<double> W = random_matrix<double>(4, 3, 20);
  const Mat<double> A = random_matrix<double>(8, 3, 21);
  const Mat<double> B = random_matrix<double>(4, 8, 22, 0.2);
  const Mat<double> x = random_matrix<double>(5, 3, 23);
  const Mat<double> dy = random_matrix<double>(5, 4, 24);
  dora::AdapterConfig c;
  c.rank = 8;
  dora::DoraLinear<double> layer(dora::borrow(W), c, A, B);
  DenseDora<double> dense(dora::borrow(W), A, B, layer.scaling());
  Mat<double> y1(5, 4), y2(5, 4), dx1(5, 3), dx2(5, 3);
  layer.forward(x, y1);
  dense.forward(x, y2);
  layer.backward(dy, dx1);
  dense.backward(dy, dx2);
  INFO("y " << rel_err(y1, y2) << " dx " << rel_err(dx1, dx2) << " dA "
            << rel_err(layer.grad_lora_A(), dense.grad_lora_A()));
  CHECK(rel_err(y1, y2) <= 1e-14);
  CHECK(rel_err(dx1, dx2) <= 1e-14);
  CHECK(rel_err(layer.grad_lora_A(), dense.grad_lora_A()) <= 1e-14);
  CHECK(rel_err(layer.grad_lora_B(), dense.grad_lora_B()) <= 1e-14);
}

TEST_CASE("A batch of one row and a batch of zero rows", "[edge]") {
  const Mat<double> W = random_matrix<double>(6, 4, 30);
  const Vec<double> b = random_vector<double>(6, 31);
  dora::AdapterConfig c;
  c.rank = 2;
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
    c.norm_gradient = mode;
    dora::DoraLinear<double> layer(dora::borrow(W, b), c, random_matrix<double>(2, 4, 32),
                                   random_matrix<double>(6, 2, 33));
    dora::LoraLinear<double> lora(dora::borrow(W, b), c, random_matrix<double>(2, 4, 32),
                                  random_matrix<double>(6, 2, 33));
    // One row: the same as that row inside a bigger batch.
    const Mat<double> x = random_matrix<double>(3, 4, 34);
    const Mat<double> y_all = layer.forward(x);
    const Mat<double> y_one = layer.forward(x.topRows(1));
    CHECK(rel_err(y_one, y_all.topRows(1)) <= 1e-15);
    CHECK(layer.backward(random_matrix<double>(1, 6, 35)).allFinite());
    // Zero rows: empty outputs, no gradient, no crash.
    const Mat<double> empty(0, 4);
    layer.zero_grad();
    const Mat<double> y0 = layer.forward(empty);
    CHECK(y0.rows() == 0);
    CHECK(y0.cols() == 6);
    const Mat<double> dx0 = layer.backward(Mat<double>(0, 6));
    CHECK(dx0.rows() == 0);
    CHECK(layer.grad_lora_A().isZero(0.0));
    CHECK(layer.grad_magnitude().isZero(0.0));
    CHECK(lora.forward(empty).rows() == 0);
    CHECK(lora.backward(Mat<double>(0, 6)).rows() == 0);
  }
}

TEST_CASE("NaN and inf in the input propagate to the rows they touch and nothing is hidden", "[edge]") {
  const Mat<double> W = random_matrix<double>(5, 4, 40);
  dora::AdapterConfig c;
  c.rank = 2;
  dora::DoraLinear<double> layer(dora::borrow(W), c, random_matrix<double>(2, 4, 41), random_matrix<double>(5, 2, 42));
  Mat<double> x = random_matrix<double>(3, 4, 43);
  x(0, 2) = std::numeric_limits<double>::quiet_NaN();
  x(2, 1) = std::numeric_limits<double>::infinity();
  const Mat<double> y = layer.forward(x);
  CHECK(y.row(0).hasNaN());
  CHECK_FALSE(y.row(2).allFinite());
  CHECK(y.row(1).allFinite());
  // A NaN parameter is not turned into an inactive row either.
  layer.magnitude()[3] = std::numeric_limits<double>::quiet_NaN();
  const Mat<double> y2 = layer.forward(random_matrix<double>(2, 4, 44));
  CHECK(y2.col(3).hasNaN());
  CHECK(y2.col(2).allFinite());
}

namespace {

// magnitude_scale(m, n) must be exactly m / n (NaN where m / n is NaN) and the row active.
template <typename S>
void check_not_hidden(S m, S n) {
  const S scale = dora::magnitude_scale(m, n);
  const S quotient = m / n;
  INFO("m " << m << " n " << n << ": scale " << scale << ", m / n " << quotient);
  CHECK_FALSE(dora::inactive_row(m, n));
  if (std::isnan(quotient))
    CHECK(std::isnan(scale));
  else
    CHECK(scale == quotient);
}

}  // namespace

TEMPLATE_TEST_CASE("The inactive-row rule: n = 0 or an overflowing m / n gives scale 0, NaN and inf propagate",
                   "[edge][magnitude]", float, double) {
  using S = TestType;
  using limits = std::numeric_limits<S>;
  const S inf = limits::infinity(), nan = limits::quiet_NaN(), big = limits::max();
  // n = 0 with finite m (of any sign, zero included): inactive, scale 0 (not inf or NaN).
  for (S m : {S(0), S(1), S(-2.5), big, -big, limits::denorm_min()})
    for (S n : {S(0), S(-0.0)}) {
      INFO("m " << m << " n " << n);
      CHECK(dora::inactive_row(m, n));
      CHECK(dora::magnitude_scale(m, n) == S(0));
    }
  // Finite m and n > 0 whose quotient overflows: inactive, scale 0.
  const S tiny_normal = limits::min();  // smallest normal
  const S subnormal = limits::min() / S(1024);
  REQUIRE(std::fpclassify(subnormal) == FP_SUBNORMAL);
  for (auto mn : {std::pair<S, S>{big, S(0.5)}, std::pair<S, S>{-big, S(0.25)}, std::pair<S, S>{S(4), tiny_normal},
                  std::pair<S, S>{S(1), subnormal}, std::pair<S, S>{S(-1), limits::denorm_min()}}) {
    INFO("m " << mn.first << " n " << mn.second << ": m / n = " << mn.first / mn.second);
    REQUIRE_FALSE(std::isfinite(mn.first / mn.second));
    CHECK(dora::inactive_row(mn.first, mn.second));
    CHECK(dora::magnitude_scale(mn.first, mn.second) == S(0));
  }
  // A subnormal or tiny n with a moderate m whose quotient is finite: an ordinary row, scale m / n.
  const S moderate = std::is_same<S, float>::value ? S(1e-5) : S(1e-10);
  for (auto mn : {std::pair<S, S>{moderate, subnormal}, std::pair<S, S>{S(0), subnormal},
                  std::pair<S, S>{S(1), tiny_normal}, std::pair<S, S>{S(-0.5), S(3)}}) {
    INFO("m " << mn.first << " n " << mn.second);
    REQUIRE(std::isfinite(mn.first / mn.second));
    CHECK_FALSE(dora::inactive_row(mn.first, mn.second));
    CHECK(dora::magnitude_scale(mn.first, mn.second) == mn.first / mn.second);
  }
  CHECK(dora::magnitude_scale(moderate, subnormal) > S(1e30));
  // NaN or inf in m or n is never turned into an inactive row: it propagates.
  for (auto mn : {std::pair<S, S>{nan, S(1)}, std::pair<S, S>{S(1), nan}, std::pair<S, S>{nan, S(0)},
                  std::pair<S, S>{S(0), nan}, std::pair<S, S>{nan, nan}, std::pair<S, S>{inf, S(1)},
                  std::pair<S, S>{-inf, S(2)}, std::pair<S, S>{inf, S(0)}, std::pair<S, S>{inf, subnormal},
                  std::pair<S, S>{S(1), inf}, std::pair<S, S>{inf, inf}, std::pair<S, S>{big, inf}})
    check_not_hidden(mn.first, mn.second);
}

TEMPLATE_TEST_CASE("A row whose m / n overflows is inactive in the layer: the bias, a zero merged row, no gradient",
                   "[edge][magnitude]", float, double) {
  using S = TestType;
  const bool is_float = std::is_same<S, float>::value;
  // Rows 1 and 3 of V are tiny; m_1 / n_1 overflows; m_3 / n_3 is large but finite. (Not so
  // large that the exact gradient's beta_3 = -g_3 dm_3 / n_3 overflows: see the hidden test below.)
  const S tiny = is_float ? S(1e-15) : S(1e-100);
  const S huge_m = is_float ? S(1e30) : S(1e300);
  const S moderate_m = is_float ? S(1e-6) : S(1e-10);
  const Eigen::Index d_out = 5, d_in = 4, r = 2, N = 3;
  Mat<S> W = random_matrix<S>(d_out, d_in, 50);
  W.row(1) *= tiny;
  W.row(3) *= tiny;
  Mat<S> B = random_matrix<S>(d_out, r, 51, 0.5);
  B.row(1).setZero();
  B.row(3).setZero();
  const Mat<S> A = random_matrix<S>(r, d_in, 52);
  const Vec<S> b = random_vector<S>(d_out, 53);
  const Mat<S> x = random_matrix<S>(N, d_in, 54);
  const Mat<S> dy = random_matrix<S>(N, d_out, 55);
  const double tol = is_float ? 1e-5 : 1e-13;
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact})
    for (bool eval_mode : {false, true}) {
      INFO((mode == dora::NormGradient::exact ? "exact" : "detached") << (eval_mode ? ", evaluation" : ", training"));
      dora::AdapterConfig c;
      c.rank = r;
      c.norm_gradient = mode;
      dora::DoraLinear<S> layer(dora::borrow(W, b), c, A, B);
      layer.magnitude()[1] = huge_m;
      layer.magnitude()[3] = moderate_m;
      if (eval_mode) layer.eval();
      const Mat<S> y = layer.forward(x);
      INFO("row norms " << layer.row_norm().transpose() << "; m " << layer.magnitude().transpose());
      REQUIRE(layer.row_norm()[1] > S(0));  // not the n = 0 case
      REQUIRE_FALSE(std::isfinite(huge_m / layer.row_norm()[1]));
      CHECK(y.allFinite());
      CHECK((y.col(1).array() == b[1]).all());
      // Row 3: y_3 = m_3 x V_3^T / ||V_3|| + b_3, from the unscaled row in double.
      const Vec<double> v3 = W.row(3).transpose().template cast<double>() / static_cast<double>(tiny);
      const Vec<double> y3 = (x.template cast<double>() * v3).array() * (static_cast<double>(moderate_m) / v3.norm()) +
                             static_cast<double>(b[3]);
      INFO("row 3 (large finite m / n) vs dense: " << rel_err(y.col(3), y3));
      CHECK(rel_err(y.col(3), y3) <= tol);
      const Mat<S> dx = layer.backward(dy);
      CHECK(dx.allFinite());
      CHECK(layer.grad_lora_A().allFinite());
      CHECK(layer.grad_lora_B().allFinite());
      CHECK(layer.grad_magnitude().allFinite());
      CHECK(layer.grad_magnitude()[1] == S(0));
      CHECK(layer.grad_lora_B().row(1).isZero(S(0)));
      CHECK(layer.grad_magnitude()[3] != S(0));
      // merge: a zero row and scale 0 there; the merged layer gives the same outputs.
      const dora::DoraMerge<S> merged = layer.merge();
      CHECK(merged.scale[1] == S(0));
      CHECK(merged.weight.row(1).isZero(S(0)));
      CHECK(merged.weight.allFinite());
      Mat<S> y_merged = x * merged.weight.transpose();
      y_merged.rowwise() += b.transpose();
      INFO("merged forward vs layer forward: " << rel_err(y_merged, y));
      CHECK(rel_err(y_merged, y) <= tol);
      layer.prepare_inference();
      const Mat<S> y_infer = layer.infer(x);
      CHECK((y_infer.col(1).array() == b[1]).all());
      CHECK(rel_err(y_infer, y) <= tol);
    }
  // An infinite magnitude is not an inactive row: it reaches the output and the merged row.
  dora::AdapterConfig c;
  c.rank = r;
  dora::DoraLinear<S> layer(dora::borrow(W, b), c, A, B);
  layer.magnitude()[2] = std::numeric_limits<S>::infinity();
  const Mat<S> y = layer.forward(x);
  CHECK_FALSE(y.col(2).allFinite());
  CHECK(y.col(0).allFinite());
  CHECK_FALSE(layer.merge().weight.row(2).allFinite());
}

// With the exact norm gradient, a row with a tiny n_i and a large but finite g_i = m_i / n_i has
// beta_i = -g_i dm_i / n_i beyond float's range although the gradient it contributes,
// s beta_i (P_i + s B_i K) ~ g_i dm_i |A| (P_i is of the order of n_i), is representable: the layer
// must never form beta_i (it was inf here once). Float, n_3 ~ 1e-25, g_3 ~ 1e19, against double.
TEST_CASE("Exact gradient of a row with tiny n and large finite m / n is finite", "[magnitude]") {
  const Eigen::Index d_out = 5, d_in = 4, r = 2, N = 3;
  Mat<float> W = random_matrix<float>(d_out, d_in, 50);
  W.row(3) *= 1e-25f;
  Mat<float> B = random_matrix<float>(d_out, r, 51, 0.5);
  B.row(3).setZero();
  const Mat<float> A = random_matrix<float>(r, d_in, 52);
  const Mat<float> x = random_matrix<float>(N, d_in, 54);
  const Mat<float> dy = random_matrix<float>(N, d_out, 55);
  dora::AdapterConfig c;
  c.rank = r;
  c.norm_gradient = dora::NormGradient::exact;
  const Mat<double> Wd = W.cast<double>();
  dora::DoraLinear<float> layer(dora::borrow(W), c, A, B);
  dora::DoraLinear<double> reference(dora::borrow(Wd), c, A.cast<double>(), B.cast<double>());
  layer.magnitude()[3] = 1e-6f;
  reference.magnitude()[3] = static_cast<double>(1e-6f);
  layer.forward(x);
  reference.forward(x.cast<double>());
  layer.backward_parameters(dy);
  reference.backward_parameters(dy.cast<double>());
  const double largest =
      std::max(reference.grad_lora_A().cwiseAbs().maxCoeff(), reference.grad_lora_B().cwiseAbs().maxCoeff());
  INFO("largest gradient entry in double: " << largest << "; float dA finite " << layer.grad_lora_A().allFinite()
                                            << ", dB finite " << layer.grad_lora_B().allFinite());
  REQUIRE(largest < 1e30);
  CHECK(rel_err(layer.grad_lora_A(), reference.grad_lora_A()) <= 1e-4);
  CHECK(rel_err(layer.grad_lora_B(), reference.grad_lora_B()) <= 1e-4);
}
