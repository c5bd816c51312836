// Every invalid setting and shape throws with a message that names the sizes involved.

#include <catch2/catch.hpp>

#include "test_support.hpp"

using namespace dora_test;
namespace {
// Checks the exception's type and that its message contains the expected text.
template <typename Exception, typename F>
void check_throws(F&& f, const std::string& text) {
  try {
    f();
  } catch (const Exception& e) {
    INFO("message: " << e.what());
    CHECK_THAT(std::string(e.what()), Catch::Matchers::Contains(text));
    return;
  } catch (const std::exception& e) {
    FAIL("wrong exception type: " << e.what());
  }
  FAIL("no exception; expected one containing: " << text);
}
#define CHECK_THROWS_NAMING(expr, Type, text) check_throws<Type>([&] { (void)(expr); }, text)

dora::AdapterConfig config(Eigen::Index r) {
  dora::AdapterConfig c;
  c.rank = r;
  return c;
}
}  // namespace

TEMPLATE_TEST_CASE("Invalid settings throw std::invalid_argument naming the setting", "[errors]", float, double) {
  using S = TestType;
  const Mat<S> W = random_matrix<S>(6, 4, 1);
  dora::AdapterConfig c = config(0);
  CHECK_THROWS_NAMING((dora::DoraLinear<S>(dora::borrow(W), c)), std::invalid_argument, "rank must be >= 1, got 0");
  CHECK_THROWS_NAMING((dora::LoraLinear<S>(dora::borrow(W), c)), std::invalid_argument, "rank");
  c = config(2);
  c.alpha = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_NAMING((dora::DoraLinear<S>(dora::borrow(W), c)), std::invalid_argument, "alpha must be finite");
  c.alpha = std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS((dora::LoraLinear<S>(dora::borrow(W), c)), std::invalid_argument);
  c = config(2);
  c.dropout = 1.0;
  CHECK_THROWS_NAMING((dora::DoraLinear<S>(dora::borrow(W), c)), std::invalid_argument,
                      "dropout must lie in [0, 1), got 1");
  c.dropout = -0.1;
  CHECK_THROWS_AS((dora::LoraLinear<S>(dora::borrow(W), c)), std::invalid_argument);
  c = config(2);
  c.init = dora::Init::user;
  CHECK_THROWS_NAMING((dora::DoraLinear<S>(dora::borrow(W), c)), std::invalid_argument, "Init::user");
}

TEMPLATE_TEST_CASE("Shape mismatches throw std::invalid_argument naming the sizes", "[errors]", float, double) {
  using S = TestType;
  const Mat<S> W = random_matrix<S>(6, 4, 1);
  const Vec<S> bias5 = random_vector<S>(5, 2);
  CHECK_THROWS_NAMING(dora::borrow(W, bias5), std::invalid_argument, "bias has 5 entries but W has d_out = 6");
  const Mat<S> empty(0, 4);
  CHECK_THROWS_NAMING(dora::borrow(empty), std::invalid_argument, "0 x 4");
  // User-supplied A and B of the wrong shape.
  CHECK_THROWS_NAMING((dora::DoraLinear<S>(dora::borrow(W), config(2), Mat<S>::Zero(2, 5), Mat<S>::Zero(6, 2))),
                      std::invalid_argument, "lora_A must be r x d_in = 2 x 4, got 2 x 5");
  CHECK_THROWS_NAMING((dora::LoraLinear<S>(dora::borrow(W), config(2), Mat<S>::Zero(2, 4), Mat<S>::Zero(6, 3))),
                      std::invalid_argument, "lora_B must be d_out x r = 6 x 2, got 6 x 3");

  dora::DoraLinear<S> layer(dora::borrow(W), config(2));
  dora::LoraLinear<S> lora(dora::borrow(W), config(2));
  CHECK_THROWS_NAMING(layer.forward(Mat<S>::Zero(3, 5)), std::invalid_argument,
                      "x must have d_in = 4 columns, got 3 x 5");
  CHECK_THROWS_NAMING(lora.forward(Mat<S>::Zero(3, 5)), std::invalid_argument, "d_in = 4");
  Mat<S> y_wrong = Mat<S>::Zero(3, 5);
  CHECK_THROWS_NAMING(layer.forward(Mat<S>::Zero(3, 4), y_wrong), std::invalid_argument,
                      "y must be N x d_out = 3 x 6, got 3 x 5");
  CHECK_THROWS_NAMING(layer.set_magnitude(Vec<S>::Zero(5)), std::invalid_argument, "d_out = 6 entries, got 5");
  CHECK_THROWS_NAMING(layer.set_lora_B(Mat<S>::Zero(5, 2)), std::invalid_argument, "got 5 x 2");

  // dy with the wrong shape, dx with the wrong shape.
  layer.forward(Mat<S>::Zero(3, 4));
  CHECK_THROWS_NAMING(layer.backward(Mat<S>::Zero(2, 6)), std::invalid_argument,
                      "dy must be N x d_out = 3 x 6 (N from the last forward), got 2 x 6");
  Mat<S> dx_wrong = Mat<S>::Zero(3, 5);
  CHECK_THROWS_NAMING(layer.backward(Mat<S>::Zero(3, 6), dx_wrong), std::invalid_argument,
                      "dx must be N x d_in = 3 x 4, got 3 x 5");
  lora.forward(Mat<S>::Zero(3, 4));
  CHECK_THROWS_NAMING(lora.backward(Mat<S>::Zero(3, 7)), std::invalid_argument, "got 3 x 7");

  // Unmerge of the wrong size.
  CHECK_THROWS_AS(lora.unmerge(Mat<S>::Zero(6, 5)), std::invalid_argument);
  dora::DoraMerge<S> bad = layer.merge();
  bad.scale.resize(3);
  CHECK_THROWS_AS(layer.unmerge(bad), std::invalid_argument);
}

TEST_CASE("Aliased outputs are refused", "[errors]") {
  const Mat<double> W = random_matrix<double>(4, 4, 1);
  dora::DoraLinear<double> layer(dora::borrow(W), config(2));
  Mat<double> xy = random_matrix<double>(3, 4, 2);
  CHECK_THROWS_NAMING(layer.forward(xy, xy), std::invalid_argument, "y must not share memory with x");
  layer.forward(random_matrix<double>(3, 4, 3));
  Mat<double> g = random_matrix<double>(3, 4, 4);
  CHECK_THROWS_NAMING(layer.backward(g, g), std::invalid_argument, "dx must not share memory with dy");
}

TEMPLATE_TEST_CASE("Backward before forward, or twice after one forward, throws std::logic_error", "[errors]", float,
                   double) {
  using S = TestType;
  const Mat<S> W = random_matrix<S>(6, 4, 1);
  dora::DoraLinear<S> layer(dora::borrow(W), config(2));
  dora::LoraLinear<S> lora(dora::borrow(W), config(2));
  CHECK_THROWS_NAMING(layer.backward(Mat<S>::Zero(3, 6)), std::logic_error, "backward needs a forward first");
  CHECK_THROWS_AS(lora.backward(Mat<S>::Zero(3, 6)), std::logic_error);
  CHECK_THROWS_AS(lora.backward_parameters(Mat<S>::Zero(3, 6)), std::logic_error);
  layer.forward(Mat<S>::Zero(3, 4));
  layer.backward(Mat<S>::Zero(3, 6));
  CHECK_THROWS_AS(layer.backward(Mat<S>::Zero(3, 6)), std::logic_error);
  // backward_parameters follows the same rules (exact mode included), and checks dy's shape.
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
    dora::AdapterConfig c = config(2);
    c.norm_gradient = mode;
    dora::DoraLinear<S> fresh(dora::borrow(W), c);
    CHECK_THROWS_NAMING(fresh.backward_parameters(Mat<S>::Zero(3, 6)), std::logic_error,
                        "backward needs a forward first");
    fresh.forward(Mat<S>::Zero(3, 4));
    CHECK_THROWS_NAMING(fresh.backward_parameters(Mat<S>::Zero(3, 5)), std::invalid_argument,
                        "dy must be N x d_out = 3 x 6 (N from the last forward), got 3 x 5");
    fresh.backward_parameters(Mat<S>::Zero(3, 6));
    CHECK_THROWS_AS(fresh.backward_parameters(Mat<S>::Zero(3, 6)), std::logic_error);
    CHECK_THROWS_AS(fresh.backward(Mat<S>::Zero(3, 6)), std::logic_error);
  }
  lora.forward(Mat<S>::Zero(3, 4));
  lora.backward_parameters(Mat<S>::Zero(3, 6));
  CHECK_THROWS_AS(lora.backward_parameters(Mat<S>::Zero(3, 6)), std::logic_error);
}

TEMPLATE_TEST_CASE("row_norm and row_norm_dense refuse factors of the wrong size, naming the sizes", "[errors]", float,
                   double) {
  using S = TestType;
  using ColMajor = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  const Mat<S> W = random_matrix<S>(6, 4, 1);
  const Mat<S> A = random_matrix<S>(2, 4, 2), B = random_matrix<S>(6, 2, 3);
  const S s = S(0.5);
  CHECK_THROWS_NAMING(dora::row_norm(W, Mat<S>(Mat<S>::Zero(2, 5)), B, s), std::invalid_argument,
                      "row_norm: W is 6 x 4, A is 2 x 5, B is 6 x 2");
  CHECK_THROWS_NAMING(dora::row_norm(W, A, Mat<S>(Mat<S>::Zero(5, 2)), s), std::invalid_argument,
                      "row_norm: W is 6 x 4, A is 2 x 4, B is 5 x 2");
  CHECK_THROWS_NAMING(dora::row_norm(W, A, Mat<S>(Mat<S>::Zero(6, 3)), s), std::invalid_argument, "B is 6 x 3");
  // The same message through a Map, a column-major W and an expression.
  const Eigen::Map<const Mat<S>> W_map(W.data(), 4, 6);
  CHECK_THROWS_NAMING(dora::row_norm(W_map, A, B, s), std::invalid_argument, "row_norm: W is 4 x 6, A is 2 x 4");
  const ColMajor W_col = W.transpose();
  CHECK_THROWS_NAMING(dora::row_norm(W_col, A, B, s), std::invalid_argument, "row_norm: W is 4 x 6");
  CHECK_THROWS_NAMING(dora::row_norm(W, A.leftCols(3), B * S(2), s), std::invalid_argument, "A is 2 x 3, B is 6 x 2");
  CHECK_THROWS_NAMING(dora::row_norm_dense(W, A.leftCols(3), B, s), std::invalid_argument,
                      "row_norm_dense: W is 6 x 4, A is 2 x 3, B is 6 x 2");
  CHECK_THROWS_NAMING(dora::row_norm_dense(W_col, A, B, s), std::invalid_argument, "row_norm_dense: W is 4 x 6");
}
