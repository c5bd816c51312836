// The exceptions of dora::io. One base, IoError, for everything the io headers throw, so that a
// caller can catch every adapter, checkpoint and file problem with one handler:
//
//   std::runtime_error
//     IoError                 (dora::io)
//       SafetensorsError      malformed or unreadable safetensors files, writer failures
//         PeftError           adapter directories, configs, merges (a SafetensorsError because it
//                             was one before IoError existed: catch (SafetensorsError&) still sees it)
//
// Every message names the file and, where one is involved, the tensor or config key.
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include <stdexcept>
#include <string>

namespace dora::io {

/// Base of every exception thrown by dora::io.
class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Safetensors reading and writing. The message names the file ("<memory>" or the label given to
/// from_memory) and, where one is involved, the tensor.
class SafetensorsError : public IoError {
 public:
  using IoError::IoError;
};

/// Errors about adapters and checkpoints as a whole (the file and tensor are named in the message).
class PeftError : public SafetensorsError {
 public:
  using SafetensorsError::SafetensorsError;
};

namespace detail {

[[noreturn]] inline void peft_fail(const std::string& file, const std::string& what) {
  throw PeftError("peft: " + file + ": " + what);
}
[[noreturn]] inline void peft_fail_tensor(const std::string& file, const std::string& tensor, const std::string& what) {
  throw PeftError("peft: " + file + ": tensor '" + tensor + "': " + what);
}

}  // namespace detail

}  // namespace dora::io
