// Grants: for an authorized exec/port-forward request the master mints a
// ticket (design.md "Tickets") bound to the client's TLS key (cnf.jkt) and
// tells the client where the shim is and which certificate to pin.
// API: docs/master-api.md.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "master/registry.h"
#include "ticket/ticket.h"

namespace shimlet::master {

struct GrantRequest {
  std::string verb;  // "exec" | "portforward"
  std::string container;
  std::vector<std::string> command;
  bool stdin_ = false, tty = false;
  std::vector<ticket::Port> ports;
  std::string jkt;                       // base64url SHA-256 of the client key's SPKI DER (43 chars)
  std::optional<ticket::Recording> rec;  // exec: the recording policy's decision (the ticket's "rec" claim)
};

// Parses the POST body for verb ("exec" | "portforward"); ≤ 64 KiB. Throws
// shimlet::Error with one clear line. jkt may be absent here (the server then
// binds the ticket to the certificate the client presented, if any).
GrantRequest parse_grant_request(std::string_view verb, std::string_view body);

// 43 base64url characters decoding to 32 bytes.
bool valid_jkt(std::string_view jkt);

struct GrantConfig {
  std::string issuer = "shimlet-master";
  std::string kid = "master";
  int64_t lifetime_s = 60;  // must not exceed the shims' max_ticket_lifetime_s
};

struct Grant {
  ticket::Claims claims;
  std::string ticket;
  nlohmann::json response;  // {"endpoint","pin","ticket","container_id","session_id",...}
};

// Mints the ticket for user `sub` to use on registration `target`.
// Requires req.jkt to be valid (tickets are always bound).
Grant mint_grant(const ticket::PrivateKey& key, const GrantConfig& cfg, const std::string& sub, const GrantRequest& req,
                 const Registration& target, int64_t now_s);

}  // namespace shimlet::master
