// Writing layers trained in C++ as a HuggingFace PEFT adapter directory (adapter_config.json +
// adapter_model.safetensors) that `PeftModel.from_pretrained` loads.
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
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

  /// `path` is the module's name in the base model (its weight is `<path>.weight`). The adapter
  /// does not depend on how W is stored (float, bf16, f16, Q8_0, Q4_0).
  template <typename Scalar, typename Storage>
  void add(const std::string& path, const LoraLinear<Scalar, Storage>& layer) {
    add_entry(path, layer.config(), false, layer.lora_A().template cast<double>(),
              layer.lora_B().template cast<double>(), Eigen::VectorXd());
  }
  template <typename Scalar, typename Storage>
  void add(const std::string& path, const DoraLinear<Scalar, Storage>& layer) {
    add_entry(path, layer.config(), true, layer.lora_A().template cast<double>(),
              layer.lora_B().template cast<double>(), layer.magnitude().template cast<double>());
  }

  /// An nn.Embedding module: the layer's A (r x num_embeddings), B (embedding_dim x r) and, for
  /// DoRA, its magnitude (embedding_dim), through add_embedding(). padding_idx is a property of
  /// the base nn.Embedding, not of the adapter, so it is not written.
  template <typename Scalar, typename Storage>
  void add(const std::string& path, const LoraEmbedding<Scalar, Storage>& layer) {
    add_embedding(path, layer.config(), layer.lora_A().template cast<double>(), layer.lora_B().template cast<double>());
  }
  template <typename Scalar, typename Storage>
  void add(const std::string& path, const DoraEmbedding<Scalar, Storage>& layer) {
    add_embedding(path, layer.config(), layer.lora_A().template cast<double>(), layer.lora_B().template cast<double>(),
                  layer.magnitude().template cast<double>());
  }
  /// An nn.Conv1d/2d/3d module (geometry().dims): the layer's flattened A (r x in k...), B
  /// (out x r / groups), DoRA's magnitude (out), its groups and its kernel (the first dims entries of
  /// geometry().kernel), through add_conv(). Stride, padding and dilation belong to the base
  /// nn.ConvNd; PEFT 0.21's lora_A takes the base's stride and padding but not its dilation, so
  /// an adapter of a dilated convolution loads there but its forward fails (huggingface/peft#3697).
  template <typename Scalar, typename Storage>
  void add(const std::string& path, const LoraConv<Scalar, Storage>& layer) {
    add_conv(path, layer.config(), layer.geometry().in_channels, conv_kernel(layer.geometry()),
             layer.lora_A().template cast<double>(), layer.lora_B().template cast<double>(), Eigen::VectorXd(),
             layer.geometry().groups);
  }
  template <typename Scalar, typename Storage>
  void add(const std::string& path, const DoraConv<Scalar, Storage>& layer) {
    add_conv(path, layer.config(), layer.geometry().in_channels, conv_kernel(layer.geometry()),
             layer.lora_A().template cast<double>(), layer.lora_B().template cast<double>(),
             layer.magnitude().template cast<double>(), layer.geometry().groups);
  }

  /// An nn.Embedding module from its matrices: A = lora_embedding_A (rank x num_embeddings),
  /// B = lora_embedding_B (embedding_dim x rank), magnitude (embedding_dim) for DoRA or empty for
  /// LoRA. Written under PEFT's names (lora_embedding_A / _B, no ".weight"). The building block of
  /// the overloads for embedding layer classes.
  void add_embedding(const std::string& path, const AdapterConfig& config, Matrix<double> A, Matrix<double> B,
                     Eigen::VectorXd magnitude = Eigen::VectorXd()) {
    const bool dora = magnitude.size() != 0;
    check_matrices(path, config, A, B, magnitude, 1);
    add_entry(path, config, dora, std::move(A), std::move(B), std::move(magnitude), ModuleKind::embedding);
  }

  /// An nn.Conv1d/2d/3d module (kernel.size() = 1, 2, 3) from its matrices flattened after their
  /// first dimension: A = lora_A (rank x in_channels * prod(kernel)), B = lora_B (out_channels x
  /// rank / groups), magnitude (out_channels) for DoRA or empty for LoRA. Written with PEFT's
  /// shapes: lora_A.weight [r, in, k...], lora_B.weight [out, r / groups, 1...], and the magnitude
  /// [1, out, 1...] as PEFT 0.21 saves it.
  void add_conv(const std::string& path, const AdapterConfig& config, Eigen::Index in_channels,
                const std::vector<std::int64_t>& kernel, Matrix<double> A, Matrix<double> B,
                Eigen::VectorXd magnitude = Eigen::VectorXd(), Eigen::Index groups = 1) {
    const std::string who = "<adapter writer>";
    if (kernel.empty() || kernel.size() > 3)
      detail::peft_fail(
          who, "module '" + path + "': a conv kernel has 1, 2 or 3 sizes, got " + detail::shape_string(kernel));
    std::int64_t k = 1;
    for (const std::int64_t d : kernel) {
      if (d < 1)
        detail::peft_fail(who, "module '" + path + "': kernel " + detail::shape_string(kernel) + " has a size < 1");
      k *= d;
    }
    if (in_channels < 1 || groups < 1 || in_channels % groups != 0 || B.rows() % groups != 0 ||
        config.rank % groups != 0)
      detail::peft_fail(who, "module '" + path + "': groups " + std::to_string(groups) + " must divide in_channels " +
                                 std::to_string(in_channels) + ", out_channels " + std::to_string(B.rows()) +
                                 " and the rank " + std::to_string(config.rank));
    if (A.cols() != in_channels * k)
      detail::peft_fail(who, "module '" + path + "': lora_A is " + std::to_string(A.rows()) + " x " +
                                 std::to_string(A.cols()) + " but in_channels " + std::to_string(in_channels) +
                                 " x kernel " + detail::shape_string(kernel) + " needs " +
                                 std::to_string(in_channels * k) + " columns");
    const bool dora = magnitude.size() != 0;
    check_matrices(path, config, A, B, magnitude, groups);
    add_entry(path, config, dora, std::move(A), std::move(B), std::move(magnitude), ModuleKind::conv, in_channels,
              kernel, groups);
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
    // Each tensor: its name, PEFT's shape for it, and the row-major values (the matrices hold the
    // tensors flattened after their first dimension, so only the declared shape differs by kind).
    struct Out {
      std::string name;
      std::vector<std::int64_t> shape;
      const double* data;
      Eigen::Index size;
    };
    std::vector<Out> outs;
    for (const Entry& e : entries_) {
      const std::string p = std::string(PeftAdapter::kPrefix) + e.path;
      const bool emb = e.kind == ModuleKind::embedding, conv = e.kind == ModuleKind::conv;
      std::vector<std::int64_t> sa{e.A.rows(), e.A.cols()}, sb{e.B.rows(), e.B.cols()}, sm{e.m.size()};
      if (conv) {
        sa = {e.A.rows(), e.in_channels};
        sa.insert(sa.end(), e.kernel.begin(), e.kernel.end());
        sb.resize(2 + e.kernel.size(), 1);
        sm.assign(2 + e.kernel.size(), 1);
        sm[1] = e.m.size();
      }
      outs.push_back(Out{p + (emb ? ".lora_embedding_A" : ".lora_A.weight"), sa, e.A.data(), e.A.size()});
      outs.push_back(Out{p + (emb ? ".lora_embedding_B" : ".lora_B.weight"), sb, e.B.data(), e.B.size()});
      if (e.dora) outs.push_back(Out{p + ".lora_magnitude_vector", sm, e.m.data(), e.m.size()});
    }
    // Python's order: dtype size (all equal), then name, so the file matches save_pretrained's layout.
    std::sort(outs.begin(), outs.end(), [](const Out& a, const Out& b) { return a.name < b.name; });
    SafetensorsStreamWriter w(detail::join_path(dir, "adapter_model.safetensors"));
    w.set_metadata({{"format", "pt"}});
    for (const Out& o : outs) w.declare(o.name, dtype_, o.shape);
    w.begin();
    std::vector<std::uint8_t> bytes;
    for (const Out& o : outs) {
      // Encoded here rather than by write(name, matrix), which takes rank 0 to 2 only.
      detail::require_encodable(w.path(), o.name, dtype_);
      bytes.clear();
      detail::encode_rows(Eigen::Map<const Eigen::VectorXd>(o.data, o.size), dtype_,
                          [&bytes](const std::uint8_t* p, std::size_t n) { bytes.insert(bytes.end(), p, p + n); });
      w.write(o.name, bytes.data(), bytes.size());
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
    ModuleKind kind = ModuleKind::linear;
    Eigen::Index in_channels = 0;      // conv
    std::vector<std::int64_t> kernel;  // conv
    Eigen::Index groups = 1;           // conv
  };

  static std::vector<std::int64_t> conv_kernel(const ConvGeometry& g) {
    return std::vector<std::int64_t>(g.kernel.begin(), g.kernel.begin() + g.dims);
  }

  // A is rank x d_in, B d_out x rank / groups, m empty or d_out, rank the config's.
  static void check_matrices(const std::string& path, const AdapterConfig& config, const Matrix<double>& A,
                             const Matrix<double>& B, const Eigen::VectorXd& m, Eigen::Index groups) {
    const std::string who = "<adapter writer>";
    if (A.rows() != config.rank || A.cols() < 1 || B.rows() < 1 || B.cols() * groups != config.rank)
      detail::peft_fail(who, "module '" + path + "': lora_A " + std::to_string(A.rows()) + " x " +
                                 std::to_string(A.cols()) + " and lora_B " + std::to_string(B.rows()) + " x " +
                                 std::to_string(B.cols()) + " do not fit rank " + std::to_string(config.rank) +
                                 (groups > 1 ? " with groups " + std::to_string(groups) : std::string()));
    if (m.size() != 0 && m.size() != B.rows())
      detail::peft_fail(who, "module '" + path + "': magnitude has " + std::to_string(m.size()) + " entries, lora_B " +
                                 std::to_string(B.rows()) + " rows");
  }

  void add_entry(const std::string& path, const AdapterConfig& config, bool dora, Matrix<double> A, Matrix<double> B,
                 Eigen::VectorXd m, ModuleKind kind = ModuleKind::linear, Eigen::Index in_channels = 0,
                 std::vector<std::int64_t> kernel = {}, Eigen::Index groups = 1) {
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
    entries_.push_back(Entry{path, config, dora, std::move(A), std::move(B), std::move(m), kind, in_channels,
                             std::move(kernel), groups});
  }

  Dtype dtype_;
  std::string base_model_;
  std::vector<Entry> entries_;
};

}  // namespace dora::io
