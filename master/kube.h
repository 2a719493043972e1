// The Kubernetes API subset a stock kubectl needs before exec, port-forward
// and cp (version, discovery), and the parsing of kubectl's streaming
// requests (docs/design.md "Kubernetes streaming").
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "master/http.h"

namespace shimlet::master::kube {

// What kubectl asks for in .../pods/POD/exec?command=..&container=..&stdin=..
struct ExecParams {
  std::vector<std::string> command;
  std::string container;  // "" = the pod's default
  bool stdin_ = false, stdout_ = false, stderr_ = false, tty = false;
};

// Parses the raw query (repeated `command`, `container`, the four flags as Go's
// strconv.ParseBool reads them). Unknown keys are ignored as the kube-apiserver
// does. Throws shimlet::Error with one clear line (no command, bad flag, NUL in
// an argument, too many/long arguments, malformed query).
ExecParams parse_exec_query(std::string_view query);
// Go's strconv.ParseBool ("1", "t", "true", "TRUE", "True", and the false
// forms); false when v is none of them.
bool parse_bool(std::string_view v, bool* out);

// /version for a gitVersion like "v1.32.4" (throws on anything else).
nlohmann::json version_json(const std::string& git_version);
// /api (server_address: host:port clients reach us at), /apis, /api/v1.
nlohmann::json api_versions(const std::string& server_address);
nlohmann::json api_group_list();
nlohmann::json api_v1_resources();

// The request head relayed to the shim: kubectl's request line and headers
// unchanged except Authorization, which carries the ticket.
std::string relay_request_head(const Request& req, const std::string& ticket);

}  // namespace shimlet::master::kube
