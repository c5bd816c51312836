#pragma once
/// \file mpi/data_parallel.hpp
/// Data-parallel training over MPI (CMake target dora::mpi, built where MPI is found).
///
/// Every rank holds a replica of the model (the frozen weights borrowed from its own copy) and
/// computes the gradients of its share of a global batch; DataParallel then makes every replica take
/// the same optimizer step:
///   - allreduce_gradients(): all trainable gradients, packed into one fused buffer, summed over the
///     ranks by one MPI_Allreduce and divided by the number of ranks (the mean of the ranks' mean
///     losses is the global batch's mean loss when the shares are equal);
///   - broadcast_parameters(): rank 0's parameters to every rank, once after initialisation;
///   - check_parameters_identical(): a hash of every tensor compared across the ranks; a tensor that
///     differs is named, with two ranks that disagree on it, in an exception thrown on every rank
///     (never one rank throwing while the others wait);
///   - dropout_begin/dropout_end: each rank draws exactly its rows of the global batch's dropout masks
///     (equal shares; every layer type: each has skip_dropout_rows).
///
/// The seed discipline (docs/training.md): every rank uses the same seeds for everything (the
/// adapters' initialisation, the order of the data, the dropout streams) and takes rows
/// [rank * n, (rank + 1) * n) of each global batch of size * n rows. The run is then a function of
/// the global batch alone: K ranks reproduce one process up to the order of floating-point sums,
/// the dropout streams and the parameters are identical on every rank, and rank 0 alone writes the
/// checkpoints (dora::io::save_checkpoint), which resume on any number of ranks.
///
/// Threads: call these functions from the thread that initialised MPI (MPI_THREAD_FUNNELED, which
/// Environment requests and checks); each rank may run OpenMP threads in its own products. The
/// communicator is duplicated, so these collectives never match the caller's own messages.
///
/// Errors. Disagreements between ranks (different models, drifted parameters) are detected by a
/// collective, so every rank throws dora::mpi::Error together and may go on or stop. A failing MPI
/// call is not recoverable (the other ranks would wait in the collective forever): it prints its
/// message and calls MPI_Abort, which ends the job.

// MPI's C API only: the C++ bindings (removed in MPI-3) are skipped, which also spares their warnings.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../detail/adapter.hpp"
#include "../optim.hpp"

namespace dora::mpi {

/// A failed MPI call, or ranks that disagree (different models, drifted parameters).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <typename Scalar>
MPI_Datatype datatype();
template <>
inline MPI_Datatype datatype<float>() {
  return MPI_FLOAT;
}
template <>
inline MPI_Datatype datatype<double>() {
  return MPI_DOUBLE;
}

// A failed MPI call on this rank: the others may already wait in the collective, so nothing can be
// recovered; say what failed and end the job.
inline void check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  std::fprintf(stderr, "dora::mpi: %s failed: %.*s; aborting the job\n", call, length, text);
  MPI_Abort(MPI_COMM_WORLD, 1);
}

// 64-bit hash of a tensor's bytes (FNV-1a over 8-byte words with a final avalanche): equal tensors
// hash equal on every rank of one machine type, and a single changed bit changes the hash.
inline std::uint64_t hash_bytes(const void* data, std::size_t bytes) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  std::uint64_t h = 0xcbf29ce484222325ULL ^ bytes;
  std::size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    std::uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001b3ULL;
    h ^= h >> 29;
  }
  for (; i < bytes; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return h;
}

// Elementwise min over the ranks of [v, ~v]: the minimum and (complemented) the maximum of every
// entry with one collective.
inline void min_max(MPI_Comm comm, std::vector<std::uint64_t>& both) {
  check(MPI_Allreduce(MPI_IN_PLACE, both.data(), static_cast<int>(both.size()), MPI_UINT64_T, MPI_MIN, comm),
        "MPI_Allreduce (min)");
}

}  // namespace detail

/// MPI_Init_thread(FUNNELED) on construction, MPI_Finalize on destruction (if this object initialised
/// MPI and it is not finalized yet): `dora::mpi::Environment env(argc, argv);` first in main.
class Environment {
 public:
  Environment(int& argc, char**& argv) {
    int ready = 0;
    MPI_Initialized(&ready);
    if (ready != 0) return;
    int provided = 0;
    detail::check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    owner_ = true;
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      throw Error("dora::mpi::Environment: this MPI provides thread level " + std::to_string(provided) +
                  ", below MPI_THREAD_FUNNELED (needed: OpenMP threads run between MPI calls)");
    }
  }
  /// MPI_Finalize, unless an exception is propagating: finalizing is collective, and ranks that did
  /// not throw would wait for this one (catch, report and MPI_Abort instead).
  ~Environment() {
    int done = 0;
    MPI_Finalized(&done);
    if (owner_ && done == 0 && std::uncaught_exceptions() == 0) MPI_Finalize();
  }
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;

 private:
  bool owner_ = false;
};

enum class Reduction {
  mean,  ///< sum / number of ranks: each rank's loss is the mean over its own (equal) share
  sum,   ///< sum: each rank's loss is its rows' sum divided by the global batch size
};

/// Seconds spent in allreduce_gradients (packing, the collective, including waiting for the slowest
/// rank, and unpacking) and how many calls: the data-parallel overhead of a step.
struct Timing {
  double allreduce_seconds = 0.0;
  long allreduces = 0;
};

template <typename Scalar>
class DataParallel {
 public:
  using Index = Eigen::Index;

  /// `params`: this rank's trainable tensors (layer.parameters() of every layer, concatenated, or an
  /// optimizer's groups), in the same order on every rank. The views must stay valid (the layers
  /// must not move) while this object is used. Collective: every rank of `comm` constructs it.
  /// Throws dora::mpi::Error on every rank if the ranks' lists differ in count or in any size.
  explicit DataParallel(std::vector<Parameter<Scalar>> params, MPI_Comm comm = MPI_COMM_WORLD)
      : params_(std::move(params)) {
    detail::check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    // Checked together (one collective), so that every rank throws or none does: never a hang.
    std::uint64_t shapes = 0xcbf29ce484222325ULL, consistent = 1;
    for (const Parameter<Scalar>& p : params_) {
      shapes = detail::hash_bytes(&shapes, sizeof shapes) ^ static_cast<std::uint64_t>(p.value.size());
      if (p.grad.size() != p.value.size()) consistent = 0;
      numel_ += p.value.size();
    }
    const std::uint64_t count = params_.size(), numel = static_cast<std::uint64_t>(numel_);
    std::vector<std::uint64_t> both{count, numel, shapes, consistent, ~count, ~numel, ~shapes, ~consistent};
    detail::min_max(comm_, both);
    std::string what;
    if (both[3] == 0) {
      what = "a parameter's gradient view has a different size from its values on some rank";
    } else if (both[0] != ~both[4] || both[1] != ~both[5] || both[2] != ~both[6]) {
      what = "the ranks' models differ: " + std::to_string(both[0]) + " to " + std::to_string(~both[4]) +
             " trainable tensors, " + std::to_string(both[1]) + " to " + std::to_string(~both[5]) + " values" +
             (both[0] == ~both[4] && both[1] == ~both[5] ? " (same totals, different shapes)" : "");
    }
    if (!what.empty()) {
      MPI_Comm_free(&comm_);
      throw Error("dora::mpi::DataParallel: " + what + "; this is rank " + std::to_string(rank_) + " with " +
                  std::to_string(count) + " tensors, " + std::to_string(numel) + " values");
    }
    buffer_.resize(numel_);
    hashes_.resize(2 * params_.size());
  }
  /// From an optimizer's parameter groups (their parameters in group order).
  explicit DataParallel(const std::vector<ParamGroup<Scalar>>& groups, MPI_Comm comm = MPI_COMM_WORLD)
      : DataParallel(flatten(groups), comm) {}

  /// Frees the duplicated communicator (collective), unless an exception is propagating: then
  /// the other ranks may not be here to free theirs.
  ~DataParallel() {
    int done = 0;
    MPI_Finalized(&done);
    if (done == 0 && comm_ != MPI_COMM_NULL && std::uncaught_exceptions() == 0) MPI_Comm_free(&comm_);
  }
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_root() const { return rank_ == 0; }
  /// The duplicated communicator (for the caller's own collectives on the same ranks). Owned by this
  /// object: do not free it.
  MPI_Comm comm() const { return comm_; }
  /// Trainable values in all: what one allreduce moves (times sizeof(Scalar)).
  Index numel() const { return numel_; }

  /// Rank `root`'s parameter values to every rank (one fused broadcast).
  void broadcast_parameters(int root = 0) {
    DORA_CHECK_ARG(root >= 0 && root < size_, "broadcast_parameters: root must be in [0, ", size_, "), got ", root);
    pack(&Parameter<Scalar>::value);
    for (Index at = 0; at < numel_; at += kChunk) {
      const int n = static_cast<int>(std::min(kChunk, numel_ - at));
      detail::check(MPI_Bcast(buffer_.data() + at, n, detail::datatype<Scalar>(), root, comm_), "MPI_Bcast");
    }
    unpack(&Parameter<Scalar>::value);
  }

  /// Every gradient replaced by its sum (Reduction::sum) or mean (Reduction::mean) over the ranks:
  /// one fused buffer, one MPI_Allreduce (in chunks of 2^30 values). Allocates nothing.
  void allreduce_gradients(Reduction reduction = Reduction::mean) {
    const double t0 = MPI_Wtime();
    pack(&Parameter<Scalar>::grad);
    for (Index at = 0; at < numel_; at += kChunk) {
      const int n = static_cast<int>(std::min(kChunk, numel_ - at));
      detail::check(MPI_Allreduce(MPI_IN_PLACE, buffer_.data() + at, n, detail::datatype<Scalar>(), MPI_SUM, comm_),
                    "MPI_Allreduce (gradients)");
    }
    if (reduction == Reduction::mean && size_ > 1) buffer_ *= Scalar(1) / static_cast<Scalar>(size_);
    unpack(&Parameter<Scalar>::grad);
    timing_.allreduce_seconds += MPI_Wtime() - t0;
    ++timing_.allreduces;
  }

  /// Throws dora::mpi::Error on every rank if any parameter's values differ between ranks (bit for
  /// bit, by a 64-bit hash per tensor), naming the first such tensor and two ranks that disagree on
  /// it. Collective; allocates nothing when the replicas agree.
  void check_parameters_identical() {
    const std::size_t n = params_.size();
    for (std::size_t i = 0; i < n; ++i) {
      const Parameter<Scalar>& p = params_[i];
      hashes_[i] = detail::hash_bytes(p.value.data(), static_cast<std::size_t>(p.value.size()) * sizeof(Scalar));
      hashes_[n + i] = ~hashes_[i];
    }
    detail::min_max(comm_, hashes_);
    for (std::size_t i = 0; i < n; ++i) {
      if (hashes_[i] == ~hashes_[n + i]) continue;
      // Every rank sees the same minimum and maximum, so every rank is here: name the lowest rank
      // holding the minimum hash and the lowest rank holding another.
      const std::uint64_t mine = detail::hash_bytes(params_[i].value.data(),
                                                    static_cast<std::size_t>(params_[i].value.size()) * sizeof(Scalar));
      int ranks[2] = {mine == hashes_[i] ? rank_ : size_, mine != hashes_[i] ? rank_ : size_};
      detail::check(MPI_Allreduce(MPI_IN_PLACE, ranks, 2, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce (ranks)");
      throw Error("dora::mpi: the ranks' parameters differ: trainable tensor #" + std::to_string(i) + " ('" +
                  params_[i].name + "', " + std::to_string(params_[i].value.size()) + " values) differs between rank " +
                  std::to_string(ranks[0]) + " and rank " + std::to_string(ranks[1]) +
                  " (a rank updated it differently, or the ranks were not initialised alike: "
                  "broadcast_parameters() after initialisation)");
    }
  }

  /// Before a forward of this rank's `rows` rows (rows [rank * rows, (rank + 1) * rows) of a global
  /// batch of size() * rows: equal shares; with unequal ones, call layer.skip_dropout_rows with your
  /// own offsets): skips the dropout draws of the ranks before this one. Any layer with
  /// skip_dropout_rows: every LoRA/DoRA layer and the Multi* layers (embeddings draw nothing).
  template <typename Layer>
  void dropout_begin(Layer& layer, Index rows) const {
    layer.skip_dropout_rows(static_cast<Index>(rank_) * rows);
  }
  /// After that forward: skips the draws of the ranks after this one, so that every rank's stream
  /// is where one process's would be after the whole global batch.
  template <typename Layer>
  void dropout_end(Layer& layer, Index rows) const {
    layer.skip_dropout_rows(static_cast<Index>(size_ - 1 - rank_) * rows);
  }

  /// The mean over the ranks of one number (a loss), for reporting. Collective.
  double mean(double local) const {
    detail::check(MPI_Allreduce(MPI_IN_PLACE, &local, 1, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce (mean)");
    return local / size_;
  }

  const Timing& timing() const { return timing_; }
  void reset_timing() { timing_ = Timing{}; }

 private:
  static constexpr Index kChunk = Index(1) << 30;  // MPI counts are int

  static std::vector<Parameter<Scalar>> flatten(const std::vector<ParamGroup<Scalar>>& groups) {
    std::vector<Parameter<Scalar>> all;
    for (const ParamGroup<Scalar>& g : groups) all.insert(all.end(), g.params.begin(), g.params.end());
    return all;
  }

  using Field = Eigen::Map<Vector<Scalar>> Parameter<Scalar>::*;
  void pack(Field field) {
    Index at = 0;
    for (Parameter<Scalar>& p : params_) {
      const Eigen::Map<Vector<Scalar>>& v = p.*field;
      buffer_.segment(at, v.size()) = v;
      at += v.size();
    }
  }
  void unpack(Field field) {
    Index at = 0;
    for (Parameter<Scalar>& p : params_) {
      Eigen::Map<Vector<Scalar>>& v = p.*field;
      v = buffer_.segment(at, v.size());
      at += v.size();
    }
  }

  std::vector<Parameter<Scalar>> params_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  Index numel_ = 0;
  Vector<Scalar> buffer_;
  std::vector<std::uint64_t> hashes_;
  Timing timing_;
};

}  // namespace dora::mpi
