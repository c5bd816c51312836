// Standalone timing driver for machines without Google Benchmark (the PEFT comparison machine):
//   step_driver <d_out> <d_in> <r> <n> <repetitions> [methods...]
// methods: base lora dora doraexact doradense (default: all): one step = forward + backward (dx and
// all adapter gradients); basefwd lorainfer dorainfer: one evaluation forward (the frozen layer
// alone; LoRA and DoRA in evaluation mode with DoRA's cached norm: the output of infer()).
// base / basefwd use the layers' own products (detail/parallel.hpp, split over threads by the
// layer); baseeigen is the same step with Eigen's products and Eigen's threading.
// For each, one warm-up, then <repetitions> timed runs, fp32; prints one JSON line per method
// with the median and minimum in milliseconds. Threads: OMP_NUM_THREADS.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <dora/dora.hpp>
#include <functional>
#include <string>
#include <vector>

#include "../tests/support/dense_dora.hpp"
#include "../tests/test_support.hpp"

namespace {
using S = float;
using Mat = dora::Matrix<S>;

std::vector<double> time_steps(int reps, const std::function<void()>& step) {
  step();  // warm-up: sizes workspaces, faults pages in
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: step_driver <d_out> <d_in> <r> <n> <repetitions> [methods...]\n");
    return 2;
  }
  const Eigen::Index d_out = std::atol(argv[1]), d_in = std::atol(argv[2]), r = std::atol(argv[3]),
                     n = std::atol(argv[4]);
  const int reps = std::atoi(argv[5]);
  std::vector<std::string> methods;
  for (int i = 6; i < argc; ++i) methods.emplace_back(argv[i]);
  if (methods.empty()) methods = {"base", "lora", "dora", "doraexact", "doradense"};

  const Mat W = dora_test::random_matrix<S>(d_out, d_in, 1, 0.02);
  const dora::Vector<S> bias = dora_test::random_vector<S>(d_out, 2, 0.02);
  const Mat x = dora_test::random_matrix<S>(n, d_in, 3);
  const Mat dy = dora_test::random_matrix<S>(n, d_out, 4);
  const Mat A = dora_test::random_matrix<S>(r, d_in, 5, 0.02);
  const Mat B = dora_test::random_matrix<S>(d_out, r, 6, 0.02);
  Mat y(n, d_out), dx(n, d_in);
  dora::AdapterConfig config;
  config.rank = r;
  config.alpha = 2.0 * static_cast<double>(r);

  for (const std::string& m : methods) {
    std::vector<double> ms;
    if (m == "base") {
      ms = time_steps(reps, [&] {
        dora::detail::frozen_product(x, W, y);
        y.rowwise() += bias.transpose();
        dora::detail::split_adjoint_product(dy, W, dx);
      });
    } else if (m == "baseeigen") {
      ms = time_steps(reps, [&] {
        y.noalias() = x * W.transpose();
        y.rowwise() += bias.transpose();
        dx.noalias() = dy * W;
      });
    } else if (m == "lora") {
      dora::LoraLinear<S> layer(dora::borrow(W, bias), config, A, B);
      ms = time_steps(reps, [&] {
        layer.forward(x, y);
        layer.backward(dy, dx);
      });
    } else if (m == "dora" || m == "doraexact") {
      config.norm_gradient = m == "dora" ? dora::NormGradient::detached : dora::NormGradient::exact;
      dora::DoraLinear<S> layer(dora::borrow(W, bias), config, A, B);
      ms = time_steps(reps, [&] {
        layer.forward(x, y);
        layer.backward(dy, dx);
      });
    } else if (m == "basefwd") {
      ms = time_steps(reps, [&] {
        dora::detail::frozen_product(x, W, y);
        y.rowwise() += bias.transpose();
      });
    } else if (m == "lorainfer") {
      dora::LoraLinear<S> layer(dora::borrow(W, bias), config, A, B);
      layer.eval();
      ms = time_steps(reps, [&] { layer.forward(x, y); });
    } else if (m == "dorainfer") {
      dora::DoraLinear<S> layer(dora::borrow(W, bias), config, A, B);
      layer.prepare_inference();
      ms = time_steps(reps, [&] { layer.forward(x, y); });
    } else if (m == "doradense") {
      dora_test::DenseDora<S> layer(dora::borrow(W, bias), A, B, static_cast<S>(config.scaling()));
      ms = time_steps(reps, [&] {
        layer.forward(x, y);
        layer.backward(dy, dx);
      });
    } else {
      std::fprintf(stderr, "step_driver: unknown method '%s'\n", m.c_str());
      return 2;
    }
    std::printf(
        "{\"impl\": \"dora\", \"method\": \"%s\", \"d_out\": %ld, \"d_in\": %ld, \"r\": %ld, \"n\": %ld, "
        "\"threads\": %d, \"median_ms\": %.3f, \"min_ms\": %.3f, \"reps\": %d}\n",
        m.c_str(), static_cast<long>(d_out), static_cast<long>(d_in), static_cast<long>(r), static_cast<long>(n),
        Eigen::nbThreads(), ms[ms.size() / 2], ms.front(), reps);
    std::fflush(stdout);
  }
  return 0;
}
