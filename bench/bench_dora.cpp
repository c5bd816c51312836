// LoRA vs DoRA, and this project's factored DoRA vs the dense (PEFT-style) computation.
// Names: BM_<Pass><Method>/<d_out>/<d_in>/<r>/<n>; Step = forward + backward (dx and every adapter
// gradient), Forward = forward only (also at n = 1; ForwardDoraEval: evaluation mode, cached norm).
// With --benchmark_repetitions each gets a "spread" statistic (max / min time over repetitions)
// and DoRA a rows_recomputed counter. Base is the frozen layer alone (x W^T forward, dy W backward).
// fp32 compute; W stored as float, or (names ending _bf16, _f16, _q8, _q4) as bf16, f16, Q8_0 or Q4_0. Threads:
// OMP_NUM_THREADS (Eigen's OpenMP products). Compare methods by their ratio within one run; the machine is shared and
// noisy, so use
// --benchmark_repetitions and the medians.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <dora/dora.hpp>
#include <type_traits>
#include <vector>

#include "dense_dora.hpp"
#include "test_support.hpp"

namespace {

using S = float;
using Mat = dora::Matrix<S>;
using Vec = dora::Vector<S>;
using dora_test::random_matrix;
using dora_test::random_vector;

struct Problem {
  Eigen::Index d_out, d_in, r, n;
  Mat W, x, dy, y, dx, A, B;
  Vec bias;
  dora::AdapterConfig config;

  Problem(Eigen::Index d_out_, Eigen::Index d_in_, Eigen::Index r_, Eigen::Index n_)
      : d_out(d_out_), d_in(d_in_), r(r_), n(n_) {
    W = random_matrix<S>(d_out, d_in, 1, 0.02);
    bias = random_vector<S>(d_out, 2, 0.02);
    x = random_matrix<S>(n, d_in, 3);
    dy = random_matrix<S>(n, d_out, 4);
    A = random_matrix<S>(r, d_in, 5, 0.02);
    B = random_matrix<S>(d_out, r, 6, 0.02);
    y.resize(n, d_out);
    dx.resize(n, d_in);
    config.rank = r;
    config.alpha = 2.0 * static_cast<double>(r);
  }
  explicit Problem(const benchmark::State& st) : Problem(st.range(0), st.range(1), st.range(2), st.range(3)) {}
  dora::BaseLayer<S> base() const { return dora::borrow(W, bias); }
};

enum class Pass { Step, Forward };

// Nominal flops of one iteration (multiply-add = 2), so GFLOP/s compares methods on equal terms.
double flops(const benchmark::State& st, Pass pass, int norm_products, bool adapter) {
  const double o = static_cast<double>(st.range(0)), i = static_cast<double>(st.range(1));
  const double r = static_cast<double>(st.range(2)), n = static_cast<double>(st.range(3));
  const double base = 2 * n * i * o * (pass == Pass::Step ? 2 : 1);
  const double lora = adapter ? 2 * n * r * (i + o) * (pass == Pass::Step ? 3 : 1) : 0;
  return base + lora + norm_products * 2 * o * i * r;
}

void finish(benchmark::State& st, double flops_per_iteration) {
  st.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_iteration * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["threads"] = Eigen::nbThreads();
}

template <typename Layer>
void run(benchmark::State& st, Layer& layer, Problem& p, Pass pass) {
  for (auto _ : st) {
    layer.forward(p.x, p.y);
    if (pass == Pass::Step) layer.backward(p.dy, p.dx);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
}

// The frozen W as a benchmark stores it: the Problem's float W, or W encoded as bf16, f16, Q8_0 or
// Q4_0 (storage.hpp; the layer computes in float and dequantizes tiles of W), the float W then freed
// so that only the stored one is read.
template <typename Storage>
struct FrozenW {
  static constexpr bool kNative = std::is_same<Storage, S>::value;
  std::vector<Storage> values;
  explicit FrozenW(Problem& p) {
    if constexpr (!kNative) {
      values = dora::encode_weight<Storage>(p.W);
      p.W.resize(0, 0);
    }
  }
  dora::BaseLayer<S, Storage> base(const Problem& p) const {
    if constexpr (kNative)
      return p.base();
    else
      return dora::borrow<S>(values, p.d_out, p.d_in, p.bias.data());
  }
};

template <typename Storage = S>
void base_impl(benchmark::State& st, Pass pass) {
  Problem p(st);
  const FrozenW<Storage> frozen(p);
  const dora::BaseLayer<S, Storage> base = frozen.base(p);
  // The frozen layer alone, with the products the layers use (detail/parallel.hpp: split over
  // threads by the layer above 8 rows), so that ratios to it measure the adapter's own work.
  for (auto _ : st) {
    dora::detail::frozen_product(p.x, base.weight, p.y);
    p.y.rowwise() += p.bias.transpose();
    if (pass == Pass::Step) dora::detail::split_adjoint_product(p.dy, base.weight, p.dx);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  finish(st, flops(st, pass, 0, false));
  st.counters["weight_bytes"] = static_cast<double>(base.weight_bytes());
}

template <typename Storage = S>
void lora_impl(benchmark::State& st, Pass pass) {
  Problem p(st);
  const FrozenW<Storage> frozen(p);
  dora::LoraLinear<S, Storage> layer(frozen.base(p), p.config, p.A, p.B);
  run(st, layer, p, pass);
  finish(st, flops(st, pass, 0, true));
  st.counters["weight_bytes"] = static_cast<double>(layer.base().weight_bytes());
}

template <typename Storage = S>
void dora_impl(benchmark::State& st, Pass pass, dora::NormGradient mode, bool eval) {
  Problem p(st);
  const FrozenW<Storage> frozen(p);
  p.config.norm_gradient = mode;
  dora::DoraLinear<S, Storage> layer(frozen.base(p), p.config, p.A, p.B);
  if (eval) layer.eval();
  run(st, layer, p, pass);
  // Rows the last norm computation recomputed directly (cancellation, overflow): a path that is
  // taken on some runs only would show here.
  st.counters["rows_recomputed"] = static_cast<double>(layer.rows_recomputed());
  const int norm_products = eval ? 0 : (mode == dora::NormGradient::exact && pass == Pass::Step ? 2 : 1);
  finish(st, flops(st, pass, norm_products, true));
  st.counters["weight_bytes"] = static_cast<double>(layer.base().weight_bytes());
}

void dense_impl(benchmark::State& st, Pass pass) {
  Problem p(st);
  dora_test::DenseDora<S> layer(p.base(), p.A, p.B, static_cast<S>(p.config.scaling()));
  run(st, layer, p, pass);
  finish(st, flops(st, pass, 1, true));
}

void BM_StepBase(benchmark::State& st) { base_impl(st, Pass::Step); }
void BM_StepLora(benchmark::State& st) { lora_impl(st, Pass::Step); }
void BM_StepDora(benchmark::State& st) { dora_impl(st, Pass::Step, dora::NormGradient::detached, false); }
void BM_StepDoraExact(benchmark::State& st) { dora_impl(st, Pass::Step, dora::NormGradient::exact, false); }
void BM_StepDoraDense(benchmark::State& st) { dense_impl(st, Pass::Step); }
void BM_ForwardBase(benchmark::State& st) { base_impl(st, Pass::Forward); }
void BM_ForwardLora(benchmark::State& st) { lora_impl(st, Pass::Forward); }
void BM_ForwardDora(benchmark::State& st) { dora_impl(st, Pass::Forward, dora::NormGradient::detached, false); }
void BM_ForwardDoraExact(benchmark::State& st) { dora_impl(st, Pass::Forward, dora::NormGradient::exact, false); }
void BM_ForwardDoraDense(benchmark::State& st) { dense_impl(st, Pass::Forward); }
void BM_ForwardDoraEval(benchmark::State& st) { dora_impl(st, Pass::Forward, dora::NormGradient::detached, true); }

// The frozen W stored as bf16, f16, Q8_0 or Q4_0. Names: BM_<Pass><Method>_<dtype>/...; compare
// with the same method's float-base benchmark in the same run.
#define DORA_STORED_BENCHMARKS(dtype, Storage)                                           \
  void BM_StepBase_##dtype(benchmark::State& st) { base_impl<Storage>(st, Pass::Step); } \
  void BM_StepLora_##dtype(benchmark::State& st) { lora_impl<Storage>(st, Pass::Step); } \
  void BM_StepDora_##dtype(benchmark::State& st) {                                       \
    dora_impl<Storage>(st, Pass::Step, dora::NormGradient::detached, false);             \
  }                                                                                      \
  void BM_StepDoraExact_##dtype(benchmark::State& st) {                                  \
    dora_impl<Storage>(st, Pass::Step, dora::NormGradient::exact, false);                \
  }                                                                                      \
  void BM_ForwardDoraEval_##dtype(benchmark::State& st) {                                \
    dora_impl<Storage>(st, Pass::Forward, dora::NormGradient::detached, true);           \
  }
DORA_STORED_BENCHMARKS(bf16, dora::bfloat16)
DORA_STORED_BENCHMARKS(f16, dora::float16)
DORA_STORED_BENCHMARKS(q8, dora::BlockQ8_0)
DORA_STORED_BENCHMARKS(q4, dora::BlockQ4_0)

// Row norm alone: factored (one d_out x d_in x r product, W read once) vs dense (the same
// product written into a d_out x d_in matrix, then read again for the norms).
void BM_RowNormFactored(benchmark::State& st) {
  Problem p(st.range(0), st.range(1), st.range(2), 0);
  const Vec w_sq = p.W.rowwise().squaredNorm();
  dora::detail::FactoredRowNorm<S> work;
  work.resize(p.d_out, p.d_in, p.r);
  Vec n(p.d_out);
  const dora::BaseLayer<S> base = p.base();
  for (auto _ : st) {
    work.compute(base.weight, w_sq, p.A, p.B, S(2), n);
    benchmark::DoNotOptimize(n.data());
    benchmark::ClobberMemory();
  }
  finish(st, 2.0 * static_cast<double>(p.d_out * p.d_in * p.r));
}
void BM_RowNormDense(benchmark::State& st) {
  Problem p(st.range(0), st.range(1), st.range(2), 0);
  Mat V(p.d_out, p.d_in);
  Vec n(p.d_out);
  for (auto _ : st) {
    V = p.W;
    V.noalias() += S(2) * p.B * p.A;
    n = V.rowwise().norm();
    benchmark::DoNotOptimize(n.data());
    benchmark::ClobberMemory();
  }
  finish(st, 2.0 * static_cast<double>(p.d_out * p.d_in * p.r));
}

// max / min over the repetitions (shown as a percentage: 126% means max = 1.26 x min), next to mean/median/stddev: a
// bimodal method (two timings minutes apart, e.g. from buffer placement) shows a spread well above the others' in the
// same run.
void spread(benchmark::internal::Benchmark* b) {
  b->ComputeStatistics(
      "spread",
      [](const std::vector<double>& v) -> double {
        if (v.empty()) return 0.0;
        const auto mm = std::minmax_element(v.begin(), v.end());
        return *mm.first > 0.0 ? *mm.second / *mm.first : 0.0;
      },
      benchmark::StatisticUnit::kPercentage);  // printed as a percentage: 126% = max 1.26 x min
}
// Steps at n = 32 and 512 (the shapes of bench/README.md's "Threads" table) and a small layer.
void shapes(benchmark::internal::Benchmark* b) {
  b->Args({4096, 4096, 16, 512})->Args({11008, 4096, 64, 512})->Args({4096, 4096, 16, 32});
  b->Args({11008, 4096, 64, 32})->Args({1024, 1024, 8, 256});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
  spread(b);
}
// Forward passes also at n = 1: single-token inference.
void forward_shapes(benchmark::internal::Benchmark* b) {
  shapes(b);
  b->Args({4096, 4096, 16, 1})->Args({11008, 4096, 64, 1});
}
// Stored bases (bench/README.md's "Narrow frozen weights" shapes): steps at n = 512, evaluation also at n = 1.
void stored_shapes(benchmark::internal::Benchmark* b) {
  b->Args({4096, 4096, 16, 512})->Args({11008, 4096, 64, 512});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
  spread(b);
}
void stored_forward_shapes(benchmark::internal::Benchmark* b) {
  stored_shapes(b);
  b->Args({4096, 4096, 16, 1});
}
void norm_shapes(benchmark::internal::Benchmark* b) {
  b->Args({4096, 4096, 16})->Args({11008, 4096, 64})->Args({1024, 1024, 8});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_StepBase)->Apply(shapes);
BENCHMARK(BM_StepLora)->Apply(shapes);
BENCHMARK(BM_StepDora)->Apply(shapes);
BENCHMARK(BM_StepDoraExact)->Apply(shapes);
BENCHMARK(BM_StepDoraDense)->Apply(shapes);
BENCHMARK(BM_ForwardBase)->Apply(forward_shapes);
BENCHMARK(BM_ForwardLora)->Apply(forward_shapes);
BENCHMARK(BM_ForwardDora)->Apply(forward_shapes);
BENCHMARK(BM_ForwardDoraExact)->Apply(forward_shapes);
BENCHMARK(BM_ForwardDoraDense)->Apply(forward_shapes);
BENCHMARK(BM_ForwardDoraEval)->Apply(forward_shapes);
BENCHMARK(BM_RowNormFactored)->Apply(norm_shapes);
#define DORA_REGISTER_STORED(dtype)                          \
  BENCHMARK(BM_StepBase_##dtype)->Apply(stored_shapes);      \
  BENCHMARK(BM_StepLora_##dtype)->Apply(stored_shapes);      \
  BENCHMARK(BM_StepDora_##dtype)->Apply(stored_shapes);      \
  BENCHMARK(BM_StepDoraExact_##dtype)->Apply(stored_shapes); \
  BENCHMARK(BM_ForwardDoraEval_##dtype)->Apply(stored_forward_shapes);
DORA_REGISTER_STORED(bf16)
DORA_REGISTER_STORED(f16)
DORA_REGISTER_STORED(q8)
DORA_REGISTER_STORED(q4)
BENCHMARK(BM_RowNormDense)->Apply(norm_shapes);

BENCHMARK_MAIN();
