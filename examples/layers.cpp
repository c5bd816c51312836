// DoRA on an embedding table and on a 2-D convolution: a tiny token-to-image model trained for a
// few steps with the library's gradients, then merged, with the merged layers checked against the
// adapted ones. The frozen table and kernel are borrowed in torch's layouts, never copied.
#include <cstdio>
#include <dora/dora.hpp>

int main() {
  using Mat = dora::Matrix<float>;
  std::srand(11);
  // Frozen "pretrained" layers in torch's layouts: nn.Embedding(100, 48).weight, and
  // nn.Conv2d(3, 8, kernel_size=3, padding=1).weight (8, 3, 3, 3) read as 8 x 27.
  const Mat table = Mat::Random(100, 48);
  dora::ConvGeometry g;
  g.dims = 2;
  g.in_channels = 3;
  g.out_channels = 8;
  g.kernel = {3, 3, 1};
  g.padding = {1, 1, 0};
  g.input = {4, 4, 1};  // each embedding row is read as a 3 x 4 x 4 image
  const Mat kernel = Mat::Random(8, g.patch_size());
  const dora::Vector<float> bias = dora::Vector<float>::Random(8);

  dora::AdapterConfig config;
  config.rank = 4;
  config.alpha = 8;
  dora::DoraEmbedding<float> embed(dora::borrow_embedding(table, /*padding_idx=*/0), config);
  dora::DoraConv<float> conv(dora::borrow_conv(kernel, bias, g), config);

  dora::TokenIds ids(32);
  for (Eigen::Index t = 0; t < ids.size(); ++t) ids[t] = (7 * t + 3) % 100;
  const Mat target = Mat::Random(ids.size(), 8 * g.output_volume());
  Mat h(ids.size(), 48), y(ids.size(), 8 * g.output_volume()), dh(ids.size(), 48);
  for (int step = 0; step <= 40; ++step) {
    embed.forward(ids, h);
    conv.forward(h, y);
    const Mat dy = (y - target) / static_cast<float>(ids.size());
    if (step % 10 == 0) std::printf("step %2d  loss %.5f\n", step, 0.5 * (y - target).squaredNorm() / ids.size());
    embed.zero_grad();
    conv.zero_grad();
    conv.backward(dy, dh);
    embed.backward_parameters(dh);
    for (dora::Parameter<float>& p : embed.parameters()) p.value -= 2e-3f * p.grad;
    for (dora::Parameter<float>& p : conv.parameters()) p.value -= 2e-3f * p.grad;
  }

  // Merged layers replace base + adapter: a plain table and a plain kernel (torch's layouts).
  embed.eval();
  conv.eval();
  const Mat y_adapter = conv.forward(embed.forward(ids));
  const dora::DoraMerge<float> merged_table = embed.merge(), merged_kernel = conv.merge();
  dora::AdapterConfig plain = config;
  dora::LoraEmbedding<float> e2(dora::borrow_embedding(merged_table.weight), plain, Mat::Zero(4, 100),
                                Mat::Zero(48, 4));
  dora::LoraConv<float> c2(dora::borrow_conv(merged_kernel.weight, bias, g), plain, Mat::Zero(4, g.patch_size()),
                           Mat::Zero(8, 4));
  e2.eval();
  c2.eval();
  const Mat y_merged = c2.forward(e2.forward(ids));
  const float diff = (y_merged - y_adapter).cwiseAbs().maxCoeff() / y_adapter.cwiseAbs().maxCoeff();
  std::printf("merged vs adapted: max relative difference %.2e\n", diff);
  return diff < 1e-5f ? 0 : 1;
}
