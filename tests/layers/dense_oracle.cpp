// The factored layer against the dense (PEFT-style) computation, at sizes beyond the PEFT
// fixtures and on ill-conditioned rows (||V_i|| << ||W_i||), in float and double.

#include <catch2/catch.hpp>

#include "dense_dora.hpp"
#include "test_support.hpp"

using namespace dora_test;

namespace {

template <typename Scalar>
void compare(Eigen::Index d_out, Eigen::Index d_in, Eigen::Index r, Eigen::Index n, double tol) {
  const Mat<Scalar> W = random_matrix<Scalar>(d_out, d_in, 1, 0.05);
  const Vec<Scalar> b = random_vector<Scalar>(d_out, 2);
  const Mat<Scalar> A = random_matrix<Scalar>(r, d_in, 3, 0.05);
  const Mat<Scalar> B = random_matrix<Scalar>(d_out, r, 4, 0.05);
  const Mat<Scalar> x = random_matrix<Scalar>(n, d_in, 5);
  const Mat<Scalar> dy = random_matrix<Scalar>(n, d_out, 6);
  dora::AdapterConfig c;
  c.rank = r;
  c.alpha = 2.0 * static_cast<double>(r);
  dora::DoraLinear<Scalar> layer(dora::borrow(W, b), c, A, B);
  DenseDora<Scalar> dense(dora::borrow(W, b), A, B, static_cast<Scalar>(c.scaling()));
  layer.magnitude().array() *= Scalar(1.1);
  dense.magnitude() = layer.magnitude();
  Mat<Scalar> y1(n, d_out), y2(n, d_out), dx1(n, d_in), dx2(n, d_in);
  layer.forward(x, y1);
  dense.forward(x, y2);
  layer.backward(dy, dx1);
  dense.backward(dy, dx2);
  INFO(d_out << " x " << d_in << " r " << r << ": y " << rel_err(y1, y2) << " dx " << rel_err(dx1, dx2) << " n "
             << rel_err(layer.row_norm(), dense.row_norm()) << " dA "
             << rel_err(layer.grad_lora_A(), dense.grad_lora_A()) << " dB "
             << rel_err(layer.grad_lora_B(), dense.grad_lora_B()) << " dm "
             << rel_err(layer.grad_magnitude(), dense.grad_magnitude()));
  CHECK(rel_err(layer.row_norm(), dense.row_norm()) <= tol);
  CHECK(rel_err(y1, y2) <= tol);
  CHECK(rel_err(dx1, dx2) <= tol);
  CHECK(rel_err(layer.grad_lora_A(), dense.grad_lora_A()) <= tol);
  CHECK(rel_err(layer.grad_lora_B(), dense.grad_lora_B()) <= tol);
  CHECK(rel_err(layer.grad_magnitude(), dense.grad_magnitude()) <= tol);
}

// Rows where V_i = W_i + s B_i A nearly cancels: A spans W's first r rows and B_i cancels W_i up
// to a factor (1 - ratio), so ||V_i|| = ratio * ||W_i||. The factored expansion alone would lose
// about log10(1/ratio^2) digits there; the layer recomputes such rows directly.
template <typename Scalar>
void ill_conditioned(double ratio, double tol) {
  const Eigen::Index d_out = 64, d_in = 96, r = 8;
  const Mat<Scalar> W = random_matrix<Scalar>(d_out, d_in, 10);
  const Mat<Scalar> A = W.topRows(r);
  const Scalar s = 2;
  Mat<Scalar> B = random_matrix<Scalar>(d_out, r, 11, 0.01);
  for (Eigen::Index i = 0; i < r; ++i) {
    B.row(i).setZero();
    B(i, i) = static_cast<Scalar>(-(1.0 - ratio) / 2.0);  // V_i = ratio * W_i
  }
  dora::AdapterConfig c;
  c.rank = r;
  c.alpha = 16;  // s = 2
  dora::DoraLinear<Scalar> layer(dora::borrow(W), c, A, B);
  // Reference in double (or long double for double), formed densely.
  using Hi = long double;
  const Mat<Hi> V = W.template cast<Hi>() + Hi(s) * B.template cast<Hi>() * A.template cast<Hi>();
  const Vec<Hi> exact = V.rowwise().norm();
  const Vec<Scalar> factored = layer.compute_row_norm();
  const Vec<Scalar> dense = dora::row_norm_dense(W, A, B, s);
  double worst = 0, worst_dense = 0;
  for (Eigen::Index i = 0; i < d_out; ++i) {
    worst = std::max(worst, static_cast<double>(std::abs((Hi(factored[i]) - exact[i]) / exact[i])));
    worst_dense = std::max(worst_dense, static_cast<double>(std::abs((Hi(dense[i]) - exact[i]) / exact[i])));
  }
  INFO("||V_i||/||W_i|| = " << ratio << ": worst row relative error factored " << worst << ", dense " << worst_dense);
  CHECK(worst <= tol);
  layer.forward(random_matrix<Scalar>(4, d_in, 12));
  INFO("rows recomputed directly: " << layer.rows_recomputed());
  CHECK(layer.rows_recomputed() >= r);
}

}  // namespace

TEST_CASE("Factored DoRA equals the dense computation at larger shapes", "[norm][dense]") {
  compare<double>(512, 384, 32, 64, 1e-12);
  compare<double>(300, 1000, 1, 7, 1e-12);
  compare<float>(512, 384, 32, 64, 1e-4);
  compare<float>(1000, 300, 64, 16, 1e-4);
}

TEST_CASE("Factored row norm keeps full accuracy on rows where ||V_i|| << ||W_i||", "[norm][dense]") {
  ill_conditioned<double>(1e-3, 1e-13);
  ill_conditioned<double>(1e-6, 1e-10);
  ill_conditioned<float>(1e-2, 1e-5);
  ill_conditioned<float>(1e-3, 1e-3);
}
