// Training checkpoints (dora/io/checkpoint.hpp): a run resumed from a checkpoint continues bit for
// bit like the uninterrupted run (two DoRA layers with dropout, AdamW with parameter groups,
// clipping and a warm-up + cosine schedule); a corrupt or mismatched checkpoint is refused and
// changes nothing; an existing checkpoint is never overwritten.

#include <catch2/catch.hpp>
#include <dora/io/checkpoint.hpp>
#include <dora/io/peft_adapter.hpp>
#include <fstream>
#include <memory>
#include <string>

#include "io_support.hpp"
#include "test_support.hpp"

using namespace dora_test;

namespace {

// Two adapted layers on borrowed weights, an optimizer over their parameters, and a fixed data
// sequence: step t trains on x_t, dy_t (seeded by t).
struct Trainer {
  const Mat<float>& W1;
  const Vec<float>& b1;
  const Mat<float>& W2;
  std::unique_ptr<dora::DoraLinear<float>> dora;
  std::unique_ptr<dora::DoraLinear<float>> lora;  // PEFT: use_dora is one setting per adapter
  std::unique_ptr<dora::AdamW<float>> opt;
  dora::WarmupCosine schedule{3, 12, 0.1};

  void make_optimizer() {
    std::vector<dora::Parameter<float>> params = dora->parameters();
    for (dora::Parameter<float>& p : lora->parameters()) params.push_back(p);
    dora::AdamWOptions o;
    o.amsgrad = true;
    opt = std::make_unique<dora::AdamW<float>>(dora::dora_parameter_groups(params, 1e-2, 0.05, 4.0), o);
  }
  void step(long t) {
    const Mat<float> x = random_matrix<float>(6, 10, 100 + static_cast<std::uint64_t>(t));
    const Mat<float> dy = random_matrix<float>(6, 8, 200 + static_cast<std::uint64_t>(t));
    dora->zero_grad();
    lora->zero_grad();
    const Mat<float> h = dora->forward(x);
    lora->forward(h);
    dora->backward(lora->backward(dy));
    dora::clip_grad_norm(opt->groups(), 0.5);
    opt->set_lr_factor(schedule(t));
    opt->step();
  }
  Mat<float> flat() const {
    Mat<float> out(1, 0);
    const auto add = [&](const Eigen::Ref<const Mat<float>>& m) {
      Mat<float> next(1, out.cols() + m.size());
      next << out, Eigen::Map<const Mat<float>>(m.data(), 1, m.size());
      out = next;
    };
    add(dora->lora_A());
    add(dora->lora_B());
    add(Mat<float>(dora->magnitude().transpose()));
    add(lora->lora_A());
    add(lora->lora_B());
    add(Mat<float>(lora->magnitude().transpose()));
    return out;
  }
};

dora::AdapterConfig config() {
  dora::AdapterConfig c;
  c.rank = 3;
  c.alpha = 6;
  c.dropout = 0.25;
  c.seed = 7;
  return c;
}

}  // namespace

TEST_CASE("A run resumed from a checkpoint continues bit for bit", "[checkpoint]") {
  const Mat<float> W1 = random_matrix<float>(12, 10, 1), W2 = random_matrix<float>(8, 12, 2);
  const Vec<float> b1 = random_vector<float>(12, 3);
  dora::AdapterConfig c = config();
  // The uninterrupted run.
  Trainer full{W1, b1, W2, nullptr, nullptr, nullptr};
  full.dora = std::make_unique<dora::DoraLinear<float>>(dora::borrow(W1, b1), c, random_matrix<float>(3, 10, 4),
                                                        random_matrix<float>(12, 3, 5, 0.1));
  full.lora = std::make_unique<dora::DoraLinear<float>>(dora::borrow(W2), c, random_matrix<float>(3, 12, 6),
                                                        random_matrix<float>(8, 3, 7, 0.1));
  full.make_optimizer();
  for (long t = 0; t < 12; ++t) full.step(t);

  // The same run, checkpointed after 5 steps, everything destroyed, resumed from the files.
  TempDir tmp;
  const std::string dir = tmp / "ckpt-5";
  {
    Trainer first{W1, b1, W2, nullptr, nullptr, nullptr};
    first.dora = std::make_unique<dora::DoraLinear<float>>(dora::borrow(W1, b1), c, random_matrix<float>(3, 10, 4),
                                                           random_matrix<float>(12, 3, 5, 0.1));
    first.lora = std::make_unique<dora::DoraLinear<float>>(dora::borrow(W2), c, random_matrix<float>(3, 12, 6),
                                                           random_matrix<float>(8, 3, 7, 0.1));
    first.make_optimizer();
    for (long t = 0; t < 5; ++t) first.step(t);
    dora::io::PeftAdapterWriter writer(dora::io::Dtype::F32);
    writer.add("block.dora", *first.dora);
    writer.add("block.lora", *first.lora);
    dora::io::TrainerState state;
    state.step = 5;
    state.rng["block.dora"] = first.dora->dropout_state();
    state.rng["block.lora"] = first.lora->dropout_state();
    state.extra["epoch"] = 0;
    dora::io::save_checkpoint(dir, writer, *first.opt, state);
    // An existing checkpoint is never overwritten.
    CHECK_THROWS_WITH(dora::io::save_checkpoint(dir, writer, *first.opt, state), Catch::Contains("not empty"));
  }
  const dora::io::PeftAdapter adapter(dir + "/adapter");
  Trainer resumed{W1, b1, W2, nullptr, nullptr, nullptr};
  resumed.dora = std::make_unique<dora::DoraLinear<float>>(adapter.make_dora("block.dora", dora::borrow(W1, b1)));
  resumed.lora = std::make_unique<dora::DoraLinear<float>>(adapter.make_dora("block.lora", dora::borrow(W2)));
  // Layers made from an adapter directory start in evaluation mode (as PEFT's from_pretrained).
  resumed.dora->train();
  resumed.lora->train();
  resumed.make_optimizer();
  const dora::io::TrainerState state = dora::io::load_checkpoint(dir, *resumed.opt);
  resumed.dora->set_dropout_state(state.rng.at("block.dora"));
  resumed.lora->set_dropout_state(state.rng.at("block.lora"));
  CHECK(state.step == 5);
  CHECK(state.extra.at("epoch") == 0);
  CHECK(resumed.opt->step_count() == 5);
  for (long t = state.step; t < 12; ++t) resumed.step(t);
  const Mat<float> a = full.flat(), b = resumed.flat();
  const double diff = (a - b).cwiseAbs().maxCoeff();
  std::printf("checkpoint: resumed at step 5 vs uninterrupted after 12 steps: max |difference| %.3g over %td values\n",
              diff, a.size());
  CHECK(diff == 0.0);
  // And the optimizer state is the same, bit for bit.
  for (std::size_t k = 0; k < full.opt->exp_avg().size(); ++k) {
    CHECK((full.opt->exp_avg()[k].array() == resumed.opt->exp_avg()[k].array()).all());
    CHECK((full.opt->max_exp_avg_sq()[k].array() == resumed.opt->max_exp_avg_sq()[k].array()).all());
  }
}

TEST_CASE("A corrupt or mismatched checkpoint is refused and changes nothing", "[checkpoint][errors]") {
  const Mat<float> W1 = random_matrix<float>(12, 10, 1);
  const Vec<float> b1 = random_vector<float>(12, 3);
  dora::DoraLinear<float> layer(dora::borrow(W1, b1), config(), random_matrix<float>(3, 10, 4),
                                random_matrix<float>(12, 3, 5, 0.1));
  dora::AdamW<float> opt(dora::dora_parameter_groups(layer.parameters(), 1e-2, 0.0));
  layer.forward(random_matrix<float>(4, 10, 8));
  layer.backward(random_matrix<float>(4, 12, 9));
  opt.step();
  TempDir tmp;
  dora::io::PeftAdapterWriter writer;
  writer.add("l", layer);
  dora::io::save_checkpoint(tmp / "good", writer, opt, {});
  const std::string state_file = tmp / "good/trainer_state.safetensors";
  const std::vector<std::uint8_t> bytes = read_bytes(state_file);
  // The optimizer to load into: a fresh one, whose state must stay zero after a refused load.
  dora::AdamW<float> fresh(dora::dora_parameter_groups(layer.parameters(), 1e-2, 0.0));
  const auto unchanged = [&]() {
    CHECK(fresh.step_count() == 0);
    for (const auto& [name, v] : fresh.state_tensors()) CHECK(v->cwiseAbs().maxCoeff() == 0.0f);
  };
  SECTION("truncated") {
    write_bytes(state_file, std::vector<std::uint8_t>(bytes.begin(), bytes.begin() + bytes.size() / 2));
    CHECK_THROWS_WITH(dora::io::load_checkpoint(tmp / "good", fresh), Catch::Contains("trainer_state.safetensors"));
    unchanged();
  }
  SECTION("missing") {
    CHECK_THROWS_WITH(dora::io::load_checkpoint(tmp / "nothing", fresh), Catch::Contains("missing"));
    unchanged();
  }
  SECTION("another optimizer") {
    dora::SGD<float> sgd(dora::dora_parameter_groups(layer.parameters(), 1e-2, 0.0));
    CHECK_THROWS_WITH(dora::io::load_checkpoint(tmp / "good", sgd), Catch::Contains("loaded into SGD"));
  }
  SECTION("other settings") {
    dora::AdamWOptions o;
    o.beta1 = 0.8;
    dora::AdamW<float> other(dora::dora_parameter_groups(layer.parameters(), 1e-2, 0.0), o);
    CHECK_THROWS_WITH(dora::io::load_checkpoint(tmp / "good", other), Catch::Contains("settings"));
  }
  SECTION("other shapes") {
    dora::DoraLinear<float> wider(dora::borrow(W1, b1), [] {
      dora::AdapterConfig c = config();
      c.rank = 4;
      return c;
    }());
    dora::AdamW<float> other(dora::dora_parameter_groups(wider.parameters(), 1e-2, 0.0));
    CHECK_THROWS_WITH(dora::io::load_checkpoint(tmp / "good", other), Catch::Contains("has sizes"));
  }
  SECTION("a bad generator state") {
    CHECK_THROWS_WITH(layer.set_dropout_state("1 2 3"), Catch::Contains("not a random generator state"));
  }
}

TEST_CASE("load_checkpoint restores the learning-rate factor, and a late refusal leaves the optimizer as it was",
          "[checkpoint][errors]") {
  const Mat<float> W1 = random_matrix<float>(12, 10, 1);
  dora::DoraLinear<float> layer(dora::borrow(W1), config(), random_matrix<float>(3, 10, 4),
                                random_matrix<float>(12, 3, 5, 0.1));
  dora::AdamWOptions o;
  o.amsgrad = true;  // three state tensors per parameter: a refusal can come late
  const auto train = [&](dora::AdamW<float>& opt, long steps, std::uint64_t seed) {
    for (long t = 0; t < steps; ++t) {
      layer.zero_grad();
      layer.forward(random_matrix<float>(4, 10, seed + static_cast<std::uint64_t>(t)));
      layer.backward(random_matrix<float>(4, 12, seed + 50 + static_cast<std::uint64_t>(t)));
      opt.step();
    }
  };
  dora::AdamW<float> saved(dora::dora_parameter_groups(layer.parameters(), 1e-2, 0.1, 4.0), o);
  train(saved, 3, 10);
  saved.set_lr_factor(0.375);
  TempDir tmp;
  dora::io::PeftAdapterWriter writer;
  writer.add("l", layer);
  dora::io::save_checkpoint(tmp / "good", writer, saved, {});

  SECTION("the factor and the groups' learning rates") {
    dora::AdamW<float> fresh(dora::dora_parameter_groups(layer.parameters(), 1e-2, 0.1, 4.0), o);
    dora::io::load_checkpoint(tmp / "good", fresh);
    CHECK(fresh.lr_factor() == 0.375);
    REQUIRE(fresh.groups().size() == saved.groups().size());
    for (std::size_t g = 0; g < fresh.groups().size(); ++g) CHECK(fresh.groups()[g].lr == saved.groups()[g].lr);
    CHECK(fresh.groups()[1].lr == 1e-2 * 4.0 * 0.375);
    CHECK(fresh.step_count() == 3);
  }

  SECTION("refused late") {
    // An optimizer with a state of its own (other steps, another factor): after a refused load every
    // state value, the step count and the learning rates must be bit for bit what they were.
    dora::AdamW<float> other(dora::dora_parameter_groups(layer.parameters(), 1e-2, 0.1, 4.0), o);
    train(other, 2, 70);
    other.set_lr_factor(0.5);
    std::vector<Vec<float>> before;
    for (const auto& [name, v] : other.state_tensors()) before.push_back(*v);
    const auto unchanged = [&]() {
      CHECK(other.step_count() == 2);
      CHECK(other.lr_factor() == 0.5);
      CHECK(other.groups()[1].lr == 1e-2 * 4.0 * 0.5);
      std::size_t k = 0;
      for (const auto& [name, v] : other.state_tensors()) {
        INFO("state tensor " << name);
        CHECK((v->array() == before[k++].array()).all());
      }
    };
    // A copy of the good state file, with its last tensor changed (or one tensor more).
    const dora::io::SafetensorsReader good(tmp / "good/trainer_state.safetensors");
    const std::vector<dora::io::TensorInfo>& infos = good.tensors();
    REQUIRE(infos.size() >= 6);
    const auto rewrite = [&](const std::string& dir, int change) {
      REQUIRE(::mkdir(dir.c_str(), 0755) == 0);
      dora::io::SafetensorsWriter w(dir + "/trainer_state.safetensors");
      w.set_metadata(good.metadata());
      for (std::size_t i = 0; i < infos.size(); ++i) {
        const Vec<float> v = good.vector<float>(infos[i].name);
        const bool last = i + 1 == infos.size();
        if (last && change == 1)
          w.add(infos[i].name, v, dora::io::Dtype::F64);  // the wrong dtype
        else if (last && change == 2)
          w.add(infos[i].name, Vec<float>(v.head(v.size() - 1)), dora::io::Dtype::F32);  // one value short
        else
          w.add(infos[i].name, v, dora::io::Dtype::F32);
      }
      if (change == 3) w.add("zz_extra", Vec<float>::Ones(2), dora::io::Dtype::F32);
      w.finish();
    };
    rewrite(tmp / "dtype", 1);
    rewrite(tmp / "size", 2);
    rewrite(tmp / "extra", 3);
    CHECK_THROWS_WITH(dora::io::load_checkpoint(tmp / "dtype", other), Catch::Contains("is F64"));
    unchanged();
    CHECK_THROWS_WITH(dora::io::load_checkpoint(tmp / "size", other), Catch::Contains("but the optimizer's is F32"));
    unchanged();
    CHECK_THROWS_WITH(dora::io::load_checkpoint(tmp / "extra", other), Catch::Contains("state tensors, the optimizer"));
    unchanged();
    // The same files but intact load (the changes above are what was refused).
    rewrite(tmp / "intact", 0);
    dora::io::load_checkpoint(tmp / "intact", other);
    CHECK(other.step_count() == 3);
    CHECK(other.lr_factor() == 0.375);
  }
}
