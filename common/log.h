// Structured logging: one JSON object per line on stderr (the shim and its
// sessions have stderr pointed at the container's shim.log by the hook).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace shimlet::log {

// Sets the "component" field of every line (e.g. "shim", "session", "hook").
void set_component(std::string component);
// Extra fields added to every line (e.g. container id, session id).
void set_context(const nlohmann::json& fields);

void info(const std::string& msg, const nlohmann::json& fields = nlohmann::json::object());
void warn(const std::string& msg, const nlohmann::json& fields = nlohmann::json::object());
void error(const std::string& msg, const nlohmann::json& fields = nlohmann::json::object());
// Audit events (requests, decisions, session ends) always go out, level "audit".
void audit(const std::string& event, const nlohmann::json& fields);

// "2026-11-27T03:04:05Z" for a Unix time in seconds (UTC), as audit records carry it.
std::string rfc3339(int64_t unix_seconds);

}  // namespace shimlet::log
