#pragma once
/// \file init.hpp
/// Initialisation of the LoRA factors as PEFT 0.21 does it (LoraLayer.reset_lora_parameters).

#include <cmath>

#include "base_layer.hpp"
#include "config.hpp"
#include "detail/random.hpp"

namespace dora {

/// A (r x d_in) as PEFT initialises it:
/// - Init::kaiming_uniform: nn.init.kaiming_uniform_(A, a=sqrt(5)); fan_in = d_in and
///   gain = sqrt(2 / (1 + a^2)), so the bound gain * sqrt(3 / fan_in) is exactly 1 / sqrt(d_in);
/// - Init::gaussian: nn.init.normal_(A, std=1/r).
/// The stream of numbers differs from torch's generator; the distribution is the same.
template <typename Scalar>
Matrix<Scalar> initial_lora_A(Eigen::Index rank, Eigen::Index d_in, Init init, detail::Rng& rng) {
  DORA_CHECK_ARG(rank >= 1 && d_in >= 1, "cannot initialise A of shape ", rank, " x ", d_in);
  Matrix<Scalar> A(rank, d_in);
  switch (init) {
    case Init::kaiming_uniform: {
      const double bound = 1.0 / std::sqrt(static_cast<double>(d_in));
      for (Eigen::Index i = 0; i < A.size(); ++i) A.data()[i] = static_cast<Scalar>(rng.uniform(-bound, bound));
      break;
    }
    case Init::gaussian: {
      const double stddev = 1.0 / static_cast<double>(rank);
      for (Eigen::Index i = 0; i < A.size(); ++i) A.data()[i] = static_cast<Scalar>(stddev * rng.normal());
      break;
    }
    case Init::user:
      detail::throw_invalid_argument("Init::user needs A and B passed to the layer's constructor");
  }
  return A;
}

}  // namespace dora
