// Trains a few small LoRA/DoRA layers in C++ and saves each set as a PEFT adapter directory, with
// the base checkpoint, inputs and the C++ outputs, so that tools/check_peft_load.py can load the
// adapter with real PEFT (PeftModel.from_pretrained) and compare outputs.
//
//   save_example_adapter OUT_PARENT      writes OUT_PARENT/cpp_saved (DoRA, rsLoRA, per-module
//                                        ranks and alphas) and OUT_PARENT/cpp_saved_lora (LoRA)
// Each directory: adapter/ (adapter_config.json, adapter_model.safetensors), base_model.safetensors
// (<path>.weight, <path>.bias), io.safetensors (x.<path>, y.<path>: the C++ layer's evaluation
// output on x), merged_model.safetensors (dora::io::merge_checkpoint of base + adapter).
// Deterministic: fixed seeds and the library's own generator.
#include <dora/io/peft_adapter.hpp>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

namespace {

using Mat = dora::Matrix<float>;
using Vec = dora::Vector<float>;

Mat normal(Eigen::Index r, Eigen::Index c, std::uint64_t seed, double sd) {
  dora::detail::Rng rng(seed);
  Mat m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(sd * rng.normal());
  return m;
}

struct Module {
  std::string path;
  Eigen::Index d_out, d_in, rank;
  double alpha;
  bool bias;
  Mat W;
  Vec b;
};

// A few SGD steps on a squared error towards a random target, so A, B and m all move away from
// their initial values (and m from the row norm).
template <typename Layer>
void train(Layer& layer, const Module& mod, std::uint64_t seed) {
  const Mat x = normal(16, mod.d_in, seed, 1.0);
  const Mat target = normal(16, mod.d_out, seed + 1, 1.0);
  layer.train();
  for (int step = 0; step < 5; ++step) {
    layer.zero_grad();
    const Mat y = layer.forward(x);
    const Mat dy = (y - target) / 16.0f;
    layer.backward_parameters(dy);
    for (auto& p : layer.parameters()) p.value -= 0.05f * p.grad;
  }
  layer.eval();
}

void save(const std::string& dir, bool dora_mode) {
  std::vector<Module> mods = {
      {"q_proj", 24, 32, 4, 8.0, false, {}, {}},
      {"mlp.fc1", 48, 32, dora_mode ? 6 : 4, 8.0, true, {}, {}},
      {"mlp.fc2", 32, 48, 4, dora_mode ? 3.0 : 8.0, true, {}, {}},
  };
  std::uint64_t seed = dora_mode ? 100 : 200;
  for (Module& m : mods) {
    m.W = normal(m.d_out, m.d_in, ++seed, 1.0 / std::sqrt(static_cast<double>(m.d_in)));
    if (m.bias) m.b = normal(m.d_out, 1, ++seed, 0.1);
  }
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) throw std::runtime_error("cannot create " + dir);
  dora::io::PeftAdapterWriter writer(dora::io::Dtype::F32);
  writer.set_base_model_name_or_path("save_example_adapter");
  dora::io::SafetensorsWriter base(dir + "/base_model.safetensors");
  base.set_metadata({{"format", "pt"}});
  dora::io::SafetensorsWriter io(dir + "/io.safetensors");
  for (Module& m : mods) {
    dora::AdapterConfig cfg;
    cfg.rank = m.rank;
    cfg.alpha = m.alpha;
    cfg.use_rslora = dora_mode;
    cfg.init = dora::Init::gaussian;
    cfg.seed = ++seed;
    const dora::BaseLayer<float> bl = m.bias ? dora::borrow(m.W, m.b) : dora::borrow(m.W);
    const Mat x = normal(5, m.d_in, ++seed, 1.0);
    Mat y;
    if (dora_mode) {
      dora::DoraLinear<float> layer(bl, cfg);
      train(layer, m, ++seed);
      y = layer.forward(x);
      writer.add(m.path, layer);
    } else {
      dora::LoraLinear<float> layer(bl, cfg);
      train(layer, m, ++seed);
      y = layer.forward(x);
      writer.add(m.path, layer);
    }
    base.add(m.path + ".weight", m.W, dora::io::Dtype::F32);
    if (m.bias) base.add(m.path + ".bias", m.b, dora::io::Dtype::F32);
    io.add("x." + m.path, x, dora::io::Dtype::F32);
    io.add("y." + m.path, y, dora::io::Dtype::F32);
  }
  writer.write(dir + "/adapter");
  base.finish();
  io.finish();
  const std::string merged = dir + "/merged_model.safetensors";
  ::unlink(merged.c_str());
  dora::io::MergeOptions opt;
  opt.log = &std::cout;
  dora::io::merge_checkpoint(dir + "/base_model.safetensors", dir + "/adapter", merged, opt);
  std::cout << "wrote " << dir << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: save_example_adapter OUT_PARENT\n";
    return 2;
  }
  try {
    save(std::string(argv[1]) + "/cpp_saved", true);
    save(std::string(argv[1]) + "/cpp_saved_lora", false);
  } catch (const std::exception& e) {
    std::cerr << "save_example_adapter: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
