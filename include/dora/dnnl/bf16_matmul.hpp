#pragma once
/// \file dnnl/bf16_matmul.hpp
/// WORK IN PROGRESS (issue 15, branch issue15-bf16; not wired into the layers, not in CMake yet).
///
/// The frozen products on bf16 operands with float accumulation, through oneDNN's matmul primitive
/// (Debian's libdnnl-dev, oneDNN 2.6), which dispatches to AMX (avx512_core_amx_bf16) or
/// AVX512-BF16 (avx512_core_bf16) where the CPU has them (bench/results/device/dnnl_probe_issue15.txt):
///   product:  Y (+)= X W^T   (the forward's [x; A] W^T)
///   adjoint:  dX (+)= G W    (dx, and the exact norm gradient's term)
/// W is a bf16 row-major d_out x d_in matrix used in place (no copy, no prepacking: measured, a
/// prepacked W is not faster); X and G are float, rounded to bf16 (round to nearest even) into a
/// per-thread buffer that only grows. Where bf16 rounding enters: X (or G) and, if it was not stored
/// so already, W; every product accumulates in float.

#include <dnnl.hpp>
#include <vector>

#include "../storage.hpp"

namespace dora::dnnl_backend {

namespace detail {

using Index = Eigen::Index;
using dt = dnnl::memory::data_type;

inline dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

// This thread's bf16 copy of an activation: grow-only, so steady-state calls allocate nothing.
inline bfloat16* activation_buffer(Index entries) {
  thread_local std::vector<bfloat16> buffer;
  if (buffer.size() < static_cast<std::size_t>(entries)) buffer.resize(static_cast<std::size_t>(entries));
  return buffer.data();
}

// Rows x cols of a row-major float matrix (leading dimension ld) to a packed bf16 one.
inline void round_to_bf16(const float* src, Index rows, Index cols, Index ld, bfloat16* dst) {
#pragma omp parallel for schedule(static) if (rows * cols > (Index(1) << 16))
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) dst[i * cols + j] = bfloat16(src[i * ld + j]);
}

// C (M x N, ldc) (+)= A (M x K packed bf16) B, where B is K x N with strides (b_row, b_col).
inline void matmul(const bfloat16* a, Index M, Index K, const bfloat16* b, Index N, Index b_row, Index b_col, float* c,
                   Index ldc, bool accumulate) {
  const dnnl::memory::desc a_md({M, K}, dt::bf16, {K, 1});
  const dnnl::memory::desc b_md({K, N}, dt::bf16, {b_row, b_col});
  const dnnl::memory::desc c_md({M, N}, dt::f32, {ldc, 1});
  dnnl::primitive_attr attr;
  if (accumulate) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  // oneDNN's primitive cache makes a repeated shape cheap to recreate.
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, engine());
  const dnnl::matmul prim(pd);
  dnnl::memory am(a_md, engine(), const_cast<bfloat16*>(a));
  dnnl::memory bm(b_md, engine(), const_cast<bfloat16*>(b));
  dnnl::memory cm(c_md, engine(), c);
  dnnl::stream s(engine());
  prim.execute(s, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
  s.wait();
}

}  // namespace detail

/// True where oneDNN can run bf16 products on bf16 units (AVX512-BF16, AMX): its effective ISA
/// includes avx512_core_bf16. Elsewhere oneDNN's bf16 matmul is a slow reference loop, so the layers
/// keep today's float path (the fallback).
inline bool has_bf16_units() {
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  const auto bf16 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_bf16);
  return (isa & bf16) == bf16;
}
/// Which units: "AMX", "AVX512-BF16" or "none (float fallback)", for benchmark and test output.
inline const char* units_name() {
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  const auto amx = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_amx);
  if ((isa & amx) == amx) return "AMX";
  return has_bf16_units() ? "AVX512-BF16" : "none (float fallback)";
}

namespace detail {
inline bool& enabled_flag() {
  static bool on = has_bf16_units();
  return on;
}
}  // namespace detail

/// Whether the layers' products with a bf16 W go through oneDNN (default: where has_bf16_units()).
inline bool enabled() { return detail::enabled_flag(); }
/// Turns the backend off (the float path) or back on; on is refused (false returned) without bf16
/// units. Not thread-safe: set it before the layers run.
inline bool set_enabled(bool on) {
  detail::enabled_flag() = on && has_bf16_units();
  return detail::enabled_flag();
}

/// Y (M x N, row-major, leading dimension ldy) = X W^T (+ Y if accumulate). X: M x K float (ldx);
/// W: N x K bf16 row-major with row stride ldw, used in place.
inline void product(const float* X, Eigen::Index M, Eigen::Index K, Eigen::Index ldx, const bfloat16* W, Eigen::Index N,
                    Eigen::Index ldw, float* Y, Eigen::Index ldy, bool accumulate = false) {
  bfloat16* xb = detail::activation_buffer(M * K);
  detail::round_to_bf16(X, M, K, ldx, xb);
  // W^T as the K x N weights: element (k, n) at W[n * ldw + k].
  detail::matmul(xb, M, K, W, N, 1, ldw, Y, ldy, accumulate);
}

/// dX (M x K, leading dimension ldd) = G W (+ dX if accumulate). G: M x N float (ldg); W: N x K
/// bf16 row-major with row stride ldw, used in place.
inline void adjoint(const float* G, Eigen::Index M, Eigen::Index N, Eigen::Index ldg, const bfloat16* W, Eigen::Index K,
                    Eigen::Index ldw, float* dX, Eigen::Index ldd, bool accumulate = false) {
  bfloat16* gb = detail::activation_buffer(M * N);
  detail::round_to_bf16(G, M, N, ldg, gb);
  detail::matmul(gb, M, N, W, K, ldw, 1, dX, ldd, accumulate);
}

}  // namespace dora::dnnl_backend
