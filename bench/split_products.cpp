// Device experiment (bench/run_device_threads.sh): Eigen's threaded GEMM vs the layer's own split of W, and
// serial vs parallel element-wise passes. Median of 7 after a warm-up, ms.
#include <omp.h>

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>
using M = Eigen::Matrix<float, -1, -1, Eigen::RowMajor>;
using Index = Eigen::Index;
template <class F>
double tm(F f) {
  f();
  std::vector<double> v;
  for (int i = 0; i < 7; ++i) {
    auto a = std::chrono::steady_clock::now();
    f();
    auto b = std::chrono::steady_clock::now();
    v.push_back(std::chrono::duration<double, std::milli>(b - a).count());
  }
  std::sort(v.begin(), v.end());
  return v[3];
}
// Y = X W^T split over W's rows (output features): one block per thread, single-threaded GEMM each.
void split_out(const M& X, const M& W, M& Y, Index align) {
  const int T = omp_get_max_threads();
  const Index O = W.rows();
  const Index per = ((O + T - 1) / T + align - 1) / align * align;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < T; ++t) {
    const Index b = std::min<Index>(O, t * per), s = std::min<Index>(O, b + per) - b;
    if (s > 0) Y.middleCols(b, s).noalias() = X * W.middleRows(b, s).transpose();
  }
}
// 2-D split: rows of X in R parts x W rows in T/R parts.
void split_2d(const M& X, const M& W, M& Y, int R) {
  const int T = omp_get_max_threads();
  const int C = T / R;
  const Index O = W.rows(), N = X.rows();
  const Index per = ((O + C - 1) / C + 15) / 16 * 16, pr = (N + R - 1) / R;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < R * C; ++t) {
    const int i = t / C, j = t % C;
    const Index b = std::min<Index>(O, j * per), s = std::min<Index>(O, b + per) - b;
    const Index rb = std::min<Index>(N, i * pr), rs = std::min<Index>(N, rb + pr) - rb;
    if (s > 0 && rs > 0) Y.block(rb, b, rs, s).noalias() = X.middleRows(rb, rs) * W.middleRows(b, s).transpose();
  }
}
// dX = G W split over W's columns (input features).
void split_in(const M& G, const M& W, M& dX) {
  const int T = omp_get_max_threads();
  const Index D = W.cols();
  const Index per = ((D + T - 1) / T + 15) / 16 * 16;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < T; ++t) {
    const Index b = std::min<Index>(D, t * per), s = std::min<Index>(D, b + per) - b;
    if (s > 0) dX.middleCols(b, s).noalias() = G * W.middleCols(b, s);
  }
}
void split_rows(const M& G, const M& W, M& dX) {
  const int T = omp_get_max_threads();
  const Index N = G.rows();
  const Index per = (N + T - 1) / T;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < T; ++t) {
    const Index b = std::min<Index>(N, t * per), s = std::min<Index>(N, b + per) - b;
    if (s > 0) dX.middleRows(b, s).noalias() = G.middleRows(b, s) * W;
  }
}
int main() {
  const int T = omp_get_max_threads();
  struct S {
    Index O, D, r, N;
  } shapes[] = {{4096, 4096, 16, 512}, {11008, 4096, 64, 512}, {4096, 4096, 16, 32}};
  for (S s : shapes) {
    M W = M::Random(s.O, s.D), X = M::Random(s.N + s.r, s.D), Y(s.N + s.r, s.O), G = M::Random(s.N + s.r, s.O),
      dX(s.N + s.r, s.D);
    M Xn = X.topRows(s.N), Yn(s.N, s.O), Gn = G.topRows(s.N), dXn(s.N, s.D);
    const double f = 2.0 * s.O * s.D;
    auto gf = [&](double ms, Index rows) { return f * rows / ms / 1e6; };
    double a, b;
    printf("T=%d %ld/%ld/%ld/%ld\n", T, (long)s.O, (long)s.D, (long)s.r, (long)s.N);
    a = tm([&] { Yn.noalias() = Xn * W.transpose(); });
    b = tm([&] { Y.noalias() = X * W.transpose(); });
    printf("  fwd eigen   N: %.2f ms (%.0f GF/s)  N+r: %.2f ms (%.0f GF/s)\n", a, gf(a, s.N), b, gf(b, s.N + s.r));
    a = tm([&] { split_out(Xn, W, Yn, 16); });
    b = tm([&] { split_out(X, W, Y, 16); });
    printf("  fwd split-out N: %.2f  N+r: %.2f\n", a, b);
    for (int R : {2, 4})
      if (T % R == 0 && T > R) {
        a = tm([&] { split_2d(Xn, W, Yn, R); });
        printf("  fwd split-2d R=%d N: %.2f\n", R, a);
      }
    a = tm([&] { dXn.noalias() = Gn * W; });
    b = tm([&] { dX.noalias() = G * W; });
    printf("  bwd eigen   N: %.2f ms (%.0f GF/s)  N+r: %.2f\n", a, gf(a, s.N), b);
    a = tm([&] { split_in(Gn, W, dXn); });
    b = tm([&] { split_rows(Gn, W, dXn); });
    printf("  bwd split-in N: %.2f  split-rows N: %.2f\n", a, b);
    Eigen::VectorXf g = Eigen::VectorXf::Random(s.O), bias = Eigen::VectorXf::Random(s.O), dm(s.O);
    a = tm([&] {
      for (Index t = 0; t < s.N; ++t) Yn.row(t) = Gn.row(t).cwiseProduct(g.transpose()) + bias.transpose();
    });
    b = tm([&] {
#pragma omp parallel for schedule(static)
      for (Index t = 0; t < s.N; ++t) Yn.row(t) = Gn.row(t).cwiseProduct(g.transpose()) + bias.transpose();
    });
    printf("  compose serial %.3f  parallel %.3f\n", a, b);
    a = tm([&] { dm.noalias() = Gn.cwiseProduct(Yn).colwise().sum().transpose(); });
    b = tm([&] {
      const Index per = ((s.O + T - 1) / T + 15) / 16 * 16;
#pragma omp parallel for schedule(static)
      for (int t = 0; t < T; ++t) {
        const Index c0 = std::min<Index>(s.O, t * per), n = std::min<Index>(s.O, c0 + per) - c0;
        if (n > 0)
          dm.segment(c0, n).noalias() =
              Gn.middleCols(c0, n).cwiseProduct(Yn.middleCols(c0, n)).colwise().sum().transpose();
      }
    });
    printf("  dm serial %.3f  parallel %.3f\n", a, b);
  }
}
