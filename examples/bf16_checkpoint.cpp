// DoRA on a bf16 checkpoint without converting W: memory-map a safetensors file, borrow
// one bf16 weight straight from the mapping, attach DoRA, train a few steps, save the adapter as a
// PEFT directory, and print the process's memory next to the bytes of W.
//
//   bf16_checkpoint [checkpoint.safetensors tensor_name out_dir]
//
// Without arguments it first writes a synthetic checkpoint (one 4096 x 4096 bf16 weight) to a
// temporary directory. The layer computes in float; its products read W
// tile by tile (512 x 512 dequantized into a per-thread buffer), so the process holds the mapped
// bf16 bytes and no float copy: the example fails if its resident memory says otherwise.
#include <sys/resource.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <dora/dora.hpp>
#include <dora/io/io.hpp>
#include <exception>
#include <fstream>
#include <string>
#include <vector>

// Under AddressSanitizer resident memory includes its shadow and quarantine: the memory check
// then only prints.
#if defined(__SANITIZE_ADDRESS__)
#define DORA_EXAMPLE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DORA_EXAMPLE_ASAN 1
#endif
#endif
#ifndef DORA_EXAMPLE_ASAN
#define DORA_EXAMPLE_ASAN 0
#endif

namespace {

using Mat = dora::Matrix<float>;

// Resident memory now (VmRSS: the mapped checkpoint pages that were read count), in bytes.
long resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string key;
  while (status >> key) {
    if (key == "VmRSS:") {
      long kb = 0;
      status >> kb;
      return kb * 1024;
    }
    status.ignore(1 << 20, '\n');
  }
  return -1;
}

// A synthetic "pretrained" bf16 weight, made directly in bf16 (no float copy of W); the buffer is
// freed before the checkpoint is mapped.
void write_checkpoint(const std::string& path, const std::string& name, Eigen::Index d_out, Eigen::Index d_in) {
  std::vector<dora::bfloat16> values(static_cast<std::size_t>(d_out * d_in));
  dora::detail::Rng rng(1);
  for (dora::bfloat16& v : values) v = dora::bfloat16(static_cast<float>(0.02 * rng.normal()));
  dora::io::SafetensorsStreamWriter writer(path);
  writer.declare(name, dora::io::Dtype::BF16, {d_out, d_in});
  writer.begin();
  writer.write(name, values.data(), values.size() * sizeof(dora::bfloat16));
  writer.finish();
}

Mat random(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, double scale) {
  dora::detail::Rng rng(seed);
  Mat m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(scale * rng.normal());
  return m;
}

}  // namespace

int run(int argc, char** argv) {
  std::string checkpoint, tensor = "model.layers.0.mlp.up_proj.weight", out_dir;
  if (argc == 4) {
    checkpoint = argv[1];
    tensor = argv[2];
    out_dir = argv[3];
  } else if (argc == 1) {
    char tmpl[] = "/tmp/dora_bf16_example.XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) {
      std::perror("mkdtemp");
      return 1;
    }
    checkpoint = std::string(tmpl) + "/model.safetensors";
    out_dir = std::string(tmpl) + "/adapter";
    write_checkpoint(checkpoint, tensor, 4096, 4096);
  } else {
    std::fprintf(stderr, "usage: bf16_checkpoint [checkpoint.safetensors tensor_name out_dir]\n");
    return 2;
  }

  // 1. Map the checkpoint and borrow the bf16 tensor where it lies.
  const dora::io::SafetensorsReader reader(checkpoint);
  const dora::io::TensorInfo& info = reader.info(tensor);
  if (info.dtype != dora::io::Dtype::BF16 || info.shape.size() != 2) {
    std::fprintf(stderr, "bf16_checkpoint: %s is %s with rank %zu; this example wants a rank-2 BF16 weight\n",
                 tensor.c_str(), dora::io::dtype_name(info.dtype), info.shape.size());
    return 2;
  }
  const std::uint8_t* raw = reader.raw(tensor);
  if (reinterpret_cast<std::uintptr_t>(raw) % alignof(dora::bfloat16) != 0) {
    std::fprintf(stderr, "bf16_checkpoint: %s is not 2-byte aligned in the file\n", tensor.c_str());
    return 2;
  }
  const Eigen::Index d_out = info.shape[0], d_in = info.shape[1];
  const dora::BaseLayer<float, dora::bfloat16> base =
      dora::borrow<float>(reinterpret_cast<const dora::bfloat16*>(raw), d_out, d_in);

  // 2. DoRA on it (float compute), and a task: the frozen layer plus a rank-2 shift.
  dora::AdapterConfig config;
  config.rank = 8;
  config.alpha = 16;
  config.seed = 3;
  dora::DoraLinear<float, dora::bfloat16> layer(base, config);
  const Eigen::Index n = 64;
  const Mat x = random(n, d_in, 5, 1.0);
  Mat target(n, d_out);
  {
    dora::LoraLinear<float, dora::bfloat16> frozen(base, config);  // B = 0: the frozen layer itself
    frozen.eval();
    frozen.forward(x, target);
    target.noalias() += x * (random(d_out, 2, 6, 0.02) * random(2, d_in, 7, 0.02)).transpose();
  }

  // 3. A few steps of plain SGD.
  Mat y(n, d_out), dy(n, d_out);
  double first = 0, last = 0;
  for (int step = 0; step < 12; ++step) {
    layer.forward(x, y);
    dy = (y - target) / static_cast<float>(n);
    last = 0.5 * static_cast<double>((y - target).squaredNorm()) / static_cast<double>(n);
    if (step == 0) first = last;
    layer.zero_grad();
    layer.backward_parameters(dy);
    for (dora::Parameter<float>& p : layer.parameters()) p.value -= 0.02f * p.grad;
    std::printf("step %d  loss %.6f\n", step, last);
  }

  // 4. Save the adapter as a PEFT directory (the module path is the tensor's name less ".weight").
  std::string module = tensor;
  if (module.size() > 7 && module.compare(module.size() - 7, 7, ".weight") == 0) module.resize(module.size() - 7);
  dora::io::PeftAdapterWriter writer;
  writer.add(module, layer);
  writer.write(out_dir);
  const dora::io::PeftAdapter saved(out_dir);
  const dora::io::PeftModuleWeights<float> w = saved.weights<float>(saved.module(module));
  const bool same = w.A == layer.lora_A() && w.B == layer.lora_B() && w.magnitude == layer.magnitude();

  // 5. Memory: the mapped bf16 W and no float copy of it.
  const long rss = resident_bytes();
  const long stored = static_cast<long>(base.weight_bytes());
  const long as_float = static_cast<long>(d_out * d_in * sizeof(float));
  std::printf("adapter written to %s (%s)\n", out_dir.c_str(), same ? "reloaded bit for bit" : "RELOAD DIFFERS");
  std::printf("rss_bytes=%ld stored_weight_bytes=%ld float_weight_bytes=%ld\n", rss, stored, as_float);
  bool ok = same && last < 0.5 * first;
  if (DORA_EXAMPLE_ASAN) {
    std::printf("(AddressSanitizer build: resident memory not checked)\n");
  } else if (rss >= 0 && as_float >= (64L << 20) && rss > stored + as_float / 2) {
    std::printf("resident memory exceeds the bf16 W by more than half a float copy\n");
    ok = false;
  }
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bf16_checkpoint: %s\n", e.what());
    return 1;
  }
}
