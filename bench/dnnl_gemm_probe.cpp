// bf16 backend, probe 2: for the products of a bf16 training step, which oneDNN entry point is fastest.
//  - the frozen products (bf16 W in place, the matmul primitive; oneDNN 2.6 has no bf16 BLAS-like
//    gemm), Y = X W^T and dX = G W, with n rows and with DoRA's 2r more;
//  - LoRA's float rank-r products (x A^T, u B^T, G B, du^T x, G^T u, du A): Eigen vs dnnl_sgemm.
// Usage: dnnl_gemm_probe d_out d_in r n   (threads: OMP_NUM_THREADS). Medians of 9.
// A one-off probe, not a CMake target (CI builds enough); on the device, with .device-carry/ as in
// bench/run_device_bf16.sh:
//   g++ -std=c++17 -O3 -march=native -fopenmp -DNDEBUG -I.device-carry -I/tmp/dnnl/include \
//     bench/dnnl_gemm_probe.cpp /tmp/dnnl/lib/libdnnl.so.2 -o /tmp/dnnl_gemm_probe
#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <dnnl.hpp>
#include <vector>

namespace {
using Clock = std::chrono::steady_clock;
using RM = Eigen::Matrix<float, -1, -1, Eigen::RowMajor>;
using dt = dnnl::memory::data_type;

template <class F>
double median_ms(F&& f, int reps = 9) {
  std::vector<double> t;
  f();
  for (int i = 0; i < reps; ++i) {
    const auto a = Clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(Clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::vector<Eigen::bfloat16> to_bf16(const RM& m) {
  std::vector<Eigen::bfloat16> out(static_cast<std::size_t>(m.size()));
  for (Eigen::Index i = 0; i < m.size(); ++i) out[static_cast<std::size_t>(i)] = Eigen::bfloat16(m.data()[i]);
  return out;
}

// C (M x N) = A (M x K, bf16 row-major) op(B): B_T = B stored N x K (use as its transpose), else K x N.
double matmul_ms(dnnl::engine& eng, dnnl::stream& s, const Eigen::bfloat16* a, long M, long K, const Eigen::bfloat16* b,
                 long N, bool B_T, float* c) {
  const dnnl::memory::desc a_md({M, K}, dt::bf16, {K, 1});
  const dnnl::memory::desc b_md({K, N}, dt::bf16, B_T ? dnnl::memory::dims{1, K} : dnnl::memory::dims{N, 1});
  const dnnl::memory::desc c_md({M, N}, dt::f32, {N, 1});
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), eng);
  const dnnl::matmul prim(pd);
  dnnl::memory am(a_md, eng, const_cast<Eigen::bfloat16*>(a)), bm(b_md, eng, const_cast<Eigen::bfloat16*>(b)),
      cm(c_md, eng, c);
  return median_ms([&] {
    prim.execute(s, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    s.wait();
  });
}

// Interleaved medians (reps rounds, each runs every variant once) of: n rows; n + 2r rows in one
// product (DoRA's stack); n rows then 2r rows in their own product. op(B) as in matmul_ms.
void stacked_vs_separate(dnnl::engine& eng, dnnl::stream& s, const char* what, const Eigen::bfloat16* a, long n,
                         long extra, long K, const Eigen::bfloat16* b, long N, bool B_T, float* c, int reps = 11) {
  const auto prim = [&](long M, const Eigen::bfloat16* src, float* dst) {
    const dnnl::memory::desc a_md({M, K}, dt::bf16, {K, 1});
    const dnnl::memory::desc b_md({K, N}, dt::bf16, B_T ? dnnl::memory::dims{1, K} : dnnl::memory::dims{N, 1});
    const dnnl::memory::desc c_md({M, N}, dt::f32, {N, 1});
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), eng);
    const dnnl::matmul p(pd);
    dnnl::memory am(a_md, eng, const_cast<Eigen::bfloat16*>(src)), bm(b_md, eng, const_cast<Eigen::bfloat16*>(b)),
        cm(c_md, eng, dst);
    p.execute(s, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    s.wait();
  };
  std::vector<double> t[3];
  for (int rep = 0; rep <= reps; ++rep)
    for (int v = 0; v < 3; ++v) {
      const auto t0 = Clock::now();
      if (v == 0) prim(n, a, c);
      if (v == 1) prim(n + extra, a, c);
      if (v == 2) {
        prim(n, a, c);
        prim(extra, a + n * K, c + n * N);
      }
      if (rep > 0) t[v].push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
  for (auto& v : t) std::sort(v.begin(), v.end());
  std::printf("  %s interleaved: %ld rows %.2f ms; %ld rows stacked %.2f ms; %ld + %ld rows separate %.2f ms\n", what,
              n, t[0][t[0].size() / 2], n + extra, t[1][t[1].size() / 2], n, extra, t[2][t[2].size() / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  const long d_out = argc > 1 ? std::atol(argv[1]) : 4096, d_in = argc > 2 ? std::atol(argv[2]) : 4096,
             r = argc > 3 ? std::atol(argv[3]) : 16, n = argc > 4 ? std::atol(argv[4]) : 512;
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream s(eng);
  const RM W = RM::Random(d_out, d_in), x = RM::Random(n + 2 * r, d_in), G = RM::Random(n + 2 * r, d_out);
  const std::vector<Eigen::bfloat16> Wb = to_bf16(W), xb = to_bf16(x), Gb = to_bf16(G);
  RM y(n + 2 * r, d_out), dx(n + 2 * r, d_in);
  std::printf("%ld/%ld/%ld/%ld threads %s\n", d_out, d_in, r, n, std::getenv("OMP_NUM_THREADS"));
  std::printf("  product x W^T:  matmul %.2f ms; with %ld rows %.2f ms\n",
              matmul_ms(eng, s, xb.data(), n, d_in, Wb.data(), d_out, true, y.data()), n + 2 * r,
              matmul_ms(eng, s, xb.data(), n + 2 * r, d_in, Wb.data(), d_out, true, y.data()));
  std::printf("  adjoint G W:    matmul %.2f ms; with %ld rows %.2f ms\n",
              matmul_ms(eng, s, Gb.data(), n, d_out, Wb.data(), d_in, false, dx.data()), n + 2 * r,
              matmul_ms(eng, s, Gb.data(), n + 2 * r, d_out, Wb.data(), d_in, false, dx.data()));
  stacked_vs_separate(eng, s, "product x W^T", xb.data(), n, 2 * r, d_in, Wb.data(), d_out, true, y.data());
  stacked_vs_separate(eng, s, "adjoint G W  ", Gb.data(), n, 2 * r, d_out, Wb.data(), d_in, false, dx.data());
  // LoRA's rank-r float products.
  const RM A = RM::Random(r, d_in), B = RM::Random(d_out, r), xs = x.topRows(n), Gs = G.topRows(n);
  RM u(n, r), yo(n, d_out), dA(r, d_in), dB(d_out, r), dxo(n, d_in);
  const double e_xa = median_ms([&] { u.noalias() = xs * A.transpose(); });
  const double e_ub = median_ms([&] { yo.noalias() += u * B.transpose(); });
  const double e_gb = median_ms([&] { u.noalias() = Gs * B; });
  const double e_ux = median_ms([&] { dA.noalias() = u.transpose() * xs; });
  const double e_gu = median_ms([&] { dB.noalias() = Gs.transpose() * u; });
  const double e_ua = median_ms([&] { dxo.noalias() += u * A; });
  const auto sg = [](char ta, char tb, long M, long N, long K, const float* a, long lda, const float* b, long ldb,
                     float beta, float* c, long ldc) {
    return median_ms([&] { dnnl_sgemm(ta, tb, M, N, K, 1.0f, a, lda, b, ldb, beta, c, ldc); });
  };
  const double d_xa = sg('N', 'T', n, r, d_in, xs.data(), d_in, A.data(), d_in, 0.0f, u.data(), r);
  const double d_ub = sg('N', 'T', n, d_out, r, u.data(), r, B.data(), r, 1.0f, yo.data(), d_out);
  const double d_gb = sg('N', 'N', n, r, d_out, Gs.data(), d_out, B.data(), r, 0.0f, u.data(), r);
  const double d_ux = sg('T', 'N', r, d_in, n, u.data(), r, xs.data(), d_in, 0.0f, dA.data(), d_in);
  const double d_gu = sg('T', 'N', d_out, r, n, Gs.data(), d_out, u.data(), r, 0.0f, dB.data(), r);
  const double d_ua = sg('N', 'N', n, d_in, r, u.data(), r, A.data(), d_in, 1.0f, dxo.data(), d_in);
  std::printf(
      "  rank-r float products (Eigen | dnnl_sgemm) ms: xA^T %.2f|%.2f uB^T %.2f|%.2f GB %.2f|%.2f "
      "u^Tx %.2f|%.2f G^Tu %.2f|%.2f uA %.2f|%.2f; sums %.2f|%.2f\n",
      e_xa, d_xa, e_ub, d_ub, e_gb, d_gb, e_ux, d_ux, e_gu, d_gu, e_ua, d_ua, e_xa + e_ub + e_gb + e_ux + e_gu + e_ua,
      d_xa + d_ub + d_gb + d_ux + d_gu + d_ua);
  return 0;
}
