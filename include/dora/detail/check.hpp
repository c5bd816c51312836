#pragma once
/// \file detail/check.hpp
/// Always-on argument checks. They stay on in release builds because a wrong shape reaching Eigen
/// is undefined behaviour there (Eigen's own asserts follow NDEBUG); the cost is a comparison per
/// call, nothing per element.

#include <cassert>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace dora::detail {

template <typename... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

// Cold and out of line so that the check itself inlines to a compare and a branch.
[[noreturn]] inline void throw_invalid_argument(const std::string& message) {
  throw std::invalid_argument("dora: " + message);
}
[[noreturn]] inline void throw_logic_error(const std::string& message) { throw std::logic_error("dora: " + message); }

}  // namespace dora::detail

/// Throws std::invalid_argument("dora: " + message parts) unless cond holds.
#define DORA_CHECK_ARG(cond, ...)                                                             \
  do {                                                                                        \
    if (!(cond)) ::dora::detail::throw_invalid_argument(::dora::detail::concat(__VA_ARGS__)); \
  } while (false)

/// Throws std::logic_error (a call made in the wrong state) unless cond holds.
#define DORA_CHECK_STATE(cond, ...)                                                      \
  do {                                                                                   \
    if (!(cond)) ::dora::detail::throw_logic_error(::dora::detail::concat(__VA_ARGS__)); \
  } while (false)

/// Internal invariant: follows NDEBUG like assert.
#define DORA_ASSERT(cond) assert(cond)
