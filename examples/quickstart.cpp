// Quick start: wrap an existing weight in DoraLinear, train a few steps on a toy regression with
// the library's gradients, merge, and check the merged layer gives the same outputs.
#include <cstdio>
#include <dora/dora.hpp>

int main() {
  using Mat = dora::Matrix<double>;
  const Eigen::Index d_in = 32, d_out = 16, n = 256;
  std::srand(7);                           // Eigen's Random() draws from rand(): fixed seed, fixed run
  const Mat W = Mat::Random(d_out, d_in);  // a frozen, "pretrained" weight
  const dora::Vector<double> bias = dora::Vector<double>::Random(d_out);
  const Mat target_W = W + 0.3 * Mat::Random(d_out, 2) * Mat::Random(2, d_in);  // the task: a low-rank shift
  const Mat x = Mat::Random(n, d_in);
  const Mat target = (x * target_W.transpose()).rowwise() + bias.transpose();

  dora::AdapterConfig config;
  config.rank = 4;
  config.alpha = 8;
  dora::DoraLinear<double> layer(dora::borrow(W, bias), config);  // borrows W and bias: keep them alive

  Mat y(n, d_out), dy(n, d_out);
  const double lr = 0.02;
  for (int step = 0; step <= 300; ++step) {
    layer.forward(x, y);
    dy = (y - target) / static_cast<double>(n);  // d(0.5 * mean sum sq) / dy
    const double loss = 0.5 * (y - target).squaredNorm() / static_cast<double>(n);
    layer.zero_grad();
    layer.backward_parameters(dy);
    for (dora::Parameter<double>& p : layer.parameters()) p.value -= lr * p.grad;  // plain SGD
    if (step % 50 == 0) std::printf("step %3d  loss %.6f\n", step, loss);
  }

  // Merge: one plain matrix replaces base + adapter at inference.
  layer.eval();
  const Mat y_adapter = layer.forward(x);
  const dora::DoraMerge<double> merged = layer.merge();
  const Mat y_merged = (x * merged.weight.transpose()).rowwise() + bias.transpose();
  const double diff = (y_merged - y_adapter).cwiseAbs().maxCoeff() / y_adapter.cwiseAbs().maxCoeff();
  std::printf("merged vs adapter forward: max relative difference %.2e\n", diff);
  std::printf("unmerge(merge) vs W: %.2e\n", (layer.unmerge(merged) - W).cwiseAbs().maxCoeff());
  return diff < 1e-12 ? 0 : 1;
}
