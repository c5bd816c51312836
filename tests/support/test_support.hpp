#pragma once
// Helpers shared by the tests: seeded random matrices and error measures.

#include <algorithm>
#include <cmath>
#include <dora/dora.hpp>
#include <limits>

namespace dora_test {

template <typename Scalar>
using Mat = dora::Matrix<Scalar>;
template <typename Scalar>
using Vec = dora::Vector<Scalar>;

/// Normal(0, stddev) entries from a fixed seed (the library's own portable generator).
template <typename Scalar>
Mat<Scalar> random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, double stddev = 1.0) {
  dora::detail::Rng rng(seed);
  Mat<Scalar> M(rows, cols);
  for (Eigen::Index i = 0; i < M.size(); ++i) M.data()[i] = static_cast<Scalar>(stddev * rng.normal());
  return M;
}
template <typename Scalar>
Vec<Scalar> random_vector(Eigen::Index n, std::uint64_t seed, double stddev = 1.0) {
  return random_matrix<Scalar>(n, 1, seed, stddev);
}

/// max |a - b| / max |b| (norm-wise relative error; 0 when both are zero).
template <typename DA, typename DB>
double rel_err(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return std::numeric_limits<double>::infinity();
  if (a.size() == 0) return 0.0;
  const double diff = (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff();
  const double scale = b.template cast<double>().cwiseAbs().maxCoeff();
  if (diff == 0.0) return 0.0;
  return scale > 0.0 ? diff / scale : std::numeric_limits<double>::infinity();
}

}  // namespace dora_test
