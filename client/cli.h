// shimctl's command line as one CLI11 definition. parse_args (client/args.cc)
// binds it to an Invocation; completion_script (client/completion.cc) walks
// the same App to write the bash and zsh completion, so flags are declared
// once. Option type names say how a value completes: "FILE", "DIR", or none.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <vector>

#include "client/client.h"

namespace shimlet::client {

inline constexpr const char* kShells[] = {"bash", "zsh"};  // `shimctl completion SHELL`

struct Cli {
  CLI::App app{"shimctl: run commands in containers through their shimlet", "shimctl"};
  CLI::App* exec = nullptr;
  CLI::App* pf = nullptr;
  CLI::App* completion = nullptr;
  CLI::App *sessions = nullptr, *sessions_list = nullptr, *sessions_play = nullptr;
  CLI::Option* ns_opt = nullptr;
  // Values without a field of their own in the Invocation.
  std::string state_dir, shell;
  bool proxy = false;
  std::vector<std::string> exec_positional, pf_positional;
};

// The definition, its options bound to inv (and to the Cli's own fields).
std::unique_ptr<Cli> define_cli(Invocation& inv);

}  // namespace shimlet::client
