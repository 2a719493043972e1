// shimlet-session's command line (session/session_args.h) with CLI11.
#include "session/session_args.h"

#include <CLI/CLI.hpp>
#include <charconv>
#include <sstream>

#include "common/error.h"

namespace shimlet::session {
namespace {

constexpr const char* kUsage =
    "usage: shimlet-session --config PATH [--ns TYPE=FD,...] [--warm IDLE_S | --gate IDLE_S [--no-zygote] "
    "[--cri-listener FD]]";

// One --ns item, TYPE=FD (the type is checked by nsenter, which knows them).
std::pair<std::string, int> ns_item(const std::string& item) {
  auto eq = item.find('=');
  int fd = -1;
  const char* v = item.data() + (eq == std::string::npos ? item.size() : eq + 1);
  auto [end, ec] = std::from_chars(v, item.data() + item.size(), fd);
  if (eq == std::string::npos || eq == 0 || ec != std::errc() || end != item.data() + item.size() || fd < 0 ||
      fd > (1 << 20))
    throw Error("bad --ns item \"" + item + "\" (TYPE=FD, FD 0.." + std::to_string(1 << 20) + ")");
  return {item.substr(0, eq), fd};
}

}  // namespace

Args parse_args(int argc, const char* const* argv) {
  Args a;
  std::vector<std::string> ns;
  CLI::App app{"shimlet-session: serves one connection for the shim", "shimlet-session"};
  app.set_help_flag();  // started by the shim only; the usage comes with every error
  app.add_option("--config", a.config, "the shim's shim.json")->required();
  app.add_option("--ns", ns, "namespace fds TYPE=FD,... (repeated: appended)")->type_name("TYPE=FD,...");
  auto* warm = app.add_option("--warm", a.warm_idle_s, "warm session: wait this long for a connection")
                   ->check(CLI::Range(1, 3600));
  auto* gate = app.add_option("--gate", a.gate_idle_s, "the pre-authentication gate: exit after this long unused")
                   ->check(CLI::Range(1, 3600));
  bool no_zygote = false;
  auto* nozyg = app.add_flag("--no-zygote", no_zygote, "the gate keeps no zygote placed");
  auto* cri = app.add_option("--cri-listener", a.gate_cri_fd, "the gate: the shim's CRI listener fd")
                  ->check(CLI::Range(6, 1 << 20));
  warm->excludes(gate);
  nozyg->needs(gate);
  cri->needs(gate);
  try {
    app.parse(argc, argv);
    // Split here, not with CLI11's delimiter: an empty list ("--ns ''", a
    // container sharing every namespace with the shim) is no items.
    for (const auto& list : ns) {
      std::stringstream ss(list);
      std::string item;
      while (std::getline(ss, item, ',')) a.ns.push_back(ns_item(item));
    }
  } catch (const std::exception& e) {  // CLI::ParseError or a bad --ns item
    throw Error(std::string(e.what()) + "\n" + kUsage);
  }
  a.gate_zygote = !no_zygote;
  return a;
}

}  // namespace shimlet::session
