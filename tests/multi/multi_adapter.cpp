// Several adapters on one frozen layer (dora/multi_adapter.hpp):
// - against PEFT 0.21 (tests/data/multi: Linear, tools/make_multi_adapter_reference.py;
//   tests/data/multi_layers: Conv and Embedding, tools/make_multi_layer_reference.py): the stacked
//   forward, PEFT's detached gradients, the exact gradients (an independent float64 autograd of the
//   same rule, Linear), merge in order, the mixed batch;
// - finite differences (double) of the stacked layer's exact gradients, with dropout;
// - a written-out dense oracle of PEFT's dropout rule, the mixed batch's DoRA rows against the
//   single-adapter layers, unmerge, the registry's errors. (No allocation in steady state:
//   tests/layers/contract.cpp, which builds with EIGEN_RUNTIME_NO_MALLOC.)

#include <algorithm>
#include <catch2/catch.hpp>
#include <dora/io/io.hpp>
#include <dora/multi_adapter.hpp>
#include <functional>
#include <memory>
#include <string>

#include "io_support.hpp"
#include "test_support.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace dora_test;

namespace {

const std::string kMultiDir = std::string(DORA_TEST_DATA_DIR) + "/multi";
const std::string kMultiLayersDir = std::string(DORA_TEST_DATA_DIR) + "/multi_layers";

dora::AdapterConfig config_of(const nlohmann::json& a, dora::NormGradient mode = dora::NormGradient::detached) {
  dora::AdapterConfig c;
  c.rank = a.at("r").get<Eigen::Index>();
  c.alpha = a.at("alpha").get<double>();
  c.use_rslora = a.at("use_rslora").get<bool>();
  c.norm_gradient = mode;
  return c;
}
dora::AdapterKind kind_of(const nlohmann::json& a) {
  return a.at("kind") == "dora" ? dora::AdapterKind::dora : dora::AdapterKind::lora;
}

struct Compare {
  std::string name;
  double tol;
  double worst = 0.0;
  template <typename DA, typename DB>
  void operator()(const std::string& what, const Eigen::MatrixBase<DA>& got, const Eigen::MatrixBase<DB>& want) {
    const double e = rel_err(got, want);
    INFO(name << ": " << what << " relative error vs PEFT " << e << " (tolerance " << tol << ")");
    CHECK(e <= tol);
    worst = std::max(worst, e);
  }
};

template <typename Scalar>
void run_linear_case(const std::string& name, double tol) {
  const nlohmann::json meta = read_json(kMultiDir + "/" + name + ".json");
  const dora::io::SafetensorsReader ref(kMultiDir + "/" + name + ".safetensors");
  const auto mat = [&](const std::string& key) { return ref.matrix<Scalar>(key); };
  const Mat<Scalar> W = mat("W"), x = mat("x"), dy = mat("dy");
  const Vec<Scalar> bias = meta.at("bias").get<bool>() ? Vec<Scalar>(ref.vector<Scalar>("bias")) : Vec<Scalar>();
  const dora::BaseLayer<Scalar> base = bias.size() > 0 ? dora::borrow(W, bias) : dora::borrow(W);
  const std::vector<std::string> order = meta.at("order").get<std::vector<std::string>>();
  Compare cmp{name, tol};
  for (dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
    const std::string sfx = mode == dora::NormGradient::exact ? "_exact" : "";
    dora::MultiLinear<Scalar> layer(base);
    for (const nlohmann::json& a : meta.at("adapters")) {
      const std::string n = a.at("name").get<std::string>();
      auto& added = layer.add(n, kind_of(a), config_of(a, mode), mat("A_" + n), mat("B_" + n));
      if (added.is_dora()) added.m = ref.vector<Scalar>("m_" + n);
    }
    layer.set_active(order);
    Mat<Scalar> y(x.rows(), W.rows()), dx(x.rows(), W.cols());
    layer.forward(x, y);
    cmp("y" + sfx, y, mat("y" + sfx));
    layer.backward(dy, dx);
    cmp("grad_x" + sfx, dx, mat("grad_x" + sfx));
    for (const nlohmann::json& a : meta.at("adapters")) {
      const std::string n = a.at("name").get<std::string>();
      cmp("grad_A_" + n + sfx, layer.adapter(n).grad_A, mat("grad_A_" + n + sfx));
      cmp("grad_B_" + n + sfx, layer.adapter(n).grad_B, mat("grad_B_" + n + sfx));
      if (a.at("kind") == "dora")
        cmp("grad_m_" + n + sfx, layer.adapter(n).grad_m, ref.vector<Scalar>("grad_m_" + n + sfx));
    }
    const dora::MultiMerge<Scalar> merged = layer.merge();
    cmp("W_merged", merged.weight, mat("W_merged"));
    cmp("unmerge(merge) vs W", layer.unmerge(merged), W);
    // The same forward in evaluation mode (cached norms) and after prepare_inference().
    layer.prepare_inference();
    cmp("y (eval)", layer.forward(x), mat("y"));
    if (meta.contains("cat")) {
      // PEFT's add_weighted_adapter(..., "cat"): exact for LoRA; a DoRA adapter is refused (PEFT
      // does not refuse, huggingface/peft#3761).
      const nlohmann::json& cat = meta.at("cat");
      const std::vector<std::string> pair = cat.at("adapters").get<std::vector<std::string>>();
      const std::vector<double> weights = cat.at("weights").get<std::vector<double>>();
      bool any_dora = false;
      for (const std::string& n : pair) any_dora = any_dora || layer.adapter(n).is_dora();
      if (any_dora) {
        CHECK_THROWS_WITH(layer.add_weighted_cat("cat", pair, weights), Catch::Contains("is DoRA"));
      } else if (mode == dora::NormGradient::detached) {
        const auto& c = layer.add_weighted_cat("cat", pair, weights);
        cmp("A_cat", c.A, mat("A_cat"));
        cmp("B_cat", c.B, mat("B_cat"));
        CHECK(c.scaling == static_cast<Scalar>(cat.at("scaling").get<double>()));
        CHECK(c.config.rank == cat.at("r").get<Eigen::Index>());
        // The concatenated adapter is the two stacked LoRA adapters (weights 1).
        layer.set_active(pair);
        const Mat<Scalar> stacked = layer.forward(x);
        layer.set_active({"cat"});
        cmp("cat adapter vs the stacked pair", layer.forward(x), stacked);
      }
    }
    if (meta.contains("row_adapters")) {
      const std::vector<std::string> rows = meta.at("row_adapters").get<std::vector<std::string>>();
      cmp("y_mixed", layer.infer_mixed(x, rows), mat("y_mixed"));
    }
  }
  std::printf("multi: %-24s worst relative error vs PEFT %.2e (tolerance %.0e)\n", name.c_str(), cmp.worst, tol);
}

template <typename Scalar>
void run_layer_case(const std::string& name, double tol) {
  const nlohmann::json meta = read_json(kMultiLayersDir + "/" + name + ".json");
  const dora::io::SafetensorsReader ref(kMultiLayersDir + "/" + name + ".safetensors");
  const auto mat = [&](const std::string& key) { return rows_first<Scalar>(ref, key); };
  const auto vec = [&](const std::string& key) {
    return Vec<Scalar>(ref.reshaped<Scalar>(key, static_cast<Eigen::Index>(ref.info(key).numel()), 1));
  };
  const nlohmann::json& geo = meta.at("geometry");
  const std::vector<std::string> order = meta.at("order").get<std::vector<std::string>>();
  const Mat<Scalar> W = mat("W"), dy = mat("dy");
  Compare cmp{name, tol};
  const auto add_all = [&](auto& layer) {
    for (const nlohmann::json& a : meta.at("adapters")) {
      const std::string n = a.at("name").get<std::string>();
      auto& added = layer.add(n, kind_of(a), config_of(a), mat("A_" + n), mat("B_" + n));
      if (added.is_dora()) added.m = vec("m_" + n);
    }
    layer.set_active(order);
  };
  const auto check_grads = [&](const auto& layer) {
    for (const nlohmann::json& a : meta.at("adapters")) {
      const std::string n = a.at("name").get<std::string>();
      cmp("grad_A_" + n, layer.adapter(n).grad_A, mat("grad_A_" + n));
      cmp("grad_B_" + n, layer.adapter(n).grad_B, mat("grad_B_" + n));
      if (a.at("kind") == "dora") cmp("grad_m_" + n, layer.adapter(n).grad_m, vec("grad_m_" + n));
    }
  };
  if (meta.at("type") == "embedding") {
    const Eigen::Index n = ref.info("ids").shape[0];
    const dora::TokenIds ids =
        Eigen::Map<const dora::TokenIds>(reinterpret_cast<const std::int64_t*>(ref.raw("ids")), n);
    const Eigen::Index pad =
        geo.at("pad").is_null() ? dora::EmbeddingBase<Scalar>::no_padding : geo.at("pad").get<Eigen::Index>();
    dora::MultiEmbedding<Scalar> layer(dora::borrow_embedding(W, pad));
    add_all(layer);
    cmp("y", layer.forward(ids), mat("y"));
    layer.backward_parameters(dy);
    check_grads(layer);
    const dora::MultiMerge<Scalar> merged = layer.merge();
    cmp("W_merged", merged.weight, mat("W_merged"));
    cmp("unmerge(merge) vs W", layer.unmerge(merged), W);
    if (pad != dora::EmbeddingBase<Scalar>::no_padding)
      for (const std::string& a : order) CHECK(layer.adapter(a).grad_A.col(pad).cwiseAbs().maxCoeff() == Scalar(0));
  } else {
    dora::ConvGeometry g;
    const std::vector<Eigen::Index> k = geo.at("k").get<std::vector<Eigen::Index>>();
    g.dims = static_cast<int>(k.size());
    g.in_channels = geo.at("cin").get<Eigen::Index>();
    g.out_channels = geo.at("cout").get<Eigen::Index>();
    for (int a = 0; a < g.dims; ++a) {
      g.kernel[a] = k[static_cast<std::size_t>(a)];
      g.stride[a] = geo.at("stride")[static_cast<std::size_t>(a)].get<Eigen::Index>();
      g.padding[a] = geo.at("pad")[static_cast<std::size_t>(a)].get<Eigen::Index>();
      g.input[a] = geo.at("spatial")[static_cast<std::size_t>(a)].get<Eigen::Index>();
    }
    const Mat<Scalar> x = mat("x");
    const Vec<Scalar> bias = geo.at("bias").get<bool>() ? vec("bias") : Vec<Scalar>();
    const dora::ConvBase<Scalar> base =
        dora::borrow_conv(W.data(), g, bias.size() > 0 ? bias.data() : static_cast<const Scalar*>(nullptr));
    dora::MultiConv<Scalar> layer(base);
    add_all(layer);
    cmp("y", layer.forward(x), mat("y"));
    cmp("grad_x", layer.backward(dy), mat("grad_x"));
    check_grads(layer);
    const dora::MultiMerge<Scalar> merged = layer.merge();
    cmp("W_merged", merged.weight, mat("W_merged"));
    cmp("unmerge(merge) vs W", layer.unmerge(merged), W);
  }
  std::printf("multi: %-24s worst relative error vs PEFT %.2e (tolerance %.0e)\n", name.c_str(), cmp.worst, tol);
}

// ---- finite differences ----

// L(theta) = sum(y . dy) of a fresh forward; checks every parameter's gradient (and dx) against
// central differences. forward_loss runs one forward and returns L; the layer keeps its masks
// fixed by reseeding before each forward (reseed).
template <typename Layer, typename Forward>
double fd_check(Layer& layer, const std::vector<std::string>& names, Forward&& forward_loss, const char* label) {
  double worst = 0.0;
  const double h = 1e-6;
  const auto check = [&](const std::string& what, Eigen::Ref<Mat<double>> param, const Mat<double>& grad) {
    double err = 0.0, scale = 0.0;
    for (Eigen::Index i = 0; i < param.size(); ++i) {
      const double keep = param.data()[i];
      param.data()[i] = keep + h;
      const double lp = forward_loss();
      param.data()[i] = keep - h;
      const double lm = forward_loss();
      param.data()[i] = keep;
      const double fd = (lp - lm) / (2 * h);
      err = std::max(err, std::abs(fd - grad.data()[i]));
      scale = std::max(scale, std::abs(fd));
    }
    const double rel = err / std::max(scale, 1e-300);
    INFO(label << ": " << what << " gradient vs finite differences: " << rel);
    CHECK(rel < 1e-6);
    worst = std::max(worst, rel);
  };
  for (const std::string& n : names) {
    auto& a = layer.adapter(n);
    const Mat<double> gA = a.grad_A, gB = a.grad_B;
    check(n + ".A", a.A, gA);
    check(n + ".B", a.B, gB);
    if (a.is_dora()) {
      const Mat<double> gm = a.grad_m;
      Eigen::Map<Mat<double>> m(a.m.data(), a.m.size(), 1);
      check(n + ".m", m, gm);
    }
  }
  return worst;
}

dora::AdapterConfig fd_config(Eigen::Index r, double alpha, double dropout, bool rslora = false) {
  dora::AdapterConfig c;
  c.rank = r;
  c.alpha = alpha;
  c.use_rslora = rslora;
  c.dropout = dropout;
  c.norm_gradient = dora::NormGradient::exact;
  c.init = dora::Init::user;
  return c;
}

}  // namespace

TEST_CASE("Stacked Linear adapters agree with PEFT 0.21", "[multi][peft]") {
  for (const std::string& name : read_json(kMultiDir + "/index.json").get<std::vector<std::string>>()) {
    if (name.find("_f64") != std::string::npos)
      run_linear_case<double>(name, 1e-12);
    else
      run_linear_case<float>(name, 2e-5);
  }
}

TEST_CASE("Stacked Conv and Embedding adapters agree with PEFT 0.21", "[multi][peft]") {
  for (const std::string& name : read_json(kMultiLayersDir + "/index.json").get<std::vector<std::string>>()) {
    if (name.find("_f64") != std::string::npos)
      run_layer_case<double>(name, 1e-12);
    else
      run_layer_case<float>(name, 2e-5);
  }
}

TEST_CASE("skip_dropout_rows: two shares draw one forward's masks, per adapter (data-parallel training)",
          "[multi][dropout]") {
  // Each layer made three times alike: one forward on the whole batch; the first share then a skip
  // of the second; a skip of the first share then the second. Masks and streams must agree.
  const auto check = [](auto make, const Mat<double>& x, Eigen::Index rows_per_sample, const char* what) {
    auto whole = make(), first = make(), second = make();
    const Eigen::Index h = x.rows() / 2, rest = x.rows() - h;
    whole.forward(x);
    first.forward(Mat<double>(x.topRows(h)));
    first.skip_dropout_rows(rest);
    second.skip_dropout_rows(h);
    second.forward(Mat<double>(x.bottomRows(rest)));
    double err = 0.0;
    for (const char* n : {"l", "d"}) {
      const Mat<double>& m = whole.dropout_mask(n);
      REQUIRE(m.rows() == x.rows() * rows_per_sample);
      CHECK(m.minCoeff() == 0.0);
      err += rel_err(first.dropout_mask(n), Mat<double>(m.topRows(h * rows_per_sample)));
      err += rel_err(second.dropout_mask(n), Mat<double>(m.bottomRows(rest * rows_per_sample)));
      CHECK(first.dropout_state(n) == whole.dropout_state(n));
      CHECK(second.dropout_state(n) == whole.dropout_state(n));
    }
    // An adapter without dropout draws nothing, so skips nothing.
    CHECK(first.dropout_state("z") == whole.dropout_state("z"));
    CHECK(second.dropout_state("z") == whole.dropout_state("z"));
    std::printf("multi: %s, dropout shards vs the whole batch: error %.1e\n", what, err);
    CHECK(err == 0.0);
    // Evaluation mode draws nothing, so skips nothing.
    const std::string before = whole.dropout_state("l");
    whole.eval();
    whole.skip_dropout_rows(4);
    CHECK(whole.dropout_state("l") == before);
    // Nor with the adapters disabled (forward is then the base layer's).
    whole.train();
    whole.enable_adapters(false);
    whole.skip_dropout_rows(4);
    CHECK(whole.dropout_state("l") == before);
  };
  const auto add_two = [](auto& layer, Eigen::Index d_in, Eigen::Index d_out) {
    layer.add("l", dora::AdapterKind::lora, fd_config(2, 3, 0.3), random_matrix<double>(2, d_in, 13),
              random_matrix<double>(d_out, 2, 14));
    layer.add("d", dora::AdapterKind::dora, fd_config(2, 4, 0.25), random_matrix<double>(2, d_in, 15),
              random_matrix<double>(d_out, 2, 16, 0.5));
    layer.add("z", dora::AdapterKind::lora, fd_config(2, 3, 0.0), random_matrix<double>(2, d_in, 17),
              random_matrix<double>(d_out, 2, 18));
    layer.set_active({"l", "z", "d"});
  };
  const Mat<double> W = random_matrix<double>(7, 6, 1);
  check(
      [&]() {
        dora::MultiLinear<double> layer(dora::borrow(W));
        add_two(layer, 6, 7);
        return layer;
      },
      random_matrix<double>(5, 6, 2), 1, "Linear");
  dora::ConvGeometry g;
  g.in_channels = 2;
  g.out_channels = 3;
  g.kernel = {3, 2, 1};
  g.padding = {1, 0, 0};
  g.input = {4, 3, 1};
  const Mat<double> Wc = random_matrix<double>(3, g.weight_cols(), 5);
  check(
      [&]() {
        dora::MultiConv<double> layer(dora::borrow_conv(Wc.data(), g));
        add_two(layer, g.patch_size(), 3);
        return layer;
      },
      random_matrix<double>(4, 2 * 12, 6), g.output_volume(), "Conv2d");
}

TEST_CASE("Stacked adapters' exact gradients match finite differences, with dropout", "[multi][gradient]") {
  // Three adapters, DoRA / LoRA / DoRA, the last two with dropout (PEFT's rule: the DoRA adapter's
  // base part from its dropped input), masks fixed by reseeding before every forward.
  const std::vector<std::string> order{"d1", "l", "d2"};
  const auto add_three = [](auto& layer, Eigen::Index d_in, Eigen::Index d_out) {
    layer.add("d1", dora::AdapterKind::dora, fd_config(3, 6, 0.0), random_matrix<double>(3, d_in, 11),
              random_matrix<double>(d_out, 3, 12, 0.5));
    layer.add("l", dora::AdapterKind::lora, fd_config(2, 3, 0.3, true), random_matrix<double>(2, d_in, 13),
              random_matrix<double>(d_out, 2, 14));
    layer.add("d2", dora::AdapterKind::dora, fd_config(2, 4, 0.25), random_matrix<double>(2, d_in, 15),
              random_matrix<double>(d_out, 2, 16, 0.5));
    layer.adapter("d1").m.array() *= 1.2;
    layer.adapter("d2").m.array() *= 0.9;
    layer.set_active({"d1", "l", "d2"});
  };
  SECTION("Linear") {
    const Mat<double> W = random_matrix<double>(7, 6, 1), x = random_matrix<double>(5, 6, 2);
    const Mat<double> dy = random_matrix<double>(5, 7, 3);
    const Vec<double> b = random_vector<double>(7, 4);
    dora::MultiLinear<double> layer(dora::borrow(W, b));
    add_three(layer, 6, 7);
    const auto loss = [&]() {
      for (const char* n : {"l", "d2"}) layer.seed_dropout(n, 99);
      return layer.forward(x).cwiseProduct(dy).sum();
    };
    loss();
    const Mat<double> dx = layer.backward(dy);
    CHECK(layer.dropout_mask("l").minCoeff() == 0.0);  // the masks did drop something
    const double worst = fd_check(layer, order, loss, "Linear");
    // dx by finite differences too.
    Mat<double> xv = x;
    double err = 0.0, scale = 0.0;
    for (Eigen::Index i = 0; i < xv.size(); ++i) {
      const double keep = xv.data()[i];
      xv.data()[i] = keep + 1e-6;
      for (const char* n : {"l", "d2"}) layer.seed_dropout(n, 99);
      const double lp = layer.forward(xv).cwiseProduct(dy).sum();
      xv.data()[i] = keep - 1e-6;
      for (const char* n : {"l", "d2"}) layer.seed_dropout(n, 99);
      const double lm = layer.forward(xv).cwiseProduct(dy).sum();
      xv.data()[i] = keep;
      err = std::max(err, std::abs((lp - lm) / 2e-6 - dx.data()[i]));
      scale = std::max(scale, std::abs(dx.data()[i]));
    }
    std::printf("multi: Linear, 3 stacked adapters with dropout: worst parameter gradient error %.2e, dx %.2e\n", worst,
                err / scale);
    CHECK(err / scale < 1e-6);
  }
  SECTION("Conv2d") {
    dora::ConvGeometry g;
    g.in_channels = 2;
    g.out_channels = 3;
    g.kernel = {3, 2, 1};
    g.padding = {1, 0, 0};
    g.input = {4, 3, 1};
    const Mat<double> W = random_matrix<double>(3, g.weight_cols(), 5), x = random_matrix<double>(2, 2 * 12, 6);
    const Vec<double> b = random_vector<double>(3, 7);
    dora::MultiConv<double> layer(dora::borrow_conv(W.data(), g, b.data()));
    add_three(layer, g.patch_size(), 3);
    const Mat<double> dy = random_matrix<double>(2, layer.output_cols(), 8);
    const auto loss = [&]() {
      for (const char* n : {"l", "d2"}) layer.seed_dropout(n, 7);
      return layer.forward(x).cwiseProduct(dy).sum();
    };
    loss();
    layer.backward(dy);
    const double worst = fd_check(layer, order, loss, "Conv2d");
    std::printf("multi: Conv2d, 3 stacked adapters with dropout: worst gradient error %.2e\n", worst);
  }
  SECTION("Embedding") {
    const Mat<double> T = random_matrix<double>(9, 5, 9);
    // No padding_idx: PEFT's lookup blocks that column's gradient, which finite differences do see.
    dora::MultiEmbedding<double> layer(dora::borrow_embedding(T));
    add_three(layer, 9, 5);  // dropout is ignored by embeddings, as in PEFT
    dora::TokenIds ids(6);
    ids << 1, 2, 4, 1, 8, 0;
    const Mat<double> dy = random_matrix<double>(6, 5, 10);
    const auto loss = [&]() { return layer.forward(ids).cwiseProduct(dy).sum(); };
    loss();
    layer.backward_parameters(dy);
    const double worst = fd_check(layer, order, loss, "Embedding");
    std::printf("multi: Embedding, 3 stacked adapters: worst gradient error %.2e\n", worst);
  }
}

TEST_CASE("Stacked adapters with dropout follow PEFT's rule, written out densely", "[multi]") {
  const Mat<double> W = random_matrix<double>(6, 5, 21), x = random_matrix<double>(4, 5, 22);
  const Vec<double> b = random_vector<double>(6, 23);
  dora::MultiLinear<double> layer(dora::borrow(W, b));
  dora::AdapterConfig c = fd_config(2, 4, 0.4);
  layer.add("a", dora::AdapterKind::dora, c, random_matrix<double>(2, 5, 24), random_matrix<double>(6, 2, 25));
  layer.add("b", dora::AdapterKind::lora, c, random_matrix<double>(2, 5, 26), random_matrix<double>(6, 2, 27));
  layer.add("c", dora::AdapterKind::dora, c, random_matrix<double>(2, 5, 28), random_matrix<double>(6, 2, 29));
  layer.set_active({"a", "b", "c"});
  const Mat<double> y = layer.forward(x);
  // PEFT 0.21: result = x W^T + b; LoRA: result += s L(x_d); DoRA: result += (g - 1) x_d W^T + g s L(x_d),
  // g from the base W's norm.
  Mat<double> want = (x * W.transpose()).rowwise() + b.transpose();
  for (const char* n : {"a", "b", "c"}) {
    const auto& a = layer.adapter(n);
    const Mat<double> xd = x.cwiseProduct(layer.dropout_mask(n));
    const Mat<double> L = a.scaling * xd * a.A.transpose() * a.B.transpose();
    if (!a.is_dora()) {
      want += L;
      continue;
    }
    const Mat<double> V = W + a.scaling * a.B * a.A;
    const Vec<double> g = a.m.cwiseQuotient(V.rowwise().norm());
    want += ((xd * W.transpose()) * (g.array() - 1).matrix().asDiagonal()) + L * g.asDiagonal();
  }
  const double e = rel_err(y, want);
  std::printf("multi: dropout rule vs the dense oracle: %.2e\n", e);
  CHECK(e <= 1e-14);
}

namespace {

// A MultiLinear with a DoRA adapter "d" (m scaled by 1.3, so that g != 1) and a LoRA adapter "l", and
// the single-adapter layers each of its rows must equal (in evaluation mode).
struct MixedLinear {
  dora::MultiLinear<double> layer;
  dora::DoraLinear<double> d;
  dora::LoraLinear<double> l;
  MixedLinear(const Mat<double>& W, const Vec<double>& b, const dora::AdapterConfig& c, const Mat<double>& A1,
              const Mat<double>& B1, const Mat<double>& A2, const Mat<double>& B2)
      : layer(dora::borrow(W, b)), d(dora::borrow(W, b), c, A1, B1), l(dora::borrow(W, b), c, A2, B2) {
    layer.add("d", dora::AdapterKind::dora, c, A1, B1).m.array() *= 1.3;
    layer.add("l", dora::AdapterKind::lora, c, A2, B2);
    d.set_magnitude(layer.adapter("d").m);
    d.eval();
    l.eval();
  }
};

}  // namespace

TEST_CASE("A mixed batch with DoRA rows: each row is its adapter's own layer", "[multi]") {
  dora::AdapterConfig c;
  c.rank = 3;
  c.alpha = 6;
  const std::vector<std::string> rows{"d", "__base__", "l", "d", ""};
  SECTION("Linear") {
    const Mat<double> W = random_matrix<double>(7, 9, 1), x = random_matrix<double>(5, 9, 2);
    const Vec<double> b = random_vector<double>(7, 3);
    MixedLinear m(W, b, c, random_matrix<double>(3, 9, 4), random_matrix<double>(7, 3, 5),
                  random_matrix<double>(3, 9, 6), random_matrix<double>(7, 3, 7));
    dora::MultiLinear<double>& layer = m.layer;
    dora::DoraLinear<double>& d = m.d;
    dora::LoraLinear<double>& l = m.l;
    CHECK_THROWS_WITH(layer.infer_mixed(x, rows), Catch::Contains("prepare_inference"));
    layer.prepare_inference();
    const Mat<double> y = layer.infer_mixed(x, rows);
    const Mat<double> yd = d.forward(x), yl = l.forward(x);
    const Mat<double> y0 = (x * W.transpose()).rowwise() + b.transpose();
    Mat<double> want(5, 7);
    want << yd.row(0), y0.row(1), yl.row(2), yd.row(3), y0.row(4);
    const double e = rel_err(y, want);
    std::printf("multi: Linear mixed batch with DoRA rows vs the single-adapter layers: %.2e\n", e);
    CHECK(e <= 1e-14);
    CHECK_THROWS_WITH(layer.infer_mixed(x, {"d", "x", "l", "d", ""}), Catch::Contains("row 1 names no adapter: 'x'"));
  }
  SECTION("Conv1d") {
    dora::ConvGeometry g;
    g.dims = 1;
    g.in_channels = 2;
    g.out_channels = 4;
    g.kernel = {3, 1, 1};
    g.padding = {1, 0, 0};
    g.input = {6, 1, 1};
    const Mat<double> W = random_matrix<double>(4, g.weight_cols(), 31), x = random_matrix<double>(5, 12, 32);
    const Vec<double> b = random_vector<double>(4, 33);
    const dora::ConvBase<double> base = dora::borrow_conv(W.data(), g, b.data());
    dora::MultiConv<double> layer(base);
    const Mat<double> A1 = random_matrix<double>(3, 6, 34), B1 = random_matrix<double>(4, 3, 35);
    const Mat<double> A2 = random_matrix<double>(3, 6, 36), B2 = random_matrix<double>(4, 3, 37);
    layer.add("d", dora::AdapterKind::dora, c, A1, B1).m.array() *= 0.8;
    layer.add("l", dora::AdapterKind::lora, c, A2, B2);
    dora::DoraConv<double> d(base, c, A1, B1);
    d.set_magnitude(layer.adapter("d").m);
    d.eval();
    dora::LoraConv<double> l(base, c, A2, B2);
    layer.prepare_inference();
    const Mat<double> y = layer.infer_mixed(x, rows);
    const Mat<double> yd = d.forward(x), yl = l.forward(x);
    dora::MultiConv<double> plain(base);
    const Mat<double> y0 = plain.forward(x);
    Mat<double> want(5, y.cols());
    want << yd.row(0), y0.row(1), yl.row(2), yd.row(3), y0.row(4);
    const double e = rel_err(y, want);
    std::printf("multi: Conv1d mixed batch with DoRA rows vs the single-adapter layers: %.2e\n", e);
    CHECK(e <= 1e-14);
  }
  SECTION("Embedding") {
    const Mat<double> T = random_matrix<double>(8, 6, 41);
    const dora::EmbeddingBase<double> base = dora::borrow_embedding(T);
    dora::MultiEmbedding<double> layer(base);
    const Mat<double> A1 = random_matrix<double>(3, 8, 42), B1 = random_matrix<double>(6, 3, 43);
    const Mat<double> A2 = random_matrix<double>(3, 8, 44), B2 = random_matrix<double>(6, 3, 45);
    layer.add("d", dora::AdapterKind::dora, c, A1, B1).m.array() *= 1.1;
    layer.add("l", dora::AdapterKind::lora, c, A2, B2);
    dora::DoraEmbedding<double> d(base, c, A1, B1);
    d.set_magnitude(layer.adapter("d").m);
    d.eval();
    dora::LoraEmbedding<double> l(base, c, A2, B2);
    dora::TokenIds ids(5);
    ids << 3, 0, 7, 3, 5;
    layer.prepare_inference();
    const Mat<double> y = layer.infer_mixed(ids, rows);
    const Mat<double> yd = d.forward(ids), yl = l.forward(ids);
    Mat<double> want(5, 6);
    want << yd.row(0), T.row(0), yl.row(2), yd.row(3), T.row(5);
    const double e = rel_err(y, want);
    std::printf("multi: Embedding mixed batch with DoRA rows vs the single-adapter layers: %.2e\n", e);
    CHECK(e <= 1e-14);
  }
}

TEST_CASE("Multi-adapter registry: add, remove, activate, disable, and its errors", "[multi][errors]") {
  const Mat<double> W = random_matrix<double>(5, 4, 51), x = random_matrix<double>(3, 4, 52);
  dora::MultiLinear<double> layer(dora::borrow(W));
  dora::AdapterConfig c;
  c.rank = 2;
  c.init = dora::Init::gaussian;
  layer.add("a", dora::AdapterKind::dora, c);
  layer.add("b", dora::AdapterKind::lora, c).B.setConstant(0.5);
  const Mat<double> base_y = x * W.transpose();
  // PEFT's initialisation leaves the layer unchanged (B = 0, m = n).
  layer.set_active({"a"});
  CHECK(rel_err(layer.forward(x), base_y) <= 1e-15);
  layer.set_active({"a", "b"});
  const Mat<double> y_ab = layer.forward(x);
  CHECK(rel_err(y_ab, base_y) > 1e-3);
  layer.enable_adapters(false);
  CHECK(rel_err(layer.forward(x), base_y) == 0.0);
  layer.enable_adapters(true);
  CHECK(rel_err(layer.forward(x), y_ab) == 0.0);
  CHECK_THROWS_WITH(layer.add("a", dora::AdapterKind::lora, c), Catch::Contains("an adapter named 'a' exists already"));
  CHECK_THROWS_WITH(layer.add("__base__", dora::AdapterKind::lora, c), Catch::Contains("cannot be named"));
  CHECK_THROWS_WITH(layer.set_active({"a", "z"}), Catch::Contains("no adapter named 'z'"));
  CHECK_THROWS_WITH(layer.set_active({"a", "a"}), Catch::Contains("named twice"));
  c.init = dora::Init::user;
  CHECK_THROWS_WITH(layer.add("c", dora::AdapterKind::lora, c, Mat<double>(2, 3), Mat<double>(5, 2)),
                    Catch::Contains("adapter 'c': lora_A must be r x d_in = 2 x 4, got 2 x 3"));
  CHECK_THROWS_WITH(layer.add("c", dora::AdapterKind::lora, c, Mat<double>(2, 4), Mat<double>(4, 2)),
                    Catch::Contains("adapter 'c': lora_B must be d_out x r = 5 x 2, got 4 x 2"));
  CHECK_THROWS_WITH(layer.forward(Mat<double>(3, 5)), Catch::Contains("x must be N x d_in = N x 4, got 3 x 5"));
  CHECK_THROWS_WITH(layer.backward(Mat<double>(2, 5)), Catch::Contains("dy must be N x d_out = 3 x 5"));
  layer.remove("a");
  CHECK(layer.active() == std::vector<std::string>{"b"});
  CHECK(layer.adapter_names() == std::vector<std::string>{"b"});
  CHECK_THROWS_WITH(layer.backward(Mat<double>(3, 5)), Catch::Contains("backward needs a forward first"));
  const Mat<double> y_b = layer.forward(x);
  const Mat<double> want =
      base_y + layer.adapter("b").scaling * x * layer.adapter("b").A.transpose() * layer.adapter("b").B.transpose();
  CHECK(rel_err(y_b, want) <= 1e-14);
  CHECK_THROWS_WITH(layer.remove("a"), Catch::Contains("no adapter named 'a'"));
  layer.set_active({});
  CHECK_THROWS_WITH(layer.merge(), Catch::Contains("no active adapter"));
  dora::ConvGeometry g;
  g.in_channels = 4;
  g.out_channels = 4;
  g.groups = 2;
  g.input = {3, 3, 1};
  const Mat<double> Wc = random_matrix<double>(4, g.weight_cols(), 53);
  CHECK_THROWS_WITH(dora::MultiConv<double>(dora::borrow_conv(Wc.data(), g)), Catch::Contains("groups = 2"));
}

TEST_CASE("Multi-adapter layers on a stored W equal them on the W it encodes", "[multi][storage]") {
  // Q8_0 Linear (d_in a multiple of 32) and a bf16 embedding table: the stacked forward, backward,
  // mixed batch and merge against the same layers on the dequantized dense W (double).
  dora::AdapterConfig c;
  c.rank = 3;
  c.alpha = 6;
  c.norm_gradient = dora::NormGradient::exact;
  c.init = dora::Init::user;
  const Mat<double> A1 = random_matrix<double>(3, 64, 71, 0.2), B1 = random_matrix<double>(9, 3, 72, 0.2);
  const Mat<double> A2 = random_matrix<double>(3, 64, 73, 0.2), B2 = random_matrix<double>(9, 3, 74, 0.2);
  const auto setup = [&](auto& layer) {
    layer.add("d", dora::AdapterKind::dora, c, A1, B1).m.array() *= 1.1;
    layer.add("l", dora::AdapterKind::lora, c, A2, B2);
    layer.set_active({"l", "d"});
  };
  {
    const Mat<double> W = random_matrix<double>(9, 64, 75), x = random_matrix<double>(4, 64, 76);
    const Mat<double> dy = random_matrix<double>(4, 9, 77);
    const std::vector<dora::BlockQ8_0> q = dora::encode_weight<dora::BlockQ8_0>(W);
    const Mat<double> Wq = dora::dequantize<double>(dora::borrow<double>(q, 9, 64).weight);
    dora::MultiLinear<double, dora::BlockQ8_0> stored(dora::borrow<double>(q, 9, 64));
    dora::MultiLinear<double> dense(dora::borrow(Wq));
    setup(stored);
    setup(dense);
    double worst = rel_err(stored.forward(x), dense.forward(x));
    worst = std::max(worst, rel_err(stored.backward(dy), dense.backward(dy)));
    for (const char* n : {"d", "l"}) {
      worst = std::max(worst, rel_err(stored.adapter(n).grad_A, dense.adapter(n).grad_A));
      worst = std::max(worst, rel_err(stored.adapter(n).grad_B, dense.adapter(n).grad_B));
    }
    worst = std::max(worst, rel_err(stored.adapter("d").grad_m, dense.adapter("d").grad_m));
    stored.prepare_inference();
    dense.prepare_inference();
    const std::vector<std::string> rows{"d", "", "l", "d"};
    worst = std::max(worst, rel_err(stored.infer_mixed(x, rows), dense.infer_mixed(x, rows)));
    worst = std::max(worst, rel_err(stored.merge().weight, dense.merge().weight));
    std::printf("multi: Q8_0 Linear vs the dense layer on the dequantized W: %.2e\n", worst);
    CHECK(worst <= 1e-13);
  }
  {
    const Mat<double> T = random_matrix<double>(64, 9, 78);
    const dora::Matrix<dora::bfloat16> Tb = dora::round_weight<dora::bfloat16>(T);
    const Mat<double> Td = dora::dequantize<double>(dora::borrow<double>(Tb).weight);
    dora::MultiEmbedding<double, dora::bfloat16> stored(dora::borrow_embedding<double>(Tb.data(), 64, 9));
    dora::MultiEmbedding<double> dense(dora::borrow_embedding(Td));
    setup(stored);
    setup(dense);
    dora::TokenIds ids(5);
    ids << 3, 63, 0, 3, 17;
    const Mat<double> dy = random_matrix<double>(5, 9, 79);
    double worst = rel_err(stored.forward(ids), dense.forward(ids));
    stored.backward_parameters(dy);
    dense.backward_parameters(dy);
    for (const char* n : {"d", "l"})
      worst = std::max(worst, rel_err(stored.adapter(n).grad_A, dense.adapter(n).grad_A));
    worst = std::max(worst, rel_err(stored.merge().weight, dense.merge().weight));
    std::printf("multi: bf16 embedding table vs the dense layer on the same values: %.2e\n", worst);
    CHECK(worst <= 1e-13);
  }
}

TEST_CASE("A stacked DoRA adapter's inactive row: zero output there, finite gradients, dm = 0", "[multi][edge]") {
  // Row 0 of W and of the second adapter's B are zero: that adapter's direction V_0 = 0, so its
  // row 0 is inactive (g_0 = 0, dm_0 = 0), the library's one rule (magnitude.hpp).
  Mat<double> W = random_matrix<double>(5, 4, 81);
  W.row(0).setZero();
  const Mat<double> x = random_matrix<double>(3, 4, 82), dy = random_matrix<double>(3, 5, 83);
  dora::MultiLinear<double> layer(dora::borrow(W));
  dora::AdapterConfig c;
  c.rank = 2;
  c.init = dora::Init::user;
  c.norm_gradient = dora::NormGradient::exact;
  layer.add("a", dora::AdapterKind::dora, c, random_matrix<double>(2, 4, 84), random_matrix<double>(5, 2, 85));
  Mat<double> B = random_matrix<double>(5, 2, 86);
  B.row(0).setZero();
  layer.add("b", dora::AdapterKind::dora, c, random_matrix<double>(2, 4, 87), B).m[0] = 1.5;
  layer.set_active({"a", "b"});
  const Mat<double> y = layer.forward(x);
  const Mat<double> dx = layer.backward(dy);
  std::printf("multi: inactive row of a stacked DoRA adapter: y(:, 0) max |.| %.2e, grad_m_b[0] %.2e\n",
              y.col(0).cwiseAbs().maxCoeff(), layer.adapter("b").grad_m[0]);
  CHECK(y.col(0).cwiseAbs().maxCoeff() == 0.0);
  CHECK(layer.adapter("b").grad_m[0] == 0.0);
  CHECK(dx.allFinite());
  for (const char* n : {"a", "b"}) {
    CHECK(layer.adapter(n).grad_A.allFinite());
    CHECK(layer.adapter(n).grad_B.allFinite());
    CHECK(layer.adapter(n).grad_m.allFinite());
  }
  // Merged: the row is zero, and unmerge gives back 0 there (the single layers' rule).
  const dora::MultiMerge<double> merged = layer.merge();
  CHECK(merged.weight.row(0).cwiseAbs().maxCoeff() == 0.0);
  CHECK(rel_err(layer.unmerge(merged).bottomRows(4), W.bottomRows(4)) <= 1e-14);
}

TEST_CASE("merge_checkpoint stacks adapters on a transposed (embedding) weight as MultiEmbedding::merge does",
          "[multi][merge]") {
  // An embedding's lowered map is the table's transpose, so merge_tensor takes its DoRA column norms
  // over every row block first; a DoRA adapter after a LoRA one checks that it scales what was
  // merged before it there too. Oracle: MultiEmbedding's merge of the same adapters (double).
  const Mat<double> T = random_matrix<double>(40, 8, 91);
  dora::AdapterConfig c;
  c.rank = 2;
  c.alpha = 4;
  c.init = dora::Init::user;
  const Mat<double> A1 = random_matrix<double>(2, 40, 92), B1 = random_matrix<double>(8, 2, 93);
  const Mat<double> A2 = random_matrix<double>(2, 40, 94), B2 = random_matrix<double>(8, 2, 95);
  dora::MultiEmbedding<double> multi(dora::borrow_embedding(T));
  multi.add("first", dora::AdapterKind::lora, c, A1, B1);
  multi.add("second", dora::AdapterKind::dora, c, A2, B2).m.array() *= 1.2;
  multi.set_active({"first", "second"});
  const Mat<double> want = multi.merge().weight;

  TempDir tmp;
  dora::io::SafetensorsWriter base(tmp / "base.safetensors");
  base.add("emb.weight", T, dora::io::Dtype::F64);
  base.finish();
  dora::io::PeftAdapterWriter first(dora::io::Dtype::F64), second(dora::io::Dtype::F64);
  first.add("emb", dora::LoraEmbedding<double>(dora::borrow_embedding(T), c, A1, B1));
  dora::DoraEmbedding<double> d(dora::borrow_embedding(T), c, A2, B2);
  d.set_magnitude(multi.adapter("second").m);
  second.add("emb", d);
  first.write(tmp / "first");
  second.write(tmp / "second");
  dora::io::merge_checkpoint(tmp / "base.safetensors", {tmp / "first", tmp / "second"}, tmp / "merged.safetensors");
  const dora::io::SafetensorsReader got(tmp / "merged.safetensors");
  const double e = rel_err(got.matrix<double>("emb.weight"), want);
  std::printf("multi: merge_checkpoint LoRA then DoRA on an embedding vs MultiEmbedding::merge: %.2e\n", e);
  CHECK(e <= 1e-14);
}

TEST_CASE("A mixed batch where adapters own more than one task's rows equals the per-adapter layers",
          "[multi][threads]") {
  // infer_mixed cuts each adapter's rows into tasks of 64: 153 rows of one adapter (64 + 64 + 25),
  // 70 of another (64 + 6), 6 of the base, interleaved, on 1 and 2 threads.
  dora::AdapterConfig c;
  c.rank = 3;
  c.alpha = 6;
  const Mat<double> W = random_matrix<double>(11, 13, 1);
  const Vec<double> b = random_vector<double>(11, 2);
  MixedLinear m(W, b, c, random_matrix<double>(3, 13, 4), random_matrix<double>(11, 3, 5),
                random_matrix<double>(3, 13, 6), random_matrix<double>(11, 3, 7));
  dora::MultiLinear<double>& layer = m.layer;
  dora::DoraLinear<double>& d = m.d;
  dora::LoraLinear<double>& l = m.l;
  std::vector<std::string> rows;
  for (int t = 0; t < 229; ++t) rows.push_back(t % 3 == 1 && t < 210 ? "l" : t % 25 == 24 ? "" : "d");
  const Eigen::Index n_d = std::count(rows.begin(), rows.end(), "d"), n_l = std::count(rows.begin(), rows.end(), "l");
  REQUIRE(n_d > 128);
  REQUIRE(n_l > 64);
  const Mat<double> x = random_matrix<double>(229, 13, 8);
  const Mat<double> yd = d.forward(x), yl = l.forward(x);
  const Mat<double> y0 = (x * W.transpose()).rowwise() + b.transpose();
  Mat<double> want(229, 11);
  for (int t = 0; t < 229; ++t) want.row(t) = rows[t] == "d" ? yd.row(t) : rows[t] == "l" ? yl.row(t) : y0.row(t);
  layer.prepare_inference();
#ifdef _OPENMP
  const int saved = omp_get_max_threads();
  for (const int threads : {1, 2}) {
    omp_set_num_threads(threads);
#else
  for (const int threads : {1}) {
#endif
    const double e = rel_err(layer.infer_mixed(x, rows), want);
    std::printf("multi: mixed batch of %ld DoRA, %ld LoRA and %ld base rows, %d thread(s), vs the layers: %.2e\n",
                static_cast<long>(n_d), static_cast<long>(n_l), static_cast<long>(229 - n_d - n_l), threads, e);
    CHECK(e <= 1e-14);
  }
#ifdef _OPENMP
  omp_set_num_threads(saved);
#endif
}

TEST_CASE("A negative padding_idx counts from the end, as torch's, on single and multi-adapter embeddings",
          "[multi][embedding]") {
  // torch.nn.Embedding(num, dim, padding_idx=-1) is padding_idx = num - 1: that column of A gets no
  // gradient through the lookup. Against the layer with the positive index (bit for bit) and the
  // layer without padding (every other column the same, the padded one not zero there).
  const Mat<double> T = random_matrix<double>(8, 5, 1);
  dora::AdapterConfig c;
  c.rank = 2;
  c.init = dora::Init::user;
  const Mat<double> A = random_matrix<double>(2, 8, 2), B = random_matrix<double>(5, 2, 3);
  dora::TokenIds ids(6);
  ids << 7, 1, 7, 3, 0, 7;
  const Mat<double> dy = random_matrix<double>(6, 5, 4);
  CHECK(dora::borrow_embedding(T, -1).padding_idx == 7);
  CHECK(dora::borrow_embedding(T, -8).padding_idx == 0);
  CHECK_THROWS_WITH(dora::borrow_embedding(T, -9), Catch::Contains("padding_idx -9"));
  const auto grads = [&](auto&& layer) {
    layer.forward(ids);
    layer.backward_parameters(dy);
    return Mat<double>(layer.grad_lora_A());
  };
  const Mat<double> neg = grads(dora::DoraEmbedding<double>(dora::borrow_embedding(T, -1), c, A, B));
  const Mat<double> pos = grads(dora::DoraEmbedding<double>(dora::borrow_embedding(T, 7), c, A, B));
  const Mat<double> none = grads(dora::DoraEmbedding<double>(dora::borrow_embedding(T), c, A, B));
  CHECK(neg == pos);
  CHECK(neg.col(7).isZero(0.0));
  CHECK(none.col(7).cwiseAbs().maxCoeff() > 1e-3);
  CHECK(neg.leftCols(7) == none.leftCols(7));
  const Mat<double> lneg = grads(dora::LoraEmbedding<double>(dora::borrow_embedding(T, -1), c, A, B));
  CHECK(lneg.col(7).isZero(0.0));
  CHECK(lneg.col(1).cwiseAbs().maxCoeff() > 1e-3);
  // Multi: the padded column of every adapter's A.
  dora::MultiEmbedding<double> multi(dora::borrow_embedding(T, -1));
  multi.add("d", dora::AdapterKind::dora, c, A, B);
  multi.add("l", dora::AdapterKind::lora, c, A, B);
  multi.set_active({"l", "d"});
  multi.forward(ids);
  multi.backward_parameters(dy);
  dora::MultiEmbedding<double> multi_none(dora::borrow_embedding(T));
  multi_none.add("d", dora::AdapterKind::dora, c, A, B);
  multi_none.add("l", dora::AdapterKind::lora, c, A, B);
  multi_none.set_active({"l", "d"});
  multi_none.forward(ids);
  multi_none.backward_parameters(dy);
  for (const char* name : {"d", "l"}) {
    INFO("adapter " << name);
    CHECK(multi.adapter(name).grad_A.col(7).isZero(0.0));
    CHECK(multi_none.adapter(name).grad_A.col(7).cwiseAbs().maxCoeff() > 1e-3);
    CHECK(multi.adapter(name).grad_A.leftCols(7) == multi_none.adapter(name).grad_A.leftCols(7));
  }
  std::printf("multi: padding_idx -1 on an 8-token table: padded column's dA zero on single and multi layers\n");
}

TEST_CASE("Multi-adapter layers in evaluation mode draw no dropout masks", "[multi]") {
  // PEFT's nn.Dropout is the identity in eval(): the output equals the layer without dropout and the
  // adapters' streams do not move (a later training forward draws what it would have drawn).
  dora::AdapterConfig c;
  c.rank = 2;
  c.alpha = 4;
  c.dropout = 0.5;
  c.init = dora::Init::user;
  dora::AdapterConfig no_drop = c;
  no_drop.dropout = 0.0;
  const Mat<double> W = random_matrix<double>(6, 5, 1), x = random_matrix<double>(4, 5, 2);
  const Mat<double> A1 = random_matrix<double>(2, 5, 3), B1 = random_matrix<double>(6, 2, 4);
  const Mat<double> A2 = random_matrix<double>(2, 5, 5), B2 = random_matrix<double>(6, 2, 6);
  const auto make = [&](const dora::AdapterConfig& cfg) {
    auto layer = std::make_unique<dora::MultiLinear<double>>(dora::borrow(W));
    layer->add("d", dora::AdapterKind::dora, cfg, A1, B1);
    layer->add("l", dora::AdapterKind::lora, cfg, A2, B2);
    layer->set_active({"d", "l"});
    return layer;
  };
  const auto layer = make(c);
  const auto plain = make(no_drop);
  const std::string d0 = layer->dropout_state("d"), l0 = layer->dropout_state("l");
  layer->eval();
  plain->eval();
  const Mat<double> y = layer->forward(x);
  CHECK(y == plain->forward(x));
  CHECK(layer->dropout_mask("d").size() == 0);
  CHECK(layer->dropout_mask("l").size() == 0);
  layer->backward_parameters(random_matrix<double>(4, 6, 7));
  CHECK(layer->dropout_state("d") == d0);
  CHECK(layer->dropout_state("l") == l0);
  // In training mode the same layer draws (the check above can fail).
  layer->train();
  layer->forward(x);
  CHECK(layer->dropout_mask("d").size() == x.size());
  CHECK(layer->dropout_state("d") != d0);
}
