// Steady state allocates nothing: after a first forward/backward has sized the workspaces, further
// steps (LoRA, DoRA detached and exact, with and without dropout, evaluation mode with its norm
// cache) run with Eigen's heap allocation forbidden (EIGEN_RUNTIME_NO_MALLOC: any Eigen heap
// allocation aborts with an assertion). One thread: Eigen's multi-threaded product allocates its
// per-thread packing buffers (Eigen's own, not this library's); so does its single-threaded product
// beyond EIGEN_STACK_ALLOCATION_LIMIT (128 KB of packed blocks), hence the moderate sizes here.
#define EIGEN_RUNTIME_NO_MALLOC
#include <stdexcept>
// A forbidden allocation becomes an exception (not an abort), so the test reports it and a second
// test can show that the guard does detect one.
#define eigen_assert(x)                                             \
  do {                                                              \
    if (!(x)) throw std::runtime_error("eigen_assert failed: " #x); \
  } while (false)

#include <catch2/catch.hpp>

#include "test_support.hpp"

using namespace dora_test;

namespace {

struct NoMalloc {
  NoMalloc() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoMalloc() { Eigen::internal::set_is_malloc_allowed(true); }
};

template <typename Layer>
void steady_state(Layer& layer, const Mat<float>& x, const Mat<float>& dy, bool with_backward) {
  Mat<float> y(x.rows(), dy.cols()), dx(x.rows(), x.cols());
  // The first step sizes the workspaces (allowed to allocate).
  layer.forward(x, y);
  if (with_backward) layer.backward(dy, dx);
  {
    NoMalloc guard;
    for (int step = 0; step < 3; ++step) {
      layer.forward(x, y);
      if (with_backward) layer.backward(dy, dx);
      layer.forward(x, y);
      if (with_backward) layer.backward_parameters(dy);
    }
  }
  CHECK(y.allFinite());
  CHECK(dx.allFinite());
}

struct Setup {
  Mat<float> W = random_matrix<float>(48, 40, 1);
  Vec<float> b = random_vector<float>(48, 2);
  Mat<float> x = random_matrix<float>(16, 40, 3);
  Mat<float> dy = random_matrix<float>(16, 48, 4);
  Mat<float> A = random_matrix<float>(4, 40, 5, 0.3);
  Mat<float> B = random_matrix<float>(48, 4, 6, 0.3);
};

dora::AdapterConfig config(double dropout, dora::NormGradient mode) {
  dora::AdapterConfig c;
  c.rank = 4;
  c.dropout = dropout;
  c.norm_gradient = mode;
  return c;
}

}  // namespace

TEST_CASE("Steady-state forward and backward allocate nothing", "[alloc]") {
  Eigen::setNbThreads(1);
  Setup s;
  for (double p : {0.0, 0.2}) {
    INFO("dropout " << p);
    dora::LoraLinear<float> lora(dora::borrow(s.W, s.b), config(p, dora::NormGradient::detached), s.A, s.B);
    steady_state(lora, s.x, s.dy, true);
    for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
      dora::DoraLinear<float> layer(dora::borrow(s.W, s.b), config(p, mode), s.A, s.B);
      steady_state(layer, s.x, s.dy, true);
      layer.eval();
      steady_state(layer, s.x, s.dy, false);
    }
  }
}

TEST_CASE("The no-malloc guard does catch an allocation", "[alloc]") {
  // Without this, the test above could pass because nothing was checked.
  Mat<float> a = random_matrix<float>(8, 8, 1);
  bool caught = false;
  try {
    NoMalloc guard;
    Mat<float> copy = a * a;  // needs a new matrix
    (void)copy;
  } catch (const std::runtime_error& e) {
    INFO(e.what());
    caught = true;
  }
  CHECK(caught);
}
