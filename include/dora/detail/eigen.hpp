#pragma once
/// \file detail/eigen.hpp
/// The one place the library includes Eigen.
///
/// GCC 12 (and older) reports "'__Y' may be used uninitialized" inside its own AVX-512 intrinsic
/// headers (avx512fintrin.h: `__m512 __Y = __Y;`) when Eigen's AVX-512 kernels are inlined, i.e.
/// under -march=native on an AVX-512 CPU: a false positive (GCC bug 105593, fixed in GCC 13) that
/// -isystem does not silence because the warning is issued after inlining. Silencing it only
/// while those headers are parsed keeps -Wmaybe-uninitialized on for everything else, this
/// library's code and its users' code included. It has no effect if the program included Eigen
/// (or <immintrin.h>) before the first dora header.

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <Eigen/Core>
#pragma GCC diagnostic pop
#else
#include <Eigen/Core>
#endif
