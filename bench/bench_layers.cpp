// LoRA vs DoRA on the other layer types, against the frozen layer alone, side by side in one run.
//   Conv2d (BM_Conv<Method>/<channels>/<image side>/<r>/<batch>): 3x3 kernel, padding 1, stride 1.
//     Base = the frozen convolution by the same lowering (im2col, x W^T; backward dy W, col2im),
//     the physical limit of this implementation's products. Step = forward + backward with dx.
//   Embedding (BM_Embedding<Method>/<vocabulary>/<dim>/<r>/<tokens>): Base = the lookup alone (a
//     frozen table has no backward). Step = forward + backward_parameters. DoRA's norm costs
//     2 r V dim flops per training step (docs/math.md, section 13.1): compare it with the lookup.
// fp32; threads: OMP_NUM_THREADS. Compare methods by their ratio within one run
// (--benchmark_repetitions, medians; --benchmark_enable_random_interleaving to interleave).

#include <benchmark/benchmark.h>

#include <dora/dora.hpp>

#include "test_support.hpp"

namespace {

using S = float;
using Mat = dora::Matrix<S>;
using dora_test::random_matrix;
using dora_test::random_vector;

struct ConvProblem {
  dora::ConvGeometry g;
  Mat W, x, dy, y, dx, A, B, cols, ycols, dycols;
  dora::Vector<S> bias;
  dora::AdapterConfig config;

  explicit ConvProblem(const benchmark::State& st) {
    const Eigen::Index c = st.range(0), side = st.range(1), r = st.range(2), n = st.range(3);
    g.dims = 2;
    g.in_channels = g.out_channels = c;
    g.kernel = {3, 3, 1};
    g.padding = {1, 1, 0};
    g.input = {side, side, 1};
    W = random_matrix<S>(c, g.patch_size(), 1, 0.02);
    bias = random_vector<S>(c, 2, 0.02);
    x = random_matrix<S>(n, c * g.input_volume(), 3);
    dy = random_matrix<S>(n, c * g.output_volume(), 4);
    y.resize(n, c * g.output_volume());
    dx.resize(n, c * g.input_volume());
    A = random_matrix<S>(r, g.patch_size(), 5, 0.02);
    B = random_matrix<S>(c, r, 6, 0.02);
    config.rank = r;
    config.alpha = 2.0 * static_cast<double>(r);
  }
  dora::ConvBase<S> base() const { return dora::borrow_conv(W, bias, g); }
};

void conv_flops(benchmark::State& st, bool adapter) {
  const double c = static_cast<double>(st.range(0)), L = static_cast<double>(st.range(1) * st.range(1));
  const double r = static_cast<double>(st.range(2)), n = static_cast<double>(st.range(3));
  const double rows = n * L, d_in = 9 * c;
  const double f = 4 * rows * d_in * c + (adapter ? 6 * rows * r * (d_in + c) : 0);
  st.counters["GFLOP/s"] = benchmark::Counter(f * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_ConvStepBase(benchmark::State& st) {
  ConvProblem p(st);
  const Eigen::Index n = p.x.rows(), L = p.g.output_volume(), c = p.g.out_channels;
  for (auto _ : st) {
    dora::detail::im2col(p.g, p.x, p.cols);
    p.ycols.resize(n * L, c);
    p.ycols.noalias() = p.cols * p.W.transpose();
    for (Eigen::Index s = 0; s < n; ++s)
      for (Eigen::Index o = 0; o < c; ++o)
        p.y.row(s).segment(o * L, L) = (p.ycols.col(o).segment(s * L, L).array() + p.bias[o]).transpose();
    p.dycols.resize(n * L, c);
    for (Eigen::Index s = 0; s < n; ++s)
      for (Eigen::Index o = 0; o < c; ++o)
        p.dycols.col(o).segment(s * L, L) = p.dy.row(s).segment(o * L, L).transpose();
    p.cols.noalias() = p.dycols * p.W;
    dora::detail::col2im(p.g, p.cols, p.dx);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  conv_flops(st, false);
}

template <typename Layer>
void conv_step(benchmark::State& st, dora::NormGradient mode) {
  ConvProblem p(st);
  p.config.norm_gradient = mode;
  Layer layer(p.base(), p.config, p.A, p.B);
  for (auto _ : st) {
    layer.forward(p.x, p.y);
    layer.backward(p.dy, p.dx);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  conv_flops(st, true);
}
void BM_ConvStepLora(benchmark::State& st) { conv_step<dora::LoraConv<S>>(st, dora::NormGradient::detached); }
void BM_ConvStepDora(benchmark::State& st) { conv_step<dora::DoraConv<S>>(st, dora::NormGradient::detached); }
void BM_ConvStepDoraExact(benchmark::State& st) { conv_step<dora::DoraConv<S>>(st, dora::NormGradient::exact); }

struct EmbeddingProblem {
  Mat table, A, B, y, dy;
  dora::TokenIds ids;
  dora::AdapterConfig config;
  explicit EmbeddingProblem(const benchmark::State& st) {
    const Eigen::Index V = st.range(0), dim = st.range(1), r = st.range(2), n = st.range(3);
    table = random_matrix<S>(V, dim, 1);
    A = random_matrix<S>(r, V, 2, 0.02);
    B = random_matrix<S>(dim, r, 3, 0.02);
    y.resize(n, dim);
    dy = random_matrix<S>(n, dim, 4);
    ids.resize(n);
    dora::detail::Rng rng(5);
    for (Eigen::Index t = 0; t < n; ++t)
      ids[t] = static_cast<std::int64_t>(rng.uniform(0.0, static_cast<double>(V))) % V;
    config.rank = r;
    config.alpha = 2.0 * static_cast<double>(r);
  }
};

void BM_EmbeddingStepBase(benchmark::State& st) {
  EmbeddingProblem p(st);
  for (auto _ : st) {
    for (Eigen::Index t = 0; t < p.ids.size(); ++t) p.y.row(t) = p.table.row(p.ids[t]);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
}
template <typename Layer>
void embedding_step(benchmark::State& st, bool eval) {
  EmbeddingProblem p(st);
  Layer layer(dora::borrow_embedding(p.table), p.config, p.A, p.B);
  if (eval) layer.eval();
  for (auto _ : st) {
    layer.forward(p.ids, p.y);
    if (!eval) layer.backward_parameters(p.dy);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
}
void BM_EmbeddingStepLora(benchmark::State& st) { embedding_step<dora::LoraEmbedding<S>>(st, false); }
void BM_EmbeddingStepDora(benchmark::State& st) { embedding_step<dora::DoraEmbedding<S>>(st, false); }
void BM_EmbeddingForwardDoraEval(benchmark::State& st) { embedding_step<dora::DoraEmbedding<S>>(st, true); }

void conv_shapes(benchmark::internal::Benchmark* b) {
  b->Args({320, 32, 16, 2})->Args({64, 64, 8, 4})->Unit(benchmark::kMillisecond)->UseRealTime();
}
void embedding_shapes(benchmark::internal::Benchmark* b) {
  b->Args({32000, 1024, 16, 512})->Args({32000, 4096, 16, 512})->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_ConvStepBase)->Apply(conv_shapes);
BENCHMARK(BM_ConvStepLora)->Apply(conv_shapes);
BENCHMARK(BM_ConvStepDora)->Apply(conv_shapes);
BENCHMARK(BM_ConvStepDoraExact)->Apply(conv_shapes);
BENCHMARK(BM_EmbeddingStepBase)->Apply(embedding_shapes);
BENCHMARK(BM_EmbeddingStepLora)->Apply(embedding_shapes);
BENCHMARK(BM_EmbeddingStepDora)->Apply(embedding_shapes);
BENCHMARK(BM_EmbeddingForwardDoraEval)->Apply(embedding_shapes);

BENCHMARK_MAIN();
