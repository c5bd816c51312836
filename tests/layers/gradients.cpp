// Gradients against central finite differences, in double.
//  - exact mode (DoRA) and LoRA: the numerical gradient of the layer's own output;
//  - detached mode (DoRA): the numerical gradient of the same function with the row norm held
//    constant, written out densely here (an oracle independent of the library's factored code);
//  - dropout: the mask is held fixed by reseeding the mask generator before every evaluation.
// The objective is f = sum(y .* dy) for a fixed random dy, so df/dy = dy.

#include <catch2/catch.hpp>
#include <functional>
#include <vector>

#include "test_support.hpp"

using namespace dora_test;
using M = Mat<double>;
using V = Vec<double>;

namespace {

struct Shape {
  Eigen::Index d_out, d_in, rank, batch;
};
const std::vector<Shape> kShapes = {{5, 7, 1, 3}, {8, 6, 3, 4}, {12, 20, 4, 5}, {3, 9, 8, 2}};

struct Problem {
  M W, x, dy, A, B;
  V bias;
  dora::AdapterConfig config;
};

Problem make_problem(const Shape& s, std::uint64_t seed, double dropout, dora::NormGradient mode, bool rslora) {
  Problem p;
  p.W = random_matrix<double>(s.d_out, s.d_in, seed);
  p.bias = random_vector<double>(s.d_out, seed + 1);
  p.x = random_matrix<double>(s.batch, s.d_in, seed + 2);
  p.dy = random_matrix<double>(s.batch, s.d_out, seed + 3);
  p.A = random_matrix<double>(s.rank, s.d_in, seed + 4, 0.5);
  p.B = random_matrix<double>(s.d_out, s.rank, seed + 5, 0.5);
  p.config.rank = s.rank;
  p.config.alpha = 2.0 * static_cast<double>(s.rank) + 1.0;
  p.config.use_rslora = rslora;
  p.config.dropout = dropout;
  p.config.norm_gradient = mode;
  p.config.seed = seed;
  return p;
}

constexpr std::uint64_t kMaskSeed = 1234;
constexpr double kStep = 1e-6;
constexpr double kTolerance = 1e-6;

// Central difference of f with respect to every entry of p (p is restored).
template <typename Param>
M numerical_gradient(Param&& p, const std::function<double()>& f) {
  M g(p.rows(), p.cols());
  for (Eigen::Index i = 0; i < p.rows(); ++i)
    for (Eigen::Index j = 0; j < p.cols(); ++j) {
      const double old = p(i, j);
      const double h = kStep * std::max(1.0, std::abs(old));
      p(i, j) = old + h;
      const double fp = f();
      p(i, j) = old - h;
      const double fm = f();
      p(i, j) = old;
      g(i, j) = (fp - fm) / (2.0 * h);
    }
  return g;
}

template <typename Layer>
double layer_objective(Layer& layer, const M& x, const M& dy) {
  layer.seed_dropout(kMaskSeed);
  const M y = layer.forward(x);
  return (y.array() * dy.array()).sum();
}

// DoRA's output with the row norm frozen at n0 (PEFT's dropout semantics), formed densely:
//   y = x W^T + b + (xd V^T) diag(m / n0) - xd W^T,  V = W + s B A,  xd = x .* mask
M dora_frozen_norm_output(const Problem& p, const M& x, const M& A, const M& B, const V& m, const V& n0, double s,
                          const M* mask) {
  const M V_dir = p.W + s * B * A;
  const M xd = mask != nullptr ? M(x.cwiseProduct(*mask)) : x;
  M y = x * p.W.transpose() - xd * p.W.transpose() + (xd * V_dir.transpose()) * m.cwiseQuotient(n0).asDiagonal();
  y.rowwise() += p.bias.transpose();
  return y;
}

void check(const char* what, const M& analytic, const M& numeric) {
  const double err = rel_err(analytic, numeric);
  INFO(what << ": relative error vs central differences = " << err);
  CHECK(err <= kTolerance);
}

void check_lora(const Shape& s, double dropout, bool rslora) {
  Problem p = make_problem(s, 100 + static_cast<std::uint64_t>(s.d_out), dropout, dora::NormGradient::detached, rslora);
  dora::LoraLinear<double> layer(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
  layer.seed_dropout(kMaskSeed);
  layer.forward(p.x);
  const M dx = layer.backward(p.dy);
  M x = p.x;
  const std::function<double()> f_x = [&] { return layer_objective(layer, x, p.dy); };
  const std::function<double()> f = [&] { return layer_objective(layer, p.x, p.dy); };
  check("LoRA dx", dx, numerical_gradient(x, f_x));
  check("LoRA dA", layer.grad_lora_A(), numerical_gradient(layer.lora_A(), f));
  check("LoRA dB", layer.grad_lora_B(), numerical_gradient(layer.lora_B(), f));
}

void check_dora_exact(const Shape& s, double dropout, bool rslora, bool eval_mode = false) {
  Problem p = make_problem(s, 200 + static_cast<std::uint64_t>(s.d_in), dropout, dora::NormGradient::exact, rslora);
  dora::DoraLinear<double> layer(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
  // Evaluation mode takes other paths: the norm is cached between forwards and backward computes
  // W A^T on its own instead of finding it stacked under x W^T.
  if (eval_mode) layer.eval();
  // Move m away from the row norms so that g != 1 and dm, beta are not special.
  layer.magnitude().array() *= 1.0 + 0.3 * random_vector<double>(s.d_out, 7).array();
  layer.seed_dropout(kMaskSeed);
  layer.forward(p.x);
  const M dx = layer.backward(p.dy);
  M x = p.x;
  const std::function<double()> f_x = [&] { return layer_objective(layer, x, p.dy); };
  const std::function<double()> f = [&] { return layer_objective(layer, p.x, p.dy); };
  check("DoRA exact dx", dx, numerical_gradient(x, f_x));
  check("DoRA exact dA", layer.grad_lora_A(), numerical_gradient(layer.lora_A(), f));
  check("DoRA exact dB", layer.grad_lora_B(), numerical_gradient(layer.lora_B(), f));
  check("DoRA exact dm", layer.grad_magnitude(), numerical_gradient(layer.magnitude(), f));
}

void check_dora_detached(const Shape& s, double dropout, bool rslora) {
  Problem p = make_problem(s, 300 + static_cast<std::uint64_t>(s.rank), dropout, dora::NormGradient::detached, rslora);
  dora::DoraLinear<double> layer(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
  layer.magnitude().array() *= 1.0 + 0.3 * random_vector<double>(s.d_out, 8).array();
  layer.seed_dropout(kMaskSeed);
  const M y = layer.forward(p.x);
  const M dx = layer.backward(p.dy);
  const V n0 = layer.row_norm();
  const double sc = layer.scaling();
  const M* mask = dropout > 0 ? &layer.dropout_mask() : nullptr;
  M x = p.x, A = p.A, B = p.B;
  M m = layer.magnitude();
  const auto objective = [&] {
    const M yo = dora_frozen_norm_output(p, x, A, B, m, n0, sc, mask);
    return (yo.array() * p.dy.array()).sum();
  };
  // The oracle is the layer's function: same output at the same point.
  const double same = rel_err(y, dora_frozen_norm_output(p, x, A, B, m, n0, sc, mask));
  INFO("layer output vs dense oracle: " << same);
  REQUIRE(same <= 1e-13);
  check("DoRA detached dx", dx, numerical_gradient(x, objective));
  check("DoRA detached dA", layer.grad_lora_A(), numerical_gradient(A, objective));
  check("DoRA detached dB", layer.grad_lora_B(), numerical_gradient(B, objective));
  check("DoRA detached dm", layer.grad_magnitude(), numerical_gradient(m, objective));
}

}  // namespace

TEST_CASE("LoRA gradients match central differences", "[gradients][lora]") {
  for (const Shape& s : kShapes) {
    INFO("d_out " << s.d_out << " d_in " << s.d_in << " r " << s.rank << " N " << s.batch);
    check_lora(s, 0.0, false);
    check_lora(s, 0.0, true);
  }
}

TEST_CASE("LoRA gradients with dropout match central differences with the mask fixed", "[gradients][lora][dropout]") {
  for (const Shape& s : kShapes) {
    INFO("d_out " << s.d_out << " d_in " << s.d_in << " r " << s.rank << " N " << s.batch);
    check_lora(s, 0.3, false);
  }
}

TEST_CASE("DoRA exact gradients match central differences of the layer output", "[gradients][dora][exact]") {
  for (const Shape& s : kShapes) {
    INFO("d_out " << s.d_out << " d_in " << s.d_in << " r " << s.rank << " N " << s.batch);
    check_dora_exact(s, 0.0, false);
    check_dora_exact(s, 0.0, true);
  }
}

TEST_CASE("DoRA exact gradients in evaluation mode (cached norm) match central differences",
          "[gradients][dora][exact]") {
  for (const Shape& s : kShapes) {
    INFO("d_out " << s.d_out << " d_in " << s.d_in << " r " << s.rank << " N " << s.batch);
    check_dora_exact(s, 0.0, false, true);
  }
}

TEST_CASE("DoRA detached gradients match central differences with the row norm held constant",
          "[gradients][dora][detached]") {
  for (const Shape& s : kShapes) {
    INFO("d_out " << s.d_out << " d_in " << s.d_in << " r " << s.rank << " N " << s.batch);
    check_dora_detached(s, 0.0, false);
    check_dora_detached(s, 0.0, true);
  }
}

TEST_CASE("DoRA gradients with dropout match central differences with the mask fixed", "[gradients][dora][dropout]") {
  for (const Shape& s : kShapes) {
    INFO("d_out " << s.d_out << " d_in " << s.d_in << " r " << s.rank << " N " << s.batch);
    check_dora_exact(s, 0.25, false);
    check_dora_detached(s, 0.25, false);
  }
}

TEST_CASE("Detached and exact gradients differ where the norm depends on A and B", "[gradients][dora]") {
  // Guards against an exact mode that silently detaches: the two must not coincide.
  const Shape s{6, 5, 2, 3};
  Problem p = make_problem(s, 11, 0.0, dora::NormGradient::detached, false);
  dora::DoraLinear<double> detached(dora::borrow(p.W), p.config, p.A, p.B);
  p.config.norm_gradient = dora::NormGradient::exact;
  dora::DoraLinear<double> exact(dora::borrow(p.W), p.config, p.A, p.B);
  detached.forward(p.x);
  detached.backward(p.dy);
  exact.forward(p.x);
  exact.backward(p.dy);
  const double diff = rel_err(detached.grad_lora_A(), exact.grad_lora_A());
  INFO("relative difference of dA between modes: " << diff);
  CHECK(diff > 1e-3);
  CHECK(rel_err(detached.grad_magnitude(), exact.grad_magnitude()) <= 1e-15);
}

template <typename Layer>
void check_accumulation(Layer& layer, const Problem& p) {
  layer.forward(p.x);
  layer.backward(p.dy);
  const M once_A = layer.grad_lora_A();
  const M once_B = layer.grad_lora_B();
  layer.forward(p.x);
  layer.backward(p.dy);
  INFO("dA after two steps vs 2 x one step: " << rel_err(layer.grad_lora_A(), M(2.0 * once_A))
                                              << ", dB: " << rel_err(layer.grad_lora_B(), M(2.0 * once_B)));
  CHECK(rel_err(layer.grad_lora_A(), M(2.0 * once_A)) <= 1e-15);
  CHECK(rel_err(layer.grad_lora_B(), M(2.0 * once_B)) <= 1e-15);
  layer.zero_grad();
  CHECK(layer.grad_lora_A().isZero(0.0));
  CHECK(layer.grad_lora_B().isZero(0.0));
}

TEST_CASE("Gradients accumulate across backward calls until zero_grad", "[gradients]") {
  const Shape s{6, 5, 2, 3};
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
    Problem p = make_problem(s, 12, 0.0, mode, false);
    dora::DoraLinear<double> layer(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
    layer.forward(p.x);
    layer.backward(p.dy);
    const V once_m = layer.grad_magnitude();
    layer.forward(p.x);
    layer.backward(p.dy);
    INFO("dm after two steps vs 2 x one step: " << rel_err(layer.grad_magnitude(), V(2.0 * once_m)));
    CHECK(rel_err(layer.grad_magnitude(), V(2.0 * once_m)) <= 1e-15);
    layer.zero_grad();
    CHECK(layer.grad_magnitude().isZero(0.0));
    check_accumulation(layer, p);
    dora::LoraLinear<double> lora(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
    check_accumulation(lora, p);
  }
}

// backward_parameters(dy) against backward(dy, dx) and against central differences. The two take
// different paths through the exact norm gradient: backward() in training without dropout stacks
// s (diag(beta) B)^T under Gg so that one product with W gives dx's share and dA's, while
// backward_parameters() (no dx) forms dA's share on its own. Dropout and evaluation mode (cached
// norm, no A stacked in forward) take the unstacked path in both.
namespace {

enum class Run { train, train_dropout, eval };

const char* run_name(Run run) {
  switch (run) {
    case Run::train:
      return "training, no dropout";
    case Run::train_dropout:
      return "training, dropout 0.25";
    case Run::eval:
      return "evaluation (dropout 0.25 configured, off)";
  }
  return "";
}

constexpr double kSamePathTolerance = 1e-14;

void check_same(const char* what, const M& params_only, const M& full) {
  const double err = rel_err(params_only, full);
  INFO(what << ": backward_parameters vs backward, relative difference = " << err);
  CHECK(err <= kSamePathTolerance);
}

void check_dora_backward_parameters(const Shape& s, dora::NormGradient mode, Run run) {
  const double dropout = run == Run::train ? 0.0 : 0.25;
  Problem p = make_problem(s, 400 + static_cast<std::uint64_t>(s.d_out + s.rank), dropout, mode, false);
  dora::DoraLinear<double> params_only(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
  dora::DoraLinear<double> full(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
  const V m = params_only.magnitude().array() * (1.0 + 0.3 * random_vector<double>(s.d_out, 9).array());
  params_only.set_magnitude(m);
  full.set_magnitude(m);
  if (run == Run::eval) {
    params_only.eval();
    full.eval();
  }
  params_only.seed_dropout(kMaskSeed);
  full.seed_dropout(kMaskSeed);
  const M y = params_only.forward(p.x);
  REQUIRE(y == full.forward(p.x));  // the same forward
  const bool masked = run == Run::train_dropout;
  if (masked) {
    REQUIRE(params_only.dropout_mask() == full.dropout_mask());
    REQUIRE((params_only.dropout_mask().array() == 0.0).any());
    REQUIRE((params_only.dropout_mask().array() != 0.0).any());
  }
  params_only.backward_parameters(p.dy);
  M dx(s.batch, s.d_in);
  full.backward(p.dy, dx);
  check_same("dA", params_only.grad_lora_A(), full.grad_lora_A());
  check_same("dB", params_only.grad_lora_B(), full.grad_lora_B());
  check_same("dm", params_only.grad_magnitude(), full.grad_magnitude());
  CHECK_FALSE(params_only.has_saved_activations());

  const M dA = params_only.grad_lora_A(), dB = params_only.grad_lora_B();
  const M dm = params_only.grad_magnitude();
  if (mode == dora::NormGradient::exact) {
    const std::function<double()> f = [&] { return layer_objective(params_only, p.x, p.dy); };
    check("backward_parameters exact dA", dA, numerical_gradient(params_only.lora_A(), f));
    check("backward_parameters exact dB", dB, numerical_gradient(params_only.lora_B(), f));
    check("backward_parameters exact dm", dm, numerical_gradient(params_only.magnitude(), f));
  } else {
    const V n0 = params_only.row_norm();
    const double sc = params_only.scaling();
    const M mask = masked ? params_only.dropout_mask() : M();
    M A = p.A, B = p.B, mm = m;
    const std::function<double()> f = [&] {
      const M yo = dora_frozen_norm_output(p, p.x, A, B, mm, n0, sc, masked ? &mask : nullptr);
      return (yo.array() * p.dy.array()).sum();
    };
    const double same = rel_err(y, dora_frozen_norm_output(p, p.x, A, B, mm, n0, sc, masked ? &mask : nullptr));
    INFO("layer output vs dense oracle: " << same);
    REQUIRE(same <= 1e-13);
    check("backward_parameters detached dA", dA, numerical_gradient(A, f));
    check("backward_parameters detached dB", dB, numerical_gradient(B, f));
    check("backward_parameters detached dm", dm, numerical_gradient(mm, f));
  }
}

void check_lora_backward_parameters(const Shape& s, Run run) {
  const double dropout = run == Run::train ? 0.0 : 0.25;
  Problem p = make_problem(s, 500 + static_cast<std::uint64_t>(s.d_in), dropout, dora::NormGradient::detached, false);
  dora::LoraLinear<double> params_only(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
  dora::LoraLinear<double> full(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
  if (run == Run::eval) {
    params_only.eval();
    full.eval();
  }
  params_only.seed_dropout(kMaskSeed);
  full.seed_dropout(kMaskSeed);
  REQUIRE(params_only.forward(p.x) == full.forward(p.x));
  params_only.backward_parameters(p.dy);
  M dx(s.batch, s.d_in);
  full.backward(p.dy, dx);
  check_same("LoRA dA", params_only.grad_lora_A(), full.grad_lora_A());
  check_same("LoRA dB", params_only.grad_lora_B(), full.grad_lora_B());
  CHECK_FALSE(params_only.has_saved_activations());
  const M dA = params_only.grad_lora_A(), dB = params_only.grad_lora_B();
  const std::function<double()> f = [&] { return layer_objective(params_only, p.x, p.dy); };
  check("LoRA backward_parameters dA", dA, numerical_gradient(params_only.lora_A(), f));
  check("LoRA backward_parameters dB", dB, numerical_gradient(params_only.lora_B(), f));
}

}  // namespace

TEST_CASE("DoRA backward_parameters equals backward and central differences, exact and detached",
          "[gradients][dora][backward_parameters]") {
  for (const Shape& s : kShapes)
    for (dora::NormGradient mode : {dora::NormGradient::exact, dora::NormGradient::detached})
      for (Run run : {Run::train, Run::train_dropout, Run::eval}) {
        INFO("d_out " << s.d_out << " d_in " << s.d_in << " r " << s.rank << " N " << s.batch << "; "
                      << (mode == dora::NormGradient::exact ? "exact" : "detached") << "; " << run_name(run));
        check_dora_backward_parameters(s, mode, run);
      }
}

TEST_CASE("LoRA backward_parameters equals backward and central differences",
          "[gradients][lora][backward_parameters]") {
  for (const Shape& s : kShapes)
    for (Run run : {Run::train, Run::train_dropout, Run::eval}) {
      INFO("d_out " << s.d_out << " d_in " << s.d_in << " r " << s.rank << " N " << s.batch << "; " << run_name(run));
      check_lora_backward_parameters(s, run);
    }
}

namespace {

// Forward in one mode, switch, backward: the gradients are those of the forward that ran (its mask
// or its absence), whatever the mode at backward time.
template <typename Layer>
void check_mode_switch(Layer& switched, Layer& steady, const Problem& p, bool train_forward) {
  for (Layer* layer : {&switched, &steady}) {
    layer->train(train_forward);
    layer->seed_dropout(kMaskSeed);
    layer->forward(p.x);
  }
  switched.train(!train_forward);
  const M dx_switched = switched.backward(p.dy);
  const M dx_steady = steady.backward(p.dy);
  const double err_dx = rel_err(dx_switched, dx_steady);
  const double err_dA = rel_err(switched.grad_lora_A(), steady.grad_lora_A());
  const double err_dB = rel_err(switched.grad_lora_B(), steady.grad_lora_B());
  INFO("forward in " << (train_forward ? "training" : "evaluation") << " mode, backward after switching: dx " << err_dx
                     << " dA " << err_dA << " dB " << err_dB);
  CHECK(err_dx <= kSamePathTolerance);
  CHECK(err_dA <= kSamePathTolerance);
  CHECK(err_dB <= kSamePathTolerance);
  switched.zero_grad();
  steady.zero_grad();
}

}  // namespace

TEST_CASE("Backward uses the forward's dropout mask (or none) even if the mode changed in between",
          "[gradients][dropout]") {
  const Shape s{8, 6, 3, 4};
  for (dora::NormGradient mode : {dora::NormGradient::exact, dora::NormGradient::detached}) {
    INFO((mode == dora::NormGradient::exact ? "DoRA exact" : "DoRA detached"));
    Problem p = make_problem(s, 600, 0.25, mode, false);
    dora::DoraLinear<double> switched(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
    dora::DoraLinear<double> steady(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
    const V m = switched.magnitude().array() * (1.0 + 0.3 * random_vector<double>(s.d_out, 10).array());
    switched.set_magnitude(m);
    steady.set_magnitude(m);
    check_mode_switch(switched, steady, p, true);
    check_mode_switch(switched, steady, p, false);
  }
  Problem p = make_problem(s, 601, 0.25, dora::NormGradient::detached, false);
  dora::LoraLinear<double> switched(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
  dora::LoraLinear<double> steady(dora::borrow(p.W, p.bias), p.config, p.A, p.B);
  INFO("LoRA");
  check_mode_switch(switched, steady, p, true);
  check_mode_switch(switched, steady, p, false);
}
