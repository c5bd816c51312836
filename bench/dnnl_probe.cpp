// bf16 backend probe: oneDNN matmul bf16 x bf16 -> f32 (and f32), y = x W^T with W (out x in) row-major
// used in place (weights desc K x N, strides {1, K}); the same with W prepacked once; the adjoint G W.
// Which ISA oneDNN dispatches to: ONEDNN_VERBOSE=1. Times against Eigen float. Usage: dnnl_probe M K N
#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <dnnl.hpp>
#include <vector>

using namespace dnnl;
using Clock = std::chrono::steady_clock;

static std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<std::uint16_t>(u >> 16);
}

template <class F>
double median_ms(F&& f, int reps = 7) {
  std::vector<double> t;
  f();
  for (int i = 0; i < reps; ++i) {
    auto a = Clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(Clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  const memory::dim M = argc > 1 ? atol(argv[1]) : 512, K = argc > 2 ? atol(argv[2]) : 4096,
                    N = argc > 3 ? atol(argv[3]) : 4096;
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  using RM = Eigen::Matrix<float, -1, -1, Eigen::RowMajor>;
  RM x = RM::Random(M, K), W = RM::Random(N, K), y(M, N);
  std::vector<std::uint16_t> xb(M * K), Wb(N * K);
  for (memory::dim i = 0; i < M * K; ++i) xb[i] = to_bf16(x.data()[i]);
  for (memory::dim i = 0; i < N * K; ++i) Wb[i] = to_bf16(W.data()[i]);
  for (auto dt : {memory::data_type::bf16, memory::data_type::f32}) {
    memory::desc src_md({M, K}, dt, {K, 1});
    memory::desc wei_md({K, N}, dt, {1, K});  // W^T without copying: W row-major out x in
    memory::desc dst_md({M, N}, memory::data_type::f32, {N, 1});
    try {
      matmul::primitive_desc pd(matmul::desc(src_md, wei_md, dst_md), eng);
      matmul prim(pd);
      void* xs = dt == memory::data_type::bf16 ? (void*)xb.data() : (void*)x.data();
      void* ws = dt == memory::data_type::bf16 ? (void*)Wb.data() : (void*)W.data();
      memory xm(src_md, eng, xs), wm(wei_md, eng, ws), ym(dst_md, eng, y.data());
      const double ms = median_ms([&] {
        prim.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}});
        s.wait();
      });
      RM ref = x * W.transpose();
      const double err = (y - ref).cwiseAbs().maxCoeff() / ref.cwiseAbs().maxCoeff();
      std::printf("%s: impl %s  %.2f ms  (%.0f GFLOP/s)  max rel err vs f32 %.2e\n",
                  dt == memory::data_type::bf16 ? "bf16" : "f32 ", pd.impl_info_str(), ms, 2.0 * M * N * K / ms / 1e6,
                  err);
      // The same product with W reordered once into the layout oneDNN prefers (format any): what a
      // per-call repack of the plain W costs.
      memory::desc any_md({K, N}, dt, memory::format_tag::any);
      matmul::primitive_desc pd2(matmul::desc(src_md, any_md, dst_md), eng);
      memory packed(pd2.weights_desc(), eng);
      reorder(wm, packed).execute(s, wm, packed);
      s.wait();
      matmul prim2(pd2);
      const double ms2 = median_ms([&] {
        prim2.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, packed}, {DNNL_ARG_DST, ym}});
        s.wait();
      });
      // dX = G W: W (N x K) as the weights of a (M x N) x (N x K) product, plain row-major.
      memory::desc g_md({M, N}, dt, {N, 1}), w2_md({N, K}, dt, {K, 1}), dx_md({M, K}, memory::data_type::f32, {K, 1});
      matmul::primitive_desc pd3(matmul::desc(g_md, w2_md, dx_md), eng);
      matmul prim3(pd3);
      std::vector<float> dx(M * K);
      std::vector<std::uint16_t> gb(M * N, to_bf16(0.5f));
      std::vector<float> gf(M * N, 0.5f);
      memory gm(g_md, eng, dt == memory::data_type::bf16 ? (void*)gb.data() : (void*)gf.data()), w2m(w2_md, eng, ws),
          dxm(dx_md, eng, dx.data());
      const double ms3 = median_ms([&] {
        prim3.execute(s, {{DNNL_ARG_SRC, gm}, {DNNL_ARG_WEIGHTS, w2m}, {DNNL_ARG_DST, dxm}});
        s.wait();
      });
      std::printf("      prepacked W: impl %s %.2f ms; adjoint G W (plain W): impl %s %.2f ms\n", pd2.impl_info_str(),
                  ms2, pd3.impl_info_str(), ms3);
    } catch (const dnnl::error& e) {
      std::printf("dnnl error: %s\n", e.what());
    }
  }
  const double ms = median_ms([&] { y.noalias() = x * W.transpose(); });
  std::printf("eigen f32: %.2f ms (%.0f GFLOP/s)\n", ms, 2.0 * M * N * K / ms / 1e6);
  return 0;
}
