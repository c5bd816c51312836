// Parity of Embedding and Conv1d/2d/3d LoRA/DoRA with real PEFT 0.21 (tests/data/layers, made by
// tools/make_layer_reference.py): forward, detached (PEFT) and exact gradients, the magnitude
// initialisation, the norm, merged weights and unmerge. Relative error (max |ours - PEFT| /
// max |PEFT|) <= 1e-12 in double, <= 1e-5 in float, as for Linear.

#include <catch2/catch.hpp>
#include <cstring>
#include <dora/conv.hpp>
#include <dora/embedding.hpp>
#include <dora/io/safetensors.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io_support.hpp"
#include "test_support.hpp"

using namespace dora_test;

namespace {

const std::string kDir = std::string(DORA_TEST_DATA_DIR) + "/layers";

template <typename Scalar>
void check_close(const std::string& what, const std::string& name, const Mat<Scalar>& ours, const Mat<Scalar>& peft,
                 double tol) {
  REQUIRE(ours.rows() == peft.rows());
  REQUIRE(ours.cols() == peft.cols());
  const double err = rel_err(ours, peft);
  std::printf("%-40s %-14s relative error %.2e\n", name.c_str(), what.c_str(), err);
  INFO(name << ": " << what << " relative error vs PEFT = " << err << " (tolerance " << tol << ")");
  CHECK(err <= tol);
}

struct Case {
  nlohmann::json meta;
  dora::io::SafetensorsReader ref;
  std::string name;

  explicit Case(const std::string& n)
      : meta(read_json(kDir + "/" + n + ".json")), ref(kDir + "/" + n + ".safetensors"), name(n) {}

  std::vector<std::int64_t> shape(const std::string& key) const {
    return meta.at("shapes").at(key).get<std::vector<std::int64_t>>();
  }
  bool has(const std::string& key) const { return meta.at("shapes").contains(key); }
  // A tensor as rows x (everything else): its first axis, or 1 row for a magnitude / norm.
  template <typename Scalar>
  Mat<Scalar> rows_first(const std::string& key) const {
    const std::vector<std::int64_t> s = shape(key);
    Eigen::Index total = 1;
    for (std::int64_t d : s) total *= d;
    return ref.reshaped<Scalar>(key, s[0], total / s[0]);
  }
  template <typename Scalar>
  Mat<Scalar> column(const std::string& key) const {  // any shape, as a column vector
    const std::vector<std::int64_t> s = shape(key);
    Eigen::Index total = 1;
    for (std::int64_t d : s) total *= d;
    return ref.reshaped<Scalar>(key, total, 1);
  }
  dora::AdapterConfig config() const {
    dora::AdapterConfig c;
    c.rank = meta.at("r").get<Eigen::Index>();
    c.alpha = meta.at("alpha").get<double>();
    c.use_rslora = meta.at("use_rslora").get<bool>();
    return c;
  }
};

template <typename Scalar>
void run_embedding(const Case& c, double tol) {
  const Mat<Scalar> W = c.rows_first<Scalar>("W"), A = c.rows_first<Scalar>("A"), B = c.rows_first<Scalar>("B");
  const Mat<Scalar> dy = c.rows_first<Scalar>("dy");
  const dora::TokenIds ids =
      Eigen::Map<const dora::TokenIds>(reinterpret_cast<const std::int64_t*>(c.ref.raw("ids")), c.shape("ids")[0]);
  const Eigen::Index pad = c.meta.at("padding_idx").is_null() ? dora::EmbeddingBase<Scalar>::no_padding
                                                              : c.meta.at("padding_idx").get<Eigen::Index>();
  const dora::EmbeddingBase<Scalar> base = dora::borrow_embedding(W, pad);
  dora::AdapterConfig config = c.config();
  if (c.meta.at("kind") == "lora") {
    dora::LoraEmbedding<Scalar> layer(base, config, A, B);
    check_close("y", c.name, layer.forward(ids), c.rows_first<Scalar>("y"), tol);
    layer.backward_parameters(dy);
    check_close("grad_A", c.name, Mat<Scalar>(layer.grad_lora_A()), c.rows_first<Scalar>("grad_A"), tol);
    check_close("grad_B", c.name, Mat<Scalar>(layer.grad_lora_B()), c.rows_first<Scalar>("grad_B"), tol);
    check_close("W_merged", c.name, layer.merged_weight(), c.rows_first<Scalar>("W_merged"), tol);
    check_close("unmerge(merge)", c.name, layer.unmerge(layer.merged_weight()), W, 10 * tol);
    return;
  }
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
    config.norm_gradient = mode;
    const std::string sfx = mode == dora::NormGradient::exact ? "_exact" : "";
    dora::DoraEmbedding<Scalar> layer(base, config, A, B);
    check_close("m_init", c.name, Mat<Scalar>(layer.magnitude()), c.column<Scalar>("m_init"), tol);
    layer.set_magnitude(c.column<Scalar>("m"));
    check_close("y" + sfx, c.name, layer.forward(ids), c.rows_first<Scalar>("y" + sfx), tol);
    check_close("weight_norm", c.name, Mat<Scalar>(layer.row_norm()), c.column<Scalar>("weight_norm"), tol);
    layer.backward_parameters(dy);
    check_close("grad_A" + sfx, c.name, Mat<Scalar>(layer.grad_lora_A()), c.rows_first<Scalar>("grad_A" + sfx), tol);
    check_close("grad_B" + sfx, c.name, Mat<Scalar>(layer.grad_lora_B()), c.rows_first<Scalar>("grad_B" + sfx), tol);
    check_close("grad_m" + sfx, c.name, Mat<Scalar>(layer.grad_magnitude()), c.column<Scalar>("grad_m" + sfx), tol);
    if (mode == dora::NormGradient::detached && pad != dora::EmbeddingBase<Scalar>::no_padding) {
      // PEFT's lookup blocks the gradient of column padding_idx; the detached gradient has no other path.
      CHECK(layer.grad_lora_A().col(pad).cwiseAbs().maxCoeff() == Scalar(0));
    }
    const dora::DoraMerge<Scalar> merged = layer.merge();
    check_close("W_merged", c.name, merged.weight, c.rows_first<Scalar>("W_merged"), tol);
    check_close("unmerge(merge)", c.name, layer.unmerge(merged), W, 10 * tol);
  }
}

dora::ConvGeometry geometry_of(const Case& c) {
  dora::ConvGeometry g;
  const std::vector<std::int64_t> x = c.shape("x");
  g.dims = static_cast<int>(x.size()) - 2;
  g.in_channels = c.meta.at("in_channels").get<Eigen::Index>();
  g.out_channels = c.meta.at("out_channels").get<Eigen::Index>();
  g.groups = c.meta.at("groups").get<Eigen::Index>();
  for (int a = 0; a < g.dims; ++a) {
    g.kernel[a] = c.meta.at("kernel_size")[a].get<Eigen::Index>();
    g.stride[a] = c.meta.at("stride")[a].get<Eigen::Index>();
    g.padding[a] = c.meta.at("padding")[a].get<Eigen::Index>();
    g.dilation[a] = c.meta.at("dilation")[a].get<Eigen::Index>();
    g.input[a] = x[a + 2];
  }
  return g;
}

template <typename Scalar>
void run_conv(const Case& c, double tol) {
  const dora::ConvGeometry g = geometry_of(c);
  // Grouped: PEFT refuses to merge (no W_merged in the data), and so do we, saying why.
  const bool mergeable = g.groups == 1;
  const char* refusal = "cannot be merged: its adapter (lora_A with groups 1) reaches every input channel";
  const Mat<Scalar> W = c.rows_first<Scalar>("W"), A = c.rows_first<Scalar>("A"), B = c.rows_first<Scalar>("B");
  const Mat<Scalar> x = c.rows_first<Scalar>("x"), dy = c.rows_first<Scalar>("dy");
  const Vec<Scalar> bias = c.meta.at("bias").get<bool>() ? Vec<Scalar>(c.column<Scalar>("bias")) : Vec<Scalar>();
  const dora::ConvBase<Scalar> base = bias.size() > 0 ? dora::borrow_conv(W, bias, g) : dora::borrow_conv(W, g);
  dora::AdapterConfig config = c.config();
  if (c.meta.at("kind") == "lora") {
    dora::LoraConv<Scalar> layer(base, config, A, B);
    check_close("y", c.name, layer.forward(x), c.rows_first<Scalar>("y"), tol);
    check_close("grad_x", c.name, layer.backward(dy), c.rows_first<Scalar>("grad_x"), tol);
    check_close("grad_A", c.name, Mat<Scalar>(layer.grad_lora_A()), c.rows_first<Scalar>("grad_A"), tol);
    check_close("grad_B", c.name, Mat<Scalar>(layer.grad_lora_B()), c.rows_first<Scalar>("grad_B"), tol);
    if (mergeable)
      check_close("W_merged", c.name, layer.merged_weight(), c.rows_first<Scalar>("W_merged"), tol);
    else
      CHECK_THROWS_WITH(layer.merged_weight(), Catch::Contains(refusal));
    return;
  }
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
    config.norm_gradient = mode;
    const std::string sfx = mode == dora::NormGradient::exact ? "_exact" : "";
    dora::DoraConv<Scalar> layer(base, config, A, B);
    check_close("m_init", c.name, Mat<Scalar>(layer.magnitude()), c.column<Scalar>("m_init"), tol);
    layer.set_magnitude(c.column<Scalar>("m"));
    check_close("y" + sfx, c.name, layer.forward(x), c.rows_first<Scalar>("y" + sfx), tol);
    check_close("weight_norm", c.name, Mat<Scalar>(layer.row_norm()), c.column<Scalar>("weight_norm"), tol);
    check_close("grad_x" + sfx, c.name, layer.backward(dy), c.rows_first<Scalar>("grad_x" + sfx), tol);
    check_close("grad_A" + sfx, c.name, Mat<Scalar>(layer.grad_lora_A()), c.rows_first<Scalar>("grad_A" + sfx), tol);
    check_close("grad_B" + sfx, c.name, Mat<Scalar>(layer.grad_lora_B()), c.rows_first<Scalar>("grad_B" + sfx), tol);
    check_close("grad_m" + sfx, c.name, Mat<Scalar>(layer.grad_magnitude()), c.column<Scalar>("grad_m" + sfx), tol);
    // The evaluation forward (norm cached by prepare_inference) and infer() give PEFT's y too.
    layer.prepare_inference();
    check_close("eval y" + sfx, c.name, layer.forward(x), c.rows_first<Scalar>("y" + sfx), tol);
    check_close("infer y" + sfx, c.name, layer.infer(x), c.rows_first<Scalar>("y" + sfx), tol);
    if (!mergeable) {
      CHECK_THROWS_WITH(layer.merge(), Catch::Contains(refusal));
      continue;
    }
    const dora::DoraMerge<Scalar> merged = layer.merge();
    check_close("W_merged", c.name, merged.weight, c.rows_first<Scalar>("W_merged"), tol);
    check_close("unmerge(merge)", c.name, layer.unmerge(merged), W, 10 * tol);
  }
}

template <typename Scalar>
void run_case(const std::string& name, double tol) {
  const Case c(name);
  if (c.meta.at("layer") == "embedding")
    run_embedding<Scalar>(c, tol);
  else
    run_conv<Scalar>(c, tol);
}

}  // namespace

TEST_CASE("Every Embedding and Conv case in tests/data/layers agrees with PEFT 0.21", "[peft][parity][layers]") {
  const nlohmann::json index = read_json(kDir + "/index.json");
  REQUIRE(index.size() == 27);
  for (const auto& entry : index) {
    const std::string name = entry.get<std::string>();
    SECTION(name) {
      if (read_json(kDir + "/" + name + ".json").at("dtype") == "float64")
        run_case<double>(name, 1e-12);
      else
        run_case<float>(name, 1e-5);
    }
  }
}

TEST_CASE("Embedding: the detached backward touches only the columns of A the ids hit", "[layers][embedding]") {
  const Mat<double> table = random_matrix<double>(50, 8, 1);
  dora::AdapterConfig config;
  config.rank = 3;
  const Mat<double> A = random_matrix<double>(3, 50, 2), B = random_matrix<double>(8, 3, 3);
  dora::TokenIds ids(6);
  ids << 4, 9, 4, 17, 30, 9;
  const Mat<double> dy = random_matrix<double>(6, 8, 4);
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
    config.norm_gradient = mode;
    dora::DoraEmbedding<double> layer(dora::borrow_embedding(table, 17), config, A, B);
    layer.forward(ids);
    layer.backward_parameters(dy);
    Eigen::Index touched = 0;
    for (Eigen::Index v = 0; v < 50; ++v) touched += layer.grad_lora_A().col(v).cwiseAbs().maxCoeff() != 0.0;
    std::printf("embedding %s: %ld of 50 columns of grad A are nonzero\n",
                mode == dora::NormGradient::exact ? "exact" : "detached", static_cast<long>(touched));
    if (mode == dora::NormGradient::detached) {
      CHECK(touched == 3);  // ids 4, 9, 30; 17 is padding_idx
      CHECK(layer.grad_lora_A().col(17).cwiseAbs().maxCoeff() == 0.0);
    } else {
      CHECK(touched == 50);  // the norm moves with every column of A
    }
  }
}

TEST_CASE("Embedding initialisation is PEFT's: A = 0, B ~ N(0, 1), and the layer starts as the table",
          "[layers][embedding][init]") {
  const Mat<double> table = random_matrix<double>(64, 32, 1);
  dora::AdapterConfig config;
  config.rank = 8;
  config.seed = 5;
  for (dora::Init init : {dora::Init::kaiming_uniform, dora::Init::gaussian}) {
    config.init = init;
    dora::DoraEmbedding<double> layer(dora::borrow_embedding(table), config);
    const Mat<double> B = layer.lora_B();
    const double mean = B.mean();
    const double var = (B.array() - mean).square().sum() / static_cast<double>(B.size() - 1);
    std::printf("embedding init: max|A| = %g, B (32 x 8) mean %.3f variance %.3f\n",
                layer.lora_A().cwiseAbs().maxCoeff(), mean, var);
    CHECK(layer.lora_A().cwiseAbs().maxCoeff() == 0.0);
    CHECK(std::abs(mean) < 0.5);
    CHECK(var > 0.7);  // 256 samples: the sample variance's standard deviation is about 0.09
    CHECK(var < 1.3);
    dora::TokenIds ids(4);
    ids << 0, 63, 7, 7;
    const Mat<double> y = layer.forward(ids);
    for (Eigen::Index t = 0; t < 4; ++t) CHECK(rel_err(y.row(t), table.row(ids[t])) <= 1e-15);
  }
}

TEST_CASE("Conv dropout: one mask drawn on x, shared by every patch that copies an element", "[layers][conv]") {
  dora::ConvGeometry g;
  g.dims = 2;
  g.in_channels = 2;
  g.out_channels = 3;
  g.kernel = {3, 3, 1};
  g.padding = {1, 1, 0};
  g.input = {5, 4, 1};
  const Mat<double> W = Mat<double>::Zero(3, g.patch_size());  // zero kernel: y = s B A unfold(x .* M)
  const Mat<double> A = random_matrix<double>(2, g.patch_size(), 1), B = random_matrix<double>(3, 2, 2);
  const Mat<double> x = random_matrix<double>(3, 2 * 20, 3);
  dora::AdapterConfig config;
  config.rank = 2;
  config.dropout = 0.4;
  dora::LoraConv<double> dropped(dora::borrow_conv(W, g), config, A, B);
  config.dropout = 0.0;
  dora::LoraConv<double> plain(dora::borrow_conv(W, g), config, A, B);
  const Mat<double> y = dropped.forward(x);
  const Mat<double> M = dropped.dropout_mask();
  REQUIRE(M.rows() == x.rows());
  REQUIRE(M.cols() == x.cols());
  const Eigen::Index zeros = (M.array() == 0.0).count();
  const double err = rel_err(y, plain.forward(Mat<double>(x.cwiseProduct(M))));
  std::printf("conv dropout: %ld of %ld mask entries are 0; y vs the undropped layer on x .* M: %.2e\n",
              static_cast<long>(zeros), static_cast<long>(M.size()), err);
  CHECK(zeros > 0);
  CHECK(zeros < M.size());
  CHECK(err <= 1e-14);
}
