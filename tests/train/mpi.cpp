// Data-parallel training over MPI (dora/mpi/data_parallel.hpp). Run on any number of ranks
// (ctest runs it with mpiexec -np 2): every rank also computes, alone, what one process would do
// with the whole global batch, and checks that the ranks together reproduce it.
#define CATCH_CONFIG_RUNNER
// clang-format off: no_malloc.hpp must come before any header that includes Eigen
#include "no_malloc.hpp"
// clang-format on
#include <catch2/catch.hpp>
#include <dora/mpi/data_parallel.hpp>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace dora_test;
using dora::mpi::DataParallel;

namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int k = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &k);
  return k;
}

dora::AdapterConfig config(double dropout) {
  dora::AdapterConfig c;
  c.rank = 4;
  c.alpha = 8;
  c.dropout = dropout;
  c.seed = 11;
  return c;
}

std::vector<dora::Parameter<double>> concat(dora::DoraLinear<double>& a, dora::DoraLinear<double>& b) {
  std::vector<dora::Parameter<double>> all = a.parameters();
  for (const dora::Parameter<double>& p : b.parameters()) all.push_back(p);
  return all;
}

}  // namespace

TEST_CASE("allreduce_gradients: the mean (and the sum) of every rank's gradients, in one fused buffer", "[mpi]") {
  const int k = world_size(), r = world_rank();
  const Mat<double> W = random_matrix<double>(7, 5, 1);
  dora::DoraLinear<double> a(dora::borrow(W), config(0.0)), b(dora::borrow(W), config(0.0));
  DataParallel<double> dp(concat(a, b));
  CHECK(dp.rank() == r);
  CHECK(dp.size() == k);
  CHECK(dp.numel() == 2 * (4 * 5 + 7 * 4 + 7));
  // Rank q's gradient entry i is (q + 1) * (i + 1): small integers, so the mean is exact.
  const auto fill = [&](int q) {
    double i = 1;
    for (dora::Parameter<double>& p : concat(a, b))
      for (Eigen::Index j = 0; j < p.grad.size(); ++j) p.grad[j] = (q + 1) * i++;
  };
  fill(r);
  dp.allreduce_gradients();
  double err = 0, i = 1;
  const double factor = (k + 1) / 2.0;  // mean of 1..k
  for (dora::Parameter<double>& p : concat(a, b))
    for (Eigen::Index j = 0; j < p.grad.size(); ++j) err = std::max(err, std::abs(p.grad[j] - factor * i++));
  std::printf("allreduce mean over %d ranks: max error %.3g\n", k, err);
  CHECK(err == 0.0);
  fill(r);
  dp.allreduce_gradients(dora::mpi::Reduction::sum);
  CHECK(a.grad_lora_A()(0, 0) == Approx(k * (k + 1) / 2.0));
  CHECK(dp.timing().allreduces == 2);
  CHECK(dp.timing().allreduce_seconds >= 0.0);
}

TEST_CASE("K ranks with K equal shares of a global batch take one process's step (DoRA, dropout, two layers)",
          "[mpi]") {
  const int k = world_size(), r = world_rank();
  const Eigen::Index rows = 3, global = rows * k;
  const Mat<double> W1 = random_matrix<double>(8, 6, 2), W2 = random_matrix<double>(5, 8, 3);
  const Mat<double> x = random_matrix<double>(global, 6, 4), dy = random_matrix<double>(global, 5, 5);
  // One process, the whole batch; loss = mean over rows, so dy / global.
  dora::DoraLinear<double> s1(dora::borrow(W1), config(0.3)), s2(dora::borrow(W2), config(0.2));
  s1.set_lora_B(random_matrix<double>(8, 4, 6, 0.1));
  s2.set_lora_B(random_matrix<double>(5, 4, 7, 0.1));
  s2.forward(s1.forward(x));
  s1.backward(s2.backward(dy / static_cast<double>(global)));

  // This rank, its rows only; loss = mean over its rows, then the mean over the ranks.
  dora::DoraLinear<double> l1(dora::borrow(W1), config(0.3)), l2(dora::borrow(W2), config(0.2));
  if (r == 0) {  // made unlike rank 0 elsewhere, then broadcast
    l1.set_lora_B(random_matrix<double>(8, 4, 6, 0.1));
    l2.set_lora_B(random_matrix<double>(5, 4, 7, 0.1));
  }
  DataParallel<double> dp(concat(l1, l2));
  dp.broadcast_parameters();
  dp.check_parameters_identical();
  dp.dropout_begin(l1, rows);
  dp.dropout_begin(l2, rows);
  l2.forward(l1.forward(x.middleRows(r * rows, rows)));
  dp.dropout_end(l1, rows);
  dp.dropout_end(l2, rows);
  l1.backward(l2.backward(dy.middleRows(r * rows, rows) / static_cast<double>(rows)));
  dp.allreduce_gradients();

  // The masks are this rank's rows of the single process's, and the streams end where its end.
  const double mask_err = rel_err(l1.dropout_mask(), s1.dropout_mask().middleRows(r * rows, rows)) +
                          rel_err(l2.dropout_mask(), s2.dropout_mask().middleRows(r * rows, rows));
  CHECK(mask_err == 0.0);
  CHECK(l1.dropout_state() == s1.dropout_state());
  CHECK(l2.dropout_state() == s2.dropout_state());
  double err = 0;
  std::vector<dora::Parameter<double>> mine = concat(l1, l2), one = concat(s1, s2);
  for (std::size_t i = 0; i < mine.size(); ++i) err = std::max(err, rel_err(mine[i].grad, one[i].grad));
  std::printf("rank %d of %d: gradients vs one process on the global batch: max rel error %.3g\n", r, k, err);
  CHECK(err < 1e-13);
}

TEST_CASE("broadcast_parameters from any root: every rank ends with that rank's values", "[mpi]") {
  const int k = world_size(), r = world_rank();
  const Mat<double> W = random_matrix<double>(7, 5, 1);
  dora::DoraLinear<double> a(dora::borrow(W), config(0.0)), b(dora::borrow(W), config(0.0));
  DataParallel<double> dp(concat(a, b));
  // Rank q's parameter entry i is 1000 q + i: whose values arrived is readable from any entry.
  const auto fill = [&](int q) {
    double i = 0;
    for (dora::Parameter<double>& p : concat(a, b))
      for (Eigen::Index j = 0; j < p.value.size(); ++j) p.value[j] = 1000.0 * q + i++;
  };
  for (int root = k - 1; root >= 0; --root) {
    fill(r);
    dp.broadcast_parameters(root);
    double err = 0, i = 0;
    for (dora::Parameter<double>& p : concat(a, b))
      for (Eigen::Index j = 0; j < p.value.size(); ++j)
        err = std::max(err, std::abs(p.value[j] - (1000.0 * root + i++)));
    std::printf("broadcast_parameters from root %d of %d on rank %d: max difference from the root's values %.3g\n",
                root, k, r, err);
    CHECK(err == 0.0);
    // The gradients are not touched.
    CHECK(a.grad_lora_A().isZero(0.0));
  }
  CHECK_THROWS_WITH(dp.broadcast_parameters(k), Catch::Contains("root must be in [0, " + std::to_string(k)));
}

TEST_CASE("A rank whose parameters drifted is named on every rank; different models are refused", "[mpi][errors]") {
  const int k = world_size(), r = world_rank();
  const Mat<double> W = random_matrix<double>(6, 4, 8);
  dora::DoraLinear<double> a(dora::borrow(W), config(0.0)), b(dora::borrow(W), config(0.0));
  DataParallel<double> dp(concat(a, b));
  dp.check_parameters_identical();
  if (k > 1) {
    if (r == k - 1) b.lora_B()(2, 1) += 1e-12;  // one value of one tensor, on one rank
    try {
      dp.check_parameters_identical();
      FAIL("a drifted parameter was not detected");
    } catch (const dora::mpi::Error& e) {
      const std::string what = e.what();
      INFO(what);
      CHECK(what.find("tensor #4 ('lora_B'") != std::string::npos);
      CHECK(what.find("rank 0") != std::string::npos);
      CHECK(what.find("rank " + std::to_string(k - 1)) != std::string::npos);
    }
  }
  // Rank 0 has the layer's 3 tensors, the others 2 of them.
  dora::DoraLinear<double> c(dora::borrow(W), config(0.0));
  std::vector<dora::Parameter<double>> params = c.parameters();
  params.pop_back();
  if (k > 1) {
    try {
      DataParallel<double> bad(r == 0 ? c.parameters() : params);
      FAIL("different models were accepted");
    } catch (const dora::mpi::Error& e) {
      const std::string what = e.what();
      INFO(what);
      CHECK(what.find("the ranks' models differ: 2 to 3 trainable tensors") != std::string::npos);
    }
    // Same number of tensors and of values, different shapes: 3 + 5 on rank 0, 5 + 3 elsewhere.
    std::vector<double> values(8), grads(8);
    const Eigen::Index first = r == 0 ? 3 : 5;
    std::vector<dora::Parameter<double>> shuffled{
        {"lora_A", {values.data(), first}, {grads.data(), first}},
        {"lora_B", {values.data() + first, 8 - first}, {grads.data() + first, 8 - first}}};
    try {
      DataParallel<double> bad(shuffled);
      FAIL("models with different shapes were accepted");
    } catch (const dora::mpi::Error& e) {
      const std::string what = e.what();
      INFO(what);
      CHECK(what.find("(same totals, different shapes)") != std::string::npos);
    }
  }
}

TEST_CASE("allreduce_gradients and check_parameters_identical allocate nothing (Eigen's heap forbidden)", "[mpi]") {
  const Mat<float> W = random_matrix<float>(64, 48, 9);
  dora::DoraLinear<float> a(dora::borrow(W), config(0.0)), b(dora::borrow(W), config(0.0));
  std::vector<dora::Parameter<float>> params = a.parameters();
  for (const dora::Parameter<float>& p : b.parameters()) params.push_back(p);
  DataParallel<float> dp(params);
  dp.allreduce_gradients();  // buffers are made by the constructor; this is already steady state
  Eigen::internal::set_is_malloc_allowed(false);
  bool threw = false;
  try {
    for (int i = 0; i < 3; ++i) {
      dp.allreduce_gradients();
      dp.check_parameters_identical();
    }
  } catch (const std::runtime_error&) {
    threw = true;
  }
  Eigen::internal::set_is_malloc_allowed(true);
  CHECK_FALSE(threw);
  // The guard fires: an Eigen allocation under it throws.
  Eigen::internal::set_is_malloc_allowed(false);
  bool fired = false;
  try {
    Mat<float> m(8, 8);
    m.setZero();
  } catch (const std::runtime_error&) {
    fired = true;
  }
  Eigen::internal::set_is_malloc_allowed(true);
  CHECK(fired);
}

int main(int argc, char** argv) {
  dora::mpi::Environment env(argc, argv);
  Catch::Session session;
  const int rc = session.applyCommandLine(argc, argv);
  if (rc != 0) return rc;
  // Every rank runs every test; any rank's failure fails the run.
  int failed = session.run();
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return failed;
}
