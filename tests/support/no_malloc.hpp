#pragma once
// Eigen's heap allocation, where a test forbids it (Eigen::internal::set_is_malloc_allowed(false)),
// throws instead of aborting, so that the test can report it. Include first, before any Eigen header.
#define EIGEN_RUNTIME_NO_MALLOC
#include <stdexcept>
#define eigen_assert(x)                                             \
  do {                                                              \
    if (!(x)) throw std::runtime_error("eigen_assert failed: " #x); \
  } while (false)
