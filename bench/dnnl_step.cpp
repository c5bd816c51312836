// Issue 15 (WIP): one DoRA training step (forward + backward with dx, PEFT's detached norm) on a bf16
// W, the oneDNN bf16 path against the float path (tiled dequantization), interleaved, medians.
// Usage: dnnl_step d_out d_in r n reps   (build with -DDORA_WITH_DNNL ... -ldnnl)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <dora/dora.hpp>
#include <vector>

int main(int argc, char** argv) {
  using Mat = dora::Matrix<float>;
  const Eigen::Index d_out = argc > 1 ? std::atol(argv[1]) : 4096, d_in = argc > 2 ? std::atol(argv[2]) : 4096,
                     r = argc > 3 ? std::atol(argv[3]) : 16, n = argc > 4 ? std::atol(argv[4]) : 512;
  const int reps = argc > 5 ? std::atoi(argv[5]) : 5;
  std::srand(1);
  const std::vector<dora::bfloat16> wb =
      dora::encode_weight<dora::bfloat16>(Mat(Mat::Random(d_out, d_in) * (1.0f / std::sqrt(float(d_in)))));
  dora::AdapterConfig c;
  c.rank = r;
  c.alpha = 2.0 * r;
  dora::DoraLinear<float, dora::bfloat16> layer(dora::borrow<float>(wb.data(), d_out, d_in), c);
  layer.set_lora_B(Mat::Random(d_out, r) * 0.01f);
  const Mat x = Mat::Random(n, d_in), dy = Mat::Random(n, d_out);
  Mat y(n, d_out), dx(n, d_in);
  std::vector<double> t[2];
  for (int rep = 0; rep < reps + 1; ++rep)
    for (int on = 0; on < 2; ++on) {
      dora::dnnl_backend::set_enabled(on == 1);
      const auto a = std::chrono::steady_clock::now();
      layer.forward(x, y);
      layer.backward(dy, dx);
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count();
      if (rep > 0) t[on].push_back(ms);
    }
  for (auto& v : t) std::sort(v.begin(), v.end());
  std::printf("%ld/%ld/%ld/%ld units %s: float path %.1f ms, bf16 path %.1f ms (medians of %d)\n", (long)d_out,
              (long)d_in, (long)r, (long)n, dora::dnnl_backend::units_name(), t[0][t[0].size() / 2],
              t[1][t[1].size() / 2], reps);
}
