// What may run concurrently (README, "Threads"): infer() on one layer from several threads, and
// independent layers sharing one borrowed W. Results must equal the single-thread run bit for bit.
// Built and run under ThreadSanitizer in CI.

#include <algorithm>
#include <catch2/catch.hpp>
#include <thread>
#include <utility>
#include <vector>

#include "test_support.hpp"

using namespace dora_test;

TEST_CASE("infer() from several threads on one layer equals the single-thread forward", "[threads]") {
  const Mat<float> W = random_matrix<float>(64, 48, 1);
  const Vec<float> b = random_vector<float>(64, 2);
  dora::AdapterConfig c;
  c.rank = 4;
  dora::DoraLinear<float> dora_layer(dora::borrow(W, b), c, random_matrix<float>(4, 48, 3, 0.3),
                                     random_matrix<float>(64, 4, 4, 0.3));
  dora::LoraLinear<float> lora_layer(dora::borrow(W, b), c, random_matrix<float>(4, 48, 3, 0.3),
                                     random_matrix<float>(64, 4, 4, 0.3));
  // m != ||V_i||, so that g = m / n is not 1 and infer() must apply it.
  dora_layer.magnitude().array() *= 1.3f;
  dora_layer.prepare_inference();
  lora_layer.eval();
  constexpr int kThreads = 4;
  std::vector<Mat<float>> inputs;
  std::vector<Mat<float>> expected_dora, expected_lora;
  for (int t = 0; t < kThreads; ++t) {
    inputs.push_back(random_matrix<float>(8 + t, 48, 10 + static_cast<std::uint64_t>(t)));
    expected_dora.push_back(dora_layer.forward(inputs.back()));
    expected_lora.push_back(lora_layer.forward(inputs.back()));
  }
  std::vector<Mat<float>> got_dora(kThreads), got_lora(kThreads);
  std::vector<std::thread> threads;
  const dora::DoraLinear<float>& shared_dora = dora_layer;  // only const access from the threads
  const dora::LoraLinear<float>& shared_lora = lora_layer;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Mat<float> u;
      Mat<float> y(inputs[t].rows(), 64);
      for (int rep = 0; rep < 20; ++rep) shared_dora.infer(inputs[t], y, u);
      got_dora[t] = y;
      got_lora[t] = shared_lora.infer(inputs[t]);
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    INFO("thread " << t << ": DoRA difference " << rel_err(got_dora[t], expected_dora[t]) << ", LoRA "
                   << rel_err(got_lora[t], expected_lora[t]));
    CHECK(got_dora[t] == expected_dora[t]);
    CHECK(got_lora[t] == expected_lora[t]);
  }
}

TEST_CASE("infer() refuses a stale norm", "[threads][errors]") {
  const Mat<double> W = random_matrix<double>(6, 5, 1);
  dora::AdapterConfig c;
  c.rank = 2;
  dora::DoraLinear<double> layer(dora::borrow(W), c);
  const Mat<double> x = random_matrix<double>(3, 5, 2);
  CHECK_THROWS_AS(layer.infer(x), std::logic_error);
  layer.prepare_inference();
  CHECK_NOTHROW(layer.infer(x));
  layer.magnitude()[0] += 1.0;
  CHECK_THROWS_AS(layer.infer(x), std::logic_error);
}

TEST_CASE("Independent layers on one shared W train concurrently", "[threads]") {
  const Mat<double> W = random_matrix<double>(32, 24, 5);
  const Mat<double> x = random_matrix<double>(10, 24, 6);
  const Mat<double> dy = random_matrix<double>(10, 32, 7);
  dora::AdapterConfig c;
  c.rank = 3;
  c.dropout = 0.1;
  c.norm_gradient = dora::NormGradient::exact;
  const auto train = [&](dora::DoraLinear<double>& layer) {
    for (int step = 0; step < 10; ++step) {
      layer.forward(x);
      layer.backward(dy);
      for (dora::Parameter<double>& p : layer.parameters()) p.value -= 1e-3 * p.grad;
      layer.zero_grad();
    }
  };
  dora::DoraLinear<double> reference(dora::borrow(W), c);
  train(reference);
  std::vector<dora::DoraLinear<double>> layers(4, dora::DoraLinear<double>(dora::borrow(W), c));
  std::vector<std::thread> threads;
  for (auto& layer : layers) threads.emplace_back([&] { train(layer); });
  for (std::thread& th : threads) th.join();
  for (const auto& layer : layers) {
    CHECK(layer.lora_A() == reference.lora_A());
    CHECK(layer.magnitude() == reference.magnitude());
  }
}

#ifdef _OPENMP
#include <omp.h>
#endif

TEST_CASE("Small-batch evaluation split over OpenMP threads agrees with one thread", "[threads][openmp]") {
  // At every n the frozen product is split over blocks of W's rows (detail/parallel.hpp). Without
  // OpenMP (the ThreadSanitizer build) both runs take Eigen's product and agree exactly.
  const Mat<float> W = random_matrix<float>(512, 512, 1);  // large enough to be split (kParallelWork)
  const Vec<float> b = random_vector<float>(512, 2);
  dora::AdapterConfig c;
  c.rank = 4;
  dora::DoraLinear<float> dora_layer(dora::borrow(W, b), c, random_matrix<float>(4, 512, 3, 0.3),
                                     random_matrix<float>(512, 4, 4, 0.3));
  dora::LoraLinear<float> lora_layer(dora::borrow(W, b), c, random_matrix<float>(4, 512, 3, 0.3),
                                     random_matrix<float>(512, 4, 4, 0.3));
  dora_layer.prepare_inference();
  lora_layer.eval();
#ifdef _OPENMP
  const int saved = omp_get_max_threads();
#endif
  for (Eigen::Index n : {1, 7, 32, 33}) {
    const Mat<float> x = random_matrix<float>(n, 512, 10 + static_cast<std::uint64_t>(n));
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
    const Mat<float> y1_dora = dora_layer.forward(x), y1_lora = lora_layer.forward(x);
#ifdef _OPENMP
    omp_set_num_threads(3);
#endif
    const Mat<float> y3_dora = dora_layer.forward(x), y3_lora = lora_layer.forward(x);
    const double e_dora = rel_err(y3_dora, y1_dora), e_lora = rel_err(y3_lora, y1_lora);
    std::printf("n = %ld: 3 threads vs 1, relative difference DoRA %.2e, LoRA %.2e\n", static_cast<long>(n), e_dora,
                e_lora);
    // The two thread counts may take different paths (n = 1: one matrix-vector product against
    // three; above 8 rows: Eigen's GEMM on all of W against one GEMM per block of W, whose blocking
    // may sum in another order): float rounding of 512-term sums.
    const double tol = 1e-5;
    CHECK(e_dora <= tol);
    CHECK(e_lora <= tol);
    // infer() splits the same way as the evaluation forward at the same thread count: same bits.
    CHECK(dora_layer.infer(x) == y3_dora);
    CHECK(lora_layer.infer(x) == y3_lora);
  }
#ifdef _OPENMP
  omp_set_num_threads(saved);
#endif
}

TEST_CASE("A training step split over OpenMP threads agrees with one thread", "[threads][openmp]") {
  // Above 8 rows the layers split x W^T over W's rows and G W over its columns, and spread the
  // element-wise passes (compose, dm, G diag(g), the norm's row terms) over rows or columns
  // (detail/parallel.hpp). Two shapes so that every split is taken with 3 threads: 512 x 512 with
  // 512 rows (products, compose, dm), and 4096 x 64 with r = 16 (the norm's row terms over 4096
  // rows). Each output element is still one sum in one thread, but Eigen's blocking of a block of
  // W may differ from that of the whole: double rounding of sums of up to 512 terms.
  struct Shape {
    Eigen::Index d_out, d_in, r, n;
  };
  for (const Shape& s : {Shape{512, 512, 4, 512}, Shape{4096, 64, 16, 64}}) {
    const Mat<double> W = random_matrix<double>(s.d_out, s.d_in, 1);
    const Vec<double> b = random_vector<double>(s.d_out, 2);
    const Mat<double> A = random_matrix<double>(s.r, s.d_in, 3, 0.3), B = random_matrix<double>(s.d_out, s.r, 4, 0.3);
    const Mat<double> x = random_matrix<double>(s.n, s.d_in, 5), dy = random_matrix<double>(s.n, s.d_out, 6);
    dora::AdapterConfig c;
    c.rank = s.r;
    c.norm_gradient = dora::NormGradient::exact;
    struct Result {
      Mat<double> y, dx, gA, gB, gm;
    };
    const auto step = [&](int threads, bool dora_mode) {
#ifdef _OPENMP
      omp_set_num_threads(threads);
#else
      (void)threads;
#endif
      Result out;
      if (dora_mode) {
        dora::DoraLinear<double> layer(dora::borrow(W, b), c, A, B);
        out.y = layer.forward(x);
        out.dx = layer.backward(dy);
        out.gA = layer.grad_lora_A();
        out.gB = layer.grad_lora_B();
        out.gm = layer.grad_magnitude();
      } else {
        dora::LoraLinear<double> layer(dora::borrow(W, b), c, A, B);
        out.y = layer.forward(x);
        out.dx = layer.backward(dy);
        out.gA = layer.grad_lora_A();
        out.gB = layer.grad_lora_B();
        out.gm = Mat<double>::Zero(1, 1);
      }
      return out;
    };
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
#endif
    for (bool dora_mode : {false, true}) {
      const Result one = step(1, dora_mode), three = step(3, dora_mode);
      const double e = std::max({rel_err(three.y, one.y), rel_err(three.dx, one.dx), rel_err(three.gA, one.gA),
                                 rel_err(three.gB, one.gB), rel_err(three.gm, one.gm)});
      std::printf("training step %ld/%ld/%ld/%ld %s: 3 threads vs 1, largest relative difference %.2e\n",
                  static_cast<long>(s.d_out), static_cast<long>(s.d_in), static_cast<long>(s.r), static_cast<long>(s.n),
                  dora_mode ? "DoRA exact" : "LoRA", e);
      CHECK(e <= 1e-13);
    }
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
  }
}

TEST_CASE("A convolution's unfolding and folding split over OpenMP threads agree with one thread",
          "[threads][openmp]") {
  // im2col over (sample, first output axis), col2im over samples (detail in conv.hpp): large enough
  // here for both to be split with 3 threads. The folds are exact copies and sums in one thread
  // each, so the results are bitwise equal.
  dora::ConvGeometry g;
  g.dims = 2;
  g.in_channels = 8;
  g.out_channels = 16;
  g.kernel = {3, 3, 1};
  g.padding = {1, 1, 0};
  g.input = {24, 24, 1};
  const Mat<double> W = random_matrix<double>(16, g.patch_size(), 1);
  const Vec<double> b = random_vector<double>(16, 2);
  const Mat<double> A = random_matrix<double>(4, g.patch_size(), 3, 0.3), B = random_matrix<double>(16, 4, 4, 0.3);
  const Mat<double> x = random_matrix<double>(8, 8 * 24 * 24, 5), dy = random_matrix<double>(8, 16 * 24 * 24, 6);
  dora::AdapterConfig c;
  c.rank = 4;
  c.norm_gradient = dora::NormGradient::exact;
  const auto step = [&](int threads) {
#ifdef _OPENMP
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    dora::DoraConv<double> layer(dora::borrow_conv(W, b, g), c, A, B);
    const Mat<double> y = layer.forward(x);
    const Mat<double> dx = layer.backward(dy);
    return std::make_pair(y, dx);
  };
#ifdef _OPENMP
  const int saved = omp_get_max_threads();
#endif
  const std::pair<Mat<double>, Mat<double>> one = step(1), three = step(3);
#ifdef _OPENMP
  omp_set_num_threads(saved);
#endif
  const double e = std::max(rel_err(three.first, one.first), rel_err(three.second, one.second));
  std::printf("DoRA Conv2d 8 x 24 x 24 -> 16, N = 8: 3 threads vs 1, largest relative difference %.2e\n", e);
  CHECK(e == 0.0);
}
