// Several adapters on one frozen layer (dora/multi_adapter.hpp), fp32.
//
// Mixed batch (serving): n rows, each naming one of k DoRA adapters (round robin), one
// MultiLinear::infer_mixed. Its parts, measured alone in the same run:
//   BM_MixedFrozen/k:  x W^T for the whole batch (the physical limit of any method);
//   BM_MixedLowRank/k: every adapter's low-rank work over its own rows, on rows already grouped
//                      (u = x_k A^T, h_k += s u B^T): what the adapters cost at the least;
//   BM_Mixed/k:        infer_mixed: the frozen product once, the rows grouped by adapter, the
//                      low-rank products, each row's DoRA scale, the bias.
// Target: Mixed <= (MixedFrozen + MixedLowRank) * 1.10.
//
// Training with stacked adapters: BM_StackedStep/<k> = forward + backward (dx and every adapter's
// gradients, PEFT's detached norm) of MultiLinear with k DoRA adapters active at once;
// BM_SingleDoraStep = DoraLinear, one adapter (the single-adapter layer, for reference). The frozen
// product and its adjoint read W once each per step whatever k is.
// Names: /<k>/<d_out>/<d_in>/<r>/<n>. Threads: OMP_NUM_THREADS.

#include <benchmark/benchmark.h>

#include <dora/dora.hpp>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using S = float;
using Mat = dora::Matrix<S>;
using Vec = dora::Vector<S>;
using dora_test::random_matrix;
using dora_test::random_vector;

struct Setup {
  Eigen::Index k, d_out, d_in, r, n;
  Mat W, x, y, dy, dx;
  Vec bias;
  std::vector<Mat> A, B;
  std::vector<Eigen::Index> of_row;
  explicit Setup(const benchmark::State& st)
      : k(st.range(0)), d_out(st.range(1)), d_in(st.range(2)), r(st.range(3)), n(st.range(4)) {
    W = random_matrix<S>(d_out, d_in, 1, 0.02);
    bias = random_vector<S>(d_out, 2, 0.02);
    x = random_matrix<S>(n, d_in, 3);
    dy = random_matrix<S>(n, d_out, 4);
    y.resize(n, d_out);
    dx.resize(n, d_in);
    for (Eigen::Index a = 0; a < k; ++a) {
      A.push_back(random_matrix<S>(r, d_in, 10 + 2 * a, 0.02));
      B.push_back(random_matrix<S>(d_out, r, 11 + 2 * a, 0.02));
    }
    for (Eigen::Index t = 0; t < n; ++t) of_row.push_back(t % k);
  }
  dora::AdapterConfig config() const {
    dora::AdapterConfig c;
    c.rank = r;
    c.alpha = 2.0 * static_cast<double>(r);
    c.init = dora::Init::user;
    return c;
  }
  void add_all(dora::MultiLinear<S>& layer, Eigen::Index count) const {
    std::vector<std::string> names;
    for (Eigen::Index a = 0; a < count; ++a) {
      names.push_back("a" + std::to_string(a));
      layer.add(names.back(), dora::AdapterKind::dora, config(), A[static_cast<std::size_t>(a)],
                B[static_cast<std::size_t>(a)]);
    }
    layer.set_active(names);
  }
};

void counters(benchmark::State& st) { st.counters["threads"] = Eigen::nbThreads(); }

void BM_MixedFrozen(benchmark::State& st) {
  Setup s(st);
  for (auto _ : st) {
    dora::detail::frozen_product(s.x, dora::borrow(s.W).weight, s.y);
    benchmark::DoNotOptimize(s.y.data());
    benchmark::ClobberMemory();
  }
  counters(st);
}

void BM_MixedLowRank(benchmark::State& st) {
  Setup s(st);
  // The rows of each adapter, already grouped (contiguous): the least the adapters can cost.
  std::vector<Mat> xk, hk, uk;
  for (Eigen::Index a = 0; a < s.k; ++a) {
    const Eigen::Index rows = (s.n - a + s.k - 1) / s.k;
    xk.push_back(random_matrix<S>(rows, s.d_in, 20 + a));
    hk.push_back(Mat::Zero(rows, s.d_out));
    uk.push_back(Mat(rows, s.r));
  }
  for (auto _ : st) {
    for (std::size_t a = 0; a < xk.size(); ++a) {
      uk[a].noalias() = xk[a] * s.A[a].transpose();
      hk[a].noalias() += S(2) * uk[a] * s.B[a].transpose();
    }
    benchmark::DoNotOptimize(hk.data());
    benchmark::ClobberMemory();
  }
  counters(st);
}

void BM_Mixed(benchmark::State& st) {
  Setup s(st);
  dora::MultiLinear<S> layer(dora::borrow(s.W, s.bias));
  s.add_all(layer, s.k);
  layer.prepare_inference();
  dora::MultiLinear<S>::MixedWorkspace w;
  for (auto _ : st) {
    layer.infer_mixed(s.x, s.of_row, s.y, w);
    benchmark::DoNotOptimize(s.y.data());
    benchmark::ClobberMemory();
  }
  counters(st);
}

void BM_StackedStep(benchmark::State& st) {
  Setup s(st);
  dora::MultiLinear<S> layer(dora::borrow(s.W, s.bias));
  s.add_all(layer, s.k);
  for (auto _ : st) {
    layer.forward(s.x, s.y);
    layer.backward(s.dy, s.dx);
    benchmark::DoNotOptimize(s.dx.data());
    benchmark::ClobberMemory();
  }
  counters(st);
}

void BM_SingleDoraStep(benchmark::State& st) {
  Setup s(st);
  dora::DoraLinear<S> layer(dora::borrow(s.W, s.bias), s.config(), s.A[0], s.B[0]);
  for (auto _ : st) {
    layer.forward(s.x, s.y);
    layer.backward(s.dy, s.dx);
    benchmark::DoNotOptimize(s.dx.data());
    benchmark::ClobberMemory();
  }
  counters(st);
}

void mixed_args(benchmark::internal::Benchmark* b) {
  for (int k : {1, 4, 16}) b->Args({k, 4096, 4096, 16, 512});
  b->Args({4, 1024, 1024, 16, 64});  // a small case for quick runs
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
void step_args(benchmark::internal::Benchmark* b) {
  for (int k : {1, 2}) b->Args({k, 4096, 4096, 16, 512});
  b->Args({2, 1024, 1024, 16, 64});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_MixedFrozen)->Apply(mixed_args);
BENCHMARK(BM_MixedLowRank)->Apply(mixed_args);
BENCHMARK(BM_Mixed)->Apply(mixed_args);
BENCHMARK(BM_StackedStep)->Apply(step_args);
BENCHMARK(BM_SingleDoraStep)
    ->Args({1, 4096, 4096, 16, 512})
    ->Args({1, 1024, 1024, 16, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
