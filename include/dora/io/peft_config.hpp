// PEFT's LoraConfig (adapter_config.json): the parts that act on the weights, parsed and validated,
// and written back as PEFT 0.21 writes them. Scaling follows PEFT 0.21 (LoraModel._create_and_replace
// + get_pattern_key):
//   r     = rank_pattern[first key K, in file order, with re.match(rf"(.*\.)?({K})$", path)] or r
//   alpha = alpha_pattern[same rule] or lora_alpha
//   s     = alpha / r, or alpha / sqrt(r) with use_rslora.
// Settings that change the adapted weights in ways this library does not reproduce (other PEFT
// methods, trained biases, modules_to_save, ...) are refused with a PeftError naming the key.
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "dora/detail/eigen.hpp"
#include "dora/io/error.hpp"
#include "dora/io/fs.hpp"

namespace dora::io {

namespace detail {

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

}  // namespace dora::io
