#pragma once
/// \file dnnl/bf16_matmul.hpp
/// The frozen products on bf16 operands with float accumulation, through oneDNN's matmul primitive
/// (Debian's libdnnl-dev, oneDNN 2.6), which dispatches to AMX (avx512_core_amx_bf16) or
/// AVX512-BF16 (avx512_core_bf16) where the CPU has them (bench/results/device/2026-11-30-dnnl-probe.txt):
///   product:  Y (+)= X W^T   (the forward's [x; A] W^T)
///   adjoint:  dX (+)= G W    (dx, and the exact norm gradient's term)
/// W is a bf16 row-major d_out x d_in matrix used in place (no copy, no prepacking: measured, a
/// prepacked W is not faster); X and G are float, rounded to bf16 (round to nearest even) into a
/// per-thread buffer that only grows. Where bf16 rounding enters: X (or G), and W when it was
/// stored so; every product accumulates in float. DoRA's own products with W (the norm's
/// P^T = A W^T, the exact gradient's Z W) ask for `precise`: the operand is split into two bf16
/// parts, hi = bf16(X) and lo = bf16(X - hi), so it enters at 2^-16 relative, not 2^-8
/// (docs/bf16.md derives the bounds; tests/backends/dnnl.cpp checks them against float64).
///
/// Used through the target dora::dnnl (CMake; it defines DORA_WITH_DNNL): the layers then send
/// their products with a bf16-stored W here where the CPU has bf16 units (detail/stored_product.hpp).

#include <dnnl.hpp>
#include <vector>

#if DNNL_VERSION_MAJOR < 2
#error "dora::dnnl needs oneDNN 2.x (Debian 12: libdnnl-dev 2.6)"
#endif

#include "../storage.hpp"

namespace dora::dnnl_backend {

namespace detail {

using Index = Eigen::Index;
using dt = dnnl::memory::data_type;

inline dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

// This thread's grow-only buffers (steady-state calls allocate nothing): the bf16 copy of an
// activation, and a precise product's float result before its two halves are added.
template <typename T>
T* grow_only_buffer(Index entries) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < static_cast<std::size_t>(entries)) buffer.resize(static_cast<std::size_t>(entries));
  return buffer.data();
}
inline bfloat16* activation_buffer(Index entries) { return grow_only_buffer<bfloat16>(entries); }

// Rows x cols of a row-major float matrix (leading dimension ld) to a packed bf16 one.
inline void round_to_bf16(const float* src, Index rows, Index cols, Index ld, bfloat16* dst) {
#pragma omp parallel for schedule(static) if (rows * cols > (Index(1) << 16))
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) dst[i * cols + j] = bfloat16(src[i * ld + j]);
}

// The two bf16 parts of a float matrix: hi = bf16(src) in rows [0, rows), lo = bf16(src - hi) in
// rows [rows, 2 rows). hi + lo equals src to 2^-16 relative (each part rounds to nearest even).
inline void split_to_bf16(const float* src, Index rows, Index cols, Index ld, bfloat16* dst) {
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) {
      const float v = src[i * ld + j];
      const bfloat16 hi(v);
      dst[i * cols + j] = hi;
      dst[(rows + i) * cols + j] = bfloat16(v - static_cast<float>(hi));
    }
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
#if DNNL_VERSION_MAJOR >= 3
  const dnnl::matmul::primitive_desc pd(engine(), a_md, b_md, c_md, attr);
#else
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, engine());
#endif
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

namespace detail {
// C (+)= op(X) B with op(X) the M x K float X rounded once to bf16 or, precise, split into its two
// bf16 parts: one product of 2M rows into a float buffer, whose halves are then added into C.
inline void rounded_matmul(const float* X, Index M, Index K, Index ldx, const bfloat16* b, Index N, Index b_row,
                           Index b_col, float* C, Index ldc, bool accumulate, bool precise) {
  if (!precise) {
    bfloat16* xb = activation_buffer(M * K);
    round_to_bf16(X, M, K, ldx, xb);
    matmul(xb, M, K, b, N, b_row, b_col, C, ldc, accumulate);
    return;
  }
  bfloat16* xb = activation_buffer(2 * M * K);
  split_to_bf16(X, M, K, ldx, xb);
  float* both = grow_only_buffer<float>(2 * M * N);
  matmul(xb, 2 * M, K, b, N, b_row, b_col, both, N, false);
  for (Index i = 0; i < M; ++i)
    for (Index j = 0; j < N; ++j) {
      const float v = both[i * N + j] + both[(M + i) * N + j];
      C[i * ldc + j] = accumulate ? C[i * ldc + j] + v : v;
    }
}
}  // namespace detail

/// Y (M x N, row-major, leading dimension ldy) = X W^T (+ Y if accumulate). X: M x K float (ldx);
/// W: N x K bf16 row-major with row stride ldw, used in place. precise: X enters at 2^-16 relative
/// (two bf16 parts) instead of 2^-8, for twice the rows.
inline void product(const float* X, Eigen::Index M, Eigen::Index K, Eigen::Index ldx, const bfloat16* W, Eigen::Index N,
                    Eigen::Index ldw, float* Y, Eigen::Index ldy, bool accumulate = false, bool precise = false) {
  // W^T as the K x N weights: element (k, n) at W[n * ldw + k].
  detail::rounded_matmul(X, M, K, ldx, W, N, 1, ldw, Y, ldy, accumulate, precise);
}

/// dX (M x K, leading dimension ldd) = G W (+ dX if accumulate). G: M x N float (ldg); W: N x K
/// bf16 row-major with row stride ldw, used in place. precise: as for product().
inline void adjoint(const float* G, Eigen::Index M, Eigen::Index N, Eigen::Index ldg, const bfloat16* W, Eigen::Index K,
                    Eigen::Index ldw, float* dX, Eigen::Index ldd, bool accumulate = false, bool precise = false) {
  detail::rounded_matmul(G, M, N, ldg, W, K, ldw, 1, dX, ldd, accumulate, precise);
}

}  // namespace dora::dnnl_backend
