// Links against dora::mpi: averages one gradient over the ranks (mpirun -np K consumer_mpi).
#include <cstdio>
#include <dora/mpi/data_parallel.hpp>

int main(int argc, char** argv) {
  dora::mpi::Environment env(argc, argv);
  dora::Vector<float> value = dora::Vector<float>::Zero(3), grad = dora::Vector<float>::Ones(3);
  std::vector<dora::Parameter<float>> params{{"lora_A", {value.data(), 3}, {grad.data(), 3}}};
  dora::mpi::DataParallel<float> dp(params);
  dp.allreduce_gradients();
  if (dp.is_root()) std::printf("consumer_mpi: %d rank(s), mean gradient %g\n", dp.size(), grad[0]);
  return grad[0] == 1.0f ? 0 : 1;
}
