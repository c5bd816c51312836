// HuggingFace PEFT LoRA / DoRA adapters: load, build layers, save, and merge into a checkpoint.
//
// An adapter directory (what `PeftModel.save_pretrained` writes) holds
//   adapter_config.json          LoraConfig: r, lora_alpha, use_rslora, use_dora, rank_pattern, ...
//   adapter_model.safetensors    base_model.model.<path>.lora_A.weight           [r, d_in]
//                                base_model.model.<path>.lora_B.weight           [d_out, r]
//                                base_model.model.<path>.lora_magnitude_vector   [d_out] (DoRA; PEFT
//                                  writes it without ".weight"; both spellings are read)
// where <path> is the module's name in the base model, so its base weight is `<path>.weight` in the
// model's checkpoint. Scaling follows PEFT 0.21 (LoraModel._create_and_replace + get_pattern_key):
//   r     = rank_pattern[first key K, in file order, with re.match(rf"(.*\.)?({K})$", path)] or r
//   alpha = alpha_pattern[same rule] or lora_alpha
//   s     = alpha / r, or alpha / sqrt(r) with use_rslora.
//
// Merge (dora-merge, merge_checkpoint): W' = W + s B A (LoRA), W' = diag(m / n) (W + s B A) with
// n = row norms of W + s B A (DoRA), computed in double from the stored values and rounded once to
// the output dtype. An inactive row (n = 0, or m / n overflowing with finite m and n) merges to
// zero: the library's one rule, dora::inactive_row in dora/magnitude.hpp (PEFT would give inf or
// NaN there). n is computed as DoraLinear computes it where the rule depends on it: a plain sum of
// squares where that is finite and far from underflow, otherwise Eigen's scaled stableNorm of the
// row, so a row whose squares overflow or underflow is neither zeroed nor kept where the layer
// would do otherwise. fan_in_fan_out = true (GPT-2 style Conv1D) means the base weight is stored
// transposed, [d_in, d_out]; the merge reads and writes it in that layout.
//
// Dtypes: adapter tensors (lora_A, lora_B, magnitude) and adapted base weights must be F16, BF16,
// F32 or F64 (anything else is refused, naming the tensor, its dtype and the module, before any
// output exists). Every other base tensor, of any safetensors dtype (I64 position ids, BOOL masks,
// U8 / F8 quantized data, ...), is copied byte for byte; MergeOptions::dtype (--dtype) converts
// the F16/BF16/F32/F64 tensors only and copies the others unchanged.
//
// Every failure throws PeftError (a SafetensorsError, so a std::runtime_error) whose message names
// the file and, where one is involved, the tensor or config key. Nothing is written on failure.
//
// Platform: POSIX (open, mmap, madvise, mkostemp, mkdtemp, rename, opendir) and a little-endian
// host; see detail/platform.hpp.
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include <dirent.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "dora/detail/eigen.hpp"
#include "dora/dora.hpp"
#include "dora/io/safetensors.hpp"

namespace dora::io {

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

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
inline bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

inline std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

inline bool path_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}
inline bool is_directory(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) peft_fail(path, std::string("cannot open: ") + std::strerror(errno));
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) peft_fail(path, "read failed");
  return s.str();
}

/// Python's re.match(rf"(.*\.)?({key})$", path) (PEFT's get_pattern_key): the key, a regular
/// expression, must match the whole path or a suffix of it that starts after a '.'.
inline bool pattern_key_matches(const std::string& file, const std::string& key, const std::string& path) {
  try {
    const std::regex re("(.*\\.)?(" + key + ")", std::regex::ECMAScript);
    return std::regex_match(path, re);
  } catch (const std::regex_error& e) {
    peft_fail(file, "pattern key '" + key + "' is not a regular expression this library can read: " + e.what());
  }
}

/// Escapes regular-expression characters so that a module path is matched literally as a pattern key.
inline std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::strchr(".^$|()[]{}*+?\\", c) != nullptr) out += '\\';
    out += c;
  }
  return out;
}

/// Drops the pages of [p, p + n) from this process's resident set. Used on read-only private file
/// mappings after a tensor has been consumed: the data stays in the file (and the page cache), a
/// later access would fault it back in, and the process's RSS stays near one tensor instead of
/// growing to the whole checkpoint. Only whole pages inside the range are released.
inline void release_pages(const void* p, std::size_t n) {
  const long ps = ::sysconf(_SC_PAGESIZE);
  if (ps <= 0 || n == 0) return;
  const std::uintptr_t page = static_cast<std::uintptr_t>(ps);
  const std::uintptr_t b = (reinterpret_cast<std::uintptr_t>(p) + page - 1) / page * page;
  const std::uintptr_t e = (reinterpret_cast<std::uintptr_t>(p) + n) / page * page;
  if (e > b) static_cast<void>(::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED));
}

inline std::string format_double(double v) {
  std::ostringstream s;
  s << std::setprecision(17) << v;
  return s.str();
}

}  // namespace detail

/// The parts of PEFT's LoraConfig (adapter_config.json) that act on the weights.
struct PeftConfig {
  Eigen::Index r = 8;
  double lora_alpha = 8.0;
  bool use_rslora = false;
  bool use_dora = false;
  bool fan_in_fan_out = false;
  double lora_dropout = 0.0;
  /// Pattern keys in file order: PEFT takes the first that matches.
  std::vector<std::pair<std::string, Eigen::Index>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  /// target_modules: a list of names (a module matches when its path equals one or ends with
  /// "." + one) or, when target_modules_is_regex, one regular expression matched against the whole path.
  std::vector<std::string> target_modules;
  std::string target_modules_regex;
  bool target_modules_is_regex = false;
  std::string base_model_name_or_path;
  std::string file = "adapter_config.json";  ///< where it was read from, for messages

  /// Rank of the module at `path` (rank_pattern, else r).
  Eigen::Index rank_for(const std::string& path) const {
    for (const auto& kv : rank_pattern)
      if (detail::pattern_key_matches(file, kv.first, path)) return kv.second;
    return r;
  }
  /// lora_alpha of the module at `path` (alpha_pattern, else lora_alpha).
  double alpha_for(const std::string& path) const {
    for (const auto& kv : alpha_pattern)
      if (detail::pattern_key_matches(file, kv.first, path)) return kv.second;
    return lora_alpha;
  }
  /// PEFT's scaling[adapter]: alpha / r, or alpha / sqrt(r) with rsLoRA.
  double scaling_for(const std::string& path) const {
    const double rr = static_cast<double>(rank_for(path));
    return use_rslora ? alpha_for(path) / std::sqrt(rr) : alpha_for(path) / rr;
  }
  /// Whether target_modules selects the module at `path` (informational: the adapter file decides).
  bool targets(const std::string& path) const {
    if (target_modules_is_regex) {
      try {
        return std::regex_match(path, std::regex(target_modules_regex, std::regex::ECMAScript));
      } catch (const std::regex_error& e) {
        detail::peft_fail(file,
                          "target_modules '" + target_modules_regex + "' is not a regular expression: " + e.what());
      }
    }
    for (const std::string& t : target_modules)
      if (path == t || detail::ends_with(path, "." + t)) return true;
    return false;
  }

  /// Parses adapter_config.json text; `file` names it in messages. Rejects settings this library
  /// cannot reproduce (other PEFT methods, trained biases, modules_to_save, ...) rather than
  /// silently merging something different from what PEFT would.
  static PeftConfig parse(const std::string& text, const std::string& file) {
    using ojson = nlohmann::ordered_json;  // keeps rank_pattern / alpha_pattern in file order
    ojson j;
    try {
      j = ojson::parse(text);
    } catch (const ojson::exception& e) {
      detail::peft_fail(file, std::string("invalid JSON: ") + e.what());
    }
    if (!j.is_object()) detail::peft_fail(file, "is not a JSON object");
    PeftConfig c;
    c.file = file;
    const auto bad = [&](const std::string& key, const std::string& what) -> void {
      detail::peft_fail(file, "'" + key + "' " + what);
    };
    const auto present = [&](const char* key) { return j.contains(key) && !j.at(key).is_null(); };
    const auto get_bool = [&](const char* key, bool* out) {
      if (!present(key)) return;
      if (!j.at(key).is_boolean()) bad(key, "must be true or false, got " + j.at(key).dump());
      *out = j.at(key).get<bool>();
    };
    const auto get_positive_int = [&](const std::string& key, const ojson& v) -> Eigen::Index {
      if (!v.is_number_integer() || v.get<std::int64_t>() < 1 ||
          v.get<std::int64_t>() > std::numeric_limits<std::int32_t>::max())
        bad(key, "must be a positive integer, got " + v.dump());
      return static_cast<Eigen::Index>(v.get<std::int64_t>());
    };
    const auto get_finite = [&](const std::string& key, const ojson& v) -> double {
      if (!v.is_number() || !std::isfinite(v.get<double>())) bad(key, "must be a finite number, got " + v.dump());
      return v.get<double>();
    };

    if (present("peft_type")) {
      if (!j.at("peft_type").is_string() || j.at("peft_type").get<std::string>() != "LORA")
        bad("peft_type", "is " + j.at("peft_type").dump() + ": only LORA adapters (LoRA and DoRA) are supported");
    }
    if (!present("r")) detail::peft_fail(file, "missing 'r'");
    c.r = get_positive_int("r", j.at("r"));
    if (!present("lora_alpha")) detail::peft_fail(file, "missing 'lora_alpha'");
    c.lora_alpha = get_finite("lora_alpha", j.at("lora_alpha"));
    get_bool("use_rslora", &c.use_rslora);
    get_bool("use_dora", &c.use_dora);
    get_bool("fan_in_fan_out", &c.fan_in_fan_out);
    if (present("lora_dropout")) {
      c.lora_dropout = get_finite("lora_dropout", j.at("lora_dropout"));
      if (c.lora_dropout < 0.0 || c.lora_dropout >= 1.0)
        bad("lora_dropout", "must lie in [0, 1), got " + j.at("lora_dropout").dump());
    }
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      if (!present(key)) continue;
      const ojson& p = j.at(key);
      if (!p.is_object()) bad(key, "must be an object from module pattern to value, got " + p.dump());
      for (auto it = p.begin(); it != p.end(); ++it) {
        const std::string sub = std::string(key) + "[\"" + it.key() + "\"]";
        if (std::string(key) == "rank_pattern")
          c.rank_pattern.emplace_back(it.key(), get_positive_int(sub, it.value()));
        else
          c.alpha_pattern.emplace_back(it.key(), get_finite(sub, it.value()));
        detail::pattern_key_matches(file, it.key(), "");  // rejects a pattern std::regex cannot compile, now
      }
    }
    if (present("target_modules")) {
      const ojson& t = j.at("target_modules");
      if (t.is_string()) {
        c.target_modules_is_regex = true;
        c.target_modules_regex = t.get<std::string>();
      } else if (t.is_array()) {
        for (const ojson& e : t) {
          if (!e.is_string()) bad("target_modules", "entries must be strings, got " + e.dump());
          c.target_modules.push_back(e.get<std::string>());
        }
      } else {
        bad("target_modules", "must be a list of names or a regular expression, got " + t.dump());
      }
    }
    if (present("base_model_name_or_path") && j.at("base_model_name_or_path").is_string())
      c.base_model_name_or_path = j.at("base_model_name_or_path").get<std::string>();

    // Settings that change the adapted weights in ways this library does not implement.
    if (present("bias") && !(j.at("bias").is_string() && j.at("bias").get<std::string>() == "none"))
      bad("bias", "is " + j.at("bias").dump() + ": trained biases are not supported (only \"none\")");
    const auto must_be_false = [&](const char* key, const char* why) {
      if (present(key) && !(j.at(key).is_boolean() && !j.at(key).get<bool>()))
        bad(key, std::string("is ") + j.at(key).dump() + ": " + why + " is not supported");
    };
    must_be_false("lora_bias", "a bias on lora_B");
    must_be_false("use_qalora", "QALoRA");
    const auto must_be_empty = [&](const char* key, const char* why) {
      if (!present(key)) return;
      const ojson& v = j.at(key);
      if ((v.is_array() || v.is_object()) && v.empty()) return;
      bad(key, std::string("is ") + v.dump() + ": " + why + " is not supported");
    };
    must_be_empty("modules_to_save", "modules_to_save (fully trained modules stored in the adapter)");
    must_be_empty("layer_replication", "layer_replication");
    must_be_empty("target_parameters", "target_parameters (LoRA on nn.Parameter)");
    must_be_empty("trainable_token_indices", "trainable_token_indices");
    must_be_empty("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)");
    must_be_empty("use_bdlora", "use_bdlora");
    return c;
  }

  static PeftConfig load(const std::string& path) { return parse(detail::read_text_file(path), path); }

  /// adapter_config.json as PEFT 0.21 writes it for these settings (fields it does not need are
  /// left to PEFT's defaults).
  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json j;
    j["alpha_pattern"] = nlohmann::ordered_json::object();
    for (const auto& kv : alpha_pattern) j["alpha_pattern"][kv.first] = kv.second;
    j["base_model_name_or_path"] =
        base_model_name_or_path.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(base_model_name_or_path);
    j["bias"] = "none";
    j["fan_in_fan_out"] = fan_in_fan_out;
    j["inference_mode"] = true;
    j["init_lora_weights"] = true;
    j["layers_pattern"] = nullptr;
    j["layers_to_transform"] = nullptr;
    if (lora_alpha == std::floor(lora_alpha) && std::abs(lora_alpha) < 1e15)
      j["lora_alpha"] = static_cast<std::int64_t>(lora_alpha);
    else
      j["lora_alpha"] = lora_alpha;
    j["lora_dropout"] = lora_dropout;
    j["modules_to_save"] = nullptr;
    j["peft_type"] = "LORA";
    j["r"] = r;
    j["rank_pattern"] = nlohmann::ordered_json::object();
    for (const auto& kv : rank_pattern) j["rank_pattern"][kv.first] = kv.second;
    j["revision"] = nullptr;
    if (target_modules_is_regex)
      j["target_modules"] = target_modules_regex;
    else
      j["target_modules"] = target_modules;
    j["task_type"] = nullptr;
    j["use_dora"] = use_dora;
    j["use_rslora"] = use_rslora;
    return j;
  }
};

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

/// Options of merge_checkpoint (the dora-merge tool).
struct MergeOptions {
  /// Output dtype of the floating tensors (F16, BF16, F32, F64: adapted weights and the others),
  /// which are converted to it, rounding to nearest even. Tensors of any other dtype (integer,
  /// BOOL, F8, F4, C64, ...) are copied unchanged whatever this says. Must itself be F16, BF16,
  /// F32 or F64. Default: every tensor keeps its dtype.
  std::optional<Dtype> dtype;
  /// One line per merged module is written here when not null.
  std::ostream* log = nullptr;
};

struct MergedModule {
  std::string tensor;  ///< "<path>.weight"
  std::vector<std::int64_t> shape;
  Eigen::Index rank = 0;
  bool use_dora = false;
  double max_abs_delta = 0.0;  ///< max |W' - W| (before rounding to the output dtype)
};

struct MergeReport {
  std::vector<MergedModule> merged;
  std::size_t tensors_copied = 0;
  std::vector<std::string> files_written;
};

namespace detail {

/// One tensor of the base checkpoint: its reader (shard) and info.
struct BaseTensor {
  const SafetensorsReader* reader;
  const TensorInfo* info;
};

/// n_j = ||W_j + s B_j A|| for output feature j, computed as DoraLinear's row norm falls back to
/// (FactoredRowNorm::compute_with): the row formed by the same Eigen expression in double, then
/// Eigen's scaled stableNorm, so that where the plain sum of squares overflows or underflows both
/// give the same n bit for bit, and hence the same inactive-row decision (dora::inactive_row).
/// W_j is row j of the stored weight, or column j when it is stored transposed.
inline double scaled_row_norm(const PeftModule& m, const PeftModuleWeights<double>& w, const std::uint8_t* src,
                              Dtype src_dtype, bool transposed, Eigen::Index j,
                              Eigen::Matrix<double, 1, Eigen::Dynamic>& v) {
  const std::size_t ies = dtype_size(src_dtype);
  v.resize(m.d_in);
  for (Eigen::Index k = 0; k < m.d_in; ++k) {
    const Eigen::Index at = transposed ? k * m.d_out + j : j * m.d_in + k;
    v[k] = load_as_double(src + static_cast<std::size_t>(at) * ies, src_dtype);
  }
  v.noalias() += m.scaling * w.B.row(j) * w.A;
  return v.stableNorm();
}

/// Whether a sum of squares can be used as it is: finite and far enough above the underflow
/// threshold that squares lost to underflow cannot matter (the layer's threshold, row_norm.hpp).
inline bool plain_sum_of_squares_ok(double sq) {
  return std::isfinite(sq) && sq >= std::numeric_limits<double>::min() / std::numeric_limits<double>::epsilon();
}

/// Computes the merged tensor of module `m` from the stored base weight (rows x cols in the
/// stored layout) into `out` (encoded as out_dtype). Works on blocks of stored rows in double so
/// that memory stays at one output tensor plus a few MB. DoRA row norms are plain sums of squares
/// where those are safe and scaled_row_norm() elsewhere, as in DoraLinear.
inline double merge_tensor(const PeftModule& m, const PeftModuleWeights<double>& w, const std::uint8_t* src,
                           Dtype src_dtype, bool transposed, std::uint8_t* out, Dtype out_dtype) {
  const Eigen::Index rows = transposed ? m.d_in : m.d_out;
  const Eigen::Index cols = transposed ? m.d_out : m.d_in;
  const std::size_t ies = dtype_size(src_dtype), oes = dtype_size(out_dtype);
  const Eigen::Index block = std::max<Eigen::Index>(1, (Eigen::Index{1} << 20) / cols);  // ~8 MB of doubles
  const double s = m.scaling;
  Matrix<double> V, W;
  const auto compute = [&](Eigen::Index i0, Eigen::Index n) {
    W.resize(n, cols);
    const std::uint8_t* p = src + static_cast<std::size_t>(i0) * static_cast<std::size_t>(cols) * ies;
    for (Eigen::Index i = 0; i < W.size(); ++i)
      W.data()[i] = load_as_double(p + static_cast<std::size_t>(i) * ies, src_dtype);
    V = W;
    if (!transposed)
      V.noalias() += s * w.B.middleRows(i0, n) * w.A;
    else
      V.noalias() += s * w.A.middleCols(i0, n).transpose() * w.B.transpose();
  };
  // The DoRA scale of output feature i: the library's one rule (dora/magnitude.hpp).
  const auto scale_of = [](double mag, double n) { return magnitude_scale(mag, n); };
  Eigen::Matrix<double, 1, Eigen::Dynamic> v;  // scaled_row_norm's workspace
  const auto norm_of = [&](double sq, Eigen::Index j) {
    return plain_sum_of_squares_ok(sq) ? std::sqrt(sq) : scaled_row_norm(m, w, src, src_dtype, transposed, j, v);
  };
  Eigen::VectorXd g;
  if (m.use_dora && transposed) {
    // Output features are columns here: accumulate their squared norms over all row blocks first.
    Eigen::VectorXd nsq = Eigen::VectorXd::Zero(cols);
    for (Eigen::Index i0 = 0; i0 < rows; i0 += block) {
      compute(i0, std::min(block, rows - i0));
      nsq += V.colwise().squaredNorm().transpose();
    }
    g.resize(cols);
    for (Eigen::Index i = 0; i < cols; ++i) g[i] = scale_of(w.magnitude[i], norm_of(nsq[i], i));
  }
  double max_delta = 0.0;
  for (Eigen::Index i0 = 0; i0 < rows; i0 += block) {
    const Eigen::Index n = std::min(block, rows - i0);
    compute(i0, n);
    if (m.use_dora) {
      if (transposed) {
        V = V * g.asDiagonal();
      } else {
        for (Eigen::Index i = 0; i < n; ++i)
          V.row(i) *= scale_of(w.magnitude[i0 + i], norm_of(V.row(i).squaredNorm(), i0 + i));
      }
    }
    // NaN (a non-finite adapter or base) must show in the report, not vanish in std::max.
    const double d = (V - W).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>();
    if (std::isnan(d) || d > max_delta || std::isnan(max_delta)) max_delta = std::isnan(max_delta) ? max_delta : d;
    std::uint8_t* q = out + static_cast<std::size_t>(i0) * static_cast<std::size_t>(cols) * oes;
    for (Eigen::Index i = 0; i < V.size(); ++i) store(q + static_cast<std::size_t>(i) * oes, V.data()[i], out_dtype);
  }
  return max_delta;
}

/// Converts a tensor's bytes between two of F16, BF16, F32, F64 (element by element, any rank).
inline void convert_bytes(const std::uint8_t* src, Dtype from, std::size_t count, std::uint8_t* dst, Dtype to) {
  const std::size_t ies = dtype_size(from), oes = dtype_size(to);
  for (std::size_t i = 0; i < count; ++i) store(dst + i * oes, load_as_double(src + i * ies, from), to);
}

/// A directory created next to `path` that replaces `path` on commit() (rename) and is removed
/// with its files otherwise: a sharded output appears whole or not at all.
class AtomicDir {
 public:
  explicit AtomicDir(std::string path) : path_(std::move(path)) {
    while (path_.size() > 1 && path_.back() == '/') path_.pop_back();
    if (path_exists(path_)) {
      if (!is_directory(path_)) peft_fail(path_, "output exists and is not a directory");
      if (!dir_empty(path_)) peft_fail(path_, "output directory exists and is not empty (refusing to overwrite)");
    }
    std::string tmpl = path_ + ".tmp.XXXXXX";
    if (::mkdtemp(&tmpl[0]) == nullptr)
      peft_fail(path_, std::string("cannot create temporary directory: ") + std::strerror(errno));
    tmp_ = tmpl;
    ::chmod(tmp_.c_str(), 0755);
  }
  AtomicDir(const AtomicDir&) = delete;
  AtomicDir& operator=(const AtomicDir&) = delete;
  ~AtomicDir() { discard(); }

  const std::string& tmp() const { return tmp_; }

  void commit() {
    // rename(2) replaces an empty directory; a non-empty one (a race) makes it fail, and the
    // temporary is then removed by the destructor.
    if (::rename(tmp_.c_str(), path_.c_str()) != 0)
      peft_fail(path_, std::string("rename of the temporary directory failed: ") + std::strerror(errno));
    tmp_.clear();
  }

  static bool dir_empty(const std::string& d) {
    DIR* dp = ::opendir(d.c_str());
    if (dp == nullptr) return false;
    bool empty = true;
    while (const dirent* e = ::readdir(dp)) {
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
        empty = false;
        break;
      }
    }
    ::closedir(dp);
    return empty;
  }

 private:
  void discard() noexcept {
    if (tmp_.empty()) return;
    if (DIR* dp = ::opendir(tmp_.c_str())) {
      while (const dirent* e = ::readdir(dp)) {
        if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
        ::unlink((tmp_ + "/" + e->d_name).c_str());
      }
      ::closedir(dp);
    }
    ::rmdir(tmp_.c_str());
    tmp_.clear();
  }

  std::string path_, tmp_;
};

/// A base checkpoint: one file, or shards listed by a model.safetensors.index.json.
struct BaseCheckpoint {
  bool sharded = false;
  std::string index_file;                   // sharded only
  nlohmann::ordered_json index_metadata;    // sharded only: the index's "metadata"
  nlohmann::ordered_json index_weight_map;  // sharded only: kept in its order for the output index
  std::vector<std::string> shard_names;     // file names (relative to the index's directory), in first-seen order
  std::vector<SafetensorsReader> readers;   // one per shard
  std::map<std::string, BaseTensor> tensors;
  std::map<std::string, std::string> tensor_file;  // tensor -> file path, for messages

  explicit BaseCheckpoint(const std::string& path) {
    if (ends_with(path, ".json")) {
      sharded = true;
      index_file = path;
      nlohmann::ordered_json j;
      try {
        j = nlohmann::ordered_json::parse(read_text_file(path));
      } catch (const nlohmann::ordered_json::exception& e) {
        peft_fail(path, std::string("invalid JSON: ") + e.what());
      }
      if (!j.is_object() || !j.contains("weight_map") || !j.at("weight_map").is_object())
        peft_fail(path, "not a sharded-checkpoint index: needs an object 'weight_map' from tensor name to shard file");
      if (j.contains("metadata")) index_metadata = j.at("metadata");
      index_weight_map = j.at("weight_map");
      const std::size_t slash = path.find_last_of('/');
      const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
      std::map<std::string, std::string> weight_map;
      for (auto it = j.at("weight_map").begin(); it != j.at("weight_map").end(); ++it) {
        if (!it.value().is_string()) peft_fail(path, "weight_map entry '" + it.key() + "' is not a file name");
        const std::string shard = it.value().get<std::string>();
        if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..")
          peft_fail(path, "weight_map entry '" + it.key() + "' names '" + shard +
                              "': shards must be plain file names beside the index");
        weight_map[it.key()] = shard;
        if (std::find(shard_names.begin(), shard_names.end(), shard) == shard_names.end()) shard_names.push_back(shard);
      }
      readers.reserve(shard_names.size());
      for (const std::string& s : shard_names) readers.emplace_back(join_path(dir, s));
      for (std::size_t k = 0; k < readers.size(); ++k) {
        for (const TensorInfo& t : readers[k].tensors()) {
          const auto wm = weight_map.find(t.name);
          if (wm == weight_map.end() || wm->second != shard_names[k])
            peft_fail_tensor(readers[k].path(), t.name,
                             wm == weight_map.end()
                                 ? "is in the shard but not in the index's weight_map (" + path + ")"
                                 : "is in this shard but the index (" + path + ") maps it to '" + wm->second + "'");
          add(readers[k], t);
        }
      }
      for (const auto& kv : weight_map)
        if (!tensors.count(kv.first))
          peft_fail_tensor(path, kv.first, "listed in weight_map for shard '" + kv.second + "' but not found there");
    } else {
      readers.emplace_back(path);
      for (const TensorInfo& t : readers[0].tensors()) add(readers[0], t);
    }
  }

 private:
  void add(const SafetensorsReader& r, const TensorInfo& t) {
    if (tensors.count(t.name))
      peft_fail_tensor(r.path(), t.name, "appears in two shards ('" + tensor_file[t.name] + "')");
    tensors.emplace(t.name, BaseTensor{&r, &t});
    tensor_file.emplace(t.name, r.path());
  }
};

}  // namespace detail

/// Merges every module of the adapter at `adapter_dir` into the base checkpoint and writes the
/// result. `base` is a .safetensors file (then `out` is a file) or a model.safetensors.index.json
/// (then `out` is a directory, created, which receives the same shard names and a new index).
/// Streams one tensor at a time from memory-mapped input; peak memory is about one output tensor
/// plus a few MB, whatever the checkpoint's size. Everything is validated before any output is
/// created (shapes, dtypes of adapted weights, options.dtype); on any failure, including one while
/// writing a later shard, no output file or directory is left. A sharded output's index gets
/// metadata.total_size = the sum of the written tensors' bytes.
inline MergeReport merge_checkpoint(const std::string& base, const std::string& adapter_dir, const std::string& out,
                                    const MergeOptions& options = {}) {
  if (options.dtype && !dtype_is_convertible(*options.dtype))
    detail::peft_fail(out,
                      std::string("output dtype ") + dtype_name(*options.dtype) +
                          " is not one of F16, BF16, F32, F64 (MergeOptions::dtype converts floating tensors only)");
  const PeftAdapter adapter(adapter_dir);
  detail::BaseCheckpoint ckpt(base);
  const bool transposed = adapter.config().fan_in_fan_out;

  // Validate every module against the base before anything is written.
  std::map<std::string, const PeftModule*> module_of;  // base tensor name -> module
  for (const PeftModule& m : adapter.modules()) {
    const std::string wname = m.weight_name();
    const auto it = ckpt.tensors.find(wname);
    if (it == ckpt.tensors.end())
      detail::peft_fail_tensor(ckpt.sharded ? ckpt.index_file : base, wname,
                               "not found: adapter " + adapter.weights_file() + " adapts module '" + m.path +
                                   "' (tensor '" + m.key_A + "') but the base checkpoint has no such weight");
    const TensorInfo& t = *it->second.info;
    const std::string& file = ckpt.tensor_file.at(wname);
    if (t.shape.size() != 2)
      detail::peft_fail_tensor(file, wname,
                               "has shape " + detail::shape_string(t.shape) + " but module '" + m.path + "' of " +
                                   adapter.weights_file() + " is a linear layer (rank-2 weight)");
    adapter.check_base_shape(m, t.shape[0], t.shape[1], transposed, file, wname);
    if (!dtype_is_convertible(t.dtype))
      detail::peft_fail_tensor(file, wname,
                               std::string("has dtype ") + dtype_name(t.dtype) + " but module '" + m.path + "' of " +
                                   adapter.weights_file() +
                                   " adapts it: only F16, BF16, F32 and F64 weights can be merged (quantized or "
                                   "integer weights are not dequantized here)");
    module_of.emplace(wname, &m);
  }

  MergeReport report;
  // --dtype converts floating tensors only; everything else keeps its dtype and bytes.
  const auto out_dtype = [&](const TensorInfo& t) {
    return options.dtype && dtype_is_convertible(t.dtype) ? *options.dtype : t.dtype;
  };
  // Writes one shard (or the single file) at `path` from `reader`, tensor by tensor; returns the
  // size of its data buffer (the bytes of its tensors as written).
  const auto write_file = [&](const SafetensorsReader& reader, const std::string& path) -> std::size_t {
    SafetensorsStreamWriter w(path);
    w.set_metadata(reader.metadata());
    for (const TensorInfo& t : reader.tensors()) w.declare(t.name, out_dtype(t), t.shape);
    w.begin();
    std::vector<std::uint8_t> buf;
    for (const TensorInfo& t : reader.tensors()) {
      const std::uint8_t* src = reader.raw(t.name);
      const std::size_t in_bytes = t.nbytes();
      const Dtype od = out_dtype(t);
      const std::size_t count = static_cast<std::size_t>(t.numel());
      const auto mod = module_of.find(t.name);
      if (mod != module_of.end()) {
        const PeftModule& m = *mod->second;
        const PeftModuleWeights<double> wts = adapter.weights<double>(m);
        buf.assign(count * dtype_size(od), 0);
        MergedModule mm;
        mm.tensor = t.name;
        mm.shape = t.shape;
        mm.rank = m.rank;
        mm.use_dora = m.use_dora;
        mm.max_abs_delta = detail::merge_tensor(m, wts, src, t.dtype, transposed, buf.data(), od);
        w.write(t.name, buf.data(), buf.size());
        if (options.log != nullptr)
          *options.log << "merged " << t.name << " " << detail::shape_string(t.shape) << " " << dtype_name(t.dtype)
                       << (od != t.dtype ? std::string(" -> ") + dtype_name(od) : std::string()) << "  rank " << m.rank
                       << "  " << (m.use_dora ? "DoRA" : "LoRA") << "  scaling " << m.scaling << "  max|delta| "
                       << mm.max_abs_delta << "\n";
        report.merged.push_back(std::move(mm));
      } else if (od == t.dtype) {
        w.write(t.name, src, in_bytes);  // bytes as they are
        ++report.tensors_copied;
      } else {
        buf.resize(count * dtype_size(od));
        detail::convert_bytes(src, t.dtype, count, buf.data(), od);
        w.write(t.name, buf.data(), buf.size());
        ++report.tensors_copied;
      }
      detail::release_pages(src, in_bytes);
      // Give a large conversion buffer back rather than keep the largest tensor's worth around.
      if (buf.capacity() > (std::size_t{64} << 20)) std::vector<std::uint8_t>().swap(buf);
    }
    w.finish();
    report.files_written.push_back(path);
    return w.declared().empty() ? std::size_t{0} : w.declared().back().end;
  };

  if (!ckpt.sharded) {
    write_file(ckpt.readers[0], out);
    return report;
  }
  detail::AtomicDir dir(out);
  std::size_t total = 0;  // what transformers' index calls total_size: tensor bytes, without headers
  for (std::size_t k = 0; k < ckpt.readers.size(); ++k)
    total += write_file(ckpt.readers[k], detail::join_path(dir.tmp(), ckpt.shard_names[k]));
  // The index: same metadata (total_size updated to the output's bytes) and the same weight_map.
  nlohmann::ordered_json idx;
  idx["metadata"] = ckpt.index_metadata.is_object() ? ckpt.index_metadata : nlohmann::ordered_json::object();
  idx["metadata"]["total_size"] = total;
  idx["weight_map"] = ckpt.index_weight_map;
  const std::size_t slash = ckpt.index_file.find_last_of('/');
  const std::string index_name = slash == std::string::npos ? ckpt.index_file : ckpt.index_file.substr(slash + 1);
  const std::string text = idx.dump(2) + "\n";
  {
    detail::AtomicFile f(detail::join_path(dir.tmp(), index_name));
    f.write(text.data(), text.size());
    f.commit();
  }
  for (std::string& f : report.files_written) f = detail::join_path(out, f.substr(dir.tmp().size() + 1));
  dir.commit();
  report.files_written.push_back(detail::join_path(out, index_name));
  return report;
}

}  // namespace dora::io
