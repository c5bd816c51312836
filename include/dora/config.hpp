#pragma once
/// \file config.hpp
/// Adapter configuration: the settings of PEFT's LoraConfig that act on one linear layer.

#include <cmath>
#include <cstdint>

#include "detail/check.hpp"
#include "detail/eigen.hpp"

namespace dora {

/// How A is initialised (B always starts at zero, so a new adapter leaves the layer unchanged).
enum class Init {
  /// PEFT's default (init_lora_weights=True): kaiming_uniform_(A, a=sqrt(5)), i.e. A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)).
  kaiming_uniform,
  /// PEFT's init_lora_weights="gaussian": A ~ N(0, std = 1/r).
  gaussian,
  /// A and B are supplied by the caller (the constructor that takes them).
  user,
};

/// Which gradient DoRA returns for A and B.
enum class NormGradient {
  /// The row norm ||W + s B A|| is treated as a constant in backward (paper section 4.3, and what
  /// PEFT does): cheaper, and what published DoRA results were trained with.
  detached,
  /// The true gradient of the layer's output, norm included (what finite differences see).
  exact,
};

/// Settings of one adapter. Defaults are PEFT's LoraConfig defaults.
struct AdapterConfig {
  Eigen::Index rank = 8;              ///< r (PEFT `r`)
  double alpha = 8.0;                 ///< PEFT `lora_alpha`
  bool use_rslora = false;            ///< scaling alpha / sqrt(r) instead of alpha / r (PEFT `use_rslora`)
  double dropout = 0.0;               ///< probability p in [0, 1) (PEFT `lora_dropout`), training mode only
  Init init = Init::kaiming_uniform;  ///< PEFT `init_lora_weights` (True / "gaussian")
  std::uint64_t seed = 0;             ///< seeds the initialisation and the dropout masks
  NormGradient norm_gradient = NormGradient::detached;  ///< DoRA only

  /// s = alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT `scaling[adapter]`).
  double scaling() const {
    return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
  }

  /// Throws std::invalid_argument naming the bad setting.
  void validate() const {
    DORA_CHECK_ARG(rank >= 1, "rank must be >= 1, got ", rank);
    DORA_CHECK_ARG(std::isfinite(alpha), "alpha must be finite, got ", alpha);
    DORA_CHECK_ARG(dropout >= 0.0 && dropout < 1.0, "dropout must lie in [0, 1), got ", dropout);
  }
};

}  // namespace dora
