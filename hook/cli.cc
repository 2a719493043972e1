// The hook as the runtime runs it: argv (CLI11), the OCI state on stdin, the
// overall deadline (the runtime waits for us), then the stage.
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <CLI/CLI.hpp>

#include "common/clock.h"
#include "common/error.h"
#include "common/exit.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/pidfd.h"
#include "common/version.h"
#include "hook/internal.h"

namespace shimlet::hook {

volatile sig_atomic_t g_shim_pidfd = -1;
volatile sig_atomic_t g_fail_exit = 0;
int64_t g_start_ms = 0;

namespace {

using nlohmann::json;

void on_deadline(int) {
  if (g_shim_pidfd >= 0) pidfd_signal(g_shim_pidfd, SIGKILL);
  static const char msg[] =
      "{\"level\":\"error\",\"component\":\"hook\",\"msg\":\"shimlet-hook: overall deadline exceeded, giving up\"}\n";
  ssize_t r = ::write(2, msg, sizeof msg - 1);
  (void)r;
  _exit(g_fail_exit ? 1 : 0);
}

std::string self_dir() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) throw sys_error("readlink /proc/self/exe");
  return dirname_of(std::string(buf, static_cast<size_t>(n)));
}

// One hook.log line's common fields; the caller adds "error" or "msg".
json hook_line(const char* level, const std::string& stage, const std::string& id) {
  return json{{"ts", now_rfc3339()}, {"component", "hook"}, {"level", level}, {"stage", stage}, {"id", id}};
}

void append_hook_log(const std::string& state_dir, const json& line) {
  Fd fd(::open((state_dir + "/hook.log").c_str(), O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!fd) return;
  std::string s = line.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  ssize_t r = ::write(fd.get(), s.data(), s.size());
  (void)r;
}

std::string read_stdin_bounded(int timeout_ms) {
  std::string out;
  Deadline deadline(timeout_ms);
  for (;;) {
    int left = deadline.left_ms();
    if (left <= 0) throw Error("OCI state on stdin not complete after " + std::to_string(timeout_ms) + " ms");
    pollfd p{0, POLLIN, 0};
    int r = ::poll(&p, 1, left);
    if (r < 0 && errno != EINTR) throw sys_error("poll stdin");
    if (r <= 0) continue;
    char buf[16384];
    ssize_t n = ::read(0, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) throw sys_error("read stdin");
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > kMaxStateBytes)
      throw Error("OCI state on stdin exceeds " + std::to_string(kMaxStateBytes) + " bytes");
  }
}

// Registers the container with the master and warns when the lease would
// lapse between renewals; throws what register_container throws.
void register_and_check(const Config& cfg, const std::string& id) {
  json lease = register_container(cfg, id);
  int64_t every = lease.value("renewIntervalSeconds", int64_t{0});
  if (every > 0 && cfg.master->renew_interval_s > every) {
    log::warn("master.renew_interval_s is longer than the master's renewIntervalSeconds: the lease may lapse",
              {{"renew_interval_s", cfg.master->renew_interval_s}, {"master_renew_interval_s", every}});
    json line = hook_line("warn", "createRuntime", id);
    line["msg"] = "master.renew_interval_s is longer than the master's renewIntervalSeconds: the lease may lapse";
    append_hook_log(cfg.state_dir, line);
  }
}

// createRuntime without fail_container_on_error (docs/design.md "Master
// registration"): the container's process does not wait for the master. A
// detached grandchild (its own session, stdio /dev/null: runc waits for EOF
// on the hook's pipes) registers after the hook returns, under the same
// deadline; a failure goes to hook.log, and the shim's renewer registers the
// container at its next tick anyway. Returns false when it could not fork
// (then the caller registers in line).
bool register_detached(const Config& cfg, const std::string& id, unsigned deadline_s) {
  pid_t a = ::fork();
  if (a < 0) return false;
  if (a == 0) {
    ::setsid();
    pid_t b = ::fork();
    if (b != 0) _exit(b < 0 ? 1 : 0);
    int dn = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (dn < 0 || ::dup2(dn, 0) < 0 || ::dup2(dn, 1) < 0 || ::dup2(dn, 2) < 0) _exit(1);
    alarm(deadline_s);  // not inherited across fork
    try {
      register_and_check(cfg, id);
    } catch (const std::exception& e) {
      json line = hook_line("error", "createRuntime", id);
      line["error"] = e.what();
      append_hook_log(cfg.state_dir, line);
    }
    exit_without_teardown(0);
  }
  int status = 0;
  while (::waitpid(a, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  g_start_ms = monotonic_ms();
  log::set_component("hook");
  // The runtime waits for us: whatever happens, exit within a bound.
  signal(SIGALRM, on_deadline);
  alarm(30);
  signal(SIGPIPE, SIG_IGN);

  std::string config_path, stage_arg, id_arg;
  CLI::App app{
      "shimlet-hook: the OCI runtime hook of shimlet. At createRuntime it starts the container's shim\n"
      "(and registers the container with shimlet-master when the config names one), at poststop it\n"
      "stops the shim and removes its state. The container's OCI state is read from stdin, as runc,\n"
      "crun, podman and CRI-O pass it.",
      "shimlet-hook"};
  app.footer(
      "usage: shimlet-hook --config PATH [createRuntime|createContainer|prestart|poststop]\n"
      "       shimlet-hook --config PATH renew CONTAINER_ID\n"
      "       shimlet-hook --config PATH cleanup CONTAINER_ID\n"
      "Without a stage the OCI state's status tells it (creating/created: start, stopped: poststop).\n"
      "renew: the container's lease with the master (the shim runs it every renew_interval_s).\n"
      "cleanup: what poststop does, for a container gone without one (the shim runs it when its\n"
      "container exits).");
  app.set_version_flag("--version", "shimlet-hook " SHIMLET_VERSION, "Print the version and exit");
  app.add_option("--config", config_path,
                 "Hook config (JSON; docs/design.md; the packages install /etc/shimlet/hook.json)")
      ->type_name("PATH");
  app.add_option("stage", stage_arg, "createRuntime, createContainer, prestart, poststop, renew or cleanup");
  app.add_option("id", id_arg, "renew, cleanup: the container id");
  try {
    app.parse(argc, argv);
    if (!id_arg.empty() && stage_arg != "renew" && stage_arg != "cleanup") throw CLI::ExtrasError({id_arg});
  } catch (const CLI::CallForHelp&) {
    fputs(app.help().c_str(), stdout);
    return 0;
  } catch (const CLI::CallForVersion& e) {
    puts(e.what());
    return 0;
  } catch (const CLI::ParseError& e) {
    log::error("shimlet-hook: bad arguments", {{"error", e.what()}});
    return 2;
  }

  Config cfg;
  try {
    cfg = config_path.empty() ? parse_config("{}", self_dir()) : load_config(config_path, self_dir());
  } catch (const std::exception& e) {
    // Without a config we cannot know whether to fail the container: the
    // contract's default (fail_container_on_error false) applies.
    log::error("shimlet-hook: cannot load config", {{"config", config_path}, {"error", e.what()}});
    return 0;
  }
  if (!config_path.empty()) {
    char buf[PATH_MAX];
    cfg.config_path = ::realpath(config_path.c_str(), buf) ? buf : config_path;
  }
  // timeout_ms is per master tried: with several, each may take its turn.
  const unsigned master_s =
      cfg.master ? static_cast<unsigned>((cfg.master->timeout_ms / 1000 + 1) * cfg.master->urls.size()) : 0;
  if (stage_arg == "renew") {
    log::set_component("hook-renew");
    log::set_context({{"id", id_arg}});
    alarm(master_s + 5);
    if (!cfg.master) {
      log::error("shimlet-hook renew: no master in the hook config", {{"config", config_path}});
      return 2;
    }
    return renew(cfg, id_arg);
  }
  if (stage_arg == "cleanup") {
    // Run by the shim when its container is gone (docs/design.md "Stale
    // state"): what poststop does, for a runtime that never calls it.
    log::set_component("hook-cleanup");
    log::set_context({{"id", id_arg}});
    // As poststop: the end records' and the recordings' flushes, then the DELETE.
    alarm((kPoststopFlushMs + kPoststopRecordingsMs) / 1000 + 10 + master_s);
    try {
      poststop(cfg, id_arg, /*own_shim_only=*/true);
      log::info("container gone: state cleaned up");
      return 0;
    } catch (const std::exception& e) {
      log::error("cleanup after the container failed", {{"error", e.what()}});
      if (::access(cfg.state_dir.c_str(), F_OK) == 0) {
        json line = hook_line("error", "cleanup", id_arg);
        line["error"] = e.what();
        append_hook_log(cfg.state_dir, line);
      }
      return 1;
    }
  }
  g_fail_exit = cfg.fail_container_on_error ? 1 : 0;
  alarm(static_cast<unsigned>(kStdinTimeoutMs / 1000 + cfg.ready_timeout_ms / 1000 + 10) + master_s);
  const int fail_code = cfg.fail_container_on_error ? 1 : 0;

  std::string stage_name = stage_arg;
  std::string id;
  try {
    oci::State st = oci::parse_state(read_stdin_bounded(kStdinTimeoutMs));
    id = st.id;
    log::set_context({{"id", st.id}});
    std::optional<Stage> stage = stage_arg.empty() ? stage_from_status(st.status) : stage_from_name(stage_arg);
    if (!stage)
      throw Error(stage_arg.empty() ? "cannot tell the hook stage from state status \"" + st.status + "\""
                                    : "unknown hook stage " + stage_arg);
    if (stage_name.empty()) stage_name = st.status;
    if (*stage == Stage::Start) {
      Started s = start(cfg, st);
      log::info("shim started", {{"endpoint", s.endpoint}, {"shim_pid", s.shim_pid}});
      if (cfg.master && !(!cfg.fail_container_on_error && register_detached(cfg, st.id, master_s + 5))) {
        try {
          register_and_check(cfg, st.id);
        } catch (const std::exception& e) {
          // The shim's renewer registers it at its next tick; only a config
          // that insists fails the container (and then we undo the start).
          if (cfg.fail_container_on_error) {
            try {
              cleanup(cfg, st.id);
            } catch (const std::exception&) {
            }
          }
          throw;
        }
      }
    } else {
      poststop(cfg, st.id);
    }
    return 0;
  } catch (const std::exception& e) {
    json line = hook_line("error", stage_name, id);
    line["error"] = e.what();
    log::error("shimlet-hook failed", {{"stage", stage_name}, {"error", e.what()}});
    if (::access(cfg.state_dir.c_str(), F_OK) == 0) append_hook_log(cfg.state_dir, line);
    return fail_code;
  }
}

}  // namespace shimlet::hook
