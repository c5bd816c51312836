#pragma once
/// \file detail/random.hpp
/// Reproducible random numbers. std::mt19937_64's sequence is fixed by the standard, but
/// std::uniform_real_distribution and std::normal_distribution are not (libstdc++ and libc++
/// differ), so the conversions to floating point are written out here: the same seed gives the
/// same A and the same dropout masks on every platform.

#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>

#include "check.hpp"

namespace dora::detail {

class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0) : engine_(seed) {}
  void seed(std::uint64_t s) { engine_.seed(s); }

  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

  /// Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

  /// The generator's whole state as text (std::mt19937_64's standard textual form: 312 words and
  /// a position), for checkpoints; set_state() restores it exactly.
  std::string state() const {
    std::ostringstream out;
    out << engine_;
    return out.str();
  }
  /// Throws std::invalid_argument (the generator unchanged) if `text` is not such a state.
  void set_state(const std::string& text) {
    std::istringstream in(text);
    std::mt19937_64 e;
    in >> e;
    std::string rest;
    DORA_CHECK_ARG(!in.fail() && !(in >> rest), "not a random generator state (std::mt19937_64's text form): '",
                   text.substr(0, 40), text.size() > 40 ? "...'" : "'");
    engine_ = e;
  }

  /// Advances the stream by n draws of uniform() (O(n)).
  void discard(std::uint64_t n) { engine_.discard(n); }

  /// Standard normal by Box-Muller; 1 - uniform() lies in (0, 1], so the log is finite.
  double normal() {
    const double u1 = 1.0 - uniform();
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

 private:
  std::mt19937_64 engine_;
};

}  // namespace dora::detail
