// WORK IN PROGRESS (issue 15): dora::dnnl_backend's bf16 products against a float64 computation,
// entry by entry within their error bounds. Where bf16 rounding enters: the activation (X or G) is
// rounded to bf16 (relative error <= 2^-9 per element); W is bf16 already; products of two bf16 are
// exact in float, and the sums accumulate in float. So, per output entry y = sum_k x_k w_k:
//   |y - sum_k bf16(x_k) w_k| <= K 2^-24 sum_k |bf16(x_k) w_k|   (float accumulation, loose)
//   |y - sum_k x_k w_k|       <= (2^-9 (1 + K 2^-24) + K 2^-24) sum_k |x_k w_k|
// Not in CMake yet: g++ -std=c++17 -O2 -fopenmp -Iinclude -Itests -I/usr/include/eigen3
//   tests/test_dnnl.cpp tests/catch_main.cpp -ldnnl
#include <catch2/catch.hpp>
#include <dora/dnnl/bf16_matmul.hpp>

#include "test_support.hpp"

using namespace dora_test;

namespace {

using Md = Mat<double>;

// Worst |y - ref| / bound over the entries (<= 1 passes), with bound = c * (|X| |W|^T) entrywise.
double worst_ratio(const Mat<float>& y, const Md& ref, const Md& abs_products, double c) {
  double worst = 0.0;
  for (Eigen::Index i = 0; i < y.rows(); ++i)
    for (Eigen::Index j = 0; j < y.cols(); ++j) {
      const double bound = c * abs_products(i, j) + 1e-300;
      worst = std::max(worst, std::abs(static_cast<double>(y(i, j)) - ref(i, j)) / bound);
    }
  return worst;
}

}  // namespace

TEST_CASE("bf16 product and adjoint through oneDNN are within their bounds of float64", "[dnnl][bf16]") {
  const Eigen::Index M = 37, K = 300, N = 53, ldx = K + 5, ldw = K + 3;
  const Mat<float> Xfull = random_matrix<float>(M, ldx, 1);
  const Mat<float> Wf = random_matrix<float>(N, ldw, 2);
  std::vector<dora::bfloat16> W(static_cast<std::size_t>(N * ldw));
  for (Eigen::Index i = 0; i < N * ldw; ++i) W[static_cast<std::size_t>(i)] = dora::bfloat16(Wf.data()[i]);
  Md Wd(N, K), Xd(M, K), Xr(M, K);
  for (Eigen::Index n = 0; n < N; ++n)
    for (Eigen::Index k = 0; k < K; ++k) Wd(n, k) = static_cast<double>(static_cast<float>(W[n * ldw + k]));
  for (Eigen::Index m = 0; m < M; ++m)
    for (Eigen::Index k = 0; k < K; ++k) {
      Xd(m, k) = Xfull(m, k);
      Xr(m, k) = static_cast<double>(static_cast<float>(dora::bfloat16(Xfull(m, k))));
    }
  const double gamma = static_cast<double>(K) * 0x1.0p-24, u = 0x1.0p-9;

  Mat<float> Y(M, N);
  dora::dnnl_backend::product(Xfull.data(), M, K, ldx, W.data(), N, ldw, Y.data(), N);
  const double r_rounded = worst_ratio(Y, Xr * Wd.transpose(), Xr.cwiseAbs() * Wd.cwiseAbs().transpose(), gamma);
  const double r_float =
      worst_ratio(Y, Xd * Wd.transpose(), Xd.cwiseAbs() * Wd.cwiseAbs().transpose(), u * (1 + gamma) + gamma);
  const double rel = rel_err(Y.cast<double>().eval(), (Xd * Wd.transpose()).eval());
  std::printf("dnnl bf16 product: error / bound %.3f (vs rounded X), %.3f (vs float X); max rel error %.2e\n",
              r_rounded, r_float, rel);
  CHECK(r_rounded <= 1.0);
  CHECK(r_float <= 1.0);

  // Accumulate: Y += X W^T.
  Mat<float> Y2 = Y;
  dora::dnnl_backend::product(Xfull.data(), M, K, ldx, W.data(), N, ldw, Y2.data(), N, true);
  CHECK(rel_err(Y2, Mat<float>(2.0f * Y)) <= 1e-6);

  // Adjoint: dX = G W.
  const Mat<float> G = random_matrix<float>(M, N, 3);
  Md Gd = G.cast<double>(), Gr(M, N);
  for (Eigen::Index i = 0; i < G.size(); ++i)
    Gr.data()[i] = static_cast<double>(static_cast<float>(dora::bfloat16(G.data()[i])));
  Mat<float> dX(M, K);
  dora::dnnl_backend::adjoint(G.data(), M, N, N, W.data(), K, ldw, dX.data(), K);
  const double gN = static_cast<double>(N) * 0x1.0p-24;
  const double a_rounded = worst_ratio(dX, Gr * Wd, Gr.cwiseAbs() * Wd.cwiseAbs(), gN);
  const double a_float = worst_ratio(dX, Gd * Wd, Gd.cwiseAbs() * Wd.cwiseAbs(), u * (1 + gN) + gN);
  std::printf("dnnl bf16 adjoint: error / bound %.3f (vs rounded G), %.3f (vs float G)\n", a_rounded, a_float);
  CHECK(a_rounded <= 1.0);
  CHECK(a_float <= 1.0);
}

TEST_CASE("A DoRA layer on a bf16 W: the oneDNN path against the float path", "[dnnl][bf16]") {
  std::printf("dnnl: bf16 units: %s; backend %s\n", dora::dnnl_backend::units_name(),
              dora::dnnl_backend::enabled() ? "on" : "off (the float path runs)");
  const Eigen::Index d_out = 96, d_in = 128, n = 40;
  const std::vector<dora::bfloat16> wb = dora::encode_weight<dora::bfloat16>(random_matrix<float>(d_out, d_in, 4));
  dora::AdapterConfig c;
  c.rank = 8;
  c.alpha = 16;
  c.norm_gradient = dora::NormGradient::exact;
  const Mat<float> x = random_matrix<float>(n, d_in, 5), dy = random_matrix<float>(n, d_out, 6);
  const auto run = [&](bool on, Mat<float>& y, Mat<float>& dx, Mat<float>& gA, Mat<float>& gB) {
    dora::dnnl_backend::set_enabled(on);
    dora::DoraLinear<float, dora::bfloat16> layer(dora::borrow<float>(wb.data(), d_out, d_in), c,
                                                  random_matrix<float>(8, d_in, 7, 0.1),
                                                  random_matrix<float>(d_out, 8, 8, 0.1));
    y = layer.forward(x);
    dx = layer.backward(dy);
    gA = layer.grad_lora_A();
    gB = layer.grad_lora_B();
  };
  Mat<float> y0, dx0, gA0, gB0, y1, dx1, gA1, gB1;
  run(false, y0, dx0, gA0, gB0);
  const bool on = dora::dnnl_backend::set_enabled(true);
  run(true, y1, dx1, gA1, gB1);
  std::printf("dnnl vs float path (%s): y %.2e, dx %.2e, dA %.2e, dB %.2e (max relative)\n", on ? "bf16" : "fallback",
              rel_err(y1, y0), rel_err(dx1, dx0), rel_err(gA1, gA0), rel_err(gB1, gB0));
  // Loose for now: 2^-9 per rounded activation, a few such terms; the derived bounds are issue 15's work.
  CHECK(rel_err(y1, y0) <= 2e-2);
  CHECK(rel_err(dx1, dx0) <= 2e-2);
  CHECK(rel_err(gA1, gA0) <= 5e-2);
  CHECK(rel_err(gB1, gB0) <= 5e-2);
  if (!on) CHECK(rel_err(y1, y0) == 0.0);  // the fallback is today's path exactly
}
