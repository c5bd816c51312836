// Reading HuggingFace PEFT LoRA / DoRA adapter directories and building layers from them.
//
// An adapter directory (what `PeftModel.save_pretrained` writes) holds
//   adapter_config.json          LoraConfig (dora/io/peft_config.hpp)
//   adapter_model.safetensors    base_model.model.<path>.lora_A.weight           [r, d_in]
//                                base_model.model.<path>.lora_B.weight           [d_out, r]
//                                base_model.model.<path>.lora_magnitude_vector   [d_out] (DoRA; PEFT
//                                  writes it without ".weight"; both spellings are read)
// where <path> is the module's name in the base model, so its base weight is `<path>.weight` in the
// model's checkpoint.
//
// Dtypes: adapter tensors must be F16, BF16, F32 or F64 (anything else is refused, naming the
// tensor and its dtype). Every failure throws PeftError (dora/io/error.hpp) naming the file and,
// where one is involved, the tensor or config key.
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include <cstdint>
#include <cstring>
#include <map>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "dora/detail/eigen.hpp"
#include "dora/dora.hpp"
#include "dora/io/error.hpp"
#include "dora/io/fs.hpp"
#include "dora/io/peft_config.hpp"
#include "dora/io/safetensors.hpp"

namespace dora::io {

/// One adapted module of an adapter, validated against the config.
struct PeftModule {
  std::string path;  ///< module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
  Eigen::Index rank = 0, d_out = 0, d_in = 0;
  double alpha = 0.0;
  double scaling = 0.0;  ///< PEFT's scaling: alpha / r or alpha / sqrt(r)
  bool use_rslora = false;
  bool use_dora = false;
  double dropout = 0.0;
  std::string key_A, key_B, key_magnitude;  ///< tensor names in adapter_model.safetensors ("" = none)

  /// Base tensor this module adapts.
  std::string weight_name() const { return path + ".weight"; }
  /// The library's per-layer settings for this module.
  AdapterConfig adapter_config() const {
    AdapterConfig c;
    c.rank = rank;
    c.alpha = alpha;
    c.use_rslora = use_rslora;
    c.dropout = dropout;
    c.init = Init::user;
    return c;
  }
};

/// A module's parameters, converted to Scalar.
template <typename Scalar>
struct PeftModuleWeights {
  Matrix<Scalar> A;          ///< r x d_in
  Matrix<Scalar> B;          ///< d_out x r
  Vector<Scalar> magnitude;  ///< d_out (DoRA), empty for LoRA
};

/// A loaded adapter directory. The safetensors file stays memory-mapped; tensors are converted on
/// request. The constructor validates every module (shapes, ranks against the config, DoRA
/// magnitudes present exactly when use_dora), so later calls fail only on a wrong base weight.
class PeftAdapter {
 public:
  static constexpr const char* kPrefix = "base_model.model.";

  explicit PeftAdapter(const std::string& dir)
      : dir_(dir),
        config_(load_config(dir)),
        weights_file_(detail::join_path(dir, "adapter_model.safetensors")),
        reader_(open_weights(dir)) {
    index_modules();
  }

  const std::string& dir() const { return dir_; }
  const PeftConfig& config() const { return config_; }
  /// In path order.
  const std::vector<PeftModule>& modules() const { return modules_; }
  const SafetensorsReader& tensors() const { return reader_; }
  const std::string& weights_file() const { return weights_file_; }

  const PeftModule* find(const std::string& path) const {
    const auto it = by_path_.find(path);
    return it == by_path_.end() ? nullptr : &modules_[it->second];
  }
  const PeftModule& module(const std::string& path) const {
    const PeftModule* m = find(path);
    if (m == nullptr) detail::peft_fail(weights_file_, "no adapted module '" + path + "'");
    return *m;
  }

  template <typename Scalar>
  PeftModuleWeights<Scalar> weights(const PeftModule& m) const {
    PeftModuleWeights<Scalar> w;
    w.A = reader_.matrix<Scalar>(m.key_A);
    w.B = reader_.matrix<Scalar>(m.key_B);
    if (!m.key_magnitude.empty()) w.magnitude = reader_.vector<Scalar>(m.key_magnitude);
    return w;
  }

  /// Throws unless a base weight of rows x cols fits module m (d_out x d_in, or d_in x d_out when
  /// stored_transposed, as with fan_in_fan_out). `base_file`/`base_tensor` name it in the message.
  void check_base_shape(const PeftModule& m, std::int64_t rows, std::int64_t cols, bool stored_transposed,
                        const std::string& base_file, const std::string& base_tensor) const {
    const std::int64_t er = stored_transposed ? m.d_in : m.d_out, ec = stored_transposed ? m.d_out : m.d_in;
    if (rows != er || cols != ec)
      detail::peft_fail_tensor(
          base_file, base_tensor,
          "base weight is " + std::to_string(rows) + " x " + std::to_string(cols) + " but the adapter " +
              weights_file_ + " needs " + std::to_string(er) + " x " + std::to_string(ec) +
              (stored_transposed ? " (fan_in_fan_out: [d_in, d_out])" : " ([d_out, d_in])") + " for module '" + m.path +
              "' (lora_A '" + m.key_A + "' is " + std::to_string(m.rank) + " x " + std::to_string(m.d_in) +
              ", lora_B '" + m.key_B + "' is " + std::to_string(m.d_out) + " x " + std::to_string(m.rank) + ")");
  }

  /// LoRA layer on `base` (d_out x d_in) with the module's A and B. Throws if the module is DoRA.
  template <typename Scalar>
  LoraLinear<Scalar> make_lora(const std::string& path, const BaseLayer<Scalar>& base) const {
    const PeftModule& m = module(path);
    if (m.use_dora) detail::peft_fail(weights_file_, "module '" + path + "' is DoRA: use make_dora()");
    check_base_shape(m, base.d_out(), base.d_in(), false, "<base layer>", m.weight_name());
    const PeftModuleWeights<Scalar> w = weights<Scalar>(m);
    LoraLinear<Scalar> layer(base, m.adapter_config(), w.A, w.B);
    layer.eval();
    return layer;
  }

  /// DoRA layer on `base` with the module's A, B and the stored magnitude (not recomputed).
  template <typename Scalar>
  DoraLinear<Scalar> make_dora(const std::string& path, const BaseLayer<Scalar>& base) const {
    const PeftModule& m = module(path);
    if (!m.use_dora) detail::peft_fail(weights_file_, "module '" + path + "' is LoRA (no magnitude): use make_lora()");
    check_base_shape(m, base.d_out(), base.d_in(), false, "<base layer>", m.weight_name());
    const PeftModuleWeights<Scalar> w = weights<Scalar>(m);
    DoraLinear<Scalar> layer(base, m.adapter_config(), w.A, w.B);
    layer.set_magnitude(w.magnitude);
    layer.eval();
    return layer;
  }

 private:
  static PeftConfig load_config(const std::string& dir) {
    if (!detail::is_directory(dir)) detail::peft_fail(dir, "adapter directory does not exist or is not a directory");
    const std::string cfg = detail::join_path(dir, "adapter_config.json");
    if (!detail::path_exists(cfg)) detail::peft_fail(cfg, "missing (an adapter directory needs adapter_config.json)");
    return PeftConfig::load(cfg);
  }
  static SafetensorsReader open_weights(const std::string& dir) {
    const std::string st = detail::join_path(dir, "adapter_model.safetensors");
    if (!detail::path_exists(st)) {
      if (detail::path_exists(detail::join_path(dir, "adapter_model.bin")))
        detail::peft_fail(st, "missing; adapter_model.bin (pickle) is not read: re-save with safe_serialization=True");
      detail::peft_fail(st, "missing");
    }
    return SafetensorsReader(st);
  }

  void index_modules() {
    struct Keys {
      std::string A, B, m;
    };
    std::map<std::string, Keys> found;
    const std::string& f = weights_file_;
    for (const TensorInfo& t : reader_.tensors()) {
      const std::string& n = t.name;
      if (!detail::starts_with(n, kPrefix))
        detail::peft_fail_tensor(f, n, "unexpected tensor: PEFT LoRA keys start with 'base_model.model.'");
      const std::string rest = n.substr(std::string(kPrefix).size());
      const auto take = [&](const char* suffix, std::string Keys::*slot) {
        if (!detail::ends_with(rest, suffix)) return false;
        const std::string path = rest.substr(0, rest.size() - std::strlen(suffix));
        if (path.empty()) detail::peft_fail_tensor(f, n, "empty module path");
        std::string& s = found[path].*slot;
        if (!s.empty())
          detail::peft_fail_tensor(f, n, "module '" + path + "' has a second magnitude tensor '" + s + "'");
        s = n;
        return true;
      };
      if (take(".lora_A.weight", &Keys::A) || take(".lora_B.weight", &Keys::B) ||
          take(".lora_magnitude_vector.weight", &Keys::m) || take(".lora_magnitude_vector", &Keys::m))
        continue;
      if (rest.find("lora_embedding_") != std::string::npos)
        detail::peft_fail_tensor(f, n, "LoRA on nn.Embedding is not supported (only linear layers)");
      if (detail::ends_with(rest, ".lora_B.bias"))
        detail::peft_fail_tensor(f, n, "lora_bias (a bias on lora_B) is not supported");
      detail::peft_fail_tensor(f, n,
                               "not a LoRA/DoRA tensor of a linear layer (lora_A.weight, lora_B.weight, "
                               "lora_magnitude_vector); other PEFT methods and saved modules are not supported");
    }
    if (found.empty()) detail::peft_fail(f, "holds no LoRA tensors");
    for (const auto& kv : found) {
      const std::string& path = kv.first;
      const Keys& k = kv.second;
      const std::string expect_A = kPrefix + path + ".lora_A.weight", expect_B = kPrefix + path + ".lora_B.weight";
      if (k.A.empty())
        detail::peft_fail_tensor(f, expect_A, "missing: module '" + path + "' has other adapter tensors but no lora_A");
      if (k.B.empty())
        detail::peft_fail_tensor(f, expect_B, "missing: module '" + path + "' has other adapter tensors but no lora_B");
      const TensorInfo& a = reader_.info(k.A);
      const TensorInfo& b = reader_.info(k.B);
      if (a.shape.size() != 2)
        detail::peft_fail_tensor(f, k.A,
                                 "has shape " + detail::shape_string(a.shape) +
                                     ": only linear layers (rank-2 [r, d_in] lora_A) are supported");
      if (b.shape.size() != 2)
        detail::peft_fail_tensor(f, k.B,
                                 "has shape " + detail::shape_string(b.shape) +
                                     ": only linear layers (rank-2 [d_out, r] lora_B) are supported");
      for (const std::string* key : {&k.A, &k.B, &k.m}) {
        if (key->empty()) continue;
        const Dtype dt = reader_.info(*key).dtype;
        if (!dtype_is_convertible(dt))
          detail::peft_fail_tensor(f, *key,
                                   std::string("has dtype ") + dtype_name(dt) + ": adapter tensors of module '" + path +
                                       "' must be F16, BF16, F32 or F64");
      }
      PeftModule m;
      m.path = path;
      m.rank = static_cast<Eigen::Index>(a.shape[0]);
      m.d_in = static_cast<Eigen::Index>(a.shape[1]);
      m.d_out = static_cast<Eigen::Index>(b.shape[0]);
      if (b.shape[1] != a.shape[0])
        detail::peft_fail_tensor(f, k.B,
                                 "rank " + std::to_string(b.shape[1]) + " (shape " + detail::shape_string(b.shape) +
                                     ") disagrees with lora_A '" + k.A + "' rank " + std::to_string(a.shape[0]) +
                                     " (shape " + detail::shape_string(a.shape) + ")");
      const Eigen::Index cfg_rank = config_.rank_for(path);
      if (m.rank != cfg_rank)
        detail::peft_fail_tensor(f, k.A,
                                 "rank " + std::to_string(m.rank) + " disagrees with " + config_.file +
                                     ": r = " + std::to_string(cfg_rank) + " for module '" + path + "' (r " +
                                     std::to_string(config_.r) +
                                     (config_.rank_pattern.empty() ? std::string() : ", after rank_pattern") + ")");
      if (m.rank < 1 || m.d_in < 1 || m.d_out < 1)
        detail::peft_fail_tensor(f, k.A,
                                 "empty adapter matrices (lora_A " + detail::shape_string(a.shape) + ", lora_B " +
                                     detail::shape_string(b.shape) + ")");
      m.alpha = config_.alpha_for(path);
      m.use_rslora = config_.use_rslora;
      m.use_dora = config_.use_dora;
      m.dropout = config_.lora_dropout;
      m.scaling = config_.scaling_for(path);
      m.key_A = k.A;
      m.key_B = k.B;
      if (config_.use_dora) {
        if (k.m.empty())
          detail::peft_fail_tensor(
              f, kPrefix + path + ".lora_magnitude_vector",
              "missing: " + config_.file + " has use_dora = true but module '" + path + "' has no DoRA magnitude");
        const TensorInfo& mi = reader_.info(k.m);
        if (mi.shape.size() != 1 || mi.shape[0] != m.d_out)
          detail::peft_fail_tensor(f, k.m,
                                   "has shape " + detail::shape_string(mi.shape) + " but module '" + path +
                                       "' has d_out = " + std::to_string(m.d_out) + " (lora_B '" + k.B + "')");
        m.key_magnitude = k.m;
      } else if (!k.m.empty()) {
        detail::peft_fail_tensor(f, k.m, "DoRA magnitude present but " + config_.file + " has use_dora = false");
      }
      by_path_.emplace(path, modules_.size());
      modules_.push_back(std::move(m));
    }
  }

  std::string dir_;
  PeftConfig config_;
  std::string weights_file_;
  SafetensorsReader reader_;
  std::vector<PeftModule> modules_;
  std::map<std::string, std::size_t> by_path_;
};

/// Lists the modules of an adapter: path, shape, rank, alpha, scaling, DoRA or LoRA.
inline void inspect_adapter(const PeftAdapter& adapter, std::ostream& out) {
  const PeftConfig& c = adapter.config();
  out << "adapter " << adapter.dir() << ": " << adapter.modules().size() << " modules, "
      << (c.use_dora ? "DoRA" : "LoRA") << ", r = " << c.r << ", lora_alpha = " << c.lora_alpha
      << (c.use_rslora ? ", rsLoRA (scaling alpha / sqrt(r))" : ", scaling alpha / r")
      << (c.fan_in_fan_out ? ", fan_in_fan_out (base weights stored [d_in, d_out])" : "") << "\n";
  for (const auto& kv : c.rank_pattern) out << "  rank_pattern  " << kv.first << " -> " << kv.second << "\n";
  for (const auto& kv : c.alpha_pattern) out << "  alpha_pattern " << kv.first << " -> " << kv.second << "\n";
  for (const PeftModule& m : adapter.modules()) {
    out << "  " << m.path << "  [" << m.d_out << ", " << m.d_in << "]  rank " << m.rank << "  alpha " << m.alpha
        << "  scaling " << detail::format_double(m.scaling) << "  " << (m.use_dora ? "DoRA" : "LoRA") << "  "
        << dtype_name(adapter.tensors().info(m.key_A).dtype) << "\n";
  }
}

}  // namespace dora::io
