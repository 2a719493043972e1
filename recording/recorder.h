// One session's recording as it runs (docs/recording.md "On the node"). The
// exec engine hands it stdin, output and resizes; it encodes them
// (recording/asciicast.h) on one writer thread, which also writes them to the
// spool: the session's event loop only copies the bytes into a bounded
// in-memory queue, so neither the encoding nor a slow or full disk ever
// blocks it.
//
// Call order: construct (the file exists, locked, with its header), then
// output()/input()/resize() as events happen, then finish() with the terminal
// marker (or let the destructor mark it incomplete).
//
// Buffer bound: above kHighWater bytes not yet on disk, backlog_high() says so
// and the engine stops reading the command's output (backpressure, exactly as
// for a slow client) until drained_fd() says the writer caught up. Stdin and resizes cannot wait: above kHardLimit
// events are dropped, counted, and a "gap" marker says so once the backlog is below kHighWater again. Nothing here ever
// blocks on the disk.
//
// Files (DIR is the container's spool, DIR/<id>.* with id [A-Za-z0-9_-]{1,64}):
//   .<id>.XXXXXX   being created (header written, lock taken), then renamed:
//   <id>.rec       being recorded; flock()ed by the session for its whole life
//                  (O_CLOEXEC: the command never holds it). A .rec whose lock is
//                  free belongs to a session that died: recording/spool.h turns
//                  it into a .cast marked incomplete.
//   <id>.cast      finished, ready to send (renamed by finish()).
// A write error (ENOSPC, EIO) stops the writer and makes failure_fd()
// readable: the session applies its disk-full policy (fail-closed ends the
// session, fail-open goes on unrecorded). The .rec then stays for the spool to
// finish as incomplete.
#pragma once
#include <termios.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/fd.h"
#include "recording/asciicast.h"

namespace shimlet::recording {

// The echo rule (docs/recording.md): with a tty, input is recorded only when
// the terminal does not show it, i.e. the line discipline collects a line
// without echo (ICANON on, ECHO off: a password-style prompt). With ECHO on
// the kernel echoes it; in raw mode (ICANON off: shells' line editors, vi,
// less) the program draws what it shows itself. Either way it is in the
// output already, and recording it again would store every keystroke twice.
bool tty_input_recorded(tcflag_t lflag);

class Recorder {
 public:
  static constexpr size_t kHighWater = 4u << 20;
  static constexpr size_t kHardLimit = 16u << 20;

  struct Options {
    std::string dir;  // the container's spool directory (must exist)
    std::string id;   // the file name's stem
    Header header;
    uint64_t max_bytes = 256ull << 20;  // the encoded file, header and markers included
    bool tty = false;
  };
  // Creates and locks the file and writes the header synchronously (one small
  // write: a disk that is full already fails here, before the command runs).
  // Throws std::system_error / shimlet::Error with the path.
  explicit Recorder(Options o);
  // Not finished: finish(incomplete "the session ended without closing its recording").
  ~Recorder();
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;

  // Output: Code::Output (stdout; with a tty, the terminal) or Code::Stderr.
  void output(Code c, const char* data, size_t len);
  // Stdin from the client; `lflag` is the pty's c_lflag at that moment (tty
  // only; ignored without a tty, where stdin is always recorded).
  void input(const char* data, size_t len, tcflag_t lflag);
  void resize(uint16_t cols, uint16_t rows);

  // More than kHighWater bytes wait for the disk: stop reading output.
  bool backlog_high() const { return backlog_.load(std::memory_order_relaxed) > kHighWater; }
  // Arms a one-shot wake-up: drained_fd() (an eventfd) becomes readable once
  // the backlog is below kHighWater. False when it already is (nothing armed).
  bool notify_when_drained();
  int drained_fd() const { return drained_fd_.get(); }
  // Readable (an eventfd) once the writer failed; failure() says why.
  int failure_fd() const { return failure_fd_.get(); }
  std::string failure() const;
  bool failed() const { return failed_.load(); }

  struct Result {
    std::string path;  // DIR/<id>.cast, or DIR/<id>.rec when it could not be completed
    uint64_t bytes = 0;
    bool truncated = false;
    bool complete = false;                                // terminal marker "end: ..." written and on disk
    uint64_t out_bytes = 0, err_bytes = 0, in_bytes = 0;  // raw bytes recorded per stream
    std::string error;                                    // the writer's failure, if any
  };
  // Flushes the encoder, writes the terminal marker (end_marker(...) or
  // incomplete_marker(...)), waits for the writer, renames to .cast and
  // releases the lock. Idempotent (later calls return the first result).
  Result finish(const std::string& terminal_marker);
  // Fail-open after a failure: stop recording now. The .rec stays and is
  // finished as incomplete by the spool.
  Result abandon();

  const std::string& id() const { return opt_.id; }

 private:
  // One event for the writer thread. code: o e i (data), r (cols, rows),
  // m (marker label in data), x (finish: the terminal marker in data).
  struct Pending {
    int64_t t_us;
    char code;
    uint16_t cols, rows;
    std::string data;
  };
  static constexpr size_t kEventCost = 64;  // what an event counts in the backlog besides its bytes

  int64_t now_us() const;
  void add(char code, std::string_view data, uint16_t cols = 0, uint16_t rows = 0);
  void run();
  void stop_thread();

  Options opt_;
  Fd fd_, failure_fd_, drained_fd_;
  std::atomic<bool> want_drained_{false};
  std::string rec_path_;
  int64_t t0_ns_ = 0;
  Encoder enc_;  // the writer thread's (the header before it starts; results after it ends)

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Pending> pending_;  // not yet taken by the writer (guarded by mu_)
  bool closing_ = false;
  std::string failure_;
  std::atomic<bool> failed_{false};
  std::atomic<size_t> backlog_{0};  // pending + being written
  uint64_t dropped_events_ = 0, dropped_bytes_ = 0;
  std::thread writer_;
  bool done_ = false;
  Result result_;
};

}  // namespace shimlet::recording
