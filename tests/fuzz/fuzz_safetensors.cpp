// libFuzzer target: parse arbitrary bytes as a safetensors file and read every tensor.
// SafetensorsError is the documented failure; any other exception, crash, UB or leak is a finding.
//
//   clang++-14 -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -I include -I /usr/include/eigen3 \
//       tests/fuzz/fuzz_safetensors.cpp -o fuzz_safetensors
//   ./fuzz_safetensors -max_total_time=60 tests/fuzz/corpus
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dora/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Copy so ASan sees the exact extent of the buffer (libFuzzer's may be larger).
  const std::vector<std::uint8_t> bytes(data, data + size);
  try {
    const dora::io::SafetensorsReader r = dora::io::SafetensorsReader::from_memory(bytes.data(), bytes.size());
    for (const dora::io::TensorInfo& t : r.tensors()) {
      const std::uint8_t* raw = r.raw(t.name);
      volatile std::uint8_t sink = 0;
      for (std::size_t i = 0; i < t.end - t.begin; ++i) sink = static_cast<std::uint8_t>(sink ^ raw[i]);
      if (t.shape.size() <= 2) {
        static_cast<void>(r.matrix<float>(t.name));
        static_cast<void>(r.matrix<double>(t.name));
      } else {
        try {
          static_cast<void>(r.matrix<double>(t.name));
        } catch (const dora::io::SafetensorsError&) {
        }
      }
      if (t.shape.size() == 1) {
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
