// HuggingFace PEFT LoRA / DoRA adapters: load, build layers, save, and merge into a checkpoint.
//
// Kept for existing users: includes the io headers that used to live here, split by concern:
//   dora/io/error.hpp        IoError, SafetensorsError, PeftError
//   dora/io/fs.hpp           paths, file reads, AtomicDir (detail)
//   dora/io/peft_config.hpp  PeftConfig (adapter_config.json)
//   dora/io/peft_reader.hpp  PeftModule, PeftAdapter (reading an adapter directory), inspect_adapter
//   dora/io/peft_writer.hpp  PeftAdapterWriter
//   dora/io/merge.hpp        merge_checkpoint, MergeOptions, MergeReport
// dora/io/io.hpp includes all of them and dora/io/safetensors.hpp.
//
// Platform: POSIX (open, mmap, madvise, mkostemp, mkdtemp, rename, opendir) and a little-endian
// host; see detail/platform.hpp.
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include "dora/io/error.hpp"
#include "dora/io/fs.hpp"
#include "dora/io/merge.hpp"
#include "dora/io/peft_config.hpp"
#include "dora/io/peft_reader.hpp"
#include "dora/io/peft_writer.hpp"
#include "dora/io/safetensors.hpp"
