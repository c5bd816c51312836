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

/// The kind of torch module an adapted module is. Decided by the adapter's tensors: lora_embedding_A/B
/// (nn.Embedding), or lora_A.weight / lora_B.weight of rank 2 (nn.Linear) or of rank 3, 4, 5
/// (nn.Conv1d, Conv2d, Conv3d).
enum class ModuleKind { linear, embedding, conv };

/// One adapted module of an adapter, validated against the config.
///
/// The adapter matrices are seen as linear ones, A: rank x d_in and B: d_out x (rank / groups):
///   linear     W [d_out, d_in] (stored [d_in, d_out] with fan_in_fan_out)
///   embedding  W [num_embeddings, embedding_dim] = [d_in, d_out]: always stored transposed, with
///              A = lora_embedding_A [r, num_embeddings], B = lora_embedding_B [embedding_dim, r];
///              DoRA's norm is per embedding dimension (a column of W), over the vocabulary
///   conv       W [out, in / groups, k...], A = lora_A.weight [r, in, k...], B = lora_B.weight
///              [out, r / groups, 1...]: d_out = out, d_in = in * prod(k) (W and A flattened after
///              their first dimension, which is how PEFT forms B A for a conv:
///              B.view(-1, r) @ A.view(r, -1))
struct PeftModule {
  std::string path;  ///< module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
  ModuleKind kind = ModuleKind::linear;
  Eigen::Index rank = 0, d_out = 0, d_in = 0;
  Eigen::Index in_channels = 0;      ///< conv only
  std::vector<std::int64_t> kernel;  ///< conv only: the kernel's sizes, one per spatial dimension (1, 2 or 3)
  /// conv only: the base layer's groups, r / lora_B.shape[1] (PEFT builds lora_B with the base's
  /// groups and refuses a rank that is not a multiple of them). PEFT cannot merge groups > 1.
  Eigen::Index groups = 1;
  double alpha = 0.0;
  double scaling = 0.0;  ///< PEFT's scaling: alpha / r or alpha / sqrt(r)
  bool use_rslora = false;
  bool use_dora = false;
  double dropout = 0.0;
  std::string key_A, key_B, key_magnitude;  ///< tensor names in adapter_model.safetensors ("" = none)
  /// "base_model.model.<path>.base_layer.weight" when the adapter carries the module's full base
  /// weight (PEFT's save_embedding_layers, on by default for a targeted embed_tokens / lm_head),
  /// "" otherwise. Loading such an adapter puts it into the model, so the merge starts from it.
  std::string key_base_weight;

  /// Base tensor this module adapts.
  std::string weight_name() const { return path + ".weight"; }
  /// "Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d" (torch's class names).
  std::string kind_name() const {
    if (kind == ModuleKind::embedding) return "Embedding";
    if (kind == ModuleKind::conv) return "Conv" + std::to_string(kernel.size()) + "d";
    return "Linear";
  }
  /// Whether the base weight is stored [d_in, d_out]: an embedding always, a linear layer with
  /// fan_in_fan_out (GPT-2 Conv1D), a conv never.
  bool stored_transposed(bool fan_in_fan_out) const {
    return kind == ModuleKind::embedding || (kind == ModuleKind::linear && fan_in_fan_out);
  }
  /// The base weight's shape as a checkpoint stores it.
  std::vector<std::int64_t> base_shape(bool fan_in_fan_out) const {
    if (kind == ModuleKind::conv) {
      std::vector<std::int64_t> s{d_out, in_channels / groups};
      s.insert(s.end(), kernel.begin(), kernel.end());
      return s;
    }
    return stored_transposed(fan_in_fan_out) ? std::vector<std::int64_t>{d_in, d_out}
                                             : std::vector<std::int64_t>{d_out, d_in};
  }
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

/// A module's parameters, converted to Scalar, in the linear view of PeftModule (conv tensors
/// flattened after their first dimension, a [1, out, 1...] conv magnitude as a vector).
template <typename Scalar>
struct PeftModuleWeights {
  Matrix<Scalar> A;          ///< r x d_in
  Matrix<Scalar> B;          ///< d_out x (r / groups)
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
    w.A = reader_.reshaped<Scalar>(m.key_A, m.rank, m.d_in);
    w.B = reader_.reshaped<Scalar>(m.key_B, m.d_out, m.rank / m.groups);
    if (!m.key_magnitude.empty()) w.magnitude = reader_.reshaped<Scalar>(m.key_magnitude, m.d_out, 1).col(0);
    return w;
  }

  /// Throws unless a base weight of shape `shape` (as a checkpoint stores it) fits module m, of
  /// any kind; fan_in_fan_out is the config's (it applies to Linear modules only).
  /// `base_file`/`base_tensor` name it in the message.
  void check_base_tensor(const PeftModule& m, const std::vector<std::int64_t>& shape, bool fan_in_fan_out,
                         const std::string& base_file, const std::string& base_tensor) const {
    if (m.kind == ModuleKind::linear && shape.size() == 2) {
      check_base_shape(m, shape[0], shape[1], m.stored_transposed(fan_in_fan_out), base_file, base_tensor);
      return;
    }
    const std::vector<std::int64_t> want = m.base_shape(fan_in_fan_out);
    if (shape == want) return;
    std::string layout;
    if (m.kind == ModuleKind::embedding)
      layout = " ([num_embeddings, embedding_dim])";
    else if (m.kind == ModuleKind::conv)
      layout = " ([out_channels, in_channels / groups, kernel...], groups " + std::to_string(m.groups) + ")";
    else
      layout = m.stored_transposed(fan_in_fan_out) ? " (fan_in_fan_out: [d_in, d_out])" : " ([d_out, d_in])";
    detail::peft_fail_tensor(base_file, base_tensor,
                             "base weight has shape " + detail::shape_string(shape) + " but the adapter " +
                                 weights_file_ + " needs " + detail::shape_string(want) + layout + " for " +
                                 m.kind_name() + " module '" + m.path + "' (A '" + m.key_A + "' is " +
                                 detail::shape_string(reader_.info(m.key_A).shape) + ", B '" + m.key_B + "' is " +
                                 detail::shape_string(reader_.info(m.key_B).shape) + ")");
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
  template <typename Scalar, typename Storage>
  LoraLinear<Scalar, Storage> make_lora(const std::string& path, const BaseLayer<Scalar, Storage>& base) const {
    const PeftModule& m = module(path);
    require_linear(m, "make_lora");
    if (m.use_dora) detail::peft_fail(weights_file_, "module '" + path + "' is DoRA: use make_dora()");
    check_base_shape(m, base.d_out(), base.d_in(), false, "<base layer>", m.weight_name());
    const PeftModuleWeights<Scalar> w = weights<Scalar>(m);
    LoraLinear<Scalar, Storage> layer(base, m.adapter_config(), w.A, w.B);
    layer.eval();
    return layer;
  }

  /// DoRA layer on `base` with the module's A, B and the stored magnitude (not recomputed).
  template <typename Scalar, typename Storage>
  DoraLinear<Scalar, Storage> make_dora(const std::string& path, const BaseLayer<Scalar, Storage>& base) const {
    const PeftModule& m = module(path);
    require_linear(m, "make_dora");
    if (!m.use_dora) detail::peft_fail(weights_file_, "module '" + path + "' is LoRA (no magnitude): use make_lora()");
    check_base_shape(m, base.d_out(), base.d_in(), false, "<base layer>", m.weight_name());
    const PeftModuleWeights<Scalar> w = weights<Scalar>(m);
    DoraLinear<Scalar, Storage> layer(base, m.adapter_config(), w.A, w.B);
    layer.set_magnitude(w.magnitude);
    layer.eval();
    return layer;
  }

  /// LoRA layer on an embedding table (num_embeddings x embedding_dim, the shape the module's
  /// lora_embedding_A [r, num_embeddings] and lora_embedding_B [embedding_dim, r] need), with the
  /// module's A and B. Throws PeftError if the module is not an Embedding one, is DoRA, or the
  /// table's shape does not fit (naming the module and both shapes).
  template <typename Scalar, typename Storage>
  LoraEmbedding<Scalar, Storage> make_lora_embedding(const std::string& path,
                                                     const EmbeddingBase<Scalar, Storage>& base) const {
    const PeftModule& m = module(path);
    require_kind(m, ModuleKind::embedding, "make_lora_embedding", false);
    check_base_tensor(m, {base.num_embeddings(), base.embedding_dim()}, false, "<base embedding>", m.weight_name());
    const PeftModuleWeights<Scalar> w = weights<Scalar>(m);
    LoraEmbedding<Scalar, Storage> layer(base, m.adapter_config(), w.A, w.B);
    layer.eval();
    return layer;
  }

  /// DoRA layer on an embedding table with the module's A, B and the stored magnitude (one per
  /// embedding dimension, not recomputed).
  template <typename Scalar, typename Storage>
  DoraEmbedding<Scalar, Storage> make_dora_embedding(const std::string& path,
                                                     const EmbeddingBase<Scalar, Storage>& base) const {
    const PeftModule& m = module(path);
    require_kind(m, ModuleKind::embedding, "make_dora_embedding", true);
    check_base_tensor(m, {base.num_embeddings(), base.embedding_dim()}, false, "<base embedding>", m.weight_name());
    const PeftModuleWeights<Scalar> w = weights<Scalar>(m);
    DoraEmbedding<Scalar, Storage> layer(base, m.adapter_config(), w.A, w.B);
    layer.set_magnitude(w.magnitude);
    layer.eval();
    return layer;
  }

  /// LoRA layer on a convolution whose weight [out, in / groups, k...] (base.geometry: dims,
  /// channels, groups, kernel) is the one the module's lora_A [r, in, k...] and lora_B
  /// [out, r / groups, 1...] need, with the module's A and B flattened (r x in k..., out x r/groups).
  /// Stride, padding and dilation are the base's. Throws PeftError if the module is not a Conv one,
  /// is DoRA, or the base's shape or groups do not fit (naming the module and both). A grouped
  /// layer trains and evaluates but cannot be merged (as in PEFT).
  template <typename Scalar, typename Storage>
  LoraConv<Scalar, Storage> make_lora_conv(const std::string& path, const ConvBase<Scalar, Storage>& base) const {
    const PeftModule& m = module(path);
    require_kind(m, ModuleKind::conv, "make_lora_conv", false);
    check_conv_base(m, base.geometry);
    const PeftModuleWeights<Scalar> w = weights<Scalar>(m);
    LoraConv<Scalar, Storage> layer(base, m.adapter_config(), w.A, w.B);
    layer.eval();
    return layer;
  }

  /// DoRA layer on a convolution with the module's A, B and the stored magnitude (one per output
  /// channel; PEFT's [1, out, 1...] or [out]), not recomputed. Refuses what make_lora_conv refuses.
  template <typename Scalar, typename Storage>
  DoraConv<Scalar, Storage> make_dora_conv(const std::string& path, const ConvBase<Scalar, Storage>& base) const {
    const PeftModule& m = module(path);
    require_kind(m, ModuleKind::conv, "make_dora_conv", true);
    check_conv_base(m, base.geometry);
    const PeftModuleWeights<Scalar> w = weights<Scalar>(m);
    DoraConv<Scalar, Storage> layer(base, m.adapter_config(), w.A, w.B);
    layer.set_magnitude(w.magnitude);
    layer.eval();
    return layer;
  }

 private:
  static std::string a_or_an(const std::string& noun) { return (noun[0] == 'E' ? "an " : "a ") + noun; }

  static const char* builder_for(ModuleKind kind, bool dora) {
    if (kind == ModuleKind::embedding) return dora ? "make_dora_embedding" : "make_lora_embedding";
    if (kind == ModuleKind::conv) return dora ? "make_dora_conv" : "make_lora_conv";
    return dora ? "make_dora" : "make_lora";
  }

  void require_linear(const PeftModule& m, const char* fn) const {
    if (m.kind != ModuleKind::linear)
      detail::peft_fail(weights_file_, "module '" + m.path + "' is " + a_or_an(m.kind_name()) +
                                           " adapter, not a Linear one: " + fn + "() builds linear layers only (use " +
                                           builder_for(m.kind, m.use_dora) + "())");
  }

  // Throws unless module m is of `kind` and is DoRA exactly when `dora`, naming the builder to use.
  void require_kind(const PeftModule& m, ModuleKind kind, const char* fn, bool dora) const {
    const char* what = kind == ModuleKind::embedding ? "Embedding" : "Conv";
    if (m.kind != kind)
      detail::peft_fail(weights_file_, "module '" + m.path + "' is " + a_or_an(m.kind_name()) + " adapter, not " +
                                           a_or_an(what) + " one: " + fn + "() builds " + what + " layers only (use " +
                                           builder_for(m.kind, m.use_dora) + "())");
    if (m.use_dora != dora)
      detail::peft_fail(weights_file_, "module '" + m.path + "' is " + (m.use_dora ? "DoRA" : "LoRA (no magnitude)") +
                                           ": use " + builder_for(m.kind, m.use_dora) + "()");
  }

  // A conv module fits a base of geometry g: the module's groups (r / lora_B.shape[1]), and
  // [out, in / groups, k...] equal to the module's.
  void check_conv_base(const PeftModule& m, const ConvGeometry& g) const {
    if (m.groups != g.groups)
      detail::peft_fail(weights_file_,
                        "module '" + m.path + "' is " + a_or_an(m.kind_name()) + " adapter with groups " +
                            std::to_string(m.groups) + " (r " + std::to_string(m.rank) +
                            " / lora_B.shape[1]) but the base convolution has groups " + std::to_string(g.groups));
    std::vector<std::int64_t> shape{g.out_channels, g.in_channels / g.groups};
    shape.insert(shape.end(), g.kernel.begin(), g.kernel.begin() + g.dims);
    check_base_tensor(m, shape, false, "<base convolution>", m.weight_name());
  }

  static PeftConfig load_config(const std::string& dir) {
    if (!detail::is_directory(dir)) detail::peft_fail(dir, "adapter directory does not exist or is not a directory");
    const std::string cfg = detail::join_path(dir, "adapter_config.json");
    if (!detail::path_exists(cfg)) {
      // PEFT's save_pretrained writes adapters other than "default" to sub-folders named after them.
      const std::vector<std::string> subs = detail::subdirectories_with(dir, "adapter_config.json");
      std::string hint;
      if (!subs.empty()) {
        hint = "; " + dir + " holds adapters in sub-folders (PEFT's layout for adapters not named \"default\"):";
        for (const std::string& n : subs) hint += " " + n;
        hint += ". Pass " + detail::join_path(dir, subs.front()) + " (and the others) instead";
      }
      detail::peft_fail(cfg, "missing (an adapter directory needs adapter_config.json)" + hint);
    }
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
    // The adapter's tensors by module path and role. PEFT 0.21's names, after "base_model.model.":
    //   <path>.lora_A.weight, <path>.lora_B.weight          nn.Linear and nn.Conv1d/2d/3d
    //   <path>.lora_embedding_A, <path>.lora_embedding_B    nn.Embedding (nn.ParameterDict: no ".weight")
    //   <path>.lora_magnitude_vector (also ".weight")       DoRA
    //   <path>.base_layer.weight                            the base weight itself, saved by
    //                                                       save_embedding_layers for a targeted
    //                                                       embed_tokens / lm_head
    struct Keys {
      std::string A, B, m, base;
      bool embedding_A = false, embedding_B = false;
    };
    std::map<std::string, Keys> found;
    const std::string& f = weights_file_;
    for (const TensorInfo& t : reader_.tensors()) {
      const std::string& n = t.name;
      if (!detail::starts_with(n, kPrefix))
        detail::peft_fail_tensor(f, n, "unexpected tensor: PEFT LoRA keys start with 'base_model.model.'");
      const std::string rest = n.substr(std::string(kPrefix).size());
      const auto take = [&](const char* suffix, std::string Keys::*slot, bool embedding) {
        if (!detail::ends_with(rest, suffix)) return false;
        const std::string path = rest.substr(0, rest.size() - std::strlen(suffix));
        if (path.empty()) detail::peft_fail_tensor(f, n, "empty module path");
        Keys& k = found[path];
        std::string& s = k.*slot;
        if (!s.empty())
          detail::peft_fail_tensor(f, n, "module '" + path + "' already has a tensor in this role: '" + s + "'");
        s = n;
        if (slot == &Keys::A) k.embedding_A = embedding;
        if (slot == &Keys::B) k.embedding_B = embedding;
        return true;
      };
      if (take(".lora_A.weight", &Keys::A, false) || take(".lora_B.weight", &Keys::B, false) ||
          take(".lora_embedding_A", &Keys::A, true) || take(".lora_embedding_B", &Keys::B, true) ||
          take(".lora_magnitude_vector.weight", &Keys::m, false) || take(".lora_magnitude_vector", &Keys::m, false) ||
          take(".base_layer.weight", &Keys::base, false))
        continue;
      if (detail::ends_with(rest, ".lora_B.bias"))
        detail::peft_fail_tensor(f, n, "lora_bias (a bias on lora_B) is not supported");
      if (detail::ends_with(rest, ".base_layer.bias"))
        detail::peft_fail_tensor(f, n,
                                 "a saved base bias (save_embedding_layers on a layer with a bias) is not supported");
      if (detail::ends_with(rest, ".weight") || detail::ends_with(rest, ".bias"))
        detail::peft_fail_tensor(f, n,
                                 "a full copy of a base model tensor: PEFT saves these for modules_to_save, or with "
                                 "save_embedding_layers for an embedding that was resized but not adapted; merging "
                                 "them is not supported");
      detail::peft_fail_tensor(f, n,
                               "not a LoRA/DoRA tensor (lora_A.weight, lora_B.weight, lora_embedding_A, "
                               "lora_embedding_B, lora_magnitude_vector, base_layer.weight); other PEFT methods are "
                               "not supported");
    }
    if (found.empty()) detail::peft_fail(f, "holds no LoRA tensors");
    for (const auto& kv : found) {
      const std::string& path = kv.first;
      const Keys& k = kv.second;
      if (k.A.empty() && k.B.empty() && k.m.empty())
        detail::peft_fail_tensor(f, k.base,
                                 "a saved base weight of module '" + path +
                                     "', which has no LoRA tensors: PEFT saves base_layer.weight only for adapted "
                                     "modules");
      const bool emb = k.embedding_A || k.embedding_B;
      const std::string expect_A = kPrefix + path + (emb ? ".lora_embedding_A" : ".lora_A.weight");
      const std::string expect_B = kPrefix + path + (emb ? ".lora_embedding_B" : ".lora_B.weight");
      if (k.A.empty())
        detail::peft_fail_tensor(f, expect_A, "missing: module '" + path + "' has other adapter tensors but no lora_A");
      if (k.B.empty())
        detail::peft_fail_tensor(f, expect_B, "missing: module '" + path + "' has other adapter tensors but no lora_B");
      if (k.embedding_A != k.embedding_B)
        detail::peft_fail_tensor(
            f, k.B, "module '" + path + "' mixes an Embedding adapter tensor and a Linear/Conv one ('" + k.A + "')");
      for (const std::string* key : {&k.A, &k.B, &k.m, &k.base}) {
        if (key->empty()) continue;
        const Dtype dt = reader_.info(*key).dtype;
        if (!dtype_is_convertible(dt))
          detail::peft_fail_tensor(f, *key,
                                   std::string("has dtype ") + dtype_name(dt) + ": adapter tensors of module '" + path +
                                       "' must be F16, BF16, F32 or F64");
      }
      const TensorInfo& a = reader_.info(k.A);
      const TensorInfo& b = reader_.info(k.B);
      const auto shapes = [&]() {
        return " (A '" + k.A + "' " + detail::shape_string(a.shape) + ", B '" + k.B + "' " +
               detail::shape_string(b.shape) + ")";
      };
      for (const TensorInfo* t : {&a, &b})
        for (const std::int64_t d : t->shape)
          if (d < 1) detail::peft_fail_tensor(f, k.A, "empty adapter matrices" + shapes());
      PeftModule m;
      m.path = path;
      m.rank = static_cast<Eigen::Index>(a.shape.empty() ? 0 : a.shape[0]);
      Eigen::Index rank_B = m.rank;  // lora_B's second dimension: r, or r / groups for a grouped conv
      if (emb) {
        m.kind = ModuleKind::embedding;
        if (a.shape.size() != 2 || b.shape.size() != 2)
          detail::peft_fail_tensor(f, a.shape.size() != 2 ? k.A : k.B,
                                   "an Embedding adapter needs lora_embedding_A [r, num_embeddings] and "
                                   "lora_embedding_B [embedding_dim, r]" +
                                       shapes());
        m.d_in = static_cast<Eigen::Index>(a.shape[1]);
        m.d_out = static_cast<Eigen::Index>(b.shape[0]);
        rank_B = static_cast<Eigen::Index>(b.shape[1]);
      } else if (a.shape.size() == 2) {
        m.kind = ModuleKind::linear;
        if (b.shape.size() != 2)
          detail::peft_fail_tensor(f, k.B,
                                   "lora_A is [r, d_in] (a Linear adapter) but lora_B is not [d_out, r]" + shapes());
        m.d_in = static_cast<Eigen::Index>(a.shape[1]);
        m.d_out = static_cast<Eigen::Index>(b.shape[0]);
        rank_B = static_cast<Eigen::Index>(b.shape[1]);
      } else if (a.shape.size() >= 3 && a.shape.size() <= 5) {
        // ConvNd: A [r, in, k...] (a conv with the base's kernel, groups 1), B [out, r / groups, 1...]
        // (a 1x1 conv with the base's groups).
        m.kind = ModuleKind::conv;
        if (b.shape.size() != a.shape.size())
          detail::peft_fail_tensor(f, k.B,
                                   "lora_A is a Conv" + std::to_string(a.shape.size() - 2) +
                                       "d kernel [r, in, k...] but lora_B does not have its rank [out, r / groups, "
                                       "1...]" +
                                       shapes());
        for (std::size_t i = 2; i < b.shape.size(); ++i)
          if (b.shape[i] != 1)
            detail::peft_fail_tensor(f, k.B,
                                     "lora_B of a Conv adapter is a 1x1 kernel [out, r / groups, 1...]" + shapes());
        m.in_channels = static_cast<Eigen::Index>(a.shape[1]);
        m.kernel.assign(a.shape.begin() + 2, a.shape.end());
        // The element count of A (validated by the reader, without overflow) bounds in * prod(k).
        m.d_in = static_cast<Eigen::Index>(a.numel() / a.shape[0]);
        m.d_out = static_cast<Eigen::Index>(b.shape[0]);
        rank_B = static_cast<Eigen::Index>(b.shape[1]);
        if (m.rank % rank_B != 0)
          detail::peft_fail_tensor(f, k.B,
                                   "rank " + std::to_string(rank_B) + " of lora_B does not divide lora_A's rank " +
                                       std::to_string(m.rank) + " (PEFT's lora_B has r / groups input channels)" +
                                       shapes());
        m.groups = m.rank / rank_B;
        if (m.in_channels % m.groups != 0 || m.d_out % m.groups != 0)
          detail::peft_fail_tensor(f, k.B,
                                   "groups = " + std::to_string(m.groups) +
                                       " (r / lora_B.shape[1]) does not divide in = " + std::to_string(m.in_channels) +
                                       " and out = " + std::to_string(m.d_out) + shapes());
      } else {
        detail::peft_fail_tensor(f, k.A,
                                 "has shape " + detail::shape_string(a.shape) +
                                     ": lora_A must be [r, d_in] (Linear) or [r, in, k...] (Conv1d/2d/3d)");
      }
      if (m.kind != ModuleKind::conv && rank_B != m.rank)
        detail::peft_fail_tensor(f, k.B,
                                 "rank " + std::to_string(rank_B) + " (shape " + detail::shape_string(b.shape) +
                                     ") disagrees with lora_A '" + k.A + "' rank " + std::to_string(m.rank) +
                                     " (shape " + detail::shape_string(a.shape) + ")");
      const Eigen::Index cfg_rank = config_.rank_for(path);
      if (m.rank != cfg_rank)
        detail::peft_fail_tensor(f, k.A,
                                 "rank " + std::to_string(m.rank) + " disagrees with " + config_.file +
                                     ": r = " + std::to_string(cfg_rank) + " for module '" + path + "' (r " +
                                     std::to_string(config_.r) +
                                     (config_.rank_pattern.empty() ? std::string() : ", after rank_pattern") + ")");
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
        // [d_out]; a conv's is also accepted as PEFT 0.21 keeps and saves it, [1, out, 1...]
        // (_DoraConvNdLayer's norm is taken with keepdim and transposed).
        const TensorInfo& mi = reader_.info(k.m);
        std::vector<std::int64_t> conv_shape(a.shape.size(), 1);
        if (m.kind == ModuleKind::conv) conv_shape[1] = m.d_out;
        const bool ok =
            (mi.shape.size() == 1 && mi.shape[0] == m.d_out) || (m.kind == ModuleKind::conv && mi.shape == conv_shape);
        if (!ok)
          detail::peft_fail_tensor(f, k.m,
                                   "has shape " + detail::shape_string(mi.shape) + " but " + m.kind_name() +
                                       " module '" + path + "' needs [" + std::to_string(m.d_out) + "]" +
                                       (m.kind == ModuleKind::conv ? " or " + detail::shape_string(conv_shape) : "") +
                                       " (lora_B '" + k.B + "' has " + std::to_string(m.d_out) + " outputs)");
        m.key_magnitude = k.m;
      } else if (!k.m.empty()) {
        detail::peft_fail_tensor(f, k.m, "DoRA magnitude present but " + config_.file + " has use_dora = false");
      }
      if (!k.base.empty()) {
        const std::vector<std::int64_t>& bs = reader_.info(k.base).shape;
        if (bs != m.base_shape(config_.fan_in_fan_out))
          detail::peft_fail_tensor(f, k.base,
                                   "saved base weight has shape " + detail::shape_string(bs) + " but " + m.kind_name() +
                                       " module '" + path + "' needs " +
                                       detail::shape_string(m.base_shape(config_.fan_in_fan_out)) + shapes());
        m.key_base_weight = k.base;
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

/// Lists the modules of an adapter: path, shape, rank, alpha, scaling, DoRA or LoRA, dtype, and the
/// module's type (Linear, Embedding, Conv1d/2d/3d). The shape is [d_out, d_in] for a Linear module
/// and the base weight's for the others ([num_embeddings, dim], [out, in / groups, k...]).
inline void inspect_adapter(const PeftAdapter& adapter, std::ostream& out) {
  const PeftConfig& c = adapter.config();
  out << "adapter " << adapter.dir() << ": " << adapter.modules().size() << " modules, "
      << (c.use_dora ? "DoRA" : "LoRA") << ", r = " << c.r << ", lora_alpha = " << c.lora_alpha
      << (c.use_rslora ? ", rsLoRA (scaling alpha / sqrt(r))" : ", scaling alpha / r")
      << (c.fan_in_fan_out ? ", fan_in_fan_out (base weights stored [d_in, d_out])" : "") << "\n";
  for (const auto& kv : c.rank_pattern) out << "  rank_pattern  " << kv.first << " -> " << kv.second << "\n";
  for (const auto& kv : c.alpha_pattern) out << "  alpha_pattern " << kv.first << " -> " << kv.second << "\n";
  for (const PeftModule& m : adapter.modules()) {
    const std::vector<std::int64_t> shape =
        m.kind == ModuleKind::linear ? std::vector<std::int64_t>{m.d_out, m.d_in} : m.base_shape(false);
    out << "  " << m.path << "  " << detail::shape_string(shape) << "  rank " << m.rank << "  alpha " << m.alpha
        << "  scaling " << detail::format_double(m.scaling) << "  " << (m.use_dora ? "DoRA" : "LoRA") << "  "
        << dtype_name(adapter.tensors().info(m.key_A).dtype) << "  " << m.kind_name();
    if (m.kind == ModuleKind::conv && m.groups > 1) out << " (groups " << m.groups << ": not mergeable, as in PEFT)";
    if (!m.key_base_weight.empty())
      out << "  (carries its base weight, " << dtype_name(adapter.tensors().info(m.key_base_weight).dtype) << ")";
    out << "\n";
  }
}

}  // namespace dora::io
