// The exec engine's recording (docs/recording.md "On the node"): whether an
// exec is recorded (the ticket's "rec" claim, or the node's local policy for
// tickets signed with local.key), the recorder itself (recording/recorder.h)
// and the disk-full policy. Internal to shimlet-session; the exec engine
// (session_exec.h) owns one per recorded exec, so every front door records.
//
// Call order: begin() before the command is spawned (fail-closed refuses it
// before anything runs), then output()/input()/resize() as events happen,
// then exactly one of end() (the command's exit is known) or abort() (the
// session ends early). The destructor of an unfinished one marks it
// incomplete. Each of these reports to the Context for the end record.
#pragma once
#include <event2/event.h>

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include "common/event.h"
#include "recording/recorder.h"
#include "session/session_context.h"
#include "session/session_exec.h"
#include "ticket/ticket.h"

namespace shimlet::session {

// shim.json "recording" (the hook copies its config's, docs/recording.md).
// dir empty (a shim.json from before recordings): nothing can be recorded.
RecordingSettings parse_recording_settings(const nlohmann::json& j);

// The exit code a fail-closed session reports when its command exited but
// its recording could not be completed: the command's own status is withheld
// (the end record keeps it); shimctl and kubectl both exit with it.
inline constexpr int kRecordingWithheldExit = 254;

// A recorded exec that cannot be recorded under fail-closed: refused.
struct RecordingRefused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class ExecRecording {
 public:
  // Called (from the event loop) when recording fails while the command
  // runs under fail-closed: the engine ends the session with this message.
  using OnFailClosed = std::function<void(const std::string& why)>;

  // nullptr: this exec is not recorded (no claim and no local policy, or
  // fail-open and the recording cannot start: logged, audited, and in the end
  // record). Throws RecordingRefused under fail-closed.
  static std::unique_ptr<ExecRecording> begin(Context& ctx, const ExecSpec& spec, const ticket::Claims& claims,
                                              OnFailClosed on_fail_closed);
  ~ExecRecording();
  ExecRecording(const ExecRecording&) = delete;
  ExecRecording& operator=(const ExecRecording&) = delete;

  // fd 1 stdout (with a tty, the terminal), 2 stderr.
  void output(int fd, const char* data, size_t len);
  // pty: the terminal's master fd (its termios decide the echo rule), -1 without a tty.
  void input(const char* data, size_t len, int pty);
  void resize(uint16_t cols, uint16_t rows);
  // The writer is behind: the engine stops reading output and calls
  // when_drained(resume), which runs resume (from the loop) once it caught up.
  bool backlog_high() const { return rec_ && rec_->backlog_high(); }
  void when_drained(std::function<void()> resume);
  // The command ended (r: its result). Fail-closed, when the recording could
  // not be completed (the disk filled while the writer was still behind, or
  // with the terminal marker), amends r: the session does not report the
  // command's success for an incomplete recording (docs/recording.md).
  void end(ExecResult& r);
  void abort(const std::string& why);

 private:
  ExecRecording(Context& ctx, std::unique_ptr<recording::Recorder> rec, bool fail_closed, OnFailClosed cb);
  static void on_failure(evutil_socket_t, short, void* arg);
  static void on_drained(evutil_socket_t, short, void* arg);
  // The writer's failure ("" when the recording is on disk as marked).
  std::string finish(const std::string& marker);

  Context& ctx_;
  std::unique_ptr<recording::Recorder> rec_;
  bool fail_closed_;
  OnFailClosed on_fail_closed_;
  EventPtr ev_fail_;
  EventPtr ev_drained_;
  std::function<void()> resume_;
};

}  // namespace shimlet::session
