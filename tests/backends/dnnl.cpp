// dora::dnnl's bf16 compute against float64, within bounds derived from where bf16
// rounding enters (docs/bf16.md). Built where oneDNN is found (target dora::dnnl); on a CPU without
// bf16 units the backend is off, the float path runs, and the output says so (the bounds then hold
// with room to spare).
//
// The products, per output entry y = sum_k x_k w_k (u = 2^-8, bf16's unit roundoff; gamma_K =
// K 2^-24 bounds float accumulation over K terms):
//   |y - sum_k bf16(x_k) w_k| <= gamma_K sum_k |bf16(x_k) w_k|
//   |y - sum_k x_k w_k|       <= (u (1 + gamma_K) + gamma_K) sum_k |x_k w_k|
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <dora/dnnl/bf16_matmul.hpp>
#include <dora/dora.hpp>
#include <dora/io/safetensors.hpp>
#include <nlohmann/json.hpp>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <string>

#include "io_support.hpp"
#include "test_support.hpp"

using namespace dora_test;

namespace {

using Md = Mat<double>;

// Worst |y - ref| / bound over the entries (<= 1 passes), with bound = c * (|X| |W|^T) entrywise.
double worst_ratio(const Mat<float>& y, const Md& ref, const Md& abs_products, double c) {
  double worst = 0.0;
  for (Eigen::Index i = 0; i < y.rows(); ++i)
    for (Eigen::Index j = 0; j < y.cols(); ++j) {
      const double bound = c * abs_products(i, j) + 1e-300;
      worst = std::max(worst, std::abs(static_cast<double>(y(i, j)) - ref(i, j)) / bound);
    }
  return worst;
}

}  // namespace

TEST_CASE("bf16 product and adjoint through oneDNN are within their bounds of float64", "[dnnl][bf16]") {
  const Eigen::Index M = 37, K = 300, N = 53, ldx = K + 5, ldw = K + 3;
  const Mat<float> Xfull = random_matrix<float>(M, ldx, 1);
  const Mat<float> Wf = random_matrix<float>(N, ldw, 2);
  std::vector<dora::bfloat16> W(static_cast<std::size_t>(N * ldw));
  for (Eigen::Index i = 0; i < N * ldw; ++i) W[static_cast<std::size_t>(i)] = dora::bfloat16(Wf.data()[i]);
  Md Wd(N, K), Xd(M, K), Xr(M, K);
  for (Eigen::Index n = 0; n < N; ++n)
    for (Eigen::Index k = 0; k < K; ++k) Wd(n, k) = static_cast<double>(static_cast<float>(W[n * ldw + k]));
  for (Eigen::Index m = 0; m < M; ++m)
    for (Eigen::Index k = 0; k < K; ++k) {
      Xd(m, k) = Xfull(m, k);
      Xr(m, k) = static_cast<double>(static_cast<float>(dora::bfloat16(Xfull(m, k))));
    }
  const double gamma = static_cast<double>(K) * 0x1.0p-24, u = 0x1.0p-8;

  Mat<float> Y(M, N);
  // oneDNN 2.6 runs bf16 matmuls from AVX-512 up (emulated without bf16 units); below that (an AVX2
  // CPU) it has no such primitive and the call must fail with an exception, not crash.
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  const auto avx512 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core);
  if ((isa & avx512) != avx512) {
    std::printf("dnnl bf16 product: oneDNN has no bf16 matmul on this CPU (no AVX-512): the call must throw\n");
    CHECK_THROWS(dora::dnnl_backend::product(Xfull.data(), M, K, ldx, W.data(), N, ldw, Y.data(), N));
    CHECK_FALSE(dora::dnnl_backend::has_bf16_units());
    return;
  }
  dora::dnnl_backend::product(Xfull.data(), M, K, ldx, W.data(), N, ldw, Y.data(), N);
  const double r_rounded = worst_ratio(Y, Xr * Wd.transpose(), Xr.cwiseAbs() * Wd.cwiseAbs().transpose(), gamma);
  const double r_float =
      worst_ratio(Y, Xd * Wd.transpose(), Xd.cwiseAbs() * Wd.cwiseAbs().transpose(), u * (1 + gamma) + gamma);
  const double rel = rel_err(Y.cast<double>().eval(), (Xd * Wd.transpose()).eval());
  std::printf("dnnl bf16 product: error / bound %.3f (vs rounded X), %.3f (vs float X); max rel error %.2e\n",
              r_rounded, r_float, rel);
  CHECK(r_rounded <= 1.0);
  CHECK(r_float <= 1.0);

  // Accumulate: Y += X W^T.
  Mat<float> Y2 = Y;
  dora::dnnl_backend::product(Xfull.data(), M, K, ldx, W.data(), N, ldw, Y2.data(), N, true);
  CHECK(rel_err(Y2, Mat<float>(2.0f * Y)) <= 1e-6);

  // Adjoint: dX = G W.
  const Mat<float> G = random_matrix<float>(M, N, 3);
  Md Gd = G.cast<double>(), Gr(M, N);
  for (Eigen::Index i = 0; i < G.size(); ++i)
    Gr.data()[i] = static_cast<double>(static_cast<float>(dora::bfloat16(G.data()[i])));
  Mat<float> dX(M, K);
  dora::dnnl_backend::adjoint(G.data(), M, N, N, W.data(), K, ldw, dX.data(), K);
  const double gN = static_cast<double>(N) * 0x1.0p-24;
  const double a_rounded = worst_ratio(dX, Gr * Wd, Gr.cwiseAbs() * Wd.cwiseAbs(), gN);
  const double a_float = worst_ratio(dX, Gd * Wd, Gd.cwiseAbs() * Wd.cwiseAbs(), u * (1 + gN) + gN);
  std::printf("dnnl bf16 adjoint: error / bound %.3f (vs rounded G), %.3f (vs float G)\n", a_rounded, a_float);
  CHECK(a_rounded <= 1.0);
  CHECK(a_float <= 1.0);
}

namespace {

struct LayerCase {
  Eigen::Index d_out, d_in, r, n;
  dora::NormGradient norm_gradient;
  const char* name;
};

// Worst |a - ref| / (bound + slack) over the entries, slack = 2^-16 max |ref| (the float path's
// own rounding and the 2^-16 of DoRA's split products).
double worst_bound_ratio(const Mat<float>& a, const Md& ref, const Md& bound) {
  const double slack = 0x1.0p-16 * ref.cwiseAbs().maxCoeff() + 1e-300;
  double worst = 0.0;
  for (Eigen::Index i = 0; i < ref.rows(); ++i)
    for (Eigen::Index j = 0; j < ref.cols(); ++j)
      worst = std::max(worst, std::abs(static_cast<double>(a(i, j)) - ref(i, j)) / (bound(i, j) + slack));
  return worst;
}

// The per-entry bounds of the bf16 path's error against float64 (derivation below).
struct Bounds {
  Md y, dx, dm, dA, dB;
};
Bounds derive_bounds(const Md& W, const Md& A, const Md& B, const Md& x, const Md& G, const Vec<double>& m, double s,
                     bool exact) {
  const Vec<double> nrm = (W + s * B * A).rowwise().norm();
  const Vec<double> g = m.cwiseQuotient(nrm);
  const double u = 0x1.0p-8;
  const double c_in = u + static_cast<double>(W.cols()) * 0x1.0p-24;
  const double c_out = u + static_cast<double>(W.rows()) * 0x1.0p-24;
  const Md XW = x.cwiseAbs() * W.cwiseAbs().transpose();  // n x d_out
  Bounds e;
  e.y = c_in * XW * g.cwiseAbs().asDiagonal();
  const Vec<double> e_dm = c_in * (G.cwiseAbs().cwiseProduct(XW)).colwise().sum().transpose().cwiseQuotient(nrm);
  e.dm = e_dm;
  e.dx = c_out * (G * g.asDiagonal()).cwiseAbs() * W.cwiseAbs();
  e.dA = Md::Zero(A.rows(), A.cols());
  e.dB = Md::Zero(B.rows(), B.cols());
  if (exact) {
    const Vec<double> b = g.cwiseAbs().cwiseProduct(e_dm).cwiseQuotient(nrm);
    const Md P = W * A.transpose(), K = A * A.transpose();
    e.dB = s * b.asDiagonal() * (P.cwiseAbs() + s * B.cwiseAbs() * K.cwiseAbs());
    const Md Bb = b.asDiagonal() * B.cwiseAbs();  // diag(b) |B|
    e.dA = s * (Bb.transpose() * W.cwiseAbs() + s * (B.cwiseAbs().transpose() * Bb) * A.cwiseAbs());
  }
  return e;
}

struct Outputs {
  Mat<float> y, dx, dm, dA, dB;
};
// One training step of a float DoRA layer on the stored bf16 values (the backend where it is on).
Outputs bf16_step(const std::vector<dora::bfloat16>& wb, Eigen::Index d_out, Eigen::Index d_in, const Vec<float>& bias,
                  const dora::AdapterConfig& c, const Mat<float>& A, const Mat<float>& B, const Vec<float>& m,
                  const Mat<float>& x, const Mat<float>& G) {
  dora::DoraLinear<float, dora::bfloat16> layer(
      dora::borrow<float>(wb, d_out, d_in, bias.size() > 0 ? bias.data() : nullptr), c, A, B);
  layer.set_magnitude(m);
  Outputs o;
  o.y = layer.forward(x);
  o.dx = layer.backward(G);
  o.dm = layer.grad_magnitude();
  o.dA = layer.grad_lora_A();
  o.dB = layer.grad_lora_B();
  return o;
}

// Prints and checks every output's worst error / bound.
void check_bounds(const std::string& name, const Outputs& o, const Md& y, const Md& dx, const Md& dm, const Md& dA,
                  const Md& dB, const Bounds& e) {
  const double ry = worst_bound_ratio(o.y, y, e.y), rdx = worst_bound_ratio(o.dx, dx, e.dx);
  const double rdm = worst_bound_ratio(o.dm, dm, e.dm), rdA = worst_bound_ratio(o.dA, dA, e.dA);
  const double rdB = worst_bound_ratio(o.dB, dB, e.dB);
  std::printf(
      "dnnl %s: error / bound: y %.3f, dx %.3f, dm %.3f, dA %.3f, dB %.3f; max rel error y %.1e, dx %.1e, dm %.1e, "
      "dA %.1e, dB %.1e\n",
      name.c_str(), ry, rdx, rdm, rdA, rdB, rel_err(o.y, y), rel_err(o.dx, dx), rel_err(o.dm, dm), rel_err(o.dA, dA),
      rel_err(o.dB, dB));
  INFO(name);
  CHECK(ry <= 1.0);
  CHECK(rdx <= 1.0);
  CHECK(rdm <= 1.0);
  CHECK(rdA <= 1.0);
  CHECK(rdB <= 1.0);
}

}  // namespace

// The float64 reference is the double layer on the same stored values (W widened exactly): the
// layer whose every gradient the finite-difference tests check (tests/layers/gradients.cpp). With the
// backend, bf16 rounding enters in two places only: the batch x (dropped) in the forward's product,
// and G diag(g) in dx's product. DoRA's own products with W (the norm's P^T = A W^T, the exact
// gradient's (diag(beta) B)^T W) go in two bf16 parts (2^-16), and everything else is float. So,
// with c = u + gamma_K, X = |x|, Wa = |W| (first order; n and g are float-accurate):
//   y:  |dy_tj| <= |g_j| c (X Wa^T)_tj
//   dm: |d dm_j| <= sum_t |G_tj| c (X Wa^T)_tj / n_j =: e_j
//   dx: c' (|G diag(g)| Wa)  (c' = u + gamma_{d_out})
//   dA, dB (detached norm, PEFT's): no rounded quantity enters them: the slack only
//   dA, dB (exact): through beta_j = -g_j dm_j / n_j, |d beta_j| <= |g_j| e_j / n_j =: b_j:
//     dB: s b_j (|P_j| + s |B_j| |K|),  dA: s (|B|^T diag(b) Wa + s (|B|^T diag(b) |B|) |A|)
TEST_CASE("DoRA on a bf16 W through oneDNN: y and every gradient within the derived bounds of float64",
          "[dnnl][bf16]") {
  std::printf("dnnl: bf16 units: %s; backend %s\n", dora::dnnl_backend::units_name(),
              dora::dnnl_backend::enabled() ? "on" : "off (no bf16 units: the float path runs)");
  const LayerCase cases[] = {{96, 128, 8, 40, dora::NormGradient::detached, "96x128 r8 n40 detached"},
                             {96, 128, 8, 40, dora::NormGradient::exact, "96x128 r8 n40 exact"},
                             {70, 301, 5, 33, dora::NormGradient::exact, "70x301 r5 n33 exact"},
                             {256, 200, 16, 3, dora::NormGradient::detached, "256x200 r16 n3 detached"},
                             // Large enough for the products to run on threads.
                             {512, 520, 8, 24, dora::NormGradient::exact, "512x520 r8 n24 exact"},
                             {512, 520, 8, 24, dora::NormGradient::detached, "512x520 r8 n24 detached"}};
  for (const LayerCase& lc : cases) {
    const Eigen::Index d_out = lc.d_out, d_in = lc.d_in, r = lc.r, n = lc.n;
    const Mat<float> Wf = random_matrix<float>(d_out, d_in, 11, 1.0 / std::sqrt(static_cast<double>(d_in)));
    const std::vector<dora::bfloat16> wb = dora::encode_weight<dora::bfloat16>(Wf);
    Md Wd(d_out, d_in);
    for (Eigen::Index i = 0; i < Wd.size(); ++i) Wd.data()[i] = static_cast<float>(wb[static_cast<std::size_t>(i)]);
    const Vec<float> bias = random_vector<float>(d_out, 12, 0.1);
    const Vec<double> bias_d = bias.cast<double>();
    dora::AdapterConfig c;
    c.rank = r;
    c.alpha = 2.0 * static_cast<double>(r);
    c.norm_gradient = lc.norm_gradient;
    const Mat<float> A = random_matrix<float>(r, d_in, 13, 0.1), B = random_matrix<float>(d_out, r, 14, 0.1);
    const Mat<float> x = random_matrix<float>(n, d_in, 15), G = random_matrix<float>(n, d_out, 16);
    const Md Ad = A.cast<double>(), Bd = B.cast<double>(), xd = x.cast<double>(), Gd = G.cast<double>();

    dora::DoraLinear<double> ref(dora::borrow(Wd, bias_d), c, Ad, Bd);
    Vec<double> md = ref.magnitude();
    for (Eigen::Index i = 0; i < md.size(); ++i) md[i] *= 1.0 + 0.2 * std::sin(static_cast<double>(i));
    md = md.cast<float>().cast<double>();  // the same m in both layers
    ref.set_magnitude(md);
    const Md y_ref = ref.forward(xd), dx_ref = ref.backward(Gd);
    const Outputs o = bf16_step(wb, d_out, d_in, bias, c, A, B, md.cast<float>(), x, G);
    check_bounds(lc.name, o, y_ref, dx_ref, ref.grad_magnitude(), ref.grad_lora_A(), ref.grad_lora_B(),
                 derive_bounds(Wd, Ad, Bd, xd, Gd, md, ref.scaling(), lc.norm_gradient == dora::NormGradient::exact));
#ifdef _OPENMP
    // With threads, A's two parts (and the exact gradient's) go in products of their own; on one
    // thread they are stacked under x. Both carry 2^-16: they must agree far inside the bounds above,
    // which are too loose to see a lost part.
    if (omp_get_max_threads() > 1 && d_out * d_in >= 512 * 520) {
      const int threads = omp_get_max_threads();
      omp_set_num_threads(1);
      const Outputs one = bf16_step(wb, d_out, d_in, bias, c, A, B, md.cast<float>(), x, G);
      omp_set_num_threads(threads);
      const double worst = std::max({rel_err(o.y, one.y), rel_err(o.dx, one.dx), rel_err(o.dm, one.dm),
                                     rel_err(o.dA, one.dA), rel_err(o.dB, one.dB)});
      std::printf("dnnl %s: %d threads (parts apart) vs 1 (stacked): max rel difference %.1e\n", lc.name, threads,
                  worst);
      CHECK(worst <= 1e-4);
    }
#endif
  }
}

// Real PEFT 0.21 (tests/data/bf16, tools/make_bf16_reference.py): W rounded to bf16 first, PEFT in
// float32 (its detached norm) and an exact float64 autograd. The same bounds, with PEFT's float32
// rounding inside the slack. Printed beside them: PEFT's own bf16 run against the same reference.
TEST_CASE("DoRA on a bf16 W through oneDNN agrees with PEFT 0.21 within the derived bounds", "[dnnl][bf16][peft]") {
  const std::string dir = std::string(DORA_TEST_DATA_DIR) + "/bf16";
  const nlohmann::json index = read_json(dir + "/index.json");
  REQUIRE(index.size() >= 3);
  for (const auto& entry : index) {
    const std::string name = entry.get<std::string>();
    const nlohmann::json meta = read_json(dir + "/" + name + ".json");
    const dora::io::SafetensorsReader ref(dir + "/" + name + ".safetensors");
    const Mat<float> Wf = ref.matrix<float>("W"), A = ref.matrix<float>("A"), B = ref.matrix<float>("B");
    const Mat<float> x = ref.matrix<float>("x"), G = ref.matrix<float>("dy");
    const Vec<float> m = ref.vector<float>("m");
    const Vec<float> bias = meta.at("bias").get<bool>() ? Vec<float>(ref.vector<float>("bias")) : Vec<float>();
    const std::vector<dora::bfloat16> wb = dora::encode_weight<dora::bfloat16>(Wf);  // exact: W is bf16
    dora::AdapterConfig c;
    c.rank = meta.at("r").get<Eigen::Index>();
    c.alpha = meta.at("alpha").get<double>();
    c.use_rslora = meta.at("use_rslora").get<bool>();
    const auto md = [&](const std::string& key) { return Md(ref.matrix<float>(key).cast<double>()); };
    const auto vd = [&](const std::string& key) { return Md(ref.vector<float>(key).cast<double>()); };
    for (const dora::NormGradient mode : {dora::NormGradient::detached, dora::NormGradient::exact}) {
      c.norm_gradient = mode;
      const bool exact = mode == dora::NormGradient::exact;
      const std::string sfx = exact ? "_exact" : "";
      const Outputs o = bf16_step(wb, Wf.rows(), Wf.cols(), bias, c, A, B, m, x, G);
      const Bounds e = derive_bounds(Wf.cast<double>(), A.cast<double>(), B.cast<double>(), x.cast<double>(),
                                     G.cast<double>(), m.cast<double>(), c.scaling(), exact);
      check_bounds(name + (exact ? " exact" : " (PEFT)"), o, md("y" + sfx), md("grad_x" + sfx), vd("grad_m" + sfx),
                   md("grad_A" + sfx), md("grad_B" + sfx), e);
    }
    std::printf("  PEFT's own bf16 run vs its float32: y %.1e, dx %.1e, dm %.1e, dA %.1e, dB %.1e (max rel error)\n",
                rel_err(md("y_peft_bf16"), md("y")), rel_err(md("grad_x_peft_bf16"), md("grad_x")),
                rel_err(vd("grad_m_peft_bf16"), vd("grad_m")), rel_err(md("grad_A_peft_bf16"), md("grad_A")),
                rel_err(md("grad_B_peft_bf16"), md("grad_B")));
  }
}

// LoRA on the backend: y = x W^T + s (x A^T) B^T + b and dx = G W + s (G B) A round only x and G
// (the same bounds with g = 1); dA and dB take no rounded quantity (slack only).
TEST_CASE("LoRA on a bf16 W through oneDNN: y and every gradient within the derived bounds of float64",
          "[dnnl][bf16]") {
  const Eigen::Index d_out = 160, d_in = 136, r = 6, n = 21;
  const std::vector<dora::bfloat16> wb =
      dora::encode_weight<dora::bfloat16>(random_matrix<float>(d_out, d_in, 31, 1.0 / std::sqrt(136.0)));
  Md Wd(d_out, d_in);
  for (Eigen::Index i = 0; i < Wd.size(); ++i) Wd.data()[i] = static_cast<float>(wb[static_cast<std::size_t>(i)]);
  const Vec<float> bias = random_vector<float>(d_out, 32, 0.1);
  dora::AdapterConfig c;
  c.rank = r;
  c.alpha = 12;
  const Mat<float> A = random_matrix<float>(r, d_in, 33, 0.1), B = random_matrix<float>(d_out, r, 34, 0.1);
  const Mat<float> x = random_matrix<float>(n, d_in, 35), G = random_matrix<float>(n, d_out, 36);
  const Vec<double> bias_d = bias.cast<double>();
  dora::LoraLinear<double> ref(dora::borrow(Wd, bias_d), c, A.cast<double>(), B.cast<double>());
  const Md y_ref = ref.forward(x.cast<double>()), dx_ref = ref.backward(G.cast<double>());
  dora::LoraLinear<float, dora::bfloat16> layer(dora::borrow<float>(wb, d_out, d_in, bias.data()), c, A, B);
  const Mat<float> y = layer.forward(x), dx = layer.backward(G);
  const double u = 0x1.0p-8;
  const Md E_y = (u + d_in * 0x1.0p-24) * x.cast<double>().cwiseAbs() * Wd.cwiseAbs().transpose();
  const Md E_dx = (u + d_out * 0x1.0p-24) * G.cast<double>().cwiseAbs() * Wd.cwiseAbs();
  const double ry = worst_bound_ratio(y, y_ref, E_y), rdx = worst_bound_ratio(dx, dx_ref, E_dx);
  const double rdA = worst_bound_ratio(layer.grad_lora_A(), ref.grad_lora_A(), Md::Zero(r, d_in));
  const double rdB = worst_bound_ratio(layer.grad_lora_B(), ref.grad_lora_B(), Md::Zero(d_out, r));
  std::printf("dnnl LoRA %ldx%ld r%ld n%ld: error / bound: y %.3f, dx %.3f, dA %.3f, dB %.3f\n",
              static_cast<long>(d_out), static_cast<long>(d_in), static_cast<long>(r), static_cast<long>(n), ry, rdx,
              rdA, rdB);
  CHECK(ry <= 1.0);
  CHECK(rdx <= 1.0);
  CHECK(rdA <= 1.0);
  CHECK(rdB <= 1.0);
}

// Finite differences on the backend itself. The backend's forward is not differentiable in x (x
// is rounded to bf16 before the frozen product), but it is in m, A and B, whose every product keeps
// float precision (two bf16 parts where W is involved), so its dm, dA, dB must be the derivatives of
// its own forward: L = <G, y(m, A, B)>, central differences in float along seeded random directions,
// h = 2^-6 (truncation ~h^2, the float rounding of L over 2h ~1e-5 relative here).
TEST_CASE("Finite differences on the oneDNN backend: dm, dA, dB are the derivatives of its own forward",
          "[dnnl][bf16][gradients]") {
  const Eigen::Index d_out = 40, d_in = 56, r = 4, n = 7;
  const std::vector<dora::bfloat16> wb =
      dora::encode_weight<dora::bfloat16>(random_matrix<float>(d_out, d_in, 41, 1.0 / std::sqrt(56.0)));
  const Vec<float> bias = random_vector<float>(d_out, 42, 0.1);
  dora::AdapterConfig c;
  c.rank = r;
  c.alpha = 8;
  c.norm_gradient = dora::NormGradient::exact;
  const Mat<float> A = random_matrix<float>(r, d_in, 43, 0.2), B = random_matrix<float>(d_out, r, 44, 0.2);
  const Mat<float> x = random_matrix<float>(n, d_in, 45), G = random_matrix<float>(n, d_out, 46);
  const Mat<float> DA = random_matrix<float>(r, d_in, 47, 0.2), DB = random_matrix<float>(d_out, r, 48, 0.2);
  Vec<float> m0;
  {
    dora::DoraLinear<float, dora::bfloat16> probe(dora::borrow<float>(wb, d_out, d_in, bias.data()), c, A, B);
    m0 = probe.magnitude().array() * 1.1f;
  }
  const Vec<float> Dm = random_vector<float>(d_out, 49, 0.5);
  const auto loss = [&](const Mat<float>& a, const Mat<float>& b, const Vec<float>& m, bool lora) {
    Mat<float> y;
    if (lora) {
      dora::LoraLinear<float, dora::bfloat16> layer(dora::borrow<float>(wb, d_out, d_in, bias.data()), c, a, b);
      y = layer.forward(x);
    } else {
      dora::DoraLinear<float, dora::bfloat16> layer(dora::borrow<float>(wb, d_out, d_in, bias.data()), c, a, b);
      layer.set_magnitude(m);
      y = layer.forward(x);
    }
    return (G.cast<double>().array() * y.cast<double>().array()).sum();
  };
  const float h = 0x1.0p-6f;
  for (const bool lora : {false, true}) {
    Mat<float> dA, dB;
    Vec<float> dm;
    if (lora) {
      dora::LoraLinear<float, dora::bfloat16> layer(dora::borrow<float>(wb, d_out, d_in, bias.data()), c, A, B);
      layer.forward(x);
      layer.backward(G);
      dA = layer.grad_lora_A();
      dB = layer.grad_lora_B();
    } else {
      dora::DoraLinear<float, dora::bfloat16> layer(dora::borrow<float>(wb, d_out, d_in, bias.data()), c, A, B);
      layer.set_magnitude(m0);
      layer.forward(x);
      layer.backward(G);
      dA = layer.grad_lora_A();
      dB = layer.grad_lora_B();
      dm = layer.grad_magnitude();
    }
    const auto rel = [](double fd, double an) { return std::abs(fd - an) / std::max(std::abs(an), 1e-30); };
    const Mat<float> Ap = A + h * DA, Am = A - h * DA, Bp = B + h * DB, Bm = B - h * DB;
    const double fdA = (loss(Ap, B, m0, lora) - loss(Am, B, m0, lora)) / (2.0 * h);
    const double fdB = (loss(A, Bp, m0, lora) - loss(A, Bm, m0, lora)) / (2.0 * h);
    const double anA = (dA.cast<double>().array() * DA.cast<double>().array()).sum();
    const double anB = (dB.cast<double>().array() * DB.cast<double>().array()).sum();
    double em = 0.0, fdm = 0.0, anm = 0.0;
    if (!lora) {
      const Vec<float> mp = m0 + h * Dm, mm = m0 - h * Dm;
      fdm = (loss(A, B, mp, false) - loss(A, B, mm, false)) / (2.0 * h);
      anm = (dm.cast<double>().array() * Dm.cast<double>().array()).sum();
      em = rel(fdm, anm);
    }
    std::printf("dnnl finite differences (%s, %s): <dA,D> %.6f vs %.6f (rel %.1e), <dB,D> %.6f vs %.6f (rel %.1e)",
                lora ? "LoRA" : "DoRA exact", dora::dnnl_backend::enabled() ? "bf16 backend" : "float fallback", anA,
                fdA, rel(fdA, anA), anB, fdB, rel(fdB, anB));
    if (!lora) std::printf(", <dm,D> %.6f vs %.6f (rel %.1e)", anm, fdm, em);
    std::printf("\n");
    CHECK(rel(fdA, anA) <= 2e-3);
    CHECK(rel(fdB, anB) <= 2e-3);
    CHECK(em <= 2e-3);
  }
}

TEST_CASE("The oneDNN switch: off is today's float path exactly, on is refused without bf16 units", "[dnnl][bf16]") {
  const Eigen::Index d_out = 48, d_in = 64, n = 9;
  const std::vector<dora::bfloat16> wb = dora::encode_weight<dora::bfloat16>(random_matrix<float>(d_out, d_in, 21));
  dora::AdapterConfig c;
  c.rank = 4;
  const Mat<float> A = random_matrix<float>(4, d_in, 22, 0.1), B = random_matrix<float>(d_out, 4, 23, 0.1);
  const Mat<float> x = random_matrix<float>(n, d_in, 24), G = random_matrix<float>(n, d_out, 25);
  const auto step = [&](Mat<float>& y, Mat<float>& dx) {
    dora::DoraLinear<float, dora::bfloat16> layer(dora::borrow<float>(wb, d_out, d_in), c, A, B);
    y = layer.forward(x);
    dx = layer.backward(G);
  };
  Mat<float> y_off, dx_off, y_on, dx_on;
  dora::dnnl_backend::set_enabled(false);
  step(y_off, dx_off);
  // Built without oneDNN, the same layer on the same stored values: the float path.
  const bool on = dora::dnnl_backend::set_enabled(true);
  CHECK(on == dora::dnnl_backend::has_bf16_units());
  step(y_on, dx_on);
  dora::dnnl_backend::set_enabled(false);
  Mat<float> y_again, dx_again;
  step(y_again, dx_again);
  std::printf("dnnl switch (%s): on vs off: y %.1e, dx %.1e\n", on ? "bf16" : "fallback", rel_err(y_on, y_off),
              rel_err(dx_on, dx_off));
  CHECK(rel_err(y_again, y_off) == 0.0);
  CHECK(rel_err(dx_again, dx_off) == 0.0);
  if (!on) {
    CHECK(rel_err(y_on, y_off) == 0.0);
    CHECK(rel_err(dx_on, dx_off) == 0.0);
  } else {
    CHECK(rel_err(y_on, y_off) > 0.0);  // it did run the bf16 products
  }
  dora::dnnl_backend::set_enabled(true);
}
