#include "master/recording_policy.h"

#include <algorithm>

#include "common/error.h"
#include "common/file.h"
#include "common/yaml.h"

namespace shimlet::master {
namespace {

constexpr size_t kMaxPolicyBytes = 1 << 20;

[[noreturn]] void bad(const std::string& where, const std::string& why) { throw Error(where + ": " + why); }

RecordMode mode_of(const yaml::Node& n, const std::string& where) {
  if (!n.is_scalar()) bad(where, "record must be none, tty or all");
  if (n.scalar == "none") return RecordMode::None;
  if (n.scalar == "tty") return RecordMode::Tty;
  if (n.scalar == "all") return RecordMode::All;
  bad(where, "record must be none, tty or all, not \"" + n.scalar.substr(0, 40) + "\"");
}

bool disk_full_of(const yaml::Node& n, const std::string& where) {
  if (n.is_scalar() && n.scalar == "fail-closed") return true;
  if (n.is_scalar() && n.scalar == "fail-open") return false;
  bad(where, "diskFull must be fail-closed or fail-open");
}

uint64_t bytes_of(const yaml::Node& n, const std::string& where) {
  if (!n.is_scalar() || n.scalar.empty() || n.scalar.size() > 13 ||
      !std::all_of(n.scalar.begin(), n.scalar.end(), [](char c) { return c >= '0' && c <= '9'; }))
    bad(where, "maxBytes must be an integer");
  uint64_t v = std::stoull(n.scalar);
  if (v < (64u << 10) || v > (1ull << 40)) bad(where, "maxBytes must be in 65536..1099511627776");
  return v;
}

std::vector<std::string> names_of(const yaml::Node& n, const std::string& where, const char* key) {
  std::vector<std::string> out;
  if (!n.is_seq()) bad(where, std::string(key) + " must be a list of strings");
  for (const auto& e : n.items) {
    if (!e.is_scalar() || e.scalar.empty()) bad(where, std::string(key) + " must be a list of strings");
    out.push_back(e.scalar);
  }
  return out;
}

bool selects(const std::vector<std::string>& sel, const std::string& v) {
  return sel.empty() || std::find(sel.begin(), sel.end(), v) != sel.end();
}

}  // namespace

RecordingPolicy RecordingPolicy::parse(std::string_view text, const std::string& source) {
  if (text.size() > kMaxPolicyBytes) bad(source, "larger than 1 MiB");
  std::vector<yaml::Node> docs;
  try {
    docs = yaml::load_all(text);
  } catch (const Error& e) {
    bad(source, e.what());
  }
  if (docs.size() != 1 || !docs[0].is_map()) bad(source, "want one RecordingPolicy document");
  const yaml::Node& d = docs[0];
  RecordingPolicy p;
  const yaml::Node* rules = nullptr;
  for (size_t i = 0; i < d.keys.size(); i++) {
    const std::string& k = d.keys[i];
    const yaml::Node& v = d.items[i];
    if (k == "apiVersion") {
      if (!v.is_scalar() || v.scalar != "shimlet.io/v1") bad(source, "apiVersion must be shimlet.io/v1");
    } else if (k == "kind") {
      if (!v.is_scalar() || v.scalar != "RecordingPolicy") bad(source, "kind must be RecordingPolicy");
    } else if (k == "default") {
      p.default_mode_ = mode_of(v, source + ": default");
    } else if (k == "diskFull") {
      p.fail_closed_ = disk_full_of(v, source);
    } else if (k == "maxBytes") {
      p.max_bytes_ = bytes_of(v, source);
    } else if (k == "rules") {
      rules = &v;
    } else if (k != "metadata") {
      bad(source, "unknown key \"" + k.substr(0, 40) + "\" (typos are not ignored)");
    }
  }
  if (rules && !rules->is_null()) {
    if (!rules->is_seq()) bad(source, "rules must be a list");
    for (size_t r = 0; r < rules->items.size(); r++) {
      const yaml::Node& n = rules->items[r];
      std::string where = source + ": rule " + std::to_string(r + 1);
      if (!n.is_map()) bad(where, "not a mapping");
      RecordingRule rule;
      bool has_mode = false;
      for (size_t i = 0; i < n.keys.size(); i++) {
        const std::string& k = n.keys[i];
        const yaml::Node& v = n.items[i];
        if (k == "namespaces") {
          rule.namespaces = names_of(v, where, "namespaces");
        } else if (k == "users") {
          rule.users = names_of(v, where, "users");
        } else if (k == "groups") {
          rule.groups = names_of(v, where, "groups");
        } else if (k == "record") {
          rule.mode = mode_of(v, where);
          has_mode = true;
        } else if (k == "diskFull") {
          rule.fail_closed = disk_full_of(v, where);
        } else if (k == "maxBytes") {
          rule.max_bytes = bytes_of(v, where);
        } else {
          bad(where, "unknown key \"" + k.substr(0, 40) + "\"");
        }
      }
      if (!has_mode) bad(where, "record is required");
      p.rules_.push_back(std::move(rule));
    }
  }
  return p;
}

RecordingPolicy RecordingPolicy::load(const std::string& path) {
  return parse(read_regular_file(path, kMaxPolicyBytes), path);
}

RecordingPolicy::Decision RecordingPolicy::decide(const std::string& user, const std::vector<std::string>& groups,
                                                  const std::string& ns, bool tty) const {
  RecordMode mode = default_mode_;
  bool fail_closed = fail_closed_;
  uint64_t max_bytes = max_bytes_;
  std::string which = "default";
  for (size_t i = 0; i < rules_.size(); i++) {
    const RecordingRule& r = rules_[i];
    if (!selects(r.namespaces, ns) || !selects(r.users, user)) continue;
    if (!r.groups.empty() &&
        std::none_of(groups.begin(), groups.end(), [&](const std::string& g) { return selects(r.groups, g); }))
      continue;
    mode = r.mode;
    if (r.fail_closed) fail_closed = *r.fail_closed;
    if (r.max_bytes) max_bytes = r.max_bytes;
    which = "rule " + std::to_string(i + 1);
    break;
  }
  if (mode == RecordMode::None || (mode == RecordMode::Tty && !tty)) return {std::nullopt, which};
  return {ticket::Recording{fail_closed, max_bytes}, which};
}

uint64_t RecordingPolicy::largest_max_bytes() const {
  uint64_t m = max_bytes_;
  for (const auto& r : rules_) m = std::max(m, r.max_bytes);
  return m;
}

bool RecordingPolicy::records_anything() const {
  if (default_mode_ != RecordMode::None) return true;
  return std::any_of(rules_.begin(), rules_.end(), [](const RecordingRule& r) { return r.mode != RecordMode::None; });
}

}  // namespace shimlet::master
