// Standalone timing driver for machines without Google Benchmark (the PEFT comparison machine):
//   step_driver <d_out> <d_in> <r> <n> <repetitions> [methods...] [--base-dtype f32|bf16|f16|q8|q4]
// methods: base lora dora doraexact doradense (default: all; doradense and baseeigen only with an
// f32 base): one step = forward + backward (dx and all adapter gradients); basefwd lorainfer dorainfer: one evaluation
// forward (the frozen layer alone; LoRA and DoRA in evaluation mode with DoRA's cached norm: the output of infer()).
// base / basefwd use the layers' own products (detail/parallel.hpp, split over threads by the
// layer); baseeigen is the same step with Eigen's products and Eigen's threading.
// --base-dtype: W stored as f32 (default), bf16, f16, Q8_0 or Q4_0 (storage.hpp); compute in fp32.
// For each, one warm-up, then <repetitions> timed runs, fp32; prints one JSON line per method
// with the median and minimum in milliseconds. Threads: OMP_NUM_THREADS.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <dora/dora.hpp>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "base_dtype.hpp"
#include "dense_dora.hpp"
#include "test_support.hpp"

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

struct Problem {
  Eigen::Index d_out, d_in, r, n;
  int reps;
  std::string dtype;
  dora::Vector<S> bias;
  Mat x, dy, A, B;
  dora::AdapterConfig config;
};

// Times every method on a frozen layer whose W is stored as Storage (S itself: the dense Mat).
template <typename Storage>
int run(Problem& p, const dora::BaseLayer<S, Storage>& base, const std::vector<std::string>& methods) {
  Mat y(p.n, p.d_out), dx(p.n, p.d_in);
  const Mat& x = p.x;
  const Mat& dy = p.dy;
  for (const std::string& m : methods) {
    std::vector<double> ms;
    if (m == "base") {
      ms = time_steps(p.reps, [&] {
        dora::detail::frozen_product(x, base.weight, y);
        y.rowwise() += p.bias.transpose();
        dora::detail::split_adjoint_product(dy, base.weight, dx);
      });
    } else if (m == "lora") {
      dora::LoraLinear<S, Storage> layer(base, p.config, p.A, p.B);
      ms = time_steps(p.reps, [&] {
        layer.forward(x, y);
        layer.backward(dy, dx);
      });
    } else if (m == "dora" || m == "doraexact") {
      p.config.norm_gradient = m == "dora" ? dora::NormGradient::detached : dora::NormGradient::exact;
      dora::DoraLinear<S, Storage> layer(base, p.config, p.A, p.B);
      ms = time_steps(p.reps, [&] {
        layer.forward(x, y);
        layer.backward(dy, dx);
      });
    } else if (m == "basefwd") {
      ms = time_steps(p.reps, [&] {
        dora::detail::frozen_product(x, base.weight, y);
        y.rowwise() += p.bias.transpose();
      });
    } else if (m == "lorainfer") {
      dora::LoraLinear<S, Storage> layer(base, p.config, p.A, p.B);
      layer.eval();
      ms = time_steps(p.reps, [&] { layer.forward(x, y); });
    } else if (m == "dorainfer") {
      dora::DoraLinear<S, Storage> layer(base, p.config, p.A, p.B);
      layer.prepare_inference();
      ms = time_steps(p.reps, [&] { layer.forward(x, y); });
    } else if constexpr (std::is_same<Storage, S>::value) {
      if (m == "baseeigen") {
        ms = time_steps(p.reps, [&] {
          y.noalias() = x * base.weight.transpose();
          y.rowwise() += p.bias.transpose();
          dx.noalias() = dy * base.weight;
        });
      } else if (m == "doradense") {
        dora_test::DenseDora<S> layer(base, p.A, p.B, static_cast<S>(p.config.scaling()));
        ms = time_steps(p.reps, [&] {
          layer.forward(x, y);
          layer.backward(dy, dx);
        });
      }
    }
    if (ms.empty()) {
      std::fprintf(stderr, "step_driver: unknown method '%s' (for base dtype %s)\n", m.c_str(), p.dtype.c_str());
      return 2;
    }
    std::printf(
        "{\"impl\": \"dora\", \"method\": \"%s\", \"base_dtype\": \"%s\", \"d_out\": %ld, \"d_in\": %ld, \"r\": %ld, "
        "\"n\": %ld, \"threads\": %d, \"median_ms\": %.3f, \"min_ms\": %.3f, \"reps\": %d}\n",
        m.c_str(), p.dtype.c_str(), static_cast<long>(p.d_out), static_cast<long>(p.d_in), static_cast<long>(p.r),
        static_cast<long>(p.n), Eigen::nbThreads(), ms[ms.size() / 2], ms.front(), p.reps);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args;
  std::string dtype = "f32";
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--base-dtype" && i + 1 < argc)
      dtype = argv[++i];
    else
      args.emplace_back(argv[i]);
  }
  if (args.size() < 5) {
    std::fprintf(stderr, "usage: step_driver <d_out> <d_in> <r> <n> <repetitions> [methods...] [--base-dtype %s]\n",
                 dora_bench::kBaseDtypes);
    return 2;
  }
  Problem p;
  p.d_out = std::atol(args[0].c_str());
  p.d_in = std::atol(args[1].c_str());
  p.r = std::atol(args[2].c_str());
  p.n = std::atol(args[3].c_str());
  p.reps = std::atoi(args[4].c_str());
  p.dtype = dtype;
  std::vector<std::string> methods(args.begin() + 5, args.end());
  if (methods.empty()) {
    methods = {"base", "lora", "dora", "doraexact"};
    if (dtype == "f32") methods.emplace_back("doradense");  // PEFT's algorithm needs a dense W
  }

  p.bias = dora_test::random_vector<S>(p.d_out, 2, 0.02);
  p.x = dora_test::random_matrix<S>(p.n, p.d_in, 3);
  p.dy = dora_test::random_matrix<S>(p.n, p.d_out, 4);
  p.A = dora_test::random_matrix<S>(p.r, p.d_in, 5, 0.02);
  p.B = dora_test::random_matrix<S>(p.d_out, p.r, 6, 0.02);
  p.config.rank = p.r;
  p.config.alpha = 2.0 * static_cast<double>(p.r);
  // The float W exists only while the stored one is made from it.
  Mat W = dora_test::random_matrix<S>(p.d_out, p.d_in, 1, 0.02);
  return dora_bench::with_base_dtype<S>(dtype, "step_driver", [&](auto tag) {
    using Storage = typename decltype(tag)::type;
    if constexpr (std::is_same<Storage, S>::value) {
      return run(p, dora::borrow(W, p.bias), methods);
    } else {
      const std::vector<Storage> stored = dora::encode_weight<Storage>(W);
      W.resize(0, 0);
      return run(p, dora::borrow<S>(stored, p.d_out, p.d_in, p.bias.data()), methods);
    }
  });
}
