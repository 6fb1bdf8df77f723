// A global fp32 vector (flattened model parameters) in MPI one-sided windows, sharded over the
// ranks of a communicator, and the asynchronous exchange the DistributedOptimizer runs on it.
//
// One passive-target epoch (MPI_Win_lock_all) lasts for the window's life. An exchange adds a
// scaled delta into every owner's shard (MPI_Accumulate SUM), completes it (MPI_Win_flush_all)
// and reads the current values back element-atomically (MPI_Get_accumulate NO_OP; a read is not
// a snapshot of a shard). It runs on a background thread, one exchange in flight at a time.
//
// Bounded staleness: a second window on rank 0 holds two step counters per rank, "accumulated"
// and "completed" (read back too). Before accumulating step k a rank waits until every rank has
// completed step k-1-s; before reading it waits until every rank has accumulated step k-s. With
// s = 0 that is synchronous SGD; a finished rank publishes kFinished and never holds others.
//
// A progress thread (MPI_Iprobe on a private communicator) lets others' accumulates into this
// rank's shard complete while its Python thread computes or sleeps: many MPI transports (Open
// MPI's among them) progress passive-target operations only inside MPI calls of the target.
#pragma once

#include <mpi.h>

#include <ATen/ATen.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace torch_hpc {
namespace comm {

class RmaExchange {
 public:
  static constexpr int64_t kFinished = INT64_MAX;

  // Collective over `parent`: duplicates it, allocates the windows, starts the threads.
  RmaExchange(MPI_Comm parent, int64_t numel, bool progress_thread, int64_t progress_interval_us);
  ~RmaExchange();
  RmaExchange(const RmaExchange&) = delete;
  RmaExchange& operator=(const RmaExchange&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int64_t numel() const { return numel_; }
  int64_t shard_begin(int owner) const;
  int64_t shard_end(int owner) const;

  // Collective: every owner writes its shard of `values` (barriers around), counters reset to 0.
  void write(const at::Tensor& values);
  // Reads the whole global vector into `out` (element-atomic, not a snapshot).
  void read(at::Tensor& out);
  // Starts an exchange on the background thread: adds scale * delta (skipped and counted when
  // delta holds inf/NaN), publishes `step`, waits for the staleness bound (s < 0: none), reads
  // the global vector into `out`. `delta` and `out` must stay untouched until wait().
  void start(const at::Tensor& delta, double scale, at::Tensor out, int64_t step, int64_t staleness);
  // Waits for the exchange in flight (if any); returns whether its delta was applied.
  bool wait();
  // Publishes kFinished for this rank (its counters no longer hold anyone back).
  void finish();
  // Both counters of every rank: [accumulated_0, completed_0, accumulated_1, ...].
  std::vector<int64_t> counters();
  // The largest lead over the slowest rank this rank saw when it passed a staleness gate.
  int64_t max_lead() const { return max_lead_.load(); }
  int64_t skipped() const { return skipped_.load(); }
  int64_t exchanges() const { return exchanges_.load(); }
  // The exchanges' cost so far: bytes this rank sent (accumulates) and received (reads) through
  // the parameter window, seconds the exchange thread spent on them, seconds wait() blocked.
  struct Stats {
    int64_t exchanges, bytes_sent, bytes_received;
    double exchange_seconds, wait_seconds;
  };
  Stats stats() const;
  // Collective, without a busy wait: MPI_Ibarrier tested with a growing sleep.
  void barrier();
  // Collective: stops the threads and frees the windows. Idempotent.
  void close();

 private:
  struct Job {
    at::Tensor delta;
    double scale = 1.0;
    at::Tensor out;
    int64_t step = 0;
    int64_t staleness = -1;
  };
  void exchange_loop();
  void progress_loop();
  void stop_exchange_thread();
  void stop_progress_thread();
  void run(const Job& job);
  void accumulate(const float* data);  // adds data[shard] into every owner's shard
  void publish(int slot, int64_t value);
  void wait_until(int slot, int64_t at_least, int64_t step);
  void check_open(const char* what) const;
  void check_vector(const at::Tensor& t, const char* name) const;

  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm progress_comm_ = MPI_COMM_NULL;
  MPI_Win win_ = MPI_WIN_NULL;
  MPI_Win counter_win_ = MPI_WIN_NULL;
  int rank_ = 0;
  int size_ = 1;
  int64_t numel_ = 0;
  int64_t chunk_ = 0;
  std::vector<float> scaled_;  // the scaled delta being sent (exchange thread only)
  bool closed_ = false;

  std::thread exchange_thread_;
  std::thread progress_thread_;
  std::chrono::microseconds progress_interval_{500};
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::optional<Job> job_;
  bool busy_ = false;
  bool stop_ = false;
  bool last_applied_ = true;
  std::exception_ptr error_;
  std::atomic<bool> stop_progress_{false};
  std::atomic<int64_t> max_lead_{0};
  std::atomic<int64_t> skipped_{0};
  std::atomic<int64_t> exchanges_{0};
  std::atomic<int64_t> bytes_sent_{0};
  std::atomic<int64_t> bytes_received_{0};
  std::atomic<int64_t> exchange_ns_{0};
  std::atomic<int64_t> wait_ns_{0};
};

}  // namespace comm
}  // namespace torch_hpc
