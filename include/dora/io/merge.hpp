// Merging a PEFT LoRA / DoRA adapter into a safetensors checkpoint (what dora-merge does).
//
// W' = W + s B A (LoRA), W' = diag(m / n) (W + s B A) with n = row norms of W + s B A (DoRA),
// computed in double from the stored values and rounded once to the output dtype. An inactive row
// (n = 0, or m / n overflowing with finite m and n) merges to zero: the library's one rule,
// dora::inactive_row in dora/magnitude.hpp (PEFT would give inf or NaN there). n is computed as
// DoraLinear computes it where the rule depends on it: a plain sum of squares where that is finite
// and far from underflow, otherwise Eigen's scaled stableNorm of the row, so a row whose squares
// overflow or underflow is neither zeroed nor kept where the layer would do otherwise.
// fan_in_fan_out = true (GPT-2 style Conv1D) means the base weight is stored transposed,
// [d_in, d_out]; the merge reads and writes it in that layout.
//
// Dtypes: adapted base weights must be F16, BF16, F32 or F64 (anything else is refused, naming the
// tensor, its dtype and the module, before any output exists). Every other base tensor, of any
// safetensors dtype (I64 position ids, BOOL masks, U8 / F8 quantized data, ...), is copied byte for
// byte; MergeOptions::dtype (--dtype) converts the F16/BF16/F32/F64 tensors only and copies the
// others unchanged.
//
// Every failure throws PeftError (dora/io/error.hpp) whose message names the file and, where one is
// involved, the tensor or config key. Nothing is written on failure.
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "dora/detail/eigen.hpp"
#include "dora/dora.hpp"
#include "dora/io/error.hpp"
#include "dora/io/fs.hpp"
#include "dora/io/peft_reader.hpp"
#include "dora/io/safetensors.hpp"

namespace dora::io {

/// How far merge_checkpoint has got (MergeOptions::progress).
struct MergeProgress {
  std::size_t tensors_done = 0, tensors_total = 0;  ///< tensors of the base checkpoint, all shards
  std::size_t bytes_done = 0, bytes_total = 0;      ///< their bytes as stored in the base (input)
  std::string tensor;                               ///< the tensor just written ("" before the first)
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
  /// Called once before the first tensor is written (nothing done yet) and after every tensor of
  /// the output (merged, converted or copied), in the calling thread. The counts only grow, and
  /// the last call has tensors_done == tensors_total and bytes_done == bytes_total. Keep it cheap
  /// (a terminal display should throttle itself); an exception thrown from it aborts the merge,
  /// leaving no output, like any other failure.
  std::function<void(const MergeProgress&)> progress;
};

struct MergedModule {
  std::string tensor;  ///< "<path>.weight"
  std::string kind;    ///< "Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d" (PeftModule::kind_name)
  std::vector<std::int64_t> shape;
  Eigen::Index rank = 0;
  bool use_dora = false;              ///< rank and use_dora: the first adapter's module
  double max_abs_delta = 0.0;         ///< max |W' - W| (before rounding to the output dtype)
  std::vector<std::string> adapters;  ///< the adapter directories merged into it, in order
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
  dora::detail::gemm(w.B.row(j), false, w.A, false, v, m.scaling, 1.0);
  return v.stableNorm();
}

/// Whether a sum of squares can be used as it is: finite and far enough above the underflow
/// threshold that squares lost to underflow cannot matter (the layer's threshold, row_norm.hpp).
inline bool plain_sum_of_squares_ok(double sq) {
  return std::isfinite(sq) && sq >= std::numeric_limits<double>::min() / std::numeric_limits<double>::epsilon();
}

/// One adapter's module on a base tensor, for a merge of several adapters in turn.
struct StackedModule {
  const PeftModule* module;
  const PeftModuleWeights<double>* weights;
};

/// Computes the merged tensor of the adapters' modules `stack` (in order, all adapting the same base
/// weight) from the stored base weight (rows x cols in the stored layout) into `out` (encoded as
/// out_dtype), PEFT 0.21's merge_and_unload(adapter_names=[...]): R = W, then per adapter
///   LoRA: R += s B A;   DoRA: R = diag(m / ||W + s B A||) (R + s B A)
/// with each DoRA norm that of the base W plus its own delta (huggingface/peft#3609), so the merged
/// weight is the stacked layer. One adapter: the ordinary merge. Works on blocks of stored rows in
/// double so that memory stays at one output tensor plus a few MB. DoRA row norms are plain sums of
/// squares where those are safe and scaled_row_norm() elsewhere, as in DoraLinear.
inline double merge_tensor(const std::vector<StackedModule>& stack, const std::uint8_t* src, Dtype src_dtype,
                           bool transposed, std::uint8_t* out, Dtype out_dtype) {
  const PeftModule& first = *stack.front().module;
  const Eigen::Index rows = transposed ? first.d_in : first.d_out;
  const Eigen::Index cols = transposed ? first.d_out : first.d_in;
  const std::size_t ies = dtype_size(src_dtype), oes = dtype_size(out_dtype);
  const Eigen::Index block = std::max<Eigen::Index>(1, (Eigen::Index{1} << 20) / cols);  // ~8 MB of doubles
  Matrix<double> W, V, R;
  const auto load = [&](Eigen::Index i0, Eigen::Index n) {
    W.resize(n, cols);
    const std::uint8_t* p = src + static_cast<std::size_t>(i0) * static_cast<std::size_t>(cols) * ies;
    for (Eigen::Index i = 0; i < W.size(); ++i)
      W.data()[i] = load_as_double(p + static_cast<std::size_t>(i) * ies, src_dtype);
  };
  // V = W + s B A on the block's rows (stored layout).
  const auto delta = [&](const StackedModule& sm, Eigen::Index i0, Eigen::Index n) {
    const double s = sm.module->scaling;
    V = W;
    if (!transposed)
      dora::detail::gemm(sm.weights->B.middleRows(i0, n), false, sm.weights->A, false, V, s, 1.0);
    else
      dora::detail::gemm(sm.weights->A.middleCols(i0, n), true, sm.weights->B, true, V, s, 1.0);
  };
  // The DoRA scale of output feature i: the library's one rule (dora/magnitude.hpp).
  const auto scale_of = [](double mag, double n) { return magnitude_scale(mag, n); };
  Eigen::Matrix<double, 1, Eigen::Dynamic> v;  // scaled_row_norm's workspace
  const auto norm_of = [&](const StackedModule& sm, double sq, Eigen::Index j) {
    return plain_sum_of_squares_ok(sq) ? std::sqrt(sq)
                                       : scaled_row_norm(*sm.module, *sm.weights, src, src_dtype, transposed, j, v);
  };
  // Transposed storage: output features are columns; each DoRA adapter's column norms need every
  // row block first.
  std::vector<Eigen::VectorXd> g(stack.size());
  if (transposed) {
    for (std::size_t k = 0; k < stack.size(); ++k) {
      if (!stack[k].module->use_dora) continue;
      Eigen::VectorXd nsq = Eigen::VectorXd::Zero(cols);
      for (Eigen::Index i0 = 0; i0 < rows; i0 += block) {
        const Eigen::Index n = std::min(block, rows - i0);
        load(i0, n);
        delta(stack[k], i0, n);
        nsq += V.colwise().squaredNorm().transpose();
      }
      g[k].resize(cols);
      for (Eigen::Index i = 0; i < cols; ++i)
        g[k][i] = scale_of(stack[k].weights->magnitude[i], norm_of(stack[k], nsq[i], i));
    }
  }
  double max_delta = 0.0;
  for (Eigen::Index i0 = 0; i0 < rows; i0 += block) {
    const Eigen::Index n = std::min(block, rows - i0);
    load(i0, n);
    for (std::size_t k = 0; k < stack.size(); ++k) {
      const StackedModule& sm = stack[k];
      delta(sm, i0, n);
      // The first adapter starts from W: R = V (the single-adapter merge, bit for bit); a later
      // one adds its delta s B A = V - W to what is merged so far.
      if (k == 0)
        R = V;
      else
        R += V - W;
      if (!sm.module->use_dora) continue;
      if (transposed) {
        R = R * g[k].asDiagonal();
      } else {
        for (Eigen::Index i = 0; i < n; ++i)
          R.row(i) *= scale_of(sm.weights->magnitude[i0 + i], norm_of(sm, V.row(i).squaredNorm(), i0 + i));
      }
    }
    // NaN (a non-finite adapter or base) must show in the report, not vanish in std::max.
    const double d = (R - W).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>();
    if (std::isnan(d) || d > max_delta || std::isnan(max_delta)) max_delta = std::isnan(max_delta) ? max_delta : d;
    std::uint8_t* q = out + static_cast<std::size_t>(i0) * static_cast<std::size_t>(cols) * oes;
    for (Eigen::Index i = 0; i < R.size(); ++i) store(q + static_cast<std::size_t>(i) * oes, R.data()[i], out_dtype);
  }
  return max_delta;
}

/// The merge of one module (merge_tensor of a stack of one).
inline double merge_tensor(const PeftModule& m, const PeftModuleWeights<double>& w, const std::uint8_t* src,
                           Dtype src_dtype, bool transposed, std::uint8_t* out, Dtype out_dtype) {
  return merge_tensor({StackedModule{&m, &w}}, src, src_dtype, transposed, out, out_dtype);
}

/// Converts a tensor's bytes between two of F16, BF16, F32, F64 (element by element, any rank).
inline void convert_bytes(const std::uint8_t* src, Dtype from, std::size_t count, std::uint8_t* dst, Dtype to) {
  const std::size_t ies = dtype_size(from), oes = dtype_size(to);
  for (std::size_t i = 0; i < count; ++i) store(dst + i * oes, load_as_double(src + i * ies, from), to);
}

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
///
/// Several adapters (adapter_dirs in order) are merged in turn, PEFT 0.21's
/// merge_and_unload(adapter_names=[...]) of the adapters loaded into one model: each base tensor gets
/// the adapters that adapt it, in the given order (merge_tensor above: each DoRA norm from the base
/// W). PEFT saves an adapter other than "default" in a sub-folder named after it
/// (save_pretrained(dir) writes dir/ and dir/<name>/): pass dir/<name>. A directory without
/// adapter_config.json that has such sub-folders is refused with their names (PeftAdapter).
inline MergeReport merge_checkpoint(const std::string& base, const std::vector<std::string>& adapter_dirs,
                                    const std::string& out, const MergeOptions& options = {}) {
  if (options.dtype && !dtype_is_convertible(*options.dtype))
    detail::peft_fail(out,
                      std::string("output dtype ") + dtype_name(*options.dtype) +
                          " is not one of F16, BF16, F32, F64 (MergeOptions::dtype converts floating tensors only)");
  if (adapter_dirs.empty()) detail::peft_fail(out, "no adapter to merge");
  std::vector<std::unique_ptr<PeftAdapter>> adapters;
  adapters.reserve(adapter_dirs.size());
  for (const std::string& dir : adapter_dirs) adapters.push_back(std::make_unique<PeftAdapter>(dir));
  detail::BaseCheckpoint ckpt(base);

  // Validate every module against the base before anything is written.
  struct Entry {
    const PeftAdapter* adapter;
    const PeftModule* module;
  };
  std::map<std::string, std::vector<Entry>> module_of;  // base tensor name -> its modules, in merge order
  for (const std::unique_ptr<PeftAdapter>& ap : adapters) {
    const PeftAdapter& adapter = *ap;
    const bool fan_in_fan_out = adapter.config().fan_in_fan_out;
    for (const PeftModule& m : adapter.modules()) {
      const std::string wname = m.weight_name();
      const auto it = ckpt.tensors.find(wname);
      if (it == ckpt.tensors.end())
        detail::peft_fail_tensor(ckpt.sharded ? ckpt.index_file : base, wname,
                                 "not found: adapter " + adapter.weights_file() + " adapts module '" + m.path +
                                     "' (tensor '" + m.key_A + "') but the base checkpoint has no such weight");
      const TensorInfo& t = *it->second.info;
      const std::string& file = ckpt.tensor_file.at(wname);
      // PEFT 0.21 raises NotImplementedError("Merging is not supported for _ConvNd layers with
      // groups > 1!"): its low-rank path is dense over all input channels, which no grouped kernel of
      // the base's shape reproduces, so there is no merged weight to compute.
      if (m.kind == ModuleKind::conv && m.groups > 1)
        detail::peft_fail_tensor(
            adapter.weights_file(), m.key_B,
            m.kind_name() + " module '" + m.path + "' has groups = " + std::to_string(m.groups) + " (lora_B " +
                detail::shape_string(adapter.tensors().info(m.key_B).shape) + ", rank " + std::to_string(m.rank) +
                "): a grouped convolution cannot be merged (PEFT 0.21 refuses too: its LoRA branch "
                "mixes all input channels, which no grouped kernel can hold)");
      adapter.check_base_tensor(m, t.shape, fan_in_fan_out, file, wname);
      if (!dtype_is_convertible(t.dtype))
        detail::peft_fail_tensor(file, wname,
                                 std::string("has dtype ") + dtype_name(t.dtype) + " but module '" + m.path + "' of " +
                                     adapter.weights_file() +
                                     " adapts it: only F16, BF16, F32 and F64 weights can be merged (quantized or "
                                     "integer weights are not dequantized here)");
      std::vector<Entry>& stack = module_of[wname];
      if (!stack.empty()) {
        const Entry& prev = stack.front();
        if (prev.module->stored_transposed(prev.adapter->config().fan_in_fan_out) !=
            m.stored_transposed(fan_in_fan_out))
          detail::peft_fail_tensor(adapter.weights_file(), m.key_A,
                                   "module '" + m.path + "' reads " + wname +
                                       " with fan_in_fan_out = " + (fan_in_fan_out ? "true" : "false") +
                                       " but adapter " + prev.adapter->dir() + " reads it the other way round");
      }
      if (!m.key_base_weight.empty() || (!stack.empty() && !stack.front().module->key_base_weight.empty()))
        if (!stack.empty())
          detail::peft_fail_tensor(
              adapter.weights_file(), m.key_A,
              "module '" + m.path +
                  "': an adapter that carries the base weight (save_embedding_"
                  "layers) cannot be merged together with other adapters of the same module (whose base "
                  "weight would PEFT use?); merge it alone");
      stack.push_back({&adapter, &m});
    }
  }

  MergeReport report;
  MergeProgress progress;
  for (const SafetensorsReader& r : ckpt.readers) {
    progress.tensors_total += r.tensors().size();
    for (const TensorInfo& t : r.tensors()) progress.bytes_total += t.nbytes();
  }
  if (options.progress) options.progress(progress);
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
        const std::vector<Entry>& entries = mod->second;
        const PeftModule& m = *entries.front().module;
        const PeftAdapter& adapter = *entries.front().adapter;
        std::vector<PeftModuleWeights<double>> wts;
        wts.reserve(entries.size());
        std::vector<detail::StackedModule> stack;
        for (const Entry& e : entries) {
          wts.push_back(e.adapter->weights<double>(*e.module));
          stack.push_back({e.module, &wts.back()});
        }
        buf.assign(count * dtype_size(od), 0);
        MergedModule mm;
        mm.tensor = t.name;
        mm.kind = m.kind_name();
        mm.shape = t.shape;
        mm.rank = m.rank;
        mm.use_dora = m.use_dora;
        for (const Entry& e : entries) mm.adapters.push_back(e.adapter->dir());
        // An adapter saved with save_embedding_layers carries the module's base weight, and PEFT's
        // load puts it into the model (converted to the model's dtype) before merging: start from
        // it. The checkpoint's tensor still decides the output's name, shape and dtype.
        const bool saved = !m.key_base_weight.empty();
        const std::uint8_t* wsrc = saved ? adapter.tensors().raw(m.key_base_weight) : src;
        const Dtype wdt = saved ? adapter.tensors().info(m.key_base_weight).dtype : t.dtype;
        mm.max_abs_delta = detail::merge_tensor(stack, wsrc, wdt, m.stored_transposed(adapter.config().fan_in_fan_out),
                                                buf.data(), od);
        w.write(t.name, buf.data(), buf.size());
        if (options.log != nullptr) {
          *options.log << "merged " << t.name << " " << detail::shape_string(t.shape) << " " << dtype_name(t.dtype)
                       << (od != t.dtype ? std::string(" -> ") + dtype_name(od) : std::string());
          for (std::size_t k = 0; k < entries.size(); ++k) {
            const PeftModule& mk = *entries[k].module;
            *options.log << (k == 0 ? "  " : "  then ") << (entries.size() > 1 ? entries[k].adapter->dir() + ": " : "")
                         << "rank " << mk.rank << "  " << (mk.use_dora ? "DoRA" : "LoRA") << "  scaling " << mk.scaling;
          }
          *options.log << "  " << mm.kind << (saved ? "  (base weight from the adapter)" : "") << "  max|delta| "
                       << mm.max_abs_delta << "\n";
        }
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
      ++progress.tensors_done;
      progress.bytes_done += in_bytes;
      progress.tensor = t.name;
      if (options.progress) options.progress(progress);
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

/// One adapter (the common case).
inline MergeReport merge_checkpoint(const std::string& base, const std::string& adapter_dir, const std::string& out,
                                    const MergeOptions& options = {}) {
  return merge_checkpoint(base, std::vector<std::string>{adapter_dir}, out, options);
}

}  // namespace dora::io
