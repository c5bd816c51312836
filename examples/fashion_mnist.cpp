// Fashion-MNIST demo: pretrain a small MLP on one task, adapt it to a shifted task with a new head
// only, with LoRA and DoRA at several ranks on every hidden layer, and with full fine-tuning; print a
// table, write CSVs and plot test accuracy against rank (like the DoRA paper's rank figure).
//
//   fashion_mnist [--full] [--out DIR] [--data DIR] [--ranks 1,2,4] [--seeds N] [--steps N]
//                 [--lrs 1e-3,4e-3] [--task NAME] [--no-plot] [--no-cache]
//
// The adapters are the library's LoraLinear / DoraLinear, driven through their public API only
// (borrow, forward, backward, backward_parameters, zero_grad, parameters, train/eval, merge).
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <dora/dora.hpp>

#include "fashion_mnist_data.hpp"

namespace {

using Index = Eigen::Index;
using Mat = dora::Matrix<float>;
using Vec = dora::Vector<float>;

// ---------------------------------------------------------------------------------------------
// Random numbers: std::mt19937_64 is fully specified; the conversions are written out so that a
// seed gives the same run with any standard library.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : engine_(seed) {}
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  Index below(Index n) { return static_cast<Index>(uniform() * static_cast<double>(n)); }

 private:
  std::mt19937_64 engine_;
};

// ---------------------------------------------------------------------------------------------
// Data: fashion_mnist_data.hpp (shared with data_parallel.cpp).
using fashion_mnist_data::Images;
Images load_split(const std::string& dir, const std::string& prefix) {
  return fashion_mnist_data::load_split(dir, prefix, "fashion_mnist");
}

// A task: images, labels in 0..classes-1.
struct Task {
  Mat x;
  std::vector<int> y;
  int classes = 10;
  Index size() const { return x.rows(); }
};

Task select_rows(const Images& all, const std::vector<Index>& rows, const std::vector<int>& label_map, int classes) {
  Task t;
  t.classes = classes;
  t.x.resize(static_cast<Index>(rows.size()), all.x.cols());
  t.y.resize(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    t.x.row(static_cast<Index>(i)) = all.x.row(rows[i]);
    t.y[i] = label_map[static_cast<std::size_t>(all.y[static_cast<std::size_t>(rows[i])])];
  }
  return t;
}

// Rotate every 28 x 28 image by 90 degrees (counter-clockwise).
void rotate90(Mat& x) {
  Mat out(x.rows(), x.cols());
  for (Index n = 0; n < x.rows(); ++n)
    for (Index r = 0; r < 28; ++r)
      for (Index c = 0; c < 28; ++c) out(n, (27 - c) * 28 + r) = x(n, r * 28 + c);
  x.swap(out);
}

// The shift between the source task (pretraining) and the target task (adaptation).
struct Shift {
  std::string name, source_text, target_text;
  std::vector<int> source_map, target_map;  // label -> task label, -1: not in the task
  int source_classes = 0, target_classes = 0;
  bool rotate_target = false;
};

Shift make_shift(const std::string& name) {
  Shift s;
  s.name = name;
  if (name == "split") {
    s.source_text = "classes 0-4 (T-shirt, trouser, pullover, dress, coat)";
    s.target_text = "classes 5-9 (sandal, shirt, sneaker, bag, ankle boot)";
    s.source_map = {0, 1, 2, 3, 4, -1, -1, -1, -1, -1};
    s.target_map = {-1, -1, -1, -1, -1, 0, 1, 2, 3, 4};
    s.source_classes = s.target_classes = 5;
  } else if (name == "rot-split") {
    s.source_text = "classes 0-4 (T-shirt, trouser, pullover, dress, coat), upright";
    s.target_text = "classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), rotated by 90 degrees";
    s.source_map = {0, 1, 2, 3, 4, -1, -1, -1, -1, -1};
    s.target_map = {-1, -1, -1, -1, -1, 0, 1, 2, 3, 4};
    s.source_classes = s.target_classes = 5;
    s.rotate_target = true;
  } else if (name == "rot90") {
    s.source_text = "all 10 classes, upright";
    s.target_text = "all 10 classes, rotated by 90 degrees";
    for (int c = 0; c < 10; ++c) s.source_map.push_back(c), s.target_map.push_back(c);
    s.source_classes = s.target_classes = 10;
    s.rotate_target = true;
  } else {
    throw std::invalid_argument("unknown --task " + name + " (split, rot-split, rot90)");
  }
  return s;
}

struct Data {
  Task source_train, target_train, target_val, target_test;
};

// Source: the whole training set restricted to the source classes. Target: the training set's
// target-class images split into train and a fixed validation part; test from t10k.
Data make_data(const std::string& dir, const Shift& shift, Index val_size, Index target_train_max) {
  const Images train = load_split(dir, "train");
  const Images test = load_split(dir, "t10k");
  std::vector<Index> source_rows, target_rows, test_rows;
  for (Index i = 0; i < train.x.rows(); ++i) {
    const int label = train.y[static_cast<std::size_t>(i)];
    if (shift.source_map[static_cast<std::size_t>(label)] >= 0) source_rows.push_back(i);
    if (shift.target_map[static_cast<std::size_t>(label)] >= 0) target_rows.push_back(i);
  }
  for (Index i = 0; i < test.x.rows(); ++i)
    if (shift.target_map[static_cast<std::size_t>(test.y[static_cast<std::size_t>(i)])] >= 0) test_rows.push_back(i);
  // A fixed shuffle decides which target images are validation; the source set is the same images
  // whatever the task, so they may overlap with the target set only when the classes do (rot90).
  Rng rng(20240605);
  for (std::size_t i = target_rows.size(); i > 1; --i)
    std::swap(target_rows[i - 1], target_rows[static_cast<std::size_t>(rng.below(static_cast<Index>(i)))]);
  const std::vector<Index> val_rows(target_rows.begin(), target_rows.begin() + val_size);
  std::vector<Index> fit_rows(target_rows.begin() + val_size, target_rows.end());
  if (static_cast<Index>(fit_rows.size()) > target_train_max)
    fit_rows.resize(static_cast<std::size_t>(target_train_max));
  Data d;
  d.source_train = select_rows(train, source_rows, shift.source_map, shift.source_classes);
  d.target_train = select_rows(train, fit_rows, shift.target_map, shift.target_classes);
  d.target_val = select_rows(train, val_rows, shift.target_map, shift.target_classes);
  d.target_test = select_rows(test, test_rows, shift.target_map, shift.target_classes);
  if (shift.rotate_target) {
    rotate90(d.target_train.x);
    rotate90(d.target_val.x);
    rotate90(d.target_test.x);
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// Network pieces: dense layers, ReLU, softmax cross-entropy, AdamW.

struct Dense {
  Mat W;  // d_out x d_in (PyTorch layout, what dora::borrow expects)
  Vec b;
  Mat gW;
  Vec gb;
  void init(Index d_out, Index d_in, Rng& rng) {
    // He-uniform for ReLU layers: variance 2 / fan_in keeps activations at scale through depth.
    const double bound = std::sqrt(6.0 / static_cast<double>(d_in));
    W.resize(d_out, d_in);
    for (Index i = 0; i < W.size(); ++i) W.data()[i] = static_cast<float>((2.0 * rng.uniform() - 1.0) * bound);
    b = Vec::Zero(d_out);
    gW = Mat::Zero(d_out, d_in);
    gb = Vec::Zero(d_out);
  }
  void forward(const Mat& x, Mat& y) const {
    y.noalias() = x * W.transpose();
    y.rowwise() += b.transpose();
  }
  // Accumulates dW, db; writes dx when asked.
  void backward(const Mat& x, const Mat& dy, Mat* dx) {
    gW.noalias() += dy.transpose() * x;
    gb.noalias() += dy.colwise().sum().transpose();
    if (dx != nullptr) dx->noalias() = dy * W;
  }
};

// z -> max(z, 0) in place; the saved post-activation doubles as the mask for backward.
void relu(Mat& z) { z = z.cwiseMax(0.0f); }
void relu_backward(const Mat& a, Mat& da) { da.array() *= (a.array() > 0.0f).cast<float>(); }

using fashion_mnist_data::softmax_xent;

// AdamW (decoupled weight decay, bias-corrected moments) over flat views of the parameters.
class AdamW {
 public:
  struct Slot {
    float* value;
    float* grad;
    Index size;
    Vec m, v;
  };
  AdamW(double weight_decay = 0.01, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8)
      : wd_(weight_decay), b1_(beta1), b2_(beta2), eps_(eps) {}

  void add(float* value, float* grad, Index size) {
    slots_.push_back({value, grad, size, Vec::Zero(size), Vec::Zero(size)});
  }
  void add(Dense& d) {
    add(d.W.data(), d.gW.data(), d.W.size());
    add(d.b.data(), d.gb.data(), d.b.size());
  }
  template <typename Layer>
  void add_adapter(Layer& layer) {
    // The views alias the layer's own storage: the layer must not move while the optimizer lives.
    for (dora::Parameter<float>& p : layer.parameters()) add(p.value.data(), p.grad.data(), p.value.size());
  }
  Index count() const {
    Index n = 0;
    for (const Slot& s : slots_) n += s.size;
    return n;
  }

  void step(double lr) {
    ++t_;
    const float c1 = static_cast<float>(1.0 / (1.0 - std::pow(b1_, t_)));
    const float c2 = static_cast<float>(1.0 / (1.0 - std::pow(b2_, t_)));
    const float b1 = static_cast<float>(b1_), b2 = static_cast<float>(b2_), eps = static_cast<float>(eps_);
    const float lr_f = static_cast<float>(lr), decay = static_cast<float>(1.0 - lr * wd_);
    for (Slot& s : slots_) {
      Eigen::Map<Vec> w(s.value, s.size);
      const Eigen::Map<const Vec> g(s.grad, s.size);
      s.m = b1 * s.m + (1.0f - b1) * g;
      s.v = b2 * s.v + (1.0f - b2) * g.cwiseAbs2();
      w *= decay;
      w.array() -= lr_f * (s.m.array() * c1) / ((s.v.array() * c2).sqrt() + eps);
    }
  }

 private:
  double wd_, b1_, b2_, eps_;
  int t_ = 0;
  std::vector<Slot> slots_;
};

// Linear warm-up over the first 5% of steps, then cosine decay to zero: the same for every method,
// so the final weights are not caught mid-oscillation at any learning rate.
double schedule(double lr, int step, int steps) {
  const int warm = std::max(1, steps / 20);
  if (step < warm) return lr * (step + 1) / warm;
  const double progress = static_cast<double>(step - warm) / std::max(1, steps - warm);
  return lr * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
}

// Shuffled mini-batches, one epoch after another.
class Batches {
 public:
  Batches(Index n, Index batch, std::uint64_t seed) : order_(static_cast<std::size_t>(n)), batch_(batch), rng_(seed) {
    for (Index i = 0; i < n; ++i) order_[static_cast<std::size_t>(i)] = i;
    shuffle();
  }
  void next(const Task& t, Mat& xb, std::vector<int>& yb) {
    if (pos_ + batch_ > static_cast<Index>(order_.size())) shuffle();
    xb.resize(batch_, t.x.cols());
    yb.resize(static_cast<std::size_t>(batch_));
    for (Index i = 0; i < batch_; ++i) {
      const Index r = order_[static_cast<std::size_t>(pos_ + i)];
      xb.row(i) = t.x.row(r);
      yb[static_cast<std::size_t>(i)] = t.y[static_cast<std::size_t>(r)];
    }
    pos_ += batch_;
  }

 private:
  void shuffle() {
    for (std::size_t i = order_.size(); i > 1; --i)
      std::swap(order_[i - 1], order_[static_cast<std::size_t>(rng_.below(static_cast<Index>(i)))]);
    pos_ = 0;
  }
  std::vector<Index> order_;
  Index batch_, pos_ = 0;
  Rng rng_;
};

// A plain 3-layer MLP: the pretrained base, and the form every method is evaluated in (adapters
// are merged into it first, which is also how one would deploy them).
struct Mlp {
  Dense l1, l2, l3;
  void init(Index d_in, Index hidden, Index classes, Rng& rng) {
    l1.init(hidden, d_in, rng);
    l2.init(hidden, hidden, rng);
    l3.init(classes, hidden, rng);
  }
};

double accuracy(const Mlp& net, const Task& t) {
  const Index chunk = 2000;
  Index correct = 0;
  Mat h1, h2, logits;
  for (Index at = 0; at < t.size(); at += chunk) {
    const Index n = std::min(chunk, t.size() - at);
    const Mat x = t.x.middleRows(at, n);
    net.l1.forward(x, h1);
    relu(h1);
    net.l2.forward(h1, h2);
    relu(h2);
    net.l3.forward(h2, logits);
    for (Index i = 0; i < n; ++i) {
      Index argmax = 0;
      logits.row(i).maxCoeff(&argmax);
      if (argmax == t.y[static_cast<std::size_t>(at + i)]) ++correct;
    }
  }
  return static_cast<double>(correct) / static_cast<double>(t.size());
}

// ---------------------------------------------------------------------------------------------
// Progress. Several runs train at once (one per thread); a status line shows each of them and the
// time left, rewritten in place on a terminal. Every finished run prints a line: above the status
// line on a terminal, and as the whole log when the output is a file.

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string format_duration(double seconds) {
  char buf[32];
  const int s = static_cast<int>(std::lround(std::max(0.0, seconds)));
  if (s >= 60)
    std::snprintf(buf, sizeof buf, "%dm%02ds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%ds", s);
  return buf;
}

class Board {
 public:
  Board(bool tty, int slots) : tty_(tty), slots_(static_cast<std::size_t>(slots)) {
    winsize ws{};
    if (tty_ && ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 20) width_ = ws.ws_col - 1;
  }
  // Work units: steps weighted by a rough per-method cost; the time left is the elapsed time per
  // unit done so far (calibrated as the runs go) times the units left.
  void plan(double units, int runs) {
    std::lock_guard<std::mutex> lock(mu_);
    total_units_ = units;
    total_runs_ = runs;
    done_units_ = 0;
    done_runs_ = 0;
    start_ = Clock::now();
  }
  void begin(int slot, const std::string& name) {
    std::lock_guard<std::mutex> lock(mu_);
    slots_[static_cast<std::size_t>(slot)] = Slot{name, 0, 0, 0, 0, 0, true};
  }
  void update(int slot, int step, int steps, double loss, double acc, double units) {
    std::lock_guard<std::mutex> lock(mu_);
    Slot& s = slots_[static_cast<std::size_t>(slot)];
    s.step = step, s.steps = steps, s.loss = loss, s.acc = acc, s.units = units;
    if (since(last_) > 0.25) draw();
  }
  // The run in this slot is done: its units count as done and its line is printed.
  void finish(int slot, const std::string& line, double units) {
    std::lock_guard<std::mutex> lock(mu_);
    slots_[static_cast<std::size_t>(slot)].active = false;
    done_units_ += units;
    ++done_runs_;
    char tail[48];
    std::snprintf(tail, sizeof tail, " | left %s", format_duration(seconds_left()).c_str());
    if (tty_) std::printf("\r%*s\r", width_, "");
    std::printf("[%3d/%d] %s%s\n", done_runs_, total_runs_, line.c_str(), tail);
    if (tty_) draw();
    std::fflush(stdout);
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    if (tty_) std::printf("\r%*s\r", width_, "");
    std::fflush(stdout);
  }

 private:
  struct Slot {
    std::string name;
    int step, steps;
    double loss, acc, units;
    bool active;
  };
  double seconds_left() const {
    double done = done_units_;
    for (const Slot& s : slots_)
      if (s.active) done += s.units;
    return done > 0 ? since(start_) / done * (total_units_ - done) : 0.0;
  }
  void draw() {
    last_ = Clock::now();
    if (!tty_) return;
    // The time left goes first: a narrow terminal cuts the end of the line.
    std::string line = "left " + format_duration(seconds_left());
    if (total_runs_ > 1) line += ", runs done " + std::to_string(done_runs_) + "/" + std::to_string(total_runs_);
    for (const Slot& s : slots_) {
      if (!s.active) continue;
      char part[160];
      std::snprintf(part, sizeof part, " | %s %d/%d loss %.3f acc %.1f%%", s.name.c_str(), s.step, s.steps, s.loss,
                    100.0 * s.acc);
      line += part;
    }
    if (static_cast<int>(line.size()) > width_) line.resize(static_cast<std::size_t>(width_));
    std::printf("\r%-*s", width_, line.c_str());
    std::fflush(stdout);
  }

  bool tty_;
  int width_ = 119;
  std::mutex mu_;
  std::vector<Slot> slots_;
  double total_units_ = 0, done_units_ = 0;
  int total_runs_ = 0, done_runs_ = 0;
  Clock::time_point start_ = Clock::now(), last_ = Clock::now();
};

// ---------------------------------------------------------------------------------------------
// One training run.

enum class Method { head, lora, dora, full };
const char* method_name(Method m) {
  switch (m) {
    case Method::head:
      return "head only";
    case Method::lora:
      return "LoRA";
    case Method::dora:
      return "DoRA";
    case Method::full:
      return "full FT";
  }
  return "?";
}
const char* method_key(Method m) {
  switch (m) {
    case Method::head:
      return "head";
    case Method::lora:
      return "lora";
    case Method::dora:
      return "dora";
    case Method::full:
      return "full";
  }
  return "?";
}
// Relative cost of one step, for the time-left estimate only.
double method_cost(Method m) {
  switch (m) {
    case Method::head:
      return 0.15;
    case Method::lora:
      return 1.0;
    case Method::dora:
      return 1.15;
    case Method::full:
      return 1.5;
  }
  return 1.0;
}

struct RunSpec {
  Method method = Method::head;
  Index rank = 0;
  double lr = 1e-3;
  int seed = 0;
  int steps = 500;
  Index batch = 128;
};

std::string run_name(const RunSpec& s) {
  char buf[64];
  if (s.rank > 0)
    std::snprintf(buf, sizeof buf, "%s r=%ld lr=%.0e s%d", method_name(s.method), static_cast<long>(s.rank), s.lr,
                  s.seed);
  else
    std::snprintf(buf, sizeof buf, "%s lr=%.0e s%d", method_name(s.method), s.lr, s.seed);
  return buf;
}

struct RunResult {
  RunSpec spec;
  double val_acc = 0, test_acc = 0, final_loss = 0, seconds = 0;
  Index trainable = 0;
};

// The features of the frozen hidden layers, computed once: head-only runs train on these.
struct Features {
  Task train, val, test;
};

struct Context {
  const Data* data = nullptr;
  const Mlp* base = nullptr;
  const Features* features = nullptr;  // the frozen net's hidden features: head-only runs train on them
  Board* board = nullptr;
};

// Hidden layers as the training loop sees them: LoRA/DoRA adapters on the frozen base, or the
// base's own dense layers (full fine-tuning), or frozen dense layers (head only).
class Hidden {
 public:
  virtual ~Hidden() = default;
  virtual void forward(int layer, const Mat& x, Mat& y) = 0;
  // dx == nullptr: the first layer, whose input gradient nobody needs.
  virtual void backward(int layer, const Mat& x, const Mat& dy, Mat* dx) = 0;
  virtual void zero_grad() = 0;
  virtual void add_to(AdamW& opt) = 0;
  virtual void set_training(bool on) = 0;
  virtual void merged_into(Mlp& net) const = 0;  // the hidden weights as a plain MLP
};

template <typename Layer>
class AdapterHidden final : public Hidden {
 public:
  AdapterHidden(const Mlp& base, const dora::AdapterConfig& config1, const dora::AdapterConfig& config2)
      : l1_(dora::borrow(base.l1.W, base.l1.b), config1),
        l2_(dora::borrow(base.l2.W, base.l2.b), config2),
        base_(base) {}
  void forward(int layer, const Mat& x, Mat& y) override {
    // The layers write into y through an Eigen::Ref, which cannot resize: size it here.
    y.resize(x.rows(), layer == 0 ? l1_.d_out() : l2_.d_out());
    if (layer == 0)
      l1_.forward(x, y);
    else
      l2_.forward(x, y);
  }
  void backward(int layer, const Mat&, const Mat& dy, Mat* dx) override {
    if (layer == 0)
      l1_.backward_parameters(dy);
    else
      l2_.backward(dy, *dx);
  }
  void zero_grad() override {
    l1_.zero_grad();
    l2_.zero_grad();
  }
  void add_to(AdamW& opt) override {
    opt.add_adapter(l1_);
    opt.add_adapter(l2_);
  }
  void set_training(bool on) override {
    l1_.train(on);
    l2_.train(on);
  }
  void merged_into(Mlp& net) const override {
    net.l1.W = merged(l1_);
    net.l1.b = base_.l1.b;
    net.l2.W = merged(l2_);
    net.l2.b = base_.l2.b;
  }

 private:
  static Mat merged(const dora::LoraLinear<float>& l) { return l.merged_weight(); }
  static Mat merged(const dora::DoraLinear<float>& l) { return l.merge().weight; }
  Layer l1_, l2_;
  const Mlp& base_;
};

class DenseHidden final : public Hidden {
 public:
  DenseHidden(const Mlp& base, bool trainable) : l1_(base.l1), l2_(base.l2), trainable_(trainable) {
    l1_.gW.setZero();
    l1_.gb.setZero();
    l2_.gW.setZero();
    l2_.gb.setZero();
  }
  void forward(int layer, const Mat& x, Mat& y) override { (layer == 0 ? l1_ : l2_).forward(x, y); }
  void backward(int layer, const Mat& x, const Mat& dy, Mat* dx) override {
    if (trainable_) (layer == 0 ? l1_ : l2_).backward(x, dy, dx);
  }
  void zero_grad() override {
    l1_.gW.setZero();
    l1_.gb.setZero();
    l2_.gW.setZero();
    l2_.gb.setZero();
  }
  void add_to(AdamW& opt) override {
    if (!trainable_) return;
    opt.add(l1_);
    opt.add(l2_);
  }
  void set_training(bool) override {}
  void merged_into(Mlp& net) const override {
    net.l1 = l1_;
    net.l2 = l2_;
  }

 private:
  Dense l1_, l2_;
  bool trainable_;
};

Task features_of(const Mlp& base, const Task& t) {
  Task f;
  f.classes = t.classes;
  f.y = t.y;
  f.x.resize(t.size(), base.l2.W.rows());
  Mat h1, h2;
  const Index chunk = 2000;
  for (Index at = 0; at < t.size(); at += chunk) {
    const Index n = std::min(chunk, t.size() - at);
    const Mat x = t.x.middleRows(at, n);
    base.l1.forward(x, h1);
    relu(h1);
    base.l2.forward(h1, h2);
    relu(h2);
    f.x.middleRows(at, n) = h2;
  }
  return f;
}

RunResult train_run(const RunSpec& spec, const Context& ctx, int slot) {
  const Features* features = ctx.features;
  const Clock::time_point t0 = Clock::now();
  const Data& data = *ctx.data;
  const Mlp& base = *ctx.base;
  const Index hidden = base.l2.W.rows();
  const int classes = data.target_train.classes;
  Rng rng(1000003ULL * static_cast<std::uint64_t>(spec.seed) + 17);

  // A new head for the new classes, for every method (the source head predicts other classes).
  Dense head;
  head.init(classes, hidden, rng);

  std::unique_ptr<Hidden> body;
  if (spec.method == Method::lora || spec.method == Method::dora) {
    dora::AdapterConfig c1;
    c1.rank = spec.rank;
    c1.alpha = 2.0 * static_cast<double>(spec.rank);  // alpha = 2r, the DoRA paper's setting (s = 2)
    c1.seed = 7919ULL * static_cast<std::uint64_t>(spec.seed) + 1;
    dora::AdapterConfig c2 = c1;
    c2.seed = c1.seed + 1;
    if (spec.method == Method::lora)
      body = std::make_unique<AdapterHidden<dora::LoraLinear<float>>>(base, c1, c2);
    else
      body = std::make_unique<AdapterHidden<dora::DoraLinear<float>>>(base, c1, c2);
  } else {
    body = std::make_unique<DenseHidden>(base, spec.method == Method::full);
  }

  AdamW opt;
  opt.add(head);
  body->add_to(opt);
  const bool head_only = spec.method == Method::head;
  const Task& train = head_only ? features->train : data.target_train;

  Batches batches(train.size(), spec.batch, 31ULL * static_cast<std::uint64_t>(spec.seed) + 5);
  Mat xb, z1, z2, logits, dlogits, da2, da1;
  std::vector<int> yb;
  double loss_avg = 0, acc_avg = 0;
  const double units_per_step = method_cost(spec.method);
  ctx.board->begin(slot, run_name(spec));
  for (int step = 0; step < spec.steps; ++step) {
    batches.next(train, xb, yb);
    Index correct = 0;
    double loss = 0;
    head.gW.setZero();
    head.gb.setZero();
    if (head_only) {
      head.forward(xb, logits);
      loss = softmax_xent(logits, yb.data(), dlogits, correct);
      head.backward(xb, dlogits, nullptr);
    } else {
      body->zero_grad();
      body->forward(0, xb, z1);
      relu(z1);
      body->forward(1, z1, z2);
      relu(z2);
      head.forward(z2, logits);
      loss = softmax_xent(logits, yb.data(), dlogits, correct);
      head.backward(z2, dlogits, &da2);
      relu_backward(z2, da2);
      da1.resize(da2.rows(), z1.cols());
      body->backward(1, z1, da2, &da1);
      relu_backward(z1, da1);
      body->backward(0, xb, da1, nullptr);
    }
    opt.step(schedule(spec.lr, step, spec.steps));
    // Smoothed over ~50 steps: a single batch's numbers jump too much to read.
    const double k = step == 0 ? 1.0 : 0.02;
    loss_avg += k * (loss - loss_avg);
    acc_avg += k * (static_cast<double>(correct) / static_cast<double>(spec.batch) - acc_avg);
    ctx.board->update(slot, step + 1, spec.steps, loss_avg, acc_avg, units_per_step * (step + 1));
  }

  RunResult r;
  r.spec = spec;
  r.trainable = opt.count();
  r.final_loss = loss_avg;
  // Evaluate the merged network: a plain MLP, as deployed.
  Mlp merged;
  body->set_training(false);
  body->merged_into(merged);
  merged.l3 = head;
  r.val_acc = accuracy(merged, data.target_val);
  r.test_acc = accuracy(merged, data.target_test);
  r.seconds = since(t0);
  char line[200];
  std::snprintf(line, sizeof line, "%-24s loss %.3f | val %6.2f%% | test %6.2f%% | %5.1fs", run_name(spec).c_str(),
                r.final_loss, 100.0 * r.val_acc, 100.0 * r.test_acc, r.seconds);
  ctx.board->finish(slot, line, units_per_step * spec.steps);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Pretraining of the base network on the source task (cached: it is the same for every run).

void write_matrix(std::ofstream& f, const Mat& m) {
  f.write(reinterpret_cast<const char*>(m.data()), static_cast<std::streamsize>(m.size() * sizeof(float)));
}
void write_vector(std::ofstream& f, const Vec& v) {
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
}
bool read_matrix(std::ifstream& f, Mat& m) {
  return static_cast<bool>(
      f.read(reinterpret_cast<char*>(m.data()), static_cast<std::streamsize>(m.size() * sizeof(float))));
}
bool read_vector(std::ifstream& f, Vec& v) {
  return static_cast<bool>(
      f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float))));
}

Mlp pretrain(const Task& source, Index hidden, int steps, double lr, const std::string& cache, Board& board,
             bool* from_cache) {
  Rng rng(42);
  Mlp net;
  net.init(source.x.cols(), hidden, source.classes, rng);
  if (!cache.empty()) {
    std::ifstream f(cache, std::ios::binary);
    if (f && read_matrix(f, net.l1.W) && read_vector(f, net.l1.b) && read_matrix(f, net.l2.W) &&
        read_vector(f, net.l2.b) && read_matrix(f, net.l3.W) && read_vector(f, net.l3.b) &&
        f.peek() == std::char_traits<char>::eof()) {
      *from_cache = true;
      return net;
    }
    net.init(source.x.cols(), hidden, source.classes, rng);
  }
  *from_cache = false;
  AdamW opt;
  opt.add(net.l1);
  opt.add(net.l2);
  opt.add(net.l3);
  Batches batches(source.size(), 128, 99);
  Mat xb, z1, z2, logits, dlogits, da2, da1;
  std::vector<int> yb;
  double loss_avg = 0, acc_avg = 0;
  board.plan(steps, 1);
  board.begin(0, "pretraining the base");
  for (int step = 0; step < steps; ++step) {
    batches.next(source, xb, yb);
    for (Dense* d : {&net.l1, &net.l2, &net.l3}) {
      d->gW.setZero();
      d->gb.setZero();
    }
    net.l1.forward(xb, z1);
    relu(z1);
    net.l2.forward(z1, z2);
    relu(z2);
    net.l3.forward(z2, logits);
    Index correct = 0;
    const double loss = softmax_xent(logits, yb.data(), dlogits, correct);
    net.l3.backward(z2, dlogits, &da2);
    relu_backward(z2, da2);
    net.l2.backward(z1, da2, &da1);
    relu_backward(z1, da1);
    net.l1.backward(xb, da1, nullptr);
    opt.step(schedule(lr, step, steps));
    const double k = step == 0 ? 1.0 : 0.02;
    loss_avg += k * (loss - loss_avg);
    acc_avg += k * (static_cast<double>(correct) / 128.0 - acc_avg);
    board.update(0, step + 1, steps, loss_avg, acc_avg, step + 1);
  }
  board.clear();
  if (!cache.empty()) {
    std::ofstream f(cache, std::ios::binary);
    write_matrix(f, net.l1.W);
    write_vector(f, net.l1.b);
    write_matrix(f, net.l2.W);
    write_vector(f, net.l2.b);
    write_matrix(f, net.l3.W);
    write_vector(f, net.l3.b);
  }
  return net;
}

// ---------------------------------------------------------------------------------------------
// Sweep bookkeeping, table, CSV, plot.

struct Setting {
  Method method;
  Index rank;
  std::vector<RunResult> lr_search;  // seed 0 at every learning rate
  double best_lr = 0;
  std::vector<RunResult> runs;  // every seed at best_lr (seed 0's run is the search's)
  Index trainable = 0;
  double mean = 0, stddev = 0;
};

void summarize(Setting& s) {
  const double n = static_cast<double>(s.runs.size());
  double sum = 0, sq = 0;
  for (const RunResult& r : s.runs) sum += r.test_acc;
  s.mean = sum / n;
  for (const RunResult& r : s.runs) sq += (r.test_acc - s.mean) * (r.test_acc - s.mean);
  s.stddev = s.runs.size() > 1 ? std::sqrt(sq / (n - 1.0)) : 0.0;  // sample standard deviation
}

std::vector<double> parse_doubles(const std::string& s) {
  std::vector<double> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stod(item));
  if (out.empty()) throw std::invalid_argument("empty list: " + s);
  return out;
}

std::string with_commas(Index n) {
  std::string s = std::to_string(n);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<std::size_t>(i), ",");
  return s;
}

std::string table(const std::vector<Setting>& settings, int seeds) {
  std::ostringstream out;
  char line[256];
  std::snprintf(line, sizeof line, "%-10s %5s %17s %8s  %-24s %s\n", "method", "rank", "trainable params", "best lr",
                ("test accuracy (" + std::to_string(seeds) + " seeds)").c_str(), "DoRA - LoRA (paired)");
  out << line;
  out << std::string(100, '-') << "\n";
  std::map<Index, const Setting*> lora;
  for (const Setting& s : settings)
    if (s.method == Method::lora) lora[s.rank] = &s;
  for (const Setting& s : settings) {
    std::string diff;
    if (s.method == Method::dora && lora.count(s.rank) != 0) {
      // Same seed, same head, same A initialisation and batch order: the per-seed differences
      // are paired, and their spread says how much of the gap is seed noise.
      const Setting& l = *lora[s.rank];
      std::vector<double> d;
      for (const RunResult& a : s.runs)
        for (const RunResult& b : l.runs)
          if (a.spec.seed == b.spec.seed) d.push_back(a.test_acc - b.test_acc);
      double mean = 0, sq = 0;
      for (double v : d) mean += v / static_cast<double>(d.size());
      for (double v : d) sq += (v - mean) * (v - mean);
      const double sd = d.size() > 1 ? std::sqrt(sq / static_cast<double>(d.size() - 1)) : 0.0;
      char buf[48];
      std::snprintf(buf, sizeof buf, "%+.2f +- %.2f", 100.0 * mean, 100.0 * sd);
      diff = buf;
    }
    char acc[64];
    std::snprintf(acc, sizeof acc, "%6.2f%% +- %.2f", 100.0 * s.mean, 100.0 * s.stddev);
    std::snprintf(line, sizeof line, "%-10s %5s %17s %8.0e  %-24s %s\n", method_name(s.method),
                  s.rank > 0 ? std::to_string(s.rank).c_str() : "-", with_commas(s.trainable).c_str(), s.best_lr, acc,
                  diff.c_str());
    out << line;
  }
  // The paper's third claim: DoRA at rank r against LoRA at rank 2r.
  std::map<Index, const Setting*> dora_by_rank;
  for (const Setting& s : settings)
    if (s.method == Method::dora) dora_by_rank[s.rank] = &s;
  bool header = false;
  for (const std::pair<const Index, const Setting*>& d : dora_by_rank) {
    if (lora.count(2 * d.first) == 0) continue;
    if (!header) out << "\nDoRA at half rank vs LoRA (difference of mean test accuracy, points):\n", header = true;
    const Setting& l = *lora[2 * d.first];
    std::snprintf(line, sizeof line, "  DoRA r=%-2ld (%s params) vs LoRA r=%-2ld (%s params): %+.2f\n",
                  static_cast<long>(d.first), with_commas(d.second->trainable).c_str(), static_cast<long>(2 * d.first),
                  with_commas(l.trainable).c_str(), 100.0 * (d.second->mean - l.mean));
    out << line;
  }
  return out.str();
}

void write_csvs(const std::string& dir, const std::vector<Setting>& settings) {
  std::ofstream summary(dir + "/results.csv");
  summary << "method,rank,trainable_params,best_lr,seeds,test_acc_mean,test_acc_std,test_accs\n";
  std::ofstream runs(dir + "/runs.csv");
  runs << "method,rank,lr,seed,steps,trainable_params,final_train_loss,val_acc,test_acc,seconds,lr_search\n";
  for (const Setting& s : settings) {
    summary << method_key(s.method) << ',' << s.rank << ',' << s.trainable << ',' << s.best_lr << ',' << s.runs.size()
            << ',' << s.mean << ',' << s.stddev << ',';
    for (std::size_t i = 0; i < s.runs.size(); ++i) summary << (i ? ";" : "") << s.runs[i].test_acc;
    summary << '\n';
    std::vector<const RunResult*> all;
    for (const RunResult& r : s.lr_search) all.push_back(&r);
    for (const RunResult& r : s.runs)
      if (r.spec.seed != 0) all.push_back(&r);
    for (const RunResult* r : all) {
      runs << method_key(s.method) << ',' << s.rank << ',' << r->spec.lr << ',' << r->spec.seed << ',' << r->spec.steps
           << ',' << r->trainable << ',' << r->final_loss << ',' << r->val_acc << ',' << r->test_acc << ','
           << r->seconds << ',' << (r->spec.seed == 0 ? 1 : 0) << '\n';
    }
  }
}

// Accuracy against rank (log2 axis) with error bars, head-only and full fine-tuning as lines.
bool plot(const std::string& dir, const std::vector<Setting>& settings, const std::string& title) {
  const std::string dat = dir + "/plot.dat";
  {
    std::ofstream f(dat);
    for (Method m : {Method::lora, Method::dora}) {
      f << "# " << method_name(m) << ": rank mean std (percent)\n";
      for (const Setting& s : settings)
        if (s.method == m) f << s.rank << ' ' << 100.0 * s.mean << ' ' << 100.0 * s.stddev << '\n';
      f << "\n\n";
    }
  }
  double head = 0, head_sd = 0, full = 0, full_sd = 0;
  Index max_rank = 1, min_rank = 1 << 20;
  for (const Setting& s : settings) {
    if (s.method == Method::head) head = 100.0 * s.mean, head_sd = 100.0 * s.stddev;
    if (s.method == Method::full) full = 100.0 * s.mean, full_sd = 100.0 * s.stddev;
    if (s.rank > 0) max_rank = std::max(max_rank, s.rank), min_rank = std::min(min_rank, s.rank);
  }
  FILE* gp = popen("gnuplot 2>&1", "w");
  if (gp == nullptr) return false;
  std::fprintf(gp,
               "set terminal pngcairo size 900,640 font 'sans,11' enhanced\n"
               "set encoding utf8\n"
               "set output '%s/rank_accuracy.png'\n"
               "set title \"%s\" noenhanced\n"
               "set logscale x 2\n"
               "set xrange [%g:%g]\n"
               "set xtics (",
               dir.c_str(), title.c_str(), static_cast<double>(min_rank) / 1.5, static_cast<double>(max_rank) * 1.5);
  bool first = true;
  for (const Setting& s : settings)
    if (s.method == Method::lora)
      std::fprintf(gp, "%s\"%ld\" %ld", first ? "" : ", ", static_cast<long>(s.rank), static_cast<long>(s.rank)),
          first = false;
  std::fprintf(
      gp,
      ")\n"
      "set xlabel 'rank r (every hidden layer)'\n"
      "set ylabel 'target test accuracy (%%), mean ± std over seeds'\n"
      "set key outside below center horizontal maxrows 2 width 2\n"
      "set grid\n"
      "plot %g with lines lw 2 dt 2 lc rgb '#2ca02c' title sprintf('full fine-tuning (%%.2f ± %%.2f)', %g, %g), \\\n"
      "     %g with lines lw 2 dt 3 lc rgb '#7f7f7f' title sprintf('new head only (%%.2f ± %%.2f)', %g, %g), \\\n"
      "     '%s' index 0 using 1:2:3 with yerrorlines lw 2 pt 7 ps 1.2 lc rgb '#1f77b4' title 'LoRA', \\\n"
      "     '%s' index 1 using 1:2:3 with yerrorlines lw 2 pt 5 ps 1.2 lc rgb '#d62728' title 'DoRA'\n",
      full, full, full_sd, head, head, head_sd, dat.c_str(), dat.c_str());
  return pclose(gp) == 0;
}

bool make_dirs(const std::string& path) {
  std::string sofar;
  std::stringstream ss(path);
  std::string part;
  if (!path.empty() && path[0] == '/') sofar = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    sofar += part + "/";
    if (mkdir(sofar.c_str(), 0755) != 0 && errno != EEXIST) return false;
  }
  return true;
}

struct Options {
  bool full = false, plot = true, cache = true;
  std::string out = "build/demo", data = "/usr/share/datasets/fashion-mnist", task = "split";
  std::vector<Index> ranks;
  std::vector<double> lrs;
  int seeds = 0, steps = 0, pretrain_steps = 0, threads = 1;
  Index hidden = 256, target_train = 0;
};

void usage() {
  std::printf(
      "usage: fashion_mnist [options]\n"
      "  --full            the full sweep: 5 seeds, 5 learning rates, 1000 steps (~5-10 min on 2 cores)\n"
      "  --out DIR         where the CSVs, the plot and the cached base go (default build/demo)\n"
      "  --data DIR        folder with the Fashion-MNIST *-ubyte.gz files (default /usr/share/datasets/fashion-mnist)\n"
      "  --ranks LIST      e.g. 1,2,4,8,16,32\n"
      "  --seeds N         seeds per setting\n"
      "  --steps N         fine-tuning steps per run (batch 128)\n"
      "  --lrs LIST        learning rates searched per setting, e.g. 1e-3,4e-3\n"
      "  --task NAME       split (default), rot-split or rot90: the source -> target shift\n"
      "  --threads N       runs trained in parallel (default: OMP_NUM_THREADS or the core count)\n"
      "  --no-plot         skip gnuplot\n"
      "  --no-cache        pretrain the base even if a cached one is in --out\n");
}

Options parse(int argc, char** argv) {
  Options o;
#ifdef _OPENMP
  o.threads = omp_get_max_threads();  // OMP_NUM_THREADS, or the number of cores
#endif
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {  // not an Eigen expression
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--full")
      o.full = true;
    else if (a == "--out")
      o.out = value();
    else if (a == "--data")
      o.data = value();
    else if (a == "--task")
      o.task = value();
    else if (a == "--ranks") {
      o.ranks.clear();
      for (double r : parse_doubles(value())) o.ranks.push_back(static_cast<Index>(r));
    } else if (a == "--seeds")
      o.seeds = std::stoi(value());
    else if (a == "--steps")
      o.steps = std::stoi(value());
    else if (a == "--lrs")
      o.lrs = parse_doubles(value());
    else if (a == "--threads")
      o.threads = std::stoi(value());
    else if (a == "--no-plot")
      o.plot = false;
    else if (a == "--no-cache")
      o.cache = false;
    else if (a == "-h" || a == "--help")
      usage(), std::exit(0);
    else
      throw std::invalid_argument("unknown option " + a + " (--help lists them)");
  }
  // Defaults: the quick run fits in 3 minutes on 2 cores; --full is the whole sweep.
  if (o.ranks.empty()) o.ranks = {1, 2, 4, 8, 16, 32};
  if (o.seeds == 0) o.seeds = o.full ? 5 : 3;
  if (o.steps == 0) o.steps = o.full ? 1000 : 400;
  // The best learning rate moves with the method (a new head alone wants ~1e-1, rank-32 adapters
  // ~3e-3 with alpha = 2r): the grid spans all of them, and every method searches the same grid.
  if (o.lrs.empty())
    o.lrs = o.full ? std::vector<double>{1e-3, 3e-3, 1e-2, 3e-2, 1e-1} : std::vector<double>{3e-3, 1e-2, 3e-2, 1e-1};
  if (o.threads < 1) o.threads = 1;
  o.pretrain_steps = 1000;
  o.target_train = 1 << 30;
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  Shift shift;
  try {
    opt = parse(argc, argv);
    shift = make_shift(opt.task);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
    return 2;
  }
  const Clock::time_point start = Clock::now();
  const bool tty = isatty(fileno(stdout)) != 0;
  // Each run uses one thread (see the sweep below); the pretraining is one run too.
  Eigen::setNbThreads(1);

  const Data data = make_data(opt.data, shift, 5000, opt.target_train);
  if (!make_dirs(opt.out)) {
    std::fprintf(stderr, "fashion_mnist: cannot create %s: %s\n", opt.out.c_str(), std::strerror(errno));
    return 2;
  }

  std::printf("Fashion-MNIST: LoRA vs DoRA on a shifted task (Eigen %d.%d.%d, %d runs in parallel)\n",
              EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION, opt.threads);
  std::printf("  base   : MLP 784-%ld-%ld-%d, ReLU, pretrained on %s (%ld images)\n", static_cast<long>(opt.hidden),
              static_cast<long>(opt.hidden), shift.source_classes, shift.source_text.c_str(),
              static_cast<long>(data.source_train.size()));
  std::printf("  target : %s; %ld train, %ld validation, %ld test images\n", shift.target_text.c_str(),
              static_cast<long>(data.target_train.size()), static_cast<long>(data.target_val.size()),
              static_cast<long>(data.target_test.size()));
  std::string ranks_text, lrs_text;
  for (Index r : opt.ranks) ranks_text += (ranks_text.empty() ? "" : ",") + std::to_string(r);
  for (double lr : opt.lrs) {
    char b[16];
    std::snprintf(b, sizeof b, "%s%.0e", lrs_text.empty() ? "" : ",", lr);
    lrs_text += b;
  }
  std::printf(
      "  methods: new head only; LoRA and DoRA (alpha = 2r) on both hidden layers + new head, ranks %s; full "
      "fine-tuning\n",
      ranks_text.c_str());
  std::printf(
      "  budget : AdamW (wd 0.01), %d steps of batch 128, warm-up + cosine; lr picked from {%s} on validation (seed "
      "0);\n"
      "           then %d seeds at that lr; test accuracy of the merged network\n",
      opt.steps, lrs_text.c_str(), opt.seeds);
  if (!opt.full)
    std::printf(
        "  quick run (about 1.5 min on 2 cores): %d seeds, %zu learning rates, %d steps per run.\n"
        "  --full runs 5 seeds, 5 learning rates (1e-3..1e-1), 1000 steps per run.\n",
        opt.seeds, opt.lrs.size(), opt.steps);
  std::printf("\n");

  char cache_name[128];
  std::snprintf(cache_name, sizeof cache_name, "/base_%s_h%ld_s%d.bin", shift.name.c_str(),
                static_cast<long>(opt.hidden), opt.pretrain_steps);
  bool cached = false;
  const Clock::time_point t_pre = Clock::now();
  Board pre_board(tty, 1);
  const Mlp base = pretrain(data.source_train, opt.hidden, opt.pretrain_steps, 2e-3,
                            opt.cache ? opt.out + cache_name : std::string(), pre_board, &cached);
  std::printf("base network: %s in %.1fs\n", cached ? ("loaded from " + opt.out + cache_name).c_str() : "pretrained",
              since(t_pre));

  Features features;
  features.train = features_of(base, data.target_train);
  features.val = features_of(base, data.target_val);
  features.test = features_of(base, data.target_test);

  std::vector<Setting> settings;
  settings.push_back({Method::head, 0, {}, 0, {}, 0, 0, 0});
  for (Index r : opt.ranks) settings.push_back({Method::lora, r, {}, 0, {}, 0, 0, 0});
  for (Index r : opt.ranks) settings.push_back({Method::dora, r, {}, 0, {}, 0, 0, 0});
  settings.push_back({Method::full, 0, {}, 0, {}, 0, 0, 0});
  // Order in the table: head, then LoRA/DoRA by rank, then full.
  std::stable_sort(settings.begin(), settings.end(), [](const Setting& a, const Setting& b) {
    const int ka = a.method == Method::head ? 0 : a.method == Method::full ? 2 : 1;
    const int kb = b.method == Method::head ? 0 : b.method == Method::full ? 2 : 1;
    return ka != kb ? ka < kb : a.rank < b.rank;
  });

  // Runs are independent, so they go in parallel, one per thread, each with single-threaded Eigen:
  // batch-128 products are too small to split well, and OpenMP's spinning barriers inside every
  // product collapse when the cores are shared. Every run's numbers are the same whatever the
  // thread count or the order the runs finish in.
  const int runs_per_setting = static_cast<int>(opt.lrs.size()) + opt.seeds - 1;
  double total_units = 0;
  for (const Setting& s : settings) total_units += method_cost(s.method) * opt.steps * runs_per_setting;
  Board board(tty, opt.threads);
  board.plan(total_units, runs_per_setting * static_cast<int>(settings.size()));
  Context ctx;
  ctx.data = &data;
  ctx.base = &base;
  ctx.features = &features;
  ctx.board = &board;

  // Phase 1, the learning-rate search: every setting at every lr with seed 0. Phase 2: the other
  // seeds at each setting's best lr (best validation accuracy).
  for (int phase = 1; phase <= 2; ++phase) {
    std::vector<RunSpec> specs;
    std::vector<std::size_t> owner;
    for (std::size_t i = 0; i < settings.size(); ++i) {
      Setting& s = settings[i];
      RunSpec spec;
      spec.method = s.method;
      spec.rank = s.rank;
      spec.steps = opt.steps;
      if (phase == 1) {
        for (double lr : opt.lrs) spec.lr = lr, specs.push_back(spec), owner.push_back(i);
      } else {
        const RunResult* best = &s.lr_search[0];
        for (const RunResult& r : s.lr_search)
          if (r.val_acc > best->val_acc) best = &r;
        s.best_lr = best->spec.lr;
        s.trainable = best->trainable;
        s.runs.push_back(*best);
        for (int seed = 1; seed < opt.seeds; ++seed)
          spec.lr = s.best_lr, spec.seed = seed, specs.push_back(spec), owner.push_back(i);
      }
    }
    // Costliest first, so that no long run starts last while the other thread idles.
    std::vector<std::size_t> order(specs.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) {
      // The rank adds (d_in + d_out) r to a layer's d_in d_out work: about r / 256 here.
      return method_cost(specs[x].method) * (1.0 + static_cast<double>(specs[x].rank) / 256.0) >
             method_cost(specs[y].method) * (1.0 + static_cast<double>(specs[y].rank) / 256.0);
    });
    std::vector<RunResult> results(specs.size());
    std::string error;
    const long n_specs = static_cast<long>(specs.size());
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(opt.threads)
#endif
    for (long k = 0; k < n_specs; ++k) {
      const std::size_t i = order[static_cast<std::size_t>(k)];
      int slot = 0;
#ifdef _OPENMP
      slot = omp_get_thread_num();
#endif
      try {
        results[i] = train_run(specs[i], ctx, slot);
      } catch (const std::exception& e) {
#ifdef _OPENMP
#pragma omp critical(demo_error)
#endif
        error = e.what();
      }
    }
    if (!error.empty()) {
      board.clear();
      std::fprintf(stderr, "fashion_mnist: %s\n", error.c_str());
      return 1;
    }
    for (std::size_t i = 0; i < specs.size(); ++i)
      (phase == 1 ? settings[owner[i]].lr_search : settings[owner[i]].runs).push_back(results[i]);
  }
  board.clear();
  for (Setting& s : settings) summarize(s);

  const std::string text = table(settings, opt.seeds);
  std::printf("\nTarget task test accuracy (%ld images), merged networks:\n\n%s",
              static_cast<long>(data.target_test.size()), text.c_str());
  {
    std::ofstream f(opt.out + "/table.txt");
    f << "Fashion-MNIST " << (opt.full ? "full sweep" : "quick run") << ": source " << shift.source_text
      << " -> target " << shift.target_text << "\n"
      << opt.steps << " AdamW steps of batch 128 per run; lr from {" << lrs_text << "} on validation (seed 0); "
      << opt.seeds << " seeds; mean +- sample std of test accuracy\n\n"
      << text;
  }
  write_csvs(opt.out, settings);
  std::string plotted = "";
  if (opt.plot) {
    char title[256];
    std::snprintf(title, sizeof title, "Fashion-MNIST, %s -> %s: %d seeds, %d steps",
                  shift.name == "split" ? "classes 0-4" : "source", shift.name == "split" ? "classes 5-9" : "target",
                  opt.seeds, opt.steps);
    if (plot(opt.out, settings, title))
      plotted = ", " + opt.out + "/rank_accuracy.png";
    else
      std::printf("(gnuplot failed or is missing: apt-get install gnuplot-nox; the data is in %s/plot.dat)\n",
                  opt.out.c_str());
  }
  std::printf("\nwrote %s/results.csv, %s/runs.csv, %s/table.txt%s\n", opt.out.c_str(), opt.out.c_str(),
              opt.out.c_str(), plotted.c_str());
  std::printf("total time %s\n", format_duration(since(start)).c_str());
  return 0;
}
