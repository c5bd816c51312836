// Peak memory of a few training steps of one method, in its own process so that methods are
// compared without sharing an allocator's high-water mark:
//   dora_memory <base|lora|dora|doraexact|doradense> <d_out> <d_in> <r> <n>
// prints peak_rss_bytes=<N> (getrusage's ru_maxrss of this process), and the sizes to compare it to.

#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <dora/dora.hpp>
#include <string>

#include "../tests/support/dense_dora.hpp"
#include "../tests/test_support.hpp"

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
}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: dora_memory <base|lora|dora|doraexact|doradense> <d_out> <d_in> <r> <n>\n");
    return 2;
  }
  const std::string method = argv[1];
  const Eigen::Index d_out = parse(argv[2], "d_out"), d_in = parse(argv[3], "d_in"), r = parse(argv[4], "r"),
                     n = parse(argv[5], "n");
  const Mat W = dora_test::random_matrix<S>(d_out, d_in, 1, 0.02);
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
  if (method == "base") {
    for (int i = 0; i < 3; ++i) {
      y.noalias() = x * W.transpose();
      dx.noalias() = dy * W;
    }
  } else if (method == "lora") {
    dora::LoraLinear<S> layer(dora::borrow(W), config, A, B);
    steps(layer, x, dy, y, dx);
  } else if (method == "dora" || method == "doraexact") {
    config.norm_gradient = method == "dora" ? dora::NormGradient::detached : dora::NormGradient::exact;
    dora::DoraLinear<S> layer(dora::borrow(W), config, A, B);
    steps(layer, x, dy, y, dx);
  } else if (method == "doradense") {
    dora_test::DenseDora<S> layer(dora::borrow(W), A, B, static_cast<S>(config.scaling()));
    steps(layer, x, dy, y, dx);
  } else {
    std::fprintf(stderr, "dora_memory: unknown method '%s'\n", method.c_str());
    return 2;
  }
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  std::printf("method=%s d_out=%ld d_in=%ld r=%ld n=%ld\n", method.c_str(), static_cast<long>(d_out),
              static_cast<long>(d_in), static_cast<long>(r), static_cast<long>(n));
  std::printf("weight_bytes=%ld activation_bytes=%ld\n", static_cast<long>(W.size() * sizeof(S)),
              static_cast<long>(n * d_out * sizeof(S)));
  std::printf("peak_rss_bytes=%ld\n", usage.ru_maxrss * 1024L);
  return y.allFinite() && dx.allFinite() ? 0 : 1;
}
