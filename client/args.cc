// Command-line parsing with CLI11, in kubectl's habits: global flags before or
// after the verb, combined short flags (-it), `--` before the command.
#include <algorithm>
#include <cstdlib>
#include <iterator>

#include "client/cli.h"
#include "client/client.h"
#include "common/version.h"

namespace shimlet::client {
namespace {

constexpr const char* kExecUsage =
    "shimctl [--local [--tls] [--state-dir DIR] | [--proxy] --server URL[,URL] --token T | --kubeconfig F] exec [-i] "
    "[-t] "
    "[-n NS] "
    "TARGET [-c "
    "CONTAINER] -- CMD [ARGS...]";
constexpr const char* kPortForwardUsage =
    "shimctl [--local [--tls]] [--state-dir DIR] port-forward [-n NS] TARGET [-c CONTAINER] [--address ADDR[,ADDR]] "
    "[--ping-interval S] [LOCAL:]REMOTE[/udp] ... | port-forward [-n NS] TARGET --stdio REMOTE";

constexpr const char* kSessionsUsage =
    "shimctl [--server URL --token T | --kubeconfig F] sessions list [-n NS] [--user U] [-o json] | "
    "sessions play ID [--speed X] [--idle-time-limit S] | sessions export ID";

}  // namespace

std::string default_state_dir() {
  const char* e = std::getenv("SHIMLET_STATE_DIR");
  return e && *e ? e : kDefaultStateDir;
}

std::unique_ptr<Cli> define_cli(Invocation& inv) {
  auto cli = std::make_unique<Cli>();
  CLI::App& app = cli->app;
  app.footer(std::string("Usage: ") + kExecUsage + "\n       " + kPortForwardUsage + "\n       " + kSessionsUsage +
             "\n       shimctl completion bash|zsh");
  app.set_version_flag("--version", "shimctl " SHIMLET_VERSION, "Print the version and exit");
  app.set_help_all_flag("--help-all", "Print the help of every command and exit");
  app.add_flag("--local", inv.local, "Root on the node: read the state dir and mint a ticket with its local.key");
  app.add_flag("--tls", inv.local_tls, "With --local: use the shim's TLS port rather than its root-only local socket");
  app.add_option("--state-dir", cli->state_dir, "shimlet state directory (default $SHIMLET_STATE_DIR or /run/shimlet)")
      ->type_name("DIR");
  app.add_option("--ticket-lifetime", inv.ticket_lifetime_s,
                 "With --local: seconds until the minted ticket expires (default 30; it only needs to outlive the "
                 "connection's start)")
      ->check(CLI::Range(int64_t{1}, int64_t{3600}));
  cli->ns_opt = app.add_option("-n,--namespace", inv.ns, "Namespace of the pod named by TARGET")->capture_default_str();
  // Master mode (the default without --local), kubectl's flag names.
  // Several masters: comma-separated or repeated; tried in order on a connection failure.
  app.add_option("--server", inv.master.servers,
                 "shimlet-master URL (https://HOST:PORT); several (comma-separated or repeated) are tried in order "
                 "when one cannot be reached")
      ->type_name("URL")
      ->delimiter(',')
      ->allow_extra_args(false);
  app.add_option("--token", inv.master.token, "Bearer token for the master");
  app.add_option("--certificate-authority", inv.master.ca, "CA bundle that verifies the master's certificate")
      ->type_name("FILE");
  app.add_option("--client-certificate", inv.master.client_cert, "Client certificate for the master (PEM)")
      ->type_name("FILE");
  app.add_option("--client-key", inv.master.client_key, "Key of --client-certificate (PEM)")->type_name("FILE");
  app.add_option("--kubeconfig", inv.master.kubeconfig, "kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
      ->type_name("FILE");
  app.add_option("--context", inv.master.contexts,
                 "kubeconfig context (default its current-context); several (comma-separated or repeated): one master "
                 "each, tried in order when one cannot be reached")
      ->delimiter(',')
      ->allow_extra_args(false);
  app.add_flag("--proxy", cli->proxy,
               "Reach the shim through the master's tunnel (default: directly, through the master only when the "
               "node does not answer within 2 s)");
  app.require_subcommand(1);

  CLI::App* exec = cli->exec = app.add_subcommand("exec", "Execute a command in a container");
  exec->fallthrough();  // global flags may follow the verb, as with kubectl
  exec->footer(std::string("Usage: ") + kExecUsage);
  exec->add_flag("-i,--stdin", inv.exec.stdin_, "Pass stdin to the container");
  exec->add_flag("-t,--tty", inv.exec.tty, "Stdin is a TTY");
  exec->add_option("-c,--container", inv.exec.container, "Container name within the pod");
  exec->add_option("--limit-pids", inv.exec.limits.pids, "Session pids limit (--local; capped by the shim's config)")
      ->check(CLI::Range(uint64_t{1}, uint64_t{4194304}));
  exec->add_option("--limit-memory", inv.exec.limits.memory,
                   "Session memory limit, e.g. 64M (--local; capped by the shim's config)")
      ->transform(CLI::AsSizeValue(false))
      ->check(CLI::Range(uint64_t{1} << 20, uint64_t{1} << 50));
  exec->add_option("--limit-cpu-weight", inv.exec.limits.cpu_weight,
                   "Session CPU weight 1..10000 (--local; capped by the shim's config)")
      ->check(CLI::Range(uint64_t{1}, uint64_t{10000}));
  exec->add_option("TARGET", cli->exec_positional, "Container id, unique id prefix, or pod name");

  CLI::App* pf = cli->pf =
      app.add_subcommand("port-forward", "Forward local ports (or stdin/stdout) to ports in a container");
  pf->fallthrough();
  pf->footer(std::string("Usage: ") + kPortForwardUsage);
  pf->add_option("-c,--container", inv.pf.container, "Container name within the pod");
  pf->add_option("--address", inv.pf.addresses,
                 "Local addresses to listen on (comma-separated; 'localhost' = 127.0.0.1 and ::1)")
      ->delimiter(',')
      ->allow_extra_args(false);  // one value per --address; the rest are ports
  pf->add_flag("--stdio", inv.pf.stdio, "Forward stdin/stdout to the one REMOTE port (ssh ProxyCommand, nc stand-in)");
  pf->add_option("--ping-interval", inv.pf.ping_interval_s,
                 "Seconds between keepalive PINGs to the shim; one unanswered for a whole interval drops the "
                 "connection (default 30)")
      ->check(CLI::Range(1, 3600));
  pf->add_option("TARGET", cli->pf_positional, "TARGET then [LOCAL:]REMOTE[/udp] ...");

  // Recorded sessions, through the master (client/sessions.cc).
  CLI::App* ss = cli->sessions =
      app.add_subcommand("sessions", "List, play and export recorded exec sessions (through the master)");
  ss->fallthrough();
  ss->require_subcommand(1);
  CLI::App* ss_list = cli->sessions_list =
      ss->add_subcommand("list", "List recorded sessions (all namespaces unless -n)");
  ss_list->fallthrough();
  ss_list->add_option("--user", inv.sessions.user, "Only this user's sessions");
  ss_list->add_option("-o,--output", inv.sessions.output, "table (default) or json")
      ->check(CLI::IsMember({"table", "json"}));
  CLI::App* ss_play = cli->sessions_play =
      ss->add_subcommand("play", "Replay a recorded session on this terminal, with its timing");
  ss_play->fallthrough();
  ss_play->add_option("ID", inv.sessions.id, "Session id (after -- when it starts with -)");
  ss_play->add_option("--speed", inv.sessions.speed, "Playback speed factor")->check(CLI::Range(0.01, 1000.0));
  ss_play->add_option("--idle-time-limit", inv.sessions.idle_limit_s, "Cut longer pauses to this many seconds")
      ->check(CLI::Range(0.0, 86400.0));
  CLI::App* ss_export = ss->add_subcommand("export", "Write a recorded session's asciicast v2 file to stdout");
  ss_export->fallthrough();
  ss_export->add_option("ID", inv.sessions.id, "Session id (after -- when it starts with -)");

  // kubectl's `completion SHELL`: the script is generated from this very definition.
  cli->completion = app.add_subcommand("completion", "Print the bash or zsh completion script for shimctl");
  cli->completion->add_option("SHELL", cli->shell, "bash or zsh")
      ->required()
      ->check(CLI::IsMember(std::vector<std::string>(std::begin(kShells), std::end(kShells))));
  return cli;
}

Invocation parse_args(const std::vector<std::string>& argv) {
  Invocation inv;
  // CLI11 captures what follows `--` as positionals but cannot tell whether a
  // `--` was there; kubectl insists on it (so the command's own flags are never
  // ours), so the command is split off here before CLI11 sees the rest.
  std::vector<std::string> ours;
  bool have_dashdash = false;
  for (size_t i = 0; i < argv.size(); ++i) {
    if (i > 0 && argv[i] == "--") {
      have_dashdash = true;
      inv.exec.command.assign(argv.begin() + static_cast<ptrdiff_t>(i) + 1, argv.end());
      break;
    }
    ours.push_back(argv[i]);
  }
  if (ours.empty()) ours.push_back("shimctl");

  std::unique_ptr<Cli> cli = define_cli(inv);
  CLI::App& app = cli->app;
  CLI::App* exec = cli->exec;
  CLI::App* pf = cli->pf;
  std::vector<std::string>& positional = cli->exec_positional;
  std::vector<std::string>& pf_positional = cli->pf_positional;

  std::vector<const char*> cargv;
  for (const auto& a : ours) cargv.push_back(a.c_str());
  try {
    app.parse(static_cast<int>(cargv.size()), cargv.data());
  } catch (const CLI::CallForHelp&) {
    inv.help = true;
    inv.help_text = app.help();
    return inv;
  } catch (const CLI::CallForAllHelp&) {
    inv.help = true;
    inv.help_text = app.help("", CLI::AppFormatMode::All);
    return inv;
  } catch (const CLI::CallForVersion& v) {
    inv.help = true;
    inv.help_text = std::string(v.what()) + "\n";
    return inv;
  } catch (const CLI::ParseError& e) {
    std::string what = e.what();
    if (app.get_subcommands().empty()) {
      // CLI11 only says "a subcommand is required": name the word it did not know.
      std::string commands;
      for (const CLI::App* sub : app.get_subcommands({})) commands += (commands.empty() ? "" : ", ") + sub->get_name();
      for (size_t i = 1; i < ours.size(); ++i) {
        const std::string& a = ours[i];
        const CLI::Option* opt =
            a.size() > 1 && a[0] == '-' && a.find('=') == std::string::npos ? app.get_option_no_throw(a) : nullptr;
        if (opt && opt->get_expected_max() > 0) {  // takes a value (a flag expects none)
          ++i;                                     // its value
          continue;
        }
        if (!a.empty() && a[0] != '-') {
          what = "unknown command '" + a + "' (commands: " + commands + ")";
          break;
        }
      }
    }
    if (what.empty()) what = e.get_name();
    throw UsageError(what + " (usage: " + (pf->parsed() ? kPortForwardUsage : kExecUsage) + ")");
  }

  inv.state_dir = cli->state_dir.empty() ? default_state_dir() : cli->state_dir;
  const bool proxy = cli->proxy;
  if (proxy && inv.local) throw UsageError("--proxy goes through the master; it cannot be combined with --local");
  if (inv.local_tls && !inv.local) throw UsageError("--tls only applies to --local (the master's grants use TLS)");
  inv.proxy = proxy ? ProxyMode::Always : ProxyMode::Auto;
  inv.ns_set = cli->ns_opt->count() > 0;
  if (exec->parsed()) {
    inv.verb = "exec";
    if (positional.empty()) throw UsageError(std::string("exec: missing TARGET (usage: ") + kExecUsage + ")");
    if (positional.size() > 1)
      throw UsageError("exec: unexpected argument '" + positional[1] +
                       "': the command goes after --, as in 'shimctl exec " + positional[0] + " -- " + positional[1] +
                       "'");
    inv.exec.target = positional[0];
    if (inv.exec.target.empty()) throw UsageError("exec: TARGET is empty");
    if (!have_dashdash || inv.exec.command.empty())
      throw UsageError("exec: missing command: put it after --, as in 'shimctl exec " + inv.exec.target + " -- sh'");
    if (inv.ns.empty()) throw UsageError("exec: -n/--namespace is empty");
  }
  if (cli->sessions->parsed()) {
    inv.verb = "sessions";
    if (inv.local) throw UsageError("sessions: recordings are kept by the master; --local does not apply");
    inv.sessions.action = cli->sessions_list->parsed() ? "list" : cli->sessions_play->parsed() ? "play" : "export";
    // Local tickets' ids are base64url and may start with '-': `sessions play -- -AbC...`.
    if (inv.sessions.id.empty() && inv.sessions.action != "list" && inv.exec.command.size() == 1) {
      inv.sessions.id = inv.exec.command[0];
      inv.exec.command.clear();
    }
    if (!inv.exec.command.empty()) throw UsageError("sessions: unexpected arguments after --");
    if (inv.sessions.action != "list" && inv.sessions.id.empty())
      throw UsageError("sessions " + inv.sessions.action + ": missing ID (usage: " + kSessionsUsage + ")");
  }
  if (cli->completion->parsed()) {
    inv.verb = "completion";
    inv.completion_shell = cli->shell;
  }
  if (pf->parsed()) {
    inv.verb = "port-forward";
    // Ports may follow `--` too (as kubectl/cobra allows).
    pf_positional.insert(pf_positional.end(), inv.exec.command.begin(), inv.exec.command.end());
    inv.exec.command.clear();
    parse_port_forward(inv.pf, pf_positional);
    if (inv.ns.empty()) throw UsageError("port-forward: -n/--namespace is empty");
  }
  return inv;
}

}  // namespace shimlet::client
