// Numerical and shape edge cases (README, "Numerical policies" and "Edge cases").

#include <catch2/catch.hpp>

#include "support/dense_dora.hpp"
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
