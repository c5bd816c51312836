// dora's optimizers against torch.optim (tests/data/optim, tools/make_optim_reference.py): 100 steps
// of AdamW / SGD on a fixed gradient sequence, three parameter groups (A; B at 4x the lr, as LoRA+;
// the magnitude without weight decay), clip_grad_norm_ before each step and a warm-up + cosine
// LambdaLR where the case has them. Float within 1e-6 relative, double within 1e-12.

#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <dora/io/safetensors.hpp>
#include <dora/optim.hpp>
#include <limits>
#include <string>
#include <vector>

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

namespace {

// torch 2.11's torch/optim/lr_scheduler.py, transcribed step by step (not the closed form that
// WarmupCosine evaluates): SequentialLR([LinearLR(start_factor = 1 / warmup, end_factor = 1,
// total_iters = warmup - 1), CosineAnnealingLR(T_max = total - warmup, eta_min)], milestones =
// [warmup]) on a base lr of 1, so that the lr is the factor. LinearLR's get_lr multiplies the last lr
// by 1 + (end - start) / (total_iters start + (epoch - 1) (end - start)); at the milestone SequentialLR
// calls the cosine's step(0), whose closed form gives the base lr; then CosineAnnealingLR's recursive
// get_lr: lr' = (1 + cos(pi e / T)) / (1 + cos(pi (e - 1) / T)) (lr - eta_min) + eta_min.
// warmup 0: CosineAnnealingLR alone (its first lr is the base lr). Returns the lr of steps 0..total.
std::vector<double> torch_warmup_cosine(long warmup, long total, double eta_min) {
  const double pi = 3.14159265358979323846;
  const long T = total - warmup;
  std::vector<double> lr;
  double current = warmup > 0 ? 1.0 / static_cast<double>(warmup) : 1.0;  // LinearLR's initial step
  const double start = warmup > 0 ? 1.0 / static_cast<double>(warmup) : 1.0, end = 1.0;
  const long total_iters = warmup - 1;
  for (long step = 0; step <= total; ++step) {
    lr.push_back(current);
    const long next = step + 1;
    if (next < warmup) {
      const long e = next;  // LinearLR's last_epoch
      if (e <= total_iters)
        current *= 1.0 + (end - start) /
                             (static_cast<double>(total_iters) * start + static_cast<double>(e - 1) * (end - start));
    } else if (next == warmup) {
      current = eta_min + (1.0 - eta_min) * (1.0 + std::cos(pi * 0.0 / static_cast<double>(T))) / 2.0;
    } else {
      const double e = static_cast<double>(next - warmup);  // CosineAnnealingLR's last_epoch
      current = (1.0 + std::cos(pi * e / static_cast<double>(T))) /
                    (1.0 + std::cos(pi * (e - 1.0) / static_cast<double>(T))) * (current - eta_min) +
                eta_min;
    }
  }
  return lr;
}

}  // namespace

TEST_CASE("WarmupCosine follows torch's LinearLR + CosineAnnealingLR, a non-zero minimum included", "[optim][torch]") {
  double worst = 0.0;
  const std::vector<std::array<double, 3>> schedules{{3, 12, 0.1}, {10, 100, 0.05}, {0, 20, 0.2}, {5, 40, 0.0}};
  for (const std::array<double, 3>& sc : schedules) {
    const dora::WarmupCosine f{static_cast<long>(sc[0]), static_cast<long>(sc[1]), sc[2]};
    const std::vector<double> lr = torch_warmup_cosine(f.warmup, f.total, f.min_factor);
    for (long s = 0; s <= f.total; ++s) {
      const double e = std::abs(f(s) - lr[static_cast<std::size_t>(s)]);
      INFO("warmup " << f.warmup << " total " << f.total << " min " << f.min_factor << " step " << s << ": " << f(s)
                     << " vs torch's recursion " << lr[static_cast<std::size_t>(s)]);
      CHECK(e <= 1e-12);
      worst = std::max(worst, e);
    }
    // After warm-up the factor starts at 1 and ends at the minimum (not at 0), and stays there.
    CHECK(f(f.warmup) == 1.0);
    CHECK(std::abs(f(f.total) - f.min_factor) <= 1e-15);
    CHECK(f(f.total + 7) == f(f.total));
  }
  std::printf("optim: WarmupCosine vs torch's scheduler recursion, %zu schedules: max |difference| %.2e\n",
              schedules.size(), worst);
}

TEST_CASE("clip_grad_norm with an infinite or NaN total scales as torch's does", "[optim][torch]") {
  // torch's clip_grad_norm_(error_if_nonfinite=False) (torch/nn/utils/clip_grad.py) multiplies every
  // gradient by clamp(max_norm / (total + 1e-6), max=1), computed in the gradients' dtype; clamp
  // keeps a NaN. So an infinite total scales by 0 (finite entries 0, the infinite one NaN), a NaN
  // total by NaN, and a huge finite total by a tiny (here subnormal) coefficient.
  const auto run = [&](const char* name, auto special) {
    using Scalar = decltype(special);
    Vec<Scalar> g0 = random_vector<Scalar>(3, 11), g1 = random_vector<Scalar>(4, 12);
    g1[2] = special;
    const Vec<Scalar> before0 = g0, before1 = g1;
    Vec<Scalar> v0 = Vec<Scalar>::Zero(3), v1 = Vec<Scalar>::Zero(4);
    std::vector<dora::Parameter<Scalar>> params{{"p0", {v0.data(), 3}, {g0.data(), 3}},
                                                {"p1", {v1.data(), 4}, {g1.data(), 4}}};
    const double total = dora::clip_grad_norm(params, 1.0);
    const bool finite_total = std::isfinite(static_cast<double>(special));
    if (finite_total) CHECK(std::isfinite(total));
    if (std::isinf(static_cast<double>(special))) CHECK(total == std::numeric_limits<double>::infinity());
    if (std::isnan(static_cast<double>(special))) CHECK(std::isnan(total));
    const Scalar ratio = Scalar(1) / (static_cast<Scalar>(total) + static_cast<Scalar>(1e-6));
    const Scalar coef = std::isnan(static_cast<double>(ratio)) ? ratio : std::min(Scalar(1), ratio);
    long mismatches = 0;
    const auto same = [](Scalar a, Scalar b) { return a == b || (std::isnan(a) && std::isnan(b)); };
    for (Eigen::Index k = 0; k < 3; ++k) mismatches += !same(g0[k], before0[k] * coef);
    for (Eigen::Index k = 0; k < 4; ++k) mismatches += !same(g1[k], before1[k] * coef);
    std::printf("optim: clip_grad_norm, %-12s total %g, coefficient %g: %ld entries differ from torch's rule\n", name,
                total, static_cast<double>(coef), mismatches);
    CHECK(mismatches == 0);
    return coef;
  };
  CHECK(run("inf float", std::numeric_limits<float>::infinity()) == 0.0f);
  CHECK(std::isnan(run("NaN float", std::numeric_limits<float>::quiet_NaN())));
  const float tiny = run("3e38 float", 3e38f);
  CHECK((tiny > 0.0f && tiny < std::numeric_limits<float>::min()));
  CHECK(run("inf double", std::numeric_limits<double>::infinity()) == 0.0);
  CHECK(run("-inf double", -std::numeric_limits<double>::infinity()) == 0.0);
}

TEST_CASE("dora_parameter_groups: no weight decay on magnitudes, B at its ratio, every tensor once", "[optim]") {
  const Mat<float> W = random_matrix<float>(6, 5, 1);
  dora::AdapterConfig c;
  c.rank = 2;
  dora::DoraLinear<float> dora_layer(dora::borrow(W), c);
  dora::LoraEmbedding<float> emb(dora::borrow_embedding(W), c);
  dora::MultiLinear<float> multi(dora::borrow(W));
  multi.add("x", dora::AdapterKind::dora, c);
  multi.add("y", dora::AdapterKind::lora, c);
  std::vector<dora::Parameter<float>> params = dora_layer.parameters();
  for (const dora::Parameter<float>& p : emb.parameters()) params.push_back(p);
  for (const dora::Parameter<float>& p : multi.parameters()) params.push_back(p);
  const std::vector<dora::ParamGroup<float>> groups = dora::dora_parameter_groups(params, 0.5, 0.01, 8.0);
  REQUIRE(groups.size() == 3);
  const auto names = [](const dora::ParamGroup<float>& g) {
    std::vector<std::string> out;
    for (const dora::Parameter<float>& p : g.params) out.push_back(p.name);
    return out;
  };
  using V = std::vector<std::string>;
  CHECK(names(groups[0]) == V{"lora_A", "lora_embedding_A", "lora_A.x", "lora_A.y"});
  CHECK(names(groups[1]) == V{"lora_B", "lora_embedding_B", "lora_B.x", "lora_B.y"});
  CHECK(names(groups[2]) == V{"lora_magnitude_vector", "lora_magnitude_vector.x"});
  CHECK(groups[0].lr == 0.5);
  CHECK(groups[0].weight_decay == 0.01);
  CHECK(groups[1].lr == 0.5 * 8.0);
  CHECK(groups[1].weight_decay == 0.01);
  CHECK(groups[2].lr == 0.5);
  CHECK(groups[2].weight_decay == 0.0);
  // The views alias the layers' own storage.
  CHECK(groups[2].params[0].value.data() == dora_layer.magnitude().data());
  CHECK(groups[1].params[2].value.data() == multi.adapter("x").B.data());
  // A LoRA-only model has no magnitude group.
  CHECK(dora::dora_parameter_groups(emb.parameters(), 0.5, 0.01).size() == 2);
}
