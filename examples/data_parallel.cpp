// Data-parallel DoRA training over MPI on Fashion-MNIST (README, "Data-parallel training").
//
//   mpirun -np K data_parallel [--steps 100] [--stop N] [--batch 64] [--data DIR] [--save DIR] [--resume DIR]
//
// A frozen two-layer MLP 784-128-10 (random, seeded: the "pretrained" weights every rank borrows
// from its own copy) is adapted with DoRA (r = 8, dropout 0.1) on both layers; AdamW with parameter
// groups, gradient clipping, warm-up + cosine. Each step's global batch (--batch rows, in a seeded
// order of the training set) is split into K equal shares, one per rank; dora::mpi::DataParallel
// averages the gradients, and each rank draws exactly its rows of the global batch's dropout masks.
// The run therefore does not depend on K: mpirun -np 2 reproduces one process (up to the order of
// floating-point sums). Rank 0 alone writes checkpoints (--save, after step --stop of a schedule of
// --steps), which resume on any K (--resume).
//
// Ends by printing one line: final_loss=<the last step's global mean loss> params_checksum=<the sum
// of every trainable value, checked identical on every rank>.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <dora/dora.hpp>
#include <dora/io/io.hpp>
#include <dora/mpi/data_parallel.hpp>
#include <memory>
#include <string>
#include <vector>

#include "fashion_mnist_data.hpp"

namespace {

using Index = Eigen::Index;
using Mat = dora::Matrix<float>;

struct Options {
  long steps = 100;  // the schedule's length
  long stop = -1;    // stop (and --save) after this step; default: steps
  Index batch = 64;
  std::string data = fashion_mnist_data::kDefaultDir, save, resume;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--steps") {
      o.steps = std::stol(value());
    } else if (a == "--stop") {
      o.stop = std::stol(value());
    } else if (a == "--batch") {
      o.batch = std::stol(value());
    } else if (a == "--data") {
      o.data = value();
    } else if (a == "--save") {
      o.save = value();
    } else if (a == "--resume") {
      o.resume = value();
    } else {
      throw std::invalid_argument("unknown option " + a +
                                  " (options: --steps N --stop N --batch N --data DIR --save DIR --resume DIR)");
    }
  }
  if (o.stop < 0) o.stop = o.steps;
  if (o.steps < 1 || o.batch < 1 || o.stop < 1 || o.stop > o.steps)
    throw std::invalid_argument("need --steps >= 1, --batch >= 1 and 1 <= --stop <= --steps");
  return o;
}

// Frozen weights, the same on every rank (same seed), scaled as torch's default Linear init.
Mat frozen(Index out, Index in, std::uint64_t seed) {
  dora::detail::Rng rng(seed);
  Mat W(out, in);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  for (Index i = 0; i < W.size(); ++i) W.data()[i] = static_cast<float>(rng.uniform(-bound, bound));
  return W;
}

int run(const Options& o) {
  const fashion_mnist_data::Images train = fashion_mnist_data::load_split(o.data, "train", "data_parallel");
  const Mat W1 = frozen(128, 784, 1), W2 = frozen(10, 128, 2);
  dora::AdapterConfig config;
  config.rank = 8;
  config.alpha = 16;
  config.dropout = 0.1;

  // The adapters: new (seeded alike on every rank) or every rank reads rank 0's checkpoint.
  std::unique_ptr<dora::DoraLinear<float>> l1, l2;
  if (o.resume.empty()) {
    config.seed = 10;
    l1 = std::make_unique<dora::DoraLinear<float>>(dora::borrow(W1), config);
    config.seed = 20;
    l2 = std::make_unique<dora::DoraLinear<float>>(dora::borrow(W2), config);
  } else {
    const dora::io::PeftAdapter adapter(o.resume + "/adapter");
    l1 = std::make_unique<dora::DoraLinear<float>>(adapter.make_dora("fc1", dora::borrow(W1)));
    l2 = std::make_unique<dora::DoraLinear<float>>(adapter.make_dora("fc2", dora::borrow(W2)));
    l1->train();
    l2->train();
  }
  std::vector<dora::Parameter<float>> params = l1->parameters();
  for (const dora::Parameter<float>& p : l2->parameters()) params.push_back(p);
  dora::AdamW<float> opt(dora::dora_parameter_groups(params, 2e-3, 0.01, /*b_lr_ratio=*/4.0));
  long start = 0;
  if (!o.resume.empty()) {
    const dora::io::TrainerState state = dora::io::load_checkpoint(o.resume, opt);
    l1->set_dropout_state(state.rng.at("fc1"));
    l2->set_dropout_state(state.rng.at("fc2"));
    start = state.step;
    if (start >= o.stop)
      throw std::invalid_argument("the checkpoint " + o.resume + " is at step " + std::to_string(start) +
                                  ", not before --stop " + std::to_string(o.stop));
  }
  dora::mpi::DataParallel<float> dp(opt.groups());
  dp.broadcast_parameters();  // a no-op here (seeded alike), and the rule for any other init
  if (o.batch % dp.size() != 0)
    throw std::invalid_argument("--batch " + std::to_string(o.batch) + " is not a multiple of the " +
                                std::to_string(dp.size()) + " ranks");
  const Index n = o.batch / dp.size(), first = dp.rank() * n;

  // The order of the training set: the same permutation on every rank.
  const Index N = train.x.rows();
  std::vector<Index> order(static_cast<std::size_t>(N));
  dora::detail::Rng shuffle(7);
  for (Index i = 0; i < N; ++i) order[i] = i;
  for (Index i = N - 1; i > 0; --i) std::swap(order[i], order[static_cast<Index>(shuffle.uniform() * (i + 1))]);

  const dora::WarmupCosine schedule{std::min(10L, o.steps / 2), o.steps, 0.1};
  Mat x(n, 784), h, logits, dlogits, dh;
  std::vector<int> y(static_cast<std::size_t>(n));
  double loss = 0;
  dp.reset_timing();
  const double t0 = MPI_Wtime();
  for (long step = start; step < o.stop; ++step) {
    for (Index i = 0; i < n; ++i) {  // this rank's rows of global batch `step`
      const Index row = order[static_cast<std::size_t>((step * o.batch + first + i) % N)];
      x.row(i) = train.x.row(row);
      y[i] = train.y[row];
    }
    dp.dropout_begin(*l1, n);
    dp.dropout_begin(*l2, n);
    h = l1->forward(x);
    h = h.cwiseMax(0.0f);
    logits = l2->forward(h);
    dp.dropout_end(*l1, n);
    dp.dropout_end(*l2, n);
    Index correct = 0;
    const double local = fashion_mnist_data::softmax_xent(logits, y.data(), dlogits, correct);  // this rank's rows
    opt.zero_grad();
    dh = l2->backward(dlogits);
    dh.array() *= (h.array() > 0.0f).cast<float>();
    l1->backward_parameters(dh);
    dp.allreduce_gradients();  // the mean of the ranks' mean losses: the global batch's mean
    dora::clip_grad_norm(opt.groups(), 1.0);
    opt.set_lr_factor(schedule(step));
    opt.step();
    loss = dp.mean(local);
    if (dp.is_root() && (step + 1) % 25 == 0) std::printf("step %4ld  loss %.4f\n", step + 1, loss);
  }
  const double total = MPI_Wtime() - t0;
  dp.check_parameters_identical();  // throws on every rank if a replica drifted
  if (!o.save.empty() && dp.is_root()) {
    dora::io::PeftAdapterWriter adapter;
    adapter.add("fc1", *l1);
    adapter.add("fc2", *l2);
    dora::io::save_checkpoint(o.save, adapter, opt,
                              {o.stop, {{"fc1", l1->dropout_state()}, {"fc2", l2->dropout_state()}}, {}});
  }
  MPI_Barrier(dp.comm());  // the checkpoint is complete before any rank goes on
  double checksum = 0;
  for (const dora::Parameter<float>& p : params) checksum += p.value.cast<double>().sum();
  if (dp.is_root()) {
    const long steps = std::max(1L, o.stop - start);
    std::printf("%d rank(s) x %ld rows: %.2f ms per step, of which %.3f ms allreduce of %ld values (%.1f%%)\n",
                dp.size(), static_cast<long>(n), 1e3 * total / steps, 1e3 * dp.timing().allreduce_seconds / steps,
                static_cast<long>(dp.numel()), 100.0 * dp.timing().allreduce_seconds / total);
    std::printf("final_loss=%.9g params_checksum=%.9g\n", loss, checksum);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  dora::mpi::Environment env(argc, argv);
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "data_parallel: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);  // the other ranks may be waiting in a collective
    return 1;
  }
}
