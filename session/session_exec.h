// Transport-neutral exec engine: runs one command in the container (nsenter/)
// with pipes or a pty, feeds stdin, applies resizes, reads stdout/stderr with
// backpressure, drains output after the exit (bounded by drain_timeout_ms),
// reports the exact status, and kills every process of the session when it
// is dropped. Transports are sinks of it: the native HTTP/2 stream
// (session_exec.cc), WebSocket channels (session_k8s.cc), SPDY streams
// (session_spdy.cc). Internal to shimlet-session.
//
// Usage: construct with a Context and a sink, call start(spec). The sink gets
// on_started() once (the process runs, or it could not start), then
// on_output() chunks, then on_exit() exactly once as the engine's last act
// (the sink may destroy the engine inside on_exit()). Feed stdin with
// write_stdin()/close_stdin(); when the sink's out_queued() is above
// kOutHighWater the engine stops reading output until resume_output().
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "session/session_context.h"
#include "ticket/ticket.h"

namespace shimlet::session {

struct ExecSpec {
  std::vector<std::string> argv;
  bool stdin_ = false;  // the client sends stdin; without it the command sees EOF at once
  bool tty = false;     // a pty (stdout and stderr merged, as a terminal does)
  bool stdout_ = true;  // Kubernetes stdout=false: stdout output (with a tty: all output) is discarded
  bool stderr_ = true;  // Kubernetes stderr=false: stderr output is discarded
  // The pty's first size; 0x0: none until the first resize (the Kubernetes
  // doors: runc exec without a console size, which the kubelet's runtime does).
  uint16_t cols = 80, rows = 24;
  std::string term = "xterm";  // sanitized by the engine
};

struct ExecResult {
  int exit_code = 0;
  int signal = 0;      // killed by this signal (exit_code = 128 + signal)
  std::string error;   // could not start (exit_code 127 not found, 126 not executable), or why it was killed
  std::string killed;  // "memory" | "pids": the shim killed the session for exceeding that limit
};

class ExecSink {
 public:
  virtual ~ExecSink() = default;
  // Once, before any output: pid > 0 when the process runs; 0 when it could
  // not start (on_exit() follows at once with the error).
  virtual void on_started(pid_t pid) = 0;
  // Output: fd 1 stdout, 2 stderr (with a tty everything is 1).
  virtual void on_output(int fd, const char* data, size_t len) = 0;
  // Bytes the sink holds that the client has not taken yet.
  virtual size_t out_queued() const = 0;
  // Stdin bytes left the engine's buffer (written to the process, or dropped
  // because it closed its stdin): flow-control credit for the client.
  virtual void on_stdin_consumed(size_t /*n*/) {}
  // Last call: the process exited and its output is drained (or it never started).
  virtual void on_exit(const ExecResult& r) = 0;
};

class ExecEngine {
 public:
  static constexpr size_t kOutHighWater = 1u << 20;    // sink queue above this: stop reading output
  static constexpr size_t kStdinHighWater = 1u << 20;  // stdin buffered above this: the sink should stop reading

  ExecEngine(Context& ctx, ExecSink& sink);
  ~ExecEngine();  // kills every process of the session that is still alive
  ExecEngine(const ExecEngine&) = delete;
  ExecEngine& operator=(const ExecEngine&) = delete;

  // Spawns the command for an authenticated ticket (claims: per-session
  // limits etc.; argv/stdin/tty are already checked against it). Throws only
  // for internal errors (the caller answers 500); a command that cannot run
  // is on_started(0) + on_exit(126/127).
  void start(const ExecSpec& spec, const ticket::Claims& claims);
  // Root's local exec (docs/design.md "Local socket"): the client's own
  // stdin (only when spec.stdin_), stdout and stderr, in that order, become
  // the command's, as runc exec hands its stdio on; the engine then copies
  // and reads nothing and reports only the exit. Call before start(). A
  // recorded exec without stdin whose stdout and stderr are each a pipe, a
  // socket or a regular file relays instead: the command writes into the
  // session's pipes, and each chunk is recorded (tee) and then moved to the
  // client's fd (splice; read/write where splice cannot), never blocking on
  // it (backpressure: output waits for the client and the recorder). Not
  // used (the fds are closed, pipes as usual) with a tty, any other recorded
  // exec, a discarded stream, or the wrong number of fds: stdio_passed() says
  // whether the client's fds are used (directly or relayed), from
  // on_started() on.
  void pass_stdio(std::vector<Fd> fds);
  bool stdio_passed() const;
  void write_stdin(const uint8_t* data, size_t len);
  // End of stdin (pipes: the command reads EOF; tty: ignored, like a terminal).
  void close_stdin();
  size_t stdin_queued() const;
  void resize(uint16_t cols, uint16_t rows);
  // The sink's queue drained: read output again.
  void resume_output();
  // The client is gone: kill everything, audit, never call the sink again.
  void abort(const std::string& why);
  bool done() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace shimlet::session
