// Uses the core (a DoRA layer, merge) and the I/O target (a safetensors round trip).
#include <cstdio>
#include <dora/dora.hpp>
#include <dora/io/safetensors.hpp>
#include <string>

int main() {
  using Mat = dora::Matrix<float>;
  const Mat W = Mat::Random(8, 6);
  dora::AdapterConfig config;
  config.rank = 2;
  dora::DoraLinear<float> layer(dora::borrow(W), config);
  layer.lora_B().setConstant(0.1f);
  layer.eval();
  const Mat x = Mat::Random(3, 6);
  const Mat y = layer.forward(x);
  const Mat y_merged = x * layer.merge().weight.transpose();
  const float diff = (y - y_merged).cwiseAbs().maxCoeff();

  const std::string path = "consumer_roundtrip.safetensors";
  {
    dora::io::SafetensorsWriter writer(path);
    writer.add("W", W, dora::io::Dtype::F32);
    writer.finish();
  }
  const dora::io::SafetensorsReader reader(path);
  const bool same = reader.matrix<float>("W") == W;
  std::remove(path.c_str());
  std::printf("dora %d.%d.%d consumer: merge difference %.2e, safetensors round trip %s\n", dora::version_major,
              dora::version_minor, dora::version_patch, static_cast<double>(diff), same ? "ok" : "FAILED");
  return diff < 1e-5f && same ? 0 : 1;
}
