// Everything in dora::io: safetensors files, PEFT adapter directories (read, write, inspect) and
// merging adapters into checkpoints. Needs nlohmann-json (CMake target dora::io), a POSIX file API
// and a little-endian host (detail/platform.hpp).
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include "dora/io/checkpoint.hpp"
#include "dora/io/error.hpp"
#include "dora/io/fs.hpp"
#include "dora/io/merge.hpp"
#include "dora/io/peft_config.hpp"
#include "dora/io/peft_reader.hpp"
#include "dora/io/peft_writer.hpp"
#include "dora/io/safetensors.hpp"
