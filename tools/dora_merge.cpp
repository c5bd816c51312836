// dora-merge: merge a HuggingFace PEFT LoRA / DoRA adapter into a safetensors checkpoint.
//
//   dora-merge --base model.safetensors --adapter ADAPTER_DIR --out merged.safetensors [--dtype f32|bf16|f16|f64]
//   dora-merge --base model.safetensors.index.json --adapter ADAPTER_DIR --out OUT_DIR [--dtype ...]
//   dora-merge --inspect ADAPTER_DIR
//
// A thin wrapper over dora::io::merge_checkpoint / inspect_adapter (include/dora/io/peft_adapter.hpp),
// where the merge rule, streaming and atomic output are documented. Exit status: 0 on success,
// 1 on an error (message on stderr, no output written), 2 on bad usage.
#include <cstring>
#include <dora/io/peft_adapter.hpp>
#include <exception>
#include <iostream>
#include <optional>
#include <string>

namespace {

const char* const kUsage =
    "usage: dora-merge --base BASE --adapter ADAPTER_DIR --out OUT [--dtype f32|bf16|f16|f64] [--quiet]\n"
    "       dora-merge --inspect ADAPTER_DIR\n"
    "\n"
    "Merges every module of a PEFT LoRA/DoRA adapter (adapter_config.json + adapter_model.safetensors)\n"
    "into <module>.weight of the base checkpoint and copies every other tensor unchanged.\n"
    "  BASE   a .safetensors file (OUT is then a file), or a model.safetensors.index.json of a\n"
    "         sharded checkpoint (OUT is then a new directory with the same shards and index)\n"
    "  --dtype  output dtype of every tensor (default: each tensor keeps its own)\n"
    "DoRA: W' = diag(m / ||W + s B A||_rows) (W + s B A); LoRA: W' = W + s B A; computed in double.\n"
    "The output is written atomically: on any error nothing is left behind.\n";

int usage_error(const std::string& what) {
  std::cerr << "dora-merge: " << what << "\n\n" << kUsage;
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string base, adapter, out, inspect, dtype;
  bool quiet = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&](std::string* dst) {
      if (i + 1 >= argc) return false;
      *dst = argv[++i];
      return true;
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--base") {
      if (!value(&base)) return usage_error("--base needs a value");
    } else if (a == "--adapter") {
      if (!value(&adapter)) return usage_error("--adapter needs a value");
    } else if (a == "--out") {
      if (!value(&out)) return usage_error("--out needs a value");
    } else if (a == "--dtype") {
      if (!value(&dtype)) return usage_error("--dtype needs a value");
    } else if (a == "--inspect") {
      if (!value(&inspect)) return usage_error("--inspect needs an adapter directory");
    } else if (a == "--quiet") {
      quiet = true;
    } else {
      return usage_error("unknown argument '" + a + "'");
    }
  }
  try {
    if (!inspect.empty()) {
      if (!base.empty() || !adapter.empty() || !out.empty()) return usage_error("--inspect takes no other option");
      dora::io::inspect_adapter(dora::io::PeftAdapter(inspect), std::cout);
      return 0;
    }
    if (base.empty() || adapter.empty() || out.empty()) return usage_error("--base, --adapter and --out are required");
    dora::io::MergeOptions options;
    if (!dtype.empty()) {
      if (dtype == "f32" || dtype == "F32" || dtype == "float32")
        options.dtype = dora::io::Dtype::F32;
      else if (dtype == "bf16" || dtype == "BF16" || dtype == "bfloat16")
        options.dtype = dora::io::Dtype::BF16;
      else if (dtype == "f16" || dtype == "F16" || dtype == "float16")
        options.dtype = dora::io::Dtype::F16;
      else if (dtype == "f64" || dtype == "F64" || dtype == "float64")
        options.dtype = dora::io::Dtype::F64;
      else
        return usage_error("--dtype must be f32, bf16, f16 or f64, got '" + dtype + "'");
    }
    if (!quiet) options.log = &std::cout;
    const dora::io::MergeReport r = dora::io::merge_checkpoint(base, adapter, out, options);
    if (!quiet) {
      std::cout << "merged " << r.merged.size() << " modules, copied " << r.tensors_copied << " tensors; wrote";
      for (const std::string& f : r.files_written) std::cout << " " << f;
      std::cout << "\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "dora-merge: error: " << e.what() << "\n";
    return 1;
  }
}
