// Training checkpoints: the adapter as a PEFT adapter directory, and the trainer's state (the
// optimizer's moments, the step, the learning-rate factor, random generator states, the caller's
// own JSON) in a safetensors file whose metadata holds the JSON:
//
//   <dir>/adapter/                    PeftAdapterWriter's directory: PEFT loads it as it is
//   <dir>/trainer_state.safetensors   one tensor per optimizer state vector (exp_avg.<group>.<index>,
//                                     ...), in the parameters' dtype; metadata "dora_checkpoint":
//                                     {"format": 1, "optimizer", "options", "step", "lr_factor",
//                                      "groups": [{"lr", "weight_decay", "sizes"}], "rng": {...},
//                                      "extra": {...}}
//
// The directory is written atomically (a temporary directory renamed into place; an existing
// non-empty directory is refused, never overwritten). load_checkpoint validates everything (the
// file, the JSON, the optimizer kind and settings, the groups' shapes, every tensor's name, dtype
// and size) before it changes the optimizer: a corrupt or mismatched checkpoint is refused with a
// PeftError naming the file and what is wrong, and the optimizer is left as it was. Restoring the
// layers' factors from <dir>/adapter (PeftAdapter) and their dropout streams from state.rng
// (set_dropout_state) makes a resumed run continue bit for bit like the uninterrupted one
// (tests/io/checkpoint.cpp).
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "dora/io/error.hpp"
#include "dora/io/fs.hpp"
#include "dora/io/peft_writer.hpp"
#include "dora/io/safetensors.hpp"
#include "dora/optim.hpp"

namespace dora::io {

/// What a checkpoint holds besides the adapter and the optimizer's tensors.
struct TrainerState {
  long step = 0;                                    ///< steps taken (the optimizer's step_count())
  std::map<std::string, std::string> rng;           ///< named generator states (layer.dropout_state(), ...)
  nlohmann::json extra = nlohmann::json::object();  ///< the caller's own (epoch, data position, ...)
};

namespace detail {

template <typename Scalar>
constexpr Dtype dtype_of() {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "dora::io checkpoints hold float or double optimizer state");
  return std::is_same<Scalar, float>::value ? Dtype::F32 : Dtype::F64;
}

template <typename Optim>
nlohmann::json optimizer_layout(const Optim& opt) {
  nlohmann::json groups = nlohmann::json::array();
  double factor = opt.lr_factor();
  for (const auto& g : opt.groups()) {
    nlohmann::json sizes = nlohmann::json::array();
    for (const auto& p : g.params) sizes.push_back(p.value.size());
    groups.push_back(
        {{"base_lr", factor != 0.0 ? g.lr / factor : g.lr}, {"weight_decay", g.weight_decay}, {"sizes", sizes}});
  }
  return groups;
}

}  // namespace detail

/// Writes a checkpoint directory `dir` (which must not exist or be empty): `adapter` (the layers, added
/// to a PeftAdapterWriter by the caller) into dir/adapter, the optimizer's state and `state` into
/// dir/trainer_state.safetensors.
template <typename Optim>
void save_checkpoint(const std::string& dir, const PeftAdapterWriter& adapter, Optim& opt, const TrainerState& state) {
  using Scalar = typename std::decay_t<decltype(opt.groups()[0].params[0].value)>::Scalar;
  detail::AtomicDir out(dir);
  adapter.write(detail::join_path(out.tmp(), "adapter"));
  const std::string file = detail::join_path(out.tmp(), "trainer_state.safetensors");
  SafetensorsWriter w(file);
  nlohmann::json meta{{"format", 1},
                      {"optimizer", Optim::kName},
                      {"options", opt.options_text()},
                      {"step", state.step},
                      {"optimizer_step", opt.step_count()},
                      {"lr_factor", opt.lr_factor()},
                      {"groups", detail::optimizer_layout(opt)},
                      {"rng", state.rng},
                      {"extra", state.extra}};
  w.set_metadata({{"dora_checkpoint", meta.dump()}});
  for (const auto& [name, v] : opt.state_tensors()) w.add(name, *v, detail::dtype_of<Scalar>());
  w.finish();
  out.commit();
}

/// Reads dir/trainer_state.safetensors into `opt` (state tensors, step count, lr factor) and returns
/// the TrainerState; the layers are restored by the caller from dir/adapter (PeftAdapter). Throws
/// PeftError naming the file and the problem, leaving `opt` unchanged, when anything does not match.
template <typename Optim>
TrainerState load_checkpoint(const std::string& dir, Optim& opt) {
  using Scalar = typename std::decay_t<decltype(opt.groups()[0].params[0].value)>::Scalar;
  const std::string file = detail::join_path(dir, "trainer_state.safetensors");
  if (!detail::path_exists(file)) detail::peft_fail(file, "missing (a checkpoint directory needs it)");
  const SafetensorsReader r(file);
  const auto it = r.metadata().find("dora_checkpoint");
  if (it == r.metadata().end()) detail::peft_fail(file, "has no \"dora_checkpoint\" metadata: not a dora checkpoint");
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(it->second);
  } catch (const std::exception& e) {
    detail::peft_fail(file, std::string("its \"dora_checkpoint\" metadata is not JSON: ") + e.what());
  }
  const auto need = [&](const char* key) -> const nlohmann::json& {
    if (!meta.is_object() || !meta.contains(key))
      detail::peft_fail(file, std::string("checkpoint metadata lacks \"") + key + "\"");
    return meta.at(key);
  };
  if (need("format") != 1) detail::peft_fail(file, "checkpoint format " + need("format").dump() + " is not 1");
  if (need("optimizer") != Optim::kName)
    detail::peft_fail(file, "checkpoint of optimizer " + need("optimizer").dump() + " loaded into " + Optim::kName);
  if (need("options") != opt.options_text())
    detail::peft_fail(file, "checkpoint optimizer settings " + need("options").dump() + " differ from this one's \"" +
                                opt.options_text() + "\"");
  const nlohmann::json layout = detail::optimizer_layout(opt);
  const nlohmann::json& groups = need("groups");
  if (!groups.is_array() || groups.size() != layout.size())
    detail::peft_fail(file, "checkpoint has " + std::to_string(groups.is_array() ? groups.size() : 0) +
                                " parameter groups, the optimizer " + std::to_string(layout.size()));
  for (std::size_t g = 0; g < layout.size(); ++g)
    if (groups[g].value("sizes", nlohmann::json()) != layout[g].at("sizes"))
      detail::peft_fail(file, "parameter group " + std::to_string(g) + " has sizes " +
                                  groups[g].value("sizes", nlohmann::json()).dump() + " in the checkpoint, " +
                                  layout[g].at("sizes").dump() + " in the optimizer");
  const auto views = opt.state_tensors();
  std::vector<Vector<Scalar>> values;
  for (const auto& [name, v] : views) {
    if (!r.contains(name)) detail::peft_fail(file, "optimizer state tensor '" + name + "' is missing");
    const TensorInfo& t = r.info(name);
    if (t.dtype != detail::dtype_of<Scalar>() || t.numel() != v->size())
      detail::fail_tensor(file, name,
                          "is " + std::string(dtype_name(t.dtype)) + " " + detail::shape_string(t.shape) +
                              " but the optimizer's is " + dtype_name(detail::dtype_of<Scalar>()) + " [" +
                              std::to_string(v->size()) + "]");
    values.push_back(r.vector<Scalar>(name));
  }
  if (r.tensors().size() != views.size())
    detail::peft_fail(file, "checkpoint has " + std::to_string(r.tensors().size()) + " state tensors, the optimizer " +
                                std::to_string(views.size()));
  TrainerState state;
  double factor = 0.0;
  long optimizer_step = 0;
  try {
    factor = need("lr_factor").template get<double>();
    optimizer_step = need("optimizer_step").template get<long>();
    state.step = need("step").template get<long>();
    state.rng = need("rng").template get<std::map<std::string, std::string>>();
  } catch (const nlohmann::json::exception& e) {
    detail::peft_fail(file, std::string("checkpoint metadata has a value of the wrong type: ") + e.what());
  }
  state.extra = need("extra");
  // set_lr_factor would refuse these after the state was already written.
  if (!std::isfinite(factor) || factor < 0.0)
    detail::peft_fail(file, "checkpoint lr_factor " + std::to_string(factor) + " is not finite and >= 0");
  if (optimizer_step < 0)
    detail::peft_fail(file, "checkpoint optimizer_step " + std::to_string(optimizer_step) + " is negative");
  // Everything checked: now change the optimizer.
  for (std::size_t k = 0; k < views.size(); ++k) *views[k].second = values[k];
  opt.set_step_count(optimizer_step);
  opt.set_lr_factor(factor);
  return state;
}

}  // namespace dora::io
