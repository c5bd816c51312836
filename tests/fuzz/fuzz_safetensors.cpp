// libFuzzer target: parse arbitrary bytes as a safetensors file and read every tensor.
// SafetensorsError is the documented failure; any other exception, crash, UB, leak, or a broken
// invariant of a parsed file (abort) is a finding. Invariants: every tensor's byte range is its
// shape x dtype size; F16/BF16/F32/F64 tensors of rank <= 2 convert; every other dtype is refused
// by the typed accessors with SafetensorsError.
//
//   clang++-14 -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -I include -I /usr/include/eigen3 \
//       tests/fuzz/fuzz_safetensors.cpp -o fuzz_safetensors
//   ./fuzz_safetensors -max_total_time=60 tests/fuzz/corpus
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "dora/io/safetensors.hpp"

namespace {

template <typename F>
void require_refused(F&& read) {
  try {
    read();
  } catch (const dora::io::SafetensorsError&) {
    return;
  }
  std::abort();  // a typed read of a dtype without conversion must not succeed
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Copy so ASan sees the exact extent of the buffer (libFuzzer's may be larger).
  const std::vector<std::uint8_t> bytes(data, data + size);
  try {
    const dora::io::SafetensorsReader r = dora::io::SafetensorsReader::from_memory(bytes.data(), bytes.size());
    for (const dora::io::TensorInfo& t : r.tensors()) {
      std::size_t need = 0;
      if (dora::io::detail::tensor_nbytes(t.shape, t.dtype, &need) != dora::io::detail::SizeStatus::ok ||
          need != t.nbytes())
        std::abort();
      const std::uint8_t* raw = r.raw(t.name);
      volatile std::uint8_t sink = 0;
      for (std::size_t i = 0; i < t.nbytes(); ++i) sink = static_cast<std::uint8_t>(sink ^ raw[i]);
      if (!dora::io::dtype_is_convertible(t.dtype)) {
        require_refused([&] { static_cast<void>(r.matrix<double>(t.name)); });
        require_refused([&] { static_cast<void>(r.vector<float>(t.name)); });
      } else if (t.shape.size() <= 2) {
        static_cast<void>(r.matrix<float>(t.name));
        static_cast<void>(r.matrix<double>(t.name));
      } else {
        require_refused([&] { static_cast<void>(r.matrix<double>(t.name)); });
      }
      if (dora::io::dtype_is_convertible(t.dtype) && t.shape.size() == 1) {
        static_cast<void>(r.vector<float>(t.name));
        static_cast<void>(r.vector<double>(t.name));
      }
      static_cast<void>(r.info(t.name).numel());
    }
    static_cast<void>(r.metadata().size());
  } catch (const dora::io::SafetensorsError&) {
  }
  return 0;
}
