#pragma once
// The --base-dtype option of step_driver and dora_memory: which storage the frozen W has
// (include/dora/storage.hpp); the layers compute in S either way.

#include <cstdio>
#include <dora/dora.hpp>
#include <string>

namespace dora_bench {

inline constexpr const char* kBaseDtypes = "f32|bf16|f16|q8|q4";

template <typename T>
struct TypeTag {
  using type = T;
};

/// Calls run(TypeTag<Storage>{}) for the named dtype (f32: S itself) and returns its result; an
/// unknown name is reported on stderr and returns 2.
template <typename S, typename Run>
int with_base_dtype(const std::string& dtype, const char* program, Run&& run) {
  if (dtype == "f32") return run(TypeTag<S>{});
  if (dtype == "bf16") return run(TypeTag<dora::bfloat16>{});
  if (dtype == "f16") return run(TypeTag<dora::float16>{});
  if (dtype == "q8") return run(TypeTag<dora::BlockQ8_0>{});
  if (dtype == "q4") return run(TypeTag<dora::BlockQ4_0>{});
  std::fprintf(stderr, "%s: --base-dtype must be one of %s, got '%s'\n", program, kBaseDtypes, dtype.c_str());
  return 2;
}

}  // namespace dora_bench
