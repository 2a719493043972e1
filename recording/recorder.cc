#include "recording/recorder.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cstring>

#include "common/clock.h"
#include "common/error.h"
#include "spool/spool.h"

namespace shimlet::recording {

bool tty_input_recorded(tcflag_t lflag) { return (lflag & ICANON) && !(lflag & ECHO); }

Recorder::Recorder(Options o) : opt_(std::move(o)), enc_(opt_.max_bytes) {
  if (!shimlet::spool::valid_sid(opt_.id)) throw Error("recording: invalid id \"" + opt_.id.substr(0, 80) + "\"");
  t0_ns_ = monotonic_ns();
  failure_fd_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  drained_fd_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!failure_fd_ || !drained_fd_) throw sys_error("recording: eventfd");
  // Locked and given its header under a hidden name, so the spool never sees
  // it unlocked (it would take it for a dead session's).
  std::string tmp = opt_.dir + "/." + opt_.id + ".XXXXXX";
  Fd fd(::mkostemp(tmp.data(), O_CLOEXEC));
  if (!fd) throw sys_error("recording: create a file in " + opt_.dir);
  rec_path_ = opt_.dir + "/" + opt_.id + ".rec";
  try {
    if (::fchmod(fd.get(), 0600) < 0) throw sys_error("recording: fchmod " + tmp);
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) < 0) throw sys_error("recording: flock " + tmp);
    std::string head;
    enc_.header(head, opt_.header);
    write_all(fd.get(), head.data(), head.size());
    // Never replace another session's recording (ids are unique; this is the check).
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, rec_path_.c_str(), RENAME_NOREPLACE) < 0)
      throw sys_error("recording: rename " + tmp + " -> " + rec_path_);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  fd_ = std::move(fd);
  // The writer thread starts with the first event: the session forks
  // nothing after the command runs, but may before (its zygote).
}

Recorder::~Recorder() {
  try {
    finish(incomplete_marker("the session ended without closing its recording"));
  } catch (const std::exception&) {
    stop_thread();  // the spool finishes the .rec
  }
}

int64_t Recorder::now_us() const { return (monotonic_ns() - t0_ns_) / 1000; }

std::string Recorder::failure() const {
  std::lock_guard lk(mu_);
  return failure_;
}

// Queues one event for the writer, or drops it when the writer is too far
// behind (or failed). The session's thread only copies the bytes: encoding
// happens on the writer thread, beside the session's own work.
void Recorder::add(char code, std::string_view data, uint16_t cols, uint16_t rows) {
  if (done_ || failed_.load(std::memory_order_relaxed)) return;
  int64_t t = now_us();
  std::lock_guard lk(mu_);
  if (closing_) return;
  size_t backlog = backlog_.load(std::memory_order_relaxed);
  if (backlog > kHardLimit) {
    dropped_events_++;
    dropped_bytes_ += data.size();
    return;
  }
  bool was_empty = pending_.empty();
  size_t added = 0;
  if (dropped_events_ && backlog < kHighWater) {
    pending_.push_back({t, 'm', 0, 0, gap_marker(dropped_events_, dropped_bytes_)});
    dropped_events_ = dropped_bytes_ = 0;
    added += kEventCost;
  }
  pending_.push_back({t, code, cols, rows, std::string(data)});
  added += data.size() + kEventCost;
  backlog_.fetch_add(added, std::memory_order_relaxed);
  if (!writer_.joinable()) writer_ = std::thread([this] { run(); });
  // The writer sleeps only when nothing is pending.
  if (was_empty) cv_.notify_one();
}

void Recorder::output(Code c, const char* data, size_t len) {
  add(c == Code::Stderr ? 'e' : 'o', std::string_view(data, len));
}

void Recorder::input(const char* data, size_t len, tcflag_t lflag) {
  if (opt_.tty && !tty_input_recorded(lflag)) return;
  add('i', std::string_view(data, len));
}

void Recorder::resize(uint16_t cols, uint16_t rows) { add('r', {}, cols, rows); }

void Recorder::run() {
  std::vector<Pending> batch;
  std::string out;
  for (;;) {
    {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] { return !pending_.empty() || closing_; });
      if (pending_.empty()) return;  // closing and drained
      batch.swap(pending_);
    }
    size_t raw = 0;
    out.clear();
    for (Pending& e : batch) {
      raw += e.data.size() + kEventCost;
      switch (e.code) {
        case 'r':
          enc_.resize(out, e.t_us, e.cols, e.rows);
          break;
        case 'm':
          enc_.marker(out, e.t_us, e.data);
          break;
        case 'x':
          enc_.finish(out, e.t_us, e.data);
          break;
        default:
          enc_.data(out, e.t_us, static_cast<Code>(e.code), e.data);
          break;
      }
    }
    batch.clear();
    if (!failed_.load()) {
      try {
        write_all(fd_.get(), out.data(), out.size());
      } catch (const std::system_error& e) {
        {
          std::lock_guard lk(mu_);
          failure_ = "cannot write " + rec_path_ + ": " + e.code().message();
        }
        failed_.store(true);
        uint64_t one = 1;
        (void)!::write(failure_fd_.get(), &one, sizeof one);
      }
    }
    if (out.capacity() > 2 * kHighWater) out = std::string();  // give a burst's memory back
    if (batch.capacity() > 4096) batch = std::vector<Pending>();
    if (backlog_.fetch_sub(raw) - raw <= kHighWater && want_drained_.exchange(false)) {
      uint64_t one = 1;
      (void)!::write(drained_fd_.get(), &one, sizeof one);
    }
  }
}

bool Recorder::notify_when_drained() {
  want_drained_.store(true);
  // The writer may have caught up between the caller's check and now.
  if (backlog_high()) return true;
  want_drained_.store(false);
  return false;
}

void Recorder::stop_thread() {
  {
    std::lock_guard lk(mu_);
    closing_ = true;
  }
  cv_.notify_one();
  if (writer_.joinable()) {
    writer_.join();
  } else if (!pending_.empty() && fd_) {
    // No event ever started the writer (a command without output): the
    // terminal marker is one small line, written here like the header.
    run();
  }
}

Recorder::Result Recorder::abandon() {
  if (done_) return result_;
  stop_thread();
  done_ = true;
  result_.path = rec_path_;
  result_.bytes = enc_.bytes();
  result_.truncated = enc_.truncated();
  result_.error = failure();
  fd_.reset();  // the lock goes: the spool finishes the .rec as incomplete
  return result_;
}

Recorder::Result Recorder::finish(const std::string& terminal_marker) {
  if (done_) return result_;
  {
    std::lock_guard lk(mu_);
    if (!failed_.load()) {
      int64_t t = now_us();
      if (dropped_events_) pending_.push_back({t, 'm', 0, 0, gap_marker(dropped_events_, dropped_bytes_)});
      pending_.push_back({t, 'x', 0, 0, terminal_marker});  // the writer flushes held bytes, then the marker
    }
  }
  stop_thread();
  done_ = true;
  result_.bytes = enc_.bytes();
  result_.truncated = enc_.truncated();
  result_.out_bytes = enc_.recorded(Code::Output);
  result_.err_bytes = enc_.recorded(Code::Stderr);
  result_.in_bytes = enc_.recorded(Code::Input);
  result_.error = failure();
  result_.path = rec_path_;
  if (result_.error.empty()) {
    const std::string cast = opt_.dir + "/" + opt_.id + ".cast";
    // Renamed while still locked: nobody sees a finished .rec unlocked.
    if (::rename(rec_path_.c_str(), cast.c_str()) == 0) {
      result_.path = cast;
      result_.complete = terminal_marker.rfind("end:", 0) == 0;
    } else {
      result_.error = "rename " + rec_path_ + ": " + strerror(errno);
    }
  }
  fd_.reset();
  return result_;
}

}  // namespace shimlet::recording
