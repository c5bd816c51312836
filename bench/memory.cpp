// Peak memory of a few training steps of one method, in its own process so that methods are
// compared without sharing an allocator's high-water mark:
//   dora_memory <base|lora|dora|doraexact|doradense> <d_out> <d_in> <r> <n> [--base-dtype f32|bf16|f16|q8|q4]
// prints peak_rss_bytes=<N> (getrusage's ru_maxrss of this process), weight_bytes=<N> (the stored W:
// 4, 2, 2 or 34/32 bytes per entry) and the sizes to compare them to. W is made 64 rows at a time,
// so a narrow base never has a float copy of W in this process either.

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <dora/dora.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "base_dtype.hpp"
#include "dense_dora.hpp"
#include "test_support.hpp"

namespace {
using S = float;
using Mat = dora::Matrix<S>;

long parse(const char* text, const char* what) {
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || v < 1) {
    std::fprintf(stderr, "dora_memory: %s must be a positive integer, got '%s'\n", what, text);
    std::exit(2);
  }
  return v;
}

template <typename Layer>
void steps(Layer& layer, const Mat& x, const Mat& dy, Mat& y, Mat& dx) {
  for (int i = 0; i < 3; ++i) {
    layer.forward(x, y);
    layer.backward(dy, dx);
  }
}

// W (d_out x d_in) stored as Storage, made 64 rows at a time from the seeded generator.
template <typename Storage>
std::vector<Storage> make_weight(Eigen::Index d_out, Eigen::Index d_in) {
  std::vector<Storage> out;
  out.reserve(static_cast<std::size_t>(d_out * (d_in / dora::detail::storage_block<Storage>())));  // no regrowth
  for (Eigen::Index r0 = 0; r0 < d_out; r0 += 64) {
    const Mat chunk = dora_test::random_matrix<S>(std::min<Eigen::Index>(64, d_out - r0), d_in, 1 + r0, 0.02);
    if constexpr (std::is_same<Storage, S>::value) {
      out.insert(out.end(), chunk.data(), chunk.data() + chunk.size());
    } else {
      const std::vector<Storage> encoded = dora::encode_weight<Storage>(chunk);
      out.insert(out.end(), encoded.begin(), encoded.end());
    }
  }
  return out;
}

template <typename Storage>
int run(const std::string& method, const std::string& dtype, Eigen::Index d_out, Eigen::Index d_in, Eigen::Index r,
        Eigen::Index n) {
  const std::vector<Storage> stored = make_weight<Storage>(d_out, d_in);
  const dora::BaseLayer<S, Storage> base(stored.data(), d_out, d_in, d_in / dora::detail::storage_block<Storage>(),
                                         nullptr);
  const Mat x = dora_test::random_matrix<S>(n, d_in, 3);
  const Mat dy = dora_test::random_matrix<S>(n, d_out, 4);
  const Mat A = dora_test::random_matrix<S>(r, d_in, 5, 0.02);
  const Mat B = dora_test::random_matrix<S>(d_out, r, 6, 0.02);
  Mat y(n, d_out), dx(n, d_in);
  y.setZero();
  dx.setZero();
  dora::AdapterConfig config;
  config.rank = r;
  config.alpha = 2.0 * static_cast<double>(r);
  bool known = true;
  if (method == "base") {
    for (int i = 0; i < 3; ++i) {
      dora::detail::frozen_product(x, base.weight, y);
      dora::detail::split_adjoint_product(dy, base.weight, dx);
    }
  } else if (method == "lora") {
    dora::LoraLinear<S, Storage> layer(base, config, A, B);
    steps(layer, x, dy, y, dx);
  } else if (method == "dora" || method == "doraexact") {
    config.norm_gradient = method == "dora" ? dora::NormGradient::detached : dora::NormGradient::exact;
    dora::DoraLinear<S, Storage> layer(base, config, A, B);
    steps(layer, x, dy, y, dx);
  } else if constexpr (std::is_same<Storage, S>::value) {
    if (method == "doradense") {
      dora_test::DenseDora<S> layer(base, A, B, static_cast<S>(config.scaling()));
      steps(layer, x, dy, y, dx);
    } else {
      known = false;
    }
  } else {
    known = false;
  }
  if (!known) {
    std::fprintf(stderr, "dora_memory: unknown method '%s' (for base dtype %s)\n", method.c_str(), dtype.c_str());
    return 2;
  }
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  std::printf("method=%s base_dtype=%s d_out=%ld d_in=%ld r=%ld n=%ld\n", method.c_str(), dtype.c_str(),
              static_cast<long>(d_out), static_cast<long>(d_in), static_cast<long>(r), static_cast<long>(n));
  std::printf("weight_bytes=%ld float_weight_bytes=%ld activation_bytes=%ld\n", static_cast<long>(base.weight_bytes()),
              static_cast<long>(d_out * d_in * sizeof(S)), static_cast<long>(n * d_out * sizeof(S)));
  std::printf("peak_rss_bytes=%ld\n", usage.ru_maxrss * 1024L);
  return y.allFinite() && dx.allFinite() ? 0 : 1;
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
  if (args.size() != 5) {
    std::fprintf(stderr,
                 "usage: dora_memory <base|lora|dora|doraexact|doradense> <d_out> <d_in> <r> <n> "
                 "[--base-dtype %s]\n",
                 dora_bench::kBaseDtypes);
    return 2;
  }
  const Eigen::Index d_out = parse(args[1].c_str(), "d_out"), d_in = parse(args[2].c_str(), "d_in"),
                     r = parse(args[3].c_str(), "r"), n = parse(args[4].c_str(), "n");
  return dora_bench::with_base_dtype<S>(dtype, "dora_memory", [&](auto tag) {
    return run<typename decltype(tag)::type>(args[0], dtype, d_out, d_in, r, n);
  });
}
