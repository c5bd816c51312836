// Writing layers trained in C++ as a HuggingFace PEFT adapter directory (adapter_config.json +
// adapter_model.safetensors) that `PeftModel.from_pretrained` loads.
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "dora/detail/eigen.hpp"
#include "dora/dora.hpp"
#include "dora/io/error.hpp"
#include "dora/io/fs.hpp"
#include "dora/io/peft_config.hpp"
#include "dora/io/peft_reader.hpp"
#include "dora/io/safetensors.hpp"

namespace dora::io {

/// Collects layers trained in C++ and writes them as a PEFT adapter directory that
/// `PeftModel.from_pretrained(base_model, dir)` loads. PEFT's config is global for use_dora,
/// use_rslora and lora_dropout, so those must agree across modules; ranks and alphas may differ
/// (the most common becomes r / lora_alpha, the others go to rank_pattern / alpha_pattern as
/// escaped exact-path patterns).
class PeftAdapterWriter {
 public:
  explicit PeftAdapterWriter(Dtype dtype = Dtype::F32) : dtype_(dtype) {}

  void set_base_model_name_or_path(std::string name) { base_model_ = std::move(name); }

  /// `path` is the module's name in the base model (its weight is `<path>.weight`).
  template <typename Scalar>
  void add(const std::string& path, const LoraLinear<Scalar>& layer) {
    add_entry(path, layer.config(), false, layer.lora_A().template cast<double>(),
              layer.lora_B().template cast<double>(), Eigen::VectorXd());
  }
  template <typename Scalar>
  void add(const std::string& path, const DoraLinear<Scalar>& layer) {
    add_entry(path, layer.config(), true, layer.lora_A().template cast<double>(),
              layer.lora_B().template cast<double>(), layer.magnitude().template cast<double>());
  }

  /// The config that write() will store.
  PeftConfig config() const {
    if (entries_.empty()) detail::peft_fail("<adapter writer>", "no modules added");
    PeftConfig c;
    c.file = "adapter_config.json";
    c.use_dora = entries_.front().dora;
    c.use_rslora = entries_.front().config.use_rslora;
    c.lora_dropout = entries_.front().config.dropout;
    std::map<Eigen::Index, int> rank_count;
    std::map<double, int> alpha_count;
    for (const Entry& e : entries_) {
      ++rank_count[e.config.rank];
      ++alpha_count[e.config.alpha];
    }
    c.r = std::max_element(rank_count.begin(), rank_count.end(), [](const auto& a, const auto& b) {
            return a.second < b.second;
          })->first;
    c.lora_alpha = std::max_element(alpha_count.begin(), alpha_count.end(), [](const auto& a, const auto& b) {
                     return a.second < b.second;
                   })->first;
    for (const Entry& e : entries_) {
      c.target_modules.push_back(e.path);
      if (e.config.rank != c.r) c.rank_pattern.emplace_back(detail::regex_escape(e.path), e.config.rank);
      if (e.config.alpha != c.lora_alpha) c.alpha_pattern.emplace_back(detail::regex_escape(e.path), e.config.alpha);
    }
    c.base_model_name_or_path = base_model_;
    return c;
  }

  /// Writes dir/adapter_model.safetensors and dir/adapter_config.json (each atomically), creating
  /// dir if it does not exist.
  void write(const std::string& dir) const {
    const PeftConfig c = config();
    if (!detail::is_directory(dir) && ::mkdir(dir.c_str(), 0755) != 0)
      detail::peft_fail(dir, std::string("cannot create directory: ") + std::strerror(errno));
    // Python's order: dtype size (all equal), then name, so the file matches save_pretrained's layout.
    std::vector<std::pair<std::string, const Entry*>> names;
    for (const Entry& e : entries_) {
      const std::string p = std::string(PeftAdapter::kPrefix) + e.path;
      names.emplace_back(p + ".lora_A.weight", &e);
      names.emplace_back(p + ".lora_B.weight", &e);
      if (e.dora) names.emplace_back(p + ".lora_magnitude_vector", &e);
    }
    std::sort(names.begin(), names.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    SafetensorsStreamWriter w(detail::join_path(dir, "adapter_model.safetensors"));
    w.set_metadata({{"format", "pt"}});
    for (const auto& n : names) {
      const Entry& e = *n.second;
      if (detail::ends_with(n.first, ".lora_A.weight"))
        w.declare(n.first, dtype_, {e.A.rows(), e.A.cols()});
      else if (detail::ends_with(n.first, ".lora_B.weight"))
        w.declare(n.first, dtype_, {e.B.rows(), e.B.cols()});
      else
        w.declare(n.first, dtype_, {e.m.size()});
    }
    w.begin();
    for (const auto& n : names) {
      const Entry& e = *n.second;
      if (detail::ends_with(n.first, ".lora_A.weight"))
        w.write(n.first, e.A);
      else if (detail::ends_with(n.first, ".lora_B.weight"))
        w.write(n.first, e.B);
      else
        w.write(n.first, e.m);
    }
    w.finish();
    const std::string text = c.to_json().dump(2) + "\n";
    detail::AtomicFile f(detail::join_path(dir, "adapter_config.json"));
    f.write(text.data(), text.size());
    f.commit();
  }

 private:
  struct Entry {
    std::string path;
    AdapterConfig config;
    bool dora = false;
    Matrix<double> A, B;
    Eigen::VectorXd m;
  };

  void add_entry(const std::string& path, const AdapterConfig& config, bool dora, Matrix<double> A, Matrix<double> B,
                 Eigen::VectorXd m) {
    const std::string who = "<adapter writer>";
    if (path.empty()) detail::peft_fail(who, "empty module path");
    for (const Entry& e : entries_) {
      if (e.path == path) detail::peft_fail(who, "module '" + path + "' added twice");
      if (e.dora != dora)
        detail::peft_fail(who, "module '" + path + "' is " + (dora ? "DoRA" : "LoRA") + " but '" + e.path + "' is " +
                                   (e.dora ? "DoRA" : "LoRA") + ": PEFT's use_dora is one setting per adapter");
      if (e.config.use_rslora != config.use_rslora)
        detail::peft_fail(
            who, "module '" + path + "' and '" + e.path + "' disagree on use_rslora (one setting per adapter in PEFT)");
      if (e.config.dropout != config.dropout)
        detail::peft_fail(
            who, "module '" + path + "' and '" + e.path + "' disagree on dropout (one setting per adapter in PEFT)");
    }
    entries_.push_back(Entry{path, config, dora, std::move(A), std::move(B), std::move(m)});
  }

  Dtype dtype_;
  std::string base_model_;
  std::vector<Entry> entries_;
};

}  // namespace dora::io
