// dora's optimizers against torch.optim (tests/data/optim, tools/make_optim_reference.py): 100 steps
// of AdamW / SGD on a fixed gradient sequence, three parameter groups (A; B at 4x the lr, as LoRA+;
// the magnitude without weight decay), clip_grad_norm_ before each step and a warm-up + cosine
// LambdaLR where the case has them. Float within 1e-6 relative, double within 1e-12.

#include <catch2/catch.hpp>
#include <dora/io/safetensors.hpp>
#include <dora/optim.hpp>
#include <string>

#include "io_support.hpp"
#include "test_support.hpp"

using namespace dora_test;

namespace {

const std::string kOptimDir = std::string(DORA_TEST_DATA_DIR) + "/optim";

template <typename Scalar>
void run_optim_case(const std::string& name, const nlohmann::json& c, const nlohmann::json& meta, double tol) {
  const dora::io::SafetensorsReader ref(kOptimDir + "/" + name + ".safetensors");
  const std::vector<std::string> keys{"A", "B", "m"};
  const long steps = meta.at("steps").get<long>();
  // The parameters (flattened) and their gradient buffers.
  std::vector<Vec<Scalar>> value, grad;
  for (const std::string& k : keys) {
    const Mat<Scalar> init = rows_first<Scalar>(ref, "init_" + k);
    value.push_back(Eigen::Map<const Vec<Scalar>>(init.data(), init.size()));
    grad.push_back(Vec<Scalar>::Zero(init.size()));
  }
  std::vector<dora::ParamGroup<Scalar>> groups;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const nlohmann::json& g = c.at("groups")[i];
    groups.push_back({{{keys[i], {value[i].data(), value[i].size()}, {grad[i].data(), grad[i].size()}}},
                      g.at("lr").get<double>(),
                      g.at("weight_decay").get<double>()});
  }
  const nlohmann::json& o = c.at("options");
  const bool adamw = c.at("optimizer") == "adamw";
  dora::AdamWOptions ao;
  dora::SGDOptions so;
  if (adamw) {
    ao.beta1 = o.at("betas")[0].get<double>();
    ao.beta2 = o.at("betas")[1].get<double>();
    ao.eps = o.at("eps").get<double>();
    ao.amsgrad = o.at("amsgrad").get<bool>();
  } else {
    so.momentum = o.at("momentum").get<double>();
    so.dampening = o.at("dampening").get<double>();
    so.nesterov = o.at("nesterov").get<bool>();
  }
  dora::AdamW<Scalar> adam(groups, ao);
  dora::SGD<Scalar> sgd(groups, so);
  std::vector<dora::ParamGroup<Scalar>>& live = adamw ? adam.groups() : sgd.groups();
  const bool clip = !c.at("max_norm").is_null();
  const bool schedule = !c.at("schedule").is_null();
  const dora::WarmupCosine cosine{meta.at("warmup").get<long>(), steps, 0.0};
  std::vector<Mat<Scalar>> all_grads;
  for (const std::string& k : keys) all_grads.push_back(rows_first<Scalar>(ref, "grads_" + k));
  const Mat<double> lr_A = rows_first<double>(ref, "lr_A"), lr_B = rows_first<double>(ref, "lr_B");
  double worst = 0.0, worst_norm = 0.0, worst_lr = 0.0;
  for (long t = 0; t < steps; ++t) {
    for (std::size_t i = 0; i < keys.size(); ++i) grad[i] = all_grads[i].row(t).transpose();
    if (clip) {
      const double total = dora::clip_grad_norm(live, c.at("max_norm").get<double>());
      const double want = rows_first<double>(ref, "total_norm")(t, 0);
      worst_norm = std::max(worst_norm, std::abs(total - want) / want);
    }
    if (schedule) (adamw ? static_cast<dora::detail::Optimizer<Scalar>&>(adam) : sgd).set_lr_factor(cosine(t));
    worst_lr = std::max(worst_lr, std::abs(live[0].lr - lr_A(t, 0)) / lr_A(t, 0));
    worst_lr = std::max(worst_lr, std::abs(live[1].lr - lr_B(t, 0)) / lr_B(t, 0));
    if (adamw)
      adam.step();
    else
      sgd.step();
    for (const long k : meta.at("checkpoints").get<std::vector<long>>()) {
      if (k != t + 1) continue;
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const Mat<Scalar> want = rows_first<Scalar>(ref, "after_" + std::to_string(k) + "_" + keys[i]);
        const double e = rel_err(Mat<Scalar>(value[i].transpose()),
                                 Mat<Scalar>(Eigen::Map<const Mat<Scalar>>(want.data(), 1, want.size())));
        INFO(name << ": parameter " << keys[i] << " after step " << k << ": relative error vs torch " << e);
        CHECK(e <= tol);
        worst = std::max(worst, e);
      }
    }
  }
  std::printf("optim: %-20s worst relative error vs torch over 100 steps %.2e (clip total norm %.2e, lr %.2e)\n",
              name.c_str(), worst, worst_norm, worst_lr);
  CHECK(worst_norm <= tol);
  CHECK(worst_lr <= 1e-15);
}

}  // namespace

TEST_CASE("AdamW and SGD follow torch.optim over 100 steps, with groups, clipping and a schedule", "[optim][torch]") {
  const nlohmann::json meta = read_json(kOptimDir + "/cases.json");
  for (const auto& [name, c] : meta.at("cases").items()) {
    if (c.at("dtype") == "float64")
      run_optim_case<double>(name, c, meta, 1e-12);
    else
      run_optim_case<float>(name, c, meta, 1e-6);
  }
}

TEST_CASE("Optimizer errors name the bad setting", "[optim][errors]") {
  Vec<float> x = Vec<float>::Zero(3), g = Vec<float>::Zero(3);
  std::vector<dora::ParamGroup<float>> groups{{{{"p", {x.data(), 3}, {g.data(), 3}}}, -1.0, 0.0}};
  CHECK_THROWS_WITH(dora::AdamW<float>(groups), Catch::Contains("lr must be finite and >= 0, got -1"));
  groups[0].lr = 1e-3;
  dora::AdamWOptions bad;
  bad.beta2 = 1.0;
  CHECK_THROWS_WITH(dora::AdamW<float>(groups, bad), Catch::Contains("betas must lie in [0, 1)"));
  dora::SGDOptions nest;
  nest.nesterov = true;
  CHECK_THROWS_WITH(dora::SGD<float>(groups, nest), Catch::Contains("nesterov needs momentum > 0"));
  CHECK_THROWS_WITH(dora::clip_grad_norm(groups, 0.0), Catch::Contains("max_norm must be > 0"));
  CHECK_THROWS_WITH((dora::WarmupCosine{5, 5, 0.0}(0)), Catch::Contains("0 <= warmup < total"));
}
