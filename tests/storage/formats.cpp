// Frozen weights stored as bf16, f16, Q8_0 or Q4_0 (include/dora/storage.hpp):
//   - rounding to bf16 / f16 and quantizing to Q8_0 / Q4_0 against implementations written here
//     from the formats' definitions (not from the library's code), and the stated error bounds;
//   - the tiled products and a whole LoRA / DoRA Linear layer (forward, backward, evaluation,
//     infer, merge) against the same layer on the dense W that the stored weight encodes, at sizes
//     with several tiles, partial tiles and several threads; the same for an embedding on a stored
//     table (whose norm's products run over the table's transpose) and for grouped convolutions;
//   - the DoRA norm in float on a stored W against a double-precision dense computation, within
//     the factored norm's bound (dequantization is exact in float, so the bound is float's);
//   - errors that name what was wrong.
// The contract suite (tests/layers/contract.cpp) runs finite differences and the rest of the contract on
// a bf16 and a Q4_0 Linear, a bf16 Conv2d and a Q8_0 embedding.

#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "test_support.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace dora_test;

namespace {

// Rounds x to `bits` significant bits, to nearest with ties to even, with subnormals below
// 2^min_exp (the IEEE definition, in double where every step is exact).
double round_significant(double x, int bits, int min_exp) {
  if (x == 0.0) return x;
  int e = 0;
  std::frexp(x, &e);  // x = f 2^e, 0.5 <= |f| < 1
  const int ulp_exp = std::max(e - bits, min_exp - bits + 1);
  const double ulp = std::ldexp(1.0, ulp_exp);
  return std::nearbyint(x / ulp) * ulp;  // the default rounding mode: to nearest, ties to even
}
double reference_bf16(double x) { return round_significant(x, 8, -126); }
double reference_f16(double x) { return round_significant(x, 11, -14); }

// GGML's quantize_row_q8_0_ref as its definition reads, written out per block here.
struct ReferenceBlock {
  double d;  // the scale after rounding to half
  int q[32];
};
std::vector<ReferenceBlock> reference_q8_0(const Mat<float>& W) {
  std::vector<ReferenceBlock> out;
  for (Eigen::Index i = 0; i < W.rows(); ++i)
    for (Eigen::Index b = 0; b < W.cols() / 32; ++b) {
      ReferenceBlock block{};
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(W(i, b * 32 + j)));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      for (int j = 0; j < 32; ++j) block.q[j] = static_cast<int>(std::lround(W(i, b * 32 + j) * id));
      block.d = reference_f16(d);
      out.push_back(block);
    }
  return out;
}

// GGML's quantize_row_q4_0_ref as its definition reads: d = max / -8 (max: the entry of largest
// magnitude, sign kept), q = min(15, trunc(w / d + 8.5)), w ~ d (q - 8).
std::vector<ReferenceBlock> reference_q4_0(const Mat<float>& W) {
  std::vector<ReferenceBlock> out;
  for (Eigen::Index i = 0; i < W.rows(); ++i)
    for (Eigen::Index b = 0; b < W.cols() / 32; ++b) {
      ReferenceBlock block{};
      float amax = 0.0f, max = 0.0f;
      for (int j = 0; j < 32; ++j)
        if (std::fabs(W(i, b * 32 + j)) > amax) {
          amax = std::fabs(W(i, b * 32 + j));
          max = W(i, b * 32 + j);
        }
      const float d = max / -8.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      for (int j = 0; j < 32; ++j) {
        const float scaled = W(i, b * 32 + j) * id;
        block.q[j] = std::min(15, static_cast<int>(std::trunc(scaled + 8.5f)));
      }
      block.d = reference_f16(d);
      out.push_back(block);
    }
  return out;
}

template <typename Storage>
std::vector<Storage> store(const Mat<float>& W) {
  return dora::encode_weight<Storage>(W);
}

template <typename Storage>
const char* storage_name() {
  return dora::detail::StorageTraits<Storage>::name;
}

}  // namespace

TEST_CASE("bf16 and f16 rounding match the IEEE definition", "[storage]") {
  // Normal, subnormal (for f16), ties and large values.
  Mat<float> W = random_matrix<float>(16, 64, 1, 3.0);
  W(0, 0) = 1.0f + std::ldexp(1.0f, -8);      // a bf16 tie: rounds to even (1.0)
  W(0, 1) = 1.0f + 3 * std::ldexp(1.0f, -8);  // a bf16 tie: rounds up to even
  W(0, 2) = 3e-6f;                            // an f16 subnormal
  W(0, 3) = -60000.0f;
  W(0, 4) = 1.0f + std::ldexp(1.0f, -11);  // an f16 tie
  const auto b = dora::round_weight<dora::bfloat16>(W);
  const auto h = dora::round_weight<dora::float16>(W);
  double max_b = 0, max_h = 0;
  for (Eigen::Index k = 0; k < W.size(); ++k) {
    max_b =
        std::max(max_b, std::abs(static_cast<double>(static_cast<float>(b.data()[k])) - reference_bf16(W.data()[k])));
    max_h =
        std::max(max_h, std::abs(static_cast<double>(static_cast<float>(h.data()[k])) - reference_f16(W.data()[k])));
  }
  // What the layers read back (the library's own widening, not Eigen's conversion).
  const Mat<double> back_b = dora::dequantize<double>(dora::borrow<double>(b).weight);
  const Mat<double> back_h = dora::dequantize<double>(dora::borrow<double>(h).weight);
  for (Eigen::Index k = 0; k < W.size(); ++k) {
    max_b = std::max(max_b, std::abs(back_b.data()[k] - reference_bf16(W.data()[k])));
    max_h = std::max(max_h, std::abs(back_h.data()[k] - reference_f16(W.data()[k])));
  }
  std::printf("storage: bf16 rounding vs definition max |diff| %.3g, f16 %.3g\n", max_b, max_h);
  CHECK(max_b == 0.0);
  CHECK(max_h == 0.0);
  CHECK(static_cast<float>(b(0, 0)) == 1.0f);
  CHECK(static_cast<float>(b(0, 1)) == 1.0f + std::ldexp(1.0f, -6));
}

TEST_CASE("Q8_0 quantization matches GGML's definition and its error bound", "[storage]") {
  Mat<float> W = random_matrix<float>(9, 96, 2);
  W.row(3).segment(32, 32).setZero();  // an all-zero block: d = 0, q = 0
  W(4, 7) = 0.0f;
  const std::vector<dora::BlockQ8_0> q = dora::quantize_q8_0(W);
  const std::vector<ReferenceBlock> ref = reference_q8_0(W);
  REQUIRE(q.size() == ref.size());
  REQUIRE(q.size() == 9 * 3);
  int q_mismatch = 0, d_mismatch = 0;
  for (std::size_t k = 0; k < q.size(); ++k) {
    if (static_cast<double>(static_cast<float>(q[k].d)) != ref[k].d) ++d_mismatch;
    for (int j = 0; j < 32; ++j)
      if (q[k].q[j] != ref[k].q[j]) ++q_mismatch;
  }
  std::printf("storage: Q8_0 vs definition: %d scale and %d value mismatches of %zu blocks\n", d_mismatch, q_mismatch,
              q.size());
  CHECK(d_mismatch == 0);
  CHECK(q_mismatch == 0);
  // The block's largest entry maps to +-127; the zero block stays zero.
  CHECK(std::abs(static_cast<int>(q[0].q[0])) <= 127);
  CHECK(static_cast<float>(q[3 * 3 + 1].d) == 0.0f);
  // The stated bound: |w - d q| <= amax (1/254 + 2^-11) per entry (storage.hpp).
  const auto base = dora::borrow_q8_0<double>(q, 9, 96);
  const Mat<double> Wq = dora::dequantize<double>(base.weight);
  double worst = 0.0;
  for (Eigen::Index i = 0; i < 9; ++i)
    for (Eigen::Index b = 0; b < 3; ++b) {
      const double amax = W.row(i).segment(b * 32, 32).cwiseAbs().maxCoeff();
      if (amax == 0.0) continue;
      const double err =
          (Wq.row(i).segment(b * 32, 32) - W.row(i).segment(b * 32, 32).cast<double>()).cwiseAbs().maxCoeff();
      worst = std::max(worst, err / amax);
    }
  std::printf("storage: Q8_0 worst |w - d q| / amax %.4g (bound %.4g)\n", worst, 1.0 / 254 + std::ldexp(1.0, -11));
  CHECK(worst <= 1.0 / 254 + std::ldexp(1.0, -11));
  CHECK(worst > 1e-3);  // the bound is not vacuous here
}

TEST_CASE("Q4_0 quantization matches GGML's definition and its error bound", "[storage]") {
  Mat<float> W = random_matrix<float>(9, 96, 27);
  W.row(3).segment(32, 32).setZero();  // an all-zero block: d = 0, every q = 8
  W(5, 40) = -10.0f;                   // the largest entry negative: d > 0
  W(5, 41) = 9.9f;                     // within amax / 16 of -max: clamps to q = 15
  const std::vector<dora::BlockQ4_0> q = dora::quantize_q4_0(W);
  const std::vector<ReferenceBlock> ref = reference_q4_0(W);
  REQUIRE(q.size() == ref.size());
  REQUIRE(q.size() == 9 * 3);
  int q_mismatch = 0, d_mismatch = 0;
  for (std::size_t k = 0; k < q.size(); ++k) {
    if (static_cast<double>(static_cast<float>(q[k].d)) != ref[k].d) ++d_mismatch;
    for (int j = 0; j < 16; ++j) {  // GGML's nibble order: q_j low, q_{j+16} high
      if ((q[k].qs[j] & 0x0f) != ref[k].q[j]) ++q_mismatch;
      if ((q[k].qs[j] >> 4) != ref[k].q[j + 16]) ++q_mismatch;
    }
  }
  std::printf("storage: Q4_0 vs definition: %d scale and %d value mismatches of %zu blocks\n", d_mismatch, q_mismatch,
              q.size());
  CHECK(d_mismatch == 0);
  CHECK(q_mismatch == 0);
  CHECK(ref[5 * 3 + 1].q[9] == 15);  // the clamped entry is in the test
  // What the layers read back: d (q - 8), with the library's widening.
  const Mat<double> Wq = dora::dequantize<double>(dora::borrow<double>(q, 9, 96).weight);
  double decode = 0.0, worst = 0.0;
  for (Eigen::Index i = 0; i < 9; ++i)
    for (Eigen::Index b = 0; b < 3; ++b) {
      const ReferenceBlock& rb = ref[static_cast<std::size_t>(i * 3 + b)];
      for (int j = 0; j < 32; ++j) decode = std::max(decode, std::abs(Wq(i, b * 32 + j) - rb.d * (rb.q[j] - 8)));
      const double amax = W.row(i).segment(b * 32, 32).cwiseAbs().maxCoeff();
      if (amax == 0.0) continue;
      const double err =
          (Wq.row(i).segment(b * 32, 32) - W.row(i).segment(b * 32, 32).cast<double>()).cwiseAbs().maxCoeff();
      worst = std::max(worst, err / amax);
    }
  const double bound = 1.0 / 8 + std::ldexp(1.0, -11);
  std::printf("storage: Q4_0 decoding vs d (q - 8): max |diff| %.3g; worst |w - w_q| / amax %.4g (bound %.4g)\n",
              decode, worst, bound);
  CHECK(decode == 0.0);
  CHECK(worst <= bound);
  CHECK(worst > 0.0625);  // the clamped entry: the bound is reached, not vacuous
  CHECK(Wq.row(3).segment(32, 32).isZero(0.0));
}

TEMPLATE_TEST_CASE("A Linear layer on a stored W equals the layer on the W it encodes", "[storage]", dora::bfloat16,
                   dora::float16, dora::BlockQ8_0, dora::BlockQ4_0) {
  using Storage = TestType;
  // Several row and column tiles (512 x 512), partial ones, and enough W for the threaded split.
  const Eigen::Index d_out = 600, d_in = 1088, r = 8;
  const Mat<float> W0 = random_matrix<float>(d_out, d_in, 3, 0.05);
  const std::vector<Storage> stored = store<Storage>(W0);
  for (Eigen::Index N : {Eigen::Index(1), Eigen::Index(4), Eigen::Index(9)}) {
    const auto check = [&](auto scalar_tag, double tol) {
      using S = decltype(scalar_tag);
      const Vec<S> b = random_vector<S>(d_out, 4);
      const dora::BaseLayer<S, Storage> sbase = dora::borrow<S>(stored.data(), d_out, d_in, b.data());
      const Mat<S> W = dora::dequantize<S>(sbase.weight);
      const Mat<S> A = random_matrix<S>(r, d_in, 5, 0.05), B = random_matrix<S>(d_out, r, 6, 0.05);
      const Mat<S> x = random_matrix<S>(N, d_in, 7), dy = random_matrix<S>(N, d_out, 8);
      dora::AdapterConfig c;
      c.rank = r;
      c.alpha = 16;
      c.norm_gradient = dora::NormGradient::exact;
      dora::DoraLinear<S, Storage> dora_s(sbase, c, A, B);
      dora::DoraLinear<S> dora_d(dora::borrow(W, b), c, A, B);
      dora::LoraLinear<S, Storage> lora_s(sbase, c, A, B);
      dora::LoraLinear<S> lora_d(dora::borrow(W, b), c, A, B);
      double worst = 0.0;
      const auto cmp = [&](const char* what, const auto& got, const auto& want) {
        const double e = rel_err(got, want);
        INFO(storage_name<Storage>() << " N " << N << " " << what << " relative error " << e);
        CHECK(e <= tol);
        worst = std::max(worst, e);
      };
      cmp("dora magnitude", dora_s.magnitude(), dora_d.magnitude());
      cmp("dora y", dora_s.forward(x), dora_d.forward(x));
      cmp("dora dx", dora_s.backward(dy), dora_d.backward(dy));
      cmp("dora dA", dora_s.grad_lora_A(), dora_d.grad_lora_A());
      cmp("dora dB", dora_s.grad_lora_B(), dora_d.grad_lora_B());
      cmp("dora dm", dora_s.grad_magnitude(), dora_d.grad_magnitude());
      // Without dx the exact gradient's W term is its own product (not stacked under Gg).
      dora_s.zero_grad();
      dora_d.zero_grad();
      dora_s.forward(x);
      dora_d.forward(x);
      dora_s.backward_parameters(dy);
      dora_d.backward_parameters(dy);
      cmp("dora dA (no dx)", dora_s.grad_lora_A(), dora_d.grad_lora_A());
      cmp("lora y", lora_s.forward(x), lora_d.forward(x));
      cmp("lora dx", lora_s.backward(dy), lora_d.backward(dy));
      cmp("lora dA", lora_s.grad_lora_A(), lora_d.grad_lora_A());
      dora_s.prepare_inference();
      dora_d.prepare_inference();
      cmp("dora eval y", dora_s.forward(x), dora_d.forward(x));
      Mat<S> y(N, d_out), u;
      dora_s.infer(x, y, u);
      cmp("dora infer", y, dora_d.forward(x));
      cmp("dora merge", dora_s.merge().weight, dora_d.merge().weight);
      cmp("lora merge", lora_s.merged_weight(), lora_d.merged_weight());
      std::printf("storage: %-4s W, %-6s compute, N %2ld: worst relative error vs the dense layer %.2e\n",
                  storage_name<Storage>(), std::is_same<S, float>::value ? "float" : "double", static_cast<long>(N),
                  worst);
    };
    check(float{}, 1e-5);
    check(double{}, 1e-13);
  }
}

TEST_CASE("DoRA's norm on a stored W, in float, within the factored norm's bound of a double dense norm", "[storage]") {
  const Eigen::Index d_out = 256, d_in = 768, r = 16;
  const Mat<float> W0 = random_matrix<float>(d_out, d_in, 9, 0.02);
  const std::vector<dora::bfloat16> wb = store<dora::bfloat16>(W0);
  const std::vector<dora::BlockQ8_0> wq = store<dora::BlockQ8_0>(W0);
  const Mat<float> A = random_matrix<float>(r, d_in, 10, 0.05), B = random_matrix<float>(d_out, r, 11, 0.05);
  dora::AdapterConfig c;
  c.rank = r;
  c.alpha = 32;
  const auto measure = [&](const auto& base, const char* name) {
    using Storage = std::decay_t<decltype(*base.weight.data)>;
    dora::DoraLinear<float, Storage> layer(base, c, A, B);
    const Mat<double> Wd = dora::dequantize<double>(base.weight);
    const Vec<double> dense =
        dora::row_norm_dense(Wd, Mat<double>(A.cast<double>()), Mat<double>(B.cast<double>()), 2.0);
    const Vec<double> got = layer.compute_row_norm().template cast<double>();
    const double err = ((got - dense).array() / dense.array()).abs().maxCoeff();
    const double bound = 8.0 * static_cast<double>(d_in + r) * std::numeric_limits<float>::epsilon();
    std::printf(
        "storage: DoRA norm, %s W, float: max relative error %.2e vs a double dense norm (bound 8 (d_in + r) "
        "eps = %.2e)\n",
        name, err, bound);
    CHECK(err <= bound);
  };
  measure(dora::borrow<float>(wb.data(), d_out, d_in), "bf16");
  measure(dora::borrow_q8_0<float>(wq, d_out, d_in), "q8_0");
  const std::vector<dora::BlockQ4_0> w4 = store<dora::BlockQ4_0>(W0);
  measure(dora::borrow<float>(w4, d_out, d_in), "q4_0");
}

TEST_CASE("A row whose direction cancels is recomputed from the stored values", "[storage]") {
  // V_0 = W_0 + s B_0 A = 1e-4 W_0: the factored n_0^2 cancels, so row 0 takes the direct path,
  // which reads W_0 from the stored weight.
  const Eigen::Index d_out = 8, d_in = 64, r = 2;
  const std::vector<dora::bfloat16> stored = store<dora::bfloat16>(random_matrix<float>(d_out, d_in, 17));
  const dora::BaseLayer<double, dora::bfloat16> base = dora::borrow<double>(stored.data(), d_out, d_in);
  const Mat<double> W = dora::dequantize<double>(base.weight);
  dora::AdapterConfig c;
  c.rank = r;
  c.alpha = 2;  // s = 1
  Mat<double> A = random_matrix<double>(r, d_in, 18, 0.1), B = random_matrix<double>(d_out, r, 19, 0.1);
  A.row(0) = W.row(0);
  B.row(0) << -(1.0 - 1e-4), 0.0;
  dora::DoraLinear<double, dora::bfloat16> layer(base, c, A, B);
  layer.forward(random_matrix<double>(3, d_in, 20));
  const dora::Vector<double> n = layer.row_norm();
  const dora::Vector<double> dense = dora::row_norm_dense(W, A, B, 1.0);
  const double err = std::abs(n[0] - dense[0]) / dense[0];
  std::printf("storage: cancelling row: %ld row(s) recomputed, n_0 relative error %.2e (n_0 / ||W_0|| = %.1e)\n",
              static_cast<long>(layer.rows_recomputed()), err, dense[0] / W.row(0).norm());
  CHECK(layer.rows_recomputed() >= 1);
  CHECK(err <= 1e-9);
}

TEST_CASE("A convolution on a Q8_0 W equals the convolution on the W it encodes", "[storage]") {
  dora::ConvGeometry g;
  g.dims = 2;
  g.in_channels = 8;
  g.out_channels = 6;
  g.kernel = {2, 2, 1};  // in k = 32: one Q8_0 block per output channel
  g.stride = {1, 1, 1};
  g.padding = {1, 0, 0};
  g.dilation = {1, 1, 1};
  g.input = {5, 4, 1};
  const std::vector<dora::BlockQ8_0> stored = dora::quantize_q8_0(random_matrix<float>(6, 32, 21));
  const Vec<double> b = random_vector<double>(6, 22);
  const dora::ConvBase<double, dora::BlockQ8_0> sbase = dora::borrow_conv<double>(stored.data(), g, b.data());
  const Mat<double> W = dora::dequantize<double>(sbase.lowered.weight);
  dora::AdapterConfig c;
  c.rank = 4;
  c.norm_gradient = dora::NormGradient::exact;
  const Mat<double> A = random_matrix<double>(4, 32, 23, 0.3), B = random_matrix<double>(6, 4, 24, 0.3);
  dora::DoraConv<double, dora::BlockQ8_0> layer(sbase, c, A, B);
  dora::DoraConv<double> dense(dora::borrow_conv(W, b, g), c, A, B);
  const Mat<double> x = random_matrix<double>(3, 8 * 20, 25);
  const Mat<double> y = layer.forward(x), y_ref = dense.forward(x);
  const Mat<double> dy = random_matrix<double>(y.rows(), y.cols(), 26);
  const Mat<double> dx = layer.backward(dy), dx_ref = dense.backward(dy);
  const double err = std::max(
      {rel_err(y, y_ref), rel_err(dx, dx_ref), rel_err(layer.grad_lora_A(), dense.grad_lora_A()),
       rel_err(layer.grad_lora_B(), dense.grad_lora_B()), rel_err(layer.grad_magnitude(), dense.grad_magnitude())});
  std::printf("storage: DoRA Conv2d on a q8_0 W vs the dense conv: worst relative error %.2e\n", err);
  CHECK(err <= 1e-13);
}

// Grouped: the products take each group's rows of the stored W in place, the grouped norm its
// strided chunks (rows c, c + G, ...). A depthwise Conv1d on bf16 (in / groups x k = 3, no block
// format fits) and a Conv2d with 2 groups on Q4_0 (in / groups x k = 32); exact and detached.
TEMPLATE_TEST_CASE("A grouped convolution on a stored W equals the convolution on the W it encodes", "[storage]",
                   dora::bfloat16, dora::BlockQ4_0) {
  using Storage = TestType;
  constexpr bool blocks = dora::detail::storage_block<Storage>() > 1;
  dora::ConvGeometry g;
  g.dims = blocks ? 2 : 1;
  g.in_channels = blocks ? 16 : 6;
  g.out_channels = blocks ? 8 : 12;
  g.groups = blocks ? 2 : 6;
  g.kernel = blocks ? std::array<Eigen::Index, 3>{2, 2, 1} : std::array<Eigen::Index, 3>{3, 1, 1};
  g.stride = {1, 1, 1};
  g.padding = {1, 0, 0};
  g.dilation = {1, 1, 1};
  g.input = blocks ? std::array<Eigen::Index, 3>{4, 3, 1} : std::array<Eigen::Index, 3>{7, 1, 1};
  const Eigen::Index rows = g.out_channels, cols = g.weight_cols(), r = blocks ? 4 : 6;  // B: out x r / groups
  const std::vector<Storage> stored = dora::encode_weight<Storage>(random_matrix<float>(rows, cols, 31));
  const Vec<double> b = random_vector<double>(rows, 32);
  const dora::ConvBase<double, Storage> sbase = dora::borrow_conv<double>(stored.data(), g, b.data());
  const Mat<double> W = dora::dequantize<double>(sbase.lowered.weight);
  const Mat<double> A = random_matrix<double>(r, g.in_channels * g.kernel_volume(), 33, 0.3);
  const Mat<double> B = random_matrix<double>(rows, r / g.groups, 34, 0.3);
  const Mat<double> x = random_matrix<double>(3, g.in_channels * g.input_volume(), 35);
  double worst = 0.0;
  for (dora::NormGradient mode : {dora::NormGradient::exact, dora::NormGradient::detached}) {
    dora::AdapterConfig c;
    c.rank = r;
    c.norm_gradient = mode;
    dora::DoraConv<double, Storage> layer(sbase, c, A, B);
    dora::DoraConv<double> dense(dora::borrow_conv(W, b, g), c, A, B);
    dora::LoraConv<double, Storage> lora(sbase, c, A, B);
    dora::LoraConv<double> lora_dense(dora::borrow_conv(W, b, g), c, A, B);
    const Mat<double> y = layer.forward(x), y_ref = dense.forward(x);
    const Mat<double> dy = random_matrix<double>(y.rows(), y.cols(), 36);
    const Mat<double> dx = layer.backward(dy), dx_ref = dense.backward(dy);
    worst = std::max(
        {worst, rel_err(layer.magnitude(), dense.magnitude()), rel_err(y, y_ref), rel_err(dx, dx_ref),
         rel_err(layer.grad_lora_A(), dense.grad_lora_A()), rel_err(layer.grad_lora_B(), dense.grad_lora_B()),
         rel_err(layer.grad_magnitude(), dense.grad_magnitude()), rel_err(lora.forward(x), lora_dense.forward(x)),
         rel_err(lora.backward(dy), lora_dense.backward(dy)), rel_err(lora.grad_lora_A(), lora_dense.grad_lora_A())});
  }
  std::printf("storage: grouped conv (groups %ld) on a %s W vs the dense conv: worst relative error %.2e\n",
              static_cast<long>(g.groups), storage_name<Storage>(), worst);
  CHECK(worst <= 1e-13);
}

// The embedding's norm runs over the table's columns: its products are P^T = A T (the table's
// tiles walked by columns) and the exact gradient's G T^T (by rows), ||T_:,j||^2 the table's
// column norms. 600 x 544: two row tiles, two column tiles, partial ones, threaded.
TEMPLATE_TEST_CASE("An embedding on a stored table equals the embedding on the table it encodes", "[storage]",
                   dora::bfloat16, dora::BlockQ4_0) {
  using Storage = TestType;
  const Eigen::Index V = 600, E = 544, r = 8, pad = 5;
  const std::vector<Storage> stored = dora::encode_weight<Storage>(random_matrix<float>(V, E, 41));
  dora::TokenIds ids(11);
  ids << 0, 5, 17, 599, 5, 300, 511, 512, 17, 2, 450;
  double worst = 0.0;
  for (dora::NormGradient mode : {dora::NormGradient::exact, dora::NormGradient::detached}) {
    const auto check = [&](auto scalar_tag, double tol) {
      using S = decltype(scalar_tag);
      const dora::EmbeddingBase<S, Storage> sbase = dora::borrow_embedding<S>(stored, V, E, pad);
      const Mat<S> W = dora::dequantize<S>(sbase.weight);
      const Mat<S> A = random_matrix<S>(r, V, 42, 0.3), B = random_matrix<S>(E, r, 43, 0.3);
      dora::AdapterConfig c;
      c.rank = r;
      c.alpha = 16;
      c.norm_gradient = mode;
      dora::DoraEmbedding<S, Storage> layer(sbase, c, A, B);
      dora::DoraEmbedding<S> dense(dora::borrow_embedding(W, pad), c, A, B);
      dora::LoraEmbedding<S, Storage> lora(sbase, c, A, B);
      dora::LoraEmbedding<S> lora_dense(dora::borrow_embedding(W, pad), c, A, B);
      const Mat<S> dy = random_matrix<S>(ids.size(), E, 44);
      const auto cmp = [&](const char* what, const auto& got, const auto& want) {
        const double e = rel_err(got, want);
        INFO(storage_name<Storage>() << " " << what << " relative error " << e);
        CHECK(e <= tol);
        worst = std::max(worst, e);
      };
      cmp("dora magnitude", layer.magnitude(), dense.magnitude());
      cmp("dora y", layer.forward(ids), dense.forward(ids));
      layer.backward_parameters(dy);
      dense.backward_parameters(dy);
      cmp("dora dA", layer.grad_lora_A(), dense.grad_lora_A());
      cmp("dora dB", layer.grad_lora_B(), dense.grad_lora_B());
      cmp("dora dm", layer.grad_magnitude(), dense.grad_magnitude());
      cmp("lora y", lora.forward(ids), lora_dense.forward(ids));
      lora.backward_parameters(dy);
      lora_dense.backward_parameters(dy);
      cmp("lora dA", lora.grad_lora_A(), lora_dense.grad_lora_A());
      layer.prepare_inference();
      dense.prepare_inference();
      Mat<S> y(ids.size(), E), u;
      layer.infer(ids, y, u);
      cmp("dora infer", y, dense.forward(ids));
      cmp("dora merge", layer.merge().weight, dense.merge().weight);
      cmp("lora merge", lora.merged_weight(), lora_dense.merged_weight());
    };
    check(float{}, 1e-5);
    check(double{}, 1e-13);
  }
  std::printf("storage: embedding on a %s table (600 x 544) vs the dense table: worst relative error %.2e\n",
              storage_name<Storage>(), worst);
  // A cancelling norm row of the lowered W is a column of the table, read block by block.
  const dora::EmbeddingBase<double, Storage> base = dora::borrow_embedding<double>(stored, V, E);
  const Mat<double> T = dora::dequantize<double>(base.weight);
  const dora::detail::TransposedStored<Storage> lowered{base.weight};
  Eigen::Matrix<double, 1, Eigen::Dynamic> column(V);
  double column_err = 0.0;
  for (Eigen::Index j : {Eigen::Index(0), Eigen::Index(31), Eigen::Index(33), Eigen::Index(543)}) {
    dora::detail::weight_row(lowered, j, column);
    column_err = std::max(column_err, (column.transpose() - T.col(j)).cwiseAbs().maxCoeff());
  }
  CHECK(column_err == 0.0);
  const Vec<double> col_sq = dora::detail::weight_row_squared_norms<double>(lowered);
  CHECK(rel_err(col_sq, Vec<double>(T.colwise().squaredNorm().transpose())) <= 1e-14);
}

TEST_CASE("Stored weights: errors name what was wrong", "[storage]") {
  const Mat<float> W = random_matrix<float>(4, 40, 12);
  CHECK_THROWS_WITH(dora::quantize_q8_0(W), Catch::Contains("multiple of 32 columns, got 4 x 40"));
  Mat<float> bad = random_matrix<float>(2, 32, 13);
  bad(1, 5) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(dora::quantize_q8_0(bad), Catch::Contains("W(1, 5) is not finite"));
  const std::vector<dora::BlockQ8_0> q = dora::quantize_q8_0(random_matrix<float>(4, 64, 14));
  CHECK_THROWS_WITH(dora::borrow_q8_0<float>(q, 4, 96), Catch::Contains("needs 4 x 3 blocks"));
  CHECK_THROWS_WITH(dora::borrow<float>(q.data(), 4, 48), Catch::Contains("q8_0 weight needs d_in a multiple of 32"));
  CHECK_THROWS_WITH(dora::quantize_q4_0(W), Catch::Contains("quantize_q4_0: W must have a positive multiple of 32"));
  Mat<float> huge = random_matrix<float>(1, 32, 17);
  huge(0, 3) = 1e9f;  // d = amax / 127 overflows a half
  CHECK_THROWS_WITH(dora::quantize_q8_0(huge), Catch::Contains("the scale of row 0's block 0 overflows a half"));
  CHECK_THROWS_WITH(dora::borrow_embedding<float>(q, 4, 96),
                    Catch::Contains("q8_0 embedding table of 4 x 96 needs 4 x 3"));
  const std::vector<dora::bfloat16> tb = dora::encode_weight<dora::bfloat16>(random_matrix<float>(4, 40, 18));
  CHECK_THROWS_WITH(dora::borrow_embedding<float>(q.data(), 4, 40),
                    Catch::Contains("q8_0 embedding table needs embedding_dim a multiple of 32, got 4 x 40"));
  CHECK_THROWS_WITH(dora::borrow<float>(tb, 4, 41),
                    Catch::Contains("bf16 weight of 4 x 41 needs 4 x 41 values, got 160"));
  const auto wb = dora::round_weight<dora::bfloat16>(random_matrix<float>(4, 8, 15));
  const Vec<float> bias = Vec<float>::Zero(5);
  CHECK_THROWS_WITH(dora::borrow<float>(wb, bias), Catch::Contains("bias has 5 entries but W has d_out = 4"));
  // A stored W with the wrong d_in for the adapter: the layer's own message.
  dora::AdapterConfig c;
  c.rank = 2;
  dora::DoraLinear<float, dora::bfloat16> layer(dora::borrow<float>(wb), c);
  CHECK_THROWS_WITH(layer.forward(random_matrix<float>(3, 9, 16)), Catch::Contains("x must have d_in = 8 columns"));
}

TEST_CASE("f16 widening of every bit pattern through the storage path: infinities, NaN, subnormals", "[storage]") {
  // All 65536 patterns, decoded by the definition written here (sign, 5-bit exponent biased by 15,
  // 10-bit fraction; exponent 0 subnormal, 31 infinite or NaN) and by what the layers read back.
  Eigen::Matrix<dora::float16, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> H(64, 1024);
  for (int k = 0; k < 65536; ++k) {
    const std::uint16_t bits = static_cast<std::uint16_t>(k);
    std::memcpy(static_cast<void*>(H.data() + k), &bits, sizeof bits);
  }
  const auto definition = [](int k) {
    const int sign = k >> 15, exponent = (k >> 10) & 31, fraction = k & 1023;
    double v = 0.0;
    if (exponent == 31)
      v = fraction == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
    else if (exponent == 0)
      v = std::ldexp(static_cast<double>(fraction), -24);
    else
      v = std::ldexp(1024.0 + fraction, exponent - 25);
    return sign != 0 ? -v : v;
  };
  const Mat<double> back_d = dora::dequantize<double>(dora::borrow<double>(H).weight);
  const Mat<float> back_f = dora::dequantize<float>(dora::borrow<float>(H).weight);
  long wrong = 0, nan = 0, inf = 0, subnormal = 0;
  for (int k = 0; k < 65536; ++k) {
    const double want = definition(k);
    for (const double got : {back_d.data()[k], static_cast<double>(back_f.data()[k])}) {
      const bool same = std::isnan(want) ? std::isnan(got) && std::signbit(got) == std::signbit(want)
                                         : got == want && std::signbit(got) == std::signbit(want);
      if (!same && wrong++ < 5) std::printf("f16 pattern 0x%04x: %.9g, the definition %.9g\n", k, got, want);
    }
    nan += std::isnan(want);
    inf += std::isinf(want);
    subnormal += ((k >> 10) & 31) == 0 && (k & 1023) != 0;
  }
  std::printf("storage: f16 widening of all 65536 patterns (%ld NaN, %ld infinite, %ld subnormal): %ld differ\n", nan,
              inf, subnormal, wrong);
  CHECK(nan == 2046);
  CHECK(inf == 2);
  CHECK(wrong == 0);
  // The tiled product reads the same values: with x = I, y = x W^T is W^T entry for entry (every
  // finite pattern, subnormals included; one column of W per input row, exact: one non-zero term).
  const Eigen::Index finite_rows = 30;  // rows 0..29 of H hold patterns 0x0000..0x77ff: finite, positive
  Eigen::Matrix<dora::float16, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> F = H.topRows(finite_rows);
  F.bottomRows(1).leftCols(512) = H.middleRows(32, 1).leftCols(512);  // negative zero and negative subnormals
  dora::AdapterConfig c;
  c.rank = 2;
  dora::LoraLinear<float, dora::float16> layer(dora::borrow<float>(F), c);
  layer.eval();
  const Mat<float> y = layer.forward(Mat<float>::Identity(1024, 1024));
  const Mat<float> want = dora::dequantize<float>(dora::borrow<float>(F).weight).transpose();
  const double e = rel_err(y, want);
  std::printf("storage: f16 tiled product of every finite pattern (I W^T) vs the widened W: %.3g\n", e);
  CHECK(e == 0.0);
}

TEMPLATE_TEST_CASE("Stored products split unevenly over 2 and 3 threads equal the dense layer", "[storage][threads]",
                   dora::bfloat16, dora::float16, dora::BlockQ8_0, dora::BlockQ4_0) {
  using Storage = TestType;
  constexpr Eigen::Index block = dora::detail::StorageTraits<Storage>::block;
  // Rows that no thread count divides (4097, 32001), columns that are odd where the format allows
  // (97, 33; 96, 32 for blocks), and a wide W (8001 / 8000 columns) whose columns split over threads.
  struct Shape {
    Eigen::Index d_out, d_in;
  };
  const std::vector<Shape> shapes{
      {4097, block == 1 ? 97 : 96}, {32001, block == 1 ? 33 : 32}, {37, block == 1 ? 8001 : 8000}};
#ifdef _OPENMP
  const int saved = omp_get_max_threads();
  const std::vector<int> thread_counts{2, 3};  // one thread: every other stored-weight test
#else
  const std::vector<int> thread_counts{1};
#endif
  for (const Shape& sh : shapes) {
    const Mat<float> W0 = random_matrix<float>(sh.d_out, sh.d_in, 3, 0.05);
    const std::vector<Storage> stored = dora::encode_weight<Storage>(W0);
    const Vec<float> b = random_vector<float>(sh.d_out, 4);
    const dora::BaseLayer<float, Storage> sbase = dora::borrow<float>(stored, sh.d_out, sh.d_in, b.data());
    const Mat<float> W = dora::dequantize<float>(sbase.weight);
    const Eigen::Index r = 4;
    const Mat<float> A = random_matrix<float>(r, sh.d_in, 5, 0.05), B = random_matrix<float>(sh.d_out, r, 6, 0.05);
    dora::AdapterConfig c;
    c.rank = r;
    c.alpha = 8;
    c.norm_gradient = dora::NormGradient::exact;
    for (const int threads : thread_counts) {
#ifdef _OPENMP
      omp_set_num_threads(threads);
#endif
      for (const Eigen::Index N : {Eigen::Index(3), Eigen::Index(24)}) {
        const Mat<float> x = random_matrix<float>(N, sh.d_in, 7), dy = random_matrix<float>(N, sh.d_out, 8);
        dora::DoraLinear<float, Storage> dora_s(sbase, c, A, B);
        dora::DoraLinear<float> dora_d(dora::borrow(W, b), c, A, B);
        const double ey = rel_err(dora_s.forward(x), dora_d.forward(x));
        const double edx = rel_err(dora_s.backward(dy), dora_d.backward(dy));
        const double edA = rel_err(dora_s.grad_lora_A(), dora_d.grad_lora_A());
        const double edm = rel_err(dora_s.grad_magnitude(), dora_d.grad_magnitude());
        dora_s.prepare_inference();
        dora_d.prepare_inference();
        const double eval = rel_err(dora_s.forward(x), dora_d.forward(x));
        const double worst = std::max({ey, edx, edA, edm, eval});
        std::printf("storage: %-4s %5ld x %4ld, %d thread(s), N %2ld: worst relative error vs the dense layer %.2e\n",
                    storage_name<Storage>(), static_cast<long>(sh.d_out), static_cast<long>(sh.d_in), threads,
                    static_cast<long>(N), worst);
        INFO("y " << ey << " dx " << edx << " dA " << edA << " dm " << edm << " eval " << eval);
        CHECK(worst <= 2e-5);
      }
    }
  }
#ifdef _OPENMP
  omp_set_num_threads(saved);
#endif
}
