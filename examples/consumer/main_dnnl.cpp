// The optional bf16 target dora::dnnl, used from another project: a DoRA layer on a bf16 W, one
// training step on the backend (or on the float fallback where the CPU has no bf16 units), checked
// against the same step with the backend off.
#include <cmath>
#include <cstdio>
#include <dora/dora.hpp>
#include <vector>

int main() {
  using Mat = dora::Matrix<float>;
  const Eigen::Index d_out = 64, d_in = 96, n = 5;
  const std::vector<dora::bfloat16> w = dora::encode_weight<dora::bfloat16>(Mat(Mat::Random(d_out, d_in) * 0.1f));
  dora::AdapterConfig config;
  config.rank = 4;
  const Mat A = Mat::Random(4, d_in) * 0.1f, B = Mat::Random(d_out, 4) * 0.1f, x = Mat::Random(n, d_in);
  const auto step = [&] {
    dora::DoraLinear<float, dora::bfloat16> layer(dora::borrow<float>(w, d_out, d_in), config, A, B);
    return Mat(layer.forward(x));
  };
  const Mat y_on = step();
  dora::dnnl_backend::set_enabled(false);
  const Mat y_off = step();
  const double rel = static_cast<double>((y_on - y_off).cwiseAbs().maxCoeff() / y_off.cwiseAbs().maxCoeff());
  std::printf("consumer_dnnl: bf16 units %s; bf16 vs float path: %.1e\n", dora::dnnl_backend::units_name(), rel);
  return rel <= 1e-2 ? 0 : 1;
}
