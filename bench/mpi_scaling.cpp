// Data-parallel scaling: one training step of a stack of DoRA layers (forward, backward,
// the fused gradient allreduce, AdamW) on K ranks x T threads, a fixed global batch split over the
// ranks. Run under mpirun; rank 0 prints one JSON line per configuration:
//   {"ranks":K,"threads":T,"step_ms":median,"wait_ms":median,"allreduce_ms":median,...}
// wait_ms: a barrier before the allreduce (the ranks' imbalance: noise, uneven cores), measured apart
// so that allreduce_ms is the communication alone; step_ms includes both.
// bench/run_device_mpi.sh runs K = 1, 2, 4, 8 with 16 / K threads each on the device's 16 cores.
// No dropout: with it, each rank would also skip (K - 1) / K of every mask's generator draws.
//
//   mpi_scaling [--width 4096] [--layers 4] [--rank 16] [--batch 512] [--steps 10] [--warmup 2]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <dora/dora.hpp>
#include <dora/mpi/data_parallel.hpp>
#include <memory>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using Index = Eigen::Index;
using Mat = dora::Matrix<float>;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  dora::mpi::Environment env(argc, argv);
  Index width = 4096, layers = 4, rank = 16, batch = 512, steps = 10, warmup = 2;
  if (argc % 2 == 0) {
    std::fprintf(stderr, "mpi_scaling: options come in pairs (--name value)\n");
    return 2;
  }
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const Index v = std::atol(argv[i + 1]);
    if (a == "--width")
      width = v;
    else if (a == "--layers")
      layers = v;
    else if (a == "--rank")
      rank = v;
    else if (a == "--batch")
      batch = v;
    else if (a == "--steps")
      steps = v;
    else if (a == "--warmup")
      warmup = v;
    else {
      std::fprintf(stderr, "mpi_scaling: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  // Every rank borrows its own copy of the frozen weights (a replica per process).
  std::vector<Mat> W;
  std::vector<std::unique_ptr<dora::DoraLinear<float>>> stack;
  std::vector<dora::Parameter<float>> params;
  dora::AdapterConfig config;
  config.rank = rank;
  config.alpha = 2.0 * static_cast<double>(rank);
  for (Index l = 0; l < layers; ++l) {
    std::srand(static_cast<unsigned>(l + 1));
    W.push_back(Mat::Random(width, width) * (1.0f / std::sqrt(static_cast<float>(width))));
  }
  for (Index l = 0; l < layers; ++l) {
    config.seed = static_cast<std::uint64_t>(l);
    stack.push_back(std::make_unique<dora::DoraLinear<float>>(dora::borrow(W[l]), config));
    for (const dora::Parameter<float>& p : stack.back()->parameters()) params.push_back(p);
  }
  dora::AdamW<float> opt(dora::dora_parameter_groups(params, 1e-4, 0.0));
  dora::mpi::DataParallel<float> dp(opt.groups());
  if (batch % dp.size() != 0) {
    if (dp.is_root()) std::fprintf(stderr, "mpi_scaling: --batch must be a multiple of the ranks\n");
    return 2;
  }
  const Index n = batch / dp.size();
  std::srand(100 + static_cast<unsigned>(dp.rank()));
  const Mat x = Mat::Random(n, width);
  std::vector<Mat> acts(static_cast<std::size_t>(layers + 1));
  Mat g;
  std::vector<double> step_ms, wait_ms, allreduce_ms;
  for (Index s = 0; s < warmup + steps; ++s) {
    MPI_Barrier(dp.comm());
    const double t0 = MPI_Wtime();
    const double a0 = dp.timing().allreduce_seconds;
    acts[0] = x;
    for (Index l = 0; l < layers; ++l) acts[l + 1] = stack[l]->forward(acts[l]);
    opt.zero_grad();
    g = acts[layers] * (1.0f / static_cast<float>(batch));  // d(sum of squares / 2 / global batch)
    for (Index l = layers - 1; l >= 0; --l) {
      if (l > 0) {
        g = stack[l]->backward(g);
      } else {
        stack[l]->backward_parameters(g);
      }
    }
    const double w0 = MPI_Wtime();
    MPI_Barrier(dp.comm());
    const double w1 = MPI_Wtime();
    dp.allreduce_gradients(dora::mpi::Reduction::sum);  // each rank's loss is already over the global batch
    opt.step();
    const double t1 = MPI_Wtime();
    if (s >= warmup) {
      step_ms.push_back(1e3 * (t1 - t0));
      wait_ms.push_back(1e3 * (w1 - w0));
      allreduce_ms.push_back(1e3 * (dp.timing().allreduce_seconds - a0));
    }
  }
  dp.check_parameters_identical();
  // The slowest rank's medians: a step is as slow as its slowest rank.
  double med[3] = {median(step_ms), median(wait_ms), median(allreduce_ms)};
  MPI_Allreduce(MPI_IN_PLACE, med, 3, MPI_DOUBLE, MPI_MAX, dp.comm());
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  if (dp.is_root())
    std::printf(
        "{\"ranks\":%d,\"threads\":%d,\"width\":%ld,\"layers\":%ld,\"rank\":%ld,\"global_batch\":%ld,"
        "\"step_ms\":%.3f,\"wait_ms\":%.3f,\"allreduce_ms\":%.3f,\"allreduce_bytes\":%ld}\n",
        dp.size(), threads, static_cast<long>(width), static_cast<long>(layers), static_cast<long>(rank),
        static_cast<long>(batch), med[0], med[1], med[2], static_cast<long>(dp.numel() * 4));
  return 0;
}
