// WORK IN PROGRESS (issue 13): dora::MultiLinear against PEFT 0.21's stacked adapters
// (tests/data/multi, tools/make_multi_adapter_reference.py): forward, PEFT's detached gradients,
// the exact gradients (an independent float64 autograd of the same rule), merge in order.

#include <catch2/catch.hpp>
#include <dora/io/safetensors.hpp>
#include <dora/multi_linear.hpp>
#include <string>

#include "io_support.hpp"
#include "test_support.hpp"

using namespace dora_test;

namespace {

const std::string kMultiDir = std::string(DORA_TEST_DATA_DIR) + "/multi";

template <typename Scalar>
void run_multi_case(const std::string& name, double tol) {
  const nlohmann::json meta = read_json(kMultiDir + "/" + name + ".json");
  const dora::io::SafetensorsReader ref(kMultiDir + "/" + name + ".safetensors");
  const auto mat = [&](const std::string& key) { return ref.matrix<Scalar>(key); };
  const Mat<Scalar> W = mat("W"), x = mat("x"), dy = mat("dy");
  const Vec<Scalar> bias = meta.at("bias").get<bool>() ? Vec<Scalar>(ref.vector<Scalar>("bias")) : Vec<Scalar>();
  const dora::BaseLayer<Scalar> base = bias.size() > 0 ? dora::borrow(W, bias) : dora::borrow(W);
  std::vector<std::string> order = meta.at("order").get<std::vector<std::string>>();
  double worst = 0.0;
  const auto cmp = [&](const std::string& what, const Mat<Scalar>& got, const Mat<Scalar>& want) {
    const double e = rel_err(got, want);
    INFO(name << ": " << what << " relative error vs PEFT " << e << " (tolerance " << tol << ")");
    CHECK(e <= tol);
    worst = std::max(worst, e);
  };
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
    const std::string suffix = mode == dora::NormGradient::exact ? "_exact" : "";
    dora::MultiLinear<Scalar> layer(base);
    for (const nlohmann::json& a : meta.at("adapters")) {
      dora::AdapterConfig c;
      c.rank = a.at("r").get<Eigen::Index>();
      c.alpha = a.at("alpha").get<double>();
      c.use_rslora = a.at("use_rslora").get<bool>();
      c.norm_gradient = mode;
      const std::string n = a.at("name").get<std::string>();
      const bool dora = a.at("kind") == "dora";
      auto& added = layer.add(n, c, dora, mat("A_" + n), mat("B_" + n));
      if (dora) added.m = ref.vector<Scalar>("m_" + n);
    }
    layer.set_active(order);
    Mat<Scalar> y(x.rows(), W.rows()), dx(x.rows(), W.cols());
    layer.forward(x, y);
    cmp("y" + suffix, y, mat("y" + suffix));
    layer.backward(dy, dx);
    cmp("grad_x" + suffix, dx, mat("grad_x" + suffix));
    for (const nlohmann::json& a : meta.at("adapters")) {
      const std::string n = a.at("name").get<std::string>();
      cmp("grad_A_" + n + suffix, layer.adapter(n).grad_A, mat("grad_A_" + n + suffix));
      cmp("grad_B_" + n + suffix, layer.adapter(n).grad_B, mat("grad_B_" + n + suffix));
      if (a.at("kind") == "dora")
        cmp("grad_m_" + n + suffix, Mat<Scalar>(layer.adapter(n).grad_m),
            Mat<Scalar>(ref.vector<Scalar>("grad_m_" + n + suffix)));
    }
    cmp("W_merged", layer.merged_weight(), mat("W_merged"));
    if (meta.contains("row_adapters")) {
      const std::vector<std::string> rows = meta.at("row_adapters").get<std::vector<std::string>>();
      Mat<Scalar> ym(x.rows(), W.rows());
      layer.infer_mixed(x, rows, ym);
      cmp("y_mixed", ym, mat("y_mixed"));
    }
  }
  std::printf("multi: %s: worst relative error vs PEFT %.2e\n", name.c_str(), worst);
}

}  // namespace

TEST_CASE("A mixed batch with DoRA rows: each row is its adapter's own layer", "[multi]") {
  const Mat<double> W = random_matrix<double>(7, 9, 1), x = random_matrix<double>(5, 9, 2);
  const Vec<double> b = random_vector<double>(7, 3);
  dora::MultiLinear<double> layer(dora::borrow(W, b));
  dora::AdapterConfig c;
  c.rank = 3;
  c.alpha = 6;
  const Mat<double> A1 = random_matrix<double>(3, 9, 4), B1 = random_matrix<double>(7, 3, 5);
  const Mat<double> A2 = random_matrix<double>(3, 9, 6), B2 = random_matrix<double>(7, 3, 7);
  layer.add("d", c, true, A1, B1).m.array() *= 1.3;
  layer.add("l", c, false, A2, B2);
  dora::DoraLinear<double> d(dora::borrow(W, b), c, A1, B1);
  d.set_magnitude(layer.adapter("d").m);
  d.eval();
  dora::LoraLinear<double> l(dora::borrow(W, b), c, A2, B2);
  const std::vector<std::string> rows{"d", "__base__", "l", "d", ""};
  Mat<double> y(5, 7);
  layer.infer_mixed(x, rows, y);
  const Mat<double> yd = d.forward(x), yl = l.forward(x);
  const Mat<double> y0 = (x * W.transpose()).rowwise() + b.transpose();
  Mat<double> want(5, 7);
  want << yd.row(0), y0.row(1), yl.row(2), yd.row(3), y0.row(4);
  const double e = rel_err(y, want);
  std::printf("multi: mixed batch with DoRA rows vs the single-adapter layers: %.2e\n", e);
  CHECK(e <= 1e-14);
}

TEST_CASE("Stacked adapters (several active) agree with PEFT 0.21", "[multi][peft]") {
  for (const std::string& name : read_json(kMultiDir + "/index.json").get<std::vector<std::string>>()) {
    if (name.find("_f64") != std::string::npos)
      run_multi_case<double>(name, 1e-12);
    else
      run_multi_case<float>(name, 2e-5);
  }
}
