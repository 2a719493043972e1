// Structured logging: one JSON object per line on stderr (the shim and its
// sessions have stderr pointed at the container's shim.log by the hook).
#pragma once
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

}  // namespace shimlet::log
