#pragma once
/// \file magnitude.hpp
/// DoRA's per-row scale g_i = m_i / n_i (magnitude over direction norm) and the one rule for rows
/// where it does not exist. Every DoRA computation in the library (the layers' forward, backward,
/// merge and unmerge, and dora::io's checkpoint merge) takes g from here, so they agree on every row.
///
/// Inactive rows. PEFT divides by n_i and returns inf or NaN where the direction V_i = W_i + s B_i A
/// is zero. Here a row is inactive when m_i and n_i are finite and either n_i == 0 or m_i / n_i
/// overflows; its scale is 0: its output is the bias, its merged row is zero, and no gradient flows
/// through its direction or magnitude. (With dropout in training, PEFT's formula with g_i = 0 keeps
/// the undropped part of the base product, x W_i^T - xd W_i^T: see docs/math.md, section 7.)
/// NaN or inf in m_i or n_i is never hidden: it propagates into g_i.

#include <cmath>

namespace dora {

/// True when row i has no usable direction (see the file comment). NaN/inf m or n: false.
template <typename Scalar>
bool inactive_row(Scalar magnitude, Scalar row_norm) {
  return std::isfinite(magnitude) && std::isfinite(row_norm) &&
         (row_norm == Scalar(0) || !std::isfinite(magnitude / row_norm));
}

/// g_i = m_i / n_i, or 0 on an inactive row.
template <typename Scalar>
Scalar magnitude_scale(Scalar magnitude, Scalar row_norm) {
  return inactive_row(magnitude, row_norm) ? Scalar(0) : magnitude / row_norm;
}

}  // namespace dora
