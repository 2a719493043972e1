// The exec engine (session/session_exec.h): starts the command in the container
// (nsenter/), feeds stdin, reads stdout/stderr with backpressure until the
// process exits and its output is drained, and reports the exact status.
// Below it, the native HTTP/2 sink: frames (proto/frames.h) on one stream.
#include "session/session_exec.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/event.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/pidfd.h"
#include "proto/frames.h"
#include "session/session_internal.h"
#include "session/session_recording.h"

namespace shimlet::session {
namespace {

constexpr size_t kReadChunk = 64 * 1024;
// Measured (docs/performance.md "Session recording"): tee + splice beat read + write for the relay
// (text 0.88x against 0.78x of unrecorded), the client's bytes never copied through the session.
constexpr size_t kRelayChunk = 256 * 1024;

std::string sanitize_term(const std::string& t) {
  if (t.empty() || t.size() > 64) return "xterm";
  for (char c : t)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' || c == '+')) return "xterm";
  return t;
}

}  // namespace

struct ExecEngine::Impl {
  // A recorded exec's relay to the client's stdout/stderr (pump()).
  struct Relay {
    Fd to;                 // the client's fd (a pipe: reopened O_NONBLOCK)
    Fd tee_r, tee_w;       // the recorder's copy of each chunk (tee())
    bool sock = false;     // send(MSG_DONTWAIT)
    bool copy = false;     // read/write instead of tee/splice (a socket, or splice said EINVAL)
    size_t ahead = 0;      // recorded bytes at the head of the command's pipe, not yet at the client
    std::string pending;   // copy: recorded bytes not yet at the client (at most kRelayChunk)
    bool waiting = false;  // for the client's fd to take more
    event* ev = nullptr;   // EV_WRITE on `to`
  };

  Impl(Context& ctx, ExecSink& sink) : ctx_(ctx), sink_(sink) {}
  ~Impl() {
    for (event* e : {ev_out_, ev_err_, ev_in_, ev_exit_, ev_drain_, ev_watch_, relay_[0].ev, relay_[1].ev})
      if (e) event_free(e);
    kill_all();
    rec_.reset();  // an unfinished recording is marked incomplete (before the end record)
    // The session's end record (written by the Context) counts every transport's exec here.
    ctx_.add_bytes(bytes_in_, static_cast<uint64_t>(bytes_out_ + bytes_err_));
  }

  // The one place a session process is created (per-session limits,
  // Landlock and SELinux options go into req here).
  nsenter::Spawned spawn_process(nsenter::Request& req, const nsenter::Stdio& io, const ticket::Claims& claims) {
    conf_.emplace(ctx_.config().isolation, ctx_.container(), ctx_.sid(), claims.limits);
    return conf_->spawn(req, io);
  }

  // Limits are enforced by the kernel (pids.max refuses forks, the OOM
  // killer kills one process); a session that hits one is ended whole, with a
  // clear status (issue 5). Polled: v1 memory OOM has no pollable file.
  static void on_watch(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<Impl*>(arg);
    if (self->finished_ || !self->conf_) return;
    if (auto hit = self->conf_->limit_hit()) {
      ExecResult r;
      r.signal = SIGKILL;
      r.exit_code = 128 + SIGKILL;
      r.error = hit->message;
      r.killed = hit->kind;
      self->finish_with(r);
    }
  }

  void start(const ExecSpec& spec, const ticket::Claims& claims) {
    tty_ = spec.tty;
    stdin_ = spec.stdin_;
    // A stream the client did not ask for is still read, then dropped: the
    // process never blocks on it and the exit drain works the same.
    keep_stdout_ = spec.stdout_;
    keep_stderr_ = spec.stderr_;
    // Recording (docs/recording.md): before anything runs, so that
    // fail-closed refuses the exec when the recording cannot be written.
    try {
      rec_ = ExecRecording::begin(ctx_, spec, claims, [this](const std::string& why) { recording_failed(why); });
    } catch (const RecordingRefused& e) {
      log::audit("exec.start",
                 {{"command", spec.argv}, {"tty", spec.tty}, {"stdin", spec.stdin_}, {"error", e.what()}});
      sink_.on_started(0);
      ExecResult r;
      r.exit_code = 126;
      r.killed = "recording";
      r.error = e.what();
      return finish_with(r);
    }
    nsenter::Request req;
    req.argv = spec.argv;
    nsenter::Stdio io;
    io.tty = tty_;
    std::vector<Fd> passed = std::move(passed_fds_);
    bool all_passed = passed.size() == (stdin_ ? 3u : 2u) && !tty_ && keep_stdout_ && keep_stderr_;
    passed_ = all_passed && !rec_;
    // Recorded: the session relays (tee + splice) to the client's stdout and
    // stderr instead of copying them through the socket (stdin: the copy path).
    relay_on_ =
        all_passed && rec_ && !stdin_ && prepare_relay(relay_[0], passed[0]) && prepare_relay(relay_[1], passed[1]);
    if (!relay_on_)
      for (Relay& r : relay_) r = Relay{};
    Pipe in_p = make_pipe(), out_p = passed_ ? Pipe{} : make_pipe(), err_p = passed_ ? Pipe{} : make_pipe();
    if (passed_) {
      ctx_.note_stdio_client();
      io.in = stdin_ ? passed[0].get() : in_p.read.get();  // without stdin: EOF, as below
      io.out = passed[stdin_ ? 1 : 0].get();
      io.err = passed[stdin_ ? 2 : 1].get();
    } else if (tty_) {
      io.cols = spec.cols;  // 0x0: left unset (nsenter sets a size only when both are given)
      io.rows = spec.rows;
      req.extra_env.push_back("TERM=" + sanitize_term(spec.term));
    } else {
      io.in = in_p.read.get();
      io.out = out_p.write.get();
      io.err = err_p.write.get();
      // Bigger pipes: fewer wakeups per byte on bulk output (best effort: the default size works too).
      fcntl(out_p.read.get(), F_SETPIPE_SZ, 1 << 20);
      fcntl(err_p.read.get(), F_SETPIPE_SZ, 1 << 20);
    }
    try {
      proc_ = spawn_process(req, io, claims);
    } catch (const nsenter::ExecError& e) {
      // Like a shell: the request was fine, the command could not run.
      log::audit("exec.start", {{"command", spec.argv}, {"tty", tty_}, {"stdin", stdin_}, {"error", e.what()}});
      sink_.on_started(0);
      ExecResult r;
      r.exit_code = e.exit_code;
      r.error = e.what();
      return finish_with(r);
    }
    log::audit("exec.start", {{"command", spec.argv},
                              {"tty", tty_},
                              {"stdin", stdin_},
                              {"pid", proc_.pid},
                              {"stdio", passed_     ? "client"
                                        : relay_on_ ? "relay"
                                        : tty_      ? "pty"
                                                    : "pipes"},
                              {"isolation", conf_->describe()}});
    passed.clear();  // the command holds them now; the session keeps no copy
    if (passed_) {
      out_eof_ = err_eof_ = true;  // nothing to read or drain: the exit ends the exec
    } else if (tty_) {
      out_fd_ = std::move(proc_.pty_master);
      set_nonblocking(out_fd_.get());
      in_fd_ = Fd(::fcntl(out_fd_.get(), F_DUPFD_CLOEXEC, 3));
      if (!in_fd_) throw sys_error("dup the pty master");
      err_eof_ = true;
    } else {
      out_fd_ = std::move(out_p.read);
      err_fd_ = std::move(err_p.read);
      set_nonblocking(out_fd_.get());
      set_nonblocking(err_fd_.get());
      if (stdin_) {
        in_fd_ = std::move(in_p.write);
        set_nonblocking(in_fd_.get());
      }
      // Without stdin the command sees EOF at once: in_p.write closes with this scope.
    }
    // Checked creation (common/event.h); the raw members are freed in ~Impl.
    // All made here: on_exit runs inside libevent, where nothing may throw.
    event_base* b = ctx_.base();
    ev_drain_ = new_timer(b, on_drain_timeout, this).release();
    if (out_fd_) {
      ev_out_ = new_event(b, out_fd_.get(), EV_READ | EV_PERSIST, on_readable, this).release();
      event_add(ev_out_, nullptr);
    }
    if (err_fd_) {
      ev_err_ = new_event(b, err_fd_.get(), EV_READ | EV_PERSIST, on_readable, this).release();
      event_add(ev_err_, nullptr);
    }
    if (in_fd_) ev_in_ = new_event(b, in_fd_.get(), EV_WRITE, on_writable, this).release();
    if (relay_on_) {
      relay_[0].ev = new_event(b, relay_[0].to.get(), EV_WRITE, on_client_writable<0>, this).release();
      relay_[1].ev = new_event(b, relay_[1].to.get(), EV_WRITE, on_client_writable<1>, this).release();
    }
    ev_exit_ = new_event(b, proc_.pidfd.get(), EV_READ, on_exit, this).release();
    event_add(ev_exit_, nullptr);
    if (conf_->watch()) {
      ev_watch_ = new_event(b, -1, EV_PERSIST, on_watch, this).release();
      timeval tv{0, 100 * 1000};
      event_add(ev_watch_, &tv);
    }
    sink_.on_started(proc_.pid);
  }

  void write_stdin(const uint8_t* data, size_t len) {
    if (finished_ || !in_fd_ || stdin_closed_) {
      sink_.on_stdin_consumed(len);  // nowhere to go: dropped, like a closed pipe
      return;
    }
    if (rec_) rec_->input(reinterpret_cast<const char*>(data), len, tty_ ? out_fd_.get() : -1);
    stdin_buf_.append(reinterpret_cast<const char*>(data), len);
    bytes_in_ += len;
    flush_stdin();
  }

  void close_stdin() {
    stdin_eof_ = true;
    flush_stdin();
  }

  void resize(uint16_t cols, uint16_t rows) {
    if (!tty_ || !out_fd_ || finished_) return;
    winsize ws{std::max<uint16_t>(rows, 1), std::max<uint16_t>(cols, 1), 0, 0};
    ioctl(out_fd_.get(), TIOCSWINSZ, &ws);
    if (rec_) rec_->resize(ws.ws_col, ws.ws_row);
  }

  void resume_output() {
    if (!paused_ || finished_) return;
    paused_ = false;
    if (ev_out_ && !out_eof_ && !relay_[0].waiting) event_add(ev_out_, nullptr);
    if (ev_err_ && !err_eof_ && !relay_[1].waiting) event_add(ev_err_, nullptr);
  }

  void abort(const std::string& why) {
    if (finished_) return;
    finished_ = true;
    log::audit("session.end", {{"reason", why}, {"killed", true}});
    ctx_.note_error("session ended: " + why);
    if (rec_) rec_->abort(why);
    for (event* e : {ev_out_, ev_err_, ev_in_, ev_exit_, ev_drain_, relay_[0].ev, relay_[1].ev})
      if (e) event_del(e);
    kill_all();
  }

  static void on_readable(evutil_socket_t fd, short, void* arg) { static_cast<Impl*>(arg)->read_from(fd, false); }

  // Reads what is available on an output fd. With force, reads even when the
  // client is slow (final drain: bounded by the pipe size).
  void read_from(int fd, bool force) {
    bool is_err = err_fd_ && fd == err_fd_.get();
    if (relay_on_) return pump(is_err ? 1 : 0);
    char buf[kReadChunk];
    for (int rounds = 0; rounds < 64; rounds++) {
      if (!force && sink_.out_queued() > kOutHighWater) {
        pause_reading();
        return;
      }
      // The recording's writer is behind the disk: wait for it as for a slow client.
      if (!force && rec_ && rec_->backlog_high()) {
        pause_reading();
        rec_->when_drained([this] { resume_output(); });
        return;
      }
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n > 0) {
        if (rec_) rec_->output(is_err ? 2 : 1, buf, static_cast<size_t>(n));
        if (is_err) {
          bytes_err_ += n;
          if (keep_stderr_) sink_.on_output(2, buf, static_cast<size_t>(n));
        } else {
          bytes_out_ += n;
          if (keep_stdout_) sink_.on_output(1, buf, static_cast<size_t>(n));
        }
        if (finished_) return;  // the sink aborted us from inside on_output
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return;
      // EOF, or EIO on a pty master once every slave fd is closed.
      mark_eof(is_err);
      return;
    }
  }

  void mark_eof(bool is_err) {
    if (is_err) {
      if (ev_err_) event_del(ev_err_);
      err_eof_ = true;
    } else {
      if (ev_out_) event_del(ev_out_);
      out_eof_ = true;
    }
    maybe_finish();
  }

  void pause_reading() {
    if (ev_out_ && !out_eof_) event_del(ev_out_);
    if (ev_err_ && !err_eof_) event_del(ev_err_);
    paused_ = true;
  }

  // Fail-closed: the recording cannot be written while the command runs.
  void recording_failed(const std::string& why) {
    if (finished_) return;
    ExecResult r;
    r.signal = SIGKILL;
    r.exit_code = 128 + SIGKILL;
    r.error = why;
    r.killed = "recording";
    finish_with(r);
  }

  static void on_writable(evutil_socket_t, short, void* arg) { static_cast<Impl*>(arg)->flush_stdin(); }

  void flush_stdin() {
    size_t before = stdin_buf_.size();
    if (in_fd_ && !stdin_closed_) {
      while (!stdin_buf_.empty()) {
        ssize_t n = ::write(in_fd_.get(), stdin_buf_.data(), stdin_buf_.size());
        if (n > 0) {
          stdin_buf_.erase(0, static_cast<size_t>(n));
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
          event_add(ev_in_, nullptr);
          break;
        }
        // EPIPE: the command closed its stdin; drop the rest like a pipe would.
        stdin_buf_.clear();
        stdin_closed_ = true;
        break;
      }
      if (stdin_buf_.empty() && stdin_eof_ && !tty_) {
        in_fd_.reset();
        stdin_closed_ = true;
      }
    } else {
      stdin_buf_.clear();
    }
    if (before > stdin_buf_.size()) sink_.on_stdin_consumed(before - stdin_buf_.size());
  }

  static void on_exit(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<Impl*>(arg);
    siginfo_t si{};
    if (waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(self->proc_.pidfd.get()), &si, WEXITED | WNOHANG) <
            0 ||
        si.si_pid == 0)
      return;
    self->exited_ = true;
    if (si.si_code == CLD_EXITED) {
      self->result_.exit_code = si.si_status;
    } else {
      self->result_.signal = si.si_status;
      self->result_.exit_code = 128 + si.si_status;
    }
    // Bounded drain: a background child holding stdout must not hang us.
    int ms = self->ctx_.config().drain_timeout_ms;
    timeval tv{ms / 1000, (ms % 1000) * 1000};
    evtimer_add(self->ev_drain_, &tv);
    self->maybe_finish();
  }

  static void on_drain_timeout(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<Impl*>(arg);
    log::info("output not closed after the command exited; ending after the drain timeout");
    // A relay takes what the pipe holds (recorded) and still moves it to the
    // client as it takes it; later output is dropped, as below.
    if (self->relay_on_) {
      for (int i = 0; i < 2 && !self->finished_; i++)
        if (!(i ? self->err_eof_ : self->out_eof_)) self->take_rest(i);
      if (self->finished_) return;
    } else if (self->out_fd_ && !self->out_eof_) {
      self->read_from(self->out_fd_.get(), true);
    }
    if (self->err_fd_ && !self->err_eof_ && !self->finished_) self->read_from(self->err_fd_.get(), true);
    self->out_eof_ = self->err_eof_ = true;
    self->maybe_finish();
  }

  void maybe_finish() {
    if (finished_ || !exited_ || !out_eof_ || !err_eof_) return;
    for (const Relay& r : relay_)
      if (r.ahead > 0 || !r.pending.empty()) return;  // taken at the drain timeout, still on its way to the client
    finish_with(result_);
  }

  void finish_with(ExecResult r) {
    finished_ = true;
    kill_all();
    // The main process may have died of the limit (OOM-killed) or exited
    // after fork failures: report the limit, not a bare status.
    if (r.killed.empty() && conf_)
      if (auto hit = conf_->limit_hit()) {
        r.killed = hit->kind;
        r.error = hit->message;
      }
    nlohmann::json rec = {{"exit_code", r.exit_code}, {"bytes_stdout", bytes_out_}, {"bytes_stderr", bytes_err_}};
    if (r.signal) rec["signal"] = r.signal;
    if (!r.killed.empty()) rec["killed"] = r.killed;
    if (conf_) conf_->usage_into(rec);
    log::audit("session.end", rec);
    ctx_.note_exit(r.exit_code, r.signal, r.error);
    if (rec_) rec_->end(r);
    for (event* e : {ev_out_, ev_err_, ev_in_, ev_exit_, ev_drain_, ev_watch_, relay_[0].ev, relay_[1].ev})
      if (e) event_del(e);
    in_fd_.reset();
    out_fd_.reset();
    err_fd_.reset();
    // The client's stdout/stderr: closed before the status, so its reader sees EOF once the client exits.
    for (Relay& r : relay_) {
      r.to.reset();
      r.tee_r.reset();
      r.tee_w.reset();
    }
    // Last, touching nothing of ours afterwards: the sink may destroy the engine.
    sink_.on_exit(r);
  }

  // ---- relay: a recorded local exec with the client's stdio (session_exec.h pass_stdio)

  // The client's fd for a relay: a pipe is reopened (a new open file
  // description, O_NONBLOCK there only: the client's own stays as it was) so
  // that the session never blocks on a slow reader; a socket is written with
  // MSG_DONTWAIT; a regular file never waits for a reader. Anything else
  // (a terminal, a character device): false, the copy path.
  static bool prepare_relay(Relay& r, Fd& passed) {
    struct stat st {};
    if (::fstat(passed.get(), &st) < 0) return false;
    int mode = ::fcntl(passed.get(), F_GETFL);
    if (mode < 0 || (mode & O_ACCMODE) == O_RDONLY) return false;  // not for output: the copy path fails as before
    if (S_ISFIFO(st.st_mode)) {
      std::string path = "/proc/self/fd/" + std::to_string(passed.get());
      r.to = Fd(::open(path.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC));
      if (!r.to) return false;
      // As shimctl does on the copy path (client/exec.cc): fewer wake-ups of the reader and of us.
      if (int cur = fcntl(r.to.get(), F_GETPIPE_SZ); cur > 0 && cur < (1 << 20))
        (void)fcntl(r.to.get(), F_SETPIPE_SZ, 1 << 20);
    } else if (S_ISSOCK(st.st_mode)) {
      r.to = std::move(passed);
      r.sock = r.copy = true;  // splice(2) to a socket blocks unless its own file is O_NONBLOCK
      return true;
    } else if (S_ISREG(st.st_mode)) {
      r.to = std::move(passed);  // the client's offset is shared, as when the command writes to it
    } else {
      return false;
    }
    Pipe p = make_pipe(O_NONBLOCK);
    (void)fcntl(p.write.get(), F_SETPIPE_SZ, static_cast<int>(kRelayChunk));
    r.tee_r = std::move(p.read);
    r.tee_w = std::move(p.write);
    return true;
  }

  // Moves what the command wrote on stream i (0 stdout, 1 stderr) to the
  // client, each chunk recorded before it goes: tee() into the recorder's
  // pipe, read from there, then splice() the same bytes from the command's
  // pipe to the client. Backpressure both ways: a slow client or recorder
  // stops the reading, never loses a byte.
  void pump(int i) {
    Relay& r = relay_[i];
    int from = (i ? err_fd_ : out_fd_).get();
    if (relay_buf_.empty()) relay_buf_.resize(kRelayChunk);
    char* buf = relay_buf_.data();
    for (int rounds = 0; rounds < 16; rounds++) {
      if (!flush_relay(i)) return;  // waiting for the client, or it is gone
      if (rec_ && rec_->backlog_high()) {
        pause_reading();
        rec_->when_drained([this] { resume_output(); });
        return;
      }
      ssize_t n = r.copy ? ::read(from, buf, kRelayChunk) : ::tee(from, r.tee_w.get(), kRelayChunk, SPLICE_F_NONBLOCK);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return;
      if (n < 0 && errno == EINVAL && !r.copy) {
        r.copy = true;
        continue;
      }
      if (n <= 0) {  // EOF: every byte is at the client
        mark_eof(i == 1);
        return;
      }
      if (!r.copy && !take(r.tee_r.get(), buf, static_cast<size_t>(n), "read the tee pipe")) return;
      if (rec_) rec_->output(i ? 2 : 1, buf, static_cast<size_t>(n));
      (i ? bytes_err_ : bytes_out_) += n;
      if (r.copy)
        r.pending.assign(buf, static_cast<size_t>(n));
      else
        r.ahead = static_cast<size_t>(n);
      if (finished_) return;
    }
  }

  // At the drain timeout: what stream i's pipe holds now (bounded, as the
  // copy path's forced read) is recorded and goes to the client as it takes
  // it; the pipe is read no more.
  void take_rest(int i) {
    Relay& r = relay_[i];
    int from = (i ? err_fd_ : out_fd_).get();
    if (r.ahead > 0) {  // recorded already: moved by write from here on
      size_t have = r.pending.size();
      r.pending.resize(have + r.ahead);
      if (!take(from, r.pending.data() + have, r.ahead, "read the command's output")) return;
      r.ahead = 0;
    }
    r.copy = true;
    if (relay_buf_.empty()) relay_buf_.resize(kRelayChunk);
    for (int rounds = 0; rounds < 16; rounds++) {
      ssize_t n = ::read(from, relay_buf_.data(), kRelayChunk);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      if (rec_) rec_->output(i ? 2 : 1, relay_buf_.data(), static_cast<size_t>(n));
      if (finished_) return;
      (i ? bytes_err_ : bytes_out_) += n;
      r.pending.append(relay_buf_.data(), static_cast<size_t>(n));
    }
    if (event* rd = i ? ev_err_ : ev_out_) event_del(rd);
    (i ? err_eof_ : out_eof_) = true;
    flush_relay(i);  // the rest when the client's fd is writable (on_client_writable)
  }

  // Takes len bytes that are in the pipe already; when it cannot, ends the
  // exec with why (false). From the loop: nothing may throw out of here.
  bool take(int fd, char* buf, size_t len, const std::string& what) {
    try {
      if (read_exact(fd, buf, len)) return true;
      relay_failed(what + ": end of file");
    } catch (const std::exception& e) {
      relay_failed(what + ": " + e.what());
    }
    return false;
  }

  // Moves the recorded bytes not yet at the client; true when none are left.
  bool flush_relay(int i) {
    Relay& r = relay_[i];
    int from = (i ? err_fd_ : out_fd_).get();
    while (r.ahead > 0 || !r.pending.empty()) {
      ssize_t m;
      if (r.ahead > 0) {
        m = ::splice(from, nullptr, r.to.get(), nullptr, r.ahead, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (m < 0 && errno == EINVAL) {  // this fd takes no splice (O_APPEND on some kernels): read/write
          r.copy = true;
          r.pending.resize(r.ahead);
          if (!take(from, r.pending.data(), r.ahead, "read the command's output")) return false;
          r.ahead = 0;
          continue;
        }
        if (m > 0) r.ahead -= static_cast<size_t>(m);
      } else {
        m = r.sock ? ::send(r.to.get(), r.pending.data(), r.pending.size(), MSG_DONTWAIT | MSG_NOSIGNAL)
                   : ::write(r.to.get(), r.pending.data(), r.pending.size());
        if (m > 0) r.pending.erase(0, static_cast<size_t>(m));
      }
      if (m > 0) continue;
      if (m < 0 && errno == EINTR) continue;
      if (m < 0 && errno == EAGAIN) {
        event* rd = i ? ev_err_ : ev_out_;
        if (rd) event_del(rd);
        r.waiting = true;
        event_add(r.ev, nullptr);
        return false;
      }
      client_stream_gone(i, m < 0 ? errno : EPIPE);
      return false;
    }
    return true;
  }

  template <int I>
  static void on_client_writable(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<Impl*>(arg);
    Relay& r = self->relay_[I];
    r.waiting = false;
    if (self->finished_ || !self->flush_relay(I)) return;
    self->maybe_finish();  // after the drain timeout: these were the last bytes
    if (self->finished_) return;
    event* rd = I ? self->ev_err_ : self->ev_out_;
    bool eof = I ? self->err_eof_ : self->out_eof_;
    if (rd && !eof && !self->paused_) event_add(rd, nullptr);
  }

  // The client's fd refuses more (its reader is gone: EPIPE; a full disk):
  // the command's next write on that stream fails with EPIPE, as it would
  // writing to that fd itself. What it wrote before is recorded.
  void client_stream_gone(int i, int err) {
    log::info("the client's output is closed; the command's further output on it fails",
              {{"stream", i ? "stderr" : "stdout"}, {"error", std::string(strerror(err))}});
    Relay& r = relay_[i];
    r.ahead = 0;
    r.pending.clear();
    if (event* rd = i ? ev_err_ : ev_out_) event_del(rd);
    (i ? err_fd_ : out_fd_).reset();
    mark_eof(i == 1);
  }

  void relay_failed(const std::string& why) {
    log::error("relay failed", {{"error", why}});
    ExecResult res;
    res.signal = SIGKILL;
    res.exit_code = 128 + SIGKILL;
    res.error = "internal error: relay: " + why;
    finish_with(res);
  }

  // The session owns its processes: when it ends they end (docs/design.md).
  void kill_all() {
    if (proc_.pidfd) pidfd_signal(proc_.pidfd.get(), SIGKILL);
    if (proc_.pid > 0) ::kill(-proc_.pid, SIGKILL);  // its process group (it called setsid)
    if (conf_) conf_->kill_all();
    if (proc_.pidfd && !exited_) {
      siginfo_t si{};
      waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(proc_.pidfd.get()), &si, WEXITED);
      exited_ = true;
    }
  }

  Context& ctx_;
  ExecSink& sink_;
  bool tty_ = false, stdin_ = false, keep_stdout_ = true, keep_stderr_ = true;
  nsenter::Spawned proc_;
  std::optional<Confinement> conf_;     // the session's cgroup, label, Landlock (outlives proc_'s kill)
  std::unique_ptr<ExecRecording> rec_;  // the exec's recording, when it is recorded (docs/recording.md)
  Fd in_fd_, out_fd_, err_fd_;
  std::vector<Fd> passed_fds_;  // pass_stdio()'s, until start()
  bool passed_ = false;         // the command has the client's stdio (no pipes)
  Relay relay_[2];
  bool relay_on_ = false;
  std::vector<char> relay_buf_;  // the recorder's copy of one chunk
  event *ev_out_ = nullptr, *ev_err_ = nullptr, *ev_in_ = nullptr, *ev_exit_ = nullptr, *ev_drain_ = nullptr,
        *ev_watch_ = nullptr;
  std::string stdin_buf_;
  bool stdin_eof_ = false, stdin_closed_ = false, paused_ = false;
  bool out_eof_ = false, err_eof_ = false, exited_ = false, finished_ = false;
  ExecResult result_;
  int64_t bytes_out_ = 0, bytes_err_ = 0;
  uint64_t bytes_in_ = 0;  // stdin accepted from the client
};

ExecEngine::ExecEngine(Context& ctx, ExecSink& sink) : impl_(std::make_unique<Impl>(ctx, sink)) {}
ExecEngine::~ExecEngine() = default;
void ExecEngine::start(const ExecSpec& spec, const ticket::Claims& claims) { impl_->start(spec, claims); }
void ExecEngine::pass_stdio(std::vector<Fd> fds) { impl_->passed_fds_ = std::move(fds); }
bool ExecEngine::stdio_passed() const { return impl_->passed_ || impl_->relay_on_; }
void ExecEngine::write_stdin(const uint8_t* data, size_t len) { impl_->write_stdin(data, len); }
void ExecEngine::close_stdin() { impl_->close_stdin(); }
size_t ExecEngine::stdin_queued() const { return impl_->stdin_buf_.size(); }
void ExecEngine::resize(uint16_t cols, uint16_t rows) { impl_->resize(cols, rows); }
void ExecEngine::resume_output() { impl_->resume_output(); }
void ExecEngine::abort(const std::string& why) { impl_->abort(why); }
bool ExecEngine::done() const { return impl_->finished_; }

// ---------------------------------------------------------------- native HTTP/2 sink

namespace {

class Exec : public StreamHandler, public ExecSink {
 public:
  Exec(Session& s, int32_t stream) : s_(s), stream_(stream), engine_(s, *this) {}

  void start(const proto::Headers& h, const ticket::Claims& claims) {
    const std::string* spec_s = proto::find_header(h, proto::kExecHeader);
    if (!spec_s) return refuse(400, std::string("missing ") + proto::kExecHeader + " header");
    nlohmann::json spec = nlohmann::json::parse(*spec_s, nullptr, false);
    if (!spec.is_object() || !spec.contains("command") || !spec["command"].is_array())
      return refuse(400, std::string(proto::kExecHeader) + " must be a JSON object with a command array");
    ExecSpec es;
    for (auto& a : spec["command"]) {
      if (!a.is_string()) return refuse(400, "command must be an array of strings");
      es.argv.push_back(a.get<std::string>());
    }
    try {
      es.stdin_ = spec.value("stdin", false);
      es.tty = spec.value("tty", false);
      if (es.tty) {
        es.cols = static_cast<uint16_t>(std::clamp(spec.value("cols", 80), 1, 65535));
        es.rows = static_cast<uint16_t>(std::clamp(spec.value("rows", 24), 1, 65535));
        es.term = spec.value("term", std::string("xterm"));
      }
    } catch (const nlohmann::json::exception&) {
      return refuse(400, std::string(proto::kExecHeader) + ": stdin/tty must be booleans, cols/rows numbers");
    }
    if (es.argv.empty()) return refuse(400, "empty command");
    if (es.argv != claims.cmd) return refuse(403, "ticket does not allow this command");
    if (es.stdin_ != claims.stdin_ || es.tty != claims.tty)
      return refuse(403, "ticket does not allow these stdin/tty flags");
    tty_ = es.tty;
    // The client passed its stdio with its first bytes (local socket only:
    // no other connection can carry fds).
    if (auto st = spec.find("stdio"); st != spec.end() && st->is_string() && *st == proto::kStdioClient)
      engine_.pass_stdio(s_.conn().take_passed_fds());
    engine_.start(es, claims);
  }

  // Refused before anything ran: nothing to end or kill when the stream closes
  // (and no "session.end" audit line for a session that never started).
  void refuse(int status, const std::string& why) {
    finished_ = true;
    s_.refuse(stream_, status, why);
  }

  // ExecSink
  void on_started(pid_t) override {
    proto::Headers h = {{":status", "200"}, {"content-type", "application/x-shimlet-exec"}};
    if (engine_.stdio_passed()) h.emplace_back(proto::kStdioHeader, proto::kStdioClient);
    s_.conn().respond(stream_, h);
  }
  void on_output(int fd, const char* data, size_t len) override {
    // The header, then the payload from the engine's buffer: no frame copy.
    auto header = proto::frame_header(fd == 2 ? proto::FrameType::Stderr : proto::FrameType::Stdout, len);
    s_.conn().send(stream_, header.data(), header.size());
    s_.conn().send(stream_, data, len);
  }
  size_t out_queued() const override {
    // Same per-stream limit the H2 connection drains against (on_drain resumes).
    size_t q = s_.conn().outbound(stream_);
    return q > s_.conn().settings().out_high_water ? ExecEngine::kOutHighWater + 1 : 0;
  }
  void on_stdin_consumed(size_t n) override {
    (void)n;
    // Return flow-control window only while the engine's stdin buffer has room.
    if (engine_.stdin_queued() < ExecEngine::kStdinHighWater && owed_ > 0) {
      s_.conn().consume(stream_, owed_);
      owed_ = 0;
    }
  }
  void on_exit(const ExecResult& r) override {
    finished_ = true;
    nlohmann::json st = {{"exit_code", r.exit_code}};
    if (r.signal) st["signal"] = r.signal;
    if (!r.error.empty()) st["error"] = r.error;
    if (!r.killed.empty()) st["killed"] = r.killed;
    std::string frame;
    proto::append_frame(frame, proto::FrameType::Status, st.dump());
    // Last, touching nothing of ours afterwards: when the client already
    // ended its side, end() closes the stream and the session destroys this
    // handler before it returns.
    Session& s = s_;
    int32_t stream = stream_;
    s.conn().send(stream, frame.data(), frame.size());
    s.conn().end(stream);
  }

  // StreamHandler
  void on_data(const uint8_t* data, size_t len) override {
    owed_ += len;
    dec_.decode(std::string_view(reinterpret_cast<const char*>(data), len),
                [this](proto::FrameType type, std::string_view payload) {
                  switch (type) {
                    case proto::FrameType::Stdin:
                      engine_.write_stdin(reinterpret_cast<const uint8_t*>(payload.data()), payload.size());
                      break;
                    case proto::FrameType::StdinEof:
                      engine_.close_stdin();
                      break;
                    case proto::FrameType::Resize: {
                      uint16_t c, r;
                      if (tty_ && proto::parse_resize(payload, c, r)) engine_.resize(c, r);
                      break;
                    }
                    default:
                      break;
                  }
                  return !finished_;
                });
    if (finished_) return;
    if (!dec_.error().empty()) {
      log::warn("bad exec frame from client", {{"error", dec_.error()}});
      s_.conn().reset(stream_, NGHTTP2_PROTOCOL_ERROR);
      return;
    }
    on_stdin_consumed(0);
  }

  void on_remote_end() override { engine_.close_stdin(); }
  void on_drain() override { engine_.resume_output(); }
  void on_close(uint32_t code) override {
    if (!finished_) abort(code ? "stream reset by client" : "stream closed");
  }
  void abort(const std::string& why) override {
    if (finished_) return;
    finished_ = true;
    engine_.abort(why);
  }
  void container_exited() override {}  // the command dies with the pid namespace; its exit is reported
  bool done() const override { return finished_; }

 private:
  Session& s_;
  int32_t stream_;
  bool tty_ = false, finished_ = false;
  proto::FrameDecoder dec_;
  size_t owed_ = 0;  // received bytes whose flow-control window is not returned yet
  ExecEngine engine_;
};

}  // namespace

std::unique_ptr<StreamHandler> start_exec(Session& s, int32_t stream, const proto::Headers& h,
                                          const ticket::Claims& claims) {
  auto e = std::make_unique<Exec>(s, stream);
  e->start(h, claims);
  return e;
}

}  // namespace shimlet::session
