// A complete training loop: DoRA layer, AdamW with parameter groups (no weight decay on the
// magnitude, LoRA+'s larger lr for B), gradient clipping, warm-up + cosine schedule, a checkpoint
// and a resume (README, "Training"). Exits non-zero if the loss does not fall or the resumed run
// differs from the uninterrupted one.
#include <cstdio>
#include <cstdlib>
#include <dora/dora.hpp>
#include <dora/io/io.hpp>
#include <filesystem>
#include <string>

int main() {
  using Mat = dora::Matrix<float>;
  char tmp[] = "/tmp/dora_training_XXXXXX";  // the checkpoint goes to a new directory
  if (::mkdtemp(tmp) == nullptr) return 1;
  const std::string dir = std::string(tmp) + "/step-100";
  std::srand(3);
  const Mat W = Mat::Random(64, 48), shift = 0.2f * Mat::Random(64, 4) * Mat::Random(4, 48);
  dora::AdapterConfig config;
  config.rank = 8;
  config.alpha = 16;
  config.dropout = 0.05;
  const auto run = [&](dora::DoraLinear<float>& layer, dora::AdamW<float>& opt, long from, long to) {
    const dora::WarmupCosine schedule{20, 200, 0.1};
    float loss = 0;
    for (long step = from; step < to; ++step) {
      std::srand(1000 + static_cast<unsigned>(step));  // batch `step`, whoever asks for it
      const Mat x = Mat::Random(32, 48);
      const Mat y = layer.forward(x);
      const Mat dy = (y - x * (W + shift).transpose()) / 32.0f;  // d(MSE / 2) / dy
      loss = 0.5f * dy.squaredNorm() * 32.0f;
      opt.zero_grad();
      layer.backward(dy);
      dora::clip_grad_norm(opt.groups(), 1.0);
      opt.set_lr_factor(schedule(step));
      opt.step();
    }
    return loss;
  };
  dora::DoraLinear<float> layer(dora::borrow(W), config);
  dora::AdamW<float> opt(dora::dora_parameter_groups(layer.parameters(), 3e-3, 0.01, /*b_lr_ratio=*/4.0));
  const float first = run(layer, opt, 0, 1);
  run(layer, opt, 1, 100);
  dora::io::PeftAdapterWriter adapter;  // the adapter part stays a PEFT adapter directory
  adapter.add("proj", layer);
  dora::io::save_checkpoint(dir, adapter, opt, {100, {{"proj", layer.dropout_state()}}, {}});
  const float last = run(layer, opt, 100, 200);

  // Resume from the files, as a new process would, and finish the same 200 steps.
  dora::DoraLinear<float> again = dora::io::PeftAdapter(dir + "/adapter").make_dora("proj", dora::borrow(W));
  again.train();
  dora::AdamW<float> opt2(dora::dora_parameter_groups(again.parameters(), 3e-3, 0.01, 4.0));
  const dora::io::TrainerState state = dora::io::load_checkpoint(dir, opt2);
  again.set_dropout_state(state.rng.at("proj"));
  const float resumed = run(again, opt2, state.step, 200);
  std::printf("training: loss %.4g -> %.4g after 200 steps; resumed from step 100: %.4g\n", first, last, resumed);
  std::filesystem::remove_all(tmp);
  return last < 0.1f * first && resumed == last ? 0 : 1;
}
