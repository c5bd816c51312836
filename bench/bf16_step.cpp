// The bf16 training step, driven line by line from stdin so that a caller (bench/
// bf16_compare.py) can interleave it with torch in one run:
//   bf16_step <d_out> <d_in> <r> <n>
// W is stored as bf16 (borrowed); activations and adapter are fp32. Every line "step" on stdin runs
// one step (forward + backward with dx and every adapter gradient) of each method, in an order that
// rotates from line to line, and prints one JSON line of milliseconds:
//   base_bf16  the frozen layer alone on the oneDNN path: x W^T and dy W (the physical limit here)
//   lora_bf16  LoRA on the oneDNN path
//   dora_bf16  DoRA (PEFT's detached norm) on the oneDNN path
//   dora_f32   the same DoRA step with the backend off: today's float path (tiled dequantization)
// The first line printed says which bf16 units oneDNN uses, or that it has none (the bf16 methods
// then run the float path: the fallback). Threads: OMP_NUM_THREADS. Build: target dora_bf16_step
// (where oneDNN is found), or bench/run_device_bf16.sh.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <dora/dora.hpp>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace {
using Mat = dora::Matrix<float>;
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: bf16_step d_out d_in r n   (then one line 'step' per measurement on stdin)\n");
    return 2;
  }
  const Eigen::Index d_out = std::atol(argv[1]), d_in = std::atol(argv[2]), r = std::atol(argv[3]),
                     n = std::atol(argv[4]);
  const bool units = dora::dnnl_backend::has_bf16_units();
  std::printf("{\"units\": \"%s\", \"fallback\": %s}\n", dora::dnnl_backend::units_name(), units ? "false" : "true");
  if (!units)
    std::fprintf(stderr, "bf16_step: this CPU has no bf16 units: the bf16 methods run the float path (fallback)\n");
  std::fflush(stdout);

  std::srand(1);
  const Mat Wf = Mat::Random(d_out, d_in) * (1.0f / std::sqrt(static_cast<float>(d_in)));
  const std::vector<dora::bfloat16> wb = dora::encode_weight<dora::bfloat16>(Wf);
  const dora::BaseLayer<float, dora::bfloat16> base = dora::borrow<float>(wb, d_out, d_in);
  dora::AdapterConfig c;
  c.rank = r;
  c.alpha = 2.0 * static_cast<double>(r);
  const Mat A = Mat::Random(r, d_in) * 0.01f, B = Mat::Random(d_out, r) * 0.01f;
  dora::LoraLinear<float, dora::bfloat16> lora(base, c, A, B);
  dora::DoraLinear<float, dora::bfloat16> dora_layer(base, c, A, B);
  const Mat x = Mat::Random(n, d_in), dy = Mat::Random(n, d_out);
  Mat y(n, d_out), dx(n, d_in);

  const bool backend = dora::dnnl_backend::enabled();
  struct Method {
    const char* name;
    std::function<void()> step;
  };
  const std::vector<Method> methods = {
      {"base_bf16",
       [&] {
         dora::dnnl_backend::set_enabled(backend);
         dora::detail::split_product(x, base.weight, y);
         dora::detail::stored_adjoint(dy, base.weight, dx, false);
       }},
      {"lora_bf16",
       [&] {
         dora::dnnl_backend::set_enabled(backend);
         lora.forward(x, y);
         lora.backward(dy, dx);
       }},
      {"dora_bf16",
       [&] {
         dora::dnnl_backend::set_enabled(backend);
         dora_layer.forward(x, y);
         dora_layer.backward(dy, dx);
       }},
      {"dora_f32",
       [&] {
         dora::dnnl_backend::set_enabled(false);
         dora_layer.forward(x, y);
         dora_layer.backward(dy, dx);
       }},
  };
  for (const Method& m : methods) m.step();  // warm-up: workspaces, oneDNN's primitive cache
  std::string line;
  std::size_t rotation = 0;
  while (std::getline(std::cin, line)) {
    if (line != "step") continue;
    std::vector<double> ms(methods.size());
    for (std::size_t k = 0; k < methods.size(); ++k) {
      const std::size_t i = (k + rotation) % methods.size();
      const auto t0 = std::chrono::steady_clock::now();
      methods[i].step();
      ms[i] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    }
    ++rotation;
    std::printf("{");
    for (std::size_t i = 0; i < methods.size(); ++i)
      std::printf("%s\"%s\": %.3f", i ? ", " : "", methods[i].name, ms[i]);
    std::printf("}\n");
    std::fflush(stdout);
  }
  return 0;
}
