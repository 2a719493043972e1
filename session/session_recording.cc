#include "session/session_recording.h"

#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>

#include "common/error.h"
#include "common/event.h"
#include "common/log.h"
#include "common/proc.h"
#include "recording/spool.h"
#include "spool/spool.h"

namespace shimlet::session {
namespace {

struct Plan {
  bool fail_closed = true;
  uint64_t max_bytes = 0;
};

// The ticket's claim, else (a ticket signed with the node's local key) the
// node's local policy. Port-forwards never get here.
std::optional<Plan> plan_for(const RecordingSettings& s, const ticket::Claims& c, bool tty) {
  if (c.rec) return Plan{c.rec->fail_closed, c.rec->max_bytes ? c.rec->max_bytes : s.max_bytes};
  if (c.verified_kid != "local") return std::nullopt;
  if (s.local == "all" || (s.local == "tty" && tty)) return Plan{s.fail_closed, s.max_bytes};
  return std::nullopt;
}

// The container's init has exited, or is exiting: its pid namespace is
// being torn down, which kills our command before init's own exit is
// visible on its pidfd (the kernel waits for the namespace to empty first).
// PF_EXITING in /proc/PID/stat (field 9) says so at once.
bool container_ending(const nsenter::Container& c) {
  pollfd p{c.pidfd, POLLIN, 0};
  if (p.fd >= 0 && ::poll(&p, 1, 0) == 1) return true;
  constexpr uint64_t kPfExiting = 0x4;
  try {
    std::optional<ProcStat> st = proc_stat(c.init_pid);
    return !st || (st->flags & kPfExiting);  // gone, or exiting
  } catch (const Error&) {
    return true;  // an unreadable stat: not a running init
  }
}

bool exists(const std::string& p) {
  struct stat st {};
  return ::lstat(p.c_str(), &st) == 0;
}

}  // namespace

RecordingSettings parse_recording_settings(const nlohmann::json& j) {
  RecordingSettings s;
  if (!j.is_object()) return s;
  s.dir = j.value("dir", std::string());
  s.root = j.value("root", std::string());
  s.local = j.value("local", s.local);
  s.fail_closed = j.value("disk_full", std::string("fail-closed")) != "fail-open";
  s.max_bytes = j.value("max_bytes", s.max_bytes);
  s.spool_max_bytes = j.value("spool_max_bytes", s.spool_max_bytes);
  return s;
}

ExecRecording::ExecRecording(Context& ctx, std::unique_ptr<recording::Recorder> rec, bool fail_closed, OnFailClosed cb)
    : ctx_(ctx), rec_(std::move(rec)), fail_closed_(fail_closed), on_fail_closed_(std::move(cb)) {
  ev_fail_ = new_event(ctx_.base(), rec_->failure_fd(), EV_READ, on_failure, this);
  if (event_add(ev_fail_.get(), nullptr) < 0) throw Error("recording: event_add failed");
  ev_drained_ = new_event(ctx_.base(), rec_->drained_fd(), EV_READ, on_drained, this);
}

ExecRecording::~ExecRecording() {
  resume_ = nullptr;  // the engine is going away
  finish(recording::incomplete_marker("the session ended without closing its recording"));
}

std::unique_ptr<ExecRecording> ExecRecording::begin(Context& ctx, const ExecSpec& spec, const ticket::Claims& claims,
                                                    OnFailClosed on_fail_closed) {
  const RecordingSettings& s = ctx.config().recording;
  std::optional<Plan> plan = plan_for(s, claims, spec.tty);
  if (!plan) return nullptr;
  const Config& cfg = ctx.config();
  // The master's id when the ticket has one (it is in the grant and the
  // audit); the shim's own otherwise, or when that name is taken.
  std::string id = spool::valid_sid(claims.sid) ? claims.sid : ctx.sid();
  try {
    if (s.dir.empty()) throw Error("this node has no recording directory (its shim predates recordings)");
    recording::spool::prepare(s.root, s.dir);
    if (exists(s.dir + "/" + id + ".cast") || exists(s.dir + "/" + id + ".rec")) id += "-" + ctx.sid();
    if (uint64_t used = recording::spool::usage(s.root); used >= s.spool_max_bytes)
      throw Error("the node's recording outbox is full (" + std::to_string(used) + " bytes, limit " +
                  std::to_string(s.spool_max_bytes) + ")");
    recording::Recorder::Options o;
    o.dir = s.dir;
    o.id = id;
    o.max_bytes = plan->max_bytes;
    o.tty = spec.tty;
    recording::Header& h = o.header;
    h.width = spec.tty ? spec.cols : 80;
    h.height = spec.tty ? spec.rows : 24;
    h.timestamp = ::time(nullptr);
    if (spec.tty) h.term = spec.term.substr(0, 64);
    h.command = spec.argv;
    h.shimlet = {{"user", claims.sub},
                 {"namespace", cfg.ns},
                 {"pod", cfg.pod},
                 {"container", cfg.container},
                 {"container_id", cfg.id},
                 {"node", cfg.node},
                 {"session_id", spool::valid_sid(claims.sid) ? claims.sid : ctx.sid()},
                 {"shim_session", ctx.sid()},
                 {"jti", claims.jti},
                 {"start", log::rfc3339(h.timestamp)},
                 {"command", spec.argv},
                 {"tty", spec.tty},
                 {"stdin", spec.stdin_}};
    auto rec = std::make_unique<recording::Recorder>(std::move(o));
    log::audit("recording.start", {{"recording", id},
                                   {"max_bytes", plan->max_bytes},
                                   {"disk_full", plan->fail_closed ? "fail-closed" : "fail-open"}});
    return std::unique_ptr<ExecRecording>(
        new ExecRecording(ctx, std::move(rec), plan->fail_closed, std::move(on_fail_closed)));
  } catch (const std::exception& e) {
    std::string why = std::string("the session must be recorded but the recording cannot be written: ") + e.what();
    log::audit(
        "recording.failed",
        {{"recording", id}, {"error", e.what()}, {"disk_full", plan->fail_closed ? "fail-closed" : "fail-open"}});
    ctx.note_recording({{"id", id}, {"error", std::string(e.what()).substr(0, 1000)}});
    if (plan->fail_closed) throw RecordingRefused(why);
    log::warn("recording failed: the session goes on unrecorded (fail-open)", {{"error", e.what()}});
    return nullptr;
  }
}

void ExecRecording::on_failure(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<ExecRecording*>(arg);
  std::string err = self->rec_ ? self->rec_->failure() : "";
  log::audit("recording.failed", {{"recording", self->rec_ ? self->rec_->id() : ""},
                                  {"error", err},
                                  {"disk_full", self->fail_closed_ ? "fail-closed" : "fail-open"}});
  if (self->fail_closed_) {
    // The engine ends the session (and calls end(), which notes the failure).
    self->on_fail_closed_("the session must be recorded but the recording cannot be written (" + err + ")");
    return;
  }
  log::warn("recording failed: the session goes on unrecorded (fail-open)", {{"error", err}});
  self->finish("");
}

void ExecRecording::when_drained(std::function<void()> resume) {
  if (!rec_ || !rec_->notify_when_drained()) return resume();
  resume_ = std::move(resume);
  if (event_add(ev_drained_.get(), nullptr) < 0) {  // cannot wait: go on at once (the queue stays bounded)
    resume_ = nullptr;
    return resume();
  }
}

void ExecRecording::on_drained(evutil_socket_t fd, short, void* arg) {
  auto* self = static_cast<ExecRecording*>(arg);
  uint64_t n;
  (void)!::read(fd, &n, sizeof n);  // EAGAIN when finish() woke us
  std::function<void()> resume = std::move(self->resume_);
  self->resume_ = nullptr;
  if (resume) resume();
}

void ExecRecording::output(int fd, const char* data, size_t len) {
  if (rec_) rec_->output(fd == 2 ? recording::Code::Stderr : recording::Code::Output, data, len);
}

void ExecRecording::input(const char* data, size_t len, int pty) {
  if (!rec_) return;
  termios t{};
  // The terminal's mode when the input arrives decides (the echo rule).
  if (pty >= 0 && ::tcgetattr(pty, &t) < 0) t.c_lflag = ECHO | ICANON;
  rec_->input(data, len, t.c_lflag);
}

void ExecRecording::resize(uint16_t cols, uint16_t rows) {
  if (rec_) rec_->resize(cols, rows);
}

void ExecRecording::end(ExecResult& r) {
  if (!rec_) return;
  // The container's init gone: the command died with its pid namespace, not
  // of its own accord; the recording says so.
  bool container_gone = r.signal == SIGKILL && container_ending(ctx_.container());
  std::string status = recording::end_marker(r.exit_code, r.signal).substr(5);
  std::string error;
  if (container_gone)
    error = finish(recording::incomplete_marker("the container exited during the session (" + status + ")"));
  else if (!r.killed.empty() && r.killed != "memory" && r.killed != "pids")
    error = finish(recording::incomplete_marker(r.error));
  else
    error = finish(recording::end_marker(r.exit_code, r.signal));
  // Killed already (a limit, the recording while it ran): that is the result.
  if (!fail_closed_ || error.empty() || !r.killed.empty()) return;
  log::audit("recording.failed", {{"error", error}, {"disk_full", "fail-closed"}, {"after_exit", true}});
  r.error = "the session must be recorded but the recording cannot be written (" + error +
            "); the command's own status (" + status + ") is withheld";
  r.killed = "recording";
  r.exit_code = kRecordingWithheldExit;
  r.signal = 0;
}

void ExecRecording::abort(const std::string& why) { finish(recording::incomplete_marker(why)); }

// marker "": stop recording after a failure (fail-open), leaving the file for
// the spool to finish as incomplete.
std::string ExecRecording::finish(const std::string& marker) {
  if (!rec_) return "";
  if (ev_fail_) event_del(ev_fail_.get());
  if (ev_drained_) event_del(ev_drained_.get());
  // Output waiting for the writer goes on (fail-open): nothing is recorded now.
  if (resume_) event_active(ev_drained_.get(), EV_READ, 0);
  recording::Recorder::Result res;
  if (marker.empty()) {
    res = rec_->abandon();
  } else {
    res = rec_->finish(marker);
  }
  nlohmann::json j = {{"id", rec_->id()},           {"bytes", res.bytes},       {"out_bytes", res.out_bytes},
                      {"err_bytes", res.err_bytes}, {"in_bytes", res.in_bytes}, {"complete", res.complete},
                      {"truncated", res.truncated}};
  if (!res.error.empty()) j["error"] = res.error.substr(0, 1000);
  ctx_.note_recording(j);
  log::audit("recording.end", j);
  rec_.reset();
  return res.error;
}

}  // namespace shimlet::session
