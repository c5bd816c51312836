#pragma once
/// \file optim.hpp
/// Optimizers with torch.optim's semantics, for the parameter views the layers give
/// (`layer.parameters()`): AdamW and SGD with parameter groups, gradient clipping by global norm
/// (torch.nn.utils.clip_grad_norm_), and a linear warm-up + cosine decay schedule (as a LambdaLR).
///
/// Each update is written in the order torch 2.11's single-tensor CPU kernels evaluate it, with
/// torch's Python-float scalars (computed in double) rounded to the parameters' Scalar where torch's
/// kernels round them, so that a float run follows torch's to a few ulps and a double run to
/// rounding (tests/data/optim, tools/make_optim_reference.py: 100 steps, <= 1e-6 / 1e-12 relative).
///
///   AdamW (torch.optim.AdamW, decoupled weight decay), per step t = 1, 2, ...:
///     p *= 1 - lr wd;  m = m + (1 - b1) (g - m);  v = b2 v + ((1 - b2) g) g;
///     amsgrad: vmax = max(vmax, v), v' = vmax, else v' = v;
///     d = sqrt(v') / sqrt(1 - b2^t) + eps;  p = p + ((-lr / (1 - b1^t)) m) / d
///   SGD (torch.optim.SGD): g' = g + wd p; momentum: buf = g' (first step) or
///     buf = momentum buf + (1 - dampening) g'; g' = nesterov ? g' + momentum buf : buf; p = p - lr g'
///
/// Parameter groups carry their own lr and weight decay (e.g. none on DoRA's magnitude, a larger lr
/// for B as in LoRA+: dora_parameter_groups); the other settings are the optimizer's. Nothing is
/// allocated by step() after the first (the state is sized then).

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/adapter.hpp"
#include "detail/check.hpp"

namespace dora {

/// A set of parameters with its own learning rate and weight decay (torch's param_groups).
template <typename Scalar_>
struct ParamGroup {
  using Scalar = Scalar_;
  std::vector<Parameter<Scalar>> params;
  double lr = 1e-3;
  double weight_decay = 0.0;
};

/// Groups a layer's parameters (its parameters() views) the way DoRA trainers usually do: lora_A and
/// the rest at (lr, weight_decay), lora_B at (lr * b_lr_ratio, weight_decay) (LoRA+: ratio 16 in its
/// paper, 1 for plain training), lora_magnitude_vector at (lr, 0): no weight decay on the magnitude.
/// Empty groups are left out.
template <typename Scalar>
std::vector<ParamGroup<Scalar>> dora_parameter_groups(const std::vector<Parameter<Scalar>>& params, double lr,
                                                      double weight_decay, double b_lr_ratio = 1.0) {
  ParamGroup<Scalar> rest{{}, lr, weight_decay}, b{{}, lr * b_lr_ratio, weight_decay}, m{{}, lr, 0.0};
  for (const Parameter<Scalar>& p : params) {
    const bool is_b = p.name.rfind("lora_B", 0) == 0 || p.name.rfind("lora_embedding_B", 0) == 0;
    const bool is_m = p.name.rfind("lora_magnitude_vector", 0) == 0;
    (is_m ? m : is_b ? b : rest).params.push_back(p);
  }
  std::vector<ParamGroup<Scalar>> out;
  for (ParamGroup<Scalar>* g : {&rest, &b, &m})
    if (!g->params.empty()) out.push_back(std::move(*g));
  return out;
}

namespace detail {

/// What AdamW and SGD share: the groups, their initial learning rates (the schedule's base) and a
/// state vector per parameter.
template <typename Scalar>
class Optimizer {
 public:
  using VectorType = Vector<Scalar>;

  /// Sets every group's lr to its initial lr times factor (torch's LambdaLR: lr = base_lr * f(step)).
  void set_lr_factor(double factor) {
    DORA_CHECK_ARG(std::isfinite(factor) && factor >= 0.0, "learning-rate factor must be finite and >= 0, got ",
                   factor);
    for (std::size_t i = 0; i < groups_.size(); ++i) groups_[i].lr = base_lr_[i] * factor;
    factor_ = factor;
  }
  /// The last factor set (1 until set_lr_factor is called).
  double lr_factor() const { return factor_; }
  std::vector<ParamGroup<Scalar>>& groups() { return groups_; }
  const std::vector<ParamGroup<Scalar>>& groups() const { return groups_; }
  /// Steps taken (the next step is step_count() + 1); set by a checkpoint's load.
  long step_count() const { return steps_; }
  void set_step_count(long steps) {
    DORA_CHECK_ARG(steps >= 0, "step count must be >= 0, got ", steps);
    steps_ = steps;
  }
  void zero_grad() {
    for (ParamGroup<Scalar>& g : groups_)
      for (Parameter<Scalar>& p : g.params) p.grad.setZero();
  }

 protected:
  explicit Optimizer(std::vector<ParamGroup<Scalar>> groups) : groups_(std::move(groups)) {
    DORA_CHECK_ARG(!groups_.empty(), "an optimizer needs at least one parameter group");
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      const ParamGroup<Scalar>& g = groups_[i];
      DORA_CHECK_ARG(std::isfinite(g.lr) && g.lr >= 0.0, "group ", i, ": lr must be finite and >= 0, got ", g.lr);
      DORA_CHECK_ARG(std::isfinite(g.weight_decay) && g.weight_decay >= 0.0, "group ", i,
                     ": weight_decay must be finite and >= 0, got ", g.weight_decay);
      for (const Parameter<Scalar>& p : g.params)
        DORA_CHECK_ARG(p.value.size() == p.grad.size(), "group ", i, ": parameter '", p.name, "' has ", p.value.size(),
                       " values but ", p.grad.size(), " gradient entries");
      base_lr_.push_back(g.lr);
    }
  }
  // One state vector per parameter, in group order, created zero on first use.
  std::vector<VectorType>& state(std::vector<VectorType>& s) {
    if (s.empty())
      for (const ParamGroup<Scalar>& g : groups_)
        for (const Parameter<Scalar>& p : g.params) s.push_back(VectorType::Zero(p.value.size()));
    return s;
  }

  void name_state(std::vector<std::pair<std::string, VectorType*>>& out, const std::string& what,
                  std::vector<VectorType>& s) const {
    std::size_t k = 0;
    for (std::size_t g = 0; g < groups_.size(); ++g)
      for (std::size_t i = 0; i < groups_[g].params.size(); ++i)
        out.emplace_back(what + "." + std::to_string(g) + "." + std::to_string(i), &s[k++]);
  }

  std::vector<ParamGroup<Scalar>> groups_;
  std::vector<double> base_lr_;
  double factor_ = 1.0;
  long steps_ = 0;
};

}  // namespace detail

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999;  ///< torch's betas
  double eps = 1e-8;
  bool amsgrad = false;
};

/// torch.optim.AdamW (see the file comment). Group lr and weight_decay as given (torch's defaults
/// are lr 1e-3, weight_decay 1e-2).
template <typename Scalar>
class AdamW : public detail::Optimizer<Scalar> {
  using Base = detail::Optimizer<Scalar>;

 public:
  AdamW(std::vector<ParamGroup<Scalar>> groups, const AdamWOptions& options = {})
      : Base(std::move(groups)), options_(options) {
    DORA_CHECK_ARG(options.beta1 >= 0.0 && options.beta1 < 1.0 && options.beta2 >= 0.0 && options.beta2 < 1.0,
                   "AdamW betas must lie in [0, 1), got (", options.beta1, ", ", options.beta2, ")");
    DORA_CHECK_ARG(options.eps >= 0.0, "AdamW eps must be >= 0, got ", options.eps);
  }

  void step() {
    this->state(m_);
    this->state(v_);
    if (options_.amsgrad) this->state(vmax_);
    const long t = ++this->steps_;
    const double b1 = options_.beta1, b2 = options_.beta2;
    // torch computes these in Python floats (double), then its kernels use them as Scalar.
    const double bias_correction1 = 1.0 - std::pow(b1, static_cast<double>(t));
    const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(b2, static_cast<double>(t)));
    const Scalar w1 = static_cast<Scalar>(1.0 - b1), sb2 = static_cast<Scalar>(b2), w2 = static_cast<Scalar>(1.0 - b2);
    const Scalar bc2 = static_cast<Scalar>(bias_correction2_sqrt), eps = static_cast<Scalar>(options_.eps);
    std::size_t k = 0;
    for (ParamGroup<Scalar>& g : this->groups_) {
      const Scalar decay = static_cast<Scalar>(1.0 - g.lr * g.weight_decay);
      const Scalar step_size = static_cast<Scalar>(-(g.lr / bias_correction1));
      for (Parameter<Scalar>& p : g.params) {
        Scalar* x = p.value.data();
        const Scalar* grad = p.grad.data();
        Scalar* m = m_[k].data();
        Scalar* v = v_[k].data();
        Scalar* vmax = options_.amsgrad ? vmax_[k].data() : nullptr;
        for (Eigen::Index i = 0; i < p.value.size(); ++i) {
          if (g.weight_decay != 0.0) x[i] = x[i] * decay;
          m[i] = lerp(m[i], grad[i], w1);
          v[i] = v[i] * sb2 + w2 * grad[i] * grad[i];
          Scalar vv = v[i];
          if (vmax != nullptr) vv = vmax[i] = std::max(vmax[i], v[i]);
          const Scalar denom = std::sqrt(vv) / bc2 + eps;
          x[i] = x[i] + step_size * m[i] / denom;
        }
        ++k;
      }
    }
  }

  static constexpr const char* kName = "AdamW";
  const AdamWOptions& options() const { return options_; }
  /// Named views of the whole state (checkpoints): exp_avg.<group>.<index>, exp_avg_sq.<g>.<i> and,
  /// with amsgrad, max_exp_avg_sq.<g>.<i>; created zero if no step was taken yet.
  std::vector<std::pair<std::string, Vector<Scalar>*>> state_tensors() {
    std::vector<std::pair<std::string, Vector<Scalar>*>> out;
    this->name_state(out, "exp_avg", this->state(m_));
    this->name_state(out, "exp_avg_sq", this->state(v_));
    if (options_.amsgrad) this->name_state(out, "max_exp_avg_sq", this->state(vmax_));
    return out;
  }
  /// The settings as text, for a checkpoint to compare.
  std::string options_text() const {
    std::ostringstream o;
    o.precision(17);
    o << "betas=(" << options_.beta1 << ", " << options_.beta2 << ") eps=" << options_.eps
      << " amsgrad=" << (options_.amsgrad ? "true" : "false");
    return o.str();
  }
  /// The moments, one vector per parameter in group order (empty before the first step).
  const std::vector<Vector<Scalar>>& exp_avg() const { return m_; }
  const std::vector<Vector<Scalar>>& exp_avg_sq() const { return v_; }
  const std::vector<Vector<Scalar>>& max_exp_avg_sq() const { return vmax_; }

 private:
  // torch's lerp: the formula depends on which side of 1/2 the weight is.
  static Scalar lerp(Scalar self, Scalar end, Scalar w) {
    return std::abs(w) < Scalar(0.5) ? self + w * (end - self) : end - (end - self) * (Scalar(1) - w);
  }

  AdamWOptions options_;
  std::vector<Vector<Scalar>> m_, v_, vmax_;
};

struct SGDOptions {
  double momentum = 0.0, dampening = 0.0;
  bool nesterov = false;
};

/// torch.optim.SGD (see the file comment).
template <typename Scalar>
class SGD : public detail::Optimizer<Scalar> {
  using Base = detail::Optimizer<Scalar>;

 public:
  SGD(std::vector<ParamGroup<Scalar>> groups, const SGDOptions& options = {})
      : Base(std::move(groups)), options_(options) {
    DORA_CHECK_ARG(options.momentum >= 0.0, "SGD momentum must be >= 0, got ", options.momentum);
    DORA_CHECK_ARG(!options.nesterov || (options.momentum > 0.0 && options.dampening == 0.0),
                   "SGD nesterov needs momentum > 0 and dampening 0 (torch's rule)");
  }

  void step() {
    const bool momentum = options_.momentum != 0.0;
    if (momentum) this->state(buf_);
    const bool first = this->steps_++ == 0;
    const Scalar mu = static_cast<Scalar>(options_.momentum), damp = static_cast<Scalar>(1.0 - options_.dampening);
    std::size_t k = 0;
    for (ParamGroup<Scalar>& g : this->groups_) {
      const Scalar wd = static_cast<Scalar>(g.weight_decay), neg_lr = static_cast<Scalar>(-g.lr);
      for (Parameter<Scalar>& p : g.params) {
        Scalar* x = p.value.data();
        const Scalar* grad = p.grad.data();
        Scalar* buf = momentum ? buf_[k].data() : nullptr;
        for (Eigen::Index i = 0; i < p.value.size(); ++i) {
          Scalar d = grad[i];
          if (g.weight_decay != 0.0) d = d + wd * x[i];
          if (momentum) {
            buf[i] = first ? d : buf[i] * mu + damp * d;
            d = options_.nesterov ? d + mu * buf[i] : buf[i];
          }
          x[i] = x[i] + neg_lr * d;
        }
        ++k;
      }
    }
  }

  static constexpr const char* kName = "SGD";
  const SGDOptions& options() const { return options_; }
  /// Named views of the state (checkpoints): momentum_buffer.<group>.<index> (with momentum).
  std::vector<std::pair<std::string, Vector<Scalar>*>> state_tensors() {
    std::vector<std::pair<std::string, Vector<Scalar>*>> out;
    if (options_.momentum != 0.0) this->name_state(out, "momentum_buffer", this->state(buf_));
    return out;
  }
  std::string options_text() const {
    std::ostringstream o;
    o.precision(17);
    o << "momentum=" << options_.momentum << " dampening=" << options_.dampening
      << " nesterov=" << (options_.nesterov ? "true" : "false");
    return o.str();
  }
  /// The momentum buffers, one per parameter in group order (empty without momentum).
  const std::vector<Vector<Scalar>>& momentum_buffer() const { return buf_; }

 private:
  SGDOptions options_;
  std::vector<Vector<Scalar>> buf_;
};

namespace detail {

// Calls f(parameter) for every parameter of a list or of every group.
template <typename Scalar, typename F>
void for_each_parameter(std::vector<Parameter<Scalar>>& params, F&& f) {
  for (Parameter<Scalar>& p : params) f(p);
}
template <typename Scalar, typename F>
void for_each_parameter(std::vector<ParamGroup<Scalar>>& groups, F&& f) {
  for (ParamGroup<Scalar>& g : groups)
    for (Parameter<Scalar>& p : g.params) f(p);
}

}  // namespace detail

/// torch.nn.utils.clip_grad_norm_(params, max_norm) (2-norm): scales every gradient by
/// min(1, max_norm / (total + 1e-6)), total the 2-norm of all gradients together; returns total.
/// `params`: a vector of Parameter views, or of ParamGroups (an optimizer's groups()). A non-finite
/// total is treated as torch does with error_if_nonfinite=False: the coefficient is
/// clamp(max_norm / (total + 1e-6), max = 1), which is 0 for an infinite total (finite gradients
/// become 0, infinite ones NaN) and NaN for a NaN total (every gradient NaN); check the returned total
/// to skip such a step. Allocates nothing.
template <typename Params>
double clip_grad_norm(Params& params, double max_norm) {
  DORA_CHECK_ARG(max_norm > 0.0, "clip_grad_norm: max_norm must be > 0, got ", max_norm);
  using Scalar = typename std::decay_t<decltype(params.front())>::Scalar;
  // Each tensor's norm in Scalar (as torch's vector_norm), then the norm of those norms.
  double sum = 0.0;
  detail::for_each_parameter(params, [&](Parameter<Scalar>& p) {
    const double n = static_cast<double>(static_cast<Scalar>(p.grad.template cast<double>().norm()));
    sum += n * n;
  });
  const Scalar total = static_cast<Scalar>(std::sqrt(sum));
  const Scalar ratio = static_cast<Scalar>(max_norm) / (total + static_cast<Scalar>(1e-6));
  // torch.clamp(ratio, max=1) keeps a NaN (std::min(1, NaN) would return 1).
  const Scalar coef = ratio > Scalar(1) ? Scalar(1) : ratio;
  detail::for_each_parameter(params, [&](Parameter<Scalar>& p) { p.grad *= coef; });
  return static_cast<double>(total);
}

/// Linear warm-up then cosine decay, as a LambdaLR factor of the step index s = 0, 1, ...:
/// (s + 1) / warmup for s < warmup, then min + (1 - min) (1 + cos(pi p)) / 2 with
/// p = (s - warmup) / (total - warmup), clamped to [0, 1]. Use opt.set_lr_factor(f(step)) before
/// each step (torch: LambdaLR's lr for step s).
struct WarmupCosine {
  long warmup = 0;
  long total = 1;
  double min_factor = 0.0;
  double operator()(long step) const {
    DORA_CHECK_ARG(warmup >= 0 && total > warmup, "WarmupCosine needs 0 <= warmup < total, got warmup ", warmup,
                   ", total ", total);
    if (step < warmup) return static_cast<double>(step + 1) / static_cast<double>(warmup);
    const double progress = std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(total - warmup));
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
  }
};

}  // namespace dora
