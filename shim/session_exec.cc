// The exec request: start the command in the container (nsenter/), then
// shuttle stdin/stdout/stderr/resize as frames (proto/frames.h) until the
// process exits and its output is drained, and send its exact status.
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/log.h"
#include "proto/frames.h"
#include "shim/session_internal.h"

namespace shimlet::session {
namespace {

constexpr size_t kReadChunk = 64 * 1024;
constexpr size_t kStdinHigh = 1u << 20;  // buffered stdin before we stop returning window

int pidfd_signal(int pidfd, int sig) {
  return static_cast<int>(syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

std::string sanitize_term(const std::string& t) {
  if (t.empty() || t.size() > 64) return "xterm";
  for (char c : t)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' || c == '+')) return "xterm";
  return t;
}

class Exec : public StreamHandler {
 public:
  Exec(Session& s, int32_t stream) : s_(s), stream_(stream) {}
  ~Exec() override {
    for (event* e : {ev_out_, ev_err_, ev_in_, ev_exit_, ev_drain_})
      if (e) event_free(e);
    kill_all();
  }

  // Returns false when a response was already sent (error).
  void start(const proto::Headers& h, const ticket::Claims& claims) {
    const std::string* spec_s = proto::find_header(h, proto::kExecHeader);
    if (!spec_s) return refuse(400, std::string("missing ") + proto::kExecHeader + " header");
    nlohmann::json spec = nlohmann::json::parse(*spec_s, nullptr, false);
    if (!spec.is_object() || !spec.contains("command") || !spec["command"].is_array())
      return refuse(400, std::string(proto::kExecHeader) + " must be a JSON object with a command array");
    std::vector<std::string> argv;
    for (auto& a : spec["command"]) {
      if (!a.is_string()) return refuse(400, "command must be an array of strings");
      argv.push_back(a.get<std::string>());
    }
    bool want_stdin = spec.value("stdin", false), want_tty = spec.value("tty", false);
    if (argv.empty()) return refuse(400, "empty command");
    if (argv != claims.cmd) return refuse(403, "ticket does not allow this command");
    if (want_stdin != claims.stdin_ || want_tty != claims.tty)
      return refuse(403, "ticket does not allow these stdin/tty flags");
    tty_ = want_tty;
    stdin_ = want_stdin;

    nsenter::Request req;
    req.argv = argv;
    nsenter::Stdio io;
    io.tty = tty_;
    Pipe in_p = make_pipe(), out_p = make_pipe(), err_p = make_pipe();
    if (tty_) {
      int cols = spec.value("cols", 80), rows = spec.value("rows", 24);
      io.cols = static_cast<unsigned short>(std::clamp(cols, 1, 65535));
      io.rows = static_cast<unsigned short>(std::clamp(rows, 1, 65535));
      req.extra_env.push_back("TERM=" + sanitize_term(spec.value("term", std::string("xterm"))));
    } else {
      io.in = in_p.read.get();
      io.out = out_p.write.get();
      io.err = err_p.write.get();
      // Bigger pipes: fewer wakeups per byte on bulk output.
      fcntl(out_p.read.get(), F_SETPIPE_SZ, 1 << 20);
      fcntl(err_p.read.get(), F_SETPIPE_SZ, 1 << 20);
    }
    const auto& membership = cgroup_membership();
    req.place = [this, &membership](pid_t pid) {
      if (cg_)
        cg_->attach(pid);
      else
        cgroup::attach(membership, pid);
    };
    try {
      try {
        cg_.emplace(cgroup::SessionCgroup::create(membership, s_.sid(), cgroup::Limits{}));
      } catch (const std::exception& e) {
        log::warn("no session cgroup; joining the container's cgroups only", {{"error", e.what()}});
      }
      proc_ = nsenter::spawn(s_.container(), req, io);
    } catch (const nsenter::ExecError& e) {
      // Like a shell: the request was fine, the command could not run.
      respond_ok();
      log::audit("exec.start", {{"command", argv}, {"tty", tty_}, {"stdin", stdin_}, {"error", e.what()}});
      return finish_with(e.exit_code, 0, e.what());
    }
    log::audit("exec.start", {{"command", argv}, {"tty", tty_}, {"stdin", stdin_}, {"pid", proc_.pid}});
    respond_ok();
    if (tty_) {
      out_fd_ = std::move(proc_.pty_master);
      set_nonblocking(out_fd_.get());
      in_fd_ = Fd(::fcntl(out_fd_.get(), F_DUPFD_CLOEXEC, 3));
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
      // Without -i the command sees EOF at once: in_p.write closes with this scope.
    }
    event_base* b = s_.base();
    ev_out_ = event_new(b, out_fd_.get(), EV_READ | EV_PERSIST, on_readable, this);
    event_add(ev_out_, nullptr);
    if (err_fd_) {
      ev_err_ = event_new(b, err_fd_.get(), EV_READ | EV_PERSIST, on_readable, this);
      event_add(ev_err_, nullptr);
    }
    if (in_fd_) ev_in_ = event_new(b, in_fd_.get(), EV_WRITE, on_writable, this);
    ev_exit_ = event_new(b, proc_.pidfd.get(), EV_READ, on_exit, this);
    event_add(ev_exit_, nullptr);
  }

  // Refused before anything ran: nothing to end or kill when the stream closes
  // (and no "session.end" audit line for a session that never started).
  void refuse(int status, const std::string& why) {
    finished_ = true;
    s_.refuse(stream_, status, why);
  }

  void on_data(const uint8_t* data, size_t len) override {
    dec_.feed(std::string_view(reinterpret_cast<const char*>(data), len));
    owed_ += len;
    while (auto f = dec_.next()) {
      switch (f->type) {
        case proto::FrameType::Stdin:
          if (in_fd_ && !stdin_closed_) stdin_buf_ += f->payload;
          break;
        case proto::FrameType::StdinEof:
          stdin_eof_ = true;
          break;
        case proto::FrameType::Resize: {
          uint16_t c, r;
          if (tty_ && out_fd_ && proto::parse_resize(f->payload, c, r)) {
            winsize ws{r, c, 0, 0};
            ioctl(out_fd_.get(), TIOCSWINSZ, &ws);
          }
          break;
        }
        default:
          break;
      }
    }
    if (!dec_.error().empty()) {
      log::warn("bad exec frame from client", {{"error", dec_.error()}});
      s_.conn().reset(stream_, NGHTTP2_PROTOCOL_ERROR);
      return;
    }
    flush_stdin();
  }

  void on_remote_end() override {
    stdin_eof_ = true;
    flush_stdin();
  }

  void on_drain() override { resume_reading(); }

  void on_close(uint32_t code) override {
    if (!finished_) abort(code ? "stream reset by client" : "stream closed");
  }

  void abort(const std::string& why) override {
    if (finished_) return;
    finished_ = true;
    log::audit("session.end", {{"reason", why}, {"killed", true}});
    kill_all();
  }

  void container_exited() override {}  // the command dies with the pid namespace; its exit is reported

  bool done() const override { return finished_; }

 private:
  const cgroup::Membership& cgroup_membership() {
    membership_ = cgroup::of_pid(s_.container().init_pid);
    return membership_;
  }

  void respond_ok() {
    s_.conn().respond(stream_, {{":status", "200"}, {"content-type", "application/x-shimlet-exec"}});
  }

  static void on_readable(evutil_socket_t fd, short, void* arg) {
    auto* self = static_cast<Exec*>(arg);
    self->read_from(fd, false);
  }

  // Reads what is available on an output fd into frames. With force, reads
  // even when the client is slow (final drain: bounded by the pipe size).
  void read_from(int fd, bool force) {
    bool is_err = err_fd_ && fd == err_fd_.get();
    char buf[kReadChunk];
    for (int rounds = 0; rounds < 64; rounds++) {
      if (!force && s_.conn().outbound(stream_) > s_.conn().settings().out_high_water) {
        pause_reading();
        return;
      }
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n > 0) {
        std::string frame;
        proto::append_frame(frame, is_err ? proto::FrameType::Stderr : proto::FrameType::Stdout,
                            std::string_view(buf, static_cast<size_t>(n)));
        s_.conn().send(stream_, frame.data(), frame.size());
        if (is_err)
          bytes_err_ += n;
        else
          bytes_out_ += n;
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

  void resume_reading() {
    if (!paused_ || finished_) return;
    paused_ = false;
    if (ev_out_ && !out_eof_) event_add(ev_out_, nullptr);
    if (ev_err_ && !err_eof_) event_add(ev_err_, nullptr);
  }

  static void on_writable(evutil_socket_t, short, void* arg) { static_cast<Exec*>(arg)->flush_stdin(); }

  void flush_stdin() {
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
    // Return flow-control window only for what left our buffer.
    if (stdin_buf_.size() < kStdinHigh && owed_ > 0) {
      s_.conn().consume(stream_, owed_);
      owed_ = 0;
    }
  }

  static void on_exit(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<Exec*>(arg);
    siginfo_t si{};
    if (waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(self->proc_.pidfd.get()), &si, WEXITED | WNOHANG) <
            0 ||
        si.si_pid == 0)
      return;
    self->exited_ = true;
    if (si.si_code == CLD_EXITED) {
      self->exit_code_ = si.si_status;
    } else {
      self->signal_ = si.si_status;
      self->exit_code_ = 128 + si.si_status;
    }
    // Bounded drain: a background child holding stdout must not hang us.
    self->ev_drain_ = evtimer_new(self->s_.base(), on_drain_timeout, self);
    timeval tv{self->s_.config().drain_timeout_ms / 1000, (self->s_.config().drain_timeout_ms % 1000) * 1000};
    evtimer_add(self->ev_drain_, &tv);
    self->maybe_finish();
  }

  static void on_drain_timeout(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<Exec*>(arg);
    log::info("output not closed after the command exited; ending after the drain timeout");
    if (self->out_fd_ && !self->out_eof_) self->read_from(self->out_fd_.get(), true);
    if (self->err_fd_ && !self->err_eof_) self->read_from(self->err_fd_.get(), true);
    self->out_eof_ = self->err_eof_ = true;
    self->maybe_finish();
  }

  void maybe_finish() {
    if (finished_ || !exited_ || !out_eof_ || !err_eof_) return;
    finish_with(exit_code_, signal_, "");
  }

  void finish_with(int code, int sig, const std::string& error) {
    finished_ = true;
    kill_all();
    nlohmann::json st = {{"exit_code", code}};
    if (sig) st["signal"] = sig;
    if (!error.empty()) st["error"] = error;
    std::string frame;
    proto::append_frame(frame, proto::FrameType::Status, st.dump());
    nlohmann::json rec = {{"exit_code", code}, {"bytes_stdout", bytes_out_}, {"bytes_stderr", bytes_err_}};
    if (sig) rec["signal"] = sig;
    if (cg_) {
      auto u = cg_->usage();
      rec["cpu_usec"] = u.cpu_usec;
      rec["memory_peak"] = u.memory_peak;
    }
    log::audit("session.end", rec);
    for (event* e : {ev_out_, ev_err_, ev_in_, ev_exit_, ev_drain_})
      if (e) event_del(e);
    in_fd_.reset();
    out_fd_.reset();
    err_fd_.reset();
    // Last, touching nothing of ours afterwards: when the client already
    // ended its side, end() closes the stream and the session destroys this
    // handler before it returns.
    Session& s = s_;
    int32_t stream = stream_;
    s.conn().send(stream, frame.data(), frame.size());
    s.conn().end(stream);
  }

  // The session owns its processes: when it ends they end (docs/design.md).
  void kill_all() {
    if (proc_.pidfd) pidfd_signal(proc_.pidfd.get(), SIGKILL);
    if (proc_.pid > 0) ::kill(-proc_.pid, SIGKILL);  // its process group (it called setsid)
    if (cg_) {
      try {
        cg_->kill_all();
      } catch (const std::exception& e) {
        log::warn("session cgroup kill failed", {{"error", e.what()}});
      }
    }
    if (proc_.pidfd && !exited_) {
      siginfo_t si{};
      waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(proc_.pidfd.get()), &si, WEXITED);
      exited_ = true;
    }
  }

  Session& s_;
  int32_t stream_;
  bool tty_ = false, stdin_ = false;
  nsenter::Spawned proc_;
  cgroup::Membership membership_;
  std::optional<cgroup::SessionCgroup> cg_;
  Fd in_fd_, out_fd_, err_fd_;
  event *ev_out_ = nullptr, *ev_err_ = nullptr, *ev_in_ = nullptr, *ev_exit_ = nullptr, *ev_drain_ = nullptr;
  proto::FrameDecoder dec_;
  std::string stdin_buf_;
  size_t owed_ = 0;
  bool stdin_eof_ = false, stdin_closed_ = false, paused_ = false;
  bool out_eof_ = false, err_eof_ = false, exited_ = false, finished_ = false;
  int exit_code_ = 0, signal_ = 0;
  int64_t bytes_out_ = 0, bytes_err_ = 0;
};

}  // namespace

std::unique_ptr<StreamHandler> start_exec(Session& s, int32_t stream, const proto::Headers& h,
                                          const ticket::Claims& claims) {
  auto e = std::make_unique<Exec>(s, stream);
  e->start(h, claims);
  return e;
}

}  // namespace shimlet::session
