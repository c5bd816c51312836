#pragma once
/// \file version.hpp
/// The one place the version number lives; CMake reads it from here.

#define DORA_VERSION_MAJOR 0
#define DORA_VERSION_MINOR 1
#define DORA_VERSION_PATCH 0

namespace dora {
inline constexpr int version_major = DORA_VERSION_MAJOR;
inline constexpr int version_minor = DORA_VERSION_MINOR;
inline constexpr int version_patch = DORA_VERSION_PATCH;
}  // namespace dora
